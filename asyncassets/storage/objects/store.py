"""A catalogue in MongoDB over an object backend: the store of a directory or S3 bucket.

:class:`ObjectStore` answers the same calls as
:class:`~asyncassets.storage.gridfs.GridBucket` (``open_upload``, ``upload``,
``find``, ``find_many``, ``open_download``, ``read``, ``delete``), so the file
layer does not know where bytes are. The catalogue entry of a file is a document
of ``<collection_name>.files`` in the GridFS spec's layout (``_id``, ``length``,
``chunkSize``, ``uploadDate``, ``filename``, ``metadata`` with the ``sha256``)
plus ``location``::

    {"_id": ObjectId(...), "length": 1234, "chunkSize": 261120,
     "uploadDate": ..., "filename": "marmot.jpg",
     "metadata": {"content_type": "image/jpeg", "sha256": "..."},
     "location": {"storage": "filesystem", "key": "2026/12/3f2c....jpg",
                  "version": 1764979200123456789}}

A key is a *name*, not an identity: templates without ``{uuid}`` give the same
key again once its file is deleted, and other tools may write under the
storage's root. So the guarantees rest on two things besides the key:

* **the key's reservation** (:mod:`.reservations`): an upload reserves its key in
  MongoDB before it writes a byte (a key reserved already gets the next variant,
  ``photo-2.jpg``), and the reservation is released only once the object is gone.
  While a file exists nobody else can write its key, whichever task or process
  races for it, and a delete (or a cleanup, or the sweep) removes only an object
  it holds the reservation of;
* **the object's version** (``location.version``: a directory file's
  ``st_mtime_ns``, an S3 object's ETag), recorded at the upload and checked by
  every read. An object put under the key by anything else (a key reused after a
  delete, a restore from an older backup, another tool) is never read in its
  place: :class:`~asyncassets.errors.FileDeletedWhileReading` when the entry is
  gone or changed, :class:`~asyncassets.errors.CorruptFile` when it is not.

The guarantees, in the order of the calls:

* an upload reserves its key, writes the bytes, commits them (atomically, never
  over an object an entry names), and inserts the catalogue entry last: a file
  whose entry exists is complete. Anything that fails or is cancelled before the
  entry is in removes what it provably wrote (the writer's temp file or multipart
  upload, the object it committed, by its version) and releases the key; when
  that cannot be known (the object store is unreachable) the reservation stays
  and the orphan sweep decides;
* a delete removes the entry first, then the object (only of the recorded
  version), then the reservation: a reader that finds the object gone looks the
  entry up again and reports :class:`~asyncassets.errors.FileDeletedWhileReading`
  rather than corruption;
* an object shorter or longer than its entry says is
  :class:`~asyncassets.errors.CorruptFile`;
* ``chunkSize`` is only the size of the pieces ``readchunk`` returns.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import weakref
from collections.abc import AsyncIterator, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, NoReturn

from bson import ObjectId
from pymongo.errors import DuplicateKeyError

from ... import _driver
from ..._tasks import spawn
from ...errors import (
    CorruptFile,
    FileAlreadyExists,
    FileDeletedWhileReading,
    KeyTaken,
    StorageError,
    StoredObjectChanged,
    StoredObjectMissing,
    UploadClosed,
    UploadInterrupted,
)
from ..catalogue import read_range
from ..entries import CatalogueReads, is_file_id
from ..gridfs.spec import DEFAULT_CHUNK_SIZE, FILES_INDEX, check_extra, now_as_stored
from ..lifecycle import UploadLifecycle, upload_all
from ..sources import byte_view, check_size, read_source
from .keys import KeyMaker, check_key
from .reservations import Reservations

if TYPE_CHECKING:
    from ..base import _ObjectStorage
    from .blobs import Blobs, BlobWriter

__all__ = [
    "LOCATION_INDEX",
    "ObjectDownload",
    "ObjectStore",
    "ObjectUpload",
    "location_key",
    "location_version",
]

#: Unique: two catalogue entries never name the same stored object.
LOCATION_INDEX = {"location.key": 1}
#: How many keys are tried when the one made is taken.
_KEY_ATTEMPTS = 100
#: Bytes an upload buffers before handing them to the backend writer.
_WRITE_BUFFER = 1024 * 1024
#: Pieces at least this large are hashed on a thread, beside the backend's write.
_THREADED_HASH = 256 * 1024
#: The identity of one upload: a new upload under the same _id differs in these.
_IDENTITY = ("length", "uploadDate", "location")

_indexed: weakref.WeakKeyDictionary[Any, set[tuple[str, str]]] = weakref.WeakKeyDictionary()


def location_key(doc: Mapping[str, Any]) -> str | None:
    """The key a catalogue entry names, or ``None`` (a GridFS file, or a bad entry)."""
    location = doc.get("location")
    if isinstance(location, Mapping) and isinstance(location.get("key"), str):
        return str(location["key"])
    return None


def location_version(doc: Mapping[str, Any]) -> Any:
    """The object version a catalogue entry recorded, or ``None`` (an entry written
    before versions were recorded, or a GridFS file)."""
    location = doc.get("location")
    if isinstance(location, Mapping):
        return location.get("version")
    return None


class ObjectStore(CatalogueReads):
    """The catalogue ``<collection_name>.files`` of ``db`` over ``storage``'s objects.

    Get one from :meth:`Storage.bind <asyncassets.storage.Storage.bind>`.

    :ivar name: the catalogue's name (the storage's ``collection_name``).
    :ivar files: the catalogue collection.
    :ivar storage: the storage.
    :ivar blobs: its backend.
    :ivar chunk_size: the size of the pieces sources are read in and ``readchunk``
        returns.
    :ivar reservations: the key reservations of the storage's place.
    :ivar key_field: the entry field whose ``key`` names this store's objects
        (``"location"``; a queued catalogue's remote copies are in ``"remote"``).
    """

    def __init__(self, db: Any, storage: _ObjectStorage, *, key_field: str = "location") -> None:
        self.db = db
        self.storage = storage
        self.name = storage.collection_name
        self.files = _driver.acknowledged(db[f"{self.name}.files"])
        self.blobs: Blobs = storage.blobs()
        self.keys: KeyMaker = storage.keys
        self.chunk_size = DEFAULT_CHUNK_SIZE
        self.key_field = key_field
        self.reservations = Reservations(db, self.blobs, self.name, key_field)

    #: A catalogue entry, once read, may be read from again without a fresh lookup:
    #: a read checks the object's version the entry recorded, so an entry can only
    #: ever give its own file's bytes, and bytes deleted or replaced since are
    #: reported (FileDeletedWhileReading), never mixed up.
    reuses_entries = True

    def __repr__(self) -> str:
        return f"ObjectStore({self.db.name!r}, {self.name!r}, {self.blobs.url!r})"

    @property
    def url(self) -> str:
        """Where the bytes are (``file:///...``, ``s3://bucket/prefix``)."""
        return self.blobs.url

    async def ensure_indexes(self) -> None:
        """Create the catalogue's indexes once per client, database and catalogue.

        ``{filename: 1, uploadDate: 1}`` as GridFS has, and a unique sparse index
        on ``location.key``: two entries can never name the same object.
        """
        done = _indexed.setdefault(self.db.client, set())
        key = (self.db.name, self.name)
        if key in done:
            return
        existing = [dict(i.get("key", {})) for i in await _driver.list_indexes(self.files)]
        if dict(FILES_INDEX) not in existing:
            await self.files.create_index(list(FILES_INDEX.items()))
        if dict(LOCATION_INDEX) not in existing:
            await self.files.create_index(list(LOCATION_INDEX.items()), unique=True, sparse=True)
        await self.reservations.ensure_indexes()
        done.add(key)

    # -- writing ------------------------------------------------------------------

    def open_upload(
        self,
        *,
        file_id: Any = None,
        filename: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        chunk_size: int | None = None,
        context: Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> ObjectUpload:
        """Start a streaming upload; no I/O until data is written or it is closed.

        As :meth:`GridBucket.open_upload <asyncassets.storage.gridfs.GridBucket.open_upload>`;
        ``context`` (``{"document": ..., "field": ...}``) feeds the key template;
        ``extra`` top-level fields go into the entry's insert.
        """
        return ObjectUpload(
            self,
            file_id=file_id,
            filename=filename,
            metadata=metadata,
            chunk_size=self.chunk_size if chunk_size is None else chunk_size,
            context=context,
            extra=extra,
        )

    async def upload(
        self,
        source: Any,
        *,
        file_id: Any = None,
        filename: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        chunk_size: int | None = None,
        context: Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Store ``source`` as a new file and return its catalogue entry.

        ``source`` is any of what :meth:`GridBucket.upload
        <asyncassets.storage.gridfs.GridBucket.upload>` takes, read piece by piece.
        If anything fails, including cancellation, nothing is left.
        """
        pieces = read_source(source, _WRITE_BUFFER)
        stream = self.open_upload(
            file_id=file_id,
            filename=filename,
            metadata=metadata,
            chunk_size=chunk_size,
            context=context,
            extra=extra,
        )
        return await upload_all(stream, pieces)

    async def reserve_key(
        self,
        key: str,
        *,
        file_id: Any,
        token: str,
        overwrite: bool,
        reserved: list[str] | None = None,
    ) -> str:
        """Reserve ``key``, or its first variant (``photo-2.jpg``...) that is free.

        A key is free when no reservation holds it (no live upload, stored file,
        dead writer or sweep); for a template that can repeat keys, also when no
        catalogue entry names it (entries written before reservations existed)
        and, with ``overwrite`` false, nothing (another tool's object, a link, a
        directory) is under it; with ``overwrite``, nothing an object cannot
        replace (a directory). Racing tasks and processes get distinct keys: the
        reservation's unique ``_id`` decides. After the key itself, the variant
        after the highest one reserved is tried (one query), then the next ones.

        :param reserved: each key reserved is appended to it at once, so a caller
            whose task fails midway knows what to release.
        :raises KeyTaken: no free variant in a hundred tries.
        :raises ValueError: a variant is not a valid key (too long).
        """
        number = 1
        for attempt in range(_KEY_ATTEMPTS):
            if attempt == 0:
                candidate = key
            else:
                if attempt == 1:
                    # Past the variants reserved already, in one query.
                    number = await self.reservations.highest_variant(key)
                number += 1
                candidate = check_key(KeyMaker.variant(key, number))
            if not await self.reservations.reserve(candidate, file_id=file_id, token=token):
                continue
            if reserved is not None:
                reserved.append(candidate)
            if not self.keys.always_unique and await self._taken(candidate, overwrite):
                await self.reservations.release(candidate, token=token)
                if reserved is not None:
                    reserved.remove(candidate)
                continue
            return candidate
        raise KeyTaken(
            f"{self.url}: the key {key!r} and its variants up to -{_KEY_ATTEMPTS} are all "
            "taken; use a key_template with {uuid} so keys never collide",
            storage=self.url,
            key=key,
        )

    async def _taken(self, key: str, overwrite: bool) -> bool:
        """Whether a reserved ``key`` is still not free: an entry names it (one
        written before reservations), or, without ``overwrite``, an object is there."""
        field = f"{self.key_field}.key"
        if await self.files.find_one({field: key}, {"_id": 1}) is not None:
            return True
        return await self.blobs.occupied(key, overwrite=overwrite)

    async def delete_object(self, key: str, *, version: Any, file_id: Any) -> None:
        """Delete the object of file ``file_id`` at ``key`` (only of ``version``, when
        known), then release the key's reservation.

        For a file whose entry is already gone. If the object cannot be deleted
        the error propagates and the reservation stays (the sweep finishes).
        """
        await self.blobs.delete(key, version=version)
        await self.reservations.release(key, file_id=file_id)

    # -- reading ------------------------------------------------------------------

    def open_download(
        self, files_doc: Mapping[str, Any], *, start: int = 0, end: int | None = None
    ) -> ObjectDownload:
        """An async iterator over the bytes ``[start, end)`` of a stored file.

        Only that range is fetched. Close it (``aclose()`` or ``async with``) if you
        stop early.

        :raises CorruptFile: the entry has no valid length or location; while
            iterating, the object is missing or not the entry's length.
        :raises FileDeletedWhileReading: while iterating, the file was deleted or
            replaced meanwhile.
        :raises StorageError: the backend failed (after its retries).
        """
        return ObjectDownload(self, files_doc, start=start, end=end)

    # -- deleting -----------------------------------------------------------------

    async def delete(self, file_id: Any) -> bool:
        """Delete a file: its catalogue entry first, then its object.

        Shielded from cancellation, so it never stops between the two steps.

        :returns: ``True`` if a catalogue entry existed.
        """
        return await asyncio.shield(spawn(self._delete(file_id)))

    async def _delete(self, file_id: Any) -> bool:
        if not is_file_id(file_id):
            return False  # names no file: never a query operator
        doc = await self.files.find_one_and_delete({"_id": file_id})
        if doc is None:
            return False
        key = location_key(doc)
        if key is not None:
            await self.delete_object(key, version=location_version(doc), file_id=file_id)
        return True


class ObjectUpload(UploadLifecycle):
    """A file being written to an :class:`ObjectStore`; get one from ``open_upload``.

    Bytes are hashed and counted as they pass and handed to the backend's writer
    in pieces of about 1 MiB (the writer holds at most a part or two more), so
    memory stays bounded whatever the file size, except with :meth:`write_nowait`,
    which buffers until the next awaited call. The key is reserved at the first
    write (or close); :meth:`close` commits the object, then inserts the catalogue
    entry with the object's version.

    :ivar file_id: the file's ``_id``.
    :ivar filename: the entry's ``filename``.
    :ivar key: the object's key, once chosen (at the first write or close).
    """

    def __init__(
        self,
        store: ObjectStore,
        *,
        file_id: Any = None,
        filename: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        context: Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        if metadata is not None and not isinstance(metadata, Mapping):
            raise TypeError(f"metadata must be a dict, not {type(metadata).__name__}")
        self._extra = check_extra(extra)
        self.chunk_size = check_size("chunk_size", chunk_size)
        self.file_id = ObjectId() if file_id is None else file_id
        self.filename = filename
        self.key: str | None = None
        self._store = store
        self._metadata = dict(metadata) if metadata else {}
        self._context = dict(context) if context else {}
        self._sha256 = hashlib.sha256()
        self._length = 0
        self._pending: list[bytes | memoryview] = []
        self._pending_size = 0
        self._writer: BlobWriter | None = None
        self._lock = asyncio.Lock()
        self._closing = False
        self._files_doc: dict[str, Any] | None = None
        self._abort_task: asyncio.Task[None] | None = None
        self._inflight: asyncio.Task[Any] | None = None
        # The writer's identity: the reservation's token, carried by the object.
        self._token = secrets.token_hex(16)
        self._reserved: list[str] = []
        self._committed = False
        self._version: Any = None
        self._entry_sent = False
        self._entry_duplicate = False
        # The sweep took the reservation over (a pause longer than its grace): the
        # object and the reservation are the sweep's to remove.
        self._swept = False

    def __repr__(self) -> str:
        state = "closed" if self._files_doc else "aborted" if self._abort_task else "open"
        return f"<ObjectUpload {self.file_id!r} {state}, {self._length} bytes>"

    def write_nowait(self, data: Any) -> None:
        """Append ``data`` without I/O; memory grows until the next awaited call.

        :raises UploadClosed: the stream is closed or aborted.
        :raises TypeError: ``data`` is not bytes-like.
        """
        self._check_open()
        self._append(byte_view(data, "write() data"))

    async def write(self, data: Any) -> None:
        """Append ``data``; hand the buffer to the backend once about 1 MiB is held.

        :raises UploadClosed: the stream is closed or aborted.
        :raises TypeError: ``data`` is not bytes-like.
        :raises StorageError: the backend failed (the stream is then aborted).
        """
        self._check_open()
        self._append(byte_view(data, "write() data"))
        if self._pending_size >= _WRITE_BUFFER:
            await self._send(final=False)

    async def flush(self) -> None:
        """Hand everything buffered to the backend's writer and wait for it."""
        self._check_open()
        await self._send(final=True)

    async def close(self) -> dict[str, Any]:
        """Commit the object, insert the catalogue entry, and return the entry.

        Closing again returns the same entry. If closing fails or is cancelled, the
        upload is aborted (what it wrote is removed) and the exception propagates.

        :raises UploadClosed: the stream was aborted.
        :raises FileAlreadyExists: ``file_id`` is taken in the catalogue.
        :raises KeyTaken: another tool wrote an object under the reserved key
            between its choice and the commit (``overwrite=False``), or no free
            variant of the key was found.
        :raises UploadInterrupted: the upload paused longer than an orphan sweep's
            grace, and the sweep took its key over; nothing was stored.
        :raises StorageError: the backend failed.
        """
        if self._files_doc is not None:
            return self._files_doc
        if self._abort_task is not None:
            raise UploadClosed(f"upload {self.file_id!r} was aborted; it cannot be closed")
        async with self._lock:
            if self._files_doc is not None:
                return self._files_doc
            self._check_not_aborted()
            self._closing = True
            try:
                await self._send_locked()
                await self._wait_inflight()
                writer = await self._open_writer()
                self._check_not_aborted()
                await self._run(self._commit(writer))
                doc = await self._make_entry()
                self._check_not_aborted()
                self._entry_sent = True
                await self._run(self._insert_entry(doc))
                await self._run(self._check_reservation(after_entry=True))
            except BaseException as exc:
                await self._abort_after(exc)
                raise
            self._files_doc = doc
            return doc

    # -- internals ---------------------------------------------------------------

    def _wrote_something(self) -> bool:
        return getattr(self, "_writer", None) is not None

    def _drop_buffers(self) -> None:
        self._pending = []
        self._pending_size = 0

    def _append(self, view: bytes | memoryview) -> None:
        if not len(view):
            return
        # Hashed when sent (see _send_locked), on a thread beside the write.
        self._length += len(view)
        # A view of immutable bytes is kept as it is; anything the caller may change
        # after this returns (a bytearray it reuses) is copied.
        immutable = type(view) is bytes or (
            isinstance(view, memoryview) and type(view.obj) is bytes
        )
        self._pending.append(view if immutable else bytes(view))
        self._pending_size += len(view)

    async def _run(self, coro: Any) -> Any:
        """Await ``coro`` in its own task: a cancelled caller never cuts it halfway,
        so cleanup runs after it, not during it."""
        task = spawn(coro)
        self._inflight = task
        try:
            return await asyncio.shield(task)
        finally:
            if task.done() and self._inflight is task:
                self._inflight = None

    async def _send(self, *, final: bool) -> None:
        async with self._lock:
            try:
                await self._send_locked()
                if final:
                    await self._wait_inflight()
            except asyncio.CancelledError:
                raise  # consistent: what was sent is in the writer; the caller decides
            except BaseException as exc:
                await self._abort_after(exc)
                raise

    async def _send_locked(self) -> None:
        if not self._pending:
            return
        # One piece at a time: a write whose caller was cancelled is still running
        # (shielded); the next must not overtake it, nor its hashing.
        await self._wait_inflight()
        writer = await self._open_writer()
        data: bytes | memoryview = (
            self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        )
        self._pending = []
        self._pending_size = 0
        self._check_not_aborted()
        # Not awaited: the caller fills the next piece while this one is hashed and
        # written (memory: one piece in flight, one filling). Its error, if any,
        # surfaces at the next write, flush or close.
        self._inflight = spawn(self._hash_and_write(writer, data))

    async def _hash_and_write(self, writer: BlobWriter, data: bytes | memoryview) -> None:
        if len(data) < _THREADED_HASH:
            self._sha256.update(data)
            await writer.write(data)
            return
        # hashlib releases the GIL on large buffers: the SHA-256 runs on another
        # core while the backend writes (or sends) the same bytes.
        await asyncio.gather(asyncio.to_thread(self._sha256.update, data), writer.write(data))

    async def _wait_inflight(self) -> None:
        """Wait for the piece in flight; raise its error. Shielded: a cancelled
        caller leaves it to finish, and the cleanup waits for it."""
        task = self._inflight
        if task is None:
            return
        await asyncio.shield(task)
        if self._inflight is task:
            self._inflight = None

    async def _open_writer(self) -> BlobWriter:
        if self._writer is None:
            store = self._store
            key = store.keys.make(
                file_id=self.file_id, filename=self.filename, context=self._context
            )
            check_key(key)
            await store.ensure_indexes()
            key = await self._run(
                store.reserve_key(
                    key,
                    file_id=self.file_id,
                    token=self._token,
                    overwrite=store.storage.overwrite,
                    reserved=self._reserved,
                )
            )
            self._check_not_aborted()
            self.key = key
            self._writer = store.blobs.open_writer(key, token=self._token)
        return self._writer

    async def _commit(self, writer: BlobWriter) -> None:
        # Runs in its own task (see _run), so what it records is true by the time
        # the cleanup, which waits for it, reads it. Committed only once commit()
        # returned: a commit that raised or was cancelled is the writer's abort()'s
        # to undo, and the writer removes only an object that is provably its own.
        overwrite = self._store.storage.overwrite
        if overwrite:
            # An overwriting commit replaces whatever is under the key: make sure
            # the key is still this upload's (a pause longer than a sweep's grace
            # lets the sweep take it over and someone else reserve it).
            await self._check_reservation(after_entry=False)
        try:
            await writer.commit(overwrite=overwrite)
        except StorageError as exc:
            # A sweep that took the key over also removed the writer's temp file or
            # multipart upload: say so, rather than what the commit then met.
            if await self._store.reservations.held(self.key or "", self._token):
                raise
            self._swept = True
            raise self._interrupted() from exc
        self._version = writer.version
        self._committed = True

    async def _check_reservation(self, *, after_entry: bool) -> None:
        """Raise :class:`UploadInterrupted` if the sweep took this upload's key over."""
        assert self.key is not None
        reservations = self._store.reservations
        if after_entry:
            held = await reservations.held(self.key, self._token)
        else:
            held = await reservations.confirm(self.key, self._token)
        if held:
            return
        self._swept = True
        raise self._interrupted()

    def _interrupted(self) -> UploadInterrupted:
        return UploadInterrupted(
            f"upload {self.file_id!r} paused longer than an orphan sweep's grace, and the "
            f"sweep took its key {self.key!r} in {self._store.url} over; nothing was "
            "stored. Upload it again, and give the sweep a grace far longer than any "
            "upload."
        )

    async def _make_entry(self) -> dict[str, Any]:
        assert self.key is not None
        doc: dict[str, Any] = {
            "_id": self.file_id,
            "length": self._length,
            "chunkSize": self.chunk_size,
            "uploadDate": now_as_stored(self._store.files),
        }
        if self.filename is not None:
            doc["filename"] = self.filename
        doc["metadata"] = {**self._metadata, "sha256": self._sha256.hexdigest()}
        location: dict[str, Any] = {"storage": self._store.storage.kind, "key": self.key}
        if self._version is not None:
            location["version"] = self._version
        doc["location"] = location
        doc.update(self._extra)
        return doc

    async def _insert_entry(self, doc: dict[str, Any]) -> None:
        await self._store.ensure_indexes()
        try:
            await self._store.files.insert_one(doc)
        except DuplicateKeyError as exc:
            self._entry_duplicate = True
            if "location" in str(exc.details or exc):
                raise KeyTaken(
                    f"{self._store.url}: another catalogue entry names the key {self.key!r} "
                    "(taken between its choice and this upload's end); upload again",
                    storage=self._store.url,
                    key=self.key,
                ) from exc
            raise FileAlreadyExists(
                f"a file with _id {self.file_id!r} already exists in catalogue "
                f"{self._store.name!r}; pass another file_id, or none for a new ObjectId"
            ) from exc

    async def _cleanup(self) -> None:
        await self._drain_inflight()
        store = self._store
        if self._entry_sent and not self._entry_duplicate:
            await store.files.delete_one({"_id": self.file_id, "location.key": self.key})
        writer = self._writer
        if self._swept:
            # The key is not this upload's any more: only an object it committed
            # (by its version) is removed; the reservation is the sweep's.
            if self._committed and self.key is not None:
                await store.blobs.delete(self.key, version=self._version)
            return
        if writer is not None:
            assert self.key is not None
            if self._committed:
                # Ours for sure: this upload committed it, under its reserved key.
                await store.blobs.delete(self.key, version=self._version)
            else:
                # The writer removes its temp file or multipart upload, and an object
                # whose commit did not return if it is provably its own.
                await writer.abort()
                if not writer.settled:
                    # A commit whose outcome is unknown may still land: the key stays
                    # reserved, and the orphan sweep removes what lands (its token).
                    return
        # Only now is nothing of this upload under its keys: release them. (If the
        # removal above failed, the reservation stays for the sweep.)
        for key in list(self._reserved):
            await store.reservations.release(key, token=self._token)
            self._reserved.remove(key)


class ObjectDownload:
    """An async iterator over the bytes ``[start, end)`` of a file in an object store.

    :ivar file_id: the file's ``_id``.
    :ivar files_doc: its catalogue entry.
    :ivar length: the whole file's length.
    :ivar start: first byte yielded.
    :ivar end: end (exclusive) of the bytes yielded.
    """

    def __init__(
        self,
        store: ObjectStore,
        files_doc: Mapping[str, Any],
        *,
        start: int = 0,
        end: int | None = None,
    ) -> None:
        self._store = store
        self.file_id = files_doc.get("_id") if isinstance(files_doc, Mapping) else None
        self.files_doc = files_doc
        length, start, end = read_range(files_doc, start, end, self._corrupt)
        key = location_key(files_doc)
        if key is None:
            raise self._corrupt(
                f"its catalogue entry names no stored object (location: "
                f"{files_doc.get('location')!r})"
            )
        self.key = key
        self.version = location_version(files_doc)
        self.length = length
        self.start = start
        self.end = end
        self._pos = start
        self._pieces: AsyncIterator[bytes] | None = None
        self._done = start == end
        self._checked_empty = False

    def __repr__(self) -> str:
        return f"<ObjectDownload {self.file_id!r} {self.key!r} [{self.start}, {self.end})>"

    def __aiter__(self) -> ObjectDownload:
        return self

    async def __anext__(self) -> bytes:
        if self._done:
            if not self._checked_empty and self.length == 0:
                # A whole empty file reads nothing: its object must still be there.
                self._checked_empty = True
                await self._exists()
            raise StopAsyncIteration
        if self._pieces is None:
            self._pieces = self._store.blobs.open_reader(
                self.key, self.start, self.end, version=self.version
            )
        try:
            piece = await anext(self._pieces)
        except StopAsyncIteration:
            if self._pos < self.end:
                await self._fail(
                    f"its object {self.key!r} ends at byte {self._pos}, but the catalogue "
                    f"entry says {self.length}"
                )
            self._done = True
            await self.aclose()
            raise
        except StoredObjectChanged as exc:
            await self._fail(
                f"the object under its key {self.key!r} in {self._store.url} is not the "
                f"one its upload wrote (version {self.version!r}): it was replaced or "
                "restored behind the catalogue's back",
                exc,
            )
        except StoredObjectMissing as exc:
            await self._fail(f"no object under its key {self.key!r} in {self._store.url}", exc)
        self._pos += len(piece)
        if self._pos > self.end:
            await self._fail(f"its object {self.key!r} gave more bytes than the range asked")
        if self._pos == self.end:
            self._done = True
        return piece

    async def _exists(self) -> None:
        info = await self._store.blobs.stat(self.key)
        if info is None:
            await self._fail(f"no object under its key {self.key!r} in {self._store.url}")
        elif self.version is not None and info.version != self.version:
            await self._fail(
                f"the object under its key {self.key!r} in {self._store.url} is not the "
                f"one its upload wrote (version {self.version!r})"
            )
        elif info.size != self.length:
            await self._fail(
                f"its object {self.key!r} is {info.size} bytes, the catalogue entry says "
                f"{self.length}"
            )

    async def aclose(self) -> None:
        """Stop reading; idempotent."""
        self._done = True
        pieces, self._pieces = self._pieces, None
        closer = getattr(pieces, "aclose", None)
        if closer is not None:
            await closer()

    async def __aenter__(self) -> ObjectDownload:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def _corrupt(self, problem: str) -> CorruptFile:
        return CorruptFile(
            f"file {self.file_id!r} in catalogue {self._store.name!r} is corrupt: {problem}"
        )

    async def _fail(self, problem: str, cause: BaseException | None = None) -> NoReturn:
        """Raise for bytes that do not match the entry: deleted meanwhile, or corrupt."""
        await self.aclose()
        corrupt = self._corrupt(problem)
        if cause is not None:
            corrupt.__cause__ = cause
        current = await self._store.find(self.file_id)
        if current is None or any(
            current.get(k) != self.files_doc.get(k) for k in _IDENTITY if k in self.files_doc
        ):
            raise FileDeletedWhileReading(self.file_id, self._store.name) from corrupt
        raise corrupt

