"""Quality of a trained SID-LLM from the artifact store, against simple references, in one run:

- next-item HR@10 / NDCG@10 on a seeded sample of users of a split (constrained beam search over real
  SIDs) vs most-popular (train-split popularity) on the same users;
- SID -> title on a seeded sample of catalog items: exact-match rate and token F1 of the greedy answer,
  vs chance (the title of another random item).

    python bench/train_quality.py --config tiny-cpu [--split valid] [--users 500] [--items 300]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
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


def most_popular_metrics(train, users, k: int = 10) -> dict[str, float]:
    counts = Counter(train.column("target").to_pylist())
    for h in train.column("history").to_pylist():
        counts.update(h)
    top = [i for i, _ in counts.most_common(k)]
    hits = [top.index(t) if t in top else None for t in users]
    return {f"hr@{k}": sum(h is not None for h in hits) / len(users),
            f"ndcg@{k}": sum(1 / math.log2(h + 2) for h in hits if h is not None) / len(users)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny-cpu")
    ap.add_argument("--split", default="valid")
    ap.add_argument("--users", type=int, default=500)
    ap.add_argument("--items", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sidrec.config import load_config
    from sidrec.instructions import TEMPLATES, render_next_item
    from sidrec.llm import encode_prompt
    from sidrec.store import ArtifactStore
    from sidrec.train import SidTrie, fetch_model_dir, recommend_hr_at_k

    cfg = load_config(args.config, args.overrides)
    store = ArtifactStore(cfg.store.root)
    ds_path, sids_path = store.current_path("dataset"), store.current_path("sids")
    sid_rows = store.read_table(f"{sids_path}/sids.parquet").to_pylist()
    sid_of = {r["item_id"]: r["sid"] for r in sid_rows}
    catalog = store.read_table(f"{ds_path}/catalog.parquet")
    titles = dict(zip(catalog.column("item_id").to_pylist(), catalog.column("title").to_pylist(), strict=True))
    train = store.read_table(f"{ds_path}/train.parquet")
    split = store.read_table(f"{ds_path}/{args.split}.parquet").to_pylist()
    profiles = {r["user_id"]: r["profile"] for r in store.read_table(f"{ds_path}/profiles.parquet").to_pylist()}

    model_dir = fetch_model_dir(store)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    torch.set_num_threads(2)
    rng = random.Random(args.seed)

    sample = rng.sample(split, min(args.users, len(split)))
    prompts = [render_next_item(r["user_id"], r["history"], r["target"], sid_of, profiles.get(r["user_id"], ""),
                                cfg.instructions)["prompt"] for r in sample]
    trie = SidTrie(tok, list(sid_of.values()))
    model_rec = recommend_hr_at_k(model, tok, prompts, [sid_of[r["target"]] for r in sample], trie,
                                  max_length=cfg.train.max_length)
    pop_rec = most_popular_metrics(train, [r["target"] for r in sample])

    items = rng.sample(sorted(sid_of), min(args.items, len(sid_of)))
    template = TEMPLATES[cfg.instructions.language]["sid_to_title"][0]
    exact = f1 = chance_f1 = 0.0
    for item in items:
        ids = torch.tensor([encode_prompt(template.format(sid=sid_of[item]), tok, cfg.train.max_length - 48)])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=48, do_sample=False, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id)
        answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
        exact += answer == titles[item].strip()
        f1 += token_f1(answer, titles[item])
        chance_f1 += token_f1(titles[rng.choice(items)], titles[item])
    n = len(items)
    result = {
        "config": args.config, "split": args.split, "users": len(sample), "items": n,
        "model": model_rec, "most_popular": pop_rec,
        "sid_to_title": {"exact_match": exact / n, "token_f1": f1 / n, "chance_exact_match": 1 / len(sid_of),
                         "chance_token_f1": chance_f1 / n},
        "model_version": store.require("model")["version"],
    }
    print(f"\nNext-item on {len(sample)} {args.split} users (full ranking over {len(sid_of)} items)")
    print(f"  {'model':<14} {'HR@10':>7} {'NDCG@10':>8}")
    for name, m in (("SID-LLM", model_rec), ("most-popular", pop_rec)):
        print(f"  {name:<14} {m['hr@10']:>7.4f} {m['ndcg@10']:>8.4f}")
    s = result["sid_to_title"]
    print(f"SID -> title on {n} items: exact {s['exact_match']:.3f} (chance {s['chance_exact_match']:.5f}), "
          f"token F1 {s['token_f1']:.3f} (chance {s['chance_token_f1']:.3f})")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    out = Path(args.out) / f"train_quality_{args.config}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
