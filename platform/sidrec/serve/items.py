"""Cold-start items for a serving ``Recommender``: item text -> embedding -> codes -> a free SID.

New items go through the same path the catalog went through when the store was built, read from the store
itself: the text is rendered with the ``embeddings`` stage's template and embedded by the same text encoder
(``embed.TextEncoder`` with the stage's stored ``EmbedConfig``), the embedding is quantized by the published
``quantizer`` stage, and under the ``dedup`` collision policy of the ``sids`` stage a dedup-level code is
appended that no stored SID uses. The codes are then added to the index's delta part
(``Recommender.add_items``): the item is recommendable at once, without retraining. ``AddedItems`` keeps
what a replica added, to add it again to the next model it loads.

The model only knows the SID tokens of the catalog it was trained on (one token per (level, code) that
some item used). When the quantizer's own code for a new item uses a token the model lacks, or every
dedup-level token under its prefix is taken, the next-nearest codes made of known tokens are used instead
(a small beam search over the residual levels, nearest first); ``exact`` tells which happened.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from sidrec.config import EmbedConfig, section_from_dict
from sidrec.data.tables import CATEGORY_SEP
from sidrec.recommender import Recommender
from sidrec.sids.embed import TextEncoder, render_text
from sidrec.sids.quantize import RQKMeans, encode_codes, quantizer_from_bytes
from sidrec.store import ArtifactStore

log = logging.getLogger("ray.serve")


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
        qman = store.require("quantizer")
        qdir = store.current_path("quantizer")
        self.quantizer = quantizer_from_bytes({n: store.read_bytes(f"{qdir}/{n}") for n in qman["files"]})
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
    def _latent(self, emb: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(latent [N, d], codebooks [Lq, K, d]) of the stored quantizer."""
        q = self.quantizer
        x = torch.from_numpy(np.ascontiguousarray(emb, dtype=np.float32))
        with torch.inference_mode():
            if isinstance(q, RQKMeans):
                return q.prepare(x), q.codebooks.detach()
            return q.encoder(q.prepare(x)), q.quantizer.codebooks.detach()

    def candidates(self, emb: np.ndarray, allowed: np.ndarray, beam: int = 8) -> list[list[tuple[int, ...]]]:
        """Per item, code tuples [Lq] nearest first: the quantizer's own codes, then a beam search over the
        residual levels that only uses codes with ``allowed[level, code]`` (ranked by the final residual)."""
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


def assign_sids(rec: Recommender, encoder: ItemEncoder, items: Sequence[NewItem], emb: np.ndarray) -> list[Assigned]:
    """Choose SID codes for new items that the model can spell and that collide with no stored SID
    (nor with each other) under the ``dedup`` policy; under ``keep`` a shared SID is allowed (that is the
    policy). Raises ValueError naming the items for which no such SID exists."""
    tokens = rec.decoder.tokens.cpu().numpy()                       # [L, K] token id, -1 if absent
    levels_q = encoder.quantizer.config.levels
    dedup = encoder.collision == "dedup"
    if rec.index.levels != levels_q + int(dedup):
        raise ValueError(f"the index has {rec.index.levels} levels but the quantizer {levels_q} "
                         f"(collision={encoder.collision!r}): store stages do not match")
    known = tokens >= 0
    cands = encoder.candidates(emb, known[:levels_q])
    dedup_codes = np.flatnonzero(known[levels_q]) if dedup else np.zeros(0, np.int64)
    taken: set[tuple[int, ...]] = set()
    out, failed = [], []
    for item, options in zip(items, cands, strict=True):
        chosen = None
        for raw in options:
            if not all(known[lv, c] for lv, c in enumerate(raw)):
                continue
            if not dedup:
                chosen = raw
                break
            for d in dedup_codes:
                full = (*raw, int(d))
                if full not in taken and not rec.index.contains(np.asarray(full)):
                    chosen = full
                    break
            if chosen is not None:
                break
        if chosen is None:
            failed.append(item.item_id)
            continue
        taken.add(chosen)
        out.append(Assigned(item.item_id, tuple(int(c) for c in chosen), options[0],
                            exact=tuple(chosen[:levels_q]) == options[0]))
    if failed:
        raise ValueError(f"no free SID made of tokens the model knows for items {failed[:10]}")
    return out


@dataclass
class Added:
    """A cold-start item added on this replica, with the embedding its SID was chosen from."""

    item: NewItem
    embedding: np.ndarray
    embed_version: str                    # the ``embeddings`` stage version the embedding came from


class AddedItems:
    """The cold-start items one replica added, to add them again to every model it loads next."""

    def __init__(self) -> None:
        self._by_id: dict[str, Added] = {}

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._by_id

    def __len__(self) -> int:
        return len(self._by_id)

    def record(self, items: Sequence[NewItem], embeddings: np.ndarray, embed_version: str) -> None:
        for item, emb in zip(items, embeddings, strict=True):
            self._by_id[item.item_id] = Added(item, emb, embed_version)

    def entries(self) -> list[Added]:
        return list(self._by_id.values())

    def missing_from(self, rec: Recommender) -> list[Added]:
        """Items added since ``rec`` was loaded (it does not know them yet)."""
        return [a for i, a in self._by_id.items() if i not in rec.sid_of]

    def reapply(self, rec: Recommender, encoder: ItemEncoder, entries: Sequence[Added] | None = None) -> None:
        """Add earlier cold-start items (default: all) to a freshly loaded model; items that are now in the
        published catalog, or cannot get a SID any more, leave the added set (logged)."""
        todo = []
        for a in self.entries() if entries is None else entries:
            if a.item.item_id in rec.sid_of:
                self._by_id.pop(a.item.item_id, None)
                log.info("sidrec: added item %s is now in the published catalog", a.item.item_id)
            else:
                todo.append(a)
        version = encoder.versions["embeddings"]
        for a in todo:
            if a.embed_version != version:
                a.embedding = encoder.embed([a.item])[0]
                a.embed_version = version
            try:
                [got] = assign_sids(rec, encoder, [a.item], a.embedding[None])
                rec.add_items([a.item.item_id], np.asarray([got.codes]), [a.item.title.strip()])
            except ValueError as e:
                self._by_id.pop(a.item.item_id, None)
                log.warning("sidrec: dropped added item %s after reload: %s", a.item.item_id, e)
