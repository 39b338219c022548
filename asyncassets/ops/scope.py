"""Which buckets and aliases a sweep or check works on, and where references live.

References are found from the registered Document classes (the one schema walker,
:mod:`asyncassets.schema`): for every catalogue they declare (a GridFS bucket, or
the catalogue of a directory or S3 storage), the collections and paths that hold
ids of its files, and the :class:`~asyncassets.storage.Storage` its fields
declare. Aliases that may share a database see one another's references, so a
file referenced through either is never an orphan.

One catalogue belongs to one storage: two fields naming the same catalogue with
different storages make the sweep and the check refuse
(:class:`~asyncassets.errors.StorageConflict`, a ``ValueError``; declaring such
classes is refused already, unless they are made by one function). And one
place of stored objects belongs to one catalogue: when several declared
catalogues keep their objects in the same directory or bucket prefix (or one
inside another's), an object is kept while any of them names it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Any

from ..connection import DEFAULT_ALIAS, _connections, get_db, registered_aliases
from ..errors import ConnectionNotRegistered, StorageConflict
from ..schema import document_classes, file_paths, storage_conflict
from ..storage import FileSystemStorage, GridFSStorage, QueuedStorage, S3Storage, Storage

__all__ = ["declared_buckets", "declared_storage", "declared_storages"]


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


_Target = tuple[str, str]  # (catalogue alias, catalogue name: the collection_name)

#: For each declared catalogue, each storage declared for it and the fields
#: (``Class.path``) declaring it.
_StorageMap = dict[_Target, dict[Storage, list[str]]]


def _declarations() -> tuple[dict[_Target, list[_Source]], _StorageMap]:
    """For every catalogue declared by a registered class: where its references
    live, and which storages its fields declare."""
    merged: dict[_Target, dict[tuple[str, str, tuple[str, ...]], tuple[bool, set[str]]]] = {}
    storages: _StorageMap = {}
    for declared in document_classes():
        # mongoengine's metaclass adds _meta, _fields and _class_name: no type sees them.
        cls: Any = declared
        doc_alias = cls._meta.get("db_alias") or DEFAULT_ALIAS
        collection = cls._get_collection_name()
        for top in cls._fields.values():
            for segments, queryable, file_field in file_paths(top):
                target = (file_field.db_alias or doc_alias, file_field.collection_name)
                key = (doc_alias, collection, segments)
                entry = merged.setdefault(target, {}).setdefault(key, (queryable, set()))
                entry[1].add(cls._class_name)
                fields = storages.setdefault(target, {}).setdefault(file_field.storage, [])
                name = f"{cls._class_name}.{'.'.join(segments)}"
                if name not in fields:
                    fields.append(name)
    _add_asset_catalogues(merged, storages)
    refs = {
        target: [
            _Source(alias, coll, segments, queryable, tuple(sorted(names)))
            for (alias, coll, segments), (queryable, names) in sorted(
                sources.items(), key=lambda item: (item[0][0], item[0][1], item[0][2])
            )
        ]
        for target, sources in merged.items()
    }
    return refs, storages


def _add_asset_catalogues(merged: dict[_Target, Any], storages: _StorageMap) -> None:
    """Add the catalogues of the asset managers made in this process.

    No document references an asset (it is referenced by existing as one:
    :func:`asyncassets.assets.assets_in_use`), so they come with no sources; their
    storages count like fields' storages, so the sweep and the check work on them
    with the right one, and a conflict with a field's storage is refused.
    """
    from ..assets import asset_catalogues

    for target, declared in asset_catalogues().items():
        merged.setdefault(target, {})
        for storage, labels in declared.items():
            known = storages.setdefault(target, {}).setdefault(storage, [])
            known.extend(label for label in labels if label not in known)


def _reference_map() -> dict[_Target, list[_Source]]:
    """For every catalogue declared by a registered class, where its references live."""
    return _declarations()[0]


def declared_buckets() -> list[tuple[str, str]]:
    """The ``(alias, catalogue name)`` pairs that registered Document classes store
    files in: GridFS buckets and the catalogues of other storages alike.

    These are the buckets :func:`sweep_orphans` and :func:`check` work on by default.
    """
    return sorted(_reference_map())


def declared_storages() -> dict[tuple[str, str], Storage]:
    """The storage of each ``(alias, catalogue name)`` registered classes declare.

    :raises StorageConflict: (a ``ValueError``) two fields declare different
        storages for one catalogue.
    """
    _refs, storages = _declarations()
    return {target: _storage_of(target, storages) for target in sorted(storages)}


def _conflict(target: _Target, declared: dict[Storage, list[str]]) -> StorageConflict:
    return storage_conflict(target, declared)


def declared_storage(alias: str, name: str) -> Storage | None:
    """The storage declared for catalogue ``name`` on ``alias``, or ``None`` when
    no document class or asset manager declares it.

    Unlike :func:`declared_storages`, a conflict on another catalogue does not
    matter here.

    :raises StorageConflict: declarations give this catalogue different storages.
    """
    _refs, storages = _declarations()
    if not storages.get((alias, name)):
        return None
    return _storage_of((alias, name), storages)


def _storage_of(target: _Target, storages: _StorageMap) -> Storage:
    """The one storage declared for ``target``; GridFS for an undeclared bucket.

    :raises StorageConflict: fields declare different storages for it.
    """
    declared = storages.get(target)
    if not declared:
        return GridFSStorage(target[1])
    if len(declared) > 1:
        raise _conflict(target, declared)
    return next(iter(declared))


def _place(storage: Storage) -> tuple[str, str] | None:
    """Where a storage's objects are: ``(space, prefix)`` so that an object's full
    name is ``prefix + key`` within ``space``; ``None`` for GridFS. A directory
    is named by its real path: reached through a link, it is the same place."""
    if isinstance(storage, FileSystemStorage):
        return "file", os.path.realpath(storage.root).rstrip("/") + "/"
    if isinstance(storage, S3Storage):
        return f"s3 {storage.endpoint_url} {storage.bucket}", storage.prefix
    return None


#: The field of a catalogue entry that names an object's key.
LOCATION_FIELD = "location.key"
#: Where a queued storage's entries name their remote copy.
REMOTE_FIELD = "remote.key"


def _places(storage: Storage) -> list[tuple[str, str, str]]:
    """Every place a storage keeps objects: ``(space, prefix, field)``, ``field``
    being where its entries name the key. A queued storage has two: its local
    directory (``location.key``) and its remote storage (``remote.key``)."""
    if isinstance(storage, QueuedStorage):
        found = [(*place, LOCATION_FIELD) for place in [_place(storage.local)] if place]
        remote = _place(storage.remote)
        return found + ([(*remote, REMOTE_FIELD)] if remote else [])
    place = _place(storage)
    return [(*place, LOCATION_FIELD)] if place else []


@dataclass(frozen=True)
class _Sharer:
    """A catalogue whose objects are (or may be) in the listing of another's storage.

    An object listed under the other storage's key ``k`` has the full name
    ``listed_prefix + k``; it is named by this catalogue when that name is
    ``prefix + key`` for a ``key`` one of its entries holds.
    """

    alias: str
    catalogue: str
    prefix: str
    #: Where the catalogue's entries name the key (``remote.key`` for the remote
    #: copies of a queued storage).
    field: str = LOCATION_FIELD

    def key_of(self, full_name: str) -> str | None:
        """This catalogue's key for the object of ``full_name``, or ``None``."""
        if full_name.startswith(self.prefix) and len(full_name) > len(self.prefix):
            return full_name[len(self.prefix):]
        return None


def _sharers(
    target: _Target, storage: Storage, storages: _StorageMap, *, remote: bool = False
) -> list[_Sharer]:
    """The catalogues whose objects a listing of ``storage`` may show, itself first.

    Every declared catalogue (on any alias) whose storage keeps objects in the same
    place, or in a place inside or around it: the orphaned-object sweep must not
    delete an object another catalogue names. For a queued storage, the place is
    its local directory, or with ``remote`` its remote storage.
    """
    places = _places(storage)
    if isinstance(storage, QueuedStorage):
        places = [p for p in places if (p[2] == REMOTE_FIELD) == remote]
    if not places:
        return []
    space, prefix, own_field = places[0]
    found = [_Sharer(target[0], target[1], prefix, own_field)]
    for other_target, declared in sorted(storages.items()):
        for other in declared:
            for other_space, other_prefix, other_field in _places(other):
                if other_space != space:
                    continue
                if not (other_prefix.startswith(prefix) or prefix.startswith(other_prefix)):
                    continue
                sharer = _Sharer(other_target[0], other_target[1], other_prefix, other_field)
                if sharer not in found:
                    found.append(sharer)
    return found


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
    """One catalogue to work on, its storage, and where references to its files live."""

    #: Sources declared for this bucket (on this alias, or on an alias certainly
    #: sharing its database): where dangling references are looked for.
    own: list[_Source]
    #: ``own`` plus the sources of every same-named bucket on an alias that may
    #: share the database: what decides whether a file is referenced.
    judge: list[_Source]
    #: Where the bytes of its files are.
    storage: Storage
    #: Object storages only: the catalogues whose entries may name an object its
    #: storage lists (itself first). For a queued storage: its local directory's.
    sharers: list[_Sharer]
    #: Queued storages only: the same for its remote storage's objects.
    remote_sharers: list[_Sharer] = dataclass_field(default_factory=list)


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
    refs, storages = _declarations()
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
        storage = _storage_of((bucket_alias, name), storages)
        if same is not None:
            if targets[same].storage != storage:
                both = {targets[same].storage: storages.get(same, {}).get(
                    targets[same].storage, [f"bucket {name!r} on alias {same[0]!r}"])}
                both[storage] = storages.get((bucket_alias, name), {}).get(
                    storage, [f"bucket {name!r} on alias {bucket_alias!r}"])
                raise _conflict((bucket_alias, name), both)
            targets[same].own = _union(targets[same].own, sources)
        else:
            targets[(bucket_alias, name)] = _Work(
                list(sources), [], storage, _sharers((bucket_alias, name), storage, storages),
                _sharers((bucket_alias, name), storage, storages, remote=True)
                if isinstance(storage, QueuedStorage) else [],
            )
    for (bucket_alias, name), work in targets.items():
        work.judge = _union(work.own, *(
            sources for (other, other_name), sources in sorted(refs.items())
            if other_name == name and other in connected
            and _maybe_same_db(bucket_alias, other)
        ))
    connected_set = set(connected)
    for (bucket_alias, name), work in sorted(targets.items()):
        unreachable = sorted({s.alias for s in work.judge} - connected_set)
        lost = sorted({s.alias for s in [*work.sharers, *work.remote_sharers]} - connected_set)
        if lost and not unreachable:
            who = ", ".join(
                f"catalogue {s.catalogue!r} (alias {s.alias!r})"
                for s in dict.fromkeys([*work.sharers, *work.remote_sharers])
                if s.alias in lost
            )
            raise ConnectionNotRegistered(
                f"Cannot tell which objects of {work.storage.url} belong to no catalogue: "
                f"{who} keeps its objects there too, through an alias that is not "
                "connected. Connect it with asyncassets.connect(..., alias=...), or leave "
                f"catalogue {name!r} out with buckets= / alias=."
            )
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

    return {
        target: _Work(keep(w.own), keep(w.judge), w.storage, w.sharers, w.remote_sharers)
        for target, w in targets.items()
    }


async def _buckets_in(alias: str) -> list[str]:
    """Names of the GridFS buckets (``X.files`` or ``X.chunks``) in an alias's database."""
    names = await get_db(alias).list_collection_names()
    found: set[str] = set()
    for name in names:
        for suffix in (".files", ".chunks"):
            if name.endswith(suffix) and not name.startswith("system."):
                found.add(name[: -len(suffix)])
    return sorted(found)

