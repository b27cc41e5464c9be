"""``sidrec.cluster``: the Serve data plane of a local Ray is set through the environment its processes
inherit."""

import pytest

from sidrec.cluster import SERVE_PLANES, apply_serve_plane
from sidrec.config import ConfigError, load_config


def test_throughput_plane_sets_rays_switches_and_keeps_a_users_tuning(monkeypatch):
    import sidrec.cluster as cluster

    monkeypatch.setattr(cluster, "haproxy_available", lambda environ: True)
    env = {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "12", "RAY_SERVE_ENABLE_HA_PROXY": "0"}
    set_ = apply_serve_plane("throughput", env)
    assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1" and env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "12"  # the user's value wins
    assert set_ == env
    fresh: dict[str, str] = {}
    apply_serve_plane("throughput", fresh)
    assert fresh["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "3"


def test_proxy_plane_turns_the_switches_off():
    env = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}
    apply_serve_plane("proxy", env)
    assert env == SERVE_PLANES["proxy"] == {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "0", "RAY_SERVE_ENABLE_HA_PROXY": "0"}
    with pytest.raises(ValueError, match="ray.serve_plane"):
        apply_serve_plane("fast", {})


def test_config_option_is_validated_with_its_name():
    assert load_config("quickstart").ray.serve_plane == "throughput"
    assert load_config("quickstart", ["ray.serve_plane=proxy"]).ray.serve_plane == "proxy"
    with pytest.raises(ConfigError, match="ray.serve_plane"):
        load_config("quickstart", ["ray.serve_plane=fast"])


def test_throughput_plane_falls_back_to_the_proxy_without_haproxy(monkeypatch, caplog):
    import sidrec.cluster as cluster

    monkeypatch.setattr(cluster.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(cluster.shutil, "which", lambda name: None)
    env: dict[str, str] = {}
    assert not cluster.haproxy_available(env)
    apply_serve_plane("throughput", env)
    assert env == SERVE_PLANES["proxy"] and "HAProxy" in caplog.text
    env = {"RAY_SERVE_HAPROXY_BINARY_PATH": "/opt/haproxy"}
    apply_serve_plane("throughput", env)
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
