"""The live catalog on a copy of the small trained store (``trained_store``): writes through the store's
change log, replayed in order by a fresh model, updates that change SIDs, idempotent re-sends, retires
that hold under the ``keep`` policy, concurrent writers, and entries made under other stage versions."""

import threading

import numpy as np
import pyarrow as pa
import pytest

from sidrec.catalog.encoder import NewItem
from sidrec.catalog.log import CatalogLog, Change, Entry
from sidrec.catalog.session import load_recommender, open_catalog
from sidrec.catalog.state import CatalogState, apply_change, encode_embedding
from sidrec.catalog.writer import CatalogError
from sidrec.recommender import Recommender
from sidrec.sids.tokens import parse_sid, render_sid
from sidrec.store import ArtifactStore

pytestmark = pytest.mark.slow




def only_candidates(rec: Recommender, keep: list[str]) -> list[str]:
    """A history of every present item but ``keep``: with exclude_history, ``keep`` is all that is left."""
    kept = set(keep)
    return [i for i in rec.sid_of if i not in kept]


def distinct_first(rec: Recommender, avoid: set[str], n: int, skip: set[str] = frozenset()) -> list[str]:
    """``n`` present items whose SIDs start with first codes not in ``avoid`` (and not each other's)."""
    out, seen = [], set(avoid)
    for item, sid in rec.sid_of.items():
        first = sid.split(">")[0]
        if first not in seen and item not in skip:
            out.append(item)
            seen.add(first)
        if len(out) == n:
            break
    return out


def recommendable(rec: Recommender, item: str) -> bool:
    """True when a constrained search returns ``item`` once every other branch but 19 is excluded."""
    others = distinct_first(rec, {rec.sid_of[item].split(">")[0]}, rec.decoder.num_beams - 1, {item})
    keep = [item, *others]
    got = rec.top_items([only_candidates(rec, keep)], k=len(keep), exclude_history=True)[0]
    assert set(got) <= set(keep)
    return item in got


def test_changes_are_versioned_replayed_in_order_and_survive_a_restart(root):
    rec, s = load_recommender(root, num_beams=20)
    w, cat, st = s.writer, rec.catalog, s.state
    r1 = w.upsert(cat, st, [NewItem("new-1", "Toy Story 5 (2031)", categories=["Animation", "Comedy"]),
                            NewItem("new-2", "A Quiet Film (2031)", categories="Drama")])
    assert r1.version == 1 and [i.action for i in r1.items] == ["added", "added"]
    old2 = rec.sid_of["2"]
    r2 = w.upsert(cat, st, [NewItem("2", "GoldenEye: a very different space opera", categories="Sci-Fi")])
    r3 = w.retire(cat, st, ["new-2", "3", "nope"])
    assert (r2.version, r3.version) == (2, 3)
    assert r3.retired == ["new-2", "3"] and r3.unknown == ["nope"]
    assert [c.version for c in CatalogLog(root).changes()] == [1, 2, 3]
    assert recommendable(rec, "new-1") and "new-2" not in rec.sid_of and "3" not in rec.titles
    assert rec.titles["2"] == "GoldenEye: a very different space opera"
    # a restart: a new model from the store replays the log to the same catalog and the same answers
    rec2, s2 = load_recommender(root, num_beams=20)
    assert s2.state.applied == 3 and rec2.sid_of == rec.sid_of and rec2.titles == rec.titles
    assert set(rec2.catalog.retired) == {"new-2", "3"} and rec2.sid_of["2"] == rec.sid_of["2"]
    assert recommendable(rec2, "new-1") and recommendable(rec2, "2")
    # the logged text embeddings come back with the items: what the content-ranked new-item places read
    e1 = s.encoder.embed([NewItem("new-1", "Toy Story 5 (2031)", categories=["Animation", "Comedy"])])[0]
    assert np.allclose(rec2.catalog.embeddings["new-1"], e1 / np.linalg.norm(e1), atol=1e-5)
    assert np.allclose(rec2.catalog.embeddings["2"], rec.catalog.embeddings["2"])  # the update's, not the old
    assert not np.allclose(rec2.catalog.embeddings["2"], open_catalog_embedding(root, "2"), atol=1e-3)
    reserved = rec2.top_items([["1", "50"]], k=10, new_item_slots=1)[0]
    assert {"new-1", "2"} & set(reserved)
    history = ["1", "50", "3"]  # a retired item may stay in a history: the model still reads its SID
    assert rec2.top_items([history], k=10) == rec.top_items([history], k=10)
    assert not {"3", "new-2"} & set(rec2.top_items([history], k=20, exclude_history=False)[0])
    # the model-free view the CLI uses reaches the same state
    view = open_catalog(root)
    assert view.state.applied == 3 and view.catalog.sid_of == rec.sid_of
    assert s2.state.items["2"].action == "updated" and s2.state.items["new-1"].action == "added"
    print(f"item 2: {old2} -> {rec.sid_of['2']}")


def test_update_gets_a_new_sid_unless_the_text_quantizes_the_same_and_resends_are_unchanged(root):
    rec, s = load_recommender(root, num_beams=20)
    w, cat, st, enc = s.writer, rec.catalog, s.state, s.encoder
    levels_q = enc.quantizer.config.levels
    new = NewItem("1", "Heat: a crime thriller of bank robbers and detectives in Los Angeles",
                  categories="Crime > Thriller")
    raw = enc.candidates(enc.embed([new]), rec.catalog.tokens[:levels_q] >= 0)[0][0]
    before = rec.sid_of["1"]
    r = w.upsert(cat, st, [new])
    [item] = r.items
    assert item.action == "updated" and r.version == 1
    old = parse_sid(before)
    assert (item.sid != before) == (tuple(raw) != tuple(old[:levels_q]))  # new text -> new SID (same codes: kept)
    assert item.sid != before, "this text should move item 1 to another SID"
    assert rec.index.items_of(cat.codes_of("1")) == ["1"]       # the old row is retired, the new one present
    assert not rec.index.contains(np.asarray(old)) and recommendable(rec, "1")
    # idempotent: the same text again writes nothing; so does the published text of an unchanged item
    again = w.upsert(cat, st, [new, NewItem("5", rec.titles["5"], categories=published_categories(root, "5"))])
    assert [i.action for i in again.items] == ["unchanged", "unchanged"] and again.version == 1
    assert CatalogLog(root).head() == 1
    # an update that only retitles keeps nothing stale: title and SID come from the new text
    retitle = w.upsert(cat, st, [NewItem("1", new.title + " (director's cut)", categories="Crime > Thriller")])
    assert retitle.items[0].action == "updated" and rec.titles["1"].endswith("(director's cut)")


def open_catalog_embedding(root: str, item: str) -> np.ndarray:
    """The ``embeddings`` stage's (unit) vector of a published item."""
    from sidrec.recommender import text_embeddings

    return text_embeddings(ArtifactStore(root), {item})[item]


def published_categories(root: str, item: str) -> str:
    store = ArtifactStore(root)
    rows = store.read_table(f"{store.current_path('dataset')}/catalog.parquet").to_pylist()
    return next(r["categories"] for r in rows if r["item_id"] == item)


def test_write_modes_refuse_bad_requests_and_write_nothing(root):
    s = open_catalog(root)
    w, cat, st = s.writer, s.catalog, s.state
    cases = [
        (dict(items=[NewItem("a", "x"), NewItem("a", "y")]), "duplicate_items"),
        (dict(items=[NewItem("a", "  ")]), "missing_title"),
        (dict(items=[NewItem("nope", "x")], mode="update"), "unknown_items"),
        (dict(items=[NewItem("1", "Other text")], mode="add"), "items_exist"),
    ]
    for kw, code in cases:
        with pytest.raises(CatalogError) as e:
            w.upsert(cat, st, **kw)
        assert e.value.code == code, kw
    with pytest.raises(CatalogError) as e:
        w.retire(cat, st, ["1", "nope"], strict=True)
    assert e.value.code == "unknown_items" and e.value.items == ["nope"]
    assert CatalogLog(root).head() == 0 and "1" in cat.sid_of


def test_retired_items_never_come_back_under_the_keep_policy(root):
    """One SID naming three items (what ``collision: keep`` stores): retiring them one by one drops each
    from the SID's items, and the SID itself once all are gone; through the log path every replica takes."""
    base = Recommender.from_store(root, num_beams=20)
    table = ArtifactStore(root).sid_table()
    ids = table["item_id"].to_pylist()
    codes = table["codes"].to_pylist()
    a, b, c = "10", "11", "12"
    shared = codes[ids.index(a)]
    for x in (b, c):
        codes[ids.index(x)] = shared
    keep_table = pa.table({"item_id": ids, "codes": pa.array(codes, pa.list_(pa.int64())),
                           "sid": [render_sid(x) for x in codes]})
    rec = Recommender(base.model, base.tokenizer, keep_table, dict(base.titles), base.icfg, base.max_length,
                      num_beams=20, model_version=base.model_version)
    sid = rec.sid_of[a]
    assert rec.sid_of[b] == rec.sid_of[c] == sid and sorted(rec.index.items_of(shared)) == [a, b, c]
    others = distinct_first(rec, {sid.split(">")[0]}, 17, {a, b, c})
    keep = [a, b, c, *others]
    history = only_candidates(rec, keep)

    def hits():
        return {h.sid: h.items for h in rec.recommend([history], k=20, exclude_history=True)[0]}

    assert sorted(hits()[sid]) == [a, b, c]
    state = CatalogState()
    encoder = open_catalog(root).encoder
    for version, gone in enumerate((a, b), start=1):
        apply_change(rec.catalog, state, encoder, Change(version, [Entry("retire", gone)]))
        assert gone not in {i for items in hits().values() for i in items}
    assert hits()[sid] == [c]
    apply_change(rec.catalog, state, encoder, Change(3, [Entry("retire", c)]))
    got = hits()
    assert sid not in got and not {a, b, c} & {i for items in got.values() for i in items}
    assert not rec.index.contains(np.asarray(shared)) and rec.index.items_of(shared) == []
    assert set(others) <= {i for items in got.values() for i in items}   # the rest of the trie is intact
    # free decoding may still spell the SID: it comes back as not a real item
    assert all(h.items == [] for h in rec.decoder.search([rec.prompt_ids(history[:5])], k=20, constrained=False)[0]
               if h.sid == sid)
    assert rec.top_items([[a, b, "1"]], k=10)   # retired items in a history are still understood


def test_two_writers_on_one_store_serialize_and_never_share_a_sid(root):
    """Two sessions (two replicas) add items with the same text at the same time: every write gets its
    own version, and under dedup every item its own SID, although all quantize to the same codes."""
    a, b = open_catalog(root, writer="A"), open_catalog(root, writer="B")
    errors = []

    def write(s, name):
        try:
            for k in range(6):
                s.writer.upsert(s.catalog, s.state, [NewItem(f"{name}{k}", "The Same New Film (2033)",
                                                             categories="Drama")])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(s, n)) for s, n in ((a, "a"), (b, "b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors
    a.catch_up()
    b.catch_up()
    assert a.state.applied == b.state.applied == CatalogLog(root).head() == 12
    assert a.catalog.sid_of == b.catalog.sid_of
    new_sids = [a.catalog.sid_of[f"{n}{k}"] for n in "ab" for k in range(6)]
    assert len(set(new_sids)) == 12
    assert len(set(a.catalog.sid_of.values())) == len(a.catalog.sid_of)   # dedup holds catalog-wide
    writers = {c.writer for c in CatalogLog(root).changes()}
    assert writers == {"A", "B"}


def test_entries_from_other_stage_versions_are_reencoded_the_same_everywhere(root):
    """A change made before the store was republished (its basis names other stage versions) is
    re-assigned from its stored embedding -- or its text, when the embeddings stage changed too -- the
    same way by every replica; its recorded codes are not trusted (here they are another item's SID)."""
    s = open_catalog(root)
    enc = s.encoder
    item = NewItem("old-1", "Alien: a space horror film", categories="Horror > Sci-Fi")
    emb = enc.embed([item])[0]
    stolen = list(s.catalog.codes_of("1"))
    basis = {"embeddings": enc.versions["embeddings"], "quantizer": "v-old", "sids": "v-old"}
    entries = [Entry("add", "old-1", item.row(), stolen, "", True, encode_embedding(emb)),
               Entry("add", "old-2", NewItem("old-2", "A romantic comedy in Paris").row(), stolen, "", True, "")]
    CatalogLog(root).append(Change(1, entries, basis, "before-republish"))
    CatalogLog(root).append(Change(2, entries[1:], {**basis, "embeddings": "v-old"}, "before-republish"))
    r1, r2 = open_catalog(root), open_catalog(root)
    for r in (r1, r2):
        assert r.state.applied == 2 and r.state.reencoded == 3
        assert r.catalog.sid_of["1"] == s.catalog.sid_of["1"]               # the real owner keeps its SID
        assert r.catalog.index.items_of(r.catalog.codes_of("old-1")) == ["old-1"]
        assert len(set(r.catalog.sid_of.values())) == len(r.catalog.sid_of)
    assert r1.catalog.sid_of["old-1"] == r2.catalog.sid_of["old-1"]
    assert r1.catalog.sid_of["old-2"] == r2.catalog.sid_of["old-2"]
    assert np.allclose(r1.catalog.embeddings["old-1"], emb / np.linalg.norm(emb), atol=1e-6)  # the logged one
    assert np.allclose(r1.catalog.embeddings["old-2"], r2.catalog.embeddings["old-2"])         # embedded here

