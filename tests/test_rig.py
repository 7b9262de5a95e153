"""The test rig itself: failing tests and dead workers leave nothing mounted (semantics 13)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from poolfs.mounts import poolfs_mounts
from tests.mountrig import run

pytestmark = pytest.mark.fuse


def test_failures_leave_nothing_mounted(tmp_path: Path) -> None:
    base = tmp_path / "inner"
    proc = run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--basetemp",
            str(base),
            "tests/leak_probe_cases.py",
        ],
        check=False,
        timeout=300,
        cwd=Path(__file__).resolve().parent.parent,
    )
    # All three inner tests must fail (or error), and the run must say so...
    assert proc.returncode == 1, proc.stdout
    assert "3 failed" in proc.stdout or ("failed" in proc.stdout and "error" in proc.stdout)
    assert "worker died" in proc.stdout
    # ...and nothing of theirs may still be mounted.
    assert poolfs_mounts(str(base)) == []
