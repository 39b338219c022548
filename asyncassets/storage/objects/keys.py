"""Keys of stored objects: made from a template, never taken from a user's filename.

A key is a relative, ``/``-separated path: ``2026/12/3f2c....jpg``. A template
string is formatted with:

``{date}``
    the upload time (UTC ``datetime``; ``{date:%Y/%m}``, ``{date:%Y-%m-%d}``...);
``{uuid}``
    32 random hex digits;
``{id}``
    the file's ``_id`` (its catalogue entry's);
``{ext}``
    the filename's extension, lower case, with its dot (``.jpg``), or nothing;
``{field}``
    the document field's name (``poster``, ``pages.2.image``), or ``file``;
``{filename}``
    the filename, sanitised (letters, digits, ``.``, ``-``, ``_``; at most 100
    characters), or ``file``.

A callable ``(document, filename) -> str`` may be given instead (Django's
``upload_to``); ``document`` is ``None`` outside a document.

Whatever made it, a key is checked: no leading ``/``, no ``.`` or ``..``
segment, no empty segment, no backslash or control character, at most 1,024
bytes of UTF-8. A template that produces a bad key is a ``ValueError`` naming
the template and the key.
"""

from __future__ import annotations

import datetime
import re
import string
import uuid
from collections.abc import Callable, Mapping
from typing import Any, TypeAlias

__all__ = ["DEFAULT_KEY_TEMPLATE", "KeyMaker", "KeyTemplate", "check_key"]

#: The default: a folder per month, a random name, the extension kept.
DEFAULT_KEY_TEMPLATE = "{date:%Y/%m}/{uuid}{ext}"

KeyTemplate: TypeAlias = str | Callable[[Any, Any], str]

_FIELDS = frozenset({"date", "uuid", "id", "ext", "field", "filename"})
#: Fields that make every key different: without one, a taken key is looked for first.
_UNIQUE_FIELDS = frozenset({"uuid", "id"})
_MAX_KEY_BYTES = 1024
#: The file names a template is tried with when it is declared.
_PROBE_NAMES = ("example.txt", None, "README", "x.0123456789abcdef.part")
#: A key segment a directory storage's writer uses for its temp files.
_TEMP_SEGMENT = re.compile(r"\..*\.[0-9a-f]{16}\.part", re.DOTALL)
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_EXT = re.compile(r"^\.[a-z0-9]{1,16}$")


def _sanitise(name: str | None, limit: int = 100) -> str:
    if not name:
        return "file"
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    cleaned = _UNSAFE.sub("_", base).strip("._-")
    return cleaned[:limit] or "file"


def _extension(name: str | None) -> str:
    if not name:
        return ""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    if "." not in base.strip("."):
        return ""
    ext = "." + base.rsplit(".", 1)[-1].lower()
    return ext if _EXT.match(ext) else ""


def check_key(key: Any, origin: str = "key") -> str:
    """Return ``key`` if it is a safe relative key, else raise ``ValueError``."""
    if not isinstance(key, str):
        raise ValueError(f"{origin} must make a str key, not {type(key).__name__}: {key!r}")
    problem = None
    if not key:
        problem = "it is empty"
    elif key.startswith("/"):
        problem = "it starts with '/'"
    elif any(ord(c) < 32 or c in "\\\x7f" for c in key):
        problem = "it contains a backslash or a control character"
    elif any(part in ("", ".", "..") for part in key.split("/")):
        problem = "it has an empty, '.' or '..' segment"
    elif any(_TEMP_SEGMENT.fullmatch(part) for part in key.split("/")):
        problem = "a segment is shaped like a directory writer's temp file (.name.<hex>.part)"
    elif len(key.encode("utf-8", "surrogatepass")) > _MAX_KEY_BYTES:
        problem = f"it is longer than {_MAX_KEY_BYTES} bytes"
    if problem:
        raise ValueError(
            f"{origin} made the key {key!r}, which is not a safe relative key: {problem}. "
            "Keys are '/'-separated relative paths such as '2026/12/abc.jpg'."
        )
    return key


class KeyMaker:
    """Makes the keys of new objects from a template string or a callable.

    :raises ValueError: a template string with an unknown field or bad syntax.
    :raises TypeError: a template that is neither a str nor a callable.
    """

    def __init__(self, template: KeyTemplate = DEFAULT_KEY_TEMPLATE) -> None:
        self.template = template
        if callable(template):
            self.always_unique = False
            return
        if not isinstance(template, str) or not template:
            raise TypeError(
                "key_template must be a template str such as "
                f"{DEFAULT_KEY_TEMPLATE!r} or a callable (document, filename) -> key, "
                f"not {template!r}"
            )
        try:
            names = {name for _, name, _, _ in string.Formatter().parse(template) if name}
        except ValueError as exc:
            raise ValueError(f"key_template {template!r} is not a valid template: {exc}") from exc
        unknown = {n.split(".")[0].split("[")[0] for n in names} - _FIELDS
        if unknown:
            raise ValueError(
                f"key_template {template!r} uses {sorted(unknown)}; the fields are "
                f"{sorted(_FIELDS)}"
            )
        #: Whether every key is new (``{uuid}`` or ``{id}``): no look for a taken key.
        self.always_unique = bool(names & _UNIQUE_FIELDS)
        # Fail at declaration, not at the first upload: with a name like a user's,
        # none at all, one without an extension, and one shaped like a writer's
        # temp file (a template that puts a '.' before it would make one).
        for probe in _PROBE_NAMES:
            try:
                self.make(file_id="0" * 24, filename=probe)
            except ValueError as exc:
                raise ValueError(f"{exc} (for a file named {probe!r})") from None

    def __repr__(self) -> str:
        return f"KeyMaker({self.template!r})"

    def make(
        self,
        *,
        file_id: Any,
        filename: str | None,
        context: Mapping[str, Any] | None = None,
        now: datetime.datetime | None = None,
    ) -> str:
        """A key for a new file.

        :param context: ``{"document": ..., "field": ...}`` when a document's field
            uploads.
        """
        context = context or {}
        template = self.template
        if callable(template):
            key = template(context.get("document"), filename)
            return check_key(key, f"key_template {getattr(template, '__name__', template)!r}")
        values = {
            "date": now or datetime.datetime.now(datetime.timezone.utc),
            "uuid": uuid.uuid4().hex,
            "id": file_id,
            "ext": _extension(filename),
            "field": _sanitise(str(context.get("field") or "file")),
            "filename": _sanitise(filename),
        }
        try:
            key = template.format_map(values)
        except (KeyError, IndexError, ValueError, AttributeError) as exc:
            raise ValueError(f"key_template {template!r} could not be formatted: {exc}") from exc
        return check_key(key, f"key_template {template!r}")

    @staticmethod
    def variant(key: str, attempt: int, *, shorten: bool = True) -> str:
        """Another key close to ``key`` for the ``attempt``-th try: ``a/b-2.jpg``.

        With ``shorten``, the name's stem is shortened when the variant would be
        longer than a key may be (1,024 bytes), so a long key has variants too;
        without it (asset ids, which users read), the variant may be too long and
        the caller says so.
        """
        head, sep, last = key.rpartition("/")
        stem, dot, ext = last.rpartition(".")
        if not dot or not stem:
            stem, ext, dot = last, "", ""
        made = f"{head}{sep}{stem}-{attempt}{dot}{ext}"
        over = len(made.encode("utf-8", "surrogatepass")) - _MAX_KEY_BYTES
        while shorten and over > 0 and stem:
            # Cut whole characters until it fits (a character may be several bytes).
            cut = stem[-1]
            stem = stem[:-1]
            over -= len(cut.encode("utf-8", "surrogatepass"))
            made = f"{head}{sep}{stem}-{attempt}{dot}{ext}"
        return made
