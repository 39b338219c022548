"""What every upload stream shares: open, then closed or aborted, exactly once.

GridFS's :class:`~asyncassets.storage.gridfs.UploadStream` and the object
store's :class:`~asyncassets.storage.objects.store.ObjectUpload` write bytes
differently, but end the same way: ``close()`` stores the file and returns its
entry; ``abort()`` removes what was written, once, in a task shielded from
cancellation; ``async with`` closes on success and aborts on an exception; a
stream dropped without either warns. That part is written here, once.
"""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import AsyncIterator, Iterable
from types import TracebackType
from typing import Any

from .._tasks import add_note, spawn
from ..errors import UploadClosed

__all__ = ["UploadLifecycle", "upload_all"]


class UploadLifecycle:
    """The end of an upload stream. Subclasses set the attributes below and
    implement ``write``, ``close``, :meth:`_cleanup` and :meth:`_drop_buffers`.

    :ivar file_id: the file's ``_id``.
    """

    file_id: Any
    _length: int
    _closing: bool
    _files_doc: dict[str, Any] | None
    _abort_task: asyncio.Task[None] | None
    #: The write (or commit) running in its own task, if any.
    _inflight: asyncio.Task[Any] | None
    #: Where what an unfinished upload wrote stays, for messages.
    _left_in = "the storage"

    @property
    def closed(self) -> bool:
        """True once the stream is closed, closing, or aborted."""
        return self._closing or self._abort_task is not None

    @property
    def length(self) -> int:
        """How many bytes have been written so far."""
        return self._length

    async def write(self, data: Any) -> None:  # pragma: no cover - every subclass has one
        raise NotImplementedError

    async def writelines(self, lines: Iterable[Any]) -> None:
        """Write each bytes-like item of ``lines`` (no separators are added).

        :raises: as ``write``.
        """
        for line in lines:
            await self.write(line)

    async def close(self) -> dict[str, Any]:  # pragma: no cover - every subclass has one
        raise NotImplementedError

    async def abort(self) -> None:
        """Remove what was written so far and close the stream; idempotent.

        Does nothing after a successful ``close()``: the file is then stored, and the
        store's ``delete()`` removes it. The cleanup runs in a task shielded from
        cancellation, so it finishes even if the caller is cancelled.

        :raises pymongo.errors.PyMongoError, asyncassets.errors.StorageError: the
            cleanup failed (what is left is removed by the orphan sweep).
        """
        if self._files_doc is not None:
            return
        if self._abort_task is None:
            self._drop_buffers()
            self._abort_task = spawn(self._cleanup())
        await asyncio.shield(self._abort_task)

    async def __aenter__(self) -> Any:
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
        if unfinished and self._wrote_something():
            warnings.warn(
                f"{type(self).__name__} {getattr(self, 'file_id', None)!r} was neither "
                f"closed nor aborted; what it wrote stays in {self._left_in} until the "
                "orphan sweep",
                ResourceWarning,
                stacklevel=1,
            )

    # -- for subclasses -------------------------------------------------------------

    def _wrote_something(self) -> bool:
        """Whether anything may have reached the storage (for the warning of __del__)."""
        raise NotImplementedError

    def _drop_buffers(self) -> None:
        """Forget the bytes not sent yet (abort() is starting)."""
        raise NotImplementedError

    async def _cleanup(self) -> None:
        """Remove what was written; runs once, in its own task."""
        raise NotImplementedError

    async def _drain_inflight(self) -> None:
        """Wait until no write of this stream is in flight (for the cleanup)."""
        while (task := self._inflight) is not None:
            try:
                await task
            except BaseException:
                pass  # whoever waited on it has seen the error; we only need it over
            if self._inflight is task:
                self._inflight = None

    def _check_open(self) -> None:
        if self._closing or self._abort_task is not None:
            state = "aborted" if self._abort_task is not None else "closed"
            raise UploadClosed(f"upload {self.file_id!r} is {state}; it takes no more data")

    def _check_not_aborted(self) -> None:
        if self._abort_task is not None:
            raise UploadClosed(f"upload {self.file_id!r} was aborted while closing")

    async def _abort_after(self, exc: BaseException) -> None:
        """Abort because of ``exc``; a cleanup failure becomes a note on ``exc``."""
        try:
            await self.abort()
        except Exception as cleanup_exc:
            add_note(
                exc,
                f"aborting upload {self.file_id!r} failed too ({cleanup_exc!r}); what it "
                f"wrote stays in {self._left_in} until the orphan sweep",
            )


async def upload_all(stream: UploadLifecycle, pieces: AsyncIterator[Any]) -> dict[str, Any]:
    """Write every piece to ``stream`` and close it; abort it if anything fails.

    Cancellation included: the pieces written are removed and the exception
    propagates. ``pieces`` is closed either way.
    """
    try:
        async for piece in pieces:
            await stream.write(piece)
        return await stream.close()
    except BaseException as exc:
        await stream._abort_after(exc)
        raise
    finally:
        closer = getattr(pieces, "aclose", None)
        if closer is not None:
            await closer()
