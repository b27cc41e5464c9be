import json
import os

import pyarrow as pa
import pytest

from sidrec.store import MANIFEST, ArtifactStore, file_fingerprint, fingerprint


def test_publish_makes_version_current(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    assert store.manifest("catalog") is None
    run = store.begin("catalog")
    store.write_table(f"{run.path}/catalog.parquet", pa.table({"item_id": ["a", "b"]}))
    m = store.publish(run, fp="abc", config={"x": 1}, inputs={"f": "123"}, metrics={"items": 2})
    assert store.manifest("catalog") == m
    assert m["files"] == ["catalog.parquet"]
    assert {"ray", "pyarrow", "python"} <= set(m["libraries"])
    assert store.is_current("catalog", "abc") and not store.is_current("catalog", "other")
    assert store.read_table(f"{store.current_path('catalog')}/catalog.parquet").num_rows == 2


def test_unpublished_run_is_invisible_and_old_version_survives(tmp_path):
    store = ArtifactStore(str(tmp_path))
    run1 = store.begin("sids")
    store.write_json(f"{run1.path}/x.json", {"v": 1})
    store.publish(run1, fp="one", config={}, inputs={})
    run2 = store.begin("sids")  # a run that crashes before publishing
    store.write_json(f"{run2.path}/x.json", {"v": 2})
    assert store.current_path("sids").endswith(run1.version)
    assert store.read_json(f"{store.current_path('sids')}/x.json") == {"v": 1}
    # no temp files are left next to the manifest
    assert sorted(os.listdir(tmp_path / "sids")) == sorted([MANIFEST, run1.version, run2.version])


def test_prune_keeps_published(tmp_path):
    store = ArtifactStore(str(tmp_path))
    runs = [store.begin("s") for _ in range(3)]
    store.publish(runs[0], fp="a", config={}, inputs={})
    removed = store.prune("s", keep=1)
    assert runs[0].version not in removed
    assert set(removed) == {runs[1].version}


def test_require_names_missing_stage(tmp_path):
    with pytest.raises(FileNotFoundError, match="stage 'embeddings' has not been built"):
        ArtifactStore(str(tmp_path)).require("embeddings")


def test_fingerprints_are_content_based(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("hello")
    fp1 = file_fingerprint(str(tmp_path / "d"))
    (tmp_path / "d" / "a.txt").write_text("hellO")
    assert file_fingerprint(str(tmp_path / "d")) != fp1
    assert fingerprint({"a": 1, "b": 2}) == fingerprint({"b": 2, "a": 1})


def test_manifest_is_valid_json_after_publish(tmp_path):
    store = ArtifactStore(str(tmp_path))
    run = store.begin("x")
    store.publish(run, fp="f", config={"k": [1, 2]}, inputs={})
    assert json.loads((tmp_path / "x" / MANIFEST).read_text())["config"] == {"k": [1, 2]}
