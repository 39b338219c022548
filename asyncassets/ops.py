"""Day-two operations: the orphan sweep and the consistency check.

Files and documents live in separate collections, so things can drift apart: a
process crashes between an upload and the ``save()`` that references it, an
upload is abandoned halfway, someone deletes a file behind a document's back.
Two coroutines find out and clean up:

* :func:`sweep_orphans` deletes files that no document references (once they are
  older than a grace period) and chunks whose files document is gone;
* :func:`check` only reads, and reports every inconsistency it finds.

.. code-block:: python

    report = await asyncassets.sweep_orphans(grace=timedelta(days=1))
    print(report)                     # what was deleted, and how many bytes it freed

    report = await asyncassets.check(verify=True)
    if not report.ok:
        print(report)

Which references count: those of every *registered* asyncassets
:class:`~asyncassets.document.Document` class, that is, every non-abstract
subclass defined (imported) in this process, top-level, embedded, in lists and
dicts. Import all your models before sweeping: a file referenced only by a class
that was never imported looks like an orphan.

Both stream: the files, the chunks and the documents are read in batches of
``batch_size`` and looked up against each other with ``$in`` queries, so memory
stays bounded whatever the size of the collections; the reports keep at most
``max_ids`` ids per list (their counts are always exact).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import inspect
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from bson import ObjectId

from . import _driver
from .connection import DEFAULT_ALIAS, _connections, get_db, registered_aliases
from .errors import ConnectionNotRegistered
from .schema import document_classes, file_paths
from .storage.gridfs import GridBucket
from .storage.gridfs.spec import is_int

__all__ = [
    "BucketFile",
    "CheckReport",
    "ChunkProblem",
    "DanglingReference",
    "OrphanedChunks",
    "SweepReport",
    "check",
    "declared_buckets",
    "sweep_orphans",
]

#: Default number of ids looked up, or deleted, per round trip: the length of the
#: ``$in`` lists sent. SecantusDB (the embedded server) slows down quadratically
#: with long ones and is fastest around 20-50; on MongoDB, larger batches (500-1000)
#: save round trips.
DEFAULT_BATCH_SIZE = 50
#: Documents per cursor round trip when streaming (independent of ``$in`` lengths).
_CURSOR_BATCH = 1000
#: Default cap on the ids each report list keeps; counts stay exact beyond it.
DEFAULT_MAX_IDS = 1000
#: How many bytes of chunk data one ``check(verify=True)`` cursor batch may hold.
_VERIFY_BUFFER = 8 * 1024 * 1024

_UTC = dt.timezone.utc


# -- report records ----------------------------------------------------------------


class BucketFile(NamedTuple):
    """A file identified by where it lives: connection alias, bucket name, ``_id``."""

    alias: str
    bucket: str
    file_id: Any

    def __str__(self) -> str:
        return f"{self.alias}:{self.bucket} {_show_id(self.file_id)}"


class DanglingReference(NamedTuple):
    """A stored document that references a file missing from its bucket."""

    document_class: str
    document_id: Any
    field_path: str
    alias: str
    bucket: str
    file_id: Any

    def __str__(self) -> str:
        return (
            f"{self.document_class} {_show_id(self.document_id)} .{self.field_path} -> "
            f"missing file {_show_id(self.file_id)} in {self.alias}:{self.bucket}"
        )


class OrphanedChunks(NamedTuple):
    """Chunks whose ``files_id`` has no files document."""

    alias: str
    bucket: str
    files_id: Any
    chunks: int
    bytes: int

    def __str__(self) -> str:
        return (
            f"{self.alias}:{self.bucket} files_id={_show_id(self.files_id)}: "
            f"{self.chunks} chunk(s), {_human_bytes(self.bytes)}"
        )


class ChunkProblem(NamedTuple):
    """A file whose chunks do not match its files document."""

    alias: str
    bucket: str
    file_id: Any
    missing: int
    short: int
    oversized: int
    extra: int
    detail: str

    @property
    def kinds(self) -> tuple[str, ...]:
        """The kinds of problem found: ``"missing"``, ``"short"``, ``"oversized"``,
        ``"extra"`` or ``"invalid"`` (an unusable files document)."""
        found = tuple(
            kind for kind in ("missing", "short", "oversized", "extra") if getattr(self, kind)
        )
        return found or ("invalid",)

    def __str__(self) -> str:
        return f"{self.alias}:{self.bucket} {_show_id(self.file_id)}: {self.detail}"


# -- reports -----------------------------------------------------------------------


@dataclass
class SweepReport:
    """What :func:`sweep_orphans` deleted (or, with ``dry_run``, would delete).

    Counts are exact; the id lists keep at most ``max_ids`` entries each
    (``truncated`` says whether any list was cut).
    """

    dry_run: bool
    grace: dt.timedelta
    #: Files and chunks older than this (UTC) were eligible.
    cutoff: dt.datetime
    #: The buckets swept, as ``"alias:name"``.
    buckets: list[str] = field(default_factory=list)
    files_scanned: int = 0
    #: Unreferenced files older than the grace period, deleted.
    files_deleted: int = 0
    deleted_files: list[BucketFile] = field(default_factory=list)
    #: Unreferenced files younger than the grace period, kept.
    recent_orphaned_files: int = 0
    #: Chunk documents whose files document was missing, deleted.
    chunks_deleted: int = 0
    deleted_chunks: list[OrphanedChunks] = field(default_factory=list)
    #: Chunk documents without files document but too young to delete, kept.
    recent_orphaned_chunks: int = 0
    #: Bytes of file data deleted: the ``length`` of deleted files plus the size of
    #: deleted orphaned chunks.
    bytes_freed: int = 0
    truncated: bool = False
    #: Wall-clock seconds the sweep took.
    duration: float = 0.0

    def __str__(self) -> str:
        verb = "to delete" if self.dry_run else "deleted"
        lines = [
            f"Orphan sweep{' (dry run)' if self.dry_run else ''}: "
            f"{len(self.buckets)} bucket(s) [{', '.join(self.buckets) or 'none'}], "
            f"grace {_human_delta(self.grace)} (files before "
            f"{self.cutoff.isoformat(timespec='seconds')}), {self.duration:.2f} s",
            f"  files scanned: {self.files_scanned}",
            f"  orphaned files {verb}: {self.files_deleted}",
            f"  orphaned chunks {verb}: {self.chunks_deleted}",
            f"  space {'to free' if self.dry_run else 'freed'}: {_human_bytes(self.bytes_freed)}",
        ]
        if self.recent_orphaned_files or self.recent_orphaned_chunks:
            lines.append(
                f"  kept, younger than the grace period: {self.recent_orphaned_files} "
                f"file(s), {self.recent_orphaned_chunks} chunk(s)"
            )
        lines += [f"    file {item}" for item in self.deleted_files]
        lines += [f"    chunks {item}" for item in self.deleted_chunks]
        if self.truncated:
            lines.append("    (lists truncated; the counts above are exact)")
        return "\n".join(lines)


@dataclass
class CheckReport:
    """What :func:`check` found. ``ok`` is true when it found nothing wrong.

    Counts are exact; the lists keep at most ``max_ids`` entries each
    (``truncated`` says whether any list was cut).
    """

    verify: bool
    #: The buckets checked, as ``"alias:name"``.
    buckets: list[str] = field(default_factory=list)
    #: Buckets found in the database that no registered class declares: their files
    #: and chunks were checked, but not whether documents reference them.
    unclaimed_buckets: list[str] = field(default_factory=list)
    files: int = 0
    #: File references read from documents.
    references: int = 0
    dangling: int = 0
    dangling_references: list[DanglingReference] = field(default_factory=list)
    orphaned_files: int = 0
    orphaned_file_ids: list[BucketFile] = field(default_factory=list)
    #: Chunk documents whose files document is missing.
    orphaned_chunks: int = 0
    orphaned_chunk_groups: list[OrphanedChunks] = field(default_factory=list)
    #: Files with missing, short, oversized or extra chunks (or an unusable files doc).
    corrupt_files: int = 0
    chunk_problems: list[ChunkProblem] = field(default_factory=list)
    #: ``verify=True`` only: files whose bytes no longer match ``metadata.sha256``.
    checksum_mismatches: int = 0
    mismatched_files: list[BucketFile] = field(default_factory=list)
    #: ``verify=True`` only: files whose checksum was compared.
    verified: int = 0
    #: ``verify=True`` only: intact files without a recorded checksum (legacy files).
    unverifiable: int = 0
    truncated: bool = False
    duration: float = 0.0

    @property
    def ok(self) -> bool:
        """True when no dangling reference, orphan, corrupt file or mismatch was found."""
        return not (
            self.dangling
            or self.orphaned_files
            or self.orphaned_chunks
            or self.corrupt_files
            or self.checksum_mismatches
        )

    def __str__(self) -> str:
        lines = [
            f"Consistency check{' with checksums' if self.verify else ''}: "
            f"{len(self.buckets)} bucket(s) [{', '.join(self.buckets) or 'none'}], "
            f"{self.duration:.2f} s: {'OK' if self.ok else 'PROBLEMS FOUND'}",
            f"  files: {self.files}, references from documents: {self.references}",
        ]
        if self.unclaimed_buckets:
            lines.append(
                "  not declared by any registered Document class (references not checked): "
                + ", ".join(self.unclaimed_buckets)
            )
        lines.append(f"  dangling references: {self.dangling}")
        lines += [f"    {item}" for item in self.dangling_references]
        lines.append(f"  orphaned files: {self.orphaned_files}")
        lines += [f"    {item}" for item in self.orphaned_file_ids]
        lines.append(f"  orphaned chunks: {self.orphaned_chunks}")
        lines += [f"    {item}" for item in self.orphaned_chunk_groups]
        lines.append(f"  files with bad chunks: {self.corrupt_files}")
        lines += [f"    {item}" for item in self.chunk_problems]
        if self.verify:
            lines.append(
                f"  checksums: {self.verified} verified, {self.checksum_mismatches} "
                f"mismatched, {self.unverifiable} unverifiable (no sha256 recorded)"
            )
            lines += [f"    mismatch {item}" for item in self.mismatched_files]
        if self.truncated:
            lines.append("  (lists truncated; the counts above are exact)")
        return "\n".join(lines)


# -- where references live -----------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    """One place in one collection where documents store ids of one bucket's files."""

    alias: str
    collection: str
    #: db field names; ``"*"`` stands for any key of a dict.
    segments: tuple[str, ...]
    #: Whether ``{dotted path: {"$in": ids}}`` finds every reference (no dict key,
    #: no list directly inside a list).
    queryable: bool
    classes: tuple[str, ...]

    @property
    def dotted(self) -> str:
        """The path up to the first dict wildcard, for queries and projections."""
        head = []
        for segment in self.segments:
            if segment == "*":
                break
            head.append(segment)
        return ".".join(head)


_Target = tuple[str, str]  # (bucket alias, bucket name)


def _reference_map() -> dict[_Target, list[_Source]]:
    """For every bucket declared by a registered class, where its references live."""
    merged: dict[_Target, dict[tuple[str, str, tuple[str, ...]], tuple[bool, set[str]]]] = {}
    for cls in document_classes():
        doc_alias = cls._meta.get("db_alias") or DEFAULT_ALIAS
        collection = cls._get_collection_name()
        for top in cls._fields.values():
            for segments, queryable, file_field in file_paths(top):
                target = (file_field.db_alias or doc_alias, file_field.collection_name)
                key = (doc_alias, collection, segments)
                entry = merged.setdefault(target, {}).setdefault(key, (queryable, set()))
                entry[1].add(cls._class_name)
    return {
        target: [
            _Source(alias, coll, segments, queryable, tuple(sorted(names)))
            for (alias, coll, segments), (queryable, names) in sorted(
                sources.items(), key=lambda item: (item[0][0], item[0][1], item[0][2])
            )
        ]
        for target, sources in merged.items()
    }


def declared_buckets() -> list[tuple[str, str]]:
    """The ``(alias, bucket name)`` pairs that registered Document classes store files in.

    These are the buckets :func:`sweep_orphans` and :func:`check` work on by default.
    """
    return sorted(_reference_map())


def _bucket_names(buckets: Iterable[str] | str | None) -> list[str] | None:
    if buckets is None:
        return None
    names = [buckets] if isinstance(buckets, str) else list(buckets)
    for name in names:
        if not isinstance(name, str) or not name:
            raise TypeError(f"buckets= takes bucket names (non-empty str), not {name!r}")
    return names


def _aliases_in_scope(alias: str | None) -> list[str]:
    connected = registered_aliases()
    if alias is None:
        return connected
    if alias not in connected:
        known = ", ".join(repr(a) for a in connected) or "none"
        raise ConnectionNotRegistered(
            f"No connection registered as {alias!r} (registered: {known}). "
            f"Call asyncassets.connect(host=..., alias={alias!r}) first."
        )
    return [alias]


def _maybe_same_db(a: str, b: str) -> bool:
    """Whether two connected aliases may reach the same database.

    Only the database name tells them apart: different hosts may still be one server
    (``localhost`` and ``127.0.0.1``, two members of a replica set), so aliases with
    the same database name are taken to share it (never delete on doubt).
    """
    return a == b or _connections[a].db_name.casefold() == _connections[b].db_name.casefold()


def _same_db(a: str, b: str) -> bool:
    """Whether two connected aliases certainly reach the same database (one client,
    or the same host and client options, and the same database name)."""
    if a == b:
        return True
    ca, cb = _connections[a], _connections[b]
    if ca.db_name != cb.db_name:
        return False
    if ca.given is not None or cb.given is not None:
        return ca.given is cb.given
    return ca.host == cb.host and ca.kwargs == cb.kwargs


def _union(*lists: list[_Source]) -> list[_Source]:
    return list(dict.fromkeys(s for sources in lists for s in sources))


@dataclass
class _Work:
    """One bucket to work on and where references to its files live."""

    #: Sources declared for this bucket (on this alias, or on an alias certainly
    #: sharing its database): where dangling references are looked for.
    own: list[_Source]
    #: ``own`` plus the sources of every same-named bucket on an alias that may
    #: share the database: what decides whether a file is referenced.
    judge: list[_Source]


def _plan(
    buckets: Iterable[str] | str | None, alias: str | None
) -> tuple[dict[_Target, _Work], list[str] | None]:
    """Pick the buckets to work on and check every reference to them can be read.

    Aliases that may share a database see one another's references: with class A
    on alias ``"default"`` and class B on ``"x"``, both storing files in bucket
    ``"shared"`` of the same database, a file either references is kept.
    """
    names = _bucket_names(buckets)
    scope = _aliases_in_scope(alias)
    connected = registered_aliases()
    refs = _reference_map()
    picked: dict[_Target, list[_Source]] = {}
    for target, sources in refs.items():
        if target[0] in scope and (names is None or target[1] in names):
            picked[target] = sources
    for name in names or ():
        if any(t[1] == name for t in picked):
            continue
        # Named explicitly but declared by no class (in scope): every file there that
        # no registered class references counts as unreferenced.
        bucket_alias = alias or DEFAULT_ALIAS
        _aliases_in_scope(bucket_alias)  # raises if it is not connected
        picked[(bucket_alias, name)] = []
    # One pass per database: buckets of aliases certainly sharing it are one bucket.
    targets: dict[_Target, _Work] = {}
    for (bucket_alias, name), sources in sorted(picked.items()):
        same = next(
            (t for t in targets if t[1] == name and _same_db(t[0], bucket_alias)), None
        )
        if same is not None:
            targets[same].own = _union(targets[same].own, sources)
        else:
            targets[(bucket_alias, name)] = _Work(list(sources), [])
    for (bucket_alias, name), work in targets.items():
        work.judge = _union(work.own, *(
            sources for (other, other_name), sources in sorted(refs.items())
            if other_name == name and other in connected
            and _maybe_same_db(bucket_alias, other)
        ))
    connected_set = set(connected)
    for (bucket_alias, name), work in sorted(targets.items()):
        unreachable = sorted({s.alias for s in work.judge} - connected_set)
        if unreachable:
            who = ", ".join(
                f"{c} (alias {s.alias!r})" for s in work.judge if s.alias in unreachable
                for c in s.classes
            )
            raise ConnectionNotRegistered(
                f"Cannot tell which files of bucket {name!r} (alias {bucket_alias!r}) are "
                f"referenced: {who} keep references to it through an alias that is not "
                "connected. Connect it with asyncassets.connect(..., alias=...), or leave "
                "this bucket out with buckets= / alias=."
            )
    return targets, names


async def _prune(targets: dict[_Target, _Work]) -> dict[_Target, _Work]:
    """Drop the sources whose collection does not exist: nothing to query there.

    Many classes (all those imported) usually share an alias; most of their
    collections may not exist in a given database (a test's, say).
    """
    aliases = sorted({s.alias for work in targets.values() for s in work.judge})
    present = {a: set(await get_db(a).list_collection_names()) for a in aliases}

    def keep(sources: list[_Source]) -> list[_Source]:
        return [s for s in sources if s.collection in present[s.alias]]

    return {target: _Work(keep(w.own), keep(w.judge)) for target, w in targets.items()}


# -- streaming helpers -----------------------------------------------------------------


async def _close(cursor: Any) -> None:
    result = cursor.close()
    if inspect.isawaitable(result):
        await result


async def _batches(docs: Any, size: int) -> AsyncIterator[list[dict[str, Any]]]:
    """Group a cursor's (or an async iterator's) documents into lists of ``size``.

    The cursor is closed at the end, also when the caller stops early.
    """
    batch: list[dict[str, Any]] = []
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
        collection = get_db(source.alias)[source.collection]
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


async def _existing(bucket: GridBucket, ids: list[Any]) -> set[Any]:
    """Which of ``ids`` have a files document (unhashable ids never do, here)."""
    return set(await bucket.find_many(i for i in ids if _hashable(i)))


#: Where an ``ImageField`` thumbnail's files document names its parent image.
_THUMBNAIL_OF = "metadata.thumbnail_of"


def _thumbnail_parent(doc: dict[str, Any]) -> Any:
    metadata = doc.get("metadata")
    parent = metadata.get("thumbnail_of") if isinstance(metadata, dict) else None
    return parent if parent is not None and _hashable(parent) else None


async def _referenced_files(
    bucket: GridBucket, sources: list[_Source], docs: list[dict[str, Any]]
) -> tuple[set[Any], dict[Any, dt.datetime | None]]:
    """Which of the files ``docs`` (with ``metadata.thumbnail_of``) are referenced.

    A file is referenced when a document references it, or when it is a thumbnail
    (``metadata.thumbnail_of``) whose parent is still in the bucket and referenced
    itself: no document names a thumbnail, only its parent's files document does.
    Also returns, for the other thumbnails whose parent is still there, the
    parent's time (an orphan thumbnail is no older than its parent).
    """
    referenced = await _referenced(sources, [doc["_id"] for doc in docs])
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


def _newest(*times: dt.datetime | None) -> dt.datetime | None:
    known = [t for t in times if t is not None]
    return max(known) if known else None


def _as_utc(value: Any) -> dt.datetime | None:
    if not isinstance(value, dt.datetime):
        return None
    return value.replace(tzinfo=_UTC) if value.tzinfo is None else value


def _file_time(doc: dict[str, Any]) -> dt.datetime | None:
    """When a file was written: ``uploadDate``, else its ObjectId ``_id``'s time."""
    when = _as_utc(doc.get("uploadDate"))
    if when is None and isinstance(doc.get("_id"), ObjectId):
        when = doc["_id"].generation_time
    return when


def _chunks_time(group: dict[str, Any]) -> dt.datetime | None:
    """When orphaned chunks were last written: the newest chunk ``_id``'s time, else
    the ObjectId ``files_id``'s (which is when the upload began)."""
    newest = group.get("newest")
    if isinstance(newest, ObjectId):
        return newest.generation_time
    if isinstance(group.get("_id"), ObjectId):
        return group["_id"].generation_time
    return None


def _old_enough(when: dt.datetime | None, cutoff: dt.datetime) -> bool:
    # Without any time to go by, age cannot protect it: asyncassets' own uploads
    # always leave one (uploadDate, ObjectId chunk _ids), so this is foreign data.
    return when is None or when < cutoff


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


# Size of a chunk's data, -1 when it is not binary (so one bad chunk cannot fail the
# whole aggregation).
_SIZE_OF_DATA = {
    "$cond": [{"$eq": [{"$type": "$data"}, "binData"]}, {"$binarySize": "$data"}, -1]
}


def _keep(items: list[Any], item: Any, limit: int | None) -> bool:
    """Append ``item`` unless the list is full; return whether it was cut."""
    if limit is None or len(items) < limit:
        items.append(item)
        return False
    return True


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


def _positive(name: str, value: Any, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}= must be a positive int, not {value!r}")


# -- the sweep -----------------------------------------------------------------------


async def sweep_orphans(
    grace: dt.timedelta | float = dt.timedelta(days=1),
    dry_run: bool = False,
    buckets: Iterable[str] | str | None = None,
    alias: str | None = None,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_ids: int | None = DEFAULT_MAX_IDS,
) -> SweepReport:
    """Delete files no document references, and chunks whose files document is gone.

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

    References are re-read for each batch of candidate files right before deleting
    them, and a file's files document is deleted before its chunks, so an
    interrupted sweep leaves only orphaned chunks, which the next sweep removes.

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
    :raises TypeError, ValueError: a bad ``grace``, ``buckets``, ``batch_size``.
    :raises pymongo.errors.PyMongoError: if the server fails.
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
        report.buckets.append(f"{bucket_alias}:{name}")
        bucket = GridBucket(get_db(bucket_alias), name)
        await _sweep_files(bucket, bucket_alias, work.judge, cutoff, dry_run, batch_size,
                           max_ids, report)
        await _sweep_chunks(bucket, bucket_alias, cutoff, dry_run, batch_size, max_ids, report)
    report.duration = time.monotonic() - started
    return report


async def _sweep_files(
    bucket: GridBucket,
    alias: str,
    sources: list[_Source],
    cutoff: dt.datetime,
    dry_run: bool,
    batch_size: int,
    max_ids: int | None,
    report: SweepReport,
) -> None:
    cursor = bucket.files.find(
        {},
        {"_id": 1, "uploadDate": 1, "length": 1, _THUMBNAIL_OF: 1},
        batch_size=max(batch_size, _CURSOR_BATCH),
    )
    async for batch in _batches(cursor, batch_size):
        report.files_scanned += len(batch)
        referenced, parent_times = await _referenced_files(bucket, sources, batch)
        doomed: list[dict[str, Any]] = []
        for doc in batch:
            file_id = doc["_id"]
            if _hashable(file_id) and file_id in referenced:
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
        if not dry_run:
            await bucket.files.delete_many({"_id": {"$in": ids}})
            await bucket.chunks.delete_many({"files_id": {"$in": ids}})
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


# -- the check -----------------------------------------------------------------------


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
      their age (:func:`sweep_orphans` deletes those older than its grace period);
    * orphaned chunks: chunks whose files document is missing;
    * files with missing, short, oversized or extra chunks;
    * with ``verify=True``, files whose bytes no longer match the SHA-256 recorded
      at upload (``metadata.sha256``); intact files without one are counted as
      ``unverifiable``, not as mismatches. This reads every byte.

    With ``buckets=None`` it checks the buckets registered classes declare, plus
    every other bucket found in the connected databases ("unclaimed": their chunks
    and checksums are checked, but not whether anything references their files).

    :param verify: also compare checksums (reads all file data).
    :param buckets: bucket names to check; a bucket named here is treated as
        declared: its unreferenced files are reported as orphans.
    :param alias: check only the buckets of this connection alias.
    :param batch_size: ids per lookup (the length of ``$in`` lists).
    :param max_ids: cap on the entries each report list keeps (``None``: no cap).
    :raises ConnectionNotRegistered: as :func:`sweep_orphans`.
    :raises pymongo.errors.PyMongoError: if the server fails.
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
                    work.append(((db_alias, name), _Work([], []), False))
                    report.unclaimed_buckets.append(f"{db_alias}:{name}")
    for (bucket_alias, name), w, claimed in work:
        report.buckets.append(f"{bucket_alias}:{name}")
        bucket = GridBucket(get_db(bucket_alias), name)
        await _check_files(bucket, bucket_alias, w.judge, claimed, verify, batch_size, max_ids,
                           report)
        async for groups in _orphaned_chunk_groups(bucket, batch_size):
            for group in groups:
                chunks, size = int(group["chunks"]), max(int(group.get("bytes") or 0), 0)
                report.orphaned_chunks += chunks
                item = OrphanedChunks(bucket_alias, name, group["_id"], chunks, size)
                if _keep(report.orphaned_chunk_groups, item, max_ids):
                    report.truncated = True
        if claimed:
            await _check_references(bucket, bucket_alias, w.own, batch_size, max_ids, report)
    report.duration = time.monotonic() - started
    return report


async def _buckets_in(alias: str) -> list[str]:
    """Names of the GridFS buckets (``X.files`` or ``X.chunks``) in an alias's database."""
    names = await get_db(alias).list_collection_names()
    found = set()
    for name in names:
        for suffix in (".files", ".chunks"):
            if name.endswith(suffix) and not name.startswith("system."):
                found.add(name[: -len(suffix)])
    return sorted(found)


async def _check_files(
    bucket: GridBucket,
    alias: str,
    sources: list[_Source],
    claimed: bool,
    verify: bool,
    batch_size: int,
    max_ids: int | None,
    report: CheckReport,
) -> None:
    projection = {"_id": 1, "length": 1, "chunkSize": 1, "metadata.sha256": 1,
                  _THUMBNAIL_OF: 1}
    cursor = bucket.files.find({}, projection, batch_size=max(batch_size, _CURSOR_BATCH))
    async for batch in _batches(cursor, batch_size):
        report.files += len(batch)
        if claimed:
            referenced, _ = await _referenced_files(bucket, sources, batch)
            for doc in batch:
                if not (_hashable(doc["_id"]) and doc["_id"] in referenced):
                    report.orphaned_files += 1
                    item = BucketFile(alias, bucket.name, doc["_id"])
                    if _keep(report.orphaned_file_ids, item, max_ids):
                        report.truncated = True
        await _check_chunks(bucket, alias, batch, verify, max_ids, report)


class _ChunkTally:
    """Compares one file's chunks, fed in ``n`` order, with its files document."""

    def __init__(self, doc: dict[str, Any], verify: bool) -> None:
        self.doc = doc
        length, chunk_size = doc.get("length"), doc.get("chunkSize")
        self.invalid = None
        if not is_int(length) or length < 0:
            self.invalid = f"its files document has no valid length ({length!r})"
        elif not is_int(chunk_size) or chunk_size <= 0:
            self.invalid = f"its files document has no valid chunkSize ({chunk_size!r})"
        self.length = length if self.invalid is None else 0
        self.chunk_size = chunk_size if self.invalid is None else 1
        self.nchunks = -(-self.length // self.chunk_size)
        self.next_n = 0
        self.missing: list[int] = []
        self.short = self.oversized = self.extra = 0
        expected = (doc.get("metadata") or {}).get("sha256") if verify else None
        self.expected_sha = expected if isinstance(expected, str) else None
        self.sha = hashlib.sha256() if self.expected_sha is not None else None

    def add(self, n: Any, size: Any, data: Any) -> None:
        if not is_int(n) or n < self.next_n or n >= self.nchunks:
            self.extra += 1  # beyond the end, a duplicate, or no valid n at all
            return
        if n > self.next_n:
            self.missing.extend(range(self.next_n, n))
            self.sha = None
        last = self.length - (self.nchunks - 1) * self.chunk_size
        expected = self.chunk_size if n < self.nchunks - 1 else last
        if not is_int(size) or size < 0 or size < expected:
            self.short += 1
            self.sha = None
        elif size > expected:
            self.oversized += 1
            self.sha = None
        elif self.sha is not None and isinstance(data, bytes):
            self.sha.update(data)
        self.next_n = n + 1

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
            return f"{', '.join(parts)}; expected {self.nchunks} of {self.chunk_size} bytes " \
                   f"for {self.length} bytes"
        return None


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
    cursor_batch = 1000
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
    try:
        async for chunk in chunks:
            tally = tallies.get(chunk.get("files_id"))
            if tally is not None:
                tally.add(chunk.get("n"), chunk.get("size"), chunk.get("data"))
    finally:
        await chunks.aclose()
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
        if not verify:
            continue
        if tally.expected_sha is None:
            report.unverifiable += 1
            continue
        report.verified += 1
        if tally.sha is None or tally.sha.hexdigest() != tally.expected_sha.lower():
            report.checksum_mismatches += 1
            if _keep(report.mismatched_files, BucketFile(alias, bucket.name, file_id), max_ids):
                report.truncated = True


async def _check_references(
    bucket: GridBucket,
    alias: str,
    sources: list[_Source],
    batch_size: int,
    max_ids: int | None,
    report: CheckReport,
) -> None:
    for source in sources:
        collection = get_db(source.alias)[source.collection]
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
    bucket: GridBucket,
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


# -- formatting ----------------------------------------------------------------------


def _show_id(value: Any) -> str:
    return str(value) if isinstance(value, ObjectId) else repr(value)


def _human_bytes(size: int) -> str:
    amount = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if amount < 1024 or unit == "TiB":
            return f"{int(amount)} {unit}" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1024
    return f"{size} B"  # pragma: no cover


def _human_delta(delta: dt.timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds and seconds % 86400 == 0:
        return f"{seconds // 86400}d"
    if seconds and seconds % 3600 == 0:
        return f"{seconds // 3600}h"
    if seconds and seconds % 60 == 0:
        return f"{seconds // 60}m"
    return f"{delta.total_seconds():g}s"
