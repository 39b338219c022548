"""A FastAPI service on asyncassets: uploads into a FileField, downloads, signed links.

docs/serving.rst shows this file, and tests/test_web_fastapi.py runs it under
uvicorn (and in-process, with its lifespan run by ``run_lifespan``)::

    pip install -e '.[web]' fastapi uvicorn python-multipart   # from a checkout
    uvicorn --factory 'examples.fastapi_app:create_app'   # MONGODB_URI, FILES_SECRET

* ``POST /reports`` (a form with ``file`` and ``title``): the ``UploadFile`` is
  assigned to the field, and ``save()`` validates the report, then streams the
  upload into the field (``UploadFile`` is an async file, read in pieces) and
  inserts the report; a refused form stores nothing. A refused title or file is
  a ``422`` naming the field, and a storage or database outage a ``503``
  (``storage_error_response``), never a ``500``;
* ``GET`` and ``HEAD /reports/{id}/file``: :class:`~asyncassets.web.FileResponse`
  (ranges, ETag/304, the content policy); FastAPI's ``@app.get`` would answer
  ``HEAD`` with 405, hence ``api_route`` with both methods;
* ``/files/<token>``: the signed links of ``proxy.url()``, served by
  :func:`~asyncassets.web.files_app`.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from bson import ObjectId
from fastapi import FastAPI, Form, HTTPException, Request, UploadFile
from fastapi.responses import JSONResponse

import asyncassets
from asyncassets import Document, DoesNotExist, ValidationError
from asyncassets.fields import FileField, StringField
from asyncassets.web import (
    HANDLED_ERRORS,
    FileResponse,
    files_app,
    storage_error_response,
)


class Report(Document):
    title = StringField(max_length=200)
    file = FileField(collection_name="reports", max_size=100 * 1024 * 1024)
    meta = {"collection": "reports"}


def create_app(uri: str | None = None, secret: str | None = None) -> FastAPI:
    """The app, connected to ``uri`` (``MONGODB_URI`` by default) in its lifespan."""
    uri = uri or os.environ.get("MONGODB_URI", "mongodb://127.0.0.1:27017/reports")
    secret = secret or os.environ["FILES_SECRET"]

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        asyncassets.connect(uri)
        yield
        await asyncassets.disconnect()

    app = FastAPI(lifespan=lifespan)

    @app.post("/reports", status_code=201)
    async def upload(file: UploadFile, title: str = Form("")) -> dict[str, Any]:
        # Its name and content type are the UploadFile's; save() uploads it
        # once the report is valid, and removes it again if the insert fails.
        report = Report(title=title, file=file)
        await report.save()
        return {"id": str(report.pk), "link": await report.file.url(expires=3600)}

    async def refused(request: Request, exc: Exception) -> JSONResponse:
        # A field's rules said no (FileValidationError is a ValidationError too).
        assert isinstance(exc, ValidationError)
        field = exc.field_name or "form"
        where = exc.to_dict() or {field: str(exc).removeprefix(f"{field}: ")}
        return JSONResponse({"detail": where}, status_code=422)

    app.add_exception_handler(ValidationError, refused)
    for error in HANDLED_ERRORS:  # outages: 503 and Retry-After, not a 500
        app.add_exception_handler(error, storage_error_response)

    @app.api_route("/reports/{pk}/file", methods=["GET", "HEAD"])
    async def download(pk: str, request: Request) -> FileResponse:
        if not ObjectId.is_valid(pk):
            raise HTTPException(status_code=404)
        try:
            report = await Report.objects.get(pk=pk)
        except DoesNotExist:
            raise HTTPException(status_code=404) from None
        return FileResponse(report.file, request)

    app.mount("/files", files_app(secret=secret, base_url="/files"))
    return app
