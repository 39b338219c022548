"""Resumable uploads written in place in a directory storage.

A resumable upload (:mod:`asyncassets.storage.resumable`) to a directory field
reserves its key when it is created, exactly as a writer does
(:meth:`ObjectStore.reserve_key <asyncassets.storage.objects.store.ObjectStore.reserve_key>`),
and writes its bytes into a temp file beside that key, named by the upload's
token (:class:`~asyncassets.storage.objects.filesystem.ResumableFileWriter`):
each write lands at its offset and is fsynced before the session records the
offset, so the offset a session reports is on the disk. Bytes a dead write left
past that offset are written over by the next write. Finishing puts the temp
file in place under the key (link, no overwrite) and inserts the catalogue entry:
no byte is copied.

Invariants:

* the key stays reserved by the upload's token from creation until the file is
  deleted (the entry's) or the upload is removed;
* the orphan sweep never takes a key, a temp file or an object of an upload that
  is not done (:func:`live_in_place`); the resumable sweep removes them when the
  upload expires (:func:`remove_in_place`);
* an object under the key carrying the upload's token, of the upload's length, is
  the upload's (a finish that died after linking it): a finish again adopts it.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

from bson import ObjectId
from pymongo.errors import DuplicateKeyError

from ...errors import KeyTaken, StoredObjectMissing
from ..gridfs.spec import now_as_stored
from .filesystem import FileSystemBlobs, ResumableFileWriter
from .keys import check_key
from .store import ObjectStore

__all__ = [
    "complete_in_place",
    "head_in_place",
    "live_in_place",
    "new_in_place",
    "remove_in_place",
    "start_in_place",
    "writer_of",
    "writes_in_place",
]


def writes_in_place(store: Any) -> bool:
    """Whether a resumable upload to ``store`` is written in place: a catalogue
    over a directory (no overwriting: the key is the upload's alone)."""
    return (
        isinstance(store, ObjectStore)
        and isinstance(store.blobs, FileSystemBlobs)
        and not store.storage.overwrite
    )


def new_in_place() -> dict[str, Any]:
    """The fields of a new upload's session before its key is reserved (``into``,
    ``file_id``, ``token``): the session is stored with them first, so the sweep
    knows the reservation its token makes next for a live upload's
    (:func:`live_in_place`), however the two interleave."""
    return {"into": "directory", "file_id": ObjectId(), "token": secrets.token_hex(16)}


async def start_in_place(
    store: ObjectStore,
    *,
    filename: str | None,
    context: Mapping[str, Any],
    file_id: Any = None,
    token: str | None = None,
) -> dict[str, Any]:
    """Reserve the key of a new upload's file; return the session's fields
    (``into``, ``file_id``, ``key``, ``token``). Release with :func:`remove_in_place`.

    :param file_id, token: the session's (:func:`new_in_place`); new ones if not given.
    """
    file_id = ObjectId() if file_id is None else file_id
    token = secrets.token_hex(16) if token is None else token
    key = check_key(store.keys.make(file_id=file_id, filename=filename, context=context))
    await store.ensure_indexes()
    reserved: list[str] = []
    try:
        key = await store.reserve_key(
            key, file_id=file_id, token=token, overwrite=False, reserved=reserved
        )
    except BaseException:
        for taken in reserved:
            await store.reservations.release(taken, token=token)
        raise
    return {"into": "directory", "file_id": file_id, "key": key, "token": token}


def writer_of(
    store: ObjectStore, session: Mapping[str, Any], *, hasher: Any = None
) -> ResumableFileWriter:
    """The temp file of ``session``, positioned at its durable offset (made by the
    first write); ``hasher`` is fed what is written."""
    blobs = store.blobs
    assert isinstance(blobs, FileSystemBlobs)
    offset = int(session["offset"])
    return ResumableFileWriter(
        blobs, session["key"], session["token"], position=offset, create=offset == 0,
        hasher=hasher,
    )


async def complete_in_place(
    store: ObjectStore,
    session: Mapping[str, Any],
    *,
    filename: str | None,
    metadata: Mapping[str, Any],
    sha256: str | None,
) -> dict[str, Any]:
    """Put a complete upload's temp file in place and insert its catalogue entry;
    return the entry. Again after a finish that died or failed, it completes the
    same file (the same ``_id``, key and bytes).

    :param sha256: the bytes' SHA-256 if the caller hashed them all as they came;
        else they are read back once.
    :raises StoredObjectMissing: the temp file is gone (start a new upload).
    :raises KeyTaken: another tool put an object under the reserved key.
    """
    file_id = session["file_id"]
    found = await store.files.find_one({"_id": file_id})
    if found is not None:
        return dict(found)
    key, token, length = session["key"], session["token"], int(session["length"])
    blobs = store.blobs
    assert isinstance(blobs, FileSystemBlobs)
    info = await blobs.stat(key)
    if info is not None and blobs.made_by(info, token) and info.size == length:
        # A finish that died after putting it in place: it is this upload's.
        version = info.version
        if sha256 is None:
            hasher = hashlib.sha256()
            async for piece in blobs.open_reader(key, 0, length, version=version):
                hasher.update(piece)
            sha256 = hasher.hexdigest()
        await writer_of(store, {**session, "offset": length}).discard()
    else:
        # An empty upload had no write to make its temp file.
        writer = ResumableFileWriter(blobs, key, token, position=length, create=length == 0)
        try:
            if sha256 is None:
                sha256 = await writer.sha256(length)
            await writer.commit(overwrite=False, length=length)
        finally:
            await writer.abort()
        version = writer.version
    entry: dict[str, Any] = {
        "_id": file_id,
        "length": length,
        "chunkSize": int(session["chunk_size"]),
        "uploadDate": now_as_stored(store.files),
    }
    if filename is not None:
        entry["filename"] = filename
    entry["metadata"] = {**metadata, "sha256": sha256}
    entry["location"] = {"storage": store.storage.kind, "key": key, "version": version}
    try:
        await store.files.insert_one(entry)
    except DuplicateKeyError as exc:
        again = await store.files.find_one({"_id": file_id})
        if again is not None:
            return dict(again)
        raise KeyTaken(
            f"{store.url}: another catalogue entry names the key {key!r}; upload again",
            storage=store.url,
            key=key,
        ) from exc
    return entry


async def head_in_place(store: ObjectStore, session: Mapping[str, Any], size: int) -> bytes:
    """The first ``size`` bytes an upload holds (fewer if it holds fewer): in its
    temp file, or in the object its finish put in place.

    :raises StoredObjectMissing: neither is there.
    """
    size = min(size, int(session["offset"]))
    if size <= 0:
        return b""  # nothing written: maybe no temp file yet
    writer = writer_of(store, {**session, "offset": 1})
    try:
        return bytes(await writer.read_head(size))
    except StoredObjectMissing:
        blobs = store.blobs
        info = await blobs.stat(session["key"])
        if info is None or not blobs.made_by(info, session["token"]):
            raise
        out = bytearray()
        async for piece in blobs.open_reader(session["key"], 0, size, version=info.version):
            out += piece
        return bytes(out)
    finally:
        await writer.abort()


async def remove_in_place(store: ObjectStore, session: Mapping[str, Any]) -> None:
    """Remove what an upload that is not attached left in the directory: its temp
    file, an object its finish put in place if no entry names it, and its key's
    reservation. An entry made for it (a finish that went that far) keeps its
    object and key: the orphan sweep judges it like any other file."""
    if session.get("into") != "directory" or "key" not in session:
        return  # no key reserved: nothing written (a creation that died)
    if await store.files.find_one({"_id": session["file_id"]}, {"_id": 1}) is not None:
        return
    key, token = session["key"], session["token"]
    await writer_of(store, {**session, "offset": 1}).discard()
    blobs = store.blobs
    info = await blobs.stat(key)
    if info is not None and isinstance(blobs, FileSystemBlobs) and blobs.made_by(info, token):
        await blobs.delete(key, version=info.version)
    await store.reservations.release(key, token=token)


def live_in_place(
    sessions: Sequence[Mapping[str, Any]], store: ObjectStore
) -> tuple[set[str], set[str], set[str]]:
    """The keys, temp file paths and tokens of ``sessions`` (uploads not done),
    which the orphan sweep must leave to them: a reservation made by one of the
    tokens is a live upload's, even one whose session does not name its key yet."""
    keys: set[str] = set()
    temps: set[str] = set()
    tokens: set[str] = set()
    for session in sessions:
        if session.get("into") != "directory":
            continue
        tokens.add(str(session["token"]))
        if "key" not in session:
            continue
        keys.add(str(session["key"]))
        temps.add(writer_of(store, {**session, "offset": 1}).temp_path)
    return keys, temps, tokens

