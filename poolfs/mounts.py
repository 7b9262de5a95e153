"""What the kernel has mounted: /proc/self/mountinfo, parsed. Used by the CLI, mountd and the
test rig to find poolfs mounts (fstype `fuse.poolfs`) and stale ones."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Mapping
from typing import Any

POOLFS_FSTYPE = "fuse.poolfs"

_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


@dataclasses.dataclass(frozen=True, slots=True)
class MountEntry:
    mountpoint: str
    fstype: str
    source: str
    options: frozenset[str]

    @property
    def read_only(self) -> bool:
        return "ro" in self.options


def mounts(mountinfo: str = "/proc/self/mountinfo") -> list[MountEntry]:
    entries = []
    with open(mountinfo) as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            rfields = right.split()
            if len(fields) < 6 or len(rfields) < 2:
                continue
            entries.append(
                MountEntry(
                    mountpoint=_unescape(fields[4]),
                    fstype=rfields[0],
                    source=_unescape(rfields[1]),
                    options=frozenset(fields[5].split(",")),
                )
            )
    return entries


def find_mount(mountpoint: str) -> MountEntry | None:
    """The topmost mount at exactly `mountpoint` (absolute, not resolved through symlinks)."""
    target = os.path.abspath(mountpoint)
    found = None
    for entry in mounts():
        if entry.mountpoint == target:
            found = entry
    return found


def poolfs_mounts(under: str = "/") -> list[MountEntry]:
    root = os.path.abspath(under).rstrip("/") + "/"
    return [
        e for e in mounts() if e.fstype == POOLFS_FSTYPE and (e.mountpoint + "/").startswith(root)
    ]


def mount_state_dir() -> str:
    """Where mount workers record their PID: /run/poolfs for root, else a per-user dir."""
    if os.geteuid() == 0:
        path = "/run/poolfs"
    else:
        base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/poolfs-{os.getuid()}"
        path = os.path.join(base, "poolfs")
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


def worker_state_path(mountpoint: str) -> str:
    """The state file a mount worker writes for `mountpoint` (its PID, and how it exited)."""
    name = hashlib.sha1(os.path.abspath(mountpoint).encode(), usedforsecurity=False).hexdigest()
    return os.path.join(mount_state_dir(), name + ".json")


def read_worker_state(mountpoint: str) -> dict[str, Any] | None:
    try:
        with open(worker_state_path(mountpoint)) as f:
            data: dict[str, Any] = json.load(f)
            return data
    except (OSError, ValueError):
        return None


def write_worker_state(mountpoint: str, data: dict[str, Any]) -> None:
    path = worker_state_path(mountpoint)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def pid_alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie (an exited child nobody reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def worker_env(base: Mapping[str, str]) -> dict[str, str]:
    """The environment for a mount worker process.

    glibc malloc: buffers of 4 MiB and more (read-ahead parts beyond the reused part buffers,
    poolfs/fs/buffers.py) come from mmap and go back to the OS when freed; smaller ones (FUSE
    request data) come from the heap, which is trimmed only past 32 MiB free, so the steady
    stream of request buffers does not page-fault. Measured on a 256 MiB sequential read:
    peak RSS 82 MiB and back to ~40 MiB afterwards, against 180 MiB held for good with a
    64 MiB mmap threshold. At most 2 malloc arenas: by default each of the many threads (FUSE
    workers, I/O executor) may get its own arena, each keeping freed memory; measured peak
    RSS 95 -> 90 MiB during a 256 MiB read and 155 -> 136 MiB with 8 parallel readers,
    throughput unchanged.
    No transparent huge pages for malloc (glibc.malloc.hugetlb=1 was the default until the
    part buffers): the part buffers ask for them themselves, and for the heap they added
    2-3 MiB of RSS in 2 MiB steps and compaction stalls on fragmented memory (bench/README.md).
    Explicit settings in `base` win.
    """
    env = dict(base)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(4 * 1024 * 1024))
    env.setdefault("MALLOC_TRIM_THRESHOLD_", str(32 * 1024 * 1024))
    env.setdefault("MALLOC_ARENA_MAX", "2")
    return env
