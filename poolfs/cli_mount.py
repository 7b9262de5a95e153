"""`poolfs mount` and `poolfs umount`.

`poolfs mount` without --foreground starts a worker (the same command with --foreground and a
readiness pipe) in its own session and returns exit 0 only once the kernel mount is live; any
failure before that is one line on stderr and a non-zero exit. The worker records its PID in a
state file so that `poolfs umount` can wait for it to finish flushing and exit.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import shutil
import subprocess
import sys
import time
from typing import Any

from poolfs import workerproc
from poolfs.fs.config import DEFAULT_MAX_FILE_SIZE, FSConfig
from poolfs.mounts import (
    find_mount,
    pid_alive,
    read_worker_state,
    worker_env,
    worker_state_path,
    write_worker_state,
)
from poolfs.stores import InvalidStoreURL, StoreError, StoreOptions, open_store
from poolfs.workerproc import READY, WorkerOptions, WorkerSpec, last_log_line

log = logging.getLogger("poolfs.mount")


class MountError(Exception):
    """A reason the mount cannot be made, shown to the user as one line."""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    m = sub.add_parser(
        "mount",
        help="mount a pool as a directory",
        description="Mount the pool at POOL_URL (s3://BUCKET/PREFIX, file:///DIR, mem://NAME) "
        "on MOUNTPOINT. Returns once the mount is ready.",
    )
    m.add_argument("pool_url", metavar="POOL_URL")
    m.add_argument("mountpoint", metavar="MOUNTPOINT")
    m.add_argument("--read-only", action="store_true", help="mount read-only (kernel ro)")
    m.add_argument("--foreground", action="store_true", help="run in this process")
    m.add_argument(
        "--max-file-size",
        type=int,
        default=DEFAULT_MAX_FILE_SIZE,
        metavar="BYTES",
        help="largest file a write may produce (default 500 MiB)",
    )
    m.add_argument(
        "--spill-dir",
        default=_default_spill(),
        metavar="DIR",
        help="staging area for writes; failed uploads kept in DIR/lost+found",
    )
    m.add_argument("--metadata-ttl", type=float, default=1.0, metavar="SECONDS")
    m.add_argument(
        "--read-ahead-kib",
        type=int,
        default=None,
        metavar="KIB",
        help="kernel read-ahead of the mount (default 1024; 0 keeps the kernel's 128 KiB)",
    )
    m.add_argument("--uid", type=int, default=os.getuid(), metavar="N")
    m.add_argument("--gid", type=int, default=os.getgid(), metavar="N")
    m.add_argument("--allow-other", action="store_true", help="let other users see the mount")
    m.add_argument("--endpoint-url", metavar="URL", help="S3 endpoint (default: boto3 chain)")
    m.add_argument(
        "--store-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="bound on one store operation, retries included (default 30)",
    )
    m.add_argument(
        "--log-file", metavar="FILE", help="worker log (default: SPILL_DIR/logs/<mountpoint>.log)"
    )
    m.add_argument(
        "--fs-option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set a filesystem setting by name, e.g. readahead_budget=33554432 (repeatable; "
        "for tuning and benchmarks, see bench/README.md)",
    )
    m.add_argument("--debug", action="store_true", help="verbose logging")
    m.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    m.set_defaults(func=cmd_mount)

    u = sub.add_parser("umount", help="flush, unmount and wait for the mount worker to exit")
    u.add_argument("mountpoint", metavar="MOUNTPOINT")
    u.add_argument("--lazy", action="store_true", help="detach even if files are open")
    u.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="how long to wait for pending uploads (default 600)",
    )
    u.set_defaults(func=cmd_umount)


def _default_spill() -> str:
    return "/var/tmp/poolfs" if os.geteuid() == 0 else f"/var/tmp/poolfs-{os.getuid()}"


def _fail(msg: str) -> int:
    print(f"poolfs: {msg}", file=sys.stderr)
    return 1


# ---------------------------------------------------------------------------------- mount


def cmd_mount(args: argparse.Namespace) -> int:
    if args.foreground:
        return _run_worker(args)
    return _spawn_worker(args)


def _log_file(args: argparse.Namespace, mountpoint: str) -> str:
    if args.log_file:
        return str(os.path.abspath(args.log_file))
    name = mountpoint.strip("/").replace("/", "_") or "root"
    return os.path.join(os.path.abspath(args.spill_dir), "logs", f"{name}.log")


def _check_mountpoint(mountpoint: str) -> None:
    try:
        st = os.stat(mountpoint)
    except FileNotFoundError:
        raise MountError(f"mountpoint {mountpoint} does not exist") from None
    except OSError as exc:
        if exc.errno == 107:  # ENOTCONN: a FUSE mount whose daemon died
            raise MountError(
                f"mountpoint {mountpoint} has a stale FUSE mount (clean it: fusermount -uz "
                f"{mountpoint})"
            ) from None
        raise MountError(f"mountpoint {mountpoint}: {exc.strerror}") from None
    if not os.path.isdir(mountpoint) or st is None:
        raise MountError(f"mountpoint {mountpoint} is not a directory")
    if find_mount(mountpoint) is not None or os.path.ismount(mountpoint):
        raise MountError(f"mountpoint {mountpoint} is busy: something is already mounted there")
    if os.listdir(mountpoint):
        raise MountError(f"mountpoint {mountpoint} is not empty")


def _spawn_worker(args: argparse.Namespace) -> int:
    mountpoint = os.path.abspath(args.mountpoint)
    try:
        # Cheap checks first, so the common mistakes answer instantly.
        open_store(args.pool_url)
        _check_mountpoint(mountpoint)
    except (InvalidStoreURL, MountError) as exc:
        return _fail(str(exc))
    log_file = _log_file(args, mountpoint)
    extra = [f"--fs-option={option}" for option in args.fs_option]
    if args.read_ahead_kib is not None:
        extra += ["--read-ahead-kib", str(args.read_ahead_kib)]
    if args.debug:
        extra.append("--debug")
    options = WorkerOptions(
        spill_dir=args.spill_dir,
        max_file_size=args.max_file_size,
        metadata_ttl=args.metadata_ttl,
        uid=args.uid,
        gid=args.gid,
        store_timeout=args.store_timeout,
        allow_other=args.allow_other,
        endpoint_url=args.endpoint_url,
    )
    spec = WorkerSpec(
        args.pool_url, mountpoint, options, read_only=args.read_only, extra_args=extra
    )
    try:
        started = workerproc.start(spec, log_file, worker_env(os.environ))
    except OSError as exc:
        return _fail(f"cannot start the mount worker: {exc}")
    proc = started.process
    line = workerproc.wait_ready(started, args.store_timeout + 30)
    if line == READY:
        return 0
    if line is None:
        proc.kill()
        proc.wait()
        _cleanup_failed(mountpoint)
        return _fail(f"mount of {args.pool_url} on {mountpoint} timed out; see {log_file}")
    if line:
        proc.wait()
        return _fail(line)
    code = proc.wait()
    _cleanup_failed(mountpoint)
    return _fail(f"mount worker exited with code {code}: {last_log_line(log_file)}")


def _cleanup_failed(mountpoint: str) -> None:
    if find_mount(mountpoint) is not None:
        subprocess.run(["fusermount", "-uz", mountpoint], check=False, capture_output=True)


def _setup_logging(args: argparse.Namespace) -> None:
    level = logging.DEBUG if args.debug else logging.INFO
    handler: logging.Handler
    if args.log_file:
        os.makedirs(os.path.dirname(os.path.abspath(args.log_file)), exist_ok=True)
        handler = logging.FileHandler(args.log_file)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("botocore", "boto3", "s3transfer", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING if not args.debug else logging.INFO)


# FSConfig settings that have a flag of their own.
_OWN_FLAGS = frozenset({"read_only", "max_file_size", "spill_dir", "metadata_ttl", "uid", "gid"})


def _fs_options(items: list[str]) -> dict[str, str]:
    """`--fs-option NAME=VALUE` pairs; FSConfig validates names and converts values."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--fs-option {item!r}: expected NAME=VALUE")
        if name not in FSConfig.model_fields or name in _OWN_FLAGS:
            raise ValueError(f"--fs-option {item!r}: no setting {name!r} (or it has a flag)")
        out[name] = value
    return out


def _run_worker(args: argparse.Namespace) -> int:
    from poolfs.fs.core import PoolFS
    from poolfs.fs.errors import PoolFSError
    from poolfs.fs.fuse_ops import DEFAULT_READ_AHEAD_KIB, serve

    _setup_logging(args)
    mountpoint = os.path.abspath(args.mountpoint)
    ready_fd: int | None = args.ready_fd

    def report(line: str) -> None:
        nonlocal ready_fd
        if ready_fd is not None:
            with contextlib.suppress(OSError):
                os.write(ready_fd, (line + "\n").encode())
                os.close(ready_fd)
            ready_fd = None

    try:
        config = FSConfig.model_validate(
            {
                **_fs_options(args.fs_option),
                "read_only": args.read_only,
                "max_file_size": args.max_file_size,
                "spill_dir": args.spill_dir,
                "metadata_ttl": args.metadata_ttl,
                "uid": args.uid,
                "gid": args.gid,
            }
        )
        options = StoreOptions(endpoint_url=args.endpoint_url, timeout=args.store_timeout)
        store = open_store(args.pool_url, options)
        _check_mountpoint(mountpoint)
        try:
            store.check()
        except StoreError as exc:
            raise MountError(f"store {args.pool_url} unreachable: {exc}") from exc
        if shutil.which("fusermount3") is None:
            raise MountError("fusermount3 not found: install fuse3 and libfuse3-3")
        fs = PoolFS(store, config)
        # The kernel asks for the root's attributes before the first path walk; with them
        # cached (and later revalidated in the background) no HEAD precedes the first open,
        # and with the lookup's threads and connections started none is made during it.
        with contextlib.suppress(PoolFSError):
            fs.getattr("/")
        fs.warm_up()
    except (InvalidStoreURL, MountError, ValueError, OSError) as exc:
        log.error("mount failed: %s", exc)
        report(f"error: {exc}")
        return 1

    result: dict[str, Any] = {"failed": None}

    def ready() -> None:
        write_worker_state(
            mountpoint,
            {
                "pid": os.getpid(),
                "mountpoint": mountpoint,
                "url": args.pool_url,
                "log_file": args.log_file,
            },
        )
        log.info(
            "mounted %s on %s (%s)",
            args.pool_url,
            mountpoint,
            "read-only" if args.read_only else "read-write",
        )
        report(READY)
        # Everything made so far (modules, the store, the FS) lives as long as the worker:
        # out of the collector's sight, a full collection no longer walks it. Measured: such
        # a collection (~25 ms of CPU) fell into the first requests of a fresh mount in 2 of
        # 5 time-to-first-byte runs (20 -> 41-45 ms).
        gc.freeze()

    def destroyed(failed: list[str]) -> None:
        result["failed"] = failed

    try:
        serve(
            fs,
            mountpoint,
            fsname=f"poolfs:{args.pool_url}",
            allow_other=args.allow_other,
            on_ready=ready,
            on_destroy=destroyed,
            debug=args.debug,
            read_ahead_kib=(
                DEFAULT_READ_AHEAD_KIB if args.read_ahead_kib is None else args.read_ahead_kib
            )
            or None,
        )
    except RuntimeError as exc:
        report(f"error: FUSE mount on {mountpoint} failed ({exc}); see {args.log_file or 'log'}")
        log.error("FUSE mount failed: %s", exc)
        fs.shutdown()
        return 1
    finally:
        if result["failed"] is None and ready_fd is None:
            result["failed"] = []
        write_worker_state(
            mountpoint,
            {
                "pid": os.getpid(),
                "mountpoint": mountpoint,
                "exited": True,
                "failed": result["failed"],
            },
        )
    failed = result["failed"] or []
    log.info("unmounted %s%s", mountpoint, f"; {len(failed)} writes lost" if failed else "")
    return 2 if failed else 0


def cmd_umount(args: argparse.Namespace) -> int:
    mountpoint = os.path.abspath(args.mountpoint)
    entry = find_mount(mountpoint)
    if entry is None:
        return _fail(f"{mountpoint} is not mounted")
    if not entry.fstype.startswith("fuse"):
        return _fail(f"{mountpoint} is not a poolfs mount ({entry.fstype})")
    state = read_worker_state(mountpoint) or {}
    pid = state.get("pid") if not state.get("exited") else None
    cmd = ["fusermount", "-u", "-z", mountpoint] if args.lazy else ["fusermount", "-u", mountpoint]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        detail = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"
        if "busy" in detail.lower():
            return _fail(f"{mountpoint} is busy (files are open); close them or use --lazy")
        return _fail(f"unmount of {mountpoint} failed: {detail}")
    if isinstance(pid, int):
        deadline = time.monotonic() + args.timeout
        while pid_alive(pid):
            if time.monotonic() > deadline:
                return _fail(f"worker {pid} still flushing after {args.timeout:.0f}s")
            time.sleep(0.05)
        state = read_worker_state(mountpoint) or {}
        with contextlib.suppress(OSError):
            os.unlink(worker_state_path(mountpoint))
        failed = state.get("failed") or []
        if failed:
            spill = "lost+found in the spill dir"
            return _fail(
                f"unmounted, but {len(failed)} pending writes failed to upload "
                f"(kept in {spill}): {', '.join(failed)}"
            )
    return 0
