"""The store interface: what the filesystem core needs from a blob store.

Invariants every store keeps (the contract suite in tests/test_store_contract.py checks them):

- Keys are relative to the pool root, `/`-separated, never start with `/`. A key ending in `/`
  is a directory marker (`a/b/`); the empty key `""` is the pool root's marker.
- Objects are immutable blobs with a version tag (`etag`): any change of content or metadata
  gives a new `ObjectInfo` (new etag or new `last_modified_ns`).
- `get_range` with `if_match` never returns bytes of another version: it raises `Changed`.
- `put_*` is atomic: readers see the old object or the new one, never a mix.
- User metadata is a flat `dict[str, str]` of lowercase ASCII keys and ASCII values.
- Every failure is one of the `StoreError` kinds below; retries happen inside the store, so a
  `Transient` error means retries already ran out (bounded total time).
- Streamed uploads (`begin_upload`, optional per store) publish nothing until `complete()`:
  until then the key keeps its old object. An `Upload` that is neither completed nor aborted
  may leave parts in the store; its owner must end every one it begins.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Iterator, Mapping


class StoreError(Exception):
    """Base of every error a store raises. `key` names the object, when there is one."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class NotFound(StoreError):
    """The object (or bucket / base directory) does not exist."""


class Denied(StoreError):
    """The credentials are not allowed to do this."""


class Transient(StoreError):
    """Unreachable, timed out or failing after the store's own retries ran out."""


class Throttled(Transient):
    """The store kept asking us to slow down, past the retry budget."""


class Changed(StoreError):
    """`if_match` did not match: the object changed (or vanished) since it was pinned."""


class TooLarge(StoreError):
    """The store refuses an object this size."""


class InvalidStoreURL(ValueError):
    """A store URL that cannot be used; the message names what is wrong."""


@dataclasses.dataclass(frozen=True, slots=True)
class ObjectInfo:
    """One object as a listing, HEAD, GET or PUT reports it.

    `metadata` is None when the source cannot tell (S3 listings carry no user metadata);
    an empty dict means "known to have none".
    """

    key: str
    size: int
    etag: str
    last_modified_ns: int
    metadata: Mapping[str, str] | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class ListPage:
    """One page of a delimiter listing below a prefix.

    `objects` are keys directly below the prefix (including the prefix's own marker, if any);
    `prefixes` are the common prefixes (sub-"directories"), each ending in `/`.
    """

    objects: tuple[ObjectInfo, ...]
    prefixes: tuple[str, ...]


class Upload(abc.ABC):
    """An object being uploaded in numbered parts while its bytes are still being written.

    Parts are numbered from 1 and streamed from a file descriptor (`os.pread`, no part-sized
    buffers). A part may be put again (the last put of a number counts) but never twice at
    the same time. Every part but the last must be at least `min_part_size` bytes; there are
    at most `max_parts`. Objects smaller than `min_object_size` are better stored with one
    `put_bytes`/`put_file`: the caller aborts the upload and does that instead. Thread-safe.
    """

    key: str
    min_part_size: int
    max_parts: int
    min_object_size: int

    @abc.abstractmethod
    def put_part(self, number: int, fd: int, offset: int, length: int) -> None:
        """Store bytes [offset, offset + length) of `fd` as part `number`."""

    @abc.abstractmethod
    def complete(self, parts: int) -> ObjectInfo:
        """Publish parts 1..`parts` (each as last put) as the object, atomically; returns its
        info, with `last_modified_ns` as `head` reports it when the store can tell. On failure
        the upload is aborted and the StoreError raised."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Drop the upload and its parts; never raises (a failed abort is logged).
        Call it only when no `put_part` is running."""


class Store(abc.ABC):
    """A blob store holding one pool. Thread-safe: the filesystem calls it from many threads."""

    url: str
    # False where the pool root cannot carry a marker object (S3 with an empty prefix):
    # the root directory's mode and mtime are then not persisted.
    has_root_marker: bool = True

    @abc.abstractmethod
    def check(self) -> None:
        """Raise a StoreError unless the store is reachable and the pool root usable."""

    @abc.abstractmethod
    def head(self, key: str) -> ObjectInfo:
        """Info with metadata of one object. NotFound if absent."""

    @abc.abstractmethod
    def get_range(
        self, key: str, start: int, end: int | None, if_match: str | None = None
    ) -> tuple[bytes, ObjectInfo]:
        """Bytes [start, end) of an object (end None: to the end) and its info with metadata.

        Reading past the end returns fewer bytes (possibly none), never an error: a range
        starting at or beyond the size (including on an empty object) returns b"".
        """

    def get_range_into(
        self, key: str, start: int, into: memoryview, if_match: str | None = None
    ) -> tuple[bytes | memoryview, ObjectInfo]:
        """`get_range(key, start, start + len(into), if_match)`, where the store may write the
        bytes into `into` (a writable buffer) and return `into` itself, all of it filled;
        otherwise it returns new bytes exactly as get_range does (including a short read).
        The default always returns new bytes."""
        return self.get_range(key, start, start + len(into), if_match)

    @abc.abstractmethod
    def put_bytes(self, key: str, data: bytes, metadata: Mapping[str, str]) -> ObjectInfo:
        """Create or replace an object atomically; returns the new info (with metadata)."""

    @abc.abstractmethod
    def put_file(self, key: str, path: str, metadata: Mapping[str, str]) -> ObjectInfo:
        """Upload a local file (large ones in parallel parts); returns when durable."""

    @abc.abstractmethod
    def set_metadata(self, key: str, metadata: Mapping[str, str]) -> ObjectInfo:
        """Replace the user metadata of an existing object, content unchanged."""

    @abc.abstractmethod
    def copy(self, src: str, dst: str, metadata: Mapping[str, str] | None = None) -> ObjectInfo:
        """Server-side copy; metadata None keeps the source's metadata."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Delete one object. Deleting a missing key is not an error."""

    @abc.abstractmethod
    def list_pages(self, prefix: str, delimiter: str | None = "/") -> Iterator[ListPage]:
        """Pages of the keys below `prefix` ("" or ending in "/"), in key order.

        With delimiter "/", keys deeper than one level are folded into `prefixes`;
        with delimiter None every key below the prefix is listed.
        """

    def begin_upload(self, key: str, metadata: Mapping[str, str]) -> Upload | None:
        """A streamed upload of `key` carrying `metadata`, or None if this store has none
        (then the whole file goes through `put_file`). Sends nothing yet: the store may start
        the upload with the first part."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook, default is nothing to release
        """Release connections and thread pools."""

    def any_below(self, prefix: str) -> bool:
        """Whether any key starts with `prefix` ("" or ending in "/"). Stores that can ask
        for a single key override this; the default reads the first listing page."""
        page = next(iter(self.list_pages(prefix, "/")), None)
        return page is not None and bool(page.objects or page.prefixes)

    def list_all(self, prefix: str, delimiter: str | None = "/") -> ListPage:
        """All pages of `list_pages` joined."""
        objects: list[ObjectInfo] = []
        prefixes: list[str] = []
        for page in self.list_pages(prefix, delimiter):
            objects.extend(page.objects)
            prefixes.extend(page.prefixes)
        return ListPage(tuple(objects), tuple(prefixes))
