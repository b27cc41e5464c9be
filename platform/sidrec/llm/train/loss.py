"""The training loss with history SIDs scored among their own level's tokens (``train.sid_softmax=level``).

With ``train.loss_on=items`` most labels are the SID tokens of history items. At inference the trie only
ever lets a level-l token follow a level-(l-1) one, so scoring those labels against the whole vocabulary
spends most of the output layer on tokens that can never appear there (4,800 logits per position for the
tiny preset, 49k for SmolLM2). Here a history label of level l is a softmax over that level's tokens
only, from the same tied output rows; every other label (the response SID, eos, titles) keeps the full
softmax, so the model still learns to answer with a SID unconstrained and beam scores stay log-probs of
the full vocabulary. A training step is 2.5x cheaper on the quickstart model and 1.4x on tiny-cpu (``bench/sid_softmax.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from sidrec.llm.sft import IGNORE_INDEX
from sidrec.sids.tokens import LEVEL_PREFIXES, SID_TOKEN_RE


@dataclass(frozen=True)
class SidLevels:
    """Where each vocabulary id sits among the SID tokens."""

    level: torch.Tensor  # (V,) level of each id, -1 for non-SID ids
    index: torch.Tensor  # (V,) position of each SID id inside its level's id list
    ids: list[torch.Tensor]  # per level: its token ids

    def to(self, device: torch.device) -> SidLevels:
        return SidLevels(self.level.to(device), self.index.to(device), [i.to(device) for i in self.ids])


def sid_levels(tokenizer: PreTrainedTokenizerBase, vocab_rows: int) -> SidLevels:
    """The SID tokens of ``tokenizer`` grouped by level (``vocab_rows``: rows of the embedding matrix)."""
    level = torch.full((vocab_rows,), -1, dtype=torch.long)
    index = torch.zeros(vocab_rows, dtype=torch.long)
    by_level: dict[int, list[int]] = {}
    for tok, i in sorted(tokenizer.get_added_vocab().items(), key=lambda kv: kv[1]):
        m = SID_TOKEN_RE.fullmatch(tok)
        if m is not None:
            by_level.setdefault(LEVEL_PREFIXES.index(m.group(1)), []).append(i)
    ids = []
    for lv in range(max(by_level, default=-1) + 1):
        members = torch.tensor(by_level.get(lv, []), dtype=torch.long)
        level[members] = lv
        index[members] = torch.arange(len(members))
        ids.append(members)
    return SidLevels(level, index, ids)


def level_softmax_loss(model: Any, output_weight: torch.Tensor, batch: dict[str, torch.Tensor],
                       in_prompt: torch.Tensor, levels: SidLevels) -> torch.Tensor:
    """Mean cross-entropy over the labels of ``batch``; prompt (history) SID labels use their level's softmax.

    ``batch``: input_ids / labels (B, T) and attention_mask or, packed (`sft.pack`), position_ids (B, T);
    ``in_prompt`` (B, T): the token lies in its example's prompt. ``model`` is called once (through any DDP
    wrapper) for the hidden states (B, T, d), with full logits only at the positions some row needs them.
    """
    targets = batch["labels"][:, 1:]  # position p predicts token p + 1
    valid = targets != IGNORE_INDEX
    safe = targets.clamp(min=0)
    target_level = torch.where(valid, levels.level[safe], -1)
    history = valid & in_prompt[:, 1:] & (target_level >= 0)
    full = valid & ~history
    keep = full.any(0).nonzero().squeeze(1)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    out = model(**inputs, logits_to_keep=keep, output_hidden_states=True, use_cache=False)
    total = F.cross_entropy(out.logits[full[:, keep]].float(), targets[:, keep][full[:, keep]], reduction="sum")
    hidden = out.hidden_states[-1][:, :-1]  # (B, T-1, d), after the final norm
    for lv, ids in enumerate(levels.ids):
        sel = history & (target_level == lv)
        if sel.any():
            logits = hidden[sel] @ output_weight[ids].T  # (n, K_lv)
            total = total + F.cross_entropy(logits.float(), levels.index[targets[sel]], reduction="sum")
    return total / valid.sum().clamp(min=1)
