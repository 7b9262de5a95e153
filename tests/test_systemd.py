"""systemd/: the unit passes `systemd-analyze verify`, keeps the promises the README makes
(Type=notify, KillMode=mixed, a stop timeout longer than mountd's own, the grant secret as a
credential, no option that would hide the mounts in a private mount namespace), agrees with
the example settings file, and mountd behaves as the unit expects: it reads the credential
from $CREDENTIALS_DIRECTORY, reports READY=1 and STOPPING=1, and `mountd cleanup` (its
ExecStopPost=) refuses to run under a live mountd."""

from __future__ import annotations

import base64
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mountd.settings import MountdSettings, load_settings

pytestmark = pytest.mark.core

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "poolfs-mountd.service"
EXAMPLE = REPO / "systemd" / "mountd.toml.example"
INSTALLED_MOUNTD = "/usr/local/bin/mountd"
VENV_MOUNTD = str(Path(sys.executable).with_name("mountd"))

# Each of these gives the service a mount namespace of its own: its mounts would be invisible
# to the services on the node.
NAMESPACE_OPTIONS = (
    "ProtectSystem",
    "ProtectHome",
    "PrivateTmp",
    "PrivateDevices",
    "PrivateMounts",
    "PrivateUsers",
    "ReadWritePaths",
    "ReadOnlyPaths",
    "InaccessiblePaths",
    "TemporaryFileSystem",
    "BindPaths",
    "BindReadOnlyPaths",
    "ProtectKernelTunables",
    "ProtectKernelModules",
    "ProtectKernelLogs",
    "ProtectControlGroups",
    "ProtectProc",
    "ProcSubset",
    "ProtectHostname",
    "MountFlags",
)


def unit_directives() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        found.setdefault(key, []).append(value)
    return found


def seconds(value: str) -> float:
    units = {"s": 1, "sec": 1, "min": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+)\s*([a-z]*)", value):
        total += int(number) * units[unit or "s"]
    return total


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    assert found, "systemd-analyze is missing: `make system-packages` installs systemd"
    return found


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify checks that ExecStart's binary exists: point it at this checkout's mountd.
    text = UNIT.read_text()
    assert text.count(INSTALLED_MOUNTD) == 2
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace(INSTALLED_MOUNTD, VENV_MOUNTD))
    proc = subprocess.run(
        [systemd_analyze(), "verify", str(copy)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert "poolfs-mountd" not in proc.stderr, proc.stderr
    # And the offline security review rates the sandbox as the FUSE constraints allow.
    proc = subprocess.run(
        [systemd_analyze(), "security", "--offline=true", "--no-pager", str(copy)],
        capture_output=True,
        text=True,
        check=False,
    )
    level = re.search(r"Overall exposure level for \S+: ([\d.]+)", proc.stdout + proc.stderr)
    assert level is not None, proc.stdout + proc.stderr
    assert float(level.group(1)) < 5.0, proc.stdout


def test_unit_keeps_its_promises() -> None:
    unit = unit_directives()
    assert unit["Type"] == ["notify"]
    assert unit["Restart"] == ["on-failure"]
    assert unit["KillMode"] == ["mixed"]
    assert unit["LoadCredential"] == ["grant-secret:/etc/poolfs/grant-secret"]
    assert unit["RuntimeDirectory"] == ["poolfs-mountd"]
    assert unit["ExecStart"] == [f"{INSTALLED_MOUNTD} serve --config /etc/poolfs/mountd.toml"]
    assert unit["ExecStopPost"] == [f"{INSTALLED_MOUNTD} cleanup --config /etc/poolfs/mountd.toml"]
    assert unit["DeviceAllow"] == ["/dev/fuse rw"]
    assert "CAP_SYS_ADMIN" in unit["CapabilityBoundingSet"][0].split()
    assert unit["NoNewPrivileges"] == ["yes"]
    # mountd flushes for up to unmount_timeout; systemd must not SIGKILL it before that.
    assert seconds(unit["TimeoutStopSec"][0]) > MountdSettings().unmount_timeout + 60
    for option in NAMESPACE_OPTIONS:
        assert option not in unit, f"{option}= would hide the mounts from the node"
    # The secret is never on the command line.
    assert "secret" not in unit["ExecStart"][0]


def test_example_settings_agree_with_the_unit() -> None:
    unit = unit_directives()
    example = load_settings(EXAMPLE)
    assert example == MountdSettings(), "the example shows the defaults"
    runtime = Path("/run") / unit["RuntimeDirectory"][0]
    state = Path("/var/lib") / unit["StateDirectory"][0]
    assert example.socket_path.parent == runtime
    assert example.store_url == f"file://{state}/pools"
    assert example.spill_dir.parent == state
    assert unit["LoadCredential"][0].split(":")[0] == example.grant_secret_credential
    assert example.grant_secret_file is None  # the credential is the default source
    assert example.unmount_timeout < seconds(unit["TimeoutStopSec"][0])


@contextlib.contextmanager
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    directory = tempfile.mkdtemp(prefix="notify-", dir="/tmp")
    path = os.path.join(directory, "n.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.2)
    try:
        yield sock, path
    finally:
        sock.close()
        os.unlink(path)
        os.rmdir(directory)


def receive_until(sock: socket.socket, word: str, process: subprocess.Popen[bytes]) -> str:
    deadline = time.monotonic() + 60
    seen = []
    while time.monotonic() < deadline:
        try:
            message = sock.recv(4096).decode()
        except TimeoutError:
            assert process.poll() is None, f"mountd exited with {process.returncode}"
            continue
        seen.append(message)
        if word in message.splitlines():
            return "\n".join(seen)
    raise AssertionError(f"no {word} from mountd; got {seen}")


def test_mountd_runs_as_the_unit_runs_it(tmp_path: Path) -> None:
    """Settings from MOUNTD_* only, the grant secret from $CREDENTIALS_DIRECTORY/grant-secret
    (as LoadCredential= provides it), readiness and stopping over $NOTIFY_SOCKET."""
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    secret = base64.b64encode(os.urandom(48))
    (credentials / "grant-secret").write_bytes(secret)
    sockdir = tempfile.mkdtemp(prefix="mountd-", dir="/tmp")
    api_socket = os.path.join(sockdir, "api.sock")
    settings_env = {
        "MOUNTD_SOCKET_PATH": api_socket,
        "MOUNTD_MOUNT_ROOT": str(tmp_path / "mnt"),
        "MOUNTD_STORE_URL": f"file://{tmp_path / 'store'}",
        "MOUNTD_SPILL_DIR": str(tmp_path / "spill"),
    }
    cleanup = [sys.executable, "-m", "mountd", "cleanup"]
    inherited = ("MOUNTD_", "CREDENTIALS_DIRECTORY", "NOTIFY_SOCKET")
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(inherited)}
    env = {**base_env, **settings_env}
    log = tmp_path / "mountd.log"
    try:
        with notify_socket() as (sock, notify_path), open(log, "wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "mountd", "serve"],
                env={
                    **env,
                    "NOTIFY_SOCKET": notify_path,
                    "CREDENTIALS_DIRECTORY": str(credentials),
                },
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
            try:
                ready = receive_until(sock, "READY=1", process)
                assert f"STATUS=serving on {api_socket}" in ready
                assert os.stat(api_socket).st_mode & 0o777 == 0o660
                refused = subprocess.run(cleanup, env=env, capture_output=True, text=True)
                assert refused.returncode == 1
                assert "its mounts are not stale" in refused.stderr
                process.send_signal(signal.SIGTERM)
                receive_until(sock, "STOPPING=1", process)
                assert process.wait(60) == 0
            finally:
                if process.poll() is None:
                    process.kill()
                    process.wait()
        assert secret.decode() not in log.read_text()
        with open(log) as f:
            assert "mountd stopped" in f.read()
        done = subprocess.run(cleanup, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert "cleaned 0 stale mount(s)" in done.stdout
        # Without a secret source mountd refuses to start, and says how to give it one.
        missing = subprocess.run(
            [sys.executable, "-m", "mountd", "serve"], env=env, capture_output=True, text=True
        )
        assert missing.returncode == 2
        assert "LoadCredential=grant-secret" in missing.stderr
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)
