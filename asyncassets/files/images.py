"""``ImageField``: a ``FileField`` for images, resized and thumbnailed with Pillow.

Needs the ``images`` extra (``pip install 'asyncassets[images]'``)::

    class Animal(Document):
        photo = ImageField(size=(1024, 1024, False), thumbnail_size=(128, 128, True))

    await marmot.photo.put(open("marmot.jpg", "rb"), filename="marmot.jpg")
    marmot.photo.size, marmot.photo.format     # (1024, 768), "JPEG"
    thumb = await marmot.photo.thumbnail.read()
    marmot.photo.thumbnail.size                # (128, 128): loaded by put() or read()

The semantics are mongoengine's: an image larger than ``size`` is shrunk to fit
in it, keeping its aspect ratio, or, with ``force``, resized and centre-cropped
to exactly that size; the thumbnail likewise with ``thumbnail_size``. The image
keeps its format. The thumbnail is a GridFS file of its own in the same bucket
(``metadata.thumbnail_of`` names its parent; the parent's
``metadata.thumbnail_id`` names it), deleted with its parent by ``delete``,
``replace`` and cascades.

Decoding and resizing run in a worker thread (``asyncio.to_thread``), so the
event loop keeps serving other tasks meanwhile. The upload is spooled to memory up
to 8 MiB, then to a temporary file, as Pillow needs to seek in it.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import tempfile
from typing import Any, NoReturn

from bson import ObjectId

from ..errors import FileNotFound, FileValidationError, PillowMissing
from ..storage import Store
from ..storage.catalogue import user_metadata
from ..storage.sources import read_source
from .proxy import FileProxy
from .rules import guarded_upload, make_guard

Image: Any
ImageOps: Any
UnidentifiedImageError: Any
try:
    from PIL import Image, ImageOps, UnidentifiedImageError
except ImportError:  # the `images` extra is not installed
    Image = ImageOps = UnidentifiedImageError = None

__all__ = ["DEFAULT_MAX_PIXELS", "ImageProxy", "ThumbnailProxy", "require_pillow", "size_option"]

DEFAULT_MAX_PIXELS = 50_000_000
"""Largest image accepted, in pixels (width x height): about 200 MB decoded as RGBA."""

_SPOOL = 8 * 1024 * 1024


def require_pillow() -> None:
    """Raise :class:`~asyncassets.errors.PillowMissing` unless Pillow is importable."""
    if Image is None:
        raise PillowMissing(
            "ImageField needs Pillow, which is not installed: pip install 'asyncassets[images]'"
        )


def size_option(name: str, value: Any) -> tuple[int, int, bool] | None:
    if value is None:
        return None
    if not isinstance(value, (tuple, list)) or len(value) not in (2, 3):
        raise ValueError(f"ImageField({name}=...) takes (width, height, force), not {value!r}")
    width, height, *rest = value
    force = bool(rest[0]) if rest else False
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (width, height)):
        raise ValueError(f"ImageField({name}=...) needs positive int sizes, not {value!r}")
    return width, height, force


class ImageProxy(FileProxy):
    """A :class:`FileProxy` that also knows the image's size, format and thumbnail.

    Also importable as mongoengine's name for it, ``ImageGridFsProxy``.
    """

    _mongoengine_name = "ImageGridFsProxy"

    #: The thumbnail proxy handed out last, so that what was loaded into it stays.
    _thumb: ThumbnailProxy | None = None

    def _meta_value(self, key: str) -> Any:
        doc = self._doc()
        # Either layout: asyncassets' metadata sub-document, mongoengine's top level.
        return None if doc is None else user_metadata(doc).get(key)

    @property
    def size(self) -> tuple[int, int] | None:
        """``(width, height)`` of the stored image (after any resize)."""
        width, height = self._meta_value("width"), self._meta_value("height")
        return None if width is None else (int(width), int(height))

    @property
    def width(self) -> int | None:
        """Width of the stored image in pixels."""
        width = self._meta_value("width")
        return None if width is None else int(width)

    @property
    def height(self) -> int | None:
        """Height of the stored image in pixels."""
        height = self._meta_value("height")
        return None if height is None else int(height)

    @property
    def format(self) -> str | None:
        """Pillow's name of the image format: ``"JPEG"``, ``"PNG"``, ``"WEBP"``..."""
        return self._meta_value("format")

    @property
    def thumbnail(self) -> ThumbnailProxy | None:
        """The thumbnail: read it (``await proxy.thumbnail.read()``) like any file.

        It has ``size``, ``width``, ``height`` and ``format`` too, as mongoengine's
        thumbnail has. Its metadata is loaded by the ``put()`` or ``replace()`` that
        made it and by the image's :meth:`load`, else by its own ``read()`` or
        ``load()``; the same proxy is returned while the image keeps its
        thumbnail, so that stays loaded. ``None`` when the field is empty or has
        no ``thumbnail_size``.
        """
        thumb_id = self._meta_value("thumbnail_id")
        if thumb_id is None:
            return None
        thumb = self._thumb
        if thumb is None or thumb.grid_id != thumb_id or thumb.db_alias != self.db_alias:
            thumb = self._thumb = ThumbnailProxy(
                thumb_id,
                collection_name=self.collection_name,
                db_alias=self.db_alias,
                storage=self.storage,
            )
        return thumb

    def _companions(self) -> tuple[FileProxy, ...]:
        # A query that loads images loads their thumbnails' entries too (one more
        # query per catalogue), so ``thumbnail.size`` needs no load() either.
        if not isinstance(self._files_doc, dict):
            return ()
        thumb = self.thumbnail
        return () if thumb is None else (thumb,)

    async def load(self) -> FileProxy:
        """Fetch the image's metadata, and its thumbnail's (one more query).

        :raises FileNotFound: the image is missing. A missing thumbnail raises
            only when the thumbnail is used.
        """
        await super().load()
        thumb = self.thumbnail
        if thumb is not None:
            # Recorded as missing in the thumbnail proxy, which raises when used:
            # the image itself is fine and stays readable.
            with contextlib.suppress(FileNotFound):
                await thumb.load()
        return self

    def new_file(self, *args: Any, **kwargs: Any) -> Any:
        """Not available for images: use ``await proxy.put(data)``.

        An image must be decoded whole (size checks, resizing, the thumbnail), which
        a chunk-by-chunk stream cannot offer without the decompression-bomb guard.
        """
        raise TypeError(
            "ImageField does not take streaming uploads (new_file): the image is "
            "checked, resized and thumbnailed as a whole. Use `await doc.<field>.put(data)`."
        )

    async def _store(
        self,
        bucket: Store,
        data: Any,
        content_type: str | None,
        filename: str | None,
        metadata: dict[str, Any],
    ) -> dict[str, Any]:
        field: Any = self._field  # an ImageField (declared in asyncassets.fields)
        # Name and extension checks first, before reading anything.
        guard = make_guard(self, content_type, filename, self._metadata(None, metadata))
        spool = tempfile.SpooledTemporaryFile(max_size=_SPOOL)
        try:
            pieces = read_source(data, bucket.chunk_size)
            try:
                async for piece in pieces:
                    guard.feed(piece)  # enforces max_size as the bytes arrive
                    spool.write(piece)
            finally:
                await pieces.aclose()
            image = await asyncio.to_thread(_process, spool, field, guard.field_name)
        finally:
            spool.close()
        thumb_doc = None
        thumb_meta: dict[str, Any] = {}
        if image.thumbnail is not None:
            thumb_meta = {
                "content_type": image.content_type,
                "thumbnail_of": None,  # set below, once the parent's id exists
                "width": image.thumbnail_size[0],
                "height": image.thumbnail_size[1],
                "format": image.format,
            }
        parent_id = ObjectId()  # known now, so the thumbnail can name its parent
        if image.thumbnail is not None:
            thumb_meta["thumbnail_of"] = parent_id
            thumb_doc = await bucket.upload(
                image.thumbnail, metadata=thumb_meta, context=self._upload_context()
            )
            # Loaded already: once the image is referenced, .thumbnail.size needs no I/O.
            self._thumb = ThumbnailProxy(
                thumb_doc["_id"],
                collection_name=self.collection_name,
                db_alias=self.db_alias,
                storage=self.storage,
            )
            self._thumb._files_doc = thumb_doc
        meta = dict(metadata)
        meta.update(width=image.size[0], height=image.size[1], format=image.format)
        if thumb_doc is not None:
            meta["thumbnail_id"] = thumb_doc["_id"]
        try:
            return await guarded_upload(
                self,
                bucket,
                image.data,
                content_type or image.content_type,
                filename,
                self._metadata(None, meta),
                file_id=parent_id,
            )
        except BaseException:
            if thumb_doc is not None:
                await asyncio.shield(bucket.delete(thumb_doc["_id"]))
            raise

    async def _delete_stored(self, file_id: Any) -> None:
        bucket = self._bucket()
        doc = await bucket.find(file_id)
        # The parent first: a crash in between leaves an orphan thumbnail, never a
        # parent whose thumbnail is missing.
        await bucket.delete(file_id)
        thumb_id = None if doc is None else user_metadata(doc).get("thumbnail_id")
        if thumb_id is not None:
            await bucket.delete(thumb_id)


class ThumbnailProxy(ImageProxy):
    """An image's thumbnail (``doc.photo.thumbnail``): read-only.

    It is written, replaced and deleted with its image; ``put``, ``replace``,
    ``delete`` and ``new_file`` raise ``TypeError`` saying so.
    """

    @property
    def thumbnail(self) -> None:
        """A thumbnail has no thumbnail of its own."""
        return None

    def _read_only(self, what: str) -> NoReturn:
        raise TypeError(
            f"{what} on a thumbnail: it is written and deleted with its image. "
            "put(), replace() or delete() the image field instead."
        )

    async def put(
        self, data: Any, content_type: str | None = None, filename: str | None = None, **kw: Any
    ) -> FileProxy:
        """Not available: a thumbnail is made by its image's ``put()``."""
        self._read_only("put()")

    async def replace(
        self, data: Any, content_type: str | None = None, filename: str | None = None, **kw: Any
    ) -> FileProxy:
        """Not available: ``replace()`` the image, which makes a new thumbnail."""
        self._read_only("replace()")

    async def delete(self) -> None:
        """Not available: ``delete()`` the image, which deletes its thumbnail."""
        self._read_only("delete()")

    def new_file(self, *args: Any, **kwargs: Any) -> Any:
        """Not available: a thumbnail is made by its image's ``put()``."""
        self._read_only("new_file()")


class _Processed:
    def __init__(self) -> None:
        self.data: bytes | Any = b""
        self.size: tuple[int, int] = (0, 0)
        self.format: str = ""
        self.content_type: str | None = None
        self.thumbnail: bytes | None = None
        self.thumbnail_size: tuple[int, int] = (0, 0)


def _refuse(field_name: str, problem: str) -> FileValidationError:
    return FileValidationError(f"{field_name}: {problem}", field_name=field_name)


def _process(spool: Any, field: Any, field_name: str) -> _Processed:
    """Decode, check, resize and thumbnail (in a worker thread)."""
    out = _Processed()
    spool.seek(0)
    try:
        # open() reads the header only: the size is known before any decoding.
        img = Image.open(spool)
        width, height = img.size
        if width * height > field.max_pixels:
            raise _refuse(
                field_name,
                f"the image is {width}x{height} = {width * height} pixels, over the "
                f"limit of {field.max_pixels} (a decompression bomb?); raise "
                "ImageField(max_pixels=...) if you really expect such images",
            )
        img.load()
    except FileValidationError:
        raise
    except Image.DecompressionBombError as exc:
        raise _refuse(field_name, f"the image is too large to decode safely ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise _refuse(field_name, "the file is not an image Pillow can read") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise _refuse(field_name, f"the image is truncated or damaged ({exc})") from exc
    fmt = img.format or "PNG"
    out.format = fmt
    out.content_type = Image.MIME.get(fmt)
    resized = _fit(img, field.size)
    if resized is None:
        spool.seek(0)
        out.data = spool.read()  # unchanged: store the bytes as they came
        out.size = img.size
    else:
        out.data = _encode(resized, fmt)
        out.size = resized.size
    if field.thumbnail_size is not None:
        thumb = _fit(img, field.thumbnail_size) or img.copy()
        out.thumbnail = _encode(thumb, fmt)
        out.thumbnail_size = thumb.size
    return out


def _fit(img: Any, size: tuple[int, int, bool] | None) -> Any:
    """``img`` shrunk as mongoengine does, or ``None`` when it already fits."""
    if size is None:
        return None
    width, height, force = size
    if img.size[0] <= width and img.size[1] <= height:
        return None
    if force:
        return ImageOps.fit(img, (width, height), Image.Resampling.LANCZOS)
    copy = img.copy()
    copy.thumbnail((width, height), Image.Resampling.LANCZOS)
    return copy


def _encode(img: Any, fmt: str) -> bytes:
    buffer = io.BytesIO()
    if fmt == "JPEG" and img.mode not in ("RGB", "L", "CMYK"):
        img = img.convert("RGB")
    img.save(buffer, fmt)
    return buffer.getvalue()
