"""Races on assets: ``AssetManager.add``/``replace``/``delete`` and readers of one id at
the same time, from tasks and processes, checked against a model (I5 of issue 19).

The scheduler is the one of tests/_races_core.py, cut to what assets have: batches
of 2 to 4 operations on a few colliding ids (``photo.jpg``, ``a.txt``, ``x/y.bin``),
mostly on one id: ``add`` (renaming a taken id, or ``on_conflict="error"``),
``replace``, ``delete``, ``get`` + ``read``, ``exists``, a read through an ``Asset``
got some batches ago (stale), ``sweep_orphans(grace=0.2)``; some of them in worker
processes (tests/_race_worker.py), some of those SIGKILLed at the commit; some
cancelled; and before some batches the next write to the catalogue is applied and
then answered with an error (an unknown outcome).

What must hold (docs/assets.rst, I5):

* racing adds get distinct ids; an ``add`` never takes an id that was live and not
  deleted meanwhile (it gets a variant, or ``AssetExists`` with ``on_conflict="error"``);
* ``replace`` of a live asset succeeds or raises ``FileConflict`` (a racing replace
  won), never ``AssetNotFound`` while the asset lives; ``AssetExists`` only when
  the asset was deleted and added again meanwhile;
* ``delete`` of a live asset succeeds unless another delete of it raced;
* readers see the old or the new bytes of the asset, whole; ``exists()`` is True
  and ``get()`` finds it while it lives; a stale ``Asset`` reads its own version's
  bytes or raises ``FileDeletedWhileReading``/``FileNotFound``, never the bytes of
  the version after it;
* after every batch, read raw: the live entries (``metadata.asset_id``) are exactly
  the model's assets, each whole and byte-exact (length and SHA-256 of its object);
  no entry of a replacement or replaced version is left unless an unknown outcome
  explains it; no object without an entry;
* at the end, after ``get()`` of every id, a sweep with grace 0 leaves nothing but
  the live entries and their objects, and ``check(verify=True)`` is clean.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from _races_core import Faults, injected, show
from _races_procs import ProcessDied, Workers, decode, encode, exception_from

import asyncassets
from asyncassets.assets import AssetManager
from asyncassets.connection import get_db
from asyncassets.errors import (
    AssetExists,
    AssetNotFound,
    CorruptFile,
    FileConflict,
    FileDeletedWhileReading,
    FileNotFound,
    GridFSError,
    KeyTaken,
    StorageError,
)

IDS = ("photo.jpg", "a.txt", "x/y.bin")
WRITERS = {"add", "replace", "delete"}
READERS = {"read", "exists", "stale_read"}


@dataclass
class AssetLayout:
    """One storage the asset races run on."""

    name: str
    manager: AssetManager
    alias: str
    catalogue: str  # the storage's collection_name
    snapshot: Callable[..., Awaitable[Any]]
    length: int = 199
    spec: dict[str, Any] | None = None
    processes: int = 0
    kills: int = 0
    grace: float = 0.2


@dataclass
class AOp:
    kind: str
    asset_id: str = ""
    content: bytes | None = None
    pieces: list[bytes] = field(default_factory=list)
    mode: str = "rename"  # add: on_conflict
    via: str = "here"  # "here" or "proc"
    delay: float = 0.0
    pause: float = 0.0
    cancel_after: float | None = None
    kill_after: float | None = None
    stale: Any = None  # stale_read: (Asset, its bytes)
    status: str = "pending"  # ok, unknown, refused, missed, bad
    error: BaseException | None = None
    got: Any = None  # add: the id; read: bytes; exists: bool
    trace: list[str] = field(default_factory=list)

    def label(self) -> str:
        via = " (proc)" if self.via == "proc" else ""
        mode = " on_conflict=error" if self.kind == "add" and self.mode == "error" else ""
        content = f" {show(self.content)}" if self.content is not None else ""
        cancel = " cancelled" if self.cancel_after is not None else ""
        kill = " killed" if self.kill_after is not None else ""
        got = f" -> {self.got!r}" if self.kind in ("add", "exists") and self.status == "ok" else ""
        if self.kind in ("read", "stale_read") and self.status == "ok":
            got = f" -> {show(self.got)}"
        err = f" -> {type(self.error).__name__}: {str(self.error)[:160]}" if self.error else ""
        trace = f"  [{'; '.join(self.trace)}]" if self.trace else ""
        return (f"{self.kind} {self.asset_id}{via}{mode}{cancel}{kill}{content}: "
                f"{self.status}{got}{err}{trace}")  # fmt: skip

    @property
    def effective(self) -> bool:
        return self.kind in WRITERS and self.status in ("ok", "unknown")


class AssetRaces:
    def __init__(self, layout: AssetLayout, seed: int, operations: int, faults: Faults,
                 workers: Workers | None = None) -> None:  # fmt: skip
        self.layout = layout
        self.seed = seed
        self.rng = random.Random(seed)
        self.target = operations
        self.faults = faults
        self.workers = workers
        self.kills_left = layout.kills
        self.stats: Counter[str] = Counter()
        self.violations: list[str] = []
        self.violation_kinds: Counter[str] = Counter()
        #: The model: the bytes of every live asset.
        self.model: dict[str, bytes] = {}
        #: Assets got in an earlier batch, kept to read later: (asset, its bytes).
        self.stale: list[tuple[Any, bytes]] = []
        self.known_leftovers: set[Any] = set()
        self.known_debris: set[str] = set()
        self.batch_no = 0
        self.snap: Any = None

    # -- planning

    def _content(self, tag: str) -> bytes:
        head = f"<{tag}>".encode()
        return head + self.rng.randbytes(self.layout.length - len(head))

    def plan(self) -> list[AOp]:
        rng = self.rng
        size = rng.choice([2, 2, 3, 3, 4])
        focus = rng.choice(IDS)
        roll = rng.random()
        ops: list[AOp] = []
        if roll < 0.2:
            template = "adds of one id"
            ops += [AOp("add", focus), AOp("add", focus)]
        elif roll < 0.4:
            template = "replace vs readers"
            ops += [AOp("replace", focus), AOp(rng.choice(["read", "exists"]), focus)]
        elif roll < 0.55:
            template = "add vs replace"
            ops += [AOp("add", focus), AOp("replace", focus)]
        elif roll < 0.65:
            template = "replaces of one id"
            ops += [AOp("replace", focus), AOp("replace", focus)]
        elif roll < 0.72:
            template = "sweep vs writers"
            ops.append(AOp("sweep"))
        else:
            template = "random"
        self.stats[f"batches: {template}"] += 1
        while len(ops) < size:
            asset_id = focus if rng.random() < 0.75 else rng.choice(IDS)
            kind = rng.choice(["add", "add", "replace", "replace", "delete", "read", "read",
                               "exists", "stale_read"])  # fmt: skip
            ops.append(AOp(kind, asset_id))
        procs = 0
        for j, op in enumerate(ops):
            if op.kind in ("add", "replace"):
                op.content = self._content(f"{self.batch_no}.{j}")
                cuts = sorted(rng.sample(range(1, len(op.content)), 2))
                op.pieces = [op.content[: cuts[0]], op.content[cuts[0] : cuts[1]],
                             op.content[cuts[1] :]]  # fmt: skip
            if op.kind == "add":
                op.mode = "error" if rng.random() < 0.25 else "rename"
            op.delay = rng.choice([0.0, 0.0, rng.random() * 0.004])
            op.pause = rng.choice([0.0, 0.0005, 0.002])
            if op.kind in ("add", "delete") and rng.random() < 0.06:
                op.cancel_after = rng.random() * 0.006
            elif (
                op.kind in WRITERS | {"read", "exists"}
                and self.layout.processes
                and procs < max(1, self.layout.processes - 1)
                and rng.random() < 0.3
            ):
                op.via = "proc"
                procs += 1
                if op.kind in ("add", "replace") and rng.random() < 0.15:
                    op.kill_after = rng.random() * 0.004
                    op.pause = max(op.pause, 0.0005)
            if op.kind == "stale_read":
                if self.stale:
                    op.stale = self.stale[rng.randrange(len(self.stale))]
                else:
                    op.kind = "read"
        return ops

    # -- running

    async def _source(self, op: AOp) -> Any:
        for piece in op.pieces:
            await asyncio.sleep(op.pause)
            yield piece

    async def run_op(self, op: AOp) -> None:
        await asyncio.sleep(op.delay)
        t0 = time.monotonic()
        try:
            if op.cancel_after is not None:
                task = asyncio.ensure_future(self._run(op))
                await asyncio.sleep(op.cancel_after)
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    op.status, op.error = "unknown", None
                    self.stats["operations cancelled mid-way"] += 1
            else:
                await self._run(op)
        finally:
            op.trace.append(f"{(time.monotonic() - t0) * 1000:.1f}ms")

    async def _run(self, op: AOp) -> None:
        try:
            if op.kind == "sweep":
                await self._sweep()
            elif op.via == "proc":
                await self._in_process(op)
            else:
                await self._here(op)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            op.error = exc
            op.status = self._classify(op, exc)
        else:
            if op.status == "pending":
                op.status = "ok"

    async def _here(self, op: AOp) -> None:
        am = self.layout.manager
        if op.kind == "add":
            op.got = await am.add(
                self._source(op), op.asset_id, filename=_base(op.asset_id),
                content_type="application/octet-stream", on_conflict=op.mode,
            )  # fmt: skip
        elif op.kind == "replace":
            await am.replace(op.asset_id, self._source(op), content_type="text/plain")
        elif op.kind == "delete":
            await am.delete(op.asset_id)
        elif op.kind == "read":
            asset = await am.get(op.asset_id)
            await asyncio.sleep(op.pause)
            op.got = await asset.read()
        elif op.kind == "exists":
            op.got = await am.exists(op.asset_id)
        elif op.kind == "stale_read":
            op.got = await op.stale[0].read()

    async def _in_process(self, op: AOp) -> None:
        worker = None if self.workers is None else self.workers.take()
        if worker is None:
            self.stats["process operations run here (no process ready)"] += 1
            op.via, op.kill_after = "here", None
            await self._here(op)
            return
        if op.kill_after is not None and self.kills_left <= 0:
            op.kill_after = None
        self.stats["operations in worker processes"] += 1
        n, result = worker.send({
            "kind": f"asset_{op.kind}", "asset_id": op.asset_id, "filename": _base(op.asset_id),
            "content": encode(op.content), "pieces": [encode(p) for p in op.pieces],
            "pause": op.pause, "on_conflict": op.mode,
        })  # fmt: skip
        try:
            if op.kill_after is not None:
                if await worker.event(n, 2.0) and not result.done():
                    await asyncio.sleep(op.kill_after)
                if not result.done():
                    worker.kill()
                    self.kills_left -= 1
                    op.status = "unknown"
                    self.stats["kills: worker process mid-upload (SIGKILL)"] += 1
                    with contextlib.suppress(ProcessDied):
                        await result
                    return
                self.stats["kills that came too late (the upload had ended)"] += 1
            report = await asyncio.wait_for(result, 60)
        finally:
            assert self.workers is not None
            self.workers.give_back(worker)
        if not report["ok"]:
            raise exception_from(report)
        got = report.get("got")
        op.got = decode(got) if op.kind == "read" else got

    async def _sweep(self) -> None:
        L = self.layout
        report = await asyncassets.sweep_orphans(grace=L.grace, buckets=L.catalogue, alias=L.alias)
        self.stats["racing sweeps"] += 1
        self.stats["files deleted by racing sweeps"] += report.files_deleted

    def _classify(self, op: AOp, exc: BaseException) -> str:
        """What the operation may raise at all; whether it may now is checked later."""
        if injected(exc):
            return "unknown"
        if op.kind in ("read", "stale_read") and isinstance(
            exc, (FileDeletedWhileReading, FileNotFound, AssetNotFound)
        ):
            return "missed"
        if op.kind == "stale_read" and isinstance(exc, FileNotFound):
            return "missed"
        allowed: dict[str, tuple[type[BaseException], ...]] = {
            "add": (AssetExists,),
            "replace": (FileConflict, AssetNotFound, AssetExists),
            "delete": (AssetNotFound,),
            "exists": (),
        }
        if isinstance(exc, allowed.get(op.kind, ())) and not isinstance(exc, KeyTaken):
            return "refused"
        return "bad"

    # -- one step

    async def step(self) -> None:
        self.batch_no += 1
        ops = self.plan()
        if self.rng.random() < 0.08:
            fault = "write concern error" if self.rng.random() < 0.5 else "dropped reply"
            self.faults.armed = fault
        hits = len(self.faults.hits)
        before = dict(self.model)
        await asyncio.gather(*(self.run_op(op) for op in ops))
        self.faults.armed = None
        self.stats["injected faults"] += len(self.faults.hits) - hits
        self.stats["operations"] += len(ops)
        self.stats["concurrent batches"] += 1
        for op in ops:
            self.stats[f"outcome {op.status}"] += 1
            if op.error is not None:
                self.stats[f"raised {type(op.error).__name__}"] += 1
        await self.check(ops, before)

    def violation(self, kind: str, message: str, ops: list[AOp]) -> None:
        self.violation_kinds[kind] += 1
        plan = "\n    ".join(op.label() for op in ops)
        errors = [
            f"{op.label()}\n" + "".join(traceback.format_exception(op.error)[-4:])
            for op in ops if op.status == "bad" and op.error is not None
        ]  # fmt: skip
        self.violations.append(
            f"[assets {self.layout.name}, seed {self.seed}, batch {self.batch_no}] {kind}: "
            f"{message}\n  batch:\n    {plan}"
            + ("\n  errors:\n" + "\n".join(errors) if errors else "")
        )

    async def _live_raw(self) -> tuple[dict[str, Any], dict[str, list[Any]]]:
        """The live entries by asset id, read raw; and ids with several live entries."""
        live: dict[str, Any] = {}
        twice: dict[str, list[Any]] = {}
        for file_id, entry in self.snap.files.items():
            aid = (entry.get("metadata") or {}).get("asset_id")
            if aid is None:
                continue
            if aid in live:
                twice.setdefault(aid, [live[aid]]).append(file_id)
            live[aid] = file_id
        return live, twice

    async def check(self, ops: list[AOp], before: dict[str, bytes]) -> None:
        L = self.layout
        self.snap = snap = await L.snapshot(get_db(L.alias))
        killed = any(op.kill_after is not None and op.status == "unknown" for op in ops)
        for kind, message in snap.problems():
            if kind == "orphan chunks after the batch":
                continue  # GridFS's debris: judged below, with the objects' and temps'
            self.violation(kind, message, ops)
        live, twice = await self._live_raw()
        for aid, ids in twice.items():
            self.violation("one asset id on two live entries (I5)", f"{aid}: {ids}", ops)
        now: dict[str, Any] = {aid: snap.content(fid) for aid, fid in live.items()}
        for aid, content in now.items():
            if not isinstance(content, bytes):
                self.violation(
                    "a live asset is not whole (I1/I2)", f"{aid}: its object is {content!r}", ops
                )
        unknown = [op for op in ops if op.status == "unknown"]
        # Each operation's outcome, given what held before and what holds now.
        for op in ops:
            if op.status == "bad":
                self.violation(_bad_kind(op), repr(op.error), ops)
        adds = [op for op in ops if op.kind == "add" and op.status == "ok"]
        got_ids = [op.got for op in adds]
        if len(set(got_ids)) != len(got_ids):
            self.violation("racing adds got the same id (I5)", str(got_ids), ops)
        for op in ops:
            self._check_outcome(op, ops, before)
        # Each id holds what it held, or what an operation of the batch that succeeded
        # (or may have) gave it; exactly that when one change alone touched it.
        for aid in sorted(set(before) | set(now)):
            old, new = before.get(aid), now.get(aid)
            if new is not None and not isinstance(new, bytes):
                continue  # reported above
            allowed = self._allowed_after(aid, ops, old)
            if new not in allowed:
                self.violation(
                    "an asset holds bytes nobody committed" if new is not None
                    else "an asset vanished with no delete",
                    f"{aid}: {show(new)}; before {show(old)}; allowed {list(map(show, allowed))}",
                    ops,
                )  # fmt: skip
                continue
            writers = [o for o in ops if _writes(o, aid)]
            if len(writers) == 1 and writers[0].status == "ok":
                w = writers[0]
                expected = None if w.kind == "delete" else w.content
                if new != expected:
                    self.violation(
                        "a successful change of an asset was lost",
                        f"{aid}: {show(new)} after {w.label()}",
                        ops,
                    )
        self.model = {aid: c for aid, c in now.items() if isinstance(c, bytes)}
        # Entries that are not live: a replacement or replaced version left behind.
        others = set(snap.files) - set(live.values())
        new_left = others - self.known_leftovers
        if len(new_left) > len(unknown):
            self.violation(
                "entries of no live asset left after the batch",
                f"{len(new_left)} (unknown outcomes explain {len(unknown)}): "
                f"{[(str(i), _markers(snap.files[i])) for i in new_left]}",
                ops,
            )
        self.known_leftovers = others
        debris = snap.debris() | {f"chunks of {i}" for i in getattr(snap, "stray_chunks", set)()}
        if debris - self.known_debris and not killed:
            self.violation("objects or temp files left that no entry names (I2)",
                           str(sorted(debris - self.known_debris)), ops)  # fmt: skip
        self.known_debris = debris
        # Keep an asset now and then, to read it after later batches changed its id.
        if self.model and self.rng.random() < 0.3:
            aid = self.rng.choice(sorted(self.model))
            with contextlib.suppress(AssetNotFound):
                self.stale.append((await L.manager.get(aid), self.model[aid]))
                self.stale = self.stale[-4:]
        self.stats["invariant checks"] += 1

    def _allowed_after(self, aid: str, ops: list[AOp], old: bytes | None) -> list[Any]:
        allowed: list[Any] = [old]
        for op in ops:
            if not op.effective:
                continue
            if op.kind == "add" and (op.got == aid or (op.status == "unknown" and (
                    op.asset_id == aid or aid.startswith(op.asset_id.rsplit(".", 1)[0])))):
                allowed.append(op.content)
            elif op.kind == "replace" and op.asset_id == aid:
                allowed.append(op.content)
            elif op.kind == "delete" and op.asset_id == aid:
                allowed.append(None)
        return allowed

    def _check_outcome(self, op: AOp, ops: list[AOp], before: dict[str, bytes]) -> None:
        """Whether what the operation answered could be right, given the batch."""
        aid = op.asset_id
        others = [o for o in ops if o is not op and o.asset_id == aid]
        was_live = aid in before
        deleted = any(o.kind == "delete" and o.status != "refused" for o in others)
        added = any(o.kind == "add" and o.status in ("ok", "unknown") for o in ops)
        if op.kind == "add" and op.status == "ok":
            if op.got in before and not any(
                o.kind == "delete" and o.asset_id == op.got and o.status != "refused" for o in ops
            ):
                self.violation(
                    "an add took the id of a live asset (I5)",
                    f"add {aid} returned {op.got!r}, live before the batch and not deleted",
                    ops,
                )
        elif op.kind == "replace" and isinstance(op.error, AssetNotFound):
            if was_live and not deleted:
                self.violation(
                    "replace of a live asset raised AssetNotFound (I5)", op.label(), ops
                )
        elif op.kind == "replace" and isinstance(op.error, AssetExists):
            if not (deleted and added):
                self.violation(
                    "replace raised AssetExists with no delete and add of its id (I5)",
                    op.label(), ops,
                )  # fmt: skip
        elif op.kind == "delete" and isinstance(op.error, AssetNotFound):
            if was_live and not any(o.kind == "delete" for o in others):
                self.violation(
                    "delete of a live asset raised AssetNotFound (I5)", op.label(), ops
                )
        elif op.kind == "exists" and op.status == "ok":
            if op.got is False and was_live and not deleted:
                self.violation("exists() said False while the asset lived (I5)", op.label(), ops)
        elif op.kind == "read" and isinstance(op.error, AssetNotFound):
            if was_live and not deleted:
                self.violation(
                    "get() raised AssetNotFound while the asset lived (I5)", op.label(), ops
                )
        elif op.kind == "read" and op.status == "ok":
            candidates = [before.get(aid)] + [
                o.content for o in ops if o.kind in ("add", "replace") and o.content is not None
                and (o.asset_id == aid or o.got == aid)
            ]  # fmt: skip
            if op.got not in candidates:
                self.violation(
                    "a reader got bytes that are neither the old nor the new asset",
                    f"{op.label()}; candidates {[show(c) for c in candidates]}",
                    ops,
                )
        elif op.kind == "stale_read" and op.status == "ok":
            if op.got != op.stale[1]:
                self.violation(
                    "a stale Asset read another version's bytes (I1)",
                    f"{op.label()}; it was got holding {show(op.stale[1])}",
                    ops,
                )
        if op.kind in READERS and op.status in ("ok", "missed"):
            self.stats["reads checked"] += 1

    # -- a run

    async def run(self) -> None:
        self.snap = await self.layout.snapshot(get_db(self.layout.alias))
        while self.stats["operations"] < self.target:
            await self.step()
        await self.finish()

    async def finish(self) -> None:
        L = self.layout
        for aid in IDS:  # finishes a swap a killed process left half-done
            with contextlib.suppress(AssetNotFound):
                await L.manager.get(aid)
        await asyncio.sleep(1.1)  # S3 lists times in whole seconds (see _races_core)
        try:
            report = await asyncassets.sweep_orphans(grace=0, buckets=L.catalogue, alias=L.alias)
        except (GridFSError, StorageError) as exc:
            self.violation("the final sweep raised", repr(exc), [])
        else:
            self.stats["final sweep: files deleted"] += report.files_deleted
            self.stats["final sweep: objects deleted"] += report.objects_deleted
        self.snap = snap = await L.snapshot(get_db(L.alias), final=True)
        live, _ = await self._live_raw()
        left = set(snap.files) - set(live.values())
        if left:
            self.violation("entries of no live asset after the final sweep",
                           str([(str(i), _markers(snap.files[i])) for i in left]), [])  # fmt: skip
        for kind, message in snap.final_problems():
            self.violation(kind, message, [])
        for aid, file_id in live.items():
            content = snap.content(file_id)
            if not isinstance(content, bytes):
                self.violation("a live asset is not whole at the end", f"{aid}: {content!r}", [])
                continue
            try:
                got = await (await L.manager.get(aid)).read()
            except (AssetNotFound, FileNotFound, CorruptFile, StorageError) as exc:
                self.violation("a live asset cannot be read at the end", f"{aid}: {exc!r}", [])
                continue
            if got != content:
                self.violation("get() reads other bytes than stored", f"{aid}: {show(got)}", [])
        check = await asyncassets.check(buckets=L.catalogue, alias=L.alias, verify=True)
        if not check.ok:
            self.violation("asyncassets.check() disagrees", str(check), [])
        self.stats["invariant checks"] += 1


def _writes(op: AOp, aid: str) -> bool:
    """Whether ``op`` may change the asset ``aid`` (an add that got another id does not)."""
    if op.kind == "add":
        return op.got == aid or (op.status != "ok" and op.asset_id == aid)
    return op.kind in WRITERS and op.asset_id == aid


def _base(asset_id: str) -> str:
    return asset_id.rsplit("/", 1)[-1]


def _markers(entry: dict[str, Any]) -> dict[str, Any]:
    meta = entry.get("metadata") or {}
    return {k: meta[k] for k in ("asset_id", "asset_pending", "asset_replaced") if k in meta}


def _bad_kind(op: AOp) -> str:
    exc = op.error
    if isinstance(exc, KeyTaken):
        return "KeyTaken between library writers racing for one name (I3)"
    if isinstance(exc, StorageError) and "ENOENT" in str(exc):
        return "StorageError ENOENT: a concurrent delete pruned a writer's directory (I4)"
    if isinstance(exc, AssetNotFound) and op.kind == "exists":
        return "exists() raised AssetNotFound"
    if isinstance(exc, CorruptFile):
        return f"{op.kind} raised CorruptFile"
    return f"unexpected exception from asset {op.kind}"
