"""The one schema walker: which declared paths of a document class hold files.

Cascade deletes, ``QuerySet.load_files``, the orphan sweep, the check and the
reference writer all ask this module, so they cannot disagree about where files
are: top level, lists, dicts, ``EmbeddedDocumentField``,
``EmbeddedDocumentListField`` and ``GenericEmbeddedDocumentField`` (any embedded
class it allows, or every registered one), at any depth.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
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

from .connection import DEFAULT_ALIAS
from .errors import StorageConflict
from .fields import FileField
from .storage import Storage

__all__ = [
    "DeclaredStorages",
    "add_declarations",
    "all_embedded",
    "cascade_fields",
    "check_declared_storages",
    "class_and_subclasses",
    "declared_file_storages",
    "document_classes",
    "embedded_classes",
    "fields_with_files",
    "file_field_names",
    "file_paths",
    "holds_files",
    "storage_conflict",
]

#: ``{(alias, collection_name): {storage: [who declares it]}}``: the storage each
#: declaration (``Class.path`` of a field, or an asset manager) gives a catalogue.
DeclaredStorages = dict[tuple[str, str], dict[Storage, list[str]]]

#: Declarations of catalogues made by other things than document classes (the
#: asset managers, :mod:`asyncassets.assets`, which sits above this module).
_other_declarations: list[Callable[[], DeclaredStorages]] = []


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
        and not cls.__dict__.get("_asyncassets_refused")
        and not cls.__dict__.get("_asyncassets_forgotten")
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
    """Top-level fields of ``doc_cls`` and its subclasses that can hold files.

    A ``FileField``, a list or dict of them, or an embedded document (or a list of
    them) with one at any depth: what ``QuerySet.load_files`` takes.
    """
    names: dict[str, None] = {}
    for cls in class_and_subclasses(doc_cls):
        names.update(dict.fromkeys(fields_with_files(cls)))
    return list(names)


# -- which storage each catalogue has --------------------------------------------------


def _declared_by(cls: Any, into: DeclaredStorages) -> None:
    """Add the catalogues the file fields of document class ``cls`` declare."""
    doc_alias = cls._meta.get("db_alias") or DEFAULT_ALIAS
    for top in cls._fields.values():
        for segments, _queryable, file_field in file_paths(top):
            target = (file_field.db_alias or doc_alias, file_field.collection_name)
            names = into.setdefault(target, {}).setdefault(file_field.storage, [])
            name = f"{cls._class_name}.{'.'.join(segments)}"
            if name not in names:
                names.append(name)


def add_declarations(source: Callable[[], DeclaredStorages]) -> None:
    """Count the catalogues ``source()`` declares, besides the document classes'
    (how :mod:`asyncassets.assets` adds its managers'), in
    :func:`declared_file_storages` and :func:`check_declared_storages`."""
    if source not in _other_declarations:
        _other_declarations.append(source)


def declared_file_storages(exclude: Any = None) -> DeclaredStorages:
    """The storages the registered document classes and the other declarations
    (asset managers) give each catalogue, and who gives them.

    ``exclude``: a document class left out, with any class of the same module and
    name (an earlier version of it, from a module reloaded).
    """
    same = (exclude.__module__, exclude.__qualname__) if exclude is not None else None
    found: DeclaredStorages = {}
    for cls in document_classes():
        if cls is not exclude and (cls.__module__, cls.__qualname__) != same:
            _declared_by(cls, found)
    for source in _other_declarations:
        for target, declared in source().items():
            for storage, labels in declared.items():
                known = found.setdefault(target, {}).setdefault(storage, [])
                known.extend(label for label in labels if label not in known)
    return found


def storage_conflict(
    target: tuple[str, str], declared: dict[Storage, list[str]], *, hint: str = ""
) -> StorageConflict:
    """The error for catalogue ``target`` declared with the storages ``declared``."""
    alias, name = target
    who = "; ".join(
        f"{', '.join(labels)} {'declare' if len(labels) > 1 else 'declares'} {storage!r}"
        for storage, labels in declared.items()
    )
    return StorageConflict(
        f"catalogue {name!r} (alias {alias!r}) is declared with different storages: "
        f"{who}. One catalogue belongs to one storage: give the fields equal storages, "
        f"or one of them another collection_name{hint}"
    )


def check_declared_storages(new: Any) -> None:
    """Refuse a declaration that gives a catalogue another storage than it has.

    ``new`` is a document class being declared. Its file fields are compared with
    each other, with every other registered class and with the asset managers;
    a class of the same module and name as ``new`` is taken to be an earlier
    version of it (a module reloaded) and is left out.

    :raises StorageConflict: a catalogue would have two storages; the message
        names the declarations and what to write.
    """
    mine: DeclaredStorages = {}
    _declared_by(new, mine)
    if not mine:
        return
    others = declared_file_storages(exclude=new)
    for target, declared in sorted(mine.items()):
        merged = {storage: list(labels) for storage, labels in others.get(target, {}).items()}
        for storage, labels in declared.items():
            merged.setdefault(storage, []).extend(labels)
        if len(merged) > 1:
            known = others.get(target, {})
            _storage, labels = next(
                ((s, ls) for s, ls in declared.items() if s not in known),
                next(iter(declared.items())),
            )
            suggestion = f"{target[1]}_{labels[0].rsplit('.', 1)[-1]}"
            hint = f" (say, collection_name={suggestion!r} for the storage of {labels[0]})"
            raise storage_conflict(target, merged, hint=hint)
