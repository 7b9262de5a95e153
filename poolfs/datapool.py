"""`DataPool`: what a service's `run()` receives for each data pool parameter.

A thin wrapper around a directory: on the platform the directory is a poolfs mount, in local
tests it is any directory (`DataPool("./input/my_dataset")`). It must stay thin and must never
import fuse: service code imports it, and services run where only the mount exists.

Invariants:
- `path` is absolute (made absolute once, at construction, against the current directory).
- `open` and `list_files` never leave the pool. `open` refuses absolute names, names whose
  `..` components climb above the pool root, and names that resolve (through symlinks) to a
  place outside the pool, with `DataPoolPathError` (a ValueError: the name is a bad argument,
  not an OS condition, so `except FileNotFoundError` in service code does not swallow it).
  A missing file inside the pool is the built-in FileNotFoundError, as the platform guide's
  example expects. The check guards against mistakes and hostile names, not against someone
  swapping a symlink into the pool between the check and the open (poolfs mounts have no
  symlinks at all).
- `list_files` lists regular files only and does not follow symlinks, so it cannot leave the
  pool either; a symlink is not a regular file and is not listed.
"""

from __future__ import annotations

import builtins
import os
import posixpath
from typing import IO, TYPE_CHECKING, Any, BinaryIO, overload

if TYPE_CHECKING:
    from io import TextIOWrapper

    from _typeshed import OpenBinaryMode, OpenTextMode

__all__ = ["DataPool", "DataPoolPathError"]


class DataPoolPathError(ValueError):
    """A file name that would leave the pool (absolute, `..` escape, symlink outside)."""


class DataPool:
    """A data pool mounted (or simulated) as a directory.

    `path`: the absolute path of the pool directory. `name`: the `run()` parameter name the
    pool is bound to; defaults to the directory's name.
    """

    __slots__ = ("_name", "_path")

    def __init__(self, path: str | os.PathLike[str], name: str | None = None) -> None:
        absolute = os.path.abspath(os.fspath(path))
        if not os.path.exists(absolute):
            raise FileNotFoundError(f"data pool directory {absolute!r} does not exist")
        if not os.path.isdir(absolute):
            raise NotADirectoryError(f"data pool path {absolute!r} is not a directory")
        self._path = absolute
        self._name = name if name is not None else os.path.basename(absolute)

    @property
    def path(self) -> str:
        """The absolute path of the pool directory."""
        return self._path

    @property
    def name(self) -> str:
        """The name of the pool: the `run()` parameter it is bound to."""
        return self._name

    def __fspath__(self) -> str:
        return self._path

    def __repr__(self) -> str:
        return f"DataPool(path={self._path!r}, name={self._name!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DataPool):
            return NotImplemented
        return (self._path, self._name) == (other._path, other._name)

    def __hash__(self) -> int:
        return hash((self._path, self._name))

    def list_files(self) -> dict[str, str]:
        """Every regular file below the pool: POSIX path relative to the pool -> absolute path.

        Sorted by relative path. Symlinks are neither listed nor followed. An unreadable
        directory raises its OSError rather than silently hiding files.
        """
        files: dict[str, str] = {}
        self._walk(self._path, "", files)
        return dict(sorted(files.items()))

    def _walk(self, directory: str, prefix: str, files: dict[str, str]) -> None:
        with os.scandir(directory) as entries:
            for entry in entries:
                relative = prefix + entry.name
                if entry.is_dir(follow_symlinks=False):
                    self._walk(entry.path, relative + "/", files)
                elif entry.is_file(follow_symlinks=False):
                    files[relative] = entry.path

    def resolve(self, file_name: str | os.PathLike[str]) -> str:
        """The absolute path of `file_name` inside the pool; DataPoolPathError if it would
        leave the pool. The file need not exist."""
        name = os.fspath(file_name)
        if not isinstance(name, str):
            raise TypeError(f"file name must be str, not {type(name).__name__}")
        if not name:
            raise DataPoolPathError(f"empty file name in data pool {self._name!r}")
        if "\0" in name:
            raise DataPoolPathError(f"file name {name!r} contains a NUL byte")
        posix = name.replace(os.sep, "/") if os.sep != "/" else name
        if posix.startswith("/") or os.path.isabs(name):
            raise DataPoolPathError(
                f"{name!r} is an absolute path; data pool {self._name!r} takes names "
                "relative to the pool"
            )
        normal = posixpath.normpath(posix)
        if normal == ".." or normal.startswith("../"):
            raise DataPoolPathError(f"{name!r} leaves data pool {self._name!r} through '..'")
        candidate = os.path.join(self._path, *normal.split("/"))
        root_real = os.path.realpath(self._path)
        real = os.path.realpath(candidate)
        if real != root_real and not real.startswith(root_real.rstrip(os.sep) + os.sep):
            raise DataPoolPathError(
                f"{name!r} resolves to {real!r}, outside data pool {self._name!r} "
                "(a symlink points out of the pool)"
            )
        return candidate

    @overload
    def open(
        self,
        file_name: str | os.PathLike[str],
        mode: OpenTextMode = "r",
        buffering: int = -1,
        encoding: str | None = None,
        errors: str | None = None,
        newline: str | None = None,
    ) -> TextIOWrapper: ...

    @overload
    def open(
        self,
        file_name: str | os.PathLike[str],
        mode: OpenBinaryMode,
        buffering: int = -1,
        encoding: None = None,
        errors: None = None,
        newline: None = None,
    ) -> BinaryIO: ...

    @overload
    def open(
        self,
        file_name: str | os.PathLike[str],
        mode: str,
        buffering: int = -1,
        encoding: str | None = None,
        errors: str | None = None,
        newline: str | None = None,
    ) -> IO[Any]: ...

    def open(
        self,
        file_name: str | os.PathLike[str],
        mode: str = "r",
        buffering: int = -1,
        encoding: str | None = None,
        errors: str | None = None,
        newline: str | None = None,
    ) -> IO[Any]:
        """Open a file of the pool like built-in `open()`; names are relative to the pool."""
        path = self.resolve(file_name)
        return builtins.open(path, mode, buffering, encoding, errors, newline)
