"""The example app (examples/web_app.py) in a real browser, served by a real server.

uvicorn serves the app on a free ``127.0.0.1`` port, in a thread of this process,
against the session's database server; Debian's ``chromium`` (headless), driven
by Playwright, uses it as a person would. An ASGI middleware records what the
server saw (method, path, Range, If-None-Match, status), which is what the
caching and seeking checks are about.

Without ``/usr/bin/chromium`` these tests skip, except in CI (``CI=true``), where
they fail: ``.ci/run`` installs it. Set ``ASYNCASSETS_SCREENSHOTS=docs/_static``
to refresh the screenshots of the docs' Serving page.

The seek test plays a WAV file in an ``<audio>`` element (made here with the
``wave`` module: no video encoder is needed, and Chromium fetches and seeks
audio through the same Range requests as video).
"""

from __future__ import annotations

import importlib.util
import io
import math
import os
import struct
import sys
import time
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _browser import CHROMIUM, chromium, served

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--autoplay-policy=no-user-gesture-required",
]
ROOT = Path(__file__).resolve().parents[1]
SECRET = "browser-test secret, long enough to sign with"

if not os.path.exists(CHROMIUM):
    reason = f"{CHROMIUM} is missing (apt-get install chromium; .ci/run installs it)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"browser tests need Chromium in CI: {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)

uvicorn = pytest.importorskip("uvicorn")
sync_api = pytest.importorskip("playwright.sync_api")


def load_example() -> Any:
    spec = importlib.util.spec_from_file_location("web_app", ROOT / "examples" / "web_app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["web_app"] = module
    spec.loader.exec_module(module)
    return module


class Recorder:
    """ASGI middleware: what the server was asked and what it answered."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.seen: list[dict[str, Any]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        entry = {
            "method": scope["method"],
            "path": scope["path"],
            "range": headers.get("range"),
            "if_none_match": headers.get("if-none-match"),
            "status": None,
        }
        self.seen.append(entry)

        async def recording_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                entry["status"] = message["status"]
            await send(message)

        await self.app(scope, receive, recording_send)

    def requests(self, path_part: str) -> list[dict[str, Any]]:
        return [e for e in self.seen if path_part in e["path"]]


class Site:
    def __init__(self, url: str, recorder: Recorder, module: Any) -> None:
        self.url = url
        self.recorder = recorder
        self.module = module


@pytest.fixture(scope="module")
def site(asyncassets_server_uri: str) -> Iterator[Site]:
    from asyncassets.testing import database_uri, unique_db_name

    module = load_example()
    uri = database_uri(asyncassets_server_uri, unique_db_name("browser"))
    recorder = Recorder(module.create_app(uri, secret=SECRET))
    with served(recorder, uri) as url:
        yield Site(url, recorder, module)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium(CHROMIUM_ARGS) as launched:
        yield launched


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 900, "height": 640}, accept_downloads=True)
    try:
        yield context.new_page()
    finally:
        context.close()


def screenshot(page: Any, name: str, tmp_path: Path) -> None:
    folder = os.environ.get("ASYNCASSETS_SCREENSHOTS")
    target = (ROOT / folder if folder else tmp_path) / f"serving-{name}.png"
    page.screenshot(path=str(target))


def png(width: int = 640, height: int = 480) -> bytes:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), (40, 90, 140))
    draw = ImageDraw.Draw(image)
    for i in range(0, width, 40):
        draw.line([(i, 0), (width - i, height)], fill=(230, 180, 60), width=6)
    draw.ellipse([width // 3, height // 3, 2 * width // 3, 2 * height // 3], fill=(200, 60, 60))
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def wav(seconds: int = 40, rate: int = 44100) -> bytes:
    """A tone in 16-bit mono PCM: ``seconds`` long, ~88 KB a second."""
    period = [int(8000 * math.sin(2 * math.pi * i / 100)) for i in range(100)]  # 441 Hz
    one = struct.pack("<100h", *period)
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(one * (seconds * rate // 100))
    return out.getvalue()


def upload(page: Any, site: Site, kind: str, title: str, name: str, data: bytes, mime: str) -> Any:
    page.goto(f"{site.url}/upload")
    form = page.locator(f"#{kind}-form")
    form.locator("input[name=title]").fill(title)
    form.locator("input[type=file]").set_input_files(
        {"name": name, "mimeType": mime, "buffer": data}
    )
    with page.expect_navigation():
        form.locator("button").click()
    return page


# -- the tests ------------------------------------------------------------------------


def test_the_upload_form_shows_validation_errors(page: Any, site: Site, tmp_path: Path) -> None:
    # Every error at once: no title, and a file that is no image.
    upload(page, site, "photo", "", "notes.txt", b"not an image", "text/plain")
    assert page.locator("#photo_title-error").inner_text() == "Give it a title."
    assert "not an image" in page.locator("#photo_file-error").inner_text()
    # A good file sent back for its title is named, to be chosen again.
    upload(page, site, "photo", "", "alps.png", png(), "image/png")
    assert page.locator("#photo_title-error").inner_text() == "Give it a title."
    assert page.locator("#photo_file-error").inner_text() == (
        "alps.png is fine: choose it again with the title."
    )
    upload(page, site, "photo", "Not a photo", "notes.txt", b"not an image", "text/plain")
    assert "not an image" in page.locator("#photo_file-error").inner_text()
    assert page.locator("#photo-form input[name=title]").input_value() == "Not a photo"
    screenshot(page, "upload", tmp_path)


def test_a_photo_renders_and_the_gallery_revalidates_with_304(
    page: Any, site: Site, tmp_path: Path
) -> None:
    upload(page, site, "photo", "Marmot at dusk", "marmot.png", png(), "image/png")
    assert "/photos/" in page.url
    image = page.locator("main img")
    image.wait_for()
    page.wait_for_function("document.querySelector('main img').complete")
    assert page.evaluate("document.querySelector('main img').naturalWidth") == 640
    upload(page, site, "photo", "Second marmot", "second.png", png(800, 500), "image/png")

    before = len(site.recorder.seen)
    page.goto(f"{site.url}/")
    page.wait_for_function("[...document.images].every(i => i.complete)")
    widths = page.evaluate("[...document.images].map(i => i.naturalWidth)")
    assert len(widths) >= 2 and all(w == 240 for w in widths), widths
    first_view = [e for e in site.recorder.seen[before:] if e["path"].endswith("/thumbnail")]
    assert first_view and all(e["status"] in (200, 304) for e in first_view)
    screenshot(page, "gallery", tmp_path)

    before = len(site.recorder.seen)
    page.goto(f"{site.url}/")  # a second page view
    page.wait_for_function("[...document.images].every(i => i.complete && i.naturalWidth > 0)")
    second_view = [e for e in site.recorder.seen[before:] if e["path"].endswith("/thumbnail")]
    assert second_view, "the browser did not ask again (Cache-Control: no-cache)"
    assert all(e["if_none_match"] for e in second_view), second_view
    assert all(e["status"] == 304 for e in second_view), second_view


def test_audio_seeks_to_the_middle_and_plays(page: Any, site: Site, tmp_path: Path) -> None:
    sound = wav()
    upload(page, site, "clip", "A long tone", "tone.wav", sound, "audio/wav")
    assert "/clips/" in page.url
    media_path = page.url.removeprefix(site.url) + "/media"
    player = page.locator("#player")
    player.wait_for()
    state = page.evaluate(
        """async () => {
            const a = document.getElementById('player');
            a.muted = true;
            const once = (name) => new Promise(r => a.addEventListener(name, r, {once: true}));
            if (a.readyState < 1) await once('loadedmetadata');
            const middle = a.duration / 2;
            a.currentTime = middle;
            await once('seeked');
            await a.play();
            const start = performance.now();
            while (a.currentTime < middle + 0.5 && performance.now() - start < 15000) {
                await new Promise(r => setTimeout(r, 50));
            }
            const error = a.error && a.error.code;
            return {duration: a.duration, middle, now: a.currentTime, error};
        }"""
    )
    assert state["error"] is None
    assert abs(state["duration"] - 40) < 0.1
    assert state["now"] >= state["middle"] + 0.5, state
    asked = site.recorder.requests(media_path)
    ranged = [e for e in asked if e["range"]]
    assert ranged, asked
    assert all(e["status"] in (206, 304) for e in ranged if e["method"] == "GET"), ranged
    # A middle the browser had not loaded yet is fetched from there: only those bytes.
    starts = [int(e["range"].split("=")[1].split("-")[0] or 0) for e in ranged]
    print(f"ranges asked for the {len(sound)}-byte clip: {[e['range'] for e in ranged]}")
    assert max(starts) >= len(sound) // 4 or len(ranged) == 1
    page.evaluate("document.getElementById('player').pause()")
    screenshot(page, "player", tmp_path)


def test_a_signed_download_works_and_an_expired_one_is_refused(
    page: Any, site: Site, tmp_path: Path
) -> None:
    from asyncassets.files.urls import SignedFile, read_token, sign_token

    image = png(320, 200)
    upload(page, site, "photo", "To download", "download me.png", image, "image/png")
    link = page.locator("#download")
    href = link.get_attribute("href")
    assert href and href.startswith("/files/")
    screenshot(page, "photo", tmp_path)
    with page.expect_download() as info:
        link.click()
    download = info.value
    assert download.suggested_filename == "download me.png"
    assert Path(download.path()).read_bytes() == image

    # The same link an hour and a half later: the claims again, expired, and
    # signed with the app's key (so only the expiry makes it fail).
    token = href.rsplit("/", 1)[1]
    claims = read_token(token, [SECRET.encode()])
    past = SignedFile(**{**claims.__dict__, "expires": int(time.time()) - 1800})
    expired = f"{site.url}/files/{sign_token(past, [SECRET.encode()])}"
    response = page.goto(expired)
    assert response is not None and response.status == 403
    assert "expired" in page.content()
    tampered = f"{site.url}/files/{token[:-3]}AAA"
    response = page.goto(tampered)
    assert response is not None and response.status == 403
