"""Compressed SID index for constrained decoding: a level-by-level CSR trie (idea of STATIC, arXiv 2602.22647).

A SID is a tuple of L codes in [0, K). Sort the distinct SIDs; at depth d (prefix length d, d = 0..L) the
distinct length-d prefixes are the *nodes* of depth d, numbered 0..n_d-1 in sorted order (depth 0 is the
single root, node 0). For each depth d < L the index stores

* ``offsets[d]``      int64 [n_d + 1]: node i's children are the depth-(d+1) nodes offsets[d][i]..offsets[d][i+1]-1;
* ``child_codes[d]``  uint8 (K <= 256) / uint16 / int32 [n_{d+1}]: the code of each depth-(d+1) node, i.e.
  the sorted codes of each parent's children, concatenated.

Child node ids are implicit (a child's position in ``child_codes[d]`` is its id at depth d+1), so the trie
costs ~1 byte per node plus 8 bytes per internal node. Leaves (depth-L nodes = distinct SIDs) map to item
rows through another CSR (``item_offsets`` [n_L + 1], ``item_rows`` [N]); when every SID is unique (the
"dedup" policy) ``item_offsets`` is dropped and leaf i holds exactly ``item_rows[i]``. With 10M random SIDs
(3 levels x 256 + a dedup level) that is ~12 bytes per item.

Queries run on torch tensors, batched, without Python loops over beams and without host syncs (so they work
on CUDA and inside captured graphs): a node lookup is a fixed-iteration binary search inside each beam's
child segment (a segmented ``searchsorted``), and ``allowed`` gathers up to K children per beam and
scatters them into a [B, K] mask.

Cold-start items go to a small *delta* index (itself a SidIndex, rebuilt on each ``add`` — cheap while it
is small) that every query consults together with the main one; ``compact()`` merges it into the main index.
Because a prefix can exist in both, a beam search that carries node ids instead of prefixes carries a *state*
``[B, 2]`` (main node, delta node): see ``state_of`` / ``step_state`` / ``allowed_from_state``. The plain
``node_of`` / ``step`` / ``allowed_from_nodes`` work on the main index alone.

Vocabulary masks: ``token_mask(code_mask, token_ids[level], vocab_size)`` lifts a [B, K] code mask to a
[B, V] token mask (codes whose token is missing, id -1, are dropped).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from sidrec.config import CODEBOOK_SIZE

__all__ = ["SidIndex", "token_mask"]


def _code_dtype(codebook_size: int) -> np.dtype:
    if codebook_size <= 256:
        return np.dtype(np.uint8)
    if codebook_size <= 65536:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


def _row_dtype(n: int) -> np.dtype:
    return np.dtype(np.int32) if n < 2**31 - 1 else np.dtype(np.int64)


def _to_torch(a: np.ndarray, device: torch.device) -> torch.Tensor:
    if a.dtype == np.uint16:  # torch's uint16 lacks most ops; codes fit in int32
        a = a.astype(np.int32)
    return torch.from_numpy(np.ascontiguousarray(a)).to(device)


def _sort_rows(codes: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
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


class SidIndex:
    """Level-wise CSR trie over Semantic IDs; see the module docstring. Build with ``SidIndex.build``."""

    def __init__(self, levels: int, codebook_size: int, offsets: list[np.ndarray],
                 child_codes: list[np.ndarray], item_offsets: np.ndarray | None, item_rows: np.ndarray,
                 item_ids: list[str] | None = None):
        self.levels = int(levels)
        self.codebook_size = int(codebook_size)
        self.offsets = offsets
        self.child_codes = child_codes
        self.item_offsets = item_offsets
        self.item_rows = item_rows
        self.item_ids = item_ids
        self.delta: SidIndex | None = None
        self._delta_codes = np.zeros((0, self.levels), dtype=np.int64)
        self._delta_ids: list[str] = []
        self._cache: dict[torch.device, dict] = {}

    # ------------------------------------------------------------------ build
    @classmethod
    def build(cls, codes: np.ndarray, item_ids: Sequence[str] | None = None,
              codebook_size: int = CODEBOOK_SIZE) -> SidIndex:
        """codes [N, L] ints in [0, codebook_size) -> index. item_ids (len N) are returned by ``items_of``;
        without them ``items_of`` returns row numbers. Fully vectorised (one sort + a few passes)."""
        codes = np.asarray(codes)
        if codes.ndim != 2 or not (np.issubdtype(codes.dtype, np.integer) or codes.size == 0):
            raise ValueError(f"codes must be a 2-D integer array [N, L], got {codes.dtype} {codes.shape}")
        n, L = codes.shape
        if L < 1:
            raise ValueError("SIDs need at least one level")
        K = int(codebook_size)
        if n and (codes.min() < 0 or codes.max() >= K):
            raise ValueError(f"codes must lie in [0, {K}), got [{codes.min()}, {codes.max()}]")
        if item_ids is not None:
            item_ids = list(item_ids)
            if len(item_ids) != n:
                raise ValueError(f"{len(item_ids)} item_ids for {n} SIDs")
        cdt = _code_dtype(K)
        rdt = _row_dtype(n)
        if n == 0:
            offsets = [np.zeros(2, np.int64)] + [np.zeros(1, np.int64) for _ in range(L - 1)]
            child = [np.zeros(0, cdt) for _ in range(L)]
            return cls(L, K, offsets, child, None, np.zeros(0, rdt), item_ids)

        bits = max(int(K - 1).bit_length(), 1)
        order, new_leaf = _sort_rows(codes, bits)
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
            item_offsets = None
        else:
            item_offsets = np.empty(U + 1, dtype=rdt)
            item_offsets[:-1] = leaf_first
            item_offsets[-1] = n
        return cls(L, K, offsets, child, item_offsets, item_rows, item_ids)

    @classmethod
    def from_table(cls, table, codebook_size: int = CODEBOOK_SIZE) -> SidIndex:
        """From a ``sids.parquet`` table (pyarrow: item_id string, codes list<int64>)."""
        n = table.num_rows
        flat = table.column("codes").combine_chunks().flatten().to_numpy()
        codes = flat.reshape(n, -1) if n else np.zeros((0, 1), np.int64)
        return cls.build(codes, table.column("item_id").to_pylist(), codebook_size)

    # ------------------------------------------------------------- properties
    @property
    def n_main_items(self) -> int:
        return int(self.item_rows.size)

    @property
    def n_items(self) -> int:
        return self.n_main_items + int(self._delta_codes.shape[0])

    @property
    def n_sids(self) -> int:
        """Distinct SIDs in the main index."""
        return int(self.child_codes[-1].size)

    def n_nodes(self, depth: int) -> int:
        return 1 if depth == 0 else int(self.child_codes[depth - 1].size)

    def nbytes(self, include_delta: bool = True) -> int:
        """Bytes of the index arrays (item id strings not counted)."""
        arrs = [*self.offsets, *self.child_codes, self.item_rows]
        if self.item_offsets is not None:
            arrs.append(self.item_offsets)
        total = sum(int(a.nbytes) for a in arrs)
        if include_delta and self.delta is not None:
            total += self.delta.nbytes() + int(self._delta_codes.nbytes)
        return total

    def __len__(self) -> int:
        return self.n_items

    def __repr__(self) -> str:
        return (f"SidIndex(levels={self.levels}, K={self.codebook_size}, items={self.n_items}, "
                f"sids={self.n_sids}, delta={self._delta_codes.shape[0]}, bytes={self.nbytes()})")

    # ---------------------------------------------------------- torch queries
    def _t(self, device: torch.device | str | None) -> dict:
        device = torch.device(device) if device is not None else torch.device("cpu")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        t = self._cache.get(device)
        if t is None:
            t = {"offsets": [_to_torch(o, device) for o in self.offsets],
                 "child": [_to_torch(c, device) for c in self.child_codes],
                 "arange": torch.arange(self.codebook_size, device=device)}
            self._cache[device] = t
        return t

    def to(self, device: torch.device | str) -> SidIndex:
        """Copy the trie tensors to ``device`` (cached; queries use their inputs' device). Returns self."""
        self._t(device)
        if self.delta is not None:
            self.delta.to(device)
        return self

    def _search(self, nodes: torch.Tensor, codes: torch.Tensor, depth: int, t: dict) -> torch.Tensor:
        """Child of each depth-``depth`` node with the given code (-1 if node is -1 or no such child)."""
        child = t["child"][depth]
        if child.numel() == 0:
            return torch.full_like(nodes, -1)
        off = t["offsets"][depth]
        valid = nodes >= 0
        safe = nodes.clamp(min=0)
        lo = torch.where(valid, off[safe], 0)
        end = torch.where(valid, off[safe + 1], 0)
        hi = end.clone()
        last = child.numel() - 1
        # lower_bound in child[lo:hi]; segments hold <= K codes, so bit_length(K) halvings suffice
        for _ in range(int(self.codebook_size).bit_length()):
            active = lo < hi
            mid = (lo + hi) >> 1
            less = child[mid.clamp(max=last)].long() < codes
            lo = torch.where(active & less, mid + 1, lo)
            hi = torch.where(active & ~less, mid, hi)
        found = (lo < end) & (child[lo.clamp(max=last)].long() == codes)
        return torch.where(found, lo, torch.full_like(lo, -1))

    def node_of(self, prefixes: torch.Tensor) -> torch.Tensor:
        """prefixes [B, t] codes (t in 0..L) -> node id at depth t [B] (-1 if the prefix is absent).
        Main index only (see ``state_of`` for main + delta)."""
        prefixes = torch.as_tensor(prefixes)
        if prefixes.dim() != 2 or prefixes.shape[1] > self.levels:
            raise ValueError(f"prefixes must be [B, t] with t <= {self.levels}, got {tuple(prefixes.shape)}")
        t = self._t(prefixes.device)
        prefixes = prefixes.long()
        nodes = torch.zeros(prefixes.shape[0], dtype=torch.long, device=prefixes.device)
        for d in range(prefixes.shape[1]):
            nodes = self._search(nodes, prefixes[:, d], d, t)
        return nodes

    def step(self, node_ids: torch.Tensor, codes: torch.Tensor, depth: int) -> torch.Tensor:
        """Depth-``depth`` node ids [B] + chosen codes [B] -> depth+1 node ids (-1 if invalid). Main only."""
        if not 0 <= depth < self.levels:
            raise ValueError(f"depth must be in [0, {self.levels}), got {depth}")
        node_ids = torch.as_tensor(node_ids)
        return self._search(node_ids.long(), torch.as_tensor(codes, device=node_ids.device).long(), depth,
                            self._t(node_ids.device))

    def allowed_from_nodes(self, node_ids: torch.Tensor, depth: int) -> torch.Tensor:
        """Depth-``depth`` node ids [B] -> bool [B, K] mask of their children's codes (all-False for -1).
        Main index only."""
        if not 0 <= depth < self.levels:
            raise ValueError(f"depth must be in [0, {self.levels}), got {depth}")
        node_ids = torch.as_tensor(node_ids).long()
        t = self._t(node_ids.device)
        K = self.codebook_size
        B = node_ids.shape[0]
        mask = torch.zeros(B, K + 1, dtype=torch.bool, device=node_ids.device)
        child = t["child"][depth]
        if child.numel() and B:
            off = t["offsets"][depth]
            valid = node_ids >= 0
            safe = node_ids.clamp(min=0)
            start = off[safe]
            count = torch.where(valid, off[safe + 1] - start, 0)
            ar = t["arange"]
            pos = (start[:, None] + ar[None, :]).clamp(max=child.numel() - 1)
            cols = torch.where(ar[None, :] < count[:, None], child[pos].long(), K)  # K = trash column
            mask.scatter_(1, cols, True)
        return mask[:, :K]

    # main + delta ------------------------------------------------------------
    def state_of(self, prefixes: torch.Tensor) -> torch.Tensor:
        """prefixes [B, t] -> state [B, 2] long: (main node, delta node) at depth t, -1 where absent."""
        prefixes = torch.as_tensor(prefixes)
        main = self.node_of(prefixes)
        delta = self.delta.node_of(prefixes) if self.delta is not None else torch.full_like(main, -1)
        return torch.stack([main, delta], dim=1)

    def step_state(self, state: torch.Tensor, codes: torch.Tensor, depth: int) -> torch.Tensor:
        main = self.step(state[:, 0], codes, depth)
        delta = (self.delta.step(state[:, 1], codes, depth) if self.delta is not None
                 else torch.full_like(main, -1))
        return torch.stack([main, delta], dim=1)

    def allowed_from_state(self, state: torch.Tensor, depth: int) -> torch.Tensor:
        mask = self.allowed_from_nodes(state[:, 0], depth)
        if self.delta is not None:
            mask |= self.delta.allowed_from_nodes(state[:, 1], depth)
        return mask

    def allowed(self, prefixes: torch.Tensor) -> torch.Tensor:
        """prefixes [B, t] codes (t in 0..L-1) -> bool [B, K]: codes that extend each prefix to a stored SID
        prefix (main or delta). Absent prefixes get an all-False row."""
        prefixes = torch.as_tensor(prefixes)
        if prefixes.dim() != 2 or prefixes.shape[1] >= self.levels:
            raise ValueError(f"prefixes must be [B, t] with t < {self.levels}, got {tuple(prefixes.shape)}")
        return self.allowed_from_state(self.state_of(prefixes), prefixes.shape[1])

    def leaf_counts(self, prefixes: np.ndarray) -> np.ndarray:
        """prefixes [M, d] codes -> number of stored SIDs (main + delta) that start with each prefix.
        A depth-d node's leaves are a contiguous range, found by following the offsets down to depth L."""
        prefixes = np.asarray(prefixes, dtype=np.int64)
        node = self.node_of(torch.from_numpy(prefixes)).numpy()
        lo, hi = node.clip(min=0), node.clip(min=0) + 1
        for depth in range(prefixes.shape[1], self.levels):
            lo, hi = self.offsets[depth][lo], self.offsets[depth][hi]
        count = np.where(node >= 0, hi - lo, 0)
        if self.delta is not None:
            count = count + self.delta.leaf_counts(prefixes)
        return count

    # -------------------------------------------------------------- item side
    def _leaf_rows(self, leaf: int) -> np.ndarray:
        if self.item_offsets is None:
            return self.item_rows[leaf:leaf + 1]
        return self.item_rows[self.item_offsets[leaf]:self.item_offsets[leaf + 1]]

    def leaves_of(self, codes: np.ndarray) -> np.ndarray:
        """Full SIDs [M, L] -> main-index leaf ids [M] (-1 if absent)."""
        codes = np.asarray(codes, dtype=np.int64).reshape(-1, self.levels)
        return self.node_of(torch.from_numpy(codes)).numpy()

    def rows_of(self, codes: Sequence[int]) -> list[int]:
        """Rows (0..n_items-1, delta items after the main ones, in add order) of the items with this SID."""
        codes = np.asarray(codes, dtype=np.int64)
        if codes.shape != (self.levels,):
            raise ValueError(f"a full SID has {self.levels} codes, got shape {codes.shape}")
        leaf = int(self.leaves_of(codes[None])[0])
        rows = sorted(int(r) for r in self._leaf_rows(leaf)) if leaf >= 0 else []
        if self.delta is not None:
            rows += [self.n_main_items + r for r in self.delta.rows_of(codes)]
        return rows

    def rows_of_many(self, codes: np.ndarray) -> list[list[int]]:
        """Full SIDs [M, L] -> for each, the rows of its items (as ``rows_of``), with one batched lookup."""
        codes = np.asarray(codes, dtype=np.int64).reshape(-1, self.levels)
        leaves = self.leaves_of(codes)
        out = [sorted(int(r) for r in self._leaf_rows(int(leaf))) if leaf >= 0 else [] for leaf in leaves]
        if self.delta is not None:
            n = self.n_main_items
            for rows, extra in zip(out, self.delta.rows_of_many(codes), strict=True):
                rows += [n + r for r in extra]
        return out

    def all_item_ids(self) -> list[str]:
        """Item id of every row, main part then delta (row numbers as strings when built without ids)."""
        main = self.item_ids if self.item_ids is not None else [str(i) for i in range(self.n_main_items)]
        return [str(i) for i in (*main, *self._delta_ids)]

    def item_of_row(self, row: int):
        """The item id (or the row itself, without ids) of a row from ``rows_of``."""
        if self.item_ids is None:
            return row
        n = self.n_main_items
        return self.item_ids[row] if row < n else self._delta_ids[row - n]

    def items_of(self, codes: Sequence[int]) -> list:
        """Item ids (or rows, when built without ids) of the items whose SID is ``codes`` [L]."""
        rows = self.rows_of(codes)
        if self.item_ids is None:
            return rows
        n = self.n_main_items
        return [self.item_ids[r] if r < n else self._delta_ids[r - n] for r in rows]

    def contains(self, codes: Sequence[int] | np.ndarray) -> bool | np.ndarray:
        """Full SID [L] -> bool, or [M, L] -> bool [M]."""
        arr = np.asarray(codes, dtype=np.int64)
        found = self.leaves_of(arr) >= 0
        if self.delta is not None:
            found |= self.delta.leaves_of(arr) >= 0
        return bool(found[0]) if arr.ndim == 1 else found

    # ------------------------------------------------------------ delta index
    def add(self, codes: np.ndarray, item_ids: Sequence[str] | None = None) -> None:
        """Add cold-start items (codes [M, L]) to the delta index without rebuilding the main one."""
        codes = np.asarray(codes, dtype=np.int64)
        if codes.ndim == 1:
            codes = codes[None]
        if codes.ndim != 2 or codes.shape[1] != self.levels:
            raise ValueError(f"codes must be [M, {self.levels}], got {codes.shape}")
        if (self.item_ids is None) != (item_ids is None):
            raise ValueError("pass item_ids iff the index was built with item_ids")
        if item_ids is not None:
            item_ids = list(item_ids)
            if len(item_ids) != codes.shape[0]:
                raise ValueError(f"{len(item_ids)} item_ids for {codes.shape[0]} SIDs")
        if codes.size and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.codebook_size})")
        all_codes = np.concatenate([self._delta_codes, codes])
        delta = SidIndex.build(all_codes, None, self.codebook_size)
        for dev in self._cache:
            delta.to(dev)
        self._delta_codes = all_codes
        if item_ids is not None:
            self._delta_ids.extend(item_ids)
        self.delta = delta

    def codes(self) -> np.ndarray:
        """All SIDs in row order (main then delta), [n_items, L] int64 — reconstructed from the trie."""
        L = self.levels
        U = self.n_sids
        leaf_codes = np.empty((U, L), dtype=np.int64)
        node = np.arange(U, dtype=np.int64)           # ancestor at depth d+1 of every leaf
        for d in range(L - 1, -1, -1):
            leaf_codes[:, d] = self.child_codes[d][node]
            if d:
                parent = np.repeat(np.arange(self.n_nodes(d), dtype=np.int64), np.diff(self.offsets[d]))
                node = parent[node]
        out = np.empty((self.n_main_items, L), dtype=np.int64)
        if self.item_offsets is None:
            out[self.item_rows] = leaf_codes
        else:
            out[self.item_rows] = np.repeat(leaf_codes, np.diff(self.item_offsets), axis=0)
        return np.concatenate([out, self._delta_codes])

    def compact(self) -> SidIndex:
        """Merge the delta into the main index (a rebuild); rows and results are unchanged. Returns self."""
        if self.delta is None:
            return self
        ids = None if self.item_ids is None else [*self.item_ids, *self._delta_ids]
        new = SidIndex.build(self.codes(), ids, self.codebook_size)
        devices = list(self._cache)
        self.__dict__.update(new.__dict__)
        for dev in devices:
            self._t(dev)
        return self


def token_mask(code_mask: torch.Tensor, token_ids, vocab_size: int, level: int | None = None) -> torch.Tensor:
    """Lift a code mask [B, K] to a vocabulary mask [B, V]: token_ids[k] is the token id of code k at this
    level (-1 if the token does not exist; such codes are never allowed). token_ids may also be the full
    [L, K] table with ``level`` given."""
    tok = torch.as_tensor(token_ids, device=code_mask.device).long()
    if tok.dim() == 2:
        if level is None:
            raise ValueError("token_ids is [L, K]: pass level")
        tok = tok[level]
    B, K = code_mask.shape
    if tok.shape != (K,):
        raise ValueError(f"token_ids must be [{K}] for a [B, {K}] mask, got {tuple(tok.shape)}")
    if tok.device.type == "cpu" and tok.numel() and int(tok.max()) >= vocab_size:  # no sync on GPU
        raise ValueError(f"token id {int(tok.max())} >= vocab_size {vocab_size}")
    cols = torch.where(tok >= 0, tok, vocab_size).expand(B, K)
    out = torch.zeros(B, vocab_size + 1, dtype=torch.bool, device=code_mask.device)
    # only allowed codes write (value True), so the duplicate trash column can't clobber a real one
    out.scatter_(1, torch.where(code_mask, cols, vocab_size), True)
    return out[:, :vocab_size]
