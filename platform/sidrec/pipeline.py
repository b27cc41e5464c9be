"""All stages in order, each resumed from the artifact store: dataset -> embeddings -> quantizer -> sids ->
instructions -> base_model -> model -> eval.

    run(cfg)                    # every stage (what `sidrec pipeline` and `ray_jobs/pipeline.py` run)
    run(cfg, until="sids")      # the SID build only (`sidrec sids build`)
    run(cfg, force={"eval"})    # re-evaluate, reuse the rest (`sidrec eval --force`)

A stage whose config and inputs are unchanged is skipped, so re-running after a failure continues where it
stopped, and a finished pipeline re-runs in seconds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection

from sidrec.config import SidrecConfig
from sidrec.stages import base_model, dataset, embeddings, instructions, model, quantizer, sids
from sidrec.stages import eval as evaluation
from sidrec.store import ArtifactStore

log = logging.getLogger("sidrec")

Build = Callable[[ArtifactStore, SidrecConfig, bool], dict]
STAGES: tuple[tuple[str, Build], ...] = (
    ("dataset", dataset.build),
    ("embeddings", embeddings.build),
    ("quantizer", quantizer.build),
    ("sids", sids.build),
    ("instructions", instructions.build),
    ("base_model", base_model.build),
    ("model", model.build),
    ("eval", evaluation.build),
)
STAGE_NAMES = tuple(name for name, _ in STAGES)


def run(cfg: SidrecConfig, until: str | None = None, force: bool | Collection[str] = False) -> dict[str, dict]:
    """Run the stages in order through ``until`` (default: all); returns each stage's published manifest.

    ``force`` rebuilds every stage run (True) or the named ones (a collection of stage names).
    """
    if until is not None and until not in STAGE_NAMES:
        raise ValueError(f"unknown stage {until!r}; stages: {list(STAGE_NAMES)}")
    forced = set(STAGE_NAMES) if force is True else set(force or ())
    unknown = forced - set(STAGE_NAMES)
    if unknown:
        raise ValueError(f"unknown stage(s) to force {sorted(unknown)}; stages: {list(STAGE_NAMES)}")
    store = ArtifactStore(cfg.store.root)
    out: dict[str, dict] = {}
    for name, build in STAGES:
        out[name] = build(store, cfg, name in forced)
        if name == until:
            break
    return out


def eval_report(cfg: SidrecConfig) -> dict:
    """The published evaluation report of ``cfg``'s split."""
    store = ArtifactStore(cfg.store.root)
    return store.read_json(f"{store.current_path(f'eval_{cfg.eval.split}')}/report.json")
