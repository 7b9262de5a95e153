"""CPU per S3 request: the S3 store's lean read path vs its botocore client.

Starts its own SeaweedFS on 127.0.0.1 (tests.servers.SeaweedServer), puts one 4 KiB object and
`--keys` 100-byte objects, then times N requests of each kind through `S3Store` twice: with the
lean path (`s3wire.LeanS3`) and with it off (`store.lean = None`: the botocore client, as before
the lean path). CPU is this process' time.process_time(), so it is the client's cost only; the
server runs in its own process. Also times SigV4 signing alone: s3wire.Signer against
botocore.auth.S3SigV4Auth on the same request.

    flock /tmp/bench.lock .venv/bin/python -m bench.bench_wire [--requests 1000] [--keys 1000]

Prints a markdown table to stdout.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

import botocore.auth
import botocore.awsrequest
import botocore.credentials

from poolfs.stores import StoreOptions
from poolfs.stores.s3 import S3Store
from poolfs.stores.s3wire import Signer
from tests.servers import ACCESS_KEY, REGION, SECRET_KEY, SeaweedServer


def _timed(work: Callable[[], object], count: int) -> tuple[float, float]:
    """(CPU us, wall us) per call of `work`, over `count` calls after 20 warm-up calls."""
    for _ in range(min(20, count)):
        work()
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(count):
        work()
    return (
        (time.process_time() - cpu) / count * 1e6,
        (time.perf_counter() - wall) / count * 1e6,
    )


def _signing(count: int) -> tuple[float, float]:
    creds = botocore.credentials.Credentials(ACCESS_KEY, SECRET_KEY)
    frozen = creds.get_frozen_credentials()
    signer = Signer(REGION)
    auth = botocore.auth.S3SigV4Auth(creds, "s3", REGION)

    def own() -> None:
        headers = {"host": "127.0.0.1:8333", "range": "bytes=0-4095"}
        signer.sign("GET", "/bucket/pool/read/file.bin", "", headers, frozen)

    def botocores() -> None:
        request = botocore.awsrequest.AWSRequest(
            method="GET",
            url="http://127.0.0.1:8333/bucket/pool/read/file.bin",
            headers={"Range": "bytes=0-4095"},
        )
        auth.add_auth(request)

    return _timed(own, count)[0], _timed(botocores, count)[0]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000, help="GETs and HEADs (1000)")
    parser.add_argument("--keys", type=int, default=1000, help="keys in the LIST page (1000)")
    parser.add_argument("--pages", type=int, default=50, help="LIST pages to time (50)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; medians (3)")
    args = parser.parse_args(argv)
    os.environ.update({"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY})
    os.environ.setdefault("AWS_DEFAULT_REGION", REGION)
    with tempfile.TemporaryDirectory(prefix="bench-wire-") as tmp, SeaweedServer(tmp) as server:
        server.create_bucket("wire")
        client = server.client()
        client.put_object(Bucket="wire", Key="p/file.bin", Body=os.urandom(4096))
        for i in range(args.keys):
            client.put_object(Bucket="wire", Key=f"p/many/f{i:05d}", Body=b"x" * 100)
        options = StoreOptions(endpoint_url=server.endpoint_url)
        lean = S3Store("wire", "p/", options)
        boto = S3Store("wire", "p/", options)
        assert boto.lean is not None
        boto.lean.close()
        boto.lean = None
        rows: dict[str, dict[str, list[tuple[float, float]]]] = {}
        workloads: dict[str, tuple[Callable[[S3Store], object], int]] = {
            "GET 4 KiB (ranged)": (lambda s: s.get_range("file.bin", 0, 4096), args.requests),
            "HEAD": (lambda s: s.head("file.bin"), args.requests),
            f"LIST page of {args.keys} keys": (lambda s: s.list_all("many/"), args.pages),
        }
        for _ in range(args.rounds):
            for name, (work, count) in workloads.items():
                for side, store in (("botocore", boto), ("lean", lean)):
                    cell = rows.setdefault(name, {}).setdefault(side, [])
                    cell.append(_timed(functools.partial(work, store), count))
        lean.close()
        boto.close()
    own, botos = _signing(20_000)
    print(f"CPU per request, client side (medians of {args.rounds} rounds; SeaweedFS 127.0.0.1)")
    print()
    print(
        "| request | botocore CPU (us) | lean CPU (us) | CPU ratio | botocore wall (us) "
        "| lean wall (us) |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, sides in rows.items():
        b_cpu = statistics.median(c for c, _ in sides["botocore"])
        l_cpu = statistics.median(c for c, _ in sides["lean"])
        b_wall = statistics.median(w for _, w in sides["botocore"])
        l_wall = statistics.median(w for _, w in sides["lean"])
        print(
            f"| {name} | {b_cpu:.0f} | {l_cpu:.0f} | {l_cpu / b_cpu:.2f}x | {b_wall:.0f} "
            f"| {l_wall:.0f} |"
        )
    print(
        f"| SigV4 signing alone | {botos:.1f} (S3SigV4Auth) | {own:.1f} (s3wire.Signer) "
        f"| {own / botos:.2f}x | - | - |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
