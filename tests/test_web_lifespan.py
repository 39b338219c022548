"""``run_lifespan``: testing an app whose lifespan connects, in-process.

httpx's ``ASGITransport`` calls an app without its lifespan, so an app that
connects to MongoDB in its lifespan has no connection in such a test;
:func:`asyncassets.web.run_lifespan` runs the lifespan in the test's event loop.
The docs' FastAPI example (examples/fastapi_app.py) is the app under test; the
other tests use small Starlette apps to pin the helper's contract.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import asyncassets
from asyncassets.errors import ConnectionNotRegistered, LifespanFailed
from asyncassets.files import urls
from asyncassets.testing import database_uri, unique_db_name
from asyncassets.web import run_lifespan

ROOT = Path(__file__).resolve().parents[1]
SECRET = "lifespan-test secret, long enough to sign"


def example() -> Any:
    if "fastapi_app" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "fastapi_app", ROOT / "examples" / "fastapi_app.py"
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["fastapi_app"] = module
        spec.loader.exec_module(module)
    return sys.modules["fastapi_app"]


@pytest.fixture
def uri(asyncassets_server_uri: str) -> Any:
    found = database_uri(asyncassets_server_uri, unique_db_name("lifespan"))
    yield found
    urls._config = None
    import pymongo

    with pymongo.MongoClient(found) as client:
        client.drop_database(client.get_default_database().name)


async def test_the_fastapi_example_runs_in_process_with_its_lifespan(uri: str) -> None:
    pytest.importorskip("fastapi")
    app = example().create_app(uri, secret=SECRET)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        # What the docs warn about: without the lifespan there is no connection.
        with pytest.raises(ConnectionNotRegistered):
            await client.post("/reports", files={"file": ("a.txt", b"hello", "text/plain")})
    async with run_lifespan(app) as running:
        transport = httpx.ASGITransport(app=running)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            r = await client.post("/reports", files={"file": ("a.txt", b"hello", "text/plain")})
            assert r.status_code == 201, r.text
            got = await client.get(f"/reports/{r.json()['id']}/file")
            assert (got.status_code, got.content) == (200, b"hello")
            assert got.headers["content-type"] == "text/plain; charset=utf-8"
            head = await client.head(f"/reports/{r.json()['id']}/file")
            assert (head.status_code, head.headers["content-length"]) == (200, "5")
    # Shut down: the lifespan disconnected.
    with pytest.raises(ConnectionNotRegistered):
        asyncassets.get_db()


def state_app(events: list[str], fail: str | None = None) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        events.append("startup")
        if fail == "startup":
            raise RuntimeError("cannot reach the database")
        yield {"greeting": "hello"}
        events.append("shutdown")
        if fail == "shutdown":
            raise RuntimeError("cannot close")

    async def hello(request: Request) -> Response:
        return JSONResponse({"greeting": request.state.greeting})

    return Starlette(routes=[Route("/", hello)], lifespan=lifespan)


async def test_the_lifespan_state_reaches_requests_and_shutdown_runs() -> None:
    events: list[str] = []
    app = state_app(events)
    async with run_lifespan(app) as running:
        assert events == ["startup"]
        transport = httpx.ASGITransport(app=running)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert (await client.get("/")).json() == {"greeting": "hello"}
    assert events == ["startup", "shutdown"]


async def test_shutdown_runs_when_the_block_fails() -> None:
    events: list[str] = []
    with pytest.raises(KeyError):
        async with run_lifespan(state_app(events)):
            raise KeyError("the test failed")
    assert events == ["startup", "shutdown"]


@pytest.mark.parametrize("where", ["startup", "shutdown"])
async def test_a_failed_startup_or_shutdown_raises_lifespan_failed(where: str) -> None:
    events: list[str] = []
    with pytest.raises(LifespanFailed, match=f"(?s){where} failed.*RuntimeError: cannot"):
        async with run_lifespan(state_app(events, fail=where)):
            assert where == "shutdown", "the block must not run after a failed startup"


async def test_an_app_without_lifespan_support_runs_all_the_same() -> None:
    async def bare(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return  # ignores the lifespan
        await Response(b"ok")(scope, receive, send)

    async with run_lifespan(bare) as running:
        transport = httpx.ASGITransport(app=running)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert (await client.get("/")).content == b"ok"


async def test_a_lifespan_that_never_answers_times_out() -> None:
    async def stuck(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await receive()  # never answers the startup

    with pytest.raises(LifespanFailed, match="did not answer the startup"):
        async with run_lifespan(stuck, timeout=0.2):
            pass


async def test_the_blocks_error_is_raised_when_the_shutdown_fails_too() -> None:
    # A failing test whose app then fails to shut down: the test's own error is
    # what the report must show, the shutdown's failure noted on it.
    events: list[str] = []
    with pytest.raises(KeyError, match="the test failed") as raised:
        async with run_lifespan(state_app(events, fail="shutdown")):
            raise KeyError("the test failed")
    assert events == ["startup", "shutdown"]
    if sys.version_info >= (3, 11):  # notes (PEP 678)
        notes = getattr(raised.value, "__notes__", [])
        assert any("shutdown failed" in note and "cannot close" in note for note in notes), notes
