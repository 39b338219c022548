"""Helpers of the tus tests (tests/test_tus_*.py): a document class per storage, a
Starlette app mounting ``tus_app`` at ``/uploads``, and an httpx client speaking
to it through the ASGI interface in the test's event loop."""

from __future__ import annotations

import base64
import hashlib
import itertools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Mount

from asyncassets import Document
from asyncassets.fields import FileField, StringField
from asyncassets.storage import FileSystemStorage, GridFSStorage, S3Storage, Storage
from asyncassets.web.tus import TusUpload, UploadTarget, tus_app

TUS = {"Tus-Resumable": "1.0.0"}
OCTETS = {"Content-Type": "application/offset+octet-stream"}
STORAGES = ["gridfs", "filesystem", "s3"]
_names = itertools.count()


def make_storage(kind: str, request: pytest.FixtureRequest, tmp_path: Any) -> Storage:
    name = f"tus{next(_names)}"
    if kind == "gridfs":
        return GridFSStorage(name, chunk_size=64 * 1024)
    if kind == "filesystem":
        return FileSystemStorage(tmp_path / name, collection_name=name, fsync=False)
    bucket = request.getfixturevalue("asyncassets_s3_bucket")
    return S3Storage(**bucket.options, prefix=f"{name}/", collection_name=name)


def doc_class(storage: Storage, **field_kwargs: Any) -> Any:
    return type(
        f"TusDoc{next(_names)}",
        (Document,),
        {
            "owner": StringField(),
            "file": FileField(storage=storage, **field_kwargs),
            "meta": {"collection": f"tusdocs{next(_names)}"},
        },
    )


def owner_hook(doc_cls: Any) -> Any:
    """The hook the tests mount: the document named by the ``doc`` metadata, if the
    ``X-User`` header is its owner; later requests by the same user only."""

    async def authorize(request: Request, upload: TusUpload) -> Any:
        user = request.headers.get("x-user")
        if upload.id is None:
            doc = await doc_cls.objects(pk=upload.metadata.get("doc")).first()
            if doc is None or doc.owner != user:
                return None
            return UploadTarget(doc, "file", info={"owner": user})
        return upload.info["app"]["owner"] == user

    return authorize


def app_for(doc_cls: Any, **options: Any) -> Starlette:
    return Starlette(routes=[Mount("/uploads", tus_app(owner_hook(doc_cls), **options))])


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://testserver",
        headers={**TUS, "X-User": "ann"},
    )


def metadata(**values: str | None) -> str:
    return ",".join(
        key if value is None else f"{key} {base64.b64encode(value.encode()).decode()}"
        for key, value in values.items()
    )


def sha256_header(data: bytes) -> str:
    return "sha256 " + base64.b64encode(hashlib.sha256(data).digest()).decode()


async def create(
    http: httpx.AsyncClient,
    doc: Any,
    length: int,
    *,
    headers: Mapping[str, str] | None = None,
    content: bytes | None = None,
    **meta: str | None,
) -> httpx.Response:
    meta.setdefault("doc", str(doc.pk))
    sent = {"Upload-Length": str(length), "Upload-Metadata": metadata(**meta)}
    if content is not None:
        sent.update(OCTETS)
    sent.update(headers or {})
    return await http.post("/uploads/", headers=sent, content=content)


async def patch(
    http: httpx.AsyncClient, location: str, offset: int, data: bytes, **headers: str
) -> httpx.Response:
    return await http.patch(
        location, headers={**OCTETS, "Upload-Offset": str(offset), **headers}, content=data
    )


def temp_files(root: Any) -> list[Any]:
    """The temp files (``.<name>.<hex>.part``) under a directory storage's root:
    resumable uploads written in place, or writers that died."""
    return sorted(p for p in Path(root).rglob(".*.part") if p.is_file())
