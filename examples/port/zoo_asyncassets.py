"""The asyncassets port of zoo_mongoengine.py (docs/migration.rst).

The same module with ``await`` added (and ``async`` before ``def``) and the
imports changed; tests/test_port.py checks that, and runs both against the
same data.
"""

from asyncassets import Document
from asyncassets.fields import FileField, StringField


class Animal(Document):
    genus = StringField(required=True)
    photo = FileField()
    meta = {"collection": "zoo_animals"}


async def add(genus, data, filename):
    animal = Animal(genus=genus)
    await animal.photo.put(data, content_type="image/png", filename=filename)
    await animal.save()
    return animal


async def change_photo(genus, data):
    animal = await Animal.objects.get(genus=genus)
    animal.photo = data
    await animal.save()


async def describe(genus):
    animal = await Animal.objects.get(genus=genus)
    length = animal.photo.length  # before any read: the metadata is at hand
    data = await animal.photo.read()
    return animal.genus, bool(animal.photo), length, data


async def names():
    return [animal.genus async for animal in Animal.objects.order_by("genus")]


async def remove(genus):
    animal = await Animal.objects.get(genus=genus)
    await animal.photo.delete()
    await animal.delete()
