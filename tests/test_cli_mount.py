"""`poolfs mount` / `poolfs umount` as a user runs them: exit codes and one-line reasons."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from poolfs.mounts import find_mount
from tests.conftest import MountFactory
from tests.mountrig import POOLFS, run

pytestmark = pytest.mark.fuse


def mount_cmd(url: str, mountpoint: Path, tmp_path: Path, *args: str) -> tuple[int, str]:
    proc = run(
        [*POOLFS, "mount", url, str(mountpoint), "--spill-dir", str(tmp_path / "spill"), *args],
        check=False,
        timeout=120,
    )
    return proc.returncode, proc.stderr.strip()


def test_missing_mountpoint(tmp_path: Path) -> None:
    code, err = mount_cmd("mem://x", tmp_path / "nope", tmp_path)
    assert code != 0 and err == f"poolfs: mountpoint {tmp_path / 'nope'} does not exist"


def test_mountpoint_not_empty(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "file").write_text("x")
    code, err = mount_cmd("mem://x", tmp_path / "m", tmp_path)
    assert code != 0 and "is not empty" in err and len(err.splitlines()) == 1


def test_mountpoint_busy(tmp_path: Path, mounter: MountFactory) -> None:
    m = mounter("mem://busy")
    code, err = mount_cmd("mem://x", m.path, tmp_path)
    assert code != 0 and "busy" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("s3://", "missing bucket name"),
        ("s3://Bad_Bucket/x", "not a valid S3 bucket name"),
        ("file://relative/dir", "absolute path"),
        ("ftp://host/x", "unsupported scheme"),
        ("/just/a/path", "no scheme"),
    ],
)
def test_bad_url(url: str, reason: str, tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    code, err = mount_cmd(url, tmp_path / "m", tmp_path)
    assert code != 0 and reason in err and len(err.splitlines()) == 1


def test_store_unreachable_is_quick_and_clear(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    started = time.monotonic()
    code, err = mount_cmd(
        "s3://some-bucket/p",
        tmp_path / "m",
        tmp_path,
        "--endpoint-url",
        "http://127.0.0.1:9",
        "--store-timeout",
        "5",
    )
    assert code != 0 and "unreachable" in err and len(err.splitlines()) == 1
    assert time.monotonic() - started < 20
    assert find_mount(str(tmp_path / "m")) is None


def test_missing_file_store_dir(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    code, err = mount_cmd(f"file://{tmp_path}/absent", tmp_path / "m", tmp_path)
    assert code != 0 and "unreachable" in err


def test_umount_not_mounted(tmp_path: Path) -> None:
    proc = run([*POOLFS, "umount", str(tmp_path)], check=False)
    assert proc.returncode != 0 and "is not mounted" in proc.stderr


def test_foreground_mount_and_umount_waits_for_worker(tmp_path: Path) -> None:
    import subprocess

    mnt = tmp_path / "m"
    mnt.mkdir()
    log = tmp_path / "fg.log"
    proc = subprocess.Popen(
        [
            *POOLFS,
            "mount",
            "mem://fg",
            str(mnt),
            "--foreground",
            "--spill-dir",
            str(tmp_path),
            "--log-file",
            str(log),
        ],
    )
    try:
        deadline = time.monotonic() + 30
        while find_mount(str(mnt)) is None:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        (mnt / "f").write_text("x")
        run([*POOLFS, "umount", str(mnt)])
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if find_mount(str(mnt)) is not None:
            run(["fusermount", "-uz", str(mnt)], check=False)
