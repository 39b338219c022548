"""tus uploads written in place in a directory: a temp file beside the reserved key,
synced before each offset is recorded, put in place at the finish (no copy)."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from typing import Any

import pytest
from _tus import app_for, client, create, doc_class, patch, temp_files

import asyncassets
from asyncassets.storage import FileSystemStorage


@pytest.fixture
async def setup(asyncassets_db: Any, tmp_path: Any) -> Any:
    cls = doc_class(FileSystemStorage(tmp_path / "files", collection_name="tus_inplace"))
    doc = cls(owner="ann")
    await doc.save()
    return cls, doc, tmp_path / "files"


async def reservations(db: Any) -> list[dict[str, Any]]:
    return [r async for r in db["asyncassets.keys"].find({})]


async def test_bytes_go_to_a_temp_file_beside_the_reserved_key_and_are_never_copied(
    asyncassets_db, setup
):
    cls, doc, root = setup
    data = os.urandom(5 * 1024 * 1024 + 123)
    async with client(app_for(cls)) as http:
        location = (await create(http, doc, len(data), filename="clip.bin")).headers["location"]
        # The key is reserved at creation, by the upload.
        [reserved] = await reservations(asyncassets_db)
        assert reserved["state"] == "writing"
        for start in range(0, len(data), 2 * 1024 * 1024):
            piece = data[start:start + 2 * 1024 * 1024]
            assert (await patch(http, location, start, piece)).status_code == 204
            if start + len(piece) < len(data):
                # Nothing staged in MongoDB: the bytes so far are in the temp file.
                assert await asyncassets_db["tus_inplace.uploads.staged"].count_documents(
                    {}) == 0
                [temp] = temp_files(root)
                assert temp.read_bytes() == data[:start + len(piece)]
    stored = await cls.objects(pk=doc.pk).first()
    assert await stored.file.read() == data
    assert stored.file.sha256 == hashlib.sha256(data).hexdigest()
    entry = await asyncassets_db["tus_inplace.files"].find_one({})
    key = entry["location"]["key"]
    # The temp file became the object (its inode), under the key reserved at creation.
    assert (root / key).read_bytes() == data
    assert (root / key).stat().st_mtime_ns == entry["location"]["version"]
    assert reserved["key"] == key
    assert temp_files(root) == []
    assert [r["state"] for r in await reservations(asyncassets_db)] == ["writing"]
    assert (await asyncassets.check(verify=True, buckets="tus_inplace")).ok


async def test_a_paused_upload_keeps_its_temp_file_and_key_through_a_sweep_without_grace(
    asyncassets_db, setup
):
    cls, doc, root = setup
    data = os.urandom(3 * 1024 * 1024)
    async with client(app_for(cls)) as http:
        location = (await create(http, doc, len(data))).headers["location"]
        assert (await patch(http, location, 0, data[:1_000_000])).status_code == 204
        # The temp file looks old (a client paused for long): the sweep leaves it.
        [temp] = temp_files(root)
        os.utime(temp, (1, 1))
        report = await asyncassets.sweep_orphans(grace=0, buckets="tus_inplace")
        assert report.temps_deleted == 0 and report.resumable_expired == 0
        assert temp_files(root) == [temp]
        assert len(await reservations(asyncassets_db)) == 1
        assert (await patch(http, location, 1_000_000, data[1_000_000:])).status_code == 204
    assert await (await cls.objects(pk=doc.pk).first()).file.read() == data


async def test_an_expired_upload_leaves_no_temp_file_no_key_no_session(asyncassets_db, setup):
    cls, doc, root = setup
    async with client(app_for(cls)) as http:
        location = (await create(http, doc, 10_000)).headers["location"]
        assert (await patch(http, location, 0, b"z" * 4000)).status_code == 204
        past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1)
        await asyncassets_db["tus_inplace.uploads"].update_many({}, {"$set": {"expires": past}})
        report = await asyncassets.sweep_orphans(grace=0, buckets="tus_inplace")
        assert report.resumable_expired == 1
        assert (await http.head(location)).status_code == 404
    assert [p for p in root.rglob("*") if p.is_file()] == []
    assert await reservations(asyncassets_db) == []
    assert await asyncassets_db["tus_inplace.uploads"].count_documents({}) == 0


async def test_bytes_a_dead_write_left_past_the_offset_are_written_over(asyncassets_db, setup):
    cls, doc, root = setup
    data = os.urandom(600_000)
    async with client(app_for(cls)) as http:
        location = (await create(http, doc, len(data))).headers["location"]
        assert (await patch(http, location, 0, data[:200_000])).status_code == 204
        # A write that died after writing, before recording its offset.
        [temp] = temp_files(root)
        fd = os.open(temp, os.O_WRONLY)
        os.pwrite(fd, b"\0" * 300_000, 200_000)
        os.close(fd)
        assert (await http.head(location)).headers["upload-offset"] == "200000"
        assert (await patch(http, location, 200_000, data[200_000:])).status_code == 204
    assert await (await cls.objects(pk=doc.pk).first()).file.read() == data


async def test_a_finish_that_failed_after_putting_the_file_in_place_completes_on_retry(
    asyncassets_db, setup, monkeypatch
):
    """The entry's insert fails once after the temp file was linked under its key
    (a lost reply, a failover): 503; the retried last PATCH finds the object made
    by this upload, keeps it, and attaches it. One object, no orphan."""
    from pymongo.errors import AutoReconnect

    cls, doc, root = setup
    data = os.urandom(400_000)
    store = cls._fields["file"].storage.bind(asyncassets_db)
    files_type = type(store.files)
    real = files_type.insert_one
    failures = [AutoReconnect("connection reset after the write")]

    async def flaky(self: Any, document: Any, *args: Any, **kwargs: Any) -> Any:
        if self.name == "tus_inplace.files" and failures:
            raise failures.pop()
        return await real(self, document, *args, **kwargs)

    monkeypatch.setattr(files_type, "insert_one", flaky)
    async with client(app_for(cls)) as http:
        location = (await create(http, doc, len(data))).headers["location"]
        first = await patch(http, location, 0, data)
        assert first.status_code == 503, first.text
        # The object is in place, no entry names it yet; the temp file is gone.
        objects = [p for p in root.rglob("*") if p.is_file()]
        assert len(objects) == 1 and objects[0].read_bytes() == data
        again = await patch(http, location, len(data), b"")
        assert again.status_code == 204, again.text
    stored = await cls.objects(pk=doc.pk).first()
    assert await stored.file.read() == data
    assert stored.file.sha256 == hashlib.sha256(data).hexdigest()
    assert [p for p in root.rglob("*") if p.is_file()] == objects
    report = await asyncassets.sweep_orphans(grace=0, buckets="tus_inplace")
    assert report.files_deleted == 0 and report.objects_deleted == 0
    assert (await asyncassets.check(verify=True, buckets="tus_inplace")).ok


async def test_a_directory_that_overwrites_stages_the_bytes(asyncassets_db, tmp_path):
    # overwrite=True: a key is not an upload's alone, so nothing is written beside
    # it before the end; the bytes are staged and stored by the writer.
    cls = doc_class(FileSystemStorage(tmp_path, collection_name="tus_over", overwrite=True))
    doc = cls(owner="ann")
    await doc.save()
    async with client(app_for(cls, chunk_size=1000)) as http:
        location = (await create(http, doc, 5000)).headers["location"]
        assert (await patch(http, location, 0, b"q" * 2500)).status_code == 204
        assert await asyncassets_db["tus_over.uploads.staged"].count_documents({}) == 2
        assert temp_files(tmp_path) == []
        assert (await patch(http, location, 2500, b"q" * 2500)).status_code == 204
    assert await (await cls.objects(pk=doc.pk).first()).file.read() == b"q" * 5000
