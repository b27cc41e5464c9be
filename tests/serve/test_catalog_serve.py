"""The live catalog across Serve replicas, over HTTP on 127.0.0.1: two Recommender replicas on a copy of
the small trained store. An item added through one replica is found and recommended by the other; a
retire reaches both; a replica killed while a retire is written comes back with it; a redeployed app (new
replicas, the store's log replayed) still has every change. Serve is shut down by the class fixture.

Requests cannot pick a replica, so a check is repeated until every live replica (the Serve actors of the
app) has answered it; every answer names its replica."""

import shutil
import time

import pytest

from tests.serve.test_deploy import API_KEY, catalog, free_port

httpx = pytest.importorskip("httpx")

APP = "catalog"
AUTH = {"X-API-Key": API_KEY}


def live_replicas() -> set[str]:
    import ray

    prefix = f"SERVE_REPLICA::{APP}#Recommender#"
    return {a["name"][len(prefix):] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "serve" and a["name"].startswith(prefix)}


def on_every_replica(ask, ok, timeout_s: float = 90) -> float:
    """Repeat ``ask()`` (-> (replica, body)) until every live replica's latest answer passes ``ok``;
    returns the seconds it took."""
    t0 = time.perf_counter()
    latest: dict[str, bool] = {}
    while True:
        replica, body = ask()
        latest[replica] = ok(body)
        live = live_replicas()
        if len(live) >= 2 and all(latest.get(r) for r in live):
            return time.perf_counter() - t0
        assert time.perf_counter() - t0 < timeout_s, f"not on every replica after {timeout_s}s: {latest}, {live}"
        time.sleep(0.05)


def get_item(client, item_id: str):
    def ask():
        body = client.get(f"/v1/items/{item_id}").json()
        return body["replica"], body
    return ask


def recommend(client, history: list[str], k: int = 20):
    def ask():
        r = client.post("/v1/recommend", json={"history": history, "k": k})
        assert r.status_code == 200, r.text
        body = r.json()
        return body["replica"], {i["item_id"] for i in body["items"]}
    return ask


def deploy(root: str) -> None:
    from ray import serve

    from sidrec.serve.app import build_app

    serve.run(build_app({"store_root": root, "num_replicas": 2, "num_cpus": 0.5, "api_key": API_KEY,
                         "max_batch_size": 8, "catalog_poll_s": 0.5}), name=APP, route_prefix="/", blocking=False)
    deadline = time.time() + 300
    while serve.status().applications[APP].status != "RUNNING":
        assert time.time() < deadline, serve.status().applications[APP]
        time.sleep(1)


@pytest.fixture(scope="class")
def app(trained_store, tmp_path_factory):
    from ray import serve

    root = str(tmp_path_factory.mktemp("catalog_serve") / "store")
    shutil.copytree(trained_store[1], root)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        deploy(root)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            titles, sids = catalog(root)
            yield {"client": client, "root": root, "titles": titles, "sids": sids}
    finally:
        serve.shutdown()


def candidates(app: dict, item_sid: str) -> tuple[list[str], list[str]]:
    """(19 catalog items in first-level branches other than ``item_sid``'s, a history of everything else):
    with exclude_history a 20-beam search must return exactly those 19 + the item."""
    keep, seen = [], {item_sid.split(">")[0]}
    for item, sid in app["sids"].items():
        first = sid.split(">")[0]
        if first not in seen and len(keep) < 19:
            keep.append(item)
            seen.add(first)
    return keep, [i for i in app["titles"] if i not in keep]


@pytest.mark.slow
class TestCatalogAcrossReplicas:
    def test_added_through_one_replica_is_found_and_recommended_by_the_other(self, app):
        c = app["client"]
        r = c.post("/v1/items", json={"items": [{"item_id": "ad-1", "title": "Toy Story 5 (2031)",
                                                 "categories": ["Animation", "Comedy"]}]}, headers=AUTH)
        assert r.status_code == 200, r.text
        body = r.json()
        sid, writer = body["items"][0]["sid"], body["replica"]
        assert body["scope"] == "store" and body["version"] == 1
        dt = on_every_replica(get_item(c, "ad-1"), lambda b: b.get("sid") == sid)
        keep, history = candidates(app, sid)
        on_every_replica(recommend(c, history), lambda got: got == {*keep, "ad-1"})
        versions = {}
        while len(versions) < 2:
            v = c.get("/v1/catalog/version").json()
            versions[v["replica"]] = v
        assert all(v == {"version": 1, "applied": 1, "replica": r} for r, v in versions.items())
        print(f"added on {writer}: on every replica after {dt:.2f}s")
        app["ad-1"] = sid

    def test_retire_reaches_every_replica(self, app):
        c = app["client"]
        keep, history = candidates(app, app["ad-1"])
        r = c.post("/v1/items/retire", json={"item_ids": ["ad-1", keep[0]]}, headers=AUTH).json()
        assert r["retired"] == ["ad-1", keep[0]] and r["version"] == 2
        for item in ("ad-1", keep[0]):
            on_every_replica(get_item(c, item), lambda b: b.get("error") == "retired_item")
        on_every_replica(recommend(c, history), lambda got: got == set(keep[1:]))
        app["retired"] = ["ad-1", keep[0]]

    def test_a_replica_down_during_a_retire_has_it_when_it_comes_back(self, app):
        import ray
        from ray import serve

        c = app["client"]
        third = candidates(app, app["ad-1"])[1][0]   # not among the 20 candidates: they stay as they are
        before = live_replicas()
        victim = sorted(before)[0]
        ray.kill(ray.get_actor(f"SERVE_REPLICA::{APP}#Recommender#{victim}", namespace="serve"), no_restart=True)
        # written while one replica is down (the ingress re-sends a write whose replica died)
        r = c.post("/v1/items/retire", json={"item_ids": [third]}, headers=AUTH).json()
        assert r["retired"] == [third] and r["version"] == 3
        r = c.post("/v1/items", json={"items": [{"item_id": "ad-2", "title": "A Quiet Western (2031)",
                                                 "categories": "Western"}]}, headers=AUTH).json()
        assert r["version"] == 4
        deadline = time.time() + 180
        while not (len(live_replicas()) == 2 and victim not in live_replicas()
                   and serve.status().applications[APP].deployments["Recommender"].replica_states.get("RUNNING") == 2):
            assert time.time() < deadline, "no replacement replica"
            time.sleep(0.5)
        app["retired"].append(third)
        for item in app["retired"]:
            on_every_replica(get_item(c, item), lambda b: b.get("error") == "retired_item")
        on_every_replica(get_item(c, "ad-2"), lambda b: b.get("catalog_version") == 4)
        assert victim not in live_replicas() and live_replicas() - before   # a new replica answered

    def test_a_redeployed_app_replays_the_log_and_retired_items_never_come_back(self, app):
        from ray import serve

        c = app["client"]
        old = live_replicas()
        serve.delete(APP)
        deploy(app["root"])
        assert not old & live_replicas()
        on_every_replica(get_item(c, "ad-2"), lambda b: b.get("catalog_version") == 4)
        for item in app["retired"]:
            on_every_replica(get_item(c, item), lambda b: b.get("error") == "retired_item")
        keep, history = candidates(app, app["ad-1"])
        on_every_replica(recommend(c, [*history, "ad-2"]), lambda got: got == set(keep[1:]))
        # retired items never come back in ordinary answers either
        for _ in range(10):
            got = c.post("/v1/recommend", json={"history": ["2", "50", *app["retired"]], "k": 20}).json()
            assert not set(app["retired"]) & {i["item_id"] for i in got["items"]}
