"""Instruction (SFT) data for the three seed tasks: next item, SID -> title, title -> SID.

- ``next_item``: one row per example of the split: the user's (profile and) last ``max_history`` items as
  SIDs -> the target's SID. With ``train_rows="sequences"`` the train rows are instead windows that cover
  each user's train sequence once (``sequence_windows``), for the all-positions loss. Rows of a split only ever use that split's examples, so building the train
  split from train examples can never put a valid/test target into a training row.
- ``sid_to_title`` / ``title_to_sid``: align the new SID tokens with item text (LC-Rec/MiniOneRec style).
  They are built for ``split == "train"`` only and cover the whole catalog (every item that has a SID
  and a title). They use item text, not interactions, so covering items that are valid/test targets is
  standard practice and not leakage: nothing says which item a user picks next.

Templates are plain prompts (no chat markup); several paraphrases per task in English and Chinese. The
template of a row is a pure function of (seed, task, row key), so results do not depend on how a Ray
Data stream is batched: same seed -> identical rows, another seed -> another template mix.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np
import pyarrow as pa

from sidrec.config import TASKS, InstructionConfig

COLUMNS = ("task", "prompt", "response", "user_id", "target_item")

# {profile} is replaced by PROFILE_SENTENCE (or "" when there is no profile); {history} by the history SIDs.
TEMPLATES: dict[str, dict[str, list[str]]] = {
    "en": {
        "next_item": [
            "{profile}The user has clicked, in time order: {history}. Which item will the user click next?",
            "{profile}Here is the user's interaction history, oldest first: {history}. "
            "Predict the next item the user will interact with.",
            "{profile}The user engaged with these items in chronological order: {history}. "
            "Recommend the item the user is most likely to choose next.",
            "{profile}Items the user interacted with, from earliest to latest: {history}. "
            "What should be recommended to the user next?",
        ],
        "sid_to_title": [
            "What is the title of item {sid}?",
            "Which product title belongs to item {sid}?",
            "Give the title of the item with semantic ID {sid}.",
        ],
        "title_to_sid": [
            'Which item has the title "{title}"?',
            'What is the semantic ID of the item titled "{title}"?',
            'Find the item whose title is "{title}".',
        ],
    },
    "zh": {
        "next_item": [
            "{profile}用户按时间顺序点击了：{history}。用户接下来会点击哪个商品？",
            "{profile}以下是用户从早到晚的交互记录：{history}。请预测用户下一个会交互的商品。",
            "{profile}用户依次浏览过这些商品：{history}。请推荐用户最可能选择的下一个商品。",
            "{profile}用户最近按顺序购买了：{history}。接下来应该向用户推荐什么商品？",
        ],
        "sid_to_title": [
            "商品{sid}的标题是什么？",
            "语义ID为{sid}的商品叫什么名字？",
            "请给出商品{sid}的标题。",
        ],
        "title_to_sid": [
            "标题为“{title}”的是哪个商品？",
            "标题是“{title}”的商品的语义ID是什么？",
            "请找出标题为“{title}”的商品。",
        ],
    },
}
# instructions.layout=history_last: the question first, then one history item per line; the prompt
# separator ("\n") after the last item makes the answer the list's next line.
HISTORY_LAST_TEMPLATES: dict[str, list[str]] = {
    "en": [
        "{profile}Which item will the user click next? The user has clicked, in time order:\n{history}",
        "{profile}Predict the next item the user will interact with. The user's history, oldest first:\n{history}",
        "{profile}Recommend the item the user is most likely to choose next. Items the user engaged with, "
        "in chronological order:\n{history}",
        "{profile}What should be recommended to the user next? Items the user interacted with, from earliest "
        "to latest:\n{history}",
    ],
    "zh": [
        "{profile}用户接下来会点击哪个商品？用户按时间顺序点击了：\n{history}",
        "{profile}请预测用户下一个会交互的商品。用户从早到晚的交互记录：\n{history}",
        "{profile}请推荐用户最可能选择的下一个商品。用户依次浏览过这些商品：\n{history}",
        "{profile}接下来应该向用户推荐什么商品？用户最近按顺序购买了：\n{history}",
    ],
}
PROFILE_SENTENCE = {"en": "The user is {profile}. ", "zh": "用户是{profile}。"}
HISTORY_SEPARATOR = {"en": ", ", "zh": "，"}
EMPTY_HISTORY = {"en": "nothing yet", "zh": "暂无"}


def next_item_templates(cfg: InstructionConfig) -> list[str]:
    """The next-item paraphrases of ``cfg``'s language and layout."""
    if cfg.layout == "history_last":
        return HISTORY_LAST_TEMPLATES[cfg.language]
    return TEMPLATES[cfg.language]["next_item"]


def history_separator(cfg: InstructionConfig) -> str:
    """What joins the history's SIDs in a next-item prompt (a line break in the history_last layout)."""
    return "\n" if cfg.layout == "history_last" else HISTORY_SEPARATOR[cfg.language]


def _pick(seed: int, task: str, key: str, n: int) -> int:
    """Stable template index in [0, n) from (seed, task, key); independent of batching and PYTHONHASHSEED."""
    digest = hashlib.blake2b(f"{seed}|{task}|{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % n


def _profile_sentence(profile: str, cfg: InstructionConfig) -> str:
    profile = profile.strip().rstrip(".。")
    if not cfg.use_profile or not profile:
        return ""
    return PROFILE_SENTENCE[cfg.language].format(profile=profile)


def next_item_prompt(user_id: str, history: list[str], sid_of: Mapping[str, str], profile: str,
                     cfg: InstructionConfig) -> str:
    """The next-item prompt for a user: training rows and inference requests render it the same way.

    ``history`` is oldest first and is capped to its last ``cfg.max_history``. The paraphrase is picked from
    (user, history length, last item), never from the target, so an inference prompt is exactly a training
    prompt and the template carries no information about the answer.
    """
    missing = [i for i in history if i not in sid_of]
    if missing:
        raise ValueError(f"items without a SID in user {user_id!r}'s history: {missing[:5]}")
    history = history[-cfg.max_history:]
    hist = history_separator(cfg).join(sid_of[i] for i in history) or EMPTY_HISTORY[cfg.language]
    templates = next_item_templates(cfg)
    key = f"{user_id}|{len(history)}|{history[-1] if history else ''}"
    template = templates[_pick(cfg.seed, "next_item", key, len(templates))]
    return template.format(profile=_profile_sentence(profile, cfg), history=hist)


def render_next_item(user_id: str, history: list[str], target: str, sid_of: Mapping[str, str],
                     profile: str, cfg: InstructionConfig) -> dict[str, str]:
    """One next-item row (see ``next_item_prompt``)."""
    if target not in sid_of:
        raise ValueError(f"items without a SID in user {user_id!r}'s example: {[target]}")
    return {
        "task": "next_item",
        "prompt": next_item_prompt(user_id, history, sid_of, profile, cfg),
        "response": sid_of[target],
        "user_id": user_id,
        "target_item": target,
    }


def next_item_batch(batch: dict[str, np.ndarray], *, sid_of: Mapping[str, str], profiles: Mapping[str, str],
                    cfg: InstructionConfig) -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` fn (``batch_format="numpy"``): example batch -> next-item instruction batch.

    Use as ``ds.map_batches(next_item_batch, batch_format="numpy", fn_kwargs={"sid_of": ..., "profiles":
    ..., "cfg": ...})``. Columns may also be plain lists. Row order and count are preserved.
    """
    rows = [
        render_next_item(str(u), [str(i) for i in h], str(t), sid_of, profiles.get(str(u), ""), cfg)
        for u, h, t in zip(batch["user_id"], batch["history"], batch["target"], strict=True)
    ]
    return {c: np.array([r[c] for r in rows], dtype=object) for c in COLUMNS}


def user_sequences(user_ids: list[str], histories: list[list[str]], targets: list[str]) -> dict[str, list[list[str]]]:
    """Each user's item sequences, rebuilt from their examples (in table order, shortest history first).

    An example continues a sequence when its history is that sequence's tail (histories may be capped),
    so a user's leave-one-out examples glue back into one sequence; an example that does not fit starts a
    new one. Nothing is dropped: every example's target is the end of some prefix of a returned sequence.
    """
    by_user: dict[str, list[tuple[list[str], str]]] = {}
    for u, h, t in zip(user_ids, histories, targets, strict=True):
        by_user.setdefault(u, []).append((list(h), t))
    out: dict[str, list[list[str]]] = {}
    for u, rows in by_user.items():
        seqs: list[list[str]] = []
        for h, t in sorted(rows, key=lambda r: len(r[0])):  # stable: table order within a length
            cur = next((s for s in seqs if h and s[-len(h):] == h), None)
            if cur is None:
                seqs.append(h + [t])
            else:
                cur.append(t)
        out[u] = seqs
    return out


def sequence_windows(examples: pa.Table, max_history: int) -> pa.Table:
    """Examples whose (history, target) windows cover each user's sequences, each item a target once.

    Windows of ``max_history + 1`` items end at the last item and step back ``max_history`` items, so the
    newest window is full (like an inference prompt) and consecutive windows share one item: with
    ``train.loss_on=items`` every item after a sequence's first is a label in exactly one row.
    """
    seqs = user_sequences(examples.column("user_id").to_pylist(), examples.column("history").to_pylist(),
                          examples.column("target").to_pylist())
    users, hists, tgts = [], [], []
    for u, user_seqs in seqs.items():
        for seq in user_seqs:
            for end in range(len(seq) - 1, 0, -max_history):
                window = seq[max(0, end - max_history):end + 1]
                users.append(u)
                hists.append(window[:-1])
                tgts.append(window[-1])
    return pa.table({"user_id": pa.array(users, pa.string()), "history": pa.array(hists, pa.list_(pa.string())),
                     "target": pa.array(tgts, pa.string())})


def alignment_rows(task: str, sid_of: Mapping[str, str], titles: Mapping[str, str],
                   cfg: InstructionConfig) -> list[dict[str, str]]:
    """``round(weight * n_items)`` rows of an alignment task over items that have both a SID and a title."""
    items = sorted(i for i in sid_of if titles.get(i, "").strip())
    k = round(cfg.task_weights.get(task, 0.0) * len(items))
    if k == 0:
        return []
    full, rest = divmod(k, len(items))
    rng = np.random.default_rng([cfg.seed, TASKS.index(task)])
    picks = [i for _ in range(full) for i in range(len(items))]
    picks += sorted(rng.choice(len(items), size=rest, replace=False).tolist())
    templates = TEMPLATES[cfg.language][task]
    rows, copies = [], {}
    for p in picks:
        item = items[p]
        copies[item] = copies.get(item, -1) + 1  # repeated items may get another paraphrase
        template = templates[_pick(cfg.seed, task, f"{item}|{copies[item]}", len(templates))]
        sid, title = sid_of[item], titles[item].strip()
        prompt, response = (template.format(sid=sid), title) if task == "sid_to_title" else (
            template.format(title=title), sid)
        rows.append({"task": task, "prompt": prompt, "response": response, "user_id": "", "target_item": item})
    return rows


def build_instructions(split: str, examples: pa.Table, sid_of: Mapping[str, str], titles: Mapping[str, str],
                       profiles: Mapping[str, str], cfg: InstructionConfig) -> pa.Table:
    """All instruction rows of one split: next-item rows from ``examples`` (+ alignment rows for "train").

    Columns: task, prompt, response, user_id ("" for alignment rows), target_item (the predicted item for
    next-item rows, the described item for alignment rows). For big splits, stream ``next_item_batch``
    with Ray Data instead and append ``alignment_rows`` for training.
    """
    if split not in ("train", "valid", "test"):
        raise ValueError(f"split must be train, valid or test, got {split!r}")
    parts: dict[str, list] = {c: [] for c in COLUMNS}
    if split == "train" and cfg.train_rows == "sequences":
        examples = sequence_windows(examples, cfg.max_history)
    if cfg.task_weights.get("next_item", 0.0) > 0 and examples.num_rows:
        batch = {c: examples.column(c).to_pylist() for c in ("user_id", "history", "target")}
        out = next_item_batch(batch, sid_of=sid_of, profiles=profiles, cfg=cfg)  # type: ignore[arg-type]
        for c in COLUMNS:
            parts[c].extend(out[c].tolist())
    if split == "train":
        for task in ("sid_to_title", "title_to_sid"):
            for row in alignment_rows(task, sid_of, titles, cfg):
                for c in COLUMNS:
                    parts[c].append(row[c])
    return pa.table({c: pa.array(parts[c], type=pa.string()) for c in COLUMNS})


def template_corpus() -> list[str]:
    """Every template in every language with the slots emptied: text to train the preset BPE tokenizer on."""
    texts = []
    for lang, tasks in TEMPLATES.items():
        texts.append(PROFILE_SENTENCE[lang].format(profile=""))
        texts.append(EMPTY_HISTORY[lang])
        for templates in [*tasks.values(), HISTORY_LAST_TEMPLATES[lang]]:
            texts += [t.format(profile="", history="", sid="", title="") for t in templates]
    return texts
