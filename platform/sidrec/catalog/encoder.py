"""New catalog items -> SIDs: item text -> embedding -> codes -> a free SID, with the store's own stages.

New items go through the same path the catalog went through when the store was built, read from the store
itself: the text is rendered with the ``embeddings`` stage's template and embedded by the same text encoder
(``embed.TextEncoder`` with the stage's stored ``EmbedConfig``), the embedding is quantized by the published
``quantizer`` stage, and under the ``dedup`` collision policy of the ``sids`` stage a dedup-level code is
appended that no present SID uses. The Serve admin API, the ``sidrec items`` CLI and the cold-start
evaluation all call this module, so an item gets the same SID whichever way it arrives.

The model only knows the SID tokens of the catalog it was trained on (one token per (level, code) that
some item used). When the quantizer's own code for a new item uses a token the model lacks, or every
dedup-level token under its prefix is taken, the next-nearest codes made of known tokens are used instead
(a small beam search over the residual levels, nearest first); ``exact`` tells which happened.

A quantizer fitted with collaborative vectors (``quantize.collab_weight``) gets a new item's from its text:
the mean vector of its nearest catalog items by text (`sidrec.sids.collab`). An update of an item that had
train interactions keeps its stored vector (its clicks did not change with its text).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from sidrec.config import EmbedConfig, section_from_dict
from sidrec.data.tables import CATEGORY_SEP
from sidrec.recommender import LiveCatalog
from sidrec.sids.collab import read_collab
from sidrec.sids.embed import TextEncoder, read_embeddings, render_text
from sidrec.sids.index import SidIndex
from sidrec.sids.quantize import CONFIG_FILE, WEIGHTS_FILE, RQKMeans, encode_codes, quantizer_from_bytes
from sidrec.sids.tokens import parse_sid
from sidrec.store import ArtifactStore


@dataclass
class NewItem:
    """A catalog row posted to the admin API (fields as in the catalog; ``categories`` may be a list)."""

    item_id: str
    title: str
    brand: str = ""
    categories: str | list[str] = ""
    description: str = ""

    def row(self) -> dict[str, str]:
        cats = self.categories if isinstance(self.categories, str) else CATEGORY_SEP.join(self.categories)
        return {"item_id": self.item_id, "title": self.title.strip(), "brand": self.brand or "",
                "categories": cats or "", "description": self.description or ""}


@dataclass
class Assigned:
    """The SID codes chosen for one new item."""

    item_id: str
    codes: tuple[int, ...]
    raw_codes: tuple[int, ...]            # the stored quantizer's own codes (before any fallback)
    exact: bool                           # True when the quantizer's own codes were used
    extra: dict = field(default_factory=dict)


class ItemEncoder:
    """Embeds and quantizes new items exactly as the store's ``embeddings`` / ``quantizer`` stages did."""

    def __init__(self, store_root: str, device: str | None = None):
        store = ArtifactStore(store_root)
        emb = store.require("embeddings")
        self.embed_cfg = section_from_dict(EmbedConfig, emb["config"])
        store.require("quantizer")
        qdir = store.current_path("quantizer")
        self.quantizer = quantizer_from_bytes({n: store.read_bytes(f"{qdir}/{n}") for n in (WEIGHTS_FILE, CONFIG_FILE)})
        self.collab = read_collab(store)
        if self.collab is not None:   # the text embeddings of the items with clicks, what imputation reads
            ids, text = read_embeddings(store)
            row = {i: r for r, i in enumerate(ids)}
            known = [i for i, seen in zip(self.collab.item_ids, self.collab.observed, strict=True) if seen]
            self.known_text = text[[row[i] for i in known]]
        self.collision = store.require("sids")["config"].get("collision", "dedup")
        self.versions = {s: store.require(s)["version"] for s in ("embeddings", "quantizer", "sids")}
        self.device = device
        self._text_encoder: TextEncoder | None = None
        self._init_lock = threading.Lock()

    # ------------------------------------------------------------------------------------------ text
    def _encoder(self) -> TextEncoder:
        with self._init_lock:
            if self._text_encoder is None:
                threads = torch.get_num_threads()  # TextEncoder sets the process-wide thread count
                try:
                    self._text_encoder = TextEncoder(self.embed_cfg)
                finally:
                    torch.set_num_threads(threads)
            return self._text_encoder

    def texts(self, items: Sequence[NewItem]) -> list[str]:
        return [render_text(i.row(), self.embed_cfg.template, self.embed_cfg.max_chars) for i in items]

    def embed(self, items: Sequence[NewItem]) -> np.ndarray:
        """[N, D] float32 embeddings, as the ``embeddings`` stage computed them for the catalog."""
        if not items:
            return np.zeros((0, 0), np.float32)
        return self._encoder().encode(self.texts(items))

    # ------------------------------------------------------------------------------------- quantize
    def quantizer_input(self, emb: np.ndarray, item_ids: Sequence[str] | None = None) -> np.ndarray:
        """Text embeddings [N, D] -> what the stored quantizer reads: [N, D], or [N, D + d] with the
        collaborative vectors: stored for items of ``item_ids`` that had train interactions, else imputed
        from the catalog's text."""
        if self.collab is None or len(emb) == 0:
            return emb
        vec = self.collab.for_text(emb, self.known_text)
        for n, item in enumerate(item_ids or ()):
            row = self.collab.row_of.get(item)
            if row is not None and self.collab.observed[row]:
                vec[n] = self.collab.vectors[row]
        return self.collab.combine(emb, vec)

    def _latent(self, emb: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(latent [N, d], codebooks [Lq, K, d]) of the stored quantizer."""
        q = self.quantizer
        x = torch.from_numpy(np.ascontiguousarray(emb, dtype=np.float32))
        with torch.inference_mode():
            if isinstance(q, RQKMeans):
                return q.prepare(x), q.codebooks.detach()
            return q.encoder(q.prepare(x)), q.quantizer.codebooks.detach()

    def candidates(self, emb: np.ndarray, allowed: np.ndarray, beam: int = 8,
                   item_ids: Sequence[str] | None = None) -> list[list[tuple[int, ...]]]:
        """Per item (text embeddings [N, D]; ``item_ids`` for ``quantizer_input``), code tuples [Lq] nearest
        first: the quantizer's own codes, then a beam search over the residual levels that only uses codes
        with ``allowed[level, code]`` (ranked by the final residual)."""
        emb = self.quantizer_input(emb, item_ids)
        exact = encode_codes(self.quantizer, emb)
        z, cbs = self._latent(emb)
        levels = cbs.shape[0]
        out = []
        for n in range(z.shape[0]):
            beams: list[tuple[float, tuple[int, ...], torch.Tensor]] = [(0.0, (), z[n])]
            for lv in range(levels):
                ok = torch.from_numpy(np.asarray(allowed[lv], dtype=bool))
                nxt = []
                for _, prefix, res in beams:
                    d = (res[None, :] - cbs[lv]).pow(2).sum(-1).masked_fill(~ok, float("inf"))
                    top = torch.topk(d, min(beam, int(ok.sum())), largest=False)
                    for dist, code in zip(top.values.tolist(), top.indices.tolist(), strict=True):
                        nxt.append((dist, (*prefix, code), res - cbs[lv][code]))
                beams = sorted(nxt, key=lambda b: b[0])[:beam]
            cands = [tuple(int(c) for c in exact[n])]
            cands += [p for _, p, _ in beams if p != cands[0]]
            out.append(cands)
        return out


def assign_sids(catalog: LiveCatalog, encoder: ItemEncoder, items: Sequence[NewItem], emb: np.ndarray,
                previous: Mapping[str, Sequence[int]] | None = None) -> list[Assigned]:
    """Choose SID codes for items that the model can spell (``catalog.tokens``) and that, under the
    ``dedup`` policy, no present item holds, nor held when it was retired (a new item should not inherit
    what the model learned about a retired one), nor another item of the call; under ``keep`` a shared SID
    is allowed (that is the policy). ``previous`` holds the current codes of items being updated: an
    update whose text still quantizes to them keeps its SID. Raises ValueError naming the items for which
    no such SID exists."""
    levels_q = encoder.quantizer.config.levels
    dedup = encoder.collision == "dedup"
    index = catalog.index
    if index.levels != levels_q + int(dedup):
        raise ValueError(f"the index has {index.levels} levels but the quantizer {levels_q} "
                         f"(collision={encoder.collision!r}): store stages do not match")
    known = catalog.tokens >= 0                                      # [L, K]
    cands = encoder.candidates(emb, known[:levels_q], item_ids=[i.item_id for i in items])
    previous = previous or {}
    taken = ({tuple(parse_sid(s)) for i, s in catalog.retired.items() if i not in previous} if dedup else set())
    out, failed = [], []
    for item, options in zip(items, cands, strict=True):
        prev = previous.get(item.item_id)
        if prev is not None and _can_keep(index, item.item_id, tuple(prev), options[0], dedup, taken):
            chosen: tuple[int, ...] | None = tuple(int(c) for c in prev)
        else:
            chosen = _free_sid(index, known, options, levels_q, dedup, taken)
        if chosen is None:
            failed.append(item.item_id)
            continue
        taken.add(chosen)
        out.append(Assigned(item.item_id, chosen, options[0], exact=tuple(chosen[:levels_q]) == options[0]))
    if failed:
        raise ValueError(f"no free SID made of tokens the model knows for items {failed[:10]}")
    return out


def _can_keep(index: SidIndex, item_id: str, prev: tuple[int, ...], raw: tuple[int, ...], dedup: bool,
              taken: set[tuple[int, ...]]) -> bool:
    """An item's earlier SID stays when its new text still quantizes to it and (``dedup``) nobody else has
    it."""
    if tuple(prev[:len(raw)]) != tuple(raw) or prev in taken:
        return False
    return not dedup or not {str(i) for i in index.items_of(prev)} - {item_id}


def _free_sid(index: SidIndex, known: np.ndarray, options: Sequence[tuple[int, ...]], levels_q: int,
              dedup: bool, taken: set[tuple[int, ...]]) -> tuple[int, ...] | None:
    """The first candidate (nearest first) the model can spell, completed under ``dedup`` with the
    smallest dedup code that no present item uses under that prefix and that is not ``taken``."""
    for raw in options:
        if not all(known[lv, c] for lv, c in enumerate(raw)):
            continue
        if not dedup:
            return tuple(int(c) for c in raw)
        used = index.allowed(torch.as_tensor([raw], dtype=torch.long))[0].numpy()   # [K] present children
        for d in np.flatnonzero(known[levels_q] & ~used):
            full = (*(int(c) for c in raw), int(d))
            if full not in taken:
                return full
    return None
