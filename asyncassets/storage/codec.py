"""The one compression codec: gzip, written and read in bounded memory.

A compressed file's stored bytes are one gzip member (``wbits=31``), so ``gunzip``
reads what any GridFS driver returns for it.
"""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterator
from typing import Any

__all__ = ["CODECS", "GzipError", "compressor", "inflate"]

#: The codecs a field's ``compress=`` accepts.
CODECS = ("gzip",)

#: Decompressed output is produced in pieces of at most this size, so a small
#: stored file that inflates to gigabytes never sits in memory whole.
OUT_PIECE = 1024 * 1024


class GzipError(ValueError):
    """The stored bytes are not one complete gzip member (the read path reports it)."""


def compressor() -> Any:
    """A new gzip compressor (``zlib.compressobj`` writing one gzip member)."""
    return zlib.compressobj(6, zlib.DEFLATED, 31)


async def inflate(pieces: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Decompress one gzip member arriving in ``pieces``, yielding bounded pieces.

    :raises GzipError: the data does not decompress, is truncated, or has bytes
        after the member.
    """
    decompressor = zlib.decompressobj(31)
    try:
        async for piece in pieces:
            data = piece
            while data:
                out = decompressor.decompress(data, OUT_PIECE)
                data = decompressor.unconsumed_tail
                if out:
                    yield out
        out = decompressor.flush()
    except zlib.error as exc:
        raise GzipError(f"its gzip data cannot be decompressed ({exc})") from exc
    if out:
        yield out
    if not decompressor.eof or decompressor.unused_data:
        raise GzipError("its gzip data is truncated or followed by extra bytes")
