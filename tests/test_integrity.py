"""Checksums, verify(), read/stream(verify=True), legacy files and gzip compression."""

from __future__ import annotations

import datetime as dt
import gzip
import hashlib
import io

import pytest
from bson import ObjectId
from gridfs.asynchronous import AsyncGridFSBucket

from asyncassets import Document, IntegrityError
from asyncassets.errors import ChecksumMissing
from asyncassets.fields import FileField, StringField

# Class names are prefixed "Int" so they never clash in mongoengine's registry.

CHUNK = 64
DATA = b"".join(b"line %05d of a marmot census\n" % i for i in range(200))  # 6000 bytes


class IntRecord(Document):
    name = StringField()
    raw = FileField(chunk_size=CHUNK)
    packed = FileField(chunk_size=CHUNK, compress="gzip", collection_name="packed")
    meta = {"collection": "int_records"}


async def corrupt_chunk(db, bucket: str, file_id, n: int = 1) -> None:
    """Flip one byte of chunk ``n`` behind the library's back (same size)."""
    chunk = await db[f"{bucket}.chunks"].find_one({"files_id": file_id, "n": n})
    data = bytearray(chunk["data"])
    data[0] ^= 0xFF
    await db[f"{bucket}.chunks"].update_one({"_id": chunk["_id"]}, {"$set": {"data": bytes(data)}})


async def saved(db) -> IntRecord:
    doc = IntRecord(name="census")
    await doc.raw.put(DATA, filename="census.txt")
    await doc.save()
    return doc


# -- checksums --------------------------------------------------------------------


async def test_every_upload_records_the_sha256_of_its_bytes(asyncassets_db):
    doc = await saved(asyncassets_db)
    assert doc.raw.sha256 == hashlib.sha256(DATA).hexdigest()
    loaded = await IntRecord.objects.get(pk=doc.pk)
    await loaded.raw.load()
    assert loaded.raw.sha256 == hashlib.sha256(DATA).hexdigest()
    other = IntRecord()
    async with other.raw.new_file():
        for i in range(0, len(DATA), 100):
            other.raw.write(DATA[i : i + 100])
    assert other.raw.sha256 == hashlib.sha256(DATA).hexdigest()


async def test_verify_returns_true_for_intact_files(asyncassets_db):
    doc = await saved(asyncassets_db)
    assert await doc.raw.verify() is True
    assert await IntRecord().raw.verify() is None  # empty field


async def test_verify_catches_a_corrupted_chunk_and_names_the_file(asyncassets_db):
    doc = await saved(asyncassets_db)
    await corrupt_chunk(asyncassets_db, "fs", doc.raw.file_id)
    with pytest.raises(IntegrityError) as info:
        await doc.raw.verify()
    assert str(doc.raw.file_id) in str(info.value)
    assert "census.txt" in str(info.value)
    assert info.value.file_id == doc.raw.file_id


async def test_verify_catches_a_missing_chunk(asyncassets_db):
    doc = await saved(asyncassets_db)
    await asyncassets_db["fs.chunks"].delete_one({"files_id": doc.raw.file_id, "n": 3})
    with pytest.raises(IntegrityError, match="missing"):
        await doc.raw.verify()


async def test_read_with_verify_raises_on_mismatch(asyncassets_db):
    doc = await saved(asyncassets_db)
    assert await doc.raw.read(verify=True) == DATA
    await corrupt_chunk(asyncassets_db, "fs", doc.raw.file_id, n=50)
    assert await doc.raw.read() != DATA  # without verify the change goes unseen
    with pytest.raises(IntegrityError):
        await doc.raw.read(verify=True)
    doc.raw.seek(0)
    with pytest.raises(IntegrityError):
        await doc.raw.read(10, verify=True)  # the digest covers the whole file


async def test_stream_with_verify_yields_everything_then_raises(asyncassets_db):
    doc = await saved(asyncassets_db)
    await corrupt_chunk(asyncassets_db, "fs", doc.raw.file_id, n=len(DATA) // CHUNK)
    received = []
    with pytest.raises(IntegrityError):
        async for piece in doc.raw.stream(verify=True):
            received.append(piece)
    assert len(b"".join(received)) == len(DATA)
    # A range is checked too, and only the range is yielded.
    received = []
    with pytest.raises(IntegrityError):
        async for piece in doc.raw.stream(start=10, end=20, verify=True):
            received.append(piece)
    assert b"".join(received) == DATA[10:20]


async def test_stream_with_verify_passes_intact_files(asyncassets_db):
    doc = await saved(asyncassets_db)
    assert b"".join([p async for p in doc.raw.stream(verify=True)]) == DATA
    assert b"".join([p async for p in doc.raw.stream(100, 300, verify=True)]) == DATA[100:300]


# -- legacy files -------------------------------------------------------------


async def insert_legacy(db, data: bytes, **extra) -> ObjectId:
    file_id = ObjectId()
    await db["fs.chunks"].insert_one({"files_id": file_id, "n": 0, "data": data})
    await db["fs.files"].insert_one(
        {
            "_id": file_id,
            "length": len(data),
            "chunkSize": 255 * 1024,
            "uploadDate": dt.datetime.now(dt.timezone.utc),
            "filename": "old.bin",
            **extra,
        }
    )
    return file_id


async def test_legacy_file_without_checksum_reads_but_verify_says_nothing_to_check(
    asyncassets_db,
):
    file_id = await insert_legacy(asyncassets_db, b"legacy bytes")
    doc = IntRecord(raw=file_id)
    await doc.save()
    loaded = await IntRecord.objects.get(pk=doc.pk)
    assert await loaded.raw.read() == b"legacy bytes"
    assert loaded.raw.sha256 is None
    with pytest.raises(ChecksumMissing, match="nothing to verify"):
        await loaded.raw.verify()
    with pytest.raises(ChecksumMissing):
        await loaded.raw.read(verify=True)
    assert not issubclass(ChecksumMissing, IntegrityError)


async def test_legacy_file_with_md5_is_verified_against_it(asyncassets_db):
    data = b"mongoengine wrote me"
    file_id = await insert_legacy(asyncassets_db, data, md5=hashlib.md5(data).hexdigest())
    doc = IntRecord(raw=file_id)
    assert await doc.raw.verify() is True
    await asyncassets_db["fs.chunks"].update_one(
        {"files_id": file_id}, {"$set": {"data": b"mongoengine wrote mE"}}
    )
    with pytest.raises(IntegrityError, match="md5"):
        await doc.raw.verify()


# -- compression ----------------------------------------------------------------


async def test_compressed_put_round_trips_and_reports_the_original(asyncassets_db):
    doc = IntRecord()
    await doc.packed.put(DATA, filename="census.txt")
    await doc.save()
    loaded = await IntRecord.objects.get(pk=doc.pk)
    assert await loaded.packed.read() == DATA
    assert loaded.packed.length == len(DATA)
    assert loaded.packed.sha256 == hashlib.sha256(DATA).hexdigest()
    assert "compression" not in loaded.packed.metadata
    files = await asyncassets_db["packed.files"].find_one({"_id": doc.packed.file_id})
    assert files["metadata"]["compression"]["codec"] == "gzip"
    assert files["length"] < len(DATA) // 3  # it really is smaller
    assert await loaded.packed.verify() is True


async def test_compressed_files_stay_valid_gridfs_for_other_drivers(asyncassets_db):
    doc = IntRecord()
    await doc.packed.put(io.BytesIO(DATA))
    out = io.BytesIO()
    await AsyncGridFSBucket(asyncassets_db, "packed").download_to_stream(doc.packed.file_id, out)
    assert gzip.decompress(out.getvalue()) == DATA


async def test_compressed_streamed_write_round_trips(asyncassets_db):
    doc = IntRecord()
    async with doc.packed.new_file(encoding="utf-8"):
        for line in DATA.decode().splitlines(keepends=True):
            doc.packed.write(line)
    assert doc.packed.length == len(DATA)
    assert await doc.packed.read() == DATA
    assert await doc.packed.read(verify=True) == DATA


async def test_compressed_ranged_reads_stream_and_readchunk(asyncassets_db):
    doc = IntRecord()
    await doc.packed.put(DATA)
    assert b"".join([p async for p in doc.packed.stream(1000, 1234)]) == DATA[1000:1234]
    assert b"".join([p async for p in doc.packed]) == DATA
    doc.packed.seek(100)
    assert await doc.packed.read(50) == DATA[100:150]
    assert await doc.packed.readchunk() == DATA[150:192]  # to the end of chunk 2
    doc.packed.seek(0, 2)
    assert doc.packed.tell() == len(DATA)


async def test_compressed_empty_file(asyncassets_db):
    doc = IntRecord()
    await doc.packed.put(b"")
    assert await doc.packed.read() == b""
    assert doc.packed.length == 0
    assert await doc.packed.verify() is True


async def test_already_compressed_types_are_stored_as_they_are(asyncassets_db):
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
    doc = IntRecord()
    await doc.packed.put(png)
    files = await asyncassets_db["packed.files"].find_one({"_id": doc.packed.file_id})
    assert "compression" not in files["metadata"]
    assert files["length"] == len(png)
    assert await doc.packed.read() == png


async def test_corrupted_compressed_file_is_caught(asyncassets_db):
    doc = IntRecord()
    await doc.packed.put(DATA)
    await corrupt_chunk(asyncassets_db, "packed", doc.packed.file_id, n=2)
    with pytest.raises(IntegrityError):
        await doc.packed.verify()
    with pytest.raises(IntegrityError):
        await doc.packed.read(verify=True)


async def test_compression_respects_max_size_on_original_bytes(asyncassets_db):
    class IntLimited(Document):
        f = FileField(compress="gzip", max_size=1000)
        meta = {"collection": "int_limited"}

    from asyncassets import FileValidationError

    doc = IntLimited()
    with pytest.raises(FileValidationError):
        await doc.f.put(b"\x00" * 5000)  # compresses to almost nothing, still refused
    assert await asyncassets_db["fs.files"].count_documents({}) == 0
