"""Races on GridFS: file operations that run at the same time, checked against a model.

The scheduler and the model are in tests/_races_core.py (shared with the other
storages' race suites, tests/test_races_storages.py); its docstring says what runs
and which invariants are checked after every batch. Here they run on the default
storage, a GridFS bucket with tiny chunks (every file of a few hundred bytes has
several), where a files document is complete when its chunks add up to its length.
``pytest -n 0 -s`` prints the counts; ``RACES_SEED`` replays one plan; ``RACES_REPORT``
names a file that gets every violation in full.
"""

from __future__ import annotations

import asyncio
import gc
import os
import time
from collections import Counter
from typing import Any

import pytest
from _consistency import snapshot_bucket
from _races_core import (
    Faults,
    Layout,
    Races,
    print_counts,
    races_db,
    seeds_from_env,
    write_report,
)

import asyncassets
from asyncassets import Document, EmbeddedDocument
from asyncassets.errors import FileConflict, GridFSError, UploadClosed
from asyncassets.fields import EmbeddedDocumentField, FileField, IntField, ListField, StringField

ALIAS = "races"
BUCKET = "racefs"
COLLECTION = "race_docs"
CHUNK = 64  # tiny chunks: every file of a few hundred bytes has several
GRACE = 0.2  # the short grace of the sweeps that race uploads


class RacePage(EmbeddedDocument):
    label = StringField()
    image = FileField(collection_name=BUCKET, chunk_size=CHUNK)


class RaceDoc(Document):
    meta = {"collection": COLLECTION, "db_alias": ALIAS}
    name = StringField()
    n = IntField(default=0)
    f = FileField(collection_name=BUCKET, chunk_size=CHUNK)
    files = ListField(FileField(collection_name=BUCKET, chunk_size=CHUNK))
    pages = ListField(EmbeddedDocumentField(RacePage))


GRIDFS = Layout(
    name="gridfs",
    doc=RaceDoc,
    page=RacePage,
    alias=ALIAS,
    collection=COLLECTION,
    bucket=BUCKET,
    snapshot=lambda db, final=False: snapshot_bucket(db, BUCKET),
    chunk=CHUNK,
    grace=GRACE,
    check_all=False,
)


# -- the tests --------------------------------------------------------------------------


async def _run_races(
    uri: str, monkeypatch: pytest.MonkeyPatch, seeds: list[int], operations: int
) -> None:
    faults = Faults(COLLECTION)
    faults.install(monkeypatch)
    total: Counter[str] = Counter()
    violations: list[str] = []
    kinds: Counter[str] = Counter()
    started = time.monotonic()
    seeds = seeds_from_env(seeds)
    for seed in seeds:
        async with races_db(uri, ALIAS):
            races = Races(GRIDFS, seed, operations, faults)
            await races.run()
        total.update(races.stats)
        violations += races.violations
        kinds.update(races.violation_kinds)
    total["runs"] = len(seeds)
    total["invariant violations"] = len(violations)
    print_counts(f"races, seeds {seeds}", time.monotonic() - started, total, kinds)
    write_report(violations)
    assert not violations, (
        f"{len(violations)} invariant violations in {total['operations']} operations "
        f"({dict(kinds)}); the first ones:\n\n" + "\n\n".join(violations[:5])
    )
    assert total["injected faults"] > 0, "no fault was injected: the wrappers missed every write"
    assert total["concurrent batches"] > 0


async def test_racing_operations_keep_every_invariant(
    asyncassets_server_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A few hundred racing operations, every invariant checked after every batch."""
    await _run_races(asyncassets_server_uri, monkeypatch, seeds=[1], operations=300)


@pytest.mark.slow
async def test_racing_operations_keep_every_invariant_long(
    asyncassets_server_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At least 10,000 racing operations over four seeds."""
    await _run_races(asyncassets_server_uri, monkeypatch, seeds=[11, 12, 13, 14], operations=2500)


# -- what the machine found, one race at a time ------------------------------------------
#
# Deterministic reproductions of the violations the racing runs reported, so that each
# fails on its own, with its own name, whatever the random plan does.


@pytest.fixture
async def races(asyncassets_server_uri: str):
    async with races_db(asyncassets_server_uri, ALIAS) as db:
        yield db


async def test_sweep_with_short_grace_keeps_chunks_of_an_upload_that_paused_far_less(
    races: Any,
) -> None:
    """A chunk written 50 ms ago is younger than a grace of 200 ms, however the sweep
    dates it (a chunk's ObjectId only knows the second it was made in)."""
    doc = await RaceDoc(name="paused upload").save()
    data = os.urandom(5 * CHUNK)
    # Write in the second half of a wall-clock second: the chunk's ObjectId then says
    # it is at least 0.5 s old, while it is only milliseconds old.
    await asyncio.sleep(1.5 - time.time() % 1)
    await doc.f.new_file()
    await doc.f.write(data[: 4 * CHUNK])  # awaited: these chunks are in the server now
    await asyncio.sleep(0.05)
    report = await asyncassets.sweep_orphans(grace=GRACE, buckets=BUCKET, alias=ALIAS)
    assert report.chunks_deleted == 0, (
        f"the sweep (grace {GRACE} s) removed {report.chunks_deleted} chunks of an upload "
        "that paused 50 ms"
    )
    await doc.f.write(data[4 * CHUNK :])
    await doc.f.close()
    assert await (await RaceDoc.objects.get(pk=doc.pk)).f.read() == data


async def test_a_block_whose_upload_another_task_aborted_does_not_end_as_if_stored(
    races: Any,
) -> None:
    """``async with proxy.new_file()`` ends normally only if its file was stored."""
    doc = await RaceDoc(name="aborted under the writer").save()
    opened = asyncio.Event()

    async def writer() -> None:
        async with doc.f.new_file():
            await doc.f.write(b"written by the block")
            opened.set()
            await asyncio.sleep(0.05)  # meanwhile another task aborts the upload

    task = asyncio.ensure_future(writer())
    await opened.wait()
    await doc.f.abort()
    try:
        await task
    except (UploadClosed, GridFSError):
        return  # told: the upload it wrote was aborted
    stored = await RaceDoc.objects.get(pk=doc.pk)
    assert await stored.f.read() == b"written by the block", (
        "the block ended normally, yet the document holds no file: its upload was "
        "aborted by another task and the writer was told nothing"
    )


async def test_a_writer_whose_upload_was_aborted_never_writes_into_the_next_upload(
    races: Any,
) -> None:
    """Task A's upload is aborted and task C opens another on the same field: A's next
    write must fail, not land in C's file."""
    doc = await RaceDoc(name="two uploads").save()
    a_open, c_open, a_done = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def a() -> None:
        await doc.f.new_file()
        await doc.f.write(b"A1-")
        a_open.set()
        await c_open.wait()
        try:
            await doc.f.write(b"A2-")
        finally:
            a_done.set()

    async def c() -> None:
        await a_open.wait()
        await doc.f.abort()  # aborts A's upload
        await doc.f.new_file()
        await doc.f.write(b"C1-")
        c_open.set()
        await a_done.wait()
        await doc.f.write(b"C2")
        await doc.f.close()

    results = await asyncio.gather(a(), c(), return_exceptions=True)
    stored = await (await RaceDoc.objects.get(pk=doc.pk)).f.read()
    assert stored in (None, b"C1-C2"), (
        f"the stored file reads {stored!r}: bytes of an aborted upload went into another "
        f"(A -> {results[0]!r}, C -> {results[1]!r})"
    )
    assert isinstance(results[0], UploadClosed), f"A's write after its abort: {results[0]!r}"


async def test_replace_after_reload_of_a_document_with_embedded_files_deletes_the_old_file(
    races: Any,
) -> None:
    doc = RaceDoc(name="reloaded", pages=[RacePage(label="p0")])
    await doc.pages[0].image.put(b"old")
    await doc.save()
    old = doc.pages[0].image.file_id
    # Whether a garbage proxy made by reload() is still around when replace() asks who
    # else holds the file depends on when the cyclic GC last ran: hold it off, so the
    # outcome does not depend on the allocation count.
    gc.disable()
    try:
        await doc.reload()
        await doc.pages[0].image.replace(b"new")
    finally:
        gc.enable()
    left = await races[f"{BUCKET}.files"].count_documents({"_id": old})
    assert left == 0, (
        "replace() after reload() kept the old file: nothing references it (a leak the "
        "sweep has to clean up)"
    )


async def test_two_writers_filling_the_same_empty_embedded_slot_one_gets_file_conflict(
    races: Any,
) -> None:
    """Two loaded copies put into the same empty ``pages.0.image``: one wins, the other
    gets FileConflict and leaves nothing behind."""
    doc = await RaceDoc(
        name="empty slot", pages=[RacePage(label="p0"), RacePage(label="p1")]
    ).save()
    a = await RaceDoc.objects.get(pk=doc.pk)
    b = await RaceDoc.objects.get(pk=doc.pk)
    await a.pages[0].image.put(b"from A")
    with pytest.raises(FileConflict):
        await b.pages[0].image.put(b"from B")
    stored = await RaceDoc.objects.get(pk=doc.pk)
    assert await stored.pages[0].image.read() == b"from A"
    assert await races[f"{BUCKET}.files"].count_documents({}) == 1, "a file was left behind"
