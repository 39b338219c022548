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

A session a resumable (tus) upload owns (``<catalogue>.uploads``, ``into: "s3"``)
is that upload's to end: its expiry is the upload's, and the sweep's pass over
resumable uploads (run first) removes an expired one and expires its direct
session, unless a ``PATCH`` or a finish still holds it. Then its multipart
upload stays too, for the next run, so the request that holds it ends as it
would on any other storage.
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
#: The states of a resumable upload (storage/resumable.py) that still owns its
#: direct session: being written or finished.
_OWNED = ["open", "finishing"]


def _sessions(store: ObjectStore) -> Any:
    return acknowledged(store.db[SESSIONS])


async def _owned(resumable: Any, session: Any) -> bool:
    """Whether a resumable upload being written or finished owns the direct
    ``session``."""
    return await resumable.find_one(
        {"into": "s3", "direct": session["_id"], "state": {"$in": _OWNED}}, {"_id": 1}
    ) is not None


def _utc(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


async def live_direct_uploads(store: ObjectStore) -> tuple[set[str], set[str]]:
    """The keys and multipart upload ids of the store's sessions that have not
    expired, or that a resumable upload still holds: the sweep must not take those
    over or abort them."""
    keys: set[str] = set()
    uploads: set[str] = set()
    now = dt.datetime.now(dt.timezone.utc)
    query = {"catalogue": store.name, "state": {"$in": list(_UNFINISHED)}}
    resumable = acknowledged(store.db[f"{store.name}.uploads"])
    async for session in _sessions(store).find(query, {"key": 1, "upload_id": 1,
                                                       "expires": 1}):
        if _utc(session["expires"]) <= now and not await _owned(resumable, session):
            continue
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
    resumable = acknowledged(store.db[f"{store.name}.uploads"])
    async for session in sessions.find(expired):
        if session.get("state") in _UNFINISHED and await _owned(resumable, session):
            continue  # a resumable upload holds it: that one's sweep ends it
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
                 "at": session.get("at"), "expires": {"$lte": now}},
                {"$set": {"state": "sweeping"}},
            )
            if taken is None:
                continue
            await uploads.remove_upload(session)
            report.reservations_released += 1
        elif dry_run:
            continue
        await sessions.delete_one({"_id": session["_id"]})
