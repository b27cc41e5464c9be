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


def personalization(recommendations: list[list[str]], max_pairs: int = 20_000, seed: int = 0) -> float | None:
    """1 - the mean share of items two users' lists have in common (|A & B| / max(|A|, |B|)), over every pair
    of lists or a seeded sample of ``max_pairs`` pairs: 0 when every history gets the same list (a
    most-popular ranking without exclusions), near 1 when no two lists share an item. None for < 2 lists."""
    n = len(recommendations)
    if n < 2:
        return None
    sets = [set(r) for r in recommendations]
    if n * (n - 1) // 2 <= max_pairs:
        a, b = np.triu_indices(n, k=1)
    else:
        rng = np.random.default_rng(seed)
        a, b = rng.integers(0, n, size=(2, max_pairs))
        keep = a != b
        a, b = a[keep], b[keep]
    shared = [len(sets[i] & sets[j]) / max(len(sets[i]), len(sets[j]), 1) for i, j in zip(a.tolist(), b.tolist(),
                                                                                          strict=True)]
    return 1.0 - float(np.mean(shared))
