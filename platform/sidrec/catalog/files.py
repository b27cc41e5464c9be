"""Catalog change files for ``sidrec items``: items as JSONL or CSV, ids to retire as JSONL, CSV or text.

    {"item_id": "ad-1", "title": "Red running shoes", "brand": "Acme", "categories": ["Shoes", "Running"]}

CSV needs a header with ``item_id`` and ``title`` (``brand``, ``categories``, ``description`` optional).
Every problem is a ``CatalogFileError`` naming the file and line; nothing is written for a bad file.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from sidrec.catalog.encoder import NewItem

ITEM_FIELDS = ("item_id", "title", "brand", "categories", "description")


class CatalogFileError(ValueError):
    """A change file that cannot be read as asked."""


def _records(path: Path) -> list[tuple[int, Any]]:
    """(line number, parsed value) of every non-blank line of a JSONL file, or of every CSV row."""
    if not path.is_file():
        raise CatalogFileError(f"{path}: no such file")
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or "item_id" not in reader.fieldnames:
                raise CatalogFileError(f"{path}: a CSV needs a header row with an item_id column")
            return [(n + 2, dict(row)) for n, row in enumerate(reader)]
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            raise CatalogFileError(f"{path}:{n}: not JSON ({e.msg}); write one JSON object per line") from e
    return out


def _item_id(path: Path, n: int, value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
        raise CatalogFileError(f"{path}:{n}: item_id must be a non-blank string or integer, got {value!r}")
    return str(value).strip()


def read_items(path: str | Path) -> list[NewItem]:
    """Items to add or update; raises CatalogFileError on an empty file, a missing title or id, an unknown
    field, or a malformed line."""
    path = Path(path)
    items = []
    for n, rec in _records(path):
        if not isinstance(rec, dict):
            raise CatalogFileError(f"{path}:{n}: expected an object with item_id and title, got {rec!r:.80}")
        unknown = sorted(set(rec) - set(ITEM_FIELDS))
        if unknown:
            raise CatalogFileError(f"{path}:{n}: unknown field(s) {unknown}; known: {list(ITEM_FIELDS)}")
        title = rec.get("title")
        if not isinstance(title, str) or not title.strip():
            raise CatalogFileError(f"{path}:{n}: item {rec.get('item_id')!r} has no title")
        cats = rec.get("categories") or ""
        if not isinstance(cats, str) and not (isinstance(cats, list) and all(isinstance(c, str) for c in cats)):
            raise CatalogFileError(f"{path}:{n}: categories must be a string or a list of strings")
        items.append(NewItem(_item_id(path, n, rec.get("item_id")), title, str(rec.get("brand") or ""), cats,
                             str(rec.get("description") or "")))
    if not items:
        raise CatalogFileError(f"{path}: no items")
    return items


def read_ids(path: str | Path) -> list[str]:
    """Item ids: JSONL of objects with item_id (or of bare ids), CSV with an item_id column, or text
    with one id per line."""
    path = Path(path)
    if path.suffix.lower() in (".csv", ".jsonl", ".json", ".ndjson"):
        recs = _records(path)
        ids = [_item_id(path, n, r.get("item_id") if isinstance(r, dict) else r) for n, r in recs]
    else:
        if not path.is_file():
            raise CatalogFileError(f"{path}: no such file")
        ids = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not ids:
        raise CatalogFileError(f"{path}: no item ids")
    return ids
