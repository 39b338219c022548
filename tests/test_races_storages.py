"""Races on every storage: a directory, an S3 bucket, queued storages, assets.

The scheduler and model of tests/_races_core.py (its docstring lists the operations
and the invariants) run here on object storages, where keys are *names*:

* ``FileSystemStorage`` and ``S3Storage`` each with the key templates
  ``"{date:%Y/%m}/{uuid}{ext}"`` (the default), ``"{filename}"``,
  ``"{field}/{filename}"``, and ``"{filename}"`` with ``overwrite=True``; every
  write names a file from a tiny set (``photo.jpg``, ``a.txt``), so keys collide
  constantly, and every content has the same length, so a file holding another's
  bytes is found only by its bytes (the SHA-256 its entry records);
* ``QueuedStorage(local=directory, remote=S3)`` and
  ``QueuedStorage(local=GridFS, remote=directory)``, with colliding templates on
  both sides, while transfer workers run: one in this process, and the
  ``asyncassets transfer`` command in a subprocess, SIGKILLed while it holds a claim
  (mid-copy) and started again;
* in all of them, worker processes (tests/_race_worker.py) change the same
  documents, some are SIGKILLed at an upload's commit, and (directory) some write
  with a full disk; a hostile user plants links in the directory (or objects in the
  bucket) and other bytes under live keys.

Assets (tests/_races_assets.py) and the S3 server killed mid-commit are below.

After every batch, besides the model's checks, read raw: every stored reference
names an entry whose object exists with exactly the entry's length and SHA-256
(byte-exact: the bytes of the operation that won); no two entries name one object;
nothing is written or removed outside a directory's root; no object or temp file is
left that no entry names unless a killed process explains it. At the end, a sweep
with grace 0 leaves no orphan entry, object, ``.*.part`` temp file or pending
multipart upload, and ``asyncassets.check(verify=True)`` reports nothing wrong.

Today (commit 3fc11f6) the templates without ``{uuid}`` break several of these:
the issue's cases 1-8. These tests are how we know the suite can fail; they pass
once the object-storage core (key reservations, a recorded object version checked
on every read, walks with ``O_NOFOLLOW``) lands.

``pytest -n 0 -s`` prints the counts; ``RACES_SEED`` replays one plan; ``RACES_REPORT``
names a file that gets every violation in full. The long run (``-m slow``) races
more than 10,000 operations across the storages.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import signal
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from _consistency import (
    BucketReader,
    Objects,
    ObjectSnapshot,
    QueuedSnapshot,
    read_directory,
    read_entries,
    snapshot_bucket,
)
from _races_assets import AssetLayout, AssetRaces
from _races_core import (
    Faults,
    Hostile,
    Layout,
    Op,
    Races,
    all_ids,
    ids_stored,
    print_counts,
    race_classes,
    races_db,
    seeds_from_env,
    show,
    storage_from_spec,
    write_report,
)
from _races_procs import Workers, die_with_parent

from asyncassets._s3server import S3Server, create_bucket
from asyncassets.assets import AssetManager
from asyncassets.connection import get_db
from asyncassets.errors import CorruptFile, FileNotFound, KeyTaken, StorageError
from asyncassets.transfers import TransferWorker

ALIAS = "races_storages"
COLLECTION = "race_storage_docs"
NAMES = ("photo.jpg", "photo.jpg", "a.txt")
LENGTH = 199  # every content: 3 GridFS chunks of 64 and 7 bytes, when GridFS is a side
TEMPLATES = {
    "uuid": ("{date:%Y/%m}/{uuid}{ext}", False),
    "filename": ("{filename}", False),
    "field-filename": ("{field}/{filename}", False),
    "filename-overwrite": ("{filename}", True),
}
TESTS_DIR = str(Path(__file__).parent)


# -- hostile users ---------------------------------------------------------------------------


class PlantedLinks(Hostile):
    """Symbolic links planted under a directory storage's root, to a directory and a
    file outside it (I4): nothing may be written, read or removed out there."""

    def __init__(self, root: Path, outside: Path, first: list[str], overwrite: bool) -> None:
        self.root = root
        self.uploads_replace = overwrite  # the storage's overwrite=True
        self.outside = outside
        #: Names planted before the first upload: where the template's first keys go.
        self.first = first
        self.seen: set[str] = set()
        self.planted: set[str] = set()
        outside.mkdir(parents=True, exist_ok=True)
        (outside / "canary.txt").write_bytes(b"<canary>" + b"c" * (LENGTH - 8))
        self.baseline = self._outside()

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for name in self.first:
            is_dir = not name.endswith((".jpg", ".txt"))
            target = self.outside if is_dir else self.outside / "canary.txt"
            os.symlink(target, self.root / name, target_is_directory=is_dir)
            self.planted.add(name)

    def _take_back(self, name: str) -> None:
        """Remove a planted link, unless an upload with ``overwrite=True`` may have
        put its object in its place (a rename over a link replaces the link): that
        is not the hostile user's to remove, and checking first would leave a gap."""
        path = self.root / name
        if self.uploads_replace and not path.is_dir():
            return
        if path.is_symlink():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def _free(self, name: str) -> bool:
        """Nothing under ``name``, its directory there, and no link on the way."""
        parent = os.path.dirname(name)
        return (
            not os.path.lexists(self.root / name)
            and (parent == "" or os.path.isdir(self.root / parent))
            and not any(os.path.islink(self.root / p) for p in _parents(name))
        )

    def _outside(self) -> dict[str, bytes]:
        found = read_directory(self.outside)
        return {**found.objects, **{f"link {k}": b"" for k in found.links}}

    async def run(self, op: Op, races: Races) -> None:
        snap = races.snap
        if self.planted and op.index % 2:
            # The hostile user takes a link away again: the name is free for real.
            name = sorted(self.planted)[op.index % len(self.planted)]
            op.style = f"unlink {name}"
            self.planted.discard(name)
            self._take_back(name)
            return
        for entry in snap.files.values():
            key = (entry.get("location") or {}).get("key")
            if isinstance(key, str):
                parts = key.split("/")
                self.seen.update("/".join(parts[:n]) for n in range(1, len(parts) + 1))
        free = sorted(name for name in self.seen if self._free(name))
        if not free:
            op.status = "refused"
            return
        name = free[op.index % len(free)]
        # A name that was a directory gets a link to a directory, a file's name a link
        # to the canary file.
        is_dir = any(s.startswith(name + "/") for s in self.seen)
        target = self.outside if is_dir else self.outside / "canary.txt"
        op.style = f"link {name} -> {'outside/' if is_dir else 'outside/canary.txt'}"
        try:
            os.symlink(target, self.root / name, target_is_directory=is_dir)
        except (FileExistsError, FileNotFoundError):
            op.status = "refused"  # an upload made it meanwhile
            return
        self.planted.add(name)
        races.stats["links planted"] += 1

    async def check(self, races: Races, final: bool) -> list[tuple[str, str]]:
        now = await asyncio.to_thread(self._outside)
        if now == self.baseline:
            return []
        added = sorted(set(now) - set(self.baseline))
        gone = sorted(set(self.baseline) - set(now))
        changed = sorted(k for k in set(now) & set(self.baseline) if now[k] != self.baseline[k])
        # Put the canary back, so that one escape is reported once.
        for name in added:
            with contextlib.suppress(OSError):
                os.unlink(self.outside / name)
        (self.outside / "canary.txt").write_bytes(self.baseline["canary.txt"])
        self.baseline = await asyncio.to_thread(self._outside)
        return [(
            "the directory storage left its root through a planted link (I4)",
            f"outside the root: written {added}, removed {gone}, changed {changed}; "
            f"links planted: {sorted(self.planted)}",
        )]

    def excuses(self, op: Op) -> bool:
        return bool(self.planted) and "link" in str(op.error).lower()

    def describe(self, op: Op) -> str | None:
        key = getattr(op.error, "key", None)
        if isinstance(op.error, KeyTaken) and key in self.planted:
            return "KeyTaken at a name where a link stood before the upload chose it (I3)"
        return None

    async def overwrite(self, key: str, data: bytes) -> None:
        def put() -> None:
            path = self.root / key
            temp = path.with_name(f"{path.name}.planted")
            temp.write_bytes(data)
            os.replace(temp, path)

        await asyncio.to_thread(put)


def _parents(name: str) -> list[str]:
    parts = name.split("/")
    return ["/".join(parts[:n]) for n in range(1, len(parts))]


class PlantedObjects(Hostile):
    """Objects put in the bucket by another tool under names the key template makes:
    an upload must never overwrite one unless ``overwrite=True`` (I2/I3)."""

    def __init__(self, reader: BucketReader, overwrite: bool) -> None:
        self.reader = reader
        self.overwrite_allowed = overwrite
        self.planted: dict[str, bytes] = {}
        self.seen: set[str] = set()

    async def run(self, op: Op, races: Races) -> None:
        snap = races.snap
        keys = ((e.get("location") or {}).get("key") for e in snap.files.values())
        self.seen.update(k for k in keys if isinstance(k, str))
        free = sorted(k for k in self.seen if k not in snap.raw.objects)
        if not free:
            op.status = "refused"
            return
        key = free[op.index % len(free)]
        data = b"<other tool>" + random.Random(op.index).randbytes(LENGTH - 12)
        op.style = f"object {key}"
        await asyncio.to_thread(self.reader.put, key, data)
        self.planted[key] = data
        races.planted_objects[key] = data
        races.stats["objects planted"] += 1

    async def check(self, races: Races, final: bool) -> list[tuple[str, str]]:
        snap = races.snap
        named = {(e.get("location") or {}).get("key") for e in snap.files.values()}
        # A racing sweep removes an object nothing names (as documented): its key is
        # then free for an upload in the same batch.
        swept = any(op.kind == "sweep" for op in races.batch_ops)
        out = []
        for key, data in list(self.planted.items()):
            now = snap.raw.objects.get(key)
            if now == data:
                continue
            del self.planted[key]
            if now is None or swept:
                continue  # swept (nothing names it), as the sweep documents
            if not self.overwrite_allowed or key not in named:
                out.append((
                    "an upload overwrote an object it did not write (I2)",
                    f"key {key!r} planted by another tool now holds other bytes",
                ))
        return out

    async def overwrite(self, key: str, data: bytes) -> None:
        await asyncio.to_thread(self.reader.put, key, data)


class ServerCrash(Hostile):
    """The S3 server killed (SIGKILL) amid a batch's commits and started again on its
    port, empty; the bucket is then restored from a backup taken batches earlier, as
    an operator would. Keys reused since (templates without ``{uuid}``) now hold a
    previous owner's bytes, of the same length.

    What must hold: operations in flight end, with a ``StorageError`` at worst; a
    read through any entry returns that entry's own bytes or raises (``CorruptFile``,
    ``FileNotFound``, ``StorageError``), never the restored bytes of another file
    (I1). Documents whose files were lost are then set aside, and the run goes on.
    """

    probes = False  # the restored backup is the probe
    rate = 0.15

    def __init__(self, server: Any, bucket: Any, reader: BucketReader, prefix: str) -> None:
        self.server = server
        self.bucket = bucket
        self.reader = reader
        self.prefix = prefix
        self.backups: list[dict[str, bytes]] = []
        self.restored: set[str] = set()
        self.crash_batch = -1
        self._batch = 1
        self.lost: set[Any] = set()

    async def run(self, op: Op, races: Races) -> None:
        if len(self.backups) < 2:
            op.status = "refused"
            return
        await asyncio.sleep((op.index % 100) / 10_000)  # amid the batch's commits
        self.crash_batch = races.batch_no
        op.style = "kill the S3 server, restart it, restore a backup"
        await asyncio.to_thread(self.server.kill)
        races.stats["kills: S3 server mid-commit (SIGKILL)"] += 1
        await asyncio.to_thread(self.server.start)  # the same port, empty
        await asyncio.to_thread(
            create_bucket, self.bucket.name, self.server.endpoint_url,
            self.bucket.access_key_id, self.bucket.secret_access_key, self.bucket.region,
        )  # fmt: skip
        backup = self.backups[0]
        self.restored = set(backup)
        for key, data in backup.items():
            await asyncio.to_thread(self.reader.put, key, data)
        # Restored objects are the operator's, as a planted one is another tool's:
        # an entry deleted later leaves one that is not its version alone, and
        # the sweep's orphan pass removes it after its grace.
        races.planted_objects.update(backup)
        races.stats["objects restored from a backup"] += len(backup)

    def planted_at(self, key: str | None) -> bool:
        # The restore put a previous owner's object back under a key that a writer
        # of the crash batch had reserved since (it was free): its commit refuses.
        return key is not None and key in self.restored

    def excuses(self, op: Op) -> bool:
        # The crash batch, and the next (a retry through the outage may end in it).
        return self.crash_batch >= 0 and self._batch - self.crash_batch in (0, 1)

    async def check(self, races: Races, final: bool) -> list[tuple[str, str]]:
        self._batch = races.batch_no + 1  # what excuses() answers for the next batch
        snap = races.snap
        self.lost = set()
        if races.batch_no % 3 == 0 and not final:
            self.backups = [*self.backups, dict(snap.raw.objects)][-2:]
        if final or races.batch_no not in (self.crash_batch, self.crash_batch + 1):
            return []
        if races.batch_no == self.crash_batch + 1:
            # What a retry or cleanup of the crash batch finished after its check.
            self.lost = {i for i in snap.files if not isinstance(snap.content(i), bytes)}
            races.known_debris |= snap.debris()
            return []
        out = []
        # Every entry of a stored document whose object is not whole any more:
        # reading it must raise, never give the bytes the backup put under its key.
        coll = get_db(races.layout.alias)[races.layout.collection]
        async for raw in coll.find({}):
            doc = None
            for file_id in all_ids(ids_stored(raw)):
                content = snap.content(file_id)
                if isinstance(content, bytes):
                    continue
                self.lost.add(file_id)
                if doc is None:
                    doc = await races.layout.doc.objects.get(pk=raw["_id"])
                proxy = _proxy_with(doc, file_id)
                try:
                    got = await proxy.read()
                except (CorruptFile, FileNotFound, StorageError):
                    races.stats["reads of lost files refused after the crash"] += 1
                    continue
                out.append((
                    "a read returned another file's bytes after the S3 server lost its data "
                    "and a backup was restored (I1)",
                    f"file {file_id} (key {snap.key(file_id)!r}, {content!r}): read {show(got)}",
                ))
        # What the restore put back that no entry names is for the sweep.
        races.known_debris |= snap.debris()
        self.lost |= {i for i in snap.files if not isinstance(snap.content(i), bytes)}
        return out

    def damaged(self, races: Races) -> set[Any]:
        return self.lost

    async def overwrite(self, key: str, data: bytes) -> None:
        await asyncio.to_thread(self.reader.put, key, data)


def _proxy_with(doc: Any, file_id: Any) -> Any:
    for proxy in [doc.f, *doc.files, *(page.image for page in doc.pages)]:
        if proxy is not None and proxy.grid_id == file_id:
            return proxy
    raise AssertionError(f"no proxy of {doc.pk} holds {file_id}")


# -- the layouts ---------------------------------------------------------------------------


class Setup:
    """Builds one run's layout: storage, classes, raw readers, workers' spec."""

    def __init__(self, tmp_path: Path, uri: str, db: Any, run: str) -> None:
        self.tmp = tmp_path / run
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.uri = uri
        self.db = db
        self.run = run
        #: In catalogue names: the classes of one run are still declared in the next
        #: (the long run makes several in one test), and one catalogue has one storage.
        self.tag = re.sub(r"\W", "_", run)
        self.readers: list[BucketReader] = []
        self.cleanups: list[Callable[[], Awaitable[None]]] = []

    def spec(self, storage: dict[str, Any], prefix: str) -> dict[str, Any]:
        return {
            "uri": self.uri, "db": self.db.name, "alias": ALIAS, "prefix": prefix,
            "collection": COLLECTION, "storage": storage,
        }  # fmt: skip

    def layout(
        self,
        name: str,
        storage_spec: dict[str, Any],
        snapshot: Callable[[Any], Awaitable[Any]],
        **kw: Any,
    ) -> Layout:
        prefix = "Race" + "".join(c for c in name.title() if c.isalnum())
        storage = storage_from_spec(storage_spec)
        doc, page = race_classes(prefix, ALIAS, COLLECTION, {"storage": storage})
        return Layout(
            name=name, doc=doc, page=page, alias=ALIAS, collection=COLLECTION,
            bucket=storage_spec["collection_name"], snapshot=snapshot, filenames=NAMES,
            equal_length=LENGTH, extras=True, spec=self.spec(storage_spec, prefix),
            verify=True, **kw,
        )  # fmt: skip

    def s3_reader(self, bucket: Any, prefix: str) -> BucketReader:
        reader = BucketReader(
            bucket.name, bucket.endpoint_url, bucket.access_key_id, bucket.secret_access_key,
            bucket.region, prefix=prefix,
        )  # fmt: skip
        self.readers.append(reader)
        return reader


def directory_spec(root: Path, name: str, template: str, overwrite: bool) -> dict[str, Any]:
    return {"kind": "filesystem", "root": str(root), "key_template": template,
            "overwrite": overwrite, "collection_name": name}  # fmt: skip


def s3_spec(bucket: Any, prefix: str, name: str, template: str, overwrite: bool) -> dict[str, Any]:
    return {"kind": "s3", "options": {**bucket.options, "prefix": prefix},
            "key_template": template, "overwrite": overwrite, "collection_name": name}  # fmt: skip


def directory_layout(setup: Setup, template_name: str, *, processes: int, kills: int) -> Layout:
    template, overwrite = TEMPLATES[template_name]
    root = setup.tmp / "root"
    catalogue = f"race_dir_{setup.tag}"
    first = {
        "uuid": [time.strftime("%Y", time.gmtime())],  # {date:%Y/%m}: root/<year> -> outside
        "filename": ["photo.jpg"],  # a link to a file outside, where photo.jpg would go
        "field-filename": ["f"],  # {field}: root/f -> outside
        "filename-overwrite": ["photo.jpg"],
    }[template_name]
    hostile = PlantedLinks(root, setup.tmp / "outside", first, overwrite)
    hostile.start()

    async def snapshot(db: Any, final: bool = False) -> ObjectSnapshot:
        files = await read_entries(db, catalogue)
        return ObjectSnapshot(files, await asyncio.to_thread(read_directory, root))

    return setup.layout(
        f"directory {template}{' overwrite' if overwrite else ''}",
        directory_spec(root, catalogue, template, overwrite), snapshot,
        processes=processes, kills=kills, disk_full=True, hostile=hostile,
    )  # fmt: skip


def s3_layout(
    setup: Setup, bucket: Any, template_name: str, *, processes: int, kills: int,
    server: Any = None,
) -> Layout:
    """An S3 bucket; with ``server`` (a moto server of its own), the hostile user
    kills it amid commits instead of planting objects."""
    template, overwrite = TEMPLATES[template_name]
    prefix = f"{setup.run}/"
    catalogue = f"race_s3_{setup.tag}"
    reader = setup.s3_reader(bucket, prefix)
    hostile: Hostile = (
        PlantedObjects(reader, overwrite) if server is None
        else ServerCrash(server, bucket, reader, prefix)
    )  # fmt: skip

    async def snapshot(db: Any, final: bool = False) -> ObjectSnapshot:
        files = await read_entries(db, catalogue)
        return ObjectSnapshot(files, await asyncio.to_thread(reader.read, final))

    return setup.layout(
        f"s3 {template}{' overwrite' if overwrite else ''}",
        s3_spec(bucket, prefix, catalogue, template, overwrite), snapshot,
        processes=processes, kills=kills, hostile=hostile,
    )  # fmt: skip


async def read_chunks(db: Any, bucket: str) -> dict[Any, dict[int, bytes]]:
    chunks: dict[Any, dict[int, bytes]] = {}
    async for c in db[f"{bucket}.chunks"].find({}, {"files_id": 1, "n": 1, "data": 1}):
        chunks.setdefault(c["files_id"], {})[c["n"]] = bytes(c["data"])
    return chunks


class Transfers:
    """The transfer workers of a queued layout: one in this process, and the
    ``asyncassets transfer --forever`` command in a subprocess, which a chaos task
    SIGKILLs while it holds a claim (mid-copy) and starts again."""

    def __init__(self, setup: Setup, spec: dict[str, Any], store: Any, seed: int,
                 kills: int) -> None:
        self.setup = setup
        self.spec = spec
        self.store = store
        self.rng = random.Random(seed)
        self.kills_left = kills
        self.stats: Counter[str] = Counter()
        self.worker: TransferWorker | None = None
        self.command: asyncio.subprocess.Process | None = None
        self.chaos: asyncio.Task[None] | None = None
        self.stopped = False
        module = f"race_transfer_models_{setup.run.replace('-', '_')}"
        (setup.tmp / f"{module}.py").write_text(
            "import json, sys\n"
            f"sys.path.insert(0, {TESTS_DIR!r})\n"
            "from _races_core import race_classes, storage_from_spec\n"
            f"storage = storage_from_spec(json.loads({json.dumps(spec['storage'])!r}))\n"
            f"Doc, Page = race_classes('Cli', 'default', {COLLECTION!r}, {{'storage': storage}})\n"
        )
        self.module = module

    async def start(self) -> None:
        # Polls are claims (a find_one_and_update each): not so often that they load
        # the server; uploads in this process wake this worker at once anyway.
        self.worker = TransferWorker([self.store], concurrency=2, poll_interval=0.2)
        await self.worker.start()
        await self._start_command()
        self.chaos = asyncio.ensure_future(self._chaos())

    async def _start_command(self) -> None:
        self.command = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "asyncassets", "--uri", self.setup.uri,
            "--db", self.setup.db.name, "--import", self.module, "transfer", "--forever",
            "--poll", "0.1", "-c", "2", "--shutdown-timeout", "5",
            cwd=self.setup.tmp, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL, preexec_fn=die_with_parent,
        )  # fmt: skip
        self.stats["transfer command processes started"] += 1

    async def _chaos(self) -> None:
        """Kill the transfer command while it holds a claim, now and then."""
        while self.kills_left > 0:
            await asyncio.sleep(0.3 + self.rng.random())
            assert self.command is not None
            pid = self.command.pid
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                held = await self.store.files.find_one(
                    {"transfer.state": "running", "transfer.worker": {"$regex": f":{pid}:"}},
                    {"_id": 1},
                )
                if held is not None:
                    await asyncio.sleep(self.rng.random() * 0.005)
                    self.command.send_signal(signal.SIGKILL)
                    await self.command.wait()
                    self.kills_left -= 1
                    self.stats["kills: transfer command holding a claim (SIGKILL)"] += 1
                    await self._start_command()
                    break
                await asyncio.sleep(0.002)

    async def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        if self.chaos is not None:
            self.chaos.cancel()
            with contextlib.suppress(BaseException):
                await self.chaos
        if self.command is not None and self.command.returncode is None:
            self.command.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.command.wait(), 20)
            except TimeoutError:
                self.command.kill()
                await self.command.wait()
        if self.worker is not None:
            stats = await self.worker.stop()
            self.stats["transfers done in this process"] += stats.transferred
            self.stats["transfers gone (file deleted or replaced meanwhile)"] += stats.gone
            self.stats["transfers to retry"] += stats.retried
            self.worker = None
        counts = await self.store.counts()
        for state, n in counts.items():
            self.stats[f"files at the end: transfer {state}"] += n


def queued_layout(
    setup: Setup, kind: str, bucket: Any, *, processes: int, kills: int, seed: int,
    transfer_kills: int,
) -> tuple[Layout, Transfers]:
    catalogue = f"race_q_{setup.tag}"
    if kind == "fs-s3":
        # The spool's directories are emptied and pruned after each transfer (case 5).
        local = directory_spec(setup.tmp / "spool", catalogue, "{field}/{filename}", False)
        prefix = f"{setup.run}/"
        remote = s3_spec(bucket, prefix, catalogue, "{filename}", False)
        reader = setup.s3_reader(bucket, prefix)
        read_remote: Callable[[bool], Objects] = reader.read
    else:
        local = {"kind": "gridfs", "collection_name": catalogue, "chunk_size": 64}
        remote = directory_spec(setup.tmp / "remote", catalogue, "{field}/{filename}", False)
        remote_root = setup.tmp / "remote"

        def read_remote(final: bool) -> Objects:
            return read_directory(remote_root)

    storage_spec = {"kind": "queued", "collection_name": catalogue, "local": local,
                    "remote": remote, "lease": 1.0}  # fmt: skip

    async def read_once(db: Any, final: bool) -> QueuedSnapshot:
        files = await read_entries(db, catalogue)
        if local["kind"] == "filesystem":
            spool: Objects | None = await asyncio.to_thread(read_directory, local["root"])
            chunks: dict[Any, dict[int, bytes]] = {}
        else:
            spool, chunks = None, await read_chunks(db, catalogue)
        return QueuedSnapshot(files, spool, chunks, await asyncio.to_thread(read_remote, final))

    async def snapshot(db: Any, final: bool = False) -> QueuedSnapshot:
        # Transfers keep switching entries while the catalogue and both sides are
        # read one after the other: a file caught mid-switch looks broken for a
        # moment. Read again until nothing looks broken (a real loss stays).
        for _ in range(5):
            snap = await read_once(db, final)
            if all(isinstance(snap.content(i), bytes) for i in snap.files):
                break
            await asyncio.sleep(0.05)
        return snap

    layout = setup.layout(
        f"queued {kind}", storage_spec, snapshot, processes=processes, kills=kills,
        disk_full=local["kind"] == "filesystem",
    )  # fmt: skip
    store = storage_from_spec(storage_spec).bind(setup.db)
    transfers = Transfers(setup, layout.spec or {}, store, seed, transfer_kills)
    layout.before_finish = transfers.stop
    return layout, transfers


# -- running -----------------------------------------------------------------------------


Build = Callable[[Setup, int], Any]


async def race(
    build: Build,
    *,
    uri: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    seeds: list[int],
    operations: int,
    title: str,
) -> tuple[Counter[str], list[str], Counter[str]]:
    """Run the scheduler on the layouts ``build`` makes, one run per seed."""
    faults = Faults(COLLECTION)
    faults.install(monkeypatch)
    total: Counter[str] = Counter()
    violations: list[str] = []
    kinds: Counter[str] = Counter()
    started = time.monotonic()
    seeds = seeds_from_env(seeds)
    for seed in seeds:
        async with races_db(uri, ALIAS) as db:
            setup = Setup(tmp_path, uri, db, f"{title}-{seed}".replace(" ", "-"))
            built = build(setup, seed)
            layout, transfers = built if isinstance(built, tuple) else (built, None)
            workers = None
            if layout.processes and layout.spec is not None:
                workers = Workers(layout.spec, setup.tmp, layout.processes)
                workers.start()
            try:
                if transfers is not None:
                    await transfers.start()
                races = Races(layout, seed, operations, faults, workers=workers)
                await races.run()
            finally:
                if transfers is not None:
                    await transfers.stop()
                    total.update(transfers.stats)
                if workers is not None:
                    await workers.close()
                    total["worker processes started"] += workers.started
                for reader in setup.readers:
                    reader.close()
        total.update(races.stats)
        violations += races.violations
        kinds.update(races.violation_kinds)
    total["runs"] = len(seeds)
    total["invariant violations"] = len(violations)
    print_counts(f"{title}, seeds {seeds}", time.monotonic() - started, total, kinds)
    write_report(violations)
    return total, violations, kinds


def verdict(total: Counter[str], violations: list[str], kinds: Counter[str]) -> None:
    assert not violations, (
        f"{len(violations)} invariant violations in {total['operations']} operations "
        f"({dict(kinds)}); the first ones:\n\n" + "\n\n".join(violations[:5])
    )
    assert total["concurrent batches"] > 0


# -- the tests: a directory, S3 ----------------------------------------------------------------


# The default run races the templates whose keys collide ({filename}, with and
# without overwrite: the class of bug the key reservations close); {uuid} and
# {field}/{filename} run with -m slow here and in the long run below.
DEFAULT_TEMPLATES = [
    t if t in ("filename", "filename-overwrite") else pytest.param(t, marks=pytest.mark.slow)
    for t in TEMPLATES
]


@pytest.mark.parametrize("template", DEFAULT_TEMPLATES)
async def test_racing_operations_on_a_directory_keep_every_invariant(
    asyncassets_server_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, template: str
) -> None:
    """Racing tasks and processes, full disks and planted links on a directory storage:
    byte-exact files, no file given another's bytes, nothing outside the root."""
    result = await race(
        lambda setup, seed: directory_layout(setup, template, processes=2, kills=1),
        uri=asyncassets_server_uri, tmp_path=tmp_path, monkeypatch=monkeypatch,
        seeds=[1], operations=150, title=f"directory {template}",
    )  # fmt: skip
    verdict(*result)


@pytest.mark.parametrize("template", DEFAULT_TEMPLATES)
async def test_racing_operations_on_s3_keep_every_invariant(
    asyncassets_server_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    asyncassets_s3_bucket: Any, template: str,
) -> None:
    """Racing tasks and processes and planted objects on an S3 bucket: byte-exact
    files, no file given another's bytes, no object overwritten that it did not write."""
    result = await race(
        lambda setup, seed: s3_layout(setup, asyncassets_s3_bucket, template, processes=2,
                                      kills=1),
        uri=asyncassets_server_uri, tmp_path=tmp_path, monkeypatch=monkeypatch,
        seeds=[31], operations=60, title=f"s3 {template}",
    )  # fmt: skip
    verdict(*result)


@pytest.mark.parametrize("kind", ["fs-s3", "gridfs-fs"])
async def test_racing_operations_on_a_queued_storage_keep_every_invariant(
    asyncassets_server_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest, kind: str,
) -> None:
    """Racing uploads, reads and deletes while transfer workers (one here, the
    ``asyncassets transfer`` command, SIGKILLed mid-copy and restarted) move the files."""
    bucket = request.getfixturevalue("asyncassets_s3_bucket") if kind == "fs-s3" else None
    result = await race(
        lambda setup, seed: queued_layout(setup, kind, bucket, processes=2, kills=1, seed=seed,
                                          transfer_kills=1),
        uri=asyncassets_server_uri, tmp_path=tmp_path, monkeypatch=monkeypatch,
        seeds=[41], operations=80 if kind == "fs-s3" else 120, title=f"queued {kind}",
    )  # fmt: skip
    verdict(*result)


# -- assets ------------------------------------------------------------------------------------


def asset_layout(setup: Setup, kind: str, bucket: Any, *, processes: int, kills: int) -> Any:
    catalogue = f"race_assets_{setup.tag}"
    if kind == "gridfs":
        storage_spec: dict[str, Any] = {"kind": "gridfs", "collection_name": catalogue,
                                        "chunk_size": 64}  # fmt: skip

        async def snapshot(db: Any, final: bool = False) -> Any:
            return await snapshot_bucket(db, catalogue)

    elif kind == "directory":
        root = setup.tmp / "assets"
        storage_spec = directory_spec(root, catalogue, "{filename}", False)

        async def snapshot(db: Any, final: bool = False) -> Any:
            files = await read_entries(db, catalogue)
            return ObjectSnapshot(files, await asyncio.to_thread(read_directory, root))

    else:
        prefix = f"{setup.run}/"
        storage_spec = s3_spec(bucket, prefix, catalogue, "{field}/{filename}", False)
        reader = setup.s3_reader(bucket, prefix)

        async def snapshot(db: Any, final: bool = False) -> Any:
            files = await read_entries(db, catalogue)
            return ObjectSnapshot(files, await asyncio.to_thread(reader.read, final))

    manager = AssetManager(storage_from_spec(storage_spec), alias=ALIAS)
    spec = {**setup.spec(storage_spec, "RaceAssets"), "assets": True}
    return AssetLayout(
        name=f"{kind} {storage_spec.get('key_template', '')}".strip(), manager=manager,
        alias=ALIAS, catalogue=catalogue, snapshot=snapshot, length=LENGTH, spec=spec,
        processes=processes, kills=kills,
    )  # fmt: skip


async def race_assets(
    kind: str, *, uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bucket: Any,
    seeds: list[int], operations: int, processes: int = 3, kills: int = 1,
) -> tuple[Counter[str], list[str], Counter[str]]:
    faults = Faults("")  # set per run: the catalogue (an add's claim, a replace's swap)
    faults.install(monkeypatch)
    total: Counter[str] = Counter()
    violations: list[str] = []
    kinds: Counter[str] = Counter()
    started = time.monotonic()
    seeds = seeds_from_env(seeds)
    for seed in seeds:
        async with races_db(uri, ALIAS) as db:
            setup = Setup(tmp_path, uri, db, f"assets-{kind}-{seed}")
            layout = asset_layout(setup, kind, bucket, processes=processes, kills=kills)
            faults.collection = f"{layout.catalogue}.files"
            workers = None
            if layout.processes:
                workers = Workers(layout.spec or {}, setup.tmp, layout.processes)
                workers.start()
            try:
                races = AssetRaces(layout, seed, operations, faults, workers=workers)
                await races.run()
            finally:
                if workers is not None:
                    await workers.close()
                    total["worker processes started"] += workers.started
                for reader in setup.readers:
                    reader.close()
        total.update(races.stats)
        violations += races.violations
        kinds.update(races.violation_kinds)
    total["runs"] = len(seeds)
    total["invariant violations"] = len(violations)
    print_counts(f"assets {kind}, seeds {seeds}", time.monotonic() - started, total, kinds)
    write_report(violations)
    return total, violations, kinds


@pytest.mark.parametrize("kind", ["gridfs", "directory", "s3"])
async def test_racing_asset_operations_keep_every_invariant(
    asyncassets_server_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest, kind: str,
) -> None:
    """Adds, replaces, deletes and readers of a few colliding asset ids, from tasks and
    processes: distinct ids for racing adds, one winner among replaces, readers that
    see the old or the new asset, byte-exact."""
    bucket = request.getfixturevalue("asyncassets_s3_bucket") if kind == "s3" else None
    result = await race_assets(
        kind, uri=asyncassets_server_uri, tmp_path=tmp_path, monkeypatch=monkeypatch,
        bucket=bucket, seeds=[51], operations=50 if kind == "s3" else 100, processes=2,
    )  # fmt: skip
    verdict(*result)


# -- the S3 server killed mid-commit ---------------------------------------------------------


@pytest.fixture
def own_s3_server() -> Any:
    """A moto server for one test: killing it hurts no other test."""
    server = S3Server().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def own_s3_bucket(own_s3_server: Any) -> Any:
    return _bucket_on(own_s3_server, "crash")


@pytest.mark.parametrize(
    "template", ["filename", pytest.param("uuid", marks=pytest.mark.slow)]
)
async def test_an_s3_server_killed_mid_commit_and_restored_never_serves_another_files_bytes(
    asyncassets_server_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    own_s3_server: Any, own_s3_bucket: Any, template: str,
) -> None:
    """The moto server SIGKILLed amid racing commits, restarted empty on its port, its
    bucket restored from a backup of some batches before: uploads in flight end with
    a StorageError at worst, and no read returns the bytes the backup put under a
    key another file owns now (I1); the documents that lost files are set aside and
    the race goes on with every invariant."""
    result = await race(
        lambda setup, seed: s3_layout(setup, own_s3_bucket, template, processes=2, kills=0,
                                      server=own_s3_server),
        uri=asyncassets_server_uri, tmp_path=tmp_path, monkeypatch=monkeypatch,
        seeds=[61], operations=80, title=f"s3 crash {template}",
    )  # fmt: skip
    assert result[0]["kills: S3 server mid-commit (SIGKILL)"] > 0
    verdict(*result)


# -- the long run -------------------------------------------------------------------------------


@pytest.mark.slow
async def test_racing_operations_on_every_storage_long(
    asyncassets_server_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    asyncassets_s3_bucket: Any,
) -> None:
    """More than 10,000 racing operations across every storage, template and asset
    catalogue, with worker processes, kills (worker processes mid-upload, the transfer
    command mid-copy, the S3 server mid-commit) and hostile changes; prints the counts
    (``-s``). ``RACES_SEED`` replays one seed everywhere; ``RACES_OPERATIONS`` sets
    the operations of each run (default: about 10,500 in all)."""
    per_run = int(os.environ.get("RACES_OPERATIONS", "0")) or None
    common = {"uri": asyncassets_server_uri, "tmp_path": tmp_path, "monkeypatch": monkeypatch}
    results: list[tuple[str, Counter[str], list[str], Counter[str]]] = []

    async def run(title: str, build: Build, operations: int, seed: int) -> None:
        total, violations, kinds = await race(
            build, seeds=[seed], operations=per_run or operations, title=title, **common
        )
        results.append((title, total, violations, kinds))

    for n, template in enumerate(TEMPLATES):
        await run(f"directory {template}",
                  lambda setup, seed, t=template: directory_layout(setup, t, processes=3, kills=8),
                  800, 100 + n)  # fmt: skip
    for n, template in enumerate(TEMPLATES):
        await run(f"s3 {template}",
                  lambda setup, seed, t=template: s3_layout(setup, asyncassets_s3_bucket, t,
                                                            processes=3, kills=6),
                  500, 200 + n)  # fmt: skip
    for n, kind in enumerate(["fs-s3", "gridfs-fs"]):
        await run(f"queued {kind}",
                  lambda setup, seed, k=kind: queued_layout(
                      setup, k, asyncassets_s3_bucket, processes=3, kills=5, seed=seed,
                      transfer_kills=6),
                  900, 300 + n)  # fmt: skip
    for n, template in enumerate(["filename", "uuid"]):
        server = S3Server().start()
        try:
            bucket = _bucket_on(server, f"crash-{template}")
            await run(f"s3 crash {template}",
                      lambda setup, seed, t=template, b=bucket, s=server: s3_layout(
                          setup, b, t, processes=2, kills=2, server=s),
                      500, 400 + n)  # fmt: skip
        finally:
            server.stop()
    for n, kind in enumerate(["gridfs", "directory", "s3"]):
        total, violations, kinds = await race_assets(
            kind, seeds=seeds_from_env([500 + n]), operations=per_run or 700,
            bucket=asyncassets_s3_bucket, kills=4, **common,
        )  # fmt: skip
        results.append((f"assets {kind}", total, violations, kinds))

    grand: Counter[str] = Counter()
    kinds_all: Counter[str] = Counter()
    print("\n[races on every storage] per run:")
    for title, total, violations, kinds in results:
        kills = sum(v for k, v in total.items() if k.startswith("kills:"))
        processes = total["worker processes started"] + total["transfer command processes started"]
        print(f"  {title:28} {total['operations']:6} operations, {processes:3} processes, "
              f"{kills:3} kills, {len(violations):4} violations")  # fmt: skip
        grand.update(total)
        kinds_all.update(kinds)
    kills = {k: v for k, v in grand.items() if k.startswith("kills:")}
    print(f"[races on every storage] {grand['operations']} operations, "
          f"{grand['worker processes started'] + grand['transfer command processes started']} "
          f"processes, {sum(kills.values())} kills ({kills}), "
          f"{grand['invariant violations']} violations")  # fmt: skip
    for kind, count in kinds_all.most_common():
        print(f"  violation: {kind}: {count}")
    assert grand["operations"] >= (10_000 if per_run is None else 0)
    assert not grand["invariant violations"], (
        f"{grand['invariant violations']} violations: {dict(kinds_all)}; the first ones:\n\n"
        + "\n\n".join(v for _, _, vs, _ in results for v in vs[:2])
    )


def _bucket_on(server: Any, hint: str) -> Any:
    from asyncassets._s3server import FAKE_CREDENTIALS, unique_bucket_name
    from asyncassets.testing import S3Bucket

    bucket = S3Bucket(name=unique_bucket_name(hint), endpoint_url=server.endpoint_url,
                      region="us-east-1", **FAKE_CREDENTIALS)  # fmt: skip
    create_bucket(bucket.name, bucket.endpoint_url, bucket.access_key_id,
                  bucket.secret_access_key, bucket.region)  # fmt: skip
    return bucket
