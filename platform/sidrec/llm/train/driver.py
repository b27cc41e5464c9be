"""The driver side of a fine-tuning run: the `TorchTrainer`, its storage, and reading its result."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

from sidrec.config import TrainConfig
from sidrec.console import ProgressSink
from sidrec.llm.train.fit import CRASH_ENV
from sidrec.llm.train.worker import train_loop_per_worker
from sidrec.store import ArtifactStore

TRAIN_RUNS = "train_runs"  # Ray Train storage folder under the store root


def runs_path(store: ArtifactStore) -> str:
    """Where Ray Train keeps the runs' checkpoints: ``<store>/train_runs``."""
    if isinstance(store.fs, pafs.LocalFileSystem):
        return f"{store.base}/{TRAIN_RUNS}"
    return f"{store.root.rstrip('/')}/{TRAIN_RUNS}"


def crash_at_step() -> int:
    """The test hook's step (env ``SIDREC_TEST_CRASH_AT_STEP``; 0 = off)."""
    return int(os.environ.get(CRASH_ENV, "0") or 0)


def loop_config(store: ArtifactStore, tcfg: TrainConfig, ds_cfg: dict | None, codebook_size: int,
                progress: ProgressSink | None = None) -> dict:
    """What every worker gets: the (already validated) train config, the stage paths, the test hook."""
    return {
        "train": tcfg, "ds_config": ds_cfg, "store_root": store.root,
        "base_model_path": store.current_path("base_model"),
        "instructions_path": store.current_path("instructions"),
        "sids_path": f"{store.current_path('sids')}/sids.parquet",
        "codebook_size": codebook_size,
        "crash_at_step": crash_at_step(),
        "progress": progress,
    }


def fit_on_ray(store: ArtifactStore, tcfg: TrainConfig, ds_cfg: dict | None, codebook_size: int,
               name: str, progress: ProgressSink | None = None) -> Any:
    """Run (or resume: same ``name``) the Ray Train job; return its `ray.train.Result` (raises its error).

    Ray keeps the two best checkpoints (min ``val_loss``) plus the latest.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config(store, tcfg, ds_cfg, codebook_size, progress),
        scaling_config=ScalingConfig(num_workers=tcfg.num_workers, use_gpu=tcfg.use_gpu,
                                     resources_per_worker={"CPU": tcfg.cpus_per_worker}),
        run_config=RunConfig(
            storage_path=runs_path(store), name=name,
            failure_config=FailureConfig(max_failures=tcfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="val_loss",
                                               checkpoint_score_order="min"),
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    return result


def best_checkpoint(result: Any) -> Any:
    """The epoch checkpoint with the lowest ``val_loss`` (the latest one if none has it); never one taken
    inside an epoch (``partial_epoch``), which is for resuming."""
    best = [(c, m) for c, m in (result.best_checkpoints or [])
            if m and m.get("val_loss") is not None and not m.get("partial_epoch")]
    if best:
        return min(best, key=lambda cm: cm[1]["val_loss"])[0]
    return result.checkpoint


def checkpoint_state(checkpoint: Any) -> dict:
    """The ``state.json`` of a checkpoint."""
    with checkpoint.as_directory() as d, open(os.path.join(d, "state.json")) as f:
        return json.load(f)


@dataclass
class RunSummary:
    """What rank 0 returns at the end of a run (read from the latest checkpoint when it returned nothing)."""

    history: list[dict]
    log: list[dict]
    val_loss_before: float | None
    global_step: int
    starts: int = 1
    resumed_from_epoch: int = 0
    resumed_from_step: int = 0


def run_summary(result: Any) -> RunSummary:
    summary = result.return_value
    if summary:
        return RunSummary(**summary)
    st = checkpoint_state(result.checkpoint)
    return RunSummary(st["history"], st["log"], st["val_loss_before"], st["global_step"], st.get("starts", 1),
                      st.get("epoch", 0))
