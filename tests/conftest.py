import os
from pathlib import Path

import pytest

# Test clusters bind loopback only; Ray 2.60's token auth is for real clusters, not these.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_data(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"real data not found at {path} (see ../shared/data/README.md)")
    return path


@pytest.fixture(scope="session")
def local_ray():
    """One 2-CPU local Ray for the whole session, always shut down."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def small_run_overrides() -> list[str]:
    """quickstart overrides for a real but small run on ml-100k (tiny model, a few steps, sampled eval)."""
    return [
        f"data.path={shared_data('ml-100k')}",
        "model.hidden_size=64", "model.num_layers=2", "model.intermediate_size=128",
        "train.max_steps=24", "train.epochs=2", "train.max_val_rows=64", "train.max_length=160",
        "eval.max_examples=48", "eval.unconstrained_sample=8", "eval.sasrec.epochs=2",
    ]


@pytest.fixture(scope="session")
def trained_store(local_ray, tmp_path_factory):
    """A real, small end-to-end store for evaluation and serving tests: ml-100k SIDs from MiniLM, a tiny
    Qwen2 fine-tuned for a few Ray Train steps. Returns (config, store root)."""
    from sidrec.config import load_config
    from sidrec.pipeline import run

    root = tmp_path_factory.mktemp("trained") / "store"
    cfg = load_config("quickstart", [f"store.root={root}", *small_run_overrides()])
    run(cfg, until="model")
    return cfg, str(root)
