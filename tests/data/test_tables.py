"""Data layer: real-data adapters (exact published counts), validation of malformed inputs, k-core, splits."""

import gzip
import json
import logging
import re
import urllib.request
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sidrec.data.sources import (
    fetch_movielens_100k,
    load_amazon14_beauty,
    load_amazon_prepared,
    load_amazon_reviews,
    load_movielens_100k,
)
from sidrec.data.tables import (
    DataValidationError,
    kcore_filter,
    leave_one_out,
    normalize_catalog,
    normalize_examples,
    normalize_interactions,
    read_table,
)

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def _needs(name: str):
    return pytest.mark.skipif(not (DATA / name).is_dir(), reason=f"real data {DATA / name} not present")


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


# ----------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def ml100k():
    return load_movielens_100k(str(DATA / "ml-100k"))


@_needs("ml-100k")
def test_movielens_counts_and_profiles(ml100k):
    assert ml100k.catalog.num_rows == 1682
    assert len(ml100k.profiles) == 943
    assert {k: v.num_rows for k, v in ml100k.splits.items()} == {"train": 100_000 - 3 * 943, "valid": 943,
                                                                "test": 943}
    assert ml100k.profiles["1"] == "a 24-year-old male technician"
    assert ml100k.profiles["2"] == "a 53-year-old female"  # occupation "other" says nothing
    assert ml100k.issues == []
    toy_story = ml100k.catalog.slice(0, 1).to_pylist()[0]
    assert toy_story == {"item_id": "1", "title": "Toy Story (1995)", "description": "", "brand": "",
                         "categories": "Animation > Children's > Comedy"}


@_needs("ml-100k")
def test_movielens_splits_follow_time_order(ml100k):
    seqs = defaultdict(list)
    for line in (DATA / "ml-100k" / "u.data").read_text().splitlines():
        user, item, _rating, ts = line.split("\t")
        seqs[user].append((int(ts), int(item)))
    seqs = {u: [str(item) for _, item in sorted(s)] for u, s in seqs.items()}

    test = {r["user_id"]: r for r in ml100k.splits["test"].to_pylist()}
    valid = {r["user_id"]: r for r in ml100k.splits["valid"].to_pylist()}
    train = defaultdict(list)
    for r in ml100k.splits["train"].to_pylist():
        train[r["user_id"]].append(r)
    for user, seq in seqs.items():
        assert test[user] == {"user_id": user, "history": seq[-21:-1], "target": seq[-1]}
        assert valid[user] == {"user_id": user, "history": seq[-22:-2], "target": seq[-2]}
        # train targets are exactly the items before the valid one, in time order, each with its own past
        assert [r["target"] for r in train[user]] == seq[1:-2]
        assert all(r["history"] == seq[max(0, i - 20):i] for i, r in enumerate(train[user], start=1))
    assert max(len(h) for h in ml100k.splits["train"]["history"].to_pylist()) == 20


@_needs("amazon18-industrial")
def test_amazon_industrial_prepared():
    ds = load_amazon_prepared(str(DATA / "amazon18-industrial"))
    assert ds.catalog.num_rows == 3686
    assert {k: v.num_rows for k, v in ds.splits.items()} == {"train": 10_393, "valid": 4532, "test": 4533}
    assert ds.profiles == {} and ds.issues == []
    ids = set(ds.catalog["item_id"].to_pylist())
    for split in ds.splits.values():
        assert set(split["target"].to_pylist()) <= ids
        assert {i for h in split["history"].to_pylist() for i in h} <= ids
    first = json.loads((DATA / "amazon18-industrial" / "test.jsonl").read_text().splitlines()[0])
    assert ds.splits["test"].slice(0, 1).to_pylist()[0] == {
        "user_id": first["user_id"], "history": [str(i) for i in first["history"]], "target": str(first["target"])}
    assert not any(re.search(r"&#?\w+;", t) for t in ds.catalog["title"].to_pylist())  # 87 raw titles have some


@_needs("amazon14-beauty")
def test_amazon14_beauty():
    ds = load_amazon14_beauty(str(DATA / "amazon14-beauty"))
    assert ds.catalog.num_rows == 12_101
    assert {k: v.num_rows for k, v in ds.splits.items()} == {"train": 198_502 - 3 * 22_363, "valid": 22_363,
                                                            "test": 22_363}
    user, *seq = (DATA / "amazon14-beauty" / "sequential_data.txt").read_text().splitlines()[0].split()
    assert ds.splits["test"].slice(0, 1).to_pylist()[0] == {"user_id": user, "history": seq[-21:-1],
                                                           "target": seq[-1]}
    titles = ds.catalog["title"].to_pylist()
    assert not any(re.search(r"&#?\w+;", t) for t in titles) and any(" & " in t for t in titles)
    assert ds.catalog.slice(0, 1).to_pylist()[0]["categories"] == "Beauty > Makeup > Nails > Nail Polish"


# ----------------------------------------------------------------------------- Amazon raw reviews


def test_amazon_reviews_2018_gz(tmp_path, caplog):
    reviews = [  # X has no title in meta; D survives no 2-core; u3 then has one item left
        ("u1", "A", 100), ("u1", "B", 200), ("u1", "C", 300), ("u1", "A", 400), ("u1", "X", 150),
        ("u2", "B", 50), ("u2", "A", 100), ("u2", "C", 400), ("u3", "D", 10), ("u3", "A", 20),
    ]
    _write_jsonl(tmp_path / "r.json.gz", [{"reviewerID": u, "asin": i, "overall": 5.0, "unixReviewTime": t}
                                          for u, i, t in reviews])
    meta = [
        {"asin": "A", "title": "Alpha &amp; Co", "brand": "Acme", "category": ["Tools", "Hand"],
         "description": ["d1", "d2"]},
        {"asin": "A", "title": "Duplicate A"},
        {"asin": "B", "title": "Beta"}, {"asin": "C", "title": "Gamma"}, {"asin": "D", "title": "Delta"},
        {"asin": "X", "title": "  "},
    ]
    _write_jsonl(tmp_path / "meta.json.gz", meta)
    with caplog.at_level(logging.WARNING, logger="sidrec.data"):
        ds = load_amazon_reviews(str(tmp_path / "r.json.gz"), str(tmp_path / "meta.json.gz"), kcore=2)
    assert ds.name == "r"
    assert ds.issues == [
        "meta: ignored 1 records without an id or title and 1 repeated records",
        "interactions: 1 row naming items without a title in meta (e.g. 'X'); dropped",
    ]
    assert [r.getMessage() for r in caplog.records] == ds.issues
    assert ds.catalog.to_pylist()[0] == {"item_id": "A", "title": "Alpha & Co", "description": "d1 d2",
                                        "brand": "Acme", "categories": "Tools > Hand"}
    assert ds.catalog["item_id"].to_pylist() == ["A", "B", "C"]
    assert ds.splits["test"].to_pylist() == [
        {"user_id": "u1", "history": ["A", "B", "C"], "target": "A"},
        {"user_id": "u2", "history": ["B", "A"], "target": "C"},
    ]
    assert ds.splits["valid"]["target"].to_pylist() == ["C", "A"]
    assert ds.splits["train"].to_pylist() == [{"user_id": "u1", "history": ["A"], "target": "B"}]


def test_amazon_reviews_2023(tmp_path):
    rows = [("u1", "P1", 1_000), ("u1", "P2", 2_000), ("u1", "P3", 3_000)]
    _write_jsonl(tmp_path / "Toys.jsonl", [{"user_id": u, "parent_asin": i, "asin": "child", "rating": 4.0,
                                             "timestamp": t} for u, i, t in rows])
    _write_jsonl(tmp_path / "meta_Toys.jsonl", [
        {"parent_asin": p, "title": f"T{p}", "store": "Shop", "categories": ["Toys"], "description": []}
        for p in ("P1", "P2", "P3")
    ])
    ds = load_amazon_reviews(str(tmp_path / "Toys.jsonl"), str(tmp_path / "meta_Toys.jsonl"), kcore=0)
    assert ds.name == "Toys" and ds.issues == []
    assert ds.catalog["brand"].to_pylist() == ["Shop"] * 3
    assert ds.splits["test"].to_pylist() == [{"user_id": "u1", "history": ["P1", "P2"], "target": "P3"}]


def test_amazon_reviews_unknown_format(tmp_path):
    _write_jsonl(tmp_path / "r.jsonl", [{"who": "u1", "what": "A"}])
    with pytest.raises(DataValidationError, match=r"unrecognised Amazon format \(keys: what, who\)"):
        load_amazon_reviews(str(tmp_path / "r.jsonl"), str(tmp_path / "r.jsonl"))


# ----------------------------------------------------------------------------- malformed inputs


def _bad_both_ways(normalize, path: Path, expected: str, caplog) -> pa.Table:
    """Raises with `expected` by default; with on_bad_rows='drop' logs and records it, returns the rest."""
    with pytest.raises(DataValidationError) as err:
        normalize(read_table(str(path)))
    assert expected in str(err.value)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sidrec.data"):
        table, issues = normalize(read_table(str(path)), on_bad_rows="drop")
    assert issues == [f"{expected}; dropped"]
    assert [r.getMessage() for r in caplog.records] == issues
    return table


def test_catalog_duplicate_ids_csv(tmp_path, caplog):
    path = tmp_path / "items.csv"
    path.write_text("item_id,title\n1,A\n2,B\n1,C\n3,D\n2,E\n")
    table = _bad_both_ways(normalize_catalog, path, "catalog: 2 rows with a duplicate item_id (e.g. '1', '2')",
                           caplog)
    assert table["item_id"].to_pylist() == ["1", "2", "3"] and table["title"].to_pylist() == ["A", "B", "D"]


def test_catalog_empty_title_jsonl(tmp_path, caplog):
    path = _write_jsonl(tmp_path / "items.jsonl", [{"item_id": 1, "title": "ok"}, {"item_id": 2, "title": "  "},
                                                   {"item_id": 3, "title": None}])
    table = _bad_both_ways(normalize_catalog, path, "catalog: 2 rows with an empty title (e.g. '2', '3')", caplog)
    assert table.to_pylist() == [{"item_id": "1", "title": "ok", "description": "", "brand": "", "categories": ""}]


def test_catalog_null_ids(tmp_path, caplog):
    path = _write_jsonl(tmp_path / "items.jsonl", [{"item_id": "a", "title": "A"}, {"item_id": None, "title": "B"},
                                                   {"item_id": " ", "title": "C"}])
    table = _bad_both_ways(normalize_catalog, path, "catalog: 2 rows with null or empty item_id (e.g. row 1, row 2)",
                           caplog)
    assert table["item_id"].to_pylist() == ["a"]


def test_catalog_missing_title_column_parquet(tmp_path):
    path = tmp_path / "items.parquet"
    pq.write_table(pa.table({"item_id": ["1"], "name": ["x"]}), path)
    for mode in ("error", "drop"):  # a schema problem cannot be fixed by dropping rows
        with pytest.raises(DataValidationError,
                           match=r"missing required column 'title' \(columns present: item_id, name\)"):
            normalize_catalog(read_table(str(path)), on_bad_rows=mode)


def test_catalog_numeric_title_csv(tmp_path):
    path = tmp_path / "items.csv"
    path.write_text("item_id,title\n1,10\n2,20\n")
    with pytest.raises(DataValidationError, match="column 'title' must be string, got int64"):
        normalize_catalog(read_table(str(path)), on_bad_rows="drop")


def test_catalog_normalizes_types_and_keeps_extras():
    table, issues = normalize_catalog(pa.table({
        "item_id": [7, 8], "title": ["a", "b"], "categories": [["X", "Y"], None], "asin": ["B01", None],
        "rank": [3, 4], "meta": [{"k": 1}, {"k": 2}],  # a struct is not text: left out
    }))
    assert issues == []
    assert table.column_names == ["item_id", "title", "description", "brand", "categories", "asin", "rank"]
    assert table.to_pylist()[0] == {"item_id": "7", "title": "a", "description": "", "brand": "",
                                    "categories": "X > Y", "asin": "B01", "rank": "3"}
    assert table["categories"].to_pylist()[1] == "" and table["asin"].to_pylist()[1] == ""


EXAMPLE_ITEMS = {"1", "2", "3"}


def _examples(table, on_bad_rows="error"):
    return normalize_examples(table, EXAMPLE_ITEMS, on_bad_rows=on_bad_rows)


def test_examples_unknown_history_items(tmp_path, caplog):
    path = _write_jsonl(tmp_path / "train.jsonl", [
        {"user_id": "u1", "history": [1, 2], "target": 3},
        {"user_id": "u2", "history": [1, 9, 8], "target": 2},
        {"user_id": "u3", "history": [7, 9], "target": 1},
    ])
    table = _bad_both_ways(_examples, path,
                           "examples: 2 rows whose history names 3 unknown item ids (e.g. '9', '8', '7')", caplog)
    assert table.to_pylist() == [{"user_id": "u1", "history": ["1", "2"], "target": "3"}]


def test_examples_unknown_target(tmp_path, caplog):
    path = _write_jsonl(tmp_path / "test.jsonl", [
        {"user_id": "u1", "history": ["1"], "target": "42"}, {"user_id": "u2", "history": ["1"], "target": "2"},
    ])
    table = _bad_both_ways(_examples, path, "examples: 1 row whose target is an unknown item id (e.g. '42')",
                           caplog)
    assert table["user_id"].to_pylist() == ["u2"]


def test_examples_empty_history_parquet(tmp_path, caplog):
    path = tmp_path / "valid.parquet"
    pq.write_table(pa.table({"user_id": ["a", "b", "c"], "history": [["1"], [], None], "target": ["2", "3", "1"]}),
                   path)
    table = _bad_both_ways(_examples, path, "examples: 2 rows with an empty history (e.g. row 1, row 2)", caplog)
    assert table["user_id"].to_pylist() == ["a"]


def test_examples_history_not_a_list(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("user_id,history,target\nu1,1 2,3\n")
    with pytest.raises(DataValidationError, match="column 'history' must be a list of item ids, got string"):
        normalize_examples(read_table(str(path)), EXAMPLE_ITEMS, on_bad_rows="drop")


def test_interactions_non_integer_timestamp_csv(tmp_path, caplog):
    path = tmp_path / "log.csv"
    path.write_text("user_id,item_id,timestamp,rating\nu1,007,100,5\nu1,2,1.5,4\nu2,3,abc,3\nu2,1, 200 ,1\n")
    table = _bad_both_ways(normalize_interactions, path,
                           "interactions: 2 rows with a non-integer timestamp (e.g. '1.5', 'abc')", caplog)
    assert table.to_pylist() == [
        {"user_id": "u1", "item_id": "007", "timestamp": 100, "rating": 5.0},
        {"user_id": "u2", "item_id": "1", "timestamp": 200, "rating": 1.0},
    ]
    assert table.schema.field("timestamp").type == pa.int64()


def test_interactions_null_timestamp(caplog):
    table = pa.table({"user_id": [1, 2], "item_id": [3, 4], "timestamp": [10, None]})
    with pytest.raises(DataValidationError, match=r"interactions: 1 row with null timestamp \(e.g. row 1\)"):
        normalize_interactions(table)
    assert normalize_interactions(table, on_bad_rows="drop")[0].num_rows == 1


# ----------------------------------------------------------------------------- reading, k-core, splits


def test_read_table_formats(tmp_path):
    with pytest.raises(DataValidationError, match=r"items\.xlsx: unknown table format"):
        (tmp_path / "items.xlsx").write_text("x")
        read_table(str(tmp_path / "items.xlsx"))
    folder = tmp_path / "parts"
    folder.mkdir()
    pq.write_table(pa.table({"item_id": ["1", "2"]}), folder / "a.parquet")
    pq.write_table(pa.table({"item_id": ["3"]}), folder / "b.parquet")
    assert sorted(read_table(str(folder))["item_id"].to_pylist()) == ["1", "2", "3"]
    _write_jsonl(tmp_path / "x.jsonl.gz", [{"item_id": 1}])
    assert read_table(str(tmp_path / "x.jsonl.gz")).num_rows == 1


def _log(rows: list[tuple[str, str, int]]) -> pa.Table:
    users, items, ts = zip(*rows, strict=True)
    return pa.table({"user_id": list(users), "item_id": list(items), "timestamp": pa.array(ts, pa.int64())})


def test_kcore_filter_iterates():
    # 2-core: u4 and items c, d go first; that leaves u3 with one item, so u3 goes in the second round
    t = _log([("u1", "a", 1), ("u1", "b", 2), ("u1", "c", 3), ("u2", "a", 1), ("u2", "b", 2),
              ("u3", "a", 1), ("u3", "d", 2), ("u4", "d", 1)])
    got = kcore_filter(t, 2)
    assert sorted(zip(got["user_id"].to_pylist(), got["item_id"].to_pylist(), strict=True)) == [
        ("u1", "a"), ("u1", "b"), ("u2", "a"), ("u2", "b")]
    assert kcore_filter(t, 1) is t
    assert kcore_filter(t, 3).num_rows == 0


def test_leave_one_out_ties_by_numeric_item_id():
    t = _log([("1", "10", 5), ("1", "9", 5), ("1", "2", 1), ("1", "7", 9),
              ("2", "3", 1), ("2", "4", 2),  # two items: one train example only
              ("3", "5", 1)])                # one item: nothing
    splits = leave_one_out(t)
    assert splits["test"].to_pylist() == [{"user_id": "1", "history": ["2", "9", "10"], "target": "7"}]
    assert splits["valid"].to_pylist() == [{"user_id": "1", "history": ["2", "9"], "target": "10"}]
    assert splits["train"].to_pylist() == [{"user_id": "1", "history": ["2"], "target": "9"},
                                           {"user_id": "2", "history": ["3"], "target": "4"}]
    assert splits["train"].schema.field("history").type == pa.list_(pa.string())


def test_leave_one_out_ties_by_string_id_and_history_cap():
    t = _log([("u", "b", 5), ("u", "a", 5), ("u", "c", 1), ("u", "d", 9), ("u", "e", 10)])
    splits = leave_one_out(t, max_history=2)
    assert splits["test"].to_pylist() == [{"user_id": "u", "history": ["b", "d"], "target": "e"}]
    assert splits["valid"].to_pylist() == [{"user_id": "u", "history": ["a", "b"], "target": "d"}]
    assert splits["train"]["history"].to_pylist() == [["c"], ["c", "a"]]


def test_fetch_movielens_returns_existing_copy(tmp_path, monkeypatch):
    (tmp_path / "ml-100k").mkdir()
    (tmp_path / "ml-100k" / "u.data").write_text("1\t1\t5\t1\n")

    def no_network(*args, **kwargs):
        raise AssertionError("must not download")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    assert fetch_movielens_100k(str(tmp_path)) == str(tmp_path / "ml-100k")
