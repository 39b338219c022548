"""An app with many storages, declared the natural way, just works (issue 21).

Avatars and attachments in two directories, videos on S3 and a queued field,
none naming a ``collection_name``: each storage gets a catalogue of its own, so
the files are served by ``files_app``, swept and checked without a conflict.
Before, both directories shared the catalogue ``fs_local``: every link served
was a 500 and the sweep and the check refused.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

from asyncassets import Document
from asyncassets.fields import FileField, StringField
from asyncassets.files import urls
from asyncassets.ops import check, declared_storages, sweep_orphans
from asyncassets.storage import FileSystemStorage, QueuedStorage, S3Storage
from asyncassets.testing import S3Bucket
from asyncassets.transfers import run_transfers
from asyncassets.web import files_app

SECRET = "a secret of more than sixteen bytes, for the links"


@pytest.fixture(autouse=True)
def no_url_config() -> Any:
    """Each test starts and ends with no process-wide signing configuration."""
    urls._config = None
    yield
    urls._config = None


def declare_the_app(srv: Path, bucket: S3Bucket) -> dict[str, Any]:
    """The app's models, as a user writes them: no collection_name anywhere."""

    class User(Document):
        name = StringField()
        avatar = FileField(storage=FileSystemStorage(srv / "avatars"))

    class Message(Document):
        text = StringField()
        attachment = FileField(storage=FileSystemStorage(srv / "attachments"))

    class Movie(Document):
        title = StringField()
        video = FileField(storage=S3Storage(**bucket.options, prefix="videos/"))

    class Photo(Document):
        title = StringField()
        image = FileField(
            storage=QueuedStorage(
                local=FileSystemStorage(srv / "spool"),
                remote=S3Storage(**bucket.options, prefix="photos/"),
            )
        )

    return {"User": User, "Message": Message, "Movie": Movie, "Photo": Photo}


async def test_directories_s3_and_a_queued_field_are_served_swept_and_checked(
    asyncassets_db: Any, asyncassets_s3_bucket: S3Bucket, tmp_path: Path
) -> None:
    models = declare_the_app(tmp_path / "srv", asyncassets_s3_bucket)
    User, Message, Movie, Photo = (models[n] for n in ("User", "Message", "Movie", "Photo"))
    user = User(name="marmot")
    await user.avatar.put(b"\x89PNG avatar bytes", filename="marmot.png",
                          content_type="image/png")
    await user.save()
    message = Message(text="see attached")
    await message.attachment.put(b"%PDF-1.7 attachment", filename="report.pdf",
                                 content_type="application/pdf")
    await message.save()
    movie = Movie(title="trailer")
    await movie.video.put(b"video bytes " * 1000, filename="trailer.mp4",
                          content_type="video/mp4")
    await movie.save()
    photo = Photo(title="alps")
    await photo.image.put(b"queued photo bytes", filename="alps.jpg",
                          content_type="image/jpeg")
    await photo.save()

    # An orphan in each storage: put, never saved in a document.
    orphans = []
    for cls, field in ((User, "avatar"), (Message, "attachment"), (Movie, "video"),
                       (Photo, "image")):
        stray = cls()
        await getattr(stray, field).put(b"nobody's", filename="stray.bin")
        orphans.append(getattr(stray, field).file_id)

    # Served: every link of files_app is a 200 with the file's bytes.
    app = Starlette(routes=[Mount("/files", files_app(SECRET, base_url="/files"))])
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://testserver"
    ) as client:
        for proxy, data in ((user.avatar, b"\x89PNG avatar bytes"),
                            (message.attachment, b"%PDF-1.7 attachment"),
                            (photo.image, b"queued photo bytes")):
            url = await proxy.url(expires=600)
            assert url is not None and url.startswith("/files/")
            response = await client.get(url)
            assert response.status_code == 200, (url, response.text)
            assert response.content == data
    video_url = await movie.video.url(expires=600)
    assert video_url is not None
    async with httpx.AsyncClient() as s3:
        assert (await s3.get(video_url)).content == b"video bytes " * 1000

    # Checked: the four orphans, nothing else, no refusal.
    report = await check()
    assert report.orphaned_files == 4, report
    assert {f.file_id for f in report.orphaned_file_ids} == set(orphans)
    assert report.dangling == 0 and report.corrupt_files == 0

    # Swept: the orphans go, the files the documents hold stay.
    swept = await sweep_orphans(grace=dt.timedelta(0))
    assert swept.files_deleted == 4, swept
    assert {f.file_id for f in swept.deleted_files} == set(orphans)
    assert (await check(verify=True)).ok

    # Each storage has a catalogue of its own, named after where its bytes are.
    name = asyncassets_s3_bucket.name  # letters, digits and dashes: kept as they are
    catalogues = {
        "avatar": User.avatar.storage.collection_name,
        "attachment": Message.attachment.storage.collection_name,
        "video": Movie.video.storage.collection_name,
        "image": Photo.image.storage.collection_name,
    }
    assert catalogues == {
        "avatar": "fs_local_avatars",
        "attachment": "fs_local_attachments",
        "video": f"fs_s3_{name}_videos",
        "image": f"fs_queued_spool_{name}_photos",
    }
    assert {catalogue for _alias, catalogue in declared_storages()} >= set(catalogues.values())

    # The queued file moves to S3 and is still served through its link.
    stats = await run_transfers()
    assert stats.transferred == 1, stats
    await photo.reload()
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://testserver"
    ) as client:
        url = await photo.image.url(expires=600)
        assert url is not None
        assert (await client.get(url)).content == b"queued photo bytes"
    assert (await check(verify=True)).ok


async def test_default_catalogue_names_keep_every_script_and_fit_mongodb(
    asyncassets_db: Any, tmp_path: Path
) -> None:
    """Found by a hostile review: non-ASCII letters were dropped, so ``照片`` was
    catalogued in ``fs_local`` (the name files stored before 0.1.0 keep) and
    ``é/`` in the bucket's own catalogue; a queued storage's name could outgrow
    a MongoDB namespace; explicit names MongoDB refuses came back as driver errors
    at the first upload (and made check() of the whole app fail)."""
    photos = FileSystemStorage(tmp_path / "照片")
    assert photos.collection_name == "fs_local_照片"
    assert FileSystemStorage(tmp_path / "Fotos_ñ").collection_name == "fs_local_Fotos_ñ"
    assert S3Storage("media", prefix="é/").collection_name == "fs_s3_media_é"
    long_queue = QueuedStorage(
        local=FileSystemStorage(tmp_path / ("l" * 100)),
        remote=S3Storage("b" * 60, prefix="p" * 100 + "/"),
    )
    assert len(long_queue.collection_name.encode()) <= 120
    for bad in ["system.files", ".a", "a.", "a..b", "x" * 121]:
        with pytest.raises(ValueError, match="collection_name"):
            FileSystemStorage(tmp_path / "x", collection_name=bad)

    class Photo(Document):
        image = FileField(storage=photos)

    class Legacy(Document):  # the pre-0.1.0 catalogue, beside it: no conflict
        image = FileField(storage=FileSystemStorage(tmp_path / "old", collection_name="fs_local"))

    for cls in (Photo, Legacy):
        doc = cls()
        await doc.image.put(cls.__name__.encode())
        await doc.save()
    assert await asyncassets_db["fs_local_照片.files"].count_documents({}) == 1
    assert await asyncassets_db["fs_local.files"].count_documents({}) == 1
    assert (await check()).ok


async def test_two_directories_of_one_name_are_refused_at_declaration(
    asyncassets_db: Any, tmp_path: Path
) -> None:
    from asyncassets.errors import StorageConflict

    class Avatar(Document):
        image = FileField(storage=FileSystemStorage(tmp_path / "a" / "media"))

    with pytest.raises(StorageConflict) as raised:

        class Attachment(Document):
            file = FileField(storage=FileSystemStorage(tmp_path / "b" / "media"))

    message = str(raised.value)
    assert "catalogue 'fs_local_media'" in message
    assert "Avatar.image" in message and "Attachment.file" in message
    assert "collection_name='fs_local_media_file'" in message
    # What the message says to write works.

    class Attachment2(Document):
        file = FileField(storage=FileSystemStorage(
            tmp_path / "b" / "media", collection_name="fs_local_media_file"))

    assert (await check()).ok


async def test_queued_fields_with_other_settings_are_refused_one_catalogue(
    asyncassets_db: Any, tmp_path: Path
) -> None:
    """Found by a hostile review: two queued fields on the same directories, one
    keeping its local copies (delete_local=False), shared one catalogue, and the
    transfer workers applied the first class's settings to both: the copies the
    second asked to keep were deleted."""
    from asyncassets.errors import StorageConflict

    def queued(**settings: Any) -> QueuedStorage:
        return QueuedStorage(
            local=FileSystemStorage(tmp_path / "spool"),
            remote=FileSystemStorage(tmp_path / "archive"),
            **settings,
        )

    class Scratch(Document):
        f = FileField(storage=queued())

    class Twin(Document):  # the same settings: one catalogue, as before
        f = FileField(storage=queued())

    with pytest.raises(StorageConflict) as raised:

        class Archive(Document):
            f = FileField(storage=queued(delete_local=False))

    assert "Scratch.f" in str(raised.value) and "Archive.f" in str(raised.value)

    class Archive2(Document):
        f = FileField(storage=queued(delete_local=False, collection_name="fs_archive"))

    doc = Archive2()
    await doc.f.put(b"keep my local copy")
    await doc.save()
    assert (await run_transfers()).transferred == 1
    entry = await asyncassets_db["fs_archive.files"].find_one({"_id": doc.f.grid_id})
    assert entry["remote"]["key"] and entry["location"]["key"]  # both copies
    assert (await check()).ok


async def test_a_catalogue_declared_twice_serves_its_other_catalogues(
    asyncassets_db: Any, tmp_path: Path
) -> None:
    """A conflict on one catalogue (declared by classes made by one function, which
    the declaration check lets through) fails only that catalogue's links."""

    def model(storage: FileSystemStorage) -> Any:
        class Doc(Document):
            f = FileField(storage=storage)
            meta = {"collection": "docs_" + storage.root.rsplit("/", 1)[-1]}

        return Doc

    model(FileSystemStorage(tmp_path / "one", collection_name="shared"))
    model(FileSystemStorage(tmp_path / "two", collection_name="shared"))

    class Fine(Document):
        f = FileField(storage=FileSystemStorage(tmp_path / "fine"))

    fine = Fine()
    await fine.f.put(b"fine bytes", filename="fine.txt")
    await fine.save()
    app = Starlette(routes=[Mount("/files", files_app(SECRET, base_url="/files"))])
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://testserver"
    ) as client:
        url = await fine.f.url()
        assert url is not None
        assert (await client.get(url)).content == b"fine bytes"
