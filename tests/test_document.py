"""Document persistence: save, validation, inheritance, references, indexes, reload, modify."""

from __future__ import annotations

import inspect

import mongoengine
import pytest
from bson import DBRef, ObjectId

from asyncassets import (
    Document,
    DoesNotExist,
    DynamicDocument,
    EmbeddedDocument,
    NotUniqueError,
    OperationError,
    SaveConditionError,
    ValidationError,
)
from asyncassets.fields import (
    EmbeddedDocumentField,
    IntField,
    ListField,
    ReferenceField,
    StringField,
)

# Class names are prefixed "Doc" so they never clash in mongoengine's global
# document registry with the classes of the other test modules.


class DocAnimal(Document):
    genus = StringField(required=True)
    species = StringField()
    legs = IntField(default=4)
    notes = StringField()
    meta = {"collection": "animals"}


class DocTag(EmbeddedDocument):
    label = StringField(required=True)
    weight = IntField(default=1)


class DocPost(Document):
    title = StringField()
    main_tag = EmbeddedDocumentField(DocTag)
    tags = ListField(EmbeddedDocumentField(DocTag))


class DocUser(Document):
    email = StringField(required=True, unique=True)
    name = StringField()


class DocVehicle(Document):
    wheels = IntField()
    meta = {"allow_inheritance": True, "collection": "vehicles"}


class DocCar(DocVehicle):
    brand = StringField()


class DocBike(DocVehicle):
    gears = IntField()


class DocAuthor(Document):
    name = StringField()


class DocBook(Document):
    title = StringField()
    author = ReferenceField(DocAuthor)
    coauthors = ListField(ReferenceField(DocAuthor))


class DocIndexed(Document):
    code = StringField()
    rank = IntField()
    meta = {
        "collection": "indexed",
        "indexes": ["code", {"fields": ["-rank", "code"], "name": "rank_code"}],
    }


class DocNoAutoIndex(Document):
    code = StringField()
    meta = {"collection": "no_auto_index", "indexes": ["code"], "auto_create_index": False}


class DocDynamic(DynamicDocument):
    name = StringField()


async def _raw(db, collection: str, **query):
    return await db[collection].find_one(query)


# -- save --------------------------------------------------------------------------


async def test_save_inserts_document_and_sets_id(asyncassets_db):
    marmot = DocAnimal(genus="Marmota", species="monax")
    returned = await marmot.save()

    assert returned is marmot
    assert isinstance(marmot.id, ObjectId)
    raw = await _raw(asyncassets_db, "animals", _id=marmot.id)
    assert raw == {"_id": marmot.id, "genus": "Marmota", "species": "monax", "legs": 4}


async def test_save_twice_updates_instead_of_inserting(asyncassets_db):
    marmot = await DocAnimal(genus="Marmota").save()
    marmot.species = "monax"
    await marmot.save()

    assert await asyncassets_db.animals.count_documents({}) == 1
    raw = await _raw(asyncassets_db, "animals", _id=marmot.id)
    assert raw["species"] == "monax"


async def test_save_sends_only_changed_fields_so_concurrent_changes_survive(asyncassets_db):
    marmot = await DocAnimal(genus="Marmota", species="monax", notes="old").save()
    # Another process changes `notes` behind this instance's back.
    await asyncassets_db.animals.update_one({"_id": marmot.id}, {"$set": {"notes": "new"}})

    marmot.species = "marmota"
    await marmot.save()

    raw = await _raw(asyncassets_db, "animals", _id=marmot.id)
    assert raw["species"] == "marmota"
    assert raw["notes"] == "new"  # not clobbered with the stale "old"


async def test_save_without_changes_writes_nothing(asyncassets_db):
    marmot = await DocAnimal(genus="Marmota", notes="old").save()
    await asyncassets_db.animals.update_one({"_id": marmot.id}, {"$set": {"notes": "new"}})

    await marmot.save()

    raw = await _raw(asyncassets_db, "animals", _id=marmot.id)
    assert raw["notes"] == "new"


async def test_setting_field_to_none_unsets_it(asyncassets_db):
    marmot = await DocAnimal(genus="Marmota", species="monax").save()
    marmot.species = None
    await marmot.save()

    raw = await _raw(asyncassets_db, "animals", _id=marmot.id)
    assert "species" not in raw


async def test_save_with_write_concern(asyncassets_db):
    marmot = await DocAnimal(genus="Marmota").save(write_concern={"w": 1})
    marmot.legs = 3
    await marmot.save(write_concern={"w": 1})

    assert (await _raw(asyncassets_db, "animals", _id=marmot.id))["legs"] == 3


async def test_validation_error_leaves_nothing_in_database(asyncassets_db):
    with pytest.raises(ValidationError) as excinfo:
        await DocAnimal(genus="Marmota", legs="four").save()

    assert "legs" in excinfo.value.to_dict()
    assert await asyncassets_db.animals.count_documents({}) == 0


async def test_validation_error_on_update_leaves_stored_document_unchanged(asyncassets_db):
    marmot = await DocAnimal(genus="Marmota", legs=4).save()
    marmot.legs = "many"
    marmot.species = "monax"

    with pytest.raises(ValidationError):
        await marmot.save()

    raw = await _raw(asyncassets_db, "animals", _id=marmot.id)
    assert raw["legs"] == 4
    assert "species" not in raw


async def test_required_field_missing_raises_validation_error(asyncassets_db):
    with pytest.raises(ValidationError) as excinfo:
        await DocAnimal(species="monax").save()

    assert excinfo.value.to_dict() == {"genus": "Field is required"}
    assert await asyncassets_db.animals.count_documents({}) == 0


async def test_save_with_validate_false_skips_validation(asyncassets_db):
    await DocAnimal(species="monax").save(validate=False)

    raw = await _raw(asyncassets_db, "animals")
    assert raw["species"] == "monax"
    assert "genus" not in raw


async def test_defaults_are_stored_and_loaded(asyncassets_db):
    marmot = DocAnimal(genus="Marmota")
    assert marmot.legs == 4
    await marmot.save()

    await asyncassets_db.animals.update_one({"_id": marmot.id}, {"$unset": {"legs": ""}})
    loaded = await DocAnimal.objects.get(id=marmot.id)
    assert loaded.legs == 4  # the default fills in for a field missing in storage


async def test_meta_collection_names_the_collection(asyncassets_db):
    await DocAnimal(genus="Marmota").save()
    await DocPost(title="hello").save()

    names = set(await asyncassets_db.list_collection_names())
    assert {"animals", "doc_post"} <= names


async def test_abstract_document_cannot_be_saved(asyncassets_db):
    with pytest.raises(mongoengine.errors.InvalidDocumentError, match="abstract"):
        await Document().save()


# -- inheritance -------------------------------------------------------------------


async def test_subclass_instances_load_back_as_their_subclass(asyncassets_db):
    car = await DocCar(wheels=4, brand="Volvo").save()
    bike = await DocBike(wheels=2, gears=21).save()

    raw = await _raw(asyncassets_db, "vehicles", _id=car.id)
    assert raw["_cls"] == "DocVehicle.DocCar"

    loaded = {type(v): v for v in await DocVehicle.objects.to_list()}
    assert set(loaded) == {DocCar, DocBike}
    assert loaded[DocCar].brand == "Volvo"
    assert loaded[DocBike].gears == 21
    assert loaded[DocBike].id == bike.id


async def test_subclass_query_returns_only_that_subclass(asyncassets_db):
    await DocCar(wheels=4, brand="Volvo").save()
    await DocBike(wheels=2, gears=21).save()
    await DocVehicle(wheels=3).save()

    cars = await DocCar.objects.to_list()
    assert [(type(c), c.brand) for c in cars] == [(DocCar, "Volvo")]
    assert await DocBike.objects.count() == 1
    assert await DocVehicle.objects.count() == 3
    assert await DocCar.objects(wheels=2).count() == 0


# -- embedded documents ------------------------------------------------------------


async def test_embedded_documents_and_lists_round_trip(asyncassets_db):
    post = DocPost(
        title="t",
        main_tag=DocTag(label="main", weight=5),
        tags=[DocTag(label="a"), DocTag(label="b", weight=2)],
    )
    await post.save()

    raw = await _raw(asyncassets_db, "doc_post", _id=post.id)
    assert raw["main_tag"] == {"label": "main", "weight": 5}
    assert raw["tags"] == [{"label": "a", "weight": 1}, {"label": "b", "weight": 2}]

    loaded = await DocPost.objects.get(id=post.id)
    assert isinstance(loaded.main_tag, DocTag)
    assert loaded.main_tag.weight == 5
    assert [(t.label, t.weight) for t in loaded.tags] == [("a", 1), ("b", 2)]


async def test_changing_embedded_document_saves_only_that_path(asyncassets_db):
    post = await DocPost(title="t", main_tag=DocTag(label="main"), tags=[DocTag(label="a")]).save()
    loaded = await DocPost.objects.get(id=post.id)
    await asyncassets_db.doc_post.update_one({"_id": post.id}, {"$set": {"title": "other"}})

    loaded.main_tag.weight = 9
    loaded.tags.append(DocTag(label="b"))
    await loaded.save()

    raw = await _raw(asyncassets_db, "doc_post", _id=post.id)
    assert raw["title"] == "other"
    assert raw["main_tag"] == {"label": "main", "weight": 9}
    assert [t["label"] for t in raw["tags"]] == ["a", "b"]


async def test_invalid_embedded_document_is_a_validation_error(asyncassets_db):
    with pytest.raises(ValidationError):
        await DocPost(title="t", tags=[DocTag(weight=3)]).save()  # label is required

    assert await asyncassets_db.doc_post.count_documents({}) == 0


# -- delete ------------------------------------------------------------------------


async def test_delete_removes_only_that_document(asyncassets_db):
    marmot = await DocAnimal(genus="Marmota").save()
    squirrel = await DocAnimal(genus="Sciurus").save()

    await marmot.delete()

    ids = [raw["_id"] async for raw in asyncassets_db.animals.find()]
    assert ids == [squirrel.id]


async def test_delete_unsaved_document_raises_operation_error(asyncassets_db):
    with pytest.raises(OperationError, match="not been saved"):
        await DocAnimal(genus="Marmota").delete()


# -- reload ------------------------------------------------------------------------


async def test_reload_loads_all_fields_from_database(asyncassets_db):
    marmot = await DocAnimal(genus="Marmota", species="monax", legs=4).save()
    await asyncassets_db.animals.update_one(
        {"_id": marmot.id}, {"$set": {"species": "caligata", "legs": 5}}
    )

    returned = await marmot.reload()

    assert returned is marmot
    assert (marmot.species, marmot.legs) == ("caligata", 5)
    assert marmot._get_changed_fields() == []


async def test_reload_some_fields_leaves_the_others(asyncassets_db):
    marmot = await DocAnimal(genus="Marmota", species="monax", legs=4).save()
    await asyncassets_db.animals.update_one(
        {"_id": marmot.id}, {"$set": {"species": "caligata", "legs": 5}}
    )
    marmot.notes = "unsaved edit"

    await marmot.reload("species")

    assert marmot.species == "caligata"
    assert marmot.legs == 4  # not reloaded
    assert marmot.notes == "unsaved edit"
    assert "notes" in marmot._get_changed_fields()


async def test_reload_after_delete_raises_does_not_exist(asyncassets_db):
    marmot = await DocAnimal(genus="Marmota").save()
    await asyncassets_db.animals.delete_many({})

    with pytest.raises(DocAnimal.DoesNotExist):
        await marmot.reload()
    with pytest.raises(DoesNotExist):  # mongoengine's base class catches it too
        await marmot.reload()


async def test_reload_unsaved_document_raises_does_not_exist(asyncassets_db):
    with pytest.raises(DocAnimal.DoesNotExist):
        await DocAnimal(genus="Marmota").reload()


# -- modify / update ---------------------------------------------------------------


async def test_modify_updates_database_and_instance(asyncassets_db):
    marmot = await DocAnimal(genus="Marmota", legs=4).save()
    await asyncassets_db.animals.update_one({"_id": marmot.id}, {"$set": {"notes": "bg"}})

    assert await marmot.modify(inc__legs=1, set__species="monax") is True

    assert (marmot.legs, marmot.species, marmot.notes) == (5, "monax", "bg")
    raw = await _raw(asyncassets_db, "animals", _id=marmot.id)
    assert (raw["legs"], raw["species"]) == (5, "monax")


async def test_modify_with_query_that_does_not_match_returns_false(asyncassets_db):
    marmot = await DocAnimal(genus="Marmota", legs=4).save()

    assert await marmot.modify(query={"legs": 3}, set__legs=10) is False

    assert marmot.legs == 4
    assert (await _raw(asyncassets_db, "animals", _id=marmot.id))["legs"] == 4

    assert await marmot.modify(query={"legs": 4}, set__legs=10) is True
    assert marmot.legs == 10
    assert (await _raw(asyncassets_db, "animals", _id=marmot.id))["legs"] == 10


async def test_modify_query_for_another_document_is_refused(asyncassets_db):
    marmot = await DocAnimal(genus="Marmota").save()
    with pytest.raises(mongoengine.errors.InvalidQueryError):
        await marmot.modify(query={"id": ObjectId()}, set__legs=1)


async def test_update_changes_database_but_not_instance(asyncassets_db):
    marmot = await DocAnimal(genus="Marmota", legs=4).save()
    other = await DocAnimal(genus="Sciurus", legs=4).save()

    assert await marmot.update(inc__legs=2, set__notes="x") == 1

    assert marmot.legs == 4  # update() does not reload
    raw = await _raw(asyncassets_db, "animals", _id=marmot.id)
    assert (raw["legs"], raw["notes"]) == (6, "x")
    assert (await _raw(asyncassets_db, "animals", _id=other.id))["legs"] == 4


async def test_update_unsaved_document_raises_operation_error(asyncassets_db):
    with pytest.raises(OperationError):
        await DocAnimal(genus="Marmota").update(set__legs=1)


# -- unique, save_condition, force_insert -----------------------------------------


async def test_unique_index_violation_raises_not_unique_error(asyncassets_db):
    await DocUser(email="a@example.org").save()

    with pytest.raises(NotUniqueError, match="duplicate"):
        await DocUser(email="a@example.org", name="dup").save()

    assert await asyncassets_db.doc_user.count_documents({}) == 1


async def test_unique_violation_on_update_raises_not_unique_error(asyncassets_db):
    await DocUser(email="a@example.org").save()
    bob = await DocUser(email="b@example.org").save()

    bob.email = "a@example.org"
    with pytest.raises(NotUniqueError):
        await bob.save()

    assert (await _raw(asyncassets_db, "doc_user", _id=bob.id))["email"] == "b@example.org"


async def test_save_condition_match_saves(asyncassets_db):
    marmot = await DocAnimal(genus="Marmota", legs=4).save()
    marmot.species = "monax"

    await marmot.save(save_condition={"legs": 4})

    assert (await _raw(asyncassets_db, "animals", _id=marmot.id))["species"] == "monax"


async def test_save_condition_mismatch_raises_and_writes_nothing(asyncassets_db):
    marmot = await DocAnimal(genus="Marmota", legs=4).save()
    await asyncassets_db.animals.update_one({"_id": marmot.id}, {"$set": {"legs": 5}})
    marmot.species = "monax"

    with pytest.raises(SaveConditionError):
        await marmot.save(save_condition={"legs": 4})

    raw = await _raw(asyncassets_db, "animals", _id=marmot.id)
    assert "species" not in raw
    assert raw["legs"] == 5


async def test_force_insert_of_existing_id_raises_not_unique_error(asyncassets_db):
    marmot = await DocAnimal(genus="Marmota").save()
    clone = DocAnimal(id=marmot.id, genus="Impostor")

    with pytest.raises(NotUniqueError):
        await clone.save(force_insert=True)

    assert (await _raw(asyncassets_db, "animals", _id=marmot.id))["genus"] == "Marmota"


async def test_force_insert_with_new_id_inserts(asyncassets_db):
    chosen = ObjectId()
    await DocAnimal(id=chosen, genus="Marmota").save(force_insert=True)

    assert (await _raw(asyncassets_db, "animals", _id=chosen))["genus"] == "Marmota"


async def test_new_document_with_chosen_id_replaces_stored_one(asyncassets_db):
    marmot = await DocAnimal(genus="Marmota", notes="keep?").save()

    await DocAnimal(id=marmot.id, genus="Sciurus").save()

    raw = await _raw(asyncassets_db, "animals", _id=marmot.id)
    assert raw == {"_id": marmot.id, "genus": "Sciurus", "legs": 4}
    assert await asyncassets_db.animals.count_documents({}) == 1


# -- references --------------------------------------------------------------------


async def test_reference_is_stored_as_id(asyncassets_db):
    author = await DocAuthor(name="Ann").save()
    book = await DocBook(title="B", author=author, coauthors=[author]).save()

    raw = await _raw(asyncassets_db, "doc_book", _id=book.id)
    assert raw["author"] == author.id
    assert raw["coauthors"] == [author.id]


async def test_fetch_related_loads_reference(asyncassets_db):
    author = await DocAuthor(name="Ann").save()
    await DocBook(title="B", author=author).save()
    book = await DocBook.objects.first()

    await book.fetch_related("author")

    assert isinstance(book._data["author"], DocAuthor)
    assert book._data["author"].name == "Ann"


async def test_reference_attribute_access_does_no_io_and_returns_dbref(asyncassets_db):
    author = await DocAuthor(name="Ann").save()
    await DocBook(title="B", author=author).save()
    book = await DocBook.objects.first()

    ref = book.author  # must not touch the database

    assert isinstance(ref, DBRef)
    assert ref.id == author.id
    await book.fetch_related("author")
    assert book.author.name == "Ann"


async def test_list_of_references_attribute_access_does_no_io(asyncassets_db):
    ann = await DocAuthor(name="Ann").save()
    bob = await DocAuthor(name="Bob").save()
    await DocBook(title="B", coauthors=[ann, bob]).save()
    book = await DocBook.objects.first()

    refs = list(book.coauthors)

    assert all(isinstance(r, DBRef) for r in refs)
    assert [r.id for r in refs] == [ann.id, bob.id]


async def test_fetch_related_loads_list_of_references(asyncassets_db):
    ann = await DocAuthor(name="Ann").save()
    bob = await DocAuthor(name="Bob").save()
    await DocBook(title="B", coauthors=[ann, bob]).save()
    book = await DocBook.objects.first()

    await book.fetch_related("coauthors")

    assert [a.name for a in book._data["coauthors"]] == ["Ann", "Bob"]
    assert all(isinstance(a, DocAuthor) for a in book._data["coauthors"])


async def test_reload_document_with_reference(asyncassets_db):
    author = await DocAuthor(name="Ann").save()
    book = await DocBook(title="B", author=author).save()
    await asyncassets_db.doc_book.update_one({"_id": book.id}, {"$set": {"title": "C"}})

    await book.reload()

    assert book.title == "C"
    assert book._data["author"].id == author.id


async def test_modify_document_with_reference(asyncassets_db):
    author = await DocAuthor(name="Ann").save()
    book = await DocBook(title="B", author=author).save()

    assert await book.modify(set__title="C") is True

    assert book.title == "C"
    assert (await _raw(asyncassets_db, "doc_book", _id=book.id))["title"] == "C"


class DocCredit(EmbeddedDocument):
    who = ReferenceField(DocAuthor)


class DocFilm(Document):
    credit = EmbeddedDocumentField(DocCredit)


async def test_reference_inside_embedded_document_access_does_no_io(asyncassets_db):
    author = await DocAuthor(name="Ann").save()
    await DocFilm(credit=DocCredit(who=author)).save()
    film = await DocFilm.objects.first()

    ref = film.credit.who

    assert isinstance(ref, DBRef)
    assert ref.id == author.id


async def test_fetch_related_of_deleted_reference_raises_does_not_exist(asyncassets_db):
    author = await DocAuthor(name="Ann").save()
    await DocBook(title="B", author=author).save()
    await author.delete()
    book = await DocBook.objects.first()

    with pytest.raises(DocAuthor.DoesNotExist, match="unknown document"):
        await book.fetch_related("author")


def test_declaring_a_class_switches_reference_auto_dereferencing_off():
    class DocFreshBook(Document):
        author = ReferenceField(DocAuthor)
        coauthors = ListField(ReferenceField(DocAuthor))

    assert DocFreshBook._fields["author"]._auto_dereference is False
    assert DocFreshBook._fields["coauthors"].field._auto_dereference is False


async def test_loading_a_document_keeps_reference_auto_dereferencing_off(asyncassets_db):
    class DocLoadedBook(Document):
        author = ReferenceField(DocAuthor)

    await DocLoadedBook(author=await DocAuthor(name="Ann").save()).save()
    await DocLoadedBook.objects.first()

    assert DocLoadedBook._fields["author"]._auto_dereference is False


# -- indexes -----------------------------------------------------------------------


async def test_ensure_indexes_creates_meta_indexes(asyncassets_db):
    await DocIndexed.ensure_indexes()

    info = await asyncassets_db.indexed.index_information()
    keys = {name: spec["key"] for name, spec in info.items()}
    assert keys["code_1"] == [("code", 1)]
    assert keys["rank_code"] == [("rank", -1), ("code", 1)]


async def test_indexes_are_created_lazily_on_first_save(asyncassets_db):
    assert "indexed" not in await asyncassets_db.list_collection_names()

    await DocIndexed(code="a", rank=1).save()

    info = await asyncassets_db.indexed.index_information()
    assert {"code_1", "rank_code"} <= set(info)


async def test_unique_field_index_is_created_on_first_save(asyncassets_db):
    await DocUser(email="a@example.org").save()

    info = await asyncassets_db.doc_user.index_information()
    unique = [spec for spec in info.values() if spec.get("unique")]
    assert [spec["key"] for spec in unique] == [[("email", 1)]]


async def test_inheritance_creates_cls_index(asyncassets_db):
    await DocCar(brand="Volvo").save()

    info = await asyncassets_db.vehicles.index_information()
    assert [("_cls", 1)] in [spec["key"] for spec in info.values()]


async def test_auto_create_index_false_creates_no_index_on_save(asyncassets_db):
    await DocNoAutoIndex(code="a").save()

    info = await asyncassets_db.no_auto_index.index_information()
    assert set(info) == {"_id_"}

    await DocNoAutoIndex.ensure_indexes()  # explicit call still works
    assert "code_1" in await asyncassets_db.no_auto_index.index_information()


async def test_indexes_are_recreated_in_each_fresh_database(asyncassets_db, asyncassets_connect):
    # The "already ensured" memo is per database: a second database gets its own.
    class DocIndexedElsewhere(Document):
        code = StringField()
        meta = {"collection": "indexed_elsewhere", "indexes": ["code"], "db_alias": "other"}

    other = asyncassets_connect("other")
    await DocIndexedElsewhere(code="a").save()
    assert "code_1" in await other.indexed_elsewhere.index_information()
    assert "indexed_elsewhere" not in await asyncassets_db.list_collection_names()


# -- mongoengine is left alone -----------------------------------------------------


class SyncMongoengineThing(mongoengine.Document):
    name = mongoengine.StringField()
    meta = {"db_alias": "doc_sync_alias", "collection": "sync_things"}


class SyncMongoengineOwner(mongoengine.Document):
    thing = mongoengine.ReferenceField(SyncMongoengineThing)
    meta = {"db_alias": "doc_sync_alias", "collection": "sync_owners"}


def test_mongoengine_document_methods_stay_synchronous():
    assert not inspect.iscoroutinefunction(mongoengine.Document.save)
    assert not inspect.iscoroutinefunction(mongoengine.Document.delete)
    assert not inspect.iscoroutinefunction(mongoengine.Document.reload)
    assert inspect.iscoroutinefunction(Document.save)
    manager = inspect.getattr_static(SyncMongoengineThing, "objects")
    assert type(manager).__module__.startswith("mongoengine.")
    assert SyncMongoengineOwner._fields["thing"]._auto_dereference is True


def test_mongoengine_sync_document_still_works_in_same_process(asyncassets_server_uri):
    # Declaring asyncassets classes (above) must not change how mongoengine behaves.
    db_name = "aa_doc_sync_mongoengine_" + ObjectId().binary.hex()
    mongoengine.connect(
        db=db_name, host=asyncassets_server_uri, alias="doc_sync_alias",
        uuidRepresentation="standard",
    )
    try:
        thing = SyncMongoengineThing(name="sync").save()  # a plain call, not a coroutine
        assert isinstance(thing, SyncMongoengineThing)
        SyncMongoengineOwner(thing=thing).save()

        owner = SyncMongoengineOwner.objects.first()
        assert owner.thing.name == "sync"  # mongoengine's own (sync) dereferencing
    finally:
        conn = mongoengine.connection.get_connection("doc_sync_alias")
        conn.drop_database(db_name)
        mongoengine.disconnect(alias="doc_sync_alias")


# -- dynamic documents -------------------------------------------------------------


async def test_dynamic_document_stores_undeclared_attributes(asyncassets_db):
    doc = DocDynamic(name="n", colour="red")
    doc.size = 3
    await doc.save()

    raw = await _raw(asyncassets_db, "doc_dynamic", _id=doc.id)
    assert (raw["name"], raw["colour"], raw["size"]) == ("n", "red", 3)

    loaded = await DocDynamic.objects.get(id=doc.id)
    assert (loaded.colour, loaded.size) == ("red", 3)

    loaded.size = 4
    await loaded.save()
    assert (await _raw(asyncassets_db, "doc_dynamic", _id=doc.id))["size"] == 4


async def test_create_index_is_awaited_and_builds_the_index(asyncassets_db):
    class Indexed(Document):
        name = StringField()
        meta = {"collection": "create_index_target", "auto_create_index": False}

    name = await Indexed.create_index("-name", unique=True)
    info = await asyncassets_db["create_index_target"].index_information()
    assert info[name]["key"] == [("name", -1)]
    assert info[name]["unique"] is True


@pytest.mark.parametrize(
    "call",
    [
        lambda d: d.select_related(),
        lambda d: d.cascade_save(),
        lambda d: d.switch_db("other"),
        lambda d: d.switch_collection("other"),
        lambda d: type(d).compare_indexes(),
    ],
    ids=["select_related", "cascade_save", "switch_db", "switch_collection", "compare_indexes"],
)
def test_blocking_mongoengine_methods_say_what_to_use_instead(call):
    class Blocking(Document):
        name = StringField()

    with pytest.raises(NotImplementedError, match=r"use|await|read"):
        call(Blocking(name="x"))
