"""Assets: files with metadata, kept by id and found by metadata, no document class needed.

An :class:`AssetManager` stores any file, with keyword metadata, in one storage
of this project (GridFS, a directory, S3) and keeps MongoDB's catalogue as the
metadata store: an asset *is* its catalogue entry, a document of
``<collection_name>.files`` whose ``metadata`` holds the user's keys and the
asset's id (``metadata.asset_id``, under a unique index, and the markers below).

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
with one update that the unique indexes arbitrate.

``add``, ``replace`` and ``delete`` of one id are linearizable. The id moves
from the old version to the new one in steps (each one conditional update):
the old version is locked (``asset_next``: the new one's ``_id``) while it holds
the id twice, in ``asset_id`` and in ``asset_hold`` (both unique); it gives
``asset_id`` up, the new version takes it, the old one gives ``asset_hold`` up
and is deleted. An add sets both markers in one update, so it can never take an
id held by either; every entry of an asset carries ``asset_of``, so a reader
gets all of them in one indexed query, one snapshot, in which one of them holds
the id. Whoever finds a lock finishes the swap (or undoes it, if the new version
is gone), so a writer that died midway is finished by the next reader or writer.
docs/assets.rst ("Where assets live") has the layout and the steps.

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

from ._tasks import settle, spawn
from .connection import DEFAULT_ALIAS, get_db
from .errors import AssetExists, AssetNotFound, FileConflict
from .filequery import entry_filter, entry_sort
from .files.names import FilenameTemplate
from .files.proxy import FileProxy
from .files.rules import UploadGuard, UploadRules
from .schema import add_declarations, declared_file_storages, storage_conflict
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

#: Where an entry keeps its asset id: live (``asset_id``, unique), a replacement
#: not yet live (``asset_pending``), a version being replaced (``asset_replaced``).
LIVE, PENDING, REPLACED = "asset_id", "asset_pending", "asset_replaced"
#: The id again, under a unique index of its own: set with ``asset_id`` in the one
#: update that claims an id, and kept by a version being replaced until its
#: replacement holds ``asset_id``. At every moment an entry holds the id in one
#: of the two, so an add can never take the id of an asset being replaced.
HOLD = "asset_hold"
#: On a version being replaced: the ``_id`` of its replacement (the swap's lock).
NEXT = "asset_next"
#: The id on every entry of the asset, whatever its state: one indexed query (a
#: consistent snapshot) gives a reader all of them, old and new version alike.
OF = "asset_of"
_MARKERS = (LIVE, PENDING, REPLACED, HOLD, NEXT, OF)
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
#: How many times a reader or writer finishes a swap it finds and looks again
#: before it answers with what it saw (each round means another writer moved on).
_ROUNDS = 8
#: The largest skip and limit the server accepts (a BSON int64).
_MAX_COUNT = 2**63 - 1
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


# A document class declared later is checked against the managers' catalogues too.
add_declarations(asset_catalogues)


async def assets_in_use(files: Any, entries: Iterable[Mapping[str, Any]]) -> set[Any]:
    """The ids of the catalogue ``entries`` an asset needs: what the sweep keeps.

    ``entries`` are read from the catalogue ``files`` with at least
    :data:`ASSET_FIELDS` in the projection; entries of no asset cost no query.

    Kept: an entry holding an asset id (``asset_id`` or ``asset_hold``: a live
    asset, or a version being replaced, whose bytes readers may still be given);
    a replacement not yet live (``asset_pending``) while a version being replaced
    names it in ``asset_next`` (the next reader or writer finishes that swap), or
    once it has gone live since it was read. A replacement neither named nor live
    may be locked right after this looked: deleting it then makes that swap roll
    back (the asset keeps its old version). The sweep's grace period keeps every
    replacement younger than it whatever its state.
    Everything else is garbage, like an upload no document references, and the
    sweep removes it after its grace period: a replacement that was abandoned, a
    replaced version that gave its hold up. Entries written before ``asset_of``
    existed keep the rule of their time: a half-swapped pair is kept while no
    entry holds their asset id.
    """
    in_use: set[Any] = set()
    pending: list[Any] = []
    legacy: list[tuple[Any, str, Any]] = []
    for doc in entries:
        meta = doc.get("metadata")
        if not isinstance(meta, dict) or not any(m in meta for m in _MARKERS):
            continue
        if LIVE in meta or HOLD in meta:
            in_use.add(doc["_id"])
        elif OF in meta:
            if PENDING in meta:
                pending.append(doc["_id"])
        elif PENDING in meta or REPLACED in meta:
            kind = PENDING if PENDING in meta else REPLACED
            legacy.append((doc["_id"], kind, meta[kind]))
    if pending:
        # As they are now, not as the caller read them: a replacement may have been
        # locked, or gone live and had its old version deleted, since. Names first:
        # a swap names its replacement before the replacement takes the id.
        named = files.find({f"metadata.{NEXT}": {"$in": pending}}, {f"metadata.{NEXT}": 1})
        in_use |= {d["metadata"][NEXT] async for d in named} & set(pending)
        live = files.find({"_id": {"$in": pending}, f"metadata.{LIVE}": {"$exists": True}},
                          {"_id": 1})
        in_use |= {d["_id"] async for d in live}
    if legacy:
        in_use |= await _legacy_in_use(files, legacy)
    return in_use


async def _legacy_in_use(files: Any, unfinished: list[tuple[Any, str, Any]]) -> set[Any]:
    """The half-swapped entries of a replace by a version before ``asset_of`` that
    the next :meth:`AssetManager.get` finishes: kept while no entry holds their id."""
    in_use: set[Any] = set()
    names = list({asset_id for _, _, asset_id in unfinished})
    live = {d["metadata"][LIVE] async for d in files.find(
        {f"metadata.{LIVE}": {"$in": names}}, {f"metadata.{LIVE}": 1})}
    replaced = {d["metadata"][REPLACED] async for d in files.find(
        {f"metadata.{REPLACED}": {"$in": names}, f"metadata.{OF}": {"$exists": False}},
        {f"metadata.{REPLACED}": 1})}
    for entry_id, kind, asset_id in unfinished:
        if asset_id in live:
            continue
        if kind == REPLACED or asset_id in replaced:
            in_use.add(entry_id)
    return in_use


def _check_asset_id(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(
            f"an asset id is a str, not {type(value).__name__} ({value!r:.60}); convert "
            "it yourself if that is meant (str(...)), or check where it comes from"
        )
    if not value or "\0" in value:
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
    :raises StorageConflict: a document class (or another manager) gives the
        catalogue ``storage.collection_name`` another storage.
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
        target = (alias, storage.collection_name)
        declared = declared_file_storages().get(target, {})
        if declared and storage not in declared:
            raise storage_conflict(
                target, {**declared, storage: [repr(self)]},
                hint=f" (say, {type(storage).__name__}(..., collection_name="
                f"{storage.collection_name + '_assets'!r}) for this manager)",
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
            ([(f"metadata.{HOLD}", 1)], {"unique": True, "sparse": True}),
            ([(f"metadata.{OF}", 1)], {"sparse": True}),
            ([(f"metadata.{NEXT}", 1)], {"sparse": True}),
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
        """The id :meth:`add` asks for (before a taken one is renamed), no I/O.

        :raises TypeError: ``asset_id`` or ``filename`` is not a str.
        :raises ValueError: the id is empty, holds NUL or is over 1,024 bytes.
        """
        if asset_id is not None and not isinstance(asset_id, str):
            _check_asset_id(asset_id)  # raises TypeError, before a template reads it
        if filename is not None and not isinstance(filename, str):
            raise TypeError(
                f"filename must be a str, not {type(filename).__name__} ({filename!r:.60})"
            )
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
        :raises AssetExists: the id is taken and ``on_conflict="error"``; or, renaming,
            its next variant would be longer than 1,024 bytes.
        :raises FileValidationError: the manager's rules refused the file.
        :raises TypeError, ValueError: bad source, id or metadata; nothing stored.

        An id is never taken from an asset that holds it, also not while that
        asset is being replaced. Cancelled or failing at any point, it leaves
        nothing behind: what was stored is removed (shielded) before the exception
        propagates.
        """
        mode = _check_conflict(on_conflict or self.on_conflict)
        if filename is None:
            filename = _source_name(source)
        meta = _check_metadata(content_type, metadata)
        wanted = self.make_id(asset_id, filename)
        store = await self._ready()
        # Saves the upload when the id is plainly taken; the claim decides in any case.
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
        """Give the entry ``wanted``, or (renaming) the next free variant of it.

        One update sets the id and its hold: the unique index of either refuses
        an id that an entry holds, live or being replaced.
        """
        candidate = wanted
        for _ in range(_CLAIM_ATTEMPTS):
            try:
                await store.files.update_one(
                    {"_id": entry_id},
                    {"$set": {f"metadata.{LIVE}": candidate, f"metadata.{HOLD}": candidate,
                              f"metadata.{OF}": candidate}},
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
        """``wanted``'s variant after the highest one held (``a/b-3.jpg``): a range
        query per marker whatever their number, and a deleted asset's id is not given
        again while a higher variant lives.

        A range on the part before the number, filtered here, rather than a regex:
        the regex of a long id is longer than servers take (SecantusDB: 1,000
        characters), and a range reads the index.

        :raises AssetExists: the variant would be longer than an id may be.
        """
        probe = KeyMaker.variant(wanted, _PROBE, shorten=False)
        prefix, _, suffix = probe.rpartition(f"-{_PROBE}")
        pattern = re.compile(f"{re.escape(prefix)}-([0-9]+){re.escape(suffix)}", re.DOTALL)
        # Every variant starts with prefix + "-"; "." is the character after "-".
        between = {"$gte": f"{prefix}-", "$lt": f"{prefix}."}
        highest = 1
        for marker in (LIVE, HOLD):
            path = f"metadata.{marker}"
            async for doc in store.files.find({path: between}, {path: 1}):
                match = pattern.fullmatch(str(doc["metadata"][marker]))
                if match:
                    highest = max(highest, int(match.group(1)))
        candidate = KeyMaker.variant(wanted, highest + 1, shorten=False)
        if len(candidate.encode("utf-8", "surrogatepass")) > _MAX_ID_BYTES:
            raise AssetExists(
                f"asset id {wanted[:40]!r}... ({len(wanted.encode('utf-8', 'surrogatepass'))} "
                f"bytes) is taken, and its next free variant would be longer than the "
                f"{_MAX_ID_BYTES} bytes an id may have; pass a shorter id, or replace() "
                "the asset that has it",
                asset_id=wanted,
            )
        return candidate

    # -- reading ----------------------------------------------------------------
    #
    # Every entry of an asset carries its id in ``asset_of``, so one indexed query
    # gives a reader all of them at one moment: the live version, or during a swap's
    # gap the version being replaced, which still holds the id and its bytes.
    # Two queries (by ``asset_id``, then by ``asset_hold``) could each run while the
    # id was elsewhere, and an ``$or`` of both is a collection scan on SecantusDB.

    async def _live(
        self, store: Store, asset_id: str, projection: Mapping[str, Any] | None = None
    ) -> dict[str, Any] | None:
        found: dict[str, Any] | None = await store.files.find_one(
            {f"metadata.{LIVE}": asset_id}, projection
        )
        return found

    async def _entries(self, store: Store, asset_id: str) -> list[dict[str, Any]]:
        """Every entry of the asset (live, replaced, pending), read in one query."""
        return [doc async for doc in store.files.find({f"metadata.{OF}": asset_id})]

    async def _current(
        self, store: Store, asset_id: str, *, repair: bool
    ) -> dict[str, Any] | None:
        """The entry that is the asset now (during a swap's gap, the version being
        replaced); ``None`` when there is none.

        ``repair``: finish (or undo) a swap found on the way, stopped or running,
        and look again, so the answer is the asset as it is once no swap is open.
        """
        found: dict[str, Any] | None = None
        for _ in range(_ROUNDS):
            entries = await self._entries(store, asset_id)
            if not entries:
                # An entry written before asset_of existed has only asset_id; a swap
                # gives it asset_of before it takes asset_id away, so a second look
                # by asset_of finds it if the first look by asset_id missed it.
                legacy = await self._live(store, asset_id)
                if legacy is not None:
                    if repair:  # one query from now on
                        await store.files.update_one(
                            {"_id": legacy["_id"], f"metadata.{LIVE}": asset_id},
                            {"$set": {f"metadata.{OF}": asset_id}},
                        )
                    return legacy
                entries = await self._entries(store, asset_id)
                if not entries:
                    return await self._finish_legacy(store, asset_id) if repair else None
            found = _pick(entries, asset_id)
            if not repair or not await self._settle(store, asset_id, entries):
                return found
        return found

    async def get(self, asset_id: str) -> Asset:
        """The asset with this id.

        During a replace it is the old version or the new one, never missing; a
        replace that stopped midway (its process died) is finished here.

        :raises AssetNotFound: there is none.
        :raises TypeError, ValueError: ``asset_id`` is not an asset id.
        """
        _check_asset_id(asset_id)
        store = self._store()
        entry = await self._current(store, asset_id, repair=True)
        if entry is None:
            raise AssetNotFound(asset_id, f"{store.name}.files")
        return Asset(self, store, entry)

    def __getitem__(self, asset_id: str) -> Any:
        """``await am[asset_id]``: the same as :meth:`get`."""
        return self.get(asset_id)

    async def exists(self, asset_id: str) -> bool:
        """Whether an asset has this id (also while it is being replaced); reads only.

        :raises TypeError, ValueError: ``asset_id`` is not an asset id.
        """
        _check_asset_id(asset_id)
        store = self._store()
        if await self._live(store, asset_id, {"_id": 1}) is not None:
            return True
        # Missed by asset_id: in a swap's gap the id is held by an entry with
        # asset_of (every entry but one written before asset_of has it, and those
        # keep asset_id until a swap gives them asset_of), so this second look,
        # after the first, finds an asset that existed all along.
        entries = await self._entries(store, asset_id)
        return _pick(entries, asset_id) is not None

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

        Values are compared as they are: operators are written as suffixes
        (``gallery_id__ne=None``), and a value holding a ``$`` key (an operator
        document, say from request data) is refused, as are values of the wrong
        type for the entry's own fields (``uploaded__gt="yesterday"``). There is
        no ``__raw__``: for what the suffixes cannot say, query :attr:`catalogue`
        with PyMongo.

        A search is one query over many entries: an asset whose replace is
        between its two steps can be missing from it for that moment (:meth:`get`
        and :meth:`exists` never miss it).

        :raises InvalidQueryError: a condition names a reserved or unknown field,
            its value is an operator document or of the wrong type, or ``__raw__``
            was given.
        """
        return AssetSearch(self, _asset_filter(conditions, query))

    def searchmd(self, *conditions: QNode, **query: Any) -> AssetSearch:
        """As :meth:`search`, giving dicts (``asset_id``, the metadata, ``filename``,
        ``length``, ``uploaded``) instead of :class:`Asset` objects."""
        return AssetSearch(self, _asset_filter(conditions, query), as_dicts=True)

    # -- changing ---------------------------------------------------------------

    async def delete(self, asset_id: str, *, missing_ok: bool = False) -> bool:
        """Delete the asset: its catalogue entry first, then its bytes (shielded).

        A replace running meanwhile is finished first, so the asset ends deleted
        (its new version too), never with the new version alive after this returned.

        :returns: ``True``; ``False`` when there was none and ``missing_ok``.
        :raises AssetNotFound: there was none.
        :raises TypeError, ValueError: ``asset_id`` is not an asset id.
        """
        _check_asset_id(asset_id)
        store = self._store()
        for _ in range(_ROUNDS):
            entry = await self._current(store, asset_id, repair=True)
            if entry is None:
                break
            if await settle(self._remove(store, asset_id, entry["_id"])):
                return True
            # A replace locked it meanwhile: finish that, delete the asset as it is then.
        else:
            raise FileConflict(
                f"asset {asset_id!r} was replaced {_ROUNDS} times while this delete "
                "tried to remove it; delete it again"
            )
        if missing_ok:
            return False
        raise AssetNotFound(asset_id, f"{store.name}.files")

    async def _remove(self, store: Store, asset_id: str, entry_id: Any) -> bool:
        """Take the id from the entry, unless a replace has locked it, then delete it."""
        taken = await store.files.update_one(
            {"_id": entry_id, f"metadata.{LIVE}": asset_id, f"metadata.{NEXT}": {"$exists": False}},
            {"$unset": {f"metadata.{m}": "" for m in (LIVE, HOLD, OF)}},
        )
        if not taken.matched_count:
            return False
        await store.delete(entry_id)
        return True

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
        the old version is deleted. Readers see the old asset or the new one, never
        none; adds never take the id meanwhile. Of replaces racing for one asset,
        one wins and the others raise :class:`~asyncassets.errors.FileConflict`. If
        the process dies mid-swap, the next :meth:`get`, :meth:`replace` or
        :meth:`delete` of the id finishes it; a cancelled replace finishes its swap
        before the cancellation propagates.

        :param filename: default: the asset's.
        :param content_type: default: guessed or sniffed anew.
        :returns: the asset as it is now.
        :raises AssetNotFound: there is no such asset, or it was deleted while the
            new bytes were stored (nothing is left of them).
        :raises FileConflict: another replace of the asset won (it started from the
            same version and moved the id first); nothing is left of this one.
            ``get()`` the asset and replace it again if yours should still win.
        :raises FileValidationError: the manager's rules refused the file.
        :raises TypeError, ValueError: bad id, source or metadata; nothing stored.
        """
        current = await self.get(asset_id)
        meta = {k: v for k, v in current.metadata.items() if k != "content_type"}
        meta.update(metadata)
        meta = _check_metadata(content_type, meta)
        meta[OF] = asset_id
        meta[PENDING] = asset_id
        if filename is None:
            filename = current.filename or _source_name(source)
        store = await self._ready()
        entry = await self._upload(store, source, filename, content_type, meta, asset_id)
        # From here on a cancelled caller waits for the swap to end: stopping it
        # between its steps would leave it to the next reader.
        return await settle(self._swap(store, asset_id, current.file_id, entry))

    async def _swap(
        self, store: Store, asset_id: str, old_id: Any, entry: dict[str, Any]
    ) -> Asset:
        new_id = entry["_id"]
        try:
            await self._lock(store, asset_id, old_id, new_id)
        except BaseException:
            await self._abandon(store, asset_id, old_id, new_id)
            raise
        if not await self._roll_forward(store, asset_id, old_id, new_id):
            raise FileConflict(
                f"the new version of asset {asset_id!r} was removed before it went live "
                "(by the orphan sweep, whose grace was shorter than this upload?); the "
                "asset keeps its old version. Replace it again."
            )
        now = await store.files.find_one({"_id": new_id})
        if now is None:  # deleted right after it went live
            now = {**entry, "metadata": {**entry["metadata"], LIVE: asset_id}}
        return Asset(self, store, now)

    async def _lock(self, store: Store, asset_id: str, old_id: Any, new_id: Any) -> None:
        """Lock the version read for the swap: it names the replacement and holds
        the id (``asset_hold``). Gives an entry written before ``asset_of`` its markers.

        :raises FileConflict: another replace locked it first or already swapped.
        :raises AssetNotFound: the asset was deleted meanwhile.
        """
        files = store.files
        for _ in range(_ROUNDS):
            try:
                locked = await files.update_one(
                    {"_id": old_id, f"metadata.{LIVE}": asset_id,
                     f"metadata.{NEXT}": {"$exists": False}},
                    {"$set": {f"metadata.{NEXT}": new_id, f"metadata.{HOLD}": asset_id,
                              f"metadata.{OF}": asset_id}},
                )
            except DuplicateKeyError:
                # The version before still holds the id: its swap has not let go yet.
                await self._settle(store, asset_id, await self._entries(store, asset_id))
                continue
            if locked.matched_count:
                return
            break
        else:
            raise FileConflict(
                f"asset {asset_id!r} kept being replaced by other writers; replace it again"
            )
        # Not the live, unlocked version this replace read any more: whoever moved
        # on is finished first, so the answer below is final.
        if await self._current(store, asset_id, repair=True) is None:
            raise AssetNotFound(asset_id, f"{store.name}.files")
        raise FileConflict(
            f"asset {asset_id!r} was replaced by another writer while this replace "
            "stored its bytes; that one won and this one was undone. get() the asset "
            "and replace it again if yours should still win."
        )

    async def _abandon(self, store: Store, asset_id: str, old_id: Any, new_id: Any) -> None:
        """Remove a replacement that will not go live, unless it went live already
        (a lock whose reply was lost, finished by a reader): then it is the asset."""
        stripped = await store.files.update_one(
            {"_id": new_id, f"metadata.{PENDING}": asset_id},
            {"$unset": {f"metadata.{m}": "" for m in (PENDING, OF)}},
        )
        if stripped.matched_count:
            await self._roll_back(store, asset_id, old_id, new_id)
            await store.delete(new_id)

    async def _settle(self, store: Store, asset_id: str, entries: list[dict[str, Any]]) -> bool:
        """Finish every swap among ``entries`` (a snapshot of the asset's entries):
        forward when the replacement is there, back when it is gone; delete the
        replaced versions that gave their hold up. Whether there was any."""
        present = {e["_id"] for e in entries}
        busy = False
        for entry in entries:
            meta = entry.get("metadata") or {}
            if NEXT not in meta or (LIVE in meta and meta.get(HOLD) != asset_id):
                continue
            if meta.get(HOLD) != asset_id:
                # Released, its replacement live: only its deletion was left (the
                # sweep's too). Not a swap in progress, so no reason to look again.
                await store.delete(entry["_id"])
                continue
            busy = True
            if meta[NEXT] in present:
                await self._roll_forward(store, asset_id, entry["_id"], meta[NEXT])
            else:
                await self._roll_back(store, asset_id, entry["_id"], meta[NEXT])
        return busy

    async def _roll_forward(self, store: Store, asset_id: str, old_id: Any, new_id: Any) -> bool:
        """The swap's steps after the lock, each conditional, so any number of
        finishers may run them: the old version gives the id up (keeping the hold),
        the new one takes it (the moment the replace happens), the old one gives the
        hold up and is deleted. ``False`` when the new one was gone (rolled back)."""
        files = store.files
        await files.update_one(
            {"_id": old_id, f"metadata.{LIVE}": asset_id, f"metadata.{NEXT}": new_id},
            {"$set": {f"metadata.{REPLACED}": asset_id}, "$unset": {f"metadata.{LIVE}": ""}},
        )
        try:
            taken = await files.update_one(
                {"_id": new_id, f"metadata.{PENDING}": asset_id},
                {"$set": {f"metadata.{LIVE}": asset_id},
                 "$unset": {f"metadata.{PENDING}": ""}},
            )
        except DuplicateKeyError:
            # Only a writer that does not lock (a version before asset_hold) can have
            # taken the id while the old version held it: that one keeps it.
            await self._abandon(store, asset_id, old_id, new_id)
            await self._release(store, asset_id, old_id, new_id)
            raise AssetExists(
                f"asset {asset_id!r} was added again by a writer that does not lock "
                "(an older asyncassets?) while it was being replaced; that one keeps "
                "the id and this replacement was undone",
                asset_id=asset_id,
            ) from None
        if not taken.matched_count:
            now = await files.find_one({"_id": new_id}, {f"metadata.{LIVE}": 1})
            if (now or {}).get("metadata", {}).get(LIVE) != asset_id:
                # Gone before it went live: the old version takes the id back. If it
                # cannot (it gave the hold up), the new one did go live, and was deleted.
                return not await self._roll_back(store, asset_id, old_id, new_id)
        await self._release(store, asset_id, old_id, new_id)
        await store.delete(old_id)
        return True

    async def _release(self, store: Store, asset_id: str, old_id: Any, new_id: Any) -> None:
        await store.files.update_one(
            {"_id": old_id, f"metadata.{NEXT}": new_id, f"metadata.{HOLD}": asset_id},
            {"$unset": {f"metadata.{HOLD}": ""}},
        )

    async def _roll_back(self, store: Store, asset_id: str, old_id: Any, new_id: Any) -> bool:
        """Undo a swap whose replacement is gone: the old version, which still holds
        the id, takes ``asset_id`` back and is unlocked. Whether it did."""
        files = store.files
        try:
            back = await files.update_one(
                {"_id": old_id, f"metadata.{HOLD}": asset_id, f"metadata.{NEXT}": new_id},
                {"$set": {f"metadata.{LIVE}": asset_id},
                 "$unset": {f"metadata.{REPLACED}": "", f"metadata.{NEXT}": ""}},
            )
        except DuplicateKeyError:
            # A writer that does not lock took the id meanwhile: it keeps it.
            await self._release(store, asset_id, old_id, new_id)
            return False
        return bool(back.matched_count)

    async def _finish_legacy(self, store: Store, asset_id: str) -> dict[str, Any] | None:
        """Finish a swap of a version before ``asset_of`` that stopped between its
        steps, if one did: the new version takes the id (it is complete), else the
        old one gets it back."""
        files = store.files
        legacy = {f"metadata.{OF}": {"$exists": False}}
        old = await files.find_one({f"metadata.{REPLACED}": asset_id, **legacy}, {"_id": 1})
        if old is None:
            return None
        new = await files.find_one({f"metadata.{PENDING}": asset_id, **legacy}, {"_id": 1})
        holder, marker = (new, PENDING) if new is not None else (old, REPLACED)
        try:
            await files.update_one(
                {"_id": holder["_id"], f"metadata.{marker}": asset_id},
                {"$set": {f"metadata.{LIVE}": asset_id, f"metadata.{OF}": asset_id},
                 "$unset": {f"metadata.{marker}": ""}},
            )
        except DuplicateKeyError:
            return await self._current(store, asset_id, repair=False)
        return await self._current(store, asset_id, repair=False)


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


def _pick(entries: list[dict[str, Any]], asset_id: str) -> dict[str, Any] | None:
    """Of a snapshot of an asset's entries, the one that is the asset: the live
    version, else the version being replaced (it holds the id in a swap's gap)."""
    held = None
    for entry in entries:
        meta = entry.get("metadata") or {}
        if meta.get(LIVE) == asset_id:
            return entry
        if meta.get(HOLD) == asset_id and NEXT in meta:
            held = entry
    return held


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
        meta = entry.get("metadata") or {}
        self.asset_id: str = meta.get(LIVE) or meta.get(HOLD) or ""

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
        """Leave out the first ``n``.

        :raises ValueError: ``n`` is not an int from 0 to 2**63 - 1 (checked here,
            not when the search runs).
        """
        return self._copy(skip=_count("skip", n))

    def limit(self, n: int) -> AssetSearch:
        """At most ``n`` (0: no limit).

        :raises ValueError: as :meth:`skip`.
        """
        return self._copy(limit=_count("limit", n))

    def page(self, number: int, size: int) -> AssetSearch:
        """Page ``number`` (from 1) of ``size`` assets.

        The same as ``skip((number - 1) * size).limit(size)``.

        :raises ValueError: a number below 1, or a page starting beyond the
            2**63 - 1 assets the server can skip (checked here, not when it runs).
        """
        if _count("page number", number) < 1:
            raise ValueError("pages are numbered from 1")
        if _count("page size", size) < 1:
            raise ValueError("a page holds at least one asset")
        skip = (number - 1) * size
        if skip > _MAX_COUNT:
            raise ValueError(
                f"page {number} of {size} would start after {skip} assets; the server "
                f"skips at most {_MAX_COUNT} (2**63 - 1): ask for an earlier page"
            )
        return self._copy(skip=skip, limit=size)

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
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= _MAX_COUNT:
        raise ValueError(
            f"{what} takes an int from 0 to 2**63 - 1 (what the server accepts), not {n!r}"
        )
    return n
