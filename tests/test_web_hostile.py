"""Serving files to hostile uploaders and clients: what issue 20 found broken.

Each test is a regression test for one case of the issue, written against the
API that existed before the fix (``FileResponse``, ``files_app``, the token
functions), so that it fails on the code before it and passes after:

1. an uploaded XML-family or HTML file is never shown inline without sandbox
   (the headers here; what Chromium does with them in
   ``tests/test_web_browser_policy.py``);
2. a signed link has exactly one valid spelling;
3. a multipart/byteranges response never mixes two versions of a GridFS file
   deleted and uploaded again under the same ``_id`` while it is sent;
4. many ranges of one response read the stored bytes at most once, compressed
   files included;
5. catalogue entries written by other tools get a safe answer, never a crash.

Real parts throughout: the session's database server, directories, httpx
against the ASGI app. Test 4 counts the stored bytes a real store hands out by
wrapping it (every call goes through to the store).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import random
import re
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route

from asyncassets import Document
from asyncassets.errors import FileDeletedWhileReading
from asyncassets.fields import FileField, StringField
from asyncassets.files import urls
from asyncassets.storage import FileSystemStorage, GridFSStorage, Storage
from asyncassets.storage.gridfs.bucket import GridBucket
from asyncassets.web import FileResponse, files_app

SECRET = "hostile-test secret, long enough to sign with"
_names = itertools.count()


@pytest.fixture(autouse=True)
def no_url_config() -> Any:
    urls._config = None
    yield
    urls._config = None


def doc_class(storage: Storage, **field_options: Any) -> Any:
    n = next(_names)
    return type(
        f"HostileDoc{n}",
        (Document,),
        {
            "name": StringField(),
            "file": FileField(storage=storage, **field_options),
            "meta": {"collection": f"hostile_docs_{n}"},
        },
    )


def storage_of(kind: str, tmp_path: Any, chunk_size: int | None = None) -> Storage:
    name = f"hostile{next(_names)}"
    if kind == "gridfs":
        return GridFSStorage(name, chunk_size=chunk_size)
    return FileSystemStorage(tmp_path / name, collection_name=name, fsync=False)


def app_for(doc_cls: Any) -> Starlette:
    async def serve(request: Request) -> Response:
        doc = await doc_cls.objects.get(pk=request.path_params["pk"])
        return FileResponse(doc.file, request)

    return Starlette(
        routes=[
            Route("/f/{pk}", serve, methods=["GET", "HEAD"]),
            Mount("/files", files_app(secret=SECRET, base_url="/files")),
        ]
    )


async def stored(doc_cls: Any, data: bytes, **put: Any) -> Any:
    doc = doc_cls(name="x")
    await doc.file.put(data, **put)
    await doc.save()
    return doc


def client_for(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


# -- 1. active content is never inline without sandbox ----------------------------------

XHTML = (
    b'<?xml version="1.0"?><html xmlns="http://www.w3.org/1999/xhtml"><body>'
    b"<script>fetch('/pwned')</script></body></html>"
)


@pytest.mark.parametrize(
    "content_type",
    [
        "text/xsl",
        "TEXT/XSL; charset=utf-8",
        "application/rss+xml",
        "application/atom+xml",
        "text/whatever+xml",
        "multipart/x-mixed-replace; boundary=x",
        "text/html",
        " Text/HTML ; charset=utf-8",
        "image/svg+xml",
        "application/xhtml+xml",
        "application/xml",
        "text/xml",
        "application/mathml+xml",
        "application/vnd.wap.xhtml+xml",
        "text/javascript",
        "application/x-anything-new",
    ],
)
async def test_an_active_or_unknown_type_is_an_attachment_under_sandbox(
    asyncassets_db: Any, tmp_path: Any, content_type: str
) -> None:
    doc_cls = doc_class(storage_of("gridfs", tmp_path))
    doc = await stored(doc_cls, XHTML, content_type=content_type, filename="feed")
    async with client_for(app_for(doc_cls)) as client:
        link = await doc.file.url(expires=600)
        for url in (f"/f/{doc.pk}", link):
            r = await client.get(url)
            assert r.status_code == 200
            assert r.headers["content-disposition"].startswith("attachment"), url
            assert r.headers["content-security-policy"] == "sandbox", url
            assert r.headers["x-content-type-options"] == "nosniff"
            # Not labelled with a type a browser renders or runs, even as a subresource.
            assert r.headers["content-type"] == "application/octet-stream"


# -- 2. a signed link has one spelling --------------------------------------------------


def alterations(token: str) -> dict[str, str]:
    """Other spellings of ``token`` that base64 decoders commonly accept."""
    payload, mac = token.split(".")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    spare_bits = {2: 4, 3: 2}.get(len(mac) % 4, 0)  # unused low bits of the last character
    assert spare_bits, "an HMAC-SHA256 in base64 always has spare bits"
    last = alphabet.index(mac[-1])
    other_low_bits = alphabet[last ^ 1]  # same high bits, so the same bytes
    found = {
        "padding": f"{token}=",
        "padding_and_more": f"{token}=AAAA",
        "junk_inserted": f"{payload}.{mac[:4]}!!!!{mac[4:]}",
        "low_bits": f"{payload}.{mac[:-1]}{other_low_bits}",
        "payload_padding": f"{payload}{'=' * (-len(payload) % 4)}.{mac}"
        if len(payload) % 4
        else f"{payload}====.{mac}",
    }
    if "-" in token:  # standard base64's '+' for base64url's '-' ('/' for '_' is a path)
        found["plus_for_dash"] = token.replace("-", "+")
    return found


async def test_a_signed_link_has_one_valid_spelling(asyncassets_db: Any, tmp_path: Any) -> None:
    doc_cls = doc_class(storage_of("gridfs", tmp_path))
    # Made until a token holds a '-': the '+' spelling is then a real alternative.
    async with client_for(app_for(doc_cls)) as client:
        for attempt in range(200):
            doc = await stored(doc_cls, b"x" * attempt, content_type="image/png")
            url = await doc.file.url(expires=600)
            token = url.rsplit("/", 1)[1]
            if "-" in token:
                break
        assert "-" in token
        assert (await client.get(url)).status_code == 200
        for how, spelling in alterations(token).items():
            r = await client.get(f"/files/{spelling}")
            assert r.status_code == 403, (how, spelling)
        # Percent-encoding a character of the token is another spelling too.
        encoded = f"%{ord(token[0]):02X}" + token[1:]
        assert (await client.get(f"/files/{encoded}")).status_code == 403


# -- 3. one response, one version -------------------------------------------------------


async def asgi_call(
    response: Response, headers: list[tuple[bytes, bytes]], on_body: Any
) -> tuple[list[dict[str, Any]], BaseException | None]:
    """Send ``response`` by hand; a slow client: ``on_body`` runs at each body message."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body":
            await on_body()

    scope = {"type": "http", "method": "GET", "headers": headers, "path": "/"}
    try:
        await response(scope, receive, send)
    except FileDeletedWhileReading as exc:
        return sent, exc
    return sent, None


async def test_a_gridfs_file_uploaded_again_mid_multipart_is_never_mixed(
    asyncassets_db: Any, tmp_path: Any
) -> None:
    # The second upload has the same _id and length, so every chunk has the
    # number and size the first one's had: only the entry tells them apart.
    storage = storage_of("gridfs", tmp_path, chunk_size=1024)
    old = os.urandom(3 * 1024 * 1024)
    new = bytes(b ^ 0xFF for b in old[:4096]) + os.urandom(len(old) - 4096)
    doc_cls = doc_class(storage)
    doc = await stored(doc_cls, old, content_type="application/octet-stream")
    store = storage.bind(asyncassets_db)
    entry = await store.find(doc.file.file_id)
    assert entry is not None
    uploaded_again = False

    async def upload_again() -> None:
        nonlocal uploaded_again
        if not uploaded_again:
            uploaded_again = True
            await store.delete(entry["_id"])
            await store.upload(
                new, file_id=entry["_id"], filename=entry.get("filename"), metadata={}
            )

    ranges = [(0, 4096), (3000000, 3000010)]
    header = "bytes=" + ",".join(f"{a}-{b - 1}" for a, b in ranges)
    sent, error = await asgi_call(
        FileResponse(doc.file), [(b"range", header.encode())], upload_again
    )
    assert uploaded_again
    assert sent[0]["status"] == 206
    declared = int(dict(sent[0]["headers"])[b"content-length"])
    body = b"".join(m["body"] for m in sent[1:])
    etag = dict(sent[0]["headers"])[b"etag"].decode()
    assert etag == f'"{hashlib.sha256(old).hexdigest()}"'
    for a, b in ranges:
        assert new[a:b] not in body, "bytes of the second upload under the first one's ETag"
    if error is None:
        # Complete: then every part is of the first upload.
        assert len(body) == declared
        for a, b in ranges:
            assert old[a:b] in body
    else:
        # Ended short: the server closes the connection, the client discards it.
        assert len(body) < declared
        assert all(m.get("more_body", False) for m in sent[1:])


# -- 4. many ranges, one pass -----------------------------------------------------------


class CountingStore:
    """A real store, every call passed through; counts the stored bytes its reads fetch.

    A GridFS read fetches whole chunks (and yields only the range): what it
    fetches is the range rounded out to its chunks.
    """

    def __init__(self, store: Any) -> None:
        self._store = store
        self.stored_bytes = 0
        self.downloads = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def open_download(self, doc: Any, *, start: int = 0, end: int | None = None) -> Any:
        self.downloads += 1
        low, high = start, doc["length"] if end is None else end
        chunk = doc.get("chunkSize") if isinstance(self._store, GridBucket) else None
        if chunk and high > low:
            low, high = low // chunk * chunk, min(-(-high // chunk) * chunk, doc["length"])
        self.stored_bytes += high - low
        return self._store.open_download(doc, start=start, end=end)


def compressible(size: int) -> bytes:
    rng = random.Random(20)
    words = [bytes(rng.choices(b"abcdefghij", k=rng.randrange(3, 9))) for _ in range(500)]
    out = bytearray()
    while len(out) < size:
        out += rng.choice(words) + b" "
    return bytes(out[:size])


@pytest.mark.parametrize("kind", ["gridfs", "filesystem"])
async def test_sixteen_ranges_of_a_compressed_file_inflate_it_once(
    asyncassets_db: Any, tmp_path: Any, kind: str
) -> None:
    data = compressible(4 * 1024 * 1024)
    storage = storage_of(kind, tmp_path)
    doc_cls = doc_class(storage, compress="gzip")
    doc = await stored(doc_cls, data, content_type="application/octet-stream")
    store = storage.bind(asyncassets_db)
    entry = await store.find(doc.file.file_id)
    assert entry is not None
    assert entry["length"] < len(data) // 2  # stored compressed
    counting = CountingStore(store)
    starts = [len(data) - 1 - 3 * i for i in range(16)]
    header = "bytes=" + ",".join(f"{s}-{s}" for s in starts)
    sent, error = await asgi_call(
        FileResponse.for_entry(counting, entry),  # type: ignore[arg-type]
        [(b"range", header.encode())],
        _nothing,
    )
    assert error is None and sent[0]["status"] == 206
    body = b"".join(m["body"] for m in sent[1:])
    for s in starts:
        assert f"Content-Range: bytes {s}-{s}/{len(data)}".encode() in body
    assert counting.stored_bytes <= entry["length"], (
        f"{counting.stored_bytes} stored bytes read for a {entry['length']}-byte file "
        f"in {counting.downloads} reads"
    )


async def test_sixteen_ranges_in_one_chunk_read_it_once(
    asyncassets_db: Any, tmp_path: Any
) -> None:
    data = os.urandom(200 * 1024)  # one GridFS chunk (255 KiB by default)
    storage = storage_of("gridfs", tmp_path)
    doc = await stored(doc_class(storage), data, content_type="application/octet-stream")
    store = storage.bind(asyncassets_db)
    entry = await store.find(doc.file.file_id)
    counting = CountingStore(store)
    header = "bytes=" + ",".join(f"{i * 1000}-{i * 1000}" for i in range(16))
    sent, error = await asgi_call(
        FileResponse.for_entry(counting, entry),  # type: ignore[arg-type]
        [(b"range", header.encode())],
        _nothing,
    )
    assert error is None and sent[0]["status"] == 206
    body = b"".join(m["body"] for m in sent[1:])
    for i in range(16):
        at = i * 1000
        assert f"bytes {at}-{at}/{len(data)}\r\n\r\n".encode() + data[at : at + 1] in body
    assert counting.stored_bytes <= len(data), f"{counting.downloads} reads of the chunk"


async def _nothing() -> None:
    return None


# -- 5. catalogue entries written by other tools ----------------------------------------

HUGE_NAME = "a" * 300_000 + ".txt"


@pytest.mark.parametrize(
    ("change", "status"),
    [
        ({"$set": {"filename": 12345}}, 200),
        ({"$set": {"filename": ["a.html", "b"]}}, 200),
        ({"$set": {"filename": {"name": "a.html"}}}, 200),
        ({"$set": {"filename": None}}, 200),
        ({"$set": {"filename": HUGE_NAME}}, 200),
        ({"$set": {"filename": "é" * 100_000 + ".png"}}, 200),
        ({"$set": {"metadata.content_type": 7}}, 200),
        ({"$set": {"metadata.content_type": ["text/html"]}}, 200),
        ({"$set": {"metadata.content_type": {"type": "text/html"}}}, 200),
        ({"$set": {"metadata.content_type": b"text/html"}}, 200),
        ({"$set": {"metadata.content_type": "x" * 100_000 + "/html"}}, 200),
        ({"$set": {"contentType": 3.5}, "$unset": {"metadata.content_type": ""}}, 200),
        ({"$set": {"uploadDate": "yesterday"}}, 200),
        ({"$set": {"metadata.sha256": "not hex\r\nSet-Cookie: x=1"}}, 200),
        ({"$set": {"metadata.sha256": 42}}, 200),
        ({"$set": {"metadata": "a string"}}, 200),
        ({"$set": {"metadata": ["a", "list"]}}, 200),
        ({"$unset": {"metadata": ""}}, 200),
        ({"$unset": {"uploadDate": ""}}, 200),
        ({"$unset": {"filename": ""}}, 200),
        ({"$unset": {"length": ""}}, 404),
        ({"$set": {"length": "10"}}, 404),
        ({"$set": {"length": -1}}, 404),
        ({"$set": {"length": [10]}}, 404),
    ],
)
@pytest.mark.parametrize("kind", ["gridfs", "filesystem"])
async def test_odd_catalogue_entries_get_a_safe_answer(
    asyncassets_db: Any, tmp_path: Any, kind: str, change: dict[str, Any], status: int
) -> None:
    storage = storage_of(kind, tmp_path)
    doc_cls = doc_class(storage)
    data = b"plain bytes of a file\n" * 10
    doc = await stored(doc_cls, data, content_type="text/plain", filename="notes.txt")
    files = asyncassets_db[f"{storage.collection_name}.files"]
    await files.update_one({"_id": doc.file.file_id}, change)
    async with client_for(app_for(doc_cls)) as client:
        for method in ("GET", "HEAD"):
            r = await client.request(method, f"/f/{doc.pk}")
            assert r.status_code == status, (method, r.text)
            assert r.headers["x-content-type-options"] == "nosniff"
            for name, value in r.headers.items():
                assert len(value) < 1100, (name, len(value))
                assert "\r" not in value and "\n" not in value
            assert "set-cookie" not in r.headers
            if status == 200 and method == "GET":
                assert r.content == data
                disposition = r.headers["content-disposition"]
                assert re.fullmatch(r"(inline|attachment)(; .*)?", disposition)
                assert ".html" not in disposition


@pytest.mark.parametrize(
    ("kind", "change", "status"),
    [
        # Lengths no storage holds: the entry cannot describe a file (404, warned).
        ("gridfs", {"$set": {"length": 2**63 - 1}}, 404),  # HEAD said 200, GET 500
        ("filesystem", {"$set": {"length": 2**63 - 1}}, 404),
        ("gridfs", {"$set": {"length": 1e20}}, 404),  # an OverflowError, HEAD too
        ("filesystem", {"$set": {"length": float(2**63)}}, 404),
        ("gridfs", {"$set": {"length": 2**53 + 1}}, 404),
        ("filesystem", {"$set": {"metadata.compression.length": float(2**63)}}, 404),
        # Entries the store refuses to read by: GET failed with a 500, HEAD said 200.
        ("gridfs", {"$unset": {"chunkSize": ""}}, 500),
        ("gridfs", {"$set": {"chunkSize": 0}}, 500),
        ("gridfs", {"$set": {"chunkSize": -5}}, 500),
        ("gridfs", {"$set": {"chunkSize": "10"}}, 500),
        ("gridfs", {"$set": {"metadata.compression.codec": "zstd"}}, 500),
        ("filesystem", {"$set": {"metadata.compression.codec": "zstd"}}, 500),
        ("filesystem", {"$set": {"location": "x"}}, 500),
        ("filesystem", {"$set": {"location": {}}}, 500),
        ("filesystem", {"$unset": {"location.key": ""}}, 500),
        ("filesystem", {"$set": {"location.key": 5}}, 500),
        # Not damage: a shell-written double, and fields a storage does not read by.
        ("gridfs", {"$set": {"length": 220.0, "chunkSize": 261120.0}}, 200),
        ("filesystem", {"$unset": {"chunkSize": ""}}, 200),
    ],
)
async def test_head_answers_what_get_would_for_a_damaged_entry(
    asyncassets_db: Any,
    tmp_path: Any,
    caplog: pytest.LogCaptureFixture,
    kind: str,
    change: dict[str, Any],
    status: int,
) -> None:
    storage = storage_of(kind, tmp_path)
    compressed = "metadata.compression" in str(change)
    doc_cls = doc_class(storage, **({"compress": "gzip"} if compressed else {}))
    data = b"plain bytes of a file\n" * 10  # 220 bytes
    doc = await stored(doc_cls, data, content_type="text/plain", filename="notes.txt")
    async with client_for(app_for(doc_cls)) as client:
        etag = (await client.get(f"/f/{doc.pk}")).headers["etag"]
        link = await doc.file.url(expires=600)
        files = asyncassets_db[f"{storage.collection_name}.files"]
        await files.update_one({"_id": doc.file.file_id}, change)
        caplog.clear()
        for url in (f"/f/{doc.pk}", link):
            for method, headers in (
                ("HEAD", {}),
                ("GET", {}),
                ("GET", {"range": "bytes=0-9"}),
                ("GET", {"if-none-match": etag}),
                ("HEAD", {"if-none-match": etag}),
            ):
                r = await client.request(method, url, headers=headers)
                expected = 304 if status == 200 and "if-none-match" in headers else status
                if status == 200 and "range" in headers:
                    expected = 206
                assert r.status_code == expected, (url, method, headers, r.text)
                assert r.headers["x-content-type-options"] == "nosniff"
    logged = {record.levelname for record in caplog.records if record.name == "asyncassets.web"}
    assert logged == {404: {"WARNING"}, 500: {"ERROR"}, 200: set()}[status], caplog.text


async def test_a_huge_stored_name_is_cut_keeping_its_extension(
    asyncassets_db: Any, tmp_path: Any
) -> None:
    storage = storage_of("gridfs", tmp_path)
    doc_cls = doc_class(storage)
    doc = await stored(doc_cls, b"text", content_type="text/plain", filename="short.txt")
    files = asyncassets_db[f"{storage.collection_name}.files"]
    # Written by another tool: asyncassets' own uploads cut names to 255 characters.
    await files.update_one({"_id": doc.file.file_id}, {"$set": {"filename": HUGE_NAME}})
    async with client_for(app_for(doc_cls)) as client:
        r = await client.get(f"/f/{doc.pk}")
        assert r.status_code == 200
        match = re.fullmatch(r'inline; filename="(a+)\.txt"', r.headers["content-disposition"])
        assert match and 200 <= len(match.group(1)) <= 255
