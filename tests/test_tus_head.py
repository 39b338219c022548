"""tus HEAD: the durable offset, the length, the expiry; unknown, expired, refused."""

from __future__ import annotations

import datetime as dt

import pytest
from _tus import app_for, client, create, doc_class, make_storage, metadata, patch


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
