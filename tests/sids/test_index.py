"""SidIndex against brute force over Python sets, every prefix of small random SID sets."""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict

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


# ---------------------------------------------------------------------------------------- delete path
class Reference:
    """Brute-force catalog in the index's row order: rows [label, codes, in_delta, present]; label is the
    item id, or None for an index without ids (its rows are then the labels)."""

    def __init__(self, codes: np.ndarray, ids: list | None):
        ids = ids if ids is not None else [None] * len(codes)
        self.rows = [[i, tuple(c), False, True] for i, c in zip(ids, codes.tolist(), strict=True)]

    def add(self, codes: np.ndarray, ids: list | None) -> None:
        for i, c in zip(ids if ids is not None else [None] * len(codes), codes.tolist(), strict=True):
            if i is not None:
                self.remove([i])  # the index's add is an upsert by id
            self.rows.append([i, tuple(c), True, True])

    def remove(self, ids) -> None:
        ids = set(ids)
        for r in self.rows:
            r[3] = r[3] and r[0] not in ids

    def remove_rows(self, rows) -> None:
        for r in rows:
            self.rows[r][3] = False

    def compact(self) -> None:
        self.rows = [[i, c, False, True] for i, c, _, alive in self.rows if alive]

    def present(self) -> list[int]:
        return [n for n, r in enumerate(self.rows) if r[3]]

    def label(self, n: int):
        return self.rows[n][0] if self.rows[n][0] is not None else n

    def codes_of(self, item) -> tuple:
        """Codes of an item id (its last row) or of a row number."""
        if isinstance(item, str):
            item = max(n for n, r in enumerate(self.rows) if r[0] == item)
        return self.rows[item][1]


def probe_prefixes(K: int, d: int, ref: Reference) -> np.ndarray:
    """Length-d prefixes to query: all of them while few, else those of every SID ever stored plus a fixed
    sample of the others (the big code spaces would make each check slow, not stronger)."""
    every = all_prefixes(K, d)
    if len(every) <= 256:
        return every
    stored = {r[1][:d] for r in ref.rows}
    sample = np.random.default_rng(d).choice(len(every), size=64, replace=False)
    return np.array(sorted(stored | {tuple(p) for p in every[sample].tolist()}), dtype=np.int64)


def check_live(index: SidIndex, ref: Reference, K: int) -> None:
    """Every query of the index against the brute force over the present rows (batched where it can be)."""
    L = index.levels
    present = ref.present()
    codes = np.array([ref.rows[n][1] for n in present], dtype=np.int64).reshape(-1, L)
    labels = [ref.label(n) for n in present]
    assert index.n_items == len(index) == len(labels)
    np.testing.assert_array_equal(index.codes(), codes)
    assert index.all_item_ids() == [str(x) for x in labels]
    prefixes, items = brute(codes, labels)
    for t in range(L):
        pre = probe_prefixes(K, t, ref)
        expect = np.zeros((len(pre), K), dtype=bool)
        for i, p in enumerate(pre.tolist()):
            expect[i, sorted(prefixes.get(tuple(p), ()))] = True
        np.testing.assert_array_equal(index.allowed(torch.from_numpy(pre)).numpy(), expect, err_msg=f"t={t}")
        state = index.state_of(torch.from_numpy(pre))  # the decoder's path: node state, then masks
        np.testing.assert_array_equal(index.allowed_from_state(state, t).numpy(), expect)
    full = probe_prefixes(K, L, ref)
    want = [sorted(items.get(tuple(s), [])) for s in full.tolist()]
    assert index.contains(full).tolist() == [bool(w) for w in want]
    assert [sorted(index.item_of_row(r) for r in rows) for rows in index.rows_of_many(full)] == want
    for sid in {r[1] for r in ref.rows}:  # every SID ever stored, one query at a time
        assert sorted(index.items_of(list(sid))) == sorted(items.get(sid, [])), sid
        assert index.contains(list(sid)) == (sid in items)
    main = {ref.rows[n][1] for n in present if not ref.rows[n][2]}
    delta = {ref.rows[n][1] for n in present if ref.rows[n][2]}
    assert index.n_sids == len(main)
    for d in range(L + 1):
        pre = probe_prefixes(K, d, ref)
        count = Counter(s[:d] for s in main) + Counter(s[:d] for s in delta)
        assert index.leaf_counts(pre).tolist() == [count[tuple(p)] for p in pre.tolist()], d


def distinct_sids(seed: int, L: int, K: int, n: int) -> np.ndarray:
    """n distinct SIDs (the dedup policy), as many as the code space has."""
    flat = np.random.default_rng(seed).choice(K ** L, size=min(n, K ** L), replace=False)
    return np.stack([(flat // K ** (L - 1 - d)) % K for d in range(L)], axis=1)


def retire(index: SidIndex, ref: Reference, rng: np.random.Generator, share: float, with_ids: bool) -> list:
    """Retire a random share of the present items (main and delta alike); the call also names some twice
    and, with ids, one never stored: both are ignored."""
    present = ref.present()
    pick = [int(p) for p in rng.choice(present, size=int(len(present) * share), replace=False)]
    if with_ids:
        victims = [ref.rows[p][0] for p in pick]
        assert index.remove([*victims, *victims[:2], "never-stored"]) == len(victims)
        ref.remove(victims)
        return victims
    assert index.remove_rows([*pick, *pick[:2]]) == len(pick)
    ref.remove_rows(pick)
    return pick


# every (L, K) once, seeds varied
REMOVE_CASES = [(i % 3, L, K, n) for i, (L, (K, n)) in enumerate(itertools.product((2, 3, 4), ((4, 12), (8, 40))))]


@pytest.mark.parametrize("with_ids", [True, False])
@pytest.mark.parametrize("unique", [False, True])
@pytest.mark.parametrize("seed,L,K,n", REMOVE_CASES)
def test_remove_matches_brute_force(seed, L, K, n, unique, with_ids):
    """Retires (main and delta), a replayed retire, re-adds and moves, retires in the rebuilt delta, compact,
    retires after it, retiring everything: after each step every query matches the brute force."""
    rng = np.random.default_rng(seed + 7)
    spare = n // 3  # SIDs the updates move items to
    codes = distinct_sids(seed, L, K, n + spare) if unique else random_sids(seed, L, K, n + spare)
    n = min(n, len(codes) - spare)
    codes, moves = codes[:n], codes[n:]
    ids = [f"item{i}" for i in range(n)] if with_ids else None
    half, three_q = n // 2, 3 * n // 4
    part = (lambda a, b: ids[a:b]) if with_ids else (lambda a, b: None)
    index = SidIndex.build(codes[:half], part(0, half), codebook_size=K)
    ref = Reference(codes[:half], part(0, half))
    if unique:
        assert index.item_offsets is None  # the dedup layout
    check_live(index, ref, K)  # fills the CPU tensor cache, so the retires below must refresh it
    index.add(codes[half:three_q], part(half, three_q))
    ref.add(codes[half:three_q], part(half, three_q))

    gone = retire(index, ref, rng, 0.4, with_ids)
    check_live(index, ref, K)
    version = index.version
    assert (index.remove(gone) if with_ids else index.remove_rows(gone)) == 0  # a replayed retire
    assert index.version == version
    check_live(index, ref, K)

    # re-add half the retired items (with ids, some moved to new SIDs) and the rest of the catalog
    back = gone[: len(gone) // 2]
    back_codes = np.array([ref.codes_of(b) for b in back], dtype=np.int64).reshape(-1, L)
    back_codes[: min(len(moves), len(back)) // 2] = moves[: min(len(moves), len(back)) // 2]
    new_codes = np.concatenate([back_codes, codes[three_q:]])
    new_ids = [*back, *ids[three_q:]] if with_ids else None
    index.add(new_codes, new_ids)
    ref.add(new_codes, new_ids)
    check_live(index, ref, K)
    retire(index, ref, rng, 0.3, with_ids)  # now also rows of the rebuilt delta
    check_live(index, ref, K)

    index.compact()
    ref.compact()
    assert index.delta is None and index.n_rows == index.n_items
    check_live(index, ref, K)
    retire(index, ref, rng, 0.5, with_ids)
    check_live(index, ref, K)
    retire(index, ref, rng, 1.0, with_ids)  # everything: no prefix is allowed any more
    check_live(index, ref, K)
    assert index.n_items == 0 and not index.allowed(torch.zeros(1, 0, dtype=torch.long)).any()
    index.compact()
    ref.compact()
    check_live(index, ref, K)


def test_shared_sid_keeps_its_other_items_and_prefixes_die_with_their_leaves():
    codes = np.array([[1, 2, 3], [1, 2, 3], [1, 2, 0], [0, 0, 0], [1, 3, 3]])
    index = SidIndex.build(codes, ["a", "b", "c", "d", "e"], codebook_size=4)
    assert index.item_offsets is not None  # the keep policy: a and b share a SID
    index.add(np.array([[1, 2, 3]]), ["f"])  # and f shares it from the delta
    pre = torch.tensor([[1, 2], [1, 3], [0, 0]])
    assert index.remove(["a"]) == 1
    assert index.items_of([1, 2, 3]) == ["b", "f"] and index.contains([1, 2, 3])
    index.remove(["b", "f"])
    assert index.items_of([1, 2, 3]) == [] and not index.contains([1, 2, 3])
    assert index.allowed(pre).nonzero().tolist() == [[0, 0], [1, 3], [2, 0]]
    assert index.leaf_counts(np.array([[1]])).tolist() == [2]
    index.remove(["c"])  # prefix (1, 2) has no leaf left: gone at its level, and from node_of
    assert index.allowed(torch.tensor([[1]])).nonzero().tolist() == [[0, 3]]
    assert index.node_of(torch.tensor([[1, 2]])).tolist() == [-1]
    assert index.state_of(torch.tensor([[1, 2]])).tolist() == [[-1, -1]]
    index.remove(["e"])
    assert index.allowed(torch.zeros(1, 0, dtype=torch.long)).nonzero().tolist() == [[0, 0]]
    assert index.n_sids == 1 and index.n_items == 1 and index.all_item_ids() == ["d"]
    index.add(np.array([[1, 2, 3]]), ["a"])  # back, once
    assert index.items_of([1, 2, 3]) == ["a"] and index.n_items == 2


def test_remove_semantics_and_errors():
    codes = np.array([[0, 1], [1, 0], [1, 1]])
    index = SidIndex.build(codes, ["a", "b", "c"], codebook_size=2)
    assert index.remove("b") == 1 and index.remove("b") == 0  # a single id; the second is a no-op
    with pytest.raises(KeyError, match="b"):
        index.remove(["a", "b"], strict=True)
    assert index.items_of([0, 1]) == ["a"]  # the strict failure retired nothing
    with pytest.raises(IndexError):
        index.remove_rows([3])
    assert index.remove_rows([0]) == 1 and index.all_item_ids() == ["c"]
    with pytest.raises(ValueError, match="repeat"):
        index.add(np.array([[0, 0], [0, 0]]), ["x", "x"])
    # add is an upsert: a present id moves to its new SID, once
    v = index.version
    index.add(np.array([[0, 0]]), ["c"])
    assert index.version > v and index.n_items == 1
    assert index.items_of([1, 1]) == [] and index.items_of([0, 0]) == ["c"]
    index.add(np.array([[0, 0]]), ["c"])
    assert index.n_items == 1 and index.rows_of([0, 0]) == [index.n_rows - 1]
    no_ids = SidIndex.build(codes, codebook_size=2)
    with pytest.raises(ValueError, match="remove_rows"):
        no_ids.remove(["0"])
    assert no_ids.remove_rows(np.array([1, 1])) == 1 and no_ids.items_of([1, 0]) == []
    no_ids.add(np.array([[1, 0]]))
    assert no_ids.items_of([1, 0]) == [3] and no_ids.all_item_ids() == ["0", "2", "3"]
    no_ids.compact()  # rows renumbered densely, in order
    assert no_ids.items_of([1, 0]) == [2] and no_ids.all_item_ids() == ["0", "1", "2"]


def test_remove_refreshes_every_cached_device_and_the_delta():
    codes = random_sids(1, 3, 8, 40)
    ids = [f"i{n}" for n in range(40)]
    index = SidIndex.build(codes[:30], ids[:30], codebook_size=8)
    index.add(codes[30:], ids[30:])
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        index.to(dev)
    index.remove(ids[::3])
    ref = Reference(codes[:30], ids[:30])
    ref.add(codes[30:], ids[30:])
    ref.remove(ids[::3])
    check_live(index, ref, 8)
    for dev in devices[1:]:
        for t in range(3):
            pre = torch.from_numpy(all_prefixes(8, t))
            np.testing.assert_array_equal(index.allowed(pre.to(dev)).cpu().numpy(), index.allowed(pre).numpy())


def test_constrained_decoder_never_reaches_a_retired_item():
    """The real beam search over an index with retired items (main and delta) gives exactly what it gives
    over an index built from the present items alone: the masks prune the retired SIDs and prefixes."""
    from sidrec.config import ModelConfig
    from sidrec.decode.beam import SidDecoder
    from sidrec.llm.model import add_sid_tokens, load_base
    from sidrec.sids.tokens import render_sid, used_tokens

    torch.manual_seed(0)
    K, n = 8, 60
    codes = random_sids(3, 3, K, n)
    ids = [f"i{r}" for r in range(n)]
    cfg = ModelConfig(tokenizer_vocab_size=300, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                      intermediate_size=64, max_position_embeddings=128)
    model, tok = load_base(cfg, ["The user has clicked items. Which item next?"] * 5)
    add_sid_tokens(model, tok, used_tokens([render_sid(c) for c in codes]), init="random")  # no score ties
    model.eval()
    prompts = [tok("The user has clicked items. Which item next?")["input_ids"], tok("Which item?")["input_ids"]]
    index = SidIndex.build(codes[:45], ids[:45], codebook_size=K)
    index.add(codes[45:], ids[45:])
    first = SidDecoder(model, tok, index).search(prompts, k=10)
    gone = {i for hits in first for h in hits[:3] for i in h.items} | {ids[50], ids[0]}
    index.remove(sorted(gone))
    after = SidDecoder(model, tok, index).search(prompts, k=10)
    keep = [r for r in range(n) if ids[r] not in gone]
    fresh = SidIndex.build(codes[keep], [ids[r] for r in keep], codebook_size=K)
    want = SidDecoder(model, tok, fresh).search(prompts, k=10)
    assert [[(h.sid, h.items) for h in hits] for hits in after] == [[(h.sid, h.items) for h in hits] for hits in want]
    np.testing.assert_allclose([h.score for hits in after for h in hits], [h.score for hits in want for h in hits],
                               rtol=1e-5)
    assert not gone & {i for hits in after for h in hits for i in h.items}
