"""The sweep of resumable uploads: sessions past their expiry, and their staged bytes.

A resumable upload (:mod:`asyncassets.storage.resumable`) keeps its bytes in
``<catalogue>.uploads.staged`` until it is complete and attached, apart from the
catalogue's files and chunks, so the orphan sweep of files, chunks and objects
never mistakes a live upload's bytes for an orphan. This pass removes what the
uploads themselves leave: sessions past their ``expires`` (abandoned; a write
still holding its lease is left for the next sweep) and staged chunks whose
session is gone (a terminate or sweep interrupted between its two deletes).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from ..storage.objects.store import ObjectStore
from ..storage.resumable import UploadSessions
from .reports import SweepReport

__all__ = ["live_in_store", "sweep_resumable"]


async def sweep_resumable(
    db: Any, catalogue: str, *, dry_run: bool, report: SweepReport, store: Any = None
) -> None:
    """Delete the expired upload sessions of ``catalogue`` and their staged bytes
    (or, written in place in a directory, ``store``'s: their temp files and keys).

    Expiry is the grace of a resumable upload (``tus_app(expires=...)``), so the
    sweep's own ``grace`` does not delay it.
    """
    sessions = UploadSessions(db, catalogue, store=_directory(store))
    now = dt.datetime.now(dt.timezone.utc)
    for session in await sessions.expired(now):
        # Taken again as it is removed: a finish may have started since the listing.
        if not dry_run and not await sessions.remove_expired(session, now):
            continue
        report.resumable_expired += 1
        if session.get("state") != "done":
            report.bytes_freed += max(int(session.get("offset") or 0), 0)
    for upload_id in await sessions.headless_chunks():
        if not dry_run:
            await sessions.chunks.delete_many({"upload": upload_id})


async def live_in_store(db: Any, store: ObjectStore) -> tuple[set[str], set[str], set[str]]:
    """The keys, temp files and tokens of ``store``'s resumable uploads written in
    place that are not done: not orphans, whatever their age."""
    return await UploadSessions(db, store.name, store=_directory(store)).live_in_store()


def _directory(store: Any) -> ObjectStore | None:
    return store if isinstance(store, ObjectStore) else None


async def live_upload_files(db: Any, catalogue: str, file_ids: list[Any]) -> set[Any]:
    """Which of ``file_ids`` (of chunks without a files document in a GridFS
    bucket) are resumable uploads still open: not orphans, whatever their age."""
    return await UploadSessions(db, catalogue).live_file_ids(file_ids)
