"""Another process working on the assets of tests/test_assets_races.py.

Run as ``python tests/_assets_worker.py URI DB SPEC MODE PARAMS`` (``SPEC`` and
``PARAMS`` are JSON); it prints one JSON line per event on stdout. The tests
import :func:`make_storage` and :func:`payload` from here too, so the processes
build the same storage and the same bytes.

Modes:

``race``
    ``PARAMS``: ``asset_id``, ``tag``, ``ops``, ``seed``. Runs ``ops`` random
    operations on the asset (replace, get and read, exists, an add of other
    bytes under its id), two at a time, and prints what each one gave.
``kill-at``
    ``PARAMS``: ``asset_id``, ``tag``, ``step``. Replaces the asset, and kills
    itself with SIGKILL right after the ``step``-th write to the database made
    from the swap's lock on (``step`` 0: just before the lock). Prints
    ``{"done": true}`` if the replace ended first.
``replace-loop``
    ``PARAMS``: ``asset_id``, ``tag``. Replaces the asset again and again,
    printing each version that went live, until it is killed.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sys
from typing import Any

HEADER_END = b"\n"


def payload(tag: str, size: int = 3000) -> bytes:
    """Bytes that say which write made them: ``tag``, a newline, then filler."""
    head = tag.encode() + HEADER_END
    return head + bytes((i * 7 + len(tag)) % 251 for i in range(max(size - len(head), 0)))


def tag_of(data: bytes) -> str | None:
    """The tag of bytes made by :func:`payload`, if they are exactly such bytes."""
    head, sep, _ = data.partition(HEADER_END)
    if not sep:
        return None
    tag = head.decode(errors="replace")
    return tag if payload(tag, len(data)) == data else None


def make_storage(spec: dict[str, Any]) -> Any:
    """The storage ``spec`` describes (``kind``: gridfs, filesystem or s3)."""
    from asyncassets.storage import FileSystemStorage, GridFSStorage, S3Storage

    if spec["kind"] == "gridfs":
        return GridFSStorage(spec["name"])
    if spec["kind"] == "filesystem":
        return FileSystemStorage(spec["root"], collection_name=spec["name"])
    return S3Storage(**spec["options"], prefix=spec["prefix"], collection_name=spec["name"])


def say(**event: Any) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


async def race(am: Any, params: dict[str, Any]) -> None:
    from asyncassets.errors import FileConflict, FileDeletedWhileReading

    asset_id, tag = params["asset_id"], params["tag"]
    rng = random.Random(params["seed"])
    counter = iter(range(10**6))

    async def one(kind: str) -> None:
        n = next(counter)
        try:
            if kind == "replace":
                version = f"{tag}:{n}"
                await am.replace(asset_id, payload(version))
                say(op="replace", version=version, ok=True)
            elif kind == "add":
                got = await am.add(payload(f"stranger:{tag}:{n}"), asset_id=asset_id)
                say(op="add", id=got, version=f"stranger:{tag}:{n}")
            elif kind == "exists":
                say(op="exists", value=await am.exists(asset_id))
            else:
                asset = await am.get(asset_id)
                try:
                    data = await asset.read()
                except FileDeletedWhileReading:
                    say(op="get", read="deleted-while-reading")
                    return
                say(op="get", version=tag_of(data))
        except FileConflict:
            say(op=kind, error="FileConflict")
        except Exception as exc:  # reported to the test, which fails on it
            say(op=kind, error=type(exc).__name__, message=str(exc)[:300])

    kinds = ["replace"] * 4 + ["get"] * 3 + ["exists"] * 2 + ["add"]
    for _ in range(params["ops"] // 2):
        await asyncio.gather(one(rng.choice(kinds)), one(rng.choice(kinds)))


def arm_kill(step: int) -> None:
    """SIGKILL this process right after the ``step``-th write from the lock on."""
    from pymongo.asynchronous.collection import AsyncCollection

    writes = {"count": -1}  # -1: the lock has not been sent yet

    def wrap(name: str) -> None:
        original = getattr(AsyncCollection, name)

        async def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
            update = args[1] if len(args) > 1 else kwargs.get("update")
            if writes["count"] < 0 and name == "update_one" and isinstance(update, dict) \
                    and "metadata.asset_next" in update.get("$set", {}):
                writes["count"] = 0
                if step == 0:
                    os.kill(os.getpid(), signal.SIGKILL)
            result = await original(self, *args, **kwargs)
            if writes["count"] >= 0:
                writes["count"] += 1
                if writes["count"] == step:
                    os.kill(os.getpid(), signal.SIGKILL)
            return result

        setattr(AsyncCollection, name, counted)

    for name in ("update_one", "delete_one", "delete_many", "find_one_and_delete",
                 "find_one_and_update"):
        wrap(name)


async def main() -> None:
    uri, db, spec, mode, params = sys.argv[1:6]
    from asyncassets.assets import AssetManager
    from asyncassets.connection import connect, disconnect

    connect(host=uri, db=db)
    am = AssetManager(make_storage(json.loads(spec)))
    args = json.loads(params)
    try:
        if mode == "race":
            await race(am, args)
        elif mode == "kill-at":
            arm_kill(args["step"])
            await am.replace(args["asset_id"], payload(args["tag"]))
            say(done=True)
        elif mode == "replace-loop":
            for n in range(10**6):
                version = f"{args['tag']}:{n}"
                await am.replace(args["asset_id"], payload(version))
                say(live=version)
        else:
            raise SystemExit(f"unknown mode {mode!r}")
    finally:
        await disconnect()


if __name__ == "__main__":
    asyncio.run(main())
