"""A storage outage costs its own requests only: the connection stays usable.

Issue #22's deployment run saw clients' GridFS and directory reads fail with
``ReadError`` / ``RemoteProtocolError`` (no response at all), clustered around S3
errors on other requests. The cause: a ``FileResponse`` whose S3 read failed
before the response began raised out of the app; Starlette answered ``500``
(keep-alive) and raised it again, and uvicorn, after logging it, closed the
connection. A pooled client's next request, sent on that connection meanwhile,
got no response. Now the failure is answered completely (``503`` with
``Retry-After``), and the next request on the same connection is served.

uvicorn serves a Starlette app in this test's event loop, on a free loopback
port; the S3 bucket is reached through a TCP relay that the test shuts, which is
the outage (the relay works the same in front of moto or ``S3_ENDPOINT_URL``). A
client speaks HTTP/1.1 on one raw socket, so whether the server kept the
connection is seen, not guessed.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid
from collections.abc import AsyncIterator
from typing import Any

import h11
import pytest
from bson import ObjectId

from asyncassets import Document
from asyncassets.fields import FileField
from asyncassets.storage import Retry, S3Storage

uvicorn = pytest.importorskip("uvicorn")
starlette_routing = pytest.importorskip("starlette.routing")
from asyncassets import web  # noqa: E402  (after the web extra's check)

GRIDFS_BYTES = b"gridfs bytes " * 5000
S3_BYTES = b"s3 bytes " * 5000


class Relay:
    """A TCP relay to the S3 endpoint: the outage is :meth:`shut` (connections cut,
    the port refusing new ones), as a dead S3 server or a broken network is."""

    def __init__(self, target: str) -> None:
        host_port = target.split("://", 1)[1].rstrip("/")
        self.host, port = host_port.rsplit(":", 1)
        self.port = int(port)
        self.server: asyncio.Server | None = None
        self.pipes: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(self.host, self.port)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        for task in (pipe(reader, up_writer), pipe(up_reader, writer)):
            t = asyncio.ensure_future(task)
            self.pipes.add(t)
            t.add_done_callback(self.pipes.discard)

    async def shut(self) -> None:
        assert self.server is not None
        self.server.close()
        for task in list(self.pipes):
            task.cancel()
        await asyncio.gather(*self.pipes, return_exceptions=True)
        await self.server.wait_closed()


class Connection:
    """One HTTP/1.1 connection, requests sent one after another."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = h11.Connection(h11.CLIENT)

    async def open(self) -> Connection:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        return self

    async def request(
        self, method: str, path: str, body: bytes = b""
    ) -> tuple[int, dict[str, str], bytes]:
        """The response, or :class:`ConnectionError` when the server closed the connection."""
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        headers = [("host", "test"), ("content-length", str(len(body)))]
        self.writer.write(self.conn.send(h11.Request(method=method, target=path, headers=headers)))
        if body:
            self.writer.write(self.conn.send(h11.Data(data=body)))
        self.writer.write(self.conn.send(h11.EndOfMessage()))
        await self.writer.drain()
        status, got, data = 0, {}, b""
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                chunk = await self.reader.read(65536)
                if not chunk:
                    raise ConnectionError("the server closed the connection without a response")
                self.conn.receive_data(chunk)
            elif isinstance(event, h11.Response):
                status = event.status_code
                got = {k.decode(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                data += event.data
            elif isinstance(event, h11.EndOfMessage):
                return status, got, data
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionError("the server closed the connection mid-response")

    def close(self) -> None:
        self.writer.close()


@pytest.fixture
async def site(asyncassets_db: Any, asyncassets_s3_bucket: Any) -> AsyncIterator[Any]:
    """The app under uvicorn, a document with a GridFS and an S3 file, and the relay."""
    relay = Relay(asyncassets_s3_bucket.endpoint_url)
    options = {**asyncassets_s3_bucket.options, "endpoint_url": await relay.start()}
    tag = uuid.uuid4().hex[:8]
    s3 = S3Storage(**options, collection_name=f"outage_s3_{tag}", retry=Retry(attempts=1))

    class OutageDoc(Document):
        g = FileField(collection_name=f"outage_g_{tag}")
        s = FileField(storage=s3)
        meta = {"collection": f"outage_docs_{tag}"}

    doc = OutageDoc()
    await doc.g.put(GRIDFS_BYTES, content_type="application/octet-stream")
    await doc.s.put(S3_BYTES, content_type="application/octet-stream")
    await doc.save()

    async def read(request: Any) -> Any:
        found = await OutageDoc.objects.get(pk=ObjectId(request.path_params["pk"]))
        return web.FileResponse(getattr(found, request.path_params["field"]), request)

    async def upload(request: Any) -> Any:
        found = await OutageDoc.objects.get(pk=ObjectId(request.path_params["pk"]))
        await getattr(found, request.path_params["field"]).replace(await request.body())
        return starlette_routing.Response(status_code=204)

    from starlette.applications import Starlette

    app = Starlette(
        routes=[
            starlette_routing.Route("/{pk}/{field}", read, methods=["GET"]),
            starlette_routing.Route("/{pk}/{field}", upload, methods=["PUT"]),
        ],
        exception_handlers=dict.fromkeys(
            getattr(web, "HANDLED_ERRORS", ()), getattr(web, "storage_error_response", None)
        ),
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="critical", lifespan="off"))
    serving = asyncio.ensure_future(server.serve(sockets=[sock]))
    while not server.started:
        assert not serving.done(), "uvicorn did not start"
        await asyncio.sleep(0.02)

    class Site:
        pass

    s = Site()
    s.port, s.doc, s.relay = sock.getsockname()[1], doc, relay  # type: ignore[attr-defined]
    try:
        yield s
    finally:
        server.should_exit = True
        await serving
        sock.close()
        with contextlib.suppress(RuntimeError):
            await relay.shut()
        await s3.blobs().aclose()  # type: ignore[attr-defined]  # the S3 client's session


async def test_a_read_from_an_unreachable_bucket_is_answered_503_and_the_next_request_served(
    site: Any,
) -> None:
    conn = await Connection(site.port).open()
    try:
        status, _, body = await conn.request("GET", f"/{site.doc.pk}/s")
        assert (status, body) == (200, S3_BYTES)
        await site.relay.shut()  # the outage

        failed = await conn.request("GET", f"/{site.doc.pk}/s")
        # What a pooled client does next: another request on the same connection,
        # once the server had all the time it needs to close it if it would.
        await asyncio.sleep(0.3)
        status, _, body = await conn.request("GET", f"/{site.doc.pk}/g")
        assert (status, body) == (200, GRIDFS_BYTES)

        status, headers, body = failed
        assert status == 503, body
        assert headers.get("retry-after") == str(web.RETRY_AFTER_SECONDS)
        assert headers.get("connection") != "close"
    finally:
        conn.close()


async def test_an_upload_to_an_unreachable_bucket_is_answered_503_by_the_handler(
    site: Any,
) -> None:
    """An app's own upload route, with ``storage_error_response`` registered."""
    await site.relay.shut()
    conn = await Connection(site.port).open()
    try:
        failed = await conn.request("PUT", f"/{site.doc.pk}/s", b"new bytes")
        await asyncio.sleep(0.3)
        status, _, body = await conn.request("GET", f"/{site.doc.pk}/g")
        assert (status, body) == (200, GRIDFS_BYTES)
        status, headers, _ = failed
        assert status == 503
        assert headers.get("retry-after") == str(web.RETRY_AFTER_SECONDS)
    finally:
        conn.close()
    reloaded = await type(site.doc).objects.get(pk=site.doc.pk)
    assert reloaded.s.file_id == site.doc.s.file_id  # the failed replace changed nothing


async def test_the_handler_raises_what_it_does_not_answer() -> None:
    with pytest.raises(KeyError):
        await web.storage_error_response(None, KeyError("a bug"))  # type: ignore[arg-type]
