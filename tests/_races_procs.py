"""Worker processes for the race suites: other OS processes changing the same
documents and assets, as a scaled-out service's processes do.

:class:`Workers` keeps a small pool of tests/_race_worker.py processes. An operation
sent to one is a JSON line on its stdin; it answers with JSON lines on its stdout:
events (``"source done"``: the upload's source was read to the end, the commit
comes next, which is when the scheduler SIGKILLs it when it plans a kill), then
the outcome, which :func:`exception_from` turns back into an exception of the same
class, so the model classifies it as it classifies its own. A killed worker is
replaced in the background; meanwhile operations planned for a process run in
the test's own (counted as such).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import itertools
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

from bson import ObjectId

from asyncassets import errors as aa_errors

WORKER_SCRIPT = Path(__file__).parent / "_race_worker.py"


def die_with_parent() -> None:
    """In a child, before exec: Linux SIGKILLs it when the test run dies, so a run
    killed by a timeout leaves no worker (or ``transfer --forever``) behind."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class ProcessDied(Exception):
    """The worker process ended (killed) before it answered."""


def encode(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode()


def decode(text: str | None) -> bytes | None:
    return None if text is None else base64.b64decode(text)


def jsonable_id(value: Any) -> Any:
    return {"$oid": str(value)} if isinstance(value, ObjectId) else value


def exception_from(report: dict[str, Any]) -> BaseException:
    """The exception a worker process reported, as an instance of the same class
    (without running its ``__init__``), so it is classified as a local one."""
    cls = getattr(aa_errors, report.get("type", ""), None)
    message = f"[in a worker process] {report.get('message', '')}"
    if isinstance(cls, type) and issubclass(cls, BaseException):
        # A subclass whose str() is the message: some classes' own __str__ reads
        # attributes their __init__ would have set.
        remote = type(cls.__name__, (cls,), {"__str__": lambda self: message})
        exc = remote.__new__(remote)
        BaseException.__init__(exc, message)
        if report.get("key") is not None:
            exc.key = report["key"]  # type: ignore[attr-defined]
        return exc
    return RuntimeError(f"{report.get('type')}: {message}")


class Worker:
    """One worker subprocess (tests/_race_worker.py): a JSON command a line on its
    stdin, JSON lines back on its stdout (events, then the result)."""

    def __init__(self, spec: dict[str, Any], log: Path, number: int) -> None:
        self.spec = spec
        self.log = log
        self.number = number
        self.proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._results: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._events: dict[int, list[str]] = {}
        self._event_seen: dict[int, asyncio.Event] = {}
        self._ids = itertools.count()
        self.killed = False

    def _stderr(self) -> Any:
        return open(self.log, "ab")

    async def start(self) -> Worker:
        err = self._stderr()
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, str(WORKER_SCRIPT), json.dumps(self.spec),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=err,
                limit=2**24, preexec_fn=die_with_parent,
            )  # fmt: skip
        finally:
            err.close()
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), 60)
        if json.loads(line or b"{}").get("ready") is not True:
            raise RuntimeError(f"worker process did not start: {line!r}; see {self.log}")
        self._reader = asyncio.ensure_future(self._read())
        return self

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while True:
            line = await self.proc.stdout.readline()
            if not line:
                break
            message = json.loads(line)
            n = message["id"]
            if "event" in message:
                self._events.setdefault(n, []).append(message["event"])
                if n in self._event_seen:
                    self._event_seen[n].set()
                continue
            future = self._results.pop(n, None)
            if future is not None and not future.done():
                future.set_result(message)
        for future in self._results.values():
            if not future.done():
                future.set_exception(ProcessDied(f"worker process {self.number} ended"))

    def send(self, command: dict[str, Any]) -> tuple[int, asyncio.Future[dict[str, Any]]]:
        assert self.proc is not None and self.proc.stdin is not None
        n = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._results[n] = future
        self._event_seen[n] = asyncio.Event()
        self.proc.stdin.write(json.dumps({**command, "id": n}).encode() + b"\n")
        return n, future

    async def event(self, n: int, timeout: float) -> bool:
        """Wait (at most ``timeout`` s) for an event of command ``n``."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event_seen[n].wait(), timeout)
            return True
        return False

    def events(self, n: int) -> list[str]:
        return self._events.get(n, [])

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc is not None and self.proc.returncode is None:
            self.killed = True
            self.proc.send_signal(signal.SIGKILL)

    async def close(self) -> None:
        if self.proc is None:
            return
        if self.proc.returncode is None and self.proc.stdin is not None and not self.killed:
            self.proc.stdin.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), 10)
        if self.proc.returncode is None:
            self.proc.kill()
        await self.proc.wait()
        if self._reader is not None:
            with contextlib.suppress(BaseException):
                await self._reader


class Workers:
    """A pool of worker processes; a killed one is replaced in the background."""

    def __init__(self, spec: dict[str, Any], log_dir: Path, size: int) -> None:
        self.spec = spec
        self.log = log_dir / "race-workers.log"
        self.size = size
        self.free: asyncio.Queue[Worker] = asyncio.Queue()
        self.all: list[Worker] = []
        self.starting: set[asyncio.Task[None]] = set()
        self.started = 0
        self.errors: list[BaseException] = []

    def start(self) -> None:
        """Start the pool's processes; they join as they are ready."""
        for _ in range(self.size):
            self._spawn()

    def _spawn(self) -> None:
        self.started += 1
        worker = Worker(self.spec, self.log, self.started)
        self.all.append(worker)

        async def ready() -> None:
            try:
                await worker.start()
            except BaseException as exc:
                self.errors.append(exc)
                raise
            self.free.put_nowait(worker)

        task = asyncio.ensure_future(ready())
        self.starting.add(task)
        task.add_done_callback(self.starting.discard)

    def take(self) -> Worker | None:
        """A free worker, or ``None`` (none is ready: the operation runs here)."""
        try:
            return self.free.get_nowait()
        except asyncio.QueueEmpty:
            return None

    def give_back(self, worker: Worker) -> None:
        if worker.killed or worker.proc is None or worker.proc.returncode is not None:
            self._spawn()  # its replacement
        else:
            self.free.put_nowait(worker)

    async def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.free.qsize() < min(1, self.size) and time.monotonic() < deadline:
            if self.errors:
                raise self.errors[0]
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        for task in list(self.starting):
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        await asyncio.gather(*(w.close() for w in self.all), return_exceptions=True)


