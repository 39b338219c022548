"""One exception hierarchy for everything asyncassets raises.

Every class derives from :class:`AsyncAssetsError`, so ``except AsyncAssetsError``
catches anything the library raises on purpose. Where mongoengine already has the
right class (``ValidationError``, ``DoesNotExist``, ``NotUniqueError``...) the
library raises that one, so code written for mongoengine keeps working.

The file errors that mongoengine or PyMongo code already catches under another
name also derive from that class, so existing ``except`` clauses keep working
(see :doc:`/migration`):

* :class:`FileAlreadyExists` is a ``mongoengine.fields.GridFSError``;
* :class:`FileNotFound` is a ``gridfs.errors.NoFile`` (and a ``LookupError``);
* :class:`CorruptFile` and :class:`IntegrityError` are each a
  ``gridfs.errors.CorruptGridFile``.

Through PyMongo's classes, ``FileNotFound``, ``CorruptFile`` and ``IntegrityError`` are
also ``pymongo.errors.PyMongoError``.
"""

from __future__ import annotations

from typing import Any

from gridfs.errors import CorruptGridFile, NoFile
from mongoengine.errors import ValidationError
from mongoengine.fields import GridFSError as MongoengineGridFSError

__all__ = [
    "AssetExists",
    "AssetNotFound",
    "AsyncAssetsError",
    "CLIError",
    "ChecksumMissing",
    "ConnectionNotRegistered",
    "CorruptFile",
    "DirectUploadError",
    "EmbeddedServerError",
    "FileAlreadyExists",
    "FileConflict",
    "FileDeletedWhileReading",
    "FileNotFound",
    "FileNotLoaded",
    "FileNotSaved",
    "FileValidationError",
    "GridFSError",
    "IntegrityError",
    "KeyTaken",
    "LifespanFailed",
    "PendingFileMissing",
    "PillowMissing",
    "ResumableUploadError",
    "ServerBinaryMissing",
    "SignatureInvalid",
    "SignedURLError",
    "StorageConflict",
    "StorageError",
    "StoredObjectChanged",
    "StoredObjectMissing",
    "TransferFailed",
    "URLExpired",
    "URLsNotConfigured",
    "UploadChecksumMismatch",
    "UploadClosed",
    "UploadExpired",
    "UploadInterrupted",
    "UploadLocked",
    "UploadNotFound",
    "UploadOffsetMismatch",
    "UploadTooLarge",
    "WebExtraMissing",
    "WrongEventLoop",
]


class AsyncAssetsError(Exception):
    """Base class of every error asyncassets raises on purpose."""


class ConnectionNotRegistered(AsyncAssetsError, LookupError):
    """No connection was registered under the alias a document or call asked for."""


class WrongEventLoop(AsyncAssetsError, RuntimeError):
    """A client handed to :func:`~asyncassets.connect` is used from another event loop."""


class EmbeddedServerError(AsyncAssetsError, RuntimeError):
    """The local database server could not be started, reached or stopped."""


class ServerBinaryMissing(EmbeddedServerError):
    """No server to start: neither ``mongod`` on ``PATH`` nor SecantusDB installed
    (``pip install 'asyncassets[embedded]'``), or not the binary asked for.

    :ivar reason: what is missing, without the advice on installing a server
        that the message adds.
    """

    def __init__(self, message: str, *, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason or message


class CLIError(AsyncAssetsError):
    """A problem the ``asyncassets`` command reports on one line, without a traceback.

    Bad input (an unknown id, a missing local file, a malformed ``--meta`` or
    duration) or a refusal (``sweep`` without ``--import``): the command prints
    ``asyncassets: error: <message>`` on stderr and exits with status 1.
    """


class GridFSError(AsyncAssetsError):
    """Base class of file errors (named after PyMongo's ``gridfs.errors.GridFSError``)."""


class FileAlreadyExists(GridFSError, MongoengineGridFSError):
    """``put`` or ``new_file`` was called on a proxy that already holds a file.

    Also a ``mongoengine.fields.GridFSError``, which mongoengine raises for this.
    """


# PyMongo's classes come before LookupError in the bases: their __init__ (which
# sets the error labels that PyMongo's and asyncassets' retry logic ask about)
# must run, and LookupError's would end the chain before it.
class FileNotFound(GridFSError, NoFile, LookupError):
    """A document references a file that is missing from its bucket.

    Also a ``gridfs.errors.NoFile`` (what PyMongo raises for a missing file) and a
    ``LookupError``.
    """

    def __init__(self, file_id: Any, bucket: str, alias: str | None = None) -> None:
        self.file_id = file_id
        self.bucket = bucket
        self.alias = alias
        where = f"bucket {bucket!r}" + (f" (alias {alias!r})" if alias else "")
        super().__init__(
            f"File {file_id!r} is referenced but missing from {where}; "
            "it was deleted behind the document's back. Run asyncassets.check() "
            "to list dangling references."
        )


class CorruptFile(GridFSError, CorruptGridFile):
    """A stored file's chunks do not match its files document (missing, short or extra).

    Also a ``gridfs.errors.CorruptGridFile``, as PyMongo raises for this.
    """


class FileNotLoaded(GridFSError):
    """A metadata attribute was read before the file's metadata was loaded.

    Deliberately not an ``AttributeError``: ``getattr(proxy, "length", None)`` or a
    template engine would otherwise hide the missing ``await proxy.load()``.
    """


class FileNotSaved(FileNotLoaded):
    """The field holds data assigned to it (``doc.photo = data``) that ``save()`` has
    not uploaded yet, so there is no stored file to read or describe.

    A :class:`FileNotLoaded`: code that loads before reading handles both alike.
    """


class UploadClosed(GridFSError, ValueError):
    """``write`` was called on a streaming upload that is closed or aborted."""


class UploadInterrupted(GridFSError):
    """An upload's chunks were removed before it closed; nothing was stored.

    Until its files document is written, an upload's chunks look abandoned: an
    orphan sweep whose ``grace`` is shorter than a pause of the upload removes
    them. ``close()`` counts them and raises this instead of storing a file with
    missing chunks.
    """


class IntegrityError(GridFSError, CorruptGridFile):
    """A file's bytes no longer match the checksum recorded when it was written.

    Corruption, so also a ``gridfs.errors.CorruptGridFile``.
    """


class ChecksumMissing(GridFSError):
    """``verify()`` found no checksum to check a file against (legacy data).

    Not an :class:`IntegrityError`: nothing is known to be wrong with the bytes.
    """


class FileValidationError(ValidationError, AsyncAssetsError):
    """A file was refused by a field's validation options (size, type, name, image).

    A mongoengine ``ValidationError``: ``field_name`` names the field (or the path of
    a list element) that refused it.
    """

    def __init__(self, message: str = "", **kwargs: Any) -> None:
        # mongoengine's ValidationError takes errors=, field_name=; typed here since
        # mongoengine ships no type information.
        ValidationError.__init__(self, message, **kwargs)


class FileConflict(GridFSError):
    """The document's file changed (or the document vanished) since it was loaded.

    Raised by ``put``/``replace``/``delete``/``close`` on a saved document when
    another task or process changed the same file reference first, and by a proxy
    that no longer belongs to its saved document (popped from a list, its field
    reassigned, or copied into another document). Nothing was lost: the file this
    call uploaded was removed again. Reload and retry.

    Also raised by :meth:`AssetManager.replace
    <asyncassets.assets.AssetManager.replace>` when another replace of the asset
    won (it moved the id on from the version this one started from); the bytes
    this one stored were removed. ``get()`` the asset and replace it again.
    """


class FileDeletedWhileReading(FileNotFound):
    """The file was deleted (or replaced, which deletes it) while it was being read.

    Not corruption: another task or process changed the reference and removed the
    old file mid-read. Load the document again and read its current file.
    """

    def __init__(self, file_id: Any, bucket: str, alias: str | None = None) -> None:
        super().__init__(file_id, bucket, alias)
        self.args = (
            f"File {file_id!r} in bucket {bucket!r} was deleted or replaced while it was "
            "being read; the bytes already returned are from the old file. Reload the "
            "document and read its current file.",
        )


class PendingFileMissing(FileNotFound):
    """A file uploaded for a document is gone before the ``save()`` that references it.

    Until its document (or list element) is saved, a new file is referenced only in
    memory, so the orphan sweep counts it as unreferenced once it is older than
    the sweep's ``grace``. ``save()`` checks such files still exist and raises this
    instead of storing a dangling reference.
    """

    def __init__(self, message: str, *, file_id: Any, bucket: str, alias: str | None) -> None:
        super().__init__(file_id, bucket, alias)
        self.args = (message,)


class PillowMissing(AsyncAssetsError, ImportError):
    """An ``ImageField`` was declared but Pillow is not installed."""


class StorageError(AsyncAssetsError):
    """A storage backend (a directory, an S3 bucket) refused or failed an operation.

    Raised for permanent failures (permission denied, bad credentials, a missing
    bucket or directory, a full disk) at once, and for transient ones (timeouts,
    throttling, 5xx replies) once the storage's retries are used up. The message
    names the storage, the key and what to do; ``__cause__`` is the client's error.

    :ivar storage: how the storage describes itself (``s3://media/trailers/``...).
    :ivar key: the key concerned, or ``None``.
    :ivar transient: whether the failure was of a kind that is retried.
    """

    def __init__(
        self,
        message: str,
        *,
        storage: str = "",
        key: str | None = None,
        transient: bool = False,
    ) -> None:
        super().__init__(message)
        self.storage = storage
        self.key = key
        self.transient = transient


class StorageConflict(AsyncAssetsError, ValueError):
    """Two declarations give one catalogue different storages.

    A catalogue (``<collection_name>.files`` on one connection alias) belongs to
    one storage. Raised when a document class, or an
    :class:`~asyncassets.assets.AssetManager`, is declared with a field whose
    storage differs from the one another declaration gives the same catalogue;
    and by the sweep, the check and ``files_app`` when they meet such
    declarations. The message names the declarations and their storages: give
    them equal storages, or one of them its own ``collection_name``.
    """


class StoredObjectMissing(StorageError, LookupError):
    """No stored object under the key a catalogue entry names."""


class StoredObjectChanged(StoredObjectMissing):
    """The object under a catalogue entry's key is not the one that entry's upload wrote.

    Every upload records its object's version in the entry (``location.version``: a
    directory object's modification time to the nanosecond, an S3 object's ETag),
    and every read checks it. Another object under the key means the entry's bytes
    are gone: the key was reused, overwritten, or restored from an older backup.
    """


class KeyTaken(StorageError):
    """An object already exists under the key, and overwriting was not allowed."""


class DirectUploadError(AsyncAssetsError):
    """A direct-to-S3 upload session refused a request (:mod:`asyncassets.web.direct`).

    :ivar status: the HTTP status the app answers with: 400 bad input, 403 refused
        by the app's hook, 404 no such session, 409 a state that another call must
        change first (parts missing, another finalize running), 410 expired, 413
        too large, 422 the uploaded bytes do not match what was declared (the
        upload was removed), 503 the storage failed (try again).
    """

    def __init__(self, message: str, *, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class WebExtraMissing(AsyncAssetsError, ImportError):
    """:mod:`asyncassets.web` was imported but Starlette is not installed.

    ``pip install 'asyncassets[web]'`` installs it.
    """


class LifespanFailed(AsyncAssetsError, RuntimeError):
    """An app's lifespan reported a failed startup or shutdown, or did not answer.

    Raised by :func:`asyncassets.web.run_lifespan`.
    """


class SignedURLError(AsyncAssetsError):
    """Base class of the errors of signed file URLs (``proxy.url()``, ``files_app``)."""


class URLsNotConfigured(SignedURLError, RuntimeError):
    """``proxy.url()`` was called for a GridFS or directory file with no signing key set.

    Such URLs point at :func:`asyncassets.web.files_app`; mount it (which sets the
    key) or call :func:`asyncassets.web.configure_urls` first.
    """


class SignatureInvalid(SignedURLError, ValueError):
    """A signed URL's token is malformed, was altered, or was signed with an unknown key."""


class URLExpired(SignedURLError):
    """A signed URL's expiry has passed.

    :ivar expired_at: when it expired (seconds since the epoch).
    """

    def __init__(self, message: str, *, expired_at: int) -> None:
        super().__init__(message)
        self.expired_at = expired_at



class AssetNotFound(AsyncAssetsError, KeyError):
    """No asset has this id in the asset manager's catalogue (also a ``KeyError``).

    :ivar asset_id: the id asked for.
    :ivar catalogue: the catalogue looked in (``<collection_name>.files``).
    """

    def __init__(self, asset_id: Any, catalogue: str) -> None:
        self.asset_id = asset_id
        self.catalogue = catalogue
        super().__init__(asset_id)

    def __str__(self) -> str:
        return (
            f"no asset {self.asset_id!r} in catalogue {self.catalogue!r}; "
            "search for it (await am.search(...)) or add it first"
        )


class AssetExists(AsyncAssetsError):
    """``add(..., on_conflict="error")`` was given an asset id that is taken.

    :ivar asset_id: the id asked for.
    """

    def __init__(self, message: str, *, asset_id: Any) -> None:
        super().__init__(message)
        self.asset_id = asset_id


class TransferFailed(StorageError):
    """A queued transfer (local copy to remote storage) did not complete.

    The file is unharmed: its local copy is still the one served. Raised by an
    explicit ``await doc.<field>.transfer()``; background workers record the same
    failure in the file's catalogue entry (``transfer.error``) and retry it with
    backoff until ``max_attempts``, after which it is ``failed`` until retried by
    hand (:func:`asyncassets.transfers.retry_failed`, ``asyncassets transfer
    --retry-failed``). ``__cause__`` is the error that stopped it.

    :ivar file_id: the file's ``_id``.
    :ivar state: the transfer's state after this attempt: ``"pending"`` (will be
        retried), ``"failed"`` (out of attempts) or ``"gone"`` (the file was
        deleted or replaced meanwhile).
    """

    def __init__(
        self,
        message: str,
        *,
        file_id: Any = None,
        state: str = "pending",
        storage: str = "",
        key: str | None = None,
    ) -> None:
        super().__init__(message, storage=storage, key=key)
        self.file_id = file_id
        self.state = state



class ResumableUploadError(AsyncAssetsError):
    """A resumable upload session refused a request (see :doc:`/uploads`).

    :ivar upload_id: the session's id.
    """

    def __init__(self, message: str, *, upload_id: str = "") -> None:
        super().__init__(message)
        self.upload_id = upload_id


class UploadNotFound(ResumableUploadError, LookupError):
    """No resumable upload has this id (never created, terminated, or swept)."""


class UploadExpired(UploadNotFound):
    """The resumable upload is past its expiry; start a new one."""


class UploadOffsetMismatch(ResumableUploadError):
    """The write starts elsewhere than the session's durable offset: ask for the
    offset (tus: ``HEAD``) and resume from there.

    :ivar offset: the session's durable offset.
    """

    def __init__(self, message: str, *, upload_id: str = "", offset: int = 0) -> None:
        super().__init__(message, upload_id=upload_id)
        self.offset = offset


class UploadLocked(ResumableUploadError):
    """Another request is writing to this upload right now (its lease holds);
    retry after it ends or its lease expires."""


class UploadChecksumMismatch(ResumableUploadError):
    """The bytes of one write do not match the checksum sent with them; nothing of
    that write was kept. Send them again."""


class UploadTooLarge(ResumableUploadError):
    """More bytes than the upload's declared length, or than the field accepts."""
