"""Supervised fine-tuning rows as token ids: prompt, response, labels, padding.

Training and inference share `encode_prompt`, so generation starts exactly where training responses start.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

PROMPT_SEPARATOR = "\n"  # appended to every prompt; the response starts right after it
IGNORE_INDEX = -100  # label value ignored by the cross-entropy loss


def encode_prompt(prompt: str, tokenizer: PreTrainedTokenizerBase, max_length: int) -> list[int]:
    """Prompt ids as seen by the model: [bos] + tokens of ``prompt + PROMPT_SEPARATOR``, left-truncated.

    Left truncation keeps the end of the prompt: the most recent history and the question. Use the same
    function at inference so generation starts exactly where training responses start.
    """
    ids = tokenizer.encode(prompt + PROMPT_SEPARATOR, add_special_tokens=False)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    keep = max_length - len(bos)
    if keep <= 0:
        raise ValueError(f"max_length={max_length} leaves no room for the prompt")
    return bos + ids[-keep:]


def format_example(prompt: str, response: str, tokenizer: PreTrainedTokenizerBase, max_length: int) -> dict:
    """Tokenise one SFT pair: ``input_ids``, ``labels`` and ``attention_mask`` (lists of ints).

    Layout: ``[bos] prompt "\\n" response eos``. Labels are IGNORE_INDEX on the prompt part, so the loss is
    over the response tokens plus eos (the eos teaches the model to stop after the item). Prompt and
    response are encoded separately so the boundary never merges across BPE pieces. When too long, the
    prompt is truncated from the left; the response is never cut (raises if it alone does not fit).
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no eos token")
    resp = tokenizer.encode(response, add_special_tokens=False) + [tokenizer.eos_token_id]
    room = max_length - len(resp)
    if room <= 0:
        raise ValueError(f"response of {len(resp)} tokens (with eos) does not fit max_length={max_length}")
    prompt_ids = encode_prompt(prompt, tokenizer, room)
    input_ids = prompt_ids + resp
    return {
        "input_ids": input_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + resp,
        "attention_mask": [1] * len(input_ids),
    }


def collate(batch: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of format_example dicts into LongTensors (labels padded with IGNORE_INDEX)."""
    width = max(len(ex["input_ids"]) for ex in batch)
    out = {
        "input_ids": torch.full((len(batch), width), pad_id, dtype=torch.long),
        "labels": torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long),
        "attention_mask": torch.zeros((len(batch), width), dtype=torch.long),
    }
    for row, ex in enumerate(batch):
        n = len(ex["input_ids"])
        out["input_ids"][row, :n] = torch.as_tensor(ex["input_ids"], dtype=torch.long)
        out["labels"][row, :n] = torch.as_tensor(ex["labels"], dtype=torch.long)
        out["attention_mask"][row, :n] = torch.as_tensor(ex["attention_mask"], dtype=torch.long)
    return out
