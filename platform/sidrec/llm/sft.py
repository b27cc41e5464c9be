"""Supervised fine-tuning rows as token ids: prompt, response, labels, padding.

Training and inference share `encode_prompt`, so generation starts exactly where training responses start.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch
from transformers import PreTrainedTokenizerBase

PROMPT_SEPARATOR = "\n"  # appended to every prompt; the response starts right after it
IGNORE_INDEX = -100  # label value ignored by the cross-entropy loss


def prompt_pieces(prompt: str, tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int], list[int]]:
    """(head, body, tail) ids of a prompt as the model sees it; only ``body`` may be truncated.

    With a chat template (instruction-tuned checkpoints such as SmolLM2-Instruct) the prompt is the user turn
    of ``apply_chat_template(..., add_generation_prompt=True)``, so the response is the assistant's answer
    and its eos (``<|im_end|>``) closes the turn. Without one: ``[bos]`` + ``prompt + PROMPT_SEPARATOR``.
    """
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        head, found, tail = text.partition(prompt)
        if not found:
            raise ValueError("the tokenizer's chat template does not keep the prompt text verbatim")
        return (tokenizer.encode(head, add_special_tokens=False), tokenizer.encode(prompt, add_special_tokens=False),
                tokenizer.encode(tail, add_special_tokens=False) if tail else [])
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos, tokenizer.encode(prompt + PROMPT_SEPARATOR, add_special_tokens=False), []


def prompt_length(prompt: str, tokenizer: PreTrainedTokenizerBase) -> int:
    """Tokens of the untruncated prompt (see ``prompt_pieces``)."""
    return sum(len(p) for p in prompt_pieces(prompt, tokenizer))


def encode_prompt(prompt: str, tokenizer: PreTrainedTokenizerBase, max_length: int) -> list[int]:
    """Prompt ids as seen by the model (``prompt_pieces``), the prompt text left-truncated to ``max_length``.

    Left truncation keeps the end of the prompt: the most recent history and the question. Use the same
    function at inference so generation starts exactly where training responses start.
    """
    head, body, tail = prompt_pieces(prompt, tokenizer)
    keep = max_length - len(head) - len(tail)
    if keep <= 0:
        raise ValueError(f"max_length={max_length} leaves no room for the prompt")
    return head + body[-keep:] + tail


def format_example(prompt: str, response: str, tokenizer: PreTrainedTokenizerBase, max_length: int,
                   label_prompt_ids: Collection[int] = ()) -> dict:
    """Tokenise one SFT pair: ``input_ids``, ``labels`` and ``attention_mask`` (lists of ints).

    Layout: ``[bos] prompt "\\n" response eos`` (with a chat template: the user turn, then the response). Labels are IGNORE_INDEX on the prompt part, so the loss is
    over the response tokens plus eos (the eos teaches the model to stop after the item). Prompt and
    response are encoded separately so the boundary never merges across BPE pieces. When too long, the
    prompt is truncated from the left; the response is never cut (raises if it alone does not fit).

    ``label_prompt_ids`` (the SID token ids, for the all-positions objective): prompt tokens with these ids
    are labels too, except the first run of them: the first history item has nothing before it to predict
    it from, and each later one is predicted from the items before it.
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
        "labels": prompt_labels(prompt_ids, label_prompt_ids) + resp,
        "attention_mask": [1] * len(input_ids),
        "n_prompt": len(prompt_ids),
    }


def prompt_labels(prompt_ids: list[int], label_ids: Collection[int]) -> list[int]:
    """Labels of the prompt part: IGNORE_INDEX except ``label_ids`` tokens after the first run of them."""
    labels = [IGNORE_INDEX] * len(prompt_ids)
    if not label_ids:
        return labels
    runs = 0
    for i, tok in enumerate(prompt_ids):
        if tok in label_ids:
            runs += i == 0 or prompt_ids[i - 1] not in label_ids
            if runs > 1:
                labels[i] = tok
    return labels


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


def prompt_mask(batch: Sequence[dict], width: int) -> torch.Tensor:
    """(B, width) bool: the token lies in its example's prompt, for `collate`-d rows (`pack` returns its own)."""
    return torch.arange(width)[None, :] < torch.tensor([ex["n_prompt"] for ex in batch])[:, None]


def pack(batch: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Pack format_example dicts into as few rows as fit the longest of them (first fit, longest first).

    Returns ``input_ids`` / ``labels`` / ``position_ids`` (R, T) with R <= len(batch) and T the longest
    example, and ``in_prompt`` (R, T): the token lies in its example's prompt. Position ids restart at 0
    with every example (and with the trailing padding), and there is no ``attention_mask``: transformers
    then reads the packed segments from the position ids and lets each token attend only inside its own
    segment, so every example's logits and loss are what `collate` would give it alone. An example's first
    token is never a label (nothing in its segment predicts it).
    """
    order = sorted(range(len(batch)), key=lambda i: -len(batch[i]["input_ids"]))
    width = len(batch[order[0]]["input_ids"])
    rows: list[list[int]] = []
    fill: list[int] = []
    for i in order:
        n = len(batch[i]["input_ids"])
        r = next((r for r, used in enumerate(fill) if used + n <= width), len(rows))
        if r == len(rows):
            rows.append([])
            fill.append(0)
        rows[r].append(i)
        fill[r] += n
    shape = (len(rows), width)
    out = {"input_ids": torch.full(shape, pad_id, dtype=torch.long),
           "labels": torch.full(shape, IGNORE_INDEX, dtype=torch.long),
           "position_ids": torch.zeros(shape, dtype=torch.long),
           "in_prompt": torch.zeros(shape, dtype=torch.bool)}
    for r, members in enumerate(rows):
        o = 0
        for i in members:
            ex = batch[i]
            n = len(ex["input_ids"])
            out["input_ids"][r, o:o + n] = torch.as_tensor(ex["input_ids"], dtype=torch.long)
            out["labels"][r, o + 1:o + n] = torch.as_tensor(ex["labels"][1:], dtype=torch.long)
            out["position_ids"][r, o:o + n] = torch.arange(n)
            out["in_prompt"][r, o:o + ex["n_prompt"]] = True
            o += n
        out["position_ids"][r, o:] = torch.arange(width - o)
    return out
