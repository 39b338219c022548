"""Finding file proxies inside documents: top level, embedded, lists and dicts.

Documents use this to cascade deletes and batch-load metadata; proxies use it to
find where in their top-level document they are stored, so that a change to a
saved document's file is written with one conditional update.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

import mongoengine
from mongoengine.base import get_document
from mongoengine.fields import DictField, EmbeddedDocumentField, ListField
from pymongo.errors import ConnectionFailure

from .._tasks import settle
from ..errors import FileConflict, FileValidationError
from .proxy import _MISSING, FileProxy

__all__ = [
    "bind_proxies",
    "cascade_paths",
    "delete_files_of",
    "file_field_names",
    "iter_proxies",
    "load_files",
    "persist_reference",
    "root_document",
]

# A path segment: (db field name, dict key or list index; True for a list index).
Segment = tuple[str, bool]


def _file_field_type() -> type:
    from ..fields import FileField

    return FileField


def _holds_files(
    field: Any, cascade_only: bool = False, _seen: frozenset[int] = frozenset()
) -> bool:
    file_field = _file_field_type()
    if isinstance(field, file_field):
        return field.cascade or not cascade_only
    if isinstance(field, (ListField, DictField)) and getattr(field, "field", None) is not None:
        return _holds_files(field.field, cascade_only, _seen)
    if isinstance(field, EmbeddedDocumentField):
        doc_type = field.document_type
        if id(doc_type) in _seen:
            return False
        seen = _seen | {id(doc_type)}
        classes = [doc_type, *(_subclass(doc_type, n) for n in doc_type._subclasses[1:])]
        return any(
            _holds_files(f, cascade_only, seen)
            for cls in classes
            if cls is not None
            for f in cls._fields.values()
        )
    return False


def _subclass(base: type, name: str) -> type | None:
    try:
        return get_document(name)  # type: ignore[no-any-return]
    except mongoengine.errors.NotRegistered:
        return None


def _classes(doc_cls: type) -> list[type]:
    names = getattr(doc_cls, "_subclasses", (doc_cls._class_name,))
    found = [_subclass(doc_cls, n) for n in names]
    return [c for c in found if c is not None] or [doc_cls]


def file_field_names(doc_cls: type) -> list[str]:
    """Top-level fields that are a ``FileField`` or a list/dict of them."""
    file_field = _file_field_type()
    names = []
    for name, field in doc_cls._fields.items():
        inner = getattr(field, "field", None)
        if isinstance(field, file_field) or isinstance(inner, file_field):
            names.append(name)
    return names


def cascade_paths(doc_cls: type) -> tuple[str, ...]:
    """Top-level db field names (of the class and its subclasses) holding cascading files.

    Not cached: a subclass declared later (``allow_inheritance``) must count too.
    """
    paths: dict[str, None] = {}
    for cls in _classes(doc_cls):
        for field in cls._fields.values():
            if _holds_files(field, cascade_only=True):
                paths[field.db_field] = None
    return tuple(paths)


def root_document(obj: Any) -> Any:
    """The top-level ``Document`` that ``obj`` (a document or embedded one) sits in."""
    try:
        while obj is not None and not isinstance(obj, mongoengine.Document):
            obj = getattr(obj, "_instance", None)
            if obj is not None:
                obj.__class__  # noqa: B018  (raises ReferenceError on a dead weakref.proxy)
    except ReferenceError:
        return None
    return obj


def iter_proxies(
    doc: Any, prefix: tuple[Segment, ...] = ()
) -> Iterator[tuple[FileProxy, tuple[Segment, ...], Any, str]]:
    """Yield ``(proxy, path, owner, field name)`` for every proxy inside ``doc``."""
    for name, field in doc._fields.items():
        value = doc._data.get(name)
        if value is None:
            continue
        yield from _walk(value, field, (*prefix, (field.db_field, False)), doc, name)


def _walk(
    value: Any, field: Any, path: tuple[Segment, ...], owner: Any, name: str
) -> Iterator[tuple[FileProxy, tuple[Segment, ...], Any, str]]:
    if isinstance(value, FileProxy):
        yield value, path, owner, name
    elif isinstance(value, mongoengine.EmbeddedDocument):
        yield from iter_proxies(value, path)
    elif isinstance(value, (list, tuple)):
        inner = getattr(field, "field", None)
        for index, item in enumerate(value):
            yield from _walk(item, inner, (*path, (str(index), True)), owner, name)
    elif isinstance(value, dict):
        inner = getattr(field, "field", None)
        for key, item in value.items():
            yield from _walk(item, inner, (*path, (str(key), False)), owner, name)


def bind_proxies(doc: Any) -> None:
    """Tell every proxy inside ``doc`` which (embedded) document holds it."""
    if not _classes_with_files(type(doc)):
        return
    for proxy, _path, owner, name in iter_proxies(doc):
        proxy._bind(owner, name)


@functools.cache
def _classes_with_files(doc_cls: type) -> bool:
    return any(_holds_files(f) for f in doc_cls._fields.values())


def _locate(root: Any, proxy: FileProxy) -> tuple[Segment, ...] | None:
    for found, path, _owner, _name in iter_proxies(root):
        if found is proxy:
            return path
    return None


async def persist_reference(proxy: FileProxy, old: Any, new: Any) -> bool | None:
    """Move a saved document's reference from file ``old`` to ``new`` (None: remove it).

    The update names the exact path (``pages.1.image``) and is conditional on that
    path still holding ``old``, so it can neither hit another list element nor undo
    a concurrent change.

    :returns: ``True`` when the stored document was updated; ``None`` when there is
        no stored document to update (a new document: ``save()`` will write it).
    :raises FileConflict: the stored document no longer holds ``old`` there.
    """
    root = root_document(proxy._instance)
    if root is None or root.pk is None or root._created:
        return None
    path = _locate(root, proxy)
    if path is None:
        # Detached from its saved document (reloaded, reassigned, popped from a
        # list): the stored document may still reference ``old``, so touching it
        # could leave that document dangling.
        raise FileConflict(
            f"This file proxy is no longer part of its saved {root.__class__.__name__} "
            f"{root.pk!r} (the document was reloaded or the field reassigned). Use the "
            "document's current field, e.g. `doc.<field>`, and retry."
        )
    parts = [part for part, _ in path]
    dotted = ".".join(parts)
    id_field = root._meta["id_field"]
    query: dict[str, Any] = {"_id": root._fields[id_field].to_mongo(root.pk), dotted: old}
    if old is None:
        # A missing path matches None too: make sure the list elements exist.
        for i, (_, is_index) in enumerate(path):
            if is_index:
                query[".".join(parts[: i + 1])] = {"$exists": True}
    element = path[-1][1]
    if new is not None:
        update: dict[str, Any] = {"$set": {dotted: new}}
    elif element:
        update = {"$pull": {".".join(parts[:-1]): old}}
    else:
        update = {"$unset": {dotted: ""}}
    result = await root.__class__._get_collection().update_one(query, update)
    if result.matched_count == 0:
        raise FileConflict(
            f"The stored {root.__class__.__name__} {root.pk!r} no longer references file "
            f"{old!r} at {dotted!r} (changed by another task, or deleted). "
            "Reload the document and retry."
        )
    if new is None and element:
        _remove_from_list(proxy)
    return True


async def _push(
    doc: Any, list_path: str, proxy: FileProxy, files_doc: dict[str, Any], values: list[Any]
) -> None:
    new_id = files_doc["_id"]
    id_field = doc._meta["id_field"]
    query = {"_id": doc._fields[id_field].to_mongo(doc.pk)}
    try:
        result = await doc.__class__._get_collection().update_one(
            query, {"$push": {list_path: new_id}}
        )
    except ConnectionFailure:
        raise  # outcome unknown: the file stays, for the sweep if unreferenced
    except Exception:
        await proxy._delete_stored(new_id)  # refused: nothing references it
        raise
    if result.matched_count == 0:
        await proxy._delete_stored(new_id)
        raise FileConflict(
            f"{type(doc).__name__} {doc.pk!r} is no longer stored; the file was not added."
        )
    proxy.grid_id, proxy._files_doc = new_id, files_doc
    list.append(values, proxy)  # the database already has it


def _remove_from_list(proxy: FileProxy) -> None:
    owner, key = proxy._instance, proxy._key
    values = owner._data.get(key) if owner is not None and key else None
    if isinstance(values, list):
        for i, item in enumerate(values):
            if item is proxy:
                # Straight on the underlying list: the database already has this.
                list.__delitem__(values, i)
                break


async def add_to_list(
    doc: Any,
    field_name: str,
    data: Any,
    *,
    content_type: str | None,
    filename: str | None,
    **metadata: Any,
) -> FileProxy:
    """Upload ``data`` as a new element of the list of files ``doc.<field_name>``."""
    file_field = _file_field_type()
    field = doc._fields.get(field_name)
    inner = getattr(field, "field", None)
    if not isinstance(field, ListField) or not isinstance(inner, file_field):
        raise ValueError(
            f"add_file() takes the name of a ListField(FileField()) of "
            f"{type(doc).__name__}, and {field_name!r} is not one."
        )
    proxy = inner._proxy(None, doc, field_name)
    proxy._metadata(content_type, metadata)  # refuse bad metadata before any I/O
    bucket = proxy._bucket()
    await bucket.ensure_indexes()
    files_doc = await proxy._store(bucket, data, content_type, filename, metadata)
    new_id = files_doc["_id"]
    values = getattr(doc, field_name)
    if doc.pk is not None and not doc._created:
        # Shielded: once the $push is on its way, its outcome (not a cancellation of
        # the caller) decides whether the new file is kept.
        await settle(_push(doc, field.db_field, proxy, files_doc, values))
    else:
        proxy.grid_id, proxy._files_doc = new_id, files_doc
        values.append(proxy)
    return proxy


async def check_assigned_ids(doc: Any) -> None:
    """Refuse to save ids assigned by hand that name no file: one query per bucket.

    :raises FileValidationError: an assigned id is not in its bucket.
    """
    if not _classes_with_files(doc.__class__):
        return
    groups: dict[tuple[str, str], list[tuple[FileProxy, str]]] = defaultdict(list)
    for proxy, path, _owner, _name in iter_proxies(doc):
        if proxy._unverified and proxy.grid_id is not None:
            key = (proxy.db_alias, proxy.collection_name)
            groups[key].append((proxy, ".".join(part for part, _ in path)))
    for (alias, bucket_name), entries in groups.items():
        found = await entries[0][0]._bucket().find_many([p.grid_id for p, _ in entries])
        for proxy, where in entries:
            if proxy.grid_id not in found:
                raise FileValidationError(
                    f"{where} is set to {proxy.grid_id!r}, which names no file in bucket "
                    f"{bucket_name!r} (alias {alias!r}). Assign an uploaded file's id, or "
                    "upload with `await doc.<field>.put(...)`.",
                    field_name=where,
                )
            proxy._files_doc = found[proxy.grid_id]
            proxy._unverified = False


async def load_files(docs: Sequence[Any], field_names: Sequence[str]) -> None:
    """Load the files documents of ``field_names`` for all ``docs``: one query per bucket."""
    groups: dict[tuple[str, str], list[FileProxy]] = defaultdict(list)
    for doc in docs:
        for name in field_names:
            value = getattr(doc, name)
            if isinstance(value, dict):
                proxies = list(value.values())
            elif isinstance(value, (list, tuple)):
                proxies = list(value)
            else:
                proxies = [value]
            for proxy in proxies:
                if isinstance(proxy, FileProxy) and proxy.grid_id is not None:
                    groups[(proxy.db_alias, proxy.collection_name)].append(proxy)
    for proxies in groups.values():
        found = await proxies[0]._bucket().find_many([p.grid_id for p in proxies])
        for proxy in proxies:
            proxy._files_doc = found.get(proxy.grid_id, _MISSING)


async def delete_files_of(doc_cls: type, sons: Sequence[dict[str, Any]]) -> None:
    """Delete the cascading files held by these raw (deleted) documents."""
    groups: dict[tuple[str, str, type], set[Any]] = defaultdict(set)
    proxies: dict[tuple[str, str, type], FileProxy] = {}
    for son in sons:
        cls = _subclass(doc_cls, son["_cls"]) if "_cls" in son else doc_cls
        doc = (cls or doc_cls)._from_son(son, created=False)
        for proxy, _path, _owner, _name in iter_proxies(doc):
            field = proxy._field
            if proxy.grid_id is None or (field is not None and not field.cascade):
                continue
            # Keyed by proxy class too: an ImageProxy also deletes thumbnails.
            key = (proxy.db_alias, proxy.collection_name, type(proxy))
            groups[key].add(proxy.grid_id)
            proxies[key] = proxy
    for key, ids in groups.items():
        for file_id in ids:
            await proxies[key]._delete_stored(file_id)
