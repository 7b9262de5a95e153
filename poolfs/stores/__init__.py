"""Stores addressed by URL: `s3://BUCKET/PREFIX`, `file:///ABS/DIR`, `mem://NAME`.

`open_store` is the only way the rest of poolfs gets a store; it imports a backend module
lazily so that boto3 is loaded only for s3:// URLs.
"""

from __future__ import annotations

import dataclasses
import re
import urllib.parse

from pydantic import BaseModel, ConfigDict, Field

from poolfs.stores.base import (
    Changed,
    Denied,
    InvalidStoreURL,
    ListPage,
    NotFound,
    ObjectInfo,
    Store,
    StoreError,
    Throttled,
    TooLarge,
    Transient,
    Upload,
)

__all__ = [
    "Changed",
    "Denied",
    "InvalidStoreURL",
    "ListPage",
    "NotFound",
    "ObjectInfo",
    "Store",
    "StoreError",
    "StoreOptions",
    "StoreURL",
    "Throttled",
    "TooLarge",
    "Transient",
    "Upload",
    "open_store",
    "parse_store_url",
]

# S3 bucket naming rules (the subset that matters for a clear error message).
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_MEM_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")


class StoreOptions(BaseModel):
    """How to reach a store. Built by CLIs; the library never reads the environment itself,
    except that boto3's own credential/endpoint chain applies when a field is None."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    endpoint_url: str | None = None
    region: str | None = None
    # Upper bound on the time one store operation may take, retries included (seconds).
    timeout: float = Field(default=30.0, gt=0)
    # Parallel parts for multipart uploads / parallel ranged GETs.
    max_concurrency: int = Field(default=8, ge=1, le=64)
    multipart_threshold: int = Field(default=16 * 1024 * 1024, ge=5 * 1024 * 1024)
    multipart_chunksize: int = Field(default=8 * 1024 * 1024, ge=5 * 1024 * 1024)


@dataclasses.dataclass(frozen=True, slots=True)
class StoreURL:
    scheme: str  # "s3" | "file" | "mem"
    location: str  # bucket, absolute directory, or memory-store name
    prefix: str  # "" or "a/b/" (always ends in "/" when not empty); s3 only

    def __str__(self) -> str:
        if self.scheme == "s3":
            return f"s3://{self.location}/{self.prefix}"
        if self.scheme == "file":
            return f"file://{self.location}"
        return f"mem://{self.location}"


def parse_store_url(url: str) -> StoreURL:
    """Parse and validate a store URL; InvalidStoreURL names exactly what is wrong."""
    if not url:
        raise InvalidStoreURL(
            "empty store URL (expected s3://BUCKET/PREFIX, file:///DIR or mem://NAME)"
        )
    parsed = urllib.parse.urlsplit(url)
    scheme = parsed.scheme.lower()
    if scheme == "s3":
        bucket = parsed.netloc
        if not bucket:
            raise InvalidStoreURL(f"{url!r}: missing bucket name (expected s3://BUCKET/PREFIX)")
        if not _BUCKET_RE.match(bucket) or ".." in bucket:
            raise InvalidStoreURL(f"{url!r}: {bucket!r} is not a valid S3 bucket name")
        if parsed.query or parsed.fragment:
            raise InvalidStoreURL(f"{url!r}: query strings and fragments are not allowed")
        if re.fullmatch(r"\d+\.\d+\.\d+\.\d+", bucket):
            raise InvalidStoreURL(f"{url!r}: bucket names must not look like an IP address")
        prefix = parsed.path[1:] if parsed.path.startswith("/") else parsed.path
        if prefix:
            parts = prefix.rstrip("/").split("/")
            if any(p in ("", ".", "..") for p in parts):
                raise InvalidStoreURL(f"{url!r}: prefix has an empty, '.' or '..' segment")
            prefix = "/".join(parts) + "/"
        return StoreURL("s3", bucket, prefix)
    if scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise InvalidStoreURL(
                f"{url!r}: file URLs need an absolute path: file:///ABS/DIR (three slashes)"
            )
        path = urllib.parse.unquote(parsed.path)
        if not path.startswith("/"):
            raise InvalidStoreURL(f"{url!r}: file URLs need an absolute path: file:///ABS/DIR")
        if parsed.query or parsed.fragment:
            raise InvalidStoreURL(f"{url!r}: query strings and fragments are not allowed")
        parts = [p for p in path.split("/") if p]
        if any(p in (".", "..") for p in parts):
            raise InvalidStoreURL(f"{url!r}: path has a '.' or '..' segment")
        return StoreURL("file", "/" + "/".join(parts), "")
    if scheme == "mem":
        name = parsed.netloc + parsed.path
        if not name or not _MEM_NAME_RE.match(name):
            raise InvalidStoreURL(f"{url!r}: expected mem://NAME with NAME of [A-Za-z0-9_.-]")
        return StoreURL("mem", name, "")
    if not scheme:
        raise InvalidStoreURL(
            f"{url!r}: no scheme; expected s3://BUCKET/PREFIX, file:///DIR or mem://NAME"
        )
    raise InvalidStoreURL(f"{url!r}: unsupported scheme {scheme!r} (use s3, file or mem)")


def open_store(url: str, options: StoreOptions | None = None) -> Store:
    """Open the store a URL names. Does no I/O; call `check()` to test reachability."""
    parsed = parse_store_url(url)
    options = options or StoreOptions()
    if parsed.scheme == "s3":
        from poolfs.stores.s3 import S3Store

        return S3Store(parsed.location, parsed.prefix, options)
    if parsed.scheme == "file":
        from poolfs.stores.file import FileStore

        return FileStore(parsed.location)
    from poolfs.stores.mem import MemStore

    return MemStore.named(parsed.location)
