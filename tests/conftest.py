"""The suite runs on the plugin it ships: one server per session, a fresh database per test."""

import gc
from collections.abc import Iterator

import pytest
from mongoengine.base.common import _document_registry

pytest_plugins = ["asyncassets.testing"]


@pytest.fixture(autouse=True)
def _forget_document_classes_made_by_the_test() -> Iterator[None]:
    """Document classes a test declares are gone after it.

    The sweep and the check work on every Document class alive in the process
    (the registry, and ``__subclasses__``); a class declared by an earlier test,
    whose directory was removed or whose S3 bucket was deleted, would otherwise
    be swept by every later test that sweeps. Classes hold reference cycles, so
    they go at the next collection: run it when the test declared any.
    """
    before = dict(_document_registry)
    yield
    if _document_registry.keys() != before.keys():
        _document_registry.clear()
        _document_registry.update(before)
        gc.collect()
