"""CPU per UploadPart of 8 MiB: the S3 store's lean path vs its botocore client.

Starts its own SeaweedFS on 127.0.0.1 (tests.servers.SeaweedServer), writes an 8 MiB file and
uploads it `--parts` times per round as parts of one multipart upload through `S3Store`'s
`_S3Upload.put_part`: with the botocore client (`store.lean = None`: SHA-256 of each part to
sign it, as before), with the lean path (unsigned payload + x-amz-checksum-crc32 over http),
and with the lean path without the CRC (what it sends over https). CPU is this process'
time.process_time(), so it is the client's cost only; the server runs in its own process.

    flock /tmp/bench.lock .venv/bin/python -m bench.bench_part [--parts 16] [--rounds 3]

Prints a markdown table to stdout.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence

from poolfs.stores import StoreOptions
from poolfs.stores.s3 import S3Store, _S3Upload
from tests.servers import ACCESS_KEY, REGION, SECRET_KEY, SeaweedServer

PART = 8 * 1024 * 1024


def _round(store: S3Store, fd: int, parts: int) -> tuple[float, float]:
    """(CPU ms, wall ms) per part over `parts` UploadParts of one upload (then aborted)."""
    upload = _S3Upload(store, "part.bin", "p/part.bin", {})
    upload.start()
    upload.put_part(1, fd, 0, PART)  # warm the connection
    cpu, wall = time.process_time(), time.perf_counter()
    for number in range(2, parts + 2):
        upload.put_part(number, fd, 0, PART)
    result = (
        (time.process_time() - cpu) / parts * 1e3,
        (time.perf_counter() - wall) / parts * 1e3,
    )
    upload.abort()
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", type=int, default=16, help="parts per round (16)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; medians (3)")
    args = parser.parse_args(argv)
    os.environ.update({"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY})
    os.environ.setdefault("AWS_DEFAULT_REGION", REGION)
    with tempfile.TemporaryDirectory(prefix="bench-part-") as tmp, SeaweedServer(tmp) as server:
        server.create_bucket("part")
        source = os.path.join(tmp, "part.bin")
        with open(source, "wb") as f:
            f.write(os.urandom(PART))
        fd = os.open(source, os.O_RDONLY)
        options = StoreOptions(endpoint_url=server.endpoint_url)
        boto = S3Store("part", "", options)
        lean = S3Store("part", "", options)
        no_crc = S3Store("part", "", options)
        assert boto.lean is not None
        assert lean.lean is not None
        assert no_crc.lean is not None
        boto.lean.close()
        boto.lean = None
        no_crc.lean._https = True  # the https variant's headers (no CRC), still over http
        sides = {
            "botocore (SHA-256 signed payload)": boto,
            "lean (unsigned + CRC32)": lean,
            "lean (unsigned, no CRC: https)": no_crc,
        }
        rows: dict[str, list[tuple[float, float]]] = {name: [] for name in sides}
        for _ in range(args.rounds):
            for name, store in sides.items():
                rows[name].append(_round(store, fd, args.parts))
        os.close(fd)
        for store in sides.values():
            store.close()
    rounds = f"medians of {args.rounds} rounds of {args.parts}"
    print(f"CPU per 8 MiB UploadPart, client side ({rounds}; SeaweedFS 127.0.0.1)")
    print()
    print("| path | CPU (ms) | wall (ms) |")
    print("|---|---:|---:|")
    for name, cells in rows.items():
        cpu = statistics.median(c for c, _ in cells)
        wall = statistics.median(w for _, w in cells)
        print(f"| {name} | {cpu:.1f} | {wall:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
