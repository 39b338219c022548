"""Tasks that must outlive a cancelled caller.

The event loop keeps only weak references to tasks; cleanups and reference switches
that must finish whatever happens to the task that started them are kept here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["add_note", "settle", "spawn"]

T = TypeVar("T")

_background: set[asyncio.Future[Any]] = set()


def spawn(coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
    """Run ``coro`` as a task that is kept alive until it ends."""
    task = asyncio.ensure_future(coro)
    _background.add(task)
    task.add_done_callback(_forget)
    return task


def _forget(task: asyncio.Future[Any]) -> None:
    _background.discard(task)
    # Whoever needed the outcome has awaited it; don't log "never retrieved".
    if not task.cancelled():
        task.exception()



async def settle(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to its end even if the caller is cancelled meanwhile.

    For a change of a stored reference and its follow-up: once the update is on its
    way, whether the database applied it decides what happens next, never the
    moment the caller was cancelled. A cancelled caller waits for the end (one
    short update and a delete), then sees its ``CancelledError``.
    """
    task = spawn(coro)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait({task})
        raise


def add_note(exc: BaseException, note: str) -> None:
    """Attach ``note`` to ``exc`` where Python supports notes (3.11+)."""
    if hasattr(exc, "add_note"):  # Python >= 3.11
        exc.add_note(note)

