"""Reliability: a model-checked state machine, load, hostile input and injected faults.

The fast part runs in the normal suite; ``-m slow`` selects the long runs (more
Hypothesis examples, a longer load, server kills and stalls).

Every check ends with :func:`assert_consistent`, which compares the database with
what the test knows was committed:

* each stored document's file reads back exactly the bytes last committed to it;
* every file a stored document references exists and is complete (files document
  plus exactly ``ceil(length / chunkSize)`` chunks of the right sizes);
* no chunk lacks its files document;
* the only files no stored document references are those the test allows (files of
  documents not saved yet, or left behind on purpose), and once those are swept,
  none remain.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import time
from collections import Counter
from typing import Any

import pytest
from bson import ObjectId
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from pymongo.errors import PyMongoError

import asyncassets
from asyncassets import Document, FileAlreadyExists, FileConflict
from asyncassets.connection import connect, disconnect, get_db
from asyncassets.fields import FileField, IntField, StringField
from asyncassets.testing import unique_db_name

try:  # the orphan sweep and consistency check (asyncassets.ops)
    from asyncassets import ops
except ImportError:  # pragma: no cover - before ops landed
    ops = None

ALIAS = "reliability"
BUCKET = "relfs"
CHUNK = 1024  # small chunks: multi-chunk files stay cheap

# What the suite did, printed at the end of each test (pytest -s shows it).
STATS: Counter[str] = Counter()


class RelDoc(Document):
    meta = {"collection": "rel_docs", "db_alias": ALIAS}
    name = StringField()
    n = IntField(default=0)
    f = FileField(collection_name=BUCKET, chunk_size=CHUNK)


# -- the invariant -----------------------------------------------------------------


async def bucket_state(db: Any) -> dict[str, Any]:
    files = {d["_id"]: d async for d in db[f"{BUCKET}.files"].find({})}
    chunks: dict[Any, list[tuple[int, int]]] = {}
    async for c in db[f"{BUCKET}.chunks"].find({}, {"files_id": 1, "n": 1, "data": 1}):
        chunks.setdefault(c["files_id"], []).append((c["n"], len(c["data"])))
    docs = {d["_id"]: d async for d in db["rel_docs"].find({})}
    return {"files": files, "chunks": chunks, "docs": docs}


def _complete(files_doc: dict[str, Any], chunks: list[tuple[int, int]]) -> bool:
    length, size = files_doc["length"], files_doc["chunkSize"]
    count = -(-length // size)
    expected = [(n, size if n < count - 1 else length - (count - 1) * size) for n in range(count)]
    return sorted(chunks) == expected


async def assert_consistent(
    expected: dict[Any, bytes | None],
    allowed_orphans: set[Any] = frozenset(),  # type: ignore[assignment]
    *,
    sweep: bool = False,
) -> None:
    """Check the database against ``expected`` (stored document pk -> committed bytes).

    ``allowed_orphans`` are file ids that may exist without a stored document
    referencing them (uploads of unsaved documents). With ``sweep``, the orphan
    sweep runs first (grace 0) and nothing unreferenced may remain afterwards.
    """
    db = get_db(ALIAS)
    if sweep and ops is not None:
        await ops.sweep_orphans(grace=0, buckets=BUCKET, alias=ALIAS)
        STATS["sweeps"] += 1
        allowed_orphans = set()
    state = await bucket_state(db)
    files, chunks, docs = state["files"], state["chunks"], state["docs"]
    assert set(docs) == set(expected), "stored documents differ from the model"
    referenced = set()
    for pk, content in expected.items():
        file_id = docs[pk].get("f")
        if content is None:
            assert file_id is None, f"document {pk} should hold no file, holds {file_id}"
            continue
        assert file_id is not None, f"document {pk} lost its file reference"
        assert file_id in files, f"document {pk} dangles: file {file_id} is missing"
        assert _complete(files[file_id], chunks.get(file_id, [])), f"file {file_id} is partial"
        referenced.add(file_id)
        stored = await RelDoc.objects.get(pk=pk)
        assert await stored.f.read() == content, f"document {pk} reads other bytes"
    orphans = set(files) - referenced
    assert orphans <= set(allowed_orphans), (
        f"unreferenced files left: {orphans - set(allowed_orphans)}"
    )
    stray = set(chunks) - set(files)
    if sweep:
        assert not stray, f"chunks without files document after a sweep: {stray}"
    else:
        assert not stray - set(allowed_orphans), f"chunks without files document: {stray}"
    if ops is not None:
        report = await ops.check(buckets=BUCKET, alias=ALIAS)
        assert report.dangling == 0 and report.corrupt_files == 0, str(report)
        assert report.orphaned_chunks == 0 or not sweep, str(report)
    STATS["invariant checks"] += 1


@contextlib.asynccontextmanager
async def reliability_db(uri: str, name: str, **client_kwargs: Any):
    """Register ``ALIAS`` to a fresh database on ``uri``; drop it afterwards."""
    db_name = unique_db_name(name)
    connect(host=uri, db=db_name, alias=ALIAS, **client_kwargs)
    try:
        yield get_db(ALIAS)
    finally:
        try:
            await asyncassets.get_client(ALIAS).drop_database(db_name)
        except PyMongoError:
            pass  # a killed or stalled server: nothing left to drop
        finally:
            await disconnect(ALIAS)


def report_stats(title: str) -> None:
    print(f"\n[{title}] " + ", ".join(f"{k}: {v}" for k, v in sorted(STATS.items())))


# -- the Hypothesis state machine ---------------------------------------------------

SLOTS = 3
data_st = st.binary(min_size=0, max_size=3 * CHUNK + 7)
pieces_st = st.lists(st.binary(min_size=0, max_size=CHUNK + 3), min_size=0, max_size=4)


class Slot:
    """What the model knows about one document."""

    def __init__(self, doc: RelDoc) -> None:
        self.doc = doc
        self.saved = False
        self.content: bytes | None = None  # what read() must return


class FileMachine(RuleBasedStateMachine):
    """Random operations on a few documents, checked after every step."""

    uri: str = ""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self._db = reliability_db(self.uri, "stateful")
        self.run(self._db.__aenter__())
        self.slots: list[Slot | None] = [Slot(RelDoc(name=str(i))) for i in range(SLOTS)]
        self.discarded: set[Any] = set()  # files of unsaved documents dropped on purpose

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        try:
            self.run(self._check(sweep=True))
        finally:
            try:
                self.run(self._db.__aexit__(None, None, None))
            finally:
                self.loop.close()

    # model helpers

    def _expected(self) -> dict[Any, bytes | None]:
        return {s.doc.pk: s.content for s in self.slots if s is not None and s.saved}

    def _allowed(self) -> set[Any]:
        unsaved = {s.doc.f.file_id for s in self.slots if s is not None and not s.saved}
        return {i for i in unsaved if i is not None} | self.discarded

    async def _check(self, sweep: bool = False) -> None:
        for s in self.slots:
            if s is not None:
                assert await s.doc.f.read() == s.content
        await assert_consistent(self._expected(), self._allowed(), sweep=sweep)

    def _op(self) -> None:
        STATS["stateful operations"] += 1

    # rules

    @rule(i=st.integers(0, SLOTS - 1), name=st.text(max_size=5))
    def create(self, i: int, name: str) -> None:
        if self.slots[i] is None:
            self.slots[i] = Slot(RelDoc(name=name))
            self._op()

    @rule(i=st.integers(0, SLOTS - 1), data=data_st)
    def put(self, i: int, data: bytes) -> None:
        s = self.slots[i]
        if s is None:
            return
        self._op()
        if s.content is not None:
            with pytest.raises(FileAlreadyExists):
                self.run(s.doc.f.put(data))
            return
        self.run(s.doc.f.put(data, content_type="application/octet-stream", i=i))
        s.content = data

    @rule(i=st.integers(0, SLOTS - 1), pieces=pieces_st, ctx=st.booleans())
    def stream_write(self, i: int, pieces: list[bytes], ctx: bool) -> None:
        s = self.slots[i]
        if s is None:
            return
        self._op()
        replace = s.content is not None

        async def go() -> None:
            if ctx:
                async with s.doc.f.new_file(filename="s", replace=replace):
                    for p in pieces:
                        s.doc.f.write(p)  # unawaited, as the seed writes it
            else:
                await s.doc.f.new_file(filename="s", replace=replace)
                for p in pieces:
                    await s.doc.f.write(p)
                await s.doc.f.close()

        self.run(go())
        s.content = b"".join(pieces)

    @rule(i=st.integers(0, SLOTS - 1), pieces=pieces_st, cancel=st.booleans())
    def abort(self, i: int, pieces: list[bytes], cancel: bool) -> None:
        s = self.slots[i]
        if s is None:
            return
        self._op()
        replace = s.content is not None

        async def go() -> None:
            async with s.doc.f.new_file(replace=replace):
                for p in pieces:
                    await s.doc.f.write(p)
                if cancel:
                    raise asyncio.CancelledError
                raise RuntimeError("abandon the upload")

        async def as_task() -> None:
            with contextlib.suppress(asyncio.CancelledError, RuntimeError):
                await asyncio.ensure_future(go())

        self.run(as_task())

    @rule(i=st.integers(0, SLOTS - 1), data=data_st)
    def replace(self, i: int, data: bytes) -> None:
        s = self.slots[i]
        if s is None:
            return
        self._op()
        self.run(s.doc.f.replace(data, content_type="text/plain"))
        s.content = data

    @rule(i=st.integers(0, SLOTS - 1))
    def delete_file(self, i: int) -> None:
        s = self.slots[i]
        if s is None:
            return
        self._op()
        self.run(s.doc.f.delete())
        s.content = None

    @rule(i=st.integers(0, SLOTS - 1))
    def save(self, i: int) -> None:
        s = self.slots[i]
        if s is None:
            return
        self._op()
        s.doc.n += 1
        self.run(s.doc.save())
        s.saved = True

    @rule(i=st.integers(0, SLOTS - 1))
    def reload(self, i: int) -> None:
        s = self.slots[i]
        if s is None or not s.saved:
            return
        self._op()
        self.run(s.doc.reload())

    @rule(i=st.integers(0, SLOTS - 1))
    def delete_document(self, i: int) -> None:
        s = self.slots[i]
        if s is None:
            return
        self._op()
        if s.saved:
            self.run(s.doc.delete())
        elif s.doc.f.file_id is not None:
            self.discarded.add(s.doc.f.file_id)  # an unsaved document dropped: the sweep's job
        self.slots[i] = None

    @precondition(lambda self: sum(s is not None and s.saved for s in self.slots) >= 2)
    @rule(data=st.tuples(data_st, data_st))
    def concurrent_replaces(self, data: tuple[bytes, bytes]) -> None:
        """Two tasks replace the files of two saved documents at once."""
        a, b = [s for s in self.slots if s is not None and s.saved][:2]
        self._op()

        async def go() -> None:
            await asyncio.gather(a.doc.f.replace(data[0]), b.doc.f.replace(data[1]))

        self.run(go())
        a.content, b.content = data

    @invariant()
    def consistent(self) -> None:
        self.run(self._check())


def _run_machine(uri: str, examples: int, steps: int) -> None:
    FileMachine.uri = uri
    run_state_machine_as_test(
        FileMachine,
        settings=settings(
            max_examples=examples,
            stateful_step_count=steps,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        ),
    )
    report_stats("stateful")


def test_random_file_operations_match_the_model(asyncassets_server_uri: str) -> None:
    _run_machine(asyncassets_server_uri, examples=20, steps=15)


@pytest.mark.slow
def test_random_file_operations_match_the_model_long(asyncassets_server_uri: str) -> None:
    _run_machine(asyncassets_server_uri, examples=150, steps=40)


# -- hostile input -------------------------------------------------------------------


class _RaisingFile:
    """A binary file-like whose read() fails after a few pieces."""

    def __init__(self, good: int = 3) -> None:
        self.good = good

    def read(self, n: int = -1) -> bytes:
        if self.good <= 0:
            raise OSError("read failed: disk on fire")
        self.good -= 1
        return b"x" * n


class _StrFile:
    """A file-like whose read() returns bytes a few times, then str."""

    def __init__(self, good: int = 3) -> None:
        self.good = good

    def read(self, n: int = -1) -> bytes | str:
        if self.good <= 0:
            return "text"
        self.good -= 1
        return b"x" * n


async def _snapshot() -> dict[str, Any]:
    state = await bucket_state(get_db(ALIAS))
    return {
        "files": sorted(map(str, state["files"])),
        "chunks": {str(k): sorted(v) for k, v in state["chunks"].items()},
        "docs": state["docs"],
    }


@pytest.fixture
async def hostile(asyncassets_server_uri: str):
    """A saved document with a file, and the database snapshot to compare against."""
    async with reliability_db(asyncassets_server_uri, "hostile"):
        doc = RelDoc(name="victim")
        await doc.f.put(b"original" * 300, content_type="text/plain")
        await doc.save()
        yield doc
        await assert_consistent({doc.pk: b"original" * 300})


HOSTILE_UPLOADS = {
    # name: (call on an empty proxy, expected exception types)
    "metadata key that is not a str": (
        lambda p: p.put(b"x", meta={1: "one"}),
        (TypeError, __import__("bson").errors.InvalidDocument),
    ),
    "metadata over 16 MB": (
        lambda p: p.put(b"x" * 5000, blob=b"0" * (17 << 20)),
        (__import__("pymongo").errors.DocumentTooLarge, ValueError, asyncassets.GridFSError),
    ),
    "read() raises": (lambda p: p.put(_RaisingFile()), (OSError,)),
    "read() returns str": (lambda p: p.put(_StrFile()), (TypeError,)),
    "data is an int": (lambda p: p.put(12345), (TypeError,)),
    "data is str": (lambda p: p.put("text"), (TypeError,)),
    "write() of str without encoding": (
        lambda p: _stream(p, [b"ok" * 600, "text"]),
        (TypeError,),
    ),
    "write() of an int": (lambda p: _stream(p, [b"ok" * 600, 7]), (TypeError,)),
}


async def _stream(proxy: Any, pieces: list[Any]) -> None:
    async with proxy.new_file():
        for p in pieces:
            await proxy.write(p)


@pytest.mark.parametrize("case", sorted(HOSTILE_UPLOADS))
async def test_hostile_upload_fails_clearly_and_changes_nothing(hostile: RelDoc, case: str) -> None:
    call, expected = HOSTILE_UPLOADS[case]
    before = await _snapshot()
    for target in (RelDoc(name="new"), hostile):  # an unsaved document, and a saved one
        proxy = target.f
        if target is hostile:
            # On the saved document, go through replace(): put() refuses anyway.
            def call_on(p: Any, _call: Any = call) -> Any:
                return _call(_ReplaceShim(p))
        else:
            call_on = call
        with pytest.raises(expected) as info:
            await call_on(proxy)
        assert str(info.value), f"{case}: the error says nothing"
        STATS["hostile inputs refused"] += 1
        assert await _snapshot() == before, f"{case}: the database changed"
    assert await hostile.f.read() == b"original" * 300


class _ReplaceShim:
    """Routes put() to replace() and new_file() to new_file(replace=True)."""

    def __init__(self, proxy: Any) -> None:
        self._p = proxy

    def put(self, *a: Any, **kw: Any) -> Any:
        return self._p.replace(*a, **kw)

    def new_file(self, **kw: Any) -> Any:
        return self._p.new_file(replace=True, **kw)

    def write(self, data: Any) -> Any:
        return self._p.write(data)


@pytest.mark.parametrize(
    "metadata",
    [{"$where": "sleep(1000)"}, {"a.b": 1}, {"meta": {"$set": {"x": 1}}}],
    ids=["key starting with $", "key with a dot", "nested $ key"],
)
async def test_metadata_keys_with_dollar_or_dot_are_refused(
    hostile: RelDoc, metadata: dict[str, Any]
) -> None:
    before = await _snapshot()
    doc = RelDoc(name="new")
    try:
        with pytest.raises((ValueError, asyncassets.GridFSError)):
            await doc.f.put(b"x", **metadata)
        assert await _snapshot() == before
    finally:
        await doc.f.delete()


async def test_content_type_must_be_a_str(hostile: RelDoc) -> None:
    before = await _snapshot()
    doc = RelDoc(name="new")
    try:
        with pytest.raises(TypeError):
            await doc.f.put(b"x", content_type=5)
        assert await _snapshot() == before
    finally:
        await doc.f.delete()


@pytest.mark.parametrize(
    "filename", ["../../etc/passwd", "a\\b\\c.txt", "evil\x00name\r\n.txt", "/abs/path"]
)
async def test_hostile_filenames_are_neutralised(hostile: RelDoc, filename: str) -> None:
    """Path separators and control characters never reach the stored file name."""
    doc = RelDoc(name="named")
    try:
        await doc.f.put(b"x", filename=filename)
    except (ValueError, asyncassets.GridFSError) as exc:  # refusing is fine too
        assert str(exc)
        return
    await doc.f.load()
    stored = doc.f.filename or ""
    assert not any(c in stored for c in "/\\\x00\r\n"), f"stored file name {stored!r}"
    STATS["hostile inputs refused"] += 1
    await doc.f.delete()


async def test_wrong_type_file_id_in_query_finds_nothing(hostile: RelDoc) -> None:
    assert await RelDoc.objects(f="not-an-object-id").to_list() == []
    assert await RelDoc.objects(f=12345).count() == 0


@pytest.mark.parametrize(
    "bad", ["not-an-object-id", 12345, ObjectId()], ids=["str", "int", "unknown ObjectId"]
)
async def test_saving_a_reference_to_no_file_is_refused(hostile: RelDoc, bad: Any) -> None:
    doc = RelDoc(name="wrong id")
    before = await _snapshot()
    try:
        with pytest.raises((asyncassets.ValidationError, asyncassets.GridFSError, TypeError)):
            doc.f = bad
            await doc.save()
        assert await _snapshot() == before
    finally:
        if doc.pk is not None:
            await RelDoc._get_collection().delete_one({"_id": doc.pk})


async def test_unsupported_id_type_is_refused_at_assignment(hostile: RelDoc) -> None:
    doc = RelDoc(name="wrong id")
    with pytest.raises(TypeError, match="put"):
        doc.f = {"not": "an id"}


# -- load ------------------------------------------------------------------------------


async def _load(uri: str, tasks: int, seconds: float, seed: int) -> None:
    async with reliability_db(uri, "load"):
        deadline = time.monotonic() + seconds
        committed: dict[Any, bytes | None] = {}
        # Shared documents, replaced by several tasks at once: one wins each round.
        shared = []
        for k in range(5):
            d = RelDoc(name=f"shared{k}")
            await d.f.put(b"s%d" % k)
            await d.save()
            shared.append(d.pk)
        shared_ok: dict[Any, set[bytes]] = {pk: {b"s%d" % k} for k, pk in enumerate(shared)}
        ops_done: Counter[str] = Counter()

        async def stream_into(doc: RelDoc, data: bytes, replace: bool) -> None:
            async with doc.f.new_file(replace=replace, filename="load"):
                for i in range(0, len(data), 700):
                    doc.f.write(data[i : i + 700])
                    await asyncio.sleep(0)

        async def worker(k: int) -> None:
            rng = random.Random(seed * 1000 + k)
            doc: RelDoc | None = None
            content: bytes | None = None
            saved = False
            while time.monotonic() < deadline:
                data = rng.randbytes(rng.choice([0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3000]))
                if doc is None:
                    doc, content, saved = RelDoc(name=f"w{k}"), None, False
                op = rng.choice(
                    [
                        "put",
                        "replace",
                        "stream",
                        "abort",
                        "cancel",
                        "delete",
                        "save",
                        "reload",
                        "read",
                        "range",
                        "drop",
                        "shared",
                    ]
                )
                ops_done[op] += 1
                if op == "put" and content is None:
                    await doc.f.put(data, content_type="x/y", k=k)
                    content = data
                elif op == "replace":
                    await doc.f.replace(data)
                    content = data
                elif op == "stream":
                    await stream_into(doc, data, replace=content is not None)
                    content = data
                elif op == "abort":
                    with contextlib.suppress(RuntimeError):
                        async with doc.f.new_file(replace=content is not None):
                            await doc.f.write(data)
                            raise RuntimeError("abandon")
                elif op == "cancel":
                    task = asyncio.ensure_future(stream_into(doc, data, content is not None))
                    await asyncio.sleep(rng.random() * 0.01)
                    task.cancel()
                    try:
                        await task
                        content = data  # it finished before the cancellation landed
                    except asyncio.CancelledError:
                        pass
                    if saved:
                        # Whatever the cancellation hit, the stored document must read
                        # back the old or the new bytes, complete.
                        fresh = await RelDoc.objects.get(pk=doc.pk)
                        got = await fresh.f.read()
                        assert got in (content, data), "a cancelled upload left other bytes"
                        doc, content = fresh, got
                elif op == "delete":
                    await doc.f.delete()
                    content = None
                elif op == "save":
                    await doc.save()
                    saved = True
                elif op == "reload" and saved:
                    await doc.reload()
                elif op == "read":
                    assert await doc.f.read() == content
                elif op == "range" and content:
                    a = rng.randrange(len(content))
                    b = rng.randrange(a, len(content) + 1)
                    got = b"".join([p async for p in doc.f.stream(start=a, end=b)])
                    assert got == content[a:b]
                elif op == "drop" and saved:
                    await doc.delete()
                    committed.pop(doc.pk, None)
                    doc = None
                    continue
                elif op == "shared":
                    pk = rng.choice(shared)
                    mine = await RelDoc.objects.get(pk=pk)
                    try:
                        await mine.f.replace(data + b"#%d" % k)
                        shared_ok[pk].add(data + b"#%d" % k)
                    except FileConflict:
                        ops_done["shared conflicts"] += 1
                if saved and doc is not None:
                    committed[doc.pk] = content
            if doc is not None and not saved:
                await doc.save()  # leave nothing unsaved, so no orphan is allowed
                committed[doc.pk] = content

        results = await asyncio.gather(*(worker(k) for k in range(tasks)), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        assert not errors, f"{len(errors)} tasks failed, first: {errors[0]!r}"
        for pk in shared:
            stored = await RelDoc.objects.get(pk=pk)
            got = await stored.f.read()
            assert got in shared_ok[pk], "a shared document reads bytes nobody committed"
            committed[pk] = got
        await assert_consistent(committed)
        await assert_consistent(committed, sweep=True)
        STATS["load operations"] += sum(v for k, v in ops_done.items() if k != "shared conflicts")
        STATS["load conflicts"] += ops_done["shared conflicts"]
        STATS["load tasks"] += tasks
    report_stats("load")


async def test_many_concurrent_tasks_keep_every_invariant(asyncassets_server_uri: str) -> None:
    await _load(asyncassets_server_uri, tasks=200, seconds=8, seed=1)


@pytest.mark.slow
async def test_many_concurrent_tasks_keep_every_invariant_long(asyncassets_server_uri: str) -> None:
    await _load(asyncassets_server_uri, tasks=500, seconds=60, seed=2)


# -- faults: a server the test owns, killed or stalled -----------------------------------

BIG = 3 << 20  # with 1 KiB chunks: thousands of inserts, time enough to kill mid-way


@pytest.fixture
def own_server(tmp_path: Any):
    from asyncassets.embedded import EmbeddedServer

    if os.environ.get("MONGODB_URI"):
        pytest.skip("fault injection needs a server the test owns (MONGODB_URI is set)")
    server = EmbeddedServer(tmp_path / "data")
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def _baseline(n: int = 3) -> dict[Any, bytes]:
    committed = {}
    for k in range(n):
        d = RelDoc(name=f"base{k}")
        data = os.urandom(50_000 + k)
        await d.f.put(data, content_type="application/octet-stream")
        await d.save()
        committed[d.pk] = data
    return committed


FAULT_OPS = ["put", "replace", "stream write", "stream read"]


async def _kill_during(server: Any, op: str, delay: float) -> dict[str, Any]:
    """Run ``op``, SIGKILL the server ``delay`` s in, restart it, check everything."""
    db_name = unique_db_name(f"kill_{op}")
    # journal=True: an acknowledged write must survive the kill (SecantusDB, like mongod,
    # may otherwise lose the last acknowledged writes on SIGKILL).
    fast = {"serverSelectionTimeoutMS": 3000, "connectTimeoutMS": 2000, "journal": True}
    connect(host=server.uri, db=db_name, alias=ALIAS, **fast)
    try:
        committed = await _baseline()
        target_pk = next(iter(committed))
        target = await RelDoc.objects.get(pk=target_pk)
        big = os.urandom(BIG)
        new_doc = RelDoc(name="in flight")
        if op == "stream read":  # a file big enough to be mid-stream when the kill lands
            await target.f.replace(big)
            committed[target_pk] = big

        async def victim() -> None:
            if op == "put":
                await new_doc.f.put(big)
                await new_doc.save()
            elif op == "replace":
                await target.f.replace(big)
            elif op == "stream write":
                async with target.f.new_file(replace=True):
                    for i in range(0, BIG, 64 * 1024):
                        await target.f.write(big[i : i + 64 * 1024])
            else:
                got = bytearray()
                async for piece in target.f.stream():
                    got += piece
                    await asyncio.sleep(0.0005)
                assert got == committed[target_pk]

        task = asyncio.ensure_future(victim())
        await asyncio.sleep(delay)
        finished_first = task.done()
        server.kill()
        STATS["faults injected (SIGKILL)"] += 1
        try:
            await asyncio.wait_for(task, 30)
            outcome = "completed"
        except PyMongoError as exc:
            outcome = f"failed: {type(exc).__name__}"
        await disconnect(ALIAS)
        server.start()
        connect(host=server.uri, db=db_name, alias=ALIAS, **fast)
        # What the stored documents say now is what must hold: the target reads its old
        # bytes or, if the switch was acknowledged first, the new ones; never a partial file.
        state = await bucket_state(get_db(ALIAS))
        expected: dict[Any, bytes | None] = {}
        for pk, data in committed.items():
            assert pk in state["docs"], f"a saved document vanished after {op} + SIGKILL"
            stored = await RelDoc.objects.get(pk=pk)
            got = await stored.f.read()
            allowed = (
                (data, big) if pk == target_pk and op in ("replace", "stream write") else (data,)
            )
            assert got in allowed, (
                f"document {pk} lost its bytes after {op} + SIGKILL: reads {len(got or b'')} "
                f"bytes, expected one of {[len(a) for a in allowed]}"
            )
            expected[pk] = got
        for pk in set(state["docs"]) - set(committed):
            stored = await RelDoc.objects.get(pk=pk)
            assert await stored.f.read() == big, "the in-flight document reads partial bytes"
            expected[pk] = big
        # Before the sweep, the killed upload may have left chunks (and no files document).
        await assert_consistent(
            expected, allowed_orphans=set(state["files"]) | set(state["chunks"])
        )
        await assert_consistent(expected, sweep=True)
        return {"outcome": outcome, "finished_before_kill": finished_first}
    finally:
        with contextlib.suppress(PyMongoError):
            await asyncassets.get_client(ALIAS).drop_database(db_name)
        await disconnect(ALIAS)


@pytest.mark.slow
@pytest.mark.parametrize("op", FAULT_OPS)
async def test_sigkill_during_an_operation_loses_nothing(own_server: Any, op: str) -> None:
    outcomes = []
    for delay in (0.05, 0.2, 0.5):
        outcomes.append(await _kill_during(own_server, op, delay))
    print(f"\n[kill during {op}] {outcomes}")
    report_stats("faults")


async def test_sigkill_during_replace_loses_nothing_fast(own_server: Any) -> None:
    """The fast suite's one crash: kill the server in the middle of a replace."""
    await _kill_during(own_server, "replace", 0.15)


async def test_stalled_server_surfaces_as_a_clear_error(own_server: Any) -> None:
    db_name = unique_db_name("stall")
    connect(
        host=own_server.uri,
        db=db_name,
        alias=ALIAS,
        socketTimeoutMS=500,
        serverSelectionTimeoutMS=1000,
        connectTimeoutMS=500,
        retryReads=False,
        retryWrites=False,
    )
    try:
        doc = RelDoc(name="stall")
        await doc.f.put(b"z" * 5000)
        await doc.save()
        pid = own_server.pid
        os.kill(pid, signal.SIGSTOP)
        STATS["faults injected (SIGSTOP)"] += 1
        try:
            t0 = time.monotonic()
            for call in (lambda: doc.f.read(), lambda: doc.f.replace(b"new")):
                with pytest.raises(PyMongoError) as info:
                    await asyncio.wait_for(call(), 20)
                text = str(info.value).lower()
                assert "timed out" in text or "timeout" in text, str(info.value)
            assert time.monotonic() - t0 < 10, "the timeouts were not honoured"
        finally:
            os.kill(pid, signal.SIGCONT)
        await disconnect(ALIAS)
        connect(host=own_server.uri, db=db_name, alias=ALIAS)
        state = await bucket_state(get_db(ALIAS))
        await assert_consistent(
            {doc.pk: b"z" * 5000}, allowed_orphans=set(state["files"]) | set(state["chunks"])
        )
        await assert_consistent({doc.pk: b"z" * 5000}, sweep=True)
    finally:
        with contextlib.suppress(PyMongoError):
            await asyncassets.get_client(ALIAS).drop_database(db_name)
        await disconnect(ALIAS)
