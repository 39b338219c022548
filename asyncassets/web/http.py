"""HTTP's rules for serving a file: Range, conditional requests, validators (no I/O).

Pure functions of header values, so every hostile or odd header can be tested
without a server. :class:`~asyncassets.web.FileResponse` applies them in RFC 9110's
order (section 13.2.2):

1. ``If-Match`` (strong comparison), else ``If-Unmodified-Since``: 412 when false;
2. ``If-None-Match`` (weak comparison), else ``If-Modified-Since``: 304 for GET
   and HEAD when false;
3. ``If-Range`` (a strong ETag, or the exact Last-Modified date): the ``Range``
   is honoured only when it matches;
4. ``Range`` (GET only).

How ``Range`` is read, where RFC 9110 leaves the server a choice:

* a header that is not a valid ``bytes=`` ranges-specifier (garbage, another
  unit, an inverted range ``500-100``, an empty list) is ignored: 200 with the
  whole file, as the RFC allows and nginx does;
* ranges that start past the end are dropped; when none is left, 416 with
  ``Content-Range: bytes */<length>``;
* ranges that overlap or touch are coalesced into one, and the parts come in
  ascending order, so a response never carries more bytes than the file;
* more than ``max_ranges`` ranges left after that: the Range is ignored (200,
  whole file), the answer the RFC suggests to a client that asks for many small
  pieces;
* numbers of any length are accepted: a last position past the end is clamped,
  a first position past it is unsatisfiable.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from email.utils import format_datetime, parsedate_to_datetime

__all__ = [
    "ByteRange",
    "Unsatisfiable",
    "etag_matches",
    "http_date",
    "parse_http_date",
    "parse_range",
]

#: Digits beyond this many stand for "more than any file": never parsed as an int.
_MAX_DIGITS = 20
_HUGE = 10**_MAX_DIGITS
_SPEC = re.compile(r"^[ \t]*([0-9]*)[ \t]*-[ \t]*([0-9]*)[ \t]*$")
_ETAG = re.compile(r'\s*(W/)?("[^"]*")\s*(?:,|$)')


@dataclass(frozen=True)
class ByteRange:
    """Bytes ``[start, end)`` of a file (``end`` exclusive, unlike HTTP's last-pos)."""

    start: int
    end: int

    def content_range(self, length: int) -> str:
        """The ``Content-Range`` value for this range of a file of ``length`` bytes."""
        return f"bytes {self.start}-{self.end - 1}/{length}"

    def __len__(self) -> int:
        return self.end - self.start


class Unsatisfiable(Exception):
    """No range of a valid ``Range`` header overlaps the file: answer 416."""


def _number(digits: str) -> int:
    return int(digits) if len(digits) <= _MAX_DIGITS else _HUGE


def parse_range(header: str | None, length: int, max_ranges: int) -> list[ByteRange] | None:
    """The ranges to send for a ``Range`` header, or ``None`` to send the whole file.

    :param header: the ``Range`` header's value (``None``: absent).
    :param length: the file's length.
    :param max_ranges: most ranges answered (after coalescing); more: whole file.
    :returns: one or more ranges, ascending and disjoint; ``None`` when the header is
        absent, invalid, or asks for too many ranges.
    :raises Unsatisfiable: the header is valid and no range overlaps the file.
    """
    if header is None:
        return None
    unit, sep, specs = header.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return None
    elements = [spec for spec in specs.split(",") if spec.strip()]  # empty ones are allowed
    if not elements:
        return None
    wanted: list[tuple[int, int]] = []
    for spec in elements:
        match = _SPEC.match(spec)
        if match is None:
            return None
        first, last = match.groups()
        if first:
            start = _number(first)
            if last:
                if _number(last) < start:
                    return None  # an invalid byte-range-spec invalidates the header
                end = min(_number(last) + 1, length)
            else:
                end = length
            if start < length:
                wanted.append((start, end))
        elif last:
            suffix = _number(last)
            if suffix > 0 and length > 0:
                wanted.append((max(0, length - suffix), length))
        else:
            return None  # "-" alone
    if not wanted:
        raise Unsatisfiable(length)
    wanted.sort()
    merged: list[list[int]] = []
    for start, end in wanted:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    if len(merged) > max_ranges:
        return None
    return [ByteRange(start, end) for start, end in merged]


def _tags(header: str) -> list[tuple[bool, str]] | None:
    """``(weak, opaque tag)`` of each entity tag in a list header; ``None``: ``*``."""
    if header.strip() == "*":
        return None
    found = []
    position = 0
    while position < len(header):
        match = _ETAG.match(header, position)
        if match is None:
            break  # the rest is not an entity tag: what came before still counts
        found.append((bool(match.group(1)), match.group(2)))
        position = match.end()
    return found


def etag_matches(header: str, etag: str, *, weak: bool) -> bool:
    """Whether an ``If-Match`` / ``If-None-Match`` list matches ``etag``.

    :param weak: weak comparison (``If-None-Match``): ``W/"x"`` matches ``"x"``.
        Strong comparison (``If-Match``, ``If-Range``): only two strong, equal tags
        match.
    """
    tags = _tags(header)
    if tags is None:
        return True
    mine_weak = etag.startswith("W/")
    mine = etag[2:] if mine_weak else etag
    for their_weak, tag in tags:
        if tag != mine:
            continue
        if weak or not (their_weak or mine_weak):
            return True
    return False


def parse_http_date(value: str | None) -> dt.datetime | None:
    """An HTTP date header as an aware UTC datetime; ``None`` if absent or invalid."""
    if not value:
        return None
    try:
        parsed = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if parsed is None:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.timezone.utc)
    return parsed


def http_date(when: dt.datetime) -> str:
    """``when`` (naive means UTC) as an HTTP date, to the second."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return format_datetime(when.astimezone(dt.timezone.utc).replace(microsecond=0), usegmt=True)
