"""What the file layer does on a replica set: write concern, reads, step-downs, retries.

Decided (docs/scaling.rst, "Replica sets"; :func:`asyncassets._driver.acknowledged`):

* every write of the file layer (chunks, catalogue entries, key reservations,
  reference switches, cascading deletes, transfers) is acknowledged by a
  majority, whatever ``w`` the client is configured with; the application's own
  document writes keep the client's;
* the file layer reads from the primary, whatever ``readPreference`` the client
  has; the application's own queries keep the client's;
* a primary that steps down mid-upload, mid-switch or mid-transfer leaves no
  dangling reference and deletes no data a stored document may reference (the
  unknown-outcome rule); what it leaves, the orphan sweep removes;
* retryable writes (PyMongo's default) make a step-down between two writes
  invisible when the server labels the error retryable.

The server is a SecantusDB of this module, advertised as a one-node replica set
(``replicaSet=secantus``) and started with ``--enable-test-commands``: it takes
``replSetStepDown`` with ``force`` (a real step-down: SECONDARY for the period,
writes refused with ``NotWritablePrimary``, reads served) and mongod's
``failCommand`` fail point, which is how the driver specifications test
step-downs at an exact command. What one node cannot show: a rollback, a
lagging secondary, an election to another member (see docs/scaling.rst). These
tests arm fail points and step the primary down, so they never run on a server
named by ``MONGODB_URI``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from pymongo import AsyncMongoClient, monitoring
from pymongo.errors import PyMongoError

import asyncassets
from asyncassets import Document, check, sweep_orphans
from asyncassets.embedded import EmbeddedServer
from asyncassets.errors import TransferFailed
from asyncassets.fields import FileField, StringField
from asyncassets.storage import FileSystemStorage, GridFSStorage, QueuedStorage
from asyncassets.testing import unique_db_name

if os.environ.get("MONGODB_URI"):
    pytest.skip(
        "MONGODB_URI is set: these tests step the primary down and arm fail points, "
        "which they do only on a server of their own (unset it to run them)",
        allow_module_level=True,
    )

#: SecantusDB's one-node replica set; polled every 500 ms (the least PyMongo
#: allows), as a stepped-down SecantusDB does not wake a streaming ``hello``.
OPTIONS = "replicaSet=secantus&serverMonitoringMode=poll&heartbeatFrequencyMS=500"
_names = itertools.count()
WRITES = ("insert", "update", "delete", "findAndModify")


@pytest.fixture(scope="module")
def replica_set() -> Iterator[str]:
    server = EmbeddedServer(binary="secantusdb", extra_args=["--enable-test-commands"])
    server.start()
    try:
        yield server.uri
    finally:
        server.stop()


class Commands(monitoring.CommandListener):
    """The commands a client sent: name, collection, write concern, read preference."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        command = event.command
        target = command.get(event.command_name)
        self.seen.append({
            "name": event.command_name,
            "collection": target if isinstance(target, str) else None,
            "w": (command.get("writeConcern") or {}).get("w"),
            "read": (command.get("$readPreference") or {}).get("mode", "primary"),
            "command": command,
        })  # fmt: skip

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass

    def writes(self, collection: str | None = None) -> list[dict[str, Any]]:
        return [
            c for c in self.seen
            if c["name"] in WRITES and (collection is None or c["collection"] == collection)
        ]  # fmt: skip


@pytest.fixture
async def connected(replica_set: str, request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    """``connect(query)``: the default alias on a fresh database of the replica set,
    with the URI options ``query``; yields the listener of its commands."""
    made: list[str] = []

    def connect(query: str = "") -> Commands:
        name = unique_db_name(request.node.name)
        listener = Commands()
        uri = f"{replica_set.rstrip('/')}/{name}?{OPTIONS}{'&' + query if query else ''}"
        asyncassets.connect(uri, event_listeners=[listener])
        made.append(name)
        return listener

    try:
        yield connect
    finally:
        await fail_point(replica_set, "off")
        for name in made:
            with contextlib.suppress(PyMongoError):
                await asyncassets.get_client().drop_database(name)
        await asyncassets.disconnect()


async def fail_point(uri: str, mode: Any, **data: Any) -> None:
    """Arm (or turn ``"off"``) mongod's ``failCommand`` fail point on the server."""
    async with AsyncMongoClient(uri, directConnection=True) as admin:
        await admin.admin.command({"configureFailPoint": "failCommand", "mode": mode, "data": data})


async def step_down(uri: str, seconds: int) -> None:
    """``replSetStepDown`` with ``force``: SECONDARY for ``seconds``, writes refused."""
    async with AsyncMongoClient(uri, directConnection=True) as admin:
        await admin.admin.command({"replSetStepDown": seconds, "force": True})


def queued_class(tmp_path: Path, **options: Any) -> tuple[type, QueuedStorage]:
    n = next(_names)
    storage = QueuedStorage(
        local=GridFSStorage(f"rs_qlocal{n}", chunk_size=1024),
        remote=FileSystemStorage(tmp_path / f"remote{n}", fsync=False),
        collection_name=f"rs_q{n}", retry_delay=0.05, max_retry_delay=0.2, **options,
    )  # fmt: skip
    doc_cls = type(f"RsQueued{n}", (Document,), {
        "q": FileField(storage=storage), "meta": {"collection": f"rs_qdocs{n}"},
    })  # fmt: skip
    return doc_cls, storage


def classes(tmp_path: Path) -> tuple[type, str, str]:
    n = next(_names)
    grid, directory = f"rs_grid{n}", f"rs_dir{n}"
    storage = FileSystemStorage(tmp_path / f"dir{n}", fsync=False, collection_name=directory)

    doc_cls = type(f"RsDoc{n}", (Document,), {
        "name": StringField(),
        "g": FileField(storage=GridFSStorage(grid, chunk_size=1024)),
        "d": FileField(storage=storage),
        "meta": {"collection": f"rs_docs{n}"},
    })  # fmt: skip
    return doc_cls, grid, directory


async def pieces(*parts: bytes, pause: Any = None) -> AsyncIterator[bytes]:
    for i, part in enumerate(parts):
        if pause is not None and i:
            await pause(i)
        yield part


async def clean(doc_cls: type) -> None:
    """The final state every test ends in: a sweep leaves nothing to report."""
    await sweep_orphans(grace=0)
    report = await check(verify=True)
    assert report.ok, report.summary() if hasattr(report, "summary") else repr(report)


# -- write concern and read preference ------------------------------------------------------


async def test_file_writes_are_majority_acknowledged_on_a_client_configured_w1(
    connected: Any, tmp_path: Path
) -> None:
    commands = connected("w=1")
    doc_cls, grid, directory = classes(tmp_path)
    doc = doc_cls(name="a")
    await doc.g.put(b"g" * 5000)
    await doc.d.put(b"d" * 5000, filename="a.txt")
    await doc.save()
    await doc.g.replace(b"G" * 3000)
    await doc.d.replace(b"D" * 3000, filename="a.txt")
    await doc.d.delete()
    await doc.delete()
    await sweep_orphans(grace=0)

    docs = doc._get_collection_name()
    files = [c for c in commands.writes() if c["collection"] != docs]
    touched = {c["collection"] for c in files}
    assert {f"{grid}.chunks", f"{grid}.files", f"{directory}.files"} <= touched, touched
    assert any("keys" in name for name in touched), touched  # the key reservations
    assert [c for c in files if c["w"] != "majority"] == []
    # The document's own insert keeps the client's w=1; the switches of replace()
    # and delete() and the cascading delete are the file layer's: majority.
    own = commands.writes(docs)
    assert [c["name"] for c in own if c["w"] == 1] == ["insert"]
    assert {c["name"] for c in own if c["w"] == "majority"} == {"update", "findAndModify"}


async def test_the_file_layer_reads_from_the_primary_whatever_the_clients_preference(
    connected: Any, tmp_path: Path
) -> None:
    commands = connected("readPreference=secondaryPreferred")
    doc_cls, _, _ = classes(tmp_path)
    doc = doc_cls(name="a")
    await doc.g.put(b"g" * 5000)
    await doc.d.put(b"d" * 5000, filename="a.txt")
    await doc.save()
    found = await doc_cls.objects.get(pk=doc.pk)
    # The application's own query goes where the client says: that is what the
    # listener would show of a file-layer read that did not go to the primary.
    assert any(c["name"] == "find" and c["read"] == "secondaryPreferred" for c in commands.seen)
    commands.seen.clear()
    assert await found.g.read() == b"g" * 5000
    assert await found.d.read() == b"d" * 5000
    await sweep_orphans(grace=0)  # reads every document referencing files
    assert (await check(verify=True)).ok
    assert [(c["name"], c["collection"]) for c in commands.seen if c["read"] != "primary"] == []


# -- a step-down mid-way ----------------------------------------------------------------


async def test_an_upload_when_the_primary_steps_down_mid_way_fails_and_keeps_the_old_file(
    connected: Any, tmp_path: Path, replica_set: str
) -> None:
    """A real ``replSetStepDown`` between two batches of chunks of a replace()."""
    connected()
    doc_cls, _, _ = classes(tmp_path)
    doc = doc_cls(name="a")
    await doc.g.put(b"old" * 1000)
    await doc.save()

    async def pause(i: int) -> None:
        if i == 3:
            await step_down(replica_set, 1)

    parts = [bytes([65 + i]) * 1024 * 16 for i in range(6)]  # 16 chunks a part
    with pytest.raises(PyMongoError, match="not primary"):
        await doc.g.replace(pieces(*parts, pause=pause))
    await asyncio.sleep(1.5)  # the primary is back

    stored = await doc_cls.objects.get(pk=doc.pk)
    assert await stored.g.read() == b"old" * 1000
    await clean(doc_cls)
    assert await (await doc_cls.objects.get(pk=doc.pk)).g.read() == b"old" * 1000


async def test_a_switch_refused_by_a_stepped_down_primary_deletes_neither_file(
    connected: Any, tmp_path: Path, replica_set: str
) -> None:
    """The switch's update meets ``NotWritablePrimary``, and so does PyMongo's retry
    of it (no new primary yet): the library cannot tell whether it applied, so it
    keeps both files and reads back which one the document holds."""
    connected()
    doc_cls, grid, _ = classes(tmp_path)
    doc = doc_cls(name="a")
    await doc.g.put(b"old" * 1000)
    await doc.save()
    old = doc.g.file_id
    await fail_point(replica_set, {"times": 2}, failCommands=["update"], errorCode=10107)
    with pytest.raises(PyMongoError, match="failpoint"):
        await doc.g.replace(b"new" * 1000)
    stored = await doc_cls.objects.get(pk=doc.pk)
    assert stored.g.file_id == old
    assert await stored.g.read() == b"old" * 1000
    db = asyncassets.get_db()
    assert await db[f"{grid}.files"].count_documents({}) == 2  # the new one waits
    await clean(doc_cls)
    assert await db[f"{grid}.files"].count_documents({}) == 1


async def test_a_switch_applied_without_a_majority_keeps_the_old_file_for_the_sweep(
    connected: Any, tmp_path: Path, replica_set: str
) -> None:
    """A write-concern error (``wtimeout``: no majority had the switch in time, as
    when the secondaries lag or the primary is cut off): applied, maybe not
    durable. The old file is not deleted; the proxy learns from the primary that
    the document holds the new one."""
    connected()
    doc_cls, grid, _ = classes(tmp_path)
    doc = doc_cls(name="a")
    await doc.g.put(b"old" * 1000)
    await doc.save()
    old = doc.g.file_id
    await fail_point(
        replica_set, {"times": 1}, failCommands=["update"],
        writeConcernError={"code": 64, "errmsg": "waiting for replication timed out"},
        errorLabels=[],
    )  # fmt: skip
    with pytest.raises(PyMongoError, match="timed out"):
        await doc.g.replace(b"new" * 1000)
    assert doc.g.file_id != old  # read back: the switch applied
    db = asyncassets.get_db()
    assert await db[f"{grid}.files"].count_documents({"_id": old}) == 1  # kept
    stored = await doc_cls.objects.get(pk=doc.pk)
    assert await stored.g.read() == b"new" * 1000
    await clean(doc_cls)
    assert await db[f"{grid}.files"].count_documents({"_id": old}) == 0


async def test_retryable_writes_make_a_labelled_step_down_invisible(
    connected: Any, tmp_path: Path, replica_set: str
) -> None:
    """mongod labels a step-down's ``NotWritablePrimary`` ``RetryableWriteError``;
    PyMongo then retries the write once on the new primary (``retryWrites=true``,
    the default), and the upload and the switch succeed, each written once."""
    commands = connected()
    doc_cls, _, _ = classes(tmp_path)
    doc = doc_cls(name="a")
    await doc.g.put(b"old" * 1000)
    await doc.save()
    for command in ("insert", "update"):
        await fail_point(
            replica_set, {"times": 1}, failCommands=[command], errorCode=10107,
            errorLabels=["RetryableWriteError"],
        )  # fmt: skip
        await doc.g.replace(pieces(b"x" * 4096, f"new {command}".encode()))
        stored = await doc_cls.objects.get(pk=doc.pk)
        assert await stored.g.read() == b"x" * 4096 + f"new {command}".encode()
    retried = [c for c in commands.writes() if "txnNumber" in c["command"]]
    assert retried, "the writes carry a transaction number: they are retryable"
    await clean(doc_cls)


async def test_without_retryable_writes_a_step_down_fails_the_write_and_keeps_data(
    connected: Any, tmp_path: Path, replica_set: str
) -> None:
    connected("retryWrites=false")
    doc_cls, _, _ = classes(tmp_path)
    doc = doc_cls(name="a")
    await doc.g.put(b"old" * 1000)
    await doc.save()
    await fail_point(
        replica_set, {"times": 1}, failCommands=["insert"], errorCode=10107,
        errorLabels=["RetryableWriteError"],
    )  # fmt: skip
    with pytest.raises(PyMongoError, match="failpoint"):
        await doc.g.replace(b"x" * 4096)
    assert await (await doc_cls.objects.get(pk=doc.pk)).g.read() == b"old" * 1000
    await clean(doc_cls)


async def test_a_transfer_whose_switch_meets_a_step_down_deletes_no_copy(
    connected: Any, tmp_path: Path, replica_set: str
) -> None:
    """A queued file (GridFS here, a directory remote): the transfer's switch fails
    with ``NotWritablePrimary``, its retry too. Neither copy is deleted; the transfer is retried
    and the file reads back whole from the remote copy."""
    connected()
    doc_cls, storage = queued_class(tmp_path, lease=2.0)
    doc = doc_cls()
    await doc.q.put(b"queued" * 1000, filename="q.bin")
    await doc.save()
    store = storage.bind(asyncassets.get_db())
    await fail_point(replica_set, {"times": 2}, failCommands=["update"], errorCode=10107)
    with pytest.raises(TransferFailed, match="it will be retried"):
        await store.transfer(doc.q.file_id)
    entry = await store.find(doc.q.file_id)
    assert entry is not None and entry.get("local"), "the local copy is still named"
    assert entry["transfer"]["state"] == "pending" and not entry.get("remote")
    assert await (await doc_cls.objects.get(pk=doc.pk)).q.read() == b"queued" * 1000
    entry = await store.transfer(doc.q.file_id)  # the retry
    assert entry.get("remote") and not entry.get("local")
    assert await (await doc_cls.objects.get(pk=doc.pk)).q.read() == b"queued" * 1000
    await clean(doc_cls)


async def test_a_transfer_switched_without_a_majority_keeps_the_local_copy(
    connected: Any, tmp_path: Path, replica_set: str
) -> None:
    """The switch applied, but a write-concern error says a majority may not have it:
    a failover could roll the entry back to the local copy, so it is not deleted
    now; the orphan sweep removes it."""
    connected()
    doc_cls, storage = queued_class(tmp_path)
    doc = doc_cls()
    await doc.q.put(b"queued" * 1000, filename="q.bin")
    await doc.save()
    store = storage.bind(asyncassets.get_db())
    await fail_point(
        replica_set, {"times": 1}, failCommands=["update"],
        writeConcernError={"code": 64, "errmsg": "waiting for replication timed out"},
        errorLabels=[],
    )  # fmt: skip
    entry = await store.transfer(doc.q.file_id)
    assert entry.get("remote") and not entry.get("local")
    chunks = asyncassets.get_db()[f"{storage.collection_name}.chunks"]  # the local copy
    assert await chunks.count_documents({"files_id": doc.q.file_id}) == 6  # kept
    assert await (await doc_cls.objects.get(pk=doc.pk)).q.read() == b"queued" * 1000
    await asyncio.sleep(1.1)  # the sweep dates chunks by their ObjectId, to the second
    await clean(doc_cls)
    assert await chunks.count_documents({"files_id": doc.q.file_id}) == 0
