"""poolfs against direct boto3, s3fs-fuse and rclone mount on one SeaweedFS server (127.0.0.1).

Run from the repository root as root (see bench/README.md for what each workload measures):

    .venv/bin/python -m bench.bench_s3            # full run, medians of 3
    .venv/bin/python -m bench.bench_s3 --quick    # small sizes, one run, under 2 minutes

The script starts its own `weed mini` (tests.servers.SeaweedServer), makes a bucket, uploads
the data sets with boto3, then measures each workload `--runs` times: direct boto3 (one
client; one stream, or N threads for the parallel workloads) and each mounter on the same
bucket prefix: poolfs, s3fs-fuse and rclone mount (`--vfs-cache-mode off`), each with a fresh
mount per measurement, unmounted right after. s3fs and rclone are installed with apt-get if
missing. Page caches are dropped before every measured step. It prints one markdown table
(medians, the issue's targets as ratios, pass/fail) to stdout (progress goes to stderr) and
exits non-zero if any mount, unmount or workload failed. Missed targets do not change the exit
status: the table says which.

Whatever happens (failure, Ctrl-C, SIGTERM, SIGHUP) it unmounts everything it mounted (`poolfs
umount` or `fusermount -u`, then `fusermount -uz`), stops the mount processes it started if
they linger and stops the server: processes are only ever signalled by the PID this script
started, or, for a poolfs mount worker, a PID whose command line serves one of this run's own
mountpoints.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import importlib.metadata
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

if not __package__:  # run as a file (python bench/bench_s3.py): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import boto3
import botocore
import botocore.exceptions

from poolfs.mounts import find_mount
from tests.servers import (
    ACCESS_KEY,
    REGION,
    SECRET_KEY,
    SeaweedServer,
    s3_client,
    weed_binary,
)

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

MB = 1_000_000  # throughput is reported in MB/s (10^6 bytes per second)
MiB = 1024 * 1024
BUCKET = "poolfs-bench"
PREFIX = "pool/"
POOL_URL = f"s3://{BUCKET}/{PREFIX}"
POOLFS = [sys.executable, "-m", "poolfs"]
CLK_TCK = os.sysconf("SC_CLK_TCK")
# poolfs' default per-file limit; the mount gets a larger one if --size-mib asks for more.
POOLFS_MAX_FILE = 500 * MiB

READ, WRITE, CAT, LS1, LS2 = "read", "write", "cat", "ls1", "ls2"
RAND1, RAND8, TTFB, PAR = "rand1", "rand8", "ttfb", "par8"
RSS_READ, RSS_PAR = "rss_read", "rss_par8"
BOTO3, POOLFS_SIDE, S3FS, RCLONE = "boto3", "poolfs", "s3fs", "rclone"
MOUNTERS = (POOLFS_SIDE, S3FS, RCLONE)
SIDES = (BOTO3, *MOUNTERS)
PAR_JOBS = 8  # parallel sequential readers (and random-read jobs) of the parallel workloads
RAND_BLOCK = 4096


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- /proc helpers ---------------------------------------------------------------------------


def proc_cpu(pid: int | None) -> float:
    """User + system CPU seconds of all threads of `pid` (0 if it is gone)."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def status_kib(pid: int, field: str) -> int | None:
    """A `kB` field of /proc/PID/status (VmRSS, VmHWM), or None if the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def worker_pids(mountpoint: str) -> list[int]:
    """PIDs of `poolfs mount --foreground` workers serving exactly `mountpoint`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0")]
        except OSError:
            continue
        if "poolfs" in argv and "mount" in argv and "--foreground" in argv and mountpoint in argv:
            found.append(int(entry))
    return found


class RssSampler:
    """Samples VmRSS of one process every `interval` seconds in a thread; keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.005) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_kib = status_kib(pid, "VmRSS") or 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            value = status_kib(self.pid, "VmRSS")
            if value is not None:
                self.peak_kib = max(self.peak_kib, value)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        value = status_kib(self.pid, "VmRSS")
        if value is not None:
            self.peak_kib = max(self.peak_kib, value)


# --- results ---------------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class Timing:
    """One measured step: wall seconds and CPU seconds of the client and server side."""

    wall: float = 0.0
    client_cpu: float = 0.0  # this process + tools it ran (dd, cat, ls) + the poolfs worker
    server_cpu: float = 0.0  # weed


@dataclasses.dataclass(slots=True)
class Series:
    values: list[float] = dataclasses.field(default_factory=list)
    client_cpu: list[float] = dataclasses.field(default_factory=list)
    server_cpu: list[float] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)

    def median(self) -> float | None:
        return statistics.median(self.values) if self.values else None


@dataclasses.dataclass(frozen=True, slots=True)
class Workload:
    key: str
    label: str
    unit: str  # "MB/s", "files/s", "IOPS" (higher is better); "s", "ms", "MiB" (lower)

    @property
    def is_time(self) -> bool:
        return self.unit in ("s", "ms")

    @property
    def higher_is_better(self) -> bool:
        return self.unit in ("MB/s", "files/s", "IOPS")


@dataclasses.dataclass(slots=True)
class MountInfo:
    kind: str  # poolfs, s3fs or rclone
    path: Path
    pid: int | None = None  # the FUSE daemon serving the mount
    proc: subprocess.Popen[bytes] | None = None  # s3fs/rclone: the process we started
    ready_seconds: float = 0.0


class BenchFailure(Exception):
    """A workload, mount or unmount failed; the message says which and why."""


class Interrupted(BaseException):
    """SIGTERM or SIGHUP, raised like KeyboardInterrupt so that every finally block runs."""


# --- the benchmark ---------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.size = int(args.size_mib * MiB)
        self.file_size = int(args.file_kib * 1024)
        self.ttfb_size = int(args.ttfb_mib * MiB)
        self.par_size = int(args.parallel_mib * MiB)
        self.mounters: list[str] = list(args.mounters)
        self.sides = [BOTO3, *self.mounters]
        self.server: SeaweedServer | None = None
        self._client: S3Client | None = None
        self.mounts: list[MountInfo] = []
        self.failures: list[str] = []
        self.drop_error: str | None = None
        self.drops = 0
        self.source: Path | None = None
        self.secrets_dir: Path | None = None  # s3fs passwd file and rclone config (mode 0700)
        self.write_data_s: dict[str, list[float]] = {m: [] for m in MOUNTERS}
        self.write_close_s: dict[str, list[float]] = {m: [] for m in MOUNTERS}
        self.write_rss_mib: dict[str, list[float]] = {m: [] for m in MOUNTERS}
        self.rss_before_mib: list[float] = []  # poolfs, just before the seq read
        self.loads: list[str] = []
        n, fs_, par = args.entries, _size(self.file_size), _size(self.par_size)
        self.workloads = [
            Workload(READ, f"seq read, {_size(self.size)} object (MB/s)", "MB/s"),
            Workload(WRITE, f"seq write, {_size(self.size)} until durable (MB/s)", "MB/s"),
            Workload(CAT, f"`cat` {args.files:,} x {fs_} files (files/s)", "files/s"),
            Workload(LS1, f"`ls -l` {n:,} entries, first run (s)", "s"),
            Workload(LS2, f"`ls -l` {n:,} entries, second run (s)", "s"),
            Workload(RAND1, "random 4 KiB reads, 1 job (IOPS)", "IOPS"),
            Workload(RAND8, f"random 4 KiB reads, {PAR_JOBS} jobs (IOPS)", "IOPS"),
            Workload(TTFB, f"time to first byte, {_size(self.ttfb_size)} object (ms)", "ms"),
            Workload(PAR, f"{PAR_JOBS} parallel seq readers, {PAR_JOBS} x {par} (MB/s)", "MB/s"),
            Workload(RSS_READ, "daemon RSS peak during seq read (MiB)", "MiB"),
            Workload(RSS_PAR, f"daemon RSS peak, {PAR_JOBS} parallel readers (MiB)", "MiB"),
        ]
        if args.only:
            keep = set(args.only)
            keep |= {RSS_READ} if READ in keep else set()
            keep |= {RSS_PAR} if PAR in keep else set()
            keep |= {LS2} if LS1 in keep else set()
            self.workloads = [w for w in self.workloads if w.key in keep]
        self.results: dict[tuple[str, str], Series] = {
            (w.key, side): Series() for w in self.workloads for side in SIDES
        }
        self.env = self._tool_env()

    def wants(self, key: str) -> bool:
        return any(w.key == key for w in self.workloads)

    # --- plumbing --------------------------------------------------------------------------

    @property
    def client(self) -> S3Client:
        assert self._client is not None
        return self._client

    def _tool_env(self) -> dict[str, str]:
        """Environment for poolfs and the tools: this server's credentials, nothing else."""
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("AWS_", "RCLONE_")) and k not in ("LANG", "LANGUAGE")
        }
        env.update(
            AWS_ACCESS_KEY_ID=ACCESS_KEY,
            AWS_SECRET_ACCESS_KEY=SECRET_KEY,
            AWS_DEFAULT_REGION=REGION,
            # No profile from ~/.aws may change the client (region, s3 settings, retries).
            AWS_CONFIG_FILE=os.devnull,
            AWS_SHARED_CREDENTIALS_FILE=os.devnull,
            LC_ALL="C",
        )
        return env

    def fail(self, msg: str) -> None:
        log(f"FAILED: {msg}")
        self.failures.append(msg)

    def run_tool(
        self, argv: Sequence[str], timeout: float = 600
    ) -> subprocess.CompletedProcess[bytes]:
        proc = subprocess.run(
            list(argv), capture_output=True, env=self.env, timeout=timeout, check=False
        )
        if proc.returncode != 0:
            err = proc.stderr.decode(errors="replace").strip().splitlines()
            raise BenchFailure(
                f"{' '.join(argv[:3])} ... exited {proc.returncode}: {err[-1] if err else ''}"
            )
        return proc

    def drop_caches(self) -> None:
        """`sync; echo 3 > /proc/sys/vm/drop_caches`; a failure is noted once, not fatal."""
        os.sync()
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
            self.drops += 1
        except OSError as exc:
            if self.drop_error is None:
                self.drop_error = f"{type(exc).__name__}: {exc}"
                log(f"WARNING: could not drop page caches ({self.drop_error})")

    @contextlib.contextmanager
    def meter(self, worker_pid: int | None = None) -> Iterator[Timing]:
        """Wall time and CPU seconds of the block (client: this process, waited-for children
        and the mount daemon; server: weed)."""
        timing = Timing()
        server_pid = self.server.pid if self.server else None
        own0, kids0 = time.process_time(), children_cpu()
        worker0, server0 = proc_cpu(worker_pid), proc_cpu(server_pid)
        start = time.perf_counter()
        yield timing
        timing.wall = time.perf_counter() - start
        timing.client_cpu = (
            time.process_time() - own0 + children_cpu() - kids0 + proc_cpu(worker_pid) - worker0
        )
        timing.server_cpu = proc_cpu(server_pid) - server0

    def record(self, workload: str, side: str, step: Callable[[], tuple[float, Timing]]) -> None:
        if not self.wants(workload):
            return
        series = self.results[(workload, side)]
        try:
            value, timing = step()
        except Exception as exc:  # recorded; the other workloads still run
            series.errors.append(f"{type(exc).__name__}: {exc}")
            self.fail(f"{workload}/{side}: {exc}")
            return
        self.add(workload, side, value, timing)

    def add(self, workload: str, side: str, value: float, timing: Timing | None = None) -> None:
        series = self.results[(workload, side)]
        series.values.append(value)
        unit = next(w.unit for w in self.workloads if w.key == workload)
        msg = f"  {workload:8} {side:6} {value:10.3f} {unit:7}"
        if timing is not None:
            series.client_cpu.append(timing.client_cpu)
            series.server_cpu.append(timing.server_cpu)
            msg += (
                f" wall {timing.wall:7.3f} s, cpu client {timing.client_cpu:6.2f} s, "
                f"server {timing.server_cpu:6.2f} s"
            )
        log(msg)

    # --- tools -----------------------------------------------------------------------------

    def ensure_tools(self) -> None:
        """s3fs and rclone from apt if missing; a mounter whose tool cannot be had fails."""
        wanted = {S3FS: "s3fs", RCLONE: "rclone"}
        missing = [pkg for kind, pkg in wanted.items() if kind in self.mounters]
        missing = [pkg for pkg in missing if shutil.which(pkg) is None]
        if not missing:
            return
        log(f"installing {', '.join(missing)} (apt-get)")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        install = ["apt-get", "install", "-y", "-qq", *missing]
        proc = subprocess.run(install, capture_output=True, env=env, check=False, timeout=600)
        if proc.returncode != 0:  # a stale package list: update once and retry
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, check=False)
            proc = subprocess.run(install, capture_output=True, env=env, check=False, timeout=600)
        for kind, pkg in wanted.items():
            if kind in self.mounters and shutil.which(pkg) is None:
                err = proc.stderr.decode(errors="replace").strip().splitlines()
                self.fail(f"{kind}: cannot install {pkg}: {err[-1] if err else proc.returncode}")
                self.mounters.remove(kind)
                self.sides.remove(kind)

    def write_secrets(self) -> None:
        """The s3fs passwd file and the rclone config, in a private temp dir."""
        assert self.server is not None
        self.secrets_dir = Path(tempfile.mkdtemp(prefix="secrets-", dir=self.workdir))
        os.chmod(self.secrets_dir, 0o700)
        passwd = self.secrets_dir / "passwd-s3fs"
        passwd.write_text(f"{ACCESS_KEY}:{SECRET_KEY}\n")
        os.chmod(passwd, 0o600)
        conf = self.secrets_dir / "rclone.conf"
        conf.write_text(
            "[bench]\ntype = s3\nprovider = Other\nenv_auth = false\n"
            f"access_key_id = {ACCESS_KEY}\nsecret_access_key = {SECRET_KEY}\n"
            f"endpoint = {self.server.endpoint_url}\nregion = {REGION}\n"
            "force_path_style = true\n"
        )
        os.chmod(conf, 0o600)

    # --- server and data -------------------------------------------------------------------

    def start_server(self) -> None:
        self.server = SeaweedServer(self.workdir / "weed")
        log(f"starting SeaweedFS ({weed_binary()}) in {self.server.base_dir}")
        self.server.start()
        log(f"SeaweedFS S3 at {self.server.endpoint_url} (pid {self.server.pid})")
        self._client = s3_client(self.server.endpoint_url, timeout=300.0)
        self.client.create_bucket(Bucket=BUCKET)
        self.write_secrets()

    def _source_dir(self) -> Path:
        """Where the write source lives: /dev/shm if it has room (tmpfs survives drop_caches,
        so both sides read the source from memory), else the work dir."""
        shm = Path("/dev/shm")
        with contextlib.suppress(OSError):
            if shutil.disk_usage(shm).free > 2 * self.size + 256 * MiB:
                return Path(tempfile.mkdtemp(prefix="poolfs-bench-", dir=shm))
        return self.workdir

    def upload_data(self) -> None:
        source_dir = self._source_dir()
        self.source = source_dir / "source.bin"
        log(f"writing {_size(self.size)} of random bytes to {self.source}")
        with open(self.source, "wb") as f:
            left = self.size
            while left > 0:
                n = min(left, 16 * MiB)
                f.write(os.urandom(n))
                left -= n
        started = time.monotonic()
        with open(self.source, "rb") as f:
            self.client.put_object(Bucket=BUCKET, Key=PREFIX + "read/big.bin", Body=f)
        # The directory the mounters write into (boto3 writes next to it).
        self.client.put_object(Bucket=BUCKET, Key=PREFIX + "write/", Body=b"")
        if self.wants(CAT):
            small = os.urandom(self.file_size)
            self._put_many([self._small_key(i) for i in range(self.args.files)], small)
        if self.wants(LS1):
            self._put_many([self._entry_key(i) for i in range(self.args.entries)], b"e" * 100)
        if self.wants(TTFB):
            self._put_random(PREFIX + "ttfb/huge.bin", self.ttfb_size)
        if self.wants(PAR):
            for i in range(PAR_JOBS):
                self._put_random(self._par_key(i), self.par_size)
        log(f"uploaded the data sets in {time.monotonic() - started:.1f} s")
        # Warm the client (connections, paginator and operation models) outside the timings.
        for _ in self.client.get_paginator("list_objects_v2").paginate(
            Bucket=BUCKET, Prefix=PREFIX + "small/", Delimiter="/"
        ):
            break
        self.client.get_object(Bucket=BUCKET, Key=PREFIX + "read/big.bin", Range="bytes=0-0")[
            "Body"
        ].read()
        self.client.head_object(Bucket=BUCKET, Key=PREFIX + "read/big.bin")

    def _put_random(self, key: str, size: int) -> None:
        """A large object of random bytes, in one upload (boto3's managed multipart)."""
        log(f"putting {key} ({_size(size)})")
        block = os.urandom(min(size, 8 * MiB))
        path = self.workdir / "upload.tmp"
        with open(path, "wb") as f:
            left = size
            while left > 0:
                # Rotate the block so that no two 8 MiB parts are equal.
                f.write(block[left % 4096 :] + block[: left % 4096] if left != size else block)
                left -= len(block)
            f.truncate(size)
        self.client.upload_file(str(path), BUCKET, key)
        path.unlink()

    def _put_many(self, keys: list[str], body: bytes) -> None:
        log(f"putting {len(keys):,} objects of {len(body)} bytes")

        def put(key: str) -> None:
            self.client.put_object(Bucket=BUCKET, Key=key, Body=body)

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(put, keys))

    @staticmethod
    def _small_key(i: int) -> str:
        return f"{PREFIX}small/f{i:05d}.bin"

    @staticmethod
    def _entry_key(i: int) -> str:
        return f"{PREFIX}many/e{i:06d}"

    @staticmethod
    def _par_key(i: int) -> str:
        return f"{PREFIX}par/p{i}.bin"

    # --- mounts ----------------------------------------------------------------------------

    def mount(self, kind: str, name: str) -> MountInfo:
        assert self.server is not None
        path = self.workdir / "mnt" / f"{kind}-{name}"
        path.mkdir(parents=True)
        info = MountInfo(kind, path)
        self.mounts.append(info)  # before mounting: cleanup must see a half-made mount too
        started = time.perf_counter()
        if kind == POOLFS_SIDE:
            self._mount_poolfs(info, name)
        else:
            self._mount_other(info, name)
        info.ready_seconds = time.perf_counter() - started
        if self.args.read_ahead_kb is not None:
            self._set_read_ahead(info)
        return info

    def _mount_poolfs(self, info: MountInfo, name: str) -> None:
        assert self.server is not None
        path = info.path
        cmd = [
            *POOLFS,
            "mount",
            POOL_URL,
            str(path),
            "--endpoint-url",
            self.server.endpoint_url,
            "--spill-dir",
            str(self.workdir / "spill"),
            "--log-file",
            str(self.workdir / "logs" / f"poolfs-{name}.log"),
        ]
        if self.size > POOLFS_MAX_FILE:
            cmd += ["--max-file-size", str(self.size)]
        cmd += self.args.mount_option
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env=self.env, timeout=120, check=False
        )
        # The worker is found by its command line (`poolfs mount ... MOUNTPOINT --foreground`):
        # the mountpoint is unique to this run, and this needs no poolfs internals.
        pids = worker_pids(str(path))
        info.pid = pids[0] if len(pids) == 1 else None
        if proc.returncode != 0 or find_mount(str(path)) is None:
            reason = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
            raise BenchFailure(f"poolfs mount on {path} failed ({proc.returncode}): {reason}")
        if info.pid is None:
            raise BenchFailure(f"no single worker process for the mount on {path}: {pids}")

    def _mount_other(self, info: MountInfo, name: str) -> None:
        """s3fs or rclone in the foreground, as a child of this process; ready once mounted."""
        assert self.server is not None
        assert self.secrets_dir is not None
        path = str(info.path)
        if info.kind == S3FS:
            cmd = [
                "s3fs",
                f"{BUCKET}:/{PREFIX.rstrip('/')}",
                path,
                "-f",
                "-o",
                f"passwd_file={self.secrets_dir / 'passwd-s3fs'}",
                "-o",
                f"url={self.server.endpoint_url}",
                "-o",
                "use_path_request_style",
                "-o",
                f"endpoint={REGION}",
            ]
        else:
            cmd = [
                "rclone",
                "mount",
                f"bench:{BUCKET}/{PREFIX.rstrip('/')}",
                path,
                "--config",
                str(self.secrets_dir / "rclone.conf"),
                "--vfs-cache-mode",
                "off",
            ]
        logs = self.workdir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        with open(logs / f"{info.kind}-{name}.log", "ab") as out:
            info.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=self.env
            )
        info.pid = info.proc.pid
        deadline = time.monotonic() + 30
        while find_mount(path) is None:
            if info.proc.poll() is not None:
                raise BenchFailure(
                    f"{info.kind} mount on {path} exited {info.proc.returncode}: "
                    f"{_last_line(logs / f'{info.kind}-{name}.log')}"
                )
            if time.monotonic() > deadline:
                raise BenchFailure(f"{info.kind} mount on {path}: not mounted after 30 s")
            time.sleep(0.02)
        # Mounted is not yet serving: wait until the root answers.
        while True:
            try:
                os.listdir(path)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def _set_read_ahead(self, info: MountInfo) -> None:
        """Experiment: the kernel read-ahead of the mount's backing device (bdi), in KiB."""
        if info.kind != POOLFS_SIDE:
            return
        dev = os.stat(info.path).st_dev
        bdi = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
        bdi.write_text(f"{self.args.read_ahead_kb}\n")

    def umount(self, info: MountInfo) -> None:
        """Unmount (`poolfs umount` for poolfs, `fusermount -u` for the others); if that fails,
        `fusermount -uz`; a lingering daemon of this mount gets SIGTERM, then SIGKILL.
        Failures are recorded, never raised."""
        mp = str(info.path)
        if find_mount(mp) is not None:
            cmd = [*POOLFS, "umount", mp, "--timeout", "300"]
            if info.kind != POOLFS_SIDE:
                cmd = ["fusermount", "-u", mp]
            try:
                proc = subprocess.run(
                    cmd, capture_output=True, text=True, env=self.env, timeout=330, check=False
                )
                if proc.returncode != 0:
                    self.fail(f"{cmd[0]} umount {mp}: {proc.stderr.strip() or proc.returncode}")
            except subprocess.TimeoutExpired:
                self.fail(f"umount {mp} timed out")
            if find_mount(mp) is not None:
                log(f"falling back to fusermount -uz {mp}")
                subprocess.run(["fusermount", "-uz", mp], capture_output=True, check=False)
                if find_mount(mp) is not None:
                    self.fail(f"{mp} is still mounted")
        if info.proc is not None:
            self._stop_child(info.proc, mp)
            return
        pids = set(worker_pids(mp))
        if info.pid is not None:
            pids.add(info.pid)
        for pid in sorted(pids):
            self._stop_worker(pid, mp)

    def _stop_child(self, proc: subprocess.Popen[bytes], mountpoint: str) -> None:
        """s3fs/rclone: exits once unmounted; else SIGTERM, then SIGKILL (our own child)."""
        for sig, wait in ((None, 30.0), (signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            if sig is not None:
                if proc.poll() is not None:
                    return
                self.fail(f"mount process {proc.pid} of {mountpoint} still running: {sig.name}")
                proc.send_signal(sig)
            try:
                proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def _stop_worker(self, pid: int, mountpoint: str) -> None:
        deadline = time.monotonic() + 30
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            # Re-check it is still this mount's worker (PIDs get reused) before signalling.
            if not pid_alive(pid) or pid not in worker_pids(mountpoint):
                return
            self.fail(f"mount worker {pid} of {mountpoint} still running: {sig.name}")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            deadline = time.monotonic() + wait
            while pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)

    @contextlib.contextmanager
    def mounted(self, kind: str, name: str) -> Iterator[MountInfo]:
        info = self.mount(kind, name)
        try:
            yield info
        finally:
            self.umount(info)

    # --- workloads: direct boto3 -------------------------------------------------------------

    def boto3_read(self) -> tuple[float, Timing]:
        self.drop_caches()
        with self.meter() as t:
            data = self.client.get_object(Bucket=BUCKET, Key=PREFIX + "read/big.bin")["Body"]
            n = len(data.read())
        _expect(n, self.size, "bytes read")
        return self.size / t.wall / MB, t

    def boto3_write(self, run: int) -> tuple[float, Timing]:
        assert self.source is not None
        key = f"{PREFIX}write/boto3-{run}.bin"
        self.drop_caches()
        with self.meter() as t, open(self.source, "rb") as f:
            self.client.put_object(Bucket=BUCKET, Key=key, Body=f)
        _expect(self.client.head_object(Bucket=BUCKET, Key=key)["ContentLength"], self.size, key)
        self.client.delete_object(Bucket=BUCKET, Key=key)
        return self.size / t.wall / MB, t

    def boto3_cat(self) -> tuple[float, Timing]:
        keys = [self._small_key(i) for i in range(self.args.files)]
        self.drop_caches()
        total = 0
        with self.meter() as t:
            for key in keys:
                total += len(self.client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
        _expect(total, self.args.files * self.file_size, "bytes read")
        return self.args.files / t.wall, t

    def boto3_list(self) -> tuple[float, Timing]:
        paginator = self.client.get_paginator("list_objects_v2")
        count = 0
        with self.meter() as t:
            for page in paginator.paginate(Bucket=BUCKET, Prefix=PREFIX + "many/", Delimiter="/"):
                count += len(page.get("Contents", []))
        _expect(count, self.args.entries, "keys listed")
        return t.wall, t

    def boto3_random(self, jobs: int) -> tuple[float, Timing]:
        """Ranged GETs of 4 KiB at random aligned offsets of the seq-read object, from `jobs`
        threads sharing one client, for --rand-seconds."""
        key = PREFIX + "read/big.bin"

        def read_at(offset: int) -> int:
            rng = f"bytes={offset}-{offset + RAND_BLOCK - 1}"
            body = self.client.get_object(Bucket=BUCKET, Key=key, Range=rng)["Body"]
            return len(body.read())

        self.drop_caches()
        return self._random_jobs(read_at, jobs, None)

    def boto3_ttfb(self) -> tuple[float, Timing]:
        self.drop_caches()
        key = PREFIX + "ttfb/huge.bin"
        with self.meter() as t:
            body = self.client.get_object(Bucket=BUCKET, Key=key, Range="bytes=0-0")["Body"]
            n = len(body.read(1))
        _expect(n, 1, "bytes read")
        return t.wall * 1000, t

    def boto3_parallel(self) -> tuple[float, Timing]:
        def get(i: int) -> int:
            return len(self.client.get_object(Bucket=BUCKET, Key=self._par_key(i))["Body"].read())

        self.drop_caches()
        with self.meter() as t, ThreadPoolExecutor(PAR_JOBS) as pool:
            total = sum(pool.map(get, range(PAR_JOBS)))
        _expect(total, PAR_JOBS * self.par_size, "bytes read")
        return total / t.wall / MB, t

    def _random_jobs(
        self, read_at: Callable[[int], int], jobs: int, pid: int | None
    ) -> tuple[float, Timing]:
        """Run `read_at(random aligned offset)` in `jobs` threads for --rand-seconds."""
        blocks = self.size // RAND_BLOCK
        seconds = self.args.rand_seconds
        counts = [0] * jobs
        errors: list[BaseException] = []
        start = threading.Barrier(jobs + 1)
        stop = threading.Event()

        def job(i: int) -> None:
            rng = random.Random(i)
            start.wait()
            try:
                while not stop.is_set():
                    _expect(read_at(rng.randrange(blocks) * RAND_BLOCK), RAND_BLOCK, "bytes")
                    counts[i] += 1
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=job, args=(i,), daemon=True) for i in range(jobs)]
        for th in threads:
            th.start()
        with self.meter(pid) as t:
            start.wait()
            time.sleep(seconds)
            stop.set()
            for th in threads:
                th.join()
        if errors:
            raise BenchFailure(f"random read: {errors[0]}")
        return sum(counts) / t.wall, t

    # --- workloads: mounts ---------------------------------------------------------------------

    def mount_read(self, kind: str, run: int) -> tuple[float, Timing]:
        with self.mounted(kind, f"read-{run}") as m:
            assert m.pid is not None
            self.drop_caches()
            before = status_kib(m.pid, "VmRSS") or 0
            with RssSampler(m.pid) as rss, self.meter(m.pid) as t:
                proc = self.run_tool(
                    ["dd", f"if={m.path / 'read' / 'big.bin'}", "of=/dev/null", "bs=1M"]
                )
        _expect(_dd_bytes(proc.stderr), self.size, "bytes read by dd")
        if kind == POOLFS_SIDE:
            self.rss_before_mib.append(before / 1024)
        self.add(RSS_READ, kind, rss.peak_kib / 1024)
        return self.size / t.wall / MB, t

    def mount_write(self, kind: str, run: int) -> tuple[float, Timing]:
        assert self.source is not None
        name = f"{kind}-{run}.bin"
        with self.mounted(kind, f"write-{run}") as m:
            assert m.pid is not None
            self.drop_caches()
            # 20 ms samples: the sampler's CPU counts as client CPU; RSS here moves slowly.
            with RssSampler(m.pid, 0.02) as rss, self.meter(m.pid) as t:
                written, close_s = self.copy_source_to(m.path / "write" / name)
        _expect(written, self.size, "bytes written")
        self.write_close_s[kind].append(close_s)
        self.write_rss_mib[kind].append(rss.peak_kib / 1024)
        self.write_data_s[kind].append(t.wall - close_s)
        key = f"{PREFIX}write/{name}"
        _expect(self.client.head_object(Bucket=BUCKET, Key=key)["ContentLength"], self.size, key)
        self.client.delete_object(Bucket=BUCKET, Key=key)
        return self.size / t.wall / MB, t

    def copy_source_to(self, dest: Path) -> tuple[int, float]:
        """Write the source file to `dest` (a new file) in 1 MiB writes from one process.

        Returns the bytes written and the seconds close(2) took: on poolfs close returns once
        the object is durable in the store (or fails, which raises here).
        """
        assert self.source is not None
        buf = bytearray(MiB)
        written = 0
        with open(self.source, "rb", buffering=0) as src:
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                while n := src.readinto(buf):
                    view = memoryview(buf)[:n]
                    while view:
                        k = os.write(fd, view)
                        view = view[k:]
                        written += k
            except BaseException:
                with contextlib.suppress(OSError):
                    os.close(fd)
                raise
            started = time.perf_counter()
            os.close(fd)
            return written, time.perf_counter() - started

    def mount_cat(self, kind: str, run: int) -> tuple[float, Timing]:
        with self.mounted(kind, f"cat-{run}") as m:
            self.drop_caches()
            with self.meter(m.pid) as t:
                # One process: the shell expands the glob (one readdir), cat reads every file.
                proc = self.run_tool(
                    ["sh", "-c", 'exec cat -- "$1"/*', "sh", str(m.path / "small")]
                )
        _expect(len(proc.stdout), self.args.files * self.file_size, "bytes from cat")
        return self.args.files / t.wall, t

    def mount_ls(self, kind: str, run: int) -> tuple[tuple[float, Timing], tuple[float, Timing]]:
        out: list[tuple[float, Timing]] = []
        with self.mounted(kind, f"ls-{run}") as m:
            self.drop_caches()
            for _ in range(2):  # first run on the fresh mount, then again immediately
                with self.meter(m.pid) as t:
                    proc = self.run_tool(["ls", "-l", str(m.path / "many")])
                _expect(proc.stdout.count(b"\n") - 1, self.args.entries, "entries from ls -l")
                out.append((t.wall, t))
        return out[0], out[1]

    def mount_random(self, kind: str, jobs: int, run: int) -> tuple[float, Timing]:
        """os.pread of 4 KiB at random aligned offsets, `jobs` threads each with its own
        descriptor (POSIX_FADV_RANDOM, as fio does: no kernel read-ahead)."""
        with self.mounted(kind, f"rand{jobs}-{run}") as m:
            path = m.path / "read" / "big.bin"
            fds = [os.open(path, os.O_RDONLY) for _ in range(jobs)]
            try:
                for fd in fds:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
                self.drop_caches()
                local = threading.local()
                pool = iter(fds)
                lock = threading.Lock()

                def read_at(offset: int) -> int:
                    fd = getattr(local, "fd", None)
                    if fd is None:
                        with lock:
                            fd = local.fd = next(pool)
                    return len(os.pread(fd, RAND_BLOCK, offset))

                return self._random_jobs(read_at, jobs, m.pid)
            finally:
                for fd in fds:
                    os.close(fd)

    def mount_ttfb(self, kind: str, run: int) -> tuple[float, Timing]:
        """open + read(1) of an object not opened before on a fresh mount (lookup included)."""
        with self.mounted(kind, f"ttfb-{run}") as m:
            self.drop_caches()
            with self.meter(m.pid) as t:
                fd = os.open(m.path / "ttfb" / "huge.bin", os.O_RDONLY)
                try:
                    n = len(os.read(fd, 1))
                finally:
                    os.close(fd)
        _expect(n, 1, "bytes read")
        return t.wall * 1000, t

    def mount_parallel(self, kind: str, run: int) -> tuple[float, Timing]:
        """`dd bs=1M` of 8 different objects at once; daemon RSS peak meanwhile."""
        with self.mounted(kind, f"par-{run}") as m:
            assert m.pid is not None
            self.drop_caches()
            with RssSampler(m.pid) as rss, self.meter(m.pid) as t:
                procs = [
                    subprocess.Popen(
                        ["dd", f"if={m.path / 'par' / f'p{i}.bin'}", "of=/dev/null", "bs=1M"],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE,
                        env=self.env,
                    )
                    for i in range(PAR_JOBS)
                ]
                results = [(p.communicate(timeout=600)[1], p.returncode) for p in procs]
        for stderr, code in results:
            if code != 0:
                raise BenchFailure(f"dd exited {code}: {stderr.decode(errors='replace')[-200:]}")
            _expect(_dd_bytes(stderr), self.par_size, "bytes read by dd")
        self.add(RSS_PAR, kind, rss.peak_kib / 1024)
        return PAR_JOBS * self.par_size / t.wall / MB, t

    # --- driver ----------------------------------------------------------------------------

    def run(self) -> None:
        runs = self.args.runs
        for run in range(1, runs + 1):
            if self.wants(READ):
                log(f"seq read, run {run}/{runs}")
                self.record(READ, BOTO3, self.boto3_read)
                for kind in self.mounters:
                    self.record(READ, kind, functools.partial(self.mount_read, kind, run))
        for run in range(1, runs + 1):
            if self.wants(WRITE):
                log(f"seq write, run {run}/{runs}")
                self.record(WRITE, BOTO3, functools.partial(self.boto3_write, run))
                for kind in self.mounters:
                    self.record(WRITE, kind, functools.partial(self.mount_write, kind, run))
        for run in range(1, runs + 1):
            if self.wants(CAT):
                log(f"cat of small files, run {run}/{runs}")
                self.record(CAT, BOTO3, self.boto3_cat)
                for kind in self.mounters:
                    self.record(CAT, kind, functools.partial(self.mount_cat, kind, run))
        for run in range(1, runs + 1):
            if self.wants(LS1):
                log(f"ls -l, run {run}/{runs}")
                self.drop_caches()
                self.record(LS1, BOTO3, self.boto3_list)
                self.record(LS2, BOTO3, self.boto3_list)
                for kind in self.mounters:
                    self._mount_ls(kind, run)
        for key, jobs in ((RAND1, 1), (RAND8, PAR_JOBS)):
            for run in range(1, runs + 1):
                if self.wants(key):
                    log(f"random 4 KiB reads, {jobs} job(s), run {run}/{runs}")
                    self.record(key, BOTO3, functools.partial(self.boto3_random, jobs))
                    for kind in self.mounters:
                        step = functools.partial(self.mount_random, kind, jobs, run)
                        self.record(key, kind, step)
        for run in range(1, runs + 1):
            if self.wants(TTFB):
                log(f"time to first byte, run {run}/{runs}")
                self.record(TTFB, BOTO3, self.boto3_ttfb)
                for kind in self.mounters:
                    self.record(TTFB, kind, functools.partial(self.mount_ttfb, kind, run))
        for run in range(1, runs + 1):
            if self.wants(PAR):
                log(f"{PAR_JOBS} parallel sequential readers, run {run}/{runs}")
                self.record(PAR, BOTO3, self.boto3_parallel)
                for kind in self.mounters:
                    self.record(PAR, kind, functools.partial(self.mount_parallel, kind, run))
        self.loads.append(_load())

    def _mount_ls(self, kind: str, run: int) -> None:
        try:
            first, second = self.mount_ls(kind, run)
        except Exception as exc:
            for key in (LS1, LS2):
                self.results[(key, kind)].errors.append(str(exc))
            self.fail(f"ls/{kind}: {exc}")
            return
        self.record(LS1, kind, lambda: first)
        self.record(LS2, kind, lambda: second)

    def profile(self, out_dir: Path) -> None:
        """Unmeasured extra runs of the poolfs workloads with py-spy attached to the worker."""
        assert self.source is not None
        py_spy = shutil.which("py-spy", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
        if py_spy is None:
            self.fail("--profile: py-spy not found (pip install py-spy into the venv)")
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in self.args.profile_workloads:
            with self.mounted(POOLFS_SIDE, f"profile-{name}") as m:
                step = self._profile_step(name, m)
                self.drop_caches()
                raw = out_dir / f"{name}.txt"
                # --gil: only samples of the thread holding the GIL, i.e. Python CPU time.
                cmd = [py_spy, "record", "--pid", str(m.pid), "--rate", "250", "--threads"]
                cmd += ["--gil"]
                cmd += ["--format", "raw", "--output", str(raw)]
                with open(out_dir / f"{name}-py-spy.log", "wb") as spy_log:
                    spy = subprocess.Popen(cmd, stdout=spy_log, stderr=subprocess.STDOUT)
                try:
                    time.sleep(1.0)  # let py-spy attach
                    with self.meter(m.pid) as t:
                        step()
                finally:
                    spy.send_signal(signal.SIGINT)
                    try:
                        spy.wait(30)
                    except subprocess.TimeoutExpired:
                        spy.kill()
                        spy.wait()
            log(
                f"profile {name}: {t.wall:.2f} s, worker+client CPU {t.client_cpu:.2f} s "
                f"under py-spy -> {raw}"
            )
            if raw.exists():
                (out_dir / f"{name}-summary.txt").write_text(summarize_profile(raw))
        with contextlib.suppress(botocore.exceptions.ClientError):
            self.client.delete_object(Bucket=BUCKET, Key=PREFIX + "write/prof.bin")

    def _profile_step(self, name: str, m: MountInfo) -> Callable[[], object]:
        big = m.path / "read" / "big.bin"
        if name == "seq-read":
            return functools.partial(self.run_tool, ["dd", f"if={big}", "of=/dev/null", "bs=1M"])
        if name == "seq-write":
            return functools.partial(self.copy_source_to, m.path / "write" / "prof.bin")
        if name == "cat":
            return functools.partial(
                self.run_tool, ["sh", "-c", 'exec cat -- "$1"/*', "sh", str(m.path / "small")]
            )
        if name == "ls":
            return functools.partial(self.run_tool, ["ls", "-l", str(m.path / "many")])
        if name == "ttfb":
            return functools.partial(
                self.run_tool, ["head", "-c", "1", str(m.path / "ttfb" / "huge.bin")]
            )
        jobs = 1 if name == "rand1" else PAR_JOBS
        fd = os.open(big, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)

        def rand() -> None:
            try:
                self._random_jobs(lambda off: len(os.pread(fd, RAND_BLOCK, off)), jobs, None)
            finally:
                os.close(fd)

        return rand

    # --- cleanup ---------------------------------------------------------------------------

    def cleanup(self) -> None:
        for info in reversed(self.mounts):
            try:
                self.umount(info)
            except Exception as exc:
                self.fail(f"cleanup of {info.path}: {exc}")
        if self._client is not None:
            self._client.close()
        if self.server is not None:
            log(f"stopping SeaweedFS (pid {self.server.pid})")
            self.server.stop()
        if self.source is not None and self.source.parent != self.workdir:
            shutil.rmtree(self.source.parent, ignore_errors=True)
        if self.secrets_dir is not None:
            shutil.rmtree(self.secrets_dir, ignore_errors=True)

    # --- report ----------------------------------------------------------------------------

    def _median(self, key: str, side: str) -> float | None:
        s = self.results.get((key, side))
        return s.median() if s is not None else None

    def target(self, key: str) -> tuple[str, str, str]:
        """(target, poolfs' ratio, PASS/FAIL/-) for a workload, per the issue's targets."""
        p = self._median(key, POOLFS_SIDE)
        b = self._median(key, BOTO3)
        others = [v for k in (S3FS, RCLONE) if (v := self._median(key, k)) is not None]

        def verdict(ok: bool | None) -> str:
            return "-" if ok is None else ("PASS" if ok else "**FAIL**")

        def over(num: float | None, den: float | None) -> float | None:
            return num / den if num is not None and den else None

        if key in (READ, WRITE, RAND1, RAND8):
            r = over(p, b)
            return ">= 1.0x boto3", _ratio(r), verdict(None if r is None else r >= 1.0)
        if key == CAT:
            r1 = over(p, b)
            r2 = over(p, max(others)) if others else None
            ok = None if r1 is None else r1 >= 1.0 and (r2 is None or r2 >= 1.3)
            text = ">= 1.0x boto3, >= 1.3x best of s3fs/rclone"
            return text, f"{_ratio(r1)}, {_ratio(r2)}", verdict(ok)
        if key == LS1:
            r = over(p, b)
            return "<= 1.2x boto3 list time", _ratio(r), verdict(None if r is None else r <= 1.2)
        if key == LS2:
            return "<= 0.2 s", "-", verdict(None if p is None else p <= 0.2)
        if key == TTFB:
            r = over(p, b)
            return "<= 1.5x boto3 1-byte GET", _ratio(r), verdict(None if r is None else r <= 1.5)
        if key == RSS_READ:
            return "<= 100 MiB", "-", verdict(None if p is None else p <= 100)
        if key == RSS_PAR:
            return "<= 256 MiB", "-", verdict(None if p is None else p <= 256)
        r = over(p, b)
        return "(no target)", _ratio(r), "-"

    def report(self, facts: dict[str, str]) -> str:
        now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
        names = {BOTO3: "direct boto3", POOLFS_SIDE: "poolfs", S3FS: "s3fs", RCLONE: "rclone"}
        lines = [
            f"poolfs vs direct boto3, s3fs and rclone, SeaweedFS on 127.0.0.1, {now}, "
            f"median of {self.args.runs} run(s)",
            "",
            "| workload | "
            + " | ".join(names[s] for s in self.sides)
            + " | target (poolfs) | poolfs ratio | pass |",
            "|---|" + "---:|" * len(self.sides) + "---|---:|---|",
        ]
        for w in self.workloads:
            cells = []
            for side in self.sides:
                s = self.results[(w.key, side)]
                if side == BOTO3 and w.key in (RSS_READ, RSS_PAR):
                    cells.append("-")
                else:
                    cells.append(_fmt(s.median(), w, bool(s.errors)))
            text, ratio, ok = self.target(w.key)
            lines.append(f"| {w.label} | {' | '.join(cells)} | {text} | {ratio} | {ok} |")
        lines.append("")
        lines.append(
            "Ratios: poolfs / direct boto3 (for the cat row also poolfs / the better of s3fs "
            "and rclone); for times (`ls -l`, time to first byte) poolfs seconds / boto3 "
            "seconds, so lower is better there."
        )
        lines.append("")
        if self.rss_before_mib:
            lines.append(
                "- poolfs worker RSS just before the seq read: "
                f"{statistics.median(self.rss_before_mib):.0f} MiB (median)"
            )
        for kind in self.mounters:
            if self.write_close_s[kind]:
                lines.append(
                    f"- {kind} seq write, time in write(2) calls / in close(2): "
                    f"{statistics.median(self.write_data_s[kind]):.2f} s / "
                    f"{statistics.median(self.write_close_s[kind]):.2f} s (median); daemon RSS "
                    f"peak {statistics.median(self.write_rss_mib[kind]):.0f} MiB (median)"
                )
        lines.append("- per run (in order):")
        for w in self.workloads:
            for side in self.sides:
                s = self.results[(w.key, side)]
                if not s.values and not s.errors:
                    continue
                vals = _join(s.values, ".3f" if w.is_time else ".1f") or "-"
                cpu = ""
                if s.client_cpu:
                    cpu = (
                        f"; CPU s client {_join(s.client_cpu, '.2f')}, "
                        f"server {_join(s.server_cpu, '.2f')}"
                    )
                err = f"; {len(s.errors)} FAILED (see FAILURES)" if s.errors else ""
                lines.append(f"  - {w.key} {side}: {vals} {w.unit}{cpu}{err}")
        lines.append(
            "  - CPU s: client = this process + the tool it ran (dd/cat/ls) + the mount daemon;"
            " server = weed"
        )
        if self.args.mount_option:
            lines.append(f"- extra `poolfs mount` arguments: {' '.join(self.args.mount_option)}")
        if self.args.read_ahead_kb is not None:
            lines.append(f"- poolfs mounts' bdi read_ahead_kb set to {self.args.read_ahead_kb}")
        if self.drop_error is None:
            lines.append(f"- page caches dropped before every step ({self.drops} times)")
        else:
            lines.append(f"- page caches NOT dropped: {self.drop_error}")
        for kind in self.mounters:
            ready = [m.ready_seconds for m in self.mounts if m.kind == kind and m.ready_seconds]
            if ready:
                lines.append(
                    f"- `{kind}` mount until ready: median {statistics.median(ready):.2f} s "
                    f"over {len(ready)} mounts"
                )
        for key, value in facts.items():
            lines.append(f"- {key}: {value}")
        if self.failures:
            lines.append(f"- FAILURES ({len(self.failures)}):")
            lines.extend(f"  - {f}" for f in self.failures)
        return "\n".join(lines)


# --- small helpers ---------------------------------------------------------------------------


def _size(n: int) -> str:
    if n >= MiB and n % MiB == 0:
        return f"{n // MiB} MiB"
    if n >= 1024 and n % 1024 == 0:
        return f"{n // 1024} KiB"
    return f"{n} B"


def _fmt(value: float | None, w: Workload, failed: bool) -> str:
    if value is None:
        return "FAILED" if failed else "not run"
    if w.unit == "s":
        return f"{value:.3f} s"
    if w.unit == "ms":
        return f"{value:.1f} ms"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _load() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def _last_line(path: Path) -> str:
    with contextlib.suppress(OSError):
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
        if lines:
            return lines[-1]
    return f"no output (see {path})"


def _join(values: Sequence[float], spec: str) -> str:
    return ", ".join(format(v, spec) for v in values)


def _expect(got: int, want: int, what: str) -> None:
    if got != want:
        raise BenchFailure(f"{what}: got {got}, expected {want}")


def _dd_bytes(stderr: bytes) -> int:
    match = re.search(rb"^(\d+) bytes", stderr, re.MULTILINE)
    return int(match.group(1)) if match else -1


def _first_line(argv: Sequence[str]) -> str:
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unknown ({exc})"
    text = (proc.stdout.strip() or proc.stderr.strip()).splitlines()
    return text[0].strip() if text else "unknown"


def machine_facts() -> dict[str, str]:
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "machine": f"nproc {len(os.sched_getaffinity(0))}, {cpu}, kernel {platform.release()}, "
        f"Python {platform.python_version()}, load average (1, 5, 15 min) at start {_load()}",
        "software": f"SeaweedFS `{_first_line([weed_binary(), 'version'])}`, boto3 "
        f"{boto3.__version__}, botocore {botocore.__version__}, poolfs on mfusepy "
        f"{importlib.metadata.version('mfusepy')} and {_libfuse()}, "
        f"`{_first_line(['s3fs', '--version'])}`, `{_first_line(['rclone', 'version'])}`",
    }


def _libfuse() -> str:
    """The libfuse the poolfs adapter loads (e.g. libfuse3.so.3.14.0), from this process' maps."""
    from poolfs.fs import fuse_ops  # noqa: F401  (loads libfuse)

    with contextlib.suppress(OSError), open("/proc/self/maps") as f:
        for line in f:
            path = line.split()[-1]
            if "/libfuse" in path:
                return os.path.basename(os.path.realpath(path))
    return "libfuse (version unknown)"


def summarize_profile(raw: Path, top: int = 25) -> str:
    """Self and inclusive sample counts per function from py-spy's collapsed stacks."""
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_frame_name(fr) for fr in stack.split(";")]
        leaf = frames[-1] if frames and not frames[-1].startswith("thread") else "(no Python frame)"
        own[leaf] = own.get(leaf, 0) + count
        for fr in set(frames):
            incl[fr] = incl.get(fr, 0) + count
    out = [f"{total} samples (all threads)", "", "self:"]
    for name, n in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        out.append(f"{100 * n / max(total, 1):6.1f}%  {name}")
    out += ["", "inclusive:"]
    for name, n in sorted(incl.items(), key=lambda kv: -kv[1])[:top]:
        out.append(f"{100 * n / max(total, 1):6.1f}%  {name}")
    return "\n".join(out) + "\n"


def _frame_name(frame: str) -> str:
    """`f (file.py:12)` -> `f (file.py)`; `thread (123): poolfs-io_4` -> `thread poolfs-io_*`."""
    if frame.startswith("thread ("):
        name = frame.partition(": ")[2] or "(unnamed)"
        return "thread " + re.sub(r"[-_]\d+$", "_*", name)
    return re.sub(r":\d+\)$", ")", frame)


WORKLOAD_KEYS = (READ, WRITE, CAT, LS1, RAND1, RAND8, TTFB, PAR)
PROFILE_WORKLOADS = ("seq-read", "seq-write", "cat", "ls", "rand1", "rand8", "ttfb")
QUICK = {
    "runs": 1,
    "size_mib": 32,
    "files": 100,
    "entries": 1000,
    "rand_seconds": 2.0,
    "ttfb_mib": 64,
    "parallel_mib": 16,
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.bench_s3",
        description="poolfs vs direct boto3, s3fs and rclone on a SeaweedFS server this script "
        "starts.",
    )
    p.add_argument("--runs", type=int, default=3, help="runs per workload (median; default 3)")
    p.add_argument("--size-mib", type=float, default=256, help="seq read/write size (256)")
    p.add_argument("--files", type=int, default=1000, help="small files to cat (1000)")
    p.add_argument("--file-kib", type=float, default=4, help="size of each small file (4)")
    p.add_argument("--entries", type=int, default=10_000, help="entries to ls -l (10000)")
    p.add_argument(
        "--rand-seconds", type=float, default=5.0, help="length of each random-read step (5)"
    )
    p.add_argument(
        "--ttfb-mib", type=float, default=1024, help="object for time to first byte (1024)"
    )
    p.add_argument(
        "--parallel-mib",
        type=float,
        default=128,
        help=f"size of each of the {PAR_JOBS} objects read in parallel (128)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="small sizes and one run (" + ", ".join(f"{k}={v}" for k, v in QUICK.items()) + ")",
    )
    p.add_argument(
        "--mounters",
        type=lambda s: [x for x in s.split(",") if x],
        default=list(MOUNTERS),
        help="comma-separated subset of poolfs,s3fs,rclone (default: all three)",
    )
    p.add_argument(
        "--only",
        type=lambda s: [x for x in s.split(",") if x],
        default=[],
        help=f"comma-separated workloads to run: {','.join(WORKLOAD_KEYS)} (default: all)",
    )
    p.add_argument(
        "--workdir",
        type=Path,
        help="parent of the scratch dir (server data, mountpoints, spill; default /var/tmp)",
    )
    p.add_argument(
        "--mount-option",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for every `poolfs mount`, e.g. --mount-option=--metadata-ttl=30 "
        "(repeatable; for experiments, the default run uses none)",
    )
    p.add_argument(
        "--read-ahead-kb",
        type=int,
        metavar="KIB",
        help="experiment: set the poolfs mounts' /sys/class/bdi/MAJ:MIN/read_ahead_kb after "
        "mounting",
    )
    p.add_argument("--keep", action="store_true", help="keep the scratch dir (logs) at the end")
    p.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="after the measured runs, run poolfs workloads once more with py-spy attached to "
        "the worker (collapsed stacks + summary in DIR; not part of the table)",
    )
    p.add_argument(
        "--profile-workloads",
        type=lambda s: [x for x in s.split(",") if x],
        default=["seq-read", "seq-write"],
        help=f"comma-separated, for --profile: {','.join(PROFILE_WORKLOADS)} "
        "(default seq-read,seq-write)",
    )
    args = p.parse_args(argv)
    if args.quick:
        defaults = {k: p.get_default(k) for k in QUICK}
        for key, value in QUICK.items():
            if getattr(args, key) == defaults[key]:  # an explicit option still wins
                setattr(args, key, value)
    if args.runs < 1 or args.size_mib <= 0 or args.files < 1 or args.entries < 1:
        p.error("--runs, --size-mib, --files and --entries must be positive")
    if args.ttfb_mib <= 0 or args.parallel_mib <= 0 or args.rand_seconds <= 0:
        p.error("--ttfb-mib, --parallel-mib and --rand-seconds must be positive")
    bad = [m for m in args.mounters if m not in MOUNTERS]
    bad += [w for w in args.only if w not in WORKLOAD_KEYS]
    bad += [w for w in args.profile_workloads if w not in PROFILE_WORKLOADS]
    if bad:
        p.error(f"unknown mounter or workload: {', '.join(bad)}")
    return args


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # Ctrl-C, SIGTERM and a closed terminal all end in the cleanup below. SIGINT is set even
    # when inherited as ignored (a background job of a non-interactive shell); SIGHUP is left
    # alone under nohup.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _on_signal)
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        signal.signal(signal.SIGHUP, _on_signal)
    parent = args.workdir or Path("/var/tmp")
    parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="poolfs-bench-", dir=parent)).resolve()
    bench = Bench(args, workdir)
    facts = machine_facts()
    code = 0
    try:
        bench.ensure_tools()
        bench.start_server()
        bench.upload_data()
        bench.run()
        if args.profile:
            bench.profile(args.profile)
    except (KeyboardInterrupt, Interrupted) as exc:
        log(f"interrupted ({type(exc).__name__}); cleaning up")
        code = 130
    except Exception as exc:
        bench.fail(f"{type(exc).__name__}: {exc}")
    finally:
        # Cleanup must finish: a second Ctrl-C or SIGTERM no longer interrupts it.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if signal.getsignal(signal.SIGHUP) is _on_signal:
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
        bench.cleanup()
        still = [str(m.path) for m in bench.mounts if find_mount(str(m.path)) is not None]
        if still:
            bench.fail(f"still mounted: {', '.join(still)}; scratch dir kept: {workdir}")
        elif args.keep:
            log(f"scratch dir kept: {workdir}")
        elif bench.failures and code == 0:
            # Keep the worker logs for the post-mortem, not the server's data.
            shutil.rmtree(workdir / "weed" / "data", ignore_errors=True)
            log(f"scratch dir kept (worker logs in {workdir / 'logs'})")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    facts["load average at end"] = _load()
    print(bench.report(facts), flush=True)
    if code:
        return code
    return 1 if bench.failures else 0


if __name__ == "__main__":
    sys.exit(main())
