"""Direct uploads into an S3 bucket: the client sends the bytes, the app signs and records.

The app server never carries the file. For one upload it:

1. **creates** a session (:meth:`DirectUploads.create`): reserves the object's key
   as any upload does (:mod:`.reservations`), and either starts a multipart upload
   (``ChecksumAlgorithm=SHA256``, the writer token in the object's metadata) or,
   for a file of at most ``post_limit`` bytes, signs a presigned POST whose policy
   pins the key, the token and the exact length (``content-length-range``);
2. **signs** each part (:meth:`DirectUploads.sign_part`): a presigned UploadPart URL
   with the part's SHA-256 (base64, ``x-amz-checksum-sha256``) among its signed
   headers, so S3 refuses a part whose bytes do not match the digest the client
   declared; the declared digest is recorded in the session;
3. **finalizes** (:meth:`DirectUploads.complete`): lists the parts S3 holds, checks
   that they are exactly the layout the session fixed (``part_size`` bytes each,
   the last one the rest of the declared length), completes the upload with
   ``If-None-Match: *``, checks the object's length and its composite SHA-256
   (the SHA-256 of the parts' SHA-256 digests, computed by S3) against the
   declared part digests, lets the caller check the first bytes (content-type
   sniffing), and inserts the catalogue entry with the object's ETag as its
   version. Only then does the caller (``asyncassets.web.direct``) reference it.

Integrity, and what the entry's checksum means:

* multipart: ``metadata.sha256_parts`` is ``{"part_size": P, "sha256": hex}``, the
  SHA-256 of the concatenated SHA-256 digests of the ``P``-byte parts, as S3
  computed it from the bytes it stored. There is no whole-file ``metadata.sha256``:
  the browser cannot hash a large file incrementally with WebCrypto, and a
  read-back would carry the whole file through the app server, which direct
  uploads exist to avoid. ``verify()`` and ``asyncassets check --verify`` recompute
  the part digest from the stored bytes
  (:func:`~asyncassets.storage.catalogue.expected_digest`);
* presigned POST (small files): the object is read back once at finalize (at most
  ``post_limit`` bytes, 5 MiB by default) and its whole-file SHA-256 recorded in
  ``metadata.sha256`` as for any upload; a SHA-256 the client declared must match.

A session lives in ``asyncassets.direct_uploads`` of the catalogue's database::

    {"_id": "<secret>", "catalogue": "fs_s3_media", "place": "s3:.../media/",
     "key": "2026/12/....bin", "upload_id": "..." | None, "token": "...",
     "file": ObjectId(...), "size": 123, "part_size": 8388608, "parts": 1,
     "checksums": {"1": "<b64>"}, "filename": ..., "metadata": {...},
     "target": {...}, "state": "open", "at": ..., "expires": ...}

``state``: ``open`` -> ``completing`` (one finalize at a time; a lease of
:data:`COMPLETING_LEASE` lets a finalize take over one that died) -> ``stored``
(the entry is in) -> ``done`` (referenced); or ``failed``/``aborted``. Until
``expires`` the orphan sweep leaves the session's key reservation and multipart
upload alone; after it, :mod:`asyncassets.ops.direct_sweep` removes them.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as dt
import hashlib
import secrets
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from pymongo import ReturnDocument
from pymongo.errors import DuplicateKeyError, PyMongoError

from ... import _driver
from ..._tasks import spawn
from ...errors import DirectUploadError, KeyTaken, StorageError
from ..gridfs.spec import now_as_stored
from .keys import check_key
from .s3 import MAX_PARTS, MAX_PRESIGN_SECONDS, MIN_PART_SIZE, TOKEN_METADATA, S3Blobs

if TYPE_CHECKING:
    from .store import ObjectStore

__all__ = [
    "COMPLETING_LEASE",
    "SESSIONS",
    "DirectUploads",
    "composite_sha256",
    "parts_layout",
]

#: The collection of the catalogue's database holding direct-upload sessions.
SESSIONS = "asyncassets.direct_uploads"
#: A finalize that has held a session this long without finishing is taken to have
#: died (a killed process): another finalize may take the session over.
COMPLETING_LEASE = dt.timedelta(seconds=120)
#: Bytes read back to sniff the content type.
_HEAD_BYTES = 512


def parts_layout(size: int, part_size: int) -> list[int]:
    """The part sizes of a ``size``-byte multipart upload in ``part_size`` parts."""
    if size <= 0:
        return [0]
    full, rest = divmod(size, part_size)
    return [part_size] * full + ([rest] if rest else [])


def composite_sha256(part_digests: list[bytes]) -> str:
    """S3's composite SHA-256 of a multipart object, in hex: the SHA-256 of its
    parts' SHA-256 digests, concatenated in part order."""
    return hashlib.sha256(b"".join(part_digests)).hexdigest()


def _b64_digest(value: Any, what: str) -> bytes:
    """The 32 bytes of a base64 SHA-256, or a 400 :class:`DirectUploadError`."""
    if not isinstance(value, str):
        raise DirectUploadError(f"{what}: give the SHA-256 as a base64 string", status=400)
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise DirectUploadError(
            f"{what}: {value[:60]!r} is not a base64 SHA-256 digest (32 bytes)", status=400
        )
    return raw


def _utc(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.timezone.utc)


class DirectUploads:
    """Direct-upload sessions of one S3 catalogue (an :class:`ObjectStore` over S3).

    :param store: the catalogue; its storage must be an ``S3Storage``.
    :param post_limit: files of at most this many bytes get a presigned POST
        (one request, no parts); ``0``: always multipart.
    :param presign_seconds: how long each signed URL is valid.
    :raises TypeError: the store is not an S3 catalogue.
    """

    def __init__(
        self, store: ObjectStore, *, post_limit: int = MIN_PART_SIZE, presign_seconds: int = 3600
    ) -> None:
        if not isinstance(store.blobs, S3Blobs):
            raise TypeError(
                f"direct uploads need an S3Storage; {store.url} is not an S3 bucket. "
                "Upload through the app (tus) for other storages."
            )
        if not 0 < presign_seconds <= MAX_PRESIGN_SECONDS:
            raise ValueError(f"presign_seconds must be 1 to {MAX_PRESIGN_SECONDS}")
        self.store = store
        self.blobs: S3Blobs = store.blobs
        self.part_size = self.blobs.part_size
        self.post_limit = post_limit
        self.presign_seconds = presign_seconds
        self.sessions = _driver.acknowledged(store.db[SESSIONS])

    # -- creating ---------------------------------------------------------------

    async def create(
        self,
        *,
        size: int,
        filename: str | None,
        metadata: Mapping[str, Any],
        context: Mapping[str, Any],
        target: Mapping[str, Any],
        expires: dt.timedelta,
        sha256: str | None = None,
    ) -> dict[str, Any]:
        """Reserve a key and start the upload; return the session (with ``post`` or
        ``upload_id``).

        :param target: what the caller needs to reference the file at the end
            (document class, id, field); stored as it is.
        :param sha256: the whole file's SHA-256 (hex) if the client declares it;
            checked at finalize where it can be (presigned POST).
        :raises DirectUploadError: bad input (400); the storage failed (503).
        """
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise DirectUploadError(f"size must be an int >= 0, not {size!r}", status=400)
        multipart = size > self.post_limit
        layout = parts_layout(size, self.part_size) if multipart else [size]
        if len(layout) > MAX_PARTS:
            raise DirectUploadError(
                f"{size} bytes need {len(layout)} parts of {self.part_size}; S3 allows "
                f"{MAX_PARTS}. Configure a larger part_size on the S3Storage.",
                status=413,
            )
        if sha256 is not None and (
            not isinstance(sha256, str) or len(sha256) != 64
            or any(c not in "0123456789abcdef" for c in sha256)
        ):
            raise DirectUploadError("sha256 must be 64 lower-case hex digits", status=400)
        store = self.store
        from bson import ObjectId

        file_id = ObjectId()
        token = secrets.token_hex(16)
        key = check_key(store.keys.make(file_id=file_id, filename=filename, context=context))
        await store.ensure_indexes()
        reserved: list[str] = []
        upload_id: str | None = None
        try:
            key = await store.reserve_key(
                key, file_id=file_id, token=token, overwrite=False, reserved=reserved
            )
            content_type = metadata.get("content_type")
            if multipart:
                upload_id = await self._start(key, token, content_type)
            now = now_as_stored(self.sessions)
            session: dict[str, Any] = {
                "_id": secrets.token_urlsafe(24),
                "catalogue": store.name,
                "place": self.blobs.place,
                "key": key,
                "upload_id": upload_id,
                "token": token,
                "file": file_id,
                "size": size,
                "part_size": self.part_size if multipart else size,
                "parts": len(layout) if multipart else 0,
                "checksums": {},
                "filename": filename,
                "metadata": dict(metadata),
                "sha256": sha256,
                "target": dict(target),
                "state": "open",
                "at": now,
                "expires": now + expires,
            }
            if not multipart:
                session["post"] = await self._sign_post(key, token, size, content_type)
            await self.sessions.insert_one(session)
        except BaseException:
            await asyncio.shield(spawn(self._undo_create(upload_id, reserved, token)))
            raise
        return session

    async def _undo_create(self, upload_id: str | None, reserved: list[str], token: str) -> None:
        if upload_id is not None and reserved:
            await self._abort_upload(reserved[-1], upload_id)
        for key in reserved:
            await self.store.reservations.release(key, token=token)

    async def _start(self, key: str, token: str, content_type: Any) -> str:
        extra = {"ContentType": content_type} if isinstance(content_type, str) else {}

        async def start(client: Any) -> Any:
            return await client.create_multipart_upload(
                Bucket=self.blobs.bucket,
                Key=self.blobs._full_key(key),
                Metadata={TOKEN_METADATA: token},
                ChecksumAlgorithm="SHA256",
                **extra,
            )

        response = await self.blobs._call("start a direct upload of", key, start)
        return str(response["UploadId"])

    async def _sign_post(
        self, key: str, token: str, size: int, content_type: Any
    ) -> dict[str, Any]:
        full_key = self.blobs._full_key(key)
        fields = {f"x-amz-meta-{TOKEN_METADATA}": token}
        conditions: list[Any] = [
            {f"x-amz-meta-{TOKEN_METADATA}": token},
            ["content-length-range", size, size],
        ]
        if isinstance(content_type, str):
            fields["Content-Type"] = content_type
            conditions.append({"Content-Type": content_type})

        async def sign(client: Any) -> Any:
            return await client.generate_presigned_post(
                Bucket=self.blobs.bucket,
                Key=full_key,
                Fields=fields,
                Conditions=conditions,
                ExpiresIn=self.presign_seconds,
            )

        post = await self.blobs._call("presign a POST of", key, sign)
        return {"url": str(post["url"]), "fields": dict(post["fields"])}

    # -- reading sessions ---------------------------------------------------------

    async def get(self, session_id: Any) -> dict[str, Any]:
        """The session, or a 404 :class:`DirectUploadError`."""
        session = None
        if isinstance(session_id, str) and 0 < len(session_id) <= 64:
            session = await self.sessions.find_one(
                {"_id": session_id, "catalogue": self.store.name}
            )
        if session is None:
            raise DirectUploadError(
                "no such direct upload (never created, or expired and swept); start a "
                "new upload",
                status=404,
            )
        return dict(session)

    def _require_open(self, session: Mapping[str, Any], action: str) -> None:
        state = session.get("state")
        if state == "open" and _utc(session["expires"]) > dt.datetime.now(dt.timezone.utc):
            return
        if state == "open":
            raise DirectUploadError(
                f"cannot {action}: the upload expired; start a new upload", status=410
            )
        raise DirectUploadError(
            f"cannot {action}: the upload is {state}, not open", status=409
        )

    # -- signing parts -----------------------------------------------------------

    async def sign_part(self, session_id: Any, number: Any, checksum: Any) -> dict[str, Any]:
        """A presigned UploadPart URL for part ``number`` with its SHA-256 (base64).

        :returns: ``{"url": ..., "headers": {"x-amz-checksum-sha256": ...}}``: the
            client PUTs the part to the URL with exactly those headers.
        :raises DirectUploadError: no such session (404), not open (409/410), a
            part number out of range or a bad digest (400).
        """
        session = await self.get(session_id)
        self._require_open(session, "sign a part")
        if session.get("upload_id") is None:
            raise DirectUploadError(
                "this upload is a single presigned POST; it has no parts", status=400
            )
        count = int(session["parts"])
        if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number <= count:
            raise DirectUploadError(
                f"part number must be 1 to {count} for this upload, not {number!r}", status=400
            )
        _b64_digest(checksum, f"part {number}")
        await self.sessions.update_one(
            {"_id": session["_id"], "state": "open"},
            {"$set": {f"checksums.{number}": checksum}},
        )
        key = str(session["key"])
        params = {
            "Bucket": self.blobs.bucket,
            "Key": self.blobs._full_key(key),
            "UploadId": session["upload_id"],
            "PartNumber": number,
            "ChecksumSHA256": checksum,
        }

        async def sign(client: Any) -> Any:
            return await client.generate_presigned_url(
                "upload_part", Params=params, ExpiresIn=self.presign_seconds, HttpMethod="PUT"
            )

        url = await self.blobs._call("presign a part of", key, sign)
        return {"url": str(url), "headers": {"x-amz-checksum-sha256": checksum}}

    async def list_parts(self, session: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The parts S3 holds for the session's upload: ``PartNumber``, ``Size``, ``ETag``."""
        key = str(session["key"])
        found: list[dict[str, Any]] = []
        marker = 0
        while True:

            async def page_of(client: Any, marker: int = marker) -> Any:
                return await client.list_parts(
                    Bucket=self.blobs.bucket,
                    Key=self.blobs._full_key(key),
                    UploadId=session["upload_id"],
                    PartNumberMarker=marker,
                )

            page = await self.blobs._call("list the parts of", key, page_of)
            for part in page.get("Parts", ()):
                found.append(
                    {
                        "PartNumber": int(part["PartNumber"]),
                        "Size": int(part["Size"]),
                        "ETag": str(part["ETag"]),
                    }
                )
            if not page.get("IsTruncated"):
                return found
            marker = int(page.get("NextPartNumberMarker") or 0)

    # -- finalizing ---------------------------------------------------------------

    async def complete(
        self,
        session_id: Any,
        *,
        check_head: Callable[[bytes], None] | None = None,
        exclusive: bool = False,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Complete the upload, verify it, insert the catalogue entry.

        Idempotent: a session already ``stored`` or ``done`` returns its entry.
        Runs to its end even if the caller is cancelled.

        :param check_head: called with the file's first bytes (up to 512); raising
            refuses the file (it is removed, the error propagates).
        :param exclusive: the caller holds a lease of its own on this upload (a
            resumable upload's finish), so no other finalize runs: one that died
            (the session left ``completing``) is taken over at once rather than
            after :data:`COMPLETING_LEASE`.
        :returns: ``(session, catalogue entry)``.
        :raises DirectUploadError: parts missing (409, the session stays open: send
            them and finalize again); the parts or length do not match what was
            declared, or the checksum differs (422: the upload is removed); another
            finalize is running (409); the storage failed and the outcome is unknown
            (503: finalize again).
        """
        session = await self.get(session_id)
        return await asyncio.shield(spawn(self._complete(session, check_head, exclusive)))

    async def _complete(
        self,
        session: dict[str, Any],
        check_head: Callable[[bytes], None] | None,
        exclusive: bool = False,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        if session.get("state") in ("stored", "done"):
            return session, await self._entry_of(session)
        if not (exclusive and session.get("state") == "completing"):
            self._require_open_or_stale(session)
        claimed = await self._claim(session, exclusive)
        lease = claimed["lease"]
        try:
            parts: list[dict[str, Any]] | None = []
            if session.get("upload_id") is not None:
                parts = await self._parts_if_pending(claimed)
                if parts is not None:
                    self._check_parts(session, parts)  # missing: 409, nothing changes
            version, sha256_info = await self._finish_object(claimed, parts)
            if check_head is not None:
                await self._check_head(claimed, version, check_head)
            entry = await self._insert_entry(self._make_entry(claimed, version, sha256_info))
        except DirectUploadError as exc:
            if exc.status in (409, 503):  # nothing removed: finalize may be retried
                await self._release_claim(claimed, lease)
            else:
                await asyncio.shield(spawn(self._fail(claimed, str(exc))))
            raise
        except (StorageError, PyMongoError):
            # Unknown: the upload may be completed, the entry inserted. A finalize
            # again finds out (the object's token, the entry's _id): give it back.
            await asyncio.shield(spawn(self._release_claim(claimed, lease)))
            raise
        except BaseException:
            # Cancelled or a bug: the session stays "completing" until a finalize
            # takes the lease over, or the sweep after expiry.
            raise
        stored = await self.sessions.find_one_and_update(
            {"_id": claimed["_id"], "state": "completing", "lease": lease},
            {"$set": {"state": "stored", "at": now_as_stored(self.sessions)}},
            return_document=ReturnDocument.AFTER,
        )
        return dict(stored or claimed), entry

    async def _parts_if_pending(self, session: Mapping[str, Any]) -> list[dict[str, Any]] | None:
        """The upload's parts; ``None`` when S3 knows the upload no more (completed by
        an earlier finalize whose reply was lost, or aborted)."""
        try:
            return await self.list_parts(session)
        except StorageError as exc:
            cause = exc.__cause__
            code = getattr(cause, "response", {}).get("Error", {}).get("Code") if cause else None
            if code == "NoSuchUpload":
                return None
            raise

    def _require_open_or_stale(self, session: Mapping[str, Any]) -> None:
        if session.get("state") == "completing":
            if _utc(session["at"]) + COMPLETING_LEASE > dt.datetime.now(dt.timezone.utc):
                raise DirectUploadError(
                    "another finalize of this upload is running; wait for it", status=409
                )
            return
        self._require_open(session, "finalize")

    async def _claim(self, session: dict[str, Any], exclusive: bool = False) -> dict[str, Any]:
        """Make the session this finalize's (``completing``); one at a time (with
        ``exclusive``, the caller's own lease sees to that)."""
        lease = secrets.token_hex(8)
        now = now_as_stored(self.sessions)
        stale = now if exclusive else now - COMPLETING_LEASE
        claimed = await self.sessions.find_one_and_update(
            {
                "_id": session["_id"],
                "$or": [
                    {"state": "open", "expires": {"$gt": now}},
                    {"state": "completing", "at": {"$lt": stale}},
                ],
            },
            {"$set": {"state": "completing", "lease": lease, "at": now}},
            return_document=ReturnDocument.AFTER,
        )
        if claimed is None:
            current = await self.get(session["_id"])
            if current.get("state") in ("stored", "done"):
                raise DirectUploadError("the upload was finalized meanwhile", status=409)
            self._require_open_or_stale(current)
            raise DirectUploadError(
                "another finalize or abort of this upload ran meanwhile", status=409
            )
        return dict(claimed)

    async def _release_claim(self, session: Mapping[str, Any], lease: str) -> None:
        await self.sessions.update_one(
            {"_id": session["_id"], "state": "completing", "lease": lease},
            {"$set": {"state": "open"}, "$unset": {"lease": ""}},
        )

    def _check_parts(self, session: Mapping[str, Any], parts: list[dict[str, Any]]) -> None:
        layout = parts_layout(int(session["size"]), int(session["part_size"]))
        have = {part["PartNumber"]: part for part in parts}
        extra = sorted(n for n in have if not 1 <= n <= len(layout))
        wrong = [
            f"part {n} is {have[n]['Size']} bytes, expected {size}"
            for n, size in enumerate(layout, 1)
            if n in have and have[n]["Size"] != size
        ]
        if extra or wrong:
            problems = wrong + ([f"unexpected parts {extra}"] if extra else [])
            raise DirectUploadError(
                f"the parts do not make the declared {session['size']} bytes in "
                f"{session['part_size']}-byte parts: {'; '.join(problems)}; the upload was removed",
                status=422,
            )
        missing = [n for n in range(1, len(layout) + 1) if n not in have]
        if missing:
            shown = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
            raise DirectUploadError(
                f"parts missing: {shown}; upload them and finalize again", status=409
            )

    async def _finish_object(
        self, session: dict[str, Any], parts: list[dict[str, Any]] | None
    ) -> tuple[str | None, dict[str, Any]]:
        """Complete (multipart) or find (POST) the object; return its ETag and the
        checksum to record."""
        key = str(session["key"])
        if session.get("upload_id") is None:
            info = await self.blobs.stat(key)
            if info is None or not self.blobs.made_by(info, str(session["token"])):
                raise DirectUploadError(
                    "the file was not uploaded (no object under the signed key); POST it "
                    "with the signed form fields, then finalize",
                    status=409,
                )
            self._check_size(session, info.size)
            digest = await self._read_back(key, info.version, info.size)
            declared = session.get("sha256")
            if declared is not None and declared != digest:
                raise DirectUploadError(
                    f"the SHA-256 of the stored bytes is {digest}, the client declared "
                    f"{declared}; the upload was removed",
                    status=422,
                )
            return info.version, {"sha256": digest}
        checksums = session.get("checksums") or {}
        if parts is None:
            # The upload is gone: completed by an earlier finalize (its object
            # carries this session's token), or aborted.
            found = await self.blobs.stat(key)
            if found is None or not self.blobs.made_by(found, str(session["token"])):
                raise DirectUploadError(
                    "the multipart upload is gone (aborted, or expired and swept); start "
                    "a new upload",
                    status=410,
                )
            layout = parts_layout(int(session["size"]), int(session["part_size"]))
            parts = [{"PartNumber": n, "Size": size} for n, size in enumerate(layout, 1)]
            return await self._verified(session, parts, checksums, found.version)
        missing = [p["PartNumber"] for p in parts if str(p["PartNumber"]) not in checksums]
        if missing:
            raise DirectUploadError(
                f"parts {missing} were uploaded without a signed checksum", status=422
            )
        ordered = sorted(parts, key=lambda p: p["PartNumber"])
        body = {
            "Parts": [
                {
                    "PartNumber": p["PartNumber"],
                    "ETag": p["ETag"],
                    "ChecksumSHA256": checksums[str(p["PartNumber"])],
                }
                for p in ordered
            ]
        }
        version = await self._complete_upload(session, body)
        return await self._verified(session, ordered, checksums, version)

    async def _verified(
        self,
        session: Mapping[str, Any],
        ordered: list[dict[str, Any]],
        checksums: Mapping[str, Any],
        version: str | None,
    ) -> tuple[str | None, dict[str, Any]]:
        """Check the completed object's length and composite SHA-256."""
        key = str(session["key"])
        head = await self._head(key)
        if head is None:
            raise DirectUploadError(
                "the completed object is missing; finalize again", status=503
            )
        self._check_size(session, int(head["ContentLength"]))
        stored = str(head.get("ChecksumSHA256") or "").split("-")[0]
        expected = composite_sha256(
            [_b64_digest(checksums[str(p["PartNumber"])], "part") for p in ordered]
        )
        try:
            stored_hex = base64.b64decode(stored, validate=True).hex() if stored else ""
        except (binascii.Error, ValueError):
            stored_hex = ""
        if stored_hex != expected:
            raise DirectUploadError(
                "the object's SHA-256 of part digests is "
                f"{stored_hex or 'not reported by S3'}, the parts' declared digests give "
                f"{expected}; the upload was removed",
                status=422,
            )
        return version, {"sha256_parts": {"part_size": session["part_size"], "sha256": expected}}

    def _check_size(self, session: Mapping[str, Any], size: int) -> None:
        if size != int(session["size"]):
            raise DirectUploadError(
                f"the stored object is {size} bytes, the upload declared {session['size']}; "
                "the upload was removed",
                status=422,
            )

    async def _complete_upload(self, session: Mapping[str, Any], body: dict[str, Any]) -> str:
        key = str(session["key"])
        token = str(session["token"])

        async def complete(client: Any) -> Any:
            return await client.complete_multipart_upload(
                Bucket=self.blobs.bucket,
                Key=self.blobs._full_key(key),
                UploadId=session["upload_id"],
                MultipartUpload=body,
                IfNoneMatch="*",
            )

        try:
            response = await self.blobs._call("complete the direct upload of", key, complete)
        except StorageError as exc:
            # A lost reply (ours or the HTTP client's resend) may have completed it:
            # the object then carries this session's token.
            info = await self.blobs.stat(key)
            if info is not None and self.blobs.made_by(info, token):
                return str(info.version)
            if isinstance(exc, KeyTaken):
                raise DirectUploadError(
                    f"another object appeared under the reserved key {key!r}; the upload "
                    "was removed",
                    status=422,
                ) from exc
            if exc.transient:
                raise DirectUploadError(
                    f"the storage did not answer the completion ({exc}); finalize again",
                    status=503,
                ) from exc
            raise DirectUploadError(f"S3 refused the completion: {exc}", status=422) from exc
        etag = response.get("ETag")
        return str(etag).strip('"')

    async def _head(self, key: str) -> dict[str, Any] | None:
        async def head(client: Any) -> Any:
            return await client.head_object(
                Bucket=self.blobs.bucket, Key=self.blobs._full_key(key), ChecksumMode="ENABLED"
            )

        try:
            return dict(await self.blobs._call("stat", key, head, missing="key"))
        except StorageError as exc:
            if exc.transient:
                raise DirectUploadError(
                    f"the storage did not answer ({exc}); finalize again", status=503
                ) from exc
            return None

    async def _read_back(self, key: str, version: Any, size: int) -> str:
        digest = hashlib.sha256()
        async for piece in self.blobs.open_reader(key, 0, size, version=version):
            digest.update(piece)
        return digest.hexdigest()

    async def _check_head(
        self, session: Mapping[str, Any], version: Any, check: Callable[[bytes], None]
    ) -> None:
        size = min(int(session["size"]), _HEAD_BYTES)
        head = b"".join(
            [p async for p in self.blobs.open_reader(str(session["key"]), 0, size,
                                                     version=version)]
        )
        try:
            check(head)
        except Exception as exc:
            raise DirectUploadError(f"{exc}; the upload was removed", status=422) from exc

    def _make_entry(
        self, session: Mapping[str, Any], version: str | None, checksum: dict[str, Any]
    ) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "_id": session["file"],
            "length": int(session["size"]),
            "chunkSize": self.store.chunk_size,
            "uploadDate": now_as_stored(self.store.files),
        }
        if session.get("filename") is not None:
            entry["filename"] = session["filename"]
        entry["metadata"] = {**(session.get("metadata") or {}), **checksum}
        location: dict[str, Any] = {"storage": self.store.storage.kind, "key": session["key"]}
        if version is not None:
            location["version"] = version
        entry["location"] = location
        return entry

    async def _insert_entry(self, entry: dict[str, Any]) -> dict[str, Any]:
        try:
            await self.store.files.insert_one(entry)
        except DuplicateKeyError:
            # An earlier finalize's insert whose reply was lost: the same object.
            found = await self.store.files.find_one({"_id": entry["_id"]})
            if found is None or found.get("location", {}).get("key") != entry["location"]["key"]:
                raise
            return dict(found)
        return entry

    async def _entry_of(self, session: Mapping[str, Any]) -> dict[str, Any]:
        entry = await self.store.files.find_one({"_id": session["file"]})
        if entry is None:
            raise DirectUploadError(
                "the upload was finalized, but its file is gone (deleted or swept since)",
                status=410,
            )
        return dict(entry)

    async def mark(self, session: Mapping[str, Any], state: str, **fields: Any) -> None:
        """Record the session's end (``done``, ``failed``), with ``fields``."""
        await self.sessions.update_one(
            {"_id": session["_id"]},
            {"$set": {"state": state, "at": now_as_stored(self.sessions), **fields},
             "$unset": {"lease": ""}},
        )

    # -- removing -------------------------------------------------------------------

    async def _fail(self, session: Mapping[str, Any], reason: str) -> None:
        """Remove what the upload left (upload, object of its token), release the
        key, and mark the session failed."""
        await self.remove_upload(session)
        await self.mark(session, "failed", reason=reason)

    async def remove_upload(self, session: Mapping[str, Any]) -> None:
        """Abort the session's multipart upload, delete an object it completed (only
        one carrying its token, and named by no entry), release its key."""
        key = str(session["key"])
        token = str(session["token"])
        if session.get("upload_id") is not None:
            await self._abort_upload(key, str(session["upload_id"]))
        if await self.store.files.find_one({"location.key": key}, {"_id": 1}) is None:
            info = await self.blobs.stat(key)
            if info is not None and self.blobs.made_by(info, token):
                await self.blobs.delete(key, version=info.version)
            await self.store.reservations.release(key, token=token)

    async def _abort_upload(self, key: str, upload_id: str) -> None:
        async def abort(client: Any) -> Any:
            return await client.abort_multipart_upload(
                Bucket=self.blobs.bucket, Key=self.blobs._full_key(key), UploadId=upload_id
            )

        try:
            await self.blobs._call("abort the direct upload of", key, abort)
        except StorageError as exc:
            cause = exc.__cause__
            code = getattr(cause, "response", {}).get("Error", {}).get("Code") if cause else None
            if code != "NoSuchUpload":
                raise

    async def abort(self, session_id: Any) -> None:
        """Abort an open upload: its parts and its key reservation are removed.

        Idempotent: an abort whose removal failed half-way (the storage down: a
        503) left the session ``aborting``; aborting again finishes the removal
        (each step of it may run twice) instead of refusing a session that can
        no longer be finalized anyway.

        :raises DirectUploadError: no such session (404); being finalized or
            finalized already (409).
        """
        session = await self.get(session_id)
        if session.get("state") in ("aborted", "failed"):
            return
        claimed = await self.sessions.find_one_and_update(
            {"_id": session["_id"], "state": {"$in": ["open", "aborting"]}},
            {"$set": {"state": "aborting", "at": now_as_stored(self.sessions)}},
            return_document=ReturnDocument.AFTER,
        )
        if claimed is None:
            current = await self.get(session["_id"])
            raise DirectUploadError(
                f"cannot abort: the upload is {current.get('state')}", status=409
            )
        await asyncio.shield(spawn(self._abort_claimed(dict(claimed))))

    async def _abort_claimed(self, session: dict[str, Any]) -> None:
        await self.remove_upload(session)
        await self.mark(session, "aborted")
