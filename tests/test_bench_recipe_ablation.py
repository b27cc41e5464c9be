"""bench/recipe_ablation.py: its "recipe" row is the shipped defaults, and every variant names real options."""

import importlib.util
from pathlib import Path

from sidrec.config import SidrecConfig, config_from_dict, to_dict

BENCH = Path(__file__).resolve().parents[1] / "bench" / "recipe_ablation.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_recipe_ablation", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _get(cfg: dict, dotted: str):
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg


def test_recipe_is_the_defaults_and_variants_are_real_options():
    bench = _bench()
    defaults = to_dict(SidrecConfig())
    for key, value in bench.RECIPE.items():
        assert _get(defaults, key) == value, key
    for name, over in bench.VARIANTS.items():
        cfg = to_dict(config_from_dict({}, [f"{k}={v}" for k, v in {**bench.RECIPE, **over}.items()]))
        assert all(_get(cfg, k) == v for k, v in over.items()), name
