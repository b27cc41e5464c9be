"""The evaluation side of ``eval.cold_start`` (the split itself is `sidrec.data.cold_start`).

- `assign_cold_sids`: after training, the held-out items get their SIDs exactly as an admin add gives a new
  item one (`sidrec.catalog`'s write path: ``ItemEncoder.embed`` of the item's catalog text with the stored
  text encoder, then ``assign_sids`` against the published catalog: the stored quantizer's codes, or the
  nearest free ones the model can spell, under the store's collision policy). Only the catalog log is left
  out: the evaluation does not publish its cold items into the store's live catalog. It runs once, in a Ray
  task (`cold_sids_on_ray`), so every SID-LLM actor adds the same SIDs to its index (`Recommender.add_items`).
- `slices`: HR/NDCG@K of every model on the test examples whose target is cold and on the others (warm);
  the two partition the examples. The SID-LLM ranks with ``eval.new_item_slots`` of its ten places kept for
  the added items, filled as ``eval.new_item_ranking`` says (`sidrec.recommender.NewItemSlots`);
  `cold_places` counts the places cold items got.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sidrec.catalog.encoder import ItemEncoder, NewItem, assign_sids
from sidrec.config import EvalConfig
from sidrec.eval.metrics import hr_ndcg, target_ranks
from sidrec.recommender import LiveCatalog, Recommender
from sidrec.sids.embed import read_embeddings
from sidrec.store import ArtifactStore

log = logging.getLogger(__name__)

COLD, WARM = "cold targets", "warm targets"
ITEM_FIELDS = ("item_id", "title", "brand", "categories", "description")


def catalog_items(store: ArtifactStore, item_ids: Sequence[str]) -> list[NewItem]:
    """The catalog rows of ``item_ids`` as the admin API receives new items (in ``item_ids`` order)."""
    table = store.read_table(f"{store.current_path('dataset')}/catalog.parquet")
    table = table.filter(pc.is_in(table["item_id"], value_set=pa.array(list(item_ids), pa.string())))
    rows = {r["item_id"]: r for r in table.select([c for c in ITEM_FIELDS if c in table.column_names]).to_pylist()}
    missing = [i for i in item_ids if i not in rows]
    if missing:
        raise ValueError(f"cold items missing from the catalog: {missing[:10]}")
    return [NewItem(**{k: v or "" for k, v in rows[i].items()}) for i in item_ids]


def _stored_cosine(store: ArtifactStore, item_ids: Sequence[str], emb: np.ndarray) -> float:
    """Least cosine between the re-embedded items and the ``embeddings`` stage's rows of them (1.0 = the same)."""
    ids, stored = read_embeddings(store)
    pos = {i: r for r, i in enumerate(ids)}
    ref = stored[[pos[i] for i in item_ids]]
    num = (ref * emb).sum(axis=1)
    den = np.linalg.norm(ref, axis=1) * np.linalg.norm(emb, axis=1)
    return float((num / np.maximum(den, 1e-12)).min())


def assign_cold_sids(store_root: str, item_ids: list[str], device: str = "cpu") -> dict:
    """SIDs of the cold items through the admin-add path: {item_ids, codes, titles, embeddings (the text
    embeddings [N, D] an add logs), exact, embedding_cosine_min}."""
    store = ArtifactStore(store_root)
    catalog = LiveCatalog.from_store(store)  # the published SIDs and the model's SID tokens, without the model
    encoder = ItemEncoder(store_root, device=device)
    items = catalog_items(store, item_ids)
    emb = encoder.embed(items)
    got = assign_sids(catalog, encoder, items, emb)
    return {"item_ids": [a.item_id for a in got], "codes": [list(a.codes) for a in got],
            "titles": [i.title.strip() for i in items], "embeddings": np.asarray(emb, np.float32),
            "exact": sum(a.exact for a in got),
            "embedding_cosine_min": round(_stored_cosine(store, item_ids, emb), 6)}


def cold_sids_on_ray(store: ArtifactStore, ecfg: EvalConfig, item_ids: list[str]) -> dict:
    """`assign_cold_sids` in one Ray task with the resources (and device) of one SID-LLM actor."""
    import ray

    use_gpu = ecfg.gpus_per_actor > 0
    task = ray.remote(num_cpus=ecfg.cpus_per_actor, num_gpus=ecfg.gpus_per_actor or None)(assign_cold_sids)
    added = ray.get(task.remote(store.root, list(item_ids), "cuda" if use_gpu else "cpu"))
    log.info("cold start: %d items got SIDs (%d the quantizer's own codes)", len(added["item_ids"]), added["exact"])
    return added


def add_to(rec: Recommender, added: dict) -> None:
    """Make the cold items recommendable by ``rec`` with the SIDs `assign_cold_sids` chose."""
    rec.add_items(added["item_ids"], np.asarray(added["codes"], dtype=np.int64), added["titles"],
                  embeddings=added.get("embeddings"))


def slices(columns: dict[str, list[list[str]]], targets: list[str], cold: set[str]) -> dict[str, dict]:
    """{"cold targets": {examples, model: metrics, ...}, "warm targets": {...}} over the same examples.

    A slice with no example has only its count (no metric is defined on nothing)."""
    is_cold = np.array([t in cold for t in targets], dtype=bool)
    out: dict[str, dict] = {}
    for name, mask in ((COLD, is_cold), (WARM, ~is_cold)):
        rows = np.flatnonzero(mask)
        entry: dict = {"examples": int(rows.size)}
        if rows.size:
            picked = [targets[r] for r in rows]
            for model, top in columns.items():
                entry[model] = hr_ndcg(target_ranks([top[r] for r in rows], picked))
        out[name] = entry
    return out


def cold_report(ecfg: EvalConfig, columns: dict[str, list[list[str]]], histories: list[list[str]],
                targets: list[str], cold_ids: Sequence[str], added: dict) -> dict:
    """The report's cold-start part: metrics per slice (``cold_start``, what the run report's cold-start section
    shows) and how the cold items were chosen and got their SIDs (``cold_items``)."""
    cold = set(cold_ids)
    parts = slices(columns, targets, cold)
    parts[COLD] = {"examples": parts[COLD].pop("examples"), "held-out items": len(cold), **parts[COLD]}
    by = "newest by first interaction" if ecfg.cold_start_by == "newest" else f"random (seed {ecfg.cold_start_seed})"
    return {"cold_start": parts, "cold_items": {
        "items": len(cold), "share": ecfg.cold_start, "by": by,
        "sids_exact": added["exact"], "sids_nearest_free": len(added["item_ids"]) - added["exact"],
        "embedding_cosine_min": added["embedding_cosine_min"], "sid_seconds": added.get("seconds"),
        "examples_with_cold_history": sum(bool(cold.intersection(h)) for h in histories),
        "new_item_slots": ecfg.new_item_slots, "new_item_ranking": ecfg.new_item_ranking,
        "cold_places": cold_places(columns, cold)}}


def cold_places(columns: dict[str, list[list[str]]], cold: set[str]) -> dict[str, int]:
    """Per model, how many of its top-10 places (all examples) hold a cold item: 0 means it never shows one."""
    return {model: sum(i in cold for top in tops for i in top) for model, tops in columns.items()}
