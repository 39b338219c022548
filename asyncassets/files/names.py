"""Stored file names: sanitised, cut to size, matched against extensions."""

from __future__ import annotations

import unicodedata
from collections.abc import Callable
from typing import Any

__all__ = ["MAX_FILENAME_BYTES", "FilenameTemplate", "has_extension", "sanitize_filename"]

MAX_FILENAME_BYTES = 255
"""Stored file names are cut to this many UTF-8 bytes (most file systems' limit)."""


def sanitize_filename(name: str, max_bytes: int = MAX_FILENAME_BYTES) -> str:
    """A file name safe to store and to hand back in a download header.

    Keeps only the last path component (``/`` and ``\\`` both separate), removes
    control and formatting characters (including bidi overrides that disguise
    ``gpj.exe`` as ``exe.jpg``), normalises to NFC, strips surrounding spaces and
    dots, and cuts the stem so that the name fits in ``max_bytes`` UTF-8 bytes
    while keeping the extension.

    :raises ValueError: nothing usable is left (``".."``, ``"/"``, ``""``...).
    """
    if not isinstance(name, str):
        raise TypeError(f"a file name must be a str, not {type(name).__name__}")
    name = unicodedata.normalize("NFC", name)
    name = "".join(c for c in name if unicodedata.category(c) not in ("Cc", "Cf"))
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = name.strip().strip(".").strip()
    if not name:
        raise ValueError("the file name has no usable part once directories are removed")
    if len(name.encode("utf-8")) > max_bytes:
        stem, dot, ext = name.rpartition(".")
        if not dot or len(ext.encode("utf-8")) > max_bytes // 2:
            stem, ext = name, ""
        suffix = f".{ext}" if ext else ""
        room = max_bytes - len(suffix.encode("utf-8"))
        stem = stem.encode("utf-8")[:room].decode("utf-8", "ignore").rstrip()
        name = stem + suffix
    return name



def has_extension(filename: str, extensions: tuple[str, ...]) -> bool:
    """Whether ``filename`` ends in ``.ext`` for one of ``extensions`` (lower case)."""
    lowered = filename.lower()
    return any(lowered.endswith("." + ext) for ext in extensions)


FilenameTemplate = str | Callable[[Any, str], str]
