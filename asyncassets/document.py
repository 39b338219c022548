"""``Document`` and ``EmbeddedDocument``: mongoengine's declarations, awaited persistence.

Declaration, ``meta``, validation, defaults, ``to_mongo``/``_from_son`` and change
tracking are mongoengine's own, inherited unchanged. What differs is every call that
touches the database: here it is a coroutine that goes through PyMongo's async API
(or Motor), never through mongoengine's synchronous connection.

>>> class Animal(Document):
...     genus = StringField(required=True)
>>> marmot = Animal(genus="Marmota")
>>> await marmot.save()                      # doctest: +SKIP
"""

from __future__ import annotations

import inspect
import re
import weakref
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar, cast

import mongoengine
import pymongo
from bson import SON, DBRef
from mongoengine import signals
from mongoengine.base import BaseDocument, BaseList, get_document
from mongoengine.base.datastructures import StrictDict
from mongoengine.errors import (
    FieldDoesNotExist,
    InvalidDocumentError,
    InvalidQueryError,
    NotUniqueError,
    OperationError,
    SaveConditionError,
)
from mongoengine.queryset import transform

from . import references
from .connection import DEFAULT_ALIAS, get_client, get_db
from .connection import _lookup as _connection
from .errors import FileConflict, StorageConflict
from .fields import _LOADING
from .queryset import QuerySet, QuerySetManager, with_write_concern
from .schema import check_declared_storages

if TYPE_CHECKING:
    from pymongo.asynchronous.collection import AsyncCollection

__all__ = ["Document", "DynamicDocument", "DynamicEmbeddedDocument", "EmbeddedDocument"]

D = TypeVar("D", bound="Document")


# Indexes are ensured once per client, database and collection; see ensure_indexes.
# Weak on the client, so a new client reusing a dead one's id() starts afresh.
_indexed: weakref.WeakKeyDictionary[Any, set[tuple[str, str]]] = weakref.WeakKeyDictionary()

# Each class's collection object, for the client and database it was last used with.
# PyMongo builds a new Database and a new Collection on every item access, which
# save(), delete() and every query paid once or twice a call; both are immutable.
# Only the last client is kept (a collection holds its client): the client of a
# finished event loop is let go when the class meets the next loop's client.
_collection_of: weakref.WeakKeyDictionary[type, tuple[Any, str, Any]] = (
    weakref.WeakKeyDictionary()
)


def _disable_auto_dereference(field: Any) -> None:
    # mongoengine dereferences ReferenceFields on attribute access with blocking I/O.
    # For classes declared here that is switched off, field by field, so reading an
    # attribute never touches the database: references are fetched with
    # ``await doc.fetch_related(...)`` instead. Sync mongoengine classes are untouched.
    field.set_auto_dereferencing(False)
    inner = getattr(field, "field", None)
    if inner is not None:
        _disable_auto_dereference(inner)


def _from_son(cls: Any, son: dict[str, Any], created: bool) -> Any:
    """mongoengine's ``BaseDocument._from_son`` without its per-document field copy.

    Asked not to dereference, mongoengine deep-copies the class's field dict for
    every document it builds, so that it can switch dereferencing off on the
    copies without touching the fields other documents share; that copy was
    three quarters of the time of loading a document (``benchmarks/documents.py``).
    Classes declared here never dereference on attribute access: their fields are
    switched off once, when the class is declared (``_disable_auto_dereference``),
    so the copy guards nothing and is skipped, and the class's fields, shared as
    in mongoengine's default path, are never switched back on. The rest is
    mongoengine's conversion, step for step.
    """
    if son and not isinstance(son, dict):
        raise ValueError(
            f"The source SON object needs to be of type 'dict' but a '{type(son)}' was found"
        )
    class_name = son.get("_cls", cls._class_name)
    db_field_map = cls._db_field_map
    data = {}
    for key, value in son.items():
        key = str(key)
        data[db_field_map.get(key, key)] = value
    if class_name != cls._class_name:
        cls = get_document(class_name)
    errors: dict[str, Exception] = {}
    for field_name, field in cls._fields.items():
        db_field = field.db_field
        if db_field in data:
            value = data[db_field]
            try:
                data[field_name] = value if value is None else field.to_python(value)
                if field_name != db_field:
                    del data[db_field]
            except (AttributeError, ValueError) as e:
                errors[field_name] = e
    if errors:
        details = "\n".join(f"Field '{k}' - {v}" for k, v in errors.items())
        raise InvalidDocumentError(
            f"Invalid data to create a `{cls._class_name}` instance.\n{details}"
        )
    if cls.STRICT:
        data = {k: v for k, v in data.items() if k in cls._fields}
    allowed = _plain_init(cls)
    if allowed is not None:
        obj = _init_loaded(cls, created, data, allowed)
    else:
        obj = cls(__auto_convert=False, _created=created, **data)
    obj._changed_fields = []
    return obj


def _plain_init(cls: type) -> frozenset[str] | None:
    """The keys ``cls`` accepts, if it runs mongoengine's own ``__init__`` and
    ``__setattr__``; else ``None``.

    A class qualifies when neither it nor its bases between it and mongoengine's
    classes override ``__new__``, ``__init__`` (asyncassets' ``Document.__init__``
    excepted: while loading it only calls mongoengine's) or ``__setattr__``, it is
    not dynamic, and each field is the class attribute of its name (the
    descriptor that ``setattr`` would reach). Computed once per class and kept in
    the class's own ``__dict__`` (no weak-dictionary lookup per document: those
    allocate, and their garbage made loading collect more often).
    """
    plan = cls.__dict__.get("_aa_load_plan")
    if plan is None:
        init = getattr(cls, "__init__", None)
        fields = getattr(cls, "_fields", {})
        plain = (
            init in (Document.__init__, mongoengine.EmbeddedDocument.__init__)
            and getattr(cls, "__new__", None) is object.__new__
            and getattr(cls, "__setattr__", None) is BaseDocument.__setattr__
            and not getattr(cls, "_dynamic", True)
            and all(inspect.getattr_static(cls, name, None) is f for name, f in fields.items())
        )
        allowed = frozenset([*fields, "id", "pk", "_cls", "_text_score"]) if plain else None
        plan = (allowed,)
        type.__setattr__(cls, "_aa_load_plan", plan)
    return plan[0]


def _init_loaded(
    cls: Any, created: bool, values: dict[str, Any], allowed: frozenset[str]
) -> Any:
    """``cls(__auto_convert=False, _created=created, **values)``, for a plain class.

    The same steps as mongoengine's ``BaseDocument.__init__`` (and, for an embedded
    class, ``EmbeddedDocument.__init__``), in the same order, with the same signals;
    what it leaves out is the trip through ``BaseDocument.__setattr__`` for each of
    a dozen attributes, which does nothing for a non-dynamic class being
    initialised (no dynamic fields; the shard-key and id checks apply only to an
    initialised or saved document) and was a third of the time of loading a
    document. Private attributes are set directly, fields through their
    descriptor's ``__set__``, as ``setattr`` would. Only for classes that
    :func:`_plain_init` accepts; ``allowed`` is what it returned.
    """
    self = object.__new__(cls)
    setattr_ = object.__setattr__
    setattr_(self, "_initialised", False)
    setattr_(self, "_created", True)
    signals.pre_init.send(cls, document=self, values=values)
    fields = cls._fields
    if (cls._meta.get("strict", True) or created) and not values.keys() <= allowed:
        undefined = set(values) - allowed
        if undefined:
            raise FieldDoesNotExist(
                f'The fields "{undefined}" do not exist on the document "{cls._class_name}"'
            )
    if cls.STRICT:
        setattr_(self, "_data", StrictDict.create(allowed_keys=cls._fields_ordered)())
    else:
        setattr_(self, "_data", {})
    setattr_(self, "_dynamic_fields", SON())
    for name, field in fields.items():
        if name not in values:
            field.__set__(self, getattr(self, name, None))
    if "_cls" not in values:
        setattr_(self, "_cls", cls._class_name)
    data = self._data
    for key, value in values.items():
        field = fields.get(key)
        if field is not None:
            field.__set__(self, value)
        elif key in ("id", "pk", "_cls"):
            setattr(self, key, value)
        else:
            data[key] = value
    self._BaseDocument__set_field_display()
    setattr_(self, "_initialised", True)
    setattr_(self, "_created", created)
    signals.post_init.send(cls, document=self)
    if isinstance(self, mongoengine.EmbeddedDocument):
        setattr_(self, "_instance", None)
        setattr_(self, "_changed_fields", [])
    return self


class EmbeddedDocument(mongoengine.EmbeddedDocument):
    """Base class of documents stored inside other documents.

    mongoengine's class (so ``EmbeddedDocumentField`` accepts it), with reference
    fields that never dereference on attribute access.
    """

    meta: ClassVar[dict[str, Any]] = {"abstract": True}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for field in cls._fields.values():
            _disable_auto_dereference(field)

    def __getstate__(self) -> dict[str, Any]:
        """mongoengine's state (for ``copy`` and ``pickle``).

        :raises TypeError: a file field holds data assigned for upload, which a
            copy cannot carry: save first.
        """
        references.refuse_copy_with_pending_data(self)
        return cast(dict[str, Any], super().__getstate__())

    @classmethod
    def _from_son(
        cls, son: dict[str, Any], _auto_dereference: bool = False, created: bool = False
    ) -> Any:
        # _auto_dereference is ignored, as in Document._from_son: mongoengine's
        # GenericEmbeddedDocumentField passes its default (True), which would
        # switch this class's fields back to blocking dereferencing for good.
        return _from_son(cls, son, created)


class DynamicEmbeddedDocument(EmbeddedDocument, mongoengine.DynamicEmbeddedDocument):
    """An :class:`EmbeddedDocument` that also stores undeclared attributes."""

    meta: ClassVar[dict[str, Any]] = {"abstract": True}


class Document(mongoengine.Document):
    """Base class of top-level documents, stored in their own collection.

    Subclass it with mongoengine's field classes exactly as with
    ``mongoengine.Document``; every method that touches the database is a coroutine.

    .. code-block:: python

        class Animal(Document):
            genus = StringField(required=True)
            photo = FileField()
            meta = {"collection": "animals", "indexes": ["genus"]}

        marmot = await Animal(genus="Marmota").save()
        same = await Animal.objects(genus="Marmota").first()
    """

    meta: ClassVar[dict[str, Any]] = {"abstract": True}

    #: The async :class:`~asyncassets.queryset.QuerySet` of this class.
    objects: ClassVar[QuerySetManager] = QuerySetManager()

    # mongoengine's instance state, declared for the type checker (mongoengine has
    # no type information).
    _created: bool
    _changed_fields: list[str]
    #: Set on a class whose declaration was refused (StorageConflict).
    _asyncassets_refused: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for field in cls._fields.values():
            _disable_auto_dereference(field)
        if not cls._meta.get("abstract"):
            try:
                # At declaration, not at the first request or sweep: a catalogue
                # belongs to one storage.
                check_declared_storages(cls)
            except StorageConflict:
                # The class object exists until collected; the sweep and the
                # check must not count it meanwhile.
                cls._asyncassets_refused = True
                raise

    def __getstate__(self) -> dict[str, Any]:
        """mongoengine's state (for ``copy`` and ``pickle``).

        :raises TypeError: a file field holds data assigned for upload, which a
            copy cannot carry: save first.
        """
        references.refuse_copy_with_pending_data(self)
        return cast(dict[str, Any], super().__getstate__())

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if kwargs.get("__auto_convert", True) or not _LOADING.get():
            references.bind(self)
        # else: built by _from_son from stored data, which binds it, as loaded, next.

    @classmethod
    def _from_son(
        cls, son: dict[str, Any], _auto_dereference: bool = False, created: bool = False
    ) -> Any:
        # _auto_dereference is accepted for mongoengine's callers and ignored: the
        # fields of classes declared here never dereference (see _from_son above).
        # loading_from_database(), without a generator context manager per document.
        token = _LOADING.set(True)
        try:
            doc = _from_son(cls, son, created)
            references.bind(doc, loaded=True)
        finally:
            _LOADING.reset(token)
        return doc

    async def _switch_file_reference(
        self, proxy: Any, old: Any, new_doc: dict[str, Any] | None
    ) -> None:
        """Called by a file proxy of this document: see :func:`asyncassets.references.switch`."""
        await references.switch(self, proxy, old, new_doc)

    # -- where the data lives ---------------------------------------------------

    @classmethod
    def _alias(cls) -> str:
        return cls._meta.get("db_alias") or DEFAULT_ALIAS

    @classmethod
    def _get_db(cls) -> Any:
        """The async database of this class's alias."""
        return get_db(cls._alias())

    @classmethod
    def _get_collection(cls) -> AsyncCollection[Any]:
        """The async collection of this class (no I/O, no index creation)."""
        alias = cls._alias()
        client = get_client(alias)
        db_name = _connection(alias).db_name
        cached = _collection_of.get(cls)
        if cached is not None and cached[0] is client and cached[1] == db_name:
            return cached[2]
        collection = client[db_name][cls._get_collection_name()]
        _collection_of[cls] = (client, db_name, collection)
        return collection

    @property
    def _qs(self) -> QuerySet[Any]:
        return QuerySet(type(self))

    # -- indexes ----------------------------------------------------------------

    @classmethod
    async def ensure_indexes(cls) -> None:
        """Create the indexes declared in ``meta`` (and ``_cls`` for inheritance).

        Called lazily before the first write of each class on each client and
        database, unless ``meta = {"auto_create_index": False}``.
        """
        collection = cls._get_collection()
        background = cls._meta.get("index_background", False)
        index_opts = cls._meta.get("index_opts") or {}
        cls_indexed = False
        for spec in cls._meta["index_specs"]:
            spec = dict(spec)
            fields = spec.pop("fields")
            cls_indexed = cls_indexed or bool(fields and fields[0][0] == "_cls")
            opts = {**index_opts, **spec}
            opts.pop("cls", None)
            await collection.create_index(fields, background=background, **opts)
        if (
            cls._meta.get("index_cls", True)
            and not cls_indexed
            and cls._meta.get("allow_inheritance")
        ):
            opts = {k: v for k, v in index_opts.items() if k != "cls"}
            await collection.create_index("_cls", background=background, **opts)
        cls._indexed_here().add(cls._index_key())

    @classmethod
    def _indexed_here(cls) -> set[tuple[str, str]]:
        client = get_client(cls._alias())
        done = _indexed.get(client)
        if done is None:
            done = _indexed.setdefault(client, set())
        return done

    @classmethod
    def _index_key(cls) -> tuple[str, str]:
        """``(database name, collection name)`` of this class, without building either."""
        return (_connection(cls._alias()).db_name, cls._get_collection_name())

    @classmethod
    async def _ensure_indexes_once(cls) -> None:
        if not cls._meta.get("auto_create_index", True):
            return
        if cls._index_key() not in cls._indexed_here():
            await cls.ensure_indexes()

    @classmethod
    async def drop_collection(cls) -> None:
        """Drop this class's collection (its files are not touched)."""
        cls._indexed_here().discard(cls._index_key())
        await cls._get_collection().drop()

    # -- persistence ------------------------------------------------------------

    async def save(
        self: D,
        force_insert: bool = False,
        validate: bool = True,
        clean: bool = True,
        write_concern: dict[str, Any] | None = None,
        save_condition: dict[str, Any] | None = None,
        signal_kwargs: dict[str, Any] | None = None,
    ) -> D:
        """Insert the document, or ``$set``/``$unset`` the fields that changed.

        :param force_insert: only insert; an existing ``_id`` raises ``NotUniqueError``.
        :param validate: run field validation (and ``clean()`` when ``clean``) first.
        :param write_concern: e.g. ``{"w": "majority"}``.
        :param save_condition: update only if the stored document matches these
            mongoengine-style conditions, e.g. ``{"version": 3}``.
        :returns: the document itself.
        :raises ValidationError: a field is invalid; nothing was written.
        :raises NotUniqueError: a unique index refused the write.
        :raises SaveConditionError: ``save_condition`` did not match (the file
            fields assigned data still held what they were loaded with); nothing
            was saved and this save's uploads were removed.
        :raises FileValidationError: data assigned to a file field
            (``doc.photo = data``, uploaded by this save) was refused by the field's
            rules; nothing was saved or left stored.
        :raises FileConflict: a file field assigned data or ``None`` no longer holds,
            in the stored document, the file this one was loaded with (or the
            document was deleted); nothing was saved and this save's uploads were
            removed.
        :raises OperationError: the server refused the write for another reason.
        """
        signal_kwargs = signal_kwargs or {}
        if self._meta.get("abstract"):
            raise InvalidDocumentError("Cannot save an abstract document.")
        signals.pre_save.send(self.__class__, document=self, **signal_kwargs)
        references.bind(self)
        if validate:
            self.validate(clean=clean)
        doc_id = self.to_mongo(fields=[self._meta["id_field"]])
        created = "_id" not in doc_id or self._created or force_insert
        signals.pre_save_post_validation.send(
            self.__class__, document=self, created=created, **signal_kwargs
        )
        async with references.saving(self):
            await references.check_assigned_ids(self)
            # Data assigned to file fields is uploaded now, and referenced by the
            # write below (see references.AssignedFiles for the rules).
            assigned = await references.upload_assigned(self, stored=not created)
            try:
                await self._write(
                    created,
                    force_insert,
                    write_concern,
                    save_condition,
                    assigned.conditions if assigned is not None else None,
                )
            except BaseException as exc:
                if assigned is not None:
                    await assigned.failed(exc)
                raise
            signals.post_save.send(
                self.__class__, document=self, created=created, **signal_kwargs
            )
            self._clear_changed_fields()
            self._created = False
            if assigned is not None:
                # After the state is updated: a caller cancelled during these
                # deletes still has a document that knows it is stored.
                await assigned.succeeded()
        return self

    async def _write(
        self,
        created: bool,
        force_insert: bool,
        write_concern: dict[str, Any] | None,
        save_condition: dict[str, Any] | None,
        file_conditions: list[dict[str, Any]] | None = None,
    ) -> None:
        id_field = self._meta["id_field"]
        if created:
            doc = self.to_mongo()
        else:
            # An update needs only the _id; _get_update_doc() below converts the
            # whole document (once) to find what changed. mongoengine converts it a
            # second time here, which was a third of the CPU of saving a document
            # with embedded documents.
            doc = self.to_mongo(fields=[id_field])
        await type(self)._ensure_indexes_once()
        collection = with_write_concern(self._get_collection(), write_concern)
        try:
            if created:
                if force_insert or "_id" not in doc:
                    try:
                        object_id = (await collection.insert_one(doc)).inserted_id
                    except BaseException as exc:
                        if references.unknown_outcome(exc) and "_id" in doc:
                            # PyMongo named the document before sending it: it may
                            # be stored under that _id, and the reference writer
                            # needs it to find out.
                            self._maybe_stored_as(doc["_id"])
                        raise
                else:
                    # A new document with a chosen _id replaces what is stored
                    # under that id, as mongoengine does.
                    await collection.replace_one({"_id": doc["_id"]}, doc, upsert=True)
                    object_id = doc["_id"]
            else:
                object_id = doc["_id"]
                select: dict[str, Any] = {}
                if save_condition is not None:
                    select = transform.query(self.__class__, **save_condition)
                select["_id"] = object_id
                if file_conditions:
                    # The switch of files assigned by value: only if the stored
                    # document still holds what this one was loaded with there.
                    select["$and"] = [*select.get("$and", []), *file_conditions]
                update_doc = self._get_update_doc()
                if update_doc:
                    upsert = save_condition is None and not file_conditions
                    result = await collection.update_one(select, update_doc, upsert=upsert)
                    if not upsert and result.matched_count == 0:
                        if file_conditions and not (
                            save_condition is not None
                            and await collection.count_documents(
                                {"_id": object_id, "$and": file_conditions}, limit=1
                            )
                        ):
                            raise FileConflict(
                                f"The stored {type(self).__name__} {object_id!r} no longer "
                                "holds the files this document was loaded with (changed "
                                "by another task or process, or deleted; or the field "
                                "was left out by only()/exclude(), so it was loaded "
                                "empty)"
                                + (", or save_condition did not match" if save_condition
                                   else "")
                                + ". Nothing was saved; the files uploaded for this save "
                                "were removed and the fields hold the assigned data. "
                                "Reload the document, assign again and save()."
                            )
                        # The files are as loaded (or none was assigned): the
                        # save_condition did not match, as mongoengine reports it.
                        raise SaveConditionError(
                            "Race condition preventing document update detected"
                            + (
                                "; the files uploaded for this save were removed and "
                                "the fields hold the assigned data"
                                if file_conditions
                                else ""
                            )
                        )
        except pymongo.errors.DuplicateKeyError as err:
            raise NotUniqueError(f"Tried to save duplicate unique keys ({err})") from err
        except pymongo.errors.OperationFailure as err:
            if re.match("^E1100[01] duplicate key", str(err)):
                raise NotUniqueError(f"Tried to save duplicate unique keys ({err})") from err
            raise OperationError(f"Could not save document ({err})") from err

        self[id_field] = self._fields[id_field].to_python(object_id)

    def _maybe_stored_as(self, object_id: Any) -> None:
        id_field = self._meta["id_field"]
        self[id_field] = self._fields[id_field].to_python(object_id)
        self._created = True  # not known to be stored (mongoengine flips it on pk set)

    async def delete(
        self, signal_kwargs: dict[str, Any] | None = None, **write_concern: Any
    ) -> None:
        """Delete the document, then the files of its ``FileField``\\ s.

        The document goes first, so a failure part-way never leaves it pointing at
        a deleted file; a file left behind by such a failure is an orphan that
        :func:`~asyncassets.sweep_orphans` removes. Fields declared with
        ``cascade=False`` keep their files.

        :raises OperationError: the server refused the delete.
        """
        signal_kwargs = signal_kwargs or {}
        signals.pre_delete.send(self.__class__, document=self, **signal_kwargs)
        if self.pk is None:
            raise OperationError("Cannot delete a document that has not been saved.")
        await type(self).objects._delete_one_by_id(self.pk, write_concern or None)
        signals.post_delete.send(self.__class__, document=self, **signal_kwargs)

    async def reload(self: D, *fields: str) -> D:
        """Reload all fields (or only ``fields``) from the database.

        :raises DoesNotExist: the document is no longer stored.
        """
        if self.pk is None:
            raise self.DoesNotExist("Document does not exist")
        qs = self._qs.filter(**self._object_key)
        if fields:
            qs = qs.only(*fields)
        obj = await qs.first()
        if obj is None:
            raise self.DoesNotExist("Document does not exist")
        for name in obj._data:
            if not fields or name in fields:
                setattr(self, name, self._reload(name, obj._data.get(name)))
        self._changed_fields = list(set(self._changed_fields) - set(fields)) if fields else []
        self._created = False
        references.bind(self, loaded=True)
        references.forget_assigned(self, fields)
        return self

    async def modify(self, query: dict[str, Any] | None = None, **update: Any) -> bool:
        """Atomically update this document and load the result into it.

        :param query: apply only if the stored document also matches this query.
        :returns: ``True`` if updated, ``False`` if the query did not match.
        """
        if self.pk is None:
            raise InvalidDocumentError("The document does not have a primary key.")
        query = dict(query or {})
        id_field = self._meta["id_field"]
        if id_field not in query:
            query[id_field] = self.pk
        elif query[id_field] != self.pk:
            raise InvalidQueryError(
                "Invalid document modify query: it must modify only this document."
            )
        query.update(self._object_key)
        updated = await self._qs.filter(**query).modify(new=True, **update)
        if updated is None:
            return False
        for name in self._fields_ordered:
            setattr(self, name, self._reload(name, updated._data.get(name)))
        self._changed_fields = []
        self._created = False
        references.bind(self, loaded=True)
        references.forget_assigned(self, ())
        return True

    async def update(self, **kwargs: Any) -> int:
        """Update this stored document with mongoengine update syntax.

        ``await doc.update(inc__views=1, set__title="x")``; the instance is not
        reloaded (use :meth:`modify` for that).

        :returns: the number of documents updated (0 or 1).
        :raises OperationError: the document was never saved.
        """
        if self.pk is None:
            raise OperationError("attempt to update a document not yet saved")
        return await self._qs.filter(**self._object_key).update_one(**kwargs)

    async def fetch_related(self, *names: str) -> None:
        """Load the documents that ``ReferenceField``\\ s point to, in place.

        Reading a reference attribute never does I/O: it returns the stored
        ``DBRef`` until this is awaited.

        :raises DoesNotExist: a reference points at a missing document.
        """
        for name in names or tuple(self._fields):
            field = self._fields[name]
            value = self._data.get(name)
            if isinstance(value, DBRef):
                self._data[name] = await _fetch_ref(field, value)
            elif isinstance(value, list) and any(isinstance(v, DBRef) for v in value):
                loaded = [
                    await _fetch_ref(field.field, v) if isinstance(v, DBRef) else v for v in value
                ]
                self._data[name] = BaseList(loaded, self, name)

    async def add_file(
        self,
        field_name: str,
        data: Any,
        content_type: str | None = None,
        filename: str | None = None,
        **metadata: Any,
    ) -> Any:
        r"""Upload ``data`` and append it to a ``ListField(FileField())``.

        On a saved document the new id is ``$push``\ ed at once; on a new one it is
        written by the first ``save()``. Remove an element with
        ``await proxy.delete()``, which also takes it out of the list.

        :returns: the new element's :class:`~asyncassets.files.proxy.FileProxy`.
        :raises ValueError: ``field_name`` is not a list of files.
        """
        return await references.add_to_list(
            self, field_name, data, content_type=content_type, filename=filename, **metadata
        )

    @classmethod
    async def create_index(cls, keys: Any, background: bool = False, **kwargs: Any) -> str:
        """Create one index, mongoengine-style keys (``"-created"``, ``["a", "b"]``).

        :returns: the index name.
        """
        spec = dict(cls._build_index_spec(keys))
        fields = spec.pop("fields")
        spec.pop("cls", None)
        return str(
            await cls._get_collection().create_index(
                fields, background=background, **{**spec, **kwargs}
            )
        )

    # mongoengine.Document methods that would do blocking I/O (or hand back an
    # unawaited coroutine) here: refused with the async way to do it.
    def select_related(self, max_depth: int = 1) -> Any:
        """Not available: use ``await doc.fetch_related(...)``."""
        raise NotImplementedError("select_related() blocks; use `await doc.fetch_related()`.")

    def cascade_save(self, **kwargs: Any) -> Any:
        """Not available: save referenced documents with ``await ref.save()``."""
        raise NotImplementedError("cascade_save() blocks; `await ref.save()` each reference.")

    def switch_db(self, db_alias: str, keep_created: bool = True) -> Any:
        """Not available: declare ``meta = {"db_alias": ...}`` on a subclass instead."""
        raise NotImplementedError(
            "switch_db() is not supported; use a subclass with meta = {'db_alias': ...}."
        )

    def switch_collection(self, collection_name: str, keep_created: bool = True) -> Any:
        """Not available: declare ``meta = {"collection": ...}`` on a subclass instead."""
        raise NotImplementedError(
            "switch_collection() is not supported; use a subclass with meta = {'collection': ...}."
        )

    @classmethod
    def compare_indexes(cls) -> Any:
        """Not available: compare ``await Doc._get_collection().index_information()``."""
        raise NotImplementedError(
            "compare_indexes() blocks; read `await Doc._get_collection().index_information()`."
        )

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: {self.pk!r}>"


async def _fetch_ref(field: Any, ref: DBRef) -> Any:
    doc_type = get_document(ref.cls) if hasattr(ref, "cls") else field.document_type
    found = await doc_type.objects(pk=ref.id).first()
    if found is None:
        raise doc_type.DoesNotExist(f"Trying to dereference unknown document {ref}")
    return found


class DynamicDocument(Document, mongoengine.DynamicDocument):
    """A :class:`Document` that also stores attributes not declared as fields."""

    meta: ClassVar[dict[str, Any]] = {"abstract": True}
