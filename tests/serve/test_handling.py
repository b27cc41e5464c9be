"""The Serve layer without a Ray cluster: build_app's options and the YAML configs, the HTTP app over a fake
Recommender (validation, error mapping, body-size limit, metrics), the client's retries, the admin key
check, and the demo's Ctrl-C handling."""

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest
import yaml

from sidrec.config import ConfigError, section_from_dict
from sidrec.serve.settings import ServeSettings

pytest.importorskip("httpx")

REPO = Path(__file__).resolve().parents[2]


# ======================================================================================= build_app
@pytest.mark.parametrize("name", ["local.yaml", "gpu.yaml"])
def test_serve_configs_are_valid(name):
    import importlib

    from ray.serve.api import Application
    from ray.serve.schema import ServeDeploySchema

    from sidrec.serve.app import build_app

    raw = yaml.safe_load((REPO / "serve_configs" / name).read_text())
    cfg = ServeDeploySchema.model_validate(raw)          # Ray's own schema, as `serve deploy` checks it
    assert cfg.http_options.host == "127.0.0.1"
    [app] = cfg.applications
    assert app.import_path == "sidrec.serve.app:build_app"
    assert "working_dir" not in (app.runtime_env or {})  # serve deploy rejects a relative one
    deps = {d.name: d for d in app.deployments}
    assert set(deps) == {"Recommender", "Ingress"}
    settings = section_from_dict(ServeSettings, deps["Recommender"].user_config)  # no typo in the user_config
    auto = deps["Recommender"].autoscaling_config
    assert auto["min_replicas"] >= 1 and auto["max_replicas"] >= auto["min_replicas"]
    assert auto["target_ongoing_requests"] > 0
    actor = deps["Recommender"].ray_actor_options
    if name == "local.yaml":
        assert settings.store_root.endswith("artifacts/quickstart") and os.path.isabs(settings.store_root)
        assert auto["max_replicas"] == 2 and actor.num_cpus < 1 and not actor.num_gpus
        assert cfg.http_options.port == 8000
    else:
        assert settings.store_root == "s3://CHANGE-ME/sidrec" and actor.num_gpus == 1
    # the import path resolves to the builder, and the YAML's args build an application
    module, attr = app.import_path.split(":")
    assert getattr(importlib.import_module(module), attr) is build_app
    assert isinstance(build_app(app.args), Application)


def test_build_app_args(tmp_path):
    from ray.serve.api import Application

    from sidrec.serve.app import build_app, split_args

    assert isinstance(build_app({"store_root": str(tmp_path), "num_beams": "12"}), Application)  # CLI strings
    settings, app = split_args({"store_root": str(tmp_path), "num_beams": "12", "num_cpus": "0.5",
                                "reload_token": "7", "retries": 0})
    assert (settings.num_beams, settings.reload_token, app.num_cpus, app.retries) == (12, "7", 0.5, 0)
    keyed, _ = split_args({"store_root": str(tmp_path), "api_key": "12345678", "torch_threads": "2"})
    assert (keyed.api_key, keyed.torch_threads) == ("12345678", 2)  # a numeric-looking key stays a string
    assert split_args({})[0] is None and split_args(None)[1].max_body_bytes == 65536
    assert split_args({"store_root": "rel/store"})[0].store_root == str(Path("rel/store").resolve())
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['num_beam'\]"):
        build_app({"store_root": str(tmp_path), "num_beam": 12})                    # typo: named, not ignored
    with pytest.raises(ConfigError, match="without store_root"):
        build_app({"num_beams": 12})
    with pytest.raises(ConfigError, match=r"user_config.num_beams must be <= 512, got 1000"):
        build_app({"store_root": str(tmp_path), "num_beams": 1000})
    with pytest.raises(ConfigError, match="user_config.num_beams must be an integer"):
        build_app({"store_root": str(tmp_path), "num_beams": "ten"})
    with pytest.raises(ConfigError, match="args.max_body_bytes must be >= 1024"):
        build_app({"max_body_bytes": 10})
    with pytest.raises(ConfigError, match="absolute path or a URI"):
        section_from_dict(ServeSettings, {"store_root": "artifacts/quickstart"})
    with pytest.raises(ConfigError, match="scoring"):
        section_from_dict(ServeSettings, {"store_root": "/x", "scoring": "best"})


# ================================================================================ HTTP over a fake
class FakeBackend:
    """Stands for the Recommender deployment: canned replies, calls recorded."""

    def __init__(self, replies: dict | None = None):
        self.calls: list[tuple] = []
        self.replies = replies or {}

    async def recommend(self, request):
        self.calls.append(("recommend", request))
        return self.replies.get("recommend", {"items": [], "k": request["k"], "model_version": "v-1",
                                              "history_items": 0, "history_used": 0, "history_truncated": False,
                                              "prompt_truncated": False, "max_history": 20, "cold_start": False,
                                              "exclude_history": True})

    async def search(self, request):
        self.calls.append(("search", request))
        return self.replies["search"]

    async def item(self, item_id):
        self.calls.append(("item", item_id))
        return self.replies.get("item", {"item_id": item_id, "title": "t", "sid": "<a_1>", "source": "catalog",
                                         "model_version": "v-1"})

    async def add_items(self, items, api_key):
        self.calls.append(("add_items", items, api_key))
        return self.replies["add_items"]

    async def retire_items(self, item_ids, api_key):
        self.calls.append(("retire_items", item_ids, api_key))
        return self.replies.get("retire_items", {"retired": item_ids, "unknown": [], "version": 2,
                                                 "scope": "store", "replica": "r1"})

    async def catalog_version(self):
        self.calls.append(("catalog_version",))
        return {"version": 2, "applied": 1, "replica": "r1"}

    async def health(self):
        return self.replies.get("health", {"status": "ok"})


class FakeMetrics:
    def __init__(self):
        self.seen: list[tuple] = []

    def record(self, route, method, status, seconds):
        self.seen.append((route, method, status))


def _client(backend, **kw):
    from starlette.testclient import TestClient

    from sidrec.serve.http import make_api

    return TestClient(make_api(backend, **kw), raise_server_exceptions=False)


def error_body(r, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert body["error"] == code and body["detail"], body
    return body


def test_http_app_validates_and_maps_errors():
    from sidrec.serve.schemas import error

    backend = FakeBackend({"item": error(404, "unknown_item", "unknown item id 'x'", item_id="x"),
                           "add_items": error(401, "missing_api_key", "needs a key")})
    metrics = FakeMetrics()
    with _client(backend, metrics=metrics) as c:
        assert c.post("/v1/recommend", json={"history": ["1", 2], "k": 3}).status_code == 200
        assert backend.calls[-1] == ("recommend", {"history": ["1", "2"], "profile": None, "k": 3,
                                                   "exclude_history": True})
        for k in (0, "ten", 2.5, True, None):
            assert "body.k" in error_body(c.post("/v1/recommend", json={"history": ["1"], "k": k}), 422,
                                    "invalid_request")["detail"]
        assert "histroy" in error_body(c.post("/v1/recommend", json={"histroy": ["1"]}), 422, "invalid_request")["detail"]
        error_body(c.post("/v1/recommend", content=b"{not json", headers={"content-type": "application/json"}), 422,
             "invalid_request")
        error_body(c.post("/v1/items/search", json={"title": "  "}), 422, "invalid_request")
        error_body(c.post("/v1/items", json={"items": []}), 422, "invalid_request")
        assert error_body(c.get("/v1/items/x"), 404, "unknown_item")["item_id"] == "x"   # a replica's error reply
        error_body(c.post("/v1/items", json={"items": [{"item_id": 5, "title": "A"}]}, headers={"X-API-Key": "s3cret"}),
             401, "missing_api_key")
        assert backend.calls[-1] == ("add_items", [{"item_id": "5", "title": "A", "brand": "", "categories": "",
                                                    "description": ""}], "s3cret")
        r = c.post("/v1/items/retire", json={"item_ids": ["a", 7]}, headers={"X-API-Key": "s3cret"})
        assert r.status_code == 200 and r.json()["retired"] == ["a", "7"] and r.json()["scope"] == "store"
        assert backend.calls[-1] == ("retire_items", ["a", "7"], "s3cret")
        for bad in ({"item_ids": []}, {"item_ids": "a"}, {"ids": ["a"]}, {"item_ids": [["a"]]}):
            error_body(c.post("/v1/items/retire", json=bad), 422, "invalid_request")
        assert c.get("/v1/catalog/version").json() == {"version": 2, "applied": 1, "replica": "r1"}
        error_body(c.get("/v1/nothing-here"), 404, "not_found")
        error_body(c.get("/v1/recommend"), 405, "method_not_allowed")
        assert {"/v1/recommend", "/v1/items/{item_id}", "/v1/items/search", "/v1/items", "/v1/items/retire",
                "/v1/catalog/version", "/healthz"} <= set(c.get("/openapi.json").json()["paths"])
        assert c.get("/docs").status_code == 200
    assert ("/v1/recommend", "POST", 200) in metrics.seen and ("/v1/items/{item_id}", "GET", 404) in metrics.seen
    assert ("unmatched", "GET", 404) in metrics.seen


def test_http_app_body_limit_is_per_app():
    import json

    small, large = FakeBackend(), FakeBackend()
    big = {"history": ["1"] * 1000}                       # ~6 KB
    data = json.dumps(big).encode()
    metrics = FakeMetrics()
    with _client(small, max_body_bytes=2048, metrics=metrics) as s, _client(large, max_body_bytes=65536) as g:
        assert error_body(s.post("/v1/recommend", json=big), 413, "body_too_large")["max_body_bytes"] == 2048
        chunks = [data[i:i + 1024] for i in range(0, len(data), 1024)]     # streamed: no Content-Length
        error_body(s.post("/v1/recommend", content=iter(chunks), headers={"content-type": "application/json"}), 413,
             "body_too_large")
        assert g.post("/v1/recommend", json=big).status_code == 200       # the other app's own limit
        assert g.post("/v1/recommend", content=iter(chunks),
                      headers={"content-type": "application/json"}).status_code == 200
        error_body(s.post("/v1/recommend", content=b"{}", headers={"content-type": "application/json",
                                                             "content-length": "x"}), 400, "bad_request")
    assert not small.calls and len(large.calls) == 2
    assert metrics.seen.count(("unmatched", "POST", 413)) == 2


def test_healthz_reports_loading_as_503():
    with _client(FakeBackend({"health": {"status": "loading", "loads": 0}})) as c:
        r = c.get("/healthz")
        assert r.status_code == 503 and r.json()["status"] == "loading"
    with _client(FakeBackend({"health": {"status": "ok"}})) as c:
        assert c.get("/healthz").status_code == 200


# ==================================================================================== the client
class _Method:
    def __init__(self, outcomes: list):
        self.outcomes = outcomes
        self.calls = 0

    def remote(self, *args, **kwargs):
        self.calls += 1
        outcome = self.outcomes.pop(0)

        async def answer():
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome

        return answer()


class _Handle:
    def __init__(self, **methods):
        self.__dict__.update(methods)


def test_client_retries_reads_and_idempotent_writes():
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError

    from sidrec.serve.http import RecommenderClient

    async def main():
        rec = _Method([RayActorError(), RayActorError(), {"items": []}])
        # catalog writes are idempotent (same text -> "unchanged", retired stays retired): re-sent too
        add = _Method([RayActorError(), {"items": [], "version": 4}])
        retire = _Method([RayActorError(), RayActorError(), RayActorError()])
        busy = _Method([BackPressureError(num_queued_requests=5, max_queued_requests=5)])
        client = RecommenderClient(_Handle(recommend=rec, add_items=add, retire_items=retire, search=busy), retries=2)
        assert await client.recommend({"k": 1}) == {"items": []} and rec.calls == 3   # re-sent twice
        assert await client.add_items([], api_key=None) == {"items": [], "version": 4} and add.calls == 2
        out = await client.retire_items(["1"], api_key=None)
        assert out["status"] == 503 and out["error"]["error"] == "unavailable" and retire.calls == 3
        out = await client.search({"k": 1})
        assert out["status"] == 503 and "BackPressureError" in out["error"]["detail"] and busy.calls == 1
        none = _Method([RayActorError()])
        assert (await RecommenderClient(_Handle(item=none), retries=0).item("1"))["status"] == 503
        # a coalesced group is re-sent whole; when it cannot be, every body of it gets the 503
        many = _Method([RayActorError(), [{"items": [1]}, {"items": [2]}]])
        client = RecommenderClient(_Handle(recommend_many=many), retries=1)
        assert await client.recommend_many([{"k": 1}, {"k": 2}]) == [{"items": [1]}, {"items": [2]}]
        dead = _Method([RayActorError(), RayActorError()])
        out = await RecommenderClient(_Handle(recommend_many=dead), retries=1).recommend_many([{}, {}, {}])
        assert len(out) == 3 and all(o["status"] == 503 for o in out) and dead.calls == 2

    asyncio.run(main())


# ====================================================================================== admin key
def test_check_api_key():
    from sidrec.serve.handling import check_api_key

    def code(settings, given, env=None):
        out = check_api_key(settings, given, env or {})
        return None if out is None else (out["status"], out["error"]["error"])

    unset = section_from_dict(ServeSettings, {"store_root": "/x"})
    keyed = section_from_dict(ServeSettings, {"store_root": "/x", "api_key": "secret-key"})
    by_env = section_from_dict(ServeSettings, {"store_root": "/x", "api_key_env": "SIDREC_TEST_KEY"})
    # locked by default: no key configured = disabled for everyone, with or without a key in the request
    for given in (None, "", "anything", "secret-key"):
        assert code(None, given) == (403, "admin_disabled") and code(unset, given) == (403, "admin_disabled")
    assert "SIDREC_API_KEY" in check_api_key(unset, None, {})["error"]["detail"]
    # the default variable is SIDREC_API_KEY; user_config.api_key wins over it
    assert code(unset, None, {"SIDREC_API_KEY": "from-env-1"}) == (401, "missing_api_key")
    assert code(unset, "from-env-1", {"SIDREC_API_KEY": "from-env-1"}) is None
    assert code(keyed, "from-env-1", {"SIDREC_API_KEY": "from-env-1"}) == (403, "invalid_api_key")
    assert code(keyed, None) == (401, "missing_api_key") and code(keyed, "nope") == (403, "invalid_api_key")
    assert code(keyed, "secret-key") is None and code(keyed, "secret-key ") == (403, "invalid_api_key")
    assert code(by_env, "x") == (403, "admin_disabled")
    assert code(by_env, "env-secret", {"SIDREC_TEST_KEY": "env-secret"}) is None
    assert code(by_env, "other", {"SIDREC_TEST_KEY": "env-secret"}) == (403, "invalid_api_key")


# ===================================================================================== the demo
def test_interrupts_raise_overrides_a_swallowing_handler():
    from sidrec.serve.demo import interrupts_raise

    swallowed = []

    def swallow(signum, frame):  # what a library's leftover handler (Ray Train's) does to Ctrl-C
        swallowed.append(signum)

    previous = signal.signal(signal.SIGINT, swallow)
    try:
        with pytest.raises(KeyboardInterrupt), interrupts_raise():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # interrupted at once
        assert signal.getsignal(signal.SIGINT) is swallow and not swallowed  # restored afterwards
    finally:
        signal.signal(signal.SIGINT, previous)
