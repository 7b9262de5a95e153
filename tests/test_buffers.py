"""Reused part buffers (poolfs/fs/buffers.py): a buffer is handed out again only once
nothing references it, at most `limit` exist, idle ones are dropped."""

from __future__ import annotations

import time

from poolfs.fs.buffers import PartBuffers


def test_a_buffer_is_reused_only_when_nothing_references_it() -> None:
    pool = PartBuffers(4096, limit=2, idle=60)
    first = pool.take()
    assert first is not None and len(first) == 4096
    first[:5] = b"hello"
    span = (first, 0, 5)  # as a reader copying out of it would hold it
    del first
    second = pool.take()
    assert second is not None and second is not span[0]
    assert pool.take() is None  # at the limit, both in use: the caller allocates
    del second
    again = pool.take()
    assert again is not None and again is not span[0]
    assert span[0][:5] == b"hello"  # never handed out while referenced
    kept = span[0]
    del span, again
    assert pool.take() is not None
    assert pool.held() == 2
    del kept
    pool.close()


def test_idle_buffers_are_dropped_and_a_closed_pool_hands_out_none() -> None:
    pool = PartBuffers(4096, limit=3, idle=0.2)
    held = pool.take()
    assert pool.take() is not None  # unreferenced at once
    deadline = time.monotonic() + 5
    while pool.held() > 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pool.held() == 1  # the one still referenced stays, however idle
    del held
    while pool.held() > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pool.held() == 0
    assert pool.take() is not None  # a new buffer (and a new janitor) after the sweep
    pool.close()
    assert pool.take() is None
    assert pool.held() == 0
