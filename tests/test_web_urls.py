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
import subprocess
import sys
import time
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
from asyncassets.files.urls import SignedFile, configure_urls, expiry_for, read_token, sign_token
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
        assert r.headers["content-type"] == "text/plain"
        disposition = r.headers["content-disposition"]
        assert disposition.startswith('attachment; filename="Unicode notes.txt"')
        ranged = await client.get(url, headers={"range": "bytes=0-5"})
        assert (ranged.status_code, ranged.content) == (206, DATA[:6])
        # (moto does not check signatures, so tampering is S3's to refuse, not tested here.)
    with pytest.raises(ValueError, match="7 days"):
        await doc.file.url(expires=dt.timedelta(days=8))


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
