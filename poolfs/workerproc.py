"""Starting a mount worker (`poolfs mount --foreground`) and waiting until its mount is live.

Shared by `poolfs mount` (which leaves the worker running on its own) and mountd (which keeps
the worker as its child to reap it). The protocol: the worker inherits the write end of a pipe
(`--ready-fd`) and writes one line on it, "ready" once the kernel mount is live or
"error: ..." when it gives up; end of file without a line means it died first. Only the worker
holds the write end after `start`, so that end of file is reliable.
"""

from __future__ import annotations

import dataclasses
import os
import select
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence

READY = "ready"


@dataclasses.dataclass(frozen=True, slots=True)
class WorkerOptions:
    """The settings every worker of one daemon (or one `poolfs mount`) is started with."""

    spill_dir: str
    max_file_size: int
    metadata_ttl: float
    uid: int
    gid: int
    store_timeout: float
    allow_other: bool = False
    endpoint_url: str | None = None
    python: str = sys.executable


@dataclasses.dataclass(frozen=True, slots=True)
class WorkerSpec:
    """The command line of one worker: what it mounts, where, and with which settings."""

    pool_url: str
    mountpoint: str
    options: WorkerOptions
    read_only: bool = False
    # Further `poolfs mount` arguments (e.g. --fs-option=..., --debug), appended as given.
    extra_args: Sequence[str] = ()

    def command(self, ready_fd: int, log_file: str | None = None) -> list[str]:
        o = self.options
        cmd = [
            o.python,
            "-m",
            "poolfs",
            "mount",
            self.pool_url,
            self.mountpoint,
            "--foreground",
            "--ready-fd",
            str(ready_fd),
            "--spill-dir",
            o.spill_dir,
            "--max-file-size",
            str(o.max_file_size),
            "--metadata-ttl",
            str(o.metadata_ttl),
            "--uid",
            str(o.uid),
            "--gid",
            str(o.gid),
            "--store-timeout",
            str(o.store_timeout),
        ]
        if log_file is not None:
            cmd += ["--log-file", log_file]
        if self.read_only:
            cmd.append("--read-only")
        if o.allow_other:
            cmd.append("--allow-other")
        if o.endpoint_url:
            cmd += ["--endpoint-url", o.endpoint_url]
        cmd += self.extra_args
        return cmd


@dataclasses.dataclass(slots=True)
class Started:
    """A worker process and the read end of its readiness pipe (closed by `wait_ready`)."""

    process: subprocess.Popen[bytes]
    ready_fd: int
    # Size of the log file before the worker started: where its own lines begin.
    log_offset: int


def start(spec: WorkerSpec, log_file: str, env: Mapping[str, str]) -> Started:
    """Start the worker in a session of its own, stdout/stderr appended to `log_file`.

    Raises OSError if it cannot be started (nothing is left open then)."""
    os.makedirs(os.path.dirname(log_file), mode=0o700, exist_ok=True)
    read_fd, write_fd = os.pipe()
    try:
        with open(log_file, "ab") as log_out:
            offset = log_out.tell()
            process = subprocess.Popen(
                spec.command(write_fd, log_file),
                pass_fds=(write_fd,),
                start_new_session=True,
                stdin=subprocess.DEVNULL,
                stdout=log_out,
                stderr=log_out,
                env=dict(env),
                close_fds=True,
            )
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        # Only the child keeps the write end: end of file then means the worker is gone.
        os.close(write_fd)
    return Started(process, read_fd, offset)


def wait_ready(started: Started, timeout: float) -> str | None:
    """The worker's first line ("" at end of file without one); None on timeout.

    Closes the pipe either way; the caller decides what to do with the process."""
    deadline = time.monotonic() + timeout
    message = b""
    try:
        while b"\n" not in message:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([started.ready_fd], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(started.ready_fd, 4096)
                if not chunk:
                    break
                message += chunk
    finally:
        os.close(started.ready_fd)
    return message.decode("utf-8", "replace").strip()


def last_log_line(path: str) -> str:
    """The last non-empty line of a worker's log, for error messages."""
    try:
        with open(path, errors="replace") as file:
            lines = [ln.strip() for ln in file if ln.strip()]
    except OSError:
        return f"no log ({path})"
    return lines[-1] if lines else f"no output (see {path})"
