"""Assigning data to a file field uploads it on save (issue 24, item 2).

``doc.file = data`` (bytes, a file object, an async file such as FastAPI's
``UploadFile``, an async iterable) records the data; ``await doc.save()`` uploads
it with the field's rules and references it, with the guarantees of ``replace()``:
a failed or cancelled save leaves no file and no reference, the replaced file goes
only after the switch, an unknown outcome deletes nothing. Run on GridFS, a
directory and an S3 bucket (the ``storage`` fixture of test_storages).
"""

from __future__ import annotations

import asyncio
import io
import runpy
from pathlib import Path
from typing import Any

import pytest
from _races_core import Faults, injected
from bson import ObjectId
from mongoengine.errors import ValidationError
from test_storages import (
    KIB,
    MIB,
    doc_class,
    leftovers,
    make_storage,
    payload,
    slow_pieces,
    stored_entry,
)

from asyncassets import Document
from asyncassets.errors import (
    FileConflict,
    FileNotSaved,
    FileValidationError,
    GridFSError,
    UploadClosed,
)
from asyncassets.fields import FileField, IntField, ListField, StringField
from asyncassets.storage import GridFSStorage, Storage


@pytest.fixture(params=["gridfs", "filesystem", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Any) -> Storage:
    return make_storage(request.param, request, tmp_path)


REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "assign_on_save.py"
FILES_PAGE = (REPO / "docs" / "files.rst").read_text(encoding="utf-8")


class AsyncUpload:
    """What FastAPI/Starlette hand a view: an async file with a name and a type."""

    def __init__(self, data: bytes, filename: str, content_type: str) -> None:
        self.file = io.BytesIO(data)
        self.filename = filename
        self.content_type = content_type
        self.reads = 0

    async def read(self, size: int = -1) -> bytes:
        self.reads += 1
        await asyncio.sleep(0)
        return self.file.read(size)

    async def seek(self, offset: int) -> None:
        self.file.seek(offset)


async def stored(doc: Any) -> dict[str, Any]:
    found = await type(doc)._get_collection().find_one({"_id": doc.pk})
    assert found is not None
    return dict(found)


async def entries(storage: Any, db: Any) -> list[dict[str, Any]]:
    return [e async for e in db[f"{storage.collection_name}.files"].find({})]


# -- what is assigned, what is stored ----------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda data: data, id="bytes"),
        pytest.param(lambda data: bytearray(data), id="bytearray"),
        pytest.param(lambda data: memoryview(data), id="memoryview"),
        pytest.param(lambda data: io.BytesIO(data), id="file object"),
        pytest.param(lambda data: AsyncUpload(data, "a.bin", "application/x-a"), id="async file"),
        pytest.param(lambda data: slow_pieces(data, 100 * KIB), id="async iterable"),
    ],
)
async def test_assigned_data_is_uploaded_and_referenced_by_save(asyncassets_db, make):
    # Every kind of data on GridFS; the other storages get each kind in the tests below.
    storage = GridFSStorage("assigned_kinds")
    Doc = doc_class(storage)
    data = payload(300 * KIB + 7)
    doc = Doc(name="new")
    doc.file = make(data)
    assert await leftovers(storage, asyncassets_db) == (0, 0)  # nothing before save()
    await doc.save()
    assert (await stored(doc))["file"] == doc.file.grid_id
    loaded = await Doc.objects.get(pk=doc.pk)
    assert await loaded.file.read() == data
    [entry] = await entries(storage, asyncassets_db)
    assert entry["_id"] == doc.file.grid_id and entry["length"] == len(data)


async def test_name_and_type_come_from_the_object_and_the_rules_apply(
    asyncassets_db, storage, tmp_path
):
    Doc = doc_class(storage)
    path = tmp_path / "sub" / "Marmot Photo.PNG"
    path.parent.mkdir()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
    doc = await Doc(name="x").save()
    with open(path, "rb") as f:  # noqa: ASYNC230  (a sync file, as users pass)
        doc.file = f
        await doc.save()
    await doc.file.load()
    assert doc.file.filename == "Marmot Photo.PNG"  # the last path segment only
    assert doc.file.content_type == "image/png"  # guessed from the name, as put() does
    doc2 = await Doc(name="y").save()
    doc2.file = AsyncUpload(b"%PDF-1.4 hello", "../../etc/report.pdf", "application/pdf")
    await doc2.save()
    entry = await stored_entry(storage, asyncassets_db, doc2.file.grid_id)
    assert entry["filename"] == "report.pdf"
    assert entry["metadata"]["content_type"] == "application/pdf"


async def test_reading_between_assignment_and_save_says_save_first(asyncassets_db):
    Doc = doc_class(GridFSStorage("assigned_reads"))
    doc = Doc()
    doc.file = AsyncUpload(b"abc", "a.txt", "text/plain")
    assert bool(doc.file)
    assert (doc.file.filename, doc.file.content_type) == ("a.txt", "text/plain")
    assert str(doc.file) == "<GridFSProxy: a.txt (not saved)>"
    with pytest.raises(FileNotSaved, match="save"):
        await doc.file.read()
    with pytest.raises(FileNotSaved, match="save"):
        _ = doc.file.upload_date
    with pytest.raises(GridFSError, match="not uploaded yet"):
        await doc.file.put(b"other")
    doc.file = b"12345"
    assert doc.file.length == 5
    await doc.save()
    assert await doc.file.read() == b"12345"  # the file uploaded is at hand


# -- the field's rules and other failures: nothing left, data kept ---------------------------


async def test_max_size_exceeded_leaves_nothing_and_keeps_the_data(asyncassets_db, storage):
    Doc = doc_class(storage, max_size=MIB)
    doc = await Doc(name="small").save()
    doc.file = slow_pieces(payload(3 * MIB), 256 * KIB)
    with pytest.raises(FileValidationError, match="file"):
        await doc.save()
    assert await leftovers(storage, asyncassets_db) == (0, 0)
    assert "file" not in await stored(doc)
    # The stream is spent: a retry says so instead of storing a truncated file.
    with pytest.raises(UploadClosed, match="Assign the data again"):
        await doc.save()
    doc.file = payload(MIB)
    await doc.save()
    assert await (await Doc.objects.get(pk=doc.pk)).file.read() == payload(MIB)


async def test_a_wrong_type_is_refused_before_anything_is_stored(asyncassets_db, storage):
    Doc = doc_class(storage, allowed_content_types=["image/*"])
    doc = Doc(name="pdf")
    doc.file = AsyncUpload(b"%PDF-1.4 not an image", "cat.png", "image/png")
    with pytest.raises(FileValidationError, match="content type"):
        await doc.save()
    assert await leftovers(storage, asyncassets_db) == (0, 0)
    assert await Doc.objects.count() == 0
    assert doc.file.filename == "cat.png"  # still the assigned data, to fix and retry


async def test_a_validation_error_of_another_field_uploads_nothing(asyncassets_db, storage):
    n = id(storage)
    Doc = type(
        f"AssignedRequired{n}",
        (Document,),
        {
            "title": StringField(required=True),
            "file": FileField(storage=storage),
            "meta": {"collection": f"assigned_required_{n}"},
        },
    )
    doc = Doc()
    doc.file = b"data"
    with pytest.raises(ValidationError, match="title"):
        await doc.save()
    assert await leftovers(storage, asyncassets_db) == (0, 0)
    doc.title = "fixed"
    await doc.save()  # the data was kept: the retry stores it
    assert await (await Doc.objects.get(pk=doc.pk)).file.read() == b"data"


async def test_a_duplicate_key_removes_the_upload(asyncassets_db, storage):
    n = id(storage)
    Doc = type(
        f"AssignedUnique{n}",
        (Document,),
        {
            "code": IntField(unique=True),
            "file": FileField(storage=storage),
            "meta": {"collection": f"assigned_unique_{n}"},
        },
    )
    first = Doc(code=1)
    first.file = b"first"
    await first.save()
    second = Doc(code=1)
    second.file = b"second"
    with pytest.raises(Exception, match="duplicate"):
        await second.save()
    [entry] = await entries(storage, asyncassets_db)
    assert entry["_id"] == first.file.grid_id
    assert await leftovers(storage, asyncassets_db) == (1, 1)  # the first file's bytes
    assert await (await Doc.objects.get(code=1)).file.read() == b"first"
    assert second.file.grid_id is None and second.file.filename is None


async def test_a_save_cancelled_mid_upload_leaves_no_file_and_no_reference(
    asyncassets_db, storage
):
    Doc = doc_class(storage)
    doc = Doc(name="cancelled")
    doc.picture = Doc.picture.document_type()
    doc.picture.image = b"a first, small file uploaded before the slow one"
    started = asyncio.Event()

    async def slow():  # type: ignore[no-untyped-def]
        for _ in range(50):
            yield payload(256 * KIB)
            started.set()
            await asyncio.sleep(0.01)

    doc.file = slow()
    task = asyncio.create_task(doc.save())
    await started.wait()
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await leftovers(storage, asyncassets_db) == (0, 0)
    assert await Doc.objects.count() == 0
    assert doc.picture.image.grid_id is None and doc.picture.image  # data still assigned


# -- replacing and removing by assignment ---------------------------------------------------


async def test_assignment_replaces_the_old_file_only_after_the_switch(
    asyncassets_db, storage, monkeypatch
):
    Doc = doc_class(storage)
    doc = await Doc(name="r").save()
    await doc.file.put(b"old bytes")
    old_id = doc.file.grid_id
    seen: list[Any] = []
    original = type(doc.file)._drop_replaced

    async def watch(proxy: Any, file_id: Any) -> None:
        seen.append(((await stored(doc)).get("file"), file_id))
        await original(proxy, file_id)

    monkeypatch.setattr(type(doc.file), "_drop_replaced", watch)
    loaded = await Doc.objects.get(pk=doc.pk)
    loaded.file = b"new bytes"
    await loaded.save()
    new_id = loaded.file.grid_id
    assert seen == [(new_id, old_id)]  # deleted when the document held the new one
    assert [e["_id"] for e in await entries(storage, asyncassets_db)] == [new_id]
    assert await (await Doc.objects.get(pk=doc.pk)).file.read() == b"new bytes"


async def test_assigning_none_then_saving_deletes_the_file(asyncassets_db, storage):
    Doc = doc_class(storage)
    doc = Doc(name="gone")
    doc.file = b"to be removed"
    await doc.save()
    loaded = await Doc.objects.get(pk=doc.pk)
    loaded.file = None
    await loaded.save()
    assert "file" not in await stored(loaded)
    assert await leftovers(storage, asyncassets_db) == (0, 0)


async def test_two_saves_of_one_document_with_different_files_one_wins(asyncassets_db, storage):
    Doc = doc_class(storage)
    doc = Doc(name="race")
    doc.file = b"original"
    await doc.save()
    a = await Doc.objects.get(pk=doc.pk)
    b = await Doc.objects.get(pk=doc.pk)
    a.file = slow_pieces(payload(600 * KIB, seed=1), 100 * KIB, delay=0.005)
    b.file = slow_pieces(payload(600 * KIB, seed=2), 100 * KIB, delay=0.005)
    results = await asyncio.gather(a.save(), b.save(), return_exceptions=True)
    failures = [r for r in results if isinstance(r, BaseException)]
    assert len(failures) == 1 and isinstance(failures[0], FileConflict), results
    winner = a if results[0] is a else b
    stored_id = (await stored(doc))["file"]
    assert stored_id == winner.file.grid_id
    # The winner's file alone is left: the original went after the switch, the
    # loser's upload was removed.
    assert [e["_id"] for e in await entries(storage, asyncassets_db)] == [stored_id]
    loaded = await Doc.objects.get(pk=doc.pk)
    assert await loaded.file.read() == payload(600 * KIB, seed=1 if winner is a else 2)


@pytest.mark.parametrize("fault", ["dropped reply", "write concern error"])
async def test_a_save_whose_outcome_is_unknown_deletes_nothing(
    asyncassets_db, monkeypatch, fault
):
    Doc = doc_class(GridFSStorage("assigned_unknown"))
    faults = Faults(Doc._get_collection_name())
    faults.install(monkeypatch)
    doc = Doc(name="u")
    doc.file = b"first"
    await doc.save()
    first = doc.file.grid_id
    doc.file = b"second"
    faults.armed = fault  # the update applies; its reply is lost or says it may not last
    with pytest.raises(Exception) as raised:
        await doc.save()
    assert injected(raised.value)
    second = doc.file.grid_id  # read back: the stored document holds the new file
    assert second is not None and (await stored(doc))["file"] == second
    files = asyncassets_db["assigned_unknown.files"]
    assert {e["_id"] async for e in files.find({})} == {first, second}  # nothing deleted
    assert await doc.file.read() == b"second"


# -- lists and embedded documents -------------------------------------------------------


async def test_lists_and_embedded_documents_take_assigned_data(asyncassets_db, storage):
    Doc = doc_class(storage)
    doc = Doc(name="many", files=[b"one", io.BytesIO(b"two")])
    doc.picture = Doc.picture.document_type(image=b"inside")
    await doc.save()
    loaded = await Doc.objects.get(pk=doc.pk)
    assert [await f.read() for f in loaded.files] == [b"one", b"two"]
    assert await loaded.picture.image.read() == b"inside"
    loaded.files.append(b"three")
    old_image = loaded.picture.image.grid_id
    loaded.picture.image = b"replaced inside"
    await loaded.save()
    again = await Doc.objects.get(pk=doc.pk)
    assert [await f.read() for f in again.files] == [b"one", b"two", b"three"]
    assert await again.picture.image.read() == b"replaced inside"
    ids = {e["_id"] for e in await entries(storage, asyncassets_db)}
    assert old_image not in ids and len(ids) == 4


async def test_assigning_a_file_id_or_a_proxy_keeps_its_meaning(asyncassets_db):
    Doc = doc_class(GridFSStorage("assigned_ids"))
    source = Doc(name="src")
    source.file = b"shared"
    await source.save()
    other = Doc(name="by id")
    other.file = source.file.grid_id
    await other.save()
    copy = Doc(name="by proxy", file=source.file)
    await copy.save()
    await other.delete()  # an id assigned by hand is never deleted from here
    assert await (await Doc.objects.get(pk=copy.pk)).file.read() == b"shared"
    bad = Doc(name="bad")
    bad.file = ObjectId()
    with pytest.raises(FileValidationError, match="names no file"):
        await bad.save()
    with pytest.raises(TypeError, match="not float"):
        bad.file = 1.5


async def test_a_list_field_of_files_still_uploads_with_add_file(asyncassets_db):
    Doc = doc_class(GridFSStorage("assigned_lists"))
    doc = await Doc(name="l").save()
    await doc.add_file("files", b"added")
    doc.files.append(b"assigned")
    await doc.save()
    loaded = await Doc.objects.get(pk=doc.pk)
    assert [await f.read() for f in loaded.files] == [b"added", b"assigned"]


async def test_reload_forgets_the_assignment_and_deletes_nothing(asyncassets_db):
    Doc = doc_class(GridFSStorage("assigned_reload"))
    doc = Doc(name="kept")
    doc.file = b"kept"
    await doc.save()
    doc.file = b"never saved"
    await doc.reload()
    doc.name = "renamed"
    await doc.save()
    assert await (await Doc.objects.get(pk=doc.pk)).file.read() == b"kept"
    assert await asyncassets_db["assigned_reload.files"].count_documents({}) == 1


async def test_a_large_file_object_is_read_in_pieces(asyncassets_db, storage):
    """Bounded memory: the data is streamed, never read whole."""
    sizes: list[int] = []

    class Counting(io.BytesIO):
        def read(self, size: int | None = -1) -> bytes:
            sizes.append(-1 if size is None else size)
            return super().read(size)

    Doc = doc_class(storage)
    doc = Doc(name="big")
    doc.file = Counting(payload(3 * MIB + 1))
    await doc.save()
    assert sizes and all(0 < n <= 5 * MIB for n in sizes), sizes
    assert len(sizes) >= 2
    assert await (await Doc.objects.get(pk=doc.pk)).file.read() == payload(3 * MIB + 1)


async def test_a_queued_storage_field_takes_assigned_data(
    asyncassets_db, tmp_path, request: pytest.FixtureRequest
):
    from asyncassets.storage import FileSystemStorage, QueuedStorage, S3Storage

    bucket = request.getfixturevalue("asyncassets_s3_bucket")
    queued = QueuedStorage(
        local=FileSystemStorage(tmp_path / "spool", fsync=False),
        remote=S3Storage(**{**bucket.options, "prefix": "assigned/", "part_size": 5 * MIB}),
        collection_name="assigned_queued",
    )
    Doc = doc_class(queued)
    doc = Doc(name="q")
    doc.file = AsyncUpload(b"queued bytes", "q.txt", "text/plain")
    await doc.save()
    loaded = await Doc.objects.get(pk=doc.pk)
    assert await loaded.file.read() == b"queued bytes"
    await loaded.file.load()
    assert loaded.file.location == "local" and loaded.file.filename == "q.txt"
    loaded.file = b"replaced"
    await loaded.save()
    assert await asyncassets_db["assigned_queued.files"].count_documents({}) == 1


async def test_an_image_field_takes_an_assigned_image_and_checks_it(asyncassets_db):
    from test_images import make_image

    from asyncassets.fields import ImageField

    Doc = type(
        "AssignedImageDoc",
        (Document,),
        {
            "image": ImageField(thumbnail_size=(10, 10, True), collection_name="assigned_img"),
            "meta": {"collection": "assigned_images"},
        },
    )
    doc = Doc()
    doc.image = io.BytesIO(make_image(40, 30))
    await doc.save()
    loaded = await Doc.objects.get(pk=doc.pk)
    await loaded.image.load()
    assert loaded.image.size == (40, 30) and loaded.image.thumbnail is not None
    loaded.image = b"not an image"
    with pytest.raises(FileValidationError):
        await loaded.save()
    # Refused: the image and its thumbnail are as they were, nothing else is stored.
    assert await asyncassets_db["assigned_img.files"].count_documents({}) == 2
    loaded.image = None
    await loaded.save()
    assert await asyncassets_db["assigned_img.files"].count_documents({}) == 0


_ = ListField  # the list field class the documents above use


async def test_the_documented_example_runs_as_shown(asyncassets_db):
    """docs/files.rst includes examples/assign_on_save.py."""
    assert "literalinclude:: ../examples/assign_on_save.py" in FILES_PAGE
    example = runpy.run_path(str(EXAMPLE))
    png = b"\x89PNG\r\n\x1a\n" + b"\0" * 64
    animal = await example["create"]("Marmota", AsyncUpload(png, "m.png", "image/png"))
    first = animal.photo.grid_id
    assert await (await example["Animal"].objects.get(pk=animal.pk)).photo.read() == png
    refused = await example["change_photo"](animal, b"%PDF-1.4 not a photo")
    assert refused.startswith("refused: ") and "content type" in refused
    files = asyncassets_db["fs.files"]
    assert [e["_id"] async for e in files.find({})] == [first]
    assert (await example["change_photo"](animal, png + b"2")) == "changed"
    assert [e["_id"] async for e in files.find({})] == [animal.photo.grid_id] != [first]
    await example["remove_photo"](animal)
    assert await files.count_documents({}) == 0
    assert await asyncassets_db["fs.chunks"].count_documents({}) == 0


@pytest.mark.parametrize("when", ["during the upload", "during the write"])
async def test_two_tasks_assigning_to_one_document_object_the_last_assignment_wins(
    asyncassets_db, monkeypatch, when
):
    """Same object, two tasks: no file is left that nothing references."""
    Doc = doc_class(GridFSStorage("assigned_same"))
    doc = Doc(name="same")
    doc.file = b"original"
    await doc.save()
    started = asyncio.Event()

    async def slow():  # type: ignore[no-untyped-def]
        for _ in range(5):
            yield b"a" * 1000
            started.set()
            await asyncio.sleep(0.01)

    if when == "during the write":
        original = Doc._write

        async def slow_write(self: Any, *args: Any) -> None:
            started.set()
            await asyncio.sleep(0.05)
            await original(self, *args)

        monkeypatch.setattr(Doc, "_write", slow_write)
        doc.file = b"a" * 5000
    else:
        doc.file = slow()
    first = asyncio.create_task(doc.save())
    await started.wait()
    doc.file = b"b" * 10
    await first
    await doc.save()
    assert await (await Doc.objects.get(pk=doc.pk)).file.read() == b"b" * 10
    files = asyncassets_db["assigned_same.files"]
    assert [e["_id"] async for e in files.find({})] == [doc.file.grid_id]
    assert await asyncassets_db["assigned_same.chunks"].count_documents({}) == 1


@pytest.mark.slow
async def test_a_gib_assigned_as_a_stream_is_saved_in_bounded_memory(asyncassets_db, tmp_path):
    """The big version of test_a_large_file_object_is_read_in_pieces (pytest -m slow)."""
    import hashlib
    import tracemalloc

    from asyncassets.storage import FileSystemStorage

    block = payload(MIB)
    blocks = 1024

    async def gib():  # type: ignore[no-untyped-def]
        for _ in range(blocks):
            yield block

    Doc = doc_class(FileSystemStorage(tmp_path / "big", collection_name="assigned_big"))
    doc = Doc(name="gib")
    doc.file = gib()
    tracemalloc.start()
    try:
        await doc.save()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * MIB, f"saving a GiB held {peak} bytes at its peak"
    assert doc.file.length == blocks * MIB
    expected = hashlib.sha256()
    for _ in range(blocks):
        expected.update(block)
    got = hashlib.sha256()
    async for piece in (await Doc.objects.get(pk=doc.pk)).file.stream():
        got.update(piece)
    assert got.hexdigest() == expected.hexdigest()


async def test_assigning_none_is_conditional_on_the_field_as_loaded(asyncassets_db):
    """``doc.file = None`` means "no file", as loaded: a file another task set
    meanwhile is a conflict, not a reference silently dropped (and leaked)."""
    Doc = doc_class(GridFSStorage("assigned_none"))
    doc = await Doc(name="empty").save()
    other = await Doc.objects.get(pk=doc.pk)
    await other.file.put(b"set by another task")
    doc.file = None
    doc.name = "renamed"
    with pytest.raises(FileConflict, match="no longer holds"):
        await doc.save()
    stored_doc = await stored(doc)
    assert stored_doc["name"] == "empty" and stored_doc["file"] == other.file.grid_id
    await doc.reload()
    doc.name = "renamed"
    await doc.save()  # reloaded: nothing assigned any more
    assert (await stored(doc))["file"] == other.file.grid_id


async def test_a_list_element_replaced_by_index_leaves_the_old_file_to_the_sweep(
    asyncassets_db,
):
    from asyncassets.ops import sweep_orphans

    Doc = doc_class(GridFSStorage("assigned_index"))
    doc = Doc(name="album", files=[b"first", b"second"])
    await doc.save()
    old = doc.files[0].grid_id
    loaded = await Doc.objects.get(pk=doc.pk)
    loaded.files[0] = b"new first"
    await loaded.save()
    again = await Doc.objects.get(pk=doc.pk)
    assert [await f.read() for f in again.files] == [b"new first", b"second"]
    files = asyncassets_db["assigned_index.files"]
    assert await files.count_documents({"_id": old}) == 1  # unreferenced, not deleted
    await sweep_orphans(grace=0)
    assert await files.count_documents({"_id": old}) == 0
    assert await files.count_documents({}) == 2


async def test_an_unknown_outcome_that_did_not_apply_keeps_both_files_and_the_data(
    asyncassets_db, monkeypatch
):
    """The reply is lost before the update reaches the server: nothing applied, and
    nothing may be deleted (the save cannot know); a retry works, the sweep cleans."""
    from pymongo.asynchronous.collection import AsyncCollection
    from pymongo.errors import AutoReconnect

    from asyncassets.ops import sweep_orphans

    Doc = doc_class(GridFSStorage("assigned_lost"))
    doc = Doc(name="lost")
    doc.file = b"first"
    await doc.save()
    first = doc.file.grid_id
    original = AsyncCollection.update_one
    armed = [True]

    async def lost(coll: Any, *args: Any, **kwargs: Any) -> Any:
        if coll.name == Doc._get_collection_name() and armed and armed.pop():
            raise AutoReconnect("injected: connection lost before the update was sent")
        return await original(coll, *args, **kwargs)

    monkeypatch.setattr(AsyncCollection, "update_one", lost)
    doc.file = b"second"
    with pytest.raises(AutoReconnect):
        await doc.save()
    assert (await stored(doc))["file"] == first
    files = asyncassets_db["assigned_lost.files"]
    assert await files.count_documents({}) == 2  # the first, and the upload kept
    assert doc.file.grid_id is None and doc.file.length == 6  # the data, assigned
    await doc.save()  # the retry uploads again and switches
    assert await (await Doc.objects.get(pk=doc.pk)).file.read() == b"second"
    await sweep_orphans(grace=0)  # the upload of the failed save was nobody's
    assert [e["_id"] async for e in files.find({})] == [doc.file.grid_id]
