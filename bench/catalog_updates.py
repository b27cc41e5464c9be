"""Live catalog updates across Serve replicas: how long an admin write takes to be recommendable on every
replica, and a mixed load with a replica killed mid-run, checked for failed, lost and resurrected items.

    python bench/catalog_updates.py --store artifacts/quickstart                  # full: 1,000 writes
    python bench/catalog_updates.py --store artifacts/quickstart --writes 100 --trials 5   # quick

The store is copied to a temporary folder first (the bench writes its catalog log; the original is never
written). One local Ray, one app: 2 Recommender replicas (0.5 CPU each), ``catalog_poll_s`` = ``--poll-s``.

1. **Propagation** (``--trials`` times): ``POST /v1/items`` one new item, then poll until every replica
   (each answer names its replica; the live ones are the app's Serve actors) (a) knows it (``GET
   /v1/items/{id}``) and (b) recommends it: a ``POST /v1/recommend`` whose history excludes all but the
   item and 19 catalog items of distinct first codes, so a 20-beam search must return it. The same for a
   retire (404 ``retired_item`` and no longer recommended). Times from the write's start; the write's own
   latency (durable in the store) separately.
2. **Mixed load**: ``--clients`` clients send ``POST /v1/recommend`` (histories of 1-20 published items,
   exclude_history) back to back while one writer sends ``--writes`` writes, one item each: adds of new
   items, and every ``--retire-every``-th write a retire of an earlier added item. A third of the way
   through the writes one replica is ``ray.kill``-ed (Serve starts a replacement, which replays the log). A
   write that fails (the replica died under it) is re-sent, which is safe: writes are idempotent. Then,
   once every replica has applied the store's head: every accepted add must be present (same SID) and
   every retired item absent on every replica. Also counted: answers that hold an item retired more than
   ``poll_s`` + 2 s before the request was sent (a stale replica; should be 0).

Prints a table and writes JSON to ``bench/results/catalog_updates.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a loopback-only local cluster
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from serve_load import free_port, percentile  # noqa: E402

APP = "catalog"
WORDS = ("river night city gold shadow summer winter storm glass iron garden silent last first secret wild "
         "broken little lost blue red dark bright long road house star ocean moon fire").split()
GENRES = ("Action", "Comedy", "Drama", "Horror", "Romance", "Thriller", "Western", "Animation", "Sci-Fi")


def live_replicas() -> set[str]:
    import ray

    prefix = f"SERVE_REPLICA::{APP}#Recommender#"
    return {a["name"][len(prefix):] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "serve" and a["name"].startswith(prefix)}


def new_item(rng: random.Random, item_id: str) -> dict:
    title = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 4))).title()
    return {"item_id": item_id, "title": f"{title} ({rng.randint(2025, 2035)})",
            "categories": rng.sample(GENRES, rng.randint(1, 2))}


async def on_every_replica(ask, ok, timeout_s: float = 120) -> float:
    """Repeat ``ask()`` (-> (replica, body)) until every live replica's latest answer passes ``ok``."""
    t0 = time.perf_counter()
    latest: dict[str, bool] = {}
    while True:
        replica, body = await ask()
        if replica:
            latest[replica] = ok(body)
        live = live_replicas()
        if len(live) >= 2 and all(latest.get(r) for r in live):
            return time.perf_counter() - t0
        if time.perf_counter() - t0 > timeout_s:
            raise TimeoutError(f"not on every replica after {timeout_s}s: {latest}")
        await asyncio.sleep(0.01)


class Api:
    """The app's HTTP calls the bench makes (httpx.AsyncClient)."""

    def __init__(self, client, key: str):
        self.c, self.auth = client, {"X-API-Key": key}

    async def write(self, path: str, body: dict, attempts: int = 20) -> tuple[dict, int]:
        """A catalog write, re-sent until accepted (idempotent); -> (body, re-sends)."""
        import httpx

        for n in range(attempts):
            try:
                r = await self.c.post(path, json=body, headers=self.auth)
                if r.status_code == 200:
                    return r.json(), n
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)
        raise RuntimeError(f"write {path} {str(body)[:100]} not accepted after {attempts} attempts")

    def item(self, item_id: str):
        async def ask():
            body = (await self.c.get(f"/v1/items/{item_id}")).json()
            return body.get("replica"), body
        return ask

    def version_of(self):
        async def ask():
            body = (await self.c.get("/v1/catalog/version")).json()
            return body.get("replica"), body
        return ask

    def recommend(self, history: list[str], k: int = 20):
        async def ask():
            r = await self.c.post("/v1/recommend", json={"history": history, "k": k})
            body = r.json()
            return body.get("replica"), {i["item_id"] for i in body.get("items", [])}
        return ask


def candidates(sids: dict[str, str], item_sid: str, exclude: set[str]) -> tuple[list[str], list[str]]:
    """(19 items in other first-level branches, the history of every other item)."""
    keep, seen = [], {item_sid.split(">")[0]}
    for item, sid in sids.items():
        first = sid.split(">")[0]
        if first not in seen and len(keep) < 19 and item not in exclude:
            keep.append(item)
            seen.add(first)
    return keep, [i for i in sids if i not in keep]


async def propagation(api: Api, sids: dict[str, str], trials: int, seed: int) -> dict:
    """Phase 1: write -> known / recommendable / retired on every replica, ``trials`` times."""
    rng = random.Random(seed)
    rows = []
    for t in range(trials):
        item = new_item(rng, f"prop-{t}")
        t0 = time.perf_counter()
        body, _ = await api.write("/v1/items", {"items": [item]})
        ack = time.perf_counter() - t0
        sid = body["items"][0]["sid"]
        keep, history = candidates(sids, sid, set())
        history = [*history, *(f"prop-{p}" for p in range(t))]
        known = await asyncio.gather(  # both checks poll at once, from the write's start
            on_every_replica(api.item(item["item_id"]), lambda b, s=sid: b.get("sid") == s),
            on_every_replica(api.recommend(history), lambda got, i=item["item_id"]: i in got))
        t1 = time.perf_counter()
        await api.write("/v1/items/retire", {"item_ids": [item["item_id"]]})
        r_ack = time.perf_counter() - t1
        gone = await asyncio.gather(
            on_every_replica(api.item(item["item_id"]), lambda b: b.get("error") == "retired_item"),
            on_every_replica(api.recommend(history), lambda got, i=item["item_id"]: i not in got))
        rows.append({"write_ms": 1000 * ack, "known_all_ms": 1000 * (ack + known[0]),
                     "recommendable_all_ms": 1000 * (ack + known[1]), "retire_ms": 1000 * r_ack,
                     "retired_all_ms": 1000 * (r_ack + gone[0]), "unrecommended_all_ms": 1000 * (r_ack + gone[1])})
        print(f"  trial {t}: " + ", ".join(f"{k} {v:.0f}" for k, v in rows[-1].items()), flush=True)
    return {k: {"p50": round(percentile([r[k] for r in rows], 50), 1),
                "max": round(max(r[k] for r in rows), 1)} for k in rows[0]}


class Ledger:
    """What the writer got accepted, with when, to check the replicas against afterwards."""

    def __init__(self) -> None:
        self.added: dict[str, str] = {}          # item id -> SID, live
        self.retired: dict[str, float] = {}      # item id -> time the retire was accepted
        self.resends = 0
        self.write_s: list[float] = []


async def writer(api: Api, ledger: Ledger, writes: int, retire_every: int, seed: int, kill_at: int,
                 kill: asyncio.Event) -> None:
    rng = random.Random(seed)
    for n in range(writes):
        if n == kill_at:
            kill.set()
        t0 = time.perf_counter()
        if retire_every and n % retire_every == retire_every - 1 and ledger.added:
            victim = rng.choice(sorted(ledger.added))
            body, resent = await api.write("/v1/items/retire", {"item_ids": [victim]})
            assert victim in body["retired"], body
            del ledger.added[victim]
            ledger.retired[victim] = time.perf_counter()
        else:
            body, resent = await api.write("/v1/items", {"items": [new_item(rng, f"load-{n}")]})
            ledger.added[body["items"][0]["item_id"]] = body["items"][0]["sid"]
        ledger.resends += resent
        ledger.write_s.append(time.perf_counter() - t0)


async def recommender_client(api: Api, items: list[str], ledger: Ledger, stop: asyncio.Event, seed: int,
                             stale_after_s: float, out: dict) -> None:
    import httpx

    rng = random.Random(seed)
    while not stop.is_set():
        sent = time.perf_counter()
        body = {"history": rng.sample(items, rng.randint(1, 20)), "k": 10, "exclude_history": True}
        try:
            r = await api.c.post("/v1/recommend", json=body)
            ok, key = r.status_code == 200, str(r.status_code)
        except httpx.HTTPError as e:
            ok, key = False, type(e).__name__
        if not ok:
            out["failed"][key] = out["failed"].get(key, 0) + 1
            continue
        out["ok"] += 1
        out["lat"].append(time.perf_counter() - sent)
        for it in r.json()["items"]:
            t = ledger.retired.get(it["item_id"])
            if t is not None and t < sent - stale_after_s:
                out["stale"].append(it["item_id"])


async def kill_one(kill: asyncio.Event) -> dict:
    """When ``kill`` is set, ray.kill one replica and time its replacement."""
    import ray
    from ray import serve

    await kill.wait()
    before = live_replicas()
    victim = sorted(before)[0]
    ray.kill(ray.get_actor(f"SERVE_REPLICA::{APP}#Recommender#{victim}", namespace="serve"), no_restart=True)
    t0 = time.perf_counter()
    while True:
        await asyncio.sleep(0.5)
        dep = serve.status().applications[APP].deployments["Recommender"]
        now = live_replicas()
        if dep.replica_states.get("RUNNING", 0) >= 2 and len(now) >= 2 and victim not in now:
            return {"killed": victim, "replacement_running_after_s": round(time.perf_counter() - t0, 1)}
        if time.perf_counter() - t0 > 300:
            return {"killed": victim, "replacement_running_after_s": None}


async def verify(api: Api, ledger: Ledger, concurrency: int = 8) -> dict:
    """Every accepted add present with its SID, every retired item absent, on every replica."""
    head = 0
    for _ in range(50):
        v = (await api.c.get("/v1/catalog/version")).json()
        head = max(head, v["version"])
    await on_every_replica(api.version_of(), lambda b: b.get("applied") == head)
    lost, resurrected = [], []
    sem = asyncio.Semaphore(concurrency)

    async def check(item: str, sid: str | None) -> None:
        async with sem:
            try:
                if sid is not None:
                    await on_every_replica(api.item(item), lambda b: b.get("sid") == sid, timeout_s=30)
                else:
                    await on_every_replica(api.item(item), lambda b: b.get("error") == "retired_item", timeout_s=30)
            except TimeoutError:
                (lost if sid is not None else resurrected).append(item)

    await asyncio.gather(*(check(i, s) for i, s in ledger.added.items()),
                         *(check(i, None) for i in ledger.retired))
    return {"head_version": head, "checked_present": len(ledger.added), "checked_retired": len(ledger.retired),
            "lost": lost, "resurrected": resurrected}


async def mixed_load(api: Api, items: list[str], args: argparse.Namespace) -> dict:
    """Phase 2: clients + one writer + a replica kill, then the checks."""
    ledger, stop, kill = Ledger(), asyncio.Event(), asyncio.Event()
    out: dict = {"ok": 0, "failed": {}, "lat": [], "stale": []}
    clients = [asyncio.create_task(recommender_client(api, items, ledger, stop, args.seed + 100 + n,
                                                      args.poll_s + 2, out)) for n in range(args.clients)]
    killer = asyncio.create_task(kill_one(kill))
    t0 = time.perf_counter()
    try:
        await writer(api, ledger, args.writes, args.retire_every, args.seed, args.writes // 3, kill)
        wall = time.perf_counter() - t0
        killed = await asyncio.wait_for(killer, timeout=300)
    finally:
        stop.set()
        await asyncio.gather(*clients)
    checks = await verify(api, ledger)
    return {"writes": args.writes, "seconds": round(wall, 1), "writes_per_s": round(args.writes / wall, 2),
            "write_p50_ms": round(1000 * percentile(ledger.write_s, 50), 1),
            "write_p99_ms": round(1000 * percentile(ledger.write_s, 99), 1), "write_resends": ledger.resends,
            "recommendations_ok": out["ok"], "recommendations_failed": sum(out["failed"].values()),
            "failure_kinds": out["failed"], "recommend_p50_ms": round(1000 * percentile(out["lat"], 50), 1),
            "recommend_p99_ms": round(1000 * percentile(out["lat"], 99), 1),
            "stale_retired_in_answers": len(out["stale"]), "kill": killed, **checks}


async def run(url: str, key: str, sids: dict[str, str], args: argparse.Namespace) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as c:
        api = Api(c, key)
        items = list(sids)
        await c.post("/v1/recommend", json={"history": items[:3], "k": 10})  # warm-up
        res = {"warmup": await warm_up(api)}
        print(f"propagation: {args.trials} trials", flush=True)
        prop = await propagation(api, sids, args.trials, args.seed)
        print(f"mixed load: {args.clients} clients, {args.writes} writes, a replica killed at write "
              f"{args.writes // 3}", flush=True)
        load = await mixed_load(api, items, args)
    return {**res, "propagation_ms": prop, "mixed_load": load}


async def warm_up(api: Api) -> dict:
    """Adds (then retires) items until each replica has answered a write: a replica loads its text
    encoder on its first write (about 2 s), which the measurements should not include."""
    seen: dict[str, float] = {}
    n = 0
    while len(seen) < 2 and n < 40:
        t0 = time.perf_counter()
        body, _ = await api.write("/v1/items", {"items": [{"item_id": f"warm-{n}", "title": f"Warm Up {n}"}]})
        seen.setdefault(body["replica"], round(1000 * (time.perf_counter() - t0)))
        n += 1
    await api.write("/v1/items/retire", {"item_ids": [f"warm-{i}" for i in range(n)]})
    return {"writes": n, "first_write_ms_per_replica": seen}


def print_table(res: dict) -> None:
    p, m = res["propagation_ms"], res["mixed_load"]
    print(f"\n2 replicas, catalog_poll_s={res['poll_s']}, {res['cpu_cores']} cores; times from the start of the write")
    print("| propagation (ms) | p50 | max |")
    print("|---|---:|---:|")
    for k, label in (("write_ms", "write durable (answer)"), ("known_all_ms", "known on every replica"),
                     ("recommendable_all_ms", "recommended by every replica"), ("retire_ms", "retire durable"),
                     ("retired_all_ms", "retired on every replica"),
                     ("unrecommended_all_ms", "no replica recommends it")):
        print(f"| {label} | {p[k]['p50']:.0f} | {p[k]['max']:.0f} |")
    kill = m["kill"]
    print(f"\nmixed load: {res['clients']} clients recommending, {m['writes']} writes in {m['seconds']}s "
          f"({m['writes_per_s']}/s, p50 {m['write_p50_ms']:.0f} ms, p99 {m['write_p99_ms']:.0f} ms, "
          f"{m['write_resends']} re-sent), replica {kill['killed']} killed, replacement running after "
          f"{kill['replacement_running_after_s']}s")
    print("| recommendations ok | failed | p50 ms | p99 ms | adds checked | retires checked | lost | resurrected "
          "| stale answers |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {m['recommendations_ok']} | {m['recommendations_failed']} | {m['recommend_p50_ms']:.0f} | "
          f"{m['recommend_p99_ms']:.0f} | {m['checked_present']} | {m['checked_retired']} | {len(m['lost'])} | "
          f"{len(m['resurrected'])} | {m['stale_retired_in_answers']} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", default=str(REPO / "artifacts" / "quickstart"), help="trained store (copied)")
    p.add_argument("--writes", type=int, default=1000, help="writes of the mixed load")
    p.add_argument("--retire-every", type=int, default=4, help="every n-th write retires an added item")
    p.add_argument("--trials", type=int, default=10, help="propagation measurements")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--poll-s", type=float, default=1.0, help="the replicas' catalog_poll_s")
    p.add_argument("--num-beams", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "catalog_updates.json"))
    args = p.parse_args(argv)
    if args.writes < 3 or args.trials < 1 or args.clients < 1:
        p.error("--writes must be >= 3, --trials and --clients >= 1")
    src = os.path.abspath(args.store)
    if not os.path.isdir(os.path.join(src, "model")):
        p.error(f"no trained store at {src}: run `sidrec train --config quickstart store.root={args.store}`")

    import ray
    from ray import serve

    from sidrec.serve.app import build_app
    from sidrec.store import ArtifactStore

    work = tempfile.mkdtemp(prefix="sidrec-catalog-bench-")
    store = os.path.join(work, "store")
    shutil.copytree(src, store, ignore=shutil.ignore_patterns("catalog", "eval_*"))
    sids = ArtifactStore(store).sid_map()
    key = secrets.token_urlsafe(16)
    t_start = time.perf_counter()
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    port = free_port()
    res: dict = {"store": src, "clients": args.clients, "poll_s": args.poll_s, "cpu_cores": os.cpu_count(),
                 "num_beams": args.num_beams}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app({"store_root": store, "num_replicas": 2, "num_cpus": 0.5, "api_key": key,
                         "num_beams": args.num_beams, "catalog_poll_s": args.poll_s})
        t0 = time.perf_counter()
        serve.run(app, name=APP, route_prefix="/")
        res["deploy_seconds"] = round(time.perf_counter() - t0, 1)
        print(f"2 replicas ready in {res['deploy_seconds']}s", flush=True)
        res.update(asyncio.run(run(f"http://127.0.0.1:{port}", key, sids, args)))
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    res["total_seconds"] = round(time.perf_counter() - t_start, 1)
    print_table(res)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(f"wrote {args.out} (total {res['total_seconds']}s)")
    m = res["mixed_load"]
    ok = m["recommendations_failed"] == 0 and not m["lost"] and not m["resurrected"] and not m["stale_retired_in_answers"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
