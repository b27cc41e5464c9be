"""`sidrec items add|update|retire` on a copy of the small trained store: the same writer as the Serve
admin API (changes land in the store's log, a fresh model replays them), exit 2 naming the problem on bad
input, and nothing written then."""


import pytest

from sidrec.catalog.log import CatalogLog
from sidrec.catalog.session import open_catalog
from sidrec.cli import main

pytestmark = pytest.mark.slow




def items(root, *args):
    return main(["items", *args, "--config", "quickstart", f"store.root={root}"])


def test_add_update_retire_through_the_log(root, tmp_path, capsys):
    new = tmp_path / "new.jsonl"
    new.write_text('{"item_id": "c1", "title": "Cli Film (2032)", "categories": ["Drama"]}\n'
                   '{"item_id": "c2", "title": "Another Film (2032)", "categories": "Comedy"}\n')
    assert items(root, "add", str(new)) == 0
    out = capsys.readouterr().out
    assert "added     c1" in out and "2 added; catalog version 1" in out
    upd = tmp_path / "upd.csv"
    upd.write_text("item_id,title,categories\n2,GoldenEye Redux: a submarine drama,Drama\nc1,Cli Film (2032),Drama\n")
    before = open_catalog(root).catalog.sid_of["2"]
    assert items(root, "update", str(upd)) == 0
    out = capsys.readouterr().out
    assert "updated   2" in out and "unchanged c1" in out and "catalog version 2" in out
    ids = tmp_path / "ids.txt"
    ids.write_text("c2\n3\n")
    assert items(root, "retire", str(ids)) == 0 and "2 retired; catalog version 3" in capsys.readouterr().out
    # re-running is harmless: c1 is unchanged, the retired c2 is added back (an explicit add), and a
    # second retire of retired items writes nothing
    assert items(root, "add", str(new)) == 0
    assert "1 added, 1 unchanged; catalog version 4" in capsys.readouterr().out
    assert items(root, "update", str(upd)) == 0 and "2 unchanged; catalog version 4" in capsys.readouterr().out
    ids.write_text("3\n")
    assert items(root, "retire", str(ids)) == 0
    assert CatalogLog(root).head() == 4
    view = open_catalog(root)
    assert view.catalog.titles["2"] == "GoldenEye Redux: a submarine drama" and view.catalog.sid_of["2"] != before
    assert "3" not in view.catalog.sid_of and "c2" in view.catalog.sid_of and "c1" in view.catalog.sid_of
    assert [c.writer.split("@")[0] for c in CatalogLog(root).changes()] == ["cli"] * 4


@pytest.mark.parametrize("op, text, name, message", [
    ("update", '{"item_id": "no-such-item", "title": "x"}\n', "u.jsonl", "not in the catalog"),
    ("add", '{"item_id": "n1"}\n', "a.jsonl", "a.jsonl:1: item 'n1' has no title"),
    ("add", "item_id,title\nn1,\n", "a.csv", "a.csv:2: item 'n1' has no title"),
    ("add", '{"item_id": "n1", "title": "x"}\n{broken\n', "a.jsonl", "a.jsonl:2: not JSON"),
    ("add", '{"item_id": "1", "title": "Not Toy Story"}\n', "a.jsonl", "already in the catalog with other text"),
    ("add", '{"item_id": "n1", "title": "x"}\n{"item_id": "n1", "title": "y"}\n', "a.jsonl", "more than once"),
    ("retire", "1\nnot-an-item\n", "r.txt", "not in the catalog: ['not-an-item']"),
    ("add", None, "missing.jsonl", "missing.jsonl: no such file"),
])
def test_bad_input_exits_2_and_writes_nothing(root, tmp_path, capsys, op, text, name, message):
    f = tmp_path / name
    if text is not None:
        f.write_text(text)
    assert items(root, op, str(f)) == 2
    err = capsys.readouterr().err
    assert message in err and "nothing was written" in err, err
    assert CatalogLog(root).head() == 0


def test_items_needs_a_subcommand_and_a_file(capsys):
    with pytest.raises(SystemExit) as e:
        main(["items", "add", "--config", "quickstart"])
    assert e.value.code == 2 and "FILE" in capsys.readouterr().err
