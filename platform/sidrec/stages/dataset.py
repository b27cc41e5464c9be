"""Stage ``dataset``: the configured input read, validated and split, written as parquet tables.

With ``eval.cold_start`` on, the cold items are held out of train and valid here (`sidrec.data.cold_start`)
and listed in ``cold_items.parquet``; every later stage reads the held-out splits.
"""

from __future__ import annotations

from dataclasses import asdict

import pyarrow as pa

from sidrec.config import SidrecConfig
from sidrec.data import cold_start
from sidrec.data.load import data_inputs, load_dataset
from sidrec.stages.run import run_stage
from sidrec.store import ArtifactStore, StageRun


def build(store: ArtifactStore, cfg: SidrecConfig, force: bool = False) -> dict:
    def body(run: StageRun) -> dict:
        ds = load_dataset(cfg.data)
        extra = {}
        if cold_start.enabled(cfg.eval):
            full = ds
            ds, cold = cold_start.hold_out(full, cfg.eval)
            store.write_table(f"{run.path}/{cold_start.COLD_ITEMS_FILE}", cold)
            extra["cold_start"] = cold_start.summary(full, ds, cold.column("item_id").to_pylist())
        store.write_table(f"{run.path}/catalog.parquet", ds.catalog)
        for split, table in ds.splits.items():
            store.write_table(f"{run.path}/{split}.parquet", table)
        profiles = pa.table({"user_id": list(ds.profiles), "profile": list(ds.profiles.values())},
                            schema=pa.schema([("user_id", pa.string()), ("profile", pa.string())]))
        store.write_table(f"{run.path}/profiles.parquet", profiles)
        return {"items": ds.catalog.num_rows, **{f"{k}_rows": v.num_rows for k, v in ds.splits.items()},
                "users_with_profile": len(ds.profiles), "issues": ds.issues, **extra}

    config = asdict(cfg.data) | cold_start.stage_config(cfg.eval)
    return run_stage(store, "dataset", config, data_inputs(cfg.data), force, body)
