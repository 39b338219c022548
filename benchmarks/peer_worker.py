"""A peer's side of the peer comparison; runs inside the peer's own virtualenv.

    python peer_worker.py mongomotor|mongoengine URI DB SIZE_MIB
    python peer_worker.py mongomotor|mongoengine URI DB meta N

Does one untimed warm-up, then one timed put and one timed read of SIZE_MIB through
the peer's FileField, and prints one JSON line. With ``meta N``: loads the N
documents of ``peer_meta`` (seeded by ``peers.py``) and reads each one's file
content type, the peer's way (``meta_s``). Imports nothing from asyncassets.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time


def payload(size: int) -> bytes:
    block = os.urandom(1 << 20)
    return (block * (size // (1 << 20) + 1))[:size]


async def mongomotor_round(uri: str, db: str, data: bytes) -> dict[str, float]:
    from mongomotor import Document, connect
    from mongomotor.fields import FileField, StringField

    connect(db=db, host=uri)

    class PeerFile(Document):
        meta = {"collection": "peer_mongomotor"}
        name = StringField()
        f = FileField()

    out = {}
    for timed in (False, True):
        doc = PeerFile(name="x")
        t0 = time.perf_counter()
        await doc.f.put(data)
        put = time.perf_counter() - t0
        await doc.save()
        again = await PeerFile.objects.get(id=doc.id)
        t0 = time.perf_counter()
        got = await again.f.read()
        read = time.perf_counter() - t0
        assert got == data, "mongomotor read back different bytes"
        await again.f.delete()
        await again.delete()
        if timed:
            out = {"put_s": put, "read_s": read}
    return out


async def mongoengine_round(uri: str, db: str, data: bytes) -> dict[str, float]:
    from mongoengine import Document, connect
    from mongoengine.fields import FileField, StringField

    connect(db=db, host=uri)

    class PeerFile(Document):
        meta = {"collection": "peer_mongoengine"}
        name = StringField()
        f = FileField()

    out = {}
    for timed in (False, True):
        doc = PeerFile(name="x")
        t0 = time.perf_counter()
        await asyncio.to_thread(doc.f.put, data)
        put = time.perf_counter() - t0
        await asyncio.to_thread(doc.save)
        again = await asyncio.to_thread(PeerFile.objects.get, id=doc.id)
        t0 = time.perf_counter()
        got = await asyncio.to_thread(again.f.read)
        read = time.perf_counter() - t0
        assert got == data, "mongoengine read back different bytes"
        await asyncio.to_thread(again.f.delete)
        await asyncio.to_thread(again.delete)
        if timed:
            out = {"put_s": put, "read_s": read}
    return out


async def mongomotor_meta(uri: str, db: str, n: int) -> dict[str, float]:
    from mongomotor import Document, connect
    from mongomotor.fields import FileField, StringField

    connect(db=db, host=uri)

    class PeerMeta(Document):
        meta = {"collection": "peer_meta"}
        name = StringField()
        f = FileField()

    out = {}
    for timed in (False, True):
        t0 = time.perf_counter()
        docs = await PeerMeta.objects.to_list(length=None)
        # mongomotor's proxy has no metadata until get(): one query per document.
        types = [(await doc.f.get()).content_type for doc in docs]
        seconds = time.perf_counter() - t0
        assert len(types) == n and types[0] == "image/png", (len(types), types[:1])
        if timed:
            out = {"meta_s": seconds}
    return out


async def mongoengine_meta(uri: str, db: str, n: int) -> dict[str, float]:
    from mongoengine import Document, connect
    from mongoengine.fields import FileField, StringField

    connect(db=db, host=uri)

    class PeerMeta(Document):
        meta = {"collection": "peer_meta"}
        name = StringField()
        f = FileField()

    def listing() -> list[str]:
        # Attribute access loads each file's metadata: one blocking query each.
        return [doc.f.content_type for doc in PeerMeta.objects]

    out = {}
    for timed in (False, True):
        t0 = time.perf_counter()
        types = await asyncio.to_thread(listing)
        seconds = time.perf_counter() - t0
        assert len(types) == n and types[0] == "image/png"
        if timed:
            out = {"meta_s": seconds}
    return out


if __name__ == "__main__":
    if sys.argv[4] == "meta":
        kind, uri, db, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[5])
        meta = mongomotor_meta if kind == "mongomotor" else mongoengine_meta
        print(json.dumps(asyncio.run(meta(uri, db, n))))
        sys.exit(0)
    kind, uri, db, size_mib = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    data = payload(size_mib << 20)
    fn = mongomotor_round if kind == "mongomotor" else mongoengine_round
    print(json.dumps(asyncio.run(fn(uri, db, data))))
