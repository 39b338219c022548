"""What the documentation shows: its code lines and inline literals (tests of the docs)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: The pages a user reads: the README and every page of docs/.
PAGES = [REPO / "README.rst", *sorted((REPO / "docs").glob("*.rst"))]

_CODE_DIRECTIVE = re.compile(r"^(\s*)\.\. (code-block|code|sourcecode|doctest)::")
_LITERALINCLUDE = re.compile(r"^\s*\.\. literalinclude::\s*(\S+)")
_DIRECTIVE = re.compile(r"^\s*\.\. ")
_INLINE = re.compile(r"``(.+?)``", re.DOTALL)


def code_lines(path: Path) -> list[tuple[int, str]]:
    """``(line number, line)`` of every line of code page ``path`` shows: code
    blocks and literal blocks (``::``), with their indentation."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found: list[tuple[int, str]] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        directive = _CODE_DIRECTIVE.match(line)
        literal = line.rstrip().endswith("::") and not _DIRECTIVE.match(line)
        if not (directive or literal):
            i += 1
            continue
        indent = len(line) - len(line.lstrip())
        i += 1
        # A directive's options (":caption: ...") are not code.
        while directive and i < len(lines) and lines[i].strip().startswith(":"):
            i += 1
        while i < len(lines):
            body = lines[i]
            if body.strip() and len(body) - len(body.lstrip()) <= indent:
                break
            found.append((i + 1, body))
            i += 1
    return found


def included_files(path: Path) -> list[Path]:
    """The files a page shows with ``literalinclude``."""
    return [
        (path.parent / match[1]).resolve()
        for line in path.read_text(encoding="utf-8").splitlines()
        if (match := _LITERALINCLUDE.match(line))
    ]


def inline_literals(path: Path) -> list[tuple[int, str]]:
    """``(line number, text)`` of every inline literal (````text````) of the
    page's prose, whitespace collapsed (a literal may span two lines)."""
    text = path.read_text(encoding="utf-8")
    code = {number for number, _line in code_lines(path)}
    found = []
    for match in _INLINE.finditer(text):
        number = text.count("\n", 0, match.start()) + 1
        if number not in code:
            found.append((number, " ".join(match[1].split())))
    return found
