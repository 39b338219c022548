"""A worker process of the race suites: another OS process changing the same
documents and assets, against the same MongoDB and storage, as a scaled-out
service's processes do.

Started by :class:`_races_core.Workers` with a JSON spec (server URI, database,
alias, the storage, the documents' shape); it prints ``{"ready": true}``, then runs
one command a line from stdin, in order, and answers each on stdout with JSON
lines: events (``{"id": n, "event": "source done"}`` once an upload's source is
read to the end, so the parent can SIGKILL it at the commit), then the outcome
(``{"id": n, "ok": true, "got": <base64>}`` or ``{"id": n, "ok": false, "type":
"KeyTaken", "message": ...}``).

A command with ``"fault": "disk full"`` runs with ``RLIMIT_FSIZE`` below the
content's size, so a directory storage's write fails with a full disk (EFBIG), as
a real full disk would fail it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import resource
import signal
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _races_core import proxy_of, race_classes, storage_from_spec
from bson import ObjectId

import asyncassets
from asyncassets.assets import AssetManager


def emit(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode()


def unb64(text: str | None) -> bytes:
    return b"" if text is None else base64.b64decode(text)


def the_id(value: Any) -> Any:
    if isinstance(value, dict) and "$oid" in value:
        return ObjectId(value["$oid"])
    return value


class Runner:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        storage = storage_from_spec(spec["storage"])
        self.doc_cls, _ = race_classes(
            spec["prefix"], spec["alias"], spec["collection"], {"storage": storage}
        )
        self.assets = (
            AssetManager(storage, alias=spec["alias"]) if spec.get("assets") else None
        )

    async def source(self, n: int, cmd: dict[str, Any]) -> Any:
        for piece in cmd["pieces"]:
            await asyncio.sleep(cmd["pause"])
            yield unb64(piece)
        emit({"id": n, "event": "source done"})

    def named(self, cmd: dict[str, Any]) -> dict[str, Any]:
        return {} if cmd.get("filename") is None else {"filename": cmd["filename"]}

    async def run(self, n: int, cmd: dict[str, Any]) -> Any:
        kind = cmd["kind"]
        if kind.startswith("asset_"):
            return await self.asset(n, cmd)
        doc = await self.doc_cls.objects.get(pk=the_id(cmd["pk"]))
        if kind == "add_file":
            await doc.add_file(
                "files", self.source(n, cmd), content_type="text/plain", **self.named(cmd)
            )
            return None
        proxy = proxy_of(doc, cmd["family"], cmd["index"])
        if proxy is None:
            return None
        if kind == "put":
            await proxy.put(
                self.source(n, cmd), content_type="application/octet-stream", **self.named(cmd)
            )
        elif kind == "replace":
            await proxy.replace(self.source(n, cmd), content_type="text/plain", **self.named(cmd))
        elif kind == "delete":
            await proxy.delete()
        elif kind == "stream_write":
            async with proxy.new_file(filename=cmd.get("filename") or "race"):
                async for piece in self.source(n, cmd):
                    await proxy.write(piece)
        elif kind == "read":
            return b64(await proxy.read())
        elif kind == "stream":
            span = cmd.get("span")
            kwargs = {} if span is None else {"start": span[0], "end": span[1]}
            pieces = [piece async for piece in proxy.stream(**kwargs)]
            return b64(b"".join(pieces)) if pieces else "EMPTY"
        else:
            raise ValueError(f"unknown command {kind!r}")
        return None

    async def asset(self, n: int, cmd: dict[str, Any]) -> Any:
        assert self.assets is not None
        kind = cmd["kind"]
        if kind == "asset_add":
            return await self.assets.add(
                self.source(n, cmd), cmd["asset_id"], filename=cmd.get("filename"),
                content_type="application/octet-stream", on_conflict=cmd.get("on_conflict"),
            )  # fmt: skip
        if kind == "asset_replace":
            asset = await self.assets.replace(
                cmd["asset_id"], self.source(n, cmd), content_type="application/octet-stream"
            )
            return asset.asset_id
        if kind == "asset_delete":
            return await self.assets.delete(cmd["asset_id"])
        if kind == "asset_read":
            asset = await self.assets.get(cmd["asset_id"])
            return b64(await asset.read())
        if kind == "asset_exists":
            return await self.assets.exists(cmd["asset_id"])
        raise ValueError(f"unknown command {kind!r}")


async def main(spec: dict[str, Any]) -> None:
    asyncassets.connect(host=spec["uri"], db=spec["db"], alias=spec["alias"])
    runner = Runner(spec)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    emit({"ready": True, "pid": os.getpid()})
    while True:
        line = await asyncio.to_thread(sys.stdin.buffer.readline)
        if not line:
            break
        cmd = json.loads(line)
        n = cmd["id"]
        limited = cmd.get("fault") == "disk full"
        if limited:
            size = len(unb64(cmd.get("content")))
            resource.setrlimit(resource.RLIMIT_FSIZE, (max(1, size // 2), hard))
        try:
            got = await runner.run(n, cmd)
        except Exception as exc:
            key = getattr(exc, "key", None)  # a StorageError's key
            emit({"id": n, "ok": False, "type": type(exc).__name__, "message": str(exc),
                  "key": key if isinstance(key, str) else None})  # fmt: skip
        else:
            emit({"id": n, "ok": True, "got": got})
        finally:
            if limited:
                resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    await asyncassets.disconnect(spec["alias"])


if __name__ == "__main__":
    # A write past RLIMIT_FSIZE then fails with EFBIG instead of killing the process.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    asyncio.run(main(json.loads(sys.argv[1])))
