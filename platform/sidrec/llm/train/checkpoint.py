"""The checkpoints: every rank writes its part into a local folder, Ray merges the uploads.

One at each epoch's end (validated; the exported model is the best of these) and, with
``train.checkpoint_every``, one every that many steps inside an epoch, for resuming only.

See the package docstring for the layout (state.json, model/, optimizer.pt, adapter/, ds/<tag>/).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from sidrec.llm.model import save_model
from sidrec.llm.train.setup import TrainParts, WorkerEnv


def merged_copy(model: Any) -> Any:
    """A plain HF model with LoRA merged in (a copy; the training model keeps its adapters)."""
    return copy.deepcopy(model).merge_and_unload()


def new_checkpoint_dir() -> str:
    return tempfile.mkdtemp(prefix="sidrec-ckpt-")


def checkpoint_tag(state: dict) -> str:
    """``epoch<N>`` after epoch N, ``step<S>`` inside an epoch (global step S): the Ray folder's name too."""
    return f"step{state['global_step']:06d}" if state["epoch_step"] else f"epoch{state['epoch']:04d}"


def save_deepspeed(parts: TrainParts, env: WorkerEnv, tmp: str, state: dict, tag: str) -> None:
    """Every rank: the engine's checkpoint (module, optimizer partitions, scheduler) under ``ds/<tag>``;
    ZeRO-3 also gathers the partitioned weights into ``w16/weights.bin`` for rank 0's HF copy."""
    state["ds_tag"] = tag
    os.makedirs(os.path.join(tmp, "ds", tag), exist_ok=True)
    parts.engine.save_checkpoint(os.path.join(tmp, "ds"), tag=tag, client_state={"epoch": state["epoch"]})
    if env.stage3:  # consolidate the partitioned weights (needs stage3_gather_16bit_weights_on_model_save)
        if not parts.engine.save_16bit_model(os.path.join(tmp, "w16"), "weights.bin"):
            raise RuntimeError("ZeRO-3 checkpoint needs stage3_gather_16bit_weights_on_model_save: true")


def save_hf_copy(parts: TrainParts, env: WorkerEnv, tokenizer: PreTrainedTokenizerBase, tmp: str) -> None:
    """Rank 0: ``model/`` as a plain HF folder (LoRA merged; the adapter too), ``optimizer.pt`` for DDP."""
    model_dir = os.path.join(tmp, "model")
    if env.stage3:
        sd = torch.load(os.path.join(tmp, "w16", "weights.bin"), map_location="cpu", weights_only=True)
        parts.module.save_pretrained(model_dir, state_dict=sd)
        tokenizer.save_pretrained(model_dir)
        shutil.rmtree(os.path.join(tmp, "w16"))
    elif env.tcfg.lora:
        save_model(merged_copy(parts.module), tokenizer, model_dir)
        parts.module.save_pretrained(os.path.join(tmp, "adapter"))
    else:
        save_model(parts.module, tokenizer, model_dir)
    if not env.use_ds:
        torch.save({"optimizer": parts.optimizer.state_dict(), "scheduler": parts.scheduler.state_dict()},
                   os.path.join(tmp, "optimizer.pt"))


def write_checkpoint(parts: TrainParts, env: WorkerEnv, tokenizer: PreTrainedTokenizerBase, state: dict) -> str:
    """This rank's part of the checkpoint of ``state`` (see `checkpoint_tag`), in a fresh local folder."""
    tmp = new_checkpoint_dir()
    if env.use_ds:
        save_deepspeed(parts, env, tmp, state, checkpoint_tag(state))
    if env.rank == 0:
        save_hf_copy(parts, env, tokenizer, tmp)
    return tmp


def write_state(tmp: str, state: dict) -> None:
    with open(os.path.join(tmp, "state.json"), "w") as f:
        json.dump(state, f, indent=1)


def report_checkpoint(env: WorkerEnv, metrics: dict, tmp: str, tag: str) -> None:
    """Report the metrics with the checkpoint folder ``checkpoint_<tag>``, then remove the local copy.

    DeepSpeed: every rank uploads its optimizer partition; DDP: rank 0 holds the whole state.
    """
    import ray.train

    checkpoint = ray.train.Checkpoint.from_directory(tmp) if env.rank == 0 or env.use_ds else None
    ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint_{tag}")
    shutil.rmtree(tmp, ignore_errors=True)
