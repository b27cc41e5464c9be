"""The slow reference for `SidDecoder`: the same constrained search by Hugging Face ``generate``.

Kept for the agreement tests and `bench/decode.py`: both must return the same items, in the same order,
with the same scores.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch

from sidrec.config import NUM_BEAMS, TOP_K
from sidrec.decode.beam import Hit, Scoring, left_pad, pad_id, sid_token_table
from sidrec.sids.index import SidIndex
from sidrec.sids.tokens import render_sid


class _PrefixTrie:
    """Token-id prefix tree for ``prefix_allowed_tokens_fn``: the slow reference, one Python call per beam."""

    def __init__(self, token_seqs: Sequence[tuple[int, ...]], fallback: int):
        self.children: dict[tuple[int, ...], list[int]] = {}
        tmp: dict[tuple[int, ...], set[int]] = {}
        for seq in token_seqs:
            for i in range(len(seq)):
                tmp.setdefault(seq[:i], set()).add(seq[i])
        self.children = {p: sorted(c) for p, c in tmp.items()}
        self.fallback = fallback

    def allowed(self, prefix: tuple[int, ...]) -> list[int]:
        # HF raises on an empty list; an off-tree prefix only occurs on a dead (-inf or -1e9) beam, whose
        # result is discarded, so any single token keeps it going harmlessly.
        return self.children.get(prefix, [self.fallback])


@torch.no_grad()
def hf_reference_search(model, tokenizer, index: SidIndex, prompts: Sequence[Sequence[int]], k: int = TOP_K,
                        num_beams: int = NUM_BEAMS, scoring: Scoring = "raw",
                        exclude: Sequence[Collection[str]] | None = None) -> list[list[Hit]]:
    """The same search by ``model.generate(num_beams, num_return_sequences, prefix_allowed_tokens_fn)``.

    ``length_penalty=0`` makes HF's sequence score the plain sum of token log-probs; ``renormalize_logits``
    gives the "renormalized" scoring. Beams HF keeps only to fill its width (score <= -1e9) are dropped.
    """
    if not 1 <= k <= num_beams:
        raise ValueError(f"k must be in [1, num_beams={num_beams}], got {k}")
    L = index.levels
    table = sid_token_table(tokenizer, L, index.codebook_size)
    tries = []
    all_codes = index.codes()
    ids_all = index.all_item_ids()
    for r in range(len(prompts)):
        ex = set(map(str, exclude[r])) if exclude is not None else set()
        keep = {tuple(int(x) for x in c) for c, i in zip(all_codes, ids_all, strict=True) if str(i) not in ex}
        tries.append(_PrefixTrie([tuple(int(table[lv, c]) for lv, c in enumerate(s)) for s in keep],
                                 tokenizer.eos_token_id))
    pad = pad_id(tokenizer)
    ids, mask = left_pad(prompts, pad)
    device = next(model.parameters()).device
    width = ids.shape[1]

    def allowed(batch_id: int, input_ids: torch.Tensor) -> list[int]:
        return tries[batch_id].allowed(tuple(input_ids[width:].tolist()))

    was_training = model.training
    model.eval()
    try:
        out = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=L,
            num_beams=num_beams, num_return_sequences=num_beams, do_sample=False, length_penalty=0.0,
            early_stopping=True, prefix_allowed_tokens_fn=allowed, renormalize_logits=scoring == "renormalized",
            pad_token_id=pad, eos_token_id=tokenizer.eos_token_id, use_cache=True,
            output_scores=True, return_dict_in_generate=True,
        )
    finally:
        model.train(was_training)
    code_of = {int(t): (lv, kk) for lv in range(L) for kk, t in enumerate(table[lv].tolist()) if t >= 0}
    seqs = out.sequences[:, width:].cpu().tolist()
    scores = out.sequences_scores.float().cpu().tolist()
    results = []
    for r in range(len(prompts)):
        ex = set(map(str, exclude[r])) if exclude is not None else set()
        hits, seen, n = [], set(), 0
        for seq, s in zip(seqs[r * num_beams:(r + 1) * num_beams], scores[r * num_beams:(r + 1) * num_beams],
                          strict=True):
            if s <= -1e8 or n >= k:
                continue
            parsed = [code_of.get(int(t)) for t in seq]
            codes = tuple(p[1] for p in parsed if p is not None)
            if codes in seen or len(codes) != L:
                continue
            seen.add(codes)
            items = [str(i) for i in index.items_of(codes) if str(i) not in ex][:k - n]
            if items:
                hits.append(Hit(render_sid(codes), codes, float(s), items))
                n += len(items)
        results.append(hits)
    return results
