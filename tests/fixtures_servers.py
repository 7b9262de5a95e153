"""pytest plugin: S3 test servers and per-test buckets (register with
`pytest_plugins = ["tests.fixtures_servers"]` in tests/conftest.py).

Fixtures:

- `aws_test_env` (session): AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_DEFAULT_REGION
  set in `os.environ` (so subprocesses such as mount workers inherit them), shared config files
  and profiles switched off, instance metadata lookups disabled; restored at session end.
- `moto_server` (session): a started `MotoServer`, on first use only. A test may stop or
  restart it; `moto_bucket` starts it again after such a test.
- `seaweed_server` (session): a started `SeaweedServer`, on first use only; always stopped at
  session end (its PID only).
- `moto_bucket`, `seaweed_bucket` (function): a fresh, empty bucket as `S3Bucket` (a named
  tuple `(store_url, endpoint_url, client)` plus `.name` and `.options()`); emptied and
  deleted afterwards. `moto_bucket` also resets the server's request counts.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

import pytest

from poolfs.stores import StoreOptions
from tests.servers import ACCESS_KEY, REGION, SECRET_KEY, MotoServer, SeaweedServer

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import ObjectIdentifierTypeDef

_seaweed_startup: list[float] = []


class S3Bucket(NamedTuple):
    """A test bucket: `store_url` is `s3://NAME` (append `/POOL/` for a pool prefix)."""

    store_url: str
    endpoint_url: str
    client: S3Client

    @property
    def name(self) -> str:
        return self.store_url.removeprefix("s3://")

    def options(self, **overrides: Any) -> StoreOptions:
        """StoreOptions pointing at this bucket's server."""
        return StoreOptions(endpoint_url=self.endpoint_url, **overrides)


def new_bucket_name() -> str:
    return f"t-{uuid.uuid4().hex[:16]}"


def empty_and_delete_bucket(client: S3Client, name: str) -> None:
    """Remove every object, pending multipart upload and the bucket itself."""
    with contextlib.suppress(client.exceptions.NoSuchBucket):
        uploads = client.list_multipart_uploads(Bucket=name).get("Uploads", [])
        for upload in uploads:
            client.abort_multipart_upload(
                Bucket=name, Key=upload["Key"], UploadId=upload["UploadId"]
            )
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
            keys: list[ObjectIdentifierTypeDef] = [
                {"Key": item["Key"]} for item in page.get("Contents", [])
            ]
            if keys:
                client.delete_objects(Bucket=name, Delete={"Objects": keys, "Quiet": True})
        client.delete_bucket(Bucket=name)


@pytest.fixture(scope="session")
def aws_test_env() -> Iterator[dict[str, str]]:
    values = {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": REGION,
        # Never pick up a developer's ~/.aws or an instance role: tests talk only to the
        # endpoints they were given, and IMDS lookups would add seconds when offline.
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    removed = (
        "AWS_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_SECURITY_TOKEN",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
        "AWS_REGION",
    )
    with pytest.MonkeyPatch.context() as patch:
        for name, value in values.items():
            patch.setenv(name, value)
        for name in removed:
            patch.delenv(name, raising=False)
        yield values


@pytest.fixture(scope="session")
def moto_server(aws_test_env: dict[str, str]) -> Iterator[MotoServer]:
    server = MotoServer()
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def seaweed_server(
    aws_test_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SeaweedServer]:
    server = SeaweedServer(tmp_path_factory.mktemp("seaweedfs"))
    try:
        server.start()
        if server.startup_seconds is not None:
            _seaweed_startup.append(server.startup_seconds)
        yield server
    finally:
        server.stop()


@pytest.fixture
def moto_bucket(moto_server: MotoServer) -> Iterator[S3Bucket]:
    name = new_bucket_name()
    moto_server.create_bucket(name)
    moto_server.reset_counts()
    try:
        yield S3Bucket(f"s3://{name}", moto_server.endpoint_url, moto_server.client())
    finally:
        # A test that simulated an outage must not break the tests after it.
        moto_server.start()
        empty_and_delete_bucket(moto_server.client(), name)


@pytest.fixture
def seaweed_bucket(seaweed_server: SeaweedServer) -> Iterator[S3Bucket]:
    name = new_bucket_name()
    seaweed_server.create_bucket(name)
    try:
        yield S3Bucket(f"s3://{name}", seaweed_server.endpoint_url, seaweed_server.client())
    finally:
        empty_and_delete_bucket(seaweed_server.client(), name)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for seconds in _seaweed_startup:
        terminalreporter.write_line(f"SeaweedFS started in {seconds:.2f} s")
