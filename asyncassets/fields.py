"""Field classes: all of mongoengine's, plus :class:`FileField`.

Declare documents with these exactly as with mongoengine::

    from asyncassets.fields import FileField, IntField, ListField, StringField

Reference fields never dereference on attribute access in asyncassets documents
(that would be blocking I/O): ``doc.author`` is the stored ``DBRef`` until
``await doc.fetch_related("author")``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from bson import ObjectId
from mongoengine.base import BaseField
from mongoengine.fields import *  # noqa: F403  (the re-export is the point)
from mongoengine.fields import __all__ as _mongoengine_fields

from .files.names import FilenameTemplate
from .files.proxy import FileProxy
from .files.rules import UploadRules

# mongoengine's file classes do blocking I/O; asyncassets has its own.
_NOT_REEXPORTED = {"FileField", "GridFSProxy", "GridFSError", "ImageField", "ImageGridFsProxy"}

__all__ = [
    *(n for n in _mongoengine_fields if n not in _NOT_REEXPORTED),
    "FileField",
    "FileProxy",
    "GridFSProxy",
    "ImageField",
    "ImageProxy",
]

#: mongoengine's name for the proxy class, for code that imports it.
GridFSProxy = FileProxy

_NOT_A_FILE_VALUE = (
    "{field} takes a file proxy, a file id or None, not {type}. To store bytes or a "
    "file object, upload it: `await doc.{field}.put(data, content_type=...)`."
)


class FileField(BaseField):
    """A file stored in GridFS; the document keeps the file's ``_id``.

    The attribute is a :class:`~asyncassets.files.proxy.FileProxy` with awaitable
    ``put``, ``read``, ``new_file``/``write``/``close``, ``replace``, ``delete``
    and ``stream``.

    :param collection_name: the GridFS bucket (``<name>.files``/``<name>.chunks``).
    :param db_alias: the connection of the bucket; defaults to the document's.
    :param chunk_size: GridFS chunk size for new files (default 255 KiB).
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
        collection_name: str = "fs",
        db_alias: str | None = None,
        chunk_size: int | None = None,
        cascade: bool = True,
        *,
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
        if not isinstance(collection_name, str) or not collection_name:
            raise ValueError("FileField(collection_name=...) must be a non-empty string.")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size <= 0):
            raise ValueError(
                f"FileField(chunk_size=...) must be a positive int, not {chunk_size!r}"
            )
        super().__init__(**kwargs)
        self.collection_name = collection_name
        self.db_alias = db_alias
        self.chunk_size = chunk_size
        self.cascade = cascade

    def _proxy(
        self, grid_id: Any = None, instance: Any = None, key: str | None = None
    ) -> FileProxy:
        return self.proxy_class(grid_id=grid_id, field=self, instance=instance, key=key)

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
        super().__set__(instance, self._coerce(value, instance))

    def _coerce(self, value: Any, instance: Any = None) -> FileProxy | None:
        if value is None or isinstance(value, FileProxy):
            if isinstance(value, FileProxy) and instance is not None:
                value._bind(instance, self.name)
            return value
        if isinstance(value, (ObjectId, str, int)) and not isinstance(value, bool):
            if isinstance(value, str) and ObjectId.is_valid(value):
                value = ObjectId(value)
            proxy = self._proxy(value, instance, self.name)
            proxy._unverified = True
            return proxy
        raise TypeError(_NOT_A_FILE_VALUE.format(field=self.name, type=type(value).__name__))

    def to_mongo(self, value: Any) -> Any:
        if isinstance(value, FileProxy):
            return value.grid_id
        return value

    def to_python(self, value: Any) -> Any:
        if value is None or isinstance(value, FileProxy):
            return value
        return self._proxy(value)

    def validate(self, value: Any) -> None:
        if value is None:
            return
        if not isinstance(value, FileProxy):
            self.error(_NOT_A_FILE_VALUE.format(field=self.name, type=type(value).__name__))
        if value._upload is not None:
            self.error(
                f"{self.name} has a streaming upload in progress: close it "
                "(`await proxy.close()`, or leave the `async with` block) before save()."
            )


# Last: images.py subclasses FileField. Importing it needs no Pillow; declaring an
# ImageField does.
from .files.images import ImageField, ImageProxy  # noqa: E402
