"""Catalog writes: add / update / retire items through the store's change log (``sidrec.catalog.log``).

The Serve admin endpoints and ``sidrec items`` both call ``CatalogWriter``, on a ``LiveCatalog`` and its
``CatalogState``. A write is optimistic: catch up with the log, decide per item (new id -> "added", same
text and title as now -> "unchanged", other text -> "updated": new embedding, new SID unless the text
still quantizes to the current one), assign SIDs against the caught-up catalog, publish the change as
version head + 1 -- and when another writer got that version first, catch up and redo the decisions
(embeddings are kept). It returns once the change is durable in the store and applied to the catalog it
was given; other replicas apply it when they next poll the log. Re-sending a write is harmless: the same
text is "unchanged", a retired item is retired.
"""

from __future__ import annotations

import logging
import random
import socket
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sidrec.catalog.encoder import ItemEncoder, NewItem, assign_sids
from sidrec.catalog.log import CatalogLog, Change, Entry, VersionConflict
from sidrec.catalog.state import BASIS_STAGES, CatalogState, apply_change, apply_changes, encode_embedding
from sidrec.recommender import LiveCatalog
from sidrec.sids.embed import render_text
from sidrec.sids.tokens import render_sid
from sidrec.store import ArtifactStore

log = logging.getLogger(__name__)

Mode = Literal["upsert", "add", "update"]
Action = Literal["added", "updated", "unchanged"]
TEXT_FIELDS = ("title", "brand", "categories", "description")


class CatalogError(ValueError):
    """A write refused as a whole (nothing was published): an HTTP-like status, a code, the items."""

    def __init__(self, status: int, code: str, detail: str, items: Sequence[str] = ()):
        self.status, self.code, self.items = status, code, list(items)
        super().__init__(detail)


@dataclass
class Upserted:
    item_id: str
    title: str
    sid: str
    exact: bool
    action: Action


@dataclass
class WriteResult:
    """What a write did; ``version`` is the catalog version that holds it (the head when nothing changed)."""

    version: int
    items: list[Upserted] = field(default_factory=list)
    retired: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)


def writer_name(tag: str) -> str:
    """A writer id unique to this process and call site (recorded in each change)."""
    return f"{tag}@{socket.gethostname()}:{uuid.uuid4().hex[:8]}"


class CatalogWriter:
    """Writes changes for one catalog (see the module docstring). Not thread-safe: call it under the lock
    that guards ``catalog`` (a Serve replica's model lock)."""

    def __init__(self, store_root: str, encoder: ItemEncoder, writer: str = "", model_version: str = "",
                 max_attempts: int = 100):
        self.store = ArtifactStore(store_root)
        self.log = CatalogLog(self.store)
        self.encoder = encoder
        self.writer = writer or writer_name("sidrec")
        self.basis = {**{s: encoder.versions[s] for s in BASIS_STAGES}, "model": model_version}
        self.max_attempts = max_attempts

    # ------------------------------------------------------------------------------------ reading
    def catch_up(self, catalog: LiveCatalog, state: CatalogState) -> int:
        """Apply every change published since ``state.applied``; returns how many."""
        return apply_changes(catalog, state, self.encoder, self.log.changes(state.applied))

    def current_fields(self, catalog: LiveCatalog, state: CatalogState, ids: Sequence[str]) -> dict[str, dict]:
        """Catalog row of each present item among ``ids``: from the log, else the published catalog."""
        out = {i: state.items[i].fields for i in ids if i in state.items and i in catalog.sid_of}
        rest = [i for i in ids if i in catalog.sid_of and i not in out]
        if rest:
            path = f"{self.store.current_path('dataset')}/catalog.parquet"
            table = pq.read_table(path, filesystem=self.store.fs, filters=pc.field("item_id").isin(rest))
            for row in table.to_pylist():
                out[row["item_id"]] = {f: str(row.get(f) or "") for f in TEXT_FIELDS}
        return out

    def _text(self, fields: Mapping[str, str]) -> tuple[str, str]:
        cfg = self.encoder.embed_cfg
        return fields.get("title", "").strip(), render_text(dict(fields), cfg.template, cfg.max_chars)

    def plan(self, catalog: LiveCatalog, state: CatalogState, items: Sequence[NewItem],
             mode: Mode = "upsert") -> dict[str, Action]:
        """Per item: "added", "updated" or "unchanged"; CatalogError for a request that cannot be done
        (ids repeated, no title; for ``add`` an id present with other text, for ``update`` an absent id)."""
        ids = [i.item_id for i in items]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise CatalogError(422, "duplicate_items", f"item ids given more than once: {dup[:20]}", dup)
        untitled = [i.item_id for i in items if not i.title.strip()]
        if untitled:
            raise CatalogError(422, "missing_title", f"items without a title: {untitled[:20]}", untitled)
        absent = [i for i in ids if i not in catalog.sid_of]
        if mode == "update" and absent:
            raise CatalogError(404, "unknown_items", f"item ids not in the catalog (unknown or retired; use "
                               f"add): {absent[:20]}", absent)
        current = self.current_fields(catalog, state, [i for i in ids if i in catalog.sid_of])
        out: dict[str, Action] = {}
        for item in items:
            now = current.get(item.item_id)
            out[item.item_id] = ("added" if now is None else
                                 "unchanged" if self._text(now) == self._text(item.row()) else "updated")
        changed = [i for i, a in out.items() if a == "updated"]
        if mode == "add" and changed:
            raise CatalogError(409, "items_exist", f"item ids already in the catalog with other text (use "
                               f"update): {changed[:20]}", changed)
        return out

    def embed(self, items: Sequence[NewItem]) -> dict[str, np.ndarray]:
        """item_id -> text embedding (the slow part of a write: call it outside the catalog's lock)."""
        return dict(zip([i.item_id for i in items], self.encoder.embed(items), strict=True)) if items else {}

    # ------------------------------------------------------------------------------------ writing
    def upsert(self, catalog: LiveCatalog, state: CatalogState, items: Sequence[NewItem], mode: Mode = "upsert",
               embeddings: Mapping[str, np.ndarray] | None = None) -> WriteResult:
        """Add or update items (see the module docstring); durable and applied to ``catalog`` on return."""
        emb = dict(embeddings or {})
        for attempt in range(self.max_attempts):
            self.catch_up(catalog, state)
            actions = self.plan(catalog, state, items, mode)
            todo = [i for i in items if actions[i.item_id] != "unchanged"]
            if not todo:
                return self._result(catalog, state, items, actions, {})
            emb.update(self.embed([i for i in todo if i.item_id not in emb]))
            vectors = np.stack([emb[i.item_id] for i in todo])
            previous = {i.item_id: c for i in todo if (c := catalog.codes_of(i.item_id, retired=True)) is not None}
            try:
                assigned = assign_sids(catalog, self.encoder, todo, vectors, previous)
            except ValueError as e:
                raise CatalogError(422, "no_free_sid", str(e), [i.item_id for i in todo]) from e
            entries = [Entry("add" if actions[i.item_id] == "added" else "update", i.item_id, i.row(), list(a.codes),
                             "", a.exact, encode_embedding(v))
                       for i, a, v in zip(todo, assigned, vectors, strict=True)]
            if self._publish(catalog, state, entries, attempt):
                return self._result(catalog, state, items, actions, {a.item_id: a.exact for a in assigned})
        raise CatalogError(503, "catalog_busy", f"catalog write lost {self.max_attempts} races to other writers")

    def retire(self, catalog: LiveCatalog, state: CatalogState, item_ids: Sequence[str],
               strict: bool = False) -> WriteResult:
        """Retire items; ids retired already count as retired, ids never seen are ``unknown`` (with
        ``strict``, CatalogError and nothing is written)."""
        ids = list(dict.fromkeys(str(i) for i in item_ids))
        for attempt in range(self.max_attempts):
            self.catch_up(catalog, state)
            present = [i for i in ids if i in catalog.sid_of]
            unknown = [i for i in ids if i not in catalog.sid_of and i not in catalog.retired]
            if strict and unknown:
                raise CatalogError(404, "unknown_items", f"item ids not in the catalog: {unknown[:20]}", unknown)
            if not present or self._publish(catalog, state, [Entry("retire", i) for i in present], attempt):
                retired = [i for i in ids if i not in unknown]
                return WriteResult(state.applied, retired=retired, unknown=unknown)
        raise CatalogError(503, "catalog_busy", f"catalog write lost {self.max_attempts} races to other writers")

    def _publish(self, catalog: LiveCatalog, state: CatalogState, entries: list[Entry], attempt: int) -> bool:
        """Publish entries as the next version and apply them; False when another writer took it."""
        for e in entries:
            if e.codes:
                e.sid = render_sid(e.codes)
        change = Change(state.applied + 1, entries, self.basis, self.writer)
        try:
            self.log.append(change)
        except VersionConflict:
            log.info("sidrec: catalog version %d taken by another writer (attempt %d); catching up",
                     change.version, attempt + 1)
            time.sleep(random.uniform(0, 0.02 * min(attempt + 1, 10)))
            return False
        apply_change(catalog, state, self.encoder, change)
        return True

    @staticmethod
    def _result(catalog: LiveCatalog, state: CatalogState, items: Sequence[NewItem], actions: Mapping[str, Action],
                exact: Mapping[str, bool]) -> WriteResult:
        out = []
        for i in items:
            logged = state.items.get(i.item_id)
            ex = exact.get(i.item_id, logged.exact if logged is not None else True)
            out.append(Upserted(i.item_id, catalog.titles.get(i.item_id, i.title.strip()), catalog.sid_of[i.item_id],
                                ex, actions[i.item_id]))
        return WriteResult(state.applied, items=out)
