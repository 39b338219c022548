"""Start and stop a local MongoDB wire-protocol server as a subprocess.

:class:`EmbeddedServer` runs a real ``mongod`` when one is on ``PATH`` and
otherwise SecantusDB (``pip install 'asyncassets[embedded]'``), a MongoDB
wire-protocol server that installs from PyPI. Either way the server is a
separate process listening on ``127.0.0.1`` only; asyncassets never imports it::

    import asyncassets
    from asyncassets.embedded import EmbeddedServer

    with EmbeddedServer() as server:          # in memory: gone when stopped
        asyncassets.connect(server.uri + "zoo")
        ...

For data that should outlive the process, give a directory; it is created if
missing and reopened intact by the next start, even after a crash::

    server = EmbeddedServer(default_data_dir())
    server.start()
    print(server.uri)      # mongodb://127.0.0.1:PORT/
    server.stop()

Which server runs: ``binary=`` when given, else the ``ASYNCASSETS_SERVER``
environment variable (``"mongod"`` or ``"secantusdb"``), else ``mongod`` if it
is on ``PATH``, else SecantusDB's ``secantusd-py`` (looked up beside the running
Python first, then on ``PATH``).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Literal

from .errors import EmbeddedServerError, ServerBinaryMissing

if TYPE_CHECKING:
    from pymongo import MongoClient

__all__ = ["MEMORY", "EmbeddedServer", "ServerKind", "default_data_dir"]

#: The ``storage_path`` that means "ephemeral": nothing is kept after the server stops.
MEMORY = ":memory:"
#: The two servers :class:`EmbeddedServer` knows how to run.
ServerKind = Literal["mongod", "secantusdb"]

_HOST = "127.0.0.1"
_SECANTUS_SCRIPT = "secantusd-py"
_LOG_NAME = "asyncassets-server.log"
_INSTALL_HINT = (
    "Install SecantusDB with `pip install 'asyncassets[embedded]'`, or install "
    "MongoDB's `mongod` and put it on PATH; or point your code at a running "
    "server with a URI (the test plugin reads MONGODB_URI; the command line "
    "--uri or ASYNCASSETS_URI)."
)
_POLL_INTERVAL = 0.05
_PORT_ATTEMPTS = 3


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGKILL it when its parent dies.

    A test run killed by a timeout (SIGKILL/SIGTERM skip atexit and finalizers)
    then leaves no server behind. Elsewhere this does nothing.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return  # not fatal: stop() and the finalizer still stop the server


def default_data_dir() -> Path:
    """Return the directory where interactive use keeps a persistent database.

    ``ASYNCASSETS_DATA_DIR`` wins when set. Otherwise it is the platform's user
    data directory (``platformdirs.user_data_dir("asyncassets") / "db"``, e.g.
    ``~/.local/share/asyncassets/db`` on Linux), or
    ``~/.local/share/asyncassets/db`` when platformdirs is not installed. The
    directory is not created here; :meth:`EmbeddedServer.start` creates it.
    """
    override = os.environ.get("ASYNCASSETS_DATA_DIR")
    if override:
        return Path(override).expanduser()
    try:
        from platformdirs import user_data_dir
    except ImportError:
        return Path.home() / ".local" / "share" / "asyncassets" / "db"
    return Path(user_data_dir("asyncassets", appauthor=False)) / "db"


def _which_secantus() -> str | None:
    # The script beside sys.executable belongs to the running environment, which
    # is the one `pip install 'asyncassets[embedded]'` installed into, even when
    # that environment is not activated (so not on PATH).
    beside = shutil.which(_SECANTUS_SCRIPT, path=str(Path(sys.executable).parent))
    return beside or shutil.which(_SECANTUS_SCRIPT)


def _kind_of(binary: str) -> ServerKind:
    return "mongod" if "mongod" in Path(binary).name.lower() else "secantusdb"


def _resolve_binary(binary: str | os.PathLike[str] | None) -> tuple[str, ServerKind]:
    """Find the executable to run and which kind of server it is."""
    if binary is not None:
        name = os.fspath(binary)
        if name == "secantusdb":
            found = _which_secantus()
            if found is None:
                raise _missing(
                    f"binary='secantusdb' was asked for but {_SECANTUS_SCRIPT} was not "
                    f"found beside {sys.executable} nor on PATH."
                )
            return found, "secantusdb"
        found = shutil.which(name)
        if found is None:
            raise _missing(
                f"Server binary {name!r} was not found or is not executable. Pass the "
                f"path of `mongod` or `{_SECANTUS_SCRIPT}`, or omit binary= to pick one "
                "automatically."
            )
        return found, _kind_of(found)

    forced = os.environ.get("ASYNCASSETS_SERVER", "").strip().lower()
    if forced not in ("", "mongod", "secantusdb"):
        raise EmbeddedServerError(
            f"ASYNCASSETS_SERVER={forced!r} is not understood: "
            "use 'mongod' or 'secantusdb', or unset it to pick automatically."
        )
    if forced in ("", "mongod"):
        mongod = shutil.which("mongod")
        if mongod is not None:
            return mongod, "mongod"
        if forced == "mongod":
            raise ServerBinaryMissing(
                "ASYNCASSETS_SERVER=mongod but no `mongod` is on PATH. Install MongoDB "
                "or unset ASYNCASSETS_SERVER to fall back to SecantusDB.",
                reason="ASYNCASSETS_SERVER=mongod but no `mongod` is on PATH (unset "
                "ASYNCASSETS_SERVER to fall back to SecantusDB).",
            )
    secantus = _which_secantus()
    if secantus is not None:
        return secantus, "secantusdb"
    if forced == "secantusdb":
        raise _missing(
            f"ASYNCASSETS_SERVER=secantusdb but {_SECANTUS_SCRIPT} was not found beside "
            f"{sys.executable} nor on PATH."
        )
    raise _missing(
        f"No MongoDB server to start: neither `mongod` on PATH nor SecantusDB "
        f"(`{_SECANTUS_SCRIPT}`) is installed."
    )


def _missing(reason: str) -> ServerBinaryMissing:
    return ServerBinaryMissing(f"{reason} {_INSTALL_HINT}", reason=reason)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        return int(sock.getsockname()[1])


def _port_in_use(port: int) -> bool:
    # SO_REUSEADDR as the servers themselves set it: connections of a killed
    # server lingering in TIME_WAIT do not count, a live listener does.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((_HOST, port))
        except OSError:
            return True
        return False


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    """Send ``sig`` to the server and anything it spawned (its own session)."""
    if proc.poll() is not None:
        return
    killpg = getattr(os, "killpg", None)
    try:
        if killpg is not None:
            killpg(proc.pid, sig)
        elif sig == signal.SIGTERM:
            proc.terminate()
        else:
            proc.kill()
    except (ProcessLookupError, PermissionError):
        pass


def _end_process(proc: subprocess.Popen[bytes], timeout: float, port: int | None = None) -> None:
    """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL."""
    _signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while True:
        try:
            proc.wait(timeout=max(0.0, min(_POLL_INTERVAL, deadline - time.monotonic())))
            return
        except subprocess.TimeoutExpired:
            if time.monotonic() >= deadline:
                break
        if port is not None:
            _poke(port)
    _signal_group(proc, getattr(signal, "SIGKILL", signal.SIGTERM))
    proc.wait()


def _poke(port: int) -> None:
    # SecantusDB's accept thread stays blocked in accept() after its listening
    # socket is closed, and shutdown waits 2 s for that thread; a connection
    # wakes it so a clean stop takes a fraction of a second.
    with contextlib.suppress(OSError), socket.create_connection((_HOST, port), timeout=0.2):
        pass


def _finalize(proc: subprocess.Popen[bytes], runtime_dir: str | None) -> None:
    # Last resort when an EmbeddedServer is garbage-collected or the interpreter
    # exits while it runs: never leave an orphan server behind.
    _end_process(proc, timeout=5.0)
    if runtime_dir is not None:
        shutil.rmtree(runtime_dir, ignore_errors=True)


class EmbeddedServer:
    """A local MongoDB (or SecantusDB) server run as a subprocess on ``127.0.0.1``.

    :param storage_path: a directory for persistent data (created if missing), or
        ``None`` / ``":memory:"`` for an ephemeral server whose data is gone when
        it stops (what tests want).
    :param port: the loopback port to listen on; ``None`` picks a free one at the
        first :meth:`start` and keeps it for later restarts.
    :param binary: the server executable (a path or a name on ``PATH``), or
        ``"mongod"`` / ``"secantusdb"`` to pick the kind. A name containing
        ``mongod`` is run with mongod's flags, anything else with SecantusDB's.
        A wrapper script must ``exec`` the server so the process it starts is
        the one that listens.
    :param log_path: where the server's output goes (appended). Default:
        ``asyncassets-server.log`` inside ``storage_path``, or a temporary file
        for an ephemeral server.
    :param startup_timeout: seconds :meth:`start` waits for the server to answer.
    :param extra_args: more command-line flags for the server, e.g.
        ``["--log-level", "DEBUG"]`` for SecantusDB.
    :param cache_size: the server's cache, ``"256M"``, ``"1G"``...
        (SecantusDB's ``--cache-size``, mongod's ``--wiredTigerCacheSizeGB``, at
        least 256M for mongod); ``None`` leaves the server's default (1G for
        SecantusDB, half the RAM for mongod). An in-memory SecantusDB keeps all
        its data in this cache and refuses writes beyond it.
    :param oplog: SecantusDB only: ``False`` starts it as a standalone server
        (``--standalone``), which keeps no oplog: every write is stored once
        instead of twice (the oplog holds a copy of each inserted document), at
        the price of change streams and transactions, which asyncassets does not
        use. mongod is always run standalone.

    With persistent storage, SecantusDB is started with ``--sync-on-commit`` so an
    acknowledged write survives a crash of the server process (``kill -9``) even
    without ``j=True``; mongod journals by default.

    :raises EmbeddedServerError: no server binary could be found.
    :raises ValueError: ``port`` is not between 1 and 65535, or ``cache_size`` is
        not a size like ``"256M"``.

    Usage::

        with EmbeddedServer() as server:
            client = pymongo.MongoClient(server.uri)   # mongodb://127.0.0.1:PORT/
    """

    def __init__(
        self,
        storage_path: str | os.PathLike[str] | None = None,
        *,
        port: int | None = None,
        binary: str | os.PathLike[str] | None = None,
        log_path: str | os.PathLike[str] | None = None,
        startup_timeout: float = 30.0,
        extra_args: Sequence[str] = (),
        cache_size: str | None = None,
        oplog: bool = True,
    ) -> None:
        if storage_path is None or os.fspath(storage_path) == MEMORY:
            self._storage: Path | None = None
        else:
            self._storage = Path(storage_path).expanduser().resolve()
        if port is not None and not 0 < port < 65536:
            raise ValueError(f"port must be between 1 and 65535, not {port}")
        self._port = port
        self._binary, self._kind = _resolve_binary(binary)
        self._log_path = Path(log_path).expanduser().resolve() if log_path is not None else None
        self.startup_timeout = startup_timeout
        self.extra_args = list(extra_args)
        self.cache_size = cache_size
        self._cache_bytes = _cache_bytes(cache_size) if cache_size is not None else None
        if not isinstance(oplog, bool):
            raise TypeError(f"oplog must be True or False, not {oplog!r}")
        self.oplog = oplog
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._runtime_dir: str | None = None
        self._finalizer: weakref.finalize[..., EmbeddedServer] | None = None

    # -- properties ---------------------------------------------------------

    @property
    def kind(self) -> ServerKind:
        """``"mongod"`` or ``"secantusdb"``: which server this runs."""
        return self._kind

    @property
    def binary(self) -> str:
        """The path of the executable this runs."""
        return self._binary

    @property
    def storage_path(self) -> Path | None:
        """The persistent data directory, or ``None`` for an ephemeral server."""
        return self._storage

    @property
    def port(self) -> int | None:
        """The loopback port; ``None`` until the first :meth:`start` picks one."""
        return self._port

    @property
    def uri(self) -> str:
        """The connection string, e.g. ``"mongodb://127.0.0.1:27017/"``.

        Append a database name to choose one: ``server.uri + "zoo"``.

        :raises EmbeddedServerError: the server was never started and has no port yet.
        """
        if self._port is None:
            raise EmbeddedServerError("The server has no port yet: call start() first.")
        return f"mongodb://{_HOST}:{self._port}/"

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs, else ``None``."""
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def running(self) -> bool:
        """Whether the server process is alive (it may have crashed since start)."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_path(self) -> Path | None:
        """The file the server logs to; ``None`` before the first start of an
        ephemeral server without ``log_path=``."""
        if self._log_path is not None:
            return self._log_path
        if self._storage is not None:
            return self._storage / _LOG_NAME
        return None

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> EmbeddedServer:
        """Launch the server and wait until it answers on the wire.

        Reopens the same storage on the same port when called again after
        :meth:`stop` or :meth:`kill`. Does nothing if the server is running.

        :returns: ``self``, so ``server = EmbeddedServer().start()`` works.
        :raises EmbeddedServerError: the port is taken, the process exited, or it
            did not answer within ``startup_timeout``; the message quotes the end
            of the server's log.
        """
        if self.running:
            return self
        self._reap()
        # A port the server has listened on (or the caller chose) is kept, so a
        # restart keeps the URI clients hold; it has to be free.
        auto = self._port is None
        if self._port is not None and _port_in_use(self._port):
            raise EmbeddedServerError(
                f"Port {self._port} on {_HOST} is already in use, so the "
                f"{self._kind} server cannot listen there. Stop whatever holds it, "
                "pick another port=, or omit port= to choose a free one."
            )
        if self._storage is not None:
            self._storage.mkdir(parents=True, exist_ok=True)
        if self._runtime_dir is None or not os.path.isdir(self._runtime_dir):
            self._runtime_dir = tempfile.mkdtemp(prefix="asyncassets-server-")
        if self._log_path is None and self._storage is None:
            self._log_path = Path(self._runtime_dir) / _LOG_NAME

        # A port picked here can be grabbed by someone else before the server
        # binds it: then pick another and retry.
        for attempt in range(1, (_PORT_ATTEMPTS if auto else 1) + 1):
            if auto:
                self._port = _free_port()
            try:
                self._launch_and_wait()
            except _PortTaken as exc:
                if auto and attempt < _PORT_ATTEMPTS:
                    continue
                if auto:
                    self._port = None
                raise EmbeddedServerError(str(exc)) from None
            except BaseException:
                if auto:
                    self._port = None
                raise
            return self
        raise AssertionError("unreachable")  # pragma: no cover

    def stop(self, timeout: float = 10) -> None:
        """Shut the server down cleanly: SIGTERM, then SIGKILL after ``timeout`` seconds.

        Persistent data is flushed and kept; an ephemeral server's data and
        temporary files are removed. Calling it again, or before :meth:`start`,
        does nothing.
        """
        if self._proc is not None:
            _end_process(self._proc, timeout, self._port)
        self._reap()
        if self._runtime_dir is not None:
            if self._log_path is not None and self._log_path.parent == Path(self._runtime_dir):
                self._log_path = None
            shutil.rmtree(self._runtime_dir, ignore_errors=True)
            self._runtime_dir = None

    def kill(self) -> None:
        """SIGKILL the server with no chance to clean up, as a crash would.

        For fault-injection tests: a later :meth:`start` reopens the same
        storage path on the same port, so persistent data written with
        journaling (``j=True``) is still there. An ephemeral server comes back
        empty. Does nothing if the server is not running.
        """
        if self._proc is not None:
            _signal_group(self._proc, getattr(signal, "SIGKILL", signal.SIGTERM))
            self._proc.wait()
        self._reap()

    def __enter__(self) -> EmbeddedServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = str(self._storage) if self._storage is not None else MEMORY
        state = f"running pid={self.pid}" if self.running else "stopped"
        return f"<EmbeddedServer {self._kind} {where} port={self._port} {state}>"

    # -- internals ----------------------------------------------------------

    def _command(self) -> list[str]:
        assert self._port is not None and self._runtime_dir is not None
        if self._kind == "mongod":
            if self._storage is not None:
                dbpath = self._storage
            else:
                # mongod has no in-memory engine outside Enterprise: a temporary
                # dbpath, wiped at each start so a restart after kill() comes
                # back empty, as SecantusDB's :memory: does.
                dbpath = Path(self._runtime_dir) / "db"
                shutil.rmtree(dbpath, ignore_errors=True)
                dbpath.mkdir()
            cache: list[str] = []
            if self._cache_bytes is not None:
                gigabytes = max(0.25, self._cache_bytes / 1024**3)
                cache = ["--wiredTigerCacheSizeGB", f"{gigabytes:g}"]
            return [
                self._binary,
                "--bind_ip", _HOST,
                "--port", str(self._port),
                "--dbpath", str(dbpath),
                *cache,
                *self.extra_args,
            ]  # fmt: skip
        # An explicit --config disables SecantusDB's auto-discovery of
        # ./secantusd.toml, ~/.secantus/... and /etc/secantus/..., so a stray file
        # cannot turn on auth or TLS; the flags below pin host, port and storage.
        config = Path(self._runtime_dir) / "secantusd.toml"
        config.write_text("# asyncassets: empty on purpose; everything is passed as flags\n")
        return [
            self._binary,
            "--config", str(config),
            "--host", _HOST,
            "--port", str(self._port),
            "--storage-path", str(self._storage) if self._storage is not None else MEMORY,
            *(["--sync-on-commit"] if self._storage is not None else []),
            *(["--cache-size", f"{max(1, self._cache_bytes // 1024**2)}M"]
              if self._cache_bytes is not None else []),
            *([] if self.oplog else ["--standalone"]),
            *self.extra_args,
        ]  # fmt: skip

    def _launch_and_wait(self) -> None:
        log_path = self.log_path
        assert log_path is not None and self._runtime_dir is not None
        log_path.parent.mkdir(parents=True, exist_ok=True)
        command = self._command()
        log_file = open(log_path, "ab")
        log_start = log_file.tell()
        env = dict(os.environ)
        # SecantusDB's :memory: store makes a temp dir that a SIGKILL leaves
        # behind; inside our runtime dir, stop() removes it.
        env["TMPDIR"] = self._runtime_dir
        try:
            proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=self._runtime_dir,
                env=env,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        except OSError as exc:
            log_file.close()
            raise EmbeddedServerError(
                f"Could not run {self._binary}: {exc}. {_INSTALL_HINT}"
            ) from exc
        self._proc, self._log_file = proc, log_file
        self._finalizer = weakref.finalize(self, _finalize, proc, self._runtime_dir)
        try:
            self._wait_until_ready(proc, log_path, log_start)
        except BaseException:
            _end_process(proc, timeout=5.0, port=self._port)
            self._reap()
            raise

    def _wait_until_ready(
        self, proc: subprocess.Popen[bytes], log_path: Path, log_start: int
    ) -> None:
        from pymongo import MongoClient
        from pymongo.errors import PyMongoError

        port = self._port
        started = time.monotonic()
        deadline = started + self.startup_timeout
        client: MongoClient[dict[str, object]] = MongoClient(
            _HOST,
            port,
            directConnection=True,
            serverSelectionTimeoutMS=250,
            connectTimeoutMS=250,
            socketTimeoutMS=5000,
            appname="asyncassets-embedded",
        )
        try:
            while True:
                code = proc.poll()
                if code is not None:
                    tail = _tail(log_path, log_start)
                    if self._storage is not None and _says_locked(tail):
                        raise EmbeddedServerError(
                            f"The data directory {self._storage} is in use by another "
                            f"server: {_lock_holder(self._storage)}. Stop that server, or "
                            "connect to it instead of starting one; a directory holds one "
                            f"server at a time.{_log_excerpt(log_path, tail)}"
                        )
                    message = (
                        f"The {self._kind} server ({self._binary}) exited with code {code} "
                        f"while starting on {_HOST}:{port}.{_log_excerpt(log_path, tail)}"
                    )
                    if "address already in use" in tail.lower() or "errno 98" in tail.lower():
                        raise _PortTaken(message)
                    raise EmbeddedServerError(message)
                try:
                    client.admin.command("ping")
                except PyMongoError:
                    if time.monotonic() >= deadline:
                        raise EmbeddedServerError(
                            f"The {self._kind} server ({self._binary}, pid {proc.pid}) did not "
                            f"answer on {_HOST}:{port} within {self.startup_timeout:g} s and "
                            f"was stopped. Raise startup_timeout= if the machine is slow."
                            f"{_log_excerpt(log_path, _tail(log_path, log_start))}"
                        ) from None
                    time.sleep(_POLL_INTERVAL)
                    continue
                self._check_it_is_ours(client, proc)
                return
        finally:
            client.close()

    def _check_it_is_ours(
        self, client: MongoClient[dict[str, object]], proc: subprocess.Popen[bytes]
    ) -> None:
        # The port was free a moment ago, but something may have grabbed it
        # before our server bound it: then the answer came from a stranger.
        from pymongo.errors import PyMongoError

        try:
            status = client.admin.command("serverStatus")
        except PyMongoError:
            return  # a server without serverStatus: trust the port check
        their_pid = status.get("pid")
        if their_pid is not None and int(their_pid) != proc.pid:
            raise _PortTaken(
                f"Another server (pid {int(their_pid)}) answers on {_HOST}:{self._port}, "
                f"so the {self._kind} server started there cannot listen. Pick another "
                "port=, or omit port= to choose a free one."
            )

    def _reap(self) -> None:
        """Forget a process that has exited and close our end of its log."""
        if self._proc is not None and self._proc.poll() is None:
            return
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        self._proc = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


#: What the servers log when another process holds their data directory.
_LOCKED_MESSAGES = (
    "already being managed by another process",  # WiredTiger (SecantusDB)
    "device or resource busy",
    "another mongod instance is already running",  # mongod
    "unable to lock the lock file",
)


def _says_locked(log_tail: str) -> bool:
    text = log_tail.lower()
    return any(message in text for message in _LOCKED_MESSAGES)


def _lock_holder(directory: Path) -> str:
    """Which process holds the data directory's lock, as far as can be told:
    ``pid 1234 (secantusd-py --storage-path ...)``, else a plain description."""
    pid: int | None = None
    mongod_lock = directory / "mongod.lock"
    with contextlib.suppress(OSError, ValueError):
        text = mongod_lock.read_text().strip()
        pid = int(text) if text else None
    if pid is None:
        pid = _posix_lock_pid(directory / "WiredTiger.lock")
    if pid is None:
        return "a process that this system does not name (see `lsof +D` on it)"
    command = ""
    with contextlib.suppress(OSError):
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        command = " ".join(part.decode(errors="replace") for part in raw.split(b"\0") if part)
    return f"pid {pid}" + (f" ({command[:200]})" if command else "")


def _posix_lock_pid(path: Path) -> int | None:
    """The process holding a POSIX lock on ``path``, from ``/proc/locks`` (Linux)."""
    try:
        info = path.stat()
        locks = Path("/proc/locks").read_text()
    except OSError:
        return None
    for line in locks.splitlines():
        # "1: POSIX  ADVISORY  WRITE 8438 fe:00:2154565 0 EOF"
        fields = line.split()
        if len(fields) < 6 or fields[1] != "POSIX":
            continue
        with contextlib.suppress(ValueError):
            major, minor, inode = fields[5].split(":")
            if (
                int(inode) == info.st_ino
                and int(major, 16) == os.major(info.st_dev)
                and int(minor, 16) == os.minor(info.st_dev)
            ):
                return int(fields[4])
    return None


_SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def _cache_bytes(size: str) -> int:
    """``"256M"`` as bytes.

    :raises ValueError: not a positive number with an optional K, M, G or T.
    """
    text = size.strip().upper().removesuffix("B") if isinstance(size, str) else ""
    number, unit = (text[:-1], text[-1]) if text and text[-1] in "KMGT" else (text, "")
    try:
        value = float(number) * _SIZE_UNITS[unit]
    except ValueError:
        value = 0
    if not value > 0:
        raise ValueError(f"cache_size must be a size such as '256M' or '1G', not {size!r}")
    return int(value)


class _PortTaken(Exception):
    """Startup failed because the port was taken between the check and the bind."""


def _tail(path: Path, start: int = 0, lines: int = 20, max_bytes: int = 8192) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            end = f.tell()
            f.seek(max(start, end - max_bytes))
            data = f.read()
    except OSError:
        return ""
    text = data.decode("utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:])


def _log_excerpt(path: Path, tail: str) -> str:
    if not tail.strip():
        return f"\nIts log ({path}) is empty."
    return f"\nLast lines of its log ({path}):\n{tail}"
