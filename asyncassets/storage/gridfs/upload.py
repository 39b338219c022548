"""Streaming uploads into a GridFS bucket, in bounded memory."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

from bson import ObjectId
from pymongo.errors import BulkWriteError, DuplicateKeyError

from ..._tasks import spawn
from ...errors import FileAlreadyExists, UploadClosed, UploadInterrupted
from ..lifecycle import UploadLifecycle
from ..sources import byte_view, check_size
from .chunkdoc import LazyChunk, is_immutable
from .spec import DEFAULT_CHUNK_SIZE, DUPLICATE_KEY_CODES, check_extra, now_as_stored

if TYPE_CHECKING:
    from .bucket import GridBucket

__all__ = ["COUNT_WINDOW_BYTES", "UploadStream", "chunk_windows"]

#: The most bytes of chunks one query about a file's chunks covers.
COUNT_WINDOW_BYTES = 64 * 1024 * 1024


def chunk_windows(file_id: Any, nchunks: int, chunk_size: int) -> list[dict[str, Any]]:
    """Filters that together match the chunks of ``file_id``, each matching at
    most :data:`COUNT_WINDOW_BYTES` of the chunks of a file of ``nchunks``
    chunks: all of them when they fit, else ranges of ``n`` (open at both ends,
    so a chunk outside ``0..nchunks-1`` is matched too), which match only the
    chunks whose ``n`` is a number. Each is a range of the ``{files_id, n}`` index.
    """
    window = max(1, COUNT_WINDOW_BYTES // max(1, chunk_size))
    if nchunks <= window:
        return [{"files_id": file_id}]
    queries: list[dict[str, Any]] = []
    for start in range(0, nchunks, window):
        bounds: dict[str, Any] = {}
        if start:
            bounds["$gte"] = start
        if start + window < nchunks:
            bounds["$lt"] = start + window
        queries.append({"files_id": file_id, "n": bounds})
    return queries


class UploadStream(UploadLifecycle):
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
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        if metadata is not None and not isinstance(metadata, Mapping):
            raise TypeError(f"metadata must be a dict, not {type(metadata).__name__}")
        self.chunk_size = check_size("chunk_size", chunk_size)
        self.file_id = ObjectId() if file_id is None else file_id
        self.filename = filename
        self._extra = check_extra(extra)
        self._bucket = bucket
        self._metadata = dict(metadata) if metadata else {}
        self._batch_chunks = max(1, bucket.buffer_size // 2 // self.chunk_size)
        self._sha256 = hashlib.sha256()
        self._length = 0
        self._tail = bytearray()  # the bytes of the chunk being filled
        self._ready: list[MutableMapping[str, Any]] = []  # full chunks not yet sent
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

    def write_nowait(self, data: Any) -> None:
        """Append ``data`` to the buffer without I/O.

        Memory grows until the next :meth:`write`, :meth:`flush` or :meth:`close`.
        A buffer of wider items (``array("d")``, a cast ``memoryview``) is appended
        as its bytes.

        :raises asyncassets.errors.UploadClosed: if the stream is closed or aborted.
        :raises TypeError: if ``data`` is not bytes-like.
        """
        self._check_open()
        self._append(byte_view(data, "write() data"))

    async def write(self, data: Any) -> None:
        """Append ``data``; wait for the previous batch's insert when a batch is full.

        A buffer of wider items (``array("d")``, a cast ``memoryview``) is appended
        as its bytes.

        :raises asyncassets.errors.UploadClosed: if the stream is closed or aborted.
        :raises TypeError: if ``data`` is not bytes-like.
        :raises asyncassets.errors.FileAlreadyExists: if ``file_id`` is taken (the
            stream is then aborted).
        :raises pymongo.errors.PyMongoError: if an insert fails (the stream is then
            aborted).
        """
        self._check_open()
        view = byte_view(data, "write() data")
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
                await self._check_chunks_still_there()
                doc = self._make_files_doc()
                self._check_not_aborted()
                self._files_sent = True
                self._inflight = spawn(self._insert_files_doc(doc))
                await self._wait_inflight()
            except BaseException as exc:
                await self._abort_after(exc)
                raise
            self._files_doc = doc
            self._ready = []
            return doc

    async def _check_chunks_still_there(self) -> None:
        """Refuse to complete a file whose chunks were removed while it was open.

        Until its files document exists an upload's chunks look abandoned, so an
        orphan sweep whose grace is shorter than a pause of this upload may have
        removed some. Counted on the ``{files_id, n}`` index, in ranges of ``n`` of
        at most :data:`COUNT_WINDOW_BYTES` of chunks each: a server may hold what
        one count matches in memory (SecantusDB does), which for a whole large
        file was twice its size. (Of a file larger than that, a chunk whose ``n``
        is no number, which no upload writes, is not counted.)
        """
        if not self._next_n:
            return
        found = 0
        for query in chunk_windows(self.file_id, self._next_n, self.chunk_size):
            found += await self._bucket.chunks.count_documents(query)
        if found != self._next_n:
            raise UploadInterrupted(
                f"upload {self.file_id!r} wrote {self._next_n} chunks but {found} are left: "
                "they were removed while it was open (most likely by sweep_orphans() with "
                "a grace shorter than a pause of this upload). Nothing was stored; upload "
                "it again."
            )

    # -- internals ---------------------------------------------------------------

    _left_in = "the bucket"

    def _wrote_something(self) -> bool:
        return bool(getattr(self, "_sent_n", 0))

    def _drop_buffers(self) -> None:
        self._tail = bytearray()
        self._ready = []

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
        # A whole-chunk bytes piece is used as it is. Chunks cut from bytes that
        # cannot change are copied only when their insert is encoded (chunkdoc.py);
        # from a buffer the caller may reuse, now.
        whole = type(data) is bytes and not pos and size == chunk_size
        if size - pos >= chunk_size and not whole and is_immutable(data):
            view = data if isinstance(data, memoryview) else memoryview(data)
            while size - pos >= chunk_size:
                self._ready.append(
                    LazyChunk(self.file_id, self._next_n, view[pos : pos + chunk_size])
                )
                self._next_n += 1
                pos += chunk_size
        while size - pos >= chunk_size:
            piece = data[pos : pos + chunk_size]
            self._emit(piece if isinstance(piece, bytes) else bytes(piece))
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
            self._inflight = spawn(self._insert_chunks(batch))

    async def _wait_inflight(self) -> None:
        task = self._inflight
        if task is None:
            return
        # Shielded: a cancelled caller must not cancel an insert halfway, or cleanup
        # could run before the server applies it.
        await asyncio.shield(task)
        if self._inflight is task:
            self._inflight = None

    async def _insert_chunks(self, batch: list[MutableMapping[str, Any]]) -> None:
        await self._bucket.ensure_indexes()
        try:
            await self._bucket.chunks.insert_many(batch)
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors", [])
            if errors and errors[0].get("code") in DUPLICATE_KEY_CODES:
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
            "uploadDate": now_as_stored(self._bucket.files),
        }
        if self.filename is not None:
            doc["filename"] = self.filename
        doc["metadata"] = {**self._metadata, "sha256": self._sha256.hexdigest()}
        doc.update(self._extra)
        return doc

    async def _cleanup(self) -> None:
        await self._drain_inflight()
        bucket = self._bucket
        if self._files_sent and not self._files_duplicate:
            await bucket.files.delete_one({"_id": self.file_id})
        limit = self._sent_n if self._duplicate_n is None else self._duplicate_n
        if limit:
            await bucket.chunks.delete_many({"files_id": self.file_id, "n": {"$lt": limit}})
