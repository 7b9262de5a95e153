"""poolfs against direct boto3 on the same SeaweedFS server (127.0.0.1), in the same run.

Run from the repository root (see bench/README.md for what each workload measures):

    .venv/bin/python -m bench.bench_s3 [--runs 3] [--size-mib 256] [--files 1000]
                                       [--file-kib 4] [--entries 10000] [--profile DIR]

The script starts its own `weed mini` (tests.servers.SeaweedServer), makes a bucket, uploads
the data sets with boto3, then measures each workload `--runs` times, alternating direct boto3
(one client, one stream, no parallelism) and poolfs (a fresh `poolfs mount` per measurement,
unmounted right after with `poolfs umount`). Page caches are dropped before every measured step.
It prints one markdown table of medians to stdout (progress goes to stderr) and exits non-zero
if any mount, unmount or workload failed.

Whatever happens (failure, Ctrl-C, SIGTERM, SIGHUP) it unmounts everything it mounted (`poolfs
umount`, then `fusermount -uz`), stops the mount workers it started if they linger and stops the
server: processes are only ever signalled by the PID this script started, or, for a mount worker,
a PID whose command line serves one of this run's own mountpoints.
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
BOTO3, POOLFS_SIDE = "boto3", "poolfs"


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
    unit: str  # "MB/s", "files/s" or "s"

    @property
    def is_time(self) -> bool:
        return self.unit == "s"


@dataclasses.dataclass(slots=True)
class MountInfo:
    path: Path
    pid: int | None = None
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
        self.server: SeaweedServer | None = None
        self._client: S3Client | None = None
        self.mounts: list[MountInfo] = []
        self.failures: list[str] = []
        self.drop_error: str | None = None
        self.drops = 0
        self.source: Path | None = None
        self.rss_peak_mib: list[float] = []
        self.rss_before_mib: list[float] = []
        self.rss_hwm_mib: list[float] = []
        self.write_data_s: list[float] = []  # poolfs seq write: seconds in write(2) calls
        self.write_close_s: list[float] = []  # ... and in close(2) (the upload)
        self.workloads = [
            Workload(READ, f"seq read, {_size(self.size)} object (MB/s)", "MB/s"),
            Workload(WRITE, f"seq write, {_size(self.size)} until durable (MB/s)", "MB/s"),
            Workload(
                CAT, f"cat {args.files:,} x {_size(self.file_size)} files (files/s)", "files/s"
            ),
            Workload(LS1, f"`ls -l` {args.entries:,} entries, first run (s)", "s"),
            Workload(LS2, f"`ls -l` {args.entries:,} entries, second run (s)", "s"),
        ]
        self.results: dict[tuple[str, str], Series] = {
            (w.key, side): Series() for w in self.workloads for side in (BOTO3, POOLFS_SIDE)
        }
        self.env = self._tool_env()

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
            if not k.startswith("AWS_") and k not in ("LANG", "LANGUAGE")
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
        and the mount worker; server: weed)."""
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
        series = self.results[(workload, side)]
        try:
            value, timing = step()
        except Exception as exc:  # recorded; the other workloads still run
            series.errors.append(f"{type(exc).__name__}: {exc}")
            self.fail(f"{workload}/{side}: {exc}")
            return
        series.values.append(value)
        series.client_cpu.append(timing.client_cpu)
        series.server_cpu.append(timing.server_cpu)
        unit = next(w.unit for w in self.workloads if w.key == workload)
        log(
            f"  {workload:5} {side:6} {value:10.3f} {unit:7} wall {timing.wall:7.3f} s, "
            f"cpu client {timing.client_cpu:6.2f} s, server {timing.server_cpu:6.2f} s"
        )

    # --- server and data -------------------------------------------------------------------

    def start_server(self) -> None:
        self.server = SeaweedServer(self.workdir / "weed")
        log(f"starting SeaweedFS ({weed_binary()}) in {self.server.base_dir}")
        self.server.start()
        log(f"SeaweedFS S3 at {self.server.endpoint_url} (pid {self.server.pid})")
        self._client = s3_client(self.server.endpoint_url, timeout=300.0)
        self.client.create_bucket(Bucket=BUCKET)

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
        # The directory poolfs writes into (boto3 writes next to it).
        self.client.put_object(Bucket=BUCKET, Key=PREFIX + "write/", Body=b"")
        small = os.urandom(self.file_size)
        self._put_many([self._small_key(i) for i in range(self.args.files)], small)
        self._put_many([self._entry_key(i) for i in range(self.args.entries)], b"e" * 100)
        log(f"uploaded the data sets in {time.monotonic() - started:.1f} s")
        # Warm the client (connections, paginator and operation models) outside the timings.
        for _ in self.client.get_paginator("list_objects_v2").paginate(
            Bucket=BUCKET, Prefix=PREFIX + "small/", Delimiter="/"
        ):
            break
        self.client.get_object(Bucket=BUCKET, Key=self._small_key(0))["Body"].read()
        self.client.head_object(Bucket=BUCKET, Key=PREFIX + "read/big.bin")

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

    # --- mounts ----------------------------------------------------------------------------

    def mount(self, name: str) -> MountInfo:
        assert self.server is not None
        path = self.workdir / "mnt" / name
        path.mkdir(parents=True)
        info = MountInfo(path)
        self.mounts.append(info)  # before mounting: cleanup must see a half-made mount too
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
            str(self.workdir / "logs" / f"{name}.log"),
        ]
        if self.size > POOLFS_MAX_FILE:
            cmd += ["--max-file-size", str(self.size)]
        cmd += self.args.mount_option
        started = time.perf_counter()
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env=self.env, timeout=120, check=False
        )
        info.ready_seconds = time.perf_counter() - started
        # The worker is found by its command line (`poolfs mount ... MOUNTPOINT --foreground`):
        # the mountpoint is unique to this run, and this needs no poolfs internals.
        pids = worker_pids(str(path))
        info.pid = pids[0] if len(pids) == 1 else None
        if proc.returncode != 0 or find_mount(str(path)) is None:
            reason = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
            raise BenchFailure(f"poolfs mount on {path} failed ({proc.returncode}): {reason}")
        if info.pid is None:
            raise BenchFailure(f"no single worker process for the mount on {path}: {pids}")
        return info

    def umount(self, info: MountInfo) -> None:
        """`poolfs umount`; if that fails, `fusermount -uz`; a lingering worker of this mount
        gets SIGTERM, then SIGKILL. Failures are recorded, never raised."""
        mp = str(info.path)
        if find_mount(mp) is not None:
            try:
                proc = subprocess.run(
                    [*POOLFS, "umount", mp, "--timeout", "300"],
                    capture_output=True,
                    text=True,
                    env=self.env,
                    timeout=330,
                    check=False,
                )
                if proc.returncode != 0:
                    self.fail(f"poolfs umount {mp}: {proc.stderr.strip() or proc.returncode}")
            except subprocess.TimeoutExpired:
                self.fail(f"poolfs umount {mp} timed out")
            if find_mount(mp) is not None:
                log(f"falling back to fusermount -uz {mp}")
                subprocess.run(["fusermount", "-uz", mp], capture_output=True, check=False)
                if find_mount(mp) is not None:
                    self.fail(f"{mp} is still mounted")
        pids = set(worker_pids(mp))
        if info.pid is not None:
            pids.add(info.pid)
        for pid in sorted(pids):
            self._stop_worker(pid, mp)

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
    def mounted(self, name: str) -> Iterator[MountInfo]:
        info = self.mount(name)
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

    # --- workloads: poolfs ---------------------------------------------------------------------

    def poolfs_read(self, run: int) -> tuple[float, Timing]:
        with self.mounted(f"read-{run}") as m:
            assert m.pid is not None
            self.drop_caches()
            before = status_kib(m.pid, "VmRSS") or 0
            with RssSampler(m.pid) as rss, self.meter(m.pid) as t:
                proc = self.run_tool(
                    ["dd", f"if={m.path / 'read' / 'big.bin'}", "of=/dev/null", "bs=1M"]
                )
            hwm = status_kib(m.pid, "VmHWM") or 0
        _expect(_dd_bytes(proc.stderr), self.size, "bytes read by dd")
        self.rss_before_mib.append(before / 1024)
        self.rss_peak_mib.append(rss.peak_kib / 1024)
        self.rss_hwm_mib.append(hwm / 1024)
        return self.size / t.wall / MB, t

    def poolfs_write(self, run: int) -> tuple[float, Timing]:
        assert self.source is not None
        name = f"poolfs-{run}.bin"
        with self.mounted(f"write-{run}") as m:
            self.drop_caches()
            with self.meter(m.pid) as t:
                written, close_s = self.copy_source_to(m.path / "write" / name)
        _expect(written, self.size, "bytes written")
        self.write_close_s.append(close_s)
        self.write_data_s.append(t.wall - close_s)
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

    def poolfs_cat(self, run: int) -> tuple[float, Timing]:
        with self.mounted(f"cat-{run}") as m:
            self.drop_caches()
            with self.meter(m.pid) as t:
                # One process: the shell expands the glob (one readdir), cat reads every file.
                proc = self.run_tool(
                    ["sh", "-c", 'exec cat -- "$1"/*', "sh", str(m.path / "small")]
                )
        _expect(len(proc.stdout), self.args.files * self.file_size, "bytes from cat")
        return self.args.files / t.wall, t

    def poolfs_ls(self, run: int) -> tuple[tuple[float, Timing], tuple[float, Timing]]:
        out: list[tuple[float, Timing]] = []
        with self.mounted(f"ls-{run}") as m:
            self.drop_caches()
            for _ in range(2):  # first run on the fresh mount, then again immediately
                with self.meter(m.pid) as t:
                    proc = self.run_tool(["ls", "-l", str(m.path / "many")])
                _expect(proc.stdout.count(b"\n") - 1, self.args.entries, "entries from ls -l")
                out.append((t.wall, t))
        return out[0], out[1]

    # --- driver ----------------------------------------------------------------------------

    def run(self) -> None:
        runs = self.args.runs
        for run in range(1, runs + 1):
            log(f"seq read, run {run}/{runs}")
            self.record(READ, BOTO3, self.boto3_read)
            self.record(READ, POOLFS_SIDE, functools.partial(self.poolfs_read, run))
        for run in range(1, runs + 1):
            log(f"seq write, run {run}/{runs}")
            self.record(WRITE, BOTO3, functools.partial(self.boto3_write, run))
            self.record(WRITE, POOLFS_SIDE, functools.partial(self.poolfs_write, run))
        for run in range(1, runs + 1):
            log(f"cat of small files, run {run}/{runs}")
            self.record(CAT, BOTO3, self.boto3_cat)
            self.record(CAT, POOLFS_SIDE, functools.partial(self.poolfs_cat, run))
        for run in range(1, runs + 1):
            log(f"ls -l, run {run}/{runs}")
            self.drop_caches()
            self.record(LS1, BOTO3, self.boto3_list)
            self.record(LS2, BOTO3, self.boto3_list)
            self._poolfs_ls(run)

    def _poolfs_ls(self, run: int) -> None:
        try:
            first, second = self.poolfs_ls(run)
        except Exception as exc:
            for key in (LS1, LS2):
                self.results[(key, POOLFS_SIDE)].errors.append(str(exc))
            self.fail(f"ls/poolfs: {exc}")
            return
        self.record(LS1, POOLFS_SIDE, lambda: first)
        self.record(LS2, POOLFS_SIDE, lambda: second)

    def profile(self, out_dir: Path) -> None:
        """Unmeasured extra seq read and seq write with py-spy attached to the worker."""
        assert self.source is not None
        py_spy = shutil.which("py-spy", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
        if py_spy is None:
            self.fail("--profile: py-spy not found (pip install py-spy into the venv)")
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in ("seq-read", "seq-write"):
            with self.mounted(f"profile-{name}") as m:
                dest = m.path / "write" / "prof.bin"
                big = m.path / "read" / "big.bin"
                step: Callable[[], object] = functools.partial(self.copy_source_to, dest)
                if name == "seq-read":
                    step = functools.partial(
                        self.run_tool, ["dd", f"if={big}", "of=/dev/null", "bs=1M"]
                    )
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
            log(f"profile {name}: {self.size / t.wall / MB:.0f} MB/s under py-spy -> {raw}")
            if raw.exists():
                (out_dir / f"{name}-summary.txt").write_text(summarize_profile(raw))
        with contextlib.suppress(botocore.exceptions.ClientError):
            self.client.delete_object(Bucket=BUCKET, Key=PREFIX + "write/prof.bin")

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

    # --- report ----------------------------------------------------------------------------

    def report(self, facts: dict[str, str]) -> str:
        now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
        lines = [
            f"poolfs vs direct boto3, SeaweedFS on 127.0.0.1, {now}, "
            f"median of {self.args.runs} run(s)",
            "",
            "| workload | direct boto3 | poolfs | ratio |",
            "|---|---:|---:|---:|",
        ]
        for w in self.workloads:
            bs, ps = self.results[(w.key, BOTO3)], self.results[(w.key, POOLFS_SIDE)]
            b, p = bs.median(), ps.median()
            ratio = "-"
            if b is not None and p is not None and b > 0 and p > 0:
                ratio = f"{(b / p if w.is_time else p / b):.2f}x"
            cells = f"{_fmt(b, w, bool(bs.errors))} | {_fmt(p, w, bool(ps.errors))}"
            lines.append(f"| {w.label} | {cells} | {ratio} |")
        lines.append("")
        lines.append(
            "Ratio: poolfs speed relative to direct boto3, higher is better (for `ls -l`: "
            "boto3 seconds / poolfs seconds)."
        )
        lines.append("")
        if self.rss_peak_mib:
            lines.append(
                "- poolfs worker RSS during seq read: peak "
                f"{statistics.median(self.rss_peak_mib):.0f} MiB "
                f"(median; runs: {_join(self.rss_peak_mib, '.0f')}), "
                f"{statistics.median(self.rss_before_mib):.0f} MiB just before the read; "
                f"VmHWM {_join(self.rss_hwm_mib, '.0f')} MiB"
            )
        else:
            lines.append("- poolfs worker RSS during seq read: not measured (seq read failed)")
        if self.write_close_s:
            lines.append(
                "- poolfs seq write, time in write(2) calls (staging) / in close(2) (upload): "
                f"{statistics.median(self.write_data_s):.2f} s / "
                f"{statistics.median(self.write_close_s):.2f} s (median)"
            )
        lines.append("- per run (in order):")
        for w in self.workloads:
            for side in (BOTO3, POOLFS_SIDE):
                s = self.results[(w.key, side)]
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
            "  - CPU s: client = this process + the tool it ran (dd/cat/ls) + the poolfs worker;"
            " server = weed"
        )
        if self.args.mount_option:
            lines.append(f"- extra `poolfs mount` arguments: {' '.join(self.args.mount_option)}")
        if self.drop_error is None:
            lines.append(f"- page caches dropped before every step ({self.drops} times)")
        else:
            lines.append(f"- page caches NOT dropped: {self.drop_error}")
        ready = [m.ready_seconds for m in self.mounts if m.ready_seconds]
        if ready:
            lines.append(
                f"- `poolfs mount` until ready: median {statistics.median(ready):.2f} s over "
                f"{len(ready)} mounts"
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
    if w.is_time:
        return f"{value:.3f} s"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


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
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return {
        "machine": f"nproc {len(os.sched_getaffinity(0))}, {cpu}, kernel {platform.release()}, "
        f"Python {platform.python_version()}, load average at start {load}",
        "software": f"SeaweedFS `{_first_line([weed_binary(), 'version'])}`, boto3 "
        f"{boto3.__version__}, botocore {botocore.__version__}, fusepy "
        f"{importlib.metadata.version('fusepy')} on {_libfuse()}",
    }


def _libfuse() -> str:
    """The libfuse file fusepy loads (e.g. libfuse.so.2.9.9), from this process' maps."""
    import fuse  # noqa: F401  (loads libfuse)

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


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.bench_s3",
        description="poolfs vs direct boto3 on a SeaweedFS server this script starts.",
    )
    p.add_argument("--runs", type=int, default=3, help="runs per workload (median; default 3)")
    p.add_argument("--size-mib", type=float, default=256, help="seq read/write size (256)")
    p.add_argument("--files", type=int, default=1000, help="small files to cat (1000)")
    p.add_argument("--file-kib", type=float, default=4, help="size of each small file (4)")
    p.add_argument("--entries", type=int, default=10_000, help="entries to ls -l (10000)")
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
    p.add_argument("--keep", action="store_true", help="keep the scratch dir (logs) at the end")
    p.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="after the measured runs, profile one extra seq read and seq write of the worker "
        "with py-spy (collapsed stacks + summary in DIR; not part of the table)",
    )
    args = p.parse_args(argv)
    if args.runs < 1 or args.size_mib <= 0 or args.files < 1 or args.entries < 1:
        p.error("--runs, --size-mib, --files and --entries must be positive")
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
    facts["load average at end"] = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(bench.report(facts), flush=True)
    if code:
        return code
    return 1 if bench.failures else 0


if __name__ == "__main__":
    sys.exit(main())
