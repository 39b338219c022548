"""FileResponse against Starlette's FileResponse, through uvicorn on loopback.

    python benchmarks/serving.py                     # 32 MiB file, 7 rounds
    python benchmarks/serving.py --size-mib 8 --rounds 3

The same bytes are served three ways by one uvicorn process (a subprocess, on a
free 127.0.0.1 port, one worker, ``--http h11`` unless ``--http`` says otherwise):

``starlette``
    ``starlette.responses.FileResponse`` of a file on the local disk: the baseline,
    which needs no database.
``filesystem``
    ``asyncassets.web.FileResponse`` of a ``FileSystemStorage`` field: one catalogue
    lookup in MongoDB (an in-memory SecantusDB started here), then the bytes from
    the same disk.
``gridfs``
    ``asyncassets.web.FileResponse`` of a GridFS field: the bytes from MongoDB.

This process is the client (``http.client``, one keep-alive connection per
contender), so client and server do not share an interpreter. Each round runs
every contender in turn, in a rotating order, and measures:

* **whole**: GET of the whole file: throughput (MB/s) and time to first byte;
* **ranged**: ``--ranged-requests`` GETs of 64 KiB at random offsets: requests
  per second and time to first byte.

Figures are medians over rounds (time to first byte: the median of every request);
the JSON written to ``benchmarks/results/`` keeps every round and the machine's load.
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

CONTENDERS = ("starlette", "filesystem", "gridfs")
RANGE_SIZE = 64 * 1024


# -- the server (a subprocess) ------------------------------------------------------


def make_app(uri: str, path: str, ids: dict[str, str]) -> Any:
    """The benchmark's ASGI app: one route per contender."""
    from bson import ObjectId
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import FileResponse as StarletteFileResponse
    from starlette.responses import Response
    from starlette.routing import Route

    import asyncassets
    from asyncassets.web import FileResponse

    models = bench_models(os.path.dirname(path))

    async def starlette(request: Request) -> Response:
        return StarletteFileResponse(path, media_type="application/octet-stream")

    def served(kind: str) -> Any:
        model = models[kind]
        pk = ObjectId(ids[kind])

        async def endpoint(request: Request) -> Response:
            doc = await model.objects.get(pk=pk)
            return FileResponse(doc.file, request)

        return endpoint

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        asyncassets.connect(uri)
        yield
        await asyncassets.disconnect()

    routes = [Route("/starlette", starlette)]
    routes += [Route(f"/{kind}", served(kind)) for kind in ("filesystem", "gridfs")]
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

    return {"filesystem": ServedOnDisk, "gridfs": ServedFromGridFS}


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


def measure(port: int, kind: str, size: int, ranged: int, rng: random.Random) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        get(conn, f"/{kind}", {"range": "bytes=0-0"})  # warm the connection
        status, ttfb, total, got = get(conn, f"/{kind}", {})
        assert (status, got) == (200, size), (kind, status, got)
        whole = {"mb_s": size / total / 1e6, "ttfb_ms": ttfb * 1000, "seconds": total}
        ttfbs = []
        started = time.perf_counter()
        for _ in range(ranged):
            offset = rng.randrange(0, size - RANGE_SIZE)
            header = {"range": f"bytes={offset}-{offset + RANGE_SIZE - 1}"}
            status, ttfb, _total, got = get(conn, f"/{kind}", header)
            assert (status, got) == (206, RANGE_SIZE), (kind, status, got)
            ttfbs.append(ttfb * 1000)
        elapsed = time.perf_counter() - started
        return {
            "whole": whole,
            "ranged": {"requests_s": ranged / elapsed, "ttfb_ms": median(ttfbs), "all": ttfbs},
        }
    finally:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7)
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
    with tempfile.TemporaryDirectory() as root, embedded_server(None) as server:
        uri = server.uri + "bench_serving"
        path = os.path.join(root, "bench.bin")
        with open(path, "wb") as f:
            f.write(data)
        ids = asyncio.run(store_files(uri, root, data))
        rounds: list[dict[str, Any]] = []
        with server_process(uri, path, ids, args.http) as port:
            log(f"serving {args.size_mib} MiB on 127.0.0.1:{port} ({args.http}); load {loadavg()}")
            for n in range(args.rounds):
                order = CONTENDERS[n % 3 :] + CONTENDERS[: n % 3]
                results = {
                    kind: measure(port, kind, size, args.ranged_requests, rng) for kind in order
                }
                rounds.append(results)
                log(
                    f"  round {n + 1}: "
                    + ", ".join(
                        f"{k} {r['whole']['mb_s']:.0f} MB/s {r['ranged']['requests_s']:.0f} req/s"
                        for k, r in results.items()
                    )
                )

    def med(kind: str, section: str, key: str) -> float:
        return median([r[kind][section][key] for r in rounds])

    def all_ttfb(kind: str) -> float:
        return median([t for r in rounds for t in r[kind]["ranged"]["all"]])

    rows = []
    for kind in CONTENDERS:
        rows.append(
            [
                kind,
                med(kind, "whole", "mb_s"),
                med(kind, "whole", "ttfb_ms"),
                med(kind, "ranged", "requests_s"),
                all_ttfb(kind),
            ]
        )
    print(
        fmt_table(
            ["served by", "whole MB/s", "whole TTFB ms", "64 KiB ranges req/s", "range TTFB ms"],
            rows,
        )
    )
    out = (
        Path(args.out)
        if args.out
        else (Path(__file__).resolve().parent / "results" / f"serving-{int(time.time())}.json")
    )
    out.parent.mkdir(exist_ok=True)
    for r in rounds:
        for kind in r:
            r[kind]["ranged"].pop("all")
    out.write_text(
        json.dumps(
            {
                "machine": machine(),
                "load_after": loadavg(),
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
