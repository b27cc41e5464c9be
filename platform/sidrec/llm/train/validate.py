"""Validation on the workers: token-weighted validation loss (every rank) and the cheap next-item check
(HR@10 / NDCG@10 of constrained beam search on a sample of valid users, rank 0)."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from sidrec.config import TOP_K
from sidrec.decode.beam import SidDecoder
from sidrec.eval.metrics import hr_ndcg, target_ranks
from sidrec.hf_lock import MODEL_BUILD_LOCK
from sidrec.llm.sft import IGNORE_INDEX, collate, encode_prompt
from sidrec.llm.train.data import batch_to
from sidrec.llm.train.setup import WorkerEnv
from sidrec.sids.index import SidIndex


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum of ``values`` over all ranks (the values themselves without a process group)."""
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.cpu().tolist()


@torch.no_grad()
def validation_loss(module: Any, examples: list[dict], pad_id: int, env: WorkerEnv) -> float:
    """Token-weighted mean loss over ``examples``, sharded across ranks.

    Every rank runs the same number of forward passes (a rank short of rows runs a throw-away batch), so
    ZeRO-3's parameter gathering, a collective inside forward, stays in step.
    """
    batch_size, rank, world = env.tcfg.batch_size, env.rank, env.world
    mine = examples[rank::world]
    n_batches = math.ceil(math.ceil(len(examples) / world) / batch_size) if examples else 0
    was_training = module.training
    module.eval()
    total, count = 0.0, 0.0
    for b in range(n_batches):
        chunk = mine[b * batch_size:(b + 1) * batch_size]
        batch = batch_to(collate(chunk or examples[:1], pad_id), env.device)
        with env.autocast():
            out = module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        logits = out.logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                 ignore_index=IGNORE_INDEX, reduction="sum")
        if chunk:
            total += float(loss)
            count += float((labels != IGNORE_INDEX).sum())
    module.train(was_training)
    total, count = all_reduce_sum([total, count], env.device)
    return total / max(count, 1.0)


@torch.no_grad()
def next_item_metrics(model: Any, tokenizer: PreTrainedTokenizerBase, index: SidIndex, prompts: Sequence[str],
                      targets: Sequence[str], k: int = TOP_K, num_beams: int = TOP_K, max_length: int = 256,
                      batch_size: int = 16) -> dict[str, float]:
    """Next-item HR@k and NDCG@k of constrained beam search (``SidDecoder``) over ``index``'s items;
    ``prompts`` are rendered instruction prompts, ``targets`` the target item ids."""
    if len(prompts) != len(targets):
        raise ValueError("prompts and targets must have the same length")
    if not prompts:
        return {f"hr@{k}": 0.0, f"ndcg@{k}": 0.0, "users": 0}
    decoder = SidDecoder(model, tokenizer, index, num_beams=num_beams)
    room = max_length - index.levels - 1
    top: list[list[str]] = []
    for s in range(0, len(prompts), batch_size):
        ids = [encode_prompt(p, tokenizer, room) for p in prompts[s:s + batch_size]]
        top += [[i for h in hits for i in h.items][:k] for hits in decoder.search(ids, k=k)]
    return {**hr_ndcg(target_ranks(top, list(targets)), ks=(k,)), "users": len(prompts)}


def eval_index(sids: pa.Table, codebook_size: int) -> SidIndex:
    """The trie of the check: every published SID (``item_id``, ``codes`` columns), codes in [0, codebook_size)."""
    return SidIndex.from_table(sids, codebook_size)


def next_item_check(env: WorkerEnv, module: Any, tokenizer: PreTrainedTokenizerBase, index: SidIndex,
                    eval_rows: list[dict], model_dir: str) -> dict[str, Any]:
    """HR@10 / NDCG@10 of this epoch's model on ``eval_rows`` (ZeRO-3: the consolidated copy in ``model_dir``)."""
    t0 = time.perf_counter()
    if env.stage3:
        with MODEL_BUILD_LOCK:
            eval_model = AutoModelForCausalLM.from_pretrained(model_dir).to(env.device)
    else:
        eval_model = module
    with env.autocast():
        hr = next_item_metrics(eval_model, tokenizer, index, [r["prompt"] for r in eval_rows],
                               [r["target_item"] for r in eval_rows], k=TOP_K,
                               num_beams=env.tcfg.eval_beams, max_length=env.tcfg.max_length)
    return {f"hr@{TOP_K}": hr[f"hr@{TOP_K}"], f"ndcg@{TOP_K}": hr[f"ndcg@{TOP_K}"], "eval_users": hr["users"],
            "eval_seconds": time.perf_counter() - t0}
