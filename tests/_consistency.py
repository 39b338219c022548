"""What the reliability and race suites check in the database, read raw.

A GridFS file is *complete* when its files document exists and its chunks are
exactly ``n = 0 .. ceil(length / chunkSize) - 1``, each ``chunkSize`` bytes long
but the last, which holds the rest. A stored reference must name a complete file;
chunks without a files document are left by crashes (until the orphan sweep), never
by an operation that ended.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["MISSING", "PARTIAL", "BucketSnapshot", "complete", "snapshot_bucket"]


class _Marker:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


#: A reference names no files document.
MISSING = _Marker("MISSING")
#: A files document whose chunks do not add up to its length.
PARTIAL = _Marker("PARTIAL")


def complete(files_doc: dict[str, Any], chunks: list[tuple[int, int]]) -> bool:
    """Whether ``chunks`` (``(n, size)`` pairs) are exactly those of ``files_doc``."""
    length, size = files_doc["length"], files_doc["chunkSize"]
    count = -(-length // size)
    expected = [(n, size if n < count - 1 else length - (count - 1) * size) for n in range(count)]
    return sorted(chunks) == expected


@dataclass
class BucketSnapshot:
    """The files and chunks of one bucket, read in two queries."""

    files: dict[Any, dict[str, Any]] = field(default_factory=dict)
    chunks: dict[Any, dict[int, bytes]] = field(default_factory=dict)
    #: Chunk documents with the same (files_id, n): never allowed.
    duplicates: list[tuple[Any, int]] = field(default_factory=list)

    def is_complete(self, file_id: Any) -> bool:
        doc = self.files.get(file_id)
        if doc is None:
            return False
        got = self.chunks.get(file_id, {})
        return complete(doc, [(n, len(data)) for n, data in got.items()])

    def content(self, file_id: Any) -> Any:
        """The bytes of a complete file; ``None`` for no reference; else a marker."""
        if file_id is None:
            return None
        if file_id not in self.files:
            return MISSING
        if not self.is_complete(file_id):
            return PARTIAL
        got = self.chunks.get(file_id, {})
        return b"".join(got[n] for n in sorted(got))

    def partial_files(self) -> set[Any]:
        return {i for i in self.files if not self.is_complete(i)}

    def stray_chunks(self) -> set[Any]:
        """``files_id``\\ s of chunks without a files document."""
        return set(self.chunks) - set(self.files)


async def snapshot_bucket(db: Any, bucket: str, *, with_data: bool = True) -> BucketSnapshot:
    snap = BucketSnapshot()
    async for doc in db[f"{bucket}.files"].find({}):
        snap.files[doc["_id"]] = doc
    projection = {"files_id": 1, "n": 1, "data": 1}
    async for c in db[f"{bucket}.chunks"].find({}, projection):
        got = snap.chunks.setdefault(c["files_id"], {})
        if c["n"] in got:
            snap.duplicates.append((c["files_id"], c["n"]))
        data = bytes(c["data"])
        got[c["n"]] = data if with_data else b"\0" * len(data)
    return snap
