"""The document classes the benchmarks use."""

from __future__ import annotations

from asyncassets import Document
from asyncassets.fields import FileField, IntField, StringField


class BenchFile(Document):
    """One file per document, on the default ``fs`` bucket."""

    meta = {"collection": "bench_files"}
    name = StringField()
    n = IntField()
    f = FileField()
