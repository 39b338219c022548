"""Queued transfers: transfers per second, and the latency from upload to remote.

    python benchmarks/transfers.py                     # 1 and 4 workers, S3 and a directory
    python benchmarks/transfers.py --files 400 --size-kib 256 --remote s3

For each remote (an S3 bucket on a moto server on loopback, or a directory) and
each worker concurrency (``--workers``, default 1 and 4):

``backlog``
    ``--files`` files of ``--size-kib`` are uploaded to a :class:`QueuedStorage`
    (local: a directory, fsync on) with no worker running, then one in-process
    :class:`~asyncassets.transfers.TransferWorker` with that concurrency moves
    them all: transfers per second, and MB/s.
``latency``
    with the worker running, ``--latency-files`` files are uploaded one after
    another (each ``put`` then ``save``, as an application would); each file's
    latency is from its ``put`` returning to its entry's ``transfer.done_at``
    (both from this process's clock): median, 95th percentile and maximum.

The database is an on-disk SecantusDB started for the run.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import embedded_server, fmt_table, log, machine, median, percentile
from storages import start_moto

import asyncassets
from asyncassets import Document
from asyncassets._s3server import FAKE_CREDENTIALS, create_bucket
from asyncassets.fields import FileField
from asyncassets.storage import FileSystemStorage, QueuedStorage, S3Storage
from asyncassets.transfers import TransferWorker

KiB = 1024


def make_storage(remote_kind: str, root: Path, endpoint: str | None, tag: str) -> QueuedStorage:
    if remote_kind == "s3":
        assert endpoint is not None
        bucket = f"bench-{uuid.uuid4().hex[:10]}"
        create_bucket(bucket, endpoint, FAKE_CREDENTIALS["access_key_id"],
                      FAKE_CREDENTIALS["secret_access_key"], "us-east-1")
        remote: Any = S3Storage(bucket, endpoint_url=endpoint, region="us-east-1",
                                **FAKE_CREDENTIALS)
    else:
        remote = FileSystemStorage(root / f"{tag}-remote")
    return QueuedStorage(
        local=FileSystemStorage(root / f"{tag}-local"),
        remote=remote,
        collection_name=f"bench_{tag}",
    )


def doc_class(storage: QueuedStorage, tag: str) -> Any:
    return type(f"Bench{tag}", (Document,), {
        "photo": FileField(storage=storage), "meta": {"collection": f"bench_docs_{tag}"},
    })


async def backlog(args: argparse.Namespace, remote_kind: str, workers: int, root: Path,
                  endpoint: str | None) -> dict[str, Any]:
    tag = f"{remote_kind}_{workers}_backlog"
    storage = make_storage(remote_kind, root, endpoint, tag)
    Doc = doc_class(storage, tag)
    data = bytes(range(256)) * (args.size_kib * KiB // 256)
    for i in range(args.files):
        doc = Doc()
        await doc.photo.put(data, filename=f"{i}.bin")
        await doc.save()
    store = storage.bind(asyncassets.get_db())
    worker = TransferWorker([store], concurrency=workers)
    started = time.perf_counter()
    stats = await worker.run_once()
    elapsed = time.perf_counter() - started
    assert stats.transferred == args.files, stats
    return {"remote": remote_kind, "workers": workers, "files": args.files,
            "seconds": elapsed, "per_second": args.files / elapsed,
            "mb_per_second": args.files * len(data) / elapsed / 1e6}


async def latency(args: argparse.Namespace, remote_kind: str, workers: int, root: Path,
                  endpoint: str | None) -> dict[str, Any]:
    tag = f"{remote_kind}_{workers}_latency"
    storage = make_storage(remote_kind, root, endpoint, tag)
    Doc = doc_class(storage, tag)
    store = storage.bind(asyncassets.get_db())
    data = bytes(range(256)) * (args.size_kib * KiB // 256)
    uploaded: dict[Any, dt.datetime] = {}
    async with TransferWorker([store], concurrency=workers, poll_interval=args.poll):
        for i in range(args.latency_files):
            doc = Doc()
            await doc.photo.put(data, filename=f"{i}.bin")
            uploaded[doc.photo.file_id] = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
            await doc.save()
        deadline = time.monotonic() + 120
        while await store.files.count_documents({"transfer.state": "done"}) < len(uploaded):
            assert time.monotonic() < deadline, "transfers did not finish"
            await asyncio.sleep(0.01)
    seconds = []
    async for entry in store.files.find({}, {"transfer.done_at": 1}):
        seconds.append((entry["transfer"]["done_at"] - uploaded[entry["_id"]]).total_seconds())
    return {"remote": remote_kind, "workers": workers, "files": len(seconds),
            "median_ms": median(seconds) * 1000, "p95_ms": percentile(seconds, 95) * 1000,
            "max_ms": max(seconds) * 1000}


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"machine": machine(), "args": sorted(vars(args).items()),
                           "backlog": [], "latency": []}
    data_dir = tempfile.mkdtemp(prefix="aa-bench-db-")
    moto = None
    with embedded_server(args.cache_size, data_dir) as server:
        asyncassets.connect(host=server.uri, db="bench_transfers")
        try:
            endpoint = None
            if "s3" in args.remote:
                moto, endpoint = start_moto()
            with tempfile.TemporaryDirectory(prefix="aa-bench-tr-") as tmp:
                root = Path(tmp)
                for remote_kind in args.remote:
                    for workers in args.workers:
                        log(f"{remote_kind}, {workers} worker(s): backlog")
                        out["backlog"].append(
                            await backlog(args, remote_kind, workers, root, endpoint))
                        log(f"{remote_kind}, {workers} worker(s): latency")
                        out["latency"].append(
                            await latency(args, remote_kind, workers, root, endpoint))
        finally:
            await asyncassets.disconnect()
            if moto is not None:
                moto.terminate()
                moto.wait(10)
    return out


def report(out: dict[str, Any]) -> str:
    rows = [[r["remote"], r["workers"], r["files"], f"{r['seconds']:.2f}",
             f"{r['per_second']:.1f}", f"{r['mb_per_second']:.1f}"] for r in out["backlog"]]
    lat = [[r["remote"], r["workers"], r["files"], f"{r['median_ms']:.0f}",
            f"{r['p95_ms']:.0f}", f"{r['max_ms']:.0f}"] for r in out["latency"]]
    return "\n".join([
        "\nbacklog (all files queued, then one worker)",
        fmt_table(["remote", "workers", "files", "s", "transfers/s", "MB/s"], rows),
        "\nlatency (upload returned -> switched to remote)",
        fmt_table(["remote", "workers", "files", "median ms", "p95 ms", "max ms"], lat),
    ])


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--files", type=int, default=200, help="files in the backlog run")
    p.add_argument("--latency-files", type=int, default=100)
    p.add_argument("--size-kib", type=int, default=64)
    p.add_argument("--workers", default="1,4", help="worker concurrencies to measure")
    p.add_argument("--remote", default="s3,filesystem")
    p.add_argument("--poll", type=float, default=1.0, help="the worker's poll interval")
    p.add_argument("--cache-size", default="1G")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    args.workers = [int(w) for w in args.workers.split(",")]
    args.remote = args.remote.split(",")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    out = asyncio.run(main_async(args))
    print(report(out))
    default = Path(__file__).parent / "results" / f"transfers-{int(time.time())}.json"
    path = Path(args.json or default)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2, default=str))
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
