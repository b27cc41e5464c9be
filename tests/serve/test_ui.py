"""The demo page's routes without Ray: GET /ui (the shipped page, self-contained, under a CSP that forbids
anything else), GET / -> /ui, and the two listings (GET /v1/users over a real store's test split, GET
/v1/items over a live catalog) through the real ``make_api`` with a backend that runs the real listing code.
The page in a browser against a live Serve app: tests/browser/."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import pyarrow as pa
import pytest

from sidrec.serve.ui import page_html
from sidrec.serve.ui.listing import HeldOutUsers, search_titles
from sidrec.store import ArtifactStore
from tests.serve.test_handling import error_body

pytest.importorskip("httpx")

TITLES = {"1": "Toy Story (1995)", "2": "GoldenEye (1995)", "3": "Four Rooms (1995)", "4": "Get Shorty (1995)",
          "5": "Story of Us, The (1999)", "6": "Shorts <b>&amp;</b> A Story"}
SIDS = {i: f"<a_{n}><b_{n}><c_0>" for n, i in enumerate(TITLES)}


def publish_dataset(root: Path, profiles: bool) -> ArtifactStore:
    """A dataset stage as the real stage publishes it: catalog, the splits, profiles when the data has them."""
    store = ArtifactStore(str(root))
    run = store.begin("dataset")
    store.write_table(f"{run.path}/catalog.parquet", pa.table({"item_id": list(TITLES), "title": list(TITLES.values())}))
    test = pa.table({"user_id": ["u1", "u2", "u3"], "history": [["1", "2"], ["3"], ["4", "5", "1"]],
                     "target": ["3", "4", "2"]})
    store.write_table(f"{run.path}/test.parquet", test)
    if profiles:
        store.write_table(f"{run.path}/profiles.parquet", pa.table({"user_id": ["u1", "u3"],
                                                                    "profile": ["a 24-year-old student", "a nurse"]}))
    store.publish(run, fp="fp-dataset", config={}, inputs={})
    return store


class ListingBackend:
    """The Recommender deployment's listing methods on a store and a catalog, without Ray (what the
    deployment's ``users`` / ``list_items`` compute, with the replica's catalog given as dicts)."""

    def __init__(self, store: ArtifactStore, sid_of: dict[str, str], titles: dict[str, str]):
        self.split = HeldOutUsers(store.root, store.require("dataset")["version"])
        self.profiles = store.profiles()
        self.sid_of, self.titles = sid_of, titles

    async def users(self, limit, offset):
        return self.split.page(limit, offset, self.profiles)

    async def list_items(self, q, limit):
        return search_titles(self.sid_of, self.titles, q, limit)


def client(backend):
    from starlette.testclient import TestClient

    from sidrec.serve.http import make_api

    return TestClient(make_api(backend), raise_server_exceptions=False)


def test_search_titles_is_a_case_insensitive_substring_search_over_the_live_catalog():
    sid_of, titles = dict(SIDS), dict(TITLES)
    ids = lambda q, limit=10: [i["item_id"] for i in search_titles(sid_of, titles, q, limit)["items"]]  # noqa: E731
    assert ids("story") == ["5", "1", "6"]            # prefix first, then by position, then catalog order
    assert ids("  STORY ") == ["5", "1", "6"] and ids("story", 2) == ["5", "1"]
    assert ids("1995") == ["1", "2", "3", "4"] and ids("nothing like it") == []
    assert ids("") == list(TITLES)[:10] and ids("", 2) == ["1", "2"]   # empty query: the catalog from the top
    out = search_titles(sid_of, titles, "goldeneye", 5)["items"]
    assert out == [{"item_id": "2", "title": "GoldenEye (1995)", "sid": SIDS["2"]}]
    # the live catalog: an item added to the replica is found, one gone from it is not
    sid_of["new-1"], titles["new-1"] = "<a_9><b_9><c_1>", "Toy Story 5 (2031)"
    del sid_of["1"]
    assert ids("toy story") == ["new-1"]


def test_users_route_pages_the_test_split_with_profiles(tmp_path):
    store = publish_dataset(tmp_path / "s", profiles=True)
    c = client(ListingBackend(store, SIDS, TITLES))
    r = c.get("/v1/users")
    assert r.status_code == 200, r.text
    assert r.json() == {"total": 3, "users": [
        {"user_id": "u1", "profile": "a 24-year-old student", "history": ["1", "2"], "target": "3"},
        {"user_id": "u2", "profile": None, "history": ["3"], "target": "4"},
        {"user_id": "u3", "profile": "a nurse", "history": ["4", "5", "1"], "target": "2"}]}
    assert [u["user_id"] for u in c.get("/v1/users?limit=1&offset=1").json()["users"]] == ["u2"]
    assert c.get("/v1/users?offset=5").json() == {"users": [], "total": 3}
    for bad in ("limit=0", "limit=201", "offset=-1", "limit=ten"):
        assert "query" in error_body(c.get(f"/v1/users?{bad}"), 422, "invalid_request")["detail"]


def test_users_without_profiles(tmp_path):
    store = publish_dataset(tmp_path / "s", profiles=False)
    users = client(ListingBackend(store, SIDS, TITLES)).get("/v1/users").json()["users"]
    assert {u["profile"] for u in users} == {None}


def test_items_route_and_its_limits(tmp_path):
    store = publish_dataset(tmp_path / "s", profiles=False)
    c = client(ListingBackend(store, SIDS, TITLES))
    r = c.get("/v1/items", params={"q": "short", "limit": 5})
    assert r.status_code == 200 and r.json() == {"items": [
        {"item_id": "6", "title": TITLES["6"], "sid": SIDS["6"]},
        {"item_id": "4", "title": TITLES["4"], "sid": SIDS["4"]}]}
    error_body(c.get("/v1/items", params={"q": "x" * 201}), 422, "invalid_request")
    error_body(c.get("/v1/items", params={"limit": 101}), 422, "invalid_request")
    spec = c.get("/openapi.json").json()["paths"]
    assert {"/v1/users", "/v1/items"} <= set(spec) and "get" in spec["/v1/items"] and "/ui" not in spec


class Page(HTMLParser):
    """Tags, attributes and ids of the page."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def test_ui_serves_the_self_contained_page_and_root_redirects(tmp_path):
    store = publish_dataset(tmp_path / "s", profiles=False)
    c = client(ListingBackend(store, SIDS, TITLES))
    r = c.get("/ui")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert r.text == page_html() and "<title>sidrec demo</title>" in r.text
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    r = c.get("/", follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"].endswith("/ui")
    assert c.get("/").text == page_html()
    parsed = Page()
    parsed.feed(page_html())
    # nothing to fetch: no external script, stylesheet, image, frame or font; every API path relative
    assert not [t for t, a in parsed.tags if t in ("link", "img", "iframe", "object", "embed") or "src" in a]
    assert not re.findall(r"https?://", page_html())
    calls = set(re.findall(r'api\("(?:GET|POST)", [`"]([a-z0-9/]+)', page_html()))
    assert calls == {"healthz", "v1/users", "v1/items", "v1/items/", "v1/recommend", "v1/items/retire",
                     "v1/catalog/version"}
    ids = {a["id"] for _, a in parsed.tags if "id" in a}
    assert {"user-select", "item-q", "history", "k", "exclude", "results", "api-key", "add-btn", "retire-btn",
            "rec-error", "admin-error"} <= ids


def test_the_page_ships_as_package_data():
    import tomllib

    repo = Path(__file__).resolve().parents[2]
    data = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["sidrec"]
    page = repo / "platform" / "sidrec" / "serve" / "ui" / "index.html"
    assert any(page.match(f"platform/sidrec/{pattern}") for pattern in data), data


def test_the_replica_answers_the_listing_calls_the_ingress_makes():
    """The ingress's client calls ``users`` / ``list_items`` on the Recommender handle: the deployment has
    them, with the Backend protocol's parameters."""
    import inspect

    from sidrec.serve.deployment import RecommenderDeployment
    from sidrec.serve.http import Backend, RecommenderClient

    deployment = RecommenderDeployment.func_or_class
    for name in ("users", "list_items"):
        params = list(inspect.signature(getattr(Backend, name)).parameters)
        assert list(inspect.signature(getattr(deployment, name)).parameters) == params
        assert list(inspect.signature(getattr(RecommenderClient, name)).parameters) == params
        assert inspect.iscoroutinefunction(getattr(deployment, name))
