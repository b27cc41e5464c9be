"""The ``Recommender`` deployment: one replica holds one ``sidrec.recommender.Recommender`` (model, index,
catalog) loaded from the artifact store named by its ``user_config`` (``sidrec.serve.settings.ServeSettings``).

Requests are gathered by ``@serve.batch`` and decoded together (``sidrec.serve.handling.run_recommend`` /
``run_search``: one beam search per batch). Reload: a new ``user_config`` calls ``reconfigure``; when the
store root, decoding settings or the published stage versions changed (or ``reload_token`` did), the new
model is loaded in a thread while the old one keeps answering, then swapped under the model lock, between
two batches. A failed reload keeps the old model serving and ``health()`` reports the error (a failed first
load fails the deployment instead).

The catalog (``sidrec.serve.items``): admin writes go to the store's catalog log and every replica applies
the log on load and polls it every ``catalog_poll_s`` (applied between batches, under the model lock), so
all replicas serve the same items, and a restarted or replaced replica still has every change.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import pyarrow.fs as pafs
import ray
import torch
from ray import serve
from ray.serve import metrics

from sidrec.catalog.encoder import ItemEncoder
from sidrec.catalog.session import CatalogSession
from sidrec.config import section_from_dict
from sidrec.recommender import Recommender
from sidrec.serve.coalesce import Coalescer
from sidrec.serve.handling import Reply, admin_key, check_api_key, item_info, run_recommend, run_search
from sidrec.serve.items import ReplicaCatalog, open_session
from sidrec.serve.schemas import error, is_error
from sidrec.serve.settings import MAX_BATCH_SIZE, ServeSettings
from sidrec.serve.ui.listing import HeldOutUsers, search_titles
from sidrec.store import MANIFEST, ArtifactStore, resolve_fs

log = logging.getLogger("ray.serve")

LATENCY_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]
BATCH_SIZE_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256]
SERVED_STAGES = ("dataset", "sids", "instructions", "model")  # what a Recommender reads
Task = Literal["recommend", "search"]


def not_ready() -> Reply:
    return error(503, "not_ready", "no model loaded yet")


# ============================================================================================ loading
def store_versions(root: str) -> dict[str, str]:
    """Published versions of the stages a Recommender reads; raises naming the store when it lacks them
    (without creating anything at ``root``)."""
    fs, base = resolve_fs(root)
    if fs.get_file_info(f"{base}/model/{MANIFEST}").type != pafs.FileType.File:
        raise FileNotFoundError(f"no trained model in artifact store {root!r} (no model/{MANIFEST}); build "
                                "one with `sidrec train --config ...`")
    store = ArtifactStore(root)
    return {s: store.require(s)["version"] for s in SERVED_STAGES}


def replica_tag() -> str:
    """This replica's id ("local" outside a replica)."""
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside a replica (unit use)
        return "local"


def torch_threads(settings: ServeSettings) -> int:
    """``torch_threads``, else the replica's CPUs rounded up."""
    if settings.torch_threads is not None:
        return settings.torch_threads
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0) if ray.is_initialized() else 1
    return max(1, math.ceil(cpus))


def encoder_is_current(encoder: ItemEncoder, store_root: str) -> bool:
    """True when the store's embeddings/quantizer/sids stages are still those the encoder was built from."""
    store = ArtifactStore(store_root)
    return all(encoder.versions[s] == store.require(s)["version"] for s in encoder.versions)


# ========================================================================================= deployment
@serve.deployment(name="Recommender", max_ongoing_requests=32, ray_actor_options={"num_cpus": 1},
                  health_check_period_s=10, health_check_timeout_s=30)
class RecommenderDeployment:
    """One replica = one Recommender, swapped atomically on reconfigure."""

    def __init__(self) -> None:
        self._rec: Recommender | None = None
        self._settings: ServeSettings | None = None
        self._versions: dict[str, str] = {}
        self._lock: asyncio.Lock | None = None
        self._loads = 0
        self._loaded_at: float | None = None
        self._reload_error: str | None = None
        self._batches: dict[Task, list[int]] = {"recommend": [0, 0], "search": [0, 0]}  # [batches, requests]
        self._replica = replica_tag()
        self._catalog = ReplicaCatalog(self._model_lock, self._replica)
        # coalesced /v1/recommend bodies: the next batch is everything that queued behind the current one
        self._decode_queue = Coalescer(lambda reqs: self.run_batch("recommend", reqs), max_group=MAX_BATCH_SIZE,
                                       in_flight=1)
        self._batch_size = metrics.Histogram(
            "sidrec_batch_size", description="requests decoded together in one batch",
            boundaries=BATCH_SIZE_BUCKETS, tag_keys=("task",))
        self._infer_s = metrics.Histogram(
            "sidrec_inference_seconds", description="model time of one batch (beam search)",
            boundaries=LATENCY_BUCKETS_S, tag_keys=("task",))

    def _model_lock(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    @property
    def recommender(self) -> Recommender | None:
        """The model being served (None before the first load)."""
        return self._rec

    # ------------------------------------------------------------------------------------ loading
    async def reconfigure(self, config: dict[str, Any]) -> None:
        """Apply a new ``user_config``: batching and auth at once, a reload when the model changed."""
        settings: ServeSettings = section_from_dict(ServeSettings, config)
        for fn in (self.recommend_batch, self.search_batch):
            fn.set_max_batch_size(settings.max_batch_size)
            fn.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)
        self._decode_queue.max_group = settings.max_batch_size
        self._note_admin_state(settings)
        try:
            versions = await asyncio.to_thread(store_versions, settings.store_root)
            if (self._rec is not None and self._settings is not None
                    and self._settings.load_key() == settings.load_key() and versions == self._versions):
                self._settings = settings  # batching / auth only: nothing to reload
                return
            rec, session = await asyncio.to_thread(self._load, settings, versions)
        except Exception as e:
            if self._rec is None:
                raise  # first load: fail the replica (and the deploy) with the reason
            self._reload_error = f"{type(e).__name__}: {e}"
            log.exception("sidrec: reload of %s failed; still serving %s", settings.store_root,
                          self._rec.model_version)
            return
        async with self._model_lock():
            self._rec, self._settings, self._versions = rec, settings, versions
            self._catalog.session = session
            self._loads += 1
            self._loaded_at = time.time()
            self._reload_error = None
        log.info("sidrec: serving model %s from %s (load #%d, catalog version %d)", rec.model_version,
                 settings.store_root, self._loads, session.state.applied)
        await self._catalog.sync()  # changes published while the model loaded
        self._catalog.start(lambda: self._settings.catalog_poll_s if self._settings else 1.0)

    def _note_admin_state(self, settings: ServeSettings) -> None:
        """Say, when it changes, whether the admin endpoints are on (never the key itself)."""
        on = admin_key(settings) is not None
        if self._settings is None or on != (admin_key(self._settings) is not None):
            log.info("sidrec: admin endpoints %s", "enabled (X-API-Key)" if on else
                     "disabled: no api_key or api_key_env key configured, POST /v1/items answers 403")

    def _load(self, settings: ServeSettings, versions: dict[str, str]) -> tuple[Recommender, CatalogSession]:
        """Runs in a thread while the current model keeps serving: the model, then the catalog log on it."""
        torch.set_num_threads(torch_threads(settings))
        t0 = time.perf_counter()
        rec = Recommender.from_store(settings.store_root, num_beams=settings.num_beams, scoring=settings.scoring,
                                     device=settings.device)
        current = self._catalog.session
        encoder = current.encoder if current is not None else None
        if (encoder is None or self._settings is None or self._settings.store_root != settings.store_root
                or not encoder_is_current(encoder, settings.store_root)):
            encoder = None  # built anew from the store's stages
        session = open_session(rec, settings.store_root, encoder, self._replica)
        log.info("sidrec: loaded %s (%s) in %.1fs", settings.store_root, versions, time.perf_counter() - t0)
        return rec, session

    def check_health(self) -> None:
        if self._rec is None:
            raise RuntimeError("no model loaded: give the Recommender deployment a user_config with store_root")

    # ------------------------------------------------------------------------------------ batched
    async def run_batch(self, task: Task, requests: Sequence[dict[str, Any]]) -> list[Reply]:
        """Decode a batch of ``task`` requests on the current model (what each @serve.batch call runs)."""
        fn: Callable[..., list[Reply]] = run_recommend if task == "recommend" else run_search
        async with self._model_lock():
            rec, settings = self._rec, self._settings
            if rec is None:
                return [not_ready() for _ in requests]
            slots = (((settings.new_item_slots, settings.new_item_ranking) if settings is not None else (0,))
                     if task == "recommend" else ())
            t0 = time.perf_counter()
            out = await asyncio.to_thread(fn, rec, requests, *slots)
        self._batches[task][0] += 1
        self._batches[task][1] += len(requests)
        self._batch_size.observe(len(requests), tags={"task": task})
        self._infer_s.observe(time.perf_counter() - t0, tags={"task": task})
        return out

    async def recommend(self, request: dict[str, Any]) -> Reply:
        """One /v1/recommend body (history as strings) -> response or error reply."""
        out = await self.recommend_batch(request)
        return out if is_error(out) else {**out, "replica": self._replica}

    async def recommend_many(self, requests: list[dict[str, Any]]) -> list[Reply]:
        """Several /v1/recommend bodies (the ingress's coalesced call). They join the replica's decode queue:
        whatever waits when the model is free is decoded as the next batch (at most ``max_batch_size``), with
        no batch wait."""
        out = await asyncio.gather(*(self._decode_queue(r) for r in requests))
        return [o if is_error(o) else {**o, "replica": self._replica} for o in out]

    @serve.batch(max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=0.01)
    async def recommend_batch(self, requests: list[dict[str, Any]]) -> list[Reply]:
        return await self.run_batch("recommend", requests)

    async def search(self, request: dict[str, Any]) -> Reply:
        """One /v1/items/search body -> response or error reply."""
        return await self.search_batch(request)

    @serve.batch(max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=0.01)
    async def search_batch(self, requests: list[dict[str, Any]]) -> list[Reply]:
        return await self.run_batch("search", requests)

    # --------------------------------------------------------------------------------- catalog
    async def item(self, item_id: str) -> Reply:
        """GET /v1/items/{item_id}."""
        rec, session = self._rec, self._catalog.session
        if rec is None:
            return not_ready()
        out = item_info(rec, item_id, session.state if session is not None else None)
        if is_error(out):  # which replica said 404 matters too (a retire reaches every replica)
            return {**out, "error": {**out["error"], "replica": self._replica}}
        return {**out, "replica": self._replica}

    def _admin_refusal(self, api_key: str | None) -> Reply | None:
        if (denied := check_api_key(self._settings, api_key)) is not None:
            return denied
        if self._rec is None or self._catalog.session is None:
            return not_ready()
        return None

    async def add_items(self, items: list[dict[str, Any]], api_key: str | None = None) -> Reply:
        """Admin: add or update items through the store's catalog log (see sidrec.serve.items)."""
        if (refused := self._admin_refusal(api_key)) is not None:
            return refused
        return await self._catalog.upsert(items)

    async def retire_items(self, item_ids: list[str], api_key: str | None = None) -> Reply:
        """Admin: retire items through the store's catalog log: no replica returns them again."""
        if (refused := self._admin_refusal(api_key)) is not None:
            return refused
        return await self._catalog.retire(item_ids)

    async def catalog_version(self) -> Reply:
        """GET /v1/catalog/version: the store's catalog version and the one this replica applied."""
        if self._catalog.session is None:
            return not_ready()
        return await self._catalog.version()

    async def stop_polling(self) -> None:
        """Stop the catalog poll task and the decode queue (a replica's own event loop ends them; unit use
        outside Serve)."""
        await self._catalog.stop()
        await self._decode_queue.close()

    def health(self) -> dict[str, Any]:
        """Model version and state of this replica (GET /healthz)."""
        rec, s = self._rec, self._settings
        return {"status": "ok" if rec is not None else "loading",
                "model_version": rec.model_version if rec else None,
                "items": len(rec.sid_of) if rec else 0, "catalog_version": self._catalog.applied,
                "catalog_poll_error": self._catalog.poll_error,
                "num_beams": rec.decoder.num_beams if rec else None, "scoring": s.scoring if s else None,
                "max_history": rec.icfg.max_history if rec else None,
                "max_batch_size": s.max_batch_size if s else None,
                "batch_wait_timeout_s": s.batch_wait_timeout_s if s else None,
                "mean_batch_size": {t: round(r / b, 2) if b else None for t, (b, r) in self._batches.items()},
                "batches": {t: list(v) for t, v in self._batches.items()},  # [batches, requests], for benches
                "loads": self._loads, "loaded_at": self._loaded_at, "reload_error": self._reload_error,
                "replica": self._replica}

    # ----------------------------------------------------------------------- demo page listings
    async def users(self, limit: int, offset: int) -> Reply:
        """GET /v1/users: test users of the served store (its test split, read once per dataset version)."""
        rec, settings = self._rec, self._settings
        if rec is None or settings is None:
            return not_ready()
        key = (settings.store_root, self._versions.get("dataset"))
        split: HeldOutUsers | None = getattr(self, "_ui_users", None)  # made on first use
        if split is None or split.key != key:
            split = self._ui_users = await asyncio.to_thread(HeldOutUsers, *key)
        return split.page(limit, offset, rec.profiles)

    async def list_items(self, q: str, limit: int) -> Reply:
        """GET /v1/items?q=: title substring search over this replica's live catalog (added items included)."""
        rec = self._rec
        if rec is None:
            return not_ready()
        return await asyncio.to_thread(search_titles, rec.sid_of, rec.titles, q, limit)
