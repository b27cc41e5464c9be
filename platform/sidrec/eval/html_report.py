"""The run report: one self-contained HTML page per evaluation, written next to its ``report.json``.

It shows the metrics table (ours beside the published rows on the same test set), a chart of HR/NDCG@K, the
training loss and validation curves, SID code usage per level and the collision rate, the cold-start slice when
the report has one, the unconstrained-invalid rate, and the config and command the evaluation ran under.
``render_html`` is a pure function of the dicts read from the store (``ReportInputs``); ``report_inputs`` reads
them (``sidrec.eval.report_store`` finds and writes them for a published stage). Inline CSS and inline SVG only:
the page fetches nothing. Every string from the store goes through ``html.escape``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from html import escape
from typing import Any

import yaml

from sidrec.config import METRIC_KS
from sidrec.eval.svg import Series, bar_chart, downsample, line_chart
from sidrec.sids.tokens import LEVEL_PREFIXES

METRICS = tuple(f"{m}@{k}" for k in METRIC_KS for m in ("hr", "ndcg"))
NONE = "—"

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:980px;
color:#1d1d1f;padding:0 1rem}
h1{font-size:1.5rem;margin-bottom:.2rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6rem 0}th,td{padding:.25rem .6rem;border-bottom:1px solid #eee;
text-align:right}th:first-child,td:first-child{text-align:left}th{background:#f6f6f8}
tr.published td{color:#555}td.best{font-weight:700}.muted{color:#666}.note{color:#8a5a00}
pre{background:#f6f6f8;padding:.6rem;overflow-x:auto;font-size:12px}
svg{max-width:100%;height:auto;font-size:11px}svg .grid{stroke:#e6e6e6}svg .tick{fill:#555}
svg .chart-title{font-weight:600;fill:#1d1d1f}svg .legend{fill:#333}
"""


@dataclass
class ReportInputs:
    """What the page shows, as read from the store (see ``report_inputs``)."""

    report: dict  # the eval stage's report.json
    store_root: str
    eval_stage: dict = field(default_factory=dict)  # its manifest (stage, version, created, config, libraries)
    training: dict | None = None  # the evaluated model version's metrics.json: history (per epoch), log (per step)
    sids: dict | None = None  # the evaluated SID version's report.json: summary, code_usage, collisions
    stage_configs: dict[str, dict] = field(default_factory=dict)  # stage -> {version, config}: published stages
    published: dict | None = None  # sidrec.eval.published.PUBLISHED entry of the report's test set
    notes: list[str] = field(default_factory=list)  # what could not be read, what changed since


# ------------------------------------------------------------------------------------------ formatting
def fmt_metric(value: Any) -> str:
    return NONE if value is None else f"{value:.4f}"


def fmt_seconds(value: Any) -> str:
    return NONE if value is None else f"{value:.1f}"


def fmt_value(value: Any) -> str:
    if value is None:
        return NONE
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def as_yaml(data: Any) -> str:
    """YAML of JSON-able data (tuples as lists, anything else by str, as report.json stores it)."""
    return yaml.safe_dump(json.loads(json.dumps(data, default=str)), sort_keys=False)


def _cell(text: str, cls: str = "") -> str:
    return f'<td class="{cls}">{escape(text)}</td>' if cls else f"<td>{escape(text)}</td>"


def _table(head: Sequence[str], rows: Iterable[str]) -> str:
    return ("<table><thead><tr>" + "".join(f"<th>{escape(h)}</th>" for h in head) + "</tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>")


def _p(text: str, cls: str = "") -> str:
    return f'<p class="{cls}">{escape(text)}</p>' if cls else f"<p>{escape(text)}</p>"


# ------------------------------------------------------------------------------------------ sections
def _summary(inputs: ReportInputs) -> str:
    r, stage = inputs.report, inputs.eval_stage
    decode = r.get("decode") or {}
    took = (stage.get("metrics") or {}).get("seconds")
    lines = [
        f"{r.get('split')} split: {r.get('examples')} examples, full ranking over {r.get('catalog_items')} items; "
        f"trained on {r.get('training_data')}.",
        f"SID-LLM decoding: beam {decode.get('num_beams')}, {decode.get('scoring')} scores, "
        f"exclude_history={decode.get('exclude_history')}.",
        f"Store {inputs.store_root}; stage {stage.get('stage', NONE)} version {stage.get('version', NONE)}"
        f" ({stage.get('created', NONE)}{'' if took is None else f', {fmt_seconds(took)} s'}); "
        f"model {r.get('model_version')}; SIDs {r.get('sids_version')}.",
    ]
    return "".join(_p(line) for line in lines) + "".join(_p(n, "note") for n in inputs.notes)


def _best(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for m in METRICS:
        vals = [row[m] for row in rows if row.get(m) is not None]
        if vals:
            out[m] = max(vals)
    return out


def _metric_row(label: str, source: str, metrics: dict, best: dict, extra: str, cls: str = "") -> str:
    cells = [_cell(label), _cell(source)]
    for m in METRICS:
        v = metrics.get(m)
        cells.append(_cell(fmt_metric(v), "best" if v is not None and v == best.get(m) else ""))
    cells.append(_cell(extra))
    return f'<tr class="{cls}">' + "".join(cells) + "</tr>" if cls else "<tr>" + "".join(cells) + "</tr>"


def _metrics_section(r: dict, published: dict | None) -> str:
    models: dict[str, dict] = r.get("models") or {}
    pub_rows: dict[str, dict] = (published or {}).get("rows", {})
    best = _best([*models.values(), *pub_rows.values()])
    seconds = r.get("seconds") or {}
    rows = [_metric_row(name, "this run", m, best, fmt_seconds(seconds.get(name))) for name, m in models.items()]
    rows += [_metric_row(name, "published", m, best, NONE, "published") for name, m in pub_rows.items()]
    head = ["model", "source", *(m.upper() for m in METRICS), "eval s"]
    out = ["<h2>Next-item quality</h2>", _table(head, rows)]
    if published:
        out.append(_p(f"Published rows: {published.get('source')}; trained on {published.get('training_data')}. "
                      f"This run: {r.get('examples')} test examples, trained on {r.get('training_data')}. "
                      "A missing published number is shown as —.", "muted"))
    else:
        out.append(_p("No published results on this test set.", "muted"))
    out.append(_p("eval s: seconds spent ranking the split (a baseline's include its training).", "muted"))
    return "".join(out)


def _chart_section(r: dict) -> str:
    models: dict[str, dict] = r.get("models") or {}
    keys = [f"{m}@{k}" for m in ("hr", "ndcg") for k in METRIC_KS]
    series = {name: [m.get(k) for k in keys] for name, m in models.items()}
    return "<h2>HR / NDCG @ K</h2>" + bar_chart([k.upper() for k in keys], series,
                                                  f"{r.get('name')}: {r.get('split')}")


def _unconstrained_section(r: dict) -> str:
    share = r.get("unconstrained_invalid_share")
    if share is None:
        text = "Not measured for this run (eval.unconstrained_sample = 0)."
    else:
        text = (f"Unconstrained beam search (no trie), {r.get('unconstrained_examples')} examples: {share:.1%} of "
                "the top-10 outputs are not real items; the constrained decoder's are all real by construction.")
    return "<h2>Unconstrained decoding</h2>" + _p(text)


def _cold_start_section(r: dict) -> str:
    slices = r.get("cold_start")
    if not isinstance(slices, dict) or not slices:
        return ""
    out = ["<h2>Cold-start slice</h2>"]
    items = r.get("cold_items")
    if isinstance(items, dict):
        out.append(_p(f"{fmt_value(items.get('items'))} items held out of every training input "
                      f"({fmt_value(items.get('by'))}); their SIDs come from the stored encoder and quantizer as an "
                      f"admin add's do: {fmt_value(items.get('sids_exact'))} the quantizer's own codes, "
                      f"{fmt_value(items.get('sids_nearest_free'))} the nearest free ones. Most-popular and SASRec "
                      "never saw them and cannot rank them.", "muted"))
    for name, entry in slices.items():
        models = {k: v for k, v in entry.items() if isinstance(v, dict)}
        extras = ", ".join(f"{k}={fmt_value(v)}" for k, v in entry.items() if not isinstance(v, dict))
        out.append(f"<h3>{escape(str(name))}</h3>" + (_p(extras, "muted") if extras else ""))
        best = _best(list(models.values()))
        out.append(_table(["model", "source", *(m.upper() for m in METRICS), ""],
                          [_metric_row(model, "this run", m, best, "") for model, m in models.items()]))
    return "".join(out)


def _loss_series(training: dict) -> list[Series]:
    history: list[dict] = training.get("history") or []
    log_pts = [(e["step"], e["loss"]) for e in training.get("log") or [] if e.get("loss") is not None]
    series = [Series("train loss (logged steps)", downsample(log_pts))] if log_pts else []
    train = [(h["step"], h["train_loss"]) for h in history if h.get("train_loss") is not None]
    series.append(Series("train loss (epoch mean, at its end)", train, markers=True,
                         point_titles=[f"epoch {h['epoch']} step {h['step']}: train_loss {fmt_metric(h['train_loss'])}"
                                       for h in history if h.get("train_loss") is not None]))
    val, titles = [], []
    if training.get("val_loss_before") is not None:
        val.append((0, training["val_loss_before"]))
        titles.append(f"before training: val_loss {fmt_metric(training['val_loss_before'])}")
    for h in history:
        if h.get("val_loss") is not None:
            val.append((h["step"], h["val_loss"]))
            titles.append(f"epoch {h['epoch']} step {h['step']}: val_loss {fmt_metric(h['val_loss'])}")
    series.append(Series("validation loss", val, markers=True, point_titles=titles))
    return [s for s in series if s.points]


def _validation_series(history: list[dict]) -> list[Series]:
    out = []
    for m in METRICS:
        pts = [(h["epoch"], h[m]) for h in history if h.get(m) is not None]
        if pts:
            out.append(Series(f"validation {m.upper()}", pts, markers=True,
                              point_titles=[f"epoch {x}: {m} {fmt_metric(y)}" for x, y in pts]))
    return out


def _history_table(history: list[dict]) -> str:
    metric_cols = [m for m in METRICS if any(h.get(m) is not None for h in history)]
    cols = ["epoch", "step", "train_loss", "val_loss", *metric_cols, "tokens_per_s", "lr", "train_seconds"]
    rows = []
    for h in history:
        cells = []
        for c in cols:
            v = h.get(c)
            cells.append(_cell(fmt_metric(v) if c in ("train_loss", "val_loss", *METRICS) else fmt_value(v)))
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return _table(cols, rows)


def _training_section(training: dict | None) -> str:
    if training is None:
        return "<h2>Training</h2>" + _p("The evaluated model version's metrics.json is not in the store.", "note")
    history: list[dict] = training.get("history") or []
    out = ["<h2>Training</h2>"]
    if history:
        last = history[-1]
        out.append(_p(f"{len(history)} epochs, {last.get('step')} steps; best epoch {training.get('best_epoch')}; "
                      f"validation loss {fmt_metric(training.get('val_loss_before'))} before training, "
                      f"{fmt_metric(last.get('val_loss'))} after."))
    out.append(line_chart(_loss_series(training), "loss", "optimizer step"))
    val = _validation_series(history)
    if val:
        users = next((h.get("eval_users") for h in history if h.get("eval_users")), None)
        title = "validation ranking during training" + (f" ({users} users)" if users else "")
        out.append(line_chart(val, title, "epoch"))
    if history:
        out.append(_history_table(history))
    return "".join(out)


def _code_usage(sids: dict) -> list[dict]:
    """Per level: used, used_share, perplexity (from report.json's code_usage, else its summary)."""
    if sids.get("code_usage"):
        return sids["code_usage"]
    s = sids.get("summary") or {}
    k = s.get("codebook_size") or 0
    return [{"level": i, "used": used, "used_share": used / k if k else None,
             "perplexity": (s.get("perplexity") or [None] * len(s["codes_used"]))[i]}
            for i, used in enumerate(s.get("codes_used") or [])]


def _sids_section(sids: dict | None) -> str:
    if sids is None:
        return "<h2>Semantic IDs</h2>" + _p("The evaluated SID version's report is not in the store.", "note")
    s = sids.get("summary") or {}
    usage = _code_usage(sids)
    k = s.get("codebook_size")
    rows = ["<tr>" + _cell(LEVEL_PREFIXES[u["level"]]) + _cell(f"{u['used']} / {k}")
            + _cell(NONE if u.get("used_share") is None else f"{u['used_share']:.1%}")
            + _cell(fmt_value(u.get("perplexity"))) + "</tr>" for u in usage]
    before, after = s.get("collision_share_before"), s.get("collision_share_after")
    facts = [
        f"{s.get('items')} items, {s.get('method')}, {s.get('levels')} levels x {k} codes; reconstruction MSE "
        f"{fmt_value(s.get('reconstruction_mse'))}.",
        f"Collision rate (items sharing their code tuple with another item) before "
        f"{s.get('collision_policy')}: {NONE if before is None else f'{before:.2%}'} (largest group "
        f"{s.get('largest_group_before')}); after: {NONE if after is None else f'{after:.2%}'}, "
        f"{s.get('unique_sids_after')} distinct SIDs.",
    ]
    effective = [u["perplexity"] / k if k and u.get("perplexity") is not None else None for u in usage]
    chart = bar_chart([f"level {LEVEL_PREFIXES[u['level']]}" for u in usage],
                      {"codes used (share of codebook)": [u.get("used_share") for u in usage],
                       "perplexity / codebook size (evenness of use)": effective},
                      "code usage per level", percent=True, height=220)
    return ("<h2>Semantic IDs</h2>" + "".join(_p(f) for f in facts)
            + _table(["level", "codes used", "share of codebook", "perplexity"], rows) + chart)


def _provenance_section(inputs: ReportInputs) -> str:
    r, stage = inputs.report, inputs.eval_stage
    command = r.get("command")
    out = ["<h2>How this was produced</h2>", "<h3>Command</h3>"]
    if command:
        out.append(f"<pre><code>{escape(str(command))}</code></pre>")
    else:
        out.append(_p("Not recorded: this evaluation predates report.json's \"command\". The stage configs below "
                      "are what the published stages ran under.", "note"))
    out.append("<h3>Config</h3>")
    if r.get("config") is not None:
        out.append(_p("The full config of the run (a YAML config file: sidrec eval --config FILE).", "muted"))
        out.append(f"<pre>{escape(as_yaml(r['config']))}</pre>")
    else:
        configs = dict(inputs.stage_configs)
        configs[stage.get("stage", "eval")] = {"version": stage.get("version"), "config": stage.get("config")}
        out.append(f"<pre>{escape(as_yaml(configs))}</pre>")
    if stage.get("libraries"):
        out.append("<h3>Libraries</h3>" + _p(", ".join(f"{k} {v}" for k, v in stage["libraries"].items())))
    out.append(f"<details><summary>report.json</summary><pre>{escape(json.dumps(r, indent=2, default=str))}"
               "</pre></details>")
    return "".join(out)


def render_html(inputs: ReportInputs) -> str:
    """The whole page, one string (UTF-8 HTML, no external resources)."""
    r = inputs.report
    title = f"sidrec run report: {r.get('name')} ({r.get('split')})"
    body = [f"<h1>{escape(title)}</h1>", _summary(inputs), _metrics_section(r, inputs.published),
            _chart_section(r), _cold_start_section(r), _unconstrained_section(r),
            _training_section(inputs.training), _sids_section(inputs.sids), _provenance_section(inputs)]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{escape(title)}</title><style>{CSS}</style></head><body>\n" + "\n".join(body)
            + "\n</body></html>\n")
