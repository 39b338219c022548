"""``asyncassets assets``: list and search the assets of a catalogue.

.. code-block:: console

    $ asyncassets assets --where gallery_id=g1 --where size__gt=1000 --sort -uploaded
    $ asyncassets assets --storage s3://media/photos/ --where content_type__startswith=image/

``--where KEY=VALUE`` takes what :meth:`AssetManager.search
<asyncassets.assets.AssetManager.search>` takes, in the same syntax (metadata
keys, ``size``, ``content_type``, ``filename``, ``uploaded``, ``asset_id``, with
mongoengine's operators). A value is read as JSON when it is JSON (``1000``,
``true``, ``null``, ``["a", "b"]``, ``"66542"`` for a string of digits), else
as text.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from mongoengine.errors import InvalidQueryError

from ..assets import AssetManager
from ..errors import CLIError
from ..ops import _human_bytes
from ..storage import GridFSStorage
from .output import note, print_json, printable

if TYPE_CHECKING:
    from .commands import Context

__all__ = ["cmd_assets", "parse_where"]


def parse_where(items: Sequence[str] | None) -> dict[str, Any]:
    """``["gallery_id=g1", "size__gt=1000"]`` as ``{"gallery_id": "g1", "size__gt": 1000}``.

    :raises CLIError: an item has no ``=`` or an empty or ``$`` key.
    """
    query: dict[str, Any] = {}
    for item in items or ():
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or key.startswith(("$", "_")) or "." in key:
            raise CLIError(
                f"bad --where {item!r}: expected KEY=VALUE, KEY a metadata key or a name "
                "such as size__gt, content_type__startswith (no '.', '$' or leading '_')"
            )
        try:
            value: Any = json.loads(text)
        except ValueError:
            value = text
        if key.split("__")[0] in ("uploaded", "upload_date") and isinstance(value, str):
            try:
                value = dt.datetime.fromisoformat(value)
            except ValueError:
                raise CLIError(
                    f"bad --where {item!r}: give the time as ISO 8601 (2026-12-01T10:00)"
                ) from None
        query[key] = value
    return query


async def cmd_assets(ctx: Context) -> int:
    """List the assets matching ``--where``, sorted by ``--sort`` (oldest first)."""
    args = ctx.args
    storage = ctx.storage or GridFSStorage(args.bucket or "assets")
    ctx.bucket()  # the context owns the store's client and closes it
    manager = AssetManager(storage)
    try:
        search = manager.searchmd(**args.where_query)
        search = search.order_by(*(args.sort or ["uploaded"]))
    except (InvalidQueryError, ValueError) as exc:
        raise CLIError(f"bad --where or --sort: {exc}") from None
    search = search.skip(args.skip).limit(args.limit)
    rows = await search.to_list()
    if args.json:
        print_json(rows)
        return 0
    if rows:
        print(f"{'SIZE':>10}  {'UPLOADED (UTC)':<19}  {'TYPE':<24}  ASSET ID  METADATA")
    for row in rows:
        uploaded = row["uploaded"]
        when = uploaded.strftime("%Y-%m-%d %H:%M:%S") if isinstance(uploaded, dt.datetime) else "-"
        extra = {
            k: v for k, v in row.items()
            if k not in ("asset_id", "filename", "length", "uploaded", "content_type")
        }
        shown = json.dumps(extra, default=str, sort_keys=True) if extra else ""
        print(
            f"{_human_bytes(row['length']):>10}  {when:<19}  "
            f"{printable(row.get('content_type') or '-'):<24}  "
            f"{printable(row['asset_id'])}  {printable(shown)}"
        )
    if args.verbose or not rows:
        total = await search.count()
        note(f"{len(rows)} of {total} asset(s) in {ctx.where(storage.collection_name)}")
    return 0
