"""An S3 bucket (or an S3-compatible server) as a :class:`~.blobs.Blobs` backend.

The client is aiobotocore, chosen on measurement against moto (docs/storage):
it is the one that can make a *multipart* upload conditional
(``If-None-Match: *`` on CompleteMultipartUpload), abort one explicitly, and
hold a writer to two parts of memory; obstore's conditional put falls back to
a single PUT of the whole body in memory and has no multipart abort.

How the rules of :mod:`.blobs` are kept here:

* a writer buffers up to ``part_size`` bytes; an object smaller than that is one
  PUT at commit, a larger one a multipart upload with one part in flight while
  the next one fills, completed at commit (a reader never sees half an object);
* ``overwrite=False`` sends ``If-None-Match: *`` on the PUT or the completion, so
  two writers cannot both win; a refused completion aborts its upload;
* the requests whose reply decides what exists (starting an upload, the final
  PUT or completion) run in tasks of their own that a cancelled caller does not
  interrupt, so :meth:`_S3Writer.abort` always learns what was created and removes it;
* every object carries its writer's ``token`` (user metadata
  ``x-amz-meta-asyncassets-token``): when a retried PUT or completion meets
  "already exists" or "no such upload", the first try may have succeeded without
  its reply arriving, and the token on the object tells whether it is this
  writer's; the sweep tells a dead writer's object the same way;
* an object's *version* is its ETag: reads send ``If-Match`` (a resumed read
  too), so an object written under the key since is never read in place of the
  one a catalogue entry recorded, and deletes send ``If-Match`` when they know it;
* botocore's own retries are off: every request goes through the storage's
  :class:`~asyncassets.storage.retry.Retry`, a ranged read resuming at the byte
  it reached.

aiobotocore is imported at first use, so ``import asyncassets`` works without
the ``s3`` extra.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import io
import os
import uuid
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal, NamedTuple, TypeVar

from ...errors import KeyTaken, StorageError, StoredObjectChanged, StoredObjectMissing
from ..retry import Retry
from .blobs import BlobInfo

__all__ = ["MAX_PRESIGN_SECONDS", "PendingUpload", "S3Blobs", "public_object_url"]

T = TypeVar("T")

MIN_PART_SIZE = 5 * 1024 * 1024
#: The longest a SigV4 presigned URL may last: 7 days.
MAX_PRESIGN_SECONDS = 7 * 24 * 3600
#: S3's limit on the number of parts of one upload.
MAX_PARTS = 10_000
_INSTALL_HINT = "S3Storage needs the s3 extra: pip install 'asyncassets[s3]'"

_TRANSIENT_STATUS = frozenset({500, 502, 503, 504})
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "InternalError",
        "ServiceUnavailable",
        "OperationAborted",
    }
)
_CREDENTIAL_CODES = frozenset(
    {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"}
)
_MISSING_KEY_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
#: The user metadata an object's writer token is kept in (``x-amz-meta-...``).
TOKEN_METADATA = "asyncassets-token"


def _botocore() -> Any:
    """aiobotocore's session module, imported at first use."""
    try:
        import aiobotocore.session
    except ImportError as exc:
        raise StorageError(_INSTALL_HINT) from exc
    return aiobotocore.session


def _error_code(exc: BaseException) -> tuple[str | None, int | None]:
    """The S3 error code and HTTP status of a botocore ``ClientError``, else ``None``s."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None, None
    code = response.get("Error", {}).get("Code")
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return (str(code) if code is not None else None), status


def _cause_code(exc: BaseException) -> str | None:
    """The S3 error code behind one of our :class:`StorageError`."""
    return _error_code(exc.__cause__)[0] if exc.__cause__ is not None else None


def is_transient(exc: BaseException) -> bool:
    """Whether an error of the client is worth retrying.

    Connection errors, timeouts, a body cut short, HTTP 500/502/503/504 and S3's
    throttling codes are; everything else (403, 404, a missing bucket, bad
    credentials, a refused precondition) is not.
    """
    code, status = _error_code(exc)
    if code is not None or status is not None:
        return status in _TRANSIENT_STATUS or code in _TRANSIENT_CODES
    from botocore import exceptions as bce

    if isinstance(
        exc,
        (
            bce.NoCredentialsError,
            bce.PartialCredentialsError,
            bce.ParamValidationError,
            bce.NoRegionError,
        ),
    ):
        return False
    if isinstance(
        exc,
        (
            bce.HTTPClientError,  # connection closed, read timeout, body cut short
            bce.ConnectionError,  # refused, connect timeout
            bce.IncompleteReadError,
        ),
    ):
        return True
    import aiohttp

    return isinstance(exc, (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError))


class S3Blobs:
    """Objects under ``prefix`` in an S3 bucket.

    :param bucket: the bucket; it must exist (it is never created here).
    :param prefix: prepended to every key (``"trailers/"``); listing sees only it.
    :param endpoint_url: an S3-compatible server (MinIO, Ceph, moto); addressed
        path-style. ``None``: AWS.
    :param region: ``None``: ``AWS_REGION``/``AWS_DEFAULT_REGION``/the AWS config.
    :param access_key_id: with ``secret_access_key`` and ``session_token``;
        ``None``: botocore's usual chain (``AWS_ACCESS_KEY_ID``... environment
        variables, the shared config files, an instance role).
    :param retry: how transient failures are retried.
    :param part_size: the bytes a writer buffers before sending a part of a
        multipart upload (at least 5 MiB, S3's minimum); a writer holds about two.
    :param piece_size: the largest piece a reader yields.
    """

    def __init__(
        self,
        bucket: str,
        *,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        session_token: str | None = None,
        retry: Retry = Retry(),  # noqa: B008 (frozen, so one shared default is safe)
        part_size: int = 8 * 1024 * 1024,
        piece_size: int = 1024 * 1024,
    ) -> None:
        if not isinstance(bucket, str) or not bucket or "/" in bucket:
            raise ValueError(f"bucket must be a bucket name without '/', got {bucket!r}")
        if not isinstance(prefix, str) or prefix.startswith("/"):
            raise ValueError(f"prefix must be a string not starting with '/', got {prefix!r}")
        if not isinstance(retry, Retry):
            raise TypeError(f"retry must be a Retry, not {type(retry).__name__}")
        if isinstance(part_size, bool) or not isinstance(part_size, int):
            raise TypeError(f"part_size must be an int, not {type(part_size).__name__}")
        if part_size < MIN_PART_SIZE:
            raise ValueError(
                f"part_size must be at least {MIN_PART_SIZE} bytes (5 MiB, S3's smallest "
                f"multipart part), got {part_size}"
            )
        if isinstance(piece_size, bool) or not isinstance(piece_size, int) or piece_size < 1:
            raise ValueError(f"piece_size must be a positive int, got {piece_size!r}")
        if (access_key_id is None) != (secret_access_key is None):
            raise ValueError("give both access_key_id and secret_access_key, or neither")
        self.bucket = bucket
        self.prefix = prefix
        self.endpoint_url = endpoint_url
        self.region = region
        self.retry = retry
        self.part_size = part_size
        self.piece_size = piece_size
        self.url = f"s3://{bucket}/{prefix}"
        self._credentials = (access_key_id, secret_access_key, session_token)
        self._session: Any = None
        # One client per event loop: aiohttp's connections belong to the loop
        # that opened them. A closed loop's entry is dropped at the next use.
        self._clients: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, tuple[Any, contextlib.AsyncExitStack]
        ] = weakref.WeakKeyDictionary()
        _botocore()  # fail now, clearly, when the s3 extra is missing

    def __repr__(self) -> str:
        endpoint = f", endpoint_url={self.endpoint_url!r}" if self.endpoint_url else ""
        return f"S3Blobs({self.url!r}{endpoint})"

    # -- the client -----------------------------------------------------------

    async def _client(self) -> Any:
        loop = asyncio.get_running_loop()
        entry = self._clients.get(loop)
        if entry is not None:
            return entry[0]
        for other in [other for other in self._clients if other.is_closed()]:
            del self._clients[other]
        session_module = _botocore()
        from aiobotocore.config import AioConfig

        if self._session is None:
            self._session = session_module.get_session()
        access_key, secret_key, token = self._credentials
        config = AioConfig(
            connect_timeout=10,
            read_timeout=60,
            # Our Retry decides, with resumption of ranged reads; not botocore.
            retries={"total_max_attempts": 1, "mode": "standard"},
            s3={"addressing_style": "path" if self.endpoint_url else "auto"},
            # Presigned URLs too (botocore may presign with SigV2 otherwise).
            signature_version="s3v4",
        )
        region = self.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region is None and self.endpoint_url:
            region = "us-east-1"  # S3-compatible servers ignore it, but signing needs one
        stack = contextlib.AsyncExitStack()
        client = await stack.enter_async_context(
            self._session.create_client(
                "s3",
                endpoint_url=self.endpoint_url,
                region_name=region,
                aws_access_key_id=access_key,
                aws_secret_access_key=secret_key,
                aws_session_token=token,
                config=config,
            )
        )
        entry = self._clients.get(loop)
        if entry is not None:  # another task of this loop made one meanwhile
            await stack.aclose()
            return entry[0]
        self._clients[loop] = (client, stack)
        return client

    async def aclose(self) -> None:
        """Close the running event loop's client (its connections); the next call opens one."""
        entry = self._clients.pop(asyncio.get_running_loop(), None)
        if entry is not None:
            await entry[1].aclose()

    # -- requests, retries, errors --------------------------------------------

    def _full_key(self, key: str) -> str:
        return self.prefix + key

    async def _call(
        self,
        action: str,
        key: str | None,
        request: Callable[[Any], Awaitable[T]],
        *,
        missing: Literal["key", "bucket"] | None = None,
    ) -> T:
        """``request(client)`` with retries; failures become :class:`StorageError`.

        :param missing: what a bare 404 (a HEAD's has no error code) means is missing:
            the key (:class:`StoredObjectMissing`) or the bucket.
        """
        tries = 0

        async def attempt() -> T:
            nonlocal tries
            tries += 1
            return await request(await self._client())

        try:
            return await self.retry.call(attempt, is_transient)
        except StorageError:
            raise
        except Exception as exc:
            raise self._error(exc, action, key, tries, missing=missing) from exc

    def _error(
        self,
        exc: BaseException,
        action: str,
        key: str | None,
        tries: int,
        *,
        missing: Literal["key", "bucket"] | None,
    ) -> StorageError:
        """The :class:`StorageError` that says what failed and what to do."""
        code, status = _error_code(exc)
        where = f"{self.url}{key}" if key is not None else self.url
        what = f"{action} {where}"
        detail = f"{code or type(exc).__name__}: {exc}"
        kwargs: dict[str, Any] = {"storage": self.url, "key": key}
        if code == "PreconditionFailed" or status == 412:
            return KeyTaken(
                f"Cannot {what}: an object already exists under the key and overwrite=False. "
                "Write under another key, or pass overwrite=True to replace it.",
                **kwargs,
            )
        if code == "NoSuchBucket" or (missing == "bucket" and status == 404):
            return StorageError(
                f"Cannot {what}: bucket {self.bucket!r} does not exist"
                + (f" on {self.endpoint_url}" if self.endpoint_url else "")
                + ". Create the bucket, or fix the bucket name or endpoint_url.",
                **kwargs,
            )
        if code == "InvalidRange" or status == 416:
            return StorageError(
                f"Cannot {what}: the range starts past the object's end ({detail}); it was "
                "replaced or truncated behind the catalogue's back. Run asyncassets.check().",
                **kwargs,
            )
        if missing == "key" and (code in _MISSING_KEY_CODES or status == 404):
            return StoredObjectMissing(
                f"Cannot {what}: no object under the key; it was deleted behind the "
                "catalogue's back. Run asyncassets.check() to list such entries.",
                **kwargs,
            )
        if code in _CREDENTIAL_CODES:
            return StorageError(
                f"Cannot {what}: the server refused the credentials ({detail}). Check the "
                "access key id and secret (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY), "
                "the session token, and the clock.",
                **kwargs,
            )
        if code in ("AccessDenied", "AllAccessDisabled") or status == 403:
            return StorageError(
                f"Cannot {what}: access denied ({detail}). Check the credentials and that "
                "their policy allows this action on the bucket and prefix.",
                **kwargs,
            )
        from botocore import exceptions as bce

        if isinstance(exc, (bce.NoCredentialsError, bce.PartialCredentialsError)):
            return StorageError(
                f"Cannot {what}: no S3 credentials found ({exc}). Pass access_key_id and "
                "secret_access_key, or set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY.",
                **kwargs,
            )
        if is_transient(exc):
            return StorageError(
                f"Cannot {what}: failed {tries} time(s) ({detail}). The server is "
                "unreachable, overloaded or failing; try again later, or allow more "
                "attempts with Retry(attempts=...).",
                transient=True,
                **kwargs,
            )
        return StorageError(f"Cannot {what}: {detail}.", **kwargs)

    # -- the Blobs protocol ---------------------------------------------------

    @property
    def place(self) -> str:
        """Where the objects are, as their reservations name it:
        ``s3:<endpoint>/<bucket>/<prefix>`` (``aws`` for AWS's endpoint)."""
        return f"s3:{self.endpoint_url or 'aws'}/{self.bucket}/{self.prefix}"

    def reservation_id(self, key: str) -> str:
        """The object's one name across storages: ``s3:<endpoint>/<bucket>/<full key>``."""
        return f"s3:{self.endpoint_url or 'aws'}/{self.bucket}/{self._full_key(key)}"

    def made_by(self, info: BlobInfo, token: str) -> bool:
        """Whether the object ``info`` (from :meth:`stat`) carries the writer ``token``."""
        return info.token is not None and info.token == token

    def open_writer(self, key: str, *, token: str | None = None) -> _S3Writer:
        """Start writing an object under ``key``; no request until a part is full or commit.

        :param token: the writer's identity, stored with the object (user metadata).
        """
        return _S3Writer(self, key, token)

    def open_reader(
        self, key: str, start: int, end: int, *, version: Any = None
    ) -> AsyncIterator[bytes]:
        """Yield the bytes ``[start, end)`` of the object under ``key``; one Range GET.

        A body cut short is resumed with a new Range GET from the byte reached;
        that counts as one more attempt of the storage's :class:`Retry`.

        :param version: the object's ETag: sent as ``If-Match`` on every GET, so
            only that object is read, even when a read resumes.
        :raises StoredObjectMissing: no object under ``key``.
        :raises StoredObjectChanged: the object under ``key`` has another ETag.
        :raises StorageError: a permanent failure, the retries used up, or the
            object is shorter than ``end``.
        """
        for name, value in (("start", start), ("end", end)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if end < start:
            raise ValueError(f"end ({end}) must not be before start ({start})")
        if version is not None and not isinstance(version, str):
            raise StoredObjectChanged(
                f"Cannot read {self.url}{key}: its recorded version {version!r} is not an "
                "ETag; the catalogue entry was changed behind the library's back",
                storage=self.url,
                key=key,
            )
        return self._read(key, start, end, version)

    async def _read(
        self, key: str, start: int, end: int, version: str | None
    ) -> AsyncIterator[bytes]:
        if start == end:
            return
        full_key = self._full_key(key)
        conditions = {} if version is None else {"IfMatch": f'"{version}"'}
        position = start
        tries = 0
        while True:
            tries += 1
            body = None
            try:
                client = await self._client()
                response = await client.get_object(
                    Bucket=self.bucket,
                    Key=full_key,
                    Range=f"bytes={position}-{end - 1}",
                    **conditions,
                )
                body = response["Body"]
                while position < end:
                    piece = await body.read(min(self.piece_size, end - position))
                    if not piece:
                        break
                    position += len(piece)
                    yield piece
                if position >= end:
                    return
                total = _total_size(response.get("ContentRange"))
                if total is not None and total < end:
                    raise StorageError(
                        f"Cannot read {self.url}{key} up to byte {end}: the object is only "
                        f"{total} bytes; it was replaced or truncated behind the catalogue's "
                        "back. Run asyncassets.check().",
                        storage=self.url,
                        key=key,
                    )
                raise _ShortBody(f"body ended at byte {position} of {end}")
            except StorageError:
                raise
            except Exception as exc:
                code, status = _error_code(exc)
                if version is not None and (code == "PreconditionFailed" or status == 412):
                    raise self._changed(key, version) from exc
                if tries >= self.retry.attempts or not (
                    isinstance(exc, _ShortBody) or is_transient(exc)
                ):
                    raise self._error(exc, "read", key, tries, missing="key") from exc
            finally:
                if body is not None:
                    body.close()
            await asyncio.sleep(self.retry.wait_before(tries))

    async def stat(self, key: str) -> BlobInfo | None:
        """HEAD the object: its size, modification time, ETag (the version) and
        writer token, or ``None`` if there is none."""
        try:
            head = await self._call(
                "stat",
                key,
                lambda c: c.head_object(Bucket=self.bucket, Key=self._full_key(key)),
                missing="key",
            )
        except StoredObjectMissing:
            # A HEAD's 404 has no body: it may be the bucket that is missing.
            await self._call(
                "find", None, lambda c: c.head_bucket(Bucket=self.bucket), missing="bucket"
            )
            return None
        token = (head.get("Metadata") or {}).get(TOKEN_METADATA)
        return BlobInfo(
            key,
            int(head["ContentLength"]),
            _utc(head["LastModified"]),
            _etag(head.get("ETag")),
            str(token) if token is not None else None,
        )

    async def occupied(self, key: str, *, overwrite: bool = False) -> bool:
        """Whether an object is under ``key`` that a write may not replace (with
        ``overwrite``, nothing is: a PUT replaces any object)."""
        return not overwrite and await self.stat(key) is not None

    async def delete(self, key: str, *, version: Any = None) -> bool:
        """DeleteObject, with ``If-Match: <version>`` when the version is given.

        :returns: ``False`` when the object under the key has another version (or,
            with a version, is missing); else ``True`` (S3 does not say whether
            there was an object).
        """
        conditions = {} if version is None else {"IfMatch": f'"{version}"'}
        try:
            await self._call(
                "delete",
                key,
                lambda c: c.delete_object(
                    Bucket=self.bucket, Key=self._full_key(key), **conditions
                ),
            )
        except StorageError as exc:
            code, status = _error_code(exc.__cause__) if exc.__cause__ else (None, None)
            if version is not None and (
                isinstance(exc, KeyTaken) or code in _MISSING_KEY_CODES or status == 404
            ):
                return False  # another object is under the key now, or none
            raise
        return True

    def _changed(self, key: str, version: str) -> StoredObjectChanged:
        return StoredObjectChanged(
            f"Cannot read {self.url}{key}: the object under the key is not the version "
            f"(ETag {version}) its catalogue entry recorded; the key was reused, "
            "overwritten or restored since",
            storage=self.url,
            key=key,
        )

    async def presigned_get(
        self,
        key: str,
        *,
        expires: int,
        content_type: str | None = None,
        content_disposition: str | None = None,
        content_encoding: str | None = None,
    ) -> str:
        """A SigV4 presigned GET URL of the object under ``key``, valid ``expires`` seconds.

        No request is made: the URL is signed locally with the storage's
        credentials. The ``content_*`` values are sent back by S3 as the response's
        headers (``response-content-type``... query parameters, covered by the
        signature).

        :raises ValueError: ``expires`` is not between 1 second and 7 days.
        :raises StorageError: no credentials to sign with.
        """
        if isinstance(expires, bool) or not isinstance(expires, int):
            raise TypeError(f"expires must be an int of seconds, not {type(expires).__name__}")
        if not 0 < expires <= MAX_PRESIGN_SECONDS:
            raise ValueError(
                f"an S3 presigned URL lasts 1 second to 7 days ({MAX_PRESIGN_SECONDS} s), "
                f"not {expires} s; sign a shorter one, or configure S3Storage(public_url=...) "
                "for URLs that do not expire"
            )
        params: dict[str, str] = {"Bucket": self.bucket, "Key": self._full_key(key)}
        for name, value in (
            ("ResponseContentType", content_type),
            ("ResponseContentDisposition", content_disposition),
            ("ResponseContentEncoding", content_encoding),
        ):
            if value is not None:
                params[name] = value

        async def sign(client: Any) -> str:
            return str(
                await client.generate_presigned_url(
                    "get_object", Params=params, ExpiresIn=expires, HttpMethod="GET"
                )
            )

        return await self._call("presign", key, sign)

    def list(self) -> AsyncIterator[BlobInfo]:
        """Every object under the prefix (ListObjectsV2, page by page); keys relative to it.

        Pending multipart uploads are not objects, so they are not listed.
        """
        return self._list()

    async def _list(self) -> AsyncIterator[BlobInfo]:
        token: str | None = None
        while True:
            arguments: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.prefix}
            if token is not None:
                arguments["ContinuationToken"] = token

            async def page_of(client: Any, arguments: dict[str, Any] = arguments) -> Any:
                return await client.list_objects_v2(**arguments)

            page = await self._call("list", None, page_of)
            for entry in page.get("Contents", ()):
                key = entry["Key"][len(self.prefix) :]
                if key:
                    yield BlobInfo(
                        key, int(entry["Size"]), _utc(entry["LastModified"]),
                        _etag(entry.get("ETag")),
                    )
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return

    async def list_stale_uploads(
        self, older_than: datetime.datetime
    ) -> AsyncIterator[PendingUpload]:
        """Multipart uploads under the prefix started before ``older_than``.

        A writer that died (a crash, a killed process) leaves its multipart upload
        pending: its parts are stored and billed but no object is visible. The
        orphan sweep aborts those older than its grace with
        :meth:`abort_stale_upload`; the grace must exceed the longest upload.

        :raises ValueError: ``older_than`` has no timezone.
        :raises StorageError: as :meth:`list`.
        """
        if older_than.tzinfo is None or older_than.utcoffset() is None:
            raise ValueError("older_than must be timezone-aware (UTC)")
        markers: dict[str, str] = {}
        while True:
            arguments: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.prefix, **markers}

            async def page_of(client: Any, arguments: dict[str, Any] = arguments) -> Any:
                return await client.list_multipart_uploads(**arguments)

            page = await self._call("list uploads", None, page_of)
            for upload in page.get("Uploads", ()):
                started = _utc(upload["Initiated"])
                if started < older_than:
                    key = upload["Key"][len(self.prefix) :]
                    yield PendingUpload(key, str(upload["UploadId"]), started)
            if not page.get("IsTruncated"):
                return
            markers = {
                "KeyMarker": page.get("NextKeyMarker", ""),
                "UploadIdMarker": page.get("NextUploadIdMarker", ""),
            }

    async def abort_stale_upload(self, upload: PendingUpload) -> bool:
        """Abort a pending multipart upload found by :meth:`list_stale_uploads`.

        :returns: ``False`` if it was gone already (completed or aborted meanwhile).
        :raises StorageError: the abort failed (after retries).
        """
        full_key = self._full_key(upload.key)

        async def abort(client: Any) -> Any:
            return await client.abort_multipart_upload(
                Bucket=self.bucket, Key=full_key, UploadId=upload.upload_id
            )

        try:
            await self._call("abort upload", upload.key, abort)
        except StorageError as exc:
            if _cause_code(exc) == "NoSuchUpload":
                return False
            raise
        return True



def public_object_url(base_url: str, full_key: str) -> str:
    """``base_url`` joined with the object's key (each segment percent-encoded).

    For a bucket served publicly or through a CDN (``S3Storage(public_url=...)``):
    ``base_url`` addresses the bucket's root, so the key includes the prefix.
    """
    from urllib.parse import quote

    return base_url.rstrip("/") + "/" + quote(full_key, safe="/")


class PendingUpload(NamedTuple):
    """A multipart upload that was started and neither completed nor aborted."""

    #: The key it would have been stored under, relative to the prefix.
    key: str
    upload_id: str
    #: When it was started (UTC).
    initiated: datetime.datetime
    #: Not known without listing its parts; the sweep counts 0 bytes freed.
    size: int = 0


class _ShortBody(Exception):
    """A response body ended before the range did, without an error: resume."""


def _etag(value: Any) -> str | None:
    """An ETag without its quotes, or ``None``."""
    return str(value).strip('"') if value else None


def _total_size(content_range: str | None) -> int | None:
    """The object size in a ``Content-Range: bytes a-b/size`` header."""
    if not content_range or "/" not in content_range:
        return None
    total = content_range.rpartition("/")[2]
    return int(total) if total.isdigit() else None


def _utc(value: datetime.datetime) -> datetime.datetime:
    if value.tzinfo is None:
        return value.replace(tzinfo=datetime.timezone.utc)
    return value.astimezone(datetime.timezone.utc)


class _S3Writer:
    """One object being written: a PUT, or a multipart upload with one part in flight.

    :ivar key: the key the object will be stored under.
    :ivar version: the committed object's ETag, once committed.
    """

    def __init__(self, blobs: S3Blobs, key: str, token: str | None = None) -> None:
        self.key = key
        self.version: str | None = None
        #: After :meth:`abort`: whether nothing of this writer can appear under the
        #: key any more (``False``: a PUT's outcome is unknown).
        self.settled = True
        self._token = token or uuid.uuid4().hex
        self._blobs = blobs
        self._full_key = blobs._full_key(key)
        # Filled up to part_size, then handed to the upload as it is (a BytesIO
        # the client reads in small pieces, so the part is never copied).
        self._buffer = io.BytesIO()
        self._create: asyncio.Task[Any] | None = None
        self._in_flight: asyncio.Task[None] | None = None
        self._next_part = 1
        self._parts: list[dict[str, Any]] = []
        self._finish: asyncio.Task[None] | None = None
        self._state = "open"  # open, failed, committed, aborted

    def __repr__(self) -> str:
        return f"<S3 writer {self._blobs.url}{self.key} {self._state}>"

    def _check_open(self) -> None:
        if self._state == "committed":
            raise StorageError(
                f"The object {self._blobs.url}{self.key} is already committed; open a new writer.",
                storage=self._blobs.url,
                key=self.key,
            )
        if self._state == "aborted":
            raise StorageError(
                f"The writer of {self._blobs.url}{self.key} was aborted; open a new writer.",
                storage=self._blobs.url,
                key=self.key,
            )
        if self._state == "failed":
            raise StorageError(
                f"The writer of {self._blobs.url}{self.key} failed earlier; abort() it and "
                "write the object again.",
                storage=self._blobs.url,
                key=self.key,
            )

    async def write(self, data: bytes | memoryview) -> None:
        """Append ``data``; sends a part when ``part_size`` bytes are buffered.

        Waits for the previous part first, so at most one part is in flight.
        """
        self._check_open()
        try:
            view = memoryview(data)
            if view.itemsize != 1 or view.ndim != 1:
                view = view.cast("B")
            size = self._blobs.part_size
            while view:
                room = size - self._buffer.tell()
                self._buffer.write(view[:room])
                view = view[room:]
                if self._buffer.tell() >= size:
                    # The full buffer itself is the part: no copy.
                    part, self._buffer = self._buffer, io.BytesIO()
                    await self._send_part(part)
        except BaseException:
            self._state = "failed"
            raise

    async def _send_part(self, part: io.BytesIO) -> None:
        upload_id = await self._upload_id()
        await self._wait_in_flight()
        number = self._next_part
        if number > MAX_PARTS:
            raise StorageError(
                f"Cannot write {self._blobs.url}{self.key}: more than {MAX_PARTS} parts; "
                "use a larger part_size for objects this big.",
                storage=self._blobs.url,
                key=self.key,
            )
        self._next_part += 1
        self._in_flight = asyncio.ensure_future(self._upload_part(upload_id, number, part))

    async def _upload_id(self) -> str:
        if self._create is None:
            self._create = asyncio.ensure_future(
                self._blobs._call(
                    "start a multipart upload of",
                    self.key,
                    lambda c: c.create_multipart_upload(
                        Bucket=self._blobs.bucket,
                        Key=self._full_key,
                        Metadata={TOKEN_METADATA: self._token},
                    ),
                )
            )
        # Shielded: a cancelled caller must not lose the id of an upload that the
        # server created; abort() waits for it and aborts the upload.
        response: Any = await asyncio.shield(self._create)
        return str(response["UploadId"])

    async def _upload_part(self, upload_id: str, number: int, part: io.BytesIO) -> None:
        # No Content-MD5: botocore sends its own checksum of the body (CRC32, which
        # the server verifies), as for any client; an MD5 on top would cost the
        # event loop ~20 ms per 8 MiB part for nothing the guarantees need (the
        # object's identity is its writer's token, its version the ETag).

        async def upload(client: Any) -> Any:
            part.seek(0)  # a retry sends the part from its start
            return await client.upload_part(
                Bucket=self._blobs.bucket,
                Key=self._full_key,
                UploadId=upload_id,
                PartNumber=number,
                Body=part,
            )

        response = await self._blobs._call(f"upload part {number} of", self.key, upload)
        self._parts.append({"ETag": response["ETag"], "PartNumber": number})

    async def _wait_in_flight(self) -> None:
        if self._in_flight is not None:
            await self._in_flight
            self._in_flight = None

    async def commit(self, *, overwrite: bool = False) -> None:
        """Make the object visible: one PUT, or send the last part and complete the upload.

        :raises KeyTaken: ``overwrite`` is false and the key is taken; this writer's
            upload is aborted.
        """
        self._check_open()
        try:
            if self._create is None:
                body, self._buffer = self._buffer, io.BytesIO()
                self._finish = asyncio.ensure_future(self._put(body, overwrite))
            else:
                if self._buffer.tell():
                    last, self._buffer = self._buffer, io.BytesIO()
                    await self._send_part(last)
                await self._wait_in_flight()
                upload_id = await self._upload_id()
                self._finish = asyncio.ensure_future(self._complete(upload_id, overwrite))
            # Shielded: the reply says whether the object exists; abort() needs it.
            await asyncio.shield(self._finish)
        except KeyTaken:
            self._state = "aborted"  # _put wrote nothing, _complete aborted its upload
            raise
        except BaseException:
            self._state = "failed"
            raise
        self._state = "committed"

    def _precondition(self, overwrite: bool) -> dict[str, str]:
        return {} if overwrite else {"IfNoneMatch": "*"}

    async def _put(self, body: io.BytesIO, overwrite: bool) -> None:
        tries = 0

        async def put(client: Any) -> Any:
            nonlocal tries
            tries += 1
            body.seek(0)
            return await client.put_object(
                Bucket=self._blobs.bucket,
                Key=self._full_key,
                Body=body,
                Metadata={TOKEN_METADATA: self._token},
                **self._precondition(overwrite),
            )

        try:
            response = await self._blobs._call("write", self.key, put)
        except KeyTaken:
            # A lost reply to an earlier try that did create the object? Also on what
            # looks like the first try: the HTTP client itself sends a PUT again on a
            # connection that dropped, and the second one meets the first's object.
            if await self._is_ours():
                return
            raise
        self.version = _etag(response.get("ETag"))

    async def _complete(self, upload_id: str, overwrite: bool) -> None:
        parts = sorted(self._parts, key=lambda part: part["PartNumber"])
        tries = 0

        async def complete(client: Any) -> Any:
            nonlocal tries
            tries += 1
            return await client.complete_multipart_upload(
                Bucket=self._blobs.bucket,
                Key=self._full_key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
                **self._precondition(overwrite),
            )

        try:
            response = await self._blobs._call("complete the upload of", self.key, complete)
        except StorageError as exc:
            # Refused or unknown: an earlier try (ours, or the HTTP client's own
            # resend) may have completed it.
            if isinstance(exc, KeyTaken) or _cause_code(exc) == "NoSuchUpload":
                if await self._is_ours():
                    return
            if isinstance(exc, KeyTaken):
                await self._abort_upload(upload_id)
            raise
        self.version = _etag(response.get("ETag"))

    async def _is_ours(self) -> bool:
        """Whether the object under the key is this writer's (it carries its token);
        if so, :attr:`version` is set from it."""
        info = await self._blobs.stat(self.key)
        if info is None or not self._blobs.made_by(info, self._token):
            return False
        self.version = info.version
        return True

    async def _abort_upload(self, upload_id: str) -> bool:
        """AbortMultipartUpload; ``False`` if the server knows no such upload."""
        try:
            await self._blobs._call(
                "abort the upload of",
                self.key,
                lambda c: c.abort_multipart_upload(
                    Bucket=self._blobs.bucket, Key=self._full_key, UploadId=upload_id
                ),
            )
        except StorageError as exc:
            if _cause_code(exc) == "NoSuchUpload":
                return False
            raise
        return True

    async def abort(self) -> None:
        """Remove what this writer wrote: its multipart upload, or an object whose
        commit did not return (cancelled, or failed with an unknown outcome).

        Idempotent; a no-op after a commit that returned.
        """
        if self._state in ("committed", "aborted"):
            return
        self._buffer = io.BytesIO()
        # Unknown until proven otherwise (a PUT whose outcome is unknown may still
        # be applied later by the server).
        self.settled = False
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None:
            in_flight.cancel()  # its part goes with the upload
            await asyncio.gather(in_flight, return_exceptions=True)
        upload_id: str | None = None
        if self._create is not None:
            await asyncio.gather(self._create, return_exceptions=True)
            if not self._create.cancelled() and self._create.exception() is None:
                upload_id = str(self._create.result()["UploadId"])
        finish = self._finish
        if finish is not None:
            await asyncio.gather(finish, return_exceptions=True)
            error = None if finish.cancelled() else finish.exception()
            if isinstance(error, KeyTaken):
                self._state = "aborted"  # nothing of ours was created
                self.settled = True
                return
            if error is None and not finish.cancelled():
                # Committed, but commit() never returned to its caller.
                await self._delete_if_ours()
                self._state = "aborted"
                self.settled = True
                return
        if upload_id is not None:
            known = await self._abort_upload(upload_id)
            if not known and finish is not None:
                await self._delete_if_ours()  # the completion may have gone through
            # Aborted, a late completion cannot succeed; or it did, and is removed.
            self.settled = True
        elif finish is not None:
            await self._delete_if_ours()  # the PUT's outcome is unknown
            error = None if finish.cancelled() else finish.exception()
            # A refused PUT (403, a missing bucket...) wrote nothing. A PUT cut short
            # (cancelled, timed out, a reset connection, 5xx) may still be applied
            # after this HEAD: the key must stay reserved until the orphan sweep.
            self.settled = isinstance(error, StorageError) and not error.transient
        else:
            self.settled = True  # nothing was ever sent
        self._state = "aborted"

    async def _delete_if_ours(self) -> None:
        if await self._is_ours():
            await self._blobs.delete(self.key, version=self.version)
