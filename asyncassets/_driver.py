"""The one place where PyMongo's async API and Motor differ.

Everything else in asyncassets talks to collections through the small set of calls
that both drivers share (``await coll.insert_one(...)``, ``coll.find(...)`` with
``async for``, ...). The few calls whose shape differs go through here.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from pymongo import AsyncMongoClient, ReadPreference
from pymongo.write_concern import WriteConcern

__all__ = [
    "acknowledged",
    "aggregate",
    "close_client",
    "is_motor_client",
    "list_indexes",
    "make_client",
    "parse_uri",
    "validate_client",
]


def is_motor_client(client: Any) -> bool:
    """True for a Motor ``AsyncIOMotorClient`` (without importing Motor when absent)."""
    return type(client).__module__.startswith("motor.")


def validate_client(client: Any) -> None:
    """Raise ``TypeError`` unless ``client`` is a client asyncassets can drive."""
    if isinstance(client, AsyncMongoClient) or is_motor_client(client):
        return
    raise TypeError(
        f"connect(client=...) takes a pymongo.AsyncMongoClient or a Motor "
        f"AsyncIOMotorClient, not {type(client).__name__}. A synchronous "
        "pymongo.MongoClient cannot be awaited: pass host= instead."
    )


def make_client(host: str | None, kwargs: Mapping[str, Any]) -> AsyncMongoClient[Any]:
    """Build an ``AsyncMongoClient``; it does no I/O until its first operation."""
    return AsyncMongoClient(host, **kwargs)


async def close_client(client: Any) -> None:
    """Close either driver's client (PyMongo's ``close`` is a coroutine, Motor's is not)."""
    result = client.close()
    if inspect.isawaitable(result):
        await result


async def list_indexes(collection: Any) -> list[dict[str, Any]]:
    """Return a collection's index documents.

    PyMongo's ``list_indexes`` is a coroutine returning a cursor; Motor's returns the
    cursor directly.
    """
    cursor = collection.list_indexes()
    if inspect.isawaitable(cursor):
        cursor = await cursor
    return [index async for index in cursor]


async def aggregate(
    collection: Any, pipeline: Sequence[Mapping[str, Any]], **kwargs: Any
) -> AsyncIterator[dict[str, Any]]:
    """Run an aggregation and yield its documents.

    PyMongo's ``aggregate`` is a coroutine returning a cursor; Motor's returns the
    cursor directly.
    """
    cursor = collection.aggregate(list(pipeline), **kwargs)
    if inspect.isawaitable(cursor):
        cursor = await cursor
    async for document in cursor:
        yield document


def acknowledged(collection: Any) -> Any:
    """``collection`` as the file layer writes and reads it: ``w="majority"``, primary reads.

    Every collection the file layer touches goes through here: GridFS files and
    chunks, catalogues, key reservations, the documents whose references it
    switches or cascades, and the documents the sweep and the check read. On a
    replica set:

    * **Writes are acknowledged by a majority.** A write acknowledged by the
      primary alone is rolled back if the primary fails before a secondary has
      it, while later writes on the new primary stay. An upload whose first
      chunks were rolled back, then referenced by a switch on the new primary,
      would be a dangling reference; a switch rolled back after the old bytes
      were deleted, a lost file. So ``w`` of 0, 1 or unset (the server's
      default, which is 1 on a primary-secondary-arbiter set) becomes
      ``"majority"``; a ``w`` of 2 or more, a tag set, and ``wtimeout`` and ``j``
      are kept as configured. A write-concern error or timeout is an unknown
      outcome, which keeps data (see :mod:`asyncassets.references`). On a
      standalone server ``"majority"`` is the server alone.
    * **Reads go to the primary.** What the file layer reads decides what it
      writes or deletes next (the sweep: which files no document references; a
      reservation: whether a key is free; a read: whether the entry still names
      its bytes). A lagging secondary could show a document from before its
      switch and have the sweep delete the file it references now. A client's
      ``readPreference`` applies to its own queries (``Doc.objects``), not here.

    Both drivers' collections have ``write_concern``, ``read_preference`` and
    ``with_options``.
    """
    options: dict[str, Any] = {}
    concern = getattr(collection, "write_concern", None)
    if concern is not None:
        document = concern.document
        w = document.get("w")
        if w is None or w == 0 or w == 1:
            kept = {key: document[key] for key in ("wtimeout", "j") if key in document}
            options["write_concern"] = WriteConcern(w="majority", **kept)
    preference = getattr(collection, "read_preference", None)
    if preference is not None and preference.mode != ReadPreference.PRIMARY.mode:
        options["read_preference"] = ReadPreference.PRIMARY
    return collection.with_options(**options) if options else collection


def parse_uri(uri: str) -> dict[str, Any]:
    """PyMongo's reading of a MongoDB URI, without network I/O.

    PyMongo's ``parse_uri`` looks a ``mongodb+srv://`` host up in DNS, which is
    blocking I/O that the client itself defers to its first connection. For such
    URIs this calls what PyMongo's client constructor calls: all of the parsing and
    checks, not the lookup (a private PyMongo function, looked up here).

    :raises pymongo.errors.InvalidURI: (a ``ValueError``) ``uri`` is not valid.
    :raises pymongo.errors.ConfigurationError: an option is invalid, or this PyMongo
        cannot check a ``mongodb+srv://`` URI without looking it up.
    """
    from pymongo import uri_parser
    from pymongo.errors import ConfigurationError

    if not uri.lower().startswith("mongodb+srv://"):
        return dict(uri_parser.parse_uri(uri, warn=True))
    try:
        from pymongo.uri_parser_shared import _validate_uri
    except ImportError:  # pragma: no cover - an older PyMongo
        raise ConfigurationError(
            "this PyMongo cannot check a mongodb+srv:// URI without looking it up; "
            "upgrade PyMongo"
        ) from None
    return dict(_validate_uri(uri, None, validate=True, warn=True, normalize=False))
