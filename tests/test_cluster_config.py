"""cluster.yaml, checked offline by the code `ray up` itself runs on it.

`ray up` calls `ray.autoscaler._private.commands._bootstrap_config`, which does the following:
  prepare_config(config)          merge the AWS defaults.yaml, merge setup commands, fill min/max workers
  fillout_..._resources(config)   ask EC2 about instance types (needs AWS; skipped here, as cluster.yaml
                                  lists the GPU workers' resources itself)
  validate_config(config)         jsonschema against ray/autoscaler/ray-schema.json, plus cross-field checks
The tests run the offline steps from the installed Ray, check the raw file against the same schema, parse the
`ray start` lines with Ray's own CLI, and check the facts the sidrec GPU configs depend on.
"""

import copy
import json
import re
import shlex
import subprocess
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
RAY_SCHEMA = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
CONFIGS = ROOT / "platform" / "sidrec" / "configs"
GPU_CONFIGS = ["qwen2.5-0.5b-gpu", "qwen2.5-1.5b-gpu"]


def raw_config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def ray_validate(config: dict) -> dict:
    """What `ray up` does offline: schema-check the file, prepare it, validate the prepared config."""
    jsonschema.validate(config, json.loads(RAY_SCHEMA.read_text()))
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.fixture(scope="module")
def cfg() -> dict:
    """The config as `ray up` uses it, after Ray's defaults are merged in."""
    return ray_validate(raw_config())


def sidrec_config(name: str) -> dict:
    """A shipped sidrec config, read as YAML (importing sidrec.config pulls in torch: too slow here)."""
    return yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())


def head(cfg: dict) -> dict:
    return cfg["available_node_types"][cfg["head_node_type"]]


def gpu_workers(cfg: dict) -> dict:
    return {name: t for name, t in cfg["available_node_types"].items()
            if name != cfg["head_node_type"] and t.get("resources", {}).get("GPU", 0) >= 1}


def all_commands(cfg: dict) -> list[str]:
    keys = ["initialization_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands"]
    return [c for k in keys for c in cfg[k]]


def test_ray_accepts_cluster_yaml(cfg):
    assert cfg["cluster_name"] == "sidrec"
    assert cfg["provider"]["type"] == "aws" and cfg["provider"]["region"]
    assert not cfg.get("docker", {}).get("image"), "kept simple: no docker"


def test_head_schedules_no_gpu_work(cfg):
    h = head(cfg)
    assert h["resources"].get("GPU", 0) == 0
    assert h["max_workers"] == 0  # filled in by Ray: head type is never a worker
    assert not re.match(r"(g|p)\d", h["node_config"]["InstanceType"]), "head is a CPU instance"
    # The autoscaler on the head starts the GPU workers through boto3, which ray[default] lacks.
    assert any(re.search(r"\bpip install\b.*\bboto3\b", c) for c in cfg["head_setup_commands"])


def test_gpu_worker_group_autoscales(cfg):
    workers = gpu_workers(cfg)
    assert len(workers) == 1, "one GPU worker group"
    (w,) = workers.values()
    assert w["min_workers"] == 0 < w["max_workers"] <= cfg["max_workers"]
    assert w["resources"]["CPU"] >= 1
    assert re.match(r"(g|p)\d", w["node_config"]["InstanceType"]), "GPU instance family"
    assert cfg["idle_timeout_minutes"] > 0


@pytest.mark.parametrize("name", GPU_CONFIGS)
def test_shipped_gpu_configs_fit_the_cluster(cfg, name):
    """A Ray Train worker (cpus_per_worker CPUs + 1 GPU) fits one node; all workers fit max_workers."""
    (w,) = gpu_workers(cfg).values()
    train, embed = sidrec_config(name)["train"], sidrec_config(name)["embed"]
    assert train["use_gpu"]
    per_node = min(w["resources"]["GPU"], w["resources"]["CPU"] // train["cpus_per_worker"])
    assert per_node >= 1
    assert train["num_workers"] <= per_node * w["max_workers"]
    assert embed["num_actors"] * embed["gpus_per_actor"] <= w["resources"]["GPU"] * w["max_workers"]


def test_file_mounts_sync_the_repo_and_setup_installs_it(cfg):
    mounts = {remote: (ROOT / local).resolve() for remote, local in cfg["file_mounts"].items()
              if not local.startswith("~")}
    repo_remote = [remote for remote, local in mounts.items() if local == ROOT]
    assert repo_remote, f"no file_mount syncs the repo root: {cfg['file_mounts']}"
    assert (ROOT / "pyproject.toml").is_file()
    install = re.compile(rf"\bpip install\b.*\s-e\s+{re.escape(repo_remote[0])}(\s|$)")
    # Ray merges setup_commands into both lists; every node type must install the project and torch.
    for key in ("head_setup_commands", "worker_setup_commands"):
        cmds = cfg[key]
        assert any(install.search(c) for c in cmds), f"{key} do not `pip install -e {repo_remote[0]}`"
        assert any(re.search(r"\bpip install\b.*\btorch\b", c) for c in cmds), f"{key} install no torch"
    # GPU nodes get the default (CUDA) torch build, not the CPU wheel index.
    assert not any("whl/cpu" in c for c in cfg["worker_setup_commands"])


def test_cluster_ray_matches_installed_ray(cfg):
    pins = {m for c in cfg["worker_setup_commands"] for m in re.findall(r"ray\[[^\]]*\]==([\w.*]+)", c)}
    assert pins == {ray.__version__}, "`ray up` needs the same Ray on the cluster as locally"


def test_artifact_store_uri_is_shared(cfg):
    found = {m for c in cfg["initialization_commands"] for m in re.findall(r"SIDREC_STORE=(\S+?)'?(?:\s|$)", c)}
    assert len(found) == 1, f"SIDREC_STORE set once, got {found}"
    (uri,) = found
    scheme = re.match(r"^(s3|gs)://[^/]+", uri)
    assert scheme, f"not a shared object-store URI: {uri}"
    # The shipped GPU configs point store.root at the same kind of store (a local path would split per node).
    for name in GPU_CONFIGS:
        assert sidrec_config(name)["store"]["root"].startswith(f"{scheme.group(1)}://"), name


def test_token_auth_stays_on(cfg):
    assert "RAY_AUTH_MODE=disabled" not in CLUSTER_YAML.read_text()
    assert "~/.ray/auth_token" in cfg["file_mounts"], "every node gets the local auth token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in cfg[key] if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token" in c for c in start), key


def ray_start_args(cmd: str) -> list[str]:
    """Arguments of the `ray start` in a shell line like `ulimit ...; VAR=x ray start --head ...`."""
    (segment,) = [s for s in cmd.split(";") if "ray start" in s]
    words = shlex.split(segment)
    i = words.index("ray")
    assert words[i + 1] == "start"
    return words[i + 2:]


def test_start_commands_parse_with_ray_cli(cfg):
    from ray.scripts.scripts import start

    head_args = ray_start_args(next(c for c in cfg["head_start_ray_commands"] if "ray start" in c))
    ctx = start.make_context("start", head_args)
    assert ctx.params["head"] and ctx.params["autoscaling_config"] == "~/ray_bootstrap_config.yaml"
    worker_args = ray_start_args(next(c for c in cfg["worker_start_ray_commands"] if "ray start" in c))
    ctx = start.make_context("start", worker_args)
    assert not ctx.params["head"] and ctx.params["address"] == "$RAY_HEAD_IP:6379"


def test_commands_are_valid_bash(cfg):
    for cmd in all_commands(cfg):
        r = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
        assert r.returncode == 0, f"{cmd!r}: {r.stderr}"


def _set(path: str, value):
    def mutate(c: dict):
        *parents, last = path.split(".")
        for p in parents:
            c = c[p]
        c[last] = value
    return mutate


def _gpu(key: str, value):
    def mutate(c: dict):
        (name,) = gpu_workers(c)
        c["available_node_types"][name][key] = value
    return mutate


@pytest.mark.parametrize("mutate, error, match", [
    (_set("max_worker", 8), jsonschema.ValidationError, "Additional properties"),
    (_set("idle_timeout_minutes", "ten"), jsonschema.ValidationError, "not of type"),
    (_set("setup_commands", "pip install -e ~/sidrec"), jsonschema.ValidationError, "not of type"),
    (_gpu("resources", {"CPU": 8, "GPU": 0.5}), jsonschema.ValidationError, "not of type"),
    (_gpu("instance_type", "g5.2xlarge"), jsonschema.ValidationError, "Additional properties"),
    (_set("provider.type", 1), jsonschema.ValidationError, "not of type"),
    (_set("head_node_type", "ray.head.missing"), ValueError, "must be one of"),
    (_gpu("min_workers", 9), ValueError, "smaller than the sum of `min_workers`"),
], ids=["typo-key", "timeout-str", "commands-str", "fractional-gpu", "node-type-extra-key", "provider-type-int",
        "missing-head-type", "min-over-max"])
def test_broken_copies_are_rejected(mutate, error, match):
    broken = raw_config()
    mutate(broken)
    with pytest.raises(error, match=match):
        ray_validate(broken)
