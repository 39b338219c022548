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
  :class:`~asyncassets.errors.CorruptFile` instead of returning wrong bytes.

It works with a PyMongo ``AsyncDatabase`` or a Motor database: only calls both
drivers share are used here, the others go through :mod:`asyncassets._driver`.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import inspect
import io
import warnings
import weakref
from collections import deque
from collections.abc import AsyncIterator, Coroutine, Iterable, Mapping
from types import TracebackType
from typing import Any, NoReturn

from bson import ObjectId
from pymongo.errors import BulkWriteError, CursorNotFound, DuplicateKeyError

from asyncassets import _driver
from asyncassets.errors import CorruptFile, FileAlreadyExists, UploadClosed

__all__ = [
    "DEFAULT_BUFFER_SIZE",
    "DEFAULT_CHUNK_SIZE",
    "DownloadStream",
    "GridBucket",
    "UploadStream",
]

DEFAULT_CHUNK_SIZE = 255 * 1024
"""The spec's default chunk size: 255 KiB, so a chunk document stays under 256 KiB."""

DEFAULT_BUFFER_SIZE = 4 * 1024 * 1024
"""How many bytes of file data one upload or download stream may hold in memory."""

_FILES_INDEX = {"filename": 1, "uploadDate": 1}
_CHUNKS_INDEX = {"files_id": 1, "n": 1}
_DUPLICATE_KEY_CODES = frozenset({11000, 11001, 12582})

_ACCEPTED_SOURCES = (
    "bytes, bytearray or memoryview; a binary file object whose read(n) returns bytes "
    "(read may be a coroutine); or an iterable or async iterable of bytes pieces"
)

# Which (database, bucket) pairs already have their indexes, per client. Weak, so a
# closed and dropped client does not keep its entry (or itself) alive.
_indexed: weakref.WeakKeyDictionary[Any, set[tuple[str, str]]] = weakref.WeakKeyDictionary()

# Cleanup tasks that must outlive a cancelled caller; the event loop keeps only weak
# references to tasks.
_background: set[asyncio.Future[Any]] = set()


def _spawn(coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
    task = asyncio.ensure_future(coro)
    _background.add(task)
    task.add_done_callback(_forget)
    return task


def _forget(task: asyncio.Future[Any]) -> None:
    _background.discard(task)
    # Whoever needed the outcome has awaited it; don't log "never retrieved".
    if not task.cancelled():
        task.exception()


def _check_size(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return value


def _byte_view(data: Any, what: str) -> bytes | memoryview:
    """Return ``data`` as ``bytes`` or a flat byte ``memoryview``; ``TypeError`` otherwise."""
    if type(data) is bytes:
        return data
    if isinstance(data, str):
        raise TypeError(
            f"{what} must be bytes, not str: encode the text first "
            "(text.encode('utf-8')), or pass encoding= where the API offers it"
        )
    try:
        view = memoryview(data)
    except TypeError:
        raise TypeError(
            f"{what} must be bytes-like (bytes, bytearray, memoryview), not {type(data).__name__}"
        ) from None
    if view.ndim != 1 or view.format not in ("B", "b", "c"):
        view = view.cast("B") if view.c_contiguous else memoryview(view.tobytes())
    return view


def _now_as_stored(collection: Any) -> datetime.datetime:
    """The current time as ``collection`` would read it back.

    BSON dates have millisecond precision, and come back naive (UTC) or aware
    depending on the codec options, so a returned files document compares equal
    to the one a later ``find`` gives.
    """
    now = datetime.datetime.now(datetime.timezone.utc)
    now = now.replace(microsecond=now.microsecond // 1000 * 1000)
    options = getattr(collection, "codec_options", None)
    if options is None or not options.tz_aware:
        return now.replace(tzinfo=None)
    return now.astimezone(options.tzinfo) if options.tzinfo else now


def _add_note(exc: BaseException, note: str) -> None:
    if hasattr(exc, "add_note"):  # Python >= 3.11
        exc.add_note(note)


class GridBucket:
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
        self.files = db[f"{name}.files"]
        self.chunks = db[f"{name}.chunks"]
        self.chunk_size = _check_size("chunk_size", chunk_size)
        self.buffer_size = _check_size("buffer_size", buffer_size)

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
        await _ensure_index(self.files, _FILES_INDEX, unique=False)
        await _ensure_index(self.chunks, _CHUNKS_INDEX, unique=True)
        done.add(key)

    def open_upload(
        self,
        *,
        file_id: Any = None,
        filename: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        chunk_size: int | None = None,
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
        :raises TypeError: if ``metadata`` is not a mapping or ``chunk_size`` not an int.
        :raises ValueError: if ``chunk_size`` is not positive.
        """
        return UploadStream(
            self,
            file_id=file_id,
            filename=filename,
            metadata=metadata,
            chunk_size=self.chunk_size if chunk_size is None else chunk_size,
        )

    async def upload(
        self,
        source: Any,
        *,
        file_id: Any = None,
        filename: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        chunk_size: int | None = None,
    ) -> dict[str, Any]:
        """Store ``source`` as a new file and return its files document.

        ``source`` is bytes-like; a binary file object whose ``read(n)`` returns bytes,
        or a coroutine of bytes (aiofiles, Starlette's ``UploadFile``); or an iterable
        or async iterable of bytes pieces. It is read piece by piece, never whole.

        If anything fails, including cancellation, the chunks written so far are
        removed, no files document is left, and the original exception propagates.

        :raises TypeError: if ``source`` is of none of these kinds (``None``, ``int``,
            ``str``, a text-mode file...), or yields something other than bytes.
        :raises ValueError: if ``source`` is a closed file.
        :raises asyncassets.errors.FileAlreadyExists: if ``file_id`` is taken.
        :raises pymongo.errors.PyMongoError: if the server fails.
        """
        chunk_size = self.chunk_size if chunk_size is None else chunk_size
        pieces = _read_source(source, _check_size("chunk_size", chunk_size))
        stream = self.open_upload(
            file_id=file_id, filename=filename, metadata=metadata, chunk_size=chunk_size
        )
        try:
            async for piece in pieces:
                await stream.write(piece)
            return await stream.close()
        except BaseException as exc:
            await stream._abort_after(exc)
            raise
        finally:
            await pieces.aclose()

    async def find(self, file_id: Any) -> dict[str, Any] | None:
        """Return the files document of ``file_id``, or ``None`` if there is none.

        :raises pymongo.errors.PyMongoError: if the server fails.
        """
        return await self.files.find_one({"_id": file_id})

    async def find_many(self, file_ids: Iterable[Any]) -> dict[Any, dict[str, Any]]:
        """Return the files documents of ``file_ids`` keyed by ``_id``, in one query.

        Ids without a files document are absent from the result.

        :raises pymongo.errors.PyMongoError: if the server fails.
        """
        ids = list(dict.fromkeys(file_ids))
        if not ids:
            return {}
        return {doc["_id"]: doc async for doc in self.files.find({"_id": {"$in": ids}})}

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
        """
        return DownloadStream(self, files_doc, start=start, end=end)

    async def read(
        self, files_doc: Mapping[str, Any], *, start: int = 0, end: int | None = None
    ) -> bytes:
        """Return the bytes ``[start, end)`` of a stored file.

        :raises: as :meth:`open_download`, and ``pymongo.errors.PyMongoError`` if the
            server fails.
        """
        pieces = []
        async with self.open_download(files_doc, start=start, end=end) as stream:
            async for piece in stream:
                pieces.append(piece)
        return b"".join(pieces)

    async def delete(self, file_id: Any) -> bool:
        """Delete a file: its files document first, then its chunks (the spec's order).

        Chunks are removed even if the files document was already gone, so this also
        cleans up after a half-deleted file. The deletion is shielded from
        cancellation so it never stops between the two steps.

        :returns: ``True`` if a files document existed.
        :raises pymongo.errors.PyMongoError: if the server fails.
        """
        return await asyncio.shield(_spawn(self._delete(file_id)))

    async def _delete(self, file_id: Any) -> bool:
        result = await self.files.delete_one({"_id": file_id})
        await self.chunks.delete_many({"files_id": file_id})
        return result.deleted_count == 1

    async def delete_chunks(self, file_id: Any) -> int:
        """Delete the chunks of ``file_id`` (not its files document); return how many.

        :raises pymongo.errors.PyMongoError: if the server fails.
        """
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


async def _read_source(source: Any, piece_size: int) -> AsyncIterator[Any]:
    """Yield ``source``'s bytes in pieces; validate its kind before the first yield."""
    if source is None:
        raise TypeError(f"upload() needs a source, got None; pass {_ACCEPTED_SOURCES}")
    if isinstance(source, str):
        raise TypeError(
            "upload() takes bytes, not str: encode the text first (text.encode('utf-8')), "
            "or pass encoding= where the API offers it"
        )
    if isinstance(source, (bytes, bytearray, memoryview)):
        yield source
        return
    read = getattr(source, "read", None)
    if callable(read):
        if isinstance(source, io.TextIOBase):
            raise _text_mode_error(source)
        if getattr(source, "closed", False) is True:
            raise _closed_error(source)
        while True:
            try:
                piece = read(piece_size)
                if inspect.isawaitable(piece):
                    piece = await piece
            except ValueError as exc:
                if getattr(source, "closed", False) is True:
                    raise _closed_error(source) from exc
                raise
            if isinstance(piece, str):
                raise _text_mode_error(source)
            if piece is None:
                raise TypeError(
                    f"{type(source).__name__}.read() returned None: it is a non-blocking "
                    "file with no data ready; pass a blocking binary file or an async one"
                )
            if not piece:
                return
            yield _byte_view(piece, f"{type(source).__name__}.read()")
        return
    try:
        view = memoryview(source)
    except TypeError:
        pass
    else:
        yield view
        return
    if hasattr(source, "__aiter__"):
        async for piece in source:
            yield _piece(piece, source)
    elif hasattr(source, "__iter__") and not isinstance(source, Mapping):
        for piece in source:
            yield _piece(piece, source)
    else:
        raise TypeError(
            f"upload() cannot read from {type(source).__name__}; pass {_ACCEPTED_SOURCES}"
        )


def _piece(piece: Any, source: Any) -> bytes | memoryview:
    return _byte_view(piece, f"each piece of the {type(source).__name__} source")


def _source_name(source: Any) -> str:
    name = getattr(source, "name", None)
    return f"{type(source).__name__} {name!r}" if isinstance(name, str) else type(source).__name__


def _text_mode_error(source: Any) -> TypeError:
    return TypeError(
        f"the source {_source_name(source)} is open in text mode (read() returns str): "
        "open it in binary mode ('rb')"
    )


def _closed_error(source: Any) -> ValueError:
    return ValueError(
        f"the source {_source_name(source)} is closed: open it again (in binary mode) "
        "before uploading"
    )


class UploadStream:
    """A file being written to a :class:`GridBucket`; get one from ``open_upload``.

    Bytes written are cut into chunks, which are inserted in batches of at most
    ``buffer_size // 2`` bytes; one batch is inserted while the next one fills, so the
    stream holds about ``buffer_size`` bytes whatever the file size (except with
    :meth:`write_nowait`, which never waits). :meth:`close` inserts the files
    document last, after every chunk, so readers never see a partial file.

    An insert failure aborts the stream (its chunks are removed) and re-raises.

    :ivar file_id: the file's ``_id``, known before anything is written.
    :ivar filename: the files document's ``filename``.
    :ivar chunk_size: the file's chunk size.
    """

    def __init__(
        self,
        bucket: GridBucket,
        *,
        file_id: Any = None,
        filename: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        if metadata is not None and not isinstance(metadata, Mapping):
            raise TypeError(f"metadata must be a dict, not {type(metadata).__name__}")
        self.chunk_size = _check_size("chunk_size", chunk_size)
        self.file_id = ObjectId() if file_id is None else file_id
        self.filename = filename
        self._bucket = bucket
        self._metadata = dict(metadata) if metadata else {}
        self._batch_chunks = max(1, bucket.buffer_size // 2 // self.chunk_size)
        self._sha256 = hashlib.sha256()
        self._length = 0
        self._tail = bytearray()  # the bytes of the chunk being filled
        self._ready: list[dict[str, Any]] = []  # full chunks not yet sent
        self._next_n = 0
        self._yielded_n = 0
        self._inflight: asyncio.Task[Any] | None = None
        self._lock = asyncio.Lock()
        self._closing = False
        self._files_doc: dict[str, Any] | None = None
        self._abort_task: asyncio.Task[None] | None = None
        # What cleanup must remove: chunks n < _sent_n (or < _duplicate_n, the first
        # chunk whose insert found another file's chunk there), and the files document
        # if we tried to insert it and it was not someone else's.
        self._sent_n = 0
        self._duplicate_n: int | None = None
        self._files_sent = False
        self._files_duplicate = False

    def __repr__(self) -> str:
        state = "closed" if self._files_doc else "aborted" if self._abort_task else "open"
        return f"<UploadStream {self.file_id!r} {state}, {self._length} bytes>"

    @property
    def closed(self) -> bool:
        """True once the stream is closed, closing, or aborted."""
        return self._closing or self._abort_task is not None

    @property
    def length(self) -> int:
        """How many bytes have been written so far."""
        return self._length

    def write_nowait(self, data: Any) -> None:
        """Append ``data`` to the buffer without I/O.

        Memory grows until the next :meth:`write`, :meth:`flush` or :meth:`close`.

        :raises asyncassets.errors.UploadClosed: if the stream is closed or aborted.
        :raises TypeError: if ``data`` is not bytes-like.
        """
        self._check_open()
        self._append(_byte_view(data, "write() data"))

    async def write(self, data: Any) -> None:
        """Append ``data``; wait for the previous batch's insert when a batch is full.

        :raises asyncassets.errors.UploadClosed: if the stream is closed or aborted.
        :raises TypeError: if ``data`` is not bytes-like.
        :raises asyncassets.errors.FileAlreadyExists: if ``file_id`` is taken (the
            stream is then aborted).
        :raises pymongo.errors.PyMongoError: if an insert fails (the stream is then
            aborted).
        """
        self._check_open()
        view = _byte_view(data, "write() data")
        size = len(view)
        chunk_size = self.chunk_size
        if size <= chunk_size:
            self._append(view)
            await self._after_append()
            return
        if type(view) is bytes:
            view = memoryview(view)
        # Slices aligned on chunk boundaries, so each becomes a chunk with one copy.
        pos = 0
        while pos < size:
            self._check_open()
            end = pos + chunk_size - len(self._tail)
            self._append(view[pos:end])
            pos = end
            await self._after_append()

    async def _after_append(self) -> None:
        if len(self._ready) >= self._batch_chunks:
            await self._send(full_only=True)
        elif self._inflight is not None and self._next_n != self._yielded_n:
            # A chunk was cut while an insert is in flight: give the event loop a turn so
            # that the insert starts and its bytes reach the socket while we fill the next
            # batch (a synchronous source would otherwise never yield until then).
            self._yielded_n = self._next_n
            await asyncio.sleep(0)

    async def writelines(self, lines: Iterable[Any]) -> None:
        """Write each bytes-like item of ``lines`` (no separators are added).

        :raises: as :meth:`write`.
        """
        for line in lines:
            await self.write(line)

    async def flush(self) -> None:
        """Insert every complete chunk buffered so far and wait for the inserts.

        The chunk being filled stays buffered until more data or :meth:`close`.

        :raises: as :meth:`write`.
        """
        self._check_open()
        await self._send(full_only=False, wait=True)

    async def close(self) -> dict[str, Any]:
        """Insert the remaining chunks, then the files document; return the latter.

        Closing again returns the same document. If closing fails or is cancelled,
        the upload is aborted (its chunks removed) and the exception propagates.

        :raises asyncassets.errors.UploadClosed: if the stream was aborted.
        :raises asyncassets.errors.FileAlreadyExists: if ``file_id`` is taken.
        :raises pymongo.errors.PyMongoError: if an insert fails.
        """
        if self._files_doc is not None:
            return self._files_doc
        if self._abort_task is not None:
            raise UploadClosed(f"upload {self.file_id!r} was aborted; it cannot be closed")
        async with self._lock:
            if self._files_doc is not None:  # a concurrent close() finished first
                return self._files_doc
            self._check_not_aborted()
            self._closing = True
            try:
                if self._tail:
                    self._emit(bytes(self._tail))
                    self._tail = bytearray()
                await self._send_locked(full_only=False)
                await self._wait_inflight()
                doc = self._make_files_doc()
                self._check_not_aborted()
                self._files_sent = True
                self._inflight = _spawn(self._insert_files_doc(doc))
                await self._wait_inflight()
            except BaseException as exc:
                await self._abort_after(exc)
                raise
            self._files_doc = doc
            self._ready = []
            return doc

    async def abort(self) -> None:
        """Remove the chunks written so far and close the stream; idempotent.

        Does nothing after a successful :meth:`close`: the file is then stored, and
        :meth:`GridBucket.delete` removes it. The cleanup runs in a task shielded from
        cancellation.

        :raises pymongo.errors.PyMongoError: if deleting the chunks fails (they are
            left for the orphan sweep).
        """
        if self._files_doc is not None:
            return
        if self._abort_task is None:
            self._tail = bytearray()
            self._ready = []
            self._abort_task = _spawn(self._cleanup())
        await asyncio.shield(self._abort_task)

    async def __aenter__(self) -> UploadStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            await self.close()
        else:
            await self._abort_after(exc)

    def __del__(self) -> None:
        unfinished = getattr(self, "_files_doc", None) is None and not getattr(
            self, "_abort_task", None
        )
        if getattr(self, "_sent_n", 0) and unfinished:
            warnings.warn(
                f"UploadStream {self.file_id!r} was neither closed nor aborted; its "
                "chunks stay in the bucket until the orphan sweep",
                ResourceWarning,
                stacklevel=1,
            )

    # -- internals ---------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closing or self._abort_task is not None:
            state = "aborted" if self._abort_task is not None else "closed"
            raise UploadClosed(f"upload {self.file_id!r} is {state}; it takes no more data")

    def _check_not_aborted(self) -> None:
        if self._abort_task is not None:
            raise UploadClosed(f"upload {self.file_id!r} was aborted while closing")

    def _append(self, data: bytes | memoryview) -> None:
        size = len(data)
        if not size:
            return
        self._sha256.update(data)
        self._length += size
        chunk_size = self.chunk_size
        pos = 0
        tail = self._tail
        if tail:
            pos = chunk_size - len(tail)
            tail += data[:pos]
            if len(tail) < chunk_size:
                return
            self._emit(bytes(tail))
            tail = self._tail = bytearray()
        # Slicing bytes copies once; a whole-chunk bytes piece is not copied at all.
        is_bytes = type(data) is bytes
        while size - pos >= chunk_size:
            piece = data[pos : pos + chunk_size]
            self._emit(piece if is_bytes else bytes(piece))
            pos += chunk_size
        if pos < size:
            tail += data[pos:]

    def _emit(self, data: bytes) -> None:
        self._ready.append({"files_id": self.file_id, "n": self._next_n, "data": data})
        self._next_n += 1

    async def _send(self, *, full_only: bool, wait: bool = False) -> None:
        async with self._lock:
            try:
                await self._send_locked(full_only=full_only)
                if wait:
                    await self._wait_inflight()
            except asyncio.CancelledError:
                raise  # the stream is still consistent; the caller decides
            except BaseException as exc:
                await self._abort_after(exc)
                raise

    async def _send_locked(self, *, full_only: bool) -> None:
        size = self._batch_chunks
        while self._ready and (len(self._ready) >= size or not full_only):
            # At most one batch in flight plus the one filling: wait before cutting
            # the next batch, so a cancellation here loses nothing.
            await self._wait_inflight()
            self._check_not_aborted()
            batch = self._ready[:size]
            del self._ready[:size]
            self._sent_n = batch[-1]["n"] + 1
            self._inflight = _spawn(self._insert_chunks(batch))

    async def _wait_inflight(self) -> None:
        task = self._inflight
        if task is None:
            return
        # Shielded: a cancelled caller must not cancel an insert halfway, or cleanup
        # could run before the server applies it.
        await asyncio.shield(task)
        if self._inflight is task:
            self._inflight = None

    async def _insert_chunks(self, batch: list[dict[str, Any]]) -> None:
        await self._bucket.ensure_indexes()
        try:
            await self._bucket.chunks.insert_many(batch)
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors", [])
            if errors and errors[0].get("code") in _DUPLICATE_KEY_CODES:
                self._duplicate_n = batch[errors[0]["index"]]["n"]
                raise self._exists_error() from exc
            raise

    async def _insert_files_doc(self, doc: dict[str, Any]) -> None:
        await self._bucket.ensure_indexes()
        try:
            await self._bucket.files.insert_one(doc)
        except DuplicateKeyError as exc:
            self._files_duplicate = True
            raise self._exists_error() from exc

    def _exists_error(self) -> FileAlreadyExists:
        return FileAlreadyExists(
            f"a file with _id {self.file_id!r} already exists in bucket "
            f"{self._bucket.name!r}; pass another file_id, or none for a new ObjectId"
        )

    def _make_files_doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "_id": self.file_id,
            "length": self._length,
            "chunkSize": self.chunk_size,
            "uploadDate": _now_as_stored(self._bucket.files),
        }
        if self.filename is not None:
            doc["filename"] = self.filename
        doc["metadata"] = {**self._metadata, "sha256": self._sha256.hexdigest()}
        return doc

    async def _abort_after(self, exc: BaseException) -> None:
        """Abort because of ``exc``; a cleanup failure becomes a note on ``exc``."""
        try:
            await self.abort()
        except Exception as cleanup_exc:
            _add_note(
                exc,
                f"aborting upload {self.file_id!r} failed too ({cleanup_exc!r}); its "
                "chunks stay in the bucket until the orphan sweep",
            )

    async def _cleanup(self) -> None:
        while (task := self._inflight) is not None:
            try:
                await task
            except BaseException:
                pass  # whoever waited on it has seen the error; we only need it over
            if self._inflight is task:
                self._inflight = None
        bucket = self._bucket
        if self._files_sent and not self._files_duplicate:
            await bucket.files.delete_one({"_id": self.file_id})
        limit = self._sent_n if self._duplicate_n is None else self._duplicate_n
        if limit:
            await bucket.chunks.delete_many({"files_id": self.file_id, "n": {"$lt": limit}})


class DownloadStream:
    """An async iterator over the bytes ``[start, end)`` of a stored file.

    Get one from :meth:`GridBucket.open_download`. It yields one ``bytes`` piece per
    chunk, trimmed to the range, and checks each chunk against the files document.
    It holds one cursor batch of at most ``buffer_size`` bytes at a time. (Fetching
    the next batch while the caller consumes the current one was measured and did
    not help: the server, not the client, sets the pace.)

    :ivar file_id: the file's ``_id``.
    :ivar files_doc: the files document it reads.
    :ivar length: the whole file's length.
    :ivar chunk_size: the file's chunk size.
    :ivar start: first byte yielded.
    :ivar end: end (exclusive) of the bytes yielded.
    """

    def __init__(
        self,
        bucket: GridBucket,
        files_doc: Mapping[str, Any],
        *,
        start: int = 0,
        end: int | None = None,
    ) -> None:
        if not isinstance(files_doc, Mapping):
            raise TypeError(
                f"open_download() takes a files document (dict), not "
                f"{type(files_doc).__name__}; get it with bucket.find(file_id)"
            )
        self._bucket = bucket
        self.file_id = files_doc.get("_id")
        self.files_doc = files_doc
        length = files_doc.get("length")
        chunk_size = files_doc.get("chunkSize")
        if "_id" not in files_doc or not _is_int(length) or length < 0:
            raise self._corrupt(f"its files document has no valid length: {length!r}")
        if not _is_int(chunk_size) or chunk_size <= 0:
            raise self._corrupt(f"its files document has no valid chunkSize: {chunk_size!r}")
        if end is None:
            end = length
        for name, value in (("start", start), ("end", end)):
            if not _is_int(value):
                raise TypeError(f"{name} must be an int, not {type(value).__name__}")
        if not 0 <= start <= end <= length:
            raise ValueError(
                f"invalid range start={start}, end={end} for file {self.file_id!r} of "
                f"{length} bytes: need 0 <= start <= end <= {length}"
            )
        self.length = int(length)
        self.chunk_size = int(chunk_size)
        self.start = int(start)
        self.end = int(end)
        self._nchunks = -(-self.length // self.chunk_size)
        self._first = self.start // self.chunk_size
        self._last = (self.end - 1) // self.chunk_size  # last chunk yielded
        # Reading to the end also checks there is no extra chunk behind the last one.
        self._to_end = self.end == self.length
        self._batch_size = max(1, bucket.buffer_size // self.chunk_size)
        self._next_n = self._first
        self._fetched_n = self._first  # the next n the cursor will return
        self._docs: deque[dict[str, Any]] = deque()
        self._cursor: Any = None
        self._pending: asyncio.Task[list[dict[str, Any]]] | None = None
        self._done = self.start == self.end

    def __repr__(self) -> str:
        return f"<DownloadStream {self.file_id!r} [{self.start}, {self.end})>"

    def __aiter__(self) -> DownloadStream:
        return self

    async def __anext__(self) -> bytes:
        """Return the next piece.

        :raises asyncassets.errors.CorruptFile: if a chunk is missing, out of order,
            of the wrong size, or extra.
        :raises pymongo.errors.PyMongoError: if the server fails.
        """
        while not self._done:
            if not self._docs:
                docs = await self._fetch()
                if not docs:
                    if self._next_n <= self._last:
                        await self._fail(f"chunk n={self._next_n} is missing")
                    await self.aclose()
                    break
                self._docs.extend(docs)
            doc = self._docs.popleft()
            n = _as_int(doc.get("n"))
            data = doc.get("data")
            if self._next_n >= self._nchunks and n is not None and n >= self._nchunks:
                if data:  # the spec lets readers ignore empty extra chunks
                    await self._fail(f"chunk n={n} is extra: the file has {self._nchunks} chunks")
                continue
            if n != self._next_n:
                await self._fail(f"chunk n={self._next_n} is missing (found n={doc.get('n')!r})")
            if not isinstance(data, bytes):
                await self._fail(f"chunk n={n} holds {type(data).__name__}, not binary data")
            expected = (
                self.chunk_size
                if n < self._nchunks - 1
                else self.length - (self._nchunks - 1) * self.chunk_size
            )
            if len(data) != expected:
                kind = "short" if len(data) < expected else "long"
                await self._fail(f"chunk n={n} is {kind}: {len(data)} bytes instead of {expected}")
            self._next_n += 1
            if n == self._last and not self._to_end:
                await self.aclose()
            if n == self._first or n == self._last:
                offset = n * self.chunk_size
                lo = max(self.start - offset, 0)
                hi = min(self.end - offset, expected)
                if lo or hi != expected:
                    data = data[lo:hi]
            return data
        raise StopAsyncIteration

    async def aclose(self) -> None:
        """Stop: close the cursor and drop the buffered chunks; idempotent."""
        self._done = True
        self._docs.clear()
        pending, self._pending = self._pending, None
        if pending is not None and not pending.done():
            pending.cancel()
            try:
                await pending
            except BaseException:
                pass  # discarded on purpose: the caller stopped reading
        cursor, self._cursor = self._cursor, None
        if cursor is not None:
            await cursor.close()

    async def __aenter__(self) -> DownloadStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- internals ---------------------------------------------------------------

    def _corrupt(self, problem: str) -> CorruptFile:
        return CorruptFile(
            f"file {self.file_id!r} in bucket {self._bucket.name!r} is corrupt: {problem}"
        )

    async def _fail(self, problem: str) -> NoReturn:
        await self.aclose()
        raise self._corrupt(problem)

    def _open_cursor(self) -> Any:
        first = self._fetched_n
        if self._to_end:
            # No upper bound, so extra chunks show up. A batch one larger than what is
            # left lets the server exhaust the cursor in the same reply.
            query: dict[str, Any] = {"$gte": first}
            wanted, limit = self._nchunks - first + 1, 0
        else:
            query = {"$gte": first, "$lte": self._last}
            wanted = limit = self._last - first + 1
        return self._bucket.chunks.find(
            {"files_id": self.file_id, "n": query},
            projection={"_id": False, "n": True, "data": True},
            sort=[("n", 1)],
            batch_size=max(1, min(self._batch_size, wanted)),
            limit=limit,
        )

    async def _fetch_batch(self) -> list[dict[str, Any]]:
        if self._cursor is None:
            self._cursor = self._open_cursor()
        try:
            docs = await self._cursor.to_list(self._batch_size)
        except CursorNotFound:
            # The caller paused longer than the server keeps idle cursors (10 min).
            self._cursor = self._open_cursor()
            docs = await self._cursor.to_list(self._batch_size)
        if docs:
            last_n = _as_int(docs[-1].get("n"))
            if last_n is not None:
                self._fetched_n = last_n + 1
        return docs

    async def _fetch(self) -> list[dict[str, Any]]:
        # The fetch runs in its own task, shielded: a caller cancelled mid-fetch leaves
        # the batch to the next call instead of losing it halfway through the cursor.
        if self._pending is None:
            self._pending = _fetch_task(self._fetch_batch())
        try:
            docs = await asyncio.shield(self._pending)
        except asyncio.CancelledError:
            if self._pending is not None and self._pending.cancelled():
                await self.aclose()
            raise
        except BaseException:
            await self.aclose()
            raise
        self._pending = None
        return docs


def _fetch_task(coro: Coroutine[Any, Any, list[dict[str, Any]]]) -> asyncio.Task[Any]:
    task = asyncio.ensure_future(coro)
    # If the stream is abandoned mid-fetch, nobody awaits it; don't log that.
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    return task


def _as_int(value: Any) -> int | None:
    """``value`` as an int if it is one (shell-written files may use doubles), else None."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value if _is_int(value) else None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
