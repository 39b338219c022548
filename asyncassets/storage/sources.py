"""Reading what users upload: bytes, file objects (sync or async), iterables of bytes.

Every storage takes the same sources; this module turns any of them into an async
iterator of byte pieces, validating the kind before the first byte is read.
"""

from __future__ import annotations

import inspect
import io
from collections.abc import AsyncGenerator, Mapping
from typing import Any

__all__ = ["ACCEPTED_SOURCES", "byte_view", "check_size", "read_source"]

ACCEPTED_SOURCES = (
    "bytes, bytearray or memoryview; a binary file object whose read(n) returns bytes "
    "(read may be a coroutine); or an iterable or async iterable of bytes pieces"
)


def check_size(name: str, value: Any) -> int:
    """Return ``value``, a size in bytes (``chunk_size``, ``buffer_size``...).

    :raises TypeError: ``value`` is not an ``int`` (``bool`` included).
    :raises ValueError: ``value`` is not positive.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return value


def byte_view(data: Any, what: str) -> bytes | memoryview:
    """Return ``data`` as ``bytes`` or a flat ``memoryview`` of format ``"B"``.

    Buffers whose items are wider than a byte (``array("d")``, a cast
    ``memoryview``, numpy arrays) are cast to bytes, so ``len()`` of the result
    counts bytes, not items; a non-contiguous buffer is copied into ``bytes``.

    :raises TypeError: ``data`` is ``str`` or does not support the buffer protocol.
    """
    if type(data) is bytes:
        return data
    if isinstance(data, str):
        raise TypeError(
            f"{what} must be bytes, not str: encode the text first "
            "(text.encode('utf-8')), or pass encoding= where the API offers it"
        )
    try:
        view = memoryview(data)
    except TypeError:
        raise TypeError(
            f"{what} must be bytes-like (bytes, bytearray, memoryview), not {type(data).__name__}"
        ) from None
    if not view.c_contiguous:
        return view.tobytes()  # hashing and inserting need contiguous memory
    if view.ndim != 1 or view.format != "B":
        view = view.cast("B")
    return view


async def read_source(source: Any, piece_size: int) -> AsyncGenerator[bytes | memoryview, None]:
    """Yield ``source``'s bytes in pieces; validate its kind before the first yield.

    Every piece is ``bytes`` or a flat byte ``memoryview`` (see :func:`byte_view`),
    so ``len(piece)`` is its size in bytes whatever the source's item size.

    :raises TypeError: ``source`` is ``None``, ``str``, a text-mode file, of no
        accepted kind, or yields something other than bytes-like pieces.
    :raises ValueError: ``source`` is a closed file.
    """
    if source is None:
        raise TypeError(f"upload() needs a source, got None; pass {ACCEPTED_SOURCES}")
    if isinstance(source, str):
        raise TypeError(
            "upload() takes bytes, not str: encode the text first (text.encode('utf-8')), "
            "or pass encoding= where the API offers it"
        )
    if isinstance(source, (bytes, bytearray, memoryview)):
        yield byte_view(source, "upload() data")
        return
    read = getattr(source, "read", None)
    if callable(read):
        if isinstance(source, io.TextIOBase):
            raise _text_mode_error(source)
        if getattr(source, "closed", False) is True:
            raise _closed_error(source)
        while True:
            try:
                piece = read(piece_size)
                if inspect.isawaitable(piece):
                    piece = await piece
            except ValueError as exc:
                if getattr(source, "closed", False) is True:
                    raise _closed_error(source) from exc
                raise
            if isinstance(piece, str):
                raise _text_mode_error(source)
            if piece is None:
                raise TypeError(
                    f"{type(source).__name__}.read() returned None: it is a non-blocking "
                    "file with no data ready; pass a blocking binary file or an async one"
                )
            if not piece:
                return
            yield byte_view(piece, f"{type(source).__name__}.read()")
        return
    try:
        memoryview(source)
    except TypeError:
        pass
    else:
        # Any other buffer (array.array, numpy...), cast to bytes like the rest.
        yield byte_view(source, "upload() data")
        return
    if hasattr(source, "__aiter__"):
        async for piece in source:
            yield _piece(piece, source)
    elif hasattr(source, "__iter__") and not isinstance(source, Mapping):
        for piece in source:
            yield _piece(piece, source)
    else:
        raise TypeError(
            f"upload() cannot read from {type(source).__name__}; pass {ACCEPTED_SOURCES}"
        )


def _piece(piece: Any, source: Any) -> bytes | memoryview:
    return byte_view(piece, f"each piece of the {type(source).__name__} source")


def _source_name(source: Any) -> str:
    name = getattr(source, "name", None)
    return f"{type(source).__name__} {name!r}" if isinstance(name, str) else type(source).__name__


def _text_mode_error(source: Any) -> TypeError:
    return TypeError(
        f"the source {_source_name(source)} is open in text mode (read() returns str): "
        "open it in binary mode ('rb')"
    )


def _closed_error(source: Any) -> ValueError:
    return ValueError(
        f"the source {_source_name(source)} is closed: open it again (in binary mode) "
        "before uploading"
    )


def hash_views(hasher: Any, views: list[memoryview]) -> None:
    """Feed ``views`` to ``hasher`` in order (run in a thread: hashlib releases the
    GIL on large buffers, so the hash runs beside the write of the same bytes)."""
    for view in views:
        hasher.update(view)
