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

The kill-point suite (tests/test_tus_kill_points.py) counts the I/O calls the
process makes while it serves tus requests (from the first request on, so
startup's index builds shift nothing; the ``authorize`` hook's own read is not
counted): MongoDB collection operations (``AsyncCollection`` writes, reads,
``find_one_and_*``, and each query or ``getMore`` a cursor sends), S3 requests
(``S3Blobs._call``) and a directory's blocking calls (each call a writer runs in
its thread, ``_Calls.run``: opening, ``pwrite``, ``fdatasync``, linking in place,
hashing; and the blobs' ``_in_thread`` ones: ``stat``, removals). A call made
inside a counted one (``find_one``'s cursor) is not counted again.
``TUS_LOG_CALLS=PATH`` appends ``number kind what request`` per counted call,
written before the call runs (``request``: ``<n>:<method>``, the nth request
served); ``TUS_DIE_AT_CALL=N`` SIGKILLs the process right before
the Nth call, or right after it returns with ``TUS_DIE_WHEN=after``. S3 parts are
``TUS_PART_SIZE`` bytes when set (5 MiB at least).
"""

from __future__ import annotations

import contextvars
import datetime as dt
import functools
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
    options: dict[str, Any] = {}
    if os.environ.get("TUS_PART_SIZE"):
        options["part_size"] = int(os.environ["TUS_PART_SIZE"])
    return S3Storage(bucket, endpoint_url=endpoint, region="us-east-1",
                     collection_name="tusfaults", **options)


class Calls:
    """Counts the I/O calls made while requests are served (module docstring)."""

    def __init__(self, log: str | None, die_at: int | None, after: bool) -> None:
        self.log = log
        self.die_at = die_at
        self.after = after
        self.count = 0
        self.counting = False
        #: The request being served (the suite's are one at a time): number and method.
        self.request = ""
        self.requests = 0
        #: Set inside a counted call (and the hook): calls made there are not counted.
        self.inside: contextvars.ContextVar[bool] = contextvars.ContextVar(
            "tus_inside_call", default=False)

    @property
    def wanted(self) -> bool:
        return self.log is not None or self.die_at is not None

    def begin(self, kind: str, what: str) -> int | None:
        """Count a call about to run (``None``: not counted); die before it if asked."""
        if not self.counting or self.inside.get():
            return None
        self.count += 1
        if self.log is not None:
            with open(self.log, "a") as out:
                out.write(f"{self.count} {kind} {what} {self.request}\n")
        if self.count == self.die_at and not self.after:
            os.kill(os.getpid(), signal.SIGKILL)
        return self.count

    def end(self, number: int | None) -> None:
        if number is not None and number == self.die_at and self.after:
            os.kill(os.getpid(), signal.SIGKILL)

    async def run(self, kind: str, what: str, call: Any) -> Any:
        number = self.begin(kind, what)
        if number is None:
            return await call()
        token = self.inside.set(True)
        try:
            result = await call()
        finally:
            self.inside.reset(token)
        self.end(number)
        return result

    def patch(self) -> None:
        from pymongo.asynchronous.collection import AsyncCollection
        from pymongo.asynchronous.command_cursor import AsyncCommandCursor
        from pymongo.asynchronous.cursor import AsyncCursor

        from asyncassets.storage.objects import filesystem
        from asyncassets.storage.objects.s3 import S3Blobs

        calls = self

        for name in ("insert_one", "insert_many", "update_one", "update_many", "replace_one",
                     "delete_one", "delete_many", "find_one_and_update",
                     "find_one_and_replace", "find_one_and_delete", "find_one",
                     "count_documents", "distinct", "bulk_write", "aggregate"):
            original = getattr(AsyncCollection, name)

            def counted(original: Any, name: str) -> Any:
                @functools.wraps(original)
                async def method(self: Any, *args: Any, **kwargs: Any) -> Any:
                    return await calls.run("mongo", f"{self.name}.{name}",
                                           lambda: original(self, *args, **kwargs))
                return method

            setattr(AsyncCollection, name, counted(original, name))

        for cursor_class, what in ((AsyncCursor, "find"), (AsyncCommandCursor, "getMore")):
            refresh = cursor_class._refresh

            def counted_refresh(refresh: Any, what: str) -> Any:
                async def method(self: Any) -> int:
                    if len(self._data) or self._killed or self._id == 0:
                        return int(await refresh(self))  # no I/O
                    label = what if self._id is None else "getMore"
                    name = self._collection.name
                    return int(await calls.run("mongo", f"{name}.{label}",
                                               lambda: refresh(self)))
                return method

            cursor_class._refresh = counted_refresh(refresh, what)  # type: ignore[method-assign]

        s3_call = S3Blobs._call

        async def counted_call(self: Any, action: str, key: Any, request: Any,
                               **kwargs: Any) -> Any:
            return await calls.run("s3", action,
                                   lambda: s3_call(self, action, key, request, **kwargs))

        S3Blobs._call = counted_call  # type: ignore[method-assign]

        def name_of(function: Any) -> str:
            while isinstance(function, functools.partial):
                function = function.func
            return str(getattr(function, "__name__", function))

        run = filesystem._Calls.run

        async def counted_run(self: Any, function: Any) -> Any:
            return await calls.run("fs", name_of(function), lambda: run(self, function))

        filesystem._Calls.run = counted_run  # type: ignore[method-assign]
        in_thread = filesystem._in_thread

        async def counted_in_thread(function: Any) -> Any:
            return await calls.run("fs", name_of(function), lambda: in_thread(function))

        filesystem._in_thread = counted_in_thread  # type: ignore[assignment]

    def wrap(self, app: Any) -> Any:
        """The ASGI app, counting from its first HTTP request on."""

        async def counting(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "http":
                self.counting = True
                self.requests += 1
                self.request = f"{self.requests}:{scope['method']}"
            await app(scope, receive, send)

        return counting


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

    die_at_call = os.environ.get("TUS_DIE_AT_CALL")
    calls = Calls(os.environ.get("TUS_LOG_CALLS"), int(die_at_call) if die_at_call else None,
                  os.environ.get("TUS_DIE_WHEN", "before") == "after")

    async def authorize(request: Request, upload: TusUpload) -> Any:
        if upload.id is None:
            token = calls.inside.set(True)  # the app's read, not the library's
            try:
                doc = await TusFaultDoc.objects(pk=upload.metadata.get("doc")).first()
            finally:
                calls.inside.reset(token)
            return None if doc is None else UploadTarget(doc, "file")
        return True

    if os.environ.get("TUS_DIE_AT"):
        die_at(os.environ["TUS_DIE_AT"])
    asyncassets.connect(host=uri)
    options: dict[str, Any] = {"lease": dt.timedelta(seconds=2)}
    if os.environ.get("TUS_EXPIRES"):
        options["expires"] = dt.timedelta(seconds=float(os.environ["TUS_EXPIRES"]))
    app: Any = Starlette(routes=[Mount("/uploads", tus_app(authorize, **options))])
    if calls.wanted:
        calls.patch()
        app = calls.wrap(app)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    main()
