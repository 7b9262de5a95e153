"""Reused buffers for read-ahead parts, so that sequential reads do not fault in fresh memory.

Why: a part fetched into new bytes is new memory every time (8 MiB parts are mmapped by
malloc and unmapped when freed), and the kernel zeroes every page of it at its first touch.
perf of a 256 MiB sequential read from SeaweedFS: 38 % of the mount worker's CPU was page
faults inside recv(), most of it clear_page. A part received into a buffer used before costs
the copy from the socket only (numbers in bench/README.md).

Rules:
- A buffer is handed out by `take()` and is free again once nothing references it: no
  release call, so no path (a cancelled prefetch, a failed read, a span still being copied
  into a FUSE reply by another thread) can hand out memory still in use. Whether anything
  still references a buffer is CPython's reference count (`sys.getrefcount`); on an
  interpreter where that count does not behave as CPython's (checked once at start), every
  `take()` returns None and callers allocate as before.
- At most `limit` buffers exist; beyond that `take()` returns None (the caller allocates).
- Buffers unused for `idle` seconds are dropped (unmapped) by a small janitor thread that
  runs only while the pool holds buffers: an idle mount goes back to its resting memory.
- Buffers are private anonymous mmaps of `size` bytes, advised MADV_HUGEPAGE where
  available; the worker's malloc no longer uses huge pages (poolfs/mounts.py says why).
"""

from __future__ import annotations

import mmap
import sys
import threading
import time


def _refcounts_work() -> bool:
    """Whether `sys.getrefcount(lst[i]) == 2` means "referenced by the list only"."""
    probe = [mmap.mmap(-1, mmap.PAGESIZE)]
    alone = sys.getrefcount(probe[0]) == 2
    held = probe[0]
    shared = sys.getrefcount(probe[0]) > 2
    del held
    probe[0].close()
    return alone and shared


_REFCOUNTS_WORK = _refcounts_work()


class PartBuffers:
    """Up to `limit` reusable writable buffers of `size` bytes; see the module docstring."""

    def __init__(self, size: int, limit: int, idle: float = 5.0) -> None:
        self.size = size
        self.limit = limit if _REFCOUNTS_WORK else 0
        self._idle = idle
        self._bufs: list[mmap.mmap] = []
        self._used: list[float] = []  # monotonic time of each buffer's last take()
        self._lock = threading.Lock()
        self._janitor: threading.Thread | None = None
        self._closed = threading.Event()

    def take(self) -> mmap.mmap | None:
        """A buffer nobody references, or a new one; None at the limit (or when closed)."""
        with self._lock:
            if self._closed.is_set():
                return None
            now = time.monotonic()
            bufs = self._bufs
            for i in range(len(bufs)):
                if sys.getrefcount(bufs[i]) == 2:  # the list's reference and the argument
                    self._used[i] = now
                    return bufs[i]
            if len(bufs) >= self.limit:
                return None
            buf = mmap.mmap(-1, self.size, flags=mmap.MAP_PRIVATE)
            if hasattr(mmap, "MADV_HUGEPAGE"):
                buf.madvise(mmap.MADV_HUGEPAGE)  # 4 faults per 8 MiB instead of 2048
            bufs.append(buf)
            self._used.append(now)
            if self._janitor is None:
                self._janitor = threading.Thread(
                    target=self._sweep, name="poolfs-buffers", daemon=True
                )
                self._janitor.start()
            return buf

    def held(self) -> int:
        """How many buffers exist (in use or free)."""
        with self._lock:
            return len(self._bufs)

    def close(self) -> None:
        """Drop the free buffers and hand out no more; buffers in use are freed by their
        last user."""
        self._closed.set()
        with self._lock:
            self._bufs.clear()
            self._used.clear()

    def _sweep(self) -> None:
        while not self._closed.wait(self._idle / 2):
            with self._lock:
                cutoff = time.monotonic() - self._idle
                keep = [
                    i
                    for i in range(len(self._bufs))
                    if self._used[i] > cutoff or sys.getrefcount(self._bufs[i]) > 2
                ]
                self._bufs = [self._bufs[i] for i in keep]
                self._used = [self._used[i] for i in keep]
                if not self._bufs:
                    self._janitor = None
                    return
