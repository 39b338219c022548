"""Assets: files with metadata, kept by id and found by metadata, no document class needed.

An :class:`AssetManager` stores any file, with keyword metadata, in one storage
of this project (GridFS, a directory, S3) and keeps MongoDB's catalogue as the
metadata store: an asset *is* its catalogue entry, a document of
``<collection_name>.files`` whose ``metadata`` holds the user's keys and the
asset's id (``metadata.asset_id``, under a unique index).

.. code-block:: python

    photos = AssetManager(S3Storage("media"), id_template="%Y/%m/%n",
                          indexes=["gallery_id"])
    asset_id = await photos.add(open("marmot.jpg", "rb"), asset_id="marmot.jpg",
                                gallery_id="g1", blogpost_id=66542)
    asset = await photos.get(asset_id)         # or: await photos[asset_id]
    asset.gallery_id, asset.metadata, await asset.read()
    async for asset in photos.search(gallery_id="g1").order_by("-uploaded"):
        ...
    rows = await photos.searchmd(size__gt=1000)     # dicts with "asset_id"

Why the id lives in ``metadata.asset_id`` and not in ``_id``: a replacement is
uploaded beside the asset it replaces and takes the id over when complete, so for
a moment two entries belong to one asset; and GridFS keys chunks by the entry's
``_id``, so two uploads racing for one ``_id`` would write into each other's
chunks. Each upload has its own ``ObjectId``; the asset id is claimed afterwards
with one update that the unique index arbitrates.

Guarantees (those of ``FileField``): the bytes are stored completely before the
entry exists (the stores insert it last); an add claims its id only once its entry
exists, and anything that fails or is cancelled before the claim succeeded
removes what was stored; a replacement never leaves the asset without bytes
(see :meth:`AssetManager.replace`); :func:`~asyncassets.sweep_orphans` and
:func:`~asyncassets.check` count assets as referenced (:func:`assets_in_use`) and
work on the catalogue of every manager made in the process.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import re
import weakref
from collections.abc import AsyncIterator, Generator, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Literal

from bson import ObjectId
from mongoengine.queryset.visitor import QNode
from pymongo.errors import DuplicateKeyError

from ._tasks import spawn
from .connection import DEFAULT_ALIAS, get_db
from .errors import AssetExists, AssetNotFound
from .filequery import entry_filter, entry_sort
from .files.names import FilenameTemplate
from .files.proxy import FileProxy
from .files.rules import UploadGuard, UploadRules
from .storage import GridFSStorage, Storage, Store
from .storage.catalogue import content_type_of, original_length, user_metadata
from .storage.objects.keys import KeyMaker
from .storage.read import iter_original, read_original
from .storage.sources import read_source

__all__ = [
    "ASSET_FIELDS",
    "Asset",
    "AssetManager",
    "AssetReader",
    "AssetSearch",
    "asset_catalogues",
    "assets_in_use",
]

#: Where an entry keeps its asset id: live (``asset_id``), a replacement not yet
#: live (``asset_pending``), a version being replaced (``asset_replaced``).
LIVE, PENDING, REPLACED = "asset_id", "asset_pending", "asset_replaced"
_MARKERS = (LIVE, PENDING, REPLACED)
#: The projection that gives :func:`assets_in_use` what it reads of an entry.
ASSET_FIELDS: dict[str, int] = {f"metadata.{m}": 1 for m in _MARKERS}
#: Metadata keys an asset cannot have: the markers, and the names that queries
#: read as the entry's own fields (``size__gt`` means the length, not a key).
RESERVED_KEYS = frozenset(
    {*_MARKERS, "filename", "length", "size", "uploaded", "upload_date", "sha256",
     "compression", "metadata", "content_type"}
)
_MAX_ID_BYTES = 1024
_CLAIM_ATTEMPTS = 100
#: A number no id part holds, to find where KeyMaker.variant puts the "-N".
_PROBE = 918273645
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
#: The names queries know beyond the entry's fields (see asyncassets.filequery).
_NAMES = {"asset_id": ("metadata", LIVE)}

# The managers alive in this process, whose catalogues the sweep and the check
# work on (a manager that is gone no longer says where its bytes are).
_managers: weakref.WeakSet[AssetManager] = weakref.WeakSet()
# Indexes created, per client: (db name, catalogue, index keys).
_indexed: weakref.WeakKeyDictionary[Any, set[tuple[Any, ...]]] = weakref.WeakKeyDictionary()


def asset_catalogues() -> dict[tuple[str, str], dict[Storage, list[str]]]:
    """``{(alias, collection_name): {storage: [who declared it]}}`` of every
    :class:`AssetManager` alive in this process (what the sweep and check add to
    the catalogues documents declare)."""
    found: dict[tuple[str, str], dict[Storage, list[str]]] = {}
    for manager in list(_managers):
        target = (manager.alias, manager.storage.collection_name)
        labels = found.setdefault(target, {}).setdefault(manager.storage, [])
        if repr(manager) not in labels:
            labels.append(repr(manager))
    return found


async def assets_in_use(files: Any, entries: Iterable[Mapping[str, Any]]) -> set[Any]:
    """The ids of the catalogue ``entries`` an asset needs: what the sweep keeps.

    ``entries`` are read from the catalogue ``files`` with at least
    :data:`ASSET_FIELDS` in the projection; entries of no asset cost no query.

    An entry holding a live asset id; and the entries of a replacement that did
    not finish, when no live entry has their asset id (the asset's bytes are
    there, and the next :meth:`AssetManager.get` finishes the swap). A pending
    replacement or a replaced version whose asset is live again is garbage, like
    an upload no document references: the sweep removes it after its grace period.
    """
    in_use: set[Any] = set()
    unfinished: list[tuple[Any, str, Any]] = []
    for doc in entries:
        meta = doc.get("metadata")
        if not isinstance(meta, dict) or not any(m in meta for m in _MARKERS):
            continue
        if LIVE in meta:
            in_use.add(doc["_id"])
        else:
            kind = PENDING if PENDING in meta else REPLACED
            unfinished.append((doc["_id"], kind, meta[kind]))
    if not unfinished:
        return in_use
    names = list({asset_id for _, _, asset_id in unfinished})
    live = {d["metadata"][LIVE] async for d in files.find(
        {f"metadata.{LIVE}": {"$in": names}}, {f"metadata.{LIVE}": 1})}
    replaced = {d["metadata"][REPLACED] async for d in files.find(
        {f"metadata.{REPLACED}": {"$in": names}}, {f"metadata.{REPLACED}": 1})}
    for entry_id, kind, asset_id in unfinished:
        if asset_id in live:
            continue
        if kind == REPLACED or asset_id in replaced:
            in_use.add(entry_id)
    return in_use


def _check_asset_id(value: Any) -> str:
    if not isinstance(value, str) or not value or "\0" in value:
        raise ValueError(f"an asset id is a non-empty str without NUL, not {value!r}")
    if len(value.encode("utf-8", "surrogatepass")) > _MAX_ID_BYTES:
        raise ValueError(
            f"an asset id is at most {_MAX_ID_BYTES} bytes of UTF-8, not {value[:40]!r}..."
        )
    return value


def sanitise_name(name: str | None) -> str:
    """What ``%n`` of an id template becomes: the last path part of ``name`` with
    anything but letters, digits, ``.``, ``-`` and ``_`` made ``_``; a new hex id
    when nothing is left."""
    base = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    cleaned = _NAME_UNSAFE.sub("_", base).strip("._-")[:200]
    return cleaned or str(ObjectId())


def expand_template(template: str, name: str | None, now: dt.datetime | None = None) -> str:
    """An id from an id template: ``%Y``, ``%m``, ``%d`` (and any ``strftime`` code,
    in UTC) and ``%n``, the sanitised name. ``"%Y/%m/%n"`` gives ``2026/12/marmot.jpg``."""
    now = now or dt.datetime.now(dt.timezone.utc)
    return sanitise_name(name).join(now.strftime(part) for part in template.split("%n"))


class AssetManager:
    """Files with metadata in ``storage``, their catalogue in MongoDB as the metadata store.

    Named as in quantumcore.assets, where the examples this follows come from; the
    variable you bind it to (``photos``, ``attachments``) is what reads in code.
    Making one does no I/O; the catalogue's indexes are created at first use.

    :param storage: where the bytes live; default ``GridFSStorage("assets")``.
    :param alias: the connection alias of the catalogue's database.
    :param id_template: how ids are made from the given id or the file name:
        ``%Y``, ``%m``, ``%d`` (UTC) and ``%n`` (the name, sanitised), as in
        quantumcore (``"%Y/%m/%n"``). Without one, a given id is used as it is and
        an asset added without one gets a new hex id.
    :param indexes: metadata keys (or entry names: ``uploaded``, ``size``...) to
        index, each a name or a sequence of names for a compound index, ``-``
        for descending: ``["gallery_id", ("gallery_id", "-uploaded")]``. A
        compound index ends with ``_id``, the tie-breaker of sorted searches, so
        it gives their order without sorting.
    :param on_conflict: what :meth:`add` does with a taken id: ``"rename"`` (the
        default, as quantumcore: ``name-2.jpg``) or ``"error"``
        (:class:`~asyncassets.errors.AssetExists`).
    :param max_size, allowed_content_types, allowed_extensions, filename_template, compress:
        what uploads accept and how they are stored, as ``FileField``'s options
        (:class:`~asyncassets.files.rules.UploadRules`).
    :raises TypeError, ValueError: an option is wrong.
    """

    def __init__(
        self,
        storage: Storage | None = None,
        *,
        alias: str = DEFAULT_ALIAS,
        id_template: str | None = None,
        indexes: Iterable[str | Sequence[str]] = (),
        on_conflict: Literal["rename", "error"] = "rename",
        max_size: int | None = None,
        allowed_content_types: Iterable[str] | None = None,
        allowed_extensions: Iterable[str] | None = None,
        filename_template: FilenameTemplate | None = None,
        compress: str | None = None,
    ) -> None:
        if storage is None:
            storage = GridFSStorage("assets")
        if not isinstance(storage, Storage):
            raise TypeError(
                "AssetManager(storage) takes a GridFSStorage, FileSystemStorage or "
                f"S3Storage, not {type(storage).__name__}"
            )
        if not isinstance(alias, str) or not alias:
            raise TypeError(f"alias must be a connection alias (str), not {alias!r}")
        if id_template is not None and (not isinstance(id_template, str) or not id_template):
            raise TypeError(f"id_template must be a str such as '%Y/%m/%n', not {id_template!r}")
        self.on_conflict = _check_conflict(on_conflict)
        self.storage = storage
        self.alias = alias
        self.id_template = id_template
        self.rules = UploadRules(
            max_size=max_size,
            allowed_content_types=allowed_content_types,
            allowed_extensions=allowed_extensions,
            filename_template=filename_template,
            compress=compress,
        )
        self.indexes: list[list[tuple[str, int]]] = []
        for spec in indexes:
            keys = [spec] if isinstance(spec, str) else list(spec)
            if not keys:
                raise ValueError("indexes= takes names or non-empty sequences of names")
            index = entry_sort(keys, bare="metadata", names=_NAMES)
            if len(index) > 1:
                # A compound index serves a filter and a sort; sorted searches break
                # ties by _id, which the index must end with to give the order itself.
                index.append(("_id", 1))
            self.indexes.append(index)
        _managers.add(self)

    def __repr__(self) -> str:
        return f"AssetManager({self.storage!r}, alias={self.alias!r})"

    @property
    def catalogue(self) -> str:
        """The catalogue's collection name, ``<collection_name>.files``."""
        return f"{self.storage.collection_name}.files"

    # -- the store --------------------------------------------------------------

    def _store(self) -> Store:
        return self.storage.bind(get_db(self.alias))

    async def _ready(self) -> Store:
        """The bound store, with the catalogue's and the asset indexes in place."""
        store = self._store()
        db = get_db(self.alias)
        done = _indexed.setdefault(db.client, set())
        wanted: list[tuple[list[tuple[str, int]], dict[str, Any]]] = [
            ([(f"metadata.{LIVE}", 1)], {"unique": True, "sparse": True}),
            ([(f"metadata.{PENDING}", 1)], {"sparse": True}),
            ([(f"metadata.{REPLACED}", 1)], {"sparse": True}),
            *((keys, {}) for keys in self.indexes),
        ]
        missing = [
            (keys, options) for keys, options in wanted
            if (db.name, store.name, tuple(keys)) not in done
        ]
        if missing:
            await store.ensure_indexes()
            for keys, options in missing:
                await store.files.create_index(keys, **options)
                done.add((db.name, store.name, tuple(keys)))
        return store

    async def ensure_indexes(self) -> None:
        """Create the catalogue's indexes now (otherwise done at first use)."""
        await self._ready()

    # -- adding -----------------------------------------------------------------

    def make_id(self, asset_id: str | None = None, filename: str | None = None) -> str:
        """The id :meth:`add` asks for (before a taken one is renamed), no I/O."""
        if self.id_template is not None:
            name = asset_id if asset_id is not None else filename
            return _check_asset_id(expand_template(self.id_template, name))
        if asset_id is None:
            return str(ObjectId())
        return _check_asset_id(asset_id)

    async def add(
        self,
        source: Any,
        asset_id: str | None = None,
        *,
        filename: str | None = None,
        content_type: str | None = None,
        on_conflict: Literal["rename", "error"] | None = None,
        **metadata: Any,
    ) -> str:
        """Store ``source`` as a new asset with ``metadata``; return its final id.

        :param source: bytes, a binary file object (sync or async ``read(n)``), or an
            (async) iterable of bytes; read in pieces.
        :param asset_id: the id wanted (through ``id_template`` if there is one);
            default: from the template and the file name, else a new hex id.
        :param filename: stored as the entry's ``filename``; default: the source's
            ``name``. Gives the content type when none is given or sniffed.
        :param content_type: the MIME type; default: guessed from the name, else
            sniffed from the first bytes.
        :param on_conflict: ``"rename"``: a taken id gets the next free
            ``name-2.ext``; ``"error"``: raise. Default: the manager's.
        :param metadata: the asset's metadata (values as BSON stores them).
        :returns: the asset's id.
        :raises AssetExists: the id is taken and ``on_conflict="error"``.
        :raises FileValidationError: the manager's rules refused the file.
        :raises TypeError, ValueError: bad source, id or metadata; nothing stored.

        Cancelled or failing at any point, it leaves nothing behind: what was
        stored is removed (shielded) before the exception propagates.
        """
        mode = _check_conflict(on_conflict or self.on_conflict)
        if filename is None:
            filename = _source_name(source)
        meta = _check_metadata(content_type, metadata)
        wanted = self.make_id(asset_id, filename)
        store = await self._ready()
        if mode == "error" and await self._live(store, wanted, {"_id": 1}) is not None:
            raise _taken(wanted, store)
        entry = await self._upload(store, source, filename, content_type, meta, wanted)
        try:
            return await self._claim(store, entry["_id"], wanted, mode)
        except BaseException:
            # Unclaimed (or claimed by a cancelled add): nobody has the id yet.
            await asyncio.shield(spawn(store.delete(entry["_id"])))
            raise

    async def _upload(
        self,
        store: Store,
        source: Any,
        filename: str | None,
        content_type: str | None,
        metadata: dict[str, Any],
        asset_id: str,
    ) -> dict[str, Any]:
        """Store the bytes through the manager's rules; return the catalogue entry."""
        guard = UploadGuard(
            self.rules,
            field_name=f"asset {asset_id!r}",
            instance=None,
            content_type=content_type,
            filename=filename,
            metadata=metadata,
        )
        pieces = read_source(source, store.chunk_size)
        try:
            data = await guard.wrap(pieces)
            return await store.upload(
                data, filename=guard.filename, metadata=guard.metadata,
                context={"document": None, "field": "asset"},
            )
        finally:
            await pieces.aclose()

    async def _claim(self, store: Store, entry_id: Any, wanted: str, mode: str) -> str:
        """Give the entry ``wanted``, or (renaming) the next free variant of it."""
        candidate = wanted
        for _ in range(_CLAIM_ATTEMPTS):
            try:
                await store.files.update_one(
                    {"_id": entry_id}, {"$set": {f"metadata.{LIVE}": candidate}}
                )
                return candidate
            except DuplicateKeyError:
                if mode == "error":
                    raise _taken(wanted, store) from None
                candidate = await self._next_variant(store, wanted)
        raise AssetExists(
            f"could not claim a free variant of asset id {wanted!r} in {_CLAIM_ATTEMPTS} "
            "tries (others kept taking them); add it again",
            asset_id=wanted,
        )

    async def _next_variant(self, store: Store, wanted: str) -> str:
        """``wanted``'s variant after the highest one taken (``a/b-3.jpg``): one
        query whatever their number, and a deleted asset's id is not given again
        while a higher variant lives."""
        prefix, _, suffix = KeyMaker.variant(wanted, _PROBE).rpartition(f"-{_PROBE}")
        pattern = f"^{re.escape(prefix)}-([0-9]+){re.escape(suffix)}$"
        highest = 1
        async for doc in store.files.find(
            {f"metadata.{LIVE}": {"$regex": pattern}}, {f"metadata.{LIVE}": 1}
        ):
            match = re.match(pattern, str(doc["metadata"][LIVE]))
            if match:
                highest = max(highest, int(match.group(1)))
        return KeyMaker.variant(wanted, highest + 1)

    # -- reading ----------------------------------------------------------------

    async def _live(
        self, store: Store, asset_id: str, projection: Mapping[str, Any] | None = None
    ) -> dict[str, Any] | None:
        found: dict[str, Any] | None = await store.files.find_one(
            {f"metadata.{LIVE}": asset_id}, projection
        )
        return found

    async def _entry(self, store: Store, asset_id: str) -> dict[str, Any] | None:
        entry = await self._live(store, asset_id)
        if entry is None:
            entry = await self._finish_replace(store, asset_id)
        return entry

    async def get(self, asset_id: str) -> Asset:
        """The asset with this id.

        :raises AssetNotFound: there is none.
        """
        _check_asset_id(asset_id)
        store = self._store()
        entry = await self._entry(store, asset_id)
        if entry is None:
            raise AssetNotFound(asset_id, f"{store.name}.files")
        return Asset(self, store, entry)

    def __getitem__(self, asset_id: str) -> Any:
        """``await am[asset_id]``: the same as :meth:`get`."""
        return self.get(asset_id)

    async def exists(self, asset_id: str) -> bool:
        """Whether an asset has this id."""
        _check_asset_id(asset_id)
        store = self._store()
        return await self._live(store, asset_id, {"_id": 1}) is not None

    def search(self, *conditions: QNode, **query: Any) -> AssetSearch:
        """The assets matching ``query``, in mongoengine's syntax (no I/O until used).

        Names are metadata keys (``gallery_id="g1"``, ``tags__in=[...]``) and the
        entry's own fields: ``size``/``length``, ``content_type``, ``filename``,
        ``uploaded``/``upload_date``, ``sha256``, ``asset_id``. ``Q`` objects
        combine (``Q(a=1) | Q(b=2)``). The result is lazy and chainable::

            assets = await am.search(gallery_id="g1")                 # a list
            async for asset in am.search(size__gt=1000).order_by("-size").limit(10):
                ...
            page = await am.search(gallery_id="g1").order_by("uploaded").skip(40).limit(20)

        :raises InvalidQueryError: a condition names a reserved or unknown field.
        """
        return AssetSearch(self, _asset_filter(conditions, query))

    def searchmd(self, *conditions: QNode, **query: Any) -> AssetSearch:
        """As :meth:`search`, giving dicts (``asset_id``, the metadata, ``filename``,
        ``length``, ``uploaded``) instead of :class:`Asset` objects."""
        return AssetSearch(self, _asset_filter(conditions, query), as_dicts=True)

    # -- changing ---------------------------------------------------------------

    async def delete(self, asset_id: str, *, missing_ok: bool = False) -> bool:
        """Delete the asset: its catalogue entry first, then its bytes (shielded).

        :returns: ``True``; ``False`` when there was none and ``missing_ok``.
        :raises AssetNotFound: there was none.
        """
        _check_asset_id(asset_id)
        store = self._store()
        for _ in range(3):
            entry = await self._entry(store, asset_id)
            if entry is None:
                break
            if await store.delete(entry["_id"]):
                return True
            # Replaced meanwhile: delete the asset as it is now.
        if missing_ok:
            return False
        raise AssetNotFound(asset_id, f"{store.name}.files")

    async def replace(
        self,
        asset_id: str,
        source: Any,
        *,
        filename: str | None = None,
        content_type: str | None = None,
        **metadata: Any,
    ) -> Asset:
        """Give the asset new bytes; keep its id and metadata (``metadata`` updates it).

        The new bytes are stored beside the old ones, then the id moves to them and
        the old version is deleted. Readers see the old asset or the new one; if the
        process dies mid-swap, the next :meth:`get` of the id finishes it.

        :param filename: default: the asset's.
        :param content_type: default: guessed or sniffed anew.
        :returns: the asset as it is now.
        :raises AssetNotFound: there is no such asset (nothing is stored).
        :raises AssetExists: the asset was deleted and added again by another
            writer while this replaced it: theirs keeps the id, this is undone.
        :raises FileValidationError: the manager's rules refused the file.
        """
        current = await self.get(asset_id)
        meta = {k: v for k, v in current.metadata.items() if k != "content_type"}
        meta.update(metadata)
        meta = _check_metadata(content_type, meta)
        meta[PENDING] = asset_id
        if filename is None:
            filename = current.filename or _source_name(source)
        store = await self._ready()
        entry = await self._upload(store, source, filename, content_type, meta, asset_id)
        # From here on a cancelled caller leaves the swap to finish: stopping it
        # between its steps is what get() would have to repair.
        return await asyncio.shield(spawn(self._swap(store, asset_id, entry)))

    async def _swap(self, store: Store, asset_id: str, entry: dict[str, Any]) -> Asset:
        files = store.files
        try:
            old = await files.find_one_and_update(
                {f"metadata.{LIVE}": asset_id},
                {"$rename": {f"metadata.{LIVE}": f"metadata.{REPLACED}"}},
            )
        except BaseException:
            await store.delete(entry["_id"])
            raise
        if old is None:
            await store.delete(entry["_id"])
            raise AssetNotFound(asset_id, f"{store.name}.files")
        try:
            await files.update_one(
                {"_id": entry["_id"], f"metadata.{PENDING}": asset_id},
                {"$rename": {f"metadata.{PENDING}": f"metadata.{LIVE}"}},
            )
        except DuplicateKeyError:
            await store.delete(entry["_id"])
            await store.delete(old["_id"])
            raise AssetExists(
                f"asset {asset_id!r} was added again by another writer while it was being "
                "replaced; that one keeps the id and this replacement was undone",
                asset_id=asset_id,
            ) from None
        await store.delete(old["_id"])
        now = await files.find_one({"_id": entry["_id"]})
        return Asset(self, store, now or entry)

    async def _finish_replace(self, store: Store, asset_id: str) -> dict[str, Any] | None:
        """Finish a replacement that stopped between its steps, if one did: the new
        version takes the id (it is complete), else the old one gets it back."""
        files = store.files
        old = await files.find_one({f"metadata.{REPLACED}": asset_id}, {"_id": 1})
        if old is None:
            return None
        new = await files.find_one({f"metadata.{PENDING}": asset_id}, {"_id": 1})
        holder, marker = (new, PENDING) if new is not None else (old, REPLACED)
        try:
            await files.update_one(
                {"_id": holder["_id"], f"metadata.{marker}": asset_id},
                {"$rename": {f"metadata.{marker}": f"metadata.{LIVE}"}},
            )
        except DuplicateKeyError:
            pass  # another reader or writer made the id live meanwhile
        return await self._live(store, asset_id)


def _check_conflict(value: Any) -> Literal["rename", "error"]:
    if value not in ("rename", "error"):
        raise ValueError(f"on_conflict must be 'rename' or 'error', not {value!r}")
    return value


def _check_metadata(content_type: str | None, metadata: Mapping[str, Any]) -> dict[str, Any]:
    reserved = sorted(set(metadata) & RESERVED_KEYS)
    if reserved:
        raise ValueError(
            f"asset metadata cannot use the names {reserved}: queries read them as the "
            "entry's own fields (size__gt=..., filename=...). Pass filename= and "
            "content_type= as arguments; rename the others."
        )
    # The file layer's checks: keys MongoDB can store and query, and the size limit.
    return FileProxy._metadata(content_type, dict(metadata))


def _taken(asset_id: str, store: Store) -> AssetExists:
    return AssetExists(
        f"asset id {asset_id!r} is taken in catalogue {store.name + '.files'!r}; pass "
        "another id, replace() that asset, or on_conflict='rename' for a free variant",
        asset_id=asset_id,
    )


def _source_name(source: Any) -> str | None:
    name = getattr(source, "name", None)
    if isinstance(name, (str, os.PathLike)):
        return os.path.basename(os.fspath(name)) or None
    return None


def _asset_filter(conditions: Sequence[QNode], query: Mapping[str, Any]) -> dict[str, Any]:
    entry_query = entry_filter(*conditions, bare="metadata", names=_NAMES, where="search", **query)
    only_assets = {f"metadata.{LIVE}": {"$exists": True}}
    if not entry_query:
        return only_assets
    if f"metadata.{LIVE}" in entry_query:
        return {"$and": [entry_query, only_assets]}
    # The user's conditions first: SecantusDB picks the index of the first one (the
    # sparse asset id index would be a scan of every asset: 1.6 s against 3 ms for
    # one gallery of 50,000 assets).
    return {**entry_query, **only_assets}


class Asset:
    """One stored asset: its id, metadata and bytes. Get one from :class:`AssetManager`.

    Metadata keys read as attributes (``asset.gallery_id``) and items
    (``asset["gallery_id"]``); :attr:`metadata` is all of them as a dict.

    :ivar asset_id: the asset's id.
    :ivar entry: its catalogue entry, as stored.
    """

    def __init__(self, manager: AssetManager, store: Store, entry: dict[str, Any]) -> None:
        self._manager = manager
        self._store = store
        self.entry = entry
        self.asset_id: str = (entry.get("metadata") or {}).get(LIVE) or ""

    def __repr__(self) -> str:
        return f"<Asset {self.asset_id!r} {self.length} bytes {self.content_type or '?'}>"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Asset):
            return NotImplemented
        return self.entry.get("_id") == other.entry.get("_id")

    def __hash__(self) -> int:
        return hash(("Asset", self.entry.get("_id")))

    @property
    def metadata(self) -> dict[str, Any]:
        """The user's metadata, with ``content_type`` (a new dict)."""
        meta = user_metadata(self.entry)
        for marker in _MARKERS:
            meta.pop(marker, None)
        return meta

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        meta = self.metadata
        if name in meta:
            return meta[name]
        raise AttributeError(
            f"asset {self.asset_id!r} has no metadata key {name!r} (its keys: "
            f"{', '.join(sorted(meta)) or 'none'})"
        )

    def __getitem__(self, key: str) -> Any:
        return self.metadata[key]

    def as_dict(self) -> dict[str, Any]:
        """``asset_id``, the metadata, ``filename``, ``length`` and ``uploaded``:
        what :meth:`AssetManager.searchmd` gives."""
        return {
            "asset_id": self.asset_id,
            **self.metadata,
            "filename": self.filename,
            "length": self.length,
            "uploaded": self.uploaded,
        }

    @property
    def file_id(self) -> Any:
        """The catalogue entry's ``_id`` (changes when the asset is replaced)."""
        return self.entry.get("_id")

    @property
    def content_type(self) -> str | None:
        """The MIME type, given, guessed from the name or sniffed."""
        return content_type_of(self.entry)

    @property
    def filename(self) -> str | None:
        """The stored file name."""
        name = self.entry.get("filename")
        return None if name is None else str(name)

    @property
    def length(self) -> int:
        """The size in bytes (of the original bytes, for a compressed asset)."""
        return original_length(self.entry)

    size = length

    @property
    def uploaded(self) -> dt.datetime | None:
        """When the bytes were stored."""
        value = self.entry.get("uploadDate")
        return value if isinstance(value, dt.datetime) else None

    @property
    def sha256(self) -> str | None:
        """The SHA-256 (hex) of the stored bytes."""
        value = (self.entry.get("metadata") or {}).get("sha256")
        return None if value is None else str(value)

    async def read(self, start: int = 0, end: int | None = None, *, verify: bool = False) -> bytes:
        """The bytes ``[start, end)`` (all by default), decompressed.

        :param verify: check the whole file against its recorded SHA-256.
        :raises ValueError: the range is outside the file.
        :raises IntegrityError: ``verify`` and the bytes changed since upload.
        :raises FileDeletedWhileReading: the asset was deleted or replaced meanwhile.
        """
        return await read_original(self._store, self.entry, start, end, verify=verify)

    def stream(
        self, start: int = 0, end: int | None = None, *, verify: bool = False
    ) -> AsyncIterator[bytes]:
        """The bytes ``[start, end)`` in pieces, fetching only that range.

        ``async for piece in asset.stream(0, 1024): ...``. Raises as :meth:`read`.
        """
        return iter_original(self._store, self.entry, start, end, verify=verify)

    def open(self) -> AssetReader:
        """A read-only async file object over the bytes (``read(n)``, ``async for``).

        ``async with asset.open() as f: head = await f.read(512)``
        """
        return AssetReader(self.stream())


class AssetReader:
    """An async, read-only file object over an asset's bytes (see :meth:`Asset.open`)."""

    def __init__(self, pieces: AsyncIterator[bytes]) -> None:
        self._pieces = pieces
        self._buffer = bytearray()
        self._eof = False
        self.closed = False

    async def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes (all the rest if negative); ``b""`` at the end."""
        if self.closed:
            raise ValueError("read from a closed asset reader; open() the asset again")
        while not self._eof and (size < 0 or len(self._buffer) < size):
            try:
                self._buffer += await anext(self._pieces)
            except StopAsyncIteration:
                self._eof = True
        cut = len(self._buffer) if size < 0 else min(size, len(self._buffer))
        data = bytes(self._buffer[:cut])
        del self._buffer[:cut]
        return data

    def readable(self) -> bool:
        return True

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        while piece := await self.read(256 * 1024):
            yield piece

    async def aclose(self) -> None:
        """Stop reading (idempotent)."""
        self.closed = True
        closer = getattr(self._pieces, "aclose", None)
        if closer is not None:
            await closer()

    async def __aenter__(self) -> AssetReader:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class AssetSearch:
    """The assets matching a query: lazy, chainable, awaitable (a list) and async-iterable.

    Get one from :meth:`AssetManager.search` or :meth:`AssetManager.searchmd`.
    """

    def __init__(
        self,
        manager: AssetManager,
        query: dict[str, Any],
        *,
        as_dicts: bool = False,
        sort: list[tuple[str, int]] | None = None,
        skip: int = 0,
        limit: int = 0,
        hint: Any = None,
    ) -> None:
        self._manager = manager
        self.query = query
        self._as_dicts = as_dicts
        self._sort = sort or []
        self._skip = skip
        self._limit = limit
        self._hint = hint

    def __repr__(self) -> str:
        return (
            f"<AssetSearch {self.query!r} sort={self._sort!r} skip={self._skip} "
            f"limit={self._limit}>"
        )

    def _copy(self, **changes: Any) -> AssetSearch:
        options = {"as_dicts": self._as_dicts, "sort": self._sort, "skip": self._skip,
                   "limit": self._limit, "hint": self._hint, **changes}
        return AssetSearch(self._manager, self.query, **options)

    def order_by(self, *keys: str) -> AssetSearch:
        """Sort by names (``"-uploaded"``, ``"gallery_id"``); ties go by insertion."""
        return self._copy(sort=entry_sort(keys, bare="metadata", names=_NAMES))

    def skip(self, n: int) -> AssetSearch:
        """Leave out the first ``n``."""
        return self._copy(skip=_count("skip", n))

    def limit(self, n: int) -> AssetSearch:
        """At most ``n`` (0: no limit)."""
        return self._copy(limit=_count("limit", n))

    def page(self, number: int, size: int) -> AssetSearch:
        """Page ``number`` (from 1) of ``size`` assets.

        The same as ``skip((number - 1) * size).limit(size)``.
        """
        if _count("page number", number) < 1:
            raise ValueError("pages are numbered from 1")
        if _count("page size", size) < 1:
            raise ValueError("a page holds at least one asset")
        return self._copy(skip=(number - 1) * size, limit=size)

    def hint(self, index: str | Sequence[tuple[str, int]]) -> AssetSearch:
        """Make the server use this index (its name or its keys) for the search.

        Rarely needed: the server picks a declared index by itself. (SecantusDB
        runs hinted queries far slower than it plans them itself.)
        """
        return self._copy(hint=index)

    def _options(self) -> dict[str, Any]:
        return {} if self._hint is None else {"hint": self._hint}

    def _cursor(self, store: Store) -> Any:
        # _id breaks ties, so pages never overlap or skip an asset.
        sort = [*self._sort, ("_id", 1)] if self._sort else None
        return store.files.find(
            self.query, sort=sort, skip=self._skip, limit=self._limit, **self._options()
        )

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Any]:
        store = self._manager._store()
        async for entry in self._cursor(store):
            asset = Asset(self._manager, store, entry)
            yield asset.as_dict() if self._as_dicts else asset

    async def to_list(self) -> list[Any]:
        """All the matches, as a list."""
        return [item async for item in self]

    def __await__(self) -> Generator[Any, None, list[Any]]:
        return self.to_list().__await__()

    async def first(self) -> Any:
        """The first match, or ``None``."""
        found = await self.limit(1).to_list()
        return found[0] if found else None

    async def count(self) -> int:
        """How many assets match (``skip`` and ``limit`` ignored)."""
        store = self._manager._store()
        return int(await store.files.count_documents(self.query, **self._options()))

    async def explain(self) -> dict[str, Any]:
        """The server's plan for this search (``queryPlanner.winningPlan``...)."""
        store = await self._manager._ready()
        return dict(await self._cursor(store).explain())


def _count(what: str, n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"{what} takes an int >= 0, not {n!r}")
    return n
