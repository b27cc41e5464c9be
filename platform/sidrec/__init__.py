"""sidrec: generative recommendation with Semantic IDs, distributed by Ray.

    import sidrec
    cfg = sidrec.load_config("quickstart")
    sidrec.run_pipeline(cfg)                                  # every stage, resumed from the store
    rec = sidrec.Recommender.from_store(cfg.store.root)       # model + SID index + catalog
    rec.recommend([["50", "172", "133"]], k=10)

The names load lazily, so `import sidrec` (and `import sidrec.config`) stays free of torch and Ray.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
__all__ = ["ArtifactStore", "Recommender", "load_config", "run_pipeline"]

_WHERE = {"load_config": ("sidrec.config", "load_config"), "ArtifactStore": ("sidrec.store", "ArtifactStore"),
          "Recommender": ("sidrec.recommender", "Recommender"), "run_pipeline": ("sidrec.pipeline", "run")}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'sidrec' has no attribute {name!r}")
    module, attr = _WHERE[name]
    return getattr(importlib.import_module(module), attr)
