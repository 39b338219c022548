"""Resumable (tus) uploads against a plain ``put`` of the same bytes, per storage.

    python benchmarks/uploads.py                       # 64 MiB, 5 rounds, every storage
    python benchmarks/uploads.py --size-mib 16 --rounds 3 --only gridfs

``put``
    ``await doc.file.replace(data)``: one call, the bytes go straight to the storage.
``tus``
    The same bytes through :func:`asyncassets.web.tus_app` in this process (httpx's
    ASGI transport, so the app's work is timed, not a socket's): ``POST``, then
    ``PATCH`` requests of ``--patch-mib`` (8) MiB, the last of which stores the
    file and moves the reference.

Ratio = put time / tus time (1: as fast as a plain put). Memory: the server alone,
``tus_app`` under uvicorn in a process of its own (tests/_tus_server.py), its
resident set sampled every 5 ms while ``--parallel`` (4) clients upload
``--size-mib`` each over loopback in ``--patch-mib`` requests: the peak growth over
its resident set before, divided by the uploads in flight.
Contenders alternate round by round, on an on-disk SecantusDB, a directory and
moto on loopback; the load average before and after is printed with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx
from _harness import MiB, Timer, embedded_server, fmt_table, loadavg, median
from bson import ObjectId
from starlette.applications import Starlette
from starlette.routing import Mount

import asyncassets
from asyncassets import Document
from asyncassets.fields import FileField
from asyncassets.storage import FileSystemStorage, GridFSStorage, S3Storage, Storage
from asyncassets.testing import database_uri
from asyncassets.web import UploadTarget, tus_app

TESTS = Path(__file__).resolve().parents[1] / "tests"


def payload(size: int) -> bytes:
    block = hashlib.sha256(b"uploads").digest() * (MiB // 32)
    return (block * (size // len(block) + 1))[:size]


def storage_of(kind: str, root: Path, endpoint: str | None) -> Storage:
    if kind == "gridfs":
        return GridFSStorage("bench_tus_gridfs")
    if kind == "filesystem":
        return FileSystemStorage(root / "files", collection_name="bench_tus_fs")
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                 aws_access_key_id="k", aws_secret_access_key="s").create_bucket(
        Bucket="bench-tus")
    return S3Storage("bench-tus", endpoint_url=endpoint, region="us-east-1",
                     access_key_id="k", secret_access_key="s",
                     collection_name="bench_tus_s3")


async def tus_upload(http: httpx.AsyncClient, doc: Any, data: bytes, patch: int) -> None:
    created = await http.post("/uploads/", headers={"Upload-Length": str(len(data)),
                                                    "X-Doc": str(doc.pk)})
    assert created.status_code == 201, created.text
    location = created.headers["location"]
    view = memoryview(data)
    for offset in range(0, len(data), patch):
        answer = await http.patch(location, content=bytes(view[offset:offset + patch]),
                                  headers={"Upload-Offset": str(offset),
                                           "Content-Type": "application/offset+octet-stream"})
        assert answer.status_code == 204, answer.text


async def bench(kind: str, args: argparse.Namespace, root: Path,
                endpoint: str | None) -> dict[str, Any]:
    size = args.size_mib * MiB
    data = payload(size)
    storage = storage_of(kind, root, endpoint)
    doc_cls: Any = type(f"BenchTus{kind}", (Document,), {
        "file": FileField(storage=storage), "meta": {"collection": f"bench_tus_{kind}"}})

    async def authorize(request: Any, upload: Any) -> Any:
        if upload.id is None:
            return UploadTarget(await doc_cls.objects(pk=request.headers["x-doc"]).get(),
                                "file")
        return True

    app = Starlette(routes=[Mount("/uploads", tus_app(authorize))])
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                             base_url="http://bench", headers={"Tus-Resumable": "1.0.0"},
                             timeout=600)
    times: dict[str, list[float]] = {"put": [], "tus": []}
    for r in range(args.rounds):
        for name in (("put", "tus") if r % 2 == 0 else ("tus", "put")):
            doc = doc_cls()
            await doc.save()
            with Timer() as t:
                if name == "put":
                    await doc.file.replace(data)
                else:
                    await tus_upload(http, doc, data, args.patch_mib * MiB)
            times[name].append(t.seconds)
            stored = await doc_cls.objects(pk=doc.pk).get()
            assert (await stored.file.read())[-100:] == data[-100:]
            await stored.delete()
    ratios = [p / t for p, t in zip(times["put"], times["tus"], strict=True)]
    await http.aclose()
    rss_per_upload = await server_memory(kind, args, data, root, endpoint)
    mb = size / MiB
    return {
        "put_mb_s": mb / median(times["put"]),
        "tus_mb_s": mb / median(times["tus"]),
        "ratio": median(ratios),
        "min": min(ratios),
        "max": max(ratios),
        "rss_per_upload_mib": rss_per_upload,
        "times": times,
    }


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def server_memory(kind: str, args: argparse.Namespace, data: bytes, root: Path,
                        endpoint: str | None) -> float:
    """MiB of the tus server's resident set per upload in flight (see the module doc)."""
    from asyncassets.connection import get_db

    db = get_db()
    env = dict(os.environ)
    where = ""
    if kind == "filesystem":
        where = str(root / "server-files")
    elif kind == "s3":
        where = f"{endpoint}|bench-tus"
        env.update(AWS_ACCESS_KEY_ID="k", AWS_SECRET_ACCESS_KEY="s")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    uri = database_uri(args.server_uri, db.name)
    server = await asyncio.create_subprocess_exec(
        sys.executable, str(TESTS / "_tus_server.py"), str(port), uri, kind, where, env=env)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "the tus server did not start"
                await asyncio.sleep(0.05)
        ids = [ObjectId() for _ in range(args.parallel)]
        await db["tus_fault_docs"].insert_many([{"_id": i} for i in ids])
        http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600,
                                 headers={"Tus-Resumable": "1.0.0"})
        # One upload first: the server's imports, pools and caches are warm.
        await remote_upload(http, ObjectId(), db, data[: 9 * MiB], args.patch_mib * MiB)
        before = peak = _rss(server.pid)
        done = asyncio.Event()

        async def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, _rss(server.pid))
                await asyncio.sleep(0.005)

        sampler = asyncio.ensure_future(sample())
        await asyncio.gather(*(remote_upload(http, i, db, data, args.patch_mib * MiB,
                                             created=True) for i in ids))
        done.set()
        await sampler
        await http.aclose()
        return (peak - before) / MiB / args.parallel
    finally:
        server.terminate()
        await server.wait()


async def remote_upload(http: httpx.AsyncClient, pk: ObjectId, db: Any, data: bytes,
                        patch: int, created: bool = False) -> None:
    if not created:
        await db["tus_fault_docs"].insert_one({"_id": pk})
    meta = "doc " + base64.b64encode(str(pk).encode()).decode()
    made = await http.post("/uploads/", headers={"Upload-Length": str(len(data)),
                                                 "Upload-Metadata": meta})
    assert made.status_code == 201, made.text
    location = made.headers["location"]
    view = memoryview(data)

    async def body(offset: int) -> Any:
        # 256 KiB pieces, as a browser's or tuspy's body reaches the socket.
        for start in range(offset, min(offset + patch, len(data)), 256 * 1024):
            yield bytes(view[start:min(start + 256 * 1024, offset + patch, len(data))])

    for offset in range(0, len(data), patch):
        answer = await http.patch(location, content=body(offset), headers={
            "Upload-Offset": str(offset), "Content-Type": "application/offset+octet-stream",
            "Content-Length": str(min(patch, len(data) - offset))})
        assert answer.status_code == 204, answer.text


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"load_before": loadavg(), "args": sorted(vars(args).items())}
    data_dir = tempfile.mkdtemp(prefix="aa-bench-tus-db-")
    moto = None
    with embedded_server(args.cache_size, data_dir) as server:
        args.server_uri = server.uri
        asyncassets.connect(host=server.uri, db="bench_uploads")
        try:
            with tempfile.TemporaryDirectory(prefix="aa-bench-tus-fs-") as root:
                endpoint = None
                if "s3" in args.only:
                    from storages import start_moto

                    moto, endpoint = start_moto()
                for kind in ("gridfs", "filesystem", "s3"):
                    if kind in args.only:
                        out[kind] = await bench(kind, args, Path(root), endpoint)
        finally:
            await asyncassets.disconnect()
            if moto is not None:
                moto.terminate()
                moto.wait(10)
    out["load_after"] = loadavg()
    return out


def report(out: dict[str, Any]) -> str:
    rows = [[kind, out[kind]["put_mb_s"], out[kind]["tus_mb_s"], out[kind]["ratio"],
             out[kind]["min"], out[kind]["max"], out[kind]["rss_per_upload_mib"]]
            for kind in ("gridfs", "filesystem", "s3") if kind in out]
    table = fmt_table(["storage", "put MB/s", "tus MB/s", "ratio", "min", "max",
                       "MiB/upload"], rows)
    return f"{table}\nload before: {out['load_before']}\nload after: {out['load_after']}"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size-mib", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--patch-mib", type=int, default=8)
    p.add_argument("--parallel", type=int, default=4)
    p.add_argument("--cache-size", default="1G")
    p.add_argument("--only", default="gridfs,filesystem,s3")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    args.only = set(args.only.split(","))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    out = asyncio.run(main_async(args))
    args.only = sorted(args.only)
    out["args"] = sorted((k, str(v)) for k, v in vars(args).items())
    print(report(out))
    default = Path(__file__).parent / "results" / f"uploads-{int(time.time())}.json"
    path = Path(args.json or default)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
