"""Races: file operations that run at the same time, checked against a model.

A seeded randomized scheduler (not a Hypothesis state machine) drives a few
documents, each with a top-level ``FileField``, a ``ListField(FileField())`` and a
list of embedded documents with a ``FileField``. Each step launches a *batch* of 2 to
4 operations with ``asyncio.gather``, each after a small random delay, mostly on the
same document and often on the same file: put, replace, delete, new_file + write +
close, abort, add_file, a first ``save()``, ``reload()``, ``read()``, ``stream()``,
the same changes through a second loaded copy of the document (another process),
cancellations, and ``sweep_orphans(grace=0.2)``. The batches follow the pairs the
reference writer must get right: file operations against a first save, aborts
against closes, replaces against reads, sweeps with a short grace against uploads.

Faults: before some batches, the next write to the documents' collection (a
reference switch or a save) is applied and then answered with a
``WriteConcernError`` (what a replica set says when replication timed out) or a
dropped reply (``AutoReconnect`` raised after the write was applied).

Why not Hypothesis: the outcome of a batch depends on how its tasks interleave,
which Hypothesis neither controls nor replays; a failing example would not
reproduce under shrinking and would be reported as flaky. The scheduler instead
draws every choice up front from ``random.Random(seed)`` (set ``RACES_SEED`` to
replay a plan), lets the event loop decide the interleaving, and learns from the
database which of the allowed outcomes happened.

After every batch, read raw from the database:

* every operation ended normally or raised one of the exceptions documented for
  it (FileConflict, FileAlreadyExists, UploadClosed, GridFSError "upload already
  open", the injected fault, FileDeletedWhileReading / FileNotFound for readers);
* every files document has exactly ``ceil(length / chunkSize)`` chunks, and no chunk
  lacks its files document;
* every reference in every stored document names a complete file;
* each file slot of each document holds the content it held before the batch, or
  the content of an operation of the batch that succeeded or whose outcome is
  unknown (exactly that content when one operation alone changed it), byte for byte;
  a slot no operation changed is unchanged;
* readers returned whole content of that slot (never mixed bytes);
* the loaded document holds what is stored, except where a fault, a reload, a
  second copy or a cancellation explain a difference (it is then reloaded);
* no file is left unreferenced unless an unknown outcome (or an unsaved document)
  explains it; at the end, a sweep with grace 0 leaves no orphan file or chunk.

Violations are collected (the document is then quarantined and the run goes on),
counted by kind, and fail the test at the end. ``pytest -s`` prints the counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import io
import itertools
import os
import random
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from _consistency import MISSING, PARTIAL, BucketSnapshot, snapshot_bucket
from bson import ObjectId
from mongoengine.errors import ValidationError
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import AutoReconnect, PyMongoError, WriteConcernError

import asyncassets
from asyncassets import Document, EmbeddedDocument
from asyncassets.connection import connect, disconnect, get_db
from asyncassets.errors import (
    FileAlreadyExists,
    FileConflict,
    FileDeletedWhileReading,
    FileNotFound,
    GridFSError,
    PendingFileMissing,
    UploadClosed,
    UploadInterrupted,
)
from asyncassets.fields import EmbeddedDocumentField, FileField, IntField, ListField, StringField
from asyncassets.testing import unique_db_name

ALIAS = "races"
BUCKET = "racefs"
COLLECTION = "race_docs"
CHUNK = 64  # tiny chunks: every file of a few hundred bytes has several
GRACE = 0.2  # the short grace of the sweeps that race uploads
PAGES = 2


class RacePage(EmbeddedDocument):
    label = StringField()
    image = FileField(collection_name=BUCKET, chunk_size=CHUNK)


class RaceDoc(Document):
    meta = {"collection": COLLECTION, "db_alias": ALIAS}
    name = StringField()
    n = IntField(default=0)
    f = FileField(collection_name=BUCKET, chunk_size=CHUNK)
    files = ListField(FileField(collection_name=BUCKET, chunk_size=CHUNK))
    pages = ListField(EmbeddedDocumentField(RacePage))


# -- injected faults ---------------------------------------------------------------------


class InjectedWriteConcernError(WriteConcernError):
    """The write was applied; the reply says replication timed out."""


class InjectedDroppedReply(AutoReconnect):
    """The write was applied; the connection dropped before the reply came."""


INJECTED = (InjectedWriteConcernError, InjectedDroppedReply)


def injected(exc: BaseException | None) -> bool:
    """Whether ``exc`` is an injected fault (also wrapped, as save() wraps it)."""
    while exc is not None:
        if isinstance(exc, INJECTED):
            return True
        exc = exc.__cause__
    return False


class Faults:
    """Arms a fault for the next write to the documents' collection.

    The wrapped methods call the real one first, so the write is applied; then,
    if armed, they raise instead of returning the result.
    """

    METHODS = ("insert_one", "replace_one", "update_one", "find_one_and_update")

    def __init__(self) -> None:
        self.armed: str | None = None
        self.hits: list[tuple[str, str, Any]] = []  # (kind, method, document _id)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for name in self.METHODS:
            monkeypatch.setattr(
                AsyncCollection, name, self._wrap(name, getattr(AsyncCollection, name))
            )

    def _wrap(self, name: str, original: Any) -> Any:
        faults = self

        async def method(coll: Any, *args: Any, **kwargs: Any) -> Any:
            result = await original(coll, *args, **kwargs)
            if coll.name == COLLECTION and faults.armed is not None:
                kind, faults.armed = faults.armed, None
                faults.hits.append((kind, name, _written_id(name, args, kwargs, result)))
                if kind == "write concern error":
                    raise InjectedWriteConcernError(
                        "injected: waiting for replication timed out",
                        64,
                        {
                            "code": 64,
                            "codeName": "WriteConcernFailed",
                            "errInfo": {"wtimeout": True},
                        },
                    )
                raise InjectedDroppedReply("injected: connection dropped after the write applied")
            return result

        return method


def _written_id(name: str, args: tuple[Any, ...], kwargs: dict[str, Any], result: Any) -> Any:
    if name == "insert_one":
        return getattr(result, "inserted_id", None)
    query = args[0] if args else kwargs.get("filter", {})
    return query.get("_id") if isinstance(query, dict) else None


# -- the model -------------------------------------------------------------------------

# The contents of a document's file slots: (f, files list, page images).
State = tuple[Any, tuple[Any, ...], tuple[Any, ...]]

#: What stream() of an empty field or an empty file yields: nothing.
EMPTY_STREAM = object()

WRITERS = {"put", "replace", "delete", "stream_write", "add_file"}
READERS = {"read", "stream"}


def ids_in_memory(doc: RaceDoc) -> tuple[Any, tuple[Any, ...], tuple[Any, ...]]:
    return (
        doc.f.grid_id,
        tuple(None if p is None else p.grid_id for p in doc.files),
        tuple(page.image.grid_id for page in doc.pages),
    )


def ids_stored(raw: dict[str, Any]) -> tuple[Any, tuple[Any, ...], tuple[Any, ...]]:
    return (
        raw.get("f"),
        tuple(raw.get("files") or ()),
        tuple((page or {}).get("image") for page in raw.get("pages") or ()),
    )


def all_ids(ids: tuple[Any, tuple[Any, ...], tuple[Any, ...]]) -> list[Any]:
    return [i for i in (ids[0], *ids[1], *ids[2]) if i is not None]


def resolve(snap: BucketSnapshot, ids: tuple[Any, tuple[Any, ...], tuple[Any, ...]]) -> State:
    return (
        snap.content(ids[0]),
        tuple(snap.content(i) for i in ids[1]),
        tuple(snap.content(i) for i in ids[2]),
    )


def broken(state: State) -> list[str]:
    """Where ``state`` holds a missing or partial file."""
    out = []
    slots = [("f", state[0])] + [(f"files.{i}", c) for i, c in enumerate(state[1])]
    slots += [(f"pages.{i}.image", c) for i, c in enumerate(state[2])]
    for where, content in slots:
        if content is MISSING or content is PARTIAL:
            out.append(f"{where} -> {content!r}")
    return out


def show(content: Any) -> str:
    if not isinstance(content, bytes):
        return "nothing streamed" if content is EMPTY_STREAM else repr(content)
    head = bytes(content[: content.find(b">") + 1]) if content.startswith(b"<") else b""
    return f"{head.decode(errors='replace') or '<untagged>'}({len(content)} B)"


@dataclass
class Op:
    """One operation of a batch: its plan (drawn up front) and what happened."""

    kind: str
    doc: int | None = None
    family: str | None = None  # "f", "files" or "pages.<i>"
    index: int = 0  # list index (files) at the start
    via: str = "shared"  # "shared": the tracked instance; "copy": a second loaded copy
    content: bytes | None = None
    pieces: list[bytes] = field(default_factory=list)
    delay: tuple[str, float] = ("now", 0)
    pause: float = 0.0
    style: str = ""
    cancel_after: float | None = None
    span: tuple[int, int] | None = None
    yields: int = 0
    trace: list[str] = field(default_factory=list)
    instance: Any = None
    # outcome
    status: str = "pending"  # ok, unknown, refused, missed (readers), bad
    error: BaseException | None = None
    got: Any = None

    def label(self) -> str:
        where = "" if self.doc is None else f" doc{self.doc}"
        slot = "" if self.family is None else f".{self.family}"
        if self.family == "files" and self.kind not in ("add_file",):
            slot += f"[{self.index}]"
        via = " (copy)" if self.via == "copy" else ""
        extra = f" {self.style}" if self.style else ""
        cancel = " cancelled" if self.cancel_after is not None else ""
        content = f" {show(self.content)}" if self.kind in WRITERS and self.kind != "delete" else ""
        err = f" -> {type(self.error).__name__}" if self.error is not None else ""
        trace = f"  [{'; '.join(self.trace)}]" if self.trace else ""
        return f"{self.kind}{where}{slot}{via}{extra}{cancel}{content}: {self.status}{err}{trace}"

    @property
    def effective(self) -> bool:
        """Whether it may have changed what the document references."""
        return self.kind in WRITERS and self.status in ("ok", "unknown")


class Tracked:
    """What the model knows about one document."""

    def __init__(self, doc: RaceDoc, name: str) -> None:
        self.doc = doc
        self.name = name
        self.stored: State | None = None  # validated stored state; None: not stored
        self.mem: State = (None, (), (None,) * PAGES)  # validated in-memory state
        #: Not stored, and held files when a sweep with a short grace ran: they may be gone.
        self.exposed = False


class Violation(Exception):
    pass


# -- the scheduler -------------------------------------------------------------------------


class Races:
    def __init__(self, seed: int, operations: int, faults: Faults, docs: int = 3) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.target = operations
        self.faults = faults
        self.ndocs = docs
        self.stats: Counter[str] = Counter()
        self.violations: list[str] = []
        self.violation_kinds: Counter[str] = Counter()
        self.tracked: list[Tracked] = []
        #: Stored documents no operation targets any more, what they must keep holding,
        #: and why they are there: "retired" (set aside for a fresh document), or
        #: "ghost" (stored by a save whose reply was lost, under an id the instance
        #: never learned).
        self.frozen: dict[Any, tuple[State, str]] = {}
        self.retired_pks: list[Any] = []
        self.known_orphans: set[Any] = set()
        self.batch_no = 0
        self.made = 0
        self.snap = BucketSnapshot()

    # -- setup and helpers

    def _new_doc(self) -> Tracked:
        self.made += 1
        name = f"s{self.seed}d{self.made}"
        pages = [RacePage(label=f"p{i}") for i in range(PAGES)]
        if self.rng.random() < 0.5:
            # An id chosen before the first save: a retried save then finds the same
            # document. Without it (the default), the server side assigns one.
            doc = RaceDoc(id=ObjectId(), name=name, pages=pages)
        else:
            doc = RaceDoc(name=name, pages=pages)
        self.stats["documents"] += 1
        return Tracked(doc, name)

    def _abandon(self, i: int) -> None:
        """Drop an unsaved document: its files become orphans for the sweep."""
        t = self.tracked[i]
        self.known_orphans.update(all_ids(ids_in_memory(t.doc)))
        self.tracked[i] = self._new_doc()
        self.stats["unsaved documents abandoned"] += 1

    def _content(self, rng: random.Random, tag: str, unique: bool) -> bytes:
        size = rng.choice([0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 7, 8 * CHUNK])
        if size == 0 and not unique and rng.random() < 0.5:
            # Empty files too; not in lists, whose elements the model tells apart by content.
            return b""
        head = f"<{tag}>".encode()
        return head + rng.randbytes(max(0, size - len(head)))

    def _pieces(self, rng: random.Random, content: bytes) -> list[bytes]:
        cuts = sorted(rng.sample(range(len(content) + 1), k=min(3, len(content) + 1)))
        bounds = [0, *cuts, len(content)]
        return [content[a:b] for a, b in itertools.pairwise(bounds)]

    # -- planning (all random choices are made here, in a fixed order)

    def plan(self) -> list[Op]:
        rng = self.rng
        size = rng.choice([2, 2, 3, 3, 4])
        focus = rng.randrange(self.ndocs)
        roll = rng.random()
        ops: list[Op] = []
        if roll < 0.15:
            template = "first save"
            t = self.tracked[focus]
            if t.stored is not None and rng.random() < 0.7:
                self._retire(focus)  # a fresh document for this race
            ops.append(Op("save", focus))
        elif roll < 0.3:
            template = "abort vs close"
            family = rng.choice(["f", "pages.0", "pages.1", "f"])
            ops.append(self._writer(rng, focus, "stream_write", family, via="shared"))
            ops.append(Op("abort_race", focus, family))
        elif roll < 0.45:
            template = "replace vs read"
            family = rng.choice(["f", "files", "pages.0", "pages.1"])
            ops.append(self._writer(rng, focus, rng.choice(["replace", "stream_write"]), family))
            ops.append(self._reader(rng, focus, family))
        elif roll < 0.57:
            template = "sweep vs uploads"
            ops.append(Op("sweep"))
        else:
            template = "random"
        self.stats[f"batches: {template}"] += 1
        while len(ops) < size:
            doc = focus if rng.random() < 0.75 else rng.randrange(self.ndocs)
            ops.append(self._random_op(rng, doc, template))
        for j, op in enumerate(ops):
            if op.kind in WRITERS and op.kind != "delete" and op.content is None:
                op.content = self._content(rng, f"{self.batch_no}.{j}", op.family == "files")
                op.pieces = self._pieces(rng, op.content)
            op.delay = rng.choice(
                [
                    ("now", 0),
                    ("yield", 1),
                    ("yield", 3),
                    ("yield", 8),
                    ("sleep", rng.random() * 0.004),
                ]
            )
            if op.kind == "sweep":
                op.delay = ("sleep", rng.random() * 0.003)
            op.pause = rng.choice([0.0, 0.0, 0.0005, 0.002])
            op.yields = rng.randrange(6)
            if (
                op.kind in ("replace", "stream_write", "put", "add_file", "delete")
                and rng.random() < 0.07
            ):
                op.cancel_after = rng.random() * 0.006
        return ops

    def _retire(self, i: int) -> None:
        """Plan to start this slot over with a new document (the old one stays stored)."""
        self.retired.append(self.tracked[i])
        self.tracked[i] = self._new_doc()

    def _writer(self, rng: random.Random, doc: int, kind: str, family: str, via: str = "") -> Op:
        t = self.tracked[doc]
        if not via:
            via = (
                "copy"
                if t.stored is not None and t.doc.pk is not None and rng.random() < 0.25
                else "shared"
            )
        if family == "files" and kind in ("put", "stream_write"):
            kind = "replace" if kind == "put" else kind
        op = Op(kind, doc, family, via=via)
        op.index = rng.randrange(8)
        if kind == "stream_write":
            op.style = rng.choice(["async with", "explicit"])
        if kind == "put":
            op.style = rng.choice(["bytes", "slow source", "file object"])
        return op

    def _reader(self, rng: random.Random, doc: int, family: str) -> Op:
        t = self.tracked[doc]
        via = (
            "copy"
            if t.stored is not None and t.doc.pk is not None and rng.random() < 0.5
            else "shared"
        )
        op = Op(rng.choice(["read", "stream", "stream"]), doc, family, via=via)
        op.index = rng.randrange(8)
        if op.kind == "stream" and rng.random() < 0.4:
            # A range inside what the slot holds now (a change may make it too long).
            state = t.stored if op.via == "copy" and t.stored is not None else t.mem
            held = self._family_contents(state, family)
            size = max((len(c) for c in held if isinstance(c, bytes)), default=0)
            a = rng.randrange(0, size + 1)
            op.span = (a, rng.randrange(a, size + 1))
        return op

    def _random_op(self, rng: random.Random, doc: int, template: str) -> Op:
        family = rng.choice(["f", "f", "files", "pages.0", "pages.1"])
        if template == "sweep vs uploads":
            kinds = ["stream_write", "stream_write", "put", "add_file", "replace"]
        else:
            kinds = [
                "put", "replace", "replace", "delete", "stream_write", "stream_write", "abort",
                "add_file", "save", "reload", "read", "stream", "abort_race",
            ]  # fmt: skip
        kind = rng.choice(kinds)
        if kind == "add_file":
            return Op("add_file", doc, "files")
        if kind in READERS:
            return self._reader(rng, doc, family)
        if kind in ("save", "reload"):
            return Op(kind, doc)
        if kind == "abort":
            return Op(
                "abort",
                doc,
                family,
                pieces=[b"a" * rng.randrange(3 * CHUNK)],
                style=rng.choice(["explicit", "async with"]),
            )
        if kind == "abort_race":
            return Op("abort_race", doc, family)
        return self._writer(rng, doc, kind, family)

    # -- running a batch

    async def _delay(self, op: Op) -> None:
        how, amount = op.delay
        if how == "yield":
            for _ in range(int(amount)):
                await asyncio.sleep(0)
        elif how == "sleep":
            await asyncio.sleep(amount)

    async def _pause(self, op: Op) -> None:
        await asyncio.sleep(op.pause)

    async def _instance(self, op: Op) -> RaceDoc:
        t = self.tracked[op.doc]
        if op.via == "copy":
            doc = await RaceDoc.objects.get(pk=t.doc.pk)
        else:
            doc = t.doc
        op.instance = doc
        if op.family is not None:
            self._note(op, "loaded", self._proxy(doc, op))
        return doc

    def _proxy(self, doc: RaceDoc, op: Op) -> Any:
        if op.family == "f":
            return doc.f
        if op.family == "files":
            if not doc.files:
                return None
            return doc.files[op.index % len(doc.files)]  # None: a null element (a bug)
        return doc.pages[int(op.family.split(".")[1])].image

    def _note(self, op: Op, event: str, proxy: Any = None) -> None:
        """Add to the operation's trace (shown with a violation)."""
        if proxy is not None:
            held = proxy.grid_id
            name = show(self.snap.content(held)) if held in self.snap.files else str(held)[-4:]
            event += f" (holds {name})"
        op.trace.append(f"{(time.monotonic() - self._t0) * 1000:.1f}ms {event}")

    async def run_op(self, op: Op) -> None:
        await self._delay(op)
        self._note(op, "start")
        try:
            await self._run_cancellable(op)
        finally:
            proxy = None
            if op.instance is not None and op.family is not None and op.kind != "add_file":
                with contextlib.suppress(Exception):
                    proxy = self._proxy(op.instance, op)
            self._note(op, "end", proxy)
            op.instance = None

    async def _run_cancellable(self, op: Op) -> None:
        if op.cancel_after is None:
            await self._run(op)
            return
        task = asyncio.ensure_future(self._run(op))
        await asyncio.sleep(op.cancel_after)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            op.status = "unknown"
            op.error = None
            self.stats["operations cancelled mid-way"] += 1

    async def _run(self, op: Op) -> None:
        try:
            await getattr(self, "_op_" + op.kind)(op)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # classified below; anything unexpected is a violation
            op.error = exc
            op.status = self._classify(op, exc)
        else:
            if op.status == "pending":
                op.status = "ok"

    def _classify(self, op: Op, exc: BaseException) -> str:
        if injected(exc) and op.kind in WRITERS | {"save"}:
            return "unknown"
        if (
            op.kind == "save"
            and isinstance(exc, ValidationError)
            and "streaming upload in progress" in str(exc)
        ):
            return "refused"  # save() refuses while an upload on the document is open
        if isinstance(exc, (FileDeletedWhileReading, FileNotFound)) and op.kind in READERS:
            return "missed"
        if (
            op.kind == "stream"
            and op.span is not None
            and isinstance(exc, ValueError)
            and "range" in str(exc)
        ):
            return "missed"  # the file changed under the range
        already_open = type(exc) is GridFSError and "open" in str(exc)
        allowed: dict[str, tuple[type[BaseException], ...]] = {
            "put": (FileAlreadyExists, FileConflict),
            "replace": (FileConflict,),
            "delete": (FileConflict, UploadClosed),
            "stream_write": (FileConflict, UploadClosed, FileAlreadyExists),
            "abort": (UploadClosed,),
            "abort_race": (UploadClosed,),
            "add_file": (FileConflict,),
        }
        if isinstance(exc, allowed.get(op.kind, ())) or (
            already_open and op.kind in ("put", "replace", "stream_write", "abort")
        ):
            return "refused"
        return "bad"

    # -- the operations

    async def _op_put(self, op: Op) -> None:
        doc = await self._instance(op)
        proxy = self._proxy(doc, op)
        if op.style == "slow source":
            source: Any = self._slow_source(op)
        elif op.style == "file object":
            source = io.BytesIO(op.content)
        else:
            source = op.content
        await proxy.put(source, content_type="application/octet-stream")

    async def _slow_source(self, op: Op) -> Any:
        for piece in op.pieces:
            await self._pause(op)
            yield piece

    async def _op_replace(self, op: Op) -> None:
        doc = await self._instance(op)
        proxy = self._proxy(doc, op)
        if proxy is None:
            op.status = "refused"  # nothing to replace in an empty list
            return
        source = self._slow_source(op) if op.pause else op.content
        await proxy.replace(source, content_type="text/plain")

    async def _op_delete(self, op: Op) -> None:
        doc = await self._instance(op)
        proxy = self._proxy(doc, op)
        if proxy is not None:
            await proxy.delete()

    async def _op_stream_write(self, op: Op) -> None:
        doc = await self._instance(op)
        proxy = self._proxy(doc, op)
        if proxy is None:
            op.status = "refused"
            return
        if op.style == "async with":
            async with proxy.new_file(filename="race"):
                for piece in op.pieces:
                    await self._pause(op)
                    await proxy.write(piece)
            return
        await proxy.new_file(filename="race")
        try:
            for piece in op.pieces:
                await self._pause(op)
                await proxy.write(piece)
        except UploadClosed:
            raise  # someone else closed or aborted it: nothing of ours to clean up
        except BaseException:
            with contextlib.suppress(UploadClosed):
                await proxy.abort()
            raise
        await proxy.close()

    async def _op_abort(self, op: Op) -> None:
        doc = await self._instance(op)
        proxy = self._proxy(doc, op)
        if proxy is None:
            op.status = "refused"
            return
        if op.style == "async with":
            with contextlib.suppress(RuntimeError):
                async with proxy.new_file():
                    await proxy.write(op.pieces[0])
                    await self._pause(op)
                    raise RuntimeError("abandon the upload")
            return
        await proxy.new_file()
        await proxy.write(op.pieces[0])
        await self._pause(op)
        await proxy.abort()

    async def _op_abort_race(self, op: Op) -> None:
        """Abort whatever upload is open on the field: one being written, or closed."""
        proxy = self._proxy(self.tracked[op.doc].doc, op)
        if proxy is None:
            op.status = "refused"
            return
        for _ in range(40):  # wait (a little) for another operation to open one
            if proxy._upload is not None or proxy._closing is not None:
                break
            await asyncio.sleep(0.0002)
        for _ in range(op.yields):
            await asyncio.sleep(0)
        await proxy.abort()

    async def _op_add_file(self, op: Op) -> None:
        doc = await self._instance(op)
        await doc.add_file("files", op.content, content_type="text/plain")

    async def _op_save(self, op: Op) -> None:
        doc = self.tracked[op.doc].doc
        doc.n += 1
        await doc.save()

    async def _op_reload(self, op: Op) -> None:
        await self.tracked[op.doc].doc.reload()

    async def _op_read(self, op: Op) -> None:
        doc = await self._instance(op)
        proxy = self._proxy(doc, op)
        op.got = None if proxy is None else await proxy.read()

    async def _op_stream(self, op: Op) -> None:
        doc = await self._instance(op)
        proxy = self._proxy(doc, op)
        if proxy is None:
            op.got = None
            return
        kwargs = {} if op.span is None else {"start": op.span[0], "end": op.span[1]}
        pieces = []
        async for piece in proxy.stream(**kwargs):
            pieces.append(piece)
            await self._pause(op)
        # stream() yields nothing for an empty field and for an empty file alike.
        op.got = b"".join(pieces) if pieces else EMPTY_STREAM

    async def _op_sweep(self, op: Op) -> None:
        report = await asyncassets.sweep_orphans(grace=GRACE, buckets=BUCKET, alias=ALIAS)
        self.stats["racing sweeps"] += 1
        self.stats["files deleted by racing sweeps"] += report.files_deleted
        self.stats["orphan chunks deleted by racing sweeps"] += report.chunks_deleted

    # -- one step

    async def step(self) -> None:
        self.batch_no += 1
        self.retired: list[Tracked] = []
        ops = self.plan()
        self._t0 = time.monotonic()
        if any(op.kind == "sweep" for op in ops):
            # The grace protects a file waiting for its document's first save only
            # for GRACE seconds. Unsaved documents holding older files are not saved
            # while the sweep runs (the docs name that window as unprotected); after
            # it, their save() must either work or raise PendingFileMissing.
            for i, t in enumerate(self.tracked):
                if t.stored is None and all_ids(ids_in_memory(t.doc)):
                    t.exposed = True
                    ops = [op for op in ops if not (op.doc == i and op.kind == "save")]
        for old in self.retired:
            # Set aside while stored: nothing changes it any more; it must stay as it is.
            if old.stored is not None and old.doc.pk is not None:
                self.frozen[old.doc.pk] = (old.stored, "retired")
                self.retired_pks.append(old.doc.pk)
        # Ops on a document that is not stored (no reload, no second copy) are moved
        # to the shared instance, or dropped when they need a stored document.
        ops = [op for op in (self._fit(op) for op in ops) if op is not None]
        arm = self.rng.random()
        if arm < 0.12:
            self.faults.armed = "write concern error" if arm < 0.06 else "dropped reply"
        hits_before = len(self.faults.hits)
        before = {i: (t.stored, t.mem) for i, t in enumerate(self.tracked)}
        await asyncio.gather(*(self.run_op(op) for op in ops))
        self.faults.armed = None
        hits = self.faults.hits[hits_before:]
        self.stats["operations"] += len(ops)
        self.stats["concurrent batches"] += 1
        self.stats["injected faults"] += len(hits)
        for kind, _, _ in hits:
            self.stats[f"injected faults: {kind}"] += 1
        for op in ops:
            self.stats[f"outcome {op.status}"] += 1
            if op.error is not None:
                self.stats[f"raised {type(op.error).__name__}"] += 1
        await self.check(ops, before, hits)

    def _fit(self, op: Op) -> Op | None:
        if op.doc is None:
            return op
        t = self.tracked[op.doc]
        stored = t.stored is not None and t.doc.pk is not None
        if op.kind == "reload" and not stored:
            return None
        if op.via == "copy" and not stored:
            op.via = "shared"
        return op

    # -- the checks

    def violation(self, kind: str, message: str, ops: list[Op]) -> None:
        self.violation_kinds[kind] += 1
        plan = "\n    ".join(op.label() for op in ops)
        errors = [
            f"{op.label()}\n" + "".join(traceback.format_exception(op.error)[-6:])
            for op in ops
            if op.status == "bad" and op.error is not None
        ]
        self.violations.append(
            f"[seed {self.seed}, batch {self.batch_no}] {kind}: {message}\n  batch:\n    {plan}"
            + ("\n  errors:\n" + "\n".join(errors) if errors else "")
        )

    async def check(
        self, ops: list[Op], before: dict[int, tuple[Any, Any]], hits: list[Any]
    ) -> None:
        db = get_db(ALIAS)
        coll = db[COLLECTION]
        sweeping = any(op.kind == "sweep" for op in ops)
        for op in ops:
            if op.status != "bad":
                continue
            if isinstance(op.error, UploadInterrupted) and sweeping:
                # Every pause of these uploads is a few ms, far below GRACE, and they
                # all started after the sweep's cutoff: the grace must protect them.
                kind = "sweep removed chunks of an upload younger than its grace"
            else:
                kind = f"unexpected exception from {op.kind}"
            self.violation(kind, repr(op.error), ops)
        snap = self.snap = await snapshot_bucket(db, BUCKET)
        raws = {raw["_id"]: raw async for raw in coll.find({})}
        quarantine: set[int] = set()
        # Bucket-wide: every files document complete, no chunk without one.
        partial = snap.partial_files()
        stray = snap.stray_chunks()
        if partial:
            self.violation(
                "partial file",
                f"files documents without all their chunks: {sorted(map(str, partial))}",
                ops,
            )
        if stray:
            self.violation(
                "orphan chunks after the batch",
                f"chunks without files document: {sorted(map(str, stray))}",
                ops,
            )
        if snap.duplicates:
            self.violation("duplicate chunks", str(snap.duplicates), ops)
        faulted_docs = {doc_id for _, _, doc_id in hits}
        referenced: set[Any] = set()
        by_name: dict[str, list[Any]] = {}
        for pk, raw in raws.items():
            by_name.setdefault(raw.get("name"), []).append(pk)
            referenced.update(all_ids(ids_stored(raw)))
        # Documents no operation targets: exactly as they were.
        for pk, (state, why) in list(self.frozen.items()):
            raw = raws.get(pk)
            now = None if raw is None else resolve(snap, ids_stored(raw))
            if now != state:
                self.violation(
                    f"{why} document changed",
                    f"document {pk} changed from {self._show_state(state)} to "
                    f"{self._show_state(now)}",
                    ops,
                )
                self.frozen.pop(pk)
                await coll.delete_one({"_id": pk})
        for i, t in enumerate(self.tracked):
            mine = [op for op in ops if op.doc == i]
            try:
                await self._check_doc(i, t, mine, ops, before[i], raws, by_name, faulted_docs)
            except Violation as v:
                self.violation(v.args[0], v.args[1], ops)
                quarantine.add(i)
        # No file is left behind that nothing explains.
        held = set()
        for t in self.tracked:
            held.update(all_ids(ids_in_memory(t.doc)))
        for t in self.retired:
            held.update(all_ids(ids_in_memory(t.doc)))
        orphans = set(snap.files) - referenced - held
        new = orphans - self.known_orphans
        allowance = sum(op.status == "unknown" for op in ops) + len(hits)
        if len(new) > allowance:
            states = "; ".join(
                f"doc{i}: stored {self._show_state(t.stored)}" for i, t in enumerate(self.tracked)
            )
            self.violation(
                "leaked file",
                f"{len(new)} new unreferenced files ({[show(snap.content(x)) for x in new]}) "
                f"where unknown outcomes explain at most {allowance}; now {states}",
                ops,
            )
        self.known_orphans = orphans
        for i in sorted(quarantine):
            await self._quarantine(i)
        while len(self.retired_pks) > 3:
            await self._delete_retired(self.retired_pks.pop(0))
        if partial or stray:
            for file_id in partial | stray:
                await db[f"{BUCKET}.files"].delete_one({"_id": file_id})
                await db[f"{BUCKET}.chunks"].delete_many({"files_id": file_id})
        self.stats["invariant checks"] += 1

    def _show_state(self, state: State | None) -> str:
        if state is None:
            return "nothing"
        return (
            f"f={show(state[0])} files=[{', '.join(map(show, state[1]))}] "
            f"pages=[{', '.join(map(show, state[2]))}]"
        )

    async def _check_doc(
        self,
        i: int,
        t: Tracked,
        mine: list[Op],
        ops: list[Op],
        before: tuple[State | None, State],
        raws: dict[Any, dict[str, Any]],
        by_name: dict[str, list[Any]],
        faulted_docs: set[Any],
    ) -> None:
        snap = self.snap
        prev_stored, prev_mem = before
        doc = t.doc
        raw = raws.get(doc.pk) if doc.pk is not None else None
        saves = [op for op in mine if op.kind == "save"]
        for pk in by_name.get(t.name, []):
            if pk != doc.pk and pk not in self.frozen:
                state = resolve(snap, ids_stored(raws[pk]))
                self.stats["ghost documents (stored by a save the instance lost track of)"] += 1
                if broken(state):
                    raise Violation("dangling reference", f"ghost document {pk}: {broken(state)}")
                self.frozen[pk] = (state, "ghost")
        # Readers: whole content of that slot, old or new, never anything else.
        for op in mine:
            if op.kind in READERS and op.status == "ok":
                self._check_reader(op, mine, prev_stored, prev_mem)
        mem_ids = ids_in_memory(doc)
        mem = resolve(snap, mem_ids)
        if raw is None:
            if prev_stored is not None:
                raise Violation("stored document vanished", f"doc{i} {doc.pk} is gone")
            # Not stored: the instance is the truth; its files must be whole, unless
            # a racing sweep removed files that waited longer than its grace.
            swept = [c for c in broken(mem) if c.endswith("MISSING")]
            if broken(mem) and not (t.exposed and swept == broken(mem)):
                raise Violation("unsaved document holds a broken file", f"doc{i}: {broken(mem)}")
            t.exposed = False
            if swept:
                await self._save_refused(i, t, swept)
                return
            self._check_transition(i, prev_mem, mem, mine, "in memory")
            t.mem = mem
            return
        stored = resolve(snap, ids_stored(raw))
        if broken(stored):
            raise Violation("dangling reference", f"doc{i} {doc.pk}: {broken(stored)}")
        if prev_stored is None and not saves:
            raise Violation("stored without a save", f"doc{i} {doc.pk}")
        self._check_transition(
            i, prev_stored if prev_stored is not None else prev_mem, stored, mine, "stored"
        )
        if doc._created:
            # A save whose outcome was unknown did store it: reload, as the docs advise,
            # so the instance knows it is the stored document.
            await doc.reload()
            self.stats["instances reloaded after an unknown save outcome"] += 1
            mem_ids = ids_in_memory(doc)
        if mem_ids != ids_stored(raw):
            excuse = (
                doc.pk in faulted_docs
                or any(op.status == "unknown" for op in mine)
                or any(op.kind == "reload" for op in mine)
                or any(op.via == "copy" and op.effective for op in mine)
            )
            if not excuse:
                raise Violation(
                    "loaded document differs from the stored one",
                    f"doc{i} {doc.pk}: in memory {self._show_state(mem)}, "
                    f"stored {self._show_state(stored)}",
                )
            await doc.reload()
            self.stats["instances reloaded to resync"] += 1
        t.stored = stored
        t.mem = resolve(snap, ids_in_memory(doc))
        if self.rng.random() < 0.2:
            # Through the library too: a freshly loaded document reads the same bytes.
            fresh = await RaceDoc.objects.get(pk=doc.pk)
            got = (
                await fresh.f.read(),
                tuple([await p.read() for p in fresh.files]),
                tuple([await page.image.read() for page in fresh.pages]),
            )
            if got != stored:
                raise Violation(
                    "library read differs from the stored bytes",
                    f"doc{i}: read {self._show_state(got)}, stored {self._show_state(stored)}",
                )
            self.stats["library reads checked"] += 1

    async def _save_refused(self, i: int, t: Tracked, swept: list[str]) -> None:
        """A sweep removed files an unsaved document holds: save() must refuse."""
        coll = get_db(ALIAS)[COLLECTION]
        stored_before = await coll.count_documents({"name": t.name})
        try:
            await t.doc.save()
        except PendingFileMissing:
            self.stats["saves refused with PendingFileMissing after a sweep"] += 1
        else:
            raise Violation(
                "save() stored a reference to a swept file",
                f"doc{i}: {swept}, yet save() succeeded",
            )
        if await coll.count_documents({"name": t.name}) != stored_before:
            raise Violation("a refused save stored the document", f"doc{i}")
        self._abandon(i)

    def _check_reader(
        self, op: Op, mine: list[Op], prev_stored: State | None, prev_mem: State
    ) -> None:
        # An empty list of files: the reader found no element to read.
        candidates: set[Any] = {None} if op.family == "files" else set()
        for state in (prev_stored, prev_mem):
            if state is not None:
                candidates.update(self._family_contents(state, op.family))
        for w in mine:
            if w.kind in WRITERS and (w.family == op.family):
                candidates.add(w.content)
        got = op.got
        if got is EMPTY_STREAM:
            if op.span is None:
                ok = None in candidates or b"" in candidates
            else:
                a, b = op.span
                ok = None in candidates or any(
                    c is not None and len(c) >= b and a == b for c in candidates
                )
        elif op.span is not None and got is not None:
            a, b = op.span
            ok = any(c is not None and len(c) >= b and c[a:b] == got for c in candidates)
        else:
            ok = got in candidates
        if not ok:
            self.violation(
                "reader got bytes nobody committed",
                f"{op.label()} returned {show(got)}; candidates {[show(c) for c in candidates]}",
                mine,
            )
        self.stats["reads checked"] += 1

    @staticmethod
    def _family_contents(state: State, family: str | None) -> list[Any]:
        if family == "f":
            return [state[0]]
        if family == "files":
            return list(state[1])
        if family is not None and family.startswith("pages."):
            return [state[2][int(family.split(".")[1])]]
        return []

    def _check_transition(
        self, i: int, prev: State, now: State, mine: list[Op], where: str
    ) -> None:
        """``now`` must follow from ``prev`` through the operations of the batch."""
        for family, before, after in (
            ("f", prev[0], now[0]),
            *((f"pages.{k}", prev[2][k], now[2][k]) for k in range(PAGES)),
        ):
            writers = [op for op in mine if op.family == family and op.kind in WRITERS]
            effective = [op for op in writers if op.effective]
            allowed = {before} | {None if op.kind == "delete" else op.content for op in effective}
            if after not in allowed:
                raise Violation(
                    "slot holds bytes nobody committed",
                    f"doc{i}.{family} ({where}) holds {show(after)}; before {show(before)}, "
                    f"committed by the batch: {[show(op.content) for op in effective]}",
                )
            if len(writers) == 1 and writers[0].status == "ok" and len(effective) == 1:
                expected = None if writers[0].kind == "delete" else writers[0].content
                if after != expected:
                    raise Violation(
                        "a successful change was lost",
                        f"doc{i}.{family} ({where}) holds {show(after)}; the only change, "
                        f"{writers[0].label()}, succeeded",
                    )
        # The list of files: old elements keep their order, new ones come from the batch.
        before_list, after_list = list(prev[1]), list(now[1])
        writers = [op for op in mine if op.family == "files" and op.kind in WRITERS]
        effective = [op for op in writers if op.effective]
        new_contents = {op.content for op in effective if op.kind != "delete"}
        if not writers:
            if after_list != before_list:
                raise Violation(
                    "list changed with no change to it",
                    f"doc{i}.files ({where}): {list(map(show, before_list))} -> "
                    f"{list(map(show, after_list))}",
                )
            return
        if None in after_list:
            raise Violation(
                "empty element left in a list of files",
                f"doc{i}.files ({where}): {list(map(show, after_list))}",
            )
        kept = [c for c in after_list if c in before_list]
        if any(c not in before_list and c not in new_contents for c in after_list):
            raise Violation(
                "list holds bytes nobody committed",
                f"doc{i}.files ({where}): {list(map(show, after_list))}; before "
                f"{list(map(show, before_list))}, committed {list(map(show, new_contents))}",
            )
        if kept != [c for c in before_list if c in kept]:
            raise Violation("list order changed", f"doc{i}.files ({where})")
        removed = len([c for c in before_list if c not in after_list])
        removers = len([op for op in effective if op.kind in ("delete", "replace", "stream_write")])
        if removed > removers:
            raise Violation(
                "list lost elements",
                f"doc{i}.files ({where}): {removed} elements gone, {removers} changes "
                "could remove one",
            )
        if not any(op.kind in ("delete", "replace", "stream_write") for op in effective):
            for op in effective:
                if op.kind == "add_file" and op.status == "ok" and op.content not in after_list:
                    raise Violation(
                        "an added file was lost", f"doc{i}.files ({where}): {op.label()}"
                    )

    async def _delete_retired(self, pk: Any) -> None:
        """Delete a retired document through the library: its files go with it.

        Keeps the collections small (the checks read them whole after every batch),
        and checks the cascade on the way.
        """
        state = self.frozen.pop(pk, None)
        doc = await RaceDoc.objects(pk=pk).first()
        if doc is None or state is None:
            return
        ids = all_ids(ids_stored(doc.to_mongo().to_dict()))
        await doc.delete()
        db = get_db(ALIAS)
        left = await db[f"{BUCKET}.files"].count_documents({"_id": {"$in": ids}})
        chunks = await db[f"{BUCKET}.chunks"].count_documents({"files_id": {"$in": ids}})
        if left or chunks:
            self.violation(
                "cascade delete left files",
                f"{left} files and {chunks} chunks of deleted document {pk}",
                [],
            )
        self.stats["documents deleted (cascade checked)"] += 1

    async def _quarantine(self, i: int) -> None:
        """Set a broken document aside (raw), so one violation is reported once."""
        t = self.tracked[i]
        coll = get_db(ALIAS)[COLLECTION]
        await coll.delete_many({"name": t.name})
        for pk in list(self.frozen):
            if (await coll.find_one({"_id": pk})) is None:
                self.frozen.pop(pk)
        self.known_orphans.update(self.snap.files)
        self.tracked[i] = self._new_doc()
        self.stats["documents quarantined after a violation"] += 1

    # -- a run

    async def run(self) -> None:
        self.retired = []
        self.tracked = [self._new_doc() for _ in range(self.ndocs)]
        while self.stats["operations"] < self.target:
            await self.step()
        await self.finish()

    async def finish(self) -> None:
        """Give up unsaved documents, sweep with grace 0: no orphan may remain."""
        db = get_db(ALIAS)
        for i, t in enumerate(self.tracked):
            if t.stored is None:
                self._abandon(i)
        report = await asyncassets.sweep_orphans(grace=0, buckets=BUCKET, alias=ALIAS)
        self.stats["final sweep: files deleted"] += report.files_deleted
        snap = await snapshot_bucket(db, BUCKET)
        referenced: set[Any] = set()
        async for raw in db[COLLECTION].find({}):
            state = resolve(snap, ids_stored(raw))
            if broken(state):
                self.violation(
                    "dangling reference at the end", f"{raw['_id']}: {broken(state)}", []
                )
            referenced.update(all_ids(ids_stored(raw)))
        leftover = set(snap.files) - referenced
        if leftover:
            self.violation(
                "orphan files after the final sweep",
                f"{len(leftover)}: {sorted(map(str, leftover))}",
                [],
            )
        if snap.stray_chunks():
            self.violation(
                "orphan chunks after the final sweep",
                f"{sorted(map(str, snap.stray_chunks()))}",
                [],
            )
        for t in self.tracked:
            if t.stored is not None:
                raw = await db[COLLECTION].find_one({"_id": t.doc.pk})
                if raw is None or resolve(snap, ids_stored(raw)) != t.stored:
                    self.violation("final state differs from the model", f"{t.name}", [])
        report = await asyncassets.check(buckets=BUCKET, alias=ALIAS)
        if report.dangling or report.corrupt_files or report.orphaned_chunks:
            self.violation("asyncassets.check() disagrees", str(report), [])
        self.stats["invariant checks"] += 1


# -- the tests --------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def races_db(uri: str):
    name = unique_db_name("races")
    connect(host=uri, db=name, alias=ALIAS)
    try:
        yield get_db(ALIAS)
    finally:
        with contextlib.suppress(PyMongoError):
            await asyncassets.get_client(ALIAS).drop_database(name)
        await disconnect(ALIAS)


async def _run_races(
    uri: str, monkeypatch: pytest.MonkeyPatch, seeds: list[int], operations: int
) -> None:
    faults = Faults()
    faults.install(monkeypatch)
    total: Counter[str] = Counter()
    violations: list[str] = []
    kinds: Counter[str] = Counter()
    started = time.monotonic()
    env_seed = os.environ.get("RACES_SEED")
    if env_seed:
        seeds = [int(env_seed)]
    for seed in seeds:
        async with races_db(uri):
            races = Races(seed, operations, faults)
            await races.run()
        total.update(races.stats)
        violations += races.violations
        kinds.update(races.violation_kinds)
    total["runs"] = len(seeds)
    total["invariant violations"] = len(violations)
    elapsed = time.monotonic() - started
    print(f"\n[races] {elapsed:.1f} s, seeds {seeds}")
    for key, value in sorted(total.items()):
        print(f"  {key}: {value}")
    for kind, count in kinds.most_common():
        print(f"  violation: {kind}: {count}")
    dump = os.environ.get("RACES_REPORT")
    if dump:  # every violation, in full, for a closer look
        await asyncio.to_thread(Path(dump).write_text, "\n\n".join(violations))
    assert not violations, (
        f"{len(violations)} invariant violations in {total['operations']} operations "
        f"({dict(kinds)}); the first ones:\n\n" + "\n\n".join(violations[:5])
    )
    assert total["injected faults"] > 0, "no fault was injected: the wrappers missed every write"
    assert total["concurrent batches"] > 0


async def test_racing_operations_keep_every_invariant(
    asyncassets_server_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A few hundred racing operations, every invariant checked after every batch."""
    await _run_races(asyncassets_server_uri, monkeypatch, seeds=[1], operations=300)


@pytest.mark.slow
async def test_racing_operations_keep_every_invariant_long(
    asyncassets_server_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At least 10,000 racing operations over four seeds."""
    await _run_races(asyncassets_server_uri, monkeypatch, seeds=[11, 12, 13, 14], operations=2500)


# -- what the machine found, one race at a time ------------------------------------------
#
# Deterministic reproductions of the violations the racing runs reported, so that each
# fails on its own, with its own name, whatever the random plan does.


@pytest.fixture
async def races(asyncassets_server_uri: str):
    async with races_db(asyncassets_server_uri) as db:
        yield db


async def test_sweep_with_short_grace_keeps_chunks_of_an_upload_that_paused_far_less(
    races: Any,
) -> None:
    """A chunk written 50 ms ago is younger than a grace of 200 ms, however the sweep
    dates it (a chunk's ObjectId only knows the second it was made in)."""
    doc = await RaceDoc(name="paused upload").save()
    data = os.urandom(5 * CHUNK)
    # Write in the second half of a wall-clock second: the chunk's ObjectId then says
    # it is at least 0.5 s old, while it is only milliseconds old.
    await asyncio.sleep(1.5 - time.time() % 1)
    await doc.f.new_file()
    await doc.f.write(data[: 4 * CHUNK])  # awaited: these chunks are in the server now
    await asyncio.sleep(0.05)
    report = await asyncassets.sweep_orphans(grace=GRACE, buckets=BUCKET, alias=ALIAS)
    assert report.chunks_deleted == 0, (
        f"the sweep (grace {GRACE} s) removed {report.chunks_deleted} chunks of an upload "
        "that paused 50 ms"
    )
    await doc.f.write(data[4 * CHUNK :])
    await doc.f.close()
    assert await (await RaceDoc.objects.get(pk=doc.pk)).f.read() == data


async def test_a_block_whose_upload_another_task_aborted_does_not_end_as_if_stored(
    races: Any,
) -> None:
    """``async with proxy.new_file()`` ends normally only if its file was stored."""
    doc = await RaceDoc(name="aborted under the writer").save()
    opened = asyncio.Event()

    async def writer() -> None:
        async with doc.f.new_file():
            await doc.f.write(b"written by the block")
            opened.set()
            await asyncio.sleep(0.05)  # meanwhile another task aborts the upload

    task = asyncio.ensure_future(writer())
    await opened.wait()
    await doc.f.abort()
    try:
        await task
    except (UploadClosed, GridFSError):
        return  # told: the upload it wrote was aborted
    stored = await RaceDoc.objects.get(pk=doc.pk)
    assert await stored.f.read() == b"written by the block", (
        "the block ended normally, yet the document holds no file: its upload was "
        "aborted by another task and the writer was told nothing"
    )


async def test_a_writer_whose_upload_was_aborted_never_writes_into_the_next_upload(
    races: Any,
) -> None:
    """Task A's upload is aborted and task C opens another on the same field: A's next
    write must fail, not land in C's file."""
    doc = await RaceDoc(name="two uploads").save()
    a_open, c_open, a_done = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def a() -> None:
        await doc.f.new_file()
        await doc.f.write(b"A1-")
        a_open.set()
        await c_open.wait()
        try:
            await doc.f.write(b"A2-")
        finally:
            a_done.set()

    async def c() -> None:
        await a_open.wait()
        await doc.f.abort()  # aborts A's upload
        await doc.f.new_file()
        await doc.f.write(b"C1-")
        c_open.set()
        await a_done.wait()
        await doc.f.write(b"C2")
        await doc.f.close()

    results = await asyncio.gather(a(), c(), return_exceptions=True)
    stored = await (await RaceDoc.objects.get(pk=doc.pk)).f.read()
    assert stored in (None, b"C1-C2"), (
        f"the stored file reads {stored!r}: bytes of an aborted upload went into another "
        f"(A -> {results[0]!r}, C -> {results[1]!r})"
    )
    assert isinstance(results[0], UploadClosed), f"A's write after its abort: {results[0]!r}"


async def test_replace_after_reload_of_a_document_with_embedded_files_deletes_the_old_file(
    races: Any,
) -> None:
    doc = RaceDoc(name="reloaded", pages=[RacePage(label="p0")])
    await doc.pages[0].image.put(b"old")
    await doc.save()
    old = doc.pages[0].image.file_id
    # Whether a garbage proxy made by reload() is still around when replace() asks who
    # else holds the file depends on when the cyclic GC last ran: hold it off, so the
    # outcome does not depend on the allocation count.
    gc.disable()
    try:
        await doc.reload()
        await doc.pages[0].image.replace(b"new")
    finally:
        gc.enable()
    left = await races[f"{BUCKET}.files"].count_documents({"_id": old})
    assert left == 0, (
        "replace() after reload() kept the old file: nothing references it (a leak the "
        "sweep has to clean up)"
    )


async def test_two_writers_filling_the_same_empty_embedded_slot_one_gets_file_conflict(
    races: Any,
) -> None:
    """Two loaded copies put into the same empty ``pages.0.image``: one wins, the other
    gets FileConflict and leaves nothing behind."""
    doc = await RaceDoc(
        name="empty slot", pages=[RacePage(label="p0"), RacePage(label="p1")]
    ).save()
    a = await RaceDoc.objects.get(pk=doc.pk)
    b = await RaceDoc.objects.get(pk=doc.pk)
    await a.pages[0].image.put(b"from A")
    with pytest.raises(FileConflict):
        await b.pages[0].image.put(b"from B")
    stored = await RaceDoc.objects.get(pk=doc.pk)
    assert await stored.pages[0].image.read() == b"from A"
    assert await races[f"{BUCKET}.files"].count_documents({}) == 1, "a file was left behind"
