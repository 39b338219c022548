"""Files written by others, read by asyncassets: existing data keeps working.

Sync mongoengine (and mongomotor 0.17) write GridFS files with their extra
keywords at the top level of the files document and the MIME type as
``contentType``; PyMongo's ``GridFSBucket`` (and mongomotor <= 0.16) put them in
the ``metadata`` sub-document. Each layout is written here with the real sync
library, against the database of the test, and read back by an asyncassets
``Document`` mapped to the same collection.
"""

from __future__ import annotations

import io

import gridfs
import mongoengine
import pymongo
import pytest

from asyncassets import Document
from asyncassets.fields import FileField, ListField, StringField

# Class names are prefixed "Legacy" so they never clash in mongoengine's global
# document registry with the classes of the other test modules.

ME_ALIAS = "legacy_sync"
BIG = bytes(range(256)) * 1200  # 307200 bytes: two chunks of GridFS's default 255 KiB


class LegacySyncAnimal(mongoengine.Document):
    """The document as a sync mongoengine application declared it."""

    name = mongoengine.StringField()
    # mongoengine's FileField has its own db_alias for its bucket ("default" else).
    photo = mongoengine.FileField(db_alias=ME_ALIAS)
    scan = mongoengine.FileField(db_alias=ME_ALIAS, collection_name="scans")
    meta = {"db_alias": ME_ALIAS, "collection": "animals"}


class LegacyAnimal(Document):
    """The same collection, declared with asyncassets."""

    name = StringField()
    photo = FileField()
    scan = FileField(collection_name="scans")
    meta = {"collection": "animals"}


class LegacyBucketDoc(Document):
    name = StringField()
    photo = FileField(collection_name="bucketfs")
    files = ListField(FileField(collection_name="bucketfs"))
    meta = {"collection": "bucket_docs"}


@pytest.fixture
def sync_db(asyncassets_db, asyncassets_server_uri):
    """A sync mongoengine connection to the test's own database; disconnected after."""
    mongoengine.connect(
        host=asyncassets_server_uri + asyncassets_db.name,
        alias=ME_ALIAS,
        uuidRepresentation="standard",
    )
    try:
        yield mongoengine.get_db(ME_ALIAS)
    finally:
        mongoengine.disconnect(ME_ALIAS)


# -- mongoengine: extra fields at the top level, contentType ----------------------------


def write_with_mongoengine(**put_kwargs) -> LegacySyncAnimal:
    animal = LegacySyncAnimal(name="legacy")
    animal.photo.put(
        BIG, content_type="image/png", filename="marmot.png", extra="kept", **put_kwargs
    )
    animal.save()
    return animal


async def test_mongoengine_file_reads_back_bytes_and_metadata(sync_db):
    written = write_with_mongoengine()
    files_doc = sync_db["fs.files"].find_one({"_id": written.photo.grid_id})
    # What mongoengine really wrote: the layout this test is about.
    assert files_doc["contentType"] == "image/png"
    assert files_doc["extra"] == "kept"
    assert "metadata" not in files_doc

    animal = await LegacyAnimal.objects(name="legacy").first()
    assert animal.photo.file_id == written.photo.grid_id
    assert await animal.photo.read() == BIG
    assert animal.photo.content_type == "image/png"
    assert animal.photo.metadata == {"content_type": "image/png", "extra": "kept"}
    assert animal.photo.filename == "marmot.png"
    assert animal.photo.length == len(BIG)
    assert animal.photo.chunk_size == 255 * 1024
    assert animal.photo.sha256 is None  # written without asyncassets' checksum
    assert animal.photo.upload_date is not None


async def test_mongoengine_file_streams_and_reads_ranges(sync_db):
    write_with_mongoengine()
    animal = await LegacyAnimal.objects.first()
    pieces = [p async for p in animal.photo]
    assert b"".join(pieces) == BIG and len(pieces) == 2
    tail = b"".join([p async for p in animal.photo.stream(start=len(BIG) - 10)])
    assert tail == BIG[-10:]
    animal.photo.seek(300_000)
    assert await animal.photo.read(5) == BIG[300_000:300_005]


async def test_mongoengine_spec_fields_of_old_drivers_are_not_metadata(sync_db):
    # PyMongo 3 wrote an md5 and some tools "aliases": spec keys, not user metadata.
    write_with_mongoengine(md5="d41d8cd98f00b204e9800998ecf8427e", aliases=["m"])
    animal = await LegacyAnimal.objects.first()
    await animal.photo.load()
    assert animal.photo.metadata == {"content_type": "image/png", "extra": "kept"}


async def test_mongoengine_file_in_another_bucket_and_listing(sync_db):
    animal = LegacySyncAnimal(name="scanned")
    animal.scan.put(b"scan bytes", content_type="application/pdf", page=3)
    animal.save()
    loaded = (await LegacyAnimal.objects.load_files("scan", "photo").to_list())[0]
    assert not loaded.photo
    assert loaded.scan.metadata == {"content_type": "application/pdf", "page": 3}
    assert loaded.scan.length == len(b"scan bytes")
    assert await loaded.scan.read() == b"scan bytes"


async def test_mongoengine_streamed_file_reads_back(sync_db):
    animal = LegacySyncAnimal(name="streamed")
    animal.photo.new_file(content_type="text/plain", filename="log.txt")
    animal.photo.write(b"line 1\n")
    animal.photo.write(b"line 2\n")
    animal.photo.close()
    animal.save()
    loaded = await LegacyAnimal.objects(name="streamed").first()
    assert await loaded.photo.read() == b"line 1\nline 2\n"
    assert loaded.photo.content_type == "text/plain"
    assert loaded.photo.filename == "log.txt"


async def test_asyncassets_replace_of_a_mongoengine_file_is_read_by_mongoengine(sync_db):
    written = write_with_mongoengine()
    animal = await LegacyAnimal.objects.first()
    await animal.photo.replace(b"new bytes", content_type="image/jpeg")
    assert sync_db["fs.files"].count_documents({"_id": written.photo.grid_id}) == 0
    again = LegacySyncAnimal.objects.get(pk=written.pk)
    assert again.photo.read() == b"new bytes"


async def test_asyncassets_cascade_deletes_a_mongoengine_file(sync_db):
    write_with_mongoengine()
    animal = await LegacyAnimal.objects.first()
    await animal.delete()
    assert sync_db["fs.files"].count_documents({}) == 0
    assert sync_db["fs.chunks"].count_documents({}) == 0


# -- PyMongo's GridFSBucket: a metadata sub-document -----------------------------------


def upload_with_bucket(db, data: bytes, metadata: dict, filename: str = "f.bin"):
    bucket = gridfs.GridFSBucket(db, bucket_name="bucketfs")
    return bucket.upload_from_stream(filename, io.BytesIO(data), metadata=metadata)


async def test_gridfs_bucket_file_reads_back_bytes_and_metadata(sync_db):
    file_id = upload_with_bucket(
        sync_db, BIG, {"content_type": "image/png", "author": "Ada", "tags": ["a", "b"]}
    )
    sync_db["bucket_docs"].insert_one({"name": "bucket", "photo": file_id})

    doc = await LegacyBucketDoc.objects(name="bucket").first()
    assert await doc.photo.read() == BIG
    assert doc.photo.content_type == "image/png"
    assert doc.photo.metadata == {"content_type": "image/png", "author": "Ada", "tags": ["a", "b"]}
    assert doc.photo.filename == "f.bin"
    assert doc.photo.length == len(BIG)


async def test_gridfs_bucket_file_with_contenttype_in_metadata(sync_db):
    # mongomotor <= 0.16 stored the MIME type as metadata.contentType.
    file_id = upload_with_bucket(sync_db, b"old motor", {"contentType": "text/plain", "x": 1})
    sync_db["bucket_docs"].insert_one({"name": "motor", "photo": file_id})
    doc = await LegacyBucketDoc.objects(name="motor").first()
    await doc.photo.load()
    assert doc.photo.content_type == "text/plain"
    assert doc.photo.metadata == {"content_type": "text/plain", "x": 1}
    assert await doc.photo.read() == b"old motor"


async def test_gridfs_bucket_files_without_metadata_and_empty(sync_db):
    bucket = gridfs.GridFSBucket(sync_db, bucket_name="bucketfs")
    plain = bucket.upload_from_stream("plain.bin", io.BytesIO(b"plain"))
    empty = bucket.upload_from_stream("empty.bin", io.BytesIO(b""))
    sync_db["bucket_docs"].insert_one({"name": "list", "files": [plain, empty]})
    doc = await LegacyBucketDoc.objects.load_files("files").first()
    assert [f.length for f in doc.files] == [5, 0]
    assert [f.metadata for f in doc.files] == [{}, {}]
    assert [f.content_type for f in doc.files] == [None, None]
    assert [await f.read() for f in doc.files] == [b"plain", b""]


async def test_asyncassets_files_are_read_by_the_gridfs_bucket(sync_db):
    doc = LegacyBucketDoc(name="new")
    await doc.photo.put(BIG, content_type="image/png", filename="a.png")
    await doc.save()
    bucket = gridfs.GridFSBucket(sync_db, bucket_name="bucketfs")
    assert bucket.open_download_stream(doc.photo.file_id).read() == BIG
    grid_out = bucket.open_download_stream_by_name("a.png")
    assert grid_out.metadata["content_type"] == "image/png"


async def test_legacy_connection_is_a_plain_sync_client(sync_db):
    assert isinstance(sync_db.client, pymongo.MongoClient)
