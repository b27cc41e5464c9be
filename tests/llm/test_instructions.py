import collections
import re

import numpy as np
import pyarrow as pa
import pytest

from sidrec.config import ConfigError, InstructionConfig
from sidrec.llm.instructions import (
    TEMPLATES,
    build_instructions,
    history_separator,
    next_item_batch,
    next_item_templates,
    sequence_windows,
    template_corpus,
    user_sequences,
)

N_ITEMS = 40
SID_OF = {f"i{k}": f"<a_{k % 7}><b_{k % 5}><c_{k}>" for k in range(N_ITEMS)}
TITLES = {f"i{k}": f"Widget number {k}" for k in range(N_ITEMS)}
TITLES["i39"] = ""  # no title -> not used by alignment tasks
PROFILES = {"u0": "a 24-year-old male technician", "u1": "", "u2": "a 50-year-old female writer."}


def _examples(rows: list[tuple[str, list[str], str]]) -> pa.Table:
    return pa.table({
        "user_id": pa.array([r[0] for r in rows], pa.string()),
        "history": pa.array([r[1] for r in rows], pa.list_(pa.string())),
        "target": pa.array([r[2] for r in rows], pa.string()),
    })


def _splits() -> dict[str, pa.Table]:
    """Toy time split: each user's last item is test, second last valid, the rest train examples."""
    seqs = {f"u{u}": [f"i{(u * 3 + j) % 30}" for j in range(8)] for u in range(3)}
    seqs["u3"] = ["i30", "i31", "i32", "i33"]  # i32/i33 occur only as valid/test targets
    splits = {"train": [], "valid": [], "test": []}
    for u, seq in seqs.items():
        for t in range(1, len(seq) - 2):
            splits["train"].append((u, seq[:t], seq[t]))
        splits["valid"].append((u, seq[:-2], seq[-2]))
        splits["test"].append((u, seq[:-1], seq[-1]))
    return {k: _examples(v) for k, v in splits.items()}


def test_counts_per_task_follow_weights():
    train = _splits()["train"]
    n_items = N_ITEMS - 1  # i39 has no title
    cfg = InstructionConfig(train_rows="examples",
                            task_weights={"next_item": 1.0, "sid_to_title": 0.5, "title_to_sid": 2.5})
    table = build_instructions("train", train, SID_OF, TITLES, PROFILES, cfg)
    counts = collections.Counter(table.column("task").to_pylist())
    assert counts == {"next_item": train.num_rows, "sid_to_title": round(0.5 * n_items),
                      "title_to_sid": round(2.5 * n_items)}
    assert table.column_names == ["task", "prompt", "response", "user_id", "target_item"]
    # weight 2.5: every item 2 or 3 times
    per_item = collections.Counter(
        t for t, task in zip(table.column("target_item").to_pylist(), table.column("task").to_pylist(),
                             strict=True) if task == "title_to_sid")
    assert set(per_item.values()) == {2, 3} and len(per_item) == n_items
    # eval splits: next-item rows only
    valid = build_instructions("valid", _splits()["valid"], SID_OF, TITLES, PROFILES, cfg)
    assert set(valid.column("task").to_pylist()) == {"next_item"} and valid.num_rows == 4


def test_rows_contents():
    train = _splits()["train"]
    cfg = InstructionConfig(train_rows="examples")
    table = build_instructions("train", train, SID_OF, TITLES, PROFILES, cfg).to_pylist()
    nxt = [r for r in table if r["task"] == "next_item"]
    assert [r["target_item"] for r in nxt] == train.column("target").to_pylist()
    for r, hist in zip(nxt, train.column("history").to_pylist(), strict=True):
        assert r["response"] == SID_OF[r["target_item"]]
        assert history_separator(cfg).join(SID_OF[i] for i in hist) in r["prompt"]
    s2t = next(r for r in table if r["task"] == "sid_to_title")
    assert s2t["response"] == TITLES[s2t["target_item"]] and SID_OF[s2t["target_item"]] in s2t["prompt"]
    t2s = next(r for r in table if r["task"] == "title_to_sid")
    assert t2s["response"] == SID_OF[t2s["target_item"]] and f'"{TITLES[t2s["target_item"]]}"' in t2s["prompt"]
    assert s2t["user_id"] == "" and t2s["user_id"] == ""


def test_template_choice_is_seeded():
    train = _splits()["train"]
    a = build_instructions("train", train, SID_OF, TITLES, PROFILES, InstructionConfig(seed=1))
    b = build_instructions("train", train, SID_OF, TITLES, PROFILES, InstructionConfig(seed=1))
    c = build_instructions("train", train, SID_OF, TITLES, PROFILES, InstructionConfig(seed=2))
    assert a.equals(b)
    assert a.column("prompt").to_pylist() != c.column("prompt").to_pylist()
    assert a.column("response").to_pylist() == c.column("response").to_pylist()  # only wording changes
    # several paraphrases actually used
    templates = next_item_templates(InstructionConfig(seed=1))
    used = {next(k for k, t in enumerate(templates) if t.replace("{profile}", "").split("{history}")[0] in p)
            for p, task in zip(a.column("prompt").to_pylist(), a.column("task").to_pylist(), strict=True)
            if task == "next_item"}
    assert len(used) >= 3


def test_profile_sentence_and_history_cap():
    ex = _examples([("u0", [f"i{k}" for k in range(25)], "i25"), ("u1", ["i1"], "i2"), ("u2", ["i3"], "i4")])
    cfg = InstructionConfig(max_history=20)
    rows = build_instructions("test", ex, SID_OF, TITLES, PROFILES, cfg).to_pylist()
    assert rows[0]["prompt"].startswith("The user is a 24-year-old male technician. ")
    assert rows[0]["prompt"].count("The user is") == 1
    assert "The user is" not in rows[1]["prompt"]  # empty profile
    assert rows[2]["prompt"].startswith("The user is a 50-year-old female writer. ")  # no double period
    sep = history_separator(cfg)
    assert SID_OF["i4"] + sep not in rows[0]["prompt"] and SID_OF["i5"] + sep in rows[0]["prompt"]
    assert rows[0]["prompt"].count("<a_") == 20
    off = build_instructions("test", ex, SID_OF, TITLES, PROFILES, InstructionConfig(use_profile=False))
    assert not any("The user is" in p for p in off.column("prompt").to_pylist())


def test_chinese_templates():
    train = _splits()["train"]
    rows = build_instructions("train", train, SID_OF, TITLES, PROFILES, InstructionConfig(language="zh")).to_pylist()
    cfg = InstructionConfig(language="zh")
    templates = [*next_item_templates(cfg), *TEMPLATES["zh"]["sid_to_title"], *TEMPLATES["zh"]["title_to_sid"]]
    pieces = [max(re.split(r"\{\w+\}", t), key=len) for t in templates]  # each template's longest fixed text
    assert all(len(p) >= 4 for p in pieces)
    assert all(any(p in r["prompt"] for p in pieces) for r in rows)
    first = next(r for r in rows if r["user_id"] == "u0")
    assert first["prompt"].startswith("用户是a 24-year-old male technician。")
    assert not any("Which" in r["prompt"] or "The user" in r["prompt"] for r in rows)
    assert all("：\n" in r["prompt"] for r in rows if r["task"] == "next_item")  # full-width colon, one SID per line


def test_no_eval_target_leaks_into_train():
    splits = _splits()
    train = build_instructions("train", splits["train"], SID_OF, TITLES, PROFILES, InstructionConfig())
    nxt = [r for r in train.to_pylist() if r["task"] == "next_item"]
    train_targets = {r["target_item"] for r in nxt}
    eval_only = (set(splits["valid"].column("target").to_pylist())
                 | set(splits["test"].column("target").to_pylist())) - set(splits["train"].column("target").to_pylist())
    assert eval_only >= {"i32", "i33"}
    assert not train_targets & eval_only
    assert not any(SID_OF[i] in r["prompt"] or SID_OF[i] == r["response"] for r in nxt for i in eval_only)


def test_next_item_batch_matches_table_and_handles_numpy_batches():
    ex = _splits()["valid"]
    cfg = InstructionConfig(seed=3)
    hist = np.empty(ex.num_rows, dtype=object)  # what Ray Data hands over for a list column
    for k, h in enumerate(ex.column("history").to_pylist()):
        hist[k] = np.array(h)
    batch = {"user_id": np.array(ex.column("user_id").to_pylist()), "history": hist,
             "target": np.array(ex.column("target").to_pylist())}
    whole = next_item_batch(batch, sid_of=SID_OF, profiles=PROFILES, cfg=cfg)
    halves = [next_item_batch({k: v[s] for k, v in batch.items()}, sid_of=SID_OF, profiles=PROFILES, cfg=cfg)
              for s in (slice(0, 2), slice(2, None))]
    assert list(whole["prompt"]) == list(halves[0]["prompt"]) + list(halves[1]["prompt"])  # batching-invariant
    table = build_instructions("valid", ex, SID_OF, TITLES, PROFILES, cfg)
    assert table.column("prompt").to_pylist() == list(whole["prompt"])


def test_missing_sid_raises():
    with pytest.raises(ValueError, match="without a SID"):
        build_instructions("test", _examples([("u0", ["nope"], "i1")]), SID_OF, TITLES, PROFILES,
                           InstructionConfig())


@pytest.mark.parametrize("kwargs, field", [
    ({"language": "fr"}, "language"),
    ({"max_history": 0}, "max_history"),
    ({"task_weights": {"next_item": 1.0, "bogus": 1.0}}, "task_weights"),
    ({"task_weights": {"sid_to_title": -1.0}}, "task_weights"),
    ({"task_weights": {"next_item": 0.5}}, "task_weights"),
])
def test_bad_config_names_field(kwargs, field):
    with pytest.raises(ConfigError, match=f"instructions.{field}"):
        InstructionConfig(**kwargs)


def test_template_corpus_covers_both_languages():
    text = "\n".join(template_corpus())
    assert "Which item will the user click next?" in text and "用户接下来会点击哪个商品？" in text
    assert "{" not in text
    assert all(len(ts) >= 3 for lang in TEMPLATES.values() for ts in lang.values())


def test_sequence_windows_cover_every_train_target_once():
    """Leave-one-out examples glue back into one sequence per user; windows label each target once."""
    seq = [f"i{k}" for k in range(12)]
    rows = [("u0", seq[max(0, t - 4):t], seq[t]) for t in range(1, len(seq))]  # history capped at 4
    rows += [("u1", ["i0"], "i5"), ("u1", ["i0", "i5"], "i6")]
    windows = sequence_windows(_examples(rows), max_history=4)
    got = list(zip(windows.column("user_id").to_pylist(), windows.column("history").to_pylist(),
                   windows.column("target").to_pylist(), strict=True))
    # newest window first and full; consecutive windows share one item
    assert got == [("u0", seq[7:11], seq[11]), ("u0", seq[3:7], seq[7]), ("u0", seq[0:3], seq[3]),
                   ("u1", ["i0", "i5"], "i6")]
    # labels with loss_on=items: every history item after the first + the target = every example's target
    labelled = collections.Counter()
    for u, h, t in got:
        labelled.update((u, i) for i in h[1:] + [t])
    assert labelled == collections.Counter((u, t) for u, _h, t in rows)


def test_user_sequences_keeps_examples_that_do_not_chain():
    seqs = user_sequences(["u", "u", "u"], [["a"], ["x", "y"], ["a", "b"]], ["b", "z", "c"])
    assert seqs == {"u": [["a", "b", "c"], ["x", "y", "z"]]}


def test_train_rows_sequences_vs_examples():
    train = _splits()["train"]
    by_example = build_instructions("train", train, SID_OF, TITLES, PROFILES,
                                    InstructionConfig(train_rows="examples", task_weights={"next_item": 1.0}))
    by_sequence = build_instructions("train", train, SID_OF, TITLES, PROFILES,
                                     InstructionConfig(train_rows="sequences", task_weights={"next_item": 1.0}))
    assert by_example.num_rows == train.num_rows
    assert by_sequence.num_rows == 4  # one window per user: every train sequence is <= max_history + 1 items
    last = {r["user_id"]: r for r in by_example.to_pylist()}  # each user's newest example ...
    assert sorted(by_sequence.to_pylist(), key=lambda r: r["user_id"]) == [last[u] for u in sorted(last)]
    valid = build_instructions("valid", _splits()["valid"], SID_OF, TITLES, PROFILES,
                               InstructionConfig(train_rows="sequences"))
    assert valid.num_rows == 4  # eval splits stay one row per example


@pytest.mark.parametrize("language", ["en", "zh"])
def test_history_last_layout_puts_the_answer_where_the_next_history_item_goes(language):
    from sidrec.llm.instructions import next_item_prompt
    from sidrec.llm.sft import PROMPT_SEPARATOR

    cfg = InstructionConfig(layout="history_last", language=language)
    history, target = ["i1", "i2", "i3"], "i4"
    prompt = next_item_prompt("u0", history, SID_OF, "", cfg)
    # one item per line at the end, and the answer (after the prompt separator) is the list's next line
    assert prompt.split("\n")[-3:] == [SID_OF[i] for i in history]
    rendered = prompt + PROMPT_SEPARATOR + SID_OF[target]
    assert rendered.endswith("\n".join(SID_OF[i] for i in [*history, target]))
    # the question comes before the list; the other layout keeps it after
    assert prompt.index(SID_OF["i1"]) > 10
    old = next_item_prompt("u0", history, SID_OF, "", InstructionConfig(language=language, layout="question_last"))
    assert not old.rstrip().endswith(SID_OF["i3"])


def test_layout_is_validated_with_its_name():
    with pytest.raises(ConfigError, match="instructions.layout"):
        InstructionConfig(layout="sideways")
