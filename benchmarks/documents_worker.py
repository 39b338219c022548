"""One contender of the document-layer benchmark, in a process of its own.

    python benchmarks/documents_worker.py CONTENDER URI DB

``CONTENDER`` is ``asyncassets``, ``raw`` (PyMongo's ``AsyncMongoClient``) or
``mongoengine`` (sync, ``mongoengine.connect``). The process reads one JSON
command per line on stdin and answers each with one JSON line on stdout:

``{"op": "load:to_list", "coll": "plain_10000", "n": 10000}``
    times one operation; the answer is ``{"seconds": ..., "cpu_seconds": ...}``, the
    wall time and this process's CPU time (or ``{"error": ...}``).
``{"op": "profile", "inner": {...}, "top": 25}``
    runs one operation under cProfile; the answer has the top of the profile.
``{"op": "quit"}``

The collections are seeded by the parent (``documents.py``); every contender
reads the same ones and writes into collections of its own
(``w_<contender>_<collection>``). Each timed operation starts after ``gc.collect()``.
"""

from __future__ import annotations

import asyncio
import cProfile
import gc
import io
import json
import pstats
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this tree's asyncassets

KINDS = ("plain", "files", "nested")


class Timing:
    """Wall and CPU seconds (this process's) of one timed operation."""

    __slots__ = ("cpu", "wall")

    def __init__(self, wall: float, cpu: float) -> None:
        self.wall = wall
        self.cpu = cpu


def _start() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _stop(started: tuple[float, float]) -> Timing:
    return Timing(time.perf_counter() - started[0], time.process_time() - started[1])


def _plain_son(i: int) -> dict[str, Any]:
    return {"name": f"name-{i}", "n": i, "score": i * 0.5}


# -- the document classes of each contender ---------------------------------------------


def _fields(fields_mod: Any, kind: str, file_field: Any, embedded: Any) -> dict[str, Any]:
    f = fields_mod
    attrs: dict[str, Any] = {
        "name": f.StringField(),
        "n": f.IntField(),
        "score": f.FloatField(),
    }
    if kind == "files":
        attrs["f"] = file_field()
    if kind == "nested":
        author, item = embedded
        attrs["tags"] = f.ListField(f.StringField())
        attrs["author"] = f.EmbeddedDocumentField(author)
        attrs["items"] = f.EmbeddedDocumentListField(item)
    return attrs


def _classes(base: Any, embedded_base: Any, fields_mod: Any, file_field: Any) -> Any:
    """A factory of document classes, one per (kind, collection), cached."""
    author = type(
        f"Author{base.__name__}",
        (embedded_base,),
        {"name": fields_mod.StringField(), "email": fields_mod.StringField()},
    )
    item = type(
        f"Item{base.__name__}",
        (embedded_base,),
        {"sku": fields_mod.StringField(), "qty": fields_mod.IntField()},
    )
    cache: dict[str, Any] = {}

    def get(coll: str) -> Any:
        if coll not in cache:
            attrs = _fields(fields_mod, _kind_of(coll), file_field, (author, item))
            attrs["meta"] = {"collection": coll, "indexes": ["n"]}
            cache[coll] = type(f"D_{coll}", (base,), attrs)
        return cache[coll]

    return get


def _kind_of(coll: str) -> str:
    """``plain_1000`` and ``w_raw_plain_1000`` hold "plain" documents."""
    for kind in KINDS:
        if coll.startswith(f"{kind}_") or f"_{kind}_" in coll:
            return kind
    raise ValueError(f"no document kind in collection name {coll!r}")


# -- the contenders -----------------------------------------------------------------------


class Contender:
    """What every contender does; ``op`` names map to methods ``op_<name>``."""

    name = ""

    def run(self, cmd: dict[str, Any]) -> Timing:
        raise NotImplementedError

    def close(self) -> None:
        """Release the client (and the event loop)."""


class AsyncContender(Contender):
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()

    def run(self, cmd: dict[str, Any]) -> Timing:
        fn = getattr(self, "op_" + cmd["op"].replace(":", "_"))
        result: Timing = self.loop.run_until_complete(fn(cmd))
        return result

    async def _close(self) -> None:
        pass

    def close(self) -> None:
        self.loop.run_until_complete(self._close())
        self.loop.close()


def _new_son(kind: str, i: int) -> dict[str, Any]:
    son = _plain_son(i)
    if kind == "nested":
        son.update(_nested_extra(i))
    return son


def _nested_extra(i: int) -> dict[str, Any]:
    return {
        "tags": [f"t{i % 7}", f"t{i % 11}", f"t{i % 13}", "common", "x"],
        "author": {"name": f"author-{i % 50}", "email": f"a{i % 50}@example.org"},
        "items": [{"sku": f"sku-{i}-{k}", "qty": k} for k in range(3)],
    }


class Raw(AsyncContender):
    """PyMongo's async API, no document layer: dicts in, dicts out."""

    name = "raw"

    def __init__(self, uri: str, db: str) -> None:
        super().__init__()
        from pymongo import AsyncMongoClient

        self.client: Any = AsyncMongoClient(uri)
        self.db = self.client[db]

    async def _close(self) -> None:
        await self.client.close()

    async def op_load_to_list(self, cmd: dict[str, Any]) -> Timing:
        coll = self.db[cmd["coll"]]
        t = _start()
        docs = await coll.find().to_list()
        t = _stop(t)
        assert len(docs) == cmd["n"], len(docs)
        return t

    async def op_load_to_list_no_files(self, cmd: dict[str, Any]) -> Timing:
        return await self.op_load_to_list(cmd)

    async def op_load_content_types(self, cmd: dict[str, Any]) -> Timing:
        coll = self.db[cmd["coll"]]
        t = _start()
        docs = await coll.find().to_list()
        # What a careful hand-written listing does: $in queries for the entries, 50
        # ids each, sent together (one $in of 1,000 ids takes seconds on the test
        # server; see docs/performance.rst), as asyncassets sends them.
        ids = [d["f"] for d in docs]
        files = self.db["fs.files"]
        answers = await asyncio.gather(
            *(
                files.find({"_id": {"$in": ids[i : i + 50]}}).to_list()
                for i in range(0, len(ids), 50)
            )
        )
        entries = {e["_id"]: e for answer in answers for e in answer}
        types = [entries[d["f"]]["contentType"] for d in docs]
        t = _stop(t)
        assert len(types) == cmd["n"] and types[0] == "image/png"
        return t

    async def op_load_iterate(self, cmd: dict[str, Any]) -> Timing:
        coll = self.db[cmd["coll"]]
        n = 0
        t = _start()
        async for _doc in coll.find():
            n += 1
        t = _stop(t)
        assert n == cmd["n"]
        return t

    async def op_load_only(self, cmd: dict[str, Any]) -> Timing:
        coll = self.db[cmd["coll"]]
        t = _start()
        docs = await coll.find({}, {"name": 1}).to_list()
        t = _stop(t)
        assert len(docs) == cmd["n"]
        return t

    async def op_load_first(self, cmd: dict[str, Any]) -> Timing:
        coll = self.db[cmd["coll"]]
        t = _start()
        for i in range(cmd["calls"]):
            doc = await coll.find_one({"n": i})
            assert doc is not None
        return _stop(t)

    async def op_load_get(self, cmd: dict[str, Any]) -> Timing:
        coll = self.db[cmd["coll"]]
        ids = [d["_id"] for d in await coll.find({}, {"_id": 1}).limit(cmd["calls"]).to_list()]
        t = _start()
        for oid in ids:
            # get() checks there is exactly one: the equivalent asks for two.
            docs = await coll.find({"_id": oid}).limit(2).to_list()
            assert len(docs) == 1
        return _stop(t)

    async def _fresh(self, cmd: dict[str, Any]) -> Any:
        coll = self.db[cmd["coll"]]
        await coll.drop()
        await coll.create_index("n")
        return coll

    async def op_write_save_new(self, cmd: dict[str, Any]) -> Timing:
        coll = await self._fresh(cmd)
        kind = _kind_of(cmd["coll"])
        t = _start()
        for i in range(cmd["n"]):
            await coll.insert_one(_new_son(kind, i))
        return _stop(t)

    async def op_write_save_changed(self, cmd: dict[str, Any]) -> Timing:
        coll = self.db[cmd["coll"]]
        docs = await coll.find().to_list()
        assert len(docs) == cmd["n"], (len(docs), cmd)
        t = _start()
        for doc in docs:
            doc["score"] = doc["score"] + 1.0
            await coll.update_one({"_id": doc["_id"]}, {"$set": {"score": doc["score"]}})
        return _stop(t)

    async def op_write_update(self, cmd: dict[str, Any]) -> Timing:
        coll = self.db[cmd["coll"]]
        ids = [d["_id"] for d in await coll.find({}, {"_id": 1}).to_list()]
        assert len(ids) == cmd["n"]
        t = _start()
        for oid in ids:
            await coll.update_one({"_id": oid}, {"$inc": {"n": 1}})
        return _stop(t)

    async def op_write_delete(self, cmd: dict[str, Any]) -> Timing:
        coll = self.db[cmd["coll"]]
        docs = await coll.find().to_list()
        assert len(docs) == cmd["n"]
        t = _start()
        for doc in docs:
            await coll.delete_one({"_id": doc["_id"]})
        return _stop(t)

    async def op_write_bulk_insert(self, cmd: dict[str, Any]) -> Timing:
        coll = await self._fresh(cmd)
        kind = _kind_of(cmd["coll"])
        sons = [_new_son(kind, i) for i in range(cmd["n"])]
        t = _start()
        await coll.insert_many(sons)
        return _stop(t)


class AsyncAssets(AsyncContender):
    name = "asyncassets"

    def __init__(self, uri: str, db: str) -> None:
        super().__init__()
        import asyncassets
        from asyncassets import Document, EmbeddedDocument, fields

        asyncassets.connect(host=uri, db=db)
        self.cls = _classes(Document, EmbeddedDocument, fields, fields.FileField)

    async def _close(self) -> None:
        import asyncassets

        await asyncassets.disconnect()

    def _doc(self, cls: Any, kind: str, i: int) -> Any:
        son = _new_son(kind, i)
        if kind == "nested":
            son["author"] = cls.author.document_type(**son["author"])
            son["items"] = [cls.items.field.document_type(**x) for x in son["items"]]
        return cls(**son)

    async def op_load_to_list(self, cmd: dict[str, Any]) -> Timing:
        cls = self.cls(cmd["coll"])
        t = _start()
        docs = await cls.objects.to_list()
        t = _stop(t)
        assert len(docs) == cmd["n"]
        return t

    async def op_load_to_list_no_files(self, cmd: dict[str, Any]) -> Timing:
        cls = self.cls(cmd["coll"])
        t = _start()
        docs = await cls.objects.no_files().to_list()
        t = _stop(t)
        assert len(docs) == cmd["n"]
        return t

    async def op_load_content_types(self, cmd: dict[str, Any]) -> Timing:
        cls = self.cls(cmd["coll"])
        t = _start()
        docs = await cls.objects.to_list()  # the entries come with the documents
        types = [doc.f.content_type for doc in docs]
        t = _stop(t)
        assert len(types) == cmd["n"] and types[0] == "image/png"
        return t

    async def op_load_iterate(self, cmd: dict[str, Any]) -> Timing:
        cls = self.cls(cmd["coll"])
        n = 0
        t = _start()
        async for _doc in cls.objects:
            n += 1
        t = _stop(t)
        assert n == cmd["n"]
        return t

    async def op_load_only(self, cmd: dict[str, Any]) -> Timing:
        cls = self.cls(cmd["coll"])
        t = _start()
        docs = await cls.objects.only("name").to_list()
        t = _stop(t)
        assert len(docs) == cmd["n"]
        return t

    async def op_load_first(self, cmd: dict[str, Any]) -> Timing:
        cls = self.cls(cmd["coll"])
        t = _start()
        for i in range(cmd["calls"]):
            doc = await cls.objects(n=i).first()
            assert doc is not None
        return _stop(t)

    async def op_load_get(self, cmd: dict[str, Any]) -> Timing:
        cls = self.cls(cmd["coll"])
        ids = await cls.objects.limit(cmd["calls"]).scalar("pk").to_list()
        t = _start()
        for oid in ids:
            await cls.objects.get(pk=oid)
        return _stop(t)

    async def _fresh(self, cmd: dict[str, Any]) -> Any:
        cls = self.cls(cmd["coll"])
        await cls.drop_collection()
        await cls.ensure_indexes()
        return cls

    async def op_write_save_new(self, cmd: dict[str, Any]) -> Timing:
        cls = await self._fresh(cmd)
        kind = _kind_of(cmd["coll"])
        t = _start()
        for i in range(cmd["n"]):
            await self._doc(cls, kind, i).save()
        return _stop(t)

    async def op_write_save_changed(self, cmd: dict[str, Any]) -> Timing:
        cls = self.cls(cmd["coll"])
        docs = await cls.objects.to_list()
        assert len(docs) == cmd["n"]
        t = _start()
        for doc in docs:
            doc.score += 1.0
            await doc.save()
        return _stop(t)

    async def op_write_update(self, cmd: dict[str, Any]) -> Timing:
        cls = self.cls(cmd["coll"])
        docs = await cls.objects.only("pk").to_list()
        assert len(docs) == cmd["n"]
        t = _start()
        for doc in docs:
            await doc.update(inc__n=1)
        return _stop(t)

    async def op_write_delete(self, cmd: dict[str, Any]) -> Timing:
        cls = self.cls(cmd["coll"])
        docs = await cls.objects.to_list()
        assert len(docs) == cmd["n"]
        t = _start()
        for doc in docs:
            await doc.delete()
        return _stop(t)

    async def op_write_bulk_insert(self, cmd: dict[str, Any]) -> Timing:
        cls = await self._fresh(cmd)
        kind = _kind_of(cmd["coll"])
        docs = [self._doc(cls, kind, i) for i in range(cmd["n"])]
        t = _start()
        await cls.objects.insert(docs)
        return _stop(t)


class MongoEngine(Contender):
    """Sync mongoengine on sync PyMongo, as an application would call it."""

    name = "mongoengine"

    def __init__(self, uri: str, db: str) -> None:
        import mongoengine
        from mongoengine import fields

        mongoengine.connect(db=db, host=uri)
        self.cls = _classes(
            mongoengine.Document, mongoengine.EmbeddedDocument, fields, fields.FileField
        )

    def run(self, cmd: dict[str, Any]) -> Timing:
        fn = getattr(self, "op_" + cmd["op"].replace(":", "_"))
        result: Timing = fn(cmd)
        return result

    _doc = AsyncAssets._doc

    def op_load_to_list(self, cmd: dict[str, Any]) -> Timing:
        cls = self.cls(cmd["coll"])
        t = _start()
        docs = list(cls.objects)
        t = _stop(t)
        assert len(docs) == cmd["n"]
        return t

    def op_load_to_list_no_files(self, cmd: dict[str, Any]) -> Timing:
        return self.op_load_to_list(cmd)

    def op_load_content_types(self, cmd: dict[str, Any]) -> Timing:
        cls = self.cls(cmd["coll"])
        t = _start()
        docs = list(cls.objects)
        types = [doc.f.content_type for doc in docs]  # one query per document
        t = _stop(t)
        assert len(types) == cmd["n"] and types[0] == "image/png"
        return t

    def op_load_iterate(self, cmd: dict[str, Any]) -> Timing:
        cls = self.cls(cmd["coll"])
        n = 0
        t = _start()
        for _doc in cls.objects:
            n += 1
        t = _stop(t)
        assert n == cmd["n"]
        return t

    def op_load_only(self, cmd: dict[str, Any]) -> Timing:
        cls = self.cls(cmd["coll"])
        t = _start()
        docs = list(cls.objects.only("name"))
        t = _stop(t)
        assert len(docs) == cmd["n"]
        return t

    def op_load_first(self, cmd: dict[str, Any]) -> Timing:
        cls = self.cls(cmd["coll"])
        t = _start()
        for i in range(cmd["calls"]):
            doc = cls.objects(n=i).first()
            assert doc is not None
        return _stop(t)

    def op_load_get(self, cmd: dict[str, Any]) -> Timing:
        cls = self.cls(cmd["coll"])
        ids = list(cls.objects.limit(cmd["calls"]).scalar("pk"))
        t = _start()
        for oid in ids:
            cls.objects.get(pk=oid)
        return _stop(t)

    def _fresh(self, cmd: dict[str, Any]) -> Any:
        cls = self.cls(cmd["coll"])
        cls.drop_collection()
        cls.ensure_indexes()
        return cls

    def op_write_save_new(self, cmd: dict[str, Any]) -> Timing:
        cls = self._fresh(cmd)
        kind = _kind_of(cmd["coll"])
        t = _start()
        for i in range(cmd["n"]):
            self._doc(cls, kind, i).save()
        return _stop(t)

    def op_write_save_changed(self, cmd: dict[str, Any]) -> Timing:
        cls = self.cls(cmd["coll"])
        docs = list(cls.objects)
        assert len(docs) == cmd["n"]
        t = _start()
        for doc in docs:
            doc.score += 1.0
            doc.save()
        return _stop(t)

    def op_write_update(self, cmd: dict[str, Any]) -> Timing:
        cls = self.cls(cmd["coll"])
        docs = list(cls.objects.only("pk"))
        assert len(docs) == cmd["n"]
        t = _start()
        for doc in docs:
            doc.update(inc__n=1)
        return _stop(t)

    def op_write_delete(self, cmd: dict[str, Any]) -> Timing:
        cls = self.cls(cmd["coll"])
        docs = list(cls.objects)
        assert len(docs) == cmd["n"]
        t = _start()
        for doc in docs:
            doc.delete()
        return _stop(t)

    def op_write_bulk_insert(self, cmd: dict[str, Any]) -> Timing:
        cls = self._fresh(cmd)
        kind = _kind_of(cmd["coll"])
        docs = [self._doc(cls, kind, i) for i in range(cmd["n"])]
        t = _start()
        # load_bulk=False: set the ids on the instances, as asyncassets' insert() does.
        # The default reads every document back with one {_id: {$in: ids}} query, which
        # SecantusDB took about 90 s to answer for 10,000 ids here, stalling the other clients'
        # heartbeats until their pools are reset ("operation cancelled").
        cls.objects.insert(docs, load_bulk=False)
        return _stop(t)


CONTENDERS: dict[str, Callable[[str, str], Contender]] = {
    "asyncassets": AsyncAssets,
    "raw": Raw,
    "mongoengine": MongoEngine,
}


def _profile(contender: Contender, cmd: dict[str, Any]) -> dict[str, Any]:
    gc.collect()
    prof = cProfile.Profile()
    prof.enable()
    timing = contender.run(cmd["inner"])
    prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    stats.sort_stats(cmd.get("sort", "tottime")).print_stats(cmd.get("top", 25))
    return {"seconds": timing.wall, "profile": out.getvalue()}


def main() -> int:
    name, uri, db = sys.argv[1:4]
    contender = CONTENDERS[name](uri, db)
    print(json.dumps({"ready": name}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            contender.close()
            break
        try:
            if cmd["op"] == "profile":
                answer = _profile(contender, cmd)
            else:
                if cmd["op"].startswith("write:"):
                    cmd = {**cmd, "coll": f"w_{name}_{cmd['coll']}"}
                gc.collect()
                timing = contender.run(cmd)
                answer = {"seconds": timing.wall, "cpu_seconds": timing.cpu}
        except Exception as exc:  # reported to the parent, which records it
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(answer), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
