"""The one place store errors become errno values.

The core raises `PoolFSError(errno)`; the FUSE adapter (fuse_ops.py) turns it into
`FuseOSError`. Every store error kind maps through `ERRNO_FOR` (one test per row in
tests/test_core_errors.py).
An unexpected exception is logged once with operation, path and key, then chained as EIO.
"""

from __future__ import annotations

import errno
import logging
import os

from poolfs.stores import Changed, Denied, NotFound, StoreError, Throttled, TooLarge, Transient

log = logging.getLogger("poolfs.fs")


class PoolFSError(OSError):
    """A filesystem error carrying the errno the caller will see."""

    def __init__(self, err: int, message: str | None = None) -> None:
        super().__init__(err, message or os.strerror(err))


# Order matters: the first matching class wins (Throttled before its base Transient).
ERRNO_FOR: tuple[tuple[type[StoreError], int], ...] = (
    (NotFound, errno.ENOENT),
    (Denied, errno.EACCES),
    (Throttled, errno.EAGAIN),
    (Transient, errno.EIO),
    (Changed, errno.EIO),  # the object changed under an open reader: never mix versions
    (TooLarge, errno.EFBIG),
    (StoreError, errno.EIO),
)


def errno_for(exc: StoreError) -> int:
    for kind, err in ERRNO_FOR:
        if isinstance(exc, kind):
            return err
    return errno.EIO


def from_store(exc: StoreError, op: str, path: str) -> PoolFSError:
    """Translate a store error; logs everything but a plain NotFound (an ordinary answer)."""
    err = errno_for(exc)
    if not isinstance(exc, NotFound):
        log.warning("%s %r (key %r): %s -> %s", op, path, exc.key, exc, errno.errorcode[err])
    return PoolFSError(err, f"{op} {path}: {exc}")


def unexpected(exc: BaseException, op: str, path: str, key: str | None) -> PoolFSError:
    log.error("unexpected error in %s %r (key %r)", op, path, key, exc_info=exc)
    return PoolFSError(errno.EIO, f"{op} {path}: internal error")
