"""What the web tests share: Chromium, an app served by uvicorn, visits.

Debian's ``chromium`` (``/usr/bin/chromium``) driven by Playwright, headless and
without its sandbox (the tests run as root). Without it (or Playwright) the
tests skip, except in CI (``CI=true``), where they fail: ``.ci/run`` installs it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest

CHROMIUM = "/usr/bin/chromium"
IN_CI = os.environ.get("CI", "").lower() == "true"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
]


def require_browser(tests: str) -> None:
    """Skip the calling module (fail it in CI) when Chromium, uvicorn or
    Playwright is missing; call it at the module's top level."""

    def require(found: bool, what: str) -> None:
        if found:
            return
        if IN_CI:
            pytest.fail(f"{tests} need {what} in CI", pytrace=False)
        pytest.skip(f"{what} is missing", allow_module_level=True)

    require(os.path.exists(CHROMIUM), f"{CHROMIUM} (apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:  # pragma: no cover - the test extra installs both
        require(False, "uvicorn and playwright (pip install -e '.[test]')")


@contextlib.contextmanager
def chromium(args: list[str] = CHROMIUM_ARGS) -> Iterator[Any]:
    """A launched headless Chromium, closed at the end."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=args)
        try:
            yield browser
        finally:
            browser.close()


@contextlib.contextmanager
def served(app: Any, uri: str | None = None) -> Iterator[str]:
    """``app`` served by uvicorn (a thread, lifespan on) on a free loopback port:
    its base URL. At the end the server stops and the database of ``uri``, when
    given, is dropped."""
    import pymongo
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
        if uri is not None:
            with pymongo.MongoClient(uri) as client:
                client.drop_database(client.get_default_database().name)


def visit(browser: Any, url: str, shows: str) -> Any:
    """Open ``url`` at top level: the page's ``shows`` (a JavaScript expression),
    or ``None`` when the navigation became a download (an attachment)."""
    from playwright.sync_api import Error as PlaywrightError

    context = browser.new_context(accept_downloads=True)
    try:
        page = context.new_page()
        try:
            page.goto(url, wait_until="load", timeout=10_000)
        except PlaywrightError as exc:
            assert "Download is starting" in str(exc) or "ERR_ABORTED" in str(exc), exc
            page.wait_for_timeout(300)
            return None
        page.wait_for_timeout(300)  # time for a script, had one run, to send its fetch
        return page.evaluate(shows)
    finally:
        context.close()


def framed(browser: Any, site_url: str, urls: list[str], wait_ms: int) -> None:
    """Open the site's ``/frames`` page, which embeds every URL in an ``<iframe>``,
    and give their scripts ``wait_ms`` to run."""
    context = browser.new_context(accept_downloads=True)
    try:
        page = context.new_page()
        query = urllib.parse.urlencode({"urls": json.dumps(urls)})
        page.goto(f"{site_url}/frames?{query}", wait_until="load", timeout=20_000)
        page.wait_for_timeout(wait_ms)
    finally:
        context.close()
