"""The cold-start evaluation's parts: cold / warm slices that partition the examples with hand-counted metrics,
the content baseline on a catalog with known embeddings, and the report's cold-start tables (Markdown, HTML)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sidrec.config import EvalConfig
from sidrec.eval.baselines import ContentBaseline
from sidrec.eval.cold import COLD, WARM, cold_report, slices
from sidrec.eval.evaluator import baseline_names
from sidrec.eval.report import format_cold_start, format_table, markdown


def test_slices_partition_the_examples_and_match_a_hand_count():
    targets = ["c1", "w1", "w2", "c2", "w3"]
    cold = {"c1", "c2", "c9"}
    columns = {
        "a": [["c1", "x"], ["x", "y", "w1"], ["w2"], ["x"] * 10, ["x"] * 5 + ["w3"]],  # ranks 0, 2, 0, miss, 5
        "b": [["x"], ["w1"], ["x"], ["x", "c2"], ["x"]],                               # miss, 0, miss, 1, miss
    }
    out = slices(columns, targets, cold)
    assert list(out) == [COLD, WARM]
    assert out[COLD]["examples"] + out[WARM]["examples"] == len(targets)
    assert (out[COLD]["examples"], out[WARM]["examples"]) == (2, 3)
    a_cold, a_warm, b_cold, b_warm = out[COLD]["a"], out[WARM]["a"], out[COLD]["b"], out[WARM]["b"]
    assert a_cold["hr@1"] == a_cold["hr@10"] == 0.5 and a_cold["ndcg@10"] == 0.5  # c1 first, c2 missed
    assert a_warm["hr@1"] == pytest.approx(1 / 3) and a_warm["hr@5"] == pytest.approx(2 / 3)
    assert a_warm["hr@10"] == 1.0
    assert a_warm["ndcg@10"] == pytest.approx((1 / math.log2(4) + 1 + 1 / math.log2(7)) / 3)
    assert b_cold["hr@1"] == 0 and b_cold["hr@5"] == 0.5 and b_cold["ndcg@5"] == pytest.approx(0.5 / math.log2(3))
    assert b_warm["hr@10"] == pytest.approx(1 / 3) and b_warm["ndcg@1"] == pytest.approx(1 / 3)
    # a slice without examples carries its count only
    assert slices(columns, targets, set())[COLD] == {"examples": 0}


def test_content_baseline_ranks_by_cosine_to_the_history_mean():
    ids = ["a", "b", "c", "d", "e"]
    emb = np.array([[1, 0, 0], [0, 1, 0], [0.9, 0.1, 0], [0.6, 0.6, 0], [0, 0, 2]], np.float32)
    model = ContentBaseline(ids, emb)
    # history [a]: c (cos .99), d (.71), a itself (1.0) first when not excluded
    assert model.recommend([["a"]], k=3) == [["a", "c", "d"]]
    assert model.recommend([["a"]], k=3, exclude_history=True) == [["c", "d", "b"]]
    # history [a, b]: the mean (.5, .5, 0) is d's direction
    assert model.recommend([["a", "b"]], k=2, exclude_history=True) == [["d", "c"]]
    # scale does not matter (cosine), ties go by catalog order, an empty history scores all items 0
    assert model.recommend([["e"]], k=2, exclude_history=True) == [["a", "b"]]
    assert model.recommend([[]], k=5) == [ids]
    assert model.recommend([["a"]] * 3, k=1, batch_size=2) == [["a"]] * 3
    with pytest.raises(ValueError, match="not in the catalog"):
        model.recommend([["zz"]], k=1)
    with pytest.raises(ValueError, match="one embedding row per item"):
        ContentBaseline(ids, emb[:3])


def test_a_cold_start_run_always_ranks_the_content_baseline():
    assert baseline_names(EvalConfig()) == ["most_popular", "sasrec"]
    assert baseline_names(EvalConfig(cold_start=0.1)) == ["most_popular", "sasrec", "content"]
    assert baseline_names(EvalConfig(cold_start=0.1, baselines=["content"])) == ["content"]


def test_report_tables():
    targets = ["c1", "w1"]
    columns = {"sid-llm": [["c1"], ["x"]], "sasrec": [["x"], ["w1"]]}
    added = {"item_ids": ["c1", "c2"], "codes": [[1, 2], [1, 3]], "titles": ["t1", "t2"], "exact": 1,
             "embedding_cosine_min": 1.0, "seconds": 2.5}
    part = cold_report(EvalConfig(cold_start=0.1), columns, [["c2"], ["w1"]], targets, ["c1", "c2"], added)
    assert part["cold_start"][COLD]["held-out items"] == 2 and part["cold_start"][COLD]["examples"] == 1
    assert part["cold_start"][COLD]["sasrec"]["hr@10"] == 0 and part["cold_start"][WARM]["sasrec"]["hr@1"] == 1
    items = part["cold_items"]
    assert items["sids_exact"] == 1 and items["sids_nearest_free"] == 1 and items["examples_with_cold_history"] == 1
    report = {"name": "x", "split": "test", "examples": 2, "catalog_items": 9, "training_data": "train only",
              "decode": {"num_beams": 20, "scoring": "raw", "exclude_history": False},
              "models": {"sid-llm": {f"{m}@{k}": 0.5 for m in ("hr", "ndcg") for k in (1, 5, 10)}}} | part
    text = format_cold_start(report)
    assert "## Cold start: 2 items held out" in text and "### cold targets: 1 examples" in text
    assert text.index("### cold targets") < text.index("### warm targets") and "| sasrec | 0.0000" in text
    md = markdown(report)
    assert format_table(report) in md and text in md
    assert format_cold_start({"models": {}}) == "" and "Cold start" not in markdown(report | {"cold_start": {}})


def test_report_counts_the_places_cold_items_got_and_the_reservation():
    columns = {"sid-llm": [["c1", "w2"], ["c2", "c1"]], "sasrec": [["w2"], ["w1"]]}
    added = {"item_ids": ["c1", "c2"], "codes": [[1, 2], [1, 3]], "titles": ["t1", "t2"], "exact": 2,
             "embedding_cosine_min": 1.0}
    ecfg = EvalConfig(cold_start=0.1, new_item_slots=2)
    items = cold_report(ecfg, columns, [["w1"], ["w2"]], ["c1", "w1"], ["c1", "c2"], added)["cold_items"]
    assert items["new_item_slots"] == 2 and items["cold_places"] == {"sid-llm": 3, "sasrec": 0}
    assert EvalConfig().new_item_slots == 1  # the default reservation, as ServeSettings'
    report = {"cold_start": {COLD: {"examples": 1}}, "cold_items": items}
    assert "2 of the top-10 places reserved" in format_cold_start(report)
    with pytest.raises(ValueError, match="eval.new_item_slots"):
        EvalConfig(new_item_slots=10)  # the first place is the model's own
