"""Training throughput of the SID-LLM on Ray Train, side by side in one run:
1 vs 2 workers (one CPU / thread each), DDP vs DeepSpeed ZeRO-2, same data, model and step budget.

    python bench/train_throughput.py [--config tiny-cpu] [--steps 40] [--out bench/results]

Uses its own artifact store (bench/results/store by default); the first run builds the SIDs there.
Each run is the real `model` stage (forced), so tokens/s includes data loading, the optimizer and
gradient all-reduce, and excludes validation (eval_users=0, a small validation set).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny-cpu")
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    ap.add_argument("--store", default=str(REPO / "bench" / "results" / "store"))
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = ap.parse_args()

    import ray

    from sidrec.config import load_config
    from sidrec.pipeline import run
    from sidrec.stages import model
    from sidrec.store import ArtifactStore

    data = REPO.parent / "shared" / "data" / "amazon18-industrial"
    base = [f"store.root={args.store}", f"data.path={data}", "train.eval_users=0", "train.max_val_rows=64",
            "train.epochs=1", f"train.max_steps={args.steps}", "train.cpus_per_worker=1.0", "train.log_every=1000"]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    runs = [("ddp", 1), ("ddp", 2), ("deepspeed", 1), ("deepspeed", 2)]
    results = []
    try:
        cfg = load_config(args.config, base)
        run(cfg, until="base_model")
        store = ArtifactStore(cfg.store.root)
        for strategy, workers in runs:
            cfg = load_config(args.config, [*base, f"train.strategy={strategy}", f"train.num_workers={workers}",
                                            "train.deepspeed_config=ds_zero2.json"])
            m = model.build(store, cfg, force=True)["metrics"]
            results.append({"strategy": strategy if strategy == "ddp" else "deepspeed-zero2", "workers": workers,
                            "steps": m["steps"], "tokens_per_s": m["tokens_per_s"],
                            "fit_seconds": m["fit_seconds"]})
    finally:
        ray.shutdown()

    by = {(r["strategy"], r["workers"]): r["tokens_per_s"] for r in results}
    print(f"\nTraining throughput, {args.config}, {args.steps} steps per run, 1 CPU per worker")
    print(f"  {'strategy':<16} {'workers':>7} {'tokens/s':>10} {'vs 1 worker':>12}")
    for r in results:
        ratio = r["tokens_per_s"] / by[(r["strategy"], 1)]
        r["vs_one_worker"] = ratio
        print(f"  {r['strategy']:<16} {r['workers']:>7} {r['tokens_per_s']:>10.0f} {ratio:>11.2f}x")
    zero_vs_ddp = by[("deepspeed-zero2", 2)] / by[("ddp", 2)]
    print(f"  ZeRO-2 / DDP at 2 workers: {zero_vs_ddp:.2f}x")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    out = Path(args.out) / "train_throughput.json"
    out.write_text(json.dumps({"config": args.config, "steps": args.steps, "runs": results,
                               "zero2_vs_ddp_2_workers": zero_vs_ddp}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
