"""The one schema walker: which declared paths of a document class hold files.

Cascade deletes, ``QuerySet.load_files``, the orphan sweep, the check and the
reference writer all ask this module, so they cannot disagree about where files
are: top level, lists, dicts, ``EmbeddedDocumentField``,
``EmbeddedDocumentListField`` and ``GenericEmbeddedDocumentField`` (any embedded
class it allows, or every registered one), at any depth.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import Any

import mongoengine
from mongoengine.base import BaseDocument
from mongoengine.base.common import _document_registry
from mongoengine.fields import (
    DictField,
    EmbeddedDocumentField,
    GenericEmbeddedDocumentField,
    ListField,
)

from .fields import FileField

__all__ = [
    "all_embedded",
    "cascade_fields",
    "class_and_subclasses",
    "document_classes",
    "embedded_classes",
    "fields_with_files",
    "file_field_names",
    "file_paths",
    "holds_files",
]


def document_classes() -> list[Any]:
    """Every non-abstract asyncassets Document class alive in this process.

    mongoengine's registry keeps one class per name, so a class shadowed by another
    of the same name would be missed; walking ``__subclasses__`` finds those too.
    asyncassets documents are told from plain mongoengine ones by the method their
    file proxies call to switch references (this module sits below
    :mod:`asyncassets.document` and does not import it).
    """
    found: dict[int, Any] = {}
    stack: list[Any] = [mongoengine.Document]
    while stack:
        cls = stack.pop()
        for sub in cls.__subclasses__():
            if id(sub) not in found:
                found[id(sub)] = sub
                stack.append(sub)
    for cls in list(_document_registry.values()):
        if isinstance(cls, type) and issubclass(cls, mongoengine.Document):
            found.setdefault(id(cls), cls)
    return [
        cls
        for cls in found.values()
        if hasattr(cls, "_switch_file_reference")
        and not cls._meta.get("abstract")
        and cls._get_collection_name()
    ]


def embedded_classes(doc_type: Any) -> list[Any]:
    """``doc_type`` (a document class) and every class derived from it."""
    if not isinstance(doc_type, type) or not issubclass(doc_type, BaseDocument):
        return []
    classes: dict[int, Any] = {id(doc_type): doc_type}
    stack: list[Any] = [doc_type]
    while stack:
        for sub in stack.pop().__subclasses__():
            if id(sub) not in classes:
                classes[id(sub)] = sub
                stack.append(sub)
    return list(classes.values())


def all_embedded() -> list[Any]:
    """Every registered embedded class (what a bare GenericEmbeddedDocumentField holds)."""
    from mongoengine import EmbeddedDocument

    return [
        cls for cls in list(_document_registry.values())
        if isinstance(cls, type) and issubclass(cls, EmbeddedDocument)
    ]


def _paths(
    fld: Any,
    segments: tuple[str, ...],
    queryable: bool,
    in_list: bool,
    seen: frozenset[int],
) -> Iterator[tuple[tuple[str, ...], bool, Any]]:
    """Yield ``(segments, queryable, file field)`` for every FileField under ``fld``."""
    from .fields import FileField

    if isinstance(fld, FileField):
        yield segments, queryable, fld
    elif isinstance(fld, ListField):
        inner = getattr(fld, "field", None)
        if inner is not None:
            # MongoDB matches elements of an array, not elements of an array in an array.
            yield from _paths(inner, segments, queryable and not in_list, True, seen)
    elif isinstance(fld, DictField):
        inner = getattr(fld, "field", None)
        if inner is not None:
            yield from _paths(inner, (*segments, "*"), False, False, seen)
    elif isinstance(fld, (EmbeddedDocumentField, GenericEmbeddedDocumentField)):
        if isinstance(fld, EmbeddedDocumentField):
            classes = embedded_classes(fld.document_type)
        else:
            # Any embedded class may sit there: the ones allowed, else every one.
            classes = [c for t in (fld.choices or all_embedded()) for c in embedded_classes(t)]
        for cls in classes:
            if id(cls) in seen:
                continue
            for sub in cls._fields.values():
                yield from _paths(
                    sub, (*segments, sub.db_field), queryable, False, seen | {id(cls)}
                )


def file_paths(top: Any) -> Iterator[tuple[tuple[str, ...], bool, FileField]]:
    """Yield ``(segments, queryable, file field)`` for every FileField under field ``top``.

    ``segments`` are db field names from the document's root (``"*"`` stands for
    any key of a dict; list levels are implicit, as in MongoDB's dotted paths);
    ``queryable`` tells whether ``{dotted: {"$in": ids}}`` finds every reference.
    """
    yield from _paths(top, (top.db_field,), True, False, frozenset())


def class_and_subclasses(doc_cls: Any) -> list[Any]:
    """``doc_cls`` and every class derived from it (``allow_inheritance``)."""
    return embedded_classes(doc_cls) or [doc_cls]


# holds_files() runs for every document built; its answer changes only when a new
# class is declared (a subclass, or an embedded class a generic field may hold), so
# it is cached per class along with the registry size it was computed at.
_holds_files: weakref.WeakKeyDictionary[Any, tuple[int, bool]] = weakref.WeakKeyDictionary()


def holds_files(doc_cls: Any) -> bool:
    """Whether instances of ``doc_cls`` (or a subclass) can hold a file anywhere."""
    generation = len(_document_registry)
    cached = _holds_files.get(doc_cls)
    if cached is not None and cached[0] == generation:
        return cached[1]
    found = any(
        True for cls in class_and_subclasses(doc_cls) for top in cls._fields.values()
        for _ in file_paths(top)
    )
    _holds_files[doc_cls] = (generation, found)
    return found


_fields_with_files: weakref.WeakKeyDictionary[Any, tuple[int, tuple[str, ...]]] = (
    weakref.WeakKeyDictionary()
)


def fields_with_files(doc_cls: Any) -> tuple[str, ...]:
    """Names of the fields of ``doc_cls`` itself (not subclasses) that can hold files.

    Cached per class, like :func:`holds_files`: the walk over a document's values
    (binding, cascade) skips every other field.
    """
    generation = len(_document_registry)
    cached = _fields_with_files.get(doc_cls)
    if cached is not None and cached[0] == generation:
        return cached[1]
    names = tuple(
        name for name, top in doc_cls._fields.items() if any(True for _ in file_paths(top))
    )
    _fields_with_files[doc_cls] = (generation, names)
    return names


def cascade_fields(doc_cls: Any) -> tuple[str, ...]:
    """Top-level db field names (of the class and its subclasses) holding cascading files.

    Not cached: a subclass declared later (``allow_inheritance``) must count too.
    """
    names: dict[str, None] = {}
    for cls in class_and_subclasses(doc_cls):
        for top in cls._fields.values():
            if any(field.cascade for _s, _q, field in file_paths(top)):
                names[top.db_field] = None
    return tuple(names)


def file_field_names(doc_cls: Any) -> list[str]:
    """Top-level fields that are a ``FileField`` or a list/dict of them."""
    names = []
    for name, field in doc_cls._fields.items():
        inner = getattr(field, "field", None)
        if isinstance(field, FileField) or isinstance(inner, FileField):
            names.append(name)
    return names
