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

from collections.abc import Iterable, Sequence
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

from sidrec.config import PRESET, ModelConfig
from sidrec.hf_lock import MODEL_BUILD_LOCK
from sidrec.sids.tokens import is_sid_token, parse_sid, sid_token

EOS_TOKEN = "<|endoftext|>"
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]
# Qwen2's pre-tokenizer split. Using the same one means a tokenizer saved next to a qwen2 config encodes
# identically when transformers reloads it as Qwen2Tokenizer (which rebuilds its pre-tokenizer in v5).
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


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
        attention_dropout=cfg.attention_dropout,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with MODEL_BUILD_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = Qwen2ForCausalLM(config)
    return model.to(getattr(torch, cfg.dtype))


def load_base(cfg: ModelConfig, corpus_texts: Iterable[str]) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Return ``(model, tokenizer)`` for ``cfg.base``; ``corpus_texts`` only trains the preset's tokenizer."""
    if cfg.base == PRESET:
        tokenizer = train_bpe_tokenizer(corpus_texts, cfg.tokenizer_vocab_size)
        model = build_tiny_qwen2(cfg, tokenizer)
    elif cfg.base.endswith(".gguf"):
        model, tokenizer = load_gguf(cfg.base)
        model = model.to(getattr(torch, cfg.dtype))
    else:
        tokenizer = AutoTokenizer.from_pretrained(cfg.base)
        with MODEL_BUILD_LOCK:
            model = AutoModelForCausalLM.from_pretrained(cfg.base, dtype=getattr(torch, cfg.dtype))
    if tokenizer.pad_token is None:  # Llama-style tokenizers ship without one; padding is masked anyway
        if tokenizer.eos_token is None:
            raise ValueError(f"model.base: tokenizer of {cfg.base!r} has neither pad nor eos token")
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def load_gguf(path: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A GGUF checkpoint (e.g. SmolLM2-135M-Instruct.Q4_1.gguf) as a plain fp32 Hugging Face model.

    transformers dequantizes GGUF weights to fp32 but keeps a GGUF ``quantization_config`` marker, which
    makes ``save_pretrained`` refuse the model. The weights are ordinary tensors, so the model is rebuilt
    from its config without the marker and the state dict copied in: what the ``base_model`` stage saves
    then loads with plain ``AutoModelForCausalLM.from_pretrained``.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"model.base: GGUF file not found: {path}")
    src, name = str(file.parent), file.name
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    with MODEL_BUILD_LOCK:
        loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    return model.eval(), tokenizer


# ----------------------------------------------------------------------------------------------- SID tokens


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
        if not is_sid_token(t):
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


def init_sid_rows_from_titles(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                              sid_titles: Iterable[tuple[str, str]]) -> int:
    """Set each SID token's rows to the mean embedding of the titles of the items under that code.

    ``<b_7>`` starts as the average of the token embeddings of every title whose SID has code 7 at level
    1, so a pretrained model starts from what it already knows about those items' words (LC-Rec-style
    grounding) instead of one shared mean row. Call after `add_sid_tokens`; codes no title reaches keep
    their rows. Returns the number of SID tokens set.
    """
    matrices = [model.get_input_embeddings().weight]
    out = model.get_output_embeddings()
    if out is not None and out.weight.data_ptr() != matrices[0].data_ptr():
        matrices.append(out.weight)
    sums: list[dict[int, torch.Tensor]] = [{} for _ in matrices]
    counts: dict[int, int] = {}
    with torch.no_grad():
        for sid, title in sid_titles:
            ids = tokenizer.encode(title, add_special_tokens=False)
            if not ids or not title.strip():
                continue
            vecs = [w[torch.tensor(ids, device=w.device)].float().mean(0) for w in matrices]
            for tid in encode_sid(tokenizer, sid):
                counts[tid] = counts.get(tid, 0) + 1
                for acc, v in zip(sums, vecs, strict=True):
                    acc[tid] = acc[tid] + v if tid in acc else v.clone()
        for w, acc in zip(matrices, sums, strict=True):
            for tid, total in acc.items():
                w[tid] = (total / counts[tid]).to(w.dtype)
    return len(counts)


def encode_sid(tokenizer: PreTrainedTokenizerBase, sid: str) -> list[int]:
    """Token ids of ``sid``, one per level; raises ValueError unless each level is exactly one token."""
    parts = [sid_token(level, code) for level, code in enumerate(parse_sid(sid))]
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
        if not is_sid_token(t):
            raise ValueError(f"token {t!r} is not a SID token")
    return "".join(tokens)


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path) -> None:
    """save_pretrained both (safetensors) so the plain Auto classes reload them, SID tokens included."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
