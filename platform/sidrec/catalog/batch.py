"""Batch catalog changes from a file (``sidrec items add|update|retire``): the same writer as the Serve
admin endpoints, on the published catalog with the log applied (no model is loaded).

The whole file is checked first (readable, titles present, ``add`` ids new, ``update`` / ``retire`` ids
known), so a bad file writes nothing; then it is published in chunks of ``chunk`` items, one catalog
version each. A run that stops half way is finished by running it again: written items come back
"unchanged", retired ones "retired".
"""

from __future__ import annotations

import logging
from typing import Literal

from sidrec.catalog.files import read_ids, read_items
from sidrec.catalog.session import open_catalog
from sidrec.catalog.writer import CatalogError, WriteResult, writer_name

log = logging.getLogger(__name__)

BatchOp = Literal["add", "update", "retire"]
CHUNK = 200


def apply_file(store_root: str, op: BatchOp, path: str, chunk: int = CHUNK) -> WriteResult:
    """Apply a change file to the store's catalog; returns what was done (``version``: the last one)."""
    session = open_catalog(store_root, writer=writer_name("cli"))
    w, cat, state = session.writer, session.catalog, session.state
    out = WriteResult(state.applied)
    if op == "retire":
        ids = read_ids(path)
        absent = [i for i in dict.fromkeys(ids) if i not in cat.sid_of and i not in cat.retired]
        if absent:
            raise CatalogError(404, "unknown_items", f"{len(absent)} item id(s) not in the catalog: {absent[:20]}",
                               absent)
        for n in range(0, len(ids), chunk):
            got = w.retire(cat, state, ids[n:n + chunk], strict=True)
            out.retired += got.retired
            out.version = got.version
        return out
    items = read_items(path)
    w.plan(cat, state, items, op)  # the whole file, before anything is written
    for n in range(0, len(items), chunk):
        got = w.upsert(cat, state, items[n:n + chunk], op)
        out.items += got.items
        out.version = got.version
        log.info("sidrec: %d/%d items, catalog version %d", min(n + chunk, len(items)), len(items), got.version)
    return out
