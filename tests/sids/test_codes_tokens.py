import math

import numpy as np
import pytest

from sidrec.sids.codes import assign_collisions, code_usage, collision_stats, prefix_similarity
from sidrec.sids.tokens import LEVEL_PREFIXES, parse_sid, render_sid, sid_token, sid_vocabulary


def test_tokens_and_render():
    assert LEVEL_PREFIXES[:4] == "abcd"
    assert sid_token(0, 99) == "<a_99>"
    assert sid_token(3, 1) == "<d_1>"
    assert render_sid([99, 225, 67]) == "<a_99><b_225><c_67>"
    assert render_sid(np.array([99, 225, 67, 0])) == "<a_99><b_225><c_67><d_0>"
    with pytest.raises(ValueError, match="code must be >= 0"):
        sid_token(0, -1)
    with pytest.raises(ValueError, match="level"):
        sid_token(26, 0)


def test_render_parse_round_trip():
    rng = np.random.default_rng(0)
    for _ in range(200):
        codes = rng.integers(0, 1000, size=rng.integers(1, 6)).tolist()
        assert parse_sid(render_sid(codes)) == codes
    assert parse_sid("<a_99><b_225><c_67>") == [99, 225, 67]


@pytest.mark.parametrize(
    "bad",
    ["", "<a_1><c_2>", "<b_1>", "<a_01>", "<a_1> <b_2>", " <a_1>", "<a_-1>", "a_1", "<a_1><b_2",
     "<A_1>", "<a_1>x", "<a1>", "<a_>", "<a_1><a_2>"],
)
def test_parse_rejects_malformed(bad):
    with pytest.raises(ValueError) as err:
        parse_sid(bad)
    assert repr(bad) in str(err.value)


def test_parse_rejects_non_string():
    with pytest.raises(ValueError, match="must be a str"):
        parse_sid(b"<a_1>")


def test_vocabulary():
    vocab = sid_vocabulary(levels=2, codebook_size=3, extra_level_size=2)
    assert vocab == ["<a_0>", "<a_1>", "<a_2>", "<b_0>", "<b_1>", "<b_2>", "<c_0>", "<c_1>"]


HAND = np.array([[1, 2], [3, 4], [1, 2], [5, 6], [1, 2], [3, 4], [2, 1]])


def test_dedup_exact():
    out = assign_collisions(HAND, "dedup")
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out[:, :2], HAND)
    np.testing.assert_array_equal(out[:, 2], [0, 0, 1, 0, 2, 1, 0])
    assert len({tuple(r) for r in out}) == len(HAND)


def test_dedup_wide_codes_take_lexsort_path_same_answer():
    # codes too large to pack into one int64 key go through np.lexsort; answer must not change
    rng = np.random.default_rng(1)
    small = rng.integers(0, 4, size=(5000, 3))
    wide = small + np.array([1 << 40, 0, 0])
    a = assign_collisions(small, "dedup", max_extra=10_000)
    b = assign_collisions(wide, "dedup", max_extra=10_000)
    np.testing.assert_array_equal(a[:, 3], b[:, 3])
    # reference: running count per tuple in input order
    seen: dict[tuple, int] = {}
    ref = []
    for row in map(tuple, small):
        ref.append(seen.get(row, 0))
        seen[row] = seen.get(row, 0) + 1
    np.testing.assert_array_equal(a[:, 3], ref)


def test_keep_and_bad_policy():
    np.testing.assert_array_equal(assign_collisions(HAND, "keep"), HAND)
    with pytest.raises(ValueError, match="policy"):
        assign_collisions(HAND, "drop")
    with pytest.raises(ValueError, match="2-D integer"):
        assign_collisions(np.zeros((3, 2)), "dedup")


def test_dedup_group_too_large_names_size():
    with pytest.raises(ValueError, match=r"group of 3 items.*max_extra=2.*more quantizer levels"):
        assign_collisions(HAND, "dedup", max_extra=2)
    assert assign_collisions(HAND, "dedup", max_extra=3).shape == (7, 3)


def test_collision_stats_exact():
    s = collision_stats(HAND)
    # groups: (1,2)x3, (3,4)x2, (5,6)x1, (2,1)x1 -> 5 of 7 items share their tuple
    assert s == {"n_items": 7, "n_unique_sids": 4, "items_in_collision_share": 5 / 7, "largest_group": 3}
    deduped = collision_stats(assign_collisions(HAND, "dedup"))
    assert deduped["n_unique_sids"] == 7 and deduped["items_in_collision_share"] == 0.0
    assert deduped["largest_group"] == 1
    assert collision_stats(np.zeros((0, 3), dtype=np.int64))["n_items"] == 0


def test_code_usage_perplexity():
    codes = np.array([[0, 0], [1, 0], [2, 0], [3, 1]] * 5)
    u = code_usage(codes, codebook_size=8)
    assert u[0]["used"] == 4 and u[0]["used_share"] == 0.5
    assert u[0]["perplexity"] == pytest.approx(4.0)
    p = np.array([0.75, 0.25])
    assert u[1]["used"] == 2
    assert u[1]["perplexity"] == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    assert code_usage(np.zeros((10, 1), dtype=np.int64), 4)[0]["perplexity"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="codebook_size"):
        code_usage(codes, codebook_size=3)


def _hierarchical_onehots(n_per_leaf: int = 3):
    """Items over a 4x4x4 code tree; embedding = [onehot(c0), onehot(c0,c1), onehot(c0,c1,c2), onehot(item)].

    Two items sharing a prefix of length l have cosine exactly l / 4.
    """
    codes = np.array([(a, b, c) for a in range(4) for b in range(4) for c in range(4)
                      for _ in range(n_per_leaf)])
    n = len(codes)
    parts = [
        np.eye(4)[codes[:, 0]],
        np.eye(16)[codes[:, 0] * 4 + codes[:, 1]],
        np.eye(64)[codes[:, 0] * 16 + codes[:, 1] * 4 + codes[:, 2]],
        np.eye(n),
    ]
    return codes, np.concatenate(parts, axis=1)


def test_prefix_similarity_exact_on_constructed_data():
    codes, emb = _hierarchical_onehots()
    out = prefix_similarity(codes, emb, n_pairs=4000, seed=0)
    for length in range(4):
        assert out["n_pairs"][length] > 0
        assert out["mean_cosine"][length] == pytest.approx(length / 4)
    assert sum(out["n_pairs"].values()) == 4000
    # the within-group samplers are what make long prefixes show up: random pairs alone would give
    # a length-3 bucket of about 2/191 of the pairs
    assert out["n_pairs"][3] >= 1000


def test_prefix_similarity_seeded_and_monotone_on_noisy_data():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 4, size=(3000, 3))
    base = [rng.normal(size=(4**(i + 1), 64)) for i in range(3)]
    keys = [codes[:, 0], codes[:, 0] * 4 + codes[:, 1], codes[:, 0] * 16 + codes[:, 1] * 4 + codes[:, 2]]
    emb = sum(b[k] for b, k in zip(base, keys, strict=True)) + rng.normal(size=(3000, 64))
    a = prefix_similarity(codes, emb, n_pairs=8000, seed=3)
    b = prefix_similarity(codes, emb, n_pairs=8000, seed=3)
    assert a == b
    means = [a["mean_cosine"][k] for k in range(4)]
    assert means == sorted(means) and means[3] - means[0] > 0.5


def test_prefix_similarity_empty_bucket_is_nan():
    codes = np.array([[0, 0], [1, 1], [2, 2]])  # no shared prefixes at all
    out = prefix_similarity(codes, np.eye(3), n_pairs=300)
    assert out["n_pairs"] == {0: 100, 1: 0, 2: 0}
    assert out["mean_cosine"][0] == pytest.approx(0.0)
    assert math.isnan(out["mean_cosine"][1]) and math.isnan(out["mean_cosine"][2])
