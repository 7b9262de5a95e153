"""Shared fixtures: store backends, real mounts, and the log check.

- `backend` runs a test against every store (mem, file, s3 on moto); `store_backend` only
  against the ones whose objects a test can inspect with the store's own API (file, s3).
- `mounter` makes real mounts through the CLI and always unmounts them.
- Unexpected ERROR/WARNING log records of the in-process core fail a test (s3ql's
  pytest_checklogs); tests that provoke them say so with `expect_log`.
- At the end of the session nothing may be left mounted under the test directories.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from poolfs.mounts import poolfs_mounts
from poolfs.stores.mem import MemStore
from tests.mountrig import Mount, run

pytest_plugins = (
    ["tests.fixtures_servers"]
    if __import__("importlib.util").util.find_spec("tests.fixtures_servers")
    else []
)


class Backend:
    """A fresh, empty pool in one kind of store, plus direct access to its objects."""

    def __init__(
        self,
        kind: str,
        url: str,
        mount_args: list[str],
        client: Any = None,
        bucket: str = "",
        root: Path | None = None,
        server: str = "",
    ) -> None:
        self.kind = kind
        # For s3: "moto" or "seaweedfs" (a real S3 server).
        self.server = server
        self.url = url
        self.mount_args = mount_args
        self._client = client
        self._bucket = bucket
        self._root = root

    @property
    def inspectable(self) -> bool:
        return self.kind != "mem"

    def put(self, key: str, data: bytes, metadata: Mapping[str, str] | None = None) -> None:
        if self.kind == "s3":
            self._client.put_object(
                Bucket=self._bucket, Key=key, Body=data, Metadata=dict(metadata or {})
            )
        elif self.kind == "file":
            assert self._root is not None
            path = self._root / key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        else:
            raise AssertionError("a mem store lives inside the mount worker")

    def get(self, key: str) -> bytes | None:
        if self.kind == "s3":
            try:
                body: bytes = self._client.get_object(Bucket=self._bucket, Key=key)["Body"].read()
            except self._client.exceptions.NoSuchKey:
                return None
            return body
        assert self.kind == "file" and self._root is not None
        path = self._root / key
        return path.read_bytes() if path.is_file() else None

    def metadata(self, key: str) -> dict[str, str]:
        if self.kind == "s3":
            meta: dict[str, str] = self._client.head_object(Bucket=self._bucket, Key=key)[
                "Metadata"
            ]
            return meta
        from poolfs.stores import open_store

        return dict(open_store(self.url).head(key).metadata or {})

    def keys(self) -> list[str]:
        if self.kind == "s3":
            pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self._bucket)
            return sorted(o["Key"] for p in pages for o in p.get("Contents", []))
        assert self._root is not None
        out = []
        for dirpath, _, files in os.walk(self._root):
            rel = os.path.relpath(dirpath, self._root)
            out.extend(f if rel == "." else f"{rel}/{f}" for f in files)
        return sorted(out)


def _make_backend(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if kind == "mem":
        return Backend("mem", f"mem://t{uuid.uuid4().hex[:12]}", [])
    if kind == "file":
        root = tmp_path / "store"
        root.mkdir()
        return Backend("file", f"file://{root}", [], root=root)
    server = request.getfixturevalue("moto_server" if kind == "s3" else "seaweed_server")
    bucket = f"b{uuid.uuid4().hex[:16]}"
    client = server.client()
    client.create_bucket(Bucket=bucket)
    return Backend(
        "s3",
        f"s3://{bucket}/pool",
        ["--endpoint-url", server.endpoint_url],
        client=client,
        bucket=bucket,
        server="moto" if kind == "s3" else "seaweedfs",
    )


_SEAWEED = pytest.param("seaweedfs", marks=pytest.mark.seaweedfs)


@pytest.fixture(params=["mem", "file", "s3", _SEAWEED])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    return _make_backend(request.param, request, tmp_path)


@pytest.fixture(params=["file", "s3", _SEAWEED])
def store_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    return _make_backend(request.param, request, tmp_path)


@pytest.fixture
def s3_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    return _make_backend("s3", request, tmp_path)


MountFactory = Callable[..., Mount]


@pytest.fixture
def mounter(tmp_path: Path) -> Iterator[MountFactory]:
    """`mounter(backend_or_url, *args)` mounts and returns a live Mount; all are unmounted."""
    made: list[Mount] = []

    def make(target: Backend | str, *args: str, name: str = "mnt") -> Mount:
        if isinstance(target, Backend):
            url, extra = target.url, [*target.mount_args, *args]
        else:
            url, extra = target, list(args)
        spill = tmp_path / f"spill-{name}"
        m = Mount(url, tmp_path / name, spill, extra)
        made.append(m)
        m.mount()
        return m

    yield make
    errors = []
    for m in made:
        try:
            if m.pid is not None:
                m.umount()
        except AssertionError as exc:
            errors.append(str(exc))
        finally:
            m.force_cleanup()
    if errors:
        pytest.fail("\n".join(errors))


@pytest.fixture
def mount(backend: Backend, mounter: MountFactory) -> Mount:
    return mounter(backend)


@pytest.fixture(autouse=True)
def _check_logs(request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    caplog.set_level(logging.WARNING, logger="poolfs")
    yield
    if request.node.get_closest_marker("expect_log"):
        return
    bad = [
        r
        for r in caplog.get_records("call")
        if r.name.startswith("poolfs") and r.levelno >= logging.WARNING
    ]
    if bad:
        pytest.fail("unexpected log records:\n" + "\n".join(r.getMessage() for r in bad))


@pytest.fixture(autouse=True)
def _forget_mem_stores() -> Iterator[None]:
    yield
    MemStore._registry.clear()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "expect_log: the test provokes poolfs warnings/errors")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    base = str(session.config._tmp_path_factory.getbasetemp())  # type: ignore[attr-defined]
    left = poolfs_mounts(base)
    for entry in left:
        run(["fusermount", "-uz", entry.mountpoint], check=False)
    if left:
        session.exitstatus = 1
        print("\nERROR: mounts left behind (now cleaned):", ", ".join(e.mountpoint for e in left))
