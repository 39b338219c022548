"""A mongoengine module as an application has it (docs/migration.rst).

Its asyncassets port, zoo_asyncassets.py, is this file with ``await`` added
(and ``async`` before ``def``) and the imports changed; tests/test_port.py
checks that, and runs both against the same data.
"""

from mongoengine import Document, FileField, StringField


class Animal(Document):
    genus = StringField(required=True)
    photo = FileField()
    meta = {"collection": "zoo_animals"}


def add(genus, data, filename):
    animal = Animal(genus=genus)
    animal.photo.put(data, content_type="image/png", filename=filename)
    animal.save()
    return animal


def change_photo(genus, data):
    animal = Animal.objects.get(genus=genus)
    animal.photo = data
    animal.save()


def describe(genus):
    animal = Animal.objects.get(genus=genus)
    length = animal.photo.length  # before any read: the metadata is at hand
    data = animal.photo.read()
    return animal.genus, bool(animal.photo), length, data


def names():
    return [animal.genus for animal in Animal.objects.order_by("genus")]


def remove(genus):
    animal = Animal.objects.get(genus=genus)
    animal.photo.delete()
    animal.delete()
