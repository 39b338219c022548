"""Hostile tests of the promise that a finished tus upload is attached once, and that a
retried finish never overwrites a later change (docs/uploads.rst, "When the last
byte arrives"; the module docstring of asyncassets/web/tus.py).

The finish is attacked where it can be cut: a server SIGKILLed right before its
switch or right after it (tests/_tus_server.py, ``TUS_DIE_AT``), and in process a
:class:`Killed` raised at the same points (nothing after it runs; its ``finally``
clauses do, so its lease is given back as if it had run out). Around those: two
retries at once on two server processes, user writes through the library
(``replace``, ``delete``, assignment + ``save``, ``Document.delete``) and writes
that bypass it (``update``, ``modify``), a finish that stalls past its lease, a
staged upload refused with 409 and retried, ``HEAD`` attaching while the user
changes the field, and the sweep once the upload expired.

After each: the document holds what the docs say, byte-exact; after expiry and a
grace-0 sweep no session, staged chunk or orphan is left and ``check(verify=True)``
is ok.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from _tus import app_for, client, create, doc_class, patch
from test_tus_faults import finish_world  # noqa: F401 (a fixture)

import asyncassets
from asyncassets.storage import FileSystemStorage, GridFSStorage, S3Storage
from asyncassets.storage.resumable import UPLOAD_MARK, UploadSessions

LEASE = dt.timedelta(seconds=1)
TAIL = 1000


class Killed(BaseException):
    """The serving process dying at that point: an in-process stand-in for SIGKILL."""


# -- worlds -----------------------------------------------------------------------------

#: in place: the bytes are written where the file keeps them; staged: they wait in
#: MongoDB and the finish stores them through the field's writer (replace()).
KINDS = {
    "gridfs": "in place",
    "filesystem": "in place",
    "s3": "in place",
    "gzip": "staged",        # a GridFS field that compresses
    "overwrite": "staged",   # a directory with overwrite=True
}


@pytest.fixture
async def world(request: Any, asyncassets_db: Any, tmp_path: Any) -> Any:
    """``(cls, doc, name)``: a document class on that storage, a saved empty document
    owned by ann, the storage's catalogue."""
    kind = request.param
    name = f"tao_{kind}_{abs(hash(request.node.name)) % 10**8}"
    if kind == "gridfs":
        storage: Any = GridFSStorage(name, chunk_size=64 * 1024)
    elif kind == "gzip":
        storage = GridFSStorage(name, chunk_size=64 * 1024)
    elif kind == "filesystem":
        storage = FileSystemStorage(tmp_path / name, collection_name=name, fsync=False)
    elif kind == "overwrite":
        storage = FileSystemStorage(tmp_path / name, collection_name=name, fsync=False,
                                    overwrite=True)
    else:
        bucket = request.getfixturevalue("asyncassets_s3_bucket")
        storage = S3Storage(**bucket.options, prefix=f"{name}/", collection_name=name)
    cls = doc_class(storage, **({"compress": "gzip"} if kind == "gzip" else {}))
    doc = cls(owner="ann")
    await doc.save()
    return cls, doc, name


def worlds(*kinds: str, slow: tuple[str, ...] = ()) -> Any:
    return pytest.mark.parametrize(
        "world",
        [pytest.param(k, marks=pytest.mark.slow) if k in slow else k for k in kinds],
        indirect=True,
    )


async def settled(db: Any, name: str, files: int) -> None:
    """After the upload expired and a grace-0 sweep: ``files`` files, nothing staged,
    no session, no pending S3 upload or spare key reservation, ``check`` ok."""
    from asyncassets.storage.objects.direct import SESSIONS
    from asyncassets.storage.objects.reservations import COLLECTION as RESERVATIONS

    await asyncio.sleep(1.05)  # ObjectId times have a one-second resolution
    past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1)
    await db[f"{name}.uploads"].update_many({}, {"$set": {"expires": past},
                                                 "$unset": {"lease": ""}})
    await asyncassets.sweep_orphans(grace=0, buckets=name)
    await asyncassets.sweep_orphans(grace=0, buckets=name)  # direct sessions it expired
    assert await db[f"{name}.uploads"].count_documents({}) == 0
    assert await db[f"{name}.uploads.staged"].count_documents({}) == 0
    assert await db[f"{name}.files"].count_documents({}) == files
    assert await db[RESERVATIONS].count_documents({"catalogue": name}) in (0, files)
    assert await db[SESSIONS].count_documents(
        {"catalogue": name, "state": {"$nin": ["done", "failed", "aborted"]}}) == 0
    report = await asyncassets.check(verify=True, buckets=name)
    assert report.ok, str(report)


async def holds(cls: Any, doc: Any, data: bytes | None) -> None:
    stored = await cls.objects(pk=doc.pk).first()
    if data is None:
        assert stored.file.grid_id is None, "the field holds a file"
        return
    assert stored.file.grid_id is not None, "the field is empty"
    assert await stored.file.read() == data


# -- a finish cut at a point, in process --------------------------------------------------


@contextlib.contextmanager
def dying_at(point: str) -> Iterator[None]:
    """While inside: a finish raises :class:`Killed` right before the switch that
    attaches an upload (``switch``), right after it (``done``), or right after a
    staged switch was refused, before the refusal is recorded (``refused``)."""
    from asyncassets import references

    with pytest.MonkeyPatch.context() as mp:
        if point == "switch":
            real = references._update

            async def update(root: Any, proxy: Any, path: Any, old: Any, new: Any) -> Any:
                if new is not None and UPLOAD_MARK in (new.get("metadata") or {}):
                    raise Killed
                return await real(root, proxy, path, old, new)

            mp.setattr(references, "_update", update)
        elif point == "done":

            async def mark_done(self: Any, upload_id: str, file_id: Any) -> None:
                raise Killed

            mp.setattr(UploadSessions, "mark_done", mark_done)
        elif point == "refused":

            async def forget(self: Any, upload_id: str, token: str) -> None:
                raise Killed

            mp.setattr(UploadSessions, "forget_switch_from", forget)
        else:
            raise AssertionError(point)
        yield


async def upload_all_but_the_tail(http: Any, doc: Any, data: bytes) -> str:
    location = (await create(http, doc, len(data))).headers["location"]
    assert (await patch(http, location, 0, data[:-TAIL])).status_code == 204
    return str(location)


async def last_patch_killed(http: Any, location: str, data: bytes, point: str) -> None:
    with dying_at(point), pytest.raises(Killed):
        await patch(http, location, len(data) - TAIL, data[-TAIL:])


def fresh(cls: Any) -> httpx.AsyncClient:
    """A client of a new app: another server process (nothing in memory shared)."""
    return client(app_for(cls, lease=LEASE))


async def retried(http: Any, location: str, length: int) -> Any:
    """The client's retried last PATCH, again while 409 (tus-js-client's retryDelays)."""
    for _ in range(40):
        answer = await patch(http, location, length, b"")
        if answer.status_code != 409:
            return answer
        await asyncio.sleep(0.1)
    return answer


# -- 1. a finish that stalls past its lease --------------------------------------------------


@worlds("gzip", "gridfs")
async def test_a_finish_stalled_past_its_lease_never_attaches_after_the_user_deleted(
    asyncassets_db, world, monkeypatch
):
    """A finish (F1) gets to its switch and stalls there: a busy process, and one
    renewal of its lease failed (a primary stepping down), so its keeper gave up.
    The lease runs out; the client's retried last PATCH (F2) takes the upload over
    and attaches it (204). The user then deletes the file through the document
    (``doc.file.delete()``, a write of the library, which the docs say is known to
    the upload). F1 goes on.

    Per the docs: one finish at a time; "a finished upload is never attached
    again ... whatever the field holds by then"; ``delete()`` is a write the
    reference writer records before it moves the field. So the field must stay
    empty and F1 must answer as tus does (204/409/410/503)."""
    from pymongo.errors import AutoReconnect

    from asyncassets import references

    cls, doc, name = world
    data = os.urandom(200_000)
    real_switch, real_renew = references.switch, UploadSessions.renew
    stalled, resume = asyncio.Event(), asyncio.Event()

    async def switch(root: Any, proxy: Any, old: Any, new_doc: Any) -> None:
        if (new_doc is not None and UPLOAD_MARK in (new_doc.get("metadata") or {})
                and not stalled.is_set()):
            stalled.set()
            await resume.wait()
        await real_switch(root, proxy, old, new_doc)

    async def renew(self: Any, upload_id: str, token: str) -> None:
        if stalled.is_set() and not resume.is_set():
            raise AutoReconnect("the primary stepped down")
        await real_renew(self, upload_id, token)

    monkeypatch.setattr(references, "switch", switch)
    monkeypatch.setattr(UploadSessions, "renew", renew)
    async with client(app_for(cls, lease=LEASE)) as http:
        location = await upload_all_but_the_tail(http, doc, data)
        first = asyncio.ensure_future(patch(http, location, len(data) - TAIL, data[-TAIL:]))
        await stalled.wait()
        await asyncio.sleep(LEASE.total_seconds() * 1.6)  # the keeper renews at 1/3
        async with fresh(cls) as other:
            again = await retried(other, location, len(data))
        assert again.status_code == 204, again.text
        await holds(cls, doc, data)
        mine = await cls.objects(pk=doc.pk).first()
        await mine.file.delete()
        resume.set()
        try:
            late = await first
        except Exception as exc:  # what the app let through
            late = exc
    final = await cls.objects(pk=doc.pk).first()
    assert final.file.grid_id is None, (
        "the stalled finish attached the upload again over the user's delete()")
    assert isinstance(late, httpx.Response) and late.status_code in (204, 409, 410, 503), late
    await settled(asyncassets_db, name, files=0)


# -- 2. the documented hole, and writes around it ---------------------------------------------


@pytest.mark.xfail(strict=True, reason=(
    "documented limitation (docs/uploads.rst, 'The one ordering left'): a write that "
    "puts back exactly the value the finish switched from lets a retry attach again"))
@worlds("gridfs")
async def test_the_documented_hole_an_unset_of_a_field_that_was_empty(asyncassets_db, world):
    """Killed after the switch; ``update(unset__file=True)``; the retry attaches the
    upload a second time (the docs say so). The ideal is asserted."""
    cls, doc, _name = world
    data = os.urandom(100_000)
    async with client(app_for(cls, lease=LEASE)) as http:
        location = await upload_all_but_the_tail(http, doc, data)
        await last_patch_killed(http, location, data, "done")
    await cls.objects(pk=doc.pk).update(unset__file=True)
    async with fresh(cls) as http:
        answer = await retried(http, location, len(data))
    assert answer.status_code == 204, answer.text
    await holds(cls, doc, None)


@worlds("gzip", "gridfs", "filesystem", slow=("filesystem",))
async def test_the_document_deleted_and_created_again_with_its_id_gets_nothing(
    asyncassets_db, world
):
    """Killed after the switch (the document holds the upload, its session not done).
    The user deletes the document through the library (``doc.delete()``, its files
    with it) and creates one with the same ``_id`` (a natural key: a profile per
    user). The retried last PATCH must not attach the upload to the new document:
    "Deleting the document ends it" (a retry is 410; or 204 attaching nothing)."""
    cls, doc, name = world
    data = os.urandom(100_000)
    async with client(app_for(cls, lease=LEASE)) as http:
        location = await upload_all_but_the_tail(http, doc, data)
        await last_patch_killed(http, location, data, "done")
    await holds(cls, doc, data)
    await (await cls.objects(pk=doc.pk).first()).delete()
    await cls(id=doc.pk, owner="ann").save()
    async with fresh(cls) as http:
        answer = await retried(http, location, len(data))
    assert answer.status_code in (204, 410), answer.text
    await holds(cls, doc, None)
    await settled(asyncassets_db, name, files=0)


@worlds("gridfs", "gzip")
async def test_one_file_in_two_documents_then_moved_away_in_one_is_not_attached_again(
    asyncassets_db, world
):
    """Killed after the switch; the user assigns the upload's file to a second
    document and saves it (the file is shared), then moves the first document's
    field to another file with ``update()`` (nothing recorded). The retry is 204
    and attaches nothing; the second document keeps the upload's bytes."""
    cls, doc, name = world
    data = os.urandom(100_000)
    async with client(app_for(cls, lease=LEASE)) as http:
        location = await upload_all_but_the_tail(http, doc, data)
        await last_patch_killed(http, location, data, "done")
    first = await cls.objects(pk=doc.pk).first()
    second = cls(owner="ann")
    second.file = first.file
    await second.save()
    third = cls(owner="ann")
    await third.file.put(b"another file")
    await third.save()
    await cls.objects(pk=doc.pk).update(set__file=third.file.grid_id)
    async with fresh(cls) as http:
        answer = await retried(http, location, len(data))
    assert answer.status_code == 204, answer.text
    await holds(cls, doc, b"another file")
    await holds(cls, second, data)
    await settled(asyncassets_db, name, files=2)


# -- 3. a staged upload refused with 409, then retried --------------------------------------


async def refused_by_a_racing_replace(cls: Any, doc: Any, http: Any, location: str,
                                      data: bytes, monkeypatch: Any) -> Any:
    """The last PATCH, with the user's ``replace()`` landing between the finish's
    read of the document and its switch: that switch is refused."""
    from asyncassets import references

    real_switch = references.switch
    raced = []

    async def switch(root: Any, proxy: Any, old: Any, new_doc: Any) -> None:
        if (new_doc is not None and UPLOAD_MARK in (new_doc.get("metadata") or {})
                and not raced):
            raced.append(True)
            mine = await cls.objects(pk=doc.pk).first()
            await mine.file.replace(b"the user's racing file")
        await real_switch(root, proxy, old, new_doc)

    monkeypatch.setattr(references, "switch", switch)
    return await patch(http, location, len(data) - TAIL, data[-TAIL:])


@worlds("gzip", "overwrite")
async def test_a_staged_upload_refused_by_a_racing_replace_is_attached_by_its_retry(
    asyncassets_db, world, monkeypatch
):
    """The docs: a staged upload keeps its bytes on a 409, and a retried PATCH
    attaches them over the field's current file. The retry comes to another
    process (the first one killed after answering)."""
    cls, doc, name = world
    await doc.file.put(b"the first file")
    data = os.urandom(150_000)
    async with client(app_for(cls, lease=LEASE)) as http:
        location = await upload_all_but_the_tail(http, doc, data)
        refused = await refused_by_a_racing_replace(cls, doc, http, location, data,
                                                    monkeypatch)
        assert refused.status_code == 409, refused.text
        monkeypatch.undo()
    await holds(cls, doc, b"the user's racing file")
    async with fresh(cls) as http:
        answer = await retried(http, location, len(data))
        assert answer.status_code == 204, answer.text
        assert (await patch(http, location, len(data), b"")).status_code == 204
    await holds(cls, doc, data)
    await settled(asyncassets_db, name, files=1)


@worlds("gzip")
async def test_a_staged_refusal_killed_before_it_is_recorded_lets_the_change_stand(
    asyncassets_db, world, monkeypatch
):
    """As above, but the process dies between the refusal and its record (the client
    never saw the 409). From the session this is a finish killed before its switch
    with the field changed since: the docs say the retry is 204 and the change
    stands."""
    cls, doc, name = world
    await doc.file.put(b"the first file")
    data = os.urandom(150_000)
    async with client(app_for(cls, lease=LEASE)) as http:
        location = await upload_all_but_the_tail(http, doc, data)
        with dying_at("refused"), pytest.raises(Killed):
            await refused_by_a_racing_replace(cls, doc, http, location, data, monkeypatch)
        monkeypatch.undo()
    async with fresh(cls) as http:
        answer = await retried(http, location, len(data))
    assert answer.status_code == 204, answer.text
    await holds(cls, doc, b"the user's racing file")
    await settled(asyncassets_db, name, files=1)


# -- 4. HEAD attaching while the user changes the field -------------------------------------


@worlds("gridfs", "gzip", "filesystem", slow=("filesystem",))
@pytest.mark.parametrize("write", ["replace", "update"])
async def test_head_attaching_races_a_user_change_and_one_of_them_stands(
    asyncassets_db, world, write, request
):
    """Killed right before its switch; then a resuming client's HEAD (which attaches a
    complete upload) and the user's write at once. Either the upload is attached
    and the user's ``replace()`` is refused (FileConflict) / ``update()`` lands
    after it, or the user's change stands and the upload is not attached; HEAD ends
    with 200 and the full offset; never a mix, nothing leaked."""
    from asyncassets.errors import FileConflict

    cls, doc, name = world
    await doc.file.put(b"the first file")
    data = os.urandom(120_000)
    other = cls(owner="ann")
    await other.file.put(b"the user's file")
    await other.save()
    async with client(app_for(cls, lease=LEASE)) as http:
        location = await upload_all_but_the_tail(http, doc, data)
        await last_patch_killed(http, location, data, "switch")

    async def head() -> Any:
        async with fresh(cls) as again:
            for _ in range(40):
                answer = await again.head(location)
                if answer.status_code not in (409, 503):
                    return answer
                await asyncio.sleep(0.1)
            return answer

    async def user() -> str:
        mine = await cls.objects(pk=doc.pk).first()
        try:
            if write == "replace":
                await mine.file.replace(b"the user's file")
            else:
                await cls.objects(pk=doc.pk).update(set__file=other.file.grid_id)
        except FileConflict:
            return "refused"
        return "applied"

    answer, outcome = await asyncio.gather(head(), user())
    stored = await cls.objects(pk=doc.pk).first()
    got = await stored.file.read()
    assert got in (data, b"the user's file")
    if outcome == "refused":
        assert got == data
    if answer.status_code == 404:
        # The docs: a switch refused drops an upload written in place (upload again).
        kind = request.node.callspec.params["world"]
        assert KINDS[kind] == "in place" and got != data, answer.text
    else:
        assert answer.status_code == 200, answer.text
        assert answer.headers["upload-offset"] == str(len(data))
    # replace(): the user's file in `other` and the document's; update(): shared.
    await settled(asyncassets_db, name, files=2 if write == "replace" else 1 + (got == data))


# -- 5. expiry after a finish killed after its switch, the client gone ---------------------


@worlds("gridfs", "filesystem", "s3", "gzip", slow=("s3",))
async def test_the_sweep_of_an_expired_upload_killed_after_its_switch_keeps_the_file(
    asyncassets_db, world
):
    """Killed after the switch; the client never comes back. The session expires and
    the sweep removes it: the document's file (and its key, on a directory or S3)
    stays, byte-exact; a retry then is 404; a later replace() works and leaves
    nothing behind."""
    cls, doc, name = world
    data = os.urandom(100_000)
    async with client(app_for(cls, lease=LEASE)) as http:
        location = await upload_all_but_the_tail(http, doc, data)
        await last_patch_killed(http, location, data, "done")
    await settled(asyncassets_db, name, files=1)
    await holds(cls, doc, data)
    async with fresh(cls) as http:
        assert (await patch(http, location, len(data), b"")).status_code == 404
    await (await cls.objects(pk=doc.pk).first()).file.replace(b"later")
    await holds(cls, doc, b"later")
    await settled(asyncassets_db, name, files=1)


# -- 1'. two retries on two server processes racing a user write, real SIGKILL --------------


@pytest.mark.parametrize("finish_world", [
    "gridfs", pytest.param("filesystem", marks=pytest.mark.slow)], indirect=True)
@pytest.mark.parametrize("die_at,write", [
    ("done", "update"), ("done", "replace"), ("switch", "replace"),
    pytest.param("switch", "modify", marks=pytest.mark.slow),
    pytest.param("done", "save", marks=pytest.mark.slow),
])
async def test_two_retries_on_two_servers_race_a_user_write_after_a_kill(
    finish_world, die_at, write  # noqa: F811 (the fixture imported)
):
    """The server SIGKILLs itself at ``die_at``; then two clients retry at once on two
    other server processes (one the last PATCH, one HEAD) while the user writes the
    field (through the library, or bypassing it). One upload is attached at most;
    whatever the order, the user's write is never undone by a retry; both retries
    end complete (204 / 200, full offset)."""
    from test_tus_faults import (
        last_patch_killing_the_server,
        nothing_left,
        on,
        retry_last_patch,
        tus_create,
    )

    from asyncassets.errors import FileConflict

    kind, cls, serve, db, root = finish_world
    doc = cls()
    await doc.save()
    await doc.file.put(b"the first file")
    other = cls()
    await other.file.put(b"the user's file")
    await other.save()
    data = os.urandom(300_000)
    async with httpx.AsyncClient(timeout=30) as http:
        dying = serve(die_at=die_at)
        location = await tus_create(http, dying, doc, len(data))
        b, c = serve(), serve()  # started before the kill: the race is not their startup
        await last_patch_killing_the_server(http, dying, location, data)

        async def head() -> Any:
            for _ in range(60):
                answer = await http.head(on(c, location), headers={"Tus-Resumable": "1.0.0"})
                if answer.status_code not in (409, 503):
                    return answer
                await asyncio.sleep(0.25)
            return answer

        async def user() -> str:
            mine = await cls.objects(pk=doc.pk).first()
            try:
                if write == "replace":
                    await mine.file.replace(b"the user's file")
                elif write == "save":
                    mine.file = b"the user's file"
                    await mine.save()
                elif write == "update":
                    await cls.objects(pk=doc.pk).update(set__file=other.file.grid_id)
                else:
                    await cls.objects(pk=doc.pk).modify(set__file=other.file.grid_id)
            except FileConflict:
                return "refused"
            return "applied"

        patched, headed, outcome = await asyncio.gather(
            retry_last_patch(http, on(b, location), len(data)), head(), user())
    got = await (await cls.objects(pk=doc.pk).first()).file.read()
    if outcome == "refused":
        assert got == data
    elif die_at == "done" or write in ("replace", "save"):
        # After the switch every write lands on top of the upload: it stands. A
        # replace()/save() applied before the retried switch makes the switch refused.
        assert got == b"the user's file"
    else:
        assert got in (data, b"the user's file")
    for answer, complete in ((patched, 204), (headed, 200)):
        if answer.status_code == 404:
            # A switch refused by the racing write dropped the upload (in place).
            assert got == b"the user's file", answer.text
        else:
            assert answer.status_code == complete, answer.text
            assert answer.headers["upload-offset"] == str(len(data))
    await nothing_left(kind, db, root,
                       files=2 if write in ("replace", "save") else 1 + (got == data))
