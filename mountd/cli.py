"""`mountd`: the node mount daemon's command line.

    mountd serve   [--config FILE]   run the daemon (systemd: Type=notify)
    mountd cleanup [--config FILE]   clean stale mounts when no mountd runs (ExecStopPost=)
    mountd check   [--config FILE]   validate settings and the grant secret; print settings
    mountd token   --tenant T        a fresh TCP bearer token and its tokens-file line
    mountd openapi                   print the HTTP API's OpenAPI document

The settings file defaults to $MOUNTD_CONFIG, else /etc/poolfs/mountd.toml when it exists.
This is the only place mountd reads the environment and the command line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import sys
from collections.abc import Mapping, Sequence

from mountd.settings import (
    DEFAULT_CONFIG_FILE,
    MountdSettings,
    SettingsError,
    load_grant_secret,
    load_settings,
)

__all__ = ["main"]

log = logging.getLogger("mountd")

CONFIG_ENV = "MOUNTD_CONFIG"


def _config_file(args: argparse.Namespace, environ: Mapping[str, str]) -> str | None:
    if args.config:
        return str(args.config)
    if environ.get(CONFIG_ENV):
        return environ[CONFIG_ENV]
    return DEFAULT_CONFIG_FILE if os.path.exists(DEFAULT_CONFIG_FILE) else None


def _setup_logging(level: str, environ: Mapping[str, str]) -> None:
    handler = logging.StreamHandler(sys.stderr)
    # journald stamps every line itself; elsewhere a timestamp helps.
    stamp = "" if environ.get("JOURNAL_STREAM") else "%(asctime)s "
    handler.setFormatter(logging.Formatter(stamp + "%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("botocore", "boto3", "s3transfer", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _settings(args: argparse.Namespace, environ: Mapping[str, str]) -> MountdSettings:
    # MountdSettings reads MOUNTD_* from os.environ itself (pydantic-settings).
    return load_settings(_config_file(args, environ))


def _cmd_serve(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    from mountd.server import serve

    settings = _settings(args, environ)
    _setup_logging(settings.log_level, environ)
    secret = load_grant_secret(settings, environ)
    return serve(settings, secret, environ)


def _cmd_cleanup(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    from mountd.server import socket_in_use
    from mountd.workers import clean_stale

    settings = _settings(args, environ)
    _setup_logging(settings.log_level, environ)
    if socket_in_use(str(settings.socket_path)):
        print(
            f"mountd: a mountd is serving {settings.socket_path}; its mounts are not stale",
            file=sys.stderr,
        )
        return 1
    found = clean_stale(str(settings.mount_root), settings.unmount_timeout)
    print(f"cleaned {len(found)} stale mount(s) under {settings.mount_root}")
    return 0


def _cmd_check(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    settings = _settings(args, environ)
    load_grant_secret(settings, environ)
    print(json.dumps(settings.model_dump(mode="json"), indent=2, sort_keys=True))
    return 0


def _cmd_token(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    from mountd.api import TokenTable

    token = secrets.token_urlsafe(32)
    print(f"token: {token}")
    print(f"tokens file line: {args.tenant} sha256:{TokenTable.digest(token)}")
    return 0


def _cmd_openapi(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    from mountd.api import create_app
    from mountd.manager import MountManager
    from mountd.metrics import Metrics
    from mountd.server import manager_config
    from poolfs.catalog import Catalog
    from poolfs.grants import GrantSecret

    # The document depends on the routes and models only; nothing here is started.
    settings = MountdSettings(store_url="mem://openapi")
    metrics = Metrics()
    app = create_app(
        catalog=Catalog.open(settings.store_url),
        secret=GrantSecret.generate(),
        manager=MountManager(manager_config(settings, {}), metrics),
        metrics=metrics,
        socket_path=str(settings.socket_path),
        tokens=None,
    )
    print(json.dumps(app.openapi(), indent=2))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mountd", description="The poolfs node mount daemon.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands = {
        "serve": (_cmd_serve, "run the daemon"),
        "cleanup": (_cmd_cleanup, "clean stale mounts under the mount root (mountd not running)"),
        "check": (_cmd_check, "validate the settings and the grant secret, print the settings"),
    }
    for name, (func, text) in commands.items():
        command = sub.add_parser(name, help=text, description=text)
        command.add_argument(
            "--config",
            metavar="FILE",
            help=f"settings file (TOML; default ${CONFIG_ENV}, else {DEFAULT_CONFIG_FILE})",
        )
        command.set_defaults(func=func)
    token = sub.add_parser("token", help="make a bearer token for the TCP listener")
    token.add_argument("--tenant", required=True, help="the tenant it acts for ('*': trusted)")
    token.set_defaults(func=_cmd_token)
    openapi = sub.add_parser("openapi", help="print the OpenAPI document of the HTTP API")
    openapi.set_defaults(func=_cmd_openapi)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    environ = dict(os.environ)
    try:
        code: int = args.func(args, environ)
    except SettingsError as exc:
        print(f"mountd: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
