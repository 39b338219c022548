"""GridFS on asyncio, with bounded memory.

:class:`GridBucket` stores files in the two collections of the GridFS spec,
``<name>.files`` and ``<name>.chunks``, in exactly the spec's layout, so files it
writes are readable by PyMongo's ``AsyncGridFSBucket`` (and any other driver) and
the other way round::

    bucket = GridBucket(db)
    doc = await bucket.upload(open("marmot.jpg", "rb"), filename="marmot.jpg")
    data = await bucket.read(doc)
    async for piece in bucket.open_download(doc, start=1024):
        ...
    await bucket.delete(doc["_id"])

It differs from PyMongo's bucket in what it guarantees:

* memory per stream is bounded by ``buffer_size`` whatever the file size: uploads
  insert chunks in batches of at most half of it, one batch in flight while the
  next one fills; downloads fetch cursor batches of at most ``buffer_size`` and
  only the chunks covering the requested range;
* every upload records the SHA-256 of its bytes in ``metadata["sha256"]``;
* a failed, aborted or cancelled upload removes its chunks and leaves no files
  document, and the files document is inserted last, so a file whose files
  document exists is complete;
* downloads check every chunk they read (number, order, size) and raise
  :class:`~asyncassets.errors.CorruptFile` instead of returning wrong bytes, or
  :class:`~asyncassets.errors.FileDeletedWhileReading` when the file was deleted
  or replaced under the reader;
* a cancelled download kills its server cursor without spoiling a pooled
  connection.

It works with a PyMongo ``AsyncDatabase`` or a Motor database: only calls both
drivers share are used here, the others go through :mod:`asyncassets._driver`.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Mapping
from typing import Any

from ... import _driver
from ..._tasks import spawn
from ..entries import CatalogueReads, is_file_id
from ..lifecycle import upload_all
from ..sources import check_size, read_source
from .download import DownloadStream
from .spec import (
    CHUNKS_INDEX,
    DEFAULT_BUFFER_SIZE,
    DEFAULT_CHUNK_SIZE,
    FILES_INDEX,
)
from .upload import UploadStream

__all__ = ["GridBucket"]

# Which (database, bucket) pairs already have their indexes, per client. Weak, so a
# closed and dropped client does not keep its entry (or itself) alive.
_indexed: weakref.WeakKeyDictionary[Any, set[tuple[str, str]]] = weakref.WeakKeyDictionary()


class GridBucket(CatalogueReads):
    """A GridFS bucket: the ``<name>.files`` and ``<name>.chunks`` collections of ``db``.

    :param db: a PyMongo ``AsyncDatabase`` or a Motor ``AsyncIOMotorDatabase``.
    :param name: the bucket name (the collections' prefix), ``"fs"`` by default.
    :param chunk_size: chunk size of new files, in bytes.
    :param buffer_size: how many bytes of file data one stream may hold in memory;
        uploads insert in batches of half of it, downloads fetch batches of at most all of it.
    :raises TypeError, ValueError: if ``chunk_size`` or ``buffer_size`` is not a
        positive int.

    :ivar db: the database.
    :ivar name: the bucket name.
    :ivar files: the ``<name>.files`` collection.
    :ivar chunks: the ``<name>.chunks`` collection.
    :ivar chunk_size: chunk size of new files.
    :ivar buffer_size: the per-stream memory bound.
    """

    def __init__(
        self,
        db: Any,
        name: str = "fs",
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        buffer_size: int = DEFAULT_BUFFER_SIZE,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"bucket name must be a non-empty str, got {name!r}")
        self.db = db
        self.name = name
        # The bucket's guarantees rest on knowing what each write did (chunks before
        # the files document; cleanup of what an aborted upload wrote) and on no
        # failover rolling it back: written with w="majority", read from the primary
        # (_driver.acknowledged).
        self.files = _driver.acknowledged(db[f"{name}.files"])
        self.chunks = _driver.acknowledged(db[f"{name}.chunks"])
        self.chunk_size = check_size("chunk_size", chunk_size)
        self.buffer_size = check_size("buffer_size", buffer_size)

    def __repr__(self) -> str:
        return f"GridBucket({self.db.name!r}, {self.name!r})"

    async def ensure_indexes(self) -> None:
        """Create the spec's indexes if they are missing.

        ``{filename: 1, uploadDate: 1}`` on the files collection and the unique
        ``{files_id: 1, n: 1}`` on the chunks collection. Done once per client,
        database and bucket per process: later calls return without I/O. Uploads
        call it before their first write.

        :raises pymongo.errors.PyMongoError: if listing or creating the indexes fails.
        """
        done = _indexed.setdefault(self.db.client, set())
        key = (self.db.name, self.name)
        if key in done:
            return
        await _ensure_index(self.files, FILES_INDEX, unique=False)
        await _ensure_index(self.chunks, CHUNKS_INDEX, unique=True)
        done.add(key)

    def open_upload(
        self,
        *,
        file_id: Any = None,
        filename: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        chunk_size: int | None = None,
        context: Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> UploadStream:
        """Start a streaming upload; no I/O happens until data is written or it is closed.

        Use it as an async context manager, which closes it on success and aborts it
        on an exception or cancellation::

            async with bucket.open_upload(filename="log.txt") as upload:
                await upload.write(b"...")
            upload.file_id

        :param file_id: the file's ``_id``; a new ``ObjectId`` if ``None``.
        :param metadata: copied into the files document's ``metadata``, along with the
            computed ``sha256``.
        :param chunk_size: this file's chunk size; the bucket's if ``None``.
        :param context: what the upload is for (``{"document": ..., "field": ...}``);
            GridFS has no keys to make from it and ignores it.
        :param extra: top-level fields added to the files document in the same insert
            (a storage built on this bucket records its own state there); they may
            not be keys the spec defines.
        :raises TypeError: if ``metadata`` is not a mapping or ``chunk_size`` not an int.
        :raises ValueError: if ``chunk_size`` is not positive, or ``extra`` names a
            spec key.
        """
        return UploadStream(
            self,
            file_id=file_id,
            filename=filename,
            metadata=metadata,
            chunk_size=self.chunk_size if chunk_size is None else chunk_size,
            extra=extra,
        )

    async def upload(
        self,
        source: Any,
        *,
        file_id: Any = None,
        filename: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        chunk_size: int | None = None,
        context: Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Store ``source`` as a new file and return its files document.

        ``source`` is bytes-like; a binary file object whose ``read(n)`` returns bytes,
        or a coroutine of bytes (aiofiles, Starlette's ``UploadFile``); or an iterable
        or async iterable of bytes pieces. It is read piece by piece, never whole.
        A buffer of wider items (``array("d")``, a cast ``memoryview``) is stored as
        its bytes: ``length`` counts bytes.

        If anything fails, including cancellation, the chunks written so far are
        removed, no files document is left, and the original exception propagates.
        ``extra`` is as for :meth:`open_upload`.

        :raises TypeError: if ``source`` is of none of these kinds (``None``, ``int``,
            ``str``, a text-mode file...), or yields something other than bytes.
        :raises ValueError: if ``source`` is a closed file.
        :raises asyncassets.errors.FileAlreadyExists: if ``file_id`` is taken.
        :raises pymongo.errors.PyMongoError: if the server fails.
        """
        chunk_size = self.chunk_size if chunk_size is None else chunk_size
        pieces = read_source(source, check_size("chunk_size", chunk_size))
        stream = self.open_upload(
            file_id=file_id,
            filename=filename,
            metadata=metadata,
            chunk_size=chunk_size,
            extra=extra,
        )
        return await upload_all(stream, pieces)

    def open_download(
        self, files_doc: Mapping[str, Any], *, start: int = 0, end: int | None = None
    ) -> DownloadStream:
        """Return an async iterator over the bytes ``[start, end)`` of a stored file.

        It yields one ``bytes`` piece per chunk and fetches only the chunks covering
        the range. Close it (``await stream.aclose()`` or ``async with``) if you stop
        early::

            async with bucket.open_download(doc, start=100) as stream:
                async for piece in stream:
                    await send(piece)

        :param files_doc: the file's files document (from :meth:`find` or
            :meth:`upload`).
        :param end: exclusive end; the file's length if ``None``.
        :raises TypeError: if ``files_doc`` is not a mapping or ``start``/``end`` not
            ints.
        :raises ValueError: unless ``0 <= start <= end <= length``.
        :raises asyncassets.errors.CorruptFile: if ``files_doc`` lacks a valid
            ``_id``, ``length`` or ``chunkSize``; while iterating, if a chunk is
            missing, out of order, of the wrong size, or extra.
        :raises asyncassets.errors.FileDeletedWhileReading: while iterating, if the
            file was deleted or replaced meanwhile (see :meth:`delete`).
        """
        return DownloadStream(self, files_doc, start=start, end=end)

    async def delete(self, file_id: Any) -> bool:
        """Delete a file: its files document first, then its chunks (the spec's order).

        The order matters to readers: a download that finds a chunk missing looks
        the files document up again, and reports
        :class:`~asyncassets.errors.FileDeletedWhileReading` if it is gone. Since the
        files document goes first, a chunk is never gone while the files document
        is still there, so a file deleted under a reader is never mistaken for a
        corrupt one (nor is a new reader handed a files document whose chunks are
        being removed).

        Chunks are removed even if the files document was already gone, so this also
        cleans up after a half-deleted file. The deletion is shielded from
        cancellation so it never stops between the two steps.

        :returns: ``True`` if a files document existed.
        :raises pymongo.errors.PyMongoError: if the server fails.
        """
        if not is_file_id(file_id):
            return False  # names no file: never a query operator
        return await asyncio.shield(spawn(self._delete(file_id)))

    async def _delete(self, file_id: Any) -> bool:
        # Files document first: see delete() for why readers depend on it.
        result = await self.files.delete_one({"_id": file_id})
        await self.chunks.delete_many({"files_id": file_id})
        return result.deleted_count == 1

    async def delete_chunks(self, file_id: Any) -> int:
        """Delete the chunks of ``file_id`` (not its files document); return how many.

        :raises pymongo.errors.PyMongoError: if the server fails.
        """
        if not is_file_id(file_id):
            return 0
        result = await self.chunks.delete_many({"files_id": file_id})
        return result.deleted_count


async def _ensure_index(collection: Any, keys: dict[str, int], *, unique: bool) -> None:
    for index in await _driver.list_indexes(collection):
        if _same_keys(index.get("key", {}), keys):
            return
    await collection.create_index(list(keys.items()), unique=unique)


def _same_keys(existing: Mapping[str, Any], keys: dict[str, int]) -> bool:
    # Other drivers and the shell may have written the directions as doubles (1.0).
    if list(existing) != list(keys):
        return False
    try:
        return all(int(existing[k]) == v for k, v in keys.items())
    except (TypeError, ValueError):
        return False
