"""Resumable uploads into a FileField with Starlette: ``tus_app`` as a ``Mount``.

docs/uploads.rst shows this file; tests/test_tus_examples.py runs it under
uvicorn and uploads to it with tuspy. The same hook as examples/tus_fastapi.py,
with a field on a directory storage (``MEDIA_ROOT``): finished uploads are
stored there through the storage's own writer. ``create_app(origins=[...])`` lets
pages on those other origins upload (CORS); tests/test_web_browser_cors.py uploads
from such a page in Chromium with tus-js-client.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from bson import ObjectId
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

import asyncassets
from asyncassets import Document
from asyncassets.fields import FileField, StringField
from asyncassets.storage import FileSystemStorage
from asyncassets.web import TusUpload, UploadTarget, tus_app

MEDIA_ROOT = os.environ.get("MEDIA_ROOT", "/tmp/asyncassets-media")

#: What a page on another origin needs: to send the tus request headers (and the
#: app's own, read by authorize: X-User), and to read the answers' headers.
TUS_CORS: dict[str, Any] = {
    "allow_methods": ["POST", "PATCH", "HEAD", "DELETE"],
    "allow_headers": [
        "Tus-Resumable", "Upload-Length", "Upload-Offset", "Upload-Metadata",
        "Upload-Checksum", "Content-Type", "X-User",
    ],
    "expose_headers": [
        "Location", "Upload-Offset", "Upload-Length", "Upload-Expires",
        "Tus-Resumable", "Tus-Version", "Tus-Extension", "Tus-Max-Size",
        "Tus-Checksum-Algorithm",
    ],
}


class Recording(Document):
    owner = StringField(required=True)
    file = FileField(
        storage=FileSystemStorage(MEDIA_ROOT, collection_name="recordings")
    )
    meta = {"collection": "recordings"}


async def authorize(request: Request, upload: TusUpload) -> Any:
    user = request.headers.get("x-user")
    if upload.id is not None:
        return user is not None and upload.info["app"]["owner"] == user
    pk = upload.metadata.get("recording") or ""
    if not ObjectId.is_valid(pk):
        return None
    recording = await Recording.objects(pk=pk, owner=user).first()
    return None if recording is None else UploadTarget(
        recording, "file", info={"owner": user}
    )


async def new_recording(request: Request) -> JSONResponse:
    recording = Recording(owner=request.headers.get("x-user", "anonymous"))
    await recording.save()
    return JSONResponse({"id": str(recording.pk)}, status_code=201)


def create_app(uri: str | None = None, origins: Sequence[str] = ()) -> Starlette:
    uri = uri or os.environ.get("MONGODB_URI", "mongodb://127.0.0.1:27017/media")

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        asyncassets.connect(uri)
        yield
        await asyncassets.disconnect()

    uploads = tus_app(authorize, expires=dt.timedelta(hours=6))
    # Pages on these origins (such as "https://app.example.com") may upload.
    cors = [Middleware(CORSMiddleware, allow_origins=list(origins), **TUS_CORS)]
    return Starlette(
        lifespan=lifespan,
        middleware=cors if origins else [],
        routes=[
            Route("/recordings", new_recording, methods=["POST"]),
            Mount("/uploads", uploads),
        ],
    )
