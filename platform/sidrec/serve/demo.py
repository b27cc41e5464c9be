"""The quickstart's last step: start the Serve app on a trained store (loopback), ask it over HTTP for a
real test user's top 5, and show them with titles; optionally keep serving until Ctrl-C (the demo page is
then at http://127.0.0.1:<port>/ui).

    answer = serve_demo(cfg, port=8000)                      # Serve shut down afterwards (Ray left running)
    serve_demo(cfg, keep_serving=True)                       # until Ctrl-C: then KeyboardInterrupt is raised

Ctrl-C works whatever SIGINT handler an earlier step left in this process (Ray Train's trainer installs
its own abort handler and never restores the previous one, so after training in the same process Ctrl-C
would not reach us): ``serve_demo`` installs Python's default handler while it runs. On Ctrl-C it shuts
Serve and Ray down, then re-raises ``KeyboardInterrupt`` for the CLI to exit with 130.
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import signal
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

from sidrec import console
from sidrec.cluster import init_ray
from sidrec.config import SidrecConfig
from sidrec.store import ArtifactStore

log = logging.getLogger("sidrec")

Echo = Callable[[str], None]
DEMO_CPUS = 0.5  # per Recommender replica: leaves room on a 2-core machine


def demo_user(cfg: SidrecConfig, n_history: int = 8) -> dict[str, Any]:
    """The first test example of the store (a real user), with a short history for display."""
    row = ArtifactStore(cfg.store.root).split("test").slice(0, 1).to_pylist()[0]
    return {"user_id": row["user_id"], "history": row["history"][-n_history:], "target": row["target"]}


def demo_url(port: int) -> str:
    """The demo page of the app served on 127.0.0.1:``port``."""
    return f"http://127.0.0.1:{port}/ui"


def post_json(url: str, body: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
    """POST a JSON body, return the JSON answer (raises urllib's HTTPError on a 4xx/5xx)."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


@contextlib.contextmanager
def interrupts_raise() -> Iterator[None]:
    """Inside the block, SIGINT raises KeyboardInterrupt (Python's default handler), whatever handler was
    installed before; that one is restored on exit. A no-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _ask(cfg: SidrecConfig, port: int, echo: Echo) -> dict[str, Any]:
    """Deploy the app on the store and show one real user's recommendations."""
    from ray import serve

    from sidrec.serve.app import build_app

    init_ray(cfg.ray)  # as the stages do (a resumed run may not have started Ray yet)
    console.quiet_ray()  # Serve's driver logger exists once ray.serve is imported
    titles = ArtifactStore(cfg.store.root).titles()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    admin_key = secrets.token_urlsafe(18)  # this demo's own: the admin endpoints stay locked to anyone else
    serve.run(build_app({"store_root": cfg.store.root, "num_cpus": DEMO_CPUS, "api_key": admin_key}), name="sidrec",
              route_prefix="/", blocking=False)
    user = demo_user(cfg)
    body = {"history": user["history"], "k": 5, "exclude_history": cfg.eval.exclude_history}
    t0 = time.perf_counter()
    answer = post_json(f"http://127.0.0.1:{port}/v1/recommend", body)
    ms = 1000 * (time.perf_counter() - t0)
    echo(f"\nServe app on http://127.0.0.1:{port} (docs: /docs), model {answer['model_version']}")
    echo(f"test user {user['user_id']}, recent history:")
    for item in user["history"][-5:]:
        echo(f"    {item:>8}  {titles.get(item, '?')}")
    echo(f"POST /v1/recommend -> top {len(answer['items'])} in {ms:.0f} ms:")
    for it in answer["items"]:
        echo(f"    {it['item_id']:>8}  {it['sid']}  {it['score']:8.3f}  {it['title']}")
    echo(f"(held-out next item: {user['target']} {titles.get(user['target'], '?')})")
    echo(f"admin (POST /v1/items) takes this run's key: -H 'X-API-Key: {admin_key}'")
    return answer


def shutdown_serve(ray_too: bool) -> None:
    """Shut Serve down (and this process's Ray connection, and the local cluster it started, if asked)."""
    import ray
    from ray import serve

    try:
        serve.shutdown()
    except Exception:  # keep going: Ray itself must still be shut down
        log.warning("serve.shutdown() failed", exc_info=True)
    if ray_too:
        ray.shutdown()


def serve_demo(cfg: SidrecConfig, port: int = 8000, keep_serving: bool = False, echo: Echo = print) -> dict[str, Any]:
    """Start the Serve app on ``cfg.store.root`` (127.0.0.1:``port``), ask it for a real test user's
    top 5 over HTTP and ``echo`` them with titles; then shut Serve down, or with ``keep_serving`` serve
    until Ctrl-C. Returns the /v1/recommend answer. On Ctrl-C (at any point) Serve and Ray are shut down
    and KeyboardInterrupt is raised."""
    with interrupts_raise():
        try:
            answer = _ask(cfg, port, echo)
            if not keep_serving:
                echo(f"(with --keep-serving the app stays up, its demo page at {demo_url(port)})")
            else:
                echo(f"demo page: {demo_url(port)}  (the admin panel takes the key above)")
                echo("serving until Ctrl-C ...")
                while True:
                    time.sleep(3600)
        except KeyboardInterrupt:
            log.info("interrupted: shutting down Serve and Ray")
            shutdown_serve(ray_too=True)
            raise
        except BaseException:
            shutdown_serve(ray_too=False)
            raise
        shutdown_serve(ray_too=False)
    return answer
