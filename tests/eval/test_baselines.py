import dataclasses
import json
import math

import numpy as np
import pyarrow as pa
import pytest
import torch
from safetensors import safe_open

from sidrec.config import ConfigError, SASRecConfig, section_from_dict
from sidrec.eval.baselines import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    MostPopular,
    SASRecRecommender,
    _training_sequences,
    _user_sequences,
    hr_ndcg_at_k,
    train_sasrec,
)


def examples(rows: list[tuple[str, list[str], str]]) -> pa.Table:
    users, histories, targets = zip(*rows, strict=True) if rows else ((), (), ())
    return pa.table({"user_id": pa.array(users, pa.string()),
                     "history": pa.array(histories, pa.list_(pa.string())),
                     "target": pa.array(targets, pa.string())})


# ---------------------------------------------------------------------------------------------- most popular

POP_TRAIN = examples([
    ("u1", ["a", "b"], "c"),
    ("u1", ["a", "b", "c"], "a"),  # u1 again, and a repeat of "a": u1 counts a, b, c once each
    ("u2", ["b"], "d"),
    ("u3", ["d", "d"], "b"),
])
CATALOG = ["a", "b", "c", "d", "e"]


def test_most_popular_counts_and_tie_order():
    pop = MostPopular(CATALOG).fit(POP_TRAIN)
    assert pop.counts == {"a": 1, "b": 3, "c": 1, "d": 2, "e": 0}
    # b (3 users), d (2), then the a/c tie by id, then the never-seen e
    assert pop.ranking == ["b", "d", "a", "c", "e"]
    assert pop.recommend([["a"], []], 3) == [["b", "d", "a"], ["b", "d", "a"]]
    assert pop.recommend([["a"]], 10) == [["b", "d", "a", "c", "e"]]  # k > catalog: everything
    # without a catalog, the catalog is what fit saw
    assert MostPopular().fit(POP_TRAIN).ranking == ["b", "d", "a", "c"]


def test_most_popular_numeric_ids_tie_as_numbers():
    pop = MostPopular().fit(examples([("u1", ["10"], "9"), ("u2", ["100"], "2")]))
    assert pop.ranking == ["2", "9", "10", "100"]


def test_most_popular_exclude_history():
    pop = MostPopular(CATALOG).fit(POP_TRAIN)
    assert pop.recommend([["b", "a"], ["d"], []], 2, exclude_history=True) == [["d", "c"], ["b", "a"], ["b", "d"]]
    assert pop.recommend([["b", "a", "d", "c"]], 3, exclude_history=True) == [["e"]]


def test_most_popular_errors():
    pop = MostPopular(CATALOG).fit(POP_TRAIN)
    for k in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="k must be an int >= 1"):
            pop.recommend([["a"]], k)
    with pytest.raises(ValueError, match=r"not in the catalog: 'zz', 'yy'"):
        pop.recommend([["a", "zz"], ["yy", "zz"]], 2)
    with pytest.raises(ValueError, match="not fitted"):
        MostPopular(CATALOG).recommend([["a"]], 2)
    with pytest.raises(ValueError, match="'q'"):
        MostPopular(CATALOG).fit(examples([("u1", ["a"], "q")]))


def test_hr_ndcg_hand_computed():
    pop = MostPopular(CATALOG).fit(POP_TRAIN)  # ranking b, d, a, c, e
    valid = examples([("x", ["c"], "b"), ("y", ["c"], "a"), ("z", ["c"], "e")])
    m = hr_ndcg_at_k(pop.recommend, valid, k=3)
    assert m["hr@3"] == pytest.approx(2 / 3)
    assert m["ndcg@3"] == pytest.approx((1 + 1 / math.log2(4)) / 3)
    assert m["n"] == 3


# ---------------------------------------------------------------------------------------------- SASRec

N_ITEMS = 30
ITEMS = [f"i{n}" for n in range(N_ITEMS)]
SMALL = dict(hidden_size=32, num_layers=1, num_heads=2, max_len=10, dropout=0.1, epochs=12, batch_size=64,
             lr=5e-3, patience=0, num_threads=1)


def cyclic(n: int, seed: int) -> pa.Table:
    """Histories of 1-8 consecutive items; the target is always the next one: (i + 1) % 30."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n):
        start, length = int(rng.integers(N_ITEMS)), int(rng.integers(1, 9))
        seq = [ITEMS[(start + j) % N_ITEMS] for j in range(length + 1)]
        rows.append((f"u{seed}-{u}", seq[:-1], seq[-1]))
    return examples(rows)


@pytest.fixture(scope="module")
def data():
    return {"train": cyclic(400, 0), "valid": cyclic(100, 1), "test": cyclic(200, 2)}


@pytest.fixture(scope="module")
def trained(data):
    return train_sasrec(data["train"], ITEMS, SASRecConfig(**SMALL))


def test_examples_glue_back_into_user_sequences():
    users = ["a", "a", "a", "b", "b", "b", "c", "c"]
    seqs = [[1, 2], [1, 2, 3], [1, 2, 3, 4],  # leave-one-out prefixes
            [3, 4, 5, 6], [4, 5, 6, 7], [5, 6, 7, 8],  # sliding windows at the longest length
            [9, 9], [9, 9]]  # same example twice: short, so not a sliding window; nothing to glue
    assert _user_sequences(users, seqs) == [[1, 2, 3, 4], [3, 4, 5, 6, 7, 8], [9, 9], [9, 9]]


def test_training_sequences_predict_each_item_once():
    seq = list(range(1, 13))
    cfg = SASRecConfig(max_len=4)  # window = 5 items, new windows every 2
    windows = _training_sequences(["u"], [seq], cfg)
    assert windows == [([1, 2, 3, 4, 5], 0), ([3, 4, 5, 6, 7], 3), ([5, 6, 7, 8, 9], 3),
                       ([7, 8, 9, 10, 11], 3), ([8, 9, 10, 11, 12], 4)]
    labels = [x for s, first in windows for x in s[first:]]
    assert labels == seq
    last = _training_sequences(["u", "v"], [seq, [1, 2, 3]], dataclasses.replace(cfg, loss_positions="last"))
    assert last == [([8, 9, 10, 11, 12], 4), ([1, 2, 3], 2)]


def test_sasrec_learns_cyclic_pattern(trained, data):
    assert hr_ndcg_at_k(trained.recommend, data["test"], k=1)["hr@1"] >= 0.95
    assert len(trained.history) == SMALL["epochs"] and trained.history[-1]["loss"] < trained.history[0]["loss"]


def test_sasrec_early_stopping_keeps_best_epoch(data):
    # HR@10 over 30 items is already 1.0 after the first epoch: nothing later beats it, so with
    # patience 2 training stops after epoch 2 and keeps epoch 0's weights.
    cfg = SASRecConfig(**{**SMALL, "patience": 2})
    stopped = train_sasrec(data["train"], ITEMS, cfg, valid=data["valid"])
    assert [r["epoch"] for r in stopped.history] == [0, 1, 2]
    assert [r["valid_hr@10"] for r in stopped.history] == [1.0, 1.0, 1.0]
    assert set(stopped.history[0]) == {"epoch", "loss", "seconds", "valid_hr@10", "valid_ndcg@10"}
    one_epoch = train_sasrec(data["train"], ITEMS, dataclasses.replace(cfg, epochs=1))
    histories = data["test"]["history"].to_pylist()
    assert torch.equal(stopped.score(histories), one_epoch.score(histories))


def test_sasrec_last_position_loss_learns_too(data):
    rec = train_sasrec(data["train"], ITEMS, SASRecConfig(**{**SMALL, "loss_positions": "last", "epochs": 8}))
    assert hr_ndcg_at_k(rec.recommend, data["test"], k=1)["hr@1"] >= 0.9


def test_sasrec_deterministic(trained, data):
    before = torch.random.get_rng_state()
    again = train_sasrec(data["train"], ITEMS, SASRecConfig(**SMALL))
    assert torch.equal(torch.random.get_rng_state(), before)  # global RNG untouched
    histories = data["test"]["history"].to_pylist()
    assert again.recommend(histories, 5) == trained.recommend(histories, 5)
    assert torch.equal(again.score(histories), trained.score(histories))


def test_sasrec_recommend_shapes_and_exclusion(trained):
    histories = [["i3", "i4", "i5"], ["i7"], [], ["i5", "i5", "i6"]]
    recs = trained.recommend(histories, 4)
    assert [len(r) for r in recs] == [4, 4, 4, 4]
    assert all(len(set(r)) == 4 and set(r) <= set(ITEMS) for r in recs)
    assert recs[0][0] == "i6" and recs[1][0] == "i8"
    excluded = trained.recommend(histories, 4, exclude_history=True)
    for h, r in zip(histories, excluded, strict=True):
        assert len(r) == 4 and not set(h) & set(r)
    # k larger than what is left after exclusion: only the items left
    left = trained.recommend([ITEMS[:28]], 5, exclude_history=True)[0]
    assert sorted(left) == ["i28", "i29"]
    assert sorted(trained.recommend([[]], 100)[0]) == sorted(ITEMS)  # empty history: whole catalog ranked


def test_sasrec_truncates_long_histories(trained):
    long = [ITEMS[j % N_ITEMS] for j in range(25)]  # > max_len = 10
    assert trained.recommend([long], 5) == trained.recommend([long[-10:]], 5)
    assert torch.equal(trained.score([long]), trained.score([long[-10:]]))


def test_sasrec_errors(trained, data):
    for k in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="k must be an int >= 1"):
            trained.recommend([["i1"]], k)
    with pytest.raises(ValueError, match=r"2 item id\(s\) not in the catalog: 'nope', 'i99'"):
        trained.recommend([["i1", "nope"], ["i99"]], 3)
    bad_train = examples([("u", ["i1"], "i2"), ("v", ["i1"], "zzz")])
    with pytest.raises(ValueError, match="'zzz'"):
        train_sasrec(bad_train, ITEMS, SASRecConfig(**SMALL))
    with pytest.raises(ValueError, match="'qq'"):
        train_sasrec(data["train"], ITEMS, SASRecConfig(**SMALL), valid=examples([("u", ["qq"], "i1")]))


def test_sasrec_save_load_round_trip(trained, data, tmp_path):
    histories = data["test"]["history"].to_pylist() + [[]]
    out = trained.save(tmp_path / "sasrec")
    assert (out / WEIGHTS_FILE).exists() and (out / CONFIG_FILE).exists()
    loaded = SASRecRecommender.load(out)
    assert loaded.config == trained.config and loaded.item_ids == ITEMS and not loaded.model.training
    assert loaded.history == trained.history
    assert loaded.recommend(histories, 10) == trained.recommend(histories, 10)
    assert torch.equal(loaded.score(histories), trained.score(histories))
    with safe_open(str(out / WEIGHTS_FILE), framework="pt") as f:  # plain safetensors
        assert "item_emb.weight" in f.keys()
    meta = json.loads((out / CONFIG_FILE).read_text())
    assert meta["item_ids"] == ITEMS and meta["config"]["hidden_size"] == SMALL["hidden_size"]
    with pytest.raises(ValueError, match="not a sidrec.sasrec"):
        SASRecRecommender.from_bytes({**trained.to_bytes(), CONFIG_FILE: b'{"format": "other"}'})


@pytest.mark.parametrize(
    "field,value",
    [("hidden_size", 0), ("num_layers", 0), ("num_heads", 0), ("num_heads", 3), ("max_len", 0),
     ("dropout", 1.0), ("dropout", -0.1), ("loss_positions", "every"), ("epochs", 0), ("batch_size", 0),
     ("lr", 0.0), ("lr", float("inf")), ("weight_decay", -1.0), ("patience", -1), ("seed", -1),
     ("num_threads", -1), ("epochs", 2.5), ("hidden_size", True)],
)
def test_config_validation_names_field(field, value):
    with pytest.raises(ConfigError, match=rf"^eval\.sasrec\.{field} must be"):
        dataclasses.replace(SASRecConfig(), **{field: value})


def test_config_defaults_and_from_dict():
    cfg = section_from_dict(SASRecConfig, {"hidden_size": 32, "loss_positions": "last"})
    assert cfg.hidden_size == 32 and cfg.loss_positions == "last"
    assert section_from_dict(SASRecConfig, dataclasses.asdict(cfg)) == cfg
    with pytest.raises(ConfigError, match=r"unknown option 'eval\.sasrec\.hiden_size'"):
        section_from_dict(SASRecConfig, {"hiden_size": 32})
