"""How a stored file may be shown: inline or as a download, under which type, sandboxed.

One policy decides for every way a file reaches a browser:
:class:`~asyncassets.web.FileResponse` and :func:`~asyncassets.web.files_app`
(which add ``nosniff`` and ``sandbox`` to what they send), and S3 presigned
links (:func:`~asyncassets.files.urls.file_url`, which can add neither: see
:meth:`ContentPolicy.present_presigned`). It lives here, below the web layer,
so that making a link needs no web framework; :mod:`asyncassets.web`
re-exports it.

Uploaded bytes, their stored ``Content-Type`` and their file name are chosen by
whoever uploaded them. A browser told to show them runs what they contain with
the serving site's origin: an HTML page's script, an SVG's, an XHTML document's
in any of the XML types Chromium renders (``text/xsl``, ``application/rss+xml``,
``text/anything+xml``...). A list of the dangerous types is never complete, so
:class:`ContentPolicy` works the other way round, from three allowlists:

``inline``
    the types shown in the page (``Content-Disposition: inline``): by default
    raster images, audio, video and ``text/plain``, which browsers render
    without running anything in them. Every other file is sent as an
    attachment (the browser saves it), whatever was asked.
``labelled``
    the types an attachment is sent under: by default the inline ones and
    common documents and archives (PDF, office files, ZIP, CSV, JSON...).
    Any other type is sent as ``application/octet-stream``, which no browser
    runs as a script or applies as a stylesheet, even when a page of the site
    loads the file with ``<script src>`` or ``<link rel=stylesheet>``
    (``Content-Disposition`` does not apply to those).
``unsandboxed``
    the inline types served without ``Content-Security-Policy: sandbox``:
    by default the audio and video ones, which Chromium does not play at top
    level in a sandboxed document. Every other response carries ``sandbox``,
    so even a file a browser would misread cannot run a script or act as the
    site. Only passive types may be listed: raster images, audio, video,
    ``text/plain`` and ``application/pdf``; never HTML, SVG or an XML type.

Every response also carries ``X-Content-Type-Options: nosniff``, so the
browser takes the type sent for the truth instead of guessing from the bytes.

Types are compared by their *essence* (``type/subtype``, lower case, without
parameters or white space), so ``" TEXT/HTML ; charset=utf-8"`` is
``text/html``; a value that is not a valid media type is ignored. ``text/plain``
is always sent with a charset (the stored one when it is a plain token, else
``utf-8``), so the browser never guesses one.

.. code-block:: python

    from asyncassets.web import INLINE_TYPES, ContentPolicy, FileResponse

    # PDFs shown in the browser's viewer (which does not run under sandbox).
    with_pdf = ContentPolicy(
        inline={*INLINE_TYPES, "application/pdf"}, unsandboxed={"application/pdf"}
    )
    return FileResponse(doc.report, request, policy=with_pdf)
"""

from __future__ import annotations

import mimetypes
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace

__all__ = [
    "DEFAULT_POLICY",
    "INLINE_TYPES",
    "LABELLED_TYPES",
    "PRESIGNED_INLINE_TYPES",
    "UNSANDBOXED_TYPES",
    "ContentPolicy",
    "MediaType",
    "Presentation",
    "guess_media_type",
    "parse_media_type",
]

#: Raster images, audio, video and plain text: what browsers show without
#: running anything in it.
INLINE_TYPES = frozenset(
    {
        # raster images (never image/svg+xml: SVG is a document that runs scripts)
        "image/apng",
        "image/avif",
        "image/bmp",
        "image/gif",
        "image/jpeg",
        "image/png",
        "image/vnd.microsoft.icon",
        "image/webp",
        "image/x-icon",
        # audio
        "audio/aac",
        "audio/flac",
        "audio/mp4",
        "audio/mpeg",
        "audio/ogg",
        "audio/opus",
        "audio/wav",
        "audio/wave",
        "audio/webm",
        "audio/x-flac",
        "audio/x-wav",
        # video
        "video/mp4",
        "video/ogg",
        "video/quicktime",
        "video/webm",
        # text, always sent with a charset
        "text/plain",
    }
)

#: Inline types served without ``Content-Security-Policy: sandbox`` by default:
#: Chromium does not play audio or video opened at top level under ``sandbox``.
UNSANDBOXED_TYPES = frozenset(t for t in INLINE_TYPES if t.startswith(("audio/", "video/")))

#: Inline types that stay what they are without ``X-Content-Type-Options:
#: nosniff`` or ``Content-Security-Policy: sandbox``, which an S3 presigned link
#: cannot carry: raster images, audio, video and ``text/plain``. Chromium sniffs
#: a declared image only for another image format, plays audio and video as
#: media or not at all, and checks ``text/plain`` only for binary bytes (which
#: make it a download), never for markup: none of them becomes a document that
#: runs a script (``tests/test_web_browser_presigned.py`` shows it for HTML and
#: SVG bytes under each). Everything else a presigned link sends as an attachment.
PRESIGNED_INLINE_TYPES = INLINE_TYPES

#: Types an attachment keeps: the inline ones, and documents, archives and data
#: that no browser runs as a script or a stylesheet.
LABELLED_TYPES = INLINE_TYPES | frozenset(
    {
        "application/epub+zip",
        "application/gzip",
        "application/json",
        "application/msword",
        "application/octet-stream",
        "application/pdf",
        "application/rtf",
        "application/vnd.ms-excel",
        "application/vnd.ms-powerpoint",
        "application/vnd.oasis.opendocument.presentation",
        "application/vnd.oasis.opendocument.spreadsheet",
        "application/vnd.oasis.opendocument.text",
        "application/vnd.openxmlformats-officedocument.presentationml.presentation",
        "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        "application/x-7z-compressed",
        "application/x-tar",
        "application/zip",
        "image/heic",
        "image/heif",
        "image/tiff",
        "text/csv",
        "text/markdown",
    }
)

_OCTET_STREAM = "application/octet-stream"
# RFC 6838's restricted-name: what a type and a subtype may be made of.
_NAME = r"[a-z0-9][a-z0-9!#$&^_.+-]{0,126}"
_ESSENCE = re.compile(rf"({_NAME})/({_NAME})")
# A charset worth repeating to a browser: a plain token (no quotes, no spaces).
_CHARSET = re.compile(r"[a-z0-9][a-z0-9._:-]{0,39}")
_MAX_HEADER = 1024  # longer stored types are not types
# What may go without sandbox: passive types only (see _passive).
_PASSIVE_TOPS = ("image", "audio", "video")
_PASSIVE_EXACT = frozenset({"text/plain", "application/pdf"})


@dataclass(frozen=True)
class MediaType:
    """A parsed ``Content-Type``: its essence and the one parameter kept.

    :ivar essence: ``type/subtype`` in lower case.
    :ivar charset: the ``charset`` parameter in lower case, when it is a plain
        token; ``None`` otherwise.
    """

    essence: str
    charset: str | None = None


def parse_media_type(value: object) -> MediaType | None:
    """Parse a stored or given ``Content-Type``; ``None`` if it is not one.

    Tolerates what writers vary (case, white space around the parts,
    parameters, quoted values) and refuses what is not a media type: not a
    string, control characters (a header could be split on them), no ``/``,
    characters outside RFC 6838's names, wildcards.
    """
    if not isinstance(value, str) or len(value) > _MAX_HEADER:
        return None
    if any(not (" " <= ch <= "~" or ch == "\t") for ch in value):
        return None
    essence, _, parameters = value.partition(";")
    match = _ESSENCE.fullmatch(essence.strip(" \t").lower())
    if match is None:
        return None
    charset = None
    for parameter in parameters.split(";"):
        name, sep, raw = parameter.partition("=")
        if sep and name.strip(" \t").lower() == "charset":
            candidate = raw.strip(" \t").strip('"').lower()
            charset = candidate if _CHARSET.fullmatch(candidate) else None
    return MediaType(f"{match.group(1)}/{match.group(2)}", charset)


@dataclass(frozen=True)
class Presentation:
    """What :meth:`ContentPolicy.present` decided for one response.

    :ivar content_type: the ``Content-Type`` to send.
    :ivar inline: ``Content-Disposition: inline`` (else ``attachment``).
    :ivar sandbox: send ``Content-Security-Policy: sandbox``.
    """

    content_type: str
    inline: bool
    sandbox: bool


def guess_media_type(name: str) -> MediaType | None:
    """The type a file name suggests (``"a.png"``: ``image/png``), or ``None``.

    Used when a file has no valid stored type. A name of a compressed archive
    (``"x.tar.gz"``) suggests nothing: its bytes are gzip, not a tar.
    """
    if not name:
        return None
    guessed, encoding = mimetypes.guess_type(name, strict=False)
    return None if encoding else parse_media_type(guessed)


def _essences(types: Iterable[str], what: str) -> frozenset[str]:
    if isinstance(types, str):
        raise TypeError(f"{what} takes a collection of media types, not one string: [{types!r}]")
    found = set()
    for value in types:
        parsed = parse_media_type(value)
        if parsed is None or value.strip().lower() != parsed.essence:
            raise ValueError(
                f"{what}: {value!r} is not a media type's essence (type/subtype, no "
                "parameters, no wildcard): list each type, e.g. 'image/png'"
            )
        found.add(parsed.essence)
    return frozenset(found)


def _passive(essence: str) -> bool:
    """Whether a browser shows this type without running anything it contains."""
    top, _, sub = essence.partition("/")
    if essence in _PASSIVE_EXACT:
        return True
    # A structured suffix (+xml, +json...) or 'xml' anywhere makes it a document.
    return top in _PASSIVE_TOPS and "+" not in sub and "xml" not in sub and "svg" not in sub


class ContentPolicy:
    """Which stored files are shown in the page, under which type, and how sandboxed.

    See the module's description; every argument is a collection of media type
    essences (``"image/png"``), which replaces the default one.

    :param inline: the types shown inline; anything else is an attachment.
    :param labelled: the types an attachment is sent under; anything else is
        sent as ``application/octet-stream``. Inline types are always labelled.
    :param unsandboxed: inline types sent without ``Content-Security-Policy:
        sandbox``; only passive ones (raster images, audio, video,
        ``text/plain``, ``application/pdf``). By default the audio and video
        types among ``inline``.
    :raises ValueError: a value that is not a type's essence, or an active type
        (HTML, SVG, XML, script...) in ``unsandboxed``, or an unsandboxed type
        that is not inline.
    :raises TypeError: a single string where a collection is expected.
    """

    def __init__(
        self,
        *,
        inline: Iterable[str] = INLINE_TYPES,
        labelled: Iterable[str] = LABELLED_TYPES,
        unsandboxed: Iterable[str] | None = None,
    ) -> None:
        self.inline = _essences(inline, "inline")
        self.labelled = _essences(labelled, "labelled") | self.inline
        self.unsandboxed = (
            UNSANDBOXED_TYPES & self.inline
            if unsandboxed is None
            else _essences(unsandboxed, "unsandboxed")
        )
        active = sorted(t for t in self.unsandboxed if not _passive(t))
        if active:
            raise ValueError(
                f"unsandboxed: {active} may run scripts or render documents; only "
                "raster images, audio, video, text/plain and application/pdf can be "
                "served without Content-Security-Policy: sandbox"
            )
        stray = sorted(self.unsandboxed - self.inline)
        if stray:
            raise ValueError(
                f"unsandboxed: {stray} are not in inline: only inline types can go "
                "without sandbox (attachments are always sandboxed)"
            )

    def __repr__(self) -> str:
        return (
            f"ContentPolicy(inline={sorted(self.inline)}, labelled=<{len(self.labelled)} "
            f"types>, unsandboxed={sorted(self.unsandboxed)})"
        )

    def present(self, media_type: MediaType | None, *, download: bool) -> Presentation:
        """How to send a file of ``media_type`` (``None``: unknown).

        :param download: the caller asked for an attachment.
        """
        essence = media_type.essence if media_type is not None else _OCTET_STREAM
        inline = not download and essence in self.inline
        if essence not in self.labelled:
            content_type = _OCTET_STREAM
        else:
            charset = media_type.charset if media_type is not None else None
            if essence == "text/plain":
                charset = charset or "utf-8"  # never left to the browser's guess
            elif not essence.startswith("text/"):
                charset = None
            content_type = f"{essence}; charset={charset}" if charset else essence
        return Presentation(
            content_type=content_type,
            inline=inline,
            sandbox=not (inline and essence in self.unsandboxed),
        )

    def present_presigned(self, media_type: MediaType | None, *, download: bool) -> Presentation:
        """How an S3 presigned link sends a file of ``media_type`` (``None``: unknown).

        S3 sends back the ``Content-Type`` and ``Content-Disposition`` a link
        signs, and no other header of ours: no ``nosniff``, no ``sandbox``. So
        a file is inline only when this policy shows it inline *and* it is one
        of :data:`PRESIGNED_INLINE_TYPES` (safe without them); every other file
        is an attachment under the type :meth:`present` gives it (its own when
        labelled, else ``application/octet-stream``). ``sandbox`` is ``False``:
        it cannot be sent, which is why nothing that would need it is inline.

        :param download: the caller asked for an attachment.
        """
        shown = self.present(media_type, download=download)
        essence = media_type.essence if media_type is not None else _OCTET_STREAM
        inline = shown.inline and essence in PRESIGNED_INLINE_TYPES
        return replace(shown, inline=inline, sandbox=False)


#: The policy :class:`~asyncassets.web.FileResponse` and
#: :func:`~asyncassets.web.files_app` use unless given another.
DEFAULT_POLICY = ContentPolicy()
