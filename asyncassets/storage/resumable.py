"""Resumable upload sessions: bytes that arrive over many requests, kept durably.

A session is a record in ``<catalogue>.uploads``; the bytes received so far are
staged in ``<catalogue>.uploads.staged`` as numbered chunks of ``chunk_size``
bytes, and the bytes short of a whole chunk (the tail) sit in the session record
itself. (Not ``.chunks``: a collection named so is taken for a GridFS bucket's
by the sweep and the check.) The session's ``offset`` is always ``n * chunk_size + len(tail)`` where
``n`` is the number of chunks it counts, and it is written only after those
chunks are: the offset a session reports is durable. A process killed halfway
through a write leaves chunks numbered ``n`` and above, which the next write
removes before it starts; resuming from the reported offset loses and
duplicates nothing.

One write at a time: a write takes a lease on the session (a conditional update,
so it holds across processes), renews it as it commits, and gives it back at the
end. A second write while the lease holds raises
:class:`~asyncassets.errors.UploadLocked`; a write that does not start at the
durable offset raises :class:`~asyncassets.errors.UploadOffsetMismatch`.

In front of a GridFS bucket the chunks go straight where the finished file's
chunks belong (``<catalogue>.chunks``, under the ``_id`` the file will have), so
finishing writes only the last chunk and the files document
(:meth:`UploadSessions.complete_in_bucket`); no byte is copied. The orphan sweep
leaves the chunks of a live session alone (:meth:`UploadSessions.live_file_ids`).
Its SHA-256 comes from the hash the writing process kept when every write of
the upload went through it, else from reading the chunks back once.

In front of a directory (a store given as ``store``), the session reserves its
file's key at creation and writes the bytes into a temp file beside it, fsynced
before each offset is recorded; finishing links it under the key
(:meth:`UploadSessions.complete_in_store`, :mod:`.objects.inplace`). No byte is
copied there either. In front of S3, a session owns a multipart upload fed part
by part (:mod:`.objects.resumable_s3`), only the bytes short of a part staged.

This module knows nothing of documents: finishing (streaming the staged bytes into
a field's storage, through the field's rules and the reference switch) is the
caller's, with :meth:`UploadSessions.read` and :meth:`UploadSessions.mark_done`.
The file a finish stores names its upload in its metadata (:data:`UPLOAD_MARK`),
and the session is marked done by whichever comes first: the finish, after its
switch, or the reference writer (:mod:`asyncassets.references`), before it moves
a reference away from such a file. So a session not done whose field does not
hold its file was never attached (see :doc:`/uploads`).
Staging in MongoDB works the same in front of every storage, for the fields whose
bytes are transformed (images, compression) and directories that overwrite: the
finished file is written by that storage's own writer, with its key
reservations, versions and cleanup, once the bytes are complete.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any

from bson import Binary, ObjectId
from pymongo import ReturnDocument
from pymongo.errors import BulkWriteError, DuplicateKeyError

from .. import _driver
from .._tasks import spawn
from ..errors import (
    CorruptFile,
    UploadChecksumMismatch,
    UploadExpired,
    UploadLocked,
    UploadNotFound,
    UploadOffsetMismatch,
)
from .gridfs.spec import now_as_stored
from .gridfs.upload import chunk_windows
from .objects import inplace
from .objects.direct import SESSIONS as DIRECT_SESSIONS
from .objects.store import ObjectStore
from .received import Received
from .sources import hash_views

if TYPE_CHECKING:
    from .gridfs.bucket import GridBucket

__all__ = [
    "DEFAULT_LEASE",
    "DEFAULT_STAGING_CHUNK",
    "UPLOAD_MARK",
    "UploadSessions",
]

#: The metadata key on a stored file that names the upload session it came from.
UPLOAD_MARK = "tus_upload"

#: Bytes per staged chunk.
DEFAULT_STAGING_CHUNK = 1024 * 1024
#: How long a write's lease holds without being renewed (it is renewed at every
#: commit, every :data:`_COMMIT_BYTES`, and every third of it).
DEFAULT_LEASE = dt.timedelta(seconds=30)
#: Bytes of chunks inserted at once.
_BATCH_BYTES = 4 * 1024 * 1024
#: The first bytes of an upload kept in its session by the write that starts it
#: (what the field's rules sniff at the finish, without reading them back).
HEAD_KEPT = 4096
#: Bytes of chunks a long write commits at once (its offset becomes durable).
_COMMIT_BYTES = 16 * 1024 * 1024

_UTC = dt.timezone.utc
_logger = logging.getLogger("asyncassets.storage")
#: How long past the start of its finish a session is kept from the sweep at least.
_FINISHING = dt.timedelta(hours=1)
#: Running hashes kept per :class:`UploadSessions` (uploads in flight in a process).
_HASHES_KEPT = 10_000

#: Session states: receiving bytes; complete and being attached; attached.
OPEN, FINISHING, DONE = "open", "finishing", "done"
#: What the field held when a finish was about to switch it (``{"id": ...}``).
SWITCH_FROM = "switch_from"
#: A session being removed by :meth:`UploadSessions.terminate` (no write may start).
TERMINATING = "terminating"


def _now() -> dt.datetime:
    # Milliseconds, as BSON stores them, so a value read back compares equal.
    now = dt.datetime.now(_UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def _aware(value: Any) -> Any:
    if isinstance(value, dt.datetime) and value.tzinfo is None:
        return value.replace(tzinfo=_UTC)
    return value


class UploadSessions:
    """The resumable uploads of one catalogue: ``<catalogue>.uploads`` (sessions)
    and ``<catalogue>.uploads.staged`` (staged bytes).

    :param db: a PyMongo ``AsyncDatabase`` (or Motor database).
    :param catalogue: the storage's ``collection_name``.
    :param chunk_size: bytes per staged chunk.
    :param lease: how long a write's lease holds unless renewed; a write whose
        process died blocks others for at most this long.
    :param store: the catalogue's store when it is a directory's (an
        :class:`~asyncassets.storage.objects.store.ObjectStore`): the sessions
        created ``into`` it write their bytes in place there
        (:mod:`~asyncassets.storage.objects.inplace`).
    """

    def __init__(
        self,
        db: Any,
        catalogue: str,
        *,
        chunk_size: int = DEFAULT_STAGING_CHUNK,
        lease: dt.timedelta = DEFAULT_LEASE,
        store: ObjectStore | None = None,
    ) -> None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
            raise ValueError(f"chunk_size must be a positive int, not {chunk_size!r}")
        if not isinstance(lease, dt.timedelta) or lease <= dt.timedelta(0):
            raise ValueError(f"lease must be a positive timedelta, not {lease!r}")
        self.catalogue = catalogue
        self.sessions = _driver.acknowledged(db[f"{catalogue}.uploads"])
        self.chunks = _driver.acknowledged(db[f"{catalogue}.uploads.staged"])
        #: A GridFS bucket's own chunks, where a session created ``into`` it writes.
        self.bucket_chunks = _driver.acknowledged(db[f"{catalogue}.chunks"])
        self.bucket_files = _driver.acknowledged(db[f"{catalogue}.files"])
        #: The direct-upload sessions (:mod:`.objects.direct`) an ``s3`` session owns one of.
        self.direct_sessions = _driver.acknowledged(db[DIRECT_SESSIONS])
        # The running SHA-256 of uploads whose every write went through this
        # object, by id: (offset hashed up to, hasher). Bounded; a miss means
        # reading the bytes back once at the end.
        self._hashes: dict[str, tuple[int, Any]] = {}
        self.chunk_size = chunk_size
        self.lease = lease
        self.store = store if inplace.writes_in_place(store) else None
        self._indexed = False

    async def ensure_indexes(self) -> None:
        """The unique ``{upload, n}`` index of the chunks and ``expires`` of the
        sessions (what the sweep looks for)."""
        if self._indexed:
            return
        await self.chunks.create_index([("upload", 1), ("n", 1)], unique=True)
        await self.sessions.create_index([("expires", 1)])
        self._indexed = True

    # -- sessions -----------------------------------------------------------------

    async def create(
        self,
        *,
        length: int,
        expires: dt.datetime,
        info: Mapping[str, Any] | None = None,
        into: GridBucket | ObjectStore | None = None,
        filename: str | None = None,
        context: Mapping[str, Any] | None = None,
        place: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Create a session for ``length`` bytes, valid until ``expires``; return it.

        ``info`` is kept as it is (the caller's: what the upload is for).
        The id is 32 random hex digits: unguessable. ``into``: the GridFS bucket
        of this catalogue, to write the chunks where the finished file has them
        (finish with :meth:`complete_in_bucket`); or this catalogue's directory
        store (the ``store`` given at construction), to reserve the file's key
        (made from ``filename`` and ``context``, as a writer's) and write the bytes
        in a temp file beside it (finish with :meth:`complete_in_store`); else
        they are staged.
        ``place``: fields of a writer in place of its own, kept in the session
        (``{"into": "s3", ...}``: :mod:`.objects.resumable_s3`, which writes such
        a session; its staged chunks are its own).
        """
        if isinstance(length, bool) or not isinstance(length, int) or length < 0:
            raise ValueError(f"length must be an int >= 0, not {length!r}")
        await self.ensure_indexes()
        in_store = into is not None and into is self.store
        if into is not None and not in_store:
            if isinstance(into, ObjectStore):
                raise ValueError(f"{into!r} is not this catalogue's directory store")
            await into.ensure_indexes()
        session: dict[str, Any] = {
            "_id": secrets.token_hex(16),
            "length": length,
            "offset": 0,
            "n": 0,
            "tail": Binary(b""),
            "chunk_size": self.chunk_size if into is None else into.chunk_size,
            "created": _now(),
            "expires": _aware(expires),
            "state": OPEN,
            "info": dict(info or {}),
        }
        if in_store:
            assert self.store is not None
            # The session first, its key after: the sweep leaves the reservations
            # of live sessions' tokens alone, so it never takes this one's key as
            # a dead writer's, whenever it lists them.
            session.update(inplace.new_in_place())
            await self.sessions.insert_one(session)
            try:
                reserved = await inplace.start_in_place(
                    self.store, filename=filename, context=context or {},
                    file_id=session["file_id"], token=session["token"],
                )
                session["key"] = reserved["key"]
                await self.sessions.update_one(
                    {"_id": session["_id"]}, {"$set": {"key": session["key"]}}
                )
            except BaseException:
                await asyncio.shield(spawn(self._drop_created(session)))
                raise
            self._hashes[session["_id"]] = (0, hashlib.sha256())
            return session
        if into is not None:
            session["into"] = "gridfs"
            session["file_id"] = ObjectId()
        elif place is not None:
            session.update(place)
        await self.sessions.insert_one(session)
        self._hashes[session["_id"]] = (0, hashlib.sha256())
        return session

    async def _drop_created(self, session: Mapping[str, Any]) -> None:
        """Undo a creation that failed: its key's reservation, then its session."""
        assert self.store is not None
        await inplace.remove_in_place(self.store, session)
        await self.sessions.delete_one({"_id": session["_id"]})

    async def get(self, upload_id: str) -> dict[str, Any]:
        """The session ``upload_id``.

        :raises UploadNotFound: there is none (or ``upload_id`` is no session id).
        :raises UploadExpired: it is past its expiry.
        """
        session = await self._find(upload_id)
        if _aware(session["expires"]) <= _now() and session.get("state") != DONE:
            raise UploadExpired(
                f"upload {upload_id} expired at {session['expires']:%Y-%m-%d %H:%M:%S} UTC; "
                "start a new upload",
                upload_id=upload_id,
            )
        return session

    async def _find(self, upload_id: str) -> dict[str, Any]:
        found = None
        if isinstance(upload_id, str) and len(upload_id) == 32:
            found = await self.sessions.find_one({"_id": upload_id})
        if found is None:
            raise UploadNotFound(
                f"no upload {upload_id!r}: it was never created, was terminated, or "
                "expired and was swept; start a new upload",
                upload_id=str(upload_id),
            )
        return dict(found)

    async def terminate(self, upload_id: str) -> None:
        """Delete a session that is not complete, and its staged bytes.

        The session is taken first, in one conditional update (no write holds it,
        none can start after: it leaves the ``open`` state, and its expiry is now,
        so an interrupted removal is the sweep's); its bytes go after. A write
        racing it either holds the session first (:class:`UploadLocked` here) or
        cannot start.

        :raises UploadNotFound: there is none.
        :raises UploadLocked: a write holds it, it is being attached, or it is
            attached already.
        """
        now = _now()
        taken = await self.sessions.find_one_and_update(
            {
                "_id": upload_id,
                "state": {"$in": [OPEN, TERMINATING]},
                "$or": [{"lease": {"$exists": False}}, {"lease.until": {"$lt": now}}],
            },
            {"$set": {"state": TERMINATING, "expires": now}, "$unset": {"lease": ""}},
            projection={"tail": 0},
            return_document=ReturnDocument.AFTER,
        )
        if taken is None:
            session = await self._find(upload_id)
            if session.get("state") == DONE:
                # Attached by a finish that ran since the caller looked: that upload
                # is its document's file now, not a termination's to answer for.
                raise UploadLocked(
                    f"upload {upload_id} is complete and attached; delete the file "
                    "through its document instead",
                    upload_id=upload_id,
                )
            raise UploadLocked(
                f"upload {upload_id} is being written or attached; retry when that ends",
                upload_id=upload_id,
            )
        await self.remove(upload_id, taken)

    async def remove(self, upload_id: str, session: Mapping[str, Any] | None = None) -> None:
        """Delete a session and its bytes, whatever its state (the sweep's).

        Chunks first: an interrupted removal leaves a session the sweep removes.
        The chunks of a finished GridFS upload are its file's: they stay.
        """
        if session is None:
            found = await self.sessions.find_one({"_id": upload_id}, {"tail": 0})
            session = found if found is not None else {"_id": upload_id}
        self._hashes.pop(upload_id, None)
        await self.chunks.delete_many({"upload": upload_id})
        if session.get("into") == "directory" and session.get("state") != DONE:
            await inplace.remove_in_place(self._store_of(session), session)
        if session.get("into") == "s3" and session.get("state") != DONE:
            # Its multipart upload and key are its direct-upload session's: that
            # expires now, so the orphan sweep aborts and releases them (a DELETE
            # through tus_app does at once). Whatever its state short of done: a
            # finish that died or failed leaves it completing, pushed an hour on,
            # and no finish runs now (this session is taken).
            await self.direct_sessions.update_one(
                {"_id": session.get("direct"), "state": {"$ne": "done"}},
                {"$set": {"expires": _now()}},
            )
        if session.get("into") == "gridfs" and session.get("state") != DONE:
            # Never a file's whose files document exists (a finish that went that far).
            if await self.bucket_files.find_one({"_id": session["file_id"]}, {"_id": 1}) is None:
                await self.bucket_chunks.delete_many({"files_id": session["file_id"]})
        await self.sessions.delete_one({"_id": upload_id})

    async def remove_expired(self, session: Mapping[str, Any], cutoff: dt.datetime) -> bool:
        """Remove a session the sweep listed as past its expiry, if it still is and
        no write holds it; return whether it did.

        The session is taken first, in one conditional update on its expiry and
        lease (a session not done leaves the ``open`` state, so no write or finish
        starts after); a finish that began meanwhile has pushed its expiry past
        ``cutoff``, and keeps it. Its bytes go after.
        """
        now = _now()
        taken = await self.sessions.find_one_and_update(
            {
                "_id": session["_id"],
                "expires": {"$lt": cutoff},
                "$or": [{"lease": {"$exists": False}}, {"lease.until": {"$lt": now}}],
            },
            [{"$set": {"state": {"$cond": [{"$eq": ["$state", DONE]}, DONE, TERMINATING]}}}],
            projection={"tail": 0},
            return_document=ReturnDocument.AFTER,
        )
        if taken is None:
            return False
        await self.remove(taken["_id"], taken)
        return True

    def _store_of(self, session: Mapping[str, Any]) -> ObjectStore:
        if self.store is None:
            raise TypeError(
                f"upload {session['_id']} is written in place in a directory; give "
                f"UploadSessions its store (store=...) to write, finish or remove it"
            )
        return self.store

    # -- writing -----------------------------------------------------------------

    async def write(
        self,
        upload_id: str,
        offset: int,
        pieces: AsyncIterator[Any],
        *,
        checksum: tuple[str, bytes] | None = None,
    ) -> dict[str, Any]:
        """Append the bytes of ``pieces`` at ``offset``; return the session after.

        Without ``checksum``, what was received is kept even when ``pieces`` fails
        midway (a dropped connection), and committed as it goes (every 16 MiB),
        so a long write that dies keeps most of its bytes. With ``checksum``
        (a :mod:`hashlib` algorithm name and the digest of this write's bytes),
        nothing of this write is kept unless they match.

        :raises UploadNotFound, UploadExpired: no such live session.
        :raises UploadOffsetMismatch: ``offset`` is not the durable offset.
        :raises UploadLocked: another write holds the session.
        :raises UploadTooLarge: more bytes than the session's length.
        :raises UploadChecksumMismatch: the bytes do not match ``checksum``.
        """
        token = secrets.token_hex(8)
        session = await self._acquire(upload_id, offset, token)
        released = False
        try:
            if session.get("into") == "directory":
                after = await self._write_in_place(session, token, pieces, checksum)
                released = "lease" not in after
                return after
            inserts = _Inserts(self)
            try:
                after = await self._write(session, token, pieces, checksum, inserts)
                released = "lease" not in after
                return after
            finally:
                # No insert of this write may land after its lease is given back.
                await inserts.settle()
        finally:
            if not released:
                # Failed or cut short: it may have left chunks past the offset.
                await self.sessions.update_one(
                    {"_id": upload_id, "lease.token": token},
                    {"$unset": {"lease": ""}, "$set": {"dirty": True}},
                )

    async def _acquire(self, upload_id: str, offset: int, token: str) -> dict[str, Any]:
        now = _now()
        taken = await self.sessions.find_one_and_update(
            {
                "_id": upload_id,
                "state": OPEN,
                "offset": offset,
                "expires": {"$gt": now},
                "$or": [{"lease": {"$exists": False}}, {"lease.until": {"$lt": now}}],
            },
            {"$set": {"lease": {"token": token, "until": now + self.lease}}},
            # Before: whether the last write ended cleanly (no lease, not dirty).
            return_document=ReturnDocument.BEFORE,
        )
        if taken is not None:
            session = dict(taken)
            session["leftovers"] = bool(session.pop("lease", None) or session.get("dirty"))
            return session
        session = await self.get(upload_id)
        if session.get("state") != OPEN or session["offset"] != offset:
            raise UploadOffsetMismatch(
                f"upload {upload_id} is at offset {session['offset']}, not {offset}; "
                "resume from its offset",
                upload_id=upload_id,
                offset=session["offset"],
            )
        raise UploadLocked(
            f"upload {upload_id} is being written by another request; retry when it "
            "ends (or when its lease expires)",
            upload_id=upload_id,
        )

    async def _write(
        self,
        session: dict[str, Any],
        token: str,
        pieces: AsyncIterator[Any],
        checksum: tuple[str, bytes] | None,
        inserts: _Inserts,
    ) -> dict[str, Any]:
        upload_id = session["_id"]
        size = int(session["chunk_size"])
        start_n = n = int(session["n"])
        length = int(session["length"])
        chunks, owner, value = self._where(session)
        # A write that died (its lease ran out) or failed may have inserted chunks
        # past the offset it committed; after a clean one there is nothing to do.
        if session.get("leftovers", True):
            await self._drop_from(session, start_n)
        known = self._hashes.pop(upload_id, None)
        running = known[1] if known is not None and known[0] == session["offset"] else None
        inserts.hasher = running
        buffer = bytearray(session["tail"])

        async def drop() -> None:
            await inserts.settle()
            await self._drop_from(session, start_n)

        # Past the length: what was committed stays; what was not is removed by
        # the next write.
        received = Received(pieces, upload_id=upload_id, position=int(session["offset"]),
                            length=length, checksum=checksum, dropped=drop)
        first = bytearray() if received.position == 0 else None
        batch: list[dict[str, Any]] = []
        committed_n = start_n
        renewed = time.monotonic()
        renew_every = self.lease.total_seconds() / 3
        async for view in received:
            if first is not None and len(first) < HEAD_KEPT:
                first += view[: HEAD_KEPT - len(first)]
            if running is not None:
                # Hashed in a thread beside the insert of the batch it ends up in.
                inserts.hash_later(view)
            # Cut into chunks as it comes, a batch inserted as soon as it fills:
            # a write holds a batch and a chunk, whatever the size of a piece.
            pos, end = 0, len(view)
            while pos < end:
                if buffer or end - pos < size:
                    take = min(size - len(buffer), end - pos)
                    buffer += view[pos : pos + take]
                    pos += take
                    if len(buffer) < size:
                        continue
                    data = bytes(buffer)
                    buffer = bytearray()
                else:
                    data = bytes(view[pos : pos + size])
                    pos += size
                batch.append({owner: value, "n": n, "data": data})
                n += 1
                if len(batch) * size >= _BATCH_BYTES:
                    # One batch in flight while the next is cut, as GridFS uploads do.
                    await inserts.send(chunks, upload_id, batch)
                    batch = []
                    if not received.checked and (n - committed_n) * size >= _COMMIT_BYTES:
                        # The bytes in memory (less than a chunk) are committed later.
                        await inserts.wait()
                        await self._commit(upload_id, token, n, n * size, b"")
                        committed_n, renewed = n, time.monotonic()
            # The lease is renewed by time too: a slow client keeps it.
            if time.monotonic() - renewed > renew_every:
                if batch:
                    await inserts.send(chunks, upload_id, batch)
                    batch = []
                await inserts.wait()
                if not received.checked:
                    await self._commit(upload_id, token, n, n * size, b"")
                    committed_n = n
                else:
                    await self._renew(upload_id, token)
                renewed = time.monotonic()
        try:
            received.verify()
        except UploadChecksumMismatch:
            await drop()
            raise
        failure, position = received.failure, received.position
        if batch:
            await inserts.send(chunks, upload_id, batch)
        await inserts.wait()
        await inserts.hash_rest()
        after = await self._commit(
            upload_id, token, n, n * size + len(buffer), bytes(buffer), release=failure is None,
            head=first,
        )
        if running is not None and position == after["offset"]:
            self._remember(upload_id, position, running)
        if failure is not None:
            raise failure
        return after

    async def _write_in_place(
        self,
        session: dict[str, Any],
        token: str,
        pieces: AsyncIterator[Any],
        checksum: tuple[str, bytes] | None,
    ) -> dict[str, Any]:
        """:meth:`write` into the temp file of a directory upload: the bytes land at
        their offset, and are synced before the offset is recorded. Bytes past the
        recorded offset (a write that failed, was refused or died) are written
        over by the next write."""
        upload_id = session["_id"]
        length = int(session["length"])
        known = self._hashes.pop(upload_id, None)
        running = known[1] if known is not None and known[0] == session["offset"] else None
        # The running hash is fed by the writer, in a thread beside each write.
        writer = inplace.writer_of(self._store_of(session), session, hasher=running)
        committed = int(session["offset"])
        received = Received(pieces, upload_id=upload_id, position=committed, length=length,
                            checksum=checksum)
        first = bytearray() if committed == 0 else None
        renewed = time.monotonic()
        renew_every = self.lease.total_seconds() / 3
        try:
            async for view in received:
                if first is not None and len(first) < HEAD_KEPT:
                    first += view[: HEAD_KEPT - len(first)]
                # The bytes go into a file other requests open too: never on a
                # lease that may have run out meanwhile (a client that stalled).
                stale = time.monotonic() - renewed > renew_every
                renewed = await self._fresh(upload_id, token, renewed, renew_every)
                if stale and not received.checked:
                    # The offset is recorded by time too (a slow client's bytes).
                    committed = await writer.sync()
                    await self._commit(upload_id, token, 0, committed, b"")
                await writer.write(view)
                if not received.checked and received.position - committed >= _COMMIT_BYTES:
                    started = time.monotonic()
                    committed = await writer.sync()
                    await self._commit(upload_id, token, 0, committed, b"")
                    renewed = started
            received.verify()
            # What is buffered is written now: the lease must still hold.
            await self._fresh(upload_id, token, renewed, renew_every)
            committed = await writer.sync()
        finally:
            await writer.abort()
        failure, position = received.failure, received.position
        after = await self._commit(
            upload_id, token, 0, committed, b"", release=failure is None, head=first
        )
        if running is not None and position == after["offset"]:
            self._remember(upload_id, position, running)
        if failure is not None:
            raise failure
        return after

    async def _fresh(
        self, upload_id: str, token: str, renewed: float, renew_every: float
    ) -> float:
        """Renew the lease of a write into a directory upload's temp file if it was
        last renewed more than ``renew_every`` ago (a third of the lease); the time
        it was renewed (``time.monotonic()``, taken before asking).

        Another request takes an upload over only once its lease ran out, and then
        writes, and finishes, in the same file (its inode becomes the object): a
        write that stalled past its lease must not put a byte there afterwards.
        Checked before each piece is written, a byte goes in at most a third of a
        lease after the lease was known to hold.

        :raises UploadLocked: the lease ran out and another request took it.
        """
        if time.monotonic() - renewed <= renew_every:
            return renewed
        started = time.monotonic()
        await self._renew(upload_id, token)
        return started

    def _remember(self, upload_id: str, offset: int, hasher: Any) -> None:
        if len(self._hashes) >= _HASHES_KEPT:
            self._hashes.pop(next(iter(self._hashes)))
        self._hashes[upload_id] = (offset, hasher)

    def _where(self, session: Mapping[str, Any]) -> tuple[Any, str, Any]:
        """The collection of a session's chunks, the field naming their owner, its value."""
        if session.get("into") == "gridfs" and session.get("state") != DONE:
            return self.bucket_chunks, "files_id", session["file_id"]
        return self.chunks, "upload", session["_id"]

    async def _drop_from(self, session: Mapping[str, Any], n: int) -> None:
        chunks, owner, value = self._where(session)
        await chunks.delete_many({owner: value, "n": {"$gte": n}})

    async def _insert(self, chunks: Any, upload_id: str, batch: list[dict[str, Any]]) -> None:
        try:
            await chunks.insert_many(batch, ordered=True)
        except BulkWriteError as exc:
            # Another writer's chunk at one of these numbers: this write lost its
            # lease to it; what it inserted is removed by the next write.
            raise UploadLocked(
                f"upload {upload_id} was taken over by another request while "
                "this one wrote (its lease expired); resume from the upload's offset",
                upload_id=upload_id,
            ) from exc

    async def _renew(self, upload_id: str, token: str) -> None:
        renewed = await self.sessions.update_one(
            {"_id": upload_id, "lease.token": token},
            {"$set": {"lease.until": _now() + self.lease}},
        )
        if not renewed.matched_count:
            raise UploadLocked(
                f"upload {upload_id} was taken over by another request while this one "
                "wrote (its lease expired); resume from the upload's offset",
                upload_id=upload_id,
            )

    async def _commit(
        self, upload_id: str, token: str, n: int, offset: int, tail: bytes,
        *, release: bool = False, head: bytes | bytearray | None = None,
    ) -> dict[str, Any]:
        """Record the offset (and renew the lease, or give it back with ``release``),
        if this write still holds the lease; with ``head``, the upload's first bytes
        (from a write that started at 0)."""
        now = _now()
        update: dict[str, Any] = {
            "$set": {"n": n, "offset": offset, "tail": Binary(tail), "written": now}
        }
        if head:
            update["$set"]["head"] = Binary(bytes(head))
        if release:
            update["$unset"] = {"lease": "", "dirty": ""}
        else:
            update["$set"]["lease.until"] = now + self.lease
        after = await self.sessions.find_one_and_update(
            {"_id": upload_id, "lease.token": token},
            update,
            return_document=ReturnDocument.AFTER,
        )
        if after is None:
            raise UploadLocked(
                f"upload {upload_id} was taken over by another request while this one "
                "wrote (its lease expired); resume from the upload's offset",
                upload_id=upload_id,
            )
        return dict(after)

    # -- finishing ----------------------------------------------------------------

    async def begin_finish(self, upload_id: str) -> dict[str, Any]:
        """Mark a complete session as being attached (no write may start); return it.

        The finish holds the session's lease (``session["lease"]["token"]``), as a
        write does: one finish at a time, across processes, so two attaches of one
        upload never run at once. Keep it with :meth:`renew` while attaching, give
        it back with :meth:`end_finish` (:meth:`mark_done` does too). A session
        whose attach failed, or whose finisher died (its lease ran out), is taken
        again, so the caller can attach it again.

        :raises UploadOffsetMismatch: it is not complete.
        :raises UploadLocked: a write or another finish holds it.
        :raises UploadExpired: the sweep or a terminate took it.
        :raises UploadNotFound: no such session.
        """
        lease = {"token": secrets.token_hex(8), "until": _now() + self.lease}
        taken = await self.sessions.find_one_and_update(
            {
                "_id": upload_id,
                "state": {"$in": [OPEN, FINISHING]},
                "$expr": {"$eq": ["$offset", "$length"]},
                "$or": [{"lease": {"$exists": False}}, {"lease.until": {"$lt": _now()}}],
            },
            # Kept from the sweep while it is attached, however late in its life.
            [{"$set": {
                "state": FINISHING,
                "expires": {"$max": ["$expires", _now() + _FINISHING]},
                "lease": {"$literal": lease},
            }}],
            return_document=ReturnDocument.AFTER,
        )
        if taken is not None:
            return dict(taken)
        session = await self._find(upload_id)
        if session.get("state") == DONE:
            return session
        if session.get("state") == TERMINATING:
            raise UploadExpired(
                f"upload {upload_id} expired or was terminated as it completed; start a "
                "new upload",
                upload_id=upload_id,
            )
        if _lease_holds(session):
            raise UploadLocked(
                f"upload {upload_id} is being written or attached by another request; "
                "retry when that ends",
                upload_id=upload_id,
            )
        raise UploadOffsetMismatch(
            f"upload {upload_id} has {session['offset']} of its {session['length']} bytes; "
            "send the rest first",
            upload_id=upload_id,
            offset=int(session["offset"]),
        )

    async def renew(self, upload_id: str, token: str) -> None:
        """Keep the lease ``token`` (a finish's) for another lease time.

        :raises UploadLocked: the lease ran out and another request took it.
        """
        await self._renew(upload_id, token)

    async def record_switch_from(self, upload_id: str, token: str, current: Any) -> Any:
        """Record, once, what the field held when a finish of this upload was about
        to switch it (``current``: the file id, or ``None``); return what is
        recorded. The finish's switch is conditional on that value, so a retried
        finish that finds the field holding something else knows the field changed
        since: after the switch (the upload was attached, then moved away by a
        write that records nothing: ``update()``, ``modify()``, an id assigned and
        saved), or before it (the switch was refused). Either way the later change
        stands.

        :raises UploadLocked: the finish no longer holds the session's lease.
        """
        recorded = await self.sessions.find_one_and_update(
            {"_id": upload_id, "lease.token": token},
            [{"$set": {SWITCH_FROM: {"$ifNull": [f"${SWITCH_FROM}",
                                                  {"id": {"$literal": current}}]}}}],
            projection={SWITCH_FROM: 1},
            return_document=ReturnDocument.AFTER,
        )
        if recorded is None:
            raise UploadLocked(
                f"upload {upload_id} was taken over by another request while this one "
                "attached it (its lease expired); send the last PATCH again",
                upload_id=upload_id,
            )
        return recorded[SWITCH_FROM]["id"]

    async def forget_switch_from(self, upload_id: str, token: str) -> None:
        """A switch known refused (a staged upload keeps its bytes): the next finish
        records what the field holds then, and switches from that."""
        await self.sessions.update_one(
            {"_id": upload_id, "lease.token": token}, {"$unset": {SWITCH_FROM: ""}}
        )

    async def end_finish(self, upload_id: str, token: str) -> None:
        """Give back a finish's lease (an attach that failed: a retry may start)."""
        await self.sessions.update_one(
            {"_id": upload_id, "lease.token": token}, {"$unset": {"lease": ""}}
        )

    async def read(self, session: Mapping[str, Any]) -> AsyncIterator[bytes]:
        """The staged bytes of a complete session, chunk by chunk (bounded memory).

        :raises UploadNotFound: a staged chunk is missing (the session was swept or
            terminated meanwhile).
        """
        upload_id = session["_id"]
        expected = 0
        cursor = self.chunks.find({"upload": upload_id}, sort=[("n", 1)], batch_size=4)
        async for chunk in cursor:
            if chunk["n"] != expected:
                break
            expected += 1
            yield bytes(chunk["data"])
        if expected != session["n"]:
            raise UploadNotFound(
                f"upload {upload_id} lost staged chunk {expected} (terminated or swept "
                "meanwhile); start a new upload",
                upload_id=str(upload_id),
            )
        if session["tail"]:
            yield bytes(session["tail"])

    async def complete_in_bucket(
        self,
        session: Mapping[str, Any],
        bucket: GridBucket,
        *,
        filename: str | None,
        metadata: Mapping[str, Any],
    ) -> dict[str, Any]:
        """Make a complete session written ``into`` a GridFS bucket a file of it:
        its last chunk (the tail), then its files document; return the latter.

        Again after a finish that died or failed, it completes the same file
        (the same ``_id``, the same bytes). Its SHA-256 is the one this object
        hashed while it received every byte, else the chunks are read back once.

        :raises CorruptFile: the chunks are not the session's (removed meanwhile).
        """
        file_id = session["file_id"]
        found = await bucket.files.find_one({"_id": file_id})
        if found is not None:
            return dict(found)
        size = int(session["chunk_size"])
        n = int(session["n"])
        tail = bytes(session["tail"])
        known = self._hashes.get(session["_id"])
        if known is not None and known[0] == session["offset"]:
            digest = known[1].hexdigest()
            # Counted in windows of n: a server may hold what one count matches
            # in memory (SecantusDB does).
            found = 0
            for window in chunk_windows(file_id, n, size):
                bounds = dict(window.get("n", {}))
                bounds["$lt"] = min(bounds.get("$lt", n), n)
                found += await self.bucket_chunks.count_documents({**window, "n": bounds})
            if found != n:
                raise CorruptFile(
                    f"upload {session['_id']} lost chunks of file {file_id!r} (removed "
                    "while it was open); start a new upload"
                )
        else:
            digest = await self._hash_back(session, n, size, tail)
        if tail:
            await bucket.chunks.replace_one(
                {"files_id": file_id, "n": n},
                {"files_id": file_id, "n": n, "data": Binary(tail)},
                upsert=True,
            )
        doc: dict[str, Any] = {
            "_id": file_id,
            "length": int(session["length"]),
            "chunkSize": size,
            "uploadDate": now_as_stored(bucket.files),
        }
        if filename is not None:
            doc["filename"] = filename
        doc["metadata"] = {**metadata, "sha256": digest}
        try:
            await bucket.files.insert_one(doc)
        except DuplicateKeyError:
            again = await bucket.files.find_one({"_id": file_id})
            if again is None:
                raise
            return dict(again)
        return doc

    async def complete_in_store(
        self, session: Mapping[str, Any], *, filename: str | None, metadata: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Make a complete session written in place in a directory a file of it: the
        temp file put under the reserved key, then the catalogue entry; return the
        entry. Again after a finish that died or failed, it completes the same file.

        :raises StoredObjectMissing: its temp file is gone.
        :raises KeyTaken: another tool put an object under its key.
        """
        known = self._hashes.get(session["_id"])
        digest = None
        if known is not None and known[0] == session["offset"]:
            digest = known[1].hexdigest()
        return await inplace.complete_in_place(
            self._store_of(session), session, filename=filename, metadata=metadata,
            sha256=digest,
        )

    async def live_in_store(self) -> tuple[set[str], set[str], set[str]]:
        """The keys, temp files and tokens of this catalogue's directory uploads not
        done: the orphan sweep leaves them (and the reservations the tokens made)
        to their uploads (and to :meth:`remove`)."""
        if self.store is None:
            return set(), set(), set()
        found = [
            dict(s) async for s in self.sessions.find(
                {"into": "directory", "state": {"$ne": DONE}},
                {"into": 1, "key": 1, "token": 1},
            )
        ]
        return inplace.live_in_place(found, self.store)

    async def _hash_back(self, session: Mapping[str, Any], n: int, size: int, tail: bytes) -> str:
        hasher = hashlib.sha256()
        expected = 0
        cursor = self.bucket_chunks.find(
            {"files_id": session["file_id"], "n": {"$lt": n}}, sort=[("n", 1)], batch_size=8
        )
        async for chunk in cursor:
            if chunk["n"] != expected or len(chunk["data"]) != size:
                break
            hasher.update(chunk["data"])
            expected += 1
        if expected != n:
            raise CorruptFile(
                f"upload {session['_id']} lost chunk {expected} of file {session['file_id']!r} "
                "(removed while it was open); start a new upload"
            )
        hasher.update(tail)
        return hasher.hexdigest()

    async def head(self, session: Mapping[str, Any], size: int) -> bytes:
        """The first ``size`` bytes a session holds (fewer if it holds fewer), staged
        or written ``into`` a bucket."""
        kept = session.get("head")
        if kept is not None and len(kept) >= min(size, int(session["offset"])):
            return bytes(kept[:size])  # kept by the write that started the upload
        if session.get("into") == "directory":
            return await inplace.head_in_place(self._store_of(session), session, size)
        out = bytearray()
        chunks, owner, value = self._where(session)
        cursor = chunks.find(
            {owner: value, "n": {"$lt": int(session["n"])}},
            sort=[("n", 1)], batch_size=2,
        )
        async for chunk in cursor:
            out += chunk["data"]
            if len(out) >= size:
                break
        if len(out) < size:
            out += bytes(session["tail"])
        return bytes(out[:size])

    async def live_file_ids(self, file_ids: list[Any]) -> set[Any]:
        """Which of ``file_ids`` are the future files of sessions not yet done: their
        chunks are an upload in progress, not orphans."""
        if not file_ids:
            return set()
        found = self.sessions.find(
            {"file_id": {"$in": file_ids}, "state": {"$ne": DONE}}, {"file_id": 1}
        )
        return {s["file_id"] async for s in found}

    async def mark_done(self, upload_id: str, file_id: Any) -> None:
        """Record that the session's bytes became file ``file_id``, a document's file;
        drop the staged bytes (a GridFS session's chunks are the file's now). The
        session stays (answering with its full offset) until it expires.

        The first record stands (a session done stays as it is): the finish makes
        it after its switch, the reference writer before it moves a reference away
        from a file that names this upload (:data:`UPLOAD_MARK`), whichever comes
        first. No session ``upload_id``: nothing to do."""
        self._hashes.pop(upload_id, None)
        before = await self.sessions.find_one_and_update(
            {"_id": upload_id, "state": {"$ne": DONE}},
            {"$set": {"state": DONE, "file_id": file_id, "tail": Binary(b"")},
             "$unset": {"lease": ""}},
            {"into": 1},
        )
        if before is not None and before.get("into") != "gridfs":
            await self.chunks.delete_many({"upload": upload_id})

    # -- the sweep -----------------------------------------------------------------

    async def expired(self, cutoff: dt.datetime) -> list[dict[str, Any]]:
        """Sessions past their expiry before ``cutoff`` that no write holds."""
        now = _now()
        found = []
        async for session in self.sessions.find(
            {"expires": {"$lt": cutoff}},
            {"tail": 0},
        ):
            lease = session.get("lease") or {}
            if lease and _aware(lease.get("until")) > now:
                continue
            found.append(dict(session))
        return found

    async def headless_chunks(self) -> list[str]:
        """Upload ids with staged chunks but no session (a terminate or sweep that
        died between its two deletes)."""
        ids = await self.chunks.distinct("upload")
        if not ids:
            return []
        live = {s["_id"] async for s in self.sessions.find({"_id": {"$in": ids}}, {"_id": 1})}
        return [i for i in ids if i not in live]


class _Inserts:
    """The inserts of one write: one batch in flight while the next is cut.

    With a ``hasher`` (the upload's running SHA-256), the bytes received since the
    last batch (:meth:`hash_later`) are hashed in a thread beside that batch's
    insert, in order: hashlib releases the GIL on large buffers, so the hash costs
    the event loop nothing.
    """

    def __init__(self, sessions: UploadSessions) -> None:
        self._sessions = sessions
        self._task: asyncio.Task[Any] | None = None
        self.hasher: Any = None
        self._unhashed: list[memoryview] = []

    def hash_later(self, view: memoryview) -> None:
        self._unhashed.append(view)

    async def send(self, chunks: Any, upload_id: str, batch: list[dict[str, Any]]) -> None:
        await self.wait()
        insert = self._sessions._insert(chunks, upload_id, batch)
        if self.hasher is not None and self._unhashed:
            views, self._unhashed = self._unhashed, []
            self._task = spawn(_gather(insert, asyncio.to_thread(hash_views, self.hasher, views)))
        else:
            self._task = spawn(insert)

    async def hash_rest(self) -> None:
        """Hash what no batch took (the tail), after the last insert."""
        if self.hasher is not None and self._unhashed:
            views, self._unhashed = self._unhashed, []
            await asyncio.to_thread(hash_views, self.hasher, views)

    async def wait(self) -> None:
        """Wait for the insert in flight; raise its error."""
        task = self._task
        if task is not None:
            # Shielded: a cancelled request must not cancel an insert halfway.
            await asyncio.shield(task)
            self._task = None

    async def settle(self) -> None:
        """Wait for the insert in flight to end, on a path already failing: its own
        error, if any, is left to that failure (what it wrote past the committed
        offset is removed by the next write)."""
        task, self._task = self._task, None
        if task is not None:
            await asyncio.wait([task])
            if not task.cancelled() and task.exception() is not None:
                _logger.debug("an insert of a failed write failed too: %r", task.exception())


async def _gather(*work: Any) -> None:
    await asyncio.gather(*work)


def _lease_holds(session: Mapping[str, Any]) -> bool:
    lease = session.get("lease") or {}
    return bool(lease) and _aware(lease.get("until")) > _now()
