"""``files_app``: the ASGI app that serves signed file URLs."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route, Router
from starlette.types import Message, Receive, Scope, Send

from ..connection import get_db
from ..errors import SignatureInvalid, StorageError, URLExpired
from ..files.urls import configure_urls, read_token, url_config
from ..ops.scope import declared_storage
from ..storage import GridFSStorage, Storage, Store
from ..storage.objects.store import location_key
from .policy import DEFAULT_POLICY, ContentPolicy
from .response import DEFAULT_MAX_RANGES, FileResponse, log_unservable, served_entry

__all__ = ["MAX_CACHE_SECONDS", "files_app"]

#: Longest a browser is told to keep a file fetched through a signed URL.
MAX_CACHE_SECONDS = 86400


_NOSNIFF = (b"x-content-type-options", b"nosniff")


def _refuse(status: int, text: str, headers: dict[str, str] | None = None) -> Response:
    return PlainTextResponse(
        f"{text}\n",
        status_code=status,
        headers={
            "cache-control": "no-store",
            "x-content-type-options": "nosniff",
            **(headers or {}),
        },
    )


class _FilesRouter(Router):
    """The router of :func:`files_app`: every response it sends carries ``nosniff``.

    Its own answers carry it already; this covers any other one Starlette
    could make on its behalf, so none leaves without it.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return

        async def guarded(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if not any(k.lower() == _NOSNIFF[0] for k, _ in headers):
                    message = {**message, "headers": [*headers, _NOSNIFF]}
            await send(message)

        await super().__call__(scope, receive, guarded)


class _Endpoint:
    """An ASGI endpoint for every method: the app answers 405 itself.

    A function endpoint limited to GET and HEAD would leave the 405 to
    Starlette, which raises it to the host app's exception handlers when
    mounted, outside this app.
    """

    def __init__(self, serve: Any) -> None:
        self._serve = serve

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = await self._serve(Request(scope, receive))
        await response(scope, receive, send)


async def _not_found(scope: Scope, receive: Receive, send: Send) -> None:
    await _refuse(404, "Not Found")(scope, receive, send)


def _spelled_as_signed(request: Request, token: str) -> bool:
    """Whether the URL carries the token as signed, not percent-encoded.

    Tokens are made of URL-safe characters only, so ``%41`` for ``A`` is another
    spelling of the same link, which a link with one valid spelling refuses.
    """
    raw = request.scope.get("raw_path")
    if not isinstance(raw, (bytes, bytearray)):
        return True  # the server does not say: the decoded path is all there is
    return raw.rsplit(b"/", 1)[-1] == token.encode("ascii", "replace")


class _Storages:
    """Which storage holds each catalogue: the ones given, else the declared ones."""

    def __init__(self, given: Iterable[Storage]) -> None:
        self._given = {storage.collection_name: storage for storage in given}
        self._bound: dict[tuple[str, str], tuple[Any, Storage, Store]] = {}

    def find(self, alias: str, collection: str) -> tuple[Storage, bool]:
        """The storage of a catalogue, and whether it was given or declared.

        Looked up at the first request of each catalogue, not when the app is
        built (document classes may be declared after it), and for that one
        catalogue: declarations that disagree about another do not matter here.

        :raises StorageConflict: declarations give this catalogue different storages.
        """
        if collection in self._given:
            return self._given[collection], True
        declared = declared_storage(alias, collection)
        if declared is None:
            return GridFSStorage(collection), False
        return declared, True

    def bound(self, alias: str, collection: str) -> tuple[Storage, Store]:
        """The storage of a catalogue and its store on the alias's database now.

        The store is kept while the alias names the same database of the same
        client (``get_db`` makes a new database object each time; a store holds
        no state of its own but its collections): finding the storage among the
        declarations and binding it per request cost a tenth of a signed link's
        time.
        """
        db = get_db(alias)
        kept = self._bound.get((alias, collection))
        if kept is not None and _same_database(kept[0], db):
            return kept[1], kept[2]
        storage, known = self.find(alias, collection)
        store = storage.bind(db)
        if known:
            # Not the GridFS taken for an undeclared catalogue: a class declared
            # later must still be found.
            self._bound[(alias, collection)] = (db, storage, store)
        return storage, store


def _same_database(kept: Any, db: Any) -> bool:
    return bool(
        kept is db
        or (
            getattr(kept, "client", None) is getattr(db, "client", object())
            and kept.name == db.name
            and kept.codec_options == db.codec_options
        )
    )


def files_app(
    secret: str | bytes | Iterable[str | bytes] | None = None,
    *,
    base_url: str = "/files",
    window: float | None = None,
    storages: Iterable[Storage] = (),
    cache_control: str | None = None,
    max_ranges: int = DEFAULT_MAX_RANGES,
    policy: ContentPolicy = DEFAULT_POLICY,
) -> Router:
    """An ASGI app serving the URLs ``proxy.url()`` makes for GridFS and directory files.

    .. code-block:: python

        app.mount("/files", files_app(secret=SECRET, base_url="/files"))
        url = await animal.photo.url(expires=3600)      # "/files/<token>"

    Mount it at ``base_url`` (or give the absolute URL it is reached at, behind a
    proxy or on another host). Building it sets the process-wide signing
    configuration (:func:`~asyncassets.files.urls.configure_urls`), unless
    ``secret`` is ``None``, in which case the one already configured is used.

    Each request's token is checked before any I/O: altered (a token has one
    valid spelling; a path with a ``/`` after the token is one too), signed
    with an unknown key, or expired: ``403``; a method other than ``GET`` and
    ``HEAD``: ``405``. Then the file is looked up: deleted since, or its
    catalogue entry unusable: ``404`` (a warning is logged for the entry);
    holding other bytes than when signed (revoked by replacing them): ``403``.
    Otherwise the file is served by :class:`FileResponse` (ranges, ETag,
    304...): as an attachment when the URL says so, else as ``policy`` decides
    (only passive types inline). Every response carries
    ``X-Content-Type-Options: nosniff``. See :doc:`/serving` for serving it
    from an origin of its own.

    :param secret: the HMAC key, or several to rotate (the first signs).
    :param base_url: where the app is mounted, as URLs should name it.
    :param window: expiry rounding, see :func:`~asyncassets.files.urls.configure_urls`.
    :param storages: the storages of catalogues not declared by a document class
        of this process (by default each catalogue's declared storage is used, and
        an undeclared one is taken to be a GridFS bucket).
    :param cache_control: ``Cache-Control`` of the files served; by default
        ``private, max-age=<seconds until the URL expires, at most a day>``: the
        URL's file cannot change without the URL being refused.
    :param max_ranges: see :class:`FileResponse`.
    :param policy: see :class:`FileResponse`.
    :raises ValueError: a secret shorter than 16 bytes.
    :raises URLsNotConfigured: ``secret`` is ``None`` and none is configured.
    """
    if secret is not None:
        configure_urls(
            secret if isinstance(secret, (str, bytes)) else list(secret),
            base_url=base_url,
            window=window,
        )
    elif url_config() is None:
        from ..errors import URLsNotConfigured

        raise URLsNotConfigured(
            "files_app() needs a secret=..., or configure_urls(...) called before it"
        )
    known = _Storages(storages)

    async def serve(request: Request) -> Response:
        if request.method not in ("GET", "HEAD"):
            return _refuse(405, "Method Not Allowed", {"allow": "GET, HEAD"})
        config = url_config()
        assert config is not None
        token = request.path_params["token"]
        if not _spelled_as_signed(request, token):
            return _refuse(403, "Forbidden: this link is not valid.")
        try:
            claims = read_token(token, config.keys)
        except SignatureInvalid:
            return _refuse(403, "Forbidden: this link is not valid.")
        except URLExpired:
            return _refuse(403, "Forbidden: this link has expired.")
        storage, store = known.bound(claims.alias, claims.collection)
        doc = await store.find(claims.file_id)
        if doc is None:
            return _refuse(404, "Not Found: the file was deleted.")
        if isinstance(storage, GridFSStorage) and location_key(doc) is not None:
            raise StorageError(
                f"catalogue {claims.collection!r} (alias {claims.alias!r}) holds files of a "
                "directory or S3 storage, and no document class of this process declares "
                "which: pass files_app(storages=[...]) naming it",
                storage=claims.collection,
            )
        entry = served_entry(doc)
        if entry is None:
            log_unservable(store, doc)
            return _refuse(404, "Not Found: the file cannot be served.")
        if entry.version != claims.version:
            return _refuse(403, "Forbidden: the file changed since this link was made.")
        cache = cache_control
        if cache is None:
            left = max(0, min(MAX_CACHE_SECONDS, int(claims.expires - time.time())))
            cache = f"private, max-age={left}"
        options: dict[str, Any] = {
            "download": claims.download,
            "filename": claims.filename,
            "cache_control": cache,
            "max_ranges": max_ranges,
            "policy": policy,
        }
        return FileResponse.for_entry(store, doc, request=request, **options)

    # Any path is a token: "<token>/" or "a/b" is a link altered (403), not a
    # redirect or a 404 made by Starlette.
    return _FilesRouter(
        routes=[Route("/{token:path}", _Endpoint(serve))],
        redirect_slashes=False,
        default=_not_found,
    )
