"""Key reservations: a key is reserved in MongoDB before an object is written under it,
and released only once that object is gone.

A directory or an S3 bucket cannot arbitrate between writers by itself: moto and
some S3-compatible servers let two conditional writes of one key both succeed, a
filesystem has no "delete only if it is still mine", and a retried delete whose
first try was applied can remove an object written since. So asyncassets does
not ask the object store who owns a key; it asks MongoDB, once per object:

* an upload **reserves** its key (one insert, arbitrated by the unique ``_id``)
  before it writes a byte; a taken key is never written, the upload tries the next
  variant (``photo-2.jpg``);
* the reservation stays while the object exists: deleting a file removes its
  catalogue entry, then the object, then the reservation. Between the first and
  the last step nobody else can write the key, so a delete (even a retried one)
  only ever removes the object of the file being deleted;
* an upload that fails removes what it provably wrote, then releases the key;
  one whose outcome is unknown keeps the reservation, and the orphan sweep
  decides later, knowing the writer's ``token`` (which the object carries: see
  :meth:`~asyncassets.storage.objects.blobs.Blobs.made_by`);
* the sweep deletes an object only under a reservation it holds: it takes over a
  reservation a writer left behind, or reserves an orphan object's key itself,
  so no upload can write that key while the sweep deletes there.

The reservations live in the collection ``asyncassets.keys`` of the catalogue's
database, one document per reserved object::

    {"_id": "file:/srv/media/2026/12/photo.jpg",     # Blobs.reservation_id(key)
     "place": "file:/srv/media",                     # the storage's place
     "key": "2026/12/photo.jpg", "catalogue": "fs_local", "field": "location",
     "file": ObjectId("..."),
     "token": "3f2c...", "state": "writing", "at": datetime(...)}

``_id`` names the object itself (a directory file's absolute path, an S3
endpoint, bucket and full key), so storages whose places overlap share
reservations. ``state`` is ``"writing"`` while the object belongs to an upload or
a stored file, and ``"sweeping"`` once the sweep has taken it over. ``at`` is when
it was made or last confirmed (an upload confirms it before an overwriting
commit).
"""

from __future__ import annotations

import datetime as dt
import weakref
from collections.abc import AsyncIterator
from typing import Any

from pymongo.errors import DuplicateKeyError

from ... import _driver
from ..gridfs.spec import now_as_stored
from .keys import KeyMaker

__all__ = ["COLLECTION", "Reservations"]

#: The collection of the catalogue's database that holds the reservations.
COLLECTION = "asyncassets.keys"
#: The index the sweep finds a place's old reservations with.
PLACE_INDEX = {"place": 1, "at": 1}
#: The index the sweep asks with whether an object's writer holds a reservation
#: anywhere (under another spelling of the same place).
TOKEN_INDEX = {"token": 1}

_indexed: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()
#: A number no key holds, to find where a variant's "-N" goes in a reservation id.
_PROBE = 918273645


class Reservations:
    """The reservations of one place (a storage's directory or bucket and prefix).

    :param db: the catalogue's database.
    :param blobs: the place's backend (it names objects: ``reservation_id``).
    :param catalogue: the catalogue's name, recorded in each reservation.
    :param field: where the catalogue's entries name this place's keys
        (``"location"``; ``"remote"`` for a queued catalogue's remote copies).
    """

    def __init__(self, db: Any, blobs: Any, catalogue: str, field: str = "location") -> None:
        self.db = db
        self.blobs = blobs
        self.catalogue = catalogue
        self.field = field
        #: The place's name: ``file:/srv/media``, ``s3:<endpoint>/<bucket>/<prefix>``.
        self.place: str = blobs.place
        self.collection = _driver.acknowledged(db[COLLECTION])

    def __repr__(self) -> str:
        return f"Reservations({self.place!r})"

    async def ensure_indexes(self) -> None:
        """The index on ``(place, at)``, once per client and database."""
        done = _indexed.setdefault(self.db.client, set())
        if self.db.name in done:
            return
        await self.collection.create_index(list(PLACE_INDEX.items()))
        await self.collection.create_index(list(TOKEN_INDEX.items()))
        done.add(self.db.name)

    def id_of(self, key: str) -> str:
        """The reservation ``_id`` of the object at ``key``."""
        return str(self.blobs.reservation_id(key))

    async def reserve(self, key: str, *, file_id: Any, token: str) -> bool:
        """Reserve ``key`` for the file ``file_id``'s writer ``token``.

        :returns: ``False`` if the key is reserved already (by a live upload, a
            stored file, a writer that died, or the sweep).
        """
        return await self._insert(key, file_id, token, "writing")

    async def _insert(self, key: str, file_id: Any, token: str, state: str) -> bool:
        try:
            await self.collection.insert_one(
                {
                    "_id": self.id_of(key),
                    "place": self.place,
                    "key": key,
                    "catalogue": self.catalogue,
                    "field": self.field,
                    "file": file_id,
                    "token": token,
                    "state": state,
                    "at": now_as_stored(self.collection),
                }
            )
        except DuplicateKeyError:
            return False
        return True

    async def confirm(self, key: str, token: str) -> bool:
        """Refresh the writer ``token``'s reservation of ``key``.

        :returns: ``False`` if it is not that writer's any more (the sweep took it
            over after a pause longer than its grace).
        """
        result = await self.collection.update_one(
            {"_id": self.id_of(key), "token": token, "state": "writing"},
            {"$set": {"at": now_as_stored(self.collection)}},
        )
        return bool(result.matched_count)

    async def held(self, key: str, token: str) -> bool:
        """Whether the writer ``token`` still holds ``key`` (the sweep has not taken it)."""
        found = await self.collection.find_one(
            {"_id": self.id_of(key), "token": token, "state": "writing"}, {"_id": 1}
        )
        return found is not None

    async def release_taken(self, reservation: dict[str, Any]) -> None:
        """For the sweep: remove a reservation it holds, once the object is gone."""
        await self.collection.delete_one(
            {"_id": reservation["_id"], "token": reservation.get("token"), "state": "sweeping"}
        )

    async def release(self, key: str, *, token: str | None = None, file_id: Any = None) -> None:
        """Release ``key``: its object is gone (or was never written).

        Only the reservation of writer ``token`` (or of the file ``file_id``) is
        removed: a key reserved again since is someone else's.
        """
        query: dict[str, Any] = {"_id": self.id_of(key)}
        if token is not None:
            query["token"] = token
        if file_id is not None:
            query["file"] = file_id
        await self.collection.delete_one(query)

    async def older_than(self, cutoff: dt.datetime) -> AsyncIterator[dict[str, Any]]:
        """This place's reservations last made or confirmed before ``cutoff``."""
        async for doc in self.collection.find({"place": self.place, "at": {"$lt": cutoff}}):
            yield doc

    async def take_over(self, reservation: dict[str, Any]) -> bool:
        """For the sweep: make a reservation it found old its own (``"sweeping"``).

        Conditional on the reservation being exactly as it was read, so a writer
        that confirmed it meanwhile keeps it. :returns: whether it was taken.
        """
        result = await self.collection.update_one(
            {
                "_id": reservation["_id"],
                "token": reservation.get("token"),
                "state": reservation.get("state"),
                "at": reservation.get("at"),
            },
            {"$set": {"state": "sweeping", "at": now_as_stored(self.collection)}},
        )
        return bool(result.matched_count)

    async def named(self, reservations: list[dict[str, Any]]) -> set[Any]:
        """The ``_id`` of each reservation whose file's catalogue entry names its key
        (a stored file): one query per catalogue."""
        alive: set[Any] = set()
        by_catalogue: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for reservation in reservations:
            catalogue, field = reservation.get("catalogue"), reservation.get("field")
            if isinstance(catalogue, str) and isinstance(field, str):
                by_catalogue.setdefault((catalogue, field), []).append(reservation)
        for (catalogue, field), group in by_catalogue.items():
            wanted = {(r.get("file"), r.get("key")): r["_id"] for r in group}
            files = _driver.acknowledged(self.db[f"{catalogue}.files"])  # the primary's
            query = {"_id": {"$in": [r.get("file") for r in group]}}
            async for entry in files.find(query, {f"{field}.key": 1}):
                place = entry.get(field)
                key = place.get("key") if isinstance(place, dict) else None
                found = wanted.get((entry["_id"], key))
                if found is not None:
                    alive.add(found)
        return alive

    async def give_back(self, reservation: dict[str, Any]) -> None:
        """Undo :meth:`take_over` (the file turned out to be alive)."""
        await self.collection.update_one(
            {"_id": reservation["_id"], "token": reservation.get("token"),
             "state": "sweeping"},
            {"$set": {"state": reservation.get("state"), "at": reservation.get("at")}},
        )

    async def reserve_for_sweep(self, key: str, token: str) -> bool:
        """For the sweep: reserve an orphan object's key before deleting it."""
        return await self._insert(key, None, token, "sweeping")

    async def highest_variant(self, key: str) -> int:
        """The highest ``N`` of a reserved variant ``key-N`` (``photo-7.jpg``), or 1.

        One range query on ``_id``, whatever the number of variants, so the 500th
        upload of ``photo.jpg`` tries ``photo-500.jpg`` at once.
        """
        probe = str(_PROBE)
        before, _, after = self.id_of(KeyMaker.variant(key, _PROBE)).rpartition(probe)
        highest = 1
        found = self.collection.find(
            {"_id": {"$gte": before, "$lt": before + "\uffff"}}, {"_id": 1}
        )
        async for doc in found:
            name = str(doc["_id"])
            if not name.endswith(after):
                continue
            middle = name[len(before) : len(name) - len(after)]
            if middle.isdigit():
                highest = max(highest, int(middle))
        return highest

    async def held_by_writer(self, token: str) -> bool:
        """Whether any reservation, of any place, is the writer ``token``'s: an
        object carrying that token belongs to a live file or upload, even when the
        place is named another way here (``localhost`` for ``127.0.0.1``)."""
        return await self.collection.find_one({"token": token}, {"_id": 1}) is not None

    async def reserved(self, keys: list[str]) -> set[str]:
        """Which of ``keys`` are reserved (in any state)."""
        if not keys:
            return set()
        ids = {self.id_of(key): key for key in keys}
        found = self.collection.find({"_id": {"$in": list(ids)}}, {"_id": 1})
        return {ids[doc["_id"]] async for doc in found}
