"""The documentation's code fits the page: no code line over 88 characters.

The docs site's theme (Furo) shows about 88 characters of code at 1200 px; a
longer line scrolls sideways and hides its end (an end-of-line comment, often).
Checked: every code block and literal block (``::``) of ``docs/*.rst`` and
``README.rst``, and the files ``literalinclude`` shows. .ci/run runs this first.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from _docs import PAGES, REPO, code_lines, included_files

MAX = 88


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_no_code_line_is_over_88_characters(page: Path) -> None:
    long = [
        f"{page.name}:{number}: {len(line)} characters: {line.strip()[:60]}..."
        for number, line in code_lines(page)
        # The block's own indentation is the page's, not the code's.
        if len(line) - _block_indent(line) > MAX
    ]
    for shown in included_files(page):
        long += [
            f"{shown.relative_to(REPO)}:{number}: {len(line)} characters (shown by "
            f"{page.name})"
            for number, line in enumerate(shown.read_text(encoding="utf-8").splitlines(), 1)
            if len(line) > MAX
        ]
    assert not long, "code lines over 88 characters:\n" + "\n".join(long)


def _block_indent(line: str) -> int:
    # Code blocks are indented three spaces in this project's pages.
    return min(3, len(line) - len(line.lstrip()))


def test_the_checker_finds_code_in_every_kind_of_block(tmp_path: Path) -> None:
    page = tmp_path / "page.rst"
    page.write_text(
        "Title\n=====\n\n"
        "Text with a literal block::\n\n   literal = 1\n\nText.\n\n"
        ".. code-block:: python\n   :caption: example\n\n   code = 2\n   more = 3\n\n"
        ".. note::\n\n   Not code.\n\n"
        "- A list item::\n\n     nested = 4\n\nEnd.\n"
    )
    assert [line.strip() for _n, line in code_lines(page) if line.strip()] == [
        "literal = 1", "code = 2", "more = 3", "nested = 4",
    ]


# -- the README: the long description of the package ---------------------------------

README = REPO / "README.rst"
#: Where the README's links point: the repository, as pyproject's Project-URLs say.
BASE = "https://github.com/asyncassets/asyncassets"


def _readme_code(after: str, language: str) -> str:
    """The first ``language`` code block after the line ``after``, dedented."""
    text = README.read_text(encoding="utf-8")
    start = text.index(f"\n{after}\n")
    block = text.index(f".. code-block:: {language}\n", start)
    lines = []
    for line in text[block:].splitlines()[2:]:
        if line.strip() and not line.startswith("   "):
            break
        lines.append(line[3:])
    return "\n".join(lines).strip() + "\n"


def test_the_readme_test_command_is_what_ci_runs() -> None:
    command = " ".join(_readme_code("Run the tests:", "sh").replace("\\\n", " ").split())
    assert command == (
        "python3 -m venv .venv && .venv/bin/pip install -e '.[test]' "
        "&& .venv/bin/python -m pytest"
    )
    ci = (REPO / ".ci" / "run").read_text()
    # The fresh venv, then exactly `python -m pytest`, from the repository root.
    assert 'VENV=.venv' in ci and '\n"$VENV/bin/python" -m pytest\n' in ci


def test_the_readme_quick_start_runs_as_written(tmp_path: Path) -> None:
    import subprocess
    import sys

    script = tmp_path / "zoo.py"
    script.write_text(_readme_code("-----------", "python"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True,
        timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().splitlines() == ["b'<jpeg bytes>' image/jpeg", "b'some'"]


def test_the_readme_links_are_absolute_and_name_pages_that_exist() -> None:
    import re

    text = README.read_text(encoding="utf-8")
    targets = re.findall(r"^\.\. _[^:]+: (\S+)$", text, flags=re.MULTILINE)
    inline = re.findall(r"`[^`<]*<([^>]+)>`_", text)
    assert targets and not inline, inline  # every link is a named target below
    for url in targets:
        assert url.startswith(f"{BASE}/"), url
        path = url.removeprefix(f"{BASE}/").split("/", 2)
        assert path[0] in ("blob", "tree") and path[1] == "main", url
        assert (REPO / path[2]).exists(), f"{url} names no file of the repository"
    linked = {url.rsplit("/", 1)[-1] for url in targets}
    for page in ("storage", "serving", "transfers", "assets", "cli", "quickstart"):
        assert f"{page}.rst" in linked, f"the README does not link to docs/{page}.rst"
    assert "examples/web_app.py" in text


def test_the_package_metadata_names_the_storages_and_its_urls() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for storage in ("GridFS", "directory", "S3"):
        assert storage in project["description"]
    assert {"Homepage", "Documentation", "Repository", "Issues", "Changelog"} <= set(
        project["urls"]
    )
    assert all(url.startswith(BASE) for url in project["urls"].values())


def test_the_example_app_says_what_to_install_without_its_extra() -> None:
    """In the README's first venv (the embedded extra only), the example app says
    which extra it needs instead of dying on ``ModuleNotFoundError``."""
    import subprocess
    import sys

    hide = (
        "import runpy, sys; sys.modules['starlette'] = None; "
        "runpy.run_path('examples/web_app.py', run_name='__main__')"
    )
    done = subprocess.run(
        [sys.executable, "-c", hide], cwd=REPO, capture_output=True, timeout=60, check=False
    )
    assert done.returncode == 1
    assert done.stderr.decode().strip() == (
        "examples/web_app.py needs starlette: pip install -e '.[examples]' "
        "(Starlette, uvicorn, Pillow and the embedded server)"
    )
