"""The decoder's trie access: dense table rows agree with the CSR queries through retires, adds and
compaction; the batched exclusion bans agree with a per-request brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from sidrec.decode.exclusion import ban_tables, banned_nodes
from sidrec.sids.index import SidIndex


def _codes(seed: int, n: int, L: int, K: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, K, size=(n, L))
    codes[rng.integers(0, n, size=n // 5)] = codes[rng.integers(0, n, size=n // 5)]  # shared SIDs
    return codes


def _all_prefixes(K: int, t: int) -> np.ndarray:
    return np.array(list(itertools.product(range(K), repeat=t)), dtype=np.int64).reshape(K**t, t)


def _parts(index: SidIndex) -> list[SidIndex]:
    return [index] + ([index.delta] if index.delta is not None else [])


def _check_tables(index: SidIndex, ref: SidIndex) -> None:
    """Every node's table row = the CSR trie's allowed_from_nodes, its entries = step, at every depth, main
    and delta (``ref``: the same index with dense tables off, so the same node ids)."""
    for part, csr in zip(_parts(index), _parts(ref), strict=True):
        for d in range(part.levels):
            table, bias = part.dense_tables(d)
            ok = bias == 0
            n, m = part.n_nodes(d), part.n_nodes(d + 1)
            assert table.shape == bias.shape == (n + 1, part.codebook_size) and table.dtype == torch.int32
            assert ((bias == 0) | (bias == float("-inf"))).all() and bias.dtype == torch.float32
            assert (table[n] == m).all() and not ok[n].any()  # the sentinel row: an absent node
            nodes = torch.arange(-1, n)
            rows = table[nodes]  # -1 reads the sentinel row
            np.testing.assert_array_equal(ok[nodes].numpy(), csr.allowed_from_nodes(nodes, d).numpy())
            np.testing.assert_array_equal((rows < m).numpy(), ok[nodes].numpy())
            for k in range(part.codebook_size):
                ks = torch.full_like(nodes, k)
                want = csr.step(nodes, ks, d).numpy()
                np.testing.assert_array_equal(np.where(want < 0, m, want), rows[:, k].numpy())
                np.testing.assert_array_equal(part.step(nodes, ks, d).numpy(), want)  # the dense step


def _csr(index: SidIndex) -> SidIndex:
    """The same index with dense tables off (what allowed_from_nodes / step answer from the CSR trie)."""
    for part in _parts(index):
        part.dense_max_entries = 0
    return index


@pytest.mark.parametrize(("seed", "L", "K"), [(0, 2, 4), (1, 3, 8), (2, 4, 5)])
def test_dense_tables_track_retires_adds_and_compact(seed, L, K):
    n = 60
    codes = _codes(seed, n, L, K)
    ids = [f"i{r}" for r in range(n)]
    index = SidIndex.build(codes[:40], ids[:40], codebook_size=K)
    ref = _csr(SidIndex.build(codes[:40], ids[:40], codebook_size=K))
    _check_tables(index, ref)  # cached now: the changes below must refresh it
    steps = [lambda x: x.remove(ids[:40:3]), lambda x: x.add(codes[40:], ids[40:]), lambda x: x.remove(ids[41::4]),
             lambda x: x.remove(ids[::2]), lambda x: x.compact(), lambda x: x.remove(ids)]
    for change in steps:
        change(index)
        change(ref)
        _csr(ref)
        _check_tables(index, ref)
        for t in range(L):
            pre = torch.from_numpy(_all_prefixes(K, t))
            np.testing.assert_array_equal(index.allowed(pre).numpy(), ref.allowed(pre).numpy())
            np.testing.assert_array_equal(index.state_of(pre).numpy(), ref.state_of(pre).numpy())
        full = _all_prefixes(K, L)
        assert index.rows_of_many(full) == ref.rows_of_many(full)
        np.testing.assert_array_equal(index.leaf_counts(full[:, :1]), ref.leaf_counts(full[:, :1]))


def test_dense_tables_size_limit_and_bad_depth():
    index = SidIndex.build(np.array([[0, 1], [1, 0]]), ["a", "b"], codebook_size=4)
    assert index.dense_tables(0)[0].tolist() == [[0, 1, 2, 2], [2] * 4]  # 2 depth-1 nodes: 2 = absent
    # every depth dense on the CPU: node_of is numpy lookups; codes outside [0, K) are absent
    assert index.node_of(torch.tensor([[1, 0], [1, 1], [5, 0], [-1, 1], [0, 4]])).tolist() == [1, -1, -1, -1, -1]
    index.dense_max_entries = 8  # root table (2 x 4) fits, depth 1 (3 x 4) does not
    assert index.dense_tables(0) is not None and index.dense_tables(1) is None
    assert index.node_of(torch.tensor([[1, 0], [1, 1], [5, 0]])).tolist() == [1, -1, -1]
    with pytest.raises(ValueError, match="depth"):
        index.dense_tables(2)


def _brute_bans(index: SidIndex, codes_of: dict, exclude: list[set[str]]) -> list[set[tuple]]:
    """Per level, the set of (request, prefix..., code) bans the old per-request loop produced."""
    L = index.levels
    out: list[set[tuple]] = [set() for _ in range(L)]
    for r, ex in enumerate(exclude):
        sids = {codes_of[i] for i in ex if set(map(str, index.items_of(codes_of[i]))) <= ex}
        done: set[tuple] = set()
        for d in range(1, L + 1):
            for p in sorted({s[:d] for s in sids}):
                under = sum(1 for s in sids if s[:d] == p)
                if under == index.leaf_counts(np.array([p]))[0] and not any(p[:j] in done for j in range(1, d)):
                    out[d - 1].add((r, *p))
                    done.add(p)
    return out


@pytest.mark.parametrize(("seed", "K", "dedup"), [(0, 4, False), (1, 4, False), (2, 4, False),
                                                 (3, 70_000, False), (4, 4, True), (5, 8, True)])
def test_ban_tables_match_brute_force(seed, K, dedup):
    """70K codes: rows too wide to pack into one key; dedup: unique SIDs and no delta (the fast path)."""
    rng = np.random.default_rng(seed)
    L, n = 3, 50
    codes = _codes(seed, n, L, K)
    if dedup:
        codes = np.unique(codes, axis=0)
        n = len(codes)
    ids = [f"i{r}" for r in range(n)]
    index = SidIndex.build(codes[:40], ids[:40], codebook_size=K)
    if dedup:
        assert index.item_offsets is None
    else:
        index.add(codes[40:], ids[40:])
    index.remove(ids[::7])
    codes_of = {i: tuple(int(c) for c in row) for i, row in zip(index.all_item_ids(), index.codes(), strict=True)}
    present = sorted(codes_of)
    exclude = [set(rng.choice(present, size=s, replace=False).tolist()) for s in (0, 3, 20, len(present))]
    tables = ban_tables(index, codes_of, exclude, torch.device("cpu"))
    for d, (table, want) in enumerate(zip(tables, _brute_bans(index, codes_of, exclude), strict=True)):
        if table is None:  # no ban at this level
            assert not want, d
            continue
        assert table.shape[0] == len(exclude) and table.shape[2] == d + 1
        got = {(r, *row) for r in range(len(exclude)) for row in table[r].tolist() if row[0] >= 0}
        assert got == want, d
    assert ban_tables(index, codes_of, [set(), set()], torch.device("cpu")) == [None] * L


@pytest.mark.parametrize(("seed", "K", "dedup"), [(0, 4, False), (1, 4, False), (4, 4, True), (5, 8, True)])
def test_banned_nodes_are_every_fully_excluded_subtree(seed, K, dedup):
    """The dense walk's bans: per depth, every node all of whose present SIDs have only excluded items,
    with retired items in the index and (without dedup) SIDs shared by several items."""
    rng = np.random.default_rng(seed)
    codes = _codes(seed, 50, 3, K)
    if dedup:
        codes = np.unique(codes, axis=0)
    ids = [f"i{r}" for r in range(len(codes))]
    index = SidIndex.build(codes, ids, codebook_size=K)
    index.remove(ids[::7])
    codes_of = {i: tuple(int(c) for c in row) for i, row in zip(index.all_item_ids(), index.codes(), strict=True)}
    present = sorted(codes_of)
    exclude = [set(rng.choice(present, size=s, replace=False).tolist()) for s in (0, 3, 20, len(present))]
    leaf_of = dict(zip(index.all_item_ids(), index.row_leaves()[index.live_rows()].tolist(), strict=True))
    assert all(leaf_of[i] == index.leaves_of(np.array([c]))[0] for i, c in codes_of.items())
    got = banned_nodes(index, leaf_of, exclude)
    sids = set(codes_of.values())
    for d in range(1, 4):
        want = set()
        for r, ex in enumerate(exclude):
            dead = {s for s in sids if set(map(str, index.items_of(s))) <= ex}
            for p in {s[:d] for s in sids}:
                if all(s in dead for s in sids if s[:d] == p):
                    want.add((r, int(index.node_of(torch.tensor([p]))[0])))
        have = set() if got[d - 1] is None else set(zip(*(a.tolist() for a in got[d - 1]), strict=True))
        assert have == want, d
    assert any(got) and banned_nodes(index, leaf_of, [set(), set()]) == [None] * 3
    index.add(codes[:1], ids[:1])
    with pytest.raises(ValueError, match="ban_tables"):
        banned_nodes(index, leaf_of, exclude)
