"""mountd settings: a TOML file (`mountd serve --config FILE`) plus `MOUNTD_*` environment
variables, which win over the file. Built once by the CLI; everything else takes the frozen
object.

The grant secret itself is never a setting: only where to read it (`grant_secret_file`, or the
systemd credential named `grant_secret_credential` in `$CREDENTIALS_DIRECTORY`). So it can never
be on a command line, in the environment or in a settings dump.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from poolfs.fs.config import DEFAULT_MAX_FILE_SIZE
from poolfs.grants import GrantSecret
from poolfs.stores import parse_store_url

__all__ = [
    "DEFAULT_CONFIG_FILE",
    "ENV_PREFIX",
    "MountdSettings",
    "SettingsError",
    "load_grant_secret",
    "load_settings",
    "parse_tcp_listen",
]

ENV_PREFIX = "MOUNTD_"
DEFAULT_CONFIG_FILE = "/etc/poolfs/mountd.toml"


class SettingsError(ValueError):
    """The settings cannot be used; the message says which one and why."""


class MountdSettings(BaseSettings):
    """Every knob of mountd; see systemd/mountd.toml.example for the documented file."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid")

    # --- where it listens -----------------------------------------------------------------
    # The HTTP API's Unix socket (mode 0660). Whoever can connect is a trusted caller.
    socket_path: Path = Path("/run/poolfs-mountd/mountd.sock")
    # Group given to the socket, so that a platform agent in that group may connect.
    socket_group: str | None = None
    # Optional TCP listener "HOST:PORT"; every request on it needs a bearer token.
    tcp_listen: str | None = None
    # Bearer tokens for TCP: lines "TENANT sha256:HEX" ("*" as TENANT: a trusted caller).
    tcp_tokens_file: Path | None = None

    # --- pools --------------------------------------------------------------------------------
    # The store ROOT: pools at <store_url>/<pool id>/, the catalog at .poolfs/catalog/.
    store_url: str = "file:///var/lib/poolfs/pools"
    s3_endpoint_url: str | None = None
    # Bound on one store operation, retries included (seconds), in mountd and its workers.
    store_timeout: float = Field(default=30.0, gt=0)

    # --- grants -------------------------------------------------------------------------------
    grant_secret_file: Path | None = None
    grant_secret_credential: str = "grant-secret"

    # --- mounts -------------------------------------------------------------------------------
    # Executions are mounted at <mount_root>/<execution id>/<param>.
    mount_root: Path = Path("/run/datapools")
    max_file_size: int = Field(default=DEFAULT_MAX_FILE_SIZE, ge=0)
    spill_dir: Path = Path("/var/lib/poolfs/spill")
    metadata_ttl: float = Field(default=1.0, ge=0)
    # Mounts older than this are flushed and unmounted (seconds; default one day).
    max_mount_lifetime: float = Field(default=86400.0, gt=0)
    # Owner shown for every file of every mount (the services' user).
    mount_uid: int = Field(default_factory=os.getuid, ge=0)
    mount_gid: int = Field(default_factory=os.getgid, ge=0)
    # Let users other than mountd's own (the services) use the mounts.
    allow_other: bool = True
    # How long a worker may take to report its mount ready (seconds).
    worker_ready_timeout: float = Field(default=90.0, gt=0)
    # How long one unmount may take to flush pending uploads before it is forced (seconds).
    # Keep it below the unit's TimeoutStopSec so mountd finishes its own cleanup first.
    unmount_timeout: float = Field(default=600.0, gt=0)
    # Finished executions kept for GET /executions (most recent first).
    keep_finished: int = Field(default=1000, ge=0)

    log_level: str = "INFO"

    @field_validator("store_url")
    @classmethod
    def _valid_store(cls, value: str) -> str:
        parse_store_url(value)
        return value.rstrip("/")

    @field_validator("socket_path", "mount_root", "spill_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        if not value.is_absolute():
            raise ValueError(f"must be an absolute path, got {str(value)!r}")
        return value

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        level = value.upper()
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError("must be DEBUG, INFO, WARNING or ERROR")
        return level

    @field_validator("tcp_listen")
    @classmethod
    def _listen(cls, value: str | None) -> str | None:
        if value is not None:
            parse_tcp_listen(value)
        return value

    @model_validator(mode="after")
    def _tokens_for_tcp(self) -> MountdSettings:
        if self.tcp_listen is not None and self.tcp_tokens_file is None:
            raise ValueError("tcp_listen needs tcp_tokens_file: TCP callers must authenticate")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file's values arrive as init arguments (load_settings); the environment is
        # listed first so that it wins, which is what an operator overriding one value expects.
        return (env_settings, init_settings)


def parse_tcp_listen(value: str) -> tuple[str, int]:
    """ "HOST:PORT" (IPv6 hosts in brackets) -> (host, port); ValueError otherwise."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"tcp_listen must be HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port_text)


def load_settings(config_file: str | os.PathLike[str] | None) -> MountdSettings:
    """Settings from `config_file` (TOML; None: no file) and the environment.

    SettingsError names the file and the setting that is wrong.
    """
    values: dict[str, Any] = {}
    where = "the environment"
    if config_file is not None:
        where = f"{os.fspath(config_file)} or the environment"
        try:
            with open(config_file, "rb") as file:
                values = tomllib.load(file)
        except FileNotFoundError:
            raise SettingsError(f"settings file {os.fspath(config_file)} not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"settings file {os.fspath(config_file)}: {exc}") from None
    try:
        return MountdSettings(**values)
    except ValueError as exc:
        raise SettingsError(f"invalid settings in {where}:\n{exc}") from None


def load_grant_secret(settings: MountdSettings, environ: Mapping[str, str]) -> GrantSecret:
    """The grant secret from `grant_secret_file`, else from the systemd credential
    (`$CREDENTIALS_DIRECTORY/<grant_secret_credential>`, set by LoadCredential=).

    SettingsError if neither is there; the message never contains the secret.
    """
    path: Path | None = settings.grant_secret_file
    if path is None:
        credentials = environ.get("CREDENTIALS_DIRECTORY")
        if not credentials:
            raise SettingsError(
                "no grant secret: set grant_secret_file, or run under systemd with "
                f"LoadCredential={settings.grant_secret_credential}:/PATH/TO/SECRET"
            )
        path = Path(credentials) / settings.grant_secret_credential
    try:
        return GrantSecret.from_file(path)
    except OSError as exc:
        raise SettingsError(f"cannot read the grant secret {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise SettingsError(str(exc)) from None
