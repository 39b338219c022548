"""Assets under races: add, replace, delete and the readers of one id, on every storage.

What a user of one asset id is promised (docs/assets.rst, "Guarantees"): the
operations are linearizable. Readers (``get``, ``exists``, ``await am[id]``)
see the old or the new version during a replace, never "not found"; racing adds
get distinct ids, and an add never takes the id of an asset being replaced; of
racing replaces one wins and the others raise ``FileConflict``; a delete racing
a replace ends with the asset deleted. A replace cancelled, or a process killed,
at any moment leaves one whole version that the next reader or writer finishes
the swap to, and nothing the sweep cannot remove.

Races run with asyncio tasks and with other processes (``_assets_worker.py``)
on one database; kills are real (SIGKILL), at every step of the swap. Bytes are
tagged (``_assets_worker.payload``) so every read says which write made it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import json
import os
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from _assets_worker import make_storage, payload, tag_of
from pymongo.errors import OperationFailure

from asyncassets import check, sweep_orphans
from asyncassets.assets import AssetManager
from asyncassets.connection import (
    DEFAULT_ALIAS,
    connect,
    disconnect,
    get_db,
    registered_aliases,
)
from asyncassets.embedded import EmbeddedServer
from asyncassets.errors import (
    AssetExists,
    AssetNotFound,
    FileConflict,
    FileDeletedWhileReading,
)
from asyncassets.storage import GridFSStorage, Storage
from asyncassets.testing import unique_db_name

WORKER = Path(__file__).with_name("_assets_worker.py")
_names = itertools.count()


@pytest.fixture(params=["gridfs", "filesystem", "s3"])
def spec(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    """How to build the test's storage, here and in another process."""
    name = f"races{next(_names)}"
    if request.param == "gridfs":
        return {"kind": "gridfs", "name": name}
    if request.param == "filesystem":
        return {"kind": "filesystem", "root": str(tmp_path / name), "name": name}
    bucket = request.getfixturevalue("asyncassets_s3_bucket")
    return {"kind": "s3", "options": bucket.options, "prefix": f"{name}/", "name": name}


async def read_tag(am: AssetManager, asset_id: str) -> str | None:
    data = await (await am.get(asset_id)).read()
    tag = tag_of(data)
    assert tag is not None, f"{asset_id!r} read back bytes no write made: {data[:60]!r}"
    return tag


async def stored_objects(storage: Storage, db: Any) -> int:
    """How many byte containers the storage holds: GridFS chunks, files, objects."""
    if isinstance(storage, GridFSStorage):
        return int(await db[f"{storage.collection_name}.chunks"].count_documents({}))
    blobs = storage.blobs()  # type: ignore[attr-defined]
    return len([info async for info in blobs.list()])


async def assert_clean(
    am: AssetManager, db: Any, live: dict[str, str], *, killed: bool = False
) -> None:
    """After a sweep with grace 0: exactly the ``live`` assets ({id: tag}), each
    read back byte for byte, one entry and one object each, and check() agrees."""
    name = am.storage.collection_name
    if killed:
        # What a killed writer left is dated in whole seconds (ObjectIds, S3's
        # LastModified), which the sweep reads as the end of that second: wait for
        # it to be older than a grace of 0.
        await asyncio.sleep(1.1)
    await sweep_orphans(grace=0, buckets=[name])
    for asset_id, tag in live.items():
        assert await read_tag(am, asset_id) == tag, asset_id
    entries = await db[am.catalogue].find({}, {"metadata": 1}).to_list()
    assert len(entries) == len(live), entries
    assert {e["metadata"]["asset_id"] for e in entries} == set(live)
    assert await stored_objects(am.storage, db) == len(live)  # payloads fit one chunk
    report = await check(buckets=[name], verify=True)
    assert report.ok, report


# -- tasks ---------------------------------------------------------------------


async def test_an_add_racing_a_replace_never_takes_the_live_asset(
    spec: dict[str, Any], asyncassets_db: Any
) -> None:
    """Issue 19, case 7: add(b"stranger", asset_id=X) racing replace(X) returned X
    itself and get(X) gave the stranger's bytes; the replace raised AssetExists."""
    am = AssetManager(make_storage(spec))
    await am.add(payload("warmup"), asset_id="warmup")
    started = time.perf_counter()
    await am.replace("warmup", payload("warmup2"))
    span = time.perf_counter() - started  # how long a replace takes here
    live = {"warmup": "warmup2"}
    rounds = 15
    for n in range(rounds):
        asset_id = f"r{n}.bin"
        await am.add(payload(f"old{n}"), asset_id=asset_id)
        mode = "error" if n % 3 == 2 else "rename"

        async def stranger(n: int = n, asset_id: str = asset_id, mode: Any = mode) -> str:
            await asyncio.sleep(span * 1.2 * n / rounds)  # each round a later moment
            return await am.add(payload(f"stranger{n}"), asset_id=asset_id, on_conflict=mode)

        replaced, added = await asyncio.gather(
            am.replace(asset_id, payload(f"new{n}")), stranger(), return_exceptions=True
        )
        assert not isinstance(replaced, BaseException), (n, replaced)
        assert replaced.asset_id == asset_id
        if mode == "error":
            assert isinstance(added, AssetExists), (n, added)
        else:
            assert added == f"r{n}-2.bin", (n, added)
            live[added] = f"stranger{n}"
        assert await read_tag(am, asset_id) == f"new{n}", n
        live[asset_id] = f"new{n}"
    await assert_clean(am, asyncassets_db, live)


@pytest.fixture(scope="module")
def failpoint_server_uri() -> Iterator[str]:
    """A server whose ``failCommand`` failpoint can slow one client's writes:
    ``MONGODB_URI`` when set (the test skips if it has no test commands), else an
    embedded server of our own started with test commands on."""
    if os.environ.get("MONGODB_URI"):
        yield os.environ["MONGODB_URI"]
        return
    kind = EmbeddedServer().kind
    flags = ["--enable-test-commands"] if kind == "secantusdb" else [
        "--setParameter", "enableTestCommands=1"]
    server = EmbeddedServer(extra_args=flags)
    server.start()
    try:
        yield server.uri
    finally:
        server.stop()


@contextlib.asynccontextmanager
async def slow_writes(db: Any, app: str, ms: int) -> AsyncIterator[None]:
    """Every update (and findAndModify) of the client named ``app`` waits ``ms``
    on the server before it runs: the server's ``failCommand`` failpoint."""
    admin = db.client.admin
    try:
        await admin.command({
            "configureFailPoint": "failCommand", "mode": "alwaysOn",
            "data": {"failCommands": ["update", "findAndModify"], "appName": app,
                     "blockConnection": True, "blockTimeMS": ms}})
    except OperationFailure as exc:
        pytest.skip(f"the server has no failCommand failpoint (test commands off?): {exc}")
    try:
        yield
    finally:
        await admin.command({"configureFailPoint": "failCommand", "mode": "off"})


async def test_adds_and_readers_during_a_slowed_down_swap_never_take_or_miss_the_asset(
    spec: dict[str, Any], failpoint_server_uri: str, request: pytest.FixtureRequest
) -> None:
    """Issue 19, cases 7 and 8, step by step: the replacer's client waits 150 ms
    on the server before each of its updates, so the swap stays in each of its
    states for a while, and adds and exists() of its id run in every one of them."""
    name = unique_db_name(request.node.name)
    if DEFAULT_ALIAS in registered_aliases():
        await disconnect(DEFAULT_ALIAS)
    connect(host=failpoint_server_uri, db=name)
    connect(host=failpoint_server_uri, alias="slow", db=name, appname="slow-replacer")
    db = get_db()
    try:
        slow = {"replacer": AssetManager(make_storage(spec), alias="slow")}
        am = AssetManager(make_storage(spec))
        await am.add(payload("old"), asset_id="x.jpg")
        stop = asyncio.Event()
        results: Counter[str] = Counter()
        strangers: dict[str, str] = {}
        violations: set[str] = set()

        async def adds() -> None:
            n = 0
            while not stop.is_set():
                n += 1
                mode = "error" if n % 2 else "rename"
                try:
                    got = await am.add(payload(f"stranger{n}"), asset_id="x.jpg",
                                       on_conflict=mode)
                except AssetExists:
                    results["AssetExists"] += 1
                    continue
                if got == "x.jpg":
                    violations.add("an add took the id of the asset being replaced")
                    continue
                strangers[got] = f"stranger{n}"
                results["variant"] += 1
                await asyncio.sleep(0.02)

        async def exists() -> None:
            while not stop.is_set():
                if not await am.exists("x.jpg"):
                    violations.add("exists() said False mid-replace")
                results["exists"] += 1

        async def replace() -> Any:
            try:
                async with slow_writes(db, "slow-replacer", 150):
                    return await slow["replacer"].replace("x.jpg", payload("new"))
            finally:
                stop.set()

        outcomes = await asyncio.gather(replace(), adds(), exists(), return_exceptions=True)
        print(f"\nslowed swap on {spec['kind']}: {dict(results)}")
        assert not violations, violations
        assert outcomes[0].asset_id == "x.jpg", outcomes
        assert results["variant"] >= 3 and results["AssetExists"] >= 3, results
        assert await read_tag(am, "x.jpg") == "new"
        for asset_id, tag in strangers.items():
            assert await read_tag(am, asset_id) == tag
        outcomes.clear()
        slow.clear()
        await disconnect("slow")
        gc.collect()  # the manager on the "slow" alias leaves the sweep's scope
        await assert_clean(am, db, {"x.jpg": "new", **strangers})
    finally:
        await disconnect("slow")
        await get_db().client.drop_database(name)
        await disconnect()


async def test_readers_never_miss_an_asset_being_replaced(
    spec: dict[str, Any], asyncassets_db: Any
) -> None:
    """Issue 19, case 8: with one writer replacing, exists() said False and get()
    raised AssetNotFound within two or three replaces."""
    am = AssetManager(make_storage(spec))
    await am.add(payload("v0"), asset_id="hot.jpg")
    written = {"v0"}
    done = asyncio.Event()
    seen: Counter[str] = Counter()

    async def writer() -> None:
        for n in range(1, 21):
            written.add(f"v{n}")  # before it can go live
            await am.replace("hot.jpg", payload(f"v{n}"))
        done.set()

    async def reader(how: str) -> None:
        while not done.is_set():
            if how == "exists":
                assert await am.exists("hot.jpg"), "exists() said False mid-replace"
                seen["exists"] += 1
                continue
            asset = await (am.get("hot.jpg") if how == "get" else am["hot.jpg"])
            seen[how] += 1
            try:
                data = await asset.read()
            except FileDeletedWhileReading:
                seen["deleted while reading"] += 1  # the version it got was replaced
                continue
            assert tag_of(data) in written, data[:40]

    await asyncio.gather(writer(), reader("exists"), reader("get"), reader("item"),
                         reader("get"))
    assert seen["exists"] > 20 and seen["get"] > 20, seen
    assert await read_tag(am, "hot.jpg") == "v20"
    await assert_clean(am, asyncassets_db, {"hot.jpg": "v20"})


async def test_racing_replaces_one_wins_the_others_get_file_conflict(
    spec: dict[str, Any], asyncassets_db: Any
) -> None:
    """Issue 19, case 8: concurrent replace() calls raised AssetNotFound."""
    am = AssetManager(make_storage(spec))
    await am.add(payload("v0"), asset_id="contested.bin")
    outcomes: Counter[str] = Counter()
    last = "v0"
    for n in range(5):
        tags = [f"r{n}w{w}" for w in range(4)]
        results = await asyncio.gather(
            *(am.replace("contested.bin", payload(t)) for t in tags), return_exceptions=True
        )
        won = [t for t, r in zip(tags, results, strict=True) if not isinstance(r, BaseException)]
        for result in results:
            outcomes[type(result).__name__] += 1
            assert not isinstance(result, BaseException) or isinstance(result, FileConflict), (
                result)
        assert won, results
        final = await read_tag(am, "contested.bin")
        assert final in won, (final, won)
        last = final
    assert outcomes["FileConflict"] >= 5, outcomes
    await assert_clean(am, asyncassets_db, {"contested.bin": last})


async def test_a_delete_racing_a_replace_ends_deleted(
    spec: dict[str, Any], asyncassets_db: Any
) -> None:
    am = AssetManager(make_storage(spec))
    await am.add(payload("warmup"), asset_id="warmup")
    started = time.perf_counter()
    await am.replace("warmup", payload("warmup2"))
    span = time.perf_counter() - started
    outcomes: Counter[str] = Counter()
    rounds = 10
    for n in range(rounds):
        asset_id = f"d{n}.bin"
        await am.add(payload(f"old{n}"), asset_id=asset_id)

        async def later_delete(n: int = n, asset_id: str = asset_id) -> bool:
            await asyncio.sleep(span * 1.2 * n / rounds)
            return await am.delete(asset_id)

        replaced, deleted = await asyncio.gather(
            am.replace(asset_id, payload(f"new{n}")), later_delete(), return_exceptions=True
        )
        assert deleted is True, (n, deleted)
        assert not isinstance(replaced, BaseException) or isinstance(
            replaced, AssetNotFound), (n, replaced)
        outcomes["replaced, then deleted" if not isinstance(replaced, BaseException)
                 else "deleted first"] += 1
        assert not await am.exists(asset_id), n
        with pytest.raises(AssetNotFound):
            await am.get(asset_id)
    await assert_clean(am, asyncassets_db, {"warmup": "warmup2"})


async def test_a_replace_cancelled_at_any_moment_leaves_one_whole_version(
    spec: dict[str, Any], asyncassets_db: Any
) -> None:
    am = AssetManager(make_storage(spec))
    await am.add(payload("v0"), asset_id="c.bin")
    started = time.perf_counter()
    await am.replace("c.bin", payload("v1"))
    span = time.perf_counter() - started
    current, outcomes = "v1", Counter[str]()
    rounds = 12
    for n in range(rounds):
        tag = f"c{n}"
        task = asyncio.create_task(am.replace("c.bin", payload(tag)))
        await asyncio.sleep(span * 1.1 * n / rounds)
        task.cancel()
        try:
            await task
            outcomes["finished first"] += 1
        except asyncio.CancelledError:
            outcomes["cancelled"] += 1
        # A cancelled replace has ended when the cancellation reaches its caller:
        # the asset is the old version or the new one, whole, and nothing else is left.
        now = await read_tag(am, "c.bin")
        assert now in (current, tag), (n, now)
        current = now
        entries = await asyncassets_db[am.catalogue].count_documents({})
        assert entries == 1, (n, await asyncassets_db[am.catalogue].find().to_list())
    assert outcomes["cancelled"] >= 3, outcomes
    report = await sweep_orphans(grace=0, buckets=[am.storage.collection_name])
    assert report.files_deleted == 0, report
    await assert_clean(am, asyncassets_db, {"c.bin": current})


# -- processes -------------------------------------------------------------------


async def start_worker(uri: str, db: Any, spec: dict[str, Any], mode: str,
                       **params: Any) -> asyncio.subprocess.Process:
    # The asyncassets next to these tests, whatever the environment has installed.
    env = {**os.environ, "PYTHONPATH": str(WORKER.parents[1])}
    return await asyncio.create_subprocess_exec(
        sys.executable, str(WORKER), uri, db.name, json.dumps(spec), mode,
        json.dumps(params), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=env,
    )


async def events(process: asyncio.subprocess.Process, timeout: float = 120) -> list[Any]:
    out, err = await asyncio.wait_for(process.communicate(), timeout)
    lines = [json.loads(line) for line in out.decode().splitlines() if line.strip()]
    if process.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(f"worker failed ({process.returncode}): {err.decode()[-2000:]}")
    return lines


async def test_processes_and_tasks_racing_on_one_asset_keep_it_linearizable(
    spec: dict[str, Any], asyncassets_db: Any, asyncassets_server_uri: str
) -> None:
    am = AssetManager(make_storage(spec))
    await am.add(payload("v0"), asset_id="shared.bin")
    workers = [
        await start_worker(asyncassets_server_uri, asyncassets_db, spec, "race",
                           asset_id="shared.bin", tag=f"p{w}", ops=24, seed=w)
        for w in range(2)
    ]
    # This process races too, on the same id, while the workers run.
    local: list[dict[str, Any]] = []
    rng = random.Random(19)

    async def one(n: int) -> None:
        kind = rng.choice(["replace", "replace", "get", "exists", "add"])
        try:
            if kind == "replace":
                await am.replace("shared.bin", payload(f"t:{n}"))
                local.append({"op": "replace", "version": f"t:{n}", "ok": True})
            elif kind == "get":
                try:
                    data = await (await am.get("shared.bin")).read()
                    local.append({"op": "get", "version": tag_of(data)})
                except FileDeletedWhileReading:
                    local.append({"op": "get", "read": "deleted-while-reading"})
            elif kind == "exists":
                local.append({"op": "exists", "value": await am.exists("shared.bin")})
            else:
                got = await am.add(payload(f"stranger:t:{n}"), asset_id="shared.bin")
                local.append({"op": "add", "id": got, "version": f"stranger:t:{n}"})
        except FileConflict:
            local.append({"op": kind, "error": "FileConflict"})
        except Exception as exc:
            local.append({"op": kind, "error": type(exc).__name__, "message": str(exc)})

    for n in range(0, 24, 2):
        await asyncio.gather(one(n), one(n + 1))
    reports = [event for w in workers for event in await events(w)] + local

    errors = [e for e in reports if e.get("error") not in (None, "FileConflict")]
    assert not errors, errors
    went_live = {"v0"} | {e["version"] for e in reports if e["op"] == "replace" and e.get("ok")}
    for event in reports:
        if event["op"] == "exists":
            assert event["value"] is True, event
        elif event["op"] == "get" and "version" in event:
            assert event["version"] in went_live, event  # never a stranger's bytes
    strangers = {e["id"]: e["version"] for e in reports if e["op"] == "add"}
    assert "shared.bin" not in strangers
    assert len(strangers) == len([e for e in reports if e["op"] == "add"])  # distinct ids
    counts = Counter(f"{e['op']}:{e.get('error', 'ok')}" for e in reports)
    print(f"\nprocess race on {spec['kind']}: {sum(counts.values())} operations {dict(counts)}")
    assert counts["replace:ok"] >= 5 and counts["get:ok"] >= 5, counts
    final = await read_tag(am, "shared.bin")
    assert final in went_live
    await assert_clean(am, asyncassets_db, {"shared.bin": final, **strangers})


#: The database writes of a swap from its lock on: lock, old gives the id up,
#: new takes it, old gives the hold up, old's entry deleted, (GridFS) its chunks.
SWAP_WRITES = 6


async def test_a_process_killed_at_each_step_of_a_swap_leaves_a_whole_asset(
    spec: dict[str, Any], asyncassets_db: Any, asyncassets_server_uri: str
) -> None:
    am = AssetManager(make_storage(spec))
    steps = range(SWAP_WRITES)
    for step in steps:
        await am.add(payload(f"old{step}"), asset_id=f"k{step}.bin")
    workers = [
        await start_worker(asyncassets_server_uri, asyncassets_db, spec, "kill-at",
                           asset_id=f"k{step}.bin", tag=f"new{step}", step=step)
        for step in steps
    ]
    finished = {step for step, w in zip(steps, workers, strict=True)
                if {"done": True} in await events(w)}
    killed = set(steps) - finished
    print(f"\nkilled at swap writes {sorted(killed)} on {spec['kind']}; finished: {finished}")
    # Killed before, at and after the moment the new version takes the id.
    assert {0, 1, 2, 3, 4} <= killed, finished
    files = asyncassets_db[am.catalogue]
    live = {}
    for step in steps:
        asset_id = f"k{step}.bin"
        # Readers find the asset whatever step the writer died at, before any repair.
        assert await am.exists(asset_id), step
        expected = f"old{step}" if step == 0 else f"new{step}"
        assert await read_tag(am, asset_id) == expected, step  # get() finishes the swap
        entries = await files.find({"metadata.asset_of": asset_id}).to_list()
        markers = [sorted(k for k in e["metadata"] if k.startswith("asset_")) for e in entries]
        # One live entry, unlocked; at most an abandoned upload the sweep removes.
        assert sum("asset_id" in m for m in markers) == 1, markers
        assert not any("asset_next" in m or ("asset_hold" in m and "asset_id" not in m)
                       for m in markers), markers
        live[asset_id] = expected
    # The next writer works on it as on any asset.
    await am.replace("k1.bin", payload("after"))
    live["k1.bin"] = "after"
    await assert_clean(am, asyncassets_db, live, killed=True)


async def test_a_process_killed_while_replacing_in_a_loop_leaves_a_live_version(
    spec: dict[str, Any], asyncassets_db: Any, asyncassets_server_uri: str
) -> None:
    am = AssetManager(make_storage(spec))
    await am.add(payload("v0"), asset_id="loop.bin")
    went_live = {"v0"}
    rng = random.Random(7)
    kills = 0
    for round_ in range(2):
        worker = await start_worker(asyncassets_server_uri, asyncassets_db, spec,
                                    "replace-loop", asset_id="loop.bin", tag=f"k{round_}")
        assert worker.stdout is not None
        first = await asyncio.wait_for(worker.stdout.readline(), 60)  # it is replacing
        await asyncio.sleep(rng.uniform(0, 0.3))
        worker.send_signal(signal.SIGKILL)
        kills += 1
        rest, _ = await worker.communicate()
        for line in (first + rest).decode().splitlines():
            went_live.add(json.loads(line)["live"])
        # Right after the kill, before any repair: readers find a version.
        assert await am.exists("loop.bin")
        now = await read_tag(am, "loop.bin")
        # The version the killed process was swapping in may be the one now.
        assert now in went_live or now.startswith(f"k{round_}:"), now
        went_live.add(now)
    assert kills == 2
    await am.replace("loop.bin", payload("last"))
    await assert_clean(am, asyncassets_db, {"loop.bin": "last"}, killed=True)


@pytest.mark.slow
async def test_processes_and_tasks_racing_long(
    spec: dict[str, Any], asyncassets_db: Any, asyncassets_server_uri: str
) -> None:
    """The process race with more workers and operations (``-m slow``)."""
    am = AssetManager(make_storage(spec))
    await am.add(payload("v0"), asset_id="shared.bin")
    workers = [
        await start_worker(asyncassets_server_uri, asyncassets_db, spec, "race",
                           asset_id="shared.bin", tag=f"p{w}", ops=300, seed=100 + w)
        for w in range(4)
    ]
    reports = [event for w in workers for event in await events(w, timeout=900)]
    counts = Counter(f"{e['op']}:{e.get('error', 'ok')}" for e in reports)
    print(f"\nlong process race on {spec['kind']}: {len(reports)} operations {dict(counts)}")
    errors = [e for e in reports if e.get("error") not in (None, "FileConflict")]
    assert not errors, errors
    went_live = {"v0"} | {e["version"] for e in reports if e["op"] == "replace" and e.get("ok")}
    assert all(e["value"] for e in reports if e["op"] == "exists")
    assert all(e["version"] in went_live for e in reports
               if e["op"] == "get" and "version" in e)
    strangers = {e["id"]: e["version"] for e in reports if e["op"] == "add"}
    assert "shared.bin" not in strangers
    final = await read_tag(am, "shared.bin")
    await assert_clean(am, asyncassets_db, {"shared.bin": final, **strangers})
