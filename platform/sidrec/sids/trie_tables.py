"""The kernels of ``SidIndex``'s node lookups: a segmented binary search in the CSR trie, and dense
transition tables of the depths with few nodes (the dense levels of STATIC, arXiv 2602.22647), which
``SidIndex.dense_tables`` caches as tensors per device.

The CSR trie of ``sidrec.sids.trie_arrays`` answers "which codes may follow node i" with a gather of node i's
child segment and "which node is child (i, k)" with a binary search in it: a dozen small tensor ops per
beam step. Where a depth has few nodes, two tables answer both with one row lookup each: ``bias[i]`` is
node i's [K] additive mask of valid codes (0 / -inf) and ``table[i, k]`` the node reached by code k. Absent nodes are not -1
but the *sentinel* n (the depth's node count): the last row of each table, all False / all sentinel of the
next depth. So a node id always indexes the next table (``index_select`` needs no negative index), and a
walk down the trie stays in range without a branch; ``node < n`` says whether it exists.
Size: (nodes + 1) x K x 8 bytes, e.g. 514 KiB at depth 1 (256 nodes, K = 256), 8 MiB for 4K nodes.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["child_table", "dense_pair", "segment_mask", "segment_search", "walk_tables"]


def child_table(offsets: np.ndarray, child_codes: np.ndarray, alive: np.ndarray | None,
                codebook_size: int) -> np.ndarray:
    """One depth of the trie (n nodes, m children) -> [n + 1, K] int32: entry [i, k] is the child of node i
    with code k (its position in ``child_codes``, i.e. its node id one depth down), or m, the sentinel of
    the next depth, where there is none or ``alive`` (bool, aligned with ``child_codes``) says all its items
    are retired. Row n (the sentinel node) is all m: an absent node has no children."""
    n, m = int(offsets.size) - 1, int(child_codes.size)
    table = np.full((n + 1, int(codebook_size)), m, dtype=np.int32)
    parent = np.repeat(np.arange(n, dtype=np.int64), np.diff(offsets))
    ids = np.arange(m, dtype=np.int64)
    if alive is not None:
        parent, ids = parent[alive], ids[alive]
    table[parent, child_codes[ids].astype(np.int64)] = ids
    return table


def dense_pair(offsets: np.ndarray, child_codes: np.ndarray, alive: np.ndarray | None, codebook_size: int,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``child_table`` as a tensor on ``device``, and its additive mask [n + 1, K] float32: 0 where a child
    exists, -inf where not (what the beam search adds to the log-probs)."""
    ids = torch.from_numpy(child_table(offsets, child_codes, alive, codebook_size)).to(device)
    return ids, torch.where(ids < child_codes.size, 0.0, float("-inf")).float()


def segment_search(offsets: torch.Tensor, child: torch.Tensor, alive: torch.Tensor | None, nodes: torch.Tensor,
                   codes: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """One depth of the CSR trie: the child of each node [B] with the given code [B] (-1 if the node is -1,
    there is no such child, or ``alive`` marks it retired). A lower_bound inside each node's child segment,
    in a fixed number of tensor ops (no host sync): segments hold <= K codes, so bit_length(K) halvings."""
    if child.numel() == 0:
        return torch.full_like(nodes, -1)
    valid = nodes >= 0
    safe = nodes.clamp(min=0)
    lo = torch.where(valid, offsets[safe], 0)
    end = torch.where(valid, offsets[safe + 1], 0)
    hi = end.clone()
    last = child.numel() - 1
    for _ in range(int(codebook_size).bit_length()):
        active = lo < hi
        mid = (lo + hi) >> 1
        less = child[mid.clamp(max=last)].long() < codes
        lo = torch.where(active & less, mid + 1, lo)
        hi = torch.where(active & ~less, mid, hi)
    found = (lo < end) & (child[lo.clamp(max=last)].long() == codes)
    if alive is not None:  # a node whose items are all retired is absent
        found &= alive[lo.clamp(max=last)]
    return torch.where(found, lo, torch.full_like(lo, -1))


def segment_mask(offsets: torch.Tensor, child: torch.Tensor, alive: torch.Tensor | None, nodes: torch.Tensor,
                 arange: torch.Tensor) -> torch.Tensor:
    """One depth of the CSR trie: nodes [B] -> bool [B, K] mask of their children's codes (all-False for -1
    and for children ``alive`` marks retired). Gathers up to K children per node (``arange`` = arange(K))
    and scatters them into the mask, column K being the trash column of the missing ones."""
    K, B = arange.numel(), nodes.shape[0]
    mask = torch.zeros(B, K + 1, dtype=torch.bool, device=nodes.device)
    if child.numel() and B:
        valid = nodes >= 0
        safe = nodes.clamp(min=0)
        start = offsets[safe]
        count = torch.where(valid, offsets[safe + 1] - start, 0)
        pos = (start[:, None] + arange[None, :]).clamp(max=child.numel() - 1)
        ok = arange[None, :] < count[:, None]
        if alive is not None:
            ok &= alive[pos]
        mask.scatter_(1, torch.where(ok, child[pos].long(), K), True)
    return mask[:, :K]


def walk_tables(tables: list[np.ndarray], prefixes: np.ndarray, codebook_size: int) -> np.ndarray:
    """prefixes [B, t] codes -> their node ids at depth t [B] int64 (-1 where absent), one lookup per depth in
    the dense tables (sentinel form) of depths 0..t-1; codes outside [0, K) are absent."""
    prefixes = np.asarray(prefixes, dtype=np.int64)
    nodes = np.zeros(prefixes.shape[0], dtype=np.int64)
    codes = np.clip(prefixes, 0, codebook_size - 1)
    for d, table in enumerate(tables):
        nodes = table[nodes, codes[:, d]].astype(np.int64)
    absent = ((prefixes < 0) | (prefixes >= codebook_size)).any(axis=1)
    if tables:
        absent |= nodes == int(tables[-1][-1, 0])  # the sentinel of depth t
    nodes[absent] = -1
    return nodes
