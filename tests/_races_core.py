"""The race scheduler and its model, for every storage: file operations that run at
the same time (tasks, processes, faults), checked against what the database and the
storage hold, read raw.

A seeded randomized scheduler (not a Hypothesis state machine) drives a few
documents, each with a top-level ``FileField``, a ``ListField(FileField())`` and a
list of embedded documents with a ``FileField``. Each step launches a *batch* of 2 to
4 operations with ``asyncio.gather``, each after a small random delay, mostly on the
same document and often on the same file: put, replace, delete, new_file + write +
close, abort, add_file, a first ``save()``, ``reload()``, ``read()``, ``stream()``,
the same changes through a second loaded copy of the document, cancellations, and
``sweep_orphans(grace=0.2)``. The batches follow the pairs the reference writer
must get right: file operations against a first save, aborts against closes,
replaces against reads, sweeps with a short grace against uploads.

Faults: before some batches, the next write to the documents' collection (a
reference switch or a save) is applied and then answered with a
``WriteConcernError`` (what a replica set says when replication timed out) or a
dropped reply (``AutoReconnect`` raised after the write was applied).

Where the files live is a :class:`Layout`: GridFS (tests/test_races.py), a
directory, an S3 bucket, a queued storage (tests/test_races_storages.py). Layouts of
object storages add, on top of the above:

* colliding keys: every write names a file from a tiny set (``photo.jpg``,
  ``a.txt``...), and with key templates such as ``"{filename}"`` the keys of
  racing uploads collide all the time; contents are all of one length, so a file
  that holds another's bytes is only told apart by its bytes;
* racing processes: some operations run in worker subprocesses
  (tests/_race_worker.py) on a copy of the document they load themselves, and
  report their outcome back as JSON lines; some of them are SIGKILLed mid-upload
  (after their source was read to the end: at the commit), and in a directory
  some fail with a full disk (``RLIMIT_FSIZE`` in the worker);
* stale readers: a copy of a document loaded (files included) some batches ago
  reads a file since deleted or replaced: it must get that file's bytes or
  ``FileNotFound``/``FileDeletedWhileReading``, never those of the key's next owner;
* hostile changes to the storage itself (a layout's :class:`Hostile`): links
  planted in a directory, objects planted in a bucket.

Why not Hypothesis: the outcome of a batch depends on how its tasks interleave,
which Hypothesis neither controls nor replays; a failing example would not
reproduce under shrinking and would be reported as flaky. The scheduler instead
draws every choice up front from ``random.Random(seed)`` (set ``RACES_SEED`` to
replay a plan), lets the event loop decide the interleaving, and learns from the
database which of the allowed outcomes happened.

After every batch, read raw (the documents, the catalogue ``<bucket>.files``, the
chunks or objects; see tests/_consistency.py):

* every operation ended normally or raised one of the exceptions documented for
  it (FileConflict, FileAlreadyExists, UploadClosed, GridFSError "upload already
  open", the injected fault, a full disk's StorageError where one was caused,
  FileDeletedWhileReading / FileNotFound for readers); never ``KeyTaken`` between
  two library writers racing for one name, never a StorageError "ENOENT" because
  a concurrent delete pruned a directory, never CorruptFile for a reader;
* every files document is whole: GridFS chunks add up to its length; an object
  storage's entry names an object of exactly its length and SHA-256, and no two
  entries name one object;
* every reference in every stored document names a whole file;
* each file slot of each document holds the content it held before the batch, or
  the content of an operation of the batch that succeeded or whose outcome is
  unknown (exactly that content when one operation alone changed it), byte for byte;
  a slot no operation changed is unchanged;
* readers returned whole content of that slot (never mixed bytes, never another
  file's);
* the loaded document holds what is stored, except where a fault, a reload, a
  second copy, a process or a cancellation explain a difference (it is then reloaded);
* no file is left unreferenced, and (object storages) no object or temp file is
  left that no entry names, unless an unknown outcome explains it; at the end, a
  sweep with grace 0 leaves no orphan file, chunk, object, temp file or pending
  multipart upload, and ``asyncassets.check()`` reports nothing wrong.

Violations are collected (the document is then quarantined and the run goes on),
counted by kind, and fail the test at the end. ``pytest -n 0 -s`` prints the counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import itertools
import os
import random
import time
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from _consistency import MARKERS, NO_OBJECT, WRONG_BYTES, WRONG_SIZE
from _races_procs import ProcessDied, Workers, decode, encode, exception_from, jsonable_id
from bson import ObjectId
from mongoengine.errors import ValidationError
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import AutoReconnect, PyMongoError, WriteConcernError

import asyncassets
from asyncassets.connection import (
    DEFAULT_ALIAS,
    connect,
    disconnect,
    get_db,
    registered_aliases,
)
from asyncassets.errors import (
    CorruptFile,
    FileAlreadyExists,
    FileConflict,
    FileDeletedWhileReading,
    FileNotFound,
    GridFSError,
    KeyTaken,
    PendingFileMissing,
    StorageError,
    UploadClosed,
    UploadInterrupted,
)
from asyncassets.testing import unique_db_name

PAGES = 2


# -- the documents ---------------------------------------------------------------------


def race_classes(
    prefix: str, alias: str, collection: str, field_kwargs: dict[str, Any]
) -> tuple[type, type]:
    """The document shape the scheduler races on, with files in ``field_kwargs``'
    storage: ``(Doc, Page)`` with ``Doc.f``, ``Doc.files`` (a list) and
    ``Doc.pages[i].image`` (embedded). Worker processes build the same classes."""
    from asyncassets import Document, EmbeddedDocument
    from asyncassets.fields import (
        EmbeddedDocumentField,
        FileField,
        IntField,
        ListField,
        StringField,
    )

    page = type(
        f"{prefix}Page",
        (EmbeddedDocument,),
        {"label": StringField(), "image": FileField(**field_kwargs)},
    )
    doc = type(
        f"{prefix}Doc",
        (Document,),
        {
            "meta": {"collection": collection, "db_alias": alias},
            "name": StringField(),
            "n": IntField(default=0),
            "f": FileField(**field_kwargs),
            "files": ListField(FileField(**field_kwargs)),
            "pages": ListField(EmbeddedDocumentField(page)),
        },
    )
    return doc, page


def proxy_of(doc: Any, family: str | None, index: int) -> Any:
    """The file proxy an operation works on (``None``: an empty list of files)."""
    if family == "f":
        return doc.f
    if family == "files":
        if not doc.files:
            return None
        return doc.files[index % len(doc.files)]  # None: a null element (a bug)
    assert family is not None
    return doc.pages[int(family.split(".")[1])].image


def storage_from_spec(spec: dict[str, Any]) -> Any:
    """A storage from a JSON-able description (the same in the test and its workers)."""
    from asyncassets.storage import (
        FileSystemStorage,
        GridFSStorage,
        QueuedStorage,
        S3Storage,
    )

    kind = spec["kind"]
    name = spec["collection_name"]
    if kind == "gridfs":
        return GridFSStorage(name, chunk_size=spec.get("chunk_size"))
    if kind == "filesystem":
        return FileSystemStorage(
            spec["root"], key_template=spec["key_template"], overwrite=spec["overwrite"],
            collection_name=name, fsync=False,
        )  # fmt: skip
    if kind == "s3":
        return S3Storage(
            **spec["options"], key_template=spec["key_template"], overwrite=spec["overwrite"],
            collection_name=name, part_size=5 * 1024 * 1024,
        )  # fmt: skip
    assert kind == "queued", kind
    return QueuedStorage(
        local=storage_from_spec(spec["local"]), remote=storage_from_spec(spec["remote"]),
        collection_name=name, lease=spec.get("lease", 1.0), retry_delay=0.05,
        max_retry_delay=0.2, max_attempts=spec.get("max_attempts", 5),
    )  # fmt: skip


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
    """Arms a fault for the next write to the documents' collection(s).

    The wrapped methods call the real one first, so the write is applied; then,
    if armed, they raise instead of returning the result.
    """

    METHODS = ("insert_one", "replace_one", "update_one", "find_one_and_update")

    def __init__(self, collection: str) -> None:
        self.collection = collection
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
            if coll.name == faults.collection and faults.armed is not None:
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


# -- the layouts -----------------------------------------------------------------------------


class Hostile:
    """What a hostile user or another tool does to a storage behind the library's
    back (links planted in a directory, objects planted in a bucket), as an operation
    of a batch; and what must still hold afterwards."""

    #: Whether the run also plants other bytes under live keys (an I1 probe).
    probes = True
    #: How often a batch gets a hostile operation.
    rate = 0.08

    async def run(self, op: Op, races: Races) -> None:
        raise NotImplementedError

    async def check(self, races: Races, final: bool) -> list[tuple[str, str]]:
        """Violations (kind, message) of what must hold whatever was planted, after a
        batch (``races.snap`` is the raw state) or after the final sweep."""
        return []

    async def overwrite(self, key: str, data: bytes) -> None:
        """Put other bytes under a live entry's key, as another tool would."""
        raise NotImplementedError

    def excuses(self, op: Op) -> bool:
        """Whether an operation's StorageError (a reader's CorruptFile too) is the
        documented answer to what was done behind the library's back."""
        return False

    def describe(self, op: Op) -> str | None:
        """A name for the violation of an operation that met what was planted."""
        return None

    def planted_at(self, key: str | None) -> bool:
        """Whether this hostile act itself put an object under ``key`` lately: a
        writer's commit meeting it there gets ``KeyTaken``, as documented (another
        tool wrote under the key between its choice and the commit)."""
        return False

    def damaged(self, races: Races) -> set[Any]:
        """Files whose bytes were lost or replaced behind the library's back (a
        crashed server restored from a backup): their documents are set aside."""
        return set()


@dataclass
class Layout:
    """One storage set-up the scheduler races on.

    :ivar spec: what a worker process needs to build the same classes and storage
        (tests/_race_worker.py), or ``None`` (no racing processes).
    """

    name: str
    doc: type
    page: type
    alias: str
    collection: str
    bucket: str
    #: ``snapshot(db, final=False)``: the raw state (tests/_consistency.py).
    snapshot: Callable[..., Awaitable[Any]]
    chunk: int = 64
    grace: float = 0.2
    #: Object storages: filenames of every write, drawn from this tiny set.
    filenames: tuple[str, ...] = ()
    #: Object storages: every content is this long (a wrong file shows only in its bytes).
    equal_length: int | None = None
    #: Extras of object storages: filenames, stale readers, processes, hostile changes.
    extras: bool = False
    spec: dict[str, Any] | None = None
    processes: int = 0
    #: Worker processes killed mid-upload, at most this many per run.
    kills: int = 0
    #: Writes from a worker process may run out of disk (a directory storage).
    disk_full: bool = False
    hostile: Hostile | None = None
    #: check() at the end with verify=True (object storages: catches wrong bytes).
    verify: bool = False
    #: What check() must report nothing of; GridFS as before: dangling, corrupt, chunks.
    check_all: bool = True
    #: Called before the final sweep (stop the transfer workers, the processes).
    before_finish: Callable[[], Awaitable[None]] | None = None


# -- the model -------------------------------------------------------------------------

# The contents of a document's file slots: (f, files list, page images).
State = tuple[Any, tuple[Any, ...], tuple[Any, ...]]

#: What stream() of an empty field or an empty file yields: nothing.
EMPTY_STREAM = object()

WRITERS = {"put", "replace", "delete", "stream_write", "add_file"}
READERS = {"read", "stream"}


def ids_in_memory(doc: Any) -> tuple[Any, tuple[Any, ...], tuple[Any, ...]]:
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


def resolve(snap: Any, ids: tuple[Any, tuple[Any, ...], tuple[Any, ...]]) -> State:
    return (
        snap.content(ids[0]),
        tuple(snap.content(i) for i in ids[1]),
        tuple(snap.content(i) for i in ids[2]),
    )


def broken(state: State) -> list[str]:
    """Where ``state`` holds a missing, partial or foreign file."""
    out = []
    slots = [("f", state[0])] + [(f"files.{i}", c) for i, c in enumerate(state[1])]
    slots += [(f"pages.{i}.image", c) for i, c in enumerate(state[2])]
    for where, content in slots:
        if any(content is m for m in MARKERS):
            out.append(f"{where} -> {content!r}")
    return out


def dangling_kind(problems: list[str]) -> str:
    """How to name a stored reference to a file that is not whole."""
    text = " ".join(problems)
    if repr(WRONG_BYTES) in text:
        return "a stored reference's object holds another file's bytes (I1/I2)"
    if repr(NO_OBJECT) in text:
        return "a stored reference's object is gone (I2)"
    if repr(WRONG_SIZE) in text:
        return "a stored reference's object has the wrong size (I1/I2)"
    return "dangling reference"


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
    #: "shared": the tracked instance; "copy": a second loaded copy; "proc": a copy
    #: loaded in a worker process; "stale": a copy loaded some batches ago
    via: str = "shared"
    content: bytes | None = None
    pieces: list[bytes] = field(default_factory=list)
    delay: tuple[str, float] = ("now", 0)
    pause: float = 0.0
    style: str = ""
    cancel_after: float | None = None
    span: tuple[int, int] | None = None
    yields: int = 0
    filename: str | None = None
    #: A process: SIGKILL it this many seconds after its source was read to the end.
    kill_after: float | None = None
    #: A process: "disk full" (RLIMIT_FSIZE below the content's size).
    fault: str | None = None
    #: Set when this operation's source is read to the end (it commits next) ...
    signal: asyncio.Event | None = None
    #: ... which this operation waits for before its delay.
    wait_for: asyncio.Event | None = None
    trace: list[str] = field(default_factory=list)
    instance: Any = None
    #: A stale reader: the contents its copy held when it was loaded.
    stale_state: Any = None
    # outcome
    status: str = "pending"  # ok, unknown, refused, missed (readers), bad
    error: BaseException | None = None
    got: Any = None

    def label(self) -> str:
        where = "" if self.doc is None else f" doc{self.doc}"
        slot = "" if self.family is None else f".{self.family}"
        if self.family == "files" and self.kind not in ("add_file",):
            slot += f"[{self.index}]"
        via = f" ({self.via})" if self.via != "shared" else ""
        extra = f" {self.style}" if self.style else ""
        name = f" {self.filename}" if self.filename else ""
        cancel = " cancelled" if self.cancel_after is not None else ""
        kill = " killed" if self.kill_after is not None else ""
        fault = f" {self.fault}" if self.fault else ""
        content = f" {show(self.content)}" if self.kind in WRITERS and self.kind != "delete" else ""
        err = f" -> {type(self.error).__name__}" if self.error is not None else ""
        msg = f" {str(self.error)[:200]!r}" if self.status == "bad" and self.error else ""
        trace = f"  [{'; '.join(self.trace)}]" if self.trace else ""
        return (
            f"{self.kind}{where}{slot}{via}{extra}{name}{cancel}{kill}{fault}{content}: "
            f"{self.status}{err}{msg}{trace}"
        )

    @property
    def effective(self) -> bool:
        """Whether it may have changed what the document references."""
        return self.kind in WRITERS and self.status in ("ok", "unknown")


class Tracked:
    """What the model knows about one document."""

    def __init__(self, doc: Any, name: str) -> None:
        self.doc = doc
        self.name = name
        self.stored: State | None = None  # validated stored state; None: not stored
        self.mem: State = (None, (), (None,) * PAGES)  # validated in-memory state
        #: Not stored, and held files when a sweep with a short grace ran: they may be gone.
        self.exposed = False
        #: A copy loaded (files included) at the end of an earlier batch, and its state.
        self.stale: tuple[Any, State] | None = None


class Violation(Exception):
    pass


def violation_kind(op: Op) -> str:
    """How to name an operation that raised what it must not."""
    exc = op.error
    text = str(exc)
    if isinstance(exc, KeyTaken):
        return "KeyTaken between library writers racing for one name (I3)"
    if isinstance(exc, StorageError) and ("ENOTDIR" in text or "a file stands where" in text):
        return "StorageError ENOTDIR: a planted link was followed, then met (I4)"
    if isinstance(exc, StorageError) and "ENOENT" in text:
        return "StorageError ENOENT: a concurrent delete pruned a writer's directory (I4)"
    if isinstance(exc, CorruptFile) and op.kind in READERS:
        return "a reader got CorruptFile (a live file's object changed under it)"
    if isinstance(exc, StorageError):
        return f"StorageError from {op.kind}"
    return f"unexpected exception from {op.kind}"


# -- the scheduler -------------------------------------------------------------------------


class Races:
    def __init__(
        self,
        layout: Layout,
        seed: int,
        operations: int,
        faults: Faults,
        docs: int = 3,
        workers: Workers | None = None,
    ) -> None:
        self.layout = layout
        self.seed = seed
        self.rng = random.Random(seed)
        self.target = operations
        self.faults = faults
        self.ndocs = docs
        self.workers = workers
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
        #: Objects and temp files no entry names that a killed process explains.
        self.known_debris: set[str] = set()
        self.kills_left = layout.kills
        self.batch_no = 0
        self.made = 0
        self.snap: Any = None
        self.seconds_running = 0.0
        self.seconds_checking = 0.0
        self.reported: set[str] = set()
        self.set_aside: set[int] = set()
        #: Files a disaster damaged, and broken unreferenced entries already reported.
        self.damaged_ids: set[Any] = set()
        self.broken_reported: set[Any] = set()
        self.batch_ops: list[Op] = []
        #: Bytes planted (by another tool) under keys: never the library's to delete.
        self.planted_objects: dict[str, bytes] = {}

    # -- setup and helpers

    def _new_doc(self) -> Tracked:
        self.made += 1
        name = f"s{self.seed}d{self.made}"
        pages = [self.layout.page(label=f"p{i}") for i in range(PAGES)]
        if self.rng.random() < 0.5:
            # An id chosen before the first save: a retried save then finds the same
            # document. Without it (the default), the server side assigns one.
            doc = self.layout.doc(id=ObjectId(), name=name, pages=pages)
        else:
            doc = self.layout.doc(name=name, pages=pages)
        self.stats["documents"] += 1
        return Tracked(doc, name)

    def _abandon(self, i: int) -> None:
        """Drop an unsaved document: its files become orphans for the sweep."""
        t = self.tracked[i]
        self.known_orphans.update(all_ids(ids_in_memory(t.doc)))
        self.tracked[i] = self._new_doc()
        self.stats["unsaved documents abandoned"] += 1

    def _content(self, rng: random.Random, tag: str, unique: bool) -> bytes:
        head = f"<{tag}>".encode()
        if self.layout.equal_length is not None:
            return head + rng.randbytes(self.layout.equal_length - len(head))
        chunk = self.layout.chunk
        size = rng.choice([0, 1, chunk - 1, chunk, chunk + 1, 3 * chunk + 7, 8 * chunk])
        if size == 0 and not unique and rng.random() < 0.5:
            # Empty files too; not in lists, whose elements the model tells apart by content.
            return b""
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
        if self.layout.extras:
            ops = self._plan_extras(rng, ops, focus)
        return ops

    def _plan_extras(self, rng: random.Random, ops: list[Op], focus: int) -> list[Op]:
        """What object storages add: names, processes, stale readers, hostile changes."""
        L = self.layout
        procs = 0
        companions: list[Op] = []
        for op in ops:
            if L.filenames and op.kind in WRITERS and op.kind != "delete":
                op.filename = rng.choice(L.filenames)
            t = self.tracked[op.doc] if op.doc is not None else None
            stored = t is not None and t.stored is not None and t.doc.pk is not None
            movable = op.kind in WRITERS | READERS and op.via in ("shared", "copy")
            if (
                movable
                and stored
                and L.processes
                and procs < max(1, L.processes - 1)
                and rng.random() < 0.3
            ):
                op.via = "proc"
                op.cancel_after = None
                procs += 1
                if op.kind in WRITERS - {"delete"}:
                    roll = rng.random()
                    if roll < 0.15:
                        op.kill_after = rng.random() * 0.004
                        op.pause = max(op.pause, 0.0005)
                    elif L.disk_full and roll < 0.6:
                        op.fault = "disk full"
                        companions.append(op)
            elif op.kind in READERS and t is not None and t.stale and rng.random() < 0.4:
                op.via = "stale"
                op.span = None
        for j, op in enumerate(companions):
            # The case 1: an upload of the same name from another document
            # commits while the full disk makes this one's commit fail; the loser's
            # cleanup must not remove the winner's object.
            other = Op("add_file", (op.doc + 1 + j) % self.ndocs, "files", filename=op.filename)
            other.content = self._content(rng, f"{self.batch_no}.d{j}", True)
            other.pieces = [other.content]
            # It goes to its commit when the full disk's upload does, give or take.
            op.signal = other.wait_for = asyncio.Event()
            other.pause = rng.random() * 0.002
            ops.append(other)
            self.stats["disk full vs an upload of its name from another document"] += 1
        if L.hostile is not None and rng.random() < L.hostile.rate:
            ops.append(Op("plant", index=rng.randrange(1 << 30), delay=("yield", rng.randrange(4))))
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
                pieces=[b"a" * rng.randrange(3 * self.layout.chunk)],
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

    async def _instance(self, op: Op) -> Any:
        t = self.tracked[op.doc]
        if op.via == "copy":
            doc = await self.layout.doc.objects.get(pk=t.doc.pk)
        elif op.via == "stale":
            assert t.stale is not None
            doc = t.stale[0]
        else:
            doc = t.doc
        op.instance = doc
        if op.family is not None:
            self._note(op, "loaded", self._proxy(doc, op))
        return doc

    def _proxy(self, doc: Any, op: Op) -> Any:
        return proxy_of(doc, op.family, op.index)

    def _named(self, op: Op) -> dict[str, Any]:
        return {} if op.filename is None else {"filename": op.filename}

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
            if op.via == "proc":
                await self._op_in_process(op)
            else:
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
        if (
            op.fault == "disk full"
            and isinstance(exc, StorageError)
            and not isinstance(exc, KeyTaken)
        ):
            return "refused"  # the full disk it was given
        if (
            self.layout.hostile is not None
            and isinstance(exc, KeyTaken)
            and self.layout.hostile.excuses(op)
            and self.layout.hostile.planted_at(exc.key)
        ):
            return "refused"  # the commit met what the hostile act put there
        if (
            self.layout.hostile is not None
            and isinstance(exc, (StorageError, CorruptFile))
            and not isinstance(exc, KeyTaken)
            and self.layout.hostile.excuses(op)
        ):
            # A planted link where the key needs a directory, a server down (whether a
            # writer's change was applied before the error is then unknown).
            return "missed" if op.kind in READERS else "unknown"
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
        await proxy.put(source, content_type="application/octet-stream", **self._named(op))

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
        await proxy.replace(source, content_type="text/plain", **self._named(op))

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
        name = op.filename or "race"
        if op.style == "async with":
            async with proxy.new_file(filename=name):
                for piece in op.pieces:
                    await self._pause(op)
                    await proxy.write(piece)
            return
        await proxy.new_file(filename=name)
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
        try:
            await proxy.write(op.pieces[0])  # may fail: a link planted where the key goes
            await self._pause(op)
        except UploadClosed:
            raise  # someone else closed or aborted it: nothing of ours to clean up
        except BaseException:
            # As documented: an upload that fails is aborted (as `async with` does).
            with contextlib.suppress(UploadClosed):
                await proxy.abort()
            raise
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
        source = op.content if op.wait_for is None else self._gated_source(op)
        await doc.add_file("files", source, content_type="text/plain", **self._named(op))

    async def _gated_source(self, op: Op) -> Any:
        """All but the last byte at once, the last when ``op.wait_for`` is set: this
        upload then chooses its key and commits when the other one does."""
        assert op.content is not None and op.wait_for is not None
        yield op.content[:-1]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(op.wait_for.wait(), 5)
        await asyncio.sleep(op.pause)
        yield op.content[-1:]

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
        L = self.layout
        report = await asyncassets.sweep_orphans(grace=L.grace, buckets=L.bucket, alias=L.alias)
        self.stats["racing sweeps"] += 1
        self.stats["files deleted by racing sweeps"] += report.files_deleted
        self.stats["orphan chunks deleted by racing sweeps"] += report.chunks_deleted
        if L.extras:
            self.stats["objects deleted by racing sweeps"] += report.objects_deleted
            self.stats["temp files deleted by racing sweeps"] += report.temps_deleted

    async def _op_plant(self, op: Op) -> None:
        assert self.layout.hostile is not None
        await self.layout.hostile.run(op, self)

    async def _op_in_process(self, op: Op) -> None:
        """Run the operation in a worker process, on a copy it loads itself."""
        worker = None if self.workers is None else self.workers.take()
        if worker is None:
            if op.signal is not None:
                op.signal.set()
            # No process ready (one is being replaced after a kill): here, as a copy.
            self.stats["process operations run here (no process ready)"] += 1
            op.via = "copy"
            op.kill_after = None
            if op.fault:
                op.status, op.fault = "refused", None  # a full disk only in a process
                return
            await getattr(self, "_op_" + op.kind)(op)
            return
        t = self.tracked[op.doc]
        command = {
            "kind": op.kind,
            "pk": jsonable_id(t.doc.pk),
            "family": op.family,
            "index": op.index,
            "content": encode(op.content),
            "pieces": [encode(p) for p in op.pieces],
            "pause": op.pause,
            "style": op.style,
            "filename": op.filename,
            "span": op.span,
            "fault": op.fault,
        }
        self.stats["operations in worker processes"] += 1
        if op.kill_after is not None and self.kills_left <= 0:
            op.kill_after = None
        n, result = worker.send(command)
        relay = None
        if op.signal is not None:
            signal = op.signal

            async def relay_source_done() -> None:
                await worker.event(n, 5.0)
                signal.set()

            relay = asyncio.ensure_future(relay_source_done())
        try:
            if op.kill_after is not None:
                if await worker.event(n, 2.0) and not result.done():
                    await asyncio.sleep(op.kill_after)
                if not result.done():
                    worker.kill()
                    self.kills_left -= 1
                    op.status = "unknown"
                    self.stats["kills: worker process mid-upload (SIGKILL)"] += 1
                    self._note(op, f"killed after {worker.events(n)}")
                    with contextlib.suppress(ProcessDied):
                        await result
                    return
                self.stats["kills that came too late (the upload had ended)"] += 1
            report = await asyncio.wait_for(result, 60)
        finally:
            self.workers.give_back(worker)  # type: ignore[union-attr]
            if relay is not None:
                relay.cancel()
                op.signal.set()  # type: ignore[union-attr]
        op.trace.extend(f"proc: {e}" for e in report.get("trace", ()))
        if not report["ok"]:
            raise exception_from(report)
        got = report.get("got")
        op.got = EMPTY_STREAM if got == "EMPTY" else decode(got)

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
        self.batch_ops = ops
        started = time.monotonic()
        await asyncio.gather(*(self.run_op(op) for op in ops))
        self.seconds_running += time.monotonic() - started
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
        started = time.monotonic()
        await self.check(ops, before, hits)
        self.seconds_checking += time.monotonic() - started
        hostile = self.layout.hostile
        if hostile is not None and hostile.probes and self.rng.random() < 0.06:
            await self._probe_planted_over_live()

    async def _probe_planted_over_live(self) -> None:
        """I1: other bytes of the same length put under a live file's key (by another
        tool, a restore) are never served as that file: a read raises instead."""
        L = self.layout
        assert L.hostile is not None
        coll = get_db(L.alias)[L.collection]
        live = [
            (i, t) for i, t in enumerate(self.tracked)
            if t.stored is not None and t.doc.pk is not None
            and isinstance(t.stored[0], bytes) and len(t.stored[0]) > 16
        ]  # fmt: skip
        if not live:
            return
        i, t = live[self.rng.randrange(len(live))]
        raw = await coll.find_one({"_id": t.doc.pk})
        entry = None if raw is None else self.snap.files.get(raw.get("f"))
        key = None if entry is None else (entry.get("location") or {}).get("key")
        if key is None:
            return
        original = t.stored[0]
        planted = b"<planted>" + self.rng.randbytes(len(original) - len(b"<planted>"))
        await L.hostile.overwrite(key, planted)
        # Deleting the entry later must leave the planted object alone (its version
        # is not the entry's): the sweep removes it as another tool's object.
        self.planted_objects[key] = planted
        self.stats["probes: bytes planted over a live object"] += 1
        fresh = await L.doc.objects.get(pk=t.doc.pk)
        try:
            got = await fresh.f.read()
        except (CorruptFile, FileNotFound, StorageError):
            self.stats["probes: the planted bytes refused"] += 1
        else:
            if got != original:
                self.violation(
                    "a read returned bytes planted over its object (I1)",
                    f"doc{i}.f: key {key!r}, entry {entry['_id']}: read {show(got)} "
                    f"instead of {show(original)}",
                    [],
                )
        # Its file is damaged for good: set the document aside.
        self.damaged_ids.add(entry["_id"])
        await self._quarantine(i, "after a probe damaged their file")

    def _fit(self, op: Op) -> Op | None:
        if op.doc is None:
            return op
        t = self.tracked[op.doc]
        stored = t.stored is not None and t.doc.pk is not None
        if op.kind == "reload" and not stored:
            return None
        if op.via in ("copy", "proc") and not stored:
            op.via = "shared"
            op.kill_after = None
            op.fault = None
        if op.via == "stale" and t.stale is None:
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
            f"[{self.layout.name}, seed {self.seed}, batch {self.batch_no}] {kind}: {message}"
            f"\n  batch:\n    {plan}" + ("\n  errors:\n" + "\n".join(errors) if errors else "")
        )

    async def check(
        self, ops: list[Op], before: dict[int, tuple[Any, Any]], hits: list[Any]
    ) -> None:
        L = self.layout
        db = get_db(L.alias)
        coll = db[L.collection]
        sweeping = any(op.kind == "sweep" for op in ops)
        for op in ops:
            if op.status != "bad":
                continue
            if isinstance(op.error, UploadInterrupted) and sweeping:
                # Every pause of these uploads is a few ms, far below GRACE, and they
                # all started after the sweep's cutoff: the grace must protect them.
                kind = "sweep removed chunks of an upload younger than its grace"
            else:
                kind = violation_kind(op)
                if L.hostile is not None:
                    kind = L.hostile.describe(op) or kind
            self.violation(kind, repr(op.error), ops)
        snap = self.snap = await L.snapshot(db)
        raws = {raw["_id"]: raw async for raw in coll.find({})}
        quarantine: set[int] = set()
        # Storage-wide: every file whole, nothing of a file without its entry.
        problems = snap.problems()
        for kind, message in problems:
            if kind.startswith("a transfer attempt failed"):
                # Recorded in the entry until an attempt succeeds: report it once.
                if message in self.reported:
                    continue
                self.reported.add(message)
            self.violation(kind, message, ops)
        if L.hostile is not None:
            for kind, message in await L.hostile.check(self, final=False):
                self.violation(kind, message, ops)
            self.set_aside: set[int] = set()
            damaged = L.hostile.damaged(self)
            self.damaged_ids |= damaged
            if damaged:
                await self._set_aside(damaged, raws)
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
                if raw is not None:  # its files are orphans now: reported once, here
                    self.known_orphans.update(all_ids(ids_stored(raw)))
        for i, t in enumerate(self.tracked):
            if i in self.set_aside:
                continue  # a fresh document: its predecessor's files were lost
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
        if L.extras:
            # An entry nobody references must still name its own whole object: a
            # cleanup that removed it (or an upload that overwrote it) broke I2.
            for file_id in sorted(orphans - self.broken_reported - self.damaged_ids, key=str):
                content = snap.content(file_id)
                if not isinstance(content, bytes):
                    self.broken_reported.add(file_id)
                    self.violation(
                        "an unreferenced entry's object is gone or another's (I2)",
                        f"entry {file_id} (key {snap.files[file_id].get('location')}): {content!r}",
                        ops,
                    )
        # Objects and temp files no entry names: only a killed process leaves them.
        debris = snap.debris()
        killed = any(op.via == "proc" and op.kill_after is not None and op.status == "unknown"
                     for op in ops)
        objects = getattr(getattr(snap, "raw", None), "objects", {})
        planted = {f"object {k}" for k, data in self.planted_objects.items()
                   if objects.get(k) == data}  # fmt: skip
        if debris - self.known_debris - planted and not killed:
            self.violation(
                "objects or temp files left that no entry names (I2)",
                str(sorted(debris - self.known_debris - planted)),
                ops,
            )
        self.known_debris = debris
        for i in sorted(quarantine):
            await self._quarantine(i)
        while len(self.retired_pks) > 3:
            await self._delete_retired(self.retired_pks.pop(0))
        if problems:  # GridFS: remove what was reported, so it is reported once
            for file_id in snap.repair_ids():
                await db[f"{L.bucket}.files"].delete_one({"_id": file_id})
                await db[f"{L.bucket}.chunks"].delete_many({"files_id": file_id})
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
                    raise Violation(
                        dangling_kind(broken(state)), f"ghost document {pk}: {broken(state)}"
                    )
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
                raise Violation(
                    "unsaved document holds a broken file"
                    + ("" if dangling_kind(broken(mem)) == "dangling reference"
                       else f": {dangling_kind(broken(mem))}"),
                    f"doc{i}: {broken(mem)}",
                )
            t.exposed = False
            if swept:
                await self._save_refused(i, t, swept)
                return
            self._check_transition(i, prev_mem, mem, mine, "in memory")
            t.mem = mem
            return
        stored = resolve(snap, ids_stored(raw))
        if broken(stored):
            raise Violation(dangling_kind(broken(stored)), f"doc{i} {doc.pk}: {broken(stored)}")
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
                or any(op.via in ("copy", "proc") and op.effective for op in mine)
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
            fresh = await self.layout.doc.objects.get(pk=doc.pk)
            try:
                got = (
                    await fresh.f.read(),
                    tuple([await p.read() for p in fresh.files]),
                    tuple([await page.image.read() for page in fresh.pages]),
                )
            except (GridFSError, StorageError) as exc:
                raise Violation(
                    "library read of a whole stored file failed",
                    f"doc{i}: {exc!r}; stored {self._show_state(stored)}",
                ) from None
            if got != stored:
                raise Violation(
                    "library read differs from the stored bytes",
                    f"doc{i}: read {self._show_state(got)}, stored {self._show_state(stored)}",
                )
            self.stats["library reads checked"] += 1
            if self.layout.extras and self.rng.random() < 0.5:
                # Keep it: a later batch reads through it after the files changed.
                t.stale = (fresh, stored)
                self.stats["stale copies kept"] += 1

    async def _save_refused(self, i: int, t: Tracked, swept: list[str]) -> None:
        """A sweep removed files an unsaved document holds: save() must refuse."""
        coll = get_db(self.layout.alias)[self.layout.collection]
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
        if op.via == "stale":
            # Loaded batches ago: only the files it held then (or an error).
            stale = self.tracked[op.doc].stale
            assert stale is not None
            candidates.update(self._family_contents(stale[1], op.family))
        else:
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
            kind = (
                "a stale reader got the bytes of its key's next owner (I1)"
                if op.via == "stale"
                else "reader got bytes nobody committed"
            )
            self.violation(
                kind,
                f"{op.label()} returned {show(got)}; candidates {[show(c) for c in candidates]}",
                mine,
            )
        self.stats["reads checked"] += 1
        if op.via == "stale":
            self.stats["stale reads checked"] += 1

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
        L = self.layout
        state = self.frozen.pop(pk, None)
        doc = await L.doc.objects(pk=pk).first()
        if doc is None or state is None:
            return
        ids = all_ids(ids_stored(doc.to_mongo().to_dict()))
        await doc.delete()
        db = get_db(L.alias)
        left = await db[f"{L.bucket}.files"].count_documents({"_id": {"$in": ids}})
        chunks = await db[f"{L.bucket}.chunks"].count_documents({"files_id": {"$in": ids}})
        if left or chunks:
            self.violation(
                "cascade delete left files",
                f"{left} files and {chunks} chunks of deleted document {pk}",
                [],
            )
        self.stats["documents deleted (cascade checked)"] += 1

    async def _set_aside(self, damaged: set[Any], raws: dict[Any, dict[str, Any]]) -> None:
        """Documents whose files a disaster damaged leave the run (raw), as do unsaved
        ones holding such files: what remains must keep every invariant."""
        coll = get_db(self.layout.alias)[self.layout.collection]
        for pk, raw in list(raws.items()):
            if set(all_ids(ids_stored(raw))) & damaged:
                await coll.delete_one({"_id": pk})
                del raws[pk]
                self.frozen.pop(pk, None)
                self.stats["documents set aside: their files were lost"] += 1
        for i, t in enumerate(self.tracked):
            held = set(all_ids(ids_in_memory(t.doc)))
            if t.doc.pk not in raws and (held & damaged or t.stored is not None):
                self.tracked[i] = self._new_doc()
                self.set_aside.add(i)
        self.known_orphans.update(self.snap.files)

    async def _quarantine(self, i: int, why: str = "after a violation") -> None:
        """Set a broken document aside (raw), so one violation is reported once."""
        t = self.tracked[i]
        coll = get_db(self.layout.alias)[self.layout.collection]
        await coll.delete_many({"name": t.name})
        for pk in list(self.frozen):
            if (await coll.find_one({"_id": pk})) is None:
                self.frozen.pop(pk)
        self.known_orphans.update(self.snap.files)
        # Its broken files were reported with it: not again as unreferenced entries.
        self.broken_reported.update(
            i for i in self.snap.files if not isinstance(self.snap.content(i), bytes)
        )
        self.tracked[i] = self._new_doc()
        self.stats[f"documents quarantined {why}"] += 1

    # -- a run

    async def run(self) -> None:
        self.retired = []
        self.tracked = [self._new_doc() for _ in range(self.ndocs)]
        self.snap = await self.layout.snapshot(get_db(self.layout.alias))
        while self.stats["operations"] < self.target:
            await self.step()
        await self.finish()
        if self.layout.extras:
            self.stats["seconds: running batches"] += round(self.seconds_running)
            self.stats["seconds: checking batches"] += round(self.seconds_checking)

    async def finish(self) -> None:
        """Give up unsaved documents, sweep with grace 0: no orphan may remain."""
        L = self.layout
        db = get_db(L.alias)
        if L.before_finish is not None:
            await L.before_finish()
        if L.extras:
            # S3 lists times in whole seconds, which the sweep reads as the end of
            # that second (never making a young object look old): let it pass.
            await asyncio.sleep(1.1)
        for i, t in enumerate(self.tracked):
            if t.stored is None:
                self._abandon(i)
        try:
            report = await asyncassets.sweep_orphans(grace=0, buckets=L.bucket, alias=L.alias)
        except (GridFSError, StorageError) as exc:
            self.violation(f"the final sweep raised: {violation_kind(Op('sweep', error=exc))}",
                           repr(exc), [])  # fmt: skip
        else:
            self.stats["final sweep: files deleted"] += report.files_deleted
            if L.extras:
                self.stats["final sweep: objects deleted"] += report.objects_deleted
                self.stats["final sweep: temp files deleted"] += report.temps_deleted
                self.stats["final sweep: multipart uploads aborted"] += report.uploads_aborted
        snap = self.snap = await L.snapshot(db, final=True)
        referenced: set[Any] = set()
        async for raw in db[L.collection].find({}):
            state = resolve(snap, ids_stored(raw))
            if broken(state):
                self.violation(
                    f"{dangling_kind(broken(state))} at the end",
                    f"{raw['_id']}: {broken(state)}",
                    [],
                )
            referenced.update(all_ids(ids_stored(raw)))
        leftover = set(snap.files) - referenced
        if leftover:
            self.violation(
                "orphan files after the final sweep",
                f"{len(leftover)}: {sorted(map(str, leftover))}",
                [],
            )
        for kind, message in snap.final_problems():
            self.violation(kind, message, [])
        if L.hostile is not None:
            for kind, message in await L.hostile.check(self, final=True):
                self.violation(f"{kind} (final sweep)", message, [])
        for t in self.tracked:
            if t.stored is not None:
                raw = await db[L.collection].find_one({"_id": t.doc.pk})
                if raw is None or resolve(snap, ids_stored(raw)) != t.stored:
                    self.violation("final state differs from the model", f"{t.name}", [])
        try:
            report = await asyncassets.check(buckets=L.bucket, alias=L.alias, verify=L.verify)
        except (GridFSError, StorageError) as exc:
            self.violation("asyncassets.check() raised", repr(exc), [])
            return
        if L.check_all:
            wrong = not report.ok
        else:
            wrong = bool(report.dangling or report.corrupt_files or report.orphaned_chunks)
        if wrong:
            self.violation("asyncassets.check() disagrees", str(report), [])
        self.stats["invariant checks"] += 1


# -- running ---------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def races_db(uri: str, alias: str):
    name = unique_db_name(alias)
    connect(host=uri, db=name, alias=alias)
    # Classes other test modules declare on the default alias (a bare
    # GenericEmbeddedDocumentField may embed this suite's embedded documents) are
    # judged by the sweep too: it refuses to sweep while their alias is not
    # connected. Connect it, to a database of its own, for the run.
    default = None
    if DEFAULT_ALIAS not in registered_aliases():
        default = unique_db_name("races_default")
        connect(host=uri, db=default)
    try:
        yield get_db(alias)
    finally:
        with contextlib.suppress(PyMongoError):
            await asyncassets.get_client(alias).drop_database(name)
        await disconnect(alias)
        if default is not None:
            with contextlib.suppress(PyMongoError):
                await asyncassets.get_client().drop_database(default)
            await disconnect()


def print_counts(title: str, elapsed: float, total: Counter[str], kinds: Counter[str]) -> None:
    print(f"\n[{title}] {elapsed:.1f} s")
    for key, value in sorted(total.items()):
        print(f"  {key}: {value}")
    for kind, count in kinds.most_common():
        print(f"  violation: {kind}: {count}")


def write_report(violations: list[str]) -> None:
    dump = os.environ.get("RACES_REPORT")
    if dump:  # every violation, in full, for a closer look
        with open(dump, "a") as f:
            f.write("\n\n".join(violations) + "\n\n")


def seeds_from_env(seeds: list[int]) -> list[int]:
    env_seed = os.environ.get("RACES_SEED")
    return [int(env_seed)] if env_seed else seeds


def fingerprint(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:12]
