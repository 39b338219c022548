"""``direct_uploads_app``: uploads that go from the browser straight to an S3 bucket.

The app signs and records; the bytes never pass through it (a 1 GiB upload
carries a few kilobytes of JSON through the app server). Mount it in Starlette
or FastAPI::

    async def authorize(request: Request, intent: DirectUploadIntent):
        user = await current_user(request)
        trailer = await Trailer.objects(pk=intent.target.get("id")).first()
        if trailer is None or trailer.owner != user.id:
            return None                         # 403
        return trailer, "video"                 # the document and its FileField

    app.mount("/uploads/s3", direct_uploads_app(authorize))

The protocol (JSON in and out; every error is ``{"error": "..."}`` with a 4xx or
503 status and nothing half-recorded):

``POST /``
    ``{"filename", "size", "content_type"?, "sha256"?, "target": {...}}``. The hook
    decides the document and field; the field's rules apply (``max_size``
    against ``size``, allowed types and extensions against the declared or
    guessed type, the file name sanitised; ``compress`` fields are refused). Answers
    ``201`` with ``{"id", "key", "size", "part_size", "parts", "expires"}`` and
    either ``"post": {"url", "fields"}`` (small files: one form POST to S3) or
    ``"multipart": true``.
``POST /{id}/parts/{n}``
    ``{"sha256": "<base64 SHA-256 of part n>"}`` -> ``{"url", "headers"}``: PUT the
    part there with those headers (S3 checks the bytes against the digest).
``GET /{id}/parts``
    the parts S3 holds (``[{"PartNumber", "Size", "ETag"}]``), to resume.
``POST /{id}/finalize``
    completes, verifies and references the file: ``200`` with ``{"file_id",
    "length", "filename", "content_type", "key"}``. Finalizing again returns the
    same answer.
``DELETE /{id}``
    aborts: parts and key reservation removed, ``204``.

The session id is the capability for everything after the creation: it is a
random 192-bit secret the hook's caller received. The hook runs once, at the
creation; the document it chose is loaded again at finalize and its field
switched by :meth:`~asyncassets.files.proxy.FileProxy.adopt`, as ``replace()``
does (conditional update; the old file deleted only after the switch; an
unknown outcome keeps both files).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mongoengine.base import get_document
from pymongo.errors import PyMongoError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, Router

from ..connection import get_db, registered_aliases
from ..errors import (
    DirectUploadError,
    FileConflict,
    FileValidationError,
    PendingFileMissing,
    StorageError,
)
from ..files.proxy import FileProxy
from ..files.rules import make_guard
from ..storage.objects.direct import DirectUploads
from ..storage.objects.store import ObjectStore

__all__ = ["DirectUploadIntent", "direct_uploads_app"]

#: The largest JSON body the app reads.
_MAX_BODY = 64 * 1024


@dataclass(frozen=True)
class DirectUploadIntent:
    """What a client asks to upload; given to the app's ``authorize`` hook.

    :ivar filename: the name the client gave (not yet sanitised), or ``None``.
    :ivar size: the declared length in bytes.
    :ivar content_type: the declared type, or ``None``.
    :ivar target: the client's ``"target"`` object, as sent (say which document:
        the hook must check it, it is attacker-controlled).
    """

    filename: str | None
    size: int
    content_type: str | None
    target: Mapping[str, Any] = field(default_factory=dict)


#: The hook: ``(request, intent) -> (document, field name)`` (or tus's
#: ``UploadTarget(document, field)``), or ``None`` to refuse.
Authorize = Callable[[Request, DirectUploadIntent], Awaitable[Any]]


def _error(status: int, message: str) -> Response:
    return JSONResponse(
        {"error": message},
        status_code=status,
        headers={"cache-control": "no-store", "x-content-type-options": "nosniff"},
    )


def _ok(body: Any, status: int = 200) -> Response:
    return JSONResponse(
        body,
        status_code=status,
        headers={"cache-control": "no-store", "x-content-type-options": "nosniff"},
    )


async def _json(request: Request) -> dict[str, Any]:
    body = b""
    async for piece in request.stream():
        body += piece
        if len(body) > _MAX_BODY:
            raise DirectUploadError(f"request body over {_MAX_BODY} bytes", status=413)
    if not body:
        return {}
    try:
        value = json.loads(body)
    except ValueError as exc:
        raise DirectUploadError(f"the body is not JSON: {exc}", status=400) from None
    if not isinstance(value, dict):
        raise DirectUploadError("the body must be a JSON object", status=400)
    return value


def _isoformat(value: dt.datetime) -> str:
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    return value.isoformat()


class _DirectApp:
    def __init__(
        self,
        authorize: Authorize,
        *,
        expires: dt.timedelta,
        post_limit: int,
        presign_seconds: int,
    ) -> None:
        self.authorize = authorize
        self.expires = expires
        self.post_limit = post_limit
        self.presign_seconds = presign_seconds

    def _uploads(self, store: ObjectStore) -> DirectUploads:
        return DirectUploads(
            store, post_limit=self.post_limit, presign_seconds=self.presign_seconds
        )

    async def _session_store(self, session_id: str) -> tuple[DirectUploads, dict[str, Any]]:
        """Find a session by id (in the default database's session collection)."""
        from ..storage.objects.direct import SESSIONS

        for alias in _aliases():
            db = get_db(alias)
            session = await db[SESSIONS].find_one({"_id": session_id})
            if session is not None:
                proxy, _doc = await self._target_proxy(session, load=False)
                store = proxy._bucket()
                assert isinstance(store, ObjectStore)
                return self._uploads(store), dict(session)
        raise DirectUploadError(
            "no such direct upload (never created, or expired and swept); start a new "
            "upload",
            status=404,
        )

    async def _target_proxy(
        self, session: Mapping[str, Any], *, load: bool
    ) -> tuple[FileProxy, Any]:
        target = session["target"]
        try:
            cls = get_document(str(target["class"]))
        except Exception as exc:
            raise DirectUploadError(
                f"the document class {target.get('class')!r} of this upload is not "
                "declared in this process",
                status=409,
            ) from exc
        if not load:
            document = cls()
        else:
            document = await cls.objects(pk=target["pk"]).first()
            if document is None:
                raise DirectUploadError(
                    "the document this upload was for is gone; the upload was removed",
                    status=410,
                )
        proxy = getattr(document, str(target["field"]))
        if not isinstance(proxy, FileProxy):
            raise DirectUploadError(f"{target['field']!r} is not a file field", status=409)
        return proxy, document

    # -- the endpoints -------------------------------------------------------------

    async def create(self, request: Request) -> Response:
        body = await _json(request)
        filename = body.get("filename")
        size = body.get("size")
        content_type = body.get("content_type")
        target = body.get("target") or {}
        if filename is not None and not isinstance(filename, str):
            raise DirectUploadError("filename must be a string", status=400)
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise DirectUploadError("size must be the file's length, an int >= 0", status=400)
        if content_type is not None and not isinstance(content_type, str):
            raise DirectUploadError("content_type must be a string", status=400)
        if not isinstance(target, dict):
            raise DirectUploadError("target must be a JSON object", status=400)
        intent = DirectUploadIntent(filename, size, content_type, target)
        chosen: Any = await self.authorize(request, intent)
        if chosen is None:
            raise DirectUploadError("not allowed to upload here", status=403)
        if hasattr(chosen, "document") and hasattr(chosen, "field"):
            document, field_name = chosen.document, str(chosen.field)  # tus's UploadTarget
        else:
            document, field_name = chosen
        if document.pk is None or getattr(document, "_created", False):
            raise DirectUploadError(
                "the hook returned an unsaved document; save it first", status=409
            )
        proxy = getattr(document, field_name, None)
        if not isinstance(proxy, FileProxy):
            raise DirectUploadError(f"{field_name!r} is not a file field", status=500)
        store = proxy._bucket()
        if not isinstance(store, ObjectStore) or store.storage.kind != "s3":
            raise DirectUploadError(
                f"field {field_name!r} does not store in S3 ({proxy.storage!r}); direct "
                "uploads need an S3Storage. Upload through the app (tus) instead.",
                status=400,
            )
        rules = getattr(proxy._field, "rules", None)
        if rules is not None and rules.compress:
            raise DirectUploadError(
                f"field {field_name!r} compresses its files, which a direct upload "
                "cannot; upload through the app instead",
                status=400,
            )
        if rules is not None and rules.max_size is not None and size > rules.max_size:
            raise DirectUploadError(
                f"{field_name}: {size} bytes is over max_size={rules.max_size}", status=413
            )
        guard = make_guard(proxy, content_type, filename, {})
        uploads = self._uploads(store)
        session = await uploads.create(
            size=size,
            filename=guard.filename,
            metadata=guard.metadata,
            context=proxy._upload_context(),
            target={"class": document._class_name, "pk": document.pk, "field": field_name},
            expires=self.expires,
            sha256=body.get("sha256"),
        )
        answer: dict[str, Any] = {
            "id": session["_id"],
            "key": session["key"],
            "size": size,
            "part_size": session["part_size"],
            "parts": session["parts"],
            "expires": _isoformat(session["expires"]),
        }
        if "post" in session:
            answer["post"] = session["post"]
        else:
            answer["multipart"] = True
        return _ok(answer, 201)

    async def sign(self, request: Request) -> Response:
        session_id = request.path_params["id"]
        try:
            number = int(request.path_params["number"])
        except ValueError:
            raise DirectUploadError("the part number must be an integer", status=400) from None
        body = await _json(request)
        uploads, _ = await self._session_store(session_id)
        return _ok(await uploads.sign_part(session_id, number, body.get("sha256")))

    async def parts(self, request: Request) -> Response:
        uploads, session = await self._session_store(request.path_params["id"])
        uploads._require_open(session, "list the parts")
        if session.get("upload_id") is None:
            return _ok([])
        return _ok(await uploads.list_parts(session))

    async def finalize(self, request: Request) -> Response:
        session_id = request.path_params["id"]
        uploads, session = await self._session_store(session_id)
        if session.get("state") == "done":
            return _ok(session["answer"])
        try:
            proxy, _document = await self._target_proxy(session, load=True)
        except DirectUploadError as exc:
            if exc.status == 410 and session.get("state") == "open":
                await uploads.abort(session_id)  # its document is gone: so is the upload
            raise
        guard = make_guard(
            proxy,
            (session.get("metadata") or {}).get("content_type"),
            session.get("filename"),
            dict(session.get("metadata") or {}),
        )
        session, entry = await uploads.complete(session_id, check_head=guard.check_head)
        sniffed = guard.metadata.get("content_type")
        if sniffed is not None and (entry.get("metadata") or {}).get("content_type") != sniffed:
            await uploads.store.files.update_one(
                {"_id": entry["_id"]}, {"$set": {"metadata.content_type": sniffed}}
            )
            entry.setdefault("metadata", {})["content_type"] = sniffed
        answer = {
            "file_id": str(entry["_id"]),
            "length": entry["length"],
            "filename": entry.get("filename"),
            "content_type": (entry.get("metadata") or {}).get("content_type"),
            "key": session["key"],
        }
        if proxy.grid_id != entry["_id"]:
            try:
                # The same switch as replace(): conditional update, then the old
                # file is deleted; an unknown outcome keeps both.
                await proxy.adopt(entry)
            except FileConflict as exc:
                await uploads.mark(session, "failed", reason=str(exc))
                raise DirectUploadError(str(exc), status=409) from exc
            except PendingFileMissing as exc:
                await uploads.mark(session, "failed", reason=str(exc))
                raise DirectUploadError(str(exc), status=410) from exc
        await uploads.mark(session, "done", answer=answer)
        return _ok(answer)

    async def abort(self, request: Request) -> Response:
        session_id = request.path_params["id"]
        uploads, _ = await self._session_store(session_id)
        await uploads.abort(session_id)
        return Response(status_code=204, headers={"cache-control": "no-store"})


def _aliases() -> list[str]:
    return registered_aliases()


def _endpoint(handler: Callable[[Request], Awaitable[Response]]) -> Callable[..., Any]:
    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request)
        except DirectUploadError as exc:
            return _error(exc.status, str(exc))
        except FileValidationError as exc:
            return _error(422, str(exc))
        except StorageError as exc:
            return _error(503, f"the storage failed: {exc}; try again")
        except PyMongoError as exc:
            # Nothing is lost: the session says where the upload stands, and the
            # same call again picks it up (a finalize is idempotent).
            return _error(503, f"the database failed: {exc}; try again")

    return endpoint


def direct_uploads_app(
    authorize: Authorize,
    *,
    expires: dt.timedelta | float = dt.timedelta(hours=24),
    post_limit: int = 5 * 1024 * 1024,
    presign_seconds: int = 3600,
) -> Router:
    """The ASGI app of direct-to-S3 uploads (see the module's documentation).

    :param authorize: ``async (request, intent) -> (document, field name) | None``:
        the app's decision of who may upload which file where (``None``: 403).
        The document must be saved; the field a ``FileField`` on an
        ``S3Storage``.
    :param expires: how long a session may take; after it the orphan sweep
        aborts its multipart upload and releases its key
        (:func:`~asyncassets.ops.sweep_orphans`).
    :param post_limit: files of at most this many bytes are one presigned POST.
    :param presign_seconds: how long each signed URL is valid.
    """
    if not callable(authorize):
        raise TypeError("authorize must be an async function (request, intent)")
    if not isinstance(expires, dt.timedelta):
        expires = dt.timedelta(seconds=float(expires))
    if expires <= dt.timedelta(0):
        raise ValueError("expires must be positive")
    app = _DirectApp(
        authorize, expires=expires, post_limit=post_limit, presign_seconds=presign_seconds
    )
    return Router(
        routes=[
            Route("/", _endpoint(app.create), methods=["POST"]),
            Route("/{id}/parts/{number}", _endpoint(app.sign), methods=["POST"]),
            Route("/{id}/parts", _endpoint(app.parts), methods=["GET"]),
            Route("/{id}/finalize", _endpoint(app.finalize), methods=["POST"]),
            Route("/{id}", _endpoint(app.abort), methods=["DELETE"]),
        ]
    )


