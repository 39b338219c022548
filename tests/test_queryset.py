"""The async QuerySet: building (no I/O), reading, counting, writing, aggregating."""

from __future__ import annotations

import mongoengine
import pytest
from bson import ObjectId
from pymongo.errors import OperationFailure

import asyncassets
from asyncassets import (
    Document,
    DoesNotExist,
    InvalidQueryError,
    MultipleObjectsReturned,
    NotUniqueError,
    OperationError,
    Q,
    QuerySet,
    ValidationError,
)
from asyncassets.fields import EmbeddedDocumentField, IntField, ListField, StringField

# Class names are prefixed "Qs" so they never clash in mongoengine's global
# document registry with the classes of the other test modules.


class QsAnimal(Document):
    name = StringField(required=True)
    genus = StringField()
    legs = IntField(default=4)
    weight = IntField()
    tags = ListField(StringField())
    meta = {"collection": "animals"}


class QsOrdered(Document):
    name = StringField()
    rank = IntField()
    meta = {"ordering": ["-rank"]}


class QsUnique(Document):
    code = StringField(unique=True)


class QsShape(Document):
    sides = IntField()
    meta = {"allow_inheritance": True}


class QsSquare(QsShape):
    size = IntField()


ZOO = [
    ("marmot", "Marmota", 4, 5, ["rodent", "burrow"]),
    ("squirrel", "Sciurus", 4, 1, ["rodent", "tree"]),
    ("owl", "Strix", 2, 2, ["bird", "tree"]),
    ("snake", "Python", 0, 30, []),
    ("spider", "Araneus", 8, 0, ["web"]),
]


@pytest.fixture
async def zoo(asyncassets_db):
    animals = [
        QsAnimal(name=n, genus=g, legs=legs, weight=w, tags=t) for n, g, legs, w, t in ZOO
    ]
    await QsAnimal.objects.insert(animals)
    return asyncassets_db


def names(docs) -> list[str]:
    return [d.name for d in docs]


# -- building does no I/O ----------------------------------------------------------


async def test_building_a_queryset_does_no_io_while_disconnected():
    # Nothing is registered: any I/O (even getting a collection) would raise.
    assert "default" not in asyncassets.connection.registered_aliases()

    qs = (
        QsAnimal.objects(legs__gte=2)
        .filter(Q(genus="Marmota") | Q(name="owl"))
        .order_by("-weight", "name")
        .skip(1)
        .limit(3)
        .only("name")
        .exclude("tags")
        .as_pymongo()
        .batch_size(10)
    )

    assert isinstance(qs, QuerySet)
    with pytest.raises(asyncassets.errors.ConnectionNotRegistered):
        await qs.to_list()


async def test_chaining_returns_new_querysets_and_leaves_the_original(zoo):
    base = QsAnimal.objects(legs=4)
    narrowed = base.filter(name="marmot")
    limited = base.limit(1)

    assert narrowed is not base
    assert sorted(names(await base.to_list())) == ["marmot", "squirrel"]
    assert names(await narrowed.to_list()) == ["marmot"]
    assert len(await limited.to_list()) == 1
    assert await base.count() == 2


# -- filtering ---------------------------------------------------------------------


async def test_objects_call_and_filter_chain_with_operators(zoo):
    found = await QsAnimal.objects(legs__gte=4).filter(weight__ne=5).order_by("name").to_list()
    assert names(found) == ["spider", "squirrel"]

    found = await QsAnimal.objects(genus__in=["Strix", "Python", "Homo"]).order_by("name").to_list()
    assert names(found) == ["owl", "snake"]

    found = await QsAnimal.objects(tags="tree").order_by("name").to_list()
    assert names(found) == ["owl", "squirrel"]


async def test_q_objects_or_and(zoo):
    either = Q(legs=0) | Q(legs=8)
    found = await QsAnimal.objects(either).order_by("name").to_list()
    assert names(found) == ["snake", "spider"]

    both = Q(legs=4) & Q(weight__lt=3)
    assert names(await QsAnimal.objects(both).to_list()) == ["squirrel"]

    mixed = await QsAnimal.objects.filter(Q(legs=2) | Q(legs=4), weight__gte=2).order_by(
        "name"
    ).to_list()
    assert names(mixed) == ["marmot", "owl"]


async def test_raw_query(zoo):
    found = await QsAnimal.objects(__raw__={"weight": {"$gt": 4}}).order_by("name").to_list()
    assert names(found) == ["marmot", "snake"]

    combined = await QsAnimal.objects(__raw__={"weight": {"$gt": 4}}, legs=0).to_list()
    assert names(combined) == ["snake"]


async def test_filter_on_unknown_field_raises_invalid_query_error(zoo):
    with pytest.raises(InvalidQueryError, match="colour"):
        await QsAnimal.objects(colour="red").to_list()
    assert InvalidQueryError is mongoengine.errors.InvalidQueryError


async def test_filter_with_non_q_positional_raises_type_error():
    with pytest.raises(TypeError, match="Q objects"):
        QsAnimal.objects.filter({"name": "owl"})


async def test_subclass_queryset_sees_only_its_class(asyncassets_db):
    await QsShape(sides=3).save()
    await QsSquare(sides=4, size=2).save()

    assert await QsShape.objects.count() == 2
    squares = await QsSquare.objects.to_list()
    assert [(type(s), s.size) for s in squares] == [(QsSquare, 2)]
    assert await QsShape.objects(sides=4).first() == squares[0]


# -- ordering, limit, skip ---------------------------------------------------------


async def test_order_by_ascending_descending_and_multiple(zoo):
    assert names(await QsAnimal.objects.order_by("weight").to_list()) == [
        "spider", "squirrel", "owl", "marmot", "snake",
    ]
    assert names(await QsAnimal.objects.order_by("-weight").to_list()) == [
        "snake", "marmot", "owl", "squirrel", "spider",
    ]
    assert names(await QsAnimal.objects.order_by("-legs", "name").to_list()) == [
        "spider", "marmot", "squirrel", "owl", "snake",
    ]
    assert names(await QsAnimal.objects.order_by("-legs", "-name").to_list()) == [
        "spider", "squirrel", "marmot", "owl", "snake",
    ]
    # insert() gives ObjectIds in insertion order, so -pk is newest first
    assert names(await QsAnimal.objects.order_by("-pk").to_list()) == [
        "spider", "snake", "owl", "squirrel", "marmot",
    ]


async def test_order_by_unknown_field_raises_lookup_error():
    with pytest.raises(mongoengine.errors.LookUpError, match="colour"):
        QsAnimal.objects.order_by("colour")


async def test_meta_ordering_is_the_default_and_order_by_overrides_it(asyncassets_db):
    for name, rank in [("b", 2), ("c", 3), ("a", 1)]:
        await QsOrdered(name=name, rank=rank).save()

    assert names(await QsOrdered.objects.to_list()) == ["c", "b", "a"]
    assert (await QsOrdered.objects.first()).name == "c"
    assert names(await QsOrdered.objects.order_by("name").to_list()) == ["a", "b", "c"]


async def test_limit_and_skip(zoo):
    ordered = QsAnimal.objects.order_by("name")

    assert names(await ordered.limit(2).to_list()) == ["marmot", "owl"]
    assert names(await ordered.skip(3).to_list()) == ["spider", "squirrel"]
    assert names(await ordered.skip(1).limit(2).to_list()) == ["owl", "snake"]
    assert await ordered.limit(0).to_list() == []
    assert await ordered.skip(10).to_list() == []


async def test_negative_limit_or_skip_raises_value_error():
    with pytest.raises(ValueError, match="limit"):
        QsAnimal.objects.limit(-1)
    with pytest.raises(ValueError, match="skip"):
        QsAnimal.objects.skip(-1)


# -- projections -------------------------------------------------------------------


async def test_only_loads_listed_fields_and_id(zoo):
    marmot = await QsAnimal.objects(name="marmot").only("name", "weight").first()

    assert (marmot.name, marmot.weight) == ("marmot", 5)
    assert isinstance(marmot.id, ObjectId)
    assert marmot.genus is None
    assert marmot.legs == 4  # the default, not a loaded value
    assert marmot.tags == []


async def test_only_then_save_does_not_erase_unloaded_fields(zoo):
    marmot = await QsAnimal.objects(name="marmot").only("name").first()
    marmot.name = "groundhog"
    await marmot.save()

    raw = await zoo.animals.find_one({"_id": marmot.id})
    assert (raw["name"], raw["genus"], raw["weight"]) == ("groundhog", "Marmota", 5)


async def test_exclude_leaves_out_fields(zoo):
    owl = await QsAnimal.objects(name="owl").exclude("genus", "tags").first()

    assert (owl.name, owl.legs, owl.weight) == ("owl", 2, 2)
    assert owl.genus is None
    assert owl.tags == []


async def test_as_pymongo_returns_raw_dicts(zoo):
    raws = await QsAnimal.objects(legs=2).as_pymongo().to_list()
    assert len(raws) == 1
    raw = raws[0]
    assert type(raw) is dict
    assert {k: v for k, v in raw.items() if k != "_id"} == {
        "name": "owl", "genus": "Strix", "legs": 2, "weight": 2, "tags": ["bird", "tree"],
    }

    only = await QsAnimal.objects(name="owl").only("name").as_pymongo().first()
    assert set(only) == {"_id", "name"}


# -- reading -----------------------------------------------------------------------


async def test_first_returns_document_or_none(zoo):
    lightest = await QsAnimal.objects.order_by("weight").first()
    assert isinstance(lightest, QsAnimal)
    assert lightest.name == "spider"

    assert await QsAnimal.objects(legs=100).first() is None


async def test_first_on_empty_collection_is_none(asyncassets_db):
    assert await QsAnimal.objects.first() is None


async def test_get_returns_the_single_match(zoo):
    owl = await QsAnimal.objects.get(name="owl")
    assert (owl.genus, owl.legs) == ("Strix", 2)

    same = await QsAnimal.objects(legs=2).get()
    assert same.id == owl.id
    assert (await QsAnimal.objects.get(Q(name="owl") | Q(name="nobody"))).id == owl.id


async def test_get_without_match_raises_class_specific_does_not_exist(zoo):
    with pytest.raises(QsAnimal.DoesNotExist, match="QsAnimal matching query does not exist"):
        await QsAnimal.objects.get(name="unicorn")

    with pytest.raises(DoesNotExist):
        await QsAnimal.objects.get(name="unicorn")
    assert issubclass(QsAnimal.DoesNotExist, mongoengine.errors.DoesNotExist)
    assert not issubclass(QsAnimal.DoesNotExist, QsOrdered.DoesNotExist)


async def test_get_with_several_matches_raises_multiple_objects_returned(zoo):
    with pytest.raises(QsAnimal.MultipleObjectsReturned, match="2 or more"):
        await QsAnimal.objects.get(legs=4)

    with pytest.raises(MultipleObjectsReturned):
        await QsAnimal.objects.get(legs=4)
    assert issubclass(
        QsAnimal.MultipleObjectsReturned, mongoengine.errors.MultipleObjectsReturned
    )


async def test_count_ignores_limit_and_skip_unless_asked(zoo):
    assert await QsAnimal.objects.count() == 5
    assert await QsAnimal.objects(legs=4).count() == 2
    assert await QsAnimal.objects(legs=100).count() == 0

    qs = QsAnimal.objects.skip(1).limit(3)
    assert await qs.count() == 5
    assert await qs.count(with_limit_and_skip=True) == 3
    assert await QsAnimal.objects.skip(4).limit(3).count(with_limit_and_skip=True) == 1
    assert await QsAnimal.objects.limit(0).count(with_limit_and_skip=True) == 0


async def test_to_list_with_length(zoo):
    everything = await QsAnimal.objects.order_by("name").to_list()
    assert names(everything) == ["marmot", "owl", "snake", "spider", "squirrel"]
    assert all(isinstance(d, QsAnimal) for d in everything)

    assert names(await QsAnimal.objects.order_by("name").to_list(length=2)) == ["marmot", "owl"]
    assert await QsAnimal.objects.to_list(length=0) == []


async def test_to_list_length_never_exceeds_the_querysets_limit(zoo):
    assert len(await QsAnimal.objects.limit(2).to_list(length=4)) == 2


async def test_async_for_iterates_every_match(zoo):
    seen = [a.name async for a in QsAnimal.objects(legs__lte=4).order_by("-weight")]
    assert seen == ["snake", "marmot", "owl", "squirrel"]

    batched = [a.name async for a in QsAnimal.objects.order_by("name").batch_size(2)]
    assert len(batched) == 5

    assert [a async for a in QsAnimal.objects.limit(0)] == []


async def test_distinct(zoo):
    assert sorted(await QsAnimal.objects.distinct("legs")) == [0, 2, 4, 8]
    assert sorted(await QsAnimal.objects(legs__gte=4).distinct("genus")) == [
        "Araneus", "Marmota", "Sciurus",
    ]
    assert sorted(await QsAnimal.objects.distinct("tags")) == [
        "bird", "burrow", "rodent", "tree", "web",
    ]


async def test_aggregate_groups_after_the_filter(zoo):
    pipeline = [
        {"$group": {"_id": "$legs", "total": {"$sum": "$weight"}, "n": {"$sum": 1}}},
        {"$sort": {"_id": 1}},
    ]
    rows = [row async for row in QsAnimal.objects(legs__gte=2).aggregate(pipeline)]

    assert rows == [
        {"_id": 2, "total": 2, "n": 1},
        {"_id": 4, "total": 6, "n": 2},
        {"_id": 8, "total": 0, "n": 1},
    ]


async def test_aggregate_respects_order_skip_and_limit(zoo):
    qs = QsAnimal.objects.order_by("-weight").skip(1).limit(2)
    rows = [row async for row in qs.aggregate([{"$project": {"_id": 0, "name": 1}}])]
    assert rows == [{"name": "marmot"}, {"name": "owl"}]


# -- writing -----------------------------------------------------------------------


async def test_delete_returns_count_and_leaves_the_others(zoo):
    assert await QsAnimal.objects(legs=4).delete() == 2

    left = sorted([raw["name"] async for raw in zoo.animals.find()])
    assert left == ["owl", "snake", "spider"]
    assert await QsAnimal.objects(legs=4).delete() == 0


async def test_delete_respects_limit(zoo):
    assert await QsAnimal.objects.order_by("weight").limit(2).delete() == 2

    left = sorted([raw["name"] async for raw in zoo.animals.find()])
    assert left == ["marmot", "owl", "snake"]


async def test_update_returns_matched_count_and_applies_operators(zoo):
    assert await QsAnimal.objects(legs=4).update(inc__weight=10, push__tags="updated") == 2

    raws = {raw["name"]: raw async for raw in zoo.animals.find()}
    assert raws["marmot"]["weight"] == 15
    assert raws["squirrel"]["weight"] == 11
    assert raws["squirrel"]["tags"] == ["rodent", "tree", "updated"]
    assert raws["owl"]["weight"] == 2  # not matched, not changed

    assert await QsAnimal.objects(legs=100).update(set__weight=1) == 0


async def test_update_one_changes_a_single_document(zoo):
    assert await QsAnimal.objects(legs=4).update_one(set__genus="Changed") == 1

    assert await zoo.animals.count_documents({"genus": "Changed"}) == 1
    assert await QsAnimal.objects(name="nobody").update_one(set__genus="X") == 0


async def test_update_with_upsert_creates_document(asyncassets_db):
    await QsAnimal.objects(name="yeti").update(upsert=True, set__legs=2)

    raw = await asyncassets_db.animals.find_one({"name": "yeti"})
    assert raw["legs"] == 2


async def test_update_without_parameters_raises_operation_error(zoo):
    with pytest.raises(OperationError, match="No update parameters"):
        await QsAnimal.objects.update()


async def test_update_unknown_field_raises_invalid_query_error(zoo):
    with pytest.raises(InvalidQueryError):
        await QsAnimal.objects.update(set__colour="red")


async def test_insert_bulk_sets_ids_and_stores_documents(asyncassets_db):
    docs = [QsAnimal(name="a", legs=1), QsAnimal(name="b", legs=2)]

    returned = await QsAnimal.objects.insert(docs)

    assert returned == docs
    assert all(isinstance(d.id, ObjectId) for d in docs)
    raws = {raw["_id"]: raw async for raw in asyncassets_db.animals.find()}
    assert {raws[d.id]["name"] for d in docs} == {"a", "b"}

    docs[0].legs = 3
    await docs[0].save()  # an inserted document saves as an update
    assert await asyncassets_db.animals.count_documents({}) == 2
    assert (await asyncassets_db.animals.find_one({"_id": docs[0].id}))["legs"] == 3


async def test_insert_with_load_bulk_false_returns_ids(asyncassets_db):
    docs = [QsAnimal(name="a"), QsAnimal(name="b")]
    ids = await QsAnimal.objects.insert(docs, load_bulk=False)

    assert ids == [d.id for d in docs]
    assert await asyncassets_db.animals.count_documents({"_id": {"$in": ids}}) == 2


async def test_insert_empty_list_returns_empty_list(asyncassets_db):
    assert await QsAnimal.objects.insert([]) == []


async def test_insert_single_document(asyncassets_db):
    doc = QsAnimal(name="solo")

    returned = await QsAnimal.objects.insert(doc)

    assert returned is doc
    assert isinstance(doc.id, ObjectId)
    assert (await asyncassets_db.animals.find_one({"_id": doc.id}))["name"] == "solo"


async def test_insert_duplicate_raises_not_unique_error(asyncassets_db):
    await QsUnique(code="x").save()

    with pytest.raises(NotUniqueError, match="unique"):
        await QsUnique.objects.insert([QsUnique(code="y"), QsUnique(code="x")])

    codes = sorted([raw["code"] async for raw in asyncassets_db.qs_unique.find()])
    assert codes == ["x", "y"]  # ordered insert stopped at the duplicate


async def test_insert_wrong_type_raises_type_error_and_inserts_nothing(asyncassets_db):
    with pytest.raises(TypeError, match="insert\\(\\) takes QsAnimal instances, not QsOrdered"):
        await QsAnimal.objects.insert([QsAnimal(name="ok"), QsOrdered(name="wrong")])

    assert await asyncassets_db.animals.count_documents({}) == 0


async def test_insert_invalid_document_raises_validation_error_and_inserts_nothing(
    asyncassets_db,
):
    with pytest.raises(ValidationError):
        await QsAnimal.objects.insert([QsAnimal(name="ok"), QsAnimal(legs=2)])

    assert await asyncassets_db.animals.count_documents({}) == 0


async def test_insert_already_saved_document_raises_operation_error(asyncassets_db):
    saved = await QsAnimal(name="a").save()
    with pytest.raises(OperationError, match="update"):
        await QsAnimal.objects.insert([saved])


async def test_modify_returns_old_document_by_default(zoo):
    old = await QsAnimal.objects(name="owl").modify(inc__weight=1)

    assert isinstance(old, QsAnimal)
    assert old.weight == 2
    assert (await zoo.animals.find_one({"name": "owl"}))["weight"] == 3


async def test_modify_new_returns_updated_document(zoo):
    new = await QsAnimal.objects(name="owl").modify(new=True, set__genus="Bubo")

    assert new.genus == "Bubo"
    assert (await zoo.animals.find_one({"name": "owl"}))["genus"] == "Bubo"


async def test_modify_follows_ordering(zoo):
    heaviest = await QsAnimal.objects.order_by("-weight").modify(new=True, set__genus="Heavy")
    assert heaviest.name == "snake"
    assert await zoo.animals.count_documents({"genus": "Heavy"}) == 1


async def test_modify_without_match_returns_none(zoo):
    assert await QsAnimal.objects(name="unicorn").modify(set__legs=1) is None
    assert await zoo.animals.count_documents({"legs": 1}) == 0


async def test_modify_remove_deletes_and_returns_document(zoo):
    removed = await QsAnimal.objects(name="spider").modify(remove=True)

    assert removed.name == "spider"
    assert await zoo.animals.count_documents({"name": "spider"}) == 0
    assert await zoo.animals.count_documents({}) == 4


async def test_modify_without_update_or_remove_raises_operation_error(zoo):
    with pytest.raises(OperationError, match="No update parameters"):
        await QsAnimal.objects(name="owl").modify()
    assert await zoo.animals.count_documents({}) == 5


async def test_modify_remove_with_new_raises_operation_error(zoo):
    with pytest.raises(OperationError, match="Conflicting parameters"):
        await QsAnimal.objects(name="owl").modify(remove=True, new=True)
    assert await zoo.animals.count_documents({"name": "owl"}) == 1


# -- mongoengine's QuerySet helpers, awaited ------------------------------------------


class QsRound(mongoengine.EmbeddedDocument):
    score = IntField()


class QsPlayer(Document):
    name = StringField()
    points = ListField(IntField())
    rounds = ListField(EmbeddedDocumentField(QsRound))
    best = EmbeddedDocumentField(QsRound)


async def test_create_inserts_and_returns_the_document(asyncassets_db):
    owl = await QsAnimal.objects.create(name="owl", legs=2)
    assert owl.pk is not None and not owl._created
    assert (await QsAnimal.objects.get(pk=owl.pk)).legs == 2
    with pytest.raises(NotUniqueError):
        await QsAnimal.objects.create(id=owl.pk, name="again")  # insert, never overwrite


async def test_with_id_returns_the_document_or_none(zoo):
    owl = await QsAnimal.objects.get(name="owl")
    assert (await QsAnimal.objects.with_id(owl.pk)).name == "owl"
    assert await QsAnimal.objects.with_id(str(owl.pk)) == owl
    assert await QsAnimal.objects.with_id(ObjectId()) is None
    with pytest.raises(InvalidQueryError, match="with_id"):
        await QsAnimal.objects(legs=2).with_id(owl.pk)


async def test_in_bulk_maps_ids_to_documents_in_one_query(zoo):
    owl, snake = await QsAnimal.objects(name__in=["owl", "snake"]).order_by("name").to_list()
    found = await QsAnimal.objects.in_bulk([owl.pk, snake.pk, ObjectId()])
    assert {pk: d.name for pk, d in found.items()} == {owl.pk: "owl", snake.pk: "snake"}
    assert list(await QsAnimal.objects(legs=0).in_bulk([owl.pk, snake.pk])) == [snake.pk]
    assert await QsAnimal.objects.scalar("name").in_bulk([owl.pk]) == {owl.pk: "owl"}
    raw = await QsAnimal.objects.as_pymongo().in_bulk([owl.pk])
    assert raw[owl.pk]["name"] == "owl"
    assert await QsAnimal.objects.in_bulk([]) == {}


async def test_upsert_one_updates_the_match_or_inserts_one(zoo):
    owl = await QsAnimal.objects(name="owl").upsert_one(set__weight=3)
    assert (owl.name, owl.weight) == ("owl", 3)
    assert await QsAnimal.objects.count() == 5
    bat = await QsAnimal.objects(name="bat").upsert_one(set__legs=2)
    assert (bat.name, bat.legs, bat.pk is not None) == ("bat", 2, True)
    assert (await QsAnimal.objects.get(name="bat")).pk == bat.pk


async def test_exists_replaces_the_truth_value_of_a_queryset(zoo):
    assert await QsAnimal.objects(legs=8).exists() is True
    assert await QsAnimal.objects(legs=3).exists() is False
    assert await QsAnimal.objects.limit(0).exists() is False
    with pytest.raises(TypeError, match=r"await qs\.exists\(\)"):
        if QsAnimal.objects(legs=3):  # always true without await: refused instead
            pass


async def test_scalar_and_values_list_return_values_instead_of_documents(zoo):
    qs = QsAnimal.objects(legs__gte=4).order_by("name")
    assert await qs.scalar("name").to_list() == ["marmot", "spider", "squirrel"]
    assert await qs.values_list("name", "legs").to_list() == [
        ("marmot", 4), ("spider", 8), ("squirrel", 4),
    ]
    assert [v async for v in qs.scalar("weight")] == [5, 0, 1]
    assert await qs.scalar("name").first() == "marmot"
    assert names(await qs.scalar("name").scalar().to_list()) == ["marmot", "spider", "squirrel"]


async def test_scalar_reaches_into_embedded_documents(asyncassets_db):
    await QsPlayer(name="a", best=QsRound(score=7)).save()
    await QsPlayer(name="b").save()
    rows = await QsPlayer.objects.order_by("name").scalar("name", "best__score").to_list()
    assert rows == [("a", 7), ("b", None)]


async def test_sum_and_average_over_a_field(zoo):
    assert await QsAnimal.objects.sum("weight") == 38
    assert await QsAnimal.objects.average("weight") == pytest.approx(7.6)
    assert await QsAnimal.objects(legs=4).sum("weight") == 6
    assert await QsAnimal.objects.order_by("-weight").limit(2).sum("weight") == 35
    assert await QsAnimal.objects(legs=3).sum("weight") == 0
    assert await QsAnimal.objects(legs=3).average("weight") == 0


async def test_sum_and_average_count_each_element_of_a_list(asyncassets_db):
    await QsPlayer(name="a", points=[1, 2, 3], rounds=[QsRound(score=10), QsRound(score=20)]).save()
    await QsPlayer(name="b", points=[4], rounds=[QsRound(score=30)]).save()
    await QsPlayer(name="c").save()
    assert await QsPlayer.objects.sum("points") == 10
    assert await QsPlayer.objects.average("points") == pytest.approx(2.5)
    assert await QsPlayer.objects.sum("rounds.score") == 60
    assert await QsPlayer.objects.average("rounds.score") == pytest.approx(20)


async def test_item_frequencies_count_values_and_list_elements(zoo):
    assert await QsAnimal.objects.item_frequencies("legs") == {4: 2, 2: 1, 0: 1, 8: 1}
    assert await QsAnimal.objects.item_frequencies("tags") == {
        "rodent": 2, "tree": 2, "burrow": 1, "bird": 1, "web": 1,
    }
    assert await QsAnimal.objects(legs=4).item_frequencies("legs", normalize=True) == {4: 1.0}
    await QsAnimal(name="ghost").save()  # no genus: counted as None
    frequencies = await QsAnimal.objects.item_frequencies("genus", normalize=True)
    assert frequencies[None] == pytest.approx(1 / 6)
    assert sum(frequencies.values()) == pytest.approx(1.0)


async def test_none_matches_nothing_and_changes_nothing(zoo):
    nothing = QsAnimal.objects(legs=4).none()
    assert await nothing.to_list() == []
    assert await nothing.count() == 0
    assert await nothing.first() is None
    assert await nothing.update(upsert=True, set__weight=1) == 0
    assert await nothing.upsert_one(set__weight=1) is None
    assert await nothing.modify(upsert=True, set__weight=1) is None
    assert await nothing.delete() == 0
    assert await QsAnimal.objects.count() == 5
    assert await QsAnimal.objects(weight=1).count() == 1


async def test_no_sub_classes_and_clear_cls_query(asyncassets_db):
    await QsShape(sides=3).save()
    await QsSquare(sides=4, size=2).save()
    assert await QsShape.objects.no_sub_classes().scalar("sides").to_list() == [3]
    assert await QsShape.objects.count() == 2
    await QsShape._get_collection().insert_one({"sides": 5})  # no _cls at all
    assert await QsShape.objects.clear_cls_query().count() == 3


async def test_slicing_applies_skip_and_limit_without_io(zoo):
    qs = QsAnimal.objects.order_by("name")
    assert names(await qs[1:3].to_list()) == ["owl", "snake"]
    assert names(await qs[3:].to_list()) == ["spider", "squirrel"]
    assert names(await qs[:1].to_list()) == ["marmot"]
    assert names(await qs.skip(1)[1:2].to_list()) == ["snake"]  # from its own skip
    assert names(await qs.limit(2)[1:5].to_list()) == ["owl"]  # within its own limit
    assert await qs[2:2].to_list() == []
    with pytest.raises(TypeError, match=r"skip\(i\)\.first\(\)"):
        qs[0]
    with pytest.raises(TypeError, match="async for"):
        list(qs)
    with pytest.raises(ValueError, match="negative"):
        qs[-1:]


async def test_limit_zero_deletes_and_aggregates_nothing(zoo):
    # limit(0) means "no documents" here; the server would take it as "no limit".
    assert await QsAnimal.objects.limit(0).delete() == 0
    assert await QsAnimal.objects.order_by("name")[2:2].delete() == 0
    assert [row async for row in QsAnimal.objects.limit(0).aggregate([])] == []
    assert await QsAnimal.objects.limit(0).sum("weight") == 0
    assert await QsAnimal.objects.count() == 5


async def test_all_clone_no_cache_and_no_dereference_are_copies(zoo):
    base = QsAnimal.objects(legs=4)
    for copy in (base.all(), base.clone(), base.no_cache(), base.no_dereference()):
        assert copy is not base
        assert sorted(names(await copy.to_list())) == ["marmot", "squirrel"]


async def test_all_fields_undoes_only(zoo):
    owl = await QsAnimal.objects(name="owl").only("name").all_fields().first()
    assert (owl.name, owl.genus, owl.tags) == ("owl", "Strix", ["bird", "tree"])


async def test_hint_comment_and_max_time_ms_reach_the_server(zoo):
    with pytest.raises(OperationFailure, match="nope"):
        await QsAnimal.objects.hint("nope").to_list()
    with pytest.raises(OperationFailure, match="nope"):
        await QsAnimal.objects.hint("nope").count()
    with pytest.raises(OperationFailure, match="nope"):
        await QsAnimal.objects.hint("nope").sum("weight")
    qs = QsAnimal.objects(legs=4).hint("_id_").comment("zoo").max_time_ms(5000)
    assert await qs.count() == 2
    assert sorted(await qs.scalar("name").to_list()) == ["marmot", "squirrel"]
    assert sorted(await qs.distinct("name")) == ["marmot", "squirrel"]
    assert len(await qs.allow_disk_use(True).timeout(False).to_list()) == 2
    plan = await qs.explain()
    assert "queryPlanner" in plan


async def test_to_json_and_from_json_round_trip(zoo):
    text = await QsAnimal.objects(name="owl").to_json()
    assert '"name": "owl"' in text
    (owl,) = QsAnimal.objects.from_json(text)
    assert owl == await QsAnimal.objects.get(name="owl")
    assert (owl.name, owl.tags) == ("owl", ["bird", "tree"])
