"""The deployment shape, run and killed on one machine (issue #22).

What a scaled-out service runs, as separate OS processes on loopback:

* two app processes: uvicorn serving tests/_deployment_app.py (uploads streamed
  into a field, whole and ranged reads through ``FileResponse``, replaces,
  deletes) on GridFS, a directory, S3 and a queued (directory -> S3) field;
* two ``asyncassets transfer --forever`` workers moving the queued files;
* a sweeper: ``asyncassets sweep --grace 15s`` every few seconds, as cron would;
* an S3 server: moto behind a write-ahead log (tests/_durable_s3.py), so that a
  SIGKILL loses nothing it acknowledged, as a real S3 or MinIO;
* MongoDB: the test session's server, or ``MONGODB_URI``;

and in this process a load generator: concurrent HTTP clients (httpx, keep-alive
pools) doing random operations on shared documents, replaces racing across the
two apps included. Meanwhile an app process, a transfer worker (while it holds a
claim, when it can be caught holding one) and, once, the S3 server are SIGKILLed
at random moments and started again.

The model: every upload is new random bytes, known by its SHA-256. For each
document field the client side keeps which versions may be stored (the last
acknowledged write; more while writes overlap or end with an unknown outcome: a
``503``, a cut connection). What must hold:

* a read returns one version, whole or the asked range of it, with the ETag of
  that version (**no client ever gets bytes of two files**), and a version the
  field may hold at some moment of the read;
* no ``500`` (damaged bytes), no connection dropped without a response outside
  the moment an app process is killed (issue #22's second case);
* at the end (load stopped, transfers drained, a final sweep with grace 0): every
  field reads back byte-exact as the version it must hold (every acknowledged
  byte), ``check(verify=True)`` finds nothing (0 dangling references, 0 orphans,
  no bad checksum), and no temp file or pending multipart upload is left.

Run it by hand, for as long as you like::

    python tests/_deployment.py --duration 300 [--clients 20] [--seed 7]

(an on-disk SecantusDB of its own unless ``MONGODB_URI`` is set; moto unless
``S3_ENDPOINT_URL`` is set, in which case S3 is not killed), or as the slow test
``pytest -n 0 -m slow -k deployment -s`` (tests/test_deployment.py;
``DEPLOYMENT_SECONDS`` sets its duration, 60 by default).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import random
import re
import signal
import socket
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))

from _races_procs import die_with_parent  # noqa: E402

from asyncassets._s3server import (  # noqa: E402
    FAKE_CREDENTIALS,
    S3Server,
    create_bucket,
    environment_credentials,
    unique_bucket_name,
)
from asyncassets.testing import database_uri  # noqa: E402

FIELDS = ("gridfs", "directory", "s3", "queued")
#: A client's keep-alive is shorter than uvicorn's (5 s): a connection the server
#: closes as idle is never the one a request is sent on.
CLIENT_KEEPALIVE = 2.0
#: The sweep's grace: longer than any upload and any stall between an upload's end
#: and its document's switch under this load (8 s seen on a loaded 2-core machine).
#: A replace whose switch comes later than the grace loses its new file to the sweep
#: and leaves a dangling reference (a 5 s grace showed it: see docs/scaling).
GRACE = 15.0
SWEEP_EVERY = 4.0
NO_RESPONSE = ("Server disconnected without sending a response", "ConnectError", "ReadError",
               "ConnectionResetError", "WriteError")  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class DurableS3(S3Server):
    """moto behind a write-ahead log (tests/_durable_s3.py): a kill loses nothing."""

    def __init__(self, log: Path) -> None:
        super().__init__()
        self.log = log

        self.starts = 0

    def _command(self, port: int) -> list[str]:
        self.starts += 1
        return [sys.executable, str(TESTS / "_durable_s3.py"), str(port), str(self.log)]


@dataclass
class Settings:
    duration: float = 60.0
    clients: int = 16
    seed: int = 1
    uri: str = ""  # the MongoDB deployment, without a database
    s3_endpoint: str | None = None  # None: a durable moto of this run
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="deploy22-")))
    app_kills: int = 0  # 0: one per 20 s, at least 3
    worker_kills: int = 0
    kill_s3: bool = True
    kills: bool = True  # False: the same load with no kill (the sizing figures)
    grace: float = GRACE


class Proc:
    """One OS process of the deployment, started (again) with the same command."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.name, self.argv, self.env, self.log = name, argv, env, log
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0

    async def start(self) -> None:
        with open(self.log, "ab") as err:  # noqa: ASYNC230 (a local log file: instant)
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv, cwd=TESTS, env=self.env, stdin=asyncio.subprocess.DEVNULL,
                stdout=err, stderr=err, preexec_fn=die_with_parent,
            )  # fmt: skip
        self.starts += 1

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
            await self.proc.wait()

    async def stop(self, timeout: float = 15) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            await self.kill()


@dataclass
class Slot:
    """What the client side knows of one field of one document."""

    possible: set[str | None] = field(default_factory=lambda: {None})
    inflight: dict[int, str | None] = field(default_factory=dict)
    overlapped: set[int] = field(default_factory=set)
    history: list[str | None] = field(default_factory=list)


@dataclass
class Window:
    """When something was down: (what, start, end or None while down)."""

    what: str
    start: float
    end: float | None = None


class Deployment:
    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.rng = random.Random(settings.seed)
        self.ops: Counter[str] = Counter()
        self.stats: Counter[str] = Counter()
        self.violations: list[str] = []
        self.contents: dict[str, bytes] = {}
        self.slots: dict[tuple[str, str], Slot] = {}
        self.docs: list[str] = []
        self.written: list[tuple[str, str]] = []  # fields a client has touched
        self.windows: list[Window] = []
        self.apps: list[Proc] = []
        self.ports: list[int] = []
        self.workers: list[Proc] = []
        self.s3: DurableS3 | None = None
        self.stopping = False
        self.tokens = iter(range(10**9))
        self.started = 0.0

    # -- the processes ---------------------------------------------------------------------

    async def start(self) -> None:
        s = self.s
        s.workdir.mkdir(parents=True, exist_ok=True)
        (s.workdir / "root").mkdir(exist_ok=True)
        (s.workdir / "spool").mkdir(exist_ok=True)
        self.db = f"aa_deploy_{os.urandom(6).hex()}"
        if s.s3_endpoint is None:
            self.s3 = DurableS3(s.workdir / "s3-writes.log")
            await asyncio.to_thread(self.s3.start)
            endpoint, credentials = self.s3.endpoint_url, dict(FAKE_CREDENTIALS)
            self.stats["processes: S3 server (durable moto)"] += 1
        else:
            endpoint, credentials = s.s3_endpoint, environment_credentials()
            s.kill_s3 = False
        region = os.environ.get("AWS_DEFAULT_REGION", "us-east-1")
        self.bucket = unique_bucket_name("deploy")
        await asyncio.to_thread(create_bucket, self.bucket, endpoint, credentials["access_key_id"],
                                credentials["secret_access_key"], region)  # fmt: skip
        self.s3_options = {"endpoint_url": endpoint, "bucket": self.bucket, "region": region,
                           **credentials}  # fmt: skip
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent)]),
            "DEPLOY_MONGODB_URI": database_uri(s.uri, self.db),
            "DEPLOY_ROOT": str(s.workdir / "root"),
            "DEPLOY_SPOOL": str(s.workdir / "spool"),
            "DEPLOY_S3": json.dumps(self.s3_options),
        }
        os.environ.update({k: v for k, v in self.env.items() if k.startswith("DEPLOY_")})
        cli = [sys.executable, "-m", "asyncassets", "--uri", s.uri, "--db", self.db,
               "--import", "_deployment_app"]  # fmt: skip
        for n in range(2):
            port = free_port()
            self.ports.append(port)
            self.apps.append(Proc(
                f"app {n}",
                [sys.executable, "-m", "uvicorn", "--factory", "_deployment_app:create_app",
                 "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
                 "--timeout-keep-alive", "5"],
                self.env, s.workdir / f"app{n}.log",
            ))  # fmt: skip
            self.workers.append(Proc(
                f"worker {n}",
                [*cli, "transfer", "--forever", "--poll", "0.2", "-c", "2",
                 "--shutdown-timeout", "5"],
                self.env, s.workdir / f"worker{n}.log",
            ))  # fmt: skip
        self.sweep_cmd = [*cli, "sweep", "--grace", f"{self.s.grace:g}s", "--json"]
        await asyncio.gather(*(p.start() for p in self.apps + self.workers))
        await asyncio.gather(*(self._ready(n) for n in range(2)))

    async def _ready(self, n: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.ports[n]}/docs/000000000000000000000000/gridfs"
        async with httpx.AsyncClient() as client:
            while time.monotonic() < deadline:
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(url, timeout=2)).status_code == 404:
                        return
                await asyncio.sleep(0.1)
        raise RuntimeError(f"app {n} did not start; see {self.apps[n].log}")

    async def sweeper(self) -> None:
        """``asyncassets sweep --grace <grace>s`` every few seconds, one at a time."""
        while not self.stopping:
            with open(self.s.workdir / "sweeps.log", "ab") as err:  # noqa: ASYNC230
                proc = await asyncio.create_subprocess_exec(
                    *self.sweep_cmd, cwd=TESTS, env=self.env, stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE, stderr=err, preexec_fn=die_with_parent,
                )  # fmt: skip
            out, _ = await proc.communicate()
            self.stats["processes: sweeps run"] += 1
            if proc.returncode != 0:
                # A sweep meeting the S3 outage stops with a StorageError; the next goes on.
                self.stats["sweeps that stopped with an error (S3 down)"] += 1
                await asyncio.sleep(SWEEP_EVERY)
                continue
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                swept = json.loads(out)
                swept = swept[0] if isinstance(swept, list) else swept
                self.stats["sweeps: files deleted"] += int(swept.get("files_deleted", 0))
                self.stats["sweeps: objects deleted"] += int(swept.get("objects_deleted", 0))
                self.stats["sweeps: chunks deleted"] += int(swept.get("chunks_deleted", 0))
                scanned, took = int(swept.get("files_scanned", 0)), float(swept["duration"])
                self.stats["sweeps: most files scanned"] = max(
                    self.stats["sweeps: most files scanned"], scanned)
                self.stats["sweeps: slowest, ms"] = max(self.stats["sweeps: slowest, ms"],
                                                        int(took * 1000))  # fmt: skip
            await asyncio.sleep(SWEEP_EVERY)

    # -- chaos -------------------------------------------------------------------------------

    def _times(self, n: int, low: float, high: float) -> list[float]:
        d = self.s.duration
        return sorted(self.rng.uniform(low * d, high * d) for _ in range(n))

    async def chaos(self) -> None:
        if not self.s.kills:
            return
        d = self.s.duration
        app_kills = self.s.app_kills or max(3, int(d // 20))
        worker_kills = self.s.worker_kills or max(3, int(d // 20))
        plan = [(t, "app") for t in self._times(app_kills, 0.05, 0.85)]
        plan += [(t, "worker") for t in self._times(worker_kills, 0.05, 0.85)]
        if self.s.kill_s3:
            plan.append((self.rng.uniform(0.35, 0.55) * d, "s3"))
        tasks = [asyncio.ensure_future(self._at(t, what)) for t, what in sorted(plan)]
        await asyncio.gather(*tasks)

    async def _at(self, when: float, what: str) -> None:
        await asyncio.sleep(max(0.0, self.started + when - time.monotonic()))
        if what == "app":
            await self.kill_app(self.rng.randrange(2))
        elif what == "worker":
            await self.kill_worker(self.rng.randrange(2))
        else:
            await self.kill_s3()

    async def kill_app(self, n: int) -> None:
        window = Window(f"app {n}", time.monotonic())
        self.windows.append(window)
        await self.apps[n].kill()
        self.stats["kills: app process (SIGKILL)"] += 1
        await asyncio.sleep(self.rng.uniform(0.3, 1.5))
        await self.apps[n].start()
        await self._ready(n)
        window.end = time.monotonic() + 0.5

    async def kill_worker(self, n: int) -> None:
        import _deployment_app as app

        worker = self.workers[n]
        files = app.Deployed.queued.storage.bind(self._db()).files
        deadline = time.monotonic() + 5
        held = False
        while time.monotonic() < deadline and not held:
            held = await files.find_one(
                {"transfer.state": "running", "transfer.worker": {"$regex": f":{worker.pid}:"}},
                {"_id": 1},
            ) is not None  # fmt: skip
            if not held:
                await asyncio.sleep(0.01)
        await worker.kill()
        self.stats["kills: transfer worker (SIGKILL)"] += 1
        if held:
            self.stats["kills: transfer worker holding a claim"] += 1
        await asyncio.sleep(self.rng.uniform(0.3, 1.5))
        await worker.start()

    async def kill_s3(self) -> None:
        assert self.s3 is not None
        window = Window("s3", time.monotonic())
        self.windows.append(window)
        await asyncio.to_thread(self.s3.kill)
        self.stats["kills: S3 server (SIGKILL)"] += 1
        await asyncio.sleep(self.rng.uniform(0.5, 2.0))
        t0 = time.monotonic()
        await asyncio.to_thread(self.s3.start)  # replays its log, then listens
        self.stats["S3 restart with replay, ms"] = int((time.monotonic() - t0) * 1000)
        window.end = time.monotonic() + 1.0

    async def sample_memory(self) -> None:
        """The peak resident set of each app process and transfer worker."""
        while not self.stopping:
            for kind, procs in (("app process", self.apps), ("transfer worker", self.workers)):
                for p in procs:
                    with contextlib.suppress(OSError, AssertionError):
                        status = Path(f"/proc/{p.pid}/status").read_text()  # noqa: ASYNC240
                        found = re.search(r"VmRSS:\s+(\d+)", status)
                        if found is None:
                            continue  # killed, not yet reaped
                        key = f"peak RSS of a {kind}, MiB"
                        self.stats[key] = max(self.stats[key], int(found[1]) // 1024)
            await asyncio.sleep(0.5)

    def _down(self, what: str, start: float, end: float) -> bool:
        return any(
            w.what == what and w.start <= end and (w.end is None or w.end >= start)
            for w in self.windows
        )

    def _db(self) -> Any:
        from asyncassets.connection import get_db

        return get_db()

    # -- the model -------------------------------------------------------------------------

    def _content(self, slot: str) -> tuple[str, bytes]:
        r = self.rng.random()
        size = (self.rng.randint(1, 8 * 1024) if r < 0.4
                else self.rng.randint(8 * 1024, 300 * 1024) if r < 0.9
                else self.rng.randint(300 * 1024, 1536 * 1024))  # fmt: skip
        data = f"{slot}|{len(self.contents)}|".encode() + self.rng.randbytes(size)
        sha = hashlib.sha256(data).hexdigest()
        self.contents[sha] = data
        return sha, data

    def _begin(self, slot: Slot, value: str | None) -> int:
        token = next(self.tokens)
        if slot.inflight:
            slot.overlapped |= {token, *slot.inflight}
        slot.inflight[token] = value
        slot.history.append(value)
        return token

    def _end(self, slot: Slot, token: int, outcome: str) -> None:
        value = slot.inflight.pop(token)
        overlapped = token in slot.overlapped
        slot.overlapped.discard(token)
        if outcome == "acknowledged":
            slot.possible = slot.possible | {value} if overlapped else {value}
        elif outcome == "unknown":
            slot.possible = slot.possible | {value}

    def violation(self, kind: str, detail: str) -> None:
        self.stats[f"violation: {kind}"] += 1
        if len(self.violations) < 50:
            self.violations.append(f"{kind}: {detail}")

    # -- the clients -------------------------------------------------------------------------

    def _client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            timeout=httpx.Timeout(60.0),
            limits=httpx.Limits(max_connections=4, keepalive_expiry=CLIENT_KEEPALIVE),
        )

    def _url(self, n: int, doc: str, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[n]}/docs/{doc}/{name}"

    async def _send(
        self, http: httpx.AsyncClient, n: int, method: str, path: str, **kw: Any
    ) -> tuple[int, httpx.Response]:
        """Send to app ``n``; a connection refused (the app is down: nothing was sent)
        goes to the other app, as a load balancer would send it. Returns the app."""
        try:
            return n, await http.request(method, f"http://127.0.0.1:{self.ports[n]}{path}", **kw)
        except httpx.ConnectError:
            self.stats["requests sent to the other app (one was down)"] += 1
            n = 1 - n
            return n, await http.request(method, f"http://127.0.0.1:{self.ports[n]}{path}", **kw)

    def _took(self, kind: str, start: float) -> None:
        ms = int((time.monotonic() - start) * 1000)
        key = f"slowest {kind}, ms"
        self.stats[key] = max(self.stats[key], ms)

    def _cause(self, exc: BaseException, n: int, start: float) -> str:
        """Why a request got no (whole) response; a violation when nothing explains it."""
        text = f"{type(exc).__name__}: {exc}"
        now = time.monotonic()
        if self._down(f"app {n}", start, now) or self._down(f"app {1 - n}", start, now):
            return "cut by an app's kill"
        if self._down("s3", start, now):
            return "cut during the S3 outage"
        if "incomplete" in str(exc) or "complete message body" in str(exc):
            return "truncated"
        if any(marker in text for marker in NO_RESPONSE):
            self.violation("a connection dropped without a response (issue #22, case 2)", text)
            return "dropped"
        return f"error {type(exc).__name__}"

    async def client(self, k: int) -> None:
        async with self._client() as http, self._client() as other:
            while not self.stopping:
                r = self.rng.random()
                try:
                    if r < 0.03 or len(self.docs) < 4 * self.s.clients:
                        await self.op_create(http)
                    elif r < 0.35:
                        await self.op_write(http)
                    elif r < 0.43:
                        await self.op_race(http, other)
                    elif r < 0.48:
                        await self.op_delete(http)
                    elif r < 0.75:
                        await self.op_read(http, ranged=False)
                    else:
                        await self.op_read(http, ranged=True)
                except Exception as exc:  # a bug of the load generator: report it
                    self.violation("load generator error", f"{type(exc).__name__}: {exc}")

    def _pick(self, written: bool = False) -> tuple[str, str, Slot]:
        """A field of a document; most reads go to fields that were written to."""
        if written and self.written and self.rng.random() < 0.8:
            doc, name = self.rng.choice(self.written)
        else:
            doc, name = self.rng.choice(self.docs), self.rng.choice(FIELDS)
        slot = self.slots.get((doc, name))
        if slot is None:
            slot = self.slots[doc, name] = Slot()
            self.written.append((doc, name))
        return doc, name, slot

    async def op_create(self, http: httpx.AsyncClient) -> None:
        n = self.rng.randrange(2)
        start = time.monotonic()
        try:
            n, r = await self._send(http, n, "POST", "/docs")
        except httpx.HTTPError as exc:
            self.ops[f"create: {self._cause(exc, n, start)}"] += 1
            return
        if r.status_code == 201:
            self.docs.append(r.json()["id"])
        self.ops[f"create: {r.status_code}"] += 1

    async def _write(self, http: httpx.AsyncClient, n: int, doc: str, name: str,
                     slot: Slot, kind: str) -> None:  # fmt: skip
        sha, data = self._content(f"{doc}/{name}")
        token = self._begin(slot, sha)
        start = time.monotonic()
        outcome = "unknown"
        try:
            n, r = await self._send(http, n, "PUT", f"/docs/{doc}/{name}", content=data)
        except httpx.HTTPError as exc:
            self.ops[f"{kind}: {self._cause(exc, n, start)}"] += 1
        else:
            self.ops[f"{kind}: {r.status_code}"] += 1
            self._took("write", start)
            if r.status_code == 200:
                outcome = "acknowledged"
                if r.json().get("sha256") not in (sha, None):
                    self.violation("a write acknowledged another version",
                                   f"{doc}/{name}: sent {sha}, told {r.json()}")  # fmt: skip
            elif r.status_code in (404, 409):
                outcome = "refused"
            elif r.status_code != 503:
                self.violation(f"a write answered {r.status_code}", f"{doc}/{name}: {r.text}")
        self._end(slot, token, outcome)

    async def op_write(self, http: httpx.AsyncClient) -> None:
        doc, name, slot = self._pick()
        await self._write(http, self.rng.randrange(2), doc, name, slot, "replace")

    async def op_race(self, http: httpx.AsyncClient, other: httpx.AsyncClient) -> None:
        """Two replaces of one field at once, one through each app process."""
        doc, name, slot = self._pick()
        await asyncio.gather(
            self._write(http, 0, doc, name, slot, "racing replace"),
            self._write(other, 1, doc, name, slot, "racing replace"),
        )

    async def op_delete(self, http: httpx.AsyncClient) -> None:
        doc, name, slot = self._pick()
        n = self.rng.randrange(2)
        token = self._begin(slot, None)
        start = time.monotonic()
        outcome = "unknown"
        try:
            n, r = await self._send(http, n, "DELETE", f"/docs/{doc}/{name}")
        except httpx.HTTPError as exc:
            self.ops[f"delete: {self._cause(exc, n, start)}"] += 1
        else:
            self.ops[f"delete: {r.status_code}"] += 1
            if r.status_code == 204:
                outcome = "acknowledged"
            elif r.status_code in (404, 409):
                outcome = "refused"
            elif r.status_code != 503:
                self.violation(f"a delete answered {r.status_code}", f"{doc}/{name}: {r.text}")
        self._end(slot, token, outcome)

    async def op_read(self, http: httpx.AsyncClient, *, ranged: bool) -> None:
        doc, name, slot = self._pick(written=True)
        n = self.rng.randrange(2)
        allowed = set(slot.possible) | set(slot.inflight.values())
        busy = bool(slot.inflight)  # a write under way may delete what the read found
        mark = len(slot.history)
        headers: dict[str, str] = {}
        if ranged:
            # Mostly inside a version the field may hold; now and then past its end (416).
            sizes = [len(self.contents[v]) for v in allowed if v is not None] or [1024]
            size = self.rng.choice(sizes)
            a = self.rng.randrange(0, size + (size // 10 if self.rng.random() < 0.1 else 0))
            headers["range"] = f"bytes={a}-{a + self.rng.randrange(0, 300 * 1024)}"
        kind = "ranged read" if ranged else "read"
        start = time.monotonic()
        try:
            n, r = await self._send(http, n, "GET", f"/docs/{doc}/{name}", headers=headers)
        except httpx.HTTPError as exc:
            cause = self._cause(exc, n, start)
            if cause == "truncated" and not busy and len(slot.history) == mark:
                if not self._down("s3", start, time.monotonic()):
                    self.violation("a response cut short with no change or outage",
                                   f"{doc}/{name}: {exc}")  # fmt: skip
            self.ops[f"{kind}: {cause}"] += 1
            return
        self._took(kind, start)
        allowed |= set(slot.history[mark:])
        changed = busy or len(slot.history) > mark
        self.ops[f"{kind}: {r.status_code}"] += 1
        where = f"{doc}/{name} via app {n} ({r.status_code}, {headers})"
        if r.status_code in (200, 206):
            self._check_body(r, allowed, where)
        elif r.status_code == 404:
            if None not in allowed and not changed:
                self.violation("404 for a stored file",
                               f"{where}: {r.text.strip()[:100]}; may hold "
                               f"{[v and v[:12] for v in allowed]}")  # fmt: skip
        elif r.status_code == 416:
            etag_sizes = {len(self.contents[v]) for v in allowed if v is not None}
            total = r.headers.get("content-range", "").rpartition("/")[2]
            if not total.isdigit() or int(total) not in etag_sizes:
                self.violation("416 for no version the field may hold", where)
        elif r.status_code != 503:
            self.violation(f"a read answered {r.status_code}", f"{where}: {r.text[:200]}")

    def _check_body(self, r: httpx.Response, allowed: set[str | None], where: str) -> None:
        etag = r.headers.get("etag", "").strip('"')
        content = self.contents.get(etag)
        if content is None:
            self.violation("a response whose ETag names no upload", f"{where}: {etag!r}")
            return
        if r.status_code == 200:
            expected = content
        else:
            m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", r.headers.get("content-range", ""))
            if m is None or int(m.group(3)) != len(content):
                self.violation("a range response with a bad Content-Range", where)
                return
            expected = content[int(m.group(1)) : int(m.group(2)) + 1]
        if r.content != expected:
            self.violation("bytes that are not of the version the ETag names (two files?)",
                           f"{where}: {len(r.content)} bytes")  # fmt: skip
        elif etag not in allowed:
            shown = sorted(map(str, allowed))[:4]
            self.violation("a version the field never held during the read",
                           f"{where}: {etag[:12]}, allowed {shown}")  # fmt: skip

    # -- running -----------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        import asyncassets

        s = self.s
        await self.start()
        asyncassets.connect(database_uri(s.uri, self.db), alias="default")
        try:
            self.started = time.monotonic()
            sweeper = asyncio.ensure_future(self.sweeper())
            clients = [asyncio.ensure_future(self.client(k)) for k in range(s.clients)]
            chaos = asyncio.ensure_future(self.chaos())
            memory = asyncio.ensure_future(self.sample_memory())
            await asyncio.sleep(s.duration)
            await chaos
            self.stopping = True
            await asyncio.gather(*clients)
            await sweeper
            await memory
            elapsed = time.monotonic() - self.started
            self.stats["load seconds"] = int(elapsed)
            self._rates(elapsed)
            await self.finish()
        finally:
            await self.close()
        return self.report()

    def _rates(self, elapsed: float) -> None:
        """Answered requests per second, per kind, for the two app processes together."""
        for kind in ("replace", "racing replace", "read", "ranged read", "delete"):
            done = sum(v for k, v in self.ops.items()
                       if k.startswith(f"{kind}: ") and k.split(": ")[1].isdigit())  # fmt: skip
            self.stats[f"{kind}s answered per second (2 apps)"] = round(done / elapsed, 1)
        sent = sum(len(self.contents[v]) for v in self.contents)
        self.stats["MiB of uploads generated"] = round(sent / 2**20)

    async def finish(self) -> None:
        """Drain the transfers, sweep with grace 0, and check everything."""
        import _deployment_app as app

        import asyncassets

        store = app.Deployed.queued.storage.bind(self._db())
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            counts = await store.counts()
            if not counts.get("pending") and not counts.get("running"):
                break
            await asyncio.sleep(0.5)
        self.stats.update({f"queued files at the end: {k}": v
                           for k, v in (await store.counts()).items()})  # fmt: skip
        await asyncio.gather(*(p.stop() for p in self.workers))
        # Every field, through an app as a client would, whole.
        async with self._client() as http:
            for (doc, name), slot in sorted(self.slots.items()):
                r = await http.get(self._url(0, doc, name))
                self.ops["final read: " + str(r.status_code)] += 1
                got = None if r.status_code == 404 else hashlib.sha256(r.content).hexdigest()
                if r.status_code not in (200, 404):
                    self.violation("final read failed", f"{doc}/{name}: {r.status_code}")
                elif got not in slot.possible:
                    self.violation("a field does not read back as a version it must hold",
                                   f"{doc}/{name}: got {got and got[:12]}, "
                                   f"possible {[p and p[:12] for p in slot.possible]}")  # fmt: skip
                elif len(slot.possible) == 1:
                    self.stats["fields read back byte-exact as acknowledged"] += 1
                else:
                    self.stats["fields read back as one of their possible versions"] += 1
        await asyncio.gather(*(p.stop() for p in self.apps))
        await asyncio.sleep(1.1)  # the sweep dates chunks to the second
        swept = await asyncassets.sweep_orphans(grace=0)
        self.stats["final sweep: files deleted"] = swept.files_deleted
        self.stats["final sweep: objects deleted"] = swept.objects_deleted
        self.stats["final sweep: chunks deleted"] = swept.chunks_deleted
        report = await asyncassets.check(verify=True)
        self.stats["check: files"] = report.files
        self.stats["check: references"] = report.references
        self.stats["check: dangling references"] = report.dangling
        orphans = report.orphaned_files + report.orphaned_chunks + report.orphaned_objects
        self.stats["check: orphans after the final sweep"] = orphans
        if not report.ok:
            self.violation("check() after the final sweep", repr(report)[:2000])
        for where in ("root", "spool"):
            temps = [p for p in (self.s.workdir / where).rglob(".*") if p.is_file()]
            if temps:
                self.violation("temp files left", f"{where}: {temps[:5]}")
        pending = await asyncio.to_thread(self._pending_uploads)
        if pending:
            self.violation("multipart uploads left", str(pending[:5]))

    def _pending_uploads(self) -> list[str]:
        from asyncassets._s3server import _client

        o = self.s3_options
        client = _client(o["endpoint_url"], o["access_key_id"], o["secret_access_key"],
                         o["region"])  # fmt: skip
        try:
            found = client.list_multipart_uploads(Bucket=self.bucket).get("Uploads", [])
            return [u["Key"] for u in found]
        finally:
            client.close()

    async def close(self) -> None:
        import asyncassets
        from asyncassets._s3server import delete_bucket

        self.stopping = True
        await asyncio.gather(*(p.stop() for p in self.apps + self.workers),
                             return_exceptions=True)  # fmt: skip
        with contextlib.suppress(Exception):
            await asyncassets.get_client().drop_database(self.db)
        await asyncassets.disconnect()
        o = getattr(self, "s3_options", None)
        if o is not None:
            where = (o["endpoint_url"], o["access_key_id"], o["secret_access_key"], o["region"])
            with contextlib.suppress(Exception):  # a cleanup: the report is what matters
                await asyncio.to_thread(delete_bucket, self.bucket, *where)
        if self.s3 is not None:
            await asyncio.to_thread(self.s3.stop)

    def report(self) -> dict[str, Any]:
        processes = {
            "app processes started": sum(p.starts for p in self.apps),
            "transfer workers started": sum(p.starts for p in self.workers),
            "sweeps run": self.stats["processes: sweeps run"],
            "S3 servers started": self.s3.starts if self.s3 is not None else 0,
        }
        return {
            "operations": sum(v for k, v in self.ops.items() if not k.startswith("final")),
            "ops": dict(sorted(self.ops.items())),
            "processes": processes,
            "kills": {k[7:]: v for k, v in self.stats.items() if k.startswith("kills: ")},
            "stats": {
                k: v for k, v in sorted(self.stats.items())
                if not k.startswith(("kills: ", "violation: "))
            },
            "violations": sum(v for k, v in self.stats.items() if k.startswith("violation: ")),
            "violation kinds": {
                k[11:]: v for k, v in self.stats.items() if k.startswith("violation: ")
            },
            "first violations": self.violations[:10],
        }


def print_report(report: dict[str, Any]) -> None:
    print(f"\n[deployment] {report['operations']} operations, processes {report['processes']}, "
          f"kills {report['kills']}, {report['violations']} violations")  # fmt: skip
    for key in ("ops", "stats", "violation kinds"):
        print(f"  {key}:")
        for k, v in report[key].items():
            print(f"    {k}: {v}")
    for v in report["first violations"]:
        print(f"  VIOLATION {v}")


@contextlib.contextmanager
def _mongodb(storage: str) -> Iterator[str]:
    uri = os.environ.get("MONGODB_URI")
    if uri:
        yield uri
        return
    from asyncassets.embedded import EmbeddedServer

    path = None if storage == "memory" else tempfile.mkdtemp(prefix="deploy22-db-")
    with EmbeddedServer(path, cache_size="2G") as server:
        yield server.uri


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load (60)")
    p.add_argument("--clients", type=int, default=16, help="concurrent HTTP clients (16)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--storage", choices=("disk", "memory"), default="disk",
                   help="the embedded server's storage, without MONGODB_URI (disk)")  # fmt: skip
    p.add_argument("--no-kills", dest="kills", action="store_false",
                   help="the same load with no kill: the sizing figures of docs/scaling")
    p.add_argument("--grace", type=float, default=GRACE,
                   help=f"the periodic sweep's grace, seconds ({GRACE:g})")  # fmt: skip
    p.add_argument("--json", default=None, help="write the report here too")
    a = p.parse_args(argv)
    with _mongodb(a.storage) as uri:
        settings = Settings(
            duration=a.duration, clients=a.clients, seed=a.seed, uri=uri,
            s3_endpoint=os.environ.get("S3_ENDPOINT_URL"), kills=a.kills, grace=a.grace,
        )  # fmt: skip
        report = asyncio.run(Deployment(settings).run())
    print_report(report)
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2))
    return 1 if report["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
