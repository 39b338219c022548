"""The ``asyncassets`` command: files in GridFS from the shell, sweep, check, demo.

.. code-block:: console

    $ asyncassets put marmot.jpg --meta genus=Marmota
    6745c0ffee0123456789abcd
    $ asyncassets ls
    $ asyncassets cat 6745c0ffee0123456789abcd > copy.jpg
    $ asyncassets --import myapp.models sweep --grace 1d --dry-run

Which server: ``--uri``, else the ``ASYNCASSETS_URI`` environment variable, else
``MONGODB_URI``, else the *embedded default*: a local server (``mongod`` if it is
on ``PATH``, else SecantusDB from ``pip install 'asyncassets[embedded]'``) with
its data in :func:`~asyncassets.embedded.default_data_dir`.

The embedded default is started by each command and stopped when the command
ends. Nothing keeps running in the background, no state file can go stale, and
two commands never share a half-started server: a lock file in the data
directory makes a second command wait until the first is done. The price is
the server's start-up (about half a second for SecantusDB) on every command; for
many commands in a row, start a server yourself and set ``ASYNCASSETS_URI``.

Exit status: 0 on success, 1 on an error (one line on stderr; ``--debug`` adds
the traceback), 2 on a usage error, 3 when ``check`` or ``verify`` found problems.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import hashlib
import importlib
import json
import mimetypes
import os
import re
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from bson import ObjectId

from . import __version__
from .errors import AsyncAssetsError
from .ops import _human_bytes

__all__ = ["CLIError", "build_parser", "main", "mask_uri", "parse_duration"]

#: Transfers larger than this get a progress bar (on a terminal, with tqdm installed).
PROGRESS_THRESHOLD = 4 * 1024 * 1024
#: Exit status when ``check`` or ``verify`` found problems.
EXIT_PROBLEMS = 3
_LOCK_NAME = "asyncassets-cli.lock"
_LOCK_TIMEOUT = 120.0
_URI_ENVS = ("ASYNCASSETS_URI", "MONGODB_URI")


class CLIError(AsyncAssetsError):
    """A problem to report on one line, without a traceback."""


# -- small parsers ---------------------------------------------------------------------

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([wdhms])")
_DURATION_UNITS = {"w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1}


def parse_duration(text: str) -> dt.timedelta:
    """Parse ``90s``, ``30m``, ``12h``, ``1d``, ``2w``, ``1d12h`` or plain seconds.

    :raises CLIError: the text is none of these.
    """
    value = text.strip().lower()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        if seconds < 0 or seconds != seconds:
            raise CLIError(f"bad duration {text!r}: it must not be negative")
        return dt.timedelta(seconds=seconds)
    parts = _DURATION_PART.findall(value)
    if not value or "".join(n + u for n, u in parts) != value:
        raise CLIError(
            f"bad duration {text!r}: use e.g. 90s, 30m, 12h, 1d, 1d12h or a number of seconds"
        )
    return dt.timedelta(seconds=sum(float(n) * _DURATION_UNITS[u] for n, u in parts))


def _parse_pairs(items: Sequence[str] | None, option: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise CLIError(f"bad {option} {item!r}: expected KEY=VALUE")
        if key.startswith("$") or "." in key or "\0" in key:
            raise CLIError(f"bad {option} {item!r}: a key cannot start with '$' or contain '.'")
        pairs[key] = value
    return pairs


_CREDENTIALS = re.compile(r"(?P<scheme>[a-z+]+://)(?P<user>[^:@/]*):(?P<secret>[^@/]*)@")


def mask_uri(uri: str) -> str:
    """Return ``uri`` with its password replaced by ``***``."""
    return _CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:***@", uri)


def _id_candidates(text: str) -> list[Any]:
    """The ``_id`` values a command-line id may stand for, most likely first."""
    found: list[Any] = []
    if ObjectId.is_valid(text):
        found.append(ObjectId(text))
    found.append(text)
    if re.fullmatch(r"-?\d+", text):
        found.append(int(text))
    return found


def _show_id(value: Any) -> str:
    return str(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, ObjectId):
        return str(value)
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.timezone.utc)
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, bytes):
        return value.hex()
    if hasattr(value, "_asdict"):
        return {k: _jsonable(v) for k, v in value._asdict().items()}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _print_json(value: Any) -> None:
    print(json.dumps(_jsonable(value), indent=2, sort_keys=False))


def _content_type(doc: dict[str, Any]) -> str | None:
    meta = doc.get("metadata") or {}
    for value in (meta.get("content_type"), meta.get("contentType"), doc.get("contentType")):
        if value is not None:
            return str(value)
    return None


def _file_summary(doc: dict[str, Any], bucket: str) -> dict[str, Any]:
    meta = dict(doc.get("metadata") or {})
    sha = meta.pop("sha256", None)
    meta.pop("content_type", None)
    return {
        "id": doc["_id"],
        "bucket": bucket,
        "filename": doc.get("filename"),
        "length": doc.get("length"),
        "chunk_size": doc.get("chunkSize"),
        "upload_date": doc.get("uploadDate"),
        "content_type": _content_type(doc),
        "sha256": sha,
        "metadata": meta,
    }


# -- progress --------------------------------------------------------------------------


class _Progress:
    """A progress bar on stderr, or nothing.

    Shown only when stderr is a terminal, the transfer is over
    :data:`PROGRESS_THRESHOLD` and tqdm is installed; piped output stays clean.
    """

    def __init__(self, total: int | None, label: str) -> None:
        self._bar: Any = None
        if total is None or total <= PROGRESS_THRESHOLD or not _stderr_is_tty():
            return
        try:
            from tqdm import tqdm
        except ImportError:
            return
        self._bar = tqdm(
            total=total, desc=label, unit="B", unit_scale=True, unit_divisor=1024,
            file=sys.stderr, leave=False, dynamic_ncols=True,
        )

    def update(self, amount: int) -> None:
        if self._bar is not None:
            self._bar.update(amount)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class _CountingReader:
    """A binary file wrapper that reports what is read to a progress bar."""

    def __init__(self, raw: IO[bytes], progress: _Progress) -> None:
        self._raw = raw
        self._progress = progress

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self._progress.update(len(data))
        return data


# -- connection ------------------------------------------------------------------------


@dataclasses.dataclass
class _Target:
    uri: str
    db: str
    source: str
    server: Any = None
    lock: Any = None

    def describe(self) -> str:
        if self.server is not None:
            where = self.server.storage_path or "memory"
            return (
                f"using the embedded {self.server.kind} server at {self.uri} "
                f"(data in {where}), database {self.db!r}"
            )
        return f"using {mask_uri(self.uri)} (from {self.source}), database {self.db!r}"


def _uri_from(args: argparse.Namespace) -> tuple[str, str] | None:
    if args.uri:
        return args.uri, "--uri"
    for name in _URI_ENVS:
        value = os.environ.get(name)
        if value:
            return value, f"${name}"
    return None


def _db_from(uri: str | None, explicit: str | None) -> str:
    from .connection import DEFAULT_DB, _db_name_from

    if explicit:
        return explicit
    try:
        return _db_name_from(uri, None) if uri else DEFAULT_DB
    except Exception as exc:  # pymongo's InvalidURI and friends
        raise CLIError(f"bad URI {mask_uri(uri or '')!r}: {exc}") from exc


@contextlib.contextmanager
def _data_dir_lock(directory: Path, verbose: bool) -> Iterator[None]:
    """Hold an exclusive lock on the data directory for the whole command."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; commands must not overlap
        yield
        return
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / _LOCK_NAME
    with open(path, "a+b") as handle:
        deadline = time.monotonic() + _LOCK_TIMEOUT
        said = False
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise CLIError(
                        f"another asyncassets command has been using {directory} for "
                        f"{_LOCK_TIMEOUT:.0f} s (lock {path}); wait for it or stop it"
                    ) from None
                if verbose and not said:
                    _note(f"waiting for another asyncassets command using {directory}")
                    said = True
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def _server_for(args: argparse.Namespace) -> Iterator[_Target]:
    """The server a command talks to; an embedded one is stopped when it ends."""
    found = _uri_from(args)
    if found is not None:
        uri, source = found
        yield _Target(uri, _db_from(uri, args.db), source)
        return
    from .connection import DEFAULT_DB
    from .embedded import EmbeddedServer, default_data_dir

    data_dir = default_data_dir()
    with _data_dir_lock(data_dir, args.verbose):
        server = EmbeddedServer(data_dir)
        if args.verbose:
            _note(f"starting the embedded {server.kind} server (data in {data_dir})")
        server.start()
        try:
            yield _Target(server.uri, args.db or DEFAULT_DB, "embedded default", server)
        finally:
            server.stop()
            if args.verbose:
                _note("stopped the embedded server")


async def _connect(uri: str, db: str, timeout: float) -> None:
    from pymongo.errors import ConfigurationError

    from .connection import DEFAULT_ALIAS, connect, disconnect, registered_aliases

    # Models loaded with --import may connect at import time: the server this
    # command was pointed at wins.
    if DEFAULT_ALIAS in registered_aliases():
        await disconnect(DEFAULT_ALIAS)
    try:
        connect(host=uri, db=db, **_client_options(uri, timeout))
    except (ValueError, ConfigurationError) as exc:
        raise CLIError(f"bad URI {mask_uri(uri)!r}: {_first_line(str(exc))}") from exc


def _client_options(uri: str, timeout: float) -> dict[str, Any]:
    if "serverselectiontimeoutms" in uri.lower():
        return {}
    return {"serverSelectionTimeoutMS": max(1, int(timeout * 1000))}


def _note(message: str) -> None:
    print(f"asyncassets: {message}", file=sys.stderr)


# -- commands --------------------------------------------------------------------------


class _Context:
    """What a command needs: its arguments, database, and the server description."""

    def __init__(self, args: argparse.Namespace, target: _Target) -> None:
        from .connection import get_db

        self.args = args
        self.target = target
        self.db = get_db()

    def bucket(self, name: str | None = None) -> Any:
        from .storage.gridfs import GridBucket

        return GridBucket(self.db, name or getattr(self.args, "bucket", None) or "fs")

    def where(self, bucket: str) -> str:
        return f"bucket {bucket!r} of database {self.db.name!r}"

    async def find(self, text: str, bucket: str | None = None) -> dict[str, Any]:
        grid = self.bucket(bucket)
        candidates = _id_candidates(text)
        docs = await grid.find_many(candidates)
        for candidate in candidates:
            if candidate in docs:
                return docs[candidate]
        raise CLIError(f"no file with id {text!r} in {self.where(grid.name)}")


def _preflight(args: argparse.Namespace) -> None:
    """Check the local side of a command (files, options) before any server starts."""
    if args.command == "put":
        args.meta_pairs = _parse_pairs(args.meta, "--meta")
        if args.files.count("-") > 1:
            raise CLIError("'-' (standard input) can be given only once")
        args.sizes = {}
        for path in args.files:
            if path == "-":
                continue
            if not os.path.exists(path):
                raise CLIError(f"no such file: {path}")
            if not os.path.isfile(path):
                raise CLIError(f"not a regular file: {path}")
            args.sizes[path] = os.path.getsize(path)
    elif args.command == "ls":
        args.query = _ls_query(_parse_pairs(args.filter, "--filter"))
        if args.limit < 0:
            raise CLIError(f"bad --limit {args.limit}: it must not be negative")
    elif args.command == "sweep":
        args.grace_delta = parse_duration(args.grace)
    elif args.command == "get" and args.output not in (None, "-"):
        target = Path(args.output)
        parent = target if target.is_dir() else target.parent
        if not parent.is_dir():
            raise CLIError(f"no such directory: {parent}")
    if args.timeout <= 0:
        raise CLIError(f"bad --timeout {args.timeout:g}: it must be positive")


async def _cmd_put(ctx: _Context) -> int:
    args = ctx.args
    meta = args.meta_pairs
    paths = list(args.files)
    bucket = ctx.bucket()
    await bucket.ensure_indexes()
    results = []
    for path in paths:
        content_type = args.content_type
        if path == "-":
            filename = None
            metadata = {**({"content_type": content_type} if content_type else {}), **meta}
            doc = await bucket.upload(sys.stdin.buffer, metadata=metadata)
        else:
            filename = os.path.basename(path)
            content_type = content_type or mimetypes.guess_type(filename)[0]
            metadata = {**({"content_type": content_type} if content_type else {}), **meta}
            progress = _Progress(args.sizes[path], f"put {filename}")
            try:
                # One command, one task: nothing else waits while the disk is read.
                with open(path, "rb") as raw:  # noqa: ASYNC230
                    doc = await bucket.upload(
                        _CountingReader(raw, progress), filename=filename, metadata=metadata
                    )
            finally:
                progress.close()
        results.append(_file_summary(doc, bucket.name))
        if not args.json:
            print(_show_id(doc["_id"]), flush=True)
    if args.json:
        _print_json(results)
    return 0


async def _write_file(ctx: _Context, doc: dict[str, Any], out: IO[bytes], label: str) -> int:
    progress = _Progress(int(doc.get("length") or 0), label)
    written = 0
    try:
        async with ctx.bucket().open_download(doc) as stream:
            async for piece in stream:
                out.write(piece)
                written += len(piece)
                progress.update(len(piece))
    finally:
        progress.close()
    return written


async def _cmd_get(ctx: _Context) -> int:
    args = ctx.args
    doc = await ctx.find(args.id)
    if args.output == "-":
        await _write_file(ctx, doc, sys.stdout.buffer, "get")
        sys.stdout.buffer.flush()
        return 0
    target = _output_path(args.output, args.force, _default_name(doc))
    parent = target.parent
    # Written to a temporary file first, so a failed download leaves no half file.
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=parent)
    try:
        with os.fdopen(fd, "wb") as out:
            written = await _write_file(ctx, doc, out, f"get {target.name}")
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _note(f"wrote {written} bytes to {target}")
    return 0


def _output_path(output: str | None, force: bool, default: str) -> Path:
    if output:
        target = Path(output)
        return target / default if target.is_dir() else target
    target = Path(default)
    if target.exists() and not force:
        raise CLIError(f"{target} already exists: pass -o PATH, or --force to overwrite it")
    return target


def _default_name(doc: dict[str, Any]) -> str:
    name = os.path.basename(str(doc.get("filename") or ""))
    if name in ("", ".", ".."):
        name = _show_id(doc["_id"])
    return name


async def _cmd_cat(ctx: _Context) -> int:
    doc = await ctx.find(ctx.args.id)
    await _write_file(ctx, doc, sys.stdout.buffer, "cat")
    sys.stdout.buffer.flush()
    return 0


_TOP_LEVEL_KEYS = {"filename": "filename", "id": "_id", "_id": "_id"}


def _ls_query(filters: dict[str, str]) -> dict[str, Any]:
    query: dict[str, Any] = {}
    for key, value in filters.items():
        if key in ("id", "_id"):
            query["_id"] = {"$in": _id_candidates(value)}
        elif key == "filename":
            query["filename"] = value
        elif key in ("length", "size"):
            if not re.fullmatch(r"\d+", value):
                raise CLIError(f"bad --filter {key}={value!r}: the length is a number of bytes")
            query["length"] = int(value)
        elif key in ("content_type", "contentType"):
            query["metadata.content_type"] = value
        else:
            query[f"metadata.{key}"] = value
    return query


async def _cmd_ls(ctx: _Context) -> int:
    args = ctx.args
    bucket = ctx.bucket()
    order = [("uploadDate", 1), ("_id", 1)]
    cursor = bucket.files.find(args.query, sort=order, limit=args.limit or 0)
    if args.json:
        rows = [_file_summary(doc, bucket.name) async for doc in cursor]
        _print_json(rows)
        return 0
    count = 0
    async for doc in cursor:
        if count == 0:
            print(f"{'ID':<24}  {'SIZE':>10}  {'UPLOADED (UTC)':<19}  {'TYPE':<24}  NAME")
        count += 1
        uploaded = doc.get("uploadDate")
        when = uploaded.strftime("%Y-%m-%d %H:%M:%S") if isinstance(uploaded, dt.datetime) else "-"
        print(
            f"{_show_id(doc['_id']):<24}  {_human_bytes(int(doc.get('length') or 0)):>10}  "
            f"{when:<19}  {(_content_type(doc) or '-'):<24}  {doc.get('filename') or '-'}"
        )
    if args.verbose or count == 0:
        _note(f"{count} file(s) in {ctx.where(bucket.name)}")
    return 0


async def _cmd_info(ctx: _Context) -> int:
    doc = await ctx.find(ctx.args.id)
    summary = _file_summary(doc, ctx.bucket().name)
    if ctx.args.json:
        _print_json(summary)
        return 0
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        if key == "metadata":
            value = json.dumps(_jsonable(value), sort_keys=True) if value else "{}"
        elif key == "length" and isinstance(value, int):
            value = f"{value} ({_human_bytes(value)})"
        elif isinstance(value, dt.datetime):
            value = _jsonable(value)
        print(f"{key:<{width}}  {value if value is not None else '-'}")
    return 0


async def _cmd_rm(ctx: _Context) -> int:
    # Every id is looked up first: a typo in one deletes none.
    docs = [await ctx.find(text) for text in ctx.args.ids]
    bucket = ctx.bucket()
    for doc in docs:
        await bucket.delete(doc["_id"])
        print(f"deleted {_show_id(doc['_id'])}", flush=True)
    return 0


async def _cmd_verify(ctx: _Context) -> int:
    from .errors import CorruptFile

    args = ctx.args
    bucket = ctx.bucket()
    results: list[dict[str, Any]] = []
    problems = 0

    # Unknown ids fail before anything is read.
    chosen = [await ctx.find(text) for text in args.ids]

    async def files() -> Any:
        if chosen:
            for doc in chosen:
                yield doc
        else:
            async for doc in bucket.files.find({}, sort=[("_id", 1)]):
                yield doc

    async for doc in files():
        expected = (doc.get("metadata") or {}).get("sha256")
        digest = hashlib.sha256()
        detail = None
        try:
            progress = _Progress(int(doc.get("length") or 0), f"verify {_show_id(doc['_id'])}")
            try:
                async with bucket.open_download(doc) as stream:
                    async for piece in stream:
                        digest.update(piece)
                        progress.update(len(piece))
            finally:
                progress.close()
        except CorruptFile as exc:
            status, detail = "corrupt", str(exc)
        else:
            if not isinstance(expected, str):
                status = "unverifiable"
                detail = "no sha256 recorded at upload"
            elif digest.hexdigest() == expected.lower():
                status = "ok"
            else:
                status = "mismatch"
                detail = f"sha256 is {digest.hexdigest()}, {expected} was recorded"
        if status in ("corrupt", "mismatch"):
            problems += 1
        results.append({"id": doc["_id"], "status": status, "detail": detail})
        if not args.json:
            line = f"{status.upper():<12} {_show_id(doc['_id'])}"
            print(line + (f"  ({detail})" if detail else ""), flush=True)
    if args.json:
        _print_json(results)
    elif not results:
        _note(f"no files in {ctx.where(bucket.name)}")
    return EXIT_PROBLEMS if problems else 0


def _import_models(modules: Sequence[str] | None) -> None:
    if not modules:
        return
    # A console script does not have the working directory on sys.path; python -m does.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise CLIError(f"cannot import {name!r} (--import): {exc}") from exc


def _report_dict(report: Any) -> dict[str, Any]:
    data = {f.name: getattr(report, f.name) for f in dataclasses.fields(report)}
    if hasattr(report, "ok"):
        data["ok"] = report.ok
    return data


async def _cmd_sweep(ctx: _Context) -> int:
    from .ops import declared_buckets, sweep_orphans

    args = ctx.args
    grace = args.grace_delta
    declared = {name for alias, name in declared_buckets() if alias == "default"}
    if not args.bucket and not declared:
        raise CLIError(
            "nothing to sweep: no Document class declares a bucket. Load your models with "
            "--import yourapp.models so the files they reference are kept"
        )
    undeclared = [b for b in args.bucket or () if b not in declared]
    if undeclared and not args.force:
        raise CLIError(
            f"bucket {undeclared[0]!r} is declared by no imported Document class, so every "
            f"file in it older than {args.grace} would be deleted. Load your models with "
            "--import, or pass --force if that is what you want"
        )
    report = await sweep_orphans(grace=grace, dry_run=args.dry_run, buckets=args.bucket or None,
                                 alias="default")
    if args.json:
        _print_json(_report_dict(report))
    else:
        print(report)
    return 0


async def _cmd_check(ctx: _Context) -> int:
    from .ops import check

    args = ctx.args
    report = await check(verify=args.verify, buckets=args.bucket or None, alias="default")
    if args.json:
        _print_json(_report_dict(report))
    else:
        print(report)
    return 0 if report.ok else EXIT_PROBLEMS


_COMMANDS = {
    "put": _cmd_put,
    "get": _cmd_get,
    "cat": _cmd_cat,
    "ls": _cmd_ls,
    "info": _cmd_info,
    "rm": _cmd_rm,
    "verify": _cmd_verify,
    "sweep": _cmd_sweep,
    "check": _cmd_check,
}


async def _run_command(args: argparse.Namespace, target: _Target) -> int:
    from .connection import disconnect

    await _connect(target.uri, target.db, args.timeout)
    try:
        ctx = _Context(args, target)
        # Fail early, with the URI, when the server is not there.
        await ctx.db.command("ping")
        return await _COMMANDS[args.command](ctx)
    finally:
        await disconnect()


# -- demo ------------------------------------------------------------------------------

_DEMO_TEXT = b"Marmota marmota, the Alpine marmot, whistles when an eagle comes.\n"


def _run_demo(args: argparse.Namespace) -> int:
    """Run the tour on an ephemeral embedded server (or ``--uri``, in a scratch database)."""
    from .embedded import EmbeddedServer

    server = None
    if args.uri:
        uri, db = args.uri, f"asyncassets_demo_{uuid.uuid4().hex[:8]}"
        print(f"asyncassets demo on {mask_uri(uri)}, scratch database {db!r} (dropped at the end)")
    else:
        server = EmbeddedServer()
        print(f"asyncassets demo: starting a throwaway {server.kind} server (in memory)...")
        server.start()
        uri, db = server.uri, "asyncassets_demo"
        print(f"  server at {uri}, database {db!r}")
    try:
        return asyncio.run(_demo(uri, db, args.timeout, drop=server is None))
    finally:
        if server is not None:
            server.stop()
            print("Stopped the server; nothing was left behind.")


def _demo_class() -> type:
    from .document import Document
    from .fields import FileField, StringField

    class Photo(Document):
        title = StringField(required=True)
        image = FileField(collection_name="demo_images", chunk_size=64 * 1024)
        meta = {"collection": "demo_photos"}

    return Photo


def _step(number: int, name: str, code: str) -> None:
    lines = code.splitlines()
    print(f"\n[{number}/6] {name:<8} {lines[0]}")
    for line in lines[1:]:
        print(f"{'':15}{line}")


def _result(text: str) -> None:
    print(f"{'':10}-> {text}")


async def _demo(uri: str, db_name: str, timeout: float, drop: bool) -> int:
    from .connection import disconnect, get_client, get_db
    from .ops import check
    from .storage.gridfs import GridBucket

    await _connect(uri, db_name, timeout)
    try:
        await get_db().command("ping")
        photo_cls = _demo_class()
        bucket = GridBucket(get_db(), "demo_images")
        print(
            "\n  class Photo(Document):\n"
            "      title = StringField(required=True)\n"
            '      image = FileField(collection_name="demo_images", chunk_size=64 * 1024)'
        )
        data = _DEMO_TEXT * 3000

        _step(1, "put", 'photo = Photo(title="marmot")\n'
              'await photo.image.put(data, content_type="text/plain", filename="marmot.txt")\n'
              "await photo.save()")
        photo = photo_cls(title="marmot")
        await photo.image.put(data, content_type="text/plain", filename="marmot.txt")
        await photo.save()
        first_id = photo.image.file_id
        _result(f"saved Photo {photo.pk}; its file {first_id} holds {len(data):,} bytes")

        _step(2, "read", 'photo = await Photo.objects(title="marmot").first()\n'
              "data = await photo.image.read()")
        photo = await photo_cls.objects(title="marmot").first()
        back = await photo.image.read()
        if back != data:
            raise CLIError("demo: the bytes read back differ from the bytes stored")
        _result(f"{len(back):,} bytes, identical; content_type {photo.image.content_type!r}, "
                f"filename {photo.image.filename!r}")

        _step(3, "stream", "async for piece in photo.image.stream():\n    ...")
        sizes = [len(piece) async for piece in photo.image.stream()]
        _result(f"{len(sizes)} pieces of at most one chunk: "
                f"{' + '.join(str(s) for s in sizes)} bytes")

        new_data = b"A marmot hibernates for up to nine months a year.\n"
        _step(4, "replace", 'await photo.image.replace(new_data, content_type="text/plain")')
        await photo.image.replace(new_data, content_type="text/plain")
        stored = await photo_cls.objects(title="marmot").first()
        old_gone = await bucket.find(first_id) is None
        _result(f"the document now holds file {stored.image.file_id} ({len(new_data)} bytes); "
                f"old file {first_id} {'deleted' if old_gone else 'STILL THERE'}")

        _step(5, "delete", "await photo.delete()")
        await photo.delete()
        left = await bucket.files.count_documents({})
        docs = await photo_cls.objects.count()
        _result(f"documents left: {docs}, files left in the bucket: {left} (the file went "
                "with its document)")

        _step(6, "check", "report = await asyncassets.check()")
        report = await check(buckets=["demo_images"])
        _result("consistent: no dangling reference, orphan or bad chunk" if report.ok
                else f"problems:\n{report}")
        if not (old_gone and left == 0 and docs == 0 and report.ok):
            raise CLIError("demo: the database is not in the state the tour expects")
        print("\nDone: put, read, stream, replace and delete, all awaited.")
        return 0
    finally:
        if drop:
            with contextlib.suppress(Exception):
                await get_client().drop_database(db_name)
        await disconnect()


# -- parser ----------------------------------------------------------------------------


def _add_common(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """Options accepted before and after the command (``asyncassets -v ls`` = ``ls -v``)."""

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    group = parser.add_argument_group("connection and output")
    group.add_argument(
        "--uri", default=default(None),
        help="MongoDB URI (default: $ASYNCASSETS_URI, else $MONGODB_URI, else the "
        "embedded server with data in the user data directory)",
    )
    group.add_argument(
        "--db", default=default(None),
        help="database name (default: the URI's, else 'asyncassets')",
    )
    group.add_argument(
        "--timeout", type=float, default=default(10.0), metavar="SECONDS",
        help="how long to wait for the server (default: 10)",
    )
    group.add_argument(
        "--import", dest="imports", action="append", default=default(None), metavar="MODULE",
        help="import MODULE first, so its Document classes count for sweep and check "
        "(repeatable)",
    )
    group.add_argument(
        "-v", "--verbose", action="store_true", default=default(False),
        help="say which server is used, and more",
    )
    group.add_argument(
        "--debug", action="store_true", default=default(False),
        help="show the traceback of an error",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``asyncassets`` command."""
    parser = argparse.ArgumentParser(
        prog="asyncassets",
        description="Store, fetch and look after GridFS files; sweep orphans and check "
        "consistency. Without --uri or $ASYNCASSETS_URI/$MONGODB_URI, an embedded "
        "server is started for each command, with its data in the user data directory.",
        epilog="Exit status: 0 ok, 1 error, 2 usage error, 3 check/verify found problems.",
    )
    parser.add_argument("--version", action="version", version=f"asyncassets {__version__}")
    _add_common(parser, suppress=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        _add_common(sub, suppress=True)
        return sub

    def bucket_option(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--bucket", default="fs", help="GridFS bucket name (default: fs)")

    sub = command("put", "upload files; print the id of each")
    sub.add_argument("files", nargs="+", metavar="FILE", help="a file to upload, or - for stdin")
    sub.add_argument("--content-type", metavar="TYPE",
                     help="MIME type (default: guessed from the file name)")
    sub.add_argument("--meta", action="append", metavar="KEY=VALUE",
                     help="metadata to store with the files (repeatable)")
    bucket_option(sub)
    sub.add_argument("--json", action="store_true", help="print the new files as JSON")

    sub = command("get", "download a file")
    sub.add_argument("id", metavar="ID")
    sub.add_argument("-o", "--output", metavar="PATH",
                     help="where to write it; - for stdout (default: the stored file name)")
    sub.add_argument("--force", action="store_true",
                     help="overwrite the default output file if it exists")
    bucket_option(sub)

    sub = command("cat", "write a file's bytes to stdout")
    sub.add_argument("id", metavar="ID")
    bucket_option(sub)

    sub = command("ls", "list files, oldest first")
    bucket_option(sub)
    sub.add_argument("--filter", action="append", metavar="KEY=VALUE",
                     help="only files whose metadata KEY equals VALUE; filename, content_type "
                     "and length are understood too (repeatable)")
    sub.add_argument("--limit", type=int, default=0, metavar="N", help="at most N files")
    sub.add_argument("--json", action="store_true", help="print JSON")

    sub = command("info", "show a file's metadata")
    sub.add_argument("id", metavar="ID")
    bucket_option(sub)
    sub.add_argument("--json", action="store_true", help="print JSON")

    sub = command("rm", "delete files (all ids are checked before any is deleted)")
    sub.add_argument("ids", nargs="+", metavar="ID")
    bucket_option(sub)

    sub = command("verify", "check files against the SHA-256 recorded at upload")
    sub.add_argument("ids", nargs="*", metavar="ID", help="files to verify (default: all)")
    bucket_option(sub)
    sub.add_argument("--json", action="store_true", help="print JSON")

    sub = command("sweep", "delete orphaned files and chunks (see docs/operations)")
    sub.add_argument("--grace", default="1d", metavar="DURATION",
                     help="keep orphans younger than this: 90s, 30m, 12h, 1d... (default: 1d)")
    sub.add_argument("--dry-run", action="store_true", help="report, delete nothing")
    sub.add_argument("--bucket", action="append", metavar="NAME",
                     help="sweep only this bucket (repeatable; default: every bucket the "
                     "imported Document classes declare)")
    sub.add_argument("--force", action="store_true",
                     help="sweep a --bucket that no imported class declares")
    sub.add_argument("--json", action="store_true", help="print the report as JSON")

    sub = command("check", "report dangling references, orphans and corrupt files")
    sub.add_argument("--verify", action="store_true", help="also compare checksums (reads all)")
    sub.add_argument("--bucket", action="append", metavar="NAME",
                     help="check only this bucket (repeatable; default: all)")
    sub.add_argument("--json", action="store_true", help="print the report as JSON")

    command("demo", "a guided tour on a throwaway server: put, read, stream, replace, delete")
    return parser


# -- errors ----------------------------------------------------------------------------


def _one_line(exc: BaseException, uri: str | None) -> str:
    from pymongo.errors import ConnectionFailure, OperationFailure, PyMongoError

    from .errors import AsyncAssetsError, EmbeddedServerError

    where = mask_uri(uri) if uri else "the server"
    if isinstance(exc, CLIError):
        return str(exc)
    if isinstance(exc, ConnectionFailure):
        reason = str(exc).split(", Timeout:")[0].split(" (configured timeouts")[0]
        return f"cannot reach MongoDB at {where}: {_first_line(reason)}"
    if isinstance(exc, OperationFailure) and exc.code in (13, 18):
        return f"not authorised by {where}: {_first_line(str(exc))}"
    if isinstance(exc, EmbeddedServerError):
        return f"the embedded server failed: {_first_line(str(exc))} (--debug shows its log)"
    if isinstance(exc, OSError) and exc.strerror:
        name = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror}{name}"
    if isinstance(exc, (AsyncAssetsError, PyMongoError)):
        return _first_line(str(exc))
    return f"{type(exc).__name__}: {_first_line(str(exc))} (--debug shows the traceback)"


def _first_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return mask_uri(line)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``asyncassets`` command; return its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    uri: str | None = None
    try:
        found = _uri_from(args)
        uri = found[0] if found else None
        if args.command == "demo":
            return _run_demo(args)
        _preflight(args)
        _import_models(args.imports)
        with _server_for(args) as target:
            uri = target.uri
            if args.verbose:
                _note(target.describe())
            return asyncio.run(_run_command(args, target))
    except KeyboardInterrupt:
        _note("interrupted")
        return 130
    except BrokenPipeError:
        # The reader went away (`asyncassets cat ID | head`): not an error.
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 0
    except Exception as exc:
        if args.debug:
            traceback.print_exc()
        print(f"asyncassets: error: {_one_line(exc, uri)}", file=sys.stderr)
        return 1

