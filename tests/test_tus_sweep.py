"""Resumable uploads and the sweep: abandoned ones go, live ones are never orphans."""

from __future__ import annotations

import datetime as dt
import hashlib
import os

import pytest
from _tus import STORAGES, app_for, client, create, doc_class, make_storage, patch

import asyncassets


@pytest.fixture(params=STORAGES)
async def setup(asyncassets_db, request, tmp_path):
    cls = doc_class(make_storage(request.param, request, tmp_path))
    doc = cls(owner="ann")
    await doc.save()
    return cls, doc


async def leftovers(db, cls) -> dict[str, int]:
    name = cls._fields["file"].storage.collection_name
    return {
        "sessions": await db[f"{name}.uploads"].count_documents({}),
        "staged": await db[f"{name}.uploads.staged"].count_documents({}),
        "chunks": await db[f"{name}.chunks"].count_documents({}),
        "files": await db[f"{name}.files"].count_documents({}),
    }


async def test_a_live_upload_is_never_an_orphan_and_an_expired_one_is_swept(
    asyncassets_db, setup
):
    cls, doc = setup
    name = cls._fields["file"].storage.collection_name
    data = os.urandom(300_000)
    async with client(app_for(cls, chunk_size=64 * 1024)) as http:
        location = (await create(http, doc, len(data) * 2)).headers["location"]
        assert (await patch(http, location, 0, data)).status_code == 204
        # Live: neither the check nor a sweep without grace sees an orphan.
        assert (await asyncassets.check(buckets=name)).ok
        report = await asyncassets.sweep_orphans(grace=0, buckets=name)
        assert report.chunks_deleted == 0 and report.resumable_expired == 0
        assert (await http.head(location)).headers["upload-offset"] == str(len(data))
        # Abandoned: past its expiry the sweep removes it and every byte of it.
        past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1)
        await asyncassets_db[f"{name}.uploads"].update_many({}, {"$set": {"expires": past}})
        dry = await asyncassets.sweep_orphans(grace=0, dry_run=True, buckets=name)
        assert dry.resumable_expired == 1
        report = await asyncassets.sweep_orphans(grace=0, buckets=name)
        assert report.resumable_expired == 1
        assert "expired resumable uploads deleted: 1" in str(report)
        assert (await http.head(location)).status_code == 404
    assert await leftovers(asyncassets_db, cls) == {
        "sessions": 0, "staged": 0, "chunks": 0, "files": 0}
    assert (await asyncassets.check(buckets=name)).ok


async def test_a_finished_upload_survives_the_sweep_of_its_expired_session(asyncassets_db, setup):
    cls, doc = setup
    name = cls._fields["file"].storage.collection_name
    data = os.urandom(200_000)
    async with client(app_for(cls)) as http:
        assert (await create(http, doc, len(data), content=data)).status_code == 201
    past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1)
    await asyncassets_db[f"{name}.uploads"].update_many({}, {"$set": {"expires": past}})
    report = await asyncassets.sweep_orphans(grace=0, buckets=name)
    assert report.resumable_expired == 1 and report.files_deleted == 0
    stored = await cls.objects(pk=doc.pk).first()
    assert await stored.file.read() == data
    assert stored.file.sha256 == hashlib.sha256(data).hexdigest()
    assert (await leftovers(asyncassets_db, cls))["sessions"] == 0
    assert (await asyncassets.check(verify=True, buckets=name)).ok
