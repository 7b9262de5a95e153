"""What the kernel has mounted: /proc/self/mountinfo, parsed. Used by the CLI, mountd and the
test rig to find poolfs mounts (fstype `fuse.poolfs`) and stale ones."""

from __future__ import annotations

import dataclasses
import os
import re

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
