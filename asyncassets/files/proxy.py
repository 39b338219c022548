"""The file proxy: what ``doc.photo`` is when ``photo`` is a ``FileField``.

Every method that touches the database is awaited. Operations on a document that is
already saved take effect in the database at once, with a conditional update on
the document (see :doc:`/guarantees`); on a new document they take effect with its
first ``save()``.

As mongoengine's ``GridFSProxy`` does, the proxy forwards the stored file's
attributes: once the metadata is loaded, ``doc.photo.foo`` reads the ``foo`` given
to ``put(data, foo=...)`` (or any key of a legacy files document, such as ``md5``).
Forwarding never does I/O and never hides a missing ``load()``: before the
metadata is loaded such a name raises :class:`~asyncassets.errors.FileNotLoaded`,
and a name that is neither an attribute nor a metadata key raises
``AttributeError`` naming the keys there are.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import weakref
from collections.abc import AsyncIterator, Generator, Iterable
from typing import TYPE_CHECKING, Any

import bson
import bson.errors
from pymongo.errors import PyMongoError

from .._tasks import settle
from ..connection import DEFAULT_ALIAS, get_db
from ..errors import (
    FileAlreadyExists,
    FileConflict,
    FileNotFound,
    FileNotLoaded,
    FileNotSaved,
    GridFSError,
    StorageError,
    UploadClosed,
)
from ..storage import GridFSStorage, Storage, Store, Upload
from ..storage.catalogue import (
    content_type_of,
    original_length,
    original_sha256,
    user_metadata,
)
from ..storage.read import iter_original, read_original
from ..storage.read import verify_file as _verify_file
from .assignment import PendingData
from .rules import guarded_close, guarded_upload, guarded_write, make_guard

if TYPE_CHECKING:
    from ..fields import FileField

__all__ = ["FileProxy", "NewFile"]

_logger = logging.getLogger("asyncassets.files")

#: Largest encoded ``metadata`` sub-document accepted (a files document must stay
#: under MongoDB's 16 MiB limit).
MAX_METADATA_BYTES = 1024 * 1024


def _check_content_type(content_type: Any) -> None:
    if content_type is not None and not isinstance(content_type, str):
        raise TypeError(
            f"content_type must be a str such as 'image/png', not {type(content_type).__name__}"
        )


def _check_metadata_keys(value: Any, where: str = "") -> None:
    """Refuse keys MongoDB cannot store or query safely, before any I/O."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"file metadata keys must be strings, not {key!r}")
            if key.startswith("$") or "." in key or "\0" in key:
                raise ValueError(
                    f"file metadata key {where + key!r} is not allowed: keys may not start "
                    "with '$' or contain '.' or NUL. Rename it."
                )
            _check_metadata_keys(item, f"{where}{key}.")
    elif isinstance(value, (list, tuple)):
        for item in value:
            _check_metadata_keys(item, where)


class _Missing:
    """Marks a proxy whose files document was looked up and not found."""


_MISSING = _Missing()
#: The files document was looked up and not found (``QuerySet.load_files``).
MISSING = _MISSING

#: Names that libraries probe with ``hasattr``/``getattr(obj, name, default)`` to
#: learn what an object is (mongoengine's ``to_mongo``/``to_python``/``validate``,
#: the mapping protocol, file objects' ``name``/``closed``/``mode``/``fileno``):
#: never forwarded to the metadata, so the probe gets a plain "no" even before the
#: metadata is loaded. Such metadata keys are read through ``proxy.metadata``.
_NOT_FORWARDED = frozenset(
    {
        "to_mongo",
        "to_python",
        "to_json",
        "validate",
        "items",
        "keys",
        "values",
        "iteritems",
        "name",
        "closed",
        "mode",
        "fileno",
    }
)


# Which live proxies hold which file: (bucket name, file id) -> weak references to
# them. A file that a proxy of another document holds is never deleted by a switch
# (it is shared). By identity: proxies on the same file compare equal. Plain weak
# references, not a WeakValueDictionary per file: loading 10,000 documents made
# 10,000 of those, and the collector's work over them doubled the load time.
_holders: dict[tuple[str, Any], list[weakref.ref[FileProxy]]] = {}
# Entries whose proxies all died are dropped when the registry has grown to this
# size, which then doubles from what is left: amortised O(1) per registration.
# (Scanning at every new file once past a fixed size made loading 10,000
# documents with a FileField quadratic: 445 us per proxy instead of 7.)
_prune_at = 4096


def _register(proxy: FileProxy, file_id: Any) -> None:
    global _prune_at
    try:
        key = (proxy._collection_name, file_id)
        holders = _holders.get(key)
    except TypeError:  # an unhashable id: never shared through this registry
        return
    if holders is None:
        if len(_holders) >= _prune_at:
            for stale in [k for k, refs in _holders.items() if not _alive(refs)]:
                del _holders[stale]
            _prune_at = max(4096, 2 * len(_holders))
        _holders[key] = [weakref.ref(proxy)]
        return
    alive = _alive(holders)
    if not any(p is proxy for p in alive):
        holders[:] = [weakref.ref(p) for p in alive]
        holders.append(weakref.ref(proxy))


def _alive(refs: list[weakref.ref[FileProxy]]) -> list[FileProxy]:
    return [p for p in (r() for r in refs) if p is not None]


def _holders_of(bucket: str, file_id: Any) -> list[FileProxy]:
    try:
        holders = _holders.get((bucket, file_id))
    except TypeError:
        return []
    return _alive(holders) if holders else []


def _root_of(obj: Any) -> tuple[Any, bool]:
    """``(top-level document, orphaned)`` for a document or embedded document.

    An embedded document knows its top-level document once bound
    (``_aa_root``); else mongoengine's ``_instance`` chain (weak proxies) is
    followed. ``orphaned`` is true when that chain is broken: the parent document
    was garbage-collected, so where the file is referenced cannot be known.
    """
    try:
        while obj is not None:
            if getattr(obj, "_is_document", False):
                return obj, False
            owner = getattr(obj, "__dict__", {}).get("_aa_root")
            if owner is not None:
                return owner, False
            obj = getattr(obj, "_instance", None)
            if obj is not None:
                obj.__class__  # noqa: B018  (raises ReferenceError on a dead weakref.proxy)
    except ReferenceError:
        return None, True
    return None, False


class FileProxy:
    """Handle on one GridFS file referenced by a document field.

    Also importable as mongoengine's name for it, ``GridFSProxy``.

    Holds the file id (``file_id``, no I/O); the file's metadata once something
    loaded it (``read``, ``stream``, ``put``, ``close``, ``replace``, ``load``, or
    the query that loaded the document); and at most one streaming upload in
    progress.
    """

    #: Data assigned to the field (``doc.photo = data``) that the next ``save()``
    #: uploads; see :mod:`asyncassets.files.assignment`. (A class default: most
    #: proxies are loaded, and loading must not pay for it.)
    _assignment: PendingData | None = None

    def __init__(
        self,
        grid_id: Any = None,
        *,
        field: FileField | None = None,
        instance: Any = None,
        key: str | None = None,
        collection_name: str | None = None,
        db_alias: str | None = None,
        storage: Storage | None = None,
    ) -> None:
        self._grid_id: Any = None
        self._field = field
        #: A storage given by hand (an image's thumbnail: its image's storage).
        self._storage = storage
        if storage is not None and collection_name is None:
            collection_name = storage.collection_name
        self._collection_name = collection_name or (field.collection_name if field else "fs")
        self._db_alias = db_alias if db_alias is not None else (field.db_alias if field else None)
        self._instance = instance
        self._key = key
        self._files_doc: dict[str, Any] | _Missing | None = None
        self._upload: Upload | None = None
        #: The file a streaming upload in progress will replace when it is closed.
        self._upload_previous: Any = None
        self._encoding: str | None = None
        self._position = 0
        self._guard: Any = None  # the checks of the streaming upload in progress
        #: Set for ids assigned by hand (``doc.photo = some_id``): save() checks them.
        self._unverified = False
        #: Set while the file is referenced in memory only (a document or list element
        #: not saved yet): save() checks it still exists (the orphan sweep may have
        #: removed it if the save comes later than the sweep's grace).
        self._pending = False
        #: The id came from elsewhere (assigned by hand, or copied from another
        #: document): it may be referenced elsewhere, so it is never deleted from here.
        self._assigned = False
        #: The top-level document this proxy belongs to (set when it is bound).
        self._owner: Any = None
        #: Set when the proxy's embedded document lost its parent document.
        self._orphaned = False
        #: Resolved when a ``close()`` in flight has settled.
        self._closing: asyncio.Future[None] | None = None
        #: The upload each task last opened or wrote to, and which task aborted an
        #: upload: a task whose upload was aborted must not write into the next one.
        #: (Made at the first streaming upload: most proxies are loaded, never written.)
        self._writers: weakref.WeakKeyDictionary[asyncio.Task[Any], Upload] | None = None
        self._aborted_by: weakref.WeakKeyDictionary[Upload, Any] | None = None
        #: Set once ``new_file()`` opened a streaming upload on this proxy: from then
        #: on ``close()`` without an open upload raises instead of doing nothing.
        self._streamed = False
        self.grid_id = grid_id

    # -- where it lives ---------------------------------------------------------

    def _bind(self, instance: Any, key: str | None) -> None:
        self._instance = instance
        self._key = key
        if self._owner is None and instance is not None:
            self._owner, self._orphaned = _root_of(instance)

    @property
    def grid_id(self) -> Any:
        """The id of the file this proxy holds (``None``: empty). See :attr:`file_id`."""
        return self._grid_id

    @grid_id.setter
    def grid_id(self, value: Any) -> None:
        self._grid_id = value
        if value is not None:
            _register(self, value)

    def _set_file(self, file_id: Any, files_doc: dict[str, Any] | None) -> None:
        self.grid_id = file_id
        self._files_doc = files_doc
        self._position = 0

    def _copy(self) -> FileProxy:
        """A proxy on the same file for another document (the file is then shared)."""
        clone = type(self)(
            field=self._field,
            collection_name=self._collection_name,
            db_alias=self._db_alias,
            storage=self._storage,
        )
        clone.grid_id = self.grid_id
        clone._files_doc = self._files_doc
        clone._unverified = self._unverified
        clone._pending = self._pending
        clone._assigned = True
        clone._assignment = self._assignment
        return clone

    def _identity(self) -> Any:
        """Which stored reference this proxy stands for (stale copies share it)."""
        root = self._root()
        if root is None:
            return ("proxy", id(self))
        if getattr(root, "pk", None) is not None and not getattr(root, "_created", True):
            return ("doc", type(root)._get_collection_name(), root.pk)
        return ("object", id(root))

    def _shared_elsewhere(self, file_id: Any) -> bool:
        """Whether a live proxy of another document holds ``file_id``.

        Only proxies inside a document count: a free proxy (made by hand, or a
        temporary one mongoengine builds while copying a document) references
        nothing stored.
        """
        mine = self._identity()
        return any(
            other is not self
            and other.grid_id == file_id
            and other._root() is not None
            and other._identity() != mine
            for other in _holders_of(self._collection_name, file_id)
        )

    def _may_delete(self, file_id: Any) -> bool:
        """Whether deleting ``file_id`` cannot leave another reference dangling."""
        if file_id == self.grid_id and self._assigned:
            return False
        return not self._shared_elsewhere(file_id)

    @property
    def collection_name(self) -> str:
        """The bucket name (``fs`` unless the field says otherwise)."""
        return self._collection_name

    @property
    def db_alias(self) -> str:
        """The connection alias of the bucket: the field's, else the document's."""
        if self._db_alias is not None:
            return self._db_alias
        root = self._root()
        if root is not None:
            return str(root._meta.get("db_alias") or DEFAULT_ALIAS)
        return DEFAULT_ALIAS

    @property
    def storage(self) -> Storage:
        """Where the file's bytes live: the field's storage (GridFS by default)."""
        storage = self._storage or getattr(self._field, "storage", None)
        if isinstance(storage, Storage) and storage.collection_name == self._collection_name:
            return storage
        # A proxy without a field, or made for another bucket (get_proxy_obj).
        chunk_size = self._field.chunk_size if self._field and self._field.chunk_size else None
        return GridFSStorage(self._collection_name, chunk_size=chunk_size)

    def _bucket(self) -> Store:
        return self.storage.bind(get_db(self.db_alias))

    def _upload_context(self) -> dict[str, Any]:
        """What the storage's key template may use: the document and the field."""
        return {"document": self._root(), "field": self._key or getattr(self._field, "name", None)}

    def _root(self) -> Any:
        if self._owner is not None:
            return self._owner
        root, _orphaned = _root_of(self._instance)
        return root

    # -- metadata ---------------------------------------------------------------

    @property
    def file_id(self) -> Any:
        """The GridFS ``_id`` of the file, or ``None`` when the field is empty. No I/O."""
        return self.grid_id

    def _doc(self, attribute: str | None = None) -> dict[str, Any] | None:
        if self._assignment is not None:
            self._refuse_unsaved(f"its {attribute!r}" if attribute else "its metadata")
        if self.grid_id is None:
            return None
        if isinstance(self._files_doc, _Missing):
            raise FileNotFound(self.grid_id, self._collection_name, self.db_alias)
        if self._files_doc is None:
            what = f" so its {attribute!r} cannot be read" if attribute else ""
            raise FileNotLoaded(
                f"The metadata of file {self.grid_id!r} is not loaded yet,{what}: "
                "`await doc.<field>.load()` first (or read it). Documents loaded by a "
                "query come with it, unless the query said no_files()."
            )
        return self._files_doc

    def _refuse_unsaved(self, what: str) -> None:
        name = self._key or getattr(self._field, "name", None) or "field"
        raise FileNotSaved(
            f"{name} holds data assigned to it that is not uploaded yet, so {what} "
            "cannot be read: `await doc.save()` first (filename, content_type and, "
            "for bytes, length are known before)."
        )

    @property
    def metadata(self) -> dict[str, Any]:
        """``content_type`` and the extra keywords given at upload, as a new dict."""
        doc = self._doc()
        if doc is None:
            return {}
        return user_metadata(doc)

    @property
    def content_type(self) -> str | None:
        """The MIME type given at upload (``None`` when none was)."""
        if self._assignment is not None:
            return self._assignment.content_type
        doc = self._doc()
        return None if doc is None else content_type_of(doc)

    @property
    def filename(self) -> str | None:
        """The file name stored with the file."""
        if self._assignment is not None:
            return self._assignment.filename
        doc = self._doc()
        return None if doc is None else doc.get("filename")

    @property
    def length(self) -> int | None:
        """Size in bytes (of the original bytes, for a compressed file)."""
        if self._assignment is not None and self._assignment.length is not None:
            return self._assignment.length
        doc = self._doc("length")
        return None if doc is None else original_length(doc)

    @property
    def upload_date(self) -> dt.datetime | None:
        """When the upload completed (server time, as stored)."""
        doc = self._doc()
        return None if doc is None else doc.get("uploadDate")

    @property
    def chunk_size(self) -> int | None:
        """The GridFS chunk size the file was written with."""
        doc = self._doc()
        return None if doc is None else int(doc["chunkSize"])

    @property
    def sha256(self) -> str | None:
        """Hex SHA-256 of the bytes, recorded at upload (``None`` for legacy files)."""
        doc = self._doc()
        return None if doc is None else original_sha256(doc)

    @property
    def md5(self) -> str | None:
        """The GridFS ``md5`` of a legacy file (older drivers, mongoengine, mongomotor).

        ``None`` for files asyncassets wrote: they carry :attr:`sha256` instead.
        """
        doc = self._doc()
        value = None if doc is None else doc.get("md5")
        return None if value is None else str(value)

    @property
    def aliases(self) -> list[Any] | None:
        """The GridFS ``aliases`` of a legacy file (``None`` when it has none)."""
        doc = self._doc()
        return None if doc is None else doc.get("aliases")

    # Only reached for names the class does not define. Hidden from type checkers,
    # which would otherwise accept any misspelt attribute.
    if not TYPE_CHECKING:

        def __getattr__(self, attribute: str) -> Any:
            if attribute.startswith("_"):
                if attribute == "_id" and "_grid_id" in self.__dict__:
                    return self._grid_id  # GridOut's name for the file id
                raise AttributeError(attribute)
            owner = type(self).__name__
            if attribute in _NOT_FORWARDED:
                raise AttributeError(f"{owner!r} object has no attribute {attribute!r}")
            doc = self._doc(attribute)  # FileNotLoaded / FileNotFound, never a silent None
            if doc is None:
                raise AttributeError(
                    f"{owner!r} object has no attribute {attribute!r}: the field holds no "
                    "file, so there is no metadata to read it from."
                )
            metadata = user_metadata(doc)
            if attribute in metadata:
                return metadata[attribute]
            if attribute in doc:  # a spec key with no property of its own (chunkSize...)
                return doc[attribute]
            keys = ", ".join(sorted(metadata)) or "none"
            raise AttributeError(
                f"{owner!r} object has no attribute {attribute!r}, and file "
                f"{self.grid_id!r} has no metadata key {attribute!r} (its metadata keys: "
                f"{keys}). Keywords given to put() are read as proxy.<key> or "
                "proxy.metadata['<key>']."
            )

    async def verify(self) -> bool | None:
        """Re-read the file and check it against the checksum recorded at upload.

        :returns: ``True``; ``None`` when the field holds no file.
        :raises IntegrityError: the bytes no longer match (the message names the file).
        :raises ChecksumMissing: a legacy file with no checksum to check against.
        :raises FileNotFound: the referenced file is missing.
        """
        doc = await self._fetch()
        return None if doc is None else await _verify_file(self._bucket(), doc)

    def _companions(self) -> tuple[FileProxy, ...]:
        """Proxies whose entries a query loads along with this one's (once it is
        loaded): an image's thumbnail. None for a plain file."""
        return ()

    @property
    def loaded(self) -> bool:
        """True when the metadata attributes can be read without ``await load()``."""
        return self.grid_id is None or isinstance(self._files_doc, dict)

    async def load(self) -> FileProxy:
        """Fetch the file's metadata from its bucket (fresh, every call).

        :raises FileNotFound: the document references a file that is not there.
        """
        await self._fetch()
        return self

    async def get(self, grid_id: Any = None) -> FileProxy | None:
        """mongoengine's ``get()``: this proxy with the file's metadata loaded.

        The proxy then answers what mongoengine's ``GridOut`` did (``filename``,
        ``length``, ``md5``, the metadata keys as attributes, ``read()``...).

        :param grid_id: accepted for mongoengine's signature; it must be the id the
            field holds (to point the field at another file, assign it:
            ``doc.photo = file_id``).
        :returns: the proxy, or ``None`` when the field holds no file.
        :raises FileNotFound: the referenced file is missing (mongoengine returned
            ``None``; ``FileNotFound`` is a ``gridfs.errors.NoFile``).
        """
        if grid_id is not None and grid_id != self.grid_id:
            raise ValueError(
                f"get({grid_id!r}) would switch this field to another file without "
                "telling its document; assign it instead (`doc.<field> = file_id`, "
                "then `await doc.save()`), and call get() without an id."
            )
        if self.grid_id is None:
            return None
        return await self.load()

    async def _fetch(self) -> dict[str, Any] | None:
        if self._assignment is not None:
            self._refuse_unsaved("the file")
        if self.grid_id is None:
            return None
        bucket = self._bucket()
        known = self._files_doc
        if (
            isinstance(known, dict)
            and known.get("_id") == self.grid_id
            and getattr(bucket, "reuses_entries", False)
        ):
            # An object storage's read checks the object's version the entry
            # recorded, so the entry loaded is as good as a fresh one (a file
            # deleted or replaced since is reported by the read itself). GridFS
            # looks its files document up.
            return known
        doc = await bucket.find(self.grid_id)
        if doc is None:
            self._files_doc = _MISSING
            raise FileNotFound(self.grid_id, self._collection_name, self.db_alias)
        self._files_doc = doc
        return doc

    # -- reading ----------------------------------------------------------------

    async def read(self, size: int = -1, verify: bool = False) -> bytes | None:
        """Read the file.

        ``read()`` returns the whole content, whatever the position (a second call
        returns it again); ``read(n)`` returns up to ``n`` bytes from the current
        position and advances it (see :meth:`seek`).

        :param verify: check the bytes against the recorded checksum as they are
            read (the whole file is read, even for ``read(n)``).
        :returns: the bytes, or ``None`` when the field holds no file.
        :raises FileNotFound: the referenced file is missing from its bucket.
        :raises CorruptFile: its chunks do not match its files document.
        :raises IntegrityError: ``verify`` and the bytes do not match.
        :raises ChecksumMissing: ``verify`` on a file without a recorded checksum.
        """
        doc = await self._fetch()
        if doc is None:
            return None
        length = original_length(doc)
        start = 0 if size is None or size < 0 else min(self._position, length)
        end = length if size is None or size < 0 else min(start + size, length)
        data = await read_original(self._bucket(), doc, start, end, verify=verify)
        self._position = end
        return data

    async def stream(
        self, start: int = 0, end: int | None = None, verify: bool = False
    ) -> AsyncIterator[bytes]:
        """Yield the bytes ``[start, end)`` in chunk-sized pieces, in O(chunk) memory.

        Only the chunks covering the range are fetched (a compressed file is
        decompressed from its start).

        :param verify: hash every byte of the file as it passes and raise
            :class:`~asyncassets.errors.IntegrityError` after the last piece if it
            does not match the recorded checksum.
        :raises ValueError: the range is outside the file.
        :raises FileNotFound: the referenced file is missing.
        """
        doc = await self._fetch()
        if doc is None:
            return
        download = iter_original(self._bucket(), doc, start, end, verify=verify)
        try:
            async for piece in download:
                yield piece
        finally:
            await download.aclose()

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self.stream()

    async def url(
        self,
        expires: float | dt.timedelta = 3600,
        *,
        download: bool = False,
        filename: str | None = None,
    ) -> str | None:
        """A URL a browser can fetch the file from, valid for ``expires`` (seconds).

        On S3, a presigned URL (at most 7 days) or the storage's ``public_url``; on
        GridFS and a directory, a URL of :func:`asyncassets.web.files_app` signed
        over the file's id and SHA-256, so replacing its bytes revokes it. See
        :func:`asyncassets.files.urls.file_url` and :doc:`/serving`.

        :param download: served as an attachment (a download) rather than inline.
        :param filename: the name to save it as (the stored file name by default).
        :returns: the URL, or ``None`` when the field holds no file.
        :raises URLsNotConfigured: GridFS or a directory, and no signing key is set.
        :raises FileNotFound: the referenced file is missing.
        """
        doc = await self._fetch()
        if doc is None:
            return None
        from .urls import file_url

        return await file_url(
            self.storage, self.db_alias, doc, expires=expires, download=download, filename=filename
        )

    def seek(self, pos: int, whence: int = 0) -> int:
        """Move the position used by ``read(n)`` and ``readchunk()``.

        ``whence`` is 0 (from the start), 1 (from the position) or 2 (from the end;
        needs the metadata loaded).
        """
        if whence == 0:
            new = pos
        elif whence == 1:
            new = self._position + pos
        elif whence == 2:
            length = self.length
            new = (length or 0) + pos
        else:
            raise ValueError(f"seek() whence must be 0, 1 or 2, not {whence!r}")
        if new < 0:
            raise ValueError(f"seek() to a negative position ({new})")
        self._position = new
        return new

    def tell(self) -> int:
        """The position used by ``read(n)`` and ``readchunk()``."""
        return self._position

    async def readchunk(self) -> bytes:
        """Read from the position to the end of its chunk; ``b""`` at the end."""
        doc = await self._fetch()
        if doc is None:
            return b""
        length, chunk_size = original_length(doc), int(doc["chunkSize"])
        start = min(self._position, length)
        end = min(length, (start // chunk_size + 1) * chunk_size)
        if start >= end:
            return b""
        data = await read_original(self._bucket(), doc, start, end)
        self._position = end
        return data

    # -- writing ----------------------------------------------------------------

    def _refuse_if_full(self, what: str) -> None:
        self._refuse_if_assigned(what)
        if self._upload is not None:
            raise GridFSError(
                f"{what}: a streaming upload is already open on this field; "
                "close() or abort() it first."
            )
        if self.grid_id is not None:
            raise FileAlreadyExists(
                "This document already has a file. Either delete it or call "
                "replace to overwrite it."
            )

    def _refuse_if_assigned(self, what: str) -> None:
        if self._assignment is not None:
            raise GridFSError(
                f"{what}: this field holds data assigned to it that save() has not "
                "uploaded yet. Save the document first, or assign the data instead."
            )

    @staticmethod
    def _metadata(content_type: str | None, extra: dict[str, Any]) -> dict[str, Any]:
        _check_content_type(content_type)
        _check_metadata_keys(extra)
        meta = dict(extra)
        if content_type is not None:
            meta["content_type"] = content_type
        try:
            size = len(bson.encode(meta))
        except bson.errors.InvalidDocument as exc:
            raise TypeError(
                f"file metadata cannot be stored: {exc}. Metadata values must be what "
                "MongoDB stores: str, int, float, bool, None, datetime, bytes, ObjectId, "
                "lists and dicts of them."
            ) from None
        if size > MAX_METADATA_BYTES:
            raise ValueError(
                f"file metadata is {size} bytes encoded; the limit is {MAX_METADATA_BYTES}. "
                "Store large data as a file of its own."
            )
        return meta

    async def put(
        self,
        data: Any,
        content_type: str | None = None,
        filename: str | None = None,
        **metadata: Any,
    ) -> FileProxy:
        """Upload ``data`` as this field's file.

        :param data: ``bytes``, a binary file object (``read(n)``), an async one
            (``await read(n)``), or an (async) iterable of bytes; read in pieces.
        :param content_type: stored as ``metadata.content_type``.
        :param filename: stored as the GridFS ``filename``.
        :param metadata: further keywords, stored in the ``metadata`` sub-document.
        :raises FileAlreadyExists: the field already holds a file (use :meth:`replace`).
        :raises TypeError: ``data`` is not something bytes can be read from.
        :raises FileValidationError: the field's rules refused the file; nothing stored.
        :raises FileConflict: on a saved document, another writer set the field first;
            the upload was removed.
        """
        self._refuse_if_full("put()")
        doc = await self._upload_new(data, content_type, filename, metadata)
        await self._commit(doc, previous=None)
        return self

    async def _upload_new(
        self, data: Any, content_type: str | None, filename: str | None, metadata: dict[str, Any]
    ) -> dict[str, Any]:
        """Check the inputs, then store ``data`` as a new file; return its files document."""
        self._refuse_if_orphaned()
        self._metadata(content_type, metadata)  # refuse bad metadata before any I/O
        bucket = self._bucket()
        await bucket.ensure_indexes()
        return await self._store(bucket, data, content_type, filename, metadata)

    async def _store(
        self,
        bucket: Store,
        data: Any,
        content_type: str | None,
        filename: str | None,
        metadata: dict[str, Any],
    ) -> dict[str, Any]:
        """Upload ``data`` through the field's checks (see :mod:`.rules`)."""
        _check_content_type(content_type)
        return await guarded_upload(
            self, bucket, data, content_type, filename, self._metadata(None, metadata)
        )

    async def replace(
        self,
        data: Any,
        content_type: str | None = None,
        filename: str | None = None,
        **metadata: Any,
    ) -> FileProxy:
        """Upload ``data`` as the new file, then drop the old one.

        The new file is complete before the reference moves; on a saved document the
        reference moves with a conditional update, and the old file is deleted only
        after that succeeded, and only if no other live document holds it and it was
        not assigned by hand (see :doc:`/guarantees`). Metadata is replaced too. Same
        inputs as :meth:`put`.

        :raises FileConflict: another task changed this file first; the upload made
            here was removed again and the stored document is unchanged.
        :raises pymongo.errors.PyMongoError: the switch failed; when its outcome is
            unknown (a lost reply, a write-concern error), neither file was deleted
            and the proxy holds the file the stored document was read back to hold.
        """
        self._refuse_if_assigned("replace()")
        if self._upload is not None:
            raise GridFSError(
                "replace(): a streaming upload is open on this field; close it first."
            )
        previous = self.grid_id  # what this call replaces, fixed before it uploads
        doc = await self._upload_new(data, content_type, filename, metadata)
        await self._commit(doc, previous=previous)
        return self

    async def adopt(self, files_doc: dict[str, Any]) -> FileProxy:
        """Make a complete file already stored in this field's storage (its
        catalogue entry ``files_doc``) this field's file, as :meth:`replace` does
        with the file it uploads: the reference moves with the same switch, and the
        old file is deleted only after.

        For writers that store a file by other means than :meth:`put` (a resumable
        upload, :doc:`/uploads`), having applied the field's rules themselves.

        The same entry adopted twice (a retried finish racing the first) is not a
        conflict: the second call finds the document already holding that file and
        leaves it so.

        :raises FileConflict: another task changed this file first; the adopted file
            was removed (unless a document holds it).
        :raises pymongo.errors.PyMongoError: as :meth:`replace`.
        """
        if self._upload is not None:
            raise GridFSError("adopt(): a streaming upload is open on this field; close it first.")
        previous = self.grid_id
        await self._commit(dict(files_doc), previous=previous)
        return self

    async def delete(self) -> None:
        """Remove the file and this field's reference to it.

        On a saved document the reference is removed from the database first (a
        conditional update), then the file; a list element is removed from its list.
        Deleting an empty field does nothing.

        :raises FileConflict: the stored document no longer references this file.
        """
        if self._closing is not None:
            # A close() of this field's upload is settling: delete what it leaves.
            await asyncio.shield(self._closing)
        if self._upload is not None:
            await self.abort()
        self._assignment = None  # data assigned and not saved: nothing stored to delete
        old = self.grid_id
        if old is None:
            return
        self._refuse_if_orphaned()
        await self._move(old, None)

    async def _delete_stored(self, file_id: Any) -> None:
        """Delete a stored file of this field (an image also deletes its thumbnail)."""
        await self._bucket().delete(file_id)

    async def _drop_replaced(self, file_id: Any) -> None:
        """Delete ``file_id`` once no stored reference of this field holds it (a
        replace or delete whose switch applied, a cascade after its documents).

        The change is made and a failure here cannot undo it, so a storage or
        server error is logged (the ``asyncassets.files`` logger), not raised: what
        is left is named by no reference, its key stays reserved, and the orphan
        sweep removes it.
        """
        try:
            await self._delete_stored(file_id)
        except (StorageError, PyMongoError) as exc:
            _logger.warning(
                "file %r of %s was dereferenced but could not be deleted (%s); it is "
                "left to the orphan sweep", file_id, self._collection_name, exc,
            )

    def _refuse_if_orphaned(self) -> None:
        if self._orphaned and self._owner is None:
            raise FileConflict(
                "This file proxy's embedded document has lost the document it belongs "
                "to (the parent was garbage-collected), so the stored reference cannot "
                "be updated. Keep a reference to the document, or load it again and use "
                "its field."
            )

    async def _commit(self, new_doc: dict[str, Any], previous: Any) -> None:
        """Point the field at the freshly uploaded ``new_doc``, then drop ``previous``."""
        await self._move(previous, new_doc)

    async def _move(self, old: Any, new_doc: dict[str, Any] | None) -> None:
        """Have the reference moved from ``old`` to ``new_doc``'s file (``None``: removed).

        The document this proxy belongs to does it (its reference writer: conditional
        update, first-save and unknown-outcome rules). A proxy that belongs to no
        document has no stored reference to move: it changes in memory only.
        """
        root = self._root()
        writer = getattr(root, "_switch_file_reference", None)
        if writer is not None:
            await writer(self, old, new_doc)
            return
        new_id = None if new_doc is None else new_doc["_id"]
        if self.grid_id != old:
            if new_id is not None and not self._shared_elsewhere(new_id):
                await self._delete_stored(new_id)
            raise FileConflict(
                f"This field changed to file {self.grid_id!r} while the upload of "
                f"{new_id!r} ran; the upload was removed. Retry on the current state."
            )
        drop_old = old is not None and self._may_delete(old)
        self._set_file(new_id, new_doc)
        self._assigned = False
        if drop_old:
            await settle(self._drop_replaced(old))

    # -- streaming upload -------------------------------------------------------

    def new_file(
        self,
        content_type: str | None = None,
        filename: str | None = None,
        encoding: str | None = None,
        replace: bool = True,
        **metadata: Any,
    ) -> NewFile:
        """Start a streaming upload; ``await`` it or use it with ``async with``.

        .. code-block:: python

            async with doc.photo.new_file(content_type="text/plain"):
                doc.photo.write(b"some-data")      # awaiting write() is optional here
            await doc.save()

        The block closes the file when it ends normally, and aborts it (removing
        every chunk written) on an exception or cancellation.

        On a field that already holds a file this is a streamed :meth:`replace`:
        the old file goes only once the new one is closed and referenced.

        :param encoding: lets :meth:`write` take ``str``, encoded with it.
        :param replace: ``False`` refuses a field that already holds a file.
        :raises FileAlreadyExists: the field holds a file and ``replace`` is false.
        """
        self._refuse_if_assigned("new_file()")
        if self._upload is not None or self._closing is not None:
            raise GridFSError("new_file(): a streaming upload is already open on this field.")
        self._refuse_if_orphaned()
        if self.grid_id is not None and not replace:
            self._refuse_if_full("new_file()")
        _check_content_type(content_type)
        guard = make_guard(self, content_type, filename, self._metadata(None, metadata))
        bucket = self._bucket()
        self._upload = bucket.open_upload(
            filename=guard.filename, metadata=guard.metadata, context=self._upload_context()
        )
        self._remember_writer(self._upload)
        self._streamed = True
        self._guard = guard
        self._upload_previous = self.grid_id
        self._encoding = encoding
        return NewFile(self, bucket, self._upload)

    def _stream(self, what: str) -> Upload:
        if self._upload is None:
            raise UploadClosed(f"{what}: no upload is open; call new_file() first.")
        return self._upload

    def _as_bytes(self, data: Any) -> bytes | bytearray | memoryview:
        if isinstance(data, (bytes, bytearray, memoryview)):
            return data
        if isinstance(data, str):
            if self._encoding is None:
                raise TypeError(
                    "write() got str but new_file() was given no encoding: pass "
                    "bytes, or new_file(encoding='utf-8')."
                )
            return data.encode(self._encoding)
        raise TypeError(f"write() takes bytes (or str with an encoding), not {type(data).__name__}")

    def write(self, data: bytes | bytearray | memoryview | str) -> _Flush:
        """Append ``data`` to the open upload.

        The bytes are buffered at once; awaiting the result sends complete chunks
        to the server, which keeps memory bounded for long streams.

        :raises UploadClosed: no upload is open.
        :raises TypeError: ``data`` is not bytes (or ``str`` with an encoding).
        """
        stream = self._stream("write()")
        task = _current_task()
        writers = self._writers
        last = writers.get(task) if task is not None and writers is not None else None
        if last is not None and last is not stream:
            raise UploadClosed(
                "write(): the upload this task was writing was closed or aborted (by "
                "another task?), and another upload is open on this field now; this "
                "task's bytes will not go into it. Start a new_file() in this task."
            )
        self._remember_writer(stream)
        guarded_write(self._guard, stream, self._as_bytes(data))
        return _Flush(stream)

    def _remember_writer(self, stream: Upload) -> None:
        task = _current_task()
        if task is not None:
            if self._writers is None:
                self._writers = weakref.WeakKeyDictionary()
            self._writers[task] = stream

    async def writelines(self, lines: Iterable[bytes | str]) -> None:
        """Write every item of ``lines``, flushing as it goes."""
        for line in lines:
            await self.write(line)

    async def close(self) -> FileProxy:
        """Finish the upload and point the field at the new file.

        While it runs, ``abort()`` raises :class:`~asyncassets.errors.UploadClosed`
        (the upload is being closed) and ``delete()`` waits for it, then deletes the
        file it committed.

        On a proxy that never opened a streaming upload (after ``put()``, say) it
        does nothing, as in mongoengine.

        :raises UploadClosed: ``new_file()`` was used on this proxy and no upload is
            open: the one this call would finish was closed or aborted already
            (perhaps by another task), so succeeding could hide lost bytes.
        :raises FileConflict: see :meth:`replace`; the new file was removed.
        """
        if self._upload is None and self._closing is None and not self._streamed:
            return self
        stream = self._stream("close()")
        self._upload = None
        closing = asyncio.get_running_loop().create_future()
        self._closing = closing
        try:
            try:
                doc = await guarded_close(self._guard, stream, self._bucket())
            except BaseException:
                await asyncio.shield(stream.abort())
                raise
            await self._commit(doc, previous=self._upload_previous)
        finally:
            self._closing = None
            closing.set_result(None)
        return self

    async def abort(self) -> None:
        """Abandon the upload and remove every chunk it wrote.

        :raises UploadClosed: no upload is open, or its ``close()`` is under way.
        """
        if self._closing is not None:
            raise UploadClosed(
                "abort(): this upload is being closed by a close() in flight, too late to "
                "abort it. Await the close, then `await proxy.delete()` if the file is "
                "not wanted."
            )
        stream = self._stream("abort()")
        self._upload = None
        if self._aborted_by is None:
            self._aborted_by = weakref.WeakKeyDictionary()
        self._aborted_by[stream] = _current_task()
        await asyncio.shield(stream.abort())

    @property
    def key(self) -> str | None:
        """The key of the file's object in a directory or S3 storage: the entry's
        ``location.key`` (``2026/12/3f2c....jpg``; ``poster/photo-2.jpg`` when the
        template's key was taken), or, for a ``QueuedStorage`` field, the key of
        the copy being served.

        Read from the loaded metadata (no I/O). ``None`` for an empty field and
        for a GridFS file.
        """
        doc = self._doc("key")
        if doc is None:
            return None
        remote = doc.get("remote")
        if isinstance(remote, dict) and isinstance(remote.get("key"), str):
            return str(remote["key"])
        location = doc.get("location")
        if isinstance(location, dict) and isinstance(location.get("key"), str):
            return str(location["key"])
        return None

    # -- queued transfer (QueuedStorage fields) -----------------------------------
    # Only asks the store: the queue itself lives in asyncassets.storage.queued.

    @property
    def location(self) -> str | None:
        """Where the served bytes of a ``QueuedStorage`` field's file are: ``"local"``
        until the transfer stored and checked the remote copy, then ``"remote"``.

        Read from the loaded metadata (no I/O; ``await load()`` for a fresh answer).
        ``None`` for an empty field and for the other storages.
        """
        doc = self._doc("location")
        if doc is None:
            return None
        where = getattr(self._bucket(), "location_of", None)
        return None if where is None else where(doc)

    async def transfer(self, *, background: bool = False) -> str | None:
        """Move a ``QueuedStorage`` field's file to the remote storage now.

        For a ``delayed=True`` storage (django-queued-storage's ``DelayedStorage``)
        this is how a file is queued at all, once it was processed locally. The
        transfer runs in this task (a file a worker is moving right now is waited
        for); with ``background=True`` it is only queued for the transfer workers.

        :returns: :attr:`location` afterwards (``None`` for an empty field).
        :raises GridFSError: the field's storage is not a ``QueuedStorage``.
        :raises TransferFailed: the transfer failed; the local copy is still
            served, and the failure is recorded (retried later, or ``failed``).
        :raises FileNotFound: the referenced file is missing.
        """
        if self.grid_id is None:
            return None
        store = self._bucket()
        transfer = getattr(store, "transfer", None)
        if transfer is None:
            raise GridFSError(
                f"transfer(): the field's storage {self.storage!r} is not a QueuedStorage; "
                "its files are where they were stored already."
            )
        if background:
            await store.release(self.grid_id)  # type: ignore[attr-defined]
            await self.load()
        else:
            self._files_doc = await transfer(self.grid_id)
        return self.location

    # -- plumbing -----------------------------------------------------------------

    def __bool__(self) -> bool:
        return self.grid_id is not None or self._assignment is not None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FileProxy):
            return NotImplemented
        return (self.grid_id, self._collection_name, self.db_alias) == (
            other.grid_id,
            other._collection_name,
            other.db_alias,
        )

    def __hash__(self) -> int:
        return hash((self.grid_id, self._collection_name))

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: {self._collection_name} {self.grid_id!r}>"

    #: The class's name in mongoengine, which ``str()`` shows.
    _mongoengine_name = "GridFSProxy"

    def __str__(self) -> str:
        """mongoengine's form, ``<GridFSProxy: marmot.jpg (<id>)>``, without I/O.

        Named as mongoengine names the class (``GridFSProxy``, ``ImageGridFsProxy``:
        asyncassets exports both names), so ported code that compares it works; a
        subclass of your own shows its own name. The file name is there once the
        catalogue entry is at hand (documents loaded by a query come with it);
        ``<not loaded>`` before, ``<no file>`` for an empty field or a file found
        missing.
        """
        name = type(self).__dict__.get("_mongoengine_name", type(self).__name__)
        if self._assignment is not None:
            return f"<{name}: {self._assignment.filename} (not saved)>"
        if self.grid_id is None or isinstance(self._files_doc, _Missing):
            label = "<no file>"
        elif self._files_doc is None:
            label = "<not loaded>"
        else:
            label = str(self._files_doc.get("filename"))
        return f"<{name}: {label} ({self.grid_id})>"


_NOT_ABORTED = object()


def _current_task() -> asyncio.Task[Any] | None:
    try:
        return asyncio.current_task()
    except RuntimeError:  # no running loop
        return None


class _Flush:
    """What ``write()`` returns: awaiting it flushes; not awaiting it is fine too."""

    __slots__ = ("_stream",)

    def __init__(self, stream: Upload) -> None:
        self._stream = stream

    def __await__(self) -> Generator[Any, None, None]:
        return self._stream.flush().__await__()


class NewFile:
    """What ``new_file()`` returns: awaitable, and an async context manager."""

    def __init__(self, proxy: FileProxy, bucket: Store, stream: Upload) -> None:
        self._proxy = proxy
        self._bucket = bucket
        self._stream = stream

    async def _open(self) -> FileProxy:
        await self._bucket.ensure_indexes()
        return self._proxy

    def __await__(self) -> Generator[Any, None, FileProxy]:
        return self._open().__await__()

    async def __aenter__(self) -> FileProxy:
        try:
            return await self._open()
        except BaseException:
            await self._proxy.abort()
            raise

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        proxy, stream = self._proxy, self._stream
        if proxy._upload is not stream:
            # Closed or aborted already. Aborted by another task, the block must not
            # end as if its file were stored.
            aborted = proxy._aborted_by
            aborted_by = _NOT_ABORTED if aborted is None else aborted.get(stream, _NOT_ABORTED)
            if exc_type is None and aborted_by is not _NOT_ABORTED:
                if aborted_by is not _current_task():
                    raise UploadClosed(
                        "the upload of this `async with new_file()` block was aborted by "
                        "another task; nothing was stored."
                    )
            return
        if exc_type is None:
            await self._proxy.close()
        else:
            await self._proxy.abort()
