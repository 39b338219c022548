"""A tus server as its own process, for the fault tests (tests/test_tus_faults.py).

``python tests/_tus_server.py PORT URI KIND [ROOT|S3_ENDPOINT]`` serves
``tus_app`` at ``http://127.0.0.1:PORT/uploads/`` with uvicorn, into the ``file``
field of ``TusFaultDoc`` (collection ``tus_fault_docs``) on the database of
``URI``, stored in GridFS (``gridfs``), a directory (``filesystem`` ROOT) or S3
(``s3`` ``ENDPOINT|BUCKET``, the test's bucket and its credentials in
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``). Any upload may go to the document
named by its ``doc`` metadata. The lease is 2 seconds, so an upload whose server
was killed mid-PATCH is free again soon after the restart. The race suite
(tests/test_races_uploads.py) sets ``TUS_EXPIRES`` (seconds an upload lives) and
``TUS_CHUNK_SIZE`` (the GridFS chunk size). ``TUS_DIE_AT`` makes the process
SIGKILL itself in the middle of an upload's finish: ``switch`` right before the
reference switch that attaches the upload, ``done`` right after it (before the
session is marked done); ``part`` right after an S3 UploadPart of a tus upload
written in place returns, before the write records it (part 2 or later);
``created`` right after an S3 upload's direct session (its key reserved, its
multipart upload started) is stored, before the tus session that owns it.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import sys
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Mount

import asyncassets
from asyncassets import Document
from asyncassets.fields import FileField
from asyncassets.storage import FileSystemStorage, GridFSStorage, S3Storage, Storage
from asyncassets.web import TusUpload, UploadTarget, tus_app


def storage(kind: str, where: str) -> Storage:
    if kind == "gridfs":
        return GridFSStorage("tusfaults",
                             chunk_size=int(os.environ.get("TUS_CHUNK_SIZE", 255 * 1024)))
    if kind == "filesystem":
        return FileSystemStorage(where, collection_name="tusfaults", fsync=True)
    endpoint, bucket = where.split("|")
    return S3Storage(bucket, endpoint_url=endpoint, region="us-east-1",
                     collection_name="tusfaults")


def die_at(point: str) -> None:
    """SIGKILL this process at ``point`` of the next finish (see the docstring)."""
    from asyncassets import references
    from asyncassets.storage.resumable import UploadSessions
    from asyncassets.web.tus import UPLOAD_MARK

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    if point == "switch":
        update = references._update

        async def dying_update(root: Any, proxy: Any, path: Any, old: Any, new: Any) -> Any:
            if new is not None and UPLOAD_MARK in (new.get("metadata") or {}):
                die()
            return await update(root, proxy, path, old, new)

        references._update = dying_update  # type: ignore[assignment]
    elif point == "done":

        async def dying_mark_done(self: Any, upload_id: str, file_id: Any) -> None:
            die()

        UploadSessions.mark_done = dying_mark_done  # type: ignore[method-assign]
    elif point == "part":
        from asyncassets.storage.objects.resumable_s3 import S3Parts

        upload_part = S3Parts.upload_part

        async def dying_upload_part(self: Any, session: Any, number: int, data: bytes) -> str:
            checksum = await upload_part(self, session, number, data)
            if number >= 2:
                die()
            return checksum

        S3Parts.upload_part = dying_upload_part  # type: ignore[method-assign]
    elif point == "created":

        async def dying_create(self: Any, **kwargs: Any) -> Any:
            if (kwargs.get("place") or {}).get("into") == "s3":
                die()
            return await create(self, **kwargs)

        create = UploadSessions.create
        UploadSessions.create = dying_create  # type: ignore[method-assign]
    else:
        raise SystemExit(f"TUS_DIE_AT: no point {point!r}")


def main() -> None:
    port, uri, kind = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    where = sys.argv[4] if len(sys.argv) > 4 else ""

    class TusFaultDoc(Document):
        file = FileField(storage=storage(kind, where))
        meta = {"collection": "tus_fault_docs"}

    async def authorize(request: Request, upload: TusUpload) -> Any:
        if upload.id is None:
            doc = await TusFaultDoc.objects(pk=upload.metadata.get("doc")).first()
            return None if doc is None else UploadTarget(doc, "file")
        return True

    if os.environ.get("TUS_DIE_AT"):
        die_at(os.environ["TUS_DIE_AT"])
    asyncassets.connect(host=uri)
    options: dict[str, Any] = {"lease": dt.timedelta(seconds=2)}
    if os.environ.get("TUS_EXPIRES"):
        options["expires"] = dt.timedelta(seconds=float(os.environ["TUS_EXPIRES"]))
    app = Starlette(routes=[Mount("/uploads", tus_app(authorize, **options))])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    main()
