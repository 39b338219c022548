"""tus DELETE (termination): the upload and its staged bytes go; nothing is attached."""

from __future__ import annotations

import asyncio

import pytest
from _tus import app_for, client, create, doc_class, make_storage, patch, temp_files

from asyncassets.storage import FileSystemStorage, GridFSStorage
from asyncassets.storage.resumable import UploadSessions


@pytest.fixture
async def setup(asyncassets_db, request, tmp_path):
    cls = doc_class(make_storage("gridfs", request, tmp_path))
    doc = cls(owner="ann")
    await doc.save()
    return cls, doc


@pytest.mark.parametrize("kind", ["gridfs", "filesystem"])
async def test_termination_removes_the_session_and_its_bytes(asyncassets_db, tmp_path, kind):
    # 1000-byte chunks: in the bucket's chunks (GridFS) or staged (a directory).
    name = f"tus_term_{kind}"
    cls = doc_class(GridFSStorage(name, chunk_size=1000) if kind == "gridfs"
                    else FileSystemStorage(tmp_path, collection_name=name))
    doc = cls(owner="ann")
    await doc.save()
    where = f"{name}.chunks" if kind == "gridfs" else f"{name}.uploads.staged"
    async with client(app_for(cls, chunk_size=1000)) as http:
        location = (await create(http, doc, 10_000)).headers["location"]
        assert (await patch(http, location, 0, b"y" * 4500)).status_code == 204
        if kind == "gridfs":
            assert await asyncassets_db[where].count_documents({}) == 4
        else:
            # Written in place, beside the key it reserved.
            [temp] = temp_files(tmp_path)
            assert temp.read_bytes() == b"y" * 4500
            assert await asyncassets_db["asyncassets.keys"].count_documents({}) == 1
        answer = await http.delete(location)
        assert answer.status_code == 204
        assert answer.headers["tus-resumable"] == "1.0.0"
        assert (await http.head(location)).status_code == 404
        assert (await patch(http, location, 4500, b"y")).status_code == 404
        assert (await http.delete(location)).status_code == 404
    assert await asyncassets_db[f"{name}.uploads"].count_documents({}) == 0
    assert await asyncassets_db[where].count_documents({}) == 0
    assert await asyncassets_db[f"{name}.files"].count_documents({}) == 0
    assert (await cls.objects(pk=doc.pk).first()).file.grid_id is None
    if kind == "filesystem":
        assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
        assert await asyncassets_db["asyncassets.keys"].count_documents({}) == 0


async def test_a_finished_upload_cannot_be_terminated(setup):
    cls, doc = setup
    async with client(app_for(cls)) as http:
        location = (await create(http, doc, 3, content=b"abc")).headers["location"]
        assert (await http.delete(location)).status_code == 409
    stored = await cls.objects(pk=doc.pk).first()
    assert await stored.file.read() == b"abc"


@pytest.mark.parametrize("kind", ["gridfs", "filesystem"])
async def test_a_write_cannot_start_once_a_termination_took_the_upload(
    asyncassets_db, tmp_path, kind, monkeypatch
):
    """The race suite's case (tests/test_races_uploads.py, seed 11 under ``slow``):
    a DELETE checked the upload (open, no write), then the last PATCH took it,
    finished it and attached it, then the DELETE removed it and answered 204 too,
    on GridFS removing chunks of the file being attached. Held between its
    decision and the removal, the DELETE must have the upload already: the PATCH
    is refused, nothing is attached, nothing stays."""
    name = f"tus_term_race_{kind}"
    cls = doc_class(GridFSStorage(name, chunk_size=1000) if kind == "gridfs"
                    else FileSystemStorage(tmp_path, collection_name=name))
    doc = cls(owner="ann")
    await doc.save()
    held, go = asyncio.Event(), asyncio.Event()
    remove = UploadSessions.remove

    async def held_remove(self, upload_id, session=None):
        held.set()
        await go.wait()
        await remove(self, upload_id, session)

    monkeypatch.setattr(UploadSessions, "remove", held_remove)
    async with client(app_for(cls, chunk_size=1000)) as http:
        location = (await create(http, doc, 10_000)).headers["location"]
        assert (await patch(http, location, 0, b"y" * 4500)).status_code == 204
        deleting = asyncio.ensure_future(http.delete(location))
        await held.wait()
        last = await patch(http, location, 4500, b"y" * 5500)
        go.set()
        assert (await deleting).status_code == 204
        assert last.status_code in (404, 410), last.text
        assert (await http.head(location)).status_code == 404
    assert (await cls.objects(pk=doc.pk).first()).file.grid_id is None
    for left in ("uploads", "uploads.staged", "files", "chunks"):
        assert await asyncassets_db[f"{name}.{left}"].count_documents({}) == 0, left


async def test_a_delete_that_a_finish_overtook_is_409_and_the_file_stays(
    asyncassets_db, tmp_path, monkeypatch
):
    """The race suite's other case (seed 11 under ``slow``, a directory and S3): the
    DELETE found the upload open, the last PATCH attached it meanwhile, then the
    DELETE answered 204 as if it had terminated it. A completed upload is 409."""
    name = "tus_term_done"
    cls = doc_class(FileSystemStorage(tmp_path, collection_name=name))
    doc = cls(owner="ann")
    await doc.save()
    held, go = asyncio.Event(), asyncio.Event()
    terminate = UploadSessions.terminate

    async def held_terminate(self, upload_id):
        held.set()
        await go.wait()
        await terminate(self, upload_id)

    monkeypatch.setattr(UploadSessions, "terminate", held_terminate)
    async with client(app_for(cls, chunk_size=1000)) as http:
        location = (await create(http, doc, 3000)).headers["location"]
        assert (await patch(http, location, 0, b"y" * 1500)).status_code == 204
        deleting = asyncio.ensure_future(http.delete(location))
        await held.wait()
        assert (await patch(http, location, 1500, b"y" * 1500)).status_code == 204
        go.set()
        answer = await deleting
        assert answer.status_code == 409 and "complete" in answer.text, answer.text
    assert await (await cls.objects(pk=doc.pk).first()).file.read() == b"y" * 3000
