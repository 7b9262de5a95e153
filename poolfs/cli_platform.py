"""`poolfs openapi` and `poolfs run-local`: the service author's commands.

The CLI is where the environment is touched: it puts the user's code on sys.path, changes to
the user code directory and sets `OUTPUT_DIRECTORY_ENV`; the library functions it calls
(`poolfs.refs.openapi_document`, `poolfs.runtime.run_local`) read no environment.

Exit codes: 0 success; 1 the service's run() raised (its traceback is printed); 2 the command
could not start (bad FUNCTION spec, import error, unusable run() signature, missing inputs,
invalid data), with the reason on stderr.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

import yaml

from poolfs.refs import RunSignatureError, inspect_run, openapi_document
from poolfs.runtime import OUTPUT_DIRECTORY_ENV, LocalRunError, ResultNotSerializable, run_local

__all__ = ["DEFAULT_FUNCTION", "load_function", "register"]

# The guide's layout: user_code/src/program.py defines run(), imported as the package `src`.
DEFAULT_FUNCTION = "src.program:run"
OUTPUT_DIR_NAME = "out"
INPUT_DIR_NAME = "input"

_RUN_LOCAL_HELP = f"""\
Run a service locally the way the platform would, with local directories as data pools.

PATH_TO_USER_CODE is the project directory of the guide's layout:

  user_code/
    src/__init__.py (optional), src/program.py   defines run(data, my_dataset: DataPool, ...)
    input/data.json                                the `data` argument, as JSON
    input/<param_name>/                            one directory per DataPool parameter

run() is imported as {DEFAULT_FUNCTION} (the package `src`, so relative imports inside src/
work) with PATH_TO_USER_CODE first on sys.path; --function picks another MODULE:FUNCTION.
The command changes into PATH_TO_USER_CODE, creates ./{OUTPUT_DIR_NAME} there and sets
{OUTPUT_DIRECTORY_ENV} to its absolute path, runs, and prints the JSON result on stdout.
Every DataPool parameter needs its directory, output pools included (create them empty).
"""


class _CliError(Exception):
    """A one-line reason for exit code 2."""


def load_function(spec: str, search_path: str) -> Callable[..., Any]:
    """Import `MODULE:FUNCTION` with `search_path` first on sys.path."""
    module_name, sep, function_name = spec.partition(":")
    if not sep or not module_name or not function_name:
        raise _CliError(f"{spec!r}: expected MODULE:FUNCTION, e.g. {DEFAULT_FUNCTION}")
    if search_path not in sys.path:
        sys.path.insert(0, search_path)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise _CliError(f"cannot import {module_name!r} from {search_path}: {exc}") from exc
    except Exception as exc:
        # The user's module itself failed (syntax error, exception at import): show where.
        detail = "".join(traceback.format_exception(exc)).rstrip()
        raise _CliError(f"importing {module_name!r} failed:\n{detail}") from exc
    obj: object = module
    for part in function_name.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise _CliError(f"{module_name!r} has no {function_name!r}") from None
    if not callable(obj):
        raise _CliError(f"{spec!r} is not callable")
    return obj


def _cmd_openapi(args: argparse.Namespace) -> int:
    code_dir = os.path.abspath(args.code_dir)
    try:
        run = load_function(args.function, code_dir)
        title = args.title or args.function
        document = openapi_document(inspect_run(run), title=title, version=args.version)
    except (_CliError, RunSignatureError) as exc:
        print(f"poolfs openapi: {exc}", file=sys.stderr)
        return 2
    if args.yaml:
        sys.stdout.write(yaml.safe_dump(document, sort_keys=False, allow_unicode=True))
    else:
        sys.stdout.write(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    return 0


def _cmd_run_local(args: argparse.Namespace) -> int:
    user_code = os.path.abspath(args.user_code)
    if not os.path.isdir(user_code):
        print(f"poolfs run-local: {user_code} is not a directory", file=sys.stderr)
        return 2
    try:
        run = load_function(args.function, user_code)
        inspect_run(run)
    except (_CliError, RunSignatureError) as exc:
        print(f"poolfs run-local: {exc}", file=sys.stderr)
        return 2
    os.chdir(user_code)
    output_dir = os.path.join(user_code, OUTPUT_DIR_NAME)
    os.makedirs(output_dir, exist_ok=True)
    os.environ[OUTPUT_DIRECTORY_ENV] = output_dir
    try:
        result = run_local(run, os.path.join(user_code, INPUT_DIR_NAME))
    except LocalRunError as exc:
        print(f"poolfs run-local: {exc}", file=sys.stderr)
        return 2
    except ResultNotSerializable as exc:
        print(f"poolfs run-local: {exc}", file=sys.stderr)
        return 1
    except Exception:
        print("poolfs run-local: run() raised:", file=sys.stderr)
        traceback.print_exc()
        return 1
    sys.stdout.write(result + "\n")
    return 0


def register(subparsers: Any) -> None:
    """Add `openapi` and `run-local` to the `poolfs` command line."""
    openapi = subparsers.add_parser(
        "openapi",
        help="print the OpenAPI document of a service's execution request",
        description="Print an OpenAPI 3.1 document whose request body is what the platform "
        "accepts for run(): `data` from its model, one DataPool reference per DataPool "
        "parameter.",
    )
    openapi.add_argument("function", metavar="MODULE:FUNCTION", help="e.g. src.program:run")
    openapi.add_argument("--yaml", action="store_true", help="print YAML instead of JSON")
    openapi.add_argument(
        "--code-dir",
        default=".",
        metavar="DIR",
        help="directory put first on sys.path to import MODULE (default: the current one)",
    )
    openapi.add_argument("--title", default=None, help="info.title (default: MODULE:FUNCTION)")
    openapi.add_argument("--version", default="0.1.0", help="info.version (default: 0.1.0)")
    openapi.set_defaults(func=_cmd_openapi)

    run_local_parser = subparsers.add_parser(
        "run-local",
        help="run a service locally with input/ directories as data pools",
        description=_RUN_LOCAL_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run_local_parser.add_argument("user_code", metavar="PATH_TO_USER_CODE")
    run_local_parser.add_argument(
        "--function",
        default=DEFAULT_FUNCTION,
        metavar="MODULE:FUNCTION",
        help=f"the run function (default: {DEFAULT_FUNCTION})",
    )
    run_local_parser.set_defaults(func=_cmd_run_local)
