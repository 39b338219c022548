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

This module knows nothing of documents: finishing (streaming the staged bytes into
a field's storage, through the field's rules and the reference switch) is the
caller's, with :meth:`UploadSessions.read` and :meth:`UploadSessions.mark_done`.
Staging in MongoDB works the same in front of every storage (GridFS, a directory,
S3): the finished file is written by that storage's own writer, with its key
reservations, versions and cleanup, once the bytes are complete.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from collections.abc import AsyncIterator, Mapping
from typing import Any

from bson import Binary
from pymongo import ReturnDocument
from pymongo.errors import BulkWriteError

from .. import _driver
from ..errors import (
    UploadChecksumMismatch,
    UploadExpired,
    UploadLocked,
    UploadNotFound,
    UploadOffsetMismatch,
    UploadTooLarge,
)

__all__ = [
    "DEFAULT_LEASE",
    "DEFAULT_STAGING_CHUNK",
    "UploadSessions",
]

#: Bytes per staged chunk.
DEFAULT_STAGING_CHUNK = 1024 * 1024
#: How long a write's lease holds without being renewed (it is renewed at every
#: commit, about every :data:`_BATCH_BYTES`).
DEFAULT_LEASE = dt.timedelta(seconds=30)
#: Bytes of chunks inserted (and committed) at once.
_BATCH_BYTES = 4 * 1024 * 1024

_UTC = dt.timezone.utc

#: Session states: receiving bytes; complete and being attached; attached.
OPEN, FINISHING, DONE = "open", "finishing", "done"


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
    """

    def __init__(
        self,
        db: Any,
        catalogue: str,
        *,
        chunk_size: int = DEFAULT_STAGING_CHUNK,
        lease: dt.timedelta = DEFAULT_LEASE,
    ) -> None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
            raise ValueError(f"chunk_size must be a positive int, not {chunk_size!r}")
        if not isinstance(lease, dt.timedelta) or lease <= dt.timedelta(0):
            raise ValueError(f"lease must be a positive timedelta, not {lease!r}")
        self.catalogue = catalogue
        self.sessions = _driver.acknowledged(db[f"{catalogue}.uploads"])
        self.chunks = _driver.acknowledged(db[f"{catalogue}.uploads.staged"])
        self.chunk_size = chunk_size
        self.lease = lease
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
    ) -> dict[str, Any]:
        """Create a session for ``length`` bytes, valid until ``expires``; return it.

        ``info`` is kept as it is (the caller's: what the upload is for).
        The id is 32 random hex digits: unguessable.
        """
        if isinstance(length, bool) or not isinstance(length, int) or length < 0:
            raise ValueError(f"length must be an int >= 0, not {length!r}")
        await self.ensure_indexes()
        session = {
            "_id": secrets.token_hex(16),
            "length": length,
            "offset": 0,
            "n": 0,
            "tail": Binary(b""),
            "chunk_size": self.chunk_size,
            "created": _now(),
            "expires": _aware(expires),
            "state": OPEN,
            "info": dict(info or {}),
        }
        await self.sessions.insert_one(session)
        return session

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
        """Delete an open session and its staged bytes.

        :raises UploadNotFound: there is none.
        :raises UploadLocked: a write holds it, or it is being attached.
        """
        session = await self._find(upload_id)
        if session.get("state") == FINISHING or _lease_holds(session):
            raise UploadLocked(
                f"upload {upload_id} is being written or attached; retry when that ends",
                upload_id=upload_id,
            )
        # Chunks first: an interrupted terminate leaves a session the sweep removes.
        await self.chunks.delete_many({"upload": upload_id})
        await self.sessions.delete_one({"_id": upload_id})

    async def remove(self, upload_id: str) -> None:
        """Delete a session and its staged bytes, whatever its state (the sweep's)."""
        await self.chunks.delete_many({"upload": upload_id})
        await self.sessions.delete_one({"_id": upload_id})

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
        midway (a dropped connection), and committed as it goes (every few MiB),
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
        try:
            return await self._write(session, token, pieces, checksum)
        finally:
            await self.sessions.update_one(
                {"_id": upload_id, "lease.token": token}, {"$unset": {"lease": ""}}
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
            return_document=ReturnDocument.AFTER,
        )
        if taken is not None:
            return dict(taken)
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
    ) -> dict[str, Any]:
        upload_id = session["_id"]
        size = int(session["chunk_size"])
        start_n = n = int(session["n"])
        length = int(session["length"])
        # A write that died after inserting chunks but before committing them.
        await self.chunks.delete_many({"upload": upload_id, "n": {"$gte": start_n}})
        buffer = bytearray(session["tail"])
        position = int(session["offset"])
        hasher = hashlib.new(checksum[0]) if checksum is not None else None
        batch: list[dict[str, Any]] = []
        failure: BaseException | None = None
        iterator = pieces.__aiter__()
        while True:
            try:
                piece = await iterator.__anext__()
            except StopAsyncIteration:
                break
            except Exception as exc:
                # The source failed (a dropped connection): keep what came, unless
                # it was to be checked whole.
                if hasher is not None:
                    await self._drop_from(upload_id, start_n)
                    raise
                failure = exc
                break
            view = memoryview(piece).cast("B")
            if position + len(view) > length:
                # What was committed stays; what was not is removed by the next write.
                raise UploadTooLarge(
                    f"upload {upload_id} is {length} bytes long; this write goes past "
                    "its end",
                    upload_id=upload_id,
                )
            position += len(view)
            if hasher is not None:
                hasher.update(view)
            buffer += view
            if len(buffer) >= size:
                cut = len(buffer) // size * size
                for start in range(0, cut, size):
                    data = bytes(buffer[start : start + size])
                    batch.append({"upload": upload_id, "n": n, "data": data})
                    n += 1
                del buffer[:cut]
            if len(batch) * size >= _BATCH_BYTES:
                await self._insert(batch)
                batch = []
                if hasher is None:
                    # The bytes in memory (less than a chunk) are committed later.
                    await self._commit(upload_id, token, n, n * size, b"")
        if hasher is not None and checksum is not None and hasher.digest() != checksum[1]:
            await self._drop_from(upload_id, start_n)
            raise UploadChecksumMismatch(
                f"the bytes sent to upload {upload_id} do not match their {checksum[0]}; "
                "nothing of them was kept: send them again",
                upload_id=upload_id,
            )
        if batch:
            await self._insert(batch)
        after = await self._commit(upload_id, token, n, n * size + len(buffer), bytes(buffer))
        if failure is not None:
            raise failure
        return after

    async def _drop_from(self, upload_id: str, n: int) -> None:
        await self.chunks.delete_many({"upload": upload_id, "n": {"$gte": n}})

    async def _insert(self, batch: list[dict[str, Any]]) -> None:
        try:
            await self.chunks.insert_many(batch, ordered=True)
        except BulkWriteError as exc:
            # Another writer's chunk at one of these numbers: this write lost its
            # lease to it; what it inserted is removed by the next write.
            raise UploadLocked(
                f"upload {batch[0]['upload']} was taken over by another request while "
                "this one wrote (its lease expired); resume from the upload's offset",
                upload_id=str(batch[0]["upload"]),
            ) from exc

    async def _commit(
        self, upload_id: str, token: str, n: int, offset: int, tail: bytes
    ) -> dict[str, Any]:
        now = _now()
        after = await self.sessions.find_one_and_update(
            {"_id": upload_id, "lease.token": token},
            {
                "$set": {
                    "n": n,
                    "offset": offset,
                    "tail": Binary(tail),
                    "lease.until": now + self.lease,
                    "written": now,
                }
            },
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

        A session already being attached (an attach that failed or died) is
        returned as it is, so the caller can attach it again.

        :raises UploadOffsetMismatch: it is not complete.
        :raises UploadNotFound: no such session.
        """
        taken = await self.sessions.find_one_and_update(
            {
                "_id": upload_id,
                "state": {"$in": [OPEN, FINISHING]},
                "$expr": {"$eq": ["$offset", "$length"]},
                "$or": [{"lease": {"$exists": False}}, {"lease.until": {"$lt": _now()}}],
            },
            {"$set": {"state": FINISHING}},
            return_document=ReturnDocument.AFTER,
        )
        if taken is not None:
            return dict(taken)
        session = await self._find(upload_id)
        if session.get("state") == DONE:
            return session
        if _lease_holds(session):
            raise UploadLocked(
                f"upload {upload_id} is being written by another request",
                upload_id=upload_id,
            )
        raise UploadOffsetMismatch(
            f"upload {upload_id} has {session['offset']} of its {session['length']} bytes; "
            "send the rest first",
            upload_id=upload_id,
            offset=int(session["offset"]),
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

    async def mark_done(self, upload_id: str, file_id: Any) -> None:
        """Record that the session's bytes became file ``file_id``; drop the staged
        bytes. The session stays (answering with its full offset) until it expires."""
        await self.sessions.update_one(
            {"_id": upload_id},
            {"$set": {"state": DONE, "file_id": file_id, "tail": Binary(b"")}},
        )
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


def _lease_holds(session: Mapping[str, Any]) -> bool:
    lease = session.get("lease") or {}
    return bool(lease) and _aware(lease.get("until")) > _now()
