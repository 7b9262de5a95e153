"""Open-file state: pinned readers and staged writers.

Invariants:
- A `PinnedReader` reads exactly one object version (its etag); if the object changes under it,
  reads fail with EIO (the store raises Changed). Before the object is deleted or moved while
  the reader is open, `materialize()` copies that version to the spill dir so the handle keeps
  working (POSIX: an unlinked open file stays readable).
- A `StagedFile` is shared by every write-capable handle of one path (and by read handles opened
  while it exists), so handles of one mount see each other's writes. Existing content is fetched
  into the staging file only when a change needs it (first write, truncate to non-zero, read
  after a write). `upload()` makes the store object equal the staged bytes, atomically, or
  raises; on failure the staged bytes are hard-linked into `<spill>/lost+found/`.
- A staged file that hit EFBIG is poisoned: it never uploads, so the stored object is unchanged.
- The kernel sends a flush for every close(), including the close of a descriptor that was
  dup'ed away (shell redirections, dd). So a flush uploads only content changed by write() or
  truncate(); the change made by the open itself (creation, O_TRUNC) waits for more writes or
  for release. Otherwise `echo x > f` would first publish an empty f.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor

from poolfs.fs.config import FSConfig
from poolfs.fs.errors import PoolFSError, from_store
from poolfs.fs.meta import Node, encode_meta
from poolfs.fs.readahead import ByteBudget, ReadAhead
from poolfs.stores import ObjectInfo, Store, StoreError

log = logging.getLogger("poolfs.fs")


class Spill:
    """The per-mount spill area: staging files and the shared lost+found."""

    def __init__(self, spill_dir: str) -> None:
        self.root = os.path.abspath(spill_dir)
        self.staging = os.path.join(self.root, f"staging-{os.getpid()}")
        self.lost_found = os.path.join(self.root, "lost+found")
        os.makedirs(self.staging, mode=0o700, exist_ok=True)
        os.makedirs(self.lost_found, mode=0o700, exist_ok=True)
        self._counter = 0
        self._lock = threading.Lock()

    def new_file(self) -> tuple[int, str]:
        with self._lock:
            self._counter += 1
            name = os.path.join(self.staging, f"f{self._counter}")
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        return fd, name

    def keep(self, staged_path: str, key: str) -> str:
        """Hard-link (or copy) staged bytes into lost+found; returns the kept path."""
        stamp = time.strftime("%Y%m%dT%H%M%S")
        flat = key.replace("/", "%2F")[:200] or "root"
        with self._lock:
            self._counter += 1
            dest = os.path.join(self.lost_found, f"{stamp}-{os.getpid()}-{self._counter}-{flat}")
        try:
            os.link(staged_path, dest)
        except OSError:
            with open(staged_path, "rb") as src, open(dest, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
        return dest

    def cleanup(self) -> None:
        try:
            for name in os.listdir(self.staging):
                os.unlink(os.path.join(self.staging, name))
            os.rmdir(self.staging)
        except OSError as exc:
            log.warning("could not clean staging dir %s: %s", self.staging, exc)


class Context:
    """What open files need from the filesystem: store, config, threads, budget, spill."""

    def __init__(
        self, store: Store, config: FSConfig, executor: Executor, budget: ByteBudget, spill: Spill
    ) -> None:
        self.store = store
        self.config = config
        self.executor = executor
        self.budget = budget
        self.spill = spill

    def download(self, key: str, info: ObjectInfo, fd: int, op: str, path: str) -> None:
        """Copy one pinned version into `fd`, in parallel parts."""
        part = self.config.part_size
        starts = range(0, info.size, part)

        def fetch(start: int) -> None:
            data, _ = self.store.get_range(key, start, min(start + part, info.size), info.etag)
            if len(data) != min(part, info.size - start):
                raise PoolFSError(errno.EIO, f"short read of {key!r} at {start}")
            os.pwrite(fd, data, start)

        try:
            for fut in [self.executor.submit(fetch, s) for s in starts]:
                fut.result()
        except StoreError as exc:
            raise from_store(exc, op, path) from exc
        os.ftruncate(fd, info.size)


class PinnedReader:
    """Reads one object version, with read-ahead; can switch to a local copy."""

    def __init__(self, ctx: Context, path: str, key: str, info: ObjectInfo, first: bytes) -> None:
        self.ctx = ctx
        self.path = path
        self.key = key
        self.info = info
        self._local: tuple[int, str] | None = None
        self._lock = threading.Lock()
        cfg = ctx.config
        self._ra = ReadAhead(
            self._fetch,
            info.size,
            executor=ctx.executor,
            budget=ctx.budget,
            part_size=cfg.part_size,
            max_window=cfg.max_window,
            min_block=cfg.min_block,
        )
        self._ra.seed(0, first)

    def _fetch(self, start: int, end: int) -> bytes:
        data, _ = self.ctx.store.get_range(self.key, start, end, self.info.etag)
        return data

    def read(self, offset: int, size: int) -> bytes:
        local = self._local
        if local is not None:
            return os.pread(local[0], size, offset)
        try:
            return self._ra.read(offset, size)
        except StoreError as exc:
            raise from_store(exc, "read", self.path) from exc

    def materialize(self) -> None:
        with self._lock:
            if self._local is not None:
                return
            fd, name = self.ctx.spill.new_file()
            try:
                self.ctx.download(self.key, self.info, fd, "materialize", self.path)
            except BaseException:
                os.close(fd)
                os.unlink(name)
                raise
            self._local = (fd, name)
            self._ra.close()

    def close(self) -> None:
        self._ra.close()
        with self._lock:
            if self._local is not None:
                os.close(self._local[0])
                os.unlink(self._local[1])
                self._local = None


class StagedFile:
    """The write side of one path: a local staging file plus pending POSIX metadata."""

    def __init__(
        self,
        ctx: Context,
        path: str,
        key: str,
        base: ObjectInfo | None,
        mode: int,
        mtime_ns: int,
        atime_ns: int,
        *,
        new: bool,
    ) -> None:
        self.ctx = ctx
        self.path = path
        self.key = key
        self.base = base  # the stored version the staged bytes derive from (None: new file)
        self.size = base.size if base is not None else 0
        self.mode = mode
        self.mtime_ns = mtime_ns
        self.atime_ns = atime_ns
        self.ctime_ns = time.time_ns()
        self.new = new  # not in the store yet
        self.loaded = base is None or base.size == 0
        self.dirty = new  # a new file is uploaded at close even when empty
        # Content changed by write()/truncate() since the last upload, as opposed to only by
        # the open itself (creation, O_TRUNC): only such changes are uploaded by flush().
        self.written = False
        # The last upload failed and the caller was told (close/fsync returned the error):
        # release must not quietly store those bytes later. Their copy is in lost+found.
        self.failed = False
        self.meta_dirty = False
        self.poisoned = False
        self.unlinked = False
        self.refs = 0
        self.lock = threading.RLock()
        self._fd: int | None = None
        self._staged_path: str | None = None
        self._reader: PinnedReader | None = None

    # --- state ---------------------------------------------------------------------

    def node(self) -> Node:
        return Node(
            is_dir=False,
            size=self.size,
            mode=self.mode,
            mtime_ns=self.mtime_ns,
            atime_ns=self.atime_ns,
            ctime_ns=self.ctime_ns,
            etag=self.base.etag if self.base else None,
            has_meta=True,
        )

    def _staging(self) -> int:
        if self._fd is None:
            self._fd, self._staged_path = self.ctx.spill.new_file()
        return self._fd

    def _ensure_loaded(self) -> int:
        fd = self._staging()
        if not self.loaded:
            assert self.base is not None
            self.ctx.download(self.key, self.base, fd, "load", self.path)
            self.loaded = True
            if self._reader is not None:
                self._reader.close()
                self._reader = None
        return fd

    def _check_size(self, new_size: int) -> None:
        if new_size > self.ctx.config.max_file_size:
            raise PoolFSError(
                errno.EFBIG,
                f"{self.path}: {new_size} bytes exceeds the limit of "
                f"{self.ctx.config.max_file_size} bytes",
            )

    def _touch(self) -> None:
        self.mtime_ns = self.ctime_ns = time.time_ns()
        self.dirty = True

    # --- operations (callers hold no lock; these take self.lock) ----------------------

    def read(self, offset: int, size: int) -> bytes:
        with self.lock:
            if self.loaded:
                fd = self._staging()
                return os.pread(fd, min(size, max(self.size - offset, 0)), offset)
            if self._reader is None:
                assert self.base is not None
                self._reader = PinnedReader(self.ctx, self.path, self.key, self.base, b"")
            reader = self._reader
        return reader.read(offset, size)

    def write(self, offset: int, data: bytes, append: bool = False) -> int:
        with self.lock:
            if append:
                offset = self.size
            end = offset + len(data)
            try:
                self._check_size(end)
            except PoolFSError:
                self.poisoned = True
                raise
            fd = self._ensure_loaded()
            try:
                os.pwrite(fd, data, offset)
            except OSError as exc:
                raise PoolFSError(exc.errno or errno.EIO, f"staging {self.path}: {exc}") from exc
            self.size = max(self.size, end)
            self._touch()
            self.written = True
            self.failed = False
            return len(data)

    def truncate(self, length: int, *, by_open: bool = False) -> None:
        with self.lock:
            self._check_size(length)
            if length == 0:
                fd = self._staging()
                self.loaded = True
            else:
                fd = self._ensure_loaded()
            os.ftruncate(fd, length)
            self.size = length
            self._touch()
            self.written = self.written or not by_open

    def set_meta(
        self, mode: int | None = None, atime_ns: int | None = None, mtime_ns: int | None = None
    ) -> None:
        with self.lock:
            if mode is not None:
                self.mode = mode
            if atime_ns is not None:
                self.atime_ns = atime_ns
            if mtime_ns is not None:
                self.mtime_ns = mtime_ns
            self.ctime_ns = time.time_ns()
            self.meta_dirty = True

    def materialize(self) -> None:
        with self.lock:
            self._ensure_loaded()

    def upload(self, on_stored: Callable[[StagedFile, ObjectInfo], None]) -> None:
        """Make the store hold the staged state; raises PoolFSError (EIO, EFBIG, ...)."""
        with self.lock:
            if self.unlinked:
                return
            if self.poisoned:
                raise PoolFSError(errno.EFBIG, f"{self.path}: not stored (exceeded size limit)")
            meta = encode_meta(self.mode, self.mtime_ns, self.atime_ns)
            store = self.ctx.store
            if not self.dirty:
                if not self.meta_dirty:
                    return
                try:
                    info = store.set_metadata(self.key, meta)
                except StoreError as exc:
                    raise from_store(exc, "setattr", self.path) from exc
                self.meta_dirty = False
                self.base = info
                on_stored(self, info)
                return
            fd = self._ensure_loaded()
            assert self._staged_path is not None
            try:
                if self.size <= self.ctx.config.first_block:
                    info = store.put_bytes(self.key, os.pread(fd, self.size, 0), meta)
                else:
                    info = store.put_file(self.key, self._staged_path, meta)
            except StoreError as exc:
                kept = self.ctx.spill.keep(self._staged_path, self.key)
                log.error(
                    "upload of %r (key %r) failed: %s; staged bytes kept at %r",
                    self.path,
                    self.key,
                    exc,
                    kept,
                )
                self.failed = True
                raise from_store(exc, "upload", self.path) from exc
            self.base = info
            self.dirty = self.meta_dirty = self.new = self.written = False
            on_stored(self, info)

    def close(self) -> None:
        with self.lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            if self._staged_path is not None:
                os.unlink(self._staged_path)
                self._staged_path = None
