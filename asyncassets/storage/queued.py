"""Queued storage: save locally now, move to remote storage in the background, durably.

:class:`QueuedStorage` is django-queued-storage's idea with nothing but MongoDB
for a queue. An upload writes its bytes to the *local* storage (a GridFS bucket
or a directory) and inserts the file's catalogue entry with its transfer state
in the same single-document insert, so an acknowledged upload always has its
transfer recorded (no replica set, no cache, no message broker). Workers
(:mod:`asyncassets.transfers`, or ``asyncassets transfer``) claim due
transfers with a lease, copy the bytes to the *remote* storage (a directory or
S3 bucket), check them, and switch the entry to the remote copy with one
conditional update. Reads serve whichever copy is current.

The catalogue entry of a queued file, ``<collection_name>.files``::

    {"_id": ..., "length": ..., "chunkSize": ..., "uploadDate": ..., "filename": ...,
     "metadata": {..., "sha256": ...},
     "local": "gridfs",                       # or "filesystem", while a local copy exists
     "location": {"storage": "filesystem", "key": ...},   # a directory's local copy
     "remote": {"storage": "s3", "key": ...}, # once the remote copy is stored and checked
     "transfer": {"state": "pending", "attempts": 0, "next_try": ..., "key": ...}}

A GridFS local copy is the chunks under the entry's ``_id`` in
``<collection_name>.chunks``; a directory's is the object ``location`` names, as
in any directory catalogue. ``transfer.state`` is one of:

``pending``
    waiting for a worker from ``next_try`` on (at once, or after a backoff);
``held``
    ``delayed=True``: waiting for ``await doc.<field>.transfer()`` (or
    :meth:`QueuedStore.release`);
``running``
    claimed by ``worker`` under ``token`` until ``lease_until`` (the worker
    extends it while it copies; ``next_try`` is the same time: when another
    worker may take over);
``done``
    the remote copy is stored, verified (length, SHA-256, the stored object's
    size) and served; ``done_at`` says when;
``failed``
    ``max_attempts`` attempts failed; ``error`` says why; retried only by hand.

The guarantees, in the order of the calls:

* the remote key is reserved (:mod:`.objects.reservations`) before the copy is
  written, as an upload's is, and its object's version is recorded with it
  (``remote.version``) and checked by every read;
* the switch to the remote copy is one update conditional on the claim's token
  and the ``running`` state: a worker whose lease was taken over, or whose file
  was deleted or replaced meanwhile, switches nothing and deletes the remote
  object it wrote (by its version), then releases its key;
* the local copy is deleted only after the switch (``delete_local=True``, in the
  same update the entry stops naming it); a reader that finds it gone reads the
  entry again and continues from the remote copy at the byte it reached;
* deleting a file removes its entry first, then both copies, whatever its
  transfer state;
* what a crash leaves (a remote object written before the switch, a local copy
  after it) is named by no entry, and the orphan sweep removes it.
"""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import hashlib
import logging
import os
import secrets
import socket
import time
import uuid
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, cast

from bson import ObjectId
from pymongo.errors import PyMongoError

from .. import _driver
from .._tasks import add_note, settle, spawn
from ..errors import (
    CorruptFile,
    FileDeletedWhileReading,
    FileNotFound,
    StorageError,
    StoredObjectMissing,
    TransferFailed,
)
from .base import (
    FileSystemStorage,
    GridFSStorage,
    Storage,
    Upload,
    _fitted,
    _ObjectStorage,
    _place_part,
)
from .catalogue import read_range
from .entries import CatalogueReads, is_file_id
from .gridfs import GridBucket
from .gridfs.spec import DEFAULT_CHUNK_SIZE, as_int, now_as_stored
from .objects.store import ObjectStore, location_key, location_version
from .retry import Retry

__all__ = [
    "STATES",
    "Claim",
    "QueuedDownload",
    "QueuedStorage",
    "QueuedStore",
    "TransferOutcome",
    "copy_of",
]

#: Every ``transfer.state`` there is.
STATES = ("pending", "held", "running", "done", "failed")
#: The index workers claim with.
QUEUE_INDEX = {"transfer.state": 1, "transfer.next_try": 1}
#: Unique: two entries never name the same remote object.
REMOTE_INDEX = {"remote.key": 1}
#: Pieces at least this large are hashed on a thread, beside the remote write.
_THREADED_HASH = 256 * 1024
#: What tells one upload from another under the same ``_id``.
_IDENTITY = ("length", "uploadDate")
#: The longest error message kept in ``transfer.error``.
_MAX_ERROR = 2000

_indexed: weakref.WeakKeyDictionary[Any, set[tuple[str, str]]] = weakref.WeakKeyDictionary()
logger = logging.getLogger("asyncassets.transfers")
#: Events of the workers running in this process, set when an upload queues work.
_listeners: weakref.WeakSet[asyncio.Event] = weakref.WeakSet()


def listen() -> asyncio.Event:
    """An event set whenever an upload in this process queues a transfer (for workers)."""
    event = asyncio.Event()
    _listeners.add(event)
    return event


def _notify() -> None:
    for event in list(_listeners):
        event.set()


def copy_of(doc: Mapping[str, Any]) -> str | None:
    """Which copy of a queued file reads serve: ``"remote"`` once it is stored,
    else ``"local"``; ``None`` when the entry names neither."""
    if isinstance(doc.get("remote"), Mapping) and location_key({"location": doc["remote"]}):
        return "remote"
    if doc.get("local") in ("gridfs", "filesystem"):
        return "local"
    return None


def _positive_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"{name} must be a positive number of seconds, not {value!r}")
    return float(value)


class QueuedStorage(Storage):
    """Bytes saved locally first, then moved to a remote storage in the background.

    .. code-block:: python

        photo = FileField(storage=QueuedStorage(
            local=FileSystemStorage("/var/spool/photos"),    # or GridFSStorage()
            remote=S3Storage(bucket="photos"),
            delete_local=True,          # TransferAndDelete
            delayed=False,              # DelayedStorage when True
        ))

    Every upload is stored in ``local`` and queued; a transfer worker
    (``async with asyncassets.transfers.worker(): ...`` in a service, or the
    ``asyncassets transfer`` command) copies it to ``remote``, checks it, and
    switches reads over. See :doc:`/transfers`.

    :param local: where uploads are stored first: a :class:`GridFSStorage` or a
        :class:`FileSystemStorage`. Only its place (bucket or directory, key
        template, ``fsync``) is used: the catalogue is this storage's.
    :param remote: where files end up: an :class:`S3Storage` or a
        :class:`FileSystemStorage`. Its key template makes the remote keys (with
        the uploading document as context); a transfer never overwrites an
        object, whatever its ``overwrite``.
    :param delete_local: delete the local copy once the remote one is served
        (django-queued-storage's ``TransferAndDelete``); ``False`` keeps it until
        the file is deleted.
    :param delayed: queue nothing at upload: files wait (``held``) until
        ``await doc.<field>.transfer()`` (``DelayedStorage``).
    :param max_attempts: attempts before a transfer is marked ``failed``.
    :param retry_delay: seconds before the first retry; each further retry waits
        twice as long (up to ``max_retry_delay``), with jitter.
    :param max_retry_delay: the longest wait between two attempts.
    :param lease: seconds a worker holds a claimed transfer without renewing
        it; workers renew every third of it, and a worker that died is replaced
        once it ran out.
    :param collection_name: the catalogue is ``<collection_name>.files`` (and a
        GridFS local copy's chunks ``<collection_name>.chunks``); by default
        ``fs_queued_[<local directory's name>_]<remote>``, e.g.
        ``fs_queued_spool_media_photos`` for a spool directory and the S3 bucket
        ``media``, prefix ``photos/`` (see
        :func:`~asyncassets.storage.base.default_collection_name`). Before 0.1.0
        the default was ``fs_queued``: pass ``collection_name="fs_queued"`` to
        keep the files catalogued there.
    """

    kind = "queued"

    def __init__(
        self,
        local: GridFSStorage | FileSystemStorage,
        remote: _ObjectStorage,
        *,
        delete_local: bool = True,
        delayed: bool = False,
        max_attempts: int = 5,
        retry_delay: float = 60.0,
        max_retry_delay: float = 3600.0,
        lease: float = 60.0,
        collection_name: str | None = None,
    ) -> None:
        from .base import _collection_name

        if not isinstance(local, (GridFSStorage, FileSystemStorage)):
            raise TypeError(
                "QueuedStorage(local=...) takes a GridFSStorage or a FileSystemStorage, "
                f"not {local!r}"
            )
        if not isinstance(remote, _ObjectStorage):
            raise TypeError(
                "QueuedStorage(remote=...) takes an S3Storage or a FileSystemStorage, "
                f"not {remote!r}"
            )
        if (
            isinstance(local, FileSystemStorage)
            and isinstance(remote, FileSystemStorage)
            and _overlap(local.root, remote.root)
        ):
            raise ValueError(
                f"local {local.root!r} and remote {remote.root!r} overlap: give them "
                "separate directories, or the sweep could not tell their objects apart"
            )
        for name, value in (("delete_local", delete_local), ("delayed", delayed)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be True or False, not {value!r}")
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
            raise ValueError(f"max_attempts must be an int of at least 1, not {max_attempts!r}")
        self.local = local
        self.remote = remote
        self.collection_name = _collection_name(
            self._default_name() if collection_name is None else collection_name
        )
        self.delete_local = delete_local
        self.delayed = delayed
        self.max_attempts = max_attempts
        self.retry_delay = _positive_number("retry_delay", retry_delay)
        self.max_retry_delay = _positive_number("max_retry_delay", max_retry_delay)
        self.lease = _positive_number("lease", lease)
        #: The backoff between attempts (``Retry``'s arithmetic).
        self.backoff = Retry(
            attempts=max_attempts, delay=self.retry_delay, max_delay=self.max_retry_delay
        )
        # The local and remote places, catalogued in this storage's catalogue.
        self._local_place = _in_catalogue(local, self.collection_name)
        self._remote_place = _in_catalogue(remote, self.collection_name)

    @property
    def url(self) -> str:
        return f"queued:{self.local.url}->{self.remote.url}"

    def _default_name(self) -> str:
        parts = ("fs_queued", _place_part(self.local), _place_part(self.remote))
        return _fitted("_".join(p for p in parts if p))

    def _identity(self) -> tuple[Any, ...]:
        # Where files are, and the queue's settings: the transfer workers apply
        # one storage's settings to every file of its catalogue, so fields that
        # share one must agree on them (else a StorageConflict at declaration;
        # a delete_local=False field's local copies were deleted otherwise).
        return (
            self.collection_name,
            type(self.local),
            self.local._identity(),
            type(self.remote),
            self.remote._identity(),
            self.delete_local,
            self.delayed,
            self.max_attempts,
            self.retry_delay,
            self.max_retry_delay,
            self.lease,
        )

    def __repr__(self) -> str:
        return (
            f"QueuedStorage(local={self.local!r}, remote={self.remote!r}, "
            f"collection_name={self.collection_name!r})"
        )

    @property
    def local_place(self) -> Storage:
        """The local storage as it is used: catalogued in this storage's catalogue."""
        return self._local_place

    @property
    def remote_place(self) -> _ObjectStorage:
        """The remote storage as it is used: catalogued in this storage's catalogue."""
        return self._remote_place

    def bind(self, db: Any) -> QueuedStore:
        return cast(QueuedStore, super().bind(db))

    def _make_store(self, db: Any) -> QueuedStore:
        return QueuedStore(db, self)


def _overlap(a: str, b: str) -> bool:
    a, b = a.rstrip("/") + "/", b.rstrip("/") + "/"
    return a.startswith(b) or b.startswith(a)


def _in_catalogue(storage: Any, collection_name: str) -> Any:
    """``storage`` with its catalogue set to ``collection_name`` (its backend shared)."""
    if storage.collection_name == collection_name:
        return storage
    moved = copy.copy(storage)
    moved.collection_name = collection_name
    return moved


@dataclass
class Claim:
    """A transfer a worker holds: the entry as claimed, and the claim's token."""

    entry: dict[str, Any]
    token: str
    worker: str
    #: The state it was claimed from (a cancelled explicit transfer goes back to it).
    previous: str
    #: ``time.monotonic()`` by which the lease must be renewed.
    deadline: float
    #: The remote key the copy reserved, and the reservation's token (once made).
    remote_key: str | None = None
    remote_token: str | None = None

    @property
    def file_id(self) -> Any:
        return self.entry["_id"]

    @property
    def attempt(self) -> int:
        return int(self.entry.get("transfer", {}).get("attempts") or 0)


@dataclass
class TransferOutcome:
    """How one claimed transfer ended.

    ``status``: ``"done"`` (switched to the remote copy), ``"retry"`` (failed, will be
    retried), ``"failed"`` (failed for good), ``"gone"`` (the file was deleted or
    replaced, or the lease was lost: nothing to do), ``"released"`` (given back
    unfinished, on shutdown).
    """

    file_id: Any
    status: str
    #: Seconds the attempt took.
    seconds: float = 0.0
    #: Bytes copied.
    length: int = 0
    error: BaseException | None = field(default=None, repr=False)


def default_worker_id() -> str:
    """``host:pid:random``: who holds a claim, as ``transfer.worker`` shows it."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class QueuedStore(CatalogueReads):
    """The catalogue of a :class:`QueuedStorage` on one database, with its queue.

    Answers the store calls of every storage (``open_upload``, ``upload``,
    ``find``, ``find_many``, ``open_download``, ``read``, ``delete``) and the
    queue's: :meth:`claim`, :meth:`run`, :meth:`transfer`, :meth:`release`,
    :meth:`retry_failed`, :meth:`counts`.

    :ivar local: the store of the local copies (a ``GridBucket`` or an ``ObjectStore``).
    :ivar remote: the store of the remote copies (an ``ObjectStore``).
    """

    #: Entries change when a transfer switches them: every read looks its entry up.
    reuses_entries = False

    def __init__(self, db: Any, storage: QueuedStorage) -> None:
        self.db = db
        self.storage = storage
        self.name = storage.collection_name
        local = storage.local_place
        if isinstance(local, GridFSStorage):
            self.local: GridBucket | ObjectStore = GridBucket(
                db, self.name, chunk_size=local.chunk_size or DEFAULT_CHUNK_SIZE
            )
        else:
            assert isinstance(local, _ObjectStorage)
            self.local = ObjectStore(db, local)
        self.remote = ObjectStore(db, storage.remote_place, key_field="remote")
        self.files = _driver.acknowledged(db[f"{self.name}.files"])
        self.chunk_size = self.local.chunk_size

    def __repr__(self) -> str:
        return f"QueuedStore({self.db.name!r}, {self.name!r}, {self.url!r})"

    @property
    def url(self) -> str:
        """``queued:<local url>-><remote url>``."""
        return self.storage.url

    @property
    def local_kind(self) -> str:
        """``"gridfs"`` or ``"filesystem"``."""
        return "gridfs" if isinstance(self.local, GridBucket) else "filesystem"

    async def ensure_indexes(self) -> None:
        """The local store's indexes, the queue's, and a unique sparse ``remote.key``."""
        await self.local.ensure_indexes()
        await self.remote.reservations.ensure_indexes()
        done = _indexed.setdefault(self.db.client, set())
        key = (self.db.name, self.name)
        if key in done:
            return
        existing = [dict(i.get("key", {})) for i in await _driver.list_indexes(self.files)]
        if dict(QUEUE_INDEX) not in existing:
            await self.files.create_index(list(QUEUE_INDEX.items()))
        if dict(REMOTE_INDEX) not in existing:
            await self.files.create_index(list(REMOTE_INDEX.items()), unique=True, sparse=True)
        done.add(key)

    # -- writing ------------------------------------------------------------------

    def _extra(self, file_id: Any, filename: str | None, context: Mapping[str, Any] | None
               ) -> dict[str, Any]:
        # The remote key is made now, while the uploading document is known (a key
        # template may use it); the worker only varies it if it is taken.
        key = self.storage.remote_place.keys.make(
            file_id=file_id, filename=filename, context=context
        )
        transfer: dict[str, Any] = {"state": "held" if self.storage.delayed else "pending",
                                    "attempts": 0, "key": key}
        if not self.storage.delayed:
            transfer["next_try"] = now_as_stored(self.files)
        return {"local": self.local_kind, "transfer": transfer}

    def open_upload(
        self,
        *,
        file_id: Any = None,
        filename: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        chunk_size: int | None = None,
        context: Mapping[str, Any] | None = None,
    ) -> Upload:
        """Start a streaming upload to the local storage; its entry, inserted when it
        is closed, carries the queued transfer. As ``GridBucket.open_upload``."""
        file_id = ObjectId() if file_id is None else file_id
        return self.local.open_upload(
            file_id=file_id,
            filename=filename,
            metadata=metadata,
            chunk_size=chunk_size,
            context=context,
            extra=self._extra(file_id, filename, context),
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
    ) -> dict[str, Any]:
        """Store ``source`` locally with its transfer queued; return the entry.

        As ``GridBucket.upload``: if anything fails, nothing is left.
        """
        file_id = ObjectId() if file_id is None else file_id
        doc = await self.local.upload(
            source,
            file_id=file_id,
            filename=filename,
            metadata=metadata,
            chunk_size=chunk_size,
            context=context,
            extra=self._extra(file_id, filename, context),
        )
        if not self.storage.delayed:
            _notify()
        return doc

    # -- reading ------------------------------------------------------------------

    def open_download(
        self, files_doc: Mapping[str, Any], *, start: int = 0, end: int | None = None
    ) -> QueuedDownload:
        """An async iterator over the bytes ``[start, end)`` of the current copy.

        The local copy until the remote one is stored, then the remote; a switch
        while it reads is followed from the byte reached.

        :raises CorruptFile: the entry names no copy; while iterating, a copy is
            missing or not the entry's length.
        :raises FileDeletedWhileReading: while iterating, the file was deleted or
            replaced meanwhile.
        :raises StorageError: a backend failed (after its retries).
        """
        return QueuedDownload(self, files_doc, start=start, end=end)

    def _open_copy(self, doc: Mapping[str, Any], which: str, start: int, end: int) -> Any:
        if which == "remote":
            return self.remote.open_download({**doc, "location": doc["remote"]},
                                             start=start, end=end)
        return self.local.open_download(doc, start=start, end=end)

    @staticmethod
    def location_of(doc: Mapping[str, Any]) -> str | None:
        """Where a file's served bytes are: ``"local"`` or ``"remote"``."""
        return copy_of(doc)

    # -- deleting -----------------------------------------------------------------

    async def delete(self, file_id: Any) -> bool:
        """Delete a file: its entry first, then its local and remote copies.

        A transfer running meanwhile finds the entry gone at its switch and deletes
        the remote object it wrote. Shielded from cancellation.

        :returns: ``True`` if an entry existed.
        """
        return await asyncio.shield(spawn(self._delete(file_id)))

    async def _delete(self, file_id: Any) -> bool:
        if not is_file_id(file_id):
            return False  # names no file: never a query operator
        doc = await self.files.find_one_and_delete({"_id": file_id})
        if isinstance(self.local, GridBucket):
            # Even without an entry: cleans up after a half-deleted file, as GridFS does.
            await self.local.delete_chunks(file_id)
        if doc is None:
            return False
        await self._delete_copies(doc, local=not isinstance(self.local, GridBucket))
        return True

    async def _delete_copies(self, doc: Mapping[str, Any], *, local: bool) -> None:
        if local:
            if isinstance(self.local, GridBucket):
                await self.local.delete_chunks(doc["_id"])
            elif (key := location_key(doc)) is not None:
                await self.local.delete_object(
                    key, version=location_version(doc), file_id=doc["_id"]
                )
        remote = doc.get("remote")
        if isinstance(remote, Mapping) and isinstance(remote.get("key"), str):
            await self.remote.delete_object(
                str(remote["key"]), version=remote.get("version"), file_id=doc["_id"]
            )

    # -- the queue ------------------------------------------------------------------

    def _now(self) -> dt.datetime:
        return now_as_stored(self.files)

    async def claim(
        self, worker: str | None = None, *, file_id: Any = None, force: bool = False
    ) -> Claim | None:
        """Claim the most overdue transfer (or ``file_id``'s) for ``worker``.

        One ``find_one_and_update``: a ``pending`` transfer whose ``next_try`` has
        come, or a ``running`` one whose lease ran out (its worker died or hung),
        becomes ``running`` under a new token and a lease of ``storage.lease``
        seconds, and counts an attempt. With ``force`` (an explicit transfer of
        ``file_id``) a ``held``, ``failed`` or not yet due ``pending`` one is
        claimed too.

        :returns: the claim, or ``None`` when nothing is due (or ``file_id`` is
            running under another worker's live lease, done, or gone).
        """
        worker = worker or default_worker_id()
        now = self._now()
        lease_end = now + dt.timedelta(seconds=self.storage.lease)
        expired = {"transfer.state": "running", "transfer.next_try": {"$lte": now}}
        if force:
            query: dict[str, Any] = {"$or": [
                {"transfer.state": {"$in": ["pending", "held", "failed"]}}, expired]}
        else:
            query = {"transfer.state": {"$in": ["pending", "running"]},
                     "transfer.next_try": {"$lte": now}}
        if file_id is not None:
            query = {"_id": file_id, **query}
        token = uuid.uuid4().hex
        started = time.monotonic()
        before = await self.files.find_one_and_update(
            query,
            {
                "$set": {
                    "transfer.state": "running",
                    "transfer.token": token,
                    "transfer.worker": worker,
                    "transfer.lease_until": lease_end,
                    "transfer.next_try": lease_end,
                    "transfer.started_at": now,
                },
                "$inc": {"transfer.attempts": 1},
            },
            sort=[("transfer.next_try", 1)],
            return_document=False,
        )
        if before is None:
            return None
        previous = str(before.get("transfer", {}).get("state"))
        entry = dict(before)
        entry["transfer"] = {
            **before.get("transfer", {}),
            "state": "running",
            "token": token,
            "worker": worker,
            "lease_until": lease_end,
            "next_try": lease_end,
            "attempts": int(before.get("transfer", {}).get("attempts") or 0) + 1,
        }
        return Claim(entry, token, worker, previous, started + self.storage.lease)

    async def run(self, claim: Claim, *, raise_errors: bool = False) -> TransferOutcome:
        """Carry out a claimed transfer: copy, check, switch, delete the local copy.

        The lease is renewed every third of ``storage.lease`` while the bytes are
        copied; if it cannot be renewed (another worker took the transfer over,
        the file was deleted) the copy stops and what it wrote is removed. A
        failure is recorded in the entry (retry after a backoff, or ``failed``
        after ``max_attempts``); a cancellation gives the claim back unfinished.

        :param raise_errors: raise :class:`~asyncassets.errors.TransferFailed`
            instead of returning an outcome other than ``"done"``.
        """
        started = time.monotonic()
        file_id = claim.file_id
        if claim.previous == "running" and claim.attempt > self.storage.max_attempts:
            # The previous attempt's worker died holding the lease, and it was the last.
            error = TransferFailed(
                f"transfer of file {file_id!r} to {self.storage.remote.url}: the lease of "
                f"attempt {claim.attempt - 1} ran out (its worker died or hung), and it was "
                f"the last of max_attempts={self.storage.max_attempts}",
                file_id=file_id, state="failed", storage=self.storage.remote.url,
            )
            status = await settle(self._record_failure(claim, error, final=True))
            return self._outcome(claim, status, started, 0, error, raise_errors)
        copying = asyncio.ensure_future(self._copy(claim))
        try:
            lost = await self._hold_lease(claim, copying)
        except BaseException:
            copying.cancel()
            await asyncio.wait({copying})
            await settle(self._release(claim))
            raise
        if lost:
            return self._outcome(claim, "gone", started, 0, None, raise_errors)
        try:
            key, version, length = copying.result()
        except Exception as exc:
            status = await settle(self._record_failure(claim, exc))
            return self._outcome(claim, status, started, 0, exc, raise_errors)
        try:
            status = await settle(self._switch(claim, key, version))
        except Exception as exc:  # the switch was refused: an attempt that failed
            status = await settle(self._record_failure(claim, exc))
            return self._outcome(claim, status, started, 0, exc, raise_errors)
        return self._outcome(claim, status, started, length, None, raise_errors)

    def _outcome(
        self,
        claim: Claim,
        status: str,
        started: float,
        length: int,
        error: BaseException | None,
        raise_errors: bool,
    ) -> TransferOutcome:
        outcome = TransferOutcome(claim.file_id, status, time.monotonic() - started, length,
                                  error)
        if raise_errors and status != "done":
            if status == "gone":
                raise FileNotFound(claim.file_id, self.name)
            raise TransferFailed(
                f"transfer of file {claim.file_id!r} to {self.storage.remote.url} failed "
                f"(attempt {claim.attempt} of {self.storage.max_attempts}): {error}; "
                + ("it will be retried by the transfer workers" if status == "retry"
                   else "it is marked failed: fix the cause, then retry it by hand"),
                file_id=claim.file_id,
                state="pending" if status == "retry" else status,
                storage=self.storage.remote.url,
            ) from error
        return outcome

    async def _hold_lease(self, claim: Claim, copying: asyncio.Future[Any]) -> bool:
        """Renew the lease until ``copying`` ends; ``True`` if the lease was lost
        (``copying`` is then cancelled and over)."""
        interval = self.storage.lease / 3
        while True:
            done, _ = await asyncio.wait({copying}, timeout=interval)
            if done:
                return False
            try:
                renewed: bool | None = await self._renew(claim)
            except Exception:
                renewed = None  # unknown: keep copying while the lease surely holds
            if renewed is False or (renewed is None and time.monotonic() >= claim.deadline):
                copying.cancel()
                await asyncio.wait({copying})
                return True

    async def _renew(self, claim: Claim) -> bool:
        sent = time.monotonic()
        lease_end = self._now() + dt.timedelta(seconds=self.storage.lease)
        result = await self.files.update_one(
            {"_id": claim.file_id, "transfer.token": claim.token, "transfer.state": "running"},
            {"$set": {"transfer.lease_until": lease_end, "transfer.next_try": lease_end}},
        )
        if not result.matched_count:
            return False
        claim.deadline = sent + self.storage.lease
        if claim.remote_key is not None and claim.remote_token is not None:
            # The copy's key stays this worker's while it holds the lease: a sweep
            # must not take a live copy's reservation for a dead writer's.
            await self.remote.reservations.confirm(claim.remote_key, claim.remote_token)
        return True

    async def _copy(self, claim: Claim) -> tuple[str, Any, int]:
        """Copy the local copy to a new remote object; return its key, version and length.

        The remote key is reserved first (a taken one gets the next variant). The
        object is committed only if its length and SHA-256 match the entry, then
        checked by its stored size and version. On any failure or cancellation
        what it wrote is removed and the key released; if that cleanup fails too,
        the original error is the one raised (with a note), and the reservation
        stays for the orphan sweep.
        """
        entry = claim.entry
        remote = self.remote
        blobs = remote.blobs
        base = entry.get("transfer", {}).get("key")
        if not isinstance(base, str):
            base = remote.keys.make(file_id=entry["_id"], filename=entry.get("filename"))
        token = secrets.token_hex(16)
        reserved: list[str] = []
        writer: Any = None
        committed = False
        try:
            key = await remote.reserve_key(
                base, file_id=entry["_id"], token=token, overwrite=False, reserved=reserved
            )
            claim.remote_key, claim.remote_token = key, token
            writer = blobs.open_writer(key, token=token)
            sha256 = hashlib.sha256()
            length = 0
            async with self.local.open_download(entry) as download:
                async for piece in download:
                    length += len(piece)
                    if len(piece) >= _THREADED_HASH:
                        await asyncio.gather(asyncio.to_thread(sha256.update, piece),
                                             writer.write(piece))
                    else:
                        sha256.update(piece)
                        await writer.write(piece)
            expected = (entry.get("metadata") or {}).get("sha256")
            if length != as_int(entry.get("length")) or (
                expected is not None and sha256.hexdigest() != expected
            ):
                raise CorruptFile(
                    f"the local copy of file {entry['_id']!r} in catalogue {self.name!r} "
                    f"does not match its entry ({length} bytes, sha256 "
                    f"{sha256.hexdigest()}; the entry says {entry.get('length')} bytes, "
                    f"sha256 {expected}): it was not transferred"
                )
            await writer.commit(overwrite=False)
            committed = True
            info = await blobs.stat(key)
            if info is None or info.size != length or (
                writer.version is not None and info.version != writer.version
            ):
                raise StorageError(
                    f"{blobs.url}: the object {key!r} just written is "
                    f"{'missing' if info is None else f'{info.size} bytes'}"
                    f"{'' if info is None else f' of version {info.version!r}'}, not "
                    f"{length} bytes of version {writer.version!r}",
                    storage=blobs.url, key=key, transient=True,
                )
            return key, writer.version, length
        except BaseException as exc:
            await asyncio.shield(spawn(self._discard(writer, committed, reserved, token, exc)))
            raise

    async def _discard(
        self, writer: Any, committed: bool, reserved: list[str], token: str,
        cause: BaseException,
    ) -> None:
        """Remove what a failed copy wrote, then release its key. A failure here is a
        note on ``cause`` (the error worth reporting), never in its place."""
        try:
            if writer is not None:
                if committed:
                    await self.remote.blobs.delete(writer.key, version=writer.version)
                else:
                    await writer.abort()
                    if not writer.settled:
                        return  # its commit may still land: the sweep decides
            for key in reserved:
                await self.remote.reservations.release(key, token=token)
        except Exception as cleanup:
            add_note(
                cause,
                f"removing what the copy wrote failed too ({cleanup}); its key stays "
                "reserved and the orphan sweep removes what is left",
            )

    async def _switch(self, claim: Claim, key: str, version: Any) -> str:
        """Point the entry at the remote copy (one conditional update), then delete
        the local copy (``delete_local``). ``"done"``, or ``"gone"`` when the claim
        was lost meanwhile (the remote object is then deleted and its key released)."""
        unset = {f"transfer.{k}": "" for k in ("token", "worker", "lease_until", "next_try",
                                              "error")}
        if self.storage.delete_local:
            unset.update({"local": "", "location": ""})
        remote: dict[str, Any] = {"storage": self.storage.remote.kind, "key": key}
        if version is not None:
            remote["version"] = version
        confirmed = True
        try:
            result = await self.files.update_one(
                {"_id": claim.file_id, "transfer.token": claim.token,
                 "transfer.state": "running"},
                {"$set": {"remote": remote, "transfer.state": "done",
                          "transfer.done_at": self._now()},
                 "$unset": unset},
            )
            switched = bool(result.matched_count)
        except Exception:
            # Unknown outcome: find out; if that fails too, the sweep decides later.
            current = await self.find(claim.file_id)
            switched = current is not None and (current.get("remote") or {}).get("key") == key
            confirmed = False
            if not switched and current is not None and (
                (current.get("transfer") or {}).get("token") == claim.token
            ):
                # Refused (a primary stepping down, say) and the claim is still ours:
                # drop the copy and let run() record a failed attempt, retried later.
                await self.remote.blobs.delete(key, version=version)
                await self.remote.reservations.release(key, token=claim.remote_token)
                raise
        if not switched:
            await self.remote.blobs.delete(key, version=version)
            await self.remote.reservations.release(key, token=claim.remote_token)
            return "gone"
        if not confirmed:
            # Applied, but not confirmed by a majority (a write-concern error): a
            # failover may still roll it back to the local copy, so that copy stays.
            # Named by no entry once the switch is durable, the orphan sweep takes it.
            return "done"
        if self.storage.delete_local:
            try:
                await self._delete_copies({**claim.entry, "remote": None}, local=True)
            except (StorageError, PyMongoError, OSError) as exc:
                # The switch is done: the transfer succeeded. The local copy is named
                # by no entry now (its key stays reserved); the orphan sweep removes it.
                logger.warning(
                    "transfer of file %r: deleting the local copy failed (%s); the orphan "
                    "sweep removes it", claim.file_id, exc,
                )
        return "done"

    async def _record_failure(
        self, claim: Claim, exc: BaseException, *, final: bool = False
    ) -> str:
        """Record a failed attempt: ``"retry"`` (pending after a backoff),
        ``"failed"``, or ``"gone"`` (the claim was lost: nothing recorded)."""
        now = self._now()
        final = final or claim.attempt >= self.storage.max_attempts
        message = f"{type(exc).__name__}: {exc}"[:_MAX_ERROR]
        update: dict[str, Any] = {
            "$set": {"transfer.error": message, "transfer.failed_at": now},
            "$unset": {"transfer.token": "", "transfer.worker": "", "transfer.lease_until": ""},
        }
        if final:
            update["$set"]["transfer.state"] = "failed"
            update["$unset"]["transfer.next_try"] = ""
        else:
            wait = self.storage.backoff.wait_before(max(claim.attempt, 1))
            update["$set"]["transfer.state"] = "pending"
            update["$set"]["transfer.next_try"] = now + dt.timedelta(seconds=wait)
        result = await self.files.update_one(
            {"_id": claim.file_id, "transfer.token": claim.token}, update
        )
        if not result.matched_count:
            return "gone"
        return "failed" if final else "retry"

    async def _release(self, claim: Claim) -> None:
        """Give a claim back unfinished (shutdown, cancellation): the attempt does
        not count, and it is due again at once (a ``held`` or ``failed`` one goes
        back to what it was)."""
        state = claim.previous if claim.previous in ("held", "failed") else "pending"
        update: dict[str, Any] = {
            "$set": {"transfer.state": state},
            "$unset": {"transfer.token": "", "transfer.worker": "", "transfer.lease_until": ""},
            "$inc": {"transfer.attempts": -1},
        }
        if state == "pending":
            update["$set"]["transfer.next_try"] = self._now()
        else:
            update["$unset"]["transfer.next_try"] = ""
        await self.files.update_one({"_id": claim.file_id, "transfer.token": claim.token},
                                    update)

    async def transfer(
        self, file_id: Any, *, worker: str | None = None, poll: float = 0.2
    ) -> dict[str, Any]:
        """Transfer one file now, in this task; return its entry once it is remote.

        Whatever its state: ``held`` (delayed), ``pending`` (even before its
        ``next_try``), ``failed`` (one more attempt). A file a worker is
        transferring right now is waited for (and taken over if that worker's
        lease runs out). A file already remote returns at once.

        :raises FileNotFound: no such file (or it was deleted meanwhile).
        :raises TransferFailed: the attempt failed; the failure is recorded as a
            worker's would be (retried later, or ``failed``).
        """
        while True:
            entry = await self.find(file_id)
            if entry is None:
                raise FileNotFound(file_id, self.name)
            if copy_of(entry) == "remote":
                return entry
            claim = await self.claim(worker, file_id=file_id, force=True)
            if claim is None:
                await asyncio.sleep(poll)  # a live worker holds it
                continue
            await self.run(claim, raise_errors=True)
            found = await self.find(file_id)
            if found is None:
                raise FileNotFound(file_id, self.name)
            return found

    async def release(self, file_id: Any) -> bool:
        """Queue a ``held`` (delayed) file for the transfer workers.

        :returns: whether it was held.
        """
        result = await self.files.update_one(
            {"_id": file_id, "transfer.state": "held"},
            {"$set": {"transfer.state": "pending", "transfer.next_try": self._now()}},
        )
        if result.modified_count:
            _notify()
        return bool(result.modified_count)

    async def retry_failed(self, file_ids: Iterable[Any] | None = None) -> int:
        """Queue ``failed`` transfers again with a fresh count of attempts.

        :param file_ids: only these files; ``None``: every failed one.
        :returns: how many were queued.
        """
        query: dict[str, Any] = {"transfer.state": "failed"}
        if file_ids is not None:
            query["_id"] = {"$in": list(file_ids)}
        result = await self.files.update_many(
            query,
            {"$set": {"transfer.state": "pending", "transfer.attempts": 0,
                      "transfer.next_try": self._now()}},
        )
        if result.modified_count:
            _notify()
        return int(result.modified_count)

    async def counts(self) -> dict[str, int]:
        """How many files are in each transfer state (every state, zeros included)."""
        found = dict.fromkeys(STATES, 0)
        cursor = _driver.aggregate(
            self.files, [{"$group": {"_id": "$transfer.state", "n": {"$sum": 1}}}]
        )
        async for doc in cursor:
            if doc["_id"] in found:
                found[doc["_id"]] = int(doc["n"])
        return found

    async def next_due(self) -> dt.datetime | None:
        """When the next ``pending`` or ``running`` transfer falls due, or ``None``."""
        doc = await self.files.find_one(
            {"transfer.state": {"$in": ["pending", "running"]}},
            {"transfer.next_try": 1},
            sort=[("transfer.next_try", 1)],
        )
        if doc is None:
            return None
        when = doc.get("transfer", {}).get("next_try")
        return when if isinstance(when, dt.datetime) else None


class QueuedDownload:
    """An async iterator over the bytes ``[start, end)`` of a queued file's current copy.

    It reads the copy the entry names (the remote one once stored, else the local
    one). When that copy disappears mid-read (the transfer switched and deleted
    the local copy) it reads the entry again: switched, it continues from the
    remote copy at the byte it reached; deleted or replaced, it raises
    :class:`~asyncassets.errors.FileDeletedWhileReading`; unchanged, the copy is
    corrupt (:class:`~asyncassets.errors.CorruptFile`).
    """

    def __init__(
        self,
        store: QueuedStore,
        files_doc: Mapping[str, Any],
        *,
        start: int = 0,
        end: int | None = None,
    ) -> None:
        self._store = store
        self.file_id = files_doc.get("_id") if isinstance(files_doc, Mapping) else None
        self.files_doc = files_doc
        length, start, end = read_range(files_doc, start, end, self._corrupt)
        if copy_of(files_doc) is None:
            raise self._corrupt("its catalogue entry names neither a local nor a remote copy")
        self.length = length
        self.start = start
        self.end = end
        self._pos = start
        self._inner: Any = None
        self._which: str | None = None
        self._done = False
        self._opened_once = False

    def __repr__(self) -> str:
        return f"<QueuedDownload {self.file_id!r} [{self.start}, {self.end}) {self._which}>"

    @property
    def copy(self) -> str | None:
        """Which copy is being read: ``"local"`` or ``"remote"`` (``None`` before)."""
        return self._which

    def __aiter__(self) -> QueuedDownload:
        return self

    async def __anext__(self) -> bytes:
        while True:
            if self._done:
                raise StopAsyncIteration
            if self._inner is None:
                if self._opened_once and self._pos >= self.end:
                    self._done = True
                    raise StopAsyncIteration
                self._which = copy_of(self.files_doc)
                assert self._which is not None
                self._inner = self._store._open_copy(
                    self.files_doc, self._which, self._pos, self.end
                )
                self._opened_once = True
            try:
                piece: bytes = await anext(self._inner)
            except StopAsyncIteration:
                self._done = True
                await self._close_inner()
                raise
            except (CorruptFile, FileDeletedWhileReading, StoredObjectMissing) as exc:
                await self._close_inner()
                await self._follow(exc)
                continue
            self._pos += len(piece)
            return piece

    async def _follow(self, exc: BaseException) -> None:
        """The copy being read failed: continue from the remote copy if the entry
        switched to it, else raise what happened."""
        current = await self._store.find(self.file_id)
        if current is None or any(
            current.get(k) != self.files_doc.get(k) for k in _IDENTITY if k in self.files_doc
        ):
            self._done = True
            raise FileDeletedWhileReading(self.file_id, self._store.name) from exc
        if self._which == "local" and copy_of(current) == "remote":
            self.files_doc = current
            return
        self._done = True
        if isinstance(exc, FileDeletedWhileReading):
            # The inner store compared the entry with its own view of it; the entry is
            # in fact unchanged, so the copy it names is what is wrong.
            raise self._corrupt(f"its {self._which} copy is missing or damaged") from exc
        raise exc

    def _corrupt(self, problem: str) -> CorruptFile:
        return CorruptFile(
            f"file {self.file_id!r} in catalogue {self._store.name!r} is corrupt: {problem}"
        )

    async def _close_inner(self) -> None:
        inner, self._inner = self._inner, None
        if inner is not None:
            await inner.aclose()

    async def aclose(self) -> None:
        """Stop reading; idempotent."""
        self._done = True
        await self._close_inner()

    async def __aenter__(self) -> QueuedDownload:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

