"""The level-softmax training loss (`sidrec.llm.train.loss`) against a by-hand computation."""

import torch
import torch.nn.functional as F

from sidrec.config import ModelConfig
from sidrec.llm.instructions import template_corpus
from sidrec.llm.model import add_sid_tokens, encode_sid, load_base
from sidrec.llm.sft import IGNORE_INDEX, collate, format_example
from sidrec.llm.train.data import sid_token_ids
from sidrec.llm.train.loss import level_softmax_loss, sid_levels
from sidrec.sids.tokens import used_tokens

SIDS = [f"<a_{k % 5}><b_{(k * 3) % 7}><c_{k}>" for k in range(12)]


def _model():
    cfg = ModelConfig(tokenizer_vocab_size=400, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                      intermediate_size=64)
    model, tok = load_base(cfg, template_corpus() + ["steel pipe", "copper wire"])
    add_sid_tokens(model, tok, used_tokens(SIDS), init="random")
    return model, tok


def test_sid_levels_group_tokens_by_level():
    model, tok = _model()
    lv = sid_levels(tok, model.get_input_embeddings().weight.shape[0])
    assert [len(i) for i in lv.ids] == [5, 7, 12]
    for s in SIDS:
        for level, tid in enumerate(encode_sid(tok, s)):
            assert lv.level[tid] == level and lv.ids[level][lv.index[tid]] == tid
    assert lv.level[tok.eos_token_id] == -1


def test_level_softmax_loss_matches_hand_computation():
    model, tok = _model()
    ids = sid_token_ids(tok)
    rows = [format_example(f"The user has clicked: {SIDS[0]}, {SIDS[1]}, {SIDS[2]}. Which next?", SIDS[3], tok,
                           128, ids),
            format_example(f"The user has clicked: {SIDS[4]}, {SIDS[5]}. Which next?", SIDS[6], tok, 128, ids),
            format_example(f"What is the title of item {SIDS[7]}?", "steel pipe", tok, 128)]
    batch = collate(rows, tok.pad_token_id)
    prompt_len = torch.tensor([r["n_prompt"] for r in rows])
    levels = sid_levels(tok, model.get_input_embeddings().weight.shape[0])
    loss = level_softmax_loss(model, model.get_output_embeddings().weight, batch, prompt_len, levels)

    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    total, n = 0.0, 0
    for b in range(len(rows)):
        for p in range(targets.shape[1]):
            t = int(targets[b, p])
            if t == IGNORE_INDEX:
                continue
            n += 1
            if p < rows[b]["n_prompt"] - 1 and int(levels.level[t]) >= 0:  # a history SID: its level only
                members = levels.ids[int(levels.level[t])]
                total -= float(F.log_softmax(logits[b, p, members], -1)[(members == t).nonzero()[0, 0]])
            else:
                total -= float(F.log_softmax(logits[b, p], -1)[t])
    # history SIDs after the first + the response (3 tokens + eos); the title row: its tokens + eos
    assert n == (2 * 3 + 4) + (1 * 3 + 4) + len(tok.encode("steel pipe", add_special_tokens=False)) + 1
    assert abs(float(loss) - total / n) < 1e-4
    loss.backward()
    assert model.get_input_embeddings().weight.grad is not None
