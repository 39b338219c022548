"""The commands that talk to a server: put, get, cat, ls, info, rm, verify, sweep, check.

The file commands work on one store: the GridFS bucket of ``--bucket``, or the
catalogue of the directory or S3 bucket of ``--storage`` (:mod:`.storages`);
both answer the same calls. ``sweep`` and ``check`` work on the storages the
imported Document classes declare.

Bytes are read back only through :mod:`asyncassets.storage.read` and facts about
a files document come only from :mod:`asyncassets.storage.catalogue`, so the
command line shows a compressed file exactly as the file proxy does (its
original bytes and length) and ``verify`` decides exactly as
:func:`~asyncassets.storage.read.verify_file`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib
import json
import mimetypes
import os
import re
import sys
import tempfile
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import IO, Any

from ..assets import RESERVED_KEYS, AssetManager
from ..connection import DEFAULT_ALIAS, disconnect, get_db
from ..errors import (
    ChecksumMissing,
    CLIError,
    CorruptFile,
    FileDeletedWhileReading,
    IntegrityError,
)
from ..files.names import sanitize_filename
from ..ops import _human_bytes, check, declared_buckets, sweep_orphans
from ..storage import GridFSStorage, Storage, Store
from ..storage.catalogue import content_type_of
from ..storage.gridfs import GridBucket
from ..storage.read import iter_original, verify_file
from .assets import cmd_assets, parse_where
from .output import (
    CountingReader,
    Progress,
    file_summary,
    jsonable,
    note,
    print_json,
    printable,
    report_dict,
    show_id,
    size_of,
)
from .parser import id_candidates, parse_duration, parse_pairs
from .server import Target, connect_to
from .storages import storage_from
from .transfer import cmd_transfer

__all__ = [
    "COMMANDS",
    "EXIT_PROBLEMS",
    "Context",
    "LsFilter",
    "import_models",
    "preflight",
    "run_command",
]

#: Exit status when ``check`` or ``verify`` found problems.
EXIT_PROBLEMS = 3


class Context:
    """What a command needs: its arguments, database, and the server description."""

    def __init__(self, args: argparse.Namespace, target: Target) -> None:
        self.args = args
        self.target = target
        self.db = get_db()
        self.storage: Storage | None = getattr(args, "storage_obj", None)
        self._store: Store | None = None

    def bucket(self, name: str | None = None) -> Store:
        """The store the file commands work on: the catalogue of ``--storage``, else
        the GridFS ``--bucket`` (or ``name``) of the command's database."""
        if self.storage is not None:
            if self._store is None:
                self._store = self.storage.bind(self.db)
            return self._store
        return GridBucket(self.db, name or getattr(self.args, "bucket", None) or "fs")

    def where(self, bucket: str) -> str:
        """``bucket 'fs' of database 'x'`` (or ``catalogue ... (file:///...)``), for messages."""
        if self.storage is not None:
            return (
                f"catalogue {bucket!r} of database {self.db.name!r} ({self.storage.url})"
            )
        return f"bucket {bucket!r} of database {self.db.name!r}"

    async def aclose(self) -> None:
        """Close the object store's client (S3's connections), if one was opened."""
        store, self._store = self._store, None
        closer = getattr(getattr(store, "blobs", None), "aclose", None)
        if closer is not None:
            await closer()

    async def find(self, text: str, bucket: str | None = None) -> dict[str, Any]:
        """The files document of the id the user typed.

        :raises CLIError: no file has that id.
        """
        grid = self.bucket(bucket)
        candidates = id_candidates(text)
        docs = await grid.find_many(candidates)
        for candidate in candidates:
            if candidate in docs:
                return docs[candidate]
        raise CLIError(f"no file with id {text!r} in {self.where(grid.name)}")


# -- before any server starts ---------------------------------------------------------


class LsFilter:
    """``ls --filter``: a query for the server, and the conditions it cannot express.

    ``content_type`` and ``length`` are answered by the catalogue module (a
    content type may be stored in several places; a compressed file's length is
    that of its original bytes), so they are checked on each files document.
    """

    def __init__(self, filters: dict[str, str]) -> None:
        self.query: dict[str, Any] = {}
        self.checks: list[Callable[[dict[str, Any]], bool]] = []
        for key, value in filters.items():
            if key in ("id", "_id"):
                self.query["_id"] = {"$in": id_candidates(value)}
            elif key == "filename":
                self.query["filename"] = value
            elif key in ("length", "size"):
                if not re.fullmatch(r"\d+", value):
                    raise CLIError(
                        f"bad --filter {key}={value!r}: the length is a number of bytes"
                    )
                self.checks.append(_length_is(int(value)))
            elif key in ("content_type", "contentType"):
                self.checks.append(_content_type_is(value))
            else:
                self.query[f"metadata.{key}"] = value

    def __call__(self, doc: dict[str, Any]) -> bool:
        return all(check(doc) for check in self.checks)


def _length_is(length: int) -> Callable[[dict[str, Any]], bool]:
    return lambda doc: size_of(doc) == length


def _content_type_is(content_type: str) -> Callable[[dict[str, Any]], bool]:
    return lambda doc: content_type_of(doc) == content_type


def preflight(args: argparse.Namespace) -> None:
    """Check the local side of a command (files, options) before any server starts.

    :raises CLIError: a file, option or value is wrong; nothing was done.
    """
    if args.command == "put":
        args.meta_pairs = parse_pairs(args.meta, "--meta")
        taken = sorted(set(args.meta_pairs) & RESERVED_KEYS)
        if taken and not args.sweepable:
            raise CLIError(
                f"bad --meta {taken[0]}=...: {taken[0]!r} is a name the file's entry keeps "
                "for itself (files put here are assets: docs/assets); use another key"
            )
        if args.files.count("-") > 1:
            raise CLIError("'-' (standard input) can be given only once")
        args.sizes = {}
        args.names = {}
        for path in args.files:
            if path == "-":
                continue
            if not os.path.exists(path):
                raise CLIError(f"no such file: {path}")
            if not os.path.isfile(path):
                raise CLIError(f"not a regular file: {path}")
            args.sizes[path] = os.path.getsize(path)
            args.names[path] = _stored_name(path)
    elif args.command == "ls":
        args.ls_filter = LsFilter(parse_pairs(args.filter, "--filter"))
        if args.limit < 0:
            raise CLIError(f"bad --limit {args.limit}: it must not be negative")
    elif args.command == "sweep":
        args.grace_delta = parse_duration(args.grace)
    elif args.command == "assets":
        args.where_query = parse_where(args.where)
        if args.limit < 0 or args.skip < 0:
            raise CLIError("--limit and --skip must not be negative")
    elif args.command == "get" and args.output not in (None, "-"):
        target = Path(args.output)
        parent = target if target.is_dir() else target.parent
        if not parent.is_dir():
            raise CLIError(f"no such directory: {parent}")
    if args.timeout <= 0:
        raise CLIError(f"bad --timeout {args.timeout:g}: it must be positive")
    args.storage_obj = storage_from(args)


def _stored_name(path: str) -> str:
    """The name ``put`` stores for a local file: the one a ``FileField`` would store."""
    try:
        return sanitize_filename(os.path.basename(path))
    except ValueError as exc:
        raise CLIError(
            f"cannot store the name of {path!r}: {exc}; rename the file, or upload it "
            "from standard input (-) to store no name"
        ) from exc


def import_models(modules: Sequence[str] | None) -> None:
    """Import the ``--import`` modules, so their Document classes are registered.

    :raises CLIError: a module cannot be imported.
    """
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


# -- the commands ---------------------------------------------------------------------


async def _cmd_put(ctx: Context) -> int:
    """Upload each file; as an asset (kept by the sweep) unless ``--sweepable``.

    A file put here has no document to reference it, so the orphan sweep would
    take it for an abandoned upload and delete it once older than its grace, and
    ``check`` would list it as an orphan. An asset is referenced by existing as
    one (:func:`asyncassets.assets.assets_in_use`): its id is the file's name
    (``photo-2.jpg`` when that is taken), or a new hex id for standard input.
    """
    args = ctx.args
    meta = args.meta_pairs
    bucket = ctx.bucket()
    manager = None
    if not args.sweepable:
        storage = ctx.storage or GridFSStorage(bucket.name)
        manager = AssetManager(storage, alias=DEFAULT_ALIAS)
        await manager.ensure_indexes()
    else:
        await bucket.ensure_indexes()
    results = []
    for path in args.files:
        content_type = args.content_type
        filename = None if path == "-" else args.names[path]
        if filename is not None:
            content_type = content_type or mimetypes.guess_type(filename)[0]
        progress = Progress(None if path == "-" else args.sizes[path], f"put {filename}")
        try:
            with contextlib.ExitStack() as stack:
                if path == "-":
                    raw: IO[bytes] = sys.stdin.buffer
                else:
                    # One command, one task: nothing else waits while the disk is read.
                    raw = stack.enter_context(open(path, "rb"))  # noqa: ASYNC230
                source = CountingReader(raw, progress)  # no name: the stored one is given
                if manager is not None:
                    asset_id = await manager.add(
                        source, filename, filename=filename, content_type=content_type, **meta
                    )
                    doc = (await manager.get(asset_id)).entry
                else:
                    metadata = {**({"content_type": content_type} if content_type else {}),
                                **meta}
                    doc = await bucket.upload(source, filename=filename, metadata=metadata)
        finally:
            progress.close()
        results.append(file_summary(doc, bucket.name))
        if not args.json:
            print(show_id(doc["_id"]), flush=True)
    if args.json:
        print_json(results)
    return 0


async def _write_file(ctx: Context, doc: dict[str, Any], out: IO[bytes], label: str) -> int:
    """Write the original bytes of a file to ``out``: decompressed, streamed."""
    progress = Progress(size_of(doc), label)
    written = 0
    pieces: AsyncIterator[bytes] = iter_original(ctx.bucket(), doc)
    try:
        async for piece in pieces:
            out.write(piece)
            written += len(piece)
            progress.update(len(piece))
    finally:
        progress.close()
        if isinstance(pieces, AsyncGenerator):  # end the download now, not at exit
            await pieces.aclose()
    return written


async def _cmd_get(ctx: Context) -> int:
    args = ctx.args
    doc = await ctx.find(args.id)
    if args.output == "-":
        await _write_file(ctx, doc, sys.stdout.buffer, "get")
        sys.stdout.buffer.flush()
        return 0
    target = _output_path(args.output, doc)
    if not args.force:
        _refuse_to_overwrite(target)  # before the download, not only after it
    # Written to a temporary file first, so a failed download leaves no half file.
    fd, tmp = tempfile.mkstemp(prefix=".asyncassets-", suffix=".part", dir=target.parent)
    try:
        # mkstemp makes it 0600; the file is the user's, with the mode their umask
        # gives a new file (0644 under umask 022), as cp or curl -o would make it.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as out:
            written = await _write_file(ctx, doc, out, f"get {target.name}")
        _put_in_place(tmp, target, args.force)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    note(f"wrote {written} bytes to {target}")
    return 0


def _umask() -> int:
    """The process's umask (read by setting it, then setting it back: the command
    has one thread that makes files)."""
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def _output_path(output: str | None, doc: dict[str, Any]) -> Path:
    """``-o PATH``, ``-o DIR`` (the stored name inside it), or the stored name here."""
    if output and not Path(output).is_dir():
        return Path(output)
    return Path(output or ".") / _default_name(doc)


def _exists(target: Path) -> CLIError:
    return CLIError(f"{target} already exists: pass --force to overwrite it, or -o another path")


def _refuse_to_overwrite(target: Path) -> None:
    # lexists: a symbolic link counts, even one pointing nowhere.
    if os.path.lexists(target):
        raise _exists(target)


def _put_in_place(tmp: str, target: Path, force: bool) -> None:
    """Move the finished download to ``target``; without ``force``, never over a file.

    A hard link fails if ``target`` exists, even one created during the download,
    so no race between the check and the move can overwrite anything.
    """
    if force:
        os.replace(tmp, target)
        return
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise _exists(target) from None
    except OSError:
        # No hard links on this file system (some FAT, SMB or FUSE ones): check, then move.
        _refuse_to_overwrite(target)
        os.replace(tmp, target)
        return
    os.unlink(tmp)


def _default_name(doc: dict[str, Any]) -> str:
    """The stored file name, cleaned as a ``FileField`` cleans one, else the id.

    Only the last component of a stored name is kept, without control or bidi
    characters or leading dots (``../../etc/x`` is ``x``, ``.bashrc`` is ``bashrc``),
    so a download never lands outside the directory it is written to.
    """
    for name in (doc.get("filename"), str(doc["_id"])):
        if isinstance(name, str):
            with contextlib.suppress(ValueError):
                return sanitize_filename(name)
    raise CLIError(
        f"file {show_id(doc['_id'])} has no name usable as a local file name: pass -o PATH"
    )


async def _cmd_cat(ctx: Context) -> int:
    doc = await ctx.find(ctx.args.id)
    await _write_file(ctx, doc, sys.stdout.buffer, "cat")
    sys.stdout.buffer.flush()
    return 0


async def _cmd_ls(ctx: Context) -> int:
    args = ctx.args
    wanted: LsFilter = args.ls_filter
    bucket = ctx.bucket()
    order = [("uploadDate", 1), ("_id", 1)]
    # With conditions checked here, the server cannot apply the limit.
    server_limit = 0 if wanted.checks else args.limit
    rows: list[dict[str, Any]] = []
    async with bucket.files.find(wanted.query, sort=order, limit=server_limit) as cursor:
        async for doc in cursor:
            if not wanted(doc):
                continue
            if not args.json and not rows:
                print(f"{'ID':<24}  {'SIZE':>10}  {'UPLOADED (UTC)':<19}  {'TYPE':<24}  NAME")
            summary = file_summary(doc, bucket.name)
            rows.append(summary)
            if not args.json:
                _print_ls_row(summary)
            if args.limit and len(rows) >= args.limit:
                break
    if args.json:
        print_json(rows)
    elif args.verbose or not rows:
        note(f"{len(rows)} file(s) in {ctx.where(bucket.name)}")
    return 0


def _print_ls_row(summary: dict[str, Any]) -> None:
    uploaded = summary["upload_date"]
    when = uploaded.strftime("%Y-%m-%d %H:%M:%S") if isinstance(uploaded, dt.datetime) else "-"
    size = summary["length"]
    print(
        f"{show_id(summary['id']):<24}  {_human_bytes(size) if size is not None else '-':>10}  "
        f"{when:<19}  {printable(summary['content_type'] or '-'):<24}  "
        f"{printable(summary['filename'] or '-')}"
    )


async def _cmd_info(ctx: Context) -> int:
    doc = await ctx.find(ctx.args.id)
    summary = file_summary(doc, ctx.bucket().name)
    if ctx.args.json:
        print_json(summary)
        return 0
    if summary["compression"] is None:
        # The stored bytes are the original ones: one length says it all.
        del summary["compression"], summary["stored_length"]
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        if key == "metadata":
            value = json.dumps(jsonable(value), sort_keys=True) if value else "{}"
        elif key in ("length", "stored_length") and isinstance(value, int):
            value = f"{value} ({_human_bytes(value)})"
        elif isinstance(value, dt.datetime):
            value = jsonable(value)
        print(f"{key:<{width}}  {printable(str(value)) if value is not None else '-'}")
    return 0


async def _cmd_rm(ctx: Context) -> int:
    # Every id is looked up first: a typo in one deletes none.
    docs = [await ctx.find(text) for text in ctx.args.ids]
    bucket = ctx.bucket()
    for doc in docs:
        await bucket.delete(doc["_id"])
        print(f"deleted {show_id(doc['_id'])}", flush=True)
    return 0


async def _verdict(bucket: Store, doc: dict[str, Any]) -> tuple[str, str | None]:
    """``(status, detail)`` of one file, as :func:`verify_file` decides."""
    try:
        await verify_file(bucket, doc)
    except ChecksumMissing as exc:
        return "unverifiable", str(exc)
    except FileDeletedWhileReading as exc:
        # Deleted or replaced by someone else meanwhile: nothing to say about its bytes.
        return "deleted", str(exc)
    except IntegrityError as exc:
        # verify_file reports missing or malformed chunks, or a missing or
        # misshapen object, as an IntegrityError caused by CorruptFile; the label
        # says which kind of damage it is.
        return ("corrupt" if isinstance(exc.__cause__, CorruptFile) else "mismatch"), str(exc)
    return "ok", None


async def _cmd_verify(ctx: Context) -> int:
    args = ctx.args
    bucket = ctx.bucket()
    results: list[dict[str, Any]] = []
    problems = 0

    # Unknown ids fail before anything is read.
    chosen = [await ctx.find(text) for text in args.ids]

    async def files() -> AsyncIterator[dict[str, Any]]:
        if chosen:
            for doc in chosen:
                yield doc
        else:
            async with bucket.files.find({}, sort=[("_id", 1)]) as cursor:
                async for doc in cursor:
                    yield doc

    async for doc in files():
        status, detail = await _verdict(bucket, doc)
        if status in ("corrupt", "mismatch"):
            problems += 1
        results.append({"id": doc["_id"], "status": status, "detail": detail})
        if not args.json:
            line = f"{status.upper():<12} {show_id(doc['_id'])}"
            print(line + (f"  ({printable(detail)})" if detail else ""), flush=True)
    if args.json:
        print_json(results)
    elif not results:
        note(f"no files in {ctx.where(bucket.name)}")
    return EXIT_PROBLEMS if problems else 0


async def _cmd_sweep(ctx: Context) -> int:
    args = ctx.args
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
    report = await sweep_orphans(grace=args.grace_delta, dry_run=args.dry_run,
                                 buckets=args.bucket or None, alias="default")
    if args.json:
        print_json(report_dict(report))
    else:
        _print_report(report)
    return 0


async def _cmd_check(ctx: Context) -> int:
    args = ctx.args
    report = await check(verify=args.verify, buckets=args.bucket or None, alias="default")
    if args.json:
        print_json(report_dict(report))
    else:
        _print_report(report)
    return 0 if report.ok else EXIT_PROBLEMS


def _print_report(report: Any) -> None:
    for line in str(report).splitlines():
        print(printable(line))


#: The coroutine of each command that talks to a server.
COMMANDS: dict[str, Callable[[Context], Awaitable[int]]] = {
    "put": _cmd_put,
    "get": _cmd_get,
    "cat": _cmd_cat,
    "ls": _cmd_ls,
    "info": _cmd_info,
    "rm": _cmd_rm,
    "verify": _cmd_verify,
    "sweep": _cmd_sweep,
    "check": _cmd_check,
    "assets": cmd_assets,
    "transfer": cmd_transfer,
}


async def run_command(args: argparse.Namespace, target: Target) -> int:
    """Connect to ``target``, run ``args.command``, disconnect; return the exit status."""
    await connect_to(target.uri, target.db, args.timeout)
    try:
        ctx = Context(args, target)
        try:
            # Fail early, with the URI, when the server is not there.
            await ctx.db.command("ping")
            return await COMMANDS[args.command](ctx)
        finally:
            await ctx.aclose()
    finally:
        await disconnect()
