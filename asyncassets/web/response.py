"""``FileResponse``: a stored file as an HTTP response, with ranges and caching."""

from __future__ import annotations

import asyncio
import datetime as dt
import mimetypes
import re
import secrets
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from typing import Any

from starlette.background import BackgroundTask
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ..connection import get_db
from ..errors import FileNotFound
from ..fields import FileProxy
from ..files.urls import content_disposition
from ..storage import Store
from ..storage.catalogue import content_type_of, content_version, original_length
from ..storage.read import iter_original
from .http import ByteRange, Unsatisfiable, etag_matches, http_date, parse_http_date, parse_range

__all__ = ["DEFAULT_CACHE_CONTROL", "DEFAULT_MAX_RANGES", "FileResponse"]

#: Caches may keep the file but must ask (a cheap 304) before using it again: a
#: document's file can be replaced at the same URL.
DEFAULT_CACHE_CONTROL = "no-cache"
#: Most ranges answered as ``multipart/byteranges``; more are answered with the
#: whole file (RFC 9110 lets a server ignore a Range it finds abusive).
DEFAULT_MAX_RANGES = 16

_CONTENT_TYPE = re.compile(r"^[A-Za-z0-9!#$&^_.+-]+/[A-Za-z0-9!#$&^_.+-]+(\s*;[ -~]*)?$")
#: Types a browser runs scripts in when it shows them: served inline with
#: ``Content-Security-Policy: sandbox``, so an uploaded page cannot act as the site.
_ACTIVE_TYPES = frozenset(
    {
        "text/html",
        "application/xhtml+xml",
        "image/svg+xml",
        "text/xml",
        "application/xml",
        "text/javascript",
        "application/javascript",
    }
)
#: Headers only the response computes; a caller's ``headers`` cannot replace them.
_COMPUTED = frozenset({b"content-length", b"content-range"})


def _media_type(explicit: str | None, stored: str | None, filename: str | None) -> str:
    for candidate in (explicit, stored, mimetypes.guess_type(filename or "")[0]):
        if candidate and _CONTENT_TYPE.match(candidate):
            return candidate
    return "application/octet-stream"


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

        @app.get("/animals/{pk}/photo")
        async def photo(pk: str, request: Request):
            animal = await Animal.objects.get(pk=pk)
            return FileResponse(animal.photo, request)

    A Starlette response, so it works in Starlette, FastAPI and any ASGI app
    (``await response(scope, receive, send)``), on every storage. When it is sent
    it reads the file's catalogue entry (one query) and answers:

    * ``200`` with the file, ``Accept-Ranges: bytes``, ``Content-Length``,
      ``Content-Type`` (the stored one, else guessed from the file name),
      ``ETag`` (the SHA-256 of the bytes, strong; a weak stand-in for legacy files
      without one), ``Last-Modified`` (the upload time), ``Cache-Control`` and
      ``Content-Disposition``;
    * ``206`` for a satisfiable ``Range``: one range with ``Content-Range``,
      several as ``multipart/byteranges``; only those bytes are read from storage
      (a compressed file is inflated from its start, and only the range is sent);
    * ``416`` with ``Content-Range: bytes */<length>`` when no range overlaps;
    * ``304`` for ``If-None-Match`` / ``If-Modified-Since`` that still match, and
      ``412`` for ``If-Match`` / ``If-Unmodified-Since`` that do not;
    * headers only for ``HEAD`` (no byte is read); ``405`` for other methods;
    * ``404`` when the field is empty or its file is missing.

    See :mod:`asyncassets.web.http` for how odd and hostile ``Range`` headers are
    treated. A file deleted or replaced while its bytes are being sent raises
    :class:`~asyncassets.errors.FileDeletedWhileReading` out of the response, so the
    server closes the connection short of ``Content-Length``: the client sees a
    truncated response, never bytes of two files. A client that disconnects
    stops the reading at the next piece.

    Every response carries ``X-Content-Type-Options: nosniff``; a type a browser
    would run scripts in (HTML, SVG, XML, JavaScript) served inline also gets
    ``Content-Security-Policy: sandbox``.

    :param proxy: the file (``doc.photo``, or an image's ``doc.photo.thumbnail``).
    :param request: the request being answered. Optional: the ``Range`` and
        conditional headers are read from the ASGI scope the response is sent in.
    :param download: ``Content-Disposition: attachment`` (save) rather than inline.
    :param filename: the name given in ``Content-Disposition``; the stored one by default.
    :param content_type: overrides the stored ``Content-Type``.
    :param cache_control: the ``Cache-Control`` value (``None``: no header). The
        default, ``no-cache``, lets browsers keep the file and revalidate it with a
        304; pass ``"public, max-age=31536000, immutable"`` for URLs that never
        change their file.
    :param max_ranges: most ranges answered as ``multipart/byteranges``; a Range
        with more (after coalescing overlapping ones) gets the whole file.
    :param headers: more headers (they replace computed ones of the same name,
        except ``Content-Length`` and ``Content-Range``).
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
        headers: Mapping[str, str] | None = None,
        background: BackgroundTask | None = None,
    ) -> None:
        if isinstance(max_ranges, bool) or not isinstance(max_ranges, int) or max_ranges < 1:
            raise ValueError(f"max_ranges must be an int >= 1, not {max_ranges!r}")
        self.proxy = proxy
        self.request = request
        self.download = bool(download)
        self.filename = filename
        self.content_type = content_type
        self.cache_control = cache_control
        self.max_ranges = max_ranges
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
        of the constructor.
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
        entry = await self._locate()
        if entry is None:
            await self._plain(send, 404, "Not Found")
            return
        store, doc = entry
        headers = self.request.headers if self.request is not None else Headers(scope=scope)
        await self._answer(store, doc, method, headers, receive, send)
        if self.background is not None:
            await self.background()

    async def _locate(self) -> tuple[Store, Mapping[str, Any]] | None:
        if self._entry is not None:
            return self._entry
        proxy = self.proxy
        if proxy is None or proxy.file_id is None:
            return None
        store = proxy.storage.bind(get_db(proxy.db_alias))
        doc = await store.find(proxy.file_id)
        return None if doc is None else (store, doc)

    async def _answer(
        self,
        store: Store,
        doc: Mapping[str, Any],
        method: str,
        request: Headers,
        receive: Receive,
        send: Send,
    ) -> None:
        length = original_length(doc)
        version, strong = content_version(doc)
        etag = f'"{version}"' if strong else f'W/"{version[:40]}"'
        modified = _seconds_precision(doc.get("uploadDate"))
        validators: list[tuple[bytes, bytes]] = [(b"etag", etag.encode())]
        if modified is not None:
            validators.append((b"last-modified", http_date(modified).encode()))
        if self.cache_control is not None:
            validators.append((b"cache-control", self.cache_control.encode("latin-1")))

        status = self._precondition(request, etag, modified)
        if status == 412:
            await self._plain(send, 412, "Precondition Failed", validators)
            return
        if status == 304:
            await self._send_start(send, 304, validators)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return

        name = self.filename if self.filename is not None else doc.get("filename")
        media_type = _media_type(self.content_type, content_type_of(doc), name)
        headers = [
            *validators,
            (b"accept-ranges", b"bytes"),
            (b"x-content-type-options", b"nosniff"),
        ]
        if name or self.download:
            disposition = content_disposition(self.download, name)
            headers.append((b"content-disposition", disposition.encode("latin-1")))
        if not self.download and media_type.split(";")[0].strip().lower() in _ACTIVE_TYPES:
            headers.append((b"content-security-policy", b"sandbox"))

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
            plan = [(b"", ByteRange(0, length), b"")]
            status, body_type = 200, media_type
        elif len(ranges) == 1:
            plan = [(b"", ranges[0], b"")]
            status, body_type = 206, media_type
            headers.append((b"content-range", ranges[0].content_range(length).encode()))
        else:
            boundary = secrets.token_hex(16)
            plan = [
                (
                    (
                        f"--{boundary}\r\nContent-Type: {media_type}\r\n"
                        f"Content-Range: {part.content_range(length)}\r\n\r\n"
                    ).encode("latin-1"),
                    part,
                    b"\r\n",
                )
                for part in ranges
            ]
            plan[-1] = (plan[-1][0], plan[-1][1], f"\r\n--{boundary}--\r\n".encode())
            status, body_type = 206, f"multipart/byteranges; boundary={boundary}"
        size = sum(len(head) + len(part) + len(tail) for head, part, tail in plan)
        headers += [
            (b"content-type", body_type.encode("latin-1")),
            (b"content-length", str(size).encode()),
        ]

        if method == "HEAD":
            await self._send_start(send, status, headers)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return

        # Read the first piece before answering: a file gone by now is a clean 404.
        pieces = self._body(store, doc, plan)
        try:
            try:
                first = await anext(pieces)
            except StopAsyncIteration:
                first = b""
            except FileNotFound:
                await self._plain(send, 404, "Not Found")
                return
            await self._send_start(send, status, headers)
            await self._stream(first, pieces, receive, send)
        finally:
            await pieces.aclose()

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
        replaced = {k for k, _ in mine if k != b"set-cookie"}
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
        kept = [(k, v) for k, v in headers or [] if k not in (b"content-type", b"content-length")]
        await self._send_start(
            send,
            status,
            [
                *kept,
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
            ],
        )
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def _body(
        self,
        store: Store,
        doc: Mapping[str, Any],
        plan: list[tuple[bytes, ByteRange, bytes]],
    ) -> AsyncGenerator[bytes, None]:
        """The body's pieces; the first one comes from storage (see :meth:`_answer`)."""
        pending = b""
        for head, part, tail in plan:
            reader = iter_original(store, doc, part.start, part.end)
            try:
                async for piece in reader:
                    if pending or head:
                        piece = pending + head + piece
                        pending = head = b""
                    yield piece
            finally:
                await reader.aclose()
            pending += head + tail
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
