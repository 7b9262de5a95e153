"""Read-ahead for one open handle of one pinned object version.

Rules (tests/test_readahead.py checks each):
- A read at the offset where the previous read ended is sequential. Sequential reads grow a
  window (doubling from 2 parts up to `max_window`) of parallel part fetches ahead of the reader.
  A part that would end beyond the window waits for a later read (except the part right at the
  reader), so a handle holds at most the window plus the part it is reading.
  The first read of a handle (at offset 0) opens the window only if it needs bytes that are not
  cached yet: a read served by the block seeded at open (`head -c`, a file's magic number, a
  small file) starts no prefetch, so the time to first byte carries no parallel part GETs.
- Any other read is random: it fetches only the asked range, at least `min_block`, and resets
  the window.
- A read that must wait for bytes nobody is fetching yet fetches (the first such range) in the
  calling thread instead of handing it to the executor and waiting: one thread hop less per
  random read. Such an extent is visible to other readers as a running future.
- A read waiting for a part that a concurrent sequential read trimmed (cancelled before it
  ran) fetches that part itself: a read never fails because another one moved on.
- Prefetched parts reserve bytes from a `ByteBudget` shared by every handle of the mount; when
  the budget is exhausted, prefetch stops (the reader still gets what it asks for). Parts behind
  the reader are dropped at once, so memory is bounded by the budget plus in-flight demand reads.
- `read_span` hands out the bytes as a span (data, lo, hi) of the fetched part, uncopied: the
  FUSE adapter copies `data[lo:hi]` once, straight into libfuse's reply buffer. Only a read
  across two extents is joined (one copy). `read` is the same as plain bytes.
- The cache takes a `fetch(start, end) -> bytes or a reused part buffer` function, never a
  store, so it is testable with a lambda and knows nothing about versions: pinning is the
  fetch function's job. A part buffer (`poolfs.fs.buffers`) is never written while anything
  here or in a span references it, so the cache treats it as immutable like bytes.
"""

from __future__ import annotations

import dataclasses
import mmap
import threading
from collections.abc import Callable
from concurrent.futures import CancelledError, Executor, Future
from typing import TypeVar

# What a fetch returns: new bytes, or a reused part buffer (poolfs.fs.buffers), whose whole
# length is the fetched range and which nobody writes while it is referenced.
Data = bytes | mmap.mmap
Fetch = Callable[[int, int], Data]
# `data[lo:hi]` is the answer, not yet copied out of `data`.
Span = tuple[Data, int, int]
_T = TypeVar("_T")


def span_bytes(span: Span) -> bytes:
    data, lo, hi = span
    if isinstance(data, bytes):
        return data if lo == 0 and hi == len(data) else data[lo:hi]
    return data[lo:hi]  # a part buffer: a copy, so nothing outside keeps the buffer


class ByteBudget:
    """A counter of bytes that read-ahead may hold at once, shared by all handles."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._used = 0
        self._lock = threading.Lock()

    def try_acquire(self, n: int) -> bool:
        with self._lock:
            if self._used + n > self.limit:
                return False
            self._used += n
            return True

    def release(self, n: int) -> None:
        with self._lock:
            self._used -= n

    @property
    def used(self) -> int:
        with self._lock:
            return self._used


@dataclasses.dataclass(slots=True)
class _Extent:
    start: int
    end: int
    future: Future[Data]
    reserved: int  # bytes taken from the budget (0 for demand reads)


def done_future(result: _T) -> Future[_T]:
    """A future that already holds `result`."""
    fut: Future[_T] = Future()
    fut.set_result(result)
    return fut


class ReadAhead:
    """Byte cache + prefetcher for one object of known `size`."""

    # Random extents kept around for re-reads (the kernel often reads the same area twice).
    _KEEP_RANDOM = 8

    def __init__(
        self,
        fetch: Fetch,
        size: int,
        *,
        executor: Executor,
        budget: ByteBudget,
        part_size: int,
        max_window: int,
        min_block: int,
    ) -> None:
        self._fetch = fetch
        self._size = size
        self._executor = executor
        self._budget = budget
        self._part = part_size
        self._max_window = max(max_window, part_size)
        self._min_block = min_block
        self._extents: list[_Extent] = []
        self._next = 0  # where a sequential read would start
        self._started = False  # a read was made (the first read is special, see the rules)
        self._window = 0
        self._lock = threading.Lock()
        self._closed = False

    def seed(self, start: int, data: bytes) -> None:
        """Offer bytes already fetched (the GET made at open)."""
        if data:
            with self._lock:
                self._extents.append(_Extent(start, start + len(data), done_future(data), 0))

    def read(self, offset: int, size: int) -> bytes:
        return span_bytes(self.read_span(offset, size))

    def read_span(self, offset: int, size: int) -> Span:
        end = min(offset + size, self._size)
        if offset >= end:
            return b"", 0, 0
        with self._lock:
            sequential = offset == self._next and (self._started or not self._cached(offset, end))
            self._started = True
            if sequential:
                self._window = min(max(self._window * 2, 2 * self._part), self._max_window)
            else:
                self._window = 0
            self._next = end
            needed, own = self._cover(offset, end)
            if sequential:
                self._prefetch(end)
            self._trim(offset, sequential)
        if own is not None:
            try:
                own.future.set_result(self._fetch(own.start, own.end))
            except BaseException as exc:
                own.future.set_exception(exc)
        spans: list[Span] = []
        for ext in needed:
            try:
                data = ext.future.result()
            except CancelledError:
                # A concurrent sequential read further on trimmed this part before it ran
                # (FUSE threads read one handle in parallel): fetch what is asked of it here.
                data = self._fetch(max(offset, ext.start), min(end, ext.end))
                spans.append((data, 0, len(data)))
                continue
            lo = max(offset, ext.start) - ext.start
            hi = min(end, ext.end) - ext.start
            spans.append((data, lo, min(hi, len(data))))
        if len(spans) == 1:
            span = spans[0]
        else:
            out = b"".join(memoryview(data)[lo:hi] for data, lo, hi in spans)
            span = (out, 0, len(out))
        if span[2] - span[1] != end - offset:
            # The object is shorter than pinned: a store fault, not a short read to hide.
            raise OSError(5, "short read from store")
        return span

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for ext in self._extents:
                ext.future.cancel()
                self._release(ext)
            self._extents.clear()

    # --- internals (lock held) ---------------------------------------------------------

    def _find(self, pos: int) -> _Extent | None:
        for ext in self._extents:
            if ext.start <= pos < ext.end and not ext.future.cancelled():
                fut = ext.future
                if fut.done() and fut.exception() is not None:
                    continue  # a failed fetch is tried again by the next read, not replayed
                return ext
        return None

    def _cached(self, start: int, end: int) -> bool:
        pos = start
        while pos < end:
            ext = self._find(pos)
            if ext is None:
                return False
            pos = ext.end
        return True

    def _cover(self, start: int, end: int) -> tuple[list[_Extent], _Extent | None]:
        """Extents covering [start, end), making the missing ones; the first new extent is
        returned apart: the caller fetches it in its own thread."""
        needed: list[_Extent] = []
        own: _Extent | None = None
        pos = start
        while pos < end:
            ext = self._find(pos)
            if ext is None:
                # Only what is asked (at least min_block): the reader waits for this fetch.
                # Sequential readers get the parts beyond from _prefetch, in parallel.
                ext_end = min(max(end, pos + self._min_block), self._size)
                nxt = self._next_start(pos)
                if nxt is not None and nxt < ext_end:
                    ext_end = nxt
                if own is None:
                    ext = own = self._claim(pos, ext_end)
                else:
                    ext = self._submit(pos, ext_end, reserved=0)
            needed.append(ext)
            pos = ext.end
        return needed, own

    def _claim(self, start: int, end: int) -> _Extent:
        """An extent the calling thread fetches itself (its future runs until it is done)."""
        fut: Future[Data] = Future()
        fut.set_running_or_notify_cancel()
        ext = _Extent(start, end, fut, 0)
        self._extents.append(ext)
        return ext

    def _next_start(self, pos: int) -> int | None:
        starts = [e.start for e in self._extents if e.start > pos]
        return min(starts) if starts else None

    def _submit(self, start: int, end: int, reserved: int) -> _Extent:
        if start == end:
            ext = _Extent(start, end, done_future(b""), reserved)
        else:
            ext = _Extent(start, end, self._executor.submit(self._fetch, start, end), reserved)
        self._extents.append(ext)
        return ext

    def _prefetch(self, pos: int) -> None:
        # Parts that end beyond the window wait for the next read, except the one right at
        # the reader: memory stays at most the window plus the part being read.
        first = pos
        limit = min(pos + self._window, self._size)
        while pos < limit:
            ext = self._find(pos)
            if ext is not None:
                pos = ext.end
                continue
            part_end = min(pos - pos % self._part + self._part, self._size)
            nxt = self._next_start(pos)
            if nxt is not None and nxt < part_end:
                part_end = nxt
            if part_end > limit and pos > first:
                return
            if not self._budget.try_acquire(part_end - pos):
                return
            self._submit(pos, part_end, reserved=part_end - pos)
            pos = part_end

    def _trim(self, offset: int, sequential: bool) -> None:
        keep: list[_Extent] = []
        behind: list[_Extent] = []
        for ext in self._extents:
            if sequential and ext.end <= offset:
                self._release(ext)
                ext.future.cancel()
            elif ext.end <= offset or ext.start >= offset + self._max_window:
                behind.append(ext)
            else:
                keep.append(ext)
        # Random extents: keep the few most recent.
        for ext in behind[: -self._KEEP_RANDOM] if len(behind) > self._KEEP_RANDOM else []:
            self._release(ext)
            ext.future.cancel()
        keep.extend(behind[-self._KEEP_RANDOM :])
        keep.sort(key=lambda e: e.start)
        self._extents = keep

    def _release(self, ext: _Extent) -> None:
        if ext.reserved:
            self._budget.release(ext.reserved)
            ext.reserved = 0
