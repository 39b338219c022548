"""The FileField behaviours, run on every storage: GridFS, a directory, an S3 bucket.

Every test takes the ``storage`` fixture, parametrised over the three storages:
GridFS in the test's database, a fresh directory (``tmp_path``) and a fresh
bucket on the S3 test server (moto, a real HTTP server on loopback, started by
the plugin). What a test asserts about storage is read from the storage itself:
the catalogue's entries, and the chunks (GridFS) or the stored objects
(directory, bucket) — see :func:`leftovers`.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import itertools
import os
from typing import Any

import pytest

from asyncassets import Document, EmbeddedDocument
from asyncassets.errors import (
    FileValidationError,
    IntegrityError,
    StorageError,
    UploadClosed,
)
from asyncassets.fields import (
    EmbeddedDocumentField,
    FileField,
    ListField,
    StringField,
)
from asyncassets.storage import FileSystemStorage, GridFSStorage, S3Storage, Storage

KIB = 1024
MIB = 1024 * KIB
_names = itertools.count()


@pytest.fixture(params=["gridfs", "filesystem", "s3"])
def storage_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def make_storage(kind: str, request: pytest.FixtureRequest, tmp_path: Any, **kw: Any) -> Storage:
    name = f"st{next(_names)}"
    if kind == "gridfs":
        return GridFSStorage(name, **kw)
    if kind == "filesystem":
        return FileSystemStorage(tmp_path / name, collection_name=name, **kw)
    bucket = request.getfixturevalue("asyncassets_s3_bucket")
    return S3Storage(
        bucket.name,
        prefix=f"{name}/",
        endpoint_url=bucket.endpoint_url,
        region=bucket.region,
        access_key_id=bucket.access_key_id,
        secret_access_key=bucket.secret_access_key,
        collection_name=name,
        part_size=5 * MIB,
        **kw,
    )


@pytest.fixture
def storage(storage_kind: str, request: pytest.FixtureRequest, tmp_path: Any) -> Storage:
    return make_storage(storage_kind, request, tmp_path)


def doc_class(storage: Storage, **field_kwargs: Any) -> Any:
    """A Document class of its own (own collection) whose fields use ``storage``."""
    n = next(_names)
    picture = type(
        f"StoragePicture{n}",
        (EmbeddedDocument,),
        {"image": FileField(storage=storage)},
    )
    return type(
        f"StorageDoc{n}",
        (Document,),
        {
            "name": StringField(),
            "file": FileField(storage=storage, **field_kwargs),
            "files": ListField(FileField(storage=storage)),
            "picture": EmbeddedDocumentField(picture),
            "meta": {"collection": f"storage_docs_{n}"},
        },
    )


async def objects(storage: Storage, db: Any) -> list[str]:
    """What holds bytes: GridFS chunk ids, or the stored objects' keys."""
    if isinstance(storage, GridFSStorage):
        chunks = db[f"{storage.collection_name}.chunks"].find({}, {"files_id": 1, "n": 1})
        return [f"{c['files_id']}/{c['n']}" async for c in chunks]
    assert not isinstance(storage, GridFSStorage)
    return sorted([info.key async for info in storage.blobs().list()])  # type: ignore[attr-defined]


async def leftovers(storage: Storage, db: Any) -> tuple[int, int]:
    """(catalogue entries, chunks or stored objects)."""
    entries = await db[f"{storage.collection_name}.files"].count_documents({})
    return entries, len(await objects(storage, db))


async def stored_entry(storage: Storage, db: Any, file_id: Any) -> dict[str, Any]:
    doc = await db[f"{storage.collection_name}.files"].find_one({"_id": file_id})
    assert doc is not None, f"no catalogue entry for {file_id!r}"
    return dict(doc)


async def tamper(storage: Storage, db: Any, file_id: Any) -> None:
    """Flip the first stored byte of a file, behind the library's back."""
    if isinstance(storage, GridFSStorage):
        chunks = db[f"{storage.collection_name}.chunks"]
        chunk = await chunks.find_one({"files_id": file_id, "n": 0})
        data = bytes([chunk["data"][0] ^ 0xFF]) + bytes(chunk["data"][1:])
        await chunks.update_one({"_id": chunk["_id"]}, {"$set": {"data": data}})
        return
    entry = await stored_entry(storage, db, file_id)
    key = entry["location"]["key"]
    if isinstance(storage, FileSystemStorage):
        # Bit rot: the byte flips in place; the file keeps its time (its version).
        path = os.path.join(storage.root, *key.split("/"))
        before = os.stat(path)
        with open(path, "r+b") as f:  # noqa: ASYNC230  (bit rot, behind the library)
            first = f.read(1)
            f.seek(0)
            f.write(bytes([first[0] ^ 0xFF]))
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        return
    # An S3 object cannot change in place: another object replaces it (another ETag).
    blobs = storage.blobs()  # type: ignore[attr-defined]
    old = b"".join([p async for p in blobs.open_reader(key, 0, entry["length"])])
    writer = blobs.open_writer(key)
    await writer.write(bytes([old[0] ^ 0xFF]) + old[1:])
    await writer.commit(overwrite=True)


def payload(size: int, seed: int = 0) -> bytes:
    block = hashlib.sha256(f"{seed}".encode()).digest() * (4 * KIB // 32)
    return (block * (size // len(block) + 1))[:size]


async def slow_pieces(data: bytes, piece: int, delay: float = 0.0):  # type: ignore[no-untyped-def]
    for i in range(0, len(data), piece):
        await asyncio.sleep(delay)
        yield data[i : i + piece]


# -- bytes in, bytes out -----------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 255 * KIB + 1, MIB - 1, MIB + 1, 5 * MIB + 3])
async def test_put_and_read_back_byte_exact_at_every_boundary(asyncassets_db, storage, size):
    Doc = doc_class(storage)
    data = payload(size, seed=size)
    doc = await Doc(name="a").save()
    await doc.file.put(data, filename="a.bin", content_type="application/octet-stream")
    loaded = await Doc.objects.get(pk=doc.pk)
    assert await loaded.file.read() == data
    entry = await stored_entry(storage, asyncassets_db, loaded.file.grid_id)
    assert entry["length"] == size
    assert entry["metadata"]["sha256"] == hashlib.sha256(data).hexdigest()
    if not isinstance(storage, GridFSStorage):
        assert entry["location"]["storage"] == storage.kind
        assert await objects(storage, asyncassets_db) == [entry["location"]["key"]]


@pytest.mark.parametrize(
    "make_source",
    [
        lambda d: d,
        lambda d: io.BytesIO(d),
        lambda d: slow_pieces(d, 300 * KIB),
        lambda d: [d[: len(d) // 2], d[len(d) // 2 :]],
    ],
    ids=["bytes", "file", "async-iterable", "iterable"],
)
async def test_put_takes_every_source_kind(asyncassets_db, storage, make_source):
    Doc = doc_class(storage)
    data = payload(2 * MIB + 7)
    doc = await Doc().save()
    await doc.file.put(make_source(data), filename="x.bin")
    assert await (await Doc.objects.get(pk=doc.pk)).file.read() == data


async def test_metadata_is_kept_alongside_on_every_storage(asyncassets_db, storage):
    Doc = doc_class(storage)
    doc = await Doc().save()
    await doc.file.put(b"%PDF-1.4 hello", filename="report.pdf", content_type="application/pdf",
                       author="marmot")
    loaded = await Doc.objects.get(pk=doc.pk)
    await loaded.file.load()
    assert loaded.file.filename == "report.pdf"
    assert loaded.file.content_type == "application/pdf"
    assert loaded.file.length == 14
    assert loaded.file.author == "marmot"
    assert loaded.file.sha256 == hashlib.sha256(b"%PDF-1.4 hello").hexdigest()
    assert loaded.file.upload_date is not None
    assert loaded.file.metadata == {"content_type": "application/pdf", "author": "marmot"}


@pytest.mark.parametrize(
    ("start", "end"), [(0, 1), (5, 6), (MIB - 3, MIB + 3), (3 * MIB, None), (0, None), (7, 7)]
)
async def test_stream_reads_exactly_the_range(asyncassets_db, storage, start, end):
    Doc = doc_class(storage)
    data = payload(3 * MIB + 11)
    doc = await Doc().save()
    await doc.file.put(data)
    got = b"".join([p async for p in doc.file.stream(start, end)])
    assert got == data[start:end]


async def test_read_n_seek_tell_and_readchunk(asyncassets_db, storage):
    Doc = doc_class(storage)
    data = payload(600 * KIB)
    doc = await Doc().save()
    await doc.file.put(data)
    doc.file.seek(100)
    assert await doc.file.read(10) == data[100:110]
    assert doc.file.tell() == 110
    chunk = await doc.file.readchunk()
    assert chunk and data[110:].startswith(chunk)


async def test_stream_outside_the_file_is_a_value_error(asyncassets_db, storage):
    Doc = doc_class(storage)
    doc = await Doc().save()
    await doc.file.put(b"0123456789")
    with pytest.raises(ValueError, match="range"):
        [p async for p in doc.file.stream(5, 11)]


# -- streaming uploads ---------------------------------------------------------------


async def test_new_file_write_close_streams_into_the_storage(asyncassets_db, storage):
    Doc = doc_class(storage)
    doc = await Doc().save()
    data = payload(6 * MIB + 5)
    async with doc.file.new_file(filename="log.txt") as f:
        for i in range(0, len(data), 700 * KIB):
            await f.write(data[i : i + 700 * KIB])
    assert await (await Doc.objects.get(pk=doc.pk)).file.read() == data
    assert (await leftovers(storage, asyncassets_db))[0] == 1


async def test_abort_and_an_exception_in_async_with_leave_nothing(asyncassets_db, storage):
    Doc = doc_class(storage)
    doc = await Doc().save()
    f = await doc.file.new_file()
    await f.write(payload(2 * MIB))
    await doc.file.abort()
    with pytest.raises(RuntimeError, match="boom"):
        async with doc.file.new_file() as g:
            await g.write(payload(3 * MIB))
            raise RuntimeError("boom")
    assert await leftovers(storage, asyncassets_db) == (0, 0)
    assert (await Doc.objects.get(pk=doc.pk)).file.grid_id is None


async def test_a_cancelled_put_leaves_nothing(asyncassets_db, storage):
    Doc = doc_class(storage)
    doc = await Doc().save()
    started = asyncio.Event()

    async def source():  # type: ignore[no-untyped-def]
        for _ in range(50):
            yield payload(512 * KIB)
            started.set()
            await asyncio.sleep(0.01)

    task = asyncio.create_task(doc.file.put(source()))
    await started.wait()
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await leftovers(storage, asyncassets_db) == (0, 0)


async def test_write_after_close_is_refused(asyncassets_db, storage):
    Doc = doc_class(storage)
    doc = await Doc().save()
    async with doc.file.new_file() as f:
        await f.write(b"abc")
    with pytest.raises(UploadClosed):
        await f.write(b"more")


# -- replace, delete, cascade, lists, embedded -----------------------------------------


async def test_replace_switches_then_removes_the_old_bytes(asyncassets_db, storage):
    Doc = doc_class(storage)
    doc = await Doc().save()
    await doc.file.put(b"old bytes")
    old_id = doc.file.grid_id
    old_objects = await objects(storage, asyncassets_db)
    await doc.file.replace(b"new bytes, longer")
    loaded = await Doc.objects.get(pk=doc.pk)
    assert loaded.file.grid_id != old_id
    assert await loaded.file.read() == b"new bytes, longer"
    assert (await leftovers(storage, asyncassets_db))[0] == 1
    assert not set(old_objects) & set(await objects(storage, asyncassets_db))


async def test_delete_and_cascade_leave_nothing(asyncassets_db, storage):
    Doc = doc_class(storage)
    a = await Doc().save()
    await a.file.put(payload(KIB))
    await a.file.delete()
    assert (await Doc.objects.get(pk=a.pk)).file.grid_id is None
    b = await Doc().save()
    await b.file.put(payload(2 * MIB))
    await b.delete()
    assert await leftovers(storage, asyncassets_db) == (0, 0)


async def test_lists_and_embedded_documents_hold_files(asyncassets_db, storage):
    Doc = doc_class(storage)
    doc = Doc(picture=Doc.picture.document_type())
    await doc.save()
    await doc.add_file("files", b"first")
    await doc.add_file("files", b"second")
    await doc.picture.image.put(b"embedded")
    loaded = await Doc.objects.get(pk=doc.pk)
    assert [await f.read() for f in loaded.files] == [b"first", b"second"]
    assert await loaded.picture.image.read() == b"embedded"
    await loaded.files[0].delete()
    again = await Doc.objects.get(pk=doc.pk)
    assert [await f.read() for f in again.files] == [b"second"]
    await again.delete()
    assert await leftovers(storage, asyncassets_db) == (0, 0)


async def test_load_files_fetches_every_catalogue_entry(asyncassets_db, storage):
    Doc = doc_class(storage)
    for i in range(5):
        doc = await Doc(name=str(i)).save()
        await doc.file.put(f"file {i}".encode(), filename=f"{i}.txt")
    docs = await Doc.objects.order_by("name").load_files("file").to_list()
    assert [d.file.filename for d in docs] == [f"{i}.txt" for i in range(5)]
    assert [d.file.length for d in docs] == [6] * 5


# -- validation, compression, integrity ------------------------------------------------


async def test_max_size_refuses_while_streaming_and_leaves_nothing(asyncassets_db, storage):
    Doc = doc_class(storage, max_size=MIB)
    doc = await Doc().save()
    with pytest.raises(FileValidationError, match=r"max_size|larger|exceeds"):
        await doc.file.put(slow_pieces(payload(3 * MIB), 256 * KIB))
    with pytest.raises(FileValidationError):
        async with doc.file.new_file() as f:
            for _ in range(6):
                await f.write(payload(256 * KIB))
    assert await leftovers(storage, asyncassets_db) == (0, 0)


async def test_allowed_types_refuse_a_disguised_file(asyncassets_db, storage):
    Doc = doc_class(storage, allowed_content_types=["image/*"])
    doc = await Doc().save()
    with pytest.raises(FileValidationError):
        await doc.file.put(b"%PDF-1.4 not an image", filename="cat.png")
    assert await leftovers(storage, asyncassets_db) == (0, 0)


async def test_gzip_stores_compressed_and_reads_back_the_original(asyncassets_db, storage):
    Doc = doc_class(storage, compress="gzip")
    doc = await Doc().save()
    text = b"the marmot whistles\n" * 50_000
    await doc.file.put(text, filename="log.txt")
    entry = await stored_entry(storage, asyncassets_db, doc.file.grid_id)
    assert entry["length"] < len(text) // 10
    loaded = await Doc.objects.get(pk=doc.pk)
    assert await loaded.file.read() == text
    assert b"".join([p async for p in loaded.file.stream(1000, 2000)]) == text[1000:2000]
    assert await loaded.file.verify()


async def test_verify_catches_bytes_changed_behind_the_librarys_back(asyncassets_db, storage):
    Doc = doc_class(storage)
    doc = await Doc().save()
    await doc.file.put(payload(300 * KIB))
    assert await doc.file.verify()
    await tamper(storage, asyncassets_db, doc.file.grid_id)
    with pytest.raises(IntegrityError):
        await doc.file.verify()
    with pytest.raises(IntegrityError):
        await doc.file.read(verify=True)


# -- races ------------------------------------------------------------------------------


async def test_concurrent_replaces_end_with_one_file_and_nothing_leaked(asyncassets_db, storage):
    Doc = doc_class(storage)
    doc = await Doc().save()
    await doc.file.put(b"start")
    copies = [await Doc.objects.get(pk=doc.pk) for _ in range(6)]
    results = await asyncio.gather(
        *(c.file.replace(payload(200 * KIB, seed=i)) for i, c in enumerate(copies)),
        return_exceptions=True,
    )
    winners = [r for r in results if not isinstance(r, BaseException)]
    assert winners, results
    final = await Doc.objects.get(pk=doc.pk)
    data = await final.file.read()
    assert data in {payload(200 * KIB, seed=i) for i in range(6)}
    entries, _ = await leftovers(storage, asyncassets_db)
    assert entries == 1
    if not isinstance(storage, GridFSStorage):
        assert len(await objects(storage, asyncassets_db)) == 1


async def test_readers_during_replaces_see_one_whole_file_or_a_clear_error(
    asyncassets_db, storage
):
    from asyncassets.errors import FileNotFound

    Doc = doc_class(storage)
    doc = await Doc().save()
    versions = {payload(400 * KIB, seed=i) for i in range(5)}
    await doc.file.put(payload(400 * KIB, seed=0))

    async def reader() -> int:
        seen = 0
        for _ in range(8):
            fresh = await Doc.objects.get(pk=doc.pk)
            try:
                data = await fresh.file.read()
            except FileNotFound:
                continue  # deleted under the reader: it says so, never mixes files
            assert data in versions
            seen += 1
        return seen

    async def writer() -> None:
        for i in range(1, 5):
            await doc.file.replace(payload(400 * KIB, seed=i))

    results = await asyncio.gather(writer(), reader(), reader())
    assert sum(results[1:]) > 0
    assert await (await Doc.objects.get(pk=doc.pk)).file.read() == payload(400 * KIB, seed=4)
    assert (await leftovers(storage, asyncassets_db))[0] == 1


# -- keys (object storages) -------------------------------------------------------------


@pytest.mark.parametrize("storage_kind", ["filesystem", "s3"])
async def test_a_taken_key_gets_another_one_and_nothing_is_overwritten(
    asyncassets_db, storage_kind, request, tmp_path
):
    storage = make_storage(storage_kind, request, tmp_path, key_template="{field}/{filename}")
    Doc = doc_class(storage)
    a, b = await Doc().save(), await Doc().save()
    await a.file.put(b"first", filename="same.txt")
    await b.file.put(b"second", filename="same.txt")
    keys = [
        (await stored_entry(storage, asyncassets_db, d.file.grid_id))["location"]["key"]
        for d in (a, b)
    ]
    assert keys == ["file/same.txt", "file/same-2.txt"]
    assert await a.file.read() == b"first"
    assert await b.file.read() == b"second"


@pytest.mark.parametrize("storage_kind", ["filesystem", "s3"])
async def test_keys_never_come_from_the_users_filename_by_default(
    asyncassets_db, storage_kind, request, tmp_path
):
    storage = make_storage(storage_kind, request, tmp_path)
    Doc = doc_class(storage)
    doc = await Doc().save()
    await doc.file.put(b"x", filename="../../etc/passwd.JPG")
    key = (await stored_entry(storage, asyncassets_db, doc.file.grid_id))["location"]["key"]
    assert "passwd" not in key and ".." not in key
    assert key.endswith(".jpg")


@pytest.mark.parametrize("storage_kind", ["filesystem", "s3"])
async def test_a_callable_key_template_gets_the_document_and_filename(
    asyncassets_db, storage_kind, request, tmp_path
):
    def upload_to(document: Any, filename: str | None) -> str:
        return f"by-name/{document.name}/{filename}"

    storage = make_storage(storage_kind, request, tmp_path, key_template=upload_to)
    Doc = doc_class(storage)
    doc = await Doc(name="marmot").save()
    await doc.file.put(b"x", filename="photo.jpg")
    key = (await stored_entry(storage, asyncassets_db, doc.file.grid_id))["location"]["key"]
    assert key == "by-name/marmot/photo.jpg"


def test_a_bad_key_template_fails_at_declaration(tmp_path):
    with pytest.raises(ValueError, match=r"uses \[.nope.\]"):
        FileSystemStorage(tmp_path, key_template="{nope}/{uuid}")
    with pytest.raises(ValueError, match="safe relative key"):
        FileSystemStorage(tmp_path, key_template="../{uuid}")
    with pytest.raises(ValueError, match="disagrees"):
        FileField(collection_name="a", storage=FileSystemStorage(tmp_path, collection_name="b"))


# -- faults -------------------------------------------------------------------------------


async def test_a_directory_that_cannot_be_made_is_a_clear_error_and_nothing_is_stored(
    asyncassets_db, tmp_path
):
    blocker = tmp_path / "not-a-dir"
    blocker.write_bytes(b"a regular file where the root should be")
    storage = FileSystemStorage(blocker / "media")
    Doc = doc_class(storage)
    doc = await Doc().save()
    with pytest.raises(StorageError) as info:
        await doc.file.put(b"data", filename="a.txt")
    assert str(blocker) in str(info.value)
    assert await asyncassets_db[f"{storage.collection_name}.files"].count_documents({}) == 0
    assert (await Doc.objects.get(pk=doc.pk)).file.grid_id is None
    assert os.listdir(tmp_path) == ["not-a-dir"]


async def test_a_missing_bucket_is_a_clear_error_and_nothing_is_stored(asyncassets_db, request):
    bucket = request.getfixturevalue("asyncassets_s3_bucket")
    storage = S3Storage(
        "no-such-bucket-here",
        endpoint_url=bucket.endpoint_url,
        region=bucket.region,
        access_key_id=bucket.access_key_id,
        secret_access_key=bucket.secret_access_key,
    )
    Doc = doc_class(storage)
    doc = await Doc().save()
    with pytest.raises(StorageError, match="no-such-bucket-here"):
        await doc.file.put(b"data")
    assert await asyncassets_db[f"{storage.collection_name}.files"].count_documents({}) == 0


# -- migrating between storages (the recipe in docs/storage.rst) --------------------------


async def test_the_documented_migration_moves_every_file_and_leaves_nothing(
    asyncassets_db, tmp_path
):
    target = FileSystemStorage(tmp_path / "posters", collection_name=f"mig{next(_names)}")
    Movie = type(
        f"MigrationMovie{next(_names)}",
        (Document,),
        {
            "title": StringField(),
            "poster": FileField(),
            "poster_new": FileField(storage=target),
            "meta": {"collection": f"migration_movies_{next(_names)}"},
        },
    )
    datas = {}
    for i in range(4):
        movie = await Movie(title=str(i)).save()
        datas[movie.pk] = payload(300 * KIB, seed=i)
        await movie.poster.put(datas[movie.pk], filename=f"{i}.jpg", content_type="image/jpeg")

    async for movie in Movie.objects(poster__ne=None, poster_new=None):
        await movie.poster.load()
        await movie.poster_new.put(
            movie.poster.stream(),
            filename=movie.poster.filename,
            content_type=movie.poster.content_type,
        )
        await movie.poster_new.verify()
        await movie.poster.delete()

    async for movie in Movie.objects:
        assert movie.poster.grid_id is None
        assert await movie.poster_new.read() == datas[movie.pk]
        await movie.poster_new.load()
        assert movie.poster_new.content_type == "image/jpeg"
    assert await asyncassets_db["fs.files"].count_documents({}) == 0
    assert await asyncassets_db["fs.chunks"].count_documents({}) == 0
    assert len(await objects(target, asyncassets_db)) == 4


# -- faults at the field level: the S3 server killed, a directory refused ------------------


async def test_s3_killed_mid_put_stores_nothing_and_references_nothing(
    asyncassets_db, asyncassets_s3_server
):
    from asyncassets._s3server import FAKE_CREDENTIALS, REGION, create_bucket, unique_bucket_name
    from asyncassets.storage import Retry

    name = unique_bucket_name("killed-put")
    create_bucket(name, asyncassets_s3_server.endpoint_url, region=REGION, **FAKE_CREDENTIALS)
    storage = S3Storage(
        name,
        endpoint_url=asyncassets_s3_server.endpoint_url,
        region=REGION,
        collection_name=f"killed{next(_names)}",
        part_size=5 * MIB,
        retry=Retry(attempts=2, delay=0.01, jitter=False),
        **FAKE_CREDENTIALS,
    )
    Doc = doc_class(storage)
    doc = await Doc().save()
    sent = asyncio.Event()

    async def source():  # type: ignore[no-untyped-def]
        for i in range(6):
            yield payload(2 * MIB, seed=i)
            if i == 3:
                sent.set()  # a part has gone out: the multipart upload exists
                await asyncio.sleep(0.2)

    put = asyncio.create_task(doc.file.put(source()))
    await sent.wait()
    asyncassets_s3_server.kill()
    try:
        with pytest.raises(StorageError) as caught:
            await put
        assert "s3://" in str(caught.value)
    finally:
        asyncassets_s3_server.start()
    assert await asyncassets_db[f"{storage.collection_name}.files"].count_documents({}) == 0
    assert (await Doc.objects.get(pk=doc.pk)).file.grid_id is None


async def test_a_read_whose_server_dies_is_a_storage_error_not_short_bytes(
    asyncassets_db, asyncassets_s3_server
):
    from asyncassets._s3server import FAKE_CREDENTIALS, REGION, create_bucket, unique_bucket_name
    from asyncassets.storage import Retry

    name = unique_bucket_name("killed-read")
    create_bucket(name, asyncassets_s3_server.endpoint_url, region=REGION, **FAKE_CREDENTIALS)
    storage = S3Storage(
        name,
        endpoint_url=asyncassets_s3_server.endpoint_url,
        region=REGION,
        collection_name=f"killedread{next(_names)}",
        retry=Retry(attempts=2, delay=0.01, jitter=False),
        **FAKE_CREDENTIALS,
    )
    Doc = doc_class(storage)
    doc = await Doc().save()
    data = payload(6 * MIB)
    await doc.file.put(data)
    got = []
    try:
        with pytest.raises(StorageError):
            async for piece in doc.file.stream():
                got.append(piece)
                if len(got) == 1:
                    asyncassets_s3_server.kill()
    finally:
        asyncassets_s3_server.start()
    assert data.startswith(b"".join(got))  # what was returned is the file's, in order
    assert len(b"".join(got)) < len(data)


async def test_image_fields_keep_image_and_thumbnail_on_every_storage(asyncassets_db, storage):
    pil = pytest.importorskip("PIL.Image")
    from asyncassets.fields import ImageField

    buf = io.BytesIO()
    pil.new("RGB", (300, 200), color=(200, 120, 40)).save(buf, format="PNG")
    Photo = type(
        f"StoragePhoto{next(_names)}",
        (Document,),
        {
            "photo": ImageField(storage=storage, size=(100, 100, False), thumbnail_size=(20, 20)),
            "meta": {"collection": f"storage_photos_{next(_names)}"},
        },
    )
    doc = await Photo().save()
    await doc.photo.put(buf.getvalue(), filename="marmot.png")
    loaded = await Photo.objects.get(pk=doc.pk)
    assert pil.open(io.BytesIO(await loaded.photo.read())).size == (100, 67)
    thumb = await loaded.photo.thumbnail.read()
    assert pil.open(io.BytesIO(thumb)).size[0] <= 20
    assert (await leftovers(storage, asyncassets_db))[0] == 2  # the image and its thumbnail
    await loaded.delete()
    assert await leftovers(storage, asyncassets_db) == (0, 0)
