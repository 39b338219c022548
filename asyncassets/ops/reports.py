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
    "OrphanedChunks",
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
    #: ``verify=True`` only: files that fail verification as
    #: :func:`~asyncassets.storage.read.verify_file` decides: their stored bytes no
    #: longer match ``metadata.sha256`` (or, for a legacy file without it, the GridFS
    #: ``md5``), or, compressed, they do not inflate to the original's recorded length
    #: and SHA-256.
    checksum_mismatches: int = 0
    mismatched_files: list[BucketFile] = field(default_factory=list)
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
