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

Ratio = put time / tus time (1: as fast as a plain put). Memory: the peak growth of
this process's resident set while ``--parallel`` (4) tus uploads of ``--size-mib``
run at once, divided by that number: the server's memory per upload in flight.
Contenders alternate round by round, on an on-disk SecantusDB, a directory and
moto on loopback; the load average before and after is printed with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx
from _harness import MiB, RssSampler, Timer, embedded_server, fmt_table, loadavg, median
from starlette.applications import Starlette
from starlette.routing import Mount

import asyncassets
from asyncassets import Document
from asyncassets.fields import FileField
from asyncassets.storage import FileSystemStorage, GridFSStorage, S3Storage, Storage
from asyncassets.web import UploadTarget, tus_app


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
    docs = [doc_cls() for _ in range(args.parallel)]
    for doc in docs:
        await doc.save()
    with RssSampler() as rss:
        await asyncio.gather(*(tus_upload(http, d, data, args.patch_mib * MiB)
                               for d in docs))
    for doc in docs:
        await (await doc_cls.objects(pk=doc.pk).get()).delete()
    await http.aclose()
    mb = size / MiB
    return {
        "put_mb_s": mb / median(times["put"]),
        "tus_mb_s": mb / median(times["tus"]),
        "ratio": median(ratios),
        "min": min(ratios),
        "max": max(ratios),
        "rss_per_upload_mib": (rss.peak - rss.start_rss) / MiB / args.parallel,
        "times": times,
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"load_before": loadavg(), "args": sorted(vars(args).items())}
    data_dir = tempfile.mkdtemp(prefix="aa-bench-tus-db-")
    moto = None
    with embedded_server(args.cache_size, data_dir) as server:
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
    print(report(out))
    default = Path(__file__).parent / "results" / f"uploads-{int(time.time())}.json"
    path = Path(args.json or default)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
