"""The Semantic-ID build: dataset → embeddings → quantizer → sids (+ report), each a store stage.

    sidrec sids build --config ml-100k                      # CLI
    python ray_jobs/build_sids.py --config ml-100k          # same call, for `ray job submit`

Every stage is skipped when its config and inputs are unchanged since the published version
(`force=True` rebuilds), so an interrupted build resumes from the last finished stage.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict

import numpy as np
import pyarrow as pa

from sidrec import data as sdata
from sidrec.config import DataConfig, RayConfig, SidrecConfig
from sidrec.store import ArtifactStore, StageRun, file_fingerprint, fingerprint

log = logging.getLogger("sidrec")

def init_ray(cfg: RayConfig) -> None:
    """Join the cluster named by cfg.address / RAY_ADDRESS (as inside `ray job submit`), else start one."""
    import ray

    if ray.is_initialized():
        return
    if cfg.address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=cfg.address or None, log_to_driver=True)
    else:
        ray.init(num_cpus=cfg.num_cpus or None, include_dashboard=False)


def run_stage(store: ArtifactStore, stage: str, config: dict, inputs: dict[str, str], force: bool,
              body: Callable[[StageRun], dict]) -> dict:
    """Run `body` into a fresh version of `stage` and publish it, unless an identical run is published."""
    fp = fingerprint({"config": config, "inputs": inputs})
    if not force and store.is_current(stage, fp):
        log.info("stage %s: up to date (%s), skipped", stage, fp)
        return store.require(stage)
    log.info("stage %s: building", stage)
    t0 = time.perf_counter()
    run = store.begin(stage)
    metrics = body(run)
    metrics["seconds"] = round(time.perf_counter() - t0, 3)
    manifest = store.publish(run, fp=fp, config=config, inputs=inputs, metrics=metrics)
    log.info("stage %s: published %s in %.1fs", stage, run.version, metrics["seconds"])
    return manifest


# -- dataset -----------------------------------------------------------------------------------------
def load_dataset(cfg: DataConfig) -> sdata.Dataset:
    """Read and validate the configured input with its adapter."""
    if cfg.format == "movielens_100k":
        path = cfg.path if os.path.isdir(cfg.path) else sdata.fetch_movielens_100k(cfg.path)
        return sdata.load_movielens_100k(path, max_history=cfg.max_history, kcore=cfg.kcore,
                                         on_bad_rows=cfg.on_bad_rows)
    if cfg.format == "amazon_prepared":
        return sdata.load_amazon_prepared(cfg.path, on_bad_rows=cfg.on_bad_rows)
    if cfg.format == "amazon14_beauty":
        return sdata.load_amazon14_beauty(cfg.path)
    if cfg.format == "amazon_reviews":
        return sdata.load_amazon_reviews(cfg.interactions, cfg.catalog, kcore=cfg.kcore or 5,
                                         max_history=cfg.max_history, on_bad_rows=cfg.on_bad_rows)
    # generic
    catalog, issues = sdata.normalize_catalog(sdata.read_table(cfg.catalog), cfg.on_bad_rows)
    if cfg.interactions:
        inter, more = sdata.normalize_interactions(sdata.read_table(cfg.interactions), cfg.on_bad_rows)
        issues += more
        inter = sdata.known_items(inter, catalog, "rows naming an item_id not in the catalog",
                                  cfg.on_bad_rows, issues)
        splits = sdata.leave_one_out(sdata.kcore_filter(inter, cfg.kcore), cfg.max_history)
    else:
        item_ids = catalog.column("item_id")
        splits = {}
        for name, path in cfg.examples.items():
            splits[name], more = sdata.normalize_examples(sdata.read_table(path), item_ids, cfg.on_bad_rows)
            issues += more
    return sdata.Dataset(name="generic", catalog=catalog, splits=splits, profiles={}, issues=issues)


def data_inputs(cfg: DataConfig) -> dict[str, str]:
    paths = {"path": cfg.path} if cfg.format in ("movielens_100k", "amazon_prepared", "amazon14_beauty") else {}
    paths |= {k: v for k, v in (("catalog", cfg.catalog), ("interactions", cfg.interactions)) if v}
    paths |= {f"examples.{k}": v for k, v in cfg.examples.items()}
    return {k: file_fingerprint(v) if os.path.exists(v) or "://" in v else "absent" for k, v in paths.items()}


def build_dataset(store: ArtifactStore, cfg: SidrecConfig, force: bool = False) -> dict:
    def body(run: StageRun) -> dict:
        ds = load_dataset(cfg.data)
        store.write_table(f"{run.path}/catalog.parquet", ds.catalog)
        for split, table in ds.splits.items():
            store.write_table(f"{run.path}/{split}.parquet", table)
        profiles = pa.table({"user_id": list(ds.profiles), "profile": list(ds.profiles.values())},
                            schema=pa.schema([("user_id", pa.string()), ("profile", pa.string())]))
        store.write_table(f"{run.path}/profiles.parquet", profiles)
        return {"items": ds.catalog.num_rows, **{f"{k}_rows": v.num_rows for k, v in ds.splits.items()},
                "users_with_profile": len(ds.profiles), "issues": ds.issues}

    return run_stage(store, "dataset", asdict(cfg.data), data_inputs(cfg.data), force, body)


# -- embeddings --------------------------------------------------------------------------------------
def build_embeddings(store: ArtifactStore, cfg: SidrecConfig, force: bool = False) -> dict:
    from sidrec.embed import embed_catalog

    dataset = store.require("dataset")

    def body(run: StageRun) -> dict:
        t0 = time.perf_counter()
        n = embed_catalog(f"{store.current_path('dataset')}/catalog.parquet", f"{run.path}/embeddings",
                          store.fs, cfg.embed)
        dt = time.perf_counter() - t0
        return {"items": n, "items_per_s": round(n / dt, 2), "embed_seconds": round(dt, 3)}

    return run_stage(store, "embeddings", asdict(cfg.embed), {"dataset": dataset["fingerprint"]}, force, body)


# -- quantizer ---------------------------------------------------------------------------------------
def read_embeddings(store: ArtifactStore, columns=("item_id", "embedding")) -> tuple[list[str], np.ndarray]:
    from sidrec.embed import embeddings_to_numpy

    table = store.read_table(f"{store.current_path('embeddings')}/embeddings", columns=list(columns))
    return table.column("item_id").to_pylist(), embeddings_to_numpy(table)


def _train_quantizer(store_root: str, out_path: str, qcfg) -> dict:
    """Ray task body: read embeddings from the store, fit, write safetensors + JSON back to the store."""
    from sidrec.quantize import fit_quantizer, quantizer_to_bytes, reconstruction_error

    store = ArtifactStore(store_root)
    _, emb = read_embeddings(store)
    t0 = time.perf_counter()
    last = [0.0]

    def progress(step: int, info: dict) -> None:
        if time.perf_counter() - last[0] > 5:
            last[0] = time.perf_counter()
            log.warning("quantizer %s", " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                  for k, v in {"step": step, **info}.items()))

    q = fit_quantizer(emb, qcfg, progress=progress)
    fit_s = time.perf_counter() - t0
    for name, blob in quantizer_to_bytes(q).items():
        store.write_bytes(f"{out_path}/{name}", blob)
    return {"items": len(emb), "fit_seconds": round(fit_s, 3),
            "reconstruction_mse": float(reconstruction_error(q, emb))}


def build_quantizer(store: ArtifactStore, cfg: SidrecConfig, force: bool = False) -> dict:
    import ray

    emb = store.require("embeddings")

    def body(run: StageRun) -> dict:
        task = ray.remote(num_cpus=1)(_train_quantizer)
        return ray.get(task.remote(store.root, run.path, cfg.quantize))

    return run_stage(store, "quantizer", asdict(cfg.quantize), {"embeddings": emb["fingerprint"]}, force, body)


# -- sids --------------------------------------------------------------------------------------------
class CodeAssigner:
    """Ray Data actor: embeddings → codes with the trained quantizer (shared via the object store)."""

    def __init__(self, quantizer_files):
        import ray
        import torch

        from sidrec.quantize import quantizer_from_bytes

        torch.set_num_threads(1)
        if isinstance(quantizer_files, ray.ObjectRef):
            quantizer_files = ray.get(quantizer_files)
        self.q = quantizer_from_bytes(quantizer_files)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from sidrec.embed import embeddings_to_numpy
        from sidrec.quantize import encode_codes

        codes = encode_codes(self.q, embeddings_to_numpy(batch))
        return pa.table({"item_id": batch.column("item_id"),
                         "codes": pa.array(list(codes), type=pa.list_(pa.int64()))})


def assign_codes(store: ArtifactStore, cfg: SidrecConfig) -> pa.Table:
    """Run CodeAssigner actors over the embeddings; return item_id + codes (small ints, fine on the driver)."""
    import ray
    import ray.data

    qdir = store.current_path("quantizer")
    files = {name: store.read_bytes(f"{qdir}/{name}") for name in store.require("quantizer")["files"]}
    ref = ray.put(files)
    ds = ray.data.read_parquet(f"{store.current_path('embeddings')}/embeddings", filesystem=store.fs)
    ds = ds.map_batches(
        CodeAssigner,
        fn_constructor_kwargs={"quantizer_files": ref},
        batch_size=cfg.sids.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=cfg.sids.num_actors),
        num_cpus=0.5,
    )
    return pa.concat_tables(ray.get(ds.to_arrow_refs()))


def build_sids(store: ArtifactStore, cfg: SidrecConfig, force: bool = False) -> dict:
    from sidrec.report import sid_report, write_report
    from sidrec.sids import assign_collisions, render_sid

    quantizer, emb = store.require("quantizer"), store.require("embeddings")

    def body(run: StageRun) -> dict:
        table = assign_codes(store, cfg)
        item_ids = table.column("item_id").to_pylist()
        raw = np.asarray(table.column("codes").to_pylist(), dtype=np.int64)
        codes = assign_collisions(raw, cfg.sids.collision, max_extra=cfg.quantize.codebook_size)
        sids = pa.table({
            "item_id": pa.array(item_ids, pa.string()),
            "codes": pa.array(list(codes), type=pa.list_(pa.int64())),
            "sid": pa.array([render_sid(c) for c in codes], pa.string()),
        })
        store.write_table(f"{run.path}/sids.parquet", sids)
        report = sid_report(store, cfg, item_ids, raw, codes, quantizer["metrics"])
        write_report(store, run.path, report, raw)
        return report["summary"]

    inputs = {"quantizer": quantizer["fingerprint"], "embeddings": emb["fingerprint"]}
    return run_stage(store, "sids", asdict(cfg.sids), inputs, force, body)


def build_all(cfg: SidrecConfig, force: bool = False) -> dict[str, dict]:
    """All SID stages in order; returns each stage's manifest."""
    store = ArtifactStore(cfg.store.root)
    out = {"dataset": build_dataset(store, cfg, force)}
    init_ray(cfg.ray)
    out["embeddings"] = build_embeddings(store, cfg, force)
    out["quantizer"] = build_quantizer(store, cfg, force)
    out["sids"] = build_sids(store, cfg, force)
    return out
