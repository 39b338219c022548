"""Reading a catalogue: what every store (GridFS, object, queued) answers the same way."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from bson import Binary, ObjectId

__all__ = ["FILE_ID_TYPES", "CatalogueReads", "is_file_id"]

#: The types a file id may have: ObjectId (asyncassets, PyMongo), and what other
#: writers chose. An allowlist: anything else never goes into a catalogue query.
FILE_ID_TYPES = (ObjectId, str, int, uuid.UUID, Binary, dt.datetime)


def is_file_id(value: Any) -> bool:
    """Whether ``value`` can name a file: a scalar of :data:`FILE_ID_TYPES`.

    A stored reference is data another tool may have written: a dict such as
    ``{"$ne": None}`` in ``{"_id": value}`` is a query operator, and would find
    (or delete) some other file. Such a value names no file.
    """
    return isinstance(value, FILE_ID_TYPES) and not isinstance(value, bool)


class CatalogueReads:
    """``find``, ``find_many`` and ``read`` over a store's ``files`` collection and
    its own ``open_download``."""

    files: Any

    def open_download(  # pragma: no cover - every store has one
        self, files_doc: Mapping[str, Any], *, start: int = 0, end: int | None = None
    ) -> Any:
        raise NotImplementedError

    async def find(self, file_id: Any) -> dict[str, Any] | None:
        """The files document (catalogue entry) of ``file_id``, or ``None``.

        :raises pymongo.errors.PyMongoError: if the server fails.
        """
        if not is_file_id(file_id):
            return None
        doc: dict[str, Any] | None = await self.files.find_one({"_id": file_id})
        return doc

    async def find_many(self, file_ids: Iterable[Any]) -> dict[Any, dict[str, Any]]:
        """The files documents of ``file_ids`` keyed by ``_id``, in one query.

        Ids without a files document are absent from the result.

        :raises pymongo.errors.PyMongoError: if the server fails.
        """
        ids = list(dict.fromkeys(i for i in file_ids if is_file_id(i)))
        if not ids:
            return {}
        return {doc["_id"]: doc async for doc in self.files.find({"_id": {"$in": ids}})}

    async def read(
        self, files_doc: Mapping[str, Any], *, start: int = 0, end: int | None = None
    ) -> bytes:
        """The bytes ``[start, end)`` of a stored file.

        :raises: as ``open_download``, and ``pymongo.errors.PyMongoError`` if the
            server fails.
        """
        async with self.open_download(files_doc, start=start, end=end) as stream:
            return b"".join([piece async for piece in stream])
