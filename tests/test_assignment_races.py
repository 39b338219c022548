"""Assigning data to a file field, raced and cancelled (issue 24, item 2).

A save with assigned data cancelled at every step it awaits, racing a
``delete()``, a ``replace()``, a ``reload()`` or itself, and a query's entry
prefetch cut short by ``break``: whatever happens, the stored document
references a whole file, and every file left is referenced or was left by an
unknown outcome for the sweep (docs/files.rst, "Assigning data").
"""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import pytest
from _races_core import Faults, injected
from mongoengine.errors import SaveConditionError
from test_storages import KIB, doc_class, payload, slow_pieces

from asyncassets.errors import FileConflict
from asyncassets.storage import GridFSStorage

_n = iter(range(10**6))


def gridfs() -> GridFSStorage:
    return GridFSStorage(f"assign_race{next(_n)}")


async def catalogue(storage: GridFSStorage, db: Any) -> dict[Any, int]:
    """Every file id in the catalogue, with the bytes its chunks hold."""
    sizes: dict[Any, int] = {}
    async for entry in db[f"{storage.collection_name}.files"].find({}):
        sizes[entry["_id"]] = 0
    async for chunk in db[f"{storage.collection_name}.chunks"].find({}):
        sizes[chunk["files_id"]] = sizes.get(chunk["files_id"], 0) + len(chunk["data"])
    return sizes


async def stored_file(Doc: Any, pk: Any) -> Any:
    raw = await Doc._get_collection().find_one({"_id": pk})
    return None if raw is None else raw.get("file")


async def test_a_replacing_save_cancelled_at_every_step_never_dangles_nor_loses(asyncassets_db):
    storage = gridfs()
    Doc = doc_class(storage)
    old_bytes, new_bytes = payload(40 * KIB, seed=1), payload(300 * KIB, seed=2)
    landed: set[str] = set()
    outcomes: set[str] = set()
    step = 0
    while "finished" not in landed:
        step += 1
        doc = Doc(name=f"step{step}")
        doc.file = old_bytes
        await doc.save()
        old_id = doc.file.grid_id
        doc.file = new_bytes
        task = asyncio.create_task(doc.save())
        await cancel_point(step)
        task.cancel()
        try:
            await task
            landed.add("finished")
        except asyncio.CancelledError:
            landed.add("cancelled")
        held = await stored_file(Doc, doc.pk)
        outcomes.add("old" if held == old_id else "new")
        files = await catalogue(storage, asyncassets_db)
        # The stored document holds the old file or the new one, whole.
        assert held in files, (step, held)
        assert files[held] == (len(new_bytes) if held != old_id else len(old_bytes)), step
        if held == old_id:
            # Not switched: the new upload is gone or left to the sweep by an unknown
            # outcome; the document object holds the data again, and a retry stores it.
            assert doc.file.grid_id in (None, old_id) or doc.file.grid_id == held, step
            if doc.file.grid_id is None:
                try:
                    await doc.save()
                except FileConflict:
                    # The cancelled save's update was on its way and the server
                    # applied it after the read above (seen with two test workers
                    # on two cores): the document holds that save's file now, and
                    # this retry's upload was removed. No dangling, no loss.
                    pass
                held = await stored_file(Doc, doc.pk)
        loaded = await Doc.objects.get(pk=doc.pk)
        assert await loaded.file.read() == (new_bytes if held != old_id else old_bytes), step
        await loaded.delete()
        await asyncio_drain()
        # What is left is an unknown outcome's orphan, never a referenced file.
        left = await catalogue(storage, asyncassets_db)
        assert held not in left, step
        for orphan in left:
            await asyncassets_db[f"{storage.collection_name}.files"].delete_one({"_id": orphan})
            await asyncassets_db[f"{storage.collection_name}.chunks"].delete_many(
                {"files_id": orphan}
            )
    assert landed == {"finished", "cancelled"}
    assert outcomes == {"old", "new"}  # cancelled before and after the switch


async def cancel_point(step: int) -> None:
    """Wait for the step-th cancellation point: a few loop turns, then time.

    Loop turns alone land in the steps that await no I/O; a save's I/O takes
    a time that varies with the machine's load, so later steps wait longer.
    """
    await asyncio.sleep(0.0005 * (step // 4))
    for _ in range(step % 4):
        await asyncio.sleep(0)


async def asyncio_drain() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_new_document_saved_twice_at_once_is_stored_once_with_one_file(asyncassets_db):
    storage = gridfs()
    Doc = doc_class(storage)
    doc = Doc(name="twice")
    doc.file = slow_pieces(payload(200 * KIB), 50 * KIB, delay=0.002)
    results = await asyncio.gather(doc.save(), doc.save(), return_exceptions=True)
    assert all(r is doc for r in results), results
    assert await Doc.objects.count() == 1
    files = await catalogue(storage, asyncassets_db)
    assert list(files) == [doc.file.grid_id] and files[doc.file.grid_id] == 200 * KIB


async def test_a_save_with_data_racing_delete_leaves_no_document_and_no_file(asyncassets_db):
    storage = gridfs()
    Doc = doc_class(storage)
    doc = Doc(name="d")
    doc.file = b"old"
    await doc.save()
    other = await Doc.objects.get(pk=doc.pk)
    doc.file = slow_pieces(payload(200 * KIB), 50 * KIB, delay=0.005)
    save = asyncio.create_task(doc.save())
    await asyncio.sleep(0.01)
    await other.delete()
    with pytest.raises(FileConflict):
        await save
    assert await Doc.objects.count() == 0
    assert await catalogue(storage, asyncassets_db) == {}


async def test_a_save_with_data_racing_replace_one_wins_and_one_file_is_left(asyncassets_db):
    storage = gridfs()
    Doc = doc_class(storage)
    doc = Doc(name="r")
    doc.file = b"old"
    await doc.save()
    other = await Doc.objects.get(pk=doc.pk)
    doc.file = slow_pieces(payload(200 * KIB, seed=3), 50 * KIB, delay=0.005)
    save = asyncio.create_task(doc.save())
    await asyncio.sleep(0.01)
    await other.file.replace(b"replaced")
    with pytest.raises(FileConflict):
        await save
    held = await stored_file(Doc, doc.pk)
    assert held == other.file.grid_id
    assert list(await catalogue(storage, asyncassets_db)) == [held]
    assert await (await Doc.objects.get(pk=doc.pk)).file.read() == b"replaced"


async def test_a_reload_during_a_save_with_data_keeps_the_stored_file(asyncassets_db):
    storage = gridfs()
    Doc = doc_class(storage)
    doc = Doc(name="r")
    doc.file = b"old"
    await doc.save()
    old_id = doc.file.grid_id
    doc.file = slow_pieces(payload(200 * KIB, seed=4), 50 * KIB, delay=0.005)
    save = asyncio.create_task(doc.save())
    await asyncio.sleep(0.01)
    await doc.reload()
    await save
    held = await stored_file(Doc, doc.pk)
    files = await catalogue(storage, asyncassets_db)
    # Either the save's upload landed before the reload read it back, or it was
    # superseded by the reload and removed: never a reference to a missing file.
    assert held in files
    assert list(files) == [held]
    assert doc.file.grid_id == held
    if held == old_id:
        assert await doc.file.read() == b"old"


async def test_breaking_out_of_a_query_leaves_no_task_behind(asyncassets_db):
    storage = gridfs()
    Doc = doc_class(storage)
    for i in range(30):
        doc = Doc(name=f"b{i}")
        doc.file = b"x" * i
        await doc.save()
    before = {t for t in asyncio.all_tasks() if not t.done()}
    async for doc in Doc.objects.batch_size(10):
        assert doc.file.length == int(doc.name[1:])
        break
    await asyncio_drain()
    after = {t for t in asyncio.all_tasks() if not t.done()}
    assert after <= before


@pytest.mark.parametrize("fault", ["dropped reply", "write concern error"])
async def test_an_insert_with_data_whose_outcome_is_unknown_is_not_inserted_twice(
    asyncassets_db, monkeypatch, fault
):
    storage = gridfs()
    Doc = doc_class(storage)
    faults = Faults(Doc._get_collection_name())
    faults.install(monkeypatch)
    doc = Doc(name="new")
    doc.file = b"data"
    doc.files = [b"in a list"]
    faults.armed = fault  # the insert applies; its reply is lost
    with pytest.raises(Exception) as raised:
        await doc.save()
    assert injected(raised.value)
    [raw] = await Doc._get_collection().find({}).to_list()
    files = await catalogue(storage, asyncassets_db)
    assert raw["file"] in files and raw["files"][0] in files  # nothing deleted
    await doc.save()  # the retry a caller makes
    assert await Doc.objects.count() == 1
    loaded = await Doc.objects.get(pk=raw["_id"])
    assert await loaded.file.read() == b"data"
    assert await loaded.files[0].read() == b"in a list"


async def test_a_save_condition_that_fails_with_data_assigned_says_save_condition(
    asyncassets_db,
):
    # mongoengine code catches SaveConditionError; with data assigned, a failed
    # save_condition was reported as FileConflict (someone changed the file).
    storage = gridfs()
    Doc = doc_class(storage)
    doc = Doc(name="x")
    doc.file = b"one"
    await doc.save()
    first = doc.file.grid_id
    doc.file = b"two"
    with pytest.raises(SaveConditionError, match="uploaded for this save were removed"):
        await doc.save(save_condition={"name": "not this"})
    assert list(await catalogue(storage, asyncassets_db)) == [first]
    assert await stored_file(Doc, doc.pk) == first
    await doc.save(save_condition={"name": "x"})  # the data is still assigned
    assert await (await Doc.objects.get(pk=doc.pk)).file.read() == b"two"
    assert list(await catalogue(storage, asyncassets_db)) == [doc.file.grid_id]
    # The file changed meanwhile: that is a FileConflict, whatever the condition.
    other = await Doc.objects.get(pk=doc.pk)
    doc.file = b"three"
    await other.file.replace(b"elsewhere")
    with pytest.raises(FileConflict):
        await doc.save(save_condition={"name": "not this"})


async def test_appends_saved_from_two_copies_the_last_list_wins_add_file_keeps_both(
    asyncassets_db,
):
    # As documented: save() writes a list whole (as mongoengine does), so of two
    # copies appending, the last save's list is stored and the other's new file is
    # left to the orphan sweep; add_file() pushes, and keeps both.
    storage = gridfs()
    Doc = doc_class(storage)
    doc = Doc(name="x")
    doc.files = [b"one"]
    await doc.save()
    a = await Doc.objects.get(pk=doc.pk)
    b = await Doc.objects.get(pk=doc.pk)
    a.files.append(b"two")
    b.files.append(b"three")
    await a.save()
    await b.save()
    loaded = await Doc.objects.get(pk=doc.pk)
    assert [await f.read() for f in loaded.files] == [b"one", b"three"]
    assert len(await catalogue(storage, asyncassets_db)) == 3  # "two": for the sweep
    a = await Doc.objects.get(pk=doc.pk)
    b = await Doc.objects.get(pk=doc.pk)
    await asyncio.gather(a.add_file("files", b"four"), b.add_file("files", b"five"))
    loaded = await Doc.objects.get(pk=doc.pk)
    assert sorted([await f.read() for f in loaded.files]) == [b"five", b"four", b"one", b"three"]


@pytest.mark.parametrize("fault", ["dropped reply", "write concern error"])
async def test_a_removal_by_none_whose_outcome_is_unknown_can_be_retried(
    asyncassets_db, monkeypatch, fault
):
    # The read-back only looked for uploads: a `doc.file = None` that applied
    # left the condition on the old file, and the retry raised FileConflict.
    storage = gridfs()
    Doc = doc_class(storage)
    faults = Faults(Doc._get_collection_name())
    faults.install(monkeypatch)
    doc = Doc(name="x")
    doc.file = b"one"
    await doc.save()
    old = doc.file.grid_id
    doc.file = None
    faults.armed = fault  # the update applies; its reply is lost
    with pytest.raises(Exception) as raised:
        await doc.save()
    assert injected(raised.value)
    assert await stored_file(Doc, doc.pk) is None
    assert list(await catalogue(storage, asyncassets_db)) == [old]  # kept: for the sweep
    await doc.save()  # the retry a caller makes
    assert await stored_file(Doc, doc.pk) is None
    # Not applied (the fault hit another write): the retry switches as asked.
    doc = Doc(name="y")
    doc.file = b"two"
    await doc.save()
    two = doc.file.grid_id
    doc.file = None
    await Doc._get_collection().update_one({"_id": doc.pk}, {"$set": {"name": "z"}})
    await doc.save()
    assert await stored_file(Doc, doc.pk) is None
    assert two not in await catalogue(storage, asyncassets_db)


@pytest.mark.parametrize("value", [b"new", None], ids=["data", "None"])
async def test_assigning_to_a_field_left_out_of_the_load_says_so_and_changes_nothing(
    asyncassets_db, value
):
    # The field was loaded empty: the save is conditional on "no file", which the
    # stored document does not meet. The message blamed another writer only.
    storage = gridfs()
    Doc = doc_class(storage)
    doc = Doc(name="x")
    doc.file = b"old"
    await doc.save()
    loaded = await Doc.objects.only("name").get(pk=doc.pk)
    loaded.file = value
    with pytest.raises(FileConflict, match=r"left out by only\(\)/exclude\(\)"):
        await loaded.save()
    assert list(await catalogue(storage, asyncassets_db)) == [doc.file.grid_id]
    await loaded.reload("file")
    loaded.file = value
    await loaded.save()
    assert (await stored_file(Doc, doc.pk) is None) == (value is None)
    assert len(await catalogue(storage, asyncassets_db)) == (0 if value is None else 1)


_KILLED_SAVER = r"""
import asyncio, sys
import asyncassets
from asyncassets import Document
from asyncassets.fields import FileField, StringField
from bson import ObjectId

uri, db, bucket, pk = sys.argv[1:5]

class Killed(Document):
    name = StringField()
    file = FileField(collection_name=bucket)
    meta = {"collection": bucket + "_docs"}

async def slow():
    for i in range(1000):
        yield bytes([i % 251]) * (64 * 1024)
        if i == 160:  # 10 MiB read: chunks are written
            print("uploading", flush=True)
        if i >= 160:
            await asyncio.sleep(0.05)

async def main():
    asyncassets.connect(host=uri, db=db)
    doc = await Killed.objects.get(pk=ObjectId(pk))
    doc.file = slow()
    await doc.save()
    print("saved", flush=True)

asyncio.run(main())
"""


async def test_a_process_killed_mid_save_leaves_the_old_file_and_what_the_sweep_removes(
    asyncassets_db, asyncassets_server_uri
):
    import os
    import subprocess
    import sys

    import asyncassets
    from asyncassets import Document
    from asyncassets.fields import FileField, StringField

    bucket = f"killed{next(_n)}"
    Killed = type(
        "Killed",
        (Document,),
        {
            "name": StringField(),
            "file": FileField(collection_name=bucket),
            "meta": {"collection": bucket + "_docs"},
        },
    )
    doc = Killed(name="k")
    doc.file = b"the old photo"
    await doc.save()
    old = doc.file.grid_id
    child = subprocess.Popen(  # noqa: ASYNC220  (killed by pid below)
        [
            sys.executable,
            "-c",
            _KILLED_SAVER,
            asyncassets_server_uri,
            asyncassets_db.name,
            bucket,
            str(doc.pk),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        # Read a little after the line: the writes of what was read are under way.
        line = await asyncio.wait_for(asyncio.to_thread(child.stdout.readline), 60)  # type: ignore[union-attr]
        assert line.strip() == "uploading"
        await asyncio.sleep(0.3)
    finally:
        child.kill()
        child.wait()
    raw = await Killed._get_collection().find_one({"_id": doc.pk})
    assert raw["file"] == old  # never a half-written file
    chunks = asyncassets_db[f"{bucket}.chunks"]
    assert await chunks.count_documents({"files_id": {"$ne": old}}) > 0  # the upload's
    await asyncio.sleep(1.1)  # ObjectId times have a resolution of one second
    await asyncassets.sweep_orphans(grace=0, buckets=[bucket])
    assert await chunks.count_documents({"files_id": {"$ne": old}}) == 0
    assert [e["_id"] async for e in asyncassets_db[f"{bucket}.files"].find({})] == [old]
    assert await (await Killed.objects.get(pk=doc.pk)).file.read() == b"the old photo"


async def test_an_insert_with_several_uploads_cancelled_at_every_step_is_all_or_nothing(
    asyncassets_db,
):
    storage = gridfs()
    Doc = doc_class(storage)
    Pic = Doc.picture.document_type
    outcomes: set[str] = set()
    step = 0
    while "stored" not in outcomes:
        step += 1
        doc = Doc(name=f"step{step}", file=b"top", files=[b"first", b"second"])
        doc.picture = Pic(image=b"embedded")
        task = asyncio.create_task(doc.save())
        await cancel_point(step)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        raw = await Doc._get_collection().find_one({"name": f"step{step}"})
        files = await catalogue(storage, asyncassets_db)
        if raw is None:
            outcomes.add("nothing")
            # Not stored: the fields hold the data again (a retry uploads it). The
            # uploads were removed, unless the cancel hit the insert (an unknown
            # outcome): then they are left to the orphan sweep; clear them here.
            assert doc.file and doc.file.grid_id is None, step
            assert doc.files[1].grid_id is None and doc.picture.image.grid_id is None
            for orphan in files:
                await asyncassets_db[f"{storage.collection_name}.files"].delete_one({"_id": orphan})
                await asyncassets_db[f"{storage.collection_name}.chunks"].delete_many(
                    {"files_id": orphan}
                )
            continue
        outcomes.add("stored")
        ids = [raw["file"], *raw["files"], raw["picture"]["image"]]
        assert all(i in files for i in ids), step  # whole, never a dangling one
        loaded = await Doc.objects.get(pk=raw["_id"])
        assert [await loaded.files[i].read() for i in range(2)] == [b"first", b"second"]
        # After an unknown outcome the object saved is "maybe stored": while it is
        # alive, a delete through another copy keeps the files it holds (the
        # conservative rule; the sweep takes them after). Let it go first.
        del doc
        gc.collect()
        await loaded.delete()
        await asyncio_drain()
        assert await catalogue(storage, asyncassets_db) == {}, step
    assert outcomes == {"nothing", "stored"}
