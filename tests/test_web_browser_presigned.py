"""Hostile uploads on S3, opened through presigned links in a real browser.

An S3 presigned link (``proxy.url()`` on an :class:`~asyncassets.storage.S3Storage`)
is served by S3 itself: it sends the ``Content-Type`` and ``Content-Disposition``
the link signs and no other header of ours, so neither ``nosniff`` nor
``sandbox``. Links that signed the stored type and ``inline`` made HTML, SVG and
XML uploads run their script at the bucket's origin. The content policy now
decides what a link signs: inline only raster images, audio, video and
``text/plain``, which Chromium shows as what they are even without ``nosniff``;
everything else is an attachment.

The plugin's S3 server (moto) plays the bucket on ``127.0.0.1``; a small site,
served by uvicorn, uploads the corpus and records the requests a script makes
to ``/pwned/<case>``. Debian's ``chromium`` (headless, Playwright) opens every
link at top level and framed by a page of the site. Control links sign the
stored type and ``inline`` (what links did before): the scripts of the HTML,
SVG and XML cases run there, which shows the corpus attacks this browser and
the detector sees it. The ``text/plain`` cases hold HTML, SVG and XHTML: shown
as text, never run, without ``nosniff``.

Without ``/usr/bin/chromium`` (or Playwright) these tests skip, except in CI
(``CI=true``), where they fail: ``.ci/run`` installs chromium.
"""

from __future__ import annotations

import contextlib
import io
import json
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from _browser import chromium, require_browser, served
from _browser import framed as shared_framed
from _browser import visit as shared_visit

require_browser("the presigned-link browser tests")


def script(site: str, case: str) -> str:
    origin = "encodeURIComponent(location.origin)"
    return f"fetch('{site}/pwned/{case}?from=' + {origin}, {{mode: 'no-cors'}})"


def html(site: str, case: str) -> bytes:
    return (
        f"<!doctype html><p>page</p><script>{script(site, case)}</script>"
        f"<img src=x onerror=\"{script(site, case)}\">"
    ).encode()


def xhtml(site: str, case: str) -> bytes:
    return (
        '<?xml version="1.0"?><html xmlns="http://www.w3.org/1999/xhtml"><body>'
        f"<p>xhtml</p><script>{script(site, case)}</script></body></html>"
    ).encode()


def svg(site: str, case: str) -> bytes:
    run = script(site, case)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10" onload="{run}">'
        f'<script>{run}</script><rect width="10" height="10"/></svg>'
    ).encode()


def binary_then_html(site: str, case: str) -> bytes:
    return b"\x00\x01\x02\x03" + html(site, case)


def png(site: str, case: str) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (32, 24), (10, 120, 200)).save(out, "PNG")
    return out.getvalue()


#: case -> (stored Content-Type, stored name, bytes maker).
CORPUS: dict[str, tuple[str | None, str, Any]] = {
    "html": ("text/html", "page.html", html),
    "html_spelled": (" TEXT/HTML ;charset=utf-8", "page", html),
    "svg": ("image/svg+xml", "picture.svg", svg),
    "xml": ("text/xml", "feed.xml", xhtml),
    "xsl": ("text/xsl", "feed", xhtml),
    "xhtml": ("application/xhtml+xml", "page", xhtml),
    "unknown_type": ("application/x-made-up", "thing", html),
    "no_type_html_name": (None, "page.html", html),
    "text_holding_html": ("text/plain", "notes.txt", html),
    "text_holding_svg": ("text/plain", "notes.txt", svg),
    "text_holding_xhtml": ("text/plain", "notes.txt", xhtml),
    "text_binary_then_html": ("text/plain", "notes.txt", binary_then_html),
    "png_holding_html": ("image/png", "photo.png", html),
    "png_holding_svg": ("image/png", "photo.png", svg),
    "audio_holding_html": ("audio/mpeg", "song.mp3", html),
    "video_holding_svg": ("video/mp4", "clip.mp4", svg),
    "real_png": ("image/png", "real.png", png),
}
#: The cases whose script runs when a link signs the stored type and "inline".
RUN_WHEN_INLINE = {"html", "svg", "xml", "xsl", "xhtml"}
#: The cases a presigned link shows inline: passive types, whatever their bytes.
SHOWN_INLINE = {
    "text_holding_html",
    "text_holding_svg",
    "text_holding_xhtml",
    "png_holding_html",
    "png_holding_svg",
    "audio_holding_html",
    "video_holding_svg",
    "real_png",
}


# -- the site ---------------------------------------------------------------------------


def make_app(uri: str, bucket: Any) -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse, Response
    from starlette.routing import Route

    import asyncassets
    from asyncassets import Document
    from asyncassets.fields import FileField
    from asyncassets.storage import S3Storage
    from asyncassets.storage.objects.store import location_key

    storage = S3Storage(**bucket.options, prefix="uploads/", collection_name="presigned_files")

    class Upload(Document):
        file = FileField(storage=storage)
        meta = {"collection": "presigned_uploads"}

    hits: list[str] = []

    async def put(request: Request) -> Response:
        stored = request.query_params.get("type")
        doc = Upload()
        await doc.file.put(
            await request.body(), content_type=stored, filename=request.query_params["name"]
        )
        await doc.save()
        files = asyncassets.get_db()["presigned_files.files"]
        if stored is None:  # no type recorded, as other tools leave files
            await files.update_one(
                {"_id": doc.file.file_id}, {"$unset": {"metadata.content_type": ""}}
            )
            doc = await Upload.objects.get(pk=doc.pk)
        link = await doc.file.url(expires=3600)
        # The control: the stored type and "inline", as links were signed before.
        entry = await files.find_one({"_id": doc.file.file_id})
        key = location_key(entry)
        assert key is not None
        control = await storage.blobs().presigned_get(  # type: ignore[attr-defined]
            key, expires=3600, content_type=stored, content_disposition="inline"
        )
        return JSONResponse({"link": link, "control": control})

    async def pwned(request: Request) -> Response:
        hits.append(request.path_params["case"])
        return Response(status_code=204)

    async def frames(request: Request) -> Response:
        sources = json.loads(request.query_params["urls"])
        body = "".join(
            f'<iframe src="{urllib.parse.quote(src, safe=":/?&=%")}" width="80" height="60">'
            "</iframe>"
            for src in sources
        )
        return HTMLResponse(f"<!doctype html><title>frames</title>{body}")

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        asyncassets.connect(uri)
        yield
        await asyncassets.disconnect()

    app = Starlette(
        routes=[
            Route("/put", put, methods=["POST"]),
            Route("/pwned/{case}", pwned),
            Route("/frames", frames),
        ],
        lifespan=lifespan,
    )
    app.state.hits = hits
    return app


class Site:
    def __init__(self, url: str, app: Any) -> None:
        self.url = url
        self.hits: list[str] = app.state.hits
        self.links: dict[str, dict[str, str]] = {}

    def put(self, case: str) -> None:
        content_type, name, make = CORPUS[case]
        query = {"name": name, **({"type": content_type} if content_type is not None else {})}
        request = urllib.request.Request(
            f"{self.url}/put?{urllib.parse.urlencode(query)}",
            data=make(self.url, case),
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            self.links[case] = json.loads(response.read())


@pytest.fixture
def site(asyncassets_server_uri: str, asyncassets_s3_bucket: Any) -> Iterator[Site]:
    from asyncassets.testing import database_uri, unique_db_name

    uri = database_uri(asyncassets_server_uri, unique_db_name("presigned"))
    app = make_app(uri, asyncassets_s3_bucket)
    with served(app, uri) as url:
        found = Site(url, app)
        for case in CORPUS:
            found.put(case)
        yield found


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as launched:
        yield launched


def visit(browser: Any, url: str) -> Any:
    """Open ``url`` at top level; what the page shows (``None`` for a download)."""
    return shared_visit(
        browser,
        url,
        "(() => ({type: document.contentType,"
        " text: document.body ? document.body.innerText : null,"
        " images: [...document.images].map(i => i.naturalWidth)}))()",
    )


def framed(browser: Any, site: Site, urls: list[str]) -> None:
    """Open a page of the site that embeds every URL in an ``<iframe>``."""
    shared_framed(browser, site.url, urls, 1000)


# -- the tests ---------------------------------------------------------------------------


def test_scripts_run_at_the_buckets_origin_when_a_link_signs_the_stored_type(
    browser: Any, site: Site
) -> None:
    before = len(site.hits)
    for case in sorted(RUN_WHEN_INLINE):
        visit(browser, site.links[case]["control"])
    assert set(site.hits[before:]) == RUN_WHEN_INLINE


def test_no_uploaded_script_runs_through_a_presigned_link(browser: Any, site: Site) -> None:
    before = len(site.hits)
    shown = {case: visit(browser, links["link"]) for case, links in site.links.items()}
    framed(browser, site, [links["link"] for links in site.links.values()])
    assert site.hits[before:] == [], f"scripts ran: {site.hits[before:]}"
    # Passive types are shown as what they are; everything else is downloaded.
    for case, what in shown.items():
        if case in SHOWN_INLINE:
            assert what is not None, f"{case} was not shown"
        elif case != "text_binary_then_html":  # Chromium's own call: text or a download
            assert what is None, f"{case} was not downloaded: {what}"
    assert shown["real_png"]["images"] == [32]
    for case in ("text_holding_html", "text_holding_svg", "text_holding_xhtml"):
        # Without nosniff, text/plain is still text: the markup is shown, not run.
        assert shown[case]["type"] == "text/plain", shown[case]
        assert "<script>" in shown[case]["text"], shown[case]
