"""Compressed SID index for constrained decoding: a level-by-level CSR trie (idea of STATIC, arXiv 2602.22647).

A SID is a tuple of L codes in [0, K). The distinct length-d prefixes of the stored SIDs are the *nodes* of
depth d, numbered in sorted order; per depth the index keeps ``offsets[d]`` (each node's child range) and
``child_codes[d]`` (each child's code), and the leaves (distinct SIDs) map to item rows through
``item_offsets`` / ``item_rows``: ~12 bytes per item at 10M items. The layout is described in full in
``sidrec.sids.trie_arrays``, which builds it.

Queries run on torch tensors, batched, without Python loops over beams and without host syncs (so they work
on CUDA and inside captured graphs): a node lookup is a fixed-iteration binary search inside each beam's
child segment (a segmented ``searchsorted``), and ``allowed`` gathers up to K children per beam and
scatters them into a [B, K] mask. Depths with few nodes also have dense tables (``dense_tables``, built
on first use per device, rebuilt after a retire): one row lookup gives a beam's allowed codes and children.

Cold-start items go to a small *delta* index (itself a SidIndex, rebuilt on each ``add`` — cheap while it
is small) that every query consults together with the main one; ``compact()`` merges it into the main index.
Because a prefix can exist in both, a beam search that carries node ids instead of prefixes carries a *state*
``[B, 2]`` (main node, delta node): see ``state_of`` / ``step_state`` / ``allowed_from_state``. The plain
``node_of`` / ``step`` / ``allowed_from_nodes`` work on the main index alone.

Retired items (``remove`` by id, ``remove_rows``) are tombstoned, in the main index and in the delta alike:
every query skips them, and a node whose items are all retired is absent from ``allowed*`` / ``node_of`` /
``contains`` / ``leaf_counts``, so a constrained search never reaches a retired item. Row numbers stay put
until ``compact()``, which drops the retired rows. Retiring and re-adding are idempotent (log replay).

Vocabulary masks: ``token_mask(code_mask, token_ids[level], vocab_size)`` lifts a [B, K] code mask to a
[B, V] token mask (codes whose token is missing, id -1, are dropped).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

from sidrec.config import CODEBOOK_SIZE
from sidrec.sids.trie_arrays import Liveness, build_arrays, check_codes, leaf_of_rows, leaf_range, row_codes
from sidrec.sids.trie_tables import dense_pair, segment_mask, segment_search, walk_tables

__all__ = ["SidIndex", "token_mask"]


def _to_torch(a: np.ndarray, device: torch.device) -> torch.Tensor:
    if a.dtype == np.uint16:  # torch's uint16 lacks most ops; codes fit in int32
        a = a.astype(np.int32)
    return torch.from_numpy(np.ascontiguousarray(a)).to(device)


class SidIndex:
    """Level-wise CSR trie over Semantic IDs; see the module docstring. Build with ``SidIndex.build``."""

    dense_max_entries = 1 << 22  # cells of the largest ``dense_tables`` pair (32 MiB: int32 + float32)

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
        self._live: Liveness | None = None              # tombstones of the main rows, from the first retire
        self._row_of_id: dict[str, int] | None = None   # str(item id) -> its present row (built lazily)
        self._version = 0
        self._np_cache: dict[tuple, tuple[int, np.ndarray]] = {}  # _memo: parents, live_leaves, ...

    # ------------------------------------------------------------------ build
    @classmethod
    def build(cls, codes: np.ndarray, item_ids: Sequence[str] | None = None,
              codebook_size: int = CODEBOOK_SIZE) -> SidIndex:
        """codes [N, L] ints in [0, codebook_size) -> index. item_ids (len N) are returned by ``items_of``;
        without them ``items_of`` returns row numbers. Fully vectorised (one sort + a few passes)."""
        K = int(codebook_size)
        codes = check_codes(codes, K)
        n, L = codes.shape
        if item_ids is not None:
            item_ids = list(item_ids)
            if len(item_ids) != n:
                raise ValueError(f"{len(item_ids)} item_ids for {n} SIDs")
        offsets, child, item_offsets, item_rows = build_arrays(codes, K)
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
    def n_main_rows(self) -> int:
        """Rows of the main part, retired ones included: delta rows are numbered from here."""
        return int(self.item_rows.size)

    @property
    def n_rows(self) -> int:
        """Every row number handed out so far (main + delta, retired included): rows lie in [0, n_rows)."""
        return self.n_main_rows + int(self._delta_codes.shape[0])

    @property
    def n_main_items(self) -> int:
        """Present (not retired) items of the main part."""
        return self.n_main_rows - (0 if self._live is None else self._live.n_dead)

    @property
    def n_items(self) -> int:
        """Present items, main + delta (retired ones are not counted)."""
        return self.n_main_items + (self.delta.n_items if self.delta is not None else 0)

    @property
    def n_sids(self) -> int:
        """Distinct SIDs of the main index that still hold a present item."""
        return int(self.child_codes[-1].size) if self._live is None else self._live.n_live_leaves

    @property
    def version(self) -> int:
        """Bumped by every change (add, a remove that retired something, compact), so a caller caching
        derived views (item -> codes maps, masks) can tell they are stale even when ``n_items`` is equal."""
        return self._version

    def n_nodes(self, depth: int) -> int:
        """Nodes stored at ``depth``, including those whose items were all retired (until ``compact``)."""
        return 1 if depth == 0 else int(self.child_codes[depth - 1].size)

    def nbytes(self, include_delta: bool = True) -> int:
        """Bytes of the index arrays (item id strings not counted)."""
        arrs = [*self.offsets, *self.child_codes, self.item_rows]
        if self.item_offsets is not None:
            arrs.append(self.item_offsets)
        total = sum(int(a.nbytes) for a in arrs) + (self._live.nbytes() if self._live is not None else 0)
        if include_delta and self.delta is not None:
            total += self.delta.nbytes() + int(self._delta_codes.nbytes)
        return total

    def __len__(self) -> int:
        return self.n_items

    def __repr__(self) -> str:
        return (f"SidIndex(levels={self.levels}, K={self.codebook_size}, items={self.n_items}, "
                f"sids={self.n_sids}, delta={self._delta_codes.shape[0]}, retired={self.n_rows - self.n_items}, "
                f"bytes={self.nbytes()})")

    # ---------------------------------------------------------- torch queries
    def _t(self, device: torch.device | str | None) -> dict:
        device = torch.device(device) if device is not None else torch.device("cpu")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        t = self._cache.get(device)
        if t is None:
            t = {"offsets": [_to_torch(o, device) for o in self.offsets],
                 "child": [_to_torch(c, device) for c in self.child_codes],
                 "arange": torch.arange(self.codebook_size, device=device),
                 "alive": None if self._live is None else [_to_torch(a, device) for a in self._live.alive]}
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
        dense = self._dense(depth, t)
        if dense is not None:  # one lookup (-1 -> the sentinel row); codes outside [0, K) have no child
            K, m = self.codebook_size, self.n_nodes(depth + 1)
            child = dense[0][nodes.remainder(dense[0].shape[0]), codes.clamp(0, K - 1)].long()
            return torch.where((codes >= 0) & (codes < K) & (child < m), child, -1)
        alive = None if t["alive"] is None else t["alive"][depth]
        return segment_search(t["offsets"][depth], t["child"][depth], alive, nodes, codes, self.codebook_size)

    def node_of(self, prefixes: torch.Tensor) -> torch.Tensor:
        """prefixes [B, t] codes (t in 0..L) -> node id at depth t [B] (-1 if the prefix is absent).
        Main index only (see ``state_of`` for main + delta)."""
        prefixes = torch.as_tensor(prefixes)
        if prefixes.dim() != 2 or prefixes.shape[1] > self.levels:
            raise ValueError(f"prefixes must be [B, t] with t <= {self.levels}, got {tuple(prefixes.shape)}")
        t = self._t(prefixes.device)
        if prefixes.device.type == "cpu":
            nodes = self._node_of_numpy(prefixes.numpy())
            if nodes is not None:
                return torch.from_numpy(nodes)
        prefixes = prefixes.long()
        nodes = torch.zeros(prefixes.shape[0], dtype=torch.long, device=prefixes.device)
        for d in range(prefixes.shape[1]):
            nodes = self._search(nodes, prefixes[:, d], d, t)
        return nodes

    def _node_of_numpy(self, prefixes: np.ndarray) -> np.ndarray | None:
        """``node_of`` in numpy through the CPU dense tables (~1 us a lookup, not ~5), None where a depth
        has none."""
        t = self._t(None)
        dense = [self._dense_numpy(d, t) for d in range(prefixes.shape[1])]
        return None if any(d is None for d in dense) else walk_tables(dense, prefixes, self.codebook_size)

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
        alive = None if t["alive"] is None else t["alive"][depth]
        return segment_mask(t["offsets"][depth], t["child"][depth], alive, node_ids, t["arange"])

    def dense_tables(self, depth: int, device: torch.device | str | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Depth ``depth`` as dense [n_d + 1, K] tables (``sidrec.sids.trie_tables``): int32 child ids, absent
        = n_{d+1}, and a float32 additive mask, 0 where a child exists, -inf where not (``allowed_from_nodes``
        of every node; bool masks are slow CPU ops). None above ``dense_max_entries``. Main index only."""
        if not 0 <= depth < self.levels:
            raise ValueError(f"depth must be in [0, {self.levels}), got {depth}")
        return self._dense(depth, self._t(device))

    def _dense(self, depth: int, t: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
        if (self.n_nodes(depth) + 1) * self.codebook_size > self.dense_max_entries:
            return None
        alive, tables = t["alive"], t.setdefault("dense", {})
        hit = tables.get(depth)
        if hit is None or hit[0] is not alive:  # a retire replaces t["alive"]: the table is stale
            mask = None if self._live is None else self._live.alive[depth]
            pair = dense_pair(self.offsets[depth], self.child_codes[depth], mask, self.codebook_size, t["arange"].device)
            # the child table as numpy too (CPU: a view), for lookups without tensor-op dispatch
            hit = tables[depth] = (alive, pair, pair[0].numpy() if pair[0].device.type == "cpu" else None)
        return hit[1]

    def _dense_numpy(self, depth: int, t: dict) -> np.ndarray | None:
        """``_dense``'s child table as numpy (CPU tables only), or None."""
        return None if self._dense(depth, t) is None else t["dense"][depth][2]

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

    def parents(self, depth: int) -> np.ndarray:
        """[n_depth] int64: the depth-(depth-1) parent of every depth-``depth`` node (depth >= 1). Main only."""
        if not 1 <= depth <= self.levels:
            raise ValueError(f"depth must be in [1, {self.levels}], got {depth}")
        off = self.offsets[depth - 1]  # the trie's shape changes only on compact / rebuild (a new index)
        return self._memo(("parents", depth), lambda: np.repeat(np.arange(off.size - 1, dtype=np.int64), np.diff(off)))

    def live_leaves(self, depth: int) -> np.ndarray:
        """[n_depth] int64: SIDs with a present item below every depth-``depth`` node. Main only."""
        def build() -> np.ndarray:
            lo, hi = leaf_range(self.offsets, np.arange(self.n_nodes(depth), dtype=np.int64), depth)
            return hi - lo if self._live is None else self._live.leaf_cum[hi] - self._live.leaf_cum[lo]
        return self._memo(("live_leaves", depth), build, self._version)

    def row_leaves(self) -> np.ndarray:
        """[n_main_rows] int64: the main-index leaf (SID) of every main row, retired ones included."""
        if self._live is not None:
            return self._live.row_leaf
        return self._memo(("row_leaves",), lambda: leaf_of_rows(self.item_offsets, self.item_rows))

    def live_items(self) -> np.ndarray:
        """[n_leaves] int64: present items under every main-index leaf (1 per SID under dedup)."""
        if self._live is not None:
            return self._live.leaf_live
        n = self.n_nodes(self.levels)
        return self._memo(("live_items",), lambda: np.ones(n, dtype=np.int64) if self.item_offsets is None
                          else np.diff(self.item_offsets).astype(np.int64))

    def _memo(self, key: tuple, build, version: int = 0) -> np.ndarray:
        """``build()``, cached under ``key`` until ``version`` changes (0: for the life of the index)."""
        hit = self._np_cache.get(key)
        if hit is None or hit[0] != version:
            hit = self._np_cache[key] = (version, build())
        return hit[1]

    def leaf_counts(self, prefixes: np.ndarray) -> np.ndarray:
        """prefixes [M, d] codes -> number of stored SIDs with a present item (main + delta, each counted
        in both when in both) that start with each prefix: the size of the node's leaf range, or after
        removals its count of live leaves (a difference of their cumulative sum)."""
        prefixes = np.asarray(prefixes, dtype=np.int64)
        node = self._node_of_numpy(prefixes)
        if node is None:
            node = self.node_of(torch.from_numpy(prefixes)).numpy()
        count = np.zeros(node.shape, dtype=np.int64)   # absent prefixes (-1) count 0
        lo, hi = leaf_range(self.offsets, node[node >= 0], prefixes.shape[1])
        count[node >= 0] = hi - lo if self._live is None else self._live.leaf_cum[hi] - self._live.leaf_cum[lo]
        if self.delta is not None:
            count = count + self.delta.leaf_counts(prefixes)
        return count

    # -------------------------------------------------------------- item side
    def _leaf_rows(self, leaf: int) -> np.ndarray:
        if self.item_offsets is None:
            rows = self.item_rows[leaf:leaf + 1]
        else:
            rows = self.item_rows[self.item_offsets[leaf]:self.item_offsets[leaf + 1]]
        return rows if self._live is None else rows[~self._live.dead[rows]]

    def leaves_of(self, codes: np.ndarray) -> np.ndarray:
        """Full SIDs [M, L] -> main-index leaf ids [M] (-1 if absent or all its items are retired)."""
        codes = np.asarray(codes, dtype=np.int64).reshape(-1, self.levels)
        nodes = self._node_of_numpy(codes)
        return self.node_of(torch.from_numpy(codes)).numpy() if nodes is None else nodes

    def rows_of(self, codes: Sequence[int]) -> list[int]:
        """Rows (0..n_rows-1, delta items after the main ones, in add order) of the present items with this
        SID. Row numbers are stable until ``compact``; retired rows are never returned."""
        codes = np.asarray(codes, dtype=np.int64)
        if codes.shape != (self.levels,):
            raise ValueError(f"a full SID has {self.levels} codes, got shape {codes.shape}")
        return self.rows_of_many(codes[None])[0]

    def rows_of_many(self, codes: np.ndarray) -> list[list[int]]:
        """Full SIDs [M, L] -> for each, the rows of its items (as ``rows_of``), with one batched lookup."""
        codes = np.asarray(codes, dtype=np.int64).reshape(-1, self.levels)
        return self.rows_of_state(self.state_of(torch.from_numpy(codes)).numpy())

    def rows_of_state(self, state: np.ndarray) -> list[list[int]]:
        """Leaf states [M, 2] (main, delta leaf; -1 = absent) -> each one's present rows, as ``rows_of_many``."""
        state = np.asarray(state, dtype=np.int64).reshape(-1, 2)
        if self.delta is None and self._live is None and self.item_offsets is None and self.item_rows.size:
            rows = self.item_rows[np.maximum(state[:, 0], 0)].tolist()  # one row per leaf
            return [[r] if leaf >= 0 else [] for leaf, r in zip(state[:, 0].tolist(), rows, strict=True)]
        parts = list(zip([self, self.delta], [0, self.n_main_rows], strict=True))[:1 + (self.delta is not None)]
        return [sorted(n + int(r) for (part, n), leaf in zip(parts, s, strict=False) if leaf >= 0
                       for r in part._leaf_rows(leaf)) for s in state.tolist()]

    def live_rows(self) -> np.ndarray:
        """Rows of the present items, ascending (main then delta) [n_items] int64."""
        keep = np.ones(self.n_rows, dtype=bool)
        keep[self.removed_rows()] = False
        return np.flatnonzero(keep)

    def all_item_ids(self) -> list[str]:
        """Item id of every present item in row order, main part then delta (row numbers as strings when
        built without ids); aligned with ``codes()``."""
        if self.item_ids is None:
            return [str(r) for r in self.live_rows().tolist()]
        ids = [*self.item_ids, *self._delta_ids]
        if self.n_items == len(ids):
            return [str(i) for i in ids]
        return [str(ids[r]) for r in self.live_rows().tolist()]

    def item_of_row(self, row: int):
        """The item id (or the row itself, without ids) of a row from ``rows_of``."""
        if self.item_ids is None:
            return row
        n = self.n_main_rows
        return self.item_ids[row] if row < n else self._delta_ids[row - n]

    def items_of(self, codes: Sequence[int]) -> list:
        """Item ids (or rows, when built without ids) of the present items whose SID is ``codes`` [L]."""
        rows = self.rows_of(codes)
        return rows if self.item_ids is None else [self.item_of_row(r) for r in rows]

    def contains(self, codes: Sequence[int] | np.ndarray) -> bool | np.ndarray:
        """Full SID [L] -> bool, or [M, L] -> bool [M]: whether a present item has this SID."""
        arr = np.asarray(codes, dtype=np.int64)
        found = self.leaves_of(arr) >= 0
        if self.delta is not None:
            found |= self.delta.leaves_of(arr) >= 0
        return bool(found[0]) if arr.ndim == 1 else found

    def codes(self) -> np.ndarray:
        """The SIDs of the present items in row order (main then delta), [n_items, L] int64 — reconstructed
        from the trie; aligned with ``all_item_ids()``."""
        out = row_codes(self.offsets, self.child_codes, self.item_offsets, self.item_rows)
        if self._live is not None:
            out = out[~self._live.dead]
        if self.delta is None:
            return out
        return np.concatenate([out, self._delta_codes[self.delta.live_rows()]])

    # ------------------------------------------------------------ delta index
    def add(self, codes: np.ndarray, item_ids: Sequence[str] | None = None) -> None:
        """Add cold-start items (codes [M, L]) to the delta index without rebuilding the main one.

        With item ids this is an upsert: an id that is present already is retired first, so re-adding an
        item (e.g. replaying a catalog log) leaves it present once, and adding it with other codes moves it
        (its row number changes). Ids must be unique within one call. Cost: a rebuild of the delta, plus,
        the first time, an O(N) map of ids to rows."""
        codes = check_codes(np.asarray(codes, dtype=np.int64), self.codebook_size, self.levels)
        if (self.item_ids is None) != (item_ids is None):
            raise ValueError("pass item_ids iff the index was built with item_ids")
        if item_ids is not None:
            item_ids = list(item_ids)
            if len(item_ids) != codes.shape[0]:
                raise ValueError(f"{len(item_ids)} item_ids for {codes.shape[0]} SIDs")
            if len({str(i) for i in item_ids}) != len(item_ids):
                raise ValueError("item_ids repeat within one add")
        first = self.n_rows
        if item_ids is not None:
            self.remove(item_ids)
        all_codes = np.concatenate([self._delta_codes, codes])
        delta = SidIndex.build(all_codes, None, self.codebook_size)
        if self.delta is not None:
            delta.remove_rows(self.delta.removed_rows())
        for dev in self._cache:
            delta.to(dev)
        self._delta_codes = all_codes
        if item_ids is not None:
            self._delta_ids.extend(item_ids)
            ids = self._ids_to_rows()
            for k, item in enumerate(item_ids):
                ids[str(item)] = first + k
        self.delta = delta
        self._version += 1

    def compact(self) -> SidIndex:
        """Merge the delta into the main index and drop retired items (a rebuild). Results by item id are
        unchanged; rows are renumbered 0..n_items-1 in their old order (unchanged when nothing was retired).
        Returns self."""
        if self.delta is None and self.n_items == self.n_rows:
            return self
        live = self.live_rows().tolist()
        ids = None if self.item_ids is None else [self.item_of_row(r) for r in live]
        new = SidIndex.build(self.codes(), ids, self.codebook_size)
        devices, version = list(self._cache), self._version + 1
        self.__dict__.update(new.__dict__)
        self._version = version
        for dev in devices:
            self._t(dev)
        return self

    # ------------------------------------------------------------------ retire
    def remove(self, item_ids: Iterable[str] | str, strict: bool = False) -> int:
        """Retire items by id (main or delta): they are never returned again, and a SID or prefix left
        without a present item is no longer allowed, so a constrained search cannot reach it. A SID shared
        with a present item (the ``keep`` policy) stays, holding the others. Returns the rows retired.

        Idempotent, as a catalog-change log replay needs: an id that is not present (never added, retired
        already, or dropped by ``compact``) is ignored, unless ``strict`` (KeyError naming them). ``add``
        makes a retired id present again. Cost: O(m) id lookups + ``remove_rows``; the first call also builds
        an O(N) id -> row map (ids must be unique among present items)."""
        if self.item_ids is None:
            raise ValueError("this index was built without item_ids: retire rows with remove_rows")
        ids = list(dict.fromkeys(str(i) for i in ([item_ids] if isinstance(item_ids, str) else item_ids)))
        by_id = self._ids_to_rows()
        rows = [by_id[i] for i in ids if i in by_id]
        if strict and len(rows) != len(ids):
            raise KeyError(f"item ids not present: {[i for i in ids if i not in by_id][:10]}")
        return self.remove_rows(rows)

    def remove_rows(self, rows: Sequence[int] | np.ndarray) -> int:
        """Retire items by row number (from ``rows_of`` / ``items_of`` without ids; see ``remove``). Rows
        retired already are ignored; a row outside [0, n_rows) raises IndexError. Returns the rows retired.

        Cost for m rows of an index with N main rows: O(m + leaves + nodes) numpy on the tombstones (the
        first retire also allocates them, O(N)), a re-upload of the node masks (1 byte a node) to every
        device holding the index, and the same for the delta if rows fall in it. No sort, no trie rebuild."""
        rows = np.unique(np.asarray(rows, dtype=np.int64).reshape(-1))
        if rows.size and (rows[0] < 0 or rows[-1] >= self.n_rows):
            raise IndexError(f"rows must lie in [0, {self.n_rows}), got [{rows[0]}, {rows[-1]}]")
        retired = self._retire(rows)
        if retired.size:
            self._version += 1
            if self._row_of_id is not None:
                for r in retired.tolist():
                    self._row_of_id.pop(str(self.item_of_row(r)), None)
        return int(retired.size)

    def removed_rows(self) -> np.ndarray:
        """Rows retired since the last ``compact``, ascending (main then delta) int64."""
        n = self.n_main_rows
        main = np.zeros(0, np.int64) if self._live is None else np.flatnonzero(self._live.dead)
        if self.delta is None:
            return main
        return np.concatenate([main, n + self.delta.removed_rows()])

    def _retire(self, rows: np.ndarray) -> np.ndarray:
        """Tombstone distinct in-range rows (the delta's in the delta), refresh the node masks on every
        device that holds them; returns the rows that were present."""
        n = self.n_main_rows
        main, extra = rows[rows < n], rows[rows >= n] - n
        fresh = np.zeros(0, np.int64)
        if main.size:
            if self._live is None:
                self._live = Liveness(self.offsets, self.item_offsets, self.item_rows)
            fresh = self._live.retire(main)
            if fresh.size:
                for dev, t in self._cache.items():
                    t["alive"] = [_to_torch(a, dev) for a in self._live.alive]
        if extra.size and self.delta is not None:
            fresh = np.concatenate([fresh, n + self.delta._retire(extra)])
        return fresh

    def _ids_to_rows(self) -> dict[str, int]:
        """str(item id) -> row of the present item with it; built on first use, then kept up to date."""
        if self._row_of_id is None:
            live = self.live_rows().tolist()
            by_id = {str(self.item_of_row(r)): r for r in live}
            if len(by_id) != len(live):
                raise ValueError("item ids repeat among present items: retire/upsert by id needs unique ids")
            self._row_of_id = by_id
        return self._row_of_id


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
