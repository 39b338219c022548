"""Objects as files under a local directory: atomic writes, ranged reads, listing.

The key ``2024/05/3f2a.jpg`` is the file ``<root>/2024/05/3f2a.jpg``. A writer
fills a hidden temp file beside its destination (``.3f2a.jpg.<16 hex>.part``),
then on commit sets the file's version, fsyncs it and puts it in place in one
step, so a reader sees the whole object or none:

* ``overwrite=False``: ``link(temp, final)``, which fails if the name is taken
  (:class:`~asyncassets.errors.KeyTaken`, the other object untouched), then the
  temp name is removed;
* ``overwrite=True``: ``rename(temp, final)``, atomic on POSIX.

Then the directory is fsynced (a directory the writer made was fsynced into its
parent when it was made), so the new name survives a crash.

**Never out of the root.** Every path under the root is walked one directory at
a time from an open descriptor of the root, each step opened with
``O_NOFOLLOW | O_DIRECTORY`` and every file opened, linked, renamed, examined or
removed relative to its directory's descriptor without following a link. A
symbolic link planted anywhere under the root (``root/2026 -> /etc``) is
therefore never followed: a write under it fails with a
:class:`~asyncassets.errors.StorageError` that names the link, a read finds no
object, a delete removes nothing outside. There is no check-then-use gap: what
was checked is the descriptor that is used. (The root itself is opened as
configured, links in its own path included: that is the administrator's choice.)

**Versions.** At commit the file's modification time is set to the last second
boundary plus a nanosecond part taken from the writer's ``token`` (never later
than now), then read back:
that ``st_mtime_ns`` is the object's *version*, which the catalogue entry records
and every read compares on the opened descriptor
(:class:`~asyncassets.errors.StoredObjectChanged` otherwise). Another file under
the key (the key reused after a delete, a file restored from an older backup,
one written by another tool) has another version, so a read through an entry
returns only the bytes that entry's upload wrote. A writer that died between
its commit and its entry is recognised by the nanosecond part alone
(:meth:`FileSystemBlobs.made_by`). On a filesystem with coarse timestamps the
version is what it keeps (whole seconds, say), a weaker identity.

**Pruned directories.** A delete removes the directories its file leaves empty.
A writer whose directory is pruned under it (between ``mkdir`` and creating its
temp file) walks again and remakes it; once its temp file is in the directory,
``rmdir`` refuses to remove it.

A filesystem without hard links (some FUSE and network filesystems, FAT) makes
``link`` fail with ``EPERM``/``ENOTSUP``; the key is then reserved with
``O_CREAT | O_EXCL`` and the temp file renamed over the empty reservation. No
object is ever overwritten that way either, but for that moment an empty file is
visible under the key (of another version: reads through no entry see it).

All blocking calls run in the event loop's default thread pool: one call per
``write_buffer`` bytes written, one per ``piece_size`` bytes read. A call cut
short by cancellation keeps running in its thread; a writer or reader closes its
descriptors only once that call has returned.

Temp files of writers that died (a crash, a killed process) are found by
:meth:`FileSystemBlobs.list_stale_temps` and removed by
:meth:`FileSystemBlobs.delete_temp`; :meth:`FileSystemBlobs.list` never shows them.

POSIX only (``pread``/``pwrite``, ``openat``-style calls, directory fsync).
"""

from __future__ import annotations

import asyncio
import ctypes
import datetime
import errno
import functools
import hashlib
import os
import re
import secrets
import stat as stat_module
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from ..._tasks import add_note, spawn
from ...errors import KeyTaken, StorageError, StoredObjectChanged, StoredObjectMissing
from ..retry import Retry
from ..sources import byte_view, hash_views
from .blobs import BlobInfo

__all__ = ["FileSystemBlobWriter", "FileSystemBlobs", "ResumableFileWriter"]

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
#: How often a writer walks again when its directory is pruned under it.
_PRUNED_RETRIES = 8

#: Errors worth another try: rare on a local disk, seen on network filesystems.
_TRANSIENT = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR, errno.EBUSY, errno.ETIMEDOUT})
#: A full disk, a quota, or a file-size limit (``RLIMIT_FSIZE``): no room left.
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
#: What ``link`` says on a filesystem that has no hard links.
_NO_HARD_LINKS = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS})
#: What ``fsync`` of a directory says on a filesystem that cannot do it.
_NO_DIRECTORY_FSYNC = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF})
#: Why a path under the root holds no object: nothing there, or not a directory
#: where one is needed (a file, or a link that is never followed).
_ABSENT = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ELOOP})

#: Why ``rmdir`` may leave a directory: not empty (a file or a writer's temp file
#: is in it), not ours to remove (permissions, a mount point), or not a directory
#: at all any more (a link or file put in its place); an empty directory left
#: behind holds no data.
_KEEP_DIRECTORY = frozenset(
    {errno.ENOTEMPTY, errno.EEXIST, errno.EACCES, errno.EPERM, errno.EBUSY, errno.EROFS,
     errno.ENOTDIR, errno.ELOOP}
)

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC
# O_NONBLOCK: a FIFO planted under a key must not hang the reader (regular files
# ignore the flag); it is then refused as not a regular file.
_READ = os.O_RDONLY | _NOFOLLOW | _CLOEXEC | getattr(os, "O_NONBLOCK", 0)
_DIRECTORY = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _NOFOLLOW | _CLOEXEC
_ROOT = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _CLOEXEC
_NS = 1_000_000_000

#: Directory names along a key, and the descriptors opened along them.
_Names = list[str]
_Fds = list[int]


def _is_transient(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in _TRANSIENT


def _utc(timestamp: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc)


def _nanos(token: str) -> int:
    """The nanosecond part of the version of an object written with ``token``."""
    return int(token[:15], 16) % _NS


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


def _split(key: str) -> tuple[list[str], str]:
    """The directories and the file name of a checked key."""
    if not isinstance(key, str):
        raise TypeError(f"a key must be a str, not {type(key).__name__}")
    problem = _key_problem(key)
    if problem is not None:
        raise ValueError(
            f"cannot store under the key {key!r}: {problem}; keys are '/'-separated "
            "relative paths made by the storage's key template"
        )
    *directories, name = key.split("/")
    return directories, name


def _temp_name(final_name: str) -> str:
    return f".{final_name[:_TEMP_STEM]}.{secrets.token_hex(8)}.part"


def _writeback_starter() -> Callable[[int, int, int], None] | None:
    """Linux's ``sync_file_range(..., SYNC_FILE_RANGE_WRITE)``, or ``None`` elsewhere.

    It starts writing a range of dirty pages to the disk and returns without
    waiting. A writer calls it on each piece it wrote, so the disk works while
    the next piece is hashed and written, and the ``fsync`` at commit has only
    the last pieces left to flush: without it, the kernel keeps the whole file
    dirty until that ``fsync``, which then runs after all the hashing instead of
    beside it (measured: 64 MiB written then fsynced, 75 ms; started piece by
    piece, 45 ms). Only a hint: durability is still the ``fsync``'s.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    function.restype = ctypes.c_int
    write = 2  # SYNC_FILE_RANGE_WRITE

    def start(fd: int, offset: int, count: int) -> None:
        # ctypes releases the GIL during the call. A failure (EINVAL on a file
        # system that does not support it...) leaves the work to the fsync.
        function(fd, offset, count, write)

    return start


_start_writeback = _writeback_starter()


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


def _pread_checked(fd: int, size: int, position: int, version: Any) -> bytes:
    """``pread``, then make sure the file is still of ``version``.

    Another tool may rewrite the file in place under an open descriptor; writing
    updates the file's time before the bytes, so bytes read from a rewrite show
    as another version here (the piece is then never handed out). A rewrite that
    sets the old time back afterwards cannot be seen this way (nor by any read
    short of the checksum: ``verify``).
    """
    piece = os.pread(fd, size, position)
    if version is not None and os.fstat(fd).st_mtime_ns != version:
        raise _Changed
    return piece


def _fsync_directory(fd: int) -> None:
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _NO_DIRECTORY_FSYNC:
            raise


def _close_all(fds: list[int]) -> None:
    for fd in reversed(fds):
        os.close(fd)
    fds.clear()


async def _in_thread(function: Callable[[], T]) -> T:
    return await asyncio.get_running_loop().run_in_executor(None, function)


class _KeyTakenError(Exception):
    """Raised in a worker thread: the final name exists; the temp file is gone."""


class _Changed(Exception):
    """Raised in a worker thread: the file under the key is of another version."""


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
        self._resolved_root: str | None = None

    def __repr__(self) -> str:
        return f"FileSystemBlobs({self._root!r})"

    # --- the Blobs protocol -------------------------------------------------

    @property
    def place(self) -> str:
        """Where the objects are, as their reservations name it: ``file:<root>``,
        the root's real path (its links resolved)."""
        return "file:" + self._real_root()

    def reservation_id(self, key: str) -> str:
        """The object's one name across storages: ``file:<real absolute path>``.

        Two storages whose roots overlap (``/srv`` and ``/srv/media``), or name one
        directory two ways (through a link to it), give the same name to the same
        file, so their key reservations meet.
        """
        directories, name = _split(key)
        return "file:" + os.path.join(self._real_root(), *directories, name)

    def _real_root(self) -> str:
        # Resolved once, at the first use (the root may not exist before the first
        # upload): links in the root's own path are followed here, and only here.
        if self._resolved_root is None:
            self._resolved_root = os.path.realpath(self._root)
        return self._resolved_root

    def made_by(self, info: BlobInfo, token: str) -> bool:
        """Whether the object ``info`` describes was committed by a writer given
        ``token`` (its version's nanoseconds are the token's)."""
        return isinstance(info.version, int) and info.version % _NS == _nanos(token)

    def open_writer(self, key: str, *, token: str | None = None) -> FileSystemBlobWriter:
        """Start writing an object under ``key``; no I/O until the first write or commit.

        :param token: the writer's identity (hex digits), which the object's
            version carries (:meth:`made_by`); random when not given.
        :raises ValueError: ``key`` is absolute, has empty, ``.`` or ``..``
            segments, a backslash or a NUL (keys come from the key maker; this
            is a second line of defence).
        """
        directories, name = _split(key)
        return FileSystemBlobWriter(self, key, directories, name, token or secrets.token_hex(16))

    async def open_reader(
        self, key: str, start: int, end: int, *, version: Any = None
    ) -> AsyncIterator[bytes]:
        """Yield the bytes ``[start, end)`` of the object under ``key``, in pieces.

        Each piece is at most ``piece_size`` bytes.

        The file is opened first (so a missing key raises even for an empty
        range), without following any link, and its version compared with
        ``version`` (when given) on the opened descriptor; then it is read with
        ``pread`` from ``start``. If the file is shorter than ``end`` the
        generator simply stops at its end: the caller, which knows the size the
        catalogue recorded, detects the short read.

        :raises StoredObjectMissing: no file under ``key`` (a link is no file).
        :raises StoredObjectChanged: a file of another version is under ``key``.
        :raises StorageError: the file cannot be read (permissions, I/O error).
        :raises ValueError: ``start`` is negative or ``end`` is before ``start``.
        """
        directories, name = _split(key)
        if start < 0 or end < start:
            raise ValueError(f"bad byte range [{start}, {end}) for {key!r}")
        calls = _Calls("reader")
        opener = functools.partial(self._open_object, directories, name, version)
        try:
            fd = await self._retrying(functools.partial(calls.run, opener))
        except _Changed:
            raise self._changed(key) from None
        except OSError as exc:
            if exc.errno in _ABSENT or exc.errno == errno.EISDIR:
                raise self._missing(key, exc) from exc
            raise self._error(exc, "opening", key, self._path(key), reading=True) from exc
        try:
            position = start
            while position < end:
                read = functools.partial(
                    _pread_checked, fd, min(self.piece_size, end - position), position, version
                )
                try:
                    piece = await self._retrying(functools.partial(calls.run, read))
                except _Changed:
                    raise self._changed(key) from None
                except OSError as exc:
                    raise self._error(
                        exc, "reading", key, self._path(key), reading=True
                    ) from exc
                if not piece:
                    return  # shorter than `end`: the caller compares with the size it expects
                position += len(piece)
                yield piece
        finally:
            calls.when_idle(functools.partial(os.close, fd))

    async def stat(self, key: str) -> BlobInfo | None:
        """The file under ``key`` (size, modification time in UTC, version), or ``None``.

        A directory, a link or anything but a regular file under ``key`` is not
        an object: ``None``.

        :raises StorageError: the file cannot be examined (permissions, I/O error).
        """
        directories, name = _split(key)
        examine = functools.partial(self._stat, directories, name)
        try:
            st = await self._retrying(functools.partial(_in_thread, examine))
        except OSError as exc:
            raise self._error(exc, "examining", key, self._path(key), reading=True) from exc
        if st is None:
            return None
        return BlobInfo(key, st.st_size, _utc(st.st_mtime), st.st_mtime_ns)

    async def occupied(self, key: str, *, overwrite: bool = False) -> bool:
        """Whether something stands under ``key`` that a new object cannot be put
        in place of: anything (a file, a link, a directory, a FIFO; none of them
        can be linked over), or with ``overwrite`` a directory (a rename replaces
        anything else).

        :raises StorageError: the place cannot be examined.
        """
        directories, name = _split(key)
        examine = functools.partial(self._lstat, directories, name, overwrite)
        try:
            return await self._retrying(functools.partial(_in_thread, examine))
        except OSError as exc:
            raise self._error(exc, "examining", key, self._path(key), reading=True) from exc

    async def delete(self, key: str, *, version: Any = None) -> bool:
        """Delete the file under ``key`` (only if of ``version``, when given), then
        the directories it leaves empty.

        The file is examined and removed relative to its directory's descriptor,
        never through a link; a link, a directory or a file of another version
        under ``key`` is left alone. Directories are removed with ``rmdir``,
        which refuses a directory that is not empty, so one another writer has
        just put a file in stays; the root itself is never removed. A directory
        that cannot be removed (not empty, no permission, a mount point) is left,
        and holds no data.

        :returns: ``True`` if a file was removed.
        :raises StorageError: the file exists but cannot be removed.
        """
        directories, name = _split(key)
        remove = functools.partial(self._remove, directories, name, version, temp=False)
        try:
            return await self._retrying(functools.partial(_in_thread, remove))
        except OSError as exc:
            raise self._error(exc, "deleting", key, self._path(key)) from exc

    async def list(self) -> AsyncIterator[BlobInfo]:
        """Every file under the root, keys ``/``-separated, in no set order.

        Temp files of writers, links and other non-regular files are skipped;
        links to directories are never entered. The tree is walked with
        ``os.scandir`` on directory descriptors in a thread, ``1000`` entries per
        call, so memory holds one batch (and the descriptors of the directories
        on the current path), whatever the number of files. A missing root lists
        nothing.

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
        # A committing writer stamps its temp file with its version, up to a second
        # before now, just before linking it: read temp times as a second later.
        older_than -= datetime.timedelta(seconds=1)
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
        directories = directory.split("/") if directory else []
        remove = functools.partial(self._remove, directories, name, None, temp=True)
        try:
            return await _in_thread(remove)
        except OSError as exc:
            raise self._error(exc, "deleting the temp file", path, self._path(path)) from exc

    # --- walking under the root (in threads) ------------------------------------

    def _open_root(self, create: bool) -> int:
        try:
            return os.open(self._root, _ROOT)
        except FileNotFoundError:
            if not create:
                raise
        os.makedirs(self._root, self.dir_mode, exist_ok=True)
        return os.open(self._root, _ROOT)

    def _walk_to(self, directories: _Names, *, create: bool) -> _Fds:
        """Descriptors of the root and of each of ``directories`` below it, in order.

        Each directory is opened relative to its parent's descriptor with
        ``O_NOFOLLOW``: a link is refused (``ELOOP``), a file is ``ENOTDIR``. With
        ``create``, missing directories are made (and fsynced into their parent).
        The caller closes the descriptors (:func:`_close_all`).

        :raises OSError: ``ENOENT`` (missing, or pruned while walking), ``ENOTDIR``,
            ``ELOOP``, or what the system says.
        """
        fds = [self._open_root(create)]
        try:
            for depth, name in enumerate(directories):
                path = directories[: depth + 1]
                try:
                    fds.append(self._enter(fds[-1], name, create, path))
                except OSError as exc:
                    if exc.filename == name:  # relative to a descriptor: say where
                        exc.filename = os.path.join(self._root, *path)
                    raise
        except BaseException:
            _close_all(fds)
            raise
        return fds

    def _enter(self, parent: int, name: str, create: bool, path: _Names) -> int:
        try:
            return os.open(name, _DIRECTORY, dir_fd=parent)
        except FileNotFoundError:
            if not create:
                raise
        except NotADirectoryError:
            raise self._not_a_directory(parent, name, path) from None
        try:
            os.mkdir(name, self.dir_mode, dir_fd=parent)
        except FileExistsError:
            pass  # another writer made it meanwhile
        else:
            if self.fsync:
                _fsync_directory(parent)
        try:
            # A delete may prune it again before this open: ENOENT, and the caller
            # walks again.
            return os.open(name, _DIRECTORY, dir_fd=parent)
        except NotADirectoryError:
            raise self._not_a_directory(parent, name, path) from None

    def _not_a_directory(self, parent: int, name: str, path: _Names) -> OSError:
        """What stands where a directory is needed: a link (never followed), or a file."""
        where = os.path.join(self._root, *path)
        try:
            link = stat_module.S_ISLNK(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode)
        except OSError:
            link = False
        code = errno.ELOOP if link else errno.ENOTDIR
        return OSError(code, os.strerror(code), where)

    def _open_object(self, directories: _Names, name: str, version: Any) -> int:
        fds = self._walk_to(directories, create=False)
        try:
            fd = os.open(name, _READ, dir_fd=fds[-1])
        finally:
            _close_all(fds)
        try:
            st = os.fstat(fd)
            if not stat_module.S_ISREG(st.st_mode):
                raise IsADirectoryError(errno.EISDIR, "not a regular file", name)
            if version is not None and st.st_mtime_ns != version:
                raise _Changed
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _lstat_at(self, directories: _Names, name: str) -> os.stat_result | None:
        """What is at the key itself (a link is not followed), or ``None`` when
        nothing is. A link or a file where a directory of the key goes counts as
        nothing there: no variant of the name fits either, and a write says what
        stands in the way."""
        try:
            fds = self._walk_to(directories, create=False)
        except OSError as exc:
            if exc.errno in _ABSENT:
                return None
            raise
        try:
            return os.stat(name, dir_fd=fds[-1], follow_symlinks=False)
        except OSError as exc:
            if exc.errno in _ABSENT:
                return None
            raise
        finally:
            _close_all(fds)

    def _stat(self, directories: _Names, name: str) -> os.stat_result | None:
        st = self._lstat_at(directories, name)
        return st if st is not None and stat_module.S_ISREG(st.st_mode) else None

    def _lstat(self, directories: _Names, name: str, overwrite: bool) -> bool:
        st = self._lstat_at(directories, name)
        if st is None:
            return False
        return not overwrite or stat_module.S_ISDIR(st.st_mode)

    def _remove(self, directories: _Names, name: str, version: Any, *, temp: bool) -> bool:
        """Remove the regular file ``name`` (of ``version``), then prune; ``True`` if removed."""
        try:
            fds = self._walk_to(directories, create=False)
        except OSError as exc:
            if exc.errno in _ABSENT:
                return False
            raise
        try:
            try:
                st = os.stat(name, dir_fd=fds[-1], follow_symlinks=False)
            except OSError as exc:
                if exc.errno not in _ABSENT:
                    raise
                removed = False  # an earlier delete may have died before pruning
            else:
                mine = stat_module.S_ISREG(st.st_mode) and (
                    version is None or st.st_mtime_ns == version
                )
                removed = False
                if mine:
                    try:
                        os.unlink(name, dir_fd=fds[-1])
                        removed = True
                    except FileNotFoundError:
                        pass
            if removed or not temp:
                self._prune_walked(fds, directories)
            return removed
        finally:
            _close_all(fds)

    def _prune_walked(self, fds: _Fds, directories: _Names) -> None:
        """Remove the walked directories from the deepest up while they are empty.

        ``fds[i]`` is the parent of ``directories[i]``. ``rmdir`` by name in the
        parent never follows a link (a link there is ``ENOTDIR``: kept).
        """
        for depth in range(len(directories) - 1, -1, -1):
            try:
                os.rmdir(directories[depth], dir_fd=fds[depth])
            except FileNotFoundError:
                continue  # another delete removed it; its parent may be empty now
            except OSError as exc:
                if exc.errno in _KEEP_DIRECTORY:
                    return
                raise

    def _prune(self, directories: _Names) -> None:
        """Walk to ``directories`` as far as they exist and prune from there."""
        try:
            fds = [self._open_root(create=False)]
        except OSError as exc:
            if exc.errno in _ABSENT:
                return  # no root (or a file there): nothing to prune
            raise
        try:
            for name in directories:
                try:
                    fds.append(os.open(name, _DIRECTORY, dir_fd=fds[-1]))
                except OSError as exc:
                    if exc.errno in _ABSENT:
                        break
                    raise
            self._prune_walked(fds, directories[: len(fds) - 1])
        finally:
            _close_all(fds)

    # --- internals ------------------------------------------------------------

    async def _retrying(self, operation: Callable[[], Awaitable[T]]) -> T:
        """Await ``operation()``, again on transient errors as :attr:`retry` says."""
        if self.retry.attempts == 1:
            return await operation()  # the common case, without the retry's frames
        return await self.retry.call(operation, _is_transient)

    def _path(self, key: str) -> str:
        """The path ``key`` names, for messages (never opened as such)."""
        return os.path.join(self._root, *key.split("/"))

    async def _walk(self, *, temps: bool) -> AsyncIterator[BlobInfo]:
        walker = _Walker(self, temps=temps)
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

    def _changed(self, key: str) -> StoredObjectChanged:
        return StoredObjectChanged(
            f"{self.url}: the file under the key {key!r} is not the version its catalogue "
            "entry recorded (the key was reused, overwritten or restored since)",
            storage=self.url,
            key=key,
        )

    def _missing(self, key: str, exc: OSError) -> StorageError:
        if exc.errno == errno.ENOTDIR and exc.filename in (None, self._root):
            if os.path.exists(self._root) and not os.path.isdir(self._root):
                return self._error(exc, "reading", key, self._root, reading=True)
        what = "a link, which is never followed," if exc.errno == errno.ELOOP else "no file"
        return StoredObjectMissing(
            f"{self.url}: no stored object under the key {key!r} ({what} at "
            f"{exc.filename or self._path(key)})",
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
        if not os.path.isabs(where):
            # A name opened relative to the key's directory's descriptor.
            where = os.path.join(os.path.dirname(path), where)
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
        elif code == errno.ELOOP:
            advice = (
                f"a symbolic link stands at {where}, where the key needs a directory or a "
                "file; asyncassets never follows links under its storage root: replace the "
                "link with a real directory, or move it out of the root"
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


class _Walker:
    """Walks the tree on directory descriptors, a batch at a time (called in a thread).

    Only the descriptors of the directories on the current path are open: each
    subdirectory is opened relative to its parent with ``O_NOFOLLOW`` when the
    walk enters it, and closed when its entries are done.
    """

    def __init__(self, blobs: FileSystemBlobs, *, temps: bool) -> None:
        self._blobs = blobs
        self._temps = temps
        # (descriptor, its scandir iterator, the key prefix of its entries)
        self._stack: list[tuple[int, Any, str]] = []
        self._started = False

    def next_batch(self) -> list[BlobInfo]:
        """Up to ``_LIST_BATCH`` more entries; an empty list once the walk is over."""
        if not self._started:
            self._started = True
            try:
                root = self._blobs._open_root(create=False)
            except FileNotFoundError:
                return []  # a missing root holds nothing
            self._push(root, "")
        batch: list[BlobInfo] = []
        while len(batch) < _LIST_BATCH and self._stack:
            fd, entries, prefix = self._stack[-1]
            entry = next(entries, None)
            if entry is None:
                self._pop()
                continue
            if entry.is_dir(follow_symlinks=False):
                try:
                    child = os.open(entry.name, _DIRECTORY, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in _ABSENT:
                        continue  # pruned, or replaced by a link or a file since listed
                    raise
                self._push(child, f"{prefix}{entry.name}/")
                continue
            if not entry.is_file(follow_symlinks=False):
                continue  # links, sockets...: never written by a writer
            if (_TEMP_NAME.fullmatch(entry.name) is not None) != self._temps:
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # deleted since it was listed
            batch.append(
                BlobInfo(prefix + entry.name, st.st_size, _utc(st.st_mtime), st.st_mtime_ns)
            )
        return batch

    def _push(self, fd: int, prefix: str) -> None:
        try:
            entries = os.scandir(fd)
        except BaseException:
            os.close(fd)
            raise
        self._stack.append((fd, entries, prefix))

    def _pop(self) -> None:
        fd, entries, _ = self._stack.pop()
        entries.close()
        os.close(fd)

    def close(self) -> None:
        while self._stack:
            self._pop()


class FileSystemBlobWriter:
    """One object being written to a temp file; see :class:`FileSystemBlobs`.

    Bytes are gathered until ``write_buffer`` of them are pending, then written
    in one thread call with ``pwritev`` (large ``bytes`` are not copied meanwhile,
    they are referenced). :meth:`commit` writes the rest, sets the version,
    fsyncs, and links or renames the temp file into place. Any failure removes
    the temp file and raises :class:`~asyncassets.errors.StorageError`; the
    writer is then done.

    :ivar key: the key the object will be stored under.
    :ivar version: the committed object's version (``st_mtime_ns``), once committed.
    """

    def __init__(
        self, blobs: FileSystemBlobs, key: str, directories: list[str], name: str, token: str
    ) -> None:
        self.key = key
        self.version: int | None = None
        #: Always true after :meth:`abort`: every call on the file has returned.
        self.settled = True
        self._blobs = blobs
        self._directories = directories
        self._name = name
        self._token = token
        # Pending bytes: whole pieces kept by reference, small ones gathered in _small.
        self._segments: list[memoryview] = []
        self._small = bytearray()
        self._pending_size = 0
        self._position = 0  # bytes in the temp file
        # Set in worker threads; read only after the thread's call has returned.
        self._fd: int | None = None
        self._dir_fd: int | None = None
        self._temp: str | None = None
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

        :raises StorageError: the write failed (full disk, no permission, a link
            where the key needs a directory...); the temp file has been removed
            and the writer is done.
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
        """Write what is buffered, set the version, fsync, and put the file in place.

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
        await self._send(self._take_pending(), "writing")
        if self._state != "committing":  # aborted meanwhile by another task
            raise ValueError(f"the writer for {self.key!r} was aborted during commit")
        try:
            await self._calls.run(functools.partial(self._put_in_place, overwrite))
        except _KeyTakenError:
            self._state = "aborted"
            self._release_directory()
            raise KeyTaken(
                f"{self._blobs.url}: an object already exists under the key {self.key!r} "
                f"({self._blobs._path(self.key)}) and overwrite is off; it was left as it is",
                storage=self._blobs.url,
                key=self.key,
            ) from None
        except OSError as exc:
            # Even if the file is in place (only the directory's fsync failed), the
            # commit did not succeed: abort() removes it, as it is this writer's.
            error = self._blobs._error(exc, "committing", self.key, self._blobs._path(self.key))
            await self._fail(error)
            raise error from exc
        except BaseException:
            # Cancelled: the thread goes on; abort() waits for it and then knows.
            self._state = "failed"
            raise
        self._state = "committed"
        self._release_directory()

    async def abort(self) -> None:
        """Remove what this writer wrote; idempotent; a no-op once commit() returned.

        That is the temp file, or the object itself when a commit that raised or
        was cancelled had already put it in place (removed only if it is still of
        this writer's version). The removal runs to its end even if the caller is
        cancelled meanwhile (the cancelled caller waits for it, then sees its
        ``CancelledError``). It first waits for a write or commit still running in
        its thread.

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

    async def _send(self, pieces: list[memoryview], doing: str) -> None:
        start = self._position
        work = functools.partial(self._write_at, pieces, start)
        try:
            self._position = await self._blobs._retrying(functools.partial(self._calls.run, work))
        except OSError as exc:
            error = self._blobs._error(exc, doing, self.key, self._blobs._path(self.key))
            await self._fail(error)
            raise error from exc
        except BaseException:
            # Cancelled: how much reached the file is unknown; only abort() is left.
            self._state = "failed"
            raise

    def _write_at(self, pieces: list[memoryview], position: int) -> int:
        """In a thread: open the temp file if needed, write ``pieces`` at ``position``."""
        if self._fd is None:
            self._open_temp()
        assert self._fd is not None
        end = _pwrite_all(self._fd, pieces, position)
        if self._blobs.fsync and _start_writeback is not None and end > position:
            _start_writeback(self._fd, position, end - position)
        return end

    def _open_temp(self) -> None:
        """In a thread: walk to the key's directory (making it) and create the temp file.

        A delete may prune a directory between its ``mkdir`` and the temp file's
        creation: the walk is made again (up to ``_PRUNED_RETRIES`` times).
        """
        blobs = self._blobs
        for attempt in range(_PRUNED_RETRIES):
            try:
                fds = blobs._walk_to(self._directories, create=True)
            except FileNotFoundError:
                if attempt == _PRUNED_RETRIES - 1:
                    raise
                continue  # a directory was pruned while the walk made the next one
            temp = _temp_name(self._name)
            try:
                self._fd = os.open(temp, _CREATE, blobs.file_mode, dir_fd=fds[-1])
            except FileNotFoundError:
                _close_all(fds)
                if attempt == _PRUNED_RETRIES - 1:
                    raise
                continue
            except BaseException:
                _close_all(fds)
                raise
            self._dir_fd = fds.pop()
            _close_all(fds)
            self._temp = temp
            return

    def _put_in_place(self, overwrite: bool) -> None:
        """In a thread: version, fsync and close the temp file, link or rename it to
        the key, fsync the directory."""
        assert self._fd is not None and self._temp is not None and self._dir_fd is not None
        blobs = self._blobs
        fd, directory = self._fd, self._dir_fd
        st = os.fstat(fd)
        # The current second with the token's nanoseconds, never in the future: an
        # object looks at most a second older than it is (its reservation, not its
        # time, protects it from the sweep while its upload runs).
        now = time.time_ns()
        stamp = (now // _NS) * _NS + _nanos(self._token)
        if stamp > now:
            stamp -= _NS
        os.utime(fd, ns=(st.st_atime_ns, stamp))
        # What the filesystem kept (a coarse one rounds): the version readers compare.
        self.version = os.fstat(fd).st_mtime_ns
        if blobs.fsync:
            os.fsync(fd)
        self._fd = None
        os.close(fd)
        temp, final = self._temp, self._name
        if overwrite:
            os.rename(temp, final, src_dir_fd=directory, dst_dir_fd=directory)
            self._in_place = True
        else:
            if blobs._hard_links:
                try:
                    os.link(temp, final, src_dir_fd=directory, dst_dir_fd=directory,
                            follow_symlinks=False)
                except FileExistsError:
                    os.unlink(temp, dir_fd=directory)
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
                    reserved = os.open(final, _CREATE, blobs.file_mode, dir_fd=directory)
                except FileExistsError:
                    os.unlink(temp, dir_fd=directory)
                    self._temp = None
                    raise _KeyTakenError from None
                os.close(reserved)
                os.rename(temp, final, src_dir_fd=directory, dst_dir_fd=directory)
                self._in_place = True
            else:
                os.unlink(temp, dir_fd=directory)
        self._temp = None
        if blobs.fsync:
            _fsync_directory(directory)

    def _release_directory(self) -> None:
        directory, self._dir_fd = self._dir_fd, None
        if directory is not None:
            self._calls.when_idle(functools.partial(os.close, directory))

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
            # A commit that did not return: the object is this writer's to remove.
            self._release_directory()
            self._in_place = False
            self._state = "aborted"
            await self._blobs.delete(self.key, version=self.version)
            return
        fd, temp, directory = self._fd, self._temp, self._dir_fd
        self._fd = self._temp = self._dir_fd = None
        if fd is None and temp is None and directory is None:
            return
        try:
            await _in_thread(functools.partial(self._close_and_remove, fd, temp, directory))
        except OSError as exc:
            raise self._blobs._error(
                exc, "removing the temp file of", self.key, self._blobs._path(self.key)
            ) from exc

    def _close_and_remove(self, fd: int | None, temp: str | None, directory: int | None) -> None:
        """In a thread: close and remove the temp file, and the directories it leaves empty."""
        try:
            if fd is not None:
                os.close(fd)
            if temp is not None and directory is not None:
                try:
                    os.unlink(temp, dir_fd=directory)
                except FileNotFoundError:
                    pass
        finally:
            if directory is not None:
                os.close(directory)
        if temp is not None:
            self._blobs._prune(self._directories)


def resumable_temp_name(final_name: str, token: str) -> str:
    """The temp file of a resumable upload whose key ends in ``final_name``: named
    by the upload's ``token`` (hex), so any process finds it again."""
    return f".{final_name[:_TEMP_STEM]}.{token[:16]}.part"


class ResumableFileWriter(FileSystemBlobWriter):
    """The temp file of a resumable upload, written at offsets over many requests
    and processes, and put in place once complete.

    Unlike a :class:`FileSystemBlobWriter`, its temp file is named by the upload's
    ``token`` (:func:`resumable_temp_name`), is opened again where an earlier
    writer left it, and outlives a failure: a write that fails or is cancelled
    only closes the file. :meth:`sync` makes what was written durable, so the
    caller can record the offset after it. :meth:`commit` puts the file in place
    as a writer's commit does (version, fsync, link), once its size is the
    upload's length.

    :param position: where the next write goes (the upload's durable offset); a
        temp file holding fewer bytes lost some (:class:`~asyncassets.errors.StoredObjectMissing`).
    :param create: make the temp file when it is not there (the first write);
        otherwise its absence means the upload lost its bytes
        (:class:`~asyncassets.errors.StoredObjectMissing`).
    :param hasher: a :mod:`hashlib` object fed every byte written, in a thread
        beside the write (it is consistent once :meth:`sync` has returned).
    """

    def __init__(
        self,
        blobs: FileSystemBlobs,
        key: str,
        token: str,
        *,
        position: int,
        create: bool,
        hasher: Any = None,
    ) -> None:
        directories, name = _split(key)
        super().__init__(blobs, key, directories, name, token)
        self._position = position
        self._create = create
        self._hasher = hasher

    async def _send(self, pieces: list[memoryview], doing: str) -> None:
        # The running hash (``hasher``), if any, is fed in a thread beside the
        # write: hashlib releases the GIL on large buffers, so both run at once.
        if self._hasher is None or not pieces:
            await super()._send(pieces, doing)
            return
        hashing = asyncio.ensure_future(asyncio.to_thread(hash_views, self._hasher, pieces))
        try:
            await super()._send(pieces, doing)
        finally:
            await asyncio.wait([hashing])
        hashing.result()

    @property
    def temp_path(self) -> str:
        """The temp file's path relative to the root (as the sweep lists it)."""
        return "/".join([*self._directories, resumable_temp_name(self._name, self._token)])

    async def sync(self) -> int:
        """Write what is buffered and fsync it; return the bytes now durable in the file
        (the position the next write starts at)."""
        self._check_writing("sync")
        await self._send(self._take_pending(), "writing")
        if self._blobs.fsync and self._fd is not None:
            fd = self._fd
            try:
                await self._calls.run(functools.partial(os.fdatasync, fd))
            except OSError as exc:
                error = self._blobs._error(exc, "syncing", self.key, self._blobs._path(self.key))
                await self._fail(error)
                raise error from exc
        return self._position

    async def commit(self, *, overwrite: bool = False, length: int | None = None) -> None:
        """Put the temp file in place under the key (see :meth:`FileSystemBlobWriter.commit`).

        :param length: the size the file must have; a file of another size (cut
            short or grown by someone else) raises
            :class:`~asyncassets.errors.StoredObjectChanged`, and stays.
        """
        if length is not None:
            await self._send([], "opening")
            assert self._fd is not None
            size = (await self._calls.run(functools.partial(os.fstat, self._fd))).st_size
            if size != length:
                raise StoredObjectChanged(
                    f"{self._blobs.url}: the upload's temp file {self.temp_path!r} holds "
                    f"{size} bytes, not {length}; start a new upload",
                    storage=self._blobs.url,
                    key=self.key,
                )
        await super().commit(overwrite=overwrite)

    def _put_in_place(self, overwrite: bool) -> None:
        """In a thread: as a writer's, once the file is known to be the upload's temp
        file still: under its temp name, and under no other name. A finish that
        stalled past its lease while another finished the upload holds the inode
        that is the object now (linked under the key, its temp name gone): it must
        not stamp a version on it, nor link or remove anything."""
        assert self._fd is not None and self._temp is not None and self._dir_fd is not None
        st = os.fstat(self._fd)
        try:
            named = os.stat(self._temp, dir_fd=self._dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            named = None
        if named is None or (named.st_dev, named.st_ino) != (st.st_dev, st.st_ino) or (
            st.st_nlink != 1
        ):
            self._temp = None  # not this writer's to remove
            raise self._lost()
        super()._put_in_place(overwrite)

    async def read_head(self, size: int) -> bytes:
        """The first ``size`` bytes of the temp file (fewer if it holds fewer)."""
        await self._send([], "opening")
        assert self._fd is not None
        return await self._calls.run(functools.partial(os.pread, self._fd, size, 0))

    async def sha256(self, length: int) -> str:
        """The SHA-256 of the first ``length`` bytes, read back in a thread."""
        await self._send([], "opening")
        assert self._fd is not None
        return await self._calls.run(functools.partial(_hash_file, self._fd, length))

    async def abort(self) -> None:
        """Close the temp file, keeping it (it holds the upload's durable bytes);
        :meth:`discard` removes it."""
        if self._state != "committed":
            self._state = "failed"
        self._calls.when_idle(self._close_descriptors)
        await self._calls.wait()

    async def discard(self) -> bool:
        """Close and remove the temp file; ``True`` if it was there."""
        await self.abort()
        remove = functools.partial(
            self._blobs._remove, self._directories,
            resumable_temp_name(self._name, self._token), None, temp=True,
        )
        try:
            return await _in_thread(remove)
        except OSError as exc:
            raise self._blobs._error(exc, "deleting the temp file", self.temp_path,
                                     self._blobs._path(self.temp_path)) from exc

    async def _fail(self, error: StorageError) -> None:
        await self.abort()

    def _close_descriptors(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
        self._release_directory()

    def _open_temp(self) -> None:
        """In a thread: walk to the key's directory (making it on the first write) and
        open the upload's temp file there (making it on the first write)."""
        blobs = self._blobs
        temp = resumable_temp_name(self._name, self._token)
        flags = os.O_RDWR | _NOFOLLOW | _CLOEXEC | (os.O_CREAT if self._create else 0)
        for attempt in range(_PRUNED_RETRIES):
            try:
                fds = blobs._walk_to(self._directories, create=self._create)
            except FileNotFoundError:
                if self._create and attempt < _PRUNED_RETRIES - 1:
                    continue
                raise self._lost() from None
            try:
                fd = os.open(temp, flags, blobs.file_mode, dir_fd=fds[-1])
            except FileNotFoundError:
                _close_all(fds)
                if self._create and attempt < _PRUNED_RETRIES - 1:
                    continue
                raise self._lost() from None
            except BaseException:
                _close_all(fds)
                raise
            st = os.fstat(fd)
            if not stat_module.S_ISREG(st.st_mode) or st.st_size < self._position:
                # Not a file, or cut short below the durable offset (by hand, a
                # repaired disk): writing on would leave a hole of zeros in it.
                os.close(fd)
                _close_all(fds)
                raise self._lost()
            self._fd = fd
            self._dir_fd = fds.pop()
            _close_all(fds)
            self._temp = temp
            return

    def _lost(self) -> StoredObjectMissing:
        return StoredObjectMissing(
            f"{self._blobs.url}: the upload's temp file {self.temp_path!r} is gone or "
            "lost bytes (removed or cut short by hand, or removed by a sweep); start "
            "a new upload",
            storage=self._blobs.url,
            key=self.key,
        )


def _hash_file(fd: int, length: int) -> str:
    hasher = hashlib.sha256()
    position = 0
    while position < length:
        piece = os.pread(fd, min(8 * 1024 * 1024, length - position), position)
        if not piece:
            break
        hasher.update(piece)
        position += len(piece)
    return hasher.hexdigest()
