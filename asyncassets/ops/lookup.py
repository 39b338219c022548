"""Streaming lookups shared by the sweep and the check.

Files, chunks, stored objects and documents are read in batches of
``batch_size`` and looked up against each other with ``$in`` queries, so memory
stays bounded whatever the size of the collections or storages.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from bson import ObjectId

from .. import _driver
from ..assets import ASSET_FIELDS, assets_in_use
from ..connection import get_db
from ..storage.gridfs import GridBucket
from ..storage.queued import QueuedStore
from .scope import _Sharer, _Source

if TYPE_CHECKING:
    from ..storage import Store

T = TypeVar("T")
R = TypeVar("R")

__all__ = ["DEFAULT_BATCH_SIZE"]

#: Default number of ids looked up, or deleted, per round trip: the length of the
#: ``$in`` lists sent. SecantusDB (the embedded server) slows down quadratically
#: with long ones and is fastest around 20-50; on MongoDB, larger batches (500-1000)
#: save round trips.
DEFAULT_BATCH_SIZE = 50
#: Documents per cursor round trip when streaming (independent of ``$in`` lengths).
_CURSOR_BATCH = 1000

_UTC = dt.timezone.utc

#: How many stored objects are stat-ed, read or deleted at once: enough to hide an
#: object store's latency, few enough to spare it (and a local disk).
OBJECT_CONCURRENCY = 16


async def _bounded(
    items: Iterable[T], call: Callable[[T], Awaitable[R]], limit: int = OBJECT_CONCURRENCY
) -> list[R]:
    """``[await call(item) for item in items]``, at most ``limit`` running at once."""
    gate = asyncio.Semaphore(limit)

    async def one(item: T) -> R:
        async with gate:
            return await call(item)

    return list(await asyncio.gather(*(one(item) for item in items)))


async def _close(cursor: Any) -> None:
    result = cursor.close()
    if inspect.isawaitable(result):
        await result


async def _batches(docs: Any, size: int) -> AsyncIterator[list[Any]]:
    """Group a cursor's (or an async iterator's) documents into lists of ``size``.

    The cursor is closed at the end, also when the caller stops early.
    """
    batch: list[Any] = []
    try:
        async for doc in docs:
            batch.append(doc)
            if len(batch) >= size:
                yield batch
                batch = []
        if batch:
            yield batch
    finally:
        closer = getattr(docs, "aclose", None)
        if closer is not None:
            await closer()
        else:
            await _close(docs)


def _values(
    value: Any, segments: tuple[str, ...], path: tuple[str, ...] = ()
) -> Iterator[tuple[str, Any]]:
    """Yield ``(dotted path with list indexes, value)`` for what sits at ``segments``."""
    if isinstance(value, list):
        for index, item in enumerate(value):
            yield from _values(item, segments, (*path, str(index)))
        return
    if not segments:
        if value is not None and not isinstance(value, dict):
            yield ".".join(path), value
        return
    if not isinstance(value, dict):
        return
    head, rest = segments[0], segments[1:]
    if head == "*":
        for key, item in value.items():
            yield from _values(item, rest, (*path, str(key)))
    elif head in value:
        yield from _values(value[head], rest, (*path, head))


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


async def _referenced(sources: list[_Source], ids: list[Any]) -> set[Any]:
    """Which of ``ids`` some document references, one query per source."""
    wanted = {i for i in ids if _hashable(i)}
    found: set[Any] = set()
    for source in sources:
        remaining = [i for i in wanted if i not in found]
        if not remaining:
            break
        # From the primary: a lagging secondary's document may predate its switch.
        collection = _driver.acknowledged(get_db(source.alias)[source.collection])
        if source.queryable:
            query: dict[str, Any] = {source.dotted: {"$in": remaining}}
        else:
            query = {source.dotted: {"$exists": True}}
        cursor = collection.find(query, {source.dotted: 1, "_id": 0})
        try:
            async for doc in cursor:
                for _path, value in _values(doc, source.segments):
                    if _hashable(value) and value in wanted:
                        found.add(value)
        finally:
            await _close(cursor)
    return found


async def _existing(bucket: Store, ids: list[Any]) -> set[Any]:
    """Which of ``ids`` have a files document (unhashable ids never do, here)."""
    return set(await bucket.find_many(i for i in ids if _hashable(i)))


#: Where an ``ImageField`` thumbnail's files document names its parent image.
_THUMBNAIL_OF = "metadata.thumbnail_of"
#: What the sweep and the check read of each entry besides its size and time: a
#: thumbnail's parent, and whether it is an asset (asyncassets.assets).
_ENTRY_MARKS = {_THUMBNAIL_OF: 1, **ASSET_FIELDS}


def _thumbnail_parent(doc: dict[str, Any]) -> Any:
    metadata = doc.get("metadata")
    parent = metadata.get("thumbnail_of") if isinstance(metadata, dict) else None
    return parent if parent is not None and _hashable(parent) else None


async def _referenced_files(
    bucket: Store, sources: list[_Source], docs: list[dict[str, Any]]
) -> tuple[set[Any], dict[Any, dt.datetime | None]]:
    """Which of the files ``docs`` (with ``metadata.thumbnail_of``) are referenced.

    A file is referenced when a document references it, or when it is a thumbnail
    (``metadata.thumbnail_of``) whose parent is still in the bucket and referenced
    itself: no document names a thumbnail, only its parent's files document does.
    Also returns, for the other thumbnails whose parent is still there, the
    parent's time (an orphan thumbnail is no older than its parent).
    """
    referenced = await _referenced(sources, [doc["_id"] for doc in docs])
    # An asset is referenced by existing as one (asyncassets.assets).
    referenced |= await assets_in_use(bucket.files, docs)
    children: dict[Any, list[Any]] = {}
    for doc in docs:
        file_id, parent = doc["_id"], _thumbnail_parent(doc)
        if parent is not None and _hashable(file_id) and file_id not in referenced:
            children.setdefault(parent, []).append(file_id)
    parent_times: dict[Any, dt.datetime | None] = {}
    if not children:
        return referenced, parent_times
    parents = await bucket.find_many(children)
    live = await _referenced(sources, list(parents))
    for parent_id, parent_doc in parents.items():
        for child in children.get(parent_id, ()):
            if parent_id in live:
                referenced.add(child)
            else:
                parent_times[child] = _file_time(parent_doc)
    return referenced, parent_times


def _as_utc(value: Any) -> dt.datetime | None:
    if not isinstance(value, dt.datetime):
        return None
    return value.replace(tzinfo=_UTC) if value.tzinfo is None else value


def _file_time(doc: dict[str, Any]) -> dt.datetime | None:
    """When a file was written: ``uploadDate``, else its ObjectId ``_id``'s time."""
    when = _as_utc(doc.get("uploadDate"))
    if when is None and isinstance(doc.get("_id"), ObjectId):
        when = oid_time(doc["_id"])
    return when


def blob_time(modified: Any) -> dt.datetime | None:
    """When a stored object was last written, at the latest moment it can mean.

    S3 lists ``LastModified`` in whole seconds: a time without a fraction of a
    second may be cut short, so it is read as the end of that second (as
    :func:`oid_time` reads an ObjectId), never making a young object look old.
    """
    when = _as_utc(modified)
    if when is not None and when.microsecond == 0:
        when += dt.timedelta(seconds=1)
    return when


def oid_time(oid: ObjectId) -> dt.datetime:
    """The latest moment an ObjectId can have been made.

    An ObjectId records whole seconds: one made at 12:00:00.9 says 12:00:00. For
    deciding whether something is older than the sweep's grace, the end of that
    second is the safe reading (it never makes a young object look old).
    """
    return oid.generation_time + dt.timedelta(seconds=1)


async def _orphaned_chunk_groups(
    bucket: GridBucket, batch_size: int
) -> AsyncIterator[list[dict[str, Any]]]:
    """Yield, batch by batch, ``{_id: files_id, chunks, bytes, newest}`` for every
    ``files_id`` of the chunks collection that has no files document."""
    distinct = _driver.aggregate(
        bucket.chunks,
        [{"$group": {"_id": "$files_id"}}],
        allowDiskUse=True,
        batchSize=max(batch_size, _CURSOR_BATCH),
    )
    async for batch in _batches(distinct, batch_size):
        ids = [doc["_id"] for doc in batch]
        existing = await _existing(bucket, ids)
        orphans = [i for i in ids if not (_hashable(i) and i in existing)]
        if not orphans:
            continue
        stats = _driver.aggregate(
            bucket.chunks,
            [
                {"$match": {"files_id": {"$in": orphans}}},
                {
                    "$group": {
                        "_id": "$files_id",
                        "chunks": {"$sum": 1},
                        "bytes": {"$sum": _SIZE_OF_DATA},
                        "newest": {"$max": "$_id"},
                    }
                },
            ],
            allowDiskUse=True,
        )
        yield [doc async for doc in stats]


async def _named_keys(sharers: list[_Sharer], keys: list[str]) -> set[str]:
    """Which of ``keys`` (listed by the storage of ``sharers[0]``) a catalogue entry
    names, in any catalogue keeping objects in that place: one query per catalogue."""
    if not sharers:
        return set()
    listed = sharers[0].prefix
    named: set[str] = set()
    for sharer in sharers:
        theirs: dict[str, str] = {}
        for key in keys:
            if key in named:
                continue
            their_key = sharer.key_of(listed + key)
            if their_key is not None:
                theirs[their_key] = key
        if not theirs:
            continue
        files = _driver.acknowledged(get_db(sharer.alias)[f"{sharer.catalogue}.files"])
        cursor = files.find({sharer.field: {"$in": list(theirs)}}, {sharer.field: 1})
        holder, _, leaf = sharer.field.partition(".")
        try:
            async for doc in cursor:
                location = doc.get(holder)
                their_key = location.get(leaf) if isinstance(location, dict) else None
                if isinstance(their_key, str) and their_key in theirs:
                    named.add(theirs[their_key])
        finally:
            await _close(cursor)
    return named


# Size of a chunk's data, -1 when it is not binary (so one bad chunk cannot fail the
# whole aggregation).
_SIZE_OF_DATA = {
    "$cond": [{"$eq": [{"$type": "$data"}, "binData"]}, {"$binarySize": "$data"}, -1]
}


def _positive(name: str, value: Any, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}= must be a positive int, not {value!r}")



class _QueuedLocalChunks(GridBucket):
    """The GridFS local copies of a queued catalogue, as a bucket for the chunk
    sweep and check: a file "exists" only while its entry names a local GridFS
    copy, so the chunks of a transferred file that a worker could not delete
    (it died after the switch) count as orphaned too."""

    async def find_many(self, file_ids: Iterable[Any]) -> dict[Any, dict[str, Any]]:
        ids = list(dict.fromkeys(file_ids))
        if not ids:
            return {}
        query = {"_id": {"$in": ids}, "local": "gridfs"}
        return {doc["_id"]: doc async for doc in self.files.find(query)}


def queued_local_chunks(store: QueuedStore) -> GridBucket | None:
    """The bucket view of ``store``'s GridFS local copies, or ``None`` (a directory)."""
    if not isinstance(store.local, GridBucket):
        return None
    return _QueuedLocalChunks(store.db, store.name, chunk_size=store.local.chunk_size)
