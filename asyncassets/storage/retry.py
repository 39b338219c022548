"""Retrying transient storage failures: a number of attempts, backoff, jitter."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

__all__ = ["Retry"]

T = TypeVar("T")


@dataclass(frozen=True)
class Retry:
    """How a storage retries an operation that failed for a transient reason.

    The ``n``-th retry waits ``min(max_delay, delay * 2 ** (n - 1))`` seconds,
    multiplied by a random factor in ``[0.5, 1.5)`` when ``jitter`` is set, so
    that many clients failing together do not retry together. Only failures a
    storage classifies as transient (timeouts, connection resets, 5xx, throttling)
    are retried; permission and not-found errors never are.

    :param attempts: tries in all, the first included (1: no retry).
    :param delay: the wait before the first retry, in seconds.
    :param max_delay: the longest wait between two tries.
    :param jitter: randomise each wait.
    """

    attempts: int = 5
    delay: float = 0.1
    max_delay: float = 5.0
    jitter: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int):
            raise TypeError(f"attempts must be an int, not {type(self.attempts).__name__}")
        if self.attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {self.attempts}")
        for name in ("delay", "max_delay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name} must be a number of seconds >= 0, got {value!r}")

    def wait_before(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1 for the first retry)."""
        base = min(self.max_delay, self.delay * 2 ** (retry - 1))
        return base * random.uniform(0.5, 1.5) if self.jitter else base

    async def call(
        self,
        operation: Callable[[], Awaitable[T]],
        is_transient: Callable[[BaseException], bool],
    ) -> T:
        """Await ``operation()`` until it succeeds, a permanent error, or no tries left.

        The last error propagates as it is; the caller turns it into a
        :class:`~asyncassets.errors.StorageError`. Cancellation is never retried.
        """
        retry = 0
        while True:
            try:
                return await operation()
            except Exception as exc:
                retry += 1
                if retry >= self.attempts or not is_transient(exc):
                    raise
            await asyncio.sleep(self.wait_before(retry))
