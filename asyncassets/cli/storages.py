"""``--storage URL``: which directory or S3 bucket the file commands work on.

``file:///srv/media`` is a :class:`~asyncassets.storage.FileSystemStorage`,
``s3://bucket/prefix/`` an :class:`~asyncassets.storage.S3Storage` (with
``--s3-endpoint`` and ``--s3-region``; credentials from the usual AWS
environment variables). ``--collection`` names the catalogue when it is not the
default of that kind of storage. Without ``--storage`` the commands work on the
GridFS bucket of ``--bucket``.

Pure functions of the arguments: a storage is a description, made without I/O.
"""

from __future__ import annotations

import argparse
from typing import Any
from urllib.parse import unquote, urlsplit

from ..errors import CLIError
from ..storage import FileSystemStorage, S3Storage, Storage

__all__ = ["FILE_COMMANDS", "storage_from"]

#: The commands that work on one storage's files (the others go through the
#: storages the imported Document classes declare).
FILE_COMMANDS = frozenset({"put", "get", "cat", "ls", "info", "rm", "verify", "assets"})

_HINT = "use file:///absolute/path/to/a/directory or s3://bucket/optional/prefix/"


def storage_from(args: argparse.Namespace) -> Storage | None:
    """The storage ``--storage`` (with ``--collection``, ``--s3-endpoint``,
    ``--s3-region``) describes, or ``None`` for GridFS.

    :raises CLIError: the URL or an option is wrong, or the options do not go
        together (``--bucket`` with ``--storage``, ``--storage`` with ``sweep``...).
    """
    url: str | None = getattr(args, "storage", None)
    collection: str | None = getattr(args, "collection", None)
    endpoint: str | None = getattr(args, "s3_endpoint", None)
    region: str | None = getattr(args, "s3_region", None)
    if url is None:
        if collection is not None:
            raise CLIError(
                "--collection names the catalogue of a --storage; for a GridFS bucket "
                "use --bucket"
            )
        if endpoint is not None or region is not None:
            raise CLIError("--s3-endpoint and --s3-region go with --storage s3://BUCKET/PREFIX")
        return None
    if args.command not in FILE_COMMANDS:
        raise CLIError(
            f"{args.command} works on the storages the imported Document classes declare "
            "(--import yourapp.models), not on a --storage; --storage is for "
            + ", ".join(sorted(FILE_COMMANDS))
        )
    if getattr(args, "bucket", None) is not None:
        raise CLIError(
            "--bucket names a GridFS bucket; with --storage, name the catalogue with "
            "--collection"
        )
    parts = urlsplit(url)
    if parts.query or parts.fragment:
        raise CLIError(f"bad --storage {url!r}: no '?' or '#' part is understood; {_HINT}")
    options: dict[str, Any] = {} if collection is None else {"collection_name": collection}
    try:
        if parts.scheme == "file":
            if endpoint is not None or region is not None:
                raise CLIError("--s3-endpoint and --s3-region go with an s3:// --storage")
            if parts.netloc not in ("", "localhost"):
                raise CLIError(
                    f"bad --storage {url!r}: a file URL names a local directory, not a host "
                    f"({parts.netloc!r}); {_HINT}"
                )
            path = unquote(parts.path)
            if not path.startswith("/"):
                raise CLIError(f"bad --storage {url!r}: the directory must be absolute; {_HINT}")
            return FileSystemStorage(path, **options)
        if parts.scheme == "s3":
            if not parts.netloc:
                raise CLIError(f"bad --storage {url!r}: no bucket; {_HINT}")
            return S3Storage(
                unquote(parts.netloc),
                prefix=unquote(parts.path.lstrip("/")),
                endpoint_url=endpoint,
                region=region,
                **options,
            )
    except (TypeError, ValueError) as exc:
        raise CLIError(f"bad --storage {url!r}: {exc}") from None
    raise CLIError(f"bad --storage {url!r}: {_HINT}")
