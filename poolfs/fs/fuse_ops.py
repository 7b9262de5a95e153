"""The FUSE adapter (mfusepy on libfuse3): the only module that imports a fuse binding.

It links mfusepy's path-based Operations to `PoolFS` and turns `PoolFSError` into
`FuseOSError`. Anything else escaping the core is logged once with the operation and path and
answered with EIO (never the binding's default EINVAL). mfusepy ignores `Operations.__call__`,
so every operation carries the `_errors` decorator; a new operation without it would answer
EINVAL for an unexpected exception: keep the decorator on each one.

Why mfusepy on libfuse3 and not fusepy on libfuse2 (numbers in bench/README.md): libfuse2 caps
every read and write request at 128 KiB, libfuse3 takes 1 MiB, so a sequential read with a
large kernel read-ahead costs an eighth of the trips through ctypes and the core.

Settings and why (the mount options are in `serve`, the connection and library settings in
`init_with_config`, where libfuse3 takes them):
- atomic O_TRUNC (FUSE_CAP_ATOMIC_O_TRUNC): O_TRUNC arrives with open(), so truncating an
  existing file does not first store an empty object that readers could see.
- `default_permissions`: the kernel enforces the mode bits we report.
- max_write 1 MiB (libfuse3's largest buffer); reads are as large as the kernel asks, up to
  the same 1 MiB. `_FUSE.read` copies each answer once, from a span of the fetched part
  straight into libfuse's buffer (`PoolFS.read_span`): mfusepy's own read would first need
  the answer as new bytes, one more copy of every byte read.
- kernel read-ahead (`/sys/class/bdi/MAJ:MIN/read_ahead_kb`) raised from 128 KiB to
  DEFAULT_READ_AHEAD_KIB: the kernel sizes buffered sequential reads by it, so without it even
  libfuse3 gets 128 KiB read requests. It is set at the first request after INIT, not in init:
  the kernel caps it at the INIT reply's max_readahead (128 KiB) when that reply arrives, and it
  sends nothing else before. Needs root; otherwise the default stays and the mount works.
- attr/entry timeouts = metadata_ttl: the kernel caches what our own cache would answer anyway.
- keep_cache on open when the core says the kernel's cached pages are of the version the
  handle pinned (PoolFS.keep_cache): a re-read of an unchanged file is served by the kernel.
- `use_ino` with inode numbers derived from the path: the kernel forgets a FUSE inode as soon
  as its dentry is unused past entry_timeout, and libfuse then numbers the next lookup anew.
  Tools that compare st_ino over time (GNU cp/mv "replaced while being copied", tar, find)
  need the number to stay put; a rename gives a new number.
- READDIRPLUS with attributes: a listing is taken once per opendir and sent page by page with
  each entry's attributes, so `ls -l` needs no LOOKUP per entry (10,000 entries on SeaweedFS:
  1.6-1.9 s -> 1.2-1.4 s). libfuse keeps one node per name it was given.
- renameat2 flags: RENAME_NOREPLACE is a rename after checking the target is absent (the
  kernel holds both directories locked, so no local create can slip in; other nodes can, as
  with any check on a blob store). RENAME_EXCHANGE and RENAME_WHITEOUT cannot be done on a
  blob store and answer EINVAL, as on libfuse2 (which never passed flags on).
- utimensat: with `use_ns` the times arrive as integer nanoseconds and UTIME_OMIT / UTIME_NOW
  as tv_nsec (1 << 30) - 2 / (1 << 30) - 1 with tv_sec 0; the core honours both.
- Worker threads: libfuse3's default of at most 10. libfuse 3.14.0 prints "Ignoring invalid
  max threads value 4294967295" at start (its compat fuse_main leaves the field unset); the
  message is harmless and `-o max_threads` does not reach that code.
"""

from __future__ import annotations

import codecs
import ctypes
import ctypes.util
import errno
import functools
import hashlib
import logging
import operator
import os
import re
import stat
import struct
import threading
from collections.abc import Callable
from typing import Any, TypeVar, cast

# mfusepy loads libfuse.so.2 when both libraries are installed; it reads its choice from the
# environment at import time, so name libfuse3 before importing it (an explicit
# FUSE_LIBRARY_PATH set by the operator still wins).
if not os.environ.get("FUSE_LIBRARY_PATH"):
    _LIBFUSE3 = ctypes.util.find_library("fuse3")
    if _LIBFUSE3 is None:
        raise ImportError("libfuse3 not found: install the Debian packages fuse3 and libfuse3-3")
    os.environ["FUSE_LIBRARY_PATH"] = _LIBFUSE3

import mfusepy as fuse

from poolfs.fs.core import PoolFS
from poolfs.fs.errors import PoolFSError
from poolfs.fs.meta import Node, join, parent_path
from poolfs.fs.readahead import Span

if fuse.fuse_version_major != 3:
    raise ImportError(
        f"mfusepy loaded libfuse {fuse.fuse_version_major}.{fuse.fuse_version_minor}; "
        "poolfs needs libfuse3 (FUSE_LIBRARY_PATH names another library?)"
    )

log = logging.getLogger("poolfs.fuse")

MiB = 1024 * 1024
# fuse_common.h: the kernel honours O_TRUNC in open() instead of a separate truncate.
FUSE_CAP_ATOMIC_O_TRUNC = 1 << 3
# linux/fs.h renameat2 flags.
RENAME_NOREPLACE = 1 << 0
# fuse.h: the kernel asks for attributes with the entries; we give them.
FUSE_READDIR_PLUS = 1 << 0
FUSE_FILL_DIR_PLUS = 1 << 1
# The largest request libfuse3's buffers take (FUSE_MAX_MAX_PAGES pages).
MAX_REQUEST = MiB
# Kernel read-ahead of a mount, KiB (bench/README.md: 1 MiB beat 128 KiB and 4 MiB).
DEFAULT_READ_AHEAD_KIB = 1024

# Paths are bytes in the kernel; names that are not UTF-8 must reach the core intact (it answers
# EILSEQ for them) rather than fail inside mfusepy's decode.
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


# What getattr and READDIRPLUS report, in this order (times as (seconds, nanoseconds)).
STAT_FIELDS = (
    "st_ino",
    "st_nlink",
    "st_mode",
    "st_uid",
    "st_gid",
    "st_size",
    "st_blksize",
    "st_blocks",
    "st_atimespec",
    "st_mtimespec",
    "st_ctimespec",
)


class StatPacker:
    """Writes `STAT_FIELDS` into libfuse's `struct stat` with one `struct.pack`.

    Why: mfusepy's `set_st_attrs` sets each field through ctypes from a dict; for the 10,000
    entries of `ls -l` that was ~60 ms of the worker's ~100 ms of CPU (bench/README.md). The
    layout (offsets, sizes, signedness) is read from mfusepy's `c_stat`, so this holds on any
    platform it describes; bytes not named here are zero.
    """

    def __init__(self, c_stat: Any) -> None:
        slots: list[tuple[int, str, int]] = []  # (offset, struct code, index in a value tuple)
        index = 0
        for name in STAT_FIELDS:
            field = getattr(c_stat, name)
            kind = dict(c_stat._fields_)[name]
            if name.endswith("timespec"):
                for part in ("tv_sec", "tv_nsec"):
                    sub = getattr(kind, part)
                    code = _struct_code(dict(kind._fields_)[part], sub.size)
                    slots.append((field.offset + sub.offset, code, index))
                    index += 1
            else:
                slots.append((field.offset, _struct_code(kind, field.size), index))
                index += 1
        slots.sort()
        fmt, at = "=", 0
        for offset, code, _ in slots:
            if offset < at:
                raise ValueError(f"overlapping fields in {c_stat.__name__}")
            fmt += f"{offset - at}x{code}" if offset > at else code
            at = offset + struct.calcsize("=" + code)
        self.size = ctypes.sizeof(c_stat)
        fmt += f"{self.size - at}x" if self.size > at else ""
        self._struct = struct.Struct(fmt)
        self._order = operator.itemgetter(*(i for _, _, i in slots))
        self.values_count = index

    def pack(self, values: tuple[int, ...]) -> bytes:
        """`values`: one int per field of STAT_FIELDS, two per timespec."""
        return self._struct.pack(*self._order(values))

    def pack_into(self, buffer: Any, values: tuple[int, ...]) -> None:
        self._struct.pack_into(buffer, 0, *self._order(values))


def _struct_code(kind: Any, size: int) -> str:
    signed = kind._type_ in "bhilq"
    codes = {1: "b", 2: "h", 4: "i", 8: "q"}
    if size not in codes:
        raise ValueError(f"no struct code for a {size}-byte field")
    code = codes[size]
    return code if signed else code.upper()


STAT = StatPacker(fuse.c_stat)
_NS = 1_000_000_000
_NO_VALUES = (0,) * (STAT.values_count - 3)  # after ino, nlink, mode


def _fh(fi: Any) -> int | None:
    """The handle number in a fuse_file_info (None for a NULL pointer / path-only call)."""
    if not fi:
        return None
    return int(fi.fh)


def _mount_device(mountpoint: str) -> str | None:
    """MAJ:MIN of the topmost mount at `mountpoint`, from /proc/self/mountinfo.

    Not os.stat(): the caller is the daemon serving that mount, inside one of its requests.
    """
    found = None
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            target = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
            if target == mountpoint:
                found = fields[2]
    return found


def set_kernel_read_ahead(mountpoint: str, kib: int) -> None:
    """Set the read-ahead of the mount's backing device; log, never raise, if we cannot."""
    try:
        dev = _mount_device(mountpoint)
        if dev is None:
            log.warning("kernel read-ahead unchanged: %s not in mountinfo", mountpoint)
            return
        with open(f"/sys/class/bdi/{dev}/read_ahead_kb", "w") as f:
            f.write(f"{kib}\n")
    except OSError as exc:
        # Not root: the mount works, sequential reads get 128 KiB requests.
        log.info("kernel read-ahead of %s stays at the default: %s", mountpoint, exc)


_Op = TypeVar("_Op", bound=Callable[..., Any])


def _errors(method: _Op) -> _Op:
    """PoolFSError -> its errno; anything unexpected is logged once and answered with EIO."""
    op = method.__name__

    @functools.wraps(method)
    def wrapper(self: FuseOps, *args: Any) -> Any:
        try:
            return method(self, *args)
        except PoolFSError as exc:
            raise fuse.FuseOSError(exc.errno) from exc
        except fuse.FuseOSError:
            raise
        except Exception as exc:
            path = args[0] if args and isinstance(args[0], str) else "?"
            log.error("unexpected error in %s %r", op, path, exc_info=exc)
            raise fuse.FuseOSError(errno.EIO) from exc

    return cast(_Op, wrapper)


class FuseOps(fuse.Operations):  # type: ignore[misc]
    use_ns = True

    def __init__(
        self,
        fs: PoolFS,
        on_ready: Callable[[], None] | None = None,
        on_destroy: Callable[[list[str]], None] | None = None,
        *,
        mountpoint: str | None = None,
        read_ahead_kib: int | None = None,
    ) -> None:
        self.fs = fs
        self._mountpoint = mountpoint
        self._read_ahead_kib = read_ahead_kib
        self._read_ahead_lock = threading.Lock()
        self._on_ready = on_ready
        self._on_destroy = on_destroy
        self._uid = fs.config.uid
        self._gid = fs.config.gid
        self.destroyed = False
        self._dirs: dict[int, list[tuple[str, str, Node | None]] | None] = {}
        self._dirs_lock = threading.Lock()
        self._next_dir = 1

    # --- lifecycle ---------------------------------------------------------------------

    def init_with_config(self, conn: Any, config: Any) -> None:
        # Called once the kernel's INIT arrives, i.e. the mount is live. It must not raise:
        # mfusepy would end the process without unmounting.
        try:
            ttl = self.fs.config.metadata_ttl
            if config is not None:
                config.use_ino = 1
                config.attr_timeout = ttl
                config.entry_timeout = ttl
                config.negative_timeout = 0.0
            if conn is not None:
                conn.max_write = MAX_REQUEST
                if conn.capable & FUSE_CAP_ATOMIC_O_TRUNC:
                    conn.want |= FUSE_CAP_ATOMIC_O_TRUNC
        except Exception:
            log.exception("FUSE init settings failed")
        if self._on_ready is not None:
            self._on_ready()

    def _after_init(self) -> None:
        """Settings the kernel only keeps once it has processed our INIT reply."""
        if self._read_ahead_kib is None:
            return
        with self._read_ahead_lock:
            kib, self._read_ahead_kib = self._read_ahead_kib, None
        if kib is not None and self._mountpoint is not None:
            set_kernel_read_ahead(self._mountpoint, kib)

    @_errors
    def destroy(self, path: str) -> None:
        self.destroyed = True
        failed = self.fs.shutdown()
        if self._on_destroy is not None:
            self._on_destroy(failed)

    # --- attributes --------------------------------------------------------------------

    def stat_values(self, path: str, node: Node) -> tuple[int, ...]:
        """What getattr reports for `path`, as `StatPacker` takes it (STAT_FIELDS order)."""
        size = node.size
        return (
            inode_number(path),
            2 if node.is_dir else 1,
            node.st_mode(),
            self._uid,
            self._gid,
            size,
            MAX_REQUEST,
            (size + 511) // 512,
            *divmod(node.atime_ns, _NS),
            *divmod(node.mtime_ns, _NS),
            *divmod(node.ctime_ns, _NS),
        )

    def _stat(self, path: str, node: Node) -> dict[str, int]:
        ino, nlink, mode, uid, gid, size, blksize, blocks = self.stat_values(path, node)[:8]
        return {
            "st_ino": ino,
            "st_mode": mode,
            "st_nlink": nlink,
            "st_size": size,
            "st_uid": uid,
            "st_gid": gid,
            "st_atime": node.atime_ns,
            "st_mtime": node.mtime_ns,
            "st_ctime": node.ctime_ns,
            "st_blocks": blocks,
            "st_blksize": blksize,
        }

    @_errors
    def getattr(self, path: str, fi: Any = None) -> dict[str, int]:
        self._after_init()
        return self._stat(path, self.fs.getattr(path, _fh(fi)))

    @_errors
    def getattr_values(self, path: str, fi: Any = None) -> tuple[int, ...]:
        """`getattr` as `stat_values` (what `_FUSE.fgetattr` packs)."""
        self._after_init()
        return self.stat_values(path, self.fs.getattr(path, _fh(fi)))

    def _listing(self, path: str) -> list[tuple[str, str, Node | None]]:
        """(name, path, node) of every entry; node None for . and .. (type and inode only)."""
        entries: list[tuple[str, str, Node | None]] = [
            (".", path, None),
            ("..", parent_path(path), None),
        ]
        entries.extend((name, join(path, name), node) for name, node in self.fs.readdir(path))
        return entries

    def entry_attrs(self, entry: tuple[str, str, Node | None]) -> dict[str, int]:
        _, path, node = entry
        if node is None:
            return {"st_ino": inode_number(path), "st_mode": stat.S_IFDIR}
        return self._stat(path, node)

    def entry_values(self, entry: tuple[str, str, Node | None], full: bool) -> tuple[int, ...]:
        """`entry_attrs` as `stat_values`; without `full` only the inode number and type."""
        _, path, node = entry
        if full and node is not None:
            return self.stat_values(path, node)
        mode = stat.S_IFDIR if node is None or node.is_dir else stat.S_IFREG
        return (inode_number(path), 0, mode, *_NO_VALUES)

    @_errors
    def opendir(self, path: str) -> int:
        # A listing is taken at the first readdir of an open directory (offset 0, also after a
        # rewinddir) and served page by page from here: with offsets, the kernel asks for one
        # 4 KiB page of entries per request. Listing errors surface in readdir, as before.
        self._after_init()
        with self._dirs_lock:
            fh = self._next_dir
            self._next_dir += 1
            self._dirs[fh] = None
        return fh

    @_errors
    def dir_entries(
        self, path: str | None, fh: int, offset: int = 0
    ) -> list[tuple[str, str, Node | None]]:
        with self._dirs_lock:
            if fh not in self._dirs:
                raise fuse.FuseOSError(errno.EBADF)
            entries = self._dirs[fh]
        if entries is None or offset == 0:
            if path is None:
                raise fuse.FuseOSError(errno.EBADF)
            entries = self._listing(path)
            with self._dirs_lock:
                if fh in self._dirs:
                    self._dirs[fh] = entries
        return entries

    @_errors
    def releasedir(self, path: str | None, fh: int) -> None:
        with self._dirs_lock:
            self._dirs.pop(fh, None)

    @_errors
    def readdir(self, path: str, fh: int) -> list[tuple[str, dict[str, int], int]]:
        # mfusepy's own readdir path (unused: `_FUSE.readdir_fuse_3` replaces it). Each entry
        # carries its inode number and type: for bare names mfusepy fills a zeroed stat, and
        # with use_ino an entry with inode 0 is one glibc's readdir skips.
        return [(e[0], self.entry_attrs(e), 0) for e in self.dir_entries(path, fh)]

    @_errors
    def statfs(self, path: str) -> dict[str, int]:
        self._after_init()
        return self.fs.statfs()

    @_errors
    def chmod(self, path: str, mode: int) -> None:
        self.fs.chmod(path, mode)

    @_errors
    def chown(self, path: str, uid: int, gid: int) -> None:
        self.fs.chown(path, uid, gid)

    @_errors
    def utimens(self, path: str, times: tuple[int, int] | None = None) -> None:
        self.fs.utimens(path, times)

    @_errors
    def truncate(self, path: str, length: int, fi: Any = None) -> None:
        self.fs.truncate(path, length, _fh(fi))

    # --- namespace ---------------------------------------------------------------------

    @_errors
    def mkdir(self, path: str, mode: int) -> None:
        self.fs.mkdir(path, mode)

    @_errors
    def rmdir(self, path: str) -> None:
        self.fs.rmdir(path)

    @_errors
    def unlink(self, path: str) -> None:
        self.fs.unlink(path)

    @_errors
    def rename(self, old: str, new: str, flags: int = 0) -> None:
        if flags & ~RENAME_NOREPLACE:
            raise fuse.FuseOSError(errno.EINVAL)
        if flags & RENAME_NOREPLACE:
            try:
                self.fs.getattr(new)
            except PoolFSError as exc:
                if exc.errno != errno.ENOENT:
                    raise
            else:
                raise fuse.FuseOSError(errno.EEXIST)
        self.fs.rename(old, new)

    @_errors
    def symlink(self, target: str, source: str) -> None:
        self.fs.unsupported("symlink")

    @_errors
    def link(self, target: str, source: str) -> None:
        self.fs.unsupported("link")

    @_errors
    def mknod(self, path: str, mode: int, dev: int) -> None:
        self.fs.unsupported("mknod")

    @_errors
    def readlink(self, path: str) -> str:
        raise fuse.FuseOSError(errno.EINVAL)

    # --- file I/O ------------------------------------------------------------------------

    @_errors
    def create(self, path: str, mode: int, fi: Any) -> int:
        fi.fh = self.fs.create(path, mode, fi.flags)
        return 0

    @_errors
    def open(self, path: str, fi: Any) -> int:
        self._after_init()
        fi.fh = self.fs.open(path, fi.flags)
        # Without keep_cache the kernel drops the file's cached pages at every open.
        fi.keep_cache = 1 if self.fs.keep_cache(fi.fh) else 0
        return 0

    @_errors
    def read(self, path: str | None, size: int, offset: int, fi: Any) -> bytes:
        return self.fs.read(int(fi.fh), offset, size)

    @_errors
    def read_span(self, path: str | None, size: int, offset: int, fi: Any) -> Span:
        return self.fs.read_span(int(fi.fh), offset, size)

    @_errors
    def write(self, path: str | None, data: bytes | memoryview, offset: int, fi: Any) -> int:
        return self.fs.write(int(fi.fh), offset, data)

    @_errors
    def flush(self, path: str | None, fi: Any) -> None:
        self.fs.flush(int(fi.fh))

    @_errors
    def fsync(self, path: str | None, datasync: int, fi: Any) -> None:
        self.fs.fsync(int(fi.fh))

    @_errors
    def release(self, path: str | None, fi: Any) -> None:
        self.fs.release(int(fi.fh))


class _FUSE(fuse.FUSE):  # type: ignore[misc]
    """mfusepy's FUSE with what it leaves out on libfuse3.

    mfusepy 3.x copies every write request into bytes (see `write`), calls
    `truncate(path, length)` without the file handle and `rename(old, new)`
    without the renameat2 flags; the core needs the handle (ftruncate of an open file) and the
    adapter must see the flags to refuse them rather than silently replace a target. And it
    never answers READDIRPLUS with attributes, so `ls -l` of a directory costs one LOOKUP
    round trip per entry although the listing already knows every attribute.
    """

    def readdir_fuse_3(
        self, path: bytes | None, buf: Any, filler: Any, offset: int, fip: Any, flags: int
    ) -> int:
        # Entries go out with offsets (index + 1), so libfuse writes them straight into the
        # kernel's page instead of buffering the whole directory, and for READDIRPLUS with
        # FUSE_FILL_DIR_PLUS it registers each entry (do_lookup) and sends its attributes:
        # `ls -l` then needs no LOOKUP per entry. (libfuse answers a whole-directory,
        # offset-0 listing with inode 0 for PLUS entries, which the kernel ignores.)
        ops = self.operations
        name = None if path is None else path.decode(self.encoding, self.errors)
        entries = ops.dir_entries(name, fip.contents.fh, offset)
        plus = bool(flags & FUSE_READDIR_PLUS)
        raw = bytearray(STAT.size)
        st = fuse.c_stat.from_buffer(raw)
        for index in range(offset, len(entries)):
            entry = entries[index]
            full = plus and entry[2] is not None
            STAT.pack_into(raw, ops.entry_values(entry, full))
            fill = FUSE_FILL_DIR_PLUS if full else 0
            if filler(buf, entry[0].encode(self.encoding, self.errors), st, index + 1, fill):
                break
        return 0

    def fgetattr(self, path: bytes | None, buf: Any, fip: Any) -> int:
        # mfusepy's fgetattr sets each field from getattr's dict (see StatPacker).
        name = None if path is None else path.decode(self.encoding, self.errors)
        values = self.operations.getattr_values(name, fip.contents if fip else None)
        data = STAT.pack(values)
        ctypes.memmove(buf, data, len(data))
        return 0

    def read(self, path: bytes | None, buf: Any, size: int, offset: int, fip: Any) -> int:
        # mfusepy's read copies the answer into libfuse's buffer; here the answer is a span of
        # a fetched part, copied once from there (no slice of it as new bytes first). The
        # address of the bytes' own buffer comes from c_char_p, which does not copy; that of
        # a part buffer (an mmap) from ctypes' view of it.
        name = None if path is None else path.decode(self.encoding, self.errors)
        span: Span = self.operations.read_span(name, size, offset, fip.contents)
        data, lo, hi = span
        count = hi - lo
        if count <= 0:
            return 0
        if count > size:
            raise fuse.FuseOSError(errno.EIO)
        if isinstance(data, bytes):
            base = ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value
        else:
            base = ctypes.addressof(ctypes.c_char.from_buffer(data))
        assert base is not None  # a non-empty bytes object has a buffer
        ctypes.memmove(buf, base + lo, count)
        return count

    def write(self, path: bytes | None, buf: Any, size: int, offset: int, fip: Any) -> int:
        # mfusepy copies each request (up to 1 MiB) into a bytes object; the core only
        # pwrites it into the staging file, so hand it a view of libfuse's buffer instead.
        # The view is released on return: nothing can read the buffer after libfuse reuses it.
        name = None if path is None else path.decode(self.encoding, self.errors)
        request = ctypes.cast(buf, ctypes.POINTER(ctypes.c_ubyte * size)).contents
        with memoryview(request) as raw, raw.cast("B") as data:
            return cast(int, self.operations.write(name, data, offset, fip.contents))

    def truncate_fuse_3(self, path: bytes | None, length: int, fip: Any) -> int:
        fi = fip.contents if fip else None
        name = None if path is None else path.decode(self.encoding, self.errors)
        return cast(int, self.operations.truncate(name, length, fi))

    def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:
        return cast(
            int,
            self.operations.rename(
                old.decode(self.encoding, self.errors),
                new.decode(self.encoding, self.errors),
                flags,
            ),
        )


def serve(
    fs: PoolFS,
    mountpoint: str,
    *,
    fsname: str,
    allow_other: bool = False,
    on_ready: Callable[[], None] | None = None,
    on_destroy: Callable[[list[str]], None] | None = None,
    debug: bool = False,
    read_ahead_kib: int | None = DEFAULT_READ_AHEAD_KIB,
) -> None:
    """Mount and run the FUSE loop in this thread until unmounted or SIGTERM/SIGINT.

    `read_ahead_kib`: the kernel read-ahead of the mount (None: the kernel's 128 KiB).
    """
    options: dict[str, Any] = {
        "foreground": True,
        "nothreads": False,
        "debug": debug,
        "fsname": fsname.replace(",", "%2C").replace(" ", "%20"),
        "subtype": "poolfs",
        "default_permissions": True,
    }
    if fs.config.read_only:
        options["ro"] = True
    if allow_other:
        options["allow_other"] = True
    ops = FuseOps(fs, on_ready, on_destroy, mountpoint=mountpoint, read_ahead_kib=read_ahead_kib)
    try:
        _FUSE(ops, mountpoint, raw_fi=True, encoding=_CODEC, **options)
    except RuntimeError as exc:
        # libfuse3's fuse_main answers 8 whenever its loop ended with an error, and its signal
        # handler records SIGTERM/SIGINT/SIGHUP as the session's error (libfuse2 answered 0).
        # Once destroy has run, the mount was live and ended with everything flushed.
        if not ops.destroyed:
            raise
        log.info("FUSE loop ended (libfuse code %s: a termination signal)", exc)
