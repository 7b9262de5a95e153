"""Uploads that start while a file is still written (README "Semantics", Writes), on real
mounts over S3 (moto, SeaweedFS): completed parts go to the store before close, the object
is exactly the bytes written whatever happened in between, and nothing is left behind."""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from poolfs.mounts import find_mount
from tests.conftest import Backend, MountFactory, _make_backend
from tests.mountrig import oserror
from tests.servers import MotoServer

pytestmark = pytest.mark.fuse

MiB = 1024 * 1024
# 8 MiB parts (FSConfig.part_size), 16 MiB multipart threshold (the S3 store's default).
PART = 8 * MiB
ATIME, MTIME = 1_500_000_000_123_456_789, 1_600_000_000_987_654_321


@pytest.fixture(params=["s3", pytest.param("seaweedfs", marks=pytest.mark.seaweedfs)])
def s3_any(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    return _make_backend(request.param, request, tmp_path)


@pytest.fixture
def moto(moto_server: MotoServer) -> Iterator[MotoServer]:
    """The moto server, with any injected failures removed and the server running after."""
    try:
        yield moto_server
    finally:
        moto_server.fail_requests({})
        moto_server.start()


def uploads(backend: Backend) -> list[str]:
    """Keys with a multipart upload in progress in the backend's bucket."""
    client, bucket = backend._client, backend._bucket
    return [u["Key"] for u in client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]


def wait_uploading(backend: Backend, key: str) -> None:
    """Wait until `key` (and only it) has a multipart upload in progress."""
    wait_for("an upload is in progress", lambda: uploads(backend) == [key])


def wait_for(what: str, check: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.02)


def write_all(fd: int, data: bytes, offset: int = 0, chunk: int = MiB) -> None:
    for start in range(0, len(data), chunk):
        os.pwrite(fd, data[start : start + chunk], offset + start)


def test_sequential_write_is_uploaded_before_close(s3_any: Backend, mounter: MountFactory) -> None:
    m = mounter(s3_any)
    data = os.urandom(5 * PART + 12345)
    s3_any.put("pool/big", b"previous")
    fd = os.open(m.path / "big", os.O_WRONLY | os.O_TRUNC)
    try:
        write_all(fd, data)
        # The upload is under way while the file is open, and the old object still shows.
        wait_uploading(s3_any, "pool/big")
        assert s3_any.get("pool/big") == b"previous"
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    assert s3_any.get("pool/big") == data
    assert uploads(s3_any) == []
    meta = s3_any.metadata("pool/big")
    assert meta["poolfs-mode"] == "600"  # changed after the upload began: stored at close
    m.remount()
    st = os.stat(m.path / "big")
    assert (st.st_size, st.st_mode & 0o777) == (len(data), 0o600)
    assert abs(st.st_mtime - time.time()) < 30
    assert (m.path / "big").read_bytes() == data


def test_parts_are_sent_before_close(
    s3_backend: Backend, mounter: MountFactory, moto: MotoServer
) -> None:
    m = mounter(s3_backend)
    data = os.urandom(6 * PART)
    fd = os.open(m.path / "f", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        moto.reset_counts()
        write_all(fd, data)
        wait_for("4 parts are stored", lambda: moto.request_counts().get("UploadPart", 0) >= 4)
        counts = moto.request_counts()
        assert counts.get("CreateMultipartUpload") == 1
        assert "CompleteMultipartUpload" not in counts
    finally:
        os.close(fd)
    counts = moto.request_counts()
    # Each part once, no whole-file upload at close, and no metadata copy afterwards (the
    # one PutObject is the parent directory's marker: its mtime moved).
    assert counts["UploadPart"] == 6
    assert counts["CompleteMultipartUpload"] == 1
    assert counts.get("PutObject", 0) == 1 and "CopyObject" not in counts
    assert s3_backend.get("pool/f") == data
    # mtime: the object's LastModified (whole seconds), the same on this mount and elsewhere.
    meta = s3_backend.metadata("pool/f")
    assert "poolfs-mtime" not in meta and meta["poolfs-mode"] == "644"
    last_modified = s3_backend._client.head_object(Bucket=s3_backend._bucket, Key="pool/f")[
        "LastModified"
    ].timestamp()
    assert os.stat(m.path / "f").st_mtime == last_modified
    m.remount()
    assert os.stat(m.path / "f").st_mtime == last_modified


def test_rewrite_of_a_sent_part_is_sent_again(
    s3_backend: Backend, mounter: MountFactory, moto: MotoServer
) -> None:
    m = mounter(s3_backend)
    data = bytearray(os.urandom(5 * PART))
    fd = os.open(m.path / "f", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        moto.reset_counts()
        write_all(fd, bytes(data))
        wait_for("part 1 is stored", lambda: moto.request_counts().get("UploadPart", 0) >= 2)
        os.pwrite(fd, b"rewritten", 100)
        data[100:109] = b"rewritten"
        assert os.pread(fd, 20, 95) == bytes(data[95:115])
    finally:
        os.close(fd)
    assert s3_backend.get("pool/f") == bytes(data)
    assert moto.request_counts()["UploadPart"] >= 6  # part 1 went twice
    assert uploads(s3_backend) == []


def test_truncate_after_parts_were_sent(s3_any: Backend, mounter: MountFactory) -> None:
    m = mounter(s3_any)
    data = os.urandom(5 * PART)
    tail = os.urandom(3 * MiB)
    fd = os.open(m.path / "f", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        write_all(fd, data)
        wait_uploading(s3_any, "pool/f")
        cut = 2 * PART + 5000  # inside part 3, which may be stored already
        os.ftruncate(fd, cut)
        write_all(fd, tail, cut)
    finally:
        os.close(fd)
    assert s3_any.get("pool/f") == data[:cut] + tail
    assert uploads(s3_any) == []


def test_file_ending_below_the_threshold_is_one_put(
    s3_backend: Backend, mounter: MountFactory, moto: MotoServer
) -> None:
    m = mounter(s3_backend)
    data = os.urandom(4 * PART)
    fd = os.open(m.path / "f", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        moto.reset_counts()
        write_all(fd, data)
        wait_for("a part is stored", lambda: moto.request_counts().get("UploadPart", 0) >= 1)
        os.ftruncate(fd, 3 * MiB)
    finally:
        os.close(fd)
    counts = moto.request_counts()
    # One PutObject for the file, one for the parent directory's marker (its mtime moved).
    assert counts["AbortMultipartUpload"] == 1 and counts["PutObject"] == 2
    assert "CompleteMultipartUpload" not in counts
    assert s3_backend.get("pool/f") == data[: 3 * MiB]
    assert uploads(s3_backend) == []
    assert "poolfs-mtime" in s3_backend.metadata("pool/f")  # a whole-file upload stores it


def test_append_and_random_writes(s3_any: Backend, mounter: MountFactory) -> None:
    m = mounter(s3_any)
    first = os.urandom(3 * PART)
    (m.path / "f").write_bytes(first)
    more = os.urandom(3 * PART)
    with open(m.path / "f", "ab") as f:
        for start in range(0, len(more), MiB):
            f.write(more[start : start + MiB])
            f.flush()
        wait_uploading(s3_any, "pool/f")
    assert s3_any.get("pool/f") == first + more
    # Writes out of order: the object is still exactly the bytes written.
    expected = bytearray(6 * PART)
    fd = os.open(m.path / "g", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        for start in [*range(2 * PART, 6 * PART, MiB), *range(0, 2 * PART, MiB)]:
            chunk = os.urandom(MiB)
            expected[start : start + MiB] = chunk
            os.pwrite(fd, chunk, start)
        os.pwrite(fd, b"again", PART + 7)
        expected[PART + 7 : PART + 12] = b"again"
    finally:
        os.close(fd)
    assert s3_any.get("pool/g") == bytes(expected)
    assert uploads(s3_any) == []


@pytest.mark.expect_log
def test_store_failing_mid_write_eio_at_close_bytes_kept(
    s3_backend: Backend, mounter: MountFactory, moto: MotoServer
) -> None:
    m = mounter(s3_backend, "--store-timeout", "4")
    m.expect_errors = True
    s3_backend.put("pool/f", b"old content")
    data = os.urandom(4 * PART)
    fd = os.open(m.path / "f", os.O_WRONLY | os.O_TRUNC)
    moto.reset_counts()
    moto.fail_requests({"UploadPart": 500})
    write_all(fd, data)
    wait_for("a part failed", lambda: moto.request_counts().get("UploadPart", 0) >= 1)
    started = time.monotonic()
    assert oserror(os.close, fd) == errno.EIO
    assert time.monotonic() - started < 30
    moto.fail_requests({})
    assert s3_backend.get("pool/f") == b"old content"
    assert uploads(s3_backend) == []
    kept = list((m.spill / "lost+found").iterdir())
    assert [p.read_bytes() for p in kept] == [data]
    assert str(kept[0]) in m.log()


def test_store_outage_mid_write_then_close_succeeds(
    s3_backend: Backend, mounter: MountFactory, moto: MotoServer
) -> None:
    m = mounter(s3_backend, "--store-timeout", "4")
    data = os.urandom(6 * PART)
    fd = os.open(m.path / "f", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        moto.reset_counts()
        write_all(fd, data[: 3 * PART])
        wait_for("a part is stored", lambda: moto.request_counts().get("UploadPart", 0) >= 1)
        moto.stop()
        write_all(fd, data[3 * PART :], 3 * PART)
        time.sleep(0.5)
        moto.start()
    finally:
        os.close(fd)
    assert s3_backend.get("pool/f") == data
    assert uploads(s3_backend) == []


def test_unlink_while_writing_leaves_nothing(s3_any: Backend, mounter: MountFactory) -> None:
    m = mounter(s3_any)
    data = os.urandom(4 * PART)
    fd = os.open(m.path / "f", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        write_all(fd, data)
        wait_uploading(s3_any, "pool/f")
        os.unlink(m.path / "f")
        wait_for("the upload is aborted", lambda: uploads(s3_any) == [])
        write_all(fd, b"more", len(data))
        assert os.pread(fd, 4, len(data)) == b"more"
    finally:
        os.close(fd)
    assert not (m.path / "f").exists()
    assert s3_any.get("pool/f") is None
    assert uploads(s3_any) == []


def test_rename_while_writing(s3_any: Backend, mounter: MountFactory) -> None:
    m = mounter(s3_any)
    data = os.urandom(4 * PART)
    fd = os.open(m.path / "a", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        write_all(fd, data[: 3 * PART])
        wait_uploading(s3_any, "pool/a")
        os.rename(m.path / "a", m.path / "b")
        write_all(fd, data[3 * PART :], 3 * PART)
    finally:
        os.close(fd)
    assert s3_any.get("pool/a") is None
    assert s3_any.get("pool/b") == data
    assert uploads(s3_any) == []


def test_explicit_mtime_while_writing_is_stored(s3_any: Backend, mounter: MountFactory) -> None:
    m = mounter(s3_any)
    data = os.urandom(3 * PART)
    fd = os.open(m.path / "f", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        write_all(fd, data)
        wait_uploading(s3_any, "pool/f")
        os.utime(fd, ns=(ATIME, MTIME))  # as cp -p does before its close
    finally:
        os.close(fd)
    assert s3_any.get("pool/f") == data
    assert s3_any.metadata("pool/f")["poolfs-mtime"] == str(MTIME)
    m.remount()
    st = os.stat(m.path / "f")
    assert (st.st_atime_ns, st.st_mtime_ns) == (ATIME, MTIME)


def test_sigterm_while_writing_stores_the_file(s3_any: Backend, mounter: MountFactory) -> None:
    m = mounter(s3_any)
    data = os.urandom(4 * PART + 99)
    fd = os.open(m.path / "f", os.O_CREAT | os.O_WRONLY, 0o644)
    write_all(fd, data)
    wait_uploading(s3_any, "pool/f")
    assert m.pid is not None
    os.kill(m.pid, 15)
    wait_for("the worker ended", lambda: not m.alive(), timeout=60)
    assert find_mount(str(m.path)) is None
    with contextlib.suppress(OSError):
        os.close(fd)
    m.pid = None
    assert s3_any.get("pool/f") == data
    assert uploads(s3_any) == []
    m.mount()
