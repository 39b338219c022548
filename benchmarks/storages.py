"""Each storage against its raw client, in one run: put, read, ranged read, memory.

    python benchmarks/storages.py                  # 64 MiB, 7 alternating rounds
    python benchmarks/storages.py --size-mib 16 --rounds 3 --only filesystem

``filesystem``
    asyncassets ``put()``/``read()``/``stream()`` on a :class:`FileSystemStorage`
    against the raw way to do the same from asyncio: the file written in 1 MiB
    pieces from a thread (``asyncio.to_thread``, as aiofiles does), with the same
    durability (temp file, ``fsync``, rename), and read back in 1 MiB pieces the
    same way. asyncassets also inserts the catalogue entry in MongoDB (an on-disk
    SecantusDB), which the raw writer does not.
``s3``
    asyncassets on an :class:`S3Storage` against the S3 client it uses, called by
    hand with the same part size, on the same S3 server (moto, on loopback).

Ratios are raw time / asyncassets time (above 1: asyncassets is faster), the
median of the rounds, with the lowest and highest single-round ratio. Contenders
alternate round by round. Memory: the peak growth of this process's resident
set while each contender streams ``--memory-mib`` through.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import (
    MiB,
    RssSampler,
    Timer,
    embedded_server,
    fmt_table,
    log,
    machine,
    median,
)

import asyncassets
from asyncassets import Document
from asyncassets.fields import FileField
from asyncassets.storage import FileSystemStorage, S3Storage

PIECE = MiB


def payload(size: int) -> bytes:
    block = hashlib.sha256(b"storages").digest() * (MiB // 32)
    return (block * (size // len(block) + 1))[:size]


async def pieces_of(data: bytes, piece: int = PIECE):  # type: ignore[no-untyped-def]
    view = memoryview(data)
    for i in range(0, len(data), piece):
        yield view[i : i + piece]


def sha_off_put(doc_class: Any, data: bytes) -> Callable[[], AsyncIterator[None]]:
    """Not a contender: asyncassets's put with the SHA-256 switched off, to show
    what recording the checksum costs."""
    from asyncassets.storage.objects import store

    async def probe_put() -> AsyncIterator[None]:
        hashing = store.ObjectUpload._hash_and_write

        async def write_only(self: Any, writer: Any, piece: Any) -> None:
            await writer.write(piece)

        d = await doc_class().save()
        store.ObjectUpload._hash_and_write = write_only  # type: ignore[method-assign]
        try:
            yield
            await d.f.put(pieces_of(data))
            yield
        finally:
            store.ObjectUpload._hash_and_write = hashing  # type: ignore[method-assign]
        await d.f.delete()

    return probe_put


# -- raw contenders ------------------------------------------------------------------


def _raw_fs_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.part")
    with open(tmp, "wb") as f:
        for i in range(0, len(data), PIECE):
            f.write(data[i : i + PIECE])
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def raw_fs_put(root: Path, data: bytes) -> Path:
    path = root / "raw" / f"{uuid.uuid4().hex}.bin"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    f = await asyncio.to_thread(open, tmp, "wb")
    try:
        for i in range(0, len(data), PIECE):
            await asyncio.to_thread(f.write, data[i : i + PIECE])
        await asyncio.to_thread(f.flush)
        await asyncio.to_thread(os.fsync, f.fileno())
    finally:
        await asyncio.to_thread(f.close)
    await asyncio.to_thread(os.replace, tmp, path)
    return path


async def raw_fs_read(
    path: Path, start: int = 0, end: int | None = None, *, keep: bool = False
) -> int:
    """Read ``[start, end)`` in 1 MiB pieces from a thread; join them if ``keep``."""
    f = await asyncio.to_thread(open, path, "rb")
    total = 0
    pieces = []
    try:
        await asyncio.to_thread(f.seek, start)
        size = (await asyncio.to_thread(os.fstat, f.fileno())).st_size
        left = (size if end is None else end) - start
        while left > 0:
            piece = await asyncio.to_thread(f.read, min(PIECE, left))
            if not piece:
                break
            if keep:
                pieces.append(piece)
            total += len(piece)
            left -= len(piece)
    finally:
        await asyncio.to_thread(f.close)
    if keep:
        return len(b"".join(pieces))
    return total


class RawS3:
    """The raw contender: aiobotocore called by hand, as an application would."""

    name = "aiobotocore"

    def __init__(self, endpoint: str, region: str, key_id: str, secret: str) -> None:
        self._args = {
            "endpoint_url": endpoint,
            "region_name": region,
            "aws_access_key_id": key_id,
            "aws_secret_access_key": secret,
        }
        self._stack: Any = None
        self.client: Any = None

    async def __aenter__(self) -> RawS3:
        import contextlib

        from aiobotocore.session import get_session

        self._stack = contextlib.AsyncExitStack()
        self.client = await self._stack.enter_async_context(
            get_session().create_client("s3", **self._args)
        )
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self._stack.aclose()

    async def put(self, bucket: str, key: str, data: bytes, part: int) -> None:
        c = self.client
        if len(data) <= part:
            await c.put_object(Bucket=bucket, Key=key, Body=data)
            return
        up = await c.create_multipart_upload(Bucket=bucket, Key=key)
        parts = []
        for n, i in enumerate(range(0, len(data), part), start=1):
            r = await c.upload_part(
                Bucket=bucket, Key=key, UploadId=up["UploadId"], PartNumber=n,
                Body=data[i : i + part],
            )
            parts.append({"PartNumber": n, "ETag": r["ETag"]})
        await c.complete_multipart_upload(
            Bucket=bucket, Key=key, UploadId=up["UploadId"],
            MultipartUpload={"Parts": parts},
        )

    async def get(self, bucket: str, key: str, start: int, end: int) -> int:
        r = await self.client.get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}")
        n = 0
        async with r["Body"] as body:
            async for piece in body.iter_chunks(PIECE):
                n += len(piece)
        return n


# -- the run ---------------------------------------------------------------------------


async def _rounds(contenders: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[float]]:
    """Time each contender once per round, in an order that rotates.

    A contender is a coroutine function (all of it is timed) or an async generator
    function that yields twice: the code before the first ``yield`` prepares
    (a document to put into), the code between the two is timed, the code after
    the second cleans up (deleting what the round stored), untimed.
    """
    times: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            fn = contenders[name]
            if inspect.isasyncgenfunction(fn):
                steps = fn()
                await anext(steps)
                with Timer() as t:
                    await anext(steps)
                async for _ in steps:
                    pass
            else:
                with Timer() as t:
                    await fn()
            times[name].append(t.seconds)
    return times


def _ratio_row(op: str, raw: list[float], ours: list[float], size: int) -> list[Any]:
    ratios = [r / o for r, o in zip(raw, ours, strict=True)]
    mb = size / MiB
    return [
        op,
        mb / median(raw) if size else median(raw) * 1000,
        mb / median(ours) if size else median(ours) * 1000,
        median([r / o for r, o in zip(raw, ours, strict=True)]),
        min(ratios),
        max(ratios),
    ]


async def bench_filesystem(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    size = args.size_mib * MiB
    data = payload(size)
    storage = FileSystemStorage(root / "aa", collection_name="bench_fs")
    Doc = type(
        "BenchFsDoc",
        (Document,),
        {"f": FileField(storage=storage), "meta": {"collection": "bench_fs_docs"}},
    )
    doc = await Doc().save()
    raw_path = await raw_fs_put(root, data)
    await doc.f.put(pieces_of(data))

    async def ours_put() -> AsyncIterator[None]:
        d = await Doc().save()
        yield  # timed: the upload, its catalogue entry and the document's reference
        await d.f.put(pieces_of(data))
        yield
        await d.f.delete()

    async def raw_put() -> AsyncIterator[None]:
        yield
        p = await raw_fs_put(root, data)
        yield
        await asyncio.to_thread(os.unlink, p)

    probe_put = sha_off_put(Doc, data)

    async def ours_read() -> None:
        assert len(await doc.f.read()) == size

    async def raw_read() -> None:
        assert await raw_fs_read(raw_path, keep=True) == size

    async def raw_stream() -> None:
        assert await raw_fs_read(raw_path) == size

    async def ours_stream() -> None:
        n = 0
        async for piece in doc.f.stream():
            n += len(piece)
        assert n == size

    mid = size // 2

    async def ours_ranged() -> None:
        assert len(b"".join([p async for p in doc.f.stream(mid, mid + 1024)])) == 1024

    async def raw_ranged() -> None:
        assert await raw_fs_read(raw_path, mid, mid + 1024) == 1024

    log("filesystem put, and put with the SHA-256 off (probe)...")
    times = await _rounds(
        {"asyncassets": ours_put, "raw": raw_put, "probe": probe_put}, args.rounds
    )
    rows = [
        _ratio_row("put", times["raw"], times["asyncassets"], size),
        _ratio_row("put, SHA-256 off (probe)", times["raw"], times["probe"], size),
    ]
    raw_times = {"put": times}
    for op, ours, raw, sz in (
        ("read", ours_read, raw_read, size),
        ("stream", ours_stream, raw_stream, size),
        ("ranged 1 KiB", ours_ranged, raw_ranged, 0),
    ):
        log(f"filesystem {op}...")
        times = await _rounds({"asyncassets": ours, "raw": raw}, args.rounds)
        raw_times[op] = times
        rows.append(_ratio_row(op, times["raw"], times["asyncassets"], sz))
    return {"rows": rows, "times": raw_times}


async def bench_s3(args: argparse.Namespace, endpoint: str) -> dict[str, Any]:
    size = args.size_mib * MiB
    part = args.part_mib * MiB
    data = payload(size)
    bucket = f"bench-{uuid.uuid4().hex[:12]}"
    async with RawS3(endpoint, "us-east-1", "testing", "testing") as raw:
        await raw.client.create_bucket(Bucket=bucket)
        storage = S3Storage(
            bucket,
            endpoint_url=endpoint,
            region="us-east-1",
            access_key_id="testing",
            secret_access_key="testing",
            collection_name="bench_s3",
            part_size=part,
        )
        Doc = type(
            "BenchS3Doc",
            (Document,),
            {"f": FileField(storage=storage), "meta": {"collection": "bench_s3_docs"}},
        )
        doc = await Doc().save()
        await doc.f.put(pieces_of(data))
        await raw.put(bucket, "raw/fixed.bin", data, part)

        async def ours_put() -> AsyncIterator[None]:
            d = await Doc().save()
            yield
            await d.f.put(pieces_of(data))
            yield
            await d.f.delete()

        async def raw_put() -> AsyncIterator[None]:
            key = f"raw/{uuid.uuid4().hex}.bin"
            yield
            await raw.put(bucket, key, data, part)
            yield
            await raw.client.delete_object(Bucket=bucket, Key=key)

        async def ours_stream() -> None:
            n = 0
            async for piece in doc.f.stream():
                n += len(piece)
            assert n == size

        async def raw_stream() -> None:
            assert await raw.get(bucket, "raw/fixed.bin", 0, size) == size

        mid = size // 2

        async def ours_ranged() -> None:
            assert len(b"".join([p async for p in doc.f.stream(mid, mid + 1024)])) == 1024

        async def raw_ranged() -> None:
            assert await raw.get(bucket, "raw/fixed.bin", mid, mid + 1024) == 1024

        log("s3 put, and put with the SHA-256 off (probe)...")
        times = await _rounds(
            {"asyncassets": ours_put, "raw": raw_put, "probe": sha_off_put(Doc, data)},
            args.rounds,
        )
        rows = [
            _ratio_row("put", times["raw"], times["asyncassets"], size),
            _ratio_row("put, SHA-256 off (probe)", times["raw"], times["probe"], size),
        ]
        all_times = {"put": times}
        for op, ours, raw_op, sz in (
            ("stream", ours_stream, raw_stream, size),
            ("ranged 1 KiB", ours_ranged, raw_ranged, 0),
        ):
            log(f"s3 {op}...")
            times = await _rounds({"asyncassets": ours, "raw": raw_op}, args.rounds)
            all_times[op] = times
            rows.append(_ratio_row(op, times["raw"], times["asyncassets"], sz))
    return {"rows": rows, "times": all_times, "client": RawS3.name}


async def bench_memory(args: argparse.Namespace, root: Path, endpoint: str | None) -> list[Any]:
    """Peak RSS growth while streaming ``--memory-mib`` in and out."""
    size = args.memory_mib * MiB
    block = payload(PIECE)

    async def source():  # type: ignore[no-untyped-def]
        for _ in range(size // PIECE):
            yield block

    rows = []
    storages: list[tuple[str, Any]] = [
        ("filesystem", FileSystemStorage(root / "mem", collection_name="bench_mem_fs"))
    ]
    if endpoint:
        bucket = f"mem-{uuid.uuid4().hex[:12]}"
        async with RawS3(endpoint, "us-east-1", "testing", "testing") as raw:
            await raw.client.create_bucket(Bucket=bucket)
        storages.append(
            (
                "s3",
                S3Storage(
                    bucket,
                    endpoint_url=endpoint,
                    region="us-east-1",
                    access_key_id="testing",
                    secret_access_key="testing",
                    collection_name="bench_mem_s3",
                    part_size=args.part_mib * MiB,
                ),
            )
        )
    for name, storage in storages:
        Doc = type(
            f"BenchMem{name}",
            (Document,),
            {"f": FileField(storage=storage), "meta": {"collection": f"bench_mem_{name}"}},
        )
        doc = await Doc().save()
        with RssSampler() as up:
            await doc.f.put(source())
        with RssSampler() as down:
            async for _ in doc.f.stream():
                pass
        rows.append([name, args.memory_mib, up.growth / MiB, down.growth / MiB])
        await doc.f.delete()
    return rows


def start_moto() -> tuple[subprocess.Popen[bytes], str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc, endpoint
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto_server did not start")


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"machine": machine(), "args": sorted(vars(args).items())}
    data_dir = tempfile.mkdtemp(prefix="aa-bench-db-")
    moto: list[subprocess.Popen[bytes]] = []
    with embedded_server(args.cache_size, data_dir) as server:
        asyncassets.connect(host=server.uri, db="bench_storages")
        try:
            with tempfile.TemporaryDirectory(prefix="aa-bench-fs-", dir=args.fs_dir) as root:
                if "filesystem" in args.only:
                    out["filesystem"] = await bench_filesystem(args, Path(root))
                endpoint = None
                if "s3" in args.only or "memory" in args.only:
                    proc, endpoint = start_moto()
                    moto.append(proc)
                if "s3" in args.only:
                    assert endpoint is not None
                    out["s3"] = await bench_s3(args, endpoint)
                if "memory" in args.only:
                    out["memory"] = await bench_memory(args, Path(root), endpoint)
        finally:
            await asyncassets.disconnect()
            for proc in moto:
                proc.terminate()
                proc.wait(10)
    return out


def report(out: dict[str, Any]) -> str:
    lines = []
    headers = ["op", "raw MB/s (ms)", "asyncassets MB/s (ms)", "ratio", "min", "max"]
    for name in ("filesystem", "s3"):
        if name in out:
            client = f" (raw: {out[name]['client']})" if out[name].get("client") else ""
            lines += [f"\n{name}{client}", fmt_table(headers, out[name]["rows"])]
    if "memory" in out:
        lines += [
            "\nmemory (peak RSS growth, MiB)",
            fmt_table(["storage", "MiB streamed", "put", "stream"], out["memory"]),
        ]
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size-mib", type=int, default=64)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--part-mib", type=int, default=8)
    p.add_argument("--memory-mib", type=int, default=256)
    p.add_argument("--cache-size", default="1G")
    p.add_argument("--fs-dir", default=None, help="where the filesystem storage writes")
    p.add_argument("--only", default="filesystem,s3,memory")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    args.only = set(args.only.split(","))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    out = asyncio.run(main_async(args))
    args.only = sorted(args.only)
    print(report(out))
    default = Path(__file__).parent / "results" / f"storages-{int(time.time())}.json"
    path = Path(args.json or default)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2, default=str))
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
