"""Reading a GridFS file's chunks back, checked, in bounded memory."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Coroutine, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, NoReturn

from pymongo.errors import CursorNotFound

from ...errors import CorruptFile
from .spec import as_int, is_int

if TYPE_CHECKING:
    from .bucket import GridBucket

__all__ = ["DownloadStream"]


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
        if "_id" not in files_doc or not is_int(length) or length < 0:
            raise self._corrupt(f"its files document has no valid length: {length!r}")
        if not is_int(chunk_size) or chunk_size <= 0:
            raise self._corrupt(f"its files document has no valid chunkSize: {chunk_size!r}")
        if end is None:
            end = length
        for name, value in (("start", start), ("end", end)):
            if not is_int(value):
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
            n = as_int(doc.get("n"))
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
            last_n = as_int(docs[-1].get("n"))
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


