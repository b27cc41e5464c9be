"""One epoch of optimizer steps on a worker: micro-batches, accumulation, the step, the loss log."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from sidrec.console import ProgressSink
from sidrec.llm.sft import IGNORE_INDEX, collate, pack
from sidrec.llm.train.data import Examples, StepPlan, batch_to, epoch_shard, micro_batch
from sidrec.llm.train.loss import level_softmax_loss
from sidrec.llm.train.setup import TrainParts, WorkerEnv

log = logging.getLogger("sidrec.train")

# Test hook: a worker (the last rank) calls os._exit(1) after this many optimizer steps, once (never after a
# restore). Read by the driver and passed to the workers; used by tests/test_train.py only.
CRASH_ENV = "SIDREC_TEST_CRASH_AT_STEP"


@dataclass
class Window:
    """Sums since the last loss-log entry (or, for the epoch, since its start)."""

    t0: float = field(default_factory=time.perf_counter)
    tokens: int = 0
    loss: float = 0.0
    micro: int = 0

    def add(self, loss: float, tokens: int) -> None:
        self.loss += loss
        self.tokens += tokens
        self.micro += 1


@dataclass
class EpochResult:
    """This rank's sums over one epoch."""

    loss: float
    micro: int
    tokens: int
    seconds: float


def forward_backward(env: WorkerEnv, parts: TrainParts, batch: dict[str, torch.Tensor], last_micro: bool) -> float:
    """Loss of one micro-batch and its backward pass (DeepSpeed: its engine also steps); returns the loss."""
    in_prompt = batch.pop("in_prompt")
    if env.use_ds:
        loss = parts.engine(**batch, use_cache=False).loss
        parts.engine.backward(loss)
        parts.engine.step()
        return float(loss.detach())
    sync = last_micro or parts.module is parts.model  # DDP: all-reduce on the last micro-batch only
    with (contextlib.nullcontext() if sync else parts.model.no_sync()), env.autocast():
        if parts.sid_levels is not None:
            weight = parts.module.get_output_embeddings().weight
            loss = level_softmax_loss(parts.model, weight, batch, in_prompt, parts.sid_levels)
        else:
            loss = parts.model(**batch, use_cache=False).loss
    (loss / env.tcfg.grad_accum).backward()
    return float(loss.detach())


def label_losses(module: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of every label of ``batch`` (1-D, sorted: the same multiset however rows are packed)."""
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "in_prompt")}
    logits = module(**inputs, use_cache=False).logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    return torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="none").sort().values


@torch.no_grad()
def check_packing(env: WorkerEnv, module: torch.nn.Module, examples: list[dict], pad_id: int) -> None:
    """Fail fast when the model does not keep packed examples apart (``train.pack_rows``).

    transformers reads packed segments from restarting position ids (with no cache) in the architectures
    built on its masking utilities (Llama, Qwen2 and most others); one that ignores them would silently let
    examples attend to each other. Compares every label's loss packed and one example per row; every rank
    runs the same forward passes (ZeRO-3 gathers inside forward).
    """
    by_len = sorted(examples, key=lambda ex: len(ex["input_ids"]))
    # the longest and the shortest: if those two short ones do not share a row, no two examples ever do,
    # so training never packs either and there is nothing to check
    rows = [by_len[-1], *by_len[:3]]
    was_training = module.training
    module.eval()
    with env.autocast():
        plain = label_losses(module, batch_to(collate(rows, pad_id), env.device))
        packed = label_losses(module, batch_to(pack(rows, pad_id), env.device))
    module.train(was_training)
    tol = 1e-3 if next(module.parameters()).dtype == torch.float32 and not env.tcfg.use_gpu else 5e-2
    gap = float((plain - packed).abs().max())
    if gap > tol:
        raise ValueError(f"train.pack_rows: this model does not keep packed examples apart (a label's loss "
                         f"moves by {gap:.4f} when rows are packed); set train.pack_rows=false")


def optimizer_step(env: WorkerEnv, parts: TrainParts) -> None:
    """DDP: clip, AdamW step, schedule step, zero the gradients (DeepSpeed does all of it in engine.step)."""
    if env.use_ds:
        return
    if env.tcfg.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(parts.params, env.tcfg.max_grad_norm)
    parts.optimizer.step()
    parts.scheduler.step()
    parts.optimizer.zero_grad(set_to_none=True)


def log_window(env: WorkerEnv, state: dict, window: Window, epoch: int, step: int, steps: int,
               total_steps: int, lr: float) -> None:
    """Append a loss-log entry (mean loss, lr, tokens/s of all ranks since the last one) and log it."""
    dt = time.perf_counter() - window.t0
    entry = {"step": state["global_step"], "epoch": epoch + (step + 1) / steps,
             "loss": window.loss / max(window.micro, 1), "lr": lr,
             "tokens_per_s": window.tokens * env.world / max(dt, 1e-9)}
    state["log"].append(entry)
    env.info("epoch %d step %d/%d loss %.4f lr %.2e tokens/s %.0f", epoch + 1, state["global_step"], total_steps,
             entry["loss"], lr, entry["tokens_per_s"])


def crash_for_test(env: WorkerEnv, state: dict, resumed_from: int, crash_at: int) -> None:
    """Test hook (``SIDREC_TEST_CRASH_AT_STEP``): the last rank of the first start dies at step ``crash_at``.

    Ray Train collects reports by polling; wait until the epoch checkpoint is registered so the crash really
    lands "after the first checkpoint", then die without any cleanup.
    """
    if not crash_at or resumed_from or state["starts"] != 1 or state["global_step"] != crash_at \
            or env.rank != env.world - 1:
        return
    import ray.train

    ray.train.get_all_reported_checkpoints(timeout_s=120)
    log.warning("rank %d: test crash at step %d (%s)", env.rank, crash_at, CRASH_ENV)
    os._exit(1)


def train_epoch(env: WorkerEnv, parts: TrainParts, data: Examples, plan: StepPlan, state: dict, epoch: int,
                pad_id: int, resumed_from: int, crash_at: int = 0, progress: ProgressSink | None = None,
                checkpoint: Callable[[], None] | None = None) -> EpochResult:
    """Train ``epoch`` on this rank's shard; advances ``state["global_step"]`` and appends to ``state["log"]``.

    Starts after ``state["epoch_step"]`` steps (a checkpoint taken inside this epoch) and keeps that count;
    calls ``checkpoint`` every ``train.checkpoint_every`` global steps except on the epoch's last step.
    """
    tcfg = env.tcfg
    shard = epoch_shard(len(data.train), plan, tcfg.seed, epoch, env.rank)
    window, total = Window(), Window()
    first = state["epoch_step"]
    steps = min(plan.steps_per_epoch, first + plan.total_steps - state["global_step"])
    for step in range(first, steps):
        for m in range(tcfg.grad_accum):
            batch, ntok = micro_batch(data.train, shard, step * tcfg.grad_accum + m, tcfg.batch_size, pad_id,
                                      env.device, packed=tcfg.pack_rows)
            loss = forward_backward(env, parts, batch, last_micro=m == tcfg.grad_accum - 1)
            window.add(loss, ntok)
            total.add(loss, ntok)
        optimizer_step(env, parts)
        state["global_step"] += 1
        state["epoch_step"] = step + 1
        if progress is not None and env.rank == 0:
            progress.advance(1)
        if state["global_step"] % tcfg.log_every == 0 or step == steps - 1:
            lr = float(parts.scheduler.get_last_lr()[0])
            log_window(env, state, window, epoch, step, steps, plan.total_steps, lr)
            window = Window()
        if checkpoint is not None and tcfg.checkpoint_every and step < steps - 1 \
                and state["global_step"] % tcfg.checkpoint_every == 0:
            checkpoint()
        crash_for_test(env, state, resumed_from, crash_at)
    return EpochResult(total.loss, total.micro, total.tokens, time.perf_counter() - total.t0)
