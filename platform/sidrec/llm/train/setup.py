"""A worker's environment (rank, device, strategy, logging) and its model + optimizer (DDP or DeepSpeed)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from sidrec.config import TrainConfig
from sidrec.hf_lock import MODEL_BUILD_LOCK
from sidrec.llm.train.data import sid_token_ids
from sidrec.llm.train.ds_config import zero_stage
from sidrec.llm.train.loss import SidLevels

log = logging.getLogger("sidrec.train")


@dataclass
class WorkerEnv:
    """Who and where this worker is, and how it trains."""

    tcfg: TrainConfig
    ds_cfg: dict | None  # the filled DeepSpeed config (strategy "deepspeed" only)
    rank: int
    world: int
    device: torch.device

    @property
    def use_ds(self) -> bool:
        return self.tcfg.strategy == "deepspeed"

    @property
    def stage3(self) -> bool:
        return self.use_ds and zero_stage(self.ds_cfg) == 3

    @property
    def strategy(self) -> str:
        return f"deepspeed zero-{zero_stage(self.ds_cfg)}" if self.use_ds else "ddp"

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast for DDP on GPU; DeepSpeed casts itself, CPU runs fp32."""
        if self.tcfg.use_gpu and not self.use_ds:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def info(self, msg: str, *args: Any) -> None:
        """Log on rank 0 only, so each line appears once."""
        if self.rank == 0:
            log.info(msg, *args)


def worker_env(tcfg: TrainConfig, ds_cfg: dict | None) -> WorkerEnv:
    """This Ray Train worker's env; also sets torch's thread count."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    torch.set_num_threads(max(1, int(tcfg.cpus_per_worker)))
    device = ray.train.torch.get_device() if tcfg.use_gpu else torch.device("cpu")
    return WorkerEnv(tcfg, ds_cfg, ctx.get_world_rank(), ctx.get_world_size(), device)


@dataclass
class TrainParts:
    """What the loop drives: ``model`` takes forward/backward (DDP wrapper, plain model or DeepSpeed engine),
    ``module`` is the HF (or PEFT) model inside it."""

    model: Any
    module: Any
    optimizer: Any
    scheduler: Any
    vocab_rows: int  # embedding rows after wrapping (asserted equal to the base model's)
    trainable: int  # trainable parameters
    engine: Any = None  # the DeepSpeed engine (strategy "deepspeed"), else None
    params: list = field(default_factory=list)  # trainable parameters (gradient clipping)
    sid_levels: SidLevels | None = None  # set: history SID labels use the level softmax (train.sid_softmax)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay matrices (incl. embeddings), not biases and norm weights."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def apply_lora(model: PreTrainedModel, tcfg: TrainConfig, sid_token_ids: list[int]) -> Any:
    """LoRA on every linear layer, plus trainable rows for the SID tokens of the (tied) embedding matrix."""
    from peft import LoraConfig, get_peft_model

    lcfg = LoraConfig(
        r=tcfg.lora_r, lora_alpha=tcfg.lora_alpha, lora_dropout=0.0, task_type="CAUSAL_LM",
        target_modules="all-linear",
        # the new SID rows must learn; train just those rows of the (tied) embedding matrix
        trainable_token_indices={"embed_tokens": sorted(sid_token_ids)},
    )
    return get_peft_model(model, lcfg)


def load_model(weights_dir: str, tokenizer: PreTrainedTokenizerBase, tcfg: TrainConfig) -> tuple[Any, int]:
    """The model to train (fp32 master weights, LoRA-wrapped with train.lora) and its embedding rows.

    fp32 everywhere: fp32 compute on CPU, bf16 autocast (DDP) / bf16 engine (DeepSpeed) on GPU.
    """
    with MODEL_BUILD_LOCK:
        model = AutoModelForCausalLM.from_pretrained(weights_dir, dtype=torch.float32)
    rows = model.get_input_embeddings().weight.shape[0]
    if rows < len(tokenizer):
        raise RuntimeError(f"base model has {rows} embedding rows for {len(tokenizer)} tokens")
    model.config.use_cache = False
    if tcfg.lora:
        model = apply_lora(model, tcfg, sorted(sid_token_ids(tokenizer)))
    if tcfg.dropout > 0:
        add_dropout(model, tcfg.dropout)
    return model, rows


# the outputs that join the residual stream in Llama-family models (Qwen2, Llama, SmolLM2, Mistral, ...)
RESIDUAL_BRANCHES = ("self_attn.o_proj", "mlp.down_proj")


def add_dropout(model: torch.nn.Module, p: float) -> int:
    """Dropout ``p`` on the input embeddings and on each attention / MLP output before it joins the residual
    stream (GPT-2's embd / resid dropout, which Hugging Face's Qwen2 and Llama do not have), in train mode only.

    Forward hooks, so nothing is saved with the weights and the exported model is the plain architecture.
    Hooks the outermost module of each name, so a LoRA wrapper's output (base + adapter) is the one dropped.
    Returns the number of hooked modules.
    """
    def drop(module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.dropout(output, p, training=module.training)

    branches = [m for name, m in model.named_modules() if name.endswith(RESIDUAL_BRANCHES)]
    if not branches:
        raise ValueError(f"train.dropout: {type(model).__name__} has no {' / '.join(RESIDUAL_BRANCHES)} modules "
                         f"to drop out after; set train.dropout=0")
    for m in [model.get_input_embeddings(), *branches]:
        m.register_forward_hook(drop)
    return len(branches) + 1


def setup_deepspeed(model: Any, env: WorkerEnv, sched_fn: Callable[[int], float], expected_rows: int) -> TrainParts:
    """`deepspeed.initialize` with DeepSpeed's AdamW and sidrec's schedule; the vocabulary must survive it."""
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if env.tcfg.use_gpu else "gloo")  # reuses Ray's group
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, env.tcfg.weight_decay), config=env.ds_cfg,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, sched_fn),
    )
    emb = engine.module.get_input_embeddings().weight
    rows = int(emb.ds_shape[0]) if hasattr(emb, "ds_shape") else int(emb.shape[0])
    if rows != expected_rows:
        raise RuntimeError(f"embedding rows after deepspeed.initialize: {rows} != {expected_rows}")
    module = engine.module
    return TrainParts(engine, module, optimizer, scheduler, rows, trainable, engine=engine,
                      params=[p for p in module.parameters() if p.requires_grad])


def setup_ddp(model: Any, env: WorkerEnv, sched_fn: Callable[[int], float]) -> TrainParts:
    """DDP via `ray.train.torch.prepare_model` (a plain model on one CPU worker), torch AdamW + LambdaLR."""
    import ray.train.torch

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    rows = int(model.get_input_embeddings().weight.shape[0])
    model = ray.train.torch.prepare_model(model) if env.world > 1 or env.tcfg.use_gpu else model.to(env.device)
    module = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    optimizer = torch.optim.AdamW(param_groups(module, env.tcfg.weight_decay), lr=env.tcfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, sched_fn)
    return TrainParts(model, module, optimizer, scheduler, rows, trainable,
                      params=[p for p in module.parameters() if p.requires_grad])
