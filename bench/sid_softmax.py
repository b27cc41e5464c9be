"""Training-step cost of the level softmax (`train.sid_softmax=level`) vs the full-vocabulary loss, side by side.

One forward + backward of the quickstart (d=128, 2 layers) and tiny-cpu (d=256, 4 layers) presets on the same
batch: 16 rows of 125 tokens, vocabulary 4,800 (4,000 BPE + 785 SID tokens + padding), every position after
the first 25 a history SID label (like a sequence-window row) and the last 5 the response. Best of
interleaved repetitions, 1 torch thread.

    python bench/sid_softmax.py [--reps 5]

Prints a table and writes bench/results/sid_softmax.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from sidrec.llm.train.loss import SidLevels, level_softmax_loss

REPO = Path(__file__).resolve().parents[1]
SHAPES = {"quickstart (d=128, 2 layers)": (128, 2, 384), "tiny-cpu (d=256, 4 layers)": (256, 4, 768)}
VOCAB, TEXT, LEVELS, K, ROWS, LEN, PROMPT = 4800, 4000, 3, 256, 16, 125, 120


def batch_and_levels() -> tuple[dict[str, torch.Tensor], torch.Tensor, SidLevels]:
    ids = [torch.arange(TEXT + lv * K, TEXT + (lv + 1) * K) for lv in range(LEVELS)]
    level = torch.full((VOCAB,), -1, dtype=torch.long)
    index = torch.zeros(VOCAB, dtype=torch.long)
    for lv, members in enumerate(ids):
        level[members], index[members] = lv, torch.arange(K)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, TEXT, (ROWS, LEN), generator=g)
    for p in range(25, LEN):  # SID tokens cycle a, b, c after the template text
        x[:, p] = TEXT + ((p - 25) % LEVELS) * K + torch.randint(0, K, (ROWS,), generator=g)
    labels = x.clone()
    labels[:, :26] = -100
    batch = {"input_ids": x, "labels": labels, "attention_mask": torch.ones_like(x)}
    in_prompt = torch.arange(LEN)[None, :].expand(ROWS, LEN) < PROMPT
    return batch, in_prompt, SidLevels(level, index, ids)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "sid_softmax.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    batch, in_prompt, levels = batch_and_levels()
    rows = []
    for name, (d, layers, inter) in SHAPES.items():
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, hidden_size=d, num_hidden_layers=layers,
                                             num_attention_heads=4, num_key_value_heads=2,
                                             intermediate_size=inter, tie_word_embeddings=True))
        fns = {
            "full": lambda m=model: m(**batch, use_cache=False).loss.backward(),
            "level": lambda m=model: level_softmax_loss(m, m.get_output_embeddings().weight, batch, in_prompt,
                                                        levels).backward(),
        }
        best = {k: float("inf") for k in fns}
        for _ in range(args.reps):
            for k, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                best[k] = min(best[k], time.perf_counter() - t0)
                model.zero_grad(set_to_none=True)
        rows.append({"model": name, "full_ms": round(best["full"] * 1e3, 1), "level_ms": round(best["level"] * 1e3, 1),
                     "speedup": round(best["full"] / best["level"], 2)})
    print(f"forward+backward, {ROWS} x {LEN} tokens, vocab {VOCAB}, 1 thread, best of {args.reps}")
    print("| model | full softmax ms | level softmax ms | speed-up |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['full_ms']} | {r['level_ms']} | {r['speedup']}x |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"reps": args.reps, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
