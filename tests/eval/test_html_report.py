"""The HTML run report, rendered from a small store published through the real ArtifactStore API: the page
carries the report's numbers exactly as formatted, the published rows of the test set, the training curves, the
SID statistics, the command and a config that loads back; it escapes what it shows and fetches nothing;
``sidrec report`` rebuilds it from the store and fails clearly when there is no evaluation."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pyarrow as pa
import pytest

from sidrec.cli import main
from sidrec.config import load_config, to_dict
from sidrec.eval.html_report import render_html
from sidrec.eval.published import PUBLISHED
from sidrec.eval.report_store import (
    REPORT_HTML,
    NoEvaluationError,
    html_report_path,
    rebuild_html_report,
    report_inputs,
)
from sidrec.store import ArtifactStore

HOSTILE = '<img src=x onerror="alert(1)">&co'
MODELS = {
    "sid-llm": {"hr@1": 0.05123, "ndcg@1": 0.05123, "hr@5": 0.10302, "ndcg@5": 0.07783, "hr@10": 0.13766,
                "ndcg@10": 0.08903},
    "most-popular": {"hr@1": 0.015, "ndcg@1": 0.015, "hr@5": 0.05537, "ndcg@5": 0.03831, "hr@10": 0.06442,
                     "ndcg@10": 0.04111},
    HOSTILE: {"hr@1": 0.0111, "ndcg@1": 0.0111, "hr@5": 0.0222, "ndcg@5": 0.0166, "hr@10": 0.0333,
              "ndcg@10": 0.0199},
}
HISTORY = [
    {"epoch": 1, "step": 40, "train_loss": 4.65527, "val_loss": 2.99691, "hr@10": 0.075, "ndcg@10": 0.05023,
     "eval_users": 200, "tokens_per_s": 2394.07, "lr": 0.00094, "train_seconds": 33.6},
    {"epoch": 2, "step": 80, "train_loss": 3.52768, "val_loss": 2.38530, "hr@10": 0.09, "ndcg@10": 0.07176,
     "eval_users": 200, "tokens_per_s": 2001.65, "lr": 0.0, "train_seconds": 40.1},
]
LOG = [{"step": s, "epoch": s / 40, "loss": 8.0 - s / 20, "lr": 1e-3} for s in range(4, 81, 4)]
SID_REPORT = {
    "summary": {"items": 900, "method": "rqvae", "levels": 3, "codebook_size": 256, "collision_policy": "dedup",
                "reconstruction_mse": 0.00148, "codes_used": [250, 256, 199], "perplexity": [201.31, 220.75, 150.0],
                "collision_share_before": 0.07298, "collision_share_after": 0.0, "largest_group_before": 17,
                "unique_sids_after": 900},
    "code_usage": [{"level": 0, "used": 250, "used_share": 250 / 256, "perplexity": 201.31},
                   {"level": 1, "used": 256, "used_share": 1.0, "perplexity": 220.75},
                   {"level": 2, "used": 199, "used_share": 199 / 256, "perplexity": 150.0}],
}
COMMAND = "sidrec eval --config tiny-cpu 'eval.max_examples=100'"


class Tables(HTMLParser):
    """Every <table> of a page as rows of cell texts."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


class Tags(HTMLParser):
    """The element names and attribute names a page really has (text that looks like markup is not one)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()
        self.attrs: set[str] = set()

    def handle_starttag(self, tag: str, attrs) -> None:
        self.names.add(tag)
        self.attrs |= {name for name, _ in attrs}


def tables(page: str) -> list[list[list[str]]]:
    parser = Tables()
    parser.feed(page)
    return parser.tables


def publish(store: ArtifactStore, stage: str, config: dict, metrics: dict, files: dict | None = None) -> dict:
    run = store.begin(stage)
    for name, obj in (files or {}).items():
        store.write_json(f"{run.path}/{name}", obj)
    return store.publish(run, fp=f"fp-{stage}", config=config, inputs={}, metrics=metrics)


def fake_store(root: Path, data_format: str = "amazon_prepared", report_extra: dict | None = None) -> dict:
    """dataset, sids, model and eval_test stages as the real stages publish them; returns the report."""
    store = ArtifactStore(str(root))
    publish(store, "dataset", {"format": data_format, "path": "/data/x"}, {"items": 900})
    sids = publish(store, "sids", {"collision": "dedup"}, SID_REPORT["summary"], {"report.json": SID_REPORT})
    model = publish(store, "model", {"train": {"epochs": 2, "seed": 3}}, {"epochs": 2},
                    {"metrics.json": {"history": HISTORY, "log": LOG, "val_loss_before": 8.50249, "best_epoch": 2}})
    cfg = load_config("tiny-cpu", [f"store.root={root}", "eval.max_examples=100", f"data.format={data_format}"])
    report = {"name": "tiny-cpu", "split": "test", "examples": 100, "catalog_items": 900,
              "training_data": "train + valid", "model_version": model["version"], "sids_version": sids["version"],
              "decode": {"num_beams": 20, "scoring": "raw", "exclude_history": False}, "models": MODELS,
              "seconds": {"sid-llm": 23.96, "most-popular": 0.06, HOSTILE: 1.0},
              "unconstrained_invalid_share": 0.06, "unconstrained_examples": 50,
              "command": COMMAND, "config": to_dict(cfg)} | (report_extra or {})
    publish(store, "eval_test", {"eval": to_dict(cfg.eval), "train_on_valid": True}, {"seconds": 45.0},
            {"report.json": report})
    return report


def page(root: Path) -> str:
    return Path(rebuild_html_report(str(root), "test")).read_text()


@pytest.fixture
def store_root(tmp_path: Path) -> Path:
    root = tmp_path / "store"
    fake_store(root)
    return root


def test_metrics_table_rows_are_the_report_numbers_then_the_published_rows(store_root):
    rows = {row[0]: row for row in tables(page(store_root))[0]}
    for name, metrics in MODELS.items():
        seconds = {"sid-llm": "24.0", "most-popular": "0.1", HOSTILE: "1.0"}[name]
        assert rows[name] == [name, "this run", *(f"{metrics[m]:.4f}" for m in
                                                  ("hr@1", "ndcg@1", "hr@5", "ndcg@5", "hr@10", "ndcg@10")), seconds]
    for name, metrics in PUBLISHED["amazon-industrial"]["rows"].items():
        assert rows[name][:2] == [name, "published"]
        assert rows[name][6:8] == [f"{metrics['hr@10']:.4f}", f"{metrics['ndcg@10']:.4f}"]
        assert rows[name][2:4] == ["—", "—"]  # nothing published at K=1
    assert "0.1586" in rows["MiniOneRec (Qwen2.5-1.5B, SFT + RL)"]


@pytest.mark.parametrize("recorded", [{}, {"config": None}], ids=["run config", "dataset manifest"])
def test_no_published_rows_for_a_test_set_without_them(tmp_path, recorded):
    fake_store(tmp_path / "s", data_format="movielens_100k", report_extra=recorded)
    html = page(tmp_path / "s")
    assert "No published results on this test set." in html
    assert "published" not in {row[1] for row in tables(html)[0][1:]}


def test_chart_has_a_bar_per_model_and_metric(store_root):
    html = page(store_root)
    for name, metrics in MODELS.items():
        escaped = name.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
        assert f"<title>{escaped} HR@10: {metrics['hr@10']:.4f}</title>" in html
        assert f"<title>{escaped} NDCG@5: {metrics['ndcg@5']:.4f}</title>" in html


def test_training_curves_carry_every_epoch_and_logged_step(store_root):
    html = page(store_root)
    for h in HISTORY:
        assert f"epoch {h['epoch']} step {h['step']}: val_loss {h['val_loss']:.4f}" in html
        assert f"epoch {h['epoch']} step {h['step']}: train_loss {h['train_loss']:.4f}" in html
        assert f"epoch {h['epoch']}: ndcg@10 {h['ndcg@10']:.4f}" in html
    assert "before training: val_loss 8.5025" in html
    polylines = re.findall(r'<polyline points="([^"]+)"', html)
    assert len(LOG) in [len(p.split()) for p in polylines]  # the per-step loss, every logged step
    history = next(t for t in tables(html) if t[0][:4] == ["epoch", "step", "train_loss", "val_loss"])
    assert history[1][:4] == ["1", "40", "4.6553", "2.9969"]
    assert history[2][:4] == ["2", "80", "3.5277", "2.3853"]


def test_sid_code_usage_per_level_and_collision_rate(store_root):
    html = page(store_root)
    usage = next(t for t in tables(html) if t[0][0] == "level")
    assert usage[1:] == [["a", "250 / 256", "97.7%", "201.3"], ["b", "256 / 256", "100.0%", "220.8"],
                         ["c", "199 / 256", "77.7%", "150"]]
    assert "before dedup: 7.30% (largest group 17); after: 0.00%, 900 distinct SIDs" in html


def test_unconstrained_rate_and_command_and_a_config_that_loads_back(store_root, tmp_path):
    html = page(store_root)
    assert "50 examples: 6.0% of the top-10 outputs are not real items" in html
    assert "<pre><code>sidrec eval --config tiny-cpu &#x27;eval.max_examples=100&#x27;</code></pre>" in html
    config_text = re.search(r'sidrec eval --config FILE\).</p><pre>(.*?)</pre>', html, re.S).group(1)
    import html as html_lib

    (tmp_path / "run.yaml").write_text(html_lib.unescape(config_text))
    again = load_config(str(tmp_path / "run.yaml"))
    assert to_dict(again) == to_dict(load_config("tiny-cpu", [f"store.root={store_root}", "eval.max_examples=100"]))


def test_hostile_names_are_escaped_and_nothing_is_fetched(store_root):
    html = page(store_root)
    assert HOSTILE not in html and "<img" not in html and "onerror=\"" not in html
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;&amp;co" in html
    tags = Tags()
    tags.feed(html)
    assert not {"script", "link", "img", "iframe", "object", "embed", "image", "use"} & tags.names
    assert not {"src", "href", "xlink:href", "onerror", "onload"} & tags.attrs
    assert set(re.findall(r"https?://[^\"' )]+", html)) == {"http://www.w3.org/2000/svg"}  # the SVG namespace only


def test_cold_start_slice_only_when_the_report_has_one(tmp_path, store_root):
    assert "Cold-start" not in page(store_root)
    cold = {"items unseen in training": {"examples": 12, "sid-llm": {"hr@10": 0.0833, "ndcg@10": 0.0417},
                                         "sasrec": {"hr@10": 0.0, "ndcg@10": 0.0}}}
    fake_store(tmp_path / "cold", report_extra={"cold_start": cold})
    html = page(tmp_path / "cold")
    assert "Cold-start slice" in html and "items unseen in training" in html and "examples=12" in html
    cold_table = tables(html)[1]  # the first table after the metrics table
    assert [r[0] for r in cold_table[1:]] == ["sid-llm", "sasrec"]
    assert cold_table[1][6:8] == ["0.0833", "0.0417"]
    assert cold_table[2][6:8] == ["0.0000", "0.0000"]


def test_an_older_evaluation_shows_its_own_versions_and_what_changed(tmp_path):
    root = tmp_path / "old"
    report = fake_store(root, report_extra={"command": None, "config": None})
    store = ArtifactStore(str(root))
    publish(store, "model", {"train": {"epochs": 9}}, {}, {"metrics.json": {"history": [], "log": []}})
    html = page(root)
    assert "Not recorded: this evaluation predates" in html
    assert "The model stage was rebuilt after this evaluation" in html and report["model_version"] in html
    assert "epoch 2 step 80: val_loss 2.3853" in html  # the evaluated version's curves, not the new one's
    assert "eval_test:" in html and "collision: dedup" in html  # the stage configs as provenance


def test_the_eval_stage_writes_report_html_with_command_and_config(tmp_path, monkeypatch):
    import sidrec.stages.eval as eval_stage

    root = tmp_path / "run"
    fake_store(root)
    cfg = load_config("tiny-cpu", [f"store.root={root}"])
    report = {k: v for k, v in ArtifactStore(str(root)).read_json(
        f"{ArtifactStore(str(root)).current_path('eval_test')}/report.json").items() if k not in ("command", "config")}
    monkeypatch.setattr(eval_stage, "init_ray", lambda _cfg: None)
    monkeypatch.setattr(eval_stage, "evaluate", lambda _store, _cfg: (dict(report), pa.table({"user_id": ["u"]})))
    monkeypatch.setattr(eval_stage.sys, "argv", ["/venv/bin/sidrec", "eval", "--config", "tiny-cpu", "a=b c"])
    manifest = eval_stage.build(ArtifactStore(str(root)), cfg, force=True)
    assert REPORT_HTML in manifest["files"]
    folder = f"{ArtifactStore(str(root)).stage_dir('eval_test')}/{manifest['version']}"
    stored = ArtifactStore(str(root)).read_json(f"{folder}/report.json")
    assert stored["command"] == "sidrec eval --config tiny-cpu 'a=b c'"
    assert stored["config"] == json.loads(json.dumps(to_dict(cfg)))  # tuples stored as lists
    html = Path(f"{folder}/{REPORT_HTML}").read_text()
    assert "sidrec eval --config tiny-cpu &#x27;a=b c&#x27;" in html and manifest["version"] in html
    assert html_report_path(str(root), "test") == f"{folder}/{REPORT_HTML}"


def test_cli_report_rebuilds_from_the_store_and_prints_the_path(store_root, capsys):
    folder = ArtifactStore(str(store_root)).current_path("eval_test")
    assert not Path(f"{folder}/{REPORT_HTML}").exists()
    assert main(["report", "--config", "tiny-cpu", f"store.root={store_root}"]) == 0
    assert capsys.readouterr().out.strip() == f"{folder}/{REPORT_HTML}"
    store = ArtifactStore(str(store_root))
    m = store.require("eval_test")
    expected = render_html(report_inputs(store, store.read_json(f"{folder}/report.json"), m))
    assert Path(f"{folder}/{REPORT_HTML}").read_text() == expected


def test_cli_report_without_an_evaluation_fails_naming_the_problem(tmp_path, capsys):
    root = tmp_path / "half"
    publish(ArtifactStore(str(root)), "dataset", {"format": "amazon_prepared"}, {})
    assert main(["report", "--config", "tiny-cpu", f"store.root={root}"]) == 2
    err = capsys.readouterr().err
    assert "no evaluation of the 'test' split" in err and "eval_test" in err and "built: dataset" in err
    assert main(["report", "--config", "tiny-cpu", f"store.root={root}", "--split", "valid"]) == 2
    assert "'valid' split" in capsys.readouterr().err
    missing = tmp_path / "never-built"
    assert main(["report", "--config", "tiny-cpu", f"store.root={missing}"]) == 2
    assert "no artifact store at" in capsys.readouterr().err
    assert not missing.exists()  # reporting does not create a store
    with pytest.raises(NoEvaluationError):
        rebuild_html_report(str(root), "test")


def test_cli_eval_output_links_the_run_report(store_root, monkeypatch, capsys):
    """`sidrec eval` on an up-to-date store (nothing reruns) prints the table, then the report's path; an
    evaluation made before report.html existed gets its page rendered on the way."""
    import sidrec.pipeline

    monkeypatch.setattr(sidrec.pipeline, "run", lambda cfg, **kw: {})
    assert main(["eval", "--config", "tiny-cpu", f"store.root={store_root}"]) == 0
    out = capsys.readouterr().out.splitlines()
    path = f"{ArtifactStore(str(store_root)).current_path('eval_test')}/{REPORT_HTML}"
    assert out[-1] == f"run report: {path}"
    assert any(line.startswith("| sid-llm | 0.0512 |") for line in out)
    assert "sid-llm" in Path(path).read_text()
