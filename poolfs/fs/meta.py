"""POSIX metadata kept with each object as user metadata, and path <-> key rules.

Stored keys (all values ASCII): `poolfs-mode` (octal permission bits), `poolfs-mtime` and
`poolfs-atime` (integer nanoseconds since the epoch). Objects without them (written by other
tools) show the store's LastModified and default modes. An object with `poolfs-mode` but no
`poolfs-mtime` was streamed while written: its mtime is its LastModified (whole seconds).

Paths are the FUSE paths ("/a/b"); keys are store keys relative to the pool root ("a/b");
the marker of directory "/a/b" is "a/b/" and the root's is "".
"""

from __future__ import annotations

import dataclasses
import errno
import stat
from collections.abc import Mapping

from poolfs.fs.errors import PoolFSError

NAME_MAX = 255
MODE_KEY = "poolfs-mode"
MTIME_KEY = "poolfs-mtime"
ATIME_KEY = "poolfs-atime"

DEFAULT_FILE_MODE = 0o644
DEFAULT_DIR_MODE = 0o755


@dataclasses.dataclass(frozen=True, slots=True)
class Node:
    """What getattr reports for one path. `mode` holds permission bits only."""

    is_dir: bool
    size: int
    mode: int
    mtime_ns: int
    atime_ns: int
    ctime_ns: int
    etag: str | None = None
    # Whether `mode`/times came from poolfs metadata (False: defaults + LastModified).
    has_meta: bool = False
    # Directories: whether a marker object exists in the store.
    marker: bool = False

    def st_mode(self) -> int:
        return (stat.S_IFDIR if self.is_dir else stat.S_IFREG) | self.mode


def encode_meta(mode: int, mtime_ns: int | None, atime_ns: int) -> dict[str, str]:
    """mtime None: the object's LastModified stands for it (see `decode_meta`)."""
    meta = {MODE_KEY: format(mode & 0o7777, "o"), ATIME_KEY: str(atime_ns)}
    if mtime_ns is not None:
        meta[MTIME_KEY] = str(mtime_ns)
    return meta


def decode_meta(
    metadata: Mapping[str, str] | None, last_modified_ns: int, default_mode: int
) -> tuple[int, int, int, bool]:
    """(mode, mtime_ns, atime_ns, has_meta); malformed values fall back to the defaults.

    Without `poolfs-mtime` (a file streamed to the store while it was written, see
    files.StagedFile) the mtime is the object's LastModified; without `poolfs-atime`, the mtime.
    """
    if not metadata:
        return default_mode, last_modified_ns, last_modified_ns, False
    try:
        mode = int(metadata[MODE_KEY], 8) & 0o7777
        mtime = int(metadata[MTIME_KEY]) if MTIME_KEY in metadata else last_modified_ns
        atime = int(metadata[ATIME_KEY]) if ATIME_KEY in metadata else mtime
    except (KeyError, ValueError):
        return default_mode, last_modified_ns, last_modified_ns, False
    return mode, mtime, atime, True


def path_to_key(path: str) -> str:
    """'/a/b' -> 'a/b'; validates every component (ENAMETOOLONG, EILSEQ, EINVAL)."""
    key = path.strip("/")
    if not key:
        return ""
    for part in key.split("/"):
        try:
            size = len(part.encode("utf-8"))
        except UnicodeEncodeError:
            # Not valid UTF-8 (decoded with surrogateescape): store keys are UTF-8 strings.
            raise PoolFSError(errno.EILSEQ, f"name {part!r} is not valid UTF-8") from None
        if size > NAME_MAX:
            raise PoolFSError(errno.ENAMETOOLONG)
        if part in ("", ".", ".."):
            raise PoolFSError(errno.EINVAL, f"invalid path {path!r}")
    return key


def dir_marker(key: str) -> str:
    return key + "/" if key else ""


def parent_path(path: str) -> str:
    parent = path.rstrip("/").rsplit("/", 1)[0]
    return parent or "/"


def join(dir_path: str, name: str) -> str:
    return dir_path.rstrip("/") + "/" + name


def valid_name(name: str) -> bool:
    """Whether a key component can be shown as a directory entry."""
    if name in ("", ".", ".."):
        return False
    try:
        return len(name.encode("utf-8")) <= NAME_MAX
    except UnicodeEncodeError:
        return False
