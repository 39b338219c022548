"""tus on an S3 field writes in place: the parts go into the multipart upload of the
finished object as they arrive; only the bytes short of a part are staged in
MongoDB (asyncassets/storage/objects/resumable_s3.py)."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import itertools
import os
from typing import Any

import boto3
import pytest
from _tus import app_for, client, create, doc_class, patch

import asyncassets
from asyncassets.storage import S3Storage
from asyncassets.storage.objects.direct import SESSIONS
from asyncassets.storage.objects.reservations import COLLECTION as RESERVATIONS

MiB = 1024 * 1024
PART = 8 * MiB


@pytest.fixture
async def world(asyncassets_db, asyncassets_s3_bucket, request):
    name = f"tus_inplace_{request.node.name[5:30]}"
    storage = S3Storage(**asyncassets_s3_bucket.options, prefix=f"{name}/",
                        collection_name=name)
    cls = doc_class(storage)
    doc = cls(owner="ann")
    await doc.save()
    s3 = boto3.client(
        "s3", endpoint_url=asyncassets_s3_bucket.endpoint_url,
        region_name=asyncassets_s3_bucket.region,
        aws_access_key_id=asyncassets_s3_bucket.access_key_id,
        aws_secret_access_key=asyncassets_s3_bucket.secret_access_key,
    )
    return cls, doc, name, s3, asyncassets_s3_bucket.name


async def staged_bytes(db: Any, name: str) -> int:
    """Bytes staged in MongoDB: chunks and the sessions' tails."""
    total = 0
    async for chunk in db[f"{name}.uploads.staged"].find({}):
        total += len(chunk["data"])
    async for session in db[f"{name}.uploads"].find({}):
        total += len(session.get("tail") or b"")
    return total


def pending_uploads(s3: Any, bucket: str) -> list[str]:
    return [u["Key"] for u in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]


async def stored_object(s3: Any, bucket: str, name: str, doc: Any, cls: Any) -> bytes:
    stored = await cls.objects(pk=doc.pk).first()
    entry = await stored.file._bucket().find(stored.file.grid_id)
    key = f"{name}/{entry['location']['key']}"
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()


async def test_patches_of_a_part_stage_nothing_during_or_after(asyncassets_db, world):
    cls, doc, name, s3, bucket = world
    data = os.urandom(20 * MiB)
    seen: list[int] = []
    stop = asyncio.Event()

    async def watch() -> None:
        while not stop.is_set():
            seen.append(await asyncassets_db[f"{name}.uploads.staged"].count_documents({}))
            await asyncio.sleep(0.005)

    watcher = asyncio.ensure_future(watch())
    try:
        async with client(app_for(cls)) as http:
            location = (await create(http, doc, len(data), filename="big.bin")).headers[
                "location"]
            session = await asyncassets_db[f"{name}.uploads"].find_one({})
            assert session["into"] == "s3" and session["part_size"] == PART
            for offset in range(0, len(data), PART):
                answer = await patch(http, location, offset, data[offset:offset + PART])
                assert answer.status_code == 204, answer.text
                assert int(answer.headers["upload-offset"]) == min(offset + PART, len(data))
                assert await staged_bytes(asyncassets_db, name) == 0
    finally:
        stop.set()
        await watcher
    assert seen and max(seen) == 0
    stored = await cls.objects(pk=doc.pk).first()
    assert await stored.file.read() == data
    assert await stored_object(s3, bucket, name, doc, cls) == data
    assert stored.file.sha256 == hashlib.sha256(data).hexdigest()
    assert stored.file.filename == "big.bin"
    entry = await stored.file._bucket().find(stored.file.grid_id)
    assert entry["metadata"]["sha256_parts"]["part_size"] == PART
    assert await asyncassets_db[f"{name}.uploads.staged"].count_documents({}) == 0
    assert pending_uploads(s3, bucket) == []
    assert (await asyncassets.check(verify=True, buckets=name)).ok


async def test_patches_not_aligned_with_parts_stage_only_the_tail(asyncassets_db, world):
    cls, doc, name, s3, bucket = world
    data = os.urandom(20 * MiB + 4321)
    piece = 3 * MiB
    async with client(app_for(cls, chunk_size=256 * 1024)) as http:
        location = (await create(http, doc, len(data))).headers["location"]
        offset = 0
        while offset < len(data):
            answer = await patch(http, location, offset, data[offset:offset + piece])
            assert answer.status_code == 204, answer.text
            offset = int(answer.headers["upload-offset"])
            if offset < len(data):
                # Only the bytes past the last whole part are in MongoDB.
                assert await staged_bytes(asyncassets_db, name) == offset % PART
    assert await staged_bytes(asyncassets_db, name) == 0
    stored = await cls.objects(pk=doc.pk).first()
    assert await stored.file.read() == data
    assert await stored_object(s3, bucket, name, doc, cls) == data
    assert stored.file.sha256 == hashlib.sha256(data).hexdigest()
    assert pending_uploads(s3, bucket) == []
    assert (await asyncassets.check(verify=True, buckets=name)).ok


async def test_two_app_processes_alternating_end_byte_exact_with_a_parts_digest(
    asyncassets_db, world
):
    # Neither process saw every byte: no whole-file SHA-256 without reading it
    # back, the parts digest (S3's) is the entry's checksum, and it verifies.
    cls, doc, name, s3, bucket = world
    data = os.urandom(2 * PART + 5 * MiB)
    cuts = [0, 5 * MiB, 13 * MiB, 19 * MiB, len(data)]
    async with client(app_for(cls)) as one, client(app_for(cls)) as two:
        location = (await create(one, doc, len(data))).headers["location"]
        for i, (start, end) in enumerate(itertools.pairwise(cuts)):
            answer = await patch(one if i % 2 else two, location, start, data[start:end])
            assert answer.status_code == 204, answer.text
    stored = await cls.objects(pk=doc.pk).first()
    assert await stored_object(s3, bucket, name, doc, cls) == data
    entry = await stored.file._bucket().find(stored.file.grid_id)
    assert "sha256_parts" in entry["metadata"]
    assert (await asyncassets.check(verify=True, buckets=name)).ok


async def test_an_expired_upload_swept_leaves_no_multipart_upload_or_reservation(
    asyncassets_db, world
):
    cls, doc, name, s3, bucket = world
    data = os.urandom(10 * MiB)
    async with client(app_for(cls)) as http:
        location = (await create(http, doc, 30 * MiB)).headers["location"]
        assert (await patch(http, location, 0, data)).status_code == 204
        assert len(pending_uploads(s3, bucket)) == 1
        assert await asyncassets_db[RESERVATIONS].count_documents({"catalogue": name}) == 1
        # Live: a sweep without grace leaves it alone.
        await asyncassets.sweep_orphans(grace=0, buckets=name)
        assert len(pending_uploads(s3, bucket)) == 1
        assert (await http.head(location)).headers["upload-offset"] == str(len(data))
        past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1)
        await asyncassets_db[f"{name}.uploads"].update_many({}, {"$set": {"expires": past}})
        report = await asyncassets.sweep_orphans(grace=0, buckets=name)
        assert report.resumable_expired == 1
        assert (await http.head(location)).status_code == 404
    assert pending_uploads(s3, bucket) == []
    assert await asyncassets_db[RESERVATIONS].count_documents({"catalogue": name}) == 0
    assert await asyncassets_db[SESSIONS].count_documents({"catalogue": name}) == 0
    assert await asyncassets_db[f"{name}.uploads"].count_documents({}) == 0
    assert await asyncassets_db[f"{name}.uploads.staged"].count_documents({}) == 0
    assert await asyncassets_db[f"{name}.files"].count_documents({}) == 0
    assert (await asyncassets.check(buckets=name)).ok


async def test_an_expired_upload_whose_finish_died_leaves_no_multipart_upload(
    asyncassets_db, world
):
    """Found by the long tus race on S3 (servers killed at finishes): a finish that
    died left its direct session ``completing`` with its expiry pushed an hour
    on, and removing the expired upload expired only an ``open`` one, so its
    multipart upload and key outlived the upload by that hour."""
    cls, doc, name, s3, bucket = world
    data = os.urandom(9 * MiB)
    async with client(app_for(cls)) as http:
        location = (await create(http, doc, len(data) + 1)).headers["location"]
        assert (await patch(http, location, 0, data)).status_code == 204
    upload = await asyncassets_db[f"{name}.uploads"].find_one({})
    # What a finish SIGKILLed after claiming the direct session leaves.
    now = dt.datetime.now(dt.timezone.utc)
    await asyncassets_db[SESSIONS].update_one({"_id": upload["direct"]}, {"$set": {
        "state": "completing", "lease": "dead", "at": now,
        "expires": now + dt.timedelta(hours=1)}})
    past = now - dt.timedelta(seconds=1)
    await asyncassets_db[f"{name}.uploads"].update_many({}, {"$set": {"expires": past}})
    report = await asyncassets.sweep_orphans(grace=0, buckets=name)
    assert report.resumable_expired == 1
    assert pending_uploads(s3, bucket) == []
    assert await asyncassets_db[RESERVATIONS].count_documents({"catalogue": name}) == 0
    assert await asyncassets_db[SESSIONS].count_documents({"catalogue": name}) == 0
    assert (await cls.objects(pk=doc.pk).first()).file.grid_id is None


async def test_a_finish_retried_after_one_that_died_completes_at_once(
    asyncassets_db, world, monkeypatch
):
    """Found by the long tus race on S3 (a server killed at a finish, the upload
    then 'stuck'): the dead finish left its direct session ``completing``, and
    every retry was 503 until the direct uploads' own claim ran out (two
    minutes). The resumable session's lease already makes a finish the only
    one: the retry takes the dead claim over."""
    from asyncassets.storage.objects.direct import DirectUploads

    cls, doc, name, s3, bucket = world
    data = os.urandom(9 * MiB)
    real = DirectUploads._finish_object
    deaths = [RuntimeError("the process dies here")]

    async def dies_once(self: Any, *args: Any, **kwargs: Any) -> Any:
        if deaths:
            raise deaths.pop()  # neither a storage nor a database error: a death
        return await real(self, *args, **kwargs)

    monkeypatch.setattr(DirectUploads, "_finish_object", dies_once)
    async with client(app_for(cls)) as http:
        location = (await create(http, doc, len(data))).headers["location"]
        with pytest.raises(RuntimeError):
            await patch(http, location, 0, data)
        direct = await asyncassets_db[SESSIONS].find_one({})
        assert direct["state"] == "completing"  # what a dead finish leaves
        last = await patch(http, location, len(data), b"")
        assert last.status_code == 204, last.text
    assert await stored_object(s3, bucket, name, doc, cls) == data
    assert pending_uploads(s3, bucket) == []


async def test_a_terminated_upload_aborts_its_multipart_upload_at_once(asyncassets_db, world):
    cls, doc, name, s3, bucket = world
    async with client(app_for(cls)) as http:
        location = (await create(http, doc, 30 * MiB)).headers["location"]
        assert (await patch(http, location, 0, os.urandom(9 * MiB))).status_code == 204
        assert (await http.delete(location)).status_code == 204
    assert pending_uploads(s3, bucket) == []
    assert await asyncassets_db[RESERVATIONS].count_documents({"catalogue": name}) == 0
    assert await asyncassets_db[f"{name}.uploads.staged"].count_documents({}) == 0
    await asyncassets.sweep_orphans(grace=0, buckets=name)
    assert await asyncassets_db[SESSIONS].count_documents({"catalogue": name}) == 0


async def cut_patch(app: Any, path: str, offset: int, pieces: list[bytes], declared: int) -> int:
    """A PATCH whose client drops after ``pieces`` (the server sees
    ``http.disconnect``, as uvicorn reports a closed connection); its status."""
    messages: list[dict[str, Any]] = [
        {"type": "http.request", "body": piece, "more_body": True} for piece in pieces
    ]
    messages.append({"type": "http.disconnect"})
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http", "method": "PATCH", "path": path, "raw_path": path.encode(),
        "root_path": "", "query_string": b"", "scheme": "http", "http_version": "1.1",
        "server": ("testserver", 80), "client": ("127.0.0.1", 1234),
        "headers": [(b"host", b"testserver"), (b"tus-resumable", b"1.0.0"),
                    (b"x-user", b"ann"),
                    (b"content-type", b"application/offset+octet-stream"),
                    (b"upload-offset", str(offset).encode()),
                    (b"content-length", str(declared).encode())],
    }
    await app(scope, receive, send)
    return int(sent[0]["status"])


async def test_a_patch_cut_midway_keeps_its_durable_offset_and_resumes(asyncassets_db, world):
    cls, doc, name, s3, bucket = world
    data = os.urandom(20 * MiB + 77)
    app = app_for(cls, chunk_size=256 * 1024)
    async with client(app) as http:
        location = (await create(http, doc, len(data))).headers["location"]
        path = "/uploads/" + location.split("/uploads/", 1)[1]
        # 11 MiB + 5 bytes arrive in 1 MiB pieces, then the client is gone: a part
        # went to S3, the rest (3 MiB + 5) is staged.
        got = 11 * MiB + 5
        pieces = [data[i:min(i + MiB, got)] for i in range(0, got, MiB)]
        assert await cut_patch(app, path, 0, pieces, len(data)) == 400
        offset = int((await http.head(location)).headers["upload-offset"])
        assert offset == got
        assert await staged_bytes(asyncassets_db, name) == got - PART
        session = await asyncassets_db[f"{name}.uploads"].find_one({})
        assert session["parts"] == 1 and "lease" not in session
        # Another cut, within the staged part: what came is kept too.
        more = 2 * MiB + 3
        assert await cut_patch(app, path, offset, [data[offset:offset + more]],
                             len(data) - offset) == 400
        offset = int((await http.head(location)).headers["upload-offset"])
        assert offset == got + more
        answer = await patch(http, location, offset, data[offset:])
        assert answer.status_code == 204, answer.text
    stored = await cls.objects(pk=doc.pk).first()
    assert await stored_object(s3, bucket, name, doc, cls) == data
    assert stored.file.sha256 == hashlib.sha256(data).hexdigest()
    assert await staged_bytes(asyncassets_db, name) == 0
    assert pending_uploads(s3, bucket) == []
    assert (await asyncassets.check(verify=True, buckets=name)).ok
