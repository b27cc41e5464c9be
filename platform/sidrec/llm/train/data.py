"""Training data of a worker: instruction rows -> tokenised examples, the step plan, shards and batches.

Every rank reads and tokenises all rows, then takes its shard of a seeded permutation each epoch, so the
data order depends only on ``train.seed``, the epoch and the world size (a restarted worker sees the same).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow.fs as pafs
import torch
from transformers import PreTrainedTokenizerBase

from sidrec.config import TrainConfig
from sidrec.llm.sft import collate, format_example, pack, prompt_mask
from sidrec.sids.tokens import is_sid_token
from sidrec.store import ArtifactStore

ROW_COLUMNS = ["task", "prompt", "response", "target_item"]


def read_rows(store: ArtifactStore, folder: str) -> list[dict]:
    """task / prompt / response / target_item rows of an instruction parquet folder ([] when it holds no file)."""
    if not store.fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True)):
        return []
    return store.read_table(folder, columns=ROW_COLUMNS).to_pylist()


def sid_token_ids(tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """Ids of the tokenizer's SID tokens (``<a_12>`` ...)."""
    return frozenset(i for t, i in tokenizer.get_added_vocab().items() if is_sid_token(t))


def tokenize_rows(rows: list[dict], tokenizer: PreTrainedTokenizerBase, max_length: int,
                  loss_on: str = "response") -> tuple[list[dict], int]:
    """`format_example` of each row; rows whose response alone does not fit ``max_length`` are skipped (counted).

    ``loss_on="items"``: next-item rows also learn every history item's SID after the first.
    """
    out, skipped = [], 0
    sid_ids = sid_token_ids(tokenizer) if loss_on == "items" else frozenset()
    for r in rows:
        label_ids = sid_ids if r["task"] == "next_item" else frozenset()
        try:
            out.append(format_example(r["prompt"], r["response"], tokenizer, max_length, label_ids))
        except ValueError:  # the response alone does not fit max_length (a very long title)
            skipped += 1
    return out, skipped


@dataclass
class Examples:
    """A worker's tokenised data: training and validation examples, the rows of the next-item check."""

    train: list[dict]
    val: list[dict]
    eval_rows: list[dict]  # rank 0 only (empty elsewhere or with train.eval_users = 0)
    skipped: int  # training rows too long to keep


def load_examples(store: ArtifactStore, instructions_path: str, tokenizer: PreTrainedTokenizerBase,
                  tcfg: TrainConfig, rank: int) -> Examples:
    """Read and tokenise the ``instructions`` stage: train rows (+ valid with train_on_valid), a seeded sample
    of valid next-item rows for the validation loss, and (rank 0) a seeded sample of valid users to rank."""
    train_rows = read_rows(store, f"{instructions_path}/train")
    valid_rows = [r for r in read_rows(store, f"{instructions_path}/valid") if r["task"] == "next_item"]
    train_ex, skipped = tokenize_rows(train_rows, tokenizer, tcfg.max_length, tcfg.loss_on)
    if tcfg.train_on_valid:  # their history items are train items, already labels of the train rows
        more, more_skipped = tokenize_rows(valid_rows, tokenizer, tcfg.max_length)
        train_ex, skipped = train_ex + more, skipped + more_skipped
    rng = np.random.default_rng([tcfg.seed, 7])
    val_pick = valid_rows
    if tcfg.max_val_rows and len(valid_rows) > tcfg.max_val_rows:
        val_pick = [valid_rows[i] for i in sorted(rng.choice(len(valid_rows), tcfg.max_val_rows, replace=False))]
    val_ex, _ = tokenize_rows(val_pick, tokenizer, tcfg.max_length)
    eval_rows = []
    if tcfg.eval_users and rank == 0:
        idx = np.random.default_rng([tcfg.seed, 11]).permutation(len(valid_rows))[:tcfg.eval_users]
        eval_rows = [valid_rows[i] for i in sorted(idx)]
    return Examples(train_ex, val_ex, eval_rows, skipped)


@dataclass(frozen=True)
class StepPlan:
    """How many examples each rank trains on per epoch and how many optimizer steps the run takes."""

    per_rank: int  # examples of each rank's shard per epoch
    steps_per_epoch: int
    total_steps: int
    warmup: int  # warm-up steps of the learning-rate schedule


def plan_steps(n_train: int, world: int, tcfg: TrainConfig) -> StepPlan:
    """The step plan; ``train.max_steps`` cuts each epoch to ceil(max_steps / epochs) steps."""
    per_rank = n_train // world
    steps_full = per_rank // tcfg.batch_size // tcfg.grad_accum
    if steps_full < 1:
        raise ValueError(f"{n_train} training examples over {world} workers do not fill one optimizer "
                         f"step of train.batch_size * train.grad_accum = {tcfg.batch_size * tcfg.grad_accum}")
    steps_per_epoch = min(steps_full, math.ceil(tcfg.max_steps / tcfg.epochs)) if tcfg.max_steps else steps_full
    total_steps = min(tcfg.max_steps, steps_per_epoch * tcfg.epochs) if tcfg.max_steps else (
        steps_per_epoch * tcfg.epochs)
    return StepPlan(per_rank, steps_per_epoch, total_steps, int(tcfg.warmup_ratio * total_steps))


def lr_lambda(total: int, warmup: int, schedule: str) -> Callable[[int], float]:
    """LambdaLR factor: linear warm-up over ``warmup`` steps, then cosine or linear decay to 0 at ``total``."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress

    return f


def epoch_shard(n_train: int, plan: StepPlan, seed: int, epoch: int, rank: int) -> np.ndarray:
    """This rank's example indices for ``epoch``: its slice of a permutation seeded by (seed, epoch)."""
    perm = np.random.default_rng([seed, epoch]).permutation(n_train)
    return perm[rank * plan.per_rank:(rank + 1) * plan.per_rank]


def batch_to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def micro_batch(examples: list[dict], shard: np.ndarray, index: int, batch_size: int, pad_id: int,
                device: torch.device, *, packed: bool) -> tuple[dict[str, torch.Tensor], int]:
    """The ``index``-th micro-batch of a shard on ``device`` (`pack`-ed with ``packed``, else `collate`-d,
    with ``in_prompt`` (B, T) either way) and its count of real tokens."""
    i0 = index * batch_size
    rows = [examples[j] for j in shard[i0:i0 + batch_size]]
    if packed:
        batch = pack(rows, pad_id)
    else:
        batch = collate(rows, pad_id)
        batch["in_prompt"] = prompt_mask(rows, batch["input_ids"].shape[1])
    return batch_to(batch, device), sum(len(r["input_ids"]) for r in rows)
