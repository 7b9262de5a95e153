"""The filesystem core: POSIX operations on a pool in a blob store. Never imports fuse.

Concurrency rules (multithreaded FUSE calls every method from many threads):
- `_lock` guards the caches and the open-file tables; it is never held during store I/O.
- `_ns_lock` serializes namespace changes (create, mkdir, rmdir, unlink, rename) so that the
  checks they make (exists? empty?) still hold when they act. Reads and writes never take it.
- A `StagedFile` has its own lock for its staging data.

Caching rules (close-to-open):
- Attributes and directory listings are cached for `metadata_ttl` seconds; our own changes
  update the caches at once. `open` always asks the store (one GET that both revalidates and
  returns the first block), so a file opened after another node's close sees the new content.
  Two exceptions keep that bound: a first block fetched ahead (by the lookup of the file, or
  by a directory walk) is used by an open for reading if it is younger than `metadata_ttl`;
  and a reopen of a path whose previous open may have left the version in the kernel's page
  cache revalidates with a HEAD and no bytes (see "Kernel page cache").
- A lookup that finds a file fetches its first block with the same GET that tells it is a
  file (instead of a HEAD), so the open that usually follows needs no request. The table of
  blocks fetched ahead is bounded (`_AHEAD_MAX` entries) and an entry dies with any change
  of its path.
- The root's attributes, once expired, are answered from the cache while one HEAD
  revalidates them in the background (the root always exists; the kernel asks for them before
  every path walk). A change of the root marker by another client shows one getattr later.
- getattr of a name in a freshly listed directory is served from the listing: `ls -l` costs
  LIST requests only. Such entries carry the size and LastModified of the listing plus any
  POSIX metadata this mount has read for the same version.

Kernel page cache (FOPEN_KEEP_CACHE; without it the kernel drops a file's pages at each open):
- `_kept[path]` is the etag whose bytes the kernel may hold for `path`: set by an open for
  reading when every reader of the path open at that moment pins that same etag, dropped by
  every recorded change of the path (`_set_node`: upload, unlink, rename, setattr), by a
  rename of a directory above it, and by any open while a staged (written) file exists.
- An open for reading keeps the cache only if its pinned etag equals `_kept[path]` and every
  open reader of the path pins that etag too: the page cache is shared by all handles of an
  inode, so a handle of another version could have filled it with its bytes.
- So a reader sees the kernel's cached bytes only for the version it pinned at open, and the
  pinned version is at most `metadata_ttl` old (see above): never stale bytes beyond the TTL.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import dataclasses
import errno
import logging
import os
import signal
import threading
import time
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from typing import Literal

from poolfs.fs.config import FSConfig
from poolfs.fs.errors import PoolFSError, from_store, unexpected
from poolfs.fs.files import Context, PinnedReader, Spill, StagedFile
from poolfs.fs.meta import (
    DEFAULT_DIR_MODE,
    DEFAULT_FILE_MODE,
    NAME_MAX,
    Node,
    decode_meta,
    dir_marker,
    encode_meta,
    join,
    parent_path,
    path_to_key,
    valid_name,
)
from poolfs.fs.readahead import ByteBudget, Span, done_future, span_bytes
from poolfs.stores import NotFound, ObjectInfo, Store, StoreError

log = logging.getLogger("poolfs.fs")

UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2

_META_CACHE_SIZE = 200_000
# How long after a listing expired a lookup in that directory refreshes the whole listing.
_RELIST_WINDOW = 60.0
_CHANGE_LOG_MAX = 20_000
# Cache bounds for long-lived mounts (a `find` over millions of names must not grow the worker
# without end): attributes of this many paths, listings of at most this many directories
# holding at most this many entries together. Expired entries go first, then the oldest.
_NODES_MAX = 100_000
_LISTINGS_MAX = 1024
_LISTED_ENTRIES_MAX = 500_000
# Opens that walk a listed directory in name order fetch this many next small files ahead.
_WALK_AHEAD = 8
# First blocks fetched ahead (walks, lookups) kept at once: at most this many first_blocks.
_AHEAD_MAX = 32
# Requests one lookup sends at once (`_resolve`): first-block GET, marker HEAD, LIST.
_LOOKUP_FANOUT = 3
# Paths whose kernel-cached version is remembered (`_kept`).
_KEPT_MAX = 16_384


def _block_signals() -> None:
    # Termination signals belong to the main thread, where the FUSE loop's handlers end it.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})


@dataclasses.dataclass(slots=True)
class _Listing:
    children: dict[str, Node]
    expires: float
    # Names in order, made when a directory walk needs them; dropped on any change.
    ordered: list[str] | None = None


@dataclasses.dataclass(slots=True)
class _Handle:
    path: str
    staged: StagedFile | None
    reader: PinnedReader | None
    writable: bool
    append: bool
    keep_cache: bool = False


class PoolFS:
    """POSIX operations over one `Store`. Errors are `PoolFSError` with the errno to return."""

    def __init__(self, store: Store, config: FSConfig) -> None:
        self.store = store
        self.config = config
        self._lock = threading.RLock()
        self._ns_lock = threading.RLock()
        self._nodes: dict[str, tuple[Node | None, float]] = {}
        self._listings: dict[str, _Listing] = {}
        self._relisting: dict[str, threading.Event] = {}
        # dir path -> name -> (sequence number, node or None): our changes made while a LIST
        # of that directory was under way, for that LIST to apply (see `_list`).
        self._changes: dict[str, dict[str, tuple[int, Node | None]]] = {}
        # dir path -> the sequence number at the start of each LIST of it under way.
        self._listing_since: dict[str, list[int]] = {}
        self._seq = 0
        # Directory walks: dir path -> last name opened; key -> (first-block GET, started).
        self._walks: dict[str, str] = {}
        self._ahead: dict[str, tuple[Future[tuple[bytes, ObjectInfo]], float]] = {}
        # key -> (etag, last_modified second, metadata): POSIX metadata seen for a version.
        self._meta_seen: collections.OrderedDict[str, tuple[str, int, dict[str, str]]] = (
            collections.OrderedDict()
        )
        self._staged: dict[str, StagedFile] = {}
        self._readers: dict[str, set[PinnedReader]] = {}
        # path -> etag the kernel may cache for it (see "Kernel page cache" above).
        self._kept: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._handles: dict[int, _Handle] = {}
        self._next_fh = 1
        self._logged: set[str] = set()
        self._root_refreshing = False
        # Names the root's first LIST page showed as directories at mount, until when.
        self._root_dirs: tuple[set[str], float] = (set(), 0.0)
        self._started_ns = time.time_ns()
        self._executor = ThreadPoolExecutor(
            config.io_threads, thread_name_prefix="poolfs-io", initializer=_block_signals
        )
        self._spill = Spill(config.spill_dir)
        self._ctx = Context(
            store, config, self._executor, ByteBudget(config.readahead_budget), self._spill
        )

    # ------------------------------------------------------------------ lifecycle

    def shutdown(self) -> list[str]:
        """Upload everything pending, release all handles; returns paths that failed."""
        failed: list[str] = []
        with self._lock:
            staged = list(self._staged.values())
            handles = list(self._handles)
        for sf in staged:
            try:
                self._upload(sf)
            except PoolFSError as exc:
                failed.append(sf.path)
                log.error("pending write of %r lost at shutdown: %s", sf.path, exc)
        for fh in handles:
            with contextlib.suppress(PoolFSError):
                self.release(fh)
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._ctx.buffers.close()
        self._spill.cleanup()
        self.store.close()
        return failed

    def warm_up(self) -> None:
        """Start the I/O threads and store connections that a cold lookup uses at once.

        `_resolve` sends three requests in parallel, two of them from executor threads; on a
        fresh mount the first lookup would also start those threads and open two more store
        connections. Here `_LOOKUP_FANOUT` overlapping cheap requests do that at mount: one
        lists the root's first page (`_note_root_dirs`), the others ask whether the pool holds
        anything. Measured on SeaweedFS: open + read(1) of a file one directory down on a
        fresh mount, median of 15, 15.95 -> 14.43 ms; the root's directories then need one
        HEAD instead of a three-request lookup (bench/README.md). Store errors are ignored:
        the mount's own check reports an unreachable store.
        """
        parallel = min(_LOOKUP_FANOUT, self.config.io_threads)
        together = threading.Barrier(parallel)

        def probe(i: int) -> None:
            with contextlib.suppress(threading.BrokenBarrierError):
                together.wait(timeout=1.0)
            with contextlib.suppress(StoreError):
                if i == 0:
                    self._note_root_dirs()
                else:
                    self.store.any_below("")

        for fut in [self._executor.submit(probe, i) for i in range(parallel)]:
            fut.result()

    def _note_root_dirs(self) -> None:
        """Remember which names the first LIST page of the root shows as directories, for
        metadata_ttl: `_resolve` then needs only their marker's HEAD (for its attributes),
        not the three requests of a cold lookup. Only a hint for names seen as directories:
        nothing is cached as a listing (a listing's file attributes lack the metadata a
        lookup reads) and absent names are looked up as before."""
        expires = self._expiry()
        page = next(iter(self.store.list_pages("", "/")), None)
        if page is None:
            return
        names = {p[:-1] for p in page.prefixes if p.endswith("/")}
        usable = {n for n in names if self._usable(n, n + "/")}
        for info in page.objects:
            if info.key in usable:  # as the lookup would have found (`_resolve`)
                self._log_shadowed(info.key)
        with self._lock:
            self._root_dirs = (usable, expires)

    # ------------------------------------------------------------------ helpers

    def _now(self) -> int:
        return time.time_ns()

    def _fresh(self, expires: float) -> bool:
        return time.monotonic() < expires

    def _expiry(self) -> float:
        return time.monotonic() + self.config.metadata_ttl

    def _check_writable(self) -> None:
        if self.config.read_only:
            raise PoolFSError(errno.EROFS)

    def _mode(self, mode: int) -> int:
        return mode & ~0o222 if self.config.read_only else mode

    def _log_once(self, tag: str, msg: str, *args: object) -> None:
        with self._lock:
            if tag in self._logged:
                return
            self._logged.add(tag)
        log.warning(msg, *args)

    def _remember_meta(self, info: ObjectInfo) -> None:
        if info.metadata is None:
            return
        with self._lock:
            self._meta_seen[info.key] = (
                info.etag,
                info.last_modified_ns // 1_000_000_000,
                dict(info.metadata),
            )
            self._meta_seen.move_to_end(info.key)
            while len(self._meta_seen) > _META_CACHE_SIZE:
                self._meta_seen.popitem(last=False)

    def _file_node(self, info: ObjectInfo) -> Node:
        metadata = info.metadata
        if metadata is None:
            with self._lock:
                seen = self._meta_seen.get(info.key)
            if seen and seen[0] == info.etag and seen[1] == info.last_modified_ns // 1_000_000_000:
                metadata = seen[2]
        else:
            self._remember_meta(info)
        mode, mtime, atime, has = decode_meta(metadata, info.last_modified_ns, DEFAULT_FILE_MODE)
        return Node(
            False, info.size, self._mode(mode), mtime, atime, max(mtime, atime), info.etag, has
        )

    def _dir_node(self, info: ObjectInfo | None, marker_key: str) -> Node:
        metadata = info.metadata if info is not None else None
        if info is not None and metadata is None:
            with self._lock:
                seen = self._meta_seen.get(marker_key)
            metadata = seen[2] if seen else None
        elif info is not None:
            self._remember_meta(info)
        base_time = info.last_modified_ns if info is not None else self._started_ns
        mode, mtime, atime, has = decode_meta(metadata, base_time, DEFAULT_DIR_MODE)
        return Node(True, 0, self._mode(mode), mtime, atime, mtime, None, has, info is not None)

    def _set_node(self, path: str, node: Node | None) -> None:
        """Record our own change of `path` (already done in the store) in the caches.

        The change is also logged per directory with a sequence number, so that a listing
        that was under way while it happened can apply it on top (see `_list`).
        """
        with self._lock:
            self._put_node(path, node)
            if path == "/":
                return
            parent_dir = parent_path(path)
            name = path.rsplit("/", 1)[1]
            self._drop_root_hint(path)
            self._seq += 1
            if parent_dir in self._listing_since:
                changes = self._changes.setdefault(parent_dir, {})
                changes[name] = (self._seq, node)
                if len(changes) > _CHANGE_LOG_MAX:
                    # Changed this much during one LIST: keep the newer half.
                    cut = sorted(seq for seq, _ in changes.values())[len(changes) // 2]
                    self._changes[parent_dir] = {n: c for n, c in changes.items() if c[0] >= cut}
            parent = self._listings.get(parent_dir)
            if parent is not None:
                parent.ordered = None
                if node is None:
                    parent.children.pop(name, None)
                else:
                    parent.children[name] = node
            ahead = self._ahead.pop(path_to_key(path), None)
            self._kept.pop(path, None)
        if ahead is not None:
            ahead[0].cancel()

    def _put_node(self, path: str, node: Node | None) -> None:
        """Cache the attributes of `path` (lock held), within `_NODES_MAX` paths."""
        self._nodes[path] = (node, self._expiry())
        if len(self._nodes) <= _NODES_MAX:
            return
        now = time.monotonic()
        fresh = {p: e for p, e in self._nodes.items() if e[1] > now}
        if len(fresh) > _NODES_MAX // 2:
            # Insertion order is age order: keep the newer half.
            fresh = dict(list(fresh.items())[-(_NODES_MAX // 2) :])
        fresh[path] = self._nodes[path]
        self._nodes = fresh

    def _put_listing(self, path: str, listing: _Listing) -> None:
        """Cache a listing (lock held) within `_LISTINGS_MAX` directories and
        `_LISTED_ENTRIES_MAX` entries; the listings that expired first go first."""
        self._listings[path] = listing
        total = sum(len(other.children) for other in self._listings.values())
        if len(self._listings) <= _LISTINGS_MAX and total <= _LISTED_ENTRIES_MAX:
            return
        for victim in sorted(self._listings, key=lambda p: self._listings[p].expires):
            if victim == path:
                continue
            total -= len(self._listings.pop(victim).children)
            if len(self._listings) <= _LISTINGS_MAX and total <= _LISTED_ENTRIES_MAX:
                return

    def _forget_tree(self, path: str) -> None:
        prefix = path.rstrip("/") + "/"
        with self._lock:
            for p in [p for p in self._nodes if p == path or p.startswith(prefix)]:
                del self._nodes[p]
            for p in [p for p in self._listings if p == path or p.startswith(prefix)]:
                del self._listings[p]
            for p in [p for p in self._kept if p == path or p.startswith(prefix)]:
                del self._kept[p]
            self._drop_root_hint(path)

    def _drop_root_hint(self, path: str) -> None:
        """Our own change of `path` (lock held): a root name's directory hint is no longer
        what the store holds (`_note_root_dirs`)."""
        if path != "/" and parent_path(path) == "/":
            self._root_dirs[0].discard(path[1:])

    def _stored(self, sf: StagedFile, info: ObjectInfo) -> None:
        """Callback after an upload: the store now holds `info` for `sf`."""
        self._remember_meta(info)
        self._set_node(sf.path, dataclasses.replace(sf.node(), etag=info.etag))

    # ------------------------------------------------------------------ lookup

    def getattr(self, path: str, fh: int | None = None) -> Node:
        if fh is not None:
            handle = self._handle(fh)
            if handle.staged is not None:
                return handle.staged.node()
            if handle.reader is not None:
                # fstat works on an open file even after it was unlinked or replaced.
                return self._file_node(handle.reader.info)
        if path == "/":
            return self._root()
        key = path_to_key(path)
        with self._lock:
            sf = self._staged.get(path)
            if sf is not None and not sf.unlinked:
                return sf.node()
            cached = self._nodes.get(path)
            if cached is not None and self._fresh(cached[1]):
                return self._found(cached[0])
            listing = self._listings.get(parent_path(path))
            if listing is not None and self._fresh(listing.expires):
                return self._found(listing.children.get(path.rsplit("/", 1)[1]))
            # A directory listed moments ago is being walked (ls -l, a glob, find): refresh
            # its listing, one LIST per 1000 names, rather than resolve each name on its own.
            relist = listing is not None and time.monotonic() - listing.expires < _RELIST_WINDOW
        if relist:
            listing = self._refresh_listing(parent_path(path))
            return self._found(listing.children.get(path.rsplit("/", 1)[1]))
        node = self._resolve(path, key)
        with self._lock:
            self._put_node(path, node)
        return self._found(node)

    @staticmethod
    def _found(node: Node | None) -> Node:
        if node is None:
            raise PoolFSError(errno.ENOENT)
        return node

    def _root(self) -> Node:
        with self._lock:
            cached = self._nodes.get("/")
            if cached is not None and cached[0] is not None:
                if self._fresh(cached[1]) or self._root_refreshing:
                    return cached[0]
                # The root always exists and the kernel asks for its attributes before every
                # path walk once they expire: answer with what we know and revalidate in the
                # background, instead of a HEAD in front of every cold open.
                self._root_refreshing = True
                try:
                    self._executor.submit(self._refresh_root, cached)
                except RuntimeError:  # shutting down
                    self._root_refreshing = False
                return cached[0]
        return self._fetch_root(None)

    def _fetch_root(self, seen: tuple[Node | None, float] | None) -> Node:
        """HEAD the root marker; cache the answer unless `/` changed since `seen`."""
        info: ObjectInfo | None = None
        if self.store.has_root_marker:
            try:
                info = self.store.head("")
            except NotFound:
                info = None
            except StoreError as exc:
                raise from_store(exc, "getattr", "/") from exc
        node = self._dir_node(info, "")
        with self._lock:
            # A local chmod/utimens of "/" meanwhile replaced the entry: it is newer.
            if seen is None or self._nodes.get("/") is seen:
                self._put_node("/", node)
        return node

    def _refresh_root(self, seen: tuple[Node | None, float]) -> None:
        try:
            self._fetch_root(seen)
        except PoolFSError:
            pass  # from_store logged it; the next getattr of "/" tries again
        finally:
            with self._lock:
                self._root_refreshing = False

    def _log_shadowed(self, key: str) -> None:
        self._log_once("shadow:" + key, "object %r is shadowed by directory %r", key, key + "/")

    def _root_dir_hint(self, name: str) -> bool:
        """Whether the root's first LIST page at mount showed `name` as a directory, and
        that is still fresh (see `_note_root_dirs`)."""
        with self._lock:
            names, expires = self._root_dirs
            return name in names and self._fresh(expires)

    def _resolve(self, path: str, key: str) -> Node | None:
        """Ask the store what `path` is: marker, implicit directory, file or nothing.

        The three requests go out in parallel; a directory wins over a same-named object. The
        file's request is a GET of its first block, kept for the open that usually follows a
        lookup (`_take_ahead`): an open then costs no round trip of its own.
        """
        marker = dir_marker(key)
        if parent_path(path) == "/" and self._root_dir_hint(key):
            try:
                return self._dir_node(self.store.head(marker), marker)
            except NotFound:
                return self._dir_node(None, marker)  # a directory of keys below it only
            except StoreError as exc:
                raise from_store(exc, "lookup", path) from exc
        f_marker = self._executor.submit(self.store.head, marker)
        f_below = self._executor.submit(self.store.any_below, marker)
        started = time.monotonic()
        try:
            try:
                first, file_info = self.store.get_range(key, 0, self.config.first_block)
            except NotFound:
                first, file_info = b"", None
            try:
                return self._dir_node(f_marker.result(), marker)
            except NotFound:
                pass
            if f_below.result():
                if file_info is not None:
                    self._log_shadowed(key)
                return self._dir_node(None, marker)
            if file_info is None:
                return None
            with self._lock:
                self._put_ahead(key, done_future((first, file_info)), started)
            return self._file_node(file_info)
        except StoreError as exc:
            raise from_store(exc, "lookup", path) from exc
        finally:
            f_marker.cancel()
            f_below.cancel()

    # ------------------------------------------------------------------ directories

    def readdir(self, path: str) -> list[tuple[str, Node]]:
        node = self.getattr(path)
        if not node.is_dir:
            raise PoolFSError(errno.ENOTDIR)
        with self._lock:
            listing = self._listings.get(path)
            if listing is None or not self._fresh(listing.expires):
                listing = None
        if listing is None:
            listing = self._refresh_listing(path)
        entries = dict(listing.children)
        prefix = path.rstrip("/") + "/"
        with self._lock:
            for sf in self._staged.values():
                if sf.unlinked or not sf.path.startswith(prefix):
                    continue
                rest = sf.path[len(prefix) :]
                if "/" not in rest:
                    entries[rest] = sf.node()
        return sorted(entries.items())

    def _refresh_listing(self, path: str) -> _Listing:
        """A fresh listing of `path`; concurrent callers share one store listing."""
        with self._lock:
            listing = self._listings.get(path)
            if listing is not None and self._fresh(listing.expires):
                return listing
            done = self._relisting.get(path)
            leader = done is None
            if done is None:
                done = self._relisting[path] = threading.Event()
        if not leader:
            done.wait(self.config.metadata_ttl + 120)
            with self._lock:
                listing = self._listings.get(path)
            if listing is not None and self._fresh(listing.expires):
                return listing
            return self._list(path)
        try:
            return self._list(path)
        finally:
            with self._lock:
                del self._relisting[path]
            done.set()

    def _list(self, path: str) -> _Listing:
        with self._lock:
            started = self._seq
            self._listing_since.setdefault(path, []).append(started)
        try:
            return self._list_store(path, started)
        finally:
            with self._lock:
                self._end_listing(path, started)

    def _end_listing(self, path: str, started: int) -> None:
        """Forget the changes no LIST of `path` under way still needs (lock held)."""
        starts = self._listing_since[path]
        starts.remove(started)
        if not starts:
            del self._listing_since[path]
            self._changes.pop(path, None)
            return
        oldest = min(starts)
        changes = self._changes.get(path)
        if changes:
            self._changes[path] = {n: c for n, c in changes.items() if c[0] > oldest}

    def _list_store(self, path: str, started: int) -> _Listing:
        key = path_to_key(path)
        prefix = dir_marker(key)
        files: dict[str, ObjectInfo] = {}
        dirs: set[str] = set()
        # Any key below the prefix, usable as a name or not, means the directory exists.
        seen_any = False
        try:
            for page in self.store.list_pages(prefix, "/"):
                seen_any = seen_any or bool(page.objects or page.prefixes)
                for info in page.objects:
                    name = info.key[len(prefix) :]
                    if name != "" and self._usable(name, info.key):
                        files[name] = info
                for sub in page.prefixes:
                    name = sub[len(prefix) : -1]
                    if self._usable(name, sub):
                        dirs.add(name)
        except StoreError as exc:
            raise from_store(exc, "readdir", path) from exc
        if path != "/" and not seen_any:
            with self._lock:
                known = self._nodes.get(path)
            if known is None or known[0] is None or not known[0].marker:
                self._set_node(path, None)
                raise PoolFSError(errno.ENOENT)
        children: dict[str, Node] = {}
        for name, info in files.items():
            if name in dirs:
                self._log_once(
                    "shadow:" + info.key,
                    "object %r is shadowed by directory %r/",
                    info.key,
                    info.key,
                )
                continue
            children[name] = self._file_node(info)
        with self._lock:
            old = self._listings.get(path)
        for name in dirs:
            previous = old.children.get(name) if old is not None else None
            cached = self._nodes.get(join(path, name))
            if cached is not None and cached[0] is not None and cached[0].is_dir:
                children[name] = cached[0]
            elif previous is not None and previous.is_dir:
                children[name] = previous
            else:
                children[name] = self._dir_node(None, prefix + name + "/")
        with self._lock:
            # Our own changes made while the LIST was under way may be missing from it.
            changes = self._changes.get(path, {})
            for name, (seq, node) in changes.items():
                if seq > started:
                    if node is None:
                        children.pop(name, None)
                    else:
                        children[name] = node
            listing = _Listing(children, self._expiry())
            self._put_listing(path, listing)
            # The listing just proved the directory exists: its own attributes stay valid.
            own = self._nodes.get(path)
            if own is not None and own[0] is not None and own[0].is_dir:
                self._nodes[path] = (own[0], listing.expires)
        return listing

    def _usable(self, name: str, key: str) -> bool:
        if "/" in name or not valid_name(name):
            self._log_once("bad:" + key, "skipping store key %r: not usable as a path", key)
            return False
        return True

    def _parent_dir(self, path: str) -> Node:
        parent = self.getattr(parent_path(path))
        if not parent.is_dir:
            raise PoolFSError(errno.ENOTDIR)
        return parent

    def _exists(self, path: str) -> Node | None:
        try:
            return self.getattr(path)
        except PoolFSError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise

    def _dir_changed(self, path: str, *, strict: bool = False) -> None:
        """A directory's entries changed: move its mtime and persist it on the marker.

        The marker also keeps the directory alive once its last entry goes, so callers that
        remove entries pass strict=True and fail if it cannot be written.
        """
        try:
            node = self.getattr(path)
        except PoolFSError:
            if strict:
                raise
            return
        now = self._now()
        new = dataclasses.replace(node, mtime_ns=now, ctime_ns=now, marker=True, has_meta=True)
        self._set_node(path, new)
        key = dir_marker(path_to_key(path))
        if path == "/" and not self.store.has_root_marker:
            return
        try:
            info = self.store.put_bytes(key, b"", encode_meta(new.mode, now, new.atime_ns))
            self._remember_meta(info)
        except StoreError as exc:
            err = from_store(exc, "update directory", path)
            if strict:
                raise err from exc

    def mkdir(self, path: str, mode: int) -> None:
        self._check_writable()
        key = path_to_key(path)
        with self._ns_lock:
            self._parent_dir(path)
            if self._exists(path) is not None:
                raise PoolFSError(errno.EEXIST)
            now = self._now()
            mode &= 0o7777
            try:
                info = self.store.put_bytes(dir_marker(key), b"", encode_meta(mode, now, now))
            except StoreError as exc:
                raise from_store(exc, "mkdir", path) from exc
            self._remember_meta(info)
            self._set_node(path, Node(True, 0, mode, now, now, now, None, True, True))
            with self._lock:
                self._put_listing(path, _Listing({}, self._expiry()))
            self._dir_changed(parent_path(path))

    def rmdir(self, path: str) -> None:
        self._check_writable()
        if path == "/":
            raise PoolFSError(errno.EBUSY)
        key = path_to_key(path)
        with self._ns_lock:
            node = self.getattr(path)
            if not node.is_dir:
                raise PoolFSError(errno.ENOTDIR)
            if not self._is_empty(path, key):
                raise PoolFSError(errno.ENOTEMPTY)
            self._dir_changed(parent_path(path), strict=True)
            try:
                self.store.delete(dir_marker(key))
            except StoreError as exc:
                raise from_store(exc, "rmdir", path) from exc
            self._forget_tree(path)
            self._set_node(path, None)

    def _is_empty(self, path: str, key: str) -> bool:
        prefix = path.rstrip("/") + "/"
        with self._lock:
            if any(p.startswith(prefix) and not sf.unlinked for p, sf in self._staged.items()):
                return False
        marker = dir_marker(key)
        try:
            for page in self.store.list_pages(marker, "/"):
                if page.prefixes or any(o.key != marker for o in page.objects):
                    return False
        except StoreError as exc:
            raise from_store(exc, "rmdir", path) from exc
        return True

    # ------------------------------------------------------------------ files: open/close

    def _new_fh(self, handle: _Handle) -> int:
        with self._lock:
            fh = self._next_fh
            self._next_fh += 1
            self._handles[fh] = handle
            return fh

    def _handle(self, fh: int) -> _Handle:
        with self._lock:
            handle = self._handles.get(fh)
        if handle is None:
            raise PoolFSError(errno.EBADF)
        return handle

    def create(self, path: str, mode: int, flags: int = os.O_WRONLY) -> int:
        self._check_writable()
        key = path_to_key(path)
        with self._ns_lock:
            self._parent_dir(path)
            existing = self._exists(path)
            if existing is not None:
                if existing.is_dir:
                    raise PoolFSError(errno.EISDIR)
                if flags & os.O_EXCL:
                    raise PoolFSError(errno.EEXIST)
                return self.open(path, flags)
            now = self._now()
            sf = StagedFile(self._ctx, path, key, None, mode & 0o7777, now, now, new=True)
            with self._lock:
                self._staged[path] = sf
                sf.refs += 1
            parent = self.getattr(parent_path(path))
            self._set_node(
                parent_path(path), dataclasses.replace(parent, mtime_ns=now, ctime_ns=now)
            )
        return self._new_fh(_Handle(path, sf, None, True, bool(flags & os.O_APPEND)))

    def open(self, path: str, flags: int) -> int:
        access = flags & os.O_ACCMODE
        writable = access in (os.O_WRONLY, os.O_RDWR)
        if writable or flags & os.O_TRUNC:
            self._check_writable()
        key = path_to_key(path)
        with self._lock:
            sf = self._staged.get(path)
            if sf is not None and not sf.unlinked:
                sf.refs += 1
                # Handles of a staged file read (and write) bytes the store does not have.
                self._kept.pop(path, None)
            else:
                sf = None
            kept = self._kept.get(path)
        if sf is None:
            reading = not writable and not flags & os.O_TRUNC
            # A writer's base version must be the current one: only readers use blocks
            # fetched ahead (and a writer drops the one it finds).
            fetched = self._take_ahead(key)
            if not reading:
                fetched = None
            if fetched is not None:
                info, first = fetched
            elif reading and kept is not None:
                # The kernel may still hold this version's pages: ask for no bytes.
                info, first = self._open_fetch(path, key, head=True)
            else:
                info, first = self._open_fetch(path, key)
            if not writable:
                self._walk_ahead(path)
            node = self._file_node(info)
            self._set_node(path, node)
            if reading:
                reader = PinnedReader(self._ctx, path, key, info, first)
                with self._lock:
                    readers = self._readers.setdefault(path, set())
                    one_version = all(r.info.etag == info.etag for r in readers)
                    readers.add(reader)
                    keep = one_version and kept == info.etag
                    if one_version:
                        self._kept[path] = info.etag
                        self._kept.move_to_end(path)
                        while len(self._kept) > _KEPT_MAX:
                            self._kept.popitem(last=False)
                return self._new_fh(_Handle(path, None, reader, False, False, keep))
            with self._lock:
                sf = self._staged.get(path)
                if sf is None or sf.unlinked:
                    sf = StagedFile(
                        self._ctx,
                        path,
                        key,
                        info,
                        node.mode,
                        node.mtime_ns,
                        node.atime_ns,
                        new=False,
                    )
                    self._staged[path] = sf
                sf.refs += 1
        handle = _Handle(path, sf, None, writable, bool(flags & os.O_APPEND))
        fh = self._new_fh(handle)
        if flags & os.O_TRUNC:
            try:
                sf.truncate(0, by_open=True)
            except PoolFSError:
                self.release(fh)
                raise
        return fh

    def _walk_ahead(self, path: str) -> None:
        """Opens walking a listed directory in name order (cat dir/*, cp -r, a loop over
        DataPool.list_files()) start the first-block GETs of the next small files, so the
        walk is not one GET round trip per file."""
        parent, name = parent_path(path), path.rsplit("/", 1)[1]
        prefix = dir_marker(path_to_key(parent))
        now = time.monotonic()
        with self._lock:
            last = self._walks.get(parent)
            self._walks[parent] = name
            if len(self._walks) > 1024:
                self._walks = {parent: name}
            listing = self._listings.get(parent)
            if listing is None or last is None or name <= last:
                return
            if listing.ordered is None:
                listing.ordered = sorted(listing.children)
            ordered = listing.ordered
            start = bisect.bisect_right(ordered, name)
            keys = [
                prefix + n
                for n in ordered[start : start + _WALK_AHEAD]
                if not listing.children[n].is_dir
                and listing.children[n].size <= self.config.first_block
                and prefix + n not in self._ahead
            ]
            for key in keys:
                fut = self._executor.submit(self.store.get_range, key, 0, self.config.first_block)
                self._put_ahead(key, fut, now)

    def _put_ahead(self, key: str, fut: Future[tuple[bytes, ObjectInfo]], started: float) -> None:
        """Remember a first block fetched ahead (lock held); drops stale and oldest entries."""
        old = self._ahead.pop(key, None)
        if old is not None:
            old[0].cancel()
        self._ahead[key] = (fut, started)
        now = time.monotonic()
        for stale in [k for k, (_, t) in self._ahead.items() if now - t > self._ttl_ahead]:
            self._ahead.pop(stale)[0].cancel()
        while len(self._ahead) > _AHEAD_MAX:
            self._ahead.pop(next(iter(self._ahead)))[0].cancel()

    @property
    def _ttl_ahead(self) -> float:
        return max(self.config.metadata_ttl, 0.001)

    def _take_ahead(self, key: str) -> tuple[ObjectInfo, bytes] | None:
        """A first block fetched ahead by a walk, if it is younger than the metadata TTL."""
        with self._lock:
            entry = self._ahead.pop(key, None)
        if entry is None:
            return None
        fut, started = entry
        try:
            data, info = fut.result()
        except (StoreError, CancelledError):
            return None  # fetch it again the ordinary way, which reports errors properly
        if time.monotonic() - started > self._ttl_ahead:
            return None
        return info, data

    def _open_fetch(self, path: str, key: str, *, head: bool = False) -> tuple[ObjectInfo, bytes]:
        """One GET that revalidates the object and returns its first block (head: one HEAD,
        no bytes)."""
        try:
            if head:
                data, info = b"", self.store.head(key)
            else:
                data, info = self.store.get_range(key, 0, self.config.first_block)
        except NotFound:
            # A directory (implicit or marker) has no object of its own.
            if self.getattr(path).is_dir:
                raise PoolFSError(errno.EISDIR) from None
            self._set_node(path, None)
            raise PoolFSError(errno.ENOENT) from None
        except StoreError as exc:
            raise from_store(exc, "open", path) from exc
        return info, data

    def keep_cache(self, fh: int) -> bool:
        """Whether the kernel may keep the file's cached pages for this open (they are of the
        version the handle pinned); see "Kernel page cache" in the module docstring."""
        return self._handle(fh).keep_cache

    def read(self, fh: int, offset: int, size: int) -> bytes:
        return span_bytes(self.read_span(fh, offset, size))

    def read_span(self, fh: int, offset: int, size: int) -> Span:
        """`read` as `data[lo:hi]`, not yet copied (the FUSE adapter copies it once)."""
        handle = self._handle(fh)
        try:
            if handle.staged is not None:
                data = handle.staged.read(offset, size)
                return data, 0, len(data)
            assert handle.reader is not None
            return handle.reader.read_span(offset, size)
        except PoolFSError:
            raise
        except OSError as exc:
            raise unexpected(exc, "read", handle.path, None) from exc

    def write(self, fh: int, offset: int, data: bytes | memoryview) -> int:
        """Write `data` (any bytes-like object, read only during the call) at `offset`."""
        handle = self._handle(fh)
        if not handle.writable or handle.staged is None:
            raise PoolFSError(errno.EBADF)
        return handle.staged.write(offset, data, handle.append)

    def flush(self, fh: int) -> None:
        """close(2) of a writer: returns once the object is durable, or raises."""
        handle = self._handle(fh)
        sf = handle.staged
        if sf is None or not handle.writable:
            return
        if sf.poisoned or sf.written or (sf.meta_dirty and not sf.dirty):
            self._upload(sf)

    def _upload(self, sf: StagedFile) -> None:
        was_new = sf.new
        sf.upload(self._stored)
        if was_new and not sf.new:
            self._dir_changed(parent_path(sf.path))

    def fsync(self, fh: int) -> None:
        handle = self._handle(fh)
        if handle.staged is not None and handle.writable:
            self._upload(handle.staged)

    def release(self, fh: int) -> None:
        with self._lock:
            handle = self._handles.pop(fh, None)
        if handle is None:
            raise PoolFSError(errno.EBADF)
        if handle.reader is not None:
            reader = handle.reader
            with self._lock:
                readers = self._readers.get(reader.path)
                if readers is not None:
                    readers.discard(reader)
                    if not readers:
                        del self._readers[reader.path]
            reader.close()
            return
        sf = handle.staged
        assert sf is not None
        with self._lock:
            sf.refs -= 1
            last = sf.refs == 0
        if not last:
            return
        try:
            pending = (sf.dirty or sf.meta_dirty) and not (sf.poisoned or sf.unlinked or sf.failed)
            if pending:
                try:
                    self._upload(sf)
                except PoolFSError as exc:
                    log.error("write to %r not stored at release: %s", sf.path, exc)
        finally:
            with self._lock:
                if self._staged.get(sf.path) is sf:
                    del self._staged[sf.path]
                if sf.new:
                    # Never stored: the file goes away with its last handle.
                    self._set_node(sf.path, None)
            sf.close()

    # ------------------------------------------------------------------ namespace changes

    def unlink(self, path: str) -> None:
        self._check_writable()
        key = path_to_key(path)
        with self._ns_lock:
            node = self.getattr(path)
            if node.is_dir:
                raise PoolFSError(errno.EISDIR)
            self._keep_open_copies(path)
            with self._lock:
                sf = self._staged.get(path)
                if sf is not None:
                    del self._staged[path]
            if sf is not None:
                sf.unlink()
            stored = sf is None or not sf.new
            if stored:
                self._dir_changed(parent_path(path), strict=True)
                try:
                    self.store.delete(key)
                except StoreError as exc:
                    raise from_store(exc, "unlink", path) from exc
            self._set_node(path, None)

    def _keep_open_copies(self, path: str) -> None:
        """Open handles of `path` keep their bytes locally before the object goes away."""
        with self._lock:
            readers = list(self._readers.get(path, ()))
            sf = self._staged.get(path)
        for reader in readers:
            reader.materialize()
        if sf is not None and not sf.new:
            sf.materialize()

    def rename(self, old: str, new: str) -> None:
        self._check_writable()
        if old == new:
            return
        old_key, new_key = path_to_key(old), path_to_key(new)
        if new.startswith(old.rstrip("/") + "/"):
            raise PoolFSError(errno.EINVAL)
        with self._ns_lock:
            src = self.getattr(old)
            self._parent_dir(new)
            dst = self._exists(new)
            if dst is not None:
                if src.is_dir and not dst.is_dir:
                    raise PoolFSError(errno.ENOTDIR)
                if not src.is_dir and dst.is_dir:
                    raise PoolFSError(errno.EISDIR)
                if dst.is_dir and not self._is_empty(new, new_key):
                    raise PoolFSError(errno.ENOTEMPTY)
            if src.is_dir:
                self._rename_dir(old, new, old_key, new_key, dst is not None)
            else:
                self._rename_file(old, new, old_key, new_key, src)
            self._dir_changed(parent_path(old), strict=True)
            if parent_path(new) != parent_path(old):
                self._dir_changed(parent_path(new))

    def _rename_file(self, old: str, new: str, old_key: str, new_key: str, src: Node) -> None:
        with self._lock:
            sf = self._staged.get(old)
        if sf is not None:
            # Store what is staged first: the copy must carry the current bytes.
            self._upload(sf)
        self._keep_open_copies(old)
        self._keep_open_copies(new)
        with self._lock:
            replaced = self._staged.pop(new, None)
        if replaced is not None:
            replaced.unlink()
        # A file streamed while written has no stored mtime (its LastModified stands for it,
        # see files.py), and the copy gets a new LastModified: pin the mtime it showed.
        shown = encode_meta(src.mode, src.mtime_ns, src.atime_ns)
        meta = shown if src.has_meta else None
        try:
            info = self.store.copy(old_key, new_key, meta)
            self.store.delete(old_key)
        except StoreError as exc:
            raise from_store(exc, "rename", old) from exc
        self._remember_meta(info)
        with self._lock:
            if sf is not None:
                del self._staged[old]
                # A pending write to the old name would resurrect it: retarget the handle.
                sf.path, sf.key = new, new_key
                self._staged[new] = sf
        node = dataclasses.replace(src, etag=info.etag, ctime_ns=self._now())
        if info.metadata is None:
            with self._lock:
                self._meta_seen[new_key] = (info.etag, info.last_modified_ns // 10**9, shown)
        self._set_node(old, None)
        self._set_node(new, node)

    def _rename_dir(self, old: str, new: str, old_key: str, new_key: str, replace: bool) -> None:
        old_prefix, new_prefix = dir_marker(old_key), dir_marker(new_key)
        prefix = old.rstrip("/") + "/"
        with self._lock:
            pending = [sf for p, sf in self._staged.items() if p.startswith(prefix)]
        if len(pending) > self.config.dir_rename_limit:
            raise PoolFSError(errno.EXDEV)
        # Store what is staged below the directory first (an empty new file waits for its
        # release to be uploaded), so that the listing below sees every entry.
        for sf in pending:
            if not sf.unlinked:
                self._upload(sf)
        try:
            keys = [o.key for o in self.store.list_all(old_prefix, None).objects]
        except StoreError as exc:
            raise from_store(exc, "rename", old) from exc
        if len(keys) > self.config.dir_rename_limit:
            raise PoolFSError(
                errno.EXDEV,
                f"{old}: more than {self.config.dir_rename_limit} entries; copy instead",
            )
        with self._lock:
            readers = [r for p, rs in self._readers.items() if p.startswith(prefix) for r in rs]
        for reader in readers:
            reader.materialize()
        keys = sorted(set(keys) | {old_prefix})
        try:
            if replace:
                self.store.delete(new_prefix)
            copies = [
                self._executor.submit(self._copy_key, k, new_prefix + k[len(old_prefix) :])
                for k in keys
            ]
            for fut in copies:
                fut.result()
            files = [k for k in keys if not k.endswith("/")]
            for fut in [self._executor.submit(self.store.delete, k) for k in files]:
                fut.result()
            # Markers last, deepest first: a local-directory store can only drop an empty one.
            for marker in sorted((k for k in keys if k.endswith("/")), key=len, reverse=True):
                self.store.delete(marker)
        except StoreError as exc:
            raise from_store(exc, "rename", old) from exc
        with self._lock:
            for p, sf in list(self._staged.items()):
                if p.startswith(prefix):
                    del self._staged[p]
                    sf.path = new.rstrip("/") + "/" + p[len(prefix) :]
                    sf.key = path_to_key(sf.path)
                    self._staged[sf.path] = sf
        self._forget_tree(old)
        self._forget_tree(new)
        with self._lock:
            for p in (parent_path(old), parent_path(new)):
                self._listings.pop(p, None)
                self._nodes.pop(p, None)

    def _copy_key(self, src: str, dst: str) -> None:
        try:
            self.store.copy(src, dst)
        except NotFound:
            if src.endswith("/") or src == "":
                # An implicit directory has no marker: create one so metadata has a home.
                now = self._now()
                self.store.put_bytes(dst, b"", encode_meta(DEFAULT_DIR_MODE, now, now))
            else:
                raise

    # ------------------------------------------------------------------ attributes

    def truncate(self, path: str, length: int, fh: int | None = None) -> None:
        self._check_writable()
        if length < 0:
            raise PoolFSError(errno.EINVAL)
        if length > self.config.max_file_size:
            raise PoolFSError(errno.EFBIG)
        if fh is not None:
            handle = self._handle(fh)
            if handle.staged is None:
                raise PoolFSError(errno.EBADF)
            handle.staged.truncate(length)
            return
        with self._lock:
            sf = self._staged.get(path)
        if sf is not None:
            sf.truncate(length)
            return
        # A closed file: stage, truncate, store, as one open/close would.
        if self.getattr(path).is_dir:
            raise PoolFSError(errno.EISDIR)
        tmp = self.open(path, os.O_RDWR)
        try:
            self.truncate(path, length, tmp)
            self.flush(tmp)
        finally:
            self.release(tmp)

    def chmod(self, path: str, mode: int) -> None:
        self._check_writable()
        self._set_attrs(path, mode=mode & 0o7777)

    def chown(self, path: str, uid: int, gid: int) -> None:
        self._check_writable()
        self.getattr(path)
        if uid not in (-1, 0xFFFFFFFF, self.config.uid) or gid not in (
            -1,
            0xFFFFFFFF,
            self.config.gid,
        ):
            raise PoolFSError(errno.EPERM, "ownership comes from the mount options")

    def utimens(self, path: str, times: tuple[int, int] | None) -> None:
        self._check_writable()
        now = self._now()
        if times is None:
            atime, mtime = now, now
        else:
            atime, mtime = times
        atime_ns = None if atime == UTIME_OMIT else now if atime == UTIME_NOW else atime
        mtime_ns = None if mtime == UTIME_OMIT else now if mtime == UTIME_NOW else mtime
        self._set_attrs(path, atime_ns=atime_ns, mtime_ns=mtime_ns)

    def _set_attrs(
        self,
        path: str,
        mode: int | None = None,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
    ) -> None:
        with self._lock:
            sf = self._staged.get(path)
        if sf is not None and not sf.unlinked:
            sf.set_meta(mode, atime_ns, mtime_ns)
            self._set_node(path, sf.node())
            return
        node = self.getattr(path)
        new_mode = node.mode if mode is None else mode
        new_atime = node.atime_ns if atime_ns is None else atime_ns
        new_mtime = node.mtime_ns if mtime_ns is None else mtime_ns
        meta = encode_meta(new_mode, new_mtime, new_atime)
        key = path_to_key(path)
        try:
            if node.is_dir:
                if path == "/" and not self.store.has_root_marker:
                    info = None
                else:
                    info = self.store.put_bytes(dir_marker(key), b"", meta)
            else:
                info = self.store.set_metadata(key, meta)
        except StoreError as exc:
            raise from_store(exc, "setattr", path) from exc
        if info is not None:
            self._remember_meta(info)
        new = dataclasses.replace(
            node,
            mode=new_mode,
            atime_ns=new_atime,
            mtime_ns=new_mtime,
            ctime_ns=self._now(),
            has_meta=True,
            etag=info.etag if info and not node.is_dir else node.etag,
            marker=node.marker or node.is_dir,
        )
        self._set_node(path, new)

    def statfs(self) -> dict[str, int]:
        blocks = 1 << 40  # 4 PiB of 4 KiB blocks: "a lot", as object stores are
        return {
            "f_bsize": 4096,
            "f_frsize": 4096,
            "f_blocks": blocks,
            "f_bfree": blocks,
            "f_bavail": blocks,
            "f_files": 1 << 32,
            "f_ffree": 1 << 32,
            "f_favail": 1 << 32,
            "f_namemax": NAME_MAX,
        }

    def unsupported(self, kind: Literal["link", "symlink", "mknod"]) -> None:
        self._check_writable()
        raise PoolFSError(errno.EPERM, f"{kind} is not supported on pools")
