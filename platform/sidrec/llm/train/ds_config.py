"""The concrete DeepSpeed config of a run: sidrec's batch sizes, optimizer and precision filled in."""

from __future__ import annotations

import copy
from typing import Any

from sidrec.config import TrainConfig


def _find_auto(obj: Any, where: str = "") -> list[str]:
    if isinstance(obj, dict):
        return [k for key, v in obj.items() for k in _find_auto(v, f"{where}.{key}" if where else key)]
    return [where] if obj == "auto" else []


def fill_deepspeed_config(ds: dict, tcfg: TrainConfig, world_size: int) -> dict:
    """A concrete DeepSpeed config: batch sizes, accumulation, clipping, optimizer, precision filled in.

    The optimizer is always built by DeepSpeed from the config as torch's AdamW (``torch_adam: true``): no
    fused/CPU Adam op needs compiling, on CPU or GPU. ``zero_force_ds_cpu_optimizer: false`` lets ZeRO
    offload configs use it too. The learning-rate schedule is sidrec's (passed to ``deepspeed.initialize``),
    so a ``scheduler`` section is dropped.
    """
    ds = copy.deepcopy(ds)
    ds["train_micro_batch_size_per_gpu"] = tcfg.batch_size
    ds["gradient_accumulation_steps"] = tcfg.grad_accum
    ds["train_batch_size"] = tcfg.batch_size * tcfg.grad_accum * world_size
    ds["gradient_clipping"] = float(tcfg.max_grad_norm)
    ds.setdefault("bf16", {})["enabled"] = bool(tcfg.use_gpu)
    if ds.get("fp16", {}).get("enabled"):
        raise ValueError("train.deepspeed_config: fp16 is not supported (bf16 is switched on with train.use_gpu)")
    opt = ds.setdefault("optimizer", {})
    opt["type"] = "AdamW"
    params = opt.setdefault("params", {})
    params.update({"lr": tcfg.lr, "weight_decay": tcfg.weight_decay, "torch_adam": True})
    params.setdefault("betas", [0.9, 0.999])
    params.setdefault("eps", 1e-8)
    ds["zero_force_ds_cpu_optimizer"] = False
    ds.pop("scheduler", None)
    left = _find_auto(ds)
    if left:
        raise ValueError(f"train.deepspeed_config: 'auto' values sidrec does not fill: {left}")
    return ds


def zero_stage(ds: dict | None) -> int:
    """ZeRO stage of a DeepSpeed config (0 when there is none)."""
    return int(((ds or {}).get("zero_optimization") or {}).get("stage", 0))
