"""ReadAhead with a lambda for a store (the rules in poolfs/fs/readahead.py's docstring)."""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any

import pytest

from poolfs.fs.readahead import ByteBudget, ReadAhead

pytestmark = pytest.mark.core

KiB = 1024
MiB = 1024 * KiB
SIZE = 64 * MiB
DATA = bytes(range(256)) * (SIZE // 256)


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []
        self.lock = threading.Lock()

    def fetch(self, start: int, end: int) -> bytes:
        with self.lock:
            self.calls.append((start, end))
        return DATA[start:end]


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(8) as ex:
        yield ex


def read_ahead(
    fetch: Callable[[int, int], bytes],
    executor: Executor,
    budget: ByteBudget | None = None,
    min_block: int = 128 * KiB,
) -> ReadAhead:
    """The ReadAhead the tests use: 4 MiB parts, 16 MiB window, over SIZE bytes."""
    return ReadAhead(
        fetch,
        SIZE,
        executor=executor,
        budget=budget if budget is not None else ByteBudget(64 * MiB),
        part_size=4 * MiB,
        max_window=16 * MiB,
        min_block=min_block,
    )


def make(rec: Recorder, pool: ThreadPoolExecutor, budget: ByteBudget) -> ReadAhead:
    return read_ahead(rec.fetch, pool, budget)


def test_sequential_reads_are_correct_and_prefetch_ahead(pool: ThreadPoolExecutor) -> None:
    rec, budget = Recorder(), ByteBudget(64 * MiB)
    ra = make(rec, pool, budget)
    pos = 0
    while pos < SIZE:
        chunk = ra.read(pos, MiB)
        assert chunk == DATA[pos : pos + MiB]
        pos += len(chunk)
    fetched = sum(e - s for s, e in rec.calls)
    assert fetched == SIZE  # every byte fetched once: no overlap, nothing twice
    assert max(e - s for s, e in rec.calls) == 4 * MiB  # in parts, ahead of the reader
    ra.close()
    assert budget.used == 0


def test_first_read_waits_only_for_what_it_asks(pool: ThreadPoolExecutor) -> None:
    gate = threading.Event()
    rec = Recorder()

    def slow(start: int, end: int) -> bytes:
        if start > 0:
            gate.wait(5)  # prefetches stall; the demand read must not wait for them
        return rec.fetch(start, end)

    ra = read_ahead(slow, pool)
    assert ra.read(0, 4096) == DATA[:4096]
    assert rec.calls[0] == (0, 128 * KiB)
    gate.set()
    ra.close()


def test_random_reads_fetch_only_what_is_asked(pool: ThreadPoolExecutor) -> None:
    rec = Recorder()
    ra = make(rec, pool, ByteBudget(64 * MiB))
    for offset in (40 * MiB, 3 * MiB, 50 * MiB + 7, 10 * MiB):
        assert ra.read(offset, 4096) == DATA[offset : offset + 4096]
    assert all(e - s == 128 * KiB for s, e in rec.calls)
    assert len(rec.calls) == 4
    ra.close()


def test_budget_bounds_prefetch_across_handles(pool: ThreadPoolExecutor) -> None:
    rec, budget = Recorder(), ByteBudget(8 * MiB)
    readers = [make(rec, pool, budget) for _ in range(4)]
    for ra in readers:
        for pos in range(0, 2 * MiB, 256 * KiB):
            assert ra.read(pos, 256 * KiB) == DATA[pos : pos + 256 * KiB]
        assert budget.used <= 8 * MiB
    for ra in readers:
        ra.close()
    assert budget.used == 0


def test_seeded_bytes_are_used(pool: ThreadPoolExecutor) -> None:
    rec = Recorder()
    ra = make(rec, pool, ByteBudget(64 * MiB))
    ra.seed(0, DATA[: 256 * KiB])
    assert ra.read(0, 100 * KiB) == DATA[: 100 * KiB]
    assert rec.calls == [] or all(s >= 256 * KiB for s, _ in rec.calls)
    ra.close()


def test_first_read_within_the_seed_starts_no_prefetch(pool: ThreadPoolExecutor) -> None:
    rec = Recorder()
    ra = make(rec, pool, ByteBudget(64 * MiB))
    ra.seed(0, DATA[: 256 * KiB])
    assert ra.read(0, 16 * KiB) == DATA[: 16 * KiB]  # head -c, a magic number: no GETs
    assert rec.calls == []
    assert ra.read(16 * KiB, 16 * KiB) == DATA[16 * KiB : 32 * KiB]  # a second one streams
    ra.close()
    assert rec.calls and all(s >= 256 * KiB for s, _ in rec.calls)
    # A first read that needs more than the seed is a stream from the start.
    rec2 = Recorder()
    ra2 = make(rec2, pool, ByteBudget(64 * MiB))
    ra2.seed(0, DATA[: 256 * KiB])
    assert ra2.read(0, MiB) == DATA[:MiB]
    ra2.close()
    assert any(s >= MiB for s, _ in rec2.calls)


def test_demand_reads_run_in_the_calling_thread(pool: ThreadPoolExecutor) -> None:
    threads: list[str] = []

    def fetch(start: int, end: int) -> bytes:
        threads.append(threading.current_thread().name)
        return DATA[start:end]

    ra = read_ahead(fetch, pool, min_block=4 * KiB)
    for offset in (40 * MiB, 3 * MiB, 10 * MiB):
        assert ra.read(offset, 4 * KiB) == DATA[offset : offset + 4 * KiB]
    assert threads == [threading.current_thread().name] * 3
    ra.close()


def test_a_failed_fetch_is_tried_again(pool: ThreadPoolExecutor) -> None:
    failures = [OSError(5, "store down")]

    def fetch(start: int, end: int) -> bytes:
        if failures:
            raise failures.pop()
        return DATA[start:end]

    ra = read_ahead(fetch, pool, min_block=4 * KiB)
    with pytest.raises(OSError):
        ra.read(5 * MiB, 4 * KiB)
    assert ra.read(5 * MiB, 4 * KiB) == DATA[5 * MiB : 5 * MiB + 4 * KiB]
    ra.close()


def test_a_handle_holds_at_most_the_window_and_the_part_being_read(
    pool: ThreadPoolExecutor,
) -> None:
    rec, budget = Recorder(), ByteBudget(64 * MiB)
    ra = make(rec, pool, budget)  # 4 MiB parts, 16 MiB window
    pos, peak = 0, 0
    while pos < 48 * MiB:
        chunk = ra.read(pos, 600 * KiB)  # reads that end anywhere inside a part
        assert chunk == DATA[pos : pos + 600 * KiB]
        pos += len(chunk)
        peak = max(peak, budget.used)
    assert 16 * MiB <= peak <= 16 * MiB + 4 * MiB
    ra.close()


def test_read_span_points_into_the_fetched_part_without_copying(
    pool: ThreadPoolExecutor,
) -> None:
    """A read inside one fetched extent is that extent's own bytes with bounds (the FUSE
    adapter copies it once); a read across two extents is joined; EOF shortens the span."""
    fetched: dict[tuple[int, int], bytes] = {}

    def fetch(start: int, end: int) -> bytes:
        data = DATA[start:end]
        fetched[(start, end)] = data
        return data

    ra = read_ahead(fetch, pool)
    data, lo, hi = ra.read_span(4 * MiB + 10, 1000)  # random: one extent of min_block
    assert data is fetched[(4 * MiB + 10, 4 * MiB + 10 + 128 * KiB)]
    assert (lo, hi) == (0, 1000)
    data, lo, hi = ra.read_span(4 * MiB + 500, 100)  # inside the same extent
    assert data is fetched[(4 * MiB + 10, 4 * MiB + 10 + 128 * KiB)]
    assert data[lo:hi] == DATA[4 * MiB + 500 : 4 * MiB + 600]
    data, lo, hi = ra.read_span(4 * MiB + 10 + 128 * KiB - 50, 100)  # across two extents
    assert (lo, hi) == (0, 100) and data == DATA[4 * MiB + 128 * KiB - 40 :][:100]
    data, lo, hi = ra.read_span(SIZE - 30, 100)  # short at EOF
    assert data[lo:hi] == DATA[SIZE - 30 :]
    assert ra.read_span(SIZE, 100)[1:] == (0, 0)
    assert ra.read(4 * MiB + 500, 100) == DATA[4 * MiB + 500 : 4 * MiB + 600]
    ra.close()


def test_a_read_waiting_for_a_part_a_later_read_trimmed_still_gets_it() -> None:
    """Two FUSE threads read one handle: A waits for a prefetched part that has not started;
    B's sequential read past that part trims and cancels it. A must get the bytes, not EIO."""
    pending: list[tuple[Future[bytes], Callable[[], bytes]]] = []

    class Later(Executor):
        def submit(self, fn: Callable[..., bytes], /, *args: Any, **kwargs: Any) -> Future[bytes]:
            fut: Future[bytes] = Future()
            pending.append((fut, functools.partial(fn, *args, **kwargs)))
            return fut

    rec = Recorder()
    ra = read_ahead(rec.fetch, Later())
    assert ra.read(0, MiB) == DATA[:MiB]  # prefetches [1, 4) and [4, 8) MiB, not run yet
    got: list[bytes] = []
    reader_a = threading.Thread(target=lambda: got.append(ra.read(MiB, 3 * MiB)))
    reader_a.start()
    time.sleep(0.2)  # A waits for the [1, 4) MiB part
    for fut, run in pending:
        if rec_range(run) == (4 * MiB, 8 * MiB):
            fut.set_running_or_notify_cancel()
            fut.set_result(run())
    assert ra.read(4 * MiB, MiB) == DATA[4 * MiB : 5 * MiB]  # B: trims the [1, 4) MiB part
    reader_a.join(10)
    for fut, run in pending:
        if not fut.done() and fut.set_running_or_notify_cancel():
            fut.set_result(run())
    assert got == [DATA[MiB : 4 * MiB]]
    ra.close()


def rec_range(call: Callable[[], bytes]) -> tuple[int, ...]:
    assert isinstance(call, functools.partial)
    return tuple(call.args)
