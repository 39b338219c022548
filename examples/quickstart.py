"""asyncassets in one script: a document with a file, from upload to delete.

Runs on a throwaway local server, so it needs no MongoDB::

    pip install -e '.[embedded]'
    python examples/quickstart.py

``EmbeddedServer`` starts ``mongod`` if it is on ``PATH``, else SecantusDB, in
memory; everything is gone when the script ends.
"""

from __future__ import annotations

import asyncio
import io

import asyncassets
from asyncassets import Document, FileConflict
from asyncassets.embedded import EmbeddedServer
from asyncassets.fields import FileField, StringField


class Animal(Document):
    genus = StringField(required=True)
    photo = FileField()


async def stored_files() -> int:
    """How many files the default bucket holds (raw PyMongo, to show nothing leaks)."""
    return await asyncassets.get_db()["fs.files"].count_documents({})


async def main(uri: str) -> None:
    asyncassets.connect(uri + "zoo")
    try:
        # put: upload bytes (or a binary file object, or an async iterable of bytes).
        marmot = Animal(genus="Marmota")
        await marmot.photo.put(
            b"\x89PNG fake image bytes",
            content_type="image/png",
            filename="marmot.png",
            photographer="Ada",
        )
        await marmot.save()  # a new document's file takes effect here
        print("saved", marmot.pk, "with file", marmot.photo.file_id)

        # query, then read: read() also loads the metadata attributes.
        found = await Animal.objects(genus="Marmota").first()
        assert found is not None
        data = await found.photo.read()
        print("read", data, found.photo.content_type, found.photo.length, "bytes")
        print("metadata", found.photo.metadata)

        # listing pages: load_files() loads every document's metadata in one query.
        for animal in await Animal.objects.load_files("photo").to_list():
            print("listed", animal.genus, animal.photo.filename, animal.photo.length)

        # ranges: stream() yields chunk-sized pieces; read(n) honours seek().
        pieces = [piece async for piece in found.photo.stream(start=0, end=4)]
        print("first four bytes", b"".join(pieces))
        found.photo.seek(5)
        print("read(5) after seek(5):", await found.photo.read(5), "tell:", found.photo.tell())

        # replace: the new file is complete before the saved document points at it,
        # and the old file is deleted after. It is persisted at once: no save() needed.
        old_id = found.photo.file_id
        await found.photo.replace(io.BytesIO(b"a better photo"), content_type="image/jpeg")
        print("replaced", old_id, "->", found.photo.file_id)

        # A stale copy of the document loses cleanly instead of leaking a file.
        try:
            await marmot.photo.replace(b"stale write", content_type="text/plain")
        except FileConflict as exc:
            print("conflict:", type(exc).__name__, "- files stored:", await stored_files())
        await marmot.reload()
        print("reloaded, reads", await marmot.photo.read())

        # Streaming upload: async with closes on success, aborts on an exception.
        squirrel = Animal(genus="Sciurus")
        async with squirrel.photo.new_file(content_type="text/plain", filename="notes.txt"):
            squirrel.photo.write(b"line one\n")  # awaiting write() is optional
            await squirrel.photo.write(b"line two\n")  # awaiting flushes full chunks
        await squirrel.save()
        print("streamed", await squirrel.photo.read())

        # delete: removes the reference from the saved document, then the file.
        await squirrel.photo.delete()
        stored = await Animal.objects.get(genus="Sciurus")
        print("after delete, field holds a file:", bool(stored.photo))

        # Deleting a document deletes its files too (documents first, then files).
        await marmot.delete()
        print("animals left:", await Animal.objects.count())
        print("files left:", await stored_files())
    finally:
        await Animal.drop_collection()
        await asyncassets.disconnect()


if __name__ == "__main__":
    with EmbeddedServer() as server:
        print("server:", server.kind, server.uri)
        asyncio.run(main(server.uri))
