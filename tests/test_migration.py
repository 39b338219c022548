"""Migration parity: mongoengine code translated to ``await`` keeps working.

Each test takes a mongoengine idiom (its ``FileField``/``ImageField`` documentation
and its QuerySet API) as a mongoengine user would write it, adds ``await``, and
runs it against the real server. What asyncassets does differently on purpose is
documented in docs/migration.rst; the tests here check the parity it promises.
"""

from __future__ import annotations

import datetime as dt
import hashlib

import gridfs.errors
import mongoengine.fields
import pymongo.errors
import pytest
from bson import ObjectId

from asyncassets import (
    AsyncAssetsError,
    CorruptFile,
    Document,
    FileAlreadyExists,
    FileNotFound,
    FileNotLoaded,
    FileProxy,
    IntegrityError,
    UploadClosed,
)
from asyncassets.errors import FileDeletedWhileReading, PendingFileMissing
from asyncassets.fields import FileField, ListField, StringField

# Class names are prefixed "Mig" so they never clash in mongoengine's global
# document registry with the classes of the other test modules.

CHUNK = 16
DATA = bytes(range(256)) + b"tail"


class MigAnimal(Document):
    genus = StringField()
    photo = FileField(chunk_size=CHUNK)
    meta = {"collection": "mig_animals"}


async def saved_with_file(**metadata) -> MigAnimal:
    marmot = MigAnimal(genus="Marmota")
    await marmot.photo.put(DATA, content_type="image/jpeg", filename="marmot.jpg", **metadata)
    await marmot.save()
    return marmot


# -- the exceptions mongoengine and PyMongo code already catches ------------------------


async def test_a_second_put_is_caught_as_mongoengines_gridfs_error(asyncassets_db):
    marmot = await saved_with_file()
    with pytest.raises(mongoengine.fields.GridFSError) as caught:
        await marmot.photo.put(b"again")
    assert isinstance(caught.value, FileAlreadyExists)
    assert "replace" in str(caught.value)  # asyncassets' message says what to do


async def test_reading_a_missing_file_is_caught_as_gridfs_no_file(asyncassets_db):
    marmot = await saved_with_file()
    await asyncassets_db["fs.files"].delete_many({})
    loaded = await MigAnimal.objects.get(pk=marmot.pk)
    with pytest.raises(gridfs.errors.NoFile) as caught:
        await loaded.photo.read()
    assert isinstance(caught.value, FileNotFound)
    assert isinstance(caught.value, LookupError)
    assert "asyncassets.check()" in str(caught.value)


async def test_a_missing_chunk_is_caught_as_gridfs_corrupt_grid_file(asyncassets_db):
    marmot = await saved_with_file()
    await asyncassets_db["fs.chunks"].delete_one({"files_id": marmot.photo.file_id, "n": 3})
    loaded = await MigAnimal.objects.get(pk=marmot.pk)
    with pytest.raises(gridfs.errors.CorruptGridFile) as caught:
        await loaded.photo.read()
    assert isinstance(caught.value, CorruptFile)


async def test_changed_bytes_are_caught_as_gridfs_corrupt_grid_file(asyncassets_db):
    marmot = await saved_with_file()
    await asyncassets_db["fs.chunks"].update_one(
        {"files_id": marmot.photo.file_id, "n": 0}, {"$set": {"data": b"X" * CHUNK}}
    )
    loaded = await MigAnimal.objects.get(pk=marmot.pk)
    with pytest.raises(gridfs.errors.CorruptGridFile) as caught:
        await loaded.photo.read(verify=True)
    assert isinstance(caught.value, IntegrityError)


def test_the_compatible_errors_are_still_caught_as_asyncassets_errors():
    errors = [
        FileAlreadyExists("x"),
        FileNotFound(ObjectId(), "fs"),
        FileDeletedWhileReading(ObjectId(), "fs"),
        PendingFileMissing("gone", file_id=ObjectId(), bucket="fs", alias=None),
        CorruptFile("x"),
        IntegrityError("x"),
    ]
    for exc in errors:
        assert isinstance(exc, AsyncAssetsError), type(exc)


def test_the_errors_that_are_pymongo_errors_answer_pymongos_questions():
    # Retry logic asks any PyMongoError for its labels and whether it timed out:
    # that must answer, not raise AttributeError over the real error.
    for exc in [
        FileNotFound(ObjectId(), "fs"),
        FileDeletedWhileReading(ObjectId(), "fs"),
        PendingFileMissing("gone", file_id=ObjectId(), bucket="fs", alias=None),
        CorruptFile("x"),
        IntegrityError("x"),
    ]:
        assert isinstance(exc, pymongo.errors.PyMongoError)
        assert exc.has_error_label("RetryableWriteError") is False
        assert exc.timeout is False


# -- the file proxy, as mongoengine's GridFSProxy was used ------------------------------


async def test_close_after_put_does_nothing_as_in_mongoengine(asyncassets_db):
    marmot = MigAnimal()
    await marmot.photo.put(DATA, content_type="image/jpeg")
    assert await marmot.photo.close() is marmot.photo
    await marmot.save()
    await marmot.photo.close()  # on a saved document too
    assert await (await MigAnimal.objects.get(pk=marmot.pk)).photo.read() == DATA
    empty = MigAnimal()
    await empty.photo.close()
    assert not empty.photo


async def test_close_after_an_aborted_stream_still_raises_upload_closed(asyncassets_db):
    # Doing nothing here would hide that the bytes written were thrown away.
    marmot = MigAnimal()
    await marmot.photo.new_file()
    await marmot.photo.write(DATA)
    await marmot.photo.abort()
    with pytest.raises(UploadClosed):
        await marmot.photo.close()
    assert not marmot.photo


async def test_put_keywords_read_back_as_attributes(asyncassets_db):
    marmot = MigAnimal()
    await marmot.photo.put(DATA, foo="bar", tags=["alpine"])
    assert marmot.photo.foo == "bar"
    assert marmot.photo.tags == ["alpine"]
    await marmot.save()
    loaded = await MigAnimal.objects.get(pk=marmot.pk)
    await loaded.photo.load()
    assert loaded.photo.foo == "bar"
    assert loaded.photo.metadata["foo"] == "bar"  # the typed way still works


async def test_an_unloaded_files_metadata_attribute_raises_file_not_loaded(asyncassets_db):
    marmot = await saved_with_file(foo="bar")
    loaded = await MigAnimal.objects.no_files().get(pk=marmot.pk)
    with pytest.raises(FileNotLoaded, match="'foo'"):
        loaded.photo.foo  # noqa: B018
    # The forwarding never turns a missing load() into a silent default.
    with pytest.raises(FileNotLoaded):
        getattr(loaded.photo, "foo", None)


async def test_a_name_neither_attribute_nor_metadata_key_raises_attribute_error(asyncassets_db):
    marmot = await saved_with_file(foo="bar")
    with pytest.raises(AttributeError, match=r"no metadata key 'fooo' .*keys: content_type, foo"):
        marmot.photo.fooo  # noqa: B018
    assert getattr(marmot.photo, "fooo", None) is None  # loaded: a plain AttributeError
    with pytest.raises(AttributeError, match="holds no file"):
        MigAnimal().photo.foo  # noqa: B018


async def test_protocol_probes_get_a_plain_no_even_before_loading(asyncassets_db):
    marmot = await saved_with_file()
    loaded = await MigAnimal.objects.get(pk=marmot.pk)
    for probe in ("to_mongo", "items", "keys", "closed", "name", "__html__", "_fields"):
        assert not hasattr(loaded.photo, probe), probe
    # So an unloaded proxy can be the source of another upload (file objects are
    # probed for "closed").
    copy = MigAnimal()
    await copy.photo.put(loaded.photo)
    assert await copy.photo.read() == DATA


async def test_legacy_file_attributes_are_forwarded(asyncassets_db):
    # What mongoengine (PyMongo's legacy GridFS API) wrote: md5, contentType and the
    # extra keywords at the top level of the files document.
    file_id = ObjectId()
    await asyncassets_db["fs.files"].insert_one(
        {
            "_id": file_id,
            "length": 4,
            "chunkSize": 255 * 1024,
            "uploadDate": dt.datetime(2020, 1, 1),
            "md5": hashlib.md5(b"data").hexdigest(),
            "filename": "old.txt",
            "contentType": "text/plain",
            "aliases": ["older.txt"],
            "author": "mongoengine",
        }
    )
    await asyncassets_db["fs.chunks"].insert_one({"files_id": file_id, "n": 0, "data": b"data"})
    await asyncassets_db["mig_animals"].insert_one({"_id": ObjectId(), "photo": file_id})
    legacy = await MigAnimal.objects.first()
    assert await legacy.photo.read() == b"data"
    assert legacy.photo.md5 == hashlib.md5(b"data").hexdigest()
    assert legacy.photo.aliases == ["older.txt"]
    assert legacy.photo.author == "mongoengine"
    assert legacy.photo.content_type == "text/plain"
    assert legacy.photo._id == file_id
    assert legacy.photo.chunkSize == 255 * 1024  # a spec key, as GridOut forwarded it
    new = await saved_with_file()
    assert new.photo.md5 is None  # new files carry sha256 instead
    assert new.photo.sha256 == hashlib.sha256(DATA).hexdigest()


async def test_get_loads_the_file_and_returns_the_proxy(asyncassets_db):
    marmot = await saved_with_file(foo="bar")
    loaded = await MigAnimal.objects.get(pk=marmot.pk)
    out = await loaded.photo.get()
    assert out is loaded.photo
    assert (out.filename, out.length, out.foo) == ("marmot.jpg", len(DATA), "bar")
    assert await out.read() == DATA
    assert await loaded.photo.get(marmot.photo.file_id) is loaded.photo
    assert await MigAnimal().photo.get() is None
    with pytest.raises(ValueError, match="assign it instead"):
        await loaded.photo.get(ObjectId())


async def test_get_of_a_missing_file_raises_no_file(asyncassets_db):
    marmot = await saved_with_file()
    await asyncassets_db["fs.files"].delete_many({})
    with pytest.raises(gridfs.errors.NoFile):
        await marmot.photo.get()


async def test_get_proxy_obj_gives_an_empty_proxy_of_the_field(asyncassets_db):
    marmot = MigAnimal()
    proxy = MigAnimal.photo.get_proxy_obj(key="photo", instance=marmot)
    assert isinstance(proxy, FileProxy) and not proxy
    assert (proxy.collection_name, proxy.db_alias) == ("fs", "default")
    other = MigAnimal.photo.get_proxy_obj("photo", marmot, collection_name="scans")
    assert other.collection_name == "scans"
    await proxy.put(DATA)
    assert proxy.chunk_size == CHUNK  # the field's options apply


async def test_str_names_the_file_as_mongoengine_does(asyncassets_db):
    assert str(MigAnimal().photo) == "<GridFSProxy: <no file> (None)>"
    marmot = await saved_with_file()
    file_id = marmot.photo.file_id
    assert str(marmot.photo) == f"<GridFSProxy: marmot.jpg ({file_id})>"
    loaded = await MigAnimal.objects.get(pk=marmot.pk)  # with its entry: no I/O
    assert str(loaded.photo) == f"<GridFSProxy: marmot.jpg ({file_id})>"
    unloaded = await MigAnimal.objects.no_files().get(pk=marmot.pk)
    assert str(unloaded.photo) == f"<GridFSProxy: <not loaded> ({file_id})>"
    await asyncassets_db["fs.files"].delete_many({})
    with pytest.raises(FileNotFound):
        await unloaded.photo.load()
    assert str(unloaded.photo) == f"<GridFSProxy: <no file> ({file_id})>"


class MigAlbum(Document):
    photos = ListField(FileField(chunk_size=CHUNK))
    meta = {"collection": "mig_albums"}


async def test_mongoengines_list_of_files_recipe_works_on_a_new_document(asyncassets_db):
    # mongoengine's own recipe for ListField(FileField()), awaited.
    album = MigAlbum()
    new_proxy = album._fields["photos"].field.get_proxy_obj("photos", album)
    await new_proxy.put(DATA, content_type="image/jpeg", foo="bar")
    album.photos.append(new_proxy)
    await album.save()
    album = await MigAlbum.objects.get()
    assert (await album.photos[0].get()).length == len(DATA)
    assert (album.photos[0].content_type, album.photos[0].foo) == ("image/jpeg", "bar")


def test_mongoengines_file_names_import_from_asyncassets_fields():
    from asyncassets import ImageProxy
    from asyncassets.errors import GridFSError as AsyncAssetsGridFSError
    from asyncassets.fields import GridFSError, GridFSProxy, ImageGridFsProxy

    assert (GridFSProxy, ImageGridFsProxy) == (FileProxy, ImageProxy)
    assert GridFSError is AsyncAssetsGridFSError
    assert issubclass(FileAlreadyExists, GridFSError)
