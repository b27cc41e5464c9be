"""A replica's side of the live catalog: the store's change log (``sidrec.catalog``) applied to the model
it serves, kept current by polling, and the admin writes that append to it.

Every replica holds its own copy of the index, so the state lives in the store: a replica applies the
whole log when it loads a model (``open_session``, in the loading thread), then polls the log's head every
``catalog_poll_s`` seconds and applies what other replicas or the CLI published, between two batches
(under the model lock). An admin write catches up, appends one change and applies it under the same lock,
and answers once the change is durable; the other replicas have it within a poll interval. A replica that
was down, restarted or replaced replays the log on start, so a retired item never comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

from sidrec.catalog.encoder import ItemEncoder, NewItem
from sidrec.catalog.session import CatalogSession, open_catalog
from sidrec.catalog.writer import CatalogError, writer_name
from sidrec.recommender import Recommender
from sidrec.serve.handling import Reply, catalog_error, retire_reply, upsert_reply

log = logging.getLogger("ray.serve")


def open_session(rec: Recommender, store_root: str, encoder: ItemEncoder | None, replica: str) -> CatalogSession:
    """The catalog log applied to a freshly loaded model (runs in the loading thread)."""
    session = open_catalog(store_root, rec.catalog, encoder, writer_name(f"replica:{replica}"), rec.model_version)
    if session.state.applied:
        log.info("sidrec: applied catalog log up to version %d (%d items changed, %d retired, %d re-encoded)",
                 session.state.applied, len(session.state.items), len(session.state.retired),
                 session.state.reencoded)
    return session


class ReplicaCatalog:
    """The session of the model being served, and the poll task that keeps it current."""

    def __init__(self, lock: Callable[[], asyncio.Lock], replica: str):
        self._lock = lock
        self.replica = replica
        self.session: CatalogSession | None = None
        self.poll_error: str | None = None
        self._task: asyncio.Task | None = None

    @property
    def applied(self) -> int:
        return self.session.state.applied if self.session is not None else 0

    # ------------------------------------------------------------------------------------ polling
    def start(self, interval_s: Callable[[], float]) -> None:
        """Start the poll task once (``interval_s`` is read each round, so a reconfigure changes it)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._poll(interval_s), name="sidrec-catalog-poll")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _poll(self, interval_s: Callable[[], float]) -> None:
        while True:
            await asyncio.sleep(interval_s())
            try:
                await self.sync()
                self.poll_error = None
            except Exception as e:  # the store may be briefly unreachable: keep serving, retry next round
                if self.poll_error is None:
                    log.exception("sidrec: catalog poll failed; retrying every round")
                self.poll_error = f"{type(e).__name__}: {e}"

    async def sync(self) -> int:
        """Apply what the store has beyond this replica's version; returns the changes applied."""
        session = self.session
        if session is None or await asyncio.to_thread(session.head) <= session.state.applied:
            return 0
        async with self._lock():
            if session is not self.session:  # swapped by a reload meanwhile: the next round syncs the new one
                return 0
            n = await asyncio.to_thread(session.catch_up)
        if n:
            log.info("sidrec: applied %d catalog change(s), now at version %d", n, session.state.applied)
        return n

    # ------------------------------------------------------------------------------------ writing
    async def upsert(self, items: Sequence[dict[str, Any]]) -> Reply:
        """POST /v1/items: add or update, durable in the store before the answer."""
        session = self.session
        assert session is not None
        new = [NewItem(**d) for d in items]
        try:
            async with self._lock():  # decide what needs embedding (short), embed unlocked (the slow part)
                actions = await asyncio.to_thread(session.writer.plan, session.catalog, session.state, new)
            todo = [i for i in new if actions[i.item_id] != "unchanged"]
            emb = await asyncio.to_thread(session.writer.embed, todo)
            async with self._lock():  # the write decides again, on the catalog as it is now
                current = self.session
                assert current is not None
                if current.encoder is not session.encoder:
                    emb = {}  # a reload changed the stages: embed again with the new encoder
                result = await asyncio.to_thread(current.writer.upsert, current.catalog, current.state, new,
                                                 "upsert", emb)
        except CatalogError as e:
            return catalog_error(e)
        return {**upsert_reply(result), "replica": self.replica}

    async def retire(self, item_ids: Sequence[str]) -> Reply:
        """POST /v1/items/retire: durable in the store before the answer."""
        async with self._lock():
            session = self.session
            assert session is not None
            try:
                result = await asyncio.to_thread(session.writer.retire, session.catalog, session.state,
                                                 list(item_ids))
            except CatalogError as e:
                return catalog_error(e)
        return {**retire_reply(result), "replica": self.replica}

    async def version(self) -> Reply:
        """GET /v1/catalog/version: the store's head and this replica's applied version."""
        session = self.session
        assert session is not None
        head = await asyncio.to_thread(session.head)
        return {"version": head, "applied": session.state.applied, "replica": self.replica}
