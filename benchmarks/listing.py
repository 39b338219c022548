"""Listing 1,000 documents with their file metadata: the entries loaded with the
documents (the default) against a naive loop of ``load()`` after ``no_files()``."""

from __future__ import annotations

import gc
from typing import Any

from _harness import CommandCounter, Progress, Timer, median
from _models import BenchFile


async def run(
    count: int, rounds: int, counter: CommandCounter, progress: Progress
) -> dict[str, Any]:
    await BenchFile.objects(name="listing").delete()
    for i in range(count):
        d = BenchFile(name="listing", n=i)
        await d.f.put(b"x" * (i % 50 + 1), content_type="text/plain", filename=f"f{i}.txt")
        await d.save()
    progress(f"  listing: stored {count} documents with a file each")

    async def batch() -> int:
        docs = await BenchFile.objects(name="listing").to_list()
        return sum(d.f.length for d in docs)

    async def naive() -> int:
        total = 0
        for d in await BenchFile.objects(name="listing").no_files().to_list():
            await d.f.load()
            total += d.f.length
        return total

    rows = []
    expected = sum(i % 50 + 1 for i in range(count))
    cases = (("entries with the documents", batch), ("naive loop: await d.f.load()", naive))
    for name, fn in cases:
        counter.reset()
        assert await fn() == expected
        commands = counter.summary()
        files_queries = sum(
            k
            for (cmd, coll), k in counter.commands.items()
            if coll.endswith(".files") and cmd == "find"
        )
        files_getmores = sum(
            k
            for (cmd, coll), k in counter.commands.items()
            if coll.endswith(".files") and cmd == "getMore"
        )
        times = []
        for _ in range(rounds):
            gc.collect()
            with Timer() as t:
                await fn()
            times.append(t.seconds)
        rows.append(
            {
                "case": name,
                "documents": count,
                "commands_total": sum(commands.values()),
                "files_queries": files_queries,
                "files_getmores": files_getmores,
                "commands": commands,
                "median_ms": median(times) * 1000,
            }
        )
    await BenchFile.objects(name="listing").delete()
    return {
        "documents": count,
        "rows": rows,
        "speedup": rows[1]["median_ms"] / rows[0]["median_ms"],
    }
