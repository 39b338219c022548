"""``asyncassets demo``: a guided tour of a FileField on a throwaway server.

It never touches the embedded default's data directory nor ``$ASYNCASSETS_URI``:
it starts an in-memory server, or, with ``--uri``, works in a scratch database
that it drops at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import uuid

# From mongoengine itself: asyncassets.fields re-exports it with `import *`, which
# a type checker cannot follow.
from mongoengine.fields import StringField

from ..connection import disconnect, get_client, get_db
from ..document import Document
from ..embedded import EmbeddedServer
from ..errors import CLIError
from ..fields import FileField
from ..ops import check
from ..storage.gridfs import GridBucket
from .server import connect_to
from .uris import describe_uri, parse_uri

__all__ = ["run_demo"]

_DEMO_TEXT = b"Marmota marmota, the Alpine marmot, whistles when an eagle comes.\n"


def run_demo(args: argparse.Namespace) -> int:
    """Run the tour on an ephemeral embedded server (or ``--uri``, in a scratch database)."""
    server = None
    if args.uri:
        uri, db = args.uri, f"asyncassets_demo_{uuid.uuid4().hex[:8]}"
        parse_uri(uri)  # a bad URI fails before the tour starts
        print(
            f"asyncassets demo on {describe_uri(uri)}, scratch database {db!r} "
            "(dropped at the end)"
        )
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


def _demo_class() -> type[Document]:
    # Declared on first use, so importing the command registers no Document class.
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


async def _first(photo_cls: type[Document], title: str) -> Document:
    found = await photo_cls.objects(title=title).first()
    if found is None:
        raise CLIError(f"demo: the Photo {title!r} saved a moment ago is not there")
    return found


async def _demo(uri: str, db_name: str, timeout: float, drop: bool) -> int:
    await connect_to(uri, db_name, timeout)
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
        photo = await _first(photo_cls, "marmot")
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
        stored = await _first(photo_cls, "marmot")
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
