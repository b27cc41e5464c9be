"""Datasets as canonical Arrow tables: validation, k-core filtering, leave-one-out splits.

Every stage downstream (Semantic-ID tokenizer, LLM training, evaluation, serving) reads three table shapes:

- Catalog: item_id, title, description, brand, categories (all strings) + extra text columns.
- Examples: user_id (string), history (list<string>, oldest first), target (string).
- Interactions: user_id, item_id (strings), timestamp (int64), optional rating (float64).

IDs are strings everywhere so ml-100k ints, Amazon ints and ASINs look the same. Bad rows either raise a
`DataValidationError` or, with ``on_bad_rows="drop"``, are dropped with a logged warning and an issue
entry: data never disappears silently.
"""

from __future__ import annotations

import html
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from sidrec.config import MAX_HISTORY

log = logging.getLogger(__name__)

BadRows = Literal["error", "drop"]
CATEGORY_SEP = " > "
_ID_COLUMNS = ("item_id", "user_id", "target")  # read as strings from CSV so "007" stays "007"


class DataValidationError(ValueError):
    """Input data is malformed; the message names the problem, how many rows, and up to 5 examples."""


@dataclass
class Dataset:
    name: str
    catalog: pa.Table
    splits: dict[str, pa.Table]  # "train" / "valid" / "test" -> Examples
    profiles: dict[str, str] = field(default_factory=dict)  # user_id -> profile text
    issues: list[str] = field(default_factory=list)  # what was dropped or fixed while loading
    # item_id -> its first interaction's timestamp, when the source is a log with global timestamps
    first_seen: dict[str, int] = field(default_factory=dict)


# ----------------------------------------------------------------------------- reading


def read_table(path: str) -> pa.Table:
    """Read parquet, CSV/TSV or JSON lines (optionally .gz) by extension, or a directory of parquet files."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(path)
    name = p.name.lower().removesuffix(".gz")
    try:
        if p.is_dir() or name.endswith((".parquet", ".pq")):
            return pq.read_table(p)
        if name.endswith((".csv", ".tsv")):
            parse = pa_csv.ParseOptions(delimiter="\t" if name.endswith(".tsv") else ",")
            convert = pa_csv.ConvertOptions(column_types={c: pa.string() for c in _ID_COLUMNS})
            return pa_csv.read_csv(p, parse_options=parse, convert_options=convert)
        if name.endswith((".jsonl", ".json")):
            return pa_json.read_json(p)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataValidationError(f"{path}: could not parse table: {e}") from e
    raise DataValidationError(
        f"{path}: unknown table format (expected .parquet, .csv, .tsv, .jsonl or .json, optionally .gz, "
        "or a directory of parquet files)"
    )


# ----------------------------------------------------------------------------- validation helpers


class _Rows:
    """A table under validation: bad rows raise or are dropped, messages cite original row numbers."""

    def __init__(self, table: pa.Table, where: str, on_bad_rows: BadRows):
        if on_bad_rows not in ("error", "drop"):
            raise ValueError(f"on_bad_rows must be 'error' or 'drop', got {on_bad_rows!r}")
        self.table, self.where, self.on_bad_rows = table, where, on_bad_rows
        self.rows = np.arange(table.num_rows)
        self.issues: list[str] = []

    def reject(self, bad: np.ndarray, problem: str, examples: list[str] | None = None) -> None:
        bad = np.asarray(bad, dtype=bool)
        n = int(bad.sum())
        if n == 0:
            return
        if examples is None:
            examples = [f"row {r}" for r in self.rows[bad][:5]]
        msg = f"{self.where}: {n} row{'' if n == 1 else 's'} {problem} (e.g. {', '.join(examples[:5])})"
        if self.on_bad_rows == "error":
            raise DataValidationError(msg + "; pass on_bad_rows='drop' to drop them")
        msg += "; dropped"
        log.warning(msg)
        self.issues.append(msg)
        self.table = self.table.filter(pa.array(~bad))
        self.rows = self.rows[~bad]

    def col(self, name: str) -> pa.ChunkedArray:
        return self.table[name]


def _mask(arr: pa.ChunkedArray | pa.Array, null: bool = True) -> np.ndarray:
    return np.asarray(pc.fill_null(arr, null).to_numpy(zero_copy_only=False), dtype=bool)


def _blank(arr: pa.ChunkedArray) -> np.ndarray:
    """True where a string is null, empty or whitespace."""
    return _mask(pc.equal(pc.utf8_trim_whitespace(arr), ""))


def _quoted(values: list) -> list[str]:
    return [repr(v) for v in dict.fromkeys(values)]


def _require(table: pa.Table, columns: tuple[str, ...], where: str) -> None:
    for c in columns:
        if c not in table.column_names:
            present = ", ".join(table.column_names) or "none"
            raise DataValidationError(f"{where}: missing required column {c!r} (columns present: {present})")


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)


def _ids(table: pa.Table, name: str, where: str) -> pa.ChunkedArray:
    """String or integer ids -> strings."""
    t = table[name].type
    if not (_is_text(t) or pa.types.is_integer(t)):
        raise DataValidationError(f"{where}: column {name!r} must hold string or integer ids, got {t}")
    return table[name].cast(pa.string())


def _text(arr: pa.ChunkedArray, sep: str) -> pa.ChunkedArray | None:
    """Strings, lists of strings (joined with sep) or scalars -> non-null strings; None if not text-like."""
    t = arr.type
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        if not (_is_text(t.value_type) or pa.types.is_integer(t.value_type)):
            return None
        arr = pc.binary_join(arr.cast(pa.list_(pa.string())), sep)
    elif not (_is_text(t) or pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)):
        return None
    return pc.fill_null(arr.cast(pa.string()), "")


def _sort_key(arr: pa.ChunkedArray) -> pa.ChunkedArray:
    """Integers when every id is numeric (so "9" < "10"), else the strings themselves."""
    if len(arr) and pc.all(pc.match_substring_regex(arr, r"^\d{1,18}$")).as_py():
        return arr.cast(pa.int64())
    return arr


# ----------------------------------------------------------------------------- normalization


def normalize_catalog(table: pa.Table, on_bad_rows: BadRows = "error") -> tuple[pa.Table, list[str]]:
    """Validate a catalog and bring it to the canonical string schema; returns (catalog, issues).

    Missing/mistyped columns always raise. Bad rows (null or duplicate item_id, empty title) raise or are
    dropped (first occurrence of a duplicate kept). Extra columns are kept as strings if text-like.
    """
    where = "catalog"
    _require(table, ("item_id", "title"), where)
    if not _is_text(table["title"].type):
        raise DataValidationError(f"{where}: column 'title' must be string, got {table['title'].type}")
    cols = {"item_id": _ids(table, "item_id", where), "title": pc.fill_null(table["title"].cast(pa.string()), "")}
    for name, sep in (("description", " "), ("brand", " "), ("categories", CATEGORY_SEP)):
        if name not in table.column_names:
            cols[name] = pa.chunked_array([pa.array([""] * table.num_rows, pa.string())])
        elif (text := _text(table[name], sep)) is None:
            raise DataValidationError(f"{where}: column {name!r} must be text, got {table[name].type}")
        else:
            cols[name] = text
    for name in table.column_names:
        if name not in cols and (text := _text(table[name], CATEGORY_SEP)) is not None:
            cols[name] = text
    rows = _Rows(pa.table(cols), where, on_bad_rows)

    rows.reject(_blank(rows.col("item_id")), "with null or empty item_id")
    ids = rows.col("item_id").to_numpy(zero_copy_only=False)
    dup = np.ones(len(ids), dtype=bool)
    dup[np.unique(ids, return_index=True)[1]] = False
    rows.reject(dup, "with a duplicate item_id", _quoted(list(ids[dup])))
    blank = _blank(rows.col("title"))
    rows.reject(blank, "with an empty title", _quoted(rows.col("item_id").filter(blank).to_pylist()))
    return rows.table, rows.issues


def normalize_interactions(table: pa.Table, on_bad_rows: BadRows = "error") -> tuple[pa.Table, list[str]]:
    """Validate raw logs into (user_id, item_id, timestamp int64[, rating float64]); returns (table, issues).

    Timestamps may be integers, whole floats, integer strings or Arrow timestamps (-> unix seconds);
    nulls and anything else non-integer are bad rows.
    """
    where = "interactions"
    _require(table, ("user_id", "item_id", "timestamp"), where)
    cols = {"user_id": _ids(table, "user_id", where), "item_id": _ids(table, "item_id", where)}
    ts = table["timestamp"]
    if pa.types.is_timestamp(ts.type):
        ts = ts.cast(pa.timestamp("s")).cast(pa.int64())
    elif pa.types.is_floating(ts.type):
        ts = pc.if_else(pc.equal(ts, pc.floor(ts)), ts, pa.scalar(None, ts.type))
    elif pa.types.is_string(ts.type) or pa.types.is_large_string(ts.type):
        ts = pc.utf8_trim_whitespace(ts)
        ts = pc.if_else(pc.match_substring_regex(ts, r"^-?\d{1,18}$"), ts, pa.scalar(None, ts.type))
    elif not (pa.types.is_integer(ts.type) or pa.types.is_null(ts.type)):
        raise DataValidationError(f"{where}: column 'timestamp' must hold integers, got {ts.type}")
    cols["timestamp"] = ts.cast(pa.int64())
    if "rating" in table.column_names:
        if not (pa.types.is_integer(table["rating"].type) or pa.types.is_floating(table["rating"].type)
                or pa.types.is_null(table["rating"].type)):
            raise DataValidationError(f"{where}: column 'rating' must be numeric, got {table['rating'].type}")
        cols["rating"] = table["rating"].cast(pa.float64())
    rows = _Rows(pa.table(cols | {"_raw_ts": table["timestamp"]}), where, on_bad_rows)

    rows.reject(_blank(rows.col("user_id")), "with null or empty user_id")
    rows.reject(_blank(rows.col("item_id")), "with null or empty item_id")
    rows.reject(_mask(pc.is_null(rows.col("_raw_ts"))), "with null timestamp")
    bad = _mask(pc.is_null(rows.col("timestamp")))
    rows.reject(bad, "with a non-integer timestamp", _quoted(rows.col("_raw_ts").filter(bad).to_pylist()))
    return rows.table.drop_columns(["_raw_ts"]), rows.issues


def normalize_examples(
    table: pa.Table, item_ids: set[str] | pa.Array | pa.ChunkedArray, on_bad_rows: BadRows = "error"
) -> tuple[pa.Table, list[str]]:
    """Validate Examples against the catalog ids; returns (examples, issues).

    Bad rows: null user_id or target, empty history, history or target naming an item not in item_ids.
    """
    where = "examples"
    _require(table, ("user_id", "history", "target"), where)
    h = table["history"].type
    if not ((pa.types.is_list(h) or pa.types.is_large_list(h))
            and (_is_text(h.value_type) or pa.types.is_integer(h.value_type))):
        raise DataValidationError(f"{where}: column 'history' must be a list of item ids, got {h}")
    cols = {
        "user_id": _ids(table, "user_id", where),
        "history": table["history"].cast(pa.list_(pa.string())),
        "target": _ids(table, "target", where),
    }
    if isinstance(item_ids, pa.Array | pa.ChunkedArray):
        known = item_ids.cast(pa.string())
    else:
        known = pa.array(sorted(str(i) for i in item_ids), pa.string())
    rows = _Rows(pa.table(cols), where, on_bad_rows)

    rows.reject(_blank(rows.col("user_id")), "with null or empty user_id")
    rows.reject(_blank(rows.col("target")), "with null or empty target")
    rows.reject(_mask(pc.equal(pc.list_value_length(rows.col("history")), 0)), "with an empty history")
    history = rows.col("history")
    flat, parents = pc.list_flatten(history), pc.list_parent_indices(history)
    unknown = ~_mask(pc.is_in(flat, value_set=known), null=False)
    bad = np.zeros(rows.table.num_rows, dtype=bool)
    bad[parents.to_numpy()[unknown]] = True
    names = flat.filter(pa.array(unknown)).to_pylist()
    rows.reject(bad, f"whose history names {len(set(names))} unknown item ids", _quoted(names))
    bad = ~_mask(pc.is_in(rows.col("target"), value_set=known), null=False)
    rows.reject(bad, "whose target is an unknown item id", _quoted(rows.col("target").filter(bad).to_pylist()))
    return rows.table, rows.issues


# ----------------------------------------------------------------------------- filtering and splitting


def kcore_filter(interactions: pa.Table, k: int) -> pa.Table:
    """Repeatedly drop users and items with fewer than k interactions until every one has >= k."""
    if k <= 1:
        return interactions
    t = interactions
    while True:
        before = t.num_rows
        for col in ("user_id", "item_id"):
            counts = t.group_by(col).aggregate([(col, "count")])
            keep = counts.filter(pc.greater_equal(counts[f"{col}_count"], k))[col]
            t = t.filter(pc.is_in(t[col], value_set=keep.combine_chunks()))
        if t.num_rows == before:
            return t


def leave_one_out(interactions: pa.Table, max_history: int = MAX_HISTORY) -> dict[str, pa.Table]:
    """Split interactions per user into train / valid / test Examples (the standard leave-one-out protocol).

    Each user's items are ordered by (timestamp, item id), comparing ids as integers when all are numeric.
    With n >= 3 items: item n-1 -> test, item n-2 -> valid, each item at position 1..n-3 -> one train example.
    Users with 2 items give one train example, users with 1 give none (a target needs a history).
    History = the up-to-max_history items right before the target.
    """
    if max_history < 1:
        raise ValueError(f"max_history must be >= 1, got {max_history}")
    users, items = interactions["user_id"], interactions["item_id"]
    t = pa.table({
        "u": _sort_key(users), "ts": interactions["timestamp"], "i": _sort_key(items), "user": users, "item": items,
    }).sort_by([("u", "ascending"), ("ts", "ascending"), ("i", "ascending")])
    users, items = t["user"].combine_chunks(), t["item"].combine_chunks()
    n = len(items)
    u = users.to_numpy(zero_copy_only=False)
    starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]]) if n else np.zeros(0, dtype=np.int64)
    sizes = np.diff(np.r_[starts, n])
    start_of, size_of = np.repeat(starts, sizes), np.repeat(sizes, sizes)
    pos = np.arange(n) - start_of
    is_test = (size_of >= 3) & (pos == size_of - 1)
    is_valid = (size_of >= 3) & (pos == size_of - 2)
    is_train = (pos >= 1) & ~is_test & ~is_valid

    def examples(mask: np.ndarray) -> pa.Table:
        p = np.flatnonzero(mask)
        lo = np.maximum(start_of[p], p - max_history)
        offsets = np.r_[0, np.cumsum(p - lo)]
        idx = np.repeat(lo - offsets[:-1], p - lo) + np.arange(offsets[-1])
        history = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), items.take(idx))
        return pa.table({"user_id": users.take(p), "history": history, "target": items.take(p)})

    return {"train": examples(is_train), "valid": examples(is_valid), "test": examples(is_test)}


def first_interactions(interactions: pa.Table) -> dict[str, int]:
    """item_id -> the timestamp of its first interaction (what the cold-start split calls an item's age)."""
    first = interactions.group_by("item_id").aggregate([("timestamp", "min")])
    return dict(zip(first["item_id"].to_pylist(), first["timestamp_min"].to_pylist(), strict=True))


def known_items(interactions: pa.Table, catalog: pa.Table, problem: str, on_bad_rows: BadRows,
                 issues: list[str]) -> pa.Table:
    """Interactions whose item is in the catalog; the others raise or are dropped."""
    rows = _Rows(interactions, "interactions", on_bad_rows)
    bad = ~_mask(pc.is_in(interactions["item_id"], value_set=catalog["item_id"].combine_chunks()), null=False)
    rows.reject(bad, problem, _quoted(interactions["item_id"].filter(pa.array(bad)).to_pylist()))
    issues += rows.issues
    return rows.table


def in_use(catalog: pa.Table, interactions: pa.Table) -> pa.Table:
    """Catalog restricted to items that occur in the interactions (what full ranking ranks over)."""
    return catalog.filter(pc.is_in(catalog["item_id"], value_set=interactions["item_id"].combine_chunks()))


def unescape(table: pa.Table, columns: tuple[str, ...] = ("title", "description", "brand")) -> pa.Table:
    """Decode HTML entities (&amp; -> &) that some Amazon releases leave in text."""
    for name in columns:
        if name in table.column_names and pa.types.is_string(table[name].type):
            values = [None if s is None else html.unescape(s) for s in table[name].to_pylist()]
            table = table.set_column(table.column_names.index(name), name, pa.array(values, pa.string()))
    return table


