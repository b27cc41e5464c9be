"""Stage ``instructions``: next-item rows for the train and valid splits, streamed with Ray Data from the
``dataset`` and ``sids`` stages (`sidrec.llm.instructions.next_item_batch`), plus the SID <-> title
alignment rows for training. Written as parquet folders ``train/`` and ``valid/``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict
from typing import Any

import pyarrow as pa

from sidrec.cluster import init_ray
from sidrec.config import TASKS, InstructionConfig, SidrecConfig
from sidrec.llm.instructions import COLUMNS, alignment_rows, next_item_batch, sequence_windows
from sidrec.llm.train.data import read_rows
from sidrec.stages.run import run_stage
from sidrec.store import ArtifactStore, StageRun

ALIGNMENT_TASKS = ("sid_to_title", "title_to_sid")


def write_next_item(store: ArtifactStore, split: str, out: str, sid_of: dict[str, str], profiles: dict[str, str],
                    icfg: InstructionConfig) -> None:
    """Ray Data: the split's examples (train with ``train_rows=sequences``: their windows) -> next-item rows,
    written as parquet files under ``out``."""
    import ray.data

    if split == "train" and icfg.train_rows == "sequences":
        examples = store.split(split, ["user_id", "history", "target"])
        ds = ray.data.from_arrow(sequence_windows(examples, icfg.max_history))
    else:
        ds = ray.data.read_parquet(f"{store.current_path('dataset')}/{split}.parquet", filesystem=store.fs)
    ds = ds.map_batches(next_item_batch, batch_format="numpy", num_cpus=0.5,
                        fn_kwargs={"sid_of": sid_of, "profiles": profiles, "cfg": icfg})
    ds.write_parquet(out, filesystem=store.fs)


def write_alignment(store: ArtifactStore, out: str, sid_of: dict[str, str], titles: dict[str, str],
                    icfg: InstructionConfig) -> None:
    """SID -> title and title -> SID rows as ``alignment.parquet`` (nothing when their weights are 0)."""
    rows = [r for task in ALIGNMENT_TASKS for r in alignment_rows(task, sid_of, titles, icfg)]
    if rows:
        table = pa.table({c: pa.array([r[c] for r in rows], pa.string()) for c in COLUMNS})
        store.write_table(f"{out}/alignment.parquet", table)


def task_counts(store: ArtifactStore, folder: str, split: str) -> dict[str, Any]:
    """``<split>_rows`` and ``<split>_tasks`` (rows per task, in TASKS order, zero counts left out)."""
    counts = Counter(r["task"] for r in read_rows(store, folder))
    return {f"{split}_rows": sum(counts.values()),
            f"{split}_tasks": {t: counts[t] for t in TASKS if counts.get(t, 0)}}


def build(store: ArtifactStore, cfg: SidrecConfig, force: bool = False) -> dict:
    """Stage ``instructions``: train (next-item + alignment) and valid (next-item) rows, with Ray Data."""
    dataset, sids = store.require("dataset"), store.require("sids")
    icfg = cfg.instructions

    def body(run: StageRun) -> dict:
        init_ray(cfg.ray)
        sid_of, titles, profiles = store.sid_map(), store.titles(), store.profiles()
        metrics: dict[str, Any] = {}
        for split in ("train", "valid"):
            out = f"{run.path}/{split}"
            store.fs.create_dir(out, recursive=True)
            if icfg.task_weights.get("next_item", 0.0) > 0:
                write_next_item(store, split, out, sid_of, profiles, icfg)
            if split == "train":
                write_alignment(store, out, sid_of, titles, icfg)
            metrics.update(task_counts(store, out, split))
        if metrics["train_rows"] == 0:
            raise ValueError("instructions: no training rows (check instructions.task_weights)")
        return metrics

    inputs = {"dataset": dataset["fingerprint"], "sids": sids["fingerprint"]}
    return run_stage(store, "instructions", asdict(icfg), inputs, force, body)
