"""The consistency check: report what is wrong, change nothing.

With ``verify=True`` a file passes or fails as
:func:`~asyncassets.storage.read.verify_file` (behind ``FileProxy.verify()``)
decides, but all the files of a batch are read in one streamed pass over their
chunks instead of one query per file. What to check against comes only from the
catalogue (:func:`~asyncassets.storage.catalogue.expected_digest`,
:func:`~asyncassets.storage.catalogue.compression_of`,
:func:`~asyncassets.storage.catalogue.original_sha256`), and compressed bytes are
inflated only by :func:`asyncassets.storage.codec.inflate`.

A catalogue of a directory or S3 storage has no chunks: each entry's object is
looked up (``stat``, a few at a time) for its presence and size, and with
``verify=True`` read through :func:`~asyncassets.storage.read.verify_file`
itself; the storage is listed for objects no entry names.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

from .. import _driver
from ..connection import get_db
from ..errors import ChecksumMissing, FileDeletedWhileReading, IntegrityError
from ..storage import GridFSStorage, Store
from ..storage.catalogue import (
    compression_of,
    expected_digest,
    new_hasher,
    original_length,
    original_sha256,
)
from ..storage.codec import GzipError, inflate
from ..storage.gridfs import GridBucket
from ..storage.gridfs.spec import is_int
from ..storage.objects.store import ObjectStore, location_key, location_version
from ..storage.queued import QueuedStore, copy_of
from ..storage.read import verify_file
from .lookup import (
    _CURSOR_BATCH,
    _ENTRY_MARKS,
    _SIZE_OF_DATA,
    DEFAULT_BATCH_SIZE,
    _batches,
    _bounded,
    _close,
    _existing,
    _hashable,
    _named_keys,
    _orphaned_chunk_groups,
    _positive,
    _referenced_files,
    _values,
    queued_local_chunks,
)
from .reports import (
    DEFAULT_MAX_IDS,
    BucketFile,
    CheckReport,
    ChunkProblem,
    DanglingReference,
    FailedTransfer,
    ObjectProblem,
    OrphanedChunks,
    StoredObject,
    _keep,
)
from .resumable import live_upload_files
from .scope import (
    _aliases_in_scope,
    _buckets_in,
    _plan,
    _prune,
    _same_db,
    _Sharer,
    _Source,
    _Target,
    _Work,
)
from .sweep import GRIDFS_FILES

__all__ = ["check"]

#: How many bytes of chunk data one ``check(verify=True)`` cursor batch may hold.
_VERIFY_BUFFER = 8 * 1024 * 1024
#: What an object-storage entry's inspection may find wrong, and where it counts.
_PROBLEMS = {
    "missing": "missing_objects",
    "size": "wrong_size_objects",
    "changed": "changed_objects",
    "invalid": "invalid_entries",
}


def _count_problem(report: CheckReport, status: str) -> None:
    counter = _PROBLEMS[status]
    setattr(report, counter, getattr(report, counter) + 1)


async def check(
    verify: bool = False,
    buckets: Iterable[str] | str | None = None,
    alias: str | None = None,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_ids: int | None = DEFAULT_MAX_IDS,
) -> CheckReport:
    """Report inconsistencies between documents, files and chunks; change nothing.

    It finds:

    * dangling references: stored documents pointing at a missing file (document
      class, id, field path such as ``photos.2`` or ``items.0.scan``, file id);
    * orphaned files: files no document of a registered class references, whatever
      their age (:func:`~asyncassets.ops.sweep_orphans` deletes those older than its grace period);
      not the file a resumable upload's finish is attaching;
    * orphaned chunks: chunks whose files document is missing;
    * files with missing, short, oversized or extra chunks;
    * for a directory or S3 storage (the fields' :class:`~asyncassets.storage.Storage`):
      catalogue entries whose object is missing or not of their length, entries
      naming no object, and stored objects that no catalogue entry names
      (orphaned objects, whatever their age);
    * with ``verify=True``, checksum mismatches, decided as
      :func:`~asyncassets.storage.read.verify_file` (and so ``FileProxy.verify()``)
      decides: the stored bytes must match ``metadata.sha256``, or, for a legacy
      file without it, the GridFS ``md5`` older drivers wrote; a compressed file
      must also inflate to the original's recorded length and SHA-256. Files with
      no checksum recorded at all are counted as ``unverifiable``, not as
      mismatches. This reads every byte, streamed.

    With ``buckets=None`` it checks the buckets registered classes declare, plus
    every other bucket found in the connected databases ("unclaimed": their chunks
    and checksums are checked, but not whether anything references their files).
    Entries of an unclaimed catalogue that name a stored object belong to a
    directory or S3 storage no class declares: they are counted as
    ``unchecked_entries``, not checked.

    :param verify: also verify every file's bytes (reads all file data).
    :param buckets: bucket names to check; a bucket named here is treated as
        declared: its unreferenced files are reported as orphans.
    :param alias: check only the buckets of this connection alias.
    :param batch_size: ids per lookup (the length of ``$in`` lists).
    :param max_ids: cap on the entries each report list keeps (``None``: no cap).
    :raises ConnectionNotRegistered: ``alias`` is not connected, or a class keeping
        references to a checked bucket uses an alias that is not connected.
    :raises TypeError, ValueError: a bad ``buckets``, ``batch_size`` or ``max_ids``;
        ``ValueError`` too when two fields declare different storages for one catalogue.
    :raises pymongo.errors.PyMongoError: if the server fails.
    :raises StorageError: a directory or S3 storage failed (after its retries).
    """
    _positive("batch_size", batch_size)
    _positive("max_ids", max_ids, optional=True)
    started = time.monotonic()
    targets, names = _plan(buckets, alias)
    report = CheckReport(verify=verify)
    targets = await _prune(targets)
    work: list[tuple[_Target, _Work, bool]] = [
        (target, w, True) for target, w in sorted(targets.items())
    ]
    if names is None:
        seen: list[str] = []
        for db_alias in _aliases_in_scope(alias):
            if any(_same_db(db_alias, other) for other in seen):
                continue  # the same database as an alias already listed
            seen.append(db_alias)
            for name in await _buckets_in(db_alias):
                if not any(t[1] == name and _same_db(t[0], db_alias) for t in targets):
                    unclaimed = _Work([], [], GridFSStorage(name), [])
                    work.append(((db_alias, name), unclaimed, False))
                    report.unclaimed_buckets.append(f"{db_alias}:{name}")
    for (bucket_alias, name), w, claimed in work:
        label = f"{bucket_alias}:{name}"
        report.buckets.append(label)
        report.storages[label] = w.storage.url
        store = w.storage.bind(get_db(bucket_alias))
        await _check_files(store, bucket_alias, w.judge, claimed, verify, batch_size, max_ids,
                           report)
        if isinstance(store, ObjectStore):
            await _check_orphaned_objects(store, bucket_alias, w.sharers, batch_size,
                                          max_ids, report)
        elif isinstance(store, GridBucket):
            await _check_gridfs(store, bucket_alias, claimed, batch_size, max_ids, report)
        elif isinstance(store, QueuedStore):
            await _check_queued_leftovers(store, bucket_alias, w, batch_size, max_ids, report)
        if claimed:
            await _check_references(store, bucket_alias, w.own, batch_size, max_ids, report)
    report.duration = time.monotonic() - started
    return report


async def _check_gridfs(
    bucket: GridBucket,
    alias: str,
    claimed: bool,
    batch_size: int,
    max_ids: int | None,
    report: CheckReport,
) -> None:
    name = bucket.name
    if not claimed:
        # Entries of a directory or S3 storage that no class declares: no chunks to
        # check them against, and where their objects are is unknown.
        report.unchecked_entries += await bucket.files.count_documents(
            {"location": {"$exists": True}}
        )
    else:
        # Entries naming a stored object in a bucket its fields declare as GridFS
        # (the fields' storage changed): GridFS cannot read them.
        cursor = bucket.files.find(
            {"location": {"$exists": True}}, {"_id": 1, "location": 1},
            batch_size=_CURSOR_BATCH,
        )
        try:
            async for doc in cursor:
                report.invalid_entries += 1
                item = ObjectProblem(
                    alias, name, doc.get("_id"), location_key(doc), "invalid",
                    f"its catalogue entry names a stored object ({doc.get('location')!r}), "
                    "but the fields of this catalogue declare GridFS",
                )
                if _keep(report.object_problems, item, max_ids):
                    report.truncated = True
        finally:
            await _close(cursor)
    async for groups in _orphaned_chunk_groups(bucket, batch_size):
        # An open resumable upload's chunks wait for their files document.
        live = await live_upload_files(bucket.db, bucket.name, [g["_id"] for g in groups])
        for group in groups:
            if _hashable(group["_id"]) and group["_id"] in live:
                continue
            chunks, size = int(group["chunks"]), max(int(group.get("bytes") or 0), 0)
            report.orphaned_chunks += chunks
            orphans = OrphanedChunks(alias, name, group["_id"], chunks, size)
            if _keep(report.orphaned_chunk_groups, orphans, max_ids):
                report.truncated = True


async def _check_files(
    bucket: Store,
    alias: str,
    sources: list[_Source],
    claimed: bool,
    verify: bool,
    batch_size: int,
    max_ids: int | None,
    report: CheckReport,
) -> None:
    projection = {"_id": 1, "length": 1, "chunkSize": 1, **_ENTRY_MARKS}
    if verify:
        # What the catalogue needs to say what a file is checked against.
        projection.update({"md5": 1, "metadata.sha256": 1, "metadata.sha256_parts": 1,
                           "metadata.compression": 1})
    query: dict[str, Any] = GRIDFS_FILES
    if isinstance(bucket, QueuedStore):
        projection.update({"location": 1, "uploadDate": 1, "filename": 1, "local": 1,
                           "remote": 1, "transfer": 1, "metadata.sha256": 1})
        query = {}
    elif isinstance(bucket, ObjectStore):
        # What names the object, and what tells one upload from another under the
        # same _id (a read that finds the object gone compares them).
        projection.update({"location": 1, "uploadDate": 1, "filename": 1})
        query = {}
    cursor = bucket.files.find(query, projection, batch_size=max(batch_size, _CURSOR_BATCH))
    async for batch in _batches(cursor, batch_size):
        report.files += len(batch)
        if claimed:
            # A resumable upload's file between its finish's entry and its switch is
            # the upload's (looked up first: the session is done after the switch).
            uploading: set[Any] = set()
            if isinstance(bucket, (GridBucket, ObjectStore)):
                uploading = await live_upload_files(
                    bucket.db, bucket.name, [doc["_id"] for doc in batch]
                )
            referenced, _ = await _referenced_files(bucket, sources, batch)
            for doc in batch:
                if not (_hashable(doc["_id"]) and (
                    doc["_id"] in referenced or doc["_id"] in uploading
                )):
                    report.orphaned_files += 1
                    item = BucketFile(alias, bucket.name, doc["_id"])
                    if _keep(report.orphaned_file_ids, item, max_ids):
                        report.truncated = True
        if isinstance(bucket, GridBucket):
            await _check_chunks(bucket, alias, batch, verify, max_ids, report)
        elif isinstance(bucket, ObjectStore):
            await _check_objects(bucket, alias, batch, verify, max_ids, report)
        elif isinstance(bucket, QueuedStore):
            await _check_queued(bucket, alias, batch, verify, max_ids, report)


async def _check_queued(
    store: QueuedStore,
    alias: str,
    batch: list[dict[str, Any]],
    verify: bool,
    max_ids: int | None,
    report: CheckReport,
) -> None:
    """A queued catalogue's entries: their transfer state, and each copy they name
    (a GridFS local copy's chunks, a directory's or the remote's object by size;
    with ``verify``, the served copy's bytes)."""
    gridfs_local: list[dict[str, Any]] = []
    for doc in batch:
        transfer: dict[str, Any] = doc.get("transfer") or {}
        state = transfer.get("state")
        if state == "failed":
            report.failed_transfers += 1
            failed = FailedTransfer(alias, store.name, doc["_id"],
                                    int(transfer.get("attempts") or 0),
                                    str(transfer.get("error") or "unknown"))
            if _keep(report.failed_transfer_list, failed, max_ids):
                report.truncated = True
        elif state in ("pending", "held", "running"):
            report.queued_files += 1
        if doc.get("local") == "gridfs":
            gridfs_local.append(doc)
    if gridfs_local and isinstance(store.local, GridBucket):
        await _check_chunks(store.local, alias, gridfs_local, False, max_ids, report)

    async def inspect(doc: dict[str, Any]) -> list[tuple[str, str | None, str | None]]:
        return await _inspect_queued(store, doc, verify)

    for doc, found in zip(batch, await _bounded(batch, inspect), strict=True):
        for status, detail, key in found:
            if status in _PROBLEMS:
                _count_problem(report, status)
                item = ObjectProblem(alias, store.name, doc["_id"], key, status,
                                     detail or status)
                if _keep(report.object_problems, item, max_ids):
                    report.truncated = True
            elif status == "unverifiable":
                report.unverifiable += 1
            elif status in ("ok", "mismatch"):
                report.verified += 1
                if status == "mismatch":
                    report.checksum_mismatches += 1
                    if _keep(report.mismatched_files,
                             BucketFile(alias, store.name, doc["_id"]), max_ids):
                        report.truncated = True


async def _inspect_queued(
    store: QueuedStore, doc: dict[str, Any], verify: bool
) -> list[tuple[str, str | None, str | None]]:
    """``(status, detail, key)`` for each copy of one queued entry, as
    :func:`_inspect_object` says them; a copy that changed meanwhile says nothing."""
    found: list[tuple[str, str | None, str | None]] = []
    if copy_of(doc) is None:
        return [("invalid", "its catalogue entry names neither a local nor a remote copy",
                 None)]
    length: Any = doc.get("length")
    if not is_int(length) or length < 0:
        return [("invalid", f"its catalogue entry has no valid length ({length!r})", None)]
    copies: list[tuple[ObjectStore, str, Any]] = []
    if doc.get("local") == "filesystem" and isinstance(store.local, ObjectStore):
        key = location_key(doc)
        if key is None:
            return [("invalid", "its catalogue entry names no local object "
                     f"({doc.get('location')!r})", None)]
        copies.append((store.local, key, location_version(doc)))
    remote = doc.get("remote")
    if isinstance(remote, dict) and isinstance(remote.get("key"), str):
        copies.append((store.remote, remote["key"], remote.get("version")))
    for side, key, version in copies:
        info = await side.blobs.stat(key)
        if info is not None and info.size == length and (
            version is None or info.version == version
        ):
            continue
        current = await store.find(doc["_id"])
        if current is None or any(current.get(k) != doc.get(k)
                                  for k in ("length", "uploadDate", "location", "remote")):
            return []  # deleted, replaced or switched meanwhile
        which = "remote" if side is store.remote else "local"
        if info is None:
            found.append(("missing", f"no {which} object under its key {key!r} in {side.url}",
                          key))
        elif info.size != length:
            found.append(("size", f"its {which} object {key!r} is {info.size} bytes, the "
                          f"catalogue entry says {length}", key))
        else:
            found.append(("changed", f"its {which} object {key!r} is of version "
                          f"{info.version!r}, not the {version!r} its entry recorded", key))
    if verify and not found:
        try:
            await verify_file(store, doc)
        except ChecksumMissing:
            found.append(("unverifiable", None, None))
        except FileDeletedWhileReading:
            return []
        except IntegrityError as exc:
            found.append(("mismatch", str(exc), None))
        else:
            found.append(("ok", None, None))
    return found


async def _check_queued_leftovers(
    store: QueuedStore,
    alias: str,
    work: _Work,
    batch_size: int,
    max_ids: int | None,
    report: CheckReport,
) -> None:
    """What no entry of a queued catalogue names: local chunks or objects, and
    remote objects (the sweep removes them once older than its grace period)."""
    chunks = queued_local_chunks(store)
    if chunks is not None:
        async for groups in _orphaned_chunk_groups(chunks, batch_size):
            for group in groups:
                count, size = int(group["chunks"]), max(int(group.get("bytes") or 0), 0)
                report.orphaned_chunks += count
                orphans = OrphanedChunks(alias, store.name, group["_id"], count, size)
                if _keep(report.orphaned_chunk_groups, orphans, max_ids):
                    report.truncated = True
    elif isinstance(store.local, ObjectStore):
        await _check_orphaned_objects(store.local, alias, work.sharers, batch_size, max_ids,
                                      report)
    await _check_orphaned_objects(store.remote, alias, work.remote_sharers, batch_size,
                                  max_ids, report)


async def _check_objects(
    store: ObjectStore,
    alias: str,
    batch: list[dict[str, Any]],
    verify: bool,
    max_ids: int | None,
    report: CheckReport,
) -> None:
    """Whether each entry's object is there with its length (and, with ``verify``,
    its checksum), a few objects at a time."""

    async def inspect(doc: dict[str, Any]) -> tuple[dict[str, Any], str, str | None]:
        return (doc, *await _inspect_object(store, doc, verify))

    for doc, status, detail in await _bounded(batch, inspect):
        if status in _PROBLEMS:
            _count_problem(report, status)
            item = ObjectProblem(alias, store.name, doc["_id"], location_key(doc), status,
                                 detail or status)
            if _keep(report.object_problems, item, max_ids):
                report.truncated = True
        elif status == "unverifiable":
            report.unverifiable += 1
        elif status in ("ok", "mismatch"):
            report.verified += 1
            if status == "mismatch":
                report.checksum_mismatches += 1
                if _keep(report.mismatched_files, BucketFile(alias, store.name, doc["_id"]),
                         max_ids):
                    report.truncated = True


async def _inspect_object(
    store: ObjectStore, doc: dict[str, Any], verify: bool
) -> tuple[str, str | None]:
    """``(status, detail)`` of one entry: ``"invalid"``, ``"missing"``, ``"size"``,
    ``"present"`` (not verified), ``"ok"``, ``"mismatch"``, ``"unverifiable"``, or
    ``"gone"`` (deleted or replaced while it was checked: nothing to say)."""
    key = location_key(doc)
    length: Any = doc.get("length")
    if key is None:
        return "invalid", f"its catalogue entry names no stored object ({doc.get('location')!r})"
    if not is_int(length) or length < 0:
        return "invalid", f"its catalogue entry has no valid length ({length!r})"
    info = await store.blobs.stat(key)
    version = location_version(doc)
    if info is None or info.size != length or (version is not None and info.version != version):
        if await _changed(store, doc):
            return "gone", None
        if info is None:
            return "missing", f"no object under its key {key!r} in {store.url}"
        if info.size != length:
            return "size", (
                f"its object {key!r} is {info.size} bytes, the catalogue entry says {length}"
            )
        return "changed", (
            f"its object {key!r} is of version {info.version!r}, not the {version!r} its "
            "upload recorded: it was replaced or restored behind the catalogue's back"
        )
    if not verify:
        return "present", None
    try:
        await verify_file(store, doc)
    except ChecksumMissing:
        return "unverifiable", None
    except FileDeletedWhileReading:
        return "gone", None
    except IntegrityError as exc:
        return "mismatch", str(exc)
    return "ok", None


async def _changed(store: ObjectStore, doc: dict[str, Any]) -> bool:
    """Whether the entry was deleted, or replaced by another upload, since it was read
    (a delete removes the entry first, then the object)."""
    current = await store.find(doc["_id"])
    return current is None or any(
        current.get(k) != doc.get(k) for k in ("length", "uploadDate", "location")
    )


async def _check_orphaned_objects(
    store: ObjectStore,
    alias: str,
    sharers: list[_Sharer],
    batch_size: int,
    max_ids: int | None,
    report: CheckReport,
) -> None:
    async for batch in _batches(store.blobs.list(), batch_size):
        named = await _named_keys(sharers, [info.key for info in batch])
        for info in batch:
            if info.key in named:
                continue
            report.orphaned_objects += 1
            item = StoredObject(alias, store.name, info.key, info.size)
            if _keep(report.orphaned_object_keys, item, max_ids):
                report.truncated = True


class _Digests:
    """One file's bytes hashed as they stream past, and the verdict on them.

    It checks what :func:`~asyncassets.storage.read.verify_file` checks, asking the
    same catalogue: the stored bytes against
    :func:`~asyncassets.storage.catalogue.expected_digest` (``metadata.sha256``,
    else a legacy ``md5``); for a compressed file with an original SHA-256, the
    bytes :func:`~asyncassets.storage.codec.inflate` makes of them against the
    original's length and SHA-256.
    """

    def __init__(self, doc: dict[str, Any]) -> None:
        self.stored = expected_digest(doc)
        self.stored_hash = new_hasher(self.stored[0]) if self.stored else None
        info = compression_of(doc)
        self.original = original_sha256(doc) if info and info.get("sha256") else None
        self.original_hash = hashlib.sha256() if self.original else None
        self.original_length: int | None = None
        if self.original_hash is not None:
            try:
                self.original_length = original_length(doc)
            except (KeyError, TypeError, ValueError):
                pass  # no usable length recorded: nothing inflates to it
        self.inflated = 0
        self.inflate_error: str | None = None
        #: Whether :meth:`feed` ran (a compressed file without chunks never reaches it).
        self.fed = False

    @property
    def inflates(self) -> bool:
        """Whether the stored bytes must also be inflated and checked."""
        return self.original_hash is not None

    def update(self, piece: bytes) -> None:
        """Hash the next stored piece (a file that is not inflated)."""
        if self.stored_hash is not None:
            self.stored_hash.update(piece)

    async def feed(self, stored: AsyncIterator[bytes]) -> None:
        """Hash every stored piece and, for a compressed file, what they inflate to."""
        self.fed = True
        pieces = self._hash_stored(stored)
        if self.original_hash is not None:
            try:
                async for piece in inflate(pieces):
                    self.original_hash.update(piece)
                    self.inflated += len(piece)
            except GzipError as exc:
                self.inflate_error = str(exc)
        async for _piece in pieces:  # what inflating left unread
            pass

    async def _hash_stored(self, stored: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for piece in stored:
            self.update(piece)
            yield piece

    def verdict(self) -> bool | None:
        """``True`` if the bytes match, ``False`` if not, ``None`` if there is
        nothing recorded to check against (``verify_file`` raises
        ``ChecksumMissing`` then)."""
        if self.stored is None and self.original_hash is None:
            return None
        if self.stored_hash is not None and self.stored is not None:
            if self.stored_hash.hexdigest() != self.stored[1]:
                return False
        if self.original_hash is not None:
            return (
                self.inflate_error is None
                and self.inflated == self.original_length
                and self.original_hash.hexdigest() == self.original
            )
        return True


class _ChunkTally:
    """Compares one file's chunks, fed in ``n`` order, with its files document."""

    def __init__(self, doc: dict[str, Any], verify: bool) -> None:
        length: Any = doc.get("length")
        chunk_size: Any = doc.get("chunkSize")
        self.invalid: str | None = None
        self.length, self.chunk_size = 0, 1
        if not is_int(length) or length < 0:
            self.invalid = f"its files document has no valid length ({length!r})"
        elif not is_int(chunk_size) or chunk_size <= 0:
            self.invalid = f"its files document has no valid chunkSize ({chunk_size!r})"
        else:
            self.length, self.chunk_size = length, chunk_size
        self.nchunks = -(-self.length // self.chunk_size)
        self.next_n = 0
        self.missing: list[int] = []
        self.short = self.oversized = self.extra = 0
        self.digests = _Digests(doc) if verify and self.invalid is None else None

    @property
    def intact(self) -> bool:
        """Whether every chunk so far was where it belongs, with the right size."""
        return self.invalid is None and not (
            self.missing or self.short or self.oversized or self.extra
        )

    def add(self, n: Any, size: Any) -> bool:
        """Count one chunk; return whether it is the next one, of the right size."""
        if not is_int(n) or n < self.next_n or n >= self.nchunks:
            self.extra += 1  # beyond the end, a duplicate, or no valid n at all
            return False
        if n > self.next_n:
            self.missing.extend(range(self.next_n, n))
        self.next_n = n + 1
        last = self.length - (self.nchunks - 1) * self.chunk_size
        expected = self.chunk_size if n < self.nchunks - 1 else last
        if not is_int(size) or size < expected:
            self.short += 1
            return False
        if size > expected:
            self.oversized += 1
            return False
        return True

    def take(self, chunk: dict[str, Any]) -> bytes | None:
        """Count one chunk; return its data if it is to be hashed.

        Once a chunk is missing or misshapen the bytes are known to be wrong (the
        file is reported as corrupt instead), so nothing more is hashed.
        """
        in_place = self.add(chunk.get("n"), chunk.get("size"))
        data = chunk.get("data")
        if in_place and self.intact and self.digests is not None and isinstance(data, bytes):
            return data
        return None

    async def data(self, chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
        """:meth:`take` every chunk of ``chunks``, yielding the data to hash."""
        async for chunk in chunks:
            data = self.take(chunk)
            if data is not None:
                yield data

    def finish(self) -> str | None:
        """Describe what is wrong, or return ``None`` if the chunks are right."""
        if self.next_n < self.nchunks:
            self.missing.extend(range(self.next_n, self.nchunks))
        if self.invalid is not None:
            return self.invalid
        parts = []
        if self.missing:
            shown = ", ".join(str(n) for n in self.missing[:5])
            more = ", ..." if len(self.missing) > 5 else ""
            parts.append(f"{len(self.missing)} missing chunk(s) (n={shown}{more})")
        if self.short:
            parts.append(f"{self.short} short chunk(s)")
        if self.oversized:
            parts.append(f"{self.oversized} oversized chunk(s)")
        if self.extra:
            parts.append(f"{self.extra} extra chunk(s)")
        if parts:
            return (
                f"{', '.join(parts)}; expected {self.nchunks} of {self.chunk_size} bytes "
                f"for {self.length} bytes"
            )
        return None


async def _nothing() -> AsyncIterator[bytes]:
    return
    yield  # pragma: no cover - makes this an (empty) async generator


class _SortedChunks:
    """Chunks sorted by ``files_id`` then ``n``, taken one file at a time."""

    def __init__(self, chunks: AsyncIterator[dict[str, Any]]) -> None:
        self._chunks = chunks
        self._head: dict[str, Any] | None = None
        self._ended = False

    async def peek(self) -> dict[str, Any] | None:
        """The next chunk, left in the stream; ``None`` at the end."""
        if self._head is None and not self._ended:
            try:
                self._head = await anext(self._chunks)
            except StopAsyncIteration:
                self._ended = True
        return self._head

    def drop(self) -> None:
        """Take the chunk :meth:`peek` returned out of the stream."""
        self._head = None

    async def next_file(self) -> AsyncIterator[dict[str, Any]]:
        """Yield the next chunk and those after it with the same ``files_id``."""
        first = await self.peek()
        if first is None:
            return
        self._head = None
        yield first
        files_id = first.get("files_id")
        while (chunk := await self.peek()) is not None and chunk.get("files_id") == files_id:
            self._head = None
            yield chunk


async def _check_chunks(
    bucket: GridBucket,
    alias: str,
    batch: list[dict[str, Any]],
    verify: bool,
    max_ids: int | None,
    report: CheckReport,
) -> None:
    tallies: dict[Any, _ChunkTally] = {}
    for doc in batch:
        if _hashable(doc["_id"]):
            tallies[doc["_id"]] = _ChunkTally(doc, verify)
    projection: dict[str, Any] = {"_id": 0, "files_id": 1, "n": 1, "size": _SIZE_OF_DATA}
    cursor_batch = _CURSOR_BATCH
    if verify:
        projection["data"] = 1
        biggest = max((t.chunk_size for t in tallies.values()), default=1)
        cursor_batch = max(1, _VERIFY_BUFFER // biggest)
    chunks = _driver.aggregate(
        bucket.chunks,
        [
            {"$match": {"files_id": {"$in": list(tallies)}}},
            {"$sort": {"files_id": 1, "n": 1}},
            {"$project": projection},
        ],
        allowDiskUse=True,
        batchSize=cursor_batch,
    )
    stream = _SortedChunks(chunks)
    try:
        while (head := await stream.peek()) is not None:
            files_id = head.get("files_id")
            tally = tallies.get(files_id) if _hashable(files_id) else None
            digests = tally.digests if tally is not None else None
            if tally is not None and digests is not None and digests.inflates:
                # The codec pulls this file's chunks from the stream as it inflates.
                await digests.feed(tally.data(stream.next_file()))
                continue
            stream.drop()
            if tally is not None:
                data = tally.take(head)
                if data is not None and digests is not None:
                    digests.update(data)
    finally:
        closer = getattr(chunks, "aclose", None)
        if closer is not None:
            await closer()
    for tally in tallies.values():
        if tally.digests is not None and tally.digests.inflates and not tally.digests.fed:
            await tally.digests.feed(_nothing())  # no chunks: inflate nothing, as a read would
    for file_id, tally in tallies.items():
        problem = tally.finish()
        if problem is not None:
            report.corrupt_files += 1
            item = ChunkProblem(
                alias, bucket.name, file_id, len(tally.missing), tally.short, tally.oversized,
                tally.extra, problem,
            )
            if _keep(report.chunk_problems, item, max_ids):
                report.truncated = True
            continue
        if tally.digests is None:
            continue
        verdict = tally.digests.verdict()
        if verdict is None:
            report.unverifiable += 1
            continue
        report.verified += 1
        if not verdict:
            report.checksum_mismatches += 1
            if _keep(report.mismatched_files, BucketFile(alias, bucket.name, file_id), max_ids):
                report.truncated = True


async def _check_references(
    bucket: Store,
    alias: str,
    sources: list[_Source],
    batch_size: int,
    max_ids: int | None,
    report: CheckReport,
) -> None:
    for source in sources:
        collection = _driver.acknowledged(get_db(source.alias)[source.collection])
        pending: list[tuple[str, Any, str, Any]] = []
        cursor = collection.find(
            {source.dotted: {"$exists": True}},
            {source.dotted: 1, "_cls": 1},
            batch_size=max(batch_size, _CURSOR_BATCH),
        )
        try:
            async for doc in cursor:
                cls = doc.get("_cls") if isinstance(doc.get("_cls"), str) else source.classes[0]
                for path, file_id in _values(doc, source.segments):
                    report.references += 1
                    pending.append((cls, doc.get("_id"), path, file_id))
                if len(pending) >= batch_size:
                    await _flush_references(bucket, alias, collection, source, pending,
                                            max_ids, report)
                    pending = []
        finally:
            await _close(cursor)
        if pending:
            await _flush_references(bucket, alias, collection, source, pending, max_ids, report)


async def _flush_references(
    bucket: Store,
    alias: str,
    collection: Any,
    source: _Source,
    pending: list[tuple[str, Any, str, Any]],
    max_ids: int | None,
    report: CheckReport,
) -> None:
    ids = list({file_id for _, _, _, file_id in pending if _hashable(file_id)})
    existing = await _existing(bucket, ids)
    for cls, doc_id, path, file_id in pending:
        if _hashable(file_id) and file_id in existing:
            continue
        # Documents may have moved on since they were read (replace() drops the old
        # file once the document points at the new one): confirm before reporting.
        query = {"_id": doc_id, ".".join(p for p in path.split(".") if not p.isdigit()): file_id}
        if source.queryable and await collection.find_one(query, {"_id": 1}) is None:
            continue
        if await bucket.find(file_id) is not None:
            continue
        report.dangling += 1
        item = DanglingReference(cls, doc_id, path, alias, bucket.name, file_id)
        if _keep(report.dangling_references, item, max_ids):
            report.truncated = True


