"""A sandboxed page stays sandboxed when Chromium revalidates it (a reload: 304).

A browser that revalidates a cached response updates the cached headers from
the ``304``; Chromium replaces every cached ``Content-Security-Policy`` with the
ones the ``304`` carries. So a ``304`` that carries a CSP (one the caller gave
with ``headers=``, or one a site-wide middleware adds to every answer) but not
``sandbox`` turned a sandboxed page into a page of the site on reload, and its
script ran with the site's origin.

uvicorn serves uploaded HTML through :class:`~asyncassets.web.FileResponse`
under ``sandbox`` (inline by a policy that shows HTML, or retyped by the
caller's headers), on ``127.0.0.1``; Debian's ``chromium`` (headless, driven by
Playwright) opens each page and reloads it. The page's script, if it ever runs,
fetches ``/pwned/<case>`` from the site, which records it. A control page
serves the same bytes without ``sandbox``: its script runs, which shows the
detector works in this Chromium.

Without ``/usr/bin/chromium`` (or Playwright) these tests skip, except in CI
(``CI=true``), where they fail: ``.ci/run`` installs chromium.
"""

from __future__ import annotations

import contextlib
import urllib.request
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from _browser import chromium, require_browser, served

require_browser("the browser revalidation tests")


def page_bytes(case: str) -> bytes:
    return (
        f"<!doctype html><title>{case}</title><p>uploaded page</p>"
        f"<script>fetch('/pwned/{case}?cookie=' + encodeURIComponent(document.cookie))"
        "</script>"
    ).encode()


#: How each case's page is served. Every one is sandboxed on its 200.
CASES: dict[str, dict[str, Any]] = {
    # A policy the docs allow (HTML inline, always sandboxed) and a CSP of the caller's.
    "caller_csp": {"inline_html": True, "headers": {"Content-Security-Policy": "img-src 'self'"}},
    # The same policy, and a site-wide middleware adding a CSP to every answer.
    "middleware_csp": {"inline_html": True, "headers": None},
    # The default policy, the caller retyping the file as an inline page with a CSP.
    "caller_retyped": {
        "inline_html": False,
        "headers": {
            "Content-Type": "text/html; charset=utf-8",
            "Content-Disposition": "inline",
            "Content-Security-Policy": "img-src 'self'",
        },
    },
}


def make_app(uri: str) -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, PlainTextResponse, Response
    from starlette.routing import Route

    import asyncassets
    from asyncassets import Document
    from asyncassets.fields import FileField
    from asyncassets.web import INLINE_TYPES, ContentPolicy, FileResponse

    class Page(Document):
        file = FileField(collection_name="revalidated_pages")
        meta = {"collection": "revalidated_pages"}

    html_inline = ContentPolicy(inline={*INLINE_TYPES, "text/html"})
    hits: list[str] = []

    async def put(request: Request) -> Response:
        doc = Page()
        await doc.file.put(
            page_bytes(request.path_params["case"]), content_type="text/html", filename="page.html"
        )
        await doc.save()
        # A session cookie the page's script would read, had it the site's origin.
        return PlainTextResponse(str(doc.pk), headers={"set-cookie": "session=SECRET; Path=/"})

    async def serve(request: Request) -> Response:
        case = CASES[request.path_params["case"]]
        doc = await Page.objects.get(pk=request.path_params["pk"])
        if case["inline_html"]:
            return FileResponse(doc.file, request, policy=html_inline, headers=case["headers"])
        return FileResponse(doc.file, request, headers=case["headers"])

    async def unprotected(request: Request) -> Response:
        return HTMLResponse(page_bytes("unprotected"))

    async def pwned(request: Request) -> Response:
        hits.append(request.path_params["case"])
        return Response(status_code=204)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        asyncassets.connect(uri)
        yield
        await asyncassets.disconnect()

    inner = Starlette(
        routes=[
            Route("/put/{case}", put, methods=["POST"]),
            Route("/page/{case}/{pk}", serve, methods=["GET", "HEAD"]),
            Route("/mw/page/{case}/{pk}", serve, methods=["GET", "HEAD"]),
            Route("/unprotected", unprotected),
            Route("/pwned/{case}", pwned),
        ],
        lifespan=lifespan,
    )

    answered: list[tuple[str, int]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await inner(scope, receive, send)
            return

        # Records what the server answered (the browser reports a revalidated
        # response with the cached one's status); on the /mw/ pages, adds a CSP
        # as a site's security-headers middleware does.
        async def watched(message: Any) -> None:
            if message["type"] == "http.response.start":
                answered.append((scope["path"], message["status"]))
                if scope["path"].startswith("/mw/"):
                    extra = (b"content-security-policy", b"frame-ancestors 'self'")
                    message = {**message, "headers": [*message["headers"], extra]}
            await send(message)

        await inner(scope, receive, watched)

    app.hits = hits  # type: ignore[attr-defined]
    app.answered = answered  # type: ignore[attr-defined]
    return app


class Site:
    def __init__(self, url: str, app: Any) -> None:
        self.url = url
        self.hits: list[str] = app.hits
        self.answered: list[tuple[str, int]] = app.answered

    def statuses(self, path: str) -> list[int]:
        return [status for answered, status in self.answered if answered == path]

    def put(self, case: str) -> str:
        request = urllib.request.Request(f"{self.url}/put/{case}", data=b"", method="POST")
        with urllib.request.urlopen(request, timeout=30) as response:
            return str(response.read().decode())


@pytest.fixture(scope="module")
def site(asyncassets_server_uri: str) -> Iterator[Site]:
    from asyncassets.testing import database_uri, unique_db_name

    uri = database_uri(asyncassets_server_uri, unique_db_name("revalidation"))
    app = make_app(uri)
    with served(app, uri) as url:
        yield Site(url, app)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as launched:
        yield launched


def test_the_control_page_runs_its_script(browser: Any, site: Site) -> None:
    before = len(site.hits)
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(f"{site.url}/unprotected", wait_until="load")
        page.wait_for_timeout(500)
    finally:
        context.close()
    assert site.hits[before:] == ["unprotected"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_sandboxed_page_stays_sandboxed_after_a_reload(
    browser: Any, site: Site, case: str
) -> None:
    pk = site.put(case)
    path = f"{'/mw' if case == 'middleware_csp' else ''}/page/{case}/{pk}"
    url = site.url + path
    before = len(site.hits)
    origins: list[str] = []
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(url, wait_until="load")
        page.wait_for_timeout(500)
        origins.append(page.evaluate("self.origin"))
        page.reload(wait_until="load")  # the cached page is revalidated: 304
        page.wait_for_timeout(500)
        origins.append(page.evaluate("self.origin"))
        shown = page.evaluate("document.body.innerText")
    finally:
        context.close()
    assert site.hits[before:] == [], f"the page's script ran: {site.hits[before:]}"
    # A sandboxed document has an opaque origin: it cannot act as the site.
    assert origins == ["null", "null"], origins
    assert "uploaded page" in shown  # shown inline, both times
    assert site.statuses(path) == [200, 304]  # the reload was a revalidation
