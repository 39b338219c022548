"""The docs' tus examples (examples/tus_fastapi.py, examples/tus_starlette.py) under
uvicorn, uploaded to with tuspy in pieces, read back byte-exact."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import httpx
import pymongo
import pytest
from _browser import served
from bson import ObjectId
from tusclient import client as tus
from tusclient.exceptions import TusCommunicationError

from asyncassets.testing import database_uri, unique_db_name

ROOT = Path(__file__).resolve().parents[1]


def example(name: str) -> Any:
    """examples/<name>.py, loaded once (its Document class is declared once)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.mark.parametrize(
    ("name", "collection", "key"),
    [("tus_fastapi", "videos", "video"), ("tus_starlette", "recordings", "recording")],
)
def test_the_example_takes_a_resumable_upload(
    asyncassets_server_uri, tmp_path, monkeypatch, name, collection, key
):
    monkeypatch.setenv("MEDIA_ROOT", str(tmp_path / "media"))
    module = example(name)
    uri = database_uri(asyncassets_server_uri, unique_db_name(name))
    data = os.urandom(700_000)
    path = tmp_path / "clip.bin"
    path.write_bytes(data)
    with served(module.create_app(uri), uri) as base:
        made = httpx.post(f"{base}/{collection}", headers={"X-User": "ann"})
        pk = made.json()["id"]
        mallory = tus.TusClient(f"{base}/uploads/", headers={"X-User": "mallory"})
        with pytest.raises(TusCommunicationError, match="403"):
            mallory.uploader(str(path), metadata={key: pk}, chunk_size=256 * 1024).upload()
        uploader = tus.TusClient(f"{base}/uploads/", headers={"X-User": "ann"}).uploader(
            str(path), metadata={key: pk, "filename": "clip.bin"}, chunk_size=256 * 1024
        )
        uploader.upload()
        with pymongo.MongoClient(uri) as mongo:
            db = mongo.get_default_database()
            doc = db[collection].find_one({"_id": ObjectId(pk)})
            entry = db[f"{collection}.files"].find_one({"_id": doc["file"]})
        assert entry["length"] == len(data)
        assert entry["filename"] == "clip.bin"
        assert entry["metadata"]["sha256"] == hashlib.sha256(data).hexdigest()
