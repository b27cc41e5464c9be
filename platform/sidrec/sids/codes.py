"""Code tuples: collision handling and code-quality statistics.

Items whose tuples collide can get an extra dedup level (TIGER) so every item has its own SID; the
statistics say how well the quantizer uses its codebooks and how similar items sharing a prefix are.
Everything here is numpy on [N, L] int arrays and vectorised (sort based), so it is fine for 10M items.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from sidrec.config import CODEBOOK_SIZE


def _check_codes(codes: np.ndarray) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.ndim != 2 or not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"codes must be a 2-D integer array [N, L], got {codes.dtype} {codes.shape}")
    if codes.size and codes.min() < 0:
        raise ValueError(f"codes must be >= 0, got min {codes.min()}")
    return codes


def _sorted_groups(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stable sort of rows -> (order [N], group id per sorted row [N], sorted position where each group
    starts [G]); equal rows are adjacent, in
    input order. When rows and row index fit in 63 bits together they are packed into one int64 and
    sorted by value (the index makes keys unique, so this is stable): ~6x faster than lexsort."""
    n, L = codes.shape
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    base = int(codes.max()) + 1
    idx_bits = max(int(n - 1).bit_length(), 1)
    if L * np.log2(max(base, 2)) + idx_bits < 63:
        key = np.zeros(n, dtype=np.int64)
        for col in range(L):
            key = key * base + codes[:, col].astype(np.int64)
        packed = np.sort((key << idx_bits) | np.arange(n, dtype=np.int64))
        order = packed & ((1 << idx_bits) - 1)
        sk = packed >> idx_bits
        new = np.empty(n, dtype=bool)
        new[0] = True
        new[1:] = sk[1:] != sk[:-1]
    else:
        order = np.lexsort(codes.T[::-1])  # last key is primary; lexsort is stable
        sc = codes[order]
        new = np.empty(n, dtype=bool)
        new[0] = True
        new[1:] = (sc[1:] != sc[:-1]).any(axis=1)
    return order, np.cumsum(new) - 1, np.flatnonzero(new)


def assign_collisions(codes: np.ndarray, policy: Literal["keep", "dedup"],
                      max_extra: int = CODEBOOK_SIZE) -> np.ndarray:
    """"keep": codes unchanged. "dedup" (TIGER): append one column; items sharing an L-tuple get 0, 1, 2,
    ... in input order, unique items get 0. codes [N, L] -> [N, L] or [N, L+1] int64.

    A group larger than max_extra (the dedup level's vocabulary) raises instead of silently growing the
    vocabulary: that many exact collisions means the quantizer is too coarse.
    """
    codes = _check_codes(codes)
    if policy == "keep":
        return codes
    if policy != "dedup":
        raise ValueError(f"collision policy must be 'keep' or 'dedup', got {policy!r}")
    n = codes.shape[0]
    order, group, starts = _sorted_groups(codes)
    rank_sorted = np.arange(n) - starts[group]
    extra = np.empty(n, dtype=np.int64)
    extra[order] = rank_sorted
    largest = int(rank_sorted.max()) + 1 if n else 0
    if largest > max_extra:
        raise ValueError(
            f"SID collision group of {largest} items exceeds the dedup level size max_extra={max_extra}; "
            f"use more quantizer levels or a larger codebook (or raise max_extra)")
    out = np.empty((n, codes.shape[1] + 1), dtype=np.int64)
    out[:, :-1] = codes
    out[:, -1] = extra
    return out


def collision_stats(codes: np.ndarray) -> dict:
    """n_items, n_unique_sids, items_in_collision_share (items whose tuple is shared with >= 1 other
    item, as a fraction of all items) and largest_group (items in the biggest shared tuple)."""
    codes = _check_codes(codes)
    n = codes.shape[0]
    if n == 0:
        return {"n_items": 0, "n_unique_sids": 0, "items_in_collision_share": 0.0, "largest_group": 0}
    _, _, starts = _sorted_groups(codes)
    sizes = np.diff(np.r_[starts, n])
    return {
        "n_items": n,
        "n_unique_sids": len(sizes),
        "items_in_collision_share": float(sizes[sizes > 1].sum() / n),
        "largest_group": int(sizes.max()),
    }


def code_usage(codes: np.ndarray, codebook_size: int) -> list[dict]:
    """Per level: used (distinct codes), used_share (used / codebook_size) and perplexity = exp(entropy)
    of the code histogram (natural log): K for uniform use of K codes, 1 for a collapsed level."""
    codes = _check_codes(codes)
    out = []
    for lvl in range(codes.shape[1]):
        col = codes[:, lvl]
        if col.size and col.max() >= codebook_size:
            raise ValueError(f"level {lvl} has code {col.max()} >= codebook_size {codebook_size}")
        counts = np.bincount(col, minlength=codebook_size)
        p = counts[counts > 0] / max(col.size, 1)
        entropy = float(-(p * np.log(p)).sum())
        used = int((counts > 0).sum())
        out.append({"level": lvl, "used": used, "used_share": used / codebook_size,
                    "perplexity": float(np.exp(entropy))})
    return out


def _common_prefix_len(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Rows a, b [P, L] -> number of leading levels on which they agree [P]."""
    diff = a != b
    return np.where(diff.any(axis=1), diff.argmax(axis=1), a.shape[1])


def prefix_similarity(codes: np.ndarray, embeddings: np.ndarray, n_pairs: int = 20000,
                      seed: int = 0) -> dict[str, dict[int, float] | dict[int, int]]:
    """Mean cosine similarity of item pairs, bucketed by the length of their shared SID prefix (0..L).

    Good SIDs: the longer the shared prefix, the more similar the items. Random pairs almost never share
    a long prefix, so n_pairs is split evenly over L + 1 samplers: uniform random pairs (i != j), and for
    each l in 1..L pairs drawn inside length-l prefix groups (pick an item uniformly among items whose
    length-l prefix is shared, then a different item uniformly from its group, so groups are weighted
    by size). Every pair is bucketed by its actual common prefix length, which can exceed l.

    Returns {"mean_cosine": {length: float, nan if no pair}, "n_pairs": {length: int}}.
    """
    codes = _check_codes(codes)
    emb = np.asarray(embeddings, dtype=np.float64)
    n, L = codes.shape
    if emb.ndim != 2 or emb.shape[0] != n:
        raise ValueError(f"embeddings must be [N, D] with N={n}, got {emb.shape}")
    rng = np.random.default_rng(seed)
    per = n_pairs // (L + 1)
    left, right = [], []
    if n >= 2 and per:
        i = rng.integers(0, n, per)
        j = (i + rng.integers(1, n, per)) % n  # uniform over j != i
        left.append(i)
        right.append(j)
    for lvl in range(1, L + 1):
        order, group, starts = _sorted_groups(codes[:, :lvl])
        sizes = np.diff(np.r_[starts, n])
        pos = np.flatnonzero(sizes[group] > 1)  # sorted positions of items in a shared prefix group
        if len(pos) == 0 or per == 0:
            continue
        p = pos[rng.integers(0, len(pos), per)]
        g = group[p]
        s, size = starts[g], sizes[g]
        q = s + (p - s + rng.integers(1, size)) % size  # another member of the same group
        left.append(order[p])
        right.append(order[q])
    means: dict[int, float] = {k: float("nan") for k in range(L + 1)}
    counts: dict[int, int] = {k: 0 for k in range(L + 1)}
    if left:
        i, j = np.concatenate(left), np.concatenate(right)
        unit = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        cos = (unit[i] * unit[j]).sum(axis=1)
        plen = _common_prefix_len(codes[i], codes[j])
        tot = np.bincount(plen, weights=cos, minlength=L + 1)
        cnt = np.bincount(plen, minlength=L + 1)
        for k in range(L + 1):
            counts[k] = int(cnt[k])
            if cnt[k]:
                means[k] = float(tot[k] / cnt[k])
    return {"mean_cosine": means, "n_pairs": counts}
