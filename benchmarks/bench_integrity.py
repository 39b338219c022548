"""What checksums and gzip compression cost and save: one command, medians of rounds.

    python benchmarks/bench_integrity.py              # 16 MiB files, 5 rounds
    python benchmarks/bench_integrity.py --size 64 --rounds 7
    MONGODB_URI=mongodb://127.0.0.1:27017/ python benchmarks/bench_integrity.py

Two payloads: ``text`` (JSON log lines, compressible) and ``random`` (not).
For each, the median time of ``put``, ``read()``, ``read(verify=True)`` and
``verify()`` on a plain ``FileField`` and on ``FileField(compress="gzip")``,
ratios against the plain ``put``/``read()``, the stored size, and the share of
the in-process SHA-256 (which every upload computes) in a plain ``put``. Contenders
alternate within each round against the same server, so machine noise hits all
alike. Uses ``MONGODB_URI`` when set, else an in-memory embedded server.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this tree's asyncassets

import asyncassets
from asyncassets import Document
from asyncassets.embedded import EmbeddedServer
from asyncassets.fields import FileField

MiB = 1024 * 1024


class BenchFile(Document):
    plain = FileField()
    gzip = FileField(compress="gzip", collection_name="gz")
    meta = {"collection": "bench_files"}


def payloads(size: int) -> dict[str, bytes]:
    rng = random.Random(42)
    lines = []
    total = 0
    while total < size:
        line = (
            json.dumps(
                {
                    "ts": 1_700_000_000 + len(lines),
                    "level": rng.choice(["info", "warn", "error"]),
                    "user": rng.randrange(10_000),
                    "path": f"/animals/{rng.randrange(500)}/photo",
                    "ms": round(rng.random() * 200, 2),
                }
            ).encode()
            + b"\n"
        )
        lines.append(line)
        total += len(line)
    return {"text": b"".join(lines)[:size], "random": rng.randbytes(size)}


async def timed(coro) -> float:
    start = time.perf_counter()
    await coro
    return time.perf_counter() - start


async def one_round(data: bytes, results: dict[str, list[float]], sizes: dict[str, int]) -> None:
    doc = BenchFile()
    results["plain put"].append(await timed(doc.plain.put(data)))
    results["gzip put"].append(await timed(doc.gzip.put(data)))
    await doc.save()
    results["plain read()"].append(await timed(doc.plain.read()))
    results["plain read(verify=True)"].append(await timed(doc.plain.read(verify=True)))
    results["plain verify()"].append(await timed(doc.plain.verify()))
    results["gzip read()"].append(await timed(doc.gzip.read()))
    results["gzip read(verify=True)"].append(await timed(doc.gzip.read(verify=True)))
    results["gzip verify()"].append(await timed(doc.gzip.verify()))
    files = await asyncassets.get_db()["gz.files"].find_one({"_id": doc.gzip.file_id})
    sizes["gzip"] = files["length"]
    await doc.delete()


async def bench(uri: str, size: int, rounds: int) -> dict[str, dict]:
    asyncassets.connect(host=uri, db="asyncassets_bench_integrity")
    db = asyncassets.get_db()
    await db.client.drop_database(db.name)
    report: dict[str, dict] = {}
    try:
        for name, data in payloads(size).items():
            results: dict[str, list[float]] = {
                k: []
                for k in (
                    "plain put",
                    "gzip put",
                    "plain read()",
                    "plain read(verify=True)",
                    "plain verify()",
                    "gzip read()",
                    "gzip read(verify=True)",
                    "gzip verify()",
                )
            }
            sizes: dict[str, int] = {}
            await one_round(data, {k: [] for k in results}, sizes)  # warm-up
            for _ in range(rounds):
                await one_round(data, results, sizes)
            sha = []
            for _ in range(rounds):
                start = time.perf_counter()
                hashlib.sha256(data).hexdigest()
                sha.append(time.perf_counter() - start)
            med = {k: statistics.median(v) for k, v in results.items()}
            report[name] = {
                "median_s": med,
                "stored_ratio_gzip": sizes["gzip"] / len(data),
                "sha256_share_of_plain_put": statistics.median(sha) / med["plain put"],
            }
    finally:
        await db.client.drop_database(db.name)
        await asyncassets.disconnect()
    return report


def show(report: dict[str, dict], size: int, rounds: int) -> None:
    print(f"\n{size // MiB} MiB per file, median of {rounds} rounds\n")
    for name, entry in report.items():
        med = entry["median_s"]
        print(f"payload: {name}")
        print(f"  {'operation':<26}{'median':>10}{'MB/s':>9}{'ratio':>8}")
        for op, seconds in med.items():
            base = med["plain put"] if "put" in op else med["plain read()"]
            print(
                f"  {op:<26}{seconds * 1000:>8.1f}ms{size / MiB / seconds:>9.0f}"
                f"{seconds / base:>8.2f}"
            )
        print(f"  stored size with gzip: {entry['stored_ratio_gzip']:.1%} of the original")
        print(f"  SHA-256 share of a plain put: {entry['sha256_share_of_plain_put']:.1%}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=16, help="MiB per file (default 16)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    size = args.size * MiB
    uri = os.environ.get("MONGODB_URI")
    server = None
    if not uri:
        server = EmbeddedServer().start()
        uri = server.uri
    try:
        report = asyncio.run(bench(uri, size, args.rounds))
    finally:
        if server is not None:
            server.stop()
    show(report, size, args.rounds)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
