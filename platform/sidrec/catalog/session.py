"""A catalog with the store's change log applied, and the writer for it: what a Serve replica, the CLI and
a test that restarts a replica each open (``open_catalog``)."""

from __future__ import annotations

from dataclasses import dataclass

from sidrec.catalog.encoder import ItemEncoder
from sidrec.catalog.state import CatalogState
from sidrec.catalog.writer import CatalogWriter, writer_name
from sidrec.recommender import LiveCatalog, Recommender
from sidrec.store import ArtifactStore


@dataclass
class CatalogSession:
    """One live catalog: its items, what the log did to them, and how to write more."""

    catalog: LiveCatalog
    state: CatalogState
    writer: CatalogWriter

    @property
    def encoder(self) -> ItemEncoder:
        return self.writer.encoder

    def catch_up(self) -> int:
        """Apply changes published by other writers since the last call; returns how many."""
        return self.writer.catch_up(self.catalog, self.state)

    def head(self) -> int:
        """The store's latest catalog version (``state.applied`` lags it until ``catch_up``)."""
        return self.writer.log.head(self.state.applied)


def open_catalog(store_root: str, catalog: LiveCatalog | None = None, encoder: ItemEncoder | None = None,
                 writer: str = "", model_version: str = "") -> CatalogSession:
    """``catalog`` (default: the published one, without loading the model) with every logged change
    applied. ``encoder`` may be reused when it was built from the store's current stages."""
    store = ArtifactStore(store_root)
    if catalog is None:
        catalog = LiveCatalog.from_store(store)
        model_version = model_version or store.require("model")["version"]
    encoder = encoder or ItemEncoder(store_root)
    session = CatalogSession(catalog, CatalogState(),
                             CatalogWriter(store_root, encoder, writer or writer_name("sidrec"), model_version))
    session.catch_up()
    return session


def load_recommender(store_root: str, **kwargs) -> tuple[Recommender, CatalogSession]:
    """``Recommender.from_store`` (``kwargs``) with the catalog log applied: what a replica serves."""
    rec = Recommender.from_store(store_root, **kwargs)
    return rec, open_catalog(store_root, rec.catalog, model_version=rec.model_version)
