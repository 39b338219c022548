"""Documents found by their files: conditions on a FileField's catalogue entry.

Real server, real uploads; the documents store only their files' ids.
"""

from __future__ import annotations

import datetime as dt
import itertools
from pathlib import Path
from typing import Any

import pytest
from mongoengine.errors import InvalidQueryError

from asyncassets import Document, EmbeddedDocument
from asyncassets.fields import (
    EmbeddedDocumentField,
    FileField,
    IntField,
    ListField,
    StringField,
)
from asyncassets.filequery import FileMatch, entry_filter
from asyncassets.queryset import Q
from asyncassets.storage import FileSystemStorage

_n = itertools.count()


class Frame(EmbeddedDocument):
    image = FileField(collection_name="frames")


def classes(storage: Any = None) -> tuple[Any, ...]:
    n = next(_n)
    photo = FileField(storage=storage) if storage is not None else FileField()
    animal = type(f"QAnimal{n}", (Document,), {
        "meta": {"collection": f"qanimals{n}"},
        "genus": StringField(),
        "legs": IntField(),
        "photo": photo,
        "extras": ListField(FileField(collection_name="extras")),
        "frame": EmbeddedDocumentField(Frame),
    })
    return (animal,)


async def make(animal: Any, genus: str, legs: int, data: bytes, content_type: str,
               gallery: str, extras: tuple[bytes, ...] = (), framed: bytes | None = None) -> Any:
    doc = animal(genus=genus, legs=legs, frame=Frame())
    await doc.photo.put(data, content_type=content_type, filename=f"{genus}.bin",
                        gallery_id=gallery)
    for extra in extras:
        proxy = doc._fields["extras"].field.proxy_for(doc, "extras")
        await proxy.put(extra, content_type="text/plain")
        doc.extras.append(proxy)
    if framed is not None:
        await doc.frame.image.put(framed, content_type="image/gif")
    return await doc.save()


@pytest.fixture(params=["gridfs", "filesystem"])
async def zoo(request: pytest.FixtureRequest, tmp_path: Path, asyncassets_db: Any) -> Any:
    storage = None
    if request.param == "filesystem":
        storage = FileSystemStorage(tmp_path / "photos", collection_name=f"ph{next(_n)}")
    (animal,) = classes(storage)
    await make(animal, "Marmota", 4, b"\xff\xd8\xff" + b"m" * 20_000, "image/jpeg", "g1",
               extras=(b"note",), framed=b"GIF89a")
    await make(animal, "Sciurus", 4, b"\x89PNG" + b"s" * 500, "image/png", "g1")
    await make(animal, "Aquila", 2, b"\xff\xd8\xff" + b"a" * 30_000, "image/jpeg", "g2",
               extras=(b"a longer note, 30 bytes long",))
    await make(animal, "Bufo", 4, b"%PDF" + b"b" * 40_000, "application/pdf", "g1")
    return animal


async def genera(qs: Any) -> list[str]:
    return sorted(d.genus for d in await qs.to_list())


async def test_conditions_on_the_file_combine_with_the_documents_own(zoo: Any) -> None:
    qs = zoo.objects(photo__content_type__startswith="image/", photo__length__gt=10_000,
                     photo__metadata__gallery_id="g1")
    assert await genera(qs) == ["Marmota"]
    assert await genera(zoo.objects(legs=4, photo__content_type__startswith="image/")) == [
        "Marmota", "Sciurus"]
    assert await genera(zoo.objects(photo__filename__in=["Bufo.bin", "Aquila.bin"])) == [
        "Aquila", "Bufo"]
    since = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
    assert len(await zoo.objects(photo__uploaded__gte=since).to_list()) == 4
    assert await genera(zoo.objects(photo__size__lt=1000)) == ["Sciurus"]
    # the documents still store the ids only
    raw = await zoo.objects(genus="Marmota").as_pymongo().first()
    assert not isinstance(raw["photo"], dict)


async def test_or_chaining_lists_and_embedded_documents(zoo: Any) -> None:
    either = zoo.objects(Q(photo__length__lt=1000) | Q(genus="Bufo"))
    assert await genera(either) == ["Bufo", "Sciurus"]
    chained = zoo.objects(photo__metadata__gallery_id="g1").filter(photo__length__gt=10_000)
    assert await genera(chained) == ["Bufo", "Marmota"]
    assert await genera(zoo.objects(extras__length__gt=10)) == ["Aquila"]
    assert await genera(zoo.objects(frame__image__content_type="image/gif")) == ["Marmota"]
    assert await genera(zoo.objects(photo__metadata__gallery_id__ne="g1")) == ["Aquila"]


async def test_count_first_exists_order_and_pages(zoo: Any) -> None:
    jpegs = zoo.objects(photo__content_type="image/jpeg")
    assert await jpegs.count() == 2
    assert (await jpegs.order_by("-legs").first()).genus == "Marmota"
    assert await jpegs.exists()
    assert not await zoo.objects(photo__content_type="video/mp4").exists()
    assert [d.genus for d in await jpegs.order_by("genus").skip(1).limit(1).to_list()] == [
        "Marmota"]
    assert [d.genus async for d in jpegs.order_by("genus")] == ["Aquila", "Marmota"]
    assert await jpegs.distinct("genus") == ["Aquila", "Marmota"] or sorted(
        await jpegs.distinct("genus")) == ["Aquila", "Marmota"]
    assert await jpegs.sum("legs") == 6
    assert (await jpegs.explain())["queryPlanner"]


async def test_update_and_delete_apply_to_the_matching_documents(zoo: Any) -> None:
    assert await zoo.objects(photo__content_type="image/jpeg").update(inc__legs=1) == 2
    assert sorted(await zoo.objects.scalar("legs").to_list()) == [3, 4, 4, 5]
    gone = await zoo.objects(photo__content_type="application/pdf").delete()
    assert gone == 1 and await zoo.objects.count() == 3
    assert await zoo.objects(photo__content_type="application/pdf").count() == 0
    with pytest.raises(InvalidQueryError, match="upsert"):
        await zoo.objects(photo__length__gt=1).update(upsert=True, set__legs=1)
    with pytest.raises(InvalidQueryError, match="upsert"):
        await zoo.objects(photo__length__gt=1).upsert_one(set__legs=1)


async def test_unknown_names_are_refused_with_the_names_that_exist(zoo: Any) -> None:
    with pytest.raises(InvalidQueryError, match="'colour' is not part of a file's catalogue"):
        await zoo.objects(photo__colour="red").to_list()
    with pytest.raises(InvalidQueryError, match="name a metadata key"):
        await zoo.objects(photo__metadata="x").count()
    # conditions on the stored id keep their meaning
    one = await zoo.objects.first()
    assert await zoo.objects(photo__in=[one.photo.grid_id]).count() == 1
    assert await zoo.objects(photo__exists=True).count() == 4


def test_the_filter_is_compiled_once_and_never_sent_with_a_placeholder() -> None:
    (animal,) = classes()
    qs = animal.objects(genus="x", photo__length__gt=5)
    query = qs._query
    match = query["$and"][0]["photo"] if "$and" in query else None
    assert isinstance(match, FileMatch), query
    assert match.entry_query == {"length": {"$gt": 5}}
    assert entry_filter(content_type__startswith="image/", metadata__a__in=[1]) == {
        "metadata.content_type": entry_filter(content_type__startswith="image/")[
            "metadata.content_type"],
        "metadata.a": {"$in": [1]},
    }


async def test_few_matching_documents_narrow_the_catalogue_query(
    zoo: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from asyncassets import filequery

    # Three image files match, more than two: with at most two documents matching
    # the rest of the query (genus: one), the catalogue is asked about their files
    # only; with more (legs: four), every matching id is sent, as under $or.
    monkeypatch.setattr(filequery, "LONG_LIST", 2)
    assert await genera(zoo.objects(genus="Marmota",
                                    photo__content_type__startswith="image/")) == ["Marmota"]
    assert await zoo.objects(genus="Bufo", photo__content_type__startswith="image/").count() == 0
    # both sides long: every matching id, as before
    assert await genera(zoo.objects(legs__gte=2, photo__content_type__startswith="image/")) == [
        "Aquila", "Marmota", "Sciurus"]
    assert await genera(zoo.objects(Q(photo__content_type__startswith="image/") | Q(legs=2))) == [
        "Aquila", "Marmota", "Sciurus"]


async def test_operator_documents_in_file_conditions_are_refused_before_any_io(
    zoo: Any,
) -> None:
    """Issue 19, case 11: Doc.objects(photo__metadata__gallery={"$ne": ...}).delete()
    deleted documents: an operator smuggled in as a value (from request data)."""
    for bad in ({"$ne": "g2"}, [{"$ne": "g2"}], {"a": [{"$exists": True}]}):
        # refused when the queryset is made, with what to write instead
        with pytest.raises(InvalidQueryError, match=r"operator '.*\$.*__ne="):
            zoo.objects(photo__metadata__gallery_id=bad)
    with pytest.raises(InvalidQueryError, match=r"operator '0\.\$ne'"):
        zoo.objects(photo__metadata__gallery_id__in=[{"$ne": None}])
    with pytest.raises(InvalidQueryError, match="operator"):
        zoo.objects(Q(genus="Bufo") | Q(frame__image__content_type={"$gt": ""}))
    with pytest.raises(InvalidQueryError, match="operator"):
        zoo.objects(extras__metadata__gallery_id={"$ne": None}).filter(legs=4)
    # After another file condition too, refused when the queryset is made.
    with pytest.raises(InvalidQueryError, match="operator"):
        zoo.objects(photo__length__gt=0).filter(photo__metadata__gallery_id={"$ne": "g2"})
    assert await zoo.objects.count() == 4  # nothing was deleted
    # Operators are written as suffixes, in code.
    assert await genera(zoo.objects(photo__metadata__gallery_id__ne="g2")) == [
        "Bufo", "Marmota", "Sciurus"]
    assert await zoo.objects(photo__metadata__gallery_id__ne="g2").delete() == 3
    assert await genera(zoo.objects) == ["Aquila"]


async def test_file_conditions_on_entry_fields_take_values_of_their_type(zoo: Any) -> None:
    """Issue 19, case 12: uploaded__gt="yesterday" silently matched nothing."""
    with pytest.raises(InvalidQueryError, match=r"photo__uploaded__gt' takes a datetime"):
        zoo.objects(photo__uploaded__gt="yesterday")
    with pytest.raises(InvalidQueryError, match=r"photo__length__lt' takes a number"):
        zoo.objects(genus="Bufo", photo__length__lt="1000")
    with pytest.raises(InvalidQueryError, match=r"content_type' takes a str, not 5"):
        zoo.objects(frame__image__content_type=5)
    with pytest.raises(InvalidQueryError, match=r"extras__length__in' takes a list"):
        zoo.objects(extras__length__in=["4"])
    since = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
    assert await zoo.objects(photo__uploaded__gt=since, photo__length__lt=1000).count() == 1
