"""Running one stage into the artifact store: skip it when an identical run is published, else build a fresh
version and publish it atomically. Every stage module calls `run_stage`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from sidrec import console
from sidrec.store import ArtifactStore, StageRun, fingerprint

log = logging.getLogger("sidrec")


def stage_fingerprint(config: dict, inputs: dict[str, str]) -> str:
    """What decides whether a published stage is up to date: its config and its inputs' fingerprints."""
    return fingerprint({"config": config, "inputs": inputs})


def run_stage(store: ArtifactStore, stage: str, config: dict, inputs: dict[str, str], force: bool,
              body: Callable[[StageRun], dict]) -> dict:
    """Run `body` into a fresh version of `stage` and publish it, unless an identical run is published."""
    fp = stage_fingerprint(config, inputs)
    if not force and store.is_current(stage, fp):
        log.info("%-13s up to date, skipped (%s)", stage, store.require(stage)["version"])
        return store.require(stage)
    log.info("%-13s building ...", stage)
    console.quiet_ray()
    t0 = time.perf_counter()
    run = store.begin(stage)
    metrics = body(run)
    metrics["seconds"] = round(time.perf_counter() - t0, 3)
    manifest = store.publish(run, fp=fp, config=config, inputs=inputs, metrics=metrics)
    log.info("%-13s done in %.1f s (%s)", stage, metrics["seconds"], run.version)
    return manifest
