"""The cold-start split (``eval.cold_start``): which items are cold, how train / valid lose them, and a leak check
over every training input -- the held-out splits, the instruction rows of every task, the SIDs (so the
alignment rows), the quantizer's fit input, the tokenizer corpus and the data most-popular and SASRec fit on.
``training_inputs`` lists the items each input names; the tests fail when a cold item is among them."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pyarrow as pa
import pytest

from sidrec.config import ConfigError, EvalConfig, load_config
from sidrec.data import cold_start as cs
from sidrec.data.tables import Dataset, first_interactions, leave_one_out
from sidrec.sids.collab import COLLAB_FILE
from sidrec.stages import dataset as dataset_stage
from sidrec.store import ArtifactStore
from tests.conftest import shared_data

# 6 users over items 1..12; item k first appears at time k*10 (item 12 newest), users interleave in time
LOG = {"u1": [1, 2, 3, 4, 11, 5, 6], "u2": [2, 3, 12, 4, 5, 6, 7], "u3": [1, 3, 5, 7, 9, 11, 12, 8],
       "u4": [2, 4, 6, 8, 10, 12, 1], "u5": [9, 10, 11, 1, 2, 3], "u6": [12, 11, 10, 9, 8]}


def interactions() -> pa.Table:
    rows = []
    for u, seq in LOG.items():
        for pos, item in enumerate(seq):
            rows.append((u, str(item), item * 10 + pos * 100))  # later positions are later in time
    users, items, ts = zip(*rows, strict=True)
    return pa.table({"user_id": list(users), "item_id": list(items), "timestamp": pa.array(ts, pa.int64())})


def items_of(examples: pa.Table) -> set[str]:
    return set(examples["target"].to_pylist()) | {i for h in examples["history"].to_pylist() for i in h}


# ------------------------------------------------------------------------------------------ the cold set
def test_newest_items_by_first_interaction_and_seeded_random():
    ids = [str(i) for i in range(1, 21)]
    first = {i: int(i) * 10 for i in ids} | {"3": 500}  # item 3 first seen last
    assert cs.pick_cold_items(ids, 0.1, "newest", first_seen=first) == ["3", "20"]
    first["19"] = 500  # a tie: the larger id counts as newer
    assert cs.pick_cold_items(ids, 0.05, "newest", first_seen=first) == ["19"]
    a, b = (cs.pick_cold_items(ids, 0.25, "random", seed=s) for s in (0, 0))
    assert a == b and len(a) == 5 and a == sorted(a, key=int)
    assert cs.pick_cold_items(ids, 0.25, "random", seed=1) != a
    assert cs.pick_cold_items(ids, 0.001, "random") and cs.pick_cold_items([], 0.1, "random") == []
    with pytest.raises(ConfigError, match="eval.cold_start_by must be 'random'"):
        cs.pick_cold_items(ids, 0.1, "newest", first_seen={"1": 5})


def test_config_names_the_option():
    with pytest.raises(ConfigError, match="eval.cold_start must be < 1"):
        EvalConfig(cold_start=1.0)
    with pytest.raises(ConfigError, match="eval.cold_start_by must be one of"):
        EvalConfig(cold_start=0.1, cold_start_by="oldest")
    with pytest.raises(ConfigError, match="unknown baseline"):
        EvalConfig(baselines=["content", "bpr"])
    ds = Dataset("prepared", pa.table({"item_id": ["1"], "title": ["a"]}), {}, first_seen={})
    with pytest.raises(ConfigError, match="eval.cold_start_by must be 'random' for dataset 'prepared'"):
        cs.hold_out(ds, EvalConfig(cold_start=0.1))


# ------------------------------------------------------------------------------------------ held-out splits
def expected_train(cold: set[str], cap: int) -> list[tuple[str, list[str], str]]:
    """The oracle: each user's train items (all but the last two) in time order without the cold ones; every warm
    item that was a train target and has a warm item before it is an example, history = up to cap of those."""
    out = []
    for u, seq in sorted(LOG.items()):
        train = [str(i) for i in seq[:-2]]
        for pos in range(1, len(train)):
            before = [i for i in train[:pos] if i not in cold]
            if train[pos] not in cold and before:
                out.append((u, before[-cap:], train[pos]))
    return out


@pytest.mark.parametrize("cap", [2, 3, 20])
def test_train_rows_are_the_log_without_the_cold_items(cap):
    splits = leave_one_out(interactions(), max_history=cap)
    assert cs.hold_out_train(splits["train"], set()).equals(splits["train"])  # nothing cold: the same rows
    cold = {"4", "11", "12"}
    got = cs.hold_out_train(splits["train"], cold)
    assert [(r["user_id"], r["history"], r["target"]) for r in got.to_pylist()] == expected_train(cold, cap)
    assert not items_of(got) & cold


def test_valid_loses_cold_targets_and_history_items():
    valid = pa.table({"user_id": ["a", "b", "c"], "history": [["1", "2"], ["2", "9"], ["9"]],
                      "target": ["9", "3", "4"]})
    got = cs.strip_examples(valid, {"9"})
    assert got.to_pylist() == [{"user_id": "b", "history": ["2"], "target": "3"}]  # c's history emptied


def test_hold_out_keeps_test_and_lists_the_cold_items():
    inter = interactions()
    ds = Dataset("toy", pa.table({"item_id": [str(i) for i in range(1, 13)]}), leave_one_out(inter, 3),
                 first_seen=first_interactions(inter))
    first = {str(i): min(i * 10 + pos * 100 for seq in LOG.values() for pos, j in enumerate(seq) if j == i)
             for i in range(1, 13)}
    newest = sorted(sorted(first, key=lambda i: (-first[i], -int(i)))[:3], key=int)
    out, cold = cs.hold_out(ds, EvalConfig(cold_start=0.25))  # 3 of 12 items
    assert cold.to_pylist() == [{"item_id": i, "first_seen": first[i]} for i in newest]
    assert out.splits["test"].equals(ds.splits["test"])
    assert not (items_of(out.splits["train"]) | items_of(out.splits["valid"])) & set(newest)
    summary = cs.summary(ds, out, newest)
    assert summary["items"] == 3 and summary["test_cold_targets"] == sum(
        t in set(newest) for t in ds.splits["test"]["target"].to_pylist()) > 0


def test_real_datasets_are_unchanged_when_nothing_is_cold():
    from sidrec.data.sources import load_amazon_prepared, load_movielens_100k

    for ds in (load_movielens_100k(str(shared_data("ml-100k"))),
               load_amazon_prepared(str(shared_data("amazon18-industrial")))):
        assert cs.hold_out_train(ds.splits["train"], set()).equals(ds.splits["train"])


# ------------------------------------------------------------------------------------------ fingerprints
def test_off_leaves_every_stage_config_as_it_was_and_on_changes_them(tmp_path):
    off = load_config("quickstart", [f"store.root={tmp_path}"])
    assert cs.stage_config(off.eval) == {} and cs.stage_inputs(ArtifactStore(str(tmp_path)), off.eval) == {}
    section = cs.eval_section(off.eval)
    assert not set(cs.COLD_FIELDS) & set(section)
    assert section == {k: v for k, v in asdict(off.eval).items() if k not in cs.COLD_FIELDS}
    on = load_config("quickstart-cold", [f"store.root={tmp_path}"])
    assert cs.stage_config(on.eval) == {"cold_start": {"share": 0.1, "by": "newest"}}
    assert cs.eval_section(on.eval)["cold_start"] == 0.1
    assert "new_item_slots" not in section and cs.eval_section(on.eval)["new_item_slots"] == 1  # only a cold run adds items


# ------------------------------------------------------------------------------------------ leak check
def tiny_generic(tmp_path) -> tuple[list[str], list[str]]:
    """A generic catalog + timestamped log in tmp_path: 40 items with unique titles, 30 users."""
    rng = np.random.default_rng(0)
    titles = [f"item{i} {w}" for i, w in enumerate(rng.choice(["lamp", "saw", "glue", "drill", "tape"], 40))]
    lines = ["item_id,title"] + [f"{i},{t}" for i, t in enumerate(titles)]
    (tmp_path / "catalog.csv").write_text("\n".join(lines) + "\n")
    rows = ["user_id,item_id,timestamp"]
    for u in range(30):
        for pos, item in enumerate(rng.choice(40, size=int(rng.integers(5, 12)), replace=False)):
            rows.append(f"u{u},{item},{int(item) * 7 + pos * 50 + u}")
    (tmp_path / "inter.csv").write_text("\n".join(rows) + "\n")
    return [str(i) for i in range(40)], titles


def tiny_config(tmp_path, extra: list[str] = ()):
    return load_config(None, [f"store.root={tmp_path / 'store'}", "data.format=generic",
                              f"data.catalog={tmp_path / 'catalog.csv'}", f"data.interactions={tmp_path / 'inter.csv'}",
                              "eval.cold_start=0.2", *extra])


def training_inputs(store: ArtifactStore, cfg) -> dict[str, set[str]]:
    """Every training input of the store that is built, as the set of item ids it names."""
    from sidrec.eval import evaluator

    out = {"train split": items_of(store.split("train")), "valid split": items_of(store.split("valid")),
           "baseline fit data": items_of(evaluator.training_examples(store, cfg.train.train_on_valid))}
    if store.manifest("embeddings") and store.manifest("quantizer"):
        from sidrec.stages.quantizer import fit_input

        out["quantizer fit"] = set(fit_input(store, cs.cold_items(store))[0])
        if COLLAB_FILE in store.require("quantizer")["files"]:
            vec = store.read_table(f"{store.current_path('quantizer')}/{COLLAB_FILE}")
            out["collaborative co-occurrence"] = {i for i, seen in zip(vec["item_id"].to_pylist(),
                                                                       vec["observed"].to_pylist(), strict=True) if seen}
    if store.manifest("sids"):
        out["sids (alignment rows, SID token init)"] = set(store.sid_map())
    if store.manifest("instructions"):
        from sidrec.llm.train.data import read_rows

        for split in ("train", "valid"):
            for row in read_rows(store, f"{store.current_path('instructions')}/{split}"):
                out.setdefault(f"{split} {row['task']} rows", set()).add(row["target_item"])
    return out


def assert_no_leak(store: ArtifactStore, cfg, titles: dict[str, str]) -> list[str]:
    from sidrec.stages.base_model import tokenizer_corpus

    cold = set(cs.cold_items(store))
    assert cold, "the store holds no cold item"
    inputs = training_inputs(store, cfg)
    corpus = set(tokenizer_corpus(store))
    inputs["tokenizer corpus"] = {i for i, title in titles.items() if title in corpus}
    leaks = {name: items & cold for name, items in inputs.items() if items & cold}
    assert not leaks, f"cold items in training inputs: {leaks}"
    return sorted(cold, key=int)


def test_no_cold_item_in_the_dataset_stage_or_the_baselines_fit(tmp_path, monkeypatch):
    ids, titles = tiny_generic(tmp_path)
    cfg = tiny_config(tmp_path)
    store = ArtifactStore(cfg.store.root)
    manifest = dataset_stage.build(store, cfg)
    assert manifest["config"]["cold_start"] == {"share": 0.2, "by": "newest"}
    assert manifest["metrics"]["cold_start"]["items"] == 8
    cold = assert_no_leak(store, cfg, dict(zip(ids, titles, strict=True)))
    first: dict[str, int] = {}
    for line in (tmp_path / "inter.csv").read_text().splitlines()[1:]:
        _, item, ts = line.split(",")
        first[item] = min(first.get(item, int(ts)), int(ts))
    assert cold == sorted(sorted(first, key=lambda i: -first[i])[:8], key=int)  # the newest 8 by first interaction
    # most-popular and SASRec are fitted over the warm catalog on held-out data and read histories without
    # the cold items; the content baseline reads the full histories
    from sidrec.eval import evaluator

    seen = {}

    class Spy:
        def __init__(self, name, catalog, train):
            seen[name] = (set(catalog), items_of(train))

        def recommend(self, histories, k, exclude_history=False):
            seen.setdefault("histories", {})[self] = histories
            return [[] for _ in histories]

    monkeypatch.setattr(evaluator, "fit_baseline",
                        lambda name, store, cfg, train, catalog: Spy(name, catalog, train))
    test = store.split("test")
    histories = test["history"].to_pylist()
    evaluator.rank_with_baselines(store, cfg, histories, ids, set(cold))
    assert set(seen) - {"histories"} == {"most_popular", "sasrec", "content"}
    for name in ("most_popular", "sasrec"):
        catalog, data = seen[name]
        assert not (catalog | data) & set(cold) and catalog == set(ids) - set(cold)
    read = list(seen["histories"].values())
    assert read[0] == read[1] == cs.without(histories, set(cold)) and read[2] == histories


@pytest.mark.slow
def test_no_cold_item_in_any_stage_output_of_a_real_store(tmp_path, local_ray):
    """The real stages (MiniLM embeddings, collaborative vectors, an RQ-KMeans fit, SIDs, instruction rows, the
    preset tokenizer) on a tiny generic dataset with 20% of the items cold."""
    from sidrec.pipeline import run

    ids, titles = tiny_generic(tmp_path)
    cfg = tiny_config(tmp_path, ["quantize.method=rqkmeans", "quantize.codebook_size=8", "quantize.levels=2",
                                 "embed.num_actors=1", "embed.cpus_per_actor=0.5", "model.hidden_size=32",
                                 "model.num_heads=2", "model.num_kv_heads=1", "model.num_layers=1",
                                 "model.intermediate_size=64", "model.tokenizer_vocab_size=300",
                                 "quantize.collab_weight=0.5", "quantize.collab_dim=4"])
    manifests = run(cfg, until="base_model")
    store = ArtifactStore(cfg.store.root)
    cold = assert_no_leak(store, cfg, dict(zip(ids, titles, strict=True)))
    embedded = store.read_table(f"{store.current_path('embeddings')}/embeddings", columns=["item_id"])
    assert set(cold) <= set(embedded["item_id"].to_pylist())  # their text is still embedded (content baseline)
    fit = manifests["quantizer"]["metrics"]  # what the Ray task really fitted on
    assert fit["held_out_items"] == len(cold) and fit["items"] == embedded.num_rows - len(cold)
    assert fit["collab_observed_items"] == embedded.num_rows - len(cold)   # every warm item, no cold one
    # a cold item added later (the admin path) gets the very collaborative vector the stage stored for it
    from sidrec.catalog.encoder import ItemEncoder
    from sidrec.sids.embed import read_embeddings

    enc = ItemEncoder(cfg.store.root)
    all_ids, text = read_embeddings(store)
    rows = [all_ids.index(i) for i in cold]
    stored = enc.collab.combine(text[rows], enc.collab.lookup(cold))
    assert np.allclose(enc.quantizer_input(text[rows]), stored, atol=1e-5)
    # an update of an item with clicks keeps its own vector; an add of the same text gets an imputed one
    warm = next(i for i, seen in zip(enc.collab.item_ids, enc.collab.observed, strict=True) if seen)
    t = text[[all_ids.index(warm)]]
    own = enc.collab.combine(t, enc.collab.lookup([warm]))
    assert np.allclose(enc.quantizer_input(t, [warm]), own, atol=1e-5)
    added = enc.quantizer_input(t, ["not-in-the-catalog"])
    assert np.allclose(added, enc.collab.combine(t, enc.collab.for_text(t, enc.known_text)), atol=1e-5)
    assert not np.allclose(added, own, atol=1e-3)
    assert {"next_item", "sid_to_title", "title_to_sid"} <= {k.split()[1] for k in training_inputs(store, cfg)
                                                             if k.startswith("train ") and k.endswith(" rows")}
