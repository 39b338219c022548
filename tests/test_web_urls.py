"""Signed URLs: ``proxy.url()``, tokens, ``files_app``, S3 presigning and public URLs.

GridFS and directory URLs are fetched from ``files_app`` through httpx's ASGI
transport; S3 URLs are fetched from the plugin's moto server over loopback.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import itertools
import re
import subprocess
import sys
import time
import unicodedata
import urllib.parse
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

from asyncassets import Document
from asyncassets.errors import SignatureInvalid, StorageError, URLExpired, URLsNotConfigured
from asyncassets.fields import FileField, StringField
from asyncassets.files import urls
from asyncassets.files.urls import (
    SignedFile,
    configure_urls,
    content_disposition,
    expiry_for,
    read_token,
    sign_token,
)
from asyncassets.storage import FileSystemStorage, GridFSStorage, S3Storage, Storage
from asyncassets.web import files_app

SECRET = "a test secret of more than sixteen bytes"
DATA = b"signed bytes " * 1000
_names = itertools.count()


@pytest.fixture(autouse=True)
def no_url_config() -> Any:
    """Each test starts with no process-wide signing configuration, and leaves none."""
    urls._config = None
    yield
    urls._config = None


def doc_class(storage: Storage) -> Any:
    n = next(_names)
    return type(
        f"UrlDoc{n}",
        (Document,),
        {
            "name": StringField(),
            "file": FileField(storage=storage),
            "meta": {"collection": f"url_docs_{n}"},
        },
    )


@pytest.fixture(params=["gridfs", "filesystem"])
def storage(request: pytest.FixtureRequest, tmp_path: Any) -> Storage:
    name = f"url{next(_names)}"
    if request.param == "gridfs":
        return GridFSStorage(name)
    return FileSystemStorage(tmp_path / name, collection_name=name, fsync=False)


class Site:
    """An app with ``files_app`` mounted at ``/files``, a stored file, and a client."""

    def __init__(self, doc: Any, client: httpx.AsyncClient) -> None:
        self.doc = doc
        self.client = client


@contextlib.asynccontextmanager
async def site(storage: Storage, data: bytes = DATA, **app_options: Any) -> AsyncIterator[Site]:
    app_options.setdefault("secret", SECRET)
    app = Starlette(routes=[Mount("/files", files_app(base_url="/files", **app_options))])
    doc = doc_class(storage)(name="x")
    await doc.file.put(data, content_type="text/plain", filename="notes.txt")
    await doc.save()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield Site(doc, client)


@pytest.fixture
async def served(asyncassets_db: Any, storage: Storage) -> AsyncIterator[Site]:
    async with site(storage) as s:
        yield s


def token_of(url: str) -> str:
    return url.rsplit("/", 1)[1]


def resign(url: str, **changes: Any) -> str:
    """The URL with its claims changed and signed again with the test's key."""
    claims = read_token(token_of(url), [SECRET.encode()], now=0)
    fields = {**claims.__dict__, **changes}
    return f"/files/{sign_token(SignedFile(**fields), [SECRET.encode()])}"


# -- serving -------------------------------------------------------------------------


async def test_a_signed_url_serves_the_file_with_ranges_and_validators(served: Site) -> None:
    url = await served.doc.file.url(expires=600)
    assert url is not None and url.startswith("/files/")
    r = await served.client.get(url)
    assert r.status_code == 200
    assert r.content == DATA
    assert r.headers["content-type"] == "text/plain; charset=utf-8"
    assert r.headers["content-disposition"] == 'inline; filename="notes.txt"'
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["content-security-policy"] == "sandbox"
    assert r.headers["etag"] == f'"{hashlib.sha256(DATA).hexdigest()}"'
    max_age = int(r.headers["cache-control"].removeprefix("private, max-age="))
    assert 600 <= max_age <= 660 + 1
    ranged = await served.client.get(url, headers={"range": "bytes=13-25"})
    assert (ranged.status_code, ranged.content) == (206, DATA[13:26])
    again = await served.client.get(url, headers={"if-none-match": r.headers["etag"]})
    assert again.status_code == 304
    head = await served.client.head(url)
    assert (head.status_code, head.content) == (200, b"")
    assert (await served.client.post(url)).status_code == 405


async def test_a_download_url_is_an_attachment_with_the_name_given(served: Site) -> None:
    url = await served.doc.file.url(expires=60, download=True, filename="Résumé 2026.txt")
    assert url is not None
    r = await served.client.get(url)
    assert r.status_code == 200
    assert r.headers["content-disposition"] == (
        "attachment; filename=\"Resume 2026.txt\"; filename*=UTF-8''R%C3%A9sum%C3%A9%202026.txt"
    )


async def test_an_empty_field_has_no_url(asyncassets_db: Any, storage: Storage) -> None:
    configure_urls(SECRET)
    doc = doc_class(storage)(name="empty")
    assert await doc.file.url() is None


# -- refusals ------------------------------------------------------------------------------


async def test_an_altered_url_is_403(served: Site) -> None:
    url = await served.doc.file.url(expires=600)
    assert url is not None
    token = token_of(url)
    payload, mac = token.split(".")
    flipped = payload[:-2] + ("A" if payload[-2] != "A" else "B") + payload[-1]
    forged_claims = resign(url, expires=int(time.time()) + 10**9).rsplit("/", 1)[1].split(".")[0]
    for bad in (
        f"{flipped}.{mac}",  # claims changed, signature kept
        f"{forged_claims}.{mac}",  # a longer expiry, signature kept
        f"{payload}.{mac[:-1]}",  # signature cut
        f"{payload}.{'A' * len(mac)}",
        f"{payload}",  # no signature
        f"{payload}.{mac}.{mac}",
        "garbage",
        "%00%ff",
        "a" * 5000,
        "." * 3,
        "!!!.???",
    ):
        r = await served.client.get(f"/files/{bad}")
        assert r.status_code == 403, bad
        assert r.headers["cache-control"] == "no-store"
        assert served.doc.file.file_id.__str__() not in r.text


async def test_every_answer_of_files_app_carries_nosniff(
    asyncassets_db: Any, storage: Storage
) -> None:
    # Starlette's own answers (a 405 it raises to the host app's handlers, the
    # 307 of a trailing slash, its 404s) went out without nosniff.
    async with site(storage) as mounted:
        url = await mounted.doc.file.url(expires=600)
        assert url is not None
        token = token_of(url)
        standalone = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=files_app(secret=SECRET, base_url="/files")),
            base_url="http://test",
        )
        async with standalone:
            for client, base in ((mounted.client, "/files"), (standalone, "")):
                answers = {
                    "GET": (200, await client.get(f"{base}/{token}")),
                    "HEAD": (200, await client.head(f"{base}/{token}")),
                    "POST": (405, await client.post(f"{base}/{token}")),
                    "DELETE": (405, await client.delete(f"{base}/{token}")),
                    "a trailing slash": (403, await client.get(f"{base}/{token}/")),
                    "a path under the token": (403, await client.get(f"{base}/{token}/x")),
                    "no token": (403, await client.get(f"{base}/")),
                    "a path of two segments": (403, await client.get(f"{base}/a/b")),
                }
                for what, (status, r) in answers.items():
                    assert r.status_code == status, (base, what)
                    nosniff = r.headers.get_list("x-content-type-options")
                    assert nosniff == ["nosniff"], (base, what)
                    if status == 405:
                        assert r.headers["allow"] == "GET, HEAD"


async def test_an_expired_url_is_403(served: Site) -> None:
    url = await served.doc.file.url(expires=600)
    assert url is not None
    expired = resign(url, expires=int(time.time()) - 1)
    r = await served.client.get(expired)
    assert r.status_code == 403
    assert "expired" in r.text
    # The original lasts at least what was asked, and at most a window (60 s) more.
    assert read_token(token_of(url), now=time.time() + 599)
    with pytest.raises(URLExpired):
        read_token(token_of(url), now=time.time() + 600 + 61)


async def test_a_url_signed_with_another_key_is_403(asyncassets_db: Any, storage: Storage) -> None:
    configure_urls("another secret, long enough to sign with")
    other = doc_class(storage)(name="o")
    await other.file.put(DATA)
    await other.save()
    foreign = await other.file.url()
    assert foreign is not None
    async with site(storage) as s:
        assert (await s.client.get(foreign)).status_code == 403


async def test_keys_rotate_the_first_signs_and_each_verifies(
    asyncassets_db: Any, storage: Storage
) -> None:
    old, new = "the old secret, long enough to sign", "the new secret, long enough to sign"
    configure_urls(old)
    async with site(storage, secret=[old]) as s:
        signed_old = await s.doc.file.url()
    async with site(storage, secret=[new, old]) as s:
        assert signed_old is not None
        assert (await s.client.get(signed_old)).status_code == 200
        signed_new = await s.doc.file.url()
        assert signed_new is not None
        with pytest.raises(SignatureInvalid):
            read_token(token_of(signed_new), [old.encode()])
        assert (await s.client.get(signed_new)).status_code == 200
    async with site(storage, secret=[new]) as s:
        assert (await s.client.get(signed_old)).status_code == 403  # retired


async def test_a_deleted_file_is_404_and_a_replaced_one_revoked(
    served: Site, storage: Storage
) -> None:
    doc = served.doc
    before = await doc.file.url()
    assert before is not None
    # Other bytes under the same id (an upload with an explicit id after a delete):
    # the signature covers the SHA-256, so the URL is revoked.
    store = storage.bind(doc._get_db())
    file_id = doc.file.file_id
    await store.delete(file_id)
    await store.upload(b"other bytes", file_id=file_id, filename="notes.txt")
    r = await served.client.get(before)
    assert r.status_code == 403
    assert "changed" in r.text
    # replace() stores a new file and deletes the old one: its URLs are not found.
    fresh = await type(doc).objects.get(pk=doc.pk)
    old_url = await fresh.file.url()
    await fresh.file.replace(b"third version")
    assert old_url is not None
    assert (await served.client.get(old_url)).status_code == 404
    new_url = await fresh.file.url()
    assert new_url is not None
    assert (await served.client.get(new_url)).content == b"third version"
    await fresh.file.delete()
    assert (await served.client.get(new_url)).status_code == 404


async def test_a_file_of_an_undeclared_catalogue_is_served_from_the_storages_given(
    asyncassets_db: Any, tmp_path: Any
) -> None:
    # A catalogue no document class of this process declares: files_app is told.
    storage = FileSystemStorage(tmp_path / "loose", collection_name="loose", fsync=False)
    store = storage.bind(asyncassets_db)
    entry = await store.upload(b"loose bytes", filename="l.txt")
    configure_urls(SECRET)
    url = await urls.file_url(storage, "default", entry, expires=60)
    for storages in ((), (storage,)):
        app = Starlette(routes=[Mount("/files", files_app(storages=storages))])
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            if storages:
                assert (await client.get(url)).content == b"loose bytes"
            else:
                with pytest.raises(StorageError, match="storages="):
                    await client.get(url)


# -- configuration and tokens ---------------------------------------------------------------


async def test_url_without_a_key_says_how_to_set_one(asyncassets_db: Any, storage: Storage) -> None:
    doc = doc_class(storage)(name="x")
    await doc.file.put(b"x")
    with pytest.raises(URLsNotConfigured, match="files_app"):
        await doc.file.url()
    with pytest.raises(URLsNotConfigured):
        files_app()


@pytest.mark.parametrize(
    ("secret", "error"),
    [("short", ValueError), (b"", ValueError), ([], ValueError), (12345, TypeError)],
)
def test_weak_or_missing_secrets_are_refused(secret: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        configure_urls(secret)
    with pytest.raises(error):
        files_app(secret=secret)


def test_the_config_never_shows_its_keys() -> None:
    config = configure_urls(SECRET, base_url="https://media.example.com/files/")
    assert SECRET not in repr(config)
    assert config.base_url == "https://media.example.com/files"


def test_expiries_round_up_to_a_window_so_urls_repeat() -> None:
    now = 1_800_000_123.4
    # Automatic window: a tenth of the lifetime (here 360 s).
    assert expiry_for(3600, None, now) % 360 == 0
    assert 3600 <= expiry_for(3600, None, now) - now < 3600 + 360
    assert expiry_for(3600, None, now) == expiry_for(3600, None, now + 100)
    assert expiry_for(dt.timedelta(days=30), None, now) % 3600 == 0  # at most an hour
    assert expiry_for(5, None, now) == 1_800_000_129  # 1 s at least
    assert expiry_for(60, 0, now) == 1_800_000_184  # 0: no rounding
    assert expiry_for(60, 300, now) == 1_800_000_300
    for bad in (0, -5, float("inf"), float("nan")):
        with pytest.raises(ValueError):
            expiry_for(bad, None, now)
    with pytest.raises(TypeError):
        expiry_for("60", None, now)  # type: ignore[arg-type]


async def test_two_urls_within_a_window_are_the_same(served: Site) -> None:
    first = await served.doc.file.url(expires=3600)
    second = await served.doc.file.url(expires=3600)
    assert first == second
    assert first != await served.doc.file.url(expires=3600, download=True)


def test_a_token_names_the_file_and_is_checked_before_it_is_decoded() -> None:
    key = [SECRET.encode()]
    claims = SignedFile("reports", "fs", 42, "ab" * 32, int(time.time()) + 60, True, "r.pdf")
    token = sign_token(claims, key)
    assert read_token(token, key) == claims
    mac = token.split(".")[1]
    # A forged payload that is not even BSON is refused as a bad signature.
    junk = base64.urlsafe_b64encode(b"\xff" * 40).decode().rstrip("=")
    with pytest.raises(SignatureInvalid):
        read_token(f"{junk}.{mac}", key)


def test_importing_asyncassets_web_without_starlette_says_what_to_install() -> None:
    code = (
        "import sys; sys.modules['starlette'] = None\n"
        "try:\n    import asyncassets.web\n"
        "except ImportError as exc:\n    print(type(exc).__name__, exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == (
        "WebExtraMissing asyncassets.web needs Starlette: pip install 'asyncassets[web]'"
    )


# -- names ------------------------------------------------------------------------------------


def folds_into_a_forbidden_character(ch: str) -> bool:
    folded = unicodedata.normalize("NFKD", ch)
    return folded != ch and any(c in "/\\" or unicodedata.category(c) == "Cc" for c in folded)


#: Every code point whose NFKD folding holds a path separator or a control
#: character: U+FF0F FULLWIDTH SOLIDUS is "/", U+2100 ACCOUNT OF is "a/c"...
FOLDING_INTO_SEPARATORS = [
    chr(cp)
    for cp in range(sys.maxunicode + 1)
    if not 0xD800 <= cp <= 0xDFFF and folds_into_a_forbidden_character(chr(cp))
]
FALLBACK = re.compile(r"""[A-Za-z0-9 !#$&'()+,\-.:=@\[\]^_{}~]+""")


def test_the_ascii_fallback_name_never_carries_a_separator() -> None:
    # Separators were removed before NFKD folding, which makes new ones.
    assert {"\uff0f", "\u2100", "\u2101", "\u2105", "\u2106", "\uff3c"} <= set(
        FOLDING_INTO_SEPARATORS
    )
    names = [
        "\uff45\uff56\uff49\uff4c\uff0f..\uff0fx.html",  # the reviewer's: "evil/../x.html"
        "..\uff0f..\uff0f..\uff0fetc\uff0fpasswd",
        "a\u2100b\u2106.txt",
    ]
    names += [f"evil{ch}..{ch}x{ch}.html" for ch in FOLDING_INTO_SEPARATORS]
    for name in names:
        for download in (False, True):
            value = content_disposition(download, name)
            match = re.match(r'(inline|attachment); filename="([^"]*)"(; filename\*=.*)?$', value)
            assert match, value
            fallback = match.group(2)
            assert FALLBACK.fullmatch(fallback), (name, fallback)
            # The exact name is still given, percent-encoded, for browsers.
            exact = match.group(3)
            assert exact and urllib.parse.unquote(exact.split("''", 1)[1]) == name


# -- S3 ------------------------------------------------------------------------------------


async def test_an_s3_url_is_presigned_and_fetches_the_file(
    asyncassets_db: Any, asyncassets_s3_bucket: Any
) -> None:
    storage = S3Storage(**asyncassets_s3_bucket.options, prefix="media/", collection_name="s3u")
    doc = doc_class(storage)(name="s3")
    await doc.file.put(DATA, content_type="text/plain", filename="Ünïcode notes.txt")
    await doc.save()
    url = await doc.file.url(expires=300, download=True)  # no key needed for S3
    assert url is not None
    query = parse_qs(urlsplit(url).query)
    assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]
    assert query["X-Amz-Expires"] == ["300"]
    async with httpx.AsyncClient() as client:
        r = await client.get(url)
        assert r.status_code == 200
        assert r.content == DATA
        assert r.headers["content-type"] == "text/plain; charset=utf-8"  # the policy's
        disposition = r.headers["content-disposition"]
        assert disposition.startswith('attachment; filename="Unicode notes.txt"')
        ranged = await client.get(url, headers={"range": "bytes=0-5"})
        assert (ranged.status_code, ranged.content) == (206, DATA[:6])
        # (moto does not check signatures, so tampering is S3's to refuse, not tested here.)
    with pytest.raises(ValueError, match="7 days"):
        await doc.file.url(expires=dt.timedelta(days=8))


#: stored type, stored name -> what a presigned link sends: (type, disposition).
#: Inline only what is safe without nosniff and sandbox, which S3 cannot send.
PRESIGNED = {
    "page": ("text/html", "a.bin", "application/octet-stream", 'attachment; filename="a.bin"'),
    "page spelled": (
        " TEXT/HTML ; charset=utf-8",
        "a.bin",
        "application/octet-stream",
        'attachment; filename="a.bin"',
    ),
    "svg": ("image/svg+xml", "a.svg", "application/octet-stream", 'attachment; filename="a.svg"'),
    "xml": ("text/xml", "a.xml", "application/octet-stream", 'attachment; filename="a.xml"'),
    "xsl": ("text/xsl", "a.bin", "application/octet-stream", 'attachment; filename="a.bin"'),
    "xhtml": (
        "application/xhtml+xml",
        "a.bin",
        "application/octet-stream",
        'attachment; filename="a.bin"',
    ),
    "no type, named .html": (
        None,
        "x.html",
        "application/octet-stream",
        'attachment; filename="x.html"',
    ),
    "no type, no name": (None, None, "application/octet-stream", "attachment"),
    "a header in the type": (
        "text/html\r\nX-Injected: yes",
        "a.bin",
        "application/octet-stream",
        'attachment; filename="a.bin"',
    ),
    "pdf": ("application/pdf", "r.pdf", "application/pdf", 'attachment; filename="r.pdf"'),
    "text": ("text/plain", "a.txt", "text/plain; charset=utf-8", 'inline; filename="a.txt"'),
    "png": ("image/png", "a.png", "image/png", 'inline; filename="a.png"'),
    "audio": ("audio/mpeg", "a.mp3", "audio/mpeg", 'inline; filename="a.mp3"'),
    "video": ("video/mp4", "a.mp4", "video/mp4", 'inline; filename="a.mp4"'),
    "no type, named .png": (None, "b.png", "image/png", 'inline; filename="b.png"'),
}


async def test_an_s3_presigned_link_shows_inline_only_what_is_safe_without_nosniff(
    asyncassets_db: Any, asyncassets_s3_bucket: Any
) -> None:
    # S3 sends the type and disposition a link signs, and nothing else of ours:
    # the stored type and "inline" made HTML, SVG and XML uploads run at the
    # bucket's origin (tests/test_web_browser_presigned.py shows it in Chromium).
    storage = S3Storage(**asyncassets_s3_bucket.options, prefix="p/", collection_name="s3policy")
    doc_cls = doc_class(storage)
    async with httpx.AsyncClient() as client:
        for case, (stored, name, content_type, disposition) in PRESIGNED.items():
            doc = doc_cls(name=case)
            await doc.file.put(b"<script>alert(1)</script>", content_type=stored, filename=name)
            await doc.save()
            if stored is None:  # no type recorded, as other tools leave files
                await asyncassets_db["s3policy.files"].update_one(
                    {"_id": doc.file.file_id}, {"$unset": {"metadata.content_type": ""}}
                )
                doc = await doc_cls.objects.get(pk=doc.pk)
            url = await doc.file.url(expires=300)
            assert url is not None
            query = parse_qs(urlsplit(url).query)
            assert query["response-content-type"] == [content_type], case
            assert query["response-content-disposition"] == [disposition], case
            r = await client.get(url)
            assert r.status_code == 200, case
            assert r.headers["content-type"] == content_type, case
            assert r.headers["content-disposition"] == disposition, case
            assert "x-injected" not in r.headers
            # Asked as a download, everything is an attachment, under the same type.
            download = await doc.file.url(expires=300, download=True)
            assert download is not None
            query = parse_qs(urlsplit(download).query)
            assert query["response-content-type"] == [content_type], case
            assert query["response-content-disposition"][0].startswith("attachment"), case


async def test_an_s3_storage_with_a_public_url_gives_that_url(
    asyncassets_db: Any, asyncassets_s3_bucket: Any
) -> None:
    storage = S3Storage(
        **asyncassets_s3_bucket.options,
        prefix="pub lic/",
        collection_name="s3p",
        public_url="https://cdn.example.com/",
    )
    doc = doc_class(storage)(name="pub")
    await doc.file.put(DATA, filename="a b.txt")
    await doc.save()
    url = await doc.file.url()
    entry = await asyncassets_db["s3p.files"].find_one()
    key = entry["location"]["key"]
    assert url == "https://cdn.example.com/pub%20lic/" + key.replace(" ", "%20")
    with pytest.raises(ValueError, match="public_url"):
        S3Storage(**asyncassets_s3_bucket.options, public_url="cdn.example.com")
