"""The Serve application over real HTTP on 127.0.0.1, on the small trained store of the ``trained_store``
fixture: every endpoint, every bad-input case, cold-start items, concurrent requests. Serve is shut down by
the class fixture."""

import json
import shutil
import threading
import time

import pytest

from sidrec.catalog.log import CatalogLog
from tests.serve.test_deploy import API_KEY, catalog, free_port
from tests.serve.test_handling import error_body

httpx = pytest.importorskip("httpx")


# ===================================================================== the app in-process, over HTTP
@pytest.fixture(scope="class")
def served(trained_store, tmp_path_factory):
    """The app on the session's local Ray, HTTP on 127.0.0.1:<free port>; Serve shut down afterwards. It
    serves a copy of the store: the admin test writes to the store's catalog log."""
    from ray import serve

    from sidrec.serve.app import build_app

    root = str(tmp_path_factory.mktemp("served") / "store")
    shutil.copytree(trained_store[1], root)
    port = free_port()
    t0 = time.perf_counter()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app({"store_root": root, "num_cpus": 0.5, "api_key": API_KEY, "max_batch_size": 8}),
                  name="sidrec", route_prefix="/", blocking=False)
        print(f"serve.run ready in {time.perf_counter() - t0:.1f}s")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            yield client, root
    finally:
        serve.shutdown()



@pytest.mark.slow
@pytest.mark.usefixtures("served")
class TestHTTP:
    def test_recommend_returns_real_items(self, served):
        client, root = served
        titles, sids = catalog(root)
        r = client.post("/v1/recommend", json={"history": ["1", "2", 50], "k": 10})  # ids may be ints
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["items"]) == 10 and len({i["item_id"] for i in body["items"]}) == 10
        for it in body["items"]:
            assert titles[it["item_id"]] == it["title"] and sids[it["item_id"]] == it["sid"]
        scores = [it["score"] for it in body["items"]]
        assert scores == sorted(scores, reverse=True)
        assert body["model_version"].startswith("v-") and body["history_used"] == 3
        assert body["history_truncated"] is False and body["cold_start"] is False

    def test_exclude_history_and_same_answers_as_the_recommender(self, served):
        from sidrec.recommender import Recommender

        client, root = served
        local = Recommender.from_store(root, num_beams=20)
        history = ["1", "2", "3", "50", "172"]
        for exclude in (True, False):
            r = client.post("/v1/recommend", json={"history": history, "k": 10, "exclude_history": exclude})
            got = [i["item_id"] for i in r.json()["items"]]
            assert got == local.top_items([history], k=10, exclude_history=exclude)[0]
            if exclude:
                assert not set(got) & set(history)
        # exclusion is of the whole history, its own answer included
        top = client.post("/v1/recommend", json={"history": history, "k": 3}).json()["items"]
        again = client.post("/v1/recommend", json={"history": history + [top[0]["item_id"]], "k": 10}).json()
        assert top[0]["item_id"] not in {i["item_id"] for i in again["items"]}

    def test_long_history_is_truncated_and_cold_start_uses_the_profile(self, served):
        client, root = served
        titles, _ = catalog(root)
        long = list(titles)[:60]
        body = client.post("/v1/recommend", json={"history": long, "k": 5}).json()
        assert body["history_truncated"] is True and body["history_items"] == 60
        assert body["history_used"] == body["max_history"] == 20
        assert len(body["items"]) == 5 and not set(long) & {i["item_id"] for i in body["items"]}
        cold = client.post("/v1/recommend", json={"history": [], "profile": "a 24-year-old student", "k": 4})
        assert cold.status_code == 200 and cold.json()["cold_start"] is True and len(cold.json()["items"]) == 4

    def test_bad_inputs_get_4xx_json_naming_the_problem(self, served):
        client, _ = served
        post = client.post
        b = error_body(post("/v1/recommend", json={"history": ["1", "nope", "zzz"], "k": 5}), 422, "unknown_items")
        assert b["unknown_items"] == ["nope", "zzz"] and "nope" in b["detail"]
        b = error_body(post("/v1/recommend", json={"history": []}), 422, "empty_history")
        assert "profile" in b["detail"]
        error_body(post("/v1/recommend", json={"history": [], "profile": "   "}), 422, "empty_history")
        b = error_body(post("/v1/recommend", json={"history": ["1"], "k": 21}), 422, "k_out_of_range")
        assert b["max_k"] == 20 and "between 1 and 20" in b["detail"]
        for k in (0, -3, "ten", 2.5, True, None):
            b = error_body(post("/v1/recommend", json={"history": ["1"], "k": k}), 422, "invalid_request")
            assert "body.k" in b["detail"]
        b = error_body(post("/v1/recommend", json={"history": "1, 2"}), 422, "invalid_request")
        assert "body.history" in b["detail"]
        b = error_body(post("/v1/recommend", json={"histroy": ["1"]}), 422, "invalid_request")   # typo named
        assert "histroy" in b["detail"]
        error_body(post("/v1/recommend", json={"history": [["1"]]}), 422, "invalid_request")
        error_body(post("/v1/recommend", content=b"{not json", headers={"content-type": "application/json"}),
             422, "invalid_request")
        error_body(post("/v1/recommend", content=b"", headers={"content-type": "application/json"}), 422,
             "invalid_request")
        error_body(post("/v1/recommend", json=[1, 2]), 422, "invalid_request")
        # size limit: declared and streamed (chunked) bodies
        big = {"history": ["1"] * 20000}
        b = error_body(post("/v1/recommend", json=big), 413, "body_too_large")
        assert b["max_body_bytes"] == 65536
        data = json.dumps(big).encode()
        chunks = [data[i:i + 16384] for i in range(0, len(data), 16384)]
        error_body(post("/v1/recommend", content=iter(chunks), headers={"content-type": "application/json"}),
             413, "body_too_large")
        b = error_body(client.get("/v1/items/nope"), 404, "unknown_item")
        assert b["item_id"] == "nope"
        error_body(client.get("/v1/nothing-here"), 404, "not_found")
        error_body(client.get("/v1/recommend"), 405, "method_not_allowed")
        error_body(post("/v1/items/search", json={"title": "  "}), 422, "invalid_request")
        error_body(post("/v1/items/search", json={"title": "Toy Story (1995)", "k": 99}), 422, "k_out_of_range")
        error_body(post("/v1/items/search", json={}), 422, "invalid_request")

    def test_item_lookup_and_title_search(self, served):
        client, root = served
        titles, sids = catalog(root)
        r = client.get("/v1/items/1")
        assert r.status_code == 200
        got = r.json()
        assert (got["item_id"], got["title"], got["sid"], got["source"]) == ("1", titles["1"], sids["1"], "catalog")
        # title -> SID through the training's prompt: always real items; how often the asked-for item is in
        # the top 5 is measured (the 24-step test model has barely learned the task), not asserted
        asked = list(titles)[:20]
        found = 0
        for item in asked:
            body = client.post("/v1/items/search", json={"title": titles[item], "k": 5}).json()
            assert len(body["items"]) == 5 and body["query"] == titles[item].strip()
            assert body["title_to_sid_trained"] is True
            for it in body["items"]:
                assert titles[it["item_id"]] == it["title"] and sids[it["item_id"]] == it["sid"]
            found += item in {it["item_id"] for it in body["items"]}
        print(f"title search: asked-for item in the top 5 for {found}/{len(asked)} titles")

    def test_admin_catalog_writes_go_to_the_store(self, served):
        client, root = served
        titles, sids = catalog(root)
        new = {"items": [
            {"item_id": "new-1", "title": "Toy Story 5 (2031)", "categories": ["Animation", "Children's", "Comedy"]},
            {"item_id": "new-2", "title": titles["1"], "categories": "Animation > Children's > Comedy"},
        ]}
        error_body(client.post("/v1/items", json=new), 401, "missing_api_key")
        error_body(client.post("/v1/items", json=new, headers={"X-API-Key": "wrong"}), 403, "invalid_api_key")
        error_body(client.post("/v1/items/retire", json={"item_ids": ["1"]}), 401, "missing_api_key")
        auth = {"X-API-Key": API_KEY}
        error_body(client.post("/v1/items", json={"items": [{"item_id": "a", "title": "x"}] * 2}, headers=auth),
             422, "duplicate_items")
        error_body(client.post("/v1/items", json={"items": []}, headers=auth), 422, "invalid_request")
        error_body(client.post("/v1/items", json={"items": [{"item_id": "b"}]}, headers=auth), 422, "invalid_request")
        assert client.get("/v1/catalog/version").json()["version"] == 0
        r = client.post("/v1/items", json=new, headers=auth)
        assert r.status_code == 200, r.text
        body = r.json()
        added = {i["item_id"]: i for i in body["items"]}
        assert body["scope"] == "store" and body["version"] == 1 and body["replica"]
        assert {a["action"] for a in added.values()} == {"added"}
        assert CatalogLog(root).head() == 1   # durable in the store before the answer
        # distinct SIDs that no catalog item has; an exact copy of item 1's text gets the codes the store's
        # quantizer gives that text with a new item's collaborative vector (imputed from its text neighbours,
        # not item 1's own clicks), with a free dedup code
        assert len({a["sid"] for a in added.values()}) == 2 and not {a["sid"] for a in added.values()} & set(
            sids.values())
        if added["new-2"]["exact"]:
            import numpy as np

            from sidrec.catalog.encoder import ItemEncoder
            from sidrec.sids.embed import read_embeddings
            from sidrec.sids.tokens import render_sid
            from sidrec.store import ArtifactStore

            enc = ItemEncoder(root)
            ids, text = read_embeddings(ArtifactStore(root))
            own = enc.candidates(text[[ids.index("1")]], np.ones((enc.quantizer.config.levels, enc.quantizer.config.codebook_size), bool), item_ids=["new-2"])[0][0]
            assert added["new-2"]["sid"].startswith(render_sid(own))
        for item_id, a in added.items():
            got = client.get(f"/v1/items/{item_id}").json()
            assert got["sid"] == a["sid"] and got["source"] == "added" and got["catalog_version"] == 1
        # re-sending is idempotent: nothing written, same SIDs
        again = client.post("/v1/items", json=new, headers=auth).json()
        assert again["version"] == 1 and {i["action"] for i in again["items"]} == {"unchanged"}
        assert {i["item_id"]: i["sid"] for i in again["items"]} == {k: a["sid"] for k, a in added.items()}
        # a known id with new text is an update
        upd = client.post("/v1/items", json={"items": [{"item_id": "new-2", "title": "A Western (2031)",
                                                        "categories": "Western"}]}, headers=auth).json()
        assert upd["version"] == 2 and upd["items"][0]["action"] == "updated"
        assert client.get("/v1/items/new-2").json()["title"] == "A Western (2031)"
        # recommendable at once: exclude every item but new-1 and 19 catalog items of distinct first codes
        # (20 = num_beams SIDs in 20 first-level branches: the beam search must return exactly these 20)
        keep, seen = [], {added["new-1"]["sid"].split(">")[0]}
        for item, sid in sids.items():
            first = sid.split(">")[0]
            if first not in seen and len(keep) < 19:
                keep.append(item)
                seen.add(first)
        history = [i for i in titles if i not in keep] + ["new-2"]
        body = client.post("/v1/recommend", json={"history": history, "k": 20}).json()
        assert {i["item_id"] for i in body["items"]} == {*keep, "new-1"}
        # and usable as history
        assert client.post("/v1/recommend", json={"history": ["new-1"], "k": 3}).status_code == 200
        hits = client.post("/v1/items/search", json={"title": "Toy Story 5 (2031)", "k": 20}).json()["items"]
        print(f"title search for the added item: rank {[i['item_id'] for i in hits].index('new-1') + 1}"
              if "new-1" in {i["item_id"] for i in hits} else "title search: added item not in the top 20")
        # retire: gone from answers and lookups, idempotent, unknown ids named
        out = client.post("/v1/items/retire", json={"item_ids": ["new-1", keep[0], "nope"]}, headers=auth).json()
        assert out == {"retired": ["new-1", keep[0]], "unknown": ["nope"], "version": 3, "scope": "store",
                       "replica": out["replica"]}
        b = error_body(client.get("/v1/items/new-1"), 404, "retired_item")
        assert b["catalog_version"] == 3
        body = client.post("/v1/recommend", json={"history": history, "k": 20}).json()
        assert {i["item_id"] for i in body["items"]} == set(keep[1:])    # only what is left of the 20
        again = client.post("/v1/items/retire", json={"item_ids": ["new-1"]}, headers=auth).json()
        assert again["retired"] == ["new-1"] and again["version"] == 3
        assert client.post("/v1/recommend", json={"history": ["new-1", "1"], "k": 5}).status_code == 200
        assert client.get("/v1/catalog/version").json()["version"] == 3

    def test_health_docs_and_concurrent_requests_batch(self, served):
        client, _ = served
        h = client.get("/healthz").json()
        assert h["status"] == "ok" and h["model_version"].startswith("v-") and h["max_batch_size"] == 8
        spec = client.get("/openapi.json").json()
        assert {"/v1/recommend", "/v1/items/{item_id}", "/v1/items/search", "/v1/items", "/v1/items/retire",
                "/v1/catalog/version", "/healthz"} <= set(spec["paths"])
        assert client.get("/docs").status_code == 200
        # 8 concurrent clients: all answered (batched by @serve.batch on the replica)
        results: list[int] = []

        def hit(n: int) -> None:
            with httpx.Client(base_url=str(client.base_url), timeout=120) as c:
                for _ in range(2):
                    results.append(c.post("/v1/recommend", json={"history": [str(n + 1)], "k": 5}).status_code)

        threads = [threading.Thread(target=hit, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == [200] * 16
