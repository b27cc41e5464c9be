"""How well the model ranks the added (cold) items among themselves, per scoring of that search.

``Recommender``'s reserved new-item places (``NewItemSlots``) come from a constrained search over the added
items alone. This measures, on the test examples whose target is a cold item of an ``eval.cold_start``
store, the share whose target is within the first N of all added items, side by side in one run, for
- "raw" and "renormalized" scores of that search (beam 64, no exclusions);
- "content": the added items by the cosine of their text embedding to the mean of the history's (the
  content baseline's score, over the added items only);
- "predicted": the added items by the cosine to the model's own next-item guess in embedding space, the
  mean embedding of the full search's top beams (warm items, beam 20) weighted by their probabilities;
- "predicted + content": the sum of both unit vectors.

    python bench/cold_scoring.py --store artifacts/amazon-industrial-cold

The cold items get their SIDs as the evaluation gives them (`sidrec.eval.cold.assign_cold_sids`, the
admin-add path). Chance for top-N is N / (added items). Writes ``bench/results/cold_scoring-<store>.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from sidrec.data.cold_start import cold_items
from sidrec.decode.beam import SidDecoder
from sidrec.eval.cold import assign_cold_sids
from sidrec.recommender import Recommender
from sidrec.sids.embed import read_embeddings
from sidrec.sids.index import SidIndex
from sidrec.store import ArtifactStore

log = logging.getLogger("bench.cold_scoring")
REPO = Path(__file__).resolve().parents[1]
TOPS = (1, 2, 3, 5, 10)
SLOTS = (1, 2, 3, 5)  # reserved places compared
TOP_K = 10


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", required=True, help="a store evaluated with eval.cold_start")
    ap.add_argument("--split", default="test")
    ap.add_argument("--beams", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)

    store = ArtifactStore(args.store)
    cold = cold_items(store)
    if not cold:
        raise SystemExit(f"--store {args.store}: no cold items (was its dataset built with eval.cold_start?)")
    rec = Recommender.from_store(args.store)
    added = assign_cold_sids(args.store, cold)
    ids, codes = list(added["item_ids"]), np.asarray(added["codes"])
    # histories may name cold items: their prompts show the SIDs, their embeddings join the history's mean
    rec.add_items(ids, codes, added["titles"], embeddings=added["embeddings"])
    index = SidIndex.build(codes, ids, rec.index.codebook_size)
    added_set = set(ids)
    examples = [e for e in store.split(args.split, ["user_id", "history", "target"]).to_pylist()
                if e["target"] in added_set]
    prompts = [rec.prompt_ids(e["history"], rec.profiles.get(e["user_id"], ""), e["user_id"]) for e in examples]
    rows, model_rank = {}, {}
    for scoring in ("raw", "renormalized"):
        decoder = SidDecoder(rec.model, rec.tokenizer, index, num_beams=args.beams, scoring=scoring)
        t0, ranks = time.perf_counter(), []
        full = np.full((len(examples), len(ids)), args.beams, np.int64)  # [E, A] place in the search, beams if none
        col = {it: c for c, it in enumerate(ids)}
        for i in range(0, len(prompts), args.batch):
            for j, (e, hits) in enumerate(zip(examples[i:i + args.batch],
                                              decoder.search(prompts[i:i + args.batch], k=args.beams), strict=True)):
                items = [it for h in hits for it in h.items]
                ranks.append(items.index(e["target"]) if e["target"] in items else len(ids))
                full[i + j, [col[it] for it in items]] = np.arange(len(items))
        model_rank[scoring] = full
        rows[scoring] = {**rates(np.asarray(ranks)), "seconds": round(time.perf_counter() - t0, 1)}
    rows.update(embedding_rows(store, rec, examples, prompts, ids, args.batch, model_rank["renormalized"]))
    chance = {f"top{n}": n / len(ids) for n in TOPS}
    log.info("%d %s examples with a cold target, %d added items, beam %d\n", len(examples), args.split, len(ids),
             args.beams)
    log.info("| scoring | " + " | ".join(f"top-{n}" for n in TOPS) + " |\n|---|" + "---:|" * len(TOPS))
    for name, row in [*rows.items(), ("chance", chance)]:
        log.info(f"| {name} | " + " | ".join(f"{row[f'top{n}']:.4f}" for n in TOPS) + " |")
    warm = warm_places(store, args.split, added_set)
    log.info("\nHR@10 / NDCG@10 with s of the top-10 places for added items, ranked each way (cold targets); "
             "warm targets (%d): the stored SID-LLM lists without the added items, cut to 10 - s", warm["examples"])
    log.info("\n| ranking | " + " | ".join(f"s={s}" for s in SLOTS) + " |\n|---|" + "---:|" * len(SLOTS))
    for name, row in rows.items():
        log.info(f"| cold: {name} | " + " | ".join(f"{row[f'cold_hr10_s{s}']:.4f} / {row[f'cold_ndcg10_s{s}']:.4f}"
                                                   for s in SLOTS) + " |")
    log.info("| warm: the SID-LLM | "
             + " | ".join(f"{warm[f'warm_hr10_s{s}']:.4f} / {warm[f'warm_ndcg10_s{s}']:.4f}" for s in SLOTS) + " |")
    out = Path(args.out or REPO / "bench" / "results" / f"cold_scoring-{Path(args.store).name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"store": args.store, "split": args.split, "examples": len(examples),
                               "added_items": len(ids), "beams": args.beams, "rows": rows, "chance": chance,
                               "warm": warm},
                              indent=2))
    log.info("wrote %s", out)


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def embedding_rows(store: ArtifactStore, rec: Recommender, examples: list[dict], prompts: list[list[int]],
                   ids: list[str], batch: int, model_rank: np.ndarray) -> dict[str, dict]:
    """Top-N rates of the added items ranked in embedding space: by the history's mean, by the model's guess
    (its beams' embeddings weighted by softmax(score)) and by both; and the renormalized search's places
    fused with the content ranking (reciprocal-rank fusion, 1 / (60 + place) summed: no weight to tune)."""
    item_ids, emb = read_embeddings(store)
    emb = unit(np.asarray(emb, np.float32))
    pos = {i: r for r, i in enumerate(item_ids)}
    added = emb[[pos[i] for i in ids]]  # [A, D]
    t0 = time.perf_counter()
    history = unit(np.stack([emb[[pos[i] for i in e["history"]]].mean(axis=0) for e in examples]))  # [E, D]
    guess = []
    for i in range(0, len(prompts), batch):
        for hits in rec.decoder.search(prompts[i:i + batch], k=rec.decoder.num_beams):
            scores = np.asarray([h.score for h in hits], np.float64)
            w = np.exp(scores - scores.max())
            vecs = np.stack([emb[[pos[it] for it in h.items]].mean(axis=0) for h in hits])
            guess.append((w[:, None] * vecs).sum(axis=0) / w.sum())
    guess = unit(np.stack(guess).astype(np.float32))
    seconds = round(time.perf_counter() - t0, 1)
    target = np.asarray([ids.index(e["target"]) for e in examples])
    out = {}
    rows = np.arange(len(target))
    for name, query in (("content", history), ("predicted", guess), ("predicted + content", unit(guess + history))):
        scores = query @ added.T  # [E, A]
        ranks = (scores > scores[rows, target][:, None]).sum(axis=1)
        out[name] = {**rates(ranks), "seconds": seconds}
        if name == "content":
            content_place = (-scores).argsort(axis=1).argsort(axis=1)  # [E, A] 0 = most similar
    fused = 1.0 / (60 + model_rank) + 1.0 / (60 + content_place)
    ranks = (fused > fused[rows, target][:, None]).sum(axis=1)
    out["renormalized + content (RRF)"] = {**rates(ranks), "seconds": seconds}
    return out


def rates(ranks: np.ndarray) -> dict[str, float]:
    """Top-N rates of 0-based target places among the added items, and HR/NDCG@10 of the cold targets when
    those items fill the last s places of a top-10 (``NewItemSlots``' merge; the main list's own cold hits,
    rare, are left out)."""
    out = {f"top{n}": float((ranks < n).mean()) for n in TOPS}
    for s in SLOTS:
        hit = ranks < s
        out[f"cold_hr10_s{s}"] = float(hit.mean())
        out[f"cold_ndcg10_s{s}"] = float(np.where(hit, 1.0 / np.log2(TOP_K - s + ranks + 2), 0.0).mean())
    return out


def warm_places(store: ArtifactStore, split: str, added: set[str]) -> dict[str, float]:
    """HR/NDCG@10 of the SID-LLM on the warm targets of the store's evaluation when s of its places go to
    added items: its stored top-10 without the added items, cut to 10 - s (exact for s >= the run's
    ``eval.new_item_slots``: the merge keeps the main list's order)."""
    table = store.read_table(f"{store.current_path(f'eval_{split}')}/predictions.parquet",
                             ["target", "sid-llm", "cold_target"]).to_pylist()
    warm = [r for r in table if not r["cold_target"]]
    out: dict[str, float] = {"examples": len(warm)}
    for s in SLOTS:
        hr = ndcg = 0.0
        for r in warm:
            top = [i for i in r["sid-llm"] if i not in added][:TOP_K - s]
            if r["target"] in top:
                hr += 1
                ndcg += 1.0 / np.log2(top.index(r["target"]) + 2)
        out[f"warm_hr10_s{s}"], out[f"warm_ndcg10_s{s}"] = hr / len(warm), ndcg / len(warm)
    return out


if __name__ == "__main__":
    main()
