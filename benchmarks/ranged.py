"""Ranged reads: 1 KiB from the middle of a large file.

Counts, with PyMongo command monitoring, the commands sent and the chunk documents
the server returned, and compares the time with reading one whole chunk.
"""

from __future__ import annotations

import gc
from typing import Any

from _harness import CommandCounter, MiB, Progress, Timer, median
from _models import BenchFile
from gridfs.asynchronous import AsyncGridFSBucket

import asyncassets

KiB = 1024


async def run(
    size: int, rounds: int, counter: CommandCounter, progress: Progress
) -> dict[str, Any]:
    db = asyncassets.get_db()
    raw = AsyncGridFSBucket(db)
    block = bytes(range(256)) * (MiB // 256)
    doc = BenchFile(name="ranged")
    async with doc.f.new_file(filename="big"):
        for _ in range(size // MiB):
            await doc.f.write(block)
    await doc.save()
    progress(f"  ranged: stored a {size // MiB} MiB file")
    fid = doc.f.file_id
    chunk = doc.f.chunk_size
    mid = size // 2 + 100  # not on a chunk boundary
    expected = (block * 2)[mid % MiB : mid % MiB + KiB]

    async def aa_range() -> bytes:
        d = await BenchFile.objects.get(pk=doc.pk)
        return b"".join([p async for p in d.f.stream(start=mid, end=mid + KiB)])

    async def aa_seek_read() -> bytes:
        d = await BenchFile.objects.get(pk=doc.pk)
        d.f.seek(mid)
        return await d.f.read(KiB)

    async def aa_one_chunk() -> bytes:
        d = await BenchFile.objects.get(pk=doc.pk)
        d.f.seek((mid // chunk) * chunk)
        return await d.f.readchunk()

    async def raw_range() -> bytes:
        g = await raw.open_download_stream(fid)
        await g.seek(mid)
        return await g.read(KiB)

    async def raw_one_chunk() -> bytes:
        g = await raw.open_download_stream(fid)
        await g.seek((mid // chunk) * chunk)
        return await g.readchunk()

    cases = {
        "asyncassets stream(start, end)": aa_range,
        "asyncassets seek + read(1 KiB)": aa_seek_read,
        "asyncassets one whole chunk (readchunk)": aa_one_chunk,
        "raw seek + read(1 KiB)": raw_range,
        "raw one whole chunk (readchunk)": raw_one_chunk,
    }
    rows = []
    for name, fn in cases.items():
        counter.reset()
        got = await fn()
        chunks = counter.chunks_returned
        commands = counter.summary()
        if "whole chunk" not in name:
            assert got == expected, f"{name} returned wrong bytes"
        times = []
        for _ in range(rounds):
            gc.collect()
            with Timer() as t:
                await fn()
            times.append(t.seconds)
        rows.append(
            {
                "case": name,
                "chunks_read": chunks,
                "commands": commands,
                "median_ms": median(times) * 1000,
            }
        )
    await doc.delete()
    return {"file_size": size, "chunk_size": chunk, "offset": mid, "rows": rows}
