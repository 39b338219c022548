"""Asset search with and without a declared index; documents found by their files.

    python benchmarks/assets.py                       # 100,000 assets, 20,000 documents
    python benchmarks/assets.py --assets 20000 --documents 5000 --rounds 3

``search``
    :meth:`AssetManager.search` over ``--assets`` assets in 1,000 galleries (a
    gallery holds 0.1 % of them), on a manager declaring ``indexes=["gallery_id"]``
    and on one declaring none: one gallery as a list, its count, and a sorted page.
    The catalogue entries are written in bulk in the layout ``add()`` writes
    (``add()`` one by one would take minutes and measures nothing of the search);
    a few are added with ``add()`` and must be found alike.
``documents by file``
    ``Animal.objects(<document condition>, photo__<entry condition>)`` (the
    library's two steps, smaller side first) against the same query written by
    hand in two steps (the catalogue's ids, then ``photo: {"$in": ids}``) and as
    one ``$lookup`` pipeline (the documents' condition, the lookup, the file
    condition), on ``--documents`` documents with a photo each: a selective file
    condition (one gallery of 100) with an unselective document one (half the
    documents), the other way round (90 % of the files are images; one genus of
    100), and both selective. The catalogue has an index on
    ``metadata.gallery_id``, the documents one on ``genus``; each case runs
    without, then with, an index on the documents' ``photo``.

Times are the median of ``--rounds`` rounds, contenders alternating; every
contender must return the same documents.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bson import ObjectId

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import embedded_server, fmt_table, loadavg, log, machine, median

import asyncassets
from asyncassets import Document
from asyncassets.assets import AssetManager
from asyncassets.fields import FileField, IntField, StringField
from asyncassets.storage import GridFSStorage

GALLERIES = 1000


class BenchAnimal(Document):
    meta = {"collection": "bench_animals", "indexes": ["genus"]}
    genus = StringField()
    legs = IntField()
    photo = FileField(collection_name="bench_photos")


async def timed(fn: Callable[[], Awaitable[Any]]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = await fn()
    return time.perf_counter() - start, result


async def rounds_of(
    contenders: dict[str, Callable[[], Awaitable[Any]]], rounds: int
) -> dict[str, Any]:
    times: dict[str, list[float]] = {name: [] for name in contenders}
    results: dict[str, Any] = {}
    for _ in range(rounds):
        for name, fn in contenders.items():
            seconds, result = await timed(fn)
            times[name].append(seconds)
            results[name] = result
    first = next(iter(results.values()))
    for name, result in results.items():
        assert result == first, f"{name} returned something else"
    return {name: median(ts) * 1000 for name, ts in times.items()}


def entry(asset_id: str | None, gallery: int, i: int, content_type: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"content_type": content_type, "sha256": "0" * 64,
                            "gallery_id": f"g{gallery}"}
    if asset_id is not None:
        meta["asset_id"] = asset_id
    return {"_id": ObjectId(), "length": 1000 + i % 5000, "chunkSize": 261120,
            "uploadDate": dt.datetime(2026, 1, 1) + dt.timedelta(seconds=i),
            "filename": f"f{i}.jpg", "metadata": meta}


async def bench_search(args: argparse.Namespace) -> dict[str, Any]:
    db = asyncassets.get_db()
    indexed = AssetManager(GridFSStorage("indexed"), indexes=["gallery_id"])
    plain = AssetManager(GridFSStorage("plain"))
    for am in (indexed, plain):
        await am.ensure_indexes()
        files = db[am.catalogue]
        batch = []
        for i in range(args.assets):
            batch.append(entry(f"a{i}", i % GALLERIES, i, "image/jpeg"))
            if len(batch) == 5000:
                await files.insert_many(batch)
                batch = []
        if batch:
            await files.insert_many(batch)
        for k in range(3):
            await am.add(b"real", asset_id=f"real{k}", gallery_id="g7")
    log(f"  search: {args.assets} assets in each catalogue")
    rows, figures = [], {}
    expected = args.assets // GALLERIES + 3
    for label, call in (
        ("gallery_id='g7' (list)", lambda am: am.search(gallery_id="g7").to_list()),
        ("gallery_id='g7' (count)", lambda am: am.search(gallery_id="g7").count()),
        ("gallery_id='g7', sorted -uploaded, page 2 of 20",
         lambda am: am.search(gallery_id="g7").order_by("-uploaded").page(2, 20).to_list()),
    ):
        result = await rounds_of({
            "indexed": lambda call=call: _ids(call(indexed)),
            "no index": lambda call=call: _ids(call(plain)),
        }, args.rounds)
        n = await _len(call(indexed))
        assert n == (expected if "page" not in label else min(20, max(expected - 20, 0))), n
        figures[label] = result
        rows.append([label, f"{result['indexed']:.1f}", f"{result['no index']:.1f}",
                     f"{result['no index'] / result['indexed']:.0f}x"])
    print(fmt_table(["search", "indexed ms", "no index ms", "ratio"], rows))
    return {"figures_ms": figures}


async def _ids(awaitable: Awaitable[Any]) -> Any:
    result = await awaitable
    if isinstance(result, list):
        return sorted(getattr(a, "asset_id", None) or str(a) for a in result)
    return result


async def _len(awaitable: Awaitable[Any]) -> int:
    result = await awaitable
    return len(result) if isinstance(result, list) else int(result)


async def bench_documents(args: argparse.Namespace) -> dict[str, Any]:
    db = asyncassets.get_db()
    files = db["bench_photos.files"]
    await files.create_index("metadata.gallery_id")
    await BenchAnimal.ensure_indexes()
    docs, entries = [], []
    for i in range(args.documents):
        e = entry(None, i % 100, i, "image/jpeg" if i % 10 else "application/pdf")
        entries.append(e)
        docs.append({"genus": f"G{i % 100}", "legs": 4 if i % 2 else 2, "photo": e["_id"]})
        if len(docs) == 5000:
            await files.insert_many(entries)
            await BenchAnimal._get_collection().insert_many(docs)
            docs, entries = [], []
    if docs:
        await files.insert_many(entries)
        await BenchAnimal._get_collection().insert_many(docs)
    log(f"  documents: {args.documents} documents with a photo each")
    animals = BenchAnimal._get_collection()

    async def two_step(doc_query: dict[str, Any], file_query: dict[str, Any]) -> list[Any]:
        ids = [d["_id"] async for d in files.find(file_query, {"_id": 1})]
        return sorted(
            [d["_id"] async for d in animals.find({**doc_query, "photo": {"$in": ids}})]
        )

    async def lookup(doc_query: dict[str, Any], file_query: dict[str, Any]) -> list[Any]:
        pipeline = [
            {"$match": doc_query},
            {"$lookup": {"from": "bench_photos.files", "localField": "photo",
                         "foreignField": "_id", "as": "_photo"}},
            {"$match": {"_photo": {"$elemMatch": file_query}}},
            {"$project": {"_photo": 0}},
        ]
        cursor = await animals.aggregate(pipeline)
        return sorted([d["_id"] async for d in cursor])

    async def library(qs: Any) -> list[Any]:
        return sorted(d.pk for d in await qs.to_list())

    cases = [
        ("selective file condition: gallery g7 (1 %), legs=4 (50 %)",
         {"legs": 4}, {"metadata.gallery_id": "g7"},
         lambda: BenchAnimal.objects(legs=4, photo__metadata__gallery_id="g7")),
        ("selective document condition: genus G7 (1 %), images (90 %)",
         {"genus": "G7"}, {"metadata.content_type": {"$regex": "^image/"}},
         lambda: BenchAnimal.objects(genus="G7", photo__content_type__startswith="image/")),
        ("both selective: genus G7 (1 %), gallery g7 (1 %)",
         {"genus": "G7"}, {"metadata.gallery_id": "g7"},
         lambda: BenchAnimal.objects(genus="G7", photo__metadata__gallery_id="g7")),
    ]
    rows, figures = [], {}
    for indexed in (False, True):
        if indexed:
            await animals.create_index("photo")
        for label, doc_q, file_q, qs in cases:
            label = f"{label}{'; photo indexed' if indexed else ''}"
            result = await rounds_of({
                "asyncassets": lambda qs=qs: library(qs()),
                "hand-written two steps": lambda d=doc_q, f=file_q: two_step(d, f),
                "hand-written $lookup": lambda d=doc_q, f=file_q: lookup(d, f),
            }, args.rounds)
            figures[label] = result
            rows.append([label, *(f"{v:.1f}" for v in result.values())])
    print(fmt_table(["documents by file (ms)", "asyncassets", "two steps", "$lookup"], rows))
    return {"figures_ms": figures}


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"machine": machine(), "loadavg_before": loadavg(),
                           "assets": args.assets, "documents": args.documents,
                           "rounds": args.rounds}
    if not args.skip_search:
        out["search"] = await bench_search(args)
    out["documents_by_file"] = await bench_documents(args)
    out["loadavg_after"] = loadavg()
    return out


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--assets", type=int, default=100_000)
    p.add_argument("--documents", type=int, default=20_000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--skip-search", action="store_true")
    p.add_argument("--json", metavar="PATH", help="also write the figures here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    with embedded_server("2G") as server:
        asyncassets.connect(host=server.uri, db="bench_assets")
        try:
            result = asyncio.run(main_async(args))
        finally:
            asyncio.run(asyncassets.disconnect())
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
