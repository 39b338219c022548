"""FastAPI for real: the docs' example app (examples/fastapi_app.py) under uvicorn.

uvicorn serves ``create_app()`` on a free ``127.0.0.1`` port, in a thread of
this process, against a database of its own on the session's server; httpx
talks to it over the socket: an ``UploadFile`` streamed into a ``FileField``,
the file downloaded with ``FileResponse`` on ``GET`` (whole, ranged,
revalidated) and ``HEAD``, and through the signed link of the mounted
``files_app``. docs/serving.rst includes that very file. The same app in-process, its
lifespan run by :func:`asyncassets.web.run_lifespan`, is in
tests/test_web_lifespan.py.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from _browser import served as serve

from asyncassets.files import urls

fastapi = pytest.importorskip("fastapi")  # in the test extra
uvicorn = pytest.importorskip("uvicorn")

ROOT = Path(__file__).resolve().parents[1]
SECRET = "fastapi-test secret, long enough to sign"
PDF = b"%PDF-1.4 a report " + os.urandom(300_000)


def example() -> Any:
    """examples/fastapi_app.py, loaded once (its Document class is declared once)."""
    if "fastapi_app" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "fastapi_app", ROOT / "examples" / "fastapi_app.py"
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["fastapi_app"] = module
        spec.loader.exec_module(module)
    return sys.modules["fastapi_app"]


def database_uri(server_uri: str, hint: str) -> str:
    from asyncassets.testing import database_uri, unique_db_name

    return database_uri(server_uri, unique_db_name(hint))


def drop(uri: str) -> None:
    import pymongo

    with pymongo.MongoClient(uri) as client:
        client.drop_database(client.get_default_database().name)


@pytest.fixture(scope="module")
def database(asyncassets_server_uri: str) -> Iterator[str]:
    """The URI of the app's database, dropped at the end."""
    uri = database_uri(asyncassets_server_uri, "fastapi")
    try:
        yield uri
    finally:
        drop(uri)


@pytest.fixture(scope="module")
def served(database: str) -> Iterator[str]:
    uri = database
    app = example().create_app(uri, secret=SECRET)
    try:
        with serve(app) as url:
            yield url
    finally:
        urls._config = None


def upload(client: httpx.Client, name: str, data: bytes, content_type: str) -> dict[str, Any]:
    r = client.post(
        "/reports", files={"file": (name, data, content_type)}, data={"title": "Q3"}
    )
    assert r.status_code == 201, r.text
    found: dict[str, Any] = r.json()
    return found


def test_an_upload_file_is_stored_and_downloaded_with_get_and_head(served: str) -> None:
    with httpx.Client(base_url=served) as client:
        report = upload(client, "Q3 report.pdf", PDF, "application/pdf")
        url = f"/reports/{report['id']}/file"
        r = client.get(url)
        assert r.status_code == 200
        assert r.content == PDF
        assert r.headers["etag"] == f'"{hashlib.sha256(PDF).hexdigest()}"'
        assert r.headers["content-type"] == "application/pdf"
        assert r.headers["content-disposition"] == 'attachment; filename="Q3 report.pdf"'
        assert r.headers["x-content-type-options"] == "nosniff"
        head = client.head(url)
        assert head.status_code == 200
        assert head.content == b""
        for name in ("content-length", "etag", "content-type", "accept-ranges"):
            assert head.headers[name] == r.headers[name]
        ranged = client.get(url, headers={"range": "bytes=100-199"})
        assert (ranged.status_code, ranged.content) == (206, PDF[100:200])
        again = client.get(url, headers={"if-none-match": r.headers["etag"]})
        assert again.status_code == 304
        assert client.get("/reports/000000000000000000000000/file").status_code == 404
        assert client.head("/reports/not-an-id/file").status_code == 404


def test_the_signed_link_of_an_upload_is_served_by_the_mounted_files_app(served: str) -> None:
    with httpx.Client(base_url=served) as client:
        report = upload(client, "photo.png", b"\x89PNG\r\n\x1a\n not really", "image/png")
        r = client.get(report["link"])
        assert r.status_code == 200
        assert r.headers["content-disposition"] == 'inline; filename="photo.png"'
        assert r.headers["content-type"] == "image/png"
        assert r.headers["content-security-policy"] == "sandbox"
        assert client.head(report["link"]).status_code == 200
        tampered = report["link"][:-2] + ("AA" if not report["link"].endswith("AA") else "BA")
        assert client.get(tampered).status_code == 403


def test_an_uploaded_page_is_never_served_as_one(served: str) -> None:
    with httpx.Client(base_url=served) as client:
        report = upload(client, "x.html", b"<script>alert(1)</script>", "text/html")
        for url in (f"/reports/{report['id']}/file", report["link"]):
            r = client.get(url)
            assert r.headers["content-disposition"].startswith("attachment")
            assert r.headers["content-type"] == "application/octet-stream"
            assert r.headers["content-security-policy"] == "sandbox"


def stored_files(uri: str) -> int:
    import pymongo

    with pymongo.MongoClient(uri) as client:
        return int(client.get_default_database()["reports.files"].count_documents({}))


def test_a_refused_form_is_a_4xx_and_stores_nothing(served: str, database: str) -> None:
    # A title over the model's 200 characters failed at save(), after the file
    # was stored (an orphan), and a file part named "" failed in put(): both 500.
    nameless = (
        b'--B\r\nContent-Disposition: form-data; name="title"\r\n\r\nq3\r\n'
        b'--B\r\nContent-Disposition: form-data; name="file"; filename=""\r\n'
        b"Content-Type: text/plain\r\n\r\nsome bytes\r\n--B--\r\n"
    )
    with httpx.Client(base_url=served) as client:
        before = stored_files(database)
        r = client.post(
            "/reports", data={"title": "T" * 201}, files={"file": ("a.txt", b"hello", "text/plain")}
        )
        assert r.status_code == 422, r.text
        assert "title" in r.json()["detail"]
        form = {"content-type": "multipart/form-data; boundary=B"}
        r = client.post("/reports", content=nameless, headers=form)
        assert r.status_code == 422, r.text
        assert "file" in r.json()["detail"]
        assert stored_files(database) == before  # nothing was stored for them
        # The connection and the app are fine: the next form is taken.
        assert upload(client, "a.txt", b"hello", "text/plain")["id"]
        assert stored_files(database) == before + 1


def test_the_docs_show_this_example() -> None:
    serving = (ROOT / "docs" / "serving.rst").read_text()
    assert ".. literalinclude:: ../examples/fastapi_app.py" in serving
