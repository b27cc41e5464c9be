"""How well the model ranks the added (cold) items among themselves, per scoring of that search.

``Recommender``'s reserved new-item places (``NewItemSlots``) come from a constrained search over the added
items alone. This measures, on the test examples whose target is a cold item of an ``eval.cold_start``
store, the share whose target is within the first N of all added items, for "raw" and "renormalized"
scores of that search (beam 64, no exclusions), side by side in one run:

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
from sidrec.sids.index import SidIndex
from sidrec.store import ArtifactStore

log = logging.getLogger("bench.cold_scoring")
REPO = Path(__file__).resolve().parents[1]
TOPS = (1, 2, 3, 5, 10)


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
    rec.add_items(ids, codes, added["titles"])  # histories may name cold items: their prompts show the SIDs
    index = SidIndex.build(codes, ids, rec.index.codebook_size)
    added_set = set(ids)
    examples = [e for e in store.split(args.split, ["user_id", "history", "target"]).to_pylist()
                if e["target"] in added_set]
    prompts = [rec.prompt_ids(e["history"], rec.profiles.get(e["user_id"], ""), e["user_id"]) for e in examples]
    rows = {}
    for scoring in ("raw", "renormalized"):
        decoder = SidDecoder(rec.model, rec.tokenizer, index, num_beams=args.beams, scoring=scoring)
        t0, ranks = time.perf_counter(), []
        for i in range(0, len(prompts), args.batch):
            for e, hits in zip(examples[i:i + args.batch], decoder.search(prompts[i:i + args.batch], k=args.beams),
                               strict=True):
                items = [it for h in hits for it in h.items]
                ranks.append(items.index(e["target"]) if e["target"] in items else len(ids))
        r = np.asarray(ranks)
        rows[scoring] = {**{f"top{n}": float((r < n).mean()) for n in TOPS}, "seconds": round(time.perf_counter() - t0, 1)}
    chance = {f"top{n}": n / len(ids) for n in TOPS}
    log.info("%d %s examples with a cold target, %d added items, beam %d\n", len(examples), args.split, len(ids),
             args.beams)
    log.info("| scoring | " + " | ".join(f"top-{n}" for n in TOPS) + " |\n|---|" + "---:|" * len(TOPS))
    for name, row in [*rows.items(), ("chance", chance)]:
        log.info(f"| {name} | " + " | ".join(f"{row[f'top{n}']:.4f}" for n in TOPS) + " |")
    out = Path(args.out or REPO / "bench" / "results" / f"cold_scoring-{Path(args.store).name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"store": args.store, "split": args.split, "examples": len(examples),
                               "added_items": len(ids), "beams": args.beams, "rows": rows, "chance": chance},
                              indent=2))
    log.info("wrote %s", out)


if __name__ == "__main__":
    main()
