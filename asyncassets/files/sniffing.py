"""Content types: sniffed from a file's first bytes, guessed from its name, matched.

Content types are sniffed with a table of magic numbers of our own
(:data:`SIGNATURES`) rather than a dependency: the common image, document, audio,
video and archive formats fit in a few dozen lines, and the alternatives are
either unmaintained (``filetype``, last released 2022) or ship a large database
whose fuzzy scoring we would have to test around (``puremagic``).
"""

from __future__ import annotations

import fnmatch
import mimetypes
import unicodedata
from collections.abc import Iterable

from .policy import parse_media_type

__all__ = [
    "HEAD_SIZE",
    "SIGNATURES",
    "content_type_matches",
    "guess_content_type",
    "sniff_content_type",
]

HEAD_SIZE = 512
"""How many leading bytes are looked at to sniff a content type (tar needs 262)."""

SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (0, b"\x89PNG\r\n\x1a\n", "image/png"),
    (0, b"\xff\xd8\xff", "image/jpeg"),
    (0, b"GIF87a", "image/gif"),
    (0, b"GIF89a", "image/gif"),
    (0, b"BM", "image/bmp"),
    (0, b"II*\x00", "image/tiff"),
    (0, b"MM\x00*", "image/tiff"),
    (0, b"\x00\x00\x01\x00", "image/vnd.microsoft.icon"),
    (0, b"%PDF-", "application/pdf"),
    (0, b"%!PS", "application/postscript"),
    (0, b"{\\rtf", "application/rtf"),
    (0, b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "application/x-ole-storage"),
    (0, b"PK\x03\x04", "application/zip"),
    (0, b"PK\x05\x06", "application/zip"),  # empty archive
    (0, b"\x1f\x8b", "application/gzip"),
    (0, b"BZh", "application/x-bzip2"),
    (0, b"\xfd7zXZ\x00", "application/x-xz"),
    (0, b"(\xb5/\xfd", "application/zstd"),
    (0, b"7z\xbc\xaf'\x1c", "application/x-7z-compressed"),
    (0, b"Rar!\x1a\x07", "application/vnd.rar"),
    (257, b"ustar", "application/x-tar"),
    (0, b"ID3", "audio/mpeg"),
    (0, b"fLaC", "audio/flac"),
    (0, b"OggS", "audio/ogg"),
    (0, b"MThd", "audio/midi"),
    (0, b"\x1aE\xdf\xa3", "video/webm"),  # EBML: WebM or Matroska
    (0, b"\x00asm", "application/wasm"),
    (0, b"\x7fELF", "application/x-executable"),
    (0, b"MZ", "application/vnd.microsoft.portable-executable"),
    (0, b"wOFF", "font/woff"),
    (0, b"wOF2", "font/woff2"),
    (0, b"SQLite format 3\x00", "application/vnd.sqlite3"),
)

# RIFF containers: the format is at bytes 8..12.
_RIFF = {b"WEBP": "image/webp", b"WAVE": "audio/wav", b"AVI ": "video/x-msvideo"}
# ISO base media ("ftyp" box at 4..8): the major brand at 8..12.
_FTYP = {
    b"avif": "image/avif",
    b"avis": "image/avif",
    b"heic": "image/heic",
    b"heix": "image/heic",
    b"mif1": "image/heif",
    b"qt  ": "video/quicktime",
    b"M4A ": "audio/mp4",
    b"M4V ": "video/mp4",
    b"3gp4": "video/3gpp",
    b"3gp5": "video/3gpp",
}

# Only Python's built-in table: the result must not depend on the host's
# /etc/mime.types.
_MIMETYPES = mimetypes.MimeTypes(filenames=())
for _ext, _type in ((".webp", "image/webp"), (".avif", "image/avif"), (".heic", "image/heic")):
    _MIMETYPES.add_type(_type, _ext)
_ENCODINGS = {
    "gzip": "application/gzip",
    "bzip2": "application/x-bzip2",
    "xz": "application/x-xz",
    "compress": "application/x-compress",
    "br": "application/x-brotli",
}



def sniff_content_type(head: bytes) -> str | None:
    """The content type that the first bytes of a file show, or ``None``.

    Knows the formats of :data:`SIGNATURES`, RIFF (WEBP, WAV, AVI) and ISO media
    (MP4, MOV, AVIF, HEIC) containers, MP3 frames without a tag, and plain text
    (UTF-8 without NUL bytes, or starting with a byte order mark). Empty input
    gives ``None``.
    """
    head = bytes(head[:HEAD_SIZE])
    if not head:
        return None
    for offset, magic, content_type in SIGNATURES:
        if head[offset : offset + len(magic)] == magic:
            return content_type
    if head[:4] == b"RIFF" and head[8:12] in _RIFF:
        return _RIFF[head[8:12]]
    if head[4:8] == b"ftyp":
        return _FTYP.get(head[8:12], "video/mp4")
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0 and head[1] & 0x06:
        return "audio/mpeg"  # an MPEG audio frame header (MP3 without an ID3 tag)
    if _looks_like_text(head):
        return "text/plain"
    return None


def _looks_like_text(head: bytes) -> bool:
    if head.startswith((b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff")):
        return True
    if b"\x00" in head:
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        # The head may end in the middle of a multi-byte character.
        if exc.start < len(head) - 3:
            return False
        text = head[: exc.start].decode("utf-8")
    controls = sum(1 for c in text if unicodedata.category(c) == "Cc" and c not in "\t\n\r\f\v")
    return controls * 20 < max(len(text), 1)


def guess_content_type(filename: str | None, head: bytes = b"") -> str | None:
    """The content type of a file: from its name's extension, else its first bytes."""
    if filename:
        guessed, encoding = _MIMETYPES.guess_type(filename, strict=False)
        if encoding:
            # "x.tar.gz" is a gzip file whatever it holds once decompressed.
            return _ENCODINGS.get(encoding, "application/octet-stream")
        if guessed:
            return guessed
    return sniff_content_type(head)


def content_type_matches(content_type: str | None, patterns: Iterable[str]) -> bool:
    """Whether ``content_type`` matches one of ``patterns`` (``image/*``, ``*/*``...).

    Case-insensitive; parameters such as ``; charset=utf-8`` are ignored. A
    value that is not a media type (control characters, a wildcard, no ``/``)
    matches nothing: ``"image/png\\r\\n..."`` is not ``image/png``.
    """
    parsed = parse_media_type(content_type)
    if parsed is None:
        return False
    return any(fnmatch.fnmatchcase(parsed.essence, p.lower()) for p in patterns)
