"""A trained SID-LLM ready to answer: model + tokenizer + SID index + catalog, loaded from the artifact store.

    rec = Recommender.from_store("artifacts/ml-100k", num_beams=20)
    rec.recommend([["50", "172", "133"]], k=10)     # -> [[Hit(sid, codes, score, items), ...]]

The evaluator's Ray Data actors and the Serve replicas both hold one of these, so offline metrics and served
answers come from the same prompt rendering and the same decoder.
"""

from __future__ import annotations

from collections import ChainMap
from collections.abc import Collection, Mapping, Sequence
from collections.abc import Set as AbstractSet

import numpy as np
import pyarrow as pa
import torch

from sidrec.config import (
    CODEBOOK_SIZE,
    NEW_ITEM_RANKING,
    NUM_BEAMS,
    TOP_K,
    InstructionConfig,
    NewItemRanking,
    section_from_dict,
)
from sidrec.decode.beam import Hit, Scoring, SidDecoder, sid_token_table
from sidrec.hf_lock import MODEL_BUILD_LOCK
from sidrec.llm.instructions import next_item_prompt
from sidrec.llm.sft import encode_prompt
from sidrec.sids.embed import read_embeddings
from sidrec.sids.index import SidIndex
from sidrec.sids.tokens import parse_sid, render_sid
from sidrec.store import ArtifactStore


class UnknownItemsError(ValueError):
    """Item ids that are not in the catalog; ``items`` lists them."""

    def __init__(self, items: Sequence[str]):
        self.items = list(items)
        shown = self.items[:10]
        more = f" (+{len(self.items) - 10} more)" if len(self.items) > 10 else ""
        super().__init__(f"unknown item ids: {shown}{more}")


class Recommender:
    """Next-item recommendation with constrained beam search over the catalog's SIDs."""

    def __init__(self, model, tokenizer, sids: pa.Table, titles: dict[str, str], icfg: InstructionConfig,
                 max_length: int, num_beams: int = NUM_BEAMS, scoring: Scoring = "raw", profiles: dict[str, str] | None = None,
                 model_version: str = "", codebook_size: int = CODEBOOK_SIZE,
                 embeddings: Mapping[str, np.ndarray] | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.icfg, self.max_length = icfg, max_length
        self.profiles = profiles or {}
        self.model_version = model_version
        index = SidIndex.from_table(sids, codebook_size)
        self.decoder = SidDecoder(model, tokenizer, index, num_beams=num_beams, scoring=scoring)
        self.catalog = LiveCatalog(index, sid_map(sids), titles, self.decoder.tokens.cpu().numpy(), embeddings)
        # the catalog's own objects, changed in place by catalog changes (never rebound)
        self.index, self.sid_of, self.titles = self.catalog.index, self.catalog.sid_of, self.catalog.titles
        self.new_items = NewItemSlots(self.decoder, self.catalog)
        # room left for the prompt once the SID tokens (and eos) are appended, as in training
        self.max_prompt_tokens = max_length - self.index.levels - 1

    @classmethod
    def from_store(cls, root: str, num_beams: int = NUM_BEAMS, scoring: Scoring = "raw", device: str | None = None,
                   dtype: torch.dtype | None = None) -> Recommender:
        """Load the published ``model``, ``sids``, ``dataset`` and ``embeddings`` stages of the store at ``root``."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        store = ArtifactStore(root)
        model_manifest = store.require("model")
        model_dir = store.fetch_model_dir()
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dtype is None:
            dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        with MODEL_BUILD_LOCK:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
        sids = store.sid_table()
        titles, profiles = store.titles(), store.profiles()
        icfg = section_from_dict(InstructionConfig, store.require("instructions")["config"])
        max_length = int(model_manifest["config"]["train"]["max_length"])
        codebook = int(store.require("quantizer")["config"].get("codebook_size", CODEBOOK_SIZE))
        return cls(model, tokenizer, sids, titles, icfg, max_length, num_beams, scoring, profiles,
                   model_manifest["version"], codebook, text_embeddings(store, set(sids["item_id"].to_pylist())))

    # ------------------------------------------------------------------------------------------- queries
    def check_items(self, items: Sequence[str]) -> None:
        """Raise UnknownItemsError naming every id that is neither present nor retired (a history may hold
        retired items: the model still reads their SIDs, it just never returns them)."""
        known = self.catalog.history_sids
        unknown = list(dict.fromkeys(i for i in items if i not in known))
        if unknown:
            raise UnknownItemsError(unknown)

    def prompt_ids(self, history: Sequence[str], profile: str = "", user_id: str = "") -> list[int]:
        """Token ids of the next-item prompt, exactly as training rendered it (history capped, left-truncated)."""
        prompt = next_item_prompt(user_id, list(history), self.catalog.history_sids, profile, self.icfg)
        return encode_prompt(prompt, self.tokenizer, self.max_prompt_tokens)

    def recommend(self, histories: Sequence[Sequence[str]], k: int = TOP_K, exclude_history: bool = False,
                  profiles: Sequence[str] | None = None, user_ids: Sequence[str] | None = None,
                  constrained: bool = True, new_item_slots: int = 0,
                  new_item_ranking: NewItemRanking = NEW_ITEM_RANKING) -> list[list[Hit]]:
        """Top-``k`` items per history (oldest first). ``profiles`` default to the stored profile of each
        ``user_ids`` entry (when known). Unknown item ids raise UnknownItemsError; a request with neither
        history nor profile raises ValueError (a cold user needs a profile). ``new_item_slots`` > 0 keeps up
        to that many of the k places (never the first) for items added after training, filled as
        ``new_item_ranking`` says: `NewItemSlots`."""
        if new_item_slots < 0:
            raise ValueError(f"new_item_slots must be >= 0, got {new_item_slots}")
        n = len(histories)
        user_ids = list(user_ids) if user_ids is not None else [""] * n
        if profiles is None:
            profiles = [self.profiles.get(u, "") for u in user_ids]
        if len(profiles) != n or len(user_ids) != n:
            raise ValueError("histories, profiles and user_ids must have the same length")
        self.check_items([i for h in histories for i in h])
        empty = [r for r, (h, p) in enumerate(zip(histories, profiles, strict=True)) if not h and not p.strip()]
        if empty:
            raise ValueError(f"requests {empty[:10]} have an empty history and no profile: nothing to recommend from")
        prompts = [self.prompt_ids(h, p, u) for h, p, u in zip(histories, profiles, user_ids, strict=True)]
        exclude = ([{i for i in h if i in self.sid_of} for h in histories]   # retired ones can't come back anyway
                   if exclude_history and constrained else None)
        hits = self.decoder.search(prompts, k=k, exclude=exclude, constrained=constrained)
        if new_item_slots and constrained:
            hits = self.new_items.reserve(hits, prompts, histories, exclude, k, new_item_slots, new_item_ranking)
        return hits

    def top_items(self, histories: Sequence[Sequence[str]], k: int = TOP_K, **kw) -> list[list[str]]:
        """Item ids only, best first (the evaluator's view)."""
        return [[i for h in hits for i in h.items][:k] for hits in self.recommend(histories, k, **kw)]

    def add_items(self, item_ids: Sequence[str], codes: np.ndarray, titles: Sequence[str],
                  replace: bool = False, embeddings: np.ndarray | None = None) -> list[str]:
        """Make new catalog items recommendable at once (cold start); see ``LiveCatalog.add``."""
        return self.catalog.add(item_ids, codes, titles, replace=replace, embeddings=embeddings)

    def retire_items(self, item_ids: Sequence[str]) -> list[str]:
        """Never return these items again; see ``LiveCatalog.retire``."""
        return self.catalog.retire(item_ids)


class NewItemSlots:
    """Top-k places reserved for the items added after training (TIGER's epsilon idea, as a reservation).

    Why: a new item's SID often lies on a code path no training target took, so the model's beams rarely
    reach it even when it is the best new item for the user (on ml-100k with the newest 10% held out, none of
    9,430 top-10 places went to one). The added items are the live rows of the index's delta part (``add`` /
    a catalog add or update, until ``compact``), re-read when the index version changes, so a retired item,
    gone from the delta's live rows, is never offered. Two ways fill the places:

    - ``content`` (the default): the added items whose text embedding (the encoder their SIDs came from) is
      nearest, by cosine, to the mean of the history's item embeddings. A request whose history has no
      embedded item (a profile-only request) falls back to ``search``; an added item without an embedding
      (``add_items`` called without one) is left to ``search`` too.
    - ``search``: a second constrained search with the same prompts over a ``SidIndex`` of the added items
      alone, scored "renormalized" (each level's log-probabilities renormalized over the codes valid in the
      small trie, so a level where an added item's path has no sibling costs nothing).

    Measured on Amazon Industrial with 10% of the items held out (412 test examples with a cold target, 354
    added items, ``bench/cold_scoring.py``): the target is the first added item for 6.3% of them by content
    and 1.5% by the search, in the first three for 13.8% against 3.4%. The model learned nothing about the
    deep codes of items it never saw; the text they were made from still knows them.

    Merge, per request: when the model's own top-k already holds ``slots`` new items it is unchanged;
    otherwise the best new items not in it replace its lowest-ranked old items and take the last places (the
    two rankings' scores are not comparable), so the list holds min(slots, k - 1, live new items) new items
    at least. The first place is never taken (a k=1 request is the model's own answer)."""

    def __init__(self, decoder: SidDecoder, catalog: LiveCatalog):
        self.main, self.catalog = decoder, catalog
        self.ids: frozenset[str] = frozenset()   # the live added items
        self._decoder: SidDecoder | None = None
        self._embedded: list[str] = []           # the added items with a text embedding, rows of _emb
        self._emb = np.zeros((0, 0), np.float32)  # [A, D] their unit embeddings
        self._version = -1

    def _refresh(self) -> None:
        """Re-read the live added items (and rebuild the search over them) on an index change."""
        index = self.main.index
        if self._version == index.version:
            return
        delta = index.delta
        rows = delta.live_rows() if delta is not None else np.zeros(0, np.int64)
        self._decoder, self.ids, self._embedded = None, frozenset(), []
        self._emb = np.zeros((0, 0), np.float32)
        if rows.size and delta is not None:
            ids = [str(index.item_of_row(index.n_main_rows + int(r))) for r in rows.tolist()]
            added = SidIndex.build(delta.codes(), ids, index.codebook_size)  # codes(): live rows, in row order
            self._decoder = SidDecoder(self.main.model, self.main.tokenizer, added, self.main.num_beams,
                                       "renormalized")
            self.ids = frozenset(ids)
            emb = self.catalog.embeddings
            self._embedded = [i for i in ids if i in emb]
            if self._embedded:
                self._emb = np.stack([emb[i] for i in self._embedded])
        self._version = index.version

    def decoder(self) -> SidDecoder | None:
        """The search over the live added items (None without any)."""
        self._refresh()
        return self._decoder

    def reserve(self, hits: list[list[Hit]], prompts: Sequence[Sequence[int]], histories: Sequence[Sequence[str]],
                exclude: Sequence[Collection[str]] | None, k: int, slots: int,
                ranking: NewItemRanking = NEW_ITEM_RANKING) -> list[list[Hit]]:
        """``hits`` (the full search's top-k per prompt) with the reserved places filled; see the class."""
        slots = min(slots, k - 1)
        decoder = self.decoder()
        if decoder is None or slots <= 0:
            return hits
        need = [r for r, h in enumerate(hits) if sum(i in self.ids for x in h for i in x.items) < slots]
        extra = self._by_content(need, histories, exclude, slots + k) if ranking == "content" else {}
        rest = [r for r in need if r not in extra]
        if rest:
            ex = None if exclude is None else [[i for i in exclude[r] if i in self.ids] for r in rest]
            found = decoder.search([prompts[r] for r in rest], k=min(slots, decoder.num_beams), exclude=ex)
            extra.update(zip(rest, found, strict=True))
        out = list(hits)
        for r, more in extra.items():
            out[r] = merge_new(hits[r], more, k, slots, self.ids)
        return out

    def _by_content(self, rows: Sequence[int], histories: Sequence[Sequence[str]],
                    exclude: Sequence[Collection[str]] | None, n: int) -> dict[int, list[Hit]]:
        """Per row whose history has an embedded item: the ``n`` embedded added items nearest its mean, best
        first (score = cosine); ``n`` leaves room for those the main list already shows."""
        emb = self.catalog.embeddings
        queries = {r: [emb[i] for i in histories[r] if i in emb] for r in rows}
        queries = {r: q for r, q in queries.items() if q}
        if not queries or not self._embedded:
            return {}
        q = np.stack([np.mean(v, axis=0) for v in queries.values()])  # [R, D]
        q /= np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        scores = q @ self._emb.T  # [R, A]
        col = {i: c for c, i in enumerate(self._embedded)}
        out: dict[int, list[Hit]] = {}
        for row, r in enumerate(queries):
            if exclude is not None:
                scores[row, [col[i] for i in exclude[r] if i in col]] = -np.inf
            best = np.argsort(-scores[row], kind="stable")[:n]
            out[r] = [self._hit(self._embedded[c], float(scores[row, c])) for c in best if scores[row, c] > -np.inf]
        return out

    def _hit(self, item_id: str, score: float) -> Hit:
        sid = self.catalog.sid_of[item_id]
        return Hit(sid, tuple(parse_sid(sid)), score, [item_id])


def merge_new(main: list[Hit], extra: list[Hit], k: int, slots: int, new_ids: AbstractSet[str]) -> list[Hit]:
    """One request's top-k ``main`` with up to ``slots`` new items in all: the best of ``extra`` not shown
    yet replace the lowest-ranked items of ``main`` that are not new, after the kept ones (``NewItemSlots``)."""
    shown = {i for h in main for i in h.items}
    want = slots - sum(i in new_ids for i in shown)
    fresh: list[Hit] = []
    for h in extra:
        items = [i for i in h.items if i not in shown][:want - sum(len(f.items) for f in fresh)]
        if items:
            fresh.append(Hit(h.sid, h.codes, h.score, items))
    if not fresh:
        return main
    budget = k - sum(i in new_ids for i in shown) - sum(len(f.items) for f in fresh)  # old items kept
    kept: list[Hit] = []
    for h in main:
        items = []
        for i in h.items:
            if i in new_ids or budget > 0:
                items.append(i)
                budget -= i not in new_ids
        if items:
            kept.append(h if len(items) == len(h.items) else Hit(h.sid, h.codes, h.score, items))
    return kept + fresh


def unit_rows(x: np.ndarray) -> np.ndarray:
    """[N, D] rows scaled to unit norm (zero rows stay zero)."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def text_embeddings(store: ArtifactStore, item_ids: AbstractSet[str]) -> dict[str, np.ndarray]:
    """item id -> unit text embedding [D] from the store's ``embeddings`` stage, for ``item_ids`` only (a
    cold-start store embedded its held-out items too; they come back with their own add)."""
    if store.manifest("embeddings") is None:
        return {}
    ids, emb = read_embeddings(store)
    emb = unit_rows(np.asarray(emb, np.float32))
    return {i: emb[n] for n, i in enumerate(ids) if i in item_ids}


def sid_map(sids: pa.Table) -> dict[str, str]:
    """item_id -> SID string of a ``sids.parquet`` table."""
    return dict(zip(sids["item_id"].to_pylist(), sids["sid"].to_pylist(), strict=True))


class LiveCatalog:
    """The items a Recommender may return: the SID index and the id -> SID / title maps, changed in place
    as catalog changes arrive (``add`` / ``retire``). It holds no model, so a batch tool can keep the same
    state as a Serve replica (``from_store`` reads the token table from the tokenizer alone).

    ``retired`` keeps the last SID of each retired item: a history may still name it (the prompt shows its
    SID, as in training), but the index no longer has it, so no search returns it; under the ``keep``
    policy the other items of a shared SID stay.

    ``embeddings`` holds each item's unit text embedding (the ``embeddings`` stage's, or the one an add
    brought), also for retired items, which histories may still name: ``NewItemSlots`` ranks by them."""

    def __init__(self, index: SidIndex, sid_of: dict[str, str], titles: dict[str, str], tokens: np.ndarray,
                 embeddings: Mapping[str, np.ndarray] | None = None):
        self.index, self.sid_of, self.titles = index, sid_of, titles
        self.tokens = np.asarray(tokens)                  # [L, K] SID token ids of the model, -1 if absent
        self.embeddings: dict[str, np.ndarray] = dict(embeddings or {})  # item id -> [D] float32, unit norm
        self.retired: dict[str, str] = {}
        self.history_sids: Mapping[str, str] = ChainMap(self.sid_of, self.retired)

    @classmethod
    def from_store(cls, store: ArtifactStore) -> LiveCatalog:
        """The published catalog of a store (sids, titles, the model's SID tokens), without the model."""
        from transformers import AutoTokenizer

        sids = store.sid_table()
        codebook = int(store.require("quantizer")["config"].get("codebook_size", CODEBOOK_SIZE))
        index = SidIndex.from_table(sids, codebook)
        tokenizer = AutoTokenizer.from_pretrained(store.fetch_model_dir())
        tokens = sid_token_table(tokenizer, index.levels, index.codebook_size).numpy()
        sid_of = sid_map(sids)
        return cls(index, sid_of, store.titles(), tokens, text_embeddings(store, set(sid_of)))

    def codes_of(self, item_id: str, retired: bool = False) -> tuple[int, ...] | None:
        """The SID codes of a present item (or, with ``retired``, the last ones of a retired item); None
        if absent."""
        sid = self.sid_of.get(item_id) or (self.retired.get(item_id) if retired else None)
        return None if sid is None else tuple(parse_sid(sid))

    def add(self, item_ids: Sequence[str], codes: np.ndarray, titles: Sequence[str],
            replace: bool = False, embeddings: np.ndarray | None = None) -> list[str]:
        """Add items (their SIDs go to the index's delta part); ``replace`` lets a present id take new codes
        (an update: the old row is retired). A retired id comes back only when added again. Returns the SID
        strings. Codes must use tokens the model already has. ``embeddings`` [N, D] are the items' text
        embeddings; without them an updated item's old one is dropped (its text changed)."""
        item_ids = [str(i) for i in item_ids]
        codes = np.asarray(codes, dtype=np.int64).reshape(len(item_ids), -1)
        dup = [i for i in item_ids if i in self.sid_of]
        if dup and not replace:
            raise ValueError(f"item ids already in the catalog: {dup[:10]}")
        if codes.shape[1] != self.index.levels:
            raise ValueError(f"new items need {self.index.levels} codes, got {codes.shape[1]}")
        lacking = [render_sid(c) for c in codes if any(int(self.tokens[lv, x]) < 0 for lv, x in enumerate(c))]
        if lacking:
            raise ValueError(f"SIDs need tokens the model lacks: {lacking[:5]}")
        if embeddings is not None:
            embeddings = unit_rows(np.asarray(embeddings, np.float32).reshape(len(item_ids), -1))
        self.index.add(codes, item_ids)
        sids = [render_sid(c) for c in codes]
        for n, (i, s, t) in enumerate(zip(item_ids, sids, titles, strict=True)):
            self.sid_of[i] = s
            self.titles[i] = t
            self.retired.pop(i, None)
            if embeddings is not None:
                self.embeddings[i] = embeddings[n]
            else:
                self.embeddings.pop(i, None)
        return sids

    def retire(self, item_ids: Sequence[str]) -> list[str]:
        """Retire present items: the index tombstones them (a SID left without a present item can no longer
        be reached), and they leave ``sid_of`` / ``titles``. Returns the ids that were present."""
        present = [i for i in dict.fromkeys(str(i) for i in item_ids) if i in self.sid_of]
        self.index.remove(present)
        for i in present:
            self.retired[i] = self.sid_of.pop(i)
            self.titles.pop(i, None)
        return present
