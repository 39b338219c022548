"""Hostile tests of tus uploads written in place into an S3 multipart upload
(asyncassets/storage/objects/resumable_s3.py): PATCH sizes not aligned to parts,
checksums failing across a part boundary, races (two PATCHes, DELETE, the sweep,
the finish and ``replace()``), a process dying between UploadPart and its record,
S3 failing mid-PATCH, expiry while a part is in flight.

After each: the stored object byte-exact, no dangling reference, and once the
upload expired and a grace-0 sweep ran, no multipart upload, no key reservation,
no session, no staged chunk, ``check(verify=True)`` ok."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import os
from typing import Any

import boto3
import pytest
from _tus import app_for, client, create, doc_class, patch, sha256_header

import asyncassets
from asyncassets.storage import S3Storage
from asyncassets.storage.objects import resumable_s3
from asyncassets.storage.objects.direct import SESSIONS
from asyncassets.storage.objects.reservations import COLLECTION as RESERVATIONS

MiB = 1024 * 1024
PART = 8 * MiB
CHUNK = 256 * 1024


@pytest.fixture
async def world(asyncassets_db, asyncassets_s3_bucket, request):
    name = f"tusatk_{request.node.name[5:28]}"
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


def pending_uploads(s3: Any, bucket: str, name: str, prefix: str | None = None) -> list[str]:
    prefix = f"{name}/" if prefix is None else prefix
    return [u["Key"] for u in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
            if u["Key"].startswith(prefix)]


async def stored_object(s3: Any, bucket: str, name: str, doc: Any, cls: Any) -> bytes:
    stored = await cls.objects(pk=doc.pk).first()
    assert stored.file.grid_id is not None
    entry = await stored.file._bucket().find(stored.file.grid_id)
    assert entry is not None, "dangling reference"
    key = f"{name}/{entry['location']['key']}"
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()


async def offset_of(http: Any, location: str) -> int:
    return int((await http.head(location)).headers["upload-offset"])


async def attached_exactly(s3: Any, bucket: str, name: str, doc: Any, cls: Any,
                           data: bytes) -> None:
    assert await stored_object(s3, bucket, name, doc, cls) == data
    stored = await cls.objects(pk=doc.pk).first()
    assert await stored.file.read() == data


async def nothing_left_after_expiry(db: Any, s3: Any, bucket: str, name: str,
                                    files: int | None = None,
                                    prefix: str | None = None) -> None:
    """Expire every session, sweep with grace 0: nothing of the upload is left."""
    past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1)
    await db[f"{name}.uploads"].update_many({}, {"$set": {"expires": past},
                                                 "$unset": {"lease": ""}})
    await asyncassets.sweep_orphans(grace=0, buckets=name)
    # Direct sessions the first pass expired are removed by a second one at worst.
    await asyncassets.sweep_orphans(grace=0, buckets=name)
    assert pending_uploads(s3, bucket, name, prefix) == []
    # A stored file keeps its key reserved; nothing else does.
    assert await db[RESERVATIONS].count_documents({"catalogue": name}) == (
        await db[f"{name}.files"].count_documents({}))
    assert await db[SESSIONS].count_documents(
        {"catalogue": name, "state": {"$in": ["open", "completing", "aborting", "sweeping"]}}
    ) == 0
    assert await db[f"{name}.uploads"].count_documents({}) == 0
    assert await db[f"{name}.uploads.staged"].count_documents({}) == 0
    if files is not None:
        assert await db[f"{name}.files"].count_documents({}) == files
    report = await asyncassets.check(verify=True, buckets=name)
    assert report.ok, report


# -- sizes not aligned to parts ---------------------------------------------------------


async def test_patch_sizes_around_part_boundaries_end_byte_exact(asyncassets_db, world):
    cls, doc, name, s3, bucket = world
    data = os.urandom(3 * PART + 3)
    # 1 byte; up to part-1; 2 bytes across the boundary; part+1; tiny ones across
    # the next boundary; one byte short of the end; the last byte.
    cuts = [0, 1, PART - 1, PART + 1, 2 * PART + 2]
    cuts += [2 * PART + 2 + i for i in range(1, 6)]
    cuts += [3 * PART - 3 + i for i in range(0, 5)]
    cuts += [len(data) - 1, len(data)]
    cuts = sorted(set(cuts))
    async with client(app_for(cls, chunk_size=CHUNK)) as http:
        location = (await create(http, doc, len(data))).headers["location"]
        for start, end in itertools.pairwise(cuts):
            assert await offset_of(http, location) == start
            answer = await patch(http, location, start, data[start:end])
            assert answer.status_code == 204, (start, end, answer.text)
            assert int(answer.headers["upload-offset"]) == end
    await attached_exactly(s3, bucket, name, doc, cls, data)
    await nothing_left_after_expiry(asyncassets_db, s3, bucket, name, files=1)


async def test_a_file_smaller_than_a_part_in_one_byte_patches(asyncassets_db, world):
    cls, doc, name, s3, bucket = world
    data = os.urandom(40)
    async with client(app_for(cls, chunk_size=16)) as http:
        location = (await create(http, doc, len(data))).headers["location"]
        for i in range(len(data)):
            answer = await patch(http, location, i, data[i:i + 1])
            assert answer.status_code == 204, answer.text
    await attached_exactly(s3, bucket, name, doc, cls, data)
    await nothing_left_after_expiry(asyncassets_db, s3, bucket, name, files=1)


# -- Upload-Checksum across a part boundary ---------------------------------------------


async def test_a_checksum_mismatch_across_a_part_boundary_keeps_nothing(asyncassets_db, world):
    cls, doc, name, s3, bucket = world
    data = os.urandom(2 * PART + 100)
    async with client(app_for(cls, chunk_size=CHUNK)) as http:
        location = (await create(http, doc, len(data))).headers["location"]
        start = 3 * MiB + 7
        assert (await patch(http, location, 0, data[:start])).status_code == 204
        staged_before = [c["n"] async for c in
                         asyncassets_db[f"{name}.uploads.staged"].find({}, {"n": 1})]
        # Corrupted bytes across two part boundaries, with the right bytes' checksum:
        # parts 1 and 2 go to S3 with wrong bytes before the check fails.
        end = 2 * PART + 50
        bad = bytearray(data[start:end])
        bad[PART] ^= 0xFF
        answer = await patch(http, location, start, bytes(bad),
                             **{"Upload-Checksum": sha256_header(data[start:end])})
        assert answer.status_code == 460, answer.text
        assert await offset_of(http, location) == start
        session = await asyncassets_db[f"{name}.uploads"].find_one({})
        assert session["parts"] == 0 and session["checksums"] == {}
        assert sorted([c["n"] async for c in
                       asyncassets_db[f"{name}.uploads.staged"].find({}, {"n": 1})]
                      ) == sorted(staged_before)
        # A checksum that does not match the (right) bytes: nothing kept either.
        answer = await patch(http, location, start, data[start:end],
                             **{"Upload-Checksum": sha256_header(b"other")})
        assert answer.status_code == 460
        assert await offset_of(http, location) == start
        # Resumed in pieces that cross the boundaries elsewhere.
        mid = PART + 5
        assert (await patch(http, location, start, data[start:mid],
                            **{"Upload-Checksum": sha256_header(data[start:mid])})
                ).status_code == 204
        answer = await patch(http, location, mid, data[mid:])
        assert answer.status_code == 204, answer.text
    await attached_exactly(s3, bucket, name, doc, cls, data)
    await nothing_left_after_expiry(asyncassets_db, s3, bucket, name, files=1)


async def test_a_checksum_mismatch_on_the_last_patch_then_the_right_one(asyncassets_db, world):
    cls, doc, name, s3, bucket = world
    data = os.urandom(PART + 10)
    async with client(app_for(cls, chunk_size=CHUNK)) as http:
        location = (await create(http, doc, len(data))).headers["location"]
        assert (await patch(http, location, 0, data[:5])).status_code == 204
        bad = bytearray(data[5:])
        bad[-1] ^= 1
        answer = await patch(http, location, 5, bytes(bad),
                             **{"Upload-Checksum": sha256_header(data[5:])})
        assert answer.status_code == 460
        assert await offset_of(http, location) == 5
        stored = await cls.objects(pk=doc.pk).first()
        assert stored.file.grid_id is None
        answer = await patch(http, location, 5, data[5:],
                             **{"Upload-Checksum": sha256_header(data[5:])})
        assert answer.status_code == 204, answer.text
    await attached_exactly(s3, bucket, name, doc, cls, data)
    await nothing_left_after_expiry(asyncassets_db, s3, bucket, name, files=1)


# -- a process dying between UploadPart and its record ----------------------------------


async def test_killed_after_upload_part_before_recording_resumes_byte_exact(
    asyncassets_db, world, monkeypatch
):
    cls, doc, name, s3, bucket = world
    data = os.urandom(2 * PART + 11)
    real_record = resumable_s3._Write._record
    dying = {"on": True}

    class Killed(BaseException):
        """What a SIGKILL looks like to the code after it: nothing runs."""

    async def record(self: Any, offset: int, *, release: bool) -> Any:
        if dying["on"] and self.pending:
            dying["on"] = False
            raise Killed
        return await real_record(self, offset, release=release)

    monkeypatch.setattr(resumable_s3._Write, "_record", record)
    async with client(app_for(cls, chunk_size=CHUNK, lease=dt.timedelta(seconds=1))) as http:
        location = (await create(http, doc, len(data))).headers["location"]
        assert (await patch(http, location, 0, data[:MiB])).status_code == 204
        # Part 1 goes to S3 with *other* bytes, then the process dies.
        wrong = os.urandom(PART - MiB)
        with pytest.raises(Killed):
            await patch(http, location, MiB, wrong + data[PART:PART + 3])
        # The lease the dead process held (it never gave it back).
        await asyncassets_db[f"{name}.uploads"].update_one(
            {}, {"$set": {"lease": {"token": "dead", "until": dt.datetime.now(
                dt.timezone.utc) - dt.timedelta(seconds=1)}}})
        assert await offset_of(http, location) == MiB
        answer = await patch(http, location, MiB, data[MiB:])
        assert answer.status_code == 204, answer.text
    await attached_exactly(s3, bucket, name, doc, cls, data)
    await nothing_left_after_expiry(asyncassets_db, s3, bucket, name, files=1)


# -- stale offsets and racing PATCHes ---------------------------------------------------


async def test_a_stale_offset_is_refused_and_changes_nothing(asyncassets_db, world):
    cls, doc, name, s3, bucket = world
    data = os.urandom(PART + 3 * MiB)
    async with client(app_for(cls, chunk_size=CHUNK)) as http:
        location = (await create(http, doc, len(data))).headers["location"]
        assert (await patch(http, location, 0, data[:PART + MiB])).status_code == 204
        for stale in (0, MiB, PART, PART + MiB - 1):
            answer = await patch(http, location, stale, data[stale:stale + 2 * MiB])
            assert answer.status_code == 409
            assert answer.headers["upload-offset"] == str(PART + MiB)
        # Past the offset too.
        answer = await patch(http, location, PART + MiB + 1, data[PART + MiB + 1:])
        assert answer.status_code == 409
        answer = await patch(http, location, PART + MiB, data[PART + MiB:])
        assert answer.status_code == 204, answer.text
    await attached_exactly(s3, bucket, name, doc, cls, data)
    await nothing_left_after_expiry(asyncassets_db, s3, bucket, name, files=1)


class SlowParts:
    """Holds every UploadPart until released (a part in flight)."""

    def __init__(self, monkeypatch: Any) -> None:
        self.started = asyncio.Event()
        self.go = asyncio.Event()
        real = resumable_s3.S3Parts.upload_part
        outer = self

        async def upload_part(self: Any, session: Any, number: int, data: bytes) -> str:
            outer.started.set()
            await outer.go.wait()
            return await real(self, session, number, data)

        monkeypatch.setattr(resumable_s3.S3Parts, "upload_part", upload_part)


async def test_two_patches_at_one_offset_on_two_apps_one_wins(asyncassets_db, world,
                                                             monkeypatch):
    cls, doc, name, s3, bucket = world
    data = os.urandom(2 * PART + 9)
    slow = SlowParts(monkeypatch)
    slow.go.set()
    async with client(app_for(cls, chunk_size=CHUNK)) as one, \
            client(app_for(cls, chunk_size=CHUNK)) as two:
        location = (await create(one, doc, len(data))).headers["location"]
        assert (await patch(one, location, 0, data[:MiB])).status_code == 204
        slow.go.clear()
        first = asyncio.ensure_future(patch(one, location, MiB, data[MiB:PART + MiB]))
        await slow.started.wait()
        # The same bytes from another process while the first is uploading part 1.
        second = await patch(two, location, MiB, data[MiB:])
        assert second.status_code == 409, second.text
        slow.go.set()
        assert (await first).status_code == 204
        offset = await offset_of(two, location)
        assert offset == PART + MiB
        answer = await patch(two, location, offset, data[offset:])
        assert answer.status_code == 204, answer.text
    await attached_exactly(s3, bucket, name, doc, cls, data)
    await nothing_left_after_expiry(asyncassets_db, s3, bucket, name, files=1)


async def test_two_patches_released_together_end_byte_exact(asyncassets_db, world):
    cls, doc, name, s3, bucket = world
    data = os.urandom(2 * PART + 9)
    async with client(app_for(cls, chunk_size=CHUNK)) as one, \
            client(app_for(cls, chunk_size=CHUNK)) as two:
        location = (await create(one, doc, len(data))).headers["location"]
        assert (await patch(one, location, 0, data[:MiB])).status_code == 204
        answers = await asyncio.gather(
            patch(one, location, MiB, data[MiB:]), patch(two, location, MiB, data[MiB:]))
        codes = sorted(a.status_code for a in answers)
        assert codes in ([204, 409], [204, 204]), codes
        offset = await offset_of(one, location)
        if offset < len(data):
            assert (await patch(one, location, offset, data[offset:])).status_code == 204
    await attached_exactly(s3, bucket, name, doc, cls, data)
    await nothing_left_after_expiry(asyncassets_db, s3, bucket, name, files=1)


async def test_delete_racing_a_patch_uploading_a_part(asyncassets_db, world, monkeypatch):
    cls, doc, name, s3, bucket = world
    data = os.urandom(PART + 2 * MiB)
    slow = SlowParts(monkeypatch)
    async with client(app_for(cls, chunk_size=CHUNK)) as http:
        location = (await create(http, doc, len(data))).headers["location"]
        writing = asyncio.ensure_future(patch(http, location, 0, data[:PART + MiB]))
        await slow.started.wait()
        assert (await http.delete(location)).status_code == 409
        slow.go.set()
        assert (await writing).status_code == 204
        assert (await http.delete(location)).status_code == 204
        assert (await http.head(location)).status_code == 404
        assert pending_uploads(s3, bucket, name) == []
        stored = await cls.objects(pk=doc.pk).first()
        assert stored.file.grid_id is None
    await nothing_left_after_expiry(asyncassets_db, s3, bucket, name, files=0)


async def test_the_sweep_racing_a_live_patch_leaves_it(asyncassets_db, world, monkeypatch):
    cls, doc, name, s3, bucket = world
    data = os.urandom(PART + 2 * MiB)
    slow = SlowParts(monkeypatch)
    async with client(app_for(cls, chunk_size=CHUNK)) as http:
        location = (await create(http, doc, len(data))).headers["location"]
        writing = asyncio.ensure_future(patch(http, location, 0, data))
        await slow.started.wait()
        await asyncassets.sweep_orphans(grace=0, buckets=name)
        slow.go.set()
        answer = await writing
        assert answer.status_code == 204, answer.text
    await attached_exactly(s3, bucket, name, doc, cls, data)
    await nothing_left_after_expiry(asyncassets_db, s3, bucket, name, files=1)


async def test_expiry_while_the_last_part_is_in_flight(asyncassets_db, world, monkeypatch):
    """The upload expires while the PATCH that completes it uploads its last part,
    and a sweep runs then: the sweep leaves a session a PATCH holds ("for the next
    run"), so the PATCH ends as it would on GridFS or a directory: attached."""
    cls, doc, name, s3, bucket = world
    data = os.urandom(PART + 2 * MiB)
    slow = SlowParts(monkeypatch)
    async with client(app_for(cls, chunk_size=CHUNK)) as http:
        location = (await create(http, doc, len(data))).headers["location"]
        assert (await patch(http, location, 0, data[:MiB])).status_code == 204
        writing = asyncio.ensure_future(patch(http, location, MiB, data[MiB:]))
        await slow.started.wait()
        past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1)
        # Both expire together (the direct session was created with the same expiry).
        await asyncassets_db[f"{name}.uploads"].update_many({}, {"$set": {"expires": past}})
        await asyncassets_db[SESSIONS].update_many({"catalogue": name},
                                                   {"$set": {"expires": past}})
        report = await asyncassets.sweep_orphans(grace=0, buckets=name)
        assert report.resumable_expired == 0  # held by the PATCH
        slow.go.set()
        answer = await writing
        assert answer.status_code == 204, answer.text
    await attached_exactly(s3, bucket, name, doc, cls, data)
    await nothing_left_after_expiry(asyncassets_db, s3, bucket, name, files=1)


async def test_expiry_while_a_middle_part_is_in_flight_ends_clean(asyncassets_db, world,
                                                                  monkeypatch):
    cls, doc, name, s3, bucket = world
    data = os.urandom(2 * PART + 2 * MiB)
    slow = SlowParts(monkeypatch)
    async with client(app_for(cls, chunk_size=CHUNK)) as http:
        location = (await create(http, doc, len(data))).headers["location"]
        writing = asyncio.ensure_future(patch(http, location, 0, data[:PART + MiB]))
        await slow.started.wait()
        past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1)
        await asyncassets_db[f"{name}.uploads"].update_many({}, {"$set": {"expires": past}})
        await asyncassets_db[SESSIONS].update_many({"catalogue": name},
                                                   {"$set": {"expires": past}})
        await asyncassets.sweep_orphans(grace=0, buckets=name)
        slow.go.set()
        answer = await writing
        assert answer.status_code in (204, 410), answer.text
        # Expired: no more writes.
        answer = await patch(http, location, PART + MiB, data[PART + MiB:])
        assert answer.status_code in (404, 410), answer.text
        stored = await cls.objects(pk=doc.pk).first()
        assert stored.file.grid_id is None
    await nothing_left_after_expiry(asyncassets_db, s3, bucket, name, files=0)


# -- the finish against the document ----------------------------------------------------


async def test_the_document_deleted_before_the_finish(asyncassets_db, world):
    cls, doc, name, s3, bucket = world
    data = os.urandom(PART + 5)
    async with client(app_for(cls, chunk_size=CHUNK)) as http:
        location = (await create(http, doc, len(data))).headers["location"]
        assert (await patch(http, location, 0, data[:PART - 1])).status_code == 204
        await doc.delete()
        answer = await patch(http, location, PART - 1, data[PART - 1:])
        assert answer.status_code == 410, answer.text
        answer = await patch(http, location, len(data), b"")
        assert answer.status_code in (404, 410), answer.text
    await nothing_left_after_expiry(asyncassets_db, s3, bucket, name, files=0)


async def test_replace_racing_the_finish(asyncassets_db, world, monkeypatch):
    """``replace()`` lands between the finish's read of the document and its switch:
    the switch is refused (409) and, written in place, the upload is dropped (a
    retry is 404, as docs/uploads.rst says); the replacement stays, whole, and the
    completed object goes (the sweep finds nothing)."""
    cls, doc, name, s3, bucket = world
    data = os.urandom(PART + 5)
    other = os.urandom(3000)
    real_complete = resumable_s3.S3Parts.complete

    async def complete(self: Any, session: Any, **kwargs: Any) -> Any:
        entry = await real_complete(self, session, **kwargs)
        racer = await cls.objects(pk=doc.pk).first()
        await racer.file.replace(other, filename="other.bin")
        return entry

    async with client(app_for(cls, chunk_size=CHUNK)) as http:
        location = (await create(http, doc, len(data))).headers["location"]
        assert (await patch(http, location, 0, data[:PART - 1])).status_code == 204
        monkeypatch.setattr(resumable_s3.S3Parts, "complete", complete)
        answer = await patch(http, location, PART - 1, data[PART - 1:])
        monkeypatch.setattr(resumable_s3.S3Parts, "complete", real_complete)
        assert answer.status_code == 409, answer.text
        stored = await cls.objects(pk=doc.pk).first()
        assert await stored.file.read() == other
        retry = await patch(http, location, len(data), b"")
        assert retry.status_code == 404, retry.text
        stored = await cls.objects(pk=doc.pk).first()
        assert await stored.file.read() == other
        assert pending_uploads(s3, bucket, name) == []
    await nothing_left_after_expiry(asyncassets_db, s3, bucket, name, files=1)


async def test_replace_right_after_the_finish_keeps_the_replacement(asyncassets_db, world):
    cls, doc, name, s3, bucket = world
    data = os.urandom(PART + 5)
    other = os.urandom(3000)
    async with client(app_for(cls, chunk_size=CHUNK)) as http:
        location = (await create(http, doc, len(data))).headers["location"]
        answers = await asyncio.gather(
            patch(http, location, 0, data),
            _replace_soon(cls, doc, other),
        )
        assert answers[0].status_code in (204, 409), answers[0].text
        retry = await patch(http, location, len(data), b"")
        assert retry.status_code in (204, 404, 409, 410)
        stored = await cls.objects(pk=doc.pk).first()
        assert await stored.file.read() in (data, other)
    await nothing_left_after_expiry(asyncassets_db, s3, bucket, name, files=1)


async def _replace_soon(cls: Any, doc: Any, other: bytes) -> None:
    await asyncio.sleep(0.3)
    racer = await cls.objects(pk=doc.pk).first()
    try:
        await racer.file.replace(other, filename="other.bin")
    except asyncassets.errors.FileConflict:
        pass


# -- S3 failing mid-PATCH ---------------------------------------------------------------


async def test_parts_s3_refuses_are_staged_and_sent_later(asyncassets_db, world, monkeypatch):
    """Part 2 refused in the middle of a PATCH, then the last part refused at the
    finish (twice): every acknowledged byte stays, the retries end byte-exact."""
    cls, doc, name, s3, bucket = world
    data = os.urandom(3 * PART - 7)
    real = resumable_s3.S3Parts.upload_part
    refuse = {2: 1, 3: 2}
    calls: list[int] = []

    async def upload_part(self: Any, session: Any, number: int, payload: bytes) -> str:
        calls.append(number)
        if refuse.get(number):
            refuse[number] -= 1
            raise asyncassets.errors.StorageError(f"S3 is down (part {number})")
        return await real(self, session, number, payload)

    monkeypatch.setattr(resumable_s3.S3Parts, "upload_part", upload_part)
    async with client(app_for(cls, chunk_size=CHUNK)) as http:
        location = (await create(http, doc, len(data))).headers["location"]
        answer = await patch(http, location, 0, data[:2 * PART + MiB])
        assert answer.status_code == 503, answer.text
        # Part 1 went, part 2 is staged whole and counted; the rest was not taken.
        assert await offset_of(http, location) == 2 * PART
        answer = await patch(http, location, 2 * PART, data[2 * PART:])
        assert answer.status_code == 503, answer.text  # the last part refused
        # Every byte is durable (the last part staged); read from the session, as a
        # HEAD now would try the finish.
        session = await asyncassets_db[f"{name}.uploads"].find_one({})
        assert session["offset"] == len(data)
        assert (await cls.objects(pk=doc.pk).first()).file.grid_id is None
        answer = await patch(http, location, len(data), b"")
        assert answer.status_code == 503, answer.text  # refused again, at the finish
        answer = await patch(http, location, len(data), b"")
        assert answer.status_code == 204, answer.text
    assert calls.count(2) == 2 and calls.count(3) == 3
    await attached_exactly(s3, bucket, name, doc, cls, data)
    await nothing_left_after_expiry(asyncassets_db, s3, bucket, name, files=1)


async def test_moto_killed_mid_patch_then_resumed_byte_exact(asyncassets_db, tmp_path):
    import signal

    from test_tus_faults import free_port, start_durable_s3

    from asyncassets.storage import Retry

    port, log = free_port(), tmp_path / "s3.log"
    endpoint = f"http://127.0.0.1:{port}"
    moto = start_durable_s3(port, log)
    name = "tusatkkill"
    try:
        keys = {"aws_access_key_id": "k", "aws_secret_access_key": "s"}
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **keys)
        s3.create_bucket(Bucket="tus-atk-kill")
        cls = doc_class(S3Storage(
            "tus-atk-kill", endpoint_url=endpoint, region="us-east-1",
            access_key_id="k", secret_access_key="s", collection_name=name,
            prefix=f"{name}/", retry=Retry(attempts=2, delay=0.05)))
        doc = cls(owner="ann")
        await doc.save()
        data = os.urandom(3 * PART + 123)
        killed = asyncio.Event()
        real = resumable_s3.S3Parts.upload_part

        async def upload_part(self: Any, session: Any, number: int, payload: bytes) -> str:
            if number == 2 and not killed.is_set():
                killed.set()
                moto.send_signal(signal.SIGKILL)
                moto.wait()
            return await real(self, session, number, payload)

        resumable_s3.S3Parts.upload_part = upload_part  # type: ignore[method-assign]
        try:
            async with client(app_for(cls, chunk_size=CHUNK)) as http:
                location = (await create(http, doc, len(data))).headers["location"]
                answer = await patch(http, location, 0, data[:PART + MiB])
                assert answer.status_code == 204
                answer = await patch(http, location, PART + MiB, data[PART + MiB:])
                assert answer.status_code == 503, answer.text
                offset = await offset_of(http, location)
                assert offset == 2 * PART  # part 2 staged, counted
                moto = start_durable_s3(port, log)
                answer = await patch(http, location, offset, data[offset:])
                assert answer.status_code == 204, answer.text
        finally:
            resumable_s3.S3Parts.upload_part = real  # type: ignore[method-assign]
        stored = await cls.objects(pk=doc.pk).first()
        assert await stored.file.read() == data
        await nothing_left_after_expiry(asyncassets_db, s3, "tus-atk-kill", name, files=1)
    finally:
        moto.kill()
        moto.wait()


# -- a PATCH whose lease lapses while its part is in flight -----------------------------


class StalledFirst:
    """The first UploadPart waits for ``go``; the others run at once."""

    def __init__(self, monkeypatch: Any) -> None:
        self.started = asyncio.Event()
        self.go = asyncio.Event()
        self.first = True
        real = resumable_s3.S3Parts.upload_part
        outer = self

        async def upload_part(self: Any, session: Any, number: int, data: bytes) -> str:
            if outer.first:
                outer.first = False
                outer.started.set()
                await outer.go.wait()
            return await real(self, session, number, data)

        monkeypatch.setattr(resumable_s3.S3Parts, "upload_part", upload_part)


async def test_a_stalled_part_landing_after_a_takeover_finished_changes_nothing(
    asyncassets_db, world, monkeypatch
):
    cls, doc, name, s3, bucket = world
    data = os.urandom(2 * PART + 5)
    stalled = StalledFirst(monkeypatch)
    lease = dt.timedelta(seconds=1)
    async with client(app_for(cls, chunk_size=CHUNK, lease=lease)) as one, \
            client(app_for(cls, chunk_size=CHUNK, lease=lease)) as two:
        location = (await create(one, doc, len(data))).headers["location"]
        assert (await patch(one, location, 0, data[:MiB])).status_code == 204
        first = asyncio.ensure_future(patch(one, location, MiB, data[MiB:]))
        await stalled.started.wait()
        await asyncio.sleep(1.3)  # its lease lapses
        second = await patch(two, location, MiB, data[MiB:])
        assert second.status_code == 204, second.text
        await attached_exactly(s3, bucket, name, doc, cls, data)
        stalled.go.set()
        late = await first
        assert late.status_code in (409, 410), late.text
        assert (await one.head(location)).headers["upload-offset"] == str(len(data))
        retry = await patch(one, location, len(data), b"")
        assert retry.status_code == 204, retry.text
    await attached_exactly(s3, bucket, name, doc, cls, data)
    await nothing_left_after_expiry(asyncassets_db, s3, bucket, name, files=1)


async def test_a_stalled_part_landing_after_a_takeover_moved_on(asyncassets_db, world,
                                                                monkeypatch):
    """The takeover records part 1 and stages part of part 2; the stalled write's
    part 1 lands then (same bytes), its record is refused; the upload goes on."""
    cls, doc, name, s3, bucket = world
    data = os.urandom(2 * PART + 5)
    stalled = StalledFirst(monkeypatch)
    lease = dt.timedelta(seconds=1)
    async with client(app_for(cls, chunk_size=CHUNK, lease=lease)) as one, \
            client(app_for(cls, chunk_size=CHUNK, lease=lease)) as two:
        location = (await create(one, doc, len(data))).headers["location"]
        assert (await patch(one, location, 0, data[:MiB])).status_code == 204
        first = asyncio.ensure_future(patch(one, location, MiB, data[MiB:PART + 2 * MiB]))
        await stalled.started.wait()
        await asyncio.sleep(1.3)
        second = await patch(two, location, MiB, data[MiB:PART + MiB])
        assert second.status_code == 204, second.text
        stalled.go.set()
        late = await first
        assert late.status_code in (409, 410), late.text
        offset = await offset_of(two, location)
        assert offset == PART + MiB
        answer = await patch(one, location, offset, data[offset:])
        assert answer.status_code == 204, answer.text
    await attached_exactly(s3, bucket, name, doc, cls, data)
    await nothing_left_after_expiry(asyncassets_db, s3, bucket, name, files=1)


async def test_the_sweep_takes_an_expired_upload_whose_patch_lease_lapsed(
    asyncassets_db, world, monkeypatch
):
    cls, doc, name, s3, bucket = world
    data = os.urandom(2 * PART)
    stalled = StalledFirst(monkeypatch)
    async with client(app_for(cls, chunk_size=CHUNK, lease=dt.timedelta(seconds=1))) as http:
        location = (await create(http, doc, len(data))).headers["location"]
        writing = asyncio.ensure_future(patch(http, location, 0, data))
        await stalled.started.wait()
        await asyncio.sleep(1.3)
        past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1)
        await asyncassets_db[f"{name}.uploads"].update_many({}, {"$set": {"expires": past}})
        await asyncassets_db[SESSIONS].update_many({"catalogue": name},
                                                   {"$set": {"expires": past}})
        report = await asyncassets.sweep_orphans(grace=0, buckets=name)
        assert report.resumable_expired == 1
        assert pending_uploads(s3, bucket, name) == []
        stalled.go.set()
        answer = await writing
        assert answer.status_code in (404, 409, 410), answer.text
        assert (await cls.objects(pk=doc.pk).first()).file.grid_id is None
    await nothing_left_after_expiry(asyncassets_db, s3, bucket, name, files=0)


# -- lengths on part boundaries, creation-with-upload, empty PATCHes --------------------


@pytest.mark.parametrize("length", [1, PART, 2 * PART])
async def test_lengths_on_part_boundaries(asyncassets_db, world, length):
    cls, doc, name, s3, bucket = world
    data = os.urandom(length)
    async with client(app_for(cls, chunk_size=CHUNK)) as http:
        location = (await create(http, doc, len(data))).headers["location"]
        offset = 0
        for size in (0, min(PART - 1, length - 1) or 0, 0, 1, PART):
            if offset >= length:
                break
            answer = await patch(http, location, offset, data[offset:offset + size])
            assert answer.status_code == 204, answer.text
            offset = int(answer.headers["upload-offset"])
            assert offset == min(length, offset)
        if offset < length:
            assert (await patch(http, location, offset, data[offset:])).status_code == 204
    await attached_exactly(s3, bucket, name, doc, cls, data)
    await nothing_left_after_expiry(asyncassets_db, s3, bucket, name, files=1)


async def test_creation_with_upload_across_a_part_boundary(asyncassets_db, world):
    cls, doc, name, s3, bucket = world
    data = os.urandom(2 * PART + 3)
    async with client(app_for(cls, chunk_size=CHUNK)) as http:
        created = await create(http, doc, len(data), content=data[:PART + 1])
        assert created.status_code == 201, created.text
        assert created.headers["upload-offset"] == str(PART + 1)
        location = created.headers["location"]
        answer = await patch(http, location, PART + 1, data[PART + 1:])
        assert answer.status_code == 204, answer.text
    await attached_exactly(s3, bucket, name, doc, cls, data)
    await nothing_left_after_expiry(asyncassets_db, s3, bucket, name, files=1)


async def test_creation_with_the_whole_upload(asyncassets_db, world):
    cls, doc, name, s3, bucket = world
    data = os.urandom(PART + 3)
    async with client(app_for(cls, chunk_size=CHUNK)) as http:
        created = await create(http, doc, len(data), content=data)
        assert created.status_code == 201, created.text
        assert created.headers["upload-offset"] == str(len(data))
    await attached_exactly(s3, bucket, name, doc, cls, data)
    await nothing_left_after_expiry(asyncassets_db, s3, bucket, name, files=1)


# -- real SIGKILLs of the server process (tests/_tus_server.py) --------------------------


@pytest.fixture
async def killed(asyncassets_db, asyncassets_server_uri, asyncassets_s3_bucket):
    """``(serve, cls, s3, bucket)``: ``serve(die_at=None)`` starts a tus server
    process on the test's bucket (``TUS_DIE_AT``: where it SIGKILLs itself), each
    killed at the end; ``cls`` the document class it attaches uploads to."""
    from test_tus_faults import Server, storage_for

    from asyncassets import Document
    from asyncassets.fields import FileField
    from asyncassets.testing import database_uri

    storage, where, env = storage_for("s3", None, asyncassets_s3_bucket)  # type: ignore[arg-type]

    class TusFaultDoc(Document):
        file = FileField(storage=storage)
        meta = {"collection": "tus_fault_docs"}

    uri = database_uri(asyncassets_server_uri, asyncassets_db.name)
    started: list[Any] = []

    def serve(die_at: str | None = None) -> Any:
        server = Server(uri, "s3", where, {**env, **({"TUS_DIE_AT": die_at} if die_at else {})})
        started.append(server)
        server.start()
        return server

    s3 = boto3.client(
        "s3", endpoint_url=asyncassets_s3_bucket.endpoint_url,
        region_name=asyncassets_s3_bucket.region,
        aws_access_key_id=asyncassets_s3_bucket.access_key_id,
        aws_secret_access_key=asyncassets_s3_bucket.secret_access_key,
    )
    try:
        yield serve, TusFaultDoc, s3, asyncassets_s3_bucket.name
    finally:
        for server in started:
            server.kill()


async def patch_once_free(http: Any, url: str, offset: int, data: bytes) -> Any:
    """PATCH, again while the answer is 409 (a dead server's 2 s lease), up to 15 s."""
    from test_tus_faults import tus_patch

    deadline = asyncio.get_running_loop().time() + 15
    while True:
        answer = await tus_patch(http, url, offset, data)
        if answer.status_code != 409 or asyncio.get_running_loop().time() > deadline:
            return answer
        await asyncio.sleep(0.25)


async def test_server_sigkilled_after_upload_part_before_record_resumes_byte_exact(
    asyncassets_db, killed
):
    import httpx
    from test_tus_faults import on, tus_create, tus_patch

    serve, cls, s3, bucket = killed
    dying, healthy = serve("part"), serve()
    doc = cls()
    await doc.save()
    data = os.urandom(3 * PART + 1000)
    async with httpx.AsyncClient(timeout=60) as http:
        location = await tus_create(http, dying, doc, len(data))
        assert (await tus_patch(http, location, 0, data[:MiB])).status_code == 204
        with pytest.raises(httpx.TransportError):
            await tus_patch(http, location, MiB, data[MiB:])
        assert dying.proc is not None and dying.proc.wait(timeout=10) < 0
        there = on(healthy, location)
        head = await http.head(there, headers={"Tus-Resumable": "1.0.0"})
        offset = int(head.headers["upload-offset"])
        assert offset == PART  # part 1 recorded; part 2 uploaded, not recorded
        answer = await patch_once_free(http, there, offset, data[offset:])
        assert answer.status_code == 204, answer.text
    stored = await cls.objects(pk=doc.pk).first()
    assert await stored.file.read() == data
    await nothing_left_after_expiry(asyncassets_db, s3, bucket, "tusfaults", files=1,
                                    prefix="")


async def test_server_sigkilled_between_the_direct_session_and_its_owner(
    asyncassets_db, killed
):
    """Killed after the direct session (key reserved, multipart upload started) is
    stored and before the tus session naming it: the client got no location, the
    direct session lives to its own expiry (the tus session's would-be one), then
    the sweep aborts its multipart upload and releases its key."""
    import base64

    import httpx
    from test_tus_faults import TUS_HEADERS

    serve, cls, s3, bucket = killed
    dying = serve("created")
    doc = cls()
    await doc.save()
    meta = "doc " + base64.b64encode(str(doc.pk).encode()).decode()
    async with httpx.AsyncClient(timeout=60) as http:
        with pytest.raises(httpx.TransportError):
            await http.post(dying.url, headers={
                **TUS_HEADERS, "Upload-Length": str(2 * PART), "Upload-Metadata": meta})
    assert dying.proc is not None and dying.proc.wait(timeout=10) < 0
    # The window is real: a multipart upload and its session, no tus session.
    assert len(pending_uploads(s3, bucket, "tusfaults", prefix="")) == 1
    assert await asyncassets_db["tusfaults.uploads"].count_documents({}) == 0
    owned = {"catalogue": "tusfaults", "state": "open"}
    assert await asyncassets_db[SESSIONS].count_documents(owned) == 1
    # Before its expiry the sweep cannot tell it from a live direct upload.
    await asyncassets.sweep_orphans(grace=0, buckets="tusfaults")
    assert len(pending_uploads(s3, bucket, "tusfaults", prefix="")) == 1
    # Time passes for every session.
    past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1)
    await asyncassets_db[SESSIONS].update_many({}, {"$set": {"expires": past}})
    await nothing_left_after_expiry(asyncassets_db, s3, bucket, "tusfaults", files=0,
                                    prefix="")
    assert (await cls.objects(pk=doc.pk).first()).file.grid_id is None


async def test_a_finish_killed_before_the_switch_is_not_attached_after_a_change(
    asyncassets_db, killed
):
    """Killed right before the switch, the file replaced by the user, then the last
    PATCH retried: 204, the user's file stays, and after expiry and the sweep only
    that file is left (the upload's completed object is an orphan the sweep takes)."""
    import httpx
    from test_tus_faults import on, tus_create, tus_patch

    serve, cls, s3, bucket = killed
    dying, healthy = serve("switch"), serve()
    doc = cls()
    await doc.save()
    await doc.file.put(b"the first file")
    data = os.urandom(PART + 1000)
    async with httpx.AsyncClient(timeout=60) as http:
        location = await tus_create(http, dying, doc, len(data))
        with pytest.raises(httpx.TransportError):
            await tus_patch(http, location, 0, data)
        assert dying.proc is not None and dying.proc.wait(timeout=10) < 0
        stored = await cls.objects(pk=doc.pk).first()
        assert await stored.file.read() == b"the first file"
        await stored.file.replace(b"the user's own file")
        answer = await patch_once_free(http, on(healthy, location), len(data), b"")
        assert answer.status_code == 204, answer.text
        assert answer.headers["upload-offset"] == str(len(data))
    final = await cls.objects(pk=doc.pk).first()
    assert await final.file.read() == b"the user's own file"
    await asyncio.sleep(1.1)  # the completed object's age, past grace 0
    await nothing_left_after_expiry(asyncassets_db, s3, bucket, "tusfaults", files=1,
                                    prefix="")


async def test_the_document_deleted_during_the_finish(asyncassets_db, world, monkeypatch):
    """Deleted after the multipart upload is completed, before the switch: nothing
    is attached, the completed object goes, nothing is left after the sweep."""
    cls, doc, name, s3, bucket = world
    data = os.urandom(PART + 5)
    real_complete = resumable_s3.S3Parts.complete

    async def complete(self: Any, session: Any, **kwargs: Any) -> Any:
        entry = await real_complete(self, session, **kwargs)
        await (await cls.objects(pk=doc.pk).first()).delete()
        return entry

    async with client(app_for(cls, chunk_size=CHUNK)) as http:
        location = (await create(http, doc, len(data))).headers["location"]
        assert (await patch(http, location, 0, data[:PART])).status_code == 204
        monkeypatch.setattr(resumable_s3.S3Parts, "complete", complete)
        answer = await patch(http, location, PART, data[PART:])
        monkeypatch.setattr(resumable_s3.S3Parts, "complete", real_complete)
        assert answer.status_code in (409, 410), answer.text
        assert await cls.objects(pk=doc.pk).first() is None
        retry = await patch(http, location, len(data), b"")
        assert retry.status_code in (404, 410), retry.text
    await nothing_left_after_expiry(asyncassets_db, s3, bucket, name, files=0)


async def test_a_checksummed_patch_cut_across_a_part_keeps_nothing(asyncassets_db, world):
    from test_tus_s3_inplace import cut_patch

    cls, doc, name, s3, bucket = world
    data = os.urandom(2 * PART + 9)
    app = app_for(cls, chunk_size=CHUNK)
    async with client(app) as http:
        location = (await create(http, doc, len(data))).headers["location"]
        path = "/uploads/" + location.split("/uploads/", 1)[1]
        assert (await patch(http, location, 0, data[:MiB + 1])).status_code == 204
        # The ASGI client of cut_patch sends no Upload-Checksum: wrap the app.

        async def with_checksum(scope: Any, receive: Any, send: Any) -> None:
            scope = dict(scope)
            scope["headers"] = [*scope["headers"],
                                (b"upload-checksum",
                                 sha256_header(data[MiB + 1:]).encode())]
            await app(scope, receive, send)

        got = PART + 3 * MiB
        pieces = [data[i:min(i + MiB, got)] for i in range(MiB + 1, got, MiB)]
        status = await cut_patch(with_checksum, path, MiB + 1, pieces, len(data) - MiB - 1)
        assert status == 400
        assert await offset_of(http, location) == MiB + 1
        session = await asyncassets_db[f"{name}.uploads"].find_one({})
        assert session["parts"] == 0 and "lease" not in session
        answer = await patch(http, location, MiB + 1, data[MiB + 1:])
        assert answer.status_code == 204, answer.text
    await attached_exactly(s3, bucket, name, doc, cls, data)
    await nothing_left_after_expiry(asyncassets_db, s3, bucket, name, files=1)
