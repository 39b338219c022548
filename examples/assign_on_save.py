"""Assigning data to a file field uploads it on save (docs/files.rst shows this file).

Run by tests/test_assignment.py against a real server.
"""

from __future__ import annotations

from typing import Any

from asyncassets import Document
from asyncassets.errors import FileValidationError
from asyncassets.fields import FileField, StringField


class Animal(Document):
    genus = StringField(required=True)
    photo = FileField(max_size=5 * 1024 * 1024, allowed_content_types=["image/*"])
    meta = {"collection": "assigned_animals"}


async def create(genus: str, upload: Any) -> Animal:
    """``upload``: bytes, a file object, or FastAPI's ``UploadFile``."""
    animal = Animal(genus=genus)
    animal.photo = upload  # no I/O here: the data waits for save()
    await animal.save()  # uploads (checking the field's rules), then inserts
    return animal


async def change_photo(animal: Animal, upload: Any) -> str:
    animal.photo = upload
    try:
        await animal.save()  # uploads, switches, then deletes the old photo
    except FileValidationError as exc:
        # Nothing was stored or changed; the field still holds the data.
        return f"refused: {exc}"
    return "changed"


async def remove_photo(animal: Animal) -> None:
    animal.photo = None
    await animal.save()  # the reference goes first, then the file
