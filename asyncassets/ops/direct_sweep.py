"""The orphan sweep's pass over direct-to-S3 upload sessions.

A session (:mod:`asyncassets.storage.objects.direct`) holds a key reservation and,
for a large file, a multipart upload that the browser fills part by part for as
long as the session lasts (``expires``), which may be far longer than the sweep's
grace. So the sweep:

* leaves the reservation and the multipart upload of a **live** session alone
  (:func:`live_direct_uploads` tells the other passes which);
* for an **expired** session that never finished: aborts its multipart upload,
  deletes an object its completion left (only one carrying the session's token
  that no catalogue entry names), releases the key, and deletes the session;
* deletes expired sessions that ended (``done``, ``failed``, ``aborted``): a
  finished file is a catalogue entry like any other from then on.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from .._driver import acknowledged
from ..storage.objects.direct import SESSIONS, DirectUploads
from ..storage.objects.store import ObjectStore
from .reports import StoredObject, SweepReport, _keep

__all__ = ["live_direct_uploads", "sweep_direct_sessions"]

_UNFINISHED = ("open", "completing", "aborting")


def _sessions(store: ObjectStore) -> Any:
    return acknowledged(store.db[SESSIONS])


async def live_direct_uploads(store: ObjectStore) -> tuple[set[str], set[str]]:
    """The keys and multipart upload ids of the store's sessions that have not
    expired: the sweep must not take those over or abort them."""
    keys: set[str] = set()
    uploads: set[str] = set()
    now = dt.datetime.now(dt.timezone.utc)
    query = {"catalogue": store.name, "state": {"$in": list(_UNFINISHED)},
             "expires": {"$gt": now}}
    async for session in _sessions(store).find(query, {"key": 1, "upload_id": 1}):
        keys.add(str(session.get("key")))
        if session.get("upload_id"):
            uploads.add(str(session["upload_id"]))
    return keys, uploads


async def sweep_direct_sessions(
    store: ObjectStore,
    alias: str,
    dry_run: bool,
    max_ids: int | None,
    report: SweepReport,
) -> None:
    """Remove what expired direct-upload sessions of ``store`` left (see the module)."""
    if store.storage.kind != "s3":
        return
    sessions = _sessions(store)
    now = dt.datetime.now(dt.timezone.utc)
    expired = {"catalogue": store.name, "expires": {"$lte": now}}
    uploads = DirectUploads(store)
    async for session in sessions.find(expired):
        if session.get("state") in _UNFINISHED:
            report.uploads_aborted += 1
            item = StoredObject(alias, store.name, str(session.get("key")), 0)
            if _keep(report.aborted_uploads, item, max_ids):
                report.truncated = True
            if dry_run:
                continue
            # Take it over first: a finalize that is running keeps it.
            taken = await sessions.find_one_and_update(
                {"_id": session["_id"], "state": session["state"],
                 "at": session.get("at")},
                {"$set": {"state": "sweeping"}},
            )
            if taken is None:
                continue
            await uploads.remove_upload(session)
            report.reservations_released += 1
        elif dry_run:
            continue
        await sessions.delete_one({"_id": session["_id"]})
