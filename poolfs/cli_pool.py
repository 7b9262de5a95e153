"""`poolfs pool create|share|list|upload|download`: the pool catalog and bulk transfers.

The store ROOT comes from `--store URL`, else `$POOLFS_STORE`, else `DEFAULT_STORE` (the
embedded `file://` store mountd uses by default). Pools live at `<store>/<id>/`, the catalog
at `<store>/.poolfs/catalog/` (see poolfs.catalog).

Transfers (`upload`, `download`):
- Run `--jobs` files at a time; a progress bar (bytes) goes to stderr when it is a terminal, or
  always with `--progress`.
- The per-file limit (500 MiB, `--max-file-size`, the same limit mounts enforce) is checked for
  every file BEFORE any byte moves: one file over it and nothing is transferred; every such file
  is named.
- Upload keeps each file's mode and times as poolfs metadata (what mounts show and `cp -p`
  keeps); empty directories become directory markers; symlinks and special files are skipped
  with a notice. Download restores mode and times where the objects carry them; objects whose
  keys cannot be paths (`a//b`, `..`, components over 255 bytes) and objects shadowed by a
  directory of the same name are skipped with a notice, as a mount would skip them.
- A downloaded file is written to a temporary name beside its target and renamed when complete,
  from one object version (ETag pinned): a file is never left half-written under its name.

Exit codes: 0 success; 1 a store error, an unknown pool, or some files failed (each named);
2 the request itself is wrong (bad URL, tenant, role, name, a file over the limit).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import json
import os
import stat
import sys
import threading
import uuid
from collections.abc import Callable
from typing import Any

from tqdm import tqdm

from poolfs.catalog import Catalog, CatalogError, PoolNotFound, Role, parse_role
from poolfs.fs.config import DEFAULT_MAX_FILE_SIZE
from poolfs.fs.meta import NAME_MAX, decode_meta, encode_meta, valid_name
from poolfs.stores import Changed, InvalidStoreURL, Store, StoreError, StoreOptions

__all__ = [
    "DEFAULT_STORE",
    "STORE_ENV",
    "DownloadItem",
    "TransferError",
    "UploadItem",
    "download",
    "plan_download",
    "plan_upload",
    "register",
    "upload",
]

STORE_ENV = "POOLFS_STORE"
DEFAULT_STORE = "file:///var/lib/poolfs/pools"
_CHUNK = 8 * 1024 * 1024
_PART_SUFFIX = ".poolfs-part"

Progress = Callable[[int], None]


class TransferError(Exception):
    """The transfer is refused before it starts (exit code 2); the message lists why."""


@dataclasses.dataclass(frozen=True, slots=True)
class UploadItem:
    """One file (or, with `is_dir`, one empty directory) to upload as `key`."""

    key: str
    path: str
    size: int
    is_dir: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class DownloadItem:
    """One object (or, with `is_dir`, one directory marker) to download to `path`."""

    key: str
    path: str
    size: int
    is_dir: bool = False


def _too_large(items: list[tuple[str, int]], limit: int, verb: str) -> TransferError:
    lines = "\n".join(f"  - {name}: {size} bytes" for name, size in items)
    return TransferError(
        f"{len(items)} file(s) larger than the {limit} byte limit per file "
        f"({limit / 1024 / 1024:g} MiB); nothing was {verb}:\n{lines}"
    )


def plan_upload(
    local_dir: str, max_file_size: int, notice: Callable[[str], None]
) -> list[UploadItem]:
    """What uploading `local_dir` would send; TransferError if any file may not be sent.

    Files over `max_file_size`, names that are not UTF-8 and components over 255 bytes are
    refused all together (every offender named). Symlinks and special files are skipped with a
    `notice`. Empty directories are kept as markers.
    """
    root = os.path.abspath(local_dir)
    if not os.path.isdir(root):
        raise TransferError(f"{root} is not a directory")
    items: list[UploadItem] = []
    too_large: list[tuple[str, int]] = []
    bad_names: list[str] = []

    def fail(exc: OSError) -> None:
        raise exc

    for dirpath, dirnames, filenames in os.walk(root, onerror=fail):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, root)
        prefix = "" if rel_dir == "." else rel_dir.replace(os.sep, "/") + "/"
        if prefix and not dirnames and not filenames:
            items.append(UploadItem(prefix, dirpath, 0, is_dir=True))
        for name in [*sorted(filenames), *[d for d in dirnames if _is_link(dirpath, d)]]:
            path = os.path.join(dirpath, name)
            key = prefix + name
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode):
                kind = "symlink" if stat.S_ISLNK(st.st_mode) else "special file"
                notice(f"skipping {path}: a {kind} is not uploaded")
                continue
            if not all(valid_name(part) for part in key.split("/")):
                bad_names.append(path)
                continue
            if st.st_size > max_file_size:
                too_large.append((path, st.st_size))
                continue
            items.append(UploadItem(key, path, st.st_size))
        # Symlinked directories were handled above as entries; never descend into them.
        dirnames[:] = [d for d in dirnames if not _is_link(dirpath, d)]
    if bad_names:
        lines = "\n".join(f"  - {name!r}" for name in bad_names)
        raise TransferError(
            f"{len(bad_names)} name(s) cannot be pool keys (not UTF-8, or a component over "
            f"{NAME_MAX} bytes); nothing was uploaded:\n{lines}"
        )
    if too_large:
        raise _too_large(too_large, max_file_size, "uploaded")
    return items


def _is_link(dirpath: str, name: str) -> bool:
    return os.path.islink(os.path.join(dirpath, name))


def _upload_one(store: Store, item: UploadItem, max_file_size: int) -> None:
    st = os.stat(item.path)
    meta = encode_meta(st.st_mode & 0o7777, st.st_mtime_ns, st.st_atime_ns)
    if item.is_dir:
        store.put_bytes(item.key, b"", meta)
        return
    if st.st_size > max_file_size:
        # It grew after planning; the limit holds all the same.
        raise TransferError(f"{item.path} grew to {st.st_size} bytes, over the limit")
    store.put_file(item.key, item.path, meta)


def _run_parallel(
    work: Callable[[Any], None],
    items: list[Any],
    jobs: int,
    label: Callable[[Any], str],
    size: Callable[[Any], int],
    progress: Progress,
) -> list[str]:
    """Run `work(item)` for all items, `jobs` at a time; returns one line per failure."""
    failures: list[str] = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(work, item): item for item in items}
        for future in concurrent.futures.as_completed(futures):
            item = futures[future]
            try:
                future.result()
            except (StoreError, OSError, TransferError) as exc:
                failures.append(f"{label(item)}: {exc}")
            else:
                progress(size(item))
    return sorted(failures)


def upload(
    store: Store, items: list[UploadItem], *, jobs: int, max_file_size: int, progress: Progress
) -> list[str]:
    """Upload planned items into the pool `store`; returns the failures (empty: all done).

    `progress(n)` is called with each finished file's size (for a byte progress bar).
    """
    return _run_parallel(
        lambda item: _upload_one(store, item, max_file_size),
        items,
        jobs,
        lambda item: item.path,
        lambda item: item.size,
        progress,
    )


def _key_parts(key: str) -> list[str] | None:
    body = key[:-1] if key.endswith("/") else key
    parts = body.split("/")
    return parts if all(valid_name(part) for part in parts) else None


def plan_download(
    store: Store, local_dir: str, max_file_size: int, notice: Callable[[str], None]
) -> list[DownloadItem]:
    """What downloading the pool `store` into `local_dir` would fetch; TransferError if an
    object is over the limit. Unusable keys and shadowed objects are skipped with a notice."""
    root = os.path.abspath(local_dir)
    objects: dict[str, int] = {}
    markers: set[str] = set()
    for page in store.list_pages("", None):
        for obj in page.objects:
            if obj.key == "":
                continue
            if obj.key.endswith("/"):
                markers.add(obj.key)
            else:
                objects[obj.key] = obj.size
    # Every key implies its parent directories; a file named like one of them is shadowed.
    directories = set(markers)
    for key in [*objects, *markers]:
        components = key.rstrip("/").split("/")
        for depth in range(1, len(components)):
            directories.add("/".join(components[:depth]) + "/")
    items: list[DownloadItem] = []
    too_large: list[tuple[str, int]] = []
    for key in sorted(markers):
        parts = _key_parts(key)
        if parts is None:
            notice(f"skipping key {key!r}: it cannot be a path")
            continue
        items.append(DownloadItem(key, os.path.join(root, *parts), 0, is_dir=True))
    for key, size in sorted(objects.items()):
        parts = _key_parts(key)
        if parts is None:
            notice(f"skipping key {key!r}: it cannot be a path")
            continue
        if key + "/" in directories:
            notice(f"skipping object {key!r}: a directory of the same name shadows it")
            continue
        if size > max_file_size:
            too_large.append((key, size))
            continue
        items.append(DownloadItem(key, os.path.join(root, *parts), size))
    if too_large:
        raise _too_large(too_large, max_file_size, "downloaded")
    return items


def _set_times(path: str, metadata: dict[str, str] | None, last_modified_ns: int) -> None:
    mode, mtime, atime, has_meta = decode_meta(metadata, last_modified_ns, 0o644)
    if has_meta:
        os.chmod(path, mode)
    os.utime(path, ns=(atime, mtime))


def _download_one(store: Store, item: DownloadItem, progress: Progress) -> None:
    if item.is_dir:
        os.makedirs(item.path, exist_ok=True)
        return
    os.makedirs(os.path.dirname(item.path), exist_ok=True)
    temp = item.path + _PART_SUFFIX
    try:
        with open(temp, "wb") as out:
            data, info = store.get_range(item.key, 0, _CHUNK)
            out.write(data)
            progress(len(data))
            offset = len(data)
            while offset < info.size:
                # Pinned to the first chunk's version: never a file of two versions.
                data, _ = store.get_range(item.key, offset, offset + _CHUNK, if_match=info.etag)
                if not data:
                    raise StoreError(f"{item.key}: object ended at {offset} of {info.size}")
                out.write(data)
                progress(len(data))
                offset += len(data)
        _set_times(temp, dict(info.metadata) if info.metadata else None, info.last_modified_ns)
        os.replace(temp, item.path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise


def download(
    store: Store, items: list[DownloadItem], *, jobs: int, progress: Progress
) -> list[str]:
    """Download planned items from the pool `store`; returns the failures (empty: all done).

    `progress(n)` is called as bytes arrive. Directories (markers) are made first, in one
    thread, so that the parallel file downloads find their parents in place.
    """
    for item in items:
        if item.is_dir:
            _download_one(store, item, progress)
    files = [item for item in items if not item.is_dir]

    def work(item: DownloadItem) -> None:
        try:
            _download_one(store, item, progress)
        except Changed as exc:
            raise StoreError(f"changed while downloading, try again: {exc}") from exc

    return _run_parallel(work, files, jobs, lambda item: item.key, lambda item: 0, lambda n: None)


# ---------------------------------------------------------------------------------- the CLI


def _fail(message: str, code: int) -> int:
    print(f"poolfs pool: {message}", file=sys.stderr)
    return code


def _options(args: argparse.Namespace) -> StoreOptions:
    return StoreOptions(endpoint_url=args.endpoint_url)


def _store_url(args: argparse.Namespace) -> str:
    return str(args.store or os.environ.get(STORE_ENV) or DEFAULT_STORE)


def _open_catalog(args: argparse.Namespace) -> Catalog:
    return Catalog.open(_store_url(args), _options(args))


def _pool_id(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a pool id (a UUID)") from None


def _role(value: str) -> Role:
    try:
        return parse_role(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _guarded(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Known failures become one line on stderr and an exit code (module docstring)."""

    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except (InvalidStoreURL, CatalogError, TransferError) as exc:
            return _fail(str(exc), 2)
        except PoolNotFound as exc:
            return _fail(f"{exc} in {_store_url(args)}", 1)
        except StoreError as exc:
            return _fail(f"store error: {exc}", 1)

    return run


def _cmd_create(args: argparse.Namespace) -> int:
    catalog = _open_catalog(args)
    try:
        record = catalog.create(args.name, args.owner)
    finally:
        catalog.close()
    print(record.id)
    return 0


def _cmd_share(args: argparse.Namespace) -> int:
    catalog = _open_catalog(args)
    try:
        record = catalog.share(args.pool_id, args.tenant, None if args.revoke else args.role)
    finally:
        catalog.close()
    role = record.role_of(args.tenant)
    print(f"{record.id} {args.tenant} {role.value if role else 'NONE'}")
    return 0


def _record_json(record: Any) -> dict[str, Any]:
    return {
        "id": str(record.id),
        "name": record.name,
        "owner": record.owner,
        "created": record.created.isoformat(),
        "members": {tenant: role.value for tenant, role in sorted(record.members.items())},
    }


def _cmd_list(args: argparse.Namespace) -> int:
    catalog = _open_catalog(args)
    try:
        records = catalog.list()
    finally:
        catalog.close()
    if args.json:
        print(json.dumps([_record_json(r) for r in records], indent=2))
        return 0
    rows = [("ID", "NAME", "OWNER", "CREATED", "MEMBERS")]
    for r in records:
        members = ",".join(f"{t}:{role.value}" for t, role in sorted(r.members.items()))
        created = r.created.strftime("%Y-%m-%dT%H:%M:%SZ")
        rows.append((str(r.id), r.name, r.owner, created, members or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row[:4], widths, strict=True)]
        print("  ".join([*cells, row[4]]))
    return 0


class _Bar:
    """A thread-safe byte progress bar (tqdm), or nothing when progress is off."""

    def __init__(self, total: int, label: str, enabled: bool) -> None:
        self._lock = threading.Lock()
        self._bar: tqdm[Any] | None = None
        if enabled:
            self._bar = tqdm(
                total=total,
                desc=label,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                file=sys.stderr,
                dynamic_ncols=True,
            )

    def add(self, count: int) -> None:
        if self._bar is not None and count:
            with self._lock:
                self._bar.update(count)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _show_progress(args: argparse.Namespace) -> bool:
    if args.progress is not None:
        return bool(args.progress)
    return sys.stderr.isatty()


def _notice(message: str) -> None:
    print(f"poolfs pool: {message}", file=sys.stderr)


def _report(failures: list[str], done: int, verb: str, pool_id: uuid.UUID) -> int:
    if failures:
        lines = "\n".join(f"  - {f}" for f in failures)
        return _fail(f"{len(failures)} file(s) failed to {verb}:\n{lines}", 1)
    print(f"{verb}ed {done} file(s) ({pool_id})", file=sys.stderr)
    return 0


def _cmd_upload(args: argparse.Namespace) -> int:
    items = plan_upload(args.local_dir, args.max_file_size, _notice)
    catalog = _open_catalog(args)
    try:
        catalog.get(args.pool_id)
        store = catalog.pool_store(args.pool_id)
        total = sum(item.size for item in items)
        bar = _Bar(total, "upload", _show_progress(args))
        try:
            failures = upload(
                store, items, jobs=args.jobs, max_file_size=args.max_file_size, progress=bar.add
            )
        finally:
            bar.close()
            store.close()
    finally:
        catalog.close()
    files = sum(1 for item in items if not item.is_dir)
    return _report(failures, files - len(failures), "upload", args.pool_id)


def _cmd_download(args: argparse.Namespace) -> int:
    catalog = _open_catalog(args)
    try:
        catalog.get(args.pool_id)
        store = catalog.pool_store(args.pool_id)
        try:
            items = plan_download(store, args.local_dir, args.max_file_size, _notice)
            os.makedirs(args.local_dir, exist_ok=True)
            total = sum(item.size for item in items)
            bar = _Bar(total, "download", _show_progress(args))
            try:
                failures = download(store, items, jobs=args.jobs, progress=bar.add)
            finally:
                bar.close()
        finally:
            store.close()
    finally:
        catalog.close()
    files = sum(1 for item in items if not item.is_dir)
    return _report(failures, files - len(failures), "download", args.pool_id)


def _jobs(value: str) -> int:
    jobs = int(value)
    if not 1 <= jobs <= 64:
        raise argparse.ArgumentTypeError("--jobs must be between 1 and 64")
    return jobs


def _store_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--store",
        metavar="URL",
        help=f"store root holding the pools and the catalog (default: ${STORE_ENV}, "
        f"else {DEFAULT_STORE})",
    )
    parser.add_argument("--endpoint-url", metavar="URL", help="S3 endpoint (default: boto3 chain)")


def _transfer_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pool_id", metavar="ID", type=_pool_id)
    parser.add_argument("local_dir", metavar="LOCAL_DIR")
    parser.add_argument("--jobs", type=_jobs, default=8, metavar="N", help="files at a time (8)")
    parser.add_argument(
        "--max-file-size",
        type=int,
        default=DEFAULT_MAX_FILE_SIZE,
        metavar="BYTES",
        help="refuse files larger than this (default 500 MiB, the mount limit)",
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a progress bar on stderr (default: when stderr is a terminal)",
    )
    _store_args(parser)


def register(subparsers: Any) -> None:
    """Add `pool` (create, share, list, upload, download) to the `poolfs` command line."""
    pool = subparsers.add_parser(
        "pool",
        help="manage data pools: catalog records and bulk transfers",
        description="Pools live at <store>/<id>/ and their catalog at "
        "<store>/.poolfs/catalog/, so every node sharing the store sees the same pools.",
    )
    sub = pool.add_subparsers(dest="pool_command", required=True, metavar="COMMAND")

    create = sub.add_parser("create", help="create an empty pool; prints its id")
    create.add_argument("--name", required=True)
    create.add_argument("--owner", required=True, metavar="TENANT", help="the owning tenant")
    _store_args(create)
    create.set_defaults(func=_guarded(_cmd_create))

    share = sub.add_parser("share", help="give a tenant a role on a pool (or revoke it)")
    share.add_argument("pool_id", metavar="ID", type=_pool_id)
    share.add_argument("--tenant", required=True)
    which = share.add_mutually_exclusive_group(required=True)
    which.add_argument("--role", type=_role, help="VIEWER, MAINTAINER or OWNER")
    which.add_argument("--revoke", action="store_true", help="take the tenant's role away")
    _store_args(share)
    share.set_defaults(func=_guarded(_cmd_share))

    listing = sub.add_parser("list", help="list the pools of the store")
    listing.add_argument("--json", action="store_true", help="print JSON")
    _store_args(listing)
    listing.set_defaults(func=_guarded(_cmd_list))

    up = sub.add_parser("upload", help="copy a local directory's files into a pool")
    _transfer_args(up)
    up.set_defaults(func=_guarded(_cmd_upload))

    down = sub.add_parser("download", help="copy a pool's files into a local directory")
    _transfer_args(down)
    down.set_defaults(func=_guarded(_cmd_download))
