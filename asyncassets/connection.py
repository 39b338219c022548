"""Connections by alias: :func:`connect`, :func:`disconnect`, :func:`get_db`.

A connection is registered under an alias (``"default"`` unless told otherwise);
documents pick theirs with ``meta = {"db_alias": "..."}`` as in mongoengine.

PyMongo's ``AsyncMongoClient`` is bound to the event loop it first runs in. When
asyncassets made the client itself (``connect(host=...)``), it makes a fresh one
for each event loop, so code that runs several loops in turn (pytest-asyncio makes
one per test) never meets a client bound to a dead loop. A client you built and
handed over with ``connect(client=...)`` is yours: asyncassets cannot rebuild it,
so using it from a second loop raises :class:`~asyncassets.errors.WrongEventLoop`.
"""

from __future__ import annotations

import asyncio
import weakref
from dataclasses import dataclass, field
from typing import Any

from . import _driver
from .errors import ConnectionNotRegistered, WrongEventLoop

__all__ = [
    "DEFAULT_ALIAS",
    "DEFAULT_DB",
    "connect",
    "disconnect",
    "disconnect_all",
    "get_client",
    "get_db",
    "registered_aliases",
]

DEFAULT_ALIAS = "default"
#: Database used when neither the URI nor ``db=`` names one.
DEFAULT_DB = "asyncassets"


@dataclass
class _Connection:
    alias: str
    db_name: str
    host: str | None
    kwargs: dict[str, Any]
    #: A client the caller handed over; never rebuilt, never closed by us.
    given: Any = None
    #: Clients asyncassets built, one per event loop (None: made outside a loop).
    clients: dict[int, tuple[Any, weakref.ref[asyncio.AbstractEventLoop] | None]] = field(
        default_factory=dict
    )
    given_loop: weakref.ref[asyncio.AbstractEventLoop] | None = None


_connections: dict[str, _Connection] = {}


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _db_name_from(host: str | None, db: str | None) -> str:
    if db:
        return db
    if host and "://" in host:
        # PyMongo's parser (an unescaped '/' in a password must not make the
        # database name), without the DNS lookup of mongodb+srv:// names, which is
        # blocking I/O the client defers to its first connection.
        name = _driver.parse_uri(host).get("database")
        if name:
            return str(name)
    return DEFAULT_DB


def connect(
    host: str | None = None,
    alias: str = DEFAULT_ALIAS,
    *,
    db: str | None = None,
    client: Any = None,
    **client_kwargs: Any,
) -> Any:
    """Register a connection under ``alias`` and return its client.

    No I/O happens here: a server that is down makes the first database call fail
    (after ``serverSelectionTimeoutMS``), with the driver's error.

    :param host: a MongoDB URI such as ``"mongodb://127.0.0.1:27017/mydb"``.
    :param alias: the name documents use in ``meta = {"db_alias": ...}``.
    :param db: the database name; defaults to the URI's, else ``"asyncassets"``.
    :param client: an existing ``pymongo.AsyncMongoClient`` or Motor
        ``AsyncIOMotorClient`` to use instead of building one from ``host``.
    :param client_kwargs: passed to ``AsyncMongoClient`` (e.g. ``tz_aware=True``).
    :raises ValueError: both ``host`` and ``client`` were given, or ``alias`` is
        already registered with different settings.
    :raises TypeError: ``client`` is not an async client.

    >>> import asyncassets
    >>> client = asyncassets.connect("mongodb://127.0.0.1:27017/zoo")
    """
    if client is not None and (host is not None or client_kwargs):
        raise ValueError("connect() takes either client= or host=/client options, not both.")
    if client is not None:
        _driver.validate_client(client)
        # get_default_database does no I/O, and both drivers have it.
        db_name = db or str(client.get_default_database(DEFAULT_DB).name)
    else:
        db_name = _db_name_from(host, db)

    existing = _connections.get(alias)
    if existing is not None:
        same = (
            existing.given is client
            and existing.host == host
            and existing.kwargs == client_kwargs
            and existing.db_name == db_name
        )
        if same:
            return get_client(alias)
        raise ValueError(
            f"A different connection is already registered as {alias!r}. "
            f"Call `await asyncassets.disconnect({alias!r})` first, or pick another alias."
        )

    _connections[alias] = _Connection(
        alias=alias, db_name=db_name, host=host, kwargs=dict(client_kwargs), given=client
    )
    return get_client(alias)


def _lookup(alias: str) -> _Connection:
    try:
        return _connections[alias]
    except KeyError:
        known = ", ".join(repr(a) for a in _connections) or "none"
        raise ConnectionNotRegistered(
            f"No connection registered as {alias!r} (registered: {known}). "
            f"Call asyncassets.connect(host=..., alias={alias!r}) first."
        ) from None


def get_client(alias: str = DEFAULT_ALIAS) -> Any:
    """Return the client registered under ``alias`` for the running event loop."""
    conn = _lookup(alias)
    loop = _running_loop()
    if conn.given is not None:
        if loop is not None:
            if conn.given_loop is None:
                conn.given_loop = weakref.ref(loop)
            elif conn.given_loop() is not loop:
                raise WrongEventLoop(
                    f"The client registered as {alias!r} belongs to another event loop. "
                    "Pass host= to connect() so asyncassets builds one client per loop, "
                    "or connect a new client inside this loop."
                )
        return conn.given

    key = id(loop) if loop is not None else 0
    entry = conn.clients.get(key)
    if entry is not None:
        client, loop_ref = entry
        if loop_ref is None or loop_ref() is loop:
            return client
        # id() reused by a new loop after the old one was collected: stale entry.
    if loop is not None and 0 in conn.clients:
        # A client built outside any loop is claimed by the first loop that uses it.
        client, _ = conn.clients.pop(0)
    else:
        client = _driver.make_client(conn.host, conn.kwargs)
    # Forget clients of loops that are gone; they cannot be closed from here.
    for k, (_, ref) in list(conn.clients.items()):
        if ref is None:
            continue
        old_loop = ref()
        if old_loop is None or old_loop.is_closed():
            del conn.clients[k]
    conn.clients[key] = (client, weakref.ref(loop) if loop is not None else None)
    return client


def get_db(alias: str = DEFAULT_ALIAS) -> Any:
    """Return the async database registered under ``alias``.

    :raises ConnectionNotRegistered: nothing was registered under ``alias``.
    """
    conn = _lookup(alias)
    return get_client(alias)[conn.db_name]


def registered_aliases() -> list[str]:
    """The aliases currently registered, in registration order."""
    return list(_connections)


async def disconnect(alias: str = DEFAULT_ALIAS) -> None:
    """Forget ``alias`` and close the clients asyncassets built for it.

    A client handed over with ``connect(client=...)`` is left open: its owner
    closes it. Disconnecting an alias that is not registered does nothing.
    """
    conn = _connections.pop(alias, None)
    if conn is None:
        return
    loop = _running_loop()
    for client, ref in conn.clients.values():
        owner = ref() if ref is not None else None
        if owner is None or owner is loop:
            await _driver.close_client(client)


async def disconnect_all() -> None:
    """Disconnect every registered alias."""
    for alias in list(_connections):
        await disconnect(alias)
