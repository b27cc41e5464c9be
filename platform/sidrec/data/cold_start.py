"""The cold-start split (``eval.cold_start``): a share of the items held out of every training input, so the
evaluation measures how items nobody interacted with during training are recommended once they are added.

Which items: ``eval.cold_start`` of the items the examples name. ``cold_start_by=newest`` takes those whose
first interaction is the latest (ties: the larger item id first); it needs a log with global timestamps
(``Dataset.first_seen``: MovieLens, raw Amazon reviews, generic interactions). ``random`` is a seeded uniform
draw (``eval.cold_start_seed``), as TIGER's unseen-item experiment draws them.

What is held out. The ``dataset`` stage applies the split, so every later stage reads held-out data:

- train: each user's sequence, rebuilt from the train examples, with the cold items taken out; each remaining
  target is an example again, with the warm items before it as history (capped as long as the split's
  histories): the rows the log would give without the cold items' interactions. A cold target is no example.
- valid: examples with a cold target are dropped and cold items leave the histories (valid picks the best
  checkpoint and SASRec's epoch, and is training data with ``train.train_on_valid``).
- test: unchanged. Examples whose target is cold are the cold slice, the others the warm slice. Histories keep
  their cold items (a user who met a new item after it was added has it in their history): the SID-LLM, which
  gets the items' SIDs as an admin add does, and the content baseline read them; most-popular and SASRec know
  nothing of an item they never saw and get the history without it (``without``).
- items: the ``sids`` stage gives cold items no SID (so no alignment row and no SID token initialised from
  their title), the quantizer is fitted without their embeddings and the preset tokenizer without their text.
  The ``embeddings`` stage still embeds them: their text is known, and the content baseline reads it.

With ``eval.cold_start = 0`` none of this runs and every stage's config, fingerprint and output is what it was
before the option existed (``stage_config`` and ``stage_inputs`` add nothing, ``eval_section`` drops the fields).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Sequence
from collections.abc import Set as AbstractSet

import numpy as np
import pyarrow as pa

from sidrec.config import ConfigError, EvalConfig
from sidrec.data.tables import Dataset
from sidrec.store import ArtifactStore

log = logging.getLogger(__name__)

COLD_ITEMS_FILE = "cold_items.parquet"  # in the dataset stage: item_id, first_seen (null when unknown)
# the EvalConfig options of the split, and how the added items are ranked (only a cold-start run adds any)
COLD_FIELDS = ("cold_start", "cold_start_by", "cold_start_seed", "new_item_slots", "new_item_ranking")


# ------------------------------------------------------------------------------------------ config views
def enabled(ecfg: EvalConfig) -> bool:
    return ecfg.cold_start > 0


def settings(ecfg: EvalConfig) -> dict:
    """What decides the cold set (the seed only where it is used)."""
    out: dict = {"share": ecfg.cold_start, "by": ecfg.cold_start_by}
    if ecfg.cold_start_by == "random":
        out["seed"] = ecfg.cold_start_seed
    return out


def stage_config(ecfg: EvalConfig) -> dict:
    """Added to a stage's fingerprinted config: ``{"cold_start": settings}`` when on, ``{}`` when off."""
    return {"cold_start": settings(ecfg)} if enabled(ecfg) else {}


def stage_inputs(store: ArtifactStore, ecfg: EvalConfig) -> dict[str, str]:
    """Added to the inputs of a stage that reads the cold set: the dataset stage, when on."""
    return {"dataset": store.require("dataset")["fingerprint"]} if enabled(ecfg) else {}


def eval_section(ecfg: EvalConfig) -> dict:
    """The eval section as the eval stage fingerprints it: without the cold-start options when they are off."""
    section = dataclasses.asdict(ecfg)
    return section if enabled(ecfg) else {k: v for k, v in section.items() if k not in COLD_FIELDS}


# ------------------------------------------------------------------------------------------ the cold set
def _id_key(item: str) -> tuple:
    """Numeric ids in numeric order ("9" < "10"), then the others as strings."""
    return (0, int(item), item) if item.isascii() and item.isdigit() and len(item) <= 18 else (1, 0, item)


def example_items(splits: Iterable[pa.Table]) -> list[str]:
    """Every item a history or a target of the splits names, in id order."""
    items: set[str] = set()
    for table in splits:
        items.update(table.column("target").to_pylist())
        for h in table.column("history").to_pylist():
            items.update(h)
    return sorted(items, key=_id_key)


def pick_cold_items(item_ids: Sequence[str], share: float, by: str, seed: int = 0,
                    first_seen: dict[str, int] | None = None) -> list[str]:
    """``round(share * n)`` (at least 1) of the items, in id order: the newest by first interaction, or random."""
    ids = sorted(set(item_ids), key=_id_key)
    if not ids or share <= 0:
        return []
    n = min(len(ids), max(1, round(share * len(ids))))
    if by == "newest":
        first_seen = first_seen or {}
        missing = [i for i in ids if i not in first_seen]
        if missing:
            raise ConfigError(f"eval.cold_start_by must be 'random' when items have no first-interaction time "
                              f"(e.g. {missing[:5]}), got 'newest'")
        rank = {i: r for r, i in enumerate(ids)}
        picked = sorted(ids, key=lambda i: (-first_seen[i], -rank[i]))[:n]
    elif by == "random":
        picked = [ids[r] for r in np.random.default_rng(seed).choice(len(ids), size=n, replace=False)]
    else:
        raise ConfigError(f"eval.cold_start_by must be one of ['newest', 'random'], got {by!r}")
    return sorted(picked, key=_id_key)


# ------------------------------------------------------------------------------------------ held-out splits
def _examples(users: list[str], histories: list[list[str]], targets: list[str]) -> pa.Table:
    return pa.table({"user_id": pa.array(users, pa.string()), "history": pa.array(histories, pa.list_(pa.string())),
                     "target": pa.array(targets, pa.string())})


def without(histories: Sequence[Sequence[str]], cold: AbstractSet[str]) -> list[list[str]]:
    """Histories with the cold items taken out (what a model that never saw them can read)."""
    return [[i for i in h if i not in cold] for h in histories]


def strip_examples(examples: pa.Table, cold: set[str]) -> pa.Table:
    """Examples with no cold target and no cold item in the history (emptied histories are dropped)."""
    rows = []
    for u, h, t in zip(*(examples.column(c).to_pylist() for c in ("user_id", "history", "target")), strict=True):
        h = [i for i in h if i not in cold]
        if t not in cold and h:
            rows.append((u, h, t))
    return _examples(*(list(col) for col in zip(*rows, strict=True))) if rows else _examples([], [], [])


def _chains(users: list[str], histories: list[list[str]], targets: list[str]
            ) -> tuple[list[list[str]], list[tuple[int, int]]]:
    """The user sequences the examples were cut from, and where each example's target sits in them.

    A user's examples, shortest history first (table order among equal lengths), continue a sequence when the
    history is its tail and is either the whole sequence or as long as the split allows (a capped window);
    otherwise they start a sequence of their own.
    """
    cap = max((len(h) for h in histories), default=0)
    chains: list[list[str]] = []
    by_user: dict[str, list[int]] = {}
    where: list[tuple[int, int]] = [(0, 0)] * len(targets)
    for r in sorted(range(len(targets)), key=lambda r: len(histories[r])):  # stable
        h, own = histories[r], by_user.setdefault(users[r], [])
        cid = next((c for c in own if h and chains[c][-len(h):] == h and len(h) in (len(chains[c]), cap)), None)
        if cid is None:
            cid = len(chains)
            chains.append(list(h))
            own.append(cid)
        chains[cid].append(targets[r])
        where[r] = (cid, len(chains[cid]) - 1)
    return chains, where


def hold_out_train(examples: pa.Table, cold: set[str]) -> pa.Table:
    """Train examples as the log without the cold items' interactions gives them (see the module doc).

    Nothing cold: the same table. Row order is kept; histories are capped as long as the input's longest.
    """
    users, histories, targets = (examples.column(c).to_pylist() for c in ("user_id", "history", "target"))
    cap = max((len(h) for h in histories), default=0)
    chains, where = _chains(users, histories, targets)
    warm = [[i for i in c if i not in cold] for c in chains]
    # position in the warm chain of every position of the chain (-1 for a cold item)
    index = [np.cumsum([i not in cold for i in c]) - 1 for c in chains]
    rows = []
    for r, (cid, pos) in enumerate(where):
        if targets[r] in cold:
            continue
        at = int(index[cid][pos])
        if history := warm[cid][max(0, at - cap):at]:
            rows.append((users[r], history, targets[r]))
    return _examples(*(list(col) for col in zip(*rows, strict=True))) if rows else _examples([], [], [])


def hold_out(ds: Dataset, ecfg: EvalConfig) -> tuple[Dataset, pa.Table]:
    """The dataset with the cold items held out of train and valid (test unchanged), and the cold items table."""
    if ecfg.cold_start_by == "newest" and not ds.first_seen:
        raise ConfigError(f"eval.cold_start_by must be 'random' for dataset {ds.name!r}: its source has no "
                          "interaction timestamps to find the newest items, got 'newest'")
    items = example_items(ds.splits.values())
    cold_ids = pick_cold_items(items, ecfg.cold_start, ecfg.cold_start_by, ecfg.cold_start_seed, ds.first_seen)
    cold = set(cold_ids)
    splits = dict(ds.splits)
    if "train" in splits:
        splits["train"] = hold_out_train(splits["train"], cold)
    if "valid" in splits:
        splits["valid"] = strip_examples(splits["valid"], cold)
    table = pa.table({"item_id": pa.array(cold_ids, pa.string()),
                      "first_seen": pa.array([ds.first_seen.get(i) for i in cold_ids], pa.int64())})
    log.info("cold start: %d of %d items held out (%s)", len(cold_ids), len(items), ecfg.cold_start_by)
    return dataclasses.replace(ds, splits=splits), table


def summary(before: Dataset, after: Dataset, cold: Sequence[str]) -> dict:
    """The dataset stage's cold-start metrics: how much the hold-out took away, how much it left to score."""
    cold_set = set(cold)
    out: dict = {"items": len(cold)}
    for split in ("train", "valid"):
        if split in before.splits:
            out[f"{split}_rows_before"] = before.splits[split].num_rows
    test = after.splits.get("test")
    if test is not None:
        out["test_cold_targets"] = sum(t in cold_set for t in test.column("target").to_pylist())
        out["test_cold_in_history"] = sum(bool(cold_set.intersection(h)) for h in test.column("history").to_pylist())
    return out


def cold_items(store: ArtifactStore) -> list[str]:
    """The published dataset's cold items (``[]`` when it was built without the hold-out)."""
    if COLD_ITEMS_FILE not in store.require("dataset").get("files", []):
        return []
    path = f"{store.current_path('dataset')}/{COLD_ITEMS_FILE}"
    return store.read_table(path, columns=["item_id"]).column("item_id").to_pylist()
