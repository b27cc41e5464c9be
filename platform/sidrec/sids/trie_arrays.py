"""The numpy side of ``SidIndex``: the level-wise CSR trie arrays (built, read back) and the tombstones of
retired items. No torch here: ``sidrec.sids.index`` holds the batched torch queries and the catalog view.

Layout. A SID is a tuple of L codes in [0, K). Sort the distinct SIDs; at depth d (prefix length d,
d = 0..L) the distinct length-d prefixes are the *nodes* of depth d, numbered 0..n_d-1 in sorted order
(depth 0 is the single root, node 0). For each depth d < L the index stores

* ``offsets[d]``      int64 [n_d + 1]: node i's children are the depth-(d+1) nodes offsets[d][i]..offsets[d][i+1]-1;
* ``child_codes[d]``  uint8 (K <= 256) / uint16 / int32 [n_{d+1}]: the code of each depth-(d+1) node, i.e.
  the sorted codes of each parent's children, concatenated.

Child node ids are implicit (a child's position in ``child_codes[d]`` is its id at depth d+1), so the trie
costs ~1 byte per node plus 8 bytes per internal node. Leaves (depth-L nodes = distinct SIDs) map to item
rows through another CSR (``item_offsets`` [n_L + 1], ``item_rows`` [N]); when every SID is unique (the
"dedup" policy) ``item_offsets`` is dropped and leaf i holds exactly ``item_rows[i]``. With 10M random SIDs
(3 levels x 256 + a dedup level) that is ~12 bytes per item.

Retired items. A catalog retires items while the index serves; rebuilding the trie for each retire costs a
sort of the whole catalog, so the trie is kept and rows are marked dead instead (``SidIndex.compact`` drops
them for good). ``Liveness`` holds that bookkeeping: per leaf the number of present items, per depth which
nodes still lead to one (the beam search's masks use these), and a cumulative count of live leaves (so
``leaf_counts`` stays a range difference). ``Liveness.retire(rows)`` costs O(len(rows) + leaves) for the
per-leaf counts and O(nodes) for the node masks, vectorised, no sort. Memory: 1 byte per row and per node
plus 16 bytes per row and per leaf (row -> leaf map, live counts), allocated on the first retire only.
"""

from __future__ import annotations

import numpy as np

__all__ = ["Liveness", "TrieArrays", "alive_nodes", "build_arrays", "check_codes", "code_dtype", "leaf_codes",
           "leaf_of_rows", "leaf_range", "row_codes", "row_dtype", "sort_rows"]

# (offsets per depth, child codes per depth, item_offsets or None, item_rows)
TrieArrays = tuple[list[np.ndarray], list[np.ndarray], np.ndarray | None, np.ndarray]


def code_dtype(codebook_size: int) -> np.dtype:
    """Smallest dtype that holds a code: the child codes are most of the trie's bytes."""
    if codebook_size <= 256:
        return np.dtype(np.uint8)
    if codebook_size <= 65536:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


def row_dtype(n: int) -> np.dtype:
    """int32 rows while they fit: halves ``item_rows`` for every realistic catalog."""
    return np.dtype(np.int32) if n < 2**31 - 1 else np.dtype(np.int64)


def sort_rows(codes: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Sort rows of codes [N, L] -> (order [N] int64, new [N] bool: sorted row i starts a new distinct SID).
    Rows are packed into one int64 key (+ the row index, so a plain sort is stable) when they fit."""
    n, L = codes.shape
    new = np.ones(n, dtype=bool)
    idx_bits = max(int(n - 1).bit_length(), 1)
    if L * bits + idx_bits <= 62:
        key = np.zeros(n, dtype=np.int64)
        for col in range(L):
            key = (key << bits) | codes[:, col].astype(np.int64)
        packed = np.sort((key << idx_bits) | np.arange(n, dtype=np.int64))
        order = packed & ((1 << idx_bits) - 1)
        sk = packed >> idx_bits
        new[1:] = sk[1:] != sk[:-1]
    else:
        order = np.lexsort(codes.T[::-1]).astype(np.int64)
        sc = codes[order]
        new[1:] = (sc[1:] != sc[:-1]).any(axis=1)
    return order, new


def check_codes(codes: np.ndarray, codebook_size: int, levels: int | None = None) -> np.ndarray:
    """codes -> a 2-D integer array [N, L] (L = ``levels`` when given) in [0, codebook_size), or ValueError:
    the trie arrays assume all three."""
    codes = np.asarray(codes)
    if codes.ndim == 1 and levels is not None:
        codes = codes[None]
    if codes.ndim != 2 or not (np.issubdtype(codes.dtype, np.integer) or codes.size == 0):
        raise ValueError(f"codes must be a 2-D integer array [N, L], got {codes.dtype} {codes.shape}")
    if codes.shape[1] < 1 or (levels is not None and codes.shape[1] != levels):
        raise ValueError(f"codes must be [N, {levels or 'L >= 1'}], got {codes.shape}")
    if codes.size and (codes.min() < 0 or codes.max() >= codebook_size):
        raise ValueError(f"codes must lie in [0, {codebook_size}), got [{codes.min()}, {codes.max()}]")
    return codes


def build_arrays(codes: np.ndarray, codebook_size: int) -> TrieArrays:
    """Validated codes [N, L] in [0, codebook_size) -> the trie arrays. Fully vectorised (one sort + a
    few passes); item row i is input row i."""
    n, L = codes.shape
    cdt = code_dtype(codebook_size)
    rdt = row_dtype(n)
    if n == 0:
        offsets = [np.zeros(2, np.int64)] + [np.zeros(1, np.int64) for _ in range(L - 1)]
        return offsets, [np.zeros(0, cdt) for _ in range(L)], None, np.zeros(0, rdt)

    bits = max(int(codebook_size - 1).bit_length(), 1)
    order, new_leaf = sort_rows(codes, bits)
    leaf_first = np.flatnonzero(new_leaf)          # sorted position of each distinct SID's first item
    ucodes = codes[order[leaf_first]]              # [U, L] distinct SIDs, sorted
    U = ucodes.shape[0]

    offsets: list[np.ndarray] = []
    child: list[np.ndarray] = []
    parent_node = np.zeros(U, dtype=np.int64)      # node id of each distinct SID's prefix at depth d
    n_parent = 1
    new = np.zeros(U, dtype=bool)                  # prefix of length d+1 differs from the previous SID's
    new[0] = True
    for d in range(L):
        col = ucodes[:, d]
        new[1:] |= col[1:] != col[:-1]
        starts = np.flatnonzero(new)               # first SID of each depth-(d+1) node
        child.append(col[starts].astype(cdt))
        off = np.zeros(n_parent + 1, dtype=np.int64)
        np.cumsum(np.bincount(parent_node[starts], minlength=n_parent), out=off[1:])
        offsets.append(off)
        if d + 1 < L:
            parent_node = np.cumsum(new) - 1
            n_parent = starts.size

    item_rows = order.astype(rdt)
    if U == n:
        return offsets, child, None, item_rows
    item_offsets = np.empty(U + 1, dtype=rdt)
    item_offsets[:-1] = leaf_first
    item_offsets[-1] = n
    return offsets, child, item_offsets, item_rows


def leaf_codes(offsets: list[np.ndarray], child_codes: list[np.ndarray]) -> np.ndarray:
    """The full SID of every leaf [U, L] int64, read back up the trie (the trie stores no SID whole)."""
    L = len(child_codes)
    U = int(child_codes[-1].size)
    out = np.empty((U, L), dtype=np.int64)
    node = np.arange(U, dtype=np.int64)            # ancestor at depth d+1 of every leaf
    for d in range(L - 1, -1, -1):
        out[:, d] = child_codes[d][node]
        if d:
            parent = np.repeat(np.arange(offsets[d].size - 1, dtype=np.int64), np.diff(offsets[d]))
            node = parent[node]
    return out


def row_codes(offsets: list[np.ndarray], child_codes: list[np.ndarray], item_offsets: np.ndarray | None,
              item_rows: np.ndarray) -> np.ndarray:
    """The SID of every item row [N, L] int64 (the inverse of ``build_arrays``)."""
    leaf = leaf_codes(offsets, child_codes)
    out = np.empty((item_rows.size, len(child_codes)), dtype=np.int64)
    out[item_rows] = leaf if item_offsets is None else np.repeat(leaf, np.diff(item_offsets), axis=0)
    return out


def leaf_range(offsets: list[np.ndarray], nodes: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """Depth-``depth`` node ids (>= 0) -> the [lo, hi) range of leaves below each: a node's leaves are
    contiguous, so following the offsets down to depth L finds them."""
    lo, hi = nodes, nodes + 1
    for d in range(depth, len(offsets)):
        lo, hi = offsets[d][lo], offsets[d][hi]
    return lo, hi


def leaf_of_rows(item_offsets: np.ndarray | None, item_rows: np.ndarray) -> np.ndarray:
    """Leaf id of every item row [N] int64: the inverse of the leaf -> rows CSR, so a retire can find the
    leaves it empties without a trie walk."""
    n = item_rows.size
    out = np.empty(n, dtype=np.int64)
    if item_offsets is None:
        out[item_rows] = np.arange(n, dtype=np.int64)
    else:
        out[item_rows] = np.repeat(np.arange(item_offsets.size - 1, dtype=np.int64), np.diff(item_offsets))
    return out


def alive_nodes(offsets: list[np.ndarray], leaf_alive: np.ndarray) -> list[np.ndarray]:
    """Which nodes still lead to a present item: ``leaf_alive`` bool [U] -> per depth d < L a bool array over
    the depth-(d+1) nodes (aligned with ``child_codes[d]``); a node is alive iff one of its children is.
    O(nodes), bottom up: a child segment's alive count is a difference of one cumulative sum."""
    L = len(offsets)
    out: list[np.ndarray] = [np.empty(0, bool)] * L
    out[L - 1] = np.asarray(leaf_alive, dtype=bool)
    for d in range(L - 1, 0, -1):
        cum = np.zeros(out[d].size + 1, dtype=np.int64)
        np.cumsum(out[d], out=cum[1:])
        off = offsets[d]
        out[d - 1] = cum[off[1:]] > cum[off[:-1]]
    return out


class Liveness:
    """Tombstones of one trie (its own rows only; a delta index keeps its own). Built on the first retire
    with every row present; see the module docstring for the costs."""

    def __init__(self, offsets: list[np.ndarray], item_offsets: np.ndarray | None, item_rows: np.ndarray):
        self.offsets = offsets
        self.dead = np.zeros(item_rows.size, dtype=bool)
        self.row_leaf = leaf_of_rows(item_offsets, item_rows)
        n_leaves = int(offsets[-1][-1]) if offsets[-1].size else 0
        self.leaf_live = (np.diff(item_offsets).astype(np.int64) if item_offsets is not None
                          else np.ones(n_leaves, dtype=np.int64))
        self.alive: list[np.ndarray] = []
        self.leaf_cum = np.zeros(n_leaves + 1, dtype=np.int64)
        self._refresh()

    @property
    def n_dead(self) -> int:
        return int(np.count_nonzero(self.dead))

    @property
    def n_live_leaves(self) -> int:
        return int(self.leaf_cum[-1])

    def retire(self, rows: np.ndarray) -> np.ndarray:
        """Mark ``rows`` (distinct, in range) retired; returns those that were present (the others are
        ignored, so retiring twice is harmless). The node masks are recomputed only if something changed."""
        rows = np.asarray(rows, dtype=np.int64)
        fresh = rows[~self.dead[rows]]
        if fresh.size:
            self.dead[fresh] = True
            self.leaf_live -= np.bincount(self.row_leaf[fresh], minlength=self.leaf_live.size)
            self._refresh()
        return fresh

    def _refresh(self) -> None:
        leaf_alive = self.leaf_live > 0
        self.alive = alive_nodes(self.offsets, leaf_alive)
        np.cumsum(leaf_alive, out=self.leaf_cum[1:])

    def nbytes(self) -> int:
        arrs = [self.dead, self.row_leaf, self.leaf_live, self.leaf_cum, *self.alive]
        return sum(int(a.nbytes) for a in arrs)
