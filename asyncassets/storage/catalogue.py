"""The catalogue entry: what a files document says about its file.

MongoDB's files collection is the catalogue of every stored file: one document per
file, in the GridFS spec's layout (``_id``, ``length``, ``chunkSize``,
``uploadDate``, ``filename``, ``metadata``), plus what asyncassets records in
``metadata``:

``sha256``
    the SHA-256 (hex) of the bytes as stored, computed while the upload streams.
``compression`` (only for files of a ``compress="gzip"`` field)
    ``{"codec": "gzip", "length": <original length>, "sha256": <original SHA-256>}``.
    The stored bytes are then one gzip member and ``length`` is its size, so the
    document stays valid for every GridFS driver; :func:`original_length` and
    :func:`original_sha256` describe the original bytes.
``content_type``
    and the user's own keys.

Every reader of files documents (the proxy, the read path, the command line, the
check) asks this module, so the answers cannot drift apart.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = [
    "INTERNAL_KEYS",
    "SPEC_KEYS",
    "compression_of",
    "content_type_of",
    "content_version",
    "describe",
    "expected_digest",
    "new_hasher",
    "original_length",
    "original_sha256",
    "read_range",
    "user_metadata",
]

#: Keys of a files document that the GridFS spec defines (and ``location``, which
#: an object storage's entries add); anything else at the top level was written by
#: mongoengine / mongomotor 0.17 as file metadata.
SPEC_KEYS = frozenset(
    {
        "_id",
        "length",
        "chunkSize",
        "uploadDate",
        "filename",
        "metadata",
        "md5",
        "aliases",
        "contentType",
        # Where an object storage keeps the bytes (asyncassets.storage.objects).
        "location",
        # A queued storage's copies and transfer (asyncassets.storage.queued).
        "local",
        "remote",
        "transfer",
    }
)

#: Metadata keys asyncassets keeps for itself; exposed as attributes, not in metadata.
INTERNAL_KEYS = frozenset({"sha256", "sha256_parts", "compression"})


def compression_of(doc: Mapping[str, Any]) -> dict[str, Any] | None:
    """The ``metadata.compression`` of a files document, or ``None``."""
    info = (doc.get("metadata") or {}).get("compression")
    return info if isinstance(info, dict) and info.get("codec") else None


def original_length(doc: Mapping[str, Any]) -> int:
    """The length of the original bytes (before compression)."""
    info = compression_of(doc)
    return int(info["length"]) if info else int(doc["length"])


def original_sha256(doc: Mapping[str, Any]) -> str | None:
    """The SHA-256 of the original bytes, or ``None`` when none was recorded."""
    info = compression_of(doc)
    value = info.get("sha256") if info else (doc.get("metadata") or {}).get("sha256")
    return None if value is None else str(value)


def expected_digest(doc: Mapping[str, Any]) -> tuple[str, str] | None:
    """``(algorithm, hex digest)`` to check the stored bytes against, or ``None``.

    The recorded ``metadata.sha256``; else, for a file uploaded straight to S3 in
    parts, ``metadata.sha256_parts`` (the SHA-256 of the parts' SHA-256 digests, see
    :mod:`asyncassets.storage.objects.direct`); else the GridFS ``md5`` that older
    drivers, mongoengine and mongomotor wrote. :func:`new_hasher` makes the hasher
    of the algorithm named.
    """
    meta = doc.get("metadata") or {}
    if meta.get("sha256"):
        return "sha256", str(meta["sha256"])
    parts = meta.get("sha256_parts")
    if isinstance(parts, Mapping) and parts.get("sha256") and _as_int(parts.get("part_size")):
        return f"{PARTS_ALGORITHM}{_as_int(parts['part_size'])}", str(parts["sha256"])
    if doc.get("md5") and not compression_of(doc):
        return "md5", str(doc["md5"])
    return None


#: The algorithm name of a parts digest, followed by the part size.
PARTS_ALGORITHM = "sha256-parts:"


class _PartsHasher:
    """S3's composite SHA-256: the SHA-256 of the SHA-256 of each ``part_size`` bytes."""

    def __init__(self, part_size: int) -> None:
        self._part_size = part_size
        self._part = hashlib.sha256()
        self._filled = 0
        self._digests = hashlib.sha256()
        self._any = False

    def update(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            room = self._part_size - self._filled
            self._part.update(view[:room])
            self._filled += len(view[:room])
            self._any = True
            view = view[room:]
            if self._filled == self._part_size:
                self._digests.update(self._part.digest())
                self._part, self._filled, self._any = hashlib.sha256(), 0, False

    def hexdigest(self) -> str:
        digests = self._digests.copy()
        if self._any:
            digests.update(self._part.digest())
        return digests.hexdigest()


def new_hasher(algorithm: str) -> Any:
    """A hasher (``update``, ``hexdigest``) for an algorithm :func:`expected_digest` names."""
    if algorithm.startswith(PARTS_ALGORITHM):
        return _PartsHasher(int(algorithm[len(PARTS_ALGORITHM):]))
    return hashlib.new(algorithm)


def content_type_of(doc: Mapping[str, Any]) -> str | None:
    """The MIME type recorded for the file, wherever a writer put it.

    asyncassets writes ``metadata.content_type``; PyMongo's legacy API and
    mongoengine wrote a top-level ``contentType``; some tools ``metadata.contentType``.
    """
    meta = doc.get("metadata") or {}
    for value in (
        meta.get("content_type"),
        meta.get("contentType"),
        doc.get("contentType"),
        doc.get("content_type"),
    ):
        if value is not None:
            return str(value)
    return None


def user_metadata(doc: Mapping[str, Any]) -> dict[str, Any]:
    """The user's metadata (``content_type`` and the extra keywords), as a new dict."""
    merged = {k: v for k, v in doc.items() if k not in SPEC_KEYS}
    merged.update(doc.get("metadata") or {})
    for key in INTERNAL_KEYS:
        merged.pop(key, None)
    merged.pop("contentType", None)
    content_type = content_type_of(doc)
    if content_type is not None:
        merged["content_type"] = content_type
    else:
        merged.pop("content_type", None)
    return merged


def describe(doc: Mapping[str, Any], bucket: str) -> str:
    """``file <id> ('name') in bucket 'fs'``: how messages name a file."""
    name = doc.get("filename")
    named = f" ({name!r})" if name else ""
    return f"file {doc.get('_id')!r}{named} in bucket {bucket!r}"


def content_version(doc: Mapping[str, Any]) -> tuple[str, bool]:
    """``(hex digest, strong)``: what tells this version of a file's bytes from any other.

    The SHA-256 of the original bytes when one was recorded (``strong``: equal
    digests mean equal bytes). A legacy file without one gets a stable stand-in,
    the SHA-256 of its id, length, upload time and ``md5``, which changes whenever
    another upload takes the id; it is not ``strong``, as it does not come from
    the bytes themselves. HTTP ETags and signed URLs (which a replaced file must
    revoke) both use this, so they cannot disagree.
    """
    sha = original_sha256(doc)
    if sha:
        return sha.lower(), True
    uploaded = doc.get("uploadDate")
    if isinstance(uploaded, dt.datetime):
        if uploaded.tzinfo is None:
            uploaded = uploaded.replace(tzinfo=dt.timezone.utc)
        when = str(int(uploaded.timestamp() * 1000))
    else:
        when = repr(uploaded)
    parts = (repr(doc.get("_id")), str(original_length(doc)), when, str(doc.get("md5") or ""))
    return hashlib.sha256("\0".join(parts).encode()).hexdigest(), False


def _as_int(value: Any) -> int | None:
    # Shell-written files may store lengths as doubles.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def read_range(
    doc: Any,
    start: Any,
    end: Any,
    corrupt: Callable[[str], Exception],
) -> tuple[int, int, int]:
    """``(length, start, end)`` for a read of the stored bytes ``[start, end)`` of ``doc``.

    The one check every store's reader makes before it reads: ``doc`` is a
    catalogue entry with an ``_id`` and a valid ``length`` (else ``corrupt(what)``
    is raised), ``end`` defaults to the length, and the range lies in the file.

    :raises TypeError: ``doc`` is not a mapping, or ``start``/``end`` not ints.
    :raises ValueError: unless ``0 <= start <= end <= length``.
    """
    if not isinstance(doc, Mapping):
        raise TypeError(
            "open_download() takes the file's files document (its catalogue entry, a "
            f"dict from find(file_id)), not {type(doc).__name__}"
        )
    length = _as_int(doc.get("length"))
    if "_id" not in doc or length is None or length < 0:
        raise corrupt(f"its catalogue entry has no valid length: {doc.get('length')!r}")
    end = length if end is None else end
    for name, value in (("start", start), ("end", end)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not 0 <= start <= end <= length:
        raise ValueError(
            f"invalid range start={start}, end={end} for file {doc.get('_id')!r} of "
            f"{length} bytes: need 0 <= start <= end <= {length}"
        )
    return length, int(start), int(end)
