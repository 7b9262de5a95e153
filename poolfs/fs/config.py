"""Frozen configuration of one mounted filesystem. Built by the CLI (or mountd); the core
reads no environment and no command line."""

from __future__ import annotations

import os

from pydantic import BaseModel, ConfigDict, Field

MiB = 1024 * 1024
DEFAULT_MAX_FILE_SIZE = 500 * MiB


class FSConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    read_only: bool = False
    # The per-file size limit (bytes): writes or truncates past it fail with EFBIG.
    max_file_size: int = Field(default=DEFAULT_MAX_FILE_SIZE, ge=0)
    # Local directory for staged writes; `<spill_dir>/lost+found/` keeps failed uploads.
    spill_dir: str = "/var/tmp/poolfs"
    # Seconds cached attributes and listings stay valid before revalidation.
    metadata_ttl: float = Field(default=1.0, ge=0)
    uid: int = Field(default_factory=os.getuid, ge=0)
    gid: int = Field(default_factory=os.getgid, ge=0)
    # Directories with more entries than this are not renamed in place (EXDEV: mv copies).
    dir_rename_limit: int = Field(default=1000, ge=0)
    # First GET at open: revalidates the object and usually returns a small file whole.
    first_block: int = Field(default=256 * 1024, ge=4096)
    # Random reads fetch what is asked, at least this much.
    min_block: int = Field(default=128 * 1024, ge=4096)
    # Sequential read-ahead: parallel parts of this size, window growing up to the maximum.
    # A handle holds at most the window plus the part being read; each 8 MiB of window is
    # 8 MiB of RSS while reading (bench/README.md: 24 MiB reads as fast as 32 MiB from a
    # server on the same machine with ~9 MiB less RSS; 16 MiB loses ~25 %). A store far
    # away (high latency per GET) may want a larger window.
    part_size: int = Field(default=8 * MiB, ge=64 * 1024)
    max_window: int = Field(default=24 * MiB, ge=64 * 1024)
    # All read-ahead buffers of the mount together stay below this.
    readahead_budget: int = Field(default=64 * MiB, ge=MiB)
    io_threads: int = Field(default=16, ge=1, le=256)
    # Sequential writes: completed parts (part_size, at least the store's minimum part) are
    # uploaded while the file is still written, at most this many at a time per file;
    # 0 uploads the whole file at close instead.
    upload_parts_in_flight: int = Field(default=4, ge=0, le=64)
