"""SidIndex against brute force over Python sets, every prefix of small random SID sets."""

from __future__ import annotations

import itertools
from collections import defaultdict

import numpy as np
import pytest
import torch

from sidrec.sids.index import SidIndex, token_mask

CASES = [(seed, L, K, n) for seed in range(3) for L in (2, 3, 4) for K, n in ((4, 12), (8, 40))]


def random_sids(seed: int, L: int, K: int, n: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, K, size=(n, L))
    # force some "keep" collisions: copy a few rows
    dup = rng.integers(0, n, size=max(n // 5, 1))
    codes[rng.integers(0, n, size=dup.size)] = codes[dup]
    return codes


def brute(codes: np.ndarray, ids: list[str]):
    prefixes: dict[tuple, set[int]] = defaultdict(set)
    items: dict[tuple, list[str]] = defaultdict(list)
    for row, c in enumerate(codes.tolist()):
        for t in range(len(c)):
            prefixes[tuple(c[:t])].add(c[t])
        items[tuple(c)].append(ids[row])
    return prefixes, items


def all_prefixes(K: int, t: int) -> np.ndarray:
    if t == 0:
        return np.zeros((1, 0), dtype=np.int64)
    return np.array(list(itertools.product(range(K), repeat=t)), dtype=np.int64)


def check_index(index: SidIndex, codes: np.ndarray, ids: list[str], K: int) -> None:
    L = codes.shape[1]
    prefixes, items = brute(codes, ids)
    for t in range(L):
        pre = all_prefixes(K, t)
        mask = index.allowed(torch.from_numpy(pre))
        assert mask.shape == (len(pre), K) and mask.dtype == torch.bool
        expect = np.zeros((len(pre), K), dtype=bool)
        for i, p in enumerate(pre.tolist()):
            for c in prefixes.get(tuple(p), ()):
                expect[i, c] = True
        np.testing.assert_array_equal(mask.numpy(), expect, err_msg=f"t={t}")
    full = all_prefixes(K, L)
    contained = index.contains(full)
    for i, sid in enumerate(full.tolist()):
        want = sorted(items.get(tuple(sid), []))
        assert sorted(index.items_of(sid)) == want, sid
        assert contained[i] == bool(want)
        assert index.contains(sid) == bool(want)


@pytest.mark.parametrize("seed,L,K,n", CASES)
def test_allowed_and_items_match_brute_force(seed, L, K, n):
    codes = random_sids(seed, L, K, n)
    ids = [f"item{i}" for i in range(n)]
    index = SidIndex.build(codes, ids, codebook_size=K)
    assert index.n_items == n
    assert index.n_sids == len({tuple(c) for c in codes.tolist()})
    check_index(index, codes, ids, K)
    np.testing.assert_array_equal(index.codes(), codes)


@pytest.mark.parametrize("seed,L,K,n", CASES[::3])
def test_add_and_compact(seed, L, K, n):
    codes = random_sids(seed, L, K, n)
    ids = [f"item{i}" for i in range(n)]
    index = SidIndex.build(codes[: n // 2], ids[: n // 2], codebook_size=K)
    index.add(codes[n // 2: 3 * n // 4], ids[n // 2: 3 * n // 4])
    index.add(codes[3 * n // 4:], ids[3 * n // 4:])  # second add: delta grows, shares SIDs with main
    assert index.n_items == n
    check_index(index, codes, ids, K)
    index.compact()
    assert index.delta is None and index.n_items == n
    check_index(index, codes, ids, K)
    np.testing.assert_array_equal(index.codes(), codes)


def test_rows_without_item_ids_and_collisions():
    codes = np.array([[1, 2, 3], [1, 2, 3], [1, 2, 0], [0, 0, 0], [1, 2, 3]])
    index = SidIndex.build(codes, codebook_size=4)
    assert index.items_of([1, 2, 3]) == [0, 1, 4]
    assert index.items_of([0, 0, 0]) == [3]
    assert index.items_of([3, 3, 3]) == []
    assert index.item_offsets is not None
    index.add(np.array([[1, 2, 3], [3, 3, 3]]))
    assert index.items_of([1, 2, 3]) == [0, 1, 4, 5]
    assert index.items_of([3, 3, 3]) == [6]
    index.compact()
    assert index.items_of([1, 2, 3]) == [0, 1, 4, 5]
    assert index.items_of([3, 3, 3]) == [6]


def test_unique_sids_drop_item_offsets():
    codes = np.array([[0, 1], [1, 0], [1, 1]])
    index = SidIndex.build(codes, ["a", "b", "c"], codebook_size=2)
    assert index.item_offsets is None
    assert index.items_of([1, 0]) == ["b"]
    assert index.child_codes[0].dtype == np.uint8 and index.offsets[0].dtype == np.int64
    assert index.nbytes() > 0


def test_mixed_batch_and_node_stepping():
    K = 8
    codes = np.array([[1, 2, 3], [1, 2, 5], [1, 4, 0], [7, 7, 7]])
    index = SidIndex.build(codes, codebook_size=K)
    pre = torch.tensor([[1, 2], [1, 3], [7, 7], [0, 0], [1, 4], [9, 2], [-1, 2]])
    mask = index.allowed(pre)
    rows = [set(torch.nonzero(m).flatten().tolist()) for m in mask]
    assert rows == [{3, 5}, set(), {7}, set(), {0}, set(), set()]
    # carrying node ids step by step equals re-walking the prefix
    nodes = index.node_of(torch.zeros(len(pre), 0, dtype=torch.long))
    for d in range(2):
        nodes = index.step(nodes, pre[:, d], d)
        np.testing.assert_array_equal(nodes.numpy(), index.node_of(pre[:, : d + 1]).numpy())
        np.testing.assert_array_equal(index.allowed_from_nodes(nodes, d + 1).numpy(),
                                      index.allowed(pre[:, : d + 1]).numpy())
    assert (nodes[[1, 3, 5, 6]] == -1).all() and (nodes[[0, 2, 4]] >= 0).all()
    # state (main + delta) stepping
    index.add(np.array([[0, 0, 1]]))
    state = index.state_of(torch.zeros(len(pre), 0, dtype=torch.long))
    for d in range(2):
        state = index.step_state(state, pre[:, d], d)
    np.testing.assert_array_equal(index.allowed_from_state(state, 2).numpy(), index.allowed(pre).numpy())
    assert index.allowed(pre)[3].tolist() == [False, True] + [False] * 6


def test_empty_index():
    index = SidIndex.build(np.zeros((0, 3), dtype=np.int64), [], codebook_size=8)
    assert index.n_items == 0 and index.n_sids == 0
    for t in range(3):
        assert not index.allowed(torch.zeros(5, t, dtype=torch.long)).any()
    assert index.items_of([0, 0, 0]) == []
    assert not index.contains([0, 0, 0])
    index.add(np.array([[1, 2, 3]]), ["x"])
    assert index.items_of([1, 2, 3]) == ["x"]
    assert index.allowed(torch.zeros(1, 0, dtype=torch.long))[0].nonzero().flatten().tolist() == [1]
    index.compact()
    assert index.items_of([1, 2, 3]) == ["x"] and index.delta is None


def test_larger_codebook_uint16():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 1000, size=(500, 3))
    index = SidIndex.build(codes, codebook_size=1000)
    assert index.child_codes[0].dtype == np.uint16
    mask = index.allowed(torch.from_numpy(codes[:, :2]))
    assert mask[torch.arange(500), torch.from_numpy(codes[:, 2])].all()
    assert mask.sum() == sum(len({c[2] for c in codes.tolist() if c[:2] == p[:2]}) for p in codes.tolist())


def test_build_rejects_bad_codes():
    with pytest.raises(ValueError):
        SidIndex.build(np.array([[0, 8]]), codebook_size=8)
    with pytest.raises(ValueError):
        SidIndex.build(np.array([[0, -1]]), codebook_size=8)
    with pytest.raises(ValueError):
        SidIndex.build(np.array([[0, 1]]), ["a", "b"], codebook_size=8)
    index = SidIndex.build(np.array([[0, 1]]), codebook_size=8)
    with pytest.raises(ValueError):
        index.allowed(torch.zeros(1, 2, dtype=torch.long))  # t must be < L


def test_token_mask():
    V = 20
    token_ids = np.array([[10, 11, 12, -1], [14, 15, 16, 17]])
    code_mask = torch.tensor([[True, False, True, True], [False, False, False, False]])
    vm = token_mask(code_mask, token_ids, V, level=0)
    assert vm.shape == (2, V)
    assert vm[0].nonzero().flatten().tolist() == [10, 12]  # code 3 has no token at level 0
    assert not vm[1].any()
    vm = token_mask(code_mask, torch.from_numpy(token_ids[1]), V)
    assert vm[0].nonzero().flatten().tolist() == [14, 16, 17]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    codes = random_sids(0, 3, 8, 40)
    index = SidIndex.build(codes, codebook_size=8).to("cuda")
    index.add(np.array([[0, 0, 1]]))
    for t in range(3):
        pre = torch.from_numpy(all_prefixes(8, t))
        np.testing.assert_array_equal(index.allowed(pre.cuda()).cpu().numpy(), index.allowed(pre).numpy())


def test_leaf_counts_match_brute_force_with_delta():
    rng = np.random.default_rng(5)
    codes = rng.integers(0, 6, size=(300, 3))
    idx = SidIndex.build(codes, codebook_size=6)
    idx.add(rng.integers(0, 6, size=(20, 3)))
    main_sids = {tuple(c) for c in codes}
    delta_sids = {tuple(c) for c in idx.codes()[300:]}
    for d in range(4):
        prefixes = np.unique(rng.integers(0, 6, size=(40, d)), axis=0) if d else np.zeros((1, 0), np.int64)
        want = [sum(s[:d] == tuple(p) for s in main_sids) + sum(s[:d] == tuple(p) for s in delta_sids)
                for p in prefixes]
        assert idx.leaf_counts(prefixes).tolist() == want
