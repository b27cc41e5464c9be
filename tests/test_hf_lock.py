"""Concurrent model loads in one process (a Serve replica: a model reload beside a catalog write's encoder
load) must not leave transformers' weight tying disabled (sidrec.hf_lock)."""

from __future__ import annotations

import threading

import pytest
from transformers.modeling_utils import PreTrainedModel

from sidrec.config import EmbedConfig, ModelConfig
from sidrec.llm.model import build_tiny_qwen2, load_base, train_bpe_tokenizer
from sidrec.sids.embed import TextEncoder

TINY = ModelConfig(tokenizer_vocab_size=300, hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
                   intermediate_size=128)


def _tied(model) -> bool:
    return model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


@pytest.fixture(scope="module")
def tied_checkpoint(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tied")
    tokenizer = train_bpe_tokenizer([f"steel pipe valve number {k}" for k in range(200)], 300)
    build_tiny_qwen2(TINY, tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_concurrent_loads_keep_weight_tying(tied_checkpoint):
    tie_weights = PreTrainedModel.tie_weights
    loaded, errors = [], []

    def run(fn, times):
        try:
            for _ in range(times):
                fn()
        except Exception as e:  # noqa: BLE001 - the assertion below reports it
            errors.append(e)

    def load_model():
        loaded.append(load_base(ModelConfig(base=tied_checkpoint), [])[0])

    threads = [threading.Thread(target=run, args=(load_model, 6)) for _ in range(3)]
    threads.append(threading.Thread(target=run, args=(lambda: TextEncoder(EmbedConfig()), 2)))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert PreTrainedModel.tie_weights is tie_weights, "a concurrent load left tie_weights patched"
    assert len(loaded) == 18 and all(_tied(m) for m in loaded)
    assert _tied(build_tiny_qwen2(TINY, load_base(ModelConfig(base=tied_checkpoint), [])[1]))
