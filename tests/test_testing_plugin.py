"""The pytest plugin, run the way users run it: an inner suite in a pytest subprocess."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

import asyncassets.testing

pytest_plugins = ["pytester"]

_REPO = Path(asyncassets.testing.__file__).resolve().parents[1]

_CONFTEST = 'pytest_plugins = ["asyncassets.testing"]\n'

# Two tests in file order: the first writes, the second must see none of it.
_ISOLATION_SUITE = """
import pytest

from asyncassets.connection import get_db, registered_aliases

seen = {}

MARK
async def test_saves_a_document(asyncassets_db):
    await asyncassets_db.animals.insert_one({"genus": "Marmota"})
    assert await asyncassets_db.animals.count_documents({}) == 1
    assert get_db().name == asyncassets_db.name
    seen["first"] = asyncassets_db.name

MARK
async def test_gets_a_fresh_empty_database(asyncassets_db):
    assert asyncassets_db.name != seen["first"]
    assert await asyncassets_db.list_collection_names() == []
    names = await asyncassets_db.client.list_database_names()
    assert seen["first"] not in names, "the previous test's database was not dropped"

MARK
async def test_extra_aliases_get_their_own_databases(asyncassets_db, asyncassets_connect):
    archive = asyncassets_connect("archive")
    assert archive.name != asyncassets_db.name
    assert get_db("archive").name == archive.name
    await archive.things.insert_one({"x": 1})
    assert await asyncassets_db.things.count_documents({}) == 0
    seen["archive"] = archive.name

MARK
async def test_extra_aliases_are_dropped_and_disconnected(asyncassets_db):
    assert "archive" not in registered_aliases()
    assert seen["archive"] not in await asyncassets_db.client.list_database_names()

def test_no_connection_outlives_its_test():
    assert registered_aliases() == []
"""


def _run(pytester: pytest.Pytester, mode: str, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess(
        "-p", "no:cacheprovider",
        "-o", f"asyncio_mode={mode}",
        "-o", "asyncio_default_fixture_loop_scope=function",
        *args,
    )  # fmt: skip


@pytest.fixture
def inner(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """A pytester whose subprocess can import asyncassets from this checkout."""
    path = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", str(_REPO) + (os.pathsep + path if path else ""))
    pytester.makeconftest(_CONFTEST)
    return pytester


@pytest.fixture
def shared_server(inner: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, asyncassets_server_uri):
    """Point the inner run at this session's server instead of starting another."""
    monkeypatch.setenv("MONGODB_URI", asyncassets_server_uri)
    return inner


@pytest.mark.parametrize(
    ("mode", "mark"),
    [("auto", ""), ("auto", "@pytest.mark.asyncio"), ("strict", "@pytest.mark.asyncio")],
)
def test_each_test_gets_a_fresh_database_in_auto_and_strict_mode(shared_server, mode, mark):
    shared_server.makepyfile(test_inner=_ISOLATION_SUITE.replace("MARK", mark))
    result = _run(shared_server, mode)
    result.assert_outcomes(passed=5)


def test_server_fixture_is_skipped_with_a_reason_under_mongodb_uri(shared_server):
    shared_server.makepyfile(
        test_inner="""
        def test_kills_its_server(asyncassets_server):
            asyncassets_server.kill()
        """
    )
    result = _run(shared_server, "auto", "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*MONGODB_URI is set*"])


def test_plugin_starts_its_own_server_and_stops_it_at_session_end(inner, monkeypatch, tmp_path):
    monkeypatch.delenv("MONGODB_URI", raising=False)
    pid_file = tmp_path / "pid"
    inner.makepyfile(
        test_inner=textwrap.dedent(
            f"""
            from pathlib import Path

            async def test_the_embedded_server_serves(asyncassets_server, asyncassets_db):
                Path({str(pid_file)!r}).write_text(str(asyncassets_server.pid))
                await asyncassets_db.animals.insert_one({{"genus": "Marmota"}})
                assert await asyncassets_db.animals.count_documents({{}}) == 1

            async def test_it_survives_a_crash_and_restart(asyncassets_server, asyncassets_db):
                asyncassets_server.kill()
                asyncassets_server.start()
                await asyncassets_db.animals.insert_one({{"genus": "Castor"}})
                assert await asyncassets_db.animals.count_documents({{}}) == 1
            """
        )
    )
    result = _run(inner, "auto")
    result.assert_outcomes(passed=2)
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the session's server is gone with the session


def test_strict_mode_without_marks_does_not_run_async_tests_silently(shared_server):
    # Documented: strict mode needs @pytest.mark.asyncio. pytest-asyncio must
    # not hand such a test the fixture; whatever it reports, it is not a pass.
    shared_server.makepyfile(
        test_inner="""
        async def test_unmarked(asyncassets_db):
            await asyncassets_db.animals.insert_one({"genus": "Marmota"})
        """
    )
    result = _run(shared_server, "strict")
    assert result.parseoutcomes().get("passed", 0) == 0


def test_teardown_survives_a_server_killed_and_restarted_by_the_test(inner, monkeypatch):
    # The documented pattern: kill the server, see what the code does, start it again.
    # Teardown then drops each database on connections pooled before the kill.
    monkeypatch.delenv("MONGODB_URI", raising=False)
    inner.makepyfile(
        test_inner="""
        async def test_kills_and_restarts_the_server(asyncassets_server, asyncassets_db,
                                                     asyncassets_connect):
            archive = asyncassets_connect("archive")
            await asyncassets_db.animals.insert_one({"genus": "Marmota"})
            await archive.animals.insert_one({"genus": "Castor"})
            asyncassets_server.kill()
            asyncassets_server.start()

        async def test_restarts_without_touching_the_pool(asyncassets_server, asyncassets_db):
            await asyncassets_db.animals.insert_one({"genus": "Marmota"})
            asyncassets_server.stop()
            asyncassets_server.start()

        async def test_the_next_test_gets_a_working_database(asyncassets_db):
            await asyncassets_db.animals.insert_one({"genus": "Marmota"})
            assert await asyncassets_db.animals.count_documents({}) == 1
        """
    )
    result = _run(inner, "auto")
    result.assert_outcomes(passed=3, errors=0)


# Document classes declared in one test, seen (or not) by the next ones. The first
# test's directory is gone once it ends: its class, still counted, would make every
# later sweep work on a directory that is no more, and a class giving a catalogue
# another storage would be refused at declaration.
_CLASSES_SUITE = """
import pytest

from asyncassets import Document, check, sweep_orphans
from asyncassets.fields import FileField
from asyncassets.schema import document_classes
from asyncassets.storage import FileSystemStorage

import models  # a models module imported by a test: its class stays

MARK_FIRST
async def test_declares_a_class(asyncassets_db, tmp_path):
    class Scratch(Document):
        f = FileField(storage=FileSystemStorage(tmp_path / "media", collection_name="media"))

    doc = Scratch()
    await doc.f.put(b"bytes")
    await doc.save()
    assert Scratch in document_classes()

MARK_SECOND
async def test_the_next_test_does_not_see_it(asyncassets_db, tmp_path):
    assert [c.__name__ for c in document_classes()] == EXPECTED
    # The same catalogue on another directory: refused only if Scratch is still counted.
    class Other(Document):
        f = FileField(storage=FileSystemStorage(tmp_path / "other", collection_name="media"))

    assert (await sweep_orphans(grace=0)).files_deleted == 0
    assert (await check()).ok
"""

_MODELS = """
from asyncassets import Document
from asyncassets.fields import FileField

class Kept(Document):
    f = FileField()
"""


def _classes_suite(inner: pytest.Pytester, first: str, second: str, expected: str) -> None:
    inner.makepyfile(
        models=_MODELS,
        test_inner=_CLASSES_SUITE.replace("MARK_FIRST", first)
        .replace("MARK_SECOND", second)
        .replace("EXPECTED", expected),
    )


def test_classes_a_test_declares_are_forgotten_when_it_ends(shared_server):
    _classes_suite(shared_server, "", "", '["Kept"]')
    result = _run(shared_server, "auto")
    result.assert_outcomes(passed=2)


def test_a_marked_test_keeps_the_classes_it_declares(shared_server):
    _classes_suite(
        shared_server, "@pytest.mark.asyncassets_keep_document_classes", "", '["Kept", "Scratch"]'
    )
    result = _run(shared_server, "auto")
    # Scratch is still counted: declaring Other is refused.
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*StorageConflict*catalogue 'media'*"])


def test_the_ini_option_keeps_every_test_s_classes(shared_server):
    _classes_suite(shared_server, "", "", '["Kept", "Scratch"]')
    result = _run(shared_server, "auto", "-o", "asyncassets_forget_document_classes=false")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*StorageConflict*catalogue 'media'*"])


_SUBCLASS_SUITE = """
from asyncassets import Document, check
from asyncassets.fields import FileField
from asyncassets.schema import document_classes
from asyncassets.storage import FileSystemStorage


class Parent(Document):
    meta = {"allow_inheritance": True}


async def test_one(asyncassets_db, tmp_path):
    class Child(Parent):
        f = FileField(storage=FileSystemStorage(tmp_path / "child"))

    child = Child()
    await child.f.put(b"1")
    await child.save()


async def test_two(asyncassets_db, tmp_path):
    # The first Child (another directory, the same default catalogue) is gone,
    # though Parent, a module global, was its base.
    assert [c.__name__ for c in document_classes()] == ["Parent"]
    assert Parent._subclasses == ("Parent",)
    assert Parent._fields["id"].owner_document is Parent

    class Child(Parent):
        f = FileField(storage=FileSystemStorage(tmp_path / "child"))

    child = Child()
    await child.f.put(b"2")
    await child.save()
    assert (await check()).ok
"""


def test_a_subclass_of_a_module_s_class_is_forgotten_too(shared_server):
    """Found by a hostile review: mongoengine lists a subclass in its base's
    ``_subclasses`` and makes it the owner of the fields they share, so the base
    (a module global) kept it alive and the second test's class was refused."""
    shared_server.makepyfile(test_inner=_SUBCLASS_SUITE)
    result = _run(shared_server, "auto")
    result.assert_outcomes(passed=2)


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("mongodb://h:1/", "mongodb://h:1/aa_t"),
        ("mongodb://h:1", "mongodb://h:1/aa_t"),
        ("mongodb://db1,db2/?replicaSet=rs0", "mongodb://db1,db2/aa_t?replicaSet=rs0"),
        ("mongodb://u:p@h/admin?authSource=admin", "mongodb://u:p@h/aa_t?authSource=admin"),
        ("mongodb+srv://c.example.net/?w=majority", "mongodb+srv://c.example.net/aa_t?w=majority"),
        ("mongodb://h?replicaSet=x", "mongodb://h/aa_t?replicaSet=x"),
    ],
)
def test_database_uri_names_the_database_and_keeps_the_options(uri: str, expected: str) -> None:
    """A MONGODB_URI with a replica set's options stays one (appending "/name" to it
    made ``...?replicaSet=rs0/aa_t``)."""
    from asyncassets._driver import parse_uri  # no DNS lookup of mongodb+srv
    from asyncassets.testing import database_uri

    assert database_uri(uri, "aa_t") == expected
    assert parse_uri(expected)["database"] == "aa_t"
