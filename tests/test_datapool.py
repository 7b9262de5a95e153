"""DataPool on plain directories: what a service sees of a mounted pool."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from poolfs.datapool import DataPool, DataPoolPathError

pytestmark = pytest.mark.core


@pytest.fixture
def pool_dir(tmp_path: Path) -> Path:
    root = tmp_path / "input" / "my_dataset"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "empty_dir").mkdir()
    (root / "hello.txt").write_text("Hello")
    (root / "sub" / "a.bin").write_bytes(b"\x00\x01\x02")
    (root / "sub" / "deeper" / "b.txt").write_text("b")
    (root / "with space ü.txt").write_text("unicode")
    return root


def test_relative_path_works_as_in_the_guide(
    pool_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(pool_dir.parent.parent)
    pool = DataPool("./input/my_dataset")
    assert pool.path == str(pool_dir)
    assert os.path.isabs(pool.path)
    assert pool.name == "my_dataset"
    with pool.open("hello.txt") as f:
        assert f.read() == "Hello"


def test_path_stays_absolute_after_chdir(
    pool_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(pool_dir.parent)
    pool = DataPool("my_dataset")
    monkeypatch.chdir(tmp_path)
    assert pool.list_files()["hello.txt"] == str(pool_dir / "hello.txt")


def test_name_is_the_parameter_name_when_given(pool_dir: Path) -> None:
    pool = DataPool(pool_dir, name="another_dataset")
    assert pool.name == "another_dataset"
    assert pool.path == str(pool_dir)
    assert "another_dataset" in repr(pool)
    assert os.fspath(pool) == pool.path
    assert pool == DataPool(str(pool_dir), name="another_dataset")
    assert pool != DataPool(pool_dir)


def test_list_files_lists_every_regular_file_with_posix_keys(pool_dir: Path) -> None:
    files = DataPool(pool_dir).list_files()
    assert files == {
        "hello.txt": str(pool_dir / "hello.txt"),
        "sub/a.bin": str(pool_dir / "sub" / "a.bin"),
        "sub/deeper/b.txt": str(pool_dir / "sub" / "deeper" / "b.txt"),
        "with space ü.txt": str(pool_dir / "with space ü.txt"),
    }
    assert list(files) == sorted(files)
    assert all(os.path.isabs(path) for path in files.values())


def test_list_files_of_an_empty_pool(tmp_path: Path) -> None:
    assert DataPool(tmp_path).list_files() == {}


def test_list_files_neither_lists_nor_follows_symlinks(pool_dir: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    (pool_dir / "link_out").symlink_to(outside)
    (pool_dir / "file_link_out").symlink_to(outside / "secret.txt")
    (pool_dir / "file_link_in").symlink_to(pool_dir / "hello.txt")
    files = DataPool(pool_dir).list_files()
    assert set(files) == {"hello.txt", "sub/a.bin", "sub/deeper/b.txt", "with space ü.txt"}


def test_open_reads_text_and_binary(pool_dir: Path) -> None:
    pool = DataPool(pool_dir)
    with pool.open("sub/deeper/b.txt") as text:
        assert text.read() == "b"
    with pool.open("sub/a.bin", "rb") as binary:
        assert binary.read() == b"\x00\x01\x02"
    with pool.open("with space ü.txt", encoding="utf-8") as f:
        assert f.read() == "unicode"


def test_open_writes_files_into_the_pool(pool_dir: Path) -> None:
    pool = DataPool(pool_dir)
    with pool.open("sub/new.txt", "w") as f:
        f.write("new")
    with pool.open("sub/new.txt", "a") as f:
        f.write("er")
    assert (pool_dir / "sub" / "new.txt").read_text() == "newer"
    assert pool.list_files()["sub/new.txt"] == str(pool_dir / "sub" / "new.txt")
    with pool.open("out.bin", "wb") as b:
        b.write(b"\xff")
    assert (pool_dir / "out.bin").read_bytes() == b"\xff"


def test_missing_file_is_file_not_found(pool_dir: Path) -> None:
    pool = DataPool(pool_dir)
    with pytest.raises(FileNotFoundError):
        pool.open("nope.txt")
    with pytest.raises(FileNotFoundError):
        pool.open("no_dir/new.txt", "w")


def test_opening_a_directory_is_is_a_directory_error(pool_dir: Path) -> None:
    with pytest.raises(IsADirectoryError):
        DataPool(pool_dir).open("sub")


def test_dotdot_inside_the_pool_is_fine(pool_dir: Path) -> None:
    with DataPool(pool_dir).open("sub/../hello.txt") as f:
        assert f.read() == "Hello"


@pytest.mark.parametrize(
    "name",
    ["/etc/passwd", "../outside.txt", "..", "sub/../../outside.txt", "sub/deeper/../../../x"],
)
def test_escapes_are_refused(pool_dir: Path, name: str) -> None:
    (pool_dir.parent / "outside.txt").write_text("outside")
    pool = DataPool(pool_dir)
    for mode in ("r", "w"):
        with pytest.raises(DataPoolPathError, match="my_dataset") as info:
            pool.open(name, mode)
        assert isinstance(info.value, ValueError)
        assert name in str(info.value)
    assert (pool_dir.parent / "outside.txt").read_text() == "outside"


def test_symlink_pointing_outside_is_refused(pool_dir: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    (pool_dir / "link_dir").symlink_to(outside)
    (pool_dir / "link_file").symlink_to(outside / "secret.txt")
    pool = DataPool(pool_dir)
    with pytest.raises(DataPoolPathError, match="outside data pool"):
        pool.open("link_file")
    with pytest.raises(DataPoolPathError, match="outside data pool"):
        pool.open("link_dir/secret.txt")
    with pytest.raises(DataPoolPathError, match="outside data pool"):
        pool.open("link_dir/new.txt", "w")
    assert not (outside / "new.txt").exists()


def test_symlink_staying_inside_is_followed(pool_dir: Path) -> None:
    (pool_dir / "alias.txt").symlink_to("hello.txt")
    with DataPool(pool_dir).open("alias.txt") as f:
        assert f.read() == "Hello"


def test_pool_reached_through_a_symlink_still_works(pool_dir: Path, tmp_path: Path) -> None:
    link = tmp_path / "pool_link"
    link.symlink_to(pool_dir)
    pool = DataPool(link)
    assert pool.path == str(link)
    with pool.open("sub/deeper/b.txt") as f:
        assert f.read() == "b"


@pytest.mark.parametrize("name", ["", "a\0b"])
def test_empty_or_nul_names_are_refused(pool_dir: Path, name: str) -> None:
    with pytest.raises(DataPoolPathError):
        DataPool(pool_dir).open(name)


def test_missing_or_non_directory_pool(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DataPool(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        DataPool(tmp_path / "file")


def test_datapool_does_not_import_fuse() -> None:
    code = (
        "import sys; import poolfs.datapool; "
        "bad = [m for m in sys.modules if m in ('fuse', 'mfusepy') or m.startswith('poolfs.fs')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
