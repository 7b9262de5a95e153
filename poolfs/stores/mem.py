"""In-process memory store, for tests. Named instances are shared within one process, so a
test and the filesystem under test see the same objects.

Fault injection (`fail_next`, `offline`) lets tests exercise the error paths the same way a
dead S3 server would, without a server.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator, Mapping
from typing import ClassVar

from poolfs.stores.base import (
    Changed,
    ListPage,
    NotFound,
    ObjectInfo,
    Store,
    Transient,
)

_PAGE = 1000


class MemStore(Store):
    _registry: ClassVar[dict[str, MemStore]] = {}
    _registry_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, name: str = "anon") -> None:
        self.url = f"mem://{name}"
        self._lock = threading.Lock()
        self._objects: dict[str, tuple[bytes, dict[str, str], ObjectInfo]] = {}
        self._clock = 0
        self.offline = False
        # Operation names ("put", "get", ...) whose next call raises Transient.
        self.fail_next: set[str] = set()
        self.calls: dict[str, int] = {}

    @classmethod
    def named(cls, name: str) -> MemStore:
        with cls._registry_lock:
            store = cls._registry.get(name)
            if store is None:
                store = cls._registry[name] = cls(name)
            return store

    @classmethod
    def forget(cls, name: str) -> None:
        with cls._registry_lock:
            cls._registry.pop(name, None)

    def _enter(self, op: str, key: str | None = None) -> None:
        with self._lock:
            self.calls[op] = self.calls.get(op, 0) + 1
            failing = op in self.fail_next
            self.fail_next.discard(op)
        if self.offline or failing:
            raise Transient(f"mem store {op}: store offline", key)

    def _now_ns(self) -> int:
        # Strictly increasing, so every write gives a distinguishable version.
        now = time.time_ns()
        self._clock = max(now, self._clock + 1)
        return self._clock

    def _store(self, key: str, data: bytes, metadata: Mapping[str, str]) -> ObjectInfo:
        with self._lock:
            meta = dict(metadata)
            etag = hashlib.md5(data, usedforsecurity=False).hexdigest()
            info = ObjectInfo(key, len(data), etag, self._now_ns(), meta)
            self._objects[key] = (data, meta, info)
            return info

    def check(self) -> None:
        self._enter("check")

    def head(self, key: str) -> ObjectInfo:
        self._enter("head", key)
        with self._lock:
            entry = self._objects.get(key)
        if entry is None:
            raise NotFound(f"no such key {key!r}", key)
        return entry[2]

    def get_range(
        self, key: str, start: int, end: int | None, if_match: str | None = None
    ) -> tuple[bytes, ObjectInfo]:
        self._enter("get", key)
        with self._lock:
            entry = self._objects.get(key)
        if entry is None:
            if if_match is not None:
                raise Changed(f"{key!r} vanished", key)
            raise NotFound(f"no such key {key!r}", key)
        data, _, info = entry
        if if_match is not None and info.etag != if_match:
            raise Changed(f"{key!r} changed", key)
        return data[start:end], info

    def put_bytes(self, key: str, data: bytes, metadata: Mapping[str, str]) -> ObjectInfo:
        self._enter("put", key)
        return self._store(key, bytes(data), metadata)

    def put_file(self, key: str, path: str, metadata: Mapping[str, str]) -> ObjectInfo:
        self._enter("put", key)
        with open(path, "rb") as f:
            data = f.read()
        return self._store(key, data, metadata)

    def set_metadata(self, key: str, metadata: Mapping[str, str]) -> ObjectInfo:
        self._enter("copy", key)
        with self._lock:
            entry = self._objects.get(key)
        if entry is None:
            raise NotFound(f"no such key {key!r}", key)
        return self._store(key, entry[0], metadata)

    def copy(self, src: str, dst: str, metadata: Mapping[str, str] | None = None) -> ObjectInfo:
        self._enter("copy", src)
        with self._lock:
            entry = self._objects.get(src)
        if entry is None:
            raise NotFound(f"no such key {src!r}", src)
        return self._store(dst, entry[0], entry[1] if metadata is None else metadata)

    def delete(self, key: str) -> None:
        self._enter("delete", key)
        with self._lock:
            self._objects.pop(key, None)

    def list_pages(self, prefix: str, delimiter: str | None = "/") -> Iterator[ListPage]:
        self._enter("list", prefix)
        with self._lock:
            keys = sorted(k for k in self._objects if k.startswith(prefix))
            infos = {k: self._objects[k][2] for k in keys}
        objects: list[ObjectInfo] = []
        prefixes: list[str] = []
        seen: set[str] = set()
        count = 0
        first = True
        for key in keys:
            rest = key[len(prefix) :]
            cut = rest.find(delimiter) if delimiter else -1
            if cut >= 0:
                common = prefix + rest[: cut + 1]
                if common in seen:
                    continue
                seen.add(common)
                prefixes.append(common)
            else:
                info = infos[key]
                objects.append(ObjectInfo(info.key, info.size, info.etag, info.last_modified_ns))
            count += 1
            if count == _PAGE:
                if not first:
                    self._enter("list", prefix)
                first = False
                yield ListPage(tuple(objects), tuple(prefixes))
                objects, prefixes, count = [], [], 0
        if count or first:
            if not first:
                self._enter("list", prefix)
            yield ListPage(tuple(objects), tuple(prefixes))

    # Test helpers: direct access that bypasses fault injection and counting.
    def raw_get(self, key: str) -> bytes:
        with self._lock:
            return self._objects[key][0]

    def raw_keys(self) -> list[str]:
        with self._lock:
            return sorted(self._objects)
