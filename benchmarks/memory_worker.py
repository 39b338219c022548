"""One memory measurement in a fresh process (so one run's heap does not colour the next).

    python benchmarks/memory_worker.py URI DB SIZE_MIB asyncassets|raw

Streams SIZE_MIB in (1 MiB writes from one reused block, so the source holds 1 MiB)
and out again (chunk by chunk, discarding), and prints one JSON line with the peak RSS
growth (sampled every 5 ms) and the tracemalloc peak of each direction.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import MiB, RssSampler
from _models import BenchFile

import asyncassets


async def main(uri: str, db: str, size_mib: int, who: str) -> dict[str, object]:
    asyncassets.connect(host=uri, db=db, alias="default")
    from gridfs.asynchronous import AsyncGridFSBucket

    raw = AsyncGridFSBucket(asyncassets.get_db())
    block = bytes(range(256)) * (MiB // 256)
    # Warm up: connection pool, indexes, imports, so the phases measure streaming only.
    warm = BenchFile(name="warm")
    await warm.f.put(block)
    await warm.f.read()
    await warm.f.delete()
    g = await raw.upload_from_stream("warm", block)
    await (await raw.open_download_stream(g)).read()
    await raw.delete(g)

    result: dict[str, object] = {"size_mib": size_mib, "contender": who}
    tracemalloc.start()
    doc = BenchFile(name="memory")
    fid = None
    for phase in ("in", "out"):
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        t0 = time.perf_counter()
        with RssSampler() as rss:
            if phase == "in" and who == "asyncassets":
                async with doc.f.new_file(filename="big"):
                    for _ in range(size_mib):
                        await doc.f.write(block)
            elif phase == "in":
                gin = raw.open_upload_stream("big")
                for _ in range(size_mib):
                    await gin.write(block)
                await gin.close()
                fid = gin._id
            elif who == "asyncassets":
                n = 0
                async for piece in doc.f.stream():
                    n += len(piece)
                assert n == size_mib * MiB
            else:
                out = await raw.open_download_stream(fid)
                n = 0
                while piece := await out.readchunk():
                    n += len(piece)
                assert n == size_mib * MiB
        seconds = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
        result[phase] = {
            "rss_growth_mib": rss.growth / MiB,
            "tracemalloc_peak_mib": (peak - base) / MiB,
            "seconds": seconds,
            "MBps": size_mib / seconds,
        }
    tracemalloc.stop()
    if who == "asyncassets":
        await doc.f.delete()
    else:
        await raw.delete(fid)
    await asyncassets.disconnect()
    return result


if __name__ == "__main__":
    uri, db, size, who = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    print(json.dumps(asyncio.run(main(uri, db, size, who))))
