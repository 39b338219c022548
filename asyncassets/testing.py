"""A pytest plugin: one database server per session, a fresh database per test.

Load it from your top-level ``conftest.py``::

    pytest_plugins = ["asyncassets.testing"]

then ask for a database::

    import pytest

    @pytest.mark.asyncio          # not needed with asyncio_mode = "auto"
    async def test_save(asyncassets_db):
        await asyncassets_db.animals.insert_one({"genus": "Marmota"})
        assert await asyncassets_db.animals.count_documents({}) == 1

Where the server comes from: the ``MONGODB_URI`` environment variable when it
is set (a real ``mongod``, say ``mongodb://127.0.0.1:27017/``), else an
in-memory :class:`~asyncassets.embedded.EmbeddedServer` started at the first
test that needs it and stopped when the session ends (``mongod`` if it is on
``PATH``, else SecantusDB from ``pip install 'asyncassets[embedded]'``).

Fixtures:

``asyncassets_server_uri`` (session)
    The server's URI, as ``MONGODB_URI`` gives it (options and all, a replica
    set's ``?replicaSet=`` say): build a URI for a database of a test's own with
    :func:`database_uri` and :func:`unique_db_name`, not by appending to it.
``asyncassets_server`` (session)
    The :class:`~asyncassets.embedded.EmbeddedServer` itself, for tests that
    stop or ``kill()`` it; they must ``start()`` it again before they end, as
    every other test shares it. Skipped when ``MONGODB_URI`` is set: that
    server is not ours to kill.
    Teardown copes with such a restart: a drop that fails on a connection
    pooled before the kill is tried once more, on a fresh connection.
``asyncassets_db`` (function, async)
    Registers ``asyncassets.connect(alias="default")`` to a database of its own
    with a unique name, yields that database (``asyncassets.get_db()``), then
    drops it and disconnects. Documents without a ``db_alias`` use it.
``asyncassets_connect`` (function, async)
    A factory ``connect_alias(alias) -> database`` that registers another alias,
    each to a fresh database, for documents with ``meta = {"db_alias": ...}``;
    all are dropped and disconnected after the test.

S3 (for :class:`~asyncassets.storage.S3Storage`; needs ``moto[server]``, in
the ``test`` extra): an S3 server is started at the first test that needs one
(``python -m moto.server`` on a free ``127.0.0.1`` port, killed with the test
run even if that dies) and stopped when the session ends, unless the
``S3_ENDPOINT_URL`` environment variable names one to use instead (credentials
then from ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``). moto is given fake
credentials explicitly; ``~/.aws`` is never read.

``asyncassets_s3_endpoint`` (session)
    The S3 server's URL, ``http://127.0.0.1:<port>``.
``asyncassets_s3_server`` (session)
    The moto server itself (``start()``, ``stop()``, ``kill()``, ``restart()``,
    ``endpoint_url``), for tests that kill it mid-upload; ``restart()`` keeps
    the port, and the new server is empty. A test that kills it must start it
    again. Skipped when ``S3_ENDPOINT_URL`` is set.
``asyncassets_s3_bucket`` (function)
    A fresh bucket with a unique name, as an :class:`S3Bucket` (``name``,
    ``endpoint_url``, ``region``, ``access_key_id``, ``secret_access_key``, and
    ``options``, the keyword arguments of ``S3Storage``). Its pending uploads,
    its objects and the bucket itself are deleted after the test.

Document classes declared in a test are forgotten when it ends. The sweep, the
check and ``files_app`` work on every Document class alive in the process, so
a class a test declares (inside the test function, a fixture or a helper,
whose directory is gone after the test or whose catalogue another test gives
another storage) would otherwise be counted by every later test; and declaring
a class whose field gives a catalogue another storage than an earlier class
does is refused (:class:`~asyncassets.errors.StorageConflict`). After each test
the plugin takes out of mongoengine's registry the classes the test added or
replaced there, unless a module holds them as a global (a models module
imported during the test stays imported and registered), then runs the garbage
collector so they are gone. To keep the classes a test declares, mark it
``@pytest.mark.asyncassets_keep_document_classes``; to keep them for the whole
suite, set ``asyncassets_forget_document_classes = false`` in the ``[pytest]``
(or ``[tool.pytest.ini_options]``) configuration.

The async fixtures are declared with ``pytest_asyncio.fixture``, so they work in
pytest-asyncio's ``auto`` and ``strict`` modes alike; in strict mode mark the
tests themselves with ``@pytest.mark.asyncio``. They run in the test's event
loop (the default ``function`` loop scope); PyMongo's async client belongs to
one loop, so a test with another ``loop_scope`` should call
``asyncassets.get_db()`` rather than use a database made in another loop.
"""

from __future__ import annotations

import gc
import os
import re
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio
from mongoengine.base.common import _document_registry
from pymongo.errors import ConnectionFailure

from ._s3server import (
    FAKE_CREDENTIALS,
    S3Server,
    create_bucket,
    delete_bucket,
    environment_credentials,
    unique_bucket_name,
)
from .connection import DEFAULT_ALIAS, connect, disconnect, get_client, get_db, registered_aliases
from .embedded import EmbeddedServer
from .errors import EmbeddedServerError

__all__ = [
    "S3Bucket",
    "asyncassets_connect",
    "asyncassets_db",
    "asyncassets_s3_bucket",
    "asyncassets_s3_endpoint",
    "asyncassets_s3_server",
    "asyncassets_server",
    "asyncassets_server_uri",
    "database_uri",
    "forget_document_classes",
    "unique_db_name",
]

_URI_ENV = "MONGODB_URI"
_S3_ENV = "S3_ENDPOINT_URL"
# MongoDB caps database names at 63 bytes; keep room for the unique suffix.
_MAX_SLUG = 36


def unique_db_name(hint: str = "test") -> str:
    """A database name no other test uses: ``aa_<hint>_<12 hex digits>``.

    ``hint`` (usually the test's name) is cut down to characters MongoDB
    accepts in a database name, so a leftover database says where it came from.
    """
    slug = re.sub(r"[^A-Za-z0-9_]+", "_", hint).strip("_")[:_MAX_SLUG] or "test"
    return f"aa_{slug}_{uuid.uuid4().hex[:12]}"


def database_uri(uri: str, name: str) -> str:
    """``uri`` naming database ``name``, its hosts and options kept.

    For a test that builds its own client or app from the session's server::

        database_uri("mongodb://db1,db2/?replicaSet=rs0", "aa_t_1")
        # 'mongodb://db1,db2/aa_t_1?replicaSet=rs0'

    Appending ``"/" + name`` breaks a ``MONGODB_URI`` that names a database or
    has options (a replica set's ``?replicaSet=``).
    """
    scheme, sep, rest = uri.partition("://")
    if not sep:
        raise ValueError(f"not a MongoDB URI (no scheme://): {uri!r}")
    hosts, _, tail = rest.partition("/")
    query = tail.partition("?")[2] if "?" in tail else ""
    if not tail and "?" in hosts:  # mongodb://host?options, no slash
        hosts, _, query = hosts.partition("?")
    return f"{scheme}://{hosts}/{name}" + (f"?{query}" if query else "")


_FORGET_INI = "asyncassets_forget_document_classes"
_KEEP_MARK = "asyncassets_keep_document_classes"


def pytest_addoption(parser: pytest.Parser) -> None:
    """The ``asyncassets_forget_document_classes`` ini option (default: true)."""
    parser.addini(
        _FORGET_INI,
        "forget the Document classes each test declares when it ends (asyncassets)",
        type="bool",
        default=True,
    )


def pytest_configure(config: pytest.Config) -> None:
    """Register the ``asyncassets_keep_document_classes`` marker."""
    config.addinivalue_line(
        "markers",
        f"{_KEEP_MARK}: keep the Document classes this test declares after it ends",
    )


def _module_global(cls: Any) -> bool:
    """Whether ``cls`` is a global of its module (a models module's class)."""
    module = sys.modules.get(getattr(cls, "__module__", ""))
    return module is not None and vars(module).get(cls.__name__) is cls


def forget_document_classes(before: dict[str, Any]) -> list[str]:
    """Put mongoengine's class registry back as ``before`` had it, but for the
    classes a module holds as globals; return the names taken out or put back.

    What the plugin does after each test (``before`` being a copy of
    ``mongoengine.base.common._document_registry`` taken when the test began).
    """
    changed = {
        name: cls for name, cls in list(_document_registry.items())
        if before.get(name) is not cls and not _module_global(cls)
    }  # fmt: skip
    for name, cls in changed.items():
        if name in before:
            _document_registry[name] = before[name]
        else:
            del _document_registry[name]
        _detach(cls, keep_name=name in before)
    if changed:
        # Classes hold reference cycles: until collected, __subclasses__() still
        # lists them, and the sweep finds classes there too.
        gc.collect()
    return list(changed)


def _detach(cls: Any, *, keep_name: bool) -> None:
    """Undo what declaring ``cls`` did to the classes it derives from.

    mongoengine lists a subclass's name in each base's ``_subclasses`` and makes
    it the owner of the fields they share (``id``, ``_cls``), so a base that is a
    module's global keeps the class alive, and ``__subclasses__()`` (where the
    sweep, the check and ``files_app`` find classes) lists it for good. Marked
    forgotten, it is skipped there whatever still holds it.
    """
    type.__setattr__(cls, "_asyncassets_forgotten", True)
    for base in cls.__mro__[1:]:
        fields = base.__dict__.get("_fields")
        if not isinstance(fields, dict):
            continue
        subclasses = base.__dict__.get("_subclasses")
        if not keep_name and isinstance(subclasses, tuple) and cls._class_name in subclasses:
            kept = tuple(name for name in subclasses if name != cls._class_name)
            type.__setattr__(base, "_subclasses", kept)
        for field in fields.values():
            if getattr(field, "owner_document", None) is cls:
                field.owner_document = base


@pytest.fixture(autouse=True)
def _asyncassets_forget_document_classes(request: pytest.FixtureRequest) -> Iterator[None]:
    """Forget the Document classes the test declared, when it ends (see above)."""
    forget = request.config.getini(_FORGET_INI) and (
        request.node.get_closest_marker(_KEEP_MARK) is None
    )
    before = dict(_document_registry)
    yield
    if forget:
        forget_document_classes(before)


def pytest_report_header(config: pytest.Config) -> str:
    """Say in the session header which server the tests will use."""
    if os.environ.get(_URI_ENV):
        return f"asyncassets: server from ${_URI_ENV}"
    try:
        kind = EmbeddedServer().kind
    except EmbeddedServerError as exc:
        return f"asyncassets: no server available ({exc})"
    return f"asyncassets: in-memory {kind} server, started on first use"


@pytest.fixture(scope="session")
def asyncassets_server() -> Iterator[EmbeddedServer]:
    """The session's in-memory :class:`~asyncassets.embedded.EmbeddedServer`.

    Started on first use, stopped when the session ends. A test that stops or
    kills it must start it again. Skipped when ``MONGODB_URI`` is set.
    """
    if os.environ.get(_URI_ENV):
        pytest.skip(
            f"{_URI_ENV} is set, so the tests use that server, which they do not own "
            "and cannot stop or kill; unset it to run this test on an embedded server."
        )
    server = EmbeddedServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def asyncassets_server_uri(request: pytest.FixtureRequest) -> str:
    """``MONGODB_URI`` when set, else the URI of the session's embedded server."""
    uri = os.environ.get(_URI_ENV)
    if uri:
        return uri
    server: EmbeddedServer = request.getfixturevalue("asyncassets_server")
    return server.uri


async def _drop_and_disconnect(alias: str, db_name: str) -> None:
    try:
        try:
            await get_client(alias).drop_database(db_name)
        except ConnectionFailure:
            # The test killed and restarted the server (the documented pattern): the
            # pooled connection was to the old process. The failure cleared the pool,
            # so a second attempt connects to the new one. A server still down fails
            # again, and that error is the test's.
            await get_client(alias).drop_database(db_name)
    finally:
        await disconnect(alias)


@pytest_asyncio.fixture
async def asyncassets_db(
    asyncassets_server_uri: str, request: pytest.FixtureRequest
) -> AsyncIterator[Any]:
    """A fresh, empty database registered as the ``"default"`` alias.

    Any connection already registered as ``"default"`` (say, by your app at
    import time) is replaced for the test and is gone afterwards. The database
    is dropped and the alias disconnected when the test ends.
    """
    if DEFAULT_ALIAS in registered_aliases():
        await disconnect(DEFAULT_ALIAS)
    name = unique_db_name(request.node.name)
    connect(host=asyncassets_server_uri, alias=DEFAULT_ALIAS, db=name)
    try:
        yield get_db(DEFAULT_ALIAS)
    finally:
        await _drop_and_disconnect(DEFAULT_ALIAS, name)


@pytest_asyncio.fixture
async def asyncassets_connect(
    asyncassets_server_uri: str, request: pytest.FixtureRequest
) -> AsyncIterator[Callable[[str], Any]]:
    """A factory that registers extra aliases, each to a fresh database::

        async def test_two(asyncassets_db, asyncassets_connect):
            archive = asyncassets_connect("archive")   # no await: no I/O yet
            await archive.things.insert_one({"x": 1})

    :raises ValueError: (from the factory) the alias is already registered.
    """
    made: list[tuple[str, str]] = []

    def connect_alias(alias: str) -> Any:
        name = unique_db_name(f"{request.node.name}_{alias}")
        connect(host=asyncassets_server_uri, alias=alias, db=name)
        made.append((alias, name))
        return get_db(alias)

    try:
        yield connect_alias
    finally:
        errors: list[BaseException] = []
        for alias, name in reversed(made):
            try:
                await _drop_and_disconnect(alias, name)
            except Exception as exc:  # one dead alias must not leak the others
                errors.append(exc)
        if errors:
            raise errors[0]


@dataclass(frozen=True)
class S3Bucket:
    """A bucket made for one test by the ``asyncassets_s3_bucket`` fixture."""

    name: str
    endpoint_url: str
    region: str
    access_key_id: str
    secret_access_key: str

    @property
    def options(self) -> dict[str, str]:
        """Keyword arguments for ``S3Storage(**bucket.options)`` (add ``prefix=``...)."""
        return {
            "bucket": self.name,
            "endpoint_url": self.endpoint_url,
            "region": self.region,
            "access_key_id": self.access_key_id,
            "secret_access_key": self.secret_access_key,
        }


@pytest.fixture(scope="session")
def asyncassets_s3_server() -> Iterator[S3Server]:
    """The session's moto S3 server, for tests that kill and restart it.

    Started on first use, stopped when the session ends. Skipped when
    ``S3_ENDPOINT_URL`` is set.
    """
    if os.environ.get(_S3_ENV):
        pytest.skip(
            f"{_S3_ENV} is set, so the tests use that S3 server, which they do not own "
            "and cannot kill; unset it to run this test on a local moto server."
        )
    server = S3Server().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def asyncassets_s3_endpoint(request: pytest.FixtureRequest) -> str:
    """``S3_ENDPOINT_URL`` when set, else the URL of the session's moto server."""
    url = os.environ.get(_S3_ENV)
    if url:
        return url
    server: S3Server = request.getfixturevalue("asyncassets_s3_server")
    return server.endpoint_url


@pytest.fixture
def asyncassets_s3_bucket(
    asyncassets_s3_endpoint: str, request: pytest.FixtureRequest
) -> Iterator[S3Bucket]:
    """A fresh, empty bucket, emptied and deleted after the test."""
    if os.environ.get(_S3_ENV):
        credentials = environment_credentials()
        region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"
    else:
        credentials = dict(FAKE_CREDENTIALS)
        region = "us-east-1"
    bucket = S3Bucket(
        name=unique_bucket_name(request.node.name),
        endpoint_url=asyncassets_s3_endpoint,
        region=region,
        **credentials,
    )
    where = (bucket.endpoint_url, bucket.access_key_id, bucket.secret_access_key, region)
    create_bucket(bucket.name, *where)
    try:
        yield bucket
    finally:
        delete_bucket(bucket.name, *where)
