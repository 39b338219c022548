"""Resumable uploads into a FileField with FastAPI: ``tus_app`` mounted at /uploads.

docs/uploads.rst shows this file; tests/test_tus_examples.py runs it under
uvicorn and uploads to it with tuspy::

    uvicorn --factory 'examples.tus_fastapi:create_app'        # MONGODB_URI

* ``POST /videos`` makes the document an upload goes to (its owner: the
  ``X-User`` header, which stands for the app's real authentication);
* ``/uploads/``: the tus endpoint. A client creates an upload with the
  metadata ``video`` (the document's id) and ``filename``; the hook lets the
  owner upload into that video's ``file`` field, and only the same user touch
  the upload afterwards.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from bson import ObjectId
from fastapi import FastAPI, Request

import asyncassets
from asyncassets import Document
from asyncassets.fields import FileField, StringField
from asyncassets.web import TusUpload, UploadTarget, tus_app


class Video(Document):
    owner = StringField(required=True)
    file = FileField(
        collection_name="videos",
        max_size=2 * 1024**3,
        allowed_content_types=["video/*", "application/octet-stream"],
    )
    meta = {"collection": "videos"}


async def authorize(request: Request, upload: TusUpload) -> Any:
    """Who may upload what: the video's owner, into its ``file`` field."""
    user = request.headers.get("x-user")
    if upload.id is not None:  # HEAD, PATCH, DELETE of an upload
        return user is not None and upload.info["app"]["owner"] == user
    video_id = upload.metadata.get("video") or ""
    if not ObjectId.is_valid(video_id):
        return None  # 403
    video = await Video.objects(pk=video_id, owner=user).first()
    if video is None:
        return None
    return UploadTarget(video, "file", info={"owner": user})


def create_app(uri: str | None = None) -> FastAPI:
    """The app, connected to ``uri`` (``MONGODB_URI`` by default) in its lifespan."""
    uri = uri or os.environ.get("MONGODB_URI", "mongodb://127.0.0.1:27017/videos")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        asyncassets.connect(uri)
        yield
        await asyncassets.disconnect()

    app = FastAPI(lifespan=lifespan)

    @app.post("/videos", status_code=201)
    async def new_video(request: Request) -> dict[str, str]:
        video = Video(owner=request.headers.get("x-user", "anonymous"))
        await video.save()
        return {"id": str(video.pk)}

    app.mount("/uploads", tus_app(authorize))
    return app
