"""Training speed with packed micro-batches (`train.pack_rows`) against one example per row, side by side.

Each run is the real `model` stage on Ray Train (2 DDP workers, 1 CPU each, forced, the same seed, rows and
step budget), packed and plain interleaved over ``--rounds``; tokens/s counts real (unpadded) tokens, so
the speed-up is what packing buys in wall time for the same examples. The loss itself is unchanged
(`tests/llm/test_loss.py` checks every label's loss packed against unpacked); the final train loss of both
runs is printed as a cross-check.

    python bench/pack_rows.py [--configs quickstart tiny-cpu] [--steps 60] [--rounds 2]

Uses its own stores (bench/results/store-<config>; the first run builds the SIDs there). Prints a table and
writes bench/results/pack_rows.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = {"quickstart": "ml-100k", "ml-100k": "ml-100k", "tiny-cpu": "amazon18-industrial",
        "amazon14-beauty": "amazon14-beauty"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["quickstart", "tiny-cpu"], choices=sorted(DATA))
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    ap.add_argument("--rounds", type=int, default=2, help="packed / plain pairs per config")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "pack_rows.json"))
    args = ap.parse_args()

    import ray

    from sidrec.config import load_config
    from sidrec.pipeline import run
    from sidrec.stages import model
    from sidrec.store import ArtifactStore

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        for name in args.configs:
            base = [f"store.root={REPO / 'bench' / 'results' / f'store-{name}'}",
                    f"data.path={REPO.parent / 'shared' / 'data' / DATA[name]}", "train.eval_users=0",
                    "train.max_val_rows=64", "train.epochs=1", f"train.max_steps={args.steps}",
                    "train.num_workers=2", "train.cpus_per_worker=1.0", "train.log_every=1000"]
            cfg = load_config(name, base)
            run(cfg, until="base_model")
            store = ArtifactStore(cfg.store.root)
            runs: dict[bool, list[dict]] = {True: [], False: []}
            for _ in range(args.rounds):
                for packed in (True, False):
                    m = model.build(store, load_config(name, [*base, f"train.pack_rows={str(packed).lower()}"]),
                                    force=True)["metrics"]
                    runs[packed].append(m)
            tps = {p: statistics.median(m["tokens_per_s"] for m in ms) for p, ms in runs.items()}
            rows.append({"config": name, "steps": args.steps, "rounds": args.rounds,
                         "packed_tokens_per_s": round(tps[True]), "plain_tokens_per_s": round(tps[False]),
                         "speedup": round(tps[True] / tps[False], 2),
                         "packed_val_loss": round(runs[True][-1]["final_val_loss"], 4),
                         "plain_val_loss": round(runs[False][-1]["final_val_loss"], 4),
                         "runs": {"packed": [m["tokens_per_s"] for m in runs[True]],
                                  "plain": [m["tokens_per_s"] for m in runs[False]]}})
    finally:
        ray.shutdown()

    print(f"\nTraining with packed rows, 2 DDP workers x 1 CPU, {args.steps} steps per run, median of "
          f"{args.rounds} interleaved runs")
    print("| config | plain tokens/s | packed tokens/s | speed-up | val loss plain / packed |")
    print("|---|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['config']} | {r['plain_tokens_per_s']:,} | {r['packed_tokens_per_s']:,} | {r['speedup']}x | "
              f"{r['plain_val_loss']} / {r['packed_val_loss']} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
