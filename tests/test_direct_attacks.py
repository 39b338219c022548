"""Direct-to-S3 uploads as a hostile client uses them: part numbers out of range,
unknown sessions, calls after the upload is finished (fixtures of
tests/test_direct_s3.py: uvicorn, moto)."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import AsyncIterator
from typing import Any

import pytest_asyncio
from test_direct_s3 import PART, Site, bucket_state, new_doc, payload, raw_client, serving


@pytest_asyncio.fixture
async def direct(asyncassets_db: Any, asyncassets_s3_bucket: Any) -> AsyncIterator[Site]:
    async with serving(asyncassets_s3_bucket) as made:
        yield made


DIGEST = base64.b64encode(hashlib.sha256(b"x").digest()).decode()


async def test_part_numbers_out_of_range_and_unknown_sessions_are_refused(direct: Site) -> None:
    doc = await new_doc(direct)
    session = (await direct.create(doc, 2 * PART + 1, content_type="video/mp4")).json()
    assert session["parts"] == 3
    for number in ("0", "-1", "4", "10001", "x", "1.5", "1e3"):
        answer = await direct.http.post(f"{direct.url}/uploads/{session['id']}/parts/{number}",
                                      json={"sha256": DIGEST})
        assert answer.status_code in (400, 404), (number, answer.text)
    for bad in ("not-base64!", base64.b64encode(b"short").decode(), None, 5):
        answer = await direct.http.post(f"{direct.url}/uploads/{session['id']}/parts/1",
                                      json={"sha256": bad})
        assert answer.status_code == 400, (bad, answer.text)
    # Guessing: an id that is not a session's is 404 on every call.
    other = "A" * len(session["id"])
    for method, path in (("POST", "/parts/1"), ("GET", "/parts"), ("POST", "/finalize"),
                         ("DELETE", "")):
        answer = await direct.http.request(method, f"{direct.url}/uploads/{other}{path}",
                                         json={"sha256": DIGEST} if path else None)
        assert answer.status_code == 404, (method, path, answer.text)


async def test_a_finished_upload_can_be_neither_aborted_nor_signed_again(
    direct: Site, asyncassets_db: Any
) -> None:
    doc = await new_doc(direct)
    data = payload(PART + 7)
    session = (await direct.create(doc, data, content_type="video/mp4")).json()
    await direct.send_all(session, data)
    assert (await direct.finalize(session)).status_code == 200
    aborted = await direct.http.delete(f"{direct.url}/uploads/{session['id']}")
    assert aborted.status_code == 409, aborted.text
    signed = await direct.http.post(f"{direct.url}/uploads/{session['id']}/parts/1",
                                  json={"sha256": DIGEST})
    assert signed.status_code == 409, signed.text
    loaded = await direct.cls.objects(pk=doc.pk).first()
    assert await loaded.video.read() == data
    objects, uploads = bucket_state(direct.bucket)
    assert len(objects) == 1 and uploads == []


async def test_hostile_sizes_create_nothing(direct: Site, asyncassets_db: Any) -> None:
    doc = await new_doc(direct)
    for size in (-1, 2**63, "5", 1.5, True, None):
        answer = await direct.http.post(f"{direct.url}/uploads/", json={
            "filename": "a.mp4", "size": size, "content_type": "video/mp4",
            "target": {"id": str(doc.pk)}})
        assert answer.status_code in (400, 413), (size, answer.text)
    assert bucket_state(direct.bucket) == ([], [])


async def test_an_object_planted_at_the_reserved_key_is_never_adopted(
    direct: Site, asyncassets_db: Any
) -> None:
    # Someone with write access to the bucket puts other bytes at the key an
    # upload reserved, before its finalize: the document never references them.
    doc = await new_doc(direct)
    data = payload(PART + 3)
    session = (await direct.create(doc, data, content_type="video/mp4")).json()
    await direct.send_all(session, data)
    raw = raw_client(direct.bucket)
    planted = b"<html>planted</html>"
    raw.put_object(Bucket=direct.bucket.name, Key="media/" + session["key"], Body=planted)
    answer = await direct.finalize(session)
    loaded = await direct.cls.objects(pk=doc.pk).first()
    if answer.status_code == 200:
        assert await loaded.video.read() == data
    else:
        assert answer.status_code in (409, 410, 422), answer.text
        assert loaded.video.grid_id is None


async def test_a_declared_sha256_that_does_not_match_removes_the_upload(
    direct: Site, asyncassets_db: Any
) -> None:
    # A small file (one presigned POST) is read back at finalize: a declared
    # whole-file SHA-256 that is not the stored bytes' refuses it, and nothing stays.
    doc = await new_doc(direct)
    data = payload(3000, seed=7)
    wrong = hashlib.sha256(data + b"!").hexdigest()
    answer = await direct.upload(doc, data, content_type="video/mp4", sha256=wrong)
    assert answer.status_code == 422 and "SHA-256" in answer.json()["error"], answer.text
    assert bucket_state(direct.bucket) == ([], [])
    assert (await direct.cls.objects(pk=doc.pk).first()).video.grid_id is None
    assert await asyncassets_db[f"{doc.video.collection_name}.files"].count_documents({}) == 0
