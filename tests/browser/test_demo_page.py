"""The demo page in a real (headless) Chromium, against a live Serve app on the small trained store: the
list the page renders for a test user is the API's answer to the same request; an API error is shown
readably; an item added through the admin panel is found by the search box and recommendable, and once
retired it is neither searchable nor recommended. Screenshots are saved to the ``artifacts`` folder
(tests/browser/conftest.py) and their paths printed."""

from __future__ import annotations

import pytest

from tests.browser.pages import (
    assert_same_list,
    by_id,
    click_css,
    console_errors,
    open_page,
    rendered,
    results_for,
    set_value,
    shot,
    wait,
)
from tests.serve.test_deploy import API_KEY

httpx = pytest.importorskip("httpx")

NEW_ITEM = {"item_id": "ui-demo-1", "title": "Quokka Island Adventures (2031)", "categories": "Adventure > Comedy"}


# ============================================================================================= tests
@pytest.mark.slow
def test_picked_user_gets_the_apis_list_and_errors_are_readable(browser, demo_app, artifacts):
    from selenium.webdriver.support.ui import Select

    from sidrec.store import ArtifactStore

    base, root = demo_app

    store = ArtifactStore(root)
    titles, profiles = store.titles(), store.profiles()
    open_page(browser, base)
    listed = httpx.get(f"{base}/v1/users", params={"limit": 50}, timeout=60).json()
    users = listed["users"]
    split = store.split("test", columns=["user_id", "history", "target"])
    assert listed["total"] == split.num_rows and len(users) == 50
    assert users == [{**row, "profile": profiles.get(row["user_id"])} for row in split.slice(0, 50).to_pylist()]
    options = browser.execute_script("return [...document.querySelectorAll('#user-select option')].map((o) => "
                                     "o.value).filter(Boolean)")
    assert options == [u["user_id"] for u in users]
    user = users[1]
    assert user["profile"], "ml-100k has user profiles: the page should show and send them"
    Select(by_id(browser, "user-select")).select_by_value(user["user_id"])
    body = {"history": user["history"], "k": 10, "exclude_history": True, "profile": user["profile"]}
    rows = results_for(browser, body)
    answer = httpx.post(f"{base}/v1/recommend", json=body, timeout=120).json()
    assert len(rows) == 10
    assert_same_list(rows, answer)
    # the history as shown: the model's window (most recent max_history items), with the catalog's titles
    shown = browser.execute_script("return [...document.querySelectorAll('#history li')].map((li) => "
                                   "[li.dataset.itemId, li.firstChild.textContent])")
    window = user["history"][-answer["max_history"]:]
    assert shown == [[i, titles[i]] for i in window]
    assert by_id(browser, "profile").get_attribute("value") == user["profile"]
    assert user["target"] in by_id(browser, "user-info").text
    shot(browser, artifacts, "01-test-user-top10.png",
         f"test user {user['user_id']} ({user['profile']}): history, and the top-10 equal to POST /v1/recommend")

    # change K and let the history in: the page's new list is again the API's
    set_value(browser, "k", "5", then_tab=True)
    by_id(browser, "exclude").click()
    body = {**body, "k": 5, "exclude_history": False}
    rows = results_for(browser, body)
    assert_same_list(rows, httpx.post(f"{base}/v1/recommend", json=body, timeout=120).json())

    # an API error is shown as status, code, detail and the body's other fields
    set_value(browser, "k", "99", then_tab=True)
    wait(browser, lambda d: by_id(d, "results").get_attribute("data-state") == "error", "the error state")
    err = by_id(browser, "rec-error").text
    api_err = httpx.post(f"{base}/v1/recommend", json={**body, "k": 99}, timeout=60).json()
    assert err.splitlines()[0] == f"HTTP 422 k_out_of_range: {api_err['detail']}"
    assert f"max_k: {api_err['max_k']}" in err and not rendered(browser)
    shot(browser, artifacts, "02-api-error.png", "K=99: the 422 k_out_of_range body shown in the results panel")
    assert not console_errors(browser), console_errors(browser)


@pytest.mark.slow
def test_admin_adds_an_item_search_finds_it_and_retire_removes_it(browser, demo_app, artifacts):
    base, _ = demo_app
    open_page(browser, base)
    for field in ("id", "title", "categories"):
        set_value(browser, f"new-{field}", NEW_ITEM["item_id" if field == "id" else field])
    set_value(browser, "api-key", "not-the-key")
    by_id(browser, "add-btn").click()
    wait(browser, lambda d: "invalid_api_key" in by_id(d, "admin-error").text, "the 403 shown")
    assert by_id(browser, "admin-error").text.startswith("HTTP 403 invalid_api_key: ")
    assert httpx.get(f"{base}/v1/items/{NEW_ITEM['item_id']}", timeout=60).status_code == 404  # not added

    set_value(browser, "api-key", API_KEY)
    by_id(browser, "add-btn").click()
    wait(browser, lambda d: "searchable: title search finds ui-demo-1" in by_id(d, "admin-result").text,
         "the add confirmed and found by title search", timeout=300)
    info = httpx.get(f"{base}/v1/items/{NEW_ITEM['item_id']}", timeout=60).json()
    assert f"ui-demo-1 → {info['sid']}" in by_id(browser, "admin-result").text

    # the search box finds it (a substring, any case), as GET /v1/items does
    set_value(browser, "item-q", "qUOKKA isl")
    wait(browser, lambda d: d.find_elements("css selector", '#item-results li[data-item-id="ui-demo-1"]'),
         "the added item in the search results")
    listed = browser.execute_script("return [...document.querySelectorAll('#item-results li')].map((li) => "
                                    "li.dataset.itemId)")
    api_items = httpx.get(f"{base}/v1/items", params={"q": "qUOKKA isl", "limit": 10}, timeout=60).json()["items"]
    assert listed == [i["item_id"] for i in api_items] == ["ui-demo-1"]

    # recommendable: a history of just the new item gets the API's answer
    by_id(browser, "new-history").click()
    click_css(browser, '#item-results li[data-item-id="ui-demo-1"] button', "the added item's + history button")
    body = {"history": ["ui-demo-1"], "k": 10, "exclude_history": True}
    rows = results_for(browser, body)
    assert_same_list(rows, httpx.post(f"{base}/v1/recommend", json=body, timeout=120).json())
    assert "ui-demo-1" not in [r["item_id"] for r in rows]          # excluded: it is the history
    shot(browser, artifacts, "03-admin-added-item.png",
         "admin panel: ui-demo-1 added (SID shown), found by the search box, its history's top-10")

    # retire it: the panel confirms, the item is no longer served, searchable or usable as history
    set_value(browser, "retire-ids", NEW_ITEM["item_id"])
    by_id(browser, "retire-btn").click()
    wait(browser, lambda d: "retired: ui-demo-1" in by_id(d, "admin-result").text
         or by_id(d, "admin-error").text, "the retire answered", timeout=300)
    assert not by_id(browser, "admin-error").text, by_id(browser, "admin-error").text
    assert "ui-demo-1: retired_item (no longer recommendable)" in by_id(browser, "admin-result").text
    wait(browser, lambda d: not d.find_elements("css selector", '#item-results li[data-item-id="ui-demo-1"]'),
         "the retired item gone from the search results")
    assert httpx.get(f"{base}/v1/items", params={"q": "quokka"}, timeout=60).json() == {"items": []}
    assert browser.find_element("css selector", '#history li[data-item-id="ui-demo-1"] span').get_attribute(
        "class") == "retired"
    # a history may still name it (the model reads its SID), but it never comes back, history or not
    by_id(browser, "exclude").click()
    body = {**body, "exclude_history": False}
    rows = results_for(browser, body)
    assert_same_list(rows, httpx.post(f"{base}/v1/recommend", json=body, timeout=120).json())
    assert len(rows) == 10 and "ui-demo-1" not in [r["item_id"] for r in rows]
    shot(browser, artifacts, "04-admin-retired-item.png",
         "ui-demo-1 retired: confirmed, struck out in the history, absent from its top-10 with the history allowed")
    assert not console_errors(browser), console_errors(browser)
