"""mountd's parts in-process, no kernel: settings, access decisions, metrics, bearer tokens,
sd_notify, and the workers' command line and directory cleanup."""

from __future__ import annotations

import json
import os
import socket
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mountd.access import AccessDenied, UnknownPool, authorize_grant_request, decide_mount
from mountd.api import TokenTable
from mountd.metrics import Metrics
from mountd.sdnotify import notify
from mountd.server import worker_environment
from mountd.settings import MountdSettings, SettingsError, load_grant_secret, load_settings
from mountd.workers import Worker, WorkerConfig, describe_exit, remove_empty_dirs
from poolfs.catalog import Catalog, Role
from poolfs.grants import GrantSecret, Permission, issue_grant, verify_grant
from poolfs.refs import DataPoolRef
from poolfs.stores.mem import MemStore
from poolfs.workerproc import WorkerOptions

pytestmark = pytest.mark.core

SECRET_BYTES = b"s" * 40
APP = uuid.UUID("d1b2c3d4-e5f6-7890-1234-567890abcdef")
OTHER_APP = uuid.UUID("e1b2c3d4-e5f6-7890-1234-567890abcdef")


# --- settings -------------------------------------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_settings_file_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write(
        tmp_path / "mountd.toml",
        'mount_root = "/srv/mnt"\nmetadata_ttl = 5.0\nstore_url = "file:///srv/pools/"\n',
    )
    monkeypatch.setenv("MOUNTD_METADATA_TTL", "2.5")
    settings = load_settings(config)
    assert settings.mount_root == Path("/srv/mnt")
    assert settings.metadata_ttl == 2.5  # the environment wins over the file
    assert settings.store_url == "file:///srv/pools"
    assert settings.max_file_size == 500 * 1024 * 1024
    with pytest.raises(Exception, match="frozen"):
        settings.metadata_ttl = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('grant_secret = "abc"\n', "Extra inputs are not permitted"),
        ('mount_root = "relative/dir"\n', "must be an absolute path"),
        ('store_url = "ftp://x"\n', "unsupported scheme"),
        ('tcp_listen = "127.0.0.1:8080"\n', "needs tcp_tokens_file"),
        ('tcp_listen = "nonsense"\n', "HOST:PORT"),
        ("max_file_size = -1\n", "greater than or equal to 0"),
        ("this is not toml", "settings file"),
    ],
)
def test_bad_settings_are_named(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        load_settings(write(tmp_path / "bad.toml", text))


def test_missing_settings_file(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="not found"):
        load_settings(tmp_path / "nope.toml")


def test_grant_secret_from_file_or_systemd_credential(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_bytes(SECRET_BYTES + b"\n")
    settings = MountdSettings(grant_secret_file=secret_file)
    from_file = load_grant_secret(settings, {})
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "grant-secret").write_bytes(SECRET_BYTES)
    from_credential = load_grant_secret(
        MountdSettings(), {"CREDENTIALS_DIRECTORY": str(credentials)}
    )
    token = issue_grant(from_file, uuid.uuid4(), APP, "t", "VIEW")
    claims = verify_grant(
        from_credential,
        token,
        datapool_id=verify_pool(token),
        application_id=APP,
        tenant_id="t",
    )
    assert claims.permission is Permission.VIEW


def verify_pool(token: str) -> uuid.UUID:
    import base64
    import json

    payload = token.split(".")[1]
    return uuid.UUID(json.loads(base64.urlsafe_b64decode(payload + "=="))["datapoolId"])


def test_grant_secret_errors_never_show_the_secret(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="LoadCredential=grant-secret"):
        load_grant_secret(MountdSettings(), {})
    short = tmp_path / "short"
    short.write_bytes(b"short-secret-value")
    with pytest.raises(SettingsError) as info:
        load_grant_secret(MountdSettings(grant_secret_file=short), {})
    assert "too short" in str(info.value)
    assert "short-secret-value" not in str(info.value)
    with pytest.raises(SettingsError, match="cannot read the grant secret"):
        load_grant_secret(MountdSettings(grant_secret_file=tmp_path / "absent"), {})


# --- access decisions ------------------------------------------------------------------------


@pytest.fixture
def catalog() -> Catalog:
    return Catalog(MemStore(f"cat{uuid.uuid4().hex[:8]}"), "mem://cat")


@pytest.fixture
def secret() -> GrantSecret:
    return GrantSecret(SECRET_BYTES)


def ref(pool_id: uuid.UUID, grant: str | None = None) -> DataPoolRef:
    return DataPoolRef(id=pool_id, ref="DATAPOOL", grant=grant)


def test_roles_decide_without_a_grant(catalog: Catalog, secret: GrantSecret) -> None:
    pool = catalog.create("p", "owner").id
    catalog.share(pool, "viewer", Role.VIEWER)
    catalog.share(pool, "maintainer", Role.MAINTAINER)
    for tenant, mode in (("owner", "rw"), ("maintainer", "rw"), ("viewer", "ro")):
        decision = decide_mount(
            catalog, secret, param="p", ref=ref(pool), application_id=APP, creator_tenant=tenant
        )
        assert (decision.mode, decision.source) == (mode, "role")
    with pytest.raises(AccessDenied) as info:
        decide_mount(
            catalog, secret, param="p", ref=ref(pool), application_id=APP, creator_tenant="nobody"
        )
    assert info.value.reason == "no_role"
    with pytest.raises(UnknownPool):
        decide_mount(
            catalog,
            secret,
            param="p",
            ref=ref(uuid.uuid4()),
            application_id=APP,
            creator_tenant="owner",
        )


def test_a_grant_decides_instead_of_the_role(catalog: Catalog, secret: GrantSecret) -> None:
    pool = catalog.create("p", "owner").id
    view = issue_grant(secret, pool, APP, "owner", "VIEW")
    modify = issue_grant(secret, pool, APP, "guest", "MODIFY")
    # The owner's VIEW grant makes a read-only mount although the owner could write.
    decision = decide_mount(
        catalog, secret, param="p", ref=ref(pool, view), application_id=APP, creator_tenant="owner"
    )
    assert (decision.mode, decision.source) == ("ro", "grant")
    # A tenant without any role mounts writeable with a MODIFY grant made out to it.
    decision = decide_mount(
        catalog,
        secret,
        param="p",
        ref=ref(pool, modify),
        application_id=APP,
        creator_tenant="guest",
    )
    assert decision.mode == "rw"


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("expired", "expired"),
        ("tampered", "tampered"),
        ("other_secret", "bad_signature"),
        ("wrong_pool", "pool_mismatch"),
        ("wrong_application", "application_mismatch"),
        ("wrong_tenant", "tenant_mismatch"),
        ("garbage", "malformed"),
    ],
)
def test_grant_rejections(catalog: Catalog, secret: GrantSecret, case: str, reason: str) -> None:
    pool = catalog.create("p", "owner").id
    other = catalog.create("q", "owner").id
    past = datetime.now(UTC) - timedelta(minutes=16)
    token = {
        "expired": lambda: issue_grant(secret, pool, APP, "owner", "VIEW", now=past),
        "tampered": lambda: tamper(issue_grant(secret, pool, APP, "owner", "VIEW")),
        "other_secret": lambda: issue_grant(GrantSecret(b"o" * 32), pool, APP, "owner", "VIEW"),
        "wrong_pool": lambda: issue_grant(secret, other, APP, "owner", "VIEW"),
        "wrong_application": lambda: issue_grant(secret, pool, OTHER_APP, "owner", "VIEW"),
        "wrong_tenant": lambda: issue_grant(secret, pool, APP, "someone", "VIEW"),
        "garbage": lambda: "not-a-jwt",
    }[case]()
    with pytest.raises(AccessDenied) as info:
        decide_mount(
            catalog,
            secret,
            param="p",
            ref=ref(pool, token),
            application_id=APP,
            creator_tenant="owner",
        )
    assert info.value.reason == reason
    assert token not in info.value.message


def tamper(token: str) -> str:
    """The same signature over a payload that says MODIFY instead of VIEW."""
    import base64
    import json

    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["permission"] = "MODIFY"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{header}.{forged}.{signature}"


def test_grant_requests_need_the_right_role(catalog: Catalog, secret: GrantSecret) -> None:
    pool = catalog.create("p", "owner").id
    catalog.share(pool, "viewer", Role.VIEWER)
    catalog.share(pool, "maintainer", Role.MAINTAINER)
    allowed = {
        ("owner", Permission.MODIFY),
        ("owner", Permission.VIEW),
        ("maintainer", Permission.MODIFY),
        ("maintainer", Permission.VIEW),
        ("viewer", Permission.VIEW),
    }
    for tenant in ("owner", "maintainer", "viewer", "nobody"):
        for permission in Permission:

            def request(tenant: str = tenant, permission: Permission = permission) -> str:
                return authorize_grant_request(
                    catalog,
                    secret,
                    pool_id=pool,
                    application_id=APP,
                    tenant=tenant,
                    permission=permission,
                )

            if (tenant, permission) in allowed:
                claims = verify_grant(
                    secret, request(), datapool_id=pool, application_id=APP, tenant_id=tenant
                )
                assert claims.permission is permission
            else:
                with pytest.raises(AccessDenied) as info:
                    request()
                assert info.value.reason == "insufficient_role"
    with pytest.raises(UnknownPool):
        authorize_grant_request(
            catalog,
            secret,
            pool_id=uuid.uuid4(),
            application_id=APP,
            tenant="owner",
            permission=Permission.VIEW,
        )


# --- metrics, tokens, notify -----------------------------------------------------------------


def test_metrics_text_format() -> None:
    metrics = Metrics()
    metrics.inc("access_denied_total", reason="expired")
    metrics.inc("access_denied_total", reason="expired")
    metrics.inc("mounts_started_total", 3)
    text = metrics.render([("mounts", {"mode": "ro"}, 2)])
    lines = text.splitlines()
    assert 'poolfs_mountd_access_denied_total{reason="expired"} 2' in lines
    assert "poolfs_mountd_mounts_started_total 3" in lines
    assert 'poolfs_mountd_mounts{mode="ro"} 2' in lines
    assert "# TYPE poolfs_mountd_mounts gauge" in lines
    assert "poolfs_mountd_executions_total 0" in lines
    for line in lines:
        assert line.startswith("# ") or line.startswith("poolfs_mountd_")
    with pytest.raises(KeyError):
        metrics.inc("no_such_metric")


def test_token_table(tmp_path: Path) -> None:
    digest = TokenTable.digest("secret-token")
    path = write(tmp_path / "tokens", f"# comment\ntenant-a sha256:{digest}\n* sha256:{'0' * 64}\n")
    table = TokenTable.from_file(path)
    assert table.tenant_of("secret-token") == "tenant-a"
    assert table.tenant_of("other") is None
    with pytest.raises(ValueError, match="expected 'TENANT sha256:HEX'"):
        TokenTable.from_file(write(tmp_path / "bad", "tenant-a plain-token\n"))


@pytest.mark.parametrize("abstract", [False, True])
def test_sd_notify(tmp_path: Path, abstract: bool) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        if abstract:
            name = f"poolfs-test-{uuid.uuid4().hex}"
            server.bind("\0" + name)
            address = "@" + name
        else:
            address = str(tmp_path / "notify")
            server.bind(address)
        assert notify("READY=1\nSTATUS=up", {"NOTIFY_SOCKET": address})
        assert server.recv(4096) == b"READY=1\nSTATUS=up"
    assert not notify("READY=1", {})


# --- workers ---------------------------------------------------------------------------------


def test_worker_command_and_environment() -> None:
    options = WorkerOptions(
        python="/usr/bin/python3",
        spill_dir="/spill",
        max_file_size=1000,
        metadata_ttl=1.5,
        uid=1000,
        gid=1001,
        allow_other=True,
        endpoint_url="http://127.0.0.1:9000",
        store_timeout=7.0,
    )
    config = WorkerConfig(
        options=options,
        ready_timeout=30.0,
        env={},
    )
    cmd = Worker.spec(config, "s3://b/p", "/mnt/e/x", read_only=True).command(9)
    assert cmd[:6] == ["/usr/bin/python3", "-m", "poolfs", "mount", "s3://b/p", "/mnt/e/x"]
    text = " ".join(cmd)
    for part in (
        "--foreground --ready-fd 9",
        "--read-only",
        "--allow-other",
        "--uid 1000",
        "--gid 1001",
        "--max-file-size 1000",
        "--metadata-ttl 1.5",
        "--endpoint-url http://127.0.0.1:9000",
        "--store-timeout 7.0",
    ):
        assert part in text
    env = worker_environment(
        {
            "PATH": "/bin",
            "AWS_ACCESS_KEY_ID": "k",
            "NOTIFY_SOCKET": "/run/n",
            "CREDENTIALS_DIRECTORY": "/run/c",
            "MOUNTD_LOG_LEVEL": "DEBUG",
        }
    )
    assert env["AWS_ACCESS_KEY_ID"] == "k"
    assert "NOTIFY_SOCKET" not in env
    assert "CREDENTIALS_DIRECTORY" not in env
    assert "MOUNTD_LOG_LEVEL" not in env
    assert env["MALLOC_MMAP_THRESHOLD_"] == str(4 * 1024 * 1024)  # read-ahead parts via mmap
    assert env["MALLOC_ARENA_MAX"] == "2"  # threads share arenas of freed memory
    assert "GLIBC_TUNABLES" not in env  # no huge pages for malloc (the part buffers ask)
    assert (
        worker_environment({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})["GLIBC_TUNABLES"]
        == "glibc.malloc.hugetlb=1"
    )
    assert describe_exit(-9) == "killed by SIGKILL"
    assert "uploads failed" in describe_exit(2)


def test_remove_empty_dirs_keeps_files(tmp_path: Path) -> None:
    (tmp_path / "e1" / "a").mkdir(parents=True)
    (tmp_path / "e2" / "b").mkdir(parents=True)
    (tmp_path / "e2" / "b" / "keep.txt").write_text("x")
    remove_empty_dirs(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["e2"]
    assert (tmp_path / "e2" / "b" / "keep.txt").exists()


# --- the mountd command line -----------------------------------------------------------------


def test_mountd_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from openapi_spec_validator import validate

    from mountd.cli import main

    assert main(["openapi"]) == 0
    document = json.loads(capsys.readouterr().out)
    validate(document)
    assert "/executions" in document["paths"]

    assert main(["token", "--tenant", "tenant-b"]) == 0
    out = capsys.readouterr().out.splitlines()
    token = out[0].removeprefix("token: ")
    tokens = write(tmp_path / "tokens", out[1].removeprefix("tokens file line: ") + "\n")
    assert TokenTable.from_file(tokens).tenant_of(token) == "tenant-b"

    secret = tmp_path / "secret"
    secret.write_bytes(SECRET_BYTES)
    config = write(tmp_path / "m.toml", f'grant_secret_file = "{secret}"\nmetadata_ttl = 3.0\n')
    assert main(["check", "--config", str(config)]) == 0
    shown = capsys.readouterr().out
    assert json.loads(shown)["metadata_ttl"] == 3.0
    assert SECRET_BYTES.decode() not in shown
    bad = write(tmp_path / "bad.toml", "metadata_ttl = -1\n")
    assert main(["check", "--config", str(bad)]) == 2
    assert "metadata_ttl" in capsys.readouterr().err
