"""docs/migration.rst's side-by-side port: a mongoengine module and its asyncassets
port (``await`` added, nothing else), run against the same data (issue 24, item 4).

Each library runs in a process of its own (both declare a class ``Animal``, and
mongoengine's document registry is global), connected to the test's database;
they take turns on the same documents and files, and each one's answers are
compared with the other's.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pymongo

REPO = Path(__file__).resolve().parents[1]
PORT = REPO / "examples" / "port"

_RUNNER = """
import asyncio, inspect, json, sys
sys.path.insert(0, {port!r})
if {library!r} == "mongoengine":
    import mongoengine
    mongoengine.connect(host={uri!r}, uuidRepresentation="standard")
    import zoo_mongoengine as zoo
else:
    import asyncassets
    asyncassets.connect({uri!r})
    import zoo_asyncassets as zoo

def plain(value):
    if isinstance(value, bytes):
        return {{"bytes": value.hex()}}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return None if value is None or value.__class__.__name__ == "Animal" else value

async def main():
    results = []
    for op, *args in json.loads(sys.argv[1]):
        args = [bytes.fromhex(a[6:]) if str(a).startswith("bytes:") else a for a in args]
        result = getattr(zoo, op)(*args)
        if inspect.isawaitable(result):
            result = await result
        results.append(plain(result))
    print(json.dumps(results))

asyncio.run(main())
"""


def run(library: str, uri: str, *ops: tuple[Any, ...]) -> list[Any]:
    script = _RUNNER.format(port=str(PORT), library=library, uri=uri)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps(ops)],
        env=env, capture_output=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()
    return list(json.loads(done.stdout.decode().splitlines()[-1]))


def data(text: str) -> str:
    return "bytes:" + text.encode().hex()


def read(text: str) -> dict[str, str]:
    return {"bytes": text.encode().hex()}


def test_the_port_differs_only_by_await_async_and_imports() -> None:
    def body(name: str) -> list[str]:
        text = (PORT / name).read_text(encoding="utf-8")
        text = text[text.index('"""', 3) + 3 :]  # after the module docstring
        lines = []
        for line in text.splitlines():
            if line.startswith(("import ", "from ")):
                continue
            lines.append(re.sub(r"\b(await|async) ", "", line))
        return lines

    assert body("zoo_asyncassets.py") == body("zoo_mongoengine.py")
    docs = (REPO / "docs" / "migration.rst").read_text(encoding="utf-8")
    assert "literalinclude:: ../examples/port/zoo_mongoengine.py" in docs
    assert "literalinclude:: ../examples/port/zoo_asyncassets.py" in docs


def test_mongoengine_and_its_port_share_the_data_and_answer_alike(
    asyncassets_db: Any, asyncassets_server_uri: str
) -> None:
    uri = asyncassets_server_uri + asyncassets_db.name
    # mongoengine writes; the port reads what it wrote, and changes it.
    run("mongoengine", uri, ("add", "Marmota", data("marmot"), "m.png"),
        ("add", "Castor", data("beaver"), "c.png"))  # fmt: skip
    seen = run("asyncassets", uri, ("describe", "Marmota"), ("describe", "Castor"),
               ("change_photo", "Castor", data("a new beaver")),
               ("add", "Vulpes", data("fox"), "v.png"), ("names",))  # fmt: skip
    assert seen[:2] == [
        ["Marmota", True, 6, read("marmot")],
        ["Castor", True, 6, read("beaver")],
    ]
    assert seen[-1] == ["Castor", "Marmota", "Vulpes"]
    # mongoengine reads what the port wrote, and both describe it alike.
    ops = [("describe", g) for g in ("Castor", "Vulpes")]
    by_mongoengine = run("mongoengine", uri, *ops, ("remove", "Marmota"), ("names",))
    by_port = run("asyncassets", uri, *ops)
    assert by_mongoengine[:2] == by_port == [
        ["Castor", True, 12, read("a new beaver")],
        ["Vulpes", True, 3, read("fox")],
    ]
    assert by_mongoengine[-1] == ["Castor", "Vulpes"]
    run("asyncassets", uri, ("change_photo", "Vulpes", data("a red fox")), ("remove", "Castor"))
    assert run("mongoengine", uri, ("describe", "Vulpes"), ("names",)) == [
        ["Vulpes", True, 9, read("a red fox")],
        ["Vulpes"],
    ]
    # Every replaced or removed file is gone, whichever library replaced it.
    with pymongo.MongoClient(uri) as client:
        db = client.get_default_database()
        assert [f["length"] for f in db["fs.files"].find()] == [9]
        assert db["fs.chunks"].count_documents({}) == 1
