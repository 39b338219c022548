"""Shared plumbing for the benchmarks: timing, statistics, command counting, tables."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pymongo import monitoring

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor()
    mem = ""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / MiB:.1f} GiB"
    except OSError:
        pass
    import gridfs  # noqa: F401
    import mongoengine
    import pymongo

    try:
        secantus = subprocess.run(
            [sys.executable, "-m", "pip", "show", "secantusdb"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
        secantus_version = next(
            (
                ln.split(":", 1)[1].strip()
                for ln in secantus.splitlines()
                if ln.startswith("Version")
            ),
            "?",
        )
    except (OSError, subprocess.SubprocessError):
        secantus_version = "?"
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory": mem,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "pymongo": pymongo.version,
        "mongoengine": mongoengine.__version__
        if hasattr(mongoengine, "__version__")
        else mongoengine.get_version(),
        "secantusdb": secantus_version,
        "commit": _git_commit(),
    }


def _git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


class Timer:
    """``with Timer() as t: ...``; then ``t.seconds``."""

    def __enter__(self) -> Timer:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds = time.perf_counter() - self._start


class CommandCounter(monitoring.CommandListener):
    """Counts commands per (name, collection) and the documents the server returned.

    Register it on a client (``event_listeners=[counter]``), then ``reset()`` before
    the part to measure. ``chunks_returned`` counts the documents in ``find``/``getMore``
    replies on a ``*.chunks`` collection: the GridFS chunks actually transferred.
    """

    def __init__(self) -> None:
        self.enabled = True
        self.reset()

    def reset(self) -> None:
        self.commands: Counter[tuple[str, str]] = Counter()
        self._pending: dict[int, str] = {}
        self.chunks_returned = 0
        self.docs_returned: Counter[str] = Counter()

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if not self.enabled:
            return
        name = event.command_name
        coll = event.command.get(name)
        if name == "getMore":
            coll = event.command.get("collection")
        coll = coll if isinstance(coll, str) else ""
        self.commands[(name, coll)] += 1
        self._pending[event.request_id] = coll

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        coll = self._pending.pop(event.request_id, None)
        if coll is None or event.command_name not in ("find", "getMore"):
            return
        cursor = event.reply.get("cursor") or {}
        batch = cursor.get("firstBatch", cursor.get("nextBatch", []))
        self.docs_returned[coll] += len(batch)
        if coll.endswith(".chunks"):
            self.chunks_returned += len(batch)

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        self._pending.pop(event.request_id, None)

    @property
    def total(self) -> int:
        return sum(self.commands.values())

    def summary(self) -> dict[str, int]:
        return {f"{n} {c}".strip(): k for (n, c), k in sorted(self.commands.items())}


class RssSampler:
    """Samples this process's resident set size every few ms in a thread; keeps the peak."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> RssSampler:
        self.start_rss = self.peak = self.rss()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.rss())

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self.peak = max(self.peak, self.rss())

    @property
    def growth(self) -> int:
        return self.peak - self.start_rss


def fmt_table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = "  ".join("-" * w for w in widths)
    out = [line, "  ".join(c.ljust(w) for c, w in zip(cells[0], widths, strict=True)), line]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells[1:]]
    out.append(line)
    return "\n".join(out)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != value:
            return "n/a"
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


Progress = Callable[[str], None]


# glibc's malloc in the server process: one arena, a fixed mmap threshold (32 MiB,
# glibc's ceiling for its dynamic one) and a high trim threshold. SecantusDB (Python)
# builds a 16 MiB reply for each of raw PyMongo's default 64-chunk GridFS batches.
# With glibc's defaults, some server processes mapped those buffers fresh for every
# reply (12,209 minor page faults and about 28 ms of extra system time per 32 MiB
# read) and others never did, for the life of the process: raw's stream reads took 85
# to 92 ms or 51 to 63 ms per 32 MiB depending on which server a run got, and the
# stream-read ratio swung between runs (medians 0.95x to 1.44x). The thresholds alone
# settled 32 MiB files, not 64 MiB ones (12,250 faults per raw read, in the threads'
# own arenas); with one arena, raw's reads fault 2 to 4 times per 64 MiB. See
# docs/performance.rst.
SERVER_MALLOC_ENV = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_THRESHOLD_": str(32 * MiB),
    "MALLOC_TRIM_THRESHOLD_": str(256 * MiB),
}


@contextlib.contextmanager
def embedded_server(
    cache_size: str | None, storage_path: str | None = None, pin_malloc: bool = True
) -> Iterator[Any]:
    """A running :class:`~asyncassets.embedded.EmbeddedServer` with an explicit SecantusDB cache.

    ``storage_path``: a directory for an on-disk server (SecantusDB then runs with
    ``--sync-on-commit``, as EmbeddedServer starts it for persistent storage), or
    ``None`` for an in-memory one. SecantusDB's in-memory store keeps everything in
    its WiredTiger cache (1 GiB by default) and fails writes with ``WT_CACHE_FULL``
    beyond it; an on-disk one evicts to disk. ``cache_size`` (``"2G"``) is passed as
    ``--cache-size``; ``None`` or ``""`` leaves the server's default. ``pin_malloc``
    starts the server with :data:`SERVER_MALLOC_ENV` (the server only: the variables
    are set while it starts and restored afterwards).
    """
    from asyncassets.embedded import EmbeddedServer

    server = EmbeddedServer(storage_path)
    if server.kind == "secantusdb" and cache_size:
        server = EmbeddedServer(storage_path, extra_args=["--cache-size", cache_size])
    saved = {k: os.environ.get(k) for k in SERVER_MALLOC_ENV}
    if pin_malloc:
        os.environ.update(SERVER_MALLOC_ENV)
    try:
        server.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:
        yield server
    finally:
        server.stop()


def loadavg() -> str:
    """``/proc/loadavg``: other work on the machine, recorded with the figures."""
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "?"


def proc_stat(pid: int | None) -> dict[str, float]:
    """CPU seconds (user, system) and page faults of a process, from ``/proc``."""
    if pid is None:
        return {}
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return {}
    tick = os.sysconf("SC_CLK_TCK")
    return {
        "user_s": int(fields[11]) / tick,
        "system_s": int(fields[12]) / tick,
        "minor_faults": int(fields[7]),
        "major_faults": int(fields[9]),
    }
