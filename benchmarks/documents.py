"""The document layer: asyncassets against raw PyMongo and sync mongoengine.

Three worker processes (``documents_worker.py``), one per contender, each with its
own client on the same server: asyncassets (``Document``, ``QuerySet``), raw
PyMongo (``AsyncMongoClient``, dicts) and mongoengine 0.29 (sync, on sync PyMongo).
Only one of them works at a time: for every round and case the parent asks each in
turn, in an order that rotates round by round, and keeps every time. Results are
medians and the ratios ``other time / asyncassets time`` (above 1: asyncassets is
faster), with the spread of the per-round ratios.

Reads use collections seeded once by this process (three fields; with a
``FileField`` id; with a list, an embedded document and a list of three embedded
documents), 1,000 and 10,000 documents. Writes go to collections of each contender's
own. At the end the asyncassets and mongoengine workers profile the 10,000-document
loads (cProfile), to show where the time goes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from _harness import Progress, median

WORKER = Path(__file__).resolve().parent / "documents_worker.py"
CONTENDERS = ("asyncassets", "raw", "mongoengine")


def read_cases(sizes: list[int], calls: int) -> list[dict[str, Any]]:
    cases = []
    for n in sizes:
        cases += [
            {"case": f"to_list(), {n:,} docs", "op": "load:to_list", "coll": f"plain_{n}", "n": n},
            {"case": f"async for, {n:,} docs", "op": "load:iterate", "coll": f"plain_{n}", "n": n},
            {"case": f"only('name'), {n:,} docs", "op": "load:only", "coll": f"plain_{n}", "n": n},
            {
                "case": f"to_list(), FileField, {n:,} docs",
                "op": "load:to_list",
                "coll": f"files_{n}",
                "n": n,
            },
            {
                "case": f"to_list().no_files(), FileField, {n:,} docs",
                "op": "load:to_list_no_files",
                "coll": f"files_{n}",
                "n": n,
            },
            {
                # Issue 24: what ported mongoengine code does with a listing.
                "case": f"to_list() + each file's content type, {n:,} docs",
                "op": "load:content_types",
                "coll": f"files_{n}",
                "n": n,
            },
            {
                "case": f"to_list(), embedded + lists, {n:,} docs",
                "op": "load:to_list",
                "coll": f"nested_{n}",
                "n": n,
            },
        ]
    big = max(sizes)
    cases += [
        {
            "case": f"first(), {calls} calls",
            "op": "load:first",
            "coll": f"plain_{big}",
            "n": big,
            "calls": calls,
        },
        {
            "case": f"get(pk=...), {calls} calls",
            "op": "load:get",
            "coll": f"plain_{big}",
            "n": big,
            "calls": calls,
        },
    ]
    return cases


def write_cases(n: int, bulk: int) -> list[dict[str, Any]]:
    """In this order, per contender and round (each step uses what the last left)."""
    cases = []
    for kind in ("plain", "nested"):
        coll = f"{kind}_{n}"
        label = "" if kind == "plain" else ", embedded + lists"
        cases += [
            {
                "case": f"save() new{label}, {n:,} docs",
                "op": "write:save_new",
                "coll": coll,
                "n": n,
            },
            {
                "case": f"save() changed{label}, {n:,} docs",
                "op": "write:save_changed",
                "coll": coll,
                "n": n,
            },
        ]
    cases += [
        {
            "case": f"doc.update(inc__n=1), {n:,} docs",
            "op": "write:update",
            "coll": f"plain_{n}",
            "n": n,
        },
        {"case": f"doc.delete(), {n:,} docs", "op": "write:delete", "coll": f"plain_{n}", "n": n},
        {
            "case": f"bulk insert, {bulk:,} docs",
            "op": "write:bulk_insert",
            "coll": f"bulk_plain_{bulk}",
            "n": bulk,
        },
    ]
    return cases


def select(cases: list[dict[str, Any]], only: list[str] | None) -> list[dict[str, Any]]:
    """The cases whose label contains one of ``only`` (every case when none given)."""
    if not only:
        return cases
    return [c for c in cases if any(part in c["case"] for part in only)]


def seed(uri: str, db: str, sizes: list[int]) -> None:
    """The read collections, written once with sync PyMongo.

    The ``FileField`` documents reference catalogue entries that exist (in
    ``fs.files``, as GridFS writes them, without bytes): loading them costs what
    it costs with real files, and their content types can be read.
    """
    import pymongo
    from bson import ObjectId
    from documents_worker import _nested_extra, _plain_son

    client: Any = pymongo.MongoClient(uri)
    try:
        client[db]["fs.files"].drop()
        for n in sizes:
            for kind in ("plain", "files", "nested"):
                coll = client[db][f"{kind}_{n}"]
                coll.drop()
                sons, entries = [], []
                for i in range(n):
                    son = _plain_son(i)
                    if kind == "files":
                        son["f"] = ObjectId()
                        entries.append(_entry(son["f"], i))
                    elif kind == "nested":
                        son.update(_nested_extra(i))
                    sons.append(son)
                coll.insert_many(sons)
                if entries:
                    client[db]["fs.files"].insert_many(entries)
                # background=False as mongoengine asks for it, so its ensure_indexes
                # finds the same index rather than a conflicting one.
                coll.create_index("n", background=False)
    finally:
        client.close()


def _entry(file_id: Any, i: int) -> dict[str, Any]:
    """A GridFS files document of an empty file, as GridFS and mongoengine write it
    (top-level ``contentType``), which every contender reads."""
    import datetime as dt

    return {
        "_id": file_id,
        "length": 0,
        "chunkSize": 261120,
        "uploadDate": dt.datetime.now(dt.timezone.utc),
        "filename": f"file-{i}.png",
        "contentType": "image/png",
    }


class Worker:
    def __init__(self, name: str, uri: str, db: str) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), name, uri, db],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        ready = self._read()
        if ready.get("ready") != name:
            raise RuntimeError(f"worker {name} did not start: {ready}")

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.name} exited (code {self.proc.wait()})")
        result: dict[str, Any] = json.loads(line)
        return result

    def ask(self, cmd: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.ask({"op": "quit"})
            except (RuntimeError, BrokenPipeError, OSError):
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _rounds(
    workers: dict[str, Worker],
    cases: list[dict[str, Any]],
    rounds: int,
    times: dict[str, dict[str, list[float | None]]],
    cpu: dict[str, dict[str, list[float | None]]],
    errors: dict[str, list[str]],
    progress: Progress,
    what: str,
) -> None:
    names = list(workers)
    for r in range(-1, rounds):  # round -1: one untimed warm-up of everything
        order = names[r % len(names) :] + names[: r % len(names)] if r >= 0 else names
        for case in cases:
            for name in order:
                answer = workers[name].ask(case)
                if "error" in answer:
                    errors.setdefault(case["case"], []).append(f"{name}: {answer['error']}")
                    if r >= 0:
                        # A failed round keeps its place, so that rounds stay paired.
                        times[case["case"]][name].append(None)
                        cpu[case["case"]][name].append(None)
                    continue
                if r >= 0:
                    times[case["case"]][name].append(answer["seconds"])
                    cpu[case["case"]][name].append(answer["cpu_seconds"])
        if r >= 0:
            progress(f"  documents {what}: round {r + 1}/{rounds} done")


def _row(
    case: dict[str, Any], t: dict[str, list[float | None]], c: dict[str, list[float | None]]
) -> dict[str, Any]:
    row: dict[str, Any] = {"case": case["case"], "op": case["op"], "n": case["n"]}
    # None marks a round that failed (see errors); medians leave it out.
    med = {name: median([x for x in t[name] if x is not None]) for name in CONTENDERS}
    row["median_s"] = med
    row["rounds_s"] = t
    # The client's own CPU (its process, not the server's), per operation: what a
    # contender costs apart from the server, which sets the wall time of writes.
    ops = case.get("calls") or case["n"]
    cpu_med = {name: median([x for x in c[name] if x is not None]) for name in CONTENDERS}
    row["cpu_median_s"] = cpu_med
    row["cpu_rounds_s"] = c
    row["cpu_us_per_op"] = {name: cpu_med[name] / ops * 1e6 for name in CONTENDERS}
    aa = med["asyncassets"]
    for other in ("raw", "mongoengine"):
        row[f"vs_{other}"] = med[other] / aa if aa else float("nan")
        per_round = [o / a for o, a in zip(t[other], t["asyncassets"], strict=True) if o and a]
        row[f"vs_{other}_range"] = [min(per_round), max(per_round)] if per_round else []
    return row


def run(
    uri: str,
    db: str,
    sizes: list[int],
    rounds: int,
    calls: int,
    write_n: int,
    bulk_n: int,
    profile: bool,
    progress: Progress,
    only: list[str] | None = None,
) -> dict[str, Any]:
    """Seed, then run the read and write cases (those matching ``only``, if given)."""
    progress(f"  documents: seeding {sizes} documents of each kind")
    seed(uri, db, sizes)
    workers = {name: Worker(name, uri, db) for name in CONTENDERS}
    out: dict[str, Any] = {"rows": [], "errors": {}, "profiles": {}}
    try:
        for what, cases in (
            ("reads", select(read_cases(sizes, calls), only)),
            ("writes", select(write_cases(write_n, bulk_n), only)),
        ):
            if not cases:
                continue
            times: dict[str, dict[str, list[float | None]]] = {
                c["case"]: {name: [] for name in CONTENDERS} for c in cases
            }
            cpu: dict[str, dict[str, list[float | None]]] = {
                c["case"]: {name: [] for name in CONTENDERS} for c in cases
            }
            _rounds(workers, cases, rounds, times, cpu, out["errors"], progress, what)
            out["rows"] += [_row(c, times[c["case"]], cpu[c["case"]]) for c in cases]
        if profile and not only:
            big = max(sizes)
            for kind in ("plain", "files", "nested"):
                inner = {"op": "load:to_list", "coll": f"{kind}_{big}", "n": big}
                for name in ("asyncassets", "mongoengine"):
                    answer = workers[name].ask({"op": "profile", "inner": inner, "top": 25})
                    out["profiles"][f"{name} to_list {kind}_{big}"] = answer.get(
                        "profile", answer.get("error")
                    )
    finally:
        for worker in workers.values():
            worker.close()
    return out
