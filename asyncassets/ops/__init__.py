"""Day-two operations: the orphan sweep and the consistency check.

Files and documents live in separate collections, so things can drift apart: a
process crashes between an upload and the ``save()`` that references it, an
upload is abandoned halfway, someone deletes a file behind a document's back.
Two coroutines find out and clean up:

* :func:`sweep_orphans` deletes files that no document references (once they are
  older than a grace period) and chunks whose files document is gone; for a
  directory or S3 storage, also stored objects no catalogue entry names, temp
  files of dead writers and stale multipart uploads;
* :func:`check` only reads, and reports every inconsistency it finds.

Each catalogue is worked on with the :class:`~asyncassets.storage.Storage` its
fields declare (GridFS by default); two fields declaring different storages for
one catalogue make both refuse with ``ValueError``.

.. code-block:: python

    report = await asyncassets.sweep_orphans(grace=timedelta(days=1))
    print(report)                     # what was deleted, and how many bytes it freed

    report = await asyncassets.check(verify=True)
    if not report.ok:
        print(report)

Which references count: those of every *registered* asyncassets
:class:`~asyncassets.document.Document` class, that is, every non-abstract
subclass defined (imported) in this process, top-level, embedded, in lists and
dicts. Import all your models before sweeping: a file referenced only by a class
that was never imported looks like an orphan.

Both stream: the files, the chunks and the documents are read in batches of
``batch_size`` and looked up against each other with ``$in`` queries, so memory
stays bounded whatever the size of the collections; the reports keep at most
``max_ids`` ids per list (their counts are always exact).

The package, one module per concern:

* :mod:`asyncassets.ops.reports`: the reports and the records they list;
* :mod:`asyncassets.ops.scope`: which buckets and aliases are worked on, and where
  the references to their files live;
* :mod:`asyncassets.ops.lookup`: the streaming lookups both share;
* :mod:`asyncassets.ops.sweep`: :func:`sweep_orphans`;
* :mod:`asyncassets.ops.consistency`: :func:`check`.
"""

from __future__ import annotations

from .consistency import check
from .lookup import DEFAULT_BATCH_SIZE as DEFAULT_BATCH_SIZE
from .reports import DEFAULT_MAX_IDS as DEFAULT_MAX_IDS
from .reports import (
    BucketFile,
    CheckReport,
    ChunkProblem,
    DanglingReference,
    FailedTransfer,
    ObjectProblem,
    OrphanedChunks,
    StoredObject,
    SweepReport,
)

# Not public: the command line formats sizes as the reports do.
from .reports import _human_bytes as _human_bytes
from .scope import declared_buckets, declared_storages
from .sweep import sweep_orphans

__all__ = [
    "BucketFile",
    "CheckReport",
    "ChunkProblem",
    "DanglingReference",
    "FailedTransfer",
    "ObjectProblem",
    "OrphanedChunks",
    "StoredObject",
    "SweepReport",
    "check",
    "declared_buckets",
    "declared_storages",
    "sweep_orphans",
]
