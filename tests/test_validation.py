"""FileField upload options: max_size, content types, extensions, sniffing, file names.

Every refusal must leave the bucket as it was (no files document, no chunk) and
the stored document unchanged.
"""

from __future__ import annotations

import datetime as dt
import io

import mongoengine
import pytest

from asyncassets import Document, FileValidationError
from asyncassets.fields import FileField, ListField, StringField
from asyncassets.files.validation import (
    content_type_matches,
    guess_content_type,
    sanitize_filename,
    sniff_content_type,
)

# Class names are prefixed "Val" so they never clash in mongoengine's registry.

CHUNK = 64
LIMIT = 1000


class ValUpload(Document):
    name = StringField()
    small = FileField(chunk_size=CHUNK, max_size=LIMIT)
    image = FileField(chunk_size=CHUNK, allowed_content_types=["image/*", "application/pdf"])
    doc = FileField(chunk_size=CHUNK, allowed_extensions=["PDF", ".txt", "tar.gz"])
    plain = FileField(chunk_size=CHUNK)
    named = FileField(chunk_size=CHUNK, filename_template="uploads/{date:%Y}/{field}-{stem}{ext}")
    by_callable = FileField(
        chunk_size=CHUNK, filename_template=lambda doc, name: f"{doc.name}/{name.upper()}"
    )
    many = ListField(FileField(chunk_size=CHUNK, max_size=LIMIT))
    meta = {"collection": "val_uploads"}


PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 100
JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"\x00" * 100
GIF = b"GIF89a" + b"\x00" * 100
WEBP = b"RIFF\x24\x00\x00\x00WEBPVP8 " + b"\x00" * 100
PDF = b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n" + b"1 0 obj\n" * 20
ZIP = b"PK\x03\x04\x14\x00\x00\x00\x08\x00" + b"\x00" * 100
TEXT = "Marmots hibernate — six months a year.\n".encode() * 30


async def counts(db) -> tuple[int, int]:
    return await db["fs.files"].count_documents({}), await db["fs.chunks"].count_documents({})


class UnknownLength:
    """A source whose length nobody knows in advance: a socket-like stream."""

    def __init__(self, total: int, piece: int = 100) -> None:
        self.left = total
        self.piece = piece
        self.reads = 0

    async def read(self, n: int) -> bytes:
        self.reads += 1
        take = min(self.left, self.piece, n)
        self.left -= take
        return b"x" * take


# -- max_size ---------------------------------------------------------------------


async def test_max_size_accepts_a_file_at_the_limit(asyncassets_db):
    doc = ValUpload()
    await doc.small.put(b"a" * LIMIT)
    await doc.save()
    assert await doc.small.read() == b"a" * LIMIT


async def test_max_size_refuses_bytes_over_the_limit_naming_field_limit_and_size(
    asyncassets_db,
):
    doc = ValUpload()
    with pytest.raises(FileValidationError) as info:
        await doc.small.put(b"a" * (LIMIT + 1))
    message = str(info.value)
    assert "small" in message and str(LIMIT) in message and str(LIMIT + 1) in message
    assert info.value.field_name == "small"
    assert info.value.limit == LIMIT and info.value.size == LIMIT + 1
    assert isinstance(info.value, mongoengine.ValidationError)
    assert not doc.small
    assert await counts(asyncassets_db) == (0, 0)


async def test_max_size_stops_a_stream_of_unknown_length_early_and_removes_its_chunks(
    asyncassets_db,
):
    doc = ValUpload(name="x")
    await doc.save()
    source = UnknownLength(total=100 * LIMIT)
    with pytest.raises(FileValidationError) as info:
        await doc.small.put(source)
    # Stopped at the first piece over the limit, not after reading everything.
    # (the source is read in chunk-size pieces)
    assert source.reads <= LIMIT // CHUNK + 2
    assert info.value.size <= LIMIT + CHUNK
    assert await counts(asyncassets_db) == (0, 0)
    stored = await asyncassets_db.val_uploads.find_one({"_id": doc.pk})
    assert "small" not in stored


async def test_max_size_on_replace_keeps_the_old_file(asyncassets_db):
    doc = ValUpload()
    await doc.small.put(b"old")
    await doc.save()
    old_id = doc.small.file_id
    with pytest.raises(FileValidationError):
        await doc.small.replace(UnknownLength(total=5 * LIMIT))
    assert doc.small.file_id == old_id
    assert await doc.small.read() == b"old"
    stored = await asyncassets_db.val_uploads.find_one({"_id": doc.pk})
    assert stored["small"] == old_id
    assert await counts(asyncassets_db) == (1, 1)


async def test_max_size_on_a_streamed_write_aborts_the_upload(asyncassets_db):
    doc = ValUpload()
    await doc.save()
    with pytest.raises(FileValidationError, match="max_size=1000"):
        async with doc.small.new_file():
            for _ in range(20):
                doc.small.write(b"y" * 100)  # not awaited: the check is synchronous
    assert not doc.small
    assert await counts(asyncassets_db) == (0, 0)


async def test_max_size_on_an_awaited_streamed_write_cleans_up_without_abort(asyncassets_db):
    doc = ValUpload()
    await doc.small.new_file()
    for _ in range(5):
        await doc.small.write(b"y" * 150)  # 750 bytes: chunks are stored already
    assert await asyncassets_db["fs.chunks"].count_documents({}) > 0
    with pytest.raises(FileValidationError):
        await doc.small.write(b"y" * 300)
    with pytest.raises(FileValidationError):
        await doc.small.write(b"y")  # it stays refused
    await doc.small.abort()  # waits for the cleanup that already started
    assert await counts(asyncassets_db) == (0, 0)


async def test_max_size_applies_to_list_elements(asyncassets_db):
    doc = ValUpload()
    await doc.save()
    await doc.add_file("many", b"z" * 10)
    with pytest.raises(FileValidationError):
        await doc.add_file("many", b"z" * (LIMIT + 1))
    assert len(doc.many) == 1
    assert await counts(asyncassets_db) == (1, 1)


# -- content types --------------------------------------------------------------


@pytest.mark.parametrize("content_type", ["image/png", "IMAGE/JPEG", "application/pdf"])
async def test_allowed_content_types_accept_wildcards_and_exact_types(asyncassets_db, content_type):
    data = {"image/png": PNG, "IMAGE/JPEG": JPEG, "application/pdf": PDF}[content_type]
    doc = ValUpload()
    await doc.image.put(data, content_type=content_type)
    assert doc.image.content_type == content_type


async def test_allowed_content_types_refuse_a_declared_type(asyncassets_db):
    doc = ValUpload()
    with pytest.raises(FileValidationError, match=r"'text/html'.*image/\*"):
        await doc.image.put(b"<html>", content_type="text/html")
    assert await counts(asyncassets_db) == (0, 0)


async def test_allowed_content_types_refuse_bytes_that_contradict_the_declared_type(
    asyncassets_db,
):
    doc = ValUpload()
    with pytest.raises(FileValidationError, match="application/zip"):
        await doc.image.put(ZIP, content_type="image/png")
    assert await counts(asyncassets_db) == (0, 0)


async def test_allowed_content_types_check_the_sniffed_type(asyncassets_db):
    doc = ValUpload()
    await doc.image.put(GIF)  # no content type, no name: sniffed
    assert doc.image.content_type == "image/gif"
    other = ValUpload()
    with pytest.raises(FileValidationError, match="text/plain"):
        await other.image.put(TEXT)
    assert await counts(asyncassets_db) == (1, 2)  # the GIF's two chunks


async def test_allowed_content_types_refuse_unrecognisable_bytes(asyncassets_db):
    doc = ValUpload()
    with pytest.raises(FileValidationError, match="could not be told"):
        await doc.image.put(b"\x00\x01\x02\x03" * 10)


async def test_allowed_content_types_in_a_streamed_upload(asyncassets_db):
    doc = ValUpload()
    with pytest.raises(FileValidationError, match="application/zip"):
        async with doc.image.new_file():
            await doc.image.write(ZIP * 10)
    assert await counts(asyncassets_db) == (0, 0)
    async with doc.image.new_file():
        await doc.image.write(PNG[:5])
        await doc.image.write(PNG[5:])
    await doc.image.load()
    assert doc.image.content_type == "image/png"


# -- extensions -----------------------------------------------------------------


@pytest.mark.parametrize("filename", ["report.pdf", "REPORT.PDF", "notes.Txt", "a.TAR.GZ"])
async def test_allowed_extensions_are_case_insensitive(asyncassets_db, filename):
    doc = ValUpload()
    await doc.doc.put(b"%PDF-1.4 ...", filename=filename)
    assert doc.doc.filename == filename


@pytest.mark.parametrize("filename", ["photo.png", "report.pdf.exe", "pdf", None])
async def test_allowed_extensions_refuse_other_names(asyncassets_db, filename):
    doc = ValUpload()
    with pytest.raises(FileValidationError, match="extension"):
        await doc.doc.put(b"data", filename=filename)
    assert await counts(asyncassets_db) == (0, 0)


async def test_allowed_extensions_are_checked_before_a_streamed_upload_opens(asyncassets_db):
    doc = ValUpload()
    with pytest.raises(FileValidationError):
        doc.doc.new_file(filename="evil.exe")
    assert doc.doc._upload is None


# -- sniffing -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (PNG, "image/png"),
        (JPEG, "image/jpeg"),
        (GIF, "image/gif"),
        (WEBP, "image/webp"),
        (PDF, "application/pdf"),
        (ZIP, "application/zip"),
        (TEXT, "text/plain"),
    ],
    ids=["png", "jpeg", "gif", "webp", "pdf", "zip", "text"],
)
async def test_content_type_is_sniffed_from_the_first_bytes(asyncassets_db, data, expected):
    doc = ValUpload()
    await doc.plain.put(io.BytesIO(data))
    await doc.save()
    loaded = await ValUpload.objects.get(pk=doc.pk)
    await loaded.plain.load()
    assert loaded.plain.content_type == expected


@pytest.mark.parametrize("data", [PNG, TEXT], ids=["png", "text"])
async def test_content_type_is_sniffed_in_a_streamed_upload(asyncassets_db, data):
    doc = ValUpload()
    async with doc.plain.new_file():
        for i in range(0, len(data), 7):
            doc.plain.write(data[i : i + 7])
    await doc.plain.load()
    assert doc.plain.content_type == sniff_content_type(data)


async def test_content_type_comes_from_the_filename_before_the_bytes(asyncassets_db):
    doc = ValUpload()
    await doc.plain.put(TEXT, filename="data.csv")
    assert doc.plain.content_type == "text/csv"


async def test_a_declared_content_type_is_kept(asyncassets_db):
    doc = ValUpload()
    await doc.plain.put(PNG, content_type="application/octet-stream")
    assert doc.plain.content_type == "application/octet-stream"


def test_sniffing_more_formats():
    assert sniff_content_type(b"ID3\x03") == "audio/mpeg"
    assert sniff_content_type(b"RIFF\x00\x00\x00\x00WAVEfmt ") == "audio/wav"
    assert sniff_content_type(b"\x00\x00\x00\x18ftypmp42") == "video/mp4"
    assert sniff_content_type(b"\x00\x00\x00\x1cftypavif") == "image/avif"
    assert sniff_content_type(b"\x1aE\xdf\xa3") == "video/webm"
    assert sniff_content_type(b"\x1f\x8b\x08") == "application/gzip"
    assert sniff_content_type(b"\x00" * 257 + b"ustar\x0000") == "application/x-tar"
    assert sniff_content_type(b"") is None
    assert sniff_content_type(bytes(range(256))) is None
    # A multi-byte character cut at the end of the head is still text.
    assert sniff_content_type("é".encode() * 255 + b"\xc3") == "text/plain"


def test_guess_content_type_from_names():
    assert guess_content_type("A.PNG") == "image/png"
    assert guess_content_type("archive.tar.gz") == "application/gzip"
    assert guess_content_type("x.webp") == "image/webp"
    assert guess_content_type("noext", PDF) == "application/pdf"
    assert content_type_matches("text/plain; charset=utf-8", ["text/*"])
    assert not content_type_matches(None, ["*/*"])


# -- file names -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        ("../../etc/passwd", "passwd"),
        ("C:\\Users\\me\\photo.jpg", "photo.jpg"),
        ("/abs/path/a.txt", "a.txt"),
        ("bad\x00name\x1f.txt", "badname.txt"),
        ("evil\u202egpj.exe", "evilgpj.exe"),
        ("  spaced.txt  ", "spaced.txt"),
        ("cafe\u0301.txt", "caf\u00e9.txt"),
    ],
)
async def test_filenames_are_sanitised(asyncassets_db, given, stored):
    doc = ValUpload()
    await doc.plain.put(b"x", filename=given)
    assert doc.plain.filename == stored


@pytest.mark.parametrize("given", ["..", "../", "/", "\x00", "   "])
async def test_filenames_with_nothing_usable_are_refused(asyncassets_db, given):
    doc = ValUpload()
    with pytest.raises(FileValidationError, match="file name"):
        await doc.plain.put(b"x", filename=given)
    assert await counts(asyncassets_db) == (0, 0)


def test_long_filenames_are_cut_keeping_the_extension():
    name = sanitize_filename("é" * 300 + ".jpeg")
    assert name.endswith(".jpeg")
    assert len(name.encode("utf-8")) <= 255


async def test_filename_template_builds_the_stored_name(asyncassets_db):
    doc = ValUpload()
    await doc.named.put(b"x", filename="../Marmot.PNG")
    year = dt.datetime.now(dt.timezone.utc).year
    assert doc.named.filename == f"uploads/{year}/named-Marmot.png"


async def test_filename_template_callable_gets_the_document(asyncassets_db):
    doc = ValUpload(name="zoo")
    async with doc.by_callable.new_file(filename="a/b/c.txt"):
        doc.by_callable.write(b"x")
    assert doc.by_callable.filename == "zoo/C.TXT"


async def test_filename_template_cannot_climb_out(asyncassets_db):
    class ValEvil(Document):
        f = FileField(filename_template=lambda doc, name: f"../../{name}")
        meta = {"collection": "val_evil"}

    doc = ValEvil()
    await doc.f.put(b"x", filename="x.txt")
    assert ".." not in doc.f.filename.split("/")


def test_bad_options_are_refused_at_declaration():
    with pytest.raises(ValueError, match="max_size"):
        FileField(max_size=-1)
    with pytest.raises(TypeError, match="list of strings"):
        FileField(allowed_extensions="jpg")
    with pytest.raises(ValueError, match="compress"):
        FileField(compress="lz4")
    with pytest.raises(TypeError, match="filename_template"):
        FileField(filename_template=42)
