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
- While a staged file is written in order, its completed parts are uploaded in the background
  (`_PartStream`, on stores with `begin_upload`): at most `upload_parts_in_flight` parts at a
  time; parts waiting are not queued in memory, the staging file is the queue and a finished
  part starts the next. Any write or truncate touching a part already sent (or being sent)
  invalidates it; `upload()` re-sends what is not stored as it is now and completes, so the
  object is exactly the staged bytes. Nothing is published before completion. A stream is
  always ended (completed or aborted): by `upload()`, `unlink()`, `close()`, or when the file
  is renamed, poisoned or ends up below the store's multipart size (then one PUT as before).
  A stream whose part failed while writing is aborted at `upload()` and the whole file is
  uploaded again (the store may be back); a failure at `upload()` itself is the upload error.
- A streamed object's user metadata is fixed when its upload begins, before the last write:
  it carries mode and atime but no `poolfs-mtime`, so the object's LastModified stands for the
  mtime of the last write. An mtime set explicitly (utimensat) or a mode/atime changed after
  the upload began is stored with one `set_metadata` after completion.
- A staged file that hit EFBIG is poisoned: it never uploads, so the stored object is unchanged.
- The kernel sends a flush for every close(), including the close of a descriptor that was
  dup'ed away (shell redirections, dd). So a flush uploads only content changed by write() or
  truncate(); the change made by the open itself (creation, O_TRUNC) waits for more writes or
  for release. Otherwise `echo x > f` would first publish an empty f.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future

from poolfs.fs.buffers import PartBuffers
from poolfs.fs.config import FSConfig
from poolfs.fs.errors import PoolFSError, from_store
from poolfs.fs.meta import Node, encode_meta
from poolfs.fs.readahead import ByteBudget, Data, ReadAhead, Span, span_bytes
from poolfs.stores import ObjectInfo, Store, StoreError, Upload

log = logging.getLogger("poolfs.fs")

# Parts are sent only once the writer is this far past their end: a write arriving slightly
# out of order (two threads appending) then rarely invalidates a part already sent.
_REORDER_SLACK = 1024 * 1024


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
    """What open files need from the filesystem: store, config, threads, budget, part
    buffers, spill."""

    def __init__(
        self, store: Store, config: FSConfig, executor: Executor, budget: ByteBudget, spill: Spill
    ) -> None:
        self.store = store
        self.config = config
        self.executor = executor
        self.budget = budget
        self.spill = spill
        # Sequential parts are received into reused buffers, as many as one sequential
        # reader's window holds plus the part being read; parts beyond that (more readers at
        # once) are new memory as before, freed when dropped. Each resident buffer is a part
        # of RSS for good while reading (measured in bench/README.md).
        self.buffers = PartBuffers(config.part_size, config.max_window // config.part_size + 1)

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


class _PartStream:
    """Parts of one staging file uploaded to an `Upload` in the background while it is written.

    Part i is bytes [i * part_size, (i + 1) * part_size) and part number i + 1. Parts below
    `_ready` may be sent; at most `_limit` are in flight. A change of bytes or size touching a
    part bumps its generation, and a part counts as stored only if its generation did not
    change while it was sent (a failure of such a stale part is no error); a part is never
    sent twice at the same time. A part changed after it was sent is held until `finish`
    (random writes must not upload a part per write), unless the in-order writer passes it
    again (after a truncate). The stream reads a `dup` of the staging descriptor, so it can
    end after the StagedFile closed its own.
    `_cond` guards the state; it is never held during store I/O or while waiting on a part.
    """

    def __init__(
        self,
        upload: Upload,
        fd: int,
        part_size: int,
        limit: int,
        executor: Executor,
        mode: int,
        atime_ns: int,
    ) -> None:
        self.upload = upload
        self.key = upload.key
        self.part_size = part_size
        self.mode = mode  # what the upload's metadata says
        self.atime_ns = atime_ns
        self.error: BaseException | None = None  # the first part that failed
        self._fd = os.dup(fd)
        self._limit = limit
        self._executor = executor
        self._cond = threading.Condition(threading.RLock())
        self._size = 0
        self._ready = 0
        self._next = 0  # every part below it is stored or in flight
        self._gen: dict[int, int] = {}
        self._stored: set[int] = set()
        self._inflight: dict[int, int] = {}  # part -> generation when it was sent
        self._held: set[int] = set()
        self._finishing = False
        self._aborting = False
        self._ended = threading.Event()

    def parts(self, size: int) -> int:
        return -(-size // self.part_size)

    def changed(self, start: int, end: int | None, size: int) -> None:
        """Bytes [start, end) changed (end None: everything from start on); size is now `size`."""
        first = start // self.part_size
        with self._cond:
            self._size = size
            if end is None:
                touched = [i for i in self._stored | self._inflight.keys() if i >= first]
            else:
                touched = list(range(first, (end - 1) // self.part_size + 1))
            for i in touched:
                if i in self._stored or i in self._inflight:
                    self._held.add(i)
                self._gen[i] = self._gen.get(i, 0) + 1
                self._stored.discard(i)
            self._next = min(self._next, first)
            self._ready = min(self._ready, size // self.part_size)

    def advance(self, ready: int) -> None:
        """Parts below `ready` are final unless changed again: send them."""
        with self._cond:
            ready = min(ready, self.upload.max_parts, self._size // self.part_size)
            if ready > self._ready:
                self._held.difference_update(range(self._ready, ready))
                self._ready = ready
                self._pump()

    def _pump(self) -> None:
        if self._aborting or self.error is not None:
            return
        i = self._next
        skipped = None
        while i < self._ready and len(self._inflight) < self._limit:
            if (
                i not in self._stored
                and i not in self._inflight
                and (self._finishing or i not in self._held)
            ):
                start = i * self.part_size
                length = min(self.part_size, self._size - start)
                gen = self._gen.get(i, 0)
                try:
                    fut = self._executor.submit(
                        self.upload.put_part, i + 1, self._fd, start, length
                    )
                except RuntimeError as exc:  # the executor is shut down
                    self.error = exc
                    return
                self._inflight[i] = gen
                fut.add_done_callback(functools.partial(self._done, i, gen))
            elif skipped is None and i not in self._stored and i not in self._inflight:
                skipped = i  # held: the scan must come back here at `finish`
            i += 1
        self._next = i if skipped is None else skipped

    def _done(self, part: int, gen: int, fut: Future[None]) -> None:
        exc = StoreError("part upload cancelled") if fut.cancelled() else fut.exception()
        with self._cond:
            del self._inflight[part]
            if self._gen.get(part, 0) != gen:
                self._next = min(self._next, part)  # changed while sent: its result is moot
            elif exc is None:
                self._stored.add(part)
            else:
                self._next = min(self._next, part)
                if self.error is None:
                    self.error = exc
            self._pump()
            end_now = self._aborting and not self._inflight and not self._ended.is_set()
            self._cond.notify_all()
        if end_now:
            self._end()

    def _end(self) -> None:
        try:
            self.upload.abort()
        finally:
            os.close(self._fd)
            self._ended.set()

    def abort(self, *, wait: bool = False) -> None:
        """Send no more parts; abort the upload once no part is in flight (in this thread, or in
        the thread of the last part). `wait`: return only once the abort was sent."""
        with self._cond:
            end_now = not self._aborting and not self._inflight
            self._aborting = True
        if end_now:
            self._end()
        if wait:
            self._ended.wait()

    def finish(self, size: int) -> ObjectInfo:
        """Send every part not stored as it is now, wait, complete. On failure the upload is
        aborted and the StoreError raised."""
        count = self.parts(size)
        with self._cond:
            self._size = size
            self._ready = count
            self._finishing = True
            self._pump()
            self._cond.wait_for(
                lambda: not self._inflight and (self.error is not None or self._next >= count)
            )
            error = self.error
            self._aborting = True
        if error is not None:
            self._end()
            if isinstance(error, StoreError):
                raise error
            raise StoreError(f"upload of part failed: {error!r}", self.key) from error
        try:
            return self.upload.complete(count)
        finally:
            os.close(self._fd)
            self._ended.set()


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

    def _fetch(self, start: int, end: int) -> Data:
        buffers = self.ctx.buffers
        buf = buffers.take() if end - start == buffers.size else None
        if buf is None:
            data, _ = self.ctx.store.get_range(self.key, start, end, self.info.etag)
            return data
        with memoryview(buf) as view:
            got, _ = self.ctx.store.get_range_into(self.key, start, view, self.info.etag)
            if got is view:
                return buf
            return bytes(got)  # the store answered with new bytes (or a short read)

    def read(self, offset: int, size: int) -> bytes:
        return span_bytes(self.read_span(offset, size))

    def read_span(self, offset: int, size: int) -> Span:
        """`read` as a span of a fetched part (see readahead.py), not yet copied."""
        local = self._local
        if local is not None:
            data = os.pread(local[0], size, offset)
            return data, 0, len(data)
        try:
            return self._ra.read_span(offset, size)
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
        # Background upload of completed parts (see _PartStream); `_written_to` is the end of
        # the bytes written in order so far, `_can_stream` False once the store said it has
        # no streamed uploads or the file was unlinked.
        self._stream: _PartStream | None = None
        self._written_to = 0
        self._can_stream = ctx.config.upload_parts_in_flight > 0
        # The mtime was set by utimensat, not by a write: it must be stored as such.
        self._mtime_explicit = False

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
            self._written_to = self.size  # so that appends continue it in order
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
        self._mtime_explicit = False
        self.dirty = True

    def _stream_written(self, offset: int, end: int) -> None:
        """After a write of [offset, end): invalidate sent parts, send completed ones."""
        stream = self._stream
        if stream is not None:
            stream.changed(offset, end, self.size)
        if not self._written_to - _REORDER_SLACK <= offset <= self._written_to:
            return  # not continuing the bytes written in order: a random write
        self._written_to = max(self._written_to, end)
        if not self._can_stream or self.unlinked:
            return
        final = self._written_to - _REORDER_SLACK
        if stream is None:
            if final < self.ctx.config.part_size:
                return
            upload = self.ctx.store.begin_upload(
                self.key, encode_meta(self.mode, None, self.atime_ns)
            )
            if upload is None:
                self._can_stream = False
                return
            assert self._fd is not None
            stream = self._stream = _PartStream(
                upload,
                self._fd,
                max(self.ctx.config.part_size, upload.min_part_size),
                self.ctx.config.upload_parts_in_flight,
                self.ctx.executor,
                self.mode,
                self.atime_ns,
            )
            stream.changed(0, None, self.size)
        if final >= stream.upload.min_object_size:
            stream.advance(final // stream.part_size)

    def _drop_stream(self, *, wait: bool = False) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.abort(wait=wait)

    def _finish_stream(self) -> ObjectInfo | None:
        """Complete the background upload if it can hold the staged bytes; None when there is
        none or it was aborted (upload the whole file). Raises StoreError."""
        stream, self._stream = self._stream, None
        if stream is None:
            return None
        usable = (
            stream.error is None
            and stream.key == self.key
            and self.size >= stream.upload.min_object_size
            and stream.parts(self.size) <= stream.upload.max_parts
        )
        if not usable:
            if stream.error is not None:
                log.warning(
                    "background upload of %r (key %r) failed: %s; uploading the whole file",
                    self.path,
                    self.key,
                    stream.error,
                )
            stream.abort(wait=True)
            return None
        info = stream.finish(self.size)
        if self._mtime_explicit or (self.mode, self.atime_ns) != (stream.mode, stream.atime_ns):
            meta = encode_meta(self.mode, self.mtime_ns, self.atime_ns)
            return self.ctx.store.set_metadata(self.key, meta)
        # The object's LastModified is its mtime now, as other nodes see it.
        self.mtime_ns = info.last_modified_ns
        return info

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

    def write(self, offset: int, data: bytes | memoryview, append: bool = False) -> int:
        with self.lock:
            if append:
                offset = self.size
            end = offset + len(data)
            try:
                self._check_size(end)
            except PoolFSError:
                self.poisoned = True
                self._drop_stream()
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
            self._stream_written(offset, end)
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
            changed_from = min(self.size, length)
            self.size = length
            self._written_to = min(self._written_to, length)
            if self._stream is not None:
                self._stream.changed(changed_from, None, length)
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
                self._mtime_explicit = True
            self.ctime_ns = time.time_ns()
            self.meta_dirty = True

    def materialize(self) -> None:
        with self.lock:
            self._ensure_loaded()

    def unlink(self) -> None:
        """The path was removed (or replaced by a rename): never store these bytes."""
        with self.lock:
            self.unlinked = True
            self._can_stream = False
            self._drop_stream()

    def upload(self, on_stored: Callable[[StagedFile, ObjectInfo], None]) -> None:
        """Make the store hold the staged state; raises PoolFSError (EIO, EFBIG, ...)."""
        with self.lock:
            if self.unlinked:
                self._drop_stream()
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
                streamed = self._finish_stream()
                if streamed is not None:
                    info = streamed
                elif self.size <= self.ctx.config.first_block:
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
            self._drop_stream()
            if self._reader is not None:
                self._reader.close()
                self._reader = None
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            if self._staged_path is not None:
                os.unlink(self._staged_path)
                self._staged_path = None
