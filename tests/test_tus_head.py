"""tus HEAD: the durable offset, the length, the expiry; unknown, expired, refused."""

from __future__ import annotations

import datetime as dt
import os
from typing import Any

import pytest
from _tus import STORAGES, app_for, client, create, doc_class, make_storage, metadata, patch


@pytest.fixture
async def setup(asyncassets_db, request, tmp_path):
    cls = doc_class(make_storage("gridfs", request, tmp_path))
    doc = cls(owner="ann")
    await doc.save()
    return cls, doc


async def test_head_reports_the_durable_offset_and_the_metadata(setup):
    cls, doc = setup
    async with client(app_for(cls, chunk_size=1000)) as http:
        location = (await create(http, doc, 5000, filename="f.bin")).headers["location"]
        assert (await patch(http, location, 0, b"x" * 2500)).status_code == 204
        head = await http.head(location)
    assert head.status_code == 200
    assert head.headers["upload-offset"] == "2500"
    assert head.headers["upload-length"] == "5000"
    assert head.headers["cache-control"] == "no-store"
    assert head.headers["upload-metadata"] == metadata(filename="f.bin", doc=str(doc.pk))


async def test_an_unknown_upload_is_404(setup):
    cls, _ = setup
    async with client(app_for(cls)) as http:
        for path in (f"/uploads/default/{cls._fields['file'].storage.collection_name}/"
                     + "0" * 32,
                     "/uploads/default/no-such-catalogue/" + "0" * 32,
                     "/uploads/default/x",
                     "/uploads/default/x/y/z"):
            assert (await http.head(path)).status_code == 404, path


async def test_an_expired_upload_is_410(asyncassets_db, setup):
    cls, doc = setup
    async with client(app_for(cls)) as http:
        location = (await create(http, doc, 10)).headers["location"]
        upload_id = location.rsplit("/", 1)[1]
        sessions = asyncassets_db[f"{cls._fields['file'].storage.collection_name}.uploads"]
        past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1)
        await sessions.update_one({"_id": upload_id}, {"$set": {"expires": past}})
        assert (await http.head(location)).status_code == 410
        assert (await patch(http, location, 0, b"abc")).status_code == 410


async def test_another_user_is_refused_on_every_method(setup):
    cls, doc = setup
    async with client(app_for(cls)) as http:
        location = (await create(http, doc, 10)).headers["location"]
        other = {"X-User": "mallory"}
        assert (await http.head(location, headers=other)).status_code == 403
        assert (await patch(http, location, 0, b"abc", **other)).status_code == 403
        assert (await http.delete(location, headers=other)).status_code == 403
        assert (await http.head(location)).headers["upload-offset"] == "0"


@pytest.fixture(params=STORAGES)
async def any_storage(asyncassets_db, request, tmp_path):
    cls = doc_class(make_storage(request.param, request, tmp_path))
    doc = cls(owner="ann")
    await doc.save()
    return cls, doc


async def test_head_attaches_a_complete_upload_whose_finish_failed(any_storage, monkeypatch):
    """Found by the long tus race on S3 (a moto kill at a finish): the last PATCH
    was 503, and a client resuming (tuspy, tus-js-client) reads HEAD, sees every
    byte in and stops, so the upload was never attached. HEAD attaches it first."""
    from pymongo.errors import AutoReconnect

    from asyncassets.files.proxy import FileProxy

    cls, doc = any_storage
    data = os.urandom(300_000)
    real = FileProxy.adopt
    failures = [AutoReconnect("cut after the switch was sent")]

    async def flaky(self: Any, files_doc: Any) -> Any:
        if failures:
            raise failures.pop()
        return await real(self, files_doc)

    monkeypatch.setattr(FileProxy, "adopt", flaky)
    async with client(app_for(cls)) as http:
        location = (await create(http, doc, len(data))).headers["location"]
        assert (await patch(http, location, 0, data)).status_code == 503
        assert (await cls.objects(pk=doc.pk).first()).file.grid_id is None
        head = await http.head(location)
        assert head.status_code == 200, head.text
        assert head.headers["upload-offset"] == str(len(data))
        # Attached once: HEAD again and the last PATCH again change nothing.
        stored = await cls.objects(pk=doc.pk).first()
        assert await stored.file.read() == data
        file_id = stored.file.grid_id
        assert (await http.head(location)).status_code == 200
        assert (await patch(http, location, len(data), b"")).status_code == 204
    assert (await cls.objects(pk=doc.pk).first()).file.grid_id == file_id


async def test_head_of_a_complete_upload_another_request_holds_is_503(setup):
    cls, doc = setup
    name = cls._fields["file"].storage.collection_name
    async with client(app_for(cls)) as http:
        location = (await create(http, doc, 10)).headers["location"]
        assert (await patch(http, location, 0, b"x" * 10, **{
            "Upload-Checksum": "sha256 " + "A" * 43 + "="})).status_code == 460
        upload_id = location.rsplit("/", 1)[1]
        db = cls._get_db()
        # Every byte in, a finish holding the lease (another process's, say).
        until = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=30)
        await db[f"{name}.uploads"].update_one({"_id": upload_id}, {"$set": {
            "offset": 10, "state": "finishing", "lease": {"token": "t", "until": until}}})
        head = await http.head(location)
    assert head.status_code == 503
    assert head.headers["retry-after"] == "1"
