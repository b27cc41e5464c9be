"""Load test of the Serve app on loopback: throughput, latency and CPU per request by process at several
client counts, on both Serve data planes, coalesced, one call per request and unbatched; failed requests when
one of two replicas is killed mid-load; and the ratio of the served throughput to the offline decoder's at
the batch size Serve formed.

    python bench/serve_load.py --store artifacts/quickstart            # ~9 min on 2 CPUs (both planes)
    python bench/serve_load.py --store /tmp/qs --clients 8 --seconds 5 --offline-seconds 3

Each Serve data plane of ``--planes`` (``sidrec.cluster.SERVE_PLANES``: ``throughput``, Ray's HAProxy + direct
ingress + gRPC mode, sidrec's default; ``proxy``, Serve's Python proxy actor) gets a local Ray of its own, in a
child process of this script started with that plane's environment, one plane after the other. On each, the
applications below are deployed side by side (6 logical CPUs so that all of them fit; only one is under load at a
time, the others sit idle):

* ``batched``:  1 Recommender replica (1 CPU), ``max_batch_size`` 16;
* ``percall``:  the same, with the ingress's coalescing off (``coalesce_in_flight=0``: one call per request);
* ``single``:   1 Recommender replica (1 CPU), ``max_batch_size`` 1 (no batching: a coalesced group is
  decoded one request after another);
* ``kill``:     2 Recommender replicas (0.5 CPU each), batched; one replica is ``ray.kill``-ed a third of
  the way into its run (found among the named actors of the ``serve`` namespace); the ingress re-sends a
  read whose replica died (``retries``), and Serve starts a replacement. ``--kill-without-retries`` adds
  the same run with the ingress's retries off, to count what the retries saved.

Each run: N concurrent asyncio/httpx clients (N from ``--clients``, default 1 8 32; the kill runs use
``--kill-clients``) send ``POST /v1/recommend`` (k=10, histories of 1-20 random catalog items,
exclude_history) back to back for ``--seconds``. A run's mean batch is the replica's count of decoded
requests over its count of batches during that run (from /healthz before and after).

Then, with Serve shut down, the offline decoder: ``Recommender.recommend`` on the same store, with the
torch threads of one replica, on requests drawn the same way, in batches of the sizes around each run's
mean batch size (floor and ceil, a batch's time interpolated between them), ``--offline-seconds`` each. ``served / offline`` = a run's requests/s over the offline
requests/s at its batch size: 1.0 would mean Serve (proxy, ingress, handle call, batching wait, the load
generator on the same cores) costs nothing on top of the decoder. The load generator shares the
machine's cores with the replicas, so served numbers are lower bounds. Every plane is divided by the same
offline measurement. Prints a table and writes JSON to ``bench/results/serve_load.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a loopback-only local cluster
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def catalog_ids(store_root: str) -> list[str]:
    from sidrec.store import ArtifactStore

    return ArtifactStore(store_root).sid_table(["item_id"])["item_id"].to_pylist()


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def random_history(rng: random.Random, items: list[str]) -> list[str]:
    """What every load request (and the offline decoder's) asks about: 1-20 random catalog items."""
    return rng.sample(items, rng.randint(1, 20))


async def run_load(url: str, items: list[str], clients: int, seconds: float, seed: int,
                   during=None) -> dict:
    """``clients`` loops of POST /v1/recommend for ``seconds``; ``during`` (a coroutine function) runs
    alongside (the replica kill). Returns counts and latencies."""
    import httpx

    rng = random.Random(seed)
    lat: list[float] = []
    errors: dict[str, int] = {}
    deadline = time.perf_counter() + seconds

    async def client(n: int) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            while time.perf_counter() < deadline:
                body = {"history": random_history(rng, items), "k": 10, "exclude_history": True}
                t0 = time.perf_counter()
                try:
                    r = await c.post("/v1/recommend", json=body)
                    ok = r.status_code == 200
                    key = str(r.status_code)
                except httpx.HTTPError as e:
                    ok, key = False, type(e).__name__
                if ok:
                    lat.append(time.perf_counter() - t0)
                else:
                    errors[key] = errors.get(key, 0) + 1

    t0 = time.perf_counter()
    side = [asyncio.create_task(during())] if during is not None else []
    await asyncio.gather(*(client(n) for n in range(clients)))
    wall = time.perf_counter() - t0
    extra = (await asyncio.gather(*side))[0] if side else None
    n_err = sum(errors.values())
    return {"ok": len(lat), "errors": n_err, "error_kinds": errors, "seconds": round(wall, 2),
            "rps": round(len(lat) / wall, 2), "p50_ms": round(1000 * percentile(lat, 50), 1),
            "p99_ms": round(1000 * percentile(lat, 99), 1), "latencies": lat, **({"kill": extra} if extra else {})}


def merge_rounds(parts: list[dict]) -> dict:
    """One run from its rounds: counts and seconds added, latencies pooled, CPU weighted by requests."""
    lat = [x for p in parts for x in p.pop("latencies")]
    ok, secs = sum(p["ok"] for p in parts), sum(p["seconds"] for p in parts)
    errors: dict[str, int] = {}
    for p in parts:
        for k, v in p["error_kinds"].items():
            errors[k] = errors.get(k, 0) + v
    cpu = {g: round(sum(p["cpu_ms_per_request"][g] * p["ok"] for p in parts) / max(1, ok), 2) for g in CPU_GROUPS}
    batches, requests = sum(p["batches"] for p in parts), sum(p["batch_requests"] for p in parts)
    out = {**parts[-1], "ok": ok, "errors": sum(p["errors"] for p in parts), "error_kinds": errors,
           "seconds": round(secs, 2), "rps": round(ok / secs, 2), "rounds": len(parts),
           "rps_per_round": [p["rps"] for p in parts],
           "p50_ms": round(1000 * percentile(lat, 50), 1), "p99_ms": round(1000 * percentile(lat, 99), 1),
           "cpu_ms_per_request": cpu}
    if batches > 0.5:
        out["mean_batch_size"] = round(requests / batches, 2)
    return out


def replica_actor_names(app: str, deployment: str = "Recommender") -> list[str]:
    import ray

    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["namespace"] == "serve" and a["name"].startswith(prefix))


def kill_one_replica(app: str, after_s: float, recover_timeout_s: float):
    """A coroutine function: after ``after_s`` ray.kill one replica of ``app``'s Recommender, then time how
    long until the application reports 2 running replicas again."""

    async def run() -> dict:
        import ray
        from ray import serve

        await asyncio.sleep(after_s)
        names = replica_actor_names(app)
        victim = names[0]
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        t_kill = time.perf_counter()
        recovered = None
        while time.perf_counter() - t_kill < recover_timeout_s:
            await asyncio.sleep(0.5)
            dep = serve.status().applications[app].deployments["Recommender"]
            running = dep.replica_states.get("RUNNING", 0)
            now = replica_actor_names(app)
            if running >= 2 and len(now) >= 2 and victim not in now:  # a replacement, not the stale count
                recovered = round(time.perf_counter() - t_kill, 1)
                break
        return {"replicas_before": len(names), "killed": victim.rsplit("#", 1)[-1],
                "replacement_running_after_s": recovered}

    return run


CPU_GROUPS = ("recommender", "ingress", "http proxy", "controller", "load generator", "ray core", "other")


def cpu_group(proc, app: str) -> str | None:
    """Which part of the served path a process is (None: not Serve's, not Ray's, not this bench's)."""
    if proc.pid == os.getpid():
        return "load generator"
    try:
        text = " ".join(proc.cmdline()) or proc.name()
    except Exception:  # gone, or not ours to read
        return None
    if f"ServeReplica:{app}:Recommender" in text:
        return "recommender"
    if f"ServeReplica:{app}:Ingress" in text:
        return "ingress"
    if "haproxy" in text or "ProxyActor" in text:
        return "http proxy"
    if "ServeController" in text:
        return "controller"
    if any(k in text for k in ("raylet", "gcs_server", "dashboard", "log_monitor", "runtime_env")):
        return "ray core"
    if "ray::" in text or "ServeReplica" in text or "default_worker" in text:
        return "other"
    return None


def cpu_snapshot(app: str) -> dict[int, tuple[str, float]]:
    """pid -> (group, user+system CPU seconds) of every process on the served path of ``app``."""
    import psutil

    out = {}
    for proc in psutil.process_iter():
        group = cpu_group(proc, app)
        if group is None:
            continue
        try:
            t = proc.cpu_times()
        except Exception:
            continue
        out[proc.pid] = (group, t.user + t.system)
    return out


def cpu_per_request(before: dict, after: dict, requests: int) -> dict[str, float]:
    """CPU milliseconds per answered request, by group, between two snapshots (new processes count from 0)."""
    spent = dict.fromkeys(CPU_GROUPS, 0.0)
    for pid, (group, t) in after.items():
        spent[group] += t - before.get(pid, (group, 0.0))[1]
    return {g: round(1000 * v / max(1, requests), 2) for g, v in spent.items()}


def batch_counts(health: dict, fallback_requests: int) -> tuple[float, float]:
    """(batches, requests) a replica has decoded for /v1/recommend since it started, from /healthz: its raw
    counters when it reports them, else the requests the bench sent it (``fallback_requests``) over its
    rounded mean batch size (exact to a fraction of a batch for a few thousand requests)."""
    raw = (health.get("batches") or {}).get("recommend")
    if raw:
        return float(raw[0]), float(raw[1])
    mean = (health.get("mean_batch_size") or {}).get("recommend")
    return (fallback_requests / mean if mean else 0.0), float(fallback_requests)


def offline_decoder(store: str, items: list[str], batch_sizes: set[int], threads: int, num_beams: int,
                    seconds: float, seed: int) -> dict[int, dict]:
    """Requests/s of ``Recommender.recommend`` alone (what a replica runs per batch) at each batch size, on
    requests drawn like the load's, with ``threads`` torch threads, ``seconds`` of decoding each."""
    import torch

    from sidrec.recommender import Recommender

    torch.set_num_threads(threads)
    rec = Recommender.from_store(store, num_beams=num_beams, device="cpu")
    rng = random.Random(seed)
    out = {}
    for b in sorted(batch_sizes):
        rec.recommend([random_history(rng, items) for _ in range(b)], k=10, exclude_history=True)  # warm-up
        spent, batches, times = 0.0, 0, []
        while spent < seconds or batches < 3:
            histories = [random_history(rng, items) for _ in range(b)]
            t0 = time.perf_counter()
            rec.recommend(histories, k=10, exclude_history=True)
            times.append(time.perf_counter() - t0)
            spent += times[-1]
            batches += 1
        # the decoder's own spread over this request mix (history lengths 1-20): a floor for served p99/p50
        out[b] = {"rps": round(b * batches / spent, 2), "ms_per_batch": round(1000 * spent / batches, 1),
                  "batches": batches, "p50_ms": round(1000 * percentile(times, 50), 1),
                  "p99_ms": round(1000 * percentile(times, 99), 1)}
        print(f"offline  batch {b:3d}: {out[b]}", flush=True)
    return out


def print_table(results: dict, args: argparse.Namespace) -> None:
    print()
    print(f"{args.rounds} interleaved rounds of {args.seconds:g}s per run (kill runs: one of {args.kill_seconds:g}s), "
          f"POST /v1/recommend k=10, num_beams={args.num_beams}; offline decoder: "
          f"{results['replica_threads']} torch thread(s), as a replica")
    print("| plane | clients | run | requests/s | p50 ms | p99 ms | p99/p50 | ok | failed | mean batch "
          "| offline req/s at that batch | served / offline |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results["runs"].values():
        print(f"| {r['plane']} | {r['clients']} | {r['label']} | {r['rps']:.2f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} "
              f"| {r['p99_ms'] / r['p50_ms']:.2f} | {r['ok']} | {r['errors']} | {r['mean_batch_size']} "
              f"| {r['offline_rps']:.2f} | {r['served_over_offline']:.2f} |")
    print("\nCPU ms per answered request, by process (user + system, all cores):")
    print("| plane | run | " + " | ".join(CPU_GROUPS) + " | total |")
    print("|---|---|" + "---:|" * (len(CPU_GROUPS) + 1))
    for key, r in results["runs"].items():
        cpu = r["cpu_ms_per_request"]
        print(f"| {r['plane']} | {key.split('/', 1)[1]} | " + " | ".join(f"{cpu[g]:.1f}" for g in CPU_GROUPS)
              + f" | {sum(cpu.values()):.1f} |")
    for b, o in results["offline"].items():
        print(f"offline decoder, batch {b}: {o['ms_per_batch']:.1f} ms per batch, p50 {o['p50_ms']:.1f} / p99 "
              f"{o['p99_ms']:.1f} ms (p99/p50 {o['p99_ms'] / o['p50_ms']:.2f})")
    planes = results["planes"]
    if len(planes) == 2:
        a, b = planes
        print(f"\nrequests/s, {a} / {b}, same run and clients:")
        for key, r in results["runs"].items():
            if r["plane"] == a and (other := results["runs"].get(key.replace(f"{a}/", f"{b}/", 1))):
                print(f"  {key.split('/', 1)[1]:12s} {r['rps'] / other['rps']:.2f}x")
    for name, r in results["runs"].items():
        if r.get("kill"):
            kill = r["kill"]
            print(f"{name}: killed replica {kill['killed']}; replacement running after "
                  f"{kill['replacement_running_after_s']}s")


def plan_runs(args: argparse.Namespace) -> list[tuple[str, str, str, int, object]]:
    """(run key, app, label, clients, side task) in order: batched and single at every client count, then
    the kill run(s)."""
    runs: list[tuple[str, str, str, int, object]] = []
    for c in args.clients:
        runs.append((f"batched@{c}", "batched", f"coalesced (default), max_batch_size={args.max_batch_size}", c,
                     None))
        runs.append((f"percall@{c}", "percall", "same, one call per request, @serve.batch", c, None))
        for v in args.extra_coalesce:
            runs.append((f"coalesce{v}@{c}", f"coalesce{v}", f"same, coalesce_in_flight={v}", c, None))
        runs.append((f"single@{c}", "single", "no batching (max_batch_size=1)", c, None))
    kc, third = args.kill_clients, args.kill_seconds / 3
    runs.append((f"kill@{kc}", "kill", f"2 replicas, batched, one killed at t={third:.0f}s", kc,
                 kill_one_replica("kill", third, recover_timeout_s=90)))
    if args.kill_without_retries:
        runs.append((f"kill0@{kc}", "kill0", "same, ingress retries off", kc, kill_one_replica("kill0", third, 90)))
    return runs


def run_all(url: str, items: list[str], apps: list[str], args: argparse.Namespace) -> dict[str, dict]:
    """Warm every app up, then each planned run; per run the mean batch size its replica formed."""
    import httpx

    sent = dict.fromkeys(apps, 0)  # /v1/recommend requests each app has answered (for batch_counts)
    for name in apps:  # warm-up (first batch, tokenizer caches)
        httpx.post(f"{url}/{name}/v1/recommend", json={"history": items[:3], "k": 10}, timeout=120)
        sent[name] += 1
    plan = plan_runs(args)
    steady = [r for r in plan if r[4] is None]  # interleaved over the rounds: drift hits every app alike
    order = [r for _ in range(args.rounds) for r in steady] + [r for r in plan if r[4] is not None]
    parts: dict[str, list[dict]] = {}
    for n, (key, app, label, clients, during) in enumerate(order):
        before = batch_counts(httpx.get(f"{url}/{app}/healthz", timeout=60).json(), sent[app])
        cpu0 = cpu_snapshot(app)
        seconds = args.seconds if during is None else args.kill_seconds
        out = asyncio.run(run_load(f"{url}/{app}", items, clients, seconds, seed=n, during=during))
        out["cpu_ms_per_request"] = cpu_per_request(cpu0, cpu_snapshot(app), out["ok"])
        sent[app] += out["ok"]
        health = httpx.get(f"{url}/{app}/healthz", timeout=60).json()
        after = batch_counts(health, sent[app])
        out["batches"], out["batch_requests"] = after[0] - before[0], after[1] - before[1]
        # a killed replica takes its counters along: the survivor's cumulative mean is the best left
        out["mean_batch_size"] = (round(out["batch_requests"] / out["batches"], 2)
                                  if out["batches"] > 0.5 and during is None
                                  else (health.get("mean_batch_size") or {}).get("recommend"))
        if during is not None:
            out["batches"] = out["batch_requests"] = 0
        out.update(label=label, clients=clients, app=app)
        parts.setdefault(key, []).append(out)
        print(f"{key:12s} {({k: v for k, v in out.items() if k != 'latencies'})}", flush=True)
    return {key: merge_rounds(p) for key, p in parts.items()}


def offline_at(offline: dict[int, dict], mean: float) -> float:
    """Offline requests/s at a mean batch size ``mean``, from the batch sizes around it: a batch's time is
    interpolated linearly between floor(mean) and ceil(mean) (a mix of batch sizes with that mean costs
    about that much when the decoder's time is near linear in the batch size)."""
    lo, hi = max(1, math.floor(mean)), max(1, math.ceil(mean))
    t_lo, t_hi = offline[lo]["ms_per_batch"], offline[hi]["ms_per_batch"]
    t = t_lo + (mean - lo) * (t_hi - t_lo) if hi > lo else t_lo
    return 1000 * max(mean, 1.0) / t


def add_offline(results: dict, store: str, items: list[str], args: argparse.Namespace) -> None:
    """The offline decoder at each run's mean batch size, and each run's served / offline ratio."""
    means = [max(1.0, r["mean_batch_size"] or 1.0) for r in results["runs"].values()]
    sizes = {b for m in means for b in (math.floor(m), math.ceil(m))}
    offline = offline_decoder(store, items, sizes, results["replica_threads"], args.num_beams,
                              args.offline_seconds, seed=len(results["runs"]))
    results["offline"] = {str(b): v for b, v in offline.items()}
    for r, m in zip(results["runs"].values(), means, strict=True):
        r["offline_batch"], r["offline_rps"] = m, round(offline_at(offline, m), 2)
        r["served_over_offline"] = round(r["rps"] / r["offline_rps"], 3)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", default=str(REPO / "artifacts" / "quickstart"), help="artifact store root")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32],
                   help="concurrent clients, one batched and one unbatched run per value")
    p.add_argument("--kill-clients", type=int, default=8, help="concurrent clients of the kill run(s)")
    p.add_argument("--seconds", type=float, default=10.0, help="per run and round")
    p.add_argument("--kill-seconds", type=float, default=20.0, help="length of a kill run")
    p.add_argument("--rounds", type=int, default=3, help="rounds of the steady runs, interleaved (kill runs: one)")
    p.add_argument("--offline-seconds", type=float, default=10.0, help="offline decoding per batch size")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--num-beams", type=int, default=20)
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch threads per replica (default: its CPUs rounded up, as Serve does)")
    p.add_argument("--kill-without-retries", action="store_true",
                   help="also run the kill with the ingress's retries off (2 more replicas, one more run)")
    p.add_argument("--extra-coalesce", type=int, nargs="*", default=[],
                   help="more batched apps with these coalesce_in_flight values (ServeAppConfig), side by side")
    p.add_argument("--planes", nargs="+", default=["throughput", "proxy"], choices=["throughput", "proxy"],
                   help="Serve data planes to measure, each on a local Ray of its own (sidrec.cluster.SERVE_PLANES)")
    p.add_argument("--plane-child", default=None, help=argparse.SUPPRESS)  # internal: serve one plane, write runs
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "serve_load.json"))
    args = p.parse_args(argv)
    if min(args.clients) < 1 or args.kill_clients < 1 or not 1 <= args.seconds <= 120 or args.rounds < 1:
        p.error("--clients, --kill-clients and --rounds must be >= 1 and --seconds in [1, 120]")
    if args.offline_seconds <= 0 or (args.torch_threads is not None and args.torch_threads < 1):
        p.error("--offline-seconds must be > 0 and --torch-threads >= 1")
    store = args.store if "://" in args.store else os.path.abspath(args.store)
    if "://" not in store and not os.path.isdir(os.path.join(store, "model")):
        p.error(f"no trained store at {store}: run `sidrec train --config quickstart store.root={args.store}`")
    args.store = store
    return args


def serve_plane(args: argparse.Namespace, plane: str) -> dict:
    """Deploy the apps on a local Ray started with ``plane``'s environment and run the load (this process
    is the plane's child: the environment must be set before Ray starts)."""
    from sidrec.cluster import apply_serve_plane

    apply_serve_plane(plane)
    import ray
    from ray import serve

    from sidrec.serve.app import build_app

    store = args.store
    items = catalog_ids(store)
    ray.init(num_cpus=6 + len(args.extra_coalesce), include_dashboard=False, log_to_driver=False)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    one_cpu, half_cpu = 1.0, 0.5
    out: dict = {"plane": plane}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        common = {"store_root": store, "num_beams": args.num_beams,
                  **({"torch_threads": args.torch_threads} if args.torch_threads else {})}
        batched = {**common, "max_batch_size": args.max_batch_size}
        apps = {
            "batched": build_app({**batched, "num_cpus": one_cpu}),
            "percall": build_app({**batched, "num_cpus": one_cpu, "coalesce_in_flight": 0}),
            **{f"coalesce{v}": build_app({**batched, "num_cpus": one_cpu, "coalesce_in_flight": v})
               for v in args.extra_coalesce},
            "single": build_app({**common, "max_batch_size": 1, "num_cpus": one_cpu}),
            "kill": build_app({**batched, "num_cpus": half_cpu, "num_replicas": 2}),
        }
        if args.kill_without_retries:
            apps["kill0"] = build_app({**batched, "num_cpus": half_cpu, "num_replicas": 2, "retries": 0})
        t0 = time.perf_counter()
        serve.run_many([serve.RunTarget(a, name=name, route_prefix=f"/{name}") for name, a in apps.items()])
        out["deploy_seconds"] = round(time.perf_counter() - t0, 1)
        print(f"[{plane}] {len(apps)} apps ready in {out['deploy_seconds']}s on {os.cpu_count()} cores", flush=True)
        runs = run_all(url, items, list(apps), args)
        out["runs"] = {f"{plane}/{k}": {**r, "plane": plane} for k, r in runs.items()}
    finally:
        serve.shutdown()
        ray.shutdown()
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plane_child:
        Path(args.out).write_text(json.dumps(serve_plane(args, args.plane_child)))
        return 0
    store = args.store
    items = catalog_ids(store)
    t_start = time.perf_counter()
    results: dict = {"store": store, "planes": args.planes, "clients": args.clients,
                     "kill_clients": args.kill_clients, "seconds_per_run": args.seconds, "rounds": args.rounds,
                     "kill_seconds": args.kill_seconds, "num_beams": args.num_beams, "cpu_cores": os.cpu_count(),
                     "replica_threads": args.torch_threads or 1, "deploy_seconds": {}, "runs": {}}
    child_argv = list(argv if argv is not None else sys.argv[1:])
    for plane in args.planes:  # one Ray per plane, in a child process started with the plane's environment
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            cmd = [sys.executable, __file__, *child_argv, "--store", store, "--plane-child", plane, "--out", f.name]
            subprocess.run(cmd, check=True)
            got = json.loads(Path(f.name).read_text())
        results["deploy_seconds"][plane] = got["deploy_seconds"]
        results["runs"].update(got["runs"])
    add_offline(results, store, items, args)  # no Ray running: the decoder has the cores to itself
    results["total_seconds"] = round(time.perf_counter() - t_start, 1)
    print_table(results, args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out} (total {results['total_seconds']}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
