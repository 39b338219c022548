"""The service of the deployment test (tests/_deployment.py), as a user would write it.

One Document class with a file field on each storage, and a Starlette app:

* ``POST /docs``: a new document with no file; answers ``{"id": ...}``;
* ``PUT /docs/{id}/{field}``: the request body, streamed, replaces the field's file
  (``replace()`` on an empty field stores the first one); answers its SHA-256;
* ``DELETE /docs/{id}/{field}``: ``proxy.delete()``;
* ``GET`` / ``HEAD /docs/{id}/{field}``: :class:`~asyncassets.web.FileResponse`
  (whole files, ranges, ETags);

with :func:`~asyncassets.web.storage_error_response` for storage and database
outages (``503``), ``409`` for :class:`~asyncassets.errors.FileConflict` and ``404``
for a document that is gone. The same module is what ``asyncassets transfer`` and
``asyncassets sweep`` import (``--import _deployment_app``): their processes see
the same classes.

Configured by the environment, so that every process builds the same storages:
``DEPLOY_MONGODB_URI`` (with the database), ``DEPLOY_ROOT`` (the directory field's
root), ``DEPLOY_SPOOL`` (the queued field's local directory), ``DEPLOY_S3`` (a JSON
object: ``endpoint_url``, ``bucket``, ``region``, credentials).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import AsyncIterator
from typing import Any

from bson import ObjectId
from bson.errors import InvalidId
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

import asyncassets
from asyncassets import Document, DoesNotExist
from asyncassets.errors import FileConflict
from asyncassets.fields import FileField
from asyncassets.storage import (
    FileSystemStorage,
    GridFSStorage,
    QueuedStorage,
    S3Storage,
)
from asyncassets.web import HANDLED_ERRORS, FileResponse, storage_error_response

FIELDS = ("gridfs", "directory", "s3", "queued")
_S3 = json.loads(os.environ.get("DEPLOY_S3", "{}") or "{}")


def _s3(prefix: str, collection: str) -> S3Storage:
    return S3Storage(
        bucket=_S3.get("bucket", "unset"),
        prefix=prefix,
        endpoint_url=_S3.get("endpoint_url"),
        region=_S3.get("region", "us-east-1"),
        access_key_id=_S3.get("access_key_id"),
        secret_access_key=_S3.get("secret_access_key"),
        collection_name=collection,
    )


class Deployed(Document):
    """A document with a file on every storage a deployment uses."""

    gridfs = FileField(storage=GridFSStorage("deploy_grid"))
    directory = FileField(
        storage=FileSystemStorage(
            os.environ.get("DEPLOY_ROOT", "/nonexistent"),
            collection_name="deploy_dir",
        )
    )
    s3 = FileField(storage=_s3("s3/", "deploy_s3"))
    queued = FileField(
        storage=QueuedStorage(
            local=FileSystemStorage(os.environ.get("DEPLOY_SPOOL", "/nonexistent")),
            remote=_s3("queued/", "deploy_queued_remote"),
            collection_name="deploy_queued",
            # Retried every few seconds, for as long as an S3 outage of the test lasts.
            lease=5.0,
            retry_delay=0.5,
            max_retry_delay=3.0,
            max_attempts=1000,
        )
    )
    meta = {"collection": "deployed"}


async def _document(request: Request) -> Deployed | None:
    try:
        pk = ObjectId(request.path_params["pk"])
    except InvalidId:
        return None
    with contextlib.suppress(DoesNotExist):
        return await Deployed.objects.get(pk=pk)
    return None


def _field(request: Request) -> str | None:
    field = request.path_params["field"]
    return field if field in FIELDS else None


async def create(request: Request) -> Response:
    doc = Deployed()
    await doc.save()
    return JSONResponse({"id": str(doc.pk)}, status_code=201)


async def replace(request: Request) -> Response:
    field, doc = _field(request), await _document(request)
    if field is None or doc is None:
        return PlainTextResponse("no such document or field\n", status_code=404)
    proxy = getattr(doc, field)
    try:
        await proxy.replace(
            request.stream(),
            content_type="application/octet-stream",
            filename=f"{field}.bin",
        )
    except FileConflict as exc:
        return PlainTextResponse(f"{exc}\n", status_code=409)
    sha256 = proxy.metadata.get("sha256")
    return JSONResponse({"sha256": sha256, "file_id": str(proxy.file_id)})


async def delete(request: Request) -> Response:
    field, doc = _field(request), await _document(request)
    if field is None or doc is None:
        return PlainTextResponse("no such document or field\n", status_code=404)
    try:
        await getattr(doc, field).delete()
    except FileConflict as exc:
        return PlainTextResponse(f"{exc}\n", status_code=409)
    return Response(status_code=204)


async def read(request: Request) -> Response:
    field, doc = _field(request), await _document(request)
    if field is None or doc is None:
        return PlainTextResponse("no such document or field\n", status_code=404)
    return FileResponse(getattr(doc, field), request)


def create_app() -> Starlette:
    """The app, connected in its lifespan (one client per process)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        asyncassets.connect(os.environ["DEPLOY_MONGODB_URI"])
        yield
        await asyncassets.disconnect()

    handlers: dict[Any, Any] = dict.fromkeys(HANDLED_ERRORS, storage_error_response)
    return Starlette(
        routes=[
            Route("/docs", create, methods=["POST"]),
            Route("/docs/{pk}/{field}", replace, methods=["PUT"]),
            Route("/docs/{pk}/{field}", delete, methods=["DELETE"]),
            Route("/docs/{pk}/{field}", read, methods=["GET", "HEAD"]),
        ],
        exception_handlers=handlers,
        lifespan=lifespan,
    )
