"""Constrained beam search: exact agreement with HF generate, validity, dead ends, exclusion, bad input."""

import numpy as np
import pytest
import torch

from sidrec.config import ModelConfig
from sidrec.decode.beam import SidDecoder, as_bias, sid_token_table
from sidrec.decode.hf_reference import hf_reference_search
from sidrec.llm.model import add_sid_tokens, load_base
from sidrec.llm.sft import collate, encode_prompt, format_example
from sidrec.sids.codes import assign_collisions
from sidrec.sids.index import SidIndex
from sidrec.sids.tokens import render_sid, used_tokens

K = 16  # codebook size of the synthetic SIDs (3 levels + a dedup level)
N_ITEMS = 150


def _catalog() -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(0)
    raw = rng.integers(0, K, size=(N_ITEMS, 3))
    raw[:10] = raw[0]  # a collision group, broken by the dedup level
    raw[20:25, :2] = [3, 4]  # a shared prefix
    return [f"i{n}" for n in range(N_ITEMS)], assign_collisions(raw, "dedup", max_extra=K)


def _prompt(history: list[int], sids: list[str]) -> str:
    return "The user has clicked " + ", ".join(sids[h] for h in history) + ". Which item next?"


@pytest.fixture(scope="module")
def setup():
    """A tiny Qwen2 trained for a few hundred steps on 'next item = (last item * 7 + 3) % N' so its
    distributions are peaked like a real recommender's."""
    torch.manual_seed(0)
    ids, codes = _catalog()
    sids = [render_sid(c) for c in codes]
    corpus = ["The user has clicked items. Which item next?"] * 20
    cfg = ModelConfig(tokenizer_vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=128, max_position_embeddings=256)
    model, tok = load_base(cfg, corpus)
    add_sid_tokens(model, tok, used_tokens(sids))
    rng = np.random.default_rng(1)
    examples = []
    for _ in range(600):
        hist = rng.integers(0, N_ITEMS, size=rng.integers(1, 5)).tolist()
        examples.append(format_example(_prompt(hist, sids), sids[(hist[-1] * 7 + 3) % N_ITEMS], tok, 128))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(150):
        batch = collate([examples[(step * 16 + j) % len(examples)] for j in range(16)], tok.pad_token_id)
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    index = SidIndex.build(codes, ids, codebook_size=K)
    prompts = [encode_prompt(_prompt(h, sids), tok, 128)
               for h in ([1], [5, 9], [12, 40, 77], [3, 3, 3, 3], [149], [0, 2])]
    return model, tok, index, prompts, codes, ids


def _summary(hits):
    return [(h.items, h.sid) for h in hits]


@pytest.mark.parametrize("scoring", ["raw", "renormalized"])
@pytest.mark.parametrize(("beams", "k", "batch"), [(20, 10, 6), (5, 5, 3), (8, 1, 1), (20, 20, 2)])
def test_matches_hf_generate(setup, scoring, beams, k, batch):
    model, tok, index, prompts, _, _ = setup
    prompts = prompts[:batch]
    ours = SidDecoder(model, tok, index, num_beams=beams, scoring=scoring).search(prompts, k=k)
    ref = hf_reference_search(model, tok, index, prompts, k=k, num_beams=beams, scoring=scoring)
    for a, b in zip(ours, ref, strict=True):
        assert _summary(a) == _summary(b)
        assert len(a) == k
        np.testing.assert_allclose([h.score for h in a], [h.score for h in b], rtol=1e-5, atol=1e-4)
        assert all(x.score >= y.score for x, y in zip(a, a[1:], strict=False))  # best first


def test_scores_are_log_probs(setup):
    """raw scores are sums of log-probs (<= 0, and the renormalized ones are >= the raw ones)."""
    model, tok, index, prompts, _, _ = setup
    raw = SidDecoder(model, tok, index, scoring="raw").search(prompts[:2], k=10)
    ren = SidDecoder(model, tok, index, scoring="renormalized").search(prompts[:2], k=10)
    for a, b in zip(raw, ren, strict=True):
        assert all(h.score <= 0 for h in a)
        assert a[0].score <= b[0].score + 1e-6
        # renormalized probabilities of all valid SIDs sum to 1: the top 10 sum to at most 1
        assert sum(np.exp(h.score) for h in b) <= 1 + 1e-5


def test_every_result_is_a_real_distinct_item(setup):
    model, tok, index, prompts, codes, ids = setup
    dec = SidDecoder(model, tok, index)
    for hits in dec.search(prompts, k=20):
        items = [i for h in hits for i in h.items]
        assert len(items) == len(set(items)) == 20
        for h in hits:
            assert index.contains(h.codes)
            assert h.items == [ids[r] for r in range(N_ITEMS) if tuple(codes[r]) == h.codes]


def test_exclusion_matches_reference_and_removes_items(setup):
    model, tok, index, prompts, _, ids = setup
    dec = SidDecoder(model, tok, index)
    top = dec.search(prompts[:3], k=10)
    exclude = [{h.items[0] for h in hits[:4]} | {"i0"} for hits in top]
    ours = dec.search(prompts[:3], k=10, exclude=exclude)
    ref = hf_reference_search(model, tok, index, prompts[:3], k=10, num_beams=20, exclude=exclude)
    for a, b, ex in zip(ours, ref, exclude, strict=True):
        assert _summary(a) == _summary(b)
        assert len(a) == 10 and not ex & {i for h in a for i in h.items}


class _DeadEndIndex:
    """A SidIndex whose level-1 nodes under one first code have no valid continuation (a dead end)."""

    def __init__(self, index, first: int):
        self._index, self.first = index, first

    def __getattr__(self, name):
        return getattr(self._index, name)

    def _dead(self) -> int:
        return int(self._index.node_of(torch.tensor([[self.first]]))[0])

    def dense_tables(self, depth, device=None):
        dense = self._index.dense_tables(depth, device)
        if depth != 1 or dense is None:
            return dense
        ids, bias = dense[0].clone(), dense[1].clone()
        ids[self._dead()], bias[self._dead()] = self._index.n_nodes(2), float("-inf")  # no child
        return ids, bias

    def allowed_from_nodes(self, node_ids, depth):
        mask = self._index.allowed_from_nodes(node_ids, depth)
        if depth == 1:
            mask[node_ids == self._dead()] = False
        return mask


@pytest.mark.parametrize("scoring", ["raw", "renormalized"])
def test_dead_ends_never_fall_back_to_unconstrained(setup, scoring):
    """Beams whose prefix has no valid continuation die (score -inf, dropped); with no valid SID at all the
    answer is empty. Neither case falls back to free decoding."""
    model, tok, index, prompts, codes, ids = setup
    best = SidDecoder(model, tok, index, scoring=scoring).search(prompts[:2], k=1)
    first = int(best[0][0].codes[0])
    dec = SidDecoder(model, tok, _DeadEndIndex(index, first), scoring=scoring)
    hits = dec.search(prompts[:2], k=10)
    assert len(hits[0]) == 10
    assert all(h.codes[0] != first and np.isfinite(h.score) and index.contains(h.codes) for h in hits[0])
    dec = SidDecoder(model, tok, index, scoring=scoring)
    assert dec.search(prompts[:2], k=10, exclude=[set(ids), set()])[0] == []
    # all but one item excluded: 19 of 20 beams are dead at every level, some on codes without a token
    only = dec.search(prompts[:1], k=1, exclude=[set(ids) - {"i77"}])[0]
    assert [h.items for h in only] == [["i77"]]
    under = {ids[r] for r in range(N_ITEMS) if codes[r][0] == first}
    pruned = dec.search(prompts[:1], k=10, exclude=[under])[0]
    assert len(pruned) == 10 and all(h.codes[0] != first for h in pruned)


def test_renormalized_empty_allowed_row_is_minus_inf_not_nan(setup):
    model, tok, index, _, _, _ = setup
    dec = SidDecoder(model, tok, index, scoring="renormalized")
    logits = torch.randn(3, model.get_output_embeddings().weight.shape[0])
    allowed = torch.zeros(3, K, dtype=torch.bool)
    allowed[0, 2] = True
    out = dec._level_scores(logits, 0, as_bias(allowed))
    assert not torch.isnan(out).any()
    assert out[0, 2] == 0 and torch.isinf(out[1:]).all()


@pytest.mark.parametrize("codebook", [K, 2 * K])
def test_fewer_valid_sids_than_beams(setup, codebook):
    """3 items, beam 20: most beams are dead from the start. With codebook 2K, codes K..2K-1 have no token,
    and dead beams sitting on them must not feed an invalid token id to the model."""
    model, tok, _, prompts, codes, ids = setup
    small = SidIndex.build(codes[:3], ids[:3], codebook_size=codebook)
    ours = SidDecoder(model, tok, small, num_beams=20).search(prompts[:3], k=10)
    ref = hf_reference_search(model, tok, small, prompts[:3], k=10, num_beams=20)
    for a, b in zip(ours, ref, strict=True):
        assert _summary(a) == _summary(b)
        assert sorted(i for h in a for i in h.items) == ["i0", "i1", "i2"]


def test_keep_policy_returns_every_item_of_a_sid(setup):
    model, tok, _, prompts, codes, ids = setup
    kept = SidIndex.build(codes[:, :3], ids, codebook_size=K)  # no dedup level: i0..i9 share one SID
    dec = SidDecoder(model, tok, kept)
    # a prompt whose answer is i0's SID: history item h with (7h + 3) % N == 0 -> h = 21
    hits = dec.search([encode_prompt(_prompt([21], [render_sid(c) for c in codes]), tok, 128)], k=10)[0]
    items = [i for h in hits for i in h.items]
    assert len(items) == 10 == len(set(items))
    group = next(h for h in hits if "i0" in h.items)
    assert group.items == [f"i{n}" for n in range(10)][:len(group.items)]


def test_cold_start_items_are_decodable(setup):
    model, tok, _, prompts, codes, ids = setup
    index = SidIndex.build(codes[:100], ids[:100], codebook_size=K)
    dec = SidDecoder(model, tok, index)
    before = {i for h in dec.search(prompts, k=20) for hit in h for i in hit.items}
    index.add(codes[100:], ids[100:])
    after = dec.search(prompts, k=20)
    ref = hf_reference_search(model, tok, index, prompts, k=20, num_beams=20)
    assert [_summary(a) for a in after] == [_summary(b) for b in ref]
    new = {i for h in after for hit in h for i in hit.items} - before
    assert new & set(ids[100:])


def test_unconstrained_mode_flags_invalid_outputs(setup):
    model, tok, index, prompts, _, _ = setup
    dec = SidDecoder(model, tok, index)
    free = dec.search(prompts, k=10, constrained=False)
    for hits in free:
        assert len(hits) == 10
        for h in hits:
            assert h.valid == (len(h.codes) == index.levels and bool(index.contains(h.codes)))
            assert h.valid == bool(h.items)
    # the trained model mostly spells real SIDs; a random-init model would not
    assert np.mean([h.valid for hits in free for h in hits]) > 0.3


def test_bad_inputs(setup):
    model, tok, index, prompts, _, _ = setup
    dec = SidDecoder(model, tok, index, num_beams=5)
    with pytest.raises(ValueError, match="k must be in"):
        dec.search(prompts[:1], k=6)
    with pytest.raises(ValueError, match="k must be in"):
        dec.search(prompts[:1], k=0)
    with pytest.raises(ValueError, match="unknown item ids to exclude: \\['nope'\\]"):
        dec.search(prompts[:1], k=5, exclude=[{"nope"}])
    with pytest.raises(ValueError, match="at least one token"):
        dec.search([[]], k=5)
    assert dec.search([], k=5) == []
    with pytest.raises(ValueError, match="scoring"):
        SidDecoder(model, tok, index, scoring="softmax")


def test_token_table_and_missing_tokens(setup):
    model, tok, index, _, _, _ = setup
    table = sid_token_table(tok, 4, K)
    assert (table[:3] >= 0).all() and len(set(table[:3].flatten().tolist())) == 3 * K
    assert (table[3, :10] >= 0).all() and (table[3, 10:] == -1).all()  # dedup level: groups of <= 10
    assert tok.convert_ids_to_tokens([int(table[2, 5])]) == ["<c_5>"]
    wide = SidIndex.build(np.array([[0, 0, 0, 40]]), ["x"], codebook_size=64)  # <d_40> was never added
    with pytest.raises(ValueError, match="lacks SID tokens.*<d_40>"):
        SidDecoder(model, tok, wide)


@pytest.mark.parametrize("dense", ["all", "top", "none"])
@pytest.mark.parametrize("delta", [True, False])
def test_dense_and_csr_trie_paths_agree_with_hf(setup, monkeypatch, dense, delta):
    """The dense child tables (every depth of a small catalog, the top ones of a large one) and the CSR
    trie give the same search, with retired items and exclusions in play, with and without a delta index
    (dense at every depth and no delta: the walk with the bans folded into its masks)."""
    model, tok, _, prompts, codes, ids = setup
    if dense != "all":  # "top": the root and depth 1 (<= K + 1 rows) dense, deeper depths from the CSR trie
        monkeypatch.setattr(SidIndex, "dense_max_entries", (K + 1) * K if dense == "top" else 0)
    index = SidIndex.build(codes[:120] if delta else codes, ids[:120] if delta else ids, codebook_size=K)
    if delta:
        index.add(codes[120:], ids[120:])
    index.remove(["i3", "i130", "i77"])
    exclude = [{"i1", "i125"}, set(), {"i0", "i2", "i4"}]
    ours = SidDecoder(model, tok, index).search(prompts[:3], k=10, exclude=exclude)
    ref = hf_reference_search(model, tok, index, prompts[:3], k=10, num_beams=20, exclude=exclude)
    for a, b in zip(ours, ref, strict=True):
        assert _summary(a) == _summary(b)
        np.testing.assert_allclose([h.score for h in a], [h.score for h in b], rtol=1e-5, atol=1e-4)


def test_one_decoder_follows_retires_and_adds(setup):
    """A long-lived decoder (as a Serve replica holds) sees every catalog change: its cached tables of the
    trie are rebuilt after a retire, and new delta items are searched."""
    model, tok, _, prompts, codes, ids = setup
    index = SidIndex.build(codes[:100], ids[:100], codebook_size=K)
    dec = SidDecoder(model, tok, index)
    first = dec.search(prompts, k=10)
    gone = sorted({i for hits in first for h in hits[:2] for i in h.items})
    index.remove(gone)
    after = dec.search(prompts, k=10)
    assert not set(gone) & {i for hits in after for h in hits for i in h.items}
    ref = hf_reference_search(model, tok, index, prompts, k=10, num_beams=20)
    assert [_summary(a) for a in after] == [_summary(b) for b in ref]
    ex = [{h.items[0] for h in hits[:3]} for hits in after]  # bans read the trie as it is after the retire
    ours = dec.search(prompts, k=10, exclude=ex)
    assert [_summary(a) for a in ours] == [_summary(b) for b in hf_reference_search(
        model, tok, index, prompts, k=10, num_beams=20, exclude=ex)]
    index.add(codes[100:], ids[100:])
    index.add(codes[:1], ids[:1])  # an upsert of a main item: retired there, present in the delta
    later = dec.search(prompts, k=10, exclude=[{"i101"}] * len(prompts))
    ref = hf_reference_search(model, tok, index, prompts, k=10, num_beams=20, exclude=[{"i101"}] * len(prompts))
    assert [_summary(a) for a in later] == [_summary(b) for b in ref]


def test_exclusion_with_shared_sids_matches_reference(setup):
    """keep policy: a SID with several items is pruned only when all of them are excluded."""
    model, tok, _, prompts, codes, ids = setup
    kept = SidIndex.build(codes[:, :3], ids, codebook_size=K)  # i0..i9 share one SID
    dec = SidDecoder(model, tok, kept)
    prompt = [encode_prompt(_prompt([21], [render_sid(c) for c in codes]), tok, 128)]
    for ex in ({"i0", "i1"}, {f"i{n}" for n in range(10)}, {f"i{n}" for n in range(10)} | {"i20", "i21"}):
        ours = dec.search(prompt * 2, k=10, exclude=[ex, set()])
        ref = hf_reference_search(model, tok, kept, prompt * 2, k=10, num_beams=20, exclude=[ex, set()])
        assert [_summary(a) for a in ours] == [_summary(b) for b in ref]
        assert not ex & {i for h in ours[0] for i in h.items}
