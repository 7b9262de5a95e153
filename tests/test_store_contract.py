"""One contract suite for every store (fsspec's tests/abstract idea): mem, file, S3 on moto and
S3 on SeaweedFS run the same tests; store-specific behaviour (S3 time bounds and error mapping,
the file store's on-disk layout) follows below the contract.
"""

from __future__ import annotations

import datetime
import errno
import io
import json
import logging
import os
import socket
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any, cast

import botocore.exceptions
import pytest
import urllib3.exceptions
from botocore.response import StreamingBody
from botocore.stub import Stubber

from poolfs.stores import (
    Changed,
    Denied,
    ListPage,
    NotFound,
    Store,
    StoreError,
    StoreOptions,
    Throttled,
    TooLarge,
    Transient,
    open_store,
)
from poolfs.stores.file import _ERRNO_KINDS, TMP_PREFIX, XATTR, FileStore, _map_os_error
from poolfs.stores.s3 import S3Store, _map_error, setup_reserve, time_budget
from tests.fixtures_servers import S3Bucket, empty_and_delete_bucket, new_bucket_name
from tests.servers import MotoServer, SeaweedServer, free_port

pytestmark = pytest.mark.core

MiB = 1024 * 1024
# Smallest parts S3 allows, so that a 11 MiB file is a real 3-part upload.
SMALL_PARTS: dict[str, Any] = {
    "multipart_threshold": 5 * MiB,
    "multipart_chunksize": 5 * MiB,
    "timeout": 10.0,
}
ALL_STORES = ["mem", "file", "moto", pytest.param("seaweedfs", marks=pytest.mark.seaweedfs)]
S3_STORES = ["moto", pytest.param("seaweedfs", marks=pytest.mark.seaweedfs)]


@pytest.fixture(scope="session")
def seaweed_shared_bucket(seaweed_server: SeaweedServer) -> Iterator[S3Bucket]:
    """One bucket for all SeaweedFS contract tests, each under its own prefix: the first
    write to a new SeaweedFS bucket grows volumes (~0.2 s), a prefix costs nothing."""
    name = new_bucket_name()
    seaweed_server.create_bucket(name)
    yield S3Bucket(f"s3://{name}", seaweed_server.endpoint_url, seaweed_server.client())
    empty_and_delete_bucket(seaweed_server.client(), name)


def _s3_bucket(kind: str, request: pytest.FixtureRequest) -> tuple[S3Bucket, str]:
    """A bucket and a pool prefix that no other test uses."""
    if kind == "moto":
        bucket: S3Bucket = request.getfixturevalue("moto_bucket")
        return bucket, "pool/"
    bucket = request.getfixturevalue("seaweed_shared_bucket")
    return bucket, f"pool-{uuid.uuid4().hex[:12]}/"


def _open(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if kind == "mem":
        return open_store(f"mem://contract-{uuid.uuid4().hex}")
    if kind == "file":
        root = tmp_path / "store"
        root.mkdir()
        return open_store(f"file://{root}")
    bucket, prefix = _s3_bucket(kind, request)
    return open_store(f"{bucket.store_url}/{prefix}", bucket.options(**SMALL_PARTS))


@pytest.fixture
def kind(request: pytest.FixtureRequest) -> str:
    """The `store` parameter of the running test ("mem", "file", "moto", "seaweedfs")."""
    name: str = request.node.callspec.params["store"]
    return name


def marker_metadata(kind: str, metadata: dict[str, str]) -> dict[str, str]:
    """What HEAD reports for a marker written with `metadata`: SeaweedFS keeps `dir/` keys as
    directories without user metadata (see poolfs/stores/s3.py)."""
    return {} if kind == "seaweedfs" else metadata


@pytest.fixture(params=ALL_STORES)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    opened = _open(request.param, request, tmp_path)
    try:
        yield opened
    finally:
        opened.close()


def keys_of(page: ListPage) -> list[str]:
    return [o.key for o in page.objects]


def utf8_sorted(keys: list[str]) -> list[str]:
    return sorted(keys, key=lambda k: k.encode("utf-8", "surrogateescape"))


def walk_sorted(keys: list[str]) -> list[str]:
    """SeaweedFS's order for listings without delimiter: a directory walk, each directory's
    entries by name and subdirectories expanded in place ("a/x" before "a b")."""
    return sorted(keys, key=lambda k: tuple(p.encode() for p in k.rstrip("/").split("/") if p))


# --- the contract --------------------------------------------------------------------------


def test_check_passes(store: Store) -> None:
    store.check()


def test_missing_object(store: Store) -> None:
    with pytest.raises(NotFound) as info:
        store.head("nope")
    assert info.value.key == "nope"
    with pytest.raises(NotFound):
        store.get_range("nope", 0, None)
    with pytest.raises(NotFound):
        store.set_metadata("nope", {"a": "b"})
    with pytest.raises(NotFound):
        store.copy("nope", "other")
    with pytest.raises(Changed):
        store.get_range("nope", 0, None, if_match="0123")
    with pytest.raises(NotFound):
        store.head("dir/")


def test_put_bytes_round_trip(store: Store) -> None:
    info = store.put_bytes("f.txt", b"hello world", {"mode": "644", "mtime": "17"})
    assert (info.key, info.size, info.metadata) == ("f.txt", 11, {"mode": "644", "mtime": "17"})
    assert info.etag
    assert '"' not in info.etag
    head = store.head("f.txt")
    assert (head.key, head.size, head.etag, head.metadata) == (
        "f.txt",
        11,
        info.etag,
        {"mode": "644", "mtime": "17"},
    )
    assert abs(head.last_modified_ns - time.time_ns()) < 120 * 10**9
    data, got = store.get_range("f.txt", 0, None)
    assert data == b"hello world"
    assert got == head


def test_overwrite_gives_new_version(store: Store) -> None:
    first = store.put_bytes("f", b"one", {})
    second = store.put_bytes("f", b"two!", {"k": "v"})
    assert second.etag != first.etag
    assert store.head("f") == second
    assert store.get_range("f", 0, None)[0] == b"two!"


def test_get_range(store: Store) -> None:
    data = bytes(range(10))
    store.put_bytes("r", data, {"m": "1"})
    cases = [(0, None), (0, 10), (2, 5), (0, 1), (9, 10), (8, 20), (10, None), (10, 12)]
    cases += [(15, None), (15, 30), (5, 5), (6, 3)]
    for start, end in cases:
        got, info = store.get_range("r", start, end)
        assert got == data[start:end], (start, end)
        assert (info.size, info.metadata) == (10, {"m": "1"}), (start, end)


def test_empty_object(store: Store) -> None:
    info = store.put_bytes("empty", b"", {"m": "0"})
    assert info.size == 0
    for start, end in [(0, None), (0, 10), (5, None), (0, 0)]:
        got, got_info = store.get_range("empty", start, end, if_match=info.etag)
        assert got == b""
        assert (got_info.size, got_info.etag, got_info.metadata) == (0, info.etag, {"m": "0"})


def test_if_match_pins_version(store: Store) -> None:
    old = store.put_bytes("p", b"version one", {})
    assert store.get_range("p", 0, 7, if_match=old.etag)[0] == b"version"
    store.put_bytes("p", b"version two", {})
    for start, end in [(0, 7), (0, None), (50, None)]:
        with pytest.raises(Changed) as info:
            store.get_range("p", start, end, if_match=old.etag)
        assert info.value.key == "p"
    store.delete("p")
    with pytest.raises(Changed):
        store.get_range("p", 0, None, if_match=old.etag)


@pytest.mark.parametrize("size", [100_000, 11 * MiB + 123])
def test_put_file(store: Store, tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    source = tmp_path / "upload.bin"
    source.write_bytes(data)
    info = store.put_file("big/file.bin", str(source), {"mode": "600"})
    assert (info.key, info.size, info.metadata) == ("big/file.bin", size, {"mode": "600"})
    head = store.head("big/file.bin")
    assert (head.size, head.etag, head.metadata) == (size, info.etag, {"mode": "600"})
    boundary = 5 * MiB  # a part boundary on the S3 stores
    for start, end in [(0, 1000), (boundary - 10, boundary + 10), (size - 100, None)]:
        assert store.get_range("big/file.bin", start, end, if_match=info.etag)[0] == data[start:end]
    assert store.get_range("big/file.bin", 0, None)[0] == data


def test_begin_upload_where_supported(store: Store, kind: str) -> None:
    upload = store.begin_upload("f", {"mode": "600"})
    if kind in ("mem", "file"):
        assert upload is None  # such stores take the whole file at close (put_file)
        return
    assert upload is not None
    assert (upload.key, upload.min_part_size, upload.max_parts) == ("f", 5 * MiB, 10_000)
    upload.abort()  # nothing was sent: nothing to abort, no request


def _uploads(bucket: S3Bucket, prefix: str) -> list[str]:
    found = bucket.client.list_multipart_uploads(Bucket=bucket.name, Prefix=prefix)
    return [u["Key"] for u in found.get("Uploads", [])]


@pytest.mark.parametrize("server", S3_STORES)
def test_s3_streamed_upload(request: pytest.FixtureRequest, server: str, tmp_path: Path) -> None:
    bucket, prefix = _s3_bucket(server, request)
    store = open_store(f"{bucket.store_url}/{prefix}", bucket.options(**SMALL_PARTS))
    store.put_bytes("f", b"previous", {})
    staging = tmp_path / "staging"
    data = bytearray(os.urandom(11 * MiB + 77))
    staging.write_bytes(b"\0" * len(data))
    upload = store.begin_upload("f", {"mode": "600"})
    assert upload is not None
    with open(staging, "r+b") as f:
        fd = f.fileno()
        # Parts in any order; a part put again counts with its last bytes.
        os.pwrite(fd, data, 0)
        upload.put_part(2, fd, 5 * MiB, 5 * MiB)
        upload.put_part(1, fd, 0, 5 * MiB)
        data[10:20] = b"0123456789"
        os.pwrite(fd, data, 0)
        upload.put_part(1, fd, 0, 5 * MiB)
        upload.put_part(3, fd, 10 * MiB, len(data) - 10 * MiB)
        # Nothing is published before complete().
        assert _uploads(bucket, prefix) == [f"{prefix}f"]
        assert store.get_range("f", 0, None)[0] == b"previous"
        info = upload.complete(3)
    assert (info.key, info.size, info.metadata) == ("f", len(data), {"mode": "600"})
    head = store.head("f")
    assert (head.size, head.etag, head.metadata) == (len(data), info.etag, {"mode": "600"})
    assert head.last_modified_ns == info.last_modified_ns  # a streamed file's mtime
    assert store.get_range("f", 0, None)[0] == bytes(data)
    assert _uploads(bucket, prefix) == []

    # complete(n) publishes parts 1..n only; a part put beyond them is dropped.
    upload = store.begin_upload("g", {})
    assert upload is not None
    with open(staging, "rb") as f:
        for number in (1, 2, 3):
            upload.put_part(number, f.fileno(), (number - 1) * 5 * MiB, 5 * MiB)
        assert upload.complete(2).size == 10 * MiB
    assert store.get_range("g", 0, None)[0] == bytes(data[: 10 * MiB])
    assert _uploads(bucket, prefix) == []
    store.close()


@pytest.mark.parametrize("server", S3_STORES)
def test_s3_streamed_upload_abort(
    request: pytest.FixtureRequest, server: str, tmp_path: Path
) -> None:
    bucket, prefix = _s3_bucket(server, request)
    store = open_store(f"{bucket.store_url}/{prefix}", bucket.options(**SMALL_PARTS))
    staging = tmp_path / "staging"
    staging.write_bytes(os.urandom(5 * MiB))
    upload = store.begin_upload("f", {})
    assert upload is not None
    with open(staging, "rb") as f:
        upload.put_part(1, f.fileno(), 0, 5 * MiB)
    assert _uploads(bucket, prefix) == [f"{prefix}f"]
    upload.abort()
    upload.abort()
    assert _uploads(bucket, prefix) == []
    with pytest.raises(NotFound):
        store.head("f")
    # A part missing at complete(): StoreError, and the upload is aborted.
    upload = store.begin_upload("f", {})
    assert upload is not None
    with open(staging, "rb") as f:
        upload.put_part(2, f.fileno(), 0, 5 * MiB)
    with pytest.raises(StoreError) as info:
        upload.complete(2)
    assert info.value.key == "f"
    assert _uploads(bucket, prefix) == []
    store.close()


def test_s3_streamed_upload_failures_map_and_abort(moto_bucket: S3Bucket, tmp_path: Path) -> None:
    store = open_store(f"{moto_bucket.store_url}/p/", moto_bucket.options(**SMALL_PARTS))
    assert isinstance(store, S3Store)
    staging = tmp_path / "staging"
    staging.write_bytes(os.urandom(5 * MiB))
    _fail_on(store, "CreateMultipartUpload", lambda params: params["Key"] == "p/nocreate")
    upload = store.begin_upload("nocreate", {})
    assert upload is not None
    with open(staging, "rb") as f, pytest.raises(Transient) as info:
        upload.put_part(1, f.fileno(), 0, 5 * MiB)
    assert info.value.key == "nocreate"
    _fail_on(store, "CompleteMultipartUpload", lambda params: True)
    upload = store.begin_upload("f", {})
    assert upload is not None
    with open(staging, "rb") as f:
        upload.put_part(1, f.fileno(), 0, 5 * MiB)
    with pytest.raises(Transient):
        upload.complete(1)
    assert moto_bucket.client.list_multipart_uploads(Bucket=moto_bucket.name).get("Uploads") in (
        None,
        [],
    )
    store.close()


def test_set_metadata(store: Store) -> None:
    put = store.put_bytes("m", b"content", {"mode": "644"})
    changed = store.set_metadata("m", {"mode": "600", "mtime": "5"})
    assert changed.metadata == {"mode": "600", "mtime": "5"}
    assert (changed.key, changed.size) == ("m", 7)
    assert changed != put
    head = store.head("m")
    assert (head.etag, head.metadata, head.size) == (changed.etag, changed.metadata, 7)
    assert store.get_range("m", 0, None)[0] == b"content"
    assert store.set_metadata("m", {}).metadata == {}
    assert store.head("m").metadata == {}


def test_copy_keeps_or_replaces_metadata(store: Store) -> None:
    store.put_bytes("src", b"payload", {"mode": "640"})
    kept = store.copy("src", "dir/kept")
    assert (kept.key, kept.size, kept.metadata) == ("dir/kept", 7, {"mode": "640"})
    assert store.head("dir/kept").metadata == {"mode": "640"}
    replaced = store.copy("src", "replaced", {"mode": "600"})
    assert replaced.metadata == {"mode": "600"}
    head = store.head("replaced")
    assert (head.metadata, head.etag, head.size) == ({"mode": "600"}, replaced.etag, 7)
    for key in ("dir/kept", "replaced", "src"):
        assert store.get_range(key, 0, None)[0] == b"payload"
    assert store.head("src").metadata == {"mode": "640"}


def test_copy_onto_itself(store: Store) -> None:
    store.put_bytes("same", b"data", {"mode": "644"})
    assert store.copy("same", "same").metadata == {"mode": "644"}
    assert store.copy("same", "same", {"mode": "600"}).metadata == {"mode": "600"}
    assert store.get_range("same", 0, None) == (b"data", store.head("same"))


def test_delete_is_idempotent(store: Store) -> None:
    store.delete("never-existed")
    store.put_bytes("d", b"x", {})
    store.delete("d")
    with pytest.raises(NotFound):
        store.head("d")
    store.delete("d")
    store.delete("no/such/dir/")


def test_any_below(store: Store) -> None:
    assert not store.any_below("a/")
    store.put_bytes("a/b/c", b"x", {})
    store.put_bytes("m/", b"", {})
    assert store.any_below("a/")
    assert store.any_below("a/b/")
    assert store.any_below("m/")  # a marker alone makes a directory
    assert not store.any_below("b/")
    assert not store.any_below("a/c/")


def test_markers(store: Store, kind: str) -> None:
    info = store.put_bytes("dir/", b"", {"mode": "750"})
    assert (info.key, info.size) == ("dir/", 0)
    head = store.head("dir/")
    assert (head.size, head.etag) == (0, info.etag)
    assert head.metadata == marker_metadata(kind, {"mode": "750"})
    assert store.get_range("dir/", 0, None)[0] == b""
    assert store.set_metadata("dir/", {"mode": "700"}).key == "dir/"
    assert store.head("dir/").metadata == marker_metadata(kind, {"mode": "700"})
    assert store.copy("dir/", "other/").key == "other/"
    assert store.head("other/").metadata == marker_metadata(kind, {"mode": "700"})
    with pytest.raises(NotFound):
        store.head("dir")  # the marker is not an object named "dir"
    store.delete("dir/")
    with pytest.raises(NotFound):
        store.head("dir/")


def test_root_marker(store: Store, kind: str) -> None:
    assert store.has_root_marker
    store.put_bytes("", b"", {"mode": "755"})
    assert store.head("").metadata == marker_metadata(kind, {"mode": "755"})
    store.set_metadata("", {"mode": "700"})
    assert store.head("").metadata == marker_metadata(kind, {"mode": "700"})
    assert "" in keys_of(store.list_all(""))


def _tree(store: Store) -> None:
    """A tree in which every directory has its marker, so all stores agree on markers."""
    for key in ["", "b/", "b/d/", "m/"]:
        store.put_bytes(key, b"", {"mode": "755"})
    for key in ["a", "b/c", "b/d/e", "z z"]:
        store.put_bytes(key, key.encode(), {})


def test_listing_with_delimiter(store: Store) -> None:
    _tree(store)
    top = store.list_all("")
    assert keys_of(top) == ["", "a", "z z"]
    assert list(top.prefixes) == ["b/", "m/"]
    below = store.list_all("b/")
    assert keys_of(below) == ["b/", "b/c"]
    assert list(below.prefixes) == ["b/d/"]
    assert keys_of(store.list_all("b/d/")) == ["b/d/", "b/d/e"]
    assert keys_of(store.list_all("m/")) == ["m/"]
    assert store.list_all("b/c/") == ListPage((), ())
    assert store.list_all("missing/") == ListPage((), ())


def test_listing_without_delimiter(store: Store) -> None:
    _tree(store)
    everything = store.list_all("", delimiter=None)
    assert keys_of(everything) == ["", "a", "b/", "b/c", "b/d/", "b/d/e", "m/", "z z"]
    assert everything.prefixes == ()
    assert keys_of(store.list_all("b/", None)) == ["b/", "b/c", "b/d/", "b/d/e"]


def test_listing_info_matches_head(store: Store) -> None:
    _tree(store)
    for obj in store.list_all("", None).objects:
        head = store.head(obj.key)
        assert (obj.size, obj.etag, obj.last_modified_ns) == (
            head.size,
            head.etag,
            head.last_modified_ns,
        ), obj.key
        is_marker = obj.key == "" or obj.key.endswith("/")
        assert obj.size == (0 if is_marker else len(obj.key.encode())), obj.key


def test_listing_order(store: Store, kind: str) -> None:
    # '-' < '/' < '0' and 'Z' < 'a' < U+00E9 < U+FF5A < U+1D51E in UTF-8 byte order;
    # UTF-16 order (Java, JavaScript) would put U+1D51E before U+FF5A.
    names = ["a-b", "a0", "a b", "Z", "\u00e9", "\uff5a", "\U0001d51e", "a.txt"]
    for key in ["", "a/", *names, "a/x"]:
        store.put_bytes(key, b"", {})
    everything = ["", "a/", *names, "a/x"]
    expected = walk_sorted(everything) if kind == "seaweedfs" else utf8_sorted(everything)
    assert keys_of(store.list_all("", None)) == expected
    top = store.list_all("")
    assert keys_of(top) == utf8_sorted(["", *names])
    assert top.prefixes == ("a/",)


def test_unicode_and_space_keys(store: Store) -> None:
    keys = ["dir with space/ünïcødé ✓.txt", "100%/a+b=c&d?.txt", "tab\tand~tilde", "日本/語"]
    for key in keys:
        store.put_bytes(key, key.encode(), {"k": "v"})
    for key in keys:
        assert store.head(key).metadata == {"k": "v"}
        assert store.get_range(key, 0, None)[0] == key.encode()
    listed = [k for k in keys_of(store.list_all("", None)) if not k.endswith("/") and k]
    assert listed == utf8_sorted(keys)
    assert keys_of(store.list_all("dir with space/"))[-1] == keys[0]
    assert "100%/" in store.list_all("").prefixes


def test_concurrent_puts_and_reads(store: Store) -> None:
    def work(i: int) -> bytes:
        store.put_bytes(f"c/{i}", str(i).encode() * 100, {"i": str(i)})
        return store.get_range(f"c/{i}", 0, None)[0]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(work, range(32)))
    assert results == [str(i).encode() * 100 for i in range(32)]
    assert len([k for k in keys_of(store.list_all("c/")) if k != "c/"]) == 32


# --- pagination: >1000 keys (mem, file and moto; bulk setup differs per store) ------------


def _bulk_put(kind: str, store: Store, request: pytest.FixtureRequest, keys: list[str]) -> None:
    if kind == "moto":
        assert isinstance(store, S3Store)
        server: MotoServer = request.getfixturevalue("moto_server")
        server.put_objects(store.bucket, [store.prefix + k for k in keys], b"x")
    elif kind == "file":
        assert isinstance(store, FileStore)
        for key in keys:
            path = Path(store.root, key)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"x")
    else:
        for key in keys:
            store.put_bytes(key, b"x", {})


@pytest.mark.parametrize("kind", ["mem", "file", "moto"])
def test_pagination(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    store = _open(kind, request, tmp_path)
    files = [f"many/f{i:05d}" for i in range(2003)]
    deep = [f"many/d{i:02d}/x" for i in range(7)]
    subdirs = [f"many/d{i:02d}/" for i in range(7)]
    _bulk_put(kind, store, request, files + deep)
    # In the file store every directory is a marker: many/ and its subdirectories.
    markers = ["many/", *subdirs] if kind == "file" else []
    pages = list(store.list_pages("many/"))
    assert len(pages) == 3
    assert all(len(p.objects) + len(p.prefixes) <= 1000 for p in pages)
    assert [o.key for p in pages for o in p.objects] == markers[:1] + files
    assert [x for p in pages for x in p.prefixes] == subdirs
    flat = list(store.list_pages("many/", None))
    assert len(flat) == 3
    assert all(len(p.objects) <= 1000 and not p.prefixes for p in flat)
    assert [o.key for p in flat for o in p.objects] == utf8_sorted(files + deep + markers)
    store.close()


# --- S3: addressing, time bounds, error mapping ---------------------------------------------


@pytest.fixture(params=S3_STORES)
def s3_bucket(request: pytest.FixtureRequest) -> S3Bucket:
    if request.param == "moto":
        bucket: S3Bucket = request.getfixturevalue("moto_bucket")
        return bucket
    bucket = request.getfixturevalue("seaweed_bucket")
    return bucket


def test_s3_keys_live_under_the_prefix(s3_bucket: S3Bucket) -> None:
    store = open_store(f"{s3_bucket.store_url}/pools/p1", s3_bucket.options())
    store.put_bytes("x/y", b"1", {})
    store.put_bytes("", b"", {"mode": "755"})
    raw = s3_bucket.client.list_objects_v2(Bucket=s3_bucket.name)["Contents"]
    assert sorted(o["Key"] for o in raw) == ["pools/p1/", "pools/p1/x/y"]
    assert keys_of(store.list_all("", None)) == ["", "x/y"]
    assert store.list_all("").prefixes == ("x/",)
    store.close()


def test_s3_bucket_root_has_no_root_marker(s3_bucket: S3Bucket) -> None:
    store = open_store(s3_bucket.store_url, s3_bucket.options())
    assert not store.has_root_marker
    store.put_bytes("top", b"1", {})
    assert keys_of(store.list_all("")) == ["top"]
    with pytest.raises(NotFound):
        store.head("")
    with pytest.raises(NotFound):
        store.get_range("", 0, None)
    with pytest.raises(Changed):
        store.get_range("", 0, None, if_match="abc")
    writes: list[Callable[[], object]] = [
        lambda: store.put_bytes("", b"", {}),
        lambda: store.set_metadata("", {}),
        lambda: store.copy("top", ""),
    ]
    for write in writes:
        with pytest.raises(StoreError, match="no marker object"):
            write()
    store.delete("")
    store.close()


def test_s3_missing_bucket(s3_bucket: S3Bucket) -> None:
    store = open_store("s3://no-such-bucket-here/p/", s3_bucket.options())
    with pytest.raises(NotFound, match="'no-such-bucket-here' does not exist"):
        store.check()
    with pytest.raises(NotFound):
        store.head("x")
    with pytest.raises(NotFound, match="bucket does not exist"):
        store.list_all("")
    store.close()


@pytest.mark.seaweedfs
def test_s3_wrong_secret_is_denied(
    seaweed_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    # moto accepts any signature; SeaweedFS checks it.
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    store = open_store(f"{seaweed_bucket.store_url}/p/", seaweed_bucket.options())
    with pytest.raises(Denied, match="denied"):
        store.check()
    with pytest.raises(Denied):
        store.head("x")
    with pytest.raises(Denied):
        store.put_bytes("x", b"", {})
    store.close()


def _time_ops(store: Store) -> list[tuple[str, float, BaseException | None]]:
    ops: dict[str, Callable[[], object]] = {
        "check": store.check,
        "head": lambda: store.head("x"),
        "get": lambda: store.get_range("x", 0, None),
        "put": lambda: store.put_bytes("x", b"1", {}),
        "list": lambda: store.list_all(""),
    }
    results: list[tuple[str, float, BaseException | None]] = []
    for name, op in ops.items():
        started = time.monotonic()
        error: BaseException | None = None
        try:
            op()
        except StoreError as exc:
            error = exc
        results.append((name, time.monotonic() - started, error))
    return results


def test_s3_dead_endpoint_is_transient_and_fast(aws_test_env: dict[str, str]) -> None:
    options = StoreOptions(endpoint_url=f"http://127.0.0.1:{free_port()}", timeout=5)
    store = open_store("s3://bucket/p/", options)
    for name, elapsed, error in _time_ops(store):
        assert isinstance(error, Transient), (name, error)
        assert isinstance(error.__cause__, botocore.exceptions.EndpointConnectionError)
        assert elapsed < 2.0, (name, elapsed)  # refused connections back off from 50 ms
    store.close()


def test_s3_unresponsive_endpoint_is_bounded(aws_test_env: dict[str, str]) -> None:
    # A socket that accepts connections (kernel backlog) but never answers: every operation
    # must give up within its timeout, retries included. The PUT is the store's first
    # botocore call, so its time includes making the client (the budget's setup reserve).
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        options = StoreOptions(
            endpoint_url=f"http://127.0.0.1:{silent.getsockname()[1]}", timeout=2.0
        )
        store = open_store("s3://bucket/p/", options)
        assert isinstance(store, S3Store)
        waited = store.budget.read_timeout  # connecting succeeds at once (kernel backlog)
        for name, elapsed, error in _time_ops(store):
            assert isinstance(error, Transient), (name, error)
            assert isinstance(error.__cause__, botocore.exceptions.ReadTimeoutError)
            assert waited - 0.05 < elapsed < options.timeout, (name, elapsed)
        store.close()


def test_moto_restart_keeps_data_and_store_recovers(
    moto_server: MotoServer, moto_bucket: S3Bucket
) -> None:
    store = open_store(f"{moto_bucket.store_url}/p/", moto_bucket.options(timeout=4))
    info = store.put_bytes("k", b"survives", {"a": "b"})
    port = moto_server.port
    moto_server.stop()
    try:
        started = time.monotonic()
        with pytest.raises(Transient):
            store.head("k")
        assert time.monotonic() - started < 4
    finally:
        moto_server.start()
    assert moto_server.port == port
    assert store.get_range("k", 0, None, if_match=info.etag)[0] == b"survives"
    store.close()


def test_moto_counts_requests_by_operation(moto_server: MotoServer, moto_bucket: S3Bucket) -> None:
    moto_server.put_objects(moto_bucket.name, [f"pool/big/f{i:05d}" for i in range(2500)])
    store = open_store(f"{moto_bucket.store_url}/pool/", moto_bucket.options())
    moto_server.reset_counts()
    assert len(store.list_all("big/").objects) == 2500
    assert moto_server.request_counts() == {"ListObjectsV2": 3}
    store.put_bytes("f", b"1", {})
    store.head("f")
    store.get_range("f", 0, None)
    store.set_metadata("f", {"a": "b"})
    store.delete("f")
    counts = moto_server.request_counts()
    assert counts == {
        "ListObjectsV2": 3,
        "PutObject": 1,
        "HeadObject": 2,
        "GetObject": 1,
        "CopyObject": 1,
        "DeleteObject": 1,
    }
    store.close()


# The lean path's method for each operation and its arguments as botocore parameters.
_LEAN_CALLS: dict[str, tuple[str, Callable[..., dict[str, Any]]]] = {
    "UploadPart": (
        "upload_part",
        lambda key, upload_id, number, *_: {
            "Key": key,
            "UploadId": upload_id,
            "PartNumber": number,
        },
    ),
    "CreateMultipartUpload": ("create_upload", lambda key, _meta: {"Key": key}),
    "CompleteMultipartUpload": (
        "complete_upload",
        lambda key, upload_id, _parts: {"Key": key, "UploadId": upload_id},
    ),
    "AbortMultipartUpload": (
        "abort_upload",
        lambda key, upload_id: {"Key": key, "UploadId": upload_id},
    ),
}


def _fail_on(store: S3Store, event: str, when: Callable[[dict[str, Any]], bool]) -> None:
    """Fail `event` requests matching `when` as an unreachable endpoint, before they are sent
    (on the botocore client, and on the lean path for the multipart requests)."""

    def hook(params: dict[str, Any], **_: Any) -> None:
        if when(params):
            raise botocore.exceptions.EndpointConnectionError(endpoint_url="test-injected")

    store._client.meta.events.register(f"before-parameter-build.s3.{event}", hook)
    lean = store.lean
    if event in _LEAN_CALLS and lean is not None:
        name, params = _LEAN_CALLS[event]
        original = getattr(lean, name)

        def failing(*args: Any) -> Any:
            hook(params(*args))
            return original(*args)

        setattr(lean, name, failing)


def test_s3_failed_multipart_upload_is_aborted(moto_bucket: S3Bucket, tmp_path: Path) -> None:
    store = open_store(f"{moto_bucket.store_url}/p/", moto_bucket.options(**SMALL_PARTS))
    assert isinstance(store, S3Store)
    store.put_bytes("f", b"previous", {})
    source = tmp_path / "big"
    source.write_bytes(os.urandom(16 * MiB))
    _fail_on(store, "UploadPart", lambda params: params["PartNumber"] == 3)
    with pytest.raises(Transient) as info:
        store.put_file("f", str(source), {})
    assert info.value.key == "f"
    assert (
        moto_bucket.client.list_multipart_uploads(Bucket=moto_bucket.name).get("Uploads", []) == []
    )
    assert store.get_range("f", 0, None)[0] == b"previous"
    store.close()


@pytest.mark.expect_log
def test_s3_failed_abort_is_logged(
    moto_bucket: S3Bucket, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = open_store(f"{moto_bucket.store_url}/p/", moto_bucket.options(**SMALL_PARTS))
    assert isinstance(store, S3Store)
    source = tmp_path / "big"
    source.write_bytes(b"\0" * 6 * MiB)
    _fail_on(store, "UploadPart", lambda params: params["PartNumber"] == 2)
    _fail_on(store, "AbortMultipartUpload", lambda params: True)
    with caplog.at_level(logging.WARNING, logger="poolfs"), pytest.raises(Transient):
        store.put_file("f", str(source), {})
    assert "could not abort multipart upload" in caplog.text
    store.close()


def test_s3_large_copy_uses_part_copy(moto_server: MotoServer, moto_bucket: S3Bucket) -> None:
    store = open_store(f"{moto_bucket.store_url}/p/", moto_bucket.options(**SMALL_PARTS))
    assert isinstance(store, S3Store)
    store.single_copy_limit = 5 * MiB
    data = os.urandom(11 * MiB)
    store.put_bytes("big", data, {"mode": "600"})
    moto_server.reset_counts()
    kept = store.copy("big", "copy")
    assert (kept.size, kept.metadata) == (11 * MiB, {"mode": "600"})
    changed = store.set_metadata("copy", {"mode": "644"})
    assert changed.metadata == {"mode": "644"}
    assert moto_server.request_counts().get("UploadPartCopy", 0) >= 6
    assert store.get_range("copy", 0, None) == (data, store.head("copy"))
    store.close()


# --- S3: behaviour against servers that misbehave (stubbed responses) -------------------------


def _stub_store() -> tuple[S3Store, Stubber]:
    options = StoreOptions(endpoint_url="http://127.0.0.1:9", region="us-east-1")
    store = S3Store("bkt", "p/", options)
    # The stubs answer the botocore client, which stays the reference (and the fallback) of
    # the lean read path; tests/test_s3wire.py runs the same cases on the lean path.
    assert store.lean is not None
    store.lean.close()
    store.lean = None
    return store, Stubber(store._client)


def _get_response(body: bytes | io.RawIOBase, etag: str, length: int, **extra: Any) -> Any:
    raw = io.BytesIO(body) if isinstance(body, bytes) else body
    return {
        "Body": StreamingBody(cast(IO[bytes], raw), length),
        "ETag": f'"{etag}"',
        "ContentLength": length,
        "LastModified": datetime.datetime(2024, 1, 2, 3, 4, 5, 678000, tzinfo=datetime.UTC),
        "Metadata": {"a": "b"},
        **extra,
    }


def test_s3_server_ignoring_range_is_sliced(aws_test_env: dict[str, str]) -> None:
    store, stub = _stub_store()
    stub.add_response("get_object", _get_response(b"0123456789", "e1", 10))
    with stub:
        data, info = store.get_range("k", 2, 5)
    assert data == b"234"
    assert (info.size, info.etag, info.last_modified_ns) == (10, "e1", 1704164645 * 10**9)
    store.close()


def test_s3_server_ignoring_if_match_is_changed(aws_test_env: dict[str, str]) -> None:
    store, stub = _stub_store()
    stub.add_response("get_object", _get_response(b"01", "other", 2, ContentRange="bytes 0-1/10"))
    with stub, pytest.raises(Changed):
        store.get_range("k", 0, 2, if_match="pinned")
    store.close()


class _BrokenStream(io.RawIOBase):
    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        raise urllib3.exceptions.ProtocolError("connection broken mid-body")


def test_s3_broken_body_is_retried(aws_test_env: dict[str, str]) -> None:
    store, stub = _stub_store()
    ranged = {"ContentRange": "bytes 0-3/4"}
    stub.add_response("get_object", _get_response(_BrokenStream(), "e", 4, **ranged))
    stub.add_response("get_object", _get_response(b"abcd", "e", 4, **ranged))
    with stub:
        assert store.get_range("k", 0, None)[0] == b"abcd"
    for _ in range(store.budget.attempts):
        stub.add_response("get_object", _get_response(_BrokenStream(), "e", 4, **ranged))
    with stub, pytest.raises(Transient):
        store.get_range("k", 0, None)
    store.close()


@pytest.mark.parametrize(
    ("code", "status", "kind"),
    [
        ("NoSuchKey", 404, NotFound),
        ("NoSuchBucket", 404, NotFound),
        ("404", 404, NotFound),
        ("AccessDenied", 403, Denied),
        ("InvalidAccessKeyId", 403, Denied),
        ("SignatureDoesNotMatch", 403, Denied),
        ("403", 403, Denied),
        ("SlowDown", 503, Throttled),
        ("Throttling", 400, Throttled),
        ("503", 503, Throttled),
        ("PreconditionFailed", 412, Changed),
        ("EntityTooLarge", 400, TooLarge),
        ("InternalError", 500, Transient),
        ("502", 502, Transient),
        ("RequestTimeout", 400, Transient),
        ("InvalidArgument", 400, StoreError),
    ],
)
def test_s3_error_table(code: str, status: int, kind: type[StoreError]) -> None:
    response: Any = {
        "Error": {"Code": code, "Message": "m"},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    exc = botocore.exceptions.ClientError(response, "GetObject")
    error = _map_error("get", "s3://b/k", "k", exc)
    assert type(error) is kind
    assert error.key == "k"
    assert code in str(error)
    assert "s3://b/k" in str(error)


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (botocore.exceptions.EndpointConnectionError(endpoint_url="http://x"), Transient),
        (botocore.exceptions.ConnectTimeoutError(endpoint_url="http://x"), Transient),
        (botocore.exceptions.ReadTimeoutError(endpoint_url="http://x"), Transient),
        (botocore.exceptions.ConnectionClosedError(endpoint_url="http://x"), Transient),
        (botocore.exceptions.ResponseStreamingError(error="x"), Transient),
        (botocore.exceptions.IncompleteReadError(actual_bytes=1, expected_bytes=2), Transient),
        (botocore.exceptions.NoCredentialsError(), Denied),
        (botocore.exceptions.ParamValidationError(report="bad"), StoreError),
    ],
)
def test_s3_exception_table(exc: Exception, kind: type[StoreError]) -> None:
    error = _map_error("get", "s3://b/k", "k", exc)
    assert type(error) is kind
    assert error.key == "k"


@pytest.mark.parametrize("timeout", [0.5, 2, 4, 5, 11.9, 12, 30, 120])
def test_s3_time_budget_fits_the_timeout(timeout: float) -> None:
    budget = time_budget(timeout)
    backoff = sum(min(2.0**i, 20.0) for i in range(budget.attempts - 1))
    requests = budget.attempts * (budget.connect_timeout + budget.read_timeout)
    worst = setup_reserve(timeout) + requests + backoff
    assert worst <= timeout + 1e-9
    assert 0 < setup_reserve(timeout) <= 0.5
    assert budget.connect_timeout > 0
    assert budget.read_timeout > 0
    assert budget.attempts >= 1
    if timeout >= 30:
        assert budget.attempts == 3 and budget.connect_timeout > 2.9


# --- file store: layout and local errors ------------------------------------------------------


@pytest.fixture
def file_store(tmp_path: Path) -> FileStore:
    root = tmp_path / "fs"
    root.mkdir()
    return FileStore(str(root))


def test_file_layout(file_store: FileStore) -> None:
    root = Path(file_store.root)
    file_store.put_bytes("a/b/c.txt", b"abc", {"mode": "600"})
    file_store.put_bytes("m/", b"", {"mode": "700"})
    assert (root / "a/b/c.txt").read_bytes() == b"abc"
    assert json.loads(os.getxattr(root / "a/b/c.txt", XATTR)) == {"mode": "600"}
    assert (root / "m").is_dir()
    assert json.loads(os.getxattr(root / "m", XATTR)) == {"mode": "700"}
    assert sorted(os.listdir(root / "a/b")) == ["c.txt"]  # no temp file left behind


def test_file_check_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(NotFound, match="does not exist"):
        FileStore(str(tmp_path / "missing")).check()
    (tmp_path / "plain").write_bytes(b"")
    with pytest.raises(StoreError, match="not a directory"):
        FileStore(str(tmp_path / "plain")).check()
    store = FileStore(str(tmp_path))

    def no_xattrs(*args: Any) -> None:
        raise OSError(errno.ENOTSUP, "Operation not supported")

    with monkeypatch.context() as patch:
        patch.setattr(os, "setxattr", no_xattrs)
        with pytest.raises(StoreError, match="does not support user extended attributes"):
            store.check()
    real_open = os.open

    def read_only(path: Any, flags: int, *args: Any) -> int:
        if flags & os.O_CREAT:
            raise OSError(errno.EROFS, "Read-only file system")
        return real_open(path, flags, *args)

    with monkeypatch.context() as patch:
        patch.setattr(os, "open", read_only)
        with pytest.raises(Denied, match="not writable"):
            store.check()
    assert os.listdir(tmp_path) == ["plain"]  # the probe file is gone


def test_file_path_conflicts(file_store: FileStore) -> None:
    file_store.put_bytes("f", b"1", {})
    with pytest.raises(StoreError, match="'f' is a file, not a directory"):
        file_store.put_bytes("f/x", b"2", {})
    with pytest.raises(StoreError, match="a file exists where the directory"):
        file_store.put_bytes("f/", b"", {})
    file_store.put_bytes("d/x", b"1", {})
    with pytest.raises(StoreError, match="a directory exists where the object"):
        file_store.put_bytes("d", b"2", {})
    with pytest.raises(StoreError, match="cannot have content"):
        file_store.put_bytes("d/", b"data", {})
    with pytest.raises(NotFound):
        file_store.head("d")
    file_store.delete("d")  # the directory d/ is not the object d
    assert file_store.head("d/x").size == 1


@pytest.mark.parametrize("key", ["../escape", "a/../b", "a//b", "/abs", "./x", "a/./b", "x\0y"])
def test_file_invalid_keys(file_store: FileStore, key: str) -> None:
    with pytest.raises(StoreError, match="invalid key"):
        file_store.put_bytes(key, b"", {})
    with pytest.raises(StoreError, match="invalid key"):
        file_store.head(key)


def test_file_temp_names_are_hidden_and_reserved(file_store: FileStore) -> None:
    Path(file_store.root, f"{TMP_PREFIX}leftover").write_bytes(b"partial")
    file_store.put_bytes("real", b"1", {})
    assert keys_of(file_store.list_all("", None)) == ["", "real"]
    with pytest.raises(StoreError, match="reserved"):
        file_store.put_bytes(f"{TMP_PREFIX}x", b"", {})


def test_file_directories_made_elsewhere_are_markers(file_store: FileStore) -> None:
    root = Path(file_store.root)
    (root / "made/by/tool").mkdir(parents=True)
    (root / "made/by/tool/f").write_bytes(b"12")
    assert keys_of(file_store.list_all("", None)) == [
        "",
        "made/",
        "made/by/",
        "made/by/tool/",
        "made/by/tool/f",
    ]
    assert file_store.head("made/by/").metadata == {}
    assert file_store.head("made/by/tool/f").metadata == {}


def test_file_special_files_are_not_objects(file_store: FileStore) -> None:
    root = Path(file_store.root)
    (root / "target").write_bytes(b"t")
    (root / "link").symlink_to(root / "target")
    os.mkfifo(root / "fifo")
    assert keys_of(file_store.list_all("")) == ["", "target"]
    for key in ("link", "fifo"):
        with pytest.raises(NotFound):
            file_store.head(key)


def test_file_delete_marker(file_store: FileStore) -> None:
    root = Path(file_store.root)
    file_store.put_bytes("full/", b"", {"mode": "700"})
    file_store.put_bytes("full/f", b"1", {})
    file_store.delete("full/")
    assert (root / "full/f").exists()
    assert file_store.head("full/").metadata == {}  # still a directory, metadata gone
    file_store.put_bytes("empty/", b"", {"mode": "700"})
    file_store.delete("empty/")
    assert not (root / "empty").exists()
    file_store.put_bytes("", b"", {"mode": "755"})
    file_store.delete("")
    assert root.is_dir()
    assert file_store.head("").metadata == {}


def test_file_failed_write_leaves_old_object(
    file_store: FileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    file_store.put_bytes("f", b"old", {"mode": "644"})

    def too_big(*args: Any) -> None:
        raise OSError(errno.E2BIG, "Argument list too long")

    monkeypatch.setattr(os, "setxattr", too_big)
    with pytest.raises(TooLarge) as info:
        file_store.put_bytes("f", b"new", {"x": "y" * 100_000})
    assert info.value.key == "f"
    monkeypatch.undo()
    assert file_store.get_range("f", 0, None)[0] == b"old"
    assert os.listdir(file_store.root) == ["f"]


def test_file_every_change_is_a_new_version(file_store: FileStore) -> None:
    """Back-to-back writes of the same size (which may reuse a freed inode number within one
    kernel timestamp tick) and metadata-only changes all give distinct etags."""
    etags = [file_store.put_bytes("f", b"same", {"v": "0"}).etag]
    for i in range(20):
        etags.append(file_store.put_bytes("f", b"same", {"v": str(i)}).etag)
        etags.append(file_store.set_metadata("f", {"w": str(i)}).etag)
    assert len(set(etags)) == len(etags)
    with pytest.raises(Changed):
        file_store.get_range("f", 0, None, if_match=etags[0])


def test_file_pinned_read_never_returns_the_replacement(file_store: FileStore) -> None:
    """A read pinned to a version that is replaced while it reads returns the old bytes or
    raises Changed, never the new bytes."""
    old = file_store.put_bytes("f", b"old!", {})
    started = threading.Event()
    real_pread = os.pread

    def slow_pread(fd: int, length: int, offset: int) -> bytes:
        started.set()
        time.sleep(0.2)
        return real_pread(fd, length, offset)

    outcome: list[object] = []

    def read() -> None:
        try:
            outcome.append(file_store.get_range("f", 0, None, old.etag)[0])
        except Changed as exc:
            outcome.append(exc)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "pread", slow_pread)
        reader = threading.Thread(target=read)
        reader.start()
        assert started.wait(5)
        file_store.put_bytes("f", b"new!", {})
        reader.join()
    assert outcome == [b"old!"] or isinstance(outcome[0], Changed)
    with pytest.raises(Changed):
        file_store.get_range("f", 0, None, if_match=old.etag)


@pytest.mark.parametrize("code", sorted(_ERRNO_KINDS))
def test_file_errno_table(code: int) -> None:
    kind, text = _ERRNO_KINDS[code]
    error = _map_os_error("put", "/p/k", "k", OSError(code, os.strerror(code)))
    assert type(error) is kind
    assert error.key == "k"
    assert text in str(error)
    assert "/p/k" in str(error)


def test_file_enospc_is_transient_with_clear_message() -> None:
    error = _map_os_error("put", "/p/k", "k", OSError(errno.ENOSPC, "No space left on device"))
    assert isinstance(error, Transient)
    assert "no space left on device" in str(error)


def test_file_mode_of_new_files_follows_umask(file_store: FileStore) -> None:
    old = os.umask(0o027)
    try:
        file_store.put_bytes("d/f", b"1", {})
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(Path(file_store.root, "d/f")).st_mode) == 0o640
