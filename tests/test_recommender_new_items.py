"""Recommender.recommend(new_item_slots=m): places of the top-k kept for items added after training."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from sidrec.config import InstructionConfig, ModelConfig
from sidrec.decode.beam import Hit
from sidrec.llm.model import add_sid_tokens, load_base
from sidrec.recommender import Recommender, merge_new
from sidrec.sids.tokens import render_sid, sid_vocabulary

K, LEVELS, N_WARM, K_TOP = 8, 3, 120, 10


def _table(ids: list[str], codes: np.ndarray) -> pa.Table:
    return pa.table({"item_id": ids, "codes": pa.array(codes.tolist(), pa.list_(pa.int64())),
                     "sid": [render_sid(c) for c in codes]})


@pytest.fixture(scope="module")
def parts():
    """A tiny (untrained) Qwen2 that has every SID token, and a warm catalog of distinct SIDs."""
    torch.manual_seed(0)
    cfg = ModelConfig(tokenizer_vocab_size=300, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                      intermediate_size=64, max_position_embeddings=512)
    model, tok = load_base(cfg, ["The user has clicked items. Which item next?"] * 20)
    add_sid_tokens(model, tok, sid_vocabulary(LEVELS, K))
    model.eval()
    rng = np.random.default_rng(0)
    codes = np.array(sorted({tuple(c) for c in rng.integers(0, K, size=(400, LEVELS)).tolist()}))
    rng.shuffle(codes)
    return model, tok, codes


def _recommender(parts, scoring: str = "raw") -> tuple[Recommender, list[str]]:
    """Warm items w0..; the remaining distinct SIDs are added after 'training' as n0.. (the delta part)."""
    model, tok, codes = parts
    warm = [f"w{i}" for i in range(N_WARM)]
    rec = Recommender(model, tok, _table(warm, codes[:N_WARM]), {i: i for i in warm}, InstructionConfig(),
                      max_length=256, num_beams=20, scoring=scoring)  # type: ignore[arg-type]
    new = [f"n{i}" for i in range(6)]
    rec.add_items(new, codes[N_WARM:N_WARM + len(new)], new)
    return rec, new


HISTORIES = [["w1", "w2"], ["w5"], ["w7", "w9", "w11"], ["w20", "n0"], ["w33"], ["w3", "w4", "w40", "w41"]]


def _items(hits: list[Hit]) -> list[str]:
    return [i for h in hits for i in h.items]


def test_zero_slots_is_the_models_own_list(parts):
    rec, _ = _recommender(parts)
    assert rec.recommend(HISTORIES, k=K_TOP, new_item_slots=0) == rec.recommend(HISTORIES, k=K_TOP)
    with pytest.raises(ValueError, match="new_item_slots"):
        rec.recommend(HISTORIES, k=K_TOP, new_item_slots=-1)


@pytest.mark.parametrize("slots", [1, 2, 3])
@pytest.mark.parametrize("exclude", [False, True])
def test_slots_hold_new_items_and_keep_the_models_best_old_ones(parts, slots, exclude):
    rec, new = _recommender(parts)
    plain = rec.recommend(HISTORIES, k=K_TOP, exclude_history=exclude)
    got = rec.recommend(HISTORIES, k=K_TOP, exclude_history=exclude, new_item_slots=slots)
    for hist, before, after in zip(HISTORIES, plain, got, strict=True):
        items = _items(after)
        assert len(items) == len(set(items)) == K_TOP
        fresh = [i for i in items if i in new]
        allowed = [i for i in new if not (exclude and i in hist)]
        assert len(fresh) >= min(slots, len(allowed))
        old = [i for i in items if i not in new]
        assert old == [i for i in _items(before) if i not in new][:len(old)]  # the model's best old ones
        assert not (exclude and set(items) & set(hist))
        added = [i for i in items if i not in _items(before)]  # the reserved places come last
        assert items[len(items) - len(added):] == added


def test_retired_new_items_never_come_back_and_the_cache_follows_the_index(parts):
    rec, new = _recommender(parts)
    rec.retire_items(new[:5])
    for hits in rec.recommend(HISTORIES, k=K_TOP, new_item_slots=3):
        items = _items(hits)
        assert not set(items) & set(new[:5]) and new[5] in items and len(items) == K_TOP
    rec.retire_items(new[5:])
    assert rec.new_items.decoder() is None
    assert rec.recommend(HISTORIES, k=K_TOP, new_item_slots=3) == rec.recommend(HISTORIES, k=K_TOP)
    _, _, codes = parts
    rec.add_items(["n9"], codes[-1:], ["n9"])
    assert all("n9" in _items(h) for h in rec.recommend(HISTORIES, k=K_TOP, new_item_slots=1))


def test_the_first_place_and_renormalized_order(parts):
    rec, new = _recommender(parts, scoring="renormalized")
    plain = rec.recommend(HISTORIES, k=K_TOP)
    assert rec.recommend(HISTORIES, k=1, new_item_slots=2) == rec.recommend(HISTORIES, k=1)
    for before, after in zip(plain, rec.recommend(HISTORIES, k=K_TOP, new_item_slots=2), strict=True):
        items, first = _items(after), _items(before)
        fresh = [i for i in items if i not in first]  # scores of the small trie are not comparable: last
        assert fresh and items[len(items) - len(fresh):] == fresh and items[:-len(fresh)] == [
            i for i in first if i in items]
        assert sum(i in new for i in items) >= 2


def test_merge_new_trims_shared_sids_and_orders():
    def hit(score, *items):
        return Hit(render_sid((0, 0, 0)), (0, 0, 0), score, list(items))

    main = [hit(-1.0, "a"), hit(-2.0, "b", "c"), hit(-3.0, "x"), hit(-4.0, "d")]  # x is new
    extra = [hit(-2.5, "x"), hit(-2.6, "y"), hit(-9.0, "z")]
    out = merge_new(main, extra, k=5, slots=2, new_ids={"x", "y", "z"})
    assert [i for h in out for i in h.items] == ["a", "b", "c", "x", "y"]  # d gave its place to y
    out = merge_new(main, extra, k=4, slots=3, new_ids={"x", "y", "z"})
    assert [i for h in out for i in h.items] == ["a", "x", "y", "z"]
    assert merge_new(main, extra, k=5, slots=1, new_ids={"x", "y", "z"}) is main


def test_serve_batches_reserve_the_places_of_each_requests_own_k(parts):
    from sidrec.serve.handling import run_recommend

    rec, new = _recommender(parts)
    reqs = [{"history": h, "k": k, "exclude_history": ex, "profile": None}
            for h, k, ex in [(["w1"], 3, False), (["w2", "w3"], 10, False), (["w5"], 2, True)]]
    for req, reply in zip(reqs, run_recommend(rec, reqs, new_item_slots=1), strict=True):
        ids = [i["item_id"] for i in reply["items"]]
        assert len(ids) == req["k"] and sum(i in new for i in ids) >= 1
    plain = run_recommend(rec, reqs)
    assert [r["items"] for r in plain] == [r["items"] for r in run_recommend(rec, reqs, new_item_slots=0)]


D = 16


def _content_recommender(parts) -> tuple[Recommender, list[str], dict[str, np.ndarray]]:
    """As `_recommender`, with text embeddings: each new item n<j> lies next to warm item w<j> (w33 has none)."""
    model, tok, codes = parts
    rng = np.random.default_rng(1)
    warm = [f"w{i}" for i in range(N_WARM)]
    emb = {i: v for i, v in zip(warm, rng.normal(size=(N_WARM, D)).astype(np.float32), strict=True) if i != "w33"}
    rec = Recommender(model, tok, _table(warm, codes[:N_WARM]), {i: i for i in warm}, InstructionConfig(),
                      max_length=256, num_beams=20, embeddings=emb)
    new = [f"n{i}" for i in range(6)]
    near = np.stack([emb[f"w{j}"] + 0.1 * rng.normal(size=D) for j in range(6)]).astype(np.float32)
    rec.add_items(new, codes[N_WARM:N_WARM + len(new)], new, embeddings=3.0 * near)  # any norm: stored unit
    return rec, new, emb


def _cosine_order(rec: Recommender, history: list[str], candidates: list[str]) -> list[str]:
    e = rec.catalog.embeddings
    q = np.mean([e[i] for i in history if i in e], axis=0)
    return sorted(candidates, key=lambda i: -float(e[i] @ q / np.linalg.norm(q)))


@pytest.mark.parametrize("slots", [1, 2])
def test_content_places_go_to_the_added_items_nearest_the_history(parts, slots):
    rec, new, _ = _content_recommender(parts)
    assert np.allclose(np.linalg.norm(rec.catalog.embeddings["n0"]), 1.0)
    histories = [["w1", "w2"], ["w4"], ["w0", "w3"], ["w20", "n5"]]
    plain = rec.recommend(histories, k=K_TOP)
    got = rec.recommend(histories, k=K_TOP, new_item_slots=slots)
    search = rec.recommend(histories, k=K_TOP, new_item_slots=slots, new_item_ranking="search")
    for hist, before, after in zip(histories, plain, got, strict=True):
        items = _items(after)
        shown = [i for i in _items(before) if i in new]
        fresh = [i for i in items if i in new and i not in shown]
        want = [i for i in _cosine_order(rec, hist, new) if i not in shown][:slots - len(shown)]
        assert fresh == want and items[len(items) - len(fresh):] == fresh  # nearest first, in the last places
        assert [h.score for h in after[len(after) - len(fresh):]] == sorted(
            [h.score for h in after[len(after) - len(fresh):]], reverse=True)
    assert "n4" in _items(got[1])  # n4 was made next to w4, the whole history
    assert got != search  # the two rankings are different methods (same model, same index)
    # exclude_history keeps a history's own new item out of the places
    for hits in rec.recommend([["w20", "n5"]], k=K_TOP, new_item_slots=slots, exclude_history=True):
        assert "n5" not in _items(hits) and sum(i in new for i in _items(hits)) >= slots


def test_content_falls_back_to_the_search_without_an_embedded_history(parts):
    rec, new, _ = _content_recommender(parts)
    got = rec.recommend([["w33"]], k=K_TOP, new_item_slots=1)            # w33 has no embedding
    assert got == rec.recommend([["w33"]], k=K_TOP, new_item_slots=1, new_item_ranking="search")
    assert sum(i in new for i in _items(got[0])) >= 1


def test_embeddings_follow_adds_updates_and_retires(parts):
    rec, new, _ = _content_recommender(parts)
    _, _, codes = parts
    rec.retire_items(["n4"])
    assert "n4" in rec.catalog.embeddings           # a history may still name it
    for hits in rec.recommend([["w4"]], k=K_TOP, new_item_slots=2):
        assert "n4" not in _items(hits)
    rec.add_items(["n0"], codes[-1:], ["n0 retitled"], replace=True)   # an update without an embedding
    assert "n0" not in rec.catalog.embeddings       # its old text's vector would be stale
    got = _items(rec.recommend([["w0"]], k=K_TOP, new_item_slots=1)[0])
    assert sum(i in new for i in got) >= 1 and "n0" not in got[-1:]  # content ranks the embedded ones only
