"""Stage ``eval_<split>``: the evaluator's report, chart and predictions, written into the store."""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

from sidrec.cluster import init_ray
from sidrec.config import SidrecConfig, to_dict
from sidrec.data import cold_start
from sidrec.eval.evaluator import baseline_names, evaluate
from sidrec.eval.report import chart_png, markdown
from sidrec.eval.report_store import report_inputs, write_html_report
from sidrec.stages.run import run_stage
from sidrec.store import ArtifactStore, StageRun, library_versions


def invocation(argv: list[str] | None = None) -> str:
    """The command line of this process, as a shell would take it back (the `sidrec` script by its name)."""
    argv = list(sys.argv if argv is None else argv)
    if argv and Path(argv[0]).name == "sidrec":
        argv[0] = "sidrec"
    return shlex.join(argv)


def build(store: ArtifactStore, cfg: SidrecConfig, force: bool = False) -> dict:
    """Rank ``eval.split`` with the SID-LLM (Ray Data actors) and the baselines; publish the report (JSON, Markdown,
    chart, the HTML run report) with the command and full config it ran under."""
    model, sids, dataset = store.require("model"), store.require("sids"), store.require("dataset")
    inputs = {"model": model["fingerprint"], "sids": sids["fingerprint"], "dataset": dataset["fingerprint"]}
    if "content" in baseline_names(cfg.eval):  # also what the cold items' SIDs are made from (eval.cold_start)
        inputs["embeddings"] = store.require("embeddings")["fingerprint"]
    config = {"eval": cold_start.eval_section(cfg.eval), "train_on_valid": cfg.train.train_on_valid}

    def body(run: StageRun) -> dict:
        init_ray(cfg.ray)
        report, predictions = evaluate(store, cfg)
        report |= {"command": invocation(), "config": to_dict(cfg)}
        store.write_json(f"{run.path}/report.json", report)
        store.write_bytes(f"{run.path}/report.md", markdown(report).encode())
        store.write_bytes(f"{run.path}/chart.png", chart_png(report))
        stage = {"stage": run.stage, "version": run.version, "config": config, "libraries": library_versions(),
                 "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        write_html_report(store, run.path, report_inputs(store, report, stage))
        store.write_table(f"{run.path}/predictions.parquet", predictions)
        return {name: {k: round(v, 4) for k, v in m.items()} for name, m in report["models"].items()}

    return run_stage(store, f"eval_{cfg.eval.split}", config, inputs, force, body)
