"""What a request answers when a file's storage or the database fails it.

An exception that escapes an ASGI app costs more than its own request. Starlette
answers it with a ``500`` (its ``ServerErrorMiddleware``) and raises it again;
uvicorn then logs it and closes the connection, although that ``500`` told the
client the connection could be kept. A client that sends its next request on the
connection meanwhile (a pooled ``httpx`` or ``requests`` client, a browser) sees
that request fail with no response at all: ``ReadError`` or ``RemoteProtocolError:
Server disconnected``, on a request that had nothing to do with the failure.

So a failure known before the first byte of a response is answered, completely,
on a connection that stays usable:

* the file is gone (:class:`~asyncassets.errors.FileNotFound`, or its object
  missing from the directory or bucket): ``404``;
* the storage or the database cannot be reached, or failed after its retries
  (:class:`~asyncassets.errors.StorageError`, PyMongo's ``ConnectionFailure``), or
  an upload was interrupted by an orphan sweep whose grace is shorter than it
  (:class:`~asyncassets.errors.UploadInterrupted`,
  :class:`~asyncassets.errors.PendingFileMissing`; nothing was stored or
  changed): ``503`` with ``Retry-After``, and a warning on the
  ``asyncassets.web`` logger;
* the stored bytes are damaged (:class:`~asyncassets.errors.CorruptFile`,
  :class:`~asyncassets.errors.IntegrityError`): ``500``, logged as an error.

:class:`~asyncassets.web.FileResponse` answers so by itself; an app's own routes
(uploads, replaces, deletes) get the same answers with :func:`storage_error_response`
as an exception handler. A failure after a response began still raises: the
server must then close the connection short of ``Content-Length``, so the client
sees a truncated response rather than a complete-looking one.
"""

from __future__ import annotations

import logging

from pymongo.errors import ConnectionFailure
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from ..errors import (
    CorruptFile,
    FileNotFound,
    IntegrityError,
    PendingFileMissing,
    StorageError,
    StoredObjectMissing,
    UploadInterrupted,
)

__all__ = ["HANDLED_ERRORS", "RETRY_AFTER_SECONDS", "failure_answer", "storage_error_response"]

logger = logging.getLogger("asyncassets.web")

#: The ``Retry-After`` of a ``503``: storage outages and failovers are usually
#: over in seconds, and a client told to wait does not add to the load meanwhile.
RETRY_AFTER_SECONDS = 2
_RETRY = str(RETRY_AFTER_SECONDS).encode()

#: The exceptions answered with a complete response instead of raised; register
#: :func:`storage_error_response` for each of them.
HANDLED_ERRORS: tuple[type[BaseException], ...] = (
    FileNotFound,
    StorageError,
    ConnectionFailure,
    UploadInterrupted,
    CorruptFile,
    IntegrityError,
)


def failure_answer(exc: BaseException) -> tuple[int, str, list[tuple[bytes, bytes]]] | None:
    """The status, text and extra headers that answer ``exc``; ``None`` to raise it.

    Logs what an operator should hear of: a storage or database outage (warning),
    an object missing under a catalogue entry (warning: run ``asyncassets.check()``)
    and damaged bytes (error, with the traceback).
    """
    if isinstance(exc, PendingFileMissing):
        # An upload the orphan sweep removed before its switch: nothing changed.
        logger.warning("answered 503 (try again later): %s", exc)
        return 503, "Service Unavailable: try again later", [(b"retry-after", _RETRY)]
    if isinstance(exc, FileNotFound):
        return 404, "Not Found", []
    if isinstance(exc, StoredObjectMissing):
        logger.warning("answered 404: %s", exc)
        return 404, "Not Found", []
    if isinstance(exc, (StorageError, ConnectionFailure, UploadInterrupted)):
        logger.warning("answered 503 (try again later): %s: %s", type(exc).__name__, exc)
        return 503, "Service Unavailable: try again later", [(b"retry-after", _RETRY)]
    if isinstance(exc, (CorruptFile, IntegrityError)):
        logger.error("answered 500: a stored file is damaged", exc_info=exc)
        return 500, "Internal Server Error: the stored file is damaged", []
    return None


async def storage_error_response(request: Request, exc: Exception) -> Response:
    """A Starlette (or FastAPI) exception handler answering what :func:`failure_answer` answers.

    .. code-block:: python

        from asyncassets.web import HANDLED_ERRORS, storage_error_response

        for error in HANDLED_ERRORS:
            app.add_exception_handler(error, storage_error_response)

    Then an upload route whose S3 bucket is unreachable answers ``503`` with
    ``Retry-After``, and the client's connection stays usable for its next
    request (an unhandled exception makes uvicorn close it: see
    :mod:`asyncassets.web.failures`). The answers carry ``Cache-Control:
    no-store``.

    :raises Exception: ``exc`` itself when it is none of :data:`HANDLED_ERRORS`
        (registered for a broader class), so that it is handled as before.
    """
    answer = failure_answer(exc)
    if answer is None:
        raise exc
    status, text, headers = answer
    extra = {k.decode(): v.decode() for k, v in headers}
    return PlainTextResponse(
        f"{text}\n",
        status_code=status,
        headers={"cache-control": "no-store", "x-content-type-options": "nosniff", **extra},
    )
