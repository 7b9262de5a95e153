"""The FUSE adapter's own promises (poolfs/fs/fuse_ops.py) on real mounts of a local store.

mfusepy on libfuse3 differs from fusepy in ways the shell tests would only notice by accident:
bare readdir names get inode 0 (glibc skips them) and READDIRPLUS gets no attributes;
renameat2 flags and the file handle of truncate are dropped; SIGTERM ends fuse_main with
code 8; the kernel read-ahead must be set after INIT. Each has a test here.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from poolfs.mounts import find_mount, pid_alive, read_worker_state, worker_state_path
from tests.conftest import MountFactory
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
