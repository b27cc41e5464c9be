"""Non-generative baselines for next-item recommendation: most-popular, SASRec and content similarity.

Both rank the full catalog (no sampled negatives) and share one API, so an evaluator treats them alike:
``recommend(histories, k, exclude_history=False) -> list[list[str]]``, histories oldest item first.

- ``MostPopular``: items ordered by how many training users interacted with them.
- ``SASRec`` (Kang & McAuley 2018): ID-based causal transformer over the history; an item's score is the
  dot product of the last hidden state with that item's (input) embedding. Trained with full-softmax
  cross-entropy over the catalog. ``train_sasrec`` fits it on an Examples table; a fitted model is two
  files (``sasrec.safetensors`` weights + ``sasrec.json`` config, item ids, training log), no pickle.
- ``ContentBaseline``: items by the cosine of their text embedding to the mean of the history's; it needs no
  interactions, so it ranks items nobody has interacted with yet (the cold-start reference).

Sequence layout (shared by training and inference): ``[START, h_1, ..., h_n]`` at positions 0..n, padded
on the right. START is the padding item (its embedding is zero), so it carries only position 0: the
output at position j predicts the item after h_j, and an empty history reads position 0 alone, which
training teaches to predict a sequence's first item (a popularity-like ranking). Positions count from the
oldest item, so with causal attention the outputs for a prefix are the same inside any longer sequence.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from sidrec.config import TOP_K, SASRecConfig, section_from_dict
from sidrec.eval.metrics import hr_ndcg, target_ranks

WEIGHTS_FILE = "sasrec.safetensors"
CONFIG_FILE = "sasrec.json"
FORMAT_NAME = "sidrec.sasrec"
FORMAT_VERSION = 1


# ----------------------------------------------------------------------------------------------------
# shared helpers


def _id_order(ids: Sequence[str]) -> list[str]:
    """Ids sorted as integers when every id is numeric (so "9" < "10"), else as strings (as data.py)."""
    if ids and all(i.isascii() and i.isdigit() and len(i) <= 18 for i in ids):
        return sorted(ids, key=lambda i: (int(i), i))
    return sorted(ids)


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")


def _check_known(histories: Sequence[Sequence[str]], index: dict[str, int]) -> None:
    """Raise ValueError naming up to 5 history ids that are not in the catalog."""
    unknown = list(dict.fromkeys(i for h in histories for i in h if i not in index))
    if unknown:
        shown = ", ".join(repr(i) for i in unknown[:5])
        raise ValueError(f"histories name {len(unknown)} item id(s) not in the catalog: {shown}")


def _columns(examples: pa.Table) -> tuple[list[str], list[list[str]], list[str]]:
    for c in ("user_id", "history", "target"):
        if c not in examples.column_names:
            raise ValueError(f"examples table has no {c!r} column (columns: {', '.join(examples.column_names)})")
    return (
        [str(u) for u in examples["user_id"].to_pylist()],
        [[str(i) for i in h] for h in examples["history"].to_pylist()],
        [str(t) for t in examples["target"].to_pylist()],
    )


def hr_ndcg_at_k(recommend: Callable[[list[list[str]], int], list[list[str]]], examples: pa.Table,
                 k: int = TOP_K) -> dict[str, float]:
    """Full-ranking next-item HR@k and NDCG@k of any recommender's ``recommend`` (exclude_history left off)."""

    _check_k(k)
    _, histories, targets = _columns(examples)
    if not targets:
        return {f"hr@{k}": 0.0, f"ndcg@{k}": 0.0, "n": 0}
    return {**hr_ndcg(target_ranks(recommend(histories, k), targets), ks=(k,)), "n": len(targets)}


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Run with n intra-op threads (0: leave torch's setting), restored afterwards."""
    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------------------
# most popular


class MostPopular:
    """Rank items by training popularity: the number of users who interacted with each item.

    A user's interactions are the union of the histories and targets of all their examples, each
    (user, item) counted once, so a user's overlapping examples do not inflate their items. Ties (and
    items never seen, count 0) go by item id order: numeric when every id is numeric, else string.
    The catalog is ``item_ids`` when given, else the items seen in ``fit``; histories naming an id
    outside it raise ValueError, as SASRec's do.
    """

    def __init__(self, item_ids: Sequence[str] | None = None):
        self.item_ids = None if item_ids is None else [str(i) for i in item_ids]
        self.counts: dict[str, int] = {}
        self.ranking: list[str] = []  # all catalog items, most popular first
        self._index: dict[str, int] = {}

    def fit(self, examples: pa.Table) -> MostPopular:
        users, histories, targets = _columns(examples)
        seen: dict[str, set[str]] = {}
        for user, history, target in zip(users, histories, targets, strict=True):
            items = seen.setdefault(user, set())
            items.update(history)
            items.add(target)
        counts = Counter(i for items in seen.values() for i in items)
        catalog = list(dict.fromkeys(self.item_ids)) if self.item_ids is not None else list(counts)
        if self.item_ids is not None:
            _check_known([list(counts)], {i: 0 for i in catalog})
        self.counts = {i: counts.get(i, 0) for i in catalog}
        order = {i: r for r, i in enumerate(_id_order(catalog))}
        self.ranking = sorted(catalog, key=lambda i: (-self.counts[i], order[i]))
        self._index = {i: r for r, i in enumerate(self.ranking)}
        return self

    def recommend(self, histories: list[list[str]], k: int, exclude_history: bool = False) -> list[list[str]]:
        """Top-k item ids per history (the same list for every history unless exclude_history)."""
        _check_k(k)
        if not self.ranking:
            raise ValueError("MostPopular is not fitted: call fit(train_examples) first")
        _check_known(histories, self._index)
        out = []
        for history in histories:
            if not exclude_history:
                out.append(self.ranking[:k])
                continue
            skip = set(history)
            # at most len(skip) of the first k + len(skip) items are skipped
            out.append([i for i in self.ranking[:k + len(skip)] if i not in skip][:k])
        return out


class ContentBaseline:
    """Rank items by the cosine similarity of their embedding to the mean of the history's item embeddings.

    ``embeddings[i]`` belongs to ``item_ids[i]`` (the ``embeddings`` stage: MiniLM over each item's text).
    Equal scores go by catalog order; an empty history scores every item 0.
    """

    def __init__(self, item_ids: Sequence[str], embeddings: Any):
        emb = np.asarray(embeddings, dtype=np.float32)
        if emb.ndim != 2 or emb.shape[0] != len(item_ids):
            raise ValueError(f"need one embedding row per item: {len(item_ids)} items, shape {emb.shape}")
        self.item_ids = [str(i) for i in item_ids]
        self._index = {i: n for n, i in enumerate(self.item_ids)}
        self.emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)

    def recommend(self, histories: list[list[str]], k: int, exclude_history: bool = False,
                  batch_size: int = 512) -> list[list[str]]:
        """Top-k item ids per history over the whole catalog; exclude_history drops items already in it."""
        _check_k(k)
        _check_known(histories, self._index)
        out: list[list[str]] = []
        for start in range(0, len(histories), batch_size):
            chunk = histories[start:start + batch_size]
            query = np.zeros((len(chunk), self.emb.shape[1]), np.float32)
            for row, h in enumerate(chunk):
                if h:
                    query[row] = self.emb[[self._index[i] for i in h]].mean(axis=0)
            query /= np.maximum(np.linalg.norm(query, axis=1, keepdims=True), 1e-12)
            scores = query @ self.emb.T  # [B, N]
            for row, h in enumerate(chunk):
                if exclude_history and h:
                    scores[row, [self._index[i] for i in h]] = -np.inf
                top = np.argsort(-scores[row], kind="stable")[:k]  # best first, ties by catalog order
                out.append([self.item_ids[i] for i in top if scores[row, i] > -np.inf])
        return out


# ----------------------------------------------------------------------------------------------------
# SASRec


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        self.num_heads, self.dropout = cfg.num_heads, cfg.dropout
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, d] -> [B, T, d]; position t attends to positions <= t (right padding needs no mask)."""
        B, T, d = x.shape
        q, k, v = (t.view(B, T, self.num_heads, d // self.num_heads).transpose(1, 2)
                   for t in self.qkv(x).split(d, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, T, d))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + ffn(ln(x))."""

    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        d = cfg.hidden_size
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = CausalSelfAttention(cfg)
        self.ffn = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, d] -> [B, T, d]."""
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.ffn(self.ln2(x)))


class SASRec(nn.Module):
    """Item ids 1..N (0 = padding / START) -> hidden states -> scores over all N catalog items."""

    def __init__(self, num_items: int, cfg: SASRecConfig):
        super().__init__()
        self.num_items, self.config = num_items, cfg
        d = cfg.hidden_size
        self.item_emb = nn.Embedding(num_items + 1, d, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_len + 1, d)  # position 0 = START, 1..max_len = history
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.num_layers)])
        self.ln_f = nn.LayerNorm(d)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.Embedding) and m.padding_idx is not None:
            nn.init.zeros_(m.weight[m.padding_idx])

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """seq [B, T] item indices laid out [0, h_1, ..., h_n, 0, ...] -> hidden states [B, T, d].

        The hidden state at position j summarises START + h_1..h_j and predicts the next item.
        """
        pos = torch.arange(seq.shape[1], device=seq.device)
        x = self.drop(self.item_emb(seq) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)

    def scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., d] -> scores [..., N] for items 1..N (shared input/output embeddings)."""
        return hidden @ self.item_emb.weight[1:].t()


class SASRecRecommender:
    """A trained SASRec with its catalog: item_ids[i] is model item i + 1."""

    def __init__(self, model: SASRec, item_ids: Sequence[str], history: list[dict] | None = None):
        self.model = model.eval()
        self.config = model.config
        self.item_ids = [str(i) for i in item_ids]
        self.index = {i: n + 1 for n, i in enumerate(self.item_ids)}
        if len(self.index) != len(self.item_ids):
            raise ValueError("item_ids has duplicates")
        self.history = history or []  # training log: one record per epoch

    def encode(self, histories: Sequence[Sequence[str]]) -> list[list[int]]:
        """Item ids -> model indices, each history cut to its most recent max_len items."""
        _check_known(histories, self.index)
        n = self.config.max_len
        return [[self.index[i] for i in h[len(h) - n:]] if len(h) > n else [self.index[i] for i in h]
                for h in histories]

    @torch.no_grad()
    def score(self, histories: Sequence[Sequence[str]]) -> torch.Tensor:
        """Histories -> next-item scores [len(histories), N] (columns in item_ids order)."""
        seqs = self.encode(histories)
        with _torch_threads(self.config.num_threads):
            return _score_indices(self.model, seqs)

    def recommend(self, histories: list[list[str]], k: int, exclude_history: bool = False,
                  batch_size: int = 1024) -> list[list[str]]:
        """Top-k item ids per history over the full catalog; exclude_history drops items already in it."""
        _check_k(k)
        seqs = self.encode(histories)
        out: list[list[str]] = []
        with _torch_threads(self.config.num_threads):
            for start in range(0, len(seqs), batch_size):
                chunk = seqs[start:start + batch_size]
                scores = _score_indices(self.model, chunk)
                if exclude_history:
                    for row, h in enumerate(histories[start:start + batch_size]):
                        idx = [self.index[i] - 1 for i in h]
                        if idx:
                            scores[row, idx] = -math.inf
                top = scores.topk(min(k, scores.shape[1]), dim=1)
                for vals, ids in zip(top.values.tolist(), top.indices.tolist(), strict=True):
                    out.append([self.item_ids[i] for v, i in zip(vals, ids, strict=True) if v > -math.inf])
        return out

    # ------------------------------------------------------------------ persistence

    def to_bytes(self) -> dict[str, bytes]:
        """{"sasrec.safetensors": ..., "sasrec.json": ...}: write them anywhere."""
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.model.state_dict().items()}
        meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "config": asdict(self.config),
                "item_ids": self.item_ids, "history": self.history}
        return {WEIGHTS_FILE: st_save(state, metadata={"format": "pt"}),
                CONFIG_FILE: json.dumps(meta, indent=1).encode()}

    @classmethod
    def from_bytes(cls, files: dict[str, bytes]) -> SASRecRecommender:
        missing = [f for f in (WEIGHTS_FILE, CONFIG_FILE) if f not in files]
        if missing:
            raise ValueError(f"sasrec files missing: {missing} (got {sorted(files)})")
        meta = json.loads(files[CONFIG_FILE])
        if meta.get("format") != FORMAT_NAME or meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"{CONFIG_FILE} is not a {FORMAT_NAME} v{FORMAT_VERSION} file: "
                             f"format={meta.get('format')!r} version={meta.get('version')!r}")
        model = SASRec(len(meta["item_ids"]), section_from_dict(SASRecConfig, meta["config"]))
        model.load_state_dict(st_load(files[WEIGHTS_FILE]), strict=True)
        return cls(model, meta["item_ids"], list(meta.get("history", [])))

    def save(self, path: str | Path) -> Path:
        """Write sasrec.safetensors + sasrec.json into the directory path (created); returns it."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        for name, data in self.to_bytes().items():
            (out / name).write_bytes(data)
        return out

    @classmethod
    def load(cls, path: str | Path) -> SASRecRecommender:
        """Load what save wrote (on CPU, eval mode)."""
        p = Path(path)
        return cls.from_bytes({name: (p / name).read_bytes() for name in (WEIGHTS_FILE, CONFIG_FILE)})


def _pad(seqs: Sequence[Sequence[int]], width: int) -> torch.Tensor:
    """Index lists -> [len(seqs), width] int64, each row [0 (START), *seq, 0, ...]."""
    out = torch.zeros(len(seqs), width, dtype=torch.long)
    for row, s in enumerate(seqs):
        if s:
            out[row, 1:len(s) + 1] = torch.tensor(s, dtype=torch.long)
    return out


def _score_indices(model: SASRec, seqs: Sequence[Sequence[int]]) -> torch.Tensor:
    """Model indices (history only, <= max_len each) -> scores [B, N] from each history's last position."""
    was_training = model.training
    model.eval()
    with torch.no_grad():  # not inference_mode: recommend edits the scores in place
        lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
        hidden = model(_pad(seqs, int(lengths.max()) + 1 if len(seqs) else 1))
        scores = model.scores(hidden[torch.arange(len(seqs)), lengths])
    model.train(was_training)
    return scores


def _user_sequences(users: list[str], seqs: list[list[int]]) -> list[list[int]]:
    """Glue examples that continue one another back into the user sequences they were cut from.

    Example B continues example A (same user) when B minus its target is A's sequence (a growing
    prefix, as in leave-one-out) or, when A has the longest length in the table (its history was cut),
    A's sequence minus its oldest item (a sliding history window).
    Each chain A, B, C, ... becomes A's sequence + B's target + C's target + ...; an example that
    continues nothing starts a chain.
    """
    longest = max(len(s) for s in seqs)  # only a history cut to the longest length can slide
    key_of: dict[tuple[str, tuple[int, ...]], int] = {}
    for n, (u, s) in enumerate(zip(users, seqs, strict=True)):
        key_of.setdefault((u, tuple(s)), n)
        if len(s) == longest:
            key_of.setdefault((u, tuple(s[1:])), n)
    successor: dict[int, int] = {}
    continues = set()
    for n, (u, s) in enumerate(zip(users, seqs, strict=True)):
        prev = key_of.get((u, tuple(s[:-1])))
        if prev is not None and prev != n and prev not in successor:
            successor[prev] = n
            continues.add(n)
    out, seen = [], set()
    # chain heads first; then anything left (members of a cycle of identical examples) on its own
    for n in [n for n in range(len(seqs)) if n not in continues] + list(range(len(seqs))):
        if n in seen:
            continue
        full, m = list(seqs[n]), n
        seen.add(n)
        while m in successor and successor[m] not in seen:
            m = successor[m]
            seen.add(m)
            full.append(seqs[m][-1])
        out.append(full)
    return out


def _training_sequences(users: list[str], seqs: list[list[int]], cfg: SASRecConfig
                        ) -> list[tuple[list[int], int]]:
    """Examples (history + target as model indices) -> (sequence, first label) pairs to train on.

    A sequence [x_0, ..., x_m] has labels x_0..x_m, label j predicted from START + x_0..x_{j-1}; the loss
    covers labels first..m. Each sequence holds at most window = min(max_len, longest history) + 1
    items, so training never sees more context than the examples give.

    "last": every example as is, loss on its target only. "all": the user sequences rebuilt by
    _user_sequences, cut into windows that end every window // 2 items; a window's loss covers only
    the items no earlier window predicted, so each item is predicted once per epoch, from at least
    half a window of context (less only near a sequence's start). On ml-100k (sliding 20-item
    histories) that is 2 tokens per interaction instead of the 21 of training on every example.
    """
    window = min(cfg.max_len, max(len(s) for s in seqs) - 1) + 1
    if cfg.loss_positions == "last":
        return [(s[-window:], min(len(s), window) - 1) for s in seqs]
    stride = max(1, window // 2)  # ml-100k valid HR@10 was the same with window // 4 and window
    out = []
    for s in _user_sequences(users, seqs):
        out.append((s[:window], 0))
        end = min(window, len(s))
        while end < len(s):
            new_end = min(end + stride, len(s))
            out.append((s[new_end - window:new_end], window - (new_end - end)))
            end = new_end
    return out


def _batch_loss(model: SASRec, batch: list[tuple[list[int], int]]) -> torch.Tensor:
    """Mean full-softmax cross-entropy over the labels of a batch of (sequence, first label) pairs."""
    width = max(len(s) for s, _ in batch)
    tokens = _pad([s[:-1] for s, _ in batch], width)  # [B, T]: START, x_0..x_{m-1}; output j predicts x_j
    labels = _pad([s for s, _ in batch], width + 1)[:, 1:]  # [B, T]: x_0..x_m, 0 = padding
    first = torch.tensor([f for _, f in batch], dtype=torch.long)
    mask = (labels > 0) & (torch.arange(width)[None] >= first[:, None])  # [B, T]
    hidden = model(tokens)  # [B, T, d]
    return F.cross_entropy(model.scores(hidden[mask]), labels[mask] - 1)  # scores [M, N]


def train_sasrec(train: pa.Table, item_ids: Sequence[str], cfg: SASRecConfig | None = None,
                 valid: pa.Table | None = None,
                 progress: Callable[[int, dict], None] | None = None) -> SASRecRecommender:
    """Fit SASRec on train Examples over the catalog item_ids; returns the recommender (eval mode, CPU).

    With valid, HR@10 on it is computed after every epoch and the best epoch's weights are kept (early
    stopping per cfg.patience). progress(epoch, record) gets each epoch's record (loss, seconds, and
    valid hr@10 / ndcg@10). Deterministic given cfg.seed and thread count; the global RNG is untouched.
    """
    cfg = cfg or SASRecConfig()
    item_ids = [str(i) for i in item_ids]
    if not item_ids:
        raise ValueError("item_ids is empty: nothing to rank")
    users, histories, targets = _columns(train)
    if not targets:
        raise ValueError("train has no examples")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        rec = SASRecRecommender(SASRec(len(item_ids), cfg), item_ids)
    full = [h + [t] for h, t in zip(histories, targets, strict=True)]
    _check_known(full, rec.index)
    seqs = [[rec.index[i] for i in s] for s in full]
    train_seqs = _training_sequences(users, seqs, cfg)
    if valid is not None:
        _check_known(_columns(valid)[1], rec.index)

    model = rec.model
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    best_hr, best_state, since_best = -1.0, None, 0
    with _torch_threads(cfg.num_threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # dropout
        for epoch in range(cfg.epochs):
            t0 = time.perf_counter()
            model.train()
            perm = torch.randperm(len(train_seqs), generator=gen).tolist()
            total, steps = 0.0, 0
            for start in range(0, len(perm), cfg.batch_size):
                loss = _batch_loss(model, [train_seqs[i] for i in perm[start:start + cfg.batch_size]])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total, steps = total + loss.item(), steps + 1
            record: dict[str, Any] = {"epoch": epoch, "loss": total / steps,
                                      "seconds": round(time.perf_counter() - t0, 3)}
            if valid is not None:
                record.update({f"valid_{k}": v for k, v in hr_ndcg_at_k(rec.recommend, valid, TOP_K).items()
                               if k != "n"})
            rec.history.append(record)
            if progress is not None:
                progress(epoch, record)
            if valid is None:
                continue
            if record[f"valid_hr@{TOP_K}"] > best_hr:
                best_hr, since_best = record[f"valid_hr@{TOP_K}"], 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                since_best += 1
                if cfg.patience and since_best >= cfg.patience:
                    break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return rec
