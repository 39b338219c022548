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


#: The connection alias of the peers' metadata listing (their own database).
META_ALIAS = "peer_meta"


class BenchMeta(Document):
    """The documents of the peers' metadata listing: one file each (``peers.py``)."""

    meta = {"collection": "peer_meta", "db_alias": META_ALIAS}
    name = StringField()
    f = FileField()
