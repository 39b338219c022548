"""Migration parity: mongoengine code translated to ``await`` keeps working.

Each test takes a mongoengine idiom (its ``FileField``/``ImageField`` documentation
and its QuerySet API) as a mongoengine user would write it, adds ``await``, and
runs it against the real server. What asyncassets does differently on purpose is
documented in docs/migration.rst; the tests here check the parity it promises.
"""

from __future__ import annotations

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
    IntegrityError,
)
from asyncassets.errors import FileDeletedWhileReading, PendingFileMissing
from asyncassets.fields import FileField, StringField

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
