"""Reading what one response sends: its ranges in one pass, of one version.

A ``multipart/byteranges`` response used to open one storage read per part.
That cost a pass over a compressed file per part (gzip cannot seek: each read
inflated from the start), and nothing tied the second part's read to the
version the first came from. :class:`RangeReader` reads all the ranges of a
response in order:

* ranges closer than a gap (``GAP``, 1 MiB, or a GridFS chunk if larger) share
  one storage read, which skips the bytes between them; farther ones get a read
  of their own, which starts past the previous one, so no stored byte is read
  twice;
* a compressed file is inflated once, from its start to the last range's end;
* :func:`same_version` tells whether a catalogue entry still names the bytes a
  response began with, for the stores whose reads do not check that themselves;
* :func:`refused_read` tells, without I/O, whether a read through an entry would
  be refused for the entry itself, so that ``HEAD`` answers what ``GET`` would.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from typing import Any

from ..errors import CorruptFile
from ..storage import Store
from ..storage.catalogue import compression_of, content_version, describe
from ..storage.codec import CODECS
from ..storage.read import iter_original
from .http import ByteRange

__all__ = ["GAP", "RangeReader", "refused_read", "same_version", "verifies_reads"]

#: Ranges closer than this share one storage read (the bytes between are read
#: and dropped): cheaper than a new query or request, and still one pass.
GAP = 1024 * 1024


def verifies_reads(store: Store) -> bool:
    """Whether every read through a catalogue entry of ``store`` returns that entry's bytes.

    True for the object stores (a directory, S3), whose entries name bytes under
    a key never reused and whose reads raise when it holds other bytes. Not for
    GridFS, whose chunks say nothing of the upload that wrote them (a file
    deleted and uploaded again under the same ``_id`` has chunks of the same
    numbers and sizes), nor for a queued storage.
    """
    return bool(getattr(store, "reuses_entries", False))


def _when(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(dt.timezone.utc).replace(tzinfo=None)
        return value.replace(microsecond=value.microsecond // 1000 * 1000)
    return value


def _identity(doc: Mapping[str, Any]) -> tuple[Any, ...]:
    # What tells one upload under an _id from another: its content version (the
    # SHA-256, or the stand-in of legacy files), its layout and its upload time.
    if not isinstance(doc.get("metadata", {}), Mapping):
        doc = {key: value for key, value in doc.items() if key != "metadata"}
    try:
        version: Any = content_version(doc)
    except (KeyError, TypeError, ValueError, OverflowError):
        version = None  # an entry that cannot be read: compared by what it holds
    return (
        version,
        doc.get("length"),
        doc.get("chunkSize"),
        _when(doc.get("uploadDate")),
    )


async def refused_read(store: Store, doc: Mapping[str, Any]) -> CorruptFile | None:
    """The error a read through ``doc`` fails with before any I/O, or ``None``.

    Asks the store itself: its download of an empty range is made (which checks
    the entry as every read does) and closed unread. Refused, with
    :class:`~asyncassets.errors.CorruptFile`, are an entry of a compression codec
    asyncassets cannot read (``metadata.compression.codec`` other than ``gzip``),
    and what the store checks: for GridFS a ``chunkSize`` missing, not a whole
    number, or not positive; for a directory or S3 a ``location`` that is not a
    document, or has no string ``key``; for a queued storage an entry naming
    neither copy. Damage only reading finds (missing chunks, a missing object,
    bytes that are not the upload's) is not found here.

    :param doc: an entry :func:`~asyncassets.web.response.served_entry` accepts
        (a mapping with an ``_id`` and a valid length).
    """
    info = compression_of(doc)
    if info is not None and info.get("codec") not in CODECS:
        return CorruptFile(
            f"{describe(doc, store.name)} is compressed with {info.get('codec')!r}, which "
            f"asyncassets cannot read (it reads {', '.join(CODECS)})"
        )
    try:
        download = store.open_download(doc, start=0, end=0)
    except CorruptFile as exc:
        return exc
    await download.aclose()
    return None


async def same_version(store: Store, doc: Mapping[str, Any]) -> bool:
    """Whether the catalogue entry of ``doc``'s file is still the upload ``doc`` describes.

    One ``find``. An entry whose file was deleted, or replaced by another upload
    under the same ``_id`` (even of the same bytes: another upload time), is not.
    """
    current = await store.find(doc.get("_id"))
    return current is not None and _identity(current) == _identity(doc)


class RangeReader:
    """The bytes of ``ranges`` of a stored file, in order, in one pass.

    Iterate it for ``(index of the range, bytes)`` pairs: each range's bytes
    come whole and in order, every range after the one before. Closing it
    (``aclose()``, or reaching the end) closes the storage read in progress.

    :param store: the file's store.
    :param doc: the file's catalogue entry.
    :param ranges: ascending, disjoint ranges of the original bytes; one empty
        range ``[0, 0)`` reads nothing (and lets the store check the file exists).
    :param gap: ranges at most this far apart share one storage read.
    :ivar reads: how many storage reads were opened so far.
    :ivar read_bytes: how many original bytes were read so far (ranges and gaps).
    """

    def __init__(
        self,
        store: Store,
        doc: Mapping[str, Any],
        ranges: Sequence[ByteRange],
        *,
        gap: int = GAP,
    ) -> None:
        self.store = store
        self.doc = doc
        self.ranges = list(ranges)
        self.reads = 0
        self.read_bytes = 0
        if compression_of(doc):
            gap = -1  # one inflation from the start serves every range
        else:
            chunk = doc.get("chunkSize")
            if isinstance(chunk, int) and not isinstance(chunk, bool) and chunk > gap:
                gap = chunk  # a new read must start in a chunk the last one did not read
        self._runs = _runs(self.ranges, gap)
        self._generator = self._pieces()

    def __aiter__(self) -> AsyncIterator[tuple[int, bytes]]:
        return self

    async def __anext__(self) -> tuple[int, bytes]:
        return await anext(self._generator)

    async def aclose(self) -> None:
        """Stop reading; idempotent."""
        await self._generator.aclose()

    async def _pieces(self) -> AsyncGenerator[tuple[int, bytes], None]:
        for first, last in self._runs:
            start, end = self.ranges[first].start, self.ranges[last].end
            self.reads += 1
            reader = iter_original(self.store, self.doc, start, end)
            index = first
            position = start
            try:
                async for piece in reader:
                    low, high = position, position + len(piece)
                    position = high
                    self.read_bytes += len(piece)
                    while index <= last:
                        part = self.ranges[index]
                        if part.start >= high:
                            break  # in a later piece
                        begin, stop = max(part.start, low) - low, min(part.end, high) - low
                        if begin == 0 and stop == len(piece):
                            yield index, piece
                        elif stop > begin:
                            yield index, piece[begin:stop]
                        if part.end > high:
                            break  # the range goes on in the next piece
                        index += 1
            finally:
                await reader.aclose()


def _runs(ranges: Sequence[ByteRange], gap: int) -> list[tuple[int, int]]:
    """``(first, last)`` indexes of the ranges each storage read serves.

    ``gap < 0``: one read for all of them.
    """
    runs: list[tuple[int, int]] = []
    for index, part in enumerate(ranges):
        if runs and (gap < 0 or part.start - ranges[runs[-1][1]].end <= gap):
            runs[-1] = (runs[-1][0], index)
        else:
            runs.append((index, index))
    return runs
