"""Alignment quality of a trained SID-LLM from the artifact store: SID -> title on a seeded sample of catalog
items, exact-match rate and token F1 of the greedy answer, vs chance (the title of another random item).
Next-item quality (HR/NDCG vs most-popular and SASRec) is `sidrec eval`.

    python bench/train_quality.py --config tiny-cpu [--items 300]
"""

from __future__ import annotations

import argparse
import json
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny-cpu")
    ap.add_argument("--items", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sidrec.config import load_config
    from sidrec.llm.instructions import TEMPLATES
    from sidrec.llm.sft import encode_prompt
    from sidrec.store import ArtifactStore

    cfg = load_config(args.config, args.overrides)
    store = ArtifactStore(cfg.store.root)
    sid_of, titles = store.sid_map(), store.titles()

    model_dir = store.fetch_model_dir()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    torch.set_num_threads(2)
    rng = random.Random(args.seed)

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
        "config": args.config, "items": n,
        "sid_to_title": {"exact_match": exact / n, "token_f1": f1 / n, "chance_exact_match": 1 / len(sid_of),
                         "chance_token_f1": chance_f1 / n},
        "model_version": store.require("model")["version"],
    }
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
