"""Offline evaluation: the SID-LLM against most-popular and SASRec on the same examples, full ranking.

    sidrec eval --config ml-100k                     # test split, HR/NDCG@1/5/10, report in the store

Every model ranks the whole catalog (no sampled negatives) for each example of the split (leave-one-out
for MovieLens, the published time-split examples for Amazon) and the target's rank gives HR@K (target in
the top K) and NDCG@K (1 / log2(rank + 2) when it is, rank 0-based). The SID-LLM runs as Ray Data batch
inference: an actor pool, one Recommender per actor (a GPU each when ``eval.gpus_per_actor`` > 0), fed by
streaming batches. The baselines train on exactly the data the SID-LLM trained on (train, plus valid when
``train.train_on_valid``). The report lands in the store as stage ``eval_<split>``: report.json, report.md
(the table), chart.png (bars per metric) and predictions.parquet (every model's top-10 per example).
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
import pyarrow as pa
import torch

from sidrec.baselines import MostPopular, SASRecConfig, train_sasrec
from sidrec.metrics import KS, hr_ndcg, target_ranks
from sidrec.store import ArtifactStore, StageRun

log = logging.getLogger(__name__)

MAX_K = max(KS)
BASELINES = ("most_popular", "sasrec")
SID_LLM = "sid-llm"


@dataclass
class EvalConfig:
    """How ``sidrec eval`` evaluates (section ``eval`` of the sidrec config)."""

    # Examples to rank: "test" (the reported numbers) or "valid" (model selection).
    split: Literal["valid", "test"] = "test"
    # Beams of the constrained beam search (>= 10: ten items are ranked per example).
    num_beams: int = 20
    # Beam scores: "raw" model log-probs or "renormalized" over the valid SID tokens at each step.
    scoring: Literal["raw", "renormalized"] = "raw"
    # Remove the example's history items from every model's ranking (off for the published protocols).
    exclude_history: bool = False
    # Examples per decoder batch inside each actor.
    batch_size: int = 16
    # Ray Data actors holding a model each.
    num_actors: int = 2
    # CPUs reserved per actor (fractional on small machines; torch uses max(1, floor(this)) threads).
    cpus_per_actor: float = 0.5
    # GPUs per actor (0 = CPU; 1 = one GPU each, bf16).
    gpus_per_actor: float = 0.0
    # Evaluate a seeded sample of this many examples (0 = all of them).
    max_examples: int = 0
    # Collaborative baselines ranked on the same examples.
    baselines: list[str] = field(default_factory=lambda: list(BASELINES))
    # Examples also decoded without the trie, to report how many free outputs are not real items (0 = skip).
    unconstrained_sample: int = 200
    # Sampling seed (max_examples, unconstrained_sample).
    seed: int = 0
    # SASRec baseline hyper-parameters.
    sasrec: SASRecConfig = field(default_factory=SASRecConfig)

    def validate(self) -> None:
        def bad(name: str, rule: str) -> ValueError:
            return ValueError(f"eval.{name} must be {rule}, got {getattr(self, name)!r}")

        if self.split not in ("valid", "test"):
            raise bad("split", "'valid' or 'test'")
        if self.scoring not in ("raw", "renormalized"):
            raise bad("scoring", "'raw' or 'renormalized'")
        for name, low in (("num_beams", MAX_K), ("batch_size", 1), ("num_actors", 1), ("max_examples", 0),
                          ("unconstrained_sample", 0), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise bad(name, f"an int >= {low}")
        if not self.cpus_per_actor > 0:
            raise bad("cpus_per_actor", "> 0")
        if not self.gpus_per_actor >= 0:
            raise bad("gpus_per_actor", ">= 0")
        unknown = [b for b in self.baselines if b not in BASELINES]
        if unknown:
            raise ValueError(f"eval.baselines: unknown baseline(s) {unknown}; known: {list(BASELINES)}")
        try:
            self.sasrec.validate()
        except ValueError as e:
            raise ValueError(f"eval.{e}") from e


# ----------------------------------------------------------------------------------- Ray Data actor


class SidLLMPredictor:
    """Ray Data actor: examples batch (pyarrow, with a ``row`` number) -> the SID-LLM's top-10 items."""

    def __init__(self, store_root: str, num_beams: int, scoring: str, exclude_history: bool, cpus: float,
                 use_gpu: bool):
        from sidrec.recommender import Recommender

        torch.set_num_threads(max(1, int(cpus)))
        self.rec = Recommender.from_store(store_root, num_beams=num_beams, scoring=scoring,  # type: ignore[arg-type]
                                          device="cuda" if use_gpu else "cpu")
        self.exclude_history = exclude_history

    def __call__(self, batch: pa.Table) -> pa.Table:
        histories = batch.column("history").to_pylist()
        users = batch.column("user_id").to_pylist()
        top = self.rec.top_items(histories, k=MAX_K, exclude_history=self.exclude_history, user_ids=users)
        # rows sampled for the unconstrained check: share of free beam-search outputs that are real items
        free = [i for i, f in enumerate(batch.column("free").to_pylist()) if f]
        valid: list[float | None] = [None] * len(histories)
        if free:
            hits = self.rec.recommend([histories[i] for i in free], k=MAX_K, user_ids=[users[i] for i in free],
                                      constrained=False)
            for i, h in zip(free, hits, strict=True):
                valid[i] = float(np.mean([x.valid for x in h]))
        return pa.table({"row": batch.column("row"), "top": pa.array(top, pa.list_(pa.string())),
                         "free_valid": pa.array(valid, pa.float64())})


# -------------------------------------------------------------------------------------------- stage


def _training_examples(store: ArtifactStore, train_on_valid: bool) -> pa.Table:
    dpath = store.current_path("dataset")
    train = store.read_table(f"{dpath}/train.parquet", columns=["user_id", "history", "target"])
    if train_on_valid:
        valid = store.read_table(f"{dpath}/valid.parquet", columns=["user_id", "history", "target"])
        train = pa.concat_tables([train, valid.cast(train.schema)])
    return train


def _sample(table: pa.Table, n: int, seed: int) -> pa.Table:
    if n == 0 or n >= table.num_rows:
        return table
    rows = np.sort(np.random.default_rng(seed).choice(table.num_rows, size=n, replace=False))
    return table.take(pa.array(rows))


def format_table(report: dict) -> str:
    """The Markdown table of a report: one row per model, HR/NDCG at 1, 5, 10."""
    cols = [f"{m}@{k}" for k in KS for m in ("hr", "ndcg")]
    lines = ["| model | " + " | ".join(c.upper().replace("@", "@") for c in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for name, metrics in report["models"].items():
        lines.append(f"| {name} | " + " | ".join(f"{metrics[c]:.4f}" for c in cols) + " |")
    return "\n".join(lines)


def _markdown(report: dict) -> str:
    head = (f"# {report['name']}: {report['split']} ({report['examples']} examples, full ranking over "
            f"{report['catalog_items']} items)\n\nTrained on: {report['training_data']}. SID-LLM decoding: beam "
            f"{report['decode']['num_beams']}, {report['decode']['scoring']} scores, exclude_history="
            f"{report['decode']['exclude_history']}.\n\n")
    tail = ""
    if report.get("unconstrained_invalid_share") is not None:
        tail = (f"\n\nUnconstrained beam search (no trie), {report['unconstrained_examples']} examples: "
                f"{report['unconstrained_invalid_share']:.1%} of the top-10 outputs are not real items.\n")
    return head + format_table(report) + tail + "\n"


def chart_png(report: dict) -> bytes:
    """Grouped bar chart: one group per metric, one bar per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [f"{m}@{k}" for m in ("hr", "ndcg") for k in KS]
    models = list(report["models"])
    fig, ax = plt.subplots(figsize=(8, 3.6))
    width = 0.8 / max(len(models), 1)
    x = np.arange(len(metrics))
    for i, name in enumerate(models):
        ax.bar(x + i * width - 0.4 + width / 2, [report["models"][name][m] for m in metrics], width, label=name)
    ax.set_xticks(x, [m.upper() for m in metrics])
    ax.set_title(f"{report['name']} — {report['split']} ({report['examples']} examples)")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def evaluate_stage(store: ArtifactStore, cfg, force: bool = False) -> dict:
    """Stage ``eval_<split>``: rank the split with the SID-LLM (Ray Data actors) and the baselines."""
    import ray
    import ray.data

    from sidrec.build import init_ray, run_stage

    ecfg: EvalConfig = cfg.eval
    ecfg.validate()
    train_on_valid = cfg.train.train_on_valid
    if ecfg.split == "valid" and train_on_valid:
        raise ValueError("eval.split is 'valid' but train.train_on_valid is true: the model trained on those "
                         "targets; evaluate on 'test'")
    model, sids, dataset = store.require("model"), store.require("sids"), store.require("dataset")
    inputs = {"model": model["fingerprint"], "sids": sids["fingerprint"], "dataset": dataset["fingerprint"]}
    config = {"eval": asdict(ecfg), "train_on_valid": train_on_valid}

    def body(run: StageRun) -> dict:
        init_ray(cfg.ray)
        dpath = store.current_path("dataset")
        examples = store.read_table(f"{dpath}/{ecfg.split}.parquet", columns=["user_id", "history", "target"])
        examples = _sample(examples, ecfg.max_examples, ecfg.seed)
        if examples.num_rows == 0:
            raise ValueError(f"the {ecfg.split} split has no examples")
        histories, targets = examples.column("history").to_pylist(), examples.column("target").to_pylist()
        t0 = time.perf_counter()
        n_free = min(ecfg.unconstrained_sample, examples.num_rows)
        free = np.zeros(examples.num_rows, dtype=bool)
        free[np.random.default_rng(ecfg.seed + 1).choice(examples.num_rows, size=n_free, replace=False)] = True
        rows = examples.append_column("row", pa.array(np.arange(examples.num_rows), pa.int64()))
        rows = rows.append_column("free", pa.array(free))
        ds = ray.data.from_arrow(rows).repartition(max(ecfg.num_actors * 4, 1))
        preds = ds.map_batches(
            SidLLMPredictor, batch_format="pyarrow", batch_size=ecfg.batch_size,
            fn_constructor_kwargs={"store_root": store.root, "num_beams": ecfg.num_beams, "scoring": ecfg.scoring,
                                   "exclude_history": ecfg.exclude_history, "cpus": ecfg.cpus_per_actor,
                                   "use_gpu": ecfg.gpus_per_actor > 0},
            compute=ray.data.ActorPoolStrategy(size=ecfg.num_actors),
            num_cpus=ecfg.cpus_per_actor, num_gpus=ecfg.gpus_per_actor or None,
        )
        out = pa.concat_tables(ray.get(preds.to_arrow_refs()))
        llm_seconds = time.perf_counter() - t0
        llm_top: list[list[str]] = [[] for _ in range(examples.num_rows)]  # Ray Data may reorder blocks
        for row, top in zip(out.column("row").to_pylist(), out.column("top").to_pylist(), strict=True):
            llm_top[row] = top
        columns: dict[str, list] = {SID_LLM: llm_top}
        timings = {SID_LLM: round(llm_seconds, 2)}

        train = _training_examples(store, train_on_valid)
        catalog_ids = store.read_table(f"{dpath}/catalog.parquet", columns=["item_id"])["item_id"].to_pylist()
        for name in ecfg.baselines:
            t1 = time.perf_counter()
            if name == "most_popular":
                model_b = MostPopular(catalog_ids).fit(train)
            else:
                valid = None if train_on_valid else store.read_table(
                    f"{dpath}/valid.parquet", columns=["user_id", "history", "target"])
                model_b = train_sasrec(train, catalog_ids, ecfg.sasrec, valid=valid)
            columns[name.replace("_", "-")] = model_b.recommend(histories, k=MAX_K,
                                                                exclude_history=ecfg.exclude_history)
            timings[name.replace("_", "-")] = round(time.perf_counter() - t1, 2)

        models = {name: hr_ndcg(target_ranks(top, targets)) for name, top in columns.items()}
        free_valid = [v for v in out.column("free_valid").to_pylist() if v is not None]
        invalid = 1.0 - float(np.mean(free_valid)) if free_valid else None
        report = {
            "name": cfg.name, "split": ecfg.split, "examples": examples.num_rows, "catalog_items": len(catalog_ids),
            "training_data": "train + valid" if train_on_valid else "train only",
            "model_version": model["version"], "sids_version": sids["version"],
            "decode": {"num_beams": ecfg.num_beams, "scoring": ecfg.scoring, "exclude_history": ecfg.exclude_history},
            "models": models, "seconds": timings,
            "unconstrained_invalid_share": invalid, "unconstrained_examples": n_free,
        }
        store.write_json(f"{run.path}/report.json", report)
        store.write_bytes(f"{run.path}/report.md", _markdown(report).encode())
        store.write_bytes(f"{run.path}/chart.png", chart_png(report))
        pred_cols = {"user_id": examples.column("user_id"), "target": examples.column("target")}
        for name, top in columns.items():
            pred_cols[name] = pa.array(top, pa.list_(pa.string()))
        store.write_table(f"{run.path}/predictions.parquet", pa.table(pred_cols))
        return {name: {k: round(v, 4) for k, v in m.items()} for name, m in models.items()}

    return run_stage(store, f"eval_{ecfg.split}", config, inputs, force, body)
