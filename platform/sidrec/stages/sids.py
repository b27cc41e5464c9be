"""Stage ``sids``: codes assigned by Ray Data actors with the trained quantizer, collisions handled, reported.

The cold items of ``eval.cold_start`` get no SID here: the evaluation adds theirs after training, as an
admin add would (`sidrec.eval.cold`)."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pyarrow as pa

from sidrec.cluster import init_ray
from sidrec.config import SidrecConfig
from sidrec.data import cold_start
from sidrec.sids.codes import assign_collisions
from sidrec.sids.collab import CollabVectors, read_collab
from sidrec.sids.embed import embeddings_to_numpy
from sidrec.sids.quantize import CONFIG_FILE, WEIGHTS_FILE, encode_codes, quantizer_from_bytes
from sidrec.sids.report import sid_report, write_report
from sidrec.sids.tokens import render_sid
from sidrec.stages.run import run_stage
from sidrec.store import ArtifactStore, StageRun


class CodeAssigner:
    """Ray Data actor: embeddings (+ the stored collaborative vectors) → codes with the trained quantizer
    (both shared via the object store)."""

    def __init__(self, quantizer_files, vectors=None):
        import ray
        import torch

        torch.set_num_threads(1)
        if isinstance(quantizer_files, ray.ObjectRef):
            quantizer_files = ray.get(quantizer_files)
        if isinstance(vectors, ray.ObjectRef):
            vectors = ray.get(vectors)
        self.q = quantizer_from_bytes(quantizer_files)
        self.vectors: CollabVectors | None = vectors

    def __call__(self, batch: pa.Table) -> pa.Table:
        x = embeddings_to_numpy(batch)
        if self.vectors is not None:
            x = self.vectors.combine(x, self.vectors.lookup(batch.column("item_id").to_pylist()))
        codes = encode_codes(self.q, x)
        return pa.table({"item_id": batch.column("item_id"),
                         "codes": pa.array(list(codes), type=pa.list_(pa.int64()))})


def assign_codes(store: ArtifactStore, cfg: SidrecConfig) -> pa.Table:
    """Run CodeAssigner actors over the embeddings; return item_id + codes (small ints, fine on the driver)."""
    import ray
    import ray.data

    qdir = store.current_path("quantizer")
    files = {name: store.read_bytes(f"{qdir}/{name}") for name in (WEIGHTS_FILE, CONFIG_FILE)}
    ref = ray.put(files)
    vectors = read_collab(store)
    vref = ray.put(vectors) if vectors is not None else None
    ds = ray.data.read_parquet(f"{store.current_path('embeddings')}/embeddings", filesystem=store.fs)
    ds = ds.map_batches(
        CodeAssigner,
        fn_constructor_kwargs={"quantizer_files": ref, "vectors": vref},
        batch_size=cfg.sids.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=cfg.sids.num_actors),
        num_cpus=0.5,
    )
    return pa.concat_tables(ray.get(ds.to_arrow_refs()))


def build(store: ArtifactStore, cfg: SidrecConfig, force: bool = False) -> dict:
    quantizer, emb = store.require("quantizer"), store.require("embeddings")
    held_out = set(cold_start.cold_items(store)) if cold_start.enabled(cfg.eval) else set()

    def body(run: StageRun) -> dict:
        init_ray(cfg.ray)
        table = assign_codes(store, cfg)
        if held_out:
            table = table.filter(pa.array([i not in held_out for i in table.column("item_id").to_pylist()]))
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
    inputs |= cold_start.stage_inputs(store, cfg.eval)
    return run_stage(store, "sids", asdict(cfg.sids), inputs, force, body)
