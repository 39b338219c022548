"""A chunk document whose bytes are copied out of the caller's buffer only when sent.

An upload cuts what it is given into chunk documents and inserts them in batches.
Cutting a ``bytes`` object into ``bytes`` chunks copies it (BSON encodes only
``bytes``, never a ``memoryview``), and an upload waiting for a pooled connection
held those copies all along: with 500 concurrent 1 MiB uploads on a client of 100
connections, 400 uploads each held a 1 MiB copy of their file while they waited,
and the client grew by about 1 MiB per upload in flight (issue #22's 492 MiB,
raw PyMongo's GridFS 227 MiB). Measured with ``tracemalloc``: 197 of 206 MiB
traced at the peak of 200 such uploads were those copies.

A :class:`LazyChunk` keeps a ``memoryview`` of a buffer that cannot change (a
``bytes`` object) and hands PyMongo a ``bytes`` copy of it only when PyMongo
encodes the insert, after it has a connection; the copy is dropped as soon as it
is encoded. A waiting upload then holds nothing but a view of the caller's bytes.
A buffer that can change (``bytearray``, a writable ``memoryview``) is still
copied at ``write()``, as the caller may reuse it once ``write()`` returns.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from typing import Any

__all__ = ["LazyChunk", "is_immutable"]


def is_immutable(data: bytes | memoryview) -> bool:
    """Whether ``data``'s bytes can never change: ``bytes``, or a read-only view of one."""
    if type(data) is bytes:
        return True
    return isinstance(data, memoryview) and data.readonly and type(data.obj) is bytes


class LazyChunk(MutableMapping[str, Any]):
    """``{"_id": ..., "files_id": ..., "n": ..., "data": bytes}``, ``data`` made on reading.

    The mapping PyMongo's ``insert_many`` needs: it sets ``_id`` and reads the rest
    when it encodes the batch (again if it retries). ``piece`` must be a view of
    bytes that cannot change (see :func:`is_immutable`).
    """

    __slots__ = ("_id", "files_id", "n", "piece")

    def __init__(self, files_id: Any, n: int, piece: memoryview) -> None:
        self.files_id = files_id
        self.n = n
        self.piece = piece
        self._id: Any = None

    def __getitem__(self, key: str) -> Any:
        if key == "data":
            return bytes(self.piece)
        if key == "files_id":
            return self.files_id
        if key == "n":
            return self.n
        if key == "_id" and self._id is not None:
            return self._id
        raise KeyError(key)

    def __setitem__(self, key: str, value: Any) -> None:
        if key != "_id":
            raise KeyError(f"a chunk document takes only an _id, not {key!r}")
        self._id = value

    def __delitem__(self, key: str) -> None:
        if key != "_id" or self._id is None:
            raise KeyError(key)
        self._id = None

    def __iter__(self) -> Iterator[str]:
        if self._id is not None:
            yield "_id"
        yield from ("files_id", "n", "data")

    def __len__(self) -> int:
        return 3 if self._id is None else 4

    def __repr__(self) -> str:
        return f"<LazyChunk files_id={self.files_id!r} n={self.n} {len(self.piece)} bytes>"
