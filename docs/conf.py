"""Sphinx configuration for the asyncassets documentation.

Build it with ``sphinx-build -W --keep-going -b html docs docs/_build/html``.
Nothing here reaches the network: intersphinx stays off on purpose.
"""

from __future__ import annotations

import os
import sys

# Document the source tree next to this directory, not whatever is installed.
sys.path.insert(0, os.path.abspath(".."))

import asyncassets

project = "asyncassets"
author = "the asyncassets developers"
copyright = "2026, the asyncassets developers"
release = asyncassets.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.viewcode",
]

# _footprint.rst is included by two pages (one set of figures), not a page itself.
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "_footprint.rst"]
root_doc = "index"
nitpicky = False
default_role = "literal"
pygments_style = "sphinx"

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {
    "show-inheritance": True,
}
# Optional extras must not break the build where they are not installed.
autodoc_mock_imports: list[str] = []

# Furo: a theme made for API docs, whose content column fits the 88-character
# code lines the docs keep to (a check in tests/test_docs.py) at 1200 px.
html_theme = "furo"
html_title = f"asyncassets {release}"
html_theme_options = {
    "source_repository": "https://github.com/asyncassets/asyncassets/",
    "source_branch": "main",
    "source_directory": "docs/",
}
html_static_path: list[str] = []
