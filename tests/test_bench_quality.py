"""bench/quality.py on a fake store written through the real ArtifactStore API: the tables and the JSON carry
the report's numbers, the recorded seconds / seeds / tokens/s, the overrides the stages ran under; a missing
store or config is a "not run" row with its command."""

import importlib.util
import json
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

from sidrec.config import load_config
from sidrec.store import ArtifactStore

BENCH = Path(__file__).resolve().parents[1] / "bench" / "quality.py"

REPORT_MODELS = {
    "sid-llm": {"hr@1": 0.0123, "ndcg@1": 0.0123, "hr@5": 0.0456, "ndcg@5": 0.0301, "hr@10": 0.0789, "ndcg@10": 0.0402},
    "most-popular": {"hr@1": 0.001, "ndcg@1": 0.001, "hr@5": 0.0052, "ndcg@5": 0.0031, "hr@10": 0.0099,
                     "ndcg@10": 0.0047},
    "sasrec": {"hr@1": 0.0211, "ndcg@1": 0.0211, "hr@5": 0.0612, "ndcg@5": 0.0418, "hr@10": 0.0934,
               "ndcg@10": 0.0521},
}


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("bench_quality", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def publish(store: ArtifactStore, stage: str, config: dict, metrics: dict, files: dict | None = None) -> dict:
    run = store.begin(stage)
    for name, obj in (files or {}).items():
        store.write_json(f"{run.path}/{name}", obj)
    return store.publish(run, fp=f"fp-{stage}", config=config, inputs={}, metrics=metrics)


def fake_store(root: Path, cfg) -> None:
    """base_model, model and eval_test stages as the real stages publish them (train.seed=3, max_examples=100)."""
    store = ArtifactStore(str(root))
    publish(store, "base_model", asdict(cfg.model), {"seconds": 1.0})
    train = asdict(cfg.train) | {"seed": 3}
    model = publish(store, "model", {"train": train}, {"seconds": 120.5, "tokens_per_s": 2345.6, "steps": 10})
    report = {"name": cfg.name, "split": "test", "examples": 100, "catalog_items": 1682,
              "training_data": "train only", "model_version": model["version"], "sids_version": "v-sids",
              "models": REPORT_MODELS, "seconds": {"sid-llm": 30.25, "most-popular": 0.5, "sasrec": 12.0}}
    eval_cfg = {"eval": asdict(cfg.eval) | {"max_examples": 100}, "train_on_valid": False}
    publish(store, "eval_test", eval_cfg, {"seconds": 45.0}, {"report.json": report})


def write_config(path: Path, name: str, root: Path) -> Path:
    path.write_text(yaml.safe_dump({"name": name, "store": {"root": str(root)}}))
    return path


def test_collects_report_and_marks_missing(quality, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    good = write_config(tmp_path / "qtest.yaml", "qtest", tmp_path / "store")
    fake_store(tmp_path / "store", load_config(str(good)))
    missing = write_config(tmp_path / "nostore.yaml", "nostore", tmp_path / "absent")
    out = tmp_path / "q.json"

    assert quality.main(["--configs", str(good), str(missing), "no-such-config", "--out", str(out),
                         "--workdir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    rows = result["datasets"]["ml-100k"]["rows"]  # the default data.format is movielens_100k
    ours = {r["model"]: r for r in rows if r["config"] == str(good)}
    assert set(ours) == set(REPORT_MODELS)
    for name, metrics in REPORT_MODELS.items():
        assert ours[name]["metrics"] == metrics and ours[name]["status"] == "ok"
        assert ours[name]["examples"] == 100 and ours[name]["catalog_items"] == 1682
        assert ours[name]["training_data"] == "train only"
        row_md = next(line for line in printed.splitlines()
                      if line.startswith(f"| {ours[name]['label']} | {good} |"))
        assert all(f"| {v:.4f} |" in row_md for v in metrics.values())

    llm = ours["sid-llm"]
    assert llm["wall_seconds"] == {"train": 120.5, "eval": 30.25, "total": 150.75}
    assert llm["tokens_per_s"] == 2345.6 and llm["seed"] == {"train.seed": 3, "eval.seed": 0}
    assert llm["label"] == "SID-LLM (tiny-qwen2, 4L d=256)"
    assert ours["sasrec"]["wall_seconds"] == {"train": None, "eval": 12.0, "total": 12.0}
    assert ours["sasrec"]["seed"] == {"eval.seed": 0, "eval.sasrec.seed": 0}
    assert llm["overrides"] == ["train.seed=3", "eval.max_examples=100"]
    assert llm["command"] == f"sidrec eval --config {good} train.seed=3 eval.max_examples=100"

    absent = [r for r in rows if r["config"] == str(missing)]
    assert [r["model"] for r in absent] == ["sid-llm", "sasrec", "most-popular"]
    assert all(r["status"] == "not run" and r["command"] == f"sidrec eval --config {missing}" for r in absent)
    assert not (tmp_path / "absent").exists()  # collecting never creates a store
    unknown = result["datasets"]["unknown"]["rows"]
    assert {r["status"] for r in unknown} == {"not run"} and "config file not found" in unknown[0]["reason"]
    assert "(not run)" in printed and f"`sidrec eval --config {missing}`" in printed


def test_published_rows_and_shipped_specs(quality):
    rows = quality.published_rows("amazon-industrial")
    mini = next(r for r in rows if r["model"].startswith("MiniOneRec"))
    assert mini["metrics"] == {"hr@5": 0.1321, "ndcg@5": 0.1084, "hr@10": 0.1586, "ndcg@10": 0.1167}
    assert {r["model"] for r in quality.published_rows("amazon14-beauty")} == {
        "TIGER", "LETTER-TIGER", "LC-Rec", "LETTER-LC-Rec"}
    assert quality.published_rows("ml-100k") == []
    assert [s.config for s in quality.select(None)] == ["ml-100k", "quickstart", "tiny-cpu", "smollm2-cpu",
                                                        "amazon14-beauty"]
