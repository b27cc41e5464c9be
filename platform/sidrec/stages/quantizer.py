"""Stage ``quantizer``: an RQ-VAE / RQ-KMeans fitted on the embeddings in a Ray task, saved as safetensors.

The fit leaves out the cold items of ``eval.cold_start`` (`fit_input`): their codes come later, from the
fitted quantizer, as a new item's do. With ``quantize.collab_weight`` > 0 the stage first computes every
item's collaborative vector from the train split (`sidrec.sids.collab`), stores them as ``collab.parquet``
and fits on text + collaborative vectors."""

from __future__ import annotations

import logging
import time

import numpy as np

from sidrec import console
from sidrec.cluster import init_ray
from sidrec.config import QuantizerConfig, SidrecConfig
from sidrec.data import cold_start
from sidrec.sids import collab
from sidrec.sids.collab import COLLAB_FILE, CollabVectors
from sidrec.sids.embed import read_embeddings
from sidrec.sids.quantize import fit_quantizer, quantizer_to_bytes, reconstruction_error
from sidrec.stages.run import run_stage
from sidrec.store import ArtifactStore, StageRun

log = logging.getLogger("sidrec")


def collab_vectors(store: ArtifactStore, qcfg: QuantizerConfig, ids: list[str], emb: np.ndarray) -> CollabVectors:
    """Every embedded item's collaborative vector, counted from the published train split only."""
    train = store.read_table(f"{store.current_path('dataset')}/train.parquet", columns=["history", "target"])
    return CollabVectors.fit(ids, emb, train.column("history").to_pylist(), train.column("target").to_pylist(),
                             weight=qcfg.collab_weight, dim=qcfg.collab_dim, window=qcfg.collab_window,
                             neighbours=qcfg.collab_neighbours, seed=qcfg.seed)


def fit_input(store: ArtifactStore, held_out: list[str], vectors: CollabVectors | None = None,
              embedded: tuple[list[str], np.ndarray] | None = None) -> tuple[list[str], np.ndarray]:
    """(item ids, quantizer inputs) the quantizer is fitted on: every embedded item but the held-out (cold)
    ones; their text embeddings (``embedded``, else read from the store), joined with their collaborative
    vectors when ``vectors`` is given."""
    ids, emb = embedded if embedded is not None else read_embeddings(store)
    if vectors is not None:
        emb = vectors.combine(emb, vectors.lookup(ids))
    if not held_out:
        return ids, emb
    skip = set(held_out)
    keep = [r for r, i in enumerate(ids) if i not in skip]
    return [ids[r] for r in keep], emb[keep]


def _train_quantizer(store_root: str, out_path: str, qcfg: QuantizerConfig, held_out: list[str],
                     sink: console.ProgressSink) -> dict:
    """Ray task body: read embeddings from the store, fit, write safetensors + JSON back to the store."""
    store = ArtifactStore(store_root)
    extra: dict = {}
    vectors = None
    embedded = read_embeddings(store)   # read once: the collaborative step and the fit both use it
    if collab.enabled(qcfg):
        t0 = time.perf_counter()
        vectors = collab_vectors(store, qcfg, *embedded)
        store.write_table(f"{out_path}/{COLLAB_FILE}", vectors.to_table())
        extra = {"collab_seconds": round(time.perf_counter() - t0, 3),
                 "collab_observed_items": int(vectors.observed.sum()), "collab_dim": int(vectors.vectors.shape[1])}
    _, emb = fit_input(store, held_out, vectors, embedded)
    t0 = time.perf_counter()

    def progress(step: int, info: dict) -> None:
        log.debug("quantizer step %d %s", step, info)
        sink.advance(1)

    q = fit_quantizer(emb, qcfg, progress=progress)
    fit_s = time.perf_counter() - t0
    for name, blob in quantizer_to_bytes(q).items():
        store.write_bytes(f"{out_path}/{name}", blob)
    held = {"held_out_items": len(held_out)} if held_out else {}
    return {"items": len(emb), **held, "fit_seconds": round(fit_s, 3), "epochs_run": len(q.history),
            "reconstruction_mse": float(reconstruction_error(q, emb)), **extra}


def build(store: ArtifactStore, cfg: SidrecConfig, force: bool = False) -> dict:
    """Fit the configured quantizer on the published embeddings (one Ray task)."""
    import ray

    emb = store.require("embeddings")
    held_out = cold_start.cold_items(store) if cold_start.enabled(cfg.eval) else []

    def body(run: StageRun) -> dict:
        init_ray(cfg.ray)
        # reserve the CPUs the fit's torch threads will use (Ray also sets OMP_NUM_THREADS to this)
        task = ray.remote(num_cpus=max(1, cfg.quantize.num_threads))(_train_quantizer)
        steps = cfg.quantize.epochs if cfg.quantize.method == "rqvae" else cfg.quantize.levels
        with console.progress("quantizer fit", total=steps, unit="epoch") as sink:
            return ray.get(task.remote(store.root, run.path, cfg.quantize, held_out, sink))

    inputs = {"embeddings": emb["fingerprint"]} | cold_start.stage_inputs(store, cfg.eval)
    if collab.enabled(cfg.quantize):
        inputs["dataset"] = store.require("dataset")["fingerprint"]
    return run_stage(store, "quantizer", collab.stage_config(cfg.quantize), inputs, force, body)
