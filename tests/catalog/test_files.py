"""Change files of `sidrec items`: what is read, and the error (file:line, reason) for what is not."""

import pytest

from sidrec.catalog.files import CatalogFileError, read_ids, read_items


def test_jsonl_and_csv_items(tmp_path):
    j = tmp_path / "new.jsonl"
    j.write_text('{"item_id": 7, "title": "A", "categories": ["X", "Y"]}\n\n{"item_id": "b", "title": "B", '
                 '"brand": "Z", "description": "d"}\n')
    a, b = read_items(j)
    assert (a.item_id, a.title, a.row()["categories"]) == ("7", "A", "X > Y")
    assert b.row() == {"item_id": "b", "title": "B", "brand": "Z", "categories": "", "description": "d"}
    c = tmp_path / "new.csv"
    c.write_text("item_id,title,categories\n1,Toy Story,Animation > Comedy\n2,\"Heat, the film\",\n")
    got = read_items(c)
    assert [(i.item_id, i.title, i.row()["categories"]) for i in got] == [
        ("1", "Toy Story", "Animation > Comedy"), ("2", "Heat, the film", "")]


@pytest.mark.parametrize("text, suffix, message", [
    ('{"item_id": "a"}\n', ".jsonl", "new.jsonl:1: item 'a' has no title"),
    ('{"item_id": "a", "title": "  "}\n', ".jsonl", "has no title"),
    ('{"title": "x"}\n', ".jsonl", ":1: item_id must be a non-blank"),
    ('{"item_id": "a", "title": "x"}\n{"item_id": "b", "titel": "y"}\n', ".jsonl", ":2: unknown field(s) ['titel']"),
    ('{"item_id": "a", "title": "x"}\nnot json\n', ".jsonl", ":2: not JSON"),
    ('["a", "x"]\n', ".jsonl", "expected an object"),
    ('{"item_id": "a", "title": "x", "categories": 3}\n', ".jsonl", "categories must be"),
    ("", ".jsonl", "no items"),
    ("title\nx\n", ".csv", "needs a header row with an item_id column"),
    ("item_id,title\na,\n", ".csv", "new.csv:2: item 'a' has no title"),
])
def test_bad_item_files(tmp_path, text, suffix, message):
    f = tmp_path / f"new{suffix}"
    f.write_text(text)
    with pytest.raises(CatalogFileError) as e:
        read_items(f)
    assert message in str(e.value)


def test_id_files(tmp_path):
    (tmp_path / "a.txt").write_text("1\n 2 \n\nx-3\n")
    assert read_ids(tmp_path / "a.txt") == ["1", "2", "x-3"]
    (tmp_path / "a.jsonl").write_text('{"item_id": 5}\n"6"\n7\n')
    assert read_ids(tmp_path / "a.jsonl") == ["5", "6", "7"]
    (tmp_path / "a.csv").write_text("item_id,title\n8,x\n9,y\n")
    assert read_ids(tmp_path / "a.csv") == ["8", "9"]
    with pytest.raises(CatalogFileError, match="no such file"):
        read_ids(tmp_path / "missing.txt")
    (tmp_path / "e.txt").write_text("\n\n")
    with pytest.raises(CatalogFileError, match="no item ids"):
        read_ids(tmp_path / "e.txt")
    (tmp_path / "b.jsonl").write_text('{"id": 5}\n')
    with pytest.raises(CatalogFileError, match=":1: item_id must be"):
        read_ids(tmp_path / "b.jsonl")
