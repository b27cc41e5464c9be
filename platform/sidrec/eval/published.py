"""Published next-item results on exactly the test sets sidrec reads, keyed by dataset.

Source: ../shared/data/README.md (the "Published ..." lines of its amazon18-industrial and amazon14-beauty
sections); only the numbers given there. ``bench/quality.py`` and the run report (``sidrec.eval.html_report``)
put them beside our rows.
"""

from __future__ import annotations

from typing import Any

PUBLISHED_SOURCE = "../shared/data/README.md"

# data.format -> the dataset name the published rows (and bench/quality.py's tables) are keyed by
FORMAT_DATASET = {"movielens_100k": "ml-100k", "amazon_prepared": "amazon-industrial",
                  "amazon14_beauty": "amazon14-beauty"}

PUBLISHED: dict[str, dict[str, Any]] = {
    "amazon-industrial": {
        "source": "MiniOneRec paper, quoted in ../shared/data/README.md",
        "training_data": "full published train (36,259 rows)",
        "rows": {
            "SASRec": {"hr@5": 0.0909, "ndcg@5": 0.0748, "hr@10": 0.1088, "ndcg@10": 0.0806},
            "GRU4Rec": {"hr@10": 0.0999, "ndcg@10": 0.0669},
            "HSTU": {"hr@10": 0.1163, "ndcg@10": 0.0958},
            "TIGER": {"hr@5": 0.1010, "ndcg@5": 0.0807, "hr@10": 0.1321, "ndcg@10": 0.0908},
            "LC-Rec": {"hr@10": 0.1332, "ndcg@10": 0.0952},
            "BIGRec": {"hr@10": 0.1370, "ndcg@10": 0.0997},
            "D3": {"hr@10": 0.1500, "ndcg@10": 0.1082},
            "MiniOneRec (Qwen2.5-1.5B, SFT + RL)": {"hr@5": 0.1321, "ndcg@5": 0.1084,
                                                    "hr@10": 0.1586, "ndcg@10": 0.1167},
        },
    },
    "amazon14-beauty": {
        "source": "published (TIGER, LETTER), quoted in ../shared/data/README.md",
        "training_data": "train (leave-one-out)",
        "rows": {
            "TIGER": {"hr@5": 0.0454, "ndcg@5": 0.0321, "hr@10": 0.0648, "ndcg@10": 0.0384},
            "LETTER-TIGER": {"hr@10": 0.0672, "ndcg@10": 0.0364},
            "LC-Rec": {"hr@10": 0.0642, "ndcg@10": 0.0374},
            "LETTER-LC-Rec": {"hr@10": 0.0703, "ndcg@10": 0.0418},
        },
    },
}


def published_for_format(data_format: str | None) -> dict[str, Any] | None:
    """The published results on the test set a ``data.format`` reads (None: nothing published for it)."""
    return PUBLISHED.get(FORMAT_DATASET.get(data_format or "", ""))
