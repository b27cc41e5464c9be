import numpy as np
import pytest

from sidrec.config import ConfigError, QuantizerConfig
from sidrec.sids import collab
from sidrec.sids.collab import CollabVectors, cooccurrence_pairs


def two_communities(n_users: int = 60, seed: int = 0):
    """Items a0..a9 are clicked together, b0..b9 together; no user mixes them. Text says nothing (random)."""
    rng = np.random.default_rng(seed)
    items = [f"a{i}" for i in range(10)] + [f"b{i}" for i in range(10)] + ["new"]
    hists, tgts = [], []
    for u in range(n_users):
        group = "a" if u % 2 else "b"
        seq = [f"{group}{i}" for i in rng.permutation(10)[:6]]
        for t in range(1, len(seq)):
            hists.append(seq[:t])
            tgts.append(seq[t])
    text = rng.normal(size=(len(items), 64)).astype(np.float32)
    return items, text, hists, tgts


def fit(items, text, hists, tgts, **kw) -> CollabVectors:
    args = {"weight": 0.5, "dim": 4, "window": 3, "neighbours": 3, "seed": 0} | kw
    return CollabVectors.fit(items, text, hists, tgts, **args)


def test_pairs_are_the_window_before_each_target_nearer_weighing_more():
    row_of = {"t": 0, "x": 1, "y": 2, "z": 3}
    a, b, w = cooccurrence_pairs([["x", "y", "z"]], ["t"], window=2, row_of=row_of)
    assert a.tolist() == [0, 0] and b.tolist() == [3, 2] and w.tolist() == [1.0, 0.5]
    assert len(cooccurrence_pairs([["t"]], ["t"], window=2, row_of=row_of)[0]) == 0  # a repeat is no pair
    assert len(cooccurrence_pairs([["x", "q"]], ["p"], window=2, row_of=row_of)[0]) == 0  # outside the catalog


def test_items_clicked_together_get_close_vectors_the_others_do_not():
    items, text, hists, tgts = two_communities()
    v = fit(items, text, hists, tgts)
    a, b = v.lookup([f"a{i}" for i in range(10)]), v.lookup([f"b{i}" for i in range(10)])
    within = float(np.mean(a @ a.T)), float(np.mean(b @ b.T))
    across = float(np.mean(a @ b.T))
    assert min(within) > 0.5 and across < 0.1, (within, across)
    assert np.allclose(np.linalg.norm(v.vectors, axis=1), 1.0, atol=1e-5)
    assert v.observed.tolist() == [True] * 20 + [False]


def test_an_unseen_item_gets_the_vector_of_the_items_that_read_like_it():
    items, text, hists, tgts = two_communities()
    text[-1] = text[:3].mean(axis=0)            # "new" reads like a0, a1, a2 and has no clicks
    v = fit(items, text, hists, tgts)
    new = v.lookup(["new"])[0]
    a_mean = v.lookup([f"a{i}" for i in range(10)]).mean(axis=0)
    b_mean = v.lookup([f"b{i}" for i in range(10)]).mean(axis=0)
    assert new @ a_mean > 0.5 and new @ b_mean < 0.1
    # an admin add of the same text computes the same vector from the stored ones
    assert np.allclose(v.for_text(text[-1:], text[v.observed])[0], new, atol=1e-6)


def test_combined_input_is_unit_norm_with_the_weight_as_the_collab_share():
    items, text, hists, tgts = two_communities()
    v = fit(items, text, hists, tgts, weight=0.3)
    x = v.combine(text, v.vectors)
    assert x.shape == (len(items), 64 + 4)
    assert np.allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    assert np.allclose(np.sum(x[:, 64:] ** 2, axis=1), 0.3, atol=1e-5)


def test_same_inputs_same_vectors_and_table_round_trip():
    items, text, hists, tgts = two_communities()
    v1, v2 = fit(items, text, hists, tgts), fit(items, text, hists, tgts)
    assert np.array_equal(v1.vectors, v2.vectors)
    back = CollabVectors.from_table(v1.to_table(), 0.5, 3)
    assert back.item_ids == v1.item_ids and np.array_equal(back.vectors, v1.vectors)
    assert np.array_equal(back.observed, v1.observed)


def test_off_keeps_the_quantizer_fingerprint_and_the_weight_is_checked():
    off, on = QuantizerConfig(collab_weight=0.0), QuantizerConfig(collab_weight=0.5)
    assert not set(collab.COLLAB_FIELDS) & set(collab.stage_config(off))
    assert collab.stage_config(on)["collab_weight"] == 0.5
    with pytest.raises(ConfigError, match="quantize.collab_weight"):
        QuantizerConfig(collab_weight=1.0)


def test_a_store_fitted_on_text_only_reads_back_as_text_only_whatever_the_default(tmp_path):
    """The stage drops the collab options from its config when they are off; reading that config back with
    a default that is on (as it was for a while) must not make the store look collaborative."""
    from sidrec.store import ArtifactStore

    store = ArtifactStore(str(tmp_path))
    run = store.begin("quantizer")
    store.publish(run, fp="x", config=collab.stage_config(QuantizerConfig(collab_weight=0.0)), inputs={})
    assert collab.read_collab(store) is None
    items, text, hists, tgts = two_communities()
    run = store.begin("quantizer")
    store.write_table(f"{run.path}/{collab.COLLAB_FILE}", fit(items, text, hists, tgts, weight=0.3).to_table())
    store.publish(run, fp="y", config=collab.stage_config(QuantizerConfig(collab_weight=0.3)), inputs={})
    back = collab.read_collab(store)
    assert back is not None and back.weight == 0.3 and back.item_ids == items
