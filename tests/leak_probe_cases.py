"""Not collected by the main run (no test_ prefix): tests/test_rig.py runs it in an inner
pytest to prove that failing tests and dead workers leave nothing mounted."""

from __future__ import annotations

import os
import signal
import time

from tests.conftest import MountFactory


def test_fails_while_mounted(mounter: MountFactory) -> None:
    m = mounter("mem://leak1")
    (m.path / "f").write_text("x")
    raise AssertionError("deliberate failure with a live mount")


def test_worker_killed_mid_test(mounter: MountFactory) -> None:
    m = mounter("mem://leak2")
    assert m.pid is not None
    os.kill(m.pid, signal.SIGKILL)
    while m.alive():  # the kill is asynchronous
        time.sleep(0.01)


def test_open_file_at_teardown(mounter: MountFactory) -> None:
    m = mounter("mem://leak3")
    handle = open(m.path / "held", "w")  # noqa: SIM115 - kept open on purpose
    handle.write("x")
    raise AssertionError("deliberate failure with an open file on the mount")
