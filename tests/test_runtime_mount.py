"""`execute` on real poolfs mounts: the guide's examples run with their pools mounted by
`poolfs mount` through `CliMounter`, from a store laid out as `<store>/<pool id>/`: a `file://`
directory and S3 (moto on 127.0.0.1).

Pools are seeded and checked in the store itself (plain files below the file store's
directory; objects in the bucket), so what a service wrote must be in the store once `execute`
has returned.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

from poolfs.datapool import DataPool
from poolfs.grants import GrantSecret, issue_grant, permission_mode, verify_grant
from poolfs.refs import DataPoolRef
from poolfs.runtime import CliMounter, Mode, MountError, execute
from tests.examples import ID1, ID2, ID3, examples_program

pytestmark = pytest.mark.fuse

APP = uuid.UUID("d1b2c3d4-e5f6-7890-1234-567890abcdef")
TENANT = "tenant-a"


class Pools:
    """Pools in one store (a local directory or S3 on moto) and a mount root; the fixture
    makes sure nothing is left mounted afterwards."""

    def __init__(self, root: Path, s3_endpoint: str | None = None) -> None:
        self.mount_root = root / "mnt"
        self.spill = root / "spill"
        self.mount_args = ["--spill-dir", str(self.spill)]
        self._s3: Any = None
        if s3_endpoint is None:
            self.store = root / "store"
            self.store.mkdir()
            self.url = f"file://{self.store}"
            return
        self._bucket = f"pools-{uuid.uuid4().hex[:12]}"
        self._s3 = boto3.client(
            "s3",
            endpoint_url=s3_endpoint,
            region_name=S3_ENV["AWS_DEFAULT_REGION"],
            aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"],
        )
        self._s3.create_bucket(Bucket=self._bucket)
        self.url = f"s3://{self._bucket}/pools"
        self.mount_args += ["--endpoint-url", s3_endpoint]

    def seed(self, pool_id: uuid.UUID, files: dict[str, bytes]) -> None:
        if self._s3 is not None:
            for key, data in files.items():
                self._s3.put_object(Bucket=self._bucket, Key=f"pools/{pool_id}/{key}", Body=data)
            return
        (self.store / str(pool_id)).mkdir(exist_ok=True)
        for key, data in files.items():
            path = self.store / str(pool_id) / key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)

    def read(self, pool_id: uuid.UUID, key: str) -> bytes | None:
        if self._s3 is not None:
            try:
                response = self._s3.get_object(Bucket=self._bucket, Key=f"pools/{pool_id}/{key}")
            except self._s3.exceptions.NoSuchKey:
                return None
            data: bytes = response["Body"].read()
            return data
        path = self.store / str(pool_id) / key
        return path.read_bytes() if path.is_file() else None

    def mounter(self, mode_for: Callable[[str, DataPoolRef], Mode]) -> CliMounter:
        return CliMounter(self.url, self.mount_root, mode_for, mount_args=self.mount_args)

    def mounted(self) -> list[str]:
        if not self.mount_root.exists():
            return []
        return [str(p) for p in self.mount_root.iterdir() if os.path.ismount(p)]


S3_ENV = {
    "AWS_ACCESS_KEY_ID": "runtime-test",
    "AWS_SECRET_ACCESS_KEY": "runtime-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(params=["file", "s3"])
def pools(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Pools]:
    if request.param == "s3":
        # The mount workers find the credentials through boto3's usual chain.
        for name, value in S3_ENV.items():
            monkeypatch.setenv(name, value)
        made = Pools(tmp_path, request.getfixturevalue("moto_endpoint"))
    else:
        made = Pools(tmp_path)
    yield made
    left = made.mounted()
    for mountpoint in left:
        subprocess.run(["fusermount", "-uz", mountpoint], check=False, capture_output=True)
    assert left == [], f"execute left mounts behind: {left}"


def ref(pool_id: uuid.UUID, grant: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"id": str(pool_id), "ref": "DATAPOOL"}
    if grant is not None:
        body["grant"] = grant
    return body


def test_read_file_example_on_a_read_only_mount(pools: Pools) -> None:
    pools.seed(ID1, {"hello.txt": b"Hello"})
    body = {"data": {"file_to_read": "hello.txt"}, "my_dataset": ref(ID1)}
    result = execute(examples_program("read_file").run, body, pools.mounter(lambda p, r: "ro"))
    assert json.loads(result) == "Hello"
    assert pools.mounted() == []
    assert list(pools.mount_root.iterdir()) == []


def test_concat_example_writes_through_the_output_mount(pools: Pools) -> None:
    pools.seed(ID1, {"hello.txt": b"Hello"})
    pools.seed(ID2, {"world.txt": b"World"})
    pools.seed(ID3, {})
    body = {
        "data": {
            "file_to_read_from_my_dataset": "hello.txt",
            "file_to_read_from_another_dataset": "world.txt",
        },
        "my_dataset": ref(ID1),
        "another_dataset": ref(ID2),
        "output_datapool": ref(ID3),
    }
    mounter = pools.mounter(lambda p, r: "rw" if p == "output_datapool" else "ro")
    result = execute(examples_program("concat").run, body, mounter)
    assert json.loads(result) == (
        "Content from my_dataset: Hello\nContent from another_dataset: World"
    )
    # Durable in the store by the time execute returns.
    assert pools.read(ID3, "concatenated_output.txt") == b"HelloWorld"
    assert pools.mounted() == []


def test_a_service_sees_the_pool_as_plain_files(pools: Pools) -> None:
    pools.seed(ID1, {"a.txt": b"a", "dir/b.bin": b"\x00" * 1000, "dir/sub/c.txt": b"c"})

    def run(pool: DataPool) -> dict[str, int]:
        return {name: os.path.getsize(path) for name, path in pool.list_files().items()}

    result = execute(run, {"pool": ref(ID1)}, pools.mounter(lambda p, r: "ro"))
    assert json.loads(result) == {"a.txt": 1, "dir/b.bin": 1000, "dir/sub/c.txt": 1}


def test_writing_to_a_read_only_pool_fails_and_everything_is_unmounted(pools: Pools) -> None:
    pools.seed(ID1, {"hello.txt": b"Hello"})

    def run(pool: DataPool) -> None:
        with pool.open("new.txt", "w") as f:
            f.write("nope")

    with pytest.raises(OSError, match="Read-only file system") as info:
        execute(run, {"pool": ref(ID1)}, pools.mounter(lambda p, r: "ro"))
    assert info.value.errno == errno.EROFS
    assert pools.read(ID1, "new.txt") is None
    assert pools.mounted() == []


def test_grants_decide_the_mount_mode(pools: Pools) -> None:
    pools.seed(ID1, {"hello.txt": b"Hello"})
    pools.seed(ID2, {})
    secret = GrantSecret.generate()

    def mode_for(param: str, ref: DataPoolRef) -> Mode:
        assert ref.grant is not None
        claims = verify_grant(
            secret, ref.grant, datapool_id=ref.id, application_id=APP, tenant_id=TENANT
        )
        return permission_mode(claims.permission)

    def run(source: DataPool, target: DataPool) -> list[str]:
        with source.open("hello.txt") as f:
            text = f.read()
        with target.open("copy.txt", "w") as f:
            f.write(text)
        try:
            with source.open("forbidden.txt", "w") as f:
                f.write("x")
        except OSError as exc:
            return [text, errno.errorcode[exc.errno or 0]]
        return [text, "source was writeable"]

    body = {
        "source": ref(ID1, issue_grant(secret, ID1, APP, TENANT, "VIEW")),
        "target": ref(ID2, issue_grant(secret, ID2, APP, TENANT, "MODIFY")),
    }
    result = execute(run, body, pools.mounter(mode_for))
    assert json.loads(result) == ["Hello", "EROFS"]
    assert pools.read(ID2, "copy.txt") == b"Hello"
    assert pools.read(ID1, "forbidden.txt") is None


def test_a_failed_mount_is_a_mount_error_with_the_cli_reason(tmp_path: Path) -> None:
    def run(pool: DataPool) -> None:
        raise AssertionError("not reached")

    mounter = CliMounter("file://relative/dir", tmp_path / "mnt", lambda p, r: "ro")
    with pytest.raises(MountError, match=r"'pool': mounting data pool .* failed: .*absolute"):
        execute(run, {"pool": ref(ID1)}, mounter)
    assert list((tmp_path / "mnt").iterdir()) == []
