"""Reading a GridFS file's chunks back, checked, in bounded memory."""

from __future__ import annotations

import asyncio
import datetime
from collections import deque
from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, NoReturn

from pymongo.errors import CursorNotFound, PyMongoError

from ..._tasks import add_note, spawn
from ...errors import CorruptFile, FileDeletedWhileReading, GridFSError
from ..catalogue import read_range
from .spec import as_int

if TYPE_CHECKING:
    from .bucket import GridBucket

__all__ = ["DownloadStream"]

# The fields that tell one upload from another stored later under the same _id.
_IDENTITY = ("length", "chunkSize", "uploadDate")


class DownloadStream:
    """An async iterator over the bytes ``[start, end)`` of a stored file.

    Get one from :meth:`GridBucket.open_download`. It yields one ``bytes`` piece per
    chunk, trimmed to the range, and checks each chunk against the files document.
    It holds one cursor batch of at most ``buffer_size`` bytes at a time. (Fetching
    the next batch while the caller consumes the current one was measured and did
    not help: the server, not the client, sets the pace.)

    Cancellation is safe: a batch being fetched when the reader is cancelled is
    fetched to its end in a task of its own (PyMongo throws away a connection whose
    reply was cut short), and the server cursor is then killed in the background.
    The stream is closed by the cancellation; reading it again raises
    :class:`~asyncassets.errors.GridFSError`.

    A chunk found missing or of the wrong size is checked against the files
    document as it is now: if the file was deleted (or replaced by another upload
    under the same ``_id``) while it was read, that is
    :class:`~asyncassets.errors.FileDeletedWhileReading`, not corruption.

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
        self._bucket = bucket
        self.file_id = files_doc.get("_id") if isinstance(files_doc, Mapping) else None
        self.files_doc = files_doc
        length, start, end = read_range(files_doc, start, end, self._corrupt)
        chunk_size = as_int(files_doc.get("chunkSize"))
        if chunk_size is None or chunk_size <= 0:
            raise self._corrupt(
                f"its files document has no valid chunkSize: {files_doc.get('chunkSize')!r}"
            )
        self.length = length
        self.chunk_size = chunk_size
        self.start = start
        self.end = end
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
        # The batch being fetched, and the background close; both are kept alive by
        # spawn() until they end, whoever stopped waiting for them.
        self._pending: asyncio.Task[list[dict[str, Any]]] | None = None
        self._closer: asyncio.Task[None] | None = None
        self._done = self.start == self.end
        self._interrupted = False  # closed because a read was cancelled

    def __repr__(self) -> str:
        return f"<DownloadStream {self.file_id!r} [{self.start}, {self.end})>"

    def __aiter__(self) -> DownloadStream:
        return self

    async def __anext__(self) -> bytes:
        """Return the next piece.

        :raises asyncassets.errors.FileDeletedWhileReading: if the file was deleted or
            replaced while it was read (its chunks went missing under the reader).
        :raises asyncassets.errors.CorruptFile: if a chunk is missing, out of order,
            of the wrong size, or extra, and the files document is unchanged.
        :raises asyncassets.errors.GridFSError: if an earlier read was cancelled,
            which closed the stream.
        :raises pymongo.errors.PyMongoError: if the server fails.
        """
        if self._interrupted:
            resume = min(max(self.start, self._next_n * self.chunk_size), self.end)
            raise GridFSError(
                f"the download of file {self.file_id!r} was closed when a read of it was "
                f"cancelled; open a new one (start={resume}) to read on"
            )
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
            n = as_int(doc.get("n"))
            data = doc.get("data")
            if self._next_n >= self._nchunks and n is not None and n >= self._nchunks:
                if data:  # the spec lets readers ignore empty extra chunks
                    await self._fail(f"chunk n={n} is extra: the file has {self._nchunks} chunks")
                continue
            if n is None or n != self._next_n:
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
        """Stop: drop the buffered chunks and close the server cursor; idempotent.

        Waits until the cursor is closed (a ``killCursors`` if it was not exhausted);
        a cancelled ``aclose`` leaves that to finish in the background. After a
        cancelled read it returns at once: the close that the cancellation started
        goes on in the background.
        """
        self._done = True
        self._docs.clear()
        if self._closer is None and self._pending is None:
            cursor = self._cursor
            if cursor is None:
                return
            if not _needs_kill(cursor):
                self._cursor = None
                await cursor.close()  # no I/O: it only hands its session back
                return
        closer = self._start_close()
        if not self._interrupted:
            await asyncio.shield(closer)

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
        """Raise for a chunk that does not match the files document.

        :raises FileDeletedWhileReading: the files document is gone or is another
            upload's now: the file was deleted or replaced under the reader.
        :raises CorruptFile: the files document is unchanged.
        """
        await self.aclose()
        corrupt = self._corrupt(problem)
        try:
            await self._check_same_file()
        except FileDeletedWhileReading as deleted:
            raise deleted from corrupt
        except PyMongoError as exc:
            add_note(exc, f"while checking whether file {self.file_id!r} was deleted: {corrupt}")
            raise
        raise corrupt

    async def _check_same_file(self) -> None:
        """Look the files document up again.

        :raises FileDeletedWhileReading: it is gone, or differs from the one being
            read in length, chunk size or upload date (a new upload, same ``_id``).
        :raises pymongo.errors.PyMongoError: if the server fails.
        """
        current = await self._bucket.find(self.file_id)
        if current is None or any(
            key in self.files_doc and not _same(current.get(key), self.files_doc[key])
            for key in _IDENTITY
        ):
            raise FileDeletedWhileReading(self.file_id, self._bucket.name)

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
        """Fetch the next batch; runs in a task of its own (see :meth:`_fetch`)."""
        try:
            docs: list[dict[str, Any]] = await self._cursor.to_list(self._batch_size)
        except CursorNotFound:
            # The caller paused longer than the server keeps idle cursors (10 min). A
            # new query sees the collection as it is now: make sure it is still the
            # same file, or the bytes of two uploads would be mixed.
            await self._check_same_file()
            self._cursor = self._open_cursor()
            docs = await self._cursor.to_list(self._batch_size)
        if docs:
            last_n = as_int(docs[-1].get("n"))
            if last_n is not None:
                self._fetched_n = last_n + 1
        return docs

    async def _fetch(self) -> list[dict[str, Any]]:
        # The fetch runs in a task of its own that the reader's cancellation does not
        # interrupt: PyMongo closes a connection whose reply it stopped reading, and
        # leaves the server cursor open. A cancelled reader closes the stream instead:
        # the batch is fetched to its end, then the cursor is killed, in the background.
        if self._pending is None:
            if self._cursor is None:
                self._cursor = self._open_cursor()
            self._pending = spawn(self._fetch_batch())
        try:
            docs = await asyncio.shield(self._pending)
        except asyncio.CancelledError:
            self._interrupted = True
            self._done = True
            self._docs.clear()
            self._start_close()
            raise
        except BaseException:
            await self.aclose()
            raise
        self._pending = None
        return docs

    def _start_close(self) -> asyncio.Task[None]:
        """Start closing the cursor in the background, once; return that task."""
        if self._closer is None:
            pending, self._pending = self._pending, None
            self._closer = spawn(self._close_cursor(pending))
        return self._closer

    async def _close_cursor(self, pending: asyncio.Task[Any] | None) -> None:
        if pending is not None:
            # Its result no longer matters, only that the connection is free again
            # and which cursor it left (a CursorNotFound retry opens another one).
            await asyncio.wait({pending})
        cursor, self._cursor = self._cursor, None
        if cursor is not None:
            await cursor.close()


def _same(stored: Any, known: Any) -> bool:
    # The files document may have been read by a client with other codec options:
    # the same uploadDate can come back naive (UTC) or aware.
    if isinstance(stored, datetime.datetime) and isinstance(known, datetime.datetime):
        return _as_utc(stored) == _as_utc(known)
    return bool(stored == known)


def _as_utc(value: datetime.datetime) -> datetime.datetime:
    if value.tzinfo is None:
        return value
    return value.astimezone(datetime.timezone.utc).replace(tzinfo=None)


def _needs_kill(cursor: Any) -> bool:
    """Whether closing ``cursor`` sends a ``killCursors`` (it has a live server cursor)."""
    return bool(cursor.cursor_id) and bool(cursor.alive)
