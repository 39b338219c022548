"""The promise on every storage: reused, raced or planted keys never give another
file's bytes or lose one (issue #19, cases 1-6, 9 and 10).

Each test reproduces one case as it was found (a directory and an S3 bucket, on
real servers) and checks what a user would see: the bytes each saved document
reads back, the exception a loser gets, what is left on disk or in the bucket.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import asyncassets
from asyncassets import AssetManager, Document
from asyncassets.errors import FileDeletedWhileReading, StorageError, TransferFailed
from asyncassets.fields import FileField, StringField
from asyncassets.ops import check, sweep_orphans
from asyncassets.storage import FileSystemStorage, QueuedStorage, Retry, S3Storage, Storage
from asyncassets.storage.objects.keys import KeyMaker
from asyncassets.transfers import TransferWorker

KIB = 1024
MIB = 1024 * KIB
_names = itertools.count()


def payload(size: int, seed: int) -> bytes:
    block = hashlib.sha256(f"{seed}".encode()).digest()
    return (block * (size // len(block) + 1))[:size]


def storage_of(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path, **kw: Any
) -> FileSystemStorage | S3Storage:
    name = f"promise{next(_names)}"
    if kind == "filesystem":
        return FileSystemStorage(tmp_path / name, collection_name=name, fsync=False, **kw)
    bucket = request.getfixturevalue("asyncassets_s3_bucket")
    return S3Storage(
        **{**bucket.options, "prefix": f"{name}/", "part_size": 5 * MIB},
        collection_name=name,
        **kw,
    )


def doc_class(storage: Storage) -> Any:
    n = next(_names)
    return type(
        f"PromiseDoc{n}",
        (Document,),
        {
            "name": StringField(),
            "photo": FileField(storage=storage),
            "meta": {"collection": f"promise_docs_{n}"},
        },
    )


async def keys_of(storage: FileSystemStorage | S3Storage) -> list[str]:
    return sorted([info.key async for info in storage.blobs().list()])


KINDS = ["filesystem", "s3"]


async def stored_key(storage: Storage, proxy: Any) -> str:
    """The key a file's catalogue entry names, read from the catalogue itself."""
    files = asyncassets.get_db()[f"{storage.collection_name}.files"]
    entry = await files.find_one({"_id": proxy.file_id})
    assert entry is not None
    return str(entry["location"]["key"])


# -- case 1: a failed commit never deletes the winner's object -------------------------

_DISK_FULL_LOSER = textwrap.dedent(
    """
    import asyncio, resource, signal, sys
    import asyncassets
    from asyncassets import Document
    from asyncassets.fields import FileField
    from asyncassets.storage import FileSystemStorage

    uri, db, root, name = sys.argv[1:5]
    storage = FileSystemStorage(root, key_template="{filename}", collection_name=name,
                                fsync=False)

    class Doc(Document):
        meta = {"collection": name + "_docs"}
        photo = FileField(storage=storage)

    async def main():
        asyncassets.connect(uri, db=db)
        # Past 1.5 MiB a write fails with EFBIG, as on a full disk.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        limit = 1536 * 1024
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        loser = Doc()
        await loser.photo.new_file(filename="photo.jpg")
        await loser.photo.write(b"x" * 1024 * 1024)  # the key is chosen now...
        winner = Doc()
        await winner.photo.put(b"the winner's photo", filename="photo.jpg")
        await winner.save()                  # ...the winner stores meanwhile...
        await loser.photo.write(b"y" * 600 * 1024)
        try:
            await loser.photo.close()        # ...and the loser fails at its commit
        except Exception as exc:
            print("loser:", type(exc).__name__, exc, flush=True)
        else:
            print("loser: stored", flush=True)
        print("winner:", winner.pk, flush=True)
        await asyncassets.disconnect()

    asyncio.run(main())
    """
)


async def test_a_commit_that_fails_never_deletes_the_winners_object(
    asyncassets_db: Any, asyncassets_server_uri: str, tmp_path: Path
) -> None:
    # Case 1: the loser counted itself committed before its commit succeeded, and
    # its cleanup deleted the key, which held the winner's object.
    name = f"promise{next(_names)}"
    root = tmp_path / name
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _DISK_FULL_LOSER, asyncassets_server_uri,
        asyncassets_db.name, str(root), name,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    out, err = (b.decode() for b in await asyncio.wait_for(proc.communicate(), 120))
    assert proc.returncode == 0, out + err
    lines = out.splitlines()
    assert lines[0].startswith("loser: StorageError"), out + err
    assert "EFBIG" in lines[0] or "file-size limit" in lines[0]
    storage = FileSystemStorage(root, key_template="{filename}", collection_name=name,
                                fsync=False)

    class Doc(Document):
        meta = {"collection": name + "_docs"}
        photo = FileField(storage=storage)

    winner = await Doc.objects.get()
    assert await winner.photo.read() == b"the winner's photo"
    assert await keys_of(storage) == [winner.photo.key]
    assert (await check(buckets=[name])).ok


# -- case 2: overwrite=True never gives a document another document's bytes ----------


@pytest.mark.parametrize("kind", KINDS)
async def test_racing_overwriting_puts_each_keep_their_own_bytes(
    asyncassets_db: Any, request: pytest.FixtureRequest, tmp_path: Path, kind: str
) -> None:
    storage = storage_of(kind, request, tmp_path, key_template="{filename}", overwrite=True)
    Doc = doc_class(storage)
    for round_ in range(6):
        docs = [await Doc().save() for _ in range(4)]
        # Equal lengths: a wrong file is only visible by its bytes.
        datas = [payload(64 * KIB, seed=round_ * 10 + i) for i in range(4)]
        await asyncio.gather(*(
            doc.photo.put(data, filename="photo.jpg")
            for doc, data in zip(docs, datas, strict=True)
        ))
        keys = {doc.photo.key for doc in docs}
        assert len(keys) == 4, keys  # a key an entry names is never overwritten
        for doc, data in zip(docs, datas, strict=True):
            loaded = await Doc.objects.get(pk=doc.pk)
            assert await loaded.photo.read() == data
        for doc in docs:
            await doc.delete()
    assert await keys_of(storage) == []
    assert (await check(buckets=[storage.collection_name])).ok


@pytest.mark.parametrize("kind", KINDS)
async def test_overwrite_replaces_an_object_no_entry_names(
    asyncassets_db: Any, request: pytest.FixtureRequest, tmp_path: Path, kind: str
) -> None:
    storage = storage_of(kind, request, tmp_path, key_template="{filename}", overwrite=True)
    blobs = storage.blobs()
    writer = blobs.open_writer("photo.jpg")  # another tool's object under the key
    await writer.write(b"left by another tool")
    await writer.commit()
    Doc = doc_class(storage)
    doc = await Doc().save()
    await doc.photo.put(b"mine", filename="photo.jpg")
    assert doc.photo.key == "photo.jpg"
    assert await (await Doc.objects.get(pk=doc.pk)).photo.read() == b"mine"


# -- case 3: a stale reader never gets the next owner's bytes ------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_a_stale_reader_is_told_its_file_was_deleted_not_given_the_next_one(
    asyncassets_db: Any, request: pytest.FixtureRequest, tmp_path: Path, kind: str
) -> None:
    storage = storage_of(kind, request, tmp_path, key_template="{field}/{filename}")
    Doc = doc_class(storage)
    first = await Doc().save()
    await first.photo.put(b"the first photo", filename="photo.jpg")
    stale = await Doc.objects.get(pk=first.pk)
    assert await stale.photo.read() == b"the first photo"  # its entry is loaded
    await first.photo.delete()  # elsewhere
    second = await Doc().save()
    await second.photo.put(b"the next photo!", filename="photo.jpg")  # same length
    assert await stored_key(storage, second.photo) == "photo/photo.jpg"  # used again
    with pytest.raises(FileDeletedWhileReading):
        await stale.photo.read()
    with pytest.raises(FileDeletedWhileReading):
        _ = [piece async for piece in stale.photo.stream(0, 5)]
    assert await (await Doc.objects.get(pk=second.pk)).photo.read() == b"the next photo!"


@pytest.mark.parametrize("kind", KINDS)
async def test_a_stale_asset_is_told_it_was_deleted_not_given_the_next_one(
    asyncassets_db: Any, request: pytest.FixtureRequest, tmp_path: Path, kind: str
) -> None:
    storage = storage_of(kind, request, tmp_path, key_template="{filename}")
    photos = AssetManager(storage)
    await photos.add(b"the first asset", asset_id="a", filename="photo.jpg")
    stale = await photos.get("a")
    await photos.delete("a")
    await photos.add(b"the next asset!", asset_id="b", filename="photo.jpg")
    with pytest.raises(FileDeletedWhileReading):
        await stale.read()
    assert await (await photos.get("b")).read() == b"the next asset!"


@pytest.mark.parametrize("kind", KINDS)
async def test_an_object_replaced_behind_the_catalogues_back_is_never_read_as_the_file(
    asyncassets_db: Any, request: pytest.FixtureRequest, tmp_path: Path, kind: str
) -> None:
    storage = storage_of(kind, request, tmp_path, key_template="{filename}")
    Doc = doc_class(storage)
    doc = await Doc().save()
    await doc.photo.put(b"the real photo", filename="photo.jpg")
    # Another tool (or a restore from an older backup) puts other bytes there.
    writer = storage.blobs().open_writer("photo.jpg")
    await writer.write(b"a planted file")  # same length
    await writer.commit(overwrite=True)
    loaded = await Doc.objects.get(pk=doc.pk)
    with pytest.raises(asyncassets.errors.CorruptFile, match="not the one its upload wrote"):
        await loaded.photo.read()
    report = await check(buckets=[storage.collection_name])
    assert report.changed_objects == 1 and not report.ok


# -- case 4: concurrent uploads of one name get -2, -3... ----------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_concurrent_uploads_of_one_name_get_variants_of_the_key(
    asyncassets_db: Any, request: pytest.FixtureRequest, tmp_path: Path, kind: str
) -> None:
    storage = storage_of(kind, request, tmp_path, key_template="{field}/{filename}")
    Doc = doc_class(storage)
    docs = [await Doc().save() for _ in range(4)]
    datas = [payload(32 * KIB, seed=i) for i in range(4)]
    await asyncio.gather(
        *(doc.photo.put(data, filename="photo.jpg") for doc, data in zip(docs, datas, strict=True))
    )
    assert sorted(doc.photo.key for doc in docs) == [
        "photo/photo-2.jpg", "photo/photo-3.jpg", "photo/photo-4.jpg", "photo/photo.jpg",
    ]
    for doc, data in zip(docs, datas, strict=True):
        assert await (await Doc.objects.get(pk=doc.pk)).photo.read() == data


_RACING_PROCESS = textwrap.dedent(
    """
    import asyncio, sys
    import asyncassets
    from asyncassets import Document
    from asyncassets.fields import FileField
    from asyncassets.storage import FileSystemStorage

    uri, db, root, name, n = sys.argv[1:6]

    class Doc(Document):
        meta = {"collection": name + "_docs"}
        photo = FileField(storage=FileSystemStorage(root, key_template="{filename}",
                                                    collection_name=name, fsync=False))

    async def main():
        asyncassets.connect(uri, db=db)
        for i in range(int(n)):
            doc = Doc()
            await doc.photo.put(f"{sys.argv[6]}-{i:04d}".encode(), filename="photo.jpg")
            await doc.save()
        await asyncassets.disconnect()

    asyncio.run(main())
    """
)


async def test_processes_racing_for_one_name_never_share_a_key(
    asyncassets_db: Any, asyncassets_server_uri: str, tmp_path: Path
) -> None:
    name = f"promise{next(_names)}"
    root = tmp_path / name
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", _RACING_PROCESS, asyncassets_server_uri,
            asyncassets_db.name, str(root), name, "15", f"p{n}",
            stderr=subprocess.PIPE,
        )
        for n in range(3)
    ]
    for proc in procs:
        _, err = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode == 0, err.decode()
    storage = FileSystemStorage(root, key_template="{filename}", collection_name=name,
                                fsync=False)

    class Doc(Document):
        meta = {"collection": name + "_docs"}
        photo = FileField(storage=storage)

    docs = await Doc.objects.to_list()
    assert len(docs) == 45
    seen = {}
    for doc in docs:
        seen[doc.photo.key] = await doc.photo.read()
    assert len(seen) == 45  # 45 keys: photo.jpg, photo-2.jpg ... photo-45.jpg
    assert sorted(seen.values()) == sorted(
        f"p{n}-{i:04d}".encode() for n in range(3) for i in range(15)
    )


# -- case 5: a directory pruned under a writer is made again -------------------------


async def test_puts_racing_deletes_in_one_directory_never_fail_with_enoent(
    asyncassets_db: Any, tmp_path: Path
) -> None:
    name = f"promise{next(_names)}"
    storage = FileSystemStorage(tmp_path / name, key_template="a/b/c/{uuid}",
                                collection_name=name, fsync=False)
    Doc = doc_class(storage)

    async def put_then_delete(i: int) -> None:
        doc = Doc()
        await doc.photo.put(b"%d" % i)
        await doc.save()
        await doc.delete()  # the last file of a/b/c: the directories are pruned

    for round_ in range(40):
        await asyncio.gather(*(put_then_delete(round_ * 4 + i) for i in range(4)))
    assert await keys_of(storage) == []


# -- case 6: a planted symbolic link is never followed --------------------------------


async def test_a_planted_link_under_the_root_is_never_followed(
    asyncassets_db: Any, tmp_path: Path
) -> None:
    name = f"promise{next(_names)}"
    root = tmp_path / name
    outside = tmp_path / "outside"
    storage = FileSystemStorage(root, key_template="2026/{uuid}{ext}", collection_name=name,
                                fsync=False)
    Doc = doc_class(storage)
    kept = await Doc().save()
    await kept.photo.put(b"stored before the link", filename="a.txt")
    # Someone moves the directory out and plants a link to it in its place.
    outside.mkdir()
    (root / "2026").rename(outside / "2026")
    (root / "2026").symlink_to(outside / "2026")
    victim = outside / "2026" / (await stored_key(storage, kept.photo)).split("/")[-1]
    assert victim.read_bytes() == b"stored before the link"

    doc = Doc()
    with pytest.raises(StorageError, match="symbolic link"):
        await doc.photo.put(b"must not land outside", filename="b.txt")
    assert sorted(p.name for p in (outside / "2026").iterdir()) == [victim.name]

    loaded = await Doc.objects.get(pk=kept.pk)
    with pytest.raises(asyncassets.errors.CorruptFile):
        await loaded.photo.read()
    await loaded.photo.delete()  # removes the reference and the entry, nothing outside
    assert victim.read_bytes() == b"stored before the link"
    assert (root / "2026").is_symlink()
    assert [info async for info in storage.blobs().list()] == []


async def test_a_link_planted_as_the_object_itself_is_never_read_or_deleted(
    asyncassets_db: Any, tmp_path: Path
) -> None:
    name = f"promise{next(_names)}"
    root = tmp_path / name
    storage = FileSystemStorage(root, key_template="{filename}", collection_name=name,
                                fsync=False)
    Doc = doc_class(storage)
    doc = await Doc().save()
    await doc.photo.put(b"public bytes", filename="photo.jpg")
    secret = tmp_path / "secret"
    secret.write_bytes(b"secret bytes")
    (root / "photo.jpg").unlink()
    (root / "photo.jpg").symlink_to(secret)
    loaded = await Doc.objects.get(pk=doc.pk)
    with pytest.raises(asyncassets.errors.CorruptFile):
        await loaded.photo.read()
    await loaded.photo.delete()
    assert secret.read_bytes() == b"secret bytes"


# -- cases 9 and 10: transfers by hand, and the error a failed transfer records -------


async def test_a_failed_transfer_records_its_cause_and_transfer_by_hand_tries_once_more(
    asyncassets_db: Any, tmp_path: Path
) -> None:
    name = f"promise{next(_names)}"
    remote_root = tmp_path / f"{name}-remote"
    storage = QueuedStorage(
        local=FileSystemStorage(tmp_path / f"{name}-spool", fsync=False),
        remote=FileSystemStorage(remote_root, key_template="{filename}", fsync=False),
        collection_name=name, max_attempts=2, retry_delay=0.01, max_retry_delay=0.02,
    )
    remote_root.write_bytes(b"a file where the remote directory should be")
    Doc = doc_class(storage)
    doc = Doc()
    await doc.photo.put(b"queued bytes", filename="q.txt")
    await doc.save()
    store = storage.bind(asyncassets.get_db())
    worker = TransferWorker([store], concurrency=1)
    for _ in range(50):
        await worker.run_once()
        entry = await store.find(doc.photo.file_id)
        assert entry is not None
        if entry["transfer"]["state"] == "failed":
            break
        await asyncio.sleep(0.03)
    assert entry["transfer"]["state"] == "failed" and entry["transfer"]["attempts"] == 2
    # Case 10: the real cause, not the cleanup's.
    error = entry["transfer"]["error"]
    assert "not a directory" in error and "removing" not in error, error

    # Case 9: once the cause is fixed, a transfer by hand makes one more attempt.
    remote_root.unlink()
    await doc.photo.transfer()
    await doc.photo.load()
    assert doc.photo.location == "remote"
    assert await doc.photo.read() == b"queued bytes"
    assert (await check(buckets=[name])).ok


async def test_a_failed_transfer_by_hand_fails_again_and_stays_failed(
    asyncassets_db: Any, tmp_path: Path
) -> None:
    name = f"promise{next(_names)}"
    remote_root = tmp_path / f"{name}-remote"
    storage = QueuedStorage(
        local=FileSystemStorage(tmp_path / f"{name}-spool", fsync=False),
        remote=FileSystemStorage(remote_root, fsync=False),
        collection_name=name, max_attempts=1, retry_delay=0.01, max_retry_delay=0.02,
    )
    remote_root.write_bytes(b"still a file")
    Doc = doc_class(storage)
    doc = Doc()
    await doc.photo.put(b"queued", filename="q.txt")
    await doc.save()
    store = storage.bind(asyncassets.get_db())
    await TransferWorker([store], concurrency=1).run_once()
    assert (await store.find(doc.photo.file_id))["transfer"]["state"] == "failed"
    with pytest.raises(TransferFailed, match="not a directory") as caught:
        await doc.photo.transfer()
    assert caught.value.state == "failed"
    entry = await store.find(doc.photo.file_id)
    assert entry["transfer"]["state"] == "failed" and entry["transfer"]["attempts"] == 2
    assert await doc.photo.read() == b"queued"  # still served from the spool


async def test_a_link_or_a_directory_at_a_free_key_makes_the_upload_take_the_next_key(
    asyncassets_db: Any, tmp_path: Path
) -> None:
    # Found by the race suite: a link at the key is no object (so the key looked
    # free), but no object can be linked over it either: every upload of the name
    # failed with KeyTaken instead of taking photo-2.jpg.
    name = f"promise{next(_names)}"
    root = tmp_path / name
    storage = FileSystemStorage(root, key_template="{filename}", collection_name=name,
                                fsync=False)
    Doc = doc_class(storage)
    root.mkdir()
    (root / "photo.jpg").symlink_to(tmp_path / "elsewhere.jpg")
    (root / "a.txt").mkdir()
    first = await Doc().save()
    await first.photo.put(b"a photo", filename="photo.jpg")
    second = await Doc().save()
    await second.photo.put(b"a text", filename="a.txt")
    assert (first.photo.key, second.photo.key) == ("photo-2.jpg", "a-2.txt")
    assert await first.photo.read() == b"a photo" and await second.photo.read() == b"a text"
    assert (root / "photo.jpg").is_symlink() and not (tmp_path / "elsewhere.jpg").exists()


# -- S3 requests whose outcome the client cannot know (found by a hostile review) -----


class _ShadyProxy:
    """A pass-through proxy in front of moto that keeps connections alive, and does
    one thing to the first PUT whose request line names ``victim``:

    ``"lose-reply"``: moto gets the PUT and answers; the client never sees the answer
    (its connection is reset), so the HTTP client sends the PUT again by itself.
    ``"late"``: the client is answered ``503`` at once (so it gives up), and moto gets
    the PUT a moment later, as a slow server applies a request after its client left.
    """

    def __init__(self, upstream: int, victim: bytes, mode: str, delay: float = 1.0) -> None:
        self.upstream, self.victim, self.mode, self.delay = upstream, victim, mode, delay
        self.hit = False
        self.server: asyncio.AbstractServer | None = None
        self.background: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: Any) -> None:
        assert self.server is not None
        self.server.close()
        for task in self.background:
            task.cancel()
        await asyncio.gather(*self.background, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        swallow = asyncio.Event()

        async def down() -> None:
            while data := await up_reader.read(65536):
                if swallow.is_set() and not data.startswith(b"HTTP/1.1 100"):
                    writer.transport.abort()  # the reply is lost
                    up_writer.transport.abort()
                    return
                writer.write(data)
                await writer.drain()
            writer.close()

        downstream = asyncio.ensure_future(down())
        try:
            while data := await reader.read(65536):
                line = data.split(b"\r\n", 1)[0]
                if not self.hit and line.startswith(b"PUT ") and self.victim in line:
                    self.hit = True
                    if self.mode == "lose-reply":
                        swallow.set()
                    else:
                        request = data + await _rest_of_request(reader, writer, data)
                        late = asyncio.ensure_future(self._deliver_late(request))
                        self.background.add(late)
                        writer.write(b"HTTP/1.1 503 Slow Down\r\nContent-Length: 0\r\n"
                                     b"Connection: close\r\n\r\n")
                        await writer.drain()
                        writer.close()
                        return
                up_writer.write(data)
                await up_writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            up_writer.close()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await downstream

    async def _deliver_late(self, request: bytes) -> None:
        await asyncio.sleep(self.delay)
        reader, writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        writer.write(request)
        await writer.drain()
        await reader.read(65536)
        writer.close()


async def _rest_of_request(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes
) -> bytes:
    """The bytes of a request not read yet, its first bytes being ``head`` (headers,
    then a body of Content-Length bytes; botocore sends no chunked PUTs here). A
    client that asks (``Expect: 100-continue``) is told to send its body."""
    read = b""
    while b"\r\n\r\n" not in head + read:
        more = await reader.read(65536)
        if not more:
            return read
        read += more
    head += read
    headers, _, body = head.partition(b"\r\n\r\n")
    length = 0
    for line in headers.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
        if name.strip().lower() == b"expect" and value.strip().lower() == b"100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
    return read + await reader.readexactly(max(length - len(body), 0))


def _s3_via(request: pytest.FixtureRequest, endpoint: str, **kw: Any) -> S3Storage:
    bucket = request.getfixturevalue("asyncassets_s3_bucket")
    name = f"promise{next(_names)}"
    return S3Storage(**{**bucket.options, "endpoint_url": endpoint, "prefix": f"{name}/",
                        "part_size": 5 * MIB}, collection_name=name, **kw)


async def test_a_put_whose_reply_is_lost_and_resent_by_the_http_client_is_still_ours(
    asyncassets_db: Any, request: pytest.FixtureRequest
) -> None:
    # The PUT is applied, its reply lost; the HTTP client sends it again on its own,
    # and If-None-Match refuses the copy: that 412 is this upload's own object, not
    # another's (it carries the upload's token). It failed with KeyTaken and left
    # its object behind.
    bucket = request.getfixturevalue("asyncassets_s3_bucket")
    port = int(bucket.endpoint_url.rsplit(":", 1)[1].strip("/"))
    async with _ShadyProxy(port, b"photo.jpg", "lose-reply") as endpoint:
        storage = _s3_via(request, endpoint, key_template="{filename}")
        Doc = doc_class(storage)
        doc = await Doc().save()
        await doc.photo.put(b"one upload", filename="photo.jpg")
        assert doc.photo.key == "photo.jpg"
        assert await (await Doc.objects.get(pk=doc.pk)).photo.read() == b"one upload"
        report = await check(buckets=[storage.collection_name])
        assert report.ok and report.orphaned_objects == 0, report
        await storage.blobs().aclose()  # type: ignore[attr-defined]


async def test_a_put_applied_after_its_client_gave_up_never_replaces_the_next_upload(
    asyncassets_db: Any, request: pytest.FixtureRequest
) -> None:
    # overwrite=True: the first upload's PUT failed on the client's side but the
    # server applies it a second later. The key stays reserved (the outcome is
    # unknown), so the next upload of the name takes another key; the late object
    # is the sweep's. It released the key at once, and the late PUT replaced the
    # next upload's object under its live entry.
    bucket = request.getfixturevalue("asyncassets_s3_bucket")
    port = int(bucket.endpoint_url.rsplit(":", 1)[1].strip("/"))
    async with _ShadyProxy(port, b"photo.jpg", "late", delay=1.0) as endpoint:
        storage = _s3_via(request, endpoint, key_template="{filename}", overwrite=True,
                          retry=Retry(attempts=1))
        Doc = doc_class(storage)
        first = await Doc().save()
        with pytest.raises(StorageError):
            await first.photo.put(b"first upload", filename="photo.jpg")
        second = await Doc().save()
        await second.photo.put(b"next upload!", filename="photo.jpg")  # same length
        assert second.photo.key == "photo-2.jpg"
        await asyncio.sleep(1.5)  # the late PUT lands
        assert await (await Doc.objects.get(pk=second.pk)).photo.read() == b"next upload!"
        report = await sweep_orphans(grace=0, buckets=[storage.collection_name])
        assert report.reservations_released == 1  # the late object, by its token
        assert await keys_of(storage) == ["photo-2.jpg"]
        assert (await check(buckets=[storage.collection_name])).ok
        await storage.blobs().aclose()  # type: ignore[attr-defined]


async def test_a_file_rewritten_in_place_during_a_read_is_never_handed_out(
    asyncassets_db: Any, tmp_path: Path
) -> None:
    # Another tool rewrites the object in place (no new inode) while a reader is
    # between two pieces: the reader stops, it never yields bytes of the rewrite.
    name = f"promise{next(_names)}"
    storage = FileSystemStorage(tmp_path / name, key_template="{filename}",
                                collection_name=name, fsync=False)
    Doc = doc_class(storage)
    doc = await Doc().save()
    old = payload(3 * MIB, seed=1)
    await doc.photo.put(old, filename="big.bin")
    stream = doc.photo.stream()
    got = [await anext(stream)]
    path = tmp_path / name / "big.bin"
    with open(path, "r+b") as raw:  # noqa: ASYNC230  (the other tool, in place)
        raw.write(payload(3 * MIB, seed=2))
    with pytest.raises(asyncassets.errors.CorruptFile):
        async for piece in stream:
            got.append(piece)
    assert old.startswith(b"".join(got))


async def test_the_hundred_and_first_file_of_one_name_gets_its_own_key_at_once(
    asyncassets_db: Any, tmp_path: Path
) -> None:
    name = f"promise{next(_names)}"
    storage = FileSystemStorage(tmp_path / name, key_template="{filename}",
                                collection_name=name, fsync=False)
    store = storage.bind(asyncassets.get_db())
    keys = [(await store.upload(b"%d" % i, filename="IMG_0001.jpg"))["location"]["key"]
            for i in range(105)]
    assert keys[:3] == ["IMG_0001.jpg", "IMG_0001-2.jpg", "IMG_0001-3.jpg"]
    assert keys[-1] == "IMG_0001-105.jpg" and len(set(keys)) == 105
    # A variant is found by one query on the reservations, not by trying each.
    assert await store.reservations.highest_variant("IMG_0001.jpg") == 105


async def test_a_directory_at_the_key_makes_an_overwriting_upload_take_the_next_key(
    asyncassets_db: Any, tmp_path: Path
) -> None:
    name = f"promise{next(_names)}"
    root = tmp_path / name
    storage = FileSystemStorage(root, key_template="{filename}", collection_name=name,
                                fsync=False, overwrite=True)
    (root / "report.pdf").mkdir(parents=True)
    (root / "notes.txt").write_bytes(b"another tool's")  # a file: overwritten
    store = storage.bind(asyncassets.get_db())
    first = await store.upload(b"a report", filename="report.pdf")
    second = await store.upload(b"my notes", filename="notes.txt")
    assert first["location"]["key"] == "report-2.pdf"
    assert second["location"]["key"] == "notes.txt"
    assert (root / "notes.txt").read_bytes() == b"my notes"


def test_templates_that_cannot_make_a_key_for_every_name_fail_at_declaration(
    tmp_path: Path,
) -> None:
    with pytest.raises(ValueError, match=r"empty.*for a file named None"):
        FileSystemStorage(tmp_path, key_template="{ext}")
    with pytest.raises(ValueError, match=r"temp file.*'x\.0123456789abcdef\.part'"):
        FileSystemStorage(tmp_path, key_template=".{filename}")


async def test_a_key_as_long_as_allowed_still_gets_variants(
    asyncassets_db: Any, tmp_path: Path
) -> None:
    name = f"promise{next(_names)}"
    long_key = "d/" + "k" * 200 + ".bin"  # a 1,024-byte key would not fit a file name
    storage = FileSystemStorage(tmp_path / name, key_template=lambda doc, fn: long_key,
                                collection_name=name, fsync=False)
    store = storage.bind(asyncassets.get_db())
    first = await store.upload(b"1")
    second = await store.upload(b"2")
    assert first["location"]["key"] == long_key
    assert second["location"]["key"] == "d/" + "k" * 200 + "-2.bin"
    assert len(KeyMaker.variant("a" * 1020 + ".bin", 12).encode()) == 1024


async def test_a_file_compressed_with_an_unknown_codec_is_refused_not_inflated_as_gzip(
    asyncassets_db: Any,
) -> None:
    class Packed(Document):
        meta = {"collection": "promise_packed"}
        f = FileField(compress="gzip")

    doc = await Packed().save()
    await doc.f.put(b"squeezed " * 100)
    await asyncassets.get_db()["fs.files"].update_one(
        {"_id": doc.f.grid_id}, {"$set": {"metadata.compression.codec": "zstd"}}
    )
    loaded = await Packed.objects.get(pk=doc.pk)
    with pytest.raises(asyncassets.errors.CorruptFile, match="codec 'zstd'"):
        await loaded.f.read()
