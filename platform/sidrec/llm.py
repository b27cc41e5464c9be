"""Tokenizer and causal LM for generative recommendation with Semantic IDs.

An item's SID (``<a_99><b_225><c_67>``) is spelled with one added token per (level, code), so the LM
predicts an item in exactly L steps and constrained decoding can walk a prefix tree of token ids.

Two ways to get a base model:
- the ``tiny-qwen2`` preset: a byte-level BPE tokenizer trained here on catalog + template text and a small
  randomly initialised Qwen2 (CPU-friendly, for tests and smoke runs);
- any local Hugging Face checkpoint directory (Qwen2.5, Qwen3, Llama, ...), loaded with the Auto classes.

SID tokens must be added (and embeddings resized) before the model is wrapped by DeepSpeed/FSDP.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

PRESET = "tiny-qwen2"
EOS_TOKEN = "<|endoftext|>"
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]
PROMPT_SEPARATOR = "\n"  # appended to every prompt; the response starts right after it
IGNORE_INDEX = -100  # label value ignored by the cross-entropy loss
SID_TOKEN_RE = re.compile(r"<([a-z])_(\d+)>")
# Qwen2's pre-tokenizer split. Using the same one means a tokenizer saved next to a qwen2 config encodes
# identically when transformers reloads it as Qwen2Tokenizer (which rebuilds its pre-tokenizer in v5).
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


@dataclass
class ModelConfig:
    """Which base LM to fine-tune; the size fields only apply to the ``tiny-qwen2`` preset."""

    base: str = PRESET  # "tiny-qwen2", or a local HF checkpoint dir / hub id (Qwen2.5, Qwen3, Llama, ...)
    hidden_size: int = 256  # preset: model width
    num_layers: int = 4  # preset: transformer blocks
    num_heads: int = 4  # preset: query heads
    num_kv_heads: int = 2  # preset: key/value heads (grouped-query attention, as in Qwen2)
    intermediate_size: int = 768  # preset: SwiGLU MLP width
    max_position_embeddings: int = 512  # preset: longest sequence (RoPE)
    rope_theta: float = 10000.0  # preset: RoPE base
    tokenizer_vocab_size: int = 4000  # preset: BPE vocab size (incl. 256 byte tokens and 3 special tokens)
    new_token_init: Literal["mean", "random"] = "mean"  # init of SID token rows, see add_sid_tokens
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # parameter dtype after loading/building
    seed: int = 0  # preset: seed of the random weight init

    def validate(self) -> None:
        if not self.base:
            raise ValueError("ModelConfig.base must be 'tiny-qwen2' or a checkpoint path / hub id")
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                     "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"ModelConfig.hidden_size ({self.hidden_size}) must be divisible by num_heads "
                             f"({self.num_heads})")
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError("ModelConfig.hidden_size / num_heads must be even (RoPE rotates pairs)")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"ModelConfig.num_kv_heads ({self.num_kv_heads}) must divide num_heads "
                             f"({self.num_heads})")
        if self.rope_theta <= 0:
            raise ValueError(f"ModelConfig.rope_theta must be > 0, got {self.rope_theta}")
        if self.tokenizer_vocab_size < 256 + 1 + len(CHAT_TOKENS):
            raise ValueError(f"ModelConfig.tokenizer_vocab_size must be >= {256 + 1 + len(CHAT_TOKENS)} "
                             f"(byte alphabet + special tokens), got {self.tokenizer_vocab_size}")
        if self.new_token_init not in ("mean", "random"):
            raise ValueError(f"ModelConfig.new_token_init must be 'mean' or 'random', got {self.new_token_init!r}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"ModelConfig.dtype must be float32, bfloat16 or float16, got {self.dtype!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


# ----------------------------------------------------------------------------------------------- tokenizer


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a Qwen2-style byte-level BPE on ``texts``.

    Byte-level means every string (Chinese included) encodes, even characters never seen in training.
    Special tokens follow Qwen: ``<|endoftext|>`` (eos and pad), ``<|im_start|>``, ``<|im_end|>``; no bos.
    Training is deterministic for a given text sequence.
    """
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, *CHAT_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((t for t in texts if t), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        extra_special_tokens=list(CHAT_TOKENS),
        model_max_length=1 << 30,
    )


# ----------------------------------------------------------------------------------------------- models


def build_tiny_qwen2(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> Qwen2ForCausalLM:
    """A randomly initialised Qwen2 (tied embeddings) sized by ``cfg`` for ``tokenizer``'s vocabulary."""
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = Qwen2ForCausalLM(config)
    return model.to(cfg.torch_dtype)


def load_base(cfg: ModelConfig, corpus_texts: Iterable[str]) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Return ``(model, tokenizer)`` for ``cfg.base``; ``corpus_texts`` only trains the preset's tokenizer."""
    cfg.validate()
    if cfg.base == PRESET:
        tokenizer = train_bpe_tokenizer(corpus_texts, cfg.tokenizer_vocab_size)
        model = build_tiny_qwen2(cfg, tokenizer)
    else:
        tokenizer = AutoTokenizer.from_pretrained(cfg.base)
        model = AutoModelForCausalLM.from_pretrained(cfg.base, dtype=cfg.torch_dtype)
    if tokenizer.pad_token is None:  # Llama-style tokenizers ship without one; padding is masked anyway
        if tokenizer.eos_token is None:
            raise ValueError(f"ModelConfig.base: tokenizer of {cfg.base!r} has neither pad nor eos token")
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


# ----------------------------------------------------------------------------------------------- SID tokens


def _parse_sid(sid: str) -> list[tuple[int, int]]:
    """``"<a_1><b_20>"`` -> ``[(0, 1), (1, 20)]``; raises if malformed or a level is out of order."""
    parts = SID_TOKEN_RE.findall(sid)
    if not parts or "".join(f"<{c}_{n}>" for c, n in parts) != sid:
        raise ValueError(f"malformed SID {sid!r}: expected tokens like <a_1><b_20><c_3>")
    out = []
    for pos, (letter, code) in enumerate(parts):
        level = ord(letter) - ord("a")
        if level != pos:
            raise ValueError(f"malformed SID {sid!r}: token {pos} should use level letter {chr(ord('a') + pos)!r}")
        out.append((level, int(code)))
    return out


def sid_vocabulary(sid_strings: Iterable[str]) -> list[str]:
    """Distinct SID tokens used by ``sid_strings``, ordered by level then code."""
    pairs = {pair for sid in sid_strings for pair in _parse_sid(sid)}
    return [f"<{chr(ord('a') + level)}_{code}>" for level, code in sorted(pairs)]


def add_sid_tokens(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    sid_tokens: Sequence[str],
    init: Literal["mean", "random"] = "mean",
    pad_to_multiple_of: int = 64,
) -> int:
    """Add ``sid_tokens`` as atomic tokens, grow the embeddings and initialise the new rows.

    Tokens are added as non-special ``AddedToken`` s (not normalised, no strip): the tokenizer matches them
    before BPE, so ``<a_12>`` is always one id and ``"<a_1><b_2>"`` is exactly two, yet ``decode(...,
    skip_special_tokens=True)`` keeps them. New rows (input embedding, and the output head if untied) get
    the mean of the existing vocabulary rows (``init="mean"``; keeps initial logits/activations in range)
    or N(0, std of existing rows) (``init="random"``). Only ids below the old ``len(tokenizer)`` count as
    "existing": checkpoints such as Qwen2.5 carry untrained padding rows past the tokenizer, and new ids may
    land there. The matrix is padded to ``pad_to_multiple_of`` rows (rows past ``len(tokenizer)`` are never
    produced by the tokenizer; rows created as padding get the same init). Returns the number of tokens added.
    """
    if init not in ("mean", "random"):
        raise ValueError(f"init must be 'mean' or 'random', got {init!r}")
    for t in sid_tokens:
        if not SID_TOKEN_RE.fullmatch(t):
            raise ValueError(f"{t!r} is not a single SID token like <a_12>")
    old_len = len(tokenizer)
    added = tokenizer.add_tokens(
        [AddedToken(t, special=False, normalized=False, lstrip=False, rstrip=False, single_word=False)
         for t in sid_tokens]
    )
    new_ids = {i for i in tokenizer.convert_tokens_to_ids(list(sid_tokens)) if i >= old_len}
    old_rows = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(max(old_rows, len(tokenizer)), pad_to_multiple_of=pad_to_multiple_of,
                                  mean_resizing=False)
    # the SID rows, plus rows created as padding (initialised the same way so the result is deterministic)
    idx = torch.tensor(sorted(new_ids | set(range(old_rows, model.get_input_embeddings().weight.shape[0]))),
                       dtype=torch.long)
    if len(idx) == 0:
        return added
    matrices = [model.get_input_embeddings().weight]
    out = model.get_output_embeddings()
    if out is not None and out.weight.data_ptr() != matrices[0].data_ptr():
        matrices.append(out.weight)
    with torch.no_grad():
        for w in matrices:
            old = w[:old_len].float()
            if init == "mean":
                new = old.mean(dim=0, keepdim=True).expand(len(idx), -1)
            else:
                new = torch.randn(len(idx), w.shape[1], device=w.device) * old.std()
            w[idx.to(w.device)] = new.to(w.dtype)
    return added


def encode_sid(tokenizer: PreTrainedTokenizerBase, sid: str) -> list[int]:
    """Token ids of ``sid``, one per level; raises ValueError unless each level is exactly one token."""
    parts = [f"<{chr(ord('a') + level)}_{code}>" for level, code in _parse_sid(sid)]
    ids = tokenizer.encode(sid, add_special_tokens=False)
    if tokenizer.convert_ids_to_tokens(ids) != parts:
        raise ValueError(f"SID {sid!r} does not encode to {len(parts)} SID tokens (got "
                         f"{tokenizer.convert_ids_to_tokens(ids)}); were its tokens added with add_sid_tokens?")
    return ids


def decode_sid(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> str:
    """Inverse of encode_sid; special tokens (eos/pad) are skipped, any other non-SID token raises."""
    special = set(tokenizer.all_special_ids)
    tokens = tokenizer.convert_ids_to_tokens([int(i) for i in ids if int(i) not in special])
    for t in tokens:
        if t is None or not SID_TOKEN_RE.fullmatch(t):
            raise ValueError(f"token {t!r} is not a SID token")
    return "".join(tokens)


# ----------------------------------------------------------------------------------------------- SFT data


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


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path) -> None:
    """save_pretrained both (safetensors) so the plain Auto classes reload them, SID tokens included."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
