"""`poolfs` command line. Each command group lives in its own module with a `register`
function; this module only wires them together and turns known errors into one-line messages.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Modules providing `register(subparsers) -> None`.
_COMMAND_MODULES = ("poolfs.cli_mount", "poolfs.cli_platform", "poolfs.cli_pool")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="poolfs", description="Mount blob-backed data pools as POSIX directories."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 1
    return result


if __name__ == "__main__":
    sys.exit(main())
