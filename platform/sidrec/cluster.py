"""Joining or starting the Ray cluster a run uses, with the console settings of the session."""

from __future__ import annotations

import os

from sidrec import console
from sidrec.config import RayConfig


def init_ray(cfg: RayConfig) -> None:
    """Join the cluster named by cfg.address / RAY_ADDRESS (as inside `ray job submit`), else start one."""
    import ray

    if ray.is_initialized():
        return
    console.quiet_ray()
    if cfg.address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=cfg.address or None, **console.ray_init_options())
    else:
        ray.init(num_cpus=cfg.num_cpus or None, include_dashboard=False, **console.ray_init_options())
    console.quiet_ray()
