"""Hostile tests of tus uploads written in place in a directory (a temp file beside
the reserved key, linked under it at the finish): racing writes, DELETE and the
sweep against writes and finishes, links and directories planted where the bytes
go, a foreign file at the reserved key, repeated keys, the document deleted, the
temp file cut or grown by hand, a server SIGKILLed mid-PATCH.

After each: byte-exact reads, no dangling reference, and after the upload expires
and a grace-0 sweep nothing is left (no temp file, object or reservation), and
``check(verify=True)`` is ok."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import os
from pathlib import Path
from typing import Any

import httpx
import pytest
from _tus import OCTETS, app_for, client, create, doc_class, metadata, patch, temp_files

import asyncassets
from asyncassets.storage import FileSystemStorage

CAT = "tus_attack"
LEASE = dt.timedelta(seconds=1)
MIB = 1024 * 1024


@pytest.fixture
async def setup(asyncassets_db: Any, tmp_path: Any) -> Any:
    root = tmp_path / "files"
    cls = doc_class(FileSystemStorage(root, collection_name=CAT, fsync=False))
    doc = cls(owner="ann")
    await doc.save()
    return cls, doc, root


def objects(root: Path) -> list[Path]:
    return sorted(p for p in Path(root).rglob("*") if p.is_file() or p.is_symlink())


async def expire_and_sweep(db: Any) -> Any:
    past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1)
    await db[f"{CAT}.uploads"].update_many({}, {"$set": {"expires": past}})
    return await asyncassets.sweep_orphans(grace=0, buckets=CAT)


async def nothing_left(db: Any, root: Path, *, kept: list[Path] = ()) -> None:
    """After expiry and a grace-0 sweep: only the objects of referenced files."""
    await expire_and_sweep(db)
    assert temp_files(root) == []
    named = {e["location"]["key"] async for e in db[f"{CAT}.files"].find({})}
    assert sorted(str(p.relative_to(root)) for p in objects(root)) == sorted(
        [str(p.relative_to(root)) for p in kept]) or {
        str(p.relative_to(root)) for p in objects(root)} == named
    reserved = {r["key"] async for r in db["asyncassets.keys"].find({})}
    assert reserved == named, (reserved, named)
    assert await db[f"{CAT}.uploads"].count_documents({}) == 0
    report = await asyncassets.check(verify=True, buckets=CAT)
    assert report.ok, str(report)


async def reference_ok(cls: Any, doc: Any, data: bytes | None) -> None:
    stored = await cls.objects(pk=doc.pk).first()
    if data is None:
        assert stored.file.grid_id is None
        return
    assert await stored.file.read() == data
    assert stored.file.sha256 == hashlib.sha256(data).hexdigest()


class Gate:
    """A request body sent in pieces, each after its event is set."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces
        self.go = [asyncio.Event() for _ in pieces]
        self.sent = [asyncio.Event() for _ in pieces]

    async def body(self):  # type: ignore[no-untyped-def]
        for piece, go, sent in zip(self.pieces, self.go, self.sent, strict=True):
            await go.wait()
            yield piece
            sent.set()


async def gated_patch(http: httpx.AsyncClient, location: str, offset: int, gate: Gate) -> Any:
    return await http.patch(location, headers={**OCTETS, "Upload-Offset": str(offset)},
                            content=gate.body())


async def until(predicate: Any, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


# -- racing writes ------------------------------------------------------------------


async def test_two_patches_racing_at_one_offset_one_wins_and_no_byte_is_lost(
    asyncassets_db, setup
):
    cls, doc, root = setup
    data = os.urandom(3 * MIB + 7)
    async with client(app_for(cls)) as http:
        location = (await create(http, doc, len(data))).headers["location"]
        assert (await patch(http, location, 0, data[:MIB])).status_code == 204
        first, second = await asyncio.gather(
            patch(http, location, MIB, data[MIB:2 * MIB]),
            patch(http, location, MIB, data[MIB:2 * MIB]),
        )
        assert sorted([first.status_code, second.status_code]) in ([204, 409], [204, 204]) or (
            first.status_code, second.status_code) == (204, 409), (first.text, second.text)
        offset = int((await http.head(location)).headers["upload-offset"])
        assert offset == 2 * MIB
        assert (await patch(http, location, offset, data[offset:])).status_code == 204
    await reference_ok(cls, doc, data)
    await nothing_left(asyncassets_db, root)


async def test_a_stalled_patch_whose_lease_ran_out_never_writes_into_the_finished_file(
    asyncassets_db, setup
):
    """A PATCH stalls (a slow client) past its lease with its temp file open; the
    client's retry takes the upload over at the same offset and finishes it (the
    temp file is linked under the key: it IS the object now). Then the stalled
    PATCH gets more bytes: they must not land in the committed object."""
    cls, doc, root = setup
    data = os.urandom(3 * MIB)
    garbage = b"\xee" * (2 * MIB)
    async with client(app_for(cls, lease=LEASE)) as http:
        location = (await create(http, doc, len(data))).headers["location"]
        # Its first MiB fills the writer's buffer: the temp file is open and written.
        gate = Gate([data[:MIB], garbage])
        gate.go[0].set()
        stalled = asyncio.ensure_future(gated_patch(http, location, 0, gate))
        await until(lambda: _some_temp(root))
        await asyncio.sleep(LEASE.total_seconds() * 1.6)
        retry = await patch(http, location, 0, data)
        assert retry.status_code == 204, retry.text
        await reference_ok(cls, doc, data)
        gate.go[1].set()
        answer = await stalled
        assert answer.status_code in (409, 410), answer.text
    await reference_ok(cls, doc, data)
    await nothing_left(asyncassets_db, root)


async def test_a_stalled_patch_never_writes_over_bytes_a_takeover_committed(
    asyncassets_db, setup
):
    """As above, but the takeover commits part of the upload only: the stalled
    write's later bytes must not overwrite what the offset says is durable."""
    cls, doc, root = setup
    data = os.urandom(4 * MIB)
    async with client(app_for(cls, lease=LEASE)) as http:
        location = (await create(http, doc, len(data))).headers["location"]
        gate = Gate([data[:MIB], b"\xee" * (2 * MIB)])
        gate.go[0].set()
        stalled = asyncio.ensure_future(gated_patch(http, location, 0, gate))
        await until(lambda: _some_temp(root))
        await asyncio.sleep(LEASE.total_seconds() * 1.6)
        assert (await patch(http, location, 0, data[:3 * MIB])).status_code == 204
        gate.go[1].set()
        assert (await stalled).status_code in (409, 410)
        assert (await patch(http, location, 3 * MIB, data[3 * MIB:])).status_code == 204
    await reference_ok(cls, doc, data)
    await nothing_left(asyncassets_db, root)


async def _some_temp(root: Path) -> bool:
    return any(p.stat().st_size > 0 for p in temp_files(root))


# -- DELETE racing a PATCH and the finish -------------------------------------------


async def test_delete_racing_a_patch_is_409_then_removes_everything(asyncassets_db, setup):
    cls, doc, root = setup
    data = os.urandom(2 * MIB)
    async with client(app_for(cls)) as http:
        location = (await create(http, doc, len(data))).headers["location"]
        gate = Gate([data[:MIB], data[MIB:MIB + 1000]])
        gate.go[0].set()
        writing = asyncio.ensure_future(gated_patch(http, location, 0, gate))
        await until(lambda: _some_temp(root))
        assert (await http.delete(location)).status_code == 409
        gate.go[1].set()
        assert (await writing).status_code == 204
        assert (await http.delete(location)).status_code == 204
        assert (await http.head(location)).status_code == 404
        assert (await patch(http, location, MIB + 1000, data[MIB + 1000:])).status_code == 404
    assert temp_files(root) == [] and objects(root) == []
    assert await asyncassets_db["asyncassets.keys"].count_documents({}) == 0
    await reference_ok(cls, doc, None)
    await nothing_left(asyncassets_db, root)


async def test_delete_racing_the_finish_never_leaves_a_file_with_bytes_missing(
    asyncassets_db, setup, monkeypatch
):
    from asyncassets.storage.objects import inplace

    cls, doc, root = setup
    data = os.urandom(MIB + 5)
    real = inplace.complete_in_place
    linked, resume = asyncio.Event(), asyncio.Event()

    async def slow(store: Any, session: Any, **kwargs: Any) -> Any:
        linked.set()
        await resume.wait()
        return await real(store, session, **kwargs)

    monkeypatch.setattr(inplace, "complete_in_place", slow)
    async with client(app_for(cls)) as http:
        location = (await create(http, doc, len(data))).headers["location"]
        finishing = asyncio.ensure_future(patch(http, location, 0, data))
        await linked.wait()
        deleting = await http.delete(location)
        resume.set()
        finished = await finishing
        assert (deleting.status_code, finished.status_code) in ((409, 204), (204, 410)), (
            deleting.text, finished.text)
        if finished.status_code == 204:
            assert (await http.delete(location)).status_code == 409
    await reference_ok(cls, doc, data if finished.status_code == 204 else None)
    await nothing_left(asyncassets_db, root)


# -- the sweep ----------------------------------------------------------------------


async def test_a_sweep_without_grace_during_a_slow_patch_keeps_its_bytes(
    asyncassets_db, setup
):
    cls, doc, root = setup
    data = os.urandom(3 * MIB)
    async with client(app_for(cls)) as http:
        location = (await create(http, doc, len(data))).headers["location"]
        gate = Gate([data[:MIB], data[MIB:]])
        gate.go[0].set()
        writing = asyncio.ensure_future(gated_patch(http, location, 0, gate))
        await until(lambda: _some_temp(root))
        [temp] = temp_files(root)
        os.utime(temp, (1, 1))
        # Old reservation too (by the sweep's clock): still the upload's.
        await asyncassets_db["asyncassets.keys"].update_many(
            {}, {"$set": {"at": dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc)}})
        report = await asyncassets.sweep_orphans(grace=0, buckets=CAT)
        assert report.temps_deleted == 0 and report.reservations_released == 0
        assert report.resumable_expired == 0
        gate.go[1].set()
        assert (await writing).status_code == 204
    await reference_ok(cls, doc, data)
    await nothing_left(asyncassets_db, root)


async def test_expiry_and_a_sweep_while_a_patch_streams(asyncassets_db, setup):
    """The upload expires while a PATCH holds it: the sweep leaves it (the write's
    lease); the PATCH ends either attaching the whole file or refusing cleanly."""
    cls, doc, root = setup
    data = os.urandom(2 * MIB + 3)
    async with client(app_for(cls)) as http:
        location = (await create(http, doc, len(data))).headers["location"]
        gate = Gate([data[:MIB], data[MIB:]])
        gate.go[0].set()
        writing = asyncio.ensure_future(gated_patch(http, location, 0, gate))
        await until(lambda: _some_temp(root))
        report = await expire_and_sweep(asyncassets_db)
        assert report.resumable_expired == 0
        assert len(temp_files(root)) == 1
        gate.go[1].set()
        answer = await writing
        assert answer.status_code in (204, 410), answer.text
    await reference_ok(cls, doc, data if answer.status_code == 204 else None)
    await nothing_left(asyncassets_db, root)


async def test_a_sweep_racing_the_finish_after_the_link(asyncassets_db, setup, monkeypatch):
    """The finish has linked the temp file under the key, not yet inserted the
    entry; a grace-0 sweep (even of an upload past its expiry) must leave it."""
    from asyncassets.storage.objects import filesystem

    cls, doc, root = setup
    data = os.urandom(MIB + 11)
    real = filesystem.ResumableFileWriter.commit
    linked, resume = asyncio.Event(), asyncio.Event()

    async def commit(self: Any, **kwargs: Any) -> None:
        await real(self, **kwargs)
        os.utime(root / self.key, ns=(1, (root / self.key).stat().st_mtime_ns))
        linked.set()
        await resume.wait()

    monkeypatch.setattr(filesystem.ResumableFileWriter, "commit", commit)
    async with client(app_for(cls)) as http:
        location = (await create(http, doc, len(data))).headers["location"]
        finishing = asyncio.ensure_future(patch(http, location, 0, data))
        await linked.wait()
        await asyncassets_db["asyncassets.keys"].update_many(
            {}, {"$set": {"at": dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc)}})
        report = await asyncassets.sweep_orphans(grace=0, buckets=CAT)
        assert report.objects_deleted == 0 and report.reservations_released == 0
        resume.set()
        assert (await finishing).status_code == 204
    await reference_ok(cls, doc, data)
    await nothing_left(asyncassets_db, root)


# -- links and directories planted -------------------------------------------------


def _temp_path_of(root: Path, session: dict[str, Any]) -> Path:
    from asyncassets.storage.objects.filesystem import resumable_temp_name

    key = session["key"]
    parts = key.split("/")
    return root.joinpath(*parts[:-1], resumable_temp_name(parts[-1], session["token"]))


@pytest.mark.parametrize("when", ["before the first byte", "after some bytes"])
async def test_a_link_planted_at_the_temp_path_is_never_followed(
    asyncassets_db, setup, tmp_path, when
):
    cls, doc, root = setup
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"precious")
    data = os.urandom(2 * MIB)
    async with client(app_for(cls)) as http:
        location = (await create(http, doc, len(data))).headers["location"]
        session = await asyncassets_db[f"{CAT}.uploads"].find_one({})
        temp = _temp_path_of(root, session)
        offset = 0
        if when == "after some bytes":
            assert (await patch(http, location, 0, data[:MIB])).status_code == 204
            offset = MIB
            temp.unlink()
        temp.parent.mkdir(parents=True, exist_ok=True)
        temp.symlink_to(outside)
        answer = await patch(http, location, offset, data[offset:])
        assert answer.status_code in (410, 503), answer.text
        assert outside.read_bytes() == b"precious"
        assert temp.is_symlink()
        temp.unlink()
    await reference_ok(cls, doc, None)
    assert outside.read_bytes() == b"precious"
    await nothing_left(asyncassets_db, root)


async def test_a_link_planted_at_the_keys_directory_is_never_followed(
    asyncassets_db, tmp_path
):
    root = tmp_path / "files"
    cls = doc_class(FileSystemStorage(root, collection_name=CAT, fsync=False,
                                      key_template="up/{filename}"))
    doc = cls(owner="ann")
    await doc.save()
    outside = tmp_path / "outside"
    outside.mkdir()
    data = os.urandom(MIB + 1)
    async with client(app_for(cls)) as http:
        location = (await create(http, doc, len(data), filename="a.bin")).headers["location"]
        assert (await patch(http, location, 0, data[:1000])).status_code == 204
        # The directory moved out of the root, a link to it left in its place.
        (root / "up").rename(outside / "up")
        (root / "up").symlink_to(outside / "up")
        answer = await patch(http, location, 1000, data[1000:])
        assert answer.status_code in (410, 503), answer.text
        assert not (outside / "up" / "a.bin").exists()
        (root / "up").unlink()
    await reference_ok(cls, doc, None)
    assert [p.name for p in (outside / "up").iterdir()] != ["a.bin"]
    await nothing_left(asyncassets_db, root)


async def test_a_directory_planted_at_the_temp_path(asyncassets_db, setup):
    cls, doc, root = setup
    data = os.urandom(1000)
    async with client(app_for(cls)) as http:
        location = (await create(http, doc, len(data))).headers["location"]
        session = await asyncassets_db[f"{CAT}.uploads"].find_one({})
        temp = _temp_path_of(root, session)
        temp.mkdir(parents=True)
        answer = await patch(http, location, 0, data)
        assert answer.status_code in (410, 503), answer.text
        assert temp.is_dir()
        temp.rmdir()
    await reference_ok(cls, doc, None)
    await nothing_left(asyncassets_db, root)


@pytest.mark.parametrize("planted", ["file", "link", "directory"])
async def test_a_foreign_object_at_the_reserved_key_is_never_overwritten(
    asyncassets_db, setup, tmp_path, planted
):
    cls, doc, root = setup
    data = os.urandom(MIB + 3)
    async with client(app_for(cls)) as http:
        location = (await create(http, doc, len(data))).headers["location"]
        assert (await patch(http, location, 0, data[:1000])).status_code == 204
        key = (await asyncassets_db[f"{CAT}.uploads"].find_one({}))["key"]
        target = root / key
        if planted == "file":
            target.write_bytes(b"foreign")
        elif planted == "link":
            (tmp_path / "elsewhere").write_bytes(b"foreign")
            target.symlink_to(tmp_path / "elsewhere")
        else:
            target.mkdir()
        answer = await patch(http, location, 1000, data[1000:])
        assert answer.status_code in (409, 410), answer.text
        assert "key" in answer.text
        if planted == "file":
            assert target.read_bytes() == b"foreign"
        elif planted == "link":
            assert target.is_symlink() and (tmp_path / "elsewhere").read_bytes() == b"foreign"
        else:
            assert target.is_dir()
    await reference_ok(cls, doc, None)
    assert temp_files(root) == []
    assert await asyncassets_db["asyncassets.keys"].count_documents({}) == 0
    if planted == "directory":
        target.rmdir()
    elif planted == "link":
        target.unlink()
    await nothing_left(asyncassets_db, root)


# -- repeated keys -----------------------------------------------------------------


async def test_two_uploads_and_a_put_of_one_filename_get_their_own_bytes(
    asyncassets_db, tmp_path
):
    root = tmp_path / "files"
    cls = doc_class(FileSystemStorage(root, collection_name=CAT, fsync=False,
                                      key_template="{filename}"))
    docs = [cls(owner="ann") for _ in range(3)]
    for doc in docs:
        await doc.save()
    datas = [os.urandom(MIB + i) for i in range(3)]
    async with client(app_for(cls)) as http:
        locations = [
            (await create(http, doc, len(data), filename="same.bin")).headers["location"]
            for doc, data in zip(docs[:2], datas[:2], strict=True)
        ]
        halves = [patch(http, loc, 0, data[:1000]) for loc, data in
                  zip(locations, datas[:2], strict=True)]
        assert [r.status_code for r in await asyncio.gather(*halves)] == [204, 204]
        put = docs[2].file.put(datas[2], filename="same.bin")
        rests = [patch(http, loc, 1000, data[1000:]) for loc, data in
                 zip(locations, datas[:2], strict=True)]
        results = await asyncio.gather(put, *rests)
        assert [r.status_code for r in results[1:]] == [204, 204]
        await docs[2].save()
    keys = set()
    for doc, data in zip(docs, datas, strict=True):
        await reference_ok(cls, doc, data)
        stored = await cls.objects(pk=doc.pk).first()
        entry = await asyncassets_db[f"{CAT}.files"].find_one({"_id": stored.file.grid_id})
        keys.add(entry["location"]["key"])
        assert (root / entry["location"]["key"]).read_bytes() == data
    assert len(keys) == 3
    await nothing_left(asyncassets_db, root)


# -- the document deleted, the temp file changed by hand ----------------------------


async def test_the_document_deleted_before_the_finish(asyncassets_db, setup):
    cls, doc, root = setup
    data = os.urandom(MIB + 9)
    async with client(app_for(cls)) as http:
        location = (await create(http, doc, len(data))).headers["location"]
        assert (await patch(http, location, 0, data[:1000])).status_code == 204
        await doc.delete()
        answer = await patch(http, location, 1000, data[1000:])
        assert answer.status_code == 410, answer.text
        again = await patch(http, location, len(data), b"")
        assert again.status_code == 410, again.text
    assert await asyncassets_db[f"{CAT}.files"].count_documents({}) == 0
    await nothing_left(asyncassets_db, root)


async def test_a_temp_file_cut_short_by_hand_is_never_stored_with_a_hole(
    asyncassets_db, setup
):
    """The temp file loses bytes below the durable offset (truncated by hand, a
    disk repaired): the next write must not fill the gap with zeros and store a
    file whose bytes are not the ones sent."""
    cls, doc, root = setup
    data = os.urandom(2 * MIB)
    async with client(app_for(cls)) as http:
        location = (await create(http, doc, len(data))).headers["location"]
        assert (await patch(http, location, 0, data[:MIB])).status_code == 204
        [temp] = temp_files(root)
        os.truncate(temp, 1000)
        answer = await patch(http, location, MIB, data[MIB:])
        assert answer.status_code in (410, 503), answer.text
    stored = await cls.objects(pk=doc.pk).first()
    if stored.file.grid_id is not None:
        assert await stored.file.read() == data
    await nothing_left(asyncassets_db, root)


async def test_a_temp_file_grown_by_hand_is_refused_at_the_finish_and_cleared(
    asyncassets_db, setup
):
    cls, doc, root = setup
    data = os.urandom(MIB + 100)
    async with client(app_for(cls)) as http:
        location = (await create(http, doc, len(data))).headers["location"]
        assert (await patch(http, location, 0, data[:MIB])).status_code == 204
        [temp] = temp_files(root)
        with temp.open("ab") as out:
            out.write(b"x" * 5000)
        answer = await patch(http, location, MIB, data[MIB:])
        # A clear, final answer: the bytes are not the upload's any more.
        assert answer.status_code == 410, answer.text
        again = await patch(http, location, len(data), b"")
        assert again.status_code in (404, 410), again.text
    await reference_ok(cls, doc, None)
    await nothing_left(asyncassets_db, root)


# -- the server SIGKILLed mid-PATCH -------------------------------------------------


async def test_the_server_killed_mid_patch_keeps_a_durable_offset_and_resumes_exact(
    asyncassets_db, asyncassets_server_uri, tmp_path
):
    """A PATCH streams slowly (its offset is recorded as it goes, by time); the
    server is SIGKILLed mid-body. Restarted, the offset it reports is on the disk,
    and resuming from it stores the exact bytes."""
    import time

    from test_tus_faults import Server, invariants, storage_for

    from asyncassets import Document
    from asyncassets.fields import FileField
    from asyncassets.testing import database_uri

    storage, where, env = storage_for("filesystem", tmp_path, None)
    root = Path(where)

    class TusFaultDoc(Document):
        file = FileField(storage=storage)
        meta = {"collection": "tus_fault_docs"}

    server = Server(database_uri(asyncassets_server_uri, asyncassets_db.name), "filesystem",
                    where, env)
    server.start()
    try:
        doc = TusFaultDoc()
        await doc.save()
        data = os.urandom(6 * MIB + 77)
        headers = {"Tus-Resumable": "1.0.0"}
        async with httpx.AsyncClient(headers=headers, timeout=30) as http:
            made = await http.post(server.url, headers={
                "Upload-Length": str(len(data)),
                "Upload-Metadata": metadata(doc=str(doc.pk)),
            })
            assert made.status_code == 201, made.text
            location = made.headers["location"]

            async def body():  # type: ignore[no-untyped-def]
                for start in range(0, 4 * MIB, MIB // 4):
                    yield data[start:start + MIB // 4]
                    await asyncio.sleep(0.25)  # the lease is 2 s: renewed by time
                server.kill()
                yield data[4 * MIB:4 * MIB + 1000]

            with pytest.raises(httpx.HTTPError):
                await http.patch(location, headers={**OCTETS, "Upload-Offset": "0"},
                                 content=body())
            server.start()
            offset = int((await http.head(location)).headers["upload-offset"])
            assert 0 < offset <= 4 * MIB
            [temp] = temp_files(root)
            assert temp.read_bytes()[:offset] == data[:offset]
            deadline = time.monotonic() + 10
            while True:  # the dead PATCH's lease (2 s) runs out
                answer = await http.patch(
                    location, headers={**OCTETS, "Upload-Offset": str(offset)},
                    content=data[offset:])
                if answer.status_code != 409 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.3)
            assert answer.status_code == 204, answer.text
        await invariants(TusFaultDoc, doc, data, asyncassets_db)
        await expire_and_sweep_catalogue(asyncassets_db, "tusfaults")
        assert temp_files(root) == []
        assert await asyncassets_db["tusfaults.uploads"].count_documents({}) == 0
        assert await asyncassets_db["asyncassets.keys"].count_documents({}) == 1
    finally:
        server.kill()


async def expire_and_sweep_catalogue(db: Any, catalogue: str) -> Any:
    past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1)
    await db[f"{catalogue}.uploads"].update_many({}, {"$set": {"expires": past}})
    return await asyncassets.sweep_orphans(grace=0, buckets=catalogue)


async def test_a_finish_that_stalled_past_its_lease_never_touches_the_file_a_retry_attached(
    asyncassets_db, setup, monkeypatch
):
    """A finish opens the temp file and stalls (cut off from MongoDB: its lease is
    not renewed); the client's retried last PATCH takes the upload over and
    attaches it (the temp file's inode is the object now). When the stalled finish
    goes on, it must not restamp, link or remove that object."""
    from pymongo.errors import AutoReconnect

    from asyncassets.storage.objects import filesystem
    from asyncassets.storage.resumable import UploadSessions

    cls, doc, root = setup
    data = os.urandom(MIB + 21)
    real_commit = filesystem.ResumableFileWriter.commit
    real_renew = UploadSessions.renew
    opened, resume = asyncio.Event(), asyncio.Event()
    calls = []

    async def commit(self: Any, **kwargs: Any) -> None:
        calls.append(self)
        if len(calls) == 1:
            await self._send([], "opening")  # what the real commit does first
            opened.set()
            await resume.wait()
        await real_commit(self, **kwargs)

    async def renew(self: Any, upload_id: str, token: str) -> None:
        if opened.is_set() and not resume.is_set():
            raise AutoReconnect("cut off")
        await real_renew(self, upload_id, token)

    monkeypatch.setattr(filesystem.ResumableFileWriter, "commit", commit)
    monkeypatch.setattr(UploadSessions, "renew", renew)
    async with client(app_for(cls, lease=LEASE)) as http:
        location = (await create(http, doc, len(data))).headers["location"]
        stalled = asyncio.ensure_future(patch(http, location, 0, data))
        await opened.wait()
        await asyncio.sleep(LEASE.total_seconds() * 1.6)
        retry = await patch(http, location, len(data), b"")
        assert retry.status_code == 204, retry.text
        await reference_ok(cls, doc, data)
        await asyncio.sleep(1.1)  # a version stamped now is another second's
        resume.set()
        late = await stalled
        assert late.status_code in (204, 409, 410, 503), late.text
    await reference_ok(cls, doc, data)
    await nothing_left(asyncassets_db, root)


# -- more -----------------------------------------------------------------------------


async def test_a_put_to_the_field_during_the_upload_wins_and_the_upload_leaves_nothing(
    asyncassets_db, setup
):
    cls, doc, root = setup
    data, other = os.urandom(MIB + 1), os.urandom(5000)
    async with client(app_for(cls)) as http:
        location = (await create(http, doc, len(data))).headers["location"]
        assert (await patch(http, location, 0, data[:1000])).status_code == 204
        mine = await cls.objects(pk=doc.pk).first()
        await mine.file.put(other, filename="o.bin")
        await mine.save()
        answer = await patch(http, location, 1000, data[1000:])
        assert answer.status_code in (204, 409), answer.text
    await reference_ok(cls, doc, data if answer.status_code == 204 else other)
    await nothing_left(asyncassets_db, root)


async def test_a_bad_checksum_then_the_right_bytes_store_the_right_sha256(
    asyncassets_db, setup
):
    from _tus import sha256_header

    cls, doc, root = setup
    data = os.urandom(2 * MIB + 5)
    wrong = bytes(b ^ 0xFF for b in data[MIB:])
    async with client(app_for(cls)) as http:
        location = (await create(http, doc, len(data))).headers["location"]
        assert (await patch(http, location, 0, data[:MIB])).status_code == 204
        bad = await patch(http, location, MIB, wrong,
                          **{"Upload-Checksum": sha256_header(data[MIB:])})
        assert bad.status_code == 460, bad.text
        assert (await http.head(location)).headers["upload-offset"] == str(MIB)
        good = await patch(http, location, MIB, data[MIB:],
                           **{"Upload-Checksum": sha256_header(data[MIB:])})
        assert good.status_code == 204, good.text
    await reference_ok(cls, doc, data)
    await nothing_left(asyncassets_db, root)


async def test_an_empty_upload_with_a_repeating_key(asyncassets_db, tmp_path):
    root = tmp_path / "files"
    cls = doc_class(FileSystemStorage(root, collection_name=CAT, fsync=False,
                                      key_template="{filename}"))
    docs = [cls(owner="ann") for _ in range(2)]
    for doc in docs:
        await doc.save()
    async with client(app_for(cls)) as http:
        made = await asyncio.gather(*(create(http, doc, 0, filename="e.bin") for doc in docs))
        assert [r.status_code for r in made] == [201, 201]
    for doc in docs:
        await reference_ok(cls, doc, b"")
    await nothing_left(asyncassets_db, root)


async def test_a_stored_file_named_like_a_temp_file_is_not_swept_as_one(
    asyncassets_db, tmp_path
):
    """With ``{filename}`` keys a user names the object: a name shaped like an
    upload's temp file (``.<name>.<16 hex>.part``) must stay a file to the sweep."""
    root = tmp_path / "files"
    cls = doc_class(FileSystemStorage(root, collection_name=CAT, fsync=False,
                                      key_template="{filename}"))
    doc = cls(owner="ann")
    await doc.save()
    await doc.file.put(b"mine", filename=".clip.0123456789abcdef.part")
    await doc.save()
    report = await asyncassets.sweep_orphans(grace=0, buckets=CAT)
    assert report.temps_deleted == 0
    await reference_ok(cls, doc, b"mine")
    await nothing_left(asyncassets_db, root)


async def test_a_sweep_between_the_key_reservation_and_the_session_insert(
    asyncassets_db, setup, monkeypatch
):
    """Creation reserves the key, then inserts the session: a grace-0 sweep that
    lists live uploads between the two must not release the key of the upload."""
    cls, doc, root = setup
    data = os.urandom(MIB + 2)
    reserved, resume = asyncio.Event(), asyncio.Event()

    from asyncassets.storage.objects import inplace

    real_start = inplace.start_in_place

    async def start(store: Any, **kwargs: Any) -> Any:
        out = await real_start(store, **kwargs)
        reserved.set()
        await resume.wait()
        return out

    monkeypatch.setattr(inplace, "start_in_place", start)
    async with client(app_for(cls)) as http:
        creating = asyncio.ensure_future(create(http, doc, len(data)))
        await reserved.wait()
        await asyncio.sleep(0.05)
        await asyncassets.sweep_orphans(grace=0, buckets=CAT)
        resume.set()
        location = (await creating).headers["location"]
        assert await asyncassets_db["asyncassets.keys"].count_documents({}) == 1
        answer = await patch(http, location, 0, data)
        assert answer.status_code == 204, answer.text
    await reference_ok(cls, doc, data)
    await nothing_left(asyncassets_db, root)


@pytest.mark.xfail(strict=True, reason=(
    "The temp file is opened again by name at each PATCH and at the finish; nothing "
    "records which file it was (no inode or content check in the session), and the "
    "running SHA-256 is of the bytes sent, not of the file. A file of the same size "
    "put at the temp path by hand is stored as the upload (204), its entry "
    "claiming the sent bytes' SHA-256 (check(verify=True) finds it corrupt later). "
    "Fix: record the temp file's (st_dev, st_ino) in the session at the first "
    "write and refuse (StoredObjectMissing: 410) a temp file that is another"))
async def test_a_temp_file_replaced_by_hand_is_never_stored_as_the_upload(
    asyncassets_db, setup
):
    """Another file of the same size put at the temp path between two PATCHes: the
    upload's first bytes are not in it any more."""
    cls, doc, root = setup
    data = os.urandom(2 * MIB)
    async with client(app_for(cls)) as http:
        location = (await create(http, doc, len(data))).headers["location"]
        assert (await patch(http, location, 0, data[:MIB])).status_code == 204
        [temp] = temp_files(root)
        temp.unlink()
        temp.write_bytes(b"\x01" * MIB)
        answer = await patch(http, location, MIB, data[MIB:])
    stored = await cls.objects(pk=doc.pk).first()
    if stored.file.grid_id is not None:
        # Digests, not the bytes: pytest's diff of two unequal 2 MiB byte strings
        # runs for hours (difflib), and this test is expected to fail here.
        got = await stored.file.read()
        assert hashlib.sha256(got).hexdigest() == hashlib.sha256(data).hexdigest()
    else:
        assert answer.status_code in (410, 503), answer.text
    await nothing_left(asyncassets_db, root)


async def test_the_sweep_of_an_expired_upload_whose_directory_became_a_link(
    asyncassets_db, tmp_path
):
    """The key's directory replaced by a link (to a directory outside the root)
    while the upload waits: the sweep of the expired upload follows nothing,
    removes nothing outside, and neither fails nor leaves the session behind."""
    root = tmp_path / "files"
    cls = doc_class(FileSystemStorage(root, collection_name=CAT, fsync=False,
                                      key_template="up/{filename}"))
    doc = cls(owner="ann")
    await doc.save()
    outside = tmp_path / "outside"
    outside.mkdir()
    async with client(app_for(cls)) as http:
        location = (await create(http, doc, 5000, filename="a.bin")).headers["location"]
        assert (await patch(http, location, 0, b"a" * 1000)).status_code == 204
    (root / "up").rename(outside / "up")
    (root / "up").symlink_to(outside / "up")
    [temp] = list((outside / "up").iterdir())
    report = await expire_and_sweep(asyncassets_db)
    assert report.resumable_expired == 1
    assert temp.exists() and temp.read_bytes() == b"a" * 1000  # outside: untouched
    assert await asyncassets_db[f"{CAT}.uploads"].count_documents({}) == 0
    assert await asyncassets_db["asyncassets.keys"].count_documents({}) == 0
    (root / "up").unlink()
    await nothing_left(asyncassets_db, root)


@pytest.mark.parametrize("how", ["removed", "cut short"])
async def test_a_temp_file_lost_before_the_first_bytes_were_sniffed(asyncassets_db, setup, how):
    """The next PATCH reads the first bytes back to sniff them whole: a temp file
    removed or cut short meanwhile is a clean 410, the upload dropped."""
    cls, doc, root = setup
    data = os.urandom(10_000)
    async with client(app_for(cls)) as http:
        location = (await create(http, doc, len(data))).headers["location"]
        assert (await patch(http, location, 0, data[:100])).status_code == 204
        [temp] = temp_files(root)
        if how == "removed":
            temp.unlink()
        else:
            os.truncate(temp, 0)
        answer = await patch(http, location, 100, data[100:])
        assert answer.status_code == 410, answer.text
        assert (await http.head(location)).status_code == 404
    await reference_ok(cls, doc, None)
    await nothing_left(asyncassets_db, root)


async def test_a_temp_file_lost_before_a_retried_finish(asyncassets_db, setup, monkeypatch):
    """The finish failed (503) before putting the file in place; the temp file is
    removed by hand; the retried last PATCH is a clean 410, the upload dropped."""
    from pymongo.errors import AutoReconnect

    from asyncassets.storage.objects import inplace

    cls, doc, root = setup
    data = os.urandom(3000)
    real = inplace.complete_in_place
    failures = [AutoReconnect("down")]

    async def flaky(*args: Any, **kwargs: Any) -> Any:
        if failures:
            raise failures.pop()
        return await real(*args, **kwargs)

    monkeypatch.setattr(inplace, "complete_in_place", flaky)
    async with client(app_for(cls)) as http:
        location = (await create(http, doc, len(data))).headers["location"]
        assert (await patch(http, location, 0, data)).status_code == 503
        [temp] = temp_files(root)
        temp.unlink()
        again = await patch(http, location, len(data), b"")
        assert again.status_code == 410, again.text
    await reference_ok(cls, doc, None)
    await nothing_left(asyncassets_db, root)


async def test_two_retried_finishes_in_two_processes_attach_one_file(
    asyncassets_db, setup, monkeypatch
):
    """The first finish failed before the link; two servers (each its own sessions,
    no running hash) get the retried last PATCH at once: one file, byte-exact."""
    from pymongo.errors import AutoReconnect

    from asyncassets.storage.objects import inplace

    cls, doc, root = setup
    data = os.urandom(2 * MIB + 1)
    real = inplace.complete_in_place
    failures = [AutoReconnect("down")]

    async def flaky(*args: Any, **kwargs: Any) -> Any:
        if failures:
            raise failures.pop()
        await asyncio.sleep(0.05)
        return await real(*args, **kwargs)

    monkeypatch.setattr(inplace, "complete_in_place", flaky)
    async with client(app_for(cls)) as first, client(app_for(cls)) as second:
        location = (await create(first, doc, len(data))).headers["location"]
        assert (await patch(first, location, 0, data)).status_code == 503
        answers = await asyncio.gather(patch(first, location, len(data), b""),
                                       patch(second, location, len(data), b""))
        codes = sorted(a.status_code for a in answers)
        assert codes in ([204, 204], [204, 409]), [a.text for a in answers]
        assert (await patch(second, location, len(data), b"")).status_code == 204
    await reference_ok(cls, doc, data)
    assert await asyncassets_db[f"{CAT}.files"].count_documents({}) == 1
    await nothing_left(asyncassets_db, root)


async def test_uploads_deletes_and_puts_under_a_sweep_without_grace_in_a_loop(
    asyncassets_db, tmp_path
):
    """Uploads of one filename (some deleted midway) beside stored files of that
    name, and a grace-0 sweep running all along: each document ends with its own
    bytes or none."""
    import random

    root = tmp_path / "files"
    cls = doc_class(FileSystemStorage(root, collection_name=CAT, fsync=False,
                                      key_template="{filename}"))
    rng = random.Random(7)
    docs = [cls(owner="ann") for _ in range(8)]
    for doc in docs:
        await doc.save()
    datas = [os.urandom(rng.randrange(1, 600_000)) for _ in docs]
    expected: dict[int, bytes | None] = {}
    stop = asyncio.Event()

    async def sweeping() -> None:
        while not stop.is_set():
            await asyncassets.sweep_orphans(grace=0, buckets=CAT)
            await asyncio.sleep(0.005)

    async def upload(i: int, http: httpx.AsyncClient) -> None:
        data = datas[i]
        if i % 4 == 3:
            # A put saved later than a grace-0 sweep may lose its file (documented:
            # docs/guarantees.rst): the puts are made before the sweep starts.
            return
        location = (await create(http, docs[i], len(data), filename="same.bin")
                    ).headers["location"]
        offset = 0
        cuts = sorted(rng.sample(range(1, len(data) + 1), min(3, len(data))))
        for n, cut in enumerate([*cuts, len(data)]):
            if i % 4 == 2 and n == 2:
                assert (await http.delete(location)).status_code == 204
                expected[i] = None
                return
            answer = await patch(http, location, offset, data[offset:cut])
            assert answer.status_code == 204, answer.text
            offset = cut
            await asyncio.sleep(rng.random() * 0.02)
        expected[i] = data

    for i in range(3, len(docs), 4):
        await docs[i].file.put(datas[i], filename="same.bin")
        await docs[i].save()
        expected[i] = datas[i]
    async with client(app_for(cls)) as http:
        sweeper = asyncio.ensure_future(sweeping())
        try:
            await asyncio.gather(*(upload(i, http) for i in range(len(docs))))
        finally:
            stop.set()
            await sweeper
    for i, doc in enumerate(docs):
        await reference_ok(cls, doc, expected[i])
    await nothing_left(asyncassets_db, root)


async def test_a_sweep_without_grace_between_the_entry_and_the_switch(
    asyncassets_db, setup, monkeypatch
):
    """The finish has inserted the file's entry, not yet moved the document's
    reference to it: a grace-0 sweep must not take the entry for an orphan (the
    upload's session names it), or the 204 leaves a dangling reference."""
    from asyncassets.files.proxy import FileProxy

    cls, doc, root = setup
    data = os.urandom(MIB + 13)
    real = FileProxy.adopt
    inserted, resume = asyncio.Event(), asyncio.Event()

    async def adopt(self: Any, *args: Any, **kwargs: Any) -> Any:
        inserted.set()
        await resume.wait()
        return await real(self, *args, **kwargs)

    monkeypatch.setattr(FileProxy, "adopt", adopt)
    async with client(app_for(cls)) as http:
        location = (await create(http, doc, len(data))).headers["location"]
        finishing = asyncio.ensure_future(patch(http, location, 0, data))
        await inserted.wait()
        await asyncio.sleep(0.01)  # the entry is older than the sweep's cutoff
        report = await asyncassets.sweep_orphans(grace=0, buckets=CAT)
        assert report.files_deleted == 0
        resume.set()
        assert (await finishing).status_code == 204
    await reference_ok(cls, doc, data)
    await nothing_left(asyncassets_db, root)


async def test_racing_duplicate_and_stalling_patches_under_a_sweep_without_grace(
    asyncassets_db, tmp_path
):
    """Clients resuming from HEAD, sending each piece once or twice at once, some
    stalling past the lease mid-body, a grace-0 sweep all along: byte-exact."""
    import random

    root = tmp_path / "files"
    cls = doc_class(FileSystemStorage(root, collection_name=CAT, fsync=False,
                                      key_template="{filename}"))
    rng = random.Random(11)
    docs = [cls(owner="ann") for _ in range(6)]
    for doc in docs:
        await doc.save()
    datas = [os.urandom(rng.randrange(1, 3 * MIB)) for _ in docs]
    stop = asyncio.Event()

    async def sweeping() -> None:
        while not stop.is_set():
            await asyncassets.sweep_orphans(grace=0, buckets=CAT)
            await asyncio.sleep(0.01)

    async def slow_body(data: bytes, pause: float):  # type: ignore[no-untyped-def]
        half = len(data) // 2
        yield data[:half]
        await asyncio.sleep(pause)
        yield data[half:]

    async def upload(i: int, http: httpx.AsyncClient) -> None:
        data = datas[i]
        location = (await create(http, docs[i], len(data), filename="same.bin")
                    ).headers["location"]
        for _ in range(200):
            head = await http.head(location)
            offset = int(head.headers["upload-offset"])
            if offset == len(data):
                answer = await patch(http, location, offset, b"")
                if answer.status_code == 204:
                    return
                await asyncio.sleep(0.2)
                continue
            cut = min(len(data), offset + rng.randrange(1, MIB))
            piece = data[offset:cut]
            racers = [http.patch(location, headers={**OCTETS, "Upload-Offset": str(offset)},
                                 content=slow_body(piece, rng.choice([0, 0, 0.3, 1.5])))
                      for _ in range(rng.choice([1, 2, 2]))]
            for answer in await asyncio.gather(*racers):
                assert answer.status_code in (204, 409), answer.text
            await asyncio.sleep(rng.random() * 0.05)
        raise AssertionError("never finished")

    async with client(app_for(cls, lease=LEASE)) as http:
        sweeper = asyncio.ensure_future(sweeping())
        try:
            await asyncio.gather(*(upload(i, http) for i in range(len(docs))))
        finally:
            stop.set()
            await sweeper
    for i, doc in enumerate(docs):
        await reference_ok(cls, doc, datas[i])
    await nothing_left(asyncassets_db, root)


async def test_check_during_a_paused_upload_and_mid_finish_finds_nothing_wrong(
    asyncassets_db, setup, monkeypatch
):
    from asyncassets.files.proxy import FileProxy

    cls, doc, root = setup
    data = os.urandom(MIB + 3)
    real = FileProxy.adopt
    inserted, resume = asyncio.Event(), asyncio.Event()

    async def adopt(self: Any, *args: Any, **kwargs: Any) -> Any:
        inserted.set()
        await resume.wait()
        return await real(self, *args, **kwargs)

    monkeypatch.setattr(FileProxy, "adopt", adopt)
    async with client(app_for(cls)) as http:
        location = (await create(http, doc, len(data))).headers["location"]
        assert (await patch(http, location, 0, data[:1000])).status_code == 204
        report = await asyncassets.check(verify=True, buckets=CAT)
        assert report.ok, str(report)
        finishing = asyncio.ensure_future(patch(http, location, 1000, data[1000:]))
        await inserted.wait()
        report = await asyncassets.check(verify=True, buckets=CAT)
        resume.set()
        assert (await finishing).status_code == 204
        assert report.ok, str(report)
    await reference_ok(cls, doc, data)
    await nothing_left(asyncassets_db, root)
