"""`ray job submit` of the pipeline entry point against a `ray start --head` cluster of its own."""

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.conftest import small_run_overrides
from tests.serve.test_deploy import _cli, _ray_head

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_pipeline_job_resumes_from_the_store(trained_store, tmp_path):
    """The job gets a store that already holds the dataset and embeddings stages (as after an interrupted
    run): it must skip those and build quantizer -> SIDs -> instructions -> model -> evaluation."""
    from sidrec.store import ArtifactStore

    _, done_root = trained_store
    root = tmp_path / "store"
    for stage in ("dataset", "embeddings"):
        shutil.copytree(Path(done_root) / stage, root / stage)
    before = {s: ArtifactStore(str(root)).require(s)["version"] for s in ("dataset", "embeddings")}
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    ray_tmp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths have a length limit
    try:
        with _ray_head(ray_tmp, env) as dashboard:
            cmd = [*_cli("ray", "from ray.scripts.scripts import main; main()"), "job", "submit",
                   "--address", dashboard, "--working-dir", str(REPO), "--",
                   "python", "ray_jobs/run.py", "pipeline", "--config", "quickstart", f"store.root={root}",
                   *small_run_overrides()]
            proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=1500)
            out = proc.stdout + proc.stderr
            assert proc.returncode == 0 and "succeeded" in out, out[-4000:]
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    store = ArtifactStore(str(root))
    assert {s: store.require(s)["version"] for s in before} == before  # resumed, not rebuilt
    for stage in ("quantizer", "sids", "instructions", "base_model", "model", "eval_test"):
        assert store.manifest(stage) is not None, stage
    report = store.read_json(f"{store.current_path('eval_test')}/report.json")
    assert set(report["models"]) == {"sid-llm", "most-popular", "sasrec"} and report["examples"] == 48
    assert "| sid-llm |" in out  # the job printed the metrics table
