"""Next-item ranking metrics with one relevant item per example (leave-one-out / next-item protocols)."""

from __future__ import annotations

import numpy as np

from sidrec.config import METRIC_KS as KS


def target_ranks(recommendations: list[list[str]], targets: list[str]) -> np.ndarray:
    """0-based rank of each target in its recommendation list, -1 when absent."""
    if len(recommendations) != len(targets):
        raise ValueError(f"{len(recommendations)} recommendation lists for {len(targets)} targets")
    return np.array([rec.index(t) if t in rec else -1 for rec, t in zip(recommendations, targets, strict=True)],
                    dtype=np.int64)


def hr_ndcg(ranks: np.ndarray, ks: tuple[int, ...] = KS) -> dict[str, float]:
    """HR@K = share of ranks in [0, K); NDCG@K = mean of 1 / log2(rank + 2) over those (one relevant item)."""
    ranks = np.asarray(ranks)
    if ranks.size == 0:
        raise ValueError("no examples to score")
    out: dict[str, float] = {}
    for k in ks:
        hit = (ranks >= 0) & (ranks < k)
        out[f"hr@{k}"] = float(hit.mean())
        out[f"ndcg@{k}"] = float(np.where(hit, 1.0 / np.log2(ranks.clip(min=0) + 2.0), 0.0).mean())
    return out
