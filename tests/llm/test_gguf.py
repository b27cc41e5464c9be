"""A real pretrained LLM shipped as GGUF (SmolLM2-135M-Instruct, ../shared/models) as `model.base`."""

from pathlib import Path

import pytest
import torch

MODELS = Path(__file__).resolve().parents[3] / "shared" / "models"
GGUF = MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
@pytest.mark.skipif(not GGUF.is_file(), reason=f"{GGUF} not present (see ../shared/models/README.md)")
def test_gguf_base_loads_adds_sid_tokens_and_exports_plain_hf(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sidrec.config import ModelConfig
    from sidrec.llm.model import add_sid_tokens, encode_sid, load_base, save_model

    model, tok = load_base(ModelConfig(base=str(GGUF)), [])
    assert type(model).__name__ == "LlamaForCausalLM" and not hasattr(model.config, "quantization_config")
    assert tok.pad_token_id is not None
    rows_before = model.get_input_embeddings().weight.shape[0]
    assert add_sid_tokens(model, tok, ["<a_0>", "<a_1>", "<b_0>"]) == 3
    assert model.get_input_embeddings().weight.shape[0] >= rows_before + 3
    save_model(model, tok, tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    tok2 = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert encode_sid(tok2, "<a_1><b_0>") == encode_sid(tok, "<a_1><b_0>")
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = model.eval()(ids).logits, reloaded(ids).logits
    assert torch.allclose(a, b, atol=1e-4)
    # a pretrained LM, not random weights: it continues a fact with the right word
    assert "Paris" in tok.decode(a[0, -1].topk(5).indices.tolist())


def test_missing_gguf_file_names_the_option(tmp_path):
    from sidrec.config import ModelConfig
    from sidrec.llm.model import load_base

    with pytest.raises(FileNotFoundError, match="model.base: GGUF file not found"):
        load_base(ModelConfig(base=str(tmp_path / "nope.gguf")), [])


@pytest.mark.slow
@pytest.mark.skipif(not GGUF.is_file(), reason=f"{GGUF} not present (see ../shared/models/README.md)")
def test_smollm2_config_fine_tunes_exports_and_recommends(local_ray, tmp_path):
    """The smollm2-cpu recipe on a small slice: GGUF base -> SID rows from titles -> 2 Ray Train steps in the
    chat template -> an exported model that plain from_pretrained loads and Recommender ranks with."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sidrec.config import load_config
    from sidrec.pipeline import run
    from sidrec.recommender import Recommender
    from tests.conftest import shared_data

    root = tmp_path / "store"
    cfg = load_config("smollm2-cpu", [
        f"store.root={root}", f"model.base={GGUF}", "data.format=movielens_100k",
        f"data.path={shared_data('ml-100k')}", 'embed.template="{title}"', "train.max_steps=2",
        "train.batch_size=2", "train.max_length=96", "train.max_val_rows=4",
        "instructions.task_weights={next_item: 1.0, sid_to_title: 0.01, title_to_sid: 0.01}",
    ])
    manifests = run(cfg, until="model")
    base = manifests["base_model"]["metrics"]
    assert base["sid_tokens_from_titles"] == base["sid_tokens"] > 0
    assert manifests["model"]["metrics"]["steps"] == 2
    model_dir = root / "model" / manifests["model"]["version"]
    model = AutoModelForCausalLM.from_pretrained(model_dir)  # plain HF: no GGUF marker left
    assert type(model).__name__ == "LlamaForCausalLM"
    assert AutoTokenizer.from_pretrained(model_dir).chat_template  # inference wraps prompts like training
    rec = Recommender.from_store(str(root), num_beams=10)
    histories = [["1", "2", "3"], ["50", "172", "181"]]
    top = rec.top_items(histories, k=5)
    catalog = set(rec.sid_of)
    assert all(len(t) == 5 and set(t) <= catalog for t in top)
    assert rec.tokenizer.decode(rec.prompt_ids(["1"])).startswith("<|im_start|>system")
