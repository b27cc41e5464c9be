"""Offline evaluation: the SID-LLM against most-popular and SASRec on the same examples, full ranking.

Every model ranks the whole catalog (no sampled negatives) for each example of the split (leave-one-out
for MovieLens, the published time-split examples for Amazon) and the target's rank gives HR@K (target in
the top K) and NDCG@K (1 / log2(rank + 2) when it is, rank 0-based). The SID-LLM runs as Ray Data batch
inference: an actor pool, one Recommender per actor (a GPU each when ``eval.gpus_per_actor`` > 0), fed by
streaming batches. The baselines train on exactly the data the SID-LLM trained on (train, plus valid when
``train.train_on_valid``). `sidrec.stages.eval` writes the result into the store.

With ``eval.cold_start`` the dataset's cold items (held out of all training, `sidrec.data.cold_start`) get
their SIDs first, as an admin add would (`sidrec.eval.cold`), and every SID-LLM actor adds them to its index;
most-popular and SASRec rank the warm catalog from histories without the cold items (they have nothing for
an unseen item, so they score 0 on cold targets), the content baseline ranks everything from the full
histories, and the report adds HR/NDCG per model on the cold-target and the warm-target examples. The
SID-LLM keeps ``eval.new_item_slots`` of its top-10 places for the added items (`sidrec.recommender.NewItemSlots`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Set as AbstractSet

import numpy as np
import pyarrow as pa
import torch

from sidrec import console
from sidrec.config import NEW_ITEM_RANKING, TOP_K, EvalConfig, NewItemRanking, SidrecConfig
from sidrec.console import ProgressSink
from sidrec.data.cold_start import cold_items, enabled, without
from sidrec.eval.baselines import ContentBaseline, MostPopular, train_sasrec
from sidrec.eval.cold import add_to, cold_report, cold_sids_on_ray
from sidrec.eval.metrics import hr_ndcg, personalization, target_ranks
from sidrec.recommender import Recommender
from sidrec.sids.embed import read_embeddings
from sidrec.store import ArtifactStore

log = logging.getLogger(__name__)

SID_LLM = "sid-llm"


class SidLLMPredictor:
    """Ray Data actor: examples batch (pyarrow, with a ``row`` number) -> the SID-LLM's top-10 items."""

    def __init__(self, store_root: str, num_beams: int, scoring: str, exclude_history: bool, cpus: float,
                 use_gpu: bool, progress: ProgressSink | None = None, added: dict | None = None,
                 new_item_slots: int = 0, new_item_ranking: NewItemRanking = NEW_ITEM_RANKING):
        torch.set_num_threads(max(1, int(cpus)))
        self.rec = Recommender.from_store(store_root, num_beams=num_beams, scoring=scoring,  # type: ignore[arg-type]
                                          device="cuda" if use_gpu else "cpu")
        if added:  # the cold items, with the SIDs an admin add gave them (eval.cold_start)
            add_to(self.rec, added)
        self.exclude_history, self.new_item_slots = exclude_history, new_item_slots
        self.new_item_ranking: NewItemRanking = new_item_ranking
        self.progress = progress or ProgressSink()

    def __call__(self, batch: pa.Table) -> pa.Table:
        histories = batch.column("history").to_pylist()
        users = batch.column("user_id").to_pylist()
        top = self.rec.top_items(histories, k=TOP_K, exclude_history=self.exclude_history, user_ids=users,
                                 new_item_slots=self.new_item_slots, new_item_ranking=self.new_item_ranking)
        # rows sampled for the unconstrained check: share of free beam-search outputs that are real items
        free = [i for i, f in enumerate(batch.column("free").to_pylist()) if f]
        valid: list[float | None] = [None] * len(histories)
        if free:
            hits = self.rec.recommend([histories[i] for i in free], k=TOP_K, user_ids=[users[i] for i in free],
                                      constrained=False)
            for i, h in zip(free, hits, strict=True):
                valid[i] = float(np.mean([x.valid for x in h]))
        self.progress.advance(len(histories))
        return pa.table({"row": batch.column("row"), "top": pa.array(top, pa.list_(pa.string())),
                         "free_valid": pa.array(valid, pa.float64())})


def training_examples(store: ArtifactStore, train_on_valid: bool) -> pa.Table:
    dpath = store.current_path("dataset")
    train = store.read_table(f"{dpath}/train.parquet", columns=["user_id", "history", "target"])
    if train_on_valid:
        valid = store.read_table(f"{dpath}/valid.parquet", columns=["user_id", "history", "target"])
        train = pa.concat_tables([train, valid.cast(train.schema)])
    return train


def sample(table: pa.Table, n: int, seed: int) -> pa.Table:
    if n == 0 or n >= table.num_rows:
        return table
    rows = np.sort(np.random.default_rng(seed).choice(table.num_rows, size=n, replace=False))
    return table.take(pa.array(rows))


def _free_rows(n: int, ecfg: EvalConfig) -> np.ndarray:
    """Seeded rows also decoded without the trie (the unconstrained-validity check)."""
    free = np.zeros(n, dtype=bool)
    free[np.random.default_rng(ecfg.seed + 1).choice(n, size=min(ecfg.unconstrained_sample, n), replace=False)] = True
    return free


def rank_with_sid_llm(store: ArtifactStore, ecfg: EvalConfig, examples: pa.Table,
                      added: dict | None = None) -> tuple[list[list[str]], list[float]]:
    """Top-10 items of the SID-LLM per example (Ray Data actor pool; ``added``: cold items every actor adds to
    its index first), and the valid share of the free beams."""
    import ray
    import ray.data

    rows = examples.append_column("row", pa.array(np.arange(examples.num_rows), pa.int64()))
    rows = rows.append_column("free", pa.array(_free_rows(examples.num_rows, ecfg)))
    ds = ray.data.from_arrow(rows).repartition(max(ecfg.num_actors * 4, 1))
    with console.progress("SID-LLM ranking", total=examples.num_rows, unit="example") as sink:
        out = _predict(ds, store, ecfg, sink, added)
    top: list[list[str]] = [[] for _ in range(examples.num_rows)]  # Ray Data may reorder blocks
    for row, items in zip(out.column("row").to_pylist(), out.column("top").to_pylist(), strict=True):
        top[row] = items
    return top, [v for v in out.column("free_valid").to_pylist() if v is not None]


def _predict(ds, store: ArtifactStore, ecfg: EvalConfig, sink: ProgressSink, added: dict | None) -> pa.Table:
    import ray
    import ray.data

    preds = ds.map_batches(
        SidLLMPredictor, batch_format="pyarrow", batch_size=ecfg.batch_size,
        fn_constructor_kwargs={"store_root": store.root, "num_beams": ecfg.num_beams, "scoring": ecfg.scoring,
                               "exclude_history": ecfg.exclude_history, "cpus": ecfg.cpus_per_actor,
                               "use_gpu": ecfg.gpus_per_actor > 0, "progress": sink, "added": added,
                               "new_item_slots": ecfg.new_item_slots if added else 0,
                               "new_item_ranking": ecfg.new_item_ranking},
        compute=ray.data.ActorPoolStrategy(size=ecfg.num_actors),
        num_cpus=ecfg.cpus_per_actor, num_gpus=ecfg.gpus_per_actor or None,
    )
    return pa.concat_tables(ray.get(preds.to_arrow_refs()))


def baseline_names(ecfg: EvalConfig) -> list[str]:
    """The configured baselines, plus the content baseline in a cold-start run (the one that ranks unseen items)."""
    names = list(ecfg.baselines)
    return names + ["content"] if enabled(ecfg) and "content" not in names else names


def fit_baseline(name: str, store: ArtifactStore, cfg: SidrecConfig, train: pa.Table, catalog_ids: list[str]):
    """One baseline fitted on ``train`` over ``catalog_ids`` (content: over every embedded item, no training)."""
    ecfg = cfg.eval
    if name == "most_popular":
        return MostPopular(catalog_ids).fit(train)
    if name == "content":
        return ContentBaseline(*read_embeddings(store))
    valid = None if cfg.train.train_on_valid else store.split("valid", ["user_id", "history", "target"])
    with console.local_bar("SASRec training", total=ecfg.sasrec.epochs, unit="epoch") as advance:
        return train_sasrec(train, catalog_ids, ecfg.sasrec, valid=valid, progress=lambda epoch, record: advance(1))


def rank_with_baselines(store: ArtifactStore, cfg: SidrecConfig, histories: list[list[str]], catalog_ids: list[str],
                        cold: AbstractSet[str] = frozenset()) -> tuple[dict[str, list[list[str]]], dict[str, float]]:
    """Each baseline, trained on the SID-LLM's training data, ranking the same histories. Cold items (never in
    that data) are outside most-popular's and SASRec's catalog and histories; the content baseline has them."""
    ecfg = cfg.eval
    train = training_examples(store, cfg.train.train_on_valid)
    warm_ids = [i for i in catalog_ids if i not in cold]
    warm_histories = without(histories, cold) if cold else histories
    columns, timings = {}, {}
    for name in baseline_names(ecfg):
        t0 = time.perf_counter()
        model = fit_baseline(name, store, cfg, train, warm_ids)
        key = name.replace("_", "-")
        columns[key] = model.recommend(histories if name == "content" else warm_histories, k=TOP_K,
                                       exclude_history=ecfg.exclude_history)
        timings[key] = round(time.perf_counter() - t0, 2)
    return columns, timings


def evaluate(store: ArtifactStore, cfg: SidrecConfig) -> tuple[dict, pa.Table]:
    """Rank the configured split with every model: (report, predictions table with each model's top-10)."""
    ecfg = cfg.eval
    examples = sample(store.split(ecfg.split, ["user_id", "history", "target"]), ecfg.max_examples, ecfg.seed)
    if examples.num_rows == 0:
        raise ValueError(f"the {ecfg.split} split has no examples")
    histories, targets = examples.column("history").to_pylist(), examples.column("target").to_pylist()
    cold_ids = cold_items(store) if enabled(ecfg) else []
    t0 = time.perf_counter()
    added = cold_sids_on_ray(store, ecfg, cold_ids) if cold_ids else None
    t1 = time.perf_counter()
    llm_top, free_valid = rank_with_sid_llm(store, ecfg, examples, added)
    columns: dict[str, list[list[str]]] = {SID_LLM: llm_top}
    timings = {SID_LLM: round(time.perf_counter() - t1, 2)}
    catalog_ids = store.read_table(f"{store.current_path('dataset')}/catalog.parquet", columns=["item_id"])
    catalog_ids = catalog_ids["item_id"].to_pylist()
    more, more_t = rank_with_baselines(store, cfg, histories, catalog_ids, set(cold_ids))
    columns |= more
    timings |= more_t
    report = {
        "name": cfg.name, "split": ecfg.split, "examples": examples.num_rows, "catalog_items": len(catalog_ids),
        "training_data": "train + valid" if cfg.train.train_on_valid else "train only",
        "model_version": store.require("model")["version"], "sids_version": store.require("sids")["version"],
        "decode": {"num_beams": ecfg.num_beams, "scoring": ecfg.scoring, "exclude_history": ecfg.exclude_history,
                   **({"new_item_slots": ecfg.new_item_slots, "new_item_ranking": ecfg.new_item_ranking}
                      if added is not None else {})},
        "models": {name: hr_ndcg(target_ranks(top, targets)) for name, top in columns.items()},
        # how much the lists depend on the history: 0 = everyone gets the same list
        "personalization": {name: personalization(top) for name, top in columns.items()},
        "seconds": timings,
        "unconstrained_invalid_share": 1.0 - float(np.mean(free_valid)) if free_valid else None,
        "unconstrained_examples": min(ecfg.unconstrained_sample, examples.num_rows),
    }
    preds = {"user_id": examples.column("user_id"), "target": examples.column("target")}
    preds |= {name: pa.array(top, pa.list_(pa.string())) for name, top in columns.items()}
    if added is not None:
        report |= cold_report(ecfg, columns, histories, targets, cold_ids, added | {"seconds": round(t1 - t0, 2)})
        cold = set(cold_ids)
        preds["cold_target"] = pa.array([t in cold for t in targets], pa.bool_())
    return report, pa.table(preds)
