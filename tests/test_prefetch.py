"""Documents loaded by a query come with their files' catalogue entries.

One query for the documents, then one per catalogue per batch for the entries
(one more for images' thumbnails), counted with a PyMongo ``CommandListener`` on
the real server; then attribute access, ``bool``, ``str``, an image's size and its
thumbnail work without ``load()``. Also: ``no_files()`` and ``load_files()``,
projections, entries missing or changed since loading, and a replace racing the
query.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import uuid

import pytest
from bson import ObjectId
from pymongo import AsyncMongoClient, monitoring

import asyncassets
from asyncassets import (
    Document,
    EmbeddedDocument,
    FileNotFound,
    FileNotLoaded,
    FileProxy,
    ImageProxy,
    queryset,
    references,
)
from asyncassets.fields import (
    DictField,
    EmbeddedDocumentField,
    FileField,
    ImageField,
    ListField,
    StringField,
)
from asyncassets.storage import FileSystemStorage
from asyncassets.testing import unique_db_name

PIL = pytest.importorskip("PIL.Image")

ALIAS = "prefetch"


class PrefetchDoc(Document):
    name = StringField()
    photo = FileField()
    scan = FileField(collection_name="pf_scans")
    meta = {"db_alias": ALIAS, "collection": "pf_docs"}


class PrefetchPart(EmbeddedDocument):
    label = StringField()
    # The alias given: parts are filled before they belong to a document.
    scan = FileField(db_alias=ALIAS)
    pages = ListField(FileField(db_alias=ALIAS))


class PrefetchNested(Document):
    part = EmbeddedDocumentField(PrefetchPart)
    parts = ListField(EmbeddedDocumentField(PrefetchPart))
    files = ListField(FileField())
    named = DictField(FileField())
    meta = {"db_alias": ALIAS, "collection": "pf_nested"}


class PrefetchImage(Document):
    image = ImageField(thumbnail_size=(8, 8, True), collection_name="pf_images")
    meta = {"db_alias": ALIAS, "collection": "pf_images_docs"}


class PrefetchOptOut(Document):
    photo = FileField()
    meta = {"db_alias": ALIAS, "collection": "pf_opt_out", "load_files": False}


class PrefetchPlain(Document):
    name = StringField()
    meta = {"db_alias": ALIAS, "collection": "pf_plain"}


class Finds(monitoring.CommandListener):
    """The collections of the ``find`` commands sent (getMore continues a find)."""

    def __init__(self) -> None:
        self.finds: list[str] = []
        self.get_mores: list[str] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name == "find":
            self.finds.append(event.command["find"])
        elif event.command_name == "getMore":
            self.get_mores.append(event.command["collection"])

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass

    def take(self) -> list[str]:
        taken, self.finds = sorted(self.finds), []
        return taken


@pytest.fixture
async def finds(asyncassets_server_uri):
    counter = Finds()
    client = AsyncMongoClient(asyncassets_server_uri, event_listeners=[counter])
    name = unique_db_name("prefetch")
    asyncassets.connect(client=client, alias=ALIAS, db=name)
    try:
        yield counter
    finally:
        await asyncassets.disconnect(ALIAS)
        await client.drop_database(name)
        await client.close()


def db():
    return asyncassets.get_db(ALIAS)


async def make_docs(n: int = 5) -> list[PrefetchDoc]:
    docs = []
    for i in range(n):
        doc = PrefetchDoc(name=f"d{i}")
        await doc.photo.put(b"p" * (i + 1), content_type="image/png", filename=f"p{i}.png")
        await doc.scan.put(b"s" * (i + 1), content_type="text/plain", filename=f"s{i}.txt")
        await doc.save()
        docs.append(doc)
    return docs


def check_at_hand(doc: PrefetchDoc) -> None:
    """What ported mongoengine code reads on a document fresh from a query."""
    i = int(doc.name[1:])
    assert doc.photo.content_type == "image/png"
    assert doc.photo.length == i + 1
    assert doc.scan.filename == f"s{i}.txt"
    assert bool(doc.photo) and bool(doc.scan)
    assert str(doc.photo) == f"<GridFSProxy: p{i}.png ({doc.photo.grid_id})>"


async def test_every_way_of_loading_comes_with_the_entries_one_query_per_catalogue(finds):
    saved = await make_docs(5)
    await PrefetchDoc(name="d9").save()  # no files: nothing to look up for it
    finds.take()
    expected = ["fs.files", "pf_docs", "pf_scans.files"]

    finds.get_mores.clear()
    docs = await PrefetchDoc.objects(name__ne="d9").order_by("name").to_list()
    assert finds.take() == expected
    assert finds.get_mores == []  # each entry query is answered in one reply
    for doc in docs:
        check_at_hand(doc)
    assert finds.take() == []  # reading the attributes did no I/O

    seen = [doc async for doc in PrefetchDoc.objects(name__ne="d9")]
    assert finds.take() == expected and len(seen) == 5
    for doc in seen:
        check_at_hand(doc)

    loaders = {
        "first": lambda: PrefetchDoc.objects(name="d2").first(),
        "get": lambda: PrefetchDoc.objects.get(name="d2"),
        "with_id": lambda: PrefetchDoc.objects.with_id(saved[2].pk),
        "slice": lambda: PrefetchDoc.objects.order_by("name")[2:3].first(),
        "reload": lambda: saved[2].reload(),
    }
    for how, load in loaders.items():
        doc = await load()
        assert finds.take() == expected, how
        check_at_hand(doc)

    found = await PrefetchDoc.objects.in_bulk([d.pk for d in saved[:3]])
    assert finds.take() == expected
    for doc in found.values():
        check_at_hand(doc)

    doc = await PrefetchDoc.objects(name="d3").modify(new=True, set__name="d3")
    assert finds.take() == ["fs.files", "pf_scans.files"]  # findAndModify, then entries
    check_at_hand(doc)
    plain = await PrefetchDoc.objects(name="d9").first()
    assert finds.take() == ["pf_docs"]
    assert not plain.photo and str(plain.photo) == "<GridFSProxy: <no file> (None)>"


async def test_one_query_per_catalogue_per_batch(finds, monkeypatch):
    await make_docs(7)
    monkeypatch.setattr(queryset, "BATCH_SIZE", 3)
    finds.take()
    names = [doc.name async for doc in PrefetchDoc.objects.order_by("name")]
    assert names == [f"d{i}" for i in range(7)]
    # Batches of 3, 3 and 1: the documents' find (its getMores are not finds)
    # and three entry queries on each catalogue.
    assert finds.take() == ["fs.files"] * 3 + ["pf_docs"] + ["pf_scans.files"] * 3
    docs = await PrefetchDoc.objects.to_list()
    assert finds.take() == ["fs.files", "pf_docs", "pf_scans.files"]  # to_list: one batch
    assert [d.photo.length for d in docs] == list(range(1, 8))


async def test_entries_are_asked_for_fifty_at_a_time(finds):
    # Entries and documents written directly, as another tool would: 250 files.
    now = dt.datetime.now(dt.timezone.utc)
    entries = [
        {"_id": ObjectId(), "length": 0, "chunkSize": 255, "uploadDate": now, "filename": f"e{i}"}
        for i in range(250)
    ]
    await db()["fs.files"].insert_many(entries)
    await db()["pf_docs"].insert_many(
        [{"name": f"r{i:03}", "photo": e["_id"]} for i, e in enumerate(entries)]
    )
    finds.take()
    finds.get_mores.clear()
    docs = await PrefetchDoc.objects.order_by("name").to_list()
    assert finds.take() == ["fs.files"] * 5 + ["pf_docs"]  # 50 ids each
    assert "fs.files" not in finds.get_mores
    assert [d.photo.filename for d in docs] == [f"e{i}" for i in range(250)]


async def test_a_class_can_say_its_documents_come_without_entries(finds):
    doc = PrefetchOptOut()
    await doc.photo.put(b"opt out", filename="out.txt")
    await doc.save()
    finds.take()
    loaded = await PrefetchOptOut.objects.first()
    assert finds.take() == ["pf_opt_out"]
    with pytest.raises(FileNotLoaded):
        loaded.photo.filename  # noqa: B018
    loaded = await PrefetchOptOut.objects.load_files().first()
    assert finds.take() == ["fs.files", "pf_opt_out"]
    assert loaded.photo.filename == "out.txt"


async def test_no_files_and_load_files_choose_what_comes(finds):
    await make_docs(2)
    finds.take()
    doc = await PrefetchDoc.objects(name="d1").no_files().first()
    assert finds.take() == ["pf_docs"]
    with pytest.raises(FileNotLoaded, match="no_files"):
        doc.photo.content_type  # noqa: B018
    assert bool(doc.photo)  # a reference, known without its entry
    assert str(doc.photo) == f"<GridFSProxy: <not loaded> ({doc.photo.grid_id})>"
    await doc.photo.load()
    assert doc.photo.content_type == "image/png"
    assert await doc.scan.read() == b"ss"
    finds.take()

    doc = await PrefetchDoc.objects(name="d1").load_files("scan").first()
    assert finds.take() == ["pf_docs", "pf_scans.files"]
    assert doc.scan.length == 2
    with pytest.raises(FileNotLoaded):
        doc.photo.length  # noqa: B018
    # Back to every field after narrowing.
    doc = await PrefetchDoc.objects.no_files().load_files().first()
    assert finds.take() == ["fs.files", "pf_docs", "pf_scans.files"]
    # mongoengine's caching and dereferencing switches change nothing here.
    doc = await PrefetchDoc.objects.no_dereference().no_cache().first()
    assert finds.take() == ["fs.files", "pf_docs", "pf_scans.files"]
    assert doc.scan.length == 1
    with pytest.raises(ValueError, match="name"):
        PrefetchDoc.objects.load_files("name")


async def test_classes_without_files_and_raw_results_send_no_entry_query(finds):
    await PrefetchPlain(name="x").save()
    await make_docs(1)
    finds.take()
    assert (await PrefetchPlain.objects.first()).name == "x"
    assert finds.take() == ["pf_plain"]
    raw = await PrefetchDoc.objects.as_pymongo().first()
    names = await PrefetchDoc.objects.scalar("name").to_list()
    assert finds.take() == ["pf_docs", "pf_docs"]
    assert raw["name"] == "d0" and names == ["d0"]
    assert await PrefetchDoc.objects.exists()
    assert finds.take() == ["pf_docs"]


async def test_projections_that_drop_a_file_field_skip_its_catalogue(finds):
    await make_docs(2)
    finds.take()
    doc = await PrefetchDoc.objects(name="d0").only("name").first()
    assert finds.take() == ["pf_docs"]
    assert not doc.photo
    doc = await PrefetchDoc.objects(name="d0").exclude("photo").first()
    assert finds.take() == ["pf_docs", "pf_scans.files"]
    assert doc.scan.length == 1 and not doc.photo
    doc = await PrefetchDoc.objects(name="d1").only("photo").first()
    assert finds.take() == ["fs.files", "pf_docs"]
    assert doc.photo.length == 2
    doc = await PrefetchDoc.objects(name="d1").all_fields().first()
    assert finds.take() == ["fs.files", "pf_docs", "pf_scans.files"]


async def test_files_in_lists_dicts_and_embedded_documents_come_in_one_query(finds):
    async def part(label: str, page: str | None = None) -> PrefetchPart:
        p = PrefetchPart(label=label)
        await p.scan.put(f"scan {label}".encode(), filename=f"{label}.scan")
        if page is not None:
            proxy = PrefetchPart._fields["pages"].field.get_proxy_obj("pages", p)
            await proxy.put(b"page", filename=page)
            p.pages = [proxy]
        return p

    for i in range(3):
        doc = PrefetchNested(part=await part(f"top{i}"), parts=[await part(f"a{i}", f"page{i}")])
        await doc.add_file("files", f"list {i}".encode(), filename=f"list{i}")
        await doc.save()
    raw = await db()["pf_nested"].find_one()
    assert raw["files"] and raw["parts"][0]["pages"]
    finds.take()

    docs = await PrefetchNested.objects.to_list()
    assert finds.take() == ["fs.files", "pf_nested"]
    for i, doc in enumerate(docs):
        assert str(doc.part.scan) == f"<GridFSProxy: top{i}.scan ({doc.part.scan.grid_id})>"
        assert doc.parts[0].scan.length == len(f"scan a{i}")
        assert doc.parts[0].pages[0].filename == f"page{i}"
        assert doc.files[0].filename == f"list{i}"

    # A field named by load_files() covers what its embedded documents hold.
    doc = await PrefetchNested.objects.load_files("parts").first()
    assert finds.take() == ["fs.files", "pf_nested"]
    assert doc.parts[0].pages[0].length == 4
    with pytest.raises(FileNotLoaded):
        doc.part.scan.length  # noqa: B018


async def test_dict_of_files_comes_loaded(finds):
    doc = PrefetchNested()
    await doc.save()
    proxy = FileProxy(db_alias=ALIAS)  # a free proxy: the upload only
    await proxy.put(b"dict value", filename="in-a-dict")
    await PrefetchNested.objects(pk=doc.pk).update_one(set__named={"k": proxy.grid_id})
    finds.take()
    loaded = await PrefetchNested.objects.get(pk=doc.pk)
    assert finds.take() == ["fs.files", "pf_nested"]
    assert loaded.named["k"].filename == "in-a-dict"


async def test_images_come_with_size_format_and_thumbnail(finds):
    buffer = io.BytesIO()
    PIL.new("RGB", (40, 20), color=(10, 200, 30)).save(buffer, "PNG")
    for _ in range(2):
        doc = PrefetchImage()
        await doc.image.put(buffer.getvalue(), filename="leaf.png")
        await doc.save()
    finds.take()
    docs = await PrefetchImage.objects.to_list()
    # The documents, the images' entries, then their thumbnails' (same catalogue).
    assert finds.take() == ["pf_images.files", "pf_images.files", "pf_images_docs"]
    for doc in docs:
        assert doc.image.size == (40, 20) and doc.image.format == "PNG"
        assert doc.image.thumbnail.size == (8, 8)
        assert str(doc.image) == f"<ImageGridFsProxy: leaf.png ({doc.image.grid_id})>"
    assert finds.take() == []
    assert isinstance(docs[0].image, asyncassets.ImageGridFsProxy)


def test_mongoengine_names_of_the_proxy_classes_import():
    from asyncassets.fields import GridFSProxy, ImageGridFsProxy

    assert asyncassets.GridFSProxy is GridFSProxy is FileProxy
    assert asyncassets.ImageGridFsProxy is ImageGridFsProxy is ImageProxy
    assert isinstance(PrefetchDoc().photo, asyncassets.GridFSProxy)


async def test_a_cancelled_query_leaves_no_entry_query_running(finds, monkeypatch):
    await make_docs(3)
    monkeypatch.setattr(references, "ENTRIES_PER_QUERY", 1)  # many queries

    def entry_queries() -> list[asyncio.Task]:
        return [
            t for t in asyncio.all_tasks() if "find_many" in t.get_coro().__qualname__
        ]

    outcomes = set()
    for delay in (0, 0.001, 0.003, 0.01, 0.03):
        task = asyncio.ensure_future(PrefetchDoc.objects.to_list())
        await asyncio.sleep(delay)
        task.cancel()
        try:
            docs = await task
            outcomes.add("done")
            assert [d.photo.length for d in docs] == [1, 2, 3]
        except asyncio.CancelledError:
            outcomes.add("cancelled")
        assert entry_queries() == []
    assert "cancelled" in outcomes
    docs = await PrefetchDoc.objects.to_list()
    assert sorted(d.photo.length for d in docs) == [1, 2, 3]


# -- entries missing, or changed since loading --------------------------------------------


async def test_an_entry_missing_from_outside_is_reported_not_hidden(finds):
    await make_docs(2)
    first = await PrefetchDoc.objects(name="d0").first()
    await db()["fs.files"].delete_one({"_id": first.photo.grid_id})
    doc = await PrefetchDoc.objects(name="d0").first()
    with pytest.raises(FileNotFound):
        doc.photo.content_type  # noqa: B018
    assert str(doc.photo) == f"<GridFSProxy: <no file> ({doc.photo.grid_id})>"
    assert doc.scan.length == 1  # the other field is fine
    other = await PrefetchDoc.objects(name="d1").first()
    assert other.photo.length == 2
    with pytest.raises(FileNotFound):
        await doc.photo.read()


async def test_an_entry_replaced_or_deleted_after_loading_reads_as_today(finds):
    (saved,) = await make_docs(1)
    loaded = await PrefetchDoc.objects.first()
    old_id = loaded.photo.grid_id
    await saved.photo.replace(b"new bytes", content_type="text/plain", filename="new.txt")
    # The entry at hand is the one loaded (as after load()): its old metadata...
    assert (loaded.photo.grid_id, loaded.photo.length) == (old_id, 1)
    # ...but reading goes to the catalogue, which no longer has the old file.
    with pytest.raises(FileNotFound):
        await loaded.photo.read()
    with pytest.raises(FileNotFound):
        await loaded.photo.load()
    await loaded.reload()
    assert (loaded.photo.filename, loaded.photo.length) == ("new.txt", 9)
    assert await loaded.photo.read() == b"new bytes"

    again = await PrefetchDoc.objects.first()
    await db()["pf_scans.files"].delete_many({})
    with pytest.raises(FileNotFound):
        await again.scan.read()


async def test_a_directory_storage_read_checks_the_entry_it_was_loaded_with(finds, tmp_path):
    name = f"pf_dir_{uuid.uuid4().hex[:8]}"
    cls = type(
        f"PrefetchDir{name}",
        (Document,),
        {
            "f": FileField(storage=FileSystemStorage(tmp_path, collection_name=name)),
            "meta": {"db_alias": ALIAS, "collection": name},
        },
    )
    doc = cls()
    await doc.f.put(b"on disk", filename="disk.txt")
    await doc.save()
    loaded = await cls.objects.first()
    assert loaded.f.filename == "disk.txt"
    assert await loaded.f.read() == b"on disk"
    # The object is overwritten behind the catalogue's back: the read, through the
    # entry loaded with the document, refuses bytes that entry did not record.
    (stored,) = [p for p in tmp_path.rglob("*") if p.is_file()]
    stored.write_bytes(b"planted")
    again = await cls.objects.first()
    with pytest.raises(asyncassets.AsyncAssetsError):
        await again.f.read()


async def test_a_replace_racing_queries_gives_old_or_new_entries_never_a_mix(finds):
    """Each loaded document holds one id and, for it, that id's own entry (or the
    entry is found missing when the replace deleted it first); its bytes read back
    are that entry's, or the read says the file is gone."""
    (writer,) = await make_docs(1)
    versions = {writer.photo.grid_id: (b"p", "image/png")}
    seen: list[tuple[object, object]] = []

    async def replace() -> None:
        for i in range(12):
            data, ctype = f"version {i}".encode() * (i + 1), f"text/v{i}"
            await writer.photo.replace(data, content_type=ctype)
            versions[writer.photo.grid_id] = (data, ctype)
            await asyncio.sleep(0)

    async def query() -> None:
        for _ in range(30):
            doc = await PrefetchDoc.objects.first()
            try:
                entry = (doc.photo.content_type, doc.photo.length)
            except FileNotFound:
                entry = None  # deleted by a replace between the two queries
            try:
                data = await doc.photo.read()
            except FileNotFound:
                data = None
            seen.append((doc.photo.grid_id, (entry, data)))

    await asyncio.gather(replace(), query(), query())
    assert len(seen) == 60
    for grid_id, (entry, data) in seen:
        expected_data, expected_type = versions[grid_id]
        if entry is not None:
            assert entry == (expected_type, len(expected_data))
        assert data in (None, expected_data)
    assert any(entry is not None for _id, (entry, _d) in seen)
    final = await PrefetchDoc.objects.first()
    assert (final.photo.content_type, await final.photo.read()) == (
        "text/v11",
        b"version 11" * 12,
    )
