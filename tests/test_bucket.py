"""GridBucket: the GridFS spec's layout, interop with PyMongo, clean failures, bounded memory."""

from __future__ import annotations

import array
import asyncio
import hashlib
import io
import itertools
import os
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from bson import ObjectId
from gridfs.asynchronous import AsyncGridFSBucket
from pymongo import AsyncMongoClient, monitoring
from pymongo.errors import BulkWriteError

from asyncassets.errors import CorruptFile, FileAlreadyExists, UploadClosed
from asyncassets.storage.gridfs import DEFAULT_CHUNK_SIZE, GridBucket

CS = DEFAULT_CHUNK_SIZE
MiB = 1024 * 1024


# -- helpers -----------------------------------------------------------------------


def payload(size: int, seed: int = 0) -> bytes:
    """Deterministic, non-repeating-per-chunk bytes (a chunk swap would show)."""
    block = hashlib.sha256(str(seed).encode()).digest()
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(block + counter.to_bytes(8, "big")).digest()
        counter += 1
    return bytes(out[:size])


async def chunks_of(db: Any, file_id: Any, bucket: str = "fs") -> list[dict[str, Any]]:
    return await db[f"{bucket}.chunks"].find({"files_id": file_id}, sort=[("n", 1)]).to_list(None)


async def assert_bucket_empty(db: Any, bucket: str = "fs") -> None:
    assert await db[f"{bucket}.files"].count_documents({}) == 0
    assert await db[f"{bucket}.chunks"].count_documents({}) == 0


class Recorder(monitoring.CommandListener):
    """Records the commands a client sends, and the chunks its replies carry."""

    def __init__(self) -> None:
        self.commands: list[monitoring.CommandStartedEvent] = []
        self.replies: list[monitoring.CommandSucceededEvent] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name not in ("hello", "isMaster", "endSessions"):
            self.commands.append(event)

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        self.replies.append(event)

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass

    def names(self) -> list[str]:
        return [event.command_name for event in self.commands]

    def chunk_ns(self) -> list[int]:
        """The ``n`` of every chunk document returned by find/getMore."""
        ns = []
        for event in self.replies:
            cursor = event.reply.get("cursor") if isinstance(event.reply, dict) else None
            if not cursor or not cursor.get("ns", "").endswith(".chunks"):
                continue
            for doc in cursor.get("firstBatch", cursor.get("nextBatch", [])):
                ns.append(doc["n"])
        return ns

    def clear(self) -> None:
        self.commands.clear()
        self.replies.clear()


@pytest.fixture
async def watched(asyncassets_db: Any, asyncassets_server_uri: str) -> AsyncIterator[Any]:
    """``(db, recorder)``: the test's database through a client whose commands are recorded."""
    recorder = Recorder()
    client: AsyncMongoClient[Any] = AsyncMongoClient(
        asyncassets_server_uri, event_listeners=[recorder]
    )
    try:
        yield client[asyncassets_db.name], recorder
    finally:
        await client.close()


# -- layout and round trips ----------------------------------------------------------

BOUNDARY_SIZES = [0, 1, CS - 1, CS, CS + 1, 3 * CS + 5]


@pytest.mark.parametrize("size", BOUNDARY_SIZES, ids=lambda s: f"{s}B")
async def test_round_trip_at_chunk_boundaries_writes_spec_layout(asyncassets_db, size):
    bucket = GridBucket(asyncassets_db)
    data = payload(size)

    doc = await bucket.upload(data, filename="f.bin", metadata={"owner": "marmot"})

    assert await bucket.read(doc) == data
    assert list(doc) == ["_id", "length", "chunkSize", "uploadDate", "filename", "metadata"]
    assert isinstance(doc["_id"], ObjectId)
    assert doc["length"] == size and doc["chunkSize"] == CS and doc["filename"] == "f.bin"
    assert doc["metadata"] == {"owner": "marmot", "sha256": hashlib.sha256(data).hexdigest()}
    stored = await asyncassets_db["fs.files"].find_one({"_id": doc["_id"]})
    assert stored == doc
    chunks = await chunks_of(asyncassets_db, doc["_id"])
    expected_sizes = [CS] * (size // CS) + ([size % CS] if size % CS else [])
    assert [c["n"] for c in chunks] == list(range(len(expected_sizes)))
    assert [len(c["data"]) for c in chunks] == expected_sizes
    assert b"".join(c["data"] for c in chunks) == data
    assert set(chunks[0]) == {"_id", "files_id", "n", "data"} if chunks else True


async def test_custom_chunk_size_and_bucket_name(asyncassets_db):
    bucket = GridBucket(asyncassets_db, "photos", chunk_size=1000)
    data = payload(4500)
    doc = await bucket.upload(data, chunk_size=700)
    assert doc["chunkSize"] == 700
    assert [len(c["data"]) for c in await chunks_of(asyncassets_db, doc["_id"], "photos")] == [
        700
    ] * 6 + [300]
    assert await bucket.read(doc) == data
    assert await asyncassets_db["fs.files"].count_documents({}) == 0


async def test_upload_date_comes_back_as_the_client_reads_it(asyncassets_db):
    naive = await GridBucket(asyncassets_db).upload(b"x")
    assert naive["uploadDate"].tzinfo is None
    aware_db = asyncassets_db.with_options(
        codec_options=asyncassets_db.codec_options.with_options(tz_aware=True)
    )
    aware = await GridBucket(aware_db).upload(b"y")
    assert aware["uploadDate"] == (await GridBucket(aware_db).find(aware["_id"]))["uploadDate"]
    assert aware["uploadDate"].utcoffset() is not None


@pytest.mark.parametrize("size", [0, CS - 1, 3 * CS + 5], ids=lambda s: f"{s}B")
async def test_pymongo_reads_what_we_write(asyncassets_db, size):
    data = payload(size)
    doc = await GridBucket(asyncassets_db).upload(data, filename="ours", metadata={"k": 1})
    grid_out = await AsyncGridFSBucket(asyncassets_db).open_download_stream(doc["_id"])
    assert await grid_out.read() == data
    assert grid_out.filename == "ours"
    assert grid_out.metadata == {"k": 1, "sha256": hashlib.sha256(data).hexdigest()}


@pytest.mark.parametrize("chunk_size", [CS, 1000])
async def test_we_read_what_pymongo_writes(asyncassets_db, chunk_size):
    data = payload(3 * chunk_size + 17)
    theirs = AsyncGridFSBucket(asyncassets_db, chunk_size_bytes=chunk_size)
    file_id = await theirs.upload_from_stream("theirs", data, metadata={"k": 2})
    bucket = GridBucket(asyncassets_db)
    doc = await bucket.find(file_id)
    assert doc is not None and doc["filename"] == "theirs"
    assert await bucket.read(doc) == data
    assert (
        await bucket.read(doc, start=chunk_size - 3, end=2 * chunk_size + 4)
        == data[chunk_size - 3 : 2 * chunk_size + 4]
    )


async def test_indexes_are_created_once_and_match_the_spec(watched):
    db, recorder = watched
    bucket = GridBucket(db)
    await bucket.upload(b"x")
    files_indexes = await db["fs.files"].index_information()
    chunks_indexes = await db["fs.chunks"].index_information()
    assert [("filename", 1), ("uploadDate", 1)] in [i["key"] for i in files_indexes.values()]
    unique = [i for i in chunks_indexes.values() if i["key"] == [("files_id", 1), ("n", 1)]]
    assert unique and unique[0].get("unique") is True

    recorder.clear()
    await GridBucket(db).ensure_indexes()
    await bucket.upload(b"y")
    assert "listIndexes" not in recorder.names()
    assert "createIndexes" not in recorder.names()


async def test_existing_pymongo_indexes_are_reused(asyncassets_db):
    await AsyncGridFSBucket(asyncassets_db).upload_from_stream("theirs", b"data")
    await GridBucket(asyncassets_db).upload(b"ours")
    assert len(await asyncassets_db["fs.chunks"].index_information()) == 2


# -- sources -------------------------------------------------------------------------


class AsyncReader:
    """An async file-like object, as aiofiles or Starlette's UploadFile."""

    def __init__(self, data: bytes) -> None:
        self._buffer = io.BytesIO(data)
        self.sizes: list[int] = []

    async def read(self, size: int = -1) -> bytes:
        self.sizes.append(size)
        await asyncio.sleep(0)
        return self._buffer.read(size)


def _pieces(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


async def _agen(data: bytes) -> AsyncIterator[bytes]:
    for piece in _pieces(data, 3000):
        await asyncio.sleep(0)
        yield piece


def _gen(data: bytes) -> Iterator[bytearray]:
    for piece in _pieces(data, 7000):
        yield bytearray(piece)


SOURCES = {
    "bytes": lambda data, tmp: data,
    "bytearray": lambda data, tmp: bytearray(data),
    "memoryview": lambda data, tmp: memoryview(data),
    "array": lambda data, tmp: array.array("B", data),
    "BytesIO": lambda data, tmp: io.BytesIO(data),
    "binary file": lambda data, tmp: _binary_file(tmp, data),
    "async reader": lambda data, tmp: AsyncReader(data),
    "async iterable": lambda data, tmp: _agen(data),
    "iterable": lambda data, tmp: _gen(data),
    "list of pieces": lambda data, tmp: [memoryview(p) for p in _pieces(data, 5000)],
}


def _binary_file(tmp: Any, data: bytes) -> Any:
    path = tmp / "source.bin"
    path.write_bytes(data)
    return path.open("rb")


@pytest.mark.parametrize("kind", list(SOURCES))
async def test_every_source_kind_round_trips(asyncassets_db, tmp_path, kind):
    bucket = GridBucket(asyncassets_db, chunk_size=4096, buffer_size=16384)
    data = payload(50_000)
    source = SOURCES[kind](data, tmp_path)
    try:
        doc = await bucket.upload(source)
    finally:
        if isinstance(source, io.IOBase):
            source.close()
    assert doc["length"] == len(data)
    assert doc["metadata"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert await bucket.read(doc) == data


async def test_file_sources_are_read_in_chunk_size_pieces(asyncassets_db):
    reader = AsyncReader(payload(10_000))
    await GridBucket(asyncassets_db, chunk_size=1024).upload(reader)
    assert set(reader.sizes) == {1024}


class ExplodingReader:
    def __init__(self, good_reads: int) -> None:
        self.good_reads = good_reads

    def read(self, size: int) -> bytes:
        if self.good_reads == 0:
            raise OSError("disk on fire")
        self.good_reads -= 1
        return b"z" * size


def _text_file(tmp: Any) -> Any:
    path = tmp / "text.txt"
    path.write_text("hello")
    return path.open("r")


def _closed_file(tmp: Any) -> Any:
    handle = _binary_file(tmp, b"data")
    handle.close()
    return handle


class SneakyTextReader:
    """Not a TextIOBase, but read() returns str all the same."""

    def read(self, size: int) -> str:
        return "text"


def _str_mid_way() -> Iterator[Any]:
    yield b"a" * 5000
    yield "oops"


BAD_SOURCES = {
    "None": (lambda tmp: None, TypeError, "got None"),
    "int": (lambda tmp: 5, TypeError, "cannot read from int"),
    "str": (lambda tmp: "text", TypeError, "encode"),
    "text file": (_text_file, TypeError, "binary mode"),
    "read returns str": (lambda tmp: SneakyTextReader(), TypeError, "binary mode"),
    "closed file": (_closed_file, ValueError, "is closed"),
    "dict": (lambda tmp: {"a": b"b"}, TypeError, "cannot read from dict"),
    "iterable of ints": (lambda tmp: [1, 2, 3], TypeError, "not int"),
    "str mid-way": (lambda tmp: _str_mid_way(), TypeError, "not str"),
    "read raises mid-way": (lambda tmp: ExplodingReader(12), OSError, "disk on fire"),
}


@pytest.mark.parametrize("kind", list(BAD_SOURCES))
async def test_bad_sources_raise_clearly_and_leave_nothing(asyncassets_db, tmp_path, kind):
    make, error, message = BAD_SOURCES[kind]
    bucket = GridBucket(asyncassets_db, chunk_size=1024, buffer_size=4096)
    source = make(tmp_path)
    try:
        with pytest.raises(error, match=message):
            await bucket.upload(source)
    finally:
        if isinstance(source, io.IOBase):
            source.close()
    await assert_bucket_empty(asyncassets_db)


# -- failure, cancellation, abort ------------------------------------------------------


@pytest.mark.parametrize("delay", [0, 0.001, 0.01, 0.05])
async def test_cancelling_an_upload_leaves_no_chunks(asyncassets_db, delay):
    bucket = GridBucket(asyncassets_db, chunk_size=1024, buffer_size=4096)
    inserted = asyncio.Event()

    async def endless() -> AsyncIterator[bytes]:
        piece = b"x" * 1024
        for i in itertools.count():
            yield piece
            if i == 30:
                inserted.set()
            await asyncio.sleep(0)

    task = asyncio.create_task(bucket.upload(endless(), file_id="cancel-me"))
    if delay:
        await inserted.wait()
        await asyncio.sleep(delay)
        assert await asyncassets_db["fs.chunks"].count_documents({}) > 0
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await assert_bucket_empty(asyncassets_db)


@pytest.mark.parametrize("delay", [0, 0.002, 0.01, 0.02, 0.05, 0.2])
async def test_cancelled_close_leaves_a_whole_file_or_nothing(asyncassets_db, delay):
    # The delays land the cancellation before, between and after the inserts.
    bucket = GridBucket(asyncassets_db, chunk_size=1024, buffer_size=4096)
    data = payload(20_000)
    stream = bucket.open_upload()
    stream.write_nowait(data)
    task = asyncio.create_task(stream.close())
    await asyncio.sleep(delay)
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        await assert_bucket_empty(asyncassets_db)
    else:
        assert await bucket.read(await bucket.find(stream.file_id)) == data


async def test_an_insert_failing_mid_upload_removes_the_earlier_chunks(asyncassets_db):
    # A validator makes the server refuse chunk 5 onwards, after chunks 0-4 went in.
    await asyncassets_db.create_collection("fs.chunks", validator={"n": {"$lt": 5}})
    bucket = GridBucket(asyncassets_db, chunk_size=1000, buffer_size=4000)
    with pytest.raises(BulkWriteError, match="validation"):
        await bucket.upload(payload(20_000))
    await assert_bucket_empty(asyncassets_db)

    stream = bucket.open_upload()
    await stream.write(payload(4000))
    await stream.flush()
    with pytest.raises(BulkWriteError):
        await stream.write(payload(6000))
        await stream.flush()
    assert stream.closed
    await assert_bucket_empty(asyncassets_db)


async def test_abort_removes_written_chunks_and_is_idempotent(asyncassets_db):
    bucket = GridBucket(asyncassets_db, chunk_size=1024, buffer_size=4096)
    stream = bucket.open_upload()
    await stream.write(payload(10_000))
    await stream.flush()
    assert len(await chunks_of(asyncassets_db, stream.file_id)) == 9

    await stream.abort()
    await stream.abort()

    assert stream.closed
    await assert_bucket_empty(asyncassets_db)
    with pytest.raises(UploadClosed, match="aborted"):
        await stream.write(b"more")
    with pytest.raises(UploadClosed, match="aborted"):
        stream.write_nowait(b"more")
    with pytest.raises(UploadClosed, match="aborted"):
        await stream.close()


async def test_async_with_aborts_on_exception(asyncassets_db):
    bucket = GridBucket(asyncassets_db, chunk_size=1024, buffer_size=4096)
    with pytest.raises(RuntimeError, match="boom"):
        async with bucket.open_upload() as stream:
            await stream.write(payload(20_000))
            await stream.flush()
            assert await chunks_of(asyncassets_db, stream.file_id)
            raise RuntimeError("boom")
    await assert_bucket_empty(asyncassets_db)


async def test_async_with_closes_on_success_and_close_is_idempotent(asyncassets_db):
    bucket = GridBucket(asyncassets_db)
    async with bucket.open_upload(filename="a.txt", file_id="my-id") as stream:
        assert stream.file_id == "my-id"
        await stream.write(b"hello ")
        stream.write_nowait(b"world")
        assert stream.length == 11 and not stream.closed
    doc = await stream.close()
    assert stream.closed
    assert doc is await stream.close()
    assert doc["_id"] == "my-id" and doc["length"] == 11
    assert await bucket.read(doc) == b"hello world"
    await stream.abort()  # after close: the file is stored, abort leaves it alone
    assert await bucket.find("my-id") is not None
    with pytest.raises(UploadClosed, match="closed"):
        await stream.write(b"!")


async def test_files_document_is_inserted_last(asyncassets_db):
    bucket = GridBucket(asyncassets_db, chunk_size=1024, buffer_size=4096)
    stream = bucket.open_upload()
    await stream.write(payload(50_000))
    await stream.flush()
    assert await bucket.find(stream.file_id) is None
    await stream.close()
    assert await bucket.find(stream.file_id) is not None


async def test_taken_file_id_raises_and_keeps_the_existing_file(asyncassets_db):
    bucket = GridBucket(asyncassets_db, chunk_size=1024)
    original = payload(5000, seed=1)
    await bucket.upload(original, file_id="taken")
    with pytest.raises(FileAlreadyExists, match="taken"):
        await bucket.upload(payload(3000, seed=2), file_id="taken")
    assert await bucket.read(await bucket.find("taken")) == original


async def test_taken_empty_file_id_raises_and_keeps_the_existing_file(asyncassets_db):
    bucket = GridBucket(asyncassets_db, chunk_size=1024)
    await bucket.upload(b"", file_id="empty")
    with pytest.raises(FileAlreadyExists):
        await bucket.upload(payload(3000), file_id="empty")
    assert (await bucket.find("empty"))["length"] == 0
    assert await chunks_of(asyncassets_db, "empty") == []


async def test_collision_mid_upload_removes_only_our_chunks(asyncassets_db):
    bucket = GridBucket(asyncassets_db, chunk_size=1000, buffer_size=4000)
    await bucket.ensure_indexes()
    foreign = {"files_id": "clash", "n": 6, "data": b"f" * 1000}
    await asyncassets_db["fs.chunks"].insert_one(foreign)
    with pytest.raises(FileAlreadyExists):
        await bucket.upload(payload(10_000), file_id="clash")
    assert [c["n"] for c in await chunks_of(asyncassets_db, "clash")] == [6]


# -- streaming writes ------------------------------------------------------------------


async def test_many_small_writes_stream_through(asyncassets_db):
    bucket = GridBucket(asyncassets_db, chunk_size=4096, buffer_size=16384)
    pieces = [payload(97, seed=i) for i in range(3000)]
    async with bucket.open_upload() as stream:
        for piece in pieces[:1000]:
            await stream.write(piece)
        for piece in pieces[1000:2000]:
            stream.write_nowait(piece)
        await stream.flush()
        await stream.writelines(pieces[2000:])
    data = b"".join(pieces)
    doc = await stream.close()
    assert doc["length"] == len(data) == stream.length
    assert doc["metadata"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert await bucket.read(doc) == data


async def test_write_accepts_any_bytes_like_and_refuses_the_rest(asyncassets_db):
    bucket = GridBucket(asyncassets_db, chunk_size=8)
    stream = bucket.open_upload()
    await stream.write(bytearray(b"abc"))
    await stream.write(memoryview(b"defghijklmn")[2:])
    await stream.write(array.array("H", [0x4241]))
    with pytest.raises(TypeError, match="encode"):
        await stream.write("text")
    with pytest.raises(TypeError, match="not int"):
        stream.write_nowait(3)
    doc = await stream.close()
    assert await bucket.read(doc) == b"abcfghijklmn" + array.array("H", [0x4241]).tobytes()


async def test_bytes_written_are_not_copied_while_their_chunks_wait(asyncassets_db):
    # Chunks cut from bytes are copied only when their insert is encoded: an upload
    # waiting for a connection holds a view of the caller's bytes, not a copy
    # (issue #22: 500 concurrent 1 MiB uploads held a 1 MiB copy each).
    bucket = GridBucket(asyncassets_db, chunk_size=64 * 1024, buffer_size=8 * 1024 * 1024)
    data = payload(1024 * 1024 + 100)
    stream = bucket.open_upload()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        await stream.write(data)  # 16 whole chunks wait for a batch of 64
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held < 64 * 1024, f"the upload copied {held} bytes of what it was given"
    doc = await stream.close()
    assert await bucket.read(doc) == data


async def test_a_buffer_changed_after_write_is_stored_as_it_was_written(asyncassets_db):
    bucket = GridBucket(asyncassets_db, chunk_size=8, buffer_size=1024)
    stream = bucket.open_upload()
    buffer = bytearray(b"0123456789abcdefghij")
    await stream.write(buffer)
    await stream.write(memoryview(buffer)[:10])
    buffer[:] = b"X" * len(buffer)  # the caller reuses its buffer
    doc = await stream.close()
    assert await bucket.read(doc) == b"0123456789abcdefghij0123456789"


async def test_metadata_is_copied_not_mutated(asyncassets_db):
    metadata = {"a": 1}
    doc = await GridBucket(asyncassets_db).upload(b"data", metadata=metadata)
    assert metadata == {"a": 1}
    assert doc["metadata"] == {"a": 1, "sha256": hashlib.sha256(b"data").hexdigest()}


def test_bad_arguments_raise_before_any_io(asyncassets_db):
    with pytest.raises(ValueError, match="chunk_size"):
        GridBucket(asyncassets_db, chunk_size=0)
    with pytest.raises(TypeError, match="buffer_size"):
        GridBucket(asyncassets_db, buffer_size=1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="metadata"):
        GridBucket(asyncassets_db).open_upload(metadata=[("a", 1)])  # type: ignore[arg-type]


# -- ranged reads ----------------------------------------------------------------------

RANGE_FILE = 5500  # chunks of 1000: 0..4 full, 5 holds 500


@pytest.mark.parametrize(
    ("start", "end", "chunks"),
    [
        (0, None, [0, 1, 2, 3, 4, 5]),
        (1200, 1800, [1]),
        (999, 1001, [0, 1]),
        (1000, 2000, [1]),
        (1500, 4200, [1, 2, 3, 4]),
        (5000, None, [5]),
        (5499, 5500, [5]),
        (5500, None, []),
        (2000, 2000, []),
        (0, 1, [0]),
    ],
)
async def test_ranged_read_fetches_only_the_chunks_needed(watched, start, end, chunks):
    db, recorder = watched
    bucket = GridBucket(db, chunk_size=1000, buffer_size=2000)
    data = payload(RANGE_FILE)
    doc = await bucket.upload(data)
    recorder.clear()

    assert await bucket.read(doc, start=start, end=end) == data[start:end]
    assert recorder.chunk_ns() == chunks


async def test_ranged_stream_yields_one_trimmed_piece_per_chunk(asyncassets_db):
    bucket = GridBucket(asyncassets_db, chunk_size=1000)
    data = payload(RANGE_FILE)
    doc = await bucket.upload(data)
    pieces = [p async for p in bucket.open_download(doc, start=1500, end=3200)]
    assert pieces == [data[1500:2000], data[2000:3000], data[3000:3200]]


@pytest.mark.parametrize(
    ("start", "end", "error"),
    [
        (-1, None, ValueError),
        (0, RANGE_FILE + 1, ValueError),
        (3000, 2000, ValueError),
        (RANGE_FILE + 1, None, ValueError),
        (1.5, None, TypeError),
        (0, "10", TypeError),
    ],
)
async def test_invalid_ranges_raise(asyncassets_db, start, end, error):
    bucket = GridBucket(asyncassets_db, chunk_size=1000)
    doc = await bucket.upload(payload(RANGE_FILE))
    with pytest.raises(error):
        bucket.open_download(doc, start=start, end=end)


async def test_zero_length_file_needs_no_chunk_query(watched):
    db, recorder = watched
    bucket = GridBucket(db)
    doc = await bucket.upload(b"")
    recorder.clear()
    assert await bucket.read(doc) == b""
    assert recorder.names() == []


async def test_download_stream_closes_its_cursor_when_stopped_early(watched):
    db, recorder = watched
    bucket = GridBucket(db, chunk_size=1000, buffer_size=2000)
    doc = await bucket.upload(payload(10_000))
    recorder.clear()
    async with bucket.open_download(doc) as stream:
        assert len(await stream.__anext__()) == 1000
    assert "killCursors" in recorder.names()
    assert [p async for p in stream] == []


def test_open_download_validates_the_files_document(asyncassets_db):
    bucket = GridBucket(asyncassets_db)
    with pytest.raises(TypeError, match="files document"):
        bucket.open_download("some-id")  # type: ignore[arg-type]
    with pytest.raises(CorruptFile, match="length"):
        bucket.open_download({"_id": 1, "chunkSize": 10})
    with pytest.raises(CorruptFile, match="chunkSize"):
        bucket.open_download({"_id": 1, "length": 10, "chunkSize": 0})


# -- corruption ------------------------------------------------------------------------


async def _three_chunk_file(db: Any) -> tuple[GridBucket, dict[str, Any]]:
    bucket = GridBucket(db, "media", chunk_size=1000)
    return bucket, await bucket.upload(payload(2500), file_id="corrupt-me")


async def test_missing_middle_chunk_is_corrupt(asyncassets_db):
    bucket, doc = await _three_chunk_file(asyncassets_db)
    await asyncassets_db["media.chunks"].delete_one({"files_id": "corrupt-me", "n": 1})
    with pytest.raises(CorruptFile, match=r"'corrupt-me' in bucket 'media'.*n=1 is missing"):
        await bucket.read(doc)
    assert await bucket.read(doc, end=1000) == payload(2500)[:1000]


async def test_missing_last_chunk_is_corrupt(asyncassets_db):
    bucket, doc = await _three_chunk_file(asyncassets_db)
    await asyncassets_db["media.chunks"].delete_one({"files_id": "corrupt-me", "n": 2})
    with pytest.raises(CorruptFile, match="n=2 is missing"):
        await bucket.read(doc, start=2100)


@pytest.mark.parametrize(
    ("n", "size", "kind"), [(0, 999, "short"), (1, 1001, "long"), (2, 10, "short")]
)
async def test_chunk_of_wrong_size_is_corrupt(asyncassets_db, n, size, kind):
    bucket, doc = await _three_chunk_file(asyncassets_db)
    await asyncassets_db["media.chunks"].update_one(
        {"files_id": "corrupt-me", "n": n}, {"$set": {"data": b"x" * size}}
    )
    with pytest.raises(CorruptFile, match=f"n={n} is {kind}"):
        await bucket.read(doc)


async def test_extra_chunk_is_corrupt_but_empty_extra_is_ignored(asyncassets_db):
    bucket, doc = await _three_chunk_file(asyncassets_db)
    chunks = asyncassets_db["media.chunks"]
    await chunks.insert_one({"files_id": "corrupt-me", "n": 3, "data": b""})
    assert await bucket.read(doc) == payload(2500)
    await chunks.insert_one({"files_id": "corrupt-me", "n": 7, "data": b"extra"})
    with pytest.raises(CorruptFile, match="n=7 is extra"):
        await bucket.read(doc)


# -- find, delete ----------------------------------------------------------------------


async def test_find_many_uses_one_query(watched):
    db, recorder = watched
    bucket = GridBucket(db)
    docs = [await bucket.upload(payload(10, seed=i)) for i in range(3)]
    recorder.clear()
    ids = [d["_id"] for d in docs]
    found = await bucket.find_many([*ids, ids[0], "missing"])
    assert recorder.names() == ["find"]
    assert set(found) == set(ids)
    assert found[ids[1]]["length"] == 10
    recorder.clear()
    assert await bucket.find_many([]) == {}
    assert recorder.names() == []
    assert await bucket.find("missing") is None


async def test_delete_removes_files_document_and_chunks(asyncassets_db):
    bucket = GridBucket(asyncassets_db, chunk_size=1000)
    keep = await bucket.upload(payload(3000, seed=1))
    doc = await bucket.upload(payload(3000, seed=2))
    assert await bucket.delete(doc["_id"]) is True
    assert await bucket.find(doc["_id"]) is None
    assert await chunks_of(asyncassets_db, doc["_id"]) == []
    assert await bucket.delete(doc["_id"]) is False
    assert await bucket.read(keep) == payload(3000, seed=1)


async def test_delete_removes_chunks_of_a_half_deleted_file(asyncassets_db):
    bucket = GridBucket(asyncassets_db, chunk_size=1000)
    doc = await bucket.upload(payload(3000))
    await asyncassets_db["fs.files"].delete_one({"_id": doc["_id"]})
    assert await bucket.delete(doc["_id"]) is False
    await assert_bucket_empty(asyncassets_db)


async def test_delete_chunks_counts(asyncassets_db):
    bucket = GridBucket(asyncassets_db, chunk_size=1000)
    doc = await bucket.upload(payload(3500))
    assert await bucket.delete_chunks(doc["_id"]) == 4
    assert await bucket.find(doc["_id"]) is not None


# -- memory ----------------------------------------------------------------------------


async def test_memory_stays_bounded_for_a_64_mib_file(asyncassets_db):
    buffer_size = 4 * MiB
    bucket = GridBucket(asyncassets_db, buffer_size=buffer_size)
    block = os.urandom(MiB)
    size = 64 * MiB
    expected = hashlib.sha256()

    def source() -> Iterator[memoryview]:
        view = memoryview(block)
        for i in range(size // 65536):
            piece = view[(i % 16) * 65536 : (i % 16 + 1) * 65536]
            expected.update(piece)
            yield piece

    tracemalloc.start()
    try:
        doc = await bucket.upload(source())
        upload_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        got = hashlib.sha256()
        async for piece in bucket.open_download(doc):
            got.update(piece)
        download_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    assert doc["length"] == size
    assert got.hexdigest() == expected.hexdigest() == doc["metadata"]["sha256"]
    assert upload_peak < 3 * buffer_size, f"upload peak {upload_peak / MiB:.1f} MiB"
    assert download_peak < 3 * buffer_size, f"download peak {download_peak / MiB:.1f} MiB"


# -- Motor -----------------------------------------------------------------------------


async def test_works_with_a_motor_database(asyncassets_db, asyncassets_server_uri):
    motor_asyncio = pytest.importorskip("motor.motor_asyncio")
    client = motor_asyncio.AsyncIOMotorClient(asyncassets_server_uri)
    try:
        db = client[asyncassets_db.name]
        bucket = GridBucket(db, chunk_size=1000, buffer_size=2000)
        data = payload(7777)
        doc = await bucket.upload(io.BytesIO(data), filename="motor")
        assert await bucket.read(doc) == data
        assert await bucket.read(doc, start=1500, end=4100) == data[1500:4100]
        assert set(await bucket.find_many([doc["_id"]])) == {doc["_id"]}
        with pytest.raises(ValueError, match="boom"):
            async with bucket.open_upload() as stream:
                await stream.write(data)
                await stream.flush()
                raise ValueError("boom")
        assert await db["fs.chunks"].count_documents({"files_id": stream.file_id}) == 0
        await db["fs.chunks"].delete_one({"files_id": doc["_id"], "n": 3})
        with pytest.raises(CorruptFile, match="n=3 is missing"):
            await bucket.read(doc)
        assert await bucket.delete(doc["_id"]) is True
        await assert_bucket_empty(db)
    finally:
        client.close()
