"""Storages: where a field's bytes live, declared once on the field.

A storage is a small, immutable description (a GridFS bucket, a directory, an
S3 bucket and prefix) that a :class:`~asyncassets.FileField` carries::

    class Movie(Document):
        poster = FileField(storage=FileSystemStorage("/srv/media/posters"))
        trailer = FileField(storage=S3Storage(bucket="media", prefix="trailers/"))
        still = FileField()   # GridFSStorage("fs"), as before

Whatever the storage, MongoDB keeps the catalogue: one document per file in
``<collection_name>.files`` (filename, length, content type, upload date,
SHA-256, the user's metadata, and for a directory or S3 the key of the bytes),
and the document's field keeps the file's ``_id``. :meth:`Storage.bind` joins a
storage to a database and returns the store the file layer talks to: a
:class:`~asyncassets.storage.gridfs.GridBucket`, or a
:class:`~asyncassets.storage.objects.store.ObjectStore` over a directory or
bucket. Both answer the same calls (``open_upload``, ``upload``, ``find``,
``find_many``, ``open_download``, ``read``, ``delete``), so the file proxy, the
read path, the sweep and the check are written once for every storage.

One catalogue belongs to one storage, so each place has a catalogue of its own by
default: ``fs`` for GridFS (its bucket), ``fs_local_<directory name>`` for a
directory, ``fs_s3_<bucket>[_<prefix>]`` for S3 and
``fs_queued_[<local directory name>_]<remote>`` for a queued storage
(:func:`default_collection_name`). Two fields that name the same
``collection_name`` on the same database must declare equal storages: declaring
a document class that disagrees with one declared before raises
:class:`~asyncassets.errors.StorageConflict`, saying which fields disagree and
what to write.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias, cast

from .gridfs import GridBucket, UploadStream
from .gridfs.spec import DEFAULT_CHUNK_SIZE
from .objects.keys import DEFAULT_KEY_TEMPLATE, KeyMaker, KeyTemplate
from .objects.store import ObjectStore, ObjectUpload
from .retry import Retry

if TYPE_CHECKING:
    from .objects.blobs import Blobs

#: A streaming upload of any storage: both have the same methods.
Upload: TypeAlias = UploadStream | ObjectUpload

__all__ = [
    "FileSystemStorage",
    "GridFSStorage",
    "S3Storage",
    "Storage",
    "Store",
    "Upload",
    "default_collection_name",
]


class Store(Protocol):
    """What the file layer calls on a bound storage (GridFS bucket or object store)."""

    name: str
    files: Any
    chunk_size: int

    async def ensure_indexes(self) -> None: ...

    def open_upload(
        self,
        *,
        file_id: Any = None,
        filename: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        chunk_size: int | None = None,
        context: Mapping[str, Any] | None = None,
    ) -> Upload: ...

    async def upload(
        self,
        source: Any,
        *,
        file_id: Any = None,
        filename: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        chunk_size: int | None = None,
        context: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]: ...

    async def find(self, file_id: Any) -> dict[str, Any] | None: ...

    async def find_many(self, file_ids: Any) -> dict[Any, dict[str, Any]]: ...

    def open_download(
        self, files_doc: Mapping[str, Any], *, start: int = 0, end: int | None = None
    ) -> Any: ...

    async def read(
        self, files_doc: Mapping[str, Any], *, start: int = 0, end: int | None = None
    ) -> bytes: ...

    async def delete(self, file_id: Any) -> bool: ...


#: Characters a default catalogue name keeps from a directory, bucket or prefix:
#: letters and digits of any script, ``-`` and ``_``.
_UNSAFE = re.compile(r"[^\w-]+")
#: The most bytes of UTF-8 a default catalogue name takes from one place (MongoDB
#: caps a namespace, ``<database>.<collection>.files``, at 255 bytes).
_MAX_PART = 60


def _slug(text: str) -> str:
    """``text`` cut down to letters, digits, ``-`` and ``_`` (runs of anything else
    become one ``_``); a long one is cut and given a hash of the whole, so two
    places never share a name by being cut alike."""
    slug = _UNSAFE.sub("_", text).strip("_")
    if len(slug.encode("utf-8", "surrogatepass")) > _MAX_PART:
        digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        while len(slug.encode("utf-8", "surrogatepass")) > _MAX_PART - 9:
            slug = slug[:-1]
        slug = f"{slug}_{digest}"
    return slug


def _fitted(name: str) -> str:
    """A default catalogue name cut to fit :data:`MAX_COLLECTION_NAME`, with a hash
    of the whole, so two long names never become one."""
    if len(name.encode("utf-8", "surrogatepass")) <= MAX_COLLECTION_NAME:
        return name
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    cut = name
    while len(cut.encode("utf-8", "surrogatepass")) > MAX_COLLECTION_NAME - 9:
        cut = cut[:-1]
    return f"{cut}_{digest}"


def _place_part(storage: Storage) -> str:
    """What tells a directory or S3 place apart in a default catalogue name: the
    directory's own name; the bucket and the prefix."""
    if isinstance(storage, FileSystemStorage):
        return _slug(os.path.basename(storage.root.rstrip("/")))
    if isinstance(storage, S3Storage):
        return "_".join(p for p in (_slug(storage.bucket), _slug(storage.prefix)) if p)
    return ""


def default_collection_name(storage: Storage) -> str:
    """The catalogue a storage gets when no ``collection_name`` is given.

    Named after where the bytes are, so storages declared the natural way never
    share a catalogue:

    * ``GridFSStorage()``: ``fs``;
    * ``FileSystemStorage("/srv/media/avatars")``: ``fs_local_avatars``;
    * ``S3Storage("media")``: ``fs_s3_media``, and with ``prefix="trailers/"``:
      ``fs_s3_media_trailers``;
    * ``QueuedStorage(local=FileSystemStorage("/var/spool/up"),
      remote=S3Storage("media", prefix="trailers/"))``:
      ``fs_queued_up_media_trailers``; with ``local=GridFSStorage()``:
      ``fs_queued_media_trailers``.

    A directory is named by its last part only, so moving it (``~/app/avatars``
    in development, ``/srv/app/avatars`` in production) keeps its catalogue. Two
    directories of the same name, or one bucket and prefix on two S3 endpoints,
    get the same name: declaring both is refused
    (:class:`~asyncassets.errors.StorageConflict`), and one of them needs a
    ``collection_name``. Characters other than letters and digits (of any
    script: ``/srv/照片`` gives ``fs_local_照片``), ``-`` and ``_`` become ``_``.
    """
    return storage._default_name()


#: The longest collection_name, in bytes of UTF-8: MongoDB caps a namespace
#: (``<database>.<collection_name>.chunks``) at 255 bytes, and a database name
#: may take 64 of them.
MAX_COLLECTION_NAME = 120


def _collection_name(value: Any) -> str:
    """``value`` if MongoDB can name collections ``<value>.files`` and
    ``<value>.chunks`` with it, else a ``ValueError`` saying why, at declaration
    (the server's own errors came at the first upload, and made ``check()`` of
    the whole app fail)."""
    if not isinstance(value, str) or not value or "$" in value or "\0" in value:
        raise ValueError(
            f"collection_name must be a non-empty str without '$' or NUL, got {value!r}"
        )
    if value.startswith("system."):
        raise ValueError(
            f"collection_name {value!r} starts with 'system.', which MongoDB keeps for "
            "its own collections; choose another name"
        )
    if value.startswith(".") or value.endswith(".") or ".." in value:
        raise ValueError(
            f"collection_name {value!r} has an empty part between dots (MongoDB refuses "
            "such names); write it without a leading, trailing or doubled '.'"
        )
    size = len(value.encode("utf-8", "surrogatepass"))
    if size > MAX_COLLECTION_NAME:
        raise ValueError(
            f"collection_name {value[:40]!r}... is {size} bytes of UTF-8; at most "
            f"{MAX_COLLECTION_NAME} fit in a MongoDB namespace beside the database's "
            "name and '.chunks'; choose a shorter one"
        )
    return value


#: Stores kept per storage, one per database object (an app has one or two).
_STORES_KEPT = 8


class Storage:
    """Where a field's bytes live. Subclasses: :class:`GridFSStorage`,
    :class:`FileSystemStorage`, :class:`S3Storage`.

    :ivar collection_name: the catalogue is ``<collection_name>.files``.
    :ivar kind: ``"gridfs"``, ``"filesystem"`` or ``"s3"``.
    """

    kind: str = ""
    collection_name: str

    def bind(self, db: Any) -> Store:
        """The store of this storage on database ``db`` (no I/O).

        The same store for the same database of the same client, with the same
        options, while this storage is unchanged: a store holds no state of its
        own operations, and making one (its collections, with the file layer's
        write concern) cost a served range a third of its time.
        """
        client = getattr(db, "client", None)
        stamp = (
            db.name if hasattr(db, "name") else None,
            getattr(db, "codec_options", None),
            getattr(db, "read_concern", None),
            self.collection_name,
            getattr(self, "chunk_size", None),
        )
        stores: dict[int, tuple[Any, Any, Store]] = self.__dict__.setdefault("_stores", {})
        cached = stores.get(id(client))
        if client is not None and cached is not None and cached[0] is client:
            if cached[1] == stamp:
                return cached[2]
        store = self._make_store(db)
        if client is None:
            return store
        if len(stores) >= _STORES_KEPT and id(client) not in stores:
            stores.pop(next(iter(stores)))  # the oldest: a client no longer used
        # The client held: its id cannot be reused by another while it is here.
        stores[id(client)] = (client, stamp, store)
        return store

    def _make_store(self, db: Any) -> Store:
        raise NotImplementedError

    def __deepcopy__(self, memo: dict[int, Any]) -> Storage:
        # A storage is configuration that fields share, holding its clients and
        # stores once used: a query that copies a file condition naming it (as
        # mongoengine's Q combination does) shares it too, as it would a str.
        return self

    def _default_name(self) -> str:
        """The ``collection_name`` of this storage when none is given."""
        return "fs"

    @property
    def url(self) -> str:
        """How messages and reports name where the bytes are."""
        raise NotImplementedError

    def _identity(self) -> tuple[Any, ...]:
        raise NotImplementedError

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Storage):
            return NotImplemented
        return type(self) is type(other) and self._identity() == other._identity()

    def __hash__(self) -> int:
        return hash((type(self), self._identity()))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r}, collection_name={self.collection_name!r})"


class GridFSStorage(Storage):
    """Bytes in MongoDB itself: the GridFS bucket ``<collection_name>``.

    The default of every :class:`~asyncassets.FileField`; ``FileField()`` is
    ``FileField(storage=GridFSStorage("fs"))``.

    :param collection_name: the bucket (``<name>.files``/``<name>.chunks``).
    :param chunk_size: chunk size of new files; 255 KiB if ``None``.
    """

    kind = "gridfs"

    def __init__(self, collection_name: str = "fs", *, chunk_size: int | None = None) -> None:
        self.collection_name = _collection_name(collection_name)
        if chunk_size is not None and (
            isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0
        ):
            raise ValueError(f"chunk_size must be a positive int, not {chunk_size!r}")
        self.chunk_size = chunk_size

    @property
    def url(self) -> str:
        return f"gridfs:{self.collection_name}"

    def _identity(self) -> tuple[Any, ...]:
        # The chunk size of new files does not change where files are.
        return (self.collection_name,)

    def bind(self, db: Any) -> GridBucket:
        return cast(GridBucket, super().bind(db))

    def _make_store(self, db: Any) -> GridBucket:
        chunk_size = self.chunk_size or DEFAULT_CHUNK_SIZE
        return GridBucket(db, self.collection_name, chunk_size=chunk_size)


class _ObjectStorage(Storage):
    """A storage of objects under keys, catalogued in ``<collection_name>.files``."""

    def __init__(
        self,
        *,
        collection_name: str | None,
        key_template: KeyTemplate,
        overwrite: bool,
        retry: Retry | None,
    ) -> None:
        # Subclasses set where the bytes are first: the default name comes from it.
        self.collection_name = _collection_name(
            default_collection_name(self) if collection_name is None else collection_name
        )
        if not isinstance(overwrite, bool):
            raise TypeError(f"overwrite must be True or False, not {overwrite!r}")
        if retry is not None and not isinstance(retry, Retry):
            raise TypeError(f"retry must be a asyncassets.storage.Retry, not {retry!r}")
        self.keys = KeyMaker(key_template)
        self.overwrite = overwrite
        self.retry = retry if retry is not None else Retry()
        self._blobs: Blobs | None = None

    @property
    def key_template(self) -> KeyTemplate:
        """The template (or callable) new keys are made with."""
        return self.keys.template

    def blobs(self) -> Blobs:
        """The backend that stores the bytes (made at first use, then kept)."""
        if self._blobs is None:
            self._blobs = self._make_blobs()
        return self._blobs

    def _make_blobs(self) -> Blobs:
        raise NotImplementedError

    def bind(self, db: Any) -> ObjectStore:
        return cast(ObjectStore, super().bind(db))

    def _make_store(self, db: Any) -> ObjectStore:
        return ObjectStore(db, self)

    def _default_name(self) -> str:
        kind = "fs_local" if isinstance(self, FileSystemStorage) else "fs_s3"
        part = _place_part(self)
        return _fitted(f"{kind}_{part}") if part else kind


class FileSystemStorage(_ObjectStorage):
    """Bytes in files under a local directory; MongoDB keeps the catalogue.

    Writes are atomic: a temporary file in the destination directory, fsync, then
    a hard link (or rename) to the key's path, so a reader never sees half a file.

    :param root: the directory (created at the first upload if missing).
    :param key_template: how new keys (paths under ``root``) are made: a template
        string with ``{date:%Y/%m}``, ``{uuid}``, ``{ext}``, ``{field}``, ``{id}``
        and ``{filename}`` (sanitised), or a callable ``(document, filename) -> key``;
        see :doc:`/storage`.
    :param collection_name: the catalogue is ``<collection_name>.files``; by
        default ``fs_local_<the directory's name>`` (see
        :func:`default_collection_name`). Before 0.1.0 the default was
        ``fs_local``: pass ``collection_name="fs_local"`` to keep the files
        catalogued there.
    :param overwrite: replace an existing file at a new key (``False``: a taken key
        gets another one, never overwritten).
    :param retry: how transient errors are retried (default: no retry; local disks
        fail for good).
    :param fsync: flush each file (and its directory) to disk before the catalogue
        entry is written. Turn off only for scratch data.
    """

    kind = "filesystem"

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        key_template: KeyTemplate = DEFAULT_KEY_TEMPLATE,
        collection_name: str | None = None,
        overwrite: bool = False,
        retry: Retry | None = None,
        fsync: bool = True,
    ) -> None:
        if not isinstance(root, (str, os.PathLike)) or not os.fspath(root):
            raise TypeError(f"root must be a directory path, not {root!r}")
        self.root = os.path.abspath(os.fspath(root))
        self.fsync = bool(fsync)
        super().__init__(
            collection_name=collection_name,
            key_template=key_template,
            overwrite=overwrite,
            retry=retry if retry is not None else Retry(attempts=1),
        )

    @property
    def url(self) -> str:
        from pathlib import Path

        return Path(self.root).as_uri()

    def _identity(self) -> tuple[Any, ...]:
        return (self.root, self.collection_name)

    def _make_blobs(self) -> Blobs:
        from .objects.filesystem import FileSystemBlobs

        return FileSystemBlobs(self.root, retry=self.retry, fsync=self.fsync)


class S3Storage(_ObjectStorage):
    """Bytes in an S3 (or S3-compatible) bucket; MongoDB keeps the catalogue.

    Needs ``pip install 'asyncassets[s3]'``. Objects are written with one PUT, or a
    multipart upload of ``part_size`` parts completed at the end, so a reader
    never sees half an object; an aborted upload aborts its multipart upload.

    :param bucket: the bucket name.
    :param prefix: prepended to every key (``"trailers/"``).
    :param endpoint_url: for S3-compatible servers (MinIO, Ceph, moto); AWS if ``None``.
    :param region: the region to sign for; the environment's if ``None``.
    :param access_key_id, secret_access_key, session_token: credentials; the
        usual AWS environment variables if ``None``.
    :param key_template, overwrite: as :class:`FileSystemStorage`.
    :param collection_name: the catalogue is ``<collection_name>.files``; by
        default ``fs_s3_<bucket>[_<prefix>]`` (see :func:`default_collection_name`).
        Before 0.1.0 the default was ``fs_s3``: pass ``collection_name="fs_s3"``
        to keep the files catalogued there.
    :param retry: how transient errors (timeouts, 5xx, throttling) are retried.
    :param part_size: multipart part size, at least 5 MiB (S3's minimum).
    :param public_url: where the bucket is served publicly (a CDN, or a provider's
        per-bucket domain such as Selectel's): ``proxy.url()`` then returns
        ``public_url`` + the object's key, which never expires, instead of a
        presigned URL.
    """

    kind = "s3"

    def __init__(
        self,
        bucket: str,
        *,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        session_token: str | None = None,
        key_template: KeyTemplate = DEFAULT_KEY_TEMPLATE,
        collection_name: str | None = None,
        overwrite: bool = False,
        retry: Retry | None = None,
        part_size: int = 8 * 1024 * 1024,
        public_url: str | None = None,
    ) -> None:
        if public_url is not None and (
            not isinstance(public_url, str) or not public_url.startswith(("https://", "http://"))
        ):
            raise ValueError(
                f"public_url must be an http(s) URL like 'https://cdn.example.com/', "
                f"not {public_url!r}"
            )
        if not isinstance(bucket, str) or not bucket:
            raise ValueError(f"bucket must be a non-empty str, not {bucket!r}")
        if not isinstance(prefix, str) or prefix.startswith("/") or ".." in prefix.split("/"):
            raise ValueError(
                f"prefix must be a relative key prefix like 'media/', not {prefix!r}"
            )
        if (
            isinstance(part_size, bool)
            or not isinstance(part_size, int)
            or part_size < 5 * 1024 * 1024
        ):
            raise ValueError(
                f"part_size must be an int of at least 5 MiB (S3's minimum), not {part_size!r}"
            )
        self.bucket = bucket
        self.prefix = prefix
        super().__init__(
            collection_name=collection_name,
            key_template=key_template,
            overwrite=overwrite,
            retry=retry,
        )
        self.endpoint_url = endpoint_url
        self.region = region
        self._credentials = (access_key_id, secret_access_key, session_token)
        self.part_size = part_size
        self.public_url = public_url

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def _identity(self) -> tuple[Any, ...]:
        return (self.endpoint_url, self.bucket, self.prefix, self.collection_name)

    def __repr__(self) -> str:
        # Never the credentials.
        return (
            f"S3Storage({self.url!r}, endpoint_url={self.endpoint_url!r}, "
            f"collection_name={self.collection_name!r})"
        )

    def _make_blobs(self) -> Blobs:
        from .objects.s3 import S3Blobs

        access_key_id, secret_access_key, session_token = self._credentials
        return S3Blobs(
            self.bucket,
            prefix=self.prefix,
            endpoint_url=self.endpoint_url,
            region=self.region,
            access_key_id=access_key_id,
            secret_access_key=secret_access_key,
            session_token=session_token,
            retry=self.retry,
            part_size=self.part_size,
        )

