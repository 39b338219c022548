"""What the reliability and race suites check in the database, read raw.

A GridFS file is *complete* when its files document exists and its chunks are
exactly ``n = 0 .. ceil(length / chunkSize) - 1``, each ``chunkSize`` bytes long
but the last, which holds the rest. A stored reference must name a complete file;
chunks without a files document are left by crashes (until the orphan sweep), never
by an operation that ended.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "MARKERS",
    "MISSING",
    "NO_OBJECT",
    "PARTIAL",
    "WRONG_BYTES",
    "WRONG_SIZE",
    "BucketReader",
    "BucketSnapshot",
    "ObjectSnapshot",
    "Objects",
    "QueuedSnapshot",
    "complete",
    "read_directory",
    "read_entries",
    "snapshot_bucket",
]


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

    # The questions the race scheduler asks of every storage's snapshot:

    def problems(self) -> list[tuple[str, str]]:
        """Bucket-wide violations after a batch whose operations all ended: every
        files document complete, no chunk without one, no chunk twice."""
        out = []
        partial = self.partial_files()
        stray = self.stray_chunks()
        if partial:
            out.append((
                "partial file",
                f"files documents without all their chunks: {sorted(map(str, partial))}",
            ))
        if stray:
            out.append((
                "orphan chunks after the batch",
                f"chunks without files document: {sorted(map(str, stray))}",
            ))
        if self.duplicates:
            out.append(("duplicate chunks", str(self.duplicates)))
        return out

    def repair_ids(self) -> set[Any]:
        """Files to remove after a violation, so that it is reported once."""
        return self.partial_files() | self.stray_chunks()

    def debris(self) -> set[str]:
        return set()  # stray chunks are a violation of their own (problems())

    def final_problems(self) -> list[tuple[str, str]]:
        stray = self.stray_chunks()
        return (
            [("orphan chunks after the final sweep", f"{sorted(map(str, stray))}")]
            if stray
            else []
        )


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


# -- directory and S3 storages -------------------------------------------------------------
#
# An object storage's file is *whole* when its catalogue entry names a key, an object
# is stored under that key, and the object is exactly the entry's ``length`` bytes
# whose SHA-256 is the one the entry records (``metadata.sha256``). Equal lengths are
# not enough: another file's object of the same size under the key is caught only by
# its bytes, which is why the race suites write contents of equal length.

#: The entry names an object that is not there.
NO_OBJECT = _Marker("NO_OBJECT")
#: The object under the entry's key is not the entry's length.
WRONG_SIZE = _Marker("WRONG_SIZE")
#: The object under the entry's key is the entry's length, but other bytes: another
#: file's (a reused, overwritten, planted or restored key).
WRONG_BYTES = _Marker("WRONG_BYTES")
#: Every marker ``content()`` returns instead of bytes.
MARKERS = (MISSING, PARTIAL, NO_OBJECT, WRONG_SIZE, WRONG_BYTES)

#: A directory writer's temp file: ``.<start of the final name>.<16 hex digits>.part``.
TEMP_NAME = re.compile(r"\..*\.[0-9a-f]{16}\.part", re.DOTALL)


def entry_key(entry: dict[str, Any], where: str = "location") -> str | None:
    """The key an entry's ``location`` (or ``remote``) names, if any."""
    place = entry.get(where)
    if isinstance(place, dict) and isinstance(place.get("key"), str):
        return str(place["key"])
    return None


def judge(entry: dict[str, Any], data: bytes | None) -> Any:
    """``data`` if it is exactly the entry's bytes (length and SHA-256), else a marker."""
    if data is None:
        return NO_OBJECT
    if len(data) != entry.get("length"):
        return WRONG_SIZE
    recorded = (entry.get("metadata") or {}).get("sha256")
    if recorded is not None and hashlib.sha256(data).hexdigest() != recorded:
        return WRONG_BYTES
    return data


@dataclass
class Objects:
    """What a directory or bucket holds, read raw (no library code)."""

    #: key -> bytes of every stored object (temp files and links excluded).
    objects: dict[str, bytes] = field(default_factory=dict)
    #: A directory's writers' temp files (keys of ``.*.part`` files).
    temps: set[str] = field(default_factory=set)
    #: A directory's symbolic links, never followed (keys, directories included).
    links: set[str] = field(default_factory=set)
    #: A bucket's pending multipart uploads, as ``key@upload id``.
    uploads: set[str] = field(default_factory=set)


def read_directory(root: str | os.PathLike[str]) -> Objects:
    """Every file under ``root``, walked without following a link (blocking)."""
    found = Objects()
    root = os.fspath(root)
    if not os.path.isdir(root):
        return found
    for top, dirs, names in os.walk(root, followlinks=False):
        rel = os.path.relpath(top, root)
        prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
        for name in list(dirs):
            if os.path.islink(os.path.join(top, name)):
                found.links.add(prefix + name)
        for name in names:
            path = os.path.join(top, name)
            key = prefix + name
            if os.path.islink(path):
                found.links.add(key)
            elif TEMP_NAME.fullmatch(name):
                found.temps.add(key)
            else:
                try:
                    with open(path, "rb") as f:
                        found.objects[key] = f.read()
                except FileNotFoundError:  # removed while walking: not there
                    pass
    return found


class BucketReader:
    """Reads an S3 bucket raw with botocore (not through the library).

    Objects are fetched again only when their ETag changes, so a snapshot after
    every batch costs one listing and a GET per new object.
    """

    def __init__(self, bucket: str, endpoint_url: str, access_key_id: str,
                 secret_access_key: str, region: str, prefix: str = "") -> None:
        import botocore.config
        import botocore.session

        self.bucket = bucket
        self.prefix = prefix
        self.client = botocore.session.get_session().create_client(
            "s3", endpoint_url=endpoint_url, region_name=region,
            aws_access_key_id=access_key_id, aws_secret_access_key=secret_access_key,
            config=botocore.config.Config(s3={"addressing_style": "path"},
                                          retries={"max_attempts": 1}),
        )
        self._cache: dict[tuple[str, str], bytes] = {}

    def read(self, uploads: bool = True) -> Objects:
        """Every object under the prefix, and its pending uploads (blocking)."""
        found = Objects()
        cache: dict[tuple[str, str], bytes] = {}
        listing = self.client.get_paginator("list_objects_v2")
        for page in listing.paginate(Bucket=self.bucket, Prefix=self.prefix):
            for item in page.get("Contents", ()):
                key, etag = item["Key"], item["ETag"]
                data = self._cache.get((key, etag))
                if data is None:
                    try:
                        data = self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
                    except self.client.exceptions.NoSuchKey:
                        continue
                cache[(key, etag)] = data
                found.objects[key[len(self.prefix):]] = data
        self._cache = cache
        if not uploads:
            return found
        listing = self.client.get_paginator("list_multipart_uploads")
        for page in listing.paginate(Bucket=self.bucket, Prefix=self.prefix):
            for item in page.get("Uploads", ()):
                found.uploads.add(f"{item['Key'][len(self.prefix):]}@{item['UploadId']}")
        return found

    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key`` as another tool would (planting, restoring)."""
        self.client.put_object(Bucket=self.bucket, Key=self.prefix + key, Body=data)

    def close(self) -> None:
        self.client.close()


async def read_entries(db: Any, catalogue: str) -> dict[Any, dict[str, Any]]:
    return {doc["_id"]: doc async for doc in db[f"{catalogue}.files"].find({})}


@dataclass
class ObjectSnapshot:
    """A directory or S3 storage: its catalogue entries and its objects, read raw.

    The same questions as :class:`BucketSnapshot` (``files``, ``content()``), and
    the bucket-wide invariants of an object storage:

    * no two entries name one object (``shared_keys``);
    * after every batch of operations that all ended, no object is left that no
      entry names, and no writer's temp file (``debris``), unless a killed process
      explains it; after the final sweep with grace 0, none at all, and no pending
      multipart upload either (``final_problems``).
    """

    files: dict[Any, dict[str, Any]]
    raw: Objects

    def key(self, file_id: Any) -> str | None:
        entry = self.files.get(file_id)
        return None if entry is None else entry_key(entry)

    def content(self, file_id: Any) -> Any:
        """The entry's bytes when its object is whole and its own; ``None`` for no
        reference; else a marker saying what is wrong."""
        if file_id is None:
            return None
        entry = self.files.get(file_id)
        if entry is None:
            return MISSING
        key = entry_key(entry)
        return judge(entry, None if key is None else self.raw.objects.get(key))

    def shared_keys(self) -> dict[str, list[Any]]:
        named: dict[str, list[Any]] = {}
        for file_id, entry in self.files.items():
            key = entry_key(entry)
            if key is not None:
                named.setdefault(key, []).append(file_id)
        return {k: ids for k, ids in named.items() if len(ids) > 1}

    def problems(self) -> list[tuple[str, str]]:
        return [
            ("two entries name one object (I2)", f"key {key!r}: entries {list(map(str, ids))}")
            for key, ids in self.shared_keys().items()
        ]

    def debris(self) -> set[str]:
        named = {entry_key(e) for e in self.files.values()}
        return {f"object {k}" for k in self.raw.objects if k not in named} | {
            f"temp {t}" for t in self.raw.temps
        }

    def final_problems(self) -> list[tuple[str, str]]:
        out = []
        if self.debris():
            out.append(("debris after the final sweep", str(sorted(self.debris()))))
        if self.raw.uploads:
            out.append(
                ("pending multipart uploads after the final sweep", str(sorted(self.raw.uploads)))
            )
        return out

    def repair_ids(self) -> set[Any]:
        return set()


@dataclass
class QueuedSnapshot:
    """A queued storage's catalogue with both sides read raw.

    A file is whole when every copy its entry names is whole: the local copy while
    ``local`` is set (GridFS chunks under its ``_id``, or the spool directory's
    object under ``location.key``), and the remote copy once ``remote.key`` is set.
    ``content()`` returns the bytes of the copy reads serve (remote once there).
    Between batches transfers keep running, so debris (a remote object copied but
    not switched yet, a local copy not deleted yet) is only judged at the end.
    """

    files: dict[Any, dict[str, Any]]
    local: Objects | None  # a spool directory; None when the local copy is GridFS
    chunks: dict[Any, dict[int, bytes]]
    remote: Objects

    def _local(self, file_id: Any, entry: dict[str, Any]) -> Any:
        if self.local is not None:
            key = entry_key(entry)
            return judge(entry, None if key is None else self.local.objects.get(key))
        got = self.chunks.get(file_id)
        if not got:
            return judge(entry, None) if entry.get("length") else judge(entry, b"")
        if sorted(got) != list(range(len(got))):
            return PARTIAL
        return judge(entry, b"".join(got[n] for n in sorted(got)))

    def content(self, file_id: Any) -> Any:
        if file_id is None:
            return None
        entry = self.files.get(file_id)
        if entry is None:
            return MISSING
        served = None
        if entry.get("local") in ("gridfs", "filesystem"):
            served = self._local(file_id, entry)
            if not isinstance(served, bytes):
                return served
        remote = entry_key(entry, "remote")
        if remote is not None:
            served = judge(entry, self.remote.objects.get(remote))
        return NO_OBJECT if served is None else served

    def problems(self) -> list[tuple[str, str]]:
        named: dict[str, list[Any]] = {}
        for file_id, entry in self.files.items():
            for where in ("remote",) + (("location",) if self.local is not None else ()):
                key = entry_key(entry, where)
                if key is not None and (where == "remote" or entry.get("local")):
                    named.setdefault(f"{where} {key}", []).append(file_id)
        out = [
            ("two entries name one object (I2)", f"{key!r}: entries {list(map(str, ids))}")
            for key, ids in named.items()
            if len(ids) > 1
        ]
        # A transfer attempt that failed records why until an attempt succeeds: with
        # the bytes intact, only a key taken by a racing writer or a directory pruned
        # under it could fail one, and neither may (I3, I4).
        for file_id, entry in self.files.items():
            error = (entry.get("transfer") or {}).get("error")
            if error:
                why = "KeyTaken (I3)" if "KeyTaken" in error else (
                    "ENOENT (I4)" if "ENOENT" in error else "")
                out.append((f"a transfer attempt failed {why}".strip(), f"{file_id}: {error}"))
        return out

    def debris(self) -> set[str]:
        return set()  # transfers run between batches: judged at the end

    def final_problems(self) -> list[tuple[str, str]]:
        remote_named = {entry_key(e, "remote") for e in self.files.values()}
        left = {f"remote object {k}" for k in self.remote.objects if k not in remote_named}
        left |= {f"remote temp {t}" for t in self.remote.temps}
        local_ids = {i for i, e in self.files.items() if e.get("local")}
        if self.local is not None:
            named = {entry_key(e) for e in self.files.values() if e.get("local")}
            left |= {f"local object {k}" for k in self.local.objects if k not in named}
            left |= {f"local temp {t}" for t in self.local.temps}
        else:
            left |= {f"local chunks of {i}" for i in self.chunks if i not in local_ids}
        out = [("debris after the final sweep", str(sorted(left)))] if left else []
        if self.remote.uploads:
            out.append(("pending multipart uploads after the final sweep",
                        str(sorted(self.remote.uploads))))
        return out

    def repair_ids(self) -> set[Any]:
        return set()
