"""tus_app used from a page on another origin, as docs/uploads.rst says (CORS):
headless Chromium opens a page on one origin (``http://127.0.0.1:A``) that uploads
with tus-js-client to examples/tus_starlette.py served on another
(``http://127.0.0.1:B``), ``create_app(origins=[page])``: its ``CORSMiddleware``
with ``TUS_CORS``, the snippet the docs show.

* the upload, stopped at half and the page opened again, resumes from the offset
  the page read in ``HEAD``'s answer, and the recording's file is byte-exact;
* without the middleware, from an origin not allowed, with the hook's header not
  allowed, or with ``Location`` or ``Upload-Offset`` not exposed, the upload
  fails in the page and the recording has no file.

The page's script is ``examples/web/src/uploads.js``, bundled with its npm
packages (``npm ci && npm run build`` in ``examples/web``; ``.ci/run`` does it).
Without Chromium or the bundle these tests skip, except in CI (``CI=true``),
where they fail.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pymongo
import pytest
from _browser import IN_CI, chromium, require_browser, served

require_browser("the cross-origin upload browser tests")

ROOT = Path(__file__).resolve().parent.parent
WEB = ROOT / "examples" / "web"
BUNDLE = WEB / "build" / "uploads.js"
KIB = 1024
SIZE = 512 * KIB
CHUNK = 64 * KIB

PAGE = """<!doctype html>
<meta charset='utf-8'><title>Another origin</title>
<input type='file' id='file'>
<script src='/uploads.js'></script>
<script>
const query = new URLSearchParams(location.search);
const stopAt = Number(query.get('stop') || 0);
window.state = {progress: 0, done: false, error: null, resumed: null, resumedAt: null};
window.upload = (endpoint, recording, retry) => {
  const state = window.state;
  const file = document.getElementById('file').files[0];
  const handle = AssetUploads.tusUpload(file, {
    endpoint, chunkSize: CHUNK, metadata: {recording},
    headers: {'X-User': 'ann'}, retryDelays: retry ? undefined : [],
    onProgress(sent, total) {
      if (state.resumedAt === null) state.resumedAt = sent;
      state.progress = sent / total;
      if (stopAt && state.progress >= stopAt && !state.stopped) {
        state.stopped = true;  // the page closed mid-upload
        handle.abort();
      }
    },
    onSuccess(url) { state.done = true; state.url = url; },
    onError(error) { state.error = String(error); },
  });
  handle.start().then((resumed) => { state.resumed = resumed; },
                      (error) => { state.error = String(error); });
};
</script>
""".replace("CHUNK", str(CHUNK))


def bundle() -> None:
    # A bundle from before tusUpload took headers and retryDelays is rebuilt.
    if BUNDLE.exists() and "options.retryDelays" in BUNDLE.read_text(encoding="utf-8"):
        return
    if (WEB / "node_modules").exists():
        subprocess.run(["npm", "run", "-s", "build"], cwd=WEB, check=True, timeout=120)
        return
    message = ("examples/web/build/uploads.js is missing or old: run `npm ci && npm run build` "
               "in examples/web (.ci/run does)")
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def example() -> Any:
    """examples/tus_starlette.py, loaded once (its Document class is declared once);
    tests/test_tus_examples.py loads it under the same name."""
    name = "tus_starlette"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def page_app() -> Any:
    """The other origin: the page and the bundle, nothing else."""
    from starlette.applications import Starlette
    from starlette.responses import FileResponse, HTMLResponse
    from starlette.routing import Route

    async def page(request: Any) -> HTMLResponse:
        return HTMLResponse(PAGE)

    async def script(request: Any) -> FileResponse:
        return FileResponse(BUNDLE, media_type="text/javascript")

    return Starlette(routes=[Route("/", page), Route("/uploads.js", script)])


class Requests:
    """ASGI middleware: the method and path of each request the tus server got."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.seen: list[tuple[str, str]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            self.seen.append((scope["method"], scope["path"]))
        await self.app(scope, receive, send)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    bundle()
    with chromium() as launched:
        yield launched


@pytest.fixture(scope="module")
def page_origin() -> Iterator[str]:
    with served(page_app()) as url:
        yield url


@pytest.fixture
def module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("MEDIA_ROOT", str(tmp_path / "media"))
    return example()


@pytest.fixture
def uri(asyncassets_server_uri: str) -> Iterator[str]:
    from asyncassets.testing import database_uri, unique_db_name

    uri = database_uri(asyncassets_server_uri, unique_db_name("cors"))
    try:
        yield uri
    finally:
        with pymongo.MongoClient(uri) as client:
            client.drop_database(client.get_default_database().name)


def new_recording(base: str) -> str:
    """A recording of ann's, made by the test (same-origin to the server: no CORS)."""
    made = httpx.post(f"{base}/recordings", headers={"X-User": "ann"}, timeout=10)
    assert made.status_code == 201, made.text
    pk: str = made.json()["id"]
    return pk


def upload(context: Any, page_url: str, endpoint: str, recording: str, path: Path,
           *, stop: float = 0, retry: bool = True) -> dict[str, Any]:
    """Open the page (``stop``: abort the upload there), upload ``path``: the page's
    state once the upload finished, stopped or failed."""
    page = context.new_page()
    page.goto(f"{page_url}/?stop={stop}" if stop else page_url, timeout=10_000)
    page.set_input_files("#file", str(path))
    page.evaluate("([e, r, retry]) => window.upload(e, r, retry)", [endpoint, recording, retry])
    page.wait_for_function("state.done || state.error || state.stopped", timeout=15_000)
    page.wait_for_timeout(100)  # an abort's request cut, or a late error
    state: dict[str, Any] = page.evaluate("window.state")
    page.close()
    return state


def file_of(uri: str, pk: str) -> bytes | None:
    """The recording's file, read through asyncassets (the server stopped)."""
    import asyncassets

    module = sys.modules["tus_starlette"]

    async def read() -> bytes | None:
        asyncassets.connect(uri)
        try:
            recording = await module.Recording.objects.get(pk=pk)
            if recording.file.file_id is None:
                return None
            data: bytes | None = await recording.file.read(verify=True)
            return data
        finally:
            await asyncassets.disconnect()

    # In a thread: Playwright's sync API runs an event loop in this one.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, read()).result(timeout=30)


def test_a_page_on_another_origin_uploads_resumes_after_reload_byte_exact(
    browser: Any, page_origin: str, module: Any, uri: str, tmp_path: Path,
) -> None:
    data = os.urandom(SIZE)
    path = tmp_path / "clip.bin"
    path.write_bytes(data)
    server = Requests(module.create_app(uri, origins=[page_origin]))
    with served(server) as base:
        assert base.rsplit(":", 1)[1] != page_origin.rsplit(":", 1)[1]
        pk = new_recording(base)
        context = browser.new_context()
        try:
            first = upload(context, page_origin, f"{base}/uploads/", pk, path, stop=0.5)
            assert first["error"] is None and first["stopped"], first
            assert not first["done"], "the upload finished before it could be stopped"
            # The page again: a fresh script, the upload's URL in its localStorage.
            state = upload(context, page_origin, f"{base}/uploads/", pk, path)
        finally:
            context.close()
        assert state["error"] is None and state["done"], state
        # Resumed from HEAD's Upload-Offset (exposed): at most a chunk sent again.
        assert state["resumed"] is True, state
        assert state["resumedAt"] >= first["progress"] * SIZE - CHUNK, (first, state)
        assert state["url"].startswith(f"{base}/uploads/"), state
        tus = [(m, p) for m, p in server.seen if p.startswith("/uploads")]
        assert [m for m, _ in tus].count("POST") == 1, tus  # one upload, not two
        assert ("HEAD", state["url"][len(base):]) in tus, tus
        assert any(m == "OPTIONS" for m, _ in tus), tus  # the browser's preflights
    assert file_of(uri, pk) == data


def without_header(module: Any, monkeypatch: pytest.MonkeyPatch, key: str,
                   header: str) -> None:
    changed = {**module.TUS_CORS, key: [h for h in module.TUS_CORS[key] if h != header]}
    assert changed[key] != module.TUS_CORS[key]
    monkeypatch.setattr(module, "TUS_CORS", changed)


@pytest.mark.parametrize("case", [
    "no CORS middleware", "another origin allowed", "X-User not allowed",
    "Location not exposed", "Upload-Offset not exposed",
])
def test_without_the_documented_cors_the_upload_fails_and_nothing_is_attached(
    browser: Any, page_origin: str, module: Any, uri: str, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, case: str,
) -> None:
    data = os.urandom(SIZE)
    path = tmp_path / "clip.bin"
    path.write_bytes(data)
    port = page_origin.rsplit(":", 1)[1]
    origins = {
        "no CORS middleware": [],
        # The same port on another host name: another origin.
        "another origin allowed": [f"http://localhost:{port}"],
    }.get(case, [page_origin])
    if case == "X-User not allowed":
        without_header(module, monkeypatch, "allow_headers", "X-User")
    elif case.endswith("not exposed"):
        without_header(module, monkeypatch, "expose_headers", case.split()[0])
    server = Requests(module.create_app(uri, origins=origins))
    with served(server) as base:
        pk = new_recording(base)
        context = browser.new_context()
        try:
            state = upload(context, page_origin, f"{base}/uploads/", pk, path, retry=False)
        finally:
            context.close()
        assert state["error"] is not None and not state["done"], state
        tus = [m for m, p in server.seen if p.startswith("/uploads")]
        if case.endswith("not exposed"):
            # The server answered; the page could not read the answer's header.
            assert "POST" in tus, tus
            expected = {"Location": "invalid or missing Location header",
                        "Upload-Offset": "invalid or missing offset value"}
            assert expected[case.split()[0]] in state["error"], state
        else:
            assert tus == ["OPTIONS"], tus  # refused at the preflight: no POST sent
    assert file_of(uri, pk) is None
