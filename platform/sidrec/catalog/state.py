"""Applying the catalog log to a ``LiveCatalog``: the published ``sids`` stage + changes 1..v, in order.

Every replica, the CLI and a freshly loaded model run this same code over the same changes, so they reach
the same catalog. An add or update entry carries the SID its writer assigned; it is used as is when the
entry's ``basis`` (the embeddings / quantizer / sids stage versions it was assigned against) is what this
catalog was built from, the model has its tokens, and (``dedup``) no other present item holds it. Otherwise
-- the store was republished since (new SIDs, or a new model with other SID tokens) -- the item is
re-encoded: its stored embedding (or, when the embeddings stage changed too, its text, embedded one item at
a time so that every replica gets the same vector) goes through the current quantizer and
``assign_sids``, in log order, which is deterministic; an add that then gets no SID is left out (logged),
an update that gets none leaves the item as it was. A retire removes the item wherever it came from: it is
never returned again, also under the ``keep`` policy (see ``LiveCatalog.retire``).
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from sidrec.catalog.encoder import ItemEncoder, NewItem, assign_sids
from sidrec.catalog.log import Change, Entry
from sidrec.recommender import LiveCatalog

log = logging.getLogger(__name__)

BASIS_STAGES = ("embeddings", "quantizer", "sids")  # what an entry's SID depends on


def encode_embedding(v: np.ndarray) -> str:
    return base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode("ascii")


def decode_embedding(s: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(s), dtype="<f4").astype(np.float32)


def new_item(item_id: str, fields: dict[str, str]) -> NewItem:
    return NewItem(item_id, fields.get("title", ""), fields.get("brand", ""), fields.get("categories", ""),
                   fields.get("description", ""))


@dataclass
class LoggedItem:
    """A present item whose current version came from the log."""

    fields: dict[str, str]
    version: int                      # the change that last added or updated it
    action: str                       # "added" (new id) or "updated" (a published or logged item changed)
    exact: bool


@dataclass
class CatalogState:
    """What the log did to one ``LiveCatalog``: the last version applied, the items it added or changed,
    and the versions that retired items."""

    applied: int = 0
    items: dict[str, LoggedItem] = field(default_factory=dict)
    retired: dict[str, int] = field(default_factory=dict)
    reencoded: int = 0                # entries whose SID was re-assigned here (store republished since)


def apply_changes(catalog: LiveCatalog, state: CatalogState, encoder: ItemEncoder,
                  changes: Iterable[Change]) -> int:
    """Apply changes after ``state.applied`` in order (older ones are skipped); returns how many."""
    n = 0
    for change in changes:
        if change.version <= state.applied:
            continue
        if change.version != state.applied + 1:
            raise ValueError(f"catalog change {change.version} after {state.applied}: a change is missing")
        apply_change(catalog, state, encoder, change)
        n += 1
    return n


def apply_change(catalog: LiveCatalog, state: CatalogState, encoder: ItemEncoder, change: Change) -> None:
    """Apply one change (its entries name distinct items) and advance ``state.applied``."""
    upserts = [e for e in change.entries if e.op != "retire"]
    if upserts:
        _apply_upserts(catalog, state, encoder, change, upserts)
    retire = [e.item_id for e in change.entries if e.op == "retire"]
    if retire:
        catalog.retire(retire)
        for i in retire:
            state.items.pop(i, None)
            state.retired[i] = change.version
    state.applied = change.version


def _usable(catalog: LiveCatalog, encoder: ItemEncoder, change: Change, e: Entry) -> bool:
    """True when the entry's recorded codes can be used here as they are."""
    if any(change.basis.get(s) != encoder.versions[s] for s in BASIS_STAGES):
        return False
    if len(e.codes) != catalog.index.levels or any(catalog.tokens[lv, c] < 0 for lv, c in enumerate(e.codes)):
        return False
    if encoder.collision == "dedup":
        holders = {str(i) for i in catalog.index.items_of(e.codes)} - {e.item_id}
        return not holders
    return True


def _apply_upserts(catalog: LiveCatalog, state: CatalogState, encoder: ItemEncoder, change: Change,
                   entries: Sequence[Entry]) -> None:
    redo = [e for e in entries if not _usable(catalog, encoder, change, e)]
    exact = {e.item_id: e.exact for e in entries}
    codes = {e.item_id: tuple(e.codes) for e in entries}
    # the text embeddings the new-item places rank by (an entry written before they were logged has none)
    emb = {e.item_id: decode_embedding(e.embedding) for e in entries if e.embedding}
    for e in redo:
        del codes[e.item_id]
    if redo:
        codes.update(_reencode(catalog, encoder, change, redo, exact, emb))
        state.reencoded += len(redo)
    done = [e for e in entries if e.item_id in codes]
    if not done:
        return
    for group in ([e for e in done if e.item_id in emb], [e for e in done if e.item_id not in emb]):
        if group:
            catalog.add([e.item_id for e in group], np.asarray([codes[e.item_id] for e in group]),
                        [e.fields.get("title", "").strip() for e in group], replace=True,
                        embeddings=np.stack([emb[e.item_id] for e in group]) if group[0].item_id in emb else None)
    for e in done:
        before = state.items.get(e.item_id)
        added = e.op == "add" or (before is not None and before.action == "added")   # new to the published set
        state.items[e.item_id] = LoggedItem(e.fields, change.version, "added" if added else "updated",
                                            exact[e.item_id])
        state.retired.pop(e.item_id, None)


def _reencode(catalog: LiveCatalog, encoder: ItemEncoder, change: Change, entries: Sequence[Entry],
              exact: dict[str, bool], embeddings: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """SIDs for entries made under other stage versions, one item at a time in entry order (``embeddings``
    gets the text embedding each was assigned from)."""
    same_embedder = change.basis.get("embeddings") == encoder.versions["embeddings"]
    out: dict[str, tuple[int, ...]] = {}
    for e in entries:
        item = new_item(e.item_id, e.fields)
        emb = (decode_embedding(e.embedding)[None] if same_embedder and e.embedding
               else encoder.embed([item]))
        prev = catalog.codes_of(e.item_id, retired=True)
        try:
            [got] = assign_sids(catalog, encoder, [item], emb, previous={e.item_id: prev} if prev else None)
        except ValueError as err:
            kept = "stays as it was" if e.item_id in catalog.sid_of else "is left out"
            log.warning("sidrec: catalog change %d: item %s %s: %s", change.version, e.item_id, kept, err)
            continue
        out[e.item_id] = got.codes
        exact[e.item_id] = got.exact
        embeddings[e.item_id] = np.asarray(emb, np.float32).reshape(-1)
    return out
