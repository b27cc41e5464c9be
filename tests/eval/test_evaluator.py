"""Evaluator: metric formulas on hand-computed cases, and the real eval stage on a small trained store."""

import math

import numpy as np
import pytest

from sidrec.config import ConfigError, EvalConfig
from sidrec.eval.metrics import hr_ndcg, personalization, target_ranks
from sidrec.eval.report import format_table
from sidrec.stages import eval as evaluation
from sidrec.store import ArtifactStore


def test_target_ranks():
    recs = [["a", "b", "c"], ["c", "a"], ["x"]]
    assert target_ranks(recs, ["b", "c", "y"]).tolist() == [1, 0, -1]
    with pytest.raises(ValueError, match="2 recommendation lists for 3 targets"):
        target_ranks(recs[:2], ["a", "b", "c"])


def test_hr_ndcg_hand_computed():
    ranks = np.array([0, 3, 7, -1, 12])  # 5 users: hit at 1st, 4th, 8th place, a miss, 13th place
    m = hr_ndcg(ranks)
    assert m["hr@1"] == pytest.approx(1 / 5)
    assert m["hr@5"] == pytest.approx(2 / 5)
    assert m["hr@10"] == pytest.approx(3 / 5)
    assert m["ndcg@1"] == pytest.approx(1 / 5)
    assert m["ndcg@5"] == pytest.approx((1 + 1 / math.log2(5)) / 5)
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(5) + 1 / math.log2(9)) / 5)
    with pytest.raises(ValueError, match="no examples"):
        hr_ndcg(np.array([]))


def test_personalization_hand_computed():
    same = [["a", "b"], ["b", "a"], ["a", "b"]]
    assert personalization(same) == 0.0  # one list for everyone, in any order
    assert personalization([["a", "b"], ["c", "d"]]) == 1.0
    assert personalization([["a", "b"], ["a", "c"], ["d", "e"]]) == pytest.approx(1 - (0.5 + 0 + 0) / 3)
    assert personalization([["a"]]) is None
    many = [[str(i % 2)] for i in range(300)]  # 44,850 pairs > max_pairs: a seeded sample, about half shared
    assert personalization(many, max_pairs=2_000) == pytest.approx(0.5, abs=0.05)
    assert personalization(many, max_pairs=2_000) == personalization(many, max_pairs=2_000)


def test_eval_config_validation_names_the_option():
    with pytest.raises(ConfigError, match="eval.num_beams must be >= 10, got 5"):
        EvalConfig(num_beams=5)
    with pytest.raises(ConfigError, match="unknown baseline.*'bpr'"):
        EvalConfig(baselines=["bpr"])


@pytest.mark.slow
def test_recommender_bad_inputs(trained_store):
    from sidrec.recommender import Recommender, UnknownItemsError

    cfg, root = trained_store
    rec = Recommender.from_store(root, num_beams=12)
    with pytest.raises(UnknownItemsError, match="unknown item ids: \\['nope', 'zzz'\\]"):
        rec.recommend([["1", "nope"], ["zzz"]], k=5)
    with pytest.raises(ValueError, match="empty history and no profile"):
        rec.recommend([[]], k=5)
    with pytest.raises(ValueError, match="k must be in \\[1, num_beams=12\\]"):
        rec.recommend([["1"]], k=13)
    cold = rec.recommend([[]], k=5, profiles=["a 30-year-old female engineer"])[0]
    assert len([i for h in cold for i in h.items]) == 5
    recs = rec.top_items([["1", "2", "3"]], k=10, exclude_history=True)[0]
    assert len(recs) == 10 and not {"1", "2", "3"} & set(recs) and set(recs) <= set(rec.titles)


@pytest.mark.slow
def test_eval_stage_end_to_end(trained_store):
    cfg, root = trained_store
    store = ArtifactStore(root)
    manifest = evaluation.build(store, cfg)
    path = store.current_path("eval_test")
    report = store.read_json(f"{path}/report.json")
    assert report["examples"] == 48 and report["training_data"] == "train only"
    assert set(report["models"]) == {"sid-llm", "most-popular", "sasrec"}
    for metrics in report["models"].values():
        assert 0 <= metrics["hr@1"] <= metrics["hr@5"] <= metrics["hr@10"] <= 1
        assert metrics["ndcg@1"] <= metrics["ndcg@5"] <= metrics["ndcg@10"] <= metrics["hr@10"]
    # the stored predictions reproduce the reported metrics
    preds = store.read_table(f"{path}/predictions.parquet").to_pylist()
    ranks = target_ranks([p["sid-llm"] for p in preds], [p["target"] for p in preds])
    assert hr_ndcg(ranks) == pytest.approx(report["models"]["sid-llm"])
    assert all(len(p["sid-llm"]) == 10 for p in preds)
    assert 0 <= report["unconstrained_invalid_share"] <= 1
    assert report["personalization"]["sid-llm"] == pytest.approx(personalization([p["sid-llm"] for p in preds]))
    md = store.read_bytes(f"{path}/report.md").decode()
    assert f"sid-llm {report['personalization']['sid-llm']:.3f}" in md
    assert format_table(report) in md and "| sasrec |" in md
    assert store.read_bytes(f"{path}/chart.png")[:4] == b"\x89PNG"
    # unchanged inputs: the stage is skipped
    assert evaluation.build(store, cfg)["version"] == manifest["version"]


@pytest.fixture(scope="module")
def quickstart_store(local_ray, tmp_path_factory):
    """The shipped quickstart config's SIDs and training budget (1,800 steps), on the real ml-100k."""
    from sidrec.config import load_config
    from sidrec.pipeline import run
    from tests.conftest import shared_data

    root = tmp_path_factory.mktemp("quickstart") / "store"
    run(load_config("quickstart", [f"store.root={root}", f"data.path={shared_data('ml-100k')}"]), until="model")
    return str(root)


@pytest.mark.slow
def test_different_histories_get_different_recommendations(quickstart_store):
    """The quickstart model reads the history: users with unlike histories (sci-fi vs. children's films) get
    unlike lists, not the one list a popularity model gives everyone. Measured on this machine with the
    shipped 1,800 steps: 1 of the 10 items shared (The Terminator, Die Hard, Aliens... against Beauty and the
    Beast, Dumbo, The Sword in the Stone...); 2 at the earlier 900 steps, 5 at 300.
    """
    from sidrec.recommender import Recommender

    rec = Recommender.from_store(quickstart_store, num_beams=20)
    scifi = ["50", "172", "181", "89", "82"]  # Star Wars, Empire Strikes Back, Return of the Jedi, Blade Runner, Jurassic Park
    kids = ["1", "71", "95", "99", "143"]  # Toy Story, The Lion King, Aladdin, Snow White, The Sound of Music
    a, b = rec.top_items([scifi, kids], k=10, exclude_history=True)
    assert len(a) == len(b) == 10 and not (set(a) & set(scifi)) and not (set(b) & set(kids))
    assert len(set(a) & set(b)) <= 4, (a, b)
