"""The guarantees of docs/guarantees.rst, each checked by injecting the failure.

After every injected failure the tests check the same three things a user relies
on: no stored document points at a missing or half-written file (it reads back
whole), no file a stored document references was deleted, and nothing is left in
the bucket except what the guarantees page says may be (orphans from an unsaved
document, chunks of an upload cut short by a crash).
"""

from __future__ import annotations

import asyncio
import logging
import math

import pytest
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import ConnectionFailure, PyMongoError

import asyncassets
from asyncassets import (
    Document,
    EmbeddedDocument,
    FileConflict,
    NotUniqueError,
    ValidationError,
)
from asyncassets.embedded import EmbeddedServer
from asyncassets.fields import (
    EmbeddedDocumentField,
    FileField,
    ListField,
    StringField,
)
from asyncassets.storage.gridfs import GridBucket
from asyncassets.testing import unique_db_name

# Class names are prefixed "Guard" so they never clash in mongoengine's global
# document registry with the classes of the other test modules.

CHUNK = 16
BIG_CHUNK = 64 * 1024  # an upload inserts chunks in batches of 2 MiB: 32 of these
PIECE = BIG_CHUNK
BATCH_PIECES = 40  # more than one batch, so chunks reach the server before we strike


class GuardAnimal(Document):
    name = StringField()
    photo = FileField(chunk_size=CHUNK)
    big = FileField(chunk_size=BIG_CHUNK)
    meta = {"collection": "animals"}


class GuardUnique(Document):
    code = StringField(unique=True)
    name = StringField(required=True)
    photo = FileField(chunk_size=CHUNK)


class GuardPicture(EmbeddedDocument):
    image = FileField(chunk_size=CHUNK)


class GuardAlbum(Document):
    title = StringField()
    photo = FileField(chunk_size=CHUNK)
    cover = EmbeddedDocumentField(GuardPicture)
    pictures = ListField(EmbeddedDocumentField(GuardPicture))
    attachments = ListField(FileField(chunk_size=CHUNK))
    kept = FileField(chunk_size=CHUNK, cascade=False)
    kept_list = ListField(FileField(chunk_size=CHUNK, cascade=False))


# -- helpers ------------------------------------------------------------------


async def bucket_state(db, bucket: str = "fs") -> tuple[int, int]:
    return (
        await db[f"{bucket}.files"].count_documents({}),
        await db[f"{bucket}.chunks"].count_documents({}),
    )


async def file_ids(db, bucket: str = "fs") -> set:
    return {d["_id"] async for d in db[f"{bucket}.files"].find({}, {"_id": 1})}


async def chunk_owners(db, bucket: str = "fs") -> dict:
    """files_id -> number of chunks, for every chunk in the bucket."""
    owners: dict = {}
    async for c in db[f"{bucket}.chunks"].find({}, {"files_id": 1}):
        owners[c["files_id"]] = owners.get(c["files_id"], 0) + 1
    return owners


async def stored(doc) -> dict | None:
    return await type(doc)._get_collection().find_one({"_id": doc.pk})


async def fresh(doc):
    return await type(doc).objects(pk=doc.pk).first()


async def wait_until(predicate, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if await predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"still not true after {timeout} s: {predicate.__name__}")


def payload(tag: bytes, size: int = 5 * CHUNK + 3) -> bytes:
    return (tag * size)[:size]


async def saved_animal(data: bytes = b"old bytes, still wanted") -> GuardAnimal:
    animal = GuardAnimal(name="a")
    await animal.photo.put(data)
    return await animal.save()


async def assert_reads(doc_cls, field: str, expected: dict) -> None:
    """Every stored document reads back exactly ``expected[pk]`` (no dangling)."""
    async for doc in doc_cls.objects:
        assert await getattr(doc, field).read() == expected[doc.pk]


class Gate:
    """An async source that yields ``before`` bytes, then waits for ``go``."""

    def __init__(self, before: int, after: int = 0, piece: int = PIECE) -> None:
        self.before, self.after, self.piece = before, after, piece
        self.go = asyncio.Event()
        self.waiting = asyncio.Event()

    async def __aiter__(self):
        for _ in range(self.before // self.piece):
            await asyncio.sleep(0)
            yield b"n" * self.piece
        self.waiting.set()
        await self.go.wait()
        for _ in range(self.after // self.piece):
            await asyncio.sleep(0)
            yield b"m" * self.piece


def raising_source(after: int):
    async def source():
        yield b"x" * after
        await asyncio.sleep(0)
        raise RuntimeError("the source broke")

    return source()


@pytest.fixture
def deletions(monkeypatch):
    """Record every GridBucket.delete with whether a stored document still held the id.

    A stored document that references a file being deleted is exactly the
    "lost data" the guarantees rule out.
    """
    record: list[tuple[object, bool]] = []
    original = GridBucket.delete

    async def delete(self, file_id):
        held = False
        for cls in (GuardAnimal, GuardUnique, GuardAlbum):
            raw = await cls._get_collection().find_one(
                {
                    "$or": [
                        {"photo": file_id},
                        {"big": file_id},
                        {"cover.image": file_id},
                        {"pictures.image": file_id},
                        {"attachments": file_id},
                        {"kept": file_id},
                        {"kept_list": file_id},
                    ]
                }
            )
            held = held or raw is not None
        record.append((file_id, held))
        return await original(self, file_id)

    monkeypatch.setattr(GridBucket, "delete", delete)
    return record


# -- an exception inside the async with block ----------------------------------------


async def test_exception_inside_new_file_block_aborts_the_upload(asyncassets_db):
    animal = GuardAnimal()
    with pytest.raises(RuntimeError, match="inside the block"):
        async with animal.photo.new_file(content_type="text/plain"):
            await animal.photo.write(payload(b"a", 10 * CHUNK))  # awaited: chunks are sent
            assert (await bucket_state(asyncassets_db))[1] == 10
            raise RuntimeError("inside the block")
    assert not animal.photo
    assert await bucket_state(asyncassets_db) == (0, 0)
    await animal.save()
    assert await (await fresh(animal)).photo.read() is None


async def test_exception_inside_a_replacing_block_keeps_the_old_file(asyncassets_db):
    animal = await saved_animal()
    old_id = animal.photo.file_id
    before = await bucket_state(asyncassets_db)
    with pytest.raises(RuntimeError):
        async with animal.photo.new_file(replace=True):
            await animal.photo.write(payload(b"b", 10 * CHUNK))
            raise RuntimeError("inside the block")
    assert animal.photo.file_id == old_id
    assert (await stored(animal))["photo"] == old_id
    assert await (await fresh(animal)).photo.read() == b"old bytes, still wanted"
    assert await bucket_state(asyncassets_db) == before


async def test_a_failing_source_leaves_nothing_and_keeps_the_old_file(asyncassets_db):
    animal = await saved_animal()
    before = await bucket_state(asyncassets_db)
    with pytest.raises(RuntimeError, match="source broke"):
        await animal.photo.replace(raising_source(10 * CHUNK))
    assert await (await fresh(animal)).photo.read() == b"old bytes, still wanted"
    assert await bucket_state(asyncassets_db) == before


# -- cancellation ---------------------------------------------------------------

_CANCEL_AFTER_APPLIED = (
    "FileProxy._commit (asyncassets/files/proxy.py) deletes the new upload on any "
    "BaseException from persist_reference, including a CancelledError raised after the "
    "server applied the $set: the stored document then references a deleted file"
)


async def _chunks_arrived(db, at_least: int = 1):
    async def check() -> bool:
        return await db["fs.chunks"].count_documents({}) >= at_least

    return check


@pytest.mark.parametrize("saved", [False, True], ids=["new-doc", "saved-doc"])
async def test_cancelling_a_put_mid_upload_removes_its_chunks(asyncassets_db, saved):
    animal = GuardAnimal()
    if saved:
        await animal.save()
    source = Gate(before=BATCH_PIECES * PIECE, after=PIECE)
    task = asyncio.create_task(animal.big.put(source))
    await source.waiting.wait()
    await wait_until(await _chunks_arrived(asyncassets_db))  # the upload really is under way
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not animal.big
    assert await bucket_state(asyncassets_db) == (0, 0)
    if saved:
        assert "big" not in await stored(animal)


async def test_cancelling_a_replace_mid_upload_keeps_the_old_file(asyncassets_db):
    animal = GuardAnimal()
    await animal.big.put(b"old big file")
    await animal.save()
    old_id = animal.big.file_id
    source = Gate(before=BATCH_PIECES * PIECE)
    task = asyncio.create_task(animal.big.replace(source))
    await source.waiting.wait()
    await wait_until(await _chunks_arrived(asyncassets_db, 2))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert animal.big.file_id == old_id
    assert (await stored(animal))["big"] == old_id
    assert await (await fresh(animal)).big.read() == b"old big file"
    assert await bucket_state(asyncassets_db) == (1, 1)


@pytest.mark.parametrize("replace", [False, True], ids=["new-file", "replacing"])
async def test_cancelling_inside_an_async_with_block_aborts(asyncassets_db, replace):
    animal = GuardAnimal()
    if replace:
        await animal.big.put(b"old big file")
    await animal.save()
    reached = asyncio.Event()

    async def writer():
        async with animal.big.new_file(replace=replace):
            for _ in range(BATCH_PIECES):
                await animal.big.write(b"w" * PIECE)
            animal.big.write(b"unawaited tail")
            reached.set()
            await asyncio.Event().wait()  # until cancelled

    task = asyncio.create_task(writer())
    await reached.wait()
    assert (await bucket_state(asyncassets_db))[1] >= BATCH_PIECES
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    if replace:
        assert await (await fresh(animal)).big.read() == b"old big file"
        assert await bucket_state(asyncassets_db) == (1, 1)
    else:
        assert not animal.big
        assert await bucket_state(asyncassets_db) == (0, 0)
        assert "big" not in await stored(animal)


async def test_cancelling_a_replace_at_any_point_never_dangles(asyncassets_db):
    """Cancel a replace after 0, 1, 2... loop iterations: every outcome is consistent.

    Goes on until the replace finished before the cancel a few times in a row, so
    every await of the replace, commit included, was a cancellation point once.
    """
    animal = await saved_animal()
    expected = b"old bytes, still wanted"
    finished_in_a_row = 0
    for steps in range(1000):
        new = payload(bytes([65 + steps % 26]), 3 * CHUNK)
        task = asyncio.create_task(animal.photo.replace(new))
        for _ in range(steps):
            await asyncio.sleep(0)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            finished_in_a_row = 0
        else:
            finished_in_a_row += 1
        loaded = await fresh(animal)
        data = await loaded.photo.read()
        # The stored document reads a whole file: the old one or the new one (a
        # cancel that lands after the switch still leaves the replace done).
        assert data in (expected, new), f"cancelled after {steps} steps"
        if finished_in_a_row:
            assert data == new, f"finished after {steps} steps"
        expected = data

        async def only_the_referenced_file_left(file_id=loaded.photo.file_id) -> bool:
            ids, owners = await file_ids(asyncassets_db), await chunk_owners(asyncassets_db)
            return ids == set(owners) == {file_id}

        # A cancelled caller leaves its shielded cleanup running: give it a moment.
        await wait_until(only_the_referenced_file_left, timeout=2)
        animal = loaded
        if finished_in_a_row == 5:
            break


@pytest.fixture
def reply_lost(monkeypatch):
    """Let the next update of a stored document reach the server, then slow its reply.

    Models a task cancelled (a request timeout, a client that went away) after the
    server applied the conditional update but before its reply arrived. The reply
    does come, late: a library that shields the update from the cancel gets it.
    """
    applied = asyncio.Event()
    original = AsyncCollection.update_one

    async def update_one(self, *args, **kwargs):
        result = await original(self, *args, **kwargs)
        if self.name in {"animals", "guard_album"} and not applied.is_set():
            applied.set()
            await asyncio.sleep(0.3)  # the test cancels the caller meanwhile
        return result

    monkeypatch.setattr(AsyncCollection, "update_one", update_one)
    return applied


async def test_cancelling_a_replace_after_the_server_switched_the_reference(
    asyncassets_db, reply_lost
):
    animal = await saved_animal()
    task = asyncio.create_task(animal.photo.replace(b"new bytes"))
    await reply_lost.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    loaded = await fresh(animal)
    # Either file is fine, as long as the stored document can read it.
    assert await loaded.photo.read() in (b"old bytes, still wanted", b"new bytes")


async def test_cancelling_a_delete_after_the_server_unset_the_reference(asyncassets_db, reply_lost):
    animal = await saved_animal()
    task = asyncio.create_task(animal.photo.delete())
    await reply_lost.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    loaded = await fresh(animal)
    assert not loaded.photo  # the reference is gone; the file may stay as an orphan
    assert await loaded.photo.read() is None


async def test_cancelling_add_file_after_the_server_pushed_the_id(asyncassets_db, reply_lost):
    album = await GuardAlbum(title="t").save()
    task = asyncio.create_task(album.add_file("attachments", b"attached"))
    await reply_lost.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    loaded = await fresh(album)
    for proxy in loaded.attachments:
        assert await proxy.read() == b"attached"


# -- a failed save() after a put --------------------------------------------------


async def test_failed_validation_on_save_leaves_only_an_orphan_file(asyncassets_db):
    """The upload of a document that never got saved is an orphan, by design.

    put() on a new document uploads at once; if save() then fails nothing
    references the file. docs/guarantees.rst lists this as an orphan for the sweep;
    what must never happen is a stored document pointing at a missing file.
    """
    doc = GuardUnique(code="a")  # name is required and missing
    await doc.photo.put(b"unsaved")
    with pytest.raises(ValidationError, match="name"):
        await doc.save()
    assert await asyncassets_db["guard_unique"].count_documents({}) == 0
    assert await file_ids(asyncassets_db) == {doc.photo.file_id}  # the orphan
    # Fixing the document and saving again uses the same, complete file.
    doc.name = "fixed"
    await doc.save()
    assert await (await fresh(doc)).photo.read() == b"unsaved"


async def test_duplicate_key_on_save_keeps_the_stored_document_whole(asyncassets_db):
    first = GuardUnique(code="a", name="first")
    await first.photo.put(b"first file")
    await first.save()
    second = GuardUnique(code="a", name="second")
    await second.photo.put(b"second file")
    with pytest.raises(NotUniqueError):
        await second.save()
    await assert_reads(GuardUnique, "photo", {first.pk: b"first file"})
    # The second upload is an orphan (nothing references it); the first is intact.
    assert await file_ids(asyncassets_db) == {first.photo.file_id, second.photo.file_id}
    assert (await stored(first))["photo"] == first.photo.file_id


async def test_a_failed_save_after_put_on_a_saved_document_still_reads(asyncassets_db):
    doc = await GuardUnique(code="a", name="n").save()
    await doc.photo.put(b"written at once")  # a saved document's reference moves now
    doc.name = None
    with pytest.raises(ValidationError):
        await doc.save()
    await assert_reads(GuardUnique, "photo", {doc.pk: b"written at once"})
    assert await bucket_state(asyncassets_db) == (1, 1)


async def test_a_failed_save_after_replace_never_points_at_the_old_file(asyncassets_db):
    doc = GuardUnique(code="a", name="n")
    await doc.photo.put(b"one")
    await doc.save()
    await doc.photo.replace(b"two")
    doc.name = None
    with pytest.raises(ValidationError):
        await doc.save()
    await assert_reads(GuardUnique, "photo", {doc.pk: b"two"})
    assert await file_ids(asyncassets_db) == {doc.photo.file_id}


# -- concurrent writers ---------------------------------------------------------------


_SAME_INSTANCE_RACE = (
    "FileProxy.replace (asyncassets/files/proxy.py) reads the id it replaces "
    "(previous=self.grid_id, passed to _commit) only after its upload finished, so a "
    "replace started before a concurrent one on the same instance committed silently "
    "overwrites it (and deletes the winner's file) instead of raising FileConflict"
)


def released_together(data: bytes, gates: list[asyncio.Event], mine: int):
    """An async source that yields ``data`` once every racer has started uploading."""

    async def source():
        yield data[: len(data) // 2]
        gates[mine].set()
        for gate in gates:
            await gate.wait()
        yield data[len(data) // 2 :]

    return source()


async def assert_one_winner(db, doc_cls, pk, results, candidates: dict) -> None:
    """Exactly one replace won; the bucket holds its file and nothing else."""
    conflicts = [r for r in results if isinstance(r, FileConflict)]
    others = [r for r in results if isinstance(r, BaseException) and r not in conflicts]
    assert not others, others
    assert len(conflicts) == len(results) - 1, results
    loaded = await doc_cls.objects(pk=pk).first()
    winner = await loaded.photo.read()
    assert winner in candidates.values()
    assert await file_ids(db) == {loaded.photo.file_id}
    assert await chunk_owners(db) == {loaded.photo.file_id: math.ceil(len(winner) / CHUNK)}


async def test_concurrent_replaces_on_separately_loaded_instances(asyncassets_db):
    animal = await saved_animal()
    a, b = await fresh(animal), await fresh(animal)
    gates = [asyncio.Event(), asyncio.Event()]
    data = {"a": payload(b"A", 7 * CHUNK + 1), "b": payload(b"B", 4 * CHUNK)}
    results = await asyncio.gather(
        a.photo.replace(released_together(data["a"], gates, 0)),
        b.photo.replace(released_together(data["b"], gates, 1)),
        return_exceptions=True,
    )
    await assert_one_winner(asyncassets_db, GuardAnimal, animal.pk, results, data)
    # The winner's instance knows its file; the loser still holds the old id.
    winner, loser = (a, b) if isinstance(results[1], FileConflict) else (b, a)
    assert winner.photo.file_id == (await stored(animal))["photo"]
    assert loser.photo.file_id == animal.photo.file_id


async def test_concurrent_replaces_on_the_same_instance(asyncassets_db):
    """Both replaces start from the old file, so the one that commits second loses.

    The slow upload's last piece waits until the fast replace has returned: the
    order is fixed, and so is the expected outcome.
    """
    animal = await saved_animal()
    data = {"fast": payload(b"F", 3 * CHUNK), "slow": payload(b"S", 5 * CHUNK + 2)}
    fast_done = asyncio.Event()

    async def fast():
        try:
            return await animal.photo.replace(data["fast"])
        finally:
            fast_done.set()

    async def slow_source():
        yield data["slow"][:CHUNK]
        await fast_done.wait()
        yield data["slow"][CHUNK:]

    results = await asyncio.gather(
        fast(), animal.photo.replace(slow_source()), return_exceptions=True
    )
    assert isinstance(results[1], FileConflict), results
    await assert_one_winner(asyncassets_db, GuardAnimal, animal.pk, results, data)
    assert await (await fresh(animal)).photo.read() == data["fast"]
    assert animal.photo.file_id == (await stored(animal))["photo"]


async def test_a_stale_instance_loses_and_leaves_nothing(asyncassets_db):
    animal = await saved_animal()
    stale = await fresh(animal)
    await animal.photo.replace(b"newer")
    with pytest.raises(FileConflict, match="Reload"):
        await stale.photo.replace(b"stale write")
    with pytest.raises(FileConflict):
        await stale.photo.delete()
    with pytest.raises(FileConflict):
        async with stale.photo.new_file(replace=True):
            stale.photo.write(b"stale stream")
    await assert_reads(GuardAnimal, "photo", {animal.pk: b"newer"})
    assert await file_ids(asyncassets_db) == {animal.photo.file_id}
    assert await bucket_state(asyncassets_db) == (1, 1)
    await stale.reload()
    await stale.photo.replace(b"after reload")
    await assert_reads(GuardAnimal, "photo", {animal.pk: b"after reload"})


async def test_concurrent_replace_and_delete(asyncassets_db):
    animal = await saved_animal()
    a, b = await fresh(animal), await fresh(animal)
    results = await asyncio.gather(
        a.photo.replace(b"replaced"), b.photo.delete(), return_exceptions=True
    )
    assert sum(isinstance(r, FileConflict) for r in results) == 1, results
    loaded = await fresh(animal)
    if isinstance(results[0], FileConflict):  # the delete won
        assert not loaded.photo
        assert await bucket_state(asyncassets_db) == (0, 0)
    else:
        assert await loaded.photo.read() == b"replaced"
        assert await file_ids(asyncassets_db) == {loaded.photo.file_id}


async def test_replace_of_a_document_deleted_meanwhile_leaves_nothing(asyncassets_db):
    animal = await saved_animal()
    await (await fresh(animal)).delete()
    with pytest.raises(FileConflict):
        await animal.photo.replace(b"too late")
    assert await bucket_state(asyncassets_db) == (0, 0)


async def test_add_file_to_a_document_deleted_meanwhile_leaves_nothing(asyncassets_db):
    album = await GuardAlbum(title="t").save()
    await (await fresh(album)).delete()
    with pytest.raises(FileConflict):
        await album.add_file("attachments", b"too late")
    assert await bucket_state(asyncassets_db) == (0, 0)


# -- replace and delete: the old file goes only after the reference moved -----------


async def test_replace_deletes_the_old_file_only_after_the_reference_moved(
    asyncassets_db, deletions
):
    animal = await saved_animal()
    old_id = animal.photo.file_id
    await animal.photo.replace(b"new")
    assert deletions == [(old_id, False)]


async def test_delete_deletes_the_file_only_after_the_reference_is_gone(asyncassets_db, deletions):
    album = GuardAlbum(cover=GuardPicture(), pictures=[GuardPicture()])
    await album.photo.put(b"top")
    await album.cover.image.put(b"cover")
    await album.pictures[0].image.put(b"pic")
    await album.add_file("attachments", b"att")
    await album.save()
    for proxy in (album.photo, album.cover.image, album.pictures[0].image, album.attachments[0]):
        await proxy.delete()
    assert len(deletions) == 4
    assert not any(held for _, held in deletions), deletions
    assert await bucket_state(asyncassets_db) == (0, 0)


async def test_a_failing_old_file_deletion_never_breaks_the_document(
    asyncassets_db, monkeypatch, caplog
):
    animal = await saved_animal()
    old_id = animal.photo.file_id

    async def broken_delete(self, file_id):
        raise ConnectionFailure("injected: the server went away")

    monkeypatch.setattr(GridBucket, "delete", broken_delete)
    # The switch applied: the replace succeeded. The failed cleanup is logged, not
    # raised as if the replace had failed (issue #22).
    with caplog.at_level(logging.WARNING, logger="asyncassets.files"):
        await animal.photo.replace(b"new")
    assert "injected" in caplog.text and "orphan sweep" in caplog.text
    assert animal.photo.file_id != old_id
    await assert_reads(GuardAnimal, "photo", {animal.pk: b"new"})
    # The old file could not be deleted: it is an orphan, not a dangling reference.
    assert await file_ids(asyncassets_db) == {old_id, animal.photo.file_id}

    await animal.photo.delete()
    assert not animal.photo
    assert not (await fresh(animal)).photo


async def test_a_failing_reference_update_removes_the_new_upload(asyncassets_db, monkeypatch):
    animal = await saved_animal()
    old_id = animal.photo.file_id

    async def refused(self, *args, **kwargs):
        raise PyMongoError("injected: the update was refused")

    monkeypatch.setattr(AsyncCollection, "update_one", refused)
    with pytest.raises(PyMongoError, match="injected"):
        await animal.photo.replace(b"new")
    with pytest.raises(PyMongoError, match="injected"):
        await animal.photo.delete()
    monkeypatch.undo()
    assert animal.photo.file_id == old_id
    await assert_reads(GuardAnimal, "photo", {animal.pk: b"old bytes, still wanted"})
    assert await file_ids(asyncassets_db) == {old_id}
    assert set(await chunk_owners(asyncassets_db)) == {old_id}


# -- cascade ----------------------------------------------------------------------


async def full_album(title: str) -> tuple[GuardAlbum, set, set]:
    """An album with a file in every kind of place; returns (album, cascading, kept)."""
    album = GuardAlbum(title=title, cover=GuardPicture(), pictures=[GuardPicture(), GuardPicture()])
    await album.photo.put(b"top " + title.encode())
    await album.cover.image.put(b"cover")
    await album.pictures[0].image.put(b"pic 0")
    await album.pictures[1].image.put(b"pic 1")
    await album.add_file("attachments", b"att 0")
    await album.add_file("attachments", b"att 1")
    await album.kept.put(b"kept")
    await album.add_file("kept_list", b"kept in list")
    await album.save()
    cascading = {
        album.photo.file_id,
        album.cover.image.file_id,
        album.pictures[0].image.file_id,
        album.pictures[1].image.file_id,
        *(f.file_id for f in album.attachments),
    }
    kept = {album.kept.file_id, album.kept_list[0].file_id}
    return album, cascading, kept


async def test_document_delete_cascades_to_every_file_except_cascade_false(
    asyncassets_db, deletions
):
    album, cascading, kept = await full_album("one")
    other, other_cascading, other_kept = await full_album("two")
    await (await fresh(album)).delete()
    assert await file_ids(asyncassets_db) == other_cascading | other_kept | kept
    assert set(await chunk_owners(asyncassets_db)) == other_cascading | other_kept | kept
    assert {file_id for file_id, _ in deletions} == cascading
    assert not any(held for _, held in deletions)  # the document went first
    assert await (await fresh(other)).photo.read() == b"top two"


async def test_queryset_delete_cascades_only_to_the_matched_documents(asyncassets_db, deletions):
    _one, one_cascading, one_kept = await full_album("one")
    two, two_cascading, two_kept = await full_album("two")
    _three, three_cascading, three_kept = await full_album("three")
    assert await GuardAlbum.objects(title__in=["one", "three"]).delete() == 2
    assert [a.title async for a in GuardAlbum.objects] == ["two"]
    assert await file_ids(asyncassets_db) == two_cascading | two_kept | one_kept | three_kept
    assert {file_id for file_id, _ in deletions} == one_cascading | three_cascading
    assert not any(held for _, held in deletions)
    loaded = await fresh(two)
    assert [await p.image.read() for p in loaded.pictures] == [b"pic 0", b"pic 1"]


async def test_delete_of_a_document_whose_file_is_already_gone(asyncassets_db):
    animal = await saved_animal()
    await asyncassets_db["fs.files"].delete_many({})
    await animal.delete()
    assert await asyncassets_db.animals.count_documents({}) == 0
    assert await bucket_state(asyncassets_db) == (0, 0)


# -- a killed server ------------------------------------------------------------------

CRASH_ALIAS = "guard_crash"


class GuardCrash(Document):
    name = StringField()
    big = FileField(chunk_size=BIG_CHUNK)
    meta = {"db_alias": CRASH_ALIAS}


@pytest.fixture
async def own_server(tmp_path):
    """A server of this test's own, on disk, that the test may kill."""
    server = EmbeddedServer(storage_path=tmp_path / "db")
    server.start()
    name = unique_db_name("guard_crash")
    asyncassets.connect(host=server.uri, alias=CRASH_ALIAS, db=name, serverSelectionTimeoutMS=1000)
    try:
        yield server
    finally:
        await asyncassets.disconnect(CRASH_ALIAS)
        server.stop()


@pytest.mark.parametrize("kind", ["replace-on-saved-doc", "put-on-new-doc"])
async def test_killing_the_server_mid_upload_keeps_the_saved_bytes(own_server, kind):
    doc = GuardCrash(name="survivor")
    await doc.big.put(b"old bytes before the crash")
    await doc.save()
    old_id = doc.big.file_id
    db = asyncassets.get_db(CRASH_ALIAS)

    source = Gate(before=BATCH_PIECES * PIECE, after=BATCH_PIECES * PIECE)
    newcomer = GuardCrash(name="never saved")
    if kind == "replace-on-saved-doc":
        task = asyncio.create_task(doc.big.replace(source))
    else:
        task = asyncio.create_task(newcomer.big.put(source))
    await source.waiting.wait()

    async def chunks_of_new_upload() -> bool:
        return await db["fs.chunks"].count_documents({"files_id": {"$ne": old_id}}) > 0

    await wait_until(chunks_of_new_upload)
    own_server.kill()
    source.go.set()  # the upload goes on against a dead server
    with pytest.raises(PyMongoError):
        await task
    own_server.start()  # same storage, same port

    loaded = await GuardCrash.objects(name="survivor").first()
    assert loaded.big.file_id == old_id
    assert await loaded.big.read() == b"old bytes before the crash"
    assert await GuardCrash.objects.count() == 1
    # No files document for the partial upload; what it may leave is chunks with no
    # files document at all, which only the orphan sweep is meant to remove.
    assert await file_ids(db) == {old_id}
    leftovers = await chunk_owners(db)
    assert leftovers.pop(old_id) == 1
    assert len(leftovers) <= 1
    for files_id in leftovers:
        assert await db["fs.files"].count_documents({"_id": files_id}) == 0


@pytest.mark.parametrize("how", ["reassigned", "reloaded"])
async def test_a_proxy_detached_from_its_saved_document_changes_nothing(asyncassets_db, how):
    """An old handle must not delete the file the stored document still uses."""
    animal = await saved_animal()
    old = animal.photo
    if how == "reassigned":
        animal.photo = None
    else:
        await animal.reload()
    with pytest.raises(FileConflict, match="no longer part"):
        await old.replace(b"written through a stale handle")
    with pytest.raises(FileConflict, match="no longer part"):
        await old.delete()
    assert (await stored(animal))["photo"] == old.file_id
    await assert_reads(GuardAnimal, "photo", {animal.pk: b"old bytes, still wanted"})
    assert await file_ids(asyncassets_db) == {old.file_id}
    assert set(await chunk_owners(asyncassets_db)) == {old.file_id}
