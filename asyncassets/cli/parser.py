"""The command line's grammar: the argument parser, durations, ``KEY=VALUE`` pairs, ids.

Pure functions of text; nothing here touches a server or a file.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import re
from collections.abc import Sequence
from typing import Any

from bson import ObjectId

from ..errors import CLIError

__all__ = ["build_parser", "id_candidates", "parse_duration", "parse_pairs"]

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


def parse_pairs(items: Sequence[str] | None, option: str) -> dict[str, str]:
    """``["a=1", "b=2"]`` as ``{"a": "1", "b": "2"}``; keys must be valid metadata keys.

    :raises CLIError: an item has no ``=``, an empty key, or a key starting with
        ``$`` or containing ``.`` (MongoDB would read those as operators or paths).
    """
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


def id_candidates(text: str) -> list[Any]:
    """The ``_id`` values a command-line id may stand for, most likely first."""
    found: list[Any] = []
    if ObjectId.is_valid(text):
        found.append(ObjectId(text))
    found.append(text)
    if re.fullmatch(r"-?\d+", text):
        found.append(int(text))
    return found


def _version() -> str:
    # From the installed distribution, not `asyncassets.__version__`: the package's
    # __init__ is the public facade, which nothing inside the package imports.
    try:
        return importlib.metadata.version("asyncassets")
    except importlib.metadata.PackageNotFoundError:  # a source tree on sys.path
        return "(not installed)"


#: The shared options, named in each command's help instead of repeated there.
SHARED_OPTIONS = (
    "--uri, --db, --timeout, --import, -v, --debug, --storage, --collection, "
    "--s3-endpoint, --s3-region"
)


def _add_common(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """Options accepted before and after the command (``asyncassets -v ls`` = ``ls -v``).

    The main parser shows them (once, in ``asyncassets --help``); a command's
    parser accepts them too (``suppress``: no default of its own, so one given
    before the command is kept) without listing them again in its help.
    """

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    def shown(text: str) -> str:
        return argparse.SUPPRESS if suppress else text

    group = parser.add_argument_group("shared options (before or after the command)")
    group.add_argument(
        "--uri", default=default(None),
        help=shown("MongoDB URI (default: $ASYNCASSETS_URI, else $MONGODB_URI, else the "
                   "embedded server with data in the user data directory; demo: a "
                   "throwaway in-memory server)"),
    )
    group.add_argument(
        "--db", default=default(None),
        help=shown("database name (default: the URI's, else 'asyncassets')"),
    )
    group.add_argument(
        "--timeout", type=float, default=default(10.0), metavar="SECONDS",
        help=shown("how long to wait for the server (default: 10)"),
    )
    group.add_argument(
        "--import", dest="imports", action="append", default=default(None), metavar="MODULE",
        help=shown("import MODULE first, so its Document classes count for sweep and "
                   "check (repeatable)"),
    )
    group.add_argument(
        "-v", "--verbose", action="store_true", default=default(False),
        help=shown("say which server is used, and more"),
    )
    group.add_argument(
        "--debug", action="store_true", default=default(False),
        help=shown("show the traceback of an error"),
    )
    where = parser.add_argument_group(
        "storage (put, get, cat, ls, info, rm, verify, assets; default: the GridFS "
        "--bucket)"
    )
    where.add_argument(
        "--storage", default=default(None), metavar="URL",
        help=shown("work on the files of a directory (file:///srv/media) or an S3 bucket "
                   "(s3://bucket/prefix/), catalogued in MongoDB"),
    )
    where.add_argument(
        "--collection", default=default(None), metavar="NAME",
        help=shown("the catalogue of --storage (<NAME>.files; default: the storage's own, "
                   "fs_local_<directory name> or fs_s3_<bucket>[_<prefix>], as a "
                   "FileField's storage names it)"),
    )
    where.add_argument(
        "--s3-endpoint", default=default(None), metavar="URL",
        help=shown("an S3-compatible server (MinIO, Ceph...; default: AWS); credentials "
                   "come from $AWS_ACCESS_KEY_ID, $AWS_SECRET_ACCESS_KEY..."),
    )
    where.add_argument(
        "--s3-region", default=default(None), metavar="REGION",
        help=shown("the region to sign for (default: $AWS_REGION / $AWS_DEFAULT_REGION)"),
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``asyncassets`` command."""
    from .transfer import add_parser as add_transfer_options

    parser = argparse.ArgumentParser(
        prog="asyncassets",
        description="Store, fetch and look after files in GridFS, a directory or S3; sweep "
        "orphans and check consistency. Without --uri or $ASYNCASSETS_URI/$MONGODB_URI, an "
        "embedded server is started for each command, with its data in the user data directory.",
        epilog="Exit status: 0 ok, 1 error, 2 usage error, 3 check/verify found problems.",
    )
    parser.add_argument("--version", action="version", version=f"asyncassets {_version()}")
    _add_common(parser, suppress=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(
        name: str, help_text: str, epilog: str | None = None
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name, help=help_text, description=help_text,
            epilog=epilog or f"Shared options ({SHARED_OPTIONS}): see asyncassets --help.",
        )
        _add_common(sub, suppress=True)
        return sub

    def bucket_option(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--bucket", default=None,
                         help="GridFS bucket name (default: fs; see --storage for others)")

    sub = command("put", "upload files; print the id of each")
    sub.add_argument("files", nargs="+", metavar="FILE", help="a file to upload, or - for stdin")
    sub.add_argument("--content-type", metavar="TYPE",
                     help="MIME type (default: guessed from the file name)")
    sub.add_argument("--meta", action="append", metavar="KEY=VALUE",
                     help="metadata to store with the files (repeatable)")
    bucket_option(sub)
    sub.add_argument("--sweepable", action="store_true",
                     help="store plain files, which the orphan sweep deletes once older "
                     "than its grace unless a document references them (default: store "
                     "assets, named after the file, which the sweep keeps and check does "
                     "not report)")
    sub.add_argument("--json", action="store_true", help="print the new files as JSON")

    sub = command("get", "download a file (decompressed, as it was uploaded)")
    sub.add_argument("id", metavar="ID")
    sub.add_argument("-o", "--output", metavar="PATH",
                     help="where to write it; - for stdout (default: the stored file name)")
    sub.add_argument("--force", action="store_true",
                     help="overwrite the output file if it exists (never done without it)")
    bucket_option(sub)

    sub = command("cat", "write a file's bytes to stdout (decompressed, as it was uploaded)")
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

    sub = command("verify", "check files against the checksum recorded at upload")
    sub.add_argument("ids", nargs="*", metavar="ID", help="files to verify (default: all)")
    bucket_option(sub)
    sub.add_argument("--json", action="store_true", help="print JSON")

    sub = command("sweep", "delete orphaned files and chunks (see docs/operations)")
    sub.add_argument("--grace", default="1d", metavar="DURATION",
                     help="keep orphans younger than this: 90s, 30m, 12h, 1d... (default: 1d)")
    sub.add_argument("--dry-run", action="store_true", help="report, delete nothing")
    sub.add_argument("--bucket", action="append", metavar="NAME",
                     help="sweep only this bucket or catalogue (repeatable; default: every "
                     "one the imported Document classes declare, on its declared storage)")
    sub.add_argument("--force", action="store_true",
                     help="sweep a --bucket that no imported class declares")
    sub.add_argument("--json", action="store_true", help="print the report as JSON")

    sub = command("check", "report dangling references, orphans and corrupt files")
    sub.add_argument("--verify", action="store_true", help="also compare checksums (reads all)")
    sub.add_argument("--bucket", action="append", metavar="NAME",
                     help="check only this bucket or catalogue (repeatable; default: all)")
    sub.add_argument("--json", action="store_true", help="print the report as JSON")

    sub = command("transfer", "move the files of QueuedStorage fields to their remote "
                  "storage (see docs/transfers)")
    add_transfer_options(sub)

    sub = command("assets", "list and search assets (see docs/assets): --where gallery_id=g1")
    sub.add_argument("--bucket", default=None,
                     help="GridFS bucket of the assets (default: assets; see --storage)")
    sub.add_argument("--where", action="append", metavar="KEY=VALUE",
                     help="a condition, as AssetManager.search takes it: gallery_id=g1, "
                     "size__gt=1000, content_type__startswith=image/ (repeatable; VALUE is "
                     "read as JSON when it is JSON)")
    sub.add_argument("--sort", action="append", metavar="KEY",
                     help="sort by KEY, -KEY for descending (repeatable; default: uploaded)")
    sub.add_argument("--skip", type=int, default=0, metavar="N", help="leave out the first N")
    sub.add_argument("--limit", type=int, default=0, metavar="N", help="at most N assets")
    sub.add_argument("--json", action="store_true", help="print JSON")

    command(
        "demo", "a guided tour on a throwaway server: put, read, stream, replace, delete",
        epilog="It runs on a throwaway in-memory server, never on the embedded "
        "default's data nor on $ASYNCASSETS_URI or $MONGODB_URI; with --uri, on that "
        "server, in a scratch database it drops at the end. --timeout, -v and --debug "
        "apply; the other shared options do not.",
    )
    return parser
