"""The Ray Train worker: set up (and restore), then per epoch train, validate, checkpoint and report.

``config`` (built by `sidrec.llm.train.driver.loop_config`): ``train`` (TrainConfig), ``ds_config``,
``store_root``, ``base_model_path``, ``instructions_path``, ``sids_path``, ``codebook_size``,
``crash_at_step``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from sidrec.config import TOP_K
from sidrec.console import ProgressSink
from sidrec.llm.train.checkpoint import checkpoint_tag, report_checkpoint, write_checkpoint, write_state
from sidrec.llm.train.data import Examples, StepPlan, load_examples, lr_lambda, plan_steps
from sidrec.llm.train.fit import check_packing, train_epoch
from sidrec.llm.train.loss import sid_levels
from sidrec.llm.train.restore import (
    load_state,
    restore_ddp,
    restore_deepspeed,
    restore_lora_adapter,
    weights_dir,
)
from sidrec.llm.train.setup import TrainParts, WorkerEnv, load_model, setup_ddp, setup_deepspeed, worker_env
from sidrec.llm.train.validate import all_reduce_sum, eval_index, next_item_check, validation_loss
from sidrec.sids.index import SidIndex
from sidrec.store import ArtifactStore

log = logging.getLogger("sidrec.train")


@dataclass
class WorkerRun:
    """Everything the epochs of one worker start share."""

    env: WorkerEnv
    tokenizer: PreTrainedTokenizerBase
    pad_id: int
    data: Examples
    plan: StepPlan
    parts: TrainParts
    state: dict
    resumed_from: int
    resumed_step: int  # optimizer steps done before this start (an epoch's or a step checkpoint's)
    index: SidIndex | None = None  # rank 0 with train.eval_users > 0


def console_logging() -> None:
    """A Ray Train worker process has no logging config: print sidrec.train's INFO records to stdout."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("[sidrec.train] %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def build_parts(env: WorkerEnv, tokenizer: PreTrainedTokenizerBase, base_dir: str, ckpt_dir: str | None,
                plan: StepPlan, state: dict) -> TrainParts:
    """Model (checkpoint weights when resuming), optimizer and schedule, restored from ``ckpt_dir`` if given."""
    tcfg = env.tcfg
    model, rows = load_model(weights_dir(base_dir, ckpt_dir, tcfg.lora), tokenizer, tcfg)
    if tcfg.lora and ckpt_dir is not None and not env.use_ds:
        restore_lora_adapter(model, ckpt_dir)
    model.train()
    sched_fn = lr_lambda(plan.total_steps, plan.warmup, tcfg.lr_schedule)
    if env.use_ds:
        parts = setup_deepspeed(model, env, sched_fn, rows)
        if ckpt_dir is not None:
            restore_deepspeed(parts, env, ckpt_dir, state)
    else:
        parts = setup_ddp(model, env, sched_fn)
        if ckpt_dir is not None:
            restore_ddp(parts, env, ckpt_dir)
        if tcfg.sid_softmax == "level" and tcfg.loss_on == "items" and not tcfg.lora:
            parts.sid_levels = sid_levels(tokenizer, rows).to(env.device)
    return parts


def prepare(env: WorkerEnv, store: ArtifactStore, config: dict) -> WorkerRun:
    """Tokenizer, data and step plan, then state and model from the latest checkpoint (if any)."""
    import ray.train

    with contextlib.ExitStack() as stack:
        base_dir = stack.enter_context(store.local_dir(config["base_model_path"]))
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        data = load_examples(store, config["instructions_path"], tokenizer, env.tcfg, env.rank)
        plan = plan_steps(len(data.train), env.world, env.tcfg)
        ckpt = ray.train.get_checkpoint()
        ckpt_dir = stack.enter_context(ckpt.as_directory()) if ckpt is not None else None
        state, resumed_from = load_state(ckpt_dir)
        torch.manual_seed(env.tcfg.seed + 1000 * state["starts"] + env.rank)
        parts = build_parts(env, tokenizer, base_dir, ckpt_dir, plan, state)
        if env.tcfg.pack_rows:
            check_packing(env, parts.module, data.train, pad_id)
    index = None
    if data.eval_rows:
        index = eval_index(store.read_table(config["sids_path"], columns=["item_id", "codes"]),
                           config["codebook_size"])
    return WorkerRun(env, tokenizer, pad_id, data, plan, parts, state, resumed_from, state["global_step"], index)


def log_start(w: WorkerRun) -> None:
    env, d, p = w.env, w.data, w.plan
    env.info("start: world=%d strategy=%s%s train_examples=%d (skipped %d) val_examples=%d steps/epoch=%d "
             "total_steps=%d trainable=%s vocab_rows=%d resumed_from_epoch=%d resumed_from_step=%d", env.world,
             env.strategy,
             " +lora" if env.tcfg.lora else "", len(d.train), d.skipped, len(d.val), p.steps_per_epoch,
             p.total_steps, f"{w.parts.trainable:,}", w.parts.vocab_rows, w.resumed_from, w.resumed_step)


def step_checkpoint(w: WorkerRun) -> None:
    """A checkpoint inside an epoch, for resuming: no validation, never the exported model.

    Its ``val_loss`` is +inf so Ray's keep-the-best policy ranks it last (the latest is kept regardless).
    """
    env, state = w.env, w.state
    tmp = write_checkpoint(w.parts, env, w.tokenizer, state)
    if env.rank == 0:
        write_state(tmp, state)
    env.info("step %d: resume checkpoint (epoch %d, step %d of it)", state["global_step"], state["epoch"] + 1,
             state["epoch_step"])
    report_checkpoint(env, {"step": state["global_step"], "epoch": state["epoch"], "val_loss": float("inf"),
                            "partial_epoch": True}, tmp, checkpoint_tag(state))


def run_epoch(w: WorkerRun, epoch: int, crash_at: int, progress: ProgressSink | None = None) -> None:
    """Train one epoch, validate, checkpoint (rank 0: + the next-item check and the history) and report."""
    env, state = w.env, w.state
    res = train_epoch(env, w.parts, w.data, w.plan, state, epoch, w.pad_id, w.resumed_from, crash_at, progress,
                      checkpoint=lambda: step_checkpoint(w))
    tokens_all, loss_sum, micro_all = all_reduce_sum([res.tokens, res.loss, res.micro], env.device)
    val_loss = validation_loss(w.parts.module, w.data.val, w.pad_id, env)
    state.update(epoch=epoch + 1, epoch_step=0, world_size=env.world, strategy=env.tcfg.strategy,
                 tokens=state.get("tokens", 0) + int(tokens_all))
    metrics: dict[str, Any] = {
        "epoch": epoch + 1, "step": state["global_step"], "train_loss": loss_sum / max(micro_all, 1),
        "val_loss": val_loss, "val_loss_before": state["val_loss_before"],
        "tokens_per_s": tokens_all / max(res.seconds, 1e-9), "lr": float(w.parts.scheduler.get_last_lr()[0]),
        "train_seconds": res.seconds, "resumed_from_epoch": w.resumed_from, "starts": state["starts"],
        "world_size": env.world, "vocab_rows": w.parts.vocab_rows, "skipped_examples": w.data.skipped,
    }
    tmp = write_checkpoint(w.parts, env, w.tokenizer, state)
    if env.rank == 0 and w.index is not None:  # the other ranks wait in report
        metrics.update(next_item_check(env, w.parts.module, w.tokenizer, w.index, w.data.eval_rows,
                                       os.path.join(tmp, "model")))
    if env.rank == 0:
        state["history"].append(dict(metrics))
        write_state(tmp, state)
    hr = f" hr@{TOP_K} {metrics[f'hr@{TOP_K}']:.4f}" if f"hr@{TOP_K}" in metrics else ""
    env.info("epoch %d val_loss %.4f train_loss %.4f tokens/s %.0f%s", metrics["epoch"], val_loss,
             metrics["train_loss"], metrics["tokens_per_s"], hr)
    report_checkpoint(env, metrics, tmp, checkpoint_tag(state))


def train_loop_per_worker(config: dict) -> dict | None:
    """Ray Train worker: (restore), train, validate, checkpoint every epoch; rank 0 returns the history."""
    import torch.distributed as dist
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    console_logging()
    env = worker_env(config["train"], config.get("ds_config"))
    w = prepare(env, ArtifactStore(config["store_root"]), config)
    log_start(w)
    state = w.state
    if state["val_loss_before"] is None:
        state["val_loss_before"] = validation_loss(w.parts.module, w.data.val, w.pad_id, env)
        env.info("val_loss before training: %.4f", state["val_loss_before"])
    crash_at = int(config.get("crash_at_step") or 0)
    progress: ProgressSink = config.get("progress") or ProgressSink()
    if env.rank == 0:
        progress.set_total(w.plan.total_steps)
        progress.advance(state["global_step"])  # steps done before a restart
    for epoch in range(state["epoch"], env.tcfg.epochs):
        if state["global_step"] >= w.plan.total_steps:
            break
        run_epoch(w, epoch, crash_at, progress)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    if env.rank != 0:
        return None
    return {"history": state["history"], "log": state["log"], "val_loss_before": state["val_loss_before"],
            "global_step": state["global_step"], "starts": state["starts"], "resumed_from_epoch": w.resumed_from,
            "resumed_from_step": w.resumed_step}
