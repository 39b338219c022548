"""QueuedStorage: save locally, transfer to a remote storage in the background, durably.

Real storages only: directories under ``tmp_path``, GridFS in the test's database,
and buckets on the S3 test server (moto on loopback). Failures are real too: a
remote directory made unwritable, a bucket that does not exist yet, a worker
process killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import inspect
import itertools
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import asyncassets
from asyncassets import Document, check, sweep_orphans
from asyncassets.errors import GridFSError, TransferFailed
from asyncassets.fields import FileField, StringField
from asyncassets.storage import (
    FileSystemStorage,
    GridFSStorage,
    QueuedStorage,
    QueuedStore,
    S3Storage,
)
from asyncassets.transfers import TransferWorker, retry_failed

KIB = 1024
MIB = 1024 * KIB
_names = itertools.count()


def payload(size: int, seed: int = 0) -> bytes:
    block = hashlib.sha256(str(seed).encode()).digest()
    return (block * (size // len(block) + 1))[:size]


def s3_remote(request: pytest.FixtureRequest, name: str, **kw: Any) -> S3Storage:
    bucket = request.getfixturevalue("asyncassets_s3_bucket")
    return S3Storage(**{**bucket.options, "prefix": f"{name}/", "part_size": 5 * MIB, **kw})


def queued(
    local_kind: str,
    remote_kind: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    **kw: Any,
) -> QueuedStorage:
    name = f"q{next(_names)}"
    local: Any = (
        GridFSStorage(name, chunk_size=64 * KIB)
        if local_kind == "gridfs"
        else FileSystemStorage(tmp_path / f"{name}-local", fsync=False)
    )
    remote: Any = (
        s3_remote(request, name)
        if remote_kind == "s3"
        else FileSystemStorage(tmp_path / f"{name}-remote", fsync=False)
    )
    kw.setdefault("retry_delay", 0.05)
    kw.setdefault("max_retry_delay", 0.2)
    return QueuedStorage(local=local, remote=remote, collection_name=name, **kw)


def doc_class(storage: QueuedStorage) -> Any:
    n = next(_names)
    return type(
        f"QueuedDoc{n}",
        (Document,),
        {
            "name": StringField(),
            "photo": FileField(storage=storage),
            "meta": {"collection": f"queued_docs_{n}"},
        },
    )


def store_of(storage: QueuedStorage) -> QueuedStore:
    return storage.bind(asyncassets.get_db())


async def local_objects(storage: QueuedStorage) -> list[str]:
    """What holds local bytes: GridFS chunks (``files_id/n``) or the directory's keys."""
    if isinstance(storage.local, GridFSStorage):
        chunks = asyncassets.get_db()[f"{storage.collection_name}.chunks"]
        return [f"{c['files_id']}/{c['n']}" async for c in chunks.find({}, {"files_id": 1, "n": 1})]
    return sorted([info.key async for info in storage.local.blobs().list()])


async def remote_objects(storage: QueuedStorage) -> list[str]:
    return sorted([info.key async for info in storage.remote.blobs().list()])


async def entry_of(storage: QueuedStorage, file_id: Any) -> dict[str, Any]:
    doc = await store_of(storage).find(file_id)
    assert doc is not None
    return doc


async def run_all(storage: QueuedStorage, concurrency: int = 1) -> Any:
    return await TransferWorker([store_of(storage)], concurrency=concurrency).run_once()


LAYOUTS = [("filesystem", "filesystem"), ("gridfs", "s3"), ("filesystem", "s3")]


@pytest.mark.parametrize(("local_kind", "remote_kind"), LAYOUTS)
async def test_an_upload_is_served_locally_then_transferred_and_served_remotely(
    asyncassets_db: Any, request: pytest.FixtureRequest, tmp_path: Path,
    local_kind: str, remote_kind: str,
) -> None:
    storage = queued(local_kind, remote_kind, request, tmp_path)
    Doc = doc_class(storage)
    data = payload(300 * KIB)
    doc = Doc(name="a")
    await doc.photo.put(data, content_type="image/jpeg", filename="a.jpg")
    await doc.save()

    entry = await entry_of(storage, doc.photo.file_id)
    assert entry["transfer"]["state"] == "pending"
    assert entry["local"] == local_kind and "remote" not in entry
    assert doc.photo.location == "local"
    assert doc.photo.metadata == {"content_type": "image/jpeg"}  # no queue internals
    assert await local_objects(storage) and not await remote_objects(storage)
    assert await doc.photo.read() == data

    stats = await run_all(storage)
    assert stats.transferred == 1 and stats.copied_bytes == len(data)

    entry = await entry_of(storage, doc.photo.file_id)
    assert entry["transfer"]["state"] == "done" and entry["transfer"]["attempts"] == 1
    assert "local" not in entry and "location" not in entry  # delete_local=True
    assert not await local_objects(storage)
    assert await remote_objects(storage) == [entry["remote"]["key"]]
    fresh = await Doc.objects.get(pk=doc.pk)
    await fresh.photo.load()
    assert fresh.photo.location == "remote"
    assert await fresh.photo.read() == data
    assert await fresh.photo.verify()
    parts = [p async for p in fresh.photo.stream(start=1000, end=200 * KIB)]
    assert b"".join(parts) == data[1000 : 200 * KIB]

    await fresh.photo.delete()
    assert not await local_objects(storage) and not await remote_objects(storage)
    assert await store_of(storage).files.count_documents({}) == 0


async def test_delete_local_false_keeps_the_local_copy_until_the_file_is_deleted(
    asyncassets_db: Any, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    storage = queued("filesystem", "filesystem", request, tmp_path, delete_local=False)
    Doc = doc_class(storage)
    doc = Doc()
    await doc.photo.put(b"kept", filename="k.txt")
    await doc.save()
    await run_all(storage)
    entry = await entry_of(storage, doc.photo.file_id)
    assert entry["transfer"]["state"] == "done" and entry["local"] == "filesystem"
    assert len(await local_objects(storage)) == 1 and len(await remote_objects(storage)) == 1
    await doc.photo.load()
    assert doc.photo.location == "remote"
    await doc.photo.delete()
    assert not await local_objects(storage) and not await remote_objects(storage)


async def test_delayed_files_wait_for_transfer_and_transfer_reports_the_location(
    asyncassets_db: Any, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    storage = queued("gridfs", "filesystem", request, tmp_path, delayed=True)
    Doc = doc_class(storage)
    doc = Doc()
    await doc.photo.put(b"raw image", filename="r.png")
    await doc.save()
    assert (await entry_of(storage, doc.photo.file_id))["transfer"]["state"] == "held"
    stats = await run_all(storage)
    assert stats.transferred == 0  # held: workers leave it alone
    assert await doc.photo.transfer() == "remote"
    assert doc.photo.location == "remote"
    assert await doc.photo.read() == b"raw image"
    assert await doc.photo.transfer() == "remote"  # again: nothing to do

    other = Doc()
    await other.photo.put(b"later", filename="l.png")
    await other.save()
    assert await other.photo.transfer(background=True) == "local"
    assert (await entry_of(storage, other.photo.file_id))["transfer"]["state"] == "pending"
    assert (await run_all(storage)).transferred == 1


async def test_transfer_on_another_storage_says_what_is_wrong(asyncassets_db: Any) -> None:
    Plain = type("PlainDoc", (Document,), {"photo": FileField(),
                                           "meta": {"collection": "plain_docs_q"}})
    doc = Plain()
    await doc.photo.put(b"x")
    with pytest.raises(GridFSError, match="not a QueuedStorage"):
        await doc.photo.transfer()
    await doc.photo.load()
    assert doc.photo.location is None


# -- failures, retries, the failed state ----------------------------------------------


async def wait_for_state(storage: QueuedStorage, file_id: Any, states: set[str],
                         *, worker: TransferWorker | None = None, timeout: float = 20) -> dict:
    """Run due transfers (with ``worker``) until the file's state is one of ``states``."""
    worker = worker or TransferWorker([store_of(storage)], concurrency=1)
    deadline = time.monotonic() + timeout
    while True:
        entry = await entry_of(storage, file_id)
        if entry["transfer"]["state"] in states:
            return entry
        assert time.monotonic() < deadline, f"still {entry['transfer']} after {timeout} s"
        await worker.run_once()
        await asyncio.sleep(0.05)


async def test_a_remote_directory_that_refuses_is_retried_with_backoff_until_it_accepts(
    asyncassets_db: Any, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    storage = queued("gridfs", "filesystem", request, tmp_path, max_attempts=5)
    remote_root = Path(storage.remote.root)  # type: ignore[attr-defined]
    remote_root.parent.mkdir(parents=True, exist_ok=True)
    remote_root.write_bytes(b"a file where the directory should be")  # noqa: ASYNC240  (every write fails)
    Doc = doc_class(storage)
    doc = Doc()
    data = payload(100 * KIB, 1)
    await doc.photo.put(data, filename="x.bin")
    await doc.save()
    worker = TransferWorker([store_of(storage)], concurrency=1)
    while (entry := await entry_of(storage, doc.photo.file_id))["transfer"]["attempts"] < 2:
        await worker.run_once()
        await asyncio.sleep(0.05)
    assert entry["transfer"]["state"] == "pending"
    assert entry["transfer"]["next_try"] > entry["transfer"]["failed_at"]  # backed off
    assert "StorageError" in entry["transfer"]["error"]
    assert await doc.photo.read() == data  # still served locally
    remote_root.unlink()  # noqa: ASYNC240  (the remote recovers)
    entry = await wait_for_state(storage, doc.photo.file_id, {"done", "failed"}, worker=worker)
    assert entry["transfer"]["state"] == "done" and entry["transfer"]["attempts"] == 3
    assert worker.stats.retried == 2 and worker.stats.transferred == 1
    assert await Doc.objects.get(pk=doc.pk) and await doc.photo.read() == data
    assert not await local_objects(storage)


async def test_a_bucket_that_does_not_exist_yet_fails_the_transfer_until_retried_by_hand(
    asyncassets_db: Any, tmp_path: Path, asyncassets_s3_endpoint: str,
    request: pytest.FixtureRequest,
) -> None:
    from asyncassets._s3server import (
        FAKE_CREDENTIALS,
        create_bucket,
        delete_bucket,
        unique_bucket_name,
    )

    bucket = unique_bucket_name("later")
    name = f"q{next(_names)}"
    storage = QueuedStorage(
        local=FileSystemStorage(tmp_path / "spool", fsync=False),
        remote=S3Storage(bucket, endpoint_url=asyncassets_s3_endpoint, region="us-east-1",
                         prefix="p/", retry=None, **FAKE_CREDENTIALS),
        collection_name=name, max_attempts=2, retry_delay=0.05, max_retry_delay=0.1,
    )
    Doc = doc_class(storage)
    doc = Doc()
    await doc.photo.put(b"waiting for its bucket", filename="w.txt")
    await doc.save()
    entry = await wait_for_state(storage, doc.photo.file_id, {"failed", "done"})
    assert entry["transfer"]["state"] == "failed" and entry["transfer"]["attempts"] == 2
    assert "bucket" in entry["transfer"]["error"].lower()

    assert (await run_all(storage)).transferred == 0  # failed: left alone
    with pytest.raises(TransferFailed) as caught:
        await doc.photo.transfer()  # one more attempt by hand: still no bucket
    assert caught.value.state == "failed"
    assert await doc.photo.read() == b"waiting for its bucket"

    where = (asyncassets_s3_endpoint, FAKE_CREDENTIALS["access_key_id"],
             FAKE_CREDENTIALS["secret_access_key"], "us-east-1")
    create_bucket(bucket, *where)
    try:
        report = await check(buckets=[name])
        assert not report.ok and report.failed_transfers == 1
        assert report.failed_transfer_list[0].file_id == doc.photo.file_id
        assert "1 failed" in str(report)
        assert await retry_failed(buckets=[name]) == 1
        entry = await entry_of(storage, doc.photo.file_id)
        assert entry["transfer"]["state"] == "pending" and entry["transfer"]["attempts"] == 0
        assert (await run_all(storage)).transferred == 1
        await doc.photo.load()
        assert doc.photo.location == "remote"
        assert await doc.photo.read() == b"waiting for its bucket"
        assert (await check(buckets=[name])).ok
        await doc.photo.delete()
        assert not await remote_objects(storage)
    finally:
        await storage.remote.blobs().aclose()  # type: ignore[attr-defined]
        delete_bucket(bucket, *where)


# -- reads in every phase ----------------------------------------------------------------


@pytest.mark.parametrize(("local_kind", "remote_kind"), [("gridfs", "filesystem"),
                                                         ("filesystem", "s3")])
async def test_a_reader_started_on_the_local_copy_continues_on_the_remote_one(
    asyncassets_db: Any, request: pytest.FixtureRequest, tmp_path: Path,
    local_kind: str, remote_kind: str,
) -> None:
    storage = queued(local_kind, remote_kind, request, tmp_path)
    Doc = doc_class(storage)
    data = payload(3 * MIB + 123, 2)
    doc = Doc()
    await doc.photo.put(data, filename="big.bin")
    await doc.save()
    store = store_of(storage)
    entry = await entry_of(storage, doc.photo.file_id)
    # Pending: the local copy, whole and in ranges.
    assert await store.read(entry, start=10, end=1000) == data[10:1000]
    download = store.open_download(entry, start=5)
    first = await anext(download)
    assert download.copy == "local"
    # The transfer switches and deletes the local copy under the reader.
    assert (await run_all(storage)).transferred == 1
    assert not await local_objects(storage)
    rest = [piece async for piece in download]
    # What was buffered (GridFS batches) or opened (a file descriptor) may still be
    # read locally; either way the bytes are the file's.
    assert download.copy in ("local", "remote")
    assert first + b"".join(rest) == data[5:]
    # Done: the stale entry (still naming the local copy) reads from the remote too.
    assert await store.read(entry, start=len(data) - 10) == data[-10:]
    fresh = await entry_of(storage, doc.photo.file_id)
    assert await store.read(fresh) == data


async def test_a_reader_of_a_file_deleted_meanwhile_is_told_so(
    asyncassets_db: Any, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    from asyncassets.errors import FileDeletedWhileReading

    for local_kind in ("gridfs", "filesystem"):
        storage = queued(local_kind, "filesystem", request, tmp_path)
        Doc = doc_class(storage)
        doc = Doc()
        await doc.photo.put(payload(300 * KIB, 3), filename="gone.bin")
        await doc.save()
        store = store_of(storage)
        entry = await entry_of(storage, doc.photo.file_id)
        await store.delete(doc.photo.file_id)
        with pytest.raises(FileDeletedWhileReading):
            await store.read(entry, start=100)


# -- replace and delete while a transfer is pending or running ---------------------------


@pytest.mark.parametrize("remote_kind", ["filesystem", "s3"])
async def test_replace_and_delete_in_every_phase_of_a_transfer_leave_nothing_behind(
    asyncassets_db: Any, request: pytest.FixtureRequest, tmp_path: Path, remote_kind: str
) -> None:
    storage = queued("filesystem", remote_kind, request, tmp_path)
    Doc = doc_class(storage)
    store = store_of(storage)

    # Pending: replaced, then deleted.
    pending = Doc()
    await pending.photo.put(b"pending", filename="p.txt")
    await pending.save()
    await pending.photo.replace(b"replaced while pending", filename="p2.txt")
    await pending.photo.delete()

    # Running (claimed), before any byte moved: replaced.
    doc = Doc()
    await doc.photo.put(payload(200 * KIB, 4), filename="r.bin")
    await doc.save()
    claim = await store.claim("racer", file_id=doc.photo.file_id)
    assert claim is not None
    await doc.photo.replace(b"new bytes", filename="n.txt")
    assert (await store.run(claim)).status == "gone"

    # Running, the remote copy written, the switch not made yet: deleted.
    other = Doc()
    await other.photo.put(payload(200 * KIB, 5), filename="o.bin")
    await other.save()
    claim = await store.claim("racer", file_id=other.photo.file_id)
    assert claim is not None
    key, version, _length = await store._copy(claim)
    assert await remote_objects(storage) == [key]
    await other.photo.delete()
    assert await store._switch(claim, key, version) == "gone"  # the switch finds no entry

    assert not await remote_objects(storage)
    assert (await run_all(storage)).transferred == 1  # doc's replacement
    await doc.photo.load()
    assert doc.photo.location == "remote" and await doc.photo.read() == b"new bytes"
    assert await store.files.count_documents({}) == 1
    assert len(await remote_objects(storage)) == 1 and not await local_objects(storage)
    report = await sweep_orphans(grace=0, buckets=[storage.collection_name])
    assert report.files_deleted == 0 and report.objects_deleted == 0
    assert (await check(buckets=[storage.collection_name])).ok


async def _temps(storage: QueuedStorage) -> list[Any]:
    blobs: Any = storage.remote.blobs()
    future = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)
    return [t async for t in blobs.list_stale_temps(future)]


# -- workers: leases, crashes, races, shutdown -------------------------------------------


class SlowDownload:
    """A local copy read at a crawl (a slow disk), so a test can act mid-transfer."""

    def __init__(self, stream: Any, delay: float) -> None:
        self.stream, self.delay = stream, delay

    async def __aenter__(self) -> Any:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.stream.aclose()

    def __aiter__(self) -> Any:
        return self

    async def __anext__(self) -> bytes:
        piece: bytes = await self.stream.__anext__()
        await asyncio.sleep(self.delay)
        return piece

    async def aclose(self) -> None:
        await self.stream.aclose()


def slow_local_reads(store: Any, delay: float) -> None:
    reading = store.local.open_download
    store.local.open_download = lambda doc, **kw: SlowDownload(reading(doc, **kw), delay)


SLOW_READS = inspect.getsource(SlowDownload) + "\n\n" + inspect.getsource(slow_local_reads)

WORKER_SCRIPT = '''
import asyncio, sys
from typing import Any
import asyncassets
from asyncassets.storage import FileSystemStorage, QueuedStorage
from asyncassets.transfers import TransferWorker
''' + SLOW_READS + '''
async def main(uri, db, name, local, remote):
    asyncassets.connect(host=uri, db=db)
    storage = QueuedStorage(local=FileSystemStorage(local, fsync=False),
                            remote=FileSystemStorage(remote, fsync=False),
                            collection_name=name, lease=1.0)
    store = storage.bind(asyncassets.get_db())
    slow_local_reads(store, 0.3)
    await TransferWorker([store], concurrency=1, worker_id="doomed").run_once()

asyncio.run(main(*sys.argv[1:6]))
'''


async def test_a_worker_killed_mid_transfer_loses_its_lease_to_another_worker(
    asyncassets_db: Any, asyncassets_server_uri: str, request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    storage = queued("filesystem", "filesystem", request, tmp_path, lease=1.0)
    Doc = doc_class(storage)
    data = payload(4 * MIB + 7, 6)
    doc = Doc()
    await doc.photo.put(data, filename="k.bin")
    await doc.save()
    script = tmp_path / "doomed_worker.py"
    script.write_text(WORKER_SCRIPT)
    local_root = storage.local.root  # type: ignore[attr-defined]
    remote_root = storage.remote.root  # type: ignore[attr-defined]
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(script), asyncassets_server_uri, asyncassets_db.name,
        storage.collection_name, local_root, remote_root,
    )
    try:
        deadline = time.monotonic() + 30
        while True:  # until it is copying: claimed, and its temp file on the remote side
            assert process.returncode is None, "the worker ended before it was killed"
            entry = await entry_of(storage, doc.photo.file_id)
            if entry["transfer"].get("worker") == "doomed" and await _temps(storage):
                break
            assert time.monotonic() < deadline, entry["transfer"]
            await asyncio.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    entry = await entry_of(storage, doc.photo.file_id)
    assert entry["transfer"]["state"] == "running" and entry["transfer"]["attempts"] == 1
    assert await doc.photo.read() == data  # served locally meanwhile

    rescuer = TransferWorker([store_of(storage)], concurrency=2, worker_id="rescuer")
    assert (await rescuer.run_once()).transferred == 0  # the dead worker's lease holds
    await asyncio.sleep(1.1)  # ... until it runs out
    assert (await rescuer.run_once()).transferred == 1
    entry = await entry_of(storage, doc.photo.file_id)
    assert entry["transfer"]["state"] == "done" and entry["transfer"]["attempts"] == 2
    await doc.photo.load()
    assert doc.photo.location == "remote" and await doc.photo.read() == data

    assert await _temps(storage)  # what the killed writer left
    report = await sweep_orphans(grace=0, buckets=[storage.collection_name])
    assert report.temps_deleted >= 1 and report.files_deleted == 0
    assert not await _temps(storage) and not await local_objects(storage)
    assert await remote_objects(storage) == [entry["remote"]["key"]]
    assert (await check(buckets=[storage.collection_name], verify=True)).ok


async def test_a_cancelled_transfer_gives_its_claim_back_and_leaves_nothing(
    asyncassets_db: Any, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    storage = queued("filesystem", "filesystem", request, tmp_path)
    Doc = doc_class(storage)
    doc = Doc()
    await doc.photo.put(payload(3 * MIB, 7), filename="c.bin")
    await doc.save()
    store = store_of(storage)
    slow_local_reads(store, 0.2)
    worker = TransferWorker([store], concurrency=1, shutdown_timeout=0.1)
    await worker.start()
    while not await _temps(storage):  # noqa: ASYNC110  (polling the disk)
        await asyncio.sleep(0.01)
    stats = await worker.stop()  # the transfer outlasts the shutdown timeout
    assert stats.released == 1 and stats.transferred == 0
    entry = await entry_of(storage, doc.photo.file_id)
    assert entry["transfer"]["state"] == "pending" and entry["transfer"]["attempts"] == 0
    assert "token" not in entry["transfer"] and "worker" not in entry["transfer"]
    assert not await _temps(storage) and not await remote_objects(storage)
    assert (await run_all(storage)).transferred == 1


async def test_workers_racing_for_one_file_transfer_it_once(
    asyncassets_db: Any, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    storage = queued("gridfs", "s3", request, tmp_path)
    Doc = doc_class(storage)
    doc = Doc()
    await doc.photo.put(payload(500 * KIB, 8), filename="one.bin")
    await doc.save()
    workers = [TransferWorker([store_of(storage)], concurrency=2, worker_id=f"w{i}")
               for i in range(6)]
    results = await asyncio.gather(*(w.run_once() for w in workers))
    assert sum(r.transferred for r in results) == 1
    assert sum(r.retried + r.failed + r.gone for r in results) == 0
    entry = await entry_of(storage, doc.photo.file_id)
    assert entry["transfer"]["attempts"] == 1
    assert await remote_objects(storage) == [entry["remote"]["key"]]


MODELS = '''
from asyncassets import Document
from asyncassets.fields import FileField
from asyncassets.storage import FileSystemStorage, QueuedStorage, S3Storage

storage = QueuedStorage(
    local=FileSystemStorage({local!r}, fsync=False),
    remote=S3Storage(**{remote!r}),
    collection_name={name!r},
)


class RaceDoc(Document):
    photo = FileField(storage=storage)
    meta = {{"collection": {collection!r}}}
'''


async def test_workers_in_two_processes_transfer_every_file_exactly_once(
    asyncassets_db: Any, asyncassets_server_uri: str, request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    name = f"q{next(_names)}"
    bucket = request.getfixturevalue("asyncassets_s3_bucket")
    remote = {**bucket.options, "prefix": f"{name}/", "part_size": 5 * MIB}
    storage = QueuedStorage(local=FileSystemStorage(tmp_path / "spool", fsync=False),
                            remote=S3Storage(**remote), collection_name=name)
    Doc = doc_class(storage)
    module = f"race_models_{name}"
    (tmp_path / f"{module}.py").write_text(MODELS.format(
        local=str(tmp_path / "spool"), remote=remote, name=name,
        collection=Doc._get_collection_name()))
    files = {}
    for i in range(40):
        doc = Doc()
        await doc.photo.put(payload(20 * KIB, 100 + i), filename=f"{i}.bin")
        await doc.save()
        files[doc.photo.file_id] = payload(20 * KIB, 100 + i)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "asyncassets", "--uri", asyncassets_server_uri,
        "--db", asyncassets_db.name, "--import", module, "transfer", "--once", "-c", "4",
        "--json", cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    store = store_of(storage)
    try:
        # Start racing once the other process has claimed its first file.
        while not await store.files.find_one({"transfer.worker": {"$exists": True}}):
            assert process.returncode is None
            await asyncio.sleep(0.01)
        mine = await TransferWorker([store], concurrency=4).run_once()
        out, err = await asyncio.wait_for(process.communicate(), 60)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, err.decode()
    import json

    theirs = json.loads(out)["stats"]
    assert mine.transferred + theirs["transferred"] == len(files)
    assert mine.retried + mine.failed + theirs["retried"] + theirs["failed"] == 0
    entries = [doc async for doc in store.files.find({})]
    assert all(e["transfer"]["state"] == "done" and e["transfer"]["attempts"] == 1
               for e in entries)
    assert len(await remote_objects(storage)) == len(files)
    for file_id, data in files.items():
        assert await store.read(await entry_of(storage, file_id)) == data


async def test_the_in_process_worker_transfers_uploads_as_they_come(
    asyncassets_db: Any, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    storage = queued("gridfs", "filesystem", request, tmp_path)
    Doc = doc_class(storage)
    async with asyncassets.transfers.worker(concurrency=2, poll_interval=5) as worker:
        docs = []
        for i in range(5):
            doc = Doc()
            await doc.photo.put(payload(10 * KIB, i), filename=f"{i}.txt")
            await doc.save()
            docs.append(doc)
        deadline = time.monotonic() + 10
        while worker.stats.transferred < 5:  # woken by the uploads, not by the poll
            assert time.monotonic() < deadline, worker.stats
            await asyncio.sleep(0.02)
    for i, doc in enumerate(docs):
        await doc.photo.load()
        assert doc.photo.location == "remote"
        assert await doc.photo.read() == payload(10 * KIB, i)
    counts = await asyncassets.transfers.counts(buckets=[storage.collection_name])
    assert counts[f"default:{storage.collection_name}"]["done"] == 5


async def test_the_transfer_command_stops_gracefully_on_sigterm(
    asyncassets_db: Any, asyncassets_server_uri: str, request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    name = f"q{next(_names)}"
    bucket = request.getfixturevalue("asyncassets_s3_bucket")
    remote = {**bucket.options, "prefix": f"{name}/", "part_size": 5 * MIB}
    storage = QueuedStorage(local=FileSystemStorage(tmp_path / "spool", fsync=False),
                            remote=S3Storage(**remote), collection_name=name)
    Doc = doc_class(storage)
    module = f"term_models_{name}"
    (tmp_path / f"{module}.py").write_text(MODELS.format(
        local=str(tmp_path / "spool"), remote=remote, name=name,
        collection=Doc._get_collection_name()))
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "asyncassets", "--uri", asyncassets_server_uri,
        "--db", asyncassets_db.name, "--import", module, "transfer", "--forever",
        "--poll", "0.1", cwd=tmp_path, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        doc = Doc()
        await doc.photo.put(b"picked up by the command", filename="t.txt")
        await doc.save()
        deadline = time.monotonic() + 30
        while (await entry_of(storage, doc.photo.file_id))["transfer"]["state"] != "done":
            assert process.returncode is None and time.monotonic() < deadline
            await asyncio.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(process.communicate(), 30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, err.decode()
    assert b"SIGTERM" in err and b"1 transferred" in out
    assert f"{name}: 0 pending, 0 held, 0 running, 1 done, 0 failed".encode() in out


async def test_a_local_copy_left_after_the_switch_is_found_and_swept(
    asyncassets_db: Any, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    for local_kind in ("gridfs", "filesystem"):
        storage = queued(local_kind, "filesystem", request, tmp_path)
        Doc = doc_class(storage)
        doc = Doc()
        data = payload(150 * KIB, 9)
        await doc.photo.put(data, filename="left.bin")
        await doc.save()
        store = store_of(storage)

        async def dies_first(*args: Any, **kwargs: Any) -> None:
            raise OSError("the worker died before it deleted the local copy")

        store._delete_copies = dies_first  # type: ignore[method-assign]
        claim = await store.claim("dying")
        assert claim is not None
        assert (await store.run(claim)).status == "done"
        assert await local_objects(storage)  # left behind, named by no entry
        report = await check(buckets=[storage.collection_name])
        assert not report.ok
        assert report.orphaned_chunks if local_kind == "gridfs" else report.orphaned_objects
        await asyncio.sleep(1.1)  # ObjectIds and S3 times are whole seconds: read as the end
        swept = await sweep_orphans(grace=0, buckets=[storage.collection_name])
        assert swept.files_deleted == 0
        assert swept.chunks_deleted if local_kind == "gridfs" else swept.objects_deleted
        assert not await local_objects(storage)
        assert (await check(buckets=[storage.collection_name], verify=True)).ok
        await doc.photo.load()
        assert doc.photo.location == "remote" and await doc.photo.read() == data
