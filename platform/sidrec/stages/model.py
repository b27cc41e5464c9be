"""Stage ``model``: a Ray Train `TorchTrainer` run (`sidrec.llm.train`), best checkpoint exported.

Every epoch each worker reports validation loss (next-item rows of the valid split), rank 0 adds a cheap
next-item HR@10 / NDCG@10 on ``train.eval_users`` valid users (constrained beam search over a trie of the
SIDs), and every worker reports a checkpoint. The best one (min ``val_loss``) is exported as a plain Hugging
Face directory (safetensors + tokenizer) at the root of the stage folder, next to ``metrics.json`` and
``loss_curve.png``: ``AutoModelForCausalLM.from_pretrained(store.current_path("model"))`` loads it.

The Ray Train run is named after the stage fingerprint (`stage_fingerprint`, the one `run_stage` publishes),
so re-running a build whose driver died resumes from the run's checkpoints in ``<store>/train_runs``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from typing import Any

import pyarrow.fs as pafs

from sidrec import console
from sidrec.cluster import init_ray
from sidrec.config import TOP_K, SidrecConfig, TrainConfig, resolve_deepspeed_config
from sidrec.llm.train.driver import RunSummary, best_checkpoint, checkpoint_state, fit_on_ray, run_summary
from sidrec.llm.train.ds_config import fill_deepspeed_config
from sidrec.llm.train.plot import loss_curve_png
from sidrec.stages.run import run_stage, stage_fingerprint
from sidrec.store import ArtifactStore, StageRun

log = logging.getLogger("sidrec")
INPUTS = ("instructions", "base_model", "sids")


def deepspeed_config(tcfg: TrainConfig) -> dict | None:
    """The filled DeepSpeed config of the run (None for DDP)."""
    if tcfg.strategy != "deepspeed":
        return None
    return fill_deepspeed_config(resolve_deepspeed_config(tcfg.deepspeed_config), tcfg, tcfg.num_workers)


def stage_config(tcfg: TrainConfig, ds_cfg: dict | None) -> dict:
    """The stage's config as fingerprinted and published: the train section (+ the filled DeepSpeed config)."""
    config: dict[str, Any] = {"train": asdict(tcfg)}
    if ds_cfg is not None:
        config["deepspeed"] = ds_cfg
    return config


def run_name(fp: str, run: StageRun, force: bool) -> str:
    """Ray Train run name: the stage fingerprint (resumable), made unique by the version when forced."""
    return f"model-{fp}" if not force else f"model-{fp}-{run.version}"


def export(store: ArtifactStore, run: StageRun, result: Any, name: str) -> tuple[int, RunSummary]:
    """Best checkpoint's HF folder into the stage folder, plus metrics.json and loss_curve.png."""
    best = best_checkpoint(result)
    if best is None:
        raise RuntimeError(f"training run {name} reported no checkpoint")
    # the best checkpoint's HF folder (written by save_pretrained) becomes the stage folder
    pafs.copy_files(f"{best.path}/model", run.path, source_filesystem=best.filesystem,
                    destination_filesystem=store.fs)
    summary = run_summary(result)
    best_epoch = checkpoint_state(best)["epoch"]
    store.write_json(f"{run.path}/metrics.json", {
        "history": summary.history, "log": summary.log, "val_loss_before": summary.val_loss_before,
        "best_epoch": best_epoch, "run": {"name": name, "path": result.path},
    })
    store.write_bytes(f"{run.path}/loss_curve.png",
                      loss_curve_png(summary.history, summary.log, summary.val_loss_before))
    return best_epoch, summary


def stage_metrics(tcfg: TrainConfig, summary: RunSummary, best_epoch: int, train_run: str,
                  fit_seconds: float) -> dict:
    """The manifest metrics: the best epoch's validation numbers, the last epoch's, how the run went."""
    history = summary.history
    best_row = next((h for h in history if h["epoch"] == best_epoch), history[-1] if history else {})
    last = history[-1] if history else {}
    return {
        "best_epoch": best_epoch,
        "val_loss_before": summary.val_loss_before,
        "val_loss": best_row.get("val_loss"),
        f"hr@{TOP_K}": best_row.get(f"hr@{TOP_K}"),
        f"ndcg@{TOP_K}": best_row.get(f"ndcg@{TOP_K}"),
        "final_val_loss": last.get("val_loss"),
        "epochs": len(history), "steps": summary.global_step,
        "tokens_per_s": last.get("tokens_per_s"),
        "resumed_from_epoch": summary.resumed_from_epoch,
        "resumed_from_step": summary.resumed_from_step,
        "worker_starts": summary.starts,
        "fit_seconds": round(fit_seconds, 3),
        "strategy": tcfg.strategy, "num_workers": tcfg.num_workers,
        "train_run": train_run,
    }


def build(store: ArtifactStore, cfg: SidrecConfig, force: bool = False) -> dict:
    """Stage ``model``: Ray Train fine-tuning, best checkpoint (min val_loss) exported as an HF directory."""
    tcfg = cfg.train
    inputs = {stage: store.require(stage)["fingerprint"] for stage in INPUTS}
    ds_cfg = deepspeed_config(tcfg)
    config = stage_config(tcfg, ds_cfg)

    def body(run: StageRun) -> dict:
        init_ray(cfg.ray)
        name = run_name(stage_fingerprint(config, inputs), run, force)
        t0 = time.perf_counter()
        with console.progress("training", unit="step") as sink:
            result = fit_on_ray(store, tcfg, ds_cfg, cfg.quantize.codebook_size, name, sink)
        fit_seconds = time.perf_counter() - t0
        best_epoch, summary = export(store, run, result, name)
        metrics = stage_metrics(tcfg, summary, best_epoch, result.path, fit_seconds)
        log.info("%-13s %d steps in %.0f s, %.0f tokens/s, val loss %.4f (best epoch %d of %d)", "model",
                 metrics["steps"], fit_seconds, metrics["tokens_per_s"] or 0.0, metrics["val_loss"] or float("nan"),
                 best_epoch, metrics["epochs"])
        return metrics

    return run_stage(store, "model", config, inputs, force, body)
