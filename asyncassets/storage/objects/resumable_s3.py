"""Resumable uploads written in place into S3: a multipart upload fed part by part.

A resumable session (:mod:`asyncassets.storage.resumable`) in front of an
``S3Storage`` owns a direct-upload session (:mod:`.direct`, always multipart):
that one reserves the object's key, holds the multipart upload, and at the end
completes it with ``If-None-Match``, checks the parts against the declared
length and their SHA-256 digests, and writes the catalogue entry. The bytes go
through this process, which uploads the parts itself:

* the session records ``into: "s3"``, ``direct`` (the direct session's id),
  ``part_size``, ``parts`` (the parts S3 acknowledged and the session counts)
  and ``checksums`` (part number -> base64 SHA-256 of each);
* a write buffers the bytes of the current part (at most one part in memory);
  each complete part is uploaded (``UploadPart`` with its ``ChecksumSHA256``),
  then the offset and the part's checksum are recorded in one conditional
  update (the lease's): the offset a session reports is durable, its bytes are
  in S3 or staged in MongoDB. A part uploaded but not recorded (a killed
  process) is uploaded again: S3 keeps the last upload of a part number;
* the bytes of a part not complete when a write ends are staged as chunks
  (``<catalogue>.uploads.staged``, numbered ``part index * chunks per part + i``,
  so the chunks of two parts never share a number), and read back once when a
  later write completes that part. ``n`` and ``tail`` count the current part's
  staged bytes only: ``offset = parts * part_size + n * chunk_size + len(tail)``;
* the write that completes the bytes uploads the last part too: finishing is
  the direct session's :meth:`~.direct.DirectUploads.complete` (the field's
  file name and metadata are set on it first), then the caller's reference
  switch (:meth:`~asyncassets.files.proxy.FileProxy.adopt`).

The first bytes of the file (the sniffing's) are kept in the session as part 1
is recorded (``head``). The whole file's SHA-256 is recorded when this process
hashed every byte, or the file is one part; else the entry has the parts digest
only (``metadata.sha256_parts``, what :func:`~asyncassets.check` verifies), as a
direct upload's.

Removing a session (a terminate, the sweep) expires its direct session
(:meth:`~asyncassets.storage.resumable.UploadSessions.remove`), so the orphan
sweep aborts the multipart upload and releases the key;
:meth:`S3Parts.abort` does that at once. The direct session is stored before
the resumable one that owns it, with the same expiry: a process killed between
the two leaves a direct session nobody was told of, which the sweep ends at that
expiry, as it would have ended the upload abandoned.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any

from bson import Binary
from pymongo import ReturnDocument

from ..._tasks import spawn
from ...errors import (
    DirectUploadError,
    StorageError,
    UploadExpired,
    UploadLocked,
)
from ..gridfs.spec import now_as_stored
from ..received import Received
from .direct import DirectUploads

if TYPE_CHECKING:
    from ..resumable import UploadSessions
    from .store import ObjectStore

__all__ = ["INTO", "S3Parts"]

#: The ``into`` of a session written into an S3 multipart upload.
INTO = "s3"
#: Bytes of the file's start kept in the session for the content-type check.
HEAD_BYTES = 512
#: How long past the start of its finish the direct session is kept from the sweep
#: at least (as the resumable session is).
_FINISHING = dt.timedelta(hours=1)

_logger = logging.getLogger("asyncassets.storage")


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class S3Parts:
    """The resumable sessions of ``sessions`` written into ``store``'s S3 bucket.

    :param sessions: the catalogue's resumable sessions.
    :param store: the catalogue (an ``S3Storage``'s).
    """

    def __init__(self, sessions: UploadSessions, store: ObjectStore) -> None:
        self.sessions = sessions
        self.store = store
        self.uploads = DirectUploads(store, post_limit=0)
        self.blobs = self.uploads.blobs

    # -- creating ---------------------------------------------------------------

    async def create(
        self,
        *,
        length: int,
        expires: dt.datetime,
        info: Mapping[str, Any],
        filename: str | None,
        metadata: Mapping[str, Any],
        context: Mapping[str, Any],
        target: Mapping[str, Any],
        alias: str,
    ) -> dict[str, Any]:
        """Reserve the key, start the multipart upload, create the session (which
        expires when its direct session does); return the session.

        :raises DirectUploadError: too many parts (413).
        :raises StorageError: S3 failed.
        """
        if length <= 0:
            raise ValueError("an empty upload has no parts: stage it")
        direct = await self.uploads.create(
            size=length,
            filename=filename,
            metadata=metadata,
            context=context,
            target=target,
            expires=max(expires - _utcnow(), dt.timedelta(seconds=1)),
        )
        try:
            return await self.sessions.create(
                length=length,
                expires=direct["expires"],
                info=info,
                place={
                    "into": INTO,
                    "alias": alias,
                    "direct": direct["_id"],
                    "part_size": int(direct["part_size"]),
                    "parts": 0,
                    "checksums": {},
                },
            )
        except BaseException:
            await asyncio.shield(spawn(self._abort_direct(direct["_id"])))
            raise

    # -- writing ----------------------------------------------------------------

    async def write(
        self,
        upload_id: str,
        offset: int,
        pieces: AsyncIterator[Any],
        *,
        checksum: tuple[str, bytes] | None = None,
    ) -> dict[str, Any]:
        """Append the bytes of ``pieces`` at ``offset``; return the session after.

        As :meth:`UploadSessions.write <asyncassets.storage.resumable.UploadSessions.write>`
        (the same lease, errors and durability), the complete parts going to S3.
        With ``checksum`` nothing of this write is recorded unless it matches (parts
        it uploaded are uploaded again by the next write).
        """
        sessions = self.sessions
        token = secrets.token_hex(8)
        session = await sessions._acquire(upload_id, offset, token)
        released = False
        try:
            after = await _Write(self, session, token, checksum).run(pieces)
            released = "lease" not in after
            return after
        finally:
            if not released:
                await sessions.sessions.update_one(
                    {"_id": upload_id, "lease.token": token},
                    {"$unset": {"lease": ""}, "$set": {"dirty": True}},
                )

    async def upload_part(self, session: Mapping[str, Any], number: int, data: bytes) -> str:
        """Upload part ``number`` of the session's multipart upload; return its
        SHA-256 (base64), which S3 checked the bytes against."""
        digest = await asyncio.to_thread(lambda: hashlib.sha256(data).digest())
        checksum = base64.b64encode(digest).decode()
        direct = await self._direct(session)
        key = str(direct["key"])

        async def upload(client: Any) -> Any:
            return await client.upload_part(
                Bucket=self.blobs.bucket,
                Key=self.blobs._full_key(key),
                UploadId=direct["upload_id"],
                PartNumber=number,
                Body=data,
                ChecksumSHA256=checksum,
            )

        try:
            await self.blobs._call(f"upload part {number} of", key, upload)
        except StorageError as exc:
            cause = exc.__cause__
            code = getattr(cause, "response", {}).get("Error", {}).get("Code") if cause else None
            if code == "NoSuchUpload":
                raise UploadExpired(
                    f"upload {session['_id']}: its multipart upload is gone (aborted, or "
                    "expired and swept); start a new upload",
                    upload_id=str(session["_id"]),
                ) from exc
            raise
        return checksum

    async def flush(self, session: dict[str, Any], token: str) -> dict[str, Any]:
        """Send the last part of a complete session if it is staged (S3 failed when
        the write that completed the bytes sent it), under the lease ``token`` (the
        finish's); return the session after."""
        write = _Write(self, session, token, None)
        if not write.staged:
            return session
        await write._send_part(record=True)
        assert write.last is not None
        return write.last

    async def _direct(self, session: Mapping[str, Any]) -> dict[str, Any]:
        cached = session.get("_direct")
        if isinstance(cached, dict):
            return cached
        direct = await self.uploads.get(session["direct"])
        if isinstance(session, dict):
            session["_direct"] = direct
        return direct

    # -- finishing ----------------------------------------------------------------

    def head(self, session: Mapping[str, Any]) -> bytes | None:
        """The file's first bytes, kept as its first part was recorded."""
        head = session.get("head")
        return None if head is None else bytes(head)

    def sha256(self, session: Mapping[str, Any]) -> str | None:
        """The whole file's SHA-256 (hex) when known without reading it back."""
        known = self.sessions._hashes.get(session["_id"])
        if known is not None and known[0] == session["offset"]:
            return str(known[1].hexdigest())
        if int(session["length"]) <= int(session["part_size"]):
            one = (session.get("checksums") or {}).get("1")
            if one is not None:
                return base64.b64decode(one).hex()
        return None

    async def complete(
        self, session: Mapping[str, Any], *, filename: str | None, metadata: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Complete the multipart upload of a session whose parts are all recorded,
        and insert its catalogue entry (``filename``, ``metadata``); return the
        entry. Idempotent (a finish retried gets the same entry).

        :raises DirectUploadError: as :meth:`.direct.DirectUploads.complete` (409,
            503: finish again; 410, 422: the upload is removed).
        """
        meta = dict(metadata)
        digest = self.sha256(session)
        if digest is not None:
            meta["sha256"] = digest
        # The checksums the writes recorded; kept from the sweep while it finishes.
        await self.uploads.sessions.update_one(
            {"_id": session["direct"], "state": "open"},
            [{"$set": {
                "checksums": {"$literal": dict(session.get("checksums") or {})},
                "filename": {"$literal": filename},
                "metadata": {"$literal": meta},
                "expires": {"$max": ["$expires", now_as_stored(self.uploads.sessions)
                                     + _FINISHING]},
            }}],
        )
        # The resumable session's lease (held by the caller's finish) makes this the
        # one finalize: a completing claim a dead finish left is taken over at once.
        _direct, entry = await self.uploads.complete(session["direct"], exclusive=True)
        return entry

    async def done(self, session: Mapping[str, Any]) -> None:
        """Record that the file is referenced (the direct session ends)."""
        await self.uploads.mark({"_id": session["direct"]}, "done")

    async def failed(self, session: Mapping[str, Any], reason: str) -> None:
        """Record that the stored file was not referenced (adopt refused it)."""
        await self.uploads.mark({"_id": session["direct"]}, "failed", reason=reason)

    # -- removing -----------------------------------------------------------------

    async def abort(self, session: Mapping[str, Any]) -> None:
        """Abort the session's multipart upload and release its key, now (after
        the session was removed; else the orphan sweep does, at its expiry)."""
        await self._abort_direct(session["direct"])

    async def _abort_direct(self, direct_id: str) -> None:
        try:
            await self.uploads.abort(direct_id)
        except DirectUploadError as exc:
            # Gone, or being finalized: not an upload to abort.
            _logger.info("direct session %s not aborted: %s", direct_id, exc)


class _Write:
    """One write of an S3 session: the current part's bytes, buffered."""

    def __init__(
        self,
        parts: S3Parts,
        session: dict[str, Any],
        token: str,
        checksum: tuple[str, bytes] | None,
    ) -> None:
        self.owner = parts
        self.sessions = parts.sessions
        self.session = session
        self.upload_id = str(session["_id"])
        self.token = token
        self.checksum = checksum
        self.length = int(session["length"])
        self.part_size = int(session["part_size"])
        self.chunk_size = int(session["chunk_size"])
        self.per_part = -(-self.part_size // self.chunk_size)
        # Where the session stands (what is recorded, or recorded at the end).
        self.parts = int(session["parts"])
        self.n = int(session["n"])
        self.tail = bytes(session["tail"])
        self.base = min(self.parts * self.part_size, self.length)
        self.staged = int(session["offset"]) - self.base
        self.start_parts = self.parts
        # This write's bytes of the current part, neither uploaded nor staged.
        self.fresh = bytearray()
        # Uploaded, not yet recorded (a write with a checksum records at its end).
        self.pending: dict[str, str] = {}
        self.head: bytes | None = None
        #: The session as last recorded.
        self.last: dict[str, Any] | None = None

    def _chunk_no(self, i: int) -> int:
        return self.parts * self.per_part + i

    async def run(self, pieces: AsyncIterator[Any]) -> dict[str, Any]:
        sessions = self.sessions
        upload_id = self.upload_id
        if self.session.get("leftovers", True):
            # A write that died or failed may have left chunks: those of parts it
            # recorded, or past the offset it recorded.
            await sessions.chunks.delete_many({"upload": upload_id, "$or": [
                {"n": {"$lt": self._chunk_no(0)}}, {"n": {"$gte": self._chunk_no(self.n)}},
            ]})
        if self.staged and self.staged == self._whole():
            # A whole part staged: S3 failed when a write sent it. Sent first.
            await self._send_part(record=True)
        known = sessions._hashes.pop(upload_id, None)
        received = Received(pieces, upload_id=upload_id, position=int(self.session["offset"]),
                            length=self.length, checksum=self.checksum)
        running = known[1] if known is not None and known[0] == received.position else None
        renewed = time.monotonic()
        renew_every = sessions.lease.total_seconds() / 3
        async for view in received:
            if running is not None:
                running.update(view)
            pos = 0
            while pos < len(view):
                whole = self._whole()
                take = min(whole - self.staged - len(self.fresh), len(view) - pos)
                self.fresh += view[pos : pos + take]
                pos += take
                if self.staged + len(self.fresh) == whole:
                    await self._send_part(record=not received.checked)
                    renewed = time.monotonic()
            if time.monotonic() - renewed > renew_every:
                # A slow client keeps the lease.
                await sessions._renew(upload_id, self.token)
                renewed = time.monotonic()
        received.verify()
        failure, position = received.failure, received.position
        await self._stage_fresh()
        after = await self._record(position, release=failure is None)
        if self.parts > self.start_parts:
            # The staged chunks of the parts this write completed.
            await sessions.chunks.delete_many(
                {"upload": upload_id, "n": {"$lt": self._chunk_no(0)}}
            )
        if running is not None and position == after["offset"]:
            sessions._remember(upload_id, position, running)
        if failure is not None:
            raise failure
        return after

    async def _staged_bytes(self) -> bytes:
        """The current part's bytes staged before this write (read back once)."""
        if not self.staged:
            return b""
        out = bytearray()
        expected = 0
        cursor = self.sessions.chunks.find(
            {"upload": self.upload_id,
             "n": {"$gte": self._chunk_no(0), "$lt": self._chunk_no(self.n)}},
            sort=[("n", 1)], batch_size=4,
        )
        async for chunk in cursor:
            if chunk["n"] != self._chunk_no(expected):
                break
            expected += 1
            out += chunk["data"]
        out += self.tail
        if expected != self.n or len(out) != self.staged:
            raise UploadLocked(
                f"upload {self.upload_id} lost staged bytes of part {self.parts + 1} (taken "
                "over or removed meanwhile); resume from the upload's offset",
                upload_id=self.upload_id,
            )
        return bytes(out)

    def _whole(self) -> int:
        """The size of the current part."""
        return min(self.part_size, self.length - self.base)

    async def _send_part(self, *, record: bool) -> None:
        number = self.parts + 1
        staged = await self._staged_bytes()
        before = len(staged)
        data = staged + self.fresh if staged else bytes(self.fresh)
        self.fresh = bytearray()  # one copy of the part in memory while it is sent
        del staged
        try:
            checksum = await self.owner.upload_part(self.session, number, data)
        except StorageError:
            if record:
                # S3 failed: the part is staged instead, and counted; the next
                # write (or the finish) sends it.
                self.fresh = bytearray(memoryview(data)[before:])
                del data
                await self._stage_fresh()
                await self._record(self.base + self.staged, release=False)
            raise
        if number == 1:
            self.head = data[:HEAD_BYTES]
        self.pending[str(number)] = checksum
        self.parts = number
        self.base += len(data)
        self.staged, self.n, self.tail = 0, 0, b""
        if record:
            await self._record(self.base, release=False)
        else:
            await self.sessions._renew(self.upload_id, self.token)

    async def _stage_fresh(self) -> None:
        """Stage the bytes of the current part this write received (the part is
        not complete): whole chunks inserted, the rest the session's tail."""
        if not self.fresh:
            return
        buffer = self.tail + bytes(self.fresh)
        self.fresh = bytearray()
        size = self.chunk_size
        batch = []
        pos = 0
        while len(buffer) - pos >= size:
            batch.append({"upload": self.upload_id, "n": self._chunk_no(self.n),
                          "data": buffer[pos : pos + size]})
            self.n += 1
            pos += size
        if batch:
            await self.sessions._insert(self.sessions.chunks, self.upload_id, batch)
        self.tail = buffer[pos:]
        self.staged = self.n * size + len(self.tail)

    async def _record(self, offset: int, *, release: bool) -> dict[str, Any]:
        """Record where the session stands (with the parts uploaded since the last
        record and their checksums), if this write still holds the lease."""
        now = dt.datetime.now(dt.timezone.utc)
        now = now.replace(microsecond=now.microsecond // 1000 * 1000)
        fields: dict[str, Any] = {
            "parts": self.parts, "n": self.n, "tail": Binary(self.tail), "offset": offset,
            "written": now,
        }
        for number, checksum in self.pending.items():
            fields[f"checksums.{number}"] = checksum
        if self.head is not None:
            fields["head"] = Binary(self.head)
        update: dict[str, Any] = {"$set": fields}
        if release:
            update["$unset"] = {"lease": "", "dirty": ""}
        else:
            fields["lease.until"] = now + self.sessions.lease
        after = await self.sessions.sessions.find_one_and_update(
            {"_id": self.upload_id, "lease.token": self.token},
            update,
            return_document=ReturnDocument.AFTER,
        )
        if after is None:
            raise UploadLocked(
                f"upload {self.upload_id} was taken over by another request while this "
                "one wrote (its lease expired); resume from the upload's offset",
                upload_id=self.upload_id,
            )
        self.pending.clear()
        self.head = None
        self.last = dict(after)
        return self.last
