"""The async ``QuerySet``: mongoengine's query syntax, every database call awaited.

``Doc.objects`` is a :class:`QuerySet`. Building one (``filter``, ``order_by``,
``limit``...) does no I/O and returns a new queryset; the methods that touch the
database are coroutines (``first``, ``get``, ``count``, ``to_list``, ``delete``,
``update``...) or async iterators (``async for doc in qs``).

.. code-block:: python

    big = await Animal.objects(weight__gte=10).order_by("-weight").limit(5).to_list()
    async for animal in Animal.objects.filter(Q(genus="Marmota") | Q(genus="Sciurus")):
        ...

mongoengine's QuerySet helpers are here in their async form (``create``,
``with_id``, ``in_bulk``, ``upsert_one``, ``scalar``/``values_list``, ``sum``,
``average``, ``item_frequencies``, ``explain``, ``to_json``...); the few left out
are listed, with what to use instead, in :doc:`/migration`.
"""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Generic, NoReturn, TypeVar

import pymongo
from bson import json_util
from mongoengine.base import BaseDocument
from mongoengine.errors import InvalidQueryError, NotUniqueError, OperationError
from mongoengine.fields import ListField
from mongoengine.queryset import transform
from mongoengine.queryset.visitor import Q, QNode
from pymongo import ReturnDocument

from . import _driver, filequery

if TYPE_CHECKING:
    from .document import Document

__all__ = ["Q", "QuerySet", "QuerySetManager"]

T = TypeVar("T", bound="Document")

#: Documents fetched per cascade-delete batch and per ``load_files`` round trip.
BATCH_SIZE = 500


def _refuse_embedded_data(values: Iterable[Any]) -> None:
    """An embedded document given to an update must hold no data to upload.

    The update writes it through ``to_mongo()``, where data assigned to its file
    fields has no id yet: it would be written as an empty field, the data lost.
    (A file field's own value is checked by ``FileField.prepare_query_value``.)

    :raises TypeError: such data, saying to save the document instead.
    """
    from .references import pending_data

    for value in values:
        if isinstance(value, (list, tuple)):
            _refuse_embedded_data(value)
        elif isinstance(value, dict):
            _refuse_embedded_data(value.values())
        elif isinstance(value, BaseDocument):
            pending = pending_data(value)
            if pending:
                raise TypeError(
                    f"{type(value).__name__}: {', '.join(pending)} holds data assigned "
                    "for upload, which an update writes as an empty field (it uploads "
                    "nothing). Assign the embedded document to the loaded document and "
                    "`await doc.save()`."
                )


class QuerySet(Generic[T]):
    """A lazily built query over one :class:`~asyncassets.Document` class.

    Chaining methods return a new queryset and never touch the database.
    """

    def __init__(self, document: type[T]) -> None:
        self._document = document
        self._query_obj: QNode = Q()
        self._ordering: list[tuple[str, int]] | None = None
        self._limit: int | None = None
        self._skip: int | None = None
        self._projection: dict[str, int] | None = None
        self._only_fields: list[str] | None = None
        self._as_pymongo = False
        #: Top-level fields whose files' catalogue entries come with the documents;
        #: ``None``: every field that can hold a file (the default), ``()``: none
        #: (``no_files()``). See :meth:`load_files`.
        self._file_fields: tuple[str, ...] | None = None
        self._batch_size: int | None = None
        #: Fields whose values replace the documents (``scalar``/``values_list``).
        self._scalar: tuple[str, ...] = ()
        #: ``none()``: matches nothing, whatever the filter.
        self._none = False
        #: The ``_cls`` condition of inheriting classes: "subclasses" (the class and
        #: its subclasses), "exact" (``no_sub_classes``) or "cleared".
        self._cls_mode = "subclasses"
        #: Options of the find command (``hint``, ``comment``, ``max_time_ms``...).
        self._find_options: dict[str, Any] = {}
        #: Conditions on a FileField's catalogue entry (photo__length__gt=...): see
        #: asyncassets.filequery, which compiles and resolves them.
        self._file_conditions = False

    # -- building ---------------------------------------------------------------

    def _clone(self) -> QuerySet[T]:
        # The query tree is shared, never changed in place (filter() combines it
        # into a new node); _query compiles a copy of it, since mongoengine's
        # compiler rewrites the nodes it visits. One copy per query sent, not one
        # per building step. (copy.copy, without its generic reduce protocol.)
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        return clone

    def clone(self) -> QuerySet[T]:
        """A copy of this queryset (every building method already returns one)."""
        return self._clone()

    def all(self) -> QuerySet[T]:
        """A copy of this queryset, as in mongoengine (``Doc.objects.all()``)."""
        return self._clone()

    def none(self) -> QuerySet[T]:
        """A queryset that matches no document, whatever else it is given.

        Reads return nothing, counts 0, and writes (upserts included) change nothing.
        """
        clone = self._clone()
        clone._none = True
        return clone

    def no_sub_classes(self) -> QuerySet[T]:
        """Only documents of this very class, not of its subclasses (inheritance)."""
        clone = self._clone()
        clone._cls_mode = "exact"
        return clone

    def clear_cls_query(self) -> QuerySet[T]:
        """Drop the ``_cls`` condition that inheriting classes add to every query.

        Documents of sibling classes in the collection then match too.
        """
        clone = self._clone()
        clone._cls_mode = "cleared"
        return clone

    def no_cache(self) -> QuerySet[T]:
        """A copy: querysets here never cache results (accepted for mongoengine code)."""
        return self._clone()

    def no_dereference(self) -> QuerySet[T]:
        """A copy: references are never dereferenced on access here anyway."""
        return self._clone()

    def __getitem__(self, key: slice) -> QuerySet[T]:
        """``qs[10:20]``: the same queryset with skip and limit applied (no I/O).

        The bounds count from this queryset's own skip and limit. An index
        (``qs[0]``) would have to block: use ``await qs.skip(i).first()``.
        """
        if not isinstance(key, slice):
            self._blocks("indexing a QuerySet (and iterating it without async for)")
        if key.step not in (None, 1):
            raise ValueError(f"QuerySet slices take no step, not {key.step!r}")
        start, stop = key.start or 0, key.stop
        if start < 0 or (stop is not None and stop < 0):
            raise ValueError("QuerySet slices take no negative bounds: order_by('-x') instead")
        room = None if self._limit is None else max(self._limit - start, 0)
        if stop is not None:
            room = max(stop - start, 0) if room is None else min(room, max(stop - start, 0))
        clone = self._clone()
        clone._skip = (self._skip or 0) + start or None
        clone._limit = room
        return clone

    def __bool__(self) -> NoReturn:
        self._blocks("the truth value of a QuerySet")

    def _blocks(self, what: str) -> NoReturn:
        raise TypeError(
            f"{what} would need a blocking query. Use `await qs.exists()` for a truth "
            "value, `await qs.first()` or `await qs.skip(i).first()` for one document, "
            "`async for doc in qs` or `await qs.to_list()` for all of them."
        )

    def __call__(self, q_obj: QNode | None = None, **query: Any) -> QuerySet[T]:
        """Same as :meth:`filter`."""
        return self.filter(q_obj, **query)

    def filter(self, q_obj: QNode | None = None, **query: Any) -> QuerySet[T]:
        """Narrow the query, with mongoengine syntax (``name__in=[...]``) or ``Q`` objects."""
        clone = self._clone()
        node: QNode = Q(**query)
        if q_obj is not None:
            if not isinstance(q_obj, QNode):
                raise TypeError(f"filter() takes Q objects and keywords, not {q_obj!r}")
            node = node & q_obj
        clone._query_obj = clone._query_obj & node
        # Called for every filter, so each new file condition is checked (and a bad
        # one refused) when the queryset is made, not when it runs.
        if filequery.has_file_conditions(self._document, node):
            clone._file_conditions = True
        return clone

    def order_by(self, *keys: str) -> QuerySet[T]:
        """Sort by fields; prefix ``-`` for descending. No keys clears the ordering."""
        clone = self._clone()
        ordering = []
        for key in keys:
            if not key:
                continue
            direction = pymongo.DESCENDING if key.startswith("-") else pymongo.ASCENDING
            name = key.lstrip("+-")
            if name == "pk":
                name = self._document._meta["id_field"]
            ordering.append((self._document._translate_field_name(name), direction))
        clone._ordering = ordering
        return clone

    def limit(self, n: int) -> QuerySet[T]:
        """Return at most ``n`` documents."""
        if n < 0:
            raise ValueError(f"limit() takes a count >= 0, not {n}")
        clone = self._clone()
        clone._limit = n
        return clone

    def skip(self, n: int) -> QuerySet[T]:
        """Skip the first ``n`` documents."""
        if n < 0:
            raise ValueError(f"skip() takes a count >= 0, not {n}")
        clone = self._clone()
        clone._skip = n
        return clone

    def only(self, *fields: str) -> QuerySet[T]:
        """Load only these fields (and the id)."""
        clone = self._clone()
        clone._projection = {self._db_name(f): 1 for f in fields}
        if self._document._meta.get("allow_inheritance"):
            clone._projection["_cls"] = 1
        clone._only_fields = list(fields)
        return clone

    def exclude(self, *fields: str) -> QuerySet[T]:
        """Load every field except these."""
        clone = self._clone()
        clone._projection = {self._db_name(f): 0 for f in fields}
        clone._only_fields = None
        return clone

    def all_fields(self) -> QuerySet[T]:
        """Load every field again, undoing :meth:`only` and :meth:`exclude`."""
        clone = self._clone()
        clone._projection = None
        clone._only_fields = None
        return clone

    def as_pymongo(self) -> QuerySet[Any]:
        """Return raw ``dict`` documents instead of :class:`Document` instances."""
        clone = self._clone()
        clone._as_pymongo = True
        return clone

    def scalar(self, *fields: str) -> QuerySet[Any]:
        """Return the values of ``fields`` instead of documents (loads only those).

        One field gives its value, several a tuple, in order;
        ``await Doc.objects.scalar("name").to_list()`` is a list of names. Reach
        into embedded documents with ``__`` (``"author__name"``). ``scalar()``
        with no fields returns documents again.
        """
        clone = self.only(*(f.replace("__", ".") for f in fields)) if fields else self.all_fields()
        clone._scalar = fields
        return clone

    def values_list(self, *fields: str) -> QuerySet[Any]:
        """Same as :meth:`scalar`."""
        return self.scalar(*fields)

    def _with_find_option(self, name: str, value: Any) -> QuerySet[T]:
        clone = self._clone()
        clone._find_options = {**self._find_options, name: value}
        return clone

    def hint(self, index: str | Sequence[tuple[str, int]]) -> QuerySet[T]:
        """Make the server use this index (its name, or its keys).

        Applies to reads and counts; ``await qs.explain()`` shows the plan.
        """
        return self._with_find_option("hint", index)

    def comment(self, text: str) -> QuerySet[T]:
        """Attach ``text`` to the query, for the server's logs and profiler."""
        return self._with_find_option("comment", text)

    def max_time_ms(self, ms: int | None) -> QuerySet[T]:
        """Let the server stop the query after ``ms`` milliseconds (``None``: no limit).

        A query that runs longer raises ``pymongo.errors.ExecutionTimeout``.
        """
        return self._with_find_option("max_time_ms", ms)

    def allow_disk_use(self, enabled: bool) -> QuerySet[T]:
        """Let the server sort with temporary files beyond its memory limit."""
        return self._with_find_option("allow_disk_use", bool(enabled))

    def timeout(self, enabled: bool) -> QuerySet[T]:
        """``False`` keeps the server from closing the cursor after 10 idle minutes."""
        return self._with_find_option("no_cursor_timeout", not enabled)

    def batch_size(self, n: int) -> QuerySet[T]:
        """Ask the server for ``n`` documents per round trip."""
        clone = self._clone()
        clone._batch_size = n
        return clone

    def load_files(self, *field_names: str) -> QuerySet[T]:
        """Load the catalogue entries of these file fields only (all when none given).

        Documents come with their files' catalogue entries by default (every field
        that can hold a file: ``FileField``\\ s, lists and dicts of them, and those in
        embedded documents), fetched per batch of documents (the whole result of
        :meth:`to_list`, each batch of ``async for``) with a query per catalogue
        and 50 files, sent together, so ``doc.photo.length``,
        ``doc.photo.content_type``, ``str(doc.photo)`` and an image's ``size`` need
        no ``await doc.photo.load()``. This narrows that to the top-level fields
        named; :meth:`no_files` turns it off, and so does
        ``meta = {"load_files": False}`` on a document class (then
        ``load_files()`` asks for them).
        """
        from .schema import file_field_names

        available = file_field_names(self._document)
        unknown = [n for n in field_names if n not in available]
        if unknown:
            raise ValueError(
                f"load_files() takes fields of {self._document.__name__} that hold "
                f"files; {', '.join(unknown)} is not one (they are: "
                f"{', '.join(available) or 'none'})"
            )
        clone = self._clone()
        clone._file_fields = tuple(field_names) if field_names else tuple(available)
        return clone

    def no_files(self) -> QuerySet[T]:
        """Load the documents without their files' catalogue entries.

        Saves the queries per catalogue and batch that loading them costs, for
        code that never reads file metadata (or reads it with
        ``await doc.photo.load()``). Reading the bytes is unchanged: ``read()``
        and ``stream()`` fetch what they need.
        """
        clone = self._clone()
        clone._file_fields = ()
        return clone

    def _db_name(self, name: str) -> str:
        if name == "pk":
            return "_id"
        return str(self._document._translate_field_name(name))

    # -- the query --------------------------------------------------------------

    @property
    def _collection(self) -> Any:
        collection = self._document._get_collection()
        if self._file_conditions:
            return filequery.ResolvingCollection(collection)
        return collection

    @property
    def _query(self) -> dict[str, Any]:
        if self._none:
            return {"_id": {"$in": []}}
        node = self._query_obj
        if type(node) is not Q or any(isinstance(v, dict) for v in node.query.values()):
            # Compiling rewrites a combination's children in place, and merges
            # later conditions on a key into the dict given for it (a __raw__
            # query's, or a dict value's): on a copy. A plain Q without dicts
            # compiles into new objects; for the common one-condition query the
            # copy was a fifth of the time spent before the I/O.
            node = copy.deepcopy(node)
        if self._file_conditions:
            node = filequery.mark_file_conditions(node, self._document)
        query: dict[str, Any] = node.to_query(self._document)
        meta = self._document._meta
        if meta.get("allow_inheritance") is True and self._cls_mode != "cleared":
            subclasses = self._document._subclasses
            if self._cls_mode == "exact":
                subclasses = [self._document._class_name]
            cls_query = (
                {"_cls": subclasses[0]} if len(subclasses) == 1 else {"_cls": {"$in": subclasses}}
            )
            query = {"$and": [cls_query, query]} if query else cls_query
        return query

    def _sort(self) -> list[tuple[str, int]] | None:
        if self._ordering is not None:
            return self._ordering or None
        default = self._document._meta.get("ordering") or []
        if not default:
            return None
        return self.order_by(*default)._ordering

    def _cursor(self) -> Any:
        kwargs: dict[str, Any] = {}
        if self._projection is not None:
            kwargs["projection"] = self._projection
        sort = self._sort()
        if sort:
            kwargs["sort"] = sort
        if self._skip:
            kwargs["skip"] = self._skip
        if self._limit:
            kwargs["limit"] = self._limit
        if self._batch_size:
            kwargs["batch_size"] = self._batch_size
        kwargs.update(self._find_options)
        return self._collection.find(self._query, **kwargs)

    def _read_options(self, *names: str) -> dict[str, Any]:
        """The find options that other read commands take too, in their spelling."""
        spelling = {"hint": "hint", "comment": "comment", "max_time_ms": "maxTimeMS"}
        return {
            spelling[name]: value
            for name, value in self._find_options.items()
            if name in names and value is not None
        }

    def _build(self, son: dict[str, Any]) -> Any:
        if self._scalar:
            doc = self._document._from_son(son, created=False)
            values = tuple(_lookup(doc, name) for name in self._scalar)
            return values[0] if len(values) == 1 else values
        if self._as_pymongo:
            return son
        return self._document._from_son(son, created=False)

    # -- reading ----------------------------------------------------------------

    async def __aiter__(self) -> AsyncIterator[T]:
        if self._limit == 0:
            return
        batch: list[T] = []
        build = self._build
        files = self._files_to_load()
        async for son in _each(self._cursor()):
            doc = build(son)
            if files is None:
                yield doc
                continue
            batch.append(doc)
            if len(batch) >= BATCH_SIZE:
                await self._load_files(batch, files)
                for doc in batch:
                    yield doc
                batch = []
        if batch:
            await self._load_files(batch, files)
            for doc in batch:
                yield doc

    def _files_to_load(self) -> tuple[str, ...] | None:
        """The fields whose catalogue entries come with the documents (``None``: none)."""
        if self._file_fields == () or self._as_pymongo or self._scalar:
            return None
        if self._file_fields is None and self._document._meta.get("load_files") is False:
            return None  # the class said so: load_files() still asks for them
        from .schema import file_field_names, holds_files

        if not holds_files(self._document):
            return None
        return self._file_fields or tuple(file_field_names(self._document))

    async def _load_files(self, docs: Sequence[Any], files: tuple[str, ...] | None) -> None:
        if files is not None and docs:
            from .references import load_files

            await load_files(docs, files)

    async def to_list(self, length: int | None = None) -> list[T]:
        """Every matching document (at most ``length``), as a list."""
        qs = self
        if length is not None:
            qs = self.limit(length if self._limit is None else min(length, self._limit))
        if qs._limit == 0:
            return []
        # Whole batches from the cursor, not one awaited step per document: the
        # same round trips, and the documents are built in a plain loop.
        cursor, build = qs._cursor(), qs._build
        docs: list[T] = []
        while sons := await cursor.to_list(BATCH_SIZE):
            docs += [build(son) for son in sons]
        await qs._load_files(docs, qs._files_to_load())
        return docs

    async def first(self) -> T | None:
        """The first matching document, or ``None``."""
        docs = await self.limit(1).to_list()
        return docs[0] if docs else None

    async def exists(self) -> bool:
        """Whether any document matches: the async form of mongoengine's ``bool(qs)``."""
        if self._limit == 0:
            return False
        qs = self._clone()
        qs._projection, qs._scalar, qs._file_fields = {"_id": 1}, (), ()
        qs._as_pymongo = True
        return bool(await qs.order_by().limit(1).to_list())

    async def with_id(self, object_id: Any) -> T | None:
        """The document with this primary key, or ``None``.

        :raises InvalidQueryError: the queryset is already filtered (as in mongoengine).
        """
        if self._query_obj:
            raise InvalidQueryError("Cannot use a filter whilst using `with_id`")
        return await self.filter(pk=object_id).first()

    async def in_bulk(self, object_ids: Iterable[Any]) -> dict[Any, T]:
        """The documents with these primary keys, as ``{pk: document}``.

        Ids that match nothing are left out. One query, whatever the number of ids.
        """
        qs = self.filter(pk__in=list(object_ids))
        qs._skip = qs._limit = None
        found: dict[Any, T] = {}
        async for son in qs._raw_with_ids():
            found[son[0]] = son[1]
        return found

    async def _raw_with_ids(self) -> AsyncIterator[tuple[Any, Any]]:
        """``(stored _id, built result)`` for every match, files loaded per batch."""
        batch: list[tuple[Any, Any]] = []
        files = self._files_to_load()
        async for son in self._cursor():
            batch.append((son["_id"], self._build(son)))
            if len(batch) >= BATCH_SIZE:
                await self._load_files([item for _, item in batch], files)
                for pair in batch:
                    yield pair
                batch = []
        await self._load_files([item for _, item in batch], files)
        for pair in batch:
            yield pair

    async def get(self, q_obj: QNode | None = None, **query: Any) -> T:
        """The one document matching the query.

        :raises DoesNotExist: nothing matched (``Doc.DoesNotExist``).
        :raises MultipleObjectsReturned: more than one matched.
        """
        docs = await self.filter(q_obj, **query).limit(2).to_list()
        if not docs:
            raise self._document.DoesNotExist(
                f"{self._document._class_name} matching query does not exist."
            )
        if len(docs) > 1:
            raise self._document.MultipleObjectsReturned("2 or more items returned, instead of 1")
        return docs[0]

    async def count(self, with_limit_and_skip: bool = False) -> int:
        """Count matching documents (ignoring ``limit``/``skip`` unless asked)."""
        kwargs: dict[str, Any] = {}
        if with_limit_and_skip:
            if self._limit == 0:
                return 0
            if self._skip:
                kwargs["skip"] = self._skip
            if self._limit:
                kwargs["limit"] = self._limit
        kwargs.update(self._read_options("hint", "comment", "max_time_ms"))
        return int(await self._collection.count_documents(self._query, **kwargs))

    async def distinct(self, field: str) -> list[Any]:
        """The distinct values of ``field`` among matching documents."""
        options = self._read_options("comment", "max_time_ms")
        return list(await self._collection.distinct(self._db_name(field), self._query, **options))

    async def sum(self, field: str) -> Any:
        """The sum of ``field`` over the matching documents (0 when none match).

        A list field adds up its elements. Unlike mongoengine, ``skip`` and ``limit``
        count: ``qs.order_by("-score").limit(10).sum("score")`` is the top ten's.
        """
        return await self._group_total(field, "$sum")

    async def average(self, field: str) -> Any:
        """The mean of ``field`` over the matching documents (0 when none match).

        A list field counts each element; documents without the field are left out.
        ``skip`` and ``limit`` count, as for :meth:`sum`.
        """
        return await self._group_total(field, "$avg")

    async def _group_total(self, field: str, operator: str) -> Any:
        stages = [*self._each_value(field), {"$group": {"_id": None, "t": {operator: "$v"}}}]
        async for row in self.aggregate(stages):
            return 0 if row["t"] is None else row["t"]
        return 0

    def _each_value(self, field: str) -> list[dict[str, Any]]:
        """Stages giving one ``{"v": value}`` per value of ``field``.

        The elements of a list (a list field, or a path through a list of embedded
        documents) one by one, none for an empty list; ``None`` for a document
        without a (non-list) field.
        """
        if field == "pk":
            return [{"$project": {"_id": 0, "v": "$_id"}}]
        chain = self._document._lookup_field(field.split("."))
        names = [p if isinstance(p, str) else p.db_field for p in chain]
        stages: list[dict[str, Any]] = []
        for i, part in enumerate(chain[:-1]):
            if isinstance(part, ListField):  # the server would not reach through it
                stages.append({"$unwind": "$" + ".".join(names[: i + 1])})
        path = "$" + ".".join(names)
        if isinstance(chain[-1], ListField):
            value: Any = path
        else:  # a dynamic field may still hold a list; a missing one gives [None]
            value = {"$cond": [{"$isArray": path}, path, [path]]}
        return [*stages, {"$project": {"_id": 0, "v": value}}, {"$unwind": "$v"}]

    async def item_frequencies(self, field: str, normalize: bool = False) -> dict[Any, Any]:
        """How often each value of ``field`` occurs: ``{value: count}``.

        The elements of a list field are counted one by one; a document without the
        field counts for ``None``. With ``normalize`` the counts are fractions of
        the total (adding up to 1.0). One aggregation on the server.
        """
        stages = [*self._each_value(field), {"$group": {"_id": "$v", "n": {"$sum": 1}}}]
        counts = {row["_id"]: int(row["n"]) async for row in self.aggregate(stages)}
        if not normalize:
            return counts
        total = sum(counts.values())
        return {value: n / total for value, n in counts.items()}

    async def explain(self) -> dict[str, Any]:
        """The server's plan for this query (``find`` with sort, skip, limit, hint)."""
        return dict(await self._cursor().explain())

    async def to_json(self, *args: Any, **kwargs: Any) -> str:
        """The matching documents as stored, as MongoDB Extended JSON (a list).

        Arguments go to ``bson.json_util.dumps``; the default is relaxed Extended
        JSON (mongoengine still defaulted to PyMongo's legacy format, with a warning).
        """
        kwargs.setdefault("json_options", json_util.RELAXED_JSON_OPTIONS)
        return str(json_util.dumps(await self.as_pymongo().to_list(), *args, **kwargs))

    def from_json(self, json_data: str) -> list[T]:
        """Unsaved documents from Extended JSON, as :meth:`to_json` writes it (no I/O)."""
        return [self._document._from_son(son) for son in json_util.loads(json_data)]

    async def aggregate(
        self, pipeline: Sequence[Mapping[str, Any]], **kwargs: Any
    ) -> AsyncIterator[dict[str, Any]]:
        """Run an aggregation pipeline after this queryset's match, sort, skip and limit.

        ``async for row in Doc.objects(kind="a").aggregate([{"$group": ...}])``
        """
        if self._limit == 0:
            return  # limit(0) matches nothing here; a $limit stage cannot say so
        stages: list[Mapping[str, Any]] = []
        query = self._query
        if query:
            stages.append({"$match": query})
        sort = self._sort()
        if sort:
            stages.append({"$sort": dict(sort)})
        if self._skip:
            stages.append({"$skip": self._skip})
        if self._limit:
            stages.append({"$limit": self._limit})
        options = {**self._read_options("hint", "comment", "max_time_ms"), **kwargs}
        async for row in _driver.aggregate(self._collection, [*stages, *pipeline], **options):
            yield row

    # -- writing ----------------------------------------------------------------

    async def insert(self, docs: T | Iterable[T], load_bulk: bool = True) -> Any:
        """Insert new documents in one round trip (validated first).

        :returns: the documents with their ids set (or the ids, with ``load_bulk=False``).
        :raises NotUniqueError: a unique index refused one of them.
        :raises TypeError: a document's file field holds data assigned for upload
            (``doc.photo = data``), which only ``save()`` uploads; nothing was written.
        """
        # Documents iterate over their field names, so test for one first.
        items: list[T]
        if isinstance(docs, BaseDocument) or not isinstance(docs, Iterable):
            single, items = True, [docs]
        else:
            single, items = False, list(docs)
        from .references import pending_data

        for doc in items:
            if not isinstance(doc, self._document):
                raise TypeError(
                    f"insert() takes {self._document.__name__} instances, not {type(doc).__name__}"
                )
            if doc.pk is not None and not doc._created:
                raise OperationError("Some documents have ObjectIds, use doc.update() instead")
            pending = pending_data(doc)
            if pending:
                # insert() writes documents as they are and uploads nothing: the
                # data would be lost and the field stored empty.
                raise TypeError(
                    f"insert(): {', '.join(pending)} holds data assigned for upload, which "
                    "only save() uploads. Save such documents one by one "
                    "(`await doc.save()`), or upload first (`await doc.<field>.put(data)`)."
                )
            doc.validate()
        if not items:
            return [] if not single else None
        await self._document._ensure_indexes_once()
        raw = [doc.to_mongo() for doc in items]
        try:
            result = await self._collection.insert_many(raw)
        except pymongo.errors.BulkWriteError as err:
            if any(e.get("code") in (11000, 11001) for e in err.details.get("writeErrors", [])):
                raise NotUniqueError(f"Bulk insert hit a unique index ({err})") from err
            raise OperationError(f"Could not save documents ({err})") from err
        from .references import bind

        for doc, object_id in zip(items, result.inserted_ids, strict=True):
            doc.pk = object_id
            doc._clear_changed_fields()
            doc._created = False
            bind(doc)
        if not load_bulk:
            ids = list(result.inserted_ids)
            return ids[0] if single else ids
        return items[0] if single else items

    async def create(self, **fields: Any) -> T:
        """Create and insert a document: ``await Doc.objects.create(name="x")``.

        :returns: the saved document.
        :raises NotUniqueError: a document with its id (or a unique value) exists.
        """
        return await self._document(**fields).save(force_insert=True)

    async def upsert_one(
        self, write_concern: dict[str, Any] | None = None, **update: Any
    ) -> T | None:
        """Update the first matching document, or insert one built from the query.

        :returns: the document as stored after the update (``None`` after
            :meth:`none`, which changes nothing).
        """
        if self._none:
            return None
        collection = with_write_concern(self._collection, write_concern)
        son = await collection.find_one_and_update(
            self._query,
            self._update_doc(update),
            upsert=True,
            sort=self._sort(),
            return_document=ReturnDocument.AFTER,
        )
        if son is None:
            return None
        doc = self._document._from_son(son, created=False)
        await self._load_files([doc], self._files_to_load())
        return doc

    def _update_doc(self, update: dict[str, Any]) -> dict[str, Any]:
        if not update:
            raise OperationError("No update parameters, would remove data")
        _refuse_embedded_data(update.values())
        doc: dict[str, Any] = transform.update(self._document, **update)
        return doc

    async def update(self, upsert: bool = False, **update: Any) -> int:
        """Update every matching document: ``await qs.update(inc__views=1)``.

        :returns: the number of documents matched.
        """
        if self._none:
            return 0
        result = await self._collection.update_many(
            self._query, self._update_doc(update), upsert=upsert
        )
        return _touched(result)

    async def update_one(self, upsert: bool = False, **update: Any) -> int:
        """Update the first matching document. :returns: 0 or 1."""
        if self._none:
            return 0
        result = await self._collection.update_one(
            self._query, self._update_doc(update), upsert=upsert
        )
        return _touched(result)

    async def modify(
        self, upsert: bool = False, remove: bool = False, new: bool = False, **update: Any
    ) -> T | None:
        """Update (or remove) one matching document atomically and return it.

        :param new: return the document as it is after the update (default: before).
        :returns: the document, or ``None`` when nothing matched.
        """
        if remove and new:
            raise OperationError("Conflicting parameters: remove and new")
        if self._none:
            return None
        sort = self._sort()
        if remove:
            son = await self._collection.find_one_and_delete(self._query, sort=sort)
        else:
            son = await self._collection.find_one_and_update(
                self._query,
                self._update_doc(update),
                upsert=upsert,
                sort=sort,
                return_document=ReturnDocument.AFTER if new else ReturnDocument.BEFORE,
            )
        return None if son is None else await self._built_with_files(son)

    async def _built_with_files(self, son: dict[str, Any]) -> Any:
        """One document built from ``son``, with its files' entries (as reads give)."""
        doc = self._build(son)
        await self._load_files([doc], self._files_to_load())
        return doc

    async def delete(self, write_concern: dict[str, Any] | None = None) -> int:
        """Delete every matching document, then the files their ``FileField``\\ s hold.

        Documents go first, in batches; their files are deleted once the documents
        that referenced them are gone, so no stored document ever points at a
        missing file. Fields declared ``cascade=False`` keep their files.

        :returns: the number of documents deleted.
        """
        from .references import cascade_paths, delete_files_of

        if self._limit == 0:
            return 0  # limit(0) matches nothing here (the cursor would take it as no limit)
        collection = with_write_concern(self._collection, write_concern)
        paths = cascade_paths(self._document)
        if not paths and self._limit is None and not self._skip:
            return int((await collection.delete_many(self._query)).deleted_count)
        if paths:
            # Files are deleted once the documents are: a delete a failover could roll
            # back would bring back documents whose files are gone (_driver.acknowledged).
            collection = _driver.acknowledged(collection)

        deleted = 0
        projection = dict.fromkeys(paths or ["_id"], 1)
        if self._document._meta.get("allow_inheritance"):
            projection["_cls"] = 1
        qs = self._clone()
        qs._projection = projection
        batch: list[dict[str, Any]] = []

        async def flush() -> None:
            nonlocal deleted
            ids = [son["_id"] for son in batch]
            result = await collection.delete_many({"_id": {"$in": ids}})
            deleted += int(result.deleted_count)
            await delete_files_of(self._document, batch)
            batch.clear()

        # Streamed: only documents the cursor already returned are deleted, which
        # does not move it; memory stays at one batch whatever the match count.
        async for son in qs._cursor():
            batch.append(son)
            if len(batch) >= BATCH_SIZE:
                await flush()
        if batch:
            await flush()
        return deleted

    async def _delete_one_by_id(self, pk: Any, write_concern: dict[str, Any] | None = None) -> bool:
        """Delete one document atomically and cascade to the files it held then."""
        from .references import cascade_paths, delete_files_of

        collection = with_write_concern(self._collection, write_concern)
        paths = cascade_paths(self._document)
        db_id = self._document._fields[self._document._meta["id_field"]].to_mongo(pk)
        if not paths:
            result = await collection.delete_one({"_id": db_id})
            return bool(result.deleted_count)
        collection = _driver.acknowledged(collection)  # majority, as in delete()
        projection = dict.fromkeys(paths, 1)
        projection["_cls"] = 1
        son = await collection.find_one_and_delete({"_id": db_id}, projection=projection)
        if son is None:
            return False
        await delete_files_of(self._document, [son])
        return True

    def __repr__(self) -> str:
        return f"<QuerySet {self._document.__name__} {self._query!r}>"


async def _each(cursor: Any) -> AsyncIterator[Any]:
    """The documents of ``cursor``, one by one, with the round trips of ``async for``.

    Takes each batch from the cursor's buffer with one ``to_list`` instead of one
    awaited cursor step per document (two coroutines each); it asks for the next
    batch, as ``async for`` does, only once the consumer has taken every document
    of this one. Cursors without ``retrieved`` (Motor's) are iterated as they are.
    """
    if not hasattr(cursor, "retrieved"):
        async for son in cursor:
            yield son
        return
    taken = 0
    while True:
        # What the cursor holds (no I/O), else one document, which fetches a batch.
        sons = await cursor.to_list(cursor.retrieved - taken or 1)
        if not sons:
            return
        taken += len(sons)
        for son in sons:
            yield son


def _lookup(doc: Any, name: str) -> Any:
    """``doc``'s value at ``name`` (``author__name`` reaches into embedded documents)."""
    value = doc
    for part in name.replace(".", "__").split("__"):
        value = None if value is None else getattr(value, part)
    return value


def _touched(result: Any) -> int:
    """Documents an update matched, counting one it upserted (as mongoengine does)."""
    return int(result.matched_count) + (1 if result.upserted_id is not None else 0)


def with_write_concern(collection: Any, write_concern: Mapping[str, Any] | None) -> Any:
    """``collection`` with ``write_concern`` (e.g. ``{"w": "majority"}``) applied, if any."""
    if not write_concern:
        return collection
    return collection.with_options(write_concern=pymongo.WriteConcern(**write_concern))


class QuerySetManager:
    """The ``objects`` descriptor: ``Doc.objects`` is a fresh :class:`QuerySet` of ``Doc``."""

    def __get__(self, instance: Any, owner: type[T]) -> QuerySet[T]:
        if instance is not None:
            raise AttributeError(
                "objects is reached through the class (Doc.objects), not an instance."
            )
        return QuerySet(owner)
