"""Stage ``embeddings``: the catalog's item text through the text-encoder actors (`sidrec.sids.embed`)."""

from __future__ import annotations

import time
from dataclasses import asdict

from sidrec import console
from sidrec.cluster import init_ray
from sidrec.config import SidrecConfig
from sidrec.sids.embed import embed_catalog
from sidrec.stages.run import run_stage
from sidrec.store import ArtifactStore, StageRun


def build(store: ArtifactStore, cfg: SidrecConfig, force: bool = False) -> dict:
    """Embed every catalog item (Ray Data actor pool) into ``embeddings/`` parquet."""
    dataset = store.require("dataset")

    def body(run: StageRun) -> dict:
        init_ray(cfg.ray)
        t0 = time.perf_counter()
        with console.progress("embedding", total=dataset["metrics"].get("items"), unit="item") as sink:
            n = embed_catalog(f"{store.current_path('dataset')}/catalog.parquet", f"{run.path}/embeddings",
                              store.fs, cfg.embed, progress=sink)
        dt = time.perf_counter() - t0
        return {"items": n, "items_per_s": round(n / dt, 2), "embed_seconds": round(dt, 3)}

    return run_stage(store, "embeddings", asdict(cfg.embed), {"dataset": dataset["fingerprint"]}, force, body)
