"""The one writer of a saved document's file references.

Only this module moves a stored document's reference from one file to another. A
file proxy asks for a switch through its document
(``Document._switch_file_reference``); ``save()`` takes the same per-document lock,
so a switch never interleaves with the document's own write. The rules it owns:

* **First save in flight.** A switch waits for a ``save()`` of the same document
  object that is under way, then acts on what that save left: an unsaved
  document changes in memory only, a stored one with a conditional update.
* **Conditional updates.** The update names the exact path (``pages.1.image``) and
  is conditional on that path still holding the old file, so it can neither hit
  another list element nor undo a concurrent change.
* **Unknown outcomes keep data.** When the update's outcome is unknown (a lost
  reply, a write-concern error, a cancelled caller), neither file is deleted: the
  stored document is read back to learn which file it holds, and the other one is
  left to the orphan sweep. Switches are written with ``w="majority"`` whatever
  the collection's write concern (see :func:`asyncassets._driver.acknowledged`):
  the switch must know whether it applied, and the old file is deleted only once
  no failover can roll the switch back.
* **One document, one path.** A proxy belongs to the document it was loaded into
  or created in. Copying a proxy or an embedded document into another document
  gives that document its own proxy (see :func:`bind`); the file is then shared,
  and a replace or delete through either keeps it while the other one holds it.
  A proxy that is no longer in its saved document refuses to act
  (:class:`~asyncassets.errors.FileConflict`).
* **Unsaved parts of saved documents.** A file put into an embedded element that
  was appended after the last save changes in memory and is written by the next
  ``save()``.
* **What may be deleted.** A file is deleted only once no stored document can
  reference it through this path: after a confirmed switch, if no other live
  proxy holds it and it was not assigned by hand (an id from elsewhere may be
  referenced elsewhere; the sweep removes it once it is unreferenced).
* **An upload's file is attached once.** Before a stored reference moves away
  from a file that a resumable upload made (its metadata names the upload,
  :data:`~asyncassets.storage.resumable.UPLOAD_MARK`), the upload's session is
  marked done, if its finish did not get to it (killed after its switch). So a
  session that is not done, and whose field does not hold its file, was never
  attached: a retried finish attaches it then, and never over a later change.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import copy
import weakref
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

import mongoengine
from mongoengine.base import get_document
from pymongo.errors import ConnectionFailure, PyMongoError, WriteConcernError

from . import _driver
from ._tasks import add_note, settle
from .connection import get_db
from .errors import FileConflict, FileValidationError, PendingFileMissing
from .fields import FileField
from .files.proxy import MISSING, FileProxy
from .schema import cascade_fields, fields_with_files, holds_files
from .storage.entries import is_file_id
from .storage.resumable import UPLOAD_MARK, UploadSessions

__all__ = [
    "AssignedFiles",
    "add_to_list",
    "bind",
    "check_assigned_ids",
    "delete_files_of",
    "forget_assigned",
    "iter_proxies",
    "load_files",
    "saving",
    "switch",
    "unknown_outcome",
    "upload_assigned",
]

# A path segment: (db field name, dict key or list index; True for a list index).
Segment = tuple[str, bool]


# -- the per-document state -----------------------------------------------------------


class _DocState:
    """What the reference writer keeps per document object."""

    __slots__ = ("lock", "maybe_stored")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        #: A save()'s outcome was unknown: the document may be stored, unconfirmed.
        self.maybe_stored = False


def _state(doc: Any) -> _DocState:
    state = doc.__dict__.get("_aa_refs")
    if state is None:
        state = _DocState()
        # Straight into __dict__: mongoengine's __setattr__ would treat it as data
        # on a DynamicDocument, and it must never be saved, copied or pickled.
        doc.__dict__["_aa_refs"] = state
    return state


def _is_stored(doc: Any) -> bool:
    return doc.pk is not None and not doc._created


# -- walking instances ----------------------------------------------------------------


def iter_proxies(
    doc: Any, prefix: tuple[Segment, ...] = ()
) -> Iterator[tuple[FileProxy, tuple[Segment, ...], Any, str]]:
    """Yield ``(proxy, path, owner, field name)`` for every proxy inside ``doc``."""
    for name, field in doc._fields.items():
        value = doc._data.get(name)
        if value is None:
            continue
        yield from _walk(value, field, (*prefix, (field.db_field, False)), doc, name)


#: Set while this module copies an embedded document for a new owner (bind):
#: that copy carries the proxies, pending data included.
_INTERNAL_COPY: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "asyncassets_internal_copy", default=False
)


def refuse_copy_with_pending_data(doc: Any) -> None:
    """For ``__getstate__``: mongoengine copies and pickles a document through
    ``to_mongo()``, where data assigned to a file field (not uploaded yet) has no
    id; the copy would hold an empty field, and its ``save()`` store no file.

    :raises TypeError: ``doc`` holds data assigned for upload.
    """
    if _INTERNAL_COPY.get():
        return
    pending = pending_data(doc)
    if pending:
        raise TypeError(
            f"{type(doc).__name__} cannot be copied or pickled while "
            f"{', '.join(pending)} holds data assigned for upload: save() first, or "
            "copy the document before assigning the data."
        )


def pending_data(doc: Any) -> list[str]:
    """The dotted paths of ``doc``'s file fields that hold data not uploaded yet
    (``doc.photo = data``, for the next ``save()``); binds ``doc`` first, as
    ``save()`` does, so that data put into a list is seen too."""
    bind(doc)
    return [
        ".".join(part for part, _ in path)
        for proxy, path, _owner, _name in iter_proxies(doc)
        if proxy._assignment is not None
    ]


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


def _locate(root: Any, proxy: FileProxy) -> tuple[Segment, ...] | None:
    for found, path, _owner, _name in iter_proxies(root):
        if found is proxy:
            return path
    return None


# -- binding: one document, one path ----------------------------------------------------


def bind(doc: Any, *, loaded: bool = False) -> None:
    """Make every file value inside ``doc`` a proxy that belongs to ``doc``.

    Raw ids in lists and dicts of files become proxies (through the field's one
    conversion, :meth:`FileField.to_python`); a proxy or an embedded document
    that belongs to another live document is copied, so the original keeps
    acting on its own document. ``loaded``: the values come from the database
    (so hand-assigned ids are not involved).
    """
    if not holds_files(type(doc)):
        return
    _bind_into(doc, doc, loaded)


def _bind_into(root: Any, holder: Any, loaded: bool) -> None:
    for name in fields_with_files(type(holder)):
        field = holder._fields[name]
        value = holder._data.get(name)
        if value is None:
            continue
        new = _bind_value(root, holder, name, value, field, loaded)
        if new is not value:
            holder._data[name] = new


def _bind_value(
    root: Any, holder: Any, name: str, value: Any, field: Any, loaded: bool
) -> Any:
    if isinstance(field, FileField):
        if not isinstance(value, FileProxy):
            value = field.to_python(value)
        return _own(root, holder, name, value, loaded)
    if isinstance(value, mongoengine.EmbeddedDocument):
        owner = _root_mark(value)
        if owner is not None and owner is not root:
            value = _copy_embedded(value, owner)
        _mark_root(value, root)
        value._instance = weakref.proxy(holder)
        _bind_into(root, value, loaded)
        return value
    inner = getattr(field, "field", None)
    if inner is None:
        return value
    if isinstance(value, list):
        for index, item in enumerate(value):
            if item is None:
                continue
            new = _bind_value(root, holder, name, item, inner, loaded)
            if new is not item:
                list.__setitem__(value, index, new)  # not a change for mongoengine
    elif isinstance(value, dict):
        for key, item in list(value.items()):
            if item is None:
                continue
            new = _bind_value(root, holder, name, item, inner, loaded)
            if new is not item:
                dict.__setitem__(value, key, new)
    return value


def _own(root: Any, holder: Any, name: str, proxy: FileProxy, loaded: bool) -> FileProxy:
    owner = proxy._owner
    if owner is not None and owner is not root:
        proxy = proxy._copy()
    proxy._owner = root
    proxy._orphaned = False
    proxy._instance = holder
    proxy._key = name
    if loaded:
        # Read from the database: the document references it, nothing to verify.
        proxy._unverified = False
        proxy._assigned = False
    return proxy


def _root_mark(obj: Any) -> Any:
    return getattr(obj, "__dict__", {}).get("_aa_root")


def _mark_root(obj: Any, root: Any) -> None:
    # Straight into __dict__: never a field, never saved.
    namespace = getattr(obj, "__dict__", None)
    if namespace is not None:
        namespace["_aa_root"] = root


def _reparent(holder: Any) -> None:
    """Point every embedded document under ``holder`` back at its parent."""
    for name in holder._fields:
        for item in _embedded_in(holder._data.get(name)):
            item._instance = weakref.proxy(holder)
            _reparent(item)


def _embedded_in(value: Any) -> Iterator[Any]:
    if isinstance(value, mongoengine.EmbeddedDocument):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _embedded_in(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _embedded_in(item)


def _copy_embedded(value: Any, owner: Any) -> Any:
    """A copy of an embedded document that another document owns, for a new owner.

    mongoengine re-parented the shared one when it was assigned; the original owner
    gets it back, and the new owner gets the copy.
    """
    token = _INTERNAL_COPY.set(True)
    try:
        clone = copy.copy(value)
    finally:
        _INTERNAL_COPY.reset(token)
    clone._data = {k: _shallow(v) for k, v in value._data.items()}
    clone._changed_fields = []
    getattr(clone, "__dict__", {}).pop("_aa_root", None)
    _reparent(owner)  # puts _instance back on the original
    return clone


def _shallow(value: Any) -> Any:
    # Containers are copied (mongoengine wraps them again on access); the proxies
    # and embedded documents in them are copied when the clone is bound.
    if isinstance(value, list):
        return list(value)
    if isinstance(value, dict):
        return dict(value)
    return value


# -- saving ---------------------------------------------------------------------------


def saving(doc: Any) -> contextlib.AbstractAsyncContextManager[None]:
    """Hold ``doc``'s reference lock around its ``save()``, and record the outcome.

    ``async with saving(doc): ...``. File switches of the same document object wait
    meanwhile, so they act on what the save left. A save whose outcome is unknown
    leaves the document "maybe stored": later switches ask the database before
    deleting anything.
    """
    return _Saving(doc)


class _Saving(contextlib.AbstractAsyncContextManager[None]):
    # A class rather than an @asynccontextmanager generator: it runs for every
    # save(), and the generator machinery cost more than the rest of it.
    __slots__ = ("_doc", "_state")

    def __init__(self, doc: Any) -> None:
        self._doc = doc
        self._state = _state(doc)

    async def __aenter__(self) -> None:
        lock = self._state.lock
        await lock.acquire()
        try:
            bind(self._doc)
        except BaseException:
            lock.release()
            raise

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        state = self._state
        try:
            if exc is not None:
                if unknown_outcome(exc):
                    state.maybe_stored = True
                return  # the exception goes on
            state.maybe_stored = False
            if holds_files(type(self._doc)):
                for proxy, _path, _owner, _name in iter_proxies(self._doc):
                    proxy._pending = False  # the stored document references it now
        finally:
            state.lock.release()


def unknown_outcome(exc: BaseException) -> bool:
    """Whether a write that raised ``exc`` may have been applied (its outcome is unknown)."""
    if isinstance(exc, (ConnectionFailure, WriteConcernError, asyncio.CancelledError)):
        return True
    if isinstance(exc, PyMongoError):
        return exc.has_error_label("RetryableWriteError") or exc.timeout
    cause = exc.__cause__
    return cause is not None and unknown_outcome(cause)


# -- the switch -----------------------------------------------------------------------


async def switch(
    root: Any, proxy: FileProxy, old: Any, new_doc: dict[str, Any] | None
) -> None:
    """Move ``proxy``'s reference from file ``old`` to ``new_doc``'s file (``None``: remove).

    ``new_doc`` is the files document of a file this call uploaded. Runs to its end
    even if the caller is cancelled. On success ``proxy`` holds the new file and
    ``old`` is deleted when nothing else may reference it.

    :raises FileConflict: the stored document no longer holds ``old`` there (another
        task changed it, or the document was deleted), or the proxy is no longer
        part of its saved document; the new file was removed.
    :raises pymongo.errors.PyMongoError: the update failed; when its outcome is
        unknown, both files are kept and the proxy holds what the stored document
        was read back to hold.
    """
    await settle(_switch(root, proxy, old, new_doc))


async def _switch(root: Any, proxy: FileProxy, old: Any, new_doc: dict[str, Any] | None) -> None:
    new = None if new_doc is None else new_doc["_id"]
    state = _state(root)
    async with state.lock:
        if proxy.grid_id != old:
            await _drop_new(proxy, new)
            raise FileConflict(
                f"This field changed to file {proxy.grid_id!r} while the upload of "
                f"{new!r} ran; the upload was removed. Retry on the current state."
            )
        if not _is_stored(root) and not state.maybe_stored:
            await _applier(proxy, old, new_doc, pending=True)()
            return
        path = _locate(root, proxy)
        if path is None:
            await _drop_new(proxy, new)
            raise FileConflict(
                f"This file proxy is no longer part of its saved {type(root).__name__} "
                f"{root.pk!r} (the document was reloaded, the field reassigned or the "
                "element removed). Use the document's current field, e.g. "
                "`doc.<field>`, and retry."
            )
        await _update(root, proxy, path, old, new_doc)


async def _check_still_stored(proxy: FileProxy, new: Any) -> None:
    """Refuse to reference a new file the orphan sweep removed before the switch.

    Until the switch, nothing references the upload: a sweep whose grace is shorter
    than the time from the upload's end to the switch (a process stalled under load)
    removes it, and the switch would then store a dangling reference (issue #22's
    deployment test saw it with a 5 s grace). As ``save()`` does for files uploaded
    before it: look, and raise :class:`~asyncassets.errors.PendingFileMissing`.
    """
    if new is None:
        return
    store = proxy._bucket()
    if await store.find(new) is None:
        raise PendingFileMissing(
            f"The file uploaded to replace {proxy.grid_id!r} ({new!r}, bucket "
            f"{store.name!r}) is gone before the document referenced it: most likely "
            "sweep_orphans() ran with a grace shorter than the time since the upload. "
            "Nothing changed; upload it again (and use a longer grace).",
            file_id=new,
            bucket=store.name,
            alias=proxy.db_alias,
        )


def _applier(
    proxy: FileProxy, old: Any, new_doc: dict[str, Any] | None, *, pending: bool = False
) -> Any:
    """Point ``proxy`` at ``new_doc`` now; the returned coroutine function drops ``old``.

    Whether ``old`` may be deleted is decided before the proxy changes (it depends
    on whether the proxy's id was assigned by hand). ``pending``: the change is in
    memory only, for the next ``save()`` to write.
    """
    drop_old = old is not None and proxy._may_delete(old)
    new = None if new_doc is None else new_doc["_id"]
    if new is None:
        _remove_from_list(proxy)  # a deleted element of a list of files leaves it
    proxy._set_file(new, new_doc)
    proxy._assigned = False
    proxy._pending = pending and new is not None

    async def finish() -> None:
        if drop_old:
            await proxy._drop_replaced(old)

    return finish


async def _update(
    root: Any, proxy: FileProxy, path: tuple[Segment, ...], old: Any, new_doc: dict[str, Any] | None
) -> None:
    new = None if new_doc is None else new_doc["_id"]
    parts = [part for part, _ in path]
    dotted = ".".join(parts)
    query: dict[str, Any] = {"_id": _stored_id(root)}
    if old is None:
        # Not {dotted: None}: through an array, "pages.0.image" is also read as the
        # field "0" of every element, which is missing, so null would match a slot
        # another writer has filled. "Exists nowhere, or is null" is exact.
        query["$or"] = [{dotted: {"$exists": False}}, {dotted: {"$type": "null"}}]
        # And the list elements on the path must exist (a missing one matches too).
        for i, (_, is_index) in enumerate(path):
            if is_index:
                query[".".join(parts[: i + 1])] = {"$exists": True}
    else:
        query[dotted] = old
    element = path[-1][1]
    if old is not None:
        try:
            await _before_leaving(proxy)
        except BaseException:
            await _drop_new(proxy, new)  # nothing changed: nothing references it
            raise
    if new is not None:
        update: dict[str, Any] = {"$set": {dotted: new}}
    elif element:
        update = {"$pull": {".".join(parts[:-1]): old}}
    else:
        update = {"$unset": {dotted: ""}}
    await _check_still_stored(proxy, new)
    collection = _driver.acknowledged(type(root)._get_collection())
    try:
        result = await collection.update_one(query, update)
    except BaseException as exc:
        if not unknown_outcome(exc):
            await _drop_new(proxy, new)  # refused: nothing references the new file
            raise
        await _find_out(root, proxy, path, new_doc, exc)
        raise
    if result.matched_count == 1:
        if new is None and element:
            _remove_from_list(proxy)
        await _applier(proxy, old, new_doc)()
        return
    await _not_matched(root, proxy, path, old, new_doc)


async def _before_leaving(proxy: FileProxy) -> None:
    """Before a stored reference moves away from ``proxy``'s file: if a resumable
    upload made that file (its metadata names it, :data:`UPLOAD_MARK`), mark the
    upload's session done, as its finish does after the switch that attached it.

    The stored document holds the file, so that switch applied; the finish may
    have died before it recorded so. Recorded here, before the reference moves,
    a retried finish of that upload answers complete and attaches nothing, whatever
    the field holds by then. A file stored by other means costs nothing here when
    its entry is loaded (as a query loads it), one read when it is not.
    """
    file_id = proxy.grid_id
    if not is_file_id(file_id):
        return
    entry = proxy._files_doc
    if entry is None:
        await _uploads_left(proxy, {file_id})  # one read
        return
    if not isinstance(entry, dict):
        return  # missing: no upload to record
    upload_id = (entry.get("metadata") or {}).get(UPLOAD_MARK)
    if isinstance(upload_id, str):
        await _mark_done(proxy, [(file_id, upload_id)])


async def _not_matched(
    root: Any,
    proxy: FileProxy,
    path: tuple[Segment, ...],
    old: Any,
    new_doc: dict[str, Any] | None,
) -> None:
    """Tell apart a conflict, a deleted document, and a part not saved yet."""
    new = None if new_doc is None else new_doc["_id"]
    top = path[0][0]
    collection = _driver.acknowledged(type(root)._get_collection())  # the primary's answer
    stored = await collection.find_one({"_id": _stored_id(root)}, {top: 1})
    if stored is None and _state(root).maybe_stored:
        # The save whose outcome was unknown did not store it after all; the old
        # file is kept (a retry may have stored it; the sweep decides).
        _state(root).maybe_stored = False
        proxy._set_file(new, new_doc)
        proxy._pending = new is not None
        return
    if stored is not None and not _reachable(stored, path) and _changed_since_save(root, top):
        # An element appended since the last save: the next save() writes it.
        root._mark_as_changed(_field_name(root, top))
        await _applier(proxy, old, new_doc, pending=True)()
        return
    if stored is not None and new is not None and _value_at(stored, path) == new:
        # Another writer moved this reference to this very file first (one finished
        # upload adopted twice): the switch this call asked for is what is stored.
        # Deleting "our" new file here would leave that document dangling.
        proxy._set_file(new, new_doc)
        proxy._assigned = False
        return
    await _drop_new(proxy, new)
    if stored is None:
        raise FileConflict(
            f"{type(root).__name__} {root.pk!r} is no longer stored (deleted by another "
            "task or process); the new file was removed."
        )
    raise FileConflict(
        f"The stored {type(root).__name__} {root.pk!r} no longer references file "
        f"{old!r} at {'.'.join(p for p, _ in path)!r} (changed by another task, or "
        "deleted). Reload the document and retry."
    )


async def _find_out(
    root: Any,
    proxy: FileProxy,
    path: tuple[Segment, ...],
    new_doc: dict[str, Any] | None,
    exc: BaseException,
) -> None:
    """After an update of unknown outcome: learn what is stored, delete nothing."""
    try:
        stored = await _driver.acknowledged(type(root)._get_collection()).find_one(
            {"_id": _stored_id(root)}, {path[0][0]: 1}
        )
    except PyMongoError as read_error:
        add_note(
            exc,
            f"asyncassets: the outcome of this file switch is unknown and reading it "
            f"back failed too ({read_error}); both files are kept for the orphan sweep.",
        )
        return
    if stored is not None and new_doc is not None and _value_at(stored, path) == new_doc["_id"]:
        proxy._set_file(new_doc["_id"], new_doc)
        proxy._assigned = False
    elif stored is not None and new_doc is None and _value_at(stored, path) is None:
        proxy._set_file(None, None)
    add_note(
        exc,
        "asyncassets: the outcome of this file switch was unknown; no file was deleted. "
        f"The stored document references {proxy.grid_id!r}; the other file is left "
        "to the orphan sweep.",
    )


def _reachable(stored: dict[str, Any], path: tuple[Segment, ...]) -> bool:
    """Whether the stored document has every list element and embedded document on
    ``path`` (the last segment only when it is a list index)."""
    value: Any = stored
    for i, (part, is_index) in enumerate(path):
        last = i == len(path) - 1
        if is_index:
            if not isinstance(value, list) or int(part) >= len(value):
                return False
        elif last:
            return True
        elif not isinstance(value, dict) or part not in value:
            return False
        value = value[int(part)] if is_index else value[part]
    return True


def _value_at(stored: dict[str, Any], path: tuple[Segment, ...]) -> Any:
    value: Any = stored
    for part, is_index in path:
        if is_index:
            if not isinstance(value, list) or int(part) >= len(value):
                return None
            value = value[int(part)]
        elif isinstance(value, dict):
            value = value.get(part)
        else:
            return None
    return value


def _changed_since_save(root: Any, top: str) -> bool:
    """Whether ``root``'s field ``top`` (a db name) changed in memory since its last save.

    Tells an element appended here (written by the next save) from one another
    writer removed from the stored document (a conflict).
    """
    name = _field_name(root, top)
    return any(
        changed in (top, name) or changed.startswith((f"{top}.", f"{name}."))
        for changed in root._changed_fields
    )


def _field_name(root: Any, db_field: str) -> str:
    for name, field in root._fields.items():
        if field.db_field == db_field:
            return str(name)
    return db_field


def _stored_id(root: Any) -> Any:
    return root._fields[root._meta["id_field"]].to_mongo(root.pk)


async def _drop_new(proxy: FileProxy, new: Any) -> None:
    """Delete the file this call uploaded, unless it got shared meanwhile."""
    if new is not None and not proxy._shared_elsewhere(new):
        await proxy._delete_stored(new)


def _remove_from_list(proxy: FileProxy) -> None:
    owner, key = proxy._instance, proxy._key
    values = owner._data.get(key) if owner is not None and key else None
    if isinstance(values, list):
        for i, item in enumerate(values):
            if item is proxy:
                # Straight on the underlying list: the database already has this.
                list.__delitem__(values, i)
                break


# -- lists of files -----------------------------------------------------------------


async def add_to_list(
    doc: Any,
    field_name: str,
    data: Any,
    *,
    content_type: str | None,
    filename: str | None,
    **metadata: Any,
) -> FileProxy:
    """Upload ``data`` as a new element of the list of files ``doc.<field_name>``.

    :raises ValueError: ``field_name`` is not a ``ListField(FileField())``.
    :raises FileConflict: the document is no longer stored; the upload was removed.
    """
    field = doc._fields.get(field_name)
    inner = getattr(field, "field", None)
    if not isinstance(field, mongoengine.ListField) or not isinstance(inner, FileField):
        raise ValueError(
            f"add_file() takes the name of a ListField(FileField()) of "
            f"{type(doc).__name__}, and {field_name!r} is not one."
        )
    proxy = inner.proxy_for(doc, field_name)
    files_doc = await proxy._upload_new(data, content_type, filename, metadata)
    await settle(_push(doc, field, proxy, files_doc))
    return proxy


async def _push(doc: Any, field: Any, proxy: FileProxy, files_doc: dict[str, Any]) -> None:
    new_id = files_doc["_id"]
    async with _state(doc).lock:
        values = getattr(doc, field.name)
        proxy._set_file(new_id, files_doc)
        if not _is_stored(doc) and not _state(doc).maybe_stored:
            proxy._pending = True
            values.append(proxy)
            return
        try:
            await _check_still_stored(proxy, new_id)
        except PendingFileMissing:
            proxy._set_file(None, None)
            raise
        collection = _driver.acknowledged(type(doc)._get_collection())
        try:
            result = await collection.update_one(
                {"_id": _stored_id(doc)}, {"$push": {field.db_field: new_id}}
            )
        except BaseException as exc:
            if not unknown_outcome(exc):
                proxy._set_file(None, None)
                await proxy._delete_stored(new_id)  # refused: nothing references it
            raise  # outcome unknown: the file stays, for the sweep if unreferenced
        if result.matched_count == 0:
            proxy._set_file(None, None)
            await proxy._delete_stored(new_id)
            raise FileConflict(
                f"{type(doc).__name__} {doc.pk!r} is no longer stored; the file was not added."
            )
        list.append(values, proxy)  # the database already has it


# -- checks, loading, cascade -------------------------------------------------------


async def check_assigned_ids(doc: Any) -> None:
    """Before a save: the files it will reference must exist. One query per bucket.

    Checked: ids assigned by hand, and files uploaded since the last save (they are
    referenced in memory only until then, so the orphan sweep may have removed
    them if this save comes later than its grace).

    :raises FileValidationError: an assigned id names no file in its bucket.
    :raises FileNotFound: a file uploaded for this document is gone.
    """
    if not holds_files(type(doc)):
        return
    groups: dict[tuple[str, str], list[tuple[FileProxy, str]]] = defaultdict(list)
    for proxy, path, _owner, _name in iter_proxies(doc):
        if (proxy._unverified or proxy._pending) and proxy.grid_id is not None:
            key = (proxy.db_alias, proxy.collection_name)
            groups[key].append((proxy, ".".join(part for part, _ in path)))
    for (alias, bucket_name), entries in groups.items():
        found = await entries[0][0]._bucket().find_many([p.grid_id for p, _ in entries])
        for proxy, where in entries:
            if proxy.grid_id in found:
                proxy._files_doc = found[proxy.grid_id]
                proxy._unverified = False
                continue
            if proxy._pending and not proxy._unverified:
                raise PendingFileMissing(
                    f"The file uploaded for {where} ({proxy.grid_id!r}, bucket "
                    f"{bucket_name!r}) is gone before the save() that would reference it: "
                    "most likely sweep_orphans() ran with a grace shorter than the time "
                    "since the upload. Nothing was saved; upload it again (and use a "
                    "longer grace).",
                    file_id=proxy.grid_id,
                    bucket=bucket_name,
                    alias=alias,
                )
            raise FileValidationError(
                f"{where} is set to {proxy.grid_id!r}, which names no file in bucket "
                f"{bucket_name!r} (alias {alias!r}). Assign an uploaded file's id, or "
                "upload with `await doc.<field>.put(...)`.",
                field_name=where,
            )


async def load_files(docs: Sequence[Any], field_names: Sequence[str] | None = None) -> None:
    """Load the catalogue entries of the files ``docs`` hold, a query per catalogue
    and ``ENTRIES_PER_QUERY`` files, sent together.

    ``field_names``: the top-level fields to cover (``None``: every field that can
    hold a file, in lists, dicts and embedded documents at any depth). A file whose
    entry is not there is marked missing (its attributes raise ``FileNotFound``).
    Entries that come with an entry (an image's thumbnail) are loaded in one more
    round of queries, only when there are any.
    """
    proxies: list[FileProxy] = []
    for doc in docs:
        names = fields_with_files(type(doc)) if field_names is None else field_names
        for name in names:
            field = doc._fields.get(name)
            value = doc._data.get(name)
            if field is None or value is None:
                continue  # another subclass's field, or left out by only()/exclude()
            for proxy, _path, _owner, _name in _walk(value, field, (), doc, name):
                if proxy.grid_id is not None:
                    proxies.append(proxy)
    await _load_entries(proxies)
    companions = [c for proxy in proxies for c in proxy._companions()]
    if companions:
        await _load_entries(companions)


#: Most ids one catalogue query asks for; the queries of a batch are sent
#: together. One query per batch of documents would do, but the test server's
#: ``$in`` costs grow with the square of its length: 1,000 ids took 1.1 to 1.2 s
#: in one query, 90 to 100 ms in queries of 25 or 50, 120 to 190 ms in queries of
#: 100 (benchmarks/entries_query.py, docs/performance.rst). On MongoDB an ``_id``
#: ``$in`` is index lookups either way. Below the server's first batch of 101
#: documents, so a query needs no getMore.
ENTRIES_PER_QUERY = 50


async def _load_entries(proxies: Sequence[FileProxy]) -> None:
    groups: dict[tuple[str, str], list[FileProxy]] = defaultdict(list)
    for proxy in proxies:
        if not is_file_id(proxy.grid_id):
            # Stored by another tool (a dict, a list...): it names no file, and is
            # never put in a query (where {"$ne": None} would find another file).
            proxy._files_doc = MISSING
            continue
        groups[(proxy.db_alias, proxy.collection_name)].append(proxy)
    keys, tasks = [], []
    for key, group in groups.items():
        ids = list(dict.fromkeys(p.grid_id for p in group))
        bucket = group[0]._bucket()
        for start in range(0, len(ids), ENTRIES_PER_QUERY):
            chunk = ids[start : start + ENTRIES_PER_QUERY]
            keys.append(key)
            tasks.append(asyncio.ensure_future(bucket.find_many(chunk)))
    # Sent together: the server answers them in parallel.
    try:
        answers = await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)
        raise
    found: dict[tuple[str, str], dict[Any, dict[str, Any]]] = defaultdict(dict)
    for key, answer in zip(keys, answers, strict=True):
        found[key].update(answer)
    for key, group in groups.items():
        # Each entry is one document read whole: a proxy gets the entry of the id
        # it holds as it was at one instant, or is marked missing; never a mix.
        for proxy in group:
            proxy._files_doc = found[key].get(proxy.grid_id, MISSING)


def cascade_paths(doc_cls: type) -> tuple[str, ...]:
    """Top-level db fields whose files a delete of ``doc_cls`` documents removes."""
    return cascade_fields(doc_cls)


def _subclass(doc_cls: type, name: str) -> type:
    try:
        found = get_document(name)
    except mongoengine.errors.NotRegistered:
        return doc_cls
    return found if isinstance(found, type) else doc_cls


async def delete_files_of(doc_cls: type, sons: Sequence[dict[str, Any]]) -> None:
    """Delete the cascading files held by these raw (deleted) documents."""
    groups: dict[tuple[str, str, type], set[Any]] = defaultdict(set)
    held: dict[tuple[str, str, type], set[Any]] = defaultdict(set)
    proxies: dict[tuple[str, str, type], FileProxy] = {}
    for son in sons:
        cls = _subclass(doc_cls, son["_cls"]) if "_cls" in son else doc_cls
        doc = cls._from_son(son, created=False)  # type: ignore[attr-defined]
        for proxy, _path, _owner, _name in iter_proxies(doc):
            field = proxy._field
            if not is_file_id(proxy.grid_id) or (field is not None and not field.cascade):
                continue  # no file, one that names no file (a dict...), or kept
            # Keyed by proxy class too: an ImageProxy also deletes thumbnails.
            key = (proxy.db_alias, proxy.collection_name, type(proxy))
            proxies[key] = proxy
            held[key].add(proxy.grid_id)
            if proxy._shared_elsewhere(proxy.grid_id):
                continue  # a live document still holds it (copied): keep it
            groups[key].add(proxy.grid_id)
    for key, ids in held.items():
        await _uploads_left(proxies[key], ids)
    for key, ids in groups.items():
        for file_id in ids:
            await proxies[key]._drop_replaced(file_id)


async def _uploads_left(proxy: FileProxy, file_ids: set[Any]) -> None:
    """The deleted documents held these files: mark done the sessions of the
    resumable uploads that made any of them (:data:`UPLOAD_MARK`), as
    :func:`_before_leaving` does for a switch. Else an upload whose finish died
    after its switch would be attached by its retry to a document created again
    with the same ``_id`` (a staged upload keeps its bytes until it is done). One
    read per bucket and batch."""
    ids = [file_id for file_id in file_ids if is_file_id(file_id)]
    if not ids:
        return
    found = proxy._bucket().files.find(
        {"_id": {"$in": ids}, f"metadata.{UPLOAD_MARK}": {"$type": "string"}},
        {f"metadata.{UPLOAD_MARK}": 1},
    )
    await _mark_done(proxy, [(entry["_id"], entry["metadata"][UPLOAD_MARK])
                             async for entry in found])


async def _mark_done(proxy: FileProxy, made: list[tuple[Any, str]]) -> None:
    """Mark done the sessions of the uploads that made these files of ``proxy``'s
    catalogue (``(file id, upload id)`` pairs)."""
    if made:
        sessions = UploadSessions(get_db(proxy.db_alias), proxy.collection_name)
        for file_id, upload_id in made:
            await sessions.mark_done(upload_id, file_id)


# -- data assigned to file fields: uploaded by save() ---------------------------------


def _replaced_records(
    holder: Any, prefix: tuple[Segment, ...] = ()
) -> Iterator[tuple[Any, str, tuple[Segment, ...], FileProxy | None]]:
    """Yield ``(holder, field name, path, old proxy)`` for every file field of ``holder``
    (or an embedded document in it) that was assigned data or ``None`` since the last
    save (recorded by :meth:`FileField._note_replaced`)."""
    records = holder.__dict__.get("_aa_replaced")
    if records:
        for name, old in records.items():
            field = holder._fields.get(name)
            if field is not None:
                yield holder, name, (*prefix, (field.db_field, False)), old
    for name in fields_with_files(type(holder)):
        field = holder._fields[name]
        if not isinstance(field, FileField):
            yield from _records_in(holder._data.get(name), (*prefix, (field.db_field, False)))


def _records_in(
    value: Any, path: tuple[Segment, ...]
) -> Iterator[tuple[Any, str, tuple[Segment, ...], FileProxy | None]]:
    if isinstance(value, mongoengine.EmbeddedDocument):
        yield from _replaced_records(value, path)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _records_in(item, (*path, (str(index), True)))
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _records_in(item, (*path, (str(key), False)))


class _Upload:
    __slots__ = ("files_doc", "name", "owner", "path", "pending", "proxy")

    def __init__(
        self,
        proxy: FileProxy,
        path: tuple[Segment, ...],
        owner: Any,
        name: str,
        pending: Any,
        files_doc: dict[str, Any],
    ) -> None:
        self.proxy, self.path, self.owner, self.name = proxy, path, owner, name
        self.pending, self.files_doc = pending, files_doc


class AssignedFiles:
    """What one ``save()`` does about file fields assigned data or ``None``.

    Made by :func:`upload_assigned` (which uploads the data, before the save's
    write); the save then adds :attr:`conditions` to its update and calls
    :meth:`succeeded` or :meth:`failed`. The rules are the switch's:

    * the insert or update that carries the new ids is the switch; for a stored
      document it is conditional on each replaced path still holding the file it
      was loaded with (or nothing), so a concurrent change is never undone;
    * the replaced files are deleted only after the write succeeded (and only if
      nothing else may hold them);
    * a write that failed for sure removes the uploads, and the proxies hold the
      assigned data again (a retried ``save()`` uploads it again);
    * a write of unknown outcome deletes nothing; the stored document is read back
      to learn which files the proxies hold.
    """

    __slots__ = ("conditions", "doc", "replaced", "uploads", "written")

    def __init__(self, doc: Any) -> None:
        self.doc = doc
        self.uploads: list[_Upload] = []
        #: ``(holder, field name, value written there)`` of every replaced path.
        self.written: list[tuple[Any, str, Any]] = []
        self.replaced: list[FileProxy] = []
        #: Conditions on the stored document, added to the save's update filter.
        self.conditions: list[dict[str, Any]] = []

    async def _remove_uploads(self) -> None:
        await self._remove(self.uploads)

    @staticmethod
    async def _remove(uploads: list[_Upload]) -> None:
        for upload in uploads:
            new = upload.files_doc["_id"]
            if not upload.proxy._shared_elsewhere(new):
                await upload.proxy._drop_replaced(new)

    def _restore(self) -> None:
        for upload in self.uploads:
            proxy = upload.proxy
            proxy._set_file(None, None)
            proxy._pending = False
            proxy._assignment = upload.pending

    async def failed(self, exc: BaseException) -> None:
        """The save's write raised ``exc``: undo what may be undone, delete nothing
        that a stored document might reference."""
        if not unknown_outcome(exc):
            await settle(self._remove_uploads())  # refused: nothing references them
            self._restore()
            return
        stored = await settle(self._read_back(exc))
        # What the write puts at each path it switches: the new file of an upload,
        # nothing where None was assigned (doc.photo = None). All there: it applied.
        expected = [(u.path, u.files_doc["_id"]) for u in self.uploads]
        expected += [
            (path, None)
            for holder, name, path, _old in _replaced_records(self.doc)
            if _empty(holder._data.get(name))
        ]
        applied = (
            stored is not None
            and bool(expected)
            and all(_value_at(stored, path) == want for path, want in expected)
        )
        if applied:
            _clear_records(self.doc)  # the replaced files are left to the orphan sweep
        else:
            self._restore()
        add_note(
            exc,
            "asyncassets: the outcome of this save was unknown; no file was deleted. "
            + (
                "The stored document holds what this save wrote."
                if applied
                else "The fields hold the assigned data again; uploads the stored "
                "document does not reference are left to the orphan sweep."
            ),
        )

    async def _read_back(self, exc: BaseException) -> dict[str, Any] | None:
        if self.doc.pk is None:
            return None
        try:
            found: dict[str, Any] | None = await _driver.acknowledged(
                type(self.doc)._get_collection()
            ).find_one({"_id": _stored_id(self.doc)})
        except PyMongoError as read_error:
            add_note(exc, f"asyncassets: reading the document back failed ({read_error}).")
            return None
        return found

    async def succeeded(self) -> None:
        """The write applied: delete the replaced files nothing holds any more."""
        for upload in self.uploads:
            upload.proxy._assigned = False
        held = {
            (proxy.collection_name, proxy.grid_id)
            for proxy, _path, _owner, _name in iter_proxies(self.doc)
            if proxy.grid_id is not None
        }
        drop = [
            (old, old.grid_id)
            for old in self.replaced
            if old.grid_id is not None
            and (old.collection_name, old.grid_id) not in held
            and old._may_delete(old.grid_id)
        ]
        _clear_records(self.doc)
        for holder, name, value in self.written:
            if not _same_value(holder._data.get(name), value):
                # Assigned again while the write ran: that assignment replaces
                # what this save stored there.
                records = holder.__dict__.setdefault("_aa_replaced", {})
                records[name] = value if isinstance(value, FileProxy) else None
                holder._mark_as_changed(name)
        for old, file_id in drop:
            await settle(old._drop_replaced(file_id))


def forget_assigned(doc: Any, fields: Sequence[str]) -> None:
    """After ``reload()`` or ``modify()``: what was stored is in memory again, so no
    file is replaced by the next save (of ``fields`` only, when given)."""
    if not fields:
        _clear_records(doc)
        return
    records = doc.__dict__.get("_aa_replaced")
    if records:
        for name in fields:
            records.pop(name, None)


def _empty(value: Any) -> bool:
    """Whether a file field's value holds no file and no data to upload."""
    return value is None or (
        isinstance(value, FileProxy) and value.grid_id is None and value._assignment is None
    )


def _same_value(current: Any, written: Any) -> bool:
    if current is written:
        return True
    return _empty(current) and _empty(written)


def _clear_records(doc: Any) -> None:
    for holder in {id(h): h for h, _name, _path, _old in _replaced_records(doc)}.values():
        holder.__dict__.pop("_aa_replaced", None)


async def upload_assigned(doc: Any, *, stored: bool) -> AssignedFiles | None:
    """Upload the data assigned to ``doc``'s file fields, for the ``save()`` under way.

    Called by ``save()`` inside :func:`saving`, after validation and before its
    write. ``stored``: the save updates a stored document (else it inserts).

    :returns: ``None`` when no file field was assigned data or ``None``.
    :raises FileValidationError: the field's rules refused the data; every upload
        of this save was removed and the fields still hold the assigned data.
    :raises UploadClosed: a stream a failed save had read cannot be read again.
    """
    if not holds_files(type(doc)):
        return None
    records = list(_replaced_records(doc))
    pending = [
        (proxy, path, owner, name)
        for proxy, path, owner, name in iter_proxies(doc)
        if proxy._assignment is not None
    ]
    if not records and not pending:
        return None
    assigned = AssignedFiles(doc)
    for holder, _name, path, old in records:
        if old is not None and old.grid_id is not None:
            assigned.replaced.append(old)
        if not stored:
            continue
        dotted = ".".join(part for part, _ in path)
        if old is not None and old.grid_id is not None:
            if not old._assigned and not old._pending:
                await _before_leaving(old)  # before anything is uploaded: nothing to undo
                assigned.conditions.append({dotted: old.grid_id})
        elif holder is doc:
            assigned.conditions.append(
                {"$or": [{dotted: {"$exists": False}}, {dotted: {"$type": "null"}}]}
            )
    read: set[int] = set()  # the streams read by this save, by id
    try:
        while pending:
            for proxy, path, owner, name in pending:
                data = proxy._assignment
                if data is None:
                    continue
                where = ".".join(part for part, _ in path)
                files_doc = await proxy._upload_new(
                    await data.source(where, read), data.content_type, data.filename, {}
                )
                upload = _Upload(proxy, path, owner, name, data, files_doc)
                assigned.uploads.append(upload)
                proxy._assignment = None
                proxy._set_file(files_doc["_id"], files_doc)
                proxy._assigned = False
                proxy._pending = True  # referenced in memory until the write succeeds
            # Data assigned while these uploads ran (another task, same document
            # object) is what the document holds now: upload it too, in this save.
            pending = [
                (proxy, path, owner, name)
                for proxy, path, owner, name in iter_proxies(doc)
                if proxy._assignment is not None
            ]
    except BaseException:
        # A later upload failed (a rule, a read, a cancellation): the earlier ones
        # go too, and their fields hold the assigned data again, not the ids of
        # the files just removed (a retried save would reference those).
        await settle(assigned._remove_uploads())
        assigned._restore()
        raise
    held = {id(proxy): path for proxy, path, _owner, _name in iter_proxies(doc)}
    superseded = [u for u in assigned.uploads if id(u.proxy) not in held]
    if superseded:
        # Replaced in the document during the upload: nothing will reference them.
        assigned.uploads = [u for u in assigned.uploads if id(u.proxy) in held]
        await settle(AssignedFiles._remove(superseded))
    for upload in assigned.uploads:
        upload.path = held[id(upload.proxy)]
        upload.owner._mark_as_changed(upload.name)
    # What the write stores at each replaced path: if another assignment changes
    # it before the write ends, that one replaces what this save wrote.
    assigned.written = [
        (holder, name, holder._data.get(name)) for holder, name, _path, _old in records
    ]
    return assigned
