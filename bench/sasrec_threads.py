"""SASRec training time with 1 and 2 torch threads (`eval.sasrec.num_threads`), side by side, same result.

Trains the evaluator's SASRec on a store's train split (valid HR@10 after every epoch, as the evaluator does)
for a fixed number of epochs without early stopping, the thread counts interleaved over ``--rounds``. The
valid HR@10 of every run is printed: equal values mean the thread count changes the time, not the baseline.
Run it with nothing else on the machine: that is the case the quickstart's setting is for.

    python bench/sasrec_threads.py --store artifacts/quickstart [--epochs 6] [--rounds 2] [--threads 1 2]

Prints a table and writes bench/results/sasrec_threads.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True, help="a store with a dataset stage (e.g. artifacts/quickstart)")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "sasrec_threads.json"))
    args = ap.parse_args()

    from sidrec.config import SASRecConfig
    from sidrec.eval.baselines import train_sasrec
    from sidrec.store import ArtifactStore

    store = ArtifactStore(args.store)
    cols = ["user_id", "history", "target"]
    train, valid = store.split("train", cols), store.split("valid", cols)
    item_ids = list(store.titles())  # the published catalog's ids, in its order (as the evaluator ranks them)
    runs: dict[int, list[dict]] = {t: [] for t in args.threads}
    for _ in range(args.rounds):
        for t in args.threads:
            t0 = time.perf_counter()
            rec = train_sasrec(train, item_ids, SASRecConfig(epochs=args.epochs, patience=0, num_threads=t),
                               valid=valid)
            runs[t].append({"seconds": time.perf_counter() - t0, "valid_hr@10": rec.history[-1]["valid_hr@10"]})
    base = statistics.median(r["seconds"] for r in runs[args.threads[0]])
    rows = [{"threads": t, "seconds": [round(r["seconds"], 1) for r in rs],
             "median_s": round(statistics.median(r["seconds"] for r in rs), 1),
             "speedup": round(base / statistics.median(r["seconds"] for r in rs), 2),
             "valid_hr@10": [r["valid_hr@10"] for r in rs]} for t, rs in runs.items()]
    print(f"SASRec on {args.store}: {args.epochs} epochs, {len(train)} train examples, {len(item_ids)} items\n")
    print("| threads | seconds (each round) | median | speed-up | valid HR@10 (each round) |")
    print("|---:|---|---:|---:|---|")
    for r in rows:
        print(f"| {r['threads']} | {' / '.join(map(str, r['seconds']))} | {r['median_s']} | {r['speedup']}x | "
              f"{' / '.join(f'{h:.6f}' for h in r['valid_hr@10'])} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"store": args.store, "epochs": args.epochs, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
