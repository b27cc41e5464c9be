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
