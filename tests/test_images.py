"""ImageField: resize, thumbnails and their cleanup, refusals, and a responsive loop."""

from __future__ import annotations

import asyncio
import io
import time

import pytest
from bson import ObjectId

PIL = pytest.importorskip("PIL.Image")

from asyncassets import Document, FileNotFound, FileValidationError  # noqa: E402
from asyncassets.fields import ImageField, StringField  # noqa: E402
from asyncassets.files import images  # noqa: E402

# Class names are prefixed "Img" so they never clash in mongoengine's registry.


class ImgAnimal(Document):
    name = StringField()
    photo = ImageField(size=(200, 100, False), thumbnail_size=(40, 40, True))
    cover = ImageField(size=(50, 50, True), allowed_extensions=["png", "jpg"])
    plain = ImageField()
    meta = {"collection": "img_animals"}


def make_image(width: int, height: int, fmt: str = "PNG", mode: str = "RGB") -> bytes:
    img = PIL.new(mode, (width, height), color=(200, 120, 40) if mode == "RGB" else 128)
    buffer = io.BytesIO()
    img.save(buffer, fmt)
    return buffer.getvalue()


async def bucket_counts(db) -> tuple[int, int]:
    return (
        await db["images.files"].count_documents({}),
        await db["images.chunks"].count_documents({}),
    )


async def test_a_large_image_is_shrunk_to_fit_and_thumbnailed(asyncassets_db):
    doc = ImgAnimal(name="marmot")
    await doc.photo.put(make_image(800, 600), filename="marmot.png")
    await doc.save()
    loaded = await ImgAnimal.objects.get(pk=doc.pk)
    await loaded.photo.load()
    assert loaded.photo.size == (133, 100)  # aspect ratio kept
    assert loaded.photo.format == "PNG"
    assert loaded.photo.content_type == "image/png"
    stored = PIL.open(io.BytesIO(await loaded.photo.read()))
    assert stored.size == (133, 100)
    thumb = loaded.photo.thumbnail
    data = await thumb.read()
    assert PIL.open(io.BytesIO(data)).size == (40, 40)  # force: exact crop
    assert b"".join([p async for p in thumb.stream()]) == data
    assert await bucket_counts(asyncassets_db) >= (2, 2)


async def test_force_crops_to_the_exact_size(asyncassets_db):
    doc = ImgAnimal()
    await doc.cover.put(make_image(300, 90, "JPEG"), filename="c.jpg")
    assert doc.cover.size == (50, 50)
    assert doc.cover.format == "JPEG"
    assert doc.cover.thumbnail is None  # no thumbnail_size


async def test_a_small_image_is_stored_unchanged(asyncassets_db):
    data = make_image(60, 30, "GIF", mode="L")
    doc = ImgAnimal()
    await doc.photo.put(data)
    assert doc.photo.size == (60, 30)
    assert doc.photo.format == "GIF"
    assert await doc.photo.read() == data


async def test_the_thumbnail_goes_with_its_parent_on_delete(asyncassets_db):
    doc = ImgAnimal()
    await doc.photo.put(make_image(300, 300))
    await doc.save()
    assert (await bucket_counts(asyncassets_db))[0] == 2
    await doc.photo.delete()
    assert await bucket_counts(asyncassets_db) == (0, 0)


async def test_the_old_thumbnail_goes_on_replace(asyncassets_db):
    doc = ImgAnimal()
    await doc.photo.put(make_image(300, 300))
    await doc.save()
    old_thumb = doc.photo.thumbnail.file_id
    await doc.photo.replace(make_image(500, 100, "WEBP"))
    assert doc.photo.format == "WEBP"
    assert (await bucket_counts(asyncassets_db))[0] == 2
    assert await asyncassets_db["images.files"].find_one({"_id": old_thumb}) is None
    assert doc.photo.thumbnail.file_id != old_thumb


async def test_thumbnails_go_on_cascade(asyncassets_db):
    for name in ("a", "b"):
        doc = ImgAnimal(name=name)
        await doc.photo.put(make_image(300, 300))
        await doc.save()
    one = await ImgAnimal.objects.get(name="a")
    await one.delete()
    assert (await bucket_counts(asyncassets_db))[0] == 2
    await ImgAnimal.objects.delete()
    assert await bucket_counts(asyncassets_db) == (0, 0)


async def test_non_images_are_refused(asyncassets_db):
    doc = ImgAnimal()
    with pytest.raises(FileValidationError, match="not an image"):
        await doc.plain.put(b"%PDF-1.7 not an image at all")
    assert await bucket_counts(asyncassets_db) == (0, 0)


async def test_truncated_images_are_refused(asyncassets_db):
    data = make_image(400, 400, "JPEG")
    doc = ImgAnimal()
    with pytest.raises(FileValidationError, match="truncated or damaged"):
        await doc.photo.put(data[: len(data) // 2])
    assert await bucket_counts(asyncassets_db) == (0, 0)


async def test_decompression_bombs_are_refused_before_decoding(asyncassets_db):
    class ImgGuarded(Document):
        photo = ImageField(max_pixels=10_000)
        meta = {"collection": "img_guarded"}

    bomb = make_image(1000, 1000, "PNG", mode="L")  # small file, a million pixels
    doc = ImgGuarded()
    with pytest.raises(FileValidationError, match="decompression bomb"):
        await doc.photo.put(bomb)
    assert await bucket_counts(asyncassets_db) == (0, 0)


async def test_field_options_still_apply(asyncassets_db):
    doc = ImgAnimal()
    with pytest.raises(FileValidationError, match="extension"):
        await doc.cover.put(make_image(10, 10), filename="x.gif")


def test_declaring_without_pillow_says_what_to_install(monkeypatch):
    monkeypatch.setattr(images, "Image", None)
    with pytest.raises(images.PillowMissing, match=r"pip install 'asyncassets\[images\]'"):
        ImageField()
    assert issubclass(images.PillowMissing, ImportError)


async def test_the_loop_keeps_serving_while_an_image_is_processed(asyncassets_db):
    data = make_image(4000, 3000, "PNG")
    # How long the decode and resize take when they block the caller.
    start = time.perf_counter()
    img = PIL.open(io.BytesIO(data))
    img.load()
    img.thumbnail((200, 100))
    blocking = time.perf_counter() - start

    gaps: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    task = asyncio.create_task(ticker())
    doc = ImgAnimal()
    await doc.photo.put(data)
    stop.set()
    await task
    assert doc.photo.size == (133, 100)
    # Had the work run on the loop, one gap would be as long as the work itself.
    assert max(gaps) < blocking / 2, (max(gaps), blocking)
    assert len(gaps) >= 5


async def test_streaming_into_an_image_field_is_refused_with_the_way_to_do_it(asyncassets_db):
    animal = ImgAnimal(name="streamed")
    with pytest.raises(TypeError, match=r"put\(data\)"):
        animal.photo.new_file(filename="x.png")
    assert await bucket_counts(asyncassets_db) == (0, 0)


# -- the thumbnail and mongoengine's image attributes ---------------------------------


async def test_the_thumbnail_has_format_width_height_and_size(asyncassets_db):
    doc = ImgAnimal()
    await doc.photo.put(make_image(800, 600, "JPEG"))
    # Loaded by the put() that made it, as mongoengine's thumbnail GridOut had them.
    thumb = doc.photo.thumbnail
    assert (thumb.format, thumb.width, thumb.height, thumb.size) == ("JPEG", 40, 40, (40, 40))
    assert (doc.photo.width, doc.photo.height) == (133, 100)
    await doc.save()
    loaded = await ImgAnimal.objects.get(pk=doc.pk)
    await loaded.photo.load()  # loads the thumbnail's metadata too
    assert loaded.photo.thumbnail is loaded.photo.thumbnail  # one proxy, loaded once
    assert loaded.photo.thumbnail.size == (40, 40)
    assert loaded.photo.thumbnail.thumbnail is None
    again = await ImgAnimal.objects.get(pk=doc.pk)
    assert (await again.photo.get()).thumbnail.format == "JPEG"  # mongoengine's get()


async def test_a_missing_thumbnail_does_not_stop_its_image_loading(asyncassets_db):
    doc = ImgAnimal()
    await doc.photo.put(make_image(300, 300))
    await doc.save()
    await asyncassets_db["images.files"].delete_one({"_id": doc.photo.thumbnail.file_id})
    loaded = await ImgAnimal.objects.get(pk=doc.pk)
    await loaded.photo.load()
    assert loaded.photo.size == (100, 100)
    with pytest.raises(FileNotFound):
        loaded.photo.thumbnail.size  # noqa: B018


async def test_the_thumbnail_of_a_new_image_replaces_the_old_one(asyncassets_db):
    doc = ImgAnimal()
    await doc.photo.put(make_image(300, 300))
    old = doc.photo.thumbnail
    await doc.photo.replace(make_image(100, 300, "WEBP"))
    assert doc.photo.thumbnail is not old
    assert (doc.photo.thumbnail.format, doc.photo.thumbnail.size) == ("WEBP", (40, 40))


async def test_the_thumbnail_is_read_only(asyncassets_db):
    doc = ImgAnimal()
    await doc.photo.put(make_image(300, 300))
    await doc.save()
    thumb = doc.photo.thumbnail
    for call in (thumb.put(b"x"), thumb.replace(b"x"), thumb.delete()):
        with pytest.raises(TypeError, match="with its image"):
            await call
    with pytest.raises(TypeError, match="with its image"):
        thumb.new_file()
    assert await bucket_counts(asyncassets_db) == (2, 2)
    assert PIL.open(io.BytesIO(await thumb.read())).size == (40, 40)


async def test_images_written_by_mongoengine_keep_their_size_and_thumbnail(asyncassets_db):
    # mongoengine's ImageField stores width, height, format and thumbnail_id at the
    # top level of the files document (and the thumbnail's at the top of its own).
    full, small = make_image(120, 80), make_image(30, 20)
    thumb_id, image_id = ObjectId(), ObjectId()
    for file_id, data, extra in (
        (thumb_id, small, {"width": 30, "height": 20, "format": "PNG"}),
        (image_id, full, {"width": 120, "height": 80, "format": "PNG", "thumbnail_id": thumb_id}),
    ):
        await asyncassets_db["images.files"].insert_one(
            {"_id": file_id, "length": len(data), "chunkSize": 255 * 1024, **extra}
        )
        await asyncassets_db["images.chunks"].insert_one(
            {"files_id": file_id, "n": 0, "data": data}
        )
    await asyncassets_db["img_animals"].insert_one({"_id": ObjectId(), "photo": image_id})
    doc = await ImgAnimal.objects.first()
    await doc.photo.load()
    assert (doc.photo.size, doc.photo.format) == ((120, 80), "PNG")
    assert doc.photo.thumbnail.size == (30, 20)
    assert await doc.photo.thumbnail.read() == small
    await doc.photo.delete()  # as mongoengine's delete(): the thumbnail goes too
    assert await bucket_counts(asyncassets_db) == (0, 0)
