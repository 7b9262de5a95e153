"""The fusepy adapter: the only module that imports fuse.

It links fusepy's path-based Operations to `PoolFS` and turns `PoolFSError` into
`FuseOSError`. Anything else escaping the core is logged once with the operation and path and
answered with EIO (never fusepy's default EINVAL).

Mount options and why:
- `atomic_o_trunc`: O_TRUNC arrives with open(), so truncating an existing file does not first
  store an empty object that readers could see.
- `default_permissions`: the kernel enforces the mode bits we report.
- `big_writes`, `max_write`/`max_read` 128 KiB: the largest requests libfuse2 allows.
- attr/entry timeouts = metadata_ttl: the kernel caches what our own cache would answer anyway.
- `use_ino` with inode numbers derived from the path: the kernel forgets a FUSE inode as soon
  as its dentry is unused past entry_timeout, and libfuse2 then numbers the next lookup anew.
  Tools that compare st_ino over time (GNU cp/mv "replaced while being copied", tar, find)
  need the number to stay put; a rename gives a new number.
"""

from __future__ import annotations

import codecs
import errno
import hashlib
import logging
from collections.abc import Callable
from typing import Any

import fuse

from poolfs.fs.core import PoolFS
from poolfs.fs.errors import PoolFSError
from poolfs.fs.meta import Node

log = logging.getLogger("poolfs.fuse")

# Paths are bytes in the kernel; names that are not UTF-8 must reach the core intact (it answers
# EILSEQ for them) rather than fail inside fusepy's decode.
_CODEC = "poolfs_utf8"


def _codec_search(name: str) -> codecs.CodecInfo | None:
    if name != _CODEC:
        return None
    utf8 = codecs.lookup("utf-8")
    return codecs.CodecInfo(
        name=_CODEC,
        encode=lambda s, errors="surrogateescape": utf8.encode(s, "surrogateescape"),
        decode=lambda b, errors="surrogateescape": utf8.decode(b, "surrogateescape"),
    )


codecs.register(_codec_search)


def inode_number(path: str) -> int:
    """A stable inode number for a path: 1 for the root, else 63 bits of its hash (never 0/1)."""
    if path == "/":
        return 1
    digest = hashlib.blake2b(path.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return (int.from_bytes(digest, "little") >> 1) | 2


def _fh(fi: Any) -> int | None:
    """The handle number in a fuse_file_info (None for a NULL pointer / path-only call)."""
    if not fi:
        return None
    return int(fi.fh)


class FuseOps(fuse.Operations):  # type: ignore[misc]
    use_ns = True
    # fusepy copies this into fuse_operations: without it libfuse2 silently drops a SETATTR
    # that sets only atime or only mtime (touch -a / touch -m), instead of passing UTIME_OMIT.
    flag_utime_omit_ok = 1

    def __init__(
        self,
        fs: PoolFS,
        on_ready: Callable[[], None] | None = None,
        on_destroy: Callable[[list[str]], None] | None = None,
    ) -> None:
        self.fs = fs
        self._on_ready = on_ready
        self._on_destroy = on_destroy
        self._uid = fs.config.uid
        self._gid = fs.config.gid

    def __call__(self, op: str, *args: Any) -> Any:
        try:
            return getattr(self, op)(*args)
        except PoolFSError as exc:
            raise fuse.FuseOSError(exc.errno) from exc
        except fuse.FuseOSError:
            raise
        except Exception as exc:
            path = args[0] if args and isinstance(args[0], str) else "?"
            log.error("unexpected error in %s %r", op, path, exc_info=exc)
            raise fuse.FuseOSError(errno.EIO) from exc

    # --- lifecycle ---------------------------------------------------------------------

    def init(self, path: str) -> None:
        if self._on_ready is not None:
            self._on_ready()

    def destroy(self, path: str) -> None:
        failed = self.fs.shutdown()
        if self._on_destroy is not None:
            self._on_destroy(failed)

    # --- attributes --------------------------------------------------------------------

    def _stat(self, path: str, node: Node) -> dict[str, int]:
        return {
            "st_ino": inode_number(path),
            "st_mode": node.st_mode(),
            "st_nlink": 2 if node.is_dir else 1,
            "st_size": node.size,
            "st_uid": self._uid,
            "st_gid": self._gid,
            "st_atime": node.atime_ns,
            "st_mtime": node.mtime_ns,
            "st_ctime": node.ctime_ns,
            "st_blocks": (node.size + 511) // 512,
            "st_blksize": 128 * 1024,
        }

    def getattr(self, path: str, fi: Any = None) -> dict[str, int]:
        return self._stat(path, self.fs.getattr(path, _fh(fi)))

    def readdir(self, path: str, fh: int) -> list[str]:
        return [".", "..", *(name for name, _ in self.fs.readdir(path))]

    def statfs(self, path: str) -> dict[str, int]:
        return self.fs.statfs()

    def chmod(self, path: str, mode: int) -> None:
        self.fs.chmod(path, mode)

    def chown(self, path: str, uid: int, gid: int) -> None:
        self.fs.chown(path, uid, gid)

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> None:
        self.fs.utimens(path, times)

    def truncate(self, path: str, length: int, fi: Any = None) -> None:
        self.fs.truncate(path, length, _fh(fi))

    # --- namespace ---------------------------------------------------------------------

    def mkdir(self, path: str, mode: int) -> None:
        self.fs.mkdir(path, mode)

    def rmdir(self, path: str) -> None:
        self.fs.rmdir(path)

    def unlink(self, path: str) -> None:
        self.fs.unlink(path)

    def rename(self, old: str, new: str) -> None:
        self.fs.rename(old, new)

    def symlink(self, target: str, source: str) -> None:
        self.fs.unsupported("symlink")

    def link(self, target: str, source: str) -> None:
        self.fs.unsupported("link")

    def mknod(self, path: str, mode: int, dev: int) -> None:
        self.fs.unsupported("mknod")

    def readlink(self, path: str) -> str:
        raise fuse.FuseOSError(errno.EINVAL)

    # --- file I/O ------------------------------------------------------------------------

    def create(self, path: str, mode: int, fi: Any) -> int:
        fi.fh = self.fs.create(path, mode, fi.flags)
        return 0

    def open(self, path: str, fi: Any) -> int:
        fi.fh = self.fs.open(path, fi.flags)
        return 0

    def read(self, path: str | None, size: int, offset: int, fi: Any) -> bytes:
        return self.fs.read(int(fi.fh), offset, size)

    def write(self, path: str | None, data: bytes, offset: int, fi: Any) -> int:
        return self.fs.write(int(fi.fh), offset, data)

    def flush(self, path: str | None, fi: Any) -> None:
        self.fs.flush(int(fi.fh))

    def fsync(self, path: str | None, datasync: int, fi: Any) -> None:
        self.fs.fsync(int(fi.fh))

    def release(self, path: str | None, fi: Any) -> None:
        self.fs.release(int(fi.fh))


def serve(
    fs: PoolFS,
    mountpoint: str,
    *,
    fsname: str,
    allow_other: bool = False,
    on_ready: Callable[[], None] | None = None,
    on_destroy: Callable[[list[str]], None] | None = None,
    debug: bool = False,
) -> None:
    """Mount and run the FUSE loop in this thread until unmounted or SIGTERM/SIGINT."""
    ttl = fs.config.metadata_ttl
    options: dict[str, Any] = {
        "foreground": True,
        "nothreads": False,
        "debug": debug,
        "fsname": fsname.replace(",", "%2C").replace(" ", "%20"),
        "subtype": "poolfs",
        "use_ino": True,
        "default_permissions": True,
        "atomic_o_trunc": True,
        "big_writes": True,
        "max_read": 131072,
        "max_write": 131072,
        "attr_timeout": ttl,
        "entry_timeout": ttl,
        "negative_timeout": 0,
    }
    if fs.config.read_only:
        options["ro"] = True
    if allow_other:
        options["allow_other"] = True
    ops = FuseOps(fs, on_ready, on_destroy)
    fuse.FUSE(ops, mountpoint, raw_fi=True, encoding=_CODEC, **options)
