"""Next-item quality of every dataset x model, beside the published numbers: one Markdown table per dataset.

By default it only collects: it reads the published ``eval_<split>`` stage (``report.json``) of each config's
artifact store, and the ``model`` / ``base_model`` manifests beside it; nothing is trained. ``--run`` first
produces the missing ones, one after another (``sidrec.pipeline.run(cfg, until="eval")``, what
``sidrec eval --config NAME`` runs). A config or a store that does not exist yet is a "not run" row with the
command that would produce it.

    python bench/quality.py                                  # collect every config below
    python bench/quality.py --configs tiny-cpu smollm2-cpu   # some of them (shipped names or YAML paths)
    python bench/quality.py --run --configs quickstart       # produce the missing ones first (trains!)
    python bench/quality.py --out /tmp/quality.json          # JSON elsewhere (default bench/quality-results.json)

The shipped configs' relative paths (store roots, ../shared/data) are relative to the repo root, so the
script resolves configs from there (``--workdir``). Per row of ours: the command that reproduces it (the
shipped config plus the overrides under which the stored stages ran, recovered from their manifests), the
seeds, the training data, test examples and catalog items, wall time (the ``model`` stage's seconds + the
model's ranking seconds in the report; the baselines train inside the eval stage, so theirs is one number)
and the training tokens/s (last epoch) the ``model`` manifest records.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import yaml

from sidrec.config import CONFIG_DIR, METRIC_KS, ConfigError, SidrecConfig, load_config, to_dict
from sidrec.eval.published import FORMAT_DATASET, PUBLISHED, PUBLISHED_SOURCE
from sidrec.store import ArtifactStore, resolve_fs

log = logging.getLogger("bench.quality")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "quality-results.json"
METRICS = tuple(f"{m}@{k}" for k in METRIC_KS for m in ("hr", "ndcg"))
SID_LLM = "sid-llm"
EXPECTED_MODELS = (SID_LLM, "sasrec", "most-popular")  # the rows of a config that has not run
LABELS = {SID_LLM: "SID-LLM", "sasrec": "SASRec (ours)", "most-popular": "most-popular"}


@dataclass(frozen=True)
class Spec:
    """One config to collect: its dataset table, and which of its report's models to show (None = all)."""

    config: str
    dataset: str | None = None
    models: tuple[str, ...] | None = None


SPECS = (
    Spec("ml-100k", "ml-100k"),
    Spec("quickstart", "ml-100k"),
    Spec("tiny-cpu", "amazon-industrial"),
    # same data and training split as tiny-cpu: its baselines would repeat tiny-cpu's rows
    Spec("smollm2-cpu", "amazon-industrial", (SID_LLM,)),
    Spec("amazon14-beauty", "amazon14-beauty"),
)
DATASETS = {
    "ml-100k": ("MovieLens-100K", "leave-one-out (last item = test), full ranking; no published rows"),
    "amazon-industrial": ("Amazon 2018 Industrial_and_Scientific (MiniOneRec preparation)",
                          "the published test.jsonl (4,533 examples, global 80/10/10 time split), full ranking"),
    "amazon14-beauty": ("Amazon 2014 Beauty (the TIGER / P5 sequences)",
                        "leave-one-out, history <= 20, full ranking; the papers' Recall@K is HR@K"),
}

# stage -> config section it publishes as its manifest's "config" (model and eval_* nest theirs one deeper)
STAGE_SECTIONS = {"dataset": "data", "embeddings": "embed", "quantizer": "quantize", "sids": "sids",
                  "instructions": "instructions", "base_model": "model"}
BUILT_STAGES = (*STAGE_SECTIONS, "model")


# ------------------------------------------------------------------------------------------ commands
def _yaml_value(value: Any) -> str:
    """A value as a ``section.option=value`` override spells it (parsed back by YAML)."""
    if isinstance(value, str) and value.strip() and yaml.safe_load(value) == value:
        return value
    return json.dumps(value)  # JSON is YAML: true, null, 3, "0.10", [a, b]


def _flatten(data: dict, prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out |= _flatten(value, f"{prefix}.{key}")
        else:
            out[f"{prefix}.{key}"] = value
    return out


def _stored_sections(store: ArtifactStore, eval_stage: str) -> dict[str, dict]:
    """The config sections the store's published stages ran under, by section name."""
    out: dict[str, dict] = {}
    for stage, section in STAGE_SECTIONS.items():
        m = store.manifest(stage)
        if m is not None and isinstance(m.get("config"), dict):
            out[section] = m["config"]
    for stage, key in (("model", "train"), (eval_stage, "eval")):
        m = store.manifest(stage)
        if m is not None and isinstance((m.get("config") or {}).get(key), dict):
            out[key] = m["config"][key]
    return out


def _plain(value: object) -> object:
    return list(value) if isinstance(value, tuple) else value


def reconstruct_overrides(store: ArtifactStore, shipped: SidrecConfig, eval_stage: str) -> tuple[list[str], list[str]]:
    """(overrides that turn the shipped config into the one the stored stages ran under, notes)."""
    current = to_dict(shipped)
    stored = _stored_sections(store, eval_stage)
    overrides, notes = [], []
    for section in (*STAGE_SECTIONS.values(), "train", "eval"):
        if section not in stored:
            notes.append(f"{section}: no stored config (stage not built)")
            continue
        was, now = _flatten(stored[section], section), _flatten(current[section], section)
        for key in sorted(was.keys() | now.keys()):
            if key not in now:
                notes.append(f"{key}={_yaml_value(was[key])}: not an option any more")
            elif key not in was:
                notes.append(f"{key}: not recorded (option newer than the run)")
            elif _plain(was[key]) != _plain(now[key]):  # JSON stores tuples as lists
                overrides.append(f"{key}={_yaml_value(was[key])}")
    return overrides, notes


def eval_command(config: str, overrides: Sequence[str] = ()) -> str:
    return " ".join(["sidrec", "eval", "--config", shlex.quote(config), *(shlex.quote(o) for o in overrides)])


# ------------------------------------------------------------------------------------------ collecting
def store_exists(root: str) -> bool:
    """Whether an artifact store folder exists (without creating it, as ArtifactStore would)."""
    fs, path = resolve_fs(root)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def not_run(spec: Spec, dataset: str, reason: str, command: str) -> list[dict]:
    return [{"dataset": dataset, "config": spec.config, "model": name, "label": LABELS.get(name, name),
             "source": "ours", "status": "not run", "reason": reason, "command": command, "metrics": {}}
            for name in (spec.models or EXPECTED_MODELS)]


def _sid_llm_label(store: ArtifactStore, cfg: SidrecConfig) -> str:
    model = dict(to_dict(cfg.model))
    base_model = store.manifest("base_model")
    if base_model is not None and isinstance(base_model.get("config"), dict):
        model |= base_model["config"]
    if model["base"] == "tiny-qwen2":
        return f"SID-LLM (tiny-qwen2, {model['num_layers']}L d={model['hidden_size']})"
    return f"SID-LLM ({Path(str(model['base']).rstrip('/')).name})"


def _seconds(manifest: dict | None) -> float | None:
    return None if manifest is None else (manifest.get("metrics") or {}).get("seconds")


def _model_row(name: str, report: dict, ctx: dict) -> dict:
    """One model of a report as a row (``ctx``: what the config's rows share)."""
    row = {**ctx["common"], "model": name, "metrics": dict(report["models"][name])}
    eval_s = (report.get("seconds") or {}).get(name)
    eval_cfg, train_cfg = ctx["eval_cfg"], ctx["train_cfg"]
    if name == SID_LLM:
        train_s = ctx["train_s"]
        row |= {"label": ctx["sid_label"], "tokens_per_s": ctx["tokens_per_s"],
                "seed": {"train.seed": train_cfg.get("seed"), "eval.seed": eval_cfg.get("seed")}}
    else:
        train_s = None  # the baselines train inside the eval stage: their report seconds include it
        row |= {"label": LABELS.get(name, name), "tokens_per_s": None,
                "seed": {"eval.seed": eval_cfg.get("seed")}}
        if name == "sasrec":
            row["seed"]["eval.sasrec.seed"] = (eval_cfg.get("sasrec") or {}).get("seed")
    total = None if eval_s is None or (name == SID_LLM and train_s is None) else round((train_s or 0) + eval_s, 2)
    row["wall_seconds"] = {"train": train_s, "eval": eval_s, "total": total}
    return row


def _context(spec: Spec, dataset: str, cfg: SidrecConfig, store: ArtifactStore, stage: str) -> tuple[dict, dict]:
    """(the report, what every row of this config shares)."""
    em = store.require(stage)
    report = store.read_json(f"{store.stage_dir(stage)}/{em['version']}/report.json")
    mm = store.manifest("model")
    stale = mm is None or mm.get("version") != report.get("model_version")
    # the report names the config it ran under; a store shared by two shipped configs tells them apart
    name = report.get("name")
    command_config = name if name and (CONFIG_DIR / f"{name}.yaml").is_file() else spec.config
    overrides, notes = reconstruct_overrides(store, load_config(command_config), stage)
    if stale:
        notes.append("the model stage was rebuilt after this evaluation: training time and seed not known")
    common = {
        "dataset": dataset, "config": spec.config, "source": "ours", "status": "ok", "split": report.get("split"),
        "examples": report.get("examples"), "catalog_items": report.get("catalog_items"),
        "training_data": report.get("training_data"), "command": eval_command(command_config, overrides),
        "overrides": overrides, "config_notes": notes, "store": cfg.store.root, "evaluated": em.get("created"),
        "versions": {"eval": em.get("version"), "model": report.get("model_version"),
                     "sids": report.get("sids_version")},
        "eval_stage_seconds": _seconds(em),
    }
    train_cfg = {} if stale else (mm.get("config") or {}).get("train") or {}
    ctx = {"common": common, "eval_cfg": (em.get("config") or {}).get("eval") or {}, "train_cfg": train_cfg,
           "train_s": None if stale else _seconds(mm), "sid_label": _sid_llm_label(store, cfg),
           "tokens_per_s": None if stale else (mm.get("metrics") or {}).get("tokens_per_s")}
    return report, ctx


def collect_config(spec: Spec) -> list[dict]:
    """The rows of one config: from its store's eval report, or "not run" rows."""
    try:
        cfg = load_config(spec.config)
    except ConfigError as e:
        return not_run(spec, spec.dataset or "unknown", f"config: {e}", eval_command(spec.config))
    dataset = spec.dataset or FORMAT_DATASET.get(cfg.data.format, cfg.data.format)
    stage, root = f"eval_{cfg.eval.split}", cfg.store.root
    if not store_exists(root):
        return not_run(spec, dataset, f"no artifact store at {root}", eval_command(spec.config))
    store = ArtifactStore(root)
    if store.manifest(stage) is None:
        built = [s for s in BUILT_STAGES if store.manifest(s) is not None]
        return not_run(spec, dataset, f"store {root} has no {stage} stage (built: {', '.join(built) or 'none'})",
                       eval_command(spec.config))
    report, ctx = _context(spec, dataset, cfg, store, stage)
    rows = []
    for name in spec.models or tuple(report["models"]):
        if name in report["models"]:
            rows.append(_model_row(name, report, ctx))
        else:
            rows.append({**ctx["common"], "model": name, "label": name, "status": "not in report",
                         "reason": f"{name} is not among the report's models {sorted(report['models'])}",
                         "metrics": {}})
    return rows


def published_rows(dataset: str) -> list[dict]:
    pub = PUBLISHED.get(dataset)
    if pub is None:
        return []
    return [{"dataset": dataset, "model": name, "label": name, "source": "published", "status": "published",
             "citation": pub["source"], "training_data": pub["training_data"], "metrics": dict(metrics)}
            for name, metrics in pub["rows"].items()]


def collect(specs: Sequence[Spec]) -> dict:
    """Every config's rows, grouped by dataset, the published rows after ours."""
    datasets: dict[str, dict] = {}
    for spec in specs:
        log.info("collecting %s", spec.config)
        for row in collect_config(spec):
            title, protocol = DATASETS.get(row["dataset"], (row["dataset"], ""))
            entry = datasets.setdefault(row["dataset"], {"title": title, "protocol": protocol, "rows": []})
            entry["rows"].append(row)
    for name, entry in datasets.items():
        entry["rows"].extend(published_rows(name))
    return {"generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "metrics": list(METRICS),
            "published_source": PUBLISHED_SOURCE, "datasets": datasets}


def run_missing(specs: Sequence[Spec]) -> None:
    """Run the pipeline through eval for each config whose eval stage is not published, one after another."""
    for spec in specs:
        try:
            cfg = load_config(spec.config)
        except ConfigError as e:
            log.warning("%s: cannot run: %s", spec.config, e)
            continue
        stage = f"eval_{cfg.eval.split}"
        if store_exists(cfg.store.root) and ArtifactStore(cfg.store.root).manifest(stage) is not None:
            log.info("%s: %s already published, not re-run", spec.config, stage)
            continue
        from sidrec.pipeline import run

        log.info("%s: running the pipeline through eval (%s)", spec.config, eval_command(spec.config))
        t0 = time.perf_counter()
        try:
            run(cfg, until="eval")
        except Exception:
            log.exception("%s: the run failed; its rows stay 'not run'", spec.config)
            continue
        log.info("%s: done in %.0f s", spec.config, time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------ output
def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _cells(row: dict) -> list[str]:
    if row["status"] not in ("ok", "published"):
        return [row["label"], f"{row.get('config', '')} ({row['status']})", *(["—"] * len(METRICS)),
                "—", "—", "—", "—", "—", "—", f"`{row['command']}`"]
    metrics = [_fmt(row["metrics"].get(m)) for m in METRICS]
    if row["status"] == "published":
        return [row["label"], "published", *metrics, "—", "—", row["training_data"], "—", "—", "—",
                row["citation"]]
    seed = ", ".join(f"{k}={v}" for k, v in row["seed"].items())
    tps = row.get("tokens_per_s")
    return [row["label"], row["config"], *metrics, _fmt(row["examples"]), _fmt(row["catalog_items"]),
            _fmt(row["training_data"]), seed, _fmt(row["wall_seconds"]["total"], 1),
            _fmt(None if tps is None else float(tps), 0), f"`{row['command']}`"]


def render(result: dict) -> str:
    """One Markdown table per dataset, ours first, then the published rows."""
    head = ["model", "config", *(m.upper() for m in METRICS), "test examples", "items", "training data",
            "seed", "wall s", "train tokens/s", "command / source"]
    out = []
    for entry in result["datasets"].values():
        out += [f"### {entry['title']}", "", f"Protocol: {entry['protocol']}.", "",
                "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(c.replace("|", "\\|") for c in _cells(row)) + " |" for row in entry["rows"]]
        reasons = list(dict.fromkeys(f"- {r['config']}: {r['reason']}" for r in entry["rows"] if r.get("reason")))
        out += ["", *reasons, ""] if reasons else [""]
    return "\n".join(out)


def select(names: Sequence[str] | None) -> list[Spec]:
    if not names:
        return list(SPECS)
    known = {s.config: s for s in SPECS}
    return [known.get(n, Spec(n)) for n in names]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", metavar="CONFIG",
                    help=f"shipped config names or YAML paths (default: {' '.join(s.config for s in SPECS)})")
    ap.add_argument("--run", action="store_true", help="first run the pipeline for configs with no eval report")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="JSON results (default: %(default)s)")
    ap.add_argument("--workdir", default=str(REPO), help="directory the configs' relative paths are resolved "
                    "from (default: the repo root)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    out = Path(args.out).resolve()
    specs = [Spec(str(Path(s.config).resolve()), s.dataset, s.models) if s.config.endswith((".yaml", ".yml"))
             else s for s in select(args.configs)]
    os.chdir(args.workdir)
    if args.run:
        run_missing(specs)
    result = collect(specs)
    print(render(result))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
