"""The Serve application's reloads on the small trained store of the ``trained_store`` fixture: the
replica's model swap under concurrent requests, and ``serve deploy serve_configs/local.yaml`` (then a
changed user_config under load) against a ``ray start --head`` cluster of its own. Also the helpers the other
Serve tests share (test_serve_unit.py: no Ray; test_serve_http.py: every endpoint over HTTP;
test_serve_demo.py: the quickstart demo and its Ctrl-C).

The CLI cluster is stopped by signalling the ``ray start --block`` process this test started (never ``ray
stop``, which would kill every Ray on the machine, the session's own ``local_ray`` included).
"""

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import yaml

from sidrec.cluster import apply_serve_plane

httpx = pytest.importorskip("httpx")

REPO = Path(__file__).resolve().parents[2]
API_KEY = "test-admin-key-123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def catalog(root: str) -> tuple[dict[str, str], dict[str, str]]:
    """(item_id -> title, item_id -> SID) of the store."""
    from sidrec.store import ArtifactStore

    store = ArtifactStore(root)
    return store.titles(), store.sid_map()


# ============================================================== reload: the swap itself, no HTTP
@pytest.mark.slow
def test_reconfigure_swaps_the_model_without_failing_requests(trained_store, tmp_path):
    """reconfigure() with a new user_config under concurrent requests: every request is answered, the
    model object is swapped, added items survive (the new model replays the store's catalog log),
    settings-only changes do not reload, and a failed reload keeps the old model serving. (@serve.batch
    needs a replica, so batches go to ``run_batch``, the body each batch call runs.)"""
    import torch

    from sidrec.config import ConfigError
    from sidrec.serve.deployment import RecommenderDeployment

    root = str(tmp_path / "store")  # a copy: the admin write goes to the store's catalog log
    shutil.copytree(trained_store[1], root)
    threads = torch.get_num_threads()
    base = {"store_root": root, "num_beams": 10, "max_batch_size": 4, "torch_threads": threads,
            "api_key": "deploy-test-key"}
    req = {"history": ["1", "2"], "profile": None, "k": 5, "exclude_history": True}

    async def main():
        d = RecommenderDeployment.func_or_class()
        with pytest.raises(ConfigError, match="user_config.num_beams must be <= 512"):
            await d.reconfigure({**base, "num_beams": 1000})
        assert d.recommender is None and d.health()["status"] == "loading"
        await d.reconfigure(base)
        first = d.recommender
        item = {"item_id": "kept-1", "title": "A New Film (2030)", "categories": "Drama"}
        assert (await d.add_items([item]))["status"] == 401  # the admin key is required
        added = await d.add_items([item], api_key="deploy-test-key")
        assert added["items"][0]["item_id"] == "kept-1"

        async def client(n: int) -> list[dict]:
            return [o for _ in range(n) for o in await d.run_batch("recommend", [dict(req)] * 2)]

        tasks = [asyncio.create_task(client(5)) for _ in range(3)]
        await asyncio.sleep(0.3)
        await d.reconfigure({**base, "reload_token": 1})          # same store, forced reload
        out = [o for t in await asyncio.gather(*tasks) for o in t]
        assert len(out) == 30 and all("items" in o and len(o["items"]) == 5 for o in out), out
        assert d.recommender is not first and d.health()["loads"] == 2
        item = await d.item("kept-1")
        assert item["source"] == "added" and item["sid"] == added["items"][0]["sid"]
        assert d.health()["catalog_version"] == 1
        await d.reconfigure({**base, "reload_token": 1, "max_batch_size": 2})   # batching only
        assert d.health()["loads"] == 2 and d.health()["max_batch_size"] == 2
        current = d.recommender
        await d.reconfigure({**base, "store_root": "/nonexistent/sidrec-store"})  # bad: keeps serving
        assert d.recommender is current and "no trained model" in d.health()["reload_error"]
        assert not os.path.exists("/nonexistent/sidrec-store")
        ok, bad = await d.run_batch("recommend", [dict(req), {**req, "k": 11}])
        assert "items" in ok and bad["error"]["error"] == "k_out_of_range"
        [found] = await d.run_batch("search", [{"title": "A New Film (2030)", "k": 10}])
        assert len(found["items"]) == 10
        await d.stop_polling()

    asyncio.run(main())
    torch.set_num_threads(threads)


# ========================================================= `serve deploy` of local.yaml, CLI cluster
@contextlib.contextmanager
def _ray_head(tmp: str, env: dict):
    """`ray start --head --block` on free ports, in its own process group; stopped by signalling it."""
    low = 20000 + (os.getpid() * 37) % 20000  # the worker ports: low .. low + 200

    def outside_worker_ports() -> int:  # a free port Ray would refuse if it fell in the worker range
        while low <= (port := free_port()) <= low + 200:
            pass
        return port

    ports = {k: outside_worker_ports() for k in ("port", "dashboard-port", "ray-client-server-port",
                                                 "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                 "metrics-export-port", "runtime-env-agent-port",
                                                 "node-manager-port", "object-manager-port")}
    cmd = [*_cli("ray", "from ray.scripts.scripts import main; main()"), "start", "--head", "--block", "--num-cpus", "2", "--node-ip-address", "127.0.0.1",
           "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--disable-usage-stats",
           "--temp-dir", tmp, "--min-worker-port", str(low), "--max-worker-port", str(low + 200),
           *[a for k, v in ports.items() for a in (f"--{k}", str(v))]]
    log = open(os.path.join(tmp, "ray_start.log"), "wb")  # noqa: SIM115
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        dash = f"http://127.0.0.1:{ports['dashboard-port']}"
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, Path(log.name).read_text()[-3000:]
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{dash}/api/version", timeout=5).status_code == 200:
                    break
            assert time.time() < deadline, "dashboard did not come up in 120 s"
            time.sleep(1)
        yield dash
    finally:
        proc.send_signal(signal.SIGTERM)  # ray start --block: drains and kills the processes it started
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _wait_ok(url: str, body: dict, timeout_s: float) -> dict:
    deadline, last = time.time() + timeout_s, None
    while time.time() < deadline:
        try:
            r = httpx.post(url, json=body, timeout=30)
            if r.status_code == 200:
                return r.json()
            last = f"{r.status_code} {r.text[:300]}"
        except httpx.HTTPError as e:
            last = repr(e)
        time.sleep(2)
    raise AssertionError(f"{url} not answering 200 after {timeout_s}s: {last}")


@pytest.mark.slow
def test_serve_deploy_local_yaml_and_reload_under_load(trained_store, tmp_path):
    """`serve deploy` of serve_configs/local.yaml (store_root and port replaced) on a `ray start --head`
    cluster of its own; then `serve deploy` of a changed user_config (reload_token) while 4 clients keep
    sending requests: the replica reconfigures in place (same replica, second load) and none fails."""
    _, root = trained_store
    port = free_port()
    cfg = yaml.safe_load((REPO / "serve_configs" / "local.yaml").read_text())
    cfg["http_options"]["port"] = port
    rec = next(d for d in cfg["applications"][0]["deployments"] if d["name"] == "Recommender")
    rec["user_config"]["store_root"] = root
    conf = tmp_path / "local.yaml"
    conf.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS") and k != "SIDREC_API_KEY"}
    env.update(RAY_AUTH_MODE="disabled", RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0", PYTHONUNBUFFERED="1")
    apply_serve_plane("throughput", env)  # as the README starts a cluster: HAProxy on the port, direct ingress
    serve_cli = _cli("serve", "from ray.serve.scripts import cli; cli()")
    tmp = tempfile.mkdtemp(prefix="rs", dir="/tmp")  # short: Ray's socket paths have a length limit
    t0 = time.perf_counter()
    with _ray_head(tmp, env) as dash:
        t_cluster = time.perf_counter() - t0
        subprocess.run([*serve_cli, "deploy", str(conf), "--address", dash], env=env, check=True, timeout=120,
                       capture_output=True)
        url = f"http://127.0.0.1:{port}"
        body = _wait_ok(f"{url}/v1/recommend", {"history": ["1", "2"], "k": 5}, 240)
        t_ready = time.perf_counter() - t0
        assert len(body["items"]) == 5
        # the shipped YAML sets no admin key: the admin endpoint is locked for every client, key or not
        new = {"items": [{"item_id": "new-1", "title": "A new film (2031)"}]}
        for headers in ({}, {"X-API-Key": "guessed-key-123"}):
            r = httpx.post(f"{url}/v1/items", json=new, headers=headers, timeout=30)
            assert r.status_code == 403 and r.json()["error"] == "admin_disabled", r.text
        assert httpx.get(f"{url}/v1/items/new-1", timeout=30).status_code == 404
        # bound to loopback only, as the YAML says: HAProxy's port and the ingress replica's own
        ip = _outward_ip()
        replica_port = _ingress_replica_port()
        if ip and not ip.startswith("127."):
            for p in (port, replica_port):
                with pytest.raises(httpx.ConnectError):
                    httpx.get(f"http://{ip}:{p}/healthz", timeout=5)
        before = httpx.get(f"{url}/healthz", timeout=30).json()
        assert before["loads"] == 1

        codes: list[int] = []
        stop = threading.Event()

        def load(n: int) -> None:
            with httpx.Client(base_url=url, timeout=120) as c:
                while not stop.is_set():
                    codes.append(c.post("/v1/recommend", json={"history": [str(n + 1)], "k": 5}).status_code)

        clients = [threading.Thread(target=load, args=(n,)) for n in range(4)]
        for t in clients:
            t.start()
        try:
            time.sleep(2)
            rec["user_config"]["reload_token"] = 1
            conf.write_text(yaml.safe_dump(cfg))
            subprocess.run([*serve_cli, "deploy", str(conf), "--address", dash], env=env, check=True,
                           timeout=120, capture_output=True)
            deadline = time.time() + 120
            while httpx.get(f"{url}/healthz", timeout=30).json()["loads"] < 2:
                assert time.time() < deadline, "the replica did not reload"
                time.sleep(1)
            time.sleep(2)
        finally:
            stop.set()
            for t in clients:
                t.join(timeout=120)
        after = httpx.get(f"{url}/healthz", timeout=30).json()
        assert after["replica"] == before["replica"]          # reconfigured in place, not replaced
        assert len(codes) >= 4 and set(codes) == {200}, codes
        print(f"serve deploy: cluster up {t_cluster:.0f}s, app answering {t_ready:.0f}s after start; "
              f"{len(codes)} requests during the reload, all 200")


def _ingress_replica_port() -> int:
    """The HTTP port the Ingress replica itself listens on (direct ingress, behind HAProxy)."""
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        if "ServeReplica:sidrec:Ingress" in " ".join(proc.info["cmdline"] or []):
            ports = sorted(c.laddr.port for c in proc.net_connections("tcp") if c.status == psutil.CONN_LISTEN)
            http = [p for p in ports if 30000 <= p < 31000]  # Serve's direct-ingress HTTP range
            assert http, f"the Ingress replica listens on {ports}"
            return http[0]
    raise AssertionError("no Ingress replica process")


def _cli(name: str, code: str) -> list[str]:
    """The console script of this Python's environment (or the same entry point through -c)."""
    exe = Path(sys.executable).with_name(name)
    return [str(exe)] if exe.exists() else [sys.executable, "-c", code]


def _outward_ip() -> str | None:
    """This machine's address on its default route (not loopback), if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET: nothing is sent for a UDP connect
            return s.getsockname()[0]
        except OSError:
            return None
