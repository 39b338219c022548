"""tus as a hostile client uses it: the field's rules and the catalogue hold
whatever the order and the size of the requests."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import pytest
from _tus import app_for, client, create, doc_class, make_storage, patch

from asyncassets.errors import UploadLocked, UploadNotFound, UploadOffsetMismatch
from asyncassets.storage.resumable import UploadSessions

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 600


def catalogue(cls: Any) -> str:
    return str(cls._fields["file"].storage.collection_name)


async def leftovers(db: Any, cls: Any) -> tuple[int, int]:
    """Sessions, and chunks of unfinished uploads (staged, or in the bucket with
    no files document)."""
    name = catalogue(cls)
    files = [d["_id"] async for d in db[f"{name}.files"].find({}, {"_id": 1})]
    headless = await db[f"{name}.chunks"].count_documents({"files_id": {"$nin": files}})
    staged = await db[f"{name}.uploads.staged"].count_documents({})
    return await db[f"{name}.uploads"].count_documents({}), headless + staged


@pytest.fixture(params=["gridfs", "filesystem"])
async def png_field(asyncassets_db, request, tmp_path):
    cls = doc_class(make_storage(request.param, request, tmp_path), max_size=100_000,
                    allowed_content_types=["image/png"])
    doc = cls(owner="ann")
    await doc.save()
    return cls, doc


async def test_the_first_bytes_are_sniffed_even_when_the_first_patch_is_one_byte(
    asyncassets_db, png_field
):
    # A field taking PNG only; the client declares a PNG, sends "G" alone, then
    # the rest of a GIF: the first 512 bytes are sniffed as they arrive, however cut.
    cls, doc = png_field
    gif = b"GIF89a" + b"\0" * 2000
    async with client(app_for(cls)) as http:
        created = await create(http, doc, len(gif) + 10_000, filename="a.png",
                               filetype="image/png")
        location = created.headers["location"]
        assert (await patch(http, location, 0, gif[:1])).status_code == 204
        answer = await patch(http, location, 1, gif[1:])
        assert answer.status_code == 415, answer.text
        assert (await http.head(location)).status_code == 404
    assert await leftovers(asyncassets_db, cls) == (0, 0)


async def test_a_png_sent_a_few_bytes_at_a_time_is_taken(asyncassets_db, png_field):
    cls, doc = png_field
    async with client(app_for(cls)) as http:
        location = (await create(http, doc, len(PNG), filename="a.png")).headers["location"]
        for start, end in ((0, 3), (3, 9), (9, 400), (400, len(PNG))):
            answer = await patch(http, location, start, PNG[start:end])
            assert answer.status_code == 204, answer.text
    assert await (await cls.objects(pk=doc.pk).first()).file.read() == PNG


@pytest.mark.parametrize("kind", ["gridfs", "filesystem"])
async def test_an_empty_file_is_attached_at_its_creation(asyncassets_db, request, tmp_path, kind):
    # tus-js-client and Uppy send no PATCH for a file of 0 bytes: the POST is all.
    cls = doc_class(make_storage(kind, request, tmp_path))
    doc = cls(owner="ann")
    await doc.save()
    async with client(app_for(cls)) as http:
        answer = await create(http, doc, 0, filename="empty.txt")
        assert answer.status_code == 201, answer.text
        assert answer.headers["upload-offset"] == "0"
    stored = await cls.objects(pk=doc.pk).first()
    assert stored.file.grid_id is not None
    assert await stored.file.read() == b""
    assert stored.file.filename == "empty.txt"


@pytest.mark.parametrize("kind", ["gridfs", "filesystem"])
async def test_creation_with_more_bytes_than_declared_is_413_and_leaves_nothing(
    asyncassets_db, request, tmp_path, kind
):
    # No Location in a 413: an upload created anyway would be out of anyone's reach.
    cls = doc_class(make_storage(kind, request, tmp_path))
    doc = cls(owner="ann")
    await doc.save()
    async with client(app_for(cls, chunk_size=1024)) as http:
        answer = await create(http, doc, 10, content=b"x" * 5000, filename="a.txt")
    assert answer.status_code == 413, answer.text
    assert await leftovers(asyncassets_db, cls) == (0, 0)
    assert (await cls.objects(pk=doc.pk).first()).file.grid_id is None


@pytest.mark.parametrize(
    "length",
    ["1e3", "+5", "0x10", "5.0", "5 5", "\u0665".encode(), "18446744073709551616"],
)
async def test_hostile_upload_lengths_create_nothing(
    asyncassets_db, request, tmp_path, length
):
    cls = doc_class(make_storage("gridfs", request, tmp_path))
    doc = cls(owner="ann")
    await doc.save()
    async with client(app_for(cls)) as http:
        answer = await create(http, doc, 0, headers={"Upload-Length": length})
    assert answer.status_code in (400, 413), answer.text
    assert await leftovers(asyncassets_db, cls) == (0, 0)


async def test_termination_racing_a_write_never_leaves_bytes_behind(asyncassets_db):
    # DELETE and PATCH of one upload at once, in two requests: either the write
    # wins (the terminate is refused, the bytes are the session's) or the
    # terminate does (no session, and no byte of the write stays).
    sessions = UploadSessions(asyncassets_db, "tusrace", chunk_size=16)
    expires = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)

    async def pieces() -> Any:
        for _ in range(8):
            yield b"y" * 64
            await asyncio.sleep(0)

    outcomes = set()
    for _ in range(25):
        session = await sessions.create(length=10_000, expires=expires)
        upload_id = session["_id"]
        ended = await asyncio.gather(
            sessions.terminate(upload_id), sessions.write(upload_id, 0, pieces()),
            return_exceptions=True,
        )
        terminated, written = ended
        left = await sessions.sessions.find_one({"_id": upload_id})
        chunks = await sessions.chunks.count_documents({"upload": upload_id})
        if terminated is None:
            outcomes.add("terminated")
            assert isinstance(written, (UploadLocked, UploadNotFound, UploadOffsetMismatch)), \
                written
            assert left is None and chunks == 0
        else:
            outcomes.add("written")
            assert isinstance(terminated, UploadLocked), terminated
            assert left is not None and left["offset"] == 512 and chunks == 32
            await sessions.remove(upload_id)
    assert outcomes


async def test_a_declared_html_or_svg_upload_is_never_served_inline(asyncassets_db, request,
                                                                    tmp_path):
    # Sniffing takes markup for text, so the declared type is kept; serving's
    # allowlists decide what a browser is shown, whatever the upload declared.
    from starlette.applications import Starlette
    from starlette.routing import Route

    from asyncassets.web import FileResponse

    cls = doc_class(make_storage("gridfs", request, tmp_path))
    svg = b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>'

    async def serve(req: Any) -> Any:
        doc = await cls.objects.get(pk=req.path_params["pk"])
        return FileResponse(doc.file, req)

    site = Starlette(routes=[Route("/f/{pk}", serve)])
    async with client(app_for(cls)) as http, client(site) as browser:
        for name, declared in (("x.svg", "image/svg+xml"), ("x.html", "text/html")):
            doc = cls(owner="ann")
            await doc.save()
            location = (await create(http, doc, len(svg), filename=name,
                                     filetype=declared)).headers["location"]
            assert (await patch(http, location, 0, svg[:1])).status_code == 204
            assert (await patch(http, location, 1, svg[1:])).status_code == 204
            served = await browser.get(f"/f/{doc.pk}")
            assert served.content == svg
            assert served.headers["content-disposition"].startswith("attachment")
            assert served.headers["content-type"] == "application/octet-stream"
            assert served.headers["content-security-policy"] == "sandbox"


async def test_the_sweep_racing_the_finish_of_an_upload_never_leaves_a_file_without_bytes(
    asyncassets_db, request, tmp_path
):
    # The last PATCH lands as the upload expires: the sweep (which lists it as
    # expired and unleased) and the finish run at once. Either the finish wins
    # and the file has every byte, or the sweep does and there is no file at all.
    from asyncassets.ops.reports import SweepReport
    from asyncassets.ops.resumable import sweep_resumable

    cls = doc_class(make_storage("gridfs", request, tmp_path))
    bucket = cls(owner="ann").file._bucket()
    name = catalogue(cls)
    sessions = UploadSessions(asyncassets_db, name)
    data = b"z" * (3 * bucket.chunk_size + 17)

    async def pieces() -> Any:
        yield data

    async def finish(upload_id: str) -> Any:
        session = await sessions.begin_finish(upload_id)
        return await sessions.complete_in_bucket(session, bucket, filename="f", metadata={})

    outcomes = set()
    for _ in range(20):
        soon = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)
        session = await sessions.create(length=len(data), expires=soon, into=bucket)
        await sessions.write(session["_id"], 0, pieces())
        past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1)
        await sessions.sessions.update_one({"_id": session["_id"]}, {"$set": {"expires": past}})
        _, finished = await asyncio.gather(
            sweep_resumable(asyncassets_db, name, dry_run=False, report=SweepReport(
                False, dt.timedelta(0), dt.datetime.now(dt.timezone.utc))),
            finish(session["_id"]), return_exceptions=True,
        )
        chunks = await asyncassets_db[f"{name}.chunks"].count_documents(
            {"files_id": session["file_id"]})
        files = await asyncassets_db[f"{name}.files"].count_documents(
            {"_id": session["file_id"]})
        if isinstance(finished, BaseException):
            outcomes.add(type(finished).__name__)
            assert (files, chunks) == (0, 0), finished
        else:
            outcomes.add("finished")
            assert (files, chunks) == (1, 4)
    assert outcomes


async def test_writes_past_max_writes_are_503_and_memory_per_write_is_bounded(
    asyncassets_db, request, tmp_path
):
    # Many uploads in flight at once: each write holds a bounded amount of memory
    # (the docs say about 13 MiB), and max_writes bounds how many there are.
    import tracemalloc

    cls = doc_class(make_storage("filesystem", request, tmp_path))
    docs = [cls(owner="ann") for _ in range(3)]
    for doc in docs:
        await doc.save()
    size, piece = 8 * 1024 * 1024, 64 * 1024
    release, both_writing = asyncio.Event(), asyncio.Event()
    writing: list[int] = []

    async def body(wait: bool) -> Any:
        for n in range(size // piece):
            if wait and n == 1:
                # The app took the first piece: its write runs.
                writing.append(n)
                if len(writing) == 2:
                    both_writing.set()
                await release.wait()
            yield b"w" * piece

    async with client(app_for(cls, max_writes=2)) as http:
        locations = [(await create(http, doc, size, filename="w.bin")).headers["location"]
                     for doc in docs]
        tracemalloc.start()
        try:
            writes = [asyncio.ensure_future(patch(http, where, 0, body(True)))
                      for where in locations[:2]]
            await asyncio.wait_for(both_writing.wait(), 30)
            third = await patch(http, locations[2], 0, b"x")
            assert third.status_code == 503, third.text
            assert third.headers["retry-after"]
            release.set()
            assert [(await w).status_code for w in writes] == [204, 204]
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak / 2 < 16 * 1024 * 1024, peak
        assert (await patch(http, locations[2], 0, b"x" * size)).status_code == 204
    for doc in docs:
        assert (await cls.objects(pk=doc.pk).first()).file.length == size



@pytest.mark.parametrize("kind", ["gridfs", "filesystem"])
async def test_two_retried_last_patches_at_once_attach_the_file_once(
    asyncassets_db, request, tmp_path, kind
):
    # The finish failed (the document was away); two clients (or a client and
    # its retry) send the last PATCH again at once: one file, intact, referenced.
    cls = doc_class(make_storage(kind, request, tmp_path))
    doc = cls(owner="ann")
    await doc.save()
    data = b"retried " * 100_000
    async with client(app_for(cls)) as http:
        location = (await create(http, doc, len(data), filename="r.bin")).headers["location"]
        assert (await patch(http, location, 0, data[:1000])).status_code == 204
        await asyncassets_db[cls._get_collection_name()].delete_one({"_id": doc.pk})
        assert (await patch(http, location, 1000, data[1000:])).status_code == 410
        await asyncassets_db[cls._get_collection_name()].insert_one(
            {"_id": doc.pk, "owner": "ann"})
        answers = await asyncio.gather(*(patch(http, location, len(data), b"")
                                         for _ in range(3)))
        codes = sorted(a.status_code for a in answers)
        assert 204 in codes and set(codes) <= {204, 409}, [a.text for a in answers]
        # Whoever got 409 retries and finds it attached.
        assert (await patch(http, location, len(data), b"")).status_code == 204
    stored = await cls.objects(pk=doc.pk).first()
    assert await stored.file.read() == data
    files = asyncassets_db[f"{catalogue(cls)}.files"]
    assert await files.count_documents({}) == 1


async def test_a_finished_upload_is_never_attached_again(asyncassets_db, request, tmp_path):
    # The file was replaced by another request after the upload finished; the
    # client's last PATCH, replayed, does not bring the old upload back.
    cls = doc_class(make_storage("gridfs", request, tmp_path))
    doc = cls(owner="ann")
    await doc.save()
    async with client(app_for(cls)) as http:
        location = (await create(http, doc, 5, content=b"first")).headers["location"]
        loaded = await cls.objects(pk=doc.pk).first()
        await loaded.file.replace(b"second")
        assert (await patch(http, location, 5, b"")).status_code == 204
        assert (await patch(http, location, 0, b"first")).status_code == 409
        assert (await http.delete(location)).status_code == 409
    assert await (await cls.objects(pk=doc.pk).first()).file.read() == b"second"
    assert await asyncassets_db[f"{catalogue(cls)}.files"].count_documents({}) == 1


async def test_a_finisher_that_died_holds_the_upload_only_until_its_lease_runs_out(
    asyncassets_db, request, tmp_path
):
    # A server killed while it attached leaves the finish's lease: retries are
    # 409 until it runs out, then the retried last PATCH attaches the file.
    cls = doc_class(make_storage("gridfs", request, tmp_path))
    doc = cls(owner="ann")
    await doc.save()
    data = b"d" * 5000
    lease = dt.timedelta(seconds=0.5)
    async with client(app_for(cls, lease=lease)) as http:
        location = (await create(http, doc, len(data))).headers["location"]
        assert (await patch(http, location, 0, data[:1000])).status_code == 204
        await asyncassets_db[cls._get_collection_name()].delete_one({"_id": doc.pk})
        assert (await patch(http, location, 1000, data[1000:])).status_code == 410
        await asyncassets_db[cls._get_collection_name()].insert_one(
            {"_id": doc.pk, "owner": "ann"})
        # A finisher in another process takes the upload, then dies.
        dead = UploadSessions(asyncassets_db, catalogue(cls), lease=lease)
        await dead.begin_finish(location.rsplit("/", 1)[1])
        assert (await patch(http, location, len(data), b"")).status_code == 409
        await asyncio.sleep(0.6)
        assert (await patch(http, location, len(data), b"")).status_code == 204
    assert await (await cls.objects(pk=doc.pk).first()).file.read() == data
