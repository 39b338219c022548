"""The orphan sweep: delete files no document references, and what uploads left behind.

GridFS: headless chunks. Directory and S3 storages: objects no catalogue entry
names, temp files of dead filesystem writers, stale S3 multipart uploads.
"""

from __future__ import annotations

import datetime as dt
import secrets
import time
from collections.abc import Iterable
from typing import Any

from bson import ObjectId

from ..connection import get_db
from ..storage import Store
from ..storage.gridfs import GridBucket
from ..storage.objects.blobs import BlobInfo
from ..storage.objects.store import ObjectStore
from ..storage.queued import QueuedStore
from .direct_sweep import live_direct_uploads, sweep_direct_sessions
from .lookup import (
    _CURSOR_BATCH,
    _ENTRY_MARKS,
    _UTC,
    DEFAULT_BATCH_SIZE,
    _batches,
    _bounded,
    _existing,
    _file_time,
    _hashable,
    _named_keys,
    _orphaned_chunk_groups,
    _positive,
    _referenced_files,
    blob_time,
    oid_time,
    queued_local_chunks,
)
from .reports import (
    DEFAULT_MAX_IDS,
    BucketFile,
    OrphanedChunks,
    StoredObject,
    SweepReport,
    _keep,
)
from .resumable import live_in_store, live_upload_files, sweep_resumable
from .scope import _plan, _prune, _Sharer, _Source, _Work

__all__ = ["sweep_orphans"]


async def sweep_orphans(
    grace: dt.timedelta | float = dt.timedelta(days=1),
    dry_run: bool = False,
    buckets: Iterable[str] | str | None = None,
    alias: str | None = None,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_ids: int | None = DEFAULT_MAX_IDS,
) -> SweepReport:
    """Delete files no document references, and what interrupted uploads left behind.

    A file is deleted when no document of any registered
    :class:`~asyncassets.document.Document` class references it, wherever the
    reference sits (top-level, embedded, list or dict fields; several fields or
    classes may share a bucket), and it is older than ``grace``: its
    ``uploadDate`` (else the time in its ObjectId ``_id``) is before now minus
    ``grace``. The grace period protects uploads whose document is not saved yet.

    Chunks without a files document are deleted when their newest chunk was written
    before the cutoff (the time in the chunk's ObjectId ``_id``; else the time in an
    ObjectId ``files_id``; data with neither time counts as old). ``grace`` must
    exceed the longest pause inside one streaming upload.

    For a catalogue of a directory or S3 storage (the fields'
    :class:`~asyncassets.storage.Storage`), an unreferenced file is deleted through
    its store (catalogue entry first, then the object), and the storage is listed:
    objects that no catalogue entry names and that were last written before the
    cutoff are deleted (an upload commits its object before it inserts the entry:
    the grace period protects that moment), and so are temp files of filesystem
    writers untouched since the cutoff and S3 multipart uploads started before it,
    when the backend can list them. An object is kept while any declared
    catalogue keeping objects in the same place names it.

    Resumable (tus) uploads past their expiry are deleted with their staged
    bytes, on every storage (:func:`~asyncassets.ops.resumable.sweep_resumable`);
    a live upload's bytes are staged apart from the catalogue's and never count
    as orphans.

    References are re-read for each batch of candidate files right before deleting
    them, and a file's files document is deleted before its chunks (or object), so
    an interrupted sweep leaves only orphaned chunks or objects, which the next
    sweep removes.

    :param grace: a :class:`~datetime.timedelta` or a number of seconds.
    :param dry_run: report what would be deleted; delete nothing.
    :param buckets: bucket names to sweep; ``None``: every bucket that registered
        classes declare. A bucket named here that no class declares is swept too:
        every file in it counts as unreferenced.
    :param alias: sweep only the buckets of this connection alias. With explicit
        ``buckets`` and no ``alias``, undeclared buckets are looked up on
        ``"default"``.
    :param batch_size: ids per lookup or delete (the length of ``$in`` lists).
    :param max_ids: cap on the ids the report lists (``None``: no cap).
    :raises ConnectionNotRegistered: ``alias`` is not connected, or a class keeping
        references to a swept bucket uses an alias that is not connected (the sweep
        could not see its references, so it deletes nothing).
    :raises TypeError, ValueError: a bad ``grace``, ``buckets``, ``batch_size``;
        ``ValueError`` too when two fields declare different storages for one
        catalogue (nothing is deleted).
    :raises pymongo.errors.PyMongoError: if the server fails.
    :raises StorageError: a directory or S3 storage failed (after its retries).
    """
    grace_td = _grace(grace)
    _positive("batch_size", batch_size)
    _positive("max_ids", max_ids, optional=True)
    started = time.monotonic()
    cutoff = dt.datetime.now(_UTC) - grace_td
    targets, _ = _plan(buckets, alias)
    targets = await _prune(targets)
    report = SweepReport(dry_run=dry_run, grace=grace_td, cutoff=cutoff)
    for (bucket_alias, name), work in sorted(targets.items()):
        label = f"{bucket_alias}:{name}"
        report.buckets.append(label)
        report.storages[label] = work.storage.url
        store = work.storage.bind(get_db(bucket_alias))
        await _sweep_files(store, bucket_alias, work.judge, cutoff, dry_run, batch_size,
                           max_ids, report)
        # Before the direct sessions: an expired resumable upload into S3 expires the
        # direct session holding its multipart upload, which this sweep then removes.
        await sweep_resumable(get_db(bucket_alias), name, dry_run=dry_run, report=report,
                              store=store)
        if isinstance(store, GridBucket):
            await _sweep_chunks(store, bucket_alias, cutoff, dry_run, batch_size, max_ids,
                                report)
        elif isinstance(store, ObjectStore):
            # Direct-to-S3 sessions: expired ones removed; live ones' keys and
            # multipart uploads are left to their session (ops/direct_sweep.py).
            await sweep_direct_sessions(store, bucket_alias, dry_run, max_ids, report)
            live_keys, live_uploads = await live_direct_uploads(store)
            # Resumable uploads written in place: their keys and temp files.
            tus_keys, tus_temps, tus_tokens = await live_in_store(store.db, store)
            await _sweep_reservations(store, bucket_alias, work.sharers, cutoff, dry_run,
                                      batch_size, max_ids, report, skip=live_keys | tus_keys,
                                      skip_tokens=tus_tokens)
            await _sweep_objects(store, bucket_alias, work.sharers, cutoff, dry_run,
                                 batch_size, max_ids, report)
            await _sweep_leftovers(store, bucket_alias, cutoff, dry_run, batch_size, max_ids,
                                   report, skip=live_uploads | tus_temps)
        elif isinstance(store, QueuedStore):
            await _sweep_queued(store, bucket_alias, work, cutoff, dry_run, batch_size,
                                max_ids, report)
    report.duration = time.monotonic() - started
    return report


#: The files a GridFS sweep or check looks at: an entry naming a stored object
#: belongs to a directory or S3 storage (its bytes are not chunks).
GRIDFS_FILES = {"location": {"$exists": False}}
#: The files of a directory or S3 catalogue the sweep may delete: an entry without
#: a location (a GridFS file left from before the field's storage changed, or
#: foreign data) is reported by the check, never deleted, as its chunks would stay.
OBJECT_FILES = {"location": {"$exists": True}}


async def _sweep_queued(
    store: QueuedStore,
    alias: str,
    work: _Work,
    cutoff: dt.datetime,
    dry_run: bool,
    batch_size: int,
    max_ids: int | None,
    report: SweepReport,
) -> None:
    """Both sides of a queued catalogue: local copies no entry names any more
    (chunks, or a directory's objects and temp files: an upload that died, or a
    worker that died between its switch and deleting the local copy), and remote
    objects no entry names (a worker that died between writing and switching)."""
    chunks = queued_local_chunks(store)
    if chunks is not None:
        await _sweep_chunks(chunks, alias, cutoff, dry_run, batch_size, max_ids, report)
    elif isinstance(store.local, ObjectStore):
        await _sweep_reservations(store.local, alias, work.sharers, cutoff, dry_run,
                                  batch_size, max_ids, report)
        await _sweep_objects(store.local, alias, work.sharers, cutoff, dry_run, batch_size,
                             max_ids, report)
        await _sweep_leftovers(store.local, alias, cutoff, dry_run, batch_size, max_ids,
                               report)
    await _sweep_reservations(store.remote, alias, work.remote_sharers, cutoff, dry_run,
                              batch_size, max_ids, report)
    await _sweep_objects(store.remote, alias, work.remote_sharers, cutoff, dry_run, batch_size,
                         max_ids, report)
    await _sweep_leftovers(store.remote, alias, cutoff, dry_run, batch_size, max_ids, report)


async def _sweep_files(
    bucket: Store,
    alias: str,
    sources: list[_Source],
    cutoff: dt.datetime,
    dry_run: bool,
    batch_size: int,
    max_ids: int | None,
    report: SweepReport,
) -> None:
    gridfs = isinstance(bucket, GridBucket)
    # Every entry of a queued catalogue is its own (a GridFS local copy has no location).
    cursor = bucket.files.find(
        GRIDFS_FILES if gridfs else {} if isinstance(bucket, QueuedStore) else OBJECT_FILES,
        {"_id": 1, "uploadDate": 1, "length": 1, **_ENTRY_MARKS},
        batch_size=max(batch_size, _CURSOR_BATCH),
    )
    async for batch in _batches(cursor, batch_size):
        report.files_scanned += len(batch)
        # An entry a resumable upload's finish made, before it moves the reference
        # to it: the upload's session (not done) names it. Looked up before the
        # references: a finish marks its session done only after the switch.
        uploading: set[Any] = set()
        if isinstance(bucket, (GridBucket, ObjectStore)):
            uploading = await live_upload_files(
                bucket.db, bucket.name, [doc["_id"] for doc in batch]
            )
        referenced, parent_times = await _referenced_files(bucket, sources, batch)
        doomed: list[dict[str, Any]] = []
        for doc in batch:
            file_id = doc["_id"]
            if _hashable(file_id) and (file_id in referenced or file_id in uploading):
                continue
            # A thumbnail is as young as its parent: an image being stored (thumbnail
            # first, parent next, document last) keeps both within the grace period.
            when = _newest(_file_time(doc), parent_times.get(file_id) if _hashable(file_id)
                           else None)
            if _old_enough(when, cutoff):
                doomed.append(doc)
            else:
                report.recent_orphaned_files += 1
        if not doomed:
            continue
        ids = [doc["_id"] for doc in doomed]
        if not dry_run and isinstance(bucket, GridBucket):
            await bucket.files.delete_many({"_id": {"$in": ids}})
            await bucket.chunks.delete_many({"files_id": {"$in": ids}})
        elif not dry_run:
            # Through the store: the entry first, then the object, shielded.
            await _bounded(ids, bucket.delete)
        for doc in doomed:
            report.files_deleted += 1
            length = doc.get("length")
            if isinstance(length, int) and not isinstance(length, bool) and length > 0:
                report.bytes_freed += length
            if _keep(report.deleted_files, BucketFile(alias, bucket.name, doc["_id"]), max_ids):
                report.truncated = True


async def _sweep_chunks(
    bucket: GridBucket,
    alias: str,
    cutoff: dt.datetime,
    dry_run: bool,
    batch_size: int,
    max_ids: int | None,
    report: SweepReport,
) -> None:
    async for groups in _orphaned_chunk_groups(bucket, batch_size):
        # A resumable upload writing into the bucket: its chunks wait for their
        # files document until it completes or expires (then sweep_resumable's).
        live = await live_upload_files(bucket.db, bucket.name, [g["_id"] for g in groups])
        groups = [g for g in groups if not (_hashable(g["_id"]) and g["_id"] in live)]
        doomed = []
        for group in groups:
            if _old_enough(_chunks_time(group), cutoff):
                doomed.append(group)
            else:
                report.recent_orphaned_chunks += int(group["chunks"])
        if not doomed:
            continue
        if not dry_run:
            # An upload may have completed since the chunks were listed: look again.
            existing = await _existing(bucket, [g["_id"] for g in doomed])
            doomed = [g for g in doomed if not (_hashable(g["_id"]) and g["_id"] in existing)]
            if not doomed:
                continue
            await bucket.chunks.delete_many({"files_id": {"$in": [g["_id"] for g in doomed]}})
        for group in doomed:
            chunks, size = int(group["chunks"]), max(int(group.get("bytes") or 0), 0)
            report.chunks_deleted += chunks
            report.bytes_freed += size
            item = OrphanedChunks(alias, bucket.name, group["_id"], chunks, size)
            if _keep(report.deleted_chunks, item, max_ids):
                report.truncated = True


async def _sweep_reservations(
    store: ObjectStore,
    alias: str,
    sharers: list[_Sharer],
    cutoff: dt.datetime,
    dry_run: bool,
    batch_size: int,
    max_ids: int | None,
    report: SweepReport,
    skip: set[str] = frozenset(),  # type: ignore[assignment]
    skip_tokens: set[str] = frozenset(),  # type: ignore[assignment]
) -> None:
    """Release the key reservations of writers that died, and delete what they left.

    A reservation older than the cutoff whose file's entry does not name its key
    belongs to an upload, copy or delete that died (or paused longer than the
    grace). The sweep takes it over (a conditional update: a writer that
    confirmed it meanwhile keeps it), looks for the entry once more, deletes the
    object under the key only if it carries the writer's token (it is then that
    writer's, never another's), and releases the key.

    A key that an entry of a catalogue declared for this place names is alive
    too, whatever catalogue its reservation records (a catalogue renamed since:
    its entries moved, the reservations did not).
    """
    reservations = store.reservations
    async for batch in _batches(reservations.older_than(cutoff), batch_size):
        alive = await reservations.named(batch)
        named = await _named_keys(
            sharers, [str(r.get("key")) for r in batch if r["_id"] not in alive]
        )
        for reservation in batch:
            if reservation["_id"] in alive or str(reservation.get("key")) in named:
                continue  # a stored file's key
            if str(reservation.get("key")) in skip or reservation.get("token") in skip_tokens:
                continue  # a live direct or resumable upload's
            if dry_run:
                report.reservations_released += 1
                continue
            if not await reservations.take_over(reservation):
                continue  # confirmed or released meanwhile
            if await reservations.named([reservation]) or await _named_keys(
                sharers, [str(reservation.get("key"))]
            ):
                await reservations.give_back(reservation)  # its entry came in meanwhile
                continue
            key = str(reservation.get("key"))
            token = str(reservation.get("token"))
            info = await store.blobs.stat(key)
            if info is not None and store.blobs.made_by(info, token):
                if await store.blobs.delete(key, version=info.version):
                    report.objects_deleted += 1
                    report.bytes_freed += max(info.size, 0)
                    item = StoredObject(alias, store.name, key, info.size)
                    if _keep(report.deleted_objects, item, max_ids):
                        report.truncated = True
            await reservations.release_taken(reservation)
            report.reservations_released += 1


async def _sweep_objects(
    store: ObjectStore,
    alias: str,
    sharers: list[_Sharer],
    cutoff: dt.datetime,
    dry_run: bool,
    batch_size: int,
    max_ids: int | None,
    report: SweepReport,
) -> None:
    """Delete the stored objects no catalogue entry names and no reservation holds,
    last written before ``cutoff`` (another tool's, or left from before key
    reservations existed)."""
    blobs = store.blobs
    async for batch in _batches(blobs.list(), batch_size):
        infos: list[BlobInfo] = batch
        named = await _named_keys(sharers, [info.key for info in infos])
        reserved = await store.reservations.reserved(
            [info.key for info in infos if info.key not in named]
        )
        doomed: list[BlobInfo] = []
        for info in infos:
            if info.key in named or info.key in reserved:
                continue
            if _old_enough(blob_time(info.modified), cutoff):
                doomed.append(info)
            else:
                report.recent_orphaned_objects += 1
        if doomed and not dry_run:
            deleted = await _bounded(
                doomed, lambda info: _delete_orphan(store, sharers, info, cutoff, report)
            )
            doomed = [info for info in deleted if info is not None]
        for info in doomed:
            report.objects_deleted += 1
            report.bytes_freed += max(info.size, 0)
            item = StoredObject(alias, store.name, info.key, info.size)
            if _keep(report.deleted_objects, item, max_ids):
                report.truncated = True


async def _delete_orphan(
    store: ObjectStore,
    sharers: list[_Sharer],
    info: BlobInfo,
    cutoff: dt.datetime,
    report: SweepReport,
) -> BlobInfo | None:
    """Delete one orphan object under a reservation of the sweep's own, so that no
    upload can write its key meanwhile; look again first (an entry naming it, a
    newer object). The object deleted, or ``None``."""
    reservations = store.reservations
    token = secrets.token_hex(16)
    if not await reservations.reserve_for_sweep(info.key, token):
        return None  # an upload reserved it since the listing
    try:
        if await _named_keys(sharers, [info.key]):
            return None
        now = await store.blobs.stat(info.key)
        if now is None:
            return None  # gone meanwhile: nothing to delete, nothing freed
        if now.token is not None and await reservations.held_by_writer(now.token):
            # Written by an upload whose reservation names the place another way
            # (another endpoint spelling): a live file's object, not an orphan.
            return None
        if not _old_enough(blob_time(now.modified), cutoff):
            report.recent_orphaned_objects += 1
            return None
        if not await store.blobs.delete(info.key, version=now.version):
            return None
        return now
    finally:
        await reservations.release(info.key, token=token)


async def _sweep_leftovers(
    store: ObjectStore,
    alias: str,
    cutoff: dt.datetime,
    dry_run: bool,
    batch_size: int,
    max_ids: int | None,
    report: SweepReport,
    skip: set[str] = frozenset(),  # type: ignore[assignment]
) -> None:
    """Remove what dead writers left where listing does not show it, if the backend
    can find it: temp files (``list_stale_temps``/``delete_temp``, the filesystem's)
    and pending multipart uploads (``list_stale_uploads``/``abort_stale_upload``).

    These are optional: the :class:`~asyncassets.storage.objects.blobs.Blobs`
    protocol does not require them, so a backend without them is swept of objects
    and catalogue entries only.
    """
    blobs = store.blobs
    kinds = (
        ("list_stale_temps", "delete_temp", "temps_deleted", report.deleted_temps),
        ("list_stale_uploads", "abort_stale_upload", "uploads_aborted", report.aborted_uploads),
    )
    for lister_name, remover_name, counter, listed in kinds:
        lister = getattr(blobs, lister_name, None)
        remover = getattr(blobs, remover_name, None)
        if not (callable(lister) and callable(remover)):
            continue
        async for listed_batch in _batches(lister(cutoff), batch_size):
            # A live direct upload's multipart upload is not a dead writer's.
            batch = [i for i in listed_batch if getattr(i, "upload_id", None) not in skip]
            # Nor a live resumable upload's temp file (named by its path).
            batch = [i for i in batch if str(getattr(i, "key", "")) not in skip]
            if lister_name == "list_stale_uploads":
                # Nor one whose key a writer reserved since the cutoff, by this
                # catalogue's clock: the upload's own start time is the server's
                # word (moto reports one fixed date for every upload), and a writer
                # reserves its key before it starts its upload, so a reservation
                # read after the listing covers every upload listed.
                recent = await _reserved_since(store, [str(i.key) for i in batch], cutoff)
                batch = [i for i in batch if str(i.key) not in recent]
            if not dry_run:
                await _bounded([_leftover_handle(item) for item in batch], remover)
            for item in batch:
                setattr(report, counter, getattr(report, counter) + 1)
                size = _leftover_size(item)
                report.bytes_freed += size
                record = StoredObject(alias, store.name, str(getattr(item, "key", item)), size)
                if _keep(listed, record, max_ids):
                    report.truncated = True


async def _reserved_since(store: ObjectStore, keys: list[str], cutoff: dt.datetime) -> set[str]:
    """Which of ``keys`` a writer reserved (or confirmed) at or after ``cutoff``."""
    if not keys:
        return set()
    reservations = store.reservations
    ids = {reservations.id_of(key): key for key in keys}
    found = reservations.collection.find(
        {"_id": {"$in": list(ids)}, "at": {"$gte": cutoff}}, {"_id": 1}
    )
    return {ids[doc["_id"]] async for doc in found}


def _leftover_handle(item: Any) -> Any:
    # A temp file is removed by its path (BlobInfo.key); an upload by what was listed.
    return item.key if isinstance(item, BlobInfo) else item


def _leftover_size(item: Any) -> int:
    size = getattr(item, "size", 0)
    return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else 0


def _grace(grace: dt.timedelta | float) -> dt.timedelta:
    if isinstance(grace, dt.timedelta):
        value = grace
    elif isinstance(grace, (int, float)) and not isinstance(grace, bool):
        value = dt.timedelta(seconds=grace)
    else:
        raise TypeError(f"grace= takes a timedelta or a number of seconds, not {grace!r}")
    if value < dt.timedelta(0):
        raise ValueError(f"grace= must not be negative, got {value}")
    return value


def _newest(*times: dt.datetime | None) -> dt.datetime | None:
    known = [t for t in times if t is not None]
    return max(known) if known else None


def _chunks_time(group: dict[str, Any]) -> dt.datetime | None:
    """When orphaned chunks were last written: the newest chunk ``_id``'s time, else
    the ObjectId ``files_id``'s (which is when the upload began); at the latest
    moment each could mean (see :func:`oid_time`)."""
    newest = group.get("newest")
    if isinstance(newest, ObjectId):
        return oid_time(newest)
    if isinstance(group.get("_id"), ObjectId):
        return oid_time(group["_id"])
    return None


def _old_enough(when: dt.datetime | None, cutoff: dt.datetime) -> bool:
    # Without any time to go by, age cannot protect it: asyncassets' own uploads
    # always leave one (uploadDate, ObjectId chunk _ids), so this is foreign data.
    return when is None or when < cutoff
