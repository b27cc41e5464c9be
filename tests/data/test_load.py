"""`load_dataset`: every option of the data section reaches the adapter it configures."""

import json
from pathlib import Path

from sidrec.config import DataConfig
from sidrec.data.load import load_dataset


def _beauty(root: Path, seqs: dict[str, list[int]], items: list[int]) -> Path:
    root.mkdir()
    (root / "sequential_data.txt").write_text("".join(f"{u} {' '.join(map(str, s))}\n" for u, s in seqs.items()))
    (root / "items.jsonl").write_text("".join(json.dumps({"item_id": i, "title": f"item {i}"}) + "\n" for i in items))
    return root


def test_amazon14_beauty_honours_max_history_and_on_bad_rows(tmp_path):
    # user 2 names item 99, which items.jsonl lacks: "drop" drops that row instead of failing
    root = _beauty(tmp_path / "beauty", {"1": [1, 2, 3, 4, 5, 6, 7], "2": [1, 99, 2, 3]}, list(range(1, 8)))
    ds = load_dataset(DataConfig(format="amazon14_beauty", path=str(root), max_history=2, on_bad_rows="drop"))
    assert max(len(h) for h in ds.splits["train"]["history"].to_pylist()) == 2
    assert ds.splits["test"].to_pylist()[0] == {"user_id": "1", "history": ["5", "6"], "target": "7"}
    assert any("99" in issue for issue in ds.issues)


def test_amazon_reviews_kcore_zero_means_off(tmp_path):
    reviews = [{"reviewerID": u, "asin": i, "overall": 5.0, "unixReviewTime": t}
               for u, seq in (("u1", "ABC"), ("u2", "BCA")) for t, i in enumerate(seq)]
    (tmp_path / "r.json").write_text("".join(json.dumps(r) + "\n" for r in reviews))
    (tmp_path / "meta.json").write_text("".join(json.dumps({"asin": i, "title": i}) + "\n" for i in "ABC"))
    cfg = DataConfig(format="amazon_reviews", interactions=str(tmp_path / "r.json"),
                     catalog=str(tmp_path / "meta.json"), kcore=0)
    ds = load_dataset(cfg)  # 0 = off: every user has 3 items, none would survive a 5-core
    assert ds.splits["test"]["user_id"].to_pylist() == ["u1", "u2"]
    assert ds.catalog.num_rows == 3
