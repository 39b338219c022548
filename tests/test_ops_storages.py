"""The orphan sweep and the consistency check on directory and S3 storages.

Real parts only: a directory under ``tmp_path`` and the test plugin's moto S3
server. Document classes are made per test (unique class, collection and
catalogue names) and forgotten afterwards, since classes register globally and
a later ``check()`` would otherwise list this test's storage.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import gc
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from bson import ObjectId
from mongoengine.base.common import _document_registry

from asyncassets import Document
from asyncassets.errors import StorageConflict, StorageError
from asyncassets.fields import FileField, ListField
from asyncassets.ops import check, declared_storages, sweep_orphans
from asyncassets.storage import FileSystemStorage, GridFSStorage, S3Storage, Storage
from asyncassets.storage.objects.store import ObjectStore

DAYS_AGO = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=3)
DAY = dt.timedelta(days=1)
#: FileSystemBlobs' default write buffer: a writer's bytes reach its temp file then.
BUFFER = 1024 * 1024


def _suffix() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture
def declare() -> Iterator[Callable[[Storage], Any]]:
    """Make Document classes keeping files in a storage (``f`` and a list ``many``);
    they are unregistered, and collected, when the test is over."""
    names: list[str] = []

    def make(storage: Storage) -> Any:
        suffix = _suffix()
        cls: Any = type(
            f"StoreDoc{suffix}",
            (Document,),
            {
                "__module__": __name__,
                "f": FileField(storage=storage),
                "many": ListField(FileField(storage=storage)),
                "meta": {"collection": f"store_docs_{suffix}", "auto_create_index": False},
            },
        )
        names.append(cls._class_name)
        return cls

    yield make
    for name in names:
        _document_registry.pop(name, None)
    gc.collect()  # the test's frame is gone: nothing holds the classes any more


@pytest_asyncio.fixture(params=["filesystem", "s3"])
async def storage(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Storage]:
    """A directory storage, then an S3 one, each with its own catalogue."""
    name = f"st_{_suffix()}"
    made: Storage
    if request.param == "filesystem":
        made = FileSystemStorage(tmp_path / "media", collection_name=name)
    else:
        pytest.importorskip("aiobotocore")
        bucket = request.getfixturevalue("asyncassets_s3_bucket")
        made = S3Storage(**bucket.options, prefix="media/", collection_name=name)
    yield made
    blobs = getattr(made, "_blobs", None)
    closer = getattr(blobs, "aclose", None)
    if closer is not None:
        await closer()


def _store(storage: Storage, db: Any) -> ObjectStore:
    store = storage.bind(db)
    assert isinstance(store, ObjectStore)
    return store


async def _upload(store: ObjectStore, data: bytes, *, old: bool = True) -> dict[str, Any]:
    doc = await store.upload(data, filename="f.bin")
    if old:
        await store.files.update_one({"_id": doc["_id"]}, {"$set": {"uploadDate": DAYS_AGO}})
    return doc


def _key(doc: dict[str, Any]) -> str:
    return str(doc["location"]["key"])


async def _commit_object(store: ObjectStore, key: str, data: bytes) -> None:
    """What an upload leaves between committing its object and inserting its entry."""
    writer = store.blobs.open_writer(key)
    await writer.write(data)
    await writer.commit()


async def _overwrite(storage: Storage, store: ObjectStore, key: str, data: bytes) -> None:
    """Change the stored bytes behind the catalogue's back."""
    if isinstance(storage, FileSystemStorage):
        with open(os.path.join(storage.root, *key.split("/")), "wb") as raw:  # noqa: ASYNC230
            raw.write(data)  # on disk, in place
    else:
        writer = store.blobs.open_writer(key)  # a PUT of other bytes under the key
        await writer.write(data)
        await writer.commit(overwrite=True)


async def _present(store: ObjectStore, key: str) -> bool:
    return await store.blobs.stat(key) is not None


async def _catalogued(store: ObjectStore, file_id: Any) -> bool:
    return await store.files.count_documents({"_id": file_id}) == 1


# -- sweep ---------------------------------------------------------------------------


async def test_sweep_deletes_unreferenced_entries_with_their_objects_after_the_grace(
    asyncassets_db, declare, storage
):
    store = _store(storage, asyncassets_db)
    Doc = declare(storage)
    kept = await _upload(store, b"referenced")
    listed = await _upload(store, b"in a list")
    old = await _upload(store, b"old orphan")
    young = await _upload(store, b"young orphan", old=False)
    await Doc(f=kept["_id"], many=[listed["_id"]]).save()
    name = storage.collection_name

    report = await sweep_orphans(grace=DAY, buckets=[name])

    assert report.files_deleted == 1 and report.recent_orphaned_files == 1
    assert [f.file_id for f in report.deleted_files] == [old["_id"]]
    assert report.bytes_freed == len(b"old orphan")
    assert report.storages[f"default:{name}"] == storage.url
    assert not await _catalogued(store, old["_id"])
    assert not await _present(store, _key(old))  # the object went with its entry
    for doc in (kept, listed, young):
        assert await _catalogued(store, doc["_id"]) and await _present(store, _key(doc))
    assert report.objects_deleted == 0 and report.recent_orphaned_objects == 0
    assert storage.url in str(report) and "orphaned objects deleted: 0" in str(report)

    assert (await sweep_orphans(grace=0, buckets=[name])).files_deleted == 1
    assert not await _present(store, _key(young))
    assert await store.read(kept) == b"referenced"
    assert (await check(buckets=[name], verify=True)).ok


async def test_sweep_deletes_objects_no_entry_names_only_after_the_grace(
    asyncassets_db, declare, storage
):
    store = _store(storage, asyncassets_db)
    Doc = declare(storage)
    kept = await _upload(store, b"referenced")
    await Doc(f=kept["_id"]).save()
    # An upload that committed its object and has not inserted its entry yet.
    await _commit_object(store, "2026/01/in-progress.bin", b"committed, no entry yet")
    name = storage.collection_name

    young = await sweep_orphans(grace=DAY, buckets=[name])
    assert young.objects_deleted == 0 and young.recent_orphaned_objects == 1
    assert await _present(store, "2026/01/in-progress.bin")
    # S3 dates objects in whole seconds, which the sweep reads as the second's end.
    await asyncio.sleep(1.1 if isinstance(storage, S3Storage) else 0)

    dry = await sweep_orphans(grace=0, dry_run=True, buckets=[name])
    assert dry.objects_deleted == 1 and await _present(store, "2026/01/in-progress.bin")

    swept = await sweep_orphans(grace=0, buckets=[name])
    assert swept.objects_deleted == 1
    assert [(o.key, o.size) for o in swept.deleted_objects] == [
        ("2026/01/in-progress.bin", len(b"committed, no entry yet"))
    ]
    assert swept.bytes_freed == len(b"committed, no entry yet")
    assert "orphaned objects deleted: 1" in str(swept)
    assert "2026/01/in-progress.bin" in str(swept)
    assert not await _present(store, "2026/01/in-progress.bin")
    assert await _present(store, _key(kept)) and await _catalogued(store, kept["_id"])


async def test_sweep_removes_temp_files_of_dead_writers(asyncassets_db, declare, tmp_path: Path):
    storage = FileSystemStorage(tmp_path / "media", collection_name=f"st_{_suffix()}")
    store = _store(storage, asyncassets_db)
    declare(storage)
    # A writer that died mid-upload: its temp file stays, untouched since.
    dead = store.blobs.open_writer("2026/01/dead.bin")
    await dead.write(bytes(BUFFER))  # a full write buffer: it reaches the disk
    temps = [info async for info in store.blobs.list_stale_temps(  # type: ignore[attr-defined]
        dt.datetime.now(dt.timezone.utc) + DAY)]
    assert len(temps) == 1
    temp_path = Path(storage.root, *temps[0].key.split("/"))
    stamp = DAYS_AGO.timestamp()
    os.utime(temp_path, (stamp, stamp))
    live = store.blobs.open_writer("2026/01/live.bin")
    await live.write(bytes(BUFFER))
    try:
        report = await sweep_orphans(grace=DAY, buckets=[storage.collection_name])
        assert report.temps_deleted == 1
        assert [t.key for t in report.deleted_temps] == [temps[0].key]
        assert "stale temp files deleted: 1" in str(report)
        left = [info.key async for info in store.blobs.list_stale_temps(  # type: ignore[attr-defined]
            dt.datetime.now(dt.timezone.utc) + DAY)]
        assert len(left) == 1 and left != [temps[0].key]  # only the live writer's
        await live.commit()  # the live writer was left alone
        assert await _present(store, "2026/01/live.bin")
    finally:
        await dead.abort()
        await live.abort()


async def test_an_object_another_catalogue_names_in_the_same_place_is_kept(
    asyncassets_db, declare, tmp_path: Path
):
    root = tmp_path / "shared"
    first = FileSystemStorage(root, collection_name=f"st_{_suffix()}")
    second = FileSystemStorage(root, collection_name=f"st_{_suffix()}")
    inner = FileSystemStorage(root / "inner", collection_name=f"st_{_suffix()}")
    declare(first)
    Second = declare(second)
    Inner = declare(inner)
    theirs = await _upload(_store(second, asyncassets_db), b"second's")
    nested = await _upload(_store(inner, asyncassets_db), b"inner's")
    await Second(f=theirs["_id"]).save()
    await Inner(f=nested["_id"]).save()
    stray = await _commit_object(_store(first, asyncassets_db), "stray.bin", b"nobody's")
    assert stray is None

    report = await sweep_orphans(grace=0, buckets=[first.collection_name])

    assert [o.key for o in report.deleted_objects] == ["stray.bin"]
    assert (root / _key(theirs)).read_bytes() == b"second's"
    assert (root / "inner" / _key(nested)).read_bytes() == b"inner's"
    found = await check(buckets=[first.collection_name])
    assert found.orphaned_objects == 0 and found.ok


async def test_a_directory_reached_through_a_link_is_one_place_for_sweep_and_check(
    asyncassets_db, declare, tmp_path: Path
):
    """Found by a hostile review: two catalogues declared on one directory named
    two ways (its path, a link to it) each reported the other's objects as
    orphans in check(): the places were compared by the paths as written."""
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    direct = FileSystemStorage(real, collection_name=f"st_{_suffix()}")
    linked = FileSystemStorage(tmp_path / "link", collection_name=f"st_{_suffix()}")
    Direct, Linked = declare(direct), declare(linked)
    one = await _upload(_store(direct, asyncassets_db), b"direct's")
    other = await _upload(_store(linked, asyncassets_db), b"linked's")
    await Direct(f=one["_id"]).save()
    await Linked(f=other["_id"]).save()

    found = await check()
    assert found.orphaned_objects == 0 and found.ok, found
    report = await sweep_orphans(grace=0)
    assert report.objects_deleted == 0
    assert (real / _key(one)).read_bytes() == b"direct's"
    assert (real / _key(other)).read_bytes() == b"linked's"


# -- check ---------------------------------------------------------------------------


async def test_check_reports_missing_truncated_orphaned_and_changed_objects(
    asyncassets_db, declare, storage
):
    store = _store(storage, asyncassets_db)
    Doc = declare(storage)
    datas = (b"aaaa", b"bbbbbbbb", b"cccc", b"eeee", b"dd")
    docs = [await _upload(store, data) for data in datas]
    missing, truncated, changed, rotten, intact = docs
    await Doc(f=intact["_id"], many=[d["_id"] for d in docs[:4]]).save()
    name = storage.collection_name

    clean = await check(buckets=[name], verify=True)
    assert clean.ok, clean
    assert clean.files == 5 and clean.verified == 5 and clean.references == 5

    await store.blobs.delete(_key(missing))
    await _overwrite(storage, store, _key(truncated), b"bbb")
    await _overwrite(storage, store, _key(changed), b"CCCC")  # same size, other bytes
    on_disk = isinstance(storage, FileSystemStorage)
    if on_disk:
        # Bit rot: other bytes in place, the file's time (its version) unchanged.
        path = os.path.join(storage.root, *_key(rotten).split("/"))
        before = os.stat(path)
        with open(path, "r+b") as raw:  # noqa: ASYNC230
            raw.write(b"EEEE")
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    await _commit_object(store, "stray/orphan.bin", b"no entry")
    dangling = ObjectId()  # a file deleted behind a document's back
    await Doc._get_collection().insert_one({"f": dangling})

    found = await check(buckets=[name])
    assert not found.ok
    assert found.missing_objects == 1 and found.wrong_size_objects == 1
    # Replaced under its key: another version than the upload recorded, found
    # without reading a byte.
    assert found.changed_objects == 1
    assert found.invalid_entries == 0 and found.checksum_mismatches == 0
    problems = {(p.file_id, p.kind, p.key) for p in found.object_problems}
    assert problems == {
        (missing["_id"], "missing", _key(missing)),
        (truncated["_id"], "size", _key(truncated)),
        (changed["_id"], "changed", _key(changed)),
    }
    assert found.orphaned_objects == 1
    assert [(o.key, o.size) for o in found.orphaned_object_keys] == [("stray/orphan.bin", 8)]
    assert found.dangling == 1 and found.dangling_references[0].file_id == dangling
    text = str(found)
    assert "orphaned objects: 1" in text and "stray/orphan.bin" in text
    assert "objects missing: 1, of the wrong size: 1, of another version: 1" in text

    verified = await check(buckets=[name], verify=True)
    # Bit rot keeps the version: only the checksum finds it.
    assert verified.checksum_mismatches == (1 if on_disk else 0)
    assert [f.file_id for f in verified.mismatched_files] == ([rotten["_id"]] if on_disk else [])
    assert verified.verified == 2  # the missing, truncated and changed ones are not read


async def test_check_reports_a_catalogue_entry_that_names_no_object(
    asyncassets_db, declare, tmp_path: Path
):
    storage = FileSystemStorage(tmp_path / "media", collection_name=f"st_{_suffix()}")
    store = _store(storage, asyncassets_db)
    declare(storage)
    # A GridFS-style entry left in the catalogue (the field's storage changed).
    file_id = ObjectId()
    await store.files.insert_one(
        {"_id": file_id, "length": 3, "chunkSize": 4, "uploadDate": DAYS_AGO}
    )
    found = await check(buckets=[storage.collection_name])
    assert found.invalid_entries == 1 and not found.ok
    assert found.object_problems[0].kind == "invalid"
    assert found.orphaned_files == 1  # and nothing references it
    # The sweep never deletes it: its bytes would be chunks it does not look at.
    swept = await sweep_orphans(grace=0, buckets=[storage.collection_name])
    assert swept.files_deleted == 0 and await _catalogued(store, file_id)


async def test_an_undeclared_object_catalogue_is_not_checked_as_a_gridfs_bucket(
    asyncassets_db, tmp_path: Path
):
    storage = FileSystemStorage(tmp_path / "media", collection_name=f"st_{_suffix()}")
    store = _store(storage, asyncassets_db)
    doc = await _upload(store, b"nobody declares my storage")
    label = f"default:{storage.collection_name}"

    found = await check()
    assert label in found.unclaimed_buckets
    assert found.corrupt_files == 0 and found.unchecked_entries == 1 and found.ok
    assert "not checked: 1" in str(found)

    # Named explicitly, it is taken for a GridFS bucket: its object entries are
    # left alone rather than deleted without their objects.
    swept = await sweep_orphans(grace=0, buckets=[storage.collection_name])
    assert swept.files_deleted == 0
    assert await _catalogued(store, doc["_id"]) and await _present(store, _key(doc))


async def test_a_class_giving_a_declared_catalogue_another_storage_is_refused(
    asyncassets_db, declare, tmp_path: Path
):
    name = f"st_{_suffix()}"
    directory = FileSystemStorage(tmp_path / "media", collection_name=name)
    OnDisk = declare(directory)
    with pytest.raises(StorageConflict) as raised:
        declare(GridFSStorage(name))
    message = str(raised.value)
    assert f"catalogue {name!r}" in message and f"{OnDisk._class_name}.f" in message
    assert directory.url in message and f"gridfs:{name}" in message
    assert f"collection_name='{name}_f'" in message  # what to write
    # The refused class is not counted: the sweep and the check work as before.
    assert declared_storages()[("default", name)] == directory
    assert (await check(buckets=[name])).ok


def _made_by_one_function(storage: Storage, suffix: str) -> Any:
    # Classes made by one function share a module and a name: each is taken for a
    # new version of the other (a module reloaded), so declaring is not refused.
    class Doc(Document):
        f = FileField(storage=storage)
        many = ListField(FileField(storage=storage))
        meta = {"collection": f"store_docs_{suffix}", "auto_create_index": False}

    return Doc


async def test_two_storages_declared_for_one_catalogue_are_refused_by_sweep_and_check(
    asyncassets_db, tmp_path: Path
):
    name = f"st_{_suffix()}"
    directory = FileSystemStorage(tmp_path / "media", collection_name=name)
    OnDisk = _made_by_one_function(directory, _suffix())
    InGridFS = _made_by_one_function(GridFSStorage(name), _suffix())
    for call in (
        sweep_orphans(grace=0, buckets=[name]),
        check(buckets=[name]),
        check(),
    ):
        with pytest.raises(StorageConflict) as raised:
            await call
        message = str(raised.value)
        assert f"catalogue {name!r}" in message
        assert f"{OnDisk._class_name}.f" in message and f"{InGridFS._class_name}.f" in message
        assert directory.url in message and f"gridfs:{name}" in message
    with pytest.raises(ValueError, match="different storages"):
        declared_storages()


async def test_fields_declaring_equal_storages_share_one_catalogue(
    asyncassets_db, declare, tmp_path: Path
):
    name = f"st_{_suffix()}"
    # Equal storages, made separately: one catalogue, swept once.
    first = FileSystemStorage(tmp_path / "media", collection_name=name)
    second = FileSystemStorage(str(tmp_path / "media"), collection_name=name)
    A = declare(first)
    B = declare(second)
    store = _store(first, asyncassets_db)
    a, b = await _upload(store, b"a"), await _upload(store, b"b")
    await A(f=a["_id"]).save()
    await B(f=b["_id"]).save()
    assert declared_storages()[("default", name)] == first
    report = await sweep_orphans(grace=0, buckets=[name])
    assert report.buckets == [f"default:{name}"] and report.files_deleted == 0


async def test_an_object_entry_in_a_bucket_declared_as_gridfs_is_reported(
    asyncassets_db, declare, tmp_path: Path
):
    name = f"st_{_suffix()}"
    Doc = declare(GridFSStorage(name))
    # Written while the field's storage was a directory; the field now says GridFS.
    before = FileSystemStorage(tmp_path / "media", collection_name=name)
    doc = await _upload(_store(before, asyncassets_db), b"stored on disk")
    await Doc(f=doc["_id"]).save()

    found = await check(buckets=[name])
    assert not found.ok and found.invalid_entries == 1 and found.corrupt_files == 0
    assert [(p.file_id, p.kind, p.key) for p in found.object_problems] == [
        (doc["_id"], "invalid", _key(doc))
    ]
    assert "declare GridFS" in str(found)
    swept = await sweep_orphans(grace=0, buckets=[name])
    assert swept.files_deleted == 0


async def test_sweep_aborts_multipart_uploads_of_dead_writers_after_the_grace(
    asyncassets_db, declare, request: pytest.FixtureRequest
):
    bucket = request.getfixturevalue("asyncassets_s3_bucket")
    storage = S3Storage(
        prefix="media/", collection_name=f"st_{_suffix()}", part_size=5 * BUFFER, **bucket.options
    )
    store = _store(storage, asyncassets_db)
    declare(storage)
    blobs: Any = store.blobs
    # A writer that died mid-upload: its multipart upload stays pending, its part
    # stored and billed, and no object is visible.
    dead = blobs.open_writer("2026/01/dead.bin")
    await dead.write(bytes(6 * BUFFER))  # more than a part: the multipart upload starts
    await dead.write(bytes(6 * BUFFER))  # and its first part has been sent
    later = dt.datetime.now(dt.timezone.utc) + DAY
    pending = [u async for u in blobs.list_stale_uploads(later)]
    assert [u.key for u in pending] == ["2026/01/dead.bin"]
    # moto reports every upload as started on 2010-11-10 (a fixed sample time), so
    # "young" cannot be shown by waiting here; the cutoff is compared all the same:
    before = pending[0].initiated - dt.timedelta(seconds=1)
    assert [u async for u in blobs.list_stale_uploads(before)] == []

    report = await sweep_orphans(grace=DAY, buckets=[storage.collection_name])
    assert report.uploads_aborted == 1
    assert [u.key for u in report.aborted_uploads] == ["2026/01/dead.bin"]
    assert [u async for u in blobs.list_stale_uploads(later)] == []
    assert await blobs.abort_stale_upload(pending[0]) is False  # gone already
    with pytest.raises(StorageError):  # its upload is gone: it cannot be completed
        await dead.commit()
    await dead.abort()
    assert [info async for info in blobs.list()] == []
    await blobs.aclose()


# -- key reservations left by writers that died (issue #19) ---------------------------


async def _reservation(store: ObjectStore, key: str) -> dict[str, Any] | None:
    found: dict[str, Any] | None = await store.reservations.collection.find_one(
        {"_id": store.reservations.id_of(key)}
    )
    return found


async def test_the_sweep_deletes_what_a_dead_writer_committed_under_its_reservation(
    asyncassets_db, declare, storage
):
    # A writer reserved its key and committed its object, then died before its
    # catalogue entry: the object is its own (it carries the writer's token).
    store = _store(storage, asyncassets_db)
    declare(storage)
    await store.ensure_indexes()
    token = uuid.uuid4().hex
    key = await store.reserve_key("dead/photo.jpg", file_id=ObjectId(), token=token,
                                  overwrite=False)
    writer = store.blobs.open_writer(key, token=token)
    await writer.write(b"committed, never catalogued")
    await writer.commit()
    stored = await _upload(store, b"a stored file")  # its reservation is alive
    await declare(storage)(f=stored["_id"]).save()

    young = await sweep_orphans(grace=3600, buckets=[storage.collection_name])
    assert young.reservations_released == 0 and await _present(store, key)

    report = await sweep_orphans(grace=0, buckets=[storage.collection_name])
    assert report.reservations_released == 1
    assert [o.key for o in report.deleted_objects] == [key]
    assert not await _present(store, key) and await _reservation(store, key) is None
    assert await _reservation(store, _key(stored)) is not None
    assert await store.read(stored) == b"a stored file"
    assert (await check(buckets=[storage.collection_name])).ok


async def test_the_sweep_never_deletes_another_writers_object_under_a_dead_reservation(
    asyncassets_db, declare, storage
):
    # The writer died before its commit; another tool then wrote under the key:
    # not the dead writer's object, so it is left (only the reservation goes).
    store = _store(storage, asyncassets_db)
    declare(storage)
    await store.ensure_indexes()
    key = await store.reserve_key("dead/other.jpg", file_id=ObjectId(),
                                  token=uuid.uuid4().hex, overwrite=False)
    await store.reservations.collection.update_one(
        {"_id": store.reservations.id_of(key)}, {"$set": {"at": DAYS_AGO}})
    await _commit_object(store, key, b"another tool's")  # just now
    report = await sweep_orphans(grace=3600, buckets=[storage.collection_name])
    assert report.reservations_released == 1 and report.objects_deleted == 0
    assert await _reservation(store, key) is None
    assert await store.read({"_id": 1, "length": 14, "location": {"key": key}}) == (
        b"another tool's"
    )
    # Now unreserved and named by no entry: an orphan object, which a sweep
    # removes once it is older than the grace (as it removes any tool's leftovers),
    # under a reservation of its own.
    again = await sweep_orphans(grace=0, buckets=[storage.collection_name])
    assert [o.key for o in again.deleted_objects] in ([key], [])  # S3 times: whole seconds
    await asyncio.sleep(1.1)
    await sweep_orphans(grace=0, buckets=[storage.collection_name])
    assert not await _present(store, key) and await _reservation(store, key) is None


async def test_an_upload_paused_past_the_grace_loses_its_key_to_the_sweep_and_stores_nothing(
    asyncassets_db, declare, storage
):
    from asyncassets.errors import UploadInterrupted

    store = _store(storage, asyncassets_db)
    declare(storage)
    upload = store.open_upload(filename="slow.bin")
    await upload.write(b"x" * (BUFFER + 1))  # the key is reserved, bytes are out
    await asyncio.sleep(0.05)
    report = await sweep_orphans(grace=0.01, buckets=[storage.collection_name])
    assert report.reservations_released == 1
    with pytest.raises(UploadInterrupted, match="grace"):
        await upload.close()
    assert await store.files.count_documents({}) == 0
    assert [info async for info in store.blobs.list()] == []
    assert await store.reservations.collection.count_documents(
        {"place": store.reservations.place}) == 0


async def test_a_delete_whose_object_cannot_be_removed_keeps_the_key_for_the_sweep(
    asyncassets_db, declare, tmp_path: Path
):
    # The bytes cannot be removed (here: a read-only place) after the entry is gone:
    # the reservation stays, so no upload writes the key until the sweep, able to
    # remove the object later, has done so.
    root = tmp_path / "ro"
    storage = FileSystemStorage(root, key_template="{filename}",
                                collection_name=f"st_{_suffix()}")
    store = _store(storage, asyncassets_db)
    declare(storage)
    entry = await _upload(store, b"kept bytes")
    key = _key(entry)
    real_unlink = os.unlink

    def refuse(path: Any, *args: Any, **kwargs: Any) -> None:
        raise PermissionError(13, "Permission denied", path)

    os.unlink = refuse  # type: ignore[assignment]
    try:
        with pytest.raises(StorageError, match="Permission denied"):
            await store.delete(entry["_id"])
    finally:
        os.unlink = real_unlink
    assert await store.find(entry["_id"]) is None  # the entry went first
    assert await _reservation(store, key) is not None
    again = await store.upload(b"same name", filename="f.bin")
    assert _key(again) != key  # the key is still taken
    report = await sweep_orphans(grace=0, buckets=[storage.collection_name])
    assert report.reservations_released == 1
    assert not await _present(store, key) and await _reservation(store, key) is None


@pytest.mark.parametrize("kind", ["filesystem", "s3"])
async def test_one_place_named_two_ways_is_never_swept_as_its_own_orphans(
    asyncassets_db, declare, tmp_path: Path, request: pytest.FixtureRequest, kind: str
):
    # Found by a hostile review: a directory reached through a link to it, or an S3
    # endpoint spelled 127.0.0.1 here and localhost there, made each catalogue's
    # sweep delete the other's live objects as orphans.
    if kind == "filesystem":
        real = tmp_path / "real"
        real.mkdir()
        (tmp_path / "alias").symlink_to(real)
        first: Storage = FileSystemStorage(real, collection_name=f"st_{_suffix()}")
        second: Storage = FileSystemStorage(tmp_path / "alias",
                                            collection_name=f"st_{_suffix()}")
    else:
        bucket = request.getfixturevalue("asyncassets_s3_bucket")
        other_spelling = bucket.endpoint_url.replace("127.0.0.1", "localhost")
        assert other_spelling != bucket.endpoint_url
        first = S3Storage(**bucket.options, prefix="p/", collection_name=f"st_{_suffix()}")
        second = S3Storage(**{**bucket.options, "endpoint_url": other_spelling},
                           prefix="p/", collection_name=f"st_{_suffix()}")
    First, Second = declare(first), declare(second)
    a = await _upload(_store(first, asyncassets_db), b"first's")
    b = await _upload(_store(second, asyncassets_db), b"second's")
    await First(f=a["_id"]).save()
    await Second(f=b["_id"]).save()
    await asyncio.sleep(1.1)  # S3 object times are whole seconds
    for storage in (first, second):
        report = await sweep_orphans(grace=0, buckets=[storage.collection_name])
        assert report.objects_deleted == 0, report
    assert await _store(first, asyncassets_db).read(a) == b"first's"
    assert await _store(second, asyncassets_db).read(b) == b"second's"
    for storage in (first, second):
        closer = getattr(getattr(storage, "_blobs", None), "aclose", None)
        if closer is not None:
            await closer()


async def test_a_renamed_catalogue_keeps_its_objects_whatever_the_reservations_record(
    asyncassets_db, declare, storage
):
    # A reservation records the catalogue its upload wrote to. After a catalogue is
    # renamed (entries moved, reservations not), its files are still named by a
    # declared catalogue of the place: the sweep must not take them for the
    # leftovers of dead writers.
    store = _store(storage, asyncassets_db)
    Doc = declare(storage)
    entry = await _upload(store, b"a live file")
    await Doc(f=entry["_id"]).save()
    await store.reservations.collection.update_many(
        {"place": store.reservations.place}, {"$set": {"catalogue": "renamed_away"}}
    )
    report = await sweep_orphans(grace=0, buckets=[storage.collection_name])
    assert report.reservations_released == 0 and report.objects_deleted == 0
    assert await store.read(entry) == b"a live file"
