"""The orphan sweep and the consistency check, against a real server."""

from __future__ import annotations

import datetime as dt
import gc
import gzip
import hashlib
import io
import os
import tracemalloc

import pytest
from bson import ObjectId
from mongoengine.base.common import _document_registry

import asyncassets
from asyncassets import Document, EmbeddedDocument
from asyncassets.errors import ChecksumMissing, ConnectionNotRegistered, IntegrityError
from asyncassets.fields import (
    DictField,
    EmbeddedDocumentField,
    FileField,
    GenericEmbeddedDocumentField,
    ImageField,
    ListField,
    StringField,
)
from asyncassets.ops import (
    CheckReport,
    SweepReport,
    check,
    sweep_orphans,
)
from asyncassets.storage.gridfs import GridBucket
from asyncassets.storage.read import verify_file


class OpsAlbum(Document):
    title = StringField()
    cover = FileField()
    pages = ListField(FileField())
    meta = {"collection": "ops_albums"}


class OpsScan(EmbeddedDocument):
    image = FileField(collection_name="ops_shared")


class OpsArchive(Document):
    main = EmbeddedDocumentField(OpsScan)
    scans = ListField(EmbeddedDocumentField(OpsScan))
    by_key = DictField(FileField(collection_name="ops_shared"))
    anything = GenericEmbeddedDocumentField()
    meta = {"collection": "ops_archives"}


class OpsLetter(Document):
    attachment = FileField(collection_name="ops_shared", db_field="att")
    meta = {"collection": "ops_letters"}


class OpsRemote(Document):
    """Documents on another alias, files in a bucket of that alias."""

    blob = FileField(collection_name="ops_remote")
    meta = {"collection": "ops_remote_docs", "db_alias": "ops_other"}


DAYS_AGO = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=3)


def _old_object_id() -> ObjectId:
    """A unique ObjectId whose timestamp is three days ago."""
    fresh = ObjectId().binary
    stamp = int(DAYS_AGO.timestamp()).to_bytes(4, "big")
    return ObjectId(stamp + fresh[4:])


async def _upload(db, data: bytes = b"hello", bucket: str = "fs", old: bool = True, **kw):
    doc = await GridBucket(db, bucket, **kw).upload(data, filename="f.bin")
    if old:
        await db[f"{bucket}.files"].update_one(
            {"_id": doc["_id"]}, {"$set": {"uploadDate": DAYS_AGO}}
        )
    return doc["_id"]


async def _exists(db, file_id, bucket: str = "fs") -> bool:
    return await db[f"{bucket}.files"].count_documents({"_id": file_id}) == 1


async def _chunk_count(db, file_id, bucket: str = "fs") -> int:
    return await db[f"{bucket}.chunks"].count_documents({"files_id": file_id})


# -- sweep ------------------------------------------------------------------------


async def test_sweep_deletes_old_unreferenced_files_and_keeps_referenced_ones(asyncassets_db):
    db = asyncassets_db
    cover = await _upload(db, b"cover")
    page1, page2 = await _upload(db, b"p1"), await _upload(db, b"p2")
    orphan = await _upload(db, b"orphan-bytes")
    album = OpsAlbum(title="t", cover=cover)
    await album.save()
    await OpsAlbum._get_collection().update_one(
        {"_id": album.pk}, {"$set": {"pages": [page1, page2]}}
    )

    report = await sweep_orphans()

    assert isinstance(report, SweepReport)
    assert report.files_deleted == 1
    assert [f.file_id for f in report.deleted_files] == [orphan]
    assert report.bytes_freed == len(b"orphan-bytes")
    assert "default:fs" in report.buckets
    assert not await _exists(db, orphan) and await _chunk_count(db, orphan) == 0
    for kept in (cover, page1, page2):
        assert await _exists(db, kept) and await _chunk_count(db, kept) == 1
    text = str(report)
    assert "orphaned files deleted: 1" in text and str(orphan) in text


async def test_sweep_keeps_unreferenced_files_younger_than_the_grace_period(asyncassets_db):
    db = asyncassets_db
    fresh = await _upload(db, b"just uploaded", old=False)
    old = await _upload(db, b"old")

    report = await sweep_orphans(grace=dt.timedelta(days=1))
    assert report.files_deleted == 1 and report.recent_orphaned_files == 1
    assert await _exists(db, fresh) and not await _exists(db, old)
    assert "kept, younger than the grace period: 1 file(s)" in str(report)

    # Seconds work too; the two-day-old-upload rule applies to uploadDate.
    assert (await sweep_orphans(grace=3600)).files_deleted == 0
    assert (await sweep_orphans(grace=0)).files_deleted == 1
    assert not await _exists(db, fresh)


async def test_sweep_uses_the_object_id_time_of_a_file_without_upload_date(asyncassets_db):
    db = asyncassets_db
    undated_old, undated_new = _old_object_id(), ObjectId()
    for file_id in (undated_old, undated_new):
        await db["fs.files"].insert_one({"_id": file_id, "length": 0, "chunkSize": 255})
    report = await sweep_orphans()
    assert [f.file_id for f in report.deleted_files] == [undated_old]
    assert await _exists(db, undated_new)


async def test_sweep_dry_run_reports_without_deleting(asyncassets_db):
    db = asyncassets_db
    orphan = await _upload(db, b"12345")
    await db["fs.chunks"].insert_one({"_id": _old_object_id(), "files_id": ObjectId(),
                                      "n": 0, "data": b"abc"})
    report = await sweep_orphans(dry_run=True)
    assert report.dry_run and report.files_deleted == 1 and report.chunks_deleted == 1
    assert report.bytes_freed == 8
    assert await _exists(db, orphan)
    assert await db["fs.chunks"].count_documents({}) == 2
    assert "(dry run)" in str(report) and "to delete: 1" in str(report)


async def test_shared_bucket_files_are_never_swept_while_any_field_references_them(
    asyncassets_db,
):
    db = asyncassets_db
    ids = {name: await _upload(db, name.encode(), bucket="ops_shared")
           for name in ("main", "scan0", "scan1", "keyed", "generic", "letter", "orphan")}
    await OpsArchive._get_collection().insert_one({
        "main": {"image": ids["main"]},
        "scans": [{"image": ids["scan0"]}, {"image": None}, {"image": ids["scan1"]}],
        "by_key": {"front": ids["keyed"]},
        "anything": {"_cls": "OpsScan", "image": ids["generic"]},
    })
    await OpsLetter(attachment=ids["letter"]).save()

    report = await sweep_orphans(grace=0, buckets=["ops_shared"])

    assert report.buckets == ["default:ops_shared"]
    assert [f.file_id for f in report.deleted_files] == [ids["orphan"]]
    for name, file_id in ids.items():
        assert await _exists(db, file_id, "ops_shared") is (name != "orphan")


async def test_sweep_rereads_references_in_every_batch(asyncassets_db):
    db = asyncassets_db
    referenced = [await _upload(db, b"r%d" % i) for i in range(5)]
    orphans = [await _upload(db, b"o%d" % i) for i in range(5)]
    await OpsAlbum._get_collection().insert_one({"pages": referenced})
    report = await sweep_orphans(batch_size=3, max_ids=2)
    assert report.files_deleted == 5 and report.files_scanned == 10
    assert len(report.deleted_files) == 2 and report.truncated
    for file_id in referenced:
        assert await _exists(db, file_id)
    for file_id in orphans:
        assert not await _exists(db, file_id)


async def test_sweep_removes_old_orphaned_chunks_and_keeps_recent_ones(asyncassets_db):
    db = asyncassets_db
    kept_file = await _upload(db, b"whole file")
    await OpsAlbum(cover=kept_file).save()
    old_orphan, recent_orphan, string_id = ObjectId(), ObjectId(), "upload-by-name"
    await db["fs.chunks"].insert_many([
        {"_id": _old_object_id(), "files_id": old_orphan, "n": 0, "data": b"aaaa"},
        {"_id": _old_object_id(), "files_id": old_orphan, "n": 1, "data": b"bb"},
        # An upload in progress: first chunk old, newest chunk just written.
        {"_id": _old_object_id(), "files_id": recent_orphan, "n": 0, "data": b"c"},
        {"_id": ObjectId(), "files_id": recent_orphan, "n": 1, "data": b"c"},
        # files_id is no ObjectId: the chunk _id tells the time.
        {"_id": _old_object_id(), "files_id": string_id, "n": 0, "data": b"dd"},
    ])

    report = await sweep_orphans()

    assert report.chunks_deleted == 3 and report.recent_orphaned_chunks == 2
    assert report.bytes_freed == 8
    assert {c.files_id for c in report.deleted_chunks} == {old_orphan, string_id}
    assert await _chunk_count(db, old_orphan) == 0 and await _chunk_count(db, string_id) == 0
    assert await _chunk_count(db, recent_orphan) == 2
    assert await _chunk_count(db, kept_file) == 1


async def test_sweep_limits_itself_to_the_buckets_and_alias_asked_for(
    asyncassets_db, asyncassets_connect
):
    db = asyncassets_db
    other = asyncassets_connect("ops_other")
    in_fs = await _upload(db, b"a")
    in_shared = await _upload(db, b"b", bucket="ops_shared")
    remote_orphan = await _upload(other, b"c", bucket="ops_remote")
    remote_kept = await _upload(other, b"d", bucket="ops_remote")
    await OpsRemote(blob=remote_kept).save()

    report = await sweep_orphans(alias="ops_other")
    assert report.buckets == ["ops_other:ops_remote"]
    assert [f.file_id for f in report.deleted_files] == [remote_orphan]
    assert await _exists(other, remote_kept, "ops_remote")
    assert await _exists(db, in_fs) and await _exists(db, in_shared, "ops_shared")

    report = await sweep_orphans(buckets="fs")
    assert report.buckets == ["default:fs"]
    assert not await _exists(db, in_fs) and await _exists(db, in_shared, "ops_shared")

    # A bucket no class declares is swept only when named: all its files are orphans.
    loose = await _upload(db, b"loose", bucket="ops_loose")
    assert "default:ops_loose" not in (await sweep_orphans()).buckets
    assert await _exists(db, loose, "ops_loose")
    assert (await sweep_orphans(buckets=["ops_loose"])).files_deleted == 1


async def test_sweep_refuses_buckets_whose_references_it_cannot_read(asyncassets_db):
    class OpsStranded(Document):
        # Documents on an alias that is not connected, files in the default alias.
        blob = FileField(collection_name="ops_stranded", db_alias="default")
        meta = {"collection": "ops_stranded_docs", "db_alias": "ops_not_connected"}

    try:
        file_id = await _upload(asyncassets_db, b"x", bucket="ops_stranded")
        with pytest.raises(ConnectionNotRegistered, match=r"OpsStranded.*ops_not_connected"):
            await sweep_orphans(buckets=["ops_stranded"])
        with pytest.raises(ConnectionNotRegistered):
            await check(buckets=["ops_stranded"])
        assert await _exists(asyncassets_db, file_id, "ops_stranded")
    finally:
        _document_registry.pop("OpsStranded", None)
        del OpsStranded
        gc.collect()


async def test_sweep_rejects_bad_arguments(asyncassets_db):
    with pytest.raises(ValueError, match="negative"):
        await sweep_orphans(grace=-1)
    with pytest.raises(TypeError, match="grace"):
        await sweep_orphans(grace="1d")
    with pytest.raises(TypeError, match="bucket names"):
        await sweep_orphans(buckets=[3])
    with pytest.raises(ValueError, match="batch_size"):
        await sweep_orphans(batch_size=0)
    with pytest.raises(ConnectionNotRegistered, match="nowhere"):
        await sweep_orphans(alias="nowhere")


# -- check ------------------------------------------------------------------------


async def test_check_of_a_consistent_database_is_ok(asyncassets_db):
    db = asyncassets_db
    await OpsAlbum(cover=await _upload(db, b"c" * 1000, chunk_size=256)).save()
    report = await check(verify=True)
    assert isinstance(report, CheckReport)
    assert report.ok, str(report)
    assert report.files == 1 and report.references == 1 and report.verified == 1
    assert "OK" in str(report)


async def test_check_reports_dangling_references_with_class_id_and_path(asyncassets_db):
    db = asyncassets_db
    shared = GridBucket(db, "ops_shared")
    cover, page = await _upload(db, b"c"), await _upload(db, b"p")
    scan, keyed = await _upload(db, b"s", "ops_shared"), await _upload(db, b"k", "ops_shared")
    album = await OpsAlbum(cover=cover).save()
    await OpsAlbum._get_collection().update_one(
        {"_id": album.pk}, {"$set": {"pages": [ObjectId(), page]}}
    )
    result = await OpsArchive._get_collection().insert_one(
        {"scans": [{"image": ObjectId()}, {"image": scan}], "by_key": {"k": keyed}}
    )
    await GridBucket(db).delete(cover)
    await shared.delete(scan)
    await shared.delete(keyed)

    report = await check()

    found = {(d.document_class, d.document_id, d.field_path, d.bucket)
             for d in report.dangling_references}
    assert found == {
        ("OpsAlbum", album.pk, "cover", "fs"),
        ("OpsAlbum", album.pk, "pages.0", "fs"),
        ("OpsArchive", result.inserted_id, "scans.0.image", "ops_shared"),
        ("OpsArchive", result.inserted_id, "scans.1.image", "ops_shared"),
        ("OpsArchive", result.inserted_id, "by_key.k", "ops_shared"),
    }
    assert report.dangling == 5 and not report.ok
    assert "missing file" in str(report) and "scans.1.image" in str(report)


async def test_check_reports_orphaned_files_and_chunks(asyncassets_db):
    db = asyncassets_db
    orphan = await _upload(db, b"nobody wants me", old=False)
    lost = ObjectId()
    await db["fs.chunks"].insert_many([
        {"files_id": lost, "n": 0, "data": b"abc"}, {"files_id": lost, "n": 1, "data": b"de"},
    ])
    report = await check()
    assert [f.file_id for f in report.orphaned_file_ids] == [orphan]
    assert report.orphaned_files == 1
    assert report.orphaned_chunks == 2
    [group] = report.orphaned_chunk_groups
    assert (group.files_id, group.chunks, group.bytes) == (lost, 2, 5)
    assert not report.ok
    # Read-only: everything is still there.
    assert await _exists(db, orphan) and await _chunk_count(db, lost) == 2


async def test_check_reports_missing_short_oversized_and_extra_chunks(asyncassets_db):
    db = asyncassets_db
    chunks = db["fs.chunks"]
    files = {}
    for name in ("missing", "short", "oversized", "extra", "no_chunks", "fine"):
        files[name] = await _upload(db, b"x" * 700, chunk_size=256)  # 3 chunks: 256+256+188
        await OpsAlbum(cover=files[name]).save()
    await chunks.delete_one({"files_id": files["missing"], "n": 1})
    await chunks.update_one({"files_id": files["short"], "n": 0}, {"$set": {"data": b"x" * 10}})
    await chunks.update_one({"files_id": files["oversized"], "n": 2},
                            {"$set": {"data": b"x" * 200}})
    await chunks.insert_one({"files_id": files["extra"], "n": 3, "data": b"more"})
    await chunks.delete_many({"files_id": files["no_chunks"]})

    report = await check()

    problems = {p.file_id: p for p in report.chunk_problems}
    assert report.corrupt_files == 5 and files["fine"] not in problems
    assert problems[files["missing"]].kinds == ("missing",)
    assert "n=1" in problems[files["missing"]].detail
    assert problems[files["short"]].kinds == ("short",)
    assert problems[files["oversized"]].kinds == ("oversized",)
    assert problems[files["extra"]].kinds == ("extra",)
    assert problems[files["no_chunks"]].missing == 3
    assert report.dangling == 0 and report.orphaned_files == 0


async def test_check_verify_finds_checksum_mismatches_and_unverifiable_files(asyncassets_db):
    db = asyncassets_db
    good, bad, legacy = [await _upload(db, b"a" * 600, chunk_size=256) for _ in range(3)]
    for file_id in (good, bad, legacy):
        await OpsAlbum(cover=file_id).save()
    # Same size, different bytes: only the checksum can tell.
    await db["fs.chunks"].update_one({"files_id": bad, "n": 1}, {"$set": {"data": b"b" * 256}})
    await db["fs.files"].update_one({"_id": legacy}, {"$unset": {"metadata.sha256": ""}})

    assert (await check()).ok  # without verify, the bytes are not read

    report = await check(verify=True)
    assert [f.file_id for f in report.mismatched_files] == [bad]
    assert report.checksum_mismatches == 1
    assert report.verified == 2 and report.unverifiable == 1
    assert "1 mismatched, 1 unverifiable" in str(report)
    assert not report.ok



# -- check(verify=True) decides as verify_file does -----------------------------------


class OpsPacked(Document):
    blob = FileField(chunk_size=64, compress="gzip", collection_name="ops_packed")
    meta = {"collection": "ops_packed_docs"}


#: 6000 bytes that gzip compresses to many 64-byte chunks.
CENSUS = b"".join(b"line %05d of a marmot census\n" % i for i in range(200))


async def _insert_legacy(db, data: bytes, **extra) -> ObjectId:
    """A file as mongoengine or an old driver wrote it: no metadata.sha256, written
    straight into fs.files / fs.chunks."""
    file_id = ObjectId()
    await db["fs.chunks"].insert_one({"files_id": file_id, "n": 0, "data": data})
    await db["fs.files"].insert_one({
        "_id": file_id, "length": len(data), "chunkSize": 255 * 1024,
        "uploadDate": DAYS_AGO, "filename": "old.bin", **extra,
    })
    return file_id


async def _packed(data: bytes = CENSUS) -> OpsPacked:
    doc = OpsPacked()
    await doc.blob.put(data, filename="census.txt", content_type="text/plain")
    await doc.save()
    return doc


async def _flip_byte(db, bucket: str, file_id, n: int) -> None:
    """Change one byte of chunk ``n`` behind the library's back (same size)."""
    chunk = await db[f"{bucket}.chunks"].find_one({"files_id": file_id, "n": n})
    data = bytearray(chunk["data"])
    data[0] ^= 0xFF
    await db[f"{bucket}.chunks"].update_one({"_id": chunk["_id"]}, {"$set": {"data": bytes(data)}})


async def _restore_as(db, bucket: str, file_id, stored: bytes, chunk_size: int = 64) -> None:
    """Replace a file's stored bytes, with a consistent ``length`` and stored sha256."""
    await db[f"{bucket}.chunks"].delete_many({"files_id": file_id})
    await db[f"{bucket}.chunks"].insert_many([
        {"files_id": file_id, "n": n, "data": stored[start:start + chunk_size]}
        for n, start in enumerate(range(0, len(stored), chunk_size))
    ])
    await db[f"{bucket}.files"].update_one({"_id": file_id}, {"$set": {
        "length": len(stored), "metadata.sha256": hashlib.sha256(stored).hexdigest(),
    }})


async def test_check_verify_reports_a_legacy_md5_file_whose_bytes_changed_as_a_mismatch(
    asyncassets_db,
):
    db = asyncassets_db
    data = b"mongoengine wrote me"
    intact = await _insert_legacy(db, data, md5=hashlib.md5(data).hexdigest())
    changed = await _insert_legacy(db, data, md5=hashlib.md5(b"other bytes").hexdigest())
    albums = [await OpsAlbum(cover=file_id).save() for file_id in (intact, changed)]

    report = await check(verify=True, buckets=["fs"])

    assert [f.file_id for f in report.mismatched_files] == [changed]
    assert report.checksum_mismatches == 1 and not report.ok
    assert report.verified == 2 and report.unverifiable == 0
    # The proxy says the same.
    assert await albums[0].cover.verify() is True
    with pytest.raises(IntegrityError, match="md5"):
        await albums[1].cover.verify()


async def test_check_verify_reports_a_compressed_file_whose_chunks_changed_as_a_mismatch(
    asyncassets_db,
):
    db = asyncassets_db
    intact, changed = await _packed(), await _packed()
    await _flip_byte(db, "ops_packed", changed.blob.file_id, n=2)

    report = await check(verify=True, buckets=["ops_packed"])

    assert [f.file_id for f in report.mismatched_files] == [changed.blob.file_id]
    assert report.verified == 2 and report.corrupt_files == 0
    assert await intact.blob.verify() is True
    with pytest.raises(IntegrityError):
        await changed.blob.verify()


async def test_check_verify_inflates_a_compressed_file_and_checks_the_original(
    asyncassets_db,
):
    db = asyncassets_db
    doc = await _packed()
    # Other gzip data under a matching stored sha256: only inflating tells.
    await _restore_as(db, "ops_packed", doc.blob.file_id, gzip.compress(b"not a census" * 50))

    report = await check(verify=True, buckets=["ops_packed"])

    assert [f.file_id for f in report.mismatched_files] == [doc.blob.file_id]
    assert report.corrupt_files == 0
    with pytest.raises(IntegrityError):
        await doc.blob.verify()


async def test_check_verify_agrees_with_verify_file_on_every_kind_of_file(asyncassets_db):
    db = asyncassets_db
    data = b"x" * 700
    md5, sha = hashlib.md5(data).hexdigest(), hashlib.sha256(data).hexdigest()
    stored = {
        "fs": [
            await _upload(db, data, chunk_size=256),                # sha256, intact
            await _upload(db, data, chunk_size=256),                # sha256, changed
            await _insert_legacy(db, data, md5=md5),                # md5 only, intact
            await _insert_legacy(db, data, md5="0" * 32),           # md5 only, wrong
            await _insert_legacy(db, data),                         # no checksum at all
            await _insert_legacy(db, data, md5=md5, metadata={"sha256": "0" * 64}),
            await _insert_legacy(db, data, md5="0" * 32, metadata={"sha256": sha}),
        ],
        "ops_packed": [(await _packed(body)).blob.file_id for body in (
            CENSUS, CENSUS, CENSUS, CENSUS, CENSUS, b"", b"short", b"",
        )],
    }
    await _flip_byte(db, "fs", stored["fs"][1], n=1)
    packed = stored["ops_packed"]
    await _flip_byte(db, "ops_packed", packed[1], n=3)
    await _restore_as(db, "ops_packed", packed[2], gzip.compress(b"other"))
    # Only the original's sha256 left: checked by inflating, intact and changed.
    for file_id in packed[3:5]:
        await db["ops_packed.files"].update_one(
            {"_id": file_id}, {"$unset": {"metadata.sha256": ""}})
    await _flip_byte(db, "ops_packed", packed[4], n=1)
    # Nothing recorded at all on a compressed file (its md5 does not count).
    await db["ops_packed.files"].update_one({"_id": packed[6]}, {
        "$unset": {"metadata.sha256": "", "metadata.compression.sha256": ""},
        "$set": {"md5": "0" * 32},
    })
    # An empty original, but not even the gzip member that stores it.
    await db["ops_packed.chunks"].delete_many({"files_id": packed[7]})
    await db["ops_packed.files"].update_one(
        {"_id": packed[7]}, {"$set": {"length": 0}, "$unset": {"metadata.sha256": ""}})

    expected = {"verified": 0, "unverifiable": 0, "mismatched": set()}
    for name, ids in stored.items():
        bucket = GridBucket(db, name)
        for file_id in ids:
            try:
                await verify_file(bucket, await bucket.find(file_id))
            except ChecksumMissing:
                expected["unverifiable"] += 1
            except IntegrityError:
                expected["verified"] += 1
                expected["mismatched"].add(file_id)
            else:
                expected["verified"] += 1
    assert expected == {
        "verified": 13, "unverifiable": 2,
        "mismatched": {stored["fs"][i] for i in (1, 3, 5)} | {packed[i] for i in (1, 2, 4, 7)},
    }

    report = await check(verify=True, buckets=["fs", "ops_packed"])

    assert report.corrupt_files == 0, str(report)
    assert {f.file_id for f in report.mismatched_files} == expected["mismatched"]
    assert report.checksum_mismatches == len(expected["mismatched"])
    assert report.verified == expected["verified"]
    assert report.unverifiable == expected["unverifiable"]


async def test_check_covers_undeclared_buckets_without_calling_their_files_orphans(
    asyncassets_db,
):
    db = asyncassets_db
    loose = await _upload(db, b"x" * 300, bucket="ops_loose", chunk_size=256)
    await db["ops_loose.chunks"].delete_one({"files_id": loose, "n": 1})

    report = await check()
    assert "default:ops_loose" in report.unclaimed_buckets
    assert report.orphaned_files == 0
    assert [p.file_id for p in report.chunk_problems] == [loose]

    named = await check(buckets=["ops_loose"])
    assert named.unclaimed_buckets == [] and named.orphaned_files == 1


# -- scale ------------------------------------------------------------------------


async def _bulk_files(db, count: int, bucket: str = "fs") -> None:
    """Insert ``count`` old one-chunk files straight into a bucket: no uploads, fast.

    The indexes come afterwards (SecantusDB inserts faster without them).
    """
    old = DAYS_AGO.replace(microsecond=0)
    for first in range(0, count, 2000):
        ids = [ObjectId() for _ in range(min(2000, count - first))]
        await db[f"{bucket}.files"].insert_many(
            [{"_id": i, "length": 1, "chunkSize": 255 * 1024, "uploadDate": old,
              "metadata": {"sha256": "0" * 64}} for i in ids],
            ordered=False,
        )
        await db[f"{bucket}.chunks"].insert_many(
            [{"files_id": i, "n": 0, "data": b"x"} for i in ids], ordered=False
        )
    await GridBucket(db, bucket).ensure_indexes()


async def _peak(coro) -> tuple[int, object]:
    gc.collect()
    tracemalloc.start()
    try:
        result = await coro
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak, result


@pytest.mark.skipif(os.environ.get("ASYNCASSETS_SKIP_SCALE") == "1", reason="asked to skip")
async def test_sweep_and_check_memory_does_not_grow_with_10000_files(asyncassets_db):
    db = asyncassets_db
    await _bulk_files(db, 2000, "ops_small")
    await _bulk_files(db, 10_000, "fs")
    referenced = ObjectId()
    await db["fs.files"].insert_one({"_id": referenced, "length": 0, "chunkSize": 1,
                                     "uploadDate": DAYS_AGO})
    await OpsAlbum(cover=referenced).save()

    small_sweep, report = await _peak(sweep_orphans(dry_run=True, buckets=["ops_small"]))
    assert report.files_deleted == 2000
    big_sweep, report = await _peak(sweep_orphans(dry_run=True, buckets=["fs"]))
    assert report.files_deleted == 10_000 and report.files_scanned == 10_001
    assert len(report.deleted_files) == 1000 and report.truncated

    small_check, _ = await _peak(check(buckets=["ops_small"]))
    big_check, creport = await _peak(check(buckets=["fs"]))
    assert creport.orphaned_files == 10_000 and creport.files == 10_001
    assert creport.corrupt_files == 0 and creport.orphaned_chunks == 0

    # Five times the files, about the same memory: batches, not the whole collection.
    # (Keeping even 32 bytes per file would add 256 kB and fail this.)
    assert big_sweep < small_sweep * 1.2 + 100_000, (small_sweep, big_sweep)
    assert big_check < small_check * 1.2 + 100_000, (small_check, big_check)

    report = await sweep_orphans(buckets=["ops_small"])
    assert report.files_deleted == 2000 and report.bytes_freed == 2000
    assert await db["ops_small.files"].count_documents({}) == 0
    assert await db["ops_small.chunks"].count_documents({}) == 0


# -- thumbnails ---------------------------------------------------------------------


class OpsPortrait(Document):
    photo = ImageField(thumbnail_size=(16, 16, False), collection_name="ops_images")
    meta = {"collection": "ops_portraits"}


def _png(width: int = 64, height: int = 48) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color=(10, 200, 30)).save(buffer, "PNG")
    return buffer.getvalue()


async def _age_bucket(db, bucket: str) -> None:
    await db[f"{bucket}.files"].update_many({}, {"$set": {"uploadDate": DAYS_AGO}})


async def test_sweep_and_check_keep_the_thumbnail_of_a_referenced_image(asyncassets_db):
    pytest.importorskip("PIL.Image")
    db = asyncassets_db
    doc = OpsPortrait()
    await doc.photo.put(_png(), filename="p.png")
    await doc.save()
    await _age_bucket(db, "ops_images")
    assert await db["ops_images.files"].count_documents({}) == 2

    assert (await check(buckets=["ops_images"])).ok
    report = await sweep_orphans(grace=0, buckets=["ops_images"])
    assert report.files_deleted == 0 and report.files_scanned == 2

    loaded = await OpsPortrait.objects.get(pk=doc.pk)
    assert await loaded.photo.read()
    assert await loaded.photo.thumbnail.read()


async def test_sweep_deletes_an_unreferenced_image_and_its_thumbnail_together(asyncassets_db):
    pytest.importorskip("PIL.Image")
    db = asyncassets_db
    kept, dropped = OpsPortrait(), OpsPortrait()
    for doc in (kept, dropped):
        await doc.photo.put(_png(), filename="p.png")
        await doc.save()
    dropped_ids = {dropped.photo.file_id, dropped.photo.thumbnail.file_id}
    # The document goes behind the image's back: parent and thumbnail are orphans.
    await OpsPortrait._get_collection().delete_one({"_id": dropped.pk})
    await _age_bucket(db, "ops_images")

    found = await check(buckets=["ops_images"])
    assert found.orphaned_files == 2
    assert {f.file_id for f in found.orphaned_file_ids} == dropped_ids

    # Small batches so the thumbnail and its parent are judged in different batches.
    report = await sweep_orphans(grace=0, buckets=["ops_images"], batch_size=1)
    assert {f.file_id for f in report.deleted_files} == dropped_ids
    assert await kept.photo.thumbnail.read()
    assert await db["ops_images.files"].count_documents({}) == 2


async def test_a_thumbnail_whose_parent_is_gone_is_an_orphan(asyncassets_db):
    pytest.importorskip("PIL.Image")
    db = asyncassets_db
    doc = OpsPortrait()
    await doc.photo.put(_png(), filename="p.png")
    await doc.save()
    parent, thumb = doc.photo.file_id, doc.photo.thumbnail.file_id
    # A crash between deleting the parent and its thumbnail leaves the thumbnail.
    await OpsPortrait._get_collection().delete_one({"_id": doc.pk})
    await db["ops_images.files"].delete_one({"_id": parent})
    await db["ops_images.chunks"].delete_many({"files_id": parent})
    await _age_bucket(db, "ops_images")
    report = await sweep_orphans(grace=0, buckets=["ops_images"])
    assert [f.file_id for f in report.deleted_files] == [thumb]


async def test_an_unsaved_images_thumbnail_is_as_young_as_its_parent(asyncassets_db):
    pytest.importorskip("PIL.Image")
    db = asyncassets_db
    doc = OpsPortrait()
    await doc.photo.put(_png(), filename="p.png")  # not saved yet
    thumb = doc.photo.thumbnail.file_id
    await db["ops_images.files"].update_one({"_id": thumb}, {"$set": {"uploadDate": DAYS_AGO}})
    report = await sweep_orphans(grace=3600, buckets=["ops_images"])
    assert report.files_deleted == 0 and report.recent_orphaned_files == 2
    await doc.save()
    assert await doc.photo.thumbnail.read()


# -- aliases sharing a database -------------------------------------------------------


class OpsSharedA(Document):
    blob = FileField(collection_name="ops_common")
    meta = {"collection": "ops_shared_a"}


class OpsSharedB(Document):
    blob = FileField(collection_name="ops_common")
    meta = {"collection": "ops_shared_b", "db_alias": "ops_same_db"}


async def test_two_aliases_on_one_database_see_each_others_references(
    asyncassets_db, asyncassets_server_uri
):
    db = asyncassets_db
    asyncassets.connect(host=asyncassets_server_uri, alias="ops_same_db", db=db.name)
    try:
        a_file = await _upload(db, b"a", bucket="ops_common")
        b_file = await _upload(db, b"b", bucket="ops_common")
        orphan = await _upload(db, b"orphan", bucket="ops_common")
        await OpsSharedA(blob=a_file).save()
        await OpsSharedB(blob=b_file).save()

        found = await check(buckets=["ops_common"])
        assert [f.file_id for f in found.orphaned_file_ids] == [orphan]
        assert found.dangling == 0 and found.files == 3  # one bucket, counted once
        for scope in ("ops_same_db", "default", None):
            await sweep_orphans(grace=0, buckets=["ops_common"], alias=scope)
            assert await _exists(db, a_file, "ops_common"), scope
            assert await _exists(db, b_file, "ops_common"), scope
        assert not await _exists(db, orphan, "ops_common")
        assert (await check()).orphaned_files == 0
    finally:
        await asyncassets.disconnect("ops_same_db")


async def test_aliases_that_may_share_a_database_are_treated_as_sharing_it(
    asyncassets_db, asyncassets_server_uri
):
    db = asyncassets_db
    # Another spelling of the host: maybe the same server, so never delete on doubt.
    other_host = asyncassets_server_uri.replace("127.0.0.1", "localhost")
    if other_host == asyncassets_server_uri:
        other_host = asyncassets_server_uri + ("&" if "?" in asyncassets_server_uri else "?") \
            + "appname=ops"
    asyncassets.connect(host=other_host, alias="ops_same_db", db=db.name)
    try:
        b_file = await _upload(db, b"b", bucket="ops_common")
        await OpsSharedB(blob=b_file).save()
        report = await sweep_orphans(grace=0, alias="default", buckets=["ops_common"])
        assert report.files_deleted == 0
        assert await _exists(db, b_file, "ops_common")
        assert (await check(alias="default", buckets=["ops_common"])).orphaned_files == 0
    finally:
        await asyncassets.disconnect("ops_same_db")
