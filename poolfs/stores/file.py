"""Local-directory store, the embedded default: `file:///ABS/DIR`.

Layout and invariants a newcomer must keep:

- Key `a/b` is the regular file `<root>/a/b`; a marker `a/` is the directory `<root>/a` (every
  real directory counts as a marker, so a directory never vanishes with its last file); the
  root marker `""` is `<root>` itself. Symlinks, FIFOs and other special files are not objects:
  listings skip them and lookups report NotFound.
- User metadata is JSON in the `user.poolfs` extended attribute of the file or directory;
  a missing attribute means "no metadata" (`{}`).
- Writes are atomic: content goes to a hidden temp file (`.poolfs-tmp.*`, which listings skip
  and keys may not use) in the target directory, gets its metadata, is fsynced and renamed over
  the target, and the directory is fsynced. Readers see the old file or the new one.
  `set_metadata` rewrites the attribute in place (one setxattr is atomic) and fsyncs.
- Versions: `etag` is derived from (st_ino, st_size, st_mtime_ns, st_ctime_ns). Every write
  and every set_metadata stamps mtime with a nanosecond clock value that is strictly
  increasing within the process (`_stamp`): kernel timestamps tick only every few ms and ext4
  reuses a freed inode number at once, so without the stamp two quick rewrites of the same
  size could repeat an earlier version's etag. `get_range` computes the etag from the same open
  fd it reads (and re-checks it after reading), so it never returns bytes of another version.
- Listings are sorted by key in UTF-8 byte order (S3's order; names that are not UTF-8 keep
  their bytes through surrogateescape), in pages of at most 1000 entries. A listing below
  `p/` includes the marker `p/` itself, as S3 does for a `p/` marker object.
- Errors: `_map_os_error` is the one errno table (ENOENT -> NotFound, EACCES/EPERM/EROFS ->
  Denied, ENOSPC -> Transient, EFBIG -> TooLarge, ...).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import stat
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import NoReturn

from poolfs.stores.base import (
    Changed,
    Denied,
    ListPage,
    NotFound,
    ObjectInfo,
    Store,
    StoreError,
    TooLarge,
    Transient,
)

log = logging.getLogger(__name__)

XATTR = "user.poolfs"
TMP_PREFIX = ".poolfs-tmp."
_PAGE = 1000
# O_NONBLOCK so that opening a FIFO someone left in the tree cannot hang; it does nothing
# for regular files and directories.
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
# pread/copy_file_range move at most this much per call on Linux.
_IO_MAX = 0x7FFFF000

_ERRNO_KINDS: dict[int, tuple[type[StoreError], str]] = {
    errno.ENOENT: (NotFound, "no such object"),
    errno.ENOTDIR: (NotFound, "no such object (a path component is a file)"),
    errno.ELOOP: (NotFound, "no such object (a symlink is not an object)"),
    errno.EACCES: (Denied, "permission denied"),
    errno.EPERM: (Denied, "operation not permitted"),
    errno.EROFS: (Denied, "read-only file system"),
    errno.ENOSPC: (Transient, "no space left on device"),
    errno.EDQUOT: (Transient, "disk quota exceeded"),
    errno.EIO: (Transient, "I/O error"),
    errno.EAGAIN: (Transient, "resource temporarily unavailable"),
    errno.EINTR: (Transient, "interrupted"),
    errno.EMFILE: (Transient, "too many open files"),
    errno.ENFILE: (Transient, "too many open files in system"),
    errno.ENOMEM: (Transient, "out of memory"),
    errno.EFBIG: (TooLarge, "file too large"),
    errno.E2BIG: (TooLarge, "metadata too large for an extended attribute"),
    errno.ENAMETOOLONG: (StoreError, "name too long"),
    errno.EISDIR: (StoreError, "a directory is in the way"),
    errno.ENOTSUP: (StoreError, "extended attributes not supported"),
}


def _map_os_error(op: str, path: str, key: str | None, exc: OSError) -> StoreError:
    """The one mapping from OSError to store errors (the caller chains `exc`)."""
    kind, text = _ERRNO_KINDS.get(exc.errno or 0, (StoreError, exc.strerror or "error"))
    return kind(f"file {op} {path}: {text} ({exc})", key)


_stamp_lock = threading.Lock()
_last_stamp = 0


def _stamp() -> int:
    """Now in ns, strictly greater than any stamp this process handed out before."""
    global _last_stamp
    with _stamp_lock:
        _last_stamp = max(time.time_ns(), _last_stamp + 1)
        return _last_stamp


def _etag(st: os.stat_result) -> str:
    return f"{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}-{st.st_ctime_ns:x}"


def _sort_key(key: str) -> bytes:
    return key.encode("utf-8", "surrogateescape")


def _encode_metadata(metadata: Mapping[str, str]) -> bytes:
    return json.dumps(dict(metadata), sort_keys=True, separators=(",", ":")).encode("ascii")


class FileStore(Store):
    """A pool in a local directory. Thread-safe (no mutable state); see the module docstring."""

    def __init__(self, root: str) -> None:
        if not os.path.isabs(root):
            raise ValueError(f"FileStore root must be an absolute path: {root!r}")
        self.root = os.path.normpath(root)
        self.url = f"file://{self.root}"
        self.has_root_marker = True

    def __repr__(self) -> str:
        return f"FileStore({self.root!r})"

    # --- keys and paths ----------------------------------------------------------------------

    def _check_key(self, key: str) -> None:
        if key == "":
            return
        body = key[:-1] if key.endswith("/") else key
        parts = body.split("/")
        if key.startswith("/") or "\0" in key or any(p in ("", ".", "..") for p in parts):
            raise StoreError(
                f"invalid key {key!r}: empty, '.' or '..' segment, leading '/' or NUL", key
            )
        if any(p.startswith(TMP_PREFIX) for p in parts):
            raise StoreError(f"invalid key {key!r}: {TMP_PREFIX}* names are reserved", key)

    def _path(self, key: str) -> str:
        """Filesystem path of a key; markers map to their directory (no trailing slash)."""
        body = key[:-1] if key.endswith("/") else key
        return os.path.join(self.root, body) if body else self.root

    def _fail(self, op: str, key: str, exc: OSError) -> NoReturn:
        raise _map_os_error(op, self._path(key), key, exc) from exc

    # --- reading -----------------------------------------------------------------------------

    def _open(self, op: str, key: str) -> tuple[int, os.stat_result]:
        """An fd on the object and its stat; NotFound unless it is the right kind of file."""
        self._check_key(key)
        marker = key == "" or key.endswith("/")
        path = self._path(key)
        flags = _OPEN_FLAGS | (os.O_DIRECTORY if marker else 0)
        if key == "":
            flags &= ~os.O_NOFOLLOW  # the root itself may be a symlink to the real directory
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            self._fail(op, key, exc)
        try:
            st = os.fstat(fd)
        except OSError as exc:
            os.close(fd)
            self._fail(op, key, exc)
        if not (stat.S_ISDIR(st.st_mode) if marker else stat.S_ISREG(st.st_mode)):
            os.close(fd)
            raise NotFound(f"file {op} {path}: no such object (not a regular file)", key)
        return fd, st

    def _read_metadata(self, fd: int, key: str) -> dict[str, str]:
        try:
            raw = os.getxattr(fd, XATTR)
        except OSError as exc:
            if exc.errno == errno.ENODATA:
                return {}
            self._fail("read metadata", key, exc)
        try:
            value = json.loads(raw)
        except ValueError:
            value = None
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            log.warning("file store: ignoring malformed %s on %s", XATTR, self._path(key))
            return {}
        return value

    def _info(self, key: str, st: os.stat_result, metadata: Mapping[str, str] | None) -> ObjectInfo:
        size = 0 if stat.S_ISDIR(st.st_mode) else st.st_size
        return ObjectInfo(key, size, _etag(st), st.st_mtime_ns, metadata)

    def check(self) -> None:
        try:
            st = os.stat(self.root)
        except FileNotFoundError as exc:
            raise NotFound(f"file store directory {self.root} does not exist") from exc
        except OSError as exc:
            raise _map_os_error("check", self.root, None, exc) from exc
        if not stat.S_ISDIR(st.st_mode):
            raise StoreError(f"file store path {self.root} is not a directory")
        # A real write (file + xattr) is the only reliable test: access() says yes to root
        # and knows nothing about xattr support.
        probe = os.path.join(self.root, f"{TMP_PREFIX}check.{secrets.token_hex(6)}")
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise Denied(f"file store directory {self.root} is not writable: {exc}") from exc
            raise _map_os_error("check", self.root, None, exc) from exc
        try:
            os.setxattr(fd, XATTR, b"{}")
        except OSError as exc:
            if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
                raise StoreError(
                    f"file store directory {self.root} does not support user extended "
                    f"attributes ({XATTR}); use a filesystem with user xattrs (ext4, xfs, "
                    "btrfs, tmpfs >= 6.6)"
                ) from exc
            raise _map_os_error("check", self.root, None, exc) from exc
        finally:
            os.close(fd)
            os.unlink(probe)

    def head(self, key: str) -> ObjectInfo:
        fd, st = self._open("head", key)
        try:
            return self._info(key, st, self._read_metadata(fd, key))
        finally:
            os.close(fd)

    def get_range(
        self, key: str, start: int, end: int | None, if_match: str | None = None
    ) -> tuple[bytes, ObjectInfo]:
        if start < 0:
            raise ValueError(f"negative range start {start}")
        # A retry covers a file rewritten in place by another program while we read it;
        # our own writes never do that (they rename a new inode in).
        for _ in range(3):
            try:
                fd, st = self._open("get", key)
            except NotFound as exc:
                if if_match is not None:
                    raise Changed(f"{exc} (object vanished)", key) from exc
                raise
            try:
                etag = _etag(st)
                if if_match is not None and etag != if_match:
                    raise Changed(f"file get {self._path(key)}: object changed", key)
                size = 0 if stat.S_ISDIR(st.st_mode) else st.st_size
                stop = size if end is None else min(end, size)
                data = self._pread(fd, key, start, stop - start) if stop > start else b""
                metadata = self._read_metadata(fd, key)
                after = os.fstat(fd)
            except OSError as exc:
                self._fail("get", key, exc)
            finally:
                os.close(fd)
            if _etag(after) == etag:
                return data, self._info(key, st, metadata)
            if if_match is not None:
                raise Changed(f"file get {self._path(key)}: object changed while read", key)
        raise Transient(f"file get {self._path(key)}: object keeps changing while read", key)

    def _pread(self, fd: int, key: str, offset: int, length: int) -> bytes:
        chunks: list[bytes] = []
        while length > 0:
            chunk = os.pread(fd, min(length, _IO_MAX), offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
            length -= len(chunk)
        return b"".join(chunks)

    # --- writing -----------------------------------------------------------------------------

    def _make_parents(self, key: str) -> None:
        """Create the directories above `key`; StoreError if a component is a file."""
        parts = key.rstrip("/").split("/")[:-1]
        if not parts:
            return
        if os.path.isdir(os.path.join(self.root, *parts)):
            return
        path = self.root
        for part in parts:
            parent, path = path, os.path.join(path, part)
            try:
                os.mkdir(path)
            except FileExistsError:
                if not os.path.isdir(path):
                    raise StoreError(
                        f"cannot store {key!r}: {os.path.relpath(path, self.root)!r} is a "
                        "file, not a directory",
                        key,
                    ) from None
                continue
            except OSError as exc:
                self._fail("put", key, exc)
            self._fsync_dir(parent, key)

    def _fsync_dir(self, path: str, key: str) -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            self._fail("sync", key, exc)

    def _write_object(
        self, op: str, key: str, metadata: Mapping[str, str], fill: Callable[[int], None]
    ) -> ObjectInfo:
        """Write a file object atomically: temp file, `fill(fd)`, metadata, fsync, rename."""
        self._make_parents(key)
        path = self._path(key)
        directory = os.path.dirname(path)
        tmp = os.path.join(directory, f"{TMP_PREFIX}{secrets.token_hex(8)}")
        meta = dict(metadata)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        except OSError as exc:
            self._fail(op, key, exc)
        renamed = False
        try:
            fill(fd)
            os.setxattr(fd, XATTR, _encode_metadata(meta))
            stamp = _stamp()
            os.utime(fd, ns=(stamp, stamp))
            os.fsync(fd)
            try:
                os.rename(tmp, path)
            except IsADirectoryError:
                raise StoreError(
                    f"file {op} {path}: a directory exists where the object {key!r} would go",
                    key,
                ) from None
            renamed = True
            # fstat after the rename: some filesystems move ctime on rename.
            st = os.fstat(fd)
        except OSError as exc:
            self._fail(op, key, exc)
        finally:
            os.close(fd)
            if not renamed:
                try:
                    os.unlink(tmp)
                except OSError:
                    log.warning("file store: could not remove temp file %s", tmp)
        self._fsync_dir(directory, key)
        return self._info(key, st, meta)

    def _put_marker(self, op: str, key: str, metadata: Mapping[str, str]) -> ObjectInfo:
        self._make_parents(key)
        path = self._path(key)
        try:
            os.mkdir(path)
        except FileExistsError:
            if not os.path.isdir(path):
                raise StoreError(
                    f"file {op} {path}: a file exists where the directory {key!r} would go", key
                ) from None
        except OSError as exc:
            self._fail(op, key, exc)
        else:
            self._fsync_dir(os.path.dirname(path), key)
        return self._set_metadata(op, key, metadata)

    def _set_metadata(self, op: str, key: str, metadata: Mapping[str, str]) -> ObjectInfo:
        meta = dict(metadata)
        fd, st = self._open(op, key)
        try:
            os.setxattr(fd, XATTR, _encode_metadata(meta))
            os.utime(fd, ns=(st.st_atime_ns, _stamp()))
            os.fsync(fd)
            return self._info(key, os.fstat(fd), meta)
        except OSError as exc:
            self._fail(op, key, exc)
        finally:
            os.close(fd)

    def put_bytes(self, key: str, data: bytes, metadata: Mapping[str, str]) -> ObjectInfo:
        self._check_key(key)
        if key == "" or key.endswith("/"):
            if data:
                raise StoreError(f"directory marker {key!r} cannot have content", key)
            return self._put_marker("put", key, metadata)

        def fill(fd: int) -> None:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]

        return self._write_object("put", key, metadata, fill)

    def put_file(self, key: str, path: str, metadata: Mapping[str, str]) -> ObjectInfo:
        self._check_key(key)
        with open(path, "rb") as source:
            size = os.fstat(source.fileno()).st_size
            if key == "" or key.endswith("/"):
                if size:
                    raise StoreError(f"directory marker {key!r} cannot have content", key)
                return self._put_marker("put", key, metadata)
            return self._write_object(
                "put", key, metadata, lambda fd: _copy_fd(source.fileno(), fd, size)
            )

    def set_metadata(self, key: str, metadata: Mapping[str, str]) -> ObjectInfo:
        return self._set_metadata("set_metadata", key, metadata)

    def copy(self, src: str, dst: str, metadata: Mapping[str, str] | None = None) -> ObjectInfo:
        self._check_key(dst)
        src_marker = src == "" or src.endswith("/")
        if src_marker != (dst == "" or dst.endswith("/")):
            raise StoreError(f"cannot copy {src!r} to {dst!r}: one is a directory marker", dst)
        fd, st = self._open("copy", src)
        try:
            meta = self._read_metadata(fd, src) if metadata is None else dict(metadata)
            if src_marker:
                return self._put_marker("copy", dst, meta)
            # Copying from the open fd copies exactly the version opened, even if `src` is
            # replaced meanwhile.
            return self._write_object("copy", dst, meta, lambda out: _copy_fd(fd, out, st.st_size))
        finally:
            os.close(fd)

    def delete(self, key: str) -> None:
        self._check_key(key)
        path = self._path(key)
        try:
            if key == "":
                self._drop_metadata(key)
                return
            if key.endswith("/"):
                try:
                    os.rmdir(path)
                except OSError as exc:
                    if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                        raise
                    # A marker with entries below it stays a directory; only its metadata
                    # goes.
                    self._drop_metadata(key)
                    return
            else:
                try:
                    os.unlink(path)
                except IsADirectoryError:
                    return  # the object `key` does not exist; the directory `key/` is not it
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as exc:
            self._fail("delete", key, exc)
        self._fsync_dir(os.path.dirname(path), key)

    def _drop_metadata(self, key: str) -> None:
        try:
            fd, st = self._open("delete", key)
        except NotFound:
            return
        try:
            os.removexattr(fd, XATTR)
            os.utime(fd, ns=(st.st_atime_ns, _stamp()))
            os.fsync(fd)
        except OSError as exc:
            if exc.errno != errno.ENODATA:
                self._fail("delete", key, exc)
        finally:
            os.close(fd)

    # --- listing -----------------------------------------------------------------------------

    def _entries(self, prefix: str) -> list[tuple[bytes, str, os.stat_result]]:
        """(sort key, key, stat) of the files and directories directly below `prefix`, sorted.

        Directory keys end in "/". Special files, symlinks and temp files are skipped.
        """
        out: list[tuple[bytes, str, os.stat_result]] = []
        try:
            entries = os.scandir(self._path(prefix))
        except (FileNotFoundError, NotADirectoryError):
            return out
        except OSError as exc:
            self._fail("list", prefix, exc)
        with entries:
            for entry in entries:
                if entry.name.startswith(TMP_PREFIX):
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # removed while we listed
                except OSError as exc:
                    self._fail("list", prefix + entry.name, exc)
                if stat.S_ISDIR(st.st_mode):
                    key = f"{prefix}{entry.name}/"
                elif stat.S_ISREG(st.st_mode):
                    key = prefix + entry.name
                else:
                    continue
                out.append((_sort_key(key), key, st))
        out.sort(key=lambda item: item[0])
        return out

    def _marker_stat(self, prefix: str) -> os.stat_result | None:
        try:
            st = os.stat(self._path(prefix), follow_symlinks=prefix == "")
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            self._fail("list", prefix, exc)
        return st if stat.S_ISDIR(st.st_mode) else None

    def _walk(self, prefix: str, recursive: bool) -> Iterator[ObjectInfo | str]:
        """Listing entries in key order: ObjectInfo for objects, str for common prefixes.

        Recursive walks visit a directory where its marker sorts: every key below `d/` sorts
        right after `d/` and before the next sibling, so the output stays globally sorted.
        """
        top = self._marker_stat(prefix)
        if top is None:
            return
        yield self._info(prefix, top, None)
        stack = [iter(self._entries(prefix))]
        while stack:
            item = next(stack[-1], None)
            if item is None:
                stack.pop()
                continue
            _, key, st = item
            if not key.endswith("/"):
                yield self._info(key, st, None)
            elif not recursive:
                yield key
            else:
                yield self._info(key, st, None)
                stack.append(iter(self._entries(key)))

    def list_pages(self, prefix: str, delimiter: str | None = "/") -> Iterator[ListPage]:
        if delimiter not in ("/", None):
            raise StoreError(f"file store lists with delimiter '/' or none, not {delimiter!r}")
        if prefix and not prefix.endswith("/"):
            raise StoreError(f"list prefix must be empty or end in '/': {prefix!r}", prefix)
        self._check_key(prefix)
        objects: list[ObjectInfo] = []
        prefixes: list[str] = []
        yielded = False
        for entry in self._walk(prefix, recursive=delimiter is None):
            if isinstance(entry, str):
                prefixes.append(entry)
            else:
                objects.append(entry)
            if len(objects) + len(prefixes) == _PAGE:
                yield ListPage(tuple(objects), tuple(prefixes))
                yielded = True
                objects, prefixes = [], []
        if objects or prefixes or not yielded:
            yield ListPage(tuple(objects), tuple(prefixes))


def _copy_fd(src: int, dst: int, size: int) -> None:
    """Copy `size` bytes from offset 0 of `src` to `dst` (kernel copy, reflink where possible)."""
    offset = 0
    try:
        while offset < size:
            copied = os.copy_file_range(src, dst, min(size - offset, _IO_MAX), offset)
            if copied == 0:
                break
            offset += copied
        return
    except OSError as exc:
        # Old kernels or filesystem pairs without copy_file_range: sendfile does file to file.
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
    while offset < size:
        sent = os.sendfile(dst, src, offset, min(size - offset, _IO_MAX))
        if sent == 0:
            break
        offset += sent
