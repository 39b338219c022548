"""How to ask the catalogue for many entries: one ``$in``, or several sent together.

    python benchmarks/entries_query.py            # 1,000 ids of an 11,000-entry catalogue

On a fresh on-disk server of its own: the same 1,000 random ids (5 rounds, fresh
ids each round) asked for in one ``$in``, in ``$in`` queries of 25 to 200 ids sent
together, and in queries of 100 sent one after the other; then a plain ``find`` of
1,000 entries for scale. Why asyncassets asks for 50 ids per query
(``asyncassets.references.ENTRIES_PER_QUERY``): docs/performance.rst.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this tree's asyncassets

from bson import ObjectId
from pymongo import AsyncMongoClient

from asyncassets.embedded import EmbeddedServer

TOTAL, ASKED, ROUNDS = 11_000, 1_000, 5


async def _ask(files: Any, ids: list[Any], size: int, together: bool) -> int:
    chunks = [ids[i : i + size] for i in range(0, len(ids), size)]
    queries = [files.find({"_id": {"$in": c}}).to_list() for c in chunks]
    if together:
        answers = await asyncio.gather(*queries)
    else:
        answers = [await q for q in queries]
    return sum(len(a) for a in answers)


async def main() -> None:
    with EmbeddedServer() as server:
        client: Any = AsyncMongoClient(server.uri)
        files = client.bench_entries["fs.files"]
        ids = [ObjectId() for _ in range(TOTAL)]
        await files.insert_many(
            {"_id": i, "length": 0, "filename": f"f{n}", "contentType": "image/png"}
            for n, i in enumerate(ids)
        )
        await files.find({}).to_list()  # warm the cache
        cases = [(f"one $in of {ASKED}", ASKED, True)]
        cases += [(f"$in of {s}, sent together", s, True) for s in (25, 50, 100, 200)]
        cases += [("$in of 100, one after the other", 100, False)]
        print(f"{ASKED:,} ids of {TOTAL:,} entries, median of {ROUNDS} rounds")
        for label, size, together in cases:
            times = []
            for _ in range(ROUNDS):
                asked = random.sample(ids, ASKED)
                started = time.perf_counter()
                assert await _ask(files, asked, size, together) == ASKED
                times.append(time.perf_counter() - started)
            print(f"  {label:<34} {statistics.median(times) * 1000:8.0f} ms")
        times = []
        for _ in range(ROUNDS):
            started = time.perf_counter()
            await files.find({}).limit(ASKED).to_list()
            times.append(time.perf_counter() - started)
        print(f"  {'plain find of ' + str(ASKED):<34} {statistics.median(times) * 1000:8.0f} ms")
        await client.close()


if __name__ == "__main__":
    asyncio.run(main())
