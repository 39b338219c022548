"""tus DELETE (termination): the upload and its staged bytes go; nothing is attached."""

from __future__ import annotations

import pytest
from _tus import app_for, client, create, doc_class, make_storage, patch

from asyncassets.storage import FileSystemStorage, GridFSStorage


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
        assert await asyncassets_db[where].count_documents({}) == 4
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


async def test_a_finished_upload_cannot_be_terminated(setup):
    cls, doc = setup
    async with client(app_for(cls)) as http:
        location = (await create(http, doc, 3, content=b"abc")).headers["location"]
        assert (await http.delete(location)).status_code == 409
    stored = await cls.objects(pk=doc.pk).first()
    assert await stored.file.read() == b"abc"
