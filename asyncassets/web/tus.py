"""``tus_app``: resumable uploads into a document's ``FileField`` (the tus 1.0 protocol).

.. code-block:: python

    async def authorize(request, upload):
        if upload.id is None:                       # creation: say where it goes
            user = await current_user(request)
            return UploadTarget(user, "avatar")
        return upload.info["owner"] == request.headers.get("x-user")

    app.mount("/uploads", tus_app(authorize))

A client (tus-js-client, Uppy, tuspy) creates an upload with ``POST``, sends its
bytes with ``PATCH`` in as many requests as it likes, asks where it stands with
``HEAD`` after a dropped connection, and may give up with ``DELETE``. The bytes
are kept durably as they arrive (:mod:`asyncassets.storage.resumable`); the
``PATCH`` that completes them stores them in the field's storage through the
field's rules and moves the document's reference to them with the switch
:meth:`~asyncassets.files.proxy.FileProxy.replace` uses. See :doc:`/uploads`.

An upload is attached once. The file it stores names it (metadata
``tus_upload``, :data:`~asyncassets.storage.resumable.UPLOAD_MARK`), and its
session is marked done by the finish after the switch, or, if that finish died
first, by the reference writer before any later change moves the field away
from the file (:mod:`asyncassets.references`). Before its switch, a finish
records in the session what the field holds (the value the switch is
conditional on). A retried finish reads the document, then the session: the
field holding the upload's file, the session done, or the field holding
something other than what an earlier finish recorded (it changed since, by
whatever write) is complete (``204``) and attaches nothing; else the upload was
never attached, and it is.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as dt
import email.utils
import hashlib
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from dataclasses import field as _field
from typing import Any
from urllib.parse import quote, unquote

from mongoengine.base import get_document
from pymongo.errors import PyMongoError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from .._tasks import spawn
from ..connection import get_db
from ..errors import (
    CorruptFile,
    DirectUploadError,
    FileConflict,
    FileValidationError,
    KeyTaken,
    ResumableUploadError,
    StorageError,
    StoredObjectMissing,
    UploadChecksumMismatch,
    UploadExpired,
    UploadLocked,
    UploadNotFound,
    UploadOffsetMismatch,
    UploadTooLarge,
)
from ..files.proxy import FileProxy
from ..files.rules import make_guard
from ..files.sniffing import HEAD_SIZE
from ..ops.scope import declared_storage, declared_storages
from ..storage import FileSystemStorage, GridFSStorage, S3Storage
from ..storage.objects.resumable_s3 import INTO as INTO_S3
from ..storage.objects.resumable_s3 import S3Parts
from ..storage.objects.store import ObjectStore
from ..storage.resumable import (
    DEFAULT_LEASE,
    DEFAULT_STAGING_CHUNK,
    DONE,
    UPLOAD_MARK,
    UploadSessions,
)

__all__ = ["TUS_EXTENSIONS", "TusUpload", "UploadTarget", "tus_app"]

_logger = logging.getLogger("asyncassets.web")

TUS_VERSION = "1.0.0"
#: The tus extensions :func:`tus_app` offers.
TUS_EXTENSIONS = ("creation", "creation-with-upload", "termination", "expiration", "checksum")
#: Checksum algorithms of ``Upload-Checksum`` (the tus spec requires sha1).
_ALGORITHMS = {"sha1": "sha1", "sha256": "sha256"}
_OCTETS = "application/offset+octet-stream"
_DIGITS = re.compile(r"[0-9]{1,19}")
_KEY = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
#: The metadata keys a file name and a content type are taken from, as
#: tus-js-client, Uppy and tuspy send them.
_NAME_KEYS = ("filename", "name")
_TYPE_KEYS = ("filetype", "type", "contentType")
#: The longest upload whatever the app allows (MongoDB stores 64-bit integers).
MAX_LENGTH = 2**62


@dataclass(frozen=True)
class UploadTarget:
    """Where an upload goes: a saved document and the name of its ``FileField``.

    :ivar info: JSON-like values kept with the upload and shown to the hook on
        later requests (``upload.info``): who created it, say.
    """

    document: Any
    field: str
    info: Mapping[str, Any] = _field(default_factory=dict)


@dataclass(frozen=True)
class TusUpload:
    """What the authorisation hook is shown.

    :ivar id: ``None`` when the request creates the upload, else its id.
    :ivar length: the declared length in bytes.
    :ivar metadata: the client's ``Upload-Metadata``, decoded (values ``None``
        for a key sent without one).
    :ivar info: at creation empty; later what the hook's :class:`UploadTarget`
        carried, with ``document`` (class name, id) and ``field``.
    """

    id: str | None
    length: int
    metadata: Mapping[str, str | None]
    info: Mapping[str, Any]


#: The hook: ``(request, upload) -> UploadTarget`` at creation (``None`` or
#: ``False`` refuses, 403), ``-> bool`` on later requests.
Authorize = Callable[[Request, TusUpload], Awaitable[Any]]


class _Refused(Exception):
    def __init__(self, status: int, text: str, headers: Mapping[str, str] | None = None):
        super().__init__(text)
        self.status = status
        self.text = text
        self.headers = dict(headers or {})


def tus_app(
    authorize: Authorize,
    *,
    max_size: int | None = None,
    expires: dt.timedelta = dt.timedelta(hours=24),
    lease: dt.timedelta = DEFAULT_LEASE,
    chunk_size: int = DEFAULT_STAGING_CHUNK,
    max_writes: int | None = None,
) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """An ASGI app speaking tus 1.0 (core, creation, creation-with-upload,
    termination, expiration, checksum) into documents' ``FileField``\\ s.

    Mount it in Starlette (``Mount("/uploads", tus_app(authorize))``) or FastAPI
    (``app.mount("/uploads", tus_app(authorize))``). Uploads are created at the
    mount point and live at ``<mount>/<alias>/<catalogue>/<id>``, the id being
    32 random hex digits.

    Every request is authorised by ``authorize(request, upload)``
    (:class:`TusUpload`): at creation it returns an :class:`UploadTarget` (the
    saved document and field the upload is for) or ``None``/``False`` (403);
    later (``HEAD``, ``PATCH``, ``DELETE``) a truth value (false: 403).

    The field's rules apply: a declared length over the field's ``max_size``
    (or this app's) is refused at creation (413), and so is a file name or a
    declared content type the field refuses (415); the first bytes are sniffed
    when they arrive (415, and the upload is dropped). The ``PATCH`` that
    completes the bytes stores them and moves the reference (see :doc:`/uploads`
    for what a failure there leaves and how a client completes it).

    :param authorize: the hook.
    :param max_size: the largest upload, in bytes, whatever the field allows
        (``Tus-Max-Size``).
    :param expires: how long an upload lives after its creation (``Upload-Expires``);
        the sweep removes it after.
    :param lease: how long one ``PATCH`` holds the upload against others unless
        it makes progress; a server killed mid-``PATCH`` blocks the upload this long.
    :param chunk_size: bytes per staged chunk.
    :param max_writes: how many ``PATCH`` requests this app (this process) writes
        at once; one more is ``503`` with ``Retry-After`` (tus clients retry it),
        and a creation's body is then not taken (``201`` at offset 0). Each write
        holds about 13 MiB, so this bounds the process's memory for uploads.
        ``None``: no bound.
    """
    if max_size is not None and (isinstance(max_size, bool) or not isinstance(max_size, int)
                                 or max_size < 0):
        raise ValueError(f"max_size must be an int >= 0 or None, not {max_size!r}")
    if not isinstance(expires, dt.timedelta) or expires <= dt.timedelta(0):
        raise ValueError(f"expires must be a positive timedelta, not {expires!r}")
    if max_writes is not None and (isinstance(max_writes, bool)
                                   or not isinstance(max_writes, int) or max_writes < 1):
        raise ValueError(f"max_writes must be an int >= 1 or None, not {max_writes!r}")
    return _TusApp(authorize, max_size, expires, lease, chunk_size, max_writes)


class _TusApp:
    def __init__(
        self,
        authorize: Authorize,
        max_size: int | None,
        expires: dt.timedelta,
        lease: dt.timedelta,
        chunk_size: int,
        max_writes: int | None = None,
    ) -> None:
        self.authorize = authorize
        self.max_size = max_size
        self.expires = expires
        self.lease = lease
        self.chunk_size = chunk_size
        self.max_writes = max_writes
        #: PATCH (and creation) bodies being written now, in this process.
        self._writing = 0
        self._sessions: dict[tuple[str, str, int], UploadSessions] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        try:
            response = await self._handle(request)
        except _Refused as refused:
            response = _text(refused.status, refused.text, refused.headers)
        await response(scope, receive, send)

    def sessions(self, alias: str, catalogue: str) -> UploadSessions:
        db = get_db(alias)
        key = (alias, catalogue, id(db.client))
        found = self._sessions.get(key)
        if found is None:
            storage = declared_storage(alias, catalogue)
            store = storage.bind(db) if isinstance(storage, FileSystemStorage) else None
            found = UploadSessions(db, catalogue, chunk_size=self.chunk_size, lease=self.lease,
                                   store=store if isinstance(store, ObjectStore) else None)
            self._sessions[key] = found
        return found

    # -- dispatch ------------------------------------------------------------------

    async def _handle(self, request: Request) -> Response:
        method = request.method
        override = request.headers.get("x-http-method-override")
        if method == "POST" and override:
            method = override.upper()
        path = request.scope.get("path", "")
        root = request.scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]
        parts = [p for p in path.split("/") if p]
        if method == "OPTIONS":
            return self._options()
        if request.headers.get("tus-resumable") != TUS_VERSION:
            raise _Refused(412, f"this server speaks tus {TUS_VERSION}; send "
                           f"Tus-Resumable: {TUS_VERSION}", {"Tus-Version": TUS_VERSION})
        if not parts:
            if method != "POST":
                raise _Refused(405, "create an upload with POST", {"Allow": "POST, OPTIONS"})
            return await self._create(request)
        if len(parts) != 3:
            raise _Refused(404, "no such upload")
        alias, catalogue, upload_id = (unquote(p) for p in parts)
        if (alias, catalogue) not in declared_storages():
            raise _Refused(404, "no such upload")
        sessions = self.sessions(alias, catalogue)
        if method == "HEAD":
            return await self._head(request, sessions, upload_id)
        if method == "PATCH":
            return await self._patch(request, sessions, upload_id)
        if method == "DELETE":
            return await self._delete(request, sessions, upload_id)
        raise _Refused(405, f"{method} is not a tus method here",
                       {"Allow": "HEAD, PATCH, DELETE, OPTIONS"})

    def _options(self) -> Response:
        headers = {
            "Tus-Version": TUS_VERSION,
            "Tus-Extension": ",".join(TUS_EXTENSIONS),
            "Tus-Checksum-Algorithm": ",".join(_ALGORITHMS),
        }
        if self.max_size is not None:
            headers["Tus-Max-Size"] = str(self.max_size)
        return _empty(204, headers)

    # -- POST ------------------------------------------------------------------------

    async def _create(self, request: Request) -> Response:
        if "upload-defer-length" in request.headers:
            raise _Refused(400, "Upload-Defer-Length is not supported: send Upload-Length")
        length = _number(request.headers.get("upload-length"), "Upload-Length")
        if length > MAX_LENGTH:
            raise _Refused(413, f"Upload-Length {length} is over {MAX_LENGTH} bytes")
        if self.max_size is not None and length > self.max_size:
            raise _Refused(413, f"Upload-Length {length} is over this server's "
                           f"Tus-Max-Size {self.max_size}")
        raw_metadata = request.headers.get("upload-metadata", "")
        metadata = parse_metadata(raw_metadata)
        upload = TusUpload(None, length, metadata, {})
        target = await self.authorize(request, upload)
        if not isinstance(target, UploadTarget):
            if target is None or target is False:
                raise _Refused(403, "this upload was refused")
            raise TypeError(
                f"the tus authorize hook must return an UploadTarget (or None to refuse) "
                f"when an upload is created, not {type(target).__name__}"
            )
        document, proxy = _target_proxy(target)
        limit = getattr(getattr(proxy._field, "rules", None), "max_size", None)
        if limit is not None and length > limit:
            raise _Refused(413, f"{target.field}: Upload-Length {length} is over the "
                           f"field's max_size={limit} bytes")
        filename = _first(metadata, _NAME_KEYS)
        content_type = _first(metadata, _TYPE_KEYS)
        try:
            guard = make_guard(proxy, content_type, filename, {})
        except FileValidationError as exc:
            raise _Refused(415, str(exc)) from exc
        alias = proxy.db_alias
        catalogue = proxy.storage.collection_name
        sessions = self.sessions(alias, catalogue)
        info = {
            "document": {"class": type(document)._class_name, "id": document.pk},
            "field": target.field,
            "filename": filename,
            "content_type": guard.content_type if content_type is not None else None,
            "metadata": raw_metadata,
            "app": dict(target.info),
        }
        expires = dt.datetime.now(dt.timezone.utc) + self.expires
        if _writes_in_s3(proxy) and length > 0:
            session = await self._create_in_s3(sessions, proxy, document, target, info,
                                               guard, length, expires)
        else:
            session = await sessions.create(
                length=length,
                expires=expires,
                info=info,
                into=_in_place_target(proxy, sessions),
                filename=guard.filename,
                context=proxy._upload_context(),
            )
        location = _location(request, alias, catalogue, session["_id"])
        headers = {"Location": location, "Upload-Expires": _http_date(session["expires"])}
        if request.headers.get("content-type") == _OCTETS and not self._full():
            # creation-with-upload: the body is the first bytes (unless this
            # process writes all it may: then the client PATCHes them later).
            try:
                session = await self._write(request, sessions, session, 0)
            except _Refused as refused:
                if refused.status == 413:
                    # More bytes than declared: no one learns this upload's URL
                    # from a 413, so it goes now rather than at its expiry.
                    await self._remove(sessions, session)
                    raise
                if refused.status not in (400, 460):
                    # Refused by the field, or complete but not attached: a 201
                    # would tell the client it is done. Where it is, for a retry.
                    refused.headers.setdefault("Location", location)
                    raise
                # A bad checksum, a body cut short: the upload exists and the
                # client resumes it from HEAD's offset.
                _logger.info("first bytes of new upload %s not kept: %s",
                             session["_id"], refused.text)
                session = await sessions.get(session["_id"])
        elif length == 0:
            # Complete as created: tus-js-client, Uppy and tuspy send no PATCH for
            # an empty file, so this request attaches it.
            try:
                await self._finish(sessions, session)
            except _Refused as refused:
                refused.headers.setdefault("Location", location)
                raise
        headers["Upload-Offset"] = str(session["offset"])
        return _empty(201, headers)

    # -- HEAD, DELETE ---------------------------------------------------------------------

    async def _session(
        self, request: Request, sessions: UploadSessions, upload_id: str
    ) -> dict[str, Any]:
        try:
            session = await sessions.get(upload_id)
        except UploadExpired as exc:
            raise _Refused(410, str(exc)) from exc
        except UploadNotFound as exc:
            raise _Refused(404, str(exc)) from exc
        info = session.get("info") or {}
        upload = TusUpload(
            upload_id, int(session["length"]), parse_metadata(info.get("metadata") or ""), info
        )
        if not await self.authorize(request, upload):
            raise _Refused(403, "this request on the upload was refused")
        return session

    async def _head(self, request: Request, sessions: UploadSessions, upload_id: str) -> Response:
        session = await self._session(request, sessions, upload_id)
        if session["offset"] == session["length"] and session.get("state") != DONE:
            # Every byte is in but the upload is not attached (its finish failed,
            # or its process died). A client that resumes reads HEAD, sees the whole
            # offset and stops (tuspy, tus-js-client): so HEAD attaches it, as the
            # last PATCH sent again would, and answers only once it is attached.
            await self._finish(sessions, session, busy=503)
        headers = {
            "Upload-Offset": str(session["offset"]),
            "Upload-Length": str(session["length"]),
            "Upload-Expires": _http_date(session["expires"]),
            "Cache-Control": "no-store",
        }
        raw = (session.get("info") or {}).get("metadata")
        if raw:
            headers["Upload-Metadata"] = raw
        return _empty(200, headers)

    async def _delete(
        self, request: Request, sessions: UploadSessions, upload_id: str
    ) -> Response:
        session = await self._session(request, sessions, upload_id)
        if session.get("state") == DONE:
            raise _Refused(409, "this upload is complete and attached; delete the file "
                           "through its document instead")
        try:
            await sessions.terminate(upload_id)
        except UploadLocked as exc:
            raise _Refused(409, str(exc)) from exc
        except UploadNotFound as exc:
            raise _Refused(404, str(exc)) from exc
        if session.get("into") == INTO_S3:
            await self._abort_s3(sessions, session)
        return _empty(204, {})

    # -- PATCH ------------------------------------------------------------------------

    async def _patch(self, request: Request, sessions: UploadSessions, upload_id: str) -> Response:
        if request.headers.get("content-type") != _OCTETS:
            raise _Refused(415, f"PATCH takes Content-Type: {_OCTETS}")
        offset = _number(request.headers.get("upload-offset"), "Upload-Offset")
        session = await self._session(request, sessions, upload_id)
        length = int(session["length"])
        if session["offset"] == length and offset == length:
            # Complete already: a retried last PATCH (the attach failed or its
            # reply was lost) attaches it, or finds it attached.
            await self._finish(sessions, session)
            return _empty(204, _offset_headers(session))
        if offset != session["offset"]:
            raise _Refused(409, f"the upload is at offset {session['offset']}, not {offset}; "
                           "resume from its offset", {"Upload-Offset": str(session["offset"])})
        declared = request.headers.get("content-length")
        if declared is not None and _DIGITS.fullmatch(declared) and (
            offset + int(declared) > length
        ):
            raise _Refused(413, f"this PATCH goes past the upload's length of {length} bytes")
        session = await self._write(request, sessions, session, offset)
        return _empty(204, _offset_headers(session))

    async def _write(
        self, request: Request, sessions: UploadSessions, session: dict[str, Any], offset: int
    ) -> dict[str, Any]:
        if self._full():
            raise _Refused(503, f"this server is writing {self._writing} uploads already "
                           "(max_writes); retry shortly", {"Retry-After": "2"})
        self._writing += 1
        try:
            return await self._write_body(request, sessions, session, offset)
        finally:
            self._writing -= 1

    def _full(self) -> bool:
        return self.max_writes is not None and self._writing >= self.max_writes

    async def _write_body(
        self, request: Request, sessions: UploadSessions, session: dict[str, Any], offset: int
    ) -> dict[str, Any]:
        upload_id = session["_id"]
        checksum = _checksum(request.headers.get("upload-checksum"))
        pieces: AsyncIterator[Any] = request.stream()
        if offset < min(HEAD_SIZE, int(session["length"])):
            # The first bytes are not all in yet: sniff them with the ones kept.
            try:
                kept = await sessions.head(session, offset) if offset else b""
            except StoredObjectMissing as exc:
                # The temp file of a directory upload is gone: its bytes are lost.
                await sessions.remove(upload_id)
                raise _Refused(410, str(exc)) from exc
            except StorageError as exc:
                raise _storage_failed(exc) from exc
            pieces = self._sniffed(pieces, session, kept)
        try:
            if session.get("into") == INTO_S3:
                parts = self._s3_parts(sessions, session)
                session = await parts.write(upload_id, offset, pieces, checksum=checksum)
            else:
                session = await sessions.write(upload_id, offset, pieces, checksum=checksum)
        except UploadChecksumMismatch as exc:
            raise _Refused(460, str(exc)) from exc
        except UploadOffsetMismatch as exc:
            raise _Refused(409, str(exc), {"Upload-Offset": str(exc.offset)}) from exc
        except UploadLocked as exc:
            raise _Refused(409, str(exc)) from exc
        except UploadTooLarge as exc:
            raise _Refused(413, str(exc)) from exc
        except UploadExpired as exc:
            raise _Refused(410, str(exc)) from exc
        except UploadNotFound as exc:
            raise _Refused(404, str(exc)) from exc
        except FileValidationError as exc:
            await self._remove(sessions, session)
            raise _Refused(415, f"{exc}; the upload was dropped") from exc
        except DirectUploadError as exc:
            raise _Refused(410 if exc.status == 404 else exc.status, str(exc)) from exc
        except ClientDisconnect:
            # What arrived is kept; no one is listening for an answer.
            raise _Refused(400, "the client went away") from None
        except StoredObjectMissing as exc:
            # The temp file of a directory upload is gone: its bytes are lost.
            await sessions.remove(upload_id)
            raise _Refused(410, str(exc)) from exc
        except StorageError as exc:
            raise _storage_failed(exc) from exc
        if session["offset"] == session["length"]:
            await self._finish(sessions, session)
        return session

    def _sniffed(
        self, pieces: AsyncIterator[Any], session: Mapping[str, Any], kept: bytes
    ) -> AsyncIterator[Any]:
        """Check the file's first bytes by the field's rules as they pass: ``kept``
        (the bytes before this write's offset) and this write's, as soon as there
        are :data:`HEAD_SIZE` of them (or the whole file). A write that ends
        short of them leaves the check to the next one, whatever the cut; the
        stored file is checked again whole."""
        info = session.get("info") or {}
        length = int(session["length"])

        async def check() -> AsyncIterator[Any]:
            head = bytearray(kept)
            checked = False
            async for piece in pieces:
                if not checked:
                    head += bytes(piece[: HEAD_SIZE - len(head)])
                    if len(head) >= min(HEAD_SIZE, length):
                        await self._check_head(info, bytes(head))
                        checked = True
                yield piece

        return check()

    async def _check_head(self, info: Mapping[str, Any], head: bytes) -> None:
        _document, proxy = await _load_target(info)
        guard = make_guard(proxy, info.get("content_type"), info.get("filename"), {})
        guard.check_head(head)

    # -- finishing ------------------------------------------------------------------------

    async def _finish(
        self, sessions: UploadSessions, session: Mapping[str, Any], *, busy: int = 409
    ) -> None:
        """Attach a complete upload (once). ``busy``: the answer when another request
        holds it (a write, or another finish): 409 to a PATCH; 503 to a HEAD, which
        a client retries."""
        upload_id = session["_id"]
        if session.get("state") == DONE:
            return
        try:
            session = await sessions.begin_finish(upload_id)
        except UploadNotFound as exc:  # and UploadExpired: swept or terminated meanwhile
            raise _Refused(410, str(exc)) from exc
        except UploadLocked as exc:
            raise _Refused(busy, str(exc), {"Retry-After": "1"} if busy == 503 else None
                           ) from exc
        except ResumableUploadError as exc:
            raise _Refused(409, str(exc)) from exc
        if session.get("state") == DONE:
            return
        # One finish at a time: it holds the session's lease, renewed while it runs
        # (a large staged file takes a while to store), given back at its end.
        token = session["lease"]["token"]
        # The attach runs as a task of its own, which the keeper cancels when it
        # cannot renew the lease before it runs out: another finish may take the
        # upload over then, and this one must not switch after it.
        attach = asyncio.ensure_future(self._attach(sessions, session))
        lost: list[bool] = []
        keeper = spawn(self._keep_lease(sessions, upload_id, token, attach, lost))
        try:
            try:
                await attach
            except asyncio.CancelledError:
                if not lost:
                    raise
                raise _Refused(503, "the upload is complete but could not be attached yet "
                               "(its finish lost its lease); send the last PATCH again",
                               {"Retry-After": "1"}) from None
        finally:
            keeper.cancel()
            try:
                await sessions.end_finish(upload_id, token)
            except PyMongoError as exc:
                # The lease runs out by itself; a retry waits for that.
                _logger.warning("upload %s: the lease of its finish was not given back: "
                                "%s", upload_id, exc)

    async def _keep_lease(self, sessions: UploadSessions, upload_id: str, token: str,
                          attach: asyncio.Future[Any], lost: list[bool]) -> None:
        """Renew the finish's lease every third of it; a renewal that fails is tried
        again at the next, unless the lease would run out before: then (or when it
        was taken over) cancel ``attach`` before it can switch unowned."""
        loop = asyncio.get_running_loop()
        period = sessions.lease.total_seconds()
        held_until = loop.time() + period
        while True:
            await asyncio.sleep(period / 3)
            try:
                await sessions.renew(upload_id, token)
            except (UploadLocked, PyMongoError) as exc:
                _logger.warning("upload %s: the lease of its finish was not renewed: %s",
                                upload_id, exc)
                if isinstance(exc, UploadLocked) or loop.time() + period / 3 >= held_until:
                    lost.append(True)
                    attach.cancel()
                    return
                continue
            held_until = loop.time() + period

    async def _attach(self, sessions: UploadSessions, session: Mapping[str, Any]) -> None:
        upload_id = session["_id"]
        info = session.get("info") or {}
        _document, proxy = await _load_target(info)
        if await _attached(sessions, upload_id, proxy):
            return
        # What the switch below is conditional on, recorded before it: a finish
        # retried after this one died finds the field holding something else if it
        # changed since, whether or not this switch applied, and attaches nothing.
        try:
            before = await sessions.record_switch_from(
                upload_id, session["lease"]["token"], proxy.grid_id)
        except UploadLocked as exc:
            raise _Refused(409, str(exc)) from exc
        except PyMongoError as exc:
            raise _not_attached_yet(upload_id, exc) from exc
        if before != proxy.grid_id:
            await sessions.mark_done(upload_id, session.get("file_id"))
            if session.get("into") == INTO_S3:
                # Its multipart upload, if not completed, goes now (else at expiry).
                await self._abort_s3(sessions, session)
            return
        if session.get("into") in ("gridfs", "directory"):
            await self._finish_in_place(sessions, session, proxy)
            return
        if session.get("into") == INTO_S3:
            await self._finish_in_s3(sessions, session, proxy)
            return
        try:
            await proxy.replace(
                sessions.read(session),
                content_type=info.get("content_type"),
                filename=info.get("filename"),
                **{UPLOAD_MARK: upload_id},
            )
        except FileValidationError as exc:
            await sessions.remove(upload_id)
            raise _Refused(415, f"{exc}; the upload was dropped") from exc
        except FileConflict as exc:
            # Refused for sure: a retry switches from what the field holds then.
            await sessions.forget_switch_from(upload_id, session["lease"]["token"])
            raise _Refused(409, f"{exc} (send the last PATCH again to retry)") from exc
        except UploadNotFound as exc:
            # Its staged bytes went meanwhile (terminated or swept): nothing to store.
            await sessions.remove(upload_id)
            raise _Refused(410, str(exc)) from exc
        except (PyMongoError, StorageError) as exc:
            # Unknown outcome or storage failure: the staged bytes stay, and a
            # retried last PATCH finds out (the stored file names this upload).
            raise _not_attached_yet(upload_id, exc) from exc
        await sessions.mark_done(upload_id, proxy.grid_id)

    async def _finish_in_place(
        self, sessions: UploadSessions, session: Mapping[str, Any], proxy: FileProxy
    ) -> None:
        """The bytes are where the file will have them already (the field's GridFS
        bucket, or a temp file beside its reserved key in a directory): check the
        first bytes by the field's rules, write the catalogue entry (putting the
        temp file in place), move the reference."""
        upload_id = session["_id"]
        info = session.get("info") or {}
        try:
            guard = make_guard(proxy, info.get("content_type"), info.get("filename"),
                               {UPLOAD_MARK: upload_id})
            guard.check_head(await sessions.head(session, HEAD_SIZE))
        except FileValidationError as exc:
            await sessions.remove(upload_id)
            raise _Refused(415, f"{exc}; the upload was dropped") from exc
        except StoredObjectMissing as exc:
            # Its bytes are gone (a temp file removed): nothing to attach.
            await sessions.remove(upload_id)
            raise _Refused(410, str(exc)) from exc
        except (PyMongoError, StorageError) as exc:
            raise _not_attached_yet(upload_id, exc) from exc
        try:
            if session.get("into") == "directory":
                files_doc = await sessions.complete_in_store(
                    session, filename=guard.filename, metadata=guard.metadata
                )
            else:
                files_doc = await sessions.complete_in_bucket(
                    session, proxy._bucket(), filename=guard.filename,  # type: ignore[arg-type]
                    metadata=guard.metadata,
                )
            await proxy.adopt(files_doc)
        except FileConflict as exc:
            await sessions.remove(upload_id)
            raise _Refused(409, f"{exc} The upload was dropped: upload again.") from exc
        except (CorruptFile, StoredObjectMissing, KeyTaken) as exc:
            # Its bytes are gone, or its key taken by another tool: nothing to attach.
            await sessions.remove(upload_id)
            raise _Refused(410, str(exc)) from exc
        except (PyMongoError, StorageError) as exc:
            raise _not_attached_yet(upload_id, exc) from exc
        await sessions.mark_done(upload_id, proxy.grid_id)

    # -- in place on S3 (asyncassets.storage.objects.resumable_s3) -------------------------

    async def _create_in_s3(
        self,
        sessions: UploadSessions,
        proxy: FileProxy,
        document: Any,
        target: UploadTarget,
        info: Mapping[str, Any],
        guard: Any,
        length: int,
        expires: dt.datetime,
    ) -> dict[str, Any]:
        """A session that owns a multipart upload under a reserved key."""
        store = proxy._bucket()
        assert isinstance(store, ObjectStore)
        try:
            return await S3Parts(sessions, store).create(
                length=length,
                expires=expires,
                info=info,
                filename=guard.filename,
                metadata=guard.metadata,
                context=proxy._upload_context(),
                target={"class": document._class_name, "pk": document.pk,
                        "field": target.field},
                alias=proxy.db_alias,
            )
        except DirectUploadError as exc:
            raise _Refused(exc.status, str(exc)) from exc
        except StorageError as exc:
            raise _Refused(503, f"the storage failed ({exc}); retry",
                           {"Retry-After": "1"}) from exc

    def _s3_parts(self, sessions: UploadSessions, session: Mapping[str, Any]) -> S3Parts:
        alias = str(session.get("alias"))
        storage = declared_storage(alias, sessions.catalogue)
        if type(storage) is not S3Storage:
            raise _Refused(410, "this upload's S3 storage is no longer declared here; start "
                           "a new upload")
        store = storage.bind(get_db(alias))
        return S3Parts(sessions, store)

    async def _abort_s3(self, sessions: UploadSessions, session: Mapping[str, Any]) -> None:
        """Abort a removed S3 session's multipart upload and release its key now; if
        that fails, the sweep does at its (now past) expiry."""
        try:
            await self._s3_parts(sessions, session).abort(session)
        except (_Refused, StorageError, PyMongoError) as exc:
            _logger.warning("upload %s: its multipart upload is left to the sweep: %s",
                            session["_id"], exc)

    async def _remove(self, sessions: UploadSessions, session: Mapping[str, Any]) -> None:
        await sessions.remove(session["_id"])
        if session.get("into") == INTO_S3:
            await self._abort_s3(sessions, session)

    async def _finish_in_s3(
        self, sessions: UploadSessions, session: Mapping[str, Any], proxy: FileProxy
    ) -> None:
        """Every part is in the multipart upload: check the first bytes by the
        field's rules, complete it into a catalogue entry, move the reference."""
        upload_id = session["_id"]
        info = session.get("info") or {}
        store = proxy._bucket()
        if not isinstance(store, ObjectStore):
            raise _Refused(410, "this field no longer stores in S3; start a new upload")
        parts = S3Parts(sessions, store)
        try:
            guard = make_guard(proxy, info.get("content_type"), info.get("filename"),
                               {UPLOAD_MARK: upload_id})
            head = parts.head(session)
            guard.check_head(head if head is not None
                             else await sessions.head(session, HEAD_SIZE))
        except FileValidationError as exc:
            await self._remove(sessions, session)
            raise _Refused(415, f"{exc}; the upload was dropped") from exc
        try:
            # The last part, if S3 failed when the write that completed the bytes
            # sent it (it was staged).
            session = await parts.flush(dict(session), session["lease"]["token"])
            entry = await parts.complete(session, filename=guard.filename,
                                         metadata=guard.metadata)
            await proxy.adopt(entry)
        except UploadExpired as exc:  # the multipart upload is gone
            await self._remove(sessions, session)
            raise _Refused(410, str(exc)) from exc
        except UploadLocked as exc:
            raise _Refused(409, str(exc)) from exc
        except DirectUploadError as exc:
            if exc.status in (409, 503):
                raise _Refused(503, f"the upload is complete but could not be attached yet "
                               f"({exc}); send the last PATCH again",
                               {"Retry-After": "1"}) from exc
            await self._remove(sessions, session)
            raise _Refused(410, f"{exc}; start a new upload") from exc
        except FileConflict as exc:
            await parts.failed(session, str(exc))
            await sessions.remove(upload_id)
            raise _Refused(409, f"{exc} The upload was dropped: upload again.") from exc
        except (PyMongoError, StorageError) as exc:
            raise _not_attached_yet(upload_id, exc) from exc
        await sessions.mark_done(upload_id, proxy.grid_id)
        await parts.done(session)


def _plain(proxy: FileProxy) -> bool:
    """Whether ``proxy``'s field stores the bytes as they come (no image processing,
    no compression): an upload to it can be written where the file keeps them."""
    rules = getattr(proxy._field, "rules", None)
    return type(proxy) is FileProxy and getattr(rules, "compress", None) is None


def _writes_in_s3(proxy: FileProxy) -> bool:
    """Whether an upload to ``proxy``'s field writes its parts into the S3 multipart
    upload of the finished object: a plain field on an S3 bucket."""
    return _plain(proxy) and type(proxy.storage) is S3Storage


def _storage_failed(exc: BaseException) -> _Refused:
    """The answer to a write the storage failed: what was recorded stays."""
    return _Refused(503, f"the storage failed ({exc}); resume from the upload's offset",
                    {"Retry-After": "2"})


def _not_attached_yet(upload_id: str, exc: BaseException) -> _Refused:
    """The answer to a finish that met a database or storage error, or an unknown
    outcome: the bytes stay, and a retried last PATCH finds out."""
    _logger.warning("upload %s could not be attached yet: %s", upload_id, exc)
    return _Refused(503, f"the upload is complete but could not be attached yet "
                    f"({type(exc).__name__}); send the last PATCH again",
                    {"Retry-After": "1"})


def _in_place_target(proxy: FileProxy, sessions: UploadSessions) -> Any:
    """Where an upload to ``proxy``'s field writes its bytes as the finished file
    has them, if it can: a plain file field (no image processing, no compression)
    on a GridFS bucket (its chunks, under the file's future ``_id``) or on a
    directory (a temp file beside the file's reserved key). Other fields stage the
    bytes and store them through
    :meth:`~asyncassets.files.proxy.FileProxy.replace` at the end: ``None``."""
    if not _plain(proxy):
        return None
    if type(proxy.storage) is GridFSStorage:
        return proxy._bucket()
    if type(proxy.storage) is FileSystemStorage and sessions.store is not None:
        return sessions.store
    return None


async def _attached(sessions: UploadSessions, upload_id: str, proxy: FileProxy) -> bool:
    """Whether the upload was attached already (recording it if need be): the field
    (``proxy``, just loaded) holds the file it made (an attach whose reply was lost,
    or whose process died before it marked the session done: marked now), or its
    session is done (the field moved away from that file since: the reference
    writer marked it before it did). Read in that order, so a change racing this
    retry is seen in one or the other. Neither: the upload was never attached."""
    if await _attached_already(proxy, upload_id):
        await sessions.mark_done(upload_id, proxy.grid_id)
        return True
    try:
        session = await sessions.get(upload_id)
    except UploadNotFound as exc:  # swept or terminated meanwhile
        raise _Refused(410, str(exc)) from exc
    return bool(session.get("state") == DONE)


async def _attached_already(proxy: FileProxy, upload_id: str) -> bool:
    """Whether the field holds the file this upload made."""
    if proxy.grid_id is None:
        return False
    entry = await proxy._bucket().find(proxy.grid_id)
    if entry is None:
        return False
    return bool((entry.get("metadata") or {}).get(UPLOAD_MARK) == upload_id)


def _target_proxy(target: UploadTarget) -> tuple[Any, FileProxy]:
    document = target.document
    if getattr(document, "pk", None) is None:
        raise TypeError(
            "the tus authorize hook returned an unsaved document: save it first, so the "
            "finished upload has a stored document to be attached to"
        )
    proxy = getattr(document, target.field, None)
    if not isinstance(proxy, FileProxy):
        raise TypeError(
            f"the tus authorize hook named {target.field!r}, which is not a FileField of "
            f"{type(document).__name__}"
        )
    return document, proxy


async def _load_target(info: Mapping[str, Any]) -> tuple[Any, FileProxy]:
    where = info.get("document") or {}
    try:
        cls = get_document(where.get("class"))
    except Exception as exc:  # mongoengine raises NotRegistered, a bare Exception subclass
        raise _Refused(410, f"the upload's document class {where.get('class')!r} is not "
                       "declared in this process") from exc
    document = await cls.objects(pk=where.get("id")).first()
    if document is None:
        raise _Refused(410, "the document this upload was for was deleted; the upload "
                       "cannot be attached")
    return _target_proxy(UploadTarget(document, str(info.get("field"))))


# -- headers -------------------------------------------------------------------------


def parse_metadata(raw: str) -> dict[str, str | None]:
    """``Upload-Metadata`` decoded: ``key base64,key2 base64,key3``.

    Strict: a key of token characters, at most once; a value of canonical base64
    that decodes to UTF-8.

    :raises _Refused: (400) anything else.
    """
    metadata: dict[str, str | None] = {}
    if not raw.strip():
        return metadata
    for pair in raw.split(","):
        bits = pair.strip().split(" ")
        if len(bits) > 2 or not _KEY.fullmatch(bits[0]):
            raise _Refused(400, f"Upload-Metadata: {pair.strip()[:40]!r} is not "
                           "'key base64value'")
        key = bits[0]
        if key in metadata:
            raise _Refused(400, f"Upload-Metadata: key {key!r} is given twice")
        if len(bits) == 1:
            metadata[key] = None
            continue
        try:
            value = base64.b64decode(bits[1], validate=True).decode("utf-8")
        except (binascii.Error, ValueError) as exc:
            raise _Refused(400, f"Upload-Metadata: the value of {key!r} is not base64 of "
                           "UTF-8 text") from exc
        metadata[key] = value
    return metadata


def _checksum(raw: str | None) -> tuple[str, bytes] | None:
    if raw is None:
        return None
    bits = raw.strip().split(" ")
    if len(bits) != 2 or bits[0] not in _ALGORITHMS:
        raise _Refused(400, f"Upload-Checksum must be '<algorithm> <base64 digest>' with "
                       f"one of {', '.join(_ALGORITHMS)}")
    try:
        digest = base64.b64decode(bits[1], validate=True)
    except binascii.Error as exc:
        raise _Refused(400, "Upload-Checksum: the digest is not base64") from exc
    algorithm = _ALGORITHMS[bits[0]]
    if len(digest) != hashlib.new(algorithm).digest_size:
        raise _Refused(400, f"Upload-Checksum: a {algorithm} digest is "
                       f"{hashlib.new(algorithm).digest_size} bytes")
    return algorithm, digest


def _number(raw: str | None, name: str) -> int:
    if raw is None or not _DIGITS.fullmatch(raw):
        raise _Refused(400, f"{name} must be a non-negative integer")
    return int(raw)


def _first(metadata: Mapping[str, str | None], keys: tuple[str, ...]) -> str | None:
    for key in keys:
        value = metadata.get(key)
        if value:
            return value
    return None


def _location(request: Request, alias: str, catalogue: str, upload_id: str) -> str:
    base = str(request.url.replace(query="", fragment="")).rstrip("/")
    return f"{base}/{quote(alias, safe='')}/{quote(catalogue, safe='')}/{upload_id}"


def _http_date(when: dt.datetime) -> str:
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return email.utils.format_datetime(when.astimezone(dt.timezone.utc), usegmt=True)


def _offset_headers(session: Mapping[str, Any]) -> dict[str, str]:
    return {
        "Upload-Offset": str(session["offset"]),
        "Upload-Expires": _http_date(session["expires"]),
    }


_COMMON = {
    "Tus-Resumable": TUS_VERSION,
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
}


def _empty(status: int, headers: Mapping[str, str]) -> Response:
    return Response(status_code=status, headers={**_COMMON, **headers})


def _text(status: int, text: str, headers: Mapping[str, str]) -> Response:
    return Response(
        f"{text}\n",
        status_code=status,
        media_type="text/plain; charset=utf-8",
        headers={**_COMMON, "Tus-Version": TUS_VERSION, **headers},
    )
