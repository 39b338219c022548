"""Objects as files under a local directory: atomic writes, ranged reads, listing.

The key ``2024/05/3f2a.jpg`` is the file ``<root>/2024/05/3f2a.jpg``. A writer
fills a hidden temp file beside its destination (``.3f2a.jpg.<16 hex>.part``),
then on commit fsyncs it and puts it in place in one step, so a reader sees the
whole object or none:

* ``overwrite=False``: ``os.link(temp, final)``, which fails if the name is taken
  (:class:`~asyncassets.errors.KeyTaken`, the other object untouched), then the
  temp name is removed;
* ``overwrite=True``: ``os.replace(temp, final)``, atomic on POSIX.

Then the directory is fsynced (with the parents of any directory the writer
created), so the new name survives a crash.

A filesystem without hard links (some FUSE and network filesystems, FAT) makes
``link`` fail with ``EPERM``/``ENOTSUP``; the key is then reserved with
``open(final, O_CREAT | O_EXCL)`` and the temp file renamed over the empty
reservation. No object is ever overwritten that way either, but for that
moment an empty file is visible under the key, and a crash in between leaves
it there (it is named by no catalogue entry, so the orphan sweep removes it).

All blocking calls run in the event loop's default thread pool: one call per
``write_buffer`` bytes written, one per ``piece_size`` bytes read. A call cut
short by cancellation keeps running in its thread; a writer or reader closes its
descriptor only once that call has returned.

Temp files of writers that died (a crash, a killed process) are found by
:meth:`FileSystemBlobs.list_stale_temps` and removed by
:meth:`FileSystemBlobs.delete_temp`; :meth:`FileSystemBlobs.list` never shows them.

POSIX only (``pread``/``pwrite``, directory fsync).
"""

from __future__ import annotations

import asyncio
import builtins
import datetime
import errno
import functools
import os
import re
import secrets
import stat as stat_module
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from ..._tasks import add_note, spawn
from ...errors import KeyTaken, StorageError, StoredObjectMissing
from ..retry import Retry
from ..sources import byte_view
from .blobs import BlobInfo

__all__ = ["FileSystemBlobWriter", "FileSystemBlobs"]

T = TypeVar("T")

_NO_RETRY = Retry(attempts=1)

#: A writer's temp file: ``.<start of the final name>.<16 hex digits>.part``.
_TEMP_NAME = re.compile(r"\..*\.[0-9a-f]{16}\.part", re.DOTALL)
#: How much of the final name a temp name keeps: 48 characters are at most 192
#: bytes in UTF-8, so the temp name stays under the usual 255-byte limit.
_TEMP_STEM = 48

#: A writer keeps ``bytes`` pieces at least this large by reference instead of copying.
_REFERENCE_AT = 16 * 1024
#: The most pieces one ``pwritev`` call takes.
_IOV_MAX = 1024  # Linux's and macOS's IOV_MAX

#: Entries examined per thread call while listing (bounded memory, few hops).
_LIST_BATCH = 1000

#: Errors worth another try: rare on a local disk, seen on network filesystems.
_TRANSIENT = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR, errno.EBUSY, errno.ETIMEDOUT})
#: A full disk, a quota, or a file-size limit (``RLIMIT_FSIZE``): no room left.
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
#: What ``link`` says on a filesystem that has no hard links.
_NO_HARD_LINKS = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS})
#: What ``fsync`` of a directory says on a filesystem that cannot do it.
_NO_DIRECTORY_FSYNC = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF})

#: Why ``rmdir`` may leave a directory: not empty (a file or a writer's temp file
#: is in it), or not ours to remove (permissions, a mount point); an empty
#: directory left behind holds no data.
_KEEP_DIRECTORY = frozenset(
    {errno.ENOTEMPTY, errno.EEXIST, errno.EACCES, errno.EPERM, errno.EBUSY, errno.EROFS}
)

_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
_READ = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
_READ_DIRECTORY = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)


def _is_transient(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in _TRANSIENT


def _utc(timestamp: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc)


def _key_problem(key: str) -> str | None:
    """Why ``key`` cannot name a file under the root, or ``None`` if it can."""
    if not key:
        return "it is empty"
    if key.startswith("/"):
        return "it is absolute"
    if "\\" in key:
        return "it contains a backslash"
    if "\0" in key:
        return "it contains a NUL character"
    for segment in key.split("/"):
        if not segment:
            return "it has an empty segment ('//', or a '/' at the end)"
        if segment in (".", ".."):
            return f"it has a {segment!r} segment"
        if _TEMP_NAME.fullmatch(segment):
            return f"its segment {segment!r} looks like a writer's temp file"
    return None


def _check_key(key: str) -> None:
    if not isinstance(key, str):
        raise TypeError(f"a key must be a str, not {type(key).__name__}")
    problem = _key_problem(key)
    if problem is not None:
        raise ValueError(
            f"cannot store under the key {key!r}: {problem}; keys are '/'-separated "
            "relative paths made by the storage's key template"
        )


def _temp_name(final_name: str) -> str:
    return f".{final_name[:_TEMP_STEM]}.{secrets.token_hex(8)}.part"


def _pwrite_all(fd: int, pieces: list[memoryview], position: int) -> int:
    """Write all ``pieces`` at ``position``, gathered (``pwritev``); return the end position.

    Writing at explicit offsets makes a retried call idempotent: it rewrites the
    same bytes in the same place, whatever the failed try managed to write.
    """
    views = [piece for piece in pieces if len(piece)]
    if not hasattr(os, "pwritev"):  # pragma: no cover - macOS before 11
        views = [memoryview(b"".join(views))] if views else []
    first = 0
    while first < len(views):
        batch = views[first : first + _IOV_MAX]
        if len(batch) == 1:
            written = os.pwrite(fd, batch[0], position)
        else:
            written = os.pwritev(fd, batch, position)
        position += written
        # Skip what was written; a short write resumes inside a piece.
        while written and first < len(views):
            size = len(views[first])
            if written >= size:
                written -= size
                first += 1
            else:
                views[first] = views[first][written:]
                written = 0
    return position


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _fsync_directory(path: str) -> None:
    fd = os.open(path, _READ_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _NO_DIRECTORY_FSYNC:
            raise
    finally:
        os.close(fd)


async def _in_thread(function: Callable[[], T]) -> T:
    return await asyncio.get_running_loop().run_in_executor(None, function)


class _KeyTakenError(Exception):
    """Raised in a worker thread: the final name exists; the temp file is gone."""


class _Calls:
    """Runs one blocking call at a time in a thread, for one open descriptor.

    A caller cancelled while its call runs stops waiting, but the thread goes on
    using the descriptor; closing it then could make the thread write into, or
    read from, whatever file next gets the same descriptor number. So the call
    is shielded, and :meth:`when_idle` and :meth:`wait` let the owner close the
    descriptor only after the call has returned.
    """

    def __init__(self, what: str) -> None:
        self._what = what
        self._running: asyncio.Future[Any] | None = None

    async def run(self, function: Callable[[], T]) -> T:
        if self._running is not None and not self._running.done():
            raise RuntimeError(
                f"another call on this {self._what} is still running: await each call "
                "before starting the next"
            )
        running = asyncio.get_running_loop().run_in_executor(None, function)
        self._running = running
        result: T = await asyncio.shield(running)
        return result

    async def wait(self) -> None:
        """Return once no call is running (its outcome is not raised here)."""
        if self._running is not None and not self._running.done():
            await asyncio.wait({self._running})

    def when_idle(self, callback: Callable[[], object]) -> None:
        """Call ``callback`` now, or when the running call has returned."""
        if self._running is None or self._running.done():
            callback()
        else:
            self._running.add_done_callback(lambda _: callback())


class FileSystemBlobs:
    """Objects stored as files under a directory; implements :class:`~.blobs.Blobs`.

    >>> blobs = FileSystemBlobs("/srv/media/posters")
    >>> writer = blobs.open_writer("2024/05/3f2a.jpg")
    >>> await writer.write(data)
    >>> await writer.commit()                    # KeyTaken if the key exists
    >>> b"".join([piece async for piece in blobs.open_reader("2024/05/3f2a.jpg", 0, 10)])

    The root and the key's directories are created on the first write (with
    ``dir_mode``, before the umask); nothing is touched before.

    :param root: the directory holding the objects; made absolute at once.
    :param retry: how errors that may pass (``EAGAIN``, ``EBUSY``, ``ETIMEDOUT``,
        seen on network filesystems) are retried; by default they are not.
        Writes and reads use explicit offsets, so a retried call resumes at the
        byte it reached. Listing is not retried.
    :param piece_size: the most bytes a reader reads (and yields) at a time.
    :param write_buffer: bytes a writer gathers before writing them to its temp
        file in one thread call.
    :param fsync: fsync each file and its directory on commit (durable across a
        crash); turn off only for throwaway data.
    :param dir_mode: the mode of directories made for keys.
    :param file_mode: the mode of stored files.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        retry: Retry = _NO_RETRY,
        piece_size: int = 1024 * 1024,
        write_buffer: int = 1024 * 1024,
        fsync: bool = True,
        dir_mode: int = 0o755,
        file_mode: int = 0o644,
    ) -> None:
        for name, value in (("piece_size", piece_size), ("write_buffer", write_buffer)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive number of bytes, got {value!r}")
        if not isinstance(retry, Retry):
            raise TypeError(f"retry must be a Retry, not {type(retry).__name__}")
        #: The directory, absolute.
        self.root = Path(os.path.abspath(os.fspath(root)))
        #: ``file:///srv/media/posters``, for messages.
        self.url = self.root.as_uri()
        self.retry = retry
        self.piece_size = piece_size
        self.write_buffer = write_buffer
        self.fsync = bool(fsync)
        self.dir_mode = dir_mode
        self.file_mode = file_mode
        self._root = str(self.root)
        # Cleared the first time link() says the filesystem has no hard links.
        self._hard_links = True

    def __repr__(self) -> str:
        return f"FileSystemBlobs({self._root!r})"

    # --- the Blobs protocol -------------------------------------------------

    def open_writer(self, key: str) -> FileSystemBlobWriter:
        """Start writing an object under ``key``; no I/O until the first write or commit.

        :raises ValueError: ``key`` is absolute, has empty, ``.`` or ``..``
            segments, a backslash or a NUL (keys come from the key maker; this
            is a second line of defence).
        """
        return FileSystemBlobWriter(self, key, self._path(key))

    async def open_reader(self, key: str, start: int, end: int) -> AsyncIterator[bytes]:
        """Yield the bytes ``[start, end)`` of the object under ``key``, in pieces.

        Each piece is at most ``piece_size`` bytes.

        The file is opened first (so a missing key raises even for an empty
        range), then read with ``pread`` from ``start``. If the file is shorter
        than ``end`` the generator simply stops at its end: the caller, which
        knows the size the catalogue recorded, detects the short read.

        :raises StoredObjectMissing: no file under ``key``.
        :raises StorageError: the file cannot be read (permissions, I/O error).
        :raises ValueError: ``start`` is negative or ``end`` is before ``start``.
        """
        path = self._path(key)
        if start < 0 or end < start:
            raise ValueError(f"bad byte range [{start}, {end}) for {key!r}")
        calls = _Calls("reader")
        try:
            fd = await self._retrying(
                functools.partial(calls.run, functools.partial(_open_regular, path))
            )
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
            raise self._missing(key, path, exc) from exc
        except OSError as exc:
            raise self._error(exc, "opening", key, path, reading=True) from exc
        try:
            position = start
            while position < end:
                read = functools.partial(
                    os.pread, fd, min(self.piece_size, end - position), position
                )
                try:
                    piece = await self._retrying(functools.partial(calls.run, read))
                except OSError as exc:
                    raise self._error(exc, "reading", key, path, reading=True) from exc
                if not piece:
                    return  # shorter than `end`: the caller compares with the size it expects
                position += len(piece)
                yield piece
        finally:
            calls.when_idle(functools.partial(os.close, fd))

    async def stat(self, key: str) -> BlobInfo | None:
        """The file under ``key`` (size, modification time in UTC), or ``None``.

        A directory under ``key`` is not an object: ``None``.

        :raises StorageError: the file cannot be examined (permissions, I/O error).
        """
        path = self._path(key)
        try:
            st = await self._retrying(
                functools.partial(_in_thread, functools.partial(os.stat, path))
            )
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise self._error(exc, "examining", key, path, reading=True) from exc
        if not stat_module.S_ISREG(st.st_mode):
            return None
        return BlobInfo(key, st.st_size, _utc(st.st_mtime))

    async def delete(self, key: str) -> bool:
        """Delete the file under ``key``, then the directories it leaves empty.

        Directories are removed with ``rmdir``, which refuses a directory that is
        not empty, so one another writer has just put a file in stays; the root
        itself is never removed. A directory that cannot be removed (not empty,
        no permission, a mount point) is left, and holds no data.

        :returns: ``True`` if there was a file under ``key``.
        :raises StorageError: the file exists but cannot be removed.
        """
        path = self._path(key)
        return await self._unlink_and_prune(key, path)

    async def list(self) -> AsyncIterator[BlobInfo]:
        """Every file under the root, keys ``/``-separated, in no set order.

        Temp files of writers, symlinks and other non-regular files are skipped.
        The tree is walked with ``os.scandir`` in a thread, ``1000`` entries per
        call, so memory holds one batch (and the directories still to visit),
        whatever the number of files. A missing root lists nothing.

        :raises StorageError: a directory cannot be read, or the root is a file.
        """
        async for info in self._walk(temps=False):
            yield info

    # --- the sweep's helpers --------------------------------------------------

    async def list_stale_temps(self, older_than: datetime.datetime) -> AsyncIterator[BlobInfo]:
        """The temp files of writers last written before ``older_than``.

        A live writer keeps writing to its temp file, so an old one belongs to a
        writer that died (a crash, a killed process). Each is given as a
        :class:`~.blobs.BlobInfo` whose ``key`` is its path relative to the root,
        to pass to :meth:`delete_temp`.

        :raises ValueError: ``older_than`` has no timezone.
        :raises StorageError: as :meth:`list`.
        """
        if older_than.tzinfo is None or older_than.utcoffset() is None:
            raise ValueError("older_than must be timezone-aware (UTC)")
        async for info in self._walk(temps=True):
            if info.modified < older_than:
                yield info

    async def delete_temp(self, path: str) -> bool:
        """Delete a temp file found by :meth:`list_stale_temps`, then empty directories.

        :param path: the temp file's path relative to the root, ``/``-separated.
        :returns: ``True`` if it was there.
        :raises ValueError: ``path`` does not name a temp file under the root
            (this never deletes a stored object).
        :raises StorageError: the file cannot be removed.
        """
        if not isinstance(path, str):
            raise TypeError(f"path must be a str, not {type(path).__name__}")
        directory, _, name = path.rpartition("/")
        if not _TEMP_NAME.fullmatch(name) or (directory and _key_problem(directory)):
            raise ValueError(f"{path!r} is not the path of a writer's temp file under {self.url}")
        full = os.path.join(self._root, *path.split("/"))
        return await self._unlink_and_prune(path, full)

    # --- internals ------------------------------------------------------------

    async def _retrying(self, operation: Callable[[], Awaitable[T]]) -> T:
        """Await ``operation()``, again on transient errors as :attr:`retry` says."""
        if self.retry.attempts == 1:
            return await operation()  # the common case, without the retry's frames
        return await self.retry.call(operation, _is_transient)

    def _path(self, key: str) -> str:
        _check_key(key)
        return os.path.join(self._root, *key.split("/"))

    async def _unlink_and_prune(self, key: str, path: str) -> bool:
        try:
            await self._retrying(functools.partial(_in_thread, functools.partial(os.unlink, path)))
            existed = True
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            existed = False
        except OSError as exc:
            raise self._error(exc, "deleting", key, path) from exc
        # Also after a miss: an earlier delete may have died before pruning.
        try:
            await _in_thread(functools.partial(self._prune, os.path.dirname(path)))
        except OSError as exc:
            raise self._error(exc, "removing the empty directories of", key, path) from exc
        return existed

    def _prune(self, directory: str) -> None:
        """Remove ``directory`` and its parents while they are empty, up to the root."""
        root = self._root
        while directory != root and directory.startswith(root + os.sep):
            try:
                os.rmdir(directory)
            except FileNotFoundError:
                pass  # another delete removed it; its parent may be empty now
            except OSError as exc:
                if exc.errno in _KEEP_DIRECTORY:
                    return
                raise
            directory = os.path.dirname(directory)

    def _make_dirs(self, directory: str) -> builtins.list[str]:
        """Make ``directory`` and its missing parents; return those this call made.

        Another writer making the same directories at the same time is fine.

        :raises NotADirectoryError: a file stands where a directory is needed.
        """
        missing = []
        current = directory
        while not os.path.isdir(current):
            missing.append(current)
            parent = os.path.dirname(current)
            if parent == current:
                break
            current = parent
        made = []
        for path in reversed(missing):
            try:
                os.mkdir(path, self.dir_mode)
            except FileExistsError:
                if not os.path.isdir(path):
                    raise NotADirectoryError(
                        errno.ENOTDIR, os.strerror(errno.ENOTDIR), path
                    ) from None
                continue
            made.append(path)
        return made

    async def _walk(self, *, temps: bool) -> AsyncIterator[BlobInfo]:
        walker = _Walker(self._root, temps=temps)
        calls = _Calls("listing")
        try:
            while True:
                try:
                    batch = await calls.run(walker.next_batch)
                except OSError as exc:
                    raise self._error(
                        exc, "listing", None, exc.filename or self._root, reading=True
                    ) from exc
                if not batch:
                    return
                for info in batch:
                    yield info
        finally:
            calls.when_idle(walker.close)

    def _missing(self, key: str, path: str, exc: OSError) -> StorageError:
        if (
            isinstance(exc, NotADirectoryError)
            and os.path.exists(self._root)
            and not os.path.isdir(self._root)
        ):
            not_a_directory = NotADirectoryError(
                errno.ENOTDIR, os.strerror(errno.ENOTDIR), self._root
            )
            return self._error(not_a_directory, "reading", key, self._root, reading=True)
        return StoredObjectMissing(
            f"{self.url}: no stored object under the key {key!r} (no file {path})",
            storage=self.url,
            key=key,
        )

    def _error(
        self,
        exc: OSError,
        doing: str,
        key: str | None,
        path: str,
        *,
        reading: bool = False,
    ) -> StorageError:
        """A :class:`StorageError` naming the path, the errno and what to do."""
        code = exc.errno
        where = os.fspath(exc.filename) if exc.filename else path
        reason = f"[{errno.errorcode.get(code, code)}] {os.strerror(code)}" if code else str(exc)
        uid = os.geteuid() if hasattr(os, "geteuid") else None
        user = "the service user" if uid is None else f"the service user (uid {uid})"
        if code in _NO_SPACE:
            advice = (
                f"free space on the filesystem holding {self._root}, or raise the disk "
                "quota or file-size limit (ulimit -f) of the service user"
            )
        elif code == errno.EROFS:
            advice = (
                f"the filesystem holding {where} is read-only: "
                "remount it read-write or choose another root"
            )
        elif code in (errno.EACCES, errno.EPERM):
            if reading:
                advice = f"make {where} readable by {user}"
            else:
                advice = f"make {os.path.dirname(where)} writable by {user}"
        elif code == errno.ENOTDIR and where == self._root:
            advice = (
                f"the storage root {self._root} is not a directory: "
                "move that file away or choose another root"
            )
        elif code == errno.ENOTDIR:
            advice = (
                f"a file stands where the key needs a directory ({where}): check the key template"
            )
        elif code == errno.ENAMETOOLONG:
            advice = "the key is too long for this filesystem: use a shorter key template"
        elif code in _TRANSIENT:
            advice = (
                "the filesystem was busy: retry, or give the storage a Retry with more attempts"
            )
        else:
            advice = f"check the filesystem holding {self._root} (dmesg, mount options)"
        subject = f" {key!r}" if key is not None else ""
        return StorageError(
            f"{self.url}: {doing}{subject} failed at {where}: {reason}; {advice}",
            storage=self.url,
            key=key,
            transient=code in _TRANSIENT,
        )


def _open_regular(path: str) -> int:
    """Open ``path`` for reading; a directory counts as missing."""
    fd = os.open(path, _READ)
    try:
        is_file = stat_module.S_ISREG(os.fstat(fd).st_mode)
    except BaseException:
        os.close(fd)
        raise
    if not is_file:
        os.close(fd)
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
    return fd


class _Walker:
    """Walks a tree with ``os.scandir``, a batch at a time (called in a thread)."""

    def __init__(self, root: str, *, temps: bool) -> None:
        self._root = root
        self._temps = temps
        # Directories still to read, with the key prefix of their entries.
        self._pending: list[tuple[str, str]] = [(root, "")]
        self._current: tuple[Any, str] | None = None  # (ScandirIterator, prefix)

    def next_batch(self) -> list[BlobInfo]:
        """Up to ``_LIST_BATCH`` more entries; an empty list once the walk is over."""
        batch: list[BlobInfo] = []
        while len(batch) < _LIST_BATCH:
            if self._current is None:
                if not self._pending:
                    break
                directory, prefix = self._pending.pop()
                try:
                    entries = os.scandir(directory)
                except FileNotFoundError:
                    continue  # a missing root holds nothing; a pruned directory neither
                except NotADirectoryError:
                    if directory == self._root:
                        raise
                    continue  # replaced by a file since it was listed
                self._current = (entries, prefix)
            entries, prefix = self._current
            entry = next(entries, None)
            if entry is None:
                entries.close()
                self._current = None
                continue
            if entry.is_dir(follow_symlinks=False):
                self._pending.append((entry.path, f"{prefix}{entry.name}/"))
                continue
            if not entry.is_file(follow_symlinks=False):
                continue  # symlinks, sockets...: never written by a writer
            if (_TEMP_NAME.fullmatch(entry.name) is not None) != self._temps:
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # deleted since it was listed
            batch.append(BlobInfo(prefix + entry.name, st.st_size, _utc(st.st_mtime)))
        return batch

    def close(self) -> None:
        if self._current is not None:
            self._current[0].close()
            self._current = None
        self._pending.clear()


class FileSystemBlobWriter:
    """One object being written to a temp file; see :class:`FileSystemBlobs`.

    Bytes are gathered until ``write_buffer`` of them are pending, then written
    in one thread call with ``pwritev`` (large ``bytes`` are not copied meanwhile,
    they are referenced). :meth:`commit` writes the rest, fsyncs, and
    links or renames the temp file into place. Any failure removes the temp file
    and raises :class:`~asyncassets.errors.StorageError`; the writer is then done.
    """

    def __init__(self, blobs: FileSystemBlobs, key: str, path: str) -> None:
        #: The key the object will be stored under.
        self.key = key
        self._blobs = blobs
        self._path = path
        # Pending bytes: whole pieces kept by reference, small ones gathered in _small.
        self._segments: list[memoryview] = []
        self._small = bytearray()
        self._pending_size = 0
        self._position = 0  # bytes in the temp file
        # Set in worker threads; read only after the thread's call has returned.
        self._fd: int | None = None
        self._temp: str | None = None
        self._made: list[str] = []
        self._in_place = False
        self._state = "writing"  # then "committing", "committed", "failed" or "aborted"
        self._calls = _Calls("writer")
        self._cleanup: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<FileSystemBlobWriter {self.key!r} {self._state}>"

    async def write(self, data: bytes | memoryview) -> None:
        """Append ``data``; writes to the temp file once ``write_buffer`` bytes are pending.

        Pieces of at least 16 KiB are not copied: ``bytes`` are kept by reference
        until then, and a mutable piece only when it fills the buffer (it is
        written before this returns); smaller pieces are copied together.

        :raises StorageError: the write failed (full disk, no permission...); the
            temp file has been removed and the writer is done.
        :raises ValueError: the writer was committed, aborted, or failed before.
        """
        view = memoryview(byte_view(data, "data"))
        self._check_writing("write to")
        size = len(view)
        if not size:
            return
        fills = self._pending_size + size >= self._blobs.write_buffer
        if size >= _REFERENCE_AT and (fills or type(view.obj) is bytes):
            # Immutable, or written before this returns: no copy needed.
            if self._small:
                self._segments.append(memoryview(self._small))
                self._small = bytearray()
            self._segments.append(view)
        else:
            self._small += view
        self._pending_size += size
        if fills:
            await self._send(self._take_pending(), "writing")

    async def commit(self, *, overwrite: bool = False) -> None:
        """Write what is buffered, fsync, and put the file in place under :attr:`key`.

        :raises KeyTaken: ``overwrite`` is false and a file exists under the key;
            it is left as it was, and the temp file is removed.
        :raises StorageError: the commit failed before the file was in place: the
            temp file has been removed. (If only the final directory fsync failed,
            the file is in place; the error still says the commit failed.)
        :raises ValueError: the writer was committed, aborted, or failed before.
        """
        self._check_writing("commit")
        self._state = "committing"
        # Even an empty object needs its temp file: send opens it.
        await self._send(self._take_pending(), "writing", sync=self._blobs.fsync)
        if self._state != "committing":  # aborted meanwhile by another task
            raise ValueError(f"the writer for {self.key!r} was aborted during commit")
        try:
            await self._calls.run(functools.partial(self._put_in_place, overwrite))
        except _KeyTakenError:
            self._state = "aborted"
            raise KeyTaken(
                f"{self._blobs.url}: an object already exists under the key {self.key!r} "
                f"({self._path}) and overwrite is off; it was left as it is",
                storage=self._blobs.url,
                key=self.key,
            ) from None
        except OSError as exc:
            error = self._blobs._error(exc, "committing", self.key, self._path)
            if self._in_place:
                self._state = "committed"
            else:
                await self._fail(error)
            raise error from exc
        except BaseException:
            # Cancelled: the thread goes on; abort() waits for it and then knows.
            self._state = "failed"
            raise
        self._state = "committed"

    async def abort(self) -> None:
        """Remove the temp file; idempotent; a no-op once the file is in place.

        The removal runs to its end even if the caller is cancelled meanwhile (the
        cancelled caller waits for it, then sees its ``CancelledError``). It first
        waits for a write or commit still running in its thread: if that commit
        put the file in place, the object stays.

        :raises StorageError: the temp file could not be removed (the orphan
            sweep will find it).
        """
        if self._state == "committed":
            return
        if self._cleanup is None:
            if self._state in ("writing", "committing"):
                self._state = "aborted"
            self._cleanup = spawn(self._remove_temp())
        task = self._cleanup
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.done():
                await asyncio.wait({task})
            raise

    # --- internals ------------------------------------------------------------

    def _check_writing(self, doing: str) -> None:
        if self._state != "writing":
            raise ValueError(
                f"cannot {doing} the writer for {self.key!r}: it is {self._state}; "
                "open a new writer"
            )

    def _take_pending(self) -> list[memoryview]:
        segments = self._segments
        if self._small:
            segments.append(memoryview(self._small))
        self._segments, self._small, self._pending_size = [], bytearray(), 0
        return segments

    async def _send(self, pieces: list[memoryview], doing: str, *, sync: bool = False) -> None:
        start = self._position
        work = functools.partial(self._write_at, pieces, start, sync)
        try:
            self._position = await self._blobs._retrying(functools.partial(self._calls.run, work))
        except OSError as exc:
            error = self._blobs._error(exc, doing, self.key, self._temp or self._path)
            await self._fail(error)
            raise error from exc
        except BaseException:
            # Cancelled: how much reached the file is unknown; only abort() is left.
            self._state = "failed"
            raise

    def _write_at(self, pieces: list[memoryview], position: int, sync: bool) -> int:
        """In a thread: open the temp file if needed, write ``pieces`` at ``position``."""
        if self._fd is None:
            self._open_temp()
        assert self._fd is not None
        position = _pwrite_all(self._fd, pieces, position)
        if sync:
            os.fsync(self._fd)
        return position

    def _open_temp(self) -> None:
        """In a thread: make the key's directories and create the temp file in them."""
        directory, name = os.path.split(self._path)
        for attempt in range(5):
            self._made += self._blobs._make_dirs(directory)
            temp = os.path.join(directory, _temp_name(name))
            try:
                self._fd = os.open(temp, _CREATE, self._blobs.file_mode)
            except FileNotFoundError:
                if attempt == 4:
                    raise
                continue  # a delete pruned the directory we just made: make it again
            self._temp = temp
            return

    def _put_in_place(self, overwrite: bool) -> None:
        """In a thread: close the temp file, link or rename it to the key, fsync directories."""
        assert self._fd is not None and self._temp is not None
        blobs = self._blobs
        fd, self._fd = self._fd, None
        os.close(fd)
        temp, final = self._temp, self._path
        if overwrite:
            os.replace(temp, final)
            self._in_place = True
        else:
            if blobs._hard_links:
                try:
                    os.link(temp, final)
                except FileExistsError:
                    _remove(temp)
                    self._temp = None
                    raise _KeyTakenError from None
                except OSError as exc:
                    if exc.errno not in _NO_HARD_LINKS:
                        raise
                    blobs._hard_links = False
                else:
                    self._in_place = True
            if not self._in_place:
                # No hard links here: reserve the name, then rename over the reservation.
                try:
                    reserved = os.open(final, _CREATE, blobs.file_mode)
                except FileExistsError:
                    _remove(temp)
                    self._temp = None
                    raise _KeyTakenError from None
                os.close(reserved)
                os.replace(temp, final)
                self._in_place = True
            else:
                os.unlink(temp)
        self._temp = None
        if blobs.fsync:
            directories = {os.path.dirname(final)}
            directories.update(os.path.dirname(made) for made in self._made)
            for directory in sorted(directories, key=len, reverse=True):
                _fsync_directory(directory)

    async def _fail(self, error: StorageError) -> None:
        """After ``error``: the writer is done, its temp file removed."""
        self._state = "failed"
        try:
            await self.abort()
        except StorageError as cleanup:
            add_note(error, f"and the temp file could not be removed: {cleanup}")

    async def _remove_temp(self) -> None:
        await self._calls.wait()
        if self._in_place:
            self._state = "committed"
            return
        fd, temp = self._fd, self._temp
        self._fd = self._temp = None
        if fd is None and temp is None:
            return
        try:
            await _in_thread(functools.partial(self._close_and_remove, fd, temp))
        except OSError as exc:
            raise self._blobs._error(
                exc, "removing the temp file of", self.key, temp or self._path
            ) from exc

    def _close_and_remove(self, fd: int | None, temp: str | None) -> None:
        """In a thread: close and remove the temp file, and the directories it leaves empty."""
        try:
            if fd is not None:
                os.close(fd)
        finally:
            if temp is not None:
                _remove(temp)
                self._blobs._prune(os.path.dirname(temp))
