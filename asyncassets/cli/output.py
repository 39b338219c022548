"""What the command shows: JSON, file summaries, progress bars, notes and one-line errors.

Results go to stdout; notes, progress bars and errors to stderr. A URI is shown
only through :func:`~asyncassets.cli.uris.describe_uri` (hosts, ports and
database), so no password is printed. Human-readable output shows stored text
(file names, ids, content types) through :func:`printable`, so a name cannot
move the cursor, clear the screen or fake a row; ``--json`` output is exact.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import sys
from collections.abc import Mapping
from typing import IO, Any

from bson import ObjectId
from pymongo.errors import ConnectionFailure, OperationFailure, PyMongoError

from ..assets import ASSET_FIELDS
from ..errors import AsyncAssetsError, CLIError, EmbeddedServerError
from ..storage.catalogue import (
    compression_of,
    content_type_of,
    original_length,
    original_sha256,
    user_metadata,
)
from ..storage.objects.store import location_key
from .uris import describe_uri

__all__ = [
    "PROGRESS_THRESHOLD",
    "CountingReader",
    "Progress",
    "file_summary",
    "first_line",
    "jsonable",
    "note",
    "one_line",
    "print_json",
    "printable",
    "report_dict",
    "show_id",
    "size_of",
]

#: Transfers larger than this get a progress bar (on a terminal, with tqdm installed).
PROGRESS_THRESHOLD = 4 * 1024 * 1024


def printable(text: str) -> str:
    """``text`` with every character a terminal would act on shown as an escape.

    Control characters (ESC, BEL, newline, C1...), bidi and other format
    characters (``\\u202e`` shows ``gpj.exe`` as ``exe.jpg``), line separators
    and other non-printable characters become ``\\x1b``, ``\\n``, ``\\u202e``...
    as in a Python string literal; anything else is left as it is.
    """
    if text.isprintable():
        return text
    return "".join(
        ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text
    )


def first_line(text: str) -> str:
    """The first line of ``text``."""
    return text.strip().splitlines()[0] if text.strip() else ""


def note(message: str) -> None:
    """Tell the user something on stderr, where it never mixes with the results."""
    print(f"asyncassets: {printable(message)}", file=sys.stderr)


def show_id(value: Any) -> str:
    """A file's ``_id`` as the user types it back (``get ID``, ``rm ID``), escaped."""
    return printable(str(value))


def jsonable(value: Any) -> Any:
    """``value`` with ids as strings, dates in ISO 8601 (UTC), durations in seconds."""
    if isinstance(value, ObjectId):
        return str(value)
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.timezone.utc)
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, bytes):
        return value.hex()
    if hasattr(value, "_asdict"):
        return {k: jsonable(v) for k, v in value._asdict().items()}
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def print_json(value: Any) -> None:
    """Print ``value`` as indented JSON on stdout."""
    print(json.dumps(jsonable(value), indent=2, sort_keys=False))


def report_dict(report: Any) -> dict[str, Any]:
    """A :class:`~asyncassets.ops.CheckReport` or ``SweepReport`` as a dict, with ``ok``."""
    data = {f.name: getattr(report, f.name) for f in dataclasses.fields(report)}
    if hasattr(report, "ok"):
        data["ok"] = report.ok
    return data


def size_of(doc: Mapping[str, Any]) -> int | None:
    """The original length of a file, or ``None`` if its files document has none.

    ``ls`` and ``info`` still show a malformed files document; ``check`` reports it.
    """
    try:
        return original_length(doc)
    except (KeyError, TypeError, ValueError):
        return None


def file_summary(doc: Mapping[str, Any], bucket: str) -> dict[str, Any]:
    """What ``put --json``, ``ls --json`` and ``info`` show about a file.

    ``length`` and ``sha256`` describe the original bytes, those ``get`` writes;
    for a compressed file ``stored_length`` is the size of the gzip member in
    the bucket. A file of a directory or S3 storage also has ``key``: where its
    object is, relative to the storage's root or prefix.
    """
    meta = user_metadata(doc)
    meta.pop("content_type", None)  # shown on its own
    meta.pop("location", None)  # where the bytes are: shown as the key, not metadata
    # An asset's id is shown on its own; the markers of its swaps are not the user's.
    asset_id = meta.get("asset_id")
    for marker in ASSET_FIELDS:
        meta.pop(marker.split(".", 1)[1], None)
    info = compression_of(doc)
    summary: dict[str, Any] = {
        "id": doc["_id"],
        "bucket": bucket,
        "filename": doc.get("filename"),
        "length": size_of(doc),
        "chunk_size": doc.get("chunkSize"),
        "upload_date": doc.get("uploadDate"),
        "content_type": content_type_of(doc),
        "sha256": original_sha256(doc),
        "compression": info["codec"] if info else None,
        "stored_length": doc.get("length"),
        "metadata": meta,
        "asset_id": asset_id,
    }
    key = location_key(doc)
    if key is not None:
        location = doc.get("location") or {}
        summary["storage"] = location.get("storage")
        summary["key"] = key
    return summary


class Progress:
    """A progress bar on stderr, or nothing.

    Shown only when stderr is a terminal, the transfer is over
    :data:`PROGRESS_THRESHOLD` and tqdm is installed; piped output stays clean.
    """

    def __init__(self, total: int | None, label: str) -> None:
        self._bar: Any = None
        if total is None or total <= PROGRESS_THRESHOLD or not _stderr_is_tty():
            return
        try:
            from tqdm import tqdm
        except ImportError:
            return
        self._bar = tqdm(
            total=total, desc=printable(label), unit="B", unit_scale=True, unit_divisor=1024,
            file=sys.stderr, leave=False, dynamic_ncols=True,
        )

    def update(self, amount: int) -> None:
        """Advance the bar by ``amount`` bytes."""
        if self._bar is not None:
            self._bar.update(amount)

    def close(self) -> None:
        """Remove the bar from the terminal."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class CountingReader:
    """A binary file wrapper that reports what is read to a progress bar."""

    def __init__(self, raw: IO[bytes], progress: Progress) -> None:
        self._raw = raw
        self._progress = progress

    def read(self, size: int = -1) -> bytes:
        """Read like ``raw.read``, and advance the bar."""
        data = self._raw.read(size)
        self._progress.update(len(data))
        return data


def one_line(exc: BaseException, uri: str | None) -> str:
    """The one-line message for an error that ended a command, escaped for a terminal.

    The URI appears only as :func:`~asyncassets.cli.uris.describe_uri` shows it,
    also where an exception's text repeats it.
    """
    where = describe_uri(uri) if uri else "the server"
    text = str(exc)
    if uri and "://" in uri:  # a URI-like string, not a few letters found in any message
        text = text.replace(uri, where)
    return printable(_one_line(exc, text, where))


def _one_line(exc: BaseException, text: str, where: str) -> str:
    if isinstance(exc, CLIError):
        return text
    if isinstance(exc, ConnectionFailure):
        reason = text.split(", Timeout:")[0].split(" (configured timeouts")[0]
        return f"cannot reach MongoDB at {where}: {first_line(reason)}"
    if isinstance(exc, OperationFailure) and exc.code in (13, 18):
        return f"not authorised by {where}: {first_line(text)}"
    if isinstance(exc, EmbeddedServerError):
        # The log's last lines follow the first line of the message, when there is a log.
        more = " (--debug shows its log)" if "\n" in text.strip() else ""
        return f"the embedded server failed: {first_line(text)}{more}"
    if isinstance(exc, OSError) and exc.strerror:
        name = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror}{name}"
    if isinstance(exc, (AsyncAssetsError, PyMongoError)):
        return first_line(text)
    return f"{type(exc).__name__}: {first_line(text)} (--debug shows the traceback)"
