"""tus under faults, with tuspy (the tus client from PyPI) against uvicorn processes.

The server (tests/_tus_server.py) and each client (tests/_tus_client.py) are
processes of their own, killed with SIGKILL:

* a client killed at 50% resumes from the server's durable offset, which is at
  least what the server acknowledged, so it re-sends at most one chunk;
* the server killed mid-upload and started again loses nothing acknowledged;
* two clients resuming the same upload at once: one wins, the other gets 409;

* the server killed in the middle of a finish (``TUS_DIE_AT``): before the
  switch, the retried last ``PATCH`` attaches the upload; after it, with the
  file replaced, deleted or assigned and saved since, the retry is ``204`` and
  the document keeps that change (GridFS and a directory);

each on GridFS, a directory and S3 (moto), byte-exact, with the invariants
checked after: the document references the complete file, ``check()`` finds
nothing wrong, and after a sweep nothing is left staged or orphaned.
Small files by default (4 MiB in 256 KiB chunks); 1 GiB ones under ``slow``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import asyncassets
from asyncassets import Document
from asyncassets.fields import FileField
from asyncassets.storage import FileSystemStorage, GridFSStorage, S3Storage, Storage
from asyncassets.testing import database_uri

HERE = Path(__file__).resolve().parent
CHUNK = 256 * 1024


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """tests/_tus_server.py as a process, started and killed at will."""

    def __init__(self, uri: str, kind: str, where: str, env: dict[str, str]) -> None:
        self.args = [str(free_port()), uri, kind, where]
        self.env = {**os.environ, **env}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.args[0]}/uploads/"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "_tus_server.py"), *self.args], env=self.env
        )
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(
                ("127.0.0.1", int(self.args[0])), timeout=0.2
            ):
                return
            assert self.proc.poll() is None, "the tus server exited"
            assert time.monotonic() < deadline, "the tus server did not start"
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


def client(
    server: Server, path: Path, store: Path, doc: Any, retries: int = 3, chunk: int = CHUNK,
    go_at: float | None = None,
) -> Any:
    env = {**os.environ, "TUS_GO_AT": str(go_at)} if go_at is not None else None
    return subprocess.Popen(
        [sys.executable, str(HERE / "_tus_client.py"), server.url, str(path), str(store),
         str(doc.pk), str(chunk), str(retries)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


def read_until(proc: Any, offset: int) -> int:
    """Read the client's lines until it acknowledged ``offset`` or more: that offset."""
    assert proc.stdout is not None
    for line in proc.stdout:
        word, _, value = line.partition(" ")
        if word == "offset" and int(value) >= offset:
            return int(value)
    raise AssertionError(f"the client ended first: {proc.wait()} {proc.stderr.read()}")


def finish(proc: Any) -> int:
    """Wait for a client to end well; the offset it started from."""
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    lines = out.splitlines()
    assert lines[-1] == "done", out
    return int(lines[0].split()[1])


def storage_for(kind: str, tmp_path: Path, s3: Any) -> tuple[Storage, str, dict[str, str]]:
    """The storage, the server's argument naming it, its environment."""
    if kind == "gridfs":
        return GridFSStorage("tusfaults"), "", {}
    if kind == "filesystem":
        root = tmp_path / "files"
        return FileSystemStorage(root, collection_name="tusfaults"), str(root), {}
    env = {"AWS_ACCESS_KEY_ID": s3.access_key_id, "AWS_SECRET_ACCESS_KEY": s3.secret_access_key}
    return (S3Storage(**s3.options, collection_name="tusfaults"),
            f"{s3.endpoint_url}|{s3.name}", env)


#: Every storage; the bytes are staged in MongoDB whatever the storage, so only
#: the finish differs: by default the server-kill and race tests run on GridFS
#: alone, on the others under ``slow``.
ALL = pytest.mark.parametrize("world", ["gridfs", "filesystem", "s3"], indirect=True)
GRIDFS_BY_DEFAULT = pytest.mark.parametrize(
    "world",
    ["gridfs", pytest.param("filesystem", marks=pytest.mark.slow),
     pytest.param("s3", marks=pytest.mark.slow)],
    indirect=True,
)


@pytest.fixture
async def world(request, asyncassets_db, asyncassets_server_uri, tmp_path) -> Any:
    kind = request.param
    s3 = request.getfixturevalue("asyncassets_s3_bucket") if kind == "s3" else None
    storage, where, env = storage_for(kind, tmp_path, s3)

    class TusFaultDoc(Document):
        file = FileField(storage=storage)
        meta = {"collection": "tus_fault_docs"}

    server = Server(database_uri(asyncassets_server_uri, asyncassets_db.name), kind, where, env)
    server.start()
    try:
        yield TusFaultDoc, server, asyncassets_db
    finally:
        server.kill()


@pytest.fixture
def payload(tmp_path: Path) -> Iterator[tuple[Path, bytes]]:
    data = os.urandom(4 * 1024 * 1024 + 4321)
    path = tmp_path / "upload.bin"
    path.write_bytes(data)
    yield path, data


async def streamed_sha256(proxy: Any) -> str:
    hasher = hashlib.sha256()
    async for piece in proxy.stream():
        hasher.update(piece)
    return hasher.hexdigest()


async def invariants(cls: Any, doc: Any, data: bytes | str, db: Any) -> None:
    """Byte-exact, referenced, nothing wrong, nothing left after a sweep (``data``:
    the bytes, or the SHA-256 of a file too large to hold)."""
    digest = data if isinstance(data, str) else hashlib.sha256(data).hexdigest()
    stored = await cls.objects(pk=doc.pk).first()
    assert await streamed_sha256(stored.file) == digest
    report = await asyncassets.check(verify=True, buckets="tusfaults")
    assert report.ok, str(report)
    await asyncassets.sweep_orphans(grace=0, buckets="tusfaults")
    assert await db["tusfaults.files"].count_documents({}) == 1
    assert await db["tusfaults.uploads.staged"].count_documents({}) == 0
    assert await streamed_sha256(stored.file) == digest


@ALL
async def test_a_client_killed_at_half_resumes_and_resends_at_most_one_chunk(
    world, payload, tmp_path
):
    cls, server, db = world
    path, data = payload
    doc = cls()
    await doc.save()
    store = tmp_path / "urls.json"
    first = client(server, path, store, doc)
    acknowledged = read_until(first, len(data) // 2)
    first.send_signal(signal.SIGKILL)
    first.wait()
    resumed_from = finish(client(server, path, store, doc))
    # Nothing acknowledged was lost, so what the first client sent past its last
    # acknowledged offset (one chunk at most) is all that is sent again.
    assert acknowledged <= resumed_from <= acknowledged + CHUNK
    await invariants(cls, doc, data, db)


@GRIDFS_BY_DEFAULT
async def test_the_server_killed_mid_upload_and_restarted_loses_nothing(
    world, payload, tmp_path
):
    cls, server, db = world
    path, data = payload
    doc = cls()
    await doc.save()
    store = tmp_path / "urls.json"
    first = client(server, path, store, doc)
    acknowledged = read_until(first, len(data) // 2)
    server.kill()
    first.kill()
    first.wait()
    server.start()
    resumed_from = finish(client(server, path, store, doc))
    assert acknowledged <= resumed_from <= acknowledged + CHUNK
    await invariants(cls, doc, data, db)


@GRIDFS_BY_DEFAULT
async def test_two_clients_resuming_at_once_one_wins_the_other_gets_409(
    world, payload, tmp_path
):
    cls, server, db = world
    path, data = payload
    doc = cls()
    await doc.save()
    store = tmp_path / "urls.json"
    first = client(server, path, store, doc)
    read_until(first, len(data) // 4)
    first.send_signal(signal.SIGKILL)
    first.wait()
    time.sleep(2.5)  # the killed client's PATCH may hold the lease (2 s) # noqa: ASYNC251
    # Both read the offset before either sends: on a loaded machine one client's
    # start could otherwise come after the other's whole upload (both then end well).
    go_at = time.time() + 5
    racers = [client(server, path, store, doc, retries=0, go_at=go_at) for _ in range(2)]
    results = [racer.communicate(timeout=120) for racer in racers]
    codes = sorted(racer.returncode for racer in racers)
    assert codes[0] == 0 and codes[1] != 0, results
    loser = next(err for racer, (_, err) in zip(racers, results, strict=True)
                 if racer.returncode)
    assert "409" in loser, loser
    await invariants(cls, doc, data, db)


def start_durable_s3(port: int, log: Path) -> subprocess.Popen[bytes]:
    """moto behind a write-ahead log (tests/_durable_s3.py): killed, it keeps its writes."""
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "_durable_s3.py"), str(port), str(log)],
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while True:
        with contextlib.suppress(OSError), socket.create_connection(
            ("127.0.0.1", port), timeout=0.2
        ):
            return proc
        assert proc.poll() is None and time.monotonic() < deadline, "moto did not start"
        time.sleep(0.05)


async def test_s3_killed_at_the_finish_keeps_the_upload_and_a_retry_attaches_it(
    asyncassets_db, tmp_path
):
    import boto3
    from _tus import app_for, client, create, patch

    from asyncassets.storage import Retry

    port, log = free_port(), tmp_path / "s3.log"
    endpoint = f"http://127.0.0.1:{port}"
    moto = start_durable_s3(port, log)
    try:
        keys = {"aws_access_key_id": "k", "aws_secret_access_key": "s"}
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                     **keys).create_bucket(Bucket="tus-kill")

        class TusKillDoc(Document):
            owner = asyncassets.fields.StringField()
            file = FileField(storage=S3Storage(
                "tus-kill", endpoint_url=endpoint, region="us-east-1",
                access_key_id="k", secret_access_key="s", collection_name="tuskill",
                retry=Retry(attempts=2, delay=0.05)))

        doc = TusKillDoc(owner="ann")
        await doc.save()
        data = os.urandom(3 * 1024 * 1024 + 17)  # one PUT: the log replays it
        async with client(app_for(TusKillDoc)) as http:
            location = (await create(http, doc, len(data))).headers["location"]
            assert (await patch(http, location, 0, data[:-1000])).status_code == 204
            moto.send_signal(signal.SIGKILL)
            moto.wait()
            last = await patch(http, location, len(data) - 1000, data[-1000:])
            assert last.status_code == 503, last.text
            # HEAD attaches a complete upload before it answers: not while S3 is
            # down (a client that took its full offset for done would stop here).
            head = await http.head(location)
            assert head.status_code == 503 and head.headers["retry-after"] == "1"
            assert (await TusKillDoc.objects(pk=doc.pk).first()).file.grid_id is None
            moto = start_durable_s3(port, log)
            again = await patch(http, location, len(data), b"")
            assert again.status_code == 204, again.text
        stored = await TusKillDoc.objects(pk=doc.pk).first()
        assert await stored.file.read() == data
        assert (await asyncassets.check(verify=True, buckets="tuskill")).ok
        await asyncassets.sweep_orphans(grace=0, buckets="tuskill")
        assert await asyncassets_db["tuskill.files"].count_documents({}) == 1
        assert await asyncassets_db["tuskill.uploads.staged"].count_documents({}) == 0
    finally:
        moto.kill()
        moto.wait()


@pytest.fixture
async def big_world(request, tmp_path) -> Any:
    """As ``world``, on a SecantusDB of its own on disk: the session's server keeps
    its data in memory, which a 1 GiB file overflows."""
    from asyncassets.embedded import EmbeddedServer

    kind = request.param
    s3 = request.getfixturevalue("asyncassets_s3_bucket") if kind == "s3" else None
    storage, where, env = storage_for(kind, tmp_path, s3)
    mongo = EmbeddedServer(tmp_path / "db").start()
    uri = database_uri(mongo.uri, "tus_big")
    asyncassets.connect(host=uri, alias="default")

    class TusFaultDoc(Document):
        file = FileField(storage=storage)
        meta = {"collection": "tus_fault_docs"}

    server = Server(uri, kind, where, env)
    server.start()
    try:
        yield TusFaultDoc, server, asyncassets.connection.get_db()
    finally:
        server.kill()
        await asyncassets.disconnect()
        mongo.stop()


@pytest.mark.slow
@pytest.mark.parametrize("big_world", ["gridfs", "filesystem", "s3"], indirect=True)
async def test_a_1_gib_upload_killed_at_half_resumes_byte_exact(big_world, tmp_path):
    """The issue's case: 1 GiB in 8 MiB chunks, the client SIGKILLed at 50%."""
    cls, server, db = big_world
    path, hasher = tmp_path / "big.bin", hashlib.sha256()
    with path.open("wb") as out:
        for _ in range(1024):
            block = os.urandom(1024 * 1024)
            hasher.update(block)
            out.write(block)
    size, chunk = 1024 * 1024 * 1024, 8 * 1024 * 1024
    doc = cls()
    await doc.save()
    store = tmp_path / "urls.json"
    first = client(server, path, store, doc, chunk=chunk)
    acknowledged = read_until(first, size // 2)
    first.send_signal(signal.SIGKILL)
    first.wait()
    resumed_from = finish(client(server, path, store, doc, chunk=chunk))
    assert acknowledged <= resumed_from <= acknowledged + chunk
    await invariants(cls, doc, hasher.hexdigest(), db)


# -- a server killed in the middle of a finish ---------------------------------------------


@pytest.fixture
async def finish_world(request, asyncassets_db, asyncassets_server_uri, tmp_path) -> Any:
    """A document class on GridFS or a directory, and ``serve(die_at=None)``: a tus
    server process that SIGKILLs itself at that point of a finish (tests/_tus_server.py)."""
    kind = request.param
    storage, where, env = storage_for(kind, tmp_path, None)

    class TusFaultDoc(Document):
        file = FileField(storage=storage)
        meta = {"collection": "tus_fault_docs"}

    uri = database_uri(asyncassets_server_uri, asyncassets_db.name)
    servers: list[Server] = []

    def serve(die_at: str | None = None) -> Server:
        server = Server(uri, kind, where, {**env, **({"TUS_DIE_AT": die_at} if die_at else {})})
        servers.append(server)
        server.start()
        return server

    try:
        yield kind, TusFaultDoc, serve, asyncassets_db, tmp_path / "files"
    finally:
        for server in servers:
            server.kill()


STAGED_AND_IN_PLACE = pytest.mark.parametrize(
    "finish_world", ["gridfs", "filesystem"], indirect=True
)
TUS_HEADERS = {"Tus-Resumable": "1.0.0"}


async def tus_create(http: Any, server: Server, doc: Any, length: int) -> str:
    import base64

    meta = "doc " + base64.b64encode(str(doc.pk).encode()).decode()
    created = await http.post(server.url, headers={
        **TUS_HEADERS, "Upload-Length": str(length), "Upload-Metadata": meta})
    assert created.status_code == 201, created.text
    return str(created.headers["location"])


async def tus_patch(http: Any, location: str, offset: int, data: bytes) -> Any:
    return await http.patch(location, content=data, headers={
        **TUS_HEADERS, "Content-Type": "application/offset+octet-stream",
        "Upload-Offset": str(offset)})


def on(server: Server, location: str) -> str:
    """The upload's URL on another server process (another port)."""
    from urllib.parse import urlsplit

    return f"http://127.0.0.1:{server.args[0]}{urlsplit(location).path}"


async def last_patch_killing_the_server(http: Any, server: Server, location: str,
                                        data: bytes) -> None:
    """Send the last bytes: the server dies in the finish they start (no answer)."""
    import httpx

    assert (await tus_patch(http, location, 0, data[:-1000])).status_code == 204
    with pytest.raises(httpx.TransportError):
        await tus_patch(http, location, len(data) - 1000, data[-1000:])
    assert server.proc is not None
    assert server.proc.wait(timeout=10) == -signal.SIGKILL


async def retry_last_patch(http: Any, location: str, length: int) -> Any:
    """The client's retry of the last PATCH (empty, at the full offset), again while
    the dead server's lease holds the upload (409), as tus-js-client does."""
    import asyncio

    deadline = time.monotonic() + 15
    while True:
        answer = await tus_patch(http, location, length, b"")
        if answer.status_code != 409 or time.monotonic() > deadline:
            return answer
        await asyncio.sleep(0.25)


async def nothing_left(kind: str, db: Any, root: Path, files: int) -> None:
    """After a sweep (a killed attempt may leave an unreferenced file for it):
    exactly ``files`` entries (objects, whole chunk sets), nothing staged, and
    ``check()`` clean."""
    await asyncassets.sweep_orphans(grace=0, buckets="tusfaults")
    assert await db["tusfaults.files"].count_documents({}) == files
    assert await db["tusfaults.uploads.staged"].count_documents({}) == 0
    if kind == "gridfs":
        ids = [d["_id"] async for d in db["tusfaults.files"].find({}, {"_id": 1})]
        assert await db["tusfaults.chunks"].count_documents({"files_id": {"$nin": ids}}) == 0
    else:
        stored = [p for p in root.rglob("*") if p.is_file()]  # noqa: ASYNC240 (a few files)
        assert len(stored) == files
    report = await asyncassets.check(verify=True, buckets="tusfaults")
    assert report.ok, str(report)


@STAGED_AND_IN_PLACE
@pytest.mark.parametrize("action", ["replace", "delete", "save", "update", "modify"])
async def test_a_finish_killed_after_the_switch_is_not_attached_again_after_a_change(
    finish_world, action
):
    """The server dies after the switch attached the upload, before its session was
    marked done; the user then replaces (or deletes, or assigns and saves) the file
    through the document, or moves the field with a write that records nothing
    (``update(unset__file=True)``, ``modify(set__file=<another document's file>)``);
    the client's retried last PATCH is complete (204, full offset) and attaches
    nothing: the document keeps the user's change, nothing leaks."""
    import httpx

    kind, cls, serve, db, root = finish_world
    doc = cls()
    await doc.save()
    if action != "delete":
        await doc.file.put(b"the first file")  # the switch replaces a file
    data = os.urandom(300_000)
    async with httpx.AsyncClient(timeout=30) as http:
        dying = serve(die_at="done")
        location = await tus_create(http, dying, doc, len(data))
        await last_patch_killing_the_server(http, dying, location, data)
        stored = await cls.objects(pk=doc.pk).first()
        assert await stored.file.read() == data  # the switch applied
        if action == "replace":
            await stored.file.replace(b"the user's own file")
        elif action == "save":
            stored.file = b"the user's own file"
            await stored.save()
        elif action == "update":
            await cls.objects(pk=doc.pk).update(unset__file=True)
        elif action == "modify":
            other = cls()
            await other.file.put(b"the user's own file")
            await other.save()
            await cls.objects(pk=doc.pk).modify(set__file=other.file.grid_id)
        else:
            await stored.file.delete()
        answer = await retry_last_patch(http, on(serve(), location), len(data))
    assert answer.status_code == 204, answer.text
    assert answer.headers["upload-offset"] == str(len(data))
    final = await cls.objects(pk=doc.pk).first()
    if action in ("delete", "update"):
        assert final.file.grid_id is None
    else:
        assert await final.file.read() == b"the user's own file"
    # What the writes that record nothing detached is an orphan the sweep removes.
    await nothing_left(kind, db, root, files=0 if action in ("delete", "update") else 1)


@STAGED_AND_IN_PLACE
@pytest.mark.parametrize("changed", [False, True], ids=["unchanged", "replaced meanwhile"])
async def test_a_finish_killed_before_the_switch_is_attached_by_the_retry_unless_changed(
    finish_world, changed
):
    """The server dies right before the switch. The retried last PATCH attaches the
    upload (204); again it is 204 and attaches nothing. If the user replaced the
    file in between, the retry is 204 and attaches nothing: the field no longer
    holds what the finish was switching from, so the later change stands."""
    import httpx

    kind, cls, serve, db, root = finish_world
    doc = cls()
    await doc.save()
    await doc.file.put(b"the first file")
    data = os.urandom(300_000)
    async with httpx.AsyncClient(timeout=30) as http:
        dying = serve(die_at="switch")
        location = await tus_create(http, dying, doc, len(data))
        await last_patch_killing_the_server(http, dying, location, data)
        stored = await cls.objects(pk=doc.pk).first()
        assert await stored.file.read() == b"the first file"
        if changed:
            await stored.file.replace(b"the user's own file")
        answer = await retry_last_patch(http, on(serve(), location), len(data))
        assert answer.status_code == 204, answer.text
        assert answer.headers["upload-offset"] == str(len(data))
        again = await tus_patch(http, on(serve(), location), len(data), b"")
        assert again.status_code == 204, again.text
    want = b"the user's own file" if changed else data
    assert await (await cls.objects(pk=doc.pk).first()).file.read() == want
    await nothing_left(kind, db, root, files=1)
