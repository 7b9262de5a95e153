"""Filesystem core without a kernel: PoolFS driven directly against mem and file stores."""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from poolfs.fs.config import FSConfig
from poolfs.fs.core import UTIME_NOW, UTIME_OMIT, PoolFS
from poolfs.fs.errors import ERRNO_FOR, PoolFSError
from poolfs.fs.meta import MODE_KEY, MTIME_KEY, encode_meta
from poolfs.stores import (
    Changed,
    Denied,
    ListPage,
    NotFound,
    ObjectInfo,
    Store,
    StoreError,
    Throttled,
    TooLarge,
    Transient,
    open_store,
)
from poolfs.stores.mem import MemStore

pytestmark = pytest.mark.core


@pytest.fixture(params=["mem", "file"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "mem":
        return MemStore("core")
    root = tmp_path / "store"
    root.mkdir()
    return open_store(f"file://{root}")


def make_fs(store: Store, tmp_path: Path, **cfg: object) -> PoolFS:
    return PoolFS(store, FSConfig(spill_dir=str(tmp_path / "spill"), **cfg))  # type: ignore[arg-type]


@pytest.fixture
def fs(store: Store, tmp_path: Path) -> Iterator[PoolFS]:
    pfs = make_fs(store, tmp_path)
    yield pfs
    assert pfs.shutdown() == []


def write_file(fs: PoolFS, path: str, data: bytes, mode: int = 0o644) -> None:
    fh = fs.create(path, mode, os.O_WRONLY)
    fs.write(fh, 0, data)
    fs.flush(fh)
    fs.release(fh)


def read_file(fs: PoolFS, path: str) -> bytes:
    fh = fs.open(path, os.O_RDONLY)
    try:
        out = b""
        while chunk := fs.read(fh, len(out), 1 << 20):
            out += chunk
        return out
    finally:
        fs.release(fh)


def raises(err: int) -> pytest.RaisesExc[PoolFSError]:
    return pytest.raises(PoolFSError, match=os.strerror(err).split()[0])


def errno_of(fn: object, *args: object) -> int:
    with pytest.raises(PoolFSError) as info:
        fn(*args)  # type: ignore[operator]
    assert info.value.errno is not None
    return info.value.errno


# --- the error table: one test per row --------------------------------------------------


class FailingStore(MemStore):
    def __init__(self, exc: StoreError) -> None:
        super().__init__("failing")
        self.exc = exc
        self.armed = False

    def get_range(
        self, key: str, start: int, end: int | None, if_match: str | None = None
    ) -> tuple[bytes, object]:  # type: ignore[override]
        if self.armed:
            raise self.exc
        return super().get_range(key, start, end, if_match)


@pytest.mark.expect_log
@pytest.mark.parametrize(("kind", "expected"), ERRNO_FOR)
def test_error_table_row(kind: type[StoreError], expected: int, tmp_path: Path) -> None:
    store = FailingStore(kind("injected", "f"))
    pfs = make_fs(store, tmp_path)
    write_file(pfs, "/f", b"data")
    store.armed = True
    assert errno_of(pfs.open, "/f", os.O_RDONLY) == expected
    pfs.shutdown()


def test_error_table_covers_every_store_error_kind() -> None:
    kinds = {k for k, _ in ERRNO_FOR}
    assert {NotFound, Denied, Throttled, Transient, Changed, TooLarge, StoreError} <= kinds
    assert dict(ERRNO_FOR)[Throttled] == errno.EAGAIN


# --- writes ---------------------------------------------------------------------------------


def test_write_read_roundtrip_and_metadata_in_store(fs: PoolFS, store: Store) -> None:
    write_file(fs, "/a.txt", b"hello", 0o640)
    assert read_file(fs, "/a.txt") == b"hello"
    info = store.head("a.txt")
    assert info.size == 5
    assert info.metadata is not None and info.metadata[MODE_KEY] == "640"
    node = fs.getattr("/a.txt")
    assert node.mode == 0o640 and node.size == 5


def test_write_from_a_buffer_stores_its_bytes(fs: PoolFS, store: Store) -> None:
    # The FUSE adapter hands the core a view of libfuse's request buffer, not bytes.
    write_file(fs, "/buf", b"0123456789")
    fh = fs.open("/buf", os.O_WRONLY)
    buffer = bytearray(b"..ABCD..")
    assert fs.write(fh, 4, memoryview(buffer)[2:6]) == 4
    buffer[2:6] = b"zzzz"  # changing the buffer after the call changes nothing stored
    fs.flush(fh)
    fs.release(fh)
    assert read_file(fs, "/buf") == b"0123ABCD89"
    assert store.get_range("buf", 0, None)[0] == b"0123ABCD89"


def test_offset_write_append_and_truncate(fs: PoolFS, store: Store) -> None:
    write_file(fs, "/f", b"0123456789")
    fh = fs.open("/f", os.O_WRONLY)
    fs.write(fh, 3, b"XY")
    fs.flush(fh)
    fs.release(fh)
    assert store.get_range("f", 0, None)[0] == b"012XY56789"
    fh = fs.open("/f", os.O_WRONLY | os.O_APPEND)
    fs.write(fh, 0, b"!")
    fs.release(fh)
    assert read_file(fs, "/f") == b"012XY56789!"
    fs.truncate("/f", 4)
    assert store.get_range("f", 0, None)[0] == b"012X"
    fs.truncate("/f", 6)
    assert read_file(fs, "/f") == b"012X\0\0"
    fh = fs.open("/f", os.O_RDWR)
    fs.truncate("/f", 2, fh)
    assert fs.getattr("/f", fh).size == 2
    fs.release(fh)
    assert store.get_range("f", 0, None)[0] == b"01"


def test_o_trunc_does_not_fetch_old_content(fs: PoolFS, store: Store) -> None:
    write_file(fs, "/f", b"x" * 100_000)
    fh = fs.open("/f", os.O_WRONLY | os.O_TRUNC)
    fs.write(fh, 0, b"new")
    fs.release(fh)
    assert store.get_range("f", 0, None)[0] == b"new"


def test_size_limit(store: Store, tmp_path: Path) -> None:
    pfs = make_fs(store, tmp_path, max_file_size=1000)
    write_file(pfs, "/exact", b"a" * 1000)
    assert store.head("exact").size == 1000
    fh = pfs.open("/exact", os.O_WRONLY | os.O_TRUNC)
    assert errno_of(pfs.write, fh, 0, b"b" * 1001) == errno.EFBIG
    assert errno_of(pfs.flush, fh) == errno.EFBIG
    pfs.release(fh)
    assert store.get_range("exact", 0, None)[0] == b"a" * 1000
    assert errno_of(pfs.truncate, "/exact", 1001) == errno.EFBIG
    assert store.head("exact").size == 1000
    pfs.shutdown()


@pytest.mark.expect_log
def test_failed_upload_keeps_bytes_and_old_object(tmp_path: Path) -> None:
    store = MemStore("fail")
    pfs = make_fs(store, tmp_path)
    write_file(pfs, "/f", b"old")
    fh = pfs.open("/f", os.O_WRONLY | os.O_TRUNC)
    pfs.write(fh, 0, b"new bytes")
    store.offline = True
    assert errno_of(pfs.flush, fh) == errno.EIO
    store.offline = False
    assert store.raw_get("f") == b"old"
    kept = list((tmp_path / "spill" / "lost+found").iterdir())
    assert [p.read_bytes() for p in kept] == [b"new bytes"]
    pfs.release(fh)
    pfs.shutdown()


def test_unlinked_open_file_stays_readable(fs: PoolFS) -> None:
    write_file(fs, "/f", b"still here")
    fh = fs.open("/f", os.O_RDONLY)
    fs.unlink("/f")
    assert errno_of(fs.getattr, "/f") == errno.ENOENT
    assert fs.read(fh, 0, 100) == b"still here"
    assert fs.getattr("/f", fh).size == 10
    fs.release(fh)


@pytest.mark.expect_log
def test_reader_of_changed_object_gets_eio_not_mixed_bytes(tmp_path: Path) -> None:
    store = MemStore("pin")
    pfs = make_fs(store, tmp_path, first_block=4096, min_block=4096)
    write_file(pfs, "/f", b"a" * 20000)
    fh = pfs.open("/f", os.O_RDONLY)
    assert pfs.read(fh, 0, 10) == b"a" * 10
    store.put_bytes("f", b"b" * 20000, {})
    assert errno_of(pfs.read, fh, 10000, 100) == errno.EIO
    pfs.release(fh)
    pfs.shutdown()


# --- read-only ------------------------------------------------------------------------------


def test_read_only_refuses_every_mutation(store: Store, tmp_path: Path) -> None:
    rw = make_fs(store, tmp_path)
    write_file(rw, "/f", b"x")
    rw.mkdir("/d", 0o755)
    rw.shutdown()
    ro = make_fs(store, tmp_path, read_only=True)
    calls = [
        (ro.create, "/new", 0o644),
        (ro.open, "/f", os.O_WRONLY),
        (ro.open, "/f", os.O_RDONLY | os.O_TRUNC),
        (ro.unlink, "/f"),
        (ro.mkdir, "/e", 0o755),
        (ro.rmdir, "/d"),
        (ro.rename, "/f", "/g"),
        (ro.truncate, "/f", 0),
        (ro.chmod, "/f", 0o600),
        (ro.utimens, "/f", None),
    ]
    for fn, *args in calls:
        assert errno_of(fn, *args) == errno.EROFS, fn
    assert read_file(ro, "/f") == b"x"
    assert ro.getattr("/f").mode == 0o444
    ro.shutdown()


# --- directories and names --------------------------------------------------------------


def test_directories(fs: PoolFS) -> None:
    fs.mkdir("/d", 0o750)
    write_file(fs, "/d/f", b"1")
    assert errno_of(fs.rmdir, "/d") == errno.ENOTEMPTY
    fs.unlink("/d/f")
    assert fs.getattr("/d").is_dir
    assert [n for n, _ in fs.readdir("/d")] == []
    fs.rmdir("/d")
    assert errno_of(fs.getattr, "/d") == errno.ENOENT


def test_directory_survives_last_file_removal_when_implicit(tmp_path: Path) -> None:
    store = MemStore("implicit")
    store.put_bytes("d/f", b"1", {})
    pfs = make_fs(store, tmp_path)
    pfs.unlink("/d/f")
    assert pfs.getattr("/d").is_dir
    pfs.shutdown()


def test_rename_dir_above_limit_is_exdev(store: Store, tmp_path: Path) -> None:
    pfs = make_fs(store, tmp_path, dir_rename_limit=3)
    pfs.mkdir("/small", 0o755)
    write_file(pfs, "/small/a", b"a")
    pfs.rename("/small", "/moved")
    assert read_file(pfs, "/moved/a") == b"a"
    pfs.mkdir("/big", 0o755)
    for i in range(4):
        write_file(pfs, f"/big/{i}", b"x")
    assert errno_of(pfs.rename, "/big", "/big2") == errno.EXDEV
    pfs.shutdown()


@pytest.mark.expect_log
def test_bad_keys_skipped_and_shadowed_object(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = MemStore("names")
    for key in ("a//b", "../x", "./y", "ok", "x" * 256, "a", "a/x"):
        store.put_bytes(key, b"1", {})
    pfs = make_fs(store, tmp_path)
    assert [n for n, _ in pfs.readdir("/")] == ["a", "ok"]
    assert pfs.getattr("/a").is_dir
    pfs.readdir("/")
    messages = [r.getMessage() for r in caplog.records]
    # Listed as the common prefix "../" (the store folds "../x" into it): logged once only.
    assert sum("'../'" in m for m in messages) == 1
    assert sum("'./'" in m for m in messages) == 1
    assert [n for n, _ in pfs.readdir("/a")] == ["x"]
    assert any("shadowed" in m for m in messages)
    pfs.shutdown()


@pytest.mark.expect_log
def test_directory_of_only_unusable_keys_is_empty_not_missing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = MemStore("unusable")
    store.put_bytes("d//b", b"1", {})
    store.put_bytes("e/../x", b"1", {})
    pfs = make_fs(store, tmp_path)
    assert [n for n, _ in pfs.readdir("/")] == ["d", "e"]
    # Listed by its parent, so it exists: an empty directory, not ENOENT.
    assert pfs.readdir("/d") == []
    assert pfs.readdir("/e") == []
    assert pfs.getattr("/d").is_dir
    assert any("'d//'" in r.getMessage() for r in caplog.records)
    pfs.shutdown()


def test_name_too_long(fs: PoolFS) -> None:
    assert errno_of(fs.create, "/" + "n" * 256, 0o644) == errno.ENAMETOOLONG
    write_file(fs, "/" + "n" * 255, b"ok")


def test_listing_serves_getattr_without_per_file_requests(tmp_path: Path) -> None:
    store = MemStore("many")
    for i in range(10_000):
        store.put_bytes(f"big/f{i:05d}", b"x", {})
    pfs = make_fs(store, tmp_path, metadata_ttl=60)
    store.calls.clear()
    names = [n for n, _ in pfs.readdir("/big")]
    for name in names:
        pfs.getattr("/big/" + name)
    assert len(names) == 10_000
    assert set(store.calls) <= {"list", "head", "get"}
    # 10 pages of 1000 keys, plus one LIST, HEAD and GET resolving the directory itself.
    assert store.calls["list"] <= 11
    assert store.calls.get("head", 0) <= 1
    assert store.calls.get("get", 0) <= 1
    pfs.shutdown()


def test_times_and_modes(fs: PoolFS, store: Store) -> None:
    write_file(fs, "/f", b"x", 0o600)
    fs.utimens("/f", (1_000_000_001, 2_000_000_002))
    node = fs.getattr("/f")
    assert (node.atime_ns, node.mtime_ns) == (1_000_000_001, 2_000_000_002)
    fs.utimens("/f", (UTIME_OMIT, 3_000_000_003))
    node = fs.getattr("/f")
    assert (node.atime_ns, node.mtime_ns) == (1_000_000_001, 3_000_000_003)
    fs.utimens("/f", (UTIME_NOW, UTIME_OMIT))
    assert fs.getattr("/f").mtime_ns == 3_000_000_003
    fs.chmod("/f", 0o751)
    assert fs.getattr("/f").mode == 0o751
    meta = store.head("f").metadata
    assert meta is not None and meta[MODE_KEY] == "751" and meta[MTIME_KEY] == "3000000003"
    _ = read_file(fs, "/f")
    assert fs.getattr("/f").mtime_ns == 3_000_000_003


def test_rename_dir_moves_files_whose_upload_is_pending(store: Store, tmp_path: Path) -> None:
    pfs = make_fs(store, tmp_path, metadata_ttl=0)
    pfs.mkdir("/d", 0o755)
    handles = [pfs.create(f"/d/{i}", 0o644) for i in range(3)]  # empty: stored at release
    pfs.rename("/d", "/e")
    for fh in handles:
        pfs.release(fh)
    assert [n for n, _ in pfs.readdir("/e")] == ["0", "1", "2"]
    assert errno_of(pfs.getattr, "/d") == errno.ENOENT
    keys = [o.key for o in store.list_all("", None).objects]
    assert not [k for k in keys if k.startswith("d/")]
    assert {"e/0", "e/1", "e/2"} <= set(keys)
    pfs.shutdown()


def test_lookups_after_listing_expiry_relist_instead_of_per_file(tmp_path: Path) -> None:
    # `ls -l` that outlasts the metadata TTL must still cost LIST requests only.
    import time

    store = MemStore("relist")
    for i in range(3000):
        store.put_bytes(f"big/f{i:05d}", b"x", {})
    pfs = make_fs(store, tmp_path, metadata_ttl=0.05)
    names = [n for n, _ in pfs.readdir("/big")]
    store.calls.clear()
    for i, name in enumerate(names):
        if i % 1000 == 0:
            time.sleep(0.06)  # the listing expires mid-walk
        assert pfs.getattr("/big/" + name).size == 1
    assert set(store.calls) == {"list"}
    assert store.calls["list"] <= 3 * 4  # three refreshes of three pages, and slack
    pfs.shutdown()


class HeldListing(MemStore):
    """A store whose next listing of `d/` is taken, then held until released."""

    def __init__(self) -> None:
        super().__init__("held")
        self.armed = False
        self.entered = threading.Event()
        self.go = threading.Event()

    def list_pages(self, prefix: str, delimiter: str | None = "/") -> Iterator[ListPage]:
        pages = list(super().list_pages(prefix, delimiter))
        if self.armed and prefix == "d/":
            self.armed = False
            self.entered.set()
            self.go.wait(10)
        yield from pages


def test_listing_taken_during_a_change_keeps_the_change(tmp_path: Path) -> None:
    store = HeldListing()
    pfs = make_fs(store, tmp_path, metadata_ttl=60)
    pfs.mkdir("/d", 0o755)
    pfs._listings.clear()
    store.armed = True
    lister = threading.Thread(target=pfs.readdir, args=("/d",))
    lister.start()
    assert store.entered.wait(10)
    write_file(pfs, "/d/x", b"1")  # stored while the listing above is in flight
    store.go.set()
    lister.join(10)
    assert [n for n, _ in pfs.readdir("/d")] == ["x"]
    pfs.shutdown()


def test_directory_walk_fetches_next_small_files_ahead(tmp_path: Path) -> None:
    import time

    store = MemStore("walk")
    for i in range(20):
        store.put_bytes(f"d/f{i:02d}", f"v1-{i}".encode(), {})
    pfs = make_fs(store, tmp_path, metadata_ttl=0.3)
    pfs.readdir("/d")
    store.calls.clear()
    assert read_file(pfs, "/d/f00") == b"v1-0"
    assert read_file(pfs, "/d/f01") == b"v1-1"  # ascending: a walk, f02..f09 fetched ahead
    deadline = time.monotonic() + 5
    while store.calls.get("get", 0) < 10 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert store.calls["get"] == 10
    for i in range(2, 8):
        assert read_file(pfs, f"/d/f{i:02d}") == f"v1-{i}".encode()
    assert store.calls["get"] <= 10 + 8  # f02..f07 came from the blocks fetched ahead
    # A block fetched ahead is never used past the metadata TTL: a change made meanwhile by
    # another node is seen.
    for i in range(8, 19):
        read_file(pfs, f"/d/f{i:02d}")
    assert "d/f19" in pfs._ahead  # fetched ahead, as v1
    pfs._ahead["d/f19"][0].result()
    store.put_bytes("d/f19", b"v2-19", {})
    time.sleep(0.35)
    assert read_file(pfs, "/d/f19") == b"v2-19"
    pfs.shutdown()


def test_writers_never_use_blocks_fetched_ahead(tmp_path: Path) -> None:
    store = MemStore("walkw")
    for i in range(4):
        store.put_bytes(f"d/f{i}", b"old", {})
    pfs = make_fs(store, tmp_path, metadata_ttl=60)
    pfs.readdir("/d")
    read_file(pfs, "/d/f0")
    read_file(pfs, "/d/f1")  # f2, f3 fetched ahead
    store.put_bytes("d/f2", b"newer", {})
    fh = pfs.open("/d/f2", os.O_WRONLY | os.O_APPEND)
    pfs.write(fh, 0, b"!")
    pfs.release(fh)
    assert store.raw_get("d/f2") == b"newer!"
    pfs.shutdown()


def test_open_after_lookup_makes_no_request_of_its_own(tmp_path: Path) -> None:
    store = MemStore("lookup-block")
    store.put_bytes("d/f", b"x" * 1000, {})
    pfs = make_fs(store, tmp_path)
    assert pfs.getattr("/d/f").size == 1000  # the kernel's LOOKUP before an open
    store.calls.clear()
    assert read_file(pfs, "/d/f") == b"x" * 1000
    assert store.calls == {}
    # A writer never uses it: its base must be the current version.
    pfs.getattr("/d/f")
    store.put_bytes("d/f", b"y" * 10, {})
    fh = pfs.open("/d/f", os.O_RDWR)
    assert pfs.read(fh, 0, 100) == b"y" * 10
    pfs.release(fh)
    pfs.shutdown()


def test_lookup_blocks_expire_with_the_metadata_ttl(tmp_path: Path) -> None:
    store = MemStore("lookup-ttl")
    store.put_bytes("f", b"old", {})
    pfs = make_fs(store, tmp_path, metadata_ttl=0.2)
    pfs.getattr("/f")
    store.put_bytes("f", b"new", {})
    threading.Event().wait(0.3)
    assert read_file(pfs, "/f") == b"new"
    pfs.shutdown()


def keeps(pfs: PoolFS, path: str) -> tuple[bool, bytes]:
    fh = pfs.open(path, os.O_RDONLY)
    try:
        return pfs.keep_cache(fh), pfs.read(fh, 0, 1 << 20)
    finally:
        pfs.release(fh)


def test_kernel_cache_kept_only_for_the_version_opened_before(tmp_path: Path) -> None:
    store = MemStore("keep")
    store.put_bytes("f", b"one", {})
    pfs = make_fs(store, tmp_path, metadata_ttl=0)
    assert keeps(pfs, "/f") == (False, b"one")
    store.calls.clear()
    fh = pfs.open("/f", os.O_RDONLY)
    assert pfs.keep_cache(fh)
    pfs.release(fh)
    assert store.calls == {"head": 1}  # revalidated without fetching bytes
    # Changed by another client: the kernel must drop its pages, then may keep the new ones.
    store.put_bytes("f", b"two", {})
    assert keeps(pfs, "/f") == (False, b"two")
    assert keeps(pfs, "/f") == (True, b"two")
    # Changed here: written, truncated, renamed over, unlinked and recreated.
    write_file(pfs, "/f", b"three")
    assert keeps(pfs, "/f") == (False, b"three")
    assert keeps(pfs, "/f")[0]
    pfs.truncate("/f", 2)
    assert keeps(pfs, "/f") == (False, b"th")
    write_file(pfs, "/g", b"gg")
    pfs.rename("/g", "/f")
    assert keeps(pfs, "/f") == (False, b"gg")
    pfs.unlink("/f")
    write_file(pfs, "/f", b"gg")
    assert keeps(pfs, "/f") == (False, b"gg")
    # A file open for writing: its readers see staged bytes, never a kept cache.
    assert keeps(pfs, "/f")[0]
    wfh = pfs.open("/f", os.O_WRONLY)
    assert keeps(pfs, "/f") == (False, b"gg")
    pfs.write(wfh, 0, b"GG")
    pfs.release(wfh)
    assert keeps(pfs, "/f") == (False, b"GG")
    pfs.shutdown()


def test_kernel_cache_not_kept_while_another_version_is_open(tmp_path: Path) -> None:
    store = MemStore("keep-two")
    store.put_bytes("f", b"one", {})
    pfs = make_fs(store, tmp_path, metadata_ttl=0)
    keeps(pfs, "/f")
    old = pfs.open("/f", os.O_RDONLY)  # pins "one"; its reads fill the shared page cache
    assert pfs.keep_cache(old)
    assert pfs.read(old, 0, 10) == b"one"  # now held by the handle's read-ahead
    store.put_bytes("f", b"two", {})
    assert keeps(pfs, "/f") == (False, b"two")
    assert pfs.read(old, 0, 10) == b"one"
    assert keeps(pfs, "/f") == (False, b"two")  # "one" may be in the kernel's pages
    pfs.release(old)
    assert keeps(pfs, "/f") == (False, b"two")  # ... until an open without keep drops them
    assert keeps(pfs, "/f") == (True, b"two")
    pfs.shutdown()


# --- cache bounds (long-lived mounts) ---------------------------------------------------------


def test_attribute_and_listing_caches_stay_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import poolfs.fs.core as core

    monkeypatch.setattr(core, "_NODES_MAX", 40)
    monkeypatch.setattr(core, "_LISTINGS_MAX", 4)
    monkeypatch.setattr(core, "_LISTED_ENTRIES_MAX", 30)
    store = MemStore("bounded")
    for d in range(10):
        for f in range(10):
            store.put_bytes(f"d{d}/f{f}", b"x" * f, {})
    pfs = make_fs(store, tmp_path, metadata_ttl=3600)
    for d in range(10):
        assert [n for n, _ in pfs.readdir(f"/d{d}")] == [f"f{f}" for f in range(10)]
        for f in range(10):
            assert pfs.getattr(f"/d{d}/f{f}").size == f
        assert len(pfs._nodes) <= 40
        assert len(pfs._listings) <= 4
        assert sum(len(x.children) for x in pfs._listings.values()) <= 30
    # Evicted entries are fetched again, with the same answers.
    assert pfs.getattr("/d0/f7").size == 7
    assert [n for n, _ in pfs.readdir("/d0")] == [f"f{f}" for f in range(10)]
    pfs.shutdown()


def test_change_log_is_kept_only_while_a_listing_is_under_way(tmp_path: Path) -> None:
    store = MemStore("changes")
    pfs = make_fs(store, tmp_path)
    for i in range(50):
        write_file(pfs, f"/d{i}", b"1")  # no LIST of "/" under way: nothing to remember
    assert pfs._changes == {}
    assert sorted(n for n, _ in pfs.readdir("/")) == sorted(f"d{i}" for i in range(50))
    assert pfs._changes == {} and pfs._listing_since == {}
    pfs.shutdown()


@pytest.mark.expect_log
def test_expired_root_attributes_are_served_while_revalidated(tmp_path: Path) -> None:
    store = MemStore("root")
    store.put_bytes("", b"", encode_meta(0o755, None, 0))
    pfs = make_fs(store, tmp_path, metadata_ttl=0.05)
    assert pfs.getattr("/").mode & 0o7777 == 0o755
    # Another client changes the root marker; the store then goes away.
    store.put_bytes("", b"", encode_meta(0o700, None, 0))
    store.offline = True
    time.sleep(0.1)
    # Expired: the known attributes answer at once (no HEAD in front of the path walk), and
    # a failed revalidation does not turn the mountpoint into an error.
    assert pfs.getattr("/").mode & 0o7777 == 0o755
    store.offline = False
    deadline = time.monotonic() + 5
    while pfs.getattr("/").mode & 0o7777 != 0o700:
        assert time.monotonic() < deadline, "the root's new mode never showed"
        time.sleep(0.02)
    # A local chmod is not overwritten by a revalidation that was under way.
    pfs.chmod("/", 0o750)
    assert pfs.getattr("/").mode & 0o7777 == 0o750
    pfs.shutdown()


class ThreadRecordingStore(MemStore):
    """Records which threads call the store and how many calls overlap at most."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.threads: set[int] = set()
        self.peak = 0
        self._running = 0
        self._count_lock = threading.Lock()
        self._inside = threading.local()

    @contextlib.contextmanager
    def _call(self) -> Iterator[None]:
        if getattr(self._inside, "call", False):  # a call made by another (any_below: LIST)
            yield
            return
        self._inside.call = True
        with self._count_lock:
            self.threads.add(threading.get_ident())
            self._running += 1
            self.peak = max(self.peak, self._running)
        try:
            time.sleep(0.01)  # long enough for overlapping calls to be seen overlapping
            yield
        finally:
            self._inside.call = False
            with self._count_lock:
                self._running -= 1

    def any_below(self, prefix: str) -> bool:
        with self._call():
            return super().any_below(prefix)

    def head(self, key: str) -> ObjectInfo:
        with self._call():
            return super().head(key)

    def list_pages(self, prefix: str, delimiter: str | None = "/") -> Iterator[ListPage]:
        with self._call():
            yield from super().list_pages(prefix, delimiter)


def test_warm_up_starts_the_threads_a_cold_lookup_uses(tmp_path: Path) -> None:
    store = ThreadRecordingStore("warm")
    store.put_bytes("d/f", b"x", {})
    pfs = make_fs(store, tmp_path)
    pfs.warm_up()
    # Three overlapping requests, as a lookup sends them, each from its own I/O thread.
    assert store.peak == 3
    warmed = set(store.threads)
    assert len(warmed) == 3 and threading.get_ident() not in warmed
    store.threads.clear()
    assert pfs.getattr("/d/f").size == 1  # a cold lookup: GET here, HEAD and LIST beside it
    assert store.threads - {threading.get_ident()} <= warmed
    assert store.threads - {threading.get_ident()}
    assert pfs.shutdown() == []


def calls_for_fs(pfs: PoolFS, store: MemStore, path: str) -> dict[str, int]:
    """The store calls one getattr of `path` makes."""
    before = dict(store.calls)
    pfs.getattr(path)
    return {op: n - before.get(op, 0) for op, n in store.calls.items() if n != before.get(op)}


def test_warm_up_makes_the_roots_directories_one_head_each(tmp_path: Path) -> None:
    store = MemStore("warm-root")
    store.put_bytes("d/f", b"x", {})
    store.put_bytes("m/", b"", encode_meta(0o700, 5_000_000_000, 5_000_000_000))
    store.put_bytes("top", b"yz", {})
    pfs = make_fs(store, tmp_path, metadata_ttl=0.5)
    pfs.warm_up()

    def calls_for(path: str) -> dict[str, int]:
        return calls_for_fs(pfs, store, path)

    assert calls_for("/d") == {"head": 1}  # the marker's HEAD: absent, an implicit directory
    assert pfs.getattr("/d").is_dir
    assert calls_for("/m") == {"head": 1}
    assert pfs.getattr("/m").mode & 0o777 == 0o700  # the marker's attributes, as a lookup
    assert set(calls_for("/top")) >= {"get", "head", "list"}  # a file: the full lookup
    pfs.rmdir("/m")
    with pytest.raises(PoolFSError):
        pfs.getattr("/m")  # our own change wins over the hint
    pfs.rename("/d", "/e")  # a directory rename forgets the tree, the hint with it
    with pytest.raises(PoolFSError):
        pfs.getattr("/d")
    assert pfs.getattr("/e/f").size == 1
    store.put_bytes("x/y", b"1", {})
    pfs2 = make_fs(store, tmp_path / "again", metadata_ttl=0.5)
    pfs2.warm_up()
    assert calls_for_fs(pfs2, store, "/x") == {"head": 1}
    time.sleep(0.6)  # past metadata_ttl: the hint is gone
    assert set(calls_for_fs(pfs2, store, "/e")) >= {"get", "head", "list"}
    assert pfs2.shutdown() == []
    assert pfs.shutdown() == []


def test_warm_up_ignores_an_unreachable_store(tmp_path: Path) -> None:
    store = ThreadRecordingStore("warm-down")
    store.offline = True
    pfs = make_fs(store, tmp_path)
    started = time.monotonic()
    pfs.warm_up()
    assert time.monotonic() - started < 1.0
    assert store.peak == 3
    assert pfs.shutdown() == []
