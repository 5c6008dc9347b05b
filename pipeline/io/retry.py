"""The one retry policy of every storage call (pipeline.io.storage): bounded exponential backoff
with full jitter on throttling (503 SlowDown), 5xx and dropped or timed-out connections; an error
that retrying cannot change (403, 404, a failed precondition) is raised at once. Every retry is
logged at debug level and reported to the listeners of :func:`on_retry`.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import random
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 8  # tries of one call, the first included
    base_seconds: float = 0.25  # the n-th wait is uniform in [0, min(cap, base * 2^n)] (full jitter)
    cap_seconds: float = 8.0


# IRN_STORAGE_RETRIES=attempts[,base[,cap]] overrides the policy (the fault tests shorten it).
_ENV = [float(v) for v in os.environ.get("IRN_STORAGE_RETRIES", "").split(",") if v]
RETRY = RetryPolicy(*([int(_ENV[0])] + _ENV[1:3])) if _ENV else RetryPolicy()
_listeners: list[Callable[[str, str, BaseException], None]] = []
# Exceptions of the HTTP stacks under s3fs that mean the connection failed, by class name (so this
# module needs neither botocore nor aiohttp to be importable).
_CONNECTION_ERRORS = {"EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError",
                      "ConnectTimeoutError", "HTTPClientError", "ClientPayloadError", "ServerDisconnectedError",
                      "ClientOSError", "ClientConnectorError", "IncompleteRead", "ResponseParserError",
                      "FSTimeoutError", "ProtocolError", "ResponseStreamingError"}
_TRANSIENT_ERRNOS = {errno.EBUSY, errno.EREMOTEIO, errno.EIO, errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNRESET,
                     errno.ECONNABORTED, errno.EPIPE}
# s3fs names the S3 error code in its message when it maps it to a generic OSError.
_TRANSIENT_CODES = ("SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttl")


def transient(err: BaseException) -> bool:
    """Whether retrying ``err`` may succeed: throttling, 5xx, a dropped or timed-out connection."""
    if isinstance(err, (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(err, (ConnectionError, TimeoutError)):
        return True
    if any(cls.__name__ in _CONNECTION_ERRORS for cls in type(err).__mro__):
        return True
    if isinstance(err, OSError):
        return err.errno in _TRANSIENT_ERRNOS or any(code in str(err) for code in _TRANSIENT_CODES)
    return False


def on_retry(listener: Callable[[str, str, BaseException], None]) -> None:
    """Call ``listener(operation, uri, error)`` on every retry (in this process), once."""
    if listener not in _listeners:
        _listeners.append(listener)


def retrying(operation: str, uri: str, call: Callable[[], T], policy: RetryPolicy | None = None) -> T:
    """``call()``, retried by the policy while it fails with a :func:`transient` error."""
    policy = policy or RETRY
    for attempt in range(policy.attempts):
        try:
            return call()
        except Exception as err:  # noqa: BLE001 - classified below; the last or a lasting one is raised
            if attempt == policy.attempts - 1 or not transient(err):
                raise
            wait = random.uniform(0, min(policy.cap_seconds, policy.base_seconds * 2 ** attempt))
            log.debug("storage: %s %s failed (%s: %s); retry %d of %d in %.2fs", operation, uri, type(err).__name__,
                      err, attempt + 1, policy.attempts - 1, wait)
            for listener in _listeners:
                listener(operation, uri, err)
            time.sleep(wait)
    raise AssertionError("unreachable")


def retried(operation: str):
    """Decorator: the whole call, by URI (its first argument), under the retry policy."""

    def wrap(fn):
        @functools.wraps(fn)
        def call(uri, *args, **kwargs):
            return retrying(operation, str(uri), lambda: fn(uri, *args, **kwargs))

        return call

    return wrap
