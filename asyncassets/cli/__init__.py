"""The ``asyncassets`` command: files in GridFS, a directory or S3 from the shell,
sweep, check, demo.

.. code-block:: console

    $ asyncassets put marmot.jpg --meta genus=Marmota
    6745c0ffee0123456789abcd
    $ asyncassets ls
    $ asyncassets cat 6745c0ffee0123456789abcd > copy.jpg
    $ asyncassets --storage file:///srv/media put poster.jpg
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

Stored data is hostile until shown otherwise: text output escapes control and
bidi characters in names and ids (``--json`` is exact), ``get`` never
overwrites a file without ``--force`` and cleans the stored name as a
``FileField`` does, and a URI is shown only as its hosts, ports and database.

The package, one concern per module: :mod:`.parser` (the grammar: options,
durations, ``KEY=VALUE`` pairs, ids), :mod:`.uris` (URIs read by PyMongo's
parser and shown without secrets), :mod:`.server` (which server, the embedded
default and its lock, connecting), :mod:`.storages` (``--storage URL``: a
directory or S3 bucket instead of a GridFS bucket), :mod:`.output` (JSON,
escaping, progress bars, one-line errors), :mod:`.commands` (put, get, cat, ls,
info, rm, verify, sweep, check) and :mod:`.demo`. The commands read bytes only through
:mod:`asyncassets.storage.read` and facts about files only through
:mod:`asyncassets.storage.catalogue`, like the rest of the library.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import traceback
from collections.abc import Sequence

from .commands import import_models, preflight, run_command
from .demo import run_demo
from .output import note, one_line, printable
from .parser import build_parser, parse_duration
from .server import server_for, uri_from
from .uris import describe_uri

__all__ = ["build_parser", "describe_uri", "main", "parse_duration"]


#: Shared options that mean nothing to ``demo`` (it declares its own class and
#: database, on a server of its own), as ``(attribute, option)``.
_NOT_FOR_DEMO = (
    ("imports", "--import"),
    ("db", "--db"),
    ("storage", "--storage"),
    ("collection", "--collection"),
    ("s3_endpoint", "--s3-endpoint"),
    ("s3_region", "--s3-region"),
)


def _check_demo_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse (exit status 2) the shared options ``demo`` would otherwise ignore."""
    for attribute, option in _NOT_FOR_DEMO:
        if getattr(args, attribute, None) is not None:
            parser.error(
                f"demo takes no {option}: it runs on a throwaway server (or --uri), in a "
                "database and with a document class of its own"
            )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``asyncassets`` command; return its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    uri: str | None = None
    try:
        found = uri_from(args)
        uri = found[0] if found else None
        if args.command == "demo":
            _check_demo_options(parser, args)
            return run_demo(args)
        preflight(args)
        import_models(args.imports)
        with server_for(args) as target:
            uri = target.uri
            if args.verbose:
                note(target.describe())
            return asyncio.run(run_command(args, target))
    except KeyboardInterrupt:
        note("interrupted")
        return 130
    except BrokenPipeError:
        # The reader went away (`asyncassets cat ID | head`): not an error.
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 0
    except Exception as exc:
        if args.debug:
            for line in traceback.format_exc().splitlines():
                print(printable(line), file=sys.stderr)
        print(f"asyncassets: error: {one_line(exc, uri)}", file=sys.stderr)
        return 1
