"""The catalog change log on a real (empty) artifact store folder: versions, the HEAD hint, and writers in
several processes racing for the same versions (no model needed: the log is files)."""

import json
import multiprocessing as mp
import os

import pytest

from sidrec.catalog.log import CatalogLog, Change, Entry, VersionConflict
from sidrec.store import ArtifactStore


def _change(version: int, writer: str, n: int = 1) -> Change:
    return Change(version, [Entry("add", f"{writer}-{version}-{k}", {"title": "t"}, [1, 2], "<a_1><b_2>")
                            for k in range(n)], {"sids": "v-1"}, writer)


def test_versions_start_at_one_have_no_holes_and_round_trip(tmp_path):
    log = CatalogLog(str(tmp_path / "store"))
    assert log.head() == 0 and list(log.changes()) == []
    with pytest.raises(ValueError, match="no holes"):
        log.append(_change(2, "w"))
    with pytest.raises(ValueError, match="start at 1"):
        log.append(_change(0, "w"))
    for v in (1, 2, 3):
        log.append(_change(v, "w", n=v))
    assert log.head() == 3
    got = list(log.changes())
    assert [c.version for c in got] == [1, 2, 3] and [len(c.entries) for c in got] == [1, 2, 3]
    assert got[1].entries[0] == Entry("add", "w-2-0", {"title": "t"}, [1, 2], "<a_1><b_2>")
    assert got[2].basis == {"sids": "v-1"} and got[2].writer == "w" and got[2].created
    assert [c.version for c in log.changes(after=1, upto=2)] == [2]
    with pytest.raises(VersionConflict) as e:  # the version exists: never overwritten
        log.append(_change(3, "other"))
    assert e.value.version == 3 and log.read(3).writer == "w"
    assert not [f for f in os.listdir(log.changes_dir) if ".tmp-" in f]   # no temporaries left behind


def test_head_probes_past_a_stale_hint(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    log = CatalogLog(store)
    for v in (1, 2, 3, 4):
        log.append(_change(v, "w"))
    store.write_json(f"{log.dir}/HEAD.json", {"version": 1})      # a writer that updated HEAD late
    assert log.head() == 4
    store.write_json(f"{log.dir}/HEAD.json", {"version": 9})      # ahead of the files
    assert log.head() == 4
    os.remove(f"{log.dir}/HEAD.json")
    assert log.head() == 4 and log.head(at_least=2) == 4


def test_a_torn_or_foreign_file_is_an_error_not_a_silent_skip(tmp_path):
    log = CatalogLog(str(tmp_path / "store"))
    log.append(_change(1, "w"))
    with open(log.path(2), "w") as f:
        json.dump({"version": 7, "entries": []}, f)
    with pytest.raises(ValueError, match="holds version 7"):
        list(log.changes())
    with pytest.raises(ValueError, match="bad catalog entry"):
        Entry.from_json({"op": "delete", "item_id": "x"})


def _writer(root: str, name: str, n: int, q) -> None:
    """Append ``n`` changes, each at the head + 1, retrying on conflict (what CatalogWriter does)."""
    log = CatalogLog(root)
    conflicts = 0
    for k in range(n):
        while True:
            v = log.head() + 1
            try:
                log.append(Change(v, [Entry("retire", f"{name}-{k}")], {}, name))
                break
            except VersionConflict:
                conflicts += 1
    q.put((name, conflicts))


def test_concurrent_writers_in_processes_never_share_a_version(tmp_path):
    root = str(tmp_path / "store")
    ArtifactStore(root)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(root, f"w{i}", 30, q)) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    conflicts = dict(q.get(timeout=10) for _ in procs)
    log = CatalogLog(root)
    changes = list(log.changes())
    assert [c.version for c in changes] == list(range(1, 121))
    ids = [c.entries[0].item_id for c in changes]
    assert sorted(ids) == sorted(f"w{i}-{k}" for i in range(4) for k in range(30))   # each exactly once
    for i in range(4):  # each writer's own changes stay in its order
        mine = [int(x.split("-")[1]) for x in ids if x.startswith(f"w{i}-")]
        assert mine == sorted(mine)
    print(f"4 processes x 30 changes: {sum(conflicts.values())} version conflicts, all retried")
