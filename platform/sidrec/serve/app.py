"""The Ray Serve application: a trained SID-LLM from the artifact store behind a small JSON HTTP API.

Run it (the package is installed, so no ``working_dir`` is needed):

    serve run sidrec.serve.app:build_app store_root=artifacts/quickstart          # import path + args
    ray start --head && serve deploy serve_configs/local.yaml                      # YAML config

Two deployments:

* ``Recommender`` (``sidrec.serve.deployment.RecommenderDeployment``) holds a
  ``sidrec.recommender.Recommender`` loaded from the store named by its ``user_config``
  (``sidrec.serve.settings.ServeSettings``: ``store_root``, ``num_beams``, ``scoring``, ``api_key`` /
  ``api_key_env``, ``max_batch_size``, ``batch_wait_timeout_s``, ...). Requests are gathered by
  ``@serve.batch`` and decoded together: one ``Recommender.recommend`` call per batch (one per value of
  ``exclude_history`` present), one constrained beam search for the whole batch.
* ``Ingress`` (``sidrec.serve.http``) is the FastAPI app: validation, size limit, metrics, error mapping.

Endpoints (all bodies JSON; every error is ``{"error": <code>, "detail": <message>, ...}`` with a 4xx
status for bad input, never a 500):

* ``POST /v1/recommend`` ``{"history": [item_id, ...], "profile": "...", "k": 10, "exclude_history": true}``
  -> ``{"items": [{"item_id", "title", "sid", "score"}, ...], "model_version", "history_truncated", ...}``.
  Unknown ids -> 422 naming them; empty history -> a cold-start answer from ``profile`` (422 without one);
  a history longer than the model's ``max_history`` keeps its most recent items (``history_truncated``);
  ``k`` outside 1..num_beams -> 422.
* ``GET /v1/items/{item_id}`` -> title and SID (404 ``unknown_item``, or ``retired_item`` once retired).
* ``POST /v1/items/search`` ``{"title": "...", "k": 5}`` -> real catalog items for a title, decoded by the
  model from the training's first title->SID prompt under the SID constraint.
* ``POST /v1/items`` (admin) ``{"items": [{"item_id", "title", "brand"?, "categories"?, "description"?}]}``
  -> per item its SID and ``action`` (a new id is added, a known id with new text updated, the same text
  unchanged) and the catalog ``version``; ``POST /v1/items/retire`` (admin) ``{"item_ids": [...]}``;
  ``GET /v1/catalog/version``. Admin calls need ``X-API-Key`` (403 when no key is configured).
* ``GET /v1/users?limit=&offset=`` -> test users of the store (history, held-out item, profile);
  ``GET /v1/items?q=&limit=`` -> live catalog items whose title contains ``q`` (the demo page's listings).
* ``GET /ui`` (``GET /`` redirects there): the demo page (``sidrec.serve.ui``), self-contained.
* ``GET /healthz``; ``/docs`` and ``/openapi.json`` (FastAPI).

Bodies larger than ``max_body_bytes`` (an ``args`` field of the app, 64 KiB by default) get 413.
Metrics (``ray.serve.metrics``, exported by Ray's Prometheus endpoint): ``sidrec_http_requests`` (route,
method, status), ``sidrec_http_request_seconds``; ``sidrec_batch_size`` and ``sidrec_inference_seconds``
per task on the Recommender replicas.

Reload: a new ``user_config`` (``serve deploy`` of an edited YAML) calls ``reconfigure`` on the running
replicas; no restart (see ``sidrec.serve.deployment``). Catalog writes go to the store's catalog log
(``sidrec.catalog``) and answer once durable there; every replica applies the log when it loads and polls
it every ``catalog_poll_s`` (1 s), so all replicas serve the same items, and a restarted, replaced or
redeployed replica has every change (``sidrec items add|update|retire`` writes the same log).
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Mapping
from typing import Any, Literal

from ray.serve import Application

from sidrec.config import ConfigError, parse_value, section_from_dict
from sidrec.serve.deployment import RecommenderDeployment
from sidrec.serve.http import Ingress
from sidrec.serve.settings import ServeAppConfig, ServeSettings

SETTINGS_KEYS = tuple(f.name for f in dataclasses.fields(ServeSettings))
APP_KEYS = tuple(f.name for f in dataclasses.fields(ServeAppConfig))


def _takes_str(tp: Any) -> bool:
    if tp is str or typing.get_origin(tp) is Literal:
        return True
    return any(_takes_str(a) for a in typing.get_args(tp))


def from_cli(cls: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """``serve run ... key=value`` gives strings: parsed like a config override for the options that are not
    strings (a key such as ``api_key=12345678`` stays a string)."""
    hints = typing.get_type_hints(cls)
    return {k: parse_value(v) if isinstance(v, str) and not _takes_str(hints[k]) else v for k, v in values.items()}


def split_args(args: Mapping[str, Any] | None) -> tuple[ServeSettings | None, ServeAppConfig]:
    """``build_app`` args -> (the Recommender's user_config, or None when ``store_root`` is not given; the
    app options). Keys are the fields of ``ServeSettings`` and ``ServeAppConfig``; others are rejected."""
    given = dict(args or {})
    unknown = sorted(set(given) - {*SETTINGS_KEYS, *APP_KEYS})
    if unknown:
        raise ConfigError(f"build_app: unknown option(s) {unknown}; known: {sorted({*SETTINGS_KEYS, *APP_KEYS})}")
    app_cfg: ServeAppConfig = section_from_dict(ServeAppConfig, from_cli(
        ServeAppConfig, {k: given[k] for k in APP_KEYS if k in given}))
    user = {k: given[k] for k in SETTINGS_KEYS if given.get(k) is not None}
    root = user.pop("store_root", None)
    if root is None:
        if user:
            raise ConfigError(f"build_app: {sorted(user)} given without store_root")
        return None, app_cfg
    root = root if "://" in str(root) else os.path.abspath(str(root))
    settings: ServeSettings = section_from_dict(ServeSettings, from_cli(ServeSettings, {"store_root": root, **user}))
    return settings, app_cfg


def build_app(args: dict[str, Any] | None = None) -> Application:
    """The Serve application: Ingress (FastAPI) -> Recommender. ``args`` are flat: ``ServeSettings`` fields
    (they become the Recommender's user_config when ``store_root`` is given; a YAML may instead give
    ``user_config`` on the deployment, which then takes precedence) and ``ServeAppConfig`` fields."""
    settings, app_cfg = split_args(args)
    opts: dict[str, Any] = {}
    if settings is not None:
        opts["user_config"] = {k: v for k, v in dataclasses.asdict(settings).items() if v is not None}
    if app_cfg.num_replicas is not None:
        opts["num_replicas"] = app_cfg.num_replicas
    if app_cfg.num_cpus is not None or app_cfg.num_gpus is not None:
        opts["ray_actor_options"] = {"num_cpus": app_cfg.num_cpus if app_cfg.num_cpus is not None else 1,
                                     "num_gpus": app_cfg.num_gpus or 0}
    rec = RecommenderDeployment.options(**opts).bind()
    return Ingress.bind(rec, max_body_bytes=app_cfg.max_body_bytes, retries=app_cfg.retries,
                        coalesce_in_flight=app_cfg.coalesce_in_flight)
