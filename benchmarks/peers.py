"""Peers: mongomotor's FileField and sync mongoengine's FileField (in a thread).

Each peer gets its own virtualenv in a temporary directory (``python -m venv`` and
``pip install``) and runs in its own process, so neither can interfere with the other
or with asyncassets. Rounds alternate: asyncassets in this process, then each peer in
a fresh process, in a rotating order. A peer whose install fails is skipped with the
reason printed.

Then the metadata listing (issue 24): ``--peer-meta`` documents, each referencing
a file, loaded and each file's content type read: asyncassets's documents come
with their catalogue entries (one query per batch); mongomotor asks for each
file's metadata (``await doc.f.get()``), sync mongoengine loads it on attribute
access, one query per document both.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _harness import MiB, Progress, Timer, median
from _models import META_ALIAS, BenchFile, BenchMeta

WORKER = Path(__file__).resolve().parent / "peer_worker.py"

PEERS = {
    # mongomotor breaks on blinker >= 1.8 (its signals use an API blinker removed).
    "mongomotor": ["mongomotor==0.17.3", "blinker<1.8"],
    "mongoengine (sync, in a thread)": ["mongoengine==0.29.3", "pymongo==4.20.0"],
}
KIND = {"mongomotor": "mongomotor", "mongoengine (sync, in a thread)": "mongoengine"}


def _python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")


def install(root: Path, deadline: float, progress: Progress) -> dict[str, Any]:
    """Create (or reuse) one venv per peer; return name -> python path or skip reason."""
    ready: dict[str, Any] = {}
    for name, reqs in PEERS.items():
        venv = root / KIND[name]
        py = _python(venv)
        marker = venv / ".aa-bench-installed"
        if marker.exists() and marker.read_text() == repr(reqs):
            ready[name] = py
            continue
        left = deadline - time.monotonic()
        if left <= 10:
            ready[name] = {"skipped": "peer time budget used up before its install"}
            continue
        progress(f"  peers: installing {' '.join(reqs)} into {venv}")
        try:
            subprocess.run(
                [sys.executable, "-m", "venv", str(venv)],
                check=True,
                capture_output=True,
                text=True,
                timeout=left,
            )
            subprocess.run(
                [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", *reqs],
                check=True,
                capture_output=True,
                text=True,
                timeout=max(5, deadline - time.monotonic()),
            )
        except subprocess.CalledProcessError as exc:
            reason = (exc.stderr or exc.stdout or "").strip().splitlines()[-1:] or [str(exc)]
            ready[name] = {"skipped": f"install failed: {reason[0]}"}
            progress(f"  peers: {name} skipped: install failed: {reason[0]}")
            continue
        except (subprocess.TimeoutExpired, OSError) as exc:
            ready[name] = {"skipped": f"install did not complete: {exc}"}
            progress(f"  peers: {name} skipped: {exc}")
            continue
        marker.write_text(repr(reqs))
        ready[name] = py
    return ready


async def run(
    uri: str,
    db: str,
    size_mib: int,
    rounds: int,
    budget_s: float,
    venv_root: str | None,
    progress: Progress,
    meta_n: int = 1000,
) -> dict[str, Any]:
    deadline = time.monotonic() + budget_s
    temp = None
    if venv_root:
        root = Path(venv_root)
        os.makedirs(root, exist_ok=True)
    else:
        temp = tempfile.mkdtemp(prefix="aa-bench-peers-")
        root = Path(temp)
    try:
        ready = install(root, deadline, progress)
        data = (bytes(range(256)) * (MiB // 256)) * size_mib
        times: dict[str, dict[str, list[float]]] = {"asyncassets": {"put": [], "read": []}}
        skipped: dict[str, str] = {}
        for name, py in ready.items():
            if isinstance(py, dict):
                skipped[name] = py["skipped"]
            else:
                times[name] = {"put": [], "read": []}
        # Warm-up for asyncassets; each peer warms up inside its own worker.
        await _aa_round(data)
        names = list(times)
        for r in range(rounds):
            if time.monotonic() > deadline:
                progress(f"  peers: time budget used up after {r} rounds")
                break
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                if name == "asyncassets":
                    t = await _aa_round(data)
                else:
                    t = _peer_round(
                        ready[name],
                        KIND[name],
                        uri,
                        db,
                        size_mib,
                        max(30.0, deadline - time.monotonic() + 60),
                    )
                    if "error" in t:
                        skipped[name] = t["error"]
                        progress(f"  peers: {name} failed: {t['error']}")
                        continue
                times[name]["put"].append(t["put_s"])
                times[name]["read"].append(t["read_s"])
            progress(f"  peers round {r + 1}/{rounds} done")
        rows = []
        aa = {op: median(times["asyncassets"][op]) for op in ("put", "read")}
        for name, per in times.items():
            if name in skipped or not per["put"]:
                continue
            row = {"contender": name, "rounds": len(per["put"])}
            for op in ("put", "read"):
                med = median(per[op])
                row[f"{op}_median_s"] = med
                row[f"{op}_MBps"] = size_mib / med
                row[f"asyncassets_speedup_{op}"] = med / aa[op]
            rows.append(row)
        out = {"size_mib": size_mib, "rows": rows, "skipped": skipped, "venvs": str(root)}
        if meta_n:
            out["meta"] = await _meta_rounds(
                uri, db, meta_n, rounds, ready, skipped, deadline, progress
            )
        return out
    finally:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)


async def _aa_round(data: bytes) -> dict[str, float]:
    gc.collect()
    doc = BenchFile(name="peer")
    with Timer() as put:
        await doc.f.put(data)
    await doc.save()
    again = await BenchFile.objects.get(pk=doc.pk)
    gc.collect()
    with Timer() as read:
        got = await again.f.read()
    assert got == data
    await again.delete()
    return {"put_s": put.seconds, "read_s": read.seconds}


def _seed_meta(uri: str, db: str, n: int) -> None:
    """``n`` documents in ``peer_meta``, each referencing a GridFS entry of its own
    (an empty file, its files document as GridFS writes it)."""
    import datetime as dt

    import pymongo
    from bson import ObjectId

    client: Any = pymongo.MongoClient(uri)
    try:
        database = client[db]
        database["peer_meta"].drop()
        database["fs.files"].delete_many({"filename": {"$regex": "^meta-"}})
        now = dt.datetime.now(dt.timezone.utc)
        ids = [ObjectId() for _ in range(n)]
        database["fs.files"].insert_many(
            {
                "_id": file_id,
                "length": 0,
                "chunkSize": 261120,
                "uploadDate": now,
                "filename": f"meta-{i}.png",
                "contentType": "image/png",
            }
            for i, file_id in enumerate(ids)
        )
        database["peer_meta"].insert_many({"name": f"m{i}", "f": f} for i, f in enumerate(ids))
    finally:
        client.close()


async def _aa_meta(n: int) -> float:
    gc.collect()
    with Timer() as listing:
        docs = await BenchMeta.objects.to_list()
        types = [doc.f.content_type for doc in docs]
    assert len(types) == n and types[0] == "image/png"
    return listing.seconds


async def _meta_rounds(
    uri: str,
    db: str,
    n: int,
    rounds: int,
    ready: dict[str, Any],
    skipped: dict[str, str],
    deadline: float,
    progress: Progress,
) -> dict[str, Any]:
    import asyncassets

    await asyncio.to_thread(_seed_meta, uri, db, n)
    asyncassets.connect(host=uri, db=db, alias=META_ALIAS)
    try:
        await _aa_meta(n)  # warm-up; each peer warms up in its worker
        times: dict[str, list[float]] = {"asyncassets": []}
        times.update({name: [] for name, py in ready.items() if not isinstance(py, dict)})
        names = [name for name in times if name not in skipped]
        for r in range(rounds):
            if time.monotonic() > deadline:
                progress(f"  peers metadata: time budget used up after {r} rounds")
                break
            for name in names[r % len(names) :] + names[: r % len(names)]:
                if name == "asyncassets":
                    times[name].append(await _aa_meta(n))
                    continue
                t = _peer_round(
                    ready[name], KIND[name], uri, db, 0, max(30.0, deadline - time.monotonic()),
                    meta=n,
                )
                if "error" in t:
                    progress(f"  peers metadata: {name} failed: {t['error']}")
                    continue
                times[name].append(t["meta_s"])
            progress(f"  peers metadata round {r + 1}/{rounds} done")
    finally:
        await asyncassets.disconnect(META_ALIAS)
    aa = median(times["asyncassets"])
    rows = [
        {
            "contender": name,
            "rounds": len(per),
            "median_s": median(per),
            "asyncassets_speedup": median(per) / aa,
            "rounds_s": per,
        }
        for name, per in times.items()
        if per
    ]
    return {"n": n, "rows": rows}


def _peer_round(
    py: Path, kind: str, uri: str, db: str, size_mib: int, timeout: float, meta: int = 0
) -> dict[str, Any]:
    args = ["meta", str(meta)] if meta else [str(size_mib)]
    try:
        proc = subprocess.run(
            [str(py), str(WORKER), kind, uri, db, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"a round took more than {timeout:.0f} s"}
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])
