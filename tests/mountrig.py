"""Real mounts for tests: `poolfs mount` started through the real CLI, always unmounted.

Teardown order (pyfuse3's test util does the same): `poolfs umount`, then `fusermount -u`,
then `fusermount -uz`, then SIGKILL to the worker PID we started. A worker that died during the
test is reported with the tail of its log, and ERROR lines in the worker log fail the test
unless the test said it expects them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from poolfs.mounts import find_mount, pid_alive, read_worker_state

POOLFS = [sys.executable, "-m", "poolfs"]


def run(
    cmd: Sequence[str] | str,
    *,
    check: bool = True,
    timeout: float = 120,
    cwd: str | os.PathLike[str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a shell command (str) or argv; returns the completed process with text output."""
    proc = subprocess.run(
        cmd,
        shell=isinstance(cmd, str),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=cwd,
        executable="/bin/bash" if isinstance(cmd, str) else None,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"command failed ({proc.returncode}): {cmd}\nstdout: {proc.stdout}\n"
            f"stderr: {proc.stderr}"
        )
    return proc


class Mount:
    """One live mount of `url` at `path`, made with the real CLI."""

    def __init__(self, url: str, path: Path, spill: Path, args: Sequence[str] = ()) -> None:
        self.url = url
        self.path = path
        self.spill = spill
        self.args = list(args)
        self.log_file = spill / "worker.log"
        self.pid: int | None = None
        self.expect_errors = False
        self._log_offset = 0

    def mount(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        if self.log_file.exists():
            self._log_offset = self.log_file.stat().st_size
        proc = run(
            [
                *POOLFS,
                "mount",
                self.url,
                str(self.path),
                "--spill-dir",
                str(self.spill),
                "--log-file",
                str(self.log_file),
                *self.args,
            ],
            check=False,
            timeout=90,
        )
        if proc.returncode != 0:
            raise AssertionError(f"mount failed: {proc.stderr.strip()}\n{self.log_tail()}")
        state = read_worker_state(str(self.path))
        if state is None:
            raise AssertionError(f"mount worker wrote no state file\n{self.log_tail()}")
        self.pid = int(state["pid"])
        if not self.alive():
            raise AssertionError(f"mount worker died right after mounting\n{self.log_tail()}")

    def alive(self) -> bool:
        return self.pid is not None and pid_alive(self.pid)

    def log(self) -> str:
        try:
            with open(self.log_file, errors="replace") as f:
                f.seek(self._log_offset)
                return f.read()
        except OSError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return "worker log:\n" + "\n".join(self.log().splitlines()[-lines:])

    def umount(self) -> None:
        """Clean unmount through the CLI; raises if it fails or the worker died."""
        # A worker that ends normally records it in its state file (which umount removes);
        # one that was killed or crashed does not.
        state = read_worker_state(str(self.path)) or {}
        died = self.pid is not None and not self.alive() and not state.get("exited")
        proc = run([*POOLFS, "umount", str(self.path)], check=False, timeout=120)
        if died:
            raise AssertionError(f"mount worker died during the test\n{self.log_tail()}")
        if proc.returncode != 0:
            raise AssertionError(f"umount failed: {proc.stderr.strip()}\n{self.log_tail()}")
        self.pid = None
        self.check_log()

    def check_log(self) -> None:
        if self.expect_errors:
            return
        bad = [ln for ln in self.log().splitlines() if " ERROR " in ln or " CRITICAL " in ln]
        if bad:
            raise AssertionError("unexpected errors in worker log:\n" + "\n".join(bad[:20]))

    def force_cleanup(self) -> None:
        """Whatever happened, leave nothing mounted and no worker running."""
        path = str(self.path)
        for cmd in (["fusermount", "-u", path], ["fusermount", "-uz", path]):
            if find_mount(path) is None:
                break
            run(cmd, check=False, timeout=30)
        if self.pid is not None and self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while self.alive() and time.monotonic() < deadline:
                time.sleep(0.05)
        if find_mount(path) is not None:
            run(["fusermount", "-uz", path], check=False, timeout=30)

    @contextlib.contextmanager
    def mounted(self) -> Iterator[Mount]:
        self.mount()
        try:
            yield self
        except BaseException:
            self.force_cleanup()
            raise
        try:
            self.umount()
        finally:
            self.force_cleanup()

    def remount(self) -> None:
        self.umount()
        self.mount()


def oserror(fn: Callable[..., object], *args: object) -> int:
    """The errno of the OSError `fn(*args)` raises (a file operation on a mount)."""
    with pytest.raises(OSError) as info:
        fn(*args)
    assert info.value.errno is not None
    return info.value.errno
