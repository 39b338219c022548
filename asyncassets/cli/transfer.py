"""``asyncassets transfer``: run the transfers of QueuedStorage fields.

.. code-block:: console

    $ asyncassets --import myapp.models transfer --once          # what is due, then exit
    $ asyncassets --import myapp.models transfer --forever -c 8  # until SIGTERM
    $ asyncassets --import myapp.models transfer --status        # counts per state
    $ asyncassets --import myapp.models transfer --retry-failed --once

``--forever`` stops gracefully on SIGTERM or SIGINT: no new claims, running
transfers get ``--shutdown-timeout`` seconds to finish, then are cancelled and
their claims given back (the next worker takes them at once). A second signal
stops at once (claims still given back).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from typing import Any

from ..errors import CLIError
from ..transfers import TransferWorker, queued_stores
from .output import note, print_json, printable

__all__ = ["add_parser", "cmd_transfer"]

#: Exit status when failed transfers remain (as ``check`` finding problems).
EXIT_FAILED = 3


def add_parser(sub: argparse.ArgumentParser) -> None:
    """The options of ``transfer``."""
    mode = sub.add_mutually_exclusive_group()
    mode.add_argument("--once", action="store_true",
                      help="transfer what is due now, then exit (the default)")
    mode.add_argument("--forever", action="store_true",
                      help="keep transferring until SIGTERM or SIGINT (graceful)")
    mode.add_argument("--status", action="store_true",
                      help="print how many files are in each state; transfer nothing")
    sub.add_argument("-c", "--concurrency", type=int, default=4, metavar="N",
                     help="transfers at once (default: 4)")
    sub.add_argument("--poll", type=float, default=1.0, metavar="SECONDS",
                     help="--forever: how often an idle worker looks for work (default: 1)")
    sub.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="SECONDS",
                     help="--forever: how long running transfers may finish on SIGTERM "
                     "(default: 30)")
    sub.add_argument("--retry-failed", action="store_true",
                     help="queue the failed transfers again (fresh attempts) first")
    sub.add_argument("--bucket", action="append", metavar="NAME",
                     help="only this queued catalogue (repeatable; default: every one the "
                     "imported Document classes declare)")
    sub.add_argument("--json", action="store_true", help="print the result as JSON")


async def _counts(stores: list[Any]) -> dict[str, dict[str, int]]:
    return {store.name: await store.counts() for store in stores}


async def cmd_transfer(ctx: Any) -> int:
    """Run ``transfer``; the exit status is 3 when failed transfers remain."""
    args = ctx.args
    if args.concurrency < 1:
        raise CLIError(f"bad --concurrency {args.concurrency}: it must be at least 1")
    if args.poll <= 0 or args.shutdown_timeout < 0:
        raise CLIError("--poll must be positive and --shutdown-timeout not negative")
    stores = queued_stores(args.bucket or None, alias="default")
    if not stores:
        raise CLIError(
            "nothing to transfer: no imported Document class has a QueuedStorage field"
            + (f" in {', '.join(args.bucket)}" if args.bucket else "")
            + ". Load your models with --import yourapp.models"
        )
    retried = 0
    if args.retry_failed:
        for store in stores:
            retried += await store.retry_failed()
    worker = TransferWorker(stores, concurrency=args.concurrency, poll_interval=args.poll,
                            shutdown_timeout=args.shutdown_timeout)
    if args.status:
        pass
    elif args.forever:
        await _run_forever(worker, args)
    else:
        await worker.run_once()
    counts = await _counts(stores)
    failed = sum(c["failed"] for c in counts.values())
    if args.json:
        stats = worker.stats
        print_json({
            "retried_failed": retried,
            "stats": {k: getattr(stats, k) for k in (
                "transferred", "retried", "failed", "gone", "released", "copied_bytes",
                "seconds")},
            "errors": [{"file_id": str(i), "error": str(e)} for i, e in stats.errors],
            "counts": counts,
        })
        return EXIT_FAILED if failed else 0
    if args.retry_failed:
        print(f"queued again: {retried} failed transfer(s)")
    if not args.status:
        print(f"transfers: {worker.stats}")
        for file_id, error in worker.stats.errors:
            print(printable(f"  {file_id}: {error}"))
    for name, found in counts.items():
        print(printable(f"{name}: " + ", ".join(f"{n} {state}" for state, n in found.items())))
    return EXIT_FAILED if failed else 0


async def _run_forever(worker: TransferWorker, args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    signals = 0
    stopping: asyncio.Task[Any] | None = None
    stops: list[asyncio.Task[Any]] = []

    def on_signal(signum: int) -> None:
        nonlocal signals, stopping
        signals += 1
        if signals == 1:
            note(f"{signal.Signals(signum).name}: finishing running transfers "
                 f"(up to {args.shutdown_timeout:g} s); again to stop now")
            stopping = asyncio.ensure_future(worker.stop())
        else:
            note("stopping now; unfinished transfers are given back")
            stops.append(asyncio.ensure_future(worker.stop(timeout=0)))

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        await worker.run_forever()
        if stopping is not None:
            await stopping
        for task in stops:
            await task
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(signum)
        # Close the remote storages' clients (S3 connections) of this loop.
        for store in worker.stores:
            closer = getattr(store.remote.blobs, "aclose", None)
            if closer is not None:
                await closer()
