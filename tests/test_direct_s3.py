"""Direct-to-S3 uploads (``asyncassets.web.direct``) against the moto server, through
uvicorn, with httpx doing what a browser does: ask the app, PUT the parts to the
signed URLs, finalize.

Every test checks what a user cares about: the bytes read back through the
document's field, the catalogue entry, the objects and pending multipart uploads
in the bucket, the key reservations, and the error the client is given.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import hashlib
import itertools
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio
import uvicorn

from asyncassets import Document
from asyncassets.fields import FileField, StringField
from asyncassets.ops import check, sweep_orphans
from asyncassets.storage import S3Storage
from asyncassets.storage.objects.direct import SESSIONS
from asyncassets.storage.objects.reservations import COLLECTION as RESERVATIONS
from asyncassets.testing import S3Bucket
from asyncassets.web.direct import DirectUploadIntent, direct_uploads_app

PART = 5 * 1024 * 1024


class Counter:
    """ASGI middleware counting the bytes of every request and response body."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.received = 0
        self.sent = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def counted_receive() -> Any:
            message = await receive()
            self.received += len(message.get("body", b""))
            return message

        async def counted_send(message: Any) -> None:
            if message["type"] == "http.response.body":
                self.sent += len(message.get("body", b""))
            elif message["type"] == "http.response.start":
                self.sent += sum(len(k) + len(v) for k, v in message.get("headers", []))
            await send(message)

        if scope["type"] == "http":
            self.received += sum(len(k) + len(v) for k, v in scope.get("headers", []))
        await self.app(scope, counted_receive, counted_send)

    @property
    def total(self) -> int:
        return self.received + self.sent


class Site:
    def __init__(self, url: str, counter: Counter, cls: Any, bucket: S3Bucket) -> None:
        self.url = url
        self.counter = counter
        self.cls = cls
        self.bucket = bucket
        self.http = httpx.AsyncClient(timeout=60)
        self.refuse = False

    async def create(self, doc: Any, data_or_size: Any, **extra: Any) -> httpx.Response:
        size = data_or_size if isinstance(data_or_size, int) else len(data_or_size)
        body = {"filename": "clip.bin", "size": size, "target": {"id": str(doc.pk)}, **extra}
        return await self.http.post(f"{self.url}/uploads/", json=body)

    async def put_part(self, session: dict[str, Any], number: int, data: bytes) -> httpx.Response:
        digest = base64.b64encode(hashlib.sha256(data).digest()).decode()
        signed = await self.http.post(
            f"{self.url}/uploads/{session['id']}/parts/{number}", json={"sha256": digest}
        )
        assert signed.status_code == 200, signed.text
        answer = signed.json()
        return await self.http.put(answer["url"], content=data, headers=answer["headers"])

    async def send_all(self, session: dict[str, Any], data: bytes) -> None:
        if "post" in session:
            post = session["post"]
            reply = await self.http.post(
                post["url"], data=post["fields"], files={"file": ("clip.bin", data)}
            )
            assert reply.status_code in (200, 204), reply.text
            return
        size = session["part_size"]
        for number in range(1, session["parts"] + 1):
            reply = await self.put_part(session, number, data[(number - 1) * size : number * size])
            assert reply.status_code == 200, reply.text

    async def finalize(self, session: dict[str, Any]) -> httpx.Response:
        return await self.http.post(f"{self.url}/uploads/{session['id']}/finalize")

    async def upload(self, doc: Any, data: bytes, **extra: Any) -> httpx.Response:
        created = await self.create(doc, data, **extra)
        assert created.status_code == 201, created.text
        session = created.json()
        await self.send_all(session, data)
        return await self.finalize(session)


def raw_client(bucket: S3Bucket) -> Any:
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=bucket.endpoint_url,
        region_name=bucket.region,
        aws_access_key_id=bucket.access_key_id,
        aws_secret_access_key=bucket.secret_access_key,
    )


def bucket_state(bucket: S3Bucket) -> tuple[list[str], list[str]]:
    """(object keys, keys of pending multipart uploads) in the bucket."""
    client = raw_client(bucket)
    objects = [o["Key"] for o in client.list_objects_v2(Bucket=bucket.name).get("Contents", [])]
    uploads = [u["Key"] for u in client.list_multipart_uploads(Bucket=bucket.name).get(
        "Uploads", [])]
    return sorted(objects), sorted(uploads)


@contextlib.asynccontextmanager
async def serving(bucket: S3Bucket) -> AsyncIterator[Site]:
    """The direct-upload app for a ``Trailer.video`` field on ``bucket``, under uvicorn."""
    storage = S3Storage(**bucket.options, prefix="media/", part_size=PART)

    class Trailer(Document):
        title = StringField()
        video = FileField(storage=storage, max_size=64 * 1024 * 1024,
                          allowed_content_types=["video/*", "application/octet-stream"])

    holder: dict[str, Site] = {}

    async def authorize(request: Any, intent: DirectUploadIntent) -> Any:
        if holder["site"].refuse:
            return None
        doc = await Trailer.objects(pk=intent.target.get("id")).first()
        return None if doc is None else (doc, "video")

    from starlette.applications import Starlette
    from starlette.routing import Mount

    app = Starlette(routes=[Mount("/uploads", direct_uploads_app(authorize,
                                                                 expires=3600))])
    counter = Counter(app)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(counter, log_level="warning", lifespan="off"))
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    while not server.started:
        assert not task.done(), task
        await asyncio.sleep(0.02)
    site = Site(f"http://127.0.0.1:{port}", counter, Trailer, bucket)
    holder["site"] = site
    try:
        yield site
    finally:
        await site.http.aclose()
        server.should_exit = True
        await task
        sock.close()
        await storage.blobs().aclose()  # type: ignore[attr-defined]


@pytest_asyncio.fixture
async def site(asyncassets_db: Any, asyncassets_s3_bucket: S3Bucket) -> AsyncIterator[Site]:
    async with serving(asyncassets_s3_bucket) as made:
        yield made


async def new_doc(site: Site) -> Any:
    doc = site.cls(title="t")
    await doc.save()
    return doc


def payload(size: int, seed: int = 1) -> bytes:
    block = hashlib.sha256(str(seed).encode()).digest() * 32
    return (block * (size // len(block) + 1))[:size]


async def reservations(db: Any) -> list[str]:
    return [r["key"] async for r in db[RESERVATIONS].find({})]


async def test_multipart_upload_is_byte_exact_referenced_and_verifiable(
    site: Site, asyncassets_db: Any
) -> None:
    doc = await new_doc(site)
    data = payload(2 * PART + 12345)
    reply = await site.upload(doc, data, content_type="video/mp4")
    assert reply.status_code == 200, reply.text
    answer = reply.json()
    assert answer["length"] == len(data) and answer["content_type"] == "video/mp4"
    loaded = await site.cls.objects(pk=doc.pk).first()
    assert str(loaded.video.grid_id) == answer["file_id"]
    assert await loaded.video.read() == data
    assert await loaded.video.verify() is True
    # Only this test's catalogue: classes other test modules keep at module level
    # (the examples') name storages this test does not own.
    report = await check(verify=True, buckets=loaded.video.collection_name)
    assert report.ok and report.checksum_mismatches == 0, report
    assert report.unverifiable == 0, report
    entry = await asyncassets_db[f"{loaded.video.collection_name}.files"].find_one()
    parts = [hashlib.sha256(data[i : i + PART]).digest() for i in range(0, len(data), PART)]
    assert entry["metadata"]["sha256_parts"] == {
        "part_size": PART, "sha256": hashlib.sha256(b"".join(parts)).hexdigest()}
    assert entry["location"]["version"]
    objects, uploads = bucket_state(site.bucket)
    assert objects == ["media/" + entry["location"]["key"]] and uploads == []
    # Finalizing again gives the same answer; nothing changes.
    session_id = (await asyncassets_db[SESSIONS].find_one())["_id"]
    again = await site.http.post(f"{site.url}/uploads/{session_id}/finalize")
    assert again.status_code == 200 and again.json() == answer
    assert await asyncassets_db[f"{loaded.video.collection_name}.files"].count_documents({}) == 1


async def test_small_file_is_one_presigned_post_read_back_for_its_sha256(
    site: Site, asyncassets_db: Any
) -> None:
    doc = await new_doc(site)
    data = payload(70_000, seed=2)
    created = await site.create(doc, data, sha256=hashlib.sha256(data).hexdigest())
    session = created.json()
    assert "post" in session and session["parts"] == 0
    await site.send_all(session, data)
    reply = await site.finalize(session)
    assert reply.status_code == 200, reply.text
    loaded = await site.cls.objects(pk=doc.pk).first()
    assert await loaded.video.read() == data
    assert loaded.video.sha256 == hashlib.sha256(data).hexdigest()


async def test_app_server_carries_a_few_hundred_bytes_per_part(site: Site) -> None:
    """The bytes through the app are per part, never per byte: measured here, they
    put a 1 GiB upload in 8 MiB parts (128 parts) far under 1 MB."""
    doc = await new_doc(site)
    data = payload(3 * PART, seed=3)
    before = site.counter.total
    reply = await site.upload(doc, data)
    assert reply.status_code == 200
    through_app = site.counter.total - before
    per_part = through_app / 3
    assert through_app < 10_000, through_app
    assert per_part * (1024 * 1024 * 1024 // (8 * 1024 * 1024)) < 1_000_000


async def test_wrong_length_is_refused_and_nothing_stays(
    site: Site, asyncassets_db: Any
) -> None:
    doc = await new_doc(site)
    data = payload(2 * PART + 10)
    created = await site.create(doc, data)
    session = created.json()
    # Part 2 is short: 2*PART bytes in all instead of the declared length.
    assert (await site.put_part(session, 1, data[:PART])).status_code == 200
    assert (await site.put_part(session, 2, data[PART : 2 * PART - 5])).status_code == 200
    assert (await site.put_part(session, 3, data[2 * PART :])).status_code == 200
    reply = await site.finalize(session)
    assert reply.status_code == 422
    assert "part 2 is" in reply.json()["error"] and "removed" in reply.json()["error"]
    assert bucket_state(site.bucket) == ([], [])
    assert await asyncassets_db[f"{doc.video.collection_name}.files"].count_documents({}) == 0
    assert await reservations(asyncassets_db) == []
    loaded = await site.cls.objects(pk=doc.pk).first()
    assert loaded.video.grid_id is None


async def test_a_missing_part_keeps_the_upload_open_until_it_is_sent(site: Site) -> None:
    doc = await new_doc(site)
    data = payload(PART + 99)
    session = (await site.create(doc, data)).json()
    assert (await site.put_part(session, 2, data[PART:])).status_code == 200
    reply = await site.finalize(session)
    assert reply.status_code == 409 and "parts missing: 1" in reply.json()["error"]
    assert (await site.put_part(session, 1, data[:PART])).status_code == 200
    reply = await site.finalize(session)
    assert reply.status_code == 200, reply.text
    loaded = await site.cls.objects(pk=doc.pk).first()
    assert await loaded.video.read() == data


async def test_a_part_whose_bytes_differ_from_its_signed_digest_is_refused(
    site: Site, asyncassets_db: Any
) -> None:
    doc = await new_doc(site)
    data = payload(PART + 7)
    session = (await site.create(doc, data)).json()
    await site.put_part(session, 1, data[:PART])
    # Signed for the right bytes, sent with others (a server that does not check
    # the header itself, like moto, stores them; the finalize must catch it).
    digest = base64.b64encode(hashlib.sha256(data[PART:]).digest()).decode()
    signed = (await site.http.post(f"{site.url}/uploads/{session['id']}/parts/2",
                                   json={"sha256": digest})).json()
    put = await site.http.put(signed["url"], content=b"X" * 7, headers=signed["headers"])
    if put.status_code == 200:
        reply = await site.finalize(session)
        assert reply.status_code == 422 and "digest" in reply.json()["error"]
    assert bucket_state(site.bucket)[0] == []
    assert await asyncassets_db[f"{doc.video.collection_name}.files"].count_documents({}) == 0


async def test_racing_finalizes_store_one_file(site: Site, asyncassets_db: Any) -> None:
    doc = await new_doc(site)
    data = payload(PART + 1)
    session = (await site.create(doc, data)).json()
    await site.send_all(session, data)
    replies = await asyncio.gather(*(site.finalize(session) for _ in range(3)))
    codes = sorted(r.status_code for r in replies)
    assert 200 in codes and set(codes) <= {200, 409}, [r.text for r in replies]
    ok = {r.json()["file_id"] for r in replies if r.status_code == 200}
    assert len(ok) == 1
    assert await asyncassets_db[f"{doc.video.collection_name}.files"].count_documents({}) == 1
    loaded = await site.cls.objects(pk=doc.pk).first()
    assert str(loaded.video.grid_id) in ok and await loaded.video.read() == data


async def test_finalize_racing_abort_one_wins(site: Site, asyncassets_db: Any) -> None:
    doc = await new_doc(site)
    data = payload(PART + 1)
    session = (await site.create(doc, data)).json()
    await site.send_all(session, data)
    fin, abort = await asyncio.gather(
        site.finalize(session), site.http.delete(f"{site.url}/uploads/{session['id']}")
    )
    files = await asyncassets_db[f"{doc.video.collection_name}.files"].count_documents({})
    objects, uploads = bucket_state(site.bucket)
    assert uploads == []
    if fin.status_code == 200:
        assert abort.status_code == 409 and files == 1 and len(objects) == 1
    else:
        assert abort.status_code == 204 and files == 0 and objects == []
        assert await reservations(asyncassets_db) == []


async def test_replacing_deletes_the_old_file_after_the_switch(
    site: Site, asyncassets_db: Any
) -> None:
    doc = await new_doc(site)
    await doc.video.put(b"old bytes", filename="old.bin")
    old = doc.video.grid_id
    data = payload(PART + 3)
    assert (await site.upload(doc, data)).status_code == 200
    loaded = await site.cls.objects(pk=doc.pk).first()
    assert loaded.video.grid_id != old and await loaded.video.read() == data
    files = asyncassets_db[f"{doc.video.collection_name}.files"]
    assert await files.find_one({"_id": old}) is None


async def test_hook_refusing_and_field_rules_create_nothing(
    site: Site, asyncassets_db: Any
) -> None:
    doc = await new_doc(site)
    site.refuse = True
    assert (await site.create(doc, 10)).status_code == 403
    site.refuse = False
    too_big = await site.create(doc, 65 * 1024 * 1024)
    assert too_big.status_code == 413 and "max_size" in too_big.json()["error"]
    bad_type = await site.create(doc, 10, filename="page.html", content_type="text/html")
    assert bad_type.status_code == 422 and "not allowed" in bad_type.json()["error"]
    assert (await site.http.post(f"{site.url}/uploads/", content=b"{")).status_code == 400
    assert (await site.create(doc, -1)).status_code == 400
    assert (await site.http.post(f"{site.url}/uploads/nope/finalize")).status_code == 404
    assert await asyncassets_db[SESSIONS].count_documents({}) == 0
    assert await reservations(asyncassets_db) == []
    assert bucket_state(site.bucket) == ([], [])


async def test_sniffed_type_not_allowed_is_removed_at_finalize(
    site: Site, asyncassets_db: Any
) -> None:
    doc = await new_doc(site)
    data = b"\x89PNG\r\n\x1a\n" + bytes(200)  # an image, named and declared as video
    reply = await site.upload(doc, data, filename="clip.mp4", content_type="video/mp4")
    assert reply.status_code == 422, reply.text
    assert bucket_state(site.bucket) == ([], [])
    assert await asyncassets_db[f"{doc.video.collection_name}.files"].count_documents({}) == 0


async def test_expired_session_is_swept_live_one_is_kept(
    site: Site, asyncassets_db: Any
) -> None:
    doc = await new_doc(site)
    data = payload(PART + 5)
    live = (await site.create(doc, data)).json()
    dead = (await site.create(doc, data)).json()
    await site.put_part(live, 1, data[:PART])
    await site.put_part(dead, 1, data[:PART])
    past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1)
    await asyncassets_db[SESSIONS].update_one({"_id": dead["id"]}, {"$set": {"expires": past}})
    report = await sweep_orphans(grace=0)
    assert report.uploads_aborted == 1
    _, uploads = bucket_state(site.bucket)
    assert uploads == ["media/" + live["key"]]
    assert await reservations(asyncassets_db) == [live["key"]]
    assert await asyncassets_db[SESSIONS].count_documents({}) == 1
    gone = await site.finalize(dead)
    assert gone.status_code == 404
    await site.put_part(live, 2, data[PART:])
    assert (await site.finalize(live)).status_code == 200


async def test_completion_applied_but_its_reply_lost_is_finished_by_the_next_finalize(
    site: Site, asyncassets_db: Any
) -> None:
    """A finalize whose process died after S3 completed the upload (the reply lost,
    the entry never inserted): the session is left "completing". The next finalize,
    once the lease ran out, finds the completed object carrying the session's
    token, and records it; nothing is lost, nothing stored twice."""
    doc = await new_doc(site)
    data = payload(PART + 11)
    session = (await site.create(doc, data)).json()
    await site.send_all(session, data)
    stored = await asyncassets_db[SESSIONS].find_one({"_id": session["id"]})
    client = raw_client(site.bucket)
    parts = client.list_parts(Bucket=site.bucket.name, Key="media/" + stored["key"],
                              UploadId=stored["upload_id"])["Parts"]
    client.complete_multipart_upload(
        Bucket=site.bucket.name, Key="media/" + stored["key"], UploadId=stored["upload_id"],
        MultipartUpload={"Parts": [{"PartNumber": p["PartNumber"], "ETag": p["ETag"]}
                                   for p in parts]},
    )
    long_ago = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=10)
    await asyncassets_db[SESSIONS].update_one(
        {"_id": session["id"]}, {"$set": {"state": "completing", "lease": "dead",
                                          "at": long_ago}})
    reply = await site.finalize(session)
    assert reply.status_code == 200, reply.text
    loaded = await site.cls.objects(pk=doc.pk).first()
    assert await loaded.video.read() == data
    assert bucket_state(site.bucket) == (["media/" + stored["key"]], [])


async def test_a_running_finalize_holds_the_session(site: Site, asyncassets_db: Any) -> None:
    doc = await new_doc(site)
    data = payload(PART + 11)
    session = (await site.create(doc, data)).json()
    await site.send_all(session, data)
    now = dt.datetime.now(dt.timezone.utc)
    await asyncassets_db[SESSIONS].update_one(
        {"_id": session["id"]}, {"$set": {"state": "completing", "lease": "x", "at": now}})
    reply = await site.finalize(session)
    assert reply.status_code == 409 and "another finalize" in reply.json()["error"]
    assert bucket_state(site.bucket)[1] == ["media/" + session["key"]]


@pytest.mark.parametrize("cuts", [(), (3,), (5, 10), (1, 2, 14, 22)])
def test_the_parts_digest_does_not_depend_on_how_the_bytes_arrive(cuts: tuple[int, ...]) -> None:
    from asyncassets.storage.catalogue import new_hasher
    from asyncassets.storage.objects.direct import composite_sha256

    data = payload(23)
    hasher = new_hasher("sha256-parts:5")
    edges = [0, *cuts, len(data)]
    for start, end in itertools.pairwise(edges):
        hasher.update(data[start:end])
    parts = [hashlib.sha256(data[i : i + 5]).digest() for i in range(0, len(data), 5)]
    assert hasher.hexdigest() == composite_sha256(parts)


async def test_s3_killed_mid_part_loses_nothing_acknowledged(
    asyncassets_db: Any, tmp_path: Any
) -> None:
    """moto (behind the write-ahead log of tests/_durable_s3.py, as a real S3 keeps
    what it acknowledged) is SIGKILLed while a part is on its way: that part's
    PUT fails, the part sent before survives the restart under the same upload
    id, the client sends the cut part again and finalizes; the file is
    byte-exact, and a sweep afterwards finds nothing to remove."""
    from _deployment import DurableS3

    from asyncassets.testing import FAKE_CREDENTIALS, create_bucket

    server = DurableS3(tmp_path / "s3.log").start()
    try:
        bucket = S3Bucket(name="durable-direct", endpoint_url=server.endpoint_url,
                          region="us-east-1", **FAKE_CREDENTIALS)
        create_bucket(bucket.name, bucket.endpoint_url, bucket.access_key_id,
                      bucket.secret_access_key, bucket.region)
        async with serving(bucket) as site:
            doc = await new_doc(site)
            data = payload(2 * PART + 321, seed=9)
            session = (await site.create(doc, data)).json()
            assert (await site.put_part(session, 1, data[:PART])).status_code == 200
            part = data[PART : 2 * PART]
            digest = base64.b64encode(hashlib.sha256(part).digest()).decode()
            signed = (await site.http.post(f"{site.url}/uploads/{session['id']}/parts/2",
                                           json={"sha256": digest})).json()

            async def slow_body() -> AsyncIterator[bytes]:
                for start in range(0, len(part), 256 * 1024):
                    yield part[start : start + 256 * 1024]
                    await asyncio.sleep(0.05)

            cut = asyncio.ensure_future(site.http.put(
                signed["url"], content=slow_body(),
                headers={**signed["headers"], "content-length": str(len(part))}))
            await asyncio.sleep(0.3)
            assert not cut.done()
            await asyncio.to_thread(server.kill)
            with pytest.raises(httpx.HTTPError):
                await cut
            await asyncio.to_thread(server.start)
            listed = (await site.http.get(f"{site.url}/uploads/{session['id']}/parts")).json()
            assert [p["PartNumber"] for p in listed] == [1]  # acknowledged: kept
            assert (await site.put_part(session, 2, part)).status_code == 200
            assert (await site.put_part(session, 3, data[2 * PART :])).status_code == 200
            reply = await site.finalize(session)
            assert reply.status_code == 200, reply.text
            loaded = await site.cls.objects(pk=doc.pk).first()
            assert await loaded.video.read() == data
            report = await sweep_orphans(grace=0)
            assert report.uploads_aborted == 0 and report.objects_deleted == 0, report
            assert bucket_state(bucket) == (["media/" + session["key"]], [])
    finally:
        server.stop()


async def test_s3_killed_mid_log_write_loses_no_later_write(
    asyncassets_db: Any, tmp_path: Any
) -> None:
    """Found by the direct race (``RACES_DIRECT_KILLS=12 -m slow``, seed 11: "parts
    missing: 1" at a finalize). A SIGKILL in the middle of the write-ahead log's
    ``write()`` of a part (megabytes of JSON; the kernel stops a large write at a
    fatal signal) leaves a line cut short. The replay skipped it, but the server
    then appended the next run's first write to that fragment, and the replay after
    the next kill skipped the glued line too: a part S3 had acknowledged was gone.
    Here the fragment is made by hand (the bytes such a kill leaves): the part
    acknowledged after it survives the next kill, and the upload finalizes."""
    from _deployment import DurableS3

    from asyncassets.testing import FAKE_CREDENTIALS, create_bucket

    log = tmp_path / "s3.log"
    server = DurableS3(log).start()
    try:
        bucket = S3Bucket(name="durable-cut", endpoint_url=server.endpoint_url,
                          region="us-east-1", **FAKE_CREDENTIALS)
        create_bucket(bucket.name, bucket.endpoint_url, bucket.access_key_id,
                      bucket.secret_access_key, bucket.region)
        async with serving(bucket) as site:
            doc = await new_doc(site)
            data = payload(PART + 321, seed=12)
            session = (await site.create(doc, data)).json()
            assert (await site.put_part(session, 1, data[:PART])).status_code == 200
            await asyncio.to_thread(server.kill)
            whole = log.read_bytes().splitlines(keepends=True)[-1]
            with open(log, "ab") as cut:  # noqa: ASYNC230 (a local file: instant)
                cut.write(whole[: len(whole) // 2])  # a resend of part 1, cut by the kill
            await asyncio.to_thread(server.start)
            assert (await site.put_part(session, 2, data[PART:])).status_code == 200
            await asyncio.to_thread(server.kill)
            await asyncio.to_thread(server.start)
            listed = (await site.http.get(f"{site.url}/uploads/{session['id']}/parts")).json()
            assert [p["PartNumber"] for p in listed] == [1, 2]  # both acknowledged: kept
            reply = await site.finalize(session)
            assert reply.status_code == 200, reply.text
            loaded = await site.cls.objects(pk=doc.pk).first()
            assert await loaded.video.read() == data
    finally:
        server.stop()


async def test_a_small_file_of_another_length_than_declared_is_removed(
    site: Site, asyncassets_db: Any
) -> None:
    doc = await new_doc(site)
    data = payload(1000, seed=4)
    session = (await site.create(doc, len(data) + 1)).json()
    post = session["post"]
    sent = await site.http.post(post["url"], data=post["fields"],
                                files={"file": ("clip.bin", data)})
    if sent.status_code in (200, 204):  # S3 enforces the policy's length; moto does not
        reply = await site.finalize(session)
        assert reply.status_code == 422 and "1000 bytes" in reply.json()["error"]
    assert bucket_state(site.bucket) == ([], [])
    assert await reservations(asyncassets_db) == []
    assert await asyncassets_db[f"{doc.video.collection_name}.files"].count_documents({}) == 0


async def test_an_abort_cut_by_the_storage_finishes_when_sent_again(
    site: Site, asyncassets_db: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by the direct race with S3 kills (``RACES_DIRECT_KILLS=12 -m slow``,
    seed 11: "neither finalize nor abort won"): an abort that claimed the session
    (``aborting``) and then found S3 down answered 503, "try again"; the abort sent
    again was refused (409 "the upload is aborting") and so was every finalize,
    leaving the parts and the key reserved until the session expired. Sent again,
    an abort now finishes the removal."""
    from asyncassets.errors import StorageError
    from asyncassets.storage.objects.direct import DirectUploads

    doc = await new_doc(site)
    data = payload(PART + 1)
    session = (await site.create(doc, data)).json()
    await site.send_all(session, data)
    real = DirectUploads._abort_upload
    failures = [StorageError("S3 is down", transient=True)]

    async def flaky(self: Any, key: str, upload_id: str) -> None:
        if failures:
            raise failures.pop()
        await real(self, key, upload_id)

    monkeypatch.setattr(DirectUploads, "_abort_upload", flaky)
    first = await site.http.delete(f"{site.url}/uploads/{session['id']}")
    assert first.status_code == 503, first.text
    assert bucket_state(site.bucket)[1] == ["media/" + session["key"]]  # not removed yet
    fin = await site.finalize(session)
    assert fin.status_code == 409 and "aborting" in fin.json()["error"]  # aborted is final
    again = await site.http.delete(f"{site.url}/uploads/{session['id']}")
    assert again.status_code == 204, again.text
    assert bucket_state(site.bucket) == ([], [])
    assert await reservations(asyncassets_db) == []
    assert (await asyncassets_db[SESSIONS].find_one({"_id": session["id"]}))["state"] == "aborted"
    fin = await site.finalize(session)
    assert fin.status_code == 409 and "aborted" in fin.json()["error"]


async def test_document_deleted_before_finalize_removes_the_upload(
    site: Site, asyncassets_db: Any
) -> None:
    doc = await new_doc(site)
    data = payload(PART + 1)
    session = (await site.create(doc, data)).json()
    await site.send_all(session, data)
    await doc.delete()
    reply = await site.finalize(session)
    assert reply.status_code == 410 and "gone" in reply.json()["error"]
    assert bucket_state(site.bucket) == ([], [])
    assert await reservations(asyncassets_db) == []
    parts = await site.http.get(f"{site.url}/uploads/{session['id']}/parts")
    assert parts.status_code == 409 and "aborted" in parts.json()["error"]


async def test_completion_whose_reply_is_lost_is_found_by_its_token(
    asyncassets_db: Any, asyncassets_s3_bucket: S3Bucket
) -> None:
    """S3 applies the CompleteMultipartUpload, and its reply is cut (an unknown
    outcome); the retry meets NoSuchUpload. The object carries the session's
    token, so the finalize knows it is its own and records it: one file, the
    bytes exact, no upload left."""
    import dataclasses

    from test_s3_blobs import FaultProxy

    port = int(asyncassets_s3_bucket.endpoint_url.rsplit(":", 1)[1].strip("/"))

    def cut_completion(seen: Any) -> tuple[str, float]:
        completes = seen.method == "POST" and "uploadId=" in seen.target
        return ("cut", 0) if completes else ("forward", 0)

    proxy = await FaultProxy(port, rule=cut_completion).start()
    try:
        bucket = dataclasses.replace(asyncassets_s3_bucket, endpoint_url=proxy.endpoint_url)
        async with serving(bucket) as site:
            doc = await new_doc(site)
            data = payload(PART + 77, seed=5)
            session = (await site.create(doc, data)).json()
            await site.send_all(session, data)
            reply = await site.finalize(session)
            assert reply.status_code == 200, reply.text
            assert sum(1 for s in proxy.seen
                       if s.method == "POST" and "uploadId=" in s.target) >= 1
            loaded = await site.cls.objects(pk=doc.pk).first()
            assert await loaded.video.read() == data
            # Straight to moto: a blocking client through the proxy would stall the
            # event loop the proxy runs on.
            assert bucket_state(asyncassets_s3_bucket) == (["media/" + session["key"]], [])
            files = asyncassets_db[f"{doc.video.collection_name}.files"]
            assert await files.count_documents({}) == 1
    finally:
        await proxy.close()


async def test_an_upload_in_progress_is_not_an_inconsistency(site: Site) -> None:
    doc = await new_doc(site)
    data = payload(PART + 5)
    session = (await site.create(doc, data)).json()
    await site.put_part(session, 1, data[:PART])
    report = await check(buckets=doc.video.collection_name)
    assert report.ok, report
    report = await sweep_orphans(grace=0, dry_run=True)
    assert report.uploads_aborted == 0 and report.reservations_released == 0, report
