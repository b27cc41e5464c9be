"""The whole SID build on a local Ray cluster over ml-100k with the real MiniLM encoder."""

import pyarrow.parquet as pq
import pytest

from sidrec.cli import main as cli_main
from sidrec.config import load_config
from sidrec.pipeline import run
from sidrec.sids.tokens import parse_sid
from sidrec.store import ArtifactStore
from tests.conftest import shared_data


@pytest.fixture(scope="module")
def ml_build(tmp_path_factory, local_ray):
    data = shared_data("ml-100k")
    root = tmp_path_factory.mktemp("store")
    cfg = load_config("ml-100k", [f"data.path={data}", f"store.root={root}"])
    return cfg, run(cfg, until="sids")


@pytest.mark.slow
def test_every_item_gets_a_unique_sid(ml_build):
    cfg, manifests = ml_build
    store = ArtifactStore(cfg.store.root)
    sids = pq.read_table(f"{store.current_path('sids')}/sids.parquet").to_pylist()
    assert len(sids) == 1682
    assert len({r["item_id"] for r in sids}) == 1682
    assert len({r["sid"] for r in sids}) == 1682  # dedup: one SID, one item
    for r in sids[:50]:
        assert parse_sid(r["sid"]) == r["codes"] and len(r["codes"]) == 4  # 3 levels + dedup level


@pytest.mark.slow
def test_report_numbers(ml_build):
    cfg, manifests = ml_build
    store = ArtifactStore(cfg.store.root)
    report = store.read_json(f"{store.current_path('sids')}/report.json")
    s = report["summary"]
    assert s["items"] == 1682 and s["levels"] == 3
    assert s["collision_share_after"] == 0.0 and s["unique_sids_after"] == 1682
    assert 0.0 < s["collision_share_before"] < 0.10
    # unit-norm 384-d inputs have per-element variance 1/384 ≈ 0.0026: the RQ-VAE must explain most of it
    assert s["reconstruction_mse"] < 0.0015
    assert all(used >= 150 for used in s["codes_used"]) and s["perplexity"][0] > 100
    cos = report["prefix_similarity"]["mean_cosine"]
    assert cos["0"] < cos["1"] < cos["2"]  # items sharing longer prefixes are more similar
    manifest = manifests["sids"]
    assert {"report.json", "report.md", "code_usage.png", "sids.parquet"} <= set(manifest["files"])
    assert (store.read_bytes(f"{store.current_path('sids')}/code_usage.png"))[:4] == b"\x89PNG"


@pytest.mark.slow
def test_rerun_skips_unchanged_stages_and_rebuilds_changed_ones(ml_build):
    cfg, first = ml_build
    again = run(cfg, until="sids")
    assert {k: m["version"] for k, m in again.items()} == {k: m["version"] for k, m in first.items()}
    cfg2 = load_config("ml-100k", [f"data.path={cfg.data.path}", f"store.root={cfg.store.root}",
                                   "sids.collision=keep"])
    changed = run(cfg2, until="sids")
    for stage in ("dataset", "embeddings", "quantizer"):
        assert changed[stage]["version"] == first[stage]["version"]
    assert changed["sids"]["version"] != first["sids"]["version"]
    assert changed["sids"]["metrics"]["collision_share_after"] == first["sids"]["metrics"]["collision_share_before"]


def test_cli_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["--help"])
    assert e.value.code == 0
    assert "sids" in capsys.readouterr().out


def test_cli_bad_input_exits_nonzero_with_message(tmp_path, capsys):
    assert cli_main(["sids", "build", "--config", "ml-100k", "embed.batch_size=0"]) == 2
    assert "embed.batch_size must be >= 1" in capsys.readouterr().err
    bad = tmp_path / "items.csv"
    bad.write_text("item_id,title\n1,A\n1,B\n")
    inter = tmp_path / "inter.csv"
    inter.write_text("user_id,item_id,timestamp\nu,1,1\n")
    code = cli_main(["sids", "build", "data.format=generic", f"data.catalog={bad}",
                     f"data.interactions={inter}", f"store.root={tmp_path / 'store'}"])
    assert code == 2
    assert "duplicate item_id" in capsys.readouterr().err
