"""Connections by alias: connect/get_db/disconnect, Motor clients, and event-loop changes."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Iterator

import pymongo
import pytest
from motor.motor_asyncio import AsyncIOMotorClient
from pymongo import AsyncMongoClient
from pymongo.errors import InvalidOperation, ServerSelectionTimeoutError

import asyncassets
from asyncassets import (
    Document,
    NotUniqueError,
    connect,
    disconnect,
    disconnect_all,
    get_client,
    get_db,
)
from asyncassets.connection import DEFAULT_DB, registered_aliases
from asyncassets.errors import AsyncAssetsError, ConnectionNotRegistered, WrongEventLoop
from asyncassets.fields import IntField, StringField
from asyncassets.testing import database_uri, unique_db_name

# Every alias used here starts with "conn_", so cleanup never touches the
# "default" alias of the asyncassets_db fixture; class names start with "Conn"
# so they never clash in mongoengine's global document registry.


class ConnArchived(Document):
    title = StringField()
    meta = {"db_alias": "conn_archive", "collection": "archived"}


class ConnOrphan(Document):
    title = StringField()
    meta = {"db_alias": "conn_nowhere"}


class ConnMotorThing(Document):
    code = StringField(required=True, unique=True)
    count = IntField(default=0)
    kind = StringField()
    meta = {"db_alias": "conn_motor", "collection": "things", "indexes": ["kind"]}


class ConnLoopThing(Document):
    n = IntField()
    meta = {"db_alias": "conn_loops", "collection": "loop_things"}


@pytest.fixture
def closed_port() -> int:
    """A local TCP port that nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _forget_conn_aliases() -> list[str]:
    return [alias for alias in registered_aliases() if alias.startswith("conn_")]


@pytest.fixture
def sync_cleanup() -> Iterator[None]:
    """For sync tests: disconnect every conn_ alias in a loop of its own afterwards."""
    yield
    aliases = _forget_conn_aliases()
    if aliases:

        async def close() -> None:
            for alias in aliases:
                await disconnect(alias)

        asyncio.run(close())


@pytest.fixture
async def cleanup() -> AsyncIterator[None]:
    """For async tests: disconnect every conn_ alias in the test's loop afterwards."""
    yield
    for alias in _forget_conn_aliases():
        await disconnect(alias)


# -- connect: no I/O, database names -----------------------------------------------


def test_connect_returns_client_without_io(closed_port, sync_cleanup):
    started = time.monotonic()
    client = connect(
        host=f"mongodb://127.0.0.1:{closed_port}/nothing",
        alias="conn_down",
        serverSelectionTimeoutMS=500,
    )
    elapsed = time.monotonic() - started

    assert isinstance(client, AsyncMongoClient)
    assert elapsed < 0.25  # no server selection happened
    assert "conn_down" in registered_aliases()


async def test_first_query_to_a_down_server_raises_server_selection_timeout(
    closed_port, cleanup
):
    connect(
        host=f"mongodb://127.0.0.1:{closed_port}/nothing",
        alias="conn_down",
        serverSelectionTimeoutMS=500,
    )

    started = time.monotonic()
    with pytest.raises(ServerSelectionTimeoutError):
        await get_db("conn_down").things.find_one()
    assert time.monotonic() - started < 5

    class ConnDownThing(Document):
        meta = {"db_alias": "conn_down"}

    with pytest.raises(ServerSelectionTimeoutError):  # not swallowed, not wrapped
        await ConnDownThing.objects.first()


def test_db_name_comes_from_uri(closed_port, sync_cleanup):
    connect(host=f"mongodb://127.0.0.1:{closed_port}/fromuri?appname=x", alias="conn_a")
    assert get_db("conn_a").name == "fromuri"


def test_db_name_of_a_uri_whose_password_has_a_slash_is_not_part_of_the_password(
    closed_port, sync_cleanup
):
    # "se/cret" escaped, as PyMongo requires: the database is "zoo", never "cret@...".
    connect(host=f"mongodb://user:se%2Fcret@127.0.0.1:{closed_port}/zoo", alias="conn_a")
    assert get_db("conn_a").name == "zoo"


def test_db_name_of_an_srv_uri_is_read_without_a_dns_lookup(monkeypatch, sync_cleanup):
    def no_dns(*args, **kwargs):
        raise AssertionError("connect() looked a name up in DNS")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    connect(host="mongodb+srv://user:pw@cluster0.example.invalid/zoo", alias="conn_a")
    assert get_db("conn_a").name == "zoo"


def test_db_argument_overrides_uri(closed_port, sync_cleanup):
    connect(host=f"mongodb://127.0.0.1:{closed_port}/fromuri", alias="conn_a", db="explicit")
    assert get_db("conn_a").name == "explicit"


def test_db_name_defaults_when_uri_names_none(closed_port, sync_cleanup):
    connect(host=f"mongodb://127.0.0.1:{closed_port}/", alias="conn_a")
    connect(host=f"mongodb://127.0.0.1:{closed_port}", alias="conn_b")
    connect(alias="conn_c")

    assert DEFAULT_DB == "asyncassets"
    assert get_db("conn_a").name == "asyncassets"
    assert get_db("conn_b").name == "asyncassets"
    assert get_db("conn_c").name == "asyncassets"


def test_connect_with_srv_uri_does_no_dns_lookup(sync_cleanup):
    # PyMongo's own AsyncMongoClient defers SRV resolution to the first operation.
    connect(host="mongodb+srv://cluster0.example.invalid/srvdb", alias="conn_srv")
    assert get_db("conn_srv").name == "srvdb"


def test_client_kwargs_reach_the_client(closed_port, sync_cleanup):
    client = connect(host=f"mongodb://127.0.0.1:{closed_port}/", alias="conn_a", tz_aware=True)
    assert client.codec_options.tz_aware is True


# -- connect(client=...) -----------------------------------------------------------


async def test_connect_with_async_mongo_client_uses_it(asyncassets_server_uri, cleanup):
    name = unique_db_name("conn_given")
    client = AsyncMongoClient(asyncassets_server_uri, serverSelectionTimeoutMS=5000)
    try:
        returned = connect(client=client, alias="conn_given", db=name)

        assert returned is client
        assert get_client("conn_given") is client
        db = get_db("conn_given")
        assert db.name == name
        await db.things.insert_one({"x": 1})
        assert await client[name].things.count_documents({"x": 1}) == 1
    finally:
        await client.drop_database(name)
        await disconnect("conn_given")
        await client.close()


async def test_connect_with_client_takes_db_name_from_its_uri(asyncassets_server_uri, cleanup):
    client = AsyncMongoClient(database_uri(asyncassets_server_uri, "clientdb"))
    try:
        connect(client=client, alias="conn_given")
        assert get_db("conn_given").name == "clientdb"
    finally:
        await client.close()


async def test_connect_with_motor_client_takes_db_name_from_its_uri(
    asyncassets_server_uri, cleanup
):
    client = AsyncIOMotorClient(database_uri(asyncassets_server_uri, "clientdb"))
    try:
        connect(client=client, alias="conn_given")
        assert get_db("conn_given").name == "clientdb"
    finally:
        client.close()


def test_connect_with_sync_mongo_client_raises_type_error(sync_cleanup):
    sync_client = pymongo.MongoClient("mongodb://127.0.0.1:1/", connect=False)
    try:
        with pytest.raises(TypeError, match="MongoClient") as excinfo:
            connect(client=sync_client, alias="conn_sync")
        assert "host=" in str(excinfo.value)  # says what to do instead
        assert "conn_sync" not in registered_aliases()
    finally:
        sync_client.close()


def test_connect_with_something_else_raises_type_error(sync_cleanup):
    with pytest.raises(TypeError, match="dict"):
        connect(client={"host": "localhost"}, alias="conn_bad")
    assert "conn_bad" not in registered_aliases()


def test_connect_with_both_client_and_host_raises_value_error(sync_cleanup):
    client = AsyncMongoClient("mongodb://127.0.0.1:1/")
    with pytest.raises(ValueError, match="either client= or host="):
        connect(host="mongodb://127.0.0.1:1/", client=client, alias="conn_both")
    with pytest.raises(ValueError, match="either client= or host="):
        connect(client=client, alias="conn_both", tz_aware=True)
    assert "conn_both" not in registered_aliases()
    asyncio.run(client.close())


# -- registration by alias ---------------------------------------------------------


async def test_connect_again_with_same_settings_returns_same_client(closed_port, cleanup):
    uri = f"mongodb://127.0.0.1:{closed_port}/"
    first = connect(host=uri, alias="conn_same", db="x", serverSelectionTimeoutMS=500)
    second = connect(host=uri, alias="conn_same", db="x", serverSelectionTimeoutMS=500)

    assert second is first
    assert get_client("conn_same") is first
    assert registered_aliases().count("conn_same") == 1


async def test_connect_again_with_same_given_client_returns_it(cleanup):
    client = AsyncMongoClient("mongodb://127.0.0.1:1/")
    try:
        assert connect(client=client, alias="conn_same", db="x") is client
        assert connect(client=client, alias="conn_same", db="x") is client
    finally:
        await client.close()


@pytest.mark.parametrize(
    "change",
    [
        {"db": "other"},
        {"host": "mongodb://127.0.0.1:2/"},
        {"serverSelectionTimeoutMS": 900},
    ],
    ids=["db", "host", "client-option"],
)
def test_connect_again_with_other_settings_raises_value_error(change, sync_cleanup):
    settings = {"host": "mongodb://127.0.0.1:1/", "db": "x", "serverSelectionTimeoutMS": 500}
    connect(alias="conn_taken", **settings)

    with pytest.raises(ValueError, match="conn_taken") as excinfo:
        connect(alias="conn_taken", **{**settings, **change})

    assert "disconnect" in str(excinfo.value)  # says how to fix it
    assert get_db("conn_taken").name == "x"  # the first registration still stands


def test_get_db_on_unknown_alias_raises_connection_not_registered(sync_cleanup):
    connect(host="mongodb://127.0.0.1:1/", alias="conn_known")

    with pytest.raises(ConnectionNotRegistered) as excinfo:
        get_db("conn_unknown")

    message = str(excinfo.value)
    assert "'conn_unknown'" in message
    assert "'conn_known'" in message  # lists what is registered
    assert "asyncassets.connect(" in message and "alias='conn_unknown'" in message
    assert isinstance(excinfo.value, AsyncAssetsError)
    assert isinstance(excinfo.value, LookupError)


async def test_document_on_unregistered_alias_raises_connection_not_registered(cleanup):
    with pytest.raises(ConnectionNotRegistered, match="conn_nowhere"):
        await ConnOrphan(title="x").save()
    with pytest.raises(ConnectionNotRegistered, match="conn_nowhere"):
        await ConnOrphan.objects.first()


async def test_documents_land_in_the_database_of_their_alias(
    asyncassets_db, asyncassets_connect
):
    archive = asyncassets_connect("conn_archive")
    doc = await ConnArchived(title="old").save()

    assert (await archive.archived.find_one({"_id": doc.id}))["title"] == "old"
    assert "archived" not in await asyncassets_db.list_collection_names()
    assert archive.name != asyncassets_db.name
    loaded = await ConnArchived.objects.get(id=doc.id)
    assert loaded.title == "old"


# -- disconnect --------------------------------------------------------------------


async def test_disconnect_closes_client_and_forgets_alias(asyncassets_server_uri, cleanup):
    name = unique_db_name("conn_closing")
    client = connect(host=asyncassets_server_uri, alias="conn_closing", db=name)
    await get_db("conn_closing").things.insert_one({"x": 1})
    await client.drop_database(name)

    await disconnect("conn_closing")

    assert "conn_closing" not in registered_aliases()
    with pytest.raises(ConnectionNotRegistered):
        get_db("conn_closing")
    with pytest.raises(InvalidOperation, match="after close"):
        await client[name].things.find_one()


async def test_disconnect_leaves_given_client_open(asyncassets_server_uri, cleanup):
    name = unique_db_name("conn_given")
    client = AsyncMongoClient(asyncassets_server_uri)
    try:
        connect(client=client, alias="conn_given", db=name)
        await get_db("conn_given").things.insert_one({"x": 1})

        await disconnect("conn_given")

        with pytest.raises(ConnectionNotRegistered):
            get_db("conn_given")
        assert await client[name].things.count_documents({}) == 1  # still usable
    finally:
        await client.drop_database(name)
        await client.close()


async def test_disconnect_unknown_alias_does_nothing():
    before = registered_aliases()
    await disconnect("conn_never_registered")
    assert registered_aliases() == before


async def test_disconnect_all_forgets_every_alias(closed_port):
    uri = f"mongodb://127.0.0.1:{closed_port}/"
    connect(host=uri, alias="conn_one")
    connect(host=uri, alias="conn_two")

    await disconnect_all()

    assert registered_aliases() == []


async def test_alias_can_be_registered_again_after_disconnect(closed_port, cleanup):
    uri = f"mongodb://127.0.0.1:{closed_port}/"
    connect(host=uri, alias="conn_again", db="first")
    await disconnect("conn_again")

    connect(host=uri, alias="conn_again", db="second")
    assert get_db("conn_again").name == "second"


# -- Motor -------------------------------------------------------------------------


async def test_crud_and_queryset_through_a_motor_client(asyncassets_server_uri, cleanup):
    name = unique_db_name("conn_motor")
    motor = AsyncIOMotorClient(asyncassets_server_uri, serverSelectionTimeoutMS=5000)
    raw = motor[name].things
    try:
        assert connect(client=motor, alias="conn_motor", db=name) is motor

        # create (and the lazy index creation, through Motor's create_index)
        a = await ConnMotorThing(code="a", kind="x").save()
        b = await ConnMotorThing(code="b", kind="y", count=5).save()
        assert (await raw.find_one({"_id": a.id}))["code"] == "a"
        indexes = await raw.index_information()
        assert {"code_1", "kind_1"} <= set(indexes)
        assert indexes["code_1"]["unique"] is True
        with pytest.raises(NotUniqueError):
            await ConnMotorThing(code="a").save()
        inserted = await ConnMotorThing.objects.insert(
            [ConnMotorThing(code="c", kind="x"), ConnMotorThing(code="d", kind="x")]
        )
        assert all(doc.id is not None for doc in inserted)

        # read
        assert (await ConnMotorThing.objects.get(code="b")).count == 5
        assert await ConnMotorThing.objects(kind="x").count() == 3
        codes = [t.code async for t in ConnMotorThing.objects.order_by("-code")]
        assert codes == ["d", "c", "b", "a"]
        assert [t.code for t in await ConnMotorThing.objects(kind="x").only("code").to_list()] == [
            "a", "c", "d",
        ]
        assert sorted(await ConnMotorThing.objects.distinct("kind")) == ["x", "y"]
        rows = [
            row
            async for row in ConnMotorThing.objects(kind="x").aggregate(
                [{"$group": {"_id": "$kind", "n": {"$sum": 1}}}]
            )
        ]
        assert rows == [{"_id": "x", "n": 3}]

        # update
        a.count = 2
        await a.save()
        assert (await raw.find_one({"_id": a.id}))["count"] == 2
        assert await ConnMotorThing.objects(kind="x").update(inc__count=10) == 3
        await a.reload()
        assert a.count == 12
        assert await a.modify(set__kind="z") is True
        assert (await raw.find_one({"_id": a.id}))["kind"] == "z"
        old = await ConnMotorThing.objects(code="b").modify(set__count=0)
        assert old.count == 5

        # delete
        await b.delete()
        assert await raw.count_documents({"_id": b.id}) == 0
        assert await ConnMotorThing.objects(kind="x").delete() == 2
        assert [d["code"] async for d in raw.find()] == ["a"]
    finally:
        await motor.drop_database(name)
        await disconnect("conn_motor")
        motor.close()


# -- event loops -------------------------------------------------------------------


def test_host_connection_gets_a_client_per_event_loop(asyncassets_server_uri, sync_cleanup):
    # One registration at import time, then several asyncio.run() calls: each loop
    # gets a client of its own instead of one bound to a closed loop.
    name = unique_db_name("conn_loops")
    connect(host=asyncassets_server_uri, alias="conn_loops", db=name)

    async def run(n: int) -> list[int]:
        assert get_client("conn_loops") is get_client("conn_loops")  # stable within a loop
        await ConnLoopThing(n=n).save()
        seen = sorted(t.n for t in await ConnLoopThing.objects.to_list())
        # Close this loop's client before its loop ends, as an app's shutdown would.
        await get_client("conn_loops").close()
        return seen

    first_seen = asyncio.run(run(1))
    second_seen = asyncio.run(run(2))

    assert first_seen == [1]
    assert second_seen == [1, 2]  # the second loop's client reached the same database

    async def drop() -> None:
        await get_client("conn_loops").drop_database(name)

    asyncio.run(drop())


def test_host_connection_works_in_second_loop_without_closing_first_client(
    asyncassets_server_uri, sync_cleanup
):
    name = unique_db_name("conn_loops")
    connect(host=asyncassets_server_uri, alias="conn_loops", db=name)

    async def run(n: int) -> tuple[object, list[int]]:
        await ConnLoopThing(n=n).save()
        return get_client("conn_loops"), sorted(t.n for t in await ConnLoopThing.objects.to_list())

    first_client, first_seen = asyncio.run(run(1))
    second_client, second_seen = asyncio.run(run(2))

    assert second_client is not first_client
    assert (first_seen, second_seen) == ([1], [1, 2])

    async def drop() -> None:
        await get_client("conn_loops").drop_database(name)
        await disconnect("conn_loops")

    asyncio.run(drop())


def test_given_client_used_from_another_live_loop_raises_wrong_event_loop(
    asyncassets_server_uri, sync_cleanup
):
    first_loop = asyncio.new_event_loop()
    try:

        async def first() -> AsyncMongoClient:
            client = AsyncMongoClient(asyncassets_server_uri, serverSelectionTimeoutMS=5000)
            connect(client=client, alias="conn_given_loop")
            await get_db("conn_given_loop").command("ping")
            return client

        client = first_loop.run_until_complete(first())

        async def second() -> None:
            get_db("conn_given_loop")

        with pytest.raises(WrongEventLoop, match="conn_given_loop") as excinfo:
            asyncio.run(second())
        assert "host=" in str(excinfo.value)  # says how to fix it

        first_loop.run_until_complete(client.close())
    finally:
        first_loop.close()


def test_given_client_used_after_its_loop_ended_raises_wrong_event_loop(
    asyncassets_server_uri, sync_cleanup
):
    # The common case: asyncio.run() twice, or pytest-asyncio's loop per test.
    async def first() -> None:
        client = AsyncMongoClient(asyncassets_server_uri, serverSelectionTimeoutMS=5000)
        connect(client=client, alias="conn_given_loop")
        await get_db("conn_given_loop").command("ping")
        # Closed so nothing leaks; asyncassets must refuse before the driver is reached.
        await client.close()

    asyncio.run(first())

    async def second() -> None:
        await get_db("conn_given_loop").command("ping")

    with pytest.raises(WrongEventLoop, match="conn_given_loop"):
        asyncio.run(second())


def test_public_names_are_exported():
    assert asyncassets.connect is connect
    assert asyncassets.get_db is get_db
    assert asyncassets.disconnect is disconnect
