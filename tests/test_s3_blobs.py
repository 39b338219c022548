"""S3Blobs against a real S3 server (moto, started by the test plugin), no mocks.

Faults are real too: a loopback HTTP proxy between the client and moto answers
503, delays or cuts responses short, and counts the requests; the server
itself is killed mid-upload.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from asyncassets.errors import KeyTaken, StorageError, StoredObjectChanged, StoredObjectMissing
from asyncassets.storage.objects.blobs import Blobs, BlobWriter
from asyncassets.storage.objects.s3 import S3Blobs
from asyncassets.storage.retry import Retry
from asyncassets.testing import S3Bucket

botocore_session = pytest.importorskip("botocore.session")

MiB = 1024 * 1024
PART = 5 * MiB  # S3's smallest part: the fastest multipart uploads
PIECE = 256 * 1024
FAST_RETRY = Retry(attempts=3, delay=0.01, max_delay=0.05, jitter=False)


def payload(size: int) -> bytes:
    """Bytes that differ at every offset, so a misplaced piece shows."""
    block = os.urandom(min(size, 1 * MiB) or 1)
    return (block * (size // len(block) + 1))[:size] if size else b""


def make_blobs(made: S3Bucket, **overrides: Any) -> S3Blobs:
    options: dict[str, Any] = {
        **made.options,
        "prefix": "media/",
        "part_size": PART,
        "piece_size": PIECE,
        "retry": FAST_RETRY,
    }
    options.update(overrides)
    return S3Blobs(**options)


@pytest.fixture
async def blobs(asyncassets_s3_bucket: S3Bucket) -> AsyncIterator[S3Blobs]:
    store = make_blobs(asyncassets_s3_bucket)
    yield store
    await store.aclose()


@pytest.fixture
def raw(asyncassets_s3_bucket: S3Bucket) -> Iterator[Any]:
    """A plain synchronous botocore client, to look at the bucket behind S3Blobs' back."""
    bucket = asyncassets_s3_bucket
    client = botocore_session.get_session().create_client(
        "s3",
        endpoint_url=bucket.endpoint_url,
        region_name=bucket.region,
        aws_access_key_id=bucket.access_key_id,
        aws_secret_access_key=bucket.secret_access_key,
    )
    yield client
    client.close()


def pending_uploads(raw: Any, bucket: S3Bucket) -> list[str]:
    return [u["Key"] for u in raw.list_multipart_uploads(Bucket=bucket.name).get("Uploads", ())]


def object_keys(raw: Any, bucket: S3Bucket) -> list[str]:
    return [o["Key"] for o in raw.list_objects_v2(Bucket=bucket.name).get("Contents", ())]


async def write_all(
    writer: BlobWriter, data: bytes, chunk: int = 777_777, *, overwrite: bool = False
) -> None:
    for start in range(0, len(data), chunk):
        await writer.write(data[start : start + chunk])
    await writer.commit(overwrite=overwrite)


async def read_all(blobs: S3Blobs, key: str, start: int, end: int) -> bytes:
    pieces = [piece async for piece in blobs.open_reader(key, start, end)]
    assert all(0 < len(piece) <= blobs.piece_size for piece in pieces)
    return b"".join(pieces)


# -- a real HTTP proxy on loopback, to inject faults --------------------------


@dataclass
class Seen:
    method: str
    target: str
    headers: dict[str, str]


#: What the proxy does with a request: forward it, or a fault.
Action = tuple[str, float]


@dataclass
class FaultProxy:
    """Forwards each request to moto on a fresh connection, unless ``rule`` says otherwise.

    ``rule(seen)`` returns ``("forward", 0)``, ``("status", 503)``, ``("delay", seconds)``
    (then forward) or ``("cut", n)`` (forward, but only ``n`` bytes of the body).
    """

    upstream_port: int
    rule: Callable[[Seen], Action] = lambda seen: ("forward", 0)
    seen: list[Seen] = field(default_factory=list)
    server: asyncio.AbstractServer | None = None
    arrived: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def wait_for(self, predicate: Callable[[list[Seen]], bool]) -> None:
        """Until the requests seen so far satisfy ``predicate``."""
        async with self.arrived:
            await self.arrived.wait_for(lambda: predicate(self.seen))

    @property
    def endpoint_url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def start(self) -> FaultProxy:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    def count(self, method: str | None = None) -> int:
        return sum(1 for s in self.seen if method is None or s.method == method)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            headers = {}
            for line in lines[1:]:
                if ":" in line:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
            if headers.get("expect", "").lower() == "100-continue":
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # botocore waits for it
                await writer.drain()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            seen = Seen(method, target, headers)
            self.seen.append(seen)
            async with self.arrived:
                self.arrived.notify_all()
            action, arg = self.rule(seen)
            if action == "status":
                xml = b"<Error><Code>SlowDown</Code><Message>Reduce your rate</Message></Error>"
                writer.write(
                    f"HTTP/1.1 {int(arg)} Injected\r\nContent-Type: application/xml\r\n"
                    f"Content-Length: {len(xml)}\r\nConnection: close\r\n\r\n".encode()
                    + (xml if method != "HEAD" else b"")
                )
                await writer.drain()
                return
            if action == "delay":
                await asyncio.sleep(arg)
            response = await self._forward(lines, body)
            split = response.index(b"\r\n\r\n") + 4
            status_and_headers = [
                line
                for line in response[: split - 4].split(b"\r\n")
                if not line.lower().startswith(b"connection:")
            ]
            out = b"\r\n".join([*status_and_headers, b"Connection: close"]) + b"\r\n\r\n"
            rest = response[split:]
            writer.write(out + (rest[: int(arg)] if action == "cut" else rest))
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _forward(self, lines: list[str], body: bytes) -> bytes:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        kept = [
            line
            for line in lines[1:]
            if line and not line.lower().startswith(("connection:", "expect:"))
        ]
        up_writer.write("\r\n".join([lines[0], *kept, "Connection: close", "", ""]).encode())
        up_writer.write(body)
        await up_writer.drain()
        response = await up_reader.read()
        up_writer.close()
        return response


@pytest.fixture
async def proxy(asyncassets_s3_bucket: S3Bucket) -> AsyncIterator[FaultProxy]:
    port = int(asyncassets_s3_bucket.endpoint_url.rsplit(":", 1)[1].strip("/"))
    fault_proxy = await FaultProxy(port).start()
    yield fault_proxy
    await fault_proxy.close()


@pytest.fixture
async def proxied(asyncassets_s3_bucket: S3Bucket, proxy: FaultProxy) -> AsyncIterator[S3Blobs]:
    store = make_blobs(asyncassets_s3_bucket, endpoint_url=proxy.endpoint_url)
    yield store
    await store.aclose()


# -- the protocol -------------------------------------------------------------


def test_implements_the_protocol(asyncassets_s3_bucket: S3Bucket) -> None:
    store = make_blobs(asyncassets_s3_bucket)
    assert isinstance(store, Blobs)
    assert isinstance(store.open_writer("k"), BlobWriter)
    assert store.url == f"s3://{asyncassets_s3_bucket.name}/media/"


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="5 MiB"):
        S3Blobs("b", part_size=MiB)
    with pytest.raises(ValueError, match="bucket"):
        S3Blobs("a/b")
    with pytest.raises(ValueError, match="both"):
        S3Blobs("b", access_key_id="only")


def test_missing_extra_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "aiobotocore.session", None)
    with pytest.raises(StorageError, match=r"pip install 'asyncassets\[s3\]'"):
        S3Blobs("b")


@pytest.mark.parametrize(
    "size",
    [0, 1, PART - 1, PART, PART + 1, 2 * PART + 1],
    ids=["empty", "one", "part-1", "part", "part+1", "2parts+1"],
)
async def test_round_trip_across_part_boundaries(
    blobs: S3Blobs, raw: Any, asyncassets_s3_bucket: S3Bucket, size: int
) -> None:
    data = payload(size)
    await write_all(blobs.open_writer("a/b.bin"), data)
    assert await read_all(blobs, "a/b.bin", 0, size) == data
    info = await blobs.stat("a/b.bin")
    assert info is not None and info.key == "a/b.bin" and info.size == size
    assert info.modified.utcoffset() is not None and info.modified.utcoffset().total_seconds() == 0
    assert object_keys(raw, asyncassets_s3_bucket) == ["media/a/b.bin"]
    assert pending_uploads(raw, asyncassets_s3_bucket) == []


async def test_ranged_reads(blobs: S3Blobs) -> None:
    data = payload(PART + 10)
    await write_all(blobs.open_writer("r"), data, chunk=MiB)
    n = len(data)
    for start, end in [(0, n), (n - 1, n), (0, 1), (PART - 5, PART + 5), (100, 1124), (7, 7)]:
        assert await read_all(blobs, "r", start, end) == data[start:end], (start, end)
    with pytest.raises(ValueError):
        blobs.open_reader("r", 5, 4)
    with pytest.raises(StorageError, match="only"):
        await read_all(blobs, "r", 0, n + 10)


async def test_empty_range_sends_no_request(proxied: S3Blobs, proxy: FaultProxy) -> None:
    assert [piece async for piece in proxied.open_reader("never-written", 3, 3)] == []
    assert proxy.seen == []


async def test_ranged_read_asks_only_for_the_range(proxied: S3Blobs, proxy: FaultProxy) -> None:
    await write_all(proxied.open_writer("k"), payload(3000))
    proxy.seen.clear()
    await read_all(proxied, "k", 1000, 2024)
    assert [s.headers.get("range") for s in proxy.seen] == ["bytes=1000-2023"]


async def test_missing_key(blobs: S3Blobs) -> None:
    with pytest.raises(StoredObjectMissing, match="no object") as caught:
        await read_all(blobs, "nope", 0, 10)
    assert caught.value.key == "nope" and caught.value.storage == blobs.url
    assert await blobs.stat("nope") is None
    assert await blobs.delete("nope") is True


async def test_list_is_relative_to_the_prefix(
    blobs: S3Blobs, raw: Any, asyncassets_s3_bucket: S3Bucket
) -> None:
    raw.put_object(Bucket=asyncassets_s3_bucket.name, Key="elsewhere/x", Body=b"1")
    for key in ("a", "b/c", "b/d/e"):
        await write_all(blobs.open_writer(key), key.encode())
    pending = blobs.open_writer("pending")
    await pending.write(payload(PART))  # a multipart upload in progress: not listed
    listed = {info.key: info.size for info in [info async for info in blobs.list()]}
    assert listed == {"a": 1, "b/c": 3, "b/d/e": 5}
    await pending.abort()
    assert await blobs.delete("b/c") is True
    assert sorted([info.key async for info in blobs.list()]) == ["a", "b/d/e"]


# -- overwrite, abort, cancellation ---------------------------------------------


@pytest.mark.parametrize("size", [10, PART + 1], ids=["put", "multipart"])
async def test_no_overwrite_keeps_the_old_object(
    blobs: S3Blobs, raw: Any, asyncassets_s3_bucket: S3Bucket, size: int
) -> None:
    await write_all(blobs.open_writer("k"), b"old")
    writer = blobs.open_writer("k")
    with pytest.raises(KeyTaken, match="overwrite=True"):
        await write_all(writer, payload(size))
    assert await read_all(blobs, "k", 0, 3) == b"old"
    assert pending_uploads(raw, asyncassets_s3_bucket) == []
    await writer.abort()  # harmless afterwards
    assert await read_all(blobs, "k", 0, 3) == b"old"
    new = payload(size)
    await write_all(blobs.open_writer("k"), new, overwrite=True)
    assert await read_all(blobs, "k", 0, size) == new


async def test_two_writers_one_key_the_second_commit_is_refused(
    blobs: S3Blobs, raw: Any, asyncassets_s3_bucket: S3Bucket
) -> None:
    # Both uploads run side by side; the completions are sent one after the other,
    # as moto (unlike S3) does not make two simultaneous conditional completions atomic.
    first, second = blobs.open_writer("race"), blobs.open_writer("race")
    datas = [payload(PART + 1), payload(PART + 1)]
    await asyncio.gather(first.write(datas[0]), second.write(datas[1]))
    assert len(pending_uploads(raw, asyncassets_s3_bucket)) == 2
    await first.commit()
    with pytest.raises(KeyTaken):
        await second.commit()
    assert await read_all(blobs, "race", 0, len(datas[0])) == datas[0]
    assert pending_uploads(raw, asyncassets_s3_bucket) == []


async def test_abort_after_parts_leaves_nothing(
    blobs: S3Blobs, raw: Any, asyncassets_s3_bucket: S3Bucket
) -> None:
    writer = blobs.open_writer("k")
    await writer.write(payload(2 * PART + 3))
    assert pending_uploads(raw, asyncassets_s3_bucket) == ["media/k"]
    await writer.abort()
    await writer.abort()  # idempotent
    assert pending_uploads(raw, asyncassets_s3_bucket) == []
    assert object_keys(raw, asyncassets_s3_bucket) == []
    with pytest.raises(StorageError, match="aborted"):
        await writer.write(b"more")


async def test_abort_after_commit_is_a_no_op(blobs: S3Blobs) -> None:
    writer = blobs.open_writer("k")
    await write_all(writer, b"kept")
    await writer.abort()
    assert await read_all(blobs, "k", 0, 4) == b"kept"
    with pytest.raises(StorageError, match="already committed"):
        await writer.commit()


def is_upload_part(seen: Seen) -> bool:
    return seen.method == "PUT" and "partNumber=" in seen.target


async def test_cancel_mid_write_then_abort_leaves_nothing(
    proxied: S3Blobs, proxy: FaultProxy, raw: Any, asyncassets_s3_bucket: S3Bucket
) -> None:
    proxy.rule = lambda s: ("delay", 0.4) if is_upload_part(s) else ("forward", 0)
    writer = proxied.open_writer("k")
    task = asyncio.ensure_future(write_all(writer, payload(3 * PART), chunk=MiB))
    await proxy.wait_for(lambda seen: proxy.count("PUT") >= 2)  # part 2 waits for part 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await writer.abort()
    await asyncio.sleep(0.5)  # a part request still travelling lands now
    assert pending_uploads(raw, asyncassets_s3_bucket) == []
    assert object_keys(raw, asyncassets_s3_bucket) == []


@pytest.mark.parametrize("size", [10, PART + 1], ids=["put", "multipart"])
async def test_cancel_mid_commit_then_abort_leaves_nothing(
    proxied: S3Blobs, proxy: FaultProxy, raw: Any, asyncassets_s3_bucket: S3Bucket, size: int
) -> None:
    def finishing(seen: Seen) -> bool:
        return (seen.method == "POST" and "uploadId=" in seen.target) or (
            seen.method == "PUT" and "partNumber=" not in seen.target
        )

    proxy.rule = lambda s: ("delay", 0.3) if finishing(s) else ("forward", 0)
    writer = proxied.open_writer("k")
    await writer.write(payload(size))
    commit = asyncio.ensure_future(writer.commit())
    await proxy.wait_for(lambda seen: any(finishing(s) for s in seen))
    commit.cancel()
    with pytest.raises(asyncio.CancelledError):
        await commit
    await writer.abort()  # waits for the reply, then deletes what the commit made
    assert object_keys(raw, asyncassets_s3_bucket) == []
    assert pending_uploads(raw, asyncassets_s3_bucket) == []


# -- retries and errors -----------------------------------------------------------


async def test_transient_503s_are_retried(proxied: S3Blobs, proxy: FaultProxy) -> None:
    failures = {"left": 2}

    def rule(seen: Seen) -> Action:
        if failures["left"]:
            failures["left"] -= 1
            return ("status", 503)
        return ("forward", 0)

    proxy.rule = rule
    data = payload(PART + 7)
    await write_all(proxied.open_writer("k"), data)  # first request: create upload
    failures["left"] = 2
    assert await read_all(proxied, "k", 0, len(data)) == data
    failures["left"] = 2
    assert (await proxied.stat("k")) is not None
    # 2 refused + create, 2 parts, complete; 2 refused + GET; 2 refused + HEAD
    assert proxy.count() == 6 + 3 + 3


async def test_retries_used_up_raise_a_transient_storage_error(
    proxied: S3Blobs, proxy: FaultProxy
) -> None:
    proxy.rule = lambda seen: ("status", 503)
    with pytest.raises(StorageError, match="3 time") as caught:
        await write_all(proxied.open_writer("k"), b"data")
    assert caught.value.transient and caught.value.key == "k"
    assert proxy.count() == FAST_RETRY.attempts


async def test_a_read_cut_short_resumes_from_the_byte_reached(
    proxied: S3Blobs, proxy: FaultProxy
) -> None:
    data = payload(3 * MiB)
    await write_all(proxied.open_writer("k"), data)
    cuts = {"left": 2}

    def rule(seen: Seen) -> Action:
        if seen.method == "GET" and cuts["left"]:
            cuts["left"] -= 1
            return ("cut", 700_000)
        return ("forward", 0)

    proxy.rule = rule
    proxy.seen.clear()
    assert await read_all(proxied, "k", 10, len(data)) == data[10:]
    ranges = [s.headers["range"] for s in proxy.seen]
    assert ranges[0] == f"bytes=10-{len(data) - 1}"
    assert len(ranges) == 3
    starts = [int(r.split("=")[1].split("-")[0]) for r in ranges]
    assert starts[0] < starts[1] < starts[2] and starts[1] > 10 + 500_000

    # Cut more often than the storage retries: the reader gives up.
    cuts["left"] = FAST_RETRY.attempts
    with pytest.raises(StorageError) as caught:
        await read_all(proxied, "k", 0, len(data))
    assert caught.value.transient


async def test_a_missing_bucket_is_a_clear_error_not_retried(
    asyncassets_s3_bucket: S3Bucket, proxy: FaultProxy
) -> None:
    store = make_blobs(
        asyncassets_s3_bucket,
        bucket="no-such-bucket-here",
        endpoint_url=proxy.endpoint_url,
        retry=Retry(attempts=5, delay=1.0),
    )
    try:
        for attempt in (
            lambda: write_all(store.open_writer("k"), b"x"),
            lambda: read_all(store, "k", 0, 1),
            lambda: store.stat("k"),
            lambda: store.list().__anext__(),
        ):
            with pytest.raises(StorageError, match="Create the bucket") as caught:
                await attempt()
            assert not isinstance(caught.value, StoredObjectMissing)
            assert "s3://no-such-bucket-here/media/" in str(caught.value)
        assert proxy.count() == 5  # one each, and stat's HEAD of the bucket: no retry
    finally:
        await store.aclose()


async def test_each_event_loop_gets_its_own_client(blobs: S3Blobs) -> None:
    await write_all(blobs.open_writer("k"), b"abc")

    def in_another_loop() -> bytes:
        async def read() -> bytes:
            try:
                return await read_all(blobs, "k", 0, 3)
            finally:
                await blobs.aclose()

        return asyncio.run(read())

    assert await asyncio.to_thread(in_another_loop) == b"abc"
    assert await read_all(blobs, "k", 0, 3) == b"abc"


async def test_killed_server_mid_upload(asyncassets_s3_server: Any, raw: Any) -> None:
    bucket_name = "killed-mid-upload"
    raw.create_bucket(Bucket=bucket_name)
    store = S3Blobs(
        bucket_name,
        endpoint_url=asyncassets_s3_server.endpoint_url,
        access_key_id="testing",
        secret_access_key="testing",
        part_size=PART,
        retry=Retry(attempts=2, delay=0.01, jitter=False),
    )
    writer = store.open_writer("k")
    try:
        await writer.write(payload(PART + 1))  # the upload started, a part is in flight
        asyncassets_s3_server.kill()
        with pytest.raises(StorageError) as caught:
            await write_all(writer, payload(PART))
        assert caught.value.transient
        with pytest.raises(StorageError):
            await writer.abort()  # the server is gone: it cannot be cleaned up now
    finally:
        asyncassets_s3_server.start()
        await store.aclose()
    buckets = [b["Name"] for b in raw.list_buckets()["Buckets"]]
    assert bucket_name not in buckets  # an empty new server: nothing was committed


async def test_a_writer_holds_about_two_parts(blobs: S3Blobs) -> None:
    import tracemalloc

    chunk = payload(MiB)
    await blobs.stat("big")  # the client exists: its service model is not counted
    tracemalloc.start()
    try:
        writer = blobs.open_writer("big")
        for _ in range(5 * PART // MiB):
            await writer.write(chunk)
        await writer.commit()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 * PART, f"{peak / MiB:.1f} MiB for 5 parts of {PART / MiB:.0f} MiB"
    info = await blobs.stat("big")
    assert info is not None and info.size == 5 * PART


# -- versions and writer tokens (issue #19) -------------------------------------------


async def test_a_committed_object_has_its_etag_as_version_and_carries_its_writers_token(
    blobs: S3Blobs,
) -> None:
    for size in (10, 2 * PART + 3):  # one PUT, and a multipart upload
        writer = blobs.open_writer(f"v/{size}", token="feedface" * 4)
        await write_all(writer, payload(size))
        info = await blobs.stat(f"v/{size}")
        assert info is not None and info.version == writer.version
        assert blobs.made_by(info, "feedface" * 4) and not blobs.made_by(info, "0" * 32)


async def test_a_read_of_another_version_raises_and_never_returns_its_bytes(
    blobs: S3Blobs,
) -> None:
    first = blobs.open_writer("v/key")
    await write_all(first, b"first object")
    second = blobs.open_writer("v/key")
    await write_all(second, b"other object", overwrite=True)  # same length
    with pytest.raises(StoredObjectChanged):
        await read_all_versioned(blobs, "v/key", first.version)
    assert await read_all_versioned(blobs, "v/key", second.version) == b"other object"


async def test_a_resumed_read_stays_on_its_version(
    proxied: S3Blobs, proxy: FaultProxy
) -> None:
    # The body is cut short, the object replaced, the read resumes: If-Match refuses.
    writer = proxied.open_writer("v/cut")
    data = payload(3 * PIECE)
    await write_all(writer, data)
    gets = 0

    def cut_the_first_get(seen: Seen) -> Action:
        nonlocal gets
        if seen.method != "GET":
            return ("forward", 0)
        gets += 1
        return ("cut", PIECE + 1000) if gets == 1 else ("forward", 0)

    proxy.rule = cut_the_first_get
    reader = proxied.open_reader("v/cut", 0, len(data), version=writer.version)
    first = await anext(reader)
    other = proxied.open_writer("v/cut")
    await write_all(other, payload(3 * PIECE), overwrite=True)
    with pytest.raises(StoredObjectChanged):
        async for _ in reader:
            pass
    assert first == data[: len(first)]


async def test_a_delete_of_another_version_leaves_the_object(blobs: S3Blobs) -> None:
    first = blobs.open_writer("v/del")
    await write_all(first, b"first")
    second = blobs.open_writer("v/del")
    await write_all(second, b"second", overwrite=True)
    assert await blobs.delete("v/del", version=first.version) is False
    assert await read_all(blobs, "v/del", 0, 6) == b"second"
    assert await blobs.delete("v/del", version=second.version) is True
    assert await blobs.stat("v/del") is None
    assert await blobs.delete("v/del", version=second.version) is False  # gone already


async def read_all_versioned(blobs: S3Blobs, key: str, version: Any) -> bytes:
    info = await blobs.stat(key)
    assert info is not None
    return b"".join([p async for p in blobs.open_reader(key, 0, info.size, version=version)])
