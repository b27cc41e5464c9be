"""The quickstart's Serve demo on the small trained store: it answers a real test user, and with
``keep_serving`` a Ctrl-C stops it cleanly (exit 130, no Serve or Ray process left behind) even when an
earlier step left a SIGINT handler that swallows Ctrl-C (as Ray Train's trainer does)."""

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.serve.test_deploy import free_port

httpx = pytest.importorskip("httpx")
psutil = pytest.importorskip("psutil")

# What `sidrec quickstart --keep-serving` does after training, in a process of its own: Ray started by
# the process, a Ctrl-C-swallowing handler left behind (Ray Train's), then the demo; the CLI maps
# KeyboardInterrupt to exit code 130.
CHILD = """
import json, signal, sys
import ray
from sidrec.config import config_from_dict
from sidrec.serve.demo import serve_demo

signal.signal(signal.SIGINT, lambda signum, frame: print("swallowed SIGINT", flush=True))
cfg = config_from_dict(json.loads(sys.argv[1]))
ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
try:
    serve_demo(cfg, port=int(sys.argv[2]), keep_serving=True)
except KeyboardInterrupt:
    sys.exit(130)
sys.exit(0)
"""


@pytest.mark.slow
def test_serve_demo_answers_a_real_test_user(trained_store):
    from sidrec.serve.demo import demo_user, serve_demo

    cfg, _ = trained_store
    lines: list[str] = []
    answer = serve_demo(cfg, port=free_port(), echo=lines.append)
    user = demo_user(cfg)
    items = answer["items"]
    assert len(items) == 5 and all(it["title"] and it["sid"].startswith("<a_") for it in items)
    assert not {it["item_id"] for it in items} & set(user["history"])  # quickstart excludes the history
    out = "\n".join(lines)
    assert f"test user {user['user_id']}" in out and items[0]["title"] in out
    assert "serving until Ctrl-C" not in out
    key_line = next(line for line in lines if "X-API-Key:" in line)  # the run's own admin key, shown to its user
    assert len(key_line.rsplit("X-API-Key: ", 1)[1].rstrip("'")) >= 20


def _alive(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def _lines(stream, sink: queue.Queue) -> None:
    for line in iter(stream.readline, ""):
        sink.put(line)
    sink.put(None)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["demo", "cli"])
def test_keep_serving_stops_on_ctrl_c(trained_store, tmp_path, how):
    """``demo``: serve_demo after a Ctrl-C-swallowing handler; ``cli``: the real `sidrec pipeline
    --keep-serving` on the trained store (every stage resumed), as a user runs it."""
    from sidrec.config import to_dict
    from tests.conftest import small_run_overrides

    cfg, root = trained_store
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1")
    err = open(tmp_path / "child.log", "w")  # noqa: SIM115
    cmd = [sys.executable, "-c", CHILD, json.dumps(to_dict(cfg)), str(port)] if how == "demo" else [
        sys.executable, "-m", "sidrec.cli", "pipeline", "--config", "quickstart", "--keep-serving", "--port",
        str(port), f"store.root={root}", *small_run_overrides()]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True)
    out: queue.Queue = queue.Queue()
    threading.Thread(target=_lines, args=(proc.stdout, out), daemon=True).start()
    family: list[int] = []
    try:
        seen, deadline = [], time.time() + 600
        while not any("serving until Ctrl-C" in s for s in seen):
            assert time.time() < deadline and proc.poll() is None, (seen, (tmp_path / "child.log").read_text()[-3000:])
            try:
                line = out.get(timeout=5)
            except queue.Empty:
                continue
            assert line is not None, (seen, (tmp_path / "child.log").read_text()[-3000:])
            seen.append(line)
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=30).json()["status"] == "ok"
        family = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
        assert family, "the child started no Ray processes"
        t0 = time.time()
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal: the whole foreground process group
        rc = proc.wait(timeout=120)
        stopped = time.time() - t0
        assert rc == 130, (rc, (tmp_path / "child.log").read_text()[-3000:])
        deadline = time.time() + 60
        while _alive(family) and time.time() < deadline:
            time.sleep(1)
        left = [psutil.Process(p).cmdline()[:3] for p in _alive(family)]
        assert not left, f"processes left after Ctrl-C: {left}"
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
        print(f"Ctrl-C: exit 130 after {stopped:.1f}s, {len(family)} Ray processes gone")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        for pid in _alive(family):
            os.kill(pid, signal.SIGKILL)
        err.close()
