"""What a person sees on the terminal: one line per stage start/finish, results, none of Ray's chatter."""

import os
import subprocess
import sys
from collections import Counter

import pytest

from sidrec import console
from tests.conftest import small_run_overrides

NOISE = ("PlacementGroupCleaner", "Failed to query", "UserWarning", "(RayTrainWorker", "(MapWorker",
         "Loading weights", "logging_progress", "streaming_executor", "Started a local Ray instance")


def test_progress_is_a_no_op_outside_the_cli():
    with console.progress("x", total=3) as sink:
        sink.advance(2)  # no Ray, no counter actor: nothing happens, nothing fails
        sink.set_total(4)
    with console.local_bar("y", total=2) as advance:
        advance(1)


@pytest.mark.slow
def test_train_console_is_one_line_per_stage_and_no_ray_noise(tmp_path):
    cmd = [sys.executable, "-m", "sidrec.cli", "train", "--config", "quickstart", f"store.root={tmp_path / 's'}",
           *small_run_overrides()]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert [ln for ln in lines if any(n in ln for n in NOISE)] == []
    stages = ("dataset", "embeddings", "quantizer", "sids", "instructions", "base_model", "model")
    for stage in stages:
        assert sum(ln.startswith(f"{stage} ") and "building" in ln for ln in lines) == 1, stage
        assert sum(ln.startswith(f"{stage} ") and " done in " in ln for ln in lines) == 1, stage
    assert [ln for ln, n in Counter(lines).items() if n > 1] == []
    assert len(lines) < 40, out
    # -v brings Ray's own output back
    cmd_v = [sys.executable, "-m", "sidrec.cli", "-v", "sids", "build", "--force", "--config", "quickstart",
             f"store.root={tmp_path / 's'}", *small_run_overrides()]
    again = subprocess.run(cmd_v, capture_output=True, text=True, timeout=900, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert any(n in again.stdout + again.stderr for n in NOISE)
