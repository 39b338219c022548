"""tus POST (creation, creation-with-upload) and OPTIONS: what is accepted, what is refused."""

from __future__ import annotations

import base64
import email.utils
import hashlib

import pytest
from _tus import TUS, app_for, client, create, doc_class, make_storage

from asyncassets.storage import GridFSStorage
from asyncassets.web.tus import tus_app


@pytest.fixture
async def setup(asyncassets_db, request, tmp_path):
    cls = doc_class(make_storage("gridfs", request, tmp_path), max_size=1_000_000,
                    allowed_content_types=["image/png", "text/plain"])
    doc = cls(owner="ann")
    await doc.save()
    return cls, doc


async def count_sessions(db, cls) -> int:
    return await db[f"{cls._fields['file'].storage.collection_name}.uploads"].count_documents({})


async def test_options_says_what_the_server_supports(setup):
    cls, _ = setup
    async with client(app_for(cls, max_size=5000)) as http:
        answer = await http.options("/uploads/")
    assert answer.status_code == 204
    assert answer.headers["tus-version"] == "1.0.0"
    assert set(answer.headers["tus-extension"].split(",")) == {
        "creation", "creation-with-upload", "termination", "expiration", "checksum"}
    assert answer.headers["tus-max-size"] == "5000"
    assert "sha256" in answer.headers["tus-checksum-algorithm"].split(",")


async def test_creation_answers_a_location_offset_zero_and_expiry(asyncassets_db, setup):
    cls, doc = setup
    async with client(app_for(cls)) as http:
        answer = await create(http, doc, 10, filename="a.txt", filetype="text/plain")
        assert answer.status_code == 201, answer.text
        location = answer.headers["location"]
        assert location.startswith("http://testserver/uploads/default/")
        assert len(location.rsplit("/", 1)[1]) == 32
        assert answer.headers["upload-offset"] == "0"
        assert answer.headers["tus-resumable"] == "1.0.0"
        assert email.utils.parsedate_to_datetime(answer.headers["upload-expires"])
        head = await http.head(location)
    assert head.headers["upload-length"] == "10"
    # Nothing is referenced before the upload completes.
    assert (await cls.objects(pk=doc.pk).first()).file.grid_id is None


async def test_creation_with_upload_keeps_the_body_and_a_whole_file_is_attached(setup):
    cls, doc = setup
    data = b"hello tus, all at once"
    async with client(app_for(cls)) as http:
        answer = await create(http, doc, len(data), content=data, filename="hi.txt",
                              headers={"Upload-Checksum": "sha256 " + base64.b64encode(
                                  hashlib.sha256(data).digest()).decode()})
    assert answer.status_code == 201, answer.text
    assert answer.headers["upload-offset"] == str(len(data))
    stored = await cls.objects(pk=doc.pk).first()
    assert await stored.file.read() == data
    assert stored.file.content_type == "text/plain"


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"Upload-Length": "-1"}, 400),
        ({"Upload-Length": "12abc"}, 400),
        ({"Upload-Length": "1" * 30}, 400),
        ({}, 400),
        ({"Upload-Defer-Length": "1"}, 400),
        ({"Upload-Length": "1000001"}, 413),  # over the field's max_size
        ({"Upload-Length": "10", "Upload-Metadata": "doc !!!notbase64"}, 400),
        ({"Upload-Length": "10", "Upload-Metadata": "doc YQ==,doc YQ=="}, 400),
        ({"Upload-Length": "10", "Upload-Metadata": "bad key YQ=="}, 400),
        ({"Upload-Length": "10", "Upload-Metadata": "doc /w=="}, 400),  # not UTF-8
    ],
)
async def test_bad_creations_are_refused_and_leave_nothing(asyncassets_db, setup, headers, status):
    cls, doc = setup
    sent = {"Upload-Metadata": "doc " + base64.b64encode(str(doc.pk).encode()).decode()}
    sent.update(headers)
    async with client(app_for(cls)) as http:
        answer = await http.post("/uploads/", headers=sent)
    assert answer.status_code == status, answer.text
    assert await count_sessions(asyncassets_db, cls) == 0


async def test_over_the_apps_max_size_is_413(asyncassets_db, setup):
    cls, doc = setup
    async with client(app_for(cls, max_size=100)) as http:
        answer = await create(http, doc, 101)
    assert answer.status_code == 413
    assert await count_sessions(asyncassets_db, cls) == 0


async def test_a_request_without_tus_resumable_is_412(setup):
    cls, _doc = setup
    async with client(app_for(cls)) as http:
        answer = await http.post("/uploads/", headers={"Tus-Resumable": "0.2.2",
                                                       "Upload-Length": "1"})
    assert answer.status_code == 412
    assert answer.headers["tus-version"] == "1.0.0"


async def test_the_hook_refuses_403(asyncassets_db, setup):
    cls, doc = setup
    async with client(app_for(cls)) as http:
        answer = await create(http, doc, 10, headers={"X-User": "mallory"})
    assert answer.status_code == 403
    assert await count_sessions(asyncassets_db, cls) == 0


@pytest.mark.parametrize(
    "meta", [{"filename": "x.exe", "filetype": "application/x-msdownload"},
             {"filename": "../../etc/passwd\x00", "filetype": "image/gif"}])
async def test_a_type_the_field_refuses_is_415_at_creation(asyncassets_db, setup, meta):
    cls, doc = setup
    async with client(app_for(cls)) as http:
        answer = await create(http, doc, 10, **meta)
    assert answer.status_code == 415, answer.text
    assert await count_sessions(asyncassets_db, cls) == 0


async def test_the_first_bytes_are_sniffed_and_a_refused_type_drops_the_upload(
    asyncassets_db, setup
):
    cls, doc = setup
    gif = b"GIF89a" + b"\0" * 600
    async with client(app_for(cls)) as http:
        answer = await create(http, doc, len(gif) + 100, content=gif, filetype="image/png",
                              filename="a.png")
        assert answer.status_code == 415, answer.text
    assert await count_sessions(asyncassets_db, cls) == 0
    staged = asyncassets_db[f"{cls._fields['file'].storage.collection_name}.uploads.staged"]
    assert await staged.count_documents({}) == 0


async def test_a_file_name_is_sanitised(setup):
    cls, doc = setup
    data = b"plain text"
    async with client(app_for(cls)) as http:
        answer = await create(http, doc, len(data), content=data,
                              filename="../../etc/pass\u202ewd.txt", filetype="text/plain")
    assert answer.status_code == 201, answer.text
    stored = await cls.objects(pk=doc.pk).first()
    await stored.file.load()
    assert "/" not in stored.file.filename and "\u202e" not in stored.file.filename


async def test_an_unsaved_target_is_a_clear_error(asyncassets_db):
    cls = doc_class(GridFSStorage("tus_unsaved"))

    async def authorize(request, upload):
        from asyncassets.web import UploadTarget

        return UploadTarget(cls(owner="ann"), "file")

    from starlette.applications import Starlette
    from starlette.routing import Mount

    app = Starlette(routes=[Mount("/uploads", tus_app(authorize))])
    async with client(app) as http:
        with pytest.raises(TypeError, match="unsaved document"):
            await http.post("/uploads/", headers={**TUS, "Upload-Length": "1"})


async def test_creation_with_upload_needs_the_octet_stream_type(setup):
    cls, doc = setup
    async with client(app_for(cls)) as http:
        answer = await create(http, doc, 4, filename="a.txt",
                              headers={"Content-Type": "text/plain"})
        assert answer.status_code == 201
        assert answer.headers["upload-offset"] == "0"
