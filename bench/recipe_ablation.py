"""Training-recipe ablation: each lever of the SID-LLM recipe on and off, same seed, same data, same step
budget, one store (dataset, embeddings, quantizer and SIDs are built once and shared by every variant).

Levers (see their help in sidrec.config):
- ``instructions.train_rows``: ``examples`` (one row per train example, overlapping windows) vs
  ``sequences`` (each user's train items cut into windows, each item a target once);
- ``train.loss_on``: ``response`` (the row's answer only) vs ``items`` (every history SID after the first too);
- ``train.sid_softmax``: history SID labels scored among their level's tokens (``level``) or the whole
  vocabulary (``full``);
- ``model.new_token_init``: ``mean`` vs ``titles`` (mostly matters for pretrained backbones);
- ``instructions.layout``: ``history_last`` (the answer is the history list's next line) vs ``question_last``;
- ``quantize.collab_weight``: SIDs from the item text only (0) or from text + collaborative vectors (0.5).

    python bench/recipe_ablation.py [--config quickstart] [--store /tmp/ablation] [--variants old,recipe ...]
        [section.option=value ...]   # applied to every variant

Prints a Markdown table (test HR/NDCG@1/5/10 of each variant, the baselines of the first) and writes
``bench/results/recipe_ablation.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench.recipe_ablation")

RECIPE = {"instructions.train_rows": "sequences", "train.loss_on": "items", "train.sid_softmax": "level",
          "model.new_token_init": "titles", "instructions.layout": "history_last", "quantize.collab_weight": 0.0}
VARIANTS = {  # name -> overrides on top of RECIPE (the shipped defaults)
    "recipe": {},
    "old (examples rows + response loss + mean init + question last)": {
        "instructions.train_rows": "examples", "train.loss_on": "response", "model.new_token_init": "mean",
        "instructions.layout": "question_last"},
    "full softmax": {"train.sid_softmax": "full"},
    "examples rows": {"instructions.train_rows": "examples"},
    "response loss": {"train.loss_on": "response"},
    "mean init": {"model.new_token_init": "mean"},
    "question_last layout": {"instructions.layout": "question_last"},
    "collaborative SIDs": {"quantize.collab_weight": 0.5},
}
METRICS = ("hr@1", "ndcg@1", "hr@5", "ndcg@5", "hr@10", "ndcg@10")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="quickstart")
    ap.add_argument("--store", default="/tmp/sidrec-ablation", help="artifact store shared by the variants")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {list(VARIANTS)}")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "recipe_ablation.json"))
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from sidrec import console
    from sidrec.config import load_config
    from sidrec.pipeline import eval_report, run

    console.setup(verbose=False)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    rows, baselines = [], None
    for i, name in enumerate(names):
        over = {**RECIPE, **VARIANTS[name]}
        extra = [] if i == 0 else ["eval.baselines=[]"]  # the baselines do not depend on the variant
        overrides = [f"store.root={args.store}", *[f"{k}={v}" for k, v in over.items()], *extra, *args.overrides]
        cfg = load_config(args.config, overrides)
        log.info("variant %s: %s", name, " ".join(overrides[1:]))
        t0 = time.perf_counter()
        manifests = run(cfg)
        report = eval_report(cfg)
        model = manifests["model"]["metrics"]
        rows.append({"variant": name, "overrides": over, "metrics": report["models"]["sid-llm"],
                     "train_rows": manifests["instructions"]["metrics"].get("train_rows"),
                     "val_loss": model.get("val_loss"), "tokens_per_s": model.get("tokens_per_s"),
                     "wall_s": round(time.perf_counter() - t0, 1)})
        if baselines is None:
            baselines = {k: v for k, v in report["models"].items() if k != "sid-llm"}
            meta = {k: report[k] for k in ("name", "split", "examples", "catalog_items", "training_data")}
    out = {"config": args.config, "overrides": args.overrides, "seed": {"train": cfg.train.seed, "eval": cfg.eval.seed},
           "eval": meta, "command": "python bench/recipe_ablation.py " + " ".join(sys.argv[1:]),
           "variants": rows, "baselines": baselines}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"{meta['name']} {meta['split']}: {meta['examples']} examples, full ranking over "
          f"{meta['catalog_items']} items, {meta['training_data']}, seed {out['seed']}")
    print("| variant | train rows | val loss | " + " | ".join(m.upper() for m in METRICS) + " |")
    print("|---|---:|---:|" + "---:|" * len(METRICS))
    for r in rows:
        vl = f"{r['val_loss']:.3f}" if r["val_loss"] is not None else "–"
        print(f"| {r['variant']} | {r['train_rows']} | {vl} | " + " | ".join(f"{r['metrics'][m]:.4f}" for m in METRICS)
              + " |")
    for name, m in (baselines or {}).items():
        print(f"| *{name}* | | | " + " | ".join(f"{m[k]:.4f}" for k in METRICS) + " |")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
