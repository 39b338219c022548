"""Many concurrent 1 MiB uploads and downloads on one client.

For N in (100, 500): N tasks start at once, each uploading (then, in a second wave,
downloading) one 1 MiB file. Reported per contender: wall time of the wave, aggregate
throughput, p50/p99 latency of a single operation, the errors raised, and the client's
memory: its resident set at the start of the wave and its peak during it (sampled every
5 ms), so the growth is what the wave's tasks held; divided by N, the memory per
operation in flight (issue #22: at or below raw PyMongo's for 500 uploads). The
contenders alternate round by round, who goes first too: a process's heap, once
grown, is not given back, so the wave that runs first in a round pays for it.
"""

from __future__ import annotations

import asyncio
import gc
import os
import time
from typing import Any

from _harness import MiB, Progress, RssSampler, median, percentile
from _models import BenchFile
from gridfs.asynchronous import AsyncGridFSBucket

import asyncassets


async def _wave(n: int, op: Any) -> dict[str, Any]:
    latencies: list[float] = []
    errors: list[str] = []
    results: list[Any] = [None] * n

    async def one(i: int) -> None:
        t0 = time.perf_counter()
        try:
            results[i] = await op(i)
        except Exception as exc:  # counted and reported, that is the measurement
            errors.append(f"{type(exc).__name__}: {exc}")
            return
        latencies.append(time.perf_counter() - t0)

    gc.collect()
    t0 = time.perf_counter()
    with RssSampler() as rss:
        await asyncio.gather(*(one(i) for i in range(n)))
    wall = time.perf_counter() - t0
    return {
        "rss_start_mib": rss.start_rss / MiB,
        "rss_peak_mib": rss.peak / MiB,
        "rss_growth_mib": rss.growth / MiB,
        "wall_s": wall,
        "MBps": len(latencies) * MiB / MiB / wall,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "errors": len(errors),
        "first_errors": errors[:3],
        "results": results,
    }


async def run(counts: list[int], rounds: int, progress: Progress) -> list[dict[str, Any]]:
    db = asyncassets.get_db()
    raw = AsyncGridFSBucket(db)
    data = os.urandom(MiB)
    out = []
    for n in counts:
        per: dict[str, dict[str, list[dict[str, Any]]]] = {
            "asyncassets": {"upload": [], "download": []},
            "raw": {"upload": [], "download": []},
        }
        for r in range(rounds):
            order = ["raw", "asyncassets"] if r % 2 == 0 else ["asyncassets", "raw"]
            for who in order:
                if who == "asyncassets":
                    docs = [BenchFile(name=f"c{i}", n=i) for i in range(n)]

                    async def up(i: int, docs: list[BenchFile] = docs) -> Any:
                        await docs[i].f.put(data, content_type="application/octet-stream")
                        await docs[i].save()
                        return docs[i]

                    async def down(i: int, docs: list[BenchFile] = docs) -> int:
                        return len(await docs[i].f.read())

                    w_up = await _wave(n, up)
                    w_down = await _wave(n, down)
                    await BenchFile.objects(name__startswith="c").delete()
                else:

                    async def up(i: int) -> Any:
                        return await raw.upload_from_stream(
                            f"c{i}", data, metadata={"contentType": "application/octet-stream"}
                        )

                    w_up = await _wave(n, up)
                    ids = w_up["results"]

                    async def down(i: int, ids: list[Any] = ids) -> int:
                        g = await raw.open_download_stream(ids[i])
                        return len(await g.read())

                    w_down = await _wave(n, down)
                    for fid in ids:
                        if fid is not None:
                            await raw.delete(fid)
                assert all(x == MiB for x in w_down["results"] if x is not None)
                for w in (w_up, w_down):
                    del w["results"]
                per[who]["upload"].append(w_up)
                per[who]["download"].append(w_down)
            progress(f"  concurrency {n}: round {r + 1}/{rounds} done")
        for kind in ("upload", "download"):
            row: dict[str, Any] = {"tasks": n, "op": kind, "rounds": rounds}
            for who in ("asyncassets", "raw"):
                waves = per[who][kind]
                row[who] = {
                    "MBps": median([w["MBps"] for w in waves]),
                    "p50_ms": median([w["p50_ms"] for w in waves]),
                    "p99_ms": median([w["p99_ms"] for w in waves]),
                    "errors": sum(w["errors"] for w in waves),
                    "rss_growth_mib": max(w["rss_growth_mib"] for w in waves),
                    "rss_peak_mib": max(w["rss_peak_mib"] for w in waves),
                    "first_errors": [e for w in waves for e in w["first_errors"]][:3],
                }
            row["ratio"] = row["asyncassets"]["MBps"] / row["raw"]["MBps"]
            out.append(row)
    return out
