"""``FileResponse``: a stored file as an HTTP response, with ranges and caching."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
import re
import secrets
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from starlette.background import BackgroundTask
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ..errors import FileDeletedWhileReading, FileNotFound
from ..fields import FileProxy
from ..files.urls import content_disposition, file_name
from ..storage import Store
from ..storage.catalogue import compression_of, content_type_of, content_version, original_length
from .failures import failure_answer
from .http import ByteRange, Unsatisfiable, etag_matches, http_date, parse_http_date, parse_range
from .policy import (
    DEFAULT_POLICY,
    ContentPolicy,
    MediaType,
    Presentation,
    guess_media_type,
    parse_media_type,
)
from .reading import RangeReader, refused_read, same_version, verifies_reads

__all__ = ["DEFAULT_CACHE_CONTROL", "DEFAULT_MAX_RANGES", "MAX_LENGTH", "FileResponse"]

logger = logging.getLogger("asyncassets.web")

#: Caches may keep the file but must ask (a cheap 304) before using it again: a
#: document's file can be replaced at the same URL.
DEFAULT_CACHE_CONTROL = "no-cache"
#: Most ranges answered as ``multipart/byteranges``; more are answered with the
#: whole file (RFC 9110 lets a server ignore a Range it finds abusive).
DEFAULT_MAX_RANGES = 16

#: Headers only the response computes; a caller's ``headers`` cannot replace them.
_COMPUTED = frozenset({b"content-length", b"content-range", b"x-content-type-options"})
#: Headers a caller's ``headers`` add to rather than replace: every CSP sent is
#: enforced, so the caller's policy cannot lift the sandbox.
_ADDED = frozenset({b"set-cookie", b"content-security-policy"})
#: The longest file a catalogue entry can describe: 2**53 bytes (8 PiB). Longer
#: is no file any storage holds (an S3 object is at most 5 TiB), and past it a
#: length written as a double (the mongo shell, JavaScript tools) is no longer
#: exact; an int64 up to 2**63 - 1 fits in MongoDB but not in any disk or bucket.
#: An entry claiming more is unusable, like one with no length (404, a warning).
MAX_LENGTH = 2**53
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_NOSNIFF = (b"x-content-type-options", b"nosniff")
_SANDBOX = (b"content-security-policy", b"sandbox")


@dataclass(frozen=True)
class ServedEntry:
    """What a response needs of a catalogue entry, read without trusting it.

    Catalogue entries may come from other tools, or be edited by hand: fields of
    the wrong type or missing. :func:`served_entry` reads them once, checked.

    :ivar doc: the entry as given to storage reads (a ``metadata`` that is not a
        mapping is left out: it cannot describe a compression).
    :ivar length: the length of the original bytes.
    :ivar version: the content version (see
        :func:`~asyncassets.storage.catalogue.content_version`).
    :ivar etag: the ``ETag``: strong, the SHA-256; weak otherwise.
    :ivar modified: the upload time, to the second, or ``None``.
    :ivar filename: the stored ``filename``, whatever it holds.
    :ivar content_type: the stored type, parsed; ``None`` if absent or not a type.
    """

    doc: Mapping[str, Any]
    length: int
    version: str
    etag: str
    modified: dt.datetime | None
    filename: Any
    content_type: MediaType | None


def _count(value: Any) -> int | None:
    """A length from a catalogue entry: an int (or a whole double) from 0 to MAX_LENGTH."""
    if isinstance(value, float) and value.is_integer() and abs(value) <= MAX_LENGTH:
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_LENGTH:
        return value
    return None


def served_entry(doc: Any) -> ServedEntry | None:
    """The entry's answers, or ``None`` when it cannot describe a servable file.

    ``None`` when it is not a mapping, has no ``_id``, no valid ``length`` (or,
    compressed, no valid original length): valid is a whole number from 0 to
    :data:`MAX_LENGTH`. Any other odd field is taken as absent: a ``filename``
    that is not a string, a content type that is not a media type, an upload
    time that is not a date. (Fields the store reads the bytes by are checked
    by :func:`~asyncassets.web.reading.refused_read`.)
    """
    if not isinstance(doc, Mapping) or "_id" not in doc or _count(doc.get("length")) is None:
        return None
    if not isinstance(doc.get("metadata", {}), Mapping):
        doc = {key: value for key, value in doc.items() if key != "metadata"}
    try:
        length = _count(original_length(doc) if compression_of(doc) else doc["length"])
        version, strong = content_version(doc)
        stored_type = content_type_of(doc)
    except (KeyError, TypeError, ValueError, OverflowError):
        return None
    if length is None:
        return None
    if strong and _SHA256_HEX.fullmatch(version):
        etag = f'"{version}"'
    else:
        # A digest is a quoted string of safe characters only when it is hex.
        text = version if re.fullmatch(r"[0-9a-f]{40,}", version) else None
        etag = f'W/"{(text or hashlib.sha256(version.encode()).hexdigest())[:40]}"'
    return ServedEntry(
        doc=doc,
        length=length,
        version=version,
        etag=etag,
        modified=_seconds_precision(doc.get("uploadDate")),
        filename=doc.get("filename"),
        content_type=parse_media_type(stored_type),
    )


def log_unservable(store: Store, doc: Any) -> None:
    """Warn that a catalogue entry cannot describe a file (answered ``404``)."""
    logger.warning(
        "not serving file %r of catalogue %r: its catalogue entry has no valid "
        "length (a whole number from 0 to 2**53; run asyncassets.check())",
        doc.get("_id") if isinstance(doc, Mapping) else None,
        store.name,
    )


def _seconds_precision(when: Any) -> dt.datetime | None:
    if not isinstance(when, dt.datetime):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return when.astimezone(dt.timezone.utc).replace(microsecond=0)


class FileResponse(Response):
    """Send a file of a :class:`~asyncassets.fields.FileField` to an HTTP client.

    .. code-block:: python

        from asyncassets.web import FileResponse

        @app.api_route("/animals/{pk}/photo", methods=["GET", "HEAD"])
        async def photo(pk: str, request: Request):
            animal = await Animal.objects.get(pk=pk)
            return FileResponse(animal.photo, request)

    A Starlette response, so it works in Starlette, FastAPI and any ASGI app
    (``await response(scope, receive, send)``), on every storage. When it is sent
    it takes the file's catalogue entry (loaded already, for a directory or S3
    file whose reads check it; else looked up, one query) and answers:

    * ``200`` with the file, ``Accept-Ranges: bytes``, ``Content-Length``,
      ``Content-Type``, ``ETag`` (the SHA-256 of the bytes, strong; a weak
      stand-in for legacy files without one), ``Last-Modified`` (the upload
      time), ``Cache-Control`` and ``Content-Disposition``;
    * ``206`` for a satisfiable ``Range``: one range with ``Content-Range``,
      several as ``multipart/byteranges``; only those bytes are read from storage,
      all of them in one pass (a compressed file is inflated once, from its start);
    * ``416`` with ``Content-Range: bytes */<length>`` when no range overlaps;
    * ``304`` for ``If-None-Match`` / ``If-Modified-Since`` that still match, and
      ``412`` for ``If-Match`` / ``If-Unmodified-Since`` that do not;
    * headers only for ``HEAD`` (no byte is read); ``405`` for other methods;
    * ``404`` when the field is empty, its file is missing, or its catalogue
      entry cannot describe a file (no valid length, or one over
      :data:`MAX_LENGTH`: logged as a warning on the ``asyncassets.web`` logger);
    * ``500`` for ``GET`` and ``HEAD`` alike when the entry is damaged where the
      store reads the bytes by it (see
      :func:`~asyncassets.web.reading.refused_read`), and for ``GET`` when the
      stored bytes are damaged; ``503`` with ``Retry-After`` when the file's
      storage or the database cannot be reached (after the storage's retries):
      complete answers, logged, on a connection the client can keep using (see
      :mod:`asyncassets.web.failures`).

    The ``304``, ``412`` and ``416`` answers and ``HEAD`` carry the guards of
    the ``200``: ``nosniff``, its ``Content-Disposition`` and, where the ``200``
    has it, ``Content-Security-Policy: sandbox`` (the ``304`` its
    ``Content-Type`` too), since caches update a stored response's headers
    from a ``304``.

    See :mod:`asyncassets.web.http` for how odd and hostile ``Range`` headers are
    treated. Every byte of a response comes from the version of the file its
    ``ETag`` names: a file deleted or replaced while its bytes are being sent
    raises :class:`~asyncassets.errors.FileDeletedWhileReading` out of the
    response, so the server closes the connection short of ``Content-Length``:
    the client sees a truncated response, never bytes of two files. A client
    that disconnects stops the reading at the next piece.

    Whether the file is shown (``inline``) or saved (``attachment``), under which
    ``Content-Type`` and whether with ``Content-Security-Policy: sandbox`` is the
    ``policy``'s decision (:class:`~asyncassets.web.ContentPolicy`): by default
    only raster images, audio, video and plain text are inline, everything else
    is an attachment, and every response but audio and video is sandboxed.
    Every response carries ``X-Content-Type-Options: nosniff``.

    :param proxy: the file (``doc.photo``, or an image's ``doc.photo.thumbnail``).
    :param request: the request being answered. Optional: the ``Range`` and
        conditional headers are read from the ASGI scope the response is sent in.
    :param download: ``Content-Disposition: attachment`` (save) whatever the type.
    :param filename: the name given in ``Content-Disposition``; the stored one by default.
    :param content_type: the type to present the file as, instead of the stored
        one (the policy still decides what is sent).
    :param cache_control: the ``Cache-Control`` value (``None``: no header). The
        default, ``no-cache``, lets browsers keep the file and revalidate it with a
        304; pass ``"public, max-age=31536000, immutable"`` for URLs that never
        change their file.
    :param max_ranges: most ranges answered as ``multipart/byteranges``; a Range
        with more (after coalescing overlapping ones) gets the whole file.
    :param policy: what is inline, under which type, sandboxed
        (:data:`~asyncassets.web.DEFAULT_POLICY` by default).
    :param headers: more headers. They replace computed ones of the same name,
        except ``Content-Length``, ``Content-Range`` and
        ``X-Content-Type-Options``, which they cannot change, and
        ``Content-Security-Policy``, which they add to (browsers enforce every
        policy sent); replacing ``Content-Type`` or ``Content-Disposition``
        makes the response sandboxed.
    :param background: a task run after the response is sent.
    """

    def __init__(
        self,
        proxy: FileProxy,
        request: Request | None = None,
        *,
        download: bool = False,
        filename: str | None = None,
        content_type: str | None = None,
        cache_control: str | None = DEFAULT_CACHE_CONTROL,
        max_ranges: int = DEFAULT_MAX_RANGES,
        policy: ContentPolicy = DEFAULT_POLICY,
        headers: Mapping[str, str] | None = None,
        background: BackgroundTask | None = None,
    ) -> None:
        if not isinstance(proxy, FileProxy):
            raise TypeError(
                f"FileResponse takes a file field's proxy (doc.photo), not {type(proxy).__name__}"
            )
        self._setup(
            proxy,
            None,
            request=request,
            download=download,
            filename=filename,
            content_type=content_type,
            cache_control=cache_control,
            max_ranges=max_ranges,
            policy=policy,
            headers=headers,
            background=background,
        )

    def _setup(
        self,
        proxy: FileProxy | None,
        entry: tuple[Store, Mapping[str, Any]] | None,
        *,
        request: Request | None = None,
        download: bool = False,
        filename: str | None = None,
        content_type: str | None = None,
        cache_control: str | None = DEFAULT_CACHE_CONTROL,
        max_ranges: int = DEFAULT_MAX_RANGES,
        policy: ContentPolicy = DEFAULT_POLICY,
        headers: Mapping[str, str] | None = None,
        background: BackgroundTask | None = None,
    ) -> None:
        if isinstance(max_ranges, bool) or not isinstance(max_ranges, int) or max_ranges < 1:
            raise ValueError(f"max_ranges must be an int >= 1, not {max_ranges!r}")
        if not isinstance(policy, ContentPolicy):
            raise TypeError(f"policy must be a ContentPolicy, not {type(policy).__name__}")
        self.proxy = proxy
        self.request = request
        self.download = bool(download)
        self.filename = filename
        self.content_type = content_type
        self.cache_control = cache_control
        self.max_ranges = max_ranges
        self.policy = policy
        self.status_code = 200  # until sent: then what was sent
        self.background = background
        self.media_type = None
        self._entry = entry
        self.init_headers(headers)

    @classmethod
    def for_entry(
        cls,
        store: Store,
        doc: Mapping[str, Any],
        **options: Any,
    ) -> FileResponse:
        """A response for a catalogue entry already looked up in ``store`` (no proxy).

        What :func:`~asyncassets.web.files_app` uses; ``options`` are the keywords
        of the constructor. The entry is used as given: look it up just before.
        """
        response = cls.__new__(cls)
        response._setup(None, (store, doc), **options)
        return response

    # -- ASGI -------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope.get("method", "GET")
        if method not in ("GET", "HEAD"):
            await self._plain(send, 405, "Method Not Allowed", [(b"allow", b"GET, HEAD")])
            return
        try:
            found = await self._locate()
        except BaseException as exc:
            if not await self._answer_failure(send, exc):
                raise
            return
        if found is None:
            await self._plain(send, 404, "Not Found")
            return
        store, doc = found
        entry = served_entry(doc)
        if entry is None:
            log_unservable(store, doc)
            await self._plain(send, 404, "Not Found")
            return
        # An entry the store would refuse to read (a GridFS chunkSize of 0, an
        # object entry naming no key...) fails GET before its first byte: HEAD and
        # conditional requests get that same answer, not a 200 or 304 for a file
        # that cannot be sent.
        refused = await refused_read(store, entry.doc)
        if refused is not None:
            await self._answer_failure(send, refused)
            return
        headers = self.request.headers if self.request is not None else Headers(scope=scope)
        await self._answer(store, entry, method, headers, receive, send)
        if self.background is not None:
            await self.background()

    async def _locate(self) -> tuple[Store, Mapping[str, Any]] | None:
        if self._entry is not None:
            return self._entry
        proxy = self.proxy
        if proxy is None or proxy.file_id is None:
            return None
        store = proxy._bucket()
        try:
            # The proxy decides whether its loaded entry is as good as a fresh one
            # (a store whose reads check the entry) or must be looked up again.
            doc = await proxy._fetch()
        except FileNotFound:
            return None
        return None if doc is None else (store, doc)

    async def _answer(
        self,
        store: Store,
        entry: ServedEntry,
        method: str,
        request: Headers,
        receive: Receive,
        send: Send,
    ) -> None:
        length, etag, modified = entry.length, entry.etag, entry.modified
        validators: list[tuple[bytes, bytes]] = [(b"etag", etag.encode())]
        if modified is not None:
            validators.append((b"last-modified", http_date(modified).encode()))
        if self.cache_control is not None:
            validators.append((b"cache-control", self.cache_control.encode("latin-1")))

        name = file_name(self.filename if self.filename is not None else entry.filename)
        shown = self.policy.present(
            parse_media_type(self.content_type) or entry.content_type or guess_media_type(name),
            download=self.download,
        )
        media_type = shown.content_type
        guards = self._guards(shown, name)

        # Every answer about the file carries the guards of its 200. A cache that
        # gets a 304 updates the stored response's headers from it, and Chromium
        # replaces all the stored Content-Security-Policy headers with the 304's:
        # a 304 carrying a CSP (the caller's, or a middleware's) but no sandbox
        # would unsandbox the cached page.
        status = self._precondition(request, etag, modified)
        if status == 412:
            await self._plain(send, 412, "Precondition Failed", [*validators, *guards])
            return
        if status == 304:
            await self._send_start(
                send,
                304,
                [*validators, *guards, (b"content-type", media_type.encode("latin-1"))],
            )
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return

        headers = [*validators, (b"accept-ranges", b"bytes"), *guards]

        ranges: list[ByteRange] | None = None
        if method == "GET" and "range" in request and self._if_range(request, etag, modified):
            try:
                ranges = parse_range(request["range"], length, self.max_ranges)
            except Unsatisfiable:
                await self._plain(
                    send,
                    416,
                    "Range Not Satisfiable",
                    [*headers, (b"content-range", f"bytes */{length}".encode())],
                )
                return

        if ranges is None:
            parts = [ByteRange(0, length)]
            framing = [(b"", b"")]
            status, body_type = 200, media_type
        elif len(ranges) == 1:
            parts = ranges
            framing = [(b"", b"")]
            status, body_type = 206, media_type
            headers.append((b"content-range", ranges[0].content_range(length).encode()))
        else:
            boundary = secrets.token_hex(16)
            parts = ranges
            framing = [
                (
                    (
                        f"--{boundary}\r\nContent-Type: {media_type}\r\n"
                        f"Content-Range: {part.content_range(length)}\r\n\r\n"
                    ).encode("latin-1"),
                    b"\r\n",
                )
                for part in ranges
            ]
            framing[-1] = (framing[-1][0], f"\r\n--{boundary}--\r\n".encode())
            status, body_type = 206, f"multipart/byteranges; boundary={boundary}"
        size = sum(len(head) + len(tail) for head, tail in framing)
        size += sum(len(part) for part in parts)
        headers += [
            (b"content-type", body_type.encode("latin-1")),
            (b"content-length", str(size).encode()),
        ]

        if method == "HEAD":
            await self._send_start(send, status, headers)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return

        # Read the first piece before answering: a file gone by now is a clean 404.
        pieces = self._body(store, entry, parts, framing)
        try:
            try:
                first = await anext(pieces)
            except StopAsyncIteration:
                first = b""
            except BaseException as exc:
                # Nothing is sent yet: answer now, completely, rather than let the
                # server close a connection the client may reuse (web/failures.py).
                if not await self._answer_failure(send, exc):
                    raise
                return
            await self._send_start(send, status, headers)
            await self._stream(first, pieces, receive, send)
        finally:
            await pieces.aclose()

    def _retyped(self) -> bool:
        """Whether the caller's headers replace the type or disposition the policy chose."""
        return any(k in (b"content-type", b"content-disposition") for k, _ in self.raw_headers)

    def _guards(self, shown: Presentation, name: str) -> list[tuple[bytes, bytes]]:
        """The headers that keep the file from acting as the site, as the policy chose them.

        ``nosniff``, the ``Content-Disposition``, and ``sandbox`` unless the
        policy lets this type go without it and the caller's headers do not
        replace its type or disposition.
        """
        disposition = content_disposition(not shown.inline, name)
        guards = [_NOSNIFF, (b"content-disposition", disposition.encode("latin-1"))]
        if shown.sandbox or self._retyped():
            guards.append(_SANDBOX)
        return guards

    # -- conditions ---------------------------------------------------------------

    @staticmethod
    def _precondition(request: Headers, etag: str, modified: dt.datetime | None) -> int | None:
        """412, 304 or ``None`` (go on), in RFC 9110's order of evaluation."""
        if "if-match" in request:
            if not etag_matches(request["if-match"], etag, weak=False):
                return 412
        else:
            since = parse_http_date(request.get("if-unmodified-since"))
            if since is not None and modified is not None and modified > since:
                return 412
        if "if-none-match" in request:
            return 304 if etag_matches(request["if-none-match"], etag, weak=True) else None
        since = parse_http_date(request.get("if-modified-since"))
        if since is not None and modified is not None and modified <= since:
            return 304
        return None

    @staticmethod
    def _if_range(request: Headers, etag: str, modified: dt.datetime | None) -> bool:
        """Whether the ``Range`` applies: no ``If-Range``, or one naming this version."""
        value = request.get("if-range")
        if value is None:
            return True
        value = value.strip()
        if value.startswith(('"', "W/")):
            return etag_matches(value, etag, weak=False) and not value.startswith("W/")
        since = parse_http_date(value)
        return since is not None and modified is not None and since == modified

    # -- sending ------------------------------------------------------------------

    def _merged(self, computed: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """The computed headers, with the caller's ones replacing those of the same name."""
        mine = [(k, v) for k, v in self.raw_headers if k not in _COMPUTED]
        replaced = {k for k, _ in mine if k not in _ADDED}
        return [(k, v) for k, v in computed if k not in replaced] + mine

    async def _send_start(
        self, send: Send, status: int, headers: list[tuple[bytes, bytes]]
    ) -> None:
        self.status_code = status
        await send(
            {"type": "http.response.start", "status": status, "headers": self._merged(headers)}
        )

    async def _plain(
        self,
        send: Send,
        status: int,
        text: str,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        body = f"{text}\n".encode()
        kept = [
            (k, v)
            for k, v in headers or []
            if k not in (b"content-type", b"content-length", b"x-content-type-options")
        ]
        if self._retyped() and _SANDBOX not in kept:
            kept.append(_SANDBOX)  # the caller's type would apply to this body too
        await self._send_start(
            send,
            status,
            [
                *kept,
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
                _NOSNIFF,
            ],
        )
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def _answer_failure(self, send: Send, exc: BaseException) -> bool:
        """Answer a failure met before the response began; ``False``: raise it."""
        answer = failure_answer(exc)
        if answer is None:
            return False
        status, text, headers = answer
        await self._plain(send, status, text, [(b"cache-control", b"no-store"), *headers])
        return True

    async def _body(
        self,
        store: Store,
        entry: ServedEntry,
        parts: list[ByteRange],
        framing: list[tuple[bytes, bytes]],
    ) -> AsyncGenerator[bytes, None]:
        """The body's pieces, every stored byte of them from the entry's version.

        The last piece read is held back until the read is over; for a store
        whose reads do not check the entry themselves (GridFS), the entry is then
        looked up again, and a file replaced or deleted meanwhile raises
        :class:`~asyncassets.errors.FileDeletedWhileReading` before the body is
        complete (before its first byte, for a body read in one go).
        """
        reader = RangeReader(store, entry.doc, parts)
        held: bytes | None = None
        pending = b""  # framing waiting for the next piece
        current = -1
        try:
            async for index, piece in reader:
                while current < index:
                    if current >= 0:
                        pending += framing[current][1]
                    current += 1
                    pending += framing[current][0]
                if held is not None:
                    yield held
                held = pending + piece if pending else piece
                pending = b""
        finally:
            await reader.aclose()
        while current < len(parts) - 1:  # only empty parts (an empty file) are left
            if current >= 0:
                pending += framing[current][1]
            current += 1
            pending += framing[current][0]
        pending += framing[current][1]
        if reader.read_bytes and not verifies_reads(store):
            if not await same_version(store, entry.doc):
                raise FileDeletedWhileReading(entry.doc.get("_id"), store.name)
        if held is not None:
            yield held
        if pending:
            yield pending

    async def _stream(
        self, first: bytes, pieces: AsyncIterator[bytes], receive: Receive, send: Send
    ) -> None:
        gone = asyncio.ensure_future(_disconnected(receive))
        try:
            if first:
                await send({"type": "http.response.body", "body": first, "more_body": True})
            async for piece in pieces:
                if gone.done():
                    return  # the client left: stop reading
                await send({"type": "http.response.body", "body": piece, "more_body": True})
            if not gone.done():
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            return  # ASGI 2.4 servers raise this on a send to a client that has left
        finally:
            gone.cancel()


async def _disconnected(receive: Receive) -> None:
    """Return when the client has gone (``http.disconnect``)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
