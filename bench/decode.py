"""Constrained beam-search speed: sidrec's SidDecoder vs the Hugging Face reference vs the floor, one run.

    python bench/decode.py --store artifacts/amazon-industrial     # the store's model + a d=1024 8-layer
    python bench/decode.py --store artifacts/amazon-industrial --models store --batches 1 16 --threads 1 2
    python bench/decode.py --store artifacts/quickstart --models store --exclude-history   # as Serve decodes

For beam 20 and each batch size, on the same prompts (Amazon test examples rendered as in training):
(a) ``SidDecoder.search``; (b) ``hf_reference_search`` = ``generate(num_beams, num_return_sequences,
prefix_allowed_tokens_fn)``; (c) the floor = the model's bare forward passes: the prompt prefilled once per
request, the KV cache repeated to the beams, then one step per remaining SID level, no masking or search.
Reports recommendations/s, ms per request, ratios, and whether (a) and (b) return identical top-10 items.
``--breakdown`` splits (a) into its forward passes and the search around them, with the search's tensor ops per
request. ``--threads`` takes several torch thread counts (one row each); ``--exclude-history`` makes (a) and (b)
exclude each request's history items, as the served path does (the floor is the same either way).
``--baseline REV`` adds (d): ``SidDecoder`` as ``platform/sidrec/decode/beam.py`` was at git revision REV
(read with ``git show``; it must use SidIndex methods that still exist), over an index without dense tables
(the CSR trie queries), timed interleaved with the others: a before/after in one run on a shared machine,
e.g. ``--baseline 94034fc`` (the decoder before issue 13); ``--baseline-dense`` gives it the dense tables
(``--baseline 927266b --baseline-dense``: the decoder before the dense walk of ``_DenseWalk``).
"large" is a d=1024, 8-layer Qwen2 with random weights (same tokenizer and SIDs) so the model's cost
dominates. Writes bench/results/decode.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import types
from pathlib import Path

import pyarrow.parquet as pq
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM
from transformers.cache_utils import Cache

from sidrec.decode.beam import SidDecoder, left_pad
from sidrec.decode.hf_reference import hf_reference_search
from sidrec.recommender import Recommender
from sidrec.sids.index import SidIndex
from sidrec.store import ArtifactStore

REPO = Path(__file__).resolve().parents[1]


@torch.no_grad()
def floor(model, prompts: list[list[int]], beams: int, levels: int, pad_id: int) -> None:
    ids, mask = left_pad(prompts, pad_id)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    cache = out.cache
    cache.batch_repeat_interleave(beams)
    n = len(prompts) * beams
    mask = mask.repeat_interleave(beams, dim=0)
    step = (pos[:, -1] + 1).repeat_interleave(beams)
    tokens = out.logits[:, -1].argmax(-1).repeat_interleave(beams)
    for _ in range(1, levels):
        mask = torch.cat([mask, mask.new_ones(n, 1)], dim=1)
        out = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=step[:, None], cache=cache,
                    use_cache=True, logits_to_keep=1)
        cache, step = out.cache, step + 1


def large_model(vocab: int, tokenizer) -> Qwen2ForCausalLM:
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=1024, num_hidden_layers=8, num_attention_heads=16,
                      num_key_value_heads=4, intermediate_size=2816, max_position_embeddings=512,
                      tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    return Qwen2ForCausalLM(cfg).eval()


def interleaved(fns: dict, reps: dict[str, int]) -> tuple[dict[str, float], dict[str, object]]:
    """Best-of-reps seconds per function, calls interleaved (a, b, c, a, b, c, ...) so load drift on a
    shared machine hits every contender alike."""
    best = {n: float("inf") for n in fns}
    out: dict[str, object] = {}
    for rep in range(max(reps.values())):
        for name, fn in fns.items():
            if rep < reps[name]:
                t = time.perf_counter()
                out[name] = fn()
                best[name] = min(best[name], time.perf_counter() - t)
    return best, out


def baseline_decoder(rev: str, model, rec: Recommender, store_root: str, beams: int, dense: bool = False):
    """The SidDecoder of ``beam.py`` at git revision ``rev``, over a fresh index of the store with the dense
    tables off (so its trie queries are the CSR ones it was written against), or on (``dense``: a decoder
    written after them)."""
    src = subprocess.run(["git", "show", f"{rev}:platform/sidrec/decode/beam.py"], cwd=REPO, check=True,
                         capture_output=True, text=True).stdout
    module = sys.modules[f"beam_at_{rev}"] = types.ModuleType(f"beam_at_{rev}")  # (dataclasses look it up)
    exec(compile(src, f"{rev}:platform/sidrec/decode/beam.py", "exec"), module.__dict__)  # noqa: S102
    index = SidIndex.from_table(ArtifactStore(store_root).sid_table(), rec.index.codebook_size)
    if not dense:
        index.dense_max_entries = 0
    return module.SidDecoder(model, rec.tokenizer, index, num_beams=beams)


@torch.no_grad()
def breakdown(model, dec: SidDecoder, prompts: list[list[int]], exclude: list[set[str]] | None, k: int,
              reps: int) -> dict:
    """Where ``SidDecoder.search``'s time goes besides the model: its own forward passes (timed by hooks on
    the model) and the KV cache's repeat to the beams (``Cache.batch_repeat_interleave``, timed by a wrapper),
    both also the floor's work, and the rest, the search. A second pass under ``torch.profiler`` counts the
    tensor ops run outside the forward passes (per request) and names the commonest; the profiler inflates op
    times, so only its counts are reported."""
    spans: list[float] = []   # one per forward call: its seconds
    marks: list = []          # the open "model.forward" profiler range, while profiling
    prof_on = [False]

    def pre(_m, _a, _kw):
        spans.append(-time.perf_counter())
        if prof_on[0]:
            marks.append(torch.autograd.profiler.record_function("model.forward").__enter__())

    def post(_m, _a, _kw, _out):
        spans[-1] += time.perf_counter()
        if marks:
            marks.pop().__exit__(None, None, None)

    repeat = [0.0]
    repeat_interleave = Cache.batch_repeat_interleave

    def timed_repeat(cache, repeats: int) -> None:
        t = time.perf_counter()
        repeat_interleave(cache, repeats)
        repeat[0] += time.perf_counter() - t

    hooks = [model.register_forward_pre_hook(pre, with_kwargs=True),
             model.register_forward_hook(post, with_kwargs=True)]
    Cache.batch_repeat_interleave = timed_repeat
    try:
        best = None
        for _ in range(reps):
            spans.clear()
            repeat[0] = 0.0
            t = time.perf_counter()
            dec.search(prompts, k=k, exclude=exclude)
            total = time.perf_counter() - t
            if best is None or total < best[0]:
                best = (total, sum(spans), len(spans), repeat[0])
        prof_on[0] = True
        with torch.profiler.profile() as prof:
            dec.search(prompts, k=k, exclude=exclude)
        prof_on[0] = False
    finally:
        Cache.batch_repeat_interleave = repeat_interleave
        for h in hooks:
            h.remove()
    outside: dict[str, int] = {}
    for e in prof.events():
        if e.cpu_parent is None and e.name != "model.forward":
            outside[e.name] = outside.get(e.name, 0) + 1
    total, fwd, calls, rep_s = best
    n, search = len(prompts), total - fwd - rep_s
    return {"total_ms_per_req": 1000 * total / n, "forward_ms_per_req": 1000 * fwd / n, "forward_calls": calls,
            "cache_repeat_ms_per_req": 1000 * rep_s / n,
            "search_ms_per_req": 1000 * search / n, "search_share": search / total,
            "search_ops_per_req": sum(outside.values()) / n,
            "commonest_search_ops": dict(sorted(outside.items(), key=lambda kv: -kv[1])[:8])}


def bench_cell(args: argparse.Namespace, rec: Recommender, model, dec: SidDecoder, name: str,
               prompts: list[list[int]], exclude: list[set[str]] | None, base=None) -> dict:
    """One (model, threads, batch) cell: ours, the floor, the baseline decoder (``base``, if any) and
    (where affordable) HF, interleaved."""
    bs = len(prompts)
    dec.search(prompts[:1], k=args.k)  # warm-up
    run_hf = bs <= (args.hf_max_batch_store if name == "store" else args.hf_max_batch_large)
    fns = {
        "ours": lambda: dec.search(prompts, k=args.k, exclude=exclude),
        "floor": lambda: floor(model, prompts, args.beams, rec.index.levels, dec.pad_id),
    }
    reps = {"ours": args.reps, "floor": args.reps}
    if base is not None:
        base.search(prompts[:1], k=args.k)
        fns["baseline"], reps["baseline"] = (lambda: base.search(prompts, k=args.k, exclude=exclude)), args.reps
    if run_hf:
        fns["hf"] = lambda: hf_reference_search(model, rec.tokenizer, rec.index, prompts, k=args.k,
                                                num_beams=args.beams, exclude=exclude)
        reps["hf"] = 1 if name == "large" else args.hf_reps
    best, outs = interleaved(fns, reps)
    t_ours, t_floor, t_hf = best["ours"], best["floor"], best.get("hf")
    same = None
    if run_hf:
        same = [[i for h in a for i in h.items] for a in outs["ours"]] == [
            [i for h in b for i in h.items] for b in outs["hf"]]
    split = breakdown(model, dec, prompts, exclude, args.k, args.reps) if args.breakdown else None
    return {
        "model": name, "arch": model.config.model_type, "batch": bs,
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "beams": args.beams, "exclude_history": exclude is not None,
        "prompt_tokens_mean": round(sum(map(len, prompts)) / bs, 1),
        "sidrec_recs_per_s": bs / t_ours, "sidrec_ms_per_req": 1000 * t_ours / bs,
        "floor_ms_per_req": 1000 * t_floor / bs,
        "hf_ms_per_req": 1000 * t_hf / bs if t_hf else None,
        "speedup_vs_hf": t_hf / t_ours if t_hf else None,
        "ratio_to_floor": t_ours / t_floor, "identical_top10": same,
        **({"baseline_ms_per_req": 1000 * best["baseline"] / bs, "baseline_ratio_to_floor": best["baseline"] / t_floor,
            "baseline_same_top10": [[i for h in a for i in h.items] for a in outs["baseline"]] == [
                [i for h in b for i in h.items] for b in outs["ours"]]} if base is not None else {}),
        **({"breakdown": split} if split is not None else {}),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default="artifacts/amazon-industrial")
    ap.add_argument("--models", nargs="+", default=["store", "large"], choices=["store", "large"],
                    help="store: the store's trained model, whatever its size; large: a random d=1024 "
                         "8-layer model of the same vocabulary")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    ap.add_argument("--beams", type=int, default=20)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions per cell (best is kept)")
    ap.add_argument("--hf-reps", type=int, default=1,
                    help="timed repetitions of the (5-15x slower) HF reference on the store's model")
    ap.add_argument("--hf-max-batch-store", type=int, default=1024,
                    help="largest batch the HF reference runs on the store's model (e.g. 1 for SmolLM2 on CPU)")
    ap.add_argument("--hf-max-batch-large", type=int, default=8,
                    help="largest batch the (slow) HF reference runs on the large model; CPU time guard")
    ap.add_argument("--threads", type=int, nargs="+", default=[1],
                    help="torch thread counts, one row each (1: steadier on a shared machine)")
    ap.add_argument("--exclude-history", action="store_true",
                    help="exclude each request's history items from its answer (as Serve does)")
    ap.add_argument("--baseline-dense", action="store_true",
                    help="give the --baseline decoder the index's dense tables (a revision that has them, e.g. 927266b)")
    ap.add_argument("--baseline", metavar="REV", default=None,
                    help="also time beam.py as it was at this git revision (e.g. 94034fc), interleaved")
    ap.add_argument("--breakdown", action="store_true",
                    help="also split sidrec's time into its forward passes and the search, with the search's "
                         "tensor-op count per request (torch.profiler)")
    ap.add_argument("--out", default="bench/results/decode.json")
    args = ap.parse_args()

    rec = Recommender.from_store(args.store, num_beams=args.beams, device="cpu")
    store = ArtifactStore(args.store)
    test = pq.read_table(f"{store.current_path('dataset')}/test.parquet").to_pylist()[:max(args.batches)]
    prompts_all = [rec.prompt_ids(r["history"], user_id=r["user_id"]) for r in test]
    excludes_all = [set(map(str, r["history"])) & set(rec.sid_of) for r in test] if args.exclude_history else None
    rows = []
    for name in args.models:
        vocab = rec.model.get_output_embeddings().weight.shape[0]
        model = rec.model if name == "store" else large_model(vocab, rec.tokenizer)
        dec = SidDecoder(model, rec.tokenizer, rec.index, num_beams=args.beams)
        base = (baseline_decoder(args.baseline, model, rec, args.store, args.beams, args.baseline_dense)
                if args.baseline else None)
        for threads in args.threads:
            torch.set_num_threads(threads)
            for bs in args.batches:
                row = bench_cell(args, rec, model, dec, name, prompts_all[:bs],
                                 excludes_all[:bs] if excludes_all is not None else None, base)
                row["threads"] = threads
                rows.append(row)
                print(json.dumps(row), flush=True)

    head = (f"{'model':6} {'arch':>8} {'params':>7} {'thr':>3} {'batch':>5} {'sidrec rec/s':>12} "
            f"{'sidrec ms/req':>13} "
            f"{'HF ms/req':>10} {'floor ms/req':>12} {'vs HF':>7} {'/floor':>7} {'same top10':>10}")
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        hf = f"{r['hf_ms_per_req']:.1f}" if r["hf_ms_per_req"] else "skipped"
        sp = f"{r['speedup_vs_hf']:.1f}x" if r["speedup_vs_hf"] else "-"
        base = (f"  baseline {r['baseline_ms_per_req']:.1f} ms/req = {r['baseline_ratio_to_floor']:.2f}x floor, same "
                f"top10 {r['baseline_same_top10']}" if "baseline_ms_per_req" in r else "")
        print(f"{r['model']:6} {r['arch']:>8} {r['params_m']:>6}M {r['threads']:>3} {r['batch']:>5} "
              f"{r['sidrec_recs_per_s']:>12.1f} "
              f"{r['sidrec_ms_per_req']:>13.1f} {hf:>10} {r['floor_ms_per_req']:>12.1f} {sp:>7} "
              f"{r['ratio_to_floor']:>6.2f}x {str(r['identical_top10']):>10}{base}")
    if args.breakdown:
        print(f"\n{'model':6} {'thr':>3} {'batch':>5} {'total ms/req':>12} {'forward':>8} {'repeat':>7} "
              f"{'search':>7} {'search %':>8} {'ops/req':>8}  commonest ops outside the forward passes")
        for r in rows:
            b = r["breakdown"]
            ops = ", ".join(f"{k.removeprefix('aten::')} {v}" for k, v in list(b["commonest_search_ops"].items())[:5])
            print(f"{r['model']:6} {r['threads']:>3} {r['batch']:>5} {b['total_ms_per_req']:>12.2f} "
                  f"{b['forward_ms_per_req']:>8.2f} {b['cache_repeat_ms_per_req']:>7.2f} {b['search_ms_per_req']:>7.2f} "
                  f"{100 * b['search_share']:>7.1f}% "
                  f"{b['search_ops_per_req']:>8.1f}  {ops}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "args": vars(args)}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
