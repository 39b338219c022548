"""tus PATCH: bytes at the upload's offset, kept durably, attached when complete."""

from __future__ import annotations

import os
from typing import Any

import pytest
from _tus import STORAGES, app_for, client, create, doc_class, make_storage, patch


@pytest.fixture(params=STORAGES)
def storage(request: pytest.FixtureRequest, tmp_path: Any) -> Any:
    return make_storage(request.param, request, tmp_path)


async def test_an_upload_in_pieces_becomes_the_documents_file(asyncassets_db, storage):
    cls = doc_class(storage)
    doc = cls(owner="ann")
    await doc.save()
    data = os.urandom(3 * 1024 * 1024 + 12345)
    async with client(app_for(cls, chunk_size=256 * 1024)) as http:
        created = await create(http, doc, len(data), filename="big.bin")
        assert created.status_code == 201, created.text
        location = created.headers["location"]
        offset = 0
        for size in (100, 700_000, 1_500_000, len(data)):
            piece = data[offset:size]
            answer = await patch(http, location, offset, piece)
            assert answer.status_code == 204, answer.text
            offset = int(answer.headers["upload-offset"])
            assert offset == min(size, len(data))
        head = await http.head(location)
    assert head.headers["upload-offset"] == str(len(data))
    stored = await cls.objects(pk=doc.pk).first()
    assert await stored.file.read() == data
    assert stored.file.filename == "big.bin"
