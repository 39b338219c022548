"""tus with the server SIGKILLed at every I/O call of an upload's life, one per run.

The scenario, on GridFS, a directory and S3 (moto): a document holds an older
file; a client creates an upload (``POST`` with ``Upload-Length``), sends its
first half (``PATCH``) and the rest (``PATCH``: the upload finishes, the
document's reference is switched to it, the old file is deleted). On S3 the
parts are 5 MiB and the file two parts and a bit, the first ``PATCH`` ending in
the second part (its bytes staged); elsewhere the file is small.

A clean run, with the server logging its calls (tests/_tus_server.py,
``TUS_LOG_CALLS``: MongoDB operations, S3 requests, a directory's blocking
calls, counted from the first request), tells how many calls the scenario makes
(K) and what each is. Then, for N in 1..K, before and after the call: a server
that SIGKILLs itself at its Nth call (``TUS_DIE_AT_CALL``, ``TUS_DIE_WHEN``)
serves the scenario until the connection drops; the client resumes on a
healthy server as a tus client does (no answer to the ``POST``: create again;
else ``HEAD`` for the offset, again on 409/423/503 while the dead server's
2-second lease holds the upload, then ``PATCH`` from it; ``HEAD`` attaches a
complete upload before answering its full offset). Then:

* the document holds the new bytes, byte-exact (no kill point here lets the
  upload be refused: nothing else changes the field); never a partial or mixed
  file, never a dangling reference, and the old file is gone only because the
  new one is attached;
* once every session (the uploads' and S3's direct sessions) is past its expiry
  and the sweep ran with grace 0, nothing is left: no session, staged chunk,
  unfinished direct session, pending multipart upload, temp file, unreferenced
  object or chunk, key reservation but the stored file's; ``check(verify=True)``
  is clean (the race suite's final checks, tests/test_races_uploads.py).

The default run takes a few points on GridFS (create, first ``PATCH``, the
finish around its switch); ``-m slow`` every point, before and after, on every
storage. ``-s`` prints the calls and each point's outcome.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import os
import signal
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from _consistency import BucketReader
from test_races_uploads import DEFAULT_TUS, Target, TusRaces
from test_tus_faults import Server, on, storage_for

import asyncassets
from asyncassets import Document
from asyncassets.fields import FileField
from asyncassets.storage.objects.direct import SESSIONS
from asyncassets.storage.objects.reservations import COLLECTION as RESERVATIONS
from asyncassets.testing import database_uri

CATALOGUE = "tusfaults"  # tests/_tus_server.py's
TUS = {"Tus-Resumable": "1.0.0"}
OCTETS = {"Content-Type": "application/offset+octet-stream"}
MiB = 1024 * 1024
PART = 5 * MiB  # TUS_PART_SIZE: S3's smallest part keeps the file small
#: A GridFS chunk id and the sweep's reading of it have one-second resolution:
#: a grace-0 sweep sooner after the kill may find the killed server's chunks recent.
AFTER_KILL = 1.1


def sizes(kind: str) -> tuple[int, int]:
    """The file's length and the first PATCH's."""
    if kind == "s3":
        return 2 * PART + 1000, PART + 300_000  # part 1 sent, 300 KB of part 2 staged
    return 600_000, 300_000


@dataclass
class Call:
    number: int
    kind: str
    what: str
    request: str

    def __str__(self) -> str:
        return f"#{self.number} {self.kind} {self.what} (request {self.request})"


def read_calls(path: Path) -> list[Call]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        number, kind, *what, request = line.split(" ")  # an S3 action has spaces
        out.append(Call(int(number), kind, " ".join(what), request))
    return out


class KillPoints:
    """The scenario against a dying server, the resume, the checks."""

    def __init__(self, kind: str, cls: Any, uri: str, where: str, env: dict[str, str],
                 db: Any, tmp_path: Path, reader: BucketReader | None) -> None:
        self.kind, self.cls, self.uri, self.where = kind, cls, uri, where
        self.env = {**env, **({"TUS_PART_SIZE": str(PART)} if kind == "s3" else {})}
        self.db, self.tmp_path, self.reader = db, tmp_path, reader
        self.length, self.half = sizes(kind)
        self.outcomes: Counter[str] = Counter()
        self.lines: list[str] = []
        self.violations: list[str] = []
        self.healthy = Server(uri, kind, where, self.env)
        self.runs = 0

    async def scenario(self, http: httpx.AsyncClient, server: Server, doc: Any,
                       data: bytes, state: dict[str, Any]) -> None:
        """Create, PATCH half, PATCH the rest; ``state`` says how far it got."""
        meta = "doc " + base64.b64encode(str(doc.pk).encode()).decode()
        meta += ",filename " + base64.b64encode(b"upload.bin").decode()
        created = await http.post(server.url, headers={
            **TUS, "Upload-Length": str(len(data)), "Upload-Metadata": meta})
        assert created.status_code == 201, created.text
        state["location"] = created.headers["location"]
        for start, end in ((0, self.half), (self.half, len(data))):
            answer = await http.patch(state["location"], content=data[start:end], headers={
                **TUS, **OCTETS, "Upload-Offset": str(start)})
            assert answer.status_code == 204, answer.text
            state["offset"] = end

    async def resume(self, http: httpx.AsyncClient, location: str, data: bytes) -> str:
        """As a tus client: HEAD, PATCH from its offset, until complete. The
        outcome: ``finished`` or ``refused <status>``."""
        deadline = time.monotonic() + 60
        while True:
            assert time.monotonic() < deadline, f"no end resuming {location}"
            head = await http.head(location, headers=TUS)
            if head.status_code in (404, 410):
                return f"refused {head.status_code}"
            if head.status_code in (409, 423, 503):
                await asyncio.sleep(0.25)
                continue
            assert head.status_code == 200, (head.status_code, head.text)
            offset = int(head.headers["upload-offset"])
            if offset == len(data):
                return "finished"  # HEAD answers the full offset once it is attached
            answer = await http.patch(location, content=data[offset:], headers={
                **TUS, **OCTETS, "Upload-Offset": str(offset)})
            if answer.status_code == 204 and int(answer.headers["upload-offset"]) == len(data):
                return "finished"
            if answer.status_code in (404, 410, 415):
                return f"refused {answer.status_code}"
            assert answer.status_code in (204, 409, 423, 503), (answer.status_code, answer.text)
            await asyncio.sleep(0.25)

    async def point(self, n: int | None, when: str, calls: list[Call]) -> None:
        """One run: killed at call ``n`` (``None``: the clean run, logging its calls)."""
        self.runs += 1
        log = self.tmp_path / f"calls-{self.kind}-{self.runs}.log"
        env = {**self.env, "TUS_LOG_CALLS": str(log)}
        if n is not None:
            env |= {"TUS_DIE_AT_CALL": str(n), "TUS_DIE_WHEN": when}
        old = os.urandom(50_000)
        data = os.urandom(self.length)
        doc = self.cls()
        await doc.save()
        await doc.file.put(old, filename="old.bin")
        dying = Server(self.uri, self.kind, self.where, env)
        dying.start()
        state: dict[str, Any] = {}
        killed_at = None
        try:
            async with httpx.AsyncClient(timeout=60) as http:
                try:
                    await self.scenario(http, dying, doc, data, state)
                except httpx.TransportError:
                    assert dying.proc is not None
                    assert dying.proc.wait(timeout=10) == -signal.SIGKILL
                    killed_at = time.monotonic()
                if killed_at is None:
                    outcome = "finished" if n is None else "not reached, finished"
                else:
                    assert n is not None, "the clean run lost its server"
                    location = state.get("location")
                    if location is None:
                        await self.scenario(http, self.healthy, doc, data, state)
                        outcome = "recreated, finished"
                    else:
                        outcome = await self.resume(http, on(self.healthy, location), data)
        finally:
            dying.kill()
        seen = read_calls(log)
        if n is None:
            calls[:] = seen
            label = "clean run"
        else:
            last = seen[-1] if seen else None
            expected = calls[n - 1] if n <= len(calls) else None
            label = f"{when:6} {last}" if last is not None else f"{when} #{n} (not logged)"
            if last is None or last.number != n or expected is None or (
                    (last.kind, last.what) != (expected.kind, expected.what)):
                label += f" [the clean run's #{n}: {expected}]"
        if killed_at is not None:  # the old chunks of a replace are a second old at least
            await asyncio.sleep(max(0.0, killed_at + AFTER_KILL - time.monotonic()))
        found = await self.final(doc, old, data, outcome)
        if n is not None:
            self.outcomes[outcome] += 1
        self.lines.append(f"  {label}: {outcome}" + (f"  VIOLATED: {found}" if found else ""))
        for text in found:
            self.violations.append(f"[{self.kind} killed {label}] {text}")

    async def final(self, doc: Any, old: bytes, data: bytes, outcome: str) -> list[str]:
        """Expire everything, sweep, and check (the race suite's final checks)."""
        found = []
        if not outcome.endswith("finished"):
            found.append(f"the upload was refused after a kill ({outcome}); nothing else "
                         "changed the field, so the docs promise it resumes")
        past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1)
        await self.db[f"{CATALOGUE}.uploads"].update_many(
            {}, {"$set": {"expires": past}, "$unset": {"lease": ""}})
        await self.db[SESSIONS].update_many(
            {"catalogue": CATALOGUE, "state": {"$ne": "done"}}, {"$set": {"expires": past}})
        for _ in range(2):
            await asyncassets.sweep_orphans(grace=0, buckets=CATALOGUE)
        races = TusRaces(self.kind, self.cls, [], None, DEFAULT_TUS,  # type: ignore[arg-type]
                         0, self.db, self.tmp_path)
        races.bucket_reader = self.reader
        races.targets = [Target(doc, old, allowed=[old, data],
                                expect=[data] if outcome.endswith("finished") else [old],
                                what="kill point")]
        try:
            await races.final()
        finally:
            await races.http.aclose()
        found += races.violations
        if self.kind != "gridfs":
            reserved = await self.db[RESERVATIONS].count_documents({"catalogue": CATALOGUE})
            stored = await self.db[f"{CATALOGUE}.files"].count_documents({})
            if reserved != stored:
                found.append(f"{reserved} key reservations for {stored} stored files")
        return found


@pytest.fixture
async def kill_points(request: Any, asyncassets_db: Any, asyncassets_server_uri: str,
                      tmp_path: Path) -> Any:
    kind = request.param
    s3 = request.getfixturevalue("asyncassets_s3_bucket") if kind == "s3" else None
    storage, where, env = storage_for(kind, tmp_path, s3)

    class TusFaultDoc(Document):
        file = FileField(storage=storage)
        meta = {"collection": "tus_fault_docs"}

    reader = None
    if s3 is not None:
        reader = BucketReader(s3.name, s3.endpoint_url, s3.access_key_id,
                              s3.secret_access_key, s3.region)
    uri = database_uri(asyncassets_server_uri, asyncassets_db.name)
    points = KillPoints(kind, TusFaultDoc, uri, where, env, asyncassets_db, tmp_path, reader)
    points.healthy.start()
    try:
        yield points
    finally:
        points.healthy.kill()
        if reader is not None:
            reader.close()


def default_sample(calls: list[Call]) -> list[tuple[int, str]]:
    """A few points: the creation's first call, the first PATCH's first, and the
    finish around the switch (the document's update, before and after it), the
    old file's deletion half done, and its last call."""
    requests = sorted({c.request for c in calls}, key=lambda r: int(r.split(":")[0]))
    first_of = {r: next(c.number for c in calls if c.request == r) for r in requests}
    switch = [c.number for c in calls if c.what == "tus_fault_docs.update_one"]
    picks = [(first_of[requests[0]], "before")]
    if len(requests) > 1:
        picks.append((first_of[requests[1]], "before"))
    if switch:
        picks += [(switch[-1], "before"), (switch[-1], "after")]
    dropped = [c.number for c in calls if c.what == f"{CATALOGUE}.files.delete_one"]
    if dropped:  # the old file's entry gone, its chunks not yet
        picks.append((dropped[-1], "after"))
    picks.append((len(calls), "before"))
    return list(dict.fromkeys(picks))


async def run_points(points: KillPoints, every: bool) -> None:
    started = time.monotonic()
    calls: list[Call] = []
    await points.point(None, "", calls)
    assert calls, "the clean run logged no call"
    print(f"\ntus kill points on {points.kind}: the clean run's {len(calls)} calls")
    for call in calls:
        print(f"  {call}")
    chosen = ([(n, w) for n in range(1, len(calls) + 1) for w in ("before", "after")]
              if every else default_sample(calls))
    for n, when in chosen:
        await points.point(n, when, calls)
    print(f"{len(chosen)} kill points on {points.kind} in {time.monotonic() - started:.0f} s: "
          f"{dict(points.outcomes)}")
    print("\n".join(points.lines))
    assert not points.violations, "\n".join(points.violations[:10])


@pytest.mark.parametrize("kill_points", ["gridfs"], indirect=True)
async def test_a_few_kill_points_each_end_with_the_upload_attached_and_nothing_left(
    kill_points: KillPoints,
) -> None:
    await run_points(kill_points, every=False)


@pytest.mark.slow
@pytest.mark.parametrize("kill_points", ["gridfs", "filesystem", "s3"], indirect=True)
async def test_every_kill_point_ends_with_the_upload_attached_and_nothing_left(
    kill_points: KillPoints,
) -> None:
    await run_points(kill_points, every=True)
