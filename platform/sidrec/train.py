"""Supervised fine-tuning of the SID-extended LM on Ray Train (DDP or DeepSpeed ZeRO), as store stages.

    train_all(cfg)          # SID build stages, then: instructions -> base_model -> model

Stages (each skipped when its config and inputs are unchanged, see `sidrec.build.run_stage`):

- ``instructions``: next-item rows for the train and valid splits, streamed with Ray Data from the
  ``dataset`` and ``sids`` stages (`sidrec.instructions.next_item_batch`), plus the SID<->title alignment
  rows for training. Written as parquet folders ``train/`` and ``valid/``.
- ``base_model``: `load_base` + `add_sid_tokens` with the SID vocabulary, saved with `save_model`.
  The embedding matrix is resized here, long before any DDP wrapper or `deepspeed.initialize` sees it.
- ``model``: a Ray Train `TorchTrainer` run. Every epoch each worker reports validation loss (next-item
  rows of the valid split), rank 0 adds a cheap next-item HR@10 / NDCG@10 on ``train.eval_users`` valid
  users (constrained beam search over a trie of valid SIDs), and every worker reports a checkpoint. Ray
  keeps the two best (min ``val_loss``) plus the latest; the best one is exported as a plain Hugging Face
  directory (safetensors + tokenizer) at the root of the stage folder, next to ``metrics.json`` and
  ``loss_curve.png``. ``AutoModelForCausalLM.from_pretrained(store.current_path("model"))`` loads it.

Checkpoint layout (one folder per epoch, merged by Ray from every worker's upload)::

    state.json          epochs done, global step, metric history, loss log, world size, strategy
    model/              HF save_pretrained (LoRA merged), tokenizer: plain from_pretrained loads it
    optimizer.pt        DDP only (rank 0): optimizer + scheduler state
    adapter/            LoRA only: the PEFT adapter, to resume LoRA training
    ds/<tag>/...        DeepSpeed only: engine.save_checkpoint (module, optimizer partitions, scheduler)

Fault tolerance: with ``train.max_failures >= 1`` a worker that dies is restarted with the whole group
from the latest checkpoint (`ray.train.get_checkpoint()` restores weights, optimizer, scheduler, epoch).
The run name is derived from the stage fingerprint, so re-running a build whose driver died also resumes
from the run's checkpoints in ``<store>/train_runs``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import torch

from sidrec.store import ArtifactStore, StageRun, fingerprint

if TYPE_CHECKING:
    from sidrec.config import SidrecConfig

log = logging.getLogger("sidrec.train")

CONFIG_DIR = Path(__file__).parent / "configs"
# Test hook: a worker (the last rank) calls os._exit(1) after this many optimizer steps, once (never after a
# restore). Read by the driver and passed to the workers; used by tests/test_train.py only.
CRASH_ENV = "SIDREC_TEST_CRASH_AT_STEP"
HR_K = 10  # the cheap in-training check reports HR@10 / NDCG@10
TRAIN_RUNS = "train_runs"  # Ray Train storage folder under the store root


@dataclass
class TrainConfig:
    """How the SID-extended LM is fine-tuned (section ``train`` of the sidrec config)."""

    # Distributed strategy: "ddp" (torch DDP via ray.train.torch.prepare_model) or "deepspeed" (ZeRO).
    strategy: Literal["ddp", "deepspeed"] = "ddp"
    # DeepSpeed config: name of a file shipped in sidrec/configs (ds_zero2.json, ds_zero3.json) or a path.
    # Batch sizes, accumulation, clipping, optimizer lr/weight decay and bf16 are filled in at runtime.
    deepspeed_config: str = "ds_zero2.json"
    # Ray Train workers (one process each; one GPU each with use_gpu).
    num_workers: int = 2
    # Train on CUDA (bf16 autocast for DDP, bf16 for DeepSpeed, NCCL); False = fp32 on CPU with gloo.
    use_gpu: bool = False
    # CPUs Ray reserves per worker; torch uses max(1, floor(this)) threads.
    cpus_per_worker: float = 1.0
    # Passes over the training instructions (each ends with validation and a checkpoint).
    epochs: int = 3
    # Examples per worker per micro-batch.
    batch_size: int = 16
    # Micro-batches accumulated per optimizer step (global batch = batch_size * grad_accum * num_workers).
    grad_accum: int = 1
    # Peak learning rate of AdamW (high for the from-scratch tiny preset; ~1e-4 to 2e-5 for real checkpoints).
    lr: float = 1e-3
    # Decay after warm-up: "cosine" (to 0) or "linear" (to 0).
    lr_schedule: Literal["cosine", "linear"] = "cosine"
    # Share of the optimizer steps spent warming the learning rate up linearly from 0.
    warmup_ratio: float = 0.05
    # AdamW decoupled weight decay (not applied to biases and norm weights).
    weight_decay: float = 0.01
    # Gradient-norm clipping (0 = off).
    max_grad_norm: float = 1.0
    # Longest tokenised example (prompt is left-truncated to fit; the response is never cut).
    max_length: int = 256
    # Valid users sampled (seeded) for the per-epoch next-item HR@10 on rank 0 (0 = skip the check).
    eval_users: int = 200
    # Beams of the constrained beam search of that check (>= 10: ten SIDs are returned per user).
    eval_beams: int = 10
    # Valid next-item rows used for the validation loss (0 = all of them).
    max_val_rows: int = 2000
    # Worker-group restarts from the latest checkpoint before the run fails.
    max_failures: int = 1
    # Train LoRA adapters (+ the SID token rows) instead of all weights; exported merged.
    lora: bool = False
    # LoRA rank.
    lora_r: int = 16
    # LoRA alpha (scale = lora_alpha / lora_r).
    lora_alpha: int = 32
    # Seed of the model-side randomness and of the per-epoch shuffles.
    seed: int = 0
    # Total optimizer-step budget (0 = full epochs). Each epoch is cut to ceil(max_steps / epochs) steps,
    # so a short run still validates and checkpoints `epochs` times (tests, benchmarks).
    max_steps: int = 0
    # Also train next-item on the valid examples (test examples never); validation loss is then optimistic.
    train_on_valid: bool = False
    # Rank 0 logs loss, tokens/s and lr every this many optimizer steps.
    log_every: int = 20

    def validate(self) -> TrainConfig:
        """Raise ValueError naming the first bad field (``train.<field>``); return self."""

        def bad(name: str, rule: str) -> ValueError:
            return ValueError(f"train.{name} must be {rule}, got {getattr(self, name)!r}")

        if self.strategy not in ("ddp", "deepspeed"):
            raise bad("strategy", "'ddp' or 'deepspeed'")
        if self.lr_schedule not in ("cosine", "linear"):
            raise bad("lr_schedule", "'cosine' or 'linear'")
        if not self.deepspeed_config.strip():
            raise bad("deepspeed_config", "a shipped config name or a path")
        if self.strategy == "deepspeed":
            try:
                resolve_deepspeed_config(self.deepspeed_config)
            except (FileNotFoundError, json.JSONDecodeError) as e:
                raise ValueError(f"train.deepspeed_config: {e}") from e
        for name, low in (("num_workers", 1), ("epochs", 1), ("batch_size", 1), ("grad_accum", 1),
                          ("max_length", 8), ("eval_users", 0), ("eval_beams", HR_K), ("max_val_rows", 0),
                          ("max_failures", 0), ("lora_r", 1), ("lora_alpha", 1), ("seed", 0),
                          ("max_steps", 0), ("log_every", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise bad(name, f"an int >= {low}")
        if not self.cpus_per_worker > 0:
            raise bad("cpus_per_worker", "> 0")
        if not self.lr > 0:
            raise bad("lr", "> 0")
        if not 0 <= self.warmup_ratio < 1:
            raise bad("warmup_ratio", "in [0, 1)")
        if not self.weight_decay >= 0:
            raise bad("weight_decay", ">= 0")
        if not self.max_grad_norm >= 0:
            raise bad("max_grad_norm", ">= 0 (0 = no clipping)")
        return self


# ------------------------------------------------------------------------------------------- DeepSpeed


def resolve_deepspeed_config(name: str) -> dict:
    """Read a DeepSpeed JSON: a path, else a file shipped in sidrec/configs."""
    p = Path(name).expanduser()
    if not p.is_file():
        shipped = CONFIG_DIR / name
        if not shipped.is_file():
            known = sorted(f.name for f in CONFIG_DIR.glob("ds_*.json"))
            raise FileNotFoundError(f"DeepSpeed config {name!r} is neither a file nor a shipped config {known}")
        p = shipped
    with open(p) as f:
        return json.load(f)


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
    return int(((ds or {}).get("zero_optimization") or {}).get("stage", 0))


# ------------------------------------------------------------------------------------- cheap evaluation


@torch.no_grad()
def next_item_metrics(model, tokenizer, index, prompts: Sequence[str], targets: Sequence[str], k: int = HR_K,
                      num_beams: int = HR_K, max_length: int = 256, batch_size: int = 16) -> dict[str, float]:
    """Next-item HR@k and NDCG@k of constrained beam search (``SidDecoder``) over ``index``'s items;
    ``prompts`` are rendered instruction prompts, ``targets`` the target item ids."""
    from sidrec.decode import SidDecoder
    from sidrec.llm import encode_prompt
    from sidrec.metrics import hr_ndcg, target_ranks

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


# -------------------------------------------------------------------------------------- data helpers


def _local_dir(fs: pafs.FileSystem, path: str, stack: contextlib.ExitStack) -> str:
    """``path`` as a local folder: itself on a local filesystem, else a temp copy removed with ``stack``."""
    if isinstance(fs, pafs.LocalFileSystem):
        return path
    tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="sidrec-"))
    pafs.copy_files(path, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return tmp


def _put_dir(local: str, fs: pafs.FileSystem, dest: str) -> None:
    if isinstance(fs, pafs.LocalFileSystem) and os.path.abspath(local) == os.path.abspath(dest):
        return
    fs.create_dir(dest, recursive=True)
    pafs.copy_files(local, dest, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def _lr_lambda(total: int, warmup: int, schedule: str) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress

    return f


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay matrices (incl. embeddings), not biases and norm weights."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _tokenize(rows: list[dict], tokenizer, max_length: int) -> tuple[list[dict], int]:
    from sidrec.llm import format_example

    out, skipped = [], 0
    for r in rows:
        try:
            out.append(format_example(r["prompt"], r["response"], tokenizer, max_length))
        except ValueError:  # the response alone does not fit max_length (a very long title)
            skipped += 1
    return out, skipped


def _read_rows(store: ArtifactStore, folder: str) -> list[dict]:
    """task / prompt / response / target_item rows of an instruction parquet folder ([] when it holds no file)."""
    if not store.fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True)):
        return []
    return store.read_table(folder, columns=["task", "prompt", "response", "target_item"]).to_pylist()


def _batch_to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# ------------------------------------------------------------------------------------------- workers


def _print0(rank: int, msg: str) -> None:
    if rank == 0:
        print(f"[sidrec.train] {msg}", flush=True)


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.cpu().tolist()


@torch.no_grad()
def _validation_loss(module, examples: list[dict], batch_size: int, pad_id: int, device, autocast,
                     rank: int, world: int) -> float:
    """Token-weighted mean loss over ``examples``, sharded across ranks.

    Every rank runs the same number of forward passes (a rank short of rows runs a throw-away batch), so
    ZeRO-3's parameter gathering, a collective inside forward, stays in step.
    """
    from sidrec.llm import IGNORE_INDEX, collate

    mine = examples[rank::world]
    n_batches = math.ceil(math.ceil(len(examples) / world) / batch_size) if examples else 0
    was_training = module.training
    module.eval()
    total, count = 0.0, 0.0
    for b in range(n_batches):
        chunk = mine[b * batch_size:(b + 1) * batch_size]
        dummy = not chunk
        batch = _batch_to(collate(chunk or examples[:1], pad_id), device)
        with autocast():
            out = module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        logits = out.logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                 ignore_index=IGNORE_INDEX, reduction="sum")
        if not dummy:
            total += float(loss)
            count += float((labels != IGNORE_INDEX).sum())
    module.train(was_training)
    total, count = _all_reduce_sum([total, count], device)
    return total / max(count, 1.0)


def _apply_lora(model, tokenizer, tcfg: TrainConfig, sid_token_ids: list[int]):
    from peft import LoraConfig, get_peft_model

    lcfg = LoraConfig(
        r=tcfg.lora_r, lora_alpha=tcfg.lora_alpha, lora_dropout=0.0, task_type="CAUSAL_LM",
        target_modules="all-linear",
        # the new SID rows must learn; train just those rows of the (tied) embedding matrix
        trainable_token_indices={"embed_tokens": sorted(sid_token_ids)},
    )
    return get_peft_model(model, lcfg)


def _merged_copy(model):
    """A plain HF model with LoRA merged in (a copy; the training model keeps its adapters)."""
    return copy.deepcopy(model).merge_and_unload()


def train_loop_per_worker(config: dict) -> dict | None:
    """Ray Train worker: (restore), train, validate, checkpoint every epoch; rank 0 returns the history."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from sidrec.llm import SID_TOKEN_RE, collate

    hf_logging.disable_progress_bar()
    tcfg = TrainConfig(**config["train"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(tcfg.cpus_per_worker)))
    device = ray.train.torch.get_device() if tcfg.use_gpu else torch.device("cpu")
    use_ds = tcfg.strategy == "deepspeed"
    ds_cfg = config.get("ds_config")
    stage3 = use_ds and zero_stage(ds_cfg) == 3
    store = ArtifactStore(config["store_root"])

    def autocast():
        if tcfg.use_gpu and not use_ds:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    with contextlib.ExitStack() as stack:
        base_dir = _local_dir(store.fs, config["base_model_path"], stack)
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

        # ---- data: every rank reads and tokenises all rows, then takes its shard per epoch
        ipath = config["instructions_path"]
        train_rows = _read_rows(store, f"{ipath}/train")
        valid_rows = [r for r in _read_rows(store, f"{ipath}/valid") if r["task"] == "next_item"]
        if tcfg.train_on_valid:
            train_rows += valid_rows
        train_ex, skipped = _tokenize(train_rows, tokenizer, tcfg.max_length)
        rng = np.random.default_rng([tcfg.seed, 7])
        val_pick = valid_rows
        if tcfg.max_val_rows and len(valid_rows) > tcfg.max_val_rows:
            val_pick = [valid_rows[i] for i in sorted(rng.choice(len(valid_rows), tcfg.max_val_rows, replace=False))]
        val_ex, _ = _tokenize(val_pick, tokenizer, tcfg.max_length)
        eval_rows = []
        if tcfg.eval_users and rank == 0:
            idx = np.random.default_rng([tcfg.seed, 11]).permutation(len(valid_rows))[:tcfg.eval_users]
            eval_rows = [valid_rows[i] for i in sorted(idx)]
        per_rank = len(train_ex) // world
        micro_per_epoch = per_rank // tcfg.batch_size
        steps_full = micro_per_epoch // tcfg.grad_accum
        if steps_full < 1:
            raise ValueError(f"{len(train_ex)} training examples over {world} workers do not fill one optimizer "
                             f"step of train.batch_size * train.grad_accum = {tcfg.batch_size * tcfg.grad_accum}")
        steps_per_epoch = min(steps_full, math.ceil(tcfg.max_steps / tcfg.epochs)) if tcfg.max_steps else steps_full
        total_steps = min(tcfg.max_steps, steps_per_epoch * tcfg.epochs) if tcfg.max_steps else (
            steps_per_epoch * tcfg.epochs)
        warmup = int(tcfg.warmup_ratio * total_steps)

        # ---- model (+ restore)
        ckpt = ray.train.get_checkpoint()
        ckpt_dir = stack.enter_context(ckpt.as_directory()) if ckpt is not None else None
        state: dict[str, Any] = {"epoch": 0, "global_step": 0, "history": [], "log": [], "starts": 0,
                                 "val_loss_before": None, "tokens": 0}
        if ckpt_dir is not None:
            with open(os.path.join(ckpt_dir, "state.json")) as f:
                state = json.load(f)
        resumed_from = state["epoch"] if ckpt_dir is not None else 0
        state["starts"] = state.get("starts", 0) + 1
        torch.manual_seed(tcfg.seed + 1000 * state["starts"] + rank)

        weights_dir = base_dir if (ckpt_dir is None or tcfg.lora) else os.path.join(ckpt_dir, "model")
        # fp32 master weights everywhere: fp32 compute on CPU, bf16 autocast (DDP) / bf16 engine (DeepSpeed) on GPU
        model = AutoModelForCausalLM.from_pretrained(weights_dir, dtype=torch.float32)
        expected_rows = model.get_input_embeddings().weight.shape[0]
        if expected_rows < len(tokenizer):
            raise RuntimeError(f"base model has {expected_rows} embedding rows for {len(tokenizer)} tokens")
        model.config.use_cache = False
        if tcfg.lora:
            sid_ids = [i for t, i in tokenizer.get_vocab().items() if SID_TOKEN_RE.fullmatch(t)]
            model = _apply_lora(model, tokenizer, tcfg, sid_ids)
            if ckpt_dir is not None and not use_ds:
                from peft import set_peft_model_state_dict
                from safetensors.torch import load_file

                set_peft_model_state_dict(model, load_file(os.path.join(ckpt_dir, "adapter",
                                                                        "adapter_model.safetensors")))
        model.train()
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        sched_fn = _lr_lambda(total_steps, warmup, tcfg.lr_schedule)

        if use_ds:
            import deepspeed

            deepspeed.init_distributed(dist_backend="nccl" if tcfg.use_gpu else "gloo")  # reuses Ray's group
            engine, optimizer, _, scheduler = deepspeed.initialize(
                model=model, model_parameters=_param_groups(model, tcfg.weight_decay), config=ds_cfg,
                lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, sched_fn),
            )
            emb = engine.module.get_input_embeddings().weight
            rows = int(emb.ds_shape[0]) if hasattr(emb, "ds_shape") else int(emb.shape[0])
            assert rows == expected_rows, f"embedding rows after deepspeed.initialize: {rows} != {expected_rows}"
            module = engine.module
            if ckpt_dir is not None:
                if state.get("world_size") == world:
                    path, _ = engine.load_checkpoint(os.path.join(ckpt_dir, "ds"), tag=state["ds_tag"],
                                                     load_optimizer_states=True, load_lr_scheduler_states=True)
                    if path is None:
                        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir}/ds")
                else:  # another world size: weights from the HF copy (loaded above), fresh optimizer state
                    _print0(rank, f"world size changed {state.get('world_size')} -> {world}: optimizer state reset")
                    if tcfg.lora:
                        engine.load_checkpoint(os.path.join(ckpt_dir, "ds"), tag=state["ds_tag"],
                                               load_module_only=True)
                    for _ in range(state["global_step"]):
                        scheduler.step()
        else:
            rows = int(model.get_input_embeddings().weight.shape[0])
            model = ray.train.torch.prepare_model(model) if world > 1 or tcfg.use_gpu else model.to(device)
            module = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
            optimizer = torch.optim.AdamW(_param_groups(module, tcfg.weight_decay), lr=tcfg.lr)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, sched_fn)
            if ckpt_dir is not None:
                opt_state = torch.load(os.path.join(ckpt_dir, "optimizer.pt"), map_location=device,
                                       weights_only=False)
                optimizer.load_state_dict(opt_state["optimizer"])
                scheduler.load_state_dict(opt_state["scheduler"])

    index = None
    if eval_rows:
        from sidrec.index import SidIndex

        index = SidIndex.from_table(store.read_table(config["sids_path"], columns=["item_id", "codes"]))
    params = [p for p in module.parameters() if p.requires_grad]

    strategy = f"deepspeed zero-{zero_stage(ds_cfg)}" if use_ds else "ddp"
    _print0(rank, f"start: world={world} strategy={strategy}{' +lora' if tcfg.lora else ''} "
                  f"train_examples={len(train_ex)} (skipped {skipped}) val_examples={len(val_ex)} "
                  f"steps/epoch={steps_per_epoch} total_steps={total_steps} trainable={trainable:,} "
                  f"vocab_rows={rows} resumed_from_epoch={resumed_from}")

    if state["val_loss_before"] is None:
        state["val_loss_before"] = _validation_loss(module, val_ex, tcfg.batch_size, pad_id, device, autocast,
                                                    rank, world)
        _print0(rank, f"val_loss before training: {state['val_loss_before']:.4f}")

    crash_at = int(config.get("crash_at_step") or 0)
    global_step = state["global_step"]
    for epoch in range(state["epoch"], tcfg.epochs):
        if global_step >= total_steps:
            break
        perm = np.random.default_rng([tcfg.seed, epoch]).permutation(len(train_ex))
        shard = perm[rank * per_rank:(rank + 1) * per_rank]
        t_epoch = time.perf_counter()
        t_window, tok_window, loss_window, n_window = time.perf_counter(), 0, 0.0, 0
        epoch_loss, epoch_micro, epoch_tokens = 0.0, 0, 0
        steps_this_epoch = min(steps_per_epoch, total_steps - global_step)
        for step in range(steps_this_epoch):
            for m in range(tcfg.grad_accum):
                i0 = (step * tcfg.grad_accum + m) * tcfg.batch_size
                batch = _batch_to(collate([train_ex[j] for j in shard[i0:i0 + tcfg.batch_size]], pad_id), device)
                ntok = int(batch["attention_mask"].sum())
                if use_ds:
                    loss = engine(**batch, use_cache=False).loss
                    engine.backward(loss)
                    engine.step()
                else:
                    sync = m == tcfg.grad_accum - 1 or module is model  # DDP: all-reduce on the last micro-batch
                    with (contextlib.nullcontext() if sync else model.no_sync()), autocast():
                        loss = model(**batch, use_cache=False).loss
                    (loss / tcfg.grad_accum).backward()
                lv = float(loss.detach())
                loss_window += lv
                epoch_loss += lv
                n_window += 1
                epoch_micro += 1
                tok_window += ntok
                epoch_tokens += ntok
            if not use_ds:
                if tcfg.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, tcfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            global_step += 1
            lr = float(scheduler.get_last_lr()[0])
            if global_step % tcfg.log_every == 0 or step == steps_this_epoch - 1:
                dt = time.perf_counter() - t_window
                entry = {"step": global_step, "epoch": epoch + (step + 1) / steps_this_epoch,
                         "loss": loss_window / max(n_window, 1), "lr": lr,
                         "tokens_per_s": tok_window * world / max(dt, 1e-9)}
                state["log"].append(entry)
                _print0(rank, f"epoch {epoch + 1} step {global_step}/{total_steps} loss {entry['loss']:.4f} "
                              f"lr {lr:.2e} tokens/s {entry['tokens_per_s']:.0f}")
                t_window, tok_window, loss_window, n_window = time.perf_counter(), 0, 0.0, 0
            if crash_at and resumed_from == 0 and state["starts"] == 1 and global_step == crash_at \
                    and rank == world - 1:
                # Ray Train collects reports by polling; wait until the epoch checkpoint is registered so the
                # crash really lands "after the first checkpoint", then die without any cleanup.
                ray.train.get_all_reported_checkpoints(timeout_s=120)
                print(f"[sidrec.train] rank {rank}: test crash at step {global_step} ({CRASH_ENV})", flush=True)
                os._exit(1)
        train_seconds = time.perf_counter() - t_epoch
        tokens_all, loss_sum, micro_all = _all_reduce_sum([epoch_tokens, epoch_loss, epoch_micro], device)
        val_loss = _validation_loss(module, val_ex, tcfg.batch_size, pad_id, device, autocast, rank, world)
        state.update(epoch=epoch + 1, global_step=global_step, world_size=world, strategy=tcfg.strategy,
                     tokens=state.get("tokens", 0) + int(tokens_all))
        metrics: dict[str, Any] = {
            "epoch": epoch + 1, "step": global_step, "train_loss": loss_sum / max(micro_all, 1),
            "val_loss": val_loss, "val_loss_before": state["val_loss_before"],
            "tokens_per_s": tokens_all / max(train_seconds, 1e-9), "lr": float(scheduler.get_last_lr()[0]),
            "train_seconds": train_seconds, "resumed_from_epoch": resumed_from, "starts": state["starts"],
            "world_size": world, "vocab_rows": rows, "skipped_examples": skipped,
        }

        # ---- checkpoint (every rank writes its part; Ray merges the uploads into one folder)
        tmp = tempfile.mkdtemp(prefix="sidrec-ckpt-")
        tag = f"epoch{epoch + 1}"
        if use_ds:
            state["ds_tag"] = tag
            os.makedirs(os.path.join(tmp, "ds", tag), exist_ok=True)
            engine.save_checkpoint(os.path.join(tmp, "ds"), tag=tag, client_state={"epoch": epoch + 1})
            if stage3:  # consolidate the partitioned weights (needs stage3_gather_16bit_weights_on_model_save)
                if not engine.save_16bit_model(os.path.join(tmp, "w16"), "weights.bin"):
                    raise RuntimeError("ZeRO-3 checkpoint needs stage3_gather_16bit_weights_on_model_save: true")
        if rank == 0:
            if stage3:
                sd = torch.load(os.path.join(tmp, "w16", "weights.bin"), map_location="cpu", weights_only=True)
                module.save_pretrained(os.path.join(tmp, "model"), state_dict=sd)
                tokenizer.save_pretrained(os.path.join(tmp, "model"))
                shutil.rmtree(os.path.join(tmp, "w16"))
            elif tcfg.lora:
                from sidrec.llm import save_model

                save_model(_merged_copy(module), tokenizer, os.path.join(tmp, "model"))
                module.save_pretrained(os.path.join(tmp, "adapter"))
            else:
                from sidrec.llm import save_model

                save_model(module, tokenizer, os.path.join(tmp, "model"))
            if not use_ds:
                torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                           os.path.join(tmp, "optimizer.pt"))
        # ---- cheap next-item check on rank 0 (the others wait in report)
        if rank == 0 and index is not None:
            t0 = time.perf_counter()
            eval_model = AutoModelForCausalLM.from_pretrained(os.path.join(tmp, "model")).to(device) \
                if stage3 else module
            with autocast():
                hr = next_item_metrics(eval_model, tokenizer, index, [r["prompt"] for r in eval_rows],
                                       [r["target_item"] for r in eval_rows], k=HR_K,
                                       num_beams=tcfg.eval_beams, max_length=tcfg.max_length)
            metrics[f"hr@{HR_K}"] = hr[f"hr@{HR_K}"]
            metrics[f"ndcg@{HR_K}"] = hr[f"ndcg@{HR_K}"]
            metrics["eval_users"] = hr["users"]
            metrics["eval_seconds"] = time.perf_counter() - t0
            del eval_model
        if rank == 0:
            state["history"].append(dict(metrics))
            with open(os.path.join(tmp, "state.json"), "w") as f:
                json.dump(state, f, indent=1)
        _print0(rank, "epoch {epoch} val_loss {val_loss:.4f} train_loss {train_loss:.4f} tokens/s "
                      "{tokens_per_s:.0f}".format(**metrics)
                + (f" hr@{HR_K} {metrics[f'hr@{HR_K}']:.4f}" if f"hr@{HR_K}" in metrics else ""))
        # DeepSpeed: every rank uploads its optimizer partition; DDP: rank 0 holds the whole state
        checkpoint = ray.train.Checkpoint.from_directory(tmp) if rank == 0 or use_ds else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint_epoch{epoch + 1:04d}")
        shutil.rmtree(tmp, ignore_errors=True)

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    if rank == 0:
        return {"history": state["history"], "log": state["log"], "val_loss_before": state["val_loss_before"],
                "global_step": global_step, "starts": state["starts"], "resumed_from_epoch": resumed_from}
    return None


# ---------------------------------------------------------------------------------------------- stages


def build_instruction_stage(store: ArtifactStore, cfg: SidrecConfig, force: bool = False) -> dict:
    """Stage ``instructions``: train (next-item + alignment) and valid (next-item) rows, with Ray Data."""
    import ray.data

    from sidrec.build import init_ray, run_stage
    from sidrec.instructions import TASKS, alignment_rows, next_item_batch

    dataset, sids = store.require("dataset"), store.require("sids")
    icfg = cfg.instructions

    def body(run: StageRun) -> dict:
        init_ray(cfg.ray)
        dpath, spath = store.current_path("dataset"), store.current_path("sids")
        sid_table = store.read_table(f"{spath}/sids.parquet", columns=["item_id", "sid"])
        sid_of = dict(zip(sid_table["item_id"].to_pylist(), sid_table["sid"].to_pylist(), strict=True))
        catalog = store.read_table(f"{dpath}/catalog.parquet", columns=["item_id", "title"])
        titles = dict(zip(catalog["item_id"].to_pylist(), catalog["title"].to_pylist(), strict=True))
        profiles: dict[str, str] = {}
        if "profiles.parquet" in dataset.get("files", []):
            prof = store.read_table(f"{dpath}/profiles.parquet")
            profiles = dict(zip(prof["user_id"].to_pylist(), prof["profile"].to_pylist(), strict=True))
        metrics: dict[str, Any] = {}
        for split in ("train", "valid"):
            out = f"{run.path}/{split}"
            store.fs.create_dir(out, recursive=True)
            if icfg.task_weights.get("next_item", 0.0) > 0:
                ds = ray.data.read_parquet(f"{dpath}/{split}.parquet", filesystem=store.fs)
                ds = ds.map_batches(next_item_batch, batch_format="numpy", num_cpus=0.5,
                                    fn_kwargs={"sid_of": sid_of, "profiles": profiles, "cfg": icfg})
                ds.write_parquet(out, filesystem=store.fs)
            if split == "train":
                rows = [r for task in ("sid_to_title", "title_to_sid")
                        for r in alignment_rows(task, sid_of, titles, icfg)]
                if rows:
                    table = pa.table({c: pa.array([r[c] for r in rows], pa.string())
                                      for c in ("task", "prompt", "response", "user_id", "target_item")})
                    store.write_table(f"{out}/alignment.parquet", table)
            tasks = [r["task"] for r in _read_rows(store, out)]
            counts = Counter(tasks)
            metrics[f"{split}_rows"] = len(tasks)
            metrics[f"{split}_tasks"] = {t: counts.get(t, 0) for t in TASKS if counts.get(t, 0)}
        if metrics["train_rows"] == 0:
            raise ValueError("instructions: no training rows (check instructions.task_weights)")
        return metrics

    inputs = {"dataset": dataset["fingerprint"], "sids": sids["fingerprint"]}
    return run_stage(store, "instructions", asdict(icfg), inputs, force, body)


def tokenizer_corpus(store: ArtifactStore) -> list[str]:
    """Texts the preset's BPE tokenizer is trained on: catalog text, profiles and the prompt templates."""
    from sidrec.instructions import template_corpus

    dpath = store.current_path("dataset")
    catalog = store.read_table(f"{dpath}/catalog.parquet")
    texts: list[str] = []
    for col in ("title", "brand", "categories", "description"):
        if col in catalog.column_names:
            texts += [t for t in catalog[col].to_pylist() if t]
    if "profiles.parquet" in store.require("dataset").get("files", []):
        texts += [p for p in store.read_table(f"{dpath}/profiles.parquet")["profile"].to_pylist() if p]
    return texts + template_corpus()


def build_base_model_stage(store: ArtifactStore, cfg: SidrecConfig, force: bool = False) -> dict:
    """Stage ``base_model``: base LM + tokenizer with one added token per SID (level, code), resized."""
    from sidrec.build import run_stage
    from sidrec.llm import add_sid_tokens, load_base, save_model, sid_vocabulary

    dataset, sids = store.require("dataset"), store.require("sids")

    def body(run: StageRun) -> dict:
        corpus = tokenizer_corpus(store) if cfg.model.base == "tiny-qwen2" else []
        model, tokenizer = load_base(cfg.model, corpus)
        before = len(tokenizer)
        sid_strings = store.read_table(f"{store.current_path('sids')}/sids.parquet", columns=["sid"])
        vocab = sid_vocabulary(sid_strings["sid"].to_pylist())
        added = add_sid_tokens(model, tokenizer, vocab, init=cfg.model.new_token_init)
        with contextlib.ExitStack() as stack:
            local = run.path if isinstance(store.fs, pafs.LocalFileSystem) else stack.enter_context(
                tempfile.TemporaryDirectory(prefix="sidrec-base-"))
            save_model(model, tokenizer, local)
            _put_dir(local, store.fs, run.path)
        return {"base": cfg.model.base, "tokenizer_size_before": before, "sid_tokens": len(vocab),
                "sid_tokens_added": added, "tokenizer_size": len(tokenizer),
                "embedding_rows": int(model.get_input_embeddings().weight.shape[0]),
                "parameters": sum(p.numel() for p in model.parameters())}

    # the preset's tokenizer is trained on catalog text, so the dataset is an input either way
    inputs = {"dataset": dataset["fingerprint"], "sids": sids["fingerprint"]}
    return run_stage(store, "base_model", asdict(cfg.model), inputs, force, body)


def _model_stage_config(cfg: SidrecConfig) -> dict:
    return {"train": asdict(cfg.train)}


def _best_checkpoint(result) -> Any:
    best = [(c, m) for c, m in (result.best_checkpoints or []) if m and m.get("val_loss") is not None]
    if best:
        return min(best, key=lambda cm: cm[1]["val_loss"])[0]
    return result.checkpoint


def loss_curve_png(history: list[dict], log_entries: list[dict], val_loss_before: float | None) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if log_entries:
        ax.plot([e["step"] for e in log_entries], [e["loss"] for e in log_entries], label="train loss",
                color="tab:blue", alpha=0.8)
    vx = ([0] if val_loss_before is not None else []) + [h["step"] for h in history]
    vy = ([val_loss_before] if val_loss_before is not None else []) + [h["val_loss"] for h in history]
    if vx:
        ax.plot(vx, vy, "o-", label="validation loss (next item)", color="tab:orange")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if history and any(f"hr@{HR_K}" in h for h in history):
        ax2 = ax.twinx()
        ax2.plot([h["step"] for h in history], [h.get(f"hr@{HR_K}", float("nan")) for h in history], "s--",
                 color="tab:green", label=f"HR@{HR_K}")
        ax2.set_ylabel(f"HR@{HR_K}")
        ax2.legend(loc="center right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def train_model_stage(store: ArtifactStore, cfg: SidrecConfig, force: bool = False) -> dict:
    """Stage ``model``: Ray Train fine-tuning, best checkpoint (min val_loss) exported as an HF directory."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from sidrec.build import init_ray, run_stage

    tcfg = cfg.train.validate()
    instructions, base, sids = store.require("instructions"), store.require("base_model"), store.require("sids")
    ds_cfg = None
    if tcfg.strategy == "deepspeed":
        ds_cfg = fill_deepspeed_config(resolve_deepspeed_config(tcfg.deepspeed_config), tcfg, tcfg.num_workers)
        if tcfg.lora and zero_stage(ds_cfg) == 3:
            raise ValueError("train.lora is supported with DDP and DeepSpeed ZeRO-1/2, not ZeRO-3")
    config = _model_stage_config(cfg)
    if ds_cfg is not None:
        config["deepspeed"] = ds_cfg
    inputs = {"instructions": instructions["fingerprint"], "base_model": base["fingerprint"],
              "sids": sids["fingerprint"]}
    fp = fingerprint({"config": config, "inputs": inputs})

    def body(run: StageRun) -> dict:
        init_ray(cfg.ray)
        name = f"model-{fp}" if not force else f"model-{fp}-{run.version}"
        runs = f"{store.base}/{TRAIN_RUNS}" if isinstance(store.fs, pafs.LocalFileSystem) else (
            f"{store.root.rstrip('/')}/{TRAIN_RUNS}")
        loop_config = {
            "train": asdict(tcfg), "ds_config": ds_cfg, "store_root": store.root,
            "base_model_path": store.current_path("base_model"),
            "instructions_path": store.current_path("instructions"),
            "sids_path": f"{store.current_path('sids')}/sids.parquet",
            "crash_at_step": int(os.environ.get(CRASH_ENV, "0") or 0),
        }
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=loop_config,
            scaling_config=ScalingConfig(num_workers=tcfg.num_workers, use_gpu=tcfg.use_gpu,
                                         resources_per_worker={"CPU": tcfg.cpus_per_worker}),
            run_config=RunConfig(
                storage_path=runs, name=name,
                failure_config=FailureConfig(max_failures=tcfg.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="val_loss",
                                                   checkpoint_score_order="min"),
            ),
        )
        t0 = time.perf_counter()
        result = trainer.fit()
        fit_seconds = time.perf_counter() - t0
        if result.error is not None:
            raise result.error
        best = _best_checkpoint(result)
        if best is None:
            raise RuntimeError(f"training run {name} reported no checkpoint")
        # export: the best checkpoint's HF folder (written by save_pretrained) becomes the stage folder
        pafs.copy_files(f"{best.path}/model", run.path, source_filesystem=best.filesystem,
                        destination_filesystem=store.fs)
        summary = result.return_value
        if not summary:
            with result.checkpoint.as_directory() as d, open(os.path.join(d, "state.json")) as f:
                st = json.load(f)
            summary = {"history": st["history"], "log": st["log"], "val_loss_before": st["val_loss_before"],
                       "global_step": st["global_step"], "starts": st.get("starts", 1),
                       "resumed_from_epoch": st.get("epoch", 0)}
        history = summary["history"]
        with best.as_directory() as d, open(os.path.join(d, "state.json")) as f:
            best_epoch = json.load(f)["epoch"]
        best_row = next((h for h in history if h["epoch"] == best_epoch), history[-1] if history else {})
        store.write_json(f"{run.path}/metrics.json", {
            "history": history, "log": summary["log"], "val_loss_before": summary["val_loss_before"],
            "best_epoch": best_epoch, "run": {"name": name, "path": result.path},
        })
        store.write_bytes(f"{run.path}/loss_curve.png",
                          loss_curve_png(history, summary["log"], summary["val_loss_before"]))
        last = history[-1] if history else {}
        return {
            "best_epoch": best_epoch,
            "val_loss_before": summary["val_loss_before"],
            "val_loss": best_row.get("val_loss"),
            f"hr@{HR_K}": best_row.get(f"hr@{HR_K}"),
            f"ndcg@{HR_K}": best_row.get(f"ndcg@{HR_K}"),
            "final_val_loss": last.get("val_loss"),
            "epochs": len(history), "steps": summary["global_step"],
            "tokens_per_s": last.get("tokens_per_s"),
            "resumed_from_epoch": summary.get("resumed_from_epoch", 0),
            "worker_starts": summary.get("starts", 1),
            "fit_seconds": round(fit_seconds, 3),
            "strategy": tcfg.strategy, "num_workers": tcfg.num_workers,
            "train_run": result.path,
        }

    return run_stage(store, "model", config, inputs, force, body)


def train_all(cfg: SidrecConfig, force: bool = False) -> dict[str, dict]:
    """SID build stages, then instructions, base_model and model; returns every stage's manifest."""
    from sidrec.build import build_all

    out = build_all(cfg, force)
    store = ArtifactStore(cfg.store.root)
    out["instructions"] = build_instruction_stage(store, cfg, force)
    out["base_model"] = build_base_model_stage(store, cfg, force)
    out["model"] = train_model_stage(store, cfg, force)
    return out


def fetch_model_dir(store: ArtifactStore, dest: str | None = None) -> str:
    """A local folder holding the published ``model`` stage (the store folder itself when local)."""
    path = store.current_path("model")
    if isinstance(store.fs, pafs.LocalFileSystem):
        return path
    dest = dest or tempfile.mkdtemp(prefix="sidrec-model-")
    pafs.copy_files(path, dest, source_filesystem=store.fs, destination_filesystem=pafs.LocalFileSystem())
    return dest
