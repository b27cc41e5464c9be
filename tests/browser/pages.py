"""What the browser tests share: waits, element lookups, full-page screenshots, the page's console errors."""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path

WAIT_S = 120


def wait(driver, condition, what: str, timeout: float = WAIT_S):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(lambda d: condition(d), message=what)


def click_css(driver, selector: str, what: str, timeout: float = WAIT_S) -> None:
    """Click the first element matching ``selector`` once it exists, retrying when the page re-renders it
    between the lookup and the click (a stale element)."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    def attempt(d) -> bool:
        found = d.find_elements("css selector", selector)
        if found:
            found[0].click()
        return bool(found)

    WebDriverWait(driver, timeout, poll_frequency=0.2,
                  ignored_exceptions=(StaleElementReferenceException,)).until(attempt, message=what)


def by_id(driver, element_id: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def shot(driver, artifacts: Path, name: str, what: str) -> Path:
    """A PNG of the whole page (beyond the window, through Chromium's DevTools), its path printed with what
    it shows."""
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    clip = {"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], 6000), "scale": 1}
    png = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                                                             "clip": clip})["data"]
    path = artifacts / name
    path.write_bytes(base64.b64decode(png))
    assert path.read_bytes()[:4] == b"\x89PNG"
    print(f"screenshot {path}: {what}")
    return path


def rendered(driver) -> list[dict]:
    """The recommendation rows as the page shows them."""
    return driver.execute_script("""
        return [...document.querySelectorAll('#results tbody tr')].map((tr) => ({
          item_id: tr.dataset.itemId, sid: tr.dataset.sid, score: Number(tr.dataset.score),
          cells: [...tr.cells].map((td) => td.textContent)}));""")


def results_for(driver, body: dict) -> list[dict]:
    """Wait until the page shows the answer to ``body`` (the request it sent, as recorded on the results)."""
    def done(d):
        box = by_id(d, "results")
        return box.get_attribute("data-state") == "done" and json.loads(box.get_attribute("data-request") or "{}") == body

    wait(driver, done, f"the page's answer to {body}")
    return rendered(driver)


def assert_same_list(page_rows: list[dict], answer: dict) -> None:
    """The page shows the API's list: same items in the same order, titles, SIDs, scores."""
    items = answer["items"]
    assert [r["item_id"] for r in page_rows] == [i["item_id"] for i in items]
    for n, (row, it) in enumerate(zip(page_rows, items, strict=True)):
        assert row["cells"] == [str(n + 1), it["title"], it["item_id"], it["sid"], f"{it['score']:.3f}"]
        assert row["sid"] == it["sid"] and math.isclose(row["score"], it["score"], rel_tol=1e-5, abs_tol=1e-5)


def set_value(driver, element_id: str, text: str, then_tab: bool = False) -> None:
    from selenium.webdriver.common.keys import Keys

    el = by_id(driver, element_id)
    el.clear()
    el.send_keys(text + (Keys.TAB if then_tab else ""))


def console_errors(driver) -> list[str]:
    """The page's own errors (a 4xx the page asked for is logged by Chromium as a network error: not one)."""
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE" and e.get("source") != "network"]


def open_page(driver, base: str) -> None:
    driver.get(f"{base}/")                                   # / redirects to the page
    assert driver.current_url == f"{base}/ui"
    wait(driver, lambda d: by_id(d, "status").text.startswith("model v-"), "the model line")
    wait(driver, lambda d: len(d.find_elements("css selector", "#user-select option")) > 1, "the user list")
