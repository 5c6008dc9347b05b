"""The one place where bytes are read and written: local paths and any fsspec URI (s3:// ...).

Object-store endpoint and credentials come from the standard environment and config files
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``~/.aws/config`` ...), which s3fs/botocore read
themselves; nothing here accepts, stores or logs a credential. Log messages name URIs only.

Writes are atomic. A local file is written under a temporary name in the same directory and then
renamed over the target (``os.replace``); an object store commits a PUT (or a completed multipart
upload) in one step, so a reader never sees a half-written object there either.

One retry policy covers every call here (reads, writes, listings, deletes, copies and the reads of
an open file; pipeline.io.retry): on throttling (503 SlowDown), 5xx and dropped or timed-out
connections it retries with bounded exponential backoff and full jitter (:data:`RETRY`); an error
that retrying cannot change (403, 404, a precondition) is raised at once. Every retry is logged at
debug level and reported to the listeners of :func:`on_retry` (the job counts them per stage in
run.json). botocore's and s3fs's own retries are turned off, so this is the only policy. Writes
stay idempotent under retry: a retried PUT writes the same bytes to the same name.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import logging
import os
import posixpath
import tempfile
import uuid
from typing import Iterator, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.io.retry import RETRY, RetryPolicy, on_retry, retried, retrying, transient  # noqa: F401 - the storage API

log = logging.getLogger(__name__)
T = TypeVar("T")

# Object-store clients do not retry on their own (botocore here, s3fs in filesystem()): the
# policy above is the only one.
fsspec.config.conf.setdefault("s3", {}).setdefault("config_kwargs", {}).setdefault(
    "retries", {"mode": "standard", "total_max_attempts": 1})

_IO_LOG = os.environ.get("IRN_IO_LOG")  # benchmarks: every read, write and listing, one line each


def _log(op: str, uri: str) -> None:
    if _IO_LOG:
        with open(_IO_LOG, "a") as f:
            f.write(f"{op} {uri}\n")


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path within it) for a local path or any fsspec URI."""
    fs, path = fsspec.core.url_to_fs(uri)
    if hasattr(fs, "retries"):  # s3fs's own retry loop (a class attribute): one try, RETRY decides
        fs.retries = 1
    return fs, path


def retrying_filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """:func:`filesystem` for a client this module does not wrap (Ray Train's checkpoint I/O goes
    through pyarrow): an object store's own retries are left on, botocore's standard mode
    (exponential backoff with jitter on throttling, 5xx and connection errors) with as many
    attempts as :data:`RETRY`."""
    fs, path = filesystem(uri)
    if isinstance(fs, LocalFileSystem):
        return fs, path
    options = {**fs.storage_options,
               "config_kwargs": {**fs.storage_options.get("config_kwargs", {}),
                                 "retries": {"mode": "standard", "total_max_attempts": RETRY.attempts}}}
    checkpoint_fs = type(fs)(**options)
    checkpoint_fs.retries = RETRY.attempts
    return checkpoint_fs, path


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


@retried("exists")
def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    fs.invalidate_cache(path)  # other processes (Ray workers) write here: never trust a cached listing
    return fs.exists(path)


@retried("exists")
def is_dir(uri: str) -> bool:
    """Whether ``uri`` is a directory (on an object store: a prefix with objects under it)."""
    fs, path = filesystem(uri)
    fs.invalidate_cache(path)  # see exists()
    return fs.isdir(path)


@retried("read")
def read_bytes(uri: str) -> bytes:
    """Whole content of a file; FileNotFoundError if missing."""
    _log("read", uri)
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as f:
        return f.read()


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


@retried("write")
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


@retried("remove")
def remove(uri: str, *, recursive: bool = False) -> None:
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


@retried("makedirs")
def makedirs(uri: str) -> None:
    fs, path = filesystem(uri)
    fs.makedirs(path, exist_ok=True)


@retried("list")
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


@retried("list")
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

    Locally a temporary file renamed over the target; for an object store the output is spooled to
    a local temporary file and then uploaded (one PUT or multipart upload, retried as a whole).
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
        with tempfile.NamedTemporaryFile(prefix="irn-upload-") as f:
            yield f
            f.flush()
            retrying("write", uri, lambda: fs.put_file(f.name, path))


class _RetryingFile(io.RawIOBase):
    """A remote file whose reads are retried by the policy (a failed range read leaves the
    position where it was, so it can be asked again)."""

    def __init__(self, f, uri: str):
        self._f, self._uri = f, uri

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        position = self._f.tell()

        def read() -> bytes:
            self._f.seek(position)
            return self._f.read(size)

        return retrying("read", self._uri, read)

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def readall(self) -> bytes:
        return self.read(-1)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    @property
    def size(self) -> int:
        return self._f.size

    def close(self) -> None:
        self._f.close()
        super().close()


def open_input(uri: str) -> io.BufferedIOBase:
    """A readable binary file object (for streaming readers such as torch.load and Parquet's range
    reads); on an object store its reads are retried by the policy."""
    _log("read", uri)
    fs, path = filesystem(uri)
    if isinstance(fs, LocalFileSystem):
        return fs.open(path, "rb")
    return _RetryingFile(retrying("open", uri, lambda: fs.open(path, "rb")), uri)


@retried("copy")
def copy(source: str, target: str) -> None:
    """Copy one file; server-side on object stores (one atomic CopyObject), atomic locally."""
    fs, src = filesystem(source)
    target_fs, dst = filesystem(target)
    if isinstance(fs, LocalFileSystem) or type(fs) is not type(target_fs):
        write_bytes(target, read_bytes(source))
    else:
        fs.copy(src, dst)


# ------------------------------------------------------------------- conditional writes (leases)


def version_tag(data: bytes) -> str:
    """What :func:`read_versioned` and :func:`replace_if` compare: the content's MD5, which is the
    ETag S3 gives an object written in one PUT."""
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


@retried("create")
def create_exclusive(uri: str, data: bytes) -> bool:
    """Write ``data`` to ``uri`` only if nothing is there: True when this call created it.
    Locally a hard link of a complete temporary file (atomic, fails if the target exists); on S3
    a conditional PUT (``If-None-Match: *``)."""
    fs, path = filesystem(uri)
    if isinstance(fs, LocalFileSystem):
        directory = os.path.dirname(path) or "."
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".tmp-{uuid.uuid4().hex}-{os.path.basename(path)}")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            os.remove(tmp)
    try:
        fs.pipe_file(path, data, mode="create")
        return True
    except FileExistsError:
        return False


@retried("read")
def read_versioned(uri: str) -> tuple[bytes, str] | None:
    """(content, tag) of ``uri``, or None when it does not exist."""
    try:
        data = read_bytes.__wrapped__(uri)
    except FileNotFoundError:
        return None
    return data, version_tag(data)


@retried("replace")
def replace_if(uri: str, data: bytes, tag: str) -> bool:
    """Replace ``uri`` with ``data`` only if its content still has ``tag`` (compare and swap):
    True when replaced. Locally under an exclusive ``fcntl`` lock of ``<uri>.lock``; on S3 a
    conditional PUT (``If-Match`` on the ETag)."""
    fs, path = filesystem(uri)
    if isinstance(fs, LocalFileSystem):
        with open(path + ".lock", "a") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            try:
                with open(path, "rb") as f:
                    if version_tag(f.read()) != tag:
                        return False
            except FileNotFoundError:
                return False
            write_bytes.__wrapped__(uri, data)
            return True
    try:
        fs.pipe_file(path, data, IfMatch=f'"{tag}"')
        return True
    except (FileNotFoundError, OSError) as err:
        if isinstance(err, FileNotFoundError) or err.errno == errno.EINVAL:  # 404, 412 Precondition Failed
            return False
        raise


@retried("remove")
def remove_if(uri: str, tag: str) -> bool:
    """Delete ``uri`` if its content still has ``tag``: True when this call deleted it."""
    current = read_versioned.__wrapped__(uri)
    if current is None or current[1] != tag:
        return False
    fs, path = filesystem(uri)
    fs.rm(path)
    return True
