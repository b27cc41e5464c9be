"""Alignment quality of trained SID-LLMs from their artifact stores, side by side: SID -> title on a seeded
sample of catalog items (exact-match rate and token F1 of the greedy answer, vs chance: the title of another
random item) and title -> SID (share of exact catalog titles whose item is in the top 5 of constrained beam
search, beam 20). Next-item quality (HR/NDCG vs most-popular and SASRec) is `sidrec eval`.

    python bench/train_quality.py --config tiny-cpu smollm2-cpu [--items 300]
    python bench/train_quality.py --config amazon-industrial-cold smollm2-cpu \
        --stores artifacts/amazon-industrial-cold-text -       # a store other than the config's (- = its own)
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def token_f1(pred: str, gold: str) -> float:
    p, g = re.findall(r"\w+", pred.lower()), re.findall(r"\w+", gold.lower())
    common = sum((Counter(p) & Counter(g)).values())
    if not p or not g or not common:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def alignment_quality(name: str, overrides: list[str], n_items: int, seed: int, store_root: str | None = None
                      ) -> dict:
    """SID -> title and title -> SID of one config's trained model (same seeded items for every config)."""
    import torch

    from sidrec.config import load_config
    from sidrec.llm.instructions import TEMPLATES
    from sidrec.llm.sft import encode_prompt
    from sidrec.recommender import Recommender
    from sidrec.store import ArtifactStore

    if store_root:
        overrides = [*overrides, f"store.root={store_root}"]
    cfg = load_config(name, overrides)
    store = ArtifactStore(cfg.store.root)
    sid_of, titles = store.sid_map(), store.titles()
    rec = Recommender.from_store(cfg.store.root, num_beams=20)
    model, tok = rec.model, rec.tokenizer
    rng = random.Random(seed)
    items = rng.sample(sorted(i for i in sid_of if titles.get(i, "").strip()), min(n_items, len(sid_of)))
    lang = TEMPLATES[cfg.instructions.language]
    exact = f1 = chance_f1 = found = 0.0
    t0 = time.perf_counter()
    for item in items:
        ids = torch.tensor([encode_prompt(lang["sid_to_title"][0].format(sid=sid_of[item]), tok,
                                          cfg.train.max_length - 48)])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=48, do_sample=False, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id)
        answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
        exact += answer == titles[item].strip()
        f1 += token_f1(answer, titles[item])
        chance_f1 += token_f1(titles[rng.choice(items)], titles[item])
    for s in range(0, len(items), 16):
        chunk = items[s:s + 16]
        prompts = [encode_prompt(lang["title_to_sid"][0].format(title=titles[i].strip()), tok, rec.max_prompt_tokens)
                   for i in chunk]
        for item, hits in zip(chunk, rec.decoder.search(prompts, k=5), strict=True):
            found += item in {i for h in hits for i in h.items}
    n = len(items)
    return {
        "config": name, "store": cfg.store.root, "overrides": overrides, "items": n, "model_version": store.require("model")["version"],
        "base": store.require("base_model")["config"].get("base"),
        "sid_to_title": {"exact_match": exact / n, "token_f1": f1 / n, "chance_exact_match": 1 / len(sid_of),
                         "chance_token_f1": chance_f1 / n},
        "title_to_sid": {"top5": found / n, "chance_top5": 5 / len(sid_of)},
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", nargs="+", default=["tiny-cpu"], help="configs whose stores hold trained models")
    ap.add_argument("--stores", nargs="+", default=None,
                    help="store roots, one per --config (- = the config's own); default: the configs' own")
    ap.add_argument("--items", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    ap.add_argument("overrides", nargs="*", help="section.option=value, applied to every config")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    stores = args.stores or ["-"] * len(args.config)
    if len(stores) != len(args.config):
        ap.error(f"--stores needs one root per --config ({len(args.config)}), got {len(stores)}")
    results = [alignment_quality(name, args.overrides, args.items, args.seed, None if root == "-" else root)
               for name, root in zip(args.config, stores, strict=True)]
    print(f"alignment on {args.items} seeded catalog items (seed {args.seed})")
    print("| config | store | SID->title exact | token F1 | chance F1 | title->SID in top 5 | chance | s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        a, b = r["sid_to_title"], r["title_to_sid"]
        print(f"| {r['config']} | {r['store']} | {a['exact_match']:.3f} | {a['token_f1']:.3f} | {a['chance_token_f1']:.3f} | "
              f"{b['top5']:.3f} | {b['chance_top5']:.4f} | {r['seconds']} |")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    out = Path(args.out) / "train_quality.json"
    out.write_text(json.dumps({"seed": args.seed, "command": "python bench/train_quality.py " + " ".join(
        sys.argv[1:]), "results": results}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
