"""Constrained beam search over Semantic IDs: a user's prompt -> the top-K real items, batched, with a KV cache.

    decoder = SidDecoder(model, tokenizer, SidIndex.from_table(sids_table), num_beams=20)
    hits = decoder.search([prompt_ids_1, prompt_ids_2], k=10)   # list (per request) of Hit, best first

How one batch of R requests is decoded (L = SID levels, B = beams):

1. prefill: the R left-padded prompts run once ([R, T]); the last position's logits score level 0, so
   the prompt is never copied B times before it is encoded (Hugging Face ``generate`` prefills R*B rows);
2. the best B valid first codes per request are kept and the KV cache is repeated to [R*B, ...];
3. for levels 1..L-1, one forward step of the R*B beams; per step the index turns every beam's trie node
   into a [R*B, K] mask of valid next codes (tensor ops, no per-beam Python), and top-B over B*K
   candidates per request picks the new beams. Only the few generated cache positions are reordered:
   beams never leave their request, and all beams of a request share the prompt part of the cache.

Scoring (``scoring``): "raw" = the model's log-probabilities over the whole vocabulary, summed over the L
tokens (invalid tokens are masked but their mass is not redistributed); "renormalized" = log-probabilities
renormalized over the valid tokens at each step (Hugging Face ``renormalize_logits=True``). A beam whose
prefix has no valid continuation gets -inf and is dropped: constrained decoding never falls back to
unconstrained tokens. ``constrained=False`` decodes freely over the vocabulary (to measure how many
unconstrained outputs are not real items: those come back with ``valid=False``).

``sidrec.decode.hf_reference.hf_reference_search`` is the same search done by ``model.generate(num_beams=B, num_return_sequences=K,
prefix_allowed_tokens_fn=...)``; tests check that both return the same items in the same order with equal
scores, and ``bench/decode.py`` compares their speed.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from sidrec.config import NUM_BEAMS, TOP_K
from sidrec.sids.index import SidIndex
from sidrec.sids.tokens import render_sid, sid_token

Scoring = Literal["raw", "renormalized"]
SCORINGS = ("raw", "renormalized")


@dataclass
class Hit:
    """One recommended SID: its items (several under the ``keep`` collision policy), total log-prob score."""

    sid: str
    codes: tuple[int, ...]
    score: float
    items: list[str] = field(default_factory=list)
    valid: bool = True  # False only for unconstrained outputs that are not a stored SID


def sid_token_table(tokenizer, levels: int, codebook_size: int) -> torch.Tensor:
    """[L, K] token id of code k at level l (-1 where the tokenizer lacks that token)."""
    table = torch.full((levels, codebook_size), -1, dtype=torch.long)
    unk = tokenizer.unk_token_id
    for level in range(levels):
        ids = tokenizer.convert_tokens_to_ids([sid_token(level, k) for k in range(codebook_size)])
        for k, i in enumerate(ids):
            if i is not None and i != unk:
                table[level, k] = i
    return table


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> (input_ids, attention_mask) [R, T], left-padded so every prompt ends at T-1."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        mask[row, width - len(p):] = 1
    return ids, mask


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


class SidDecoder:
    """Batched constrained beam search of a causal LM over the SIDs of a ``SidIndex``."""

    def __init__(self, model, tokenizer, index: SidIndex, num_beams: int = NUM_BEAMS, scoring: Scoring = "raw"):
        if num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {num_beams}")
        if scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
        self.model, self.tokenizer, self.index = model, tokenizer, index
        self.num_beams, self.scoring = num_beams, scoring
        self.levels = index.levels
        self.device = next(model.parameters()).device
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.tokens = sid_token_table(tokenizer, index.levels, index.codebook_size).to(self.device)  # [L, K]
        # the codes used at level l are exactly the trie's level-l child codes (main and delta index)
        parts = [index, *([index.delta] if index.delta is not None else [])]
        used = [np.unique(np.concatenate([p.child_codes[lv] for p in parts])) for lv in range(self.levels)]
        if any(u.size for u in used):
            missing = [(lv, int(c)) for lv in range(self.levels) for c in used[lv] if int(self.tokens[lv, int(c)]) < 0]
            if missing:
                raise ValueError(f"the tokenizer lacks SID tokens used by the index, e.g. "
                                 f"{[sid_token(lv, c) for lv, c in missing[:5]]}; add them with add_sid_tokens")
        if int(self.tokens.max()) >= self.vocab_size:
            raise ValueError(f"SID token ids reach {int(self.tokens.max())} but the model has {self.vocab_size} "
                             "output rows; resize its embeddings")
        # token id -> (level, code), for reading unconstrained outputs
        self._code_of = {int(t): (lv, k) for lv in range(self.levels) for k, t in enumerate(self.tokens[lv].tolist())
                         if t >= 0}
        self._item_codes: dict[str, tuple[int, ...]] | None = None
        self._item_codes_version = -1  # the index version the map was built from
        self.pad_id = pad_id(tokenizer)
        index.to(self.device)

    # ----------------------------------------------------------------------------------- helpers
    def _item_index(self) -> dict[str, tuple[int, ...]]:
        if self._item_codes is None or self._item_codes_version != self.index.version:
            ids = self.index.all_item_ids()
            self._item_codes = {i: tuple(int(c) for c in row) for i, row in zip(ids, self.index.codes(), strict=True)}
            self._item_codes_version = self.index.version
        return self._item_codes

    def item_codes(self, item_id: str) -> tuple[int, ...]:
        """The SID codes of a stored item (KeyError if unknown)."""
        return self._item_index()[str(item_id)]

    def _excluded_sids(self, exclude: Collection[str]) -> list[tuple[int, ...]]:
        """SIDs all of whose items are in ``exclude`` (those can be removed from the search)."""
        ex = set(map(str, exclude))
        out = set()
        for item in ex:
            codes = self.item_codes(item)
            if codes not in out and set(map(str, self.index.items_of(codes))) <= ex:
                out.add(codes)
        return sorted(out)

    def _bans(self, exclude: Sequence[Collection[str]]) -> list[torch.Tensor]:
        """Per level l, [R, E, l+1]: (prefix, code) pairs whose whole subtree is excluded, -1-padded.

        A prefix is banned where it is reached, at the highest level possible, so no beam is spent on a
        branch that can only end in excluded items (that is what a trie without those items would do)."""
        L, R = self.levels, len(exclude)
        per_level: list[list[list[tuple[int, ...]]]] = [[[] for _ in range(R)] for _ in range(L)]
        for r, ex in enumerate(exclude):
            sids = self._excluded_sids(ex)
            if not sids:
                continue
            arr = np.asarray(sids, dtype=np.int64)
            done: set[tuple[int, ...]] = set()  # banned shorter prefixes: their subtrees are gone already
            for d in range(1, L + 1):
                prefixes, counts = np.unique(arr[:, :d], axis=0, return_counts=True)
                full = counts == self.index.leaf_counts(prefixes)
                for p in prefixes[full]:
                    p = tuple(int(x) for x in p)
                    if not any(p[:j] in done for j in range(1, d)):
                        per_level[d - 1][r].append(p)
                        done.add(p)
        out = []
        for level in range(L):
            E = max(1, max(len(x) for x in per_level[level]))
            t = torch.full((R, E, level + 1), -1, dtype=torch.long)
            for r, rows in enumerate(per_level[level]):
                if rows:
                    t[r, :len(rows)] = torch.as_tensor(rows)
            out.append(t.to(self.device))
        return out

    @staticmethod
    def _mask_banned(allowed: torch.Tensor, prefix: torch.Tensor, ban: torch.Tensor, R: int, B: int) -> torch.Tensor:
        """allowed [R*B, K] & not banned: ``ban`` [R, E, l+1] holds (prefix of length l, code) rows of each
        request (-1 = padding); ``prefix`` [R*B, l] is every beam's codes so far."""
        E, l1 = ban.shape[1], ban.shape[2]
        pre = prefix.view(R, B, 1, l1 - 1)
        hit = (pre == ban[:, None, :, :l1 - 1]).all(-1) & (ban[:, None, :, 0] >= 0)     # [R, B, E]
        code = ban[:, None, :, l1 - 1].expand(R, B, E)
        K = allowed.shape[1]
        block = torch.zeros(R, B, K + 1, dtype=torch.bool, device=allowed.device)
        block.scatter_(2, torch.where(hit, code, K), True)
        return allowed & ~block[..., :K].reshape(R * B, K)

    def _forward(self, input_ids, attention_mask, position_ids, cache):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :].float(), out.cache

    def _level_scores(self, logits: torch.Tensor, level: int, allowed: torch.Tensor) -> torch.Tensor:
        """logits [N, V] -> log-prob of each code at ``level`` [N, K], -inf where not allowed."""
        tok = self.tokens[level]
        cols = tok.clamp(min=0)
        allowed = allowed & (tok >= 0)[None, :]
        if self.scoring == "raw":
            scores = torch.log_softmax(logits, dim=-1).gather(1, cols.expand(logits.shape[0], -1))
            return scores.masked_fill(~allowed, float("-inf"))
        masked = logits.gather(1, cols.expand(logits.shape[0], -1)).masked_fill(~allowed, float("-inf"))
        # renormalize over the valid codes; a row with none stays all -inf (log_softmax would give NaN)
        any_ok = allowed.any(dim=-1, keepdim=True)
        return torch.where(any_ok, torch.log_softmax(masked.masked_fill(~any_ok, 0.0), dim=-1),
                           torch.full_like(masked, float("-inf")))

    # ------------------------------------------------------------------------------------ search
    @torch.no_grad()
    def search(self, prompts: Sequence[Sequence[int]], k: int = TOP_K, exclude: Sequence[Collection[str]] | None = None,
               constrained: bool = True) -> list[list[Hit]]:
        """Top-``k`` distinct items for each prompt (token id lists, as ``encode_prompt`` makes them).

        ``exclude[r]``: item ids request r must not get (e.g. its history); SIDs whose items are all excluded
        are pruned from the trie for that request, so the beams are spent on other items. Returns per request up to ``k``
        hits, best first (fewer only if fewer valid items exist). With ``constrained=False`` returns the top-k
        beams of free decoding, marked ``valid=False`` when they are not stored SIDs.
        """
        if not 1 <= k <= self.num_beams:
            raise ValueError(f"k must be in [1, num_beams={self.num_beams}], got {k}")
        if exclude is not None and len(exclude) != len(prompts):
            raise ValueError(f"exclude has {len(exclude)} entries for {len(prompts)} prompts")
        if not prompts:
            return []
        if exclude is not None:
            known = self._item_index()
            unknown = sorted({str(i) for ex in exclude for i in ex if str(i) not in known})
            if unknown:
                raise ValueError(f"unknown item ids to exclude: {unknown[:10]}")
        if not constrained:
            return self._search_free(prompts, k)
        was_training = self.model.training
        self.model.eval()
        try:
            codes, scores = self._beams(prompts, exclude)
        finally:
            self.model.train(was_training)
        return [self._hits(codes[r], scores[r], k, exclude[r] if exclude is not None else ()) for r in range(len(prompts))]

    def _beams(self, prompts, exclude) -> tuple[np.ndarray, np.ndarray]:
        """Constrained search -> codes [R, B, L] and scores [R, B] (descending; -inf = no valid beam)."""
        R, B, L, dev = len(prompts), self.num_beams, self.levels, self.device
        ids, mask = left_pad(prompts, self.pad_id)
        ids, mask = ids.to(dev), mask.to(dev)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits, cache = self._forward(ids, mask, pos, None)                        # [R, V]
        T = ids.shape[1]
        next_pos = pos[:, -1] + 1                                                  # [R]
        bans = self._bans(exclude) if exclude is not None else None                 # per level [R, E, l+1]

        state = self.index.state_of(torch.zeros(R, 0, dtype=torch.long, device=dev))  # root, [R, 2]
        allowed = self.index.allowed_from_state(state, 0)
        if bans is not None:
            allowed = self._mask_banned(allowed, torch.zeros(R, 0, dtype=torch.long, device=dev), bans[0], R, 1)
        level_scores = self._level_scores(logits, 0, allowed)                      # [R, K]
        K = level_scores.shape[1]
        width = min(B, K)
        top, code = level_scores.topk(width, dim=-1)                               # [R, width]
        if width < B:  # fewer codes than beams: pad with dead beams
            top = torch.cat([top, top.new_full((R, B - width), float("-inf"))], dim=1)
            code = torch.cat([code, code.new_zeros((R, B - width))], dim=1)
        beam_scores = top.reshape(R * B)
        beam_codes = code.reshape(R * B, 1)
        state = state.repeat_interleave(B, dim=0)
        state = self.index.step_state(state, beam_codes[:, 0], 0)
        if L == 1:
            return beam_codes.view(R, B, 1).cpu().numpy(), beam_scores.view(R, B).cpu().numpy()

        cache.batch_repeat_interleave(B)
        mask = mask.repeat_interleave(B, dim=0)
        step_pos = next_pos.repeat_interleave(B)
        base = (torch.arange(R, device=dev) * B)[:, None]                          # [R, 1]
        for level in range(1, L):
            # dead (-inf) beams may hold a code without a token (-1): feed any token, their score stays -inf
            tokens = self.tokens[level - 1].gather(0, beam_codes[:, -1]).clamp(min=0)  # [R*B]
            mask = torch.cat([mask, mask.new_ones(R * B, 1)], dim=1)
            logits, cache = self._forward(tokens[:, None], mask, step_pos[:, None], cache)
            step_pos = step_pos + 1
            allowed = self.index.allowed_from_state(state, level)
            if bans is not None:
                allowed = self._mask_banned(allowed, beam_codes, bans[level], R, B)
            cand = self._level_scores(logits, level, allowed) + beam_scores[:, None]  # [R*B, K]
            top, flat = cand.view(R, B * K).topk(B, dim=-1)                       # [R, B]
            parent = (base + flat // K).reshape(-1)                                # [R*B] rows into R*B
            new_code = (flat % K).reshape(-1, 1)
            beam_scores = top.reshape(-1)
            beam_codes = torch.cat([beam_codes[parent], new_code], dim=1)
            if level < L - 1:  # the last level needs no trie node and no cache
                state = self.index.step_state(state[parent], new_code[:, 0], level)
                self._reorder_generated(cache, parent, T)
        return beam_codes.view(R, B, L).cpu().numpy(), beam_scores.view(R, B).cpu().numpy()

    @staticmethod
    def _reorder_generated(cache, parent: torch.Tensor, prompt_len: int) -> None:
        """Move the generated positions of the KV cache to the new beams' rows. The prompt positions are
        identical for all beams of a request and beams stay in their request, so they need no copy."""
        for layer in cache.layers:
            for name in ("keys", "values"):
                t = getattr(layer, name)
                t[:, :, prompt_len:] = t[parent, :, prompt_len:]

    def _hits(self, codes: np.ndarray, scores: np.ndarray, k: int, exclude: Collection[str]) -> list[Hit]:
        excluded = set(map(str, exclude))
        alive = np.isfinite(scores)
        codes, scores = codes[alive], scores[alive]
        hits: list[Hit] = []
        n_items = 0
        for c, s, rows in zip(codes, scores, self.index.rows_of_many(codes), strict=True):
            if n_items >= k:
                break
            items = [i for i in (str(self.index.item_of_row(r)) for r in rows) if i not in excluded][:k - n_items]
            if not items:
                continue
            sid_codes = tuple(int(x) for x in c)
            hits.append(Hit(render_sid(sid_codes), sid_codes, float(s), items))
            n_items += len(items)
        return hits

    # ------------------------------------------------------------------------------ free decoding
    def _search_free(self, prompts, k: int) -> list[list[Hit]]:
        """Beam search over the whole vocabulary for L steps (raw scores): the unconstrained baseline."""
        R, B, L, dev = len(prompts), self.num_beams, self.levels, self.device
        was_training = self.model.training
        self.model.eval()
        try:
            ids, mask = left_pad(prompts, self.pad_id)
            ids, mask = ids.to(dev), mask.to(dev)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            logits, cache = self._forward(ids, mask, pos, None)
            T = ids.shape[1]
            logp = torch.log_softmax(logits, dim=-1)
            top, tok = logp.topk(B, dim=-1)
            scores, seqs = top.reshape(-1), tok.reshape(-1, 1)
            cache.batch_repeat_interleave(B)
            mask = mask.repeat_interleave(B, dim=0)
            step_pos = (pos[:, -1] + 1).repeat_interleave(B)
            base = (torch.arange(R, device=dev) * B)[:, None]
            V = logp.shape[1]
            for step in range(1, L):
                mask = torch.cat([mask, mask.new_ones(R * B, 1)], dim=1)
                logits, cache = self._forward(seqs[:, -1:], mask, step_pos[:, None], cache)
                step_pos = step_pos + 1
                cand = torch.log_softmax(logits, dim=-1) + scores[:, None]
                top, flat = cand.view(R, B * V).topk(B, dim=-1)
                parent = (base + flat // V).reshape(-1)
                scores = top.reshape(-1)
                seqs = torch.cat([seqs[parent], (flat % V).reshape(-1, 1)], dim=1)
                if step < L - 1:
                    self._reorder_generated(cache, parent, T)
        finally:
            self.model.train(was_training)
        seqs_np, scores_np = seqs.view(R, B, L).cpu().numpy(), scores.view(R, B).cpu().numpy()
        out = []
        for r in range(R):
            hits = []
            for seq, s in zip(seqs_np[r][:k], scores_np[r][:k], strict=True):
                hits.append(self._read_free(seq, float(s)))
            out.append(hits)
        return out

    def _read_free(self, seq: np.ndarray, score: float) -> Hit:
        parsed = [self._code_of.get(int(t)) for t in seq]
        if all(p is not None and p[0] == lv for lv, p in enumerate(parsed)):
            codes = tuple(p[1] for p in parsed)
            if self.index.contains(codes):
                return Hit(render_sid(codes), codes, score, [str(i) for i in self.index.items_of(codes)])
            return Hit(render_sid(codes), codes, score, [], valid=False)
        text = self.tokenizer.decode([int(t) for t in seq])
        return Hit(text, (), score, [], valid=False)
