"""What a ``FileField`` accepts: size, content type, extension, file name; compression.

The field's options are gathered in :class:`UploadRules`; every upload (``put``,
``replace``, ``add_file`` and streamed ``new_file``/``write``/``close``) runs
through an :class:`UploadGuard` built from them::

    class Animal(Document):
        photo = FileField(
            max_size=5 * 1024 * 1024,
            allowed_content_types=["image/*"],
            allowed_extensions=["jpg", "jpeg", "png"],
            filename_template="animals/{date:%Y/%m}/{uuid}{ext}",
        )
"""

from __future__ import annotations

import datetime as dt
import hashlib
import posixpath
import uuid
from collections.abc import AsyncIterator, Iterable
from typing import Any

from .._tasks import spawn
from ..errors import FileValidationError
from ..storage.codec import CODECS, compressor
from ..storage.sources import byte_view, read_source
from .names import MAX_FILENAME_BYTES, FilenameTemplate, has_extension, sanitize_filename
from .sniffing import HEAD_SIZE, content_type_matches, guess_content_type, sniff_content_type

__all__ = [
    "COMPRESSED_TYPES",
    "UploadGuard",
    "UploadRules",
    "guarded_close",
    "guarded_upload",
    "guarded_write",
    "make_guard",
]

#: Content types that gzip cannot shrink: a ``compress="gzip"`` field stores them
#: as they are (and records no compression), which saves CPU on both ends.
COMPRESSED_TYPES = (
    "image/png",
    "image/jpeg",
    "image/gif",
    "image/webp",
    "image/avif",
    "image/heic",
    "audio/mpeg",
    "audio/ogg",
    "audio/flac",
    "audio/mp4",
    "video/*",
    "application/zip",
    "application/gzip",
    "application/x-7z-compressed",
    "application/vnd.rar",
    "application/x-bzip2",
    "application/x-xz",
    "application/zstd",
    "application/vnd.openxmlformats-officedocument.*",
    "application/vnd.oasis.opendocument.*",
)



class UploadRules:
    """A field's upload options, checked once when the field is declared.

    :param max_size: largest file accepted, in bytes (of the original bytes, before
        compression).
    :param allowed_content_types: accepted MIME types; ``*`` wildcards allowed
        (``"image/*"``).
    :param allowed_extensions: accepted file name endings, case-insensitive, with or
        without the dot (``"jpg"``, ``".tar.gz"``). A file name is then required.
    :param filename_template: builds the stored name, like Django's ``upload_to``:
        a ``str.format`` template with ``{filename}`` (the sanitised original name),
        ``{stem}``, ``{ext}`` (with its dot, lower case), ``{date}`` (UTC datetime,
        so ``{date:%Y/%m}`` works), ``{uuid}`` (32 hex digits), ``{doc}`` (the
        document) and ``{field}``; or a callable ``(document, filename) -> str``.
    :param compress: ``"gzip"`` to store files compressed (see :doc:`/validation`).
    :raises TypeError, ValueError: an option has the wrong type or value.
    """

    def __init__(
        self,
        *,
        max_size: int | None = None,
        allowed_content_types: Iterable[str] | None = None,
        allowed_extensions: Iterable[str] | None = None,
        filename_template: FilenameTemplate | None = None,
        compress: str | None = None,
    ) -> None:
        if max_size is not None and (
            isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 0
        ):
            raise ValueError(f"FileField(max_size=...) must be an int >= 0, not {max_size!r}")
        self.max_size = max_size
        self.allowed_content_types = _strings("allowed_content_types", allowed_content_types)
        exts = _strings("allowed_extensions", allowed_extensions)
        self.allowed_extensions = (
            None if exts is None else tuple(e.lower().lstrip(".") for e in exts)
        )
        if filename_template is not None and not (
            isinstance(filename_template, str) or callable(filename_template)
        ):
            raise TypeError(
                "FileField(filename_template=...) takes a format string or a callable "
                f"(document, filename) -> str, not {type(filename_template).__name__}"
            )
        self.filename_template = filename_template
        if compress is not None and compress not in CODECS:
            raise ValueError(
                f"FileField(compress=...) supports {', '.join(map(repr, CODECS))}, "
                f"not {compress!r}"
            )
        self.compress = compress

    @property
    def active(self) -> bool:
        """Whether any option is set (uploads without options skip the guard)."""
        return any(
            v is not None
            for v in (
                self.max_size,
                self.allowed_content_types,
                self.allowed_extensions,
                self.filename_template,
                self.compress,
            )
        )


def _strings(option: str, values: Iterable[str] | None) -> tuple[str, ...] | None:
    if values is None:
        return None
    if isinstance(values, str):
        raise TypeError(f"FileField({option}=...) takes a list of strings, not one string")
    out = tuple(values)
    if not out or not all(isinstance(v, str) and v for v in out):
        raise ValueError(f"FileField({option}=...) must be a non-empty list of strings")
    return out


class UploadGuard:
    """Checks and transforms one upload; built by the proxy for every upload.

    Construction checks the file name, the extension and a declared (or
    name-guessed) content type, before any I/O. :meth:`feed` takes each piece of
    the original bytes, counts it against ``max_size``, sniffs the head, and
    returns the bytes to store (compressed when the field says so); :meth:`finish`
    returns the last stored bytes and completes :attr:`metadata`.

    :ivar filename: the name to store (sanitised, templated), or ``None``.
    :ivar metadata: the ``metadata`` sub-document to store.
    """

    def __init__(
        self,
        rules: UploadRules,
        *,
        field_name: str,
        instance: Any,
        content_type: str | None,
        filename: str | None,
        metadata: dict[str, Any],
    ) -> None:
        self.rules = rules
        self.field_name = field_name
        self.size = 0
        self.failed: FileValidationError | None = None
        self._head = bytearray()
        self._head_checked = False
        self._declared = content_type is not None
        original = self._clean_name(filename)
        if rules.allowed_extensions is not None:
            if original is None:
                self._fail(
                    f"a file name is required to check its extension (allowed: "
                    f"{self._list(rules.allowed_extensions)}); pass filename=..."
                )
            elif not has_extension(original, rules.allowed_extensions):
                self._fail(
                    f"the file name {original!r} does not end with an allowed extension "
                    f"({self._list(rules.allowed_extensions)})"
                )
        if content_type is None and original is not None:
            content_type = guess_content_type(original)
        self.content_type = content_type
        if content_type is not None:
            self._check_type(content_type, "declared" if self._declared else "guessed")
        self.filename = self._build_name(original, instance)
        self.metadata = dict(metadata)
        if content_type is not None:
            self.metadata["content_type"] = content_type
        self._compressor: Any = None
        self._original_sha256: Any = None
        self._compression: dict[str, Any] | None = None
        if rules.compress and not content_type_matches(content_type, COMPRESSED_TYPES):
            self._start_compression()

    # -- checks -----------------------------------------------------------------

    def _fail(self, problem: str, **attrs: Any) -> None:
        exc = FileValidationError(f"{self.field_name}: {problem}", field_name=self.field_name)
        for key, value in attrs.items():
            setattr(exc, key, value)
        self.failed = exc
        raise exc

    @staticmethod
    def _list(values: Iterable[str]) -> str:
        return ", ".join(values)

    def _clean_name(self, filename: str | None) -> str | None:
        if filename is None:
            return None
        try:
            return sanitize_filename(filename)
        except (TypeError, ValueError) as exc:
            self._fail(f"file name {filename!r} refused: {exc}")
            raise  # unreachable: _fail raises

    def _check_type(self, content_type: str, how: str) -> None:
        allowed = self.rules.allowed_content_types
        if allowed is not None and not content_type_matches(content_type, allowed):
            self._fail(
                f"content type {content_type!r} ({how}) is not allowed; allowed: "
                f"{self._list(allowed)}",
                content_type=content_type,
            )

    def _build_name(self, original: str | None, instance: Any) -> str | None:
        template = self.rules.filename_template
        if template is None:
            return original
        name = original or ""
        if callable(template):
            built = template(instance, name)
        else:
            stem, ext = posixpath.splitext(name)
            built = template.format(
                filename=name,
                stem=stem,
                ext=ext.lower(),
                date=dt.datetime.now(dt.timezone.utc),
                uuid=uuid.uuid4().hex,
                doc=instance,
                field=self.field_name,
            )
        if not isinstance(built, str):
            raise TypeError(
                f"{self.field_name}: filename_template returned {type(built).__name__}, not str"
            )
        # The template may build directories on purpose; it may not climb out of them.
        parts = [
            sanitize_filename(p)
            for p in built.replace("\\", "/").split("/")
            if p.strip().strip(".").strip()
        ]
        if not parts:
            self._fail(f"filename_template built an empty name from {original!r}")
        return "/".join(parts)[: MAX_FILENAME_BYTES * 4]

    @property
    def needs_head(self) -> bool:
        """Whether the first bytes must be seen before the metadata is final."""
        return self.content_type is None

    def check_head(self, head: bytes) -> None:
        """Sniff and check the first bytes; call once, before anything is stored.

        With no content type known yet, the sniffed one becomes the file's. With
        ``allowed_content_types``, a recognised type must be allowed too, whatever
        was declared (text is recognised but never contradicts a declared type).
        """
        self._head_checked = True
        sniffed = sniff_content_type(head)
        if self.content_type is None:
            self.content_type = sniffed
            if sniffed is not None:
                self.metadata["content_type"] = sniffed
                self._check_type(sniffed, "sniffed from its first bytes")
            elif self.rules.allowed_content_types is not None:
                self._fail(
                    "the content type could not be told from the file name or the first "
                    f"bytes; allowed: {self._list(self.rules.allowed_content_types)}. "
                    "Pass content_type=..."
                )
        elif sniffed not in (None, "text/plain") and not content_type_matches(
            sniffed, [self.content_type]
        ):
            self._check_type(sniffed, f"sniffed, though {self.content_type!r} was given")
        if (
            self._compressor is not None
            and self.size == 0
            and content_type_matches(self.content_type, COMPRESSED_TYPES)
        ):
            self._stop_compression()

    # -- the bytes ----------------------------------------------------------------

    def feed(self, data: bytes | bytearray | memoryview) -> bytes | bytearray | memoryview:
        """Account for the next piece of original bytes; return the bytes to store.

        :raises FileValidationError: the file is now over ``max_size``, or its first
            bytes show a type that is not allowed.
        """
        if self.failed is not None:
            raise self.failed
        data = byte_view(data, "file data")  # len() in bytes, whatever the item size
        size = len(data)
        if not size:
            return data
        self.size += size
        limit = self.rules.max_size
        if limit is not None and self.size > limit:
            self._fail(
                f"the file is over max_size={limit} bytes: {self.size} bytes seen so far "
                "(the upload was stopped and its chunks removed)",
                limit=limit,
                size=self.size,
            )
        if not self._head_checked:
            self._head += data[: HEAD_SIZE - len(self._head)]
            if len(self._head) >= HEAD_SIZE:
                self.check_head(bytes(self._head))
        if self._compressor is None:
            return data
        self._original_sha256.update(data)
        return self._compressor.compress(data)

    def finish(self) -> bytes:
        """Return the last bytes to store and complete :attr:`metadata`.

        :raises FileValidationError: the first bytes (of a file shorter than
            :data:`HEAD_SIZE`) show a type that is not allowed.
        """
        if self.failed is not None:
            raise self.failed
        if not self._head_checked:
            self.check_head(bytes(self._head))
        if self._compressor is None:
            return b""
        tail = self._compressor.flush()
        assert self._compression is not None
        self._compression["length"] = self.size
        self._compression["sha256"] = self._original_sha256.hexdigest()
        return tail

    def _start_compression(self) -> None:
        # wbits=31: a gzip member, so `gunzip` reads the chunks joined together.
        self._compressor = compressor()
        self._original_sha256 = hashlib.sha256()
        # Filled by finish(); the bucket copies the metadata shallowly, so the files
        # document it inserts at close() holds the final values.
        self._compression = {"codec": "gzip"}
        self.metadata["compression"] = self._compression

    def _stop_compression(self) -> None:
        self._compressor = None
        self._original_sha256 = None
        self._compression = None
        self.metadata.pop("compression", None)

    # -- sources ------------------------------------------------------------------

    async def wrap(self, pieces: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """Read ahead up to :data:`HEAD_SIZE` bytes and check them, then return an
        async iterator of the bytes to store. Call before opening the upload, so a
        sniffed content type is in :attr:`metadata` from the start.
        """
        buffered: list[Any] = []
        head = bytearray()
        exhausted = False
        while len(head) < HEAD_SIZE:
            try:
                piece = await anext(pieces)
            except StopAsyncIteration:
                exhausted = True
                break
            buffered.append(piece)
            head += piece[: HEAD_SIZE - len(head)]
        self.check_head(bytes(head))
        return self._stored(buffered, None if exhausted else pieces)

    async def _stored(
        self, buffered: list[Any], rest: AsyncIterator[Any] | None
    ) -> AsyncIterator[Any]:
        for piece in buffered:
            out = self.feed(piece)
            if out:
                yield out
        if rest is not None:
            async for piece in rest:
                out = self.feed(piece)
                if out:
                    yield out
        tail = self.finish()
        if tail:
            yield tail


# -- what the proxy calls ---------------------------------------------------------


def make_guard(
    proxy: Any, content_type: str | None, filename: str | None, metadata: dict[str, Any]
) -> UploadGuard:
    """The guard of one upload to ``proxy``'s field (plain rules without a field)."""
    field = proxy._field
    rules = getattr(field, "rules", None) or _NO_RULES
    name = proxy._key or getattr(field, "name", None) or "file"
    return UploadGuard(
        rules,
        field_name=name,
        instance=proxy._instance,
        content_type=content_type,
        filename=filename,
        metadata=metadata,
    )


_NO_RULES = UploadRules()


async def guarded_upload(
    proxy: Any,
    bucket: Any,
    data: Any,
    content_type: str | None,
    filename: str | None,
    metadata: dict[str, Any],
    *,
    file_id: Any = None,
) -> dict[str, Any]:
    """Upload ``data`` to ``bucket`` through the field's checks; return the files doc.

    :raises FileValidationError: refused; nothing is left in the bucket.
    :raises: as :meth:`GridBucket.upload`.
    """
    guard = make_guard(proxy, content_type, filename, metadata)
    pieces = read_source(data, bucket.chunk_size)
    try:
        source = await guard.wrap(pieces)
        return await bucket.upload(
            source,
            file_id=file_id,
            filename=guard.filename,
            metadata=guard.metadata,
            context=proxy._upload_context() if hasattr(proxy, "_upload_context") else None,
        )
    finally:
        await pieces.aclose()


def guarded_write(guard: UploadGuard, stream: Any, data: Any) -> None:
    """Append ``data`` to a streaming upload after the guard's checks.

    On a refusal the upload's cleanup starts at once (its chunks are removed even
    if the caller never awaits anything again) and the error is raised; later
    writes and ``close()`` raise it again, ``abort()`` waits for the cleanup.
    """
    try:
        out = guard.feed(data)
    except FileValidationError:
        _abort_soon(stream)
        raise
    stream.write_nowait(out)


def _abort_soon(stream: Any) -> None:
    spawn(stream.abort())


async def guarded_close(guard: UploadGuard, stream: Any, bucket: Any) -> dict[str, Any]:
    """Finish a streaming upload after the guard's last checks; return the files doc."""
    tail = guard.finish()
    if tail:
        stream.write_nowait(tail)
    doc = await stream.close()
    sniffed = guard.metadata.get("content_type")
    meta = doc.setdefault("metadata", {})
    if sniffed is not None and meta.get("content_type") != sniffed:
        # Sniffed from the first write, after the upload was opened: record it.
        try:
            await bucket.files.update_one(
                {"_id": doc["_id"]}, {"$set": {"metadata.content_type": sniffed}}
            )
        except BaseException:
            import asyncio

            await asyncio.shield(bucket.delete(doc["_id"]))
            raise
        meta["content_type"] = sniffed
    return doc

