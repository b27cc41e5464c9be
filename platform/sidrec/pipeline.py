"""All stages in order, each resumed from the artifact store: dataset -> embeddings -> quantizer -> SIDs ->
instructions -> base model -> fine-tuned model -> evaluation (-> a Serve app answering requests).

    sidrec pipeline --config ml-100k            # what `ray_jobs/pipeline.py` runs on a cluster
    sidrec quickstart                           # the README's first command: quickstart config + Serve demo

A stage whose config and inputs are unchanged is skipped, so re-running after a failure continues where it
stopped, and a finished pipeline re-runs in seconds.
"""

from __future__ import annotations

import json
import logging
import urllib.request

from sidrec.config import SidrecConfig
from sidrec.store import ArtifactStore

log = logging.getLogger(__name__)


def run_pipeline(cfg: SidrecConfig, force: bool = False, force_eval: bool = False) -> dict:
    """Every stage through evaluation; returns the evaluation report. ``force`` rebuilds every stage,
    ``force_eval`` only the evaluation (``sidrec eval --force``)."""
    from sidrec.evaluate import evaluate_stage
    from sidrec.train import train_all

    train_all(cfg, force)
    store = ArtifactStore(cfg.store.root)
    evaluate_stage(store, cfg, force or force_eval)
    return store.read_json(f"{store.current_path(f'eval_{cfg.eval.split}')}/report.json")


def demo_user(cfg: SidrecConfig, n_history: int = 8) -> dict:
    """The first test example of the store (a real user), with a short history for display."""
    store = ArtifactStore(cfg.store.root)
    row = store.read_table(f"{store.current_path('dataset')}/test.parquet").slice(0, 1).to_pylist()[0]
    return {"user_id": row["user_id"], "history": row["history"][-n_history:], "target": row["target"]}


def post_json(url: str, body: dict, timeout: float = 60.0) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def serve_demo(cfg: SidrecConfig, port: int = 8000, keep_serving: bool = False) -> dict:
    """Start the Serve app on the store (loopback), ask it for a real test user's recommendations over HTTP,
    print them with titles, then shut Serve down (or keep it running)."""
    import time

    from ray import serve

    from sidrec.serve.app import build_app

    store = ArtifactStore(cfg.store.root)
    catalog = store.read_table(f"{store.current_path('dataset')}/catalog.parquet", columns=["item_id", "title"])
    titles = dict(zip(catalog["item_id"].to_pylist(), catalog["title"].to_pylist(), strict=True))
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"store_root": cfg.store.root, "num_cpus": 0.5}), name="sidrec", route_prefix="/",
              blocking=False)
    user = demo_user(cfg)
    body = {"history": user["history"], "k": 5, "exclude_history": cfg.eval.exclude_history}
    t0 = time.perf_counter()
    answer = post_json(f"http://127.0.0.1:{port}/v1/recommend", body)
    ms = 1000 * (time.perf_counter() - t0)
    print(f"\nServe app on http://127.0.0.1:{port} (docs: /docs), model {answer['model_version']}")
    print(f"test user {user['user_id']}, recent history:")
    for item in user["history"][-5:]:
        print(f"    {item:>8}  {titles.get(item, '?')}")
    print(f"POST /v1/recommend -> top {len(answer['items'])} in {ms:.0f} ms:")
    for it in answer["items"]:
        print(f"    {it['item_id']:>8}  {it['sid']}  {it['score']:8.3f}  {it['title']}")
    print(f"(held-out next item: {user['target']} {titles.get(user['target'], '?')})")
    if keep_serving:
        print("serving until Ctrl-C ...")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    serve.shutdown()
    return answer
