"""FileSystemBlobs on real directories: atomic writes, ranged reads, listing, failures.

A full disk is simulated with ``RLIMIT_FSIZE`` in a subprocess (writes past the
limit fail with ``EFBIG``, treated like ``ENOSPC``); a read-only directory with
``chmod 0o555``, in a subprocess that drops root's privileges first when the
tests run as root (root ignores the mode bits).
"""

from __future__ import annotations

import asyncio
import datetime
import errno
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from asyncassets.errors import KeyTaken, StorageError, StoredObjectChanged, StoredObjectMissing
from asyncassets.storage.objects import filesystem
from asyncassets.storage.objects.blobs import BlobInfo, Blobs, BlobWriter
from asyncassets.storage.objects.filesystem import FileSystemBlobs
from asyncassets.storage.retry import Retry

BUFFER = 64
PIECE = 50


def payload(size: int, seed: int = 0) -> bytes:
    return bytes((i * 31 + seed) % 251 for i in range(size))


def files_under(root: Path) -> list[str]:
    """Every file under ``root`` (temp files included), relative, sorted."""
    if not root.exists():
        return []
    return sorted(
        os.path.relpath(os.path.join(directory, name), root)
        for directory, _, names in os.walk(root)
        for name in names
    )


def is_empty_directory(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def temps_under(root: Path) -> list[str]:
    return [path for path in files_under(root) if path.endswith(".part")]


async def read_all(blobs: FileSystemBlobs, key: str, start: int = 0, end: int = 1 << 40) -> bytes:
    return b"".join([piece async for piece in blobs.open_reader(key, start, end)])


async def store(blobs: FileSystemBlobs, key: str, data: bytes, *, overwrite: bool = False) -> None:
    writer = blobs.open_writer(key)
    await writer.write(data)
    await writer.commit(overwrite=overwrite)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "media"


@pytest.fixture
def blobs(root: Path) -> FileSystemBlobs:
    return FileSystemBlobs(root, write_buffer=BUFFER, piece_size=PIECE)


def test_url_is_the_absolute_root_and_nothing_is_made_before_a_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    blobs = FileSystemBlobs("relative/media")
    assert blobs.url == (tmp_path / "relative" / "media").as_uri()
    assert isinstance(blobs, Blobs)
    writer = blobs.open_writer("a/b.bin")
    assert isinstance(writer, BlobWriter)
    assert not (tmp_path / "relative").exists()


@pytest.mark.parametrize("size", [0, 1, BUFFER - 1, BUFFER, BUFFER + 1, 3 * BUFFER, 5 * BUFFER + 7])
@pytest.mark.parametrize("write_size", [1, 7, BUFFER, 1000])
async def test_round_trip_is_byte_exact_at_buffer_boundaries(
    blobs: FileSystemBlobs, root: Path, size: int, write_size: int
) -> None:
    data = payload(size, seed=write_size)
    writer = blobs.open_writer("2024/05/object.bin")
    for offset in range(0, size, write_size):
        await writer.write(data[offset : offset + write_size])
    await writer.commit()
    assert await read_all(blobs, "2024/05/object.bin") == data
    assert (root / "2024" / "05" / "object.bin").read_bytes() == data
    assert files_under(root) == [os.path.join("2024", "05", "object.bin")]


@pytest.mark.parametrize("size", [1024 * 1024 - 1, 1024 * 1024, 1024 * 1024 + 1, 3 * 1024 * 1024])
async def test_round_trip_with_the_default_buffer(root: Path, size: int) -> None:
    blobs = FileSystemBlobs(root)
    data = os.urandom(size)
    writer = blobs.open_writer("big.bin")
    await writer.write(data[:1000])
    await writer.write(memoryview(data)[1000:])
    await writer.commit()
    assert await read_all(blobs, "big.bin") == data
    pieces = [piece async for piece in blobs.open_reader("big.bin", 0, size)]
    assert max(map(len, pieces)) <= 1024 * 1024


async def test_writes_reach_the_disk_once_per_buffer_not_once_per_write(
    blobs: FileSystemBlobs, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[list[int]] = []
    pwrite_all = filesystem._pwrite_all

    def counting(fd: int, pieces: list[memoryview], position: int) -> int:
        calls.append([len(piece) for piece in pieces])
        return pwrite_all(fd, pieces, position)

    monkeypatch.setattr(filesystem, "_pwrite_all", counting)
    monkeypatch.setattr(filesystem, "_REFERENCE_AT", 16)
    writer = blobs.open_writer("counted.bin")
    for _ in range(10 * BUFFER):
        await writer.write(b"x")
    await writer.commit()
    assert calls == [[BUFFER]] * 10 + [[]]
    # Large bytes are referenced, not copied; small or mutable pieces are gathered.
    calls.clear()
    writer = blobs.open_writer("large.bin")
    await writer.write(b"a" * 10)
    await writer.write(b"b" * 20)
    await writer.write(bytearray(b"c" * 20))
    await writer.write(b"d" * (5 * BUFFER))
    await writer.write(b"e" * 20)
    await writer.commit()
    assert calls == [[10, 20, 20, 5 * BUFFER], [20]]
    expected = b"a" * 10 + b"b" * 20 + b"c" * 20 + b"d" * (5 * BUFFER) + b"e" * 20
    assert await read_all(blobs, "large.bin") == expected


async def test_short_gathered_writes_resume_inside_a_piece(
    blobs: FileSystemBlobs, monkeypatch: pytest.MonkeyPatch
) -> None:
    pwritev = os.pwritev

    def short_pwritev(fd: int, buffers: list[memoryview], offset: int) -> int:
        return pwritev(fd, [memoryview(b"".join(buffers))[:7]], offset)

    monkeypatch.setattr(os, "pwritev", short_pwritev)
    monkeypatch.setattr(filesystem, "_IOV_MAX", 3)
    data = payload(3 * BUFFER + 5)
    writer = blobs.open_writer("short-writes.bin")
    for offset in range(0, len(data), 20):
        await writer.write(bytes(data[offset : offset + 20]))
    await writer.commit()
    assert await read_all(blobs, "short-writes.bin") == data


async def test_ranged_reads_return_exactly_the_range(blobs: FileSystemBlobs) -> None:
    data = payload(4 * PIECE + 3)
    await store(blobs, "ranged.bin", data)
    size = len(data)
    for start, end in [
        (0, 0),
        (10, 10),
        (size, size),
        (size - 1, size),
        (0, 1),
        (3, 3 * PIECE + 1),
    ]:
        assert await read_all(blobs, "ranged.bin", start, end) == data[start:end]
    pieces = [piece async for piece in blobs.open_reader("ranged.bin", 1, size)]
    assert [len(piece) for piece in pieces] == [PIECE] * 4 + [2]


async def test_a_file_shorter_than_the_range_stops_early(blobs: FileSystemBlobs) -> None:
    await store(blobs, "short.bin", b"0123456789")
    assert await read_all(blobs, "short.bin", 4, 100) == b"456789"
    assert await read_all(blobs, "short.bin", 50, 100) == b""


async def test_bad_ranges_are_refused(blobs: FileSystemBlobs) -> None:
    await store(blobs, "r.bin", b"abc")
    with pytest.raises(ValueError, match="bad byte range"):
        await read_all(blobs, "r.bin", 2, 1)
    with pytest.raises(ValueError, match="bad byte range"):
        await read_all(blobs, "r.bin", -1, 1)


async def test_a_missing_key_raises_on_read_and_is_none_or_false_elsewhere(
    blobs: FileSystemBlobs,
) -> None:
    with pytest.raises(StoredObjectMissing, match=r"no stored object under the key 'nope/x\.bin'"):
        await read_all(blobs, "nope/x.bin", 0, 0)
    assert await blobs.stat("nope/x.bin") is None
    assert await blobs.delete("nope/x.bin") is False
    # A directory, or a path through a file, is no object either.
    await store(blobs, "dir/file.bin", b"data")
    with pytest.raises(StoredObjectMissing):
        await read_all(blobs, "dir")
    with pytest.raises(StoredObjectMissing):
        await read_all(blobs, "dir/file.bin/inner")
    assert await blobs.stat("dir") is None
    assert await blobs.delete("dir") is False
    assert await blobs.stat("dir/file.bin/inner") is None


async def test_stat_gives_the_size_and_an_aware_utc_time(blobs: FileSystemBlobs) -> None:
    before = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=2)
    await store(blobs, "a/b.bin", b"12345")
    info = await blobs.stat("a/b.bin")
    assert info is not None
    assert (info.key, info.size) == ("a/b.bin", 5)
    assert info.modified.tzinfo is not None and info.modified.utcoffset() == datetime.timedelta(0)
    assert before < info.modified < before + datetime.timedelta(minutes=1)


async def test_overwrite_false_keeps_the_old_bytes_and_leaves_no_temp(
    blobs: FileSystemBlobs, root: Path
) -> None:
    await store(blobs, "k.bin", b"old")
    writer = blobs.open_writer("k.bin")
    await writer.write(payload(3 * BUFFER))
    with pytest.raises(KeyTaken, match=r"already exists under the key 'k\.bin'") as caught:
        await writer.commit()
    assert caught.value.key == "k.bin" and caught.value.storage == blobs.url
    assert await read_all(blobs, "k.bin") == b"old"
    assert files_under(root) == ["k.bin"]
    await writer.abort()  # still allowed, and nothing to do
    with pytest.raises(ValueError, match="open a new writer"):
        await writer.write(b"more")


async def test_overwrite_true_replaces_atomically(blobs: FileSystemBlobs, root: Path) -> None:
    await store(blobs, "k.bin", b"old bytes")
    reader = blobs.open_reader("k.bin", 0, 100)
    first = await reader.__anext__()  # opened before the replacement
    new = payload(2 * BUFFER + 1)
    await store(blobs, "k.bin", new, overwrite=True)
    assert first == b"old bytes"  # a reader holds the old file, never a mix
    await reader.aclose()
    assert await read_all(blobs, "k.bin") == new
    assert files_under(root) == ["k.bin"]


async def test_an_empty_object_is_stored(blobs: FileSystemBlobs, root: Path) -> None:
    writer = blobs.open_writer("empty")
    await writer.commit()
    assert (root / "empty").read_bytes() == b""
    assert await blobs.stat("empty") == BlobInfo(
        "empty",
        0,
        (await blobs.stat("empty")).modified,  # type: ignore[union-attr]
        writer.version,
    )


async def test_abort_removes_the_temp_file_and_is_idempotent(
    blobs: FileSystemBlobs, root: Path
) -> None:
    writer = blobs.open_writer("a/b/aborted.bin")
    await writer.abort()  # before any write: nothing to remove
    writer = blobs.open_writer("a/b/aborted.bin")
    await writer.write(payload(2 * BUFFER + 5))
    assert len(temps_under(root)) == 1
    await writer.abort()
    await writer.abort()
    assert files_under(root) == []
    assert not (root / "a").exists()  # the directories it made, once empty, go too
    with pytest.raises(ValueError, match="aborted"):
        await writer.commit()


async def test_abort_after_commit_keeps_the_object(blobs: FileSystemBlobs, root: Path) -> None:
    writer = blobs.open_writer("kept.bin")
    await writer.write(b"kept")
    await writer.commit()
    await writer.abort()
    assert (root / "kept.bin").read_bytes() == b"kept"


class Gate:
    """Holds an ``os`` function in its worker thread until released."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        original = getattr(os, name)

        def gated(*args: object, **kwargs: object) -> object:
            self.entered.set()
            assert self.release.wait(10)
            return original(*args, **kwargs)

        monkeypatch.setattr(os, name, gated)

    async def wait_entered(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, 10)


async def test_a_write_cancelled_in_its_thread_leaves_no_temp(
    blobs: FileSystemBlobs, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = blobs.open_writer("x/cancelled.bin")
    await writer.write(b"first")
    gate = Gate(monkeypatch, "pwrite")  # "first" and the new piece, copied together
    task = asyncio.create_task(writer.write(payload(3 * BUFFER)))
    await gate.wait_entered()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The thread still holds the descriptor: abort waits for it, then removes.
    aborting = asyncio.create_task(writer.abort())
    await asyncio.sleep(0.05)
    assert not aborting.done()
    gate.release.set()
    await aborting
    assert files_under(root) == []
    with pytest.raises(ValueError, match="failed"):
        await writer.write(b"more")


async def test_an_abort_whose_caller_is_cancelled_still_removes_the_temp(
    blobs: FileSystemBlobs, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = blobs.open_writer("cancelled-abort.bin")
    gate = Gate(monkeypatch, "pwrite")
    writing = asyncio.create_task(writer.write(payload(2 * BUFFER)))
    await gate.wait_entered()
    writing.cancel()
    aborting = asyncio.create_task(writer.abort())
    await asyncio.sleep(0.01)
    aborting.cancel()
    gate.release.set()
    with pytest.raises(asyncio.CancelledError):
        await aborting
    await writer.abort()  # the same cleanup, already done or finishing
    assert files_under(root) == []
    assert writing.cancelled()


async def test_a_commit_cancelled_before_the_file_is_in_place_leaves_nothing(
    blobs: FileSystemBlobs, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = blobs.open_writer("c/commit.bin")
    await writer.write(payload(BUFFER + 3))
    gate = Gate(monkeypatch, "fsync")
    committing = asyncio.create_task(writer.commit())
    await gate.wait_entered()
    committing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await committing
    gate.release.set()
    await writer.abort()
    assert files_under(root) == []


async def test_a_commit_cancelled_once_the_file_is_linked_is_undone_by_abort(
    blobs: FileSystemBlobs, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A commit that did not return is not a commit: abort() removes the object it
    # put in place (it is provably this writer's: of its version), and nothing else.
    writer = blobs.open_writer("linked.bin")
    await writer.write(b"linked")
    gate = Gate(monkeypatch, "unlink")  # the temp name is removed after the link
    committing = asyncio.create_task(writer.commit())
    await gate.wait_entered()
    committing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await committing
    gate.release.set()
    await writer.abort()  # waits for the thread, sees the object in place, removes it
    assert files_under(root) == []


async def test_abort_after_a_cancelled_commit_leaves_an_object_of_another_version(
    blobs: FileSystemBlobs, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = blobs.open_writer("linked.bin")
    await writer.write(b"linked")
    gate = Gate(monkeypatch, "unlink")
    committing = asyncio.create_task(writer.commit())
    await gate.wait_entered()
    committing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await committing
    # Meanwhile another tool replaces the file under the key.
    other = root / "other.tmp"
    other.write_bytes(b"someone else's")
    os.rename(other, root / "linked.bin")
    gate.release.set()
    await writer.abort()
    assert (root / "linked.bin").read_bytes() == b"someone else's"


async def test_concurrent_writers_of_one_key_exactly_one_wins(
    blobs: FileSystemBlobs, root: Path
) -> None:
    datas = [payload(3 * BUFFER + n, seed=n) for n in range(8)]
    writers = [blobs.open_writer("race/same.bin") for _ in datas]
    for writer, data in zip(writers, datas, strict=True):
        await writer.write(data)
    outcomes = await asyncio.gather(*(w.commit() for w in writers), return_exceptions=True)
    winners = [i for i, outcome in enumerate(outcomes) if outcome is None]
    assert len(winners) == 1
    assert all(isinstance(o, KeyTaken) for i, o in enumerate(outcomes) if i != winners[0])
    assert await read_all(blobs, "race/same.bin") == datas[winners[0]]
    assert files_under(root) == [os.path.join("race", "same.bin")]


async def test_without_hard_links_the_key_is_reserved_then_renamed_over(
    blobs: FileSystemBlobs, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_links(src: str, dst: str, **kwargs: object) -> None:
        raise OSError(errno.EPERM, os.strerror(errno.EPERM), src, None, dst)

    monkeypatch.setattr(os, "link", no_links)
    await store(blobs, "nolink/a.bin", b"first")
    assert blobs._hard_links is False
    assert await read_all(blobs, "nolink/a.bin") == b"first"
    with pytest.raises(KeyTaken):
        await store(blobs, "nolink/a.bin", b"second")
    assert await read_all(blobs, "nolink/a.bin") == b"first"
    assert files_under(root) == [os.path.join("nolink", "a.bin")]


@pytest.mark.parametrize(
    ("key", "problem"),
    [
        ("", "empty"),
        ("/etc/passwd", "absolute"),
        ("a/../../etc/passwd", "'..' segment"),
        ("..", "'..' segment"),
        ("a/./b", "'.' segment"),
        ("a\\b", "backslash"),
        ("a\0b", "NUL"),
        ("a//b", "empty segment"),
        ("a/", "empty segment"),
        ("a/.b.jpg.0123456789abcdef.part", "temp file"),
    ],
)
async def test_bad_keys_are_refused(blobs: FileSystemBlobs, key: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        blobs.open_writer(key)
    with pytest.raises(ValueError, match=problem):
        await read_all(blobs, key, 0, 1)
    with pytest.raises(ValueError, match=problem):
        await blobs.stat(key)
    with pytest.raises(ValueError, match=problem):
        await blobs.delete(key)


async def test_list_gives_every_object_and_skips_temps_and_symlinks(
    blobs: FileSystemBlobs, root: Path
) -> None:
    assert [info async for info in blobs.list()] == []  # no root yet
    await store(blobs, "top.bin", b"1")
    await store(blobs, "2024/05/a.bin", b"22")
    await store(blobs, "2024/06/b.bin", b"333")
    pending = blobs.open_writer("2024/05/pending.bin")
    await pending.write(payload(2 * BUFFER))
    (root / "link.bin").symlink_to(root / "top.bin")
    (root / "2024" / "empty").mkdir()
    listed = sorted([(info.key, info.size) async for info in blobs.list()])
    assert listed == [("2024/05/a.bin", 2), ("2024/06/b.bin", 3), ("top.bin", 1)]
    await pending.abort()


async def test_list_walks_many_files_in_batches(
    blobs: FileSystemBlobs, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(filesystem, "_LIST_BATCH", 100)
    expected = set()
    for d in range(5):
        (root / f"d{d}").mkdir(parents=True)
        for n in range(110):
            (root / f"d{d}" / f"{n}.bin").write_bytes(b"x")
            expected.add(f"d{d}/{n}.bin")
    batches = []
    walker = filesystem._Walker(blobs, temps=False)
    while batch := walker.next_batch():
        batches.append(len(batch))
    assert max(batches) == 100 and sum(batches) == 550
    assert {info.key async for info in blobs.list()} == expected
    # Stopping early closes the directory being read.
    listing = blobs.list()
    await listing.__anext__()
    await listing.aclose()


async def test_delete_prunes_empty_directories_but_not_filled_ones_nor_the_root(
    blobs: FileSystemBlobs, root: Path
) -> None:
    await store(blobs, "a/b/c/one.bin", b"1")
    await store(blobs, "a/two.bin", b"2")
    assert await blobs.delete("a/b/c/one.bin") is True
    assert not (root / "a" / "b").exists()
    assert (root / "a" / "two.bin").exists()
    assert await blobs.delete("a/two.bin") is True
    assert is_empty_directory(root)  # the root stays
    # A directory holding another writer's temp file stays, and that writer commits.
    await store(blobs, "x/y/first.bin", b"first")
    writer = blobs.open_writer("x/y/second.bin")
    await writer.write(payload(BUFFER))
    assert await blobs.delete("x/y/first.bin") is True
    assert (root / "x" / "y").is_dir()
    await writer.commit()
    assert await read_all(blobs, "x/y/second.bin") == payload(BUFFER)


@pytest.mark.parametrize("depth", [1, 2])
async def test_a_writer_remakes_a_directory_pruned_under_it(
    blobs: FileSystemBlobs, root: Path, monkeypatch: pytest.MonkeyPatch, depth: int
) -> None:
    # Issue #19, case 5: a delete's pruning slips in right after the writer made a
    # directory (before it could open it, or before it made the next one in it):
    # the writer walks again instead of failing with ENOENT.
    mkdir = os.mkdir
    pruned: list[str] = []

    def mkdir_then_pruned(name: str, mode: int = 0o777, *, dir_fd: int | None = None) -> None:
        mkdir(name, mode, dir_fd=dir_fd)
        if len(pruned) < depth:
            pruned.append(name)
            os.rmdir(name, dir_fd=dir_fd)

    monkeypatch.setattr(os, "mkdir", mkdir_then_pruned)
    await store(blobs, "p/r/q.bin", b"q")
    assert pruned and await read_all(blobs, "p/r/q.bin") == b"q"


async def test_stale_temps_are_listed_and_deleted(blobs: FileSystemBlobs, root: Path) -> None:
    await store(blobs, "s/kept.bin", b"kept")
    dead = blobs.open_writer("s/dead.bin")
    await dead.write(payload(BUFFER))  # a writer that will never finish
    live = blobs.open_writer("s/live.bin")
    await live.write(payload(BUFFER))
    dead_temp = root / temps_under(root)[0]
    if "dead" not in dead_temp.name:
        dead_temp = root / temps_under(root)[1]
    old = datetime.datetime.now().timestamp() - 3600
    os.utime(dead_temp, (old, old))
    cutoff = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=5)
    stale = [info async for info in blobs.list_stale_temps(cutoff)]
    assert [info.key for info in stale] == [f"s/{dead_temp.name}"]
    assert await blobs.delete_temp(stale[0].key) is True
    assert await blobs.delete_temp(stale[0].key) is False
    assert not dead_temp.exists()
    with pytest.raises(ValueError, match="not the path of a writer's temp file"):
        await blobs.delete_temp("s/kept.bin")
    with pytest.raises(ValueError, match="not the path of a writer's temp file"):
        await blobs.delete_temp(f"../s/{dead_temp.name}")
    with pytest.raises(ValueError, match="timezone-aware"):
        [info async for info in blobs.list_stale_temps(datetime.datetime.now())]
    await live.commit()
    assert (root / "s" / "kept.bin").read_bytes() == b"kept"
    await dead.abort()


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
async def test_readers_close_their_file_when_closed_early_or_cancelled(
    blobs: FileSystemBlobs, monkeypatch: pytest.MonkeyPatch
) -> None:
    await store(blobs, "r.bin", payload(10 * PIECE))
    before = open_descriptors()
    reader = blobs.open_reader("r.bin", 0, 10 * PIECE)
    await reader.__anext__()
    assert open_descriptors() == before + 1
    await reader.aclose()
    assert open_descriptors() == before

    gate = Gate(monkeypatch, "pread")

    async def consume() -> None:
        async for _ in blobs.open_reader("r.bin", 0, 10 * PIECE):
            pass

    task = asyncio.create_task(consume())
    await gate.wait_entered()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert open_descriptors() == before + 1  # the thread still reads from it
    gate.release.set()
    for _ in range(100):
        await asyncio.sleep(0.01)
        if open_descriptors() == before:
            break
    assert open_descriptors() == before


async def test_a_root_that_is_a_file_is_a_clear_error(tmp_path: Path) -> None:
    root = tmp_path / "media"
    root.write_bytes(b"not a directory")
    blobs = FileSystemBlobs(root)
    for key in ("top.bin", "a/b.bin"):
        writer = blobs.open_writer(key)
        with pytest.raises(StorageError, match="is not a directory: move that file away") as caught:
            await writer.write(b"x" * (2 << 20))
        assert str(root) in str(caught.value)
        await writer.abort()
    with pytest.raises(StorageError, match="is not a directory"):
        await read_all(blobs, "a/b.bin")
    with pytest.raises(StorageError, match="is not a directory"):
        [info async for info in blobs.list()]
    assert root.read_bytes() == b"not a directory"


async def test_a_file_where_a_key_needs_a_directory_is_a_clear_error(
    blobs: FileSystemBlobs, root: Path
) -> None:
    await store(blobs, "a", b"a file")
    writer = blobs.open_writer("a/b.bin")
    await writer.write(b"data")
    with pytest.raises(StorageError, match="a file stands where the key needs a directory"):
        await writer.commit()
    assert files_under(root) == ["a"]


def run_script(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


FULL_DISK = """
    import asyncio, resource, sys
    from asyncassets.errors import StorageError
    from asyncassets.storage.objects.filesystem import FileSystemBlobs

    async def main():
        blobs = FileSystemBlobs(sys.argv[1], write_buffer=16 * 1024)
        writer = blobs.open_writer("2024/05/big.bin")
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
        try:
            for _ in range(64):
                await writer.write(b"x" * 16 * 1024)
            await writer.commit()
        except StorageError as error:
            print(error)
        else:
            print("NO ERROR")

    asyncio.run(main())
"""


def test_a_full_disk_is_a_clear_error_and_leaves_nothing(root: Path) -> None:
    root.mkdir()
    (root / "old.bin").write_bytes(b"old")
    done = run_script(FULL_DISK, str(root))
    assert done.returncode == 0, done.stderr
    message = done.stdout
    assert "EFBIG" in message and "free space on the filesystem holding" in message, message
    assert str(root) in message and "'2024/05/big.bin'" in message
    assert files_under(root) == ["old.bin"]


READ_ONLY = """
    import asyncio, os, sys
    import concurrent.futures.thread  # imported lazily, maybe from a path only root reads
    from asyncassets.errors import StorageError
    from asyncassets.storage.objects.filesystem import FileSystemBlobs

    if os.geteuid() == 0:  # root ignores mode bits: become nobody
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)

    async def main():
        blobs = FileSystemBlobs(sys.argv[1])
        for key in ("new.bin", "a/b/new.bin"):
            writer = blobs.open_writer(key)
            try:
                await writer.write(b"data")
                await writer.commit()
            except StorageError as error:
                print(error)
            else:
                print("NO ERROR")
        print(b"".join([piece async for piece in blobs.open_reader("old.bin", 0, 10)]).decode())

    asyncio.run(main())
"""


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A directory another user can reach (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="asyncassets-ro-"))
    path.chmod(0o755)
    yield path
    for directory, _, _ in os.walk(path):
        os.chmod(directory, 0o755)
    shutil.rmtree(path)


def test_a_read_only_directory_is_a_clear_error_and_leaves_nothing(shared_tmp: Path) -> None:
    root = shared_tmp / "media"
    root.mkdir()
    (root / "old.bin").write_bytes(b"old")
    (root / "old.bin").chmod(0o644)
    root.chmod(0o555)
    done = run_script(READ_ONLY, str(root))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 3, done.stdout
    for line in lines[:2]:
        assert "[EACCES] Permission denied" in line, line
        assert f"make {root} writable by the service user" in line, line
    assert lines[2] == "old"
    assert files_under(root) == ["old.bin"]


async def test_transient_errors_are_retried_from_the_byte_reached(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blobs = FileSystemBlobs(
        root, retry=Retry(attempts=3, delay=0, jitter=False), write_buffer=BUFFER, piece_size=PIECE
    )
    failures = {"pwrite": 1, "pread": 2}

    def flaky(name: str, original: Callable[..., object]) -> Callable[..., object]:
        def call(*args: object) -> object:
            if failures[name]:
                failures[name] -= 1
                raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))
            return original(*args)

        return call

    monkeypatch.setattr(os, "pwrite", flaky("pwrite", os.pwrite))
    monkeypatch.setattr(os, "pread", flaky("pread", os.pread))
    data = payload(3 * BUFFER)
    await store(blobs, "flaky.bin", data)
    assert await read_all(blobs, "flaky.bin") == data
    assert failures == {"pwrite": 0, "pread": 0}
    # Out of tries: a StorageError marked transient.
    failures["pread"] = 3
    with pytest.raises(StorageError, match="EAGAIN") as caught:
        await read_all(blobs, "flaky.bin")
    assert caught.value.transient is True


# -- versions, writer tokens and links (issue #19) -------------------------------------


async def test_a_committed_file_has_a_version_carrying_its_writers_token(
    blobs: FileSystemBlobs,
) -> None:
    writer = blobs.open_writer("v/a.bin", token="c0ffee00" * 4)
    await writer.write(b"versioned")
    await writer.commit()
    info = await blobs.stat("v/a.bin")
    assert info is not None and info.version == writer.version
    assert blobs.made_by(info, "c0ffee00" * 4) and not blobs.made_by(info, "1" * 32)
    # Never later than now: the sweep must not see a young object as younger still.
    assert info.modified <= datetime.datetime.now(datetime.timezone.utc)


async def test_a_read_or_delete_of_another_version_leaves_the_file_alone(
    blobs: FileSystemBlobs, root: Path
) -> None:
    first = blobs.open_writer("v/b.bin")
    await first.write(b"first file")
    await first.commit()
    second = blobs.open_writer("v/b.bin")
    await second.write(b"other file")  # the same length
    await second.commit(overwrite=True)
    with pytest.raises(StoredObjectChanged):
        _ = [p async for p in blobs.open_reader("v/b.bin", 0, 10, version=first.version)]
    assert b"".join(
        [p async for p in blobs.open_reader("v/b.bin", 0, 10, version=second.version)]
    ) == b"other file"
    assert await blobs.delete("v/b.bin", version=first.version) is False
    assert (root / "v" / "b.bin").read_bytes() == b"other file"
    assert await blobs.delete("v/b.bin", version=second.version) is True
    assert files_under(root) == []


async def test_a_link_in_the_path_is_never_followed(
    blobs: FileSystemBlobs, root: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    (outside / "12").mkdir(parents=True)
    (outside / "12" / "x.bin").write_bytes(b"outside")
    root.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240  (a test's setup)
    (root / "2026").symlink_to(outside)
    writer = blobs.open_writer("2026/12/new.bin")
    await writer.write(b"must not land outside")
    with pytest.raises(StorageError, match=r"symbolic link stands at .*2026") as caught:
        await writer.commit()
    assert "never follows links" in str(caught.value)
    assert sorted(p.name for p in (outside / "12").iterdir()) == ["x.bin"]
    with pytest.raises(StoredObjectMissing, match="never followed"):
        _ = [p async for p in blobs.open_reader("2026/12/x.bin", 0, 7)]
    assert await blobs.stat("2026/12/x.bin") is None
    assert await blobs.delete("2026/12/x.bin") is False
    assert (outside / "12" / "x.bin").read_bytes() == b"outside"
    assert (root / "2026").is_symlink()
    assert [info async for info in blobs.list()] == []


async def test_a_link_or_a_fifo_as_the_object_is_never_read_or_removed(
    blobs: FileSystemBlobs, root: Path, tmp_path: Path
) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"secret")
    root.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240  (a test's setup)
    (root / "link.bin").symlink_to(secret)
    os.mkfifo(root / "fifo.bin")
    for key in ("link.bin", "fifo.bin"):
        with pytest.raises(StoredObjectMissing):  # and no hang on the FIFO
            _ = [p async for p in blobs.open_reader(key, 0, 6)]
        assert await blobs.stat(key) is None
        assert await blobs.delete(key) is False
    assert secret.read_bytes() == b"secret" and (root / "link.bin").is_symlink()


async def test_a_temp_file_stamped_by_its_committing_writer_is_not_taken_for_stale(
    blobs: FileSystemBlobs, root: Path
) -> None:
    # A committing writer stamps its temp file with its version (up to a second
    # before now) just before linking it: a sweep with a short grace must not see a
    # writer that is alive as dead (found by a hostile review: uploads failed with
    # ENOENT under sweeps with a grace under a second).
    writer = blobs.open_writer("t/live.bin")
    await writer.write(payload(BUFFER))
    (temp,) = temps_under(root)
    stamped = datetime.datetime.now().timestamp() - 0.8
    os.utime(root / temp, (stamped, stamped))
    cutoff = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=0.5)
    assert [info async for info in blobs.list_stale_temps(cutoff)] == []
    await writer.commit()
