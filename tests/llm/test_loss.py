"""The level-softmax training loss (`sidrec.llm.train.loss`) against a by-hand computation."""

import pytest
import torch
import torch.nn.functional as F

from sidrec.config import ModelConfig, TrainConfig
from sidrec.llm.instructions import template_corpus
from sidrec.llm.model import add_sid_tokens, encode_sid, load_base
from sidrec.llm.sft import IGNORE_INDEX, collate, format_example, pack, prompt_mask
from sidrec.llm.train.data import sid_token_ids
from sidrec.llm.train.fit import check_packing, label_losses
from sidrec.llm.train.loss import level_softmax_loss, sid_levels
from sidrec.llm.train.setup import WorkerEnv
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
    in_prompt = prompt_mask(rows, batch["input_ids"].shape[1])
    levels = sid_levels(tok, model.get_input_embeddings().weight.shape[0])
    loss = level_softmax_loss(model, model.get_output_embeddings().weight, batch, in_prompt, levels)

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


def _packable_rows(tok) -> list[dict]:
    """An 8-item history and two short rows that fit together in its width."""
    ids = sid_token_ids(tok)
    rows = [format_example(f"The user has clicked: {', '.join(SIDS[:8])}. Which next?", SIDS[8], tok, 128, ids),
            format_example(f"The user has clicked: {SIDS[4]}, {SIDS[5]}. Which next?", SIDS[6], tok, 128, ids),
            format_example(f"What is the title of item {SIDS[7]}?", "steel pipe", tok, 128)]
    return rows


def test_packed_rows_give_each_example_its_own_loss():
    """`pack` puts the two short rows in the long row's width; the model (Qwen2 via transformers' packed
    position ids) keeps them apart, so both losses equal the one-example-per-row ones."""
    model, tok = _model()
    model.eval()
    rows = _packable_rows(tok)
    assert len(rows[0]["input_ids"]) >= len(rows[1]["input_ids"]) + len(rows[2]["input_ids"])
    packed = pack(rows, tok.pad_token_id)
    assert packed["input_ids"].shape == (2, len(rows[0]["input_ids"]))
    assert int((packed["labels"] != IGNORE_INDEX).sum()) == sum(
        sum(t != IGNORE_INDEX for t in r["labels"][1:]) for r in rows)
    plain = collate(rows, tok.pad_token_id)
    plain_prompt = prompt_mask(rows, plain["input_ids"].shape[1])
    inputs = {k: v for k, v in packed.items() if k != "in_prompt"}
    levels = sid_levels(tok, model.get_input_embeddings().weight.shape[0])
    weight = model.get_output_embeddings().weight
    with torch.no_grad():
        want = level_softmax_loss(model, weight, plain, plain_prompt, levels)
        got = level_softmax_loss(model, weight, inputs, packed["in_prompt"], levels)
        assert float(got) == pytest.approx(float(want), rel=1e-5)
        # the model's own loss too (use_cache=False: with a cache transformers does not look for packing)
        assert float(model(**inputs, use_cache=False).loss) == pytest.approx(
            float(model(**plain, use_cache=False).loss), rel=1e-5)
        # without the restarting position ids the short examples would see the long one
        leaky = {"input_ids": packed["input_ids"], "labels": packed["labels"]}
        assert float((label_losses(model, leaky) - label_losses(model, plain)).abs().max()) > 1e-3
        assert float((label_losses(model, packed) - label_losses(model, plain)).abs().max()) < 1e-5


class _IgnoresPositions(torch.nn.Module):
    """A model that drops position ids, as an architecture without packed-sequence support would."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kw):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kw)


def test_check_packing_refuses_a_model_that_lets_packed_examples_mix():
    model, tok = _model()
    rows = _packable_rows(tok)
    env = WorkerEnv(TrainConfig(), None, 0, 1, torch.device("cpu"))
    check_packing(env, model, rows, tok.pad_token_id)  # Qwen2 keeps them apart
    assert model.training
    with pytest.raises(ValueError, match="train.pack_rows"):
        check_packing(env, _IgnoresPositions(model), rows, tok.pad_token_id)
