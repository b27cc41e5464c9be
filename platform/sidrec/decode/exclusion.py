"""Per-request exclusions for the constrained beam search: items a request must not get (e.g. its history)
become banned (prefix, code) pairs, so no beam is spent on a branch that can only end in excluded items.

A SID is banned when all its present items are excluded, and a prefix when all the SIDs below it are: each
ban sits at the highest level possible (that is what a trie without those items would allow). Everything
is computed for the whole batch at once (numpy over (request, prefix) rows, one trie lookup per level), so
a request with a 20-item history costs a few vectorised passes, not a trie walk per item.

Two forms of the same bans: ``ban_tables`` (prefix, code) rows, compared with the beams' prefixes by
``ban_bias`` (any index, delta included), and ``banned_nodes``, trie node ids, which the decoder's dense
walk folds into its masks (a main index without a delta, dense at every depth: the usual small catalog).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import numpy as np
import torch

from sidrec.sids.index import SidIndex

__all__ = ["ban_bias", "ban_tables", "banned_nodes"]


def _unique_rows(rows: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``np.unique(rows, axis=0)`` with first indices, inverse and counts, in the same (lexicographic) order;
    on one packed int64 key per row when its fields (each < 2**bits) fit in 62 bits, which is far faster."""
    n, width = rows.shape
    if width * bits > 62:
        uniq, first, inv, count = np.unique(rows, axis=0, return_index=True, return_inverse=True,
                                            return_counts=True)
        return uniq, first, inv.reshape(-1), count
    key = np.zeros(n, dtype=np.int64)
    for col in range(width):
        key = (key << bits) | rows[:, col]
    _, first, inv, count = np.unique(key, return_index=True, return_inverse=True, return_counts=True)
    return rows[first], first, inv.reshape(-1), count


def _fully_excluded(index: SidIndex, codes_of: Mapping[str, tuple[int, ...]],
                    exclude: Sequence[Collection[str]], bits: int) -> np.ndarray:
    """(request, SID) rows [M, 1 + L], distinct, of the SIDs all of whose present items request r excludes."""
    L = index.levels
    pairs = [(r, *codes_of[item]) for r, ex in enumerate(exclude) for item in {str(i) for i in ex}]
    if not pairs:
        return np.zeros((0, 1 + L), dtype=np.int64)
    if index.item_offsets is None and index.delta is None:  # a SID holds one item: every pair qualifies
        return np.asarray(pairs, dtype=np.int64)
    uniq, _, _, n_excluded = _unique_rows(np.asarray(pairs, dtype=np.int64), bits)
    sids, _, which, _ = _unique_rows(uniq[:, 1:], bits)
    n_present = np.array([len(rows) for rows in index.rows_of_many(sids)], dtype=np.int64)
    return uniq[n_excluded >= n_present[which]]


def _sort_rows(rows: np.ndarray, bits: int) -> np.ndarray:
    """rows [M, w] sorted lexicographically (a packed int64 key when the fields fit in 62 bits)."""
    if rows.shape[1] * bits > 62:
        return rows[np.lexsort(rows.T[::-1])]
    key = np.zeros(rows.shape[0], dtype=np.int64)
    for col in range(rows.shape[1]):
        key = (key << bits) | rows[:, col]
    return rows[np.argsort(key)]


def ban_tables(index: SidIndex, codes_of: Mapping[str, tuple[int, ...]], exclude: Sequence[Collection[str]],
               device: torch.device) -> list[torch.Tensor | None]:
    """Per level l, [R, E, l+1] long: the (prefix, code) pairs of request r whose whole subtree is excluded,
    -1-padded (E >= 1), or None where no request bans anything at that level. ``codes_of`` maps every
    present item id to its SID (ids must be present).

    The fully excluded (request, SID) rows are sorted once; every prefix length then groups them by a
    running "prefix changed" flag, and a group is banned when it holds all the live SIDs below its prefix
    (``leaf_counts``) and no shorter prefix of it is banned already."""
    L, R = index.levels, len(exclude)
    bits = max(1, int(index.codebook_size - 1).bit_length(), int(R - 1).bit_length())
    full = _fully_excluded(index, codes_of, exclude, bits)
    M = full.shape[0]
    if not M:
        return [None] * L
    full = _sort_rows(full, bits)
    new = np.ones(M, dtype=bool)                   # row starts a new (request, prefix) group
    new[1:] = full[1:, 0] != full[:-1, 0]
    banned = np.zeros(M, dtype=bool)               # a shorter prefix of this row's SID is banned already
    out: list[torch.Tensor | None] = []
    for d in range(1, L + 1):
        new[1:] |= full[1:, d] != full[:-1, d]
        starts = np.flatnonzero(new)
        count = np.diff(np.append(starts, M))
        pre = full[starts, :1 + d]
        if d == L and index.delta is None:  # a present SID is one live leaf: the group is all of it
            ok = ~banned[starts]
        else:
            ok = (count == index.leaf_counts(pre[:, 1:])) & ~banned[starts]
        banned |= np.repeat(ok, count)
        rows = pre[ok]                             # sorted by request
        if not rows.shape[0]:
            out.append(None)
            continue
        req = rows[:, 0]
        slot = np.arange(req.size) - np.searchsorted(req, req)  # position within its request
        table = np.full((R, int(slot.max()) + 1, d), -1, dtype=np.int64)
        table[req, slot] = rows[:, 1:]
        out.append(torch.from_numpy(table).to(device))
    return out


def _groups(key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first index, size) of each run of equal values of ``key`` in sorted order: ``np.unique``'s
    return_index / return_counts at a fraction of its fixed cost on the few dozen keys of a request."""
    order = np.argsort(key, kind="stable")
    k = key[order]
    starts = np.flatnonzero(np.concatenate(([True], k[1:] != k[:-1])))
    return order[starts], np.diff(np.append(starts, k.size))


def banned_nodes(index: SidIndex, leaf_of: Mapping[str, int], exclude: Sequence[Collection[str]]
                 ) -> list[tuple[np.ndarray, np.ndarray] | None]:
    """The same bans as trie nodes, for a main index without a delta: per depth d = 1..L, (request, node)
    int64 arrays of the depth-d nodes request r must not reach (every SID below them has all its present
    items excluded), or None where there are none. ``leaf_of``: every present item's leaf (SID) id.

    Nodes below a banned node are listed too (harmless: a beam cannot reach them), so no "highest level"
    bookkeeping is needed: each banned leaf is followed up its ancestors, and an ancestor is banned when it
    holds as many banned leaves as live ones."""
    if index.delta is not None:
        raise ValueError("banned_nodes reads the main index only; use ban_tables with a delta index")
    L = index.levels
    out: list[tuple[np.ndarray, np.ndarray] | None] = [None] * L
    pairs = [(r, leaf_of[item]) for r, ex in enumerate(exclude) for item in {str(i) for i in ex}]
    if not pairs:
        return out
    req, node = np.asarray(pairs, dtype=np.int64).T
    if index.item_offsets is not None:  # SIDs shared by several items: banned once all present ones are out
        first, count = _groups(req * index.n_nodes(L) + node)
        ok = count == index.live_items()[node[first]]
        req, node = req[first[ok]], node[first[ok]]
        if not req.size:
            return out
    out[L - 1] = (req, node)
    for d in range(L - 1, 0, -1):
        node = index.parents(d + 1)[node]                            # each banned leaf's depth-d ancestor
        first, count = _groups(req * index.n_nodes(d) + node)
        ok = count == index.live_leaves(d)[node[first]]
        if not ok.any():
            break  # no node at this depth is banned, so none above it is either
        out[d - 1] = (req[first[ok]], node[first[ok]])
    return out


def ban_bias(bias: torch.Tensor, prefix: torch.Tensor, ban: torch.Tensor, R: int, B: int) -> torch.Tensor:
    """An additive mask [R*B, K] (0 / -inf, or any scores) with the banned codes set to -inf: ``ban``
    [R, E, l+1] holds (prefix of length l, code) rows of each request (-1 = padding); ``prefix`` [R*B, l] is
    every beam's codes so far."""
    E, l1 = ban.shape[1], ban.shape[2]
    pre = prefix.view(R, B, 1, l1 - 1)
    hit = (pre == ban[:, None, :, :l1 - 1]).all(-1) & (ban[:, None, :, 0] >= 0)     # [R, B, E]
    code = ban[:, None, :, l1 - 1].expand(R, B, E)
    K = bias.shape[1]
    block = torch.zeros(R, B, K + 1, dtype=bias.dtype, device=bias.device)
    block.scatter_(2, torch.where(hit, code, K), float("-inf"))  # column K: the trash of non-hits
    return bias + block[..., :K].reshape(R * B, K)
