"""How good are the Semantic IDs? Reconstruction, code usage, collisions, prefix similarity.

Written next to the SID table as report.json, report.md and code_usage.png, and printed as a table.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from sidrec.sids.codes import code_usage, collision_stats, prefix_similarity
from sidrec.sids.embed import embeddings_to_numpy


def sample_embeddings(store, item_ids: list[str], n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings of a deterministic sample of ≤ n items (rows of `item_ids`), read with a pushed-down filter."""
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(item_ids), size=min(n, len(item_ids)), replace=False))
    wanted = pa.array([item_ids[i] for i in idx], pa.string())
    ds = pads.dataset(f"{store.current_path('embeddings')}/embeddings", filesystem=store.fs, format="parquet")
    table = ds.to_table(filter=pc.field("item_id").isin(wanted))
    pos = {k: i for i, k in enumerate(table.column("item_id").to_pylist())}
    emb = embeddings_to_numpy(table)
    return idx, emb[[pos[item_ids[i]] for i in idx]]


def sid_report(store, cfg, item_ids: list[str], raw_codes: np.ndarray, final_codes: np.ndarray,
               quantizer_metrics: dict) -> dict:
    k = cfg.quantize.codebook_size
    before = collision_stats(raw_codes)
    after = collision_stats(final_codes)
    usage = code_usage(raw_codes, k)
    idx, emb = sample_embeddings(store, item_ids, cfg.sids.report_sample, cfg.quantize.seed)
    sim = prefix_similarity(raw_codes[idx], emb, seed=cfg.quantize.seed)
    # JSON-friendly: string keys, None for a prefix length no sampled pair has
    sim = {"mean_cosine": {str(k): (None if v != v else round(v, 4)) for k, v in sim["mean_cosine"].items()},
           "pairs": {str(k): v for k, v in sim["n_pairs"].items()}}
    summary = {
        "items": len(item_ids),
        "method": cfg.quantize.method,
        "levels": int(raw_codes.shape[1]),
        "codebook_size": k,
        "collision_policy": cfg.sids.collision,
        "reconstruction_mse": quantizer_metrics.get("reconstruction_mse"),
        "codes_used": [u["used"] for u in usage],
        "perplexity": [round(u["perplexity"], 2) for u in usage],
        "collision_share_before": before["items_in_collision_share"],
        "collision_share_after": after["items_in_collision_share"],
        "largest_group_before": before["largest_group"],
        "unique_sids_after": after["n_unique_sids"],
    }
    return {"summary": summary, "code_usage": usage, "collisions": {"before": before, "after": after},
            "prefix_similarity": sim, "quantizer": quantizer_metrics}


def format_report(report: dict) -> str:
    """Markdown tables (also what the CLI prints)."""
    s = report["summary"]
    lines = [
        f"## Semantic IDs: {s['items']} items, {s['method']}, {s['levels']} x {s['codebook_size']} codes, "
        f"collisions: {s['collision_policy']}",
        "",
        "| metric | value |",
        "|---|---|",
        f"| reconstruction MSE | {s['reconstruction_mse']:.5f} |" if s["reconstruction_mse"] is not None
        else "| reconstruction MSE | n/a |",
        f"| items in a collision, before dedup | {s['collision_share_before']:.2%} |",
        f"| items in a collision, after {s['collision_policy']} | {s['collision_share_after']:.2%} |",
        f"| largest collision group (before) | {s['largest_group_before']} |",
        f"| distinct SIDs (after) | {s['unique_sids_after']} |",
        "",
        "| level | codes used | perplexity |",
        "|---|---|---|",
    ]
    for i, u in enumerate(report["code_usage"]):
        lines.append(f"| {chr(ord('a') + i)} | {u['used']} | {u['perplexity']:.1f} |")
    lines += ["", "| shared prefix length | pairs | mean cosine |", "|---|---|---|"]
    sim = report["prefix_similarity"]
    for length in sorted(sim["mean_cosine"], key=int):
        mean = sim["mean_cosine"][length]
        lines.append(f"| {length} | {sim['pairs'][length]} | {'n/a' if mean is None else f'{mean:.3f}'} |")
    return "\n".join(lines) + "\n"


def plot_code_usage(raw_codes: np.ndarray, codebook_size: int) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = raw_codes.shape[1]
    fig, axes = plt.subplots(levels, 1, figsize=(8, 2.0 * levels), sharex=True)
    for i, ax in enumerate(np.atleast_1d(axes)):
        counts = np.sort(np.bincount(raw_codes[:, i], minlength=codebook_size))[::-1]
        ax.bar(np.arange(codebook_size), counts, width=1.0)
        ax.set_ylabel(f"level {chr(ord('a') + i)}")
    np.atleast_1d(axes)[-1].set_xlabel("code rank (most used first)")
    fig.suptitle("items per code")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()


def write_report(store, path: str, report: dict, raw_codes: np.ndarray | None = None) -> None:
    store.write_json(f"{path}/report.json", report)
    store.write_bytes(f"{path}/report.md", format_report(report).encode())
    if raw_codes is not None:
        store.write_bytes(f"{path}/code_usage.png", plot_code_usage(raw_codes, report["summary"]["codebook_size"]))
