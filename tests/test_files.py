"""FileField and its proxy: every method as users write it, against the real server.

Every test checks what a user can observe: the bytes read back, the metadata
attributes, the stored document, and what the GridFS collections (``fs.files``,
``fs.chunks``) hold afterwards.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import io
import math

import pytest
from bson import ObjectId
from pymongo import AsyncMongoClient, monitoring

import asyncassets
from asyncassets import (
    CorruptFile,
    Document,
    EmbeddedDocument,
    FileAlreadyExists,
    FileNotFound,
    FileNotLoaded,
    FileProxy,
    GridFSError,
    UploadClosed,
    ValidationError,
)
from asyncassets.fields import (
    EmbeddedDocumentField,
    FileField,
    ListField,
    StringField,
)
from asyncassets.testing import unique_db_name

# Class names are prefixed "Files" so they never clash in mongoengine's global
# document registry with the classes of the other test modules.

CHUNK = 16  # small chunks make chunk boundaries cheap to test
DATA = bytes(range(256)) * 2 + b"tail"  # 516 bytes: 32 full chunks and a 4-byte one


class FilesAnimal(Document):
    genus = StringField()
    photo = FileField(chunk_size=CHUNK)
    meta = {"collection": "animals"}


class FilesPicture(EmbeddedDocument):
    caption = StringField()
    image = FileField(chunk_size=CHUNK)


class FilesAlbum(Document):
    title = StringField()
    cover = EmbeddedDocumentField(FilesPicture)
    pictures = ListField(EmbeddedDocumentField(FilesPicture))
    attachments = ListField(FileField(chunk_size=CHUNK))


ARCHIVE_ALIAS = "files_archive"


class FilesMulti(Document):
    main = FileField()
    thumb = FileField(collection_name="thumbs")
    archived = FileField(collection_name="archive", db_alias=ARCHIVE_ALIAS)


class FilesNowhere(Document):
    """Bound to an alias that is never connected: touching the database would raise."""

    photo = FileField()
    meta = {"db_alias": "files_never_connected"}


METADATA_ATTRIBUTES = [
    "metadata",
    "content_type",
    "filename",
    "length",
    "upload_date",
    "chunk_size",
    "sha256",
]


# -- helpers ------------------------------------------------------------------


async def bucket_state(db, bucket: str = "fs") -> tuple[int, int]:
    """(files documents, chunks) in a bucket."""
    return (
        await db[f"{bucket}.files"].count_documents({}),
        await db[f"{bucket}.chunks"].count_documents({}),
    )


async def chunks_of(db, file_id, bucket: str = "fs") -> list[dict]:
    cursor = db[f"{bucket}.chunks"].find({"files_id": file_id}, sort=[("n", 1)])
    return [c async for c in cursor]


async def stored(doc) -> dict:
    """The raw stored document, as the database has it now."""
    return await type(doc)._get_collection().find_one({"_id": doc.pk})


async def fresh(doc):
    """The same document loaded anew from the database."""
    return await type(doc).objects(pk=doc.pk).first()


async def unloaded(doc):
    """The same document loaded anew, without its files' catalogue entries."""
    return await type(doc).objects(pk=doc.pk).no_files().first()


class AsyncReader:
    """An async file object (like aiofiles or Starlette's UploadFile)."""

    def __init__(self, data: bytes) -> None:
        self._buf = io.BytesIO(data)
        self.sizes: list[int] = []

    async def read(self, n: int = -1) -> bytes:
        self.sizes.append(n)
        await asyncio.sleep(0)
        return self._buf.read(n)


class RecordingReader(io.BytesIO):
    """A sync binary file that records the sizes it was asked for."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.sizes: list[int] = []

    def read(self, n: int | None = -1) -> bytes:
        self.sizes.append(n)
        return super().read(n)


async def agen(pieces):
    for piece in pieces:
        await asyncio.sleep(0)
        yield piece


def pieces_of(data: bytes, size: int = 7) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


# -- put ----------------------------------------------------------------------


async def test_put_on_new_document_is_referenced_by_its_first_save(asyncassets_db):
    marmot = FilesAnimal(genus="Marmota")
    await marmot.photo.put(DATA, content_type="image/png")
    assert await asyncassets_db.animals.count_documents({}) == 0
    assert await bucket_state(asyncassets_db) == (1, math.ceil(len(DATA) / CHUNK))

    await marmot.save()
    assert (await stored(marmot))["photo"] == marmot.photo.file_id
    assert await (await fresh(marmot)).photo.read() == DATA


@pytest.mark.parametrize(
    "make_source",
    [
        pytest.param(lambda d: d, id="bytes"),
        pytest.param(bytearray, id="bytearray"),
        pytest.param(memoryview, id="memoryview"),
        pytest.param(io.BytesIO, id="sync-file"),
        pytest.param(AsyncReader, id="async-file"),
        pytest.param(pieces_of, id="list-of-bytes"),
        pytest.param(lambda d: iter(pieces_of(d)), id="iterator"),
        pytest.param(lambda d: agen(pieces_of(d)), id="async-generator"),
    ],
)
async def test_put_accepts_every_documented_source(asyncassets_db, make_source):
    marmot = await FilesAnimal(genus="Marmota").save()
    await marmot.photo.put(make_source(DATA))
    assert await (await fresh(marmot)).photo.read() == DATA


@pytest.mark.parametrize("reader", [RecordingReader, AsyncReader])
async def test_put_reads_file_objects_in_chunk_sized_pieces_never_whole(asyncassets_db, reader):
    source = reader(DATA)
    marmot = FilesAnimal()
    await marmot.photo.put(source)
    assert source.sizes, "the file object was never read"
    assert all(n is not None and 0 < n <= CHUNK for n in source.sizes), source.sizes
    assert await marmot.photo.read() == DATA


async def test_put_stores_metadata_in_the_gridfs_spec_layout(asyncassets_db):
    marmot = FilesAnimal()
    await marmot.photo.put(DATA, content_type="image/png", filename="m.png", author="Ada", n=3)
    files_doc = await asyncassets_db["fs.files"].find_one({"_id": marmot.photo.file_id})
    assert files_doc["filename"] == "m.png"
    assert files_doc["length"] == len(DATA)
    assert files_doc["chunkSize"] == CHUNK
    assert isinstance(files_doc["uploadDate"], dt.datetime)
    assert files_doc["metadata"]["content_type"] == "image/png"
    assert files_doc["metadata"]["author"] == "Ada"
    assert files_doc["metadata"]["n"] == 3
    assert "contentType" not in files_doc and "author" not in files_doc


async def test_put_on_a_proxy_holding_a_file_raises_and_uploads_nothing(asyncassets_db):
    marmot = FilesAnimal()
    await marmot.photo.put(b"first")
    await marmot.save()
    with pytest.raises(FileAlreadyExists, match="replace"):
        await marmot.photo.put(b"second")
    assert isinstance(FileAlreadyExists("x"), GridFSError)
    assert await bucket_state(asyncassets_db) == (1, 1)
    assert await (await fresh(marmot)).photo.read() == b"first"


async def test_put_on_saved_document_writes_the_reference_without_save(asyncassets_db):
    marmot = await FilesAnimal(genus="Marmota").save()
    await marmot.photo.put(DATA)
    assert (await stored(marmot))["photo"] == marmot.photo.file_id
    assert await (await fresh(marmot)).photo.read() == DATA


# -- sizes around the chunk boundary ---------------------------------------------

SIZES = [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5]


def sized(n: int) -> bytes:
    return bytes((i * 7 + 3) % 256 for i in range(n))


async def assert_stored_exactly(db, proxy, data: bytes) -> None:
    files_doc = await db["fs.files"].find_one({"_id": proxy.file_id})
    assert files_doc["length"] == len(data)
    assert files_doc["chunkSize"] == CHUNK
    chunks = await chunks_of(db, proxy.file_id)
    assert [c["n"] for c in chunks] == list(range(math.ceil(len(data) / CHUNK)))
    assert all(len(c["data"]) == CHUNK for c in chunks[:-1])
    assert b"".join(c["data"] for c in chunks) == data
    assert await db["fs.chunks"].count_documents({}) == len(chunks)


@pytest.mark.parametrize("size", SIZES)
async def test_put_at_chunk_boundaries_stores_exact_chunks(asyncassets_db, size):
    data = sized(size)
    marmot = await FilesAnimal().save()
    await marmot.photo.put(data)
    await assert_stored_exactly(asyncassets_db, marmot.photo, data)
    again = await fresh(marmot)
    assert await again.photo.read() == data
    assert b"".join([piece async for piece in again.photo]) == data
    assert again.photo.length == size


@pytest.mark.parametrize("size", SIZES)
async def test_streaming_write_at_chunk_boundaries_stores_exact_chunks(asyncassets_db, size):
    data = sized(size)
    marmot = FilesAnimal()
    async with marmot.photo.new_file():
        for piece in pieces_of(data, 5):
            await marmot.photo.write(piece)
    await marmot.save()
    await assert_stored_exactly(asyncassets_db, marmot.photo, data)
    assert await (await fresh(marmot)).photo.read() == data


# -- reading ------------------------------------------------------------------


async def test_read_returns_the_whole_file_every_time(asyncassets_db):
    marmot = FilesAnimal()
    await marmot.photo.put(DATA)
    await marmot.save()
    loaded = await fresh(marmot)
    assert await loaded.photo.read() == DATA
    assert await loaded.photo.read() == DATA
    loaded.photo.seek(100)
    assert await loaded.photo.read(3) == DATA[100:103]
    assert await loaded.photo.read() == DATA


async def test_read_of_an_empty_field_is_none_and_stream_is_empty(asyncassets_db):
    marmot = await FilesAnimal().save()
    loaded = await fresh(marmot)
    assert not loaded.photo
    assert await loaded.photo.read() is None
    assert [piece async for piece in loaded.photo.stream()] == []
    assert [piece async for piece in loaded.photo] == []
    assert await loaded.photo.load() is loaded.photo


async def test_read_n_seek_and_tell_move_through_the_file(asyncassets_db):
    marmot = FilesAnimal()
    await marmot.photo.put(DATA)
    loaded = await fresh(await marmot.save())
    photo = loaded.photo
    assert photo.tell() == 0
    assert await photo.read(10) == DATA[:10]
    assert photo.tell() == 10
    assert await photo.read(20) == DATA[10:30]
    assert photo.seek(5, 1) == 35
    assert await photo.read(1) == DATA[35:36]
    assert photo.seek(-4, 2) == len(DATA) - 4
    assert await photo.read(100) == b"tail"
    assert await photo.read(100) == b""
    assert photo.seek(0) == 0
    assert await photo.read(0) == b""
    with pytest.raises(ValueError, match="negative"):
        photo.seek(-1)
    with pytest.raises(ValueError, match="whence"):
        photo.seek(0, 3)


async def test_seek_from_the_end_needs_the_metadata_loaded(asyncassets_db):
    marmot = FilesAnimal()
    await marmot.photo.put(DATA)
    loaded = await unloaded(await marmot.save())
    with pytest.raises(FileNotLoaded):
        loaded.photo.seek(-1, 2)
    await loaded.photo.load()
    assert loaded.photo.seek(-1, 2) == len(DATA) - 1


async def test_readchunk_reads_to_the_end_of_the_current_chunk(asyncassets_db):
    marmot = FilesAnimal()
    await marmot.photo.put(DATA)
    loaded = await fresh(await marmot.save())
    assert await loaded.photo.readchunk() == DATA[:CHUNK]
    loaded.photo.seek(CHUNK + 5)
    assert await loaded.photo.readchunk() == DATA[CHUNK + 5 : 2 * CHUNK]
    assert loaded.photo.tell() == 2 * CHUNK
    loaded.photo.seek(len(DATA) - 2)
    assert await loaded.photo.readchunk() == b"il"
    assert await loaded.photo.readchunk() == b""
    empty = await fresh(await FilesAnimal().save())
    assert await empty.photo.readchunk() == b""


@pytest.mark.parametrize(
    ("start", "end"),
    [(0, None), (1, None), (CHUNK, 2 * CHUNK), (CHUNK - 1, CHUNK + 1), (500, 516), (7, 7)],
)
async def test_stream_yields_the_range_in_chunk_sized_pieces(asyncassets_db, start, end):
    marmot = FilesAnimal()
    await marmot.photo.put(DATA)
    loaded = await fresh(await marmot.save())
    pieces = [piece async for piece in loaded.photo.stream(start, end)]
    assert b"".join(pieces) == DATA[start:end]
    assert all(0 < len(p) <= CHUNK for p in pieces)


async def test_stream_from_an_offset_fetches_only_the_chunks_it_needs(asyncassets_db):
    marmot = FilesAnimal()
    await marmot.photo.put(DATA)
    await marmot.save()
    # Remove the first two chunks: a range read after them must not notice.
    await asyncassets_db["fs.chunks"].delete_many(
        {"files_id": marmot.photo.file_id, "n": {"$lt": 2}}
    )
    loaded = await fresh(marmot)
    tail = b"".join([p async for p in loaded.photo.stream(start=2 * CHUNK)])
    assert tail == DATA[2 * CHUNK :]
    with pytest.raises(CorruptFile):
        await loaded.photo.read()


async def test_stream_outside_the_file_raises_value_error(asyncassets_db):
    marmot = FilesAnimal()
    await marmot.photo.put(DATA)
    loaded = await fresh(await marmot.save())
    with pytest.raises(ValueError, match="range"):
        [p async for p in loaded.photo.stream(start=len(DATA) + 1)]
    with pytest.raises(ValueError, match="range"):
        [p async for p in loaded.photo.stream(start=10, end=5)]


async def test_async_for_over_the_proxy_streams_the_file(asyncassets_db):
    marmot = FilesAnimal()
    await marmot.photo.put(DATA)
    loaded = await fresh(await marmot.save())
    pieces = [piece async for piece in loaded.photo]
    assert b"".join(pieces) == DATA
    assert len(pieces) == math.ceil(len(DATA) / CHUNK)


# -- metadata -------------------------------------------------------------------


@pytest.mark.parametrize("name", METADATA_ATTRIBUTES)
async def test_metadata_before_a_load_raises_file_not_loaded_saying_load(asyncassets_db, name):
    marmot = FilesAnimal()
    await marmot.photo.put(DATA, content_type="image/png")
    loaded = await unloaded(await marmot.save())
    assert loaded.photo.file_id == marmot.photo.file_id  # no load needed
    assert not loaded.photo.loaded
    with pytest.raises(FileNotLoaded, match=r"await doc\.<field>\.load\(\)"):
        getattr(loaded.photo, name)


async def _load_by_read(proxy):
    await proxy.read()


async def _load_by_read_n(proxy):
    await proxy.read(1)


async def _load_by_stream(proxy):
    [p async for p in proxy.stream(0, 1)]


async def _load_by_async_for(proxy):
    [p async for p in proxy]


async def _load_by_load(proxy):
    await proxy.load()


@pytest.mark.parametrize(
    "load",
    [_load_by_read, _load_by_read_n, _load_by_stream, _load_by_async_for, _load_by_load],
)
async def test_metadata_attributes_are_plain_after_a_load(asyncassets_db, load):
    marmot = FilesAnimal()
    await marmot.photo.put(DATA, content_type="image/png", filename="m.png", author="Ada")
    loaded = await fresh(await marmot.save())
    await load(loaded.photo)
    photo = loaded.photo
    assert photo.loaded
    assert photo.metadata == {"content_type": "image/png", "author": "Ada"}
    assert photo.content_type == "image/png"
    assert photo.filename == "m.png"
    assert photo.length == len(DATA)
    assert photo.chunk_size == CHUNK
    assert photo.sha256 == hashlib.sha256(DATA).hexdigest()
    assert isinstance(photo.upload_date, dt.datetime)
    assert photo.file_id == marmot.photo.file_id


async def test_metadata_is_loaded_by_put_close_and_replace(asyncassets_db):
    marmot = FilesAnimal()
    await marmot.photo.put(b"abc", content_type="text/plain", filename="a.txt")
    assert (marmot.photo.length, marmot.photo.content_type) == (3, "text/plain")
    await marmot.save()

    other = FilesAnimal()
    async with other.photo.new_file(content_type="text/csv", filename="b.csv", rows=2):
        other.photo.write(b"a,b\n1,2\n")
    assert other.photo.metadata == {"content_type": "text/csv", "rows": 2}
    assert other.photo.filename == "b.csv"
    assert other.photo.length == 8

    loaded = await fresh(marmot)
    await loaded.photo.replace(b"abcdef", content_type="text/x-new", filename="c.txt", v=2)
    assert loaded.photo.length == 6
    assert loaded.photo.metadata == {"content_type": "text/x-new", "v": 2}
    assert loaded.photo.filename == "c.txt"


async def test_metadata_of_an_empty_field_is_empty_without_a_load(asyncassets_db):
    empty = await fresh(await FilesAnimal().save())
    assert empty.photo.loaded
    assert empty.photo.metadata == {}
    assert empty.photo.content_type is None
    assert empty.photo.length is None
    assert empty.photo.file_id is None


async def test_metadata_returns_a_copy_the_caller_may_change(asyncassets_db):
    marmot = FilesAnimal()
    await marmot.photo.put(b"x", content_type="text/plain", tag="a")
    marmot.photo.metadata["tag"] = "changed"
    assert marmot.photo.metadata["tag"] == "a"


async def test_upload_date_has_the_same_kind_after_put_and_after_load(asyncassets_db):
    marmot = FilesAnimal()
    await marmot.photo.put(b"x")
    await marmot.save()
    after_put = marmot.photo.upload_date
    loaded = await fresh(marmot)
    await loaded.photo.load()
    after_load = loaded.photo.upload_date
    # Both describe the same instant; a user must be able to compare them.
    assert after_put.tzinfo == after_load.tzinfo
    assert after_put == after_load


def test_bool_eq_and_repr_need_no_io():
    file_id = ObjectId()
    a, b = FilesNowhere(photo=file_id), FilesNowhere(photo=file_id)
    assert a.photo and not FilesNowhere().photo
    assert a.photo == b.photo
    assert a.photo != FilesNowhere(photo=ObjectId()).photo
    assert str(file_id) in repr(a.photo) and str(file_id) in str(a.photo)
    assert "fs" in repr(a.photo)


def test_eq_compares_file_id_bucket_and_alias():
    file_id = ObjectId()
    base = FileProxy(file_id)
    assert base == FileProxy(file_id)
    assert base != FileProxy(file_id, collection_name="other")
    assert base != FileProxy(file_id, db_alias="elsewhere")
    assert base != FileProxy(ObjectId())


# -- streaming writes -------------------------------------------------------------


async def test_new_file_awaited_then_write_writelines_close(asyncassets_db):
    marmot = FilesAnimal()
    proxy = await marmot.photo.new_file(content_type="text/plain", filename="notes.txt")
    assert proxy is marmot.photo
    await marmot.photo.write(b"one ")
    marmot.photo.write(b"two ")  # not awaited: buffered, flushed by the next call
    await marmot.photo.writelines([b"three ", b"four"])
    assert await marmot.photo.close() is marmot.photo
    await marmot.save()
    loaded = await fresh(marmot)
    assert await loaded.photo.read() == b"one two three four"
    assert loaded.photo.content_type == "text/plain"
    assert loaded.photo.filename == "notes.txt"


@pytest.mark.parametrize("awaited", [True, False], ids=["awaited-writes", "unawaited-writes"])
async def test_new_file_as_async_context_manager(asyncassets_db, awaited):
    marmot = FilesAnimal()
    async with marmot.photo.new_file(content_type="text/plain") as proxy:
        assert proxy is marmot.photo
        for piece in pieces_of(DATA, 50):
            if awaited:
                await marmot.photo.write(piece)
            else:
                marmot.photo.write(piece)
    assert marmot.photo.length == len(DATA)
    await marmot.save()
    await assert_stored_exactly(asyncassets_db, marmot.photo, DATA)
    assert await (await fresh(marmot)).photo.read() == DATA


async def test_new_file_on_a_saved_document_is_referenced_at_close(asyncassets_db):
    marmot = await FilesAnimal().save()
    async with marmot.photo.new_file():
        marmot.photo.write(b"streamed")
    assert (await stored(marmot))["photo"] == marmot.photo.file_id
    assert await (await fresh(marmot)).photo.read() == b"streamed"


async def test_new_file_with_encoding_accepts_str(asyncassets_db):
    marmot = FilesAnimal()
    async with marmot.photo.new_file(encoding="utf-8"):
        marmot.photo.write("héllo ")
        await marmot.photo.write("wörld")
    assert await marmot.photo.read() == "héllo wörld".encode()


async def test_write_str_without_encoding_raises_type_error_and_aborts(asyncassets_db):
    marmot = FilesAnimal()
    with pytest.raises(TypeError, match="encoding"):
        async with marmot.photo.new_file():
            await marmot.photo.write(b"x" * (CHUNK * 3))
            marmot.photo.write("text")
    assert not marmot.photo
    assert await bucket_state(asyncassets_db) == (0, 0)


@pytest.mark.parametrize("value", [5, None, 1.5, ["bytes"]], ids=repr)
async def test_write_of_a_non_bytes_value_raises_type_error(asyncassets_db, value):
    marmot = FilesAnimal()
    await marmot.photo.new_file()
    with pytest.raises(TypeError, match="bytes"):
        marmot.photo.write(value)
    await marmot.photo.abort()
    assert await bucket_state(asyncassets_db) == (0, 0)


async def test_abort_removes_every_chunk_written(asyncassets_db):
    marmot = FilesAnimal()
    await marmot.photo.new_file()
    await marmot.photo.write(DATA)
    await marmot.photo.abort()
    assert not marmot.photo
    assert await bucket_state(asyncassets_db) == (0, 0)
    with pytest.raises(UploadClosed):
        marmot.photo.write(b"more")


async def test_write_without_an_open_upload_raises_upload_closed(asyncassets_db):
    marmot = FilesAnimal()
    with pytest.raises(UploadClosed, match="new_file"):
        marmot.photo.write(b"x")
    async with marmot.photo.new_file():
        marmot.photo.write(b"x")
    with pytest.raises(UploadClosed):
        await marmot.photo.write(b"after the block")
    with pytest.raises(UploadClosed):
        await marmot.photo.close()


async def test_new_file_on_a_proxy_holding_a_file_streams_a_replacement(asyncassets_db):
    # DESIGN.md's sketch calls new_file() on a field that already holds a file.
    marmot = FilesAnimal()
    await marmot.photo.put(b"old")
    await marmot.save()
    old_id = marmot.photo.file_id
    with pytest.raises(FileAlreadyExists):
        marmot.photo.new_file(replace=False)
    assert await (await fresh(marmot)).photo.read() == b"old"
    async with marmot.photo.new_file(content_type="text/plain"):
        marmot.photo.write(b"new")
    assert marmot.photo.file_id != old_id
    assert (await stored(marmot))["photo"] == marmot.photo.file_id
    assert await (await fresh(marmot)).photo.read() == b"new"
    assert await asyncassets_db["fs.files"].count_documents({"_id": old_id}) == 0
    assert await asyncassets_db["fs.chunks"].count_documents({"files_id": old_id}) == 0


async def test_save_with_an_upload_still_open_is_refused(asyncassets_db):
    marmot = FilesAnimal()
    await marmot.photo.new_file()
    marmot.photo.write(b"x")
    with pytest.raises(ValidationError, match="close"):
        await marmot.save()
    with pytest.raises(GridFSError, match="already open"):
        marmot.photo.new_file()
    await marmot.photo.close()
    await marmot.save()
    assert await (await fresh(marmot)).photo.read() == b"x"


# -- replace and delete -------------------------------------------------------------


async def test_replace_on_a_saved_document_switches_at_once_and_drops_the_old_file(
    asyncassets_db,
):
    marmot = FilesAnimal()
    await marmot.photo.put(DATA, content_type="image/png", author="Ada")
    await marmot.save()
    old_id = marmot.photo.file_id
    assert await marmot.photo.read() == DATA

    await marmot.photo.replace(io.BytesIO(b"new bytes"), content_type="text/plain")
    assert await marmot.photo.read() == b"new bytes"  # never the stale file
    assert marmot.photo.metadata == {"content_type": "text/plain"}  # metadata replaced
    assert (await stored(marmot))["photo"] == marmot.photo.file_id != old_id
    assert await bucket_state(asyncassets_db) == (1, 1)
    loaded = await fresh(marmot)
    assert await loaded.photo.read() == b"new bytes"
    assert loaded.photo.metadata == {"content_type": "text/plain"}


async def test_replace_on_an_empty_field_acts_like_put(asyncassets_db):
    marmot = await FilesAnimal().save()
    await marmot.photo.replace(b"first")
    assert await (await fresh(marmot)).photo.read() == b"first"


async def test_replace_on_a_new_document_takes_effect_at_save(asyncassets_db):
    marmot = FilesAnimal()
    await marmot.photo.put(b"one")
    await marmot.photo.replace(b"two")
    assert await bucket_state(asyncassets_db) == (1, 1)
    await marmot.save()
    assert await (await fresh(marmot)).photo.read() == b"two"


async def test_delete_on_a_saved_document_removes_reference_and_file(asyncassets_db):
    marmot = FilesAnimal(genus="Marmota")
    await marmot.photo.put(DATA)
    await marmot.save()
    await marmot.photo.delete()
    assert not marmot.photo
    assert await marmot.photo.read() is None
    assert "photo" not in await stored(marmot)
    assert await bucket_state(asyncassets_db) == (0, 0)
    loaded = await fresh(marmot)
    assert not loaded.photo and loaded.genus == "Marmota"


async def test_delete_on_a_new_document_removes_the_file(asyncassets_db):
    marmot = FilesAnimal()
    await marmot.photo.put(DATA)
    await marmot.photo.delete()
    assert not marmot.photo
    assert await bucket_state(asyncassets_db) == (0, 0)
    await marmot.save()
    assert not (await fresh(marmot)).photo


async def test_delete_of_an_empty_field_does_nothing(asyncassets_db):
    marmot = await FilesAnimal(genus="x").save()
    await marmot.photo.delete()
    assert await stored(marmot) == {"_id": marmot.pk, "genus": "x"}


async def test_put_after_delete_works(asyncassets_db):
    marmot = FilesAnimal()
    await marmot.photo.put(b"one")
    await marmot.save()
    await marmot.photo.delete()
    await marmot.photo.put(b"two")
    assert await (await fresh(marmot)).photo.read() == b"two"
    assert await bucket_state(asyncassets_db) == (1, 1)


# -- embedded documents and lists -----------------------------------------------------


async def test_file_in_an_embedded_document_of_a_new_document(asyncassets_db):
    album = FilesAlbum(title="t", cover=FilesPicture(caption="c"))
    await album.cover.image.put(DATA, content_type="image/png")
    await album.save()
    assert (await stored(album))["cover"]["image"] == album.cover.image.file_id
    loaded = await fresh(album)
    assert await loaded.cover.image.read() == DATA
    assert loaded.cover.image.content_type == "image/png"


async def test_file_in_an_embedded_document_of_a_saved_document(asyncassets_db):
    album = await FilesAlbum(title="t", cover=FilesPicture(caption="c")).save()
    await album.cover.image.put(b"one")
    assert (await stored(album))["cover"]["image"] == album.cover.image.file_id
    loaded = await fresh(album)
    await loaded.cover.image.replace(b"two")
    assert await (await fresh(album)).cover.image.read() == b"two"
    await loaded.cover.image.delete()
    assert "image" not in (await stored(album))["cover"]
    assert await bucket_state(asyncassets_db) == (0, 0)


async def test_files_in_a_list_of_embedded_documents_new_document(asyncassets_db):
    album = FilesAlbum(pictures=[FilesPicture(caption="a"), FilesPicture(caption="b")])
    await album.pictures[0].image.put(b"A")
    await album.pictures[1].image.put(b"B")
    await album.save()
    loaded = await fresh(album)
    assert [await p.image.read() for p in loaded.pictures] == [b"A", b"B"]


async def test_replace_and_delete_in_a_list_of_embedded_documents(asyncassets_db):
    album = FilesAlbum(pictures=[FilesPicture(caption="a"), FilesPicture(caption="b")])
    await album.pictures[0].image.put(b"A")
    await album.pictures[1].image.put(b"B")
    await album.save()
    loaded = await fresh(album)
    await loaded.pictures[1].image.replace(b"B2")
    raw = await stored(album)
    assert raw["pictures"][1]["image"] == loaded.pictures[1].image.file_id
    assert raw["pictures"][0]["image"] == album.pictures[0].image.file_id
    await loaded.pictures[0].image.delete()
    again = await fresh(album)
    assert [p.caption for p in again.pictures] == ["a", "b"]
    assert not again.pictures[0].image
    assert await again.pictures[1].image.read() == b"B2"
    assert await bucket_state(asyncassets_db) == (1, 1)


async def test_put_into_the_second_empty_element_of_a_saved_list_of_embedded_documents(
    asyncassets_db,
):
    album = await FilesAlbum(pictures=[FilesPicture(caption="a"), FilesPicture(caption="b")]).save()
    await album.pictures[1].image.put(b"B")
    raw = await stored(album)
    assert raw["pictures"][1].get("image") == album.pictures[1].image.file_id
    assert raw["pictures"][0].get("image") is None
    loaded = await fresh(album)
    assert await loaded.pictures[1].image.read() == b"B"
    assert not loaded.pictures[0].image


async def test_add_file_to_a_list_of_files_of_a_new_document(asyncassets_db):
    album = FilesAlbum(title="t")
    first = await album.add_file("attachments", b"one", content_type="text/plain")
    await album.add_file("attachments", io.BytesIO(b"two"), filename="2.txt")
    assert isinstance(first, FileProxy) and album.attachments[0] is first
    assert first.content_type == "text/plain"
    await album.save()
    loaded = await fresh(album)
    assert [await f.read() for f in loaded.attachments] == [b"one", b"two"]
    assert loaded.attachments[1].filename == "2.txt"


async def test_add_file_to_a_saved_document_pushes_at_once(asyncassets_db):
    album = await FilesAlbum(title="t").save()
    proxy = await album.add_file("attachments", b"one")
    await album.add_file("attachments", b"two")
    assert (await stored(album))["attachments"] == [f.file_id for f in album.attachments]
    assert proxy.file_id == album.attachments[0].file_id
    loaded = await fresh(album)
    assert [await f.read() for f in loaded.attachments] == [b"one", b"two"]


async def test_deleting_a_list_element_pulls_it_and_deletes_its_file(asyncassets_db):
    album = await FilesAlbum(title="t").save()
    for data in (b"one", b"two", b"three"):
        await album.add_file("attachments", data)
    loaded = await fresh(album)
    gone = loaded.attachments[1].file_id
    await loaded.attachments[1].delete()
    assert len(loaded.attachments) == 2
    raw = await stored(album)
    assert gone not in raw["attachments"] and len(raw["attachments"]) == 2
    assert await asyncassets_db["fs.files"].count_documents({"_id": gone}) == 0
    assert await asyncassets_db["fs.chunks"].count_documents({"files_id": gone}) == 0
    again = await fresh(album)
    assert [await f.read() for f in again.attachments] == [b"one", b"three"]


async def test_replacing_a_list_element_keeps_its_position(asyncassets_db):
    album = await FilesAlbum(title="t").save()
    for data in (b"one", b"two", b"three"):
        await album.add_file("attachments", data)
    loaded = await fresh(album)
    await loaded.attachments[1].replace(b"TWO")
    again = await fresh(album)
    assert [await f.read() for f in again.attachments] == [b"one", b"TWO", b"three"]
    assert await bucket_state(asyncassets_db) == (3, 3)


async def test_add_file_to_a_field_that_is_not_a_list_of_files_raises(asyncassets_db):
    album = FilesAlbum()
    with pytest.raises(ValueError, match="ListField"):
        await album.add_file("title", b"x")
    with pytest.raises(ValueError, match="ListField"):
        await album.add_file("pictures", b"x")
    assert await bucket_state(asyncassets_db) == (0, 0)


# -- several buckets and aliases -----------------------------------------------------


async def test_fields_on_different_buckets_and_aliases(asyncassets_db, asyncassets_connect):
    archive_db = asyncassets_connect(ARCHIVE_ALIAS)
    doc = FilesMulti()
    await doc.main.put(b"main")
    await doc.thumb.put(b"thumb")
    await doc.archived.put(b"archived")
    await doc.save()

    assert await bucket_state(asyncassets_db, "fs") == (1, 1)
    assert await bucket_state(asyncassets_db, "thumbs") == (1, 1)
    assert await bucket_state(asyncassets_db, "archive") == (0, 0)
    assert await bucket_state(archive_db, "archive") == (1, 1)
    assert doc.archived.db_alias == ARCHIVE_ALIAS
    assert doc.thumb.collection_name == "thumbs"

    loaded = await fresh(doc)
    assert [await loaded.main.read(), await loaded.thumb.read(), await loaded.archived.read()] == [
        b"main",
        b"thumb",
        b"archived",
    ]
    await loaded.archived.replace(b"archived 2")
    assert await (await fresh(doc)).archived.read() == b"archived 2"
    assert await bucket_state(archive_db, "archive") == (1, 1)

    await loaded.delete()
    for db, bucket in ((asyncassets_db, "fs"), (asyncassets_db, "thumbs"), (archive_db, "archive")):
        assert await bucket_state(db, bucket) == (0, 0), bucket


async def test_same_file_id_in_another_bucket_is_a_different_file(asyncassets_db):
    doc = FilesMulti()
    await doc.main.put(b"x")
    other = FilesMulti(thumb=doc.main.file_id)
    assert other.thumb != doc.main


# -- errors from the bucket -----------------------------------------------------------


async def test_missing_file_raises_file_not_found_naming_id_and_bucket(asyncassets_db):
    marmot = FilesAnimal()
    await marmot.photo.put(DATA)
    await marmot.save()
    file_id = marmot.photo.file_id
    await asyncassets_db["fs.files"].delete_one({"_id": file_id})
    loaded = await fresh(marmot)
    with pytest.raises(FileNotFound) as info:
        await loaded.photo.read()
    assert info.value.file_id == file_id and info.value.bucket == "fs"
    assert str(file_id) in str(info.value) and "'fs'" in str(info.value)
    with pytest.raises(FileNotFound):
        loaded.photo.length  # noqa: B018
    with pytest.raises(FileNotFound):
        await loaded.photo.load()
    with pytest.raises(FileNotFound):
        [p async for p in loaded.photo]
    assert isinstance(info.value, LookupError)


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        pytest.param({"$unset": {"data": ""}}, "binary", id="chunk-without-data"),
        pytest.param({"$set": {"data": b"short"}}, "short", id="short-chunk"),
        pytest.param({"$set": {"n": 99}}, "missing", id="missing-chunk"),
    ],
)
async def test_corrupt_chunks_raise_corrupt_file(asyncassets_db, damage, problem):
    marmot = FilesAnimal()
    await marmot.photo.put(DATA)
    await marmot.save()
    await asyncassets_db["fs.chunks"].update_one({"files_id": marmot.photo.file_id, "n": 3}, damage)
    loaded = await fresh(marmot)
    with pytest.raises(CorruptFile, match=problem):
        await loaded.photo.read()
    with pytest.raises(CorruptFile):
        [p async for p in loaded.photo]


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param(b"extra", id="longer-than-the-last-chunk"),
        pytest.param(b"xtra", id="as-long-as-the-last-chunk"),
    ],
)
async def test_an_extra_chunk_raises_corrupt_file(asyncassets_db, extra):
    marmot = FilesAnimal()
    await marmot.photo.put(DATA)  # 516 bytes: the last chunk holds 4
    await marmot.save()
    n = math.ceil(len(DATA) / CHUNK)
    await asyncassets_db["fs.chunks"].insert_one(
        {"files_id": marmot.photo.file_id, "n": n, "data": extra}
    )
    loaded = await fresh(marmot)
    with pytest.raises(CorruptFile, match=f"n={n}"):
        data = await loaded.photo.read()
        assert data == DATA  # never more bytes than the file has


# -- bad input ---------------------------------------------------------------------


def _closed_file(tmp_path):
    f = io.BytesIO(b"data")
    f.close()
    return f


def _text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("some text")
    return open(path)  # closed by the test


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        pytest.param(lambda p: None, TypeError, "None", id="None"),
        pytest.param(lambda p: 42, TypeError, "int", id="int"),
        pytest.param(lambda p: "text", TypeError, "encode", id="str"),
        pytest.param(lambda p: {"a": b"x"}, TypeError, "dict", id="dict"),
        pytest.param(lambda p: [b"ok", 3], TypeError, "int", id="list-with-an-int"),
        pytest.param(_closed_file, ValueError, "closed", id="closed-file"),
        pytest.param(_text_file, TypeError, "binary mode", id="text-mode-file"),
    ],
)
@pytest.mark.parametrize("saved", [False, True], ids=["new-doc", "saved-doc"])
async def test_bad_input_to_put_raises_a_clear_error_and_leaves_nothing(
    asyncassets_db, tmp_path, make, error, message, saved
):
    marmot = FilesAnimal(genus="g")
    if saved:
        await marmot.save()
    source = make(tmp_path)
    try:
        with pytest.raises(error, match=message):
            await marmot.photo.put(source)
    finally:
        if hasattr(source, "close"):
            source.close()
    assert not marmot.photo
    assert await bucket_state(asyncassets_db) == (0, 0)
    if saved:
        assert "photo" not in await stored(marmot)


async def test_bad_input_to_replace_keeps_the_old_file(asyncassets_db):
    marmot = FilesAnimal()
    await marmot.photo.put(b"old")
    await marmot.save()
    with pytest.raises(TypeError):
        await marmot.photo.replace("not bytes")
    assert await (await fresh(marmot)).photo.read() == b"old"
    assert await bucket_state(asyncassets_db) == (1, 1)


@pytest.mark.parametrize("value", [3.5, object(), True], ids=["float", "object", "bool"])
def test_assigning_something_that_is_neither_data_nor_a_file_reference_raises(value):
    marmot = FilesAnimal()
    with pytest.raises(TypeError, match="data to upload on save"):
        marmot.photo = value


def test_assigning_a_file_id_gives_a_proxy():
    file_id = ObjectId()
    marmot = FilesAnimal(photo=file_id)
    assert isinstance(marmot.photo, FileProxy) and marmot.photo.file_id == file_id
    marmot.photo = str(file_id)
    assert marmot.photo.file_id == file_id
    marmot.photo = None
    assert not marmot.photo


def test_field_options_are_checked():
    with pytest.raises(ValueError, match="collection_name"):
        FileField(collection_name="")
    with pytest.raises(ValueError, match="chunk_size"):
        FileField(chunk_size=0)


# -- load_files: one query per bucket ---------------------------------------------------

LISTEN_ALIAS = "files_listen"


class FilesListed(Document):
    name = StringField()
    photo = FileField()
    thumb = FileField(collection_name="thumbs")
    meta = {"db_alias": LISTEN_ALIAS}


class FindCounter(monitoring.CommandListener):
    def __init__(self) -> None:
        self.finds: list[str] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name == "find":
            self.finds.append(event.command["find"])

    def succeeded(self, event) -> None:
        pass

    def failed(self, event) -> None:
        pass


@pytest.fixture
async def listened(asyncassets_server_uri):
    counter = FindCounter()
    client = AsyncMongoClient(asyncassets_server_uri, event_listeners=[counter])
    name = unique_db_name("files_listen")
    asyncassets.connect(client=client, alias=LISTEN_ALIAS, db=name)
    try:
        yield counter
    finally:
        await asyncassets.disconnect(LISTEN_ALIAS)
        await client.drop_database(name)
        await client.close()


async def test_load_files_loads_a_result_set_in_one_query_per_bucket(listened):
    for i in range(7):
        doc = FilesListed(name=f"n{i}")
        await doc.photo.put(b"p" * i, content_type="image/png")
        if i % 2:
            await doc.thumb.put(b"t" * i)
        await doc.save()
    await FilesListed(name="no files").save()

    listened.finds.clear()
    docs = await FilesListed.objects.order_by("name").load_files("photo", "thumb").to_list()
    assert sorted(listened.finds) == ["files_listed", "fs.files", "thumbs.files"]
    with_files = [d for d in docs if d.name != "no files"]
    assert [d.photo.length for d in with_files] == list(range(7))
    assert all(d.photo.content_type == "image/png" for d in with_files)
    assert [d.thumb.length if d.thumb else None for d in with_files] == [
        None, 1, None, 3, None, 5, None,
    ]  # fmt: skip
    assert len(listened.finds) == 3  # reading the attributes did no I/O

    listened.finds.clear()
    names = []
    async for doc in FilesListed.objects(name__ne="no files").load_files("photo"):
        names.append((doc.name, doc.photo.length))
    assert sorted(listened.finds) == ["files_listed", "fs.files"]
    assert len(names) == 7

    listened.finds.clear()
    first = await FilesListed.objects(name="n3").load_files().first()
    assert (first.photo.length, first.thumb.length) == (3, 3)
    assert sorted(listened.finds) == ["files_listed", "fs.files", "thumbs.files"]


async def test_no_files_leaves_the_metadata_to_a_load(listened):
    doc = FilesListed(name="a")
    await doc.photo.put(b"abc")
    await doc.save()
    loaded = await FilesListed.objects.no_files().first()
    with pytest.raises(FileNotLoaded):
        loaded.photo.length  # noqa: B018
    assert (await loaded.photo.load()).length == 3


async def test_load_files_marks_missing_files_as_not_found(listened):
    doc = FilesListed(name="a")
    await doc.photo.put(b"abc")
    await doc.save()
    await asyncassets.get_db(LISTEN_ALIAS)["fs.files"].delete_many({})
    loaded = await FilesListed.objects.load_files("photo").first()
    with pytest.raises(FileNotFound):
        loaded.photo.length  # noqa: B018


def test_load_files_refuses_fields_that_are_not_files():
    with pytest.raises(ValueError, match="name"):
        FilesListed.objects.load_files("name")


async def test_load_files_covers_lists_of_files(asyncassets_db):
    album = FilesAlbum()
    await album.add_file("attachments", b"one")
    await album.add_file("attachments", b"three")
    await album.save()
    loaded = await FilesAlbum.objects.load_files("attachments").first()
    assert [f.length for f in loaded.attachments] == [3, 5]
