"""The pool catalog (poolfs.catalog) and `poolfs pool ...` against real stores: a file://
directory and S3 on moto. No kernel needed."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from poolfs.catalog import (
    CATALOG_PREFIX,
    Catalog,
    CatalogError,
    PoolNotFound,
    Role,
    parse_role,
    role_at_least,
)
from poolfs.cli import main as poolfs_main
from poolfs.fs.config import DEFAULT_MAX_FILE_SIZE
from poolfs.stores import StoreOptions
from tests.fixtures_servers import S3Bucket

pytestmark = pytest.mark.core


@pytest.fixture(params=["file", "s3"])
def store_root(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, list[str]]]:
    """(store root URL, extra CLI args) for an empty store."""
    if request.param == "file":
        root = tmp_path / "store"
        root.mkdir()
        yield f"file://{root}", []
        return
    bucket: S3Bucket = request.getfixturevalue("moto_bucket")
    yield bucket.store_url, ["--endpoint-url", bucket.endpoint_url]


def open_catalog(root: tuple[str, list[str]]) -> Catalog:
    url, args = root
    endpoint = args[1] if args else None
    return Catalog.open(url, StoreOptions(endpoint_url=endpoint))


def cli(
    capsys: pytest.CaptureFixture[str], root: tuple[str, list[str]], *args: str
) -> tuple[int, str, str]:
    code = poolfs_main(["pool", *args, "--store", root[0], *root[1]])
    out, err = capsys.readouterr()
    return code, out, err


def test_roles_are_ordered() -> None:
    assert role_at_least(Role.OWNER, Role.MAINTAINER)
    assert role_at_least(Role.MAINTAINER, Role.MAINTAINER)
    assert not role_at_least(Role.VIEWER, Role.MAINTAINER)
    assert not role_at_least(None, Role.VIEWER)
    assert parse_role("viewer") is Role.VIEWER
    with pytest.raises(ValueError, match="must be VIEWER, MAINTAINER or OWNER"):
        parse_role("ADMIN")


def test_create_share_and_roles(store_root: tuple[str, list[str]]) -> None:
    catalog = open_catalog(store_root)
    created = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    record = catalog.create("experiment-results", "tenant-a", now=created)
    assert record.owner == "tenant-a"
    assert record.created == created
    assert catalog.role_of(record.id, "tenant-a") is Role.OWNER
    assert catalog.role_of(record.id, "tenant-b") is None
    catalog.share(record.id, "tenant-b", Role.VIEWER)
    catalog.share(record.id, "tenant-c", Role.MAINTAINER)
    assert catalog.role_of(record.id, "tenant-b") is Role.VIEWER
    assert catalog.role_of(record.id, "tenant-c") is Role.MAINTAINER
    # Sharing again replaces the role; None revokes it.
    updated = catalog.share(record.id, "tenant-b", Role.MAINTAINER)
    assert updated.members == {"tenant-b": Role.MAINTAINER, "tenant-c": Role.MAINTAINER}
    catalog.share(record.id, "tenant-c", None)
    got = catalog.get(record.id)
    assert got.members == {"tenant-b": Role.MAINTAINER}
    assert got.role_of("tenant-a") is Role.OWNER
    assert got.name == "experiment-results"


def test_catalog_lives_in_the_store_beside_the_pools(store_root: tuple[str, list[str]]) -> None:
    catalog = open_catalog(store_root)
    record = catalog.create("p", "tenant-a")
    catalog.share(record.id, "tenant-b", Role.VIEWER)
    keys = [o.key for page in catalog.store.list_pages("", None) for o in page.objects]
    assert f"{record.id}/" in keys  # the pool root: mountable right away
    assert f"{CATALOG_PREFIX}{record.id}/pool.json" in keys
    assert f"{CATALOG_PREFIX}{record.id}/members/tenant-b" in keys
    raw, _ = catalog.store.get_range(f"{CATALOG_PREFIX}{record.id}/pool.json", 0, None)
    assert json.loads(raw)["owner"] == "tenant-a"
    assert catalog.pool_url(record.id) == f"{store_root[0].rstrip('/')}/{record.id}"
    # Another node (another Catalog over the same store) sees the same pool.
    assert open_catalog(store_root).get(record.id) == catalog.get(record.id)


def test_membership_objects_do_not_overwrite_each_other(
    store_root: tuple[str, list[str]],
) -> None:
    """Two nodes sharing one pool with different tenants: both changes stay."""
    node1, node2 = open_catalog(store_root), open_catalog(store_root)
    record = node1.create("p", "tenant-a")
    node1.share(record.id, "tenant-b", Role.VIEWER)
    node2.share(record.id, "tenant-c", Role.VIEWER)
    assert node1.get(record.id).members == {"tenant-b": Role.VIEWER, "tenant-c": Role.VIEWER}


def test_refusals(store_root: tuple[str, list[str]]) -> None:
    catalog = open_catalog(store_root)
    record = catalog.create("p", "tenant-a")
    missing = uuid.uuid4()
    with pytest.raises(PoolNotFound, match=str(missing)):
        catalog.get(missing)
    with pytest.raises(PoolNotFound):
        catalog.role_of(missing, "tenant-a")
    with pytest.raises(PoolNotFound):
        catalog.share(missing, "tenant-b", Role.VIEWER)
    with pytest.raises(CatalogError, match="owner's role is always OWNER"):
        catalog.share(record.id, "tenant-a", Role.VIEWER)
    for bad in ("", "../x", "a/b", ".hidden", "x" * 129, "sp ace"):
        with pytest.raises(CatalogError, match="invalid tenant id"):
            catalog.share(record.id, bad, Role.VIEWER)
        with pytest.raises(CatalogError, match="invalid tenant id"):
            catalog.create("p", bad)
        # An unusable tenant name simply has no role; it never reaches a key.
        assert catalog.role_of(record.id, bad) is None
    with pytest.raises(CatalogError, match="invalid pool name"):
        catalog.create("", "tenant-a")
    with pytest.raises(CatalogError, match="already exists"):
        catalog.create("again", "tenant-a", pool_id=record.id)


def test_list_skips_half_created_pools(store_root: tuple[str, list[str]]) -> None:
    catalog = open_catalog(store_root)
    first = catalog.create("first", "tenant-a", now=datetime(2026, 1, 1, tzinfo=UTC))
    second = catalog.create("second", "tenant-b", now=datetime(2026, 1, 2, tzinfo=UTC))
    # A crash between the pool root and pool.json, and junk under the catalog prefix.
    catalog.store.put_bytes(f"{CATALOG_PREFIX}{uuid.uuid4()}/members/x", b"{}", {})
    catalog.store.put_bytes(f"{CATALOG_PREFIX}not-a-uuid/pool.json", b"{}", {})
    assert [r.id for r in catalog.list()] == [first.id, second.id]


def test_cli_create_share_list(
    store_root: tuple[str, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = cli(capsys, store_root, "create", "--name", "results", "--owner", "t-a")
    assert code == 0, err
    pool_id = uuid.UUID(out.strip())
    code, out, _ = cli(
        capsys, store_root, "share", str(pool_id), "--tenant", "t-b", "--role", "VIEWER"
    )
    assert code == 0
    assert out.split() == [str(pool_id), "t-b", "VIEWER"]
    code, out, _ = cli(capsys, store_root, "list")
    assert code == 0
    header, row = out.splitlines()
    assert header.split() == ["ID", "NAME", "OWNER", "CREATED", "MEMBERS"]
    assert row.split()[0] == str(pool_id)
    assert row.split()[-1] == "t-b:VIEWER"
    code, out, _ = cli(capsys, store_root, "list", "--json")
    assert json.loads(out)[0]["members"] == {"t-b": "VIEWER"}
    code, out, _ = cli(capsys, store_root, "share", str(pool_id), "--tenant", "t-b", "--revoke")
    assert code == 0
    assert out.split()[-1] == "NONE"
    code, _, err = cli(
        capsys, store_root, "share", str(uuid.uuid4()), "--tenant", "x", "--role", "VIEWER"
    )
    assert code == 1
    assert "not found" in err
    code, _, err = cli(capsys, store_root, "create", "--name", "n", "--owner", "bad/tenant")
    assert code == 2
    assert "invalid tenant id" in err


def make_tree(root: Path) -> dict[str, bytes]:
    files = {
        "hello.txt": b"Hello",
        "sub/data.bin": os.urandom(3 * 1024 * 1024 + 17),
        "sub/deeper/x y.txt": b"spaces",
        "unicod\u00e9.txt": b"u",
    }
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (root / "empty-dir").mkdir()
    (root / "link").symlink_to("hello.txt")
    os.chmod(root / "hello.txt", 0o640)
    os.utime(root / "hello.txt", ns=(1_600_000_000_123_456_789, 1_600_000_000_987_654_321))
    return files


def test_cli_upload_and_download_round_trip(
    store_root: tuple[str, list[str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "src"
    files = make_tree(source)
    _, out, _ = cli(capsys, store_root, "create", "--name", "n", "--owner", "t-a")
    pool_id = out.strip()
    code, _, err = cli(
        capsys, store_root, "upload", pool_id, str(source), "--jobs", "4", "--progress"
    )
    assert code == 0, err
    assert "skipping" in err and "symlink" in err
    assert "upload: 100%" in err  # the progress bar
    assert f"uploaded {len(files)} file(s)" in err
    store = open_catalog(store_root).pool_store(pool_id)
    keys = {o.key for page in store.list_pages("", None) for o in page.objects}
    assert set(files) | {"empty-dir/"} <= keys
    assert "link" not in keys
    meta = store.head("hello.txt").metadata
    assert meta is not None and meta["poolfs-mode"] == "640"

    target = tmp_path / "dst"
    code, _, err = cli(capsys, store_root, "download", pool_id, str(target), "--no-progress")
    assert code == 0, err
    assert "download:" not in err
    for name, data in files.items():
        assert (target / name).read_bytes() == data
    assert (target / "empty-dir").is_dir()
    st = os.stat(target / "hello.txt")
    assert st.st_mode & 0o777 == 0o640
    assert st.st_mtime_ns == 1_600_000_000_987_654_321
    assert not [p for p in target.rglob("*.poolfs-part")]


def test_upload_refuses_files_over_the_500_mib_limit(
    store_root: tuple[str, list[str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "small.txt").write_bytes(b"small")
    with open(source / "huge.bin", "wb") as f:  # sparse: costs no disk
        f.truncate(DEFAULT_MAX_FILE_SIZE + 1)
    with open(source / "exactly.bin", "wb") as f:
        f.truncate(DEFAULT_MAX_FILE_SIZE)
    _, out, _ = cli(capsys, store_root, "create", "--name", "n", "--owner", "t-a")
    pool_id = out.strip()
    code, _, err = cli(capsys, store_root, "upload", pool_id, str(source))
    assert code == 2
    assert "larger than the 524288000 byte limit" in err
    assert "huge.bin: 524288001 bytes" in err
    assert "exactly.bin" not in err
    assert "nothing was uploaded" in err
    store = open_catalog(store_root).pool_store(pool_id)
    assert [o.key for p in store.list_pages("", None) for o in p.objects] == [""]


def test_download_refuses_objects_over_the_limit(
    store_root: tuple[str, list[str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, out, _ = cli(capsys, store_root, "create", "--name", "n", "--owner", "t-a")
    pool_id = out.strip()
    store = open_catalog(store_root).pool_store(pool_id)
    store.put_bytes("big.bin", b"x" * 2000, {})
    store.put_bytes("ok.txt", b"ok", {})
    target = tmp_path / "dst"
    code, _, err = cli(
        capsys, store_root, "download", pool_id, str(target), "--max-file-size", "1000"
    )
    assert code == 2
    assert "big.bin: 2000 bytes" in err
    assert "nothing was downloaded" in err
    assert not target.exists()


def test_transfers_to_unknown_pools_fail_clearly(
    store_root: tuple[str, list[str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = str(uuid.uuid4())
    code, _, err = cli(capsys, store_root, "upload", missing, str(tmp_path))
    assert code == 1
    assert f"data pool {missing} not found" in err
    code, _, err = cli(capsys, store_root, "download", missing, str(tmp_path / "d"))
    assert code == 1
    with pytest.raises(SystemExit) as exit_info:  # argparse: a usage error
        cli(capsys, store_root, "upload", "not-a-uuid", str(tmp_path))
    assert exit_info.value.code == 2
    assert "is not a pool id" in capsys.readouterr().err


def test_download_skips_keys_that_cannot_be_paths(tmp_path: Path) -> None:
    from poolfs.cli_pool import plan_download
    from poolfs.stores.mem import MemStore

    store = MemStore("plan")
    for key in ("a", "a/inner.txt", "ok.txt", "bad//double", "x" * 300):
        store.put_bytes(key, b"1", {})
    notices: list[str] = []
    items = plan_download(store, str(tmp_path), 100, notices.append)
    assert sorted(item.key for item in items) == ["a/inner.txt", "ok.txt"]
    assert any("shadows" in n for n in notices)
    assert sum("cannot be a path" in n for n in notices) == 2
