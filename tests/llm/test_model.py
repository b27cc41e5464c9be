import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from sidrec.config import ConfigError, ModelConfig
from sidrec.llm.instructions import template_corpus
from sidrec.llm.model import (
    add_sid_tokens,
    build_tiny_qwen2,
    decode_sid,
    encode_sid,
    init_sid_rows_from_titles,
    load_base,
    save_model,
    train_bpe_tokenizer,
)
from sidrec.llm.sft import IGNORE_INDEX, collate, encode_prompt, format_example, prompt_labels
from sidrec.llm.train.data import sid_token_ids
from sidrec.sids.tokens import used_tokens

ITEMS = Path(__file__).resolve().parents[3] / "shared" / "data" / "amazon18-industrial" / "items.jsonl"
TINY = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
            max_position_embeddings=256)
SIDS3 = [f"<a_{k % 9}><b_{(k * 7) % 11}><c_{(k * 3) % 13}>" for k in range(60)]
SIDS4 = [s + f"<d_{k % 3}>" for k, s in enumerate(SIDS3)]
EN = "Stanley TRA708T Sharpshooter 1/2-Inch Leg Length Staples, Steel (1000 Count)"
ZH = "用户是一位24岁的男性技术员。用户接下来会点击哪个商品？ 不锈钢螺丝刀套装"


def _titles() -> list[str]:
    if not ITEMS.exists():
        return []
    with ITEMS.open() as f:
        return [json.loads(line)["title"] for _, line in zip(range(300), f, strict=False)]


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    titles = _titles() or [f"Industrial part number {k} for steel pipes and valves" for k in range(300)]
    return titles + template_corpus()


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return train_bpe_tokenizer(corpus, vocab_size=800)


def _fresh(corpus, **over):
    """A new (model, tokenizer) pair from the preset, small enough for CPU tests."""
    cfg = ModelConfig(tokenizer_vocab_size=800, **{**TINY, **over})
    return load_base(cfg, corpus)


def test_tokenizer_roundtrips_english_and_chinese(tokenizer, corpus):
    if not _titles():
        pytest.skip(f"{ITEMS} not available")
    for text in (EN, ZH, "mixed 中文 and English\n  <not a sid>"):
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text
    assert len(tokenizer.encode(EN, add_special_tokens=False)) < 0.6 * len(EN.encode())  # merges learned
    assert len(tokenizer) == 800
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>" and tokenizer.bos_token is None
    assert len(tokenizer.encode("<|im_start|>", add_special_tokens=False)) == 1
    again = train_bpe_tokenizer(corpus, vocab_size=800)  # deterministic
    assert again.get_vocab() == tokenizer.get_vocab()


@pytest.mark.parametrize("sids, levels", [(SIDS3, 3), (SIDS4, 4)])
def test_sid_tokens_are_single_tokens(corpus, sids, levels):
    model, tok = _fresh(corpus)
    vocab = used_tokens(sids)
    assert vocab[:3] == ["<a_0>", "<a_1>", "<a_2>"] and vocab[8:10] == ["<a_8>", "<b_0>"]
    assert len(vocab) == 9 + 11 + 13 + (3 if levels == 4 else 0)
    n0 = len(tok)
    assert add_sid_tokens(model, tok, vocab) == len(vocab)
    assert len(tok) == n0 + len(vocab)
    assert add_sid_tokens(model, tok, vocab) == 0  # idempotent
    for sid in sids:
        ids = encode_sid(tok, sid)
        assert len(ids) == levels and all(i >= n0 for i in ids)
        assert decode_sid(tok, ids) == sid
        assert decode_sid(tok, ids + [tok.eos_token_id]) == sid
        assert tok.decode(ids, skip_special_tokens=True) == sid  # added as non-special tokens
    assert len(tok.encode("<a_1><b_2>", add_special_tokens=False)) == 2
    in_text = tok.encode("history: <a_1><b_2><c_3>, <a_4><b_5><c_6>. Next?", add_special_tokens=False)
    assert tok.convert_ids_to_tokens(in_text).count("<b_5>") == 1
    with pytest.raises(ValueError):
        encode_sid(tok, "<a_1><b_2><c_999>")  # code never added
    with pytest.raises(ValueError):
        encode_sid(tok, "<b_1><a_2>")  # levels out of order
    with pytest.raises(ValueError):
        decode_sid(tok, tok.encode("hello", add_special_tokens=False))


def test_new_rows_use_mean_of_old_rows(corpus):
    model, tok = _fresh(corpus)
    old = model.get_input_embeddings().weight.detach().clone()
    vocab = used_tokens(SIDS3)
    add_sid_tokens(model, tok, vocab)
    w = model.get_input_embeddings().weight.detach()
    assert w.shape[0] % 64 == 0 and w.shape[0] >= len(tok)
    assert torch.equal(w[: old.shape[0]], old)  # old rows untouched
    new = w[encode_sid(tok, SIDS3[5])]
    assert torch.allclose(new, old.mean(0).expand_as(new), atol=1e-6)
    assert model.get_output_embeddings().weight.data_ptr() == w.data_ptr()  # still tied

    # untied head: output rows get the mean of the old output rows
    model, tok = _fresh(corpus)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight) + 3.0)
    old_out = model.lm_head.weight.detach().clone()
    add_sid_tokens(model, tok, vocab)
    ids = encode_sid(tok, SIDS3[0])
    out = model.get_output_embeddings().weight.detach()
    assert torch.allclose(out[ids], old_out.mean(0).expand(len(ids), -1), atol=1e-5)

    # random init: spread like the old rows, not the mean
    model, tok = _fresh(corpus)
    std = model.get_input_embeddings().weight.detach().std()
    add_sid_tokens(model, tok, vocab, init="random")
    rows = model.get_input_embeddings().weight.detach()[[tok.convert_tokens_to_ids(t) for t in vocab]]
    assert 0.7 < float(rows.std() / std) < 1.3


def test_format_example_masks_prompt(tokenizer):
    prompt, response = "The user has clicked, in time order: item one, item two. Which item next?", "Steel pipe"
    ex = format_example(prompt, response, tokenizer, max_length=256)
    resp_ids = tokenizer.encode(response, add_special_tokens=False)
    n_prompt = len(encode_prompt(prompt, tokenizer, 256))
    assert len(ex["input_ids"]) == len(ex["labels"]) == len(ex["attention_mask"]) == n_prompt + len(resp_ids) + 1
    assert ex["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert IGNORE_INDEX not in ex["labels"][n_prompt:]
    assert sum(label != IGNORE_INDEX for label in ex["labels"]) == len(resp_ids) + 1
    assert ex["labels"][n_prompt:] == resp_ids + [tokenizer.eos_token_id] == ex["input_ids"][n_prompt:]
    assert tokenizer.decode(ex["input_ids"]) == prompt + "\n" + response + "<|endoftext|>"

    # too long: prompt cut from the left, response kept whole
    long_prompt = "old history " * 200 + "recent item. Which item next?"
    ex = format_example(long_prompt, response, tokenizer, max_length=32)
    assert len(ex["input_ids"]) == 32
    assert ex["input_ids"][-len(resp_ids) - 1:] == resp_ids + [tokenizer.eos_token_id]
    full = tokenizer.encode(long_prompt + "\n", add_special_tokens=False)
    kept = 32 - len(resp_ids) - 1
    assert ex["input_ids"][:kept] == full[-kept:]
    assert tokenizer.decode(ex["input_ids"][:kept]).endswith("recent item. Which item next?\n")
    with pytest.raises(ValueError, match="does not fit"):
        format_example(prompt, "word " * 50, tokenizer, max_length=8)


def test_collate_right_pads(tokenizer):
    batch = [format_example("a b c", "x", tokenizer, 64), format_example("a much longer prompt here", "x y", tokenizer, 64)]
    out = collate(batch, pad_id=tokenizer.pad_token_id)
    n0, n1 = len(batch[0]["input_ids"]), len(batch[1]["input_ids"])
    assert out["input_ids"].shape == (2, max(n0, n1)) and out["input_ids"].dtype == torch.long
    short = 0 if n0 < n1 else 1
    n = min(n0, n1)
    assert out["input_ids"][short, n:].eq(tokenizer.pad_token_id).all()
    assert out["labels"][short, n:].eq(IGNORE_INDEX).all()
    assert out["attention_mask"].sum(1).tolist() == [n0, n1]
    assert out["input_ids"][short, :n].tolist() == batch[short]["input_ids"]


def test_save_and_plain_reload(tmp_path, corpus):
    model, tok = _fresh(corpus)
    add_sid_tokens(model, tok, used_tokens(SIDS4))
    model.eval()
    ex = format_example("The user has clicked: " + ", ".join(SIDS4[:3]) + ". Next?", SIDS4[3], tok, 128)
    ids = torch.tensor([ex["input_ids"]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    save_model(model, tok, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "model.safetensors").exists()
    model2 = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    tok2 = AutoTokenizer.from_pretrained(tmp_path / "ckpt")
    with torch.no_grad():
        after = model2(input_ids=ids).logits
    assert torch.equal(before, after)
    assert len(tok2) == len(tok)
    for sid in SIDS4:
        assert encode_sid(tok2, sid) == encode_sid(tok, sid)
    for text in (*corpus[:50], EN, ZH):  # reloaded tokenizer encodes every text identically
        assert tok2.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
    assert tok2.pad_token_id == tok.pad_token_id and tok2.eos_token_id == tok.eos_token_id


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_load_base_from_checkpoint_dir(tmp_path, tokenizer, arch):
    if arch == "qwen2":
        model = build_tiny_qwen2(ModelConfig(**TINY), tokenizer)
    else:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer) + 20, hidden_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=4, intermediate_size=128,
                                             tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, tok = load_base(ModelConfig(base=str(tmp_path)), corpus_texts=[])
    assert type(loaded) is type(model)
    assert tok.pad_token_id is not None and loaded.config.pad_token_id == tok.pad_token_id
    n0 = len(tok)
    assert add_sid_tokens(loaded, tok, used_tokens(SIDS3)) == 33
    for sid in SIDS3[:10]:
        assert len(encode_sid(tok, sid)) == 3
    rows = loaded.get_input_embeddings().weight.shape[0]
    assert rows >= len(tok) and rows % 64 == 0
    if arch == "llama":  # untied: the head grew too, and its new rows are the old rows' mean
        head = loaded.get_output_embeddings().weight.detach()
        assert head.shape[0] == rows
        assert torch.allclose(head[encode_sid(tok, SIDS3[0])], head[:n0].mean(0).expand(3, -1), atol=1e-5)
    batch = collate([format_example("Which item next?", SIDS3[0], tok, 64)], tok.pad_token_id)
    loss = loaded(**batch).loss
    assert torch.isfinite(loss)


def test_one_step_lowers_loss(corpus):
    model, tok = _fresh(corpus)
    add_sid_tokens(model, tok, used_tokens(SIDS3))
    batch = collate([format_example(f"The user has clicked: {SIDS3[k]}, {SIDS3[k + 1]}. Next?", SIDS3[k + 2], tok, 64)
                     for k in range(4)], tok.pad_token_id)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss0 = model(**batch).loss
    loss0.backward()
    opt.step()
    with torch.no_grad():
        loss1 = model(**batch).loss
    assert loss1.item() < loss0.item() - 0.025  # measured drop: 0.05


def test_preset_shapes(corpus):
    model, tok = _fresh(corpus)
    assert model.config.vocab_size == len(tok) == 800
    assert model.config.tie_word_embeddings and model.config.model_type == "qwen2"
    assert model.model.embed_tokens.weight.data_ptr() == model.lm_head.weight.data_ptr()
    m2, _ = _fresh(corpus)  # seeded init
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, m2.model.layers[0].mlp.up_proj.weight)
    m3, _ = _fresh(corpus, seed=1)
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, m3.model.layers[0].mlp.up_proj.weight)


def test_preset_attention_dropout_acts_in_training_only(corpus):
    model, tok = _fresh(corpus, attention_dropout=0.5)
    assert model.config.attention_dropout == 0.5
    ids = torch.tensor([tok.encode("steel pipe valve steel pipe valve")])
    model.train()
    torch.manual_seed(0)
    a = model(input_ids=ids).logits
    b = model(input_ids=ids).logits
    assert not torch.allclose(a, b)  # a fresh dropout mask each pass
    model.eval()
    assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)


def test_train_dropout_hooks_embeddings_and_residual_branches(corpus, tmp_path):
    from sidrec.config import TrainConfig
    from sidrec.llm.train.setup import add_dropout, load_model

    model, tok = _fresh(corpus)
    model.save_pretrained(tmp_path)
    plain, _ = load_model(str(tmp_path), tok, TrainConfig(dropout=0.0))
    dropped, _ = load_model(str(tmp_path), tok, TrainConfig(dropout=0.3))
    ids = torch.tensor([tok.encode("steel pipe valve steel pipe valve")])
    dropped.eval(), plain.eval()
    assert torch.equal(dropped(input_ids=ids).logits, plain(input_ids=ids).logits)  # eval: the plain model
    dropped.train()
    torch.manual_seed(0)
    a, b = dropped(input_ids=ids).logits, dropped(input_ids=ids).logits
    assert not torch.allclose(a, b)  # a fresh mask each pass
    # 0.3 of the embedding entries are zeroed, the rest scaled by 1 / 0.7
    emb = dropped.get_input_embeddings()(ids)
    raw = torch.nn.functional.embedding(ids, dropped.get_input_embeddings().weight)
    zero = emb == 0
    assert 0.2 < zero.float().mean() < 0.4
    assert torch.allclose(emb[~zero], raw[~zero] / 0.7)
    assert add_dropout(plain, 0.1) == 2 * TINY["num_layers"] + 1  # embeddings + o_proj and down_proj per block
    with pytest.raises(ValueError, match="train.dropout"):
        add_dropout(torch.nn.Sequential(torch.nn.Embedding(4, 4)), 0.1)


def test_train_dropout_under_lora_drops_the_adapters_output(corpus, tmp_path):
    from sidrec.config import TrainConfig
    from sidrec.llm.train.setup import load_model

    model, tok = _fresh(corpus)
    add_sid_tokens(model, tok, used_tokens(SIDS3))
    model.save_pretrained(tmp_path)
    lora, _ = load_model(str(tmp_path), tok, TrainConfig(lora=True, dropout=0.5))
    hooked = {n for n, m in lora.named_modules() if m._forward_hooks}
    o_proj = {n for n in hooked if n.endswith("self_attn.o_proj")}
    assert len(o_proj) == TINY["num_layers"] and len({n for n in hooked if n.endswith("mlp.down_proj")}) == TINY["num_layers"]
    assert not any(n.endswith("base_layer") for n in hooked)  # the wrapper (base + adapter), not its base
    wrapper = dict(lora.named_modules())[sorted(o_proj)[0]]
    assert hasattr(wrapper, "lora_A")
    x = torch.randn(1, 3, TINY["hidden_size"])
    lora.train()
    assert (wrapper(x) == 0).float().mean() > 0.3  # p = 0.5 of the wrapper's output zeroed
    lora.eval()
    assert not (wrapper(x) == 0).any()


@pytest.mark.parametrize("kwargs, field", [
    ({"attention_dropout": 1.0}, "attention_dropout"),
    ({"hidden_size": 0}, "hidden_size"),
    ({"num_heads": 3}, "hidden_size"),
    ({"num_kv_heads": 3}, "num_kv_heads"),
    ({"tokenizer_vocab_size": 100}, "tokenizer_vocab_size"),
    ({"new_token_init": "zeros"}, "new_token_init"),
    ({"dtype": "int8"}, "dtype"),
    ({"base": ""}, "base"),
])
def test_bad_model_config_names_field(kwargs, field):
    with pytest.raises(ConfigError, match=f"model.{field}"):
        ModelConfig(**kwargs)


def test_prompt_labels_skip_the_first_item():
    x = IGNORE_INDEX
    assert prompt_labels([5, 1, 2, 7, 1, 3, 7, 2, 2, 9], {1, 2, 3}) == [x, x, x, x, 1, 3, x, 2, 2, x]
    assert prompt_labels([1, 2, 7], {1, 2}) == [x, x, x]
    assert prompt_labels([1, 2, 7], ()) == [x, x, x]


def test_format_example_labels_history_sids(corpus):
    """loss_on=items: every history SID after the first is a label, so is the response; text never."""
    model, tok = _fresh(corpus)
    add_sid_tokens(model, tok, used_tokens(SIDS3))
    ids = sid_token_ids(tok)
    assert len(ids) == len(used_tokens(SIDS3))
    prompt = f"The user has clicked: {SIDS3[0]}, {SIDS3[1]}, {SIDS3[2]}. Which item next?"
    ex = format_example(prompt, SIDS3[3], tok, max_length=256, label_prompt_ids=ids)
    labelled = [t for t, lab in zip(ex["input_ids"], ex["labels"], strict=True) if lab != IGNORE_INDEX]
    want = [i for s in SIDS3[1:4] for i in encode_sid(tok, s)] + [tok.eos_token_id]
    assert labelled == want
    plain = format_example(prompt, SIDS3[3], tok, max_length=256)
    assert plain["input_ids"] == ex["input_ids"]
    assert sum(lab != IGNORE_INDEX for lab in plain["labels"]) == 4


CHATML = ("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{'<|im_start|>assistant\\n'}}{% endif %}")


def test_chat_template_wraps_the_prompt_and_truncates_only_its_text(corpus):
    tok = train_bpe_tokenizer(corpus, vocab_size=800)
    plain = encode_prompt("Which item next?", tok, 64)
    tok.chat_template = CHATML
    ids = encode_prompt("Which item next?", tok, 64)
    assert ids != plain
    assert tok.decode(ids) == "<|im_start|>user\nWhich item next?<|im_end|>\n<|im_start|>assistant\n"
    long = "old " * 100 + "recent. Which item next?"
    cut = encode_prompt(long, tok, 24)
    assert len(cut) == 24
    text = tok.decode(cut)
    assert text.startswith("<|im_start|>user\n") and text.endswith("Which item next?<|im_end|>\n<|im_start|>assistant\n")
    ex = format_example("Which item next?", "Steel pipe", tok, max_length=64)
    assert tok.decode(ex["input_ids"]).endswith("assistant\nSteel pipe<|endoftext|>")
    assert tok.decode([t for t, lab in zip(ex["input_ids"], ex["labels"], strict=True) if lab != IGNORE_INDEX]) == (
        "Steel pipe<|endoftext|>")


def test_sid_rows_from_titles(corpus):
    model, tok = _fresh(corpus)
    add_sid_tokens(model, tok, used_tokens(SIDS3[:4]))
    w = model.get_input_embeddings().weight
    with torch.no_grad():
        w.normal_()
    before = w.detach().clone()
    titles = ["steel pipe", "copper wire", "rubber glove", ""]
    assert init_sid_rows_from_titles(model, tok, zip(SIDS3[:4], titles, strict=True)) == len(
        used_tokens(SIDS3[:3]))

    def title_vec(t):
        return before[tok.encode(t, add_special_tokens=False)].mean(0)

    a0, b0, _ = encode_sid(tok, SIDS3[0])
    assert torch.allclose(w[b0], title_vec("steel pipe"), atol=1e-5)
    same_a = [t for s, t in zip(SIDS3[:3], titles, strict=False) if s.startswith(SIDS3[0][:5])]
    assert torch.allclose(w[a0], torch.stack([title_vec(t) for t in same_a]).mean(0), atol=1e-5)
    untouched = set(encode_sid(tok, SIDS3[3])) - {i for s in SIDS3[:3] for i in encode_sid(tok, s)}
    for i in untouched:  # item 3 has no title: its own codes keep their rows
        assert torch.equal(w[i], before[i])
    text_ids = tok.encode("steel pipe", add_special_tokens=False)
    assert torch.equal(w[text_ids], before[text_ids])  # only SID rows change
