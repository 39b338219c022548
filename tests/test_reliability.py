"""Reliability: a model-checked state machine, load, hostile input and injected faults.

The fast part runs in the normal suite; ``-m slow`` selects the long runs (more
Hypothesis examples, a longer load, every server kill point). Racing operations
have a suite of their own, ``tests/test_races.py``.

Server kills (SIGKILL) land while the operation's I/O is provably in flight: an
upload whose first chunks a second client sees in the chunks collection while its
source still holds the rest; a write held by a wrapper before it reaches the server,
or after the server applied it but before its reply is used; a reader holding one
cursor batch of a file larger than that. Each kill records that proof, and a kill
that did not land in flight fails the test. After the restart on the same data:
every committed byte reads back (0 lost bytes), no reference dangles, and the
sweep leaves no orphan.

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
from _consistency import complete as _complete
from _consistency import snapshot_bucket
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
from pymongo import monitoring
from pymongo.errors import PyMongoError

import asyncassets
from asyncassets import Document, FileAlreadyExists, FileConflict
from asyncassets.connection import connect, disconnect, get_db
from asyncassets.fields import FileField, IntField, ListField, StringField
from asyncassets.testing import unique_db_name

try:  # the orphan sweep and consistency check (asyncassets.ops)
    from asyncassets import ops
except ImportError:  # pragma: no cover - before ops landed
    ops = None

ALIAS = "reliability"
BUCKET = "relfs"
CHUNK = 1024  # small chunks: multi-chunk files stay cheap

# What the suite did, printed at the end of each test (pytest -n 0 -s shows it).
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
    with pytest.raises(TypeError, match="a file id or None, not dict"):
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


# -- faults: a server the test owns, killed while I/O is in flight, or stalled ----------


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


@pytest.fixture(scope="module")
def kill_server(tmp_path_factory: Any):
    """One persistent server for the kill tests; each kill restarts it on its data."""
    from asyncassets.embedded import EmbeddedServer

    if os.environ.get("MONGODB_URI"):
        pytest.skip("fault injection needs a server the test owns (MONGODB_URI is set)")
    server = EmbeddedServer(tmp_path_factory.mktemp("kills") / "data")
    server.start()
    try:
        yield server
    finally:
        server.stop()


KCHUNK = 64 * 1024
KBUCKET = "killfs"
#: An upload of 64 chunks: one insert batch (32 chunks, half the 4 MiB stream buffer)
#: reaches the server while the source still holds most of the rest.
UPLOAD = 64 * KCHUNK
BATCH = 32
#: A file of 96 chunks: a reader holds at most one cursor batch (64) of it.
READ = 96 * KCHUNK


class KillDoc(Document):
    meta = {"collection": "kill_docs", "db_alias": ALIAS}
    name = StringField()
    f = FileField(collection_name=KBUCKET, chunk_size=KCHUNK)
    files = ListField(FileField(collection_name=KBUCKET, chunk_size=KCHUNK))


class Gate:
    """Holds the first call of one collection method, before it is sent or after it
    was applied (its reply held), until the test releases it: the kill lands while
    that call is in flight."""

    METHODS = ("insert_one", "insert_many", "update_one", "delete_one", "delete_many")

    def __init__(self) -> None:
        self.target: tuple[str, str, str] | None = None
        self.reached = asyncio.Event()
        self.release = asyncio.Event()

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from pymongo.asynchronous.collection import AsyncCollection

        for name in self.METHODS:
            original = getattr(AsyncCollection, name)
            monkeypatch.setattr(AsyncCollection, name, self._wrap(name, original))

    def arm(self, collection: str, method: str, when: str) -> None:
        self.target = (collection, method, when)

    def _wrap(self, name: str, original: Any) -> Any:
        gate = self

        async def method(coll: Any, *args: Any, **kwargs: Any) -> Any:
            target = gate.target
            if target is None or (target[0], target[1]) != (coll.name, name):
                return await original(coll, *args, **kwargs)
            gate.target = None
            if target[2] == "before":
                gate.reached.set()
                await gate.release.wait()
                return await original(coll, *args, **kwargs)
            result = await original(coll, *args, **kwargs)
            gate.reached.set()
            await gate.release.wait()
            return result

        return method


class SlowSource:
    """An upload source that yields ``KCHUNK`` pieces, and stops after ``stop_after``
    of them until released: the rest of the bytes are not buffered anywhere yet."""

    def __init__(self, data: bytes, stop_after: int) -> None:
        self.data = data
        self.stop_after = stop_after
        self.yielded = 0
        self.blocked = asyncio.Event()
        self.release = asyncio.Event()

    async def pieces(self) -> Any:
        for i in range(0, len(self.data), KCHUNK):
            if self.yielded == self.stop_after:
                self.blocked.set()
                await self.release.wait()
            self.yielded += 1
            yield self.data[i : i + KCHUNK]
            await asyncio.sleep(0)

    @property
    def unread(self) -> int:
        return max(0, len(self.data) - self.yielded * KCHUNK)


class ChunkFetches(monitoring.CommandListener):
    """Counts the chunk documents the client received (find/getMore replies)."""

    def __init__(self) -> None:
        self.received = 0
        self._requests: set[int] = set()

    def started(self, event: Any) -> None:
        command = event.command
        collection = (
            command.get("find") if event.command_name == "find" else command.get("collection")
        )
        if event.command_name in ("find", "getMore") and collection == f"{KBUCKET}.chunks":
            self._requests.add(event.request_id)

    def failed(self, event: Any) -> None:
        self._requests.discard(event.request_id)

    def succeeded(self, event: Any) -> None:
        if event.request_id not in self._requests:
            return
        self._requests.discard(event.request_id)
        cursor = event.reply.get("cursor") or {}
        self.received += len(cursor.get("firstBatch") or cursor.get("nextBatch") or [])


KILL_POINTS = [
    # (operation, where the kill lands)
    ("put", "chunks confirmed"),  # 32 chunks in the server, source still holding 32
    ("put", "files document held"),  # every chunk written, the files document not yet
    ("put", "first save held"),  # the file complete, the new document's insert not sent
    ("replace", "chunks confirmed"),
    ("replace", "switch held"),  # the conditional update not sent yet
    ("replace", "switch applied"),  # the update applied, its reply not processed
    ("replace", "old files document delete held"),  # switched; deleting the old file
    ("replace", "old chunks delete held"),  # the old files document gone, its chunks not
    ("stream write", "chunks confirmed"),  # awaited write()s: 8 chunks in, 56 to come
    ("stream write", "files document held"),  # close(): chunks in, files document not
    ("add_file", "chunks confirmed"),
    ("add_file", "push held"),  # the $push of the new element not sent yet
    ("delete", "file delete held"),  # the reference removed, the file not yet deleted
    ("stream read", "mid-stream"),  # a reader holding part of the file, cursor open
]
FAST_KILL_POINTS = [
    ("put", "chunks confirmed"),
    ("replace", "switch held"),
    ("stream read", "mid-stream"),
]


async def _wait_for(condition: Any, task: asyncio.Future[Any], what: str) -> None:
    deadline = time.monotonic() + 30
    while not await condition():
        if task.done():
            exc = task.exception()
            raise AssertionError(f"the operation ended before {what}: {exc!r}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


async def _kill_in_flight(server: Any, gate: Gate, op: str, point: str) -> dict[str, Any]:
    """Start ``op``, SIGKILL the server at ``point`` (proven in flight), restart it on
    the same data, and check that every committed byte reads back and nothing dangles."""
    db_name = unique_db_name(f"kill_{op}_{point}")
    fetches = ChunkFetches()  # what a reader received, for the proof
    # journal=True: an acknowledged write must survive the kill (the persistent embedded
    # server syncs on commit anyway). Short timeouts: calls after the kill fail fast.
    options = {
        "serverSelectionTimeoutMS": 1000,
        "connectTimeoutMS": 1000,
        "journal": True,
        "event_listeners": [fetches],
    }
    connect(host=server.uri, db=db_name, alias=ALIAS, **options)
    from pymongo import AsyncMongoClient

    observer: Any = AsyncMongoClient(server.uri, serverSelectionTimeoutMS=1000)
    record: dict[str, Any] = {"op": op, "point": point}
    try:
        target = KillDoc(name="target")
        old = os.urandom(READ if op == "stream read" else 200_000)
        element = os.urandom(70_000)
        await target.f.put(old, content_type="application/octet-stream")
        await target.add_file("files", element)
        await target.save()
        other = KillDoc(name="other")
        other_bytes = os.urandom(150_000)
        await other.f.put(other_bytes)
        await other.save()
        before = {d["_id"] async for d in get_db(ALIAS)[f"{KBUCKET}.files"].find({}, {"_id": 1})}
        # What a reader of each stored document must find after the restart.
        expected: dict[Any, dict[str, Any]] = {
            target.pk: {"f": old, "files": [element]},
            other.pk: {"f": other_bytes, "files": []},
        }
        new = os.urandom(UPLOAD)
        fresh_doc = KillDoc(name="in flight")
        source = SlowSource(new, stop_after=BATCH + 8 if point == "chunks confirmed" else 10**9)
        proof: dict[str, Any] = {}

        async def new_chunks() -> int:
            query = {"files_id": {"$nin": list(before)}}
            return int(await observer[db_name][f"{KBUCKET}.chunks"].count_documents(query))

        async def victim() -> None:
            if op == "put":
                await fresh_doc.f.put(source.pieces())
                await fresh_doc.save()
            elif op == "replace":
                await target.f.replace(source.pieces())
            elif op == "add_file":
                await target.add_file("files", source.pieces())
            elif op == "delete":
                await target.f.delete()
            elif op == "stream write":
                async with target.f.new_file(replace=True):
                    for i in range(0, UPLOAD, KCHUNK):
                        if i == 8 * KCHUNK and point == "chunks confirmed":
                            proof["written"] = i
                            source.blocked.set()
                            await source.release.wait()
                        await target.f.write(new[i : i + KCHUNK])  # awaited: flushed
            else:  # stream read
                fetches.received = 0
                got = bytearray()
                pieces = 0
                try:
                    async for piece in target.f.stream():
                        got += piece
                        pieces += 1
                        if pieces == 8:
                            proof["pieces read"] = pieces
                            proof["chunks received"] = fetches.received
                            source.blocked.set()
                            await source.release.wait()
                finally:
                    proof["read"] = bytes(got)

        held = {
            "files document held": (f"{KBUCKET}.files", "insert_one", "before"),
            "first save held": ("kill_docs", "insert_one", "before"),
            "switch held": ("kill_docs", "update_one", "before"),
            "switch applied": ("kill_docs", "update_one", "after"),
            "old files document delete held": (f"{KBUCKET}.files", "delete_one", "before"),
            "old chunks delete held": (f"{KBUCKET}.chunks", "delete_many", "before"),
            "push held": ("kill_docs", "update_one", "before"),
            "file delete held": (f"{KBUCKET}.files", "delete_one", "before"),
        }.get(point)
        gate.reached, gate.release = asyncio.Event(), asyncio.Event()
        if held is not None:
            gate.arm(*held)
        task = asyncio.ensure_future(victim())

        if held is not None:

            async def at_point() -> bool:
                return gate.reached.is_set()

        elif point == "chunks confirmed":
            minimum = 8 if op == "stream write" else BATCH

            async def at_point() -> bool:
                return source.blocked.is_set() and await new_chunks() >= minimum

        else:

            async def at_point() -> bool:
                return source.blocked.is_set()

        await _wait_for(at_point, task, f"{op}: {point}")
        # The proof, recorded at the moment of the kill.
        proof["operation running"] = not task.done()
        if point == "chunks confirmed":
            proof["chunks confirmed by a second client"] = await new_chunks()
            proof["bytes not yet handed to the upload"] = (
                UPLOAD - 8 * KCHUNK if op == "stream write" else source.unread
            )
        if held is not None:
            proof["call held"] = f"{held[1]} on {held[0]} ({held[2]} it reached the server)"
        if op == "stream read":
            proof["chunks not yet received"] = READ // KCHUNK - fetches.received
        in_flight = proof["operation running"] and (
            (point == "chunks confirmed"
             and proof["chunks confirmed by a second client"] >= 1
             and proof["bytes not yet handed to the upload"] > 0)
            or (held is not None and gate.reached.is_set() and not gate.release.is_set())
            or (op == "stream read" and proof["chunks not yet received"] > 0
                and proof["pieces read"] < READ // KCHUNK)
        )  # fmt: skip
        server.kill()
        killed_at = time.monotonic()
        STATS["kills (SIGKILL)"] += 1
        STATS["kills in flight"] += bool(in_flight)
        record["in flight"] = in_flight
        record["proof"] = dict(proof)
        gate.target = None
        gate.release.set()
        source.release.set()
        try:
            await asyncio.wait_for(task, 30)
            record["outcome"] = "completed"
        except PyMongoError as exc:
            record["outcome"] = f"{type(exc).__name__}"
        assert in_flight, f"{op} / {point}: the kill did not land in flight: {proof}"
        if op == "stream read":
            got = proof["read"]
            assert old[: len(got)] == got, "the reader returned bytes that are not the file's"

        # What was committed before the kill, exactly. (A put never got as far as
        # its document's insert, an add_file as far as its $push.)
        if op == "replace" and point not in ("chunks confirmed", "switch held"):
            expected[target.pk]["f"] = new
        if op == "delete":
            expected[target.pk]["f"] = None

        await observer.close()
        await disconnect(ALIAS)
        server.start()
        connect(host=server.uri, db=db_name, alias=ALIAS, **{**options, "event_listeners": []})
        observer = AsyncMongoClient(server.uri, serverSelectionTimeoutMS=1000)
        lost, dangling, orphans = await _verify_kill(expected)
        record.update({"lost bytes": lost, "dangling": dangling, "orphans before sweep": orphans})
        # Chunk ids record whole seconds, and the sweep reads each as the end of its
        # second (oid_time): with grace 0, a chunk written in the last second before
        # the kill is still "recent". Past that second, every leftover is old.
        await asyncio.sleep(max(0.0, killed_at + 1.05 - time.monotonic()))
        report = await ops.sweep_orphans(grace=0, buckets=KBUCKET, alias=ALIAS)
        record["swept files"] = report.files_deleted
        record["swept chunks"] = report.chunks_deleted
        record["recent orphaned chunks"] = report.recent_orphaned_chunks
        lost2, dangling2, orphans2 = await _verify_kill(expected)
        STATS["lost bytes"] += lost + lost2
        STATS["dangling references"] += dangling + dangling2
        assert (lost, dangling, lost2, dangling2) == (0, 0, 0, 0), record
        assert orphans2 == (0, 0), f"the sweep left orphans: {orphans2} ({record})"
        check = await ops.check(buckets=KBUCKET, alias=ALIAS)
        assert check.dangling == 0 and check.corrupt_files == 0, str(check)
        return record
    finally:
        with contextlib.suppress(PyMongoError):
            await asyncassets.get_client(ALIAS).drop_database(db_name)
        await disconnect(ALIAS)
        await observer.close()


async def _verify_kill(expected: dict[Any, dict[str, Any]]) -> tuple[int, int, tuple[int, int]]:
    """Lost bytes and dangling references of the stored documents, and orphans left."""
    db = get_db(ALIAS)
    snap = await snapshot_bucket(db, KBUCKET)
    raws = {d["_id"]: d async for d in db["kill_docs"].find({})}
    assert set(raws) == set(expected), (
        f"stored documents {sorted(map(str, raws))}, expected {sorted(map(str, expected))}"
    )
    lost = dangling = 0
    referenced: set[Any] = set()
    for pk, want in expected.items():
        raw = raws[pk]
        refs = [raw.get("f"), *(raw.get("files") or [])]
        referenced.update(r for r in refs if r is not None)
        for ref in refs:
            if ref is not None and not snap.is_complete(ref):
                dangling += 1
        got_f = snap.content(raw.get("f"))
        got_files = [snap.content(r) for r in raw.get("files") or []]
        if got_f != want["f"]:
            lost += len(want["f"] or b"")
        if got_files != want["files"]:
            lost += sum(len(c) for c in want["files"])
        # Through the library too: a freshly loaded document reads the same bytes.
        doc = await KillDoc.objects.get(pk=pk)
        with contextlib.suppress(asyncassets.GridFSError):  # counted above as dangling
            if await doc.f.read() != want["f"]:
                lost += len(want["f"] or b"")
            if [await p.read() for p in doc.files] != want["files"]:
                lost += sum(len(c) for c in want["files"])
    orphans = (len(set(snap.files) - referenced), len(snap.stray_chunks()))
    STATS["invariant checks"] += 1
    return lost, dangling, orphans


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Gate:
    g = Gate()
    g.install(monkeypatch)
    return g


def _report_kill(record: dict[str, Any]) -> None:
    print(f"\n[kill during {record['op']} at {record['point']}] {record}")
    report_stats("kills")


@pytest.mark.parametrize(("op", "point"), FAST_KILL_POINTS)
async def test_sigkill_in_flight_loses_nothing_fast(
    kill_server: Any, gate: Gate, op: str, point: str
) -> None:
    """A few kills in the fast suite, each proven to land while the I/O is in flight."""
    _report_kill(await _kill_in_flight(kill_server, gate, op, point))


@pytest.mark.slow
@pytest.mark.parametrize("repetition", [1, 2])
@pytest.mark.parametrize(("op", "point"), KILL_POINTS)
async def test_sigkill_in_flight_loses_nothing(
    kill_server: Any, gate: Gate, op: str, point: str, repetition: int
) -> None:
    """Every operation killed at every point where its I/O can be in flight, twice:
    28 kills, each proven in flight; 0 lost bytes and 0 dangling references after
    the restart, no orphan after the sweep."""
    _report_kill(await _kill_in_flight(kill_server, gate, op, point))


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
