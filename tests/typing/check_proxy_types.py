"""What users' type checkers see on a document's file fields; checked by mypy in CI.

``.ci/run`` runs ``mypy tests/typing``; nothing here is executed (pytest collects
only ``test_*.py``). ``assert_type`` fails on ``Any`` too, so an untyped
``__get__`` fails this check instead of passing it silently.
"""

from __future__ import annotations

from typing_extensions import assert_type

from asyncassets import (
    Document,
    EmbeddedDocument,
    FileField,
    FileProxy,
    ImageField,
    ImageProxy,
)


class Animal(Document):
    photo = FileField()
    icon = ImageField()


class Thumb(EmbeddedDocument):
    picture = ImageField()


class Marmot(Animal):
    pass


def instance_access_gives_the_proxy(animal: Animal, marmot: Marmot, thumb: Thumb) -> None:
    assert_type(Animal().photo, FileProxy)
    assert_type(Animal().icon, ImageProxy)
    assert_type(animal.photo, FileProxy)
    assert_type(marmot.icon, ImageProxy)
    assert_type(thumb.picture, ImageProxy)


def an_image_proxy_is_a_file_proxy(animal: Animal) -> FileProxy:
    return animal.icon


def class_access_gives_the_field() -> None:
    assert_type(Animal.photo, FileField)
    assert_type(Animal.icon, ImageField)
    assert_type(Marmot.photo, FileField)
    assert_type(Thumb.picture, ImageField)
