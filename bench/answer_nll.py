"""How much of the next item a trained SID-LLM knows: the target's negative log-likelihood, three ways.

    python bench/answer_nll.py --store artifacts/quickstart --rows 200

On the first ``--rows`` valid examples of the store (the held-out next item of each user), the summed NLL
in nats of the target SID's tokens:
(a) at the answer position (where generation starts), softmax over the whole vocabulary;
(b) the same position, each token scored among its own level's tokens only (what the trie allows there);
(c) at a history position: the target appended to the prompt's history list as one more item, scored like
    (b) (the position ``train.loss_on=items`` trains most).
Beside them, the NLL of a uniform pick among the catalog's items and of the train targets' popularity
unigram (add-one smoothed). A model near the unigram has learned the popularity prior, not the sequence.
Prints a table, writes JSON (default bench/results/answer_nll.json).
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import math
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sidrec.config import InstructionConfig, section_from_dict
from sidrec.llm.instructions import history_separator
from sidrec.llm.sft import encode_prompt
from sidrec.sids.tokens import LEVEL_PREFIXES
from sidrec.store import ArtifactStore

log = logging.getLogger("bench.answer_nll")


def level_ids(tokenizer) -> dict[str, torch.Tensor]:
    """Token ids of each SID level, keyed by the level's prefix letter."""
    vocab = tokenizer.get_vocab()
    return {p: torch.tensor(sorted(i for t, i in vocab.items() if t.startswith(f"<{p}_")))
            for p in LEVEL_PREFIXES if any(t.startswith(f"<{p}_") for t in vocab)}


def target_nll(model, tokenizer, levels, ids: list[int], target: list[int], by_level: bool) -> float:
    """Summed NLL of ``target`` following ``ids``."""
    with torch.no_grad():
        logits = model(torch.tensor([ids + target])).logits[0]
    total = 0.0
    for j, tok in enumerate(target):
        row = logits[len(ids) + j - 1]
        if by_level:
            members = levels[tokenizer.convert_ids_to_tokens([tok])[0][1]]
            total -= row[members].log_softmax(-1)[(members == tok).nonzero()[0, 0]].item()
        else:
            total -= row.log_softmax(-1)[tok].item()
    return total


def history_prefix(prompt: str, history_sids: list[str], separator: str) -> str:
    """The prompt cut right after its last history item, plus a separator: where item n+1 would start."""
    last = history_sids[-1]
    return prompt[:prompt.rindex(last) + len(last)] + separator


def measure(root: str, rows: int) -> dict:
    store = ArtifactStore(root)
    path = store.current_path("model")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    if getattr(tok, "chat_template", None):
        raise SystemExit("answer_nll handles models without a chat template only (the history position "
                         "would sit inside the user turn)")
    levels = level_ids(tok)
    inst = store.current_path("instructions")
    valid = store.read_table(f"{inst}/valid").to_pylist()[:rows]
    train = store.read_table(f"{inst}/train").to_pylist()
    counts = collections.Counter(r["response"] for r in train if r["task"] == "next_item")
    sid_of = store.sid_map()
    n_items = len(sid_of)
    icfg = section_from_dict(InstructionConfig, store.require("instructions")["config"])
    history = {r["user_id"]: r for r in store.split("valid").to_pylist()}
    sums = collections.Counter()
    for r in valid:
        target = tok.encode(r["response"], add_special_tokens=False)
        prompt = encode_prompt(r["prompt"], tok, 100_000)
        sums["answer, full softmax"] += target_nll(model, tok, levels, prompt, target, False)
        sums["answer, level softmax"] += target_nll(model, tok, levels, prompt, target, True)
        hist = [sid_of[i] for i in history[r["user_id"]]["history"] if i in sid_of]
        bos = [tok.bos_token_id] if tok.bos_token_id is not None else []  # as encode_prompt, minus the "\n" tail
        head = bos + tok.encode(history_prefix(r["prompt"], hist, history_separator(icfg)),
                                add_special_tokens=False)
        sums["history position, level softmax"] += target_nll(model, tok, levels, head, target, True)
        sums["popularity unigram"] -= math.log((counts.get(r["response"], 0) + 1) / (sum(counts.values()) + n_items))
    out = {k: v / len(valid) for k, v in sums.items()}
    out["uniform"] = math.log(n_items)
    return {"store": root, "rows": len(valid), "model_version": store.require("model")["version"], "nll": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True)
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "answer_nll.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    res = measure(args.store, args.rows)
    log.info("%s, %d valid rows: target NLL in nats (lower is better)", args.store, res["rows"])
    log.info("| scored | NLL |\n|---|---:|")
    for name, v in res["nll"].items():
        log.info("| %s | %.3f |", name, v)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
