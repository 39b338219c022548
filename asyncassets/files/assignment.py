"""Data assigned to a file field: ``doc.photo = data`` uploads on ``save()``.

Assigning bytes, a file object (``open(path, "rb")``), an async file object
(FastAPI's ``UploadFile``) or an async iterable of bytes records a
:class:`PendingData` on the field's proxy; nothing is read or uploaded then (no
I/O in an assignment). ``await doc.save()`` uploads it through the field's rules
and references it (see :mod:`asyncassets.references`). Until then the proxy
answers ``filename``, ``content_type`` and, for bytes, ``length`` from what was
assigned; reading the bytes raises :class:`~asyncassets.errors.FileNotSaved`.
"""

from __future__ import annotations

import inspect
import posixpath
from typing import Any

from ..errors import UploadClosed

__all__ = ["PendingData", "is_data"]


def is_data(value: Any) -> bool:
    """Whether ``value`` is data to upload (rather than a file id or a proxy).

    Bytes-like objects, objects with a ``read`` method (file objects, sync or
    async) and async iterables. ``str`` is never data: it is a file id.
    """
    if isinstance(value, (bytes, bytearray, memoryview)):
        return True
    if isinstance(value, str):
        return False
    return callable(getattr(value, "read", None)) or hasattr(value, "__aiter__")


def _name_of(value: Any) -> str | None:
    # UploadFile.filename: as given, "" included (a form's empty file part), for
    # the field's rules to judge as put(filename=...) would. A file object's name
    # is its path (an int for a descriptor): its last segment, if any.
    filename = getattr(value, "filename", None)
    if isinstance(filename, str):
        return posixpath.basename(filename.replace("\\", "/"))
    name = getattr(value, "name", None)
    if isinstance(name, bytes):
        name = name.decode("utf-8", "replace")
    if isinstance(name, str) and name:
        return posixpath.basename(name.replace("\\", "/")) or None
    return None


class PendingData:
    """What was assigned to a file field and is uploaded by the next ``save()``.

    :ivar data: the object assigned (kept as given; read only by ``save()``).
    :ivar filename: its ``filename`` or ``name`` (the last path segment), if any.
    :ivar content_type: its ``content_type`` (an ``UploadFile``'s), if any; else
        the upload guesses it from the name or sniffs it, as ``put()`` does.
    :ivar length: the size of bytes-like data; ``None`` for a stream.
    """

    __slots__ = ("_start", "_used", "content_type", "data", "filename", "length")

    def __init__(self, data: Any) -> None:
        self.data = data
        self.filename = _name_of(data)
        content_type = getattr(data, "content_type", None)
        self.content_type = content_type if isinstance(content_type, str) else None
        self.length: int | None = None
        if isinstance(data, (bytes, bytearray)):
            self.length = len(data)
        elif isinstance(data, memoryview):
            self.length = data.nbytes
        #: Where a seekable file object was when assigned: a retried save reads from there.
        self._start: int | None = None
        tell = getattr(data, "tell", None)
        if callable(tell) and not inspect.iscoroutinefunction(tell):
            try:
                position = tell()
            except (OSError, ValueError):
                position = None
            if isinstance(position, int):
                self._start = position
        elif callable(getattr(data, "seek", None)):
            self._start = 0  # an async file (UploadFile): as received, from its start
        self._used = False

    async def source(self, field_name: str, read: set[int] | None = None) -> Any:
        """The data to upload; rewound first when it was read before.

        A stream is read before by a failed save (the retry), or, in one save, by
        another field it was assigned to as well (``a.photo = f; a.scan = f``):
        both store all of it, not the second an empty rest.

        :param read: ids of the streams this save has read already; this one is
            added.
        :raises UploadClosed: the data is a stream read before that cannot be
            rewound: assign it again.
        """
        data = self.data
        if isinstance(data, (bytes, bytearray, memoryview)):
            return data
        again = self._used or (read is not None and id(data) in read)
        self._used = True
        if read is not None:
            read.add(id(data))
        if not again:
            return data
        seek = getattr(data, "seek", None)
        if self._start is not None and callable(seek):
            try:
                done = seek(self._start)
                if inspect.isawaitable(done):
                    await done
            except (OSError, ValueError) as exc:
                raise self._spent(field_name) from exc
            return data
        raise self._spent(field_name)

    @staticmethod
    def _spent(field_name: str) -> UploadClosed:
        return UploadClosed(
            f"{field_name}: the data assigned to it is a stream that was read already "
            "(by a failed save(), or for another field of this save), and it cannot "
            f"be rewound. Assign the data again (`doc.{field_name} = ...`; a new "
            "stream for each field), then save()."
        )
