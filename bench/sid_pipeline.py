"""SID pipeline benchmark on the Amazon Industrial catalog, everything in one run:

1. items/s of the Ray Data embedding pipeline (actor pool) vs a single-process loop with the same encoder
   and batch size — both timed from "model not loaded" to "all vectors computed";
2. time share of quantization (fit + assign) vs embedding;
3. collision rate and code usage of RQ-VAE vs RQ-KMeans on the same embeddings.

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

from sidrec.config import EmbedConfig, QuantizerConfig
from sidrec.data.sources import load_amazon_prepared
from sidrec.sids.codes import code_usage, collision_stats
from sidrec.sids.embed import TextEncoder, embed_catalog, embeddings_to_numpy
from sidrec.sids.quantize import encode_codes, fit_quantizer
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


def quantize(emb: np.ndarray, method: str) -> dict:
    cfg = QuantizerConfig(method=method)
    t0 = time.perf_counter()
    q = fit_quantizer(emb, cfg)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    codes = encode_codes(q, emb)
    assign_s = time.perf_counter() - t0
    stats = collision_stats(codes)
    return {"method": method, "fit_s": fit_s, "assign_s": assign_s,
            "collision_share": stats["items_in_collision_share"], "largest_group": stats["largest_group"],
            "codes_used": [u["used"] for u in code_usage(codes, cfg.codebook_size)]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "amazon18-industrial"))
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--limit", type=int, default=0, help="use only the first N items (0 = all)")
    args = ap.parse_args()

    import ray

    catalog = load_amazon_prepared(args.data).catalog
    if args.limit:
        catalog = catalog.slice(0, args.limit)
    n = catalog.num_rows
    cfg = EmbedConfig(batch_size=args.batch_size, num_actors=args.actors)

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            ray_s, ray_emb = ray_pipeline(catalog, cfg, tmp)
        single_s, single_emb = single_process(catalog, cfg)
    finally:
        ray.shutdown()
    max_diff = float(np.abs(ray_emb - single_emb).max())
    quant = [quantize(single_emb, m) for m in ("rqvae", "rqkmeans")]

    result = {
        "items": n, "batch_size": cfg.batch_size, "actors": cfg.num_actors, "cpus": os.cpu_count(),
        "single_process_s": single_s, "ray_data_s": ray_s,
        "single_items_per_s": n / single_s, "ray_items_per_s": n / ray_s, "speedup": single_s / ray_s,
        "max_abs_diff_embeddings": max_diff,
        "quantization": quant,
        "quant_share_of_embedding": {q["method"]: (q["fit_s"] + q["assign_s"]) / ray_s for q in quant},
    }
    rows = [
        ("embedding, single process", f"{single_s:.1f} s", f"{n / single_s:.1f} items/s", "1.00x"),
        (f"embedding, Ray Data ({cfg.num_actors} actors)", f"{ray_s:.1f} s", f"{n / ray_s:.1f} items/s",
         f"{single_s / ray_s:.2f}x"),
    ]
    for q in quant:
        rows.append((f"quantize {q['method']} (fit + assign)", f"{q['fit_s'] + q['assign_s']:.2f} s",
                     f"{(q['fit_s'] + q['assign_s']) / ray_s:.1%} of embedding",
                     f"collisions {q['collision_share']:.2%}, largest {q['largest_group']}, "
                     f"codes used {q['codes_used']}"))
    width = max(len(r[0]) for r in rows)
    print(f"\nSID pipeline, {n} items, batch {cfg.batch_size}, {os.cpu_count()} CPUs")
    for r in rows:
        print(f"  {r[0]:<{width}}  {r[1]:>9}  {r[2]:>22}  {r[3]}")
    print(f"  embeddings agree: max |diff| = {max_diff:.2e}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    out = Path(args.out) / "sid_pipeline.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
