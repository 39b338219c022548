"""Transfer workers: move the files of :class:`~asyncassets.storage.QueuedStorage`
fields from their local to their remote storage.

In a service that runs its own event loop (FastAPI, aiohttp, a worker process)::

    import asyncassets

    async with asyncassets.transfers.worker(concurrency=4):
        await serve()        # transfers run beside it until the block ends

From cron or a deployment's command line, ``asyncassets --import myapp.models
transfer --once`` (until nothing is due) or ``--forever`` (until SIGTERM).

A worker finds the queued catalogues from the registered Document classes (as
the sweep and the check do), claims due transfers with a lease, and runs up to
``concurrency`` of them at once. Any number of workers, in any number of
processes, may run against one database: a claim is one ``find_one_and_update``
and a transfer's switch is conditional on its claim, so a file is never
transferred twice at once, and one whose worker died is taken over when its
lease runs out. Stopping is graceful: no new claims, running transfers finish
(or, after ``shutdown_timeout``, are cancelled and their claims given back).

Everything the queue knows is in the catalogue, so :func:`counts` and
:func:`retry_failed` work from anywhere, and ``check()`` reports failed
transfers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from .connection import get_db
from .ops.scope import declared_storages
from .storage.queued import QueuedStorage, QueuedStore, TransferOutcome, default_worker_id, listen

__all__ = [
    "TransferStats",
    "TransferWorker",
    "counts",
    "queued_stores",
    "retry_failed",
    "run_transfers",
    "worker",
]

logger = logging.getLogger("asyncassets.transfers")


def queued_stores(
    buckets: Iterable[str] | str | None = None, alias: str | None = None
) -> list[QueuedStore]:
    """The stores of the queued catalogues registered Document classes declare.

    :param buckets: only these catalogue names (``collection_name``).
    :param alias: only the catalogues of this connection alias.
    :raises ConnectionNotRegistered: a queued catalogue's alias is not connected.
    :raises ValueError: fields declare different storages for one catalogue.
    """
    names = {buckets} if isinstance(buckets, str) else set(buckets) if buckets else None
    stores = []
    for (db_alias, name), storage in declared_storages().items():
        if not isinstance(storage, QueuedStorage):
            continue
        if (alias is not None and db_alias != alias) or (names is not None and name not in names):
            continue
        stores.append(storage.bind(get_db(db_alias)))
    return stores


@dataclass
class TransferStats:
    """What a worker did."""

    #: Files switched to their remote copy.
    transferred: int = 0
    #: Attempts that failed and will be retried.
    retried: int = 0
    #: Attempts that failed for good (``max_attempts`` reached).
    failed: int = 0
    #: Claims that came to nothing: the file was deleted or replaced, or the lease lost.
    gone: int = 0
    #: Claims given back unfinished at shutdown.
    released: int = 0
    #: Bytes copied by the transfers that were switched.
    copied_bytes: int = 0
    #: Seconds spent in transfers (summed over concurrent ones).
    seconds: float = 0.0
    #: The last errors of failed attempts, ``(file id, error)``, at most 20.
    errors: list[tuple[Any, BaseException]] = field(default_factory=list, repr=False)

    def add(self, outcome: TransferOutcome) -> None:
        """Count one outcome."""
        self.seconds += outcome.seconds
        if outcome.status == "done":
            self.transferred += 1
            self.copied_bytes += outcome.length
        elif outcome.status == "retry":
            self.retried += 1
        elif outcome.status == "failed":
            self.failed += 1
        elif outcome.status == "gone":
            self.gone += 1
        if outcome.error is not None:
            self.errors.append((outcome.file_id, outcome.error))
            del self.errors[:-20]

    def __str__(self) -> str:
        return (
            f"{self.transferred} transferred ({self.copied_bytes} bytes), {self.retried} to retry, "
            f"{self.failed} failed, {self.gone} gone, {self.released} released"
        )


class TransferWorker:
    """Runs the transfers of queued catalogues; an async context manager.

    :param stores: the stores to serve; default: :func:`queued_stores` (every
        queued catalogue the registered classes declare), found at start.
    :param concurrency: transfers run at once.
    :param poll_interval: seconds between looks for due work when idle (an upload
        in this process wakes the worker at once).
    :param worker_id: how claims name this worker (``host:pid:random``).
    :param shutdown_timeout: seconds :meth:`stop` lets running transfers finish
        before cancelling them (their claims are then given back).
    """

    def __init__(
        self,
        stores: Iterable[QueuedStore] | None = None,
        *,
        concurrency: int = 4,
        poll_interval: float = 1.0,
        worker_id: str | None = None,
        shutdown_timeout: float = 30.0,
        buckets: Iterable[str] | str | None = None,
        alias: str | None = None,
    ) -> None:
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError(f"concurrency must be a positive int, not {concurrency!r}")
        if poll_interval <= 0:
            raise ValueError(f"poll_interval must be positive, not {poll_interval!r}")
        self._given = None if stores is None else list(stores)
        self._buckets = buckets
        self._alias = alias
        self.stores: list[QueuedStore] = []
        self.concurrency = concurrency
        self.poll_interval = float(poll_interval)
        self.worker_id = worker_id or default_worker_id()
        self.shutdown_timeout = float(shutdown_timeout)
        self.stats = TransferStats()
        self._slots: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._wake: asyncio.Event | None = None
        self._next = 0

    def __repr__(self) -> str:
        return (f"<TransferWorker {self.worker_id} concurrency={self.concurrency} "
                f"{len(self.stores)} catalogue(s): {self.stats}>")

    def _resolve(self) -> None:
        if not self.stores:
            self.stores = (self._given if self._given is not None
                           else queued_stores(self._buckets, self._alias))
        if self._wake is None:
            self._wake = listen()

    async def start(self) -> TransferWorker:
        """Start serving in the background (the running loop's tasks); returns at once."""
        if self._slots:
            return self
        # No index building here: uploads build the catalogue's indexes (the queue's
        # among them), and a catalogue nothing was uploaded to has nothing to claim.
        self._resolve()
        self._stopping.clear()
        self._slots = [asyncio.ensure_future(self._slot(once=False))
                       for _ in range(self.concurrency)]
        return self

    async def stop(self, timeout: float | None = None) -> TransferStats:
        """Stop claiming; let running transfers finish for up to ``timeout`` seconds
        (``shutdown_timeout`` if ``None``), then cancel them (their claims are given
        back: the next worker starts them again at once). Returns the stats."""
        self._stopping.set()
        if self._wake is not None:
            self._wake.set()
        # Kept in self._slots until over: a second stop(timeout=0) cancels them.
        slots = [task for task in self._slots if not task.done()]
        if slots:
            wait = self.shutdown_timeout if timeout is None else timeout
            _done, pending = await asyncio.wait(slots, timeout=wait)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        for task in self._slots:
            if task.done() and not task.cancelled() and task.exception() is not None:
                logger.error("transfer slot failed", exc_info=task.exception())
        self._slots = []
        return self.stats

    async def run_once(self) -> TransferStats:
        """Transfer everything due now (and what falls due meanwhile), then return.

        Transfers that fail and are retried later, or that other workers hold,
        are left to later runs.
        """
        self._resolve()
        self._stopping.clear()
        slots = [asyncio.ensure_future(self._slot(once=True)) for _ in range(self.concurrency)]
        self._slots = slots
        try:
            await asyncio.gather(*slots)
        finally:
            self._slots = []
            for task in slots:
                task.cancel()
            await asyncio.wait(slots)
        return self.stats

    async def run_forever(self) -> TransferStats:
        """Serve until :meth:`stop` is called (from another task or a signal handler)."""
        await self.start()
        slots = list(self._slots)
        try:
            await self._stopping.wait()
        except asyncio.CancelledError:
            await self.stop()
            raise
        if slots:
            await asyncio.wait(slots)
        return self.stats

    async def __aenter__(self) -> TransferWorker:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _claim_any(self) -> tuple[QueuedStore, Any] | None:
        stores = self.stores
        for offset in range(len(stores)):
            store = stores[(self._next + offset) % len(stores)]
            claim = await store.claim(self.worker_id)
            if claim is not None:
                self._next = (self._next + offset + 1) % len(stores)
                return store, claim
        return None

    async def _slot(self, *, once: bool) -> None:
        while not self._stopping.is_set():
            try:
                found = await self._claim_any()
            except Exception:
                logger.exception("claiming a transfer failed; trying again")
                if once:
                    raise
                await self._idle()
                continue
            if found is None:
                if once:
                    return
                await self._idle()
                continue
            store, claim = found
            try:
                outcome = await store.run(claim)
            except asyncio.CancelledError:
                self.stats.released += 1
                raise
            except Exception:
                logger.exception("transfer of %r failed unexpectedly", claim.file_id)
                continue
            self.stats.add(outcome)
            if outcome.error is not None:
                logger.warning("transfer of %r to %s: %s (%s)", claim.file_id,
                               store.storage.remote.url, outcome.status, outcome.error)
            # A slot that found work looks for more at once; an idle one wakes the rest.
            if self._wake is not None and outcome.status == "done":
                self._wake.set()

    async def _idle(self) -> None:
        wake = self._wake
        assert wake is not None
        timeout = self.poll_interval
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(wake.wait(), timeout)
        wake.clear()


def worker(
    *,
    concurrency: int = 4,
    poll_interval: float = 1.0,
    buckets: Iterable[str] | str | None = None,
    alias: str | None = None,
    shutdown_timeout: float = 30.0,
    worker_id: str | None = None,
) -> TransferWorker:
    """A transfer worker for the queued catalogues registered classes declare.

    .. code-block:: python

        async with asyncassets.transfers.worker(concurrency=4):
            ...

    :param buckets: serve only these catalogues (``collection_name``).
    :param alias: serve only the catalogues of this connection alias.
    :returns: a :class:`TransferWorker`, started by ``async with`` (or
        :meth:`~TransferWorker.start`) and stopped gracefully when the block ends.
    """
    return TransferWorker(
        concurrency=concurrency,
        poll_interval=poll_interval,
        buckets=buckets,
        alias=alias,
        shutdown_timeout=shutdown_timeout,
        worker_id=worker_id,
    )


async def run_transfers(
    *,
    concurrency: int = 4,
    buckets: Iterable[str] | str | None = None,
    alias: str | None = None,
) -> TransferStats:
    """Transfer everything due now, with ``concurrency`` at once, and return the stats."""
    return await TransferWorker(concurrency=concurrency, buckets=buckets, alias=alias).run_once()


async def retry_failed(
    buckets: Iterable[str] | str | None = None,
    alias: str | None = None,
    *,
    file_ids: Iterable[Any] | None = None,
) -> int:
    """Queue ``failed`` transfers again, with a fresh count of attempts.

    :param file_ids: only these files; ``None``: every failed one.
    :returns: how many were queued.
    """
    ids = None if file_ids is None else list(file_ids)
    total = 0
    for store in queued_stores(buckets, alias):
        total += await store.retry_failed(ids)
    return total


async def counts(
    buckets: Iterable[str] | str | None = None, alias: str | None = None
) -> dict[str, dict[str, int]]:
    """How many files of each queued catalogue are in each transfer state:
    ``{"alias:name": {"pending": 3, "held": 0, "running": 1, "done": 120, "failed": 0}}``."""
    found: dict[str, dict[str, int]] = {}
    for (db_alias, name), storage in declared_storages().items():
        if not isinstance(storage, QueuedStorage):
            continue
        if alias is not None and db_alias != alias:
            continue
        if buckets is not None and name not in ({buckets} if isinstance(buckets, str)
                                                else set(buckets)):
            continue
        found[f"{db_alias}:{name}"] = await storage.bind(get_db(db_alias)).counts()
    return found
