"""Regression tests for the reference layer: how a document's file references are written.

Each test drives a real interleaving or a real server reply and then checks what a
user relies on, reading the database raw:

- every reference in every stored document names a file that exists in
  ``fs.files``, with all its chunks, and reads back (through a freshly loaded
  document) the bytes it should;
- no file or chunk is left that no stored document references (after the
  operation settled), except where docs/guarantees.rst allows it (a write whose
  outcome is unknown);
- an error, when there is one, is a specific one.
"""

from __future__ import annotations

import asyncio
import gc
import io
from typing import Any

import pytest
from bson import ObjectId
from mongoengine.base.common import _document_registry
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import AutoReconnect, WriteConcernError

import asyncassets
from asyncassets import Document, EmbeddedDocument, ValidationError
from asyncassets.errors import (
    AsyncAssetsError,
    CorruptFile,
    FileConflict,
    FileNotFound,
    FileValidationError,
    PendingFileMissing,
)
from asyncassets.fields import (
    EmbeddedDocumentField,
    FileField,
    GenericEmbeddedDocumentField,
    ListField,
    StringField,
)

# Class names are prefixed "Ref" so they never clash in mongoengine's global
# document registry with the classes of the other test modules.

CHUNK = 16


class RefDoc(Document):
    name = StringField()
    f = FileField(chunk_size=CHUNK)
    meta = {"collection": "ref_docs"}


class RefPage(EmbeddedDocument):
    image = FileField(chunk_size=CHUNK)


class RefAlbum(Document):
    title = StringField()
    cover = EmbeddedDocumentField(RefPage)
    pages = ListField(EmbeddedDocumentField(RefPage))
    photos = ListField(FileField(chunk_size=CHUNK))
    meta = {"collection": "ref_albums"}


class RefNewBook(Document):
    title = StringField()
    cover = EmbeddedDocumentField(RefPage)
    pages = ListField(EmbeddedDocumentField(RefPage))
    meta = {"collection": "ref_new_books"}


class RefItem(EmbeddedDocument):
    label = StringField()
    image = FileField(chunk_size=CHUNK)


class RefHolder(Document):
    name = StringField()
    item = GenericEmbeddedDocumentField()
    meta = {"collection": "ref_holders"}


class RefRequired(Document):
    name = StringField()
    scan = FileField(required=True, chunk_size=CHUNK)
    meta = {"collection": "ref_required"}


# The document lives on a connection with another write concern; its bucket stays
# on the default (acknowledged) connection, in the same database, so that the
# document's reference update is the only write with the odd reply.
W2_ALIAS = "ref_w2"
W0_ALIAS = "ref_w0"


def temporary_document(name: str, alias: str, bucket_alias: str | None) -> type:
    """A Document class on ``alias`` that exists only for one test.

    Classes on aliases that are connected only during their test must not outlive
    it: the sweep and check of later tests refuse to judge a bucket that a class on
    an unconnected alias might reference.
    """
    return type(
        name,
        (Document,),
        {
            "__module__": __name__,
            "name": StringField(),
            "f": FileField(chunk_size=CHUNK, db_alias=bucket_alias),
            "meta": {
                "collection": name.lower(),
                "db_alias": alias,
                "auto_create_index": False,
            },
        },
    )


def forget_document(cls: type) -> None:
    """Unregister a class made by :func:`temporary_document`, and let it be collected."""
    _document_registry.pop(cls._class_name, None)
    del cls
    gc.collect()


STORED_CLASSES = (RefDoc, RefAlbum, RefNewBook, RefHolder, RefRequired)


# -- helpers ------------------------------------------------------------------------


def payload(tag: bytes, size: int = 5 * CHUNK + 3) -> bytes:
    return (tag * size)[:size]


async def stored(doc) -> dict | None:
    """The raw stored document, read straight from its collection."""
    return await type(doc)._get_collection().find_one({"_id": doc.pk})


async def fresh(doc):
    return await type(doc).objects.get(pk=doc.pk)


async def file_ids(db, bucket: str = "fs") -> set:
    return {d["_id"] async for d in db[f"{bucket}.files"].find({}, {"_id": 1})}


async def chunk_owners(db, bucket: str = "fs") -> dict:
    """files_id -> number of chunks, for every chunk in the bucket."""
    owners: dict = {}
    async for c in db[f"{bucket}.chunks"].find({}, {"files_id": 1}):
        owners[c["files_id"]] = owners.get(c["files_id"], 0) + 1
    return owners


def _refs_in(value, top: bool = True) -> list:
    """Every file reference (ObjectId) inside a raw document, except its own _id."""
    found = []
    if isinstance(value, ObjectId):
        found.append(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            if not (top and key == "_id"):
                found.extend(_refs_in(item, top=False))
    elif isinstance(value, list):
        for item in value:
            found.extend(_refs_in(item, top=False))
    return found


async def stored_references(classes=STORED_CLASSES) -> list[tuple[str, object, ObjectId]]:
    """(collection, document _id, file id) for every reference in every stored document."""
    refs = []
    for cls in classes:
        async for raw in cls._get_collection().find({}):
            refs.extend((cls._get_collection_name(), raw["_id"], ref) for ref in _refs_in(raw))
    return refs


async def assert_no_dangling(db, classes=STORED_CLASSES) -> None:
    """Every stored reference names a complete file in fs.files."""
    ids, owners = await file_ids(db), await chunk_owners(db)
    for collection, doc_id, ref in await stored_references(classes):
        assert ref in ids, f"{collection} {doc_id} references file {ref}, missing from fs.files"
        files_doc = await db["fs.files"].find_one({"_id": ref})
        expected_chunks = -(-files_doc["length"] // files_doc["chunkSize"])
        assert owners.get(ref, 0) == expected_chunks, (
            f"{collection} {doc_id} references file {ref} whose chunks were removed "
            f"({owners.get(ref, 0)} of {expected_chunks} left)"
        )


async def leftovers(db, classes=STORED_CLASSES) -> tuple[set, set]:
    """(files no stored document references, chunk owners with no files document)."""
    referenced = {ref for _c, _d, ref in await stored_references(classes)}
    ids, owners = await file_ids(db), await chunk_owners(db)
    return ids - referenced, set(owners) - ids


async def assert_no_leak(db, classes=STORED_CLASSES, timeout: float = 2.0) -> None:
    """Once shielded cleanups settled, nothing is left that nothing references."""
    for _ in range(int(timeout / 0.02)):
        if await leftovers(db, classes) == (set(), set()):
            return
        await asyncio.sleep(0.02)
    unreferenced, stray_chunks = await leftovers(db, classes)
    assert not unreferenced, f"files left that no stored document references: {unreferenced}"
    assert not stray_chunks, f"chunks left whose files document is gone: {stray_chunks}"


async def assert_consistent(db, classes=STORED_CLASSES) -> None:
    await assert_no_dangling(db, classes)
    await assert_no_leak(db, classes)


class SlowInserts:
    """Delays every write that creates a RefDoc on its way to the server."""

    def __init__(self) -> None:
        self.started = asyncio.Event()

    async def in_flight(self, save: asyncio.Task) -> None:
        """Return once the first save()'s insert is on its way."""
        waiter = asyncio.ensure_future(self.started.wait())
        await asyncio.wait({waiter, save}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        assert self.started.is_set(), (
            "save() finished without an insert reaching the slowed collection: the race "
            "was not exercised (does save() write some other way now?)"
        )


_CREATING = ("insert_one", "insert_many", "replace_one", "find_one_and_replace", "bulk_write")


@pytest.fixture
def slow_inserts(monkeypatch):
    """Delay the insert of a new document on its way to the server.

    ``save()`` has already built the document it sends when the insert starts; the
    delay models a slow network or a busy server, so that another operation on
    the same instance runs entirely while the first save() is in flight.
    """
    slow = SlowInserts()

    def slowed(name):
        original = getattr(AsyncCollection, name)

        async def method(self, *args, **kwargs):
            creating = name in _CREATING or kwargs.get("upsert")
            if self.name == "ref_docs" and creating:
                slow.started.set()
                await asyncio.sleep(0.3)
            return await original(self, *args, **kwargs)

        return method

    for name in (*_CREATING, "update_one", "find_one_and_update"):
        monkeypatch.setattr(AsyncCollection, name, slowed(name))
    return slow


# -- 1. a file change racing the document's first save() ---------------------------------


async def test_replace_while_first_save_in_flight_keeps_stored_reference_valid(
    asyncassets_db, slow_inserts
):
    doc = RefDoc(name="racing")
    await doc.f.put(b"a")
    first = doc.f.file_id
    save = asyncio.create_task(doc.save())
    await slow_inserts.in_flight(save)
    await doc.f.replace(b"b")
    await save

    await assert_no_dangling(asyncassets_db)
    raw = await stored(doc)
    assert raw is not None
    assert raw.get("f") is not None and raw["f"] != first, (
        f"the stored document still references the replaced file {first}"
    )
    assert await (await fresh(doc)).f.read() == b"b"
    assert first not in await file_ids(asyncassets_db)  # file "a" is gone: no leak
    await assert_consistent(asyncassets_db)


async def test_replace_right_after_starting_first_save_keeps_stored_reference_valid(
    asyncassets_db,
):
    """The same race with no injected slowdown, as a user writes it; 20 times in a row.

    The document is large (a few MiB), so that its insert takes the server longer
    than the small upload replace() makes.
    """
    body = "n" * (2 << 20)
    for i in range(20):
        doc = RefDoc(name=f"{body}{i}")
        await doc.f.put(b"a")
        save = asyncio.create_task(doc.save())
        for _ in range(i % 4):
            await asyncio.sleep(0)
        await doc.f.replace(b"b")
        await save
        ref = (await stored(doc)).get("f")
        assert ref in await file_ids(asyncassets_db), (
            f"round {i}: the stored document references file {ref}, which was deleted"
        )
        assert await (await fresh(doc)).f.read() == b"b", f"round {i}"
    await assert_consistent(asyncassets_db)


async def test_delete_while_first_save_in_flight_never_leaves_a_dangling_reference(
    asyncassets_db, slow_inserts
):
    doc = RefDoc(name="racing")
    await doc.f.put(b"a")
    first = doc.f.file_id
    save = asyncio.create_task(doc.save())
    await slow_inserts.in_flight(save)
    await doc.f.delete()
    await save

    await assert_no_dangling(asyncassets_db)
    raw = await stored(doc)
    assert raw is not None
    if raw.get("f") is not None:  # the delete lost to the insert: the file must still be there
        assert raw["f"] == first
        assert await (await fresh(doc)).f.read() == b"a"
    else:
        assert not (await fresh(doc)).f
    await assert_consistent(asyncassets_db)


async def test_put_while_first_save_in_flight_is_not_lost(asyncassets_db, slow_inserts):
    doc = RefDoc(name="racing")
    save = asyncio.create_task(doc.save())
    await slow_inserts.in_flight(save)
    await doc.f.put(b"x")
    await save

    raw = await stored(doc)
    assert raw is not None
    assert raw.get("f") == doc.f.file_id, (
        f"the stored document does not reference the file put() uploaded: {raw}"
    )
    assert await (await fresh(doc)).f.read() == b"x"
    await assert_consistent(asyncassets_db)


# -- 2. abort() or delete() while close() of the same upload is in flight ----------------


class Stages:
    """Wire-level marks of a streaming upload's close: each write is applied, then its
    reply is slowed a little, so another call can strike while it is in flight."""

    names = ("chunks", "files", "switch")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.reached = {name: asyncio.Event() for name in self.names}

    def stage_of(self, collection: str, method: str) -> str | None:
        if collection.endswith(".chunks") and method in ("insert_one", "insert_many", "bulk_write"):
            return "chunks"
        if collection.endswith(".files") and method in ("insert_one", "replace_one"):
            return "files"
        if collection == "ref_docs" and method in ("update_one", "find_one_and_update"):
            return "switch"
        return None

    async def strike_at(self, stage: str | None, close_task: asyncio.Task, yields: int) -> None:
        """Return once ``stage`` was reached (or close() finished), then yield ``yields`` times."""
        if stage is not None:
            waiter = asyncio.ensure_future(self.reached[stage].wait())
            await asyncio.wait({waiter, close_task}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
        for _ in range(yields):
            await asyncio.sleep(0)


@pytest.fixture
def upload_stages(monkeypatch):
    stages = Stages()

    def marked(name):
        original = getattr(AsyncCollection, name)

        async def method(self, *args, **kwargs):
            stage = stages.stage_of(self.name, name)
            result = await original(self, *args, **kwargs)
            if stage is not None:
                stages.reached[stage].set()
                await asyncio.sleep(0.01)  # applied; the reply is on its way
            return result

        return method

    for name in (
        "insert_one",
        "insert_many",
        "bulk_write",
        "replace_one",
        "update_one",
        "find_one_and_update",
    ):
        monkeypatch.setattr(AsyncCollection, name, marked(name))
    return stages


@pytest.mark.parametrize("second", ["abort", "delete"])
async def test_abort_or_delete_while_close_in_flight_never_references_a_removed_file(
    asyncassets_db, upload_stages, second
):
    """20 rounds, striking at every stage of close(): before it starts, while its last
    chunks, its files document or the reference switch are in flight."""
    strikes = [None, "chunks", "files", "switch"]
    for i in range(20):
        doc = await RefDoc(name=f"upload {i}").save()
        data = payload(b"%d" % i, 10 * CHUNK + 3)
        await doc.f.new_file(content_type="text/plain")
        await doc.f.write(data)
        upload_stages.reset()
        close_task = asyncio.create_task(doc.f.close())
        await upload_stages.strike_at(strikes[i % 4], close_task, yields=i // 4)
        try:
            await getattr(doc.f, second)()
            second_error = None
        except AsyncAssetsError as exc:  # e.g. UploadClosed: the close is finishing
            second_error = exc
        try:
            await close_task
            close_error = None
        except AsyncAssetsError as exc:
            close_error = exc
        context = (
            f"round {i} (strike at {strikes[i % 4]}): close() -> {close_error!r}, "
            f"{second}() -> {second_error!r}"
        )
        for error in (second_error, close_error):
            assert not isinstance(error, (CorruptFile, FileNotFound)), context

        ref = (await stored(doc)).get("f")
        if ref is not None:
            assert ref in await file_ids(asyncassets_db), (
                f"{context}: the stored document references file {ref}, which was removed"
            )
            assert await (await fresh(doc)).f.read() == data, context
        if close_error is not None:
            assert ref is None, f"{context}: close() failed, yet the document references {ref}"
        elif second_error is not None:
            assert ref is not None, (
                f"{context}: close() succeeded and {second}() failed, yet the stored "
                "document references no file"
            )
        await assert_consistent(asyncassets_db)


# -- 3. an update the server applied but whose reply is an error --------------------------


@pytest.fixture
async def w2_alias(asyncassets_db, asyncassets_server_uri):
    """RefDocW2's connection: same database, write concern w=2.

    On a standalone server (SecantusDB, or a standalone mongod) a w=2 write is
    applied, and its reply carries a writeConcernError (UnsatisfiableWriteConcern).
    """
    asyncassets.connect(host=asyncassets_server_uri, alias=W2_ALIAS, db=asyncassets_db.name, w=2)
    holder = [temporary_document("RefDocW2", W2_ALIAS, "default")]
    try:
        yield holder
    finally:
        await asyncassets.disconnect(W2_ALIAS)
        forget_document(holder.pop())


@pytest.fixture
async def w0_alias(asyncassets_db, asyncassets_server_uri):
    """RefDocW0's connection: same database, unacknowledged writes (w=0)."""
    asyncassets.connect(host=asyncassets_server_uri, alias=W0_ALIAS, db=asyncassets_db.name, w=0)
    holder = [
        temporary_document("RefDocW0", W0_ALIAS, "default"),
        temporary_document("RefDocAllW0", W0_ALIAS, None),
    ]
    try:
        yield holder
    finally:
        await asyncassets.disconnect(W0_ALIAS)
        while holder:
            forget_document(holder.pop())


async def assert_unknown_outcome_kept_data(db, cls, doc, old: bytes, new: bytes) -> None:
    """Whatever replace() reported, the stored reference reads whole, old or new bytes."""
    raw = await cls._get_collection().find_one({"_id": doc.pk})
    ref = raw.get("f")
    assert ref is not None, "the stored document lost its file reference"
    assert ref in await file_ids(db), f"the stored document references file {ref}, deleted"
    data = await (await cls.objects.get(pk=doc.pk)).f.read()
    assert data in (old, new)
    await assert_no_dangling(db, (cls,))
    # Files whose reference state was unknown may stay for the sweep, but no more.
    unreferenced, stray_chunks = await leftovers(db, (cls,))
    assert len(unreferenced) <= 1 and not stray_chunks


async def test_replace_applied_with_a_write_concern_error_reply_keeps_a_valid_reference(
    asyncassets_db, w2_alias
):
    RefDocW2 = w2_alias[0]
    doc = RefDocW2(name="w2")
    await doc.f.put(b"old bytes")
    await doc.save(write_concern={"w": 1})
    doc = await RefDocW2.objects.get(pk=doc.pk)
    try:
        await doc.f.replace(b"new bytes")
    except WriteConcernError:
        pass  # the reply was an error; the update may still have been applied (it was)
    await assert_unknown_outcome_kept_data(
        asyncassets_db, RefDocW2, doc, b"old bytes", b"new bytes"
    )


@pytest.fixture
def write_concern_error_after_update(monkeypatch):
    """Apply the next reference update of a RefDoc, then raise WriteConcernError.

    What a replica set answers when the write applied on the primary but the
    write concern timed out (wtimeout): the write stays applied.
    """
    applied: list[bool] = []

    def failing(name):
        original = getattr(AsyncCollection, name)

        async def method(self, *args, **kwargs):
            result = await original(self, *args, **kwargs)
            if self.name == "ref_docs" and not applied:
                applied.append(
                    result.modified_count == 1 if name == "update_one" else result is not None
                )
                raise WriteConcernError(
                    "injected: waiting for replication timed out",
                    64,
                    {"code": 64, "codeName": "WriteConcernFailed", "errInfo": {"wtimeout": True}},
                )
            return result

        return method

    for name in ("update_one", "find_one_and_update"):
        monkeypatch.setattr(AsyncCollection, name, failing(name))
    return applied


async def test_replace_applied_then_write_concern_error_keeps_a_valid_reference(
    asyncassets_db, write_concern_error_after_update
):
    doc = RefDoc(name="wce")
    await doc.f.put(b"old bytes")
    await doc.save()  # an insert: the fault waits for the first update
    doc = await RefDoc.objects.get(pk=doc.pk)
    try:
        await doc.f.replace(b"new bytes")
    except WriteConcernError:
        pass
    assert write_concern_error_after_update == [True], (
        "the fault was not injected: the reference switch was not an update_one or "
        "find_one_and_update on the document's collection"
    )
    await assert_unknown_outcome_kept_data(asyncassets_db, RefDoc, doc, b"old bytes", b"new bytes")


async def _settle_unacknowledged(cls, doc, old_id) -> None:
    """Give an unacknowledged update time to reach the server (it may never)."""
    for _ in range(50):
        raw = await cls._get_collection().find_one({"_id": doc.pk})
        if raw.get("f") != old_id:
            return
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("which", [0, 1], ids=["doc_w0", "doc_and_bucket_w0"])
async def test_unacknowledged_replace_keeps_a_valid_reference(asyncassets_db, w0_alias, which):
    cls = w0_alias[which]
    doc = cls(name="w0")
    await doc.f.put(b"old bytes")
    await doc.save(write_concern={"w": 1})
    doc = await cls.objects.get(pk=doc.pk)
    old_id = doc.f.file_id
    # The reference writer writes the switch with w=1 (it must know whether it
    # applied), so the replace succeeds even on an unacknowledged connection.
    await doc.f.replace(b"new bytes")
    await _settle_unacknowledged(cls, doc, old_id)
    await assert_unknown_outcome_kept_data(asyncassets_db, cls, doc, b"old bytes", b"new bytes")
    assert await (await cls.objects.get(pk=doc.pk)).f.read() == b"new bytes"


# -- 4. a change through an embedded document whose parent was garbage-collected ---------


async def cover_of(pk):
    album = await RefAlbum.objects.get(pk=pk)
    return album.cover  # the album itself is garbage once this returns


async def first_page_of(pk):
    album = await RefAlbum.objects.get(pk=pk)
    return album.pages[0]


async def saved_album_with_pages() -> RefAlbum:
    album = RefAlbum(title="gc", cover=RefPage(), pages=[RefPage()])
    await album.cover.image.put(b"original cover")
    await album.pages[0].image.put(b"original page")
    return await album.save()


@pytest.mark.parametrize("where", ["cover", "pages"])
@pytest.mark.parametrize("op", ["replace", "delete"])
async def test_change_through_embedded_document_of_a_collected_parent_never_deletes_the_stored_file(
    asyncassets_db, where, op
):
    album = await saved_album_with_pages()
    original_bytes = b"original cover" if where == "cover" else b"original page"
    page = await (cover_of(album.pk) if where == "cover" else first_page_of(album.pk))
    gc.collect()
    original = page.image.file_id

    def stored_ref(raw):
        return raw["cover"].get("image") if where == "cover" else raw["pages"][0].get("image")

    try:
        if op == "replace":
            await page.image.replace(b"x")
        else:
            await page.image.delete()
    except FileConflict:
        # Refused: the stored album keeps its intact original file.
        await assert_no_dangling(asyncassets_db)
        assert stored_ref(await stored(album)) == original
        loaded = await fresh(album)
        held = loaded.cover if where == "cover" else loaded.pages[0]
        assert await held.image.read() == original_bytes
    else:
        # Worked: the stored album follows the change.
        await assert_no_dangling(asyncassets_db)
        ref = stored_ref(await stored(album))
        loaded = await fresh(album)
        held = loaded.cover if where == "cover" else loaded.pages[0]
        if op == "replace":
            assert ref is not None and ref != original, (
                f"replace() returned, but the stored album still references {original}"
            )
            assert await held.image.read() == b"x"
        else:
            assert ref is None, f"delete() returned, but the stored album references {ref}"
        assert original not in await file_ids(asyncassets_db)
    await assert_consistent(asyncassets_db)


# -- 5. proxies and embedded documents shared between documents ---------------------------


async def test_replace_through_a_proxy_copied_into_another_document_updates_its_own_document(
    asyncassets_db,
):
    src = RefAlbum(title="src")
    await src.add_file("photos", b"old photo")
    await src.save()
    src = await fresh(src)
    copy = RefAlbum(title="copy", photos=list(src.photos))
    await copy.save()

    await src.photos[0].replace(b"x")

    await assert_no_dangling(asyncassets_db)
    src_raw, copy_raw = await stored(src), await stored(copy)
    assert src_raw["photos"] and copy_raw["photos"]
    assert await (await fresh(src)).photos[0].read() == b"x", (
        f"src's stored document was not updated: {src_raw}, copy: {copy_raw}"
    )
    assert await (await fresh(copy)).photos[0].read() == b"old photo"
    await assert_consistent(asyncassets_db)


@pytest.mark.parametrize("where", ["pages", "cover"])
async def test_replace_through_an_embedded_document_shared_with_another_document_updates_its_own(
    asyncassets_db, where
):
    old = RefAlbum(title="old", cover=RefPage(), pages=[RefPage()])
    await old.cover.image.put(b"old cover")
    await old.pages[0].image.put(b"old page")
    await old.save()
    old = await fresh(old)
    new = RefNewBook(title="new", pages=list(old.pages), cover=old.cover)
    await new.save()

    if where == "pages":
        await old.pages[0].image.replace(b"x")
    else:
        await old.cover.image.replace(b"x")

    await assert_no_dangling(asyncassets_db)
    loaded_old, loaded_new = await fresh(old), await fresh(new)
    if where == "pages":
        assert await loaded_old.pages[0].image.read() == b"x", await stored(old)
        assert await loaded_new.pages[0].image.read() == b"old page"
        assert await loaded_old.cover.image.read() == b"old cover"
    else:
        assert await loaded_old.cover.image.read() == b"x", await stored(old)
        assert await loaded_new.cover.image.read() == b"old cover"
        assert await loaded_old.pages[0].image.read() == b"old page"
    await assert_consistent(asyncassets_db)


# -- 6. cascade through GenericEmbeddedDocumentField ---------------------------------------


async def saved_holder(name: str, data: bytes) -> RefHolder:
    holder = RefHolder(name=name, item=RefItem(label=name))
    await holder.item.image.put(data)
    return await holder.save()


async def test_document_delete_cascades_through_a_generic_embedded_document(asyncassets_db):
    holder = await saved_holder("a", payload(b"h"))
    assert (await stored(holder))["item"]["image"] == holder.item.image.file_id
    await holder.delete()
    assert await stored(holder) is None
    assert await file_ids(asyncassets_db) == set(), "the deleted holder's file was kept"
    assert await chunk_owners(asyncassets_db) == {}, "the deleted holder's chunks were kept"


async def test_queryset_delete_cascades_through_a_generic_embedded_document(asyncassets_db):
    gone = await saved_holder("gone", payload(b"g"))
    kept = await saved_holder("kept", payload(b"k"))
    assert await RefHolder.objects(name="gone").delete() == 1
    assert await (await fresh(kept)).item.image.read() == payload(b"k")
    ids = await file_ids(asyncassets_db)
    assert gone.item.image.file_id not in ids, "the deleted holder's file was kept"
    assert ids == {kept.item.image.file_id}
    assert set(await chunk_owners(asyncassets_db)) == {kept.item.image.file_id}


# -- 10. FileField(required=True) is enforced -------------------------------------------


async def _touch_only(doc: RefRequired) -> None:
    assert not doc.scan  # reading the empty field is all


async def _put_then_delete(doc: RefRequired) -> None:
    await doc.scan.put(b"briefly")
    await doc.scan.delete()


async def _untouched(doc: RefRequired) -> None:
    return None


@pytest.mark.parametrize(
    "before", [_untouched, _touch_only, _put_then_delete], ids=["untouched", "read", "put_delete"]
)
async def test_required_file_field_refuses_to_save_an_empty_field(asyncassets_db, before):
    doc = RefRequired(name="needs a scan")
    await before(doc)
    with pytest.raises(ValidationError) as excinfo:
        await doc.save()
    assert "scan" in str(excinfo.value), excinfo.value
    assert await RefRequired._get_collection().count_documents({}) == 0
    await assert_no_leak(asyncassets_db)


# -- 11. put() into an embedded element appended to a saved document ----------------------


@pytest.mark.parametrize("loaded", [False, True], ids=["same_instance", "loaded_again"])
async def test_put_into_an_embedded_element_appended_before_save_is_saved_with_it(
    asyncassets_db, loaded
):
    album = RefAlbum(title="t", pages=[RefPage()])
    await album.pages[0].image.put(b"first")
    await album.save()
    if loaded:
        album = await fresh(album)

    album.pages.append(RefPage())
    await album.pages[-1].image.put(b"x")  # must not raise FileConflict
    await album.save()

    raw = await stored(album)
    assert len(raw["pages"]) == 2
    assert raw["pages"][1].get("image") == album.pages[1].image.file_id
    again = await fresh(album)
    assert await again.pages[0].image.read() == b"first"
    assert await again.pages[1].image.read() == b"x"
    await assert_consistent(asyncassets_db)


# -- 12. raw file ids assigned to a ListField(FileField()) ---------------------------------


async def uploaded(data: bytes) -> ObjectId:
    """The id of a file uploaded through an unsaved document (no one references it yet)."""
    carrier = RefDoc()
    await carrier.f.put(data)
    return carrier.f.file_id


async def test_raw_file_ids_assigned_to_a_list_of_files_are_saved_and_read_back(asyncassets_db):
    first, second = await uploaded(b"one"), await uploaded(b"two")
    album = RefAlbum(title="ids")
    album.photos = [first, second]
    await album.save()

    assert (await stored(album))["photos"] == [first, second]
    assert await album.photos[0].read() == b"one"
    loaded = await fresh(album)
    assert [await p.read() for p in loaded.photos] == [b"one", b"two"]
    await assert_consistent(asyncassets_db)


async def test_a_raw_id_naming_no_file_in_a_list_of_files_is_refused_at_save(asyncassets_db):
    real = await uploaded(b"one")
    album = RefAlbum(title="ids")
    album.photos = [real, ObjectId()]
    with pytest.raises(FileValidationError) as excinfo:
        await album.save()
    message = str(excinfo.value)
    assert (excinfo.value.field_name or "").startswith("photos"), message
    assert "photos" in message, message
    assert not message.startswith("None") and "None takes" not in message, message
    assert await RefAlbum._get_collection().count_documents({}) == 0


# -- 13. a proxy as a query value ----------------------------------------------------------


@pytest.mark.parametrize(
    "query",
    [
        lambda doc: {"f": doc.f},
        lambda doc: {"f": doc.f.file_id},
        lambda doc: {"f__in": [doc.f]},
    ],
    ids=["proxy", "file_id", "in_proxies"],
)
async def test_querying_by_a_file_finds_the_document(asyncassets_db, query):
    other = RefDoc(name="other")
    await other.f.put(b"other")
    await other.save()
    doc = RefDoc(name="wanted")
    await doc.f.put(b"wanted")
    await doc.save()

    found = await RefDoc.objects(**query(doc)).to_list()
    assert [d.pk for d in found] == [doc.pk]


async def test_querying_a_list_of_files_by_one_of_its_proxies_finds_the_document(asyncassets_db):
    other = RefAlbum(title="other")
    await other.add_file("photos", b"other")
    await other.save()
    album = RefAlbum(title="wanted")
    await album.add_file("photos", b"a")
    await album.add_file("photos", b"b")
    await album.save()

    found = await RefAlbum.objects(photos=album.photos[1]).to_list()
    assert [d.pk for d in found] == [album.pk]


# -- 15. constructor values go through the same checks as assignment ---------------------


@pytest.mark.parametrize("as_hex", [False, True], ids=["object_id", "hex_string"])
async def test_an_unknown_file_id_given_to_the_constructor_is_refused_at_save(
    asyncassets_db, as_hex
):
    missing = ObjectId()
    doc = RefDoc(name="ctor", f=str(missing) if as_hex else missing)
    with pytest.raises(FileValidationError) as excinfo:
        await doc.save()
    assert excinfo.value.field_name == "f", excinfo.value
    assert await RefDoc._get_collection().count_documents({}) == 0


async def test_an_unknown_file_id_is_refused_at_save_like_an_assigned_one(asyncassets_db):
    """The reference behaviour the constructor must match."""
    doc = RefDoc(name="assigned")
    doc.f = ObjectId()
    with pytest.raises(FileValidationError) as excinfo:
        await doc.save()
    assert excinfo.value.field_name == "f", excinfo.value
    assert await RefDoc._get_collection().count_documents({}) == 0


@pytest.mark.parametrize(
    ("make", "expected"),
    [(lambda: b"", b""), (lambda: io.BytesIO(b"x"), b"x")],
    ids=["empty_bytes", "file_object"],
)
async def test_bytes_or_a_file_object_given_to_the_constructor_are_uploaded_by_save(
    asyncassets_db, make, expected
):
    """Issue 24: data given to the constructor (or assigned) uploads on save()."""
    doc = RefDoc(name="ctor", f=make())
    assert await asyncassets_db["fs.files"].count_documents({}) == 0  # not before save
    await doc.save()
    assert (await stored(doc))["f"] == doc.f.grid_id
    assert await (await fresh(doc)).f.read() == expected
    await assert_consistent(asyncassets_db)


@pytest.mark.parametrize("as_hex", [False, True], ids=["object_id", "hex_string"])
async def test_an_existing_file_id_given_to_the_constructor_is_saved_and_reads_back(
    asyncassets_db, as_hex
):
    file_id = await uploaded(b"existing")
    doc = RefDoc(name="ctor", f=str(file_id) if as_hex else file_id)
    await doc.save()
    assert (await stored(doc))["f"] == file_id
    assert await (await fresh(doc)).f.read() == b"existing"
    await assert_consistent(asyncassets_db)


# -- what the orphan sweep's grace protects, and sharing after a cascade -----------------


async def test_save_refuses_a_new_file_the_sweep_removed_before_it(asyncassets_db):
    doc = RefDoc(name="slow save")
    await doc.f.put(b"uploaded, not saved yet")
    # The upload is referenced in memory only: a sweep with no grace takes it.
    report = await asyncassets.sweep_orphans(grace=0)
    assert report.files_deleted == 1
    with pytest.raises(PendingFileMissing, match="grace") as caught:
        await doc.save()
    assert isinstance(caught.value, FileNotFound)
    assert await RefDoc._get_collection().count_documents({}) == 0


async def test_a_saved_file_is_no_longer_pending(asyncassets_db):
    doc = RefDoc(name="saved")
    await doc.f.put(b"kept")
    await doc.save()
    assert (await asyncassets.sweep_orphans(grace=0)).files_deleted == 0
    doc.name = "renamed"
    await doc.save()  # the file is stored now: nothing to re-check, nothing missing
    assert await (await fresh(doc)).f.read() == b"kept"


async def test_put_into_a_new_list_element_is_checked_again_at_save(asyncassets_db):
    album = await RefAlbum(title="a").save()
    album.pages.append(RefPage())
    await album.pages[-1].image.put(b"page")
    await asyncassets.sweep_orphans(grace=0)
    with pytest.raises(PendingFileMissing):
        await album.save()
    assert (await stored(album)).get("pages", []) == []


async def test_deleting_a_document_keeps_a_file_a_live_copy_still_references(asyncassets_db):
    src = RefAlbum(title="src")
    await src.add_file("photos", b"shared photo")
    await src.save()
    copy = await RefAlbum(title="copy", photos=list(src.photos)).save()

    await src.delete()

    assert await (await fresh(copy)).photos[0].read() == b"shared photo"
    await assert_no_dangling(asyncassets_db)


async def test_a_stored_value_that_is_no_file_id_still_loads_and_reads_as_missing(asyncassets_db):
    # Written by another tool, or by an older version that let Doc(f=b"") through.
    await RefDoc._get_collection().insert_one({"_id": ObjectId(), "name": "odd", "f": b""})
    doc = await RefDoc.objects.get(name="odd")
    with pytest.raises(FileNotFound):
        await doc.f.read()


# -- found by the race suite (tests/test_races.py) ----------------------------------------


async def test_deleting_an_element_of_an_unsaved_list_of_files_removes_it(asyncassets_db):
    album = RefAlbum(title="new")
    await album.add_file("photos", b"one")
    await album.add_file("photos", b"two")
    gone = album.photos[0].file_id
    await album.photos[0].delete()
    assert len(album.photos) == 1 and album.photos[0].file_id is not None
    await album.save()
    assert await (await fresh(album)).photos[0].read() == b"two"
    assert gone not in await file_ids(asyncassets_db)


@pytest.fixture
def insert_reply_lost(monkeypatch):
    """The next insert into ref_docs is applied, then its reply is lost."""
    original = AsyncCollection.insert_one
    armed = [True]

    async def insert_one(self, document, *args, **kwargs):
        result = await original(self, document, *args, **kwargs)
        if self.name == "ref_docs" and armed[0]:
            armed[0] = False
            raise AutoReconnect("connection closed (injected, after the insert applied)")
        return result

    monkeypatch.setattr(AsyncCollection, "insert_one", insert_one)
    return armed


async def test_a_first_save_whose_reply_was_lost_leaves_the_document_usable(
    asyncassets_db, insert_reply_lost
):
    doc = RefDoc(name="lost reply")
    await doc.f.put(b"first")
    with pytest.raises(AutoReconnect):
        await doc.save()
    assert doc.pk is not None  # the id it may be stored under
    # The insert did apply: the switch finds the stored document and updates it.
    await doc.f.replace(b"second")
    assert await (await RefDoc.objects.get(pk=doc.pk)).f.read() == b"second"
    await doc.save()  # saving again is safe (an upsert on the same _id)
    assert await RefDoc._get_collection().count_documents({}) == 1
    await assert_no_dangling(asyncassets_db)


async def test_put_into_an_element_another_writer_removed_is_a_conflict(asyncassets_db):
    album = await RefAlbum(title="a", pages=[RefPage(), RefPage()]).save()
    stale = await fresh(album)
    album.pages.pop()
    await album.save()  # another writer removed the second page
    with pytest.raises(FileConflict):
        await stale.pages[1].image.put(b"lost?")
    assert await file_ids(asyncassets_db) == set()  # the upload was removed again


async def test_a_replace_whose_upload_the_sweep_removed_before_the_switch_changes_nothing(
    asyncassets_db: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The upload ends, the process stalls (a loaded machine) for longer than the
    sweep's grace, and the sweep removes the file nothing references yet. The
    switch must not then reference it (issue #22: a dangling reference, seen in the
    deployment test with a 5 s grace): it raises PendingFileMissing, as save() does,
    and the document keeps its old file."""
    from asyncassets import check, references, sweep_orphans

    class Stalled(Document):
        f = FileField(collection_name="stalled")

    doc = Stalled()
    await doc.f.put(b"old" * 100)
    await doc.save()
    update = references._update

    async def stalled(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(1.2)  # the upload is older than the grace meanwhile
        await sweep_orphans(grace=1)
        return await update(*args, **kwargs)

    monkeypatch.setattr(references, "_update", stalled)
    with pytest.raises(PendingFileMissing, match="grace"):
        await doc.f.replace(b"new" * 100)
    stored = await Stalled.objects.get(pk=doc.pk)
    assert await stored.f.read() == b"old" * 100
    assert (await check()).ok


async def test_one_entry_adopted_twice_keeps_the_reference_and_the_file(asyncassets_db):
    """Two writers adopting the same finished file (a retried finish racing the
    first): the second's switch finds the document already holding that file. It
    must not delete it as "its" failed upload: the document would dangle."""
    doc = RefDoc(name="a")
    await doc.f.put(b"old bytes")
    await doc.save()
    old = doc.f.grid_id
    first = await RefDoc.objects.no_files().get(pk=doc.pk)
    second = await RefDoc.objects.no_files().get(pk=doc.pk)
    entry = await first.f._bucket().upload(io.BytesIO(b"adopted bytes"), filename="n.bin")

    await asyncio.gather(first.f.adopt(entry), second.f.adopt(entry))

    stored = await asyncassets_db.ref_docs.find_one({"_id": doc.pk})
    assert stored["f"] == entry["_id"]
    assert first.f.grid_id == second.f.grid_id == entry["_id"]
    fresh = await RefDoc.objects.get(pk=doc.pk)
    assert await fresh.f.read() == b"adopted bytes"
    assert await asyncassets_db["fs.files"].count_documents({"_id": old}) == 0
    assert await asyncassets_db["fs.files"].count_documents({}) == 1
