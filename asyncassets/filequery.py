"""Conditions on catalogue entries: documents found by their files, assets by metadata.

A file's catalogue entry (one document of ``<collection_name>.files``, see
:mod:`asyncassets.storage.catalogue`) is queried with mongoengine's syntax under
these names:

==========================  ==========================  ==================================
name                        entry field                 example
==========================  ==========================  ==================================
``length`` (or ``size``)    ``length``                  ``length__gt=10_000``
``content_type``            ``metadata.content_type``   ``content_type__startswith="image/"``
``filename``                ``filename``                ``filename__iendswith=".jpg"``
``upload_date`` (or         ``uploadDate``              ``uploaded__gte=datetime(2026, 1, 1)``
``uploaded``)
``sha256``                  ``metadata.sha256``         ``sha256="9f86d0..."``
``metadata__<key>``         ``metadata.<key>``          ``metadata__gallery_id="g1"``
==========================  ==========================  ==================================

``length`` is the stored length (for a ``compress="gzip"`` field, the gzip size).
Operators are mongoengine's (``gt``, ``in``, ``ne``, ``exists``, ``startswith``,
``icontains``, ``not``...); values are prepared as mongoengine prepares them.

**Values are values, never operators.** Stored metadata cannot hold keys that
start with ``$`` (the metadata check refuses them), so a value that is a dict
with a ``$`` key (at any depth, also in a list) can only be a query operator
smuggled in from request data (``gallery_id={"$ne": None}`` would match every
gallery): it is refused with :class:`~mongoengine.errors.InvalidQueryError`
before any I/O. Operators are spelled as suffixes, where code says them:
``gallery_id__ne=None``. And the entry's own fields take values of their type
(:data:`VALUE_TYPES`): ``uploaded__gt="yesterday"`` is refused rather than
matching nothing.

**Documents by their files.** In a queryset, a ``FileField`` name (top level, in a
list, or in an embedded document) followed by one of these names is a condition
on the file the field references::

    await Animal.objects(
        genus="Marmota",
        photo__content_type__startswith="image/",
        photo__length__gt=10_000,
        photo__metadata__gallery_id="g1",
    ).to_list()

The document still stores only the file's id. Such a query runs in two steps:
the catalogue is asked for the ids of the matching files (an index scan when the
catalogue has an index for the condition), then the documents are asked for
``field: {"$in": ids}`` together with their own conditions. :doc:`/assets`
explains why two steps and not a ``$lookup`` (it was measured; see
:doc:`/performance`).

How: :func:`mark_file_conditions` replaces the file conditions of a query tree by
:class:`FileMatch` placeholders (one per field and ``Q`` leaf), which compile into
the filter like any raw condition. The queryset's collection is then a
:class:`ResolvingCollection`, which turns each placeholder into
``{"$in": ids}`` right before it sends the filter, in every command (find,
count, distinct, update, delete, aggregate). A placeholder that reached the
driver unresolved would fail to encode: it can never be sent as it is.
"""

from __future__ import annotations

import datetime as dt
import inspect
import re
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import Any

import mongoengine
from mongoengine.errors import InvalidQueryError
from mongoengine.fields import (
    DateTimeField,
    DictField,
    EmbeddedDocumentField,
    IntField,
    ListField,
    StringField,
)
from mongoengine.queryset import transform
from mongoengine.queryset.visitor import Q, QCombination, QNode

from .connection import DEFAULT_ALIAS, get_db
from .fields import FileField
from .schema import fields_with_files

__all__ = [
    "ENTRY_NAMES",
    "VALUE_TYPES",
    "FileMatch",
    "ResolvingCollection",
    "check_condition",
    "entry_filter",
    "entry_sort",
    "has_file_conditions",
    "mark_file_conditions",
]


class _CatalogueEntry(mongoengine.Document):
    """What mongoengine compiles entry conditions against (never stored or queried)."""

    meta = {"abstract": True}
    length = IntField()
    filename = StringField()
    uploadDate = DateTimeField()  # the GridFS spec's name
    metadata = DictField()


#: The names of an entry's fields in queries, and the path (in
#: :class:`_CatalogueEntry`'s terms) each stands for.
ENTRY_NAMES: dict[str, tuple[str, ...]] = {
    "length": ("length",),
    "size": ("length",),
    "content_type": ("metadata", "content_type"),
    "filename": ("filename",),
    "upload_date": ("uploadDate",),
    "uploaded": ("uploadDate",),
    "sha256": ("metadata", "sha256"),
    "metadata": ("metadata",),
}

_OPERATORS = frozenset(
    {
        *transform.COMPARISON_OPERATORS,
        *transform.STRING_OPERATORS,
        *transform.GEO_OPERATORS,
        *transform.CUSTOM_OPERATORS,
    }
)

#: What the entry's own fields hold, by entry path: a condition on one of them
#: takes values of that type (``None`` too, for equality, ``ne``, ``in``, ``nin``).
#: Metadata keys hold what the user stored, so their conditions take any value
#: (only never an operator document, see :func:`check_condition`).
VALUE_TYPES: dict[str, tuple[str, tuple[type, ...]]] = {
    "length": ("a number of bytes (int)", (int, float)),
    "uploadDate": ("a datetime (or a date)", (dt.datetime, dt.date)),
    "filename": ("a str", (str,)),
    "metadata.content_type": ("a str", (str,)),
    "metadata.sha256": ("a str", (str,)),
    "metadata.asset_id": ("a str", (str,)),
}
#: Operators by what their value is: one value of the field's type, a list of
#: them, a bool, a pattern (str) on text.
_ONE_VALUE = frozenset({"", "ne", "gt", "gte", "lt", "lte"})
_LISTS = frozenset({"in", "nin", "all"})
_TEXT = frozenset(transform.STRING_OPERATORS)


def _operator_keys(value: Any, path: str = "") -> str | None:
    """The path of the first ``$`` key in ``value`` (dicts, at any depth, and
    lists), or ``None``."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            if isinstance(key, str) and key.startswith("$"):
                return f"{path}{key}"
            found = _operator_keys(item, f"{path}{key}.")
            if found is not None:
                return found
    elif isinstance(value, (list, tuple, set, frozenset)):
        for index, item in enumerate(value):
            found = _operator_keys(item, f"{path}{index}.")
            if found is not None:
                return found
    return None


def check_condition(entry_key: str, value: Any, where: str) -> None:
    """Refuse a condition's value that is not a value: an operator document, or
    the wrong type for one of the entry's own fields (no I/O).

    ``entry_key`` is the condition in :class:`_CatalogueEntry`'s terms
    (``uploadDate__gt``, ``metadata__gallery_id__ne``).

    :raises InvalidQueryError: ``value`` holds a key starting with ``$`` (at any
        depth, also inside lists), or does not fit the field (:data:`VALUE_TYPES`).
    """
    dollar = _operator_keys(value)
    if dollar is not None:
        raise InvalidQueryError(
            f"{where}: the value holds the operator {dollar!r}; a condition's value is "
            "compared as it is and stored metadata never has '$' keys, so this can only "
            "be a query operator inside the value (from request data?). Write the "
            "operator as a suffix in code instead: gallery_id__ne=None, "
            "size__gt=1000, tags__in=[...]"
        )
    parts = entry_key.split("__")
    ops: list[str] = []
    while parts and parts[-1] in _OPERATORS:
        ops.insert(0, parts.pop())
    path = ".".join(parts)
    if path not in VALUE_TYPES:
        return
    kind, types = VALUE_TYPES[path]
    op = ops[-1] if ops else ""

    def fits(item: Any, none_ok: bool) -> bool:
        if item is None:
            return none_ok
        if isinstance(item, bool):
            return False
        if isinstance(item, re.Pattern) and str in types:
            return op in ("", "not", "in", "nin")
        return isinstance(item, types)

    if op in _TEXT and str not in types:
        op = "?"  # a text operator on a number or a time: refused below
    if op == "exists":
        ok, wanted = isinstance(value, bool), "True or False"
    elif op in _LISTS:
        ok = isinstance(value, (list, tuple, set, frozenset)) and all(
            fits(item, op != "all") for item in value)
        wanted = f"a list of values, each {kind}"
    elif op in _TEXT:
        ok, wanted = isinstance(value, str), "a str"
    elif op == "mod" and int in types:
        ok = (isinstance(value, (list, tuple)) and len(value) == 2
              and all(fits(item, False) for item in value))
        wanted = "[divisor, remainder]"
    elif op in _ONE_VALUE or op == "not":
        ok, wanted = fits(value, op in ("", "ne")), kind
    else:
        raise InvalidQueryError(
            f"{where}: this operator does not apply to a field holding {kind}; use "
            "ne, gt, gte, lt, lte, in, nin or exists"
        )
    if not ok:
        hint = ""
        if isinstance(value, str) and str not in types:
            parse = "datetime.fromisoformat(text)" if int not in types else "int(text)"
            hint = f" (parse text first: {parse})"
        raise InvalidQueryError(
            f"{where} takes {wanted}, not {value!r}{hint}; a value of another type "
            "would silently match nothing"
        )


def _entry_key(
    parts: Sequence[str],
    bare: str | None,
    where: str,
    names: Mapping[str, tuple[str, ...]] | None = None,
) -> str:
    """The :class:`_CatalogueEntry` key for a condition's parts (after any field name).

    ``bare``: what a first part that is no entry name stands for (``"metadata"``
    for assets, where ``gallery_id`` means ``metadata.gallery_id``); ``None``
    refuses it. ``names``: more names (``asset_id`` for assets).
    """
    head, rest = parts[0], list(parts[1:])
    if names and head in names:
        path = list(names[head])
    elif head in ENTRY_NAMES:
        path = list(ENTRY_NAMES[head])
        if head == "metadata" and (not rest or rest[0] in _OPERATORS):
            raise InvalidQueryError(
                f"{where}: name a metadata key after metadata__ "
                "(metadata__gallery_id='g1'); the metadata as a whole cannot be compared"
            )
    elif bare is not None and head not in _OPERATORS and head:
        path = [bare, head]
    else:
        raise InvalidQueryError(
            f"{where}: {head!r} is not part of a file's catalogue entry; use "
            + ", ".join(n for n in ENTRY_NAMES if n != "metadata")
            + " or metadata__<key>, with mongoengine's operators (length__gt=1000)"
        )
    return "__".join([*path, *rest])


def _translate(node: QNode, rename: Any) -> QNode:
    """A copy of ``node`` with each leaf's keys renamed by ``rename(key, value) -> key``."""
    if isinstance(node, QCombination):
        return QCombination(node.operation, [_translate(c, rename) for c in node.children])
    if isinstance(node, Q):
        return Q(**{rename(k, v): v for k, v in node.query.items()})
    raise TypeError(f"expected Q objects, not {type(node).__name__}")


def entry_filter(
    *nodes: QNode,
    bare: str | None = None,
    names: Mapping[str, tuple[str, ...]] | None = None,
    where: str = "query",
    **conditions: Any,
) -> dict[str, Any]:
    """The MongoDB filter on catalogue entries for these conditions (no I/O).

    ``entry_filter(content_type__startswith="image/", length__gt=1000)`` is
    ``{"metadata.content_type": re.compile("^image/"), "length": {"$gt": 1000}}``.
    ``Q`` objects combine as in querysets (``Q(a=1) | Q(b=2)``).

    :param bare: what a name that is not an entry name stands for: ``"metadata"``
        makes ``gallery_id`` mean ``metadata.gallery_id`` (assets); ``None``
        refuses it.
    :param names: more names and the entry paths they stand for.
    :raises InvalidQueryError: a name is not part of a catalogue entry; a value
        is an operator document or the wrong type (:func:`check_condition`); a
        raw filter (``__raw__``) was given: operators are written as suffixes
        (``gallery_id__ne=None``), so keyword arguments built from request data
        can never carry a filter of their own.
    """
    tree: QNode = Q(**conditions)
    for node in nodes:
        if not isinstance(node, QNode):
            raise TypeError(f"conditions are Q objects and keywords, not {node!r}")
        tree = tree & node

    def rename(key: str, value: Any) -> str:
        if key == "__raw__":
            raise InvalidQueryError(
                f"{where}: __raw__ filters are not taken here; write each operator as a "
                "suffix (gallery_id__ne=None, size__gt=1000, Q(a=1) | Q(b=2)). For what "
                "suffixes cannot say ($expr, $text), query the catalogue collection "
                "with PyMongo."
            )
        entry_key = _entry_key(key.split("__"), bare, f"{where} {key!r}", names)
        check_condition(entry_key, value, f"{where} {key!r}")
        return entry_key

    query: dict[str, Any] = _translate(tree, rename).to_query(_CatalogueEntry)
    return query


def entry_sort(
    keys: Iterable[str],
    bare: str | None = None,
    names: Mapping[str, tuple[str, ...]] | None = None,
) -> list[tuple[str, int]]:
    """``["-size", "gallery_id"]`` as ``[("length", -1), ("metadata.gallery_id", 1)]``
    (with ``bare="metadata"``)."""
    sort: list[tuple[str, int]] = []
    for key in keys:
        if not isinstance(key, str) or not key.lstrip("+-"):
            raise ValueError(f"sort keys are names such as 'uploaded' or '-size', not {key!r}")
        name = key.lstrip("+-")
        path = _entry_key(name.split("__"), bare, f"sort key {key!r}", names).split("__")
        db_path = ".".join(path)
        sort.append((db_path, -1 if key.startswith("-") else 1))
    return sort


# -- documents by their files ------------------------------------------------------


class FileMatch:
    """A placeholder for ``{"$in": <ids of the files matching entry_query>}``.

    :ivar path: the dotted path of the file ids in the documents (``photo``).
    :ivar field: the ``FileField``.
    :ivar alias: the connection alias of its catalogue.
    :ivar entry_query: the filter on the catalogue's entries.
    """

    __slots__ = ("alias", "entry_query", "field", "path")

    def __init__(
        self, path: str, field: FileField, alias: str, entry_query: dict[str, Any]
    ) -> None:
        self.path = path
        self.field = field
        self.alias = alias
        self.entry_query = entry_query

    def __repr__(self) -> str:
        return (
            f"FileMatch({self.field.storage.collection_name!r}.files, {self.entry_query!r})"
        )

    @property
    def files(self) -> Any:
        """The catalogue collection."""
        return get_db(self.alias)[f"{self.field.storage.collection_name}.files"]

    async def ids(self, limit: int = 0, among: list[Any] | None = None) -> list[Any] | None:
        """The ids of the matching files (one query on the catalogue), only those
        ``among`` these if given; ``None`` when there are more than ``limit`` (> 0)."""
        query = self.entry_query
        if among is not None:
            # Flat, _id first: SecantusDB reads a nested $and without an index.
            query = {"_id": {"$in": among}, **self.entry_query}
            if "_id" in self.entry_query:
                query = {"$and": [{"_id": {"$in": among}}, self.entry_query]}
        cursor = self.files.find(query, {"_id": 1}, limit=limit + 1 if limit else 0)
        found = [doc["_id"] async for doc in cursor]
        return None if limit and len(found) > limit else found


def _file_path(document: Any, key: str) -> tuple[str, FileField, list[str]] | None:
    """``(db path, file field, entry parts)`` when ``key`` is a condition on a file's
    entry (``photo__length__gt``, ``pictures__image__content_type``), else ``None``."""
    parts = key.split("__")
    fields = document._fields
    path: list[str] = []
    for index, part in enumerate(parts):
        field = fields.get(part)
        if field is None:
            return None
        path.append(field.db_field)
        listed = False
        while isinstance(field, ListField) and field.field is not None:
            field, listed = field.field, True
        if isinstance(field, FileField):
            rest = parts[index + 1 :]
            # ``size`` is the file's on a FileField, the list's ($size) on a list of them.
            if not rest or (rest[0] in _OPERATORS and (listed or rest[0] != "size")):
                return None  # a condition on the stored id (photo__in=[...]), as ever
            return ".".join(path), field, rest
        if isinstance(field, EmbeddedDocumentField):
            fields = field.document_type._fields
            continue
        return None
    return None


def has_file_conditions(document: Any, node: QNode) -> bool:
    """Whether a leaf of the ``Q`` tree ``node`` has a condition on a file's entry.

    Cheap for the common query: for a class without file fields, or keys whose
    first part names none, the answer comes from a cached set of names.

    The file conditions found are checked on the way, so a bad one is refused
    when the queryset is made, not when it runs.

    :raises InvalidQueryError: as :func:`mark_file_conditions`.
    """
    holders = fields_with_files(document)
    if not holders:
        return False
    if isinstance(node, QCombination):
        # Every child, not the first that has one: each gets checked.
        return any([has_file_conditions(document, child) for child in node.children])
    if not isinstance(node, Q):
        return False
    any_found = False
    for key, value in node.query.items():
        if key.split("__", 1)[0] not in holders:
            continue
        file_path = _file_path(document, key)
        if file_path is not None:
            where = f"{document.__name__} query {key!r}"
            check_condition(_entry_key(file_path[2], None, where), value, where)
            any_found = True
    return any_found


def mark_file_conditions(node: QNode, document: Any) -> QNode:
    """A copy of the ``Q`` tree with each leaf's file conditions replaced by
    :class:`FileMatch` placeholders (conditions on one field in one leaf: one
    placeholder, so they hold for the same file).

    :raises InvalidQueryError: a condition names no part of a catalogue entry, or
        its value is an operator document or the wrong type (:func:`check_condition`).
    """
    if isinstance(node, QCombination):
        children = [mark_file_conditions(child, document) for child in node.children]
        return QCombination(node.operation, children)
    if not isinstance(node, Q):
        return node
    plain: dict[str, Any] = {}
    by_field: dict[str, tuple[FileField, dict[str, Any]]] = {}
    for key, value in node.query.items():
        found = None if key == "__raw__" else _file_path(document, key)
        if found is None:
            plain[key] = value
            continue
        db_path, field, rest = found
        where = f"{document.__name__} query {key!r}"
        entry_key = _entry_key(rest, None, where)
        check_condition(entry_key, value, where)
        by_field.setdefault(db_path, (field, {}))[1][entry_key] = value
    if not by_field:
        return node
    alias = document._meta.get("db_alias") or DEFAULT_ALIAS
    raw: list[dict[str, Any]] = []
    if "__raw__" in plain:
        raw.append(plain.pop("__raw__"))
    for db_path, (field, entry_keys) in by_field.items():
        query = transform.query(_CatalogueEntry, **entry_keys)
        raw.append({db_path: FileMatch(db_path, field, field.db_alias or alias, query)})
    return Q(**plain, __raw__={"$and": raw})


_LOGICAL = frozenset({"$and", "$or", "$nor"})


def _has_match(value: Any) -> bool:
    if isinstance(value, FileMatch):
        return True
    if isinstance(value, dict):
        return any(_has_match(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_match(v) for v in value)
    return False


#: The longest id list sent without looking for a shorter one; and how many
#: documents the rest of a query may match for a file condition to be asked about
#: their files only (see :func:`resolve_filter`).
LONG_LIST = 1000


def _conjuncts(query: Any) -> list[FileMatch]:
    """The placeholders that must hold for every match of ``query`` (those in its
    top-level conjunction: its keys and its ``$and`` clauses, not ``$or``/``$nor``)."""
    found: list[FileMatch] = []
    if isinstance(query, dict):
        for key, value in query.items():
            if isinstance(value, FileMatch):
                found.append(value)
            elif key == "$and" and isinstance(value, list):
                for clause in value:
                    found += _conjuncts(clause)
    return found


def _replaced(value: Any, match: FileMatch, by: Any) -> Any:
    """``value`` with ``match`` (by identity) replaced by ``by``."""
    if value is match:
        return by
    if isinstance(value, dict):
        return {k: _replaced(v, match, by) for k, v in value.items()}
    if isinstance(value, list):
        return [_replaced(v, match, by) for v in value]
    return value


def _values_at(doc: Any, path: list[str]) -> list[Any]:
    """The values at a dotted path of a document, through lists."""
    if isinstance(doc, list):
        return [v for item in doc for v in _values_at(item, path)]
    if not path:
        return [doc]
    if not isinstance(doc, dict) or path[0] not in doc:
        return []
    return _values_at(doc[path[0]], path[1:])


async def resolve_filter(collection: Any, query: Any) -> Any:
    """``query`` with every :class:`FileMatch` as ``{"$in": ids}``: the two steps.

    The catalogue gives the ids of the matching files first (an index scan when
    it has an index for the condition). When there are more than
    :data:`LONG_LIST` and the condition must hold for every match (it is not
    under ``$or``), the documents matching the rest of the query are looked up
    (with a limit): if they are at most :data:`LONG_LIST`, only their files are
    asked about. The server gets the shorter id list: a long ``$in`` costs
    SecantusDB time for every document it tests (measured: :doc:`/performance`).
    """
    cache: dict[int, Any] = {}
    for match in _conjuncts(query):
        ids = await match.ids(limit=LONG_LIST)
        if ids is None:
            rest = _flatten(await _resolve(_replaced(query, match, {"$exists": True}), {}))
            docs: list[Any] = []
            if rest != {match.path: {"$exists": True}}:  # the documents have conditions
                cursor = collection.find(rest, {match.path: 1}, limit=LONG_LIST + 1)
                docs = [doc async for doc in cursor]
            if docs and len(docs) <= LONG_LIST:
                path = match.path.split(".")
                referenced = list({v: None for d in docs for v in _values_at(d, path)})
                ids = await match.ids(among=referenced)
            else:
                ids = await match.ids()
        cache[id(match)] = {"$in": ids}
    return _flatten(await _resolve(query, cache))


def _flatten(query: Any) -> Any:
    """``{"a": 1, "$and": [{"b": 2}]}`` as ``{"a": 1, "b": 2}``: the same filter,
    which SecantusDB plans with its indexes (a nested ``$and`` it scans: 3.9 s
    against 60 ms on 20,000 documents). Clauses whose keys are taken stay."""
    if not isinstance(query, dict) or not isinstance(query.get("$and"), list):
        return query
    flat = {k: v for k, v in query.items() if k != "$and"}
    kept: list[Any] = []
    for clause in query["$and"]:
        clause = _flatten(clause)
        if isinstance(clause, dict) and clause and not set(clause) & set(flat):
            flat.update(clause)
        else:
            kept.append(clause)
    if kept:
        flat["$and"] = kept
    return flat


async def _resolve(value: Any, cache: dict[int, Any]) -> Any:
    """``value`` (a filter, or part of one) with every FileMatch as ``{"$in": ids}``.

    The ``$in`` conditions go after the others of their level: a server that
    evaluates conditions in order (SecantusDB) then compares a document against
    the list of ids only once its cheap conditions passed (it was 45 times slower
    the other way round, for 2,000 documents and 1,800 ids).
    """
    if isinstance(value, FileMatch):
        key = id(value)
        if key not in cache:
            cache[key] = {"$in": await value.ids()}
        return cache[key]
    if isinstance(value, dict):
        # Only keys holding a placeholder move (stable sort): a $sort or $project
        # spec keeps its order.
        items = sorted(value.items(), key=lambda item: _has_match(item[1]))
        resolved: dict[str, Any] = {}
        for key, item in items:
            if key in _LOGICAL and isinstance(item, list):
                item = sorted(item, key=_has_match)  # the clauses of $and: order is free
            resolved[key] = await _resolve(item, cache)
        return resolved
    if isinstance(value, list):
        return [await _resolve(v, cache) for v in value]  # a pipeline keeps its order
    return value


def _refuse_upsert(kwargs: Mapping[str, Any], what: str) -> None:
    if kwargs.get("upsert"):
        raise InvalidQueryError(
            f"{what} with upsert cannot build a document from conditions on a file's "
            "catalogue entry (photo__length__gt...): filter on the document's own fields, "
            "or look the document up first"
        )


class _ResolvingCursor:
    """A find cursor whose filter is resolved at its first use (no I/O before)."""

    def __init__(self, collection: Any, query: Any, kwargs: dict[str, Any]) -> None:
        self._collection = collection
        self._query = query
        self._kwargs = kwargs
        self._cursor: Any = None

    async def _real(self) -> Any:
        if self._cursor is None:
            query = await resolve_filter(self._collection, self._query)
            self._cursor = self._collection.find(query, **self._kwargs)
        return self._cursor

    async def to_list(self, length: int | None = None) -> list[Any]:
        cursor = await self._real()
        return list(await cursor.to_list(length))

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Any]:
        async for doc in await self._real():
            yield doc

    async def explain(self) -> Any:
        return await (await self._real()).explain()

    async def close(self) -> None:
        if self._cursor is not None:
            result = self._cursor.close()
            if inspect.isawaitable(result):
                await result


class ResolvingCollection:
    """A collection whose commands resolve :class:`FileMatch` placeholders first.

    Everything else is the wrapped collection's.
    """

    def __init__(self, collection: Any) -> None:
        self._collection = collection

    def __getattr__(self, name: str) -> Any:
        return getattr(self._collection, name)

    async def _filter(self, query: Any) -> Any:
        return await resolve_filter(self._collection, query)

    def with_options(self, **kwargs: Any) -> ResolvingCollection:
        return ResolvingCollection(self._collection.with_options(**kwargs))

    def find(self, query: Any = None, *args: Any, **kwargs: Any) -> _ResolvingCursor:
        if args:
            kwargs["projection"] = args[0]
        return _ResolvingCursor(self._collection, query or {}, kwargs)

    async def find_one(self, query: Any = None, *args: Any, **kwargs: Any) -> Any:
        return await self._collection.find_one(await self._filter(query or {}), *args, **kwargs)

    async def count_documents(self, query: Any, **kwargs: Any) -> int:
        return int(await self._collection.count_documents(await self._filter(query), **kwargs))

    async def distinct(self, key: str, query: Any = None, **kwargs: Any) -> Any:
        return await self._collection.distinct(key, await self._filter(query or {}), **kwargs)

    async def aggregate(self, pipeline: Sequence[Any], **kwargs: Any) -> Any:
        stages = list(pipeline)
        if stages and isinstance(stages[0], dict) and "$match" in stages[0]:
            stages[0] = {"$match": await self._filter(stages[0]["$match"])}
        cursor = self._collection.aggregate(await _resolve(stages, {}), **kwargs)
        return await cursor if inspect.isawaitable(cursor) else cursor

    async def update_many(self, query: Any, update: Any, **kwargs: Any) -> Any:
        _refuse_upsert(kwargs, "update()")
        return await self._collection.update_many(await self._filter(query), update, **kwargs)

    async def update_one(self, query: Any, update: Any, **kwargs: Any) -> Any:
        _refuse_upsert(kwargs, "update_one()")
        return await self._collection.update_one(await self._filter(query), update, **kwargs)

    async def find_one_and_update(self, query: Any, update: Any, **kwargs: Any) -> Any:
        _refuse_upsert(kwargs, "modify() or upsert_one()")
        return await self._collection.find_one_and_update(
            await self._filter(query), update, **kwargs
        )

    async def find_one_and_delete(self, query: Any, **kwargs: Any) -> Any:
        return await self._collection.find_one_and_delete(await self._filter(query), **kwargs)

    async def delete_many(self, query: Any, **kwargs: Any) -> Any:
        return await self._collection.delete_many(await self._filter(query), **kwargs)

    async def delete_one(self, query: Any, **kwargs: Any) -> Any:
        return await self._collection.delete_one(await self._filter(query), **kwargs)
