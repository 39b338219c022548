"""A change whose reference switch applied is reported as done (issue #22, case 1).

Once the conditional update switched a document's reference (a replace, a delete,
a cascade of deleted documents), deleting the old bytes is cleanup: when the
object store is unreachable at that moment the caller is told the change
succeeded, the failure is logged, and the old object, named by no reference
and still reserved, is removed by the orphan sweep. Real parts: moto behind a
loopback proxy that answers DELETE requests with 503 while the test says so.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from test_s3_blobs import FaultProxy, Seen

import asyncassets
from asyncassets import Document
from asyncassets.fields import FileField
from asyncassets.ops import check, sweep_orphans
from asyncassets.storage import Retry, S3Storage
from asyncassets.testing import S3Bucket


@pytest.fixture
async def proxy(asyncassets_s3_bucket: S3Bucket) -> AsyncIterator[FaultProxy]:
    port = int(asyncassets_s3_bucket.endpoint_url.rsplit(":", 1)[1].strip("/"))
    fault_proxy = await FaultProxy(port).start()
    yield fault_proxy
    await fault_proxy.close()


def refuse_deletes(seen: Seen) -> tuple[str, float]:
    return ("status", 503) if seen.method == "DELETE" else ("forward", 0)


@pytest.fixture
async def storage(
    asyncassets_s3_bucket: S3Bucket, proxy: FaultProxy
) -> AsyncIterator[S3Storage]:
    made = S3Storage(
        **{**asyncassets_s3_bucket.options, "endpoint_url": proxy.endpoint_url},
        prefix="outcomes/",
        collection_name="outcomes",
        retry=Retry(attempts=1),
    )
    yield made
    await made.blobs().aclose()  # type: ignore[attr-defined]


def doc_class(storage: S3Storage) -> Any:
    return type(
        "OutcomeDoc_" + storage.collection_name,
        (Document,),
        {"photo": FileField(storage=storage), "meta": {"collection": "outcome_docs"}},
    )


async def objects(storage: S3Storage) -> list[str]:
    return sorted([info.key async for info in storage.blobs().list()])


async def test_a_replace_whose_switch_applied_succeeds_when_the_old_bytes_cannot_go(
    asyncassets_db: Any, storage: S3Storage, proxy: FaultProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    Doc = doc_class(storage)
    doc = await Doc().save()
    await doc.photo.put(b"the first photo", filename="a.jpg")
    entry = await asyncassets.get_db()["outcomes.files"].find_one({"_id": doc.photo.grid_id})
    first = entry["location"]["key"]
    proxy.rule = refuse_deletes  # the bucket refuses deletes from now on
    with caplog.at_level(logging.WARNING, logger="asyncassets.files"):
        await doc.photo.replace(b"the second photo", filename="b.jpg")
    assert "orphan sweep" in caplog.text and "SlowDown" in caplog.text
    assert await (await Doc.objects.get(pk=doc.pk)).photo.read() == b"the second photo"
    assert first in await objects(storage)  # left behind, named by nothing

    with caplog.at_level(logging.WARNING, logger="asyncassets.files"):
        await doc.photo.delete()
    assert (await Doc.objects.get(pk=doc.pk)).photo.grid_id is None

    other = await Doc().save()
    await other.photo.put(b"cascaded", filename="c.jpg")
    await Doc.objects(pk=other.pk).delete()  # documents first, then their files
    assert await Doc.objects(pk=other.pk).count() == 0
    assert len(await objects(storage)) == 3  # none of them could be deleted

    proxy.rule = lambda seen: ("forward", 0)  # the bucket is back
    report = await sweep_orphans(grace=0, buckets=["outcomes"])
    assert report.reservations_released == 3
    assert await objects(storage) == []
    assert (await check(buckets=["outcomes"])).ok
    assert await asyncassets.get_db()["outcomes.files"].count_documents({}) == 0
