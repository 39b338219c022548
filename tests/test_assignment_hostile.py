"""Hostile uses of assigning data to a file field and of the query's entry prefetch.

What docs/files.rst ("Assigning data") promises, checked against the real server
with what a careless or hostile caller hands over: the wrong kinds of data, file
objects that misbehave, hostile names and content types, a document copied or
serialised while an upload is pending, and the bulk paths that bypass save().
"""

from __future__ import annotations

import array
import asyncio
import copy
import io
import json
from typing import Any

import pytest
from bson import ObjectId, Regex
from test_storages import KIB, MIB, doc_class, leftovers, make_storage, payload, stored_entry

from asyncassets.errors import FileNotFound, FileValidationError, UploadClosed
from asyncassets.storage import GridFSStorage

_n = iter(range(10**6))


def gridfs() -> GridFSStorage:
    return GridFSStorage(f"hostile{next(_n)}")


async def stored(doc: Any) -> dict[str, Any]:
    found = await type(doc)._get_collection().find_one({"_id": doc.pk})
    assert found is not None
    return dict(found)


async def yields(*pieces: Any):  # type: ignore[no-untyped-def]
    for piece in pieces:
        await asyncio.sleep(0)
        yield piece


@pytest.mark.parametrize("bad", ["text", 42, None, [b"x"]], ids=["str", "int", "None", "list"])
async def test_an_async_iterable_yielding_non_bytes_is_refused_and_leaves_nothing(
    asyncassets_db, bad
):
    storage = gridfs()
    Doc = doc_class(storage)
    doc = Doc(name="x")
    doc.file = yields(b"first", bad, b"last")
    with pytest.raises(TypeError, match="bytes"):
        await doc.save()
    assert await leftovers(storage, asyncassets_db) == (0, 0)
    assert await Doc.objects.count() == 0


async def test_a_closed_file_is_refused_with_value_error(asyncassets_db):
    storage = gridfs()
    Doc = doc_class(storage)
    f = io.BytesIO(b"data")
    f.close()
    doc = Doc(name="x")
    with pytest.raises(ValueError, match="closed"):
        doc.file = f
        await doc.save()
    assert await leftovers(storage, asyncassets_db) == (0, 0)
    assert await Doc.objects.count() == 0


async def test_a_text_mode_file_is_refused_with_type_error(asyncassets_db, tmp_path):
    storage = gridfs()
    Doc = doc_class(storage)
    path = tmp_path / "a.txt"
    path.write_text("hello")
    doc = Doc(name="x")
    with open(path) as f:  # noqa: ASYNC230
        with pytest.raises(TypeError):
            doc.file = f
            await doc.save()
    assert await leftovers(storage, asyncassets_db) == (0, 0)
    assert await Doc.objects.count() == 0


def test_a_sync_generator_is_refused_at_assignment():
    Doc = doc_class(gridfs())
    doc = Doc(name="x")
    with pytest.raises(TypeError):
        doc.file = (piece for piece in [b"a", b"b"])


class Exploding(io.RawIOBase):
    """A file object whose read() fails after some bytes."""

    def __init__(self, good: int) -> None:
        self.left = good

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if self.left <= 0:
            raise OSError("disk on fire")
        n = min(self.left, size if size > 0 else self.left)
        self.left -= n
        return b"x" * n


async def test_a_file_whose_read_fails_midway_leaves_nothing(asyncassets_db):
    storage = gridfs()
    Doc = doc_class(storage)
    doc = await Doc(name="x").save()
    doc.file = Exploding(700 * KIB)
    with pytest.raises(OSError, match="disk on fire"):
        await doc.save()
    assert await leftovers(storage, asyncassets_db) == (0, 0)
    assert "file" not in await stored(doc)


class Greedy(io.RawIOBase):
    """A file object that returns more than asked for."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        piece = self.data[self.pos : self.pos + max(size, 0) * 3 + 1]
        self.pos += len(piece)
        return piece


async def test_a_file_that_returns_more_than_asked_is_stored_whole_or_refused(asyncassets_db):
    storage = gridfs()
    Doc = doc_class(storage)
    data = payload(600 * KIB + 3)
    doc = Doc(name="x")
    doc.file = Greedy(data)
    await doc.save()
    assert await (await Doc.objects.get(pk=doc.pk)).file.read() == data


async def test_a_greedy_file_cannot_slip_past_max_size(asyncassets_db):
    storage = gridfs()
    Doc = doc_class(storage, max_size=100 * KIB)
    doc = Doc(name="x")
    doc.file = Greedy(payload(MIB))
    with pytest.raises(FileValidationError):
        await doc.save()
    assert await leftovers(storage, asyncassets_db) == (0, 0)


async def test_a_huge_stream_into_a_max_size_field_is_not_read_to_its_end(asyncassets_db):
    storage = gridfs()
    Doc = doc_class(storage, max_size=MIB)
    pulled = 0

    async def endless():  # type: ignore[no-untyped-def]
        nonlocal pulled
        while True:
            pulled += 64 * KIB
            yield b"\0" * (64 * KIB)
            if pulled > 64 * MIB:
                raise AssertionError("the whole stream was read")

    doc = Doc(name="x")
    doc.file = endless()
    with pytest.raises(FileValidationError):
        await doc.save()
    assert pulled <= 2 * MIB
    assert await leftovers(storage, asyncassets_db) == (0, 0)


class Named:
    def __init__(self, filename: Any, content_type: Any, data: bytes = b"%PDF-1.4 x") -> None:
        self.file = io.BytesIO(data)
        self.filename = filename
        self.content_type = content_type

    async def read(self, size: int = -1) -> bytes:
        return self.file.read(size)

    async def seek(self, offset: int) -> None:
        self.file.seek(offset)


@pytest.mark.parametrize(
    "filename",
    [
        "../../etc/passwd",
        "..",
        ".",
        "/",
        "a\x00b.pdf",
        "\x00",
        "x" * 300_000 + ".pdf",
        "evil\u202efdp.exe",
        "C:\\Windows\\system32\\cmd.pdf",
        "line\nbreak.pdf",
    ],
    ids=[
        "traversal",
        "dotdot",
        "dot",
        "slash",
        "nul",
        "only-nul",
        "300k",
        "rtl",
        "windows",
        "newline",
    ],
)
async def test_a_hostile_upload_filename_is_sanitised_or_refused(asyncassets_db, filename):
    storage = gridfs()
    Doc = doc_class(storage)
    doc = Doc(name="x")
    doc.file = Named(filename, "application/pdf")
    try:
        await doc.save()
    except FileValidationError:
        assert await leftovers(storage, asyncassets_db) == (0, 0)
        return
    entry = await stored_entry(storage, asyncassets_db, doc.file.grid_id)
    name = entry.get("filename")
    if name is not None:
        assert "/" not in name and "\\" not in name and "\x00" not in name
        assert "\u202e" not in name and "\n" not in name
        assert name not in ("..", ".")
        assert len(name.encode()) <= 1024


@pytest.mark.parametrize("content_type", ["IMAGE/PNG", "image/png; charset=binary", " image/png"])
async def test_an_upload_content_type_is_judged_on_its_essence_and_stored_as_given(
    asyncassets_db, content_type
):
    # As put() does: the catalogue keeps what the client declared; the field's
    # allowed types ignore case and parameters, serving parses it again.
    storage = gridfs()
    Doc = doc_class(storage, allowed_content_types=["image/png"])
    doc = Doc(name="x")
    doc.file = Named("a.png", content_type, b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    await doc.save()
    entry = await stored_entry(storage, asyncassets_db, doc.file.grid_id)
    assert entry["metadata"]["content_type"] == content_type


@pytest.mark.parametrize(
    "content_type", ["text/html\r\nX: y", "x" * 100_000, "image/png\r\n", "image/*"]
)
async def test_a_hostile_upload_content_type_is_refused_by_the_allowed_types(
    asyncassets_db, content_type
):
    storage = gridfs()
    Doc = doc_class(storage, allowed_content_types=["image/png"])
    doc = Doc(name="x")
    doc.file = Named("a.png", content_type, b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    with pytest.raises(FileValidationError, match="content type"):
        await doc.save()
    assert await leftovers(storage, asyncassets_db) == (0, 0)


async def test_a_non_string_upload_content_type_is_ignored_and_sniffed(asyncassets_db):
    storage = gridfs()
    Doc = doc_class(storage)
    doc = Doc(name="x")
    doc.file = Named("upload", b"image/png", b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    await doc.save()
    entry = await stored_entry(storage, asyncassets_db, doc.file.grid_id)
    assert entry["metadata"]["content_type"] == "image/png"


# -- a pending upload in copies, serialisation, validation -------------------------------


async def test_validate_without_save_uploads_nothing(asyncassets_db):
    storage = gridfs()
    Doc = doc_class(storage)
    doc = Doc(name="x")
    doc.file = b"data"
    doc.validate()
    assert await leftovers(storage, asyncassets_db) == (0, 0)
    await doc.save()
    assert await doc.file.read() == b"data"


# mongoengine's to_json() warns that it falls back to legacy JSON options: theirs.
@pytest.mark.filterwarnings("ignore:No 'json_options' are specified:DeprecationWarning")
async def test_to_mongo_and_to_json_of_a_pending_upload_leak_no_bytes(asyncassets_db):
    Doc = doc_class(gridfs())
    doc = Doc(name="x")
    doc.file = b"SECRET-BYTES"
    son = doc.to_mongo()
    assert b"SECRET-BYTES" not in repr(son).encode()
    text = doc.to_json()
    assert "SECRET" not in text and "U0VDUkVU" not in text
    json.loads(text)


@pytest.mark.parametrize("how", [copy.copy, copy.deepcopy], ids=["copy", "deepcopy"])
@pytest.mark.parametrize("where", ["field", "list", "embedded"])
async def test_copying_a_document_with_a_pending_upload_is_refused_not_emptied(
    asyncassets_db, how, where
):
    # mongoengine copies through to_mongo(), where pending data has no id yet:
    # the copy's save() stored the document with no file, silently.
    storage = gridfs()
    Doc = doc_class(storage)
    doc = Doc(name="x")
    if where == "field":
        doc.file = b"data"
    elif where == "list":
        doc.files = [b"data"]
    else:
        doc.picture = Doc.picture.document_type(image=b"data")
    with pytest.raises(TypeError, match=r"save\(\) first"):
        how(doc)
    await doc.save()
    twin = how(doc)  # once saved, it copies as mongoengine's does
    assert twin.pk == doc.pk
    assert await leftovers(storage, asyncassets_db) == (1, 1)


async def test_saving_twice_uploads_once(asyncassets_db):
    storage = gridfs()
    Doc = doc_class(storage)
    doc = Doc(name="x")
    doc.file = b"data"
    await doc.save()
    first = doc.file.grid_id
    await doc.save()
    assert doc.file.grid_id == first
    assert await leftovers(storage, asyncassets_db) == (1, 1)


async def test_one_file_object_assigned_to_two_fields_stores_all_of_it_in_both(
    asyncassets_db,
):
    # The second field read the rest the first upload left: an empty file.
    storage = gridfs()
    Doc = doc_class(storage)
    f = io.BytesIO(b"shared-data")
    doc = Doc(name="x")
    doc.file = f
    doc.files = [f]
    await doc.save()
    loaded = await Doc.objects.get(pk=doc.pk)
    assert await loaded.file.read() == b"shared-data"
    assert await loaded.files[0].read() == b"shared-data"


async def test_one_stream_assigned_to_two_fields_is_refused_and_leaves_nothing(asyncassets_db):
    storage = gridfs()
    Doc = doc_class(storage)
    stream = yields(b"once")
    doc = Doc(name="x")
    doc.file = stream
    doc.files = [stream]
    with pytest.raises(UploadClosed, match="a new stream for each field"):
        await doc.save()
    assert await leftovers(storage, asyncassets_db) == (0, 0)
    assert await Doc.objects.count() == 0


async def test_a_pending_proxy_copied_to_another_document(asyncassets_db):
    storage = gridfs()
    Doc = doc_class(storage)
    a = Doc(name="a")
    a.file = b"data"
    b = Doc(name="b")
    b.file = a.file
    await a.save()
    await b.save()
    assert await (await Doc.objects.get(pk=b.pk)).file.read() == b"data"
    assert await (await Doc.objects.get(pk=a.pk)).file.read() == b"data"


async def test_deleting_a_document_with_a_pending_upload_uploads_nothing(asyncassets_db):
    storage = gridfs()
    Doc = doc_class(storage)
    doc = await Doc(name="x").save()
    doc.file = b"data"
    await doc.delete()
    assert await leftovers(storage, asyncassets_db) == (0, 0)


# -- paths that bypass save() ----------------------------------------------------------


async def test_insert_refuses_documents_holding_data_to_upload(asyncassets_db):
    # insert() writes documents as they are: the data was dropped and the
    # document stored with an empty field, without a word.
    storage = gridfs()
    Doc = doc_class(storage)
    plain = Doc(name="plain")
    doc = Doc(name="x")
    doc.files = [b"data"]
    with pytest.raises(TypeError, match=r"files\.0 holds data .* only save\(\) uploads"):
        await Doc.objects.insert([plain, doc])
    assert await Doc.objects.count() == 0
    assert await leftovers(storage, asyncassets_db) == (0, 0)
    await doc.save()
    assert await (await Doc.objects.get(pk=doc.pk)).files[0].read() == b"data"


async def test_create_with_data_uploads(asyncassets_db):
    storage = gridfs()
    Doc = doc_class(storage)
    doc = await Doc.objects.create(name="x", file=b"data")
    assert await (await Doc.objects.get(pk=doc.pk)).file.read() == b"data"


@pytest.mark.parametrize("how", ["queryset", "document", "modify", "push", "pending proxy"])
async def test_an_update_with_data_is_refused_not_stored_as_a_reference(asyncassets_db, how):
    # An update writes its values as given: bytes were stored in the file field,
    # a reference to no file.
    storage = gridfs()
    Doc = doc_class(storage)
    doc = await Doc(name="x").save()
    with pytest.raises(TypeError, match="cannot be a query or update value"):
        if how == "queryset":
            await Doc.objects(pk=doc.pk).update(set__file=b"data")
        elif how == "document":
            await doc.update(set__file=io.BytesIO(b"data"))
        elif how == "modify":
            await Doc.objects(pk=doc.pk).modify(set__file=bytearray(b"data"))
        elif how == "push":
            await Doc.objects(pk=doc.pk).update(push__files=b"data")
        else:
            other = Doc(name="y")
            other.file = b"data"
            await Doc.objects(pk=doc.pk).update(set__file=other.file)
    assert await stored(doc) == {"_id": doc.pk, "name": "x", "files": []}
    assert await leftovers(storage, asyncassets_db) == (0, 0)


async def test_a_query_by_data_is_refused(asyncassets_db):
    Doc = doc_class(gridfs())
    with pytest.raises(TypeError, match="cannot be a query or update value"):
        await Doc.objects(file=b"data").count()


# -- the entry prefetch with odd data ---------------------------------------------------


async def test_odd_catalogue_entries_and_ids_load_without_crashing(asyncassets_db):
    storage = gridfs()
    Doc = doc_class(storage)
    files = asyncassets_db[f"{storage.collection_name}.files"]
    good = await Doc(name="good").save()
    good.file = b"good"
    await good.save()
    odd_id = ObjectId()
    await files.insert_one(
        {
            "_id": odd_id,
            "filename": 12,
            "contentType": ["x"],
            "length": 0,
            "chunkSize": 255 * KIB,
            "uploadDate": None,
            "metadata": "not a dict",
        }
    )
    coll = Doc._get_collection()
    await coll.insert_many(
        [
            {"name": "odd-entry", "file": odd_id},
            {"name": "dangling", "file": ObjectId()},
            {"name": "string-id", "file": "not-an-object-id"},
            {"name": "int-id", "file": 12345},
            {"name": "shared", "file": good.file.grid_id},
            {"name": "list", "files": [good.file.grid_id, good.file.grid_id, None]},
        ]
    )
    docs = await Doc.objects.order_by("name").to_list()
    assert len(docs) == 7
    by_name = {d.name: d for d in docs}
    assert by_name["shared"].file.length == 4
    assert by_name["list"].files[0].length == 4
    str(by_name["odd-entry"].file)
    for d in docs:
        str(d.file)
        repr(d)
    assert await Doc.objects.count() == 7
    assert len(await Doc.objects.as_pymongo().to_list()) == 7
    assert len(await Doc.objects.scalar("file").to_list()) == 7
    assert len(await Doc.objects.values_list("name", "file").to_list()) == 7
    assert len(await Doc.objects.only("name").to_list()) == 7
    assert len(await Doc.objects.exclude("file").to_list()) == 7


class AsyncReads:
    """An async file whose read() answers ``answer`` once, then b""."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.done = False

    async def read(self, size: int = -1) -> Any:
        if self.done:
            return b""
        self.done = True
        return self.answer


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: io.StringIO("text"), id="StringIO"),
        pytest.param(lambda: AsyncReads("text"), id="async read str"),
        pytest.param(lambda: AsyncReads(None), id="async read None"),
        pytest.param(lambda: AsyncReads(12), id="async read int"),
    ],
)
async def test_a_file_object_reading_non_bytes_is_refused_and_leaves_nothing(asyncassets_db, make):
    storage = gridfs()
    Doc = doc_class(storage)
    doc = Doc(name="x")
    doc.file = make()
    with pytest.raises(TypeError):
        await doc.save()
    assert await leftovers(storage, asyncassets_db) == (0, 0)
    assert await Doc.objects.count() == 0


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda d: AsyncReads(bytearray(d)), id="bytearray"),
        pytest.param(lambda d: AsyncReads(memoryview(d)), id="memoryview"),
        pytest.param(lambda d: memoryview(array.array("i", range(1000))), id="int memoryview"),
    ],
)
async def test_bytes_like_pieces_are_stored_byte_exact(asyncassets_db, make):
    storage = gridfs()
    Doc = doc_class(storage)
    data = payload(70 * KIB)
    value = make(data)
    expected = bytes(value) if isinstance(value, memoryview) else data
    doc = Doc(name="x")
    doc.file = value
    await doc.save()
    assert await (await Doc.objects.get(pk=doc.pk)).file.read() == expected


async def test_bytes_over_max_size_are_refused_before_anything_is_written(asyncassets_db):
    storage = gridfs()
    Doc = doc_class(storage, max_size=10 * KIB)
    doc = Doc(name="x")
    doc.file = payload(4 * MIB)
    chunks = asyncassets_db[f"{storage.collection_name}.chunks"]
    with pytest.raises(FileValidationError, match="size"):
        await doc.save()
    assert await chunks.count_documents({}) == 0
    assert await leftovers(storage, asyncassets_db) == (0, 0)


@pytest.mark.parametrize(
    "value",
    [{"$gt": ""}, {"$ne": None}, {"a": 1}, [ObjectId()], True, 1.5, Regex(".*")],
    ids=["gt", "ne", "dict", "list", "bool", "float", "regex"],
)
async def test_a_stored_reference_that_is_no_id_reads_as_missing_never_as_another_file(
    asyncassets_db, value
):
    # Written by another tool: one such document made every query of its class
    # raise TypeError (unhashable), and {"$ne": None} read, and a delete removed,
    # another document's file (the value went into {"_id": value}).
    storage = gridfs()
    Doc = doc_class(storage)
    secret = Doc(name="secret")
    secret.file = b"SECRET"
    await secret.save()
    await Doc._get_collection().insert_one({"name": "odd", "file": value, "files": [value]})
    docs = {d.name: d for d in await Doc.objects.to_list()}
    assert docs["secret"].file.length == 6
    odd = docs["odd"]
    with pytest.raises(FileNotFound):
        _ = odd.file.length
    odd = await Doc.objects.no_files().get(name="odd")
    with pytest.raises(FileNotFound):
        await odd.file.read()
    with pytest.raises(FileNotFound):
        await odd.files[0].read()
    await odd.delete()
    await Doc.objects(name="secret").delete()  # a cascade through the query too
    await Doc._get_collection().insert_one({"name": "odd", "file": value})
    await Doc.objects(name="odd").delete()
    assert await leftovers(storage, asyncassets_db) == (0, 0)  # secret's, by its own delete


@pytest.mark.parametrize("value", [{"$ne": None}, [ObjectId()], 1.5, True])
async def test_an_update_writes_only_a_file_id_into_a_file_field(asyncassets_db, value):
    storage = gridfs()
    Doc = doc_class(storage)
    doc = await Doc(name="x").save()
    with pytest.raises(TypeError, match="only a file id"):
        await Doc.objects(pk=doc.pk).update(set__file=value)
    assert "file" not in await stored(doc)
    file_id = ObjectId()
    await Doc.objects(pk=doc.pk).update(set__file=file_id)  # an id, as before
    assert (await stored(doc))["file"] == file_id


async def test_an_embedded_document_with_data_given_to_another_document_uploads_for_both(
    asyncassets_db,
):
    # bind() copies an embedded document another one owns; that internal copy
    # carries the pending data (only a user's copy/pickle is refused).
    storage = gridfs()
    Doc = doc_class(storage)
    a = Doc(name="a")
    a.picture = Doc.picture.document_type(image=b"shared bytes")
    b = Doc(name="b", picture=a.picture)
    await a.save()
    await b.save()
    for pk in (a.pk, b.pk):
        assert await (await Doc.objects.get(pk=pk)).picture.image.read() == b"shared bytes"


async def test_upsert_one_with_data_is_refused(asyncassets_db):
    storage = gridfs()
    Doc = doc_class(storage)
    with pytest.raises(TypeError, match="cannot be a query or update value"):
        await Doc.objects(name="new").upsert_one(set__file=b"data")
    assert await Doc.objects.count() == 0


@pytest.fixture(params=["gridfs", "filesystem", "s3"])
def any_storage(request: pytest.FixtureRequest, tmp_path: Any) -> Any:
    return make_storage(request.param, request, tmp_path)


async def test_a_read_failing_after_a_part_was_stored_leaves_nothing_on_any_storage(
    asyncassets_db, any_storage
):
    # 6 MiB read before the failure: an S3 multipart upload has a part, a
    # directory a temp file, GridFS chunks; all go.
    Doc = doc_class(any_storage)
    doc = await Doc(name="x").save()
    doc.file = Exploding(6 * MIB + 5)
    with pytest.raises(OSError, match="disk on fire"):
        await doc.save()
    assert await leftovers(any_storage, asyncassets_db) == (0, 0)
    assert "file" not in await stored(doc)
    doc.file = yields(b"ok ", "then text")
    with pytest.raises(TypeError):
        await doc.save()
    assert await leftovers(any_storage, asyncassets_db) == (0, 0)


@pytest.mark.parametrize("how", ["constructed", "assigned", "with another field", "modify"])
async def test_an_update_with_an_embedded_document_holding_data_is_refused(asyncassets_db, how):
    # The embedded document was written through to_mongo(): {"picture": {}}, the
    # data dropped without a word.
    storage = gridfs()
    Doc = doc_class(storage)
    doc = await Doc(name="x").save()
    Pic = Doc.picture.document_type
    picture = Pic(image=b"data")
    if how == "assigned":
        picture = Pic()
        picture.image = b"data"
    with pytest.raises(TypeError, match="image holds data assigned for upload"):
        if how == "with another field":
            await Doc.objects(pk=doc.pk).update(set__name="y", set__picture=picture)
        elif how == "modify":
            await Doc.objects(pk=doc.pk).modify(set__picture=picture)
        else:
            await Doc.objects(pk=doc.pk).update(set__picture=picture)
    assert await stored(doc) == {"_id": doc.pk, "name": "x", "files": []}
    assert await leftovers(storage, asyncassets_db) == (0, 0)
    doc.picture = picture  # the way that uploads
    await doc.save()
    assert await (await Doc.objects.get(pk=doc.pk)).picture.image.read() == b"data"


async def test_a_failure_of_a_later_field_leaves_the_earlier_fields_holding_their_data(
    asyncassets_db,
):
    # The earlier fields' uploads were removed but the fields kept their ids: the
    # retried save referenced files that were gone.
    storage = gridfs()
    Doc = doc_class(storage)
    doc = Doc(name="x")
    doc.file = b"fine"
    doc.files = [b"fine too"]
    doc.picture = Doc.picture.document_type(image=Exploding(10))  # uploaded last
    with pytest.raises(OSError, match="disk on fire"):
        await doc.save()
    assert await leftovers(storage, asyncassets_db) == (0, 0)
    assert doc.file.grid_id is None and doc.file.length == 4
    assert doc.files[0].grid_id is None and doc.files[0].length == 8
    doc.picture.image = b"fixed"
    await doc.save()
    loaded = await Doc.objects.get(pk=doc.pk)
    assert await loaded.file.read() == b"fine"
    assert await loaded.files[0].read() == b"fine too"
    assert await loaded.picture.image.read() == b"fixed"
    assert await leftovers(storage, asyncassets_db) == (3, 3)
