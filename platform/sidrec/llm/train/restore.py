"""Resuming a worker from the latest Ray Train checkpoint: training state, weights, optimizer, scheduler."""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from sidrec.llm.train.setup import TrainParts, WorkerEnv


def fresh_state() -> dict[str, Any]:
    """The training state of a run that has not checkpointed yet (what ``state.json`` holds)."""
    return {"epoch": 0, "epoch_step": 0, "global_step": 0, "history": [], "log": [], "starts": 0,
            "val_loss_before": None, "tokens": 0}


def load_state(ckpt_dir: str | None) -> tuple[dict[str, Any], int]:
    """(state, epochs already done) from the checkpoint's ``state.json``, counting this start in ``starts``.

    ``epoch_step`` > 0: the checkpoint was taken inside epoch ``epoch`` after that many of its steps.
    """
    state = fresh_state()
    if ckpt_dir is not None:
        with open(os.path.join(ckpt_dir, "state.json")) as f:
            state = fresh_state() | json.load(f)
    resumed_from = state["epoch"] if ckpt_dir is not None else 0
    state["starts"] = state.get("starts", 0) + 1
    return state, resumed_from


def weights_dir(base_dir: str, ckpt_dir: str | None, lora: bool) -> str:
    """Where the weights are loaded from: the checkpoint's HF copy, else (fresh run, LoRA) the base model."""
    return base_dir if (ckpt_dir is None or lora) else os.path.join(ckpt_dir, "model")


def restore_lora_adapter(model: Any, ckpt_dir: str) -> None:
    """Load the checkpoint's PEFT adapter (DDP; DeepSpeed restores it with the engine)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(os.path.join(ckpt_dir, "adapter", "adapter_model.safetensors")))


def restore_deepspeed(parts: TrainParts, env: WorkerEnv, ckpt_dir: str, state: dict) -> None:
    """Engine state (module, optimizer partitions, scheduler); after a world-size change only the weights
    (from the HF copy, or the LoRA module) come back and the scheduler is stepped forward."""
    engine, ds_dir = parts.engine, os.path.join(ckpt_dir, "ds")
    if state.get("world_size") == env.world:
        path, _ = engine.load_checkpoint(ds_dir, tag=state["ds_tag"], load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {ds_dir}")
        return
    env.info("world size changed %s -> %s: optimizer state reset", state.get("world_size"), env.world)
    if env.tcfg.lora:
        engine.load_checkpoint(ds_dir, tag=state["ds_tag"], load_module_only=True)
    for _ in range(state["global_step"]):
        parts.scheduler.step()


def restore_ddp(parts: TrainParts, env: WorkerEnv, ckpt_dir: str) -> None:
    """Optimizer and scheduler state saved by rank 0 (the weights were loaded with the model)."""
    opt_state = torch.load(os.path.join(ckpt_dir, "optimizer.pt"), map_location=env.device, weights_only=False)
    parts.optimizer.load_state_dict(opt_state["optimizer"])
    parts.scheduler.load_state_dict(opt_state["scheduler"])
