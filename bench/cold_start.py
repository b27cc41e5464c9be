"""The cold-start table of one dataset: warm / cold targets x SID-LLM / content / SASRec / most-popular, and
the SID-LLM of the same config trained *without* the hold-out, scored on the same warm examples.

It only collects: it reads the published ``eval_<split>`` reports and ``predictions.parquet`` of two stores
of the same config, one evaluated with ``eval.cold_start`` and one without (produce them first):

    sidrec eval --config amazon-industrial-cold                 # held-out run (store artifacts/amazon-industrial-cold)
    sidrec eval --config amazon-industrial-cold eval.cold_start=0 store.root=artifacts/amazon-industrial-nocold
    python bench/cold_start.py --cold artifacts/amazon-industrial-cold --full artifacts/amazon-industrial-nocold

The examples of the two runs are matched by (user_id, target); the warm examples are those the held-out
run marked ``cold_target = false``. The issue's targets, checked and printed: the held-out SID-LLM's HR@10
and NDCG@10 on cold targets >= the content baseline's, and on warm targets >= 95% of the run without
hold-out. Writes ``bench/results/cold_start-<config>.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from sidrec.eval.metrics import hr_ndcg, target_ranks
from sidrec.store import ArtifactStore

log = logging.getLogger("bench.cold_start")

REPO = Path(__file__).resolve().parents[1]
SID_LLM = "sid-llm"
COLD, WARM = "cold targets", "warm targets"
METRICS = ("hr@1", "hr@5", "ndcg@5", "hr@10", "ndcg@10")
ORDER = (SID_LLM, "content", "sasrec", "most-popular")
LABELS = {SID_LLM: "SID-LLM (held-out run)", "content": "content (MiniLM cosine)", "sasrec": "SASRec (ours)",
          "most-popular": "most-popular"}
REFERENCE = "sid-llm without hold-out"  # the --full run's row in the warm slice
WARM_SHARE = 0.95  # the "within 5% of the run without hold-out"


def stored_eval(root: str, split: str) -> tuple[dict[str, Any], Any]:
    """(report.json, predictions table) of the store's current ``eval_<split>`` stage."""
    store = ArtifactStore(root)
    path = store.current_path(f"eval_{split}")
    return store.read_json(f"{path}/report.json"), store.read_table(f"{path}/predictions.parquet")


def slice_metrics(table, model: str, rows: np.ndarray) -> dict[str, float]:
    recs = table.column(model).to_pylist()
    targets = table.column("target").to_pylist()
    return hr_ndcg(target_ranks([recs[i] for i in rows], [targets[i] for i in rows]))


def collect(cold_root: str, full_root: str | None, split: str = "test") -> dict[str, Any]:
    report, preds = stored_eval(cold_root, split)
    if "cold_start" not in report:
        raise SystemExit(f"--cold {cold_root}: its eval_{split} report has no cold_start section "
                         "(was it evaluated with eval.cold_start > 0?)")
    table: dict[str, Any] = {"config": report["name"], "split": split, "cold_store": cold_root,
                             "cold_command": report.get("command"), "training_data": report.get("training_data"),
                             "cold_items": report.get("cold_items"), "slices": {}}
    is_cold = np.asarray(preds.column("cold_target").to_pylist(), dtype=bool)
    models = [m for m in ORDER if m in preds.column_names]
    for name, rows in ((COLD, np.flatnonzero(is_cold)), (WARM, np.flatnonzero(~is_cold))):
        table["slices"][name] = {"examples": int(rows.size),
                                 **{m: slice_metrics(preds, m, rows) for m in models}}
    for m in ORDER:  # configured but not in the predictions (e.g. SASRec left out): say so, don't skip
        if m not in models and m in report["cold_start"].get(COLD, {}):
            for name in (COLD, WARM):
                table["slices"][name][m] = report["cold_start"][name][m]
    if full_root:
        full_report, full = stored_eval(full_root, split)
        if "cold_start" in full_report:
            raise SystemExit(f"--full {full_root}: this store was evaluated with the hold-out; pass the run without")
        pos = {(u, t): i for i, (u, t) in enumerate(zip(full.column("user_id").to_pylist(),
                                                        full.column("target").to_pylist(), strict=True))}
        keys = list(zip(preds.column("user_id").to_pylist(), preds.column("target").to_pylist(), strict=True))
        warm_keys = [keys[i] for i in np.flatnonzero(~is_cold)]
        missing = [k for k in warm_keys if k not in pos]
        if missing:
            raise SystemExit(f"--full {full_root}: {len(missing)} warm examples of the held-out run are not in its "
                             f"predictions (first: {missing[0]}); the two runs must share the dataset and split")
        rows = np.array([pos[k] for k in warm_keys], dtype=np.int64)
        table["full_store"], table["full_command"] = full_root, full_report.get("command")
        table["slices"][WARM][REFERENCE] = slice_metrics(full, SID_LLM, rows)
    table["checks"] = checks(table)
    return table


def checks(table: dict[str, Any]) -> dict[str, Any]:
    cold, warm = table["slices"][COLD], table["slices"][WARM]
    out: dict[str, Any] = {}
    if "content" in cold:
        for m in ("hr@10", "ndcg@10"):
            out[f"cold {m} sid-llm >= content"] = cold[SID_LLM][m] >= cold["content"][m]
    ref = warm.get(REFERENCE)
    if ref:
        for m in ("hr@10", "ndcg@10"):
            share = warm[SID_LLM][m] / ref[m] if ref[m] else float("nan")
            out[f"warm {m} held-out / without"] = round(share, 4)
            out[f"warm {m} >= {WARM_SHARE:.0%} of without"] = bool(share >= WARM_SHARE)
    return out


def markdown(table: dict[str, Any]) -> str:
    lines = [f"### {table['config']} ({table['split']}, {table['training_data']})", "",
             "| slice | model | " + " | ".join(m.upper() for m in METRICS) + " |",
             "|---|---|" + "---:|" * len(METRICS)]
    for name, sl in table["slices"].items():
        for model, vals in sl.items():
            if model == "examples":
                continue
            label = (f"SID-LLM without hold-out (same {sl['examples']} examples)" if model == REFERENCE
                     else LABELS.get(model, model))
            lines.append(f"| {name} ({sl['examples']}) | {label} | " + " | ".join(f"{vals[m]:.4f}" for m in METRICS) + " |")
    lines += ["", *(f"- {k}: {v}" for k, v in table["checks"].items())]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cold", required=True, help="store root of the run evaluated with eval.cold_start")
    ap.add_argument("--full", default=None, help="store root of the same config evaluated without the hold-out")
    ap.add_argument("--split", default="test")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/cold_start-<config>.json)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    table = collect(args.cold, args.full, args.split)
    log.info("%s", markdown(table))
    out = Path(args.out or REPO / "bench" / "results" / f"cold_start-{table['config']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(table, indent=2))
    log.info("wrote %s", out)


if __name__ == "__main__":
    main()
