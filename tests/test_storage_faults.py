"""The storage layer under faults: cancelled readers, files deleted under readers, wide buffers.

Cancelled readers (issue case 7) are checked on the server: the cursors it still
holds open, and the pooled connections the driver threw away. Files deleted or
replaced under a reader (case 8) must raise ``FileDeletedWhileReading``, never
``CorruptFile``, and never hand out the bytes of two files. Buffers whose items are
wider than a byte (case 9) are stored as their bytes: ``length``, the bytes read
back and ``max_size`` all count bytes, not items.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import hashlib
import time
from array import array
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from pymongo import AsyncMongoClient, monitoring
from pymongo.errors import OperationFailure

import asyncassets
from asyncassets import Document
from asyncassets.errors import (
    CorruptFile,
    FileDeletedWhileReading,
    FileNotFound,
    FileValidationError,
    GridFSError,
    UploadInterrupted,
)
from asyncassets.fields import FileField
from asyncassets.storage.gridfs import GridBucket
from asyncassets.storage.read import verify_file
from asyncassets.testing import unique_db_name

FAULTS_ALIAS = "storage_faults"
BIG_CHUNK = 1024 * 1024  # with the default 4 MiB buffer: 4 chunks per cursor batch


# Class names are prefixed "Faults" so they never clash in mongoengine's registry.


class FaultsReel(Document):
    """Documents on the monitored client of the ``watched`` fixture."""

    film = FileField(chunk_size=BIG_CHUNK)
    meta = {"db_alias": FAULTS_ALIAS, "collection": "faults_reels"}


class FaultsSample(Document):
    """Documents on the test's default database (``asyncassets_db``)."""

    data = FileField(chunk_size=1000)
    small = FileField(chunk_size=1000, max_size=4000)
    packed = FileField(chunk_size=1000, compress="gzip")
    meta = {"collection": "faults_samples"}


def payload(size: int, seed: int = 0) -> bytes:
    """Deterministic bytes in which no two chunks are alike (a mix-up would show)."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


# -- what the server and the driver see -------------------------------------------------


class PoolEvents(monitoring.ConnectionPoolListener):
    """Counts the pool's connections: created, and closed by reason."""

    def __init__(self) -> None:
        self.created = 0
        self.closed: dict[str, int] = {}

    @property
    def closed_for_error(self) -> int:
        return self.closed.get(monitoring.ConnectionClosedReason.ERROR, 0)

    def connection_created(self, event: monitoring.ConnectionCreatedEvent) -> None:
        self.created += 1

    def connection_closed(self, event: monitoring.ConnectionClosedEvent) -> None:
        self.closed[event.reason] = self.closed.get(event.reason, 0) + 1

    def pool_created(self, event: monitoring.PoolCreatedEvent) -> None:
        pass

    def pool_ready(self, event: monitoring.PoolReadyEvent) -> None:
        pass

    def pool_cleared(self, event: monitoring.PoolClearedEvent) -> None:
        pass

    def pool_closed(self, event: monitoring.PoolClosedEvent) -> None:
        pass

    def connection_ready(self, event: monitoring.ConnectionReadyEvent) -> None:
        pass

    def connection_check_out_started(
        self, event: monitoring.ConnectionCheckOutStartedEvent
    ) -> None:
        pass

    def connection_check_out_failed(self, event: monitoring.ConnectionCheckOutFailedEvent) -> None:
        pass

    def connection_checked_out(self, event: monitoring.ConnectionCheckedOutEvent) -> None:
        pass

    def connection_checked_in(self, event: monitoring.ConnectionCheckedInEvent) -> None:
        pass


class Commands(monitoring.CommandListener):
    """Remembers the cursor ids of chunk queries; cancels a task at its next getMore."""

    def __init__(self) -> None:
        self.chunk_cursors: list[int] = []
        self.cancel_at_get_more: asyncio.Task[Any] | None = None
        self.get_mores = 0

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name == "getMore":
            self.get_mores += 1
            task, self.cancel_at_get_more = self.cancel_at_get_more, None
            if task is not None:
                task.cancel()  # lands while this getMore is on its way

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        if event.command_name == "find":
            cursor = event.reply.get("cursor", {})
            if str(cursor.get("ns", "")).endswith(".chunks") and cursor.get("id"):
                self.chunk_cursors.append(cursor["id"])

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


class ServerCursors:
    """Counts the cursors open on the server.

    A real ``mongod`` lists idle cursors in ``$currentOp`` (``idleCursors``),
    which counts only this test's database. SecantusDB's ``$currentOp`` lists no
    cursors, but its ``serverStatus`` reports ``metrics.cursor.open.total`` (as
    ``mongod`` does, for the whole server). A probe cursor decides which one works.
    """

    def __init__(self, client: Any, db_name: str) -> None:
        self.client = client
        self.db_name = db_name
        self.per_database = False

    async def calibrate(self) -> None:
        probe = self.client[self.db_name]["faults_probe"]
        await probe.insert_many([{"i": i} for i in range(3)])
        cursor = probe.find(batch_size=1)
        await cursor.next()
        try:
            self.per_database = await self._idle_cursors() >= 1
        except OperationFailure:
            self.per_database = False  # no $currentOp with idle cursors here
        finally:
            await cursor.close()
        await probe.drop()

    async def count(self) -> int:
        if self.per_database:
            return await self._idle_cursors()
        status = await self.client.admin.command("serverStatus")
        return int(status["metrics"]["cursor"]["open"]["total"])

    async def settle(self, expected: int, timeout: float = 15.0) -> int:
        """Poll until ``expected`` cursors are open (killCursors run in the background)."""
        deadline = time.monotonic() + timeout
        while True:
            now = await self.count()
            if now == expected or time.monotonic() > deadline:
                return now
            await asyncio.sleep(0.05)

    async def _idle_cursors(self) -> int:
        pipeline = [
            {"$currentOp": {"idleCursors": True, "allUsers": True}},
            {"$match": {"type": "idleCursor"}},
        ]
        rows = await (await self.client.admin.aggregate(pipeline)).to_list(None)
        return sum(1 for row in rows if str(row.get("ns", "")).startswith(f"{self.db_name}."))


class Watched:
    """A database on a client of its own, with its pool and commands monitored."""

    def __init__(self, db: Any, pool: PoolEvents, commands: Commands, cursors: ServerCursors):
        self.db = db
        self.pool = pool
        self.commands = commands
        self.cursors = cursors


@pytest.fixture
async def watched(asyncassets_server_uri: str) -> AsyncIterator[Watched]:
    """A monitored client, also registered as the alias of :class:`FaultsReel`."""
    pool, commands = PoolEvents(), Commands()
    client: AsyncMongoClient[Any] = AsyncMongoClient(
        asyncassets_server_uri, event_listeners=[pool, commands]
    )
    name = unique_db_name("storage_faults")
    asyncassets.connect(client=client, alias=FAULTS_ALIAS, db=name)
    try:
        cursors = ServerCursors(client, name)
        await cursors.calibrate()
        yield Watched(client[name], pool, commands, cursors)
    finally:
        await asyncassets.disconnect(FAULTS_ALIAS)
        await client.drop_database(name)
        await client.close()


# -- A: cancelled readers ---------------------------------------------------------------


async def _stream(bucket: GridBucket, doc: dict[str, Any]) -> AsyncIterator[bytes]:
    """What ``FileProxy.stream()`` does, on a bucket with a small buffer: an async
    generator that closes its download in ``finally``.
    """
    download = bucket.open_download(doc)
    try:
        async for piece in download:
            yield piece
    finally:
        await download.aclose()


async def _cancel_readers_mid_stream(watched: Watched, readers: int) -> None:
    """Start ``readers`` streams of one file, cancel them all, and check that the
    server holds no cursor of theirs and that no pooled connection was discarded.

    A third are cancelled as they start (waiting for a connection, or for the reply
    to their first query); the others once every one of them has its first piece,
    in waves, so the cancellations land at every step: while a getMore is on its
    way, between two pieces, while another reader's cursor is being killed. Half
    the readers use ``async with bucket.open_download(...)``, half an async
    generator like ``doc.field.stream()``, which is closed when the loop finalizes
    it if the cancellation found it suspended at a ``yield``.
    """
    bucket = GridBucket(watched.db, chunk_size=1024, buffer_size=2048)  # 2 chunks a batch
    data = payload(256 * 1024)
    doc = await bucket.upload(data)
    baseline = await watched.cursors.count()
    early = set(range(0, readers, 3))
    late_started = 0
    late_all_started = asyncio.Event()

    async def consume(pieces: AsyncIterator[bytes], late: bool) -> None:
        nonlocal late_started
        first = True
        async for _piece in pieces:
            if first:
                first = False
                if late:
                    late_started += 1
                    if late_started == readers - len(early):
                        late_all_started.set()
                await late_all_started.wait()  # so that none is near the end
            await asyncio.sleep(0)
        raise AssertionError("a reader got to the end of the file before it was cancelled")

    async def read(i: int) -> None:
        if i % 2:
            async with bucket.open_download(doc) as download:
                await consume(download, i not in early)
        else:
            await consume(_stream(bucket, doc), i not in early)

    tasks = [asyncio.create_task(read(i)) for i in range(readers)]
    for _ in range(20):
        await asyncio.sleep(0)  # the first queries are on their way
    for i in early:
        tasks[i].cancel()
    await asyncio.wait_for(late_all_started.wait(), 120)
    for _ in range(3):
        await asyncio.sleep(0)  # the readers get going: pieces, getMores
    for i, task in enumerate(tasks):
        task.cancel()
        if i % 10 == 9:
            await asyncio.sleep(0)
    await asyncio.wait(tasks)
    not_cancelled = [task.exception() for task in tasks if not task.cancelled()]
    assert not_cancelled == []
    # A cancelled task keeps its traceback, and with it a generator suspended at a
    # yield; a finished request handler's task is dropped, and so is that generator.
    del tasks
    gc.collect()

    left_open = await watched.cursors.settle(baseline, timeout=60)
    assert left_open == baseline, f"{left_open - baseline} cursors left open on the server"
    assert watched.pool.closed_for_error == 0, watched.pool.closed
    # The pool is healthy: the file still reads back whole.
    assert await bucket.read(doc) == data
    assert watched.pool.closed_for_error == 0


async def test_200_readers_cancelled_mid_stream_leave_no_cursor_and_no_broken_connection(
    watched: Watched,
) -> None:
    await _cancel_readers_mid_stream(watched, 200)


# The same at five times the scale (40 s of the default run's time): with -m slow.
@pytest.mark.slow
async def test_1000_readers_cancelled_mid_stream_leave_no_cursor_and_no_broken_connection(
    watched: Watched,
) -> None:
    await _cancel_readers_mid_stream(watched, 1000)


async def test_reader_cancelled_during_a_get_more_kills_its_cursor_and_keeps_the_connection(
    watched: Watched,
) -> None:
    bucket = GridBucket(watched.db, chunk_size=1000, buffer_size=2000)
    doc = await bucket.upload(payload(10_000))
    baseline = await watched.cursors.count()
    pieces: list[bytes] = []

    async def read() -> None:
        async with bucket.open_download(doc) as stream:
            async for piece in stream:
                pieces.append(piece)

    for _ in range(5):
        pieces.clear()
        task = asyncio.create_task(read())
        watched.commands.cancel_at_get_more = task
        with pytest.raises(asyncio.CancelledError):
            await task
        assert pieces == [payload(10_000)[:1000], payload(10_000)[1000:2000]]
    assert await watched.cursors.settle(baseline) == baseline
    assert watched.pool.closed_for_error == 0, watched.pool.closed


async def test_proxy_stream_cancelled_during_a_get_more_kills_its_cursor(watched: Watched) -> None:
    """``async for chunk in doc.film.stream()``, the reader cancelled while it waits."""
    data = payload(5 * BIG_CHUNK + 10)  # 4 chunks in the first batch, a getMore for the rest
    reel = FaultsReel()
    await reel.film.put(data)
    await reel.save()
    baseline = await watched.cursors.count()
    received: list[int] = []

    async def watch() -> None:
        loaded = await FaultsReel.objects(pk=reel.pk).first()
        assert loaded is not None
        async for chunk in loaded.film.stream():
            received.append(len(chunk))

    for _ in range(3):
        received.clear()
        task = asyncio.create_task(watch())
        watched.commands.cancel_at_get_more = task
        with pytest.raises(asyncio.CancelledError):
            await task
        assert received == [BIG_CHUNK] * 4
    assert await watched.cursors.settle(baseline) == baseline
    assert watched.pool.closed_for_error == 0, watched.pool.closed
    assert await reel.film.read() == data


async def test_proxy_streams_cancelled_while_handling_a_chunk_leave_no_cursor(
    watched: Watched,
) -> None:
    """``async for chunk in doc.film.stream()`` in request handlers cancelled mid-file."""
    data = payload(5 * BIG_CHUNK + 10)
    reel = FaultsReel()
    await reel.film.put(data)
    await reel.save()
    baseline = await watched.cursors.count()
    readers = 8
    handling = 0
    all_handling = asyncio.Event()

    async def handle() -> None:
        nonlocal handling
        loaded = await FaultsReel.objects(pk=reel.pk).first()
        assert loaded is not None
        async for _chunk in loaded.film.stream():
            handling += 1
            if handling == readers:
                all_handling.set()
            await asyncio.sleep(3600)  # sending the chunk to a client that went away

    tasks = [asyncio.create_task(handle()) for _ in range(readers)]
    await asyncio.wait_for(all_handling.wait(), 60)
    assert await watched.cursors.count() == baseline + readers  # 4 chunks of 6 fetched
    for task in tasks:
        task.cancel()
    await asyncio.wait(tasks)
    assert all(task.cancelled() for task in tasks)
    del tasks  # the handlers are gone, and with them the suspended streams
    gc.collect()
    assert await watched.cursors.settle(baseline) == baseline
    assert watched.pool.closed_for_error == 0, watched.pool.closed


async def test_cancelled_download_refuses_to_go_on_and_says_where_to_restart(
    watched: Watched,
) -> None:
    bucket = GridBucket(watched.db, chunk_size=1000, buffer_size=2000)
    doc = await bucket.upload(payload(10_000))
    stream = bucket.open_download(doc)
    assert await stream.__anext__() == payload(10_000)[:1000]
    assert await stream.__anext__() == payload(10_000)[1000:2000]
    # One read cancelled (a timeout around it) while its getMore is on the way.
    read = asyncio.ensure_future(stream.__anext__())
    watched.commands.cancel_at_get_more = read
    with pytest.raises(asyncio.CancelledError):
        await read
    # Not a silent end of file: the caller is told the stream is gone.
    with pytest.raises(GridFSError, match=r"cancelled; open a new one \(start=2000\)"):
        await stream.__anext__()
    await stream.aclose()
    async with bucket.open_download(doc, start=2000) as rest:
        assert b"".join([p async for p in rest]) == payload(10_000)[2000:]
    assert watched.pool.closed_for_error == 0


async def test_proxy_stream_stopped_early_and_closed_kills_its_cursor(watched: Watched) -> None:
    data = payload(9 * BIG_CHUNK)
    reel = FaultsReel()
    await reel.film.put(data)
    baseline = await watched.cursors.count()
    stream = reel.film.stream()
    async for chunk in stream:
        assert chunk == data[:BIG_CHUNK]
        break
    assert await watched.cursors.count() == baseline + 1  # the batch is not exhausted
    await stream.aclose()  # type: ignore[attr-defined]  # an async generator
    assert await watched.cursors.count() == baseline
    assert watched.pool.closed_for_error == 0


async def test_download_stopped_early_in_async_with_kills_its_cursor(watched: Watched) -> None:
    bucket = GridBucket(watched.db, chunk_size=1000, buffer_size=2000)
    doc = await bucket.upload(payload(10_000))
    baseline = await watched.cursors.count()
    async with bucket.open_download(doc) as stream:
        async for _piece in stream:
            assert await watched.cursors.count() == baseline + 1
            break
    assert await watched.cursors.count() == baseline
    assert [p async for p in stream] == []  # closed, not cancelled: just the end


# -- B: files deleted or replaced under a reader ----------------------------------------


async def _read_all(stream: Any, into: bytearray) -> None:
    async for piece in stream:
        into += piece


async def _kill_server_cursors(db: Any, cursor_ids: list[int]) -> None:
    """Kill the reader's cursor, as the server does to a cursor idle for too long.

    SecantusDB's cursors hold a snapshot of their results, so a getMore on the
    old cursor never sees a deletion; a new query does. (On ``mongod`` the getMore
    already sees it.) The reader then queries again from where it stopped.
    """
    await db.command("killCursors", "fs.chunks", cursors=cursor_ids)


async def test_file_deleted_mid_read_raises_file_deleted_not_corrupt(watched: Watched) -> None:
    data = payload(1000)
    bucket = GridBucket(watched.db, chunk_size=100, buffer_size=200)  # 2 chunks a batch
    doc = await bucket.upload(data, file_id="clip")
    got = bytearray()
    async with bucket.open_download(doc) as stream:
        got += await stream.__anext__()  # chunks 0 and 1 fetched, 2 to 9 not yet
        assert await bucket.delete("clip") is True
        await _kill_server_cursors(watched.db, watched.commands.chunk_cursors)
        with pytest.raises(FileDeletedWhileReading, match=r"'clip'.*deleted or replaced") as info:
            await _read_all(stream, got)
    assert isinstance(info.value, FileNotFound)
    assert bytes(got) == data[: len(got)] and len(got) >= 100  # the old file's bytes only
    assert await bucket.find("clip") is None
    assert await watched.db["fs.chunks"].count_documents({}) == 0


async def test_file_deleted_between_pieces_reads_whole_or_raises_file_deleted(
    watched: Watched,
) -> None:
    """No cursor killed: what the server's own cursor shows decides which of the two."""
    data = payload(1000)
    bucket = GridBucket(watched.db, chunk_size=100, buffer_size=200)
    doc = await bucket.upload(data)
    got = bytearray()
    try:
        async with bucket.open_download(doc) as stream:
            got += await stream.__anext__()
            await bucket.delete(doc["_id"])
            await _read_all(stream, got)
    except FileDeletedWhileReading:
        assert bytes(got) == data[: len(got)]
    else:
        assert bytes(got) == data  # the server answered from a snapshot


async def test_files_document_read_then_file_deleted_is_not_corrupt(asyncassets_db: Any) -> None:
    """The reader loaded the files document; the file went before its chunks were read."""
    bucket = GridBucket(asyncassets_db, chunk_size=100)
    doc = await bucket.upload(payload(1000), file_id="gone")
    await bucket.delete("gone")
    with pytest.raises(FileDeletedWhileReading) as info:
        await bucket.read(doc)
    # What the reader saw, kept as the cause: a missing chunk.
    assert isinstance(info.value.__cause__, CorruptFile)
    assert "n=0 is missing" in str(info.value.__cause__)
    with pytest.raises(FileDeletedWhileReading):
        await bucket.read(doc, start=350, end=420)


async def test_file_replaced_under_the_same_id_mid_read_never_mixes_two_files(
    watched: Watched,
) -> None:
    old, new = payload(1000, seed=1), payload(1000, seed=2)  # same length, other bytes
    bucket = GridBucket(watched.db, chunk_size=100, buffer_size=200)
    doc = await bucket.upload(old, file_id="same-id")
    got = bytearray()
    async with bucket.open_download(doc) as stream:
        got += await stream.__anext__()
        await bucket.delete("same-id")
        await asyncio.sleep(0.002)  # a later uploadDate, whatever the clock's resolution
        await bucket.upload(new, file_id="same-id")
        await _kill_server_cursors(watched.db, watched.commands.chunk_cursors)
        with pytest.raises(FileDeletedWhileReading):
            await _read_all(stream, got)
    assert bytes(got) == old[: len(got)]
    current = await bucket.find("same-id")
    assert current is not None and await bucket.read(current) == new


async def test_file_replaced_by_a_shorter_one_is_not_corrupt(asyncassets_db: Any) -> None:
    bucket = GridBucket(asyncassets_db, chunk_size=100)
    doc = await bucket.upload(payload(1000, seed=1), file_id="shrunk")
    await bucket.delete("shrunk")
    await bucket.upload(payload(250, seed=2), file_id="shrunk")
    with pytest.raises(FileDeletedWhileReading) as info:
        await bucket.read(doc)  # chunk 2 is 50 bytes, not 100: another upload's
    assert "n=2 is short" in str(info.value.__cause__)


async def test_chunk_missing_from_an_unchanged_file_is_still_corrupt(asyncassets_db: Any) -> None:
    bucket = GridBucket(asyncassets_db, chunk_size=100)
    doc = await bucket.upload(payload(1000), file_id="damaged")
    await asyncassets_db["fs.chunks"].delete_one({"files_id": "damaged", "n": 4})
    with pytest.raises(CorruptFile, match="n=4 is missing"):
        await bucket.read(doc)
    # A files document given without uploadDate (built by hand) is compared on
    # what it has.
    partial = {"_id": "damaged", "length": 1000, "chunkSize": 100}
    with pytest.raises(CorruptFile, match="n=4 is missing"):
        await bucket.read(partial)


async def test_verify_of_a_file_deleted_meanwhile_is_not_an_integrity_error(
    asyncassets_db: Any,
) -> None:
    bucket = GridBucket(asyncassets_db, chunk_size=100)
    doc = await bucket.upload(payload(1000), file_id="checked")
    await bucket.delete("checked")
    with pytest.raises(FileDeletedWhileReading):
        await verify_file(bucket, doc)


# -- C: buffers whose items are wider than a byte ---------------------------------------


def doubles(count: int = 1000) -> memoryview:
    return memoryview(array("d", [1.0 + i for i in range(count)]))


class Pair(ctypes.Structure):
    _fields_ = [("a", ctypes.c_int32), ("b", ctypes.c_double)]


WIDE_BUFFERS = {
    "memoryview of array('d')": lambda: doubles(),  # 8000 bytes, 1000 items
    "array('i')": lambda: array("i", range(1000)),  # 4000 bytes
    "2-D cast memoryview": lambda: memoryview(payload(4800)).cast("i", (30, 40)),
    "strided memoryview": lambda: memoryview(array("q", range(500)))[::2],  # 2000 bytes
    "strided byte memoryview": lambda: memoryview(payload(3000))[::3],
    "ctypes structure": lambda: Pair(7, 2.5),
}


@pytest.mark.parametrize("make", WIDE_BUFFERS.values(), ids=list(WIDE_BUFFERS))
async def test_put_stores_the_bytes_of_a_wide_buffer(
    asyncassets_db: Any, make: Callable[[], Any]
) -> None:
    buffer = make()
    expected = bytes(memoryview(buffer).tobytes())
    sample = FaultsSample()
    await sample.data.put(buffer)
    await sample.save()
    assert await sample.data.read() == expected
    assert sample.data.length == len(expected)
    files = await asyncassets_db["fs.files"].find_one({"_id": sample.data.file_id})
    assert files["length"] == len(expected)
    assert files["metadata"]["sha256"] == hashlib.sha256(expected).hexdigest()
    chunks = await asyncassets_db["fs.chunks"].find({}, sort=[("n", 1)]).to_list(None)
    assert b"".join(c["data"] for c in chunks) == expected


async def test_put_of_8000_bytes_of_doubles_reads_back_exactly(asyncassets_db: Any) -> None:
    buffer = doubles()
    sample = FaultsSample()
    await sample.data.put(buffer)
    await sample.save()
    loaded = await FaultsSample.objects(pk=sample.pk).first()
    assert loaded is not None
    assert await loaded.data.read() == bytes(buffer)
    assert len(bytes(buffer)) == 8000
    assert loaded.data.length == 8000


@pytest.mark.parametrize("streamed", [False, True], ids=["put", "new_file"])
async def test_compressed_field_records_the_byte_length_of_a_wide_buffer(
    asyncassets_db: Any, streamed: bool
) -> None:
    """The original length of a compressed file is the guard's count: bytes, not items."""
    buffer = doubles()
    sample = FaultsSample()
    if streamed:
        async with sample.packed.new_file():
            await sample.packed.write(buffer)
    else:
        await sample.packed.put(buffer)
    files = await asyncassets_db["fs.files"].find_one({})
    assert files["metadata"]["compression"]["length"] == 8000
    assert files["metadata"]["compression"]["sha256"] == hashlib.sha256(bytes(buffer)).hexdigest()
    assert await sample.packed.read() == bytes(buffer)
    assert await sample.packed.read(verify=True) == bytes(buffer)


async def test_max_size_counts_the_bytes_of_a_wide_buffer_on_put(asyncassets_db: Any) -> None:
    sample = FaultsSample()
    with pytest.raises(FileValidationError, match="max_size=4000"):
        await sample.small.put(doubles())  # 1000 items, 8000 bytes
    assert not sample.small
    assert await asyncassets_db["fs.chunks"].count_documents({}) == 0
    assert await asyncassets_db["fs.files"].count_documents({}) == 0


async def test_streamed_write_of_a_wide_buffer_stores_its_bytes(asyncassets_db: Any) -> None:
    buffer = doubles()
    sample = FaultsSample()
    async with sample.data.new_file():
        await sample.data.write(buffer[:500])
        sample.data.write(buffer[500:])  # not awaited
    assert await sample.data.read() == bytes(buffer)
    assert sample.data.length == 8000
    files = await asyncassets_db["fs.files"].find_one({})
    assert files["length"] == 8000


async def test_max_size_counts_the_bytes_of_a_wide_buffer_on_streamed_write(
    asyncassets_db: Any,
) -> None:
    sample = FaultsSample()
    with pytest.raises(FileValidationError, match="max_size=4000"):
        async with sample.small.new_file():
            await sample.small.write(doubles(400))  # 3200 bytes: under the limit
            await sample.small.write(doubles(400))  # 6400 bytes: over it
    assert not sample.small
    assert await asyncassets_db["fs.chunks"].count_documents({}) == 0
    assert await asyncassets_db["fs.files"].count_documents({}) == 0


async def test_bucket_upload_stream_counts_bytes_of_wide_buffers(asyncassets_db: Any) -> None:
    bucket = GridBucket(asyncassets_db, chunk_size=1000)
    async with bucket.open_upload() as upload:
        upload.write_nowait(doubles(100))  # 800 bytes
        await upload.write(array("i", range(300)))  # 1200 bytes
        await upload.write(memoryview(b"abcdef")[::2])  # not contiguous: 3 bytes
        assert upload.length == 2003
    doc = await bucket.find(upload.file_id)
    assert doc is not None and doc["length"] == 2003
    expected = bytes(doubles(100)) + bytes(array("i", range(300))) + b"ace"
    assert await bucket.read(doc) == expected
    assert doc["metadata"]["sha256"] == hashlib.sha256(expected).hexdigest()


async def test_bucket_upload_of_wide_pieces_counts_bytes(asyncassets_db: Any) -> None:
    bucket = GridBucket(asyncassets_db, chunk_size=1000)
    pieces: list[Any] = [doubles(10), array("h", range(50)), b"tail"]

    async def async_pieces() -> AsyncIterator[Any]:
        for piece in pieces:
            yield piece

    expected = b"".join(bytes(memoryview(p)) for p in pieces)  # 80 + 100 + 4 bytes
    for source in (pieces, async_pieces()):
        doc = await bucket.upload(source)
        assert doc["length"] == len(expected) == 184
        assert await bucket.read(doc) == expected


async def test_close_refuses_an_upload_whose_chunks_a_sweep_removed(asyncassets_db):
    # An open upload's chunks have no files document yet: a sweep with a grace
    # shorter than the upload's pause takes them. close() must not then store a
    # file with missing chunks.
    bucket = GridBucket(asyncassets_db, chunk_size=4)
    upload = bucket.open_upload(filename="paused")
    await upload.write(b"0123456789ab")  # three chunks
    await upload.flush()
    await bucket.chunks.delete_many({"files_id": upload.file_id, "n": 0})  # the sweep
    with pytest.raises(UploadInterrupted, match="removed while it was open"):
        await upload.close()
    assert await bucket.files.count_documents({}) == 0
    assert await bucket.chunks.count_documents({}) == 0


@pytest.mark.parametrize("removed", [0, 3, 5])  # the last chunk is written at close
async def test_close_finds_a_removed_chunk_in_every_range_it_counts(
    asyncassets_db, monkeypatch, removed
):
    # A large upload's chunks are counted in ranges of n (a server may hold what
    # one count matches in memory): a chunk removed from any range is found.
    from asyncassets.storage.gridfs import upload as upload_module

    monkeypatch.setattr(upload_module, "COUNT_WINDOW_BYTES", 8)  # two 4-byte chunks
    assert len(upload_module.chunk_windows("x", 7, 4)) == 4
    bucket = GridBucket(asyncassets_db, chunk_size=4)
    upload = bucket.open_upload(filename="paused")
    await upload.write(b"0123456789abcdefghijklmn01")  # seven chunks
    await upload.flush()
    await bucket.chunks.delete_many({"files_id": upload.file_id, "n": removed})
    with pytest.raises(UploadInterrupted, match="wrote 7 chunks but 6 are left"):
        await upload.close()
    assert await bucket.files.count_documents({}) == 0


async def test_close_counts_a_large_upload_in_ranges_and_stores_it(asyncassets_db, monkeypatch):
    from asyncassets.storage.gridfs import upload as upload_module

    monkeypatch.setattr(upload_module, "COUNT_WINDOW_BYTES", 8)
    bucket = GridBucket(asyncassets_db, chunk_size=4)
    doc = await bucket.upload(b"0123456789abcdefghijklmn01", filename="whole")
    assert doc["length"] == 26
    assert await bucket.read(doc) == b"0123456789abcdefghijklmn01"
