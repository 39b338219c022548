"""tus PATCH: bytes at the upload's offset, kept durably, attached when complete."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import os
from typing import Any

import pytest
from _tus import (
    STORAGES,
    app_for,
    client,
    create,
    doc_class,
    make_storage,
    patch,
    sha256_header,
    temp_files,
)

import asyncassets
from asyncassets.storage import FileSystemStorage, GridFSStorage


@pytest.fixture(params=STORAGES)
def storage(request: pytest.FixtureRequest, tmp_path: Any) -> Any:
    return make_storage(request.param, request, tmp_path)


async def test_an_upload_in_pieces_becomes_the_documents_file(asyncassets_db, storage):
    cls = doc_class(storage)
    doc = cls(owner="ann")
    await doc.save()
    data = os.urandom(3 * 1024 * 1024 + 12345)
    async with client(app_for(cls, chunk_size=256 * 1024)) as http:
        created = await create(http, doc, len(data), filename="big.bin")
        assert created.status_code == 201, created.text
        location = created.headers["location"]
        offset = 0
        for size in (100, 700_000, 1_500_000, len(data)):
            piece = data[offset:size]
            answer = await patch(http, location, offset, piece)
            assert answer.status_code == 204, answer.text
            offset = int(answer.headers["upload-offset"])
            assert offset == min(size, len(data))
        head = await http.head(location)
    assert head.headers["upload-offset"] == str(len(data))
    stored = await cls.objects(pk=doc.pk).first()
    assert await stored.file.read() == data
    assert stored.file.filename == "big.bin"


@pytest.fixture
async def setup(asyncassets_db, request, tmp_path):
    cls = doc_class(make_storage("gridfs", request, tmp_path))
    doc = cls(owner="ann")
    await doc.save()
    return cls, doc


async def staged(db: Any, cls: Any) -> int:
    """Chunks of unfinished uploads: staged, or in the bucket without a files document."""
    name = cls._fields["file"].storage.collection_name
    files = {d["_id"] async for d in db[f"{name}.files"].find({}, {"_id": 1})}
    headless = await db[f"{name}.chunks"].count_documents({"files_id": {"$nin": list(files)}})
    return headless + await db[f"{name}.uploads.staged"].count_documents({})


async def test_a_wrong_offset_is_409_with_the_right_one(setup):
    cls, doc = setup
    async with client(app_for(cls)) as http:
        location = (await create(http, doc, 100)).headers["location"]
        assert (await patch(http, location, 0, b"a" * 10)).status_code == 204
        for wrong in (0, 5, 11, 100):
            answer = await patch(http, location, wrong, b"b")
            assert answer.status_code == 409, wrong
            assert answer.headers["upload-offset"] == "10"
        assert (await http.head(location)).headers["upload-offset"] == "10"


@pytest.mark.parametrize(
    "headers",
    [{"Content-Type": "application/octet-stream"}, {"Upload-Offset": "-1"},
     {"Upload-Offset": "x"}, {"Upload-Checksum": "md5 AAAA"},
     {"Upload-Checksum": "sha256 not-base64!"}, {"Upload-Checksum": "sha256 AAAA"}],
)
async def test_bad_patch_headers_are_refused(setup, headers):
    cls, doc = setup
    async with client(app_for(cls)) as http:
        location = (await create(http, doc, 100)).headers["location"]
        sent = {"Content-Type": "application/offset+octet-stream", "Upload-Offset": "0"}
        sent.update(headers)
        answer = await http.patch(location, headers=sent, content=b"abc")
        assert answer.status_code in (400, 415), answer.text
        assert (await http.head(location)).headers["upload-offset"] == "0"


@pytest.mark.parametrize("kind", ["gridfs", "filesystem"])
async def test_a_checksum_mismatch_is_460_and_keeps_nothing_of_that_patch(
    asyncassets_db, tmp_path, kind
):
    # 1 KiB chunks: in the bucket's chunks (GridFS) or staged (a directory).
    cls = doc_class(GridFSStorage(f"tus_sum_{kind}", chunk_size=1024) if kind == "gridfs"
                    else FileSystemStorage(tmp_path, collection_name="tus_sum_fs"))
    doc = cls(owner="ann")
    await doc.save()
    first, second = os.urandom(3000), os.urandom(5000)
    async with client(app_for(cls, chunk_size=1024)) as http:
        location = (await create(http, doc, 8000)).headers["location"]
        ok = await patch(http, location, 0, first, **{"Upload-Checksum": sha256_header(first)})
        assert ok.status_code == 204
        # The last byte flipped (not replaced by a fixed one, which random bytes end
        # with once in 256 runs: the "bad" checksum was then the right one).
        wrong = second[:-1] + bytes([second[-1] ^ 1])
        bad = await patch(http, location, 3000, second,
                          **{"Upload-Checksum": sha256_header(wrong)})
        assert bad.status_code == 460, bad.text
        assert (await http.head(location)).headers["upload-offset"] == "3000"
        if kind == "gridfs":
            assert await staged(asyncassets_db, cls) == 2  # 2 chunks, the tail in the session
        else:
            # Written in place: the temp file holds the kept bytes; what the refused
            # PATCH wrote past them is written over by the next one.
            assert await staged(asyncassets_db, cls) == 0
            [temp] = temp_files(tmp_path)
            assert temp.read_bytes()[:3000] == first
        done = await patch(http, location, 3000, second,
                           **{"Upload-Checksum": sha256_header(second)})
        assert done.status_code == 204
    assert await (await cls.objects(pk=doc.pk).first()).file.read() == first + second
    assert await staged(asyncassets_db, cls) == 0
    assert temp_files(tmp_path) == []


async def test_bytes_past_the_length_are_413(setup):
    cls, doc = setup
    async with client(app_for(cls)) as http:
        location = (await create(http, doc, 10)).headers["location"]
        assert (await patch(http, location, 0, b"x" * 11)).status_code == 413
        assert (await http.head(location)).headers["upload-offset"] == "0"


async def test_two_patches_at_once_one_wins_the_other_gets_409(asyncassets_db, setup):
    cls, doc = setup
    data = os.urandom(200_000)
    started = asyncio.Event()
    release = asyncio.Event()

    async def slow() -> Any:
        yield data[:100_000]
        started.set()
        await release.wait()
        yield data[100_000:]

    async with client(app_for(cls, chunk_size=4096)) as http:
        location = (await create(http, doc, len(data))).headers["location"]
        first = asyncio.ensure_future(patch(http, location, 0, slow()))  # type: ignore[arg-type]
        await started.wait()
        await asyncio.sleep(0.2)
        second = await patch(http, location, 0, b"z" * 1000)
        assert second.status_code == 409, second.text
        release.set()
        assert (await first).status_code == 204
    assert await (await cls.objects(pk=doc.pk).first()).file.read() == data


async def test_finishing_replaces_the_old_file_which_is_deleted_after(asyncassets_db, setup):
    cls, doc = setup
    await doc.file.put(b"old bytes", filename="old.txt")
    old_id = doc.file.grid_id
    async with client(app_for(cls)) as http:
        location = (await create(http, doc, 9)).headers["location"]
        assert (await patch(http, location, 0, b"new bytes")).status_code == 204
        # A retried last PATCH (its reply lost) finds the upload attached.
        assert (await patch(http, location, 9, b"")).status_code == 204
    stored = await cls.objects(pk=doc.pk).first()
    assert stored.file.grid_id != old_id
    assert await stored.file.read() == b"new bytes"
    name = cls._fields["file"].storage.collection_name
    assert await asyncassets_db[f"{name}.files"].count_documents({}) == 1


async def test_an_attach_that_failed_is_completed_by_a_retried_last_patch(asyncassets_db, setup):
    cls, doc = setup
    name = cls._fields["file"].storage.collection_name
    async with client(app_for(cls)) as http:
        data = b"abcdef" * 100
        location = (await create(http, doc, len(data))).headers["location"]
        assert (await patch(http, location, 0, data[:550])).status_code == 204
        # The document is gone: the complete upload cannot be attached (410) ...
        await asyncassets_db[cls._get_collection_name()].delete_one({"_id": doc.pk})
        assert (await patch(http, location, 550, data[550:])).status_code == 410
        # ... and its bytes stay staged, nothing is in the catalogue.
        assert await asyncassets_db[f"{name}.files"].count_documents({}) == 0
        # HEAD tries to attach it too (every byte is in): 410 as long as the
        # document is gone; the session stays until its expiry.
        assert (await http.head(location)).status_code == 410
        session = await asyncassets_db[f"{name}.uploads"].find_one({})
        assert session["offset"] == len(data)
        # The document comes back (a restore): the retried last PATCH attaches.
        await asyncassets_db[cls._get_collection_name()].insert_one(
            {"_id": doc.pk, "owner": "ann"})
        assert (await patch(http, location, len(data), b"")).status_code == 204
    assert await (await cls.objects(pk=doc.pk).first()).file.read() == data
    assert await staged(asyncassets_db, cls) == 0


async def test_writes_through_two_app_processes_record_the_right_sha256(asyncassets_db, setup):
    # Two apps stand for two worker processes: neither saw every byte, so the
    # one that finishes hashes the chunks back; the recorded SHA-256 is verified.
    cls, doc = setup
    data = os.urandom(600_000)
    async with client(app_for(cls)) as one, client(app_for(cls)) as two:
        location = (await create(one, doc, len(data))).headers["location"]
        assert (await patch(two, location, 0, data[:250_000])).status_code == 204
        assert (await patch(one, location, 250_000, data[250_000:])).status_code == 204
    stored = await cls.objects(pk=doc.pk).first()
    assert await stored.file.read() == data
    assert stored.file.sha256 == hashlib.sha256(data).hexdigest()
    name = cls._fields["file"].storage.collection_name
    assert (await asyncassets.check(verify=True, buckets=name)).ok


async def test_a_slow_patch_keeps_its_lease_past_the_lease_time(setup):
    cls, doc = setup
    piece = os.urandom(10_000)

    async def trickle() -> Any:
        for _ in range(10):
            yield piece
            await asyncio.sleep(0.2)

    async with client(app_for(cls, lease=dt.timedelta(seconds=0.9))) as http:
        location = (await create(http, doc, 100_000)).headers["location"]
        # Checksummed, so it commits nothing before its end: the offset stays 0.
        slow = asyncio.ensure_future(patch(  # type: ignore[arg-type]
            http, location, 0, trickle(), **{"Upload-Checksum": sha256_header(piece * 10)}))
        await asyncio.sleep(1.5)  # past the lease: renewed as the bytes came
        other = await patch(http, location, 0, b"x")
        assert other.status_code == 409
        assert "being written by another request" in other.text
        assert (await slow).status_code == 204
    assert await (await cls.objects(pk=doc.pk).first()).file.read() == piece * 10


@pytest.mark.parametrize("lost", ["staged", "in place"])
async def test_bytes_lost_before_the_finish_are_410_and_nothing_is_attached(
    asyncassets_db, tmp_path, lost
):
    # Staged in MongoDB (a directory that overwrites: no key of its own to write
    # beside), or in place in a temp file beside the reserved key.
    cls = doc_class(FileSystemStorage(tmp_path, collection_name="tus_lost",
                                      overwrite=lost == "staged"))
    doc = cls(owner="ann")
    await doc.save()
    data = os.urandom(3 * 1024 * 1024)
    async with client(app_for(cls)) as http:
        location = (await create(http, doc, len(data))).headers["location"]
        assert (await patch(http, location, 0, data[:-10])).status_code == 204
        if lost == "staged":
            await asyncassets_db["tus_lost.uploads.staged"].delete_many({"n": 1})
        else:
            [temp] = temp_files(tmp_path)
            temp.unlink()
        last = await patch(http, location, len(data) - 10, data[-10:])
        assert last.status_code == 410, last.text
        assert (await http.head(location)).status_code == 404
    assert (await cls.objects(pk=doc.pk).first()).file.grid_id is None
    assert await asyncassets_db["tus_lost.files"].count_documents({}) == 0
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []  # no object, no temp
