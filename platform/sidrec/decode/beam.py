"""Constrained beam search over Semantic IDs: a user's prompt -> the top-K real items, batched, with a KV cache.

    decoder = SidDecoder(model, tokenizer, SidIndex.from_table(sids_table), num_beams=20)
    hits = decoder.search([prompt_ids_1, prompt_ids_2], k=10)   # list (per request) of Hit, best first

How one batch of R requests is decoded (L = SID levels, B = beams):

1. prefill: the R left-padded prompts run once ([R, T]); the last position's logits score level 0, so
   the prompt is never copied B times before it is encoded (Hugging Face ``generate`` prefills R*B rows);
2. the best B valid first codes per request are kept and the KV cache is repeated to [R*B, ...];
3. for levels 1..L-1, one forward step of the R*B beams; per step every beam's trie node becomes a
   [R*B, K] mask of valid next codes, and top-B over B*K candidates per request picks the new beams. Only
   the few generated cache positions are reordered: beams never leave their request, and all beams of a
   request share the prompt part of the cache.

Per step the search does a fixed handful of tensor ops, whatever R and B (no per-beam Python, no host
sync until the end), so on a small model it costs little next to the forward pass. Where the index has
dense tables for the depth (``SidIndex.dense_tables``: every depth of a catalog with up to ~16K SIDs,
the first two of any catalog) the mask is one row lookup per beam and the kept beams' next nodes one
lookup each; deeper, larger depths use the CSR trie (``allowed_from_nodes`` / ``step``). Masks are
additive (0 / -inf, added to the log-probs): on CPU a float add costs a tenth of a bool ``where``. The
last level's nodes are the leaves, so the hits' item rows need no second trie lookup. Exclusions
(``sidrec.decode.exclusion``) become per-request banned (prefix, code) pairs, computed for the batch at once.
The common case, a main index without a delta that is dense at every depth, takes a leaner walk
(``_DenseWalk``): exclusions become banned trie nodes, folded into a per-request [n + 1] row of 0 / -inf
over the next depth's nodes, so the mask and the bans of a level are one gather of the beams' child-table
rows, and the kept beams' next nodes a second gather of the same rows (177 tensor ops for a batch-1
request on the quickstart model, against 318 with prefix comparisons).

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
from sidrec.decode.exclusion import ban_bias, ban_tables, banned_nodes
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
    ids = np.full((len(prompts), width), pad_id, dtype=np.int64)   # numpy: no tensor op per row
    mask = np.zeros((len(prompts), width), dtype=np.int64)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = p
        mask[row, width - len(p):] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


NEG_INF = float("-inf")


def as_bias(mask: torch.Tensor) -> torch.Tensor:
    """bool mask -> additive mask, 0.0 where True, -inf where False (float32)."""
    return torch.zeros(mask.shape, device=mask.device).masked_fill_(~mask, NEG_INF)


class _TrieWalk:
    """The trie nodes of a batch of beams, in the main index and its delta, one depth per level.

    ``bias(depth)`` -> [N, K] additive mask of the N beams' valid next codes (0 / -inf: a float add is a
    fast CPU op where bool masks are not); ``advance`` moves to the beams top-k kept. Where the index has
    dense tables for the depth (``SidIndex.dense_tables``) that is one row lookup for the
    mask and one lookup per kept beam for its next node, absent nodes held as the tables' sentinel (a valid
    row, so no -1 handling); deeper, larger depths ask the CSR trie (``allowed_from_nodes`` / ``step``)."""

    def __init__(self, index: SidIndex, n: int, device: torch.device):
        self.parts = [index] if index.delta is None else [index, index.delta]
        self.nodes = [torch.zeros(n, dtype=torch.long, device=device) for _ in self.parts]  # [N] per part
        self.sentinel = [True] * len(self.parts)        # nodes in the dense tables' form (the root is 0)
        self.ids: list[torch.Tensor | None] = [None] * len(self.parts)  # this depth's child table or None
        self.device = device

    def bias(self, depth: int) -> torch.Tensor:
        out = None
        for i, part in enumerate(self.parts):
            dense = part.dense_tables(depth, self.device)
            self.ids[i], table = (None, None) if dense is None else dense
            if table is not None:
                if not self.sentinel[i]:  # from the CSR trie: -1 -> the sentinel row
                    self.nodes[i], self.sentinel[i] = self.nodes[i].remainder(table.shape[0]), True
                bias = table.index_select(0, self.nodes[i])
            else:
                if self.sentinel[i]:
                    self.nodes[i], self.sentinel[i] = self._minus1(part, depth, self.nodes[i]), False
                bias = as_bias(part.allowed_from_nodes(self.nodes[i], depth))
            out = bias if out is None else torch.maximum(out, bias)
        return out

    def advance(self, parent: torch.Tensor, codes: torch.Tensor, flat: torch.Tensor, depth: int) -> None:
        """parent [R*B]: the kept beams' rows among the N; codes [R*B, 1]: their new codes (``flat``: unused)."""
        for i, (part, ids) in enumerate(zip(self.parts, self.ids, strict=True)):
            nodes = self.nodes[i].index_select(0, parent)
            if ids is None:
                self.nodes[i] = part.step(nodes, codes.view(-1), depth)
            else:
                self.nodes[i] = torch.take(ids, nodes * ids.shape[1] + codes.view(-1))

    def leaves(self) -> torch.Tensor:
        """[N, 2] long (main, delta) nodes: after the last level, the leaves (-1 where absent)."""
        out = [self._minus1(p, p.levels, n) if s else n.long()
               for p, n, s in zip(self.parts, self.nodes, self.sentinel, strict=True)]
        return torch.stack(out if len(out) == 2 else [out[0], torch.full_like(out[0], -1)], dim=1)

    @staticmethod
    def _minus1(part: SidIndex, depth: int, nodes: torch.Tensor) -> torch.Tensor:
        """Depth-``depth`` nodes in the sentinel form -> long, -1 where absent."""
        nodes = nodes.long()
        return torch.where(nodes < part.n_nodes(depth), nodes, -1)


class _DenseWalk:
    """``_TrieWalk`` for the common case, a main index (no delta) dense at every depth, with the request's
    exclusions folded in. Per level: the beams' child-table rows ``child`` [N, K] (node ids one depth down,
    the sentinel where absent) and one gather of a per-request [R, n + 1] row of 0 / -inf over those nodes,
    -inf at the sentinel and at the banned nodes (``banned_nodes``): the mask and the bans in two ops, no
    prefix comparisons. ``advance`` reads the kept beams' next nodes out of ``child`` (one gather)."""

    def __init__(self, tables: list[tuple[torch.Tensor, torch.Tensor]], R: int, device: torch.device,
                 banned: list[tuple[np.ndarray, np.ndarray] | None] | None):
        self.ids = tables                   # per depth: (child table as long [n + 1, K], lookup [1, n' + 1])
        self.R = R
        self.nodes = torch.zeros(R, dtype=torch.long, device=device)
        self.child = self.nodes
        self.lookups = []
        for depth, (_, lookup) in enumerate(tables):
            ban = None if banned is None else banned[depth]
            if ban is None:
                self.lookups.append(lookup.expand(R, -1))
            else:  # built in numpy (no tensor op per request), one copy to the device
                own = np.zeros((R, lookup.shape[1]), dtype=np.float32)
                own[:, -1] = NEG_INF
                own[ban] = NEG_INF
                self.lookups.append(torch.from_numpy(own).to(device))

    def bias(self, depth: int) -> torch.Tensor:
        self.child = self.ids[depth][0].index_select(0, self.nodes)        # [N, K]
        return self.lookups[depth].gather(1, self.child.view(self.R, -1)).view(self.child.shape)

    def advance(self, parent: torch.Tensor, codes: torch.Tensor, flat: torch.Tensor, depth: int) -> None:
        """flat [R, B]: the kept candidates' positions in each request's [b * K] row of ``child``."""
        self.nodes = self.child.view(self.R, -1).gather(1, flat).view(-1)

    def leaves(self) -> torch.Tensor:
        """[N, 2] long (main leaf, -1: no delta), -1 for the sentinel (only dead beams hold it)."""
        main = self.nodes.masked_fill(self.nodes == self.ids[-1][1].shape[1] - 1, -1)
        return torch.stack([main, torch.full_like(main, -1)], dim=1)


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
        self._leaf_of: dict[str, int] | None = None
        self._leaf_of_version = -1
        self.pad_id = pad_id(tokenizer)
        # per level: the logit column of each code [K] (any column where it has no token), the first column
        # when they are one contiguous range (a slice then reads them), and which codes have a token (None: all)
        self._cols = list(self.tokens.clamp(min=0).unbind(0))
        ramp = torch.arange(self.tokens.shape[1], device=self.device)
        self._start = [int(t[0]) if bool((t == t[0] + ramp).all()) else None for t in self.tokens]
        self._tok_bias = [None if bool((t >= 0).all()) else as_bias(t >= 0) for t in self.tokens]
        K = index.codebook_size
        self._shift = K.bit_length() - 1 if K & (K - 1) == 0 else None  # code = flat & (K-1) when K = 2**s
        index.to(self.device)
        self._walk_src: list = []
        self._walk_tables: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    # ----------------------------------------------------------------------------------- helpers
    def _item_index(self) -> dict[str, tuple[int, ...]]:
        if self._item_codes is None or self._item_codes_version != self.index.version:
            ids = self.index.all_item_ids()
            self._item_codes = {i: tuple(int(c) for c in row) for i, row in zip(ids, self.index.codes(), strict=True)}
            self._item_codes_version = self.index.version
        return self._item_codes

    def _leaf_index(self) -> dict[str, int]:
        """Present item id -> its main-index leaf (what ``banned_nodes`` reads), per index version."""
        if self._leaf_of is None or self._leaf_of_version != self.index.version:
            self._leaf_of = dict(zip(self.index.all_item_ids(), self.index.row_leaves()[self.index.live_rows()].tolist(),
                                     strict=True))
            self._leaf_of_version = self.index.version
        return self._leaf_of

    def item_codes(self, item_id: str) -> tuple[int, ...]:
        """The SID codes of a stored item (KeyError if unknown)."""
        return self._item_index()[str(item_id)]

    def _dense_walk_tables(self) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """``_DenseWalk``'s tables, when the index has no delta and dense tables at every depth: per depth the
        child table as long and a [1, n' + 1] lookup of 0 / -inf (-inf at the sentinel), rebuilt when the
        index replaces its tables (after a retire)."""
        if self.index.delta is not None:
            return None
        dense = [self.index.dense_tables(d, self.device) for d in range(self.levels)]
        if any(x is None for x in dense):
            return None
        if self._walk_tables is None or any(a is not b for a, b in zip(self._walk_src, dense, strict=True)):
            out = []
            for d, (ids, _) in enumerate(dense):
                lookup = torch.zeros(1, self.index.n_nodes(d + 1) + 1, device=self.device)
                lookup[0, -1] = NEG_INF  # the sentinel: node n of depth d + 1, the child tables' "absent"
                out.append((ids.long(), lookup))
            self._walk_src, self._walk_tables = dense, out
        return self._walk_tables

    def _forward(self, input_ids, attention_mask, position_ids, cache):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :].float(), out.cache

    def _level_scores(self, logits: torch.Tensor, level: int, bias: torch.Tensor,
                      base: torch.Tensor | None = None) -> torch.Tensor:
        """logits [N, V] + additive mask [N, K] (0 / -inf) -> log-prob of each code at ``level`` [N, K],
        -inf where not allowed, plus ``base`` [N, 1] (the beams' scores so far) when given."""
        tok_bias, start, cols = self._tok_bias[level], self._start[level], self._cols[level]
        if tok_bias is not None:  # codes without a token are never allowed
            bias = bias + tok_bias
        if self.scoring == "raw":
            logp = torch.log_softmax(logits, dim=-1)
            codes = logp.narrow(1, start, cols.numel()) if start is not None else logp.index_select(1, cols)
            return codes + (bias if base is None else bias + base)
        masked = logits.index_select(1, cols) + bias
        # renormalize over the valid codes; a row with none stays all -inf (log_softmax would give NaN)
        any_ok = (bias == 0).any(dim=-1, keepdim=True)
        out = torch.where(any_ok, torch.log_softmax(masked.masked_fill(~any_ok, 0.0), dim=-1),
                          torch.full_like(masked, NEG_INF))
        return out if base is None else out + base

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
        if was_training:  # a no-op train(False) still walks every module: skip it when serving
            self.model.eval()
        try:
            codes, scores, leaves = self._beams(prompts, exclude)
        finally:
            if was_training:
                self.model.train()
        rows = self._rows(leaves, scores)
        return [self._hits(codes[r], scores[r], rows[r], k, exclude[r] if exclude is not None else ())
                for r in range(len(prompts))]

    def _beams(self, prompts, exclude) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Constrained search -> codes [R, B, L], scores [R, B] (descending; -inf = no valid beam) and the
        beams' leaves [R, B, 2] (main, delta node at depth L; -1 where absent)."""
        R, B, L, dev = len(prompts), self.num_beams, self.levels, self.device
        ids, mask = left_pad(prompts, self.pad_id)
        ids, mask = ids.to(dev), mask.to(dev)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits, cache = self._forward(ids, mask, pos, None)                        # [R, V]
        T = ids.shape[1]
        tables = self._dense_walk_tables()
        if tables is not None:  # exclusions folded into the walk's masks
            bans = None
            walk = _DenseWalk(tables, R, dev, None if exclude is None
                              else banned_nodes(self.index, self._leaf_index(), exclude))
        else:
            bans = None if exclude is None else ban_tables(self.index, self._item_index(), exclude, dev)  # [R, E, l+1]
            walk = _TrieWalk(self.index, R, dev)                                    # every request at the root
        first = torch.arange(R, device=dev)[:, None]                               # [R, 1] first row of request r
        step_pos = pos[:, -1:] + 1                                                 # [R, 1]
        beam_scores = beam_codes = new_code = logits.new_zeros(0)
        b = 1  # beams per request so far: 1 (the prompt) before level 0, then B
        for level in range(L):
            if level:
                # dead (-inf) beams may hold a code without a token: they feed any token, their score stays -inf
                tokens = torch.take(self._cols[level - 1], new_code)                    # [R*B, 1]
                logits, cache = self._forward(tokens, mask[:, :T + level], step_pos, cache)
                step_pos = step_pos + 1
            bias = walk.bias(level)                                                # [R*b, K] 0 / -inf
            if bans is not None and bans[level] is not None:
                bias = ban_bias(bias, beam_codes if level else first.new_zeros(R, 0), bans[level], R, b)
            cand = self._level_scores(logits, level, bias, beam_scores if level else None)  # [R*b, K]
            K = cand.shape[1]
            top, flat = cand.view(R, b * K).topk(min(B, b * K), dim=-1)          # [R, B]
            if top.shape[1] < B:  # fewer codes than beams (level 0 only): pad with dead beams
                top = torch.cat([top, top.new_full((R, B - top.shape[1]), NEG_INF)], dim=1)
                flat = torch.cat([flat, flat.new_zeros((R, B - flat.shape[1]))], dim=1)
            if self._shift is not None:  # K a power of two (the usual codebook): a shift and a mask
                parent, new_code = ((flat >> self._shift) + first).view(-1), (flat & (K - 1)).view(-1, 1)
            else:
                parent, new_code = (flat // K + first).view(-1), (flat % K).view(-1, 1)  # [R*B], [R*B, 1]
            walk.advance(parent, new_code, flat, level)
            beam_scores = top.view(-1, 1)                                          # [R*B, 1]
            beam_codes = torch.cat([beam_codes.index_select(0, parent), new_code], dim=1) if level else new_code
            if level == 0 and L > 1:  # every request's cache, mask and position to its B beams
                cache.batch_repeat_interleave(B)
                # the mask of every step at once: step l attends to the T prompt positions and l generated ones
                mask = torch.cat([mask.repeat_interleave(B, dim=0), mask.new_ones(R * B, L - 1)], dim=1)
                step_pos = step_pos.repeat_interleave(B, dim=0)
                first = first * B
            elif 0 < level < L - 1:  # the last level needs no cache
                self._reorder_generated(cache, parent, T)
            b = B
        out = torch.cat([beam_codes, walk.leaves()], dim=1).cpu().numpy()   # one copy back for both
        return out[:, :L].reshape(R, B, L), beam_scores.view(R, B).cpu().numpy(), out[:, L:].reshape(R, B, 2)

    @staticmethod
    def _reorder_generated(cache, parent: torch.Tensor, prompt_len: int) -> None:
        """Move the generated positions of the KV cache to the new beams' rows. The prompt positions are
        identical for all beams of a request and beams stay in their request, so they need no copy."""
        for layer in cache.layers:
            for name in ("keys", "values"):
                generated = getattr(layer, name)[:, :, prompt_len:]               # a view [N, H, g, D]
                generated.copy_(generated.contiguous().index_select(0, parent))  # (contiguous: 4x faster)

    def _rows(self, leaves: np.ndarray, scores: np.ndarray) -> list[list[list[int]]]:
        """Item rows of every live beam's leaf, one batched call: per request, per beam (dead beams: [])."""
        R, B = scores.shape
        alive = np.isfinite(scores).reshape(-1)
        found = iter(self.index.rows_of_state(leaves.reshape(-1, 2)[alive]))
        flat = [next(found) if a else [] for a in alive.tolist()]
        return [flat[r * B:(r + 1) * B] for r in range(R)]

    def _hits(self, codes: np.ndarray, scores: np.ndarray, rows: list[list[int]], k: int,
              exclude: Collection[str]) -> list[Hit]:
        """One request's beams (codes [B, L], scores [B], item rows per beam) -> up to ``k`` items' hits."""
        excluded = set(map(str, exclude))
        hits: list[Hit] = []
        n_items = 0
        for c, s, beam_rows in zip(codes, scores.tolist(), rows, strict=True):
            if n_items >= k:
                break
            if not beam_rows:  # a dead beam
                continue
            items = [i for i in (str(self.index.item_of_row(r)) for r in beam_rows) if i not in excluded]
            items = items[:k - n_items]
            if not items:
                continue
            sid_codes = tuple(c.tolist())
            hits.append(Hit(render_sid(sid_codes), sid_codes, s, items))
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
