"""What an object store must do for asyncassets: write, read a range, stat, list, delete.

A backend (:class:`~asyncassets.storage.FileSystemStorage`'s directory,
:class:`~asyncassets.storage.S3Storage`'s bucket) knows nothing of documents,
catalogue entries or checksums: it stores opaque bytes under string keys. The
catalogue store (:mod:`.store`) builds everything else on these few calls, so
the guarantees (the catalogue entry written last, deletion in the safe order,
aborted uploads leaving nothing) are written once for every backend.

A backend's rules:

* keys are ``/``-separated relative paths, made by :mod:`.keys`; a backend never
  sees a key with ``..``, a leading ``/``, a backslash or a NUL;
* a write is invisible until :meth:`BlobWriter.commit` returns, and then complete:
  a reader never sees half an object (filesystem: temp file, fsync, link/rename;
  S3: one PUT, or a multipart upload completed at the end);
* every committed object has a *version* (:attr:`BlobWriter.version`): a
  directory file's ``st_mtime_ns``, an S3 object's ETag. Reads, stats and
  deletes can be made conditional on it, so an object that another one replaced
  under the same key is never read or deleted in its place;
* a writer is given a ``token``; the object it commits carries it (the
  nanoseconds of the file's time, S3 user metadata), so the sweep can tell an
  object a dead writer committed from one another writer put there
  (:meth:`Blobs.made_by`);
* ``commit`` with ``overwrite=False`` never replaces an existing object: it raises
  :class:`~asyncassets.errors.KeyTaken` and leaves both in place;
* :meth:`BlobWriter.abort` removes whatever the writer wrote unless ``commit()``
  returned (temp file, S3 multipart parts, or the object of a commit that raised
  or was cancelled, when it is provably this writer's); it is idempotent and
  safe after a failure or cancellation;
* memory stays bounded: a writer holds at most about two parts, a reader one piece;
* transient failures (timeouts, 5xx, throttling, a connection reset) are retried
  with the storage's :class:`~asyncassets.storage.retry.Retry`; a reader resumes
  from the byte it reached; permanent ones raise
  :class:`~asyncassets.errors.StorageError` at once, saying what to do;
* a missing key on read raises :class:`~asyncassets.errors.StoredObjectMissing`.
"""

from __future__ import annotations

import datetime
from collections.abc import AsyncIterator
from typing import Any, NamedTuple, Protocol, runtime_checkable

__all__ = ["BlobInfo", "BlobWriter", "Blobs"]


class BlobInfo(NamedTuple):
    """One stored object, as listing or :meth:`Blobs.stat` sees it."""

    #: The key, relative to the storage's root or prefix.
    key: str
    #: Its size in bytes.
    size: int
    #: When it was last written (UTC, timezone-aware).
    modified: datetime.datetime
    #: Its version (``st_mtime_ns``, an ETag), when the backend says it.
    version: Any = None
    #: The token of the writer that committed it, when the backend says it (S3's
    #: ``stat``; a directory's is in the version, see :meth:`Blobs.made_by`).
    token: str | None = None


@runtime_checkable
class BlobWriter(Protocol):
    """One object being written; bytes arrive in order, in pieces of any size."""

    #: The key the object will be stored under.
    key: str
    #: The committed object's version (``None`` until :meth:`commit` returns).
    version: Any
    #: After :meth:`abort`: whether nothing of this writer can appear under the key
    #: any more. ``False`` when a request's outcome is unknown (an S3 PUT cut short
    #: may still be applied by the server): its key must stay reserved, and the
    #: orphan sweep removes what lands there (it carries the writer's token).
    settled: bool

    async def write(self, data: bytes | memoryview) -> None:
        """Append ``data``; may wait while a full part is sent (bounded memory).

        :raises StorageError: the backend refused or failed (after retries); the
            writer is then unusable and must be aborted.
        """
        ...

    async def commit(self, *, overwrite: bool = False) -> None:
        """Make the object visible under :attr:`key`, complete, durable.

        :raises KeyTaken: ``overwrite`` is false and an object exists under the key;
            nothing of this writer is left (as after :meth:`abort`).
        :raises StorageError: as :meth:`write`.
        """
        ...

    async def abort(self) -> None:
        """Remove everything this writer wrote; idempotent; a no-op once
        :meth:`commit` returned."""
        ...


@runtime_checkable
class Blobs(Protocol):
    """A place that stores bytes under keys."""

    #: How messages name the storage: ``file:///srv/media``, ``s3://media/trailers/``.
    url: str
    @property
    def place(self) -> str:
        """How key reservations name the place: ``file:/srv/media``, ``s3:<endpoint>/media/``."""
        ...

    def reservation_id(self, key: str) -> str:
        """The name under which the object at ``key`` is reserved in MongoDB
        (:mod:`.reservations`): the same for every storage reaching that object."""
        ...

    def made_by(self, info: BlobInfo, token: str) -> bool:
        """Whether the object ``info`` (from :meth:`stat`) was committed by the
        writer given ``token``."""
        ...

    def open_writer(self, key: str, *, token: str | None = None) -> BlobWriter:
        """Start writing an object under ``key``; no I/O until the first write/commit."""
        ...

    def open_reader(
        self, key: str, start: int, end: int, *, version: Any = None
    ) -> AsyncIterator[bytes]:
        """Yield the bytes ``[start, end)`` of the object under ``key``, in pieces.

        Only that range is fetched (S3: a Range GET; a file: a seek). An async
        generator: the caller closes it (``aclose()``) if it stops early.

        :param version: read only the object of this version (S3: ``If-Match``,
            resumed reads included; a file: compared on the opened descriptor).
        :raises StoredObjectMissing: no object under ``key``.
        :raises StoredObjectChanged: the object under ``key`` is of another version.
        :raises StorageError: the backend refused or failed (after retries).
        """
        ...

    async def stat(self, key: str) -> BlobInfo | None:
        """The object under ``key``, or ``None`` if there is none."""
        ...

    async def occupied(self, key: str, *, overwrite: bool = False) -> bool:
        """Whether something stands under ``key`` that a commit (with
        ``overwrite``, an overwriting one) could not put a new object in place
        of: without it, any object (on disk also a link or a directory, which are
        not objects); with it, only what cannot be replaced (a directory)."""
        ...

    async def delete(self, key: str, *, version: Any = None) -> bool:
        """Delete the object under ``key`` (only if of ``version``, when given).

        A missing object, or one of another version, is not an error: it is left.

        :returns: ``True`` if an object was (or, where the backend cannot say,
            may have been) deleted.
        """
        ...

    def list(self) -> AsyncIterator[BlobInfo]:
        """Every object under the storage's root or prefix, in no set order.

        Objects being written (temp files, pending multipart uploads) are not listed.
        """
        ...
