"""Which loader reads the configured input, and the fingerprints of the input files."""

from __future__ import annotations

import os

from sidrec.config import DataConfig
from sidrec.data import sources
from sidrec.data import tables as t
from sidrec.store import file_fingerprint


def load_dataset(cfg: DataConfig) -> t.Dataset:
    """Read and validate the configured input with its adapter."""
    if cfg.format == "movielens_100k":
        path = cfg.path if os.path.isdir(cfg.path) else sources.fetch_movielens_100k(cfg.path)
        return sources.load_movielens_100k(path, max_history=cfg.max_history, kcore=cfg.kcore,
                                           on_bad_rows=cfg.on_bad_rows)
    if cfg.format == "amazon_prepared":
        return sources.load_amazon_prepared(cfg.path, on_bad_rows=cfg.on_bad_rows)
    if cfg.format == "amazon14_beauty":
        return sources.load_amazon14_beauty(cfg.path, max_history=cfg.max_history, on_bad_rows=cfg.on_bad_rows)
    if cfg.format == "amazon_reviews":
        return sources.load_amazon_reviews(cfg.interactions, cfg.catalog, kcore=cfg.kcore,
                                           max_history=cfg.max_history, on_bad_rows=cfg.on_bad_rows)
    # generic
    catalog, issues = t.normalize_catalog(t.read_table(cfg.catalog), cfg.on_bad_rows)
    if cfg.interactions:
        inter, more = t.normalize_interactions(t.read_table(cfg.interactions), cfg.on_bad_rows)
        issues += more
        inter = t.known_items(inter, catalog, "rows naming an item_id not in the catalog",
                              cfg.on_bad_rows, issues)
        inter = t.kcore_filter(inter, cfg.kcore)
        splits, first_seen = t.leave_one_out(inter, cfg.max_history), t.first_interactions(inter)
    else:
        first_seen = {}
        item_ids = catalog.column("item_id")
        splits = {}
        for name, path in cfg.examples.items():
            splits[name], more = t.normalize_examples(t.read_table(path), item_ids, cfg.on_bad_rows)
            issues += more
    return t.Dataset(name="generic", catalog=catalog, splits=splits, profiles={}, issues=issues, first_seen=first_seen)


def data_inputs(cfg: DataConfig) -> dict[str, str]:
    """Content fingerprints of the input files (what makes the dataset stage rebuild when data changes)."""
    paths = {"path": cfg.path} if cfg.format in ("movielens_100k", "amazon_prepared", "amazon14_beauty") else {}
    paths |= {k: v for k, v in (("catalog", cfg.catalog), ("interactions", cfg.interactions)) if v}
    paths |= {f"examples.{k}": v for k, v in cfg.examples.items()}
    return {k: file_fingerprint(v) if os.path.exists(v) or "://" in v else "absent" for k, v in paths.items()}
