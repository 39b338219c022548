"""FileResponse over HTTP: every header case, hostile Range headers, on every storage.

A Starlette app answers ``GET /f/<pk>`` with ``FileResponse(doc.file, request)``;
httpx talks to it through ``httpx.ASGITransport``, so requests go through the
real ASGI interface in the test's event loop, against real storages: GridFS on
the session's database server, a directory (``tmp_path``), and for the main cases
an S3 bucket on the plugin's moto server.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import email.utils
import gzip
import hashlib
import itertools
import os
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from asyncassets import Document
from asyncassets.errors import CorruptFile, FileDeletedWhileReading
from asyncassets.fields import FileField, StringField
from asyncassets.storage import FileSystemStorage, GridFSStorage, S3Storage, Storage
from asyncassets.web import INLINE_TYPES, ContentPolicy, FileResponse

DATA = bytes(range(256)) * 40  # 10,240 bytes, every offset's byte is known
SHA = hashlib.sha256(DATA).hexdigest()
_names = itertools.count()


def make_storage(kind: str, request: pytest.FixtureRequest, tmp_path: Any) -> Storage:
    name = f"web{next(_names)}"
    if kind == "gridfs":
        # Small chunks: ranges and mid-response deletions cross chunk boundaries.
        return GridFSStorage(name, chunk_size=1024)
    if kind == "filesystem":
        return FileSystemStorage(tmp_path / name, collection_name=name, fsync=False)
    bucket = request.getfixturevalue("asyncassets_s3_bucket")
    return S3Storage(**bucket.options, prefix=f"{name}/", collection_name=name)


def doc_class(storage: Storage, **field_kwargs: Any) -> Any:
    n = next(_names)
    return type(
        f"WebDoc{n}",
        (Document,),
        {
            "name": StringField(),
            "file": FileField(storage=storage, **field_kwargs),
            "meta": {"collection": f"web_docs_{n}"},
        },
    )


def app_for(doc_cls: Any, **options: Any) -> Starlette:
    async def serve(request: Request) -> Response:
        doc = await doc_cls.objects.get(pk=request.path_params["pk"])
        return FileResponse(doc.file, request, **options)

    return Starlette(routes=[Route("/f/{pk}", serve, methods=["GET", "HEAD", "POST"])])


class Served:
    """A stored file behind an app, and a client to ask it."""

    def __init__(self, doc: Any, client: httpx.AsyncClient, storage: Storage) -> None:
        self.doc = doc
        self.client = client
        self.storage = storage
        self.url = f"/f/{doc.pk}"

    async def get(self, **headers: str | bytes) -> httpx.Response:
        return await self.client.get(self.url, headers=_headers(headers))

    async def head(self, **headers: str) -> httpx.Response:
        return await self.client.head(self.url, headers=_headers(headers))


def _headers(given: dict[str, Any]) -> dict[str, Any]:
    return {name.replace("_", "-"): value for name, value in given.items()}


@contextlib.asynccontextmanager
async def serve_file(
    storage: Storage,
    data: bytes = DATA,
    *,
    field: dict[str, Any] | None = None,
    response: dict[str, Any] | None = None,
    **put: Any,
) -> AsyncIterator[Served]:
    doc_cls = doc_class(storage, **(field or {}))
    doc = doc_cls(name="x")
    put.setdefault("content_type", "application/octet-stream")
    put.setdefault("filename", "data.bin")
    await doc.file.put(data, **put)
    await doc.save()
    transport = httpx.ASGITransport(app=app_for(doc_cls, **(response or {})))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield Served(doc, client, storage)


@pytest.fixture(params=["gridfs", "filesystem"])
def storage(request: pytest.FixtureRequest, tmp_path: Any) -> Storage:
    return make_storage(str(request.param), request, tmp_path)


@pytest.fixture(params=["gridfs", "filesystem", "s3"])
def any_storage(request: pytest.FixtureRequest, tmp_path: Any) -> Storage:
    return make_storage(str(request.param), request, tmp_path)


@pytest.fixture
async def served(asyncassets_db: Any, storage: Storage) -> AsyncIterator[Served]:
    async with serve_file(storage) as s:
        yield s


def split_multipart(
    content_type: str, body: bytes, part_type: str = "application/octet-stream"
) -> list[tuple[str, bytes]]:
    """``(Content-Range, bytes)`` of each part of a multipart/byteranges body."""
    match = re.fullmatch(r"multipart/byteranges; boundary=(\w+)", content_type)
    assert match, content_type
    delimiter = b"--" + match.group(1).encode()
    assert body.endswith(delimiter + b"--\r\n")
    parts = []
    for chunk in body[: -len(delimiter + b"--\r\n")].split(delimiter)[1:]:
        head, _, data = chunk.partition(b"\r\n\r\n")
        assert data.endswith(b"\r\n")
        fields = dict(line.split(": ", 1) for line in head.decode().strip().split("\r\n"))
        assert fields["Content-Type"] == part_type
        parts.append((fields["Content-Range"], data[:-2]))
    return parts


def multipart_parts(response: httpx.Response) -> list[tuple[str, bytes]]:
    """``(Content-Range, bytes)`` of each part of a multipart/byteranges response."""
    return split_multipart(response.headers["content-type"], response.content)


def multipart_parts_of(sent: list[dict[str, Any]]) -> list[tuple[str, bytes]]:
    """The same, of a response sent through the ASGI interface (its messages)."""
    assert sent[0]["status"] == 206
    headers = dict(sent[0]["headers"])
    body = b"".join(m["body"] for m in sent[1:])
    assert int(headers[b"content-length"]) == len(body)
    return split_multipart(headers[b"content-type"].decode(), body)


# -- whole file, HEAD, validators --------------------------------------------------


async def test_a_whole_file_comes_with_its_validators_and_headers(
    any_storage: Storage, asyncassets_db: Any
) -> None:
    async with serve_file(any_storage) as s:
        r = await s.get()
        assert r.status_code == 200
        assert r.content == DATA
        h = r.headers
        assert h["content-length"] == str(len(DATA))
        assert h["accept-ranges"] == "bytes"
        assert h["content-type"] == "application/octet-stream"
        assert h["etag"] == f'"{SHA}"'
        assert h["cache-control"] == "no-cache"
        assert h["x-content-type-options"] == "nosniff"
        # Not a type browsers show without running it: saved, and sandboxed.
        assert h["content-disposition"] == 'attachment; filename="data.bin"'
        assert h["content-security-policy"] == "sandbox"
        await s.doc.file.load()
        uploaded = s.doc.file.upload_date.replace(tzinfo=dt.timezone.utc, microsecond=0)
        assert email.utils.parsedate_to_datetime(h["last-modified"]) == uploaded


async def test_head_answers_the_headers_of_get_and_reads_no_byte(served: Served) -> None:
    get = await served.get()
    await remove_bytes(served)
    head = await served.head()
    assert head.status_code == 200
    assert head.content == b""
    for name in ("content-length", "etag", "last-modified", "content-type", "accept-ranges"):
        assert head.headers[name] == get.headers[name]
    # The bytes are gone, which only a read would notice.
    await assert_damaged(served)


async def assert_damaged(s: Served) -> None:
    """A GET of a file whose bytes are damaged: a complete 500 when found before the
    response began (web/failures.py), else the response is cut short (raised)."""
    try:
        r = await s.get()
    except CorruptFile:
        return
    assert r.status_code == 500, r.status_code
    assert b"damaged" in r.content


async def remove_bytes(s: Served) -> None:
    """Delete a file's stored bytes behind the library's back (the entry stays)."""
    db = s.doc._get_db()
    if isinstance(s.storage, GridFSStorage):
        await db[f"{s.storage.collection_name}.chunks"].delete_many({})
    else:
        assert isinstance(s.storage, FileSystemStorage)
        for path, _dirs, files in os.walk(s.storage.root):
            for name in files:
                os.remove(os.path.join(path, name))


async def test_an_empty_field_and_a_missing_file_are_404(
    asyncassets_db: Any, storage: Storage
) -> None:
    doc_cls = doc_class(storage)
    empty = doc_cls(name="empty")
    await empty.save()
    full = doc_cls(name="full")
    await full.file.put(b"bytes")
    await full.save()
    await storage.bind(asyncassets_db).delete(full.file.file_id)  # behind the document's back
    transport = httpx.ASGITransport(app=app_for(doc_cls))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        for doc in (empty, full):
            r = await client.get(f"/f/{doc.pk}")
            assert r.status_code == 404
            assert r.headers["content-type"].startswith("text/plain")


async def test_other_methods_are_405_naming_the_allowed_ones(served: Served) -> None:
    r = await served.client.post(served.url)
    assert r.status_code == 405
    assert r.headers["allow"] == "GET, HEAD"


async def test_an_empty_file_is_served(asyncassets_db: Any, storage: Storage) -> None:
    async with serve_file(storage, b"") as s:
        r = await s.get()
        assert (r.status_code, r.content, r.headers["content-length"]) == (200, b"", "0")
        assert r.headers["etag"] == f'"{hashlib.sha256(b"").hexdigest()}"'
        assert (await s.get(range="bytes=0-")).status_code == 416


# -- single ranges -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "start", "end"),
    [
        ("bytes=0-0", 0, 1),
        ("bytes=1000-2999", 1000, 3000),  # across chunk boundaries
        ("bytes=10000-", 10000, 10240),  # open-ended
        ("bytes=-240", 10000, 10240),  # suffix
        ("bytes=-100000", 0, 10240),  # a suffix longer than the file: all of it
        ("bytes=10239-20000", 10239, 10240),  # last position clamped
        ("bytes=0-99999999999999999999999999999999", 0, 10240),  # huge last position
        ("BYTES = 5 - 9", 5, 10),  # case and spaces tolerated
    ],
)
async def test_a_single_range_is_206_with_content_range(
    any_storage: Storage, asyncassets_db: Any, header: str, start: int, end: int
) -> None:
    async with serve_file(any_storage) as s:
        r = await s.get(range=header)
        assert r.status_code == 206
        assert r.content == DATA[start:end]
        assert r.headers["content-range"] == f"bytes {start}-{end - 1}/{len(DATA)}"
        assert r.headers["content-length"] == str(end - start)
        assert r.headers["content-type"] == "application/octet-stream"
        assert r.headers["etag"] == f'"{SHA}"'


async def test_only_the_requested_bytes_are_read(served: Served) -> None:
    # Cut the stored bytes short behind the library's back: a range inside what is
    # left is served, because nothing past it is read; the whole file is not.
    db = served.doc._get_db()
    if isinstance(served.storage, GridFSStorage):
        await db[f"{served.storage.collection_name}.chunks"].delete_many({"n": {"$gte": 2}})
    else:
        assert isinstance(served.storage, FileSystemStorage)
        (path,) = [os.path.join(d, f) for d, _, fs in os.walk(served.storage.root) for f in fs]
        stat = os.stat(path)
        os.truncate(path, 2048)
        # The same modification time: the same version as far as the entry can tell.
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    r = await served.get(range="bytes=100-2047")
    assert (r.status_code, r.content) == (206, DATA[100:2048])
    await assert_damaged(served)


async def test_a_range_of_a_compressed_file_is_of_its_original_bytes(
    asyncassets_db: Any, storage: Storage
) -> None:
    text = b"".join(b"line %05d of a log that compresses well\n" % i for i in range(2000))
    options: dict[str, Any] = {"field": {"compress": "gzip"}, "content_type": "text/plain"}
    async with serve_file(storage, text, **options) as s:
        entry = await s.doc._get_db()[f"{storage.collection_name}.files"].find_one()
        assert entry["length"] < len(text) // 4  # stored compressed
        whole = await s.get()
        assert whole.content == text
        assert whole.headers["etag"] == f'"{hashlib.sha256(text).hexdigest()}"'
        assert "content-encoding" not in whole.headers
        r = await s.get(range="bytes=50000-50099")
        assert (r.status_code, r.content) == (206, text[50000:50100])
        assert r.headers["content-range"] == f"bytes 50000-50099/{len(text)}"
        assert gzip.compress(text)  # the test's own sanity: gzip is available


# -- several ranges ----------------------------------------------------------------


async def test_several_ranges_are_multipart_byteranges(
    any_storage: Storage, asyncassets_db: Any
) -> None:
    async with serve_file(any_storage) as s:
        r = await s.get(range="bytes=0-9, 5000-5009, -10")
        assert r.status_code == 206
        assert r.headers["content-length"] == str(len(r.content))
        assert "content-range" not in r.headers
        assert multipart_parts(r) == [
            ("bytes 0-9/10240", DATA[0:10]),
            ("bytes 5000-5009/10240", DATA[5000:5010]),
            ("bytes 10230-10239/10240", DATA[10230:]),
        ]
        head = await s.head(range="bytes=0-9, 5000-5009")
        assert head.status_code == 200  # Range applies to GET only


async def test_overlapping_ranges_are_coalesced(served: Served) -> None:
    r = await served.get(range="bytes=0-100, 50-200, 201-300")
    assert r.status_code == 206
    assert r.headers["content-range"] == "bytes 0-300/10240"
    assert r.content == DATA[:301]
    out_of_order = await served.get(range="bytes=9000-9009, 0-9")
    assert [cr for cr, _ in multipart_parts(out_of_order)] == [
        "bytes 0-9/10240",
        "bytes 9000-9009/10240",
    ]


async def test_a_thousand_ranges_get_the_whole_file_or_one_coalesced_range(
    served: Served,
) -> None:
    disjoint = ",".join(f"{i}-{i}" for i in range(0, 2000, 2))
    r = await served.get(range=f"bytes={disjoint}")
    assert (r.status_code, r.content) == (200, DATA)
    same = ",".join(["0-99"] * 1000)
    r = await served.get(range=f"bytes={same}")
    assert (r.status_code, r.headers["content-range"]) == (206, "bytes 0-99/10240")
    assert r.content == DATA[:100]


async def test_max_ranges_is_settable(asyncassets_db: Any, storage: Storage) -> None:
    async with serve_file(storage, response={"max_ranges": 2}) as s:
        assert (await s.get(range="bytes=0-0,2-2")).status_code == 206
        assert (await s.get(range="bytes=0-0,2-2,4-4")).status_code == 200


# -- unsatisfiable and invalid ranges ------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        "bytes=10240-",
        "bytes=20000-30000",
        "bytes=-0",
        "bytes=99999999999999999999999-",
        "bytes=10240-10250, 99999-",
    ],
)
async def test_an_unsatisfiable_range_is_416_with_the_length(served: Served, header: str) -> None:
    r = await served.get(range=header)
    assert r.status_code == 416
    assert r.headers["content-range"] == "bytes */10240"
    assert r.headers["etag"] == f'"{SHA}"'


async def test_unsatisfiable_ranges_beside_satisfiable_ones_are_dropped(served: Served) -> None:
    r = await served.get(range="bytes=20000-, 0-4")
    assert (r.status_code, r.content, r.headers["content-range"]) == (
        206,
        DATA[:5],
        "bytes 0-4/10240",
    )


@pytest.mark.parametrize(
    "header",
    [
        "garbage",
        "bytes",
        "bytes=",
        "bytes=,",
        "bytes=abc",
        "bytes=5-1",  # inverted
        "bytes=0-1,5-1",  # one inverted spec invalidates the header
        "bytes=-",
        "bytes=--5",
        "bytes=1-2-3",
        "bytes=0x10-0x20",
        "bytes=1.5-2",
        "items=0-5",
        "bytes=0-5;q=1",
        "bytes=\u00e9-1".encode(),
        "bytes=\u0663-\u0665".encode(),  # digits, but not ASCII ones
    ],
)
async def test_an_invalid_range_header_is_ignored(served: Served, header: str | bytes) -> None:
    r = await served.client.get(served.url, headers={"range": header})
    assert (r.status_code, r.content) == (200, DATA), header
    assert "content-range" not in r.headers


async def test_numbers_longer_than_int_takes_are_huge_not_errors(served: Served) -> None:
    huge = "9" * 5000  # Python's int() refuses strings this long
    assert (await served.get(range=f"bytes={huge}-")).status_code == 416
    assert (await served.get(range=f"bytes={huge}-{huge}9")).status_code == 416
    r = await served.get(range=f"bytes=0-{huge}")
    assert (r.status_code, r.headers["content-range"]) == (206, "bytes 0-10239/10240")
    r = await served.get(range=f"bytes=-{huge}")
    assert (r.status_code, r.content) == (206, DATA)


# -- conditional requests ------------------------------------------------------------


async def test_if_none_match_revalidates_with_304(served: Served) -> None:
    etag = (await served.get()).headers["etag"]
    for header in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        r = await served.get(if_none_match=header)
        assert r.status_code == 304, header
        assert r.content == b""
        assert r.headers["etag"] == etag
        assert r.headers["cache-control"] == "no-cache"
        assert "content-length" not in r.headers
    assert (await served.head(if_none_match=etag)).status_code == 304
    r = await served.get(if_none_match='"something-else"')
    assert (r.status_code, r.content) == (200, DATA)


async def test_if_modified_since_revalidates_and_if_none_match_wins(served: Served) -> None:
    last = (await served.get()).headers["last-modified"]
    when = email.utils.parsedate_to_datetime(last)
    later = email.utils.format_datetime(when + dt.timedelta(hours=1), usegmt=True)
    earlier = email.utils.format_datetime(when - dt.timedelta(seconds=1), usegmt=True)
    assert (await served.get(if_modified_since=last)).status_code == 304
    assert (await served.get(if_modified_since=later)).status_code == 304
    assert (await served.get(if_modified_since=earlier)).status_code == 200
    assert (await served.get(if_modified_since="not a date")).status_code == 200
    # If-None-Match is evaluated instead of If-Modified-Since when both are sent.
    r = await served.get(if_modified_since=later, if_none_match='"other"')
    assert r.status_code == 200


async def test_if_match_and_if_unmodified_since_fail_with_412(served: Served) -> None:
    first = await served.get()
    etag, last = first.headers["etag"], first.headers["last-modified"]
    assert (await served.get(if_match=etag)).status_code == 200
    assert (await served.get(if_match="*")).status_code == 200
    assert (await served.get(if_match='"other"')).status_code == 412
    assert (await served.get(if_match=f"W/{etag}")).status_code == 412  # strong comparison
    when = email.utils.parsedate_to_datetime(last)
    earlier = email.utils.format_datetime(when - dt.timedelta(seconds=1), usegmt=True)
    assert (await served.get(if_unmodified_since=earlier)).status_code == 412
    assert (await served.get(if_unmodified_since=last)).status_code == 200


async def test_if_range_honours_the_range_only_for_the_same_version(served: Served) -> None:
    first = await served.get()
    etag, last = first.headers["etag"], first.headers["last-modified"]
    assert (await served.get(range="bytes=0-9", if_range=etag)).status_code == 206
    assert (await served.get(range="bytes=0-9", if_range=last)).status_code == 206
    for stale in ('"other"', f"W/{etag}", "Mon, 01 Jan 2001 00:00:00 GMT", "junk"):
        r = await served.get(range="bytes=0-9", if_range=stale)
        assert (r.status_code, r.content) == (200, DATA), stale


async def test_a_legacy_file_without_sha256_gets_a_stable_weak_etag(served: Served) -> None:
    files = served.doc._get_db()[f"{served.storage.collection_name}.files"]
    await files.update_one({}, {"$unset": {"metadata.sha256": ""}})
    first = await served.get()
    etag = first.headers["etag"]
    assert re.fullmatch(r'W/"[0-9a-f]{40}"', etag)
    assert (await served.get()).headers["etag"] == etag
    assert (await served.get(if_none_match=etag)).status_code == 304
    # A weak validator never makes a Range conditional succeed.
    assert (await served.get(range="bytes=0-9", if_range=etag)).status_code == 200
    # Another upload under the same id (a new upload time) changes it.
    await files.update_one({}, {"$set": {"uploadDate": dt.datetime(2020, 1, 1)}})
    assert (await served.get()).headers["etag"] != etag


# -- headers settable and derived ----------------------------------------------------------


@pytest.mark.parametrize(
    ("download", "filename", "expected"),
    [
        (False, "report.png", 'inline; filename="report.png"'),
        (True, "report.pdf", 'attachment; filename="report.pdf"'),
        (
            True,
            "Ærøskøbing naïve café.pdf",
            'attachment; filename="rskbing naive cafe.pdf"; '
            "filename*=UTF-8''%C3%86r%C3%B8sk%C3%B8bing%20na%C3%AFve%20caf%C3%A9.pdf",
        ),
        (
            True,
            "日本語.txt",
            'attachment; filename="download.txt"; '
            "filename*=UTF-8''%E6%97%A5%E6%9C%AC%E8%AA%9E.txt",
        ),
        (
            True,
            'evil"\r\nSet-Cookie: x=1;.txt',
            'attachment; filename="evil_Set-Cookie: x=1_.txt"; '
            "filename*=UTF-8''evil%22Set-Cookie%3A%20x%3D1%3B.txt",
        ),
        (True, "../../etc/passwd", 'attachment; filename="passwd"'),
        (True, None, "attachment"),
    ],
)
async def test_content_disposition_has_an_ascii_fallback_and_rfc5987_name(
    asyncassets_db: Any, download: bool, filename: str | None, expected: str
) -> None:
    storage = GridFSStorage(f"web{next(_names)}")
    options = {"response": {"download": download}, "content_type": "image/png"}
    async with serve_file(storage, filename=filename, **options) as s:
        r = await s.get()
        assert r.headers["content-disposition"] == expected
        assert "set-cookie" not in r.headers


async def test_filename_and_content_type_can_be_given(
    asyncassets_db: Any, storage: Storage
) -> None:
    options = {"filename": "other.csv", "content_type": "text/csv", "download": True}
    async with serve_file(storage, response=options) as s:
        r = await s.get()
        assert r.headers["content-disposition"] == 'attachment; filename="other.csv"'
        assert r.headers["content-type"] == "text/csv"


@pytest.mark.parametrize(
    ("stored", "filename", "expected"),
    [
        ("image/png", "x.bin", "image/png"),
        (None, "photo.jpg", "image/jpeg"),
        (None, "no-extension", "application/octet-stream"),
        ("text/plain\r\nX-Evil: 1", "a.txt", "text/plain; charset=utf-8"),  # guessed instead
        ("nonsense", None, "application/octet-stream"),
    ],
)
async def test_content_type_comes_from_the_catalogue_else_the_name(
    asyncassets_db: Any, stored: str | None, filename: str | None, expected: str
) -> None:
    storage = GridFSStorage(f"web{next(_names)}")
    doc_cls = doc_class(storage)
    doc = doc_cls(name="t")
    await doc.file.put(b"x", filename=filename)
    await doc.save()
    change = (
        {"$set": {"metadata.content_type": stored}}
        if stored
        else {
            "$unset": {"metadata.content_type": ""}  # what sniffing found at upload
        }
    )
    await asyncassets_db[f"{storage.collection_name}.files"].update_one({}, change)
    transport = httpx.ASGITransport(app=app_for(doc_cls))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        r = await client.get(f"/f/{doc.pk}")
    assert r.headers["content-type"] == expected
    assert "x-evil" not in r.headers


async def test_active_content_is_saved_sandboxed_and_never_shown(
    asyncassets_db: Any, storage: Storage
) -> None:
    page = b"<script>alert(document.cookie)</script>"
    for download in (False, True):
        options = {"response": {"download": download}, "content_type": "text/html"}
        async with serve_file(storage, page, filename="a.html", **options) as s:
            r = await s.get()
            assert r.headers["content-disposition"] == 'attachment; filename="a.html"'
            assert r.headers["content-type"] == "application/octet-stream"
            assert r.headers["content-security-policy"] == "sandbox"
            assert r.headers["x-content-type-options"] == "nosniff"


async def test_caller_headers_cannot_lift_the_sandbox_or_nosniff(
    asyncassets_db: Any, storage: Storage
) -> None:
    page = b"<script>alert(document.cookie)</script>"
    # An audio file is inline without sandbox; a caller that retypes it as HTML,
    # or sends a policy of its own, still gets the sandbox and nosniff.
    headers = {
        "Content-Type": "text/html",
        "Content-Security-Policy": "default-src 'self'",
        "X-Content-Type-Options": "sniff-away",
    }
    options = {"response": {"headers": headers}, "content_type": "audio/mpeg"}
    async with serve_file(storage, page, filename="a.mp3", **options) as s:
        r = await s.get()
        assert r.headers["content-type"] == "text/html"
        assert r.headers.get_list("content-security-policy") == ["sandbox", "default-src 'self'"]
        assert r.headers.get_list("x-content-type-options") == ["nosniff"]
    async with serve_file(storage, page, filename="a.mp3", content_type="audio/mpeg") as s:
        r = await s.get()
        assert r.headers["content-disposition"] == 'inline; filename="a.mp3"'
        assert "content-security-policy" not in r.headers


def csp_middleware(app: Any) -> Any:
    """A site-wide security-headers middleware, as many apps have: a CSP on every answer."""

    async def wrapped(scope: Any, receive: Any, send: Any) -> None:
        async def add(message: Any) -> None:
            if message["type"] == "http.response.start":
                extra = (b"content-security-policy", b"frame-ancestors 'self'")
                message = {**message, "headers": [*message["headers"], extra]}
            await send(message)

        await app(scope, receive, add)

    return wrapped


#: The headers that keep a file from acting as the site.
GUARDS = ("content-security-policy", "x-content-type-options", "content-disposition")
HTML_INLINE = ContentPolicy(inline={*INLINE_TYPES, "text/html"})
PAGE = b"<!doctype html><script>fetch('/pwned?' + document.cookie)</script>"


@pytest.mark.parametrize(
    ("content_type", "filename", "options", "middleware"),
    [
        # HTML shown inline under sandbox (a policy the docs allow), the caller
        # adding a CSP of its own: the reviewer's case.
        (
            "text/html",
            "page.html",
            {"policy": HTML_INLINE, "headers": {"Content-Security-Policy": "img-src 'self'"}},
            False,
        ),
        ("text/html", "page.html", {"policy": HTML_INLINE}, True),
        # An unsandboxed type retyped by the caller, which sandboxes it.
        (
            "audio/mpeg",
            "a.mp3",
            {
                "headers": {
                    "Content-Type": "text/html",
                    "Content-Disposition": "inline",
                    "Content-Security-Policy": "default-src 'self'",
                }
            },
            False,
        ),
        ("audio/mpeg", "a.mp3", {}, True),  # no sandbox on the 200: none on the others
        ("text/html", "page.html", {}, False),
    ],
    ids=["caller-csp", "middleware-csp", "caller-retyped", "audio-middleware", "attachment"],
)
async def test_every_answer_about_a_file_carries_the_guards_of_its_200(
    asyncassets_db: Any,
    storage: Storage,
    content_type: str,
    filename: str,
    options: dict[str, Any],
    middleware: bool,
) -> None:
    # A browser that revalidates a cached page updates the cached headers from
    # the 304: Chromium replaces every cached CSP with the 304's. A 304 with a
    # CSP but no sandbox unsandboxed the cached page (tests/
    # test_web_browser_revalidation.py shows the script running).
    doc_cls = doc_class(storage)
    doc = doc_cls(name="page")
    await doc.file.put(PAGE, content_type=content_type, filename=filename)
    await doc.save()
    app = app_for(doc_cls, **options)
    transport = httpx.ASGITransport(app=csp_middleware(app) if middleware else app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        s = Served(doc, client, storage)
        full = await s.get()
        assert full.status_code == 200
        guards = {name: full.headers.get_list(name) for name in GUARDS}
        assert guards["x-content-type-options"] == ["nosniff"]
        etag = full.headers["etag"]
        answers = {
            "304": (304, await s.get(if_none_match=etag)),
            "304 to HEAD": (304, await s.head(if_none_match=etag)),
            "412": (412, await s.get(if_match='"another"')),
            "416": (416, await s.get(range="bytes=99999-")),
            "HEAD": (200, await s.head()),
            "206": (206, await s.get(range="bytes=0-3")),
        }
        for what, (status, r) in answers.items():
            assert r.status_code == status, what
            assert {name: r.headers.get_list(name) for name in GUARDS} == guards, what
            if status in (200, 206, 304):
                assert r.headers["content-type"] == full.headers["content-type"], what


async def test_every_answer_sends_nosniff_exactly_once(served: Served) -> None:
    etag = (await served.get()).headers["etag"]
    answers = [
        await served.get(),
        await served.head(),
        await served.get(range="bytes=0-3"),
        await served.get(range="bytes=0-3,10-20"),
        await served.get(range="bytes=99999-"),  # 416: sent it twice
        await served.get(if_none_match=etag),
        await served.get(if_match='"another"'),
        await served.client.post(served.url),
    ]
    for r in answers:
        assert r.headers.get_list("x-content-type-options") == ["nosniff"], r.status_code


async def test_cache_control_and_headers_are_settable(
    asyncassets_db: Any, storage: Storage
) -> None:
    options = {
        "cache_control": "public, max-age=31536000, immutable",
        "headers": {"X-Served-By": "test", "Content-Length": "1", "Vary": "Cookie"},
    }
    async with serve_file(storage, response=options) as s:
        r = await s.get()
        assert r.headers["cache-control"] == "public, max-age=31536000, immutable"
        assert r.headers["x-served-by"] == "test"
        assert r.headers["vary"] == "Cookie"
        assert r.headers["content-length"] == str(len(DATA))  # not the caller's
        assert r.content == DATA
    async with serve_file(storage, response={"cache_control": None}) as s:
        assert "cache-control" not in (await s.get()).headers


async def test_bad_arguments_are_refused_at_once() -> None:
    with pytest.raises(TypeError, match="proxy"):
        FileResponse(b"bytes")  # type: ignore[arg-type]
    proxy = doc_class(GridFSStorage("fs"))().file
    with pytest.raises(ValueError, match="max_ranges"):
        FileResponse(proxy, max_ranges=0)


# -- files that change while they are sent ------------------------------------------------


async def call(
    response: Response,
    scope: dict[str, Any],
    on_body: Any = None,
    sent: list[dict[str, Any]] | None = None,
) -> list[Any]:
    """Send ``response`` through the ASGI interface by hand; the messages it sent."""
    sent = [] if sent is None else sent

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()  # the client stays
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if on_body is not None and message["type"] == "http.response.body":
            await on_body(message)

    scope = {"type": "http", "method": "GET", "headers": [], "path": "/", **scope}
    await response(scope, receive, send)
    return sent


@pytest.mark.parametrize("kind", ["gridfs", "filesystem"])
@pytest.mark.parametrize("ranges", [None, "bytes=0-9,3000000-3000009"])
async def test_a_file_replaced_mid_response_never_mixes_two_files(
    asyncassets_db: Any,
    tmp_path: Any,
    request: pytest.FixtureRequest,
    kind: str,
    ranges: str | None,
) -> None:
    # The file is replaced (which deletes the old one) as soon as the first bytes
    # went out. A reader that goes back to storage for more (the second part of a
    # multipart response opens a new read; GridFS past its first 4 MiB batch)
    # finds the old file gone and raises, so the server closes the connection
    # short of Content-Length. A reader that still holds the old bytes (an open
    # file; a batch already fetched) ends them. Either way: bytes of the old file.
    storage = make_storage(kind, request, tmp_path)
    big = os.urandom(3 * 1024 * 1024 + 5)
    async with serve_file(storage, big) as s:
        fresh = await type(s.doc).objects.get(pk=s.doc.pk)
        replaced = False

        async def replace_once(message: dict[str, Any]) -> None:
            nonlocal replaced
            if not replaced:
                replaced = True
                await fresh.file.replace(b"other bytes" * 1000)

        headers = [(b"range", ranges.encode())] if ranges else []
        sent: list[dict[str, Any]] = []
        aborted = False
        try:
            await call(FileResponse(s.doc.file), {"headers": headers}, replace_once, sent)
        except FileDeletedWhileReading:
            aborted = True
        received = b"".join(m["body"] for m in sent[1:])
        assert replaced
        assert b"other bytes" not in received
        if ranges is None:
            assert big.startswith(received)
            assert aborted == (len(received) < len(big))
        elif not aborted:
            # Both parts were read before the first byte went out (the last piece
            # read is held back until the read is over): all old bytes, complete.
            assert [data for _, data in multipart_parts_of(sent)] == [
                big[:10],
                big[3000000:3000010],
            ]
        else:
            # GridFS: the entry is looked up again once the read is over, and the
            # file is gone by then: the response ends short.
            assert kind == "gridfs"
            assert big[:10] in received
            assert sum(len(m["body"]) for m in sent[1:]) < int(
                dict(sent[0]["headers"])[b"content-length"]
            )


async def test_a_file_gone_before_the_first_byte_is_a_clean_404(served: Served) -> None:
    # Deleted between the catalogue lookup and the first read: nothing was sent yet.
    response = FileResponse(served.doc.file)
    entry = await served.storage.bind(served.doc._get_db()).find(served.doc.file.file_id)
    await served.storage.bind(served.doc._get_db()).delete(served.doc.file.file_id)
    assert entry is not None
    store = served.storage.bind(served.doc._get_db())
    sent = await call(FileResponse.for_entry(store, entry), {})
    assert sent[0]["status"] == 404
    assert response.status_code == 200  # not sent: the default


async def test_a_client_that_leaves_stops_the_reading(
    asyncassets_db: Any, storage: Storage
) -> None:
    # The ASGI interface spoken by hand: the client is gone at once. The file is
    # several pieces long (1 KiB chunks in GridFS, 1 MiB reads from a directory).
    data = os.urandom(3 * 1024 * 1024 + 1)
    async with serve_file(storage, data) as s:

        async def receive() -> dict[str, Any]:
            return {"type": "http.disconnect"}

        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)
            await asyncio.sleep(0)

        scope = {"type": "http", "method": "GET", "headers": [], "path": "/"}
        await FileResponse(s.doc.file)(scope, receive, send)
        assert sent[0]["status"] == 200
        bodies = [m for m in sent if m["type"] == "http.response.body"]
        assert sum(len(m["body"]) for m in bodies) < len(data) // 2
        assert all(m["more_body"] for m in bodies)
