"""Reading a catalogue: what every store (GridFS, object, queued) answers the same way."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["CatalogueReads"]


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
        doc: dict[str, Any] | None = await self.files.find_one({"_id": file_id})
        return doc

    async def find_many(self, file_ids: Iterable[Any]) -> dict[Any, dict[str, Any]]:
        """The files documents of ``file_ids`` keyed by ``_id``, in one query.

        Ids without a files document are absent from the result.

        :raises pymongo.errors.PyMongoError: if the server fails.
        """
        ids = list(dict.fromkeys(file_ids))
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
