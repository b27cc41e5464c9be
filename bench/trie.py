"""SidIndex (CSR trie) benchmark on random SIDs: 3 levels x K=256 + a dedup level (TIGER policy).

For each size: build time, bytes/item, add-1k-items time (delta index), ``allowed`` time for a batch of
20 x 32 beams at every depth (node walk + mask), and the same from carried node ids (``step`` +
``allowed_from_nodes``, what a beam search does per generated token).

    python bench/trie.py [--sizes 100000 1000000 10000000] [--out bench/results/trie.json] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from sidrec.sids.codes import assign_collisions
from sidrec.sids.index import SidIndex

REPO = Path(__file__).resolve().parents[1]


def timeit(fn, repeat: int = 20, sync=lambda: None) -> float:
    """Median seconds of fn() over ``repeat`` runs (after one warm-up)."""
    fn()
    sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def bench_size(n: int, K: int, beams: int, device: str, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    codes = assign_collisions(rng.integers(0, K, size=(n, 3), dtype=np.int64), "dedup", max_extra=K)
    t0 = time.perf_counter()
    index = SidIndex.build(codes, codebook_size=K)
    build_s = time.perf_counter() - t0
    L = index.levels
    nbytes = index.nbytes()
    index.to(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    # beams: half follow real SIDs, half random (mostly invalid below depth 2)
    real = codes[rng.integers(0, n, size=beams // 2)]
    rand = rng.integers(0, K, size=(beams - beams // 2, L))
    pre = torch.from_numpy(np.concatenate([real, rand])).to(device)
    allowed_ms, step_ms = {}, {}
    nodes = [index.node_of(pre[:, :0])]  # nodes[t]: node ids of the beams' length-t prefixes
    for t in range(1, L):
        nodes.append(index.step(nodes[-1], pre[:, t - 1], t - 1))
    for t in range(L):
        p = pre[:, :t]
        allowed_ms[t] = 1e3 * timeit(lambda p=p: index.allowed(p), sync=sync)
        if t == 0:
            step_ms[t] = 1e3 * timeit(lambda: index.allowed_from_nodes(nodes[0], 0), sync=sync)
        else:
            step_ms[t] = 1e3 * timeit(
                lambda t=t: index.allowed_from_nodes(index.step(nodes[t - 1], pre[:, t - 1], t - 1), t),
                sync=sync)

    new = rng.integers(0, K, size=(1000, L))
    t0 = time.perf_counter()
    index.add(new)
    add_ms = 1e3 * (time.perf_counter() - t0)
    t0 = time.perf_counter()
    index.add(rng.integers(0, K, size=(1000, L)))  # second 1k: the delta is rebuilt from 2k rows
    add2_ms = 1e3 * (time.perf_counter() - t0)
    assert index.contains(new).all()
    row = {
        "n_items": n, "levels": L, "codebook_size": K, "n_sids": index.n_sids,
        "nodes_per_depth": [index.n_nodes(d) for d in range(L + 1)],
        "build_s": build_s, "nbytes": nbytes, "bytes_per_item": nbytes / n,
        "add_1k_ms": add_ms, "add_2nd_1k_ms": add2_ms,
        "allowed_ms": allowed_ms, "step_plus_allowed_ms": step_ms, "beams": beams, "device": device,
    }
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "trie.json"))
    ap.add_argument("--codebook-size", type=int, default=256)
    ap.add_argument("--beams", type=int, default=20 * 32, help="batch of beams (20 requests x 32 beams)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    rows = []
    hdr = (f"{'items':>10} {'sids':>10} {'build s':>8} {'MB':>8} {'B/item':>7} {'add1k ms':>9} "
           + " ".join(f"{'allow t=' + str(t):>9}" for t in range(4))
           + " " + " ".join(f"{'step t=' + str(t):>9}" for t in range(4)))
    print(f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads, "
          f"beams={args.beams}; times in ms (median)")
    print(hdr)
    for n in args.sizes:
        r = bench_size(n, args.codebook_size, args.beams, args.device)
        rows.append(r)
        print(f"{n:>10} {r['n_sids']:>10} {r['build_s']:>8.2f} {r['nbytes'] / 2**20:>8.1f} "
              f"{r['bytes_per_item']:>7.2f} {r['add_1k_ms']:>9.2f} "
              + " ".join(f"{r['allowed_ms'][t]:>9.3f}" for t in range(r["levels"]))
              + " " + " ".join(f"{r['step_plus_allowed_ms'][t]:>9.3f}" for t in range(r["levels"])),
              flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "threads": torch.get_num_threads()}
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
