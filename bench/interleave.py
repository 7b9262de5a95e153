"""Interleaved A/B runs of a few workloads: boto3 then poolfs, round after round.

For measuring one change quickly (a minute instead of the full run's seven), on the same
SeaweedFS server and with the same steps as `bench_s3` (a fresh mount per run, page caches
dropped before each step); the worker's environment can be changed for an A/B of settings:

    .venv/bin/python -m bench.interleave --rounds 4 --only read,write
    .venv/bin/python -m bench.interleave --only read --env GLIBC_TUNABLES=glibc.malloc.hugetlb=1
    .venv/bin/python -m bench.interleave --only ttfb --mount-option=--fs-option=part_size=4194304

Prints each run as `bench_s3` does (stderr) and a summary per workload and side (stdout):
median, every run, client and server CPU seconds; for read also the worker's RSS peak, for
write the seconds in write(2) and close(2).
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from bench import bench_s3 as b

STEPS = ("read", "write", "ttfb", "cat", "rand1")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.interleave", description=__doc__)
    p.add_argument("--rounds", type=int, default=3, help="rounds of boto3 then poolfs (3)")
    p.add_argument(
        "--only",
        type=lambda s: [x for x in s.split(",") if x],
        default=["read", "write"],
        help=f"comma-separated workloads: {','.join(STEPS)} (default read,write)",
    )
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set a variable in the mount worker's environment (repeatable)",
    )
    p.add_argument(
        "--mount-option",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for every `poolfs mount` (repeatable)",
    )
    args = p.parse_args(argv)
    bad = [w for w in args.only if w not in STEPS]
    if bad or args.rounds < 1:
        p.error(f"unknown workload {', '.join(bad)}" if bad else "--rounds must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM ends in the cleanup below too (unmount, stop the server), as in bench_s3.
    signal.signal(signal.SIGTERM, b._on_signal)
    bench_args = ["--mounters", b.POOLFS_SIDE, "--only", ",".join(args.only)]
    bench_args += [f"--mount-option={option}" for option in args.mount_option]
    workdir = Path(tempfile.mkdtemp(prefix="poolfs-interleave-", dir="/var/tmp"))
    bench = b.Bench(b.parse_args(bench_args), workdir)
    for setting in args.env:
        name, _, value = setting.partition("=")
        bench.env[name] = value
    try:
        bench.start_server()
        bench.upload_data()
        for r in range(1, args.rounds + 1):
            for key, boto3, mounted in _steps(bench, r):
                if key in args.only:
                    bench.record(key, b.BOTO3, boto3)
                    bench.record(key, b.POOLFS_SIDE, mounted)
        for key in args.only:
            for side in (b.BOTO3, b.POOLFS_SIDE):
                s = bench.results[(key, side)]
                print(
                    f"{key} {side}: median {s.median() or 0:.1f}, runs "
                    f"{[round(v, 1) for v in s.values]}, CPU s client "
                    f"{[round(c, 2) for c in s.client_cpu]}, server "
                    f"{[round(c, 2) for c in s.server_cpu]}"
                )
        if "read" in args.only:
            peaks = bench.results[(b.RSS_READ, b.POOLFS_SIDE)].values
            print(f"poolfs RSS peak during read, MiB: {[round(v, 1) for v in peaks]}")
        if "write" in args.only:
            print(
                f"poolfs seconds in write(2) {[round(v, 2) for v in bench.write_data_s['poolfs']]}"
                f", in close(2) {[round(v, 2) for v in bench.write_close_s['poolfs']]}"
            )
    finally:
        bench.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if bench.failures else 0


def _steps(
    bench: b.Bench, r: int
) -> list[tuple[str, Callable[[], tuple[float, b.Timing]], Callable[[], tuple[float, b.Timing]]]]:
    side = b.POOLFS_SIDE
    return [
        ("read", bench.boto3_read, lambda: bench.mount_read(side, r)),
        ("write", lambda: bench.boto3_write(r), lambda: bench.mount_write(side, r)),
        ("ttfb", bench.boto3_ttfb, lambda: bench.mount_ttfb(side, r)),
        ("cat", bench.boto3_cat, lambda: bench.mount_cat(side, r)),
        ("rand1", lambda: bench.boto3_random(1), lambda: bench.mount_random(side, 1, r)),
    ]


if __name__ == "__main__":
    sys.exit(main())
