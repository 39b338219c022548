"""The one read path: plain, compressed or verified, whole or a byte range.

``read``, ``stream``, ``readchunk`` and ``verify`` of the file proxy, the command
line and :func:`~asyncassets.check` all read stored bytes through this module, so
what "the bytes of a file" means (decompressed, checked against the recorded
checksum, only the requested range fetched) is decided in one place.

Files written by others without a ``sha256`` are checked against their GridFS
``md5`` when they have one; with neither, :func:`verify_file` raises
:class:`~asyncassets.errors.ChecksumMissing`.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any

from ..errors import ChecksumMissing, CorruptFile, IntegrityError
from .catalogue import (
    compression_of,
    describe,
    expected_digest,
    new_hasher,
    original_length,
)
from .codec import CODECS, GzipError, inflate

if TYPE_CHECKING:
    from .base import Store

__all__ = ["iter_original", "read_original", "verify_file"]


def _describe(bucket: Store, doc: Mapping[str, Any]) -> str:
    return describe(doc, bucket.name)


def _mismatch(bucket: Store, doc: Mapping[str, Any], what: str) -> IntegrityError:
    exc = IntegrityError(
        f"{_describe(bucket, doc)} failed verification: {what}. Its bytes changed "
        "after upload; restore it from a backup or upload it again."
    )
    exc.file_id = doc.get("_id")  # type: ignore[attr-defined]
    return exc


def _nothing_to_check(bucket: Store, doc: Mapping[str, Any]) -> ChecksumMissing:
    exc = ChecksumMissing(
        f"{_describe(bucket, doc)} has no recorded checksum (no metadata.sha256 and no "
        "md5): it was written by another tool or an older version, so there is "
        "nothing to verify it against. Upload it again to record one."
    )
    exc.file_id = doc.get("_id")  # type: ignore[attr-defined]
    return exc


async def _stored_pieces(bucket: Store, doc: Mapping[str, Any]) -> AsyncGenerator[bytes, None]:
    async with bucket.open_download(doc) as download:
        async for piece in download:
            yield piece


async def _inflate(
    bucket: Store, doc: Mapping[str, Any], pieces: AsyncIterator[bytes]
) -> AsyncGenerator[bytes, None]:
    inflated = inflate(pieces)
    try:
        async for piece in inflated:
            yield piece
    except GzipError as exc:
        raise _mismatch(bucket, doc, str(exc)) from exc
    finally:
        await inflated.aclose()  # type: ignore[attr-defined]


async def iter_original(
    bucket: Store,
    doc: Mapping[str, Any],
    start: int = 0,
    end: int | None = None,
    *,
    verify: bool = False,
) -> AsyncGenerator[bytes, None]:
    """Yield the original bytes ``[start, end)`` of a file: decompressed, checked.

    With ``verify``, every byte of the file is hashed as it passes and
    :class:`~asyncassets.errors.IntegrityError` is raised after the last piece if
    the digest differs from the recorded one; a range read then reads the whole
    file (the digest covers all of it) but yields only the range. A compressed
    file is always decompressed from its first byte.

    :raises ValueError: the range is outside the file.
    :raises ChecksumMissing: ``verify`` on a file without a recorded checksum.
    :raises IntegrityError: the bytes do not match (or, compressed, do not inflate);
        with ``verify``, also stored bytes that are not the upload's (missing
        chunks, an object replaced under its key).
    :raises FileDeletedWhileReading: the file was deleted or replaced while it was
        read (chunks went missing and its files document is gone or another one).
    :raises CorruptFile: chunks are missing or of the wrong size, and the files
        document is unchanged.
    """
    info = compression_of(doc)
    if info is not None and info.get("codec") not in CODECS:
        raise CorruptFile(
            f"{_describe(bucket, doc)} is compressed with the codec {info.get('codec')!r}, "
            f"which this version cannot read (it reads {', '.join(CODECS)}); it was "
            "written by another tool or a newer version"
        )
    length = original_length(doc)
    end = length if end is None else end
    if not 0 <= start <= end <= length:
        raise ValueError(
            f"invalid range start={start}, end={end} for {_describe(bucket, doc)} of "
            f"{length} bytes: need 0 <= start <= end <= {length}"
        )
    expected: tuple[str, str] | None = None
    if verify:
        if info:
            if info.get("sha256"):
                expected = ("sha256", str(info["sha256"]))
        else:
            expected = expected_digest(doc)
        if expected is None:
            raise _nothing_to_check(bucket, doc)
    if info is None and expected is None:
        # Plain file, no check: a ranged read fetches only the chunks it needs.
        async with bucket.open_download(doc, start=start, end=end) as download:
            async for piece in download:
                yield piece
        return
    hasher = new_hasher(expected[0]) if expected else None
    pieces = _stored_pieces(bucket, doc)
    source: AsyncGenerator[bytes, None] = _inflate(bucket, doc, pieces) if info else pieces
    pos = 0
    try:
        async for piece in source:
            if hasher is not None:
                hasher.update(piece)
            lo, hi = pos, pos + len(piece)
            pos = hi
            if hi > start and lo < end:
                yield piece[max(start - lo, 0) : min(end, hi) - lo]
            elif lo >= end and hasher is None:
                break  # past the range and nothing left to check
    except CorruptFile as exc:
        if hasher is None or isinstance(exc, IntegrityError):
            raise
        # Verifying: stored bytes that are not the upload's (missing chunks, an
        # object replaced under its key) fail verification, as verify_file says.
        raise _mismatch(bucket, doc, str(exc)) from exc
    finally:
        await source.aclose()
        if source is not pieces:
            await pieces.aclose()
    if hasher is None:
        return
    if info and pos != length:
        raise _mismatch(bucket, doc, f"it inflates to {pos} bytes, not the {length} recorded")
    assert expected is not None
    if hasher.hexdigest() != expected[1]:
        raise _mismatch(
            bucket,
            doc,
            f"the {expected[0]} of its bytes is {hasher.hexdigest()}, recorded {expected[1]}",
        )


async def read_original(
    bucket: Store,
    doc: Mapping[str, Any],
    start: int = 0,
    end: int | None = None,
    *,
    verify: bool = False,
) -> bytes:
    """The original bytes ``[start, end)`` of a file.

    :raises: as :func:`iter_original`.
    """
    return b"".join([p async for p in iter_original(bucket, doc, start, end, verify=verify)])


async def verify_file(bucket: Store, doc: Mapping[str, Any]) -> bool:
    """Re-read a stored file and check it against its recorded checksums.

    Checks the stored bytes against ``metadata.sha256`` (or the legacy ``md5``);
    for a compressed file also that they inflate to the recorded original length
    and SHA-256.

    :returns: ``True``.
    :raises ChecksumMissing: nothing was recorded to check against.
    :raises IntegrityError: the bytes, or the chunks' layout, do not match.
    :raises FileDeletedWhileReading: the file was deleted or replaced while it was
        checked; that says nothing about its integrity.
    """
    stored = expected_digest(doc)
    info = compression_of(doc)
    if stored is None and not (info and info.get("sha256")):
        raise _nothing_to_check(bucket, doc)
    try:
        if stored is not None:
            hasher = new_hasher(stored[0])
            async for piece in _stored_pieces(bucket, doc):
                hasher.update(piece)
            if hasher.hexdigest() != stored[1]:
                raise _mismatch(
                    bucket,
                    doc,
                    f"the {stored[0]} of its stored bytes is {hasher.hexdigest()}, "
                    f"recorded {stored[1]}",
                )
        if info and info.get("sha256"):
            async for _piece in iter_original(bucket, doc, verify=True):
                pass
    except CorruptFile as exc:
        raise _mismatch(bucket, doc, str(exc)) from exc
    return True
