"""The ``asyncassets`` command, run as a real subprocess (``python -m asyncassets``)."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import importlib.util
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pymongo
import pytest

from asyncassets import Document
from asyncassets.cli import build_parser, describe_uri, parse_duration
from asyncassets.connection import connect, disconnect
from asyncassets.fields import FileField
from asyncassets.testing import unique_db_name

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "cli.rst"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("ASYNCASSETS_URI", "MONGODB_URI")}
    paths = [str(REPO), *extra.pop("PYTHONPATH", "").split(os.pathsep),
             *env.get("PYTHONPATH", "").split(os.pathsep)]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env.update(extra)
    return env


class Result:
    def __init__(self, proc: subprocess.CompletedProcess[bytes]) -> None:
        self.code = proc.returncode
        self.stdout = proc.stdout
        self.out = proc.stdout.decode(errors="replace")
        self.err = proc.stderr.decode(errors="replace")

    def json(self):
        return json.loads(self.out)

    def __repr__(self) -> str:
        return f"<exit {self.code}\nstdout: {self.out[:2000]}\nstderr: {self.err[:2000]}>"


def run(*args: str, input: bytes | None = None, env: dict[str, str] | None = None,
        cwd: Path | None = None, stderr=subprocess.PIPE) -> Result:
    proc = subprocess.run(
        [sys.executable, "-m", "asyncassets", *args],
        input=input, stdout=subprocess.PIPE, stderr=stderr, env=env or _env(), cwd=cwd,
        timeout=120, check=False,
    )
    if proc.stderr is None:
        proc.stderr = b""
    return Result(proc)


def assert_one_line_error(result: Result, fragment: str) -> None:
    assert result.code == 1, result
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result
    assert lines[0].startswith("asyncassets: error: "), result
    assert fragment in lines[0], result
    assert "Traceback" not in result.err


class CLI:
    """Runs the command against the test server, in a database of its own."""

    def __init__(self, uri: str, db_name: str, tmp_path: Path) -> None:
        self.uri = uri
        self.db_name = db_name
        self.tmp_path = tmp_path
        self.client: pymongo.MongoClient = pymongo.MongoClient(uri, serverSelectionTimeoutMS=5000)
        self.db = self.client[db_name]

    def __call__(self, *args: str, **kwargs) -> Result:
        return run("--uri", self.uri, "--db", self.db_name, "--timeout", "5", *args, **kwargs)

    def file(self, name: str, data: bytes) -> Path:
        path = self.tmp_path / name
        path.write_bytes(data)
        return path


@pytest.fixture
def cli(asyncassets_server_uri: str, request: pytest.FixtureRequest, tmp_path: Path):
    runner = CLI(asyncassets_server_uri, unique_db_name(request.node.name), tmp_path)
    try:
        yield runner
    finally:
        runner.client.drop_database(runner.db_name)
        runner.client.close()


def _put(cli: CLI, *args: str, **kwargs) -> str:
    result = cli("put", *args, **kwargs)
    assert result.code == 0, result
    return result.out.strip()


# -- the everyday commands -----------------------------------------------------------


def test_put_ls_info_cat_get_rm_round_trip(cli: CLI, tmp_path: Path):
    text = cli.file("marmot.txt", b"Marmota marmota\n")
    blob = cli.file("blob.bin", bytes(range(256)) * 10)

    marmot = _put(cli, str(text), "--meta", "genus=Marmota", "--meta", "kind=rodent")
    assert re.fullmatch(r"[0-9a-f]{24}", marmot)
    other = _put(cli, str(blob), "--content-type", "application/x-test")

    listing = cli("-v", "ls")
    assert listing.code == 0 and marmot in listing.out and "marmot.txt" in listing.out
    assert f"using {cli.uri} (from --uri), database '{cli.db_name}'" in listing.err
    assert other in listing.out and "application/x-test" in listing.out
    rows = cli("ls", "--json").json()
    assert [row["id"] for row in rows] == [marmot, other]
    only = cli("ls", "--filter", "genus=Marmota", "--json").json()
    assert [row["id"] for row in only] == [marmot]

    info = cli("info", marmot, "--json").json()
    assert info["content_type"] == "text/plain"
    assert info["metadata"] == {"genus": "Marmota", "kind": "rodent"}
    assert info["length"] == 16
    assert info["sha256"] == hashlib.sha256(b"Marmota marmota\n").hexdigest()
    human = cli("info", marmot)
    assert human.code == 0 and "marmot.txt" in human.out and "Marmota" in human.out

    assert cli("cat", other).stdout == blob.read_bytes()
    assert cli("get", marmot, "-o", "-").stdout == b"Marmota marmota\n"
    saved = cli("get", other, "-o", str(tmp_path / "copy.bin"))
    assert saved.code == 0 and (tmp_path / "copy.bin").read_bytes() == blob.read_bytes()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    assert cli("get", marmot, cwd=out_dir).code == 0
    assert (out_dir / "marmot.txt").read_bytes() == b"Marmota marmota\n"
    assert_one_line_error(cli("get", marmot, cwd=out_dir), "already exists")
    assert cli("get", marmot, "--force", cwd=out_dir).code == 0
    assert sorted(p.name for p in out_dir.iterdir()) == ["marmot.txt"]  # no .part left

    removed = cli("rm", marmot)
    assert removed.code == 0 and f"deleted {marmot}" in removed.out
    assert [row["id"] for row in cli("ls", "--json").json()] == [other]
    assert cli.db["fs.chunks"].count_documents({}) == 1


def test_put_takes_stdin_other_buckets_and_prints_json(cli: CLI):
    result = cli("put", "-", "--bucket", "scans", "--json", input=b"from a pipe")
    assert result.code == 0, result
    [row] = result.json()
    assert row["bucket"] == "scans" and row["length"] == 11 and row["filename"] is None
    assert cli("cat", row["id"], "--bucket", "scans").stdout == b"from a pipe"
    assert cli("ls", "--json").json() == []
    assert_one_line_error(cli("cat", row["id"]), "no file with id")


def test_verify_reports_intact_mismatched_and_unverifiable_files(cli: CLI):
    good = _put(cli, str(cli.file("good.txt", b"good" * 100)))
    bad = _put(cli, str(cli.file("bad.txt", b"bad!" * 100)))
    legacy = _put(cli, str(cli.file("legacy.txt", b"old" * 100)))
    from bson import ObjectId

    cli.db["fs.chunks"].update_one({"files_id": ObjectId(bad)}, {"$set": {"data": b"x" * 400}})
    cli.db["fs.files"].update_one({"_id": ObjectId(legacy)}, {"$unset": {"metadata.sha256": ""}})

    everything = cli("verify")
    assert everything.code == 3, everything
    status = {line.split()[1]: line.split()[0] for line in everything.out.splitlines()}
    assert status == {good: "OK", bad: "MISMATCH", legacy: "UNVERIFIABLE"}
    assert cli("verify", good, legacy).code == 0
    [row] = cli("verify", bad, "--json").json()
    assert row["status"] == "mismatch"


# -- files the library wrote: compressed, legacy ----------------------------------------


_PACKED_ALIAS = "cli_packed_writer"


class CliPacked(Document):
    data = FileField(compress="gzip", collection_name="packed", chunk_size=4096)
    meta = {"collection": "cli_packed", "db_alias": _PACKED_ALIAS}


PACKED = b"".join(b"marmot %05d whistles when an eagle comes\n" % i for i in range(3000))


def _store_packed(cli: CLI, data: bytes) -> str:
    """Store ``data`` through a ``compress="gzip"`` field, as an application would."""

    async def store() -> str:
        connect(host=cli.uri, db=cli.db_name, alias=_PACKED_ALIAS)
        try:
            doc = CliPacked()
            await doc.data.put(data, content_type="text/plain", filename="census.txt")
            await doc.save()
            return str(doc.data.file_id)
        finally:
            await disconnect(_PACKED_ALIAS)

    return asyncio.run(store())


@pytest.fixture
def packed(cli: CLI) -> str:
    file_id = _store_packed(cli, PACKED)
    stored = cli.db["packed.files"].find_one()
    assert stored["length"] < len(PACKED) // 10  # the bucket really holds a gzip member
    return file_id


def test_cat_writes_the_original_bytes_of_a_compressed_file(cli: CLI, packed: str):
    assert cli("cat", packed, "--bucket", "packed").stdout == PACKED


def test_get_writes_the_original_bytes_of_a_compressed_file(
    cli: CLI, packed: str, tmp_path: Path
):
    assert cli("get", packed, "--bucket", "packed", "-o", "-").stdout == PACKED
    saved = cli("get", packed, "--bucket", "packed", "-o", str(tmp_path / "back.txt"))
    assert saved.code == 0, saved
    assert (tmp_path / "back.txt").read_bytes() == PACKED
    assert f"wrote {len(PACKED)} bytes" in saved.err


def test_info_and_ls_show_the_original_length_of_a_compressed_file(cli: CLI, packed: str):
    stored_length = cli.db["packed.files"].find_one()["length"]
    info = cli("info", packed, "--bucket", "packed", "--json").json()
    assert info["length"] == len(PACKED)
    assert info["sha256"] == hashlib.sha256(PACKED).hexdigest()
    assert info["content_type"] == "text/plain"
    assert info["compression"] == "gzip" and info["stored_length"] == stored_length
    assert info["metadata"] == {}  # the library's own keys are not the user's metadata
    human = cli("info", packed, "--bucket", "packed")
    assert human.code == 0 and f"{len(PACKED)} (" in human.out and "gzip" in human.out

    [row] = cli("ls", "--bucket", "packed", "--json").json()
    assert row["length"] == len(PACKED)
    only = cli("ls", "--bucket", "packed", "--filter", f"length={len(PACKED)}", "--json")
    assert [r["id"] for r in only.json()] == [packed]
    assert cli("verify", "--bucket", "packed").out.split() == ["OK", packed]


def _insert_legacy(cli: CLI, data: bytes, md5: str) -> str:
    """A file as mongoengine or an old driver wrote it: a GridFS ``md5``, no sha256."""
    from bson import ObjectId

    file_id = ObjectId()
    cli.db["fs.files"].insert_one({
        "_id": file_id, "length": len(data), "chunkSize": 255 * 1024, "md5": md5,
        "uploadDate": dt.datetime.now(dt.timezone.utc), "filename": "legacy.txt",
    })
    cli.db["fs.chunks"].insert_one({"files_id": file_id, "n": 0, "data": data})
    return str(file_id)


def test_verify_fails_a_legacy_file_whose_md5_does_not_match(cli: CLI):
    data = b"written by mongoengine 0.17\n" * 40
    intact = _insert_legacy(cli, data, hashlib.md5(data).hexdigest())
    changed = _insert_legacy(cli, data, hashlib.md5(b"other bytes").hexdigest())

    result = cli("verify", changed)
    assert result.code == 3, result
    assert result.out.split()[:2] == ["MISMATCH", changed]
    assert "md5" in result.out
    assert cli("verify", intact).out.split() == ["OK", intact]
    rows = cli("verify", "--json").json()
    assert {r["id"]: r["status"] for r in rows} == {intact: "ok", changed: "mismatch"}


# -- sweep and check -----------------------------------------------------------------


MODELS = '''
import asyncassets
from asyncassets import Document
from asyncassets.fields import FileField, StringField

# An app that connects at import time: the command's own --uri must win.
asyncassets.connect("mongodb://127.0.0.1:9/not_this_one")


class CliAnimal(Document):
    name = StringField()
    photo = FileField()
    meta = {"collection": "cli_animals"}
'''


def test_sweep_and_check_use_the_imported_document_classes(cli: CLI, tmp_path: Path):
    module = f"cli_models_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(MODELS)
    env = _env(PYTHONPATH=str(tmp_path))
    kept = _put(cli, "--sweepable", str(cli.file("kept.txt", b"referenced")))
    orphan = _put(cli, "--sweepable", str(cli.file("orphan.txt", b"nobody's")))
    from bson import ObjectId

    cli.db["cli_animals"].insert_one({"name": "marmot", "photo": ObjectId(kept)})
    cli.db["fs.files"].update_many(
        {}, {"$set": {"uploadDate": dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=2)}}
    )

    found = cli("--import", module, "check", env=env)
    assert found.code == 3, found
    assert "orphaned files: 1" in found.out and orphan in found.out
    assert cli("--import", module, "check", "--json", env=env).json()["ok"] is False

    dry = cli("--import", module, "sweep", "--dry-run", "--json", env=env).json()
    assert dry["dry_run"] and dry["files_deleted"] == 1
    assert dry["deleted_files"][0]["file_id"] == orphan
    assert cli.db["fs.files"].count_documents({}) == 2

    # Two days old: a three-day grace period keeps it, the default one does not.
    assert cli("--import", module, "sweep", "--grace", "3d", "--json", env=env).json()[
        "files_deleted"] == 0
    swept = cli("--import", module, "sweep", env=env)
    assert swept.code == 0 and "orphaned files deleted: 1" in swept.out
    assert [str(d["_id"]) for d in cli.db["fs.files"].find()] == [kept]

    clean = cli("--import", module, "check", "--verify", env=env)
    assert clean.code == 0 and "OK" in clean.out


def test_put_then_sweep_keeps_the_file_and_check_does_not_report_it(
    cli: CLI, tmp_path: Path
):
    # Models that store files in the bucket `put` writes to, fs: its files are
    # those the sweep judges. A file put has no document to reference it.
    module = f"cli_models_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(MODELS)
    env = _env(PYTHONPATH=str(tmp_path))
    data = b"put from the shell"
    file_id = _put(cli, str(cli.file("notes.txt", data)), "--meta", "owner=ops")

    found = cli("--import", module, "check", "--json", env=env)
    assert found.code == 0 and found.json()["orphaned_files"] == 0, found
    swept = cli("--import", module, "sweep", "--grace", "0", "--json", env=env)
    assert swept.code == 0 and swept.json()["files_deleted"] == 0, swept
    assert cli("cat", file_id).stdout == data

    # It is an asset named after the file; a taken name gets the next one.
    row = cli("info", file_id, "--json").json()
    assert row["asset_id"] == "notes.txt" and row["metadata"] == {"owner": "ops"}
    again = cli("put", "--json", str(cli.file("notes.txt", b"other")))
    assert again.json()[0]["asset_id"] == "notes-2.txt"
    listed = cli("assets", "--bucket", "fs", "--json").json()
    assert sorted(a["asset_id"] for a in listed) == ["notes-2.txt", "notes.txt"]

    # --sweepable: a plain file, which the sweep takes once no document holds it.
    sweepable = _put(cli, "--sweepable", str(cli.file("scratch.txt", b"scratch")))
    found = cli("--import", module, "check", "--json", env=env).json()
    assert [f["file_id"] for f in found["orphaned_file_ids"]] == [sweepable]
    swept = cli("--import", module, "sweep", "--grace", "0", "--json", env=env)
    assert [f["file_id"] for f in swept.json()["deleted_files"]] == [sweepable]
    clean = cli("--import", module, "check", "--verify", env=env)
    assert clean.code == 0 and "OK" in clean.out, clean


def test_put_refuses_metadata_keys_an_asset_keeps_for_itself(cli: CLI):
    result = cli("put", str(cli.file("a.txt", b"a")), "--meta", "size=3")
    assert_one_line_error(result, "'size' is a name")
    assert cli.db["fs.files"].count_documents({}) == 0


def test_sweep_refuses_to_guess_which_files_are_referenced(cli: CLI):
    _put(cli, "--sweepable", str(cli.file("a.txt", b"a")))
    assert_one_line_error(cli("sweep"), "--import")
    assert_one_line_error(cli("sweep", "--bucket", "fs"), "--force")
    forced = cli("sweep", "--bucket", "fs", "--force", "--grace", "0", "--dry-run", "--json")
    assert forced.code == 0 and forced.json()["files_deleted"] == 1
    assert cli.db["fs.files"].count_documents({}) == 1


def test_check_without_models_checks_chunks_of_every_bucket(cli: CLI):
    file_id = _put(cli, str(cli.file("a.txt", b"abc")))
    assert cli("check").code == 0
    from bson import ObjectId

    cli.db["fs.chunks"].delete_many({"files_id": ObjectId(file_id)})
    broken = cli("check", "--json")
    assert broken.code == 3
    report = broken.json()
    assert report["corrupt_files"] == 1 and report["orphaned_files"] == 0
    assert report["unclaimed_buckets"] == ["default:fs"]


# -- directory and S3 storages ------------------------------------------------------------


def test_file_commands_work_on_a_directory_storage(cli: CLI, tmp_path: Path):
    media = tmp_path / "media"
    storage = ("--storage", media.as_uri(), "--collection", "cli_media")
    text = cli.file("marmot.txt", b"Marmota marmota\n")
    blob = cli.file("blob.bin", bytes(range(256)) * 10)
    marmot = _put(cli, str(text), "--meta", "genus=Marmota", *storage)
    other = _put(cli, str(blob), *storage)

    rows = cli(*storage, "ls", "--json").json()
    assert [row["id"] for row in rows] == [marmot, other]
    assert rows[0]["storage"] == "filesystem" and rows[0]["metadata"] == {"genus": "Marmota"}
    key = rows[0]["key"]
    assert key.endswith(".txt") and (media / key).read_bytes() == b"Marmota marmota\n"
    assert cli.db["fs.files"].count_documents({}) == 0  # nothing went to GridFS
    assert cli.db["cli_media.files"].count_documents({}) == 2
    info = cli(*storage, "info", marmot)
    assert info.code == 0 and key in info.out and "marmot.txt" in info.out
    assert cli(*storage, "info", marmot, "--json").json()["key"] == key

    assert cli(*storage, "cat", other).stdout == blob.read_bytes()
    saved = cli(*storage, "get", marmot, "-o", str(tmp_path / "copy.txt"))
    assert saved.code == 0 and (tmp_path / "copy.txt").read_bytes() == b"Marmota marmota\n"
    assert cli(*storage, "verify").code == 0
    (media / key).write_bytes(b"Marmota")  # truncated behind the catalogue's back
    broken = cli(*storage, "verify", "--json")
    assert broken.code == 3, broken
    assert {r["id"]: r["status"] for r in broken.json()} == {marmot: "corrupt", other: "ok"}
    assert_one_line_error(cli("cat", marmot), "no file with id")  # not in GridFS

    removed = cli(*storage, "rm", marmot)
    assert removed.code == 0 and f"deleted {marmot}" in removed.out
    # The file under the key was rewritten behind the catalogue's back: it is not
    # the object the upload committed, so the delete leaves it (nothing deletes an
    # object it did not write); the orphan sweep removes it.
    assert (media / key).read_bytes() == b"Marmota"
    assert [row["id"] for row in cli(*storage, "ls", "--json").json()] == [other]


def test_file_commands_work_on_an_s3_storage(cli: CLI, request: pytest.FixtureRequest):
    pytest.importorskip("aiobotocore")
    bucket = request.getfixturevalue("asyncassets_s3_bucket")
    env = _env(AWS_ACCESS_KEY_ID=bucket.access_key_id,
               AWS_SECRET_ACCESS_KEY=bucket.secret_access_key)
    storage = ("--storage", f"s3://{bucket.name}/media/", "--s3-endpoint", bucket.endpoint_url,
               "--s3-region", bucket.region)
    data = bytes(range(256)) * 40
    file_id = _put(cli, str(cli.file("scan.bin", data)), *storage, env=env)
    rows = cli(*storage, "ls", "--json", env=env).json()
    assert [row["id"] for row in rows] == [file_id] and rows[0]["storage"] == "s3"
    # The default catalogue of S3Storage(bucket, prefix="media/"), as a field's.
    assert cli.db[f"fs_s3_{bucket.name}_media.files"].count_documents({}) == 1
    assert cli(*storage, "cat", file_id, env=env).stdout == data
    verified = cli(*storage, "verify", env=env)
    assert verified.code == 0 and f"OK           {file_id}" in verified.out, verified
    removed = cli(*storage, "rm", file_id, env=env)
    assert removed.code == 0, removed
    assert cli(*storage, "ls", "--json", env=env).json() == []
    assert "Unclosed" not in removed.err  # the client's connections were closed


STORAGE_MODELS = '''
import os

from asyncassets import Document
from asyncassets.fields import FileField
from asyncassets.storage import FileSystemStorage


class CliPoster(Document):
    poster = FileField(
        storage=FileSystemStorage(os.environ["CLI_MEDIA"], collection_name="cli_posters")
    )
    meta = {"collection": "cli_poster_docs"}
'''


def test_sweep_and_check_work_on_the_storage_the_models_declare(cli: CLI, tmp_path: Path):
    module = f"cli_storage_models_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(STORAGE_MODELS)
    media = tmp_path / "media"
    env = _env(PYTHONPATH=str(tmp_path), CLI_MEDIA=str(media))
    storage = ("--storage", media.as_uri(), "--collection", "cli_posters")
    kept = _put(cli, "--sweepable", str(cli.file("kept.txt", b"referenced")), *storage)
    orphan = _put(cli, "--sweepable", str(cli.file("orphan.txt", b"nobody's")), *storage)
    from bson import ObjectId

    cli.db["cli_poster_docs"].insert_one({"poster": ObjectId(kept)})
    two_days_ago = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=2)
    cli.db["cli_posters.files"].update_many({}, {"$set": {"uploadDate": two_days_ago}})
    orphan_key = cli.db["cli_posters.files"].find_one({"_id": ObjectId(orphan)})["location"]["key"]
    stray = media / "stray.bin"  # an object whose upload never inserted its entry
    stray.write_bytes(b"stray")
    os.utime(stray, (two_days_ago.timestamp(), two_days_ago.timestamp()))

    found = cli("--import", module, "check", "--json", env=env)
    assert found.code == 3, found
    report = found.json()
    assert report["orphaned_files"] == 1 and report["orphaned_objects"] == 1
    assert report["orphaned_object_keys"][0]["key"] == "stray.bin"
    assert report["storages"]["default:cli_posters"] == media.as_uri()

    swept = cli("--import", module, "sweep", env=env)
    assert swept.code == 0, swept
    assert "orphaned files deleted: 1" in swept.out and "orphaned objects deleted: 1" in swept.out
    assert not stray.exists() and not (media / orphan_key).exists()
    assert [str(d["_id"]) for d in cli.db["cli_posters.files"].find()] == [kept]
    clean = cli("--import", module, "check", "--verify", env=env)
    assert clean.code == 0 and "OK" in clean.out, clean


# -- bad input ------------------------------------------------------------------------


BAD_INPUT = [
    (["put", "/no/such/file.txt"], "no such file: /no/such/file.txt"),
    (["put", "{tmp}"], "not a regular file"),
    (["put", "{file}", "--meta", "novalue"], "bad --meta 'novalue'"),
    (["put", "{file}", "--meta", "$where=1"], "bad --meta"),
    (["get", "0123456789abcdef01234567"], "no file with id '0123456789abcdef01234567'"),
    (["get", "{known}", "-o", "/no/such/dir/out.txt"], "no such directory"),
    (["cat", "nope"], "no file with id 'nope'"),
    (["info", "nope", "--json"], "no file with id 'nope'"),
    (["rm", "{known}", "nope"], "no file with id 'nope'"),
    (["verify", "nope"], "no file with id 'nope'"),
    (["ls", "--filter", "genus"], "bad --filter 'genus'"),
    (["ls", "--filter", "length=big"], "bad --filter length='big'"),
    (["sweep", "--grace", "1x"], "bad duration '1x'"),
    (["--import", "no_such_module_here", "check"], "cannot import 'no_such_module_here'"),
    (["--timeout", "0", "ls"], "bad --timeout"),
    (["--storage", "ftp://host/x", "ls"], "bad --storage 'ftp://host/x'"),
    (["--storage", "file://media/x", "ls"], "not a host ('media')"),
    (["--storage", "s3:///prefix/", "ls"], "no bucket"),
    (["--collection", "media", "ls"], "--collection names the catalogue of a --storage"),
    (["--storage", "{tmp_uri}", "ls", "--bucket", "fs"], "with --storage, name the catalogue"),
    (["--storage", "{tmp_uri}", "sweep"], "not on a --storage"),
]


def test_bad_input_is_one_line_on_stderr_and_changes_nothing(cli: CLI, tmp_path: Path):
    known = _put(cli, str(cli.file("known.txt", b"keep me")))
    values = {"tmp": str(tmp_path), "file": str(tmp_path / "known.txt"), "known": known,
              "tmp_uri": tmp_path.as_uri()}
    for args, fragment in BAD_INPUT:
        result = cli(*(a.format(**values) for a in args))
        assert_one_line_error(result, fragment)
        assert result.stdout == b"", result
    assert [row["id"] for row in cli("ls", "--json").json()] == [known]


# -- secrets in URIs ---------------------------------------------------------------------

# Each password ends in "cret"; neither it nor the user name may ever be printed.
_SECRET_URIS = [
    # Unescaped '/' or '@' in the password, an upper-case scheme: PyMongo cannot parse them.
    ("mongodb://marmot:se/cret@127.0.0.1:{port}/zoo", "bad URI <unparsable URI>: "),
    ("mongodb://marmot:se@cret@127.0.0.1:{port}/zoo", "bad URI <unparsable URI>: "),
    ("MONGODB://marmot:s3cret@127.0.0.1:{port}/zoo", "bad URI <unparsable URI>: "),
    # PyMongo reads host "marmot", port 1234, database "cret@...": refused, not shown.
    ("mongodb://marmot:1234/cret@127.0.0.1:{port}/zoo", "bad URI <unparsable URI>: "),
    # Valid: shown as its host, port and database only.
    ("mongodb://marmot:s3cret@127.0.0.1:{port}/zoo",
     "cannot reach MongoDB at mongodb://127.0.0.1:{port}/zoo: "),
    ("mongodb://marmot:se%2Fc%40ret@127.0.0.1:{port}/zoo?authSource=admin",
     "cannot reach MongoDB at mongodb://127.0.0.1:{port}/zoo: "),
]


def _assert_no_secret(result: Result) -> None:
    for text in (result.out, result.err):
        assert "cret" not in text and "marmot" not in text and "%2F" not in text, result


@pytest.mark.parametrize(("template", "message"), _SECRET_URIS,
                         ids=["slash", "at", "upper-scheme", "numeric-slash", "valid", "escaped"])
def test_connection_errors_never_print_the_password(template: str, message: str):
    port = _closed_port()
    uri, message = template.format(port=port), message.format(port=port)

    verbose = run("-v", "--uri", uri, "--timeout", "0.5", "ls")
    _assert_no_secret(verbose)
    assert verbose.code == 1, verbose
    assert verbose.err.strip().splitlines()[-1].startswith(f"asyncassets: error: {message}")
    if "unparsable" not in message:
        assert verbose.err.startswith(
            f"asyncassets: using mongodb://127.0.0.1:{port}/zoo (from --uri), database 'zoo'\n"
        ), verbose

    # From the environment, with --db: the URI is still checked before it is used.
    from_env = run("-v", "--db", "other", "--timeout", "0.5", "info", "x",
                   env=_env(ASYNCASSETS_URI=uri))
    _assert_no_secret(from_env)
    assert f"asyncassets: error: {message}" in from_env.err, from_env


def test_demo_never_prints_the_password():
    result = run("--uri", f"mongodb://marmot:se/cret@127.0.0.1:{_closed_port()}/zoo", "demo")
    _assert_no_secret(result)
    assert_one_line_error(result, "bad URI <unparsable URI>")


def test_describe_uri_keeps_hosts_ports_and_database_without_network(monkeypatch):
    import dns.resolver

    def no_network(*args, **kwargs):
        raise AssertionError("describing a URI must not do network I/O")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(dns.resolver, "resolve", no_network)
    monkeypatch.setattr(dns.resolver.Resolver, "resolve", no_network)

    assert describe_uri("mongodb+srv://marmot:s3cret@Cluster0.example.com/zoo?retryWrites=true"
                        ) == "mongodb+srv://cluster0.example.com/zoo"
    assert describe_uri("mongodb://a:b@db1:1,[::1]:2/zoo.animals?replicaSet=rs"
                        ) == "mongodb://db1:1,[::1]:2/zoo"
    assert describe_uri("mongodb://127.0.0.1:27017/") == "mongodb://127.0.0.1:27017/"
    assert describe_uri("mongodb://%2Ftmp%2Fm.sock/zoo") == "mongodb://%2Ftmp%2Fm.sock/zoo"
    for bad in ("mongodb+srv://marmot:se/cret@cluster0.example.com/zoo",
                "mongodb+srv://marmot:s3cret@cluster0.example.com:27017/zoo",
                "MONGODB+SRV://marmot:s3cret@cluster0.example.com/zoo",
                "mongodb://marmot:1234/cret@db1/zoo", "marmot:s3cret@db1", ""):
        assert describe_uri(bad) == "<unparsable URI>", bad


# -- hostile stored names ------------------------------------------------------------------


#: Stored file names that try to rewrite the terminal, fake a row, hide an
#: extension, or climb out of the download directory; with how text output shows them.
HOSTILE_NAMES = {
    "\x1b[2J\x1b[31mevil": "\\x1b[2J\\x1b[31mevil",
    "a\nfake row": "a\\nfake row",
    "\u202egpj.exe": "\\u202egpj.exe",
    "ding\x07\r.txt": "ding\\x07\\r.txt",
    ".bashrc": ".bashrc",
    "../../etc/x": "../../etc/x",
}
HOSTILE_TYPE = "text/plain\x1b[8m"
SHOWN_TYPE = "text/plain\\x1b[8m"
HOSTILE_ID = "\x1b]0;owned\x07"
_RAW_CONTROLS = (b"\x1b", b"\x07", b"\r", "\u202e".encode())


@pytest.fixture
def hostile(cli: CLI) -> dict[str, str]:
    """Files stored under hostile names (by another program): ``{name: id}``."""
    import gridfs

    bucket = gridfs.GridFSBucket(cli.db)
    ids = {
        name: str(bucket.upload_from_stream(name, f"bytes of {name!r}".encode(),
                                            metadata={"content_type": HOSTILE_TYPE}))
        for name in HOSTILE_NAMES
    }
    bucket.upload_from_stream_with_id(HOSTILE_ID, "plain.txt", b"x")
    return ids


def _assert_no_raw_controls(data: bytes) -> None:
    for raw in _RAW_CONTROLS:
        assert raw not in data, data


def test_ls_escapes_control_and_bidi_characters_and_json_keeps_them(
    cli: CLI, hostile: dict[str, str]
):
    result = cli("ls")
    assert result.code == 0, result
    _assert_no_raw_controls(result.stdout)
    header, *lines, last = result.out.split("\n")
    assert header.startswith("ID") and last == ""
    assert len(lines) == len(hostile) + 1  # one row a file: no fake row
    rows = {line[:24].rstrip(): line for line in lines}
    for name, shown in HOSTILE_NAMES.items():
        assert rows[hostile[name]].endswith(f"  {SHOWN_TYPE:<24}  {shown}"), rows
    assert rows["\\x1b]0;owned\\x07"].endswith("  plain.txt")

    exact = cli("ls", "--json")
    _assert_no_raw_controls(exact.stdout)  # JSON has escapes of its own: \u001b
    found = {row["id"]: row for row in exact.json()}
    for name, file_id in hostile.items():
        assert found[file_id]["filename"] == name
        assert found[file_id]["content_type"] == HOSTILE_TYPE
    assert found[HOSTILE_ID]["filename"] == "plain.txt"


def test_info_escapes_control_and_bidi_characters(cli: CLI, hostile: dict[str, str]):
    for name, shown in HOSTILE_NAMES.items():
        result = cli("info", hostile[name])
        assert result.code == 0, result
        _assert_no_raw_controls(result.stdout)
        fields = dict(line.split(None, 1) for line in result.out.splitlines())
        assert fields["filename"] == shown
        assert fields["content_type"] == SHOWN_TYPE
        exact = cli("info", hostile[name], "--json").json()
        assert exact["filename"] == name and exact["content_type"] == HOSTILE_TYPE
    by_id = cli("info", HOSTILE_ID)
    _assert_no_raw_controls(by_id.stdout)
    assert by_id.out.splitlines()[0] == "id            \\x1b]0;owned\\x07"


def test_verify_and_rm_escape_a_hostile_id(cli: CLI, hostile: dict[str, str]):
    verified = cli("verify", HOSTILE_ID)
    _assert_no_raw_controls(verified.stdout)
    assert verified.out.startswith("UNVERIFIABLE \\x1b]0;owned\\x07  ("), verified
    removed = cli("rm", HOSTILE_ID)
    assert removed.code == 0 and removed.stdout == b"deleted \\x1b]0;owned\\x07\n", removed


def test_get_names_the_download_as_a_file_field_would(
    cli: CLI, hostile: dict[str, str], tmp_path: Path
):
    out = tmp_path / "out"
    out.mkdir()
    written = {
        "\x1b[2J\x1b[31mevil": "[2J[31mevil",
        "a\nfake row": "afake row",
        "\u202egpj.exe": "gpj.exe",  # no longer disguised as exe.jpg
        "ding\x07\r.txt": "ding.txt",
        ".bashrc": "bashrc",
        "../../etc/x": "x",  # never outside the directory
    }
    for name, local in written.items():
        result = cli("get", hostile[name], "-o", str(out))
        assert result.code == 0, result
        _assert_no_raw_controls(result.err.encode())
        data = f"bytes of {name!r}".encode()
        assert result.err == f"asyncassets: wrote {len(data)} bytes to {out / local}\n"
        assert (out / local).read_bytes() == data
    assert sorted(p.name for p in out.iterdir()) == sorted(written.values())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_get_never_overwrites_without_force(cli: CLI, hostile: dict[str, str], tmp_path: Path):
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_bytes(b"my dotfile")
    (home / "bashrc").write_bytes(b"my notes")
    elsewhere = tmp_path / "elsewhere"
    (home / "x").symlink_to(elsewhere)  # a link pointing nowhere is still a file there
    dotfile = hostile[".bashrc"]

    for args, target in [
        (["-o", str(home)], home / "bashrc"),            # a directory: the stored name in it
        (["-o", str(home / "bashrc")], home / "bashrc"),  # a file named outright
        (["-o", str(home / ".bashrc")], home / ".bashrc"),
        ([], Path("bashrc")),                              # the stored name, here
    ]:
        refused = cli("get", dotfile, *args, cwd=home)
        assert_one_line_error(refused, f"{target} already exists: pass --force")
    refused = cli("get", hostile["../../etc/x"], "-o", str(home))
    assert_one_line_error(refused, f"{home / 'x'} already exists")
    assert (home / ".bashrc").read_bytes() == b"my dotfile"
    assert (home / "bashrc").read_bytes() == b"my notes"
    assert not elsewhere.exists() and (home / "x").is_symlink()
    assert sorted(p.name for p in home.iterdir()) == [".bashrc", "bashrc", "x"]  # no .part

    forced = cli("get", dotfile, "-o", str(home), "--force")
    assert forced.code == 0, forced
    assert (home / "bashrc").read_bytes() == b"bytes of '.bashrc'"
    assert (home / ".bashrc").read_bytes() == b"my dotfile"  # a dot file is never the target


# -- put names files as a FileField does ---------------------------------------------------


_NAMES_ALIAS = "cli_names_writer"


class CliNamed(Document):
    data = FileField()
    meta = {"collection": "cli_named", "db_alias": _NAMES_ALIAS}


def _field_names(cli: CLI, names: list[str]) -> list[str]:
    """The file names a ``FileField`` stores for ``names``, as an application would."""

    async def store() -> list[str]:
        connect(host=cli.uri, db=cli.db_name, alias=_NAMES_ALIAS)
        try:
            stored = []
            for name in names:
                doc = CliNamed()
                await doc.data.put(b"x", filename=name)
                await doc.save()
                stored.append(doc.data.filename)
            return stored
        finally:
            await disconnect(_NAMES_ALIAS)

    return asyncio.run(store())


def test_put_stores_the_name_a_file_field_stores(cli: CLI, tmp_path: Path):
    names = ["\x1b[31mred.txt", "\u202egpj.exe", " spaced out.txt ", ".hidden", "tab\there.txt"]
    src = tmp_path / "src"
    src.mkdir()
    ids = [_put(cli, str(cli.file(f"src/{name}", b"x"))) for name in names]
    from bson import ObjectId

    stored = [cli.db["fs.files"].find_one({"_id": ObjectId(i)})["filename"] for i in ids]
    assert stored == _field_names(cli, names) == [
        "[31mred.txt", "gpj.exe", "spaced out.txt", "hidden", "tabhere.txt"
    ]


def test_put_refuses_a_name_a_file_field_refuses(cli: CLI, tmp_path: Path):
    dots = cli.file("...", b"x")
    good = cli.file("good.txt", b"x")
    assert_one_line_error(cli("put", str(good), str(dots)), "cannot store the name of")
    assert cli.db["fs.files"].count_documents({}) == 0  # checked before any upload


def test_usage_errors_exit_2():
    assert run().code == 2
    assert run("put").code == 2
    assert run("frobnicate").code == 2


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_server_names_the_uri_without_the_password():
    port = _closed_port()
    uri = f"mongodb://marmot:s3cret@127.0.0.1:{port}/zoo"
    result = run("--uri", uri, "--timeout", "0.5", "ls")
    assert_one_line_error(result, f"cannot reach MongoDB at mongodb://127.0.0.1:{port}/zoo: ")
    assert "s3cret" not in result.err and "marmot" not in result.err

    from_env = run("ls", "--timeout", "0.5", env=_env(ASYNCASSETS_URI=uri, MONGODB_URI="x"))
    assert_one_line_error(from_env, f"cannot reach MongoDB at mongodb://127.0.0.1:{port}/zoo")

    debug = run("--uri", uri, "--timeout", "0.5", "--debug", "cat", "x")
    assert debug.code == 1 and "Traceback" in debug.err
    assert debug.err.strip().splitlines()[-1].startswith("asyncassets: error: cannot reach")

    assert_one_line_error(run("--uri", "mongodb://u:pw@[oops", "ls"), "bad URI <unparsable URI>")


def test_parse_duration():
    assert parse_duration("1d12h") == dt.timedelta(hours=36)
    assert parse_duration("90") == dt.timedelta(seconds=90)
    assert parse_duration("2w") == dt.timedelta(weeks=2)
    assert parse_duration("0") == dt.timedelta(0)


# -- the embedded default and the demo ---------------------------------------------------


def _server_processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline and "pytest" not in cmdline:
            pids.append(int(entry.name))
    return pids


def _stop_leftovers(text: str) -> list[int]:
    leftovers = _server_processes_mentioning(text)
    for pid in leftovers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return leftovers


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc to find leftover servers")
def test_embedded_default_on_a_fresh_data_directory(tmp_path: Path):
    data = tmp_path / "fresh-data"
    env = _env(ASYNCASSETS_DATA_DIR=str(data))
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(b"\xff\xd8 not really a jpeg")
    try:
        put = run("-v", "put", str(photo), env=env, cwd=tmp_path)
        assert put.code == 0, put
        file_id = put.out.strip()
        assert "embedded" in put.err and str(data) in put.err
        assert not _server_processes_mentioning(str(data))  # stopped with the command

        listing = run("ls", "--json", env=env, cwd=tmp_path)  # a new server, same data
        assert listing.code == 0, listing
        [row] = listing.json()
        assert row["id"] == file_id and row["content_type"] == "image/jpeg"
        assert listing.err == ""  # quiet without -v
        assert run("cat", file_id, env=env).stdout == photo.read_bytes()
        assert (data / "asyncassets-cli.lock").exists()
    finally:
        assert _stop_leftovers(str(data)) == []


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc to find leftover servers")
def test_demo_runs_on_a_throwaway_server_and_stops_it(tmp_path: Path):
    result = run("demo", env=_env(ASYNCASSETS_DATA_DIR=str(tmp_path / "unused")))
    assert result.code == 0, result
    for step in ("[1/6] put", "[2/6] read", "[3/6] stream", "[4/6] replace", "[5/6] delete",
                 "[6/6] check"):
        assert step in result.out
    assert "identical" in result.out and "consistent" in result.out
    port = int(re.search(r"server at mongodb://127\.0\.0\.1:(\d+)/", result.out)[1])
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0  # nothing listens any more
    assert not (tmp_path / "unused").exists()  # the demo never touches the data directory


def test_demo_on_a_given_server_drops_its_scratch_database(cli: CLI):
    result = run("--uri", cli.uri, "demo")
    assert result.code == 0, result
    name = re.search(r"scratch database '([^']+)'", result.out)[1]
    assert name not in cli.client.list_database_names()


@pytest.mark.parametrize("option", [["--import", "nosuchmod"], ["--db", "mine"],
                                    ["--storage", "file:///tmp/x"]])
def test_demo_refuses_the_options_it_would_ignore(option: list[str]):
    result = run("demo", *option)
    assert result.code == 2, result
    assert f"demo takes no {option[0]}" in result.err


def test_demo_help_says_which_server_it_uses():
    result = run("demo", "--help")
    assert result.code == 0
    text = " ".join(result.out.split())
    assert "never on the embedded default's data nor on $ASYNCASSETS_URI" in text


def test_get_writes_files_with_the_users_umask(cli: CLI, tmp_path: Path):
    file_id = _put(cli, str(cli.file("mode.txt", b"bytes")))
    out = tmp_path / "out"
    out.mkdir()
    for umask, mode in ((0o022, 0o644), (0o077, 0o600)):
        target = out / f"got-{umask:o}.txt"
        proc = subprocess.run(
            ["sh", "-c", f'umask {umask:03o} && exec "$0" -m asyncassets "$@"',
             sys.executable, "--uri", cli.uri, "--db", cli.db_name, "get", file_id,
             "-o", str(target)],
            env=_env(), capture_output=True, timeout=120, check=False,
        )
        assert proc.returncode == 0, proc.stderr
        assert stat.S_IMODE(target.stat().st_mode) == mode


@pytest.mark.skipif(not Path("/proc/locks").exists(), reason="names the holder from /proc/locks")
def test_a_data_directory_held_by_another_server_is_named_with_its_process(tmp_path: Path):
    from asyncassets.embedded import EmbeddedServer

    data = tmp_path / "data"
    holder = EmbeddedServer(data).start()  # say, a script of the user's on the default data
    try:
        result = run("ls", env=_env(ASYNCASSETS_DATA_DIR=str(data)))
        assert_one_line_error(result, f"The data directory {data} is in use by another server")
        assert f"pid {holder.pid}" in result.err
        assert "(--debug shows its log)" in result.err
    finally:
        holder.stop()


def test_no_server_to_start_points_at_uri_and_asyncassets_uri(tmp_path: Path):
    empty = tmp_path / "bin"
    empty.mkdir()
    result = run("ls", env=_env(ASYNCASSETS_SERVER="mongod", PATH=str(empty),
                                ASYNCASSETS_DATA_DIR=str(tmp_path / "data")))
    assert_one_line_error(result, "no embedded server to start")
    assert "--uri or $ASYNCASSETS_URI" in result.err
    assert "pip install 'asyncassets[embedded]'" in result.err
    assert "--debug shows its log" not in result.err and "test plugin" not in result.err


# -- progress and docs ---------------------------------------------------------------


def test_no_progress_output_when_stderr_is_piped(cli: CLI):
    big = cli.file("big.bin", os.urandom(5 * 1024 * 1024))
    result = cli("put", str(big))
    assert result.code == 0 and result.err == ""
    got = cli("get", result.out.strip(), "-o", str(cli.tmp_path / "back.bin"))
    assert got.err.strip() == f"asyncassets: wrote {5 * 1024 * 1024} bytes to " \
                              f"{cli.tmp_path / 'back.bin'}"


@pytest.mark.skipif(importlib.util.find_spec("tqdm") is None, reason="tqdm is not installed")
@pytest.mark.skipif(sys.platform == "win32", reason="needs a pty")
def test_progress_bar_on_a_terminal_for_big_transfers(cli: CLI):
    import fcntl
    import pty
    import struct
    import termios

    big = cli.file("big.bin", os.urandom(5 * 1024 * 1024))
    leader, follower = pty.openpty()
    # A terminal of 24 x 100: tqdm draws nothing on a zero-width one.
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    try:
        result = cli("put", str(big), stderr=follower)
        os.close(follower)
        follower = -1
        seen = b""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                chunk = os.read(leader, 65536)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(leader)
        if follower != -1:
            os.close(follower)
    assert result.code == 0
    assert b"put big.bin" in seen and b"%" in seen


def _help_commands() -> list[str]:
    result = run("--help")
    assert result.code == 0
    # argparse lists the commands under COMMAND, indented by four spaces.
    commands = re.findall(r"^    ([a-z]+)\s", result.out, flags=re.MULTILINE)
    assert commands, result.out
    return commands


def test_every_command_and_option_in_help_is_documented():
    text = DOCS.read_text()
    commands = _help_commands()
    assert {"put", "get", "cat", "ls", "info", "rm", "verify", "sweep", "check", "demo"} <= set(
        commands
    )
    parser = build_parser()
    common = {o for a in parser._actions for o in a.option_strings if o.startswith("--")}
    for option in common - {"--help"}:
        assert option in text, f"docs/cli.rst does not mention the global {option}"
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    for name in commands:
        # A section: its title underlined with ~, up to the next title.
        match = re.search(rf"^asyncassets {name}\n~+\n(.*?)(?=^\S[^\n]*\n~+\n|\Z)", text,
                          flags=re.MULTILINE | re.DOTALL)
        assert match, f"docs/cli.rst has no section `asyncassets {name}`"
        section = match[1]
        for action in subparsers[name]._actions:
            for option in action.option_strings:
                if option.startswith("--") and option not in common:
                    assert option in section, f"docs/cli.rst: `{name}` does not mention {option}"


def test_every_command_has_help(capsys):
    parser = build_parser()
    for name in _help_commands():
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args([name, "--help"])
        assert exit_info.value.code == 0
        assert f"usage: asyncassets {name}" in capsys.readouterr().out


# -- every command line the docs show ----------------------------------------------

#: What separates two commands of a shell line.
_SHELL_SEPARATOR = re.compile(r"\s(?:&&|\|\||;|&)\s|;\s*$|;(?=\s*\S)")
#: Where a command's arguments end: a pipe, a redirection, a comment.
_ARGS_END = re.compile(r"\s(?:\||#)(?:\s|$)|\s\d?>|\s<")
#: A command that runs asyncassets: ``asyncassets``, ``python -m asyncassets``,
#: ``.venv/bin/python -m asyncassets`` (after a cron schedule or a ``$`` prompt).
_RUNS_IT = re.compile(r"(?:^|\s)(?:\S*python3? -m )?asyncassets(?=\s|$)(.*)")


def _invocations(text: str, shell: bool = True) -> list[str]:
    """The argument strings of each ``asyncassets`` command in a line of shell (or,
    not ``shell``, of a synopsis, where ``|`` separates alternatives)."""
    found = []
    for segment in _SHELL_SEPARATOR.split(text) if shell else [text]:
        words = segment.split()
        if not words or words[0] in ("pip", "pip3") or "install" in words[:3]:
            continue
        match = _RUNS_IT.search(segment)
        if match:
            rest = match[1]
            end = _ARGS_END.search(rest) if shell else None
            found.append((rest[: end.start()] if end else rest).strip())
    return found


def _documented_command_lines() -> list[tuple[str, str, bool]]:
    """``(where, arguments, from a code block)`` of every asyncassets command line in
    the README and the docs: shell lines in code blocks (``$ asyncassets ...``,
    ``python -m asyncassets ...``, cron lines) and inline literals in the prose."""
    from _docs import PAGES, code_lines, inline_literals

    lines: list[tuple[str, str, bool]] = []
    for page in PAGES:
        joined: list[tuple[int, str]] = []
        for number, line in code_lines(page):
            if joined and joined[-1][1].endswith("\\"):  # a continued shell line
                joined[-1] = (joined[-1][0], joined[-1][1][:-1] + " " + line.strip())
            else:
                joined.append((number, line.strip()))
        for number, line in joined:
            text = line.removeprefix("$ ")
            if "asyncassets" not in text or text.startswith(("from ", "import ", ">>>")):
                continue
            if "=" in text.split("asyncassets")[0] and "&&" not in text:
                continue  # a Python assignment, or an environment variable's value
            for args in _invocations(text):
                lines.append((f"{page.name}:{number}", args, True))
        for number, literal in inline_literals(page):
            if literal.startswith(("asyncassets ", "python -m asyncassets ")):
                for args in _invocations(literal, shell=False):
                    lines.append((f"{page.name}:{number}", args, False))
    return lines


def _options_of(parser) -> set[str]:
    return {o for a in parser._actions for o in a.option_strings}


def test_every_command_line_the_docs_show_exists():
    """Each ``asyncassets`` line of the README and the docs names a command and
    options that exist: lines of code blocks are parsed by the command's own
    parser as written (and their storage options checked as a run checks them);
    synopses (``FILE...``, ``[--json]``) and the prose's inline ones have each
    command and option looked up."""
    import shlex

    from asyncassets.cli.storages import storage_from

    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    shared = _options_of(parser)
    problems: list[str] = []
    lines = _documented_command_lines()
    assert len(lines) > 40, lines  # the pages were found and read
    for where, args, in_code in lines:
        try:
            argv = shlex.split(args)
        except ValueError as exc:
            problems.append(f"{where}: {args!r}: {exc}")
            continue
        synopsis = any(t.endswith("...") or t.startswith("[") or t.endswith("]")
                       or t == "|" for t in argv)
        if in_code and not synopsis and argv not in ([], ["..."]):
            try:
                parsed = parser.parse_args(argv)
            except SystemExit:
                problems.append(f"{where}: `asyncassets {args}` is refused by the parser")
                continue
            if parsed.command not in ("demo", None):
                try:
                    storage_from(parsed)
                except Exception as exc:
                    problems.append(f"{where}: `asyncassets {args}`: {exc}")
            continue
        words = [t.strip("[]") for t in argv]
        named = [w for w in words if w in commands]
        known = shared | (_options_of(commands[named[0]]) if named else set())
        if not named and not any(w.startswith("-") for w in words):
            problems.append(f"{where}: `asyncassets {args}` names no command")
        for word in words:
            option = word.split("=", 1)[0]
            if option.startswith("-") and option not in known:
                problems.append(f"{where}: `asyncassets {args}`: no option {option}")
    assert not problems, "\n".join(problems)

