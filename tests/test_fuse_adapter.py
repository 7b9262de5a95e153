"""The FUSE adapter's own promises (poolfs/fs/fuse_ops.py) on real mounts (a local store; S3
where the promise is about the S3 store's request paths).

mfusepy on libfuse3 differs from fusepy in ways the shell tests would only notice by accident:
bare readdir names get inode 0 (glibc skips them) and READDIRPLUS gets no attributes;
renameat2 flags and the file handle of truncate are dropped; SIGTERM ends fuse_main with
code 8; the kernel read-ahead must be set after INIT; reads are copied from spans of fetched
parts; a read-only S3 mount makes no botocore client. Each has a test here.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest

from poolfs.mounts import find_mount, pid_alive, read_worker_state, worker_state_path
from poolfs.stores import open_store
from tests.conftest import Backend, MountFactory
from tests.mountrig import POOLFS

pytestmark = pytest.mark.fuse

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
AT_FDCWD = -100


def _url(tmp_path: Path) -> str:
    store = tmp_path / "store"
    store.mkdir(exist_ok=True)
    return f"file://{store}"


def test_readdir_gives_each_entry_its_stable_inode(tmp_path: Path, mounter: MountFactory) -> None:
    m = mounter(_url(tmp_path))
    (m.path / "d").mkdir()
    (m.path / "d" / "x").write_bytes(b"x")
    (m.path / "f").write_bytes(b"f")
    listed = {e.name: (e.inode(), e.is_dir()) for e in os.scandir(m.path)}
    assert listed.keys() == {"d", "f"}
    for name, (ino, is_dir) in listed.items():
        st = (m.path / name).stat()
        assert ino == st.st_ino != 0
        assert is_dir == (name == "d")
    assert [e.name for e in os.scandir(m.path / "d")] == ["x"]


def test_renameat2_noreplace_works_and_exchange_is_refused(
    tmp_path: Path, mounter: MountFactory
) -> None:
    m = mounter(_url(tmp_path))
    a, b, c = (m.path / n for n in ("a", "b", "c"))
    a.write_bytes(b"a")
    b.write_bytes(b"b")
    libc = ctypes.CDLL(None, use_errno=True)

    def renameat2(old: Path, new: Path, flags: int) -> int:
        if libc.renameat2(AT_FDCWD, bytes(old), AT_FDCWD, bytes(new), flags) == 0:
            return 0
        return ctypes.get_errno()

    assert renameat2(a, b, RENAME_NOREPLACE) == errno.EEXIST
    assert renameat2(a, b, RENAME_EXCHANGE) == errno.EINVAL
    assert (a.read_bytes(), b.read_bytes()) == (b"a", b"b")
    assert renameat2(a, c, RENAME_NOREPLACE) == 0
    assert not a.exists()
    assert c.read_bytes() == b"a"
    # mv -n keeps an existing target.
    subprocess.run(["mv", "-n", str(c), str(b)], check=False)
    assert b.read_bytes() == b"b"


def test_ftruncate_of_an_open_file_reaches_its_handle(
    tmp_path: Path, mounter: MountFactory
) -> None:
    m = mounter(_url(tmp_path))
    path = m.path / "t"
    with open(path, "wb") as f:
        f.write(b"0123456789")
        f.flush()
        os.ftruncate(f.fileno(), 4)
        assert os.fstat(f.fileno()).st_size == 4
    assert path.read_bytes() == b"0123"


@pytest.mark.skipif(os.geteuid() != 0, reason="the bdi read-ahead is root's")
@pytest.mark.parametrize(("args", "want"), [((), 1024), (("--read-ahead-kib", "512"), 512)])
def test_kernel_read_ahead_is_set_after_init(
    tmp_path: Path, mounter: MountFactory, args: tuple[str, ...], want: int
) -> None:
    m = mounter(_url(tmp_path), *args)
    os.listdir(m.path)  # the first request after INIT sets it
    dev = m.path.stat().st_dev
    bdi = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
    assert int(bdi.read_text()) == want


def test_fs_option_sets_or_refuses_a_setting(tmp_path: Path, mounter: MountFactory) -> None:
    url = _url(tmp_path)
    mp = tmp_path / "refused"
    mp.mkdir()
    proc = subprocess.run(
        [
            *POOLFS,
            "mount",
            url,
            str(mp),
            "--spill-dir",
            str(tmp_path / "sp"),
            "--fs-option",
            "no_such_setting=1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode != 0
    assert "no_such_setting" in proc.stderr
    assert find_mount(str(mp)) is None
    m = mounter(url, "--fs-option", "min_block=4096")
    (m.path / "ok").write_bytes(b"ok")
    assert (m.path / "ok").read_bytes() == b"ok"


def test_sigterm_flushes_and_exits_cleanly(tmp_path: Path) -> None:
    url = _url(tmp_path)
    mp = tmp_path / "mnt"
    mp.mkdir()
    log = tmp_path / "worker.log"
    base = [*POOLFS, "mount", url, str(mp), "--spill-dir", str(tmp_path / "sp")]
    subprocess.run([*base, "--log-file", str(log)], check=True, timeout=60)
    try:
        state = read_worker_state(str(mp))
        assert state is not None
        pid = int(state["pid"])
        fd = os.open(mp / "pending", os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, b"kept")
        os.close(fd)
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not pid_alive(pid)
        assert find_mount(str(mp)) is None
        final = read_worker_state(str(mp)) or {}
        assert final.get("exited") is True
        assert final.get("failed") == []
        text = log.read_text()
        assert " ERROR " not in text, text
        assert (tmp_path / "store" / "pending").read_bytes() == b"kept"
    finally:
        if find_mount(str(mp)) is not None:
            subprocess.run(["fusermount", "-uz", str(mp)], check=False)
        with contextlib.suppress(OSError):
            os.unlink(worker_state_path(str(mp)))


_SMALL_PARTS = ["part_size=65536", "max_window=262144", "min_block=4096", "first_block=4096"]


def test_reads_return_exactly_the_bytes_at_every_offset(
    tmp_path: Path, mounter: MountFactory
) -> None:
    """The adapter copies each answer from a span of a fetched part (or a join of two) into
    libfuse's buffer: every offset and size, across parts and at EOF, gives the file's bytes."""
    data = os.urandom(3 * 1024 * 1024 + 777)
    size = len(data)
    store = tmp_path / "store"
    store.mkdir()
    (store / "f").write_bytes(data)
    m = mounter(f"file://{store}", *[a for s in _SMALL_PARTS for a in ("--fs-option", s)])
    assert (m.path / "f").read_bytes() == data
    offsets = [0, 1, 4095, 4096, 65535, 65536 + 100, 1 << 20, size - 4096, size - 777, size - 1]
    offsets += [size, size + 10]
    sizes = [1, 100, 4096, 65536 + 3, 200_000, 1 << 20, 2 << 20]
    fd = os.open(m.path / "f", os.O_RDONLY)
    try:
        for offset in offsets:
            for n in sizes:
                # Drop the kernel's cached pages: each read reaches the adapter.
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                assert os.pread(fd, n, offset) == data[offset : offset + n], (offset, n)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        got = bytearray()
        while chunk := os.read(fd, 1 << 20):
            got += chunk
        assert got == data
    finally:
        os.close(fd)


def test_parallel_readers_each_get_their_bytes_from_reused_part_buffers(
    s3_backend: Backend, mounter: MountFactory
) -> None:
    """On S3, sequential parts are received into a few reused buffers (poolfs/fs/buffers.py):
    with 64 KiB parts, four sequential readers of two files, each dropping the kernel's pages
    as it goes so every read reaches the worker, read hundreds of parts through four buffers
    and each gets exactly its file's bytes."""
    files = {name: os.urandom(2 * 1024 * 1024 + 123) for name in ("a", "b")}
    for name, data in files.items():
        s3_backend.put(f"pool/{name}", data)
    m = mounter(s3_backend, *[a for s in _SMALL_PARTS for a in ("--fs-option", s)])
    got: dict[int, bytes] = {}

    def read(i: int, name: str) -> None:
        fd = os.open(m.path / name, os.O_RDONLY)
        try:
            out = bytearray()
            while chunk := os.read(fd, 100_000):
                out += chunk
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            got[i] = bytes(out)
        finally:
            os.close(fd)

    names = ["a", "b", "a", "b"]
    threads = [threading.Thread(target=read, args=(i, n)) for i, n in enumerate(names)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert [got[i] == files[n] for i, n in enumerate(names)] == [True] * 4


def test_reading_and_writing_on_s3_make_no_botocore_client(
    s3_backend: Backend, mounter: MountFactory
) -> None:
    """Reading (mount check, ls -l, stat, open, read) and writing files (PUT, multipart
    upload while written) go over the lean S3 path only; the botocore client, ~14 MiB of
    the worker and ~0.13 s of CPU, is made by the first delete, never by reads or writes."""
    s3_backend.put("pool/d/f", b"0123456789" * 1000)
    ro = mounter(s3_backend, "--read-only", name="ro")
    assert (ro.path / "d" / "f").read_bytes() == b"0123456789" * 1000
    assert [e.name for e in os.scandir(ro.path / "d")] == ["f"]
    assert (ro.path / "d" / "f").stat().st_size == 10_000
    rw = mounter(s3_backend, name="rw")
    (rw.path / "d" / "g").write_bytes(b"new")
    big = os.urandom(17 * 1024 * 1024)  # above the 16 MiB multipart threshold
    (rw.path / "d" / "big").write_bytes(big)
    assert s3_backend.get("pool/d/big") == big
    assert "botocore client made" not in rw.log()
    os.remove(rw.path / "d" / "g")
    ro.umount()
    rw.umount()
    assert "botocore client made" not in ro.log()
    assert "botocore client made" in rw.log()


def test_worker_runs_with_the_malloc_settings(
    tmp_path: Path, mounter: MountFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The mount worker's glibc malloc settings (poolfs/mounts.py worker_env) reach the
    worker process; a setting the operator gave wins."""
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "12345")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.tcache_count=7")
    m = mounter(_url(tmp_path))
    with open(f"/proc/{m.pid}/environ", "rb") as f:
        env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
    assert env[b"MALLOC_ARENA_MAX"] == b"2"
    assert env[b"MALLOC_MMAP_THRESHOLD_"] == str(4 * 1024 * 1024).encode()
    assert env[b"MALLOC_TRIM_THRESHOLD_"] == b"12345"
    assert env[b"GLIBC_TUNABLES"] == b"glibc.malloc.tcache_count=7"  # passed on as given


def test_write_request_is_passed_as_a_view_released_after_the_call() -> None:
    # mfusepy's own wrapper copies each request (up to 1 MiB) into bytes; ours hands the
    # operation a view of libfuse's buffer, valid only during the call.
    from poolfs.fs import fuse_ops

    got: list[tuple[str | None, memoryview, bytes, int, object]] = []

    class Ops:
        def write(self, path: str | None, data: memoryview, offset: int, fi: object) -> int:
            got.append((path, data, bytes(data), offset, fi))
            return len(data)

    adapter = fuse_ops._FUSE.__new__(fuse_ops._FUSE)
    adapter.operations, adapter.encoding, adapter.errors = Ops(), "utf-8", "surrogateescape"
    request = ctypes.create_string_buffer(b"abcdefgh", 8)
    fi = object()
    fip = type("FiPointer", (), {"contents": fi})()
    buf = ctypes.cast(request, ctypes.c_char_p)
    assert adapter.write(b"/f", buf, 6, 4096, fip) == 6
    [(path, view, seen, offset, passed_fi)] = got
    assert (path, seen, offset, passed_fi) == ("/f", b"abcdef", 4096, fi)
    with pytest.raises(ValueError, match="released"):
        bytes(view)


def test_stat_packer_writes_what_mfusepy_would() -> None:
    # getattr and READDIRPLUS pack `struct stat` in one struct.pack; the bytes must be those
    # mfusepy's own field-by-field setter writes from the same attributes.
    import mfusepy

    from poolfs.fs import fuse_ops
    from poolfs.fs.meta import Node

    ops = fuse_ops.FuseOps.__new__(fuse_ops.FuseOps)
    ops._uid, ops._gid = 1234, 5678
    nodes = {
        "/d/file": Node(False, 3 * 2**40 + 5, 0o4751, 1_600_000_000_123_456_789, 7, 2**62),
        "/d": Node(True, 0, 0o700, 0, 999_999_999, 1_000_000_000),
    }
    for path, node in nodes.items():
        expected = mfusepy.c_stat()
        mfusepy.set_st_attrs(expected, ops._stat(path, node), use_ns=True)
        assert fuse_ops.STAT.pack(ops.stat_values(path, node)) == bytes(expected)
    # Entries without attributes (".", "..", plain READDIR) carry inode number and type only.
    bare = mfusepy.c_stat.from_buffer_copy(
        fuse_ops.STAT.pack(ops.entry_values(("x", "/d/file", nodes["/d/file"]), False))
    )
    assert (bare.st_ino, bare.st_mode, bare.st_size) == (
        fuse_ops.inode_number("/d/file"),
        0o100000,
        0,
    )


def test_ls_l_on_a_fresh_mount_shows_what_stat_shows(tmp_path: Path, mounter: MountFactory) -> None:
    # On a fresh mount `ls -l` gets every entry's attributes with the listing (READDIRPLUS,
    # packed by StatPacker): what the kernel shows must be the listing's values, to the
    # nanosecond, and what a stat (GETATTR) answers. A listing carries no POSIX metadata the
    # mount has not seen (README, "POSIX metadata"): modes 0644/0755 and the object's
    # LastModified there.
    url = _url(tmp_path)
    first = mounter(url, name="first")
    (first.path / "f").write_bytes(b"12345")
    (first.path / "d").mkdir(mode=0o750)
    first.umount()
    stored = open_store(url).head("f").last_modified_ns
    m = mounter(url, "--uid", "4321", "--gid", "8765", name="fresh")
    out = subprocess.run(
        ["ls", "-ln", "--time-style=+%s.%N", str(m.path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    listed = {line.split()[-1]: line.split()[:6] for line in out.splitlines()[1:]}
    when = f"{stored // 10**9}.{stored % 10**9:09d}"
    assert listed["f"] == ["-rw-r--r--", "1", "4321", "8765", "5", when]
    assert listed["d"][:4] == ["drwxr-xr-x", "2", "4321", "8765"]
    for name in ("f", "d"):
        st = (m.path / name).stat()
        shown = [stat.filemode(st.st_mode), str(st.st_nlink), str(st.st_uid), str(st.st_gid)]
        assert listed[name][:4] == shown
        assert listed[name][5] == f"{st.st_mtime_ns // 10**9}.{st.st_mtime_ns % 10**9:09d}"
