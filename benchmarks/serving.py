"""asyncassets.web against Starlette's FileResponse, through uvicorn on loopback.

    python benchmarks/serving.py                     # 32 MiB file, 7 rounds
    python benchmarks/serving.py --size-mib 8 --rounds 3

The same bytes are served five ways by one uvicorn process (a subprocess, on a
free 127.0.0.1 port, one worker, ``--http h11`` unless ``--http`` says
otherwise), against an on-disk SecantusDB started here (``--sync-on-commit``,
as for persistent data):

``starlette``
    ``starlette.responses.FileResponse`` of a file on the local disk: the
    baseline, which needs no database.
``loaded``
    ``asyncassets.web.FileResponse(doc.file, request)`` on a ``FileSystemStorage``
    field whose catalogue entry is already loaded (the document was read once,
    with ``load_files``): no query, the bytes from the same disk.
``signed``
    a signed link of that file (``proxy.url()``) through ``files_app``: the
    token checked, the catalogue entry looked up (one query), the bytes read.
``lookup``
    ``FileResponse`` on that field, the document read per request (one query)
    and its entry then loaded with it (the proxy's own look-up: one more).
``gridfs``
    ``FileResponse`` on a GridFS field whose document is loaded: the entry is
    looked up (one query), the bytes come from MongoDB, and the entry is looked
    up again once they are read (one response, one version).

This process is the client (``http.client``, one keep-alive connection per
contender), so client and server do not share an interpreter. Each round
measures, for every contender in a rotating order:

* **whole**: ``--whole-requests`` GETs of the whole file, the contenders taking
  turns: throughput (MB/s) and time to first byte;
* **ranged**: ``--ranged-requests`` GETs of 64 KiB at random offsets, the
  contenders taking turns request by request (each the same offset), so that
  load from elsewhere falls on all alike: requests per second (of the time
  spent in that contender's requests) and time to first byte.

After each round a probe inside the server times, without HTTP, one catalogue
lookup and a whole read of the GridFS file by PyMongo's own ``AsyncGridFSBucket``:
what a signed link and a GridFS response cannot go below.

Ratios to ``starlette`` are taken per round (the same round's figures, so a
busy moment weighs on both) and their median is reported; the JSON written to
``benchmarks/results/`` keeps every round and the machine's load.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import MiB, embedded_server, fmt_table, loadavg, log, machine, median

CONTENDERS = ("starlette", "loaded", "signed", "lookup", "gridfs")
RANGE_SIZE = 64 * 1024
SECRET = "benchmark secret, long enough to sign"
#: The issue's targets: (contender, section, least ratio to starlette).
TARGETS = (("loaded", "ranged", 1.0), ("signed", "ranged", 0.8), ("gridfs", "whole", 1.0))


# -- the server (a subprocess) ------------------------------------------------------


def make_app(uri: str, path: str, ids: dict[str, str]) -> Any:
    """The benchmark's ASGI app: one route per contender."""
    from bson import ObjectId
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import FileResponse as StarletteFileResponse
    from starlette.responses import PlainTextResponse, Response
    from starlette.routing import Mount, Route

    import asyncassets
    from asyncassets.web import FileResponse, files_app

    models = bench_models(os.path.dirname(path))
    loaded: dict[str, Any] = {}

    async def starlette(request: Request) -> Response:
        return StarletteFileResponse(path, media_type="application/octet-stream")

    async def from_loaded(request: Request) -> Response:
        return FileResponse(loaded["disk"].file, request)

    async def looked_up(request: Request) -> Response:
        doc = await models["disk"].objects.get(pk=ObjectId(ids["disk"]))
        return FileResponse(doc.file, request)

    async def gridfs(request: Request) -> Response:
        return FileResponse(loaded["gridfs"].file, request)

    async def signed_url(request: Request) -> Response:
        return PlainTextResponse(await loaded["disk"].file.url(expires=86400))

    async def probe(request: Request) -> Response:
        # Where the time goes, without HTTP: one catalogue lookup, and the whole
        # GridFS file read by PyMongo's own bucket (the driver and the server alone).
        from gridfs import AsyncGridFSBucket

        db = asyncassets.get_db()
        store = loaded["disk"].file.storage.bind(db)
        lookups = []
        for _ in range(50):
            started = time.perf_counter()
            await store.find(loaded["disk"].file.file_id)
            lookups.append((time.perf_counter() - started) * 1000)
        bucket = AsyncGridFSBucket(db, "bench_served")
        started = time.perf_counter()
        stream = await bucket.open_download_stream(loaded["gridfs"].file.file_id)
        got = len(await stream.read())
        seconds = time.perf_counter() - started
        return PlainTextResponse(
            json.dumps({"lookup_ms": median(lookups), "raw_gridfs_mb_s": got / seconds / 1e6})
        )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        asyncassets.connect(uri)
        for kind, model in models.items():
            loaded[kind] = await model.objects(pk=ObjectId(ids[kind])).load_files("file").get()
        yield
        await asyncassets.disconnect()

    routes = [
        Route("/starlette", starlette),
        Route("/loaded", from_loaded),
        Route("/lookup", looked_up),
        Route("/gridfs", gridfs),
        Route("/signed-url", signed_url),
        Route("/probe", probe),
        Mount("/files", files_app(secret=SECRET, base_url="/files")),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


def bench_models(root: str) -> dict[str, Any]:
    from asyncassets import Document
    from asyncassets.fields import FileField
    from asyncassets.storage import FileSystemStorage

    class ServedOnDisk(Document):
        file = FileField(storage=FileSystemStorage(os.path.join(root, "store"), fsync=False))
        meta = {"collection": "bench_served_disk"}

    class ServedFromGridFS(Document):
        file = FileField(collection_name="bench_served")
        meta = {"collection": "bench_served_gridfs"}

    return {"disk": ServedOnDisk, "gridfs": ServedFromGridFS}


def serve(args: argparse.Namespace) -> None:
    import uvicorn

    app = make_app(args.uri, args.path, json.loads(args.ids))
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", http=args.http)


# -- the client (this process) ------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def server_process(uri: str, path: str, ids: dict[str, str], http: str) -> Iterator[int]:
    port = free_port()
    command = [
        sys.executable,
        __file__,
        "--serve",
        "--uri",
        uri,
        "--path",
        path,
        "--ids",
        json.dumps(ids),
        "--port",
        str(port),
        "--http",
        http,
    ]
    proc = subprocess.Popen(command)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the benchmark's server did not start") from None
                time.sleep(0.1)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def get(
    conn: http.client.HTTPConnection, path: str, headers: dict[str, str]
) -> tuple[int, float, float, int]:
    """``(status, time to first byte, total time, body bytes)`` of one GET."""
    start = time.perf_counter()
    conn.request("GET", path, headers=headers)
    response = conn.getresponse()
    first = time.perf_counter()
    size = 0
    while True:
        piece = response.read(1024 * 1024)
        if not piece:
            break
        size += len(piece)
    end = time.perf_counter()
    return response.status, first - start, end - start, size


def measure_round(
    port: int,
    paths: dict[str, str],
    order: tuple[str, ...],
    size: int,
    wholes: int,
    ranged: int,
    rng: random.Random,
) -> dict[str, Any]:
    """One round: whole files, then 64 KiB ranges, the contenders interleaved.

    Requests alternate between contenders one by one (ranges: the same offset
    for each), starting with a rotating one, so a burst of load from elsewhere
    falls on all of them alike.
    """
    conns = {kind: http.client.HTTPConnection("127.0.0.1", port, timeout=120) for kind in order}
    try:
        for kind in order:
            get(conns[kind], paths[kind], {"range": "bytes=0-0"})  # warm the connection
        whole_spent = dict.fromkeys(order, 0.0)
        whole_ttfbs: dict[str, list[float]] = {kind: [] for kind in order}
        for n in range(wholes):
            shift = n % len(order)
            for kind in order[shift:] + order[:shift]:
                status, ttfb, total, got = get(conns[kind], paths[kind], {})
                assert (status, got) == (200, size), (kind, status, got)
                whole_spent[kind] += total
                whole_ttfbs[kind].append(ttfb * 1000)
        results: dict[str, Any] = {
            kind: {
                "whole": {
                    "mb_s": wholes * size / whole_spent[kind] / 1e6,
                    "ttfb_ms": median(whole_ttfbs[kind]),
                    "seconds": whole_spent[kind] / wholes,
                }
            }
            for kind in order
        }
        spent = dict.fromkeys(order, 0.0)
        ttfbs: dict[str, list[float]] = {kind: [] for kind in order}
        for n in range(ranged):
            offset = rng.randrange(0, size - RANGE_SIZE)
            header = {"range": f"bytes={offset}-{offset + RANGE_SIZE - 1}"}
            shift = n % len(order)
            for kind in order[shift:] + order[:shift]:
                status, ttfb, total, got = get(conns[kind], paths[kind], header)
                assert (status, got) == (206, RANGE_SIZE), (kind, status, got)
                spent[kind] += total
                ttfbs[kind].append(ttfb * 1000)
        for kind in order:
            results[kind]["ranged"] = {
                "requests_s": ranged / spent[kind],
                "ttfb_ms": median(ttfbs[kind]),
                "all": ttfbs[kind],
            }
        return results
    finally:
        for conn in conns.values():
            conn.close()


async def store_files(uri: str, root: str, data: bytes) -> dict[str, str]:
    import asyncassets

    asyncassets.connect(uri)
    try:
        ids = {}
        for kind, model in bench_models(root).items():
            doc = model()
            await doc.file.put(data, content_type="application/octet-stream", filename="bench.bin")
            await doc.save()
            ids[kind] = str(doc.pk)
        return ids
    finally:
        await asyncassets.disconnect()


def run_probe(port: int) -> dict[str, float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("GET", "/probe")
        found: dict[str, float] = json.loads(conn.getresponse().read())
        return found
    finally:
        conn.close()


def signed_path(port: int) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", "/signed-url")
        return conn.getresponse().read().decode()
    finally:
        conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--whole-requests", type=int, default=3)
    parser.add_argument("--ranged-requests", type=int, default=200)
    parser.add_argument("--http", default="h11", choices=["h11", "httptools"])
    parser.add_argument("--out", default=None, help="JSON output path")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--uri", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--ids", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args)
        return

    import asyncio

    size = args.size_mib * MiB
    data = os.urandom(size)
    rng = random.Random(1)
    load_before = loadavg()
    with (
        tempfile.TemporaryDirectory() as root,
        embedded_server(None, os.path.join(root, "db")) as server,
    ):
        uri = server.uri + "bench_serving"
        path = os.path.join(root, "bench.bin")
        with open(path, "wb") as f:
            f.write(data)
        ids = asyncio.run(store_files(uri, root, data))
        rounds: list[dict[str, Any]] = []
        with server_process(uri, path, ids, args.http) as port:
            paths = {kind: f"/{kind}" for kind in CONTENDERS}
            paths["signed"] = signed_path(port)
            log(f"serving {args.size_mib} MiB on 127.0.0.1:{port} ({args.http})")
            for n in range(args.rounds):
                shift = n % len(CONTENDERS)
                order = CONTENDERS[shift:] + CONTENDERS[:shift]
                results = measure_round(
                    port, paths, order, size, args.whole_requests, args.ranged_requests, rng
                )
                results["probe"] = run_probe(port)
                rounds.append(results)
                log(
                    f"  round {n + 1}: "
                    + ", ".join(
                        f"{k} {r['whole']['mb_s']:.0f} MB/s {r['ranged']['requests_s']:.0f} req/s"
                        for k, r in results.items()
                        if k != "probe"
                    )
                    + f"; probe {results['probe']}"
                )

    def med(kind: str, section: str, key: str) -> float:
        return median([r[kind][section][key] for r in rounds])

    def ratio(kind: str, section: str) -> float:
        key = "mb_s" if section == "whole" else "requests_s"
        return median([r[kind][section][key] / r["starlette"][section][key] for r in rounds])

    def all_ttfb(kind: str) -> float:
        return median([t for r in rounds for t in r[kind]["ranged"]["all"]])

    rows = []
    for kind in CONTENDERS:
        rows.append(
            [
                kind,
                med(kind, "whole", "mb_s"),
                ratio(kind, "whole"),
                med(kind, "whole", "ttfb_ms"),
                med(kind, "ranged", "requests_s"),
                ratio(kind, "ranged"),
                all_ttfb(kind),
            ]
        )
    print(
        fmt_table(
            [
                "served by",
                "whole MB/s",
                "x starlette",
                "whole TTFB ms",
                "64 KiB req/s",
                "x starlette",
                "range TTFB ms",
            ],
            rows,
        )
    )
    lookup_ms = median([r["probe"]["lookup_ms"] for r in rounds])
    raw_gridfs = median(
        [r["probe"]["raw_gridfs_mb_s"] / r["starlette"]["whole"]["mb_s"] for r in rounds]
    )
    print(
        f"probe (in the server, no HTTP): one catalogue lookup {lookup_ms:.2f} ms; "
        f"PyMongo's AsyncGridFSBucket reads the file at {raw_gridfs:.2f}x starlette's "
        "whole-file rate"
    )
    for kind, section, least in TARGETS:
        got = ratio(kind, section)
        verdict = "met" if got >= least else "NOT met"
        print(f"target {kind} {section} >= {least:.1f}x starlette: {got:.2f}x, {verdict}")
    load_after = loadavg()
    log(f"load average before {load_before}, after {load_after}")
    out = (
        Path(args.out)
        if args.out
        else (Path(__file__).resolve().parent / "results" / f"serving-{int(time.time())}.json")
    )
    out.parent.mkdir(exist_ok=True)
    for r in rounds:
        for kind in CONTENDERS:
            r[kind]["ranged"].pop("all")
    out.write_text(
        json.dumps(
            {
                "machine": machine(),
                "load_before": load_before,
                "load_after": load_after,
                "size_mib": args.size_mib,
                "rounds": rounds,
                "ranged_requests": args.ranged_requests,
                "http": args.http,
                "table": rows,
            },
            indent=1,
        )
    )
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
