"""What it costs to start sidrec's light entry points: `import sidrec.config`, `sidrec --help`, the Serve
ingress module, against the whole pipeline and bare torch, each in a fresh interpreter.

    python bench/import_cost.py                                  # this checkout
    python bench/import_cost.py --compare /path/to/other/platform   # + another checkout, side by side

Prints a Markdown table (median of --reps runs, and each row's ratio to `import torch`) and writes JSON to
bench/results/import_cost.json. Rows a checkout lacks show n/a.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CASES = {
    "import torch (reference)": "import torch",
    "import sidrec.config": "import sidrec.config",
    "sidrec --help": "import sys; sys.argv = ['sidrec', '--help']\ntry:\n    import sidrec.cli as c; c.main()\nexcept SystemExit:\n    pass",
    "import sidrec.serve.http (ingress)": "import sidrec.serve.http",
    "import sidrec.pipeline (every stage)": "import sidrec.pipeline",
}


def time_case(code: str, pythonpath: str | None, reps: int) -> float | None:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=300)
        if proc.returncode != 0:
            return None
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--compare", default=None, help="platform/ folder of another checkout")
    args = ap.parse_args()
    trees = {"this checkout": str(HERE.parent / "platform")}
    if args.compare:
        trees["compared"] = args.compare
    results: dict[str, dict[str, float | None]] = {name: {} for name in trees}
    for case, code in CASES.items():  # trees interleaved per case, so machine load hits both alike
        for name, path in trees.items():
            results[name][case] = time_case(code, path, args.reps)
    head = "| entry point | " + " | ".join(f"{n} s | x torch" for n in trees) + " |"
    print(head)
    print("|---|" + "---:|---:|" * len(trees))
    for case in CASES:
        cells = []
        for name in trees:
            t, ref = results[name][case], results[name]["import torch (reference)"]
            cells += ["n/a", "n/a"] if t is None else [f"{t:.2f}", f"{t / ref:.2f}" if ref else "n/a"]
        print(f"| {case} | " + " | ".join(cells) + " |")
    out = HERE / "results" / "import_cost.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"reps": args.reps, "trees": trees, "seconds": results}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
