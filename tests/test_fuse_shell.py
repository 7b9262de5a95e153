"""Semantics 1 and 2 on real mounts of every store: shell commands and Python file I/O."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time

import pytest

from tests.conftest import Backend, MountFactory
from tests.mountrig import Mount, run
from tests.servers import MotoServer

pytestmark = pytest.mark.fuse


def sh(m: Mount, script: str) -> str:
    return run(script, cwd=m.path).stdout


def other_process_reads(path: os.PathLike[str] | str) -> bytes:
    """Read a file from a separate process (close-to-open is about other processes)."""
    code = "import sys; sys.stdout.buffer.write(open(sys.argv[1], 'rb').read())"
    return subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, check=True
    ).stdout


def test_shell_commands(mount: Mount) -> None:
    sh(mount, "mkdir -p a/b/c && echo hello > a/b/c/one.txt && echo more >> a/b/c/one.txt")
    assert sh(mount, "cat a/b/c/one.txt") == "hello\nmore\n"
    assert "one.txt" in sh(mount, "ls a/b/c")
    listing = sh(mount, "ls -l a/b/c")
    assert "-rw-r--r--" in listing and " 11 " in listing
    assert sh(mount, "find . | sort").split() == [".", "./a", "./a/b", "./a/b/c", "./a/b/c/one.txt"]
    sh(mount, "cp a/b/c/one.txt two.txt && mv two.txt three.txt")
    assert sh(mount, "cat three.txt") == "hello\nmore\n"
    assert not (mount.path / "two.txt").exists()
    sh(mount, "touch empty && dd if=/dev/urandom of=rand bs=64k count=20 status=none")
    assert (mount.path / "empty").stat().st_size == 0
    assert (mount.path / "rand").stat().st_size == 20 * 65536
    sh(mount, "sed -i 's/hello/HELLO/' three.txt")
    assert sh(mount, "cat three.txt") == "HELLO\nmore\n"
    sh(mount, "rm three.txt empty && rmdir a/b/c 2>/dev/null || true")
    assert sorted(os.listdir(mount.path)) == ["a", "rand"]
    sh(mount, "rm -rf a")
    assert os.listdir(mount.path) == ["rand"]


def test_python_file_io_and_other_process(mount: Mount) -> None:
    p = mount.path / "data.bin"
    payload = os.urandom(3 * 1024 * 1024 + 123)
    with open(p, "wb") as f:
        f.write(payload)
    assert other_process_reads(p) == payload
    with open(p, "r+b") as f:
        f.seek(1000)
        f.write(b"PATCH")
    expected = payload[:1000] + b"PATCH" + payload[1005:]
    assert other_process_reads(p) == expected
    with open(p, "ab") as f:
        f.write(b"TAIL")
    assert other_process_reads(p)[-4:] == b"TAIL"


def test_writes_land_in_store(store_backend: Backend, mounter: MountFactory) -> None:
    m = mounter(store_backend)
    p = m.path / "doc.txt"
    p.write_bytes(b"version one")
    assert (
        store_backend.get("pool/doc.txt" if store_backend.kind == "s3" else "doc.txt")
        == b"version one"
    )
    key = "pool/doc.txt" if store_backend.kind == "s3" else "doc.txt"
    # O_TRUNC
    with open(p, "wb") as f:
        f.write(b"v2")
    assert store_backend.get(key) == b"v2"
    # write at an offset into an existing file
    run(f"printf 'XY' | dd of='{p}' bs=1 seek=1 conv=notrunc status=none")
    assert store_backend.get(key) == b"vXY"
    # truncate grow and shrink by path on a closed file
    os.truncate(p, 6)
    assert store_backend.get(key) == b"vXY\0\0\0"
    run(f"truncate -s 2 '{p}'")
    assert store_backend.get(key) == b"vX"
    # ftruncate then fstat
    with open(p, "r+b") as f:
        os.ftruncate(f.fileno(), 10)
        assert os.fstat(f.fileno()).st_size == 10
    assert store_backend.get(key) == b"vX" + b"\0" * 8
    assert other_process_reads(p) == b"vX" + b"\0" * 8


def test_fsync_returns_after_durable(store_backend: Backend, mounter: MountFactory) -> None:
    m = mounter(store_backend)
    key = "pool/f" if store_backend.kind == "s3" else "f"
    fd = os.open(m.path / "f", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, b"durable")
        os.fsync(fd)
        assert store_backend.get(key) == b"durable"
    finally:
        os.close(fd)


def test_concurrent_processes(mount: Mount) -> None:
    script = r"""
import hashlib, os, sys
path, seed = sys.argv[1], int(sys.argv[2])
data = hashlib.sha256(str(seed).encode()).digest() * (40000 + seed * 997)
with open(path, "wb") as f:
    f.write(data)
with open(path, "rb") as f:
    back = f.read()
print(hashlib.sha256(back).hexdigest(), hashlib.sha256(data).hexdigest())
"""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(mount.path / f"w{i}"), str(i)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(8)
    ]
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        got, want = out.split()
        assert proc.returncode == 0 and got == want
    for i in range(8):
        data = hashlib.sha256(str(i).encode()).digest() * (40000 + i * 997)
        assert (
            hashlib.sha256((mount.path / f"w{i}").read_bytes()).digest()
            == hashlib.sha256(data).digest()
        )


def test_two_readers_different_offsets(mount: Mount) -> None:
    data = os.urandom(4 * 1024 * 1024)
    (mount.path / "big").write_bytes(data)
    with open(mount.path / "big", "rb") as r1, open(mount.path / "big", "rb") as r2:
        r1.seek(3_000_000)
        a = r1.read(100_000)
        b = r2.read(100_000)
        r2.seek(2_000_000)
        c = r2.read(50_000)
        d = r1.read(10)
    assert a == data[3_000_000:3_100_000]
    assert b == data[:100_000]
    assert c == data[2_000_000:2_050_000]
    assert d == data[3_100_000:3_100_010]


def test_unlinked_open_file_readable(mount: Mount) -> None:
    p = mount.path / "gone"
    p.write_bytes(b"x" * 500_000)
    with open(p, "rb") as f:
        os.unlink(p)
        assert not p.exists()
        assert f.read() == b"x" * 500_000


def cat(path: os.PathLike[str]) -> bytes:
    return subprocess.run(["cat", str(path)], capture_output=True, check=True).stdout


def test_reread_of_unchanged_file_comes_from_kernel_cache(
    s3_backend: Backend, mounter: MountFactory, moto_server: MotoServer
) -> None:
    old, new = os.urandom(600 * 1024), os.urandom(300 * 1024)
    s3_backend.put("pool/f", old)
    m = mounter(s3_backend)
    path = m.path / "f"
    assert cat(path) == old
    moto_server.reset_counts()
    assert cat(path) == old
    counts = moto_server.request_counts()
    assert "GetObject" not in counts, counts  # revalidated (a HEAD), bytes from the kernel
    # Replaced by another client: once the metadata TTL has passed, the new bytes are read.
    s3_backend.put("pool/f", new)
    time.sleep(1.2)
    assert cat(path) == new
    assert other_process_reads(path) == new
    # Written here: the next reader sees the written bytes, not the kernel's old pages.
    with open(path, "r+b") as f:
        f.write(b"local")
    assert cat(path) == b"local" + new[5:]
