"""Load test of the Serve app on loopback: throughput and latency with and without @serve.batch, and
failed requests when one of two replicas is killed mid-load.

    python bench/serve_load.py --store artifacts/quickstart            # ~2.5 min on 2 CPUs
    python bench/serve_load.py --store /tmp/qs --clients 8 --seconds 20

Three applications are deployed side by side on one local Ray (5 logical CPUs so that all of them fit;
only one is under load at a time, the others sit idle):

* ``batched``:  1 Recommender replica (1 CPU), ``max_batch_size`` 16;
* ``single``:   1 Recommender replica (1 CPU), ``max_batch_size`` 1 (no batching);
* ``kill``:     2 Recommender replicas (0.5 CPU each), batched; one replica is ``ray.kill``-ed a third of
  the way into its run (found among the named actors of the ``serve`` namespace); the ingress re-sends a
  read whose replica died (``retries``), and Serve starts a replacement. ``--kill-without-retries`` adds
  the same run with the ingress's retries off, to count what the retries saved.

Each run: ``--clients`` concurrent asyncio/httpx clients send ``POST /v1/recommend`` (k=10, histories of
1-20 random catalog items, exclude_history) back to back for ``--seconds``. The load generator shares the
machine's cores with the replicas, so absolute numbers are lower bounds. Prints a table and writes JSON to
``bench/results/serve_load.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import sys
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
                body = {"history": rng.sample(items, rng.randint(1, 20)), "k": 10, "exclude_history": True}
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
            "p99_ms": round(1000 * percentile(lat, 99), 1), **({"kill": extra} if extra else {})}


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


def print_table(results: dict, args: argparse.Namespace) -> None:
    print()
    print(f"{args.clients} clients x {args.seconds:g}s per run, POST /v1/recommend k=10, num_beams={args.num_beams}")
    print("| run | requests/s | p50 ms | p99 ms | ok | failed | mean batch |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results["runs"].values():
        print(f"| {r['label']} | {r['rps']:.2f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['ok']} | "
              f"{r['errors']} | {r['mean_batch_size']} |")
    for name in ("kill", "kill0"):
        kill = results["runs"].get(name, {}).get("kill")
        if kill:
            print(f"{name}: killed replica {kill['killed']}; replacement running after "
                  f"{kill['replacement_running_after_s']}s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", default=str(REPO / "artifacts" / "quickstart"), help="artifact store root")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=20.0, help="per run")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--num-beams", type=int, default=20)
    p.add_argument("--kill-without-retries", action="store_true",
                   help="also run the kill with the ingress's retries off (2 more replicas, +20 s)")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "serve_load.json"))
    args = p.parse_args(argv)
    if args.clients < 1 or not 1 <= args.seconds <= 120:
        p.error("--clients must be >= 1 and --seconds in [1, 120]")
    store = args.store if "://" in args.store else os.path.abspath(args.store)
    if "://" not in store and not os.path.isdir(os.path.join(store, "model")):
        p.error(f"no trained store at {store}: run `sidrec train --config quickstart store.root={args.store}`")

    import ray
    from ray import serve

    from sidrec.serve.app import build_app

    items = catalog_ids(store)
    t_start = time.perf_counter()
    ray.init(num_cpus=5, include_dashboard=False, log_to_driver=False)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    results: dict = {"store": store, "clients": args.clients, "seconds_per_run": args.seconds,
                     "num_beams": args.num_beams, "cpu_cores": os.cpu_count(), "runs": {}}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        common = {"store_root": store, "num_beams": args.num_beams}
        apps = {
            "batched": build_app({**common, "max_batch_size": args.max_batch_size, "num_cpus": 1}),
            "single": build_app({**common, "max_batch_size": 1, "num_cpus": 1}),
            "kill": build_app({**common, "max_batch_size": args.max_batch_size, "num_cpus": 0.5,
                               "num_replicas": 2}),
        }
        if args.kill_without_retries:
            apps["kill0"] = build_app({**common, "max_batch_size": args.max_batch_size, "num_cpus": 0.5,
                                       "num_replicas": 2, "retries": 0})
        t0 = time.perf_counter()
        serve.run_many([serve.RunTarget(a, name=name, route_prefix=f"/{name}") for name, a in apps.items()])
        results["deploy_seconds"] = round(time.perf_counter() - t0, 1)
        print(f"{len(apps)} apps ready in {results['deploy_seconds']}s on {os.cpu_count()} cores", flush=True)

        import httpx

        for name in apps:  # warm-up (first batch, tokenizer caches)
            httpx.post(f"{url}/{name}/v1/recommend", json={"history": items[:3], "k": 10}, timeout=120)
        runs = [("batched", f"@serve.batch max_batch_size={args.max_batch_size}", None),
                ("single", "no batching (max_batch_size=1)", None),
                ("kill", f"2 replicas, batched, one killed at t={args.seconds / 3:.0f}s",
                 kill_one_replica("kill", args.seconds / 3, recover_timeout_s=90))]
        if args.kill_without_retries:
            runs.append(("kill0", "same, ingress retries off", kill_one_replica("kill0", args.seconds / 3, 90)))
        for n, (name, label, during) in enumerate(runs):
            out = asyncio.run(run_load(f"{url}/{name}", items, args.clients, args.seconds, seed=n, during=during))
            health = httpx.get(f"{url}/{name}/healthz", timeout=60).json()
            out["mean_batch_size"] = health.get("mean_batch_size", {}).get("recommend")
            out["label"] = label
            results["runs"][name] = out
            print(f"{name:8s} {out}", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    results["total_seconds"] = round(time.perf_counter() - t_start, 1)
    print_table(results, args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out} (total {results['total_seconds']}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
