"""What the sweep and the check report: records, reports, and their formatting.

Every record is a small named tuple that prints as one readable line; the two
reports keep exact counts and capped lists (``max_ids``), and ``str()`` of a
report is the summary the command line prints.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from bson import ObjectId

__all__ = [
    "DEFAULT_MAX_IDS",
    "BucketFile",
    "CheckReport",
    "ChunkProblem",
    "DanglingReference",
    "FailedTransfer",
    "ObjectProblem",
    "OrphanedChunks",
    "StoredObject",
    "SweepReport",
]

#: Default cap on the ids each report list keeps; counts stay exact beyond it.
DEFAULT_MAX_IDS = 1000


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


class StoredObject(NamedTuple):
    """An object in a directory or S3 storage: the alias and catalogue it belongs
    to, its key (relative to the storage's root or prefix) and size."""

    alias: str
    catalogue: str
    key: str
    size: int

    def __str__(self) -> str:
        return f"{self.alias}:{self.catalogue} {self.key!r} ({_human_bytes(self.size)})"


class ObjectProblem(NamedTuple):
    """A catalogue entry of a directory or S3 storage whose object is not right.

    ``kind``: ``"missing"`` (no object under its key), ``"size"`` (the object is
    not the entry's ``length``), ``"changed"`` (the object under its key is not the
    version its upload recorded: reused, overwritten or restored behind the
    catalogue's back) or ``"invalid"`` (the entry names no key, or has no valid
    length).
    """

    alias: str
    catalogue: str
    file_id: Any
    key: str | None
    kind: str
    detail: str

    def __str__(self) -> str:
        return f"{self.alias}:{self.catalogue} {_show_id(self.file_id)}: {self.detail}"


class FailedTransfer(NamedTuple):
    """A file of a queued storage whose transfer failed ``max_attempts`` times: it is
    still served from its local copy; retry it by hand once the cause is fixed."""

    alias: str
    catalogue: str
    file_id: Any
    attempts: int
    error: str

    def __str__(self) -> str:
        return (f"{self.alias}:{self.catalogue} {_show_id(self.file_id)}: "
                f"{self.attempts} attempt(s), last error: {self.error}")


# -- reports -----------------------------------------------------------------------


@dataclass
class SweepReport:
    """What :func:`sweep_orphans` deleted (or, with ``dry_run``, would delete).

    Counts are exact; the id lists keep at most ``max_ids`` entries each
    (``truncated`` says whether any list was cut). The ``*_objects``, ``*_temps``
    and ``*_uploads`` fields concern directory and S3 storages only.
    """

    dry_run: bool
    grace: dt.timedelta
    #: Files and chunks older than this (UTC) were eligible.
    cutoff: dt.datetime
    #: The buckets (catalogues) swept, as ``"alias:name"``.
    buckets: list[str] = field(default_factory=list)
    #: Where the files of each swept catalogue are: ``{"alias:name": storage URL}``
    #: (``gridfs:name``, ``file:///srv/media``, ``s3://bucket/prefix``).
    storages: dict[str, str] = field(default_factory=dict)
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
    #: Stored objects that no catalogue entry names, last written before the
    #: cutoff, deleted.
    objects_deleted: int = 0
    deleted_objects: list[StoredObject] = field(default_factory=list)
    #: Stored objects no entry names but written within the grace period (an
    #: upload that committed its object and has not inserted its entry yet), kept.
    recent_orphaned_objects: int = 0
    #: Key reservations left by writers (or deletes, or sweeps) that died, older
    #: than the cutoff, released; the object under each, when it was provably that
    #: writer's, is counted in ``objects_deleted``.
    reservations_released: int = 0
    #: Temp files of filesystem writers that died, untouched since the cutoff, deleted.
    temps_deleted: int = 0
    deleted_temps: list[StoredObject] = field(default_factory=list)
    #: Pending S3 multipart uploads started before the cutoff, aborted (when the
    #: storage's backend can list them).
    uploads_aborted: int = 0
    aborted_uploads: list[StoredObject] = field(default_factory=list)
    #: Resumable (tus) upload sessions past their expiry, deleted with their
    #: staged bytes (see :doc:`/uploads`); any storage.
    resumable_expired: int = 0
    #: Bytes of file data deleted: the ``length`` of deleted files plus the size of
    #: deleted orphaned chunks, objects and temp files.
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
        ]
        if _has_objects(self.storages):
            lines += [
                f"  orphaned objects {verb}: {self.objects_deleted}",
                f"  dead key reservations {'to release' if self.dry_run else 'released'}: "
                f"{self.reservations_released}",
                f"  stale temp files {verb}: {self.temps_deleted}",
                f"  stale multipart uploads {'to abort' if self.dry_run else 'aborted'}: "
                f"{self.uploads_aborted}",
            ]
        if self.resumable_expired:
            lines.append(f"  expired resumable uploads {verb}: {self.resumable_expired}")
        lines.append(
            f"  space {'to free' if self.dry_run else 'freed'}: {_human_bytes(self.bytes_freed)}"
        )
        if self.recent_orphaned_files or self.recent_orphaned_chunks:
            lines.append(
                f"  kept, younger than the grace period: {self.recent_orphaned_files} "
                f"file(s), {self.recent_orphaned_chunks} chunk(s)"
                + (f", {self.recent_orphaned_objects} object(s)"
                   if self.recent_orphaned_objects else "")
            )
        elif self.recent_orphaned_objects:
            lines.append(
                f"  kept, younger than the grace period: {self.recent_orphaned_objects} object(s)"
            )
        lines += _storage_lines(self.storages)
        lines += [f"    file {item}" for item in self.deleted_files]
        lines += [f"    chunks {item}" for item in self.deleted_chunks]
        lines += [f"    object {item}" for item in self.deleted_objects]
        lines += [f"    temp file {item}" for item in self.deleted_temps]
        lines += [f"    multipart upload {item}" for item in self.aborted_uploads]
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
    #: The buckets (catalogues) checked, as ``"alias:name"``.
    buckets: list[str] = field(default_factory=list)
    #: Where the files of each checked catalogue are: ``{"alias:name": storage URL}``.
    storages: dict[str, str] = field(default_factory=dict)
    #: Buckets found in the database that no registered class declares: their files
    #: and chunks were checked, but not whether documents reference them.
    unclaimed_buckets: list[str] = field(default_factory=list)
    #: Entries of unclaimed catalogues that name a stored object (a directory or
    #: S3 storage no registered class declares): not checked, their storage is unknown.
    unchecked_entries: int = 0
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
    #: Directory and S3 storages: catalogue entries with no object under their key.
    missing_objects: int = 0
    #: Directory and S3 storages: catalogue entries whose object is not their length.
    wrong_size_objects: int = 0
    #: Directory and S3 storages: catalogue entries whose key holds an object of
    #: another version than their upload recorded (``location.version``).
    changed_objects: int = 0
    #: Directory and S3 storages: catalogue entries naming no key or no valid length;
    #: GridFS buckets declared by a class: entries naming a stored object.
    invalid_entries: int = 0
    #: The entries counted in the four fields above.
    object_problems: list[ObjectProblem] = field(default_factory=list)
    #: Directory and S3 storages: stored objects that no catalogue entry names.
    orphaned_objects: int = 0
    orphaned_object_keys: list[StoredObject] = field(default_factory=list)
    #: ``verify=True`` only: files that fail verification as
    #: :func:`~asyncassets.storage.read.verify_file` decides: their stored bytes no
    #: longer match ``metadata.sha256`` (or, for a legacy file without it, the GridFS
    #: ``md5``), or, compressed, they do not inflate to the original's recorded length
    #: and SHA-256.
    checksum_mismatches: int = 0
    mismatched_files: list[BucketFile] = field(default_factory=list)
    #: Queued storages: transfers that failed ``max_attempts`` times (still served
    #: locally; retry them with ``asyncassets.transfers.retry_failed()`` or
    #: ``asyncassets transfer --retry-failed``).
    failed_transfers: int = 0
    failed_transfer_list: list[FailedTransfer] = field(default_factory=list)
    #: Queued storages: files not transferred yet (pending, held or running): not
    #: a problem, for information.
    queued_files: int = 0
    #: ``verify=True`` only: files compared with a recorded checksum.
    verified: int = 0
    #: ``verify=True`` only: intact files with no checksum recorded at all (no
    #: ``metadata.sha256``, no original SHA-256 and no ``md5``), which
    #: :func:`~asyncassets.storage.read.verify_file` answers with ``ChecksumMissing``.
    unverifiable: int = 0
    truncated: bool = False
    duration: float = 0.0

    @property
    def ok(self) -> bool:
        """True when no dangling reference, orphan (file, chunk or object), corrupt
        file, missing or misshapen object, mismatch or failed transfer was found."""
        return not (
            self.dangling
            or self.orphaned_files
            or self.orphaned_chunks
            or self.corrupt_files
            or self.checksum_mismatches
            or self.missing_objects
            or self.wrong_size_objects
            or self.changed_objects
            or self.invalid_entries
            or self.orphaned_objects
            or self.failed_transfers
        )

    def __str__(self) -> str:
        lines = [
            f"Consistency check{' with checksums' if self.verify else ''}: "
            f"{len(self.buckets)} bucket(s) [{', '.join(self.buckets) or 'none'}], "
            f"{self.duration:.2f} s: {'OK' if self.ok else 'PROBLEMS FOUND'}",
            f"  files: {self.files}, references from documents: {self.references}",
        ]
        lines += _storage_lines(self.storages)
        if self.unclaimed_buckets:
            lines.append(
                "  not declared by any registered Document class (references not checked): "
                + ", ".join(self.unclaimed_buckets)
            )
        if self.unchecked_entries:
            lines.append(
                f"  entries of undeclared directory/S3 storages, not checked: "
                f"{self.unchecked_entries}"
            )
        lines.append(f"  dangling references: {self.dangling}")
        lines += [f"    {item}" for item in self.dangling_references]
        lines.append(f"  orphaned files: {self.orphaned_files}")
        lines += [f"    {item}" for item in self.orphaned_file_ids]
        lines.append(f"  orphaned chunks: {self.orphaned_chunks}")
        lines += [f"    {item}" for item in self.orphaned_chunk_groups]
        lines.append(f"  files with bad chunks: {self.corrupt_files}")
        lines += [f"    {item}" for item in self.chunk_problems]
        if _has_objects(self.storages) or self.object_problems:
            lines.append(
                f"  objects missing: {self.missing_objects}, of the wrong size: "
                f"{self.wrong_size_objects}, of another version: {self.changed_objects}, "
                f"entries naming no object: {self.invalid_entries}"
            )
            lines += [f"    {item}" for item in self.object_problems]
            lines.append(f"  orphaned objects: {self.orphaned_objects}")
            lines += [f"    {item}" for item in self.orphaned_object_keys]
        if any(url.startswith("queued:") for url in self.storages.values()):
            lines.append(
                f"  transfers: {self.queued_files} not yet remote, "
                f"{self.failed_transfers} failed"
            )
            lines += [f"    failed {item}" for item in self.failed_transfer_list]
        if self.verify:
            lines.append(
                f"  checksums: {self.verified} verified, {self.checksum_mismatches} "
                f"mismatched, {self.unverifiable} unverifiable (no checksum recorded)"
            )
            lines += [f"    mismatch {item}" for item in self.mismatched_files]
        if self.truncated:
            lines.append("  (lists truncated; the counts above are exact)")
        return "\n".join(lines)


def _keep(items: list[Any], item: Any, limit: int | None) -> bool:
    """Append ``item`` unless the list is full; return whether it was cut."""
    if limit is None or len(items) < limit:
        items.append(item)
        return False
    return True


# -- formatting ----------------------------------------------------------------------


def _has_objects(storages: dict[str, str]) -> bool:
    """Whether any of the catalogues keeps its bytes outside GridFS."""
    return any(not url.startswith("gridfs:") for url in storages.values())


def _storage_lines(storages: dict[str, str]) -> list[str]:
    """``  storage of default:posters: file:///srv/media``, for each non-GridFS one."""
    return [
        f"  storage of {name}: {url}"
        for name, url in storages.items()
        if not url.startswith("gridfs:")
    ]


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
