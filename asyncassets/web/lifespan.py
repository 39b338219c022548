"""Run an ASGI app's lifespan in-process: for tests that call the app without a server.

httpx's ``ASGITransport`` calls an app once per request and never sends it the
lifespan events, so an app that connects to its database in its lifespan
(``asyncassets.connect(...)`` in Starlette's or FastAPI's ``lifespan=``) has no
connection when a test calls it that way. :func:`run_lifespan` sends the
startup event, waits for the app to be ready, and sends the shutdown event when
the block ends, all in the test's event loop (the one PyMongo's async client
must be used in):

.. code-block:: python

    import httpx
    from asyncassets.web import run_lifespan

    async def test_upload_and_download():
        app = create_app("mongodb://127.0.0.1:27017/test_app")
        async with run_lifespan(app) as running:
            transport = httpx.ASGITransport(app=running)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                assert (await client.get("/health")).status_code == 200
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .._tasks import add_note
from ..errors import LifespanFailed

__all__ = ["LifespanFailed", "run_lifespan"]


@contextlib.asynccontextmanager
async def run_lifespan(app: ASGIApp, *, timeout: float = 60.0) -> AsyncIterator[ASGIApp]:
    """Start ``app``'s lifespan, yield the app to call, shut the lifespan down at the end.

    The app yielded passes the lifespan's state (what a Starlette or FastAPI
    lifespan ``yield``\\ s, read as ``request.state``) into every request, as
    servers do; give it to ``httpx.ASGITransport(app=...)``.

    An app that ends its lifespan call without answering, and without an
    error, does not use lifespans: the block runs all the same.

    :param timeout: seconds to wait for the startup, and for the shutdown.
    :raises LifespanFailed: the app reported that startup or shutdown failed, or
        did not answer within ``timeout``. When the block itself raised, its
        error is raised instead, with the failed shutdown in a note (PEP 678).
    :raises Exception: what the app's lifespan raised, if it raised before
        answering the startup.
    """
    inbox: asyncio.Queue[Message] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    started: asyncio.Future[None] = loop.create_future()
    stopped: asyncio.Future[None] = loop.create_future()
    state: dict[str, Any] = {}
    scope: Scope = {
        "type": "lifespan",
        "asgi": {"version": "3.0", "spec_version": "2.0"},
        "state": state,
    }

    async def receive() -> Message:
        return await inbox.get()

    async def send(message: Message) -> None:
        kind = message["type"]
        which = started if kind.startswith("lifespan.startup.") else stopped
        if which.done():
            return
        if kind.endswith(".complete"):
            which.set_result(None)
        elif kind.endswith(".failed"):
            what = "startup" if which is started else "shutdown"
            which.set_exception(
                LifespanFailed(f"the app's lifespan {what} failed: {message.get('message', '')}")
            )

    task = asyncio.ensure_future(app(scope, receive, send))
    try:
        inbox.put_nowait({"type": "lifespan.startup"})
        if not await _answered(started, task, timeout, "startup"):
            yield app  # the app has no lifespan
            return

        async def with_state(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] in ("http", "websocket"):
                scope = {**scope, "state": dict(state)}
            await app(scope, receive, send)

        try:
            yield with_state
        except BaseException as failure:
            # Shut down after a failing block too (the app closes its connections),
            # but the block's error is the one to see: a failed shutdown is noted
            # on it, not raised in its place.
            inbox.put_nowait({"type": "lifespan.shutdown"})
            try:
                await _answered(stopped, task, timeout, "shutdown")
            except Exception as shutdown_failure:
                add_note(
                    failure,
                    "and then the app's lifespan shutdown failed too: "
                    f"{type(shutdown_failure).__name__}: {shutdown_failure}"
                )
            raise
        inbox.put_nowait({"type": "lifespan.shutdown"})
        await _answered(stopped, task, timeout, "shutdown")
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for future in (started, stopped, task):
            if future.done() and not future.cancelled():
                future.exception()  # retrieved: no "never retrieved" warning


async def _answered(
    answer: asyncio.Future[None], task: asyncio.Future[Any], timeout: float, what: str
) -> bool:
    """Wait for the app's answer; ``False`` if its lifespan call ended without one.

    :raises LifespanFailed: a ``.failed`` answer, or none within ``timeout``.
    """
    done, _ = await asyncio.wait({answer, task}, timeout=timeout, return_when="FIRST_COMPLETED")
    if answer in done:
        answer.result()  # raises LifespanFailed for a ".failed" answer
        return True
    if task in done:
        task.result()  # raises what the lifespan raised
        if what == "startup":
            return False
        raise LifespanFailed("the app's lifespan ended without answering the shutdown")
    raise LifespanFailed(f"the app's lifespan did not answer the {what} in {timeout} s")
