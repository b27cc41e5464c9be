"""Stage ``eval_<split>``: the evaluator's report, chart and predictions, written into the store."""

from __future__ import annotations

from dataclasses import asdict

from sidrec.cluster import init_ray
from sidrec.config import SidrecConfig
from sidrec.eval.evaluator import evaluate
from sidrec.eval.report import chart_png, markdown
from sidrec.stages.run import run_stage
from sidrec.store import ArtifactStore, StageRun


def build(store: ArtifactStore, cfg: SidrecConfig, force: bool = False) -> dict:
    """Rank ``eval.split`` with the SID-LLM (Ray Data actors) and the baselines; publish the report."""
    model, sids, dataset = store.require("model"), store.require("sids"), store.require("dataset")
    inputs = {"model": model["fingerprint"], "sids": sids["fingerprint"], "dataset": dataset["fingerprint"]}
    config = {"eval": asdict(cfg.eval), "train_on_valid": cfg.train.train_on_valid}

    def body(run: StageRun) -> dict:
        init_ray(cfg.ray)
        report, predictions = evaluate(store, cfg)
        store.write_json(f"{run.path}/report.json", report)
        store.write_bytes(f"{run.path}/report.md", markdown(report).encode())
        store.write_bytes(f"{run.path}/chart.png", chart_png(report))
        store.write_table(f"{run.path}/predictions.parquet", predictions)
        return {name: {k: round(v, 4) for k, v in m.items()} for name, m in report["models"].items()}

    return run_stage(store, f"eval_{cfg.eval.split}", config, inputs, force, body)
