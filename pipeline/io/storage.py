"""The one place where bytes are read and written: local paths and any fsspec URI (s3:// ...).

Object-store endpoint and credentials come from the standard environment and config files
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``~/.aws/config`` ...), which s3fs/botocore read
themselves; nothing here accepts, stores or logs a credential. Log messages name URIs only.

Writes are atomic. A local file is written under a temporary name in the same directory and then
renamed over the target (``os.replace``); an object store commits a PUT (or a completed multipart
upload) in one step, so a reader never sees a half-written object there either.
"""

from __future__ import annotations

import contextlib
import io
import os
import posixpath
import uuid
from typing import Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem

_IO_LOG = os.environ.get("IRN_IO_LOG")  # benchmarks: every read, write and listing, one line each


def _log(op: str, uri: str) -> None:
    if _IO_LOG:
        with open(_IO_LOG, "a") as f:
            f.write(f"{op} {uri}\n")


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path within it) for a local path or any fsspec URI."""
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


def is_local(uri: str) -> bool:
    return isinstance(filesystem(uri)[0], LocalFileSystem)


def join(base: str, *parts: str) -> str:
    """Join URI path segments with '/', keeping the scheme (``s3://b/p`` + ``x`` -> ``s3://b/p/x``)."""
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}" if part else out
    return out


def parent(uri: str) -> str:
    """The directory part of a URI."""
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://{posixpath.dirname(rest.rstrip('/'))}"
    return os.path.dirname(os.path.abspath(uri))


def resolve(uri: str, base_dir: str) -> str:
    """Resolve ``uri`` against ``base_dir`` unless it is absolute or has a scheme."""
    if "://" in uri or os.path.isabs(uri):
        return uri
    if "://" in base_dir:
        scheme, rest = base_dir.split("://", 1)
        return f"{scheme}://{posixpath.normpath(posixpath.join(rest, uri))}"
    return os.path.normpath(os.path.join(base_dir, uri))


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    fs.invalidate_cache(path)  # other processes (Ray workers) write here: never trust a cached listing
    return fs.exists(path)


def is_dir(uri: str) -> bool:
    """Whether ``uri`` is a directory (on an object store: a prefix with objects under it)."""
    fs, path = filesystem(uri)
    fs.invalidate_cache(path)  # see exists()
    return fs.isdir(path)


def read_bytes(uri: str) -> bytes:
    """Whole content of a file; FileNotFoundError if missing."""
    _log("read", uri)
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as f:
        return f.read()


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` to ``uri`` atomically, creating parent directories as needed."""
    fs, path = filesystem(uri)
    if isinstance(fs, LocalFileSystem):
        with open_output(uri) as f:
            f.write(data)
    else:
        _log("write", uri)
        # One PUT (or one completed multipart upload): the object appears whole or not at all.
        fs.pipe_file(path, data)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def remove(uri: str, *, recursive: bool = False) -> None:
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


def makedirs(uri: str) -> None:
    fs, path = filesystem(uri)
    fs.makedirs(path, exist_ok=True)


def list_files(uri: str, suffix: str = "") -> list[str]:
    """Sorted URIs of the files directly under ``uri`` ending in ``suffix``; [] if it doesn't exist.

    Temporary files of in-flight atomic writes (``.tmp-*``) are never listed.
    """
    return sorted(iter_files(uri, suffix))


def iter_files(uri: str, suffix: str = "") -> Iterator[str]:
    _log("list", uri)
    fs, path = filesystem(uri)
    fs.invalidate_cache(path)  # see exists()
    if not fs.exists(path):
        return
    local = isinstance(fs, LocalFileSystem)
    for info in fs.ls(path, detail=True):
        name = info["name"]
        base = posixpath.basename(name.rstrip("/"))
        if info.get("type") != "file" or base.startswith(".tmp-") or not base.endswith(suffix):
            continue
        yield name if local else fs.unstrip_protocol(name)


def list_dirs(uri: str) -> list[str]:
    """Sorted URIs of the directories directly under ``uri``; [] if it doesn't exist."""
    fs, path = filesystem(uri)
    fs.invalidate_cache(path)
    if not fs.exists(path):
        return []
    local = isinstance(fs, LocalFileSystem)
    names = [info["name"].rstrip("/") for info in fs.ls(path, detail=True) if info.get("type") == "directory"]
    return sorted(name if local else fs.unstrip_protocol(name) for name in names)


def remove_temp_files(directory: str) -> int:
    """Delete temporary files that killed writers left in ``directory`` (local only); their count.

    Call only when no writer of that directory is running (a stage calls it once it is complete).
    """
    fs, path = filesystem(directory)
    if not isinstance(fs, LocalFileSystem) or not os.path.isdir(path):
        return 0
    stale = [entry.path for entry in os.scandir(path) if entry.name.startswith(".tmp-") and entry.is_file()]
    for name in stale:
        try:
            os.remove(name)
        except FileNotFoundError:
            pass
    return len(stale)


@contextlib.contextmanager
def open_output(uri: str) -> Iterator[io.BufferedIOBase]:
    """A binary file to stream a large output into; it appears at ``uri`` whole, on success only.

    Locally a temporary file renamed over the target; on object stores a multipart upload that
    completes on close (an upload abandoned by an error is never completed, so nothing appears).
    """
    _log("write", uri)
    fs, path = filesystem(uri)
    if isinstance(fs, LocalFileSystem):
        directory = os.path.dirname(path) or "."
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".tmp-{uuid.uuid4().hex}-{os.path.basename(path)}")
        try:
            with open(tmp, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    else:
        f = fs.open(path, "wb")
        try:
            yield f
        except BaseException:
            f.discard()  # abort the multipart upload
            raise
        f.close()


def open_input(uri: str) -> io.BufferedIOBase:
    """A readable binary file object (for streaming readers such as torch.load)."""
    _log("read", uri)
    fs, path = filesystem(uri)
    return fs.open(path, "rb")


def copy(source: str, target: str) -> None:
    """Copy one file; server-side on object stores (one atomic CopyObject), atomic locally."""
    fs, src = filesystem(source)
    target_fs, dst = filesystem(target)
    if isinstance(fs, LocalFileSystem) or type(fs) is not type(target_fs):
        write_bytes(target, read_bytes(source))
    else:
        fs.copy(src, dst)
