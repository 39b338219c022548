"""Serving stored files over HTTP (needs ``pip install 'asyncassets[web]'``, Starlette).

* :class:`FileResponse`: any file field's file as a response, with ranges,
  ETag/304, ``HEAD`` and ``Content-Disposition``;
* :func:`files_app`: an ASGI app serving the signed URLs of ``proxy.url()``;
* :func:`configure_urls`: the signing key and base URL, for processes that make
  URLs without mounting the app;
* :class:`ContentPolicy`: which files are shown inline, under which type,
  sandboxed (user content is served safe by default; S3 presigned links follow
  it too);
* :func:`tus_app`: resumable uploads (the tus protocol) into a document's
  ``FileField``, authorised by a hook of the app's (see :doc:`/uploads`);
* :func:`direct_uploads_app`: uploads from the browser straight to an S3
  bucket; the app signs and records (see :doc:`/uploads`);
* :func:`run_lifespan`: run an app's lifespan in a test that calls it in-process;
* :func:`storage_error_response`: an exception handler that answers a storage
  or database outage with ``503`` instead of a dropped connection.

See :doc:`/serving`.
"""

from __future__ import annotations

try:
    import starlette  # noqa: F401
except ImportError as exc:  # the `web` extra is not installed
    from ..errors import WebExtraMissing

    raise WebExtraMissing(
        "asyncassets.web needs Starlette: pip install 'asyncassets[web]'"
    ) from exc

from ..files.urls import configure_urls
from .app import files_app
from .direct import DirectUploadIntent, direct_uploads_app
from .failures import HANDLED_ERRORS, RETRY_AFTER_SECONDS, storage_error_response
from .lifespan import LifespanFailed, run_lifespan
from .policy import (
    DEFAULT_POLICY,
    INLINE_TYPES,
    LABELLED_TYPES,
    PRESIGNED_INLINE_TYPES,
    UNSANDBOXED_TYPES,
    ContentPolicy,
    Presentation,
)
from .response import FileResponse
from .tus import TUS_EXTENSIONS, TusUpload, UploadTarget, tus_app

__all__ = [
    "DEFAULT_POLICY",
    "HANDLED_ERRORS",
    "INLINE_TYPES",
    "LABELLED_TYPES",
    "PRESIGNED_INLINE_TYPES",
    "RETRY_AFTER_SECONDS",
    "TUS_EXTENSIONS",
    "UNSANDBOXED_TYPES",
    "ContentPolicy",
    "DirectUploadIntent",
    "FileResponse",
    "LifespanFailed",
    "Presentation",
    "TusUpload",
    "UploadTarget",
    "configure_urls",
    "direct_uploads_app",
    "files_app",
    "run_lifespan",
    "storage_error_response",
    "tus_app",
]
