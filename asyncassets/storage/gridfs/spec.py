"""What the GridFS spec fixes: chunk size, indexes, and how files documents are typed."""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Any

__all__ = [
    "CHUNKS_INDEX",
    "DEFAULT_BUFFER_SIZE",
    "DEFAULT_CHUNK_SIZE",
    "DUPLICATE_KEY_CODES",
    "FILES_INDEX",
    "as_int",
    "check_extra",
    "is_int",
    "now_as_stored",
]

DEFAULT_CHUNK_SIZE = 255 * 1024
"""The spec's default chunk size: 255 KiB, so a chunk document stays under 256 KiB."""

DEFAULT_BUFFER_SIZE = 4 * 1024 * 1024
"""How many bytes of file data one upload or download stream may hold in memory."""

FILES_INDEX = {"filename": 1, "uploadDate": 1}
CHUNKS_INDEX = {"files_id": 1, "n": 1}
DUPLICATE_KEY_CODES = frozenset({11000, 11001, 12582})


def now_as_stored(collection: Any) -> datetime.datetime:
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


def as_int(value: Any) -> int | None:
    """``value`` as an int if it is one (shell-written files may use doubles), else None."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value if is_int(value) else None


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


#: Top-level keys an upload writes itself; ``extra`` fields may not replace them.
_ENTRY_KEYS = frozenset(
    {"_id", "length", "chunkSize", "uploadDate", "filename", "metadata", "md5", "location"}
)


def check_extra(extra: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``extra`` top-level fields of an upload's entry, checked (a new dict).

    :raises TypeError: ``extra`` is not a mapping of str keys.
    :raises ValueError: it names a key the upload writes itself.
    """
    if extra is None:
        return {}
    if not isinstance(extra, Mapping):
        raise TypeError(f"extra must be a dict, not {type(extra).__name__}")
    for key in extra:
        if not isinstance(key, str) or not key or key.startswith("$") or "." in key:
            raise TypeError(f"extra keys must be field names, not {key!r}")
        if key in _ENTRY_KEYS:
            raise ValueError(f"extra may not set {key!r}: the upload writes it itself")
    return dict(extra)
