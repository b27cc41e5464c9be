"""The Ray Serve application: a trained SID-LLM from the artifact store behind a small JSON HTTP API.

Run it (the package is installed, so no ``working_dir`` is needed):

    serve run sidrec.serve.app:build_app store_root=artifacts/quickstart          # import path + args
    ray start --head && serve deploy serve_configs/local.yaml                      # YAML config

Two deployments:

* ``Recommender`` (``RecommenderDeployment``) holds a ``sidrec.recommender.Recommender`` loaded from the
  store named by its ``user_config`` (``ServeSettings``: ``store_root``, ``num_beams``, ``scoring``,
  ``api_key`` / ``api_key_env``, ``max_batch_size``, ``batch_wait_timeout_s``, ...). Requests are gathered
  by ``@serve.batch`` and decoded together: one ``Recommender.recommend`` call per batch (one per value of
  ``exclude_history`` present), one constrained beam search for the whole batch.
* ``Ingress`` is the FastAPI app (``@serve.ingress``): validation, size limit, metrics, error mapping.

Endpoints (all bodies JSON; every error is ``{"error": <code>, "detail": <message>, ...}`` with a 4xx
status for bad input, never a 500):

* ``POST /v1/recommend`` ``{"history": [item_id, ...], "profile": "...", "k": 10, "exclude_history": true}``
  -> ``{"items": [{"item_id", "title", "sid", "score"}, ...], "model_version", "history_truncated", ...}``.
  Unknown ids -> 422 naming them; empty history -> a cold-start answer from ``profile`` (422 without one);
  a history longer than the model's ``max_history`` keeps its most recent items (``history_truncated``);
  ``k`` outside 1..num_beams -> 422.
* ``GET /v1/items/{item_id}`` -> title and SID (404 if unknown).
* ``POST /v1/items/search`` ``{"title": "...", "k": 5}`` -> real catalog items for a title, decoded by the
  model from the training's first title->SID prompt under the SID constraint.
* ``POST /v1/items`` (admin) ``{"items": [{"item_id", "title", "brand"?, "categories"?, "description"?}]}``
  -> their new SIDs (see ``sidrec.serve.items``); needs ``X-API-Key`` when a key is configured.
* ``GET /healthz``; ``/docs`` and ``/openapi.json`` (FastAPI).

Bodies larger than ``max_body_bytes`` (an ``args`` field of the app, 64 KiB by default) get 413.
Metrics (``ray.serve.metrics``, exported by Ray's Prometheus endpoint): ``sidrec_http_requests`` (route,
method, status), ``sidrec_http_request_seconds``; ``sidrec_batch_size`` and ``sidrec_inference_seconds``
per task on the Recommender replicas.

Reload: a new ``user_config`` (``serve deploy`` of an edited YAML) calls ``reconfigure`` on the running
replicas; no restart. When the store root, decoding settings or the published stage versions changed (or
``reload_token`` did), the new model is loaded in a thread while the old one keeps answering, then swapped
under the model lock, between two batches: requests in flight finish on the old model, later ones use the
new one. If the reload fails, the replica keeps serving the old version and ``/healthz`` reports the error
(a failed first load fails the deployment instead).

Cold-start items are added to the replica that receives the ``POST /v1/items``: every replica holds its
own copy of the index, so with several replicas an item is only known to one of them (and lost when that
replica is replaced). They survive reloads of that replica (re-encoded with the new store's quantizer).
For several replicas, publish new items through the store (rebuild the ``sids`` stage) and reconfigure.
"""

import asyncio
import hmac
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, Header
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from sidrec.serve.items import ItemEncoder, NewItem, assign_sids

log = logging.getLogger("ray.serve")

DEFAULT_MAX_BODY_BYTES = 64 * 1024
MAX_HISTORY_ITEMS = 5000     # per request, before truncation to the model's max_history
MAX_NEW_ITEMS = 100          # per POST /v1/items
LATENCY_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]
USER_CONFIG_KEYS = ("num_beams", "scoring", "device", "api_key", "api_key_env", "max_batch_size",
                    "batch_wait_timeout_s", "torch_threads", "reload_token")


# ============================================================================================ settings
class ServeSettings(BaseModel):
    """``user_config`` of the Recommender deployment; changing it calls ``reconfigure`` (no restart)."""

    model_config = ConfigDict(extra="forbid")

    store_root: str = Field(..., min_length=1, description="absolute path or URI (s3://...) of the store")
    num_beams: int = Field(20, ge=1, le=512, description="beam width; requests may ask for k <= num_beams")
    scoring: Literal["raw", "renormalized"] = "raw"
    device: str | None = Field(None, description="torch device; default cuda if available, else cpu")
    api_key: str | None = Field(None, min_length=8, description="key for the admin endpoints (X-API-Key)")
    api_key_env: str | None = Field(None, description="name of an env var holding the admin key; when set "
                                    "and the variable is missing, the admin endpoints are disabled")
    max_batch_size: int = Field(16, ge=1, le=1024)
    batch_wait_timeout_s: float = Field(0.01, ge=0.0, le=5.0)
    torch_threads: int | None = Field(None, ge=1, description="default: the replica's CPUs, rounded up")
    reload_token: str | int | None = Field(None, description="change it to force a reload of the store")

    @field_validator("store_root")
    @classmethod
    def _absolute(cls, v: str) -> str:
        if "://" not in v and not os.path.isabs(v):
            raise ValueError(f"store_root must be an absolute path or a URI, got {v!r}: replicas do not run "
                             "in your working directory")
        return v

    def load_key(self) -> tuple:
        return (self.store_root, self.num_beams, self.scoring, self.device, self.reload_token)


def _store_versions(root: str) -> dict[str, str]:
    """Published versions of the stages a Recommender reads; raises naming the store when it lacks them
    (without creating anything at ``root``)."""
    import pyarrow.fs as pafs

    from sidrec.store import MANIFEST, ArtifactStore, resolve_fs

    fs, base = resolve_fs(root)
    if fs.get_file_info(f"{base}/model/{MANIFEST}").type != pafs.FileType.File:
        raise FileNotFoundError(f"no trained model in artifact store {root!r} (no model/{MANIFEST}); build "
                                "one with `sidrec train --config ...`")
    store = ArtifactStore(root)
    return {s: store.require(s)["version"] for s in ("dataset", "sids", "instructions", "model")}


# ============================================================================================ helpers
def _error(status: int, code: str, detail: str, **extra: Any) -> dict:
    return {"status": status, "error": {"error": code, "detail": detail, **extra}}


def _replica_tag() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside a replica (unit use)
        return "local"


def _prompt_truncated(rec, history: list[str], profile: str) -> bool:
    """True when the token budget cuts the prompt (on top of the max_history cap)."""
    from sidrec.instructions import next_item_prompt
    from sidrec.llm import PROMPT_SEPARATOR

    prompt = next_item_prompt("", history, rec.sid_of, profile, rec.icfg)
    n = len(rec.tokenizer.encode(prompt + PROMPT_SEPARATOR, add_special_tokens=False))
    return n + (rec.tokenizer.bos_token_id is not None) > rec.max_prompt_tokens


def _check_k(k: int, rec) -> dict | None:
    nb = rec.decoder.num_beams
    if not 1 <= k <= nb:
        return _error(422, "k_out_of_range", f"k must be between 1 and {nb} (num_beams), got {k}", k=k, max_k=nb)
    return None


def _flatten(rec, hits, k: int) -> list[dict]:
    out = [{"item_id": i, "title": rec.titles.get(i, ""), "sid": h.sid, "score": float(h.score)}
           for h in hits for i in h.items]
    return out[:k]


def run_recommend(rec, requests: list[dict]) -> list[dict]:
    """A batch of /v1/recommend bodies -> response (or error) dicts, via one ``Recommender.recommend`` call
    per ``exclude_history`` value present. Each request is validated on its own, so one bad request never
    fails the others of its batch."""
    out: list[dict | None] = [None] * len(requests)
    groups: dict[bool, list[int]] = {}
    maxh = rec.icfg.max_history
    for n, r in enumerate(requests):
        hist, profile = r["history"], (r.get("profile") or "").strip()
        if (bad := _check_k(r["k"], rec)) is not None:
            out[n] = bad
            continue
        unknown = list(dict.fromkeys(i for i in hist if i not in rec.sid_of))
        if unknown:
            shown = unknown[:20]
            more = f" (+{len(unknown) - 20} more)" if len(unknown) > 20 else ""
            out[n] = _error(422, "unknown_items", f"unknown item ids in history: {shown}{more}",
                            unknown_items=unknown[:100])
            continue
        if not hist and not profile:
            out[n] = _error(422, "empty_history", "history is empty and no profile was given: a cold-start "
                            "request needs a profile")
            continue
        if not hist and not rec.icfg.use_profile:
            out[n] = _error(422, "empty_history", "history is empty and this model was trained without "
                            "profiles: it needs at least one item")
            continue
        groups.setdefault(bool(r["exclude_history"]), []).append(n)
    for flag, idx in groups.items():
        for n, h in _decode_isolated(rec, requests, idx, flag):
            if isinstance(h, dict):
                out[n] = h
                continue
            r = requests[n]
            hist = r["history"]
            cut = _prompt_truncated(rec, hist, (r.get("profile") or "").strip())
            out[n] = {"items": _flatten(rec, h, r["k"]), "k": r["k"], "model_version": rec.model_version,
                      "history_items": len(hist), "history_used": min(len(hist), maxh),
                      "history_truncated": len(hist) > maxh or cut, "prompt_truncated": cut,
                      "max_history": maxh, "cold_start": not hist, "exclude_history": flag}
    return out  # type: ignore[return-value]


def _decode_isolated(rec, requests: list[dict], idx: list[int], exclude: bool):
    """(request index, hits) for a group decoded together; if the batch call fails, each request is
    decoded alone so that one failing request gets its own 500 and the others their answers."""

    def decode(rows: list[int]):
        return rec.recommend([requests[n]["history"] for n in rows], k=max(requests[n]["k"] for n in rows),
                             exclude_history=exclude,
                             profiles=[(requests[n].get("profile") or "").strip() for n in rows])

    try:
        return list(zip(idx, decode(idx), strict=True))
    except Exception:
        if len(idx) == 1:
            log.exception("sidrec: decoding failed")
            return [(idx[0], _error(500, "internal_error", "decoding failed; see the replica log"))]
    out = []
    for n in idx:
        try:
            out.append((n, decode([n])[0]))
        except Exception:
            log.exception("sidrec: decoding failed")
            out.append((n, _error(500, "internal_error", "decoding failed; see the replica log")))
    return out


def title_prompt(rec, title: str) -> str:
    """The training's first title->SID template, filled as the instruction builder fills it."""
    from sidrec.instructions import TEMPLATES

    return TEMPLATES[rec.icfg.language]["title_to_sid"][0].format(title=title.strip())


def run_search(rec, requests: list[dict]) -> list[dict]:
    """A batch of /v1/items/search bodies -> responses: one constrained beam search for all of them."""
    from sidrec.llm import encode_prompt

    out: list[dict | None] = [None] * len(requests)
    ok = []
    for n, r in enumerate(requests):
        if (bad := _check_k(r["k"], rec)) is not None:
            out[n] = bad
        else:
            ok.append(n)
    if ok:
        prompts = [encode_prompt(title_prompt(rec, requests[n]["title"]), rec.tokenizer, rec.max_prompt_tokens)
                   for n in ok]
        hits = rec.decoder.search(prompts, k=max(requests[n]["k"] for n in ok))
        trained = rec.icfg.task_weights.get("title_to_sid", 0.0) > 0
        for n, h in zip(ok, hits, strict=True):
            out[n] = {"query": requests[n]["title"].strip(), "items": _flatten(rec, h, requests[n]["k"]),
                      "k": requests[n]["k"], "model_version": rec.model_version, "title_to_sid_trained": trained}
    return out  # type: ignore[return-value]


@dataclass
class _Added:
    item: NewItem
    embedding: np.ndarray
    embed_version: str


# ========================================================================================= Recommender
@serve.deployment(name="Recommender", max_ongoing_requests=32, ray_actor_options={"num_cpus": 1},
                  health_check_period_s=10, health_check_timeout_s=30)
class RecommenderDeployment:
    """One replica = one Recommender (model + index + catalog), swapped atomically on reconfigure."""

    def __init__(self):
        from ray.serve import metrics

        self._rec = None
        self._settings: ServeSettings | None = None
        self._versions: dict[str, str] = {}
        self._encoder: ItemEncoder | None = None
        self._added: dict[str, _Added] = {}
        self._lock: asyncio.Lock | None = None
        self._loads = 0
        self._loaded_at: float | None = None
        self._reload_error: str | None = None
        self._batches = {"recommend": [0, 0], "search": [0, 0]}  # task -> [batches, requests]
        self._replica = _replica_tag()
        self._batch_size = metrics.Histogram(
            "sidrec_batch_size", description="requests decoded together by one @serve.batch call",
            boundaries=[1, 2, 4, 8, 16, 32, 64, 128, 256], tag_keys=("task",))
        self._infer_s = metrics.Histogram(
            "sidrec_inference_seconds", description="model time of one batch (beam search)",
            boundaries=LATENCY_BUCKETS_S, tag_keys=("task",))

    def _model_lock(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    # ------------------------------------------------------------------------------------ loading
    async def reconfigure(self, config: dict) -> None:
        settings = ServeSettings.model_validate(config)
        for fn in (self.recommend_batch, self.search_batch):
            fn.set_max_batch_size(settings.max_batch_size)
            fn.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)
        prev = self._settings
        if settings.api_key is None and settings.api_key_env is None and (
                prev is None or prev.api_key is not None or prev.api_key_env is not None):
            log.warning("sidrec: no api_key configured: POST /v1/items is open to every client that can "
                        "reach the service")
        try:
            versions = await asyncio.to_thread(_store_versions, settings.store_root)
            if (self._rec is not None and self._settings is not None
                    and self._settings.load_key() == settings.load_key() and versions == self._versions):
                self._settings = settings  # batching / auth only: nothing to reload
                return
            rec, encoder = await asyncio.to_thread(self._load, settings, versions)
        except Exception as e:
            if self._rec is None:
                raise  # first load: fail the replica (and the deploy) with the reason
            self._reload_error = f"{type(e).__name__}: {e}"
            log.exception("sidrec: reload of %s failed; still serving %s", settings.store_root,
                          self._rec.model_version)
            return
        async with self._model_lock():
            late = [a for i, a in self._added.items() if i not in rec.sid_of]  # added while loading
            if late:
                await asyncio.to_thread(self._reapply, rec, encoder, late)
            self._rec, self._encoder, self._settings, self._versions = rec, encoder, settings, versions
            self._loads += 1
            self._loaded_at = time.time()
            self._reload_error = None
        log.info("sidrec: serving model %s from %s (load #%d)", rec.model_version, settings.store_root,
                 self._loads)

    def _load(self, settings: ServeSettings, versions: dict[str, str]):
        """Runs in a thread while the current model keeps serving."""
        import ray
        import torch

        from sidrec.recommender import Recommender

        threads = settings.torch_threads
        if threads is None:
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0) if ray.is_initialized() else 1
            threads = max(1, math.ceil(cpus))
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        rec = Recommender.from_store(settings.store_root, num_beams=settings.num_beams, scoring=settings.scoring,
                                     device=settings.device)
        encoder = self._encoder
        if encoder is None or self._settings is None or self._settings.store_root != settings.store_root \
                or any(encoder.versions[s] != _stage_version(settings.store_root, s) for s in encoder.versions):
            encoder = ItemEncoder(settings.store_root)
        self._reapply(rec, encoder, list(self._added.values()))
        log.info("sidrec: loaded %s (%s) in %.1fs", settings.store_root, versions, time.perf_counter() - t0)
        return rec, encoder

    def _reapply(self, rec, encoder: ItemEncoder, entries: list[_Added]) -> None:
        """Add earlier cold-start items to a freshly loaded model; items that are now in the published
        catalog, or cannot get a SID any more, leave the added set (logged)."""
        todo = []
        for a in entries:
            if a.item.item_id in rec.sid_of:
                self._added.pop(a.item.item_id, None)
                log.info("sidrec: added item %s is now in the published catalog", a.item.item_id)
            else:
                todo.append(a)
        for a in todo:
            if a.embed_version != encoder.versions["embeddings"]:
                a.embedding = encoder.embed([a.item])[0]
                a.embed_version = encoder.versions["embeddings"]
            try:
                [got] = assign_sids(rec, encoder, [a.item], a.embedding[None])
                rec.add_items([a.item.item_id], np.asarray([got.codes]), [a.item.title.strip()])
            except ValueError as e:
                self._added.pop(a.item.item_id, None)
                log.warning("sidrec: dropped added item %s after reload: %s", a.item.item_id, e)

    def check_health(self) -> None:
        if self._rec is None:
            raise RuntimeError("no model loaded: give the Recommender deployment a user_config with store_root")

    # ------------------------------------------------------------------------------------ batched
    async def _infer(self, task: str, requests: list[dict], fn: Callable) -> list[dict]:
        async with self._model_lock():
            rec = self._rec
            if rec is None:
                return [_error(503, "not_ready", "no model loaded yet")] * len(requests)
            t0 = time.perf_counter()
            out = await asyncio.to_thread(fn, rec, requests)
        self._batches[task][0] += 1
        self._batches[task][1] += len(requests)
        self._batch_size.observe(len(requests), tags={"task": task})
        self._infer_s.observe(time.perf_counter() - t0, tags={"task": task})
        return out

    async def recommend(self, request: dict) -> dict:
        """One /v1/recommend body (history as strings) -> response or error dict."""
        return await self.recommend_batch(request)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def recommend_batch(self, requests: list[dict]) -> list[dict]:
        return await self._infer("recommend", requests, run_recommend)

    async def search(self, request: dict) -> dict:
        """One /v1/items/search body -> response or error dict."""
        return await self.search_batch(request)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def search_batch(self, requests: list[dict]) -> list[dict]:
        return await self._infer("search", requests, run_search)

    # --------------------------------------------------------------------------------- catalog
    async def item(self, item_id: str) -> dict:
        rec = self._rec
        if rec is None:
            return _error(503, "not_ready", "no model loaded yet")
        sid = rec.sid_of.get(item_id)
        if sid is None:
            return _error(404, "unknown_item", f"unknown item id {item_id!r}", item_id=item_id)
        return {"item_id": item_id, "title": rec.titles.get(item_id, ""), "sid": sid,
                "source": "added" if item_id in self._added else "catalog", "model_version": rec.model_version}

    def _auth(self, given: str | None) -> dict | None:
        s = self._settings
        expected = s.api_key if s is not None else None
        if s is not None and s.api_key_env:
            expected = os.environ.get(s.api_key_env) or None
            if expected is None:
                return _error(403, "admin_disabled", f"admin endpoints are disabled: the environment variable "
                              f"{s.api_key_env} is not set on the replica")
        if expected is None:
            return None
        if not given:
            return _error(401, "missing_api_key", "this endpoint needs an X-API-Key header")
        if not hmac.compare_digest(given.encode(), expected.encode()):
            return _error(403, "invalid_api_key", "the X-API-Key header does not match")
        return None

    async def add_items(self, items: list[dict], api_key: str | None = None) -> dict:
        """Admin: embed, quantize and index new items on this replica (see sidrec.serve.items)."""
        if (denied := self._auth(api_key)) is not None:
            return denied
        if self._rec is None or self._settings is None:
            return _error(503, "not_ready", "no model loaded yet")
        new = [NewItem(**d) for d in items]
        ids = [n.item_id for n in new]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            return _error(422, "duplicate_items", f"item ids given more than once: {dup[:20]}", items=dup[:100])
        exists = [i for i in ids if i in self._rec.sid_of]
        if exists:
            return _error(409, "items_exist", f"item ids already in the catalog: {exists[:20]}", items=exists[:100])
        encoder = self._encoder
        if encoder is None:  # only when the first load predates the encoder (never in practice)
            encoder = self._encoder = await asyncio.to_thread(ItemEncoder, self._settings.store_root)
        emb = await asyncio.to_thread(encoder.embed, new)
        async with self._model_lock():
            rec = self._rec
            if self._encoder is not encoder:  # a reload swapped the store while we embedded
                encoder = self._encoder
                emb = await asyncio.to_thread(encoder.embed, new)
            exists = [i for i in ids if i in rec.sid_of]
            if exists:
                return _error(409, "items_exist", f"item ids already in the catalog: {exists[:20]}",
                              items=exists[:100])
            try:
                assigned = assign_sids(rec, encoder, new, emb)
            except ValueError as e:
                return _error(422, "no_free_sid", str(e))
            codes = np.asarray([a.codes for a in assigned], dtype=np.int64)
            sids = await asyncio.to_thread(rec.add_items, ids, codes, [n.title.strip() for n in new])
            for n, e in zip(new, emb, strict=True):
                self._added[n.item_id] = _Added(n, e, encoder.versions["embeddings"])
        return {"items": [{"item_id": a.item_id, "title": n.title.strip(), "sid": s, "exact_codes": a.exact}
                          for a, n, s in zip(assigned, new, sids, strict=True)],
                "model_version": rec.model_version, "replica": self._replica, "scope": "replica"}

    def health(self) -> dict:
        rec, s = self._rec, self._settings
        return {"status": "ok" if rec is not None else "loading",
                "model_version": rec.model_version if rec else None,
                "items": len(rec.sid_of) if rec else 0, "added_items": len(self._added),
                "num_beams": rec.decoder.num_beams if rec else None, "scoring": s.scoring if s else None,
                "max_history": rec.icfg.max_history if rec else None,
                "max_batch_size": s.max_batch_size if s else None,
                "batch_wait_timeout_s": s.batch_wait_timeout_s if s else None,
                "mean_batch_size": {t: round(r / b, 2) if b else None for t, (b, r) in self._batches.items()},
                "loads": self._loads, "loaded_at": self._loaded_at, "reload_error": self._reload_error,
                "replica": self._replica}


def _stage_version(root: str, stage: str) -> str:
    from sidrec.store import ArtifactStore

    return ArtifactStore(root).require(stage)["version"]


# ============================================================================================ HTTP API
class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"history": ["50", "172", "133"], "k": 10, "exclude_history": True}]})

    history: list[StrictStr | StrictInt] = Field(
        default_factory=list, max_length=MAX_HISTORY_ITEMS,
        description="item ids, oldest first; only the model's max_history most recent are used")
    profile: str | None = Field(None, max_length=2000, description="free-text user profile (cold start)")
    k: StrictInt = Field(10, ge=1, description="number of items, 1..num_beams")
    exclude_history: StrictBool = Field(True, description="never recommend items of the history")


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    title: StrictStr = Field(..., min_length=1, max_length=1000)
    k: StrictInt = Field(5, ge=1)

    @field_validator("title")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("title must not be blank")
        return v


class NewItemIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    item_id: StrictStr | StrictInt
    title: StrictStr = Field(..., min_length=1, max_length=1000)
    brand: StrictStr = Field("", max_length=500)
    categories: StrictStr | list[StrictStr] = Field("", description="a string or a list (joined with ' > ')")
    description: StrictStr = Field("", max_length=5000)

    @field_validator("item_id")
    @classmethod
    def _id(cls, v: str | int) -> str:
        v = str(v)
        if not v.strip() or len(v) > 256:
            raise ValueError("item_id must be a non-blank string of at most 256 characters")
        return v

    @field_validator("title")
    @classmethod
    def _title(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("title must not be blank")
        return v


class AddItemsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[NewItemIn] = Field(..., min_length=1, max_length=MAX_NEW_ITEMS)


class ScoredItem(BaseModel):
    item_id: str
    title: str
    sid: str
    score: float = Field(description="sum of the SID tokens' log-probabilities")


class RecommendResponse(BaseModel):
    items: list[ScoredItem]
    k: int
    model_version: str
    history_items: int = Field(description="items in the request's history")
    history_used: int = Field(description="most recent items put in the prompt (<= max_history)")
    history_truncated: bool = Field(description="true when older items were left out of the prompt")
    prompt_truncated: bool = Field(description="true when the token budget cut the prompt further")
    max_history: int
    cold_start: bool = Field(description="empty history: answered from the profile alone")
    exclude_history: bool


class SearchResponse(BaseModel):
    query: str
    items: list[ScoredItem]
    k: int
    model_version: str
    title_to_sid_trained: bool


class ItemInfo(BaseModel):
    item_id: str
    title: str
    sid: str
    source: Literal["catalog", "added"]
    model_version: str


class AddedItem(BaseModel):
    item_id: str
    title: str
    sid: str
    exact_codes: bool = Field(description="false when the quantizer's own codes used tokens the model "
                                          "lacks and the nearest codes it knows were used")


class AddItemsResponse(BaseModel):
    items: list[AddedItem]
    model_version: str
    replica: str
    scope: Literal["replica"] = Field(description="the items were added to the replica that answered only")


class ErrorBody(BaseModel):
    model_config = ConfigDict(extra="allow")

    error: str
    detail: str


_ERRORS = {s: {"model": ErrorBody} for s in (413, 422, 503)}

api = FastAPI(title="sidrec", version="1",
              description="Generative recommendation with Semantic IDs: a causal LM decodes item SIDs under "
                          "a prefix-tree constraint, so every answer is a real catalog item.")
api.state.max_body_bytes = DEFAULT_MAX_BODY_BYTES
api.state.metrics = None


class _BodySizeLimit:
    """413 for request bodies over ``app.state.max_body_bytes`` (declared or streamed)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = getattr(scope.get("app"), "state", api.state)
        limit = int(getattr(state, "max_body_bytes", DEFAULT_MAX_BODY_BYTES))
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                return await _send_json(send, 400, {"error": "bad_request", "detail": "invalid Content-Length"})
            if size > limit:
                return await _too_large(send, limit)
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return None
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > limit:
                return await _too_large(send, limit)
            chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


async def _send_json(send, status: int, body: dict) -> None:
    import json

    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


async def _too_large(send, limit: int) -> None:
    await _send_json(send, 413, {"error": "body_too_large", "detail": f"request body exceeds {limit} bytes",
                                 "max_body_bytes": limit})


class _HttpMetrics:
    def __init__(self):
        from ray.serve import metrics

        self.count = metrics.Counter("sidrec_http_requests", description="HTTP requests by route and status",
                                     tag_keys=("route", "method", "status"))
        self.latency = metrics.Histogram("sidrec_http_request_seconds", description="HTTP request latency",
                                         boundaries=LATENCY_BUCKETS_S, tag_keys=("route", "method", "status"))

    def record(self, route: str, method: str, status: int, seconds: float) -> None:
        tags = {"route": route, "method": method, "status": str(status)}
        self.count.inc(tags=tags)
        self.latency.observe(seconds, tags=tags)


class _RequestMetrics:
    """Counts and times every HTTP request (413s included), tagged with the route template."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]
        t0 = time.perf_counter()

        async def send_status(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, send_status)
        finally:
            m = getattr(getattr(scope.get("app"), "state", None), "metrics", None)
            if m is not None:
                route = getattr(scope.get("route"), "path", None) or "unmatched"
                m.record(route, scope.get("method", ""), status[0], time.perf_counter() - t0)


api.add_middleware(_BodySizeLimit)
api.add_middleware(_RequestMetrics)  # added last = outermost: sees the 413s too


@api.exception_handler(RequestValidationError)
async def _invalid_request(request, exc: RequestValidationError) -> JSONResponse:
    errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
              for e in exc.errors()]
    detail = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors[:10])
    return JSONResponse(status_code=422, content=jsonable_encoder(
        {"error": "invalid_request", "detail": detail or "invalid request", "errors": errors[:50]}))


@api.exception_handler(StarletteHTTPException)
async def _http_error(request, exc: StarletteHTTPException) -> JSONResponse:
    codes = {404: "not_found", 405: "method_not_allowed", 400: "bad_request"}
    return JSONResponse(status_code=exc.status_code, headers=getattr(exc, "headers", None),
                        content={"error": codes.get(exc.status_code, f"http_{exc.status_code}"),
                                 "detail": str(exc.detail)})


@api.exception_handler(Exception)
async def _internal_error(request, exc: Exception) -> JSONResponse:
    log.error("sidrec: unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse(status_code=500, content={"error": "internal_error", "detail": f"{type(exc).__name__}; "
                                                  "see the ingress log"})


def _reply(out: dict) -> Any:
    if "error" in out and "status" in out:
        return JSONResponse(status_code=out["status"], content=out["error"])
    return out


@serve.deployment(name="Ingress", max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.1})
@serve.ingress(api)
class Ingress:
    """HTTP front: validates bodies, calls the Recommender deployment, maps errors to 4xx/503 JSON."""

    def __init__(self, recommender, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, retries: int = 2):
        self._rec = recommender
        self._retries = retries
        api.state.max_body_bytes = max_body_bytes
        api.state.metrics = _HttpMetrics()

    async def _call(self, method: str, *args, idempotent: bool = True, **kwargs) -> dict:
        """Call a Recommender method; reads are retried on another replica when the one picked dies."""
        from ray.exceptions import RayActorError
        from ray.serve.exceptions import (
            BackPressureError,
            DeploymentUnavailableError,
            ReplicaUnavailableError,
        )

        attempts = 1 + (self._retries if idempotent else 0)
        for attempt in range(attempts):
            try:
                return await getattr(self._rec, method).remote(*args, **kwargs)
            except (RayActorError, ReplicaUnavailableError) as e:
                if attempt + 1 == attempts:
                    return _error(503, "unavailable", f"the recommender replica failed ({type(e).__name__}); "
                                  "retry")
            except (BackPressureError, DeploymentUnavailableError) as e:
                return _error(503, "unavailable", f"the recommender is unavailable ({type(e).__name__}); retry")
        raise AssertionError("unreachable")

    @api.post("/v1/recommend", response_model=RecommendResponse, responses=_ERRORS)
    async def recommend(self, body: RecommendRequest):
        """Top-k next items for a history (oldest first) and/or a profile."""
        req = body.model_dump()
        req["history"] = [str(i) for i in body.history]
        return _reply(await self._call("recommend", req))

    @api.get("/v1/items/{item_id}", response_model=ItemInfo, responses={404: {"model": ErrorBody}})
    async def get_item(self, item_id: str):
        """Title and SID of a catalog (or added) item."""
        return _reply(await self._call("item", item_id))

    @api.post("/v1/items/search", response_model=SearchResponse, responses=_ERRORS)
    async def search_items(self, body: SearchRequest):
        """Items for a title, decoded by the model's title->SID task (constrained: real items only)."""
        return _reply(await self._call("search", body.model_dump()))

    @api.post("/v1/items", response_model=AddItemsResponse,
              responses={**_ERRORS, 401: {"model": ErrorBody}, 403: {"model": ErrorBody}, 409: {"model": ErrorBody}})
    async def add_items(self, body: AddItemsRequest, x_api_key: str | None = Header(None)):
        """Admin: add cold-start items (recommendable at once, on the replica that answers)."""
        items = [i.model_dump() for i in body.items]
        return _reply(await self._call("add_items", items, api_key=x_api_key, idempotent=False))

    @api.get("/healthz")
    async def healthz(self):
        """Model version and state of one Recommender replica."""
        out = await self._call("health")
        if "error" in out and "status" in out:
            return _reply(out)
        return JSONResponse(status_code=200 if out["status"] == "ok" else 503, content=out)


# ============================================================================================ builder
class AppArgs(BaseModel):
    """Arguments of ``build_app`` (``serve run sidrec.serve.app:build_app key=value ...`` or ``args:`` in
    a YAML). The ServeSettings fields become the Recommender's user_config when ``store_root`` is given;
    a YAML may instead give ``user_config`` on the Recommender deployment (which then takes precedence)."""

    model_config = ConfigDict(extra="forbid")

    store_root: str | None = None
    num_beams: int | None = None
    scoring: Literal["raw", "renormalized"] | None = None
    device: str | None = None
    api_key: str | None = None
    api_key_env: str | None = None
    max_batch_size: int | None = None
    batch_wait_timeout_s: float | None = None
    torch_threads: int | None = None
    reload_token: str | int | None = None
    num_replicas: int | None = Field(None, ge=1)
    num_cpus: float | None = Field(None, gt=0)
    num_gpus: float | None = Field(None, ge=0)
    max_body_bytes: int = Field(DEFAULT_MAX_BODY_BYTES, ge=1024)
    retries: int = Field(2, ge=0, le=5, description="re-sends of a read whose replica died mid-request")


def build_app(args: dict):
    """The Serve application: Ingress(FastAPI) -> Recommender."""
    a = AppArgs.model_validate(dict(args or {}))
    opts: dict[str, Any] = {}
    given = {k: getattr(a, k) for k in USER_CONFIG_KEYS if getattr(a, k) is not None}
    if a.store_root:
        root = a.store_root if "://" in a.store_root else os.path.abspath(a.store_root)
        opts["user_config"] = ServeSettings.model_validate({"store_root": root, **given}).model_dump(
            exclude_none=True)
    elif given:
        raise ValueError(f"build_app: {sorted(given)} given without store_root")
    if a.num_replicas is not None:
        opts["num_replicas"] = a.num_replicas
    if a.num_cpus is not None or a.num_gpus is not None:
        opts["ray_actor_options"] = {"num_cpus": a.num_cpus if a.num_cpus is not None else 1,
                                     "num_gpus": a.num_gpus or 0}
    rec = RecommenderDeployment.options(**opts).bind()
    return Ingress.bind(rec, max_body_bytes=a.max_body_bytes, retries=a.retries)
