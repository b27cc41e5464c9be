"""SID pipeline benchmark on the Amazon Industrial catalog, everything in one run:

1. items/s of the Ray Data embedding pipeline (actor pool) vs a single-process loop with the same encoder
   and batch size — both timed from "model not loaded" to "all vectors computed";
2. time share of quantization (fit + assign) vs embedding;
3. quantizer fit cost (share of the Ray embedding time), collision rate, code usage, reconstruction error
   of RQ-VAE (today's defaults and the pre-issue-10 defaults, as rows of the same run) vs RQ-KMeans, all on
   the same embeddings. Every fit is timed after one tiny warm-up fit, so one-off lazy imports (torch.optim
   loads torch._dynamo) count for no row; the load average before each fit is recorded (shared machines).

    python bench/sid_pipeline.py [--data ../shared/data/amazon18-industrial] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from sidrec.config import EmbedConfig, QuantizerConfig
from sidrec.data.sources import load_amazon_prepared
from sidrec.sids.codes import code_usage, collision_stats
from sidrec.sids.embed import TextEncoder, embed_catalog, embeddings_to_numpy
from sidrec.sids.quantize import encode_codes, fit_quantizer, reconstruction_error
from sidrec.store import ArtifactStore

REPO = Path(__file__).resolve().parents[1]


def single_process(catalog, cfg: EmbedConfig) -> tuple[float, np.ndarray]:
    t0 = time.perf_counter()
    enc = TextEncoder(replace(cfg, cpus_per_actor=float(os.cpu_count() or 1)))  # all cores to one process
    out = [enc.encode(enc.texts(catalog.slice(i, cfg.batch_size)))
           for i in range(0, catalog.num_rows, cfg.batch_size)]
    return time.perf_counter() - t0, np.concatenate(out)


def ray_pipeline(catalog, cfg: EmbedConfig, root: str) -> tuple[float, np.ndarray]:
    store = ArtifactStore(root)
    run = store.begin("bench")
    store.write_table(f"{run.path}/catalog.parquet", catalog)
    t0 = time.perf_counter()
    embed_catalog(f"{run.path}/catalog.parquet", f"{run.path}/embeddings", store.fs, cfg)
    dt = time.perf_counter() - t0
    table = store.read_table(f"{run.path}/embeddings")
    order = {k: i for i, k in enumerate(table.column("item_id").to_pylist())}
    emb = embeddings_to_numpy(table)
    return dt, emb[[order[k] for k in catalog.column("item_id").to_pylist()]]


# the RQ-VAE defaults before issue 10 (200 epochs of 4 batches, codebooks seeded from one batch, no warm-up,
# no repair, no early stopping, no step floor): exactly the old loop, see tests/sids/test_quantize.py::
# test_old_schedule_is_reproducible. The old fit also ran on torch's own thread count (all cores): that row
# is opt-in (--old-threads) because on a loaded machine it can take an hour (oversubscribed OpenMP threads).
OLD_RQVAE = dict(method="rqvae", epochs=200, warmup_epochs=0, batch_size=1024, init_samples=1024, patience=0,
                 min_steps=0, repair_dead_codes=False)
VARIANTS = {
    "rqvae (old defaults, torch threads)": {**OLD_RQVAE, "num_threads": 0},
    "rqvae (old defaults, 1 thread)": {**OLD_RQVAE, "num_threads": 1},
    "rqvae (new defaults)": {"method": "rqvae"},
    "rqkmeans (defaults)": {"method": "rqkmeans"},
}


def quantize(emb: np.ndarray, name: str, options: dict) -> dict:
    cfg = QuantizerConfig(**options)
    load = os.getloadavg()[0]
    threads = cfg.num_threads or torch.get_num_threads()
    t0 = time.perf_counter()
    q = fit_quantizer(emb, cfg)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    codes = encode_codes(q, emb)
    assign_s = time.perf_counter() - t0
    stats = collision_stats(codes)
    usage = code_usage(codes, cfg.codebook_size)
    return {"name": name, "method": cfg.method, "options": options, "threads": threads, "load_avg_1m": load,
            "fit_s": fit_s, "assign_s": assign_s,
            "epochs_run": len(q.history) if cfg.method == "rqvae" else 0,
            "collision_share": stats["items_in_collision_share"], "largest_group": stats["largest_group"],
            "codes_used": [u["used"] for u in usage], "perplexity": [round(u["perplexity"], 1) for u in usage],
            "reconstruction_mse": reconstruction_error(q, emb)}


def side_by_side(quant: list[dict], embed_s: float) -> list[str]:
    """Metrics as rows, quantizers as columns."""
    rows = [
        ("fit (s)", lambda q: f"{q['fit_s']:.2f}"),
        ("fit share of embedding", lambda q: f"{q['fit_s'] / embed_s:.1%}"),
        ("assign (s)", lambda q: f"{q['assign_s']:.2f}"),
        ("epochs run", lambda q: str(q["epochs_run"]) if q["method"] == "rqvae" else "-"),
        ("torch threads", lambda q: str(q["threads"])),
        ("items in collision", lambda q: f"{q['collision_share']:.2%}"),
        ("largest collision group", lambda q: str(q["largest_group"])),
        ("codes used per level", lambda q: "/".join(map(str, q["codes_used"]))),
        ("perplexity per level", lambda q: "/".join(f"{p:.0f}" for p in q["perplexity"])),
        ("reconstruction MSE", lambda q: f"{q['reconstruction_mse']:.3e}"),
        ("load avg before fit", lambda q: f"{q['load_avg_1m']:.1f}"),
    ]
    cells = [["", *[q["name"] for q in quant]]] + [[label, *[f(q) for q in quant]] for label, f in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    return ["  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(r, widths, strict=True))) for r in cells]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "amazon18-industrial"))
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--limit", type=int, default=0, help="use only the first N items (0 = all)")
    ap.add_argument("--old-threads", action="store_true",
                    help="also fit the old RQ-VAE defaults on torch's own thread count (slow on a loaded machine)")
    args = ap.parse_args()

    import ray

    catalog = load_amazon_prepared(args.data).catalog
    if args.limit:
        catalog = catalog.slice(0, args.limit)
    n = catalog.num_rows
    cfg = EmbedConfig(batch_size=args.batch_size, num_actors=args.actors)

    load_before = os.getloadavg()[0]
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            ray_s, ray_emb = ray_pipeline(catalog, cfg, tmp)
        single_s, single_emb = single_process(catalog, cfg)
    finally:
        ray.shutdown()
    max_diff = float(np.abs(ray_emb - single_emb).max())
    variants = {k: v for k, v in VARIANTS.items() if args.old_threads or v.get("num_threads") != 0}
    for options in variants.values():  # warm-up: lazy imports and first-call costs, then every row is timed alike
        tiny = {"epochs": 2, "warmup_epochs": min(1, options.get("warmup_epochs", 1)), "codebook_size": 8}
        fit_quantizer(single_emb[:300], QuantizerConfig(**{**options, **tiny}))
    quant = [quantize(single_emb, name, options) for name, options in variants.items()]

    result = {
        "items": n, "batch_size": cfg.batch_size, "actors": cfg.num_actors, "cpus": os.cpu_count(),
        "single_process_s": single_s, "ray_data_s": ray_s,
        "single_items_per_s": n / single_s, "ray_items_per_s": n / ray_s, "speedup": single_s / ray_s,
        "max_abs_diff_embeddings": max_diff,
        "load_avg_1m_before_embedding": load_before,
        "quantization": quant,
        "fit_share_of_embedding": {q["name"]: q["fit_s"] / ray_s for q in quant},
        "quant_share_of_embedding": {q["name"]: (q["fit_s"] + q["assign_s"]) / ray_s for q in quant},
    }
    rows = [
        ("embedding, single process", f"{single_s:.1f} s", f"{n / single_s:.1f} items/s", "1.00x"),
        (f"embedding, Ray Data ({cfg.num_actors} actors)", f"{ray_s:.1f} s", f"{n / ray_s:.1f} items/s",
         f"{single_s / ray_s:.2f}x"),
    ]
    for q in quant:
        rows.append((f"quantize {q['name']} (fit + assign)", f"{q['fit_s'] + q['assign_s']:.2f} s",
                     f"{(q['fit_s'] + q['assign_s']) / ray_s:.1%} of embedding",
                     f"collisions {q['collision_share']:.2%}, largest {q['largest_group']}, "
                     f"codes used {q['codes_used']}"))
    width = max(len(r[0]) for r in rows)
    print(f"\nSID pipeline, {n} items, batch {cfg.batch_size}, {os.cpu_count()} CPUs")
    for r in rows:
        print(f"  {r[0]:<{width}}  {r[1]:>9}  {r[2]:>22}  {r[3]}")
    print(f"  embeddings agree: max |diff| = {max_diff:.2e}")
    print(f"\nQuantizers on the same embeddings (shares of the Ray Data embedding time, {ray_s:.1f} s)")
    print("\n".join(side_by_side(quant, ray_s)))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    out = Path(args.out) / "sid_pipeline.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
