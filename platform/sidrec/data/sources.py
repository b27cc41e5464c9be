"""Loaders for public datasets: MovieLens 100K, Amazon (prepared, raw reviews, the 2014 Beauty sequences).

Each returns a `Dataset` of canonical tables (see `sidrec.data.tables`).
"""

from __future__ import annotations

import gzip
import html
import json
import logging
import os
import shutil
import tempfile
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pa_csv

from sidrec.config import MAX_HISTORY
from sidrec.data.tables import (
    CATEGORY_SEP,
    BadRows,
    Dataset,
    DataValidationError,
    first_interactions,
    in_use,
    kcore_filter,
    known_items,
    leave_one_out,
    normalize_catalog,
    normalize_examples,
    normalize_interactions,
    read_table,
    unescape,
)

log = logging.getLogger(__name__)

ML100K_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"


# ----------------------------------------------------------------------------- MovieLens 100K

_ML_OCCUPATIONS = {"healthcare": "healthcare worker", "entertainment": "entertainment worker",
                   "marketing": "marketer", "retired": "retiree", "other": ""}


def _ml_profile(age: str, gender: str, occupation: str) -> str:
    """'a 24-year-old male technician'; 'an 18-year-old female'; 'a 30-year-old male with no occupation'."""
    article = "an" if age.startswith("8") or age in ("11", "18") else "a"
    words = [article, f"{age}-year-old", {"M": "male", "F": "female"}.get(gender, "")]
    if occupation == "none":
        words.append("with no occupation")
    else:
        words.append(_ML_OCCUPATIONS.get(occupation, occupation))
    return " ".join(w for w in words if w)


def load_movielens_100k(data_dir: str, max_history: int = MAX_HISTORY, kcore: int = 0,
                        on_bad_rows: BadRows = "error") -> Dataset:
    """MovieLens 100K from the raw GroupLens files; every rating is an implicit interaction."""
    root = Path(data_dir)
    genres = [line.split("|")[0] for line in (root / "u.genre").read_text(encoding="latin-1").splitlines()
              if line.strip()]
    rows = [line.split("|") for line in (root / "u.item").read_text(encoding="latin-1").splitlines()
            if line.strip()]
    catalog, issues = normalize_catalog(pa.table({
        "item_id": [r[0] for r in rows],
        "title": [r[1] for r in rows],
        "categories": [CATEGORY_SEP.join(g for g, flag in zip(genres, r[5:], strict=False)
                                         if flag == "1" and g != "unknown") for r in rows],
    }), on_bad_rows)

    ratings = pa_csv.read_csv(
        root / "u.data",
        read_options=pa_csv.ReadOptions(column_names=["user_id", "item_id", "rating", "timestamp"]),
        parse_options=pa_csv.ParseOptions(delimiter="\t"),
    )
    interactions, found = normalize_interactions(ratings, on_bad_rows)
    issues += found
    interactions = known_items(interactions, catalog, "naming items missing from u.item", on_bad_rows, issues)
    interactions = kcore_filter(interactions, kcore)

    profiles = {}
    for line in (root / "u.user").read_text(encoding="latin-1").splitlines():
        if line.strip():
            user_id, age, gender, occupation, _zip = line.split("|")
            profiles[user_id] = _ml_profile(age, gender, occupation)
    return Dataset("ml-100k", in_use(catalog, interactions), leave_one_out(interactions, max_history),
                   profiles, issues, first_interactions(interactions))


def fetch_movielens_100k(dest_dir: str) -> str:
    """Download and unzip ml-100k into dest_dir/ml-100k (once); returns that folder."""
    dest = Path(dest_dir)
    target = dest / "ml-100k"
    if (target / "u.data").exists():
        return str(target)
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:  # same filesystem, so the final rename is atomic
        archive = Path(tmp) / "ml-100k.zip"
        with urllib.request.urlopen(ML100K_URL, timeout=120) as response, open(archive, "wb") as f:
            shutil.copyfileobj(response, f)
        with zipfile.ZipFile(archive) as z:
            z.extractall(tmp)
        try:
            os.replace(Path(tmp) / "ml-100k", target)
        except OSError:
            if not (target / "u.data").exists():  # not a concurrent fetch that won the race
                raise
    return str(target)


# ----------------------------------------------------------------------------- Amazon


def load_amazon_prepared(data_dir: str, on_bad_rows: BadRows = "error") -> Dataset:
    """MiniOneRec-style folder: items.jsonl + train/valid/test.jsonl Examples, used as published."""
    root = Path(data_dir)
    catalog, issues = normalize_catalog(unescape(read_table(str(root / "items.jsonl"))), on_bad_rows)
    splits = {}
    for split in ("train", "valid", "test"):
        splits[split], found = normalize_examples(read_table(str(root / f"{split}.jsonl")),
                                                  catalog["item_id"], on_bad_rows)
        issues += [f"{split} {msg}" for msg in found]
    return Dataset(root.name, catalog, splits, {}, issues)


def load_amazon14_beauty(data_dir: str, max_history: int = MAX_HISTORY, on_bad_rows: BadRows = "error") -> Dataset:
    """TIGER/P5 Beauty: sequential_data.txt ('user item item ...' in time order) + items.jsonl."""
    root = Path(data_dir)
    users, items, order = [], [], []
    for line in (root / "sequential_data.txt").read_text().splitlines():
        if line.strip():
            user, *seq = line.split()
            users += [user] * len(seq)
            items += seq
            order += range(len(seq))  # line order is time order
    interactions, issues = normalize_interactions(
        pa.table({"user_id": users, "item_id": items, "timestamp": pa.array(order, pa.int64())}), on_bad_rows)
    catalog, found = normalize_catalog(unescape(read_table(str(root / "items.jsonl"))), on_bad_rows)
    issues += found
    interactions = known_items(interactions, catalog, "naming items missing from items.jsonl", on_bad_rows,
                                issues)
    return Dataset(root.name, catalog, leave_one_out(interactions, max_history), {}, issues)


# field names per release: (user, item, rating, time) for reviews; (item, title, brand, categories) for meta
_REVIEW_KEYS = {"2023": ("user_id", "parent_asin", "rating", "timestamp"),
                "2018": ("reviewerID", "asin", "overall", "unixReviewTime")}
_META_KEYS = {"2023": ("parent_asin", "title", "store", "categories"),
              "2018": ("asin", "title", "brand", "category")}


def _json_lines(path: str) -> Iterator[dict]:
    with (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def _detect(path: str, keys: dict[str, tuple[str, ...]], n_keys: int) -> tuple[tuple[str, ...], Iterator[dict]]:
    """Which release a JSON-lines file is from: the first whose first n_keys fields the first record has."""
    records = _json_lines(path)
    first = next(records, None)
    if first is None:
        raise DataValidationError(f"{path}: no records")
    for fields in keys.values():
        if all(k in first for k in fields[:n_keys]):
            return fields, _chain(first, records)
    raise DataValidationError(f"{path}: unrecognised Amazon format (keys: {', '.join(sorted(first))})")


def _chain(first: dict, rest: Iterator[dict]) -> Iterator[dict]:
    yield first
    yield from rest


def _joined(value: object, sep: str) -> str:
    if isinstance(value, list):
        return sep.join(str(v) for v in value if v)
    return "" if value is None else str(value)


def load_amazon_reviews(reviews_path: str, meta_path: str, kcore: int = 0, max_history: int = MAX_HISTORY,
                        on_bad_rows: BadRows = "error") -> Dataset:
    """Any category of the public Amazon Reviews 2018 or 2023 JSON lines (plain or .gz).

    Items without a title in meta are dropped from the interactions (with a warning), then k-core, then
    leave-one-out. 2023 timestamps stay in milliseconds (only their order matters).
    """
    (user_key, item_key, rating_key, time_key), reviews = _detect(reviews_path, _REVIEW_KEYS, 2)
    cols: dict[str, list] = {"user_id": [], "item_id": [], "rating": [], "timestamp": []}
    for r in reviews:
        for name, key in (("user_id", user_key), ("item_id", item_key), ("rating", rating_key),
                          ("timestamp", time_key)):
            cols[name].append(r.get(key))
    interactions, issues = normalize_interactions(pa.table(cols), on_bad_rows)

    (id_key, title_key, brand_key, cat_key), metas = _detect(meta_path, _META_KEYS, 1)
    meta: dict[str, dict[str, str]] = {}
    untitled = repeated = 0
    for m in metas:
        item, title = m.get(id_key), html.unescape(_joined(m.get(title_key), " ")).strip()
        if item is None or not title:
            untitled += 1
        elif str(item) in meta:  # 2018 meta repeats some items; the first record wins
            repeated += 1
        else:
            meta[str(item)] = {
                "title": title,
                "description": html.unescape(_joined(m.get("description"), " ")),
                "brand": html.unescape(_joined(m.get(brand_key), " ")),
                "categories": _joined(m.get(cat_key), CATEGORY_SEP),
            }
    if untitled or repeated:
        issues.append(f"meta: ignored {untitled} records without an id or title and {repeated} repeated records")
        log.warning("%s", issues[-1])
    catalog, found = normalize_catalog(pa.table({"item_id": list(meta)} | {
        name: [m[name] for m in meta.values()] for name in ("title", "description", "brand", "categories")
    }), on_bad_rows)
    issues += found
    interactions = known_items(interactions, catalog, "naming items without a title in meta", "drop", issues)
    interactions = kcore_filter(interactions, kcore)
    name = Path(reviews_path).name.split(".")[0]
    return Dataset(name, in_use(catalog, interactions), leave_one_out(interactions, max_history), {}, issues,
                   first_interactions(interactions))
