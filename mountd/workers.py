"""Mount worker processes: one `poolfs mount --foreground` child of mountd per mount.

Invariants a newcomer must keep:

- A worker is mountd's own child (`subprocess.Popen`), so mountd can reap it and notice its
  death without guessing from PIDs. It runs in its own session: a Ctrl-C in mountd's terminal
  or a signal to mountd's process group does not reach it; mountd decides the stop order.
- `Worker.start` returns only once the worker wrote "ready" on its readiness pipe (the kernel
  mount is live). Any other outcome (an "error: ..." line, exit, timeout) raises
  WorkerStartError after the process is gone and nothing is left mounted.
- `Worker.stop` is the only clean way out: SIGTERM makes the worker upload what is pending,
  then unmount and exit (exit code 2 means some uploads failed, 0 all durable). Past the
  timeout it is SIGKILLed. Either way, whatever is still mounted at its mountpoint is lazily
  unmounted, so no "Transport endpoint is not connected" is left behind.
- `clean_stale` is for a mount root no live mountd owns (start-up, `mountd cleanup`): it stops
  the orphaned workers it finds there (by their command line naming a mountpoint under the
  root), lazily unmounts every poolfs mount below the root and removes empty directories. It
  never deletes a file and never descends into a mount.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping

from poolfs import workerproc
from poolfs.mounts import (
    find_mount,
    mounts,
    pid_alive,
    poolfs_mounts,
    read_worker_state,
    worker_state_path,
)
from poolfs.workerproc import READY, WorkerOptions, WorkerSpec, last_log_line

__all__ = [
    "StopResult",
    "Worker",
    "WorkerConfig",
    "WorkerStartError",
    "clean_stale",
    "describe_exit",
    "lazy_unmount",
    "read_io",
    "remove_empty_dirs",
]

log = logging.getLogger(__name__)

# Exit code of `poolfs mount --foreground` when pending uploads failed at unmount.
EXIT_UPLOADS_FAILED = 2
_MAX_ERROR_LINES = 20


class WorkerStartError(RuntimeError):
    """The worker did not get its mount ready; the message says why."""


@dataclasses.dataclass(frozen=True, slots=True)
class WorkerConfig:
    """What every worker is started with (from mountd's settings)."""

    options: WorkerOptions
    ready_timeout: float
    env: Mapping[str, str]


@dataclasses.dataclass(frozen=True, slots=True)
class StopResult:
    """How a worker ended: its exit code (negative: killed by that signal), whether mountd
    had to SIGKILL it, and the ERROR lines of its log."""

    exit_code: int
    forced: bool
    errors: tuple[str, ...]
    # Paths whose pending upload failed at unmount (the worker's own report).
    failed_uploads: tuple[str, ...] = ()

    @property
    def clean(self) -> bool:
        return (
            self.exit_code == 0 and not self.forced and not self.errors and not self.failed_uploads
        )


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by {name}"
    if code == EXIT_UPLOADS_FAILED:
        return "exit code 2: pending uploads failed (staged bytes kept in lost+found)"
    return f"exit code {code}"


def _fusermount() -> str:
    return shutil.which("fusermount") or shutil.which("fusermount3") or "fusermount"


def lazy_unmount(mountpoint: str) -> bool:
    """Detach whatever is mounted at `mountpoint` (`fusermount -uz`); True if something was."""
    if find_mount(mountpoint) is None:
        return False
    proc = subprocess.run(
        [_fusermount(), "-u", "-z", mountpoint], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0 and find_mount(mountpoint) is not None:
        # fusermount refuses a mount it thinks is not the caller's; as root, umount can.
        subprocess.run(["umount", "-l", mountpoint], capture_output=True, check=False)
    if find_mount(mountpoint) is not None:
        log.error("could not detach %s: %s", mountpoint, proc.stderr.strip())
    return True


def read_io(pid: int) -> tuple[int, int] | None:
    """(rchar, wchar) of a live process from /proc/PID/io: bytes through read/write system
    calls (the FUSE device, store connections, spill files). None if it is gone."""
    try:
        with open(f"/proc/{pid}/io") as file:
            fields = dict(line.split(":", 1) for line in file if ":" in line)
        return int(fields["rchar"]), int(fields["wchar"])
    except (OSError, KeyError, ValueError):
        return None


def log_errors(path: str, offset: int = 0) -> tuple[str, ...]:
    """ERROR/CRITICAL lines a worker logged after `offset` (at most 20, the last ones)."""
    try:
        with open(path, errors="replace") as file:
            file.seek(offset)
            lines = [ln.rstrip() for ln in file if " ERROR " in ln or " CRITICAL " in ln]
    except OSError:
        return ()
    return tuple(lines[-_MAX_ERROR_LINES:])


class Worker:
    """One running mount worker; see the module docstring."""

    def __init__(
        self, process: subprocess.Popen[bytes], mountpoint: str, log_file: str, log_offset: int
    ) -> None:
        self.process = process
        self.mountpoint = mountpoint
        self.log_file = log_file
        self._log_offset = log_offset
        # The latest /proc/PID/io counters (rchar, wchar); final once the worker is reaped.
        self.last_io: tuple[int, int] = (0, 0)
        # What the worker reported in its state file when it exited (see `_collect_state`).
        self.failed_uploads: tuple[str, ...] = ()

    @property
    def pid(self) -> int:
        return self.process.pid

    @staticmethod
    def spec(config: WorkerConfig, pool_url: str, mountpoint: str, read_only: bool) -> WorkerSpec:
        return WorkerSpec(pool_url, mountpoint, config.options, read_only=read_only)

    @classmethod
    def start(
        cls,
        config: WorkerConfig,
        pool_url: str,
        mountpoint: str,
        *,
        read_only: bool,
        log_file: str,
    ) -> Worker:
        """Start a worker and wait until its mount is live; WorkerStartError otherwise."""
        spec = cls.spec(config, pool_url, mountpoint, read_only)
        try:
            started = workerproc.start(spec, log_file, config.env)
        except OSError as exc:
            raise WorkerStartError(f"cannot start the mount worker: {exc}") from exc
        process = started.process
        worker = cls(process, mountpoint, log_file, started.log_offset)
        line = workerproc.wait_ready(started, config.ready_timeout)
        if line == READY:
            return worker
        worker.kill()
        if line is None:
            raise WorkerStartError(
                f"mount worker did not get ready within {config.ready_timeout:g} s "
                f"(log: {log_file})"
            )
        if line:
            raise WorkerStartError(line.removeprefix("error: "))
        code = process.returncode
        raise WorkerStartError(
            f"mount worker exited ({describe_exit(code if code is not None else 0)}): "
            f"{last_log_line(log_file)}"
        )

    def _exited(self) -> bool:
        """Whether the worker has exited, WITHOUT reaping it: until it is reaped its
        /proc/PID/io still holds the final counters."""
        if self.process.returncode is not None:
            return True
        try:
            info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True
        return info is not None

    def _reap(self) -> int:
        """Record the final I/O counters, then reap; the exit code."""
        if self.process.returncode is None:
            self.io()
            code = self.process.wait()
            self._collect_state()
            return code
        return self.process.returncode

    def _collect_state(self) -> None:
        """Read, then remove, the state file the worker leaves (poolfs.mounts): it lists the
        uploads that failed at unmount. Removed so /run does not fill up with one file per
        mount ever made."""
        state = read_worker_state(self.mountpoint) or {}
        if state.get("pid") == self.pid:
            self.failed_uploads = tuple(str(path) for path in state.get("failed") or ())
            with contextlib.suppress(FileNotFoundError):
                os.unlink(worker_state_path(self.mountpoint))

    def poll(self) -> int | None:
        """The exit code once the worker has exited (reaping it), else None."""
        return self._reap() if self._exited() else None

    def io(self) -> tuple[int, int]:
        """The worker's I/O counters now (the last ones known once it is gone)."""
        if self.process.returncode is None:
            current = read_io(self.pid)
            if current is not None:
                self.last_io = current
        return self.last_io

    def errors(self) -> tuple[str, ...]:
        return log_errors(self.log_file, self._log_offset)

    def _wait_exit(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self._exited():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def kill(self) -> int:
        """SIGKILL (if still running), reap, detach the mountpoint; returns the exit code."""
        if not self._exited():
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            self._wait_exit(60)
        code = self._reap()
        lazy_unmount(self.mountpoint)
        return code

    def stop(self, timeout: float) -> StopResult:
        """Flush and unmount (SIGTERM), SIGKILL after `timeout`; see the module docstring."""
        forced = False
        if not self._exited():
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            if not self._wait_exit(timeout):
                log.error(
                    "worker %d for %s still flushing after %g s; killing it",
                    self.pid,
                    self.mountpoint,
                    timeout,
                )
                forced = True
        code = self.kill()
        return StopResult(code, forced, self.errors(), self.failed_uploads)


def orphan_workers(mount_root: str) -> list[int]:
    """PIDs of `poolfs mount --foreground` processes whose mountpoint is below `mount_root`."""
    root = os.path.abspath(mount_root).rstrip("/") + "/"
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as file:
                argv = [a.decode("utf-8", "surrogateescape") for a in file.read().split(b"\0")]
        except OSError:
            continue
        if "--foreground" not in argv or "mount" not in argv:
            continue
        if not any("poolfs" in part for part in argv[:4]):
            continue
        if any(arg.startswith(root) for arg in argv):
            found.append(int(name))
    return found


def remove_empty_dirs(mount_root: str) -> None:
    """Remove every empty directory below `mount_root` (not the root itself), bottom-up,
    without descending into anything mounted."""
    root = os.path.abspath(mount_root)
    mounted = {entry.mountpoint for entry in mounts()}
    found: list[str] = []
    for dirpath, dirnames, _ in os.walk(root):
        dirnames[:] = [d for d in dirnames if os.path.join(dirpath, d) not in mounted]
        found.extend(os.path.join(dirpath, d) for d in dirnames)
    for path in reversed(found):
        with contextlib.suppress(OSError):
            os.rmdir(path)


def clean_stale(mount_root: str, timeout: float) -> list[str]:
    """Clean a mount root that no live mountd owns; returns the poolfs mounts found there.

    Orphaned workers get SIGTERM (they flush and unmount themselves), SIGKILL after
    `timeout`; then every poolfs mount left below the root is lazily unmounted and empty
    directories are removed.
    """
    if not os.path.isdir(mount_root):
        return []
    found = [entry.mountpoint for entry in poolfs_mounts(mount_root)]
    pids = orphan_workers(mount_root)
    for pid in pids:
        log.warning("stopping orphaned mount worker %d (it flushes, then unmounts)", pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(pid_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in pids:
        if pid_alive(pid):
            log.error("orphaned mount worker %d did not stop in %g s; killing it", pid, timeout)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    for entry in sorted(poolfs_mounts(mount_root), key=lambda e: -len(e.mountpoint)):
        log.warning("detaching stale mount %s (%s)", entry.mountpoint, entry.source)
        lazy_unmount(entry.mountpoint)
    for mountpoint in found:
        # The workers' state files: nobody will reap those workers and read them now.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(worker_state_path(mountpoint))
    remove_empty_dirs(mount_root)
    return found
