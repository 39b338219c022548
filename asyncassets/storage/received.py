"""The bytes one write of a resumable upload receives, as every kind of session
takes them (:mod:`.resumable`: staged or in a GridFS bucket; a directory's temp
file; :mod:`.objects.resumable_s3`: an S3 multipart upload)."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from ..errors import UploadChecksumMismatch, UploadTooLarge

__all__ = ["Received"]


class Received:
    """The pieces of one write, as byte views: counted against the upload's
    ``length`` (:class:`~asyncassets.errors.UploadTooLarge` past it) and fed to
    the write's ``checksum`` when it has one.

    A source that fails midway (a dropped connection) ends the iteration, its
    error kept in :attr:`failure`, so the writer keeps what came; unless the
    write is checked whole (``checksum``): then the error is raised, and nothing
    of the write is to be kept.

    :param dropped: awaited before that error is raised (to remove what the
        write put down so far).
    :ivar position: the upload's offset after the bytes received so far.
    :ivar failure: the source's error, if it failed midway (not raised).
    """

    def __init__(
        self,
        pieces: AsyncIterator[Any],
        *,
        upload_id: str,
        position: int,
        length: int,
        checksum: tuple[str, bytes] | None,
        dropped: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.position = position
        self._dropped = dropped
        self.failure: BaseException | None = None
        self._pieces = pieces
        self._upload_id = upload_id
        self._length = length
        self._checksum = checksum
        self._hasher = hashlib.new(checksum[0]) if checksum is not None else None

    @property
    def checked(self) -> bool:
        """Whether the write is checked whole (nothing kept unless it matches)."""
        return self._checksum is not None

    async def __aiter__(self) -> AsyncIterator[memoryview]:
        iterator = self._pieces.__aiter__()
        while True:
            try:
                piece = await iterator.__anext__()
            except StopAsyncIteration:
                return
            except Exception as exc:
                if self._hasher is not None:
                    # To be checked whole: nothing of it is kept.
                    if self._dropped is not None:
                        await self._dropped()
                    raise
                self.failure = exc  # a dropped connection: what came is kept
                return
            view = memoryview(piece).cast("B")
            if self.position + len(view) > self._length:
                raise UploadTooLarge(
                    f"upload {self._upload_id} is {self._length} bytes long; this write "
                    "goes past its end",
                    upload_id=self._upload_id,
                )
            self.position += len(view)
            if self._hasher is not None:
                self._hasher.update(view)
            yield view

    def verify(self) -> None:
        """Once every piece is in: raise if they do not match the write's checksum.

        :raises UploadChecksumMismatch: they do not.
        """
        if self._hasher is None or self._checksum is None:
            return
        if self._hasher.digest() != self._checksum[1]:
            raise UploadChecksumMismatch(
                f"the bytes sent to upload {self._upload_id} do not match their "
                f"{self._checksum[0]}; nothing of them was kept: send them again",
                upload_id=self._upload_id,
            )
