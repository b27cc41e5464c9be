"""The Serve application's options, declared like every other section (`sidrec.config`'s ``opt`` / ``Section``):

* ``ServeSettings``: the Recommender deployment's ``user_config`` (changing it reloads the replicas);
* ``ServeAppConfig``: the options of ``build_app`` itself (replicas, resources, body limit, retries).

A leaf next to `sidrec.config` (the one sidrec module it imports), so the ingress and ``build_app`` load it for free.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar, Literal

from sidrec.config import (
    NEW_ITEM_RANKING,
    NEW_ITEM_SLOTS,
    NUM_BEAMS,
    ConfigError,
    NewItemRanking,
    Section,
    opt,
)

__all__ = ["MAX_BATCH_SIZE", "ServeAppConfig", "ServeSettings"]

MAX_BATCH_SIZE = 16  # requests a replica decodes together; also the most the ingress sends in one call


@dataclass
class ServeSettings(Section):
    """The Recommender deployment's ``user_config``: changing it reloads the replicas, no restart."""

    section: ClassVar[str] = "user_config"
    store_root: str = opt("", "absolute path or URI (s3://...) of the artifact store to serve")
    num_beams: int = opt(NUM_BEAMS, "beam width; requests may ask for k <= num_beams", ge=1, le=512)
    scoring: Literal["raw", "renormalized"] = opt("raw", "beam scores: raw log-probs or renormalized")
    device: str | None = opt(None, "torch device; default cuda if available, else cpu")
    api_key: str | None = opt(None, "key of the admin endpoints (X-API-Key); at least 8 characters")
    api_key_env: str | None = opt("SIDREC_API_KEY", "env var on the replicas holding the admin key when "
                                  "api_key is unset; with neither, the admin endpoints answer 403")
    max_batch_size: int = opt(MAX_BATCH_SIZE, "most requests decoded together (@serve.batch, a coalesced group)",
                              ge=1, le=1024)
    batch_wait_timeout_s: float = opt(0.01, "longest wait for a batch to fill", ge=0, le=5)
    torch_threads: int | None = opt(None, "torch threads per replica (default: its CPUs, rounded up)", ge=1)
    reload_token: str | int | None = opt(None, "change it to force a reload of the store")
    catalog_poll_s: float = opt(1.0, "seconds between polls of the store's catalog log", gt=0, le=60)
    new_item_slots: int = opt(NEW_ITEM_SLOTS, "top-k places reserved for items added after training "
                              "(never the first; 0 = the model's own list)", ge=0, le=512)
    new_item_ranking: NewItemRanking = opt(NEW_ITEM_RANKING, "what fills those places: content (text "
                                           "similarity to the history) or search (the model over the added items)")

    def check(self) -> None:
        if not self.store_root.strip():
            self.fail("store_root", "given")
        if "://" not in self.store_root and not os.path.isabs(self.store_root):
            self.fail("store_root", "an absolute path or a URI (replicas do not run in your working directory)")
        if self.api_key is not None and len(self.api_key) < 8:
            raise ConfigError("user_config.api_key must be at least 8 characters")

    def load_key(self) -> tuple:
        """What forces a model reload when it changes (the rest is applied in place)."""
        return (self.store_root, self.num_beams, self.scoring, self.device, self.reload_token)


@dataclass
class ServeAppConfig(Section):
    """Options of the Serve application itself (``build_app`` args besides the ``ServeSettings`` keys)."""

    section: ClassVar[str] = "args"
    num_replicas: int | None = opt(None, "Recommender replicas (default: the deployment's)", ge=1)
    num_cpus: float | None = opt(None, "CPUs per Recommender replica", gt=0)
    num_gpus: float | None = opt(None, "GPUs per Recommender replica", ge=0)
    max_body_bytes: int = opt(64 * 1024, "request bodies over this size get 413", ge=1024)
    retries: int = opt(2, "re-sends of a read whose replica died mid-request", ge=0, le=5)
    coalesce_in_flight: int = opt(4, "/v1/recommend calls the ingress keeps out to the Recommender; bodies "
                                  "arriving meanwhile wait and leave together in one call (0 = one call each)",
                                  ge=0, le=64)
