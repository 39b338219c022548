"""Field classes: all of mongoengine's, plus :class:`FileField`.

Declare documents with these exactly as with mongoengine::

    from asyncassets.fields import FileField, IntField, ListField, StringField

Reference fields never dereference on attribute access in asyncassets documents
(that would be blocking I/O): ``doc.author`` is the stored ``DBRef`` until
``await doc.fetch_related("author")``.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterable, Iterator
from typing import Any, overload

from bson import Binary, ObjectId
from mongoengine.base import BaseField
from mongoengine.fields import *  # noqa: F403  (the re-export is the point)
from mongoengine.fields import __all__ as _mongoengine_fields

from .errors import GridFSError
from .files import images as _images
from .files.assignment import PendingData, is_data
from .files.images import DEFAULT_MAX_PIXELS, ImageProxy
from .files.names import FilenameTemplate
from .files.proxy import FileProxy
from .files.rules import UploadRules
from .storage import GridFSStorage, Storage
from .storage.entries import FILE_ID_TYPES, is_file_id

# mongoengine's file classes do blocking I/O; asyncassets has its own.
_NOT_REEXPORTED = {"FileField", "GridFSProxy", "GridFSError", "ImageField", "ImageGridFsProxy"}

__all__ = [
    *(n for n in _mongoengine_fields if n not in _NOT_REEXPORTED),
    "FileField",
    "FileProxy",
    "GridFSError",
    "GridFSProxy",
    "ImageField",
    "ImageGridFsProxy",
    "ImageProxy",
]

#: mongoengine's names for the proxy classes, for code that imports them.
GridFSProxy = FileProxy
ImageGridFsProxy = ImageProxy
# GridFSError is asyncassets' (errors.GridFSError): the base of its file errors,
# FileAlreadyExists included, which is also mongoengine's GridFSError.

_NOT_A_FILE_VALUE = (
    "{field} takes data to upload on save() (bytes, a binary file object, an async "
    "file or an async iterable of bytes), a file proxy, a file id or None, not {type}."
)
_DATA_IN_QUERY = (
    "{field}: data to upload (bytes, a file object, an async file or iterable) cannot "
    "be a query or update value; an update writes what it is given and uploads "
    "nothing. Assign it (`doc.{field} = data`) and `await doc.save()`, or use "
    "`await doc.{field}.put(data)` / `replace(data)`."
)
# The id types a file may have: ObjectId (asyncassets, PyMongo), and what other
# writers chose. Anything else (bytes, file objects, numbers with a fraction...) is
# data, not an id.
_ID_TYPES = FILE_ID_TYPES
# Update operators whose value is written into the field: only a file id (or
# None) may be, never a query operator ({"$ne": None}) a read would then follow.
_WRITING_OPS = frozenset(
    {"set", "setOnInsert", "set_on_insert", "push", "pushAll", "push_all", "addToSet",
     "add_to_set"}
)

# Set while documents are built from stored data (Document._from_son).
_LOADING: contextvars.ContextVar[bool] = contextvars.ContextVar("_LOADING", default=False)


@contextlib.contextmanager
def loading_from_database() -> Iterator[None]:
    """Within this block, file values are taken as stored, without refusing any."""
    token = _LOADING.set(True)
    try:
        yield
    finally:
        _LOADING.reset(token)


class FileField(BaseField):
    """A file stored in GridFS, a directory or S3; the document keeps the file's ``_id``.

    The attribute is a :class:`~asyncassets.files.proxy.FileProxy` with awaitable
    ``put``, ``read``, ``new_file``/``write``/``close``, ``replace``, ``delete``
    and ``stream``.

    :param collection_name: the GridFS bucket (``<name>.files``/``<name>.chunks``),
        ``"fs"`` by default; with ``storage``, the storage's.
    :param db_alias: the connection of the bucket (and of the catalogue of any
        storage); defaults to the document's.
    :param chunk_size: GridFS chunk size for new files (default 255 KiB).
    :param storage: where the bytes live: a
        :class:`~asyncassets.storage.GridFSStorage` (the default),
        :class:`~asyncassets.storage.FileSystemStorage` or
        :class:`~asyncassets.storage.S3Storage`; see :doc:`/storage`.
    :param cascade: delete the file when its document is deleted (default).
    :param max_size: with ``allowed_content_types``, ``allowed_extensions``,
        ``filename_template`` and ``compress``: what uploads accept and how they
        are stored; see :class:`~asyncassets.files.rules.UploadRules` and
        :doc:`/validation`.

    .. code-block:: python

        class Animal(Document):
            photo = FileField(collection_name="photos")

        await marmot.photo.put(open("marmot.jpg", "rb"), content_type="image/jpeg")
    """

    proxy_class = FileProxy

    def __init__(
        self,
        collection_name: str | None = None,
        db_alias: str | None = None,
        chunk_size: int | None = None,
        cascade: bool = True,
        *,
        storage: Storage | None = None,
        max_size: int | None = None,
        allowed_content_types: Iterable[str] | None = None,
        allowed_extensions: Iterable[str] | None = None,
        filename_template: FilenameTemplate | None = None,
        compress: str | None = None,
        **kwargs: Any,
    ) -> None:
        # The upload options are documented in asyncassets.files.rules.UploadRules.
        self.rules = UploadRules(
            max_size=max_size,
            allowed_content_types=allowed_content_types,
            allowed_extensions=allowed_extensions,
            filename_template=filename_template,
            compress=compress,
        )
        if collection_name is not None and (
            not isinstance(collection_name, str) or not collection_name
        ):
            raise ValueError("FileField(collection_name=...) must be a non-empty string.")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size <= 0):
            raise ValueError(
                f"FileField(chunk_size=...) must be a positive int, not {chunk_size!r}"
            )
        if storage is None:
            storage = GridFSStorage(collection_name or "fs", chunk_size=chunk_size)
        elif not isinstance(storage, Storage):
            raise TypeError(
                "FileField(storage=...) takes a GridFSStorage, FileSystemStorage or "
                f"S3Storage, not {type(storage).__name__}"
            )
        elif collection_name is not None and collection_name != storage.collection_name:
            raise ValueError(
                f"FileField(collection_name={collection_name!r}) disagrees with its "
                f"storage's collection_name {storage.collection_name!r}: give it once, "
                "to the storage"
            )
        elif chunk_size is not None:
            if not isinstance(storage, GridFSStorage):
                raise ValueError(
                    f"FileField(chunk_size=...) is GridFS's chunk size; {storage!r} has "
                    "no chunks (S3Storage has part_size)"
                )
            storage = GridFSStorage(storage.collection_name, chunk_size=chunk_size)
        super().__init__(**kwargs)
        #: Where the field's bytes live (a GridFSStorage unless one was given).
        self.storage: Storage = storage
        self.collection_name = storage.collection_name
        self.db_alias = db_alias
        self.chunk_size = chunk_size
        self.cascade = cascade

    def _proxy(
        self, grid_id: Any = None, instance: Any = None, key: str | None = None
    ) -> FileProxy:
        return self.proxy_class(grid_id=grid_id, field=self, instance=instance, key=key)

    def proxy_for(self, instance: Any, key: str | None) -> FileProxy:
        """A new, empty proxy of this field inside ``instance`` (a document)."""
        return self._proxy(None, instance, key)

    def get_proxy_obj(
        self,
        key: str | None,
        instance: Any,
        db_alias: str | None = None,
        collection_name: str | None = None,
    ) -> FileProxy:
        """mongoengine's name for :meth:`proxy_for`: a new, empty proxy of this field.

        ``db_alias`` and ``collection_name`` default to the field's. The proxy takes
        the field's upload rules either way.
        """
        return self.proxy_class(
            grid_id=None,
            field=self,
            instance=instance,
            key=key,
            collection_name=collection_name,
            db_alias=db_alias,
        )

    @overload
    def __get__(self, instance: None, owner: Any) -> FileField: ...

    @overload
    def __get__(self, instance: Any, owner: Any) -> FileProxy: ...

    def __get__(self, instance: Any, owner: Any) -> Any:
        if instance is None:
            return self
        proxy = instance._data.get(self.name)
        if not isinstance(proxy, FileProxy):
            proxy = self._proxy(proxy, instance, self.name)
            # Stored without marking the field changed: an empty proxy is no change.
            instance._data[self.name] = proxy
        proxy._bind(instance, self.name)
        return proxy

    def __set__(self, instance: Any, value: Any) -> None:
        proxy = self.to_python(value)
        if getattr(instance, "_initialised", False):
            self._note_replaced(instance, proxy)
        if isinstance(proxy, FileProxy):
            if proxy._instance is not None and (
                proxy._instance is not instance or proxy._key != self.name
            ):
                # It belongs to another document or field: this one gets its own
                # proxy on the same file, which is then shared.
                proxy = proxy._copy()
            proxy._bind(instance, self.name)
        super().__set__(instance, proxy)

    def _note_replaced(self, instance: Any, new: Any) -> None:
        """Remember, for ``save()``, the file the stored document held here.

        Assigning data or ``None`` over a file makes the next ``save()`` switch
        the reference conditionally (on the stored document still holding that
        file) and then delete the file, as ``replace()`` and ``delete()`` do.
        Assigning a proxy or an id keeps today's meaning: the old file is left
        as it is (another document may hold it; the orphan sweep decides).
        """
        replaced = instance.__dict__.get("_aa_replaced")
        if isinstance(new, FileProxy) and new._assignment is None:
            if replaced:
                replaced.pop(self.name, None)  # a file, not data: today's meaning
            return
        if replaced is None:
            replaced = {}
            # Straight into __dict__: never a field, never saved or copied.
            instance.__dict__["_aa_replaced"] = replaced
        if self.name not in replaced:
            old = instance._data.get(self.name)
            replaced[self.name] = old if isinstance(old, FileProxy) else None
        if new is not None:
            instance._mark_as_changed(self.name)  # equal to an empty proxy, yet a change

    def to_python(self, value: Any) -> Any:
        """The one conversion of a value to this field's proxy.

        Used for values given to the constructor, assigned, put into a list of
        files, and loaded from the database. ``None`` and proxies pass; a file id
        (an ``ObjectId``, its 24-hex-digit string, or another id type a writer
        chose) becomes a proxy that ``save()`` checks names an existing file;
        data (bytes, a binary file object, an async file such as FastAPI's
        ``UploadFile``, an async iterable of bytes) becomes a proxy holding it,
        which ``save()`` uploads (see :mod:`asyncassets.files.assignment`).

        :raises TypeError: a value that is neither (a float, ``True``, a dict...).
        """
        if value is None or isinstance(value, FileProxy):
            return value
        if _LOADING.get():
            # Stored data: whatever another tool (or an older version) wrote, the
            # document loads; a value that names no file reads as FileNotFound.
            return self._proxy(value)
        if is_data(value) and not (isinstance(value, Binary) and value.subtype != 0):
            proxy = self._proxy()
            proxy._assignment = PendingData(value)
            return proxy
        if (
            not isinstance(value, _ID_TYPES)
            or isinstance(value, bool)
            or (isinstance(value, Binary) and value.subtype == 0)
        ):
            raise TypeError(
                _NOT_A_FILE_VALUE.format(field=self._label(), type=type(value).__name__)
            )
        if isinstance(value, str) and ObjectId.is_valid(value):
            value = ObjectId(value)
        proxy = self._proxy(value)
        proxy._unverified = True
        proxy._assigned = True
        return proxy

    def _label(self) -> str:
        return self.name or "a list of files"

    def to_mongo(self, value: Any) -> Any:
        if isinstance(value, FileProxy):
            return value.grid_id
        return value

    def prepare_query_value(self, op: str, value: Any) -> Any:
        """A proxy, an id or an id's hex string, as the stored id (for queries).

        Used by queries and by updates (``update(set__photo=...)``, ``modify``),
        which write what they are given without uploading anything.

        :raises TypeError: data to upload (bytes, a file object...) or a proxy
            holding such data: only ``save()`` uploads it; stored as it is, it
            would be a reference to no file.
        """
        if isinstance(value, FileProxy):
            if value._assignment is not None:
                raise TypeError(_DATA_IN_QUERY.format(field=self._label()))
            return value.grid_id
        if is_data(value) and not (isinstance(value, Binary) and value.subtype != 0):
            raise TypeError(_DATA_IN_QUERY.format(field=self._label()))
        if isinstance(value, str) and ObjectId.is_valid(value):
            return ObjectId(value)
        if op in _WRITING_OPS and value is not None and not is_file_id(value):
            raise TypeError(
                _NOT_A_FILE_VALUE.format(field=self._label(), type=type(value).__name__)
                + " An update writes only a file id (or None) here."
            )
        return value

    def validate(self, value: Any) -> None:
        if value is None:
            return
        if not isinstance(value, FileProxy):
            try:
                self.to_python(value)
            except TypeError as exc:
                self.error(str(exc))
            return
        if (
            self.required
            and value.grid_id is None
            and value._upload is None
            and value._assignment is None
        ):
            self.error(
                f"Field is required: {self._label()} holds no file. Upload one with "
                f"`await doc.{self._label()}.put(data)` before save()."
            )
        if value._upload is not None or value._closing is not None:
            self.error(
                f"{self._label()} has a streaming upload in progress: close it "
                "(`await proxy.close()`, or leave the `async with` block) before save()."
            )


class ImageField(FileField):
    """A ``FileField`` for images (needs ``pip install 'asyncassets[images]'``).

    :param size: ``(width, height, force)``: shrink larger images to fit, or with
        ``force`` resize and crop them to exactly this size.
    :param thumbnail_size: ``(width, height, force)``: store a thumbnail this size.
    :param max_pixels: refuse images with more pixels (decompression bombs).
    :param collection_name: the bucket, ``"images"`` by default.
    :raises PillowMissing: Pillow is not installed.

    Other keywords are :class:`~asyncassets.fields.FileField`'s. Non-images and
    truncated images raise :class:`~asyncassets.errors.FileValidationError`.
    """

    proxy_class = ImageProxy

    def __init__(
        self,
        size: tuple[int, int, bool] | tuple[int, int] | None = None,
        thumbnail_size: tuple[int, int, bool] | tuple[int, int] | None = None,
        collection_name: str | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        **kwargs: Any,
    ) -> None:
        _images.require_pillow()
        if kwargs.get("compress"):
            raise ValueError("ImageField does not compress: image formats already are")
        self.size = _images.size_option("size", size)
        self.thumbnail_size = _images.size_option("thumbnail_size", thumbnail_size)
        if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels <= 0:
            raise ValueError(f"ImageField(max_pixels=...) must be a positive int: {max_pixels!r}")
        self.max_pixels = max_pixels
        if collection_name is None and kwargs.get("storage") is None:
            collection_name = "images"
        super().__init__(collection_name=collection_name, **kwargs)

    @overload
    def __get__(self, instance: None, owner: Any) -> ImageField: ...

    @overload
    def __get__(self, instance: Any, owner: Any) -> ImageProxy: ...

    def __get__(self, instance: Any, owner: Any) -> Any:
        return super().__get__(instance, owner)
