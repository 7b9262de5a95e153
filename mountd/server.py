"""Running mountd: sockets, start-up cleanup, uvicorn, readiness and an orderly stop.

Order of events (each step's why is next to it in the code):

1. Refuse to start if another mountd answers on the socket (its mounts are not stale).
2. Clean stale mounts under the mount root (orphaned workers flush and exit; dead mounts are
   lazily unmounted; empty directories removed).
3. Bind the Unix socket with mode 0660 (never wider, not even for a moment), and the TCP
   listener if configured; start the monitor; serve.
4. Once uvicorn accepts connections: READY=1 to systemd (Type=notify).
5. On SIGTERM/SIGINT: refuse new executions at once, let in-flight requests finish, then
   STOPPING=1, flush and unmount every execution, remove the socket, exit 0.
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Mapping
from types import FrameType

import uvicorn

from mountd.api import TokenTable, create_app
from mountd.manager import ManagerConfig, MountManager
from mountd.metrics import Metrics
from mountd.sdnotify import notify
from mountd.settings import MountdSettings, SettingsError, parse_tcp_listen
from mountd.workers import WorkerConfig, clean_stale
from poolfs.catalog import Catalog
from poolfs.grants import GrantSecret
from poolfs.mounts import worker_env
from poolfs.stores import StoreError, StoreOptions, parse_store_url
from poolfs.workerproc import WorkerOptions

__all__ = ["bind_unix_socket", "serve", "socket_in_use", "worker_environment"]

log = logging.getLogger(__name__)

SOCKET_MODE = 0o660
# Not passed on to mount workers: they need no service-manager or credential access.
_PRIVATE_ENV = ("NOTIFY_SOCKET", "CREDENTIALS_DIRECTORY", "LISTEN_FDS", "LISTEN_PID", "MOUNTD_")


def socket_in_use(path: str) -> bool:
    """Whether something accepts connections on the Unix socket `path`."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2.0)
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


def bind_unix_socket(path: str, group: str | None) -> socket.socket:
    """A listening-ready Unix socket at `path`, mode 0660, group `group` (if given)."""
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # a stale socket of a dead mountd (socket_in_use was checked)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # bind() creates the file with 0777 & ~umask: make that 0600 so it is never wider than
    # 0660, even between bind and chmod.
    old_umask = os.umask(0o177)
    try:
        sock.bind(path)
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            sock.close()
            raise SettingsError(f"socket_group {group!r} does not exist") from None
        os.chown(path, -1, gid)
    os.chmod(path, SOCKET_MODE)
    return sock


def _bind_tcp(listen: str) -> socket.socket:
    host, port = parse_tcp_listen(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def worker_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """mountd's environment as its workers get it (boto3 settings pass through)."""
    return worker_env({k: v for k, v in environ.items() if not k.startswith(_PRIVATE_ENV)})


class _Server(uvicorn.Server):
    """uvicorn, telling systemd when it accepts connections and mountd when it is asked to
    stop (so new executions are refused while in-flight requests finish)."""

    def __init__(
        self, config: uvicorn.Config, on_ready: Callable[[], None], on_stop: Callable[[], None]
    ) -> None:
        super().__init__(config)
        self._on_ready = on_ready
        self._on_stop = on_stop

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and not self.should_exit:
            self._on_ready()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._on_stop()
        super().handle_exit(sig, frame)


def manager_config(settings: MountdSettings, environ: Mapping[str, str]) -> ManagerConfig:
    options = WorkerOptions(
        python=sys.executable,
        spill_dir=str(settings.spill_dir),
        max_file_size=settings.max_file_size,
        metadata_ttl=settings.metadata_ttl,
        uid=settings.mount_uid,
        gid=settings.mount_gid,
        allow_other=settings.allow_other,
        endpoint_url=settings.s3_endpoint_url,
        store_timeout=settings.store_timeout,
    )
    worker = WorkerConfig(
        options=options,
        ready_timeout=settings.worker_ready_timeout,
        env=worker_environment(environ),
    )
    return ManagerConfig(
        mount_root=str(settings.mount_root),
        log_dir=str(settings.spill_dir / "logs"),
        worker=worker,
        max_lifetime=settings.max_mount_lifetime,
        unmount_timeout=settings.unmount_timeout,
        keep_finished=settings.keep_finished,
    )


def serve(settings: MountdSettings, secret: GrantSecret, environ: Mapping[str, str]) -> int:
    """Run mountd until SIGTERM/SIGINT; the exit code. See the module docstring."""
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        # Installed before uvicorn's, so that uvicorn restores and re-raises into this one
        # after its graceful shutdown, instead of into the default action (death before the
        # mounts are flushed).
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)

    socket_path = str(settings.socket_path)
    if socket_in_use(socket_path):
        log.error("another mountd is serving %s; not starting", socket_path)
        return 1
    tokens = TokenTable.from_file(settings.tcp_tokens_file) if settings.tcp_tokens_file else None

    store_url = parse_store_url(settings.store_url)
    if store_url.scheme == "file":
        # The embedded store: a fresh node starts with an empty one.
        os.makedirs(store_url.location, mode=0o755, exist_ok=True)
    options = StoreOptions(endpoint_url=settings.s3_endpoint_url, timeout=settings.store_timeout)
    catalog = Catalog.open(settings.store_url, options)
    try:
        catalog.store.check()
    except StoreError as exc:
        # Not fatal: requests answer 503 until the store is back, and stale mounts still go.
        log.error("store %s is not usable yet: %s", settings.store_url, exc)

    metrics = Metrics()
    notify("STATUS=cleaning stale mounts", environ)
    stale = clean_stale(str(settings.mount_root), settings.unmount_timeout)
    if stale:
        metrics.inc("stale_mounts_cleaned_total", len(stale))
        log.warning("cleaned %d stale mount(s) under %s", len(stale), settings.mount_root)

    manager = MountManager(manager_config(settings, environ), metrics)
    manager.start()
    sockets: list[socket.socket] = []
    try:
        sockets.append(bind_unix_socket(socket_path, settings.socket_group))
        if settings.tcp_listen is not None:
            sockets.append(_bind_tcp(settings.tcp_listen))
        app = create_app(
            catalog=catalog,
            secret=secret,
            manager=manager,
            metrics=metrics,
            socket_path=socket_path,
            tokens=tokens,
        )
        config = uvicorn.Config(
            app,
            log_config=None,
            lifespan="off",
            ws="none",
            http="h11",
            server_header=False,
        )

        def ready() -> None:
            where = socket_path + (f" and {settings.tcp_listen}" if settings.tcp_listen else "")
            log.info("mountd ready on %s (mount root %s)", where, settings.mount_root)
            notify(f"READY=1\nSTATUS=serving on {where}", environ)

        server = _Server(config, on_ready=ready, on_stop=manager.begin_shutdown)
        if not stop.is_set():
            server.run(sockets=sockets)
    finally:
        notify("STOPPING=1\nSTATUS=flushing and unmounting", environ)
        log.info("mountd stopping: flushing and unmounting every execution")
        manager.shutdown()
        for sock in sockets:
            sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(socket_path)
        catalog.close()
        log.info("mountd stopped")
    return 0
