"""A headless Chromium driven by Selenium (Debian's ``chromium`` + ``chromium-driver``; ``.ci/run`` installs
them), a live Serve app on the small trained store, and the folder screenshots are saved to
(``SIDREC_TEST_ARTIFACTS``, else a pytest tmp dir).

The tests skip only when no browser binary is found; with a browser but without the ``selenium`` package
(a dev extra) they fail, naming the fix. Serve is started on loopback under a deadline and always shut down.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.serve.test_deploy import API_KEY, free_port

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
SERVE_START_S = 300


def find_browser() -> tuple[str, str] | None:
    """(browser, chromedriver) binaries: $SIDREC_CHROMIUM / $SIDREC_CHROMEDRIVER, else the first on PATH."""
    browser = os.environ.get("SIDREC_CHROMIUM") or next(filter(None, map(shutil.which, BROWSERS)), None)
    driver = os.environ.get("SIDREC_CHROMEDRIVER") or shutil.which("chromedriver")
    if not browser or not driver:
        return None
    return browser, driver


@contextlib.contextmanager
def deadline(seconds: int, what: str) -> Iterator[None]:
    """Raise TimeoutError in the main thread if the block runs longer than ``seconds``."""

    def expired(signum, frame):
        raise TimeoutError(f"{what} took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory) -> Path:
    """Where screenshots go: $SIDREC_TEST_ARTIFACTS, else a pytest tmp dir."""
    env = os.environ.get("SIDREC_TEST_ARTIFACTS")
    folder = Path(env) if env else tmp_path_factory.mktemp("browser-artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="session")
def browser(tmp_path_factory):
    """A headless Chromium (one for the session), quit afterwards."""
    found = find_browser()
    if found is None:
        pytest.skip(f"no browser: none of {BROWSERS} (or no chromedriver) on PATH; install Debian's chromium and "
                    "chromium-driver (`apt-get install chromium chromium-driver`, as .ci/run does) or set "
                    "SIDREC_CHROMIUM / SIDREC_CHROMEDRIVER")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as e:
        pytest.fail(f"a browser is installed but the selenium package is not ({e}): pip install -e '.[dev]'")
    binary, driver_path = found
    profile = tmp_path_factory.mktemp("chromium-profile")
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1000", f"--user-data-dir={profile}", "--no-first-run",
                "--disable-extensions", "--disable-background-networking", "--disable-component-update"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    log = tmp_path_factory.mktemp("chromedriver") / "chromedriver.log"
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=driver_path, log_output=str(log)))
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def demo_app(trained_store, tmp_path_factory):
    """The Serve app (with an admin key) on a copy of the trained store (its admin writes go to the copy's
    catalog log, never to the store other tests share), HTTP on 127.0.0.1:<free port>; Serve is shut down
    afterwards. Yields (base URL, store root)."""
    from ray import serve

    from sidrec.serve.app import build_app

    root = str(tmp_path_factory.mktemp("demo-store") / "store")
    shutil.copytree(trained_store[1], root)
    port = free_port()
    t0 = time.perf_counter()
    try:
        with deadline(SERVE_START_S, "starting the Serve app"):
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            serve.run(build_app({"store_root": root, "num_cpus": 0.5, "api_key": API_KEY}), name="sidrec",
                      route_prefix="/", blocking=False)
        print(f"serve.run ready in {time.perf_counter() - t0:.1f}s on port {port}")
        yield f"http://127.0.0.1:{port}", root
    finally:
        serve.shutdown()
