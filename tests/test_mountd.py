"""mountd end to end: the real daemon started as a subprocess on a Unix socket, real mounts,
real JWTs; stores: a file:// directory, S3 on moto, and SeaweedFS for the guide's workflow.

`Daemon` starts `python -m mountd serve` with its own settings file and a readiness socket
(NOTIFY_SOCKET, as systemd would), and always stops what it started: mountd by its PID
(SIGTERM, then SIGKILL), then any mount worker still running for its mount root (found by
mountd.workers.orphan_workers, ended by PID), then any poolfs mount left under the root.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
from openapi_spec_validator import validate

from mountd.workers import orphan_workers
from poolfs.catalog import Catalog, Role
from poolfs.cli import main as poolfs_main
from poolfs.datapool import DataPool
from poolfs.grants import GrantSecret, issue_grant, verify_grant
from poolfs.mounts import mounts, pid_alive, poolfs_mounts
from poolfs.refs import DATAPOOL_REF_SCHEMA
from poolfs.runtime import MountdMounter, MountError, execute
from poolfs.stores import NotFound, StoreOptions
from tests.fixtures_servers import empty_and_delete_bucket, new_bucket_name
from tests.mountrig import run
from tests.servers import MotoServer, SeaweedServer, free_port

REPO = Path(__file__).resolve().parent.parent
APP = uuid.UUID("d1b2c3d4-e5f6-7890-1234-567890abcdef")
OTHER_APP = uuid.UUID("f1b2c3d4-e5f6-7890-1234-567890abcdef")


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


class Daemon:
    """One mountd process of a test (see the module docstring)."""

    def __init__(
        self,
        workdir: Path,
        store_url: str,
        *,
        endpoint_url: str | None = None,
        settings: dict[str, Any] | None = None,
    ) -> None:
        self.workdir = workdir
        self.store_url = store_url
        self.endpoint_url = endpoint_url
        # Unix socket paths are limited to 107 bytes; pytest's tmp paths can be longer.
        self.sockdir = Path(tempfile.mkdtemp(prefix="mountd-", dir="/tmp"))
        self.socket_path = self.sockdir / "api.sock"
        self.notify_path = self.sockdir / "notify.sock"
        self.mount_root = workdir / "mnt"
        self.spill = workdir / "spill"
        self.config_file = workdir / "mountd.toml"
        self.log_file = workdir / "mountd.log"
        secret_file = workdir / "grant-secret"
        secret_file.write_bytes(base64.b64encode(os.urandom(48)) + b"\n")
        secret_file.chmod(0o600)
        self.secret = GrantSecret.from_file(secret_file)
        values: dict[str, Any] = {
            "socket_path": self.socket_path,
            "mount_root": self.mount_root,
            "store_url": store_url,
            "spill_dir": self.spill,
            "grant_secret_file": secret_file,
            "log_level": "DEBUG",
        }
        if endpoint_url:
            values["s3_endpoint_url"] = endpoint_url
        values.update(settings or {})
        self.config_file.write_text("".join(f"{k} = {_toml(v)}\n" for k, v in values.items()))
        self.process: subprocess.Popen[bytes] | None = None
        self.notifications: list[str] = []
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._notify.bind(str(self.notify_path))
        self._catalog: Catalog | None = None
        _DAEMONS.append(self)

    # --- process -----------------------------------------------------------------------------

    def start(self, timeout: float = 60) -> None:
        """Start mountd and wait for its READY=1 (the previous run's messages are dropped)."""
        self.drain_notifications()
        self.notifications = []
        env = dict(os.environ, NOTIFY_SOCKET=str(self.notify_path))
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "mountd", "serve", "--config", str(self.config_file)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.workdir,
            )
        deadline = time.monotonic() + timeout
        self._notify.settimeout(0.2)
        while not any("READY=1" in n.splitlines() for n in self.notifications):
            if self.process.poll() is not None:
                raise AssertionError(f"mountd exited ({self.process.returncode}):\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"mountd not ready after {timeout} s:\n{self.log()}")
            with contextlib.suppress(TimeoutError):
                self.notifications.append(self._notify.recv(4096).decode())

    def drain_notifications(self) -> list[str]:
        self._notify.settimeout(0.2)
        with contextlib.suppress(TimeoutError):
            while True:
                self.notifications.append(self._notify.recv(4096).decode())
        return self.notifications

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stop(self, timeout: float = 120) -> int:
        """SIGTERM (flush and unmount everything), wait; the exit code."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout)
        self.process = None
        return code

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()
        self.process = None

    def cleanup(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        pids = orphan_workers(str(self.mount_root))
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not any(pid_alive(p) for p in pids), 30, "workers to die")
        for entry in poolfs_mounts(str(self.mount_root)):
            run(["fusermount", "-uz", entry.mountpoint], check=False)
        if self._catalog is not None:
            self._catalog.close()
        self._notify.close()
        with contextlib.suppress(OSError):
            for name in os.listdir(self.sockdir):
                os.unlink(self.sockdir / name)
            os.rmdir(self.sockdir)

    def log(self, offset: int = 0) -> str:
        try:
            with open(self.log_file, errors="replace") as f:
                f.seek(offset)
                return f.read()
        except OSError:
            return ""

    def log_size(self) -> int:
        try:
            return self.log_file.stat().st_size
        except OSError:
            return 0

    # --- API and store -----------------------------------------------------------------------

    def client(self) -> httpx.Client:
        return httpx.Client(
            transport=httpx.HTTPTransport(uds=str(self.socket_path)),
            base_url="http://mountd",
            timeout=180,
        )

    @property
    def catalog(self) -> Catalog:
        if self._catalog is None:
            self._catalog = Catalog.open(
                self.store_url, StoreOptions(endpoint_url=self.endpoint_url)
            )
        return self._catalog

    def pool(
        self,
        owner: str = "tenant-a",
        files: dict[str, bytes] | None = None,
        shares: dict[str, Role] | None = None,
    ) -> uuid.UUID:
        record = self.catalog.create("test pool", owner)
        store = self.catalog.pool_store(record.id)
        for key, data in (files or {}).items():
            store.put_bytes(key, data, {})
        for tenant, role in (shares or {}).items():
            self.catalog.share(record.id, tenant, role)
        return record.id

    def read(self, pool_id: uuid.UUID, key: str) -> bytes | None:
        try:
            data, _ = self.catalog.pool_store(pool_id).get_range(key, 0, None)
        except NotFound:
            return None
        return data

    def grant(
        self, pool_id: uuid.UUID, tenant: str = "tenant-a", permission: str = "VIEW", **kw: Any
    ) -> str:
        return issue_grant(
            self.secret, pool_id, kw.get("app", APP), tenant, permission, kw.get("now")
        )

    def mounted(self) -> list[str]:
        """Everything mounted under the mount root (any filesystem type)."""
        root = str(self.mount_root) + "/"
        return [e.mountpoint for e in mounts() if (e.mountpoint + "/").startswith(root)]

    def assert_clean(self) -> None:
        assert self.mounted() == []
        leftovers = os.listdir(self.mount_root) if self.mount_root.exists() else []
        assert leftovers == [], f"left under the mount root: {leftovers}"


_DAEMONS: list[Daemon] = []


@pytest.fixture(autouse=True)
def _daemon_logs_are_clean(request: pytest.FixtureRequest) -> Iterator[None]:
    """mountd's WARNING and ERROR lines fail the test that caused them, unless it is marked
    `expect_log` (the same rule conftest applies to the in-process poolfs loggers)."""
    offsets = {id(d): d.log_size() for d in _DAEMONS}
    yield
    if request.node.get_closest_marker("expect_log"):
        return
    bad = [
        line
        for daemon in _DAEMONS
        for line in daemon.log(offsets.get(id(daemon), 0)).splitlines()
        if " WARNING " in line or " ERROR " in line or " CRITICAL " in line or "Traceback" in line
    ]
    if bad:
        pytest.fail("unexpected mountd log lines:\n" + "\n".join(bad[:20]))


def ref(pool_id: uuid.UUID, grant: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"id": str(pool_id), "ref": "DATAPOOL"}
    if grant is not None:
        body["grant"] = grant
    return body


def post_execution(
    client: httpx.Client,
    body: dict[str, Any],
    *,
    creator: str = "tenant-a",
    app: uuid.UUID = APP,
    execution_id: str | None = None,
) -> httpx.Response:
    return client.post(
        "/executions",
        json={
            "executionId": execution_id or f"exec-{uuid.uuid4().hex[:12]}",
            "applicationId": str(app),
            "creatorTenantId": creator,
            "body": body,
        },
    )


def metric(client: httpx.Client, line_prefix: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(line_prefix + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@contextlib.contextmanager
def daemon_on(workdir: Path, store_url: str, **kw: Any) -> Iterator[Daemon]:
    daemon = Daemon(workdir, store_url, **kw)
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.cleanup()


@pytest.fixture(scope="module")
def file_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    workdir = tmp_path_factory.mktemp("mountd-file")
    with daemon_on(workdir, f"file://{workdir / 'store'}") as daemon:
        yield daemon


@pytest.fixture(scope="module")
def moto_daemon(
    moto_server: MotoServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Daemon]:
    bucket = new_bucket_name()
    moto_server.create_bucket(bucket)
    workdir = tmp_path_factory.mktemp("mountd-moto")
    try:
        # A short store timeout: the upload-failure test stops the server.
        with daemon_on(
            workdir,
            f"s3://{bucket}",
            endpoint_url=moto_server.endpoint_url,
            settings={"store_timeout": 4.0},
        ) as daemon:
            yield daemon
    finally:
        moto_server.start()
        empty_and_delete_bucket(moto_server.client(), bucket)


@pytest.fixture(params=["file", "moto"])
def daemon(request: pytest.FixtureRequest) -> Daemon:
    return request.getfixturevalue(f"{request.param}_daemon")  # type: ignore[no-any-return]


@pytest.fixture
def client(file_daemon: Daemon) -> Iterator[httpx.Client]:
    with file_daemon.client() as c:
        yield c


# ============================================================================ the API itself


def test_socket_mode_and_readiness(file_daemon: Daemon) -> None:
    assert file_daemon.socket_path.stat().st_mode & 0o777 == 0o660
    ready = next(n for n in file_daemon.notifications if "READY=1" in n.splitlines())
    assert f"STATUS=serving on {file_daemon.socket_path}" in ready


def test_the_secret_is_not_on_the_command_line_nor_in_the_log(file_daemon: Daemon) -> None:
    with open(f"/proc/{file_daemon.pid}/cmdline", "rb") as f:
        cmdline = f.read()
    key = file_daemon.secret._key()
    assert key not in cmdline
    assert key.decode() not in file_daemon.log()


def test_openapi_document(client: httpx.Client) -> None:
    document = client.get("/openapi.json").json()
    validate(document)
    assert client.get("/docs").status_code == 404  # no browser UI pulling scripts from a CDN
    paths = document["paths"]
    assert set(paths) == {
        "/datapools/{datapool_id}/grants",
        "/executions",
        "/executions/{execution_id}",
        "/healthz",
        "/metrics",
    }
    assert set(paths["/executions"]) == {"get", "post"}
    assert set(paths["/executions/{execution_id}"]) == {"get", "delete"}
    grants = paths["/datapools/{datapool_id}/grants"]["post"]
    assert {"200", "400", "403", "404"} <= set(grants["responses"])
    for operations in paths.values():
        for operation in operations.values():
            assert "422" not in operation["responses"]
    schemas = document["components"]["schemas"]
    assert set(schemas["GrantRequest"]["required"]) == {"applicationId", "permission"}
    assert schemas["Permission"]["enum"] == ["VIEW", "MODIFY"]
    body = schemas["ExecutionRequest"]["properties"]["body"]
    assert body["additionalProperties"] == DATAPOOL_REF_SCHEMA
    assert set(schemas["ExecutionRequest"]["required"]) == {
        "executionId",
        "applicationId",
        "creatorTenantId",
        "body",
    }
    # The socket needs no token: security lists "none" as an alternative.
    assert paths["/executions"]["post"]["security"][0] == {}
    header = paths["/executions"]["post"]["parameters"][0]
    assert header["name"] == "X-Poolfs-Tenant" and header["in"] == "header"


def test_healthz_and_metrics(client: httpx.Client) -> None:
    health = client.get("/healthz").json()
    assert health["status"] == "ok"
    response = client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    families = {line.split()[2] for line in response.text.splitlines() if line.startswith("# TYPE")}
    for name in ("mounts", "executions", "worker_io_bytes_total", "errors_total"):
        assert f"poolfs_mountd_{name}" in families
    for line in response.text.splitlines():
        if not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            assert name.startswith("poolfs_mountd_")
            float(value)


@pytest.mark.parametrize(
    ("tenant", "permission", "status", "reason"),
    [
        ("tenant-a", "VIEW", 200, None),
        ("tenant-a", "MODIFY", 200, None),
        ("viewer", "VIEW", 200, None),
        ("viewer", "MODIFY", 403, "insufficient_role"),
        ("maintainer", "MODIFY", 200, None),
        ("stranger", "VIEW", 403, "insufficient_role"),
    ],
)
def test_grant_creation_follows_roles(
    file_daemon: Daemon,
    client: httpx.Client,
    tenant: str,
    permission: str,
    status: int,
    reason: str | None,
) -> None:
    pool = file_daemon.pool(shares={"viewer": Role.VIEWER, "maintainer": Role.MAINTAINER})
    response = client.post(
        f"/datapools/{pool}/grants",
        json={"applicationId": str(APP), "permission": permission},
        headers={"X-Poolfs-Tenant": tenant},
    )
    assert response.status_code == status, response.text
    if status == 200:
        claims = verify_grant(
            file_daemon.secret,
            response.json()["token"],
            datapool_id=pool,
            application_id=APP,
            tenant_id=tenant,
        )
        assert claims.permission.value == permission
    else:
        assert response.json()["reason"] == reason


def test_grant_request_errors(file_daemon: Daemon, client: httpx.Client) -> None:
    pool = file_daemon.pool()
    tenant = {"X-Poolfs-Tenant": "tenant-a"}
    response = client.post(
        f"/datapools/{pool}/grants",
        json={"applicationId": str(APP), "permission": "ADMIN"},
        headers=tenant,
    )
    assert response.status_code == 400
    assert response.json()["problems"][0]["location"] == "body.permission"
    response = client.post(
        f"/datapools/{uuid.uuid4()}/grants",
        json={"applicationId": str(APP), "permission": "VIEW"},
        headers=tenant,
    )
    assert response.status_code == 404
    response = client.post(
        "/datapools/not-a-uuid/grants",
        json={"applicationId": str(APP), "permission": "VIEW"},
        headers=tenant,
    )
    assert response.status_code == 404
    response = client.post(
        f"/datapools/{pool}/grants", json={"applicationId": str(APP), "permission": "VIEW"}
    )
    assert response.status_code == 401
    assert "X-Poolfs-Tenant" in response.json()["detail"]


@pytest.mark.parametrize(
    ("request_body", "location"),
    [
        ({"my_dataset": {"id": "nope", "ref": "DATAPOOL"}}, "body.my_dataset.id"),
        ({"my_dataset": {"id": str(APP), "ref": "VOLUME"}}, "body.my_dataset.ref"),
        ({"my_dataset": {"id": str(APP), "ref": "DATAPOOL", "x": 1}}, "body.my_dataset.x"),
        ({"my_dataset": "a1b2"}, "body.my_dataset"),
        ({"my_dataset": {"id": str(APP), "ref": "DATAPOOL", "grant": 5}}, "body.my_dataset.grant"),
        ({"not-an-identifier": {"id": str(APP), "ref": "DATAPOOL"}}, "body.not-an-identifier"),
    ],
)
def test_malformed_execution_bodies_are_400(
    file_daemon: Daemon, client: httpx.Client, request_body: dict[str, Any], location: str
) -> None:
    response = post_execution(client, request_body)
    assert response.status_code == 400, response.text
    assert location in [p["location"] for p in response.json()["problems"]]
    file_daemon.assert_clean()


def test_malformed_execution_requests_are_400(client: httpx.Client) -> None:
    for bad in (
        {"executionId": "../escape", "applicationId": str(APP), "creatorTenantId": "t", "body": {}},
        {"executionId": "e", "applicationId": "x", "creatorTenantId": "t", "body": {}},
        {"executionId": "e", "applicationId": str(APP), "creatorTenantId": "a/b", "body": {}},
        {"executionId": "e", "applicationId": str(APP), "body": {}},
    ):
        response = client.post("/executions", json=bad)
        assert response.status_code == 400, bad
        assert response.json()["problems"]


def test_unknown_pool_is_404_and_no_role_is_403(file_daemon: Daemon, client: httpx.Client) -> None:
    known = file_daemon.pool(owner="tenant-a")
    response = post_execution(client, {"a": ref(known), "b": ref(uuid.uuid4())})
    assert response.status_code == 404
    assert response.json()["param"] == "b"
    response = post_execution(client, {"a": ref(known)}, creator="tenant-z")
    assert response.status_code == 403
    assert response.json()["reason"] == "no_role"
    assert "tenant-z" in response.json()["detail"]
    file_daemon.assert_clean()
    assert client.get("/executions/nope").status_code == 404
    assert client.delete("/executions/nope").status_code == 404


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("expired", "expired"),
        ("tampered", "tampered"),
        ("wrong_pool", "pool_mismatch"),
        ("wrong_application", "application_mismatch"),
        ("wrong_tenant", "tenant_mismatch"),
        ("foreign_secret", "bad_signature"),
    ],
)
def test_rejected_grants_are_403_and_mount_nothing(
    file_daemon: Daemon, client: httpx.Client, case: str, reason: str
) -> None:
    # The creator has no role: only a valid grant could let it in.
    pool = file_daemon.pool(owner="tenant-a")
    good = file_daemon.pool(owner="tenant-b")
    grant = {
        "expired": lambda: file_daemon.grant(
            pool,
            "tenant-b",
            now=datetime.now(UTC) - timedelta(minutes=16),
        ),
        "tampered": lambda: _tamper(file_daemon.grant(pool, "tenant-b")),
        "wrong_pool": lambda: file_daemon.grant(good, "tenant-b"),
        "wrong_application": lambda: file_daemon.grant(pool, "tenant-b", app=OTHER_APP),
        "wrong_tenant": lambda: file_daemon.grant(pool, "tenant-a"),
        "foreign_secret": lambda: issue_grant(
            GrantSecret(b"x" * 32), pool, APP, "tenant-b", "VIEW"
        ),
    }[case]()
    # A good reference first: the whole execution is refused, that one included.
    response = post_execution(
        client, {"mine": ref(good), "theirs": ref(pool, grant)}, creator="tenant-b"
    )
    assert response.status_code == 403, response.text
    assert response.json()["reason"] == reason
    assert response.json()["param"] == "theirs"
    assert grant not in response.text
    file_daemon.assert_clean()
    assert metric(client, f'poolfs_mountd_access_denied_total{{reason="{reason}"}}') >= 1


def _tamper(token: str) -> str:
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["permission"] = "MODIFY"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{header}.{forged}.{signature}"


def test_tcp_listener_needs_bearer_tokens(tmp_path: Path) -> None:
    port = free_port()
    tenant_token, trusted_token = "token-of-tenant-b", "token-of-the-platform"
    tokens = tmp_path / "tokens"
    tokens.write_text(
        f"tenant-b sha256:{_sha256(tenant_token)}\n* sha256:{_sha256(trusted_token)}\n"
    )
    with daemon_on(
        tmp_path,
        f"file://{tmp_path / 'store'}",
        settings={"tcp_listen": f"127.0.0.1:{port}", "tcp_tokens_file": tokens},
    ) as daemon:
        pool = daemon.pool(owner="tenant-a", shares={"tenant-b": Role.VIEWER})
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as tcp:
            assert tcp.get("/healthz").status_code == 200
            assert tcp.get("/executions").status_code == 401
            assert tcp.get("/metrics").status_code == 401
            bad = tcp.get("/executions", headers={"Authorization": "Bearer wrong"})
            assert bad.status_code == 401
            assert bad.headers["www-authenticate"] == "Bearer"
            as_b = {"Authorization": f"Bearer {tenant_token}"}
            grant = tcp.post(
                f"/datapools/{pool}/grants",
                json={"applicationId": str(APP), "permission": "VIEW"},
                headers=as_b,
            )
            assert grant.status_code == 200
            verify_grant(
                daemon.secret,
                grant.json()["token"],
                datapool_id=pool,
                application_id=APP,
                tenant_id="tenant-b",
            )
            # A tenant token may not act for another tenant.
            response = post_execution(tcp, {}, creator="tenant-a", execution_id="x1")
            assert response.status_code == 401  # no token on that request
            response = tcp.post(
                "/executions",
                json={
                    "executionId": "x1",
                    "applicationId": str(APP),
                    "creatorTenantId": "tenant-a",
                    "body": {},
                },
                headers=as_b,
            )
            assert response.status_code == 403
            assert response.json()["reason"] == "not_creator"
            spoof = tcp.get("/executions", headers={**as_b, "X-Poolfs-Tenant": "tenant-a"})
            assert spoof.status_code == 403
            # The platform's trusted token acts for the tenant its header names.
            trusted = {"Authorization": f"Bearer {trusted_token}", "X-Poolfs-Tenant": "tenant-a"}
            grant = tcp.post(
                f"/datapools/{pool}/grants",
                json={"applicationId": str(APP), "permission": "MODIFY"},
                headers=trusted,
            )
            assert grant.status_code == 200
            assert tcp.get("/metrics", headers=as_b).status_code == 200


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# ============================================================================ real mounts


@pytest.mark.fuse
def test_view_grant_gives_a_read_only_mount(daemon: Daemon) -> None:
    pool = daemon.pool(owner="tenant-a", files={"hello.txt": b"Hello", "dir/n.csv": b"1,2\n"})
    with daemon.client() as client:
        token = client.post(
            f"/datapools/{pool}/grants",
            json={"applicationId": str(APP), "permission": "VIEW"},
            headers={"X-Poolfs-Tenant": "tenant-a"},
        ).json()["token"]
        response = post_execution(client, {"data": {}, "ds": ref(pool, token)})
        assert response.status_code == 201, response.text
        info = response.json()
        mount = info["mounts"]["ds"]
        assert (mount["mode"], mount["access"], mount["state"]) == ("ro", "grant", "mounted")
        path = mount["path"]
        assert path == str(daemon.mount_root / info["executionId"] / "ds")
        assert run(["ls", path]).stdout.split() == ["dir", "hello.txt"]
        assert run(["cat", f"{path}/hello.txt", f"{path}/dir/n.csv"]).stdout == "Hello1,2\n"
        assert "ro" in run(["findmnt", "-no", "OPTIONS", path]).stdout.split(",")
        for command in (f"touch {path}/new", f"mkdir {path}/d", f"rm {path}/hello.txt"):
            proc = run(command, check=False)
            assert proc.returncode != 0 and "Read-only file system" in proc.stderr, command
        with pytest.raises(OSError) as err:
            open(f"{path}/hello.txt", "a").close()
        assert err.value.errno == errno.EROFS
        deleted = client.delete(f"/executions/{info['executionId']}").json()
        assert deleted["state"] == "unmounted" and not deleted["failed"]
        daemon.assert_clean()


@pytest.mark.fuse
def test_modify_grant_writes_land_in_the_store(daemon: Daemon) -> None:
    pool = daemon.pool(owner="tenant-a", files={"old.txt": b"old"})
    token = daemon.grant(pool, "tenant-b", "MODIFY")
    with daemon.client() as client:
        response = post_execution(client, {"out": ref(pool, token)}, creator="tenant-b")
        assert response.status_code == 201, response.text
        info = response.json()
        path = Path(info["mounts"]["out"]["path"])
        assert info["mounts"]["out"]["mode"] == "rw"
        (path / "result.txt").write_bytes(b"written through mountd")
        # close() returned: the object is durable in the store.
        assert daemon.read(pool, "result.txt") == b"written through mountd"
        run(f"cp {path}/old.txt {path}/copy.txt && mkdir {path}/sub && echo x > {path}/sub/y")
        live = metric(client, 'poolfs_mountd_worker_io_bytes_total{direction="read"}')
        assert live > len(b"written through mountd")  # the FUSE requests carried the bytes
        assert client.delete(f"/executions/{info['executionId']}").json()["failed"] is False
        # A worker's bytes stay counted after it is gone (its final counters).
        assert metric(client, 'poolfs_mountd_worker_io_bytes_total{direction="read"}') >= live
    assert daemon.read(pool, "copy.txt") == b"old"
    assert daemon.read(pool, "sub/y") == b"x\n"
    daemon.assert_clean()


@pytest.mark.fuse
def test_without_a_grant_the_creator_role_decides(file_daemon: Daemon) -> None:
    viewer = file_daemon.pool(owner="tenant-a", shares={"tenant-c": Role.VIEWER})
    maintainer = file_daemon.pool(owner="tenant-a", shares={"tenant-c": Role.MAINTAINER})
    owner = file_daemon.pool(owner="tenant-c")
    with file_daemon.client() as client:
        response = post_execution(
            client,
            {"v": ref(viewer), "m": ref(maintainer), "o": ref(owner)},
            creator="tenant-c",
        )
        assert response.status_code == 201, response.text
        info = response.json()
        modes = {p: (m["mode"], m["access"]) for p, m in info["mounts"].items()}
        assert modes == {"v": ("ro", "role"), "m": ("rw", "role"), "o": ("rw", "role")}
        assert run(f"touch {info['mounts']['v']['path']}/x", check=False).returncode != 0
        run(f"touch {info['mounts']['m']['path']}/x {info['mounts']['o']['path']}/x")
        assert len(client.get("/executions").json()["executions"]) >= 1
        assert metric(client, 'poolfs_mountd_mounts{mode="rw"}') >= 2
        client.delete(f"/executions/{info['executionId']}")
    assert file_daemon.read(maintainer, "x") == b""
    file_daemon.assert_clean()


@pytest.mark.fuse
def test_delete_flushes_unmounts_and_is_idempotent(file_daemon: Daemon) -> None:
    pool = file_daemon.pool()
    with file_daemon.client() as client:
        info = post_execution(client, {"p": ref(pool)}, execution_id="del-1").json()
        path = info["mounts"]["p"]["path"]
        assert path in file_daemon.mounted()
        assert post_execution(client, {"p": ref(pool)}, execution_id="del-1").status_code == 409
        # A file still open at DELETE time is uploaded before the unmount completes.
        handle = open(f"{path}/open.txt", "w")  # noqa: SIM115 - open across the DELETE
        try:
            handle.write("pending")
            handle.flush()
            done = client.delete("/executions/del-1").json()
        finally:
            # Its mount is gone: closing it now reports ENOTCONN, and that is expected.
            with contextlib.suppress(OSError):
                handle.close()
        assert done["state"] == "unmounted" and done["endReason"] == "deleted"
        assert done["mounts"]["p"]["exitCode"] == 0
        assert path not in [e.mountpoint for e in mounts()]
        file_daemon.assert_clean()
        assert file_daemon.read(pool, "open.txt") == b"pending"
        assert client.delete("/executions/del-1").json() == done
        assert client.get("/executions/del-1").json()["state"] == "unmounted"
        # The id of an unmounted execution stays taken while it is listed.
        assert post_execution(client, {"p": ref(pool)}, execution_id="del-1").status_code == 409


@pytest.mark.fuse
@pytest.mark.expect_log
def test_all_or_nothing_when_a_mount_fails(file_daemon: Daemon) -> None:
    good = file_daemon.pool()
    broken = file_daemon.pool()
    root = Path(file_daemon.store_url.removeprefix("file://")) / str(broken)
    root.rmdir()  # the pool's directory vanished from the store: its worker cannot mount
    with file_daemon.client() as client:
        response = post_execution(
            client, {"good": ref(good), "broken": ref(broken)}, execution_id="aon"
        )
        assert response.status_code == 500, response.text
        assert response.json()["param"] == "broken"
        assert "does not exist" in response.json()["detail"]
        file_daemon.assert_clean()
        assert client.get("/executions/aon").status_code == 404
        root.mkdir()
        response = post_execution(
            client, {"good": ref(good), "broken": ref(broken)}, execution_id="aon"
        )
        assert response.status_code == 201
        client.delete("/executions/aon")
    file_daemon.assert_clean()


@pytest.mark.fuse
@pytest.mark.expect_log
def test_a_worker_killed_with_sigkill_is_noticed_and_cleaned(daemon: Daemon) -> None:
    pool = daemon.pool(files={"f.txt": b"data"})
    with daemon.client() as client:
        info = post_execution(client, {"a": ref(pool), "b": ref(pool)}).json()
        execution = info["executionId"]
        victim = info["mounts"]["a"]
        os.kill(victim["workerPid"], signal.SIGKILL)

        def died() -> bool:
            return bool(
                client.get(f"/executions/{execution}").json()["mounts"]["a"]["state"] == "died"
            )

        wait_for(died, 10, "mountd to notice the dead worker")
        now = client.get(f"/executions/{execution}").json()
        assert now["failed"] is True
        assert "died (killed by SIGKILL)" in now["errors"][0]
        assert now["mounts"]["a"]["exitCode"] == -signal.SIGKILL
        # Detached and removed: ENOENT, never "Transport endpoint is not connected".
        with pytest.raises(FileNotFoundError):
            os.stat(victim["path"])
        assert daemon.mounted() == [now["mounts"]["b"]["path"]]
        assert run(["cat", f"{now['mounts']['b']['path']}/f.txt"]).stdout == "data"
        assert metric(client, 'poolfs_mountd_errors_total{kind="worker_died"}') >= 1
        done = client.delete(f"/executions/{execution}").json()
        assert done["state"] == "unmounted" and done["failed"] is True
    daemon.assert_clean()


@pytest.mark.fuse
@pytest.mark.expect_log
def test_upload_failures_are_reported_by_delete(
    moto_daemon: Daemon, moto_server: MotoServer
) -> None:
    pool = moto_daemon.pool()
    with moto_daemon.client() as client:
        info = post_execution(client, {"out": ref(pool)}).json()
        path = info["mounts"]["out"]["path"]
        handle = open(f"{path}/unsaved.txt", "w")  # noqa: SIM115 - must stay open past DELETE
        try:
            handle.write("not yet uploaded")
            handle.flush()
            moto_server.stop()
            try:
                done = client.delete(f"/executions/{info['executionId']}").json()
            finally:
                moto_server.start()
        finally:
            with contextlib.suppress(OSError):
                handle.close()
    assert done["state"] == "unmounted"
    assert done["failed"] is True
    assert done["mounts"]["out"]["exitCode"] == 2
    text = "\n".join(done["errors"])
    assert "pending uploads failed" in text
    assert "the upload of '/unsaved.txt' failed" in text
    kept = list((moto_daemon.spill / "lost+found").iterdir())
    assert any(p.read_bytes() == b"not yet uploaded" for p in kept)
    moto_daemon.assert_clean()


@pytest.mark.fuse
def test_mounts_past_the_maximum_lifetime_are_unmounted(tmp_path: Path) -> None:
    with daemon_on(
        tmp_path, f"file://{tmp_path / 'store'}", settings={"max_mount_lifetime": 2.0}
    ) as daemon:
        pool = daemon.pool()
        with daemon.client() as client:
            info = post_execution(client, {"p": ref(pool)}).json()
            Path(info["mounts"]["p"]["path"], "kept.txt").write_text("kept")

            def expired() -> bool:
                return bool(
                    client.get(f"/executions/{info['executionId']}").json()["state"] == "unmounted"
                )

            wait_for(expired, 15, "the execution to expire")
            final = client.get(f"/executions/{info['executionId']}").json()
            assert final["endReason"] == "expired" and not final["failed"]
            assert metric(client, 'poolfs_mountd_unmounts_total{reason="expired"}') == 1
        daemon.assert_clean()
        assert daemon.read(pool, "kept.txt") == b"kept"


@pytest.mark.fuse
def test_sigterm_flushes_and_unmounts_everything(tmp_path: Path) -> None:
    with daemon_on(tmp_path, f"file://{tmp_path / 'store'}") as daemon:
        pool = daemon.pool()
        with daemon.client() as client:
            info = post_execution(client, {"p": ref(pool), "q": ref(pool)}).json()
        path = info["mounts"]["p"]["path"]
        handle = open(f"{path}/at-shutdown.txt", "w")  # noqa: SIM115 - open across the stop
        try:
            handle.write("flushed on SIGTERM")
            handle.flush()
            assert daemon.stop() == 0
        finally:
            with contextlib.suppress(OSError):
                handle.close()
        assert daemon.read(pool, "at-shutdown.txt") == b"flushed on SIGTERM"
        assert "STOPPING=1" in "\n".join(daemon.drain_notifications())
        assert not daemon.socket_path.exists()
        assert orphan_workers(str(daemon.mount_root)) == []
        daemon.assert_clean()


@pytest.mark.fuse
@pytest.mark.expect_log
def test_kill_9_of_mountd_then_restart_leaves_nothing_stale(tmp_path: Path) -> None:
    with daemon_on(tmp_path, f"file://{tmp_path / 'store'}") as daemon:
        pool = daemon.pool()
        with daemon.client() as client:
            info = post_execution(client, {"dead": ref(pool), "orphan": ref(pool)}).json()
        dead, orphan = info["mounts"]["dead"], info["mounts"]["orphan"]
        handle = open(f"{orphan['path']}/in-flight.txt", "w")  # noqa: SIM115
        try:
            handle.write("survives the crash")
            handle.flush()
            daemon.kill()
            # Now a worker dies too, with nobody left to notice: a truly stale mount.
            os.kill(dead["workerPid"], signal.SIGKILL)
            wait_for(lambda: not pid_alive(dead["workerPid"]), 10, "the worker to die")
            with pytest.raises(OSError) as err:
                os.stat(dead["path"])
            # The kernel answers a dead FUSE connection with either, depending on timing.
            assert err.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
            assert pid_alive(orphan["workerPid"])

            daemon.start()
        finally:
            with contextlib.suppress(OSError):
                handle.close()
        daemon.assert_clean()
        assert not pid_alive(orphan["workerPid"])
        # The orphaned worker got SIGTERM and uploaded what was pending before it exited.
        assert daemon.read(pool, "in-flight.txt") == b"survives the crash"
        assert "stopping orphaned mount worker" in daemon.log()
        with daemon.client() as client:
            assert metric(client, "poolfs_mountd_stale_mounts_cleaned_total") == 2
            assert client.get("/executions").json()["executions"] == []
            # The node works again.
            again = post_execution(client, {"p": ref(pool)})
            assert again.status_code == 201
            client.delete(f"/executions/{again.json()['executionId']}")
        daemon.assert_clean()


# ============================================================================ the runtime


def load_example(name: str) -> ModuleType:
    path = REPO / "examples" / name / "src" / "program.py"
    spec = importlib.util.spec_from_file_location(f"_mountd_example_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.fuse
def test_execute_with_the_mountd_mounter(file_daemon: Daemon) -> None:
    """The guide's concat example through `execute` + MountdMounter: two read-only inputs
    (the creator is a VIEWER), one output it maintains."""
    hello = file_daemon.pool(
        owner="tenant-o", files={"hello.txt": b"Hello"}, shares={"tenant-c": Role.VIEWER}
    )
    world = file_daemon.pool(
        owner="tenant-o", files={"world.txt": b"World"}, shares={"tenant-c": Role.VIEWER}
    )
    out = file_daemon.pool(owner="tenant-o", shares={"tenant-c": Role.MAINTAINER})
    body = {
        "data": {
            "file_to_read_from_my_dataset": "hello.txt",
            "file_to_read_from_another_dataset": "world.txt",
        },
        "my_dataset": ref(hello),
        "another_dataset": ref(world),
        "output_datapool": ref(out),
    }
    mounter = MountdMounter(
        file_daemon.socket_path,
        execution_id="concat-1",
        application_id=APP,
        creator_tenant_id="tenant-c",
        body=body,
    )
    result = execute(load_example("concat").run, body, mounter)
    assert (
        json.loads(result) == "Content from my_dataset: Hello\nContent from another_dataset: World"
    )
    assert file_daemon.read(out, "concatenated_output.txt") == b"HelloWorld"
    with file_daemon.client() as client:
        assert client.get("/executions/concat-1").json()["state"] == "unmounted"
    file_daemon.assert_clean()
    # Refused requests surface as MountError with mountd's reason.
    stranger = MountdMounter(
        file_daemon.socket_path,
        execution_id="concat-2",
        application_id=APP,
        creator_tenant_id="tenant-z",
        body=body,
    )
    with pytest.raises(MountError, match="reason: no_role"):
        execute(load_example("concat").run, body, stranger)
    file_daemon.assert_clean()


@pytest.mark.fuse
@pytest.mark.seaweedfs
def test_cross_organization_workflow_on_seaweedfs(
    seaweed_server: SeaweedServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The guide's example workflow: tenant A owns the pool "experiment-results" and an
    application subscribed to tenant B's service; A requests a VIEW grant and attaches it;
    B's service reads the pool read-only. Store: a real S3 server (SeaweedFS)."""
    bucket = new_bucket_name()
    seaweed_server.create_bucket(bucket)
    store = f"s3://{bucket}"
    s3 = ["--store", store, "--endpoint-url", seaweed_server.endpoint_url]
    try:
        with daemon_on(tmp_path, store, endpoint_url=seaweed_server.endpoint_url) as daemon:
            # 2. User A owns Data Pool "experiment-results" (made and filled with the CLI).
            assert (
                poolfs_main(
                    ["pool", "create", "--name", "experiment-results", "--owner", "tenant-a", *s3]
                )
                == 0
            )
            pool = uuid.UUID(capsys.readouterr().out.strip())
            local = tmp_path / "results"
            local.mkdir()
            (local / "hello.txt").write_text("Hello")
            assert poolfs_main(["pool", "upload", str(pool), str(local), *s3]) == 0
            # 1., 3. User B's service "quantum-optimizer"; A's application "my-quantum-run".
            service = load_example("read_file").run
            my_quantum_run = uuid.uuid4()
            with daemon.client() as client:
                # 4., 5. A requests a VIEW grant for its application.
                response = client.post(
                    f"/datapools/{pool}/grants",
                    json={"applicationId": str(my_quantum_run), "permission": "VIEW"},
                    headers={"X-Poolfs-Tenant": "tenant-a"},
                )
                assert response.status_code == 200
                token = response.json()["token"]
                # 6. A creates a service execution with the grant attached.
                body = {"data": {"file_to_read": "hello.txt"}, "my_dataset": ref(pool, token)}
                seen: dict[str, Any] = {}

                def quantum_optimizer(data: Any, my_dataset: DataPool) -> str:
                    seen["files"] = my_dataset.list_files()
                    try:
                        my_dataset.open("tamper.txt", "w").close()
                    except OSError as exc:
                        seen["write_errno"] = exc.errno
                    result: str = service(data, my_dataset)
                    return result

                quantum_optimizer.__annotations__ = service.__annotations__
                mounter = MountdMounter(
                    daemon.socket_path,
                    execution_id="quantum-1",
                    application_id=my_quantum_run,
                    creator_tenant_id="tenant-a",
                    body=body,
                )
                # 7. The grant is validated and the pool mounted read-only for B's service.
                assert json.loads(execute(quantum_optimizer, body, mounter)) == "Hello"
                assert list(seen["files"]) == ["hello.txt"]
                assert seen["write_errno"] == errno.EROFS
                final = client.get("/executions/quantum-1").json()
                assert final["mounts"]["my_dataset"]["access"] == "grant"
                assert final["mounts"]["my_dataset"]["mode"] == "ro"
                # B cannot reuse A's grant for an execution of its own.
                response = post_execution(
                    client, {"my_dataset": ref(pool, token)}, creator="tenant-b", app=my_quantum_run
                )
                assert response.status_code == 403
                assert response.json()["reason"] == "tenant_mismatch"
            daemon.assert_clean()
            assert daemon.read(pool, "tamper.txt") is None
    finally:
        empty_and_delete_bucket(seaweed_server.client(), bucket)
