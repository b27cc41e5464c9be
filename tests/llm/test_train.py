"""Fine-tuning on Ray Train, for real on CPU: 2-worker DDP, 2-worker DeepSpeed ZeRO-2, kill-and-resume, export.

The SID side is made here, not by the (slow) embedding pipeline: a real slice of Amazon-2018 Industrial
(the 300 most used items, their real train/valid examples) gets random unique 3-level codes written as the
``dataset`` and ``sids`` stages of a fresh store. Everything after that is the code under test: the Ray
Data instruction stage, the base_model stage (tiny Qwen2 preset, SID tokens added), Ray Train runs.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pytest
import torch

import sidrec.stages.model as model_stage
import sidrec.stages.run as stage_run
from sidrec.config import ConfigError, TrainConfig, config_from_dict, resolve_deepspeed_config
from sidrec.data.sources import load_amazon_prepared
from sidrec.llm.train.ds_config import fill_deepspeed_config
from sidrec.llm.train.fit import CRASH_ENV
from sidrec.llm.train.validate import eval_index, next_item_metrics
from sidrec.stages import base_model, instructions
from sidrec.store import ArtifactStore
from tests.conftest import shared_data

N_ITEMS = 300
TINY_MODEL = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 128,
              "max_position_embeddings": 256, "tokenizer_vocab_size": 1000}
TRAIN = {"num_workers": 2, "cpus_per_worker": 1.0, "epochs": 2, "max_steps": 120, "batch_size": 8, "lr": 3e-3,
         "warmup_ratio": 0.1, "max_length": 160, "eval_users": 30, "eval_beams": 10, "max_val_rows": 160,
         "log_every": 5}


def _slice(ds, items: set[str], split: str, cap: int) -> pa.Table:
    rows = []
    for r in ds.splits[split].to_pylist():
        hist = [i for i in r["history"] if i in items]
        if r["target"] in items and hist:
            rows.append({"user_id": r["user_id"], "history": hist, "target": r["target"]})
    rows = rows[:cap]
    schema = pa.schema([("user_id", pa.string()), ("history", pa.list_(pa.string())), ("target", pa.string())])
    return pa.Table.from_pylist(rows, schema=schema)


def _write_sid_side(store: ArtifactStore, first_code: int = 0) -> None:
    """``dataset`` + ``sids`` stages: a real Amazon Industrial slice with random unique 3-level SIDs
    (level-1 codes in [first_code, first_code + 8))."""
    ds = load_amazon_prepared(str(shared_data("amazon18-industrial")))
    use = Counter()
    for r in ds.splits["train"].to_pylist():
        use.update([*r["history"], r["target"]])
    items = {i for i, _ in use.most_common(N_ITEMS)}
    catalog = ds.catalog.filter(pa.array([i in items for i in ds.catalog["item_id"].to_pylist()]))
    run = store.begin("dataset")
    store.write_table(f"{run.path}/catalog.parquet", catalog)
    store.write_table(f"{run.path}/train.parquet", _slice(ds, items, "train", 1500))
    store.write_table(f"{run.path}/valid.parquet", _slice(ds, items, "valid", 300))
    store.write_table(f"{run.path}/profiles.parquet",
                      pa.table({"user_id": pa.array([], pa.string()), "profile": pa.array([], pa.string())}))
    store.publish(run, fp="test-dataset", config={}, inputs={})

    rng = np.random.default_rng(0)
    ids = sorted(catalog["item_id"].to_pylist())
    flat = rng.choice(8 * 8 * 8, size=len(ids), replace=False)
    codes = [[first_code + int(f // 64), int(f // 8 % 8), int(f % 8)] for f in flat]
    run = store.begin("sids")
    store.write_table(f"{run.path}/sids.parquet", pa.table({
        "item_id": pa.array(ids, pa.string()),
        "codes": pa.array(codes, pa.list_(pa.int64())),
        "sid": pa.array([f"<a_{a}><b_{b}><c_{c}>" for a, b, c in codes], pa.string()),
    }))
    store.publish(run, fp="test-sids", config={}, inputs={})


def _cfg(root, codebook_size: int = 256, **train):
    data = {"store": {"root": str(root)}, "model": TINY_MODEL, "train": {**TRAIN, **train},
            "quantize": {"codebook_size": codebook_size}, "ray": {"num_cpus": 2}}
    return config_from_dict(data)


def _prepare_store(root, first_code: int = 0, codebook_size: int = 256) -> ArtifactStore:
    """SID side written here, then the real instructions and base_model stages."""
    store = ArtifactStore(str(root))
    _write_sid_side(store, first_code)
    cfg = _cfg(root, codebook_size)
    instructions.build(store, cfg)
    base_model.build(store, cfg)
    return store


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, local_ray):
    root = tmp_path_factory.mktemp("train-store")
    return _prepare_store(root), root


@pytest.fixture(scope="module")
def ddp_run(prepared):
    store, root = prepared
    cfg = _cfg(root)
    return cfg, model_stage.build(store, cfg)


def _history(store: ArtifactStore) -> dict:
    return store.read_json(f"{store.current_path('model')}/metrics.json")


# ---------------------------------------------------------------------------------------------- config


def test_train_config_validation_names_the_field():
    with pytest.raises(ConfigError, match="train.batch_size must be >= 1, got 0"):
        config_from_dict({"train": {"batch_size": 0}})
    with pytest.raises(ConfigError, match="train.eval_beams must be >= 10, got 4"):
        config_from_dict({"train": {"eval_beams": 4}})
    with pytest.raises(ConfigError, match="train.strategy must be one of"):
        config_from_dict({}, ["train.strategy=fsdp"])
    with pytest.raises(ConfigError, match="train.deepspeed_config"):
        config_from_dict({}, ["train.strategy=deepspeed", "train.deepspeed_config=nope.json"])
    cfg = config_from_dict({}, ["train.strategy=deepspeed", "train.deepspeed_config=ds_zero3.json"])
    assert cfg.train.strategy == "deepspeed"
    with pytest.raises(ConfigError, match="train.lora is supported with DDP and DeepSpeed ZeRO-1/2"):
        config_from_dict({}, ["train.strategy=deepspeed", "train.deepspeed_config=ds_zero3.json", "train.lora=true"])


@pytest.mark.parametrize("name, stage", [("ds_zero2.json", 2), ("ds_zero3.json", 3)])
def test_deepspeed_configs_are_filled_without_auto(name, stage):
    t = TrainConfig(batch_size=4, grad_accum=3, max_grad_norm=0.5, lr=2e-4, weight_decay=0.1, use_gpu=True)
    ds = fill_deepspeed_config(resolve_deepspeed_config(name), t, world_size=2)
    assert ds["zero_optimization"]["stage"] == stage
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (
        4, 3, 24)
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] is True
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["torch_adam"] is True
    assert ds["optimizer"]["params"]["lr"] == 2e-4 and ds["zero_force_ds_cpu_optimizer"] is False
    assert "auto" not in json.dumps(ds)
    if stage == 3:
        assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert fill_deepspeed_config(resolve_deepspeed_config(name), replace(t, use_gpu=False), 1)["bf16"][
        "enabled"] is False


# ------------------------------------------------------------------------------------------ data stages


@pytest.mark.slow
def test_instruction_and_base_model_stages(prepared):
    store, root = prepared
    m = store.require("instructions")["metrics"]
    assert m["valid_tasks"] == {"next_item": m["valid_rows"]} and m["valid_rows"] > 100
    assert set(m["train_tasks"]) == {"next_item", "sid_to_title", "title_to_sid"}
    assert m["train_tasks"]["sid_to_title"] == m["train_tasks"]["title_to_sid"] == N_ITEMS
    train = store.read_table(f"{store.current_path('instructions')}/train").to_pylist()
    assert any(r["task"] == "next_item" and r["response"].startswith("<a_") for r in train)
    b = store.require("base_model")["metrics"]
    assert b["sid_tokens"] == b["sid_tokens_added"] <= 24 and b["tokenizer_size"] == b["tokenizer_size_before"] + b[
        "sid_tokens"]
    assert b["embedding_rows"] % 64 == 0 and b["embedding_rows"] >= b["tokenizer_size"]
    # unchanged inputs: both stages are skipped
    cfg = _cfg(root)
    assert instructions.build(store, cfg)["version"] == store.require("instructions")["version"]
    assert base_model.build(store, cfg)["version"] == store.require("base_model")["version"]


# ------------------------------------------------------------------------------------------- training


@pytest.mark.slow
def test_ddp_two_workers_lowers_validation_loss(prepared, ddp_run):
    store, _ = prepared
    cfg, manifest = ddp_run
    m = manifest["metrics"]
    assert m["strategy"] == "ddp" and m["epochs"] == 2 and m["steps"] == 120
    assert m["final_val_loss"] < m["val_loss_before"] - 0.5, m
    hist = _history(store)["history"]
    assert [h["epoch"] for h in hist] == [1, 2] and all(h["world_size"] == 2 for h in hist)
    assert all(0.0 <= h["hr@10"] <= 1.0 and h["eval_users"] == 30 for h in hist)
    assert hist[-1]["tokens_per_s"] > 0 and hist[-1]["resumed_from_epoch"] == 0
    files = set(manifest["files"])
    assert {"config.json", "model.safetensors", "tokenizer.json", "metrics.json", "loss_curve.png"} <= files
    assert store.read_bytes(f"{store.current_path('model')}/loss_curve.png")[:4] == b"\x89PNG"
    # the Ray Train run is named after the fingerprint run_stage published
    assert _history(store)["run"]["name"] == f"model-{manifest['fingerprint']}"
    # same config and inputs again: every training-side stage is skipped
    versions = {s: store.require(s)["version"] for s in ("instructions", "base_model", "model")}
    again = {s: build(store, cfg)["version"]
             for s, build in (("instructions", instructions.build), ("base_model", base_model.build),
                              ("model", model_stage.build))}
    assert again == versions


@pytest.mark.slow
def test_exported_model_loads_with_plain_transformers_and_generates_a_sid(prepared, ddp_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sidrec.llm.sft import encode_prompt

    store, _ = prepared
    path = store.current_path("model")
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    rows = store.read_table(f"{store.current_path('instructions')}/valid").to_pylist()[:5]
    sids = store.read_table(f"{store.current_path('sids')}/sids.parquet")["sid"].to_pylist()
    base = store.require("base_model")["metrics"]
    assert model.get_input_embeddings().weight.shape[0] == base["embedding_rows"] and len(tok) == base[
        "tokenizer_size"]
    prompt = torch.tensor([encode_prompt(rows[0]["prompt"], tok, 160)])
    # unconstrained greedy: the fine-tuned model answers a next-item prompt with a SID token
    out = model.generate(prompt, max_new_tokens=1, do_sample=False, pad_token_id=tok.pad_token_id)
    assert tok.convert_ids_to_tokens(out[0, prompt.shape[1]:].tolist())[0].startswith("<a_")
    # and it learned the SID grammar: at each answer step the most probable level is the one the trie
    # allows (untrained, each level holds ~1/7 of the mass), and after the last level, eos is the top token.
    # (Greedy token by token can still stop early on this 120-step toy: 8 b-codes share the b mass.)
    vocab = tok.get_vocab()
    level_ids = {p: [i for t, i in vocab.items() if t.startswith(f"<{p}_")] for p in "abc"}
    seq = prompt[0].tolist()
    for level in "abc":
        with torch.no_grad():
            probs = model(torch.tensor([seq])).logits[0, -1].softmax(-1)
        mass = {p: probs[ids].sum().item() for p, ids in level_ids.items()}
        assert max(mass, key=mass.get) == level and mass[level] > 0.2, (level, mass)
        seq.append(max(level_ids[level], key=lambda i: probs[i].item()))
    with torch.no_grad():
        assert model(torch.tensor([seq])).logits[0, -1].argmax().item() == tok.eos_token_id
    # constrained beam search: ten distinct valid SIDs
    from sidrec.decode.beam import SidDecoder
    from sidrec.sids.index import SidIndex

    index = SidIndex.from_table(store.read_table(f"{store.current_path('sids')}/sids.parquet"))
    res = next_item_metrics(model, tok, index, [r["prompt"] for r in rows], [r["target_item"] for r in rows],
                            k=10, num_beams=10, max_length=160)
    assert res["users"] == 5 and 0.0 <= res["hr@10"] <= 1.0
    hits = SidDecoder(model, tok, index, num_beams=10).search([encode_prompt(rows[0]["prompt"], tok, 155)], k=10)[0]
    recs = [h.sid for h in hits]
    assert len(recs) == 10 and len(set(recs)) == 10 and set(recs) <= set(sids)


@pytest.mark.slow
def test_deepspeed_zero2_two_workers(prepared):
    store, root = prepared
    base_rows = store.require("base_model")["metrics"]["embedding_rows"]
    cfg = _cfg(root, strategy="deepspeed", deepspeed_config="ds_zero2.json", eval_users=10)
    m = model_stage.build(store, cfg)["metrics"]
    assert m["strategy"] == "deepspeed" and m["steps"] == 120
    assert m["final_val_loss"] < m["val_loss_before"] - 0.5, m
    hist = _history(store)["history"]
    assert all(h["vocab_rows"] == base_rows for h in hist)  # asserted in the worker after initialize too
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(store.current_path("model"))
    assert model.get_input_embeddings().weight.shape[0] == base_rows


@pytest.mark.slow
def test_worker_killed_after_first_checkpoint_resumes_from_it(prepared, ddp_run, monkeypatch):
    store, root = prepared
    _, uninterrupted = ddp_run
    monkeypatch.setenv(CRASH_ENV, "80")  # epoch 1 = steps 1-60 (checkpointed), the crash hits in epoch 2
    # same training as the DDP run (only the cheap check differs, which changes the run name, not the math)
    cfg = _cfg(root, eval_users=0, max_failures=1)
    m = model_stage.build(store, cfg)["metrics"]
    assert m["worker_starts"] == 2 and m["resumed_from_epoch"] == 1, m
    assert m["steps"] == 120 and m["epochs"] == 2
    hist = _history(store)["history"]
    assert [(h["epoch"], h["resumed_from_epoch"], h["starts"]) for h in hist] == [(1, 0, 1), (2, 1, 2)]
    # weights, AdamW moments, scheduler and data order all came back: the result is the uninterrupted one
    assert hist[1]["val_loss"] == pytest.approx(uninterrupted["metrics"]["final_val_loss"], rel=1e-4)


@pytest.mark.slow
def test_step_checkpoint_resumes_inside_an_epoch(prepared, ddp_run, monkeypatch):
    """A max_steps run of one long epoch must not restart from step 0: with ``checkpoint_every`` a crash
    resumes from the last step checkpoint, and the math is the uninterrupted run's."""
    store, root = prepared
    _, uninterrupted = ddp_run
    monkeypatch.setenv(CRASH_ENV, "50")  # epoch 1 = steps 1-60: step checkpoint at 40, crash at 50
    cfg = _cfg(root, eval_users=0, max_failures=1, checkpoint_every=40)
    m = model_stage.build(store, cfg)["metrics"]
    assert m["worker_starts"] == 2 and m["resumed_from_step"] == 40 and m["resumed_from_epoch"] == 0, m
    assert m["steps"] == 120 and m["epochs"] == 2 and m["best_epoch"] in (1, 2)
    hist = _history(store)["history"]
    assert [(h["epoch"], h["starts"]) for h in hist] == [(1, 2), (2, 2)]  # step checkpoints are not epochs
    assert hist[1]["val_loss"] == pytest.approx(uninterrupted["metrics"]["final_val_loss"], rel=1e-4)


# ------------------------------------------------------------------------------------------- regressions


def _fake_inputs(store: ArtifactStore) -> None:
    for stage in model_stage.INPUTS:
        store.publish(store.begin(stage), fp=f"test-{stage}", config={}, inputs={})


class _Stop(Exception):
    pass


def test_model_stage_names_the_run_after_the_fingerprint_run_stage_publishes(tmp_path, monkeypatch):
    """The run name comes from `stage_fingerprint` (THE formula), not a copy of it: change the formula and
    the name follows. Also: the quantizer's codebook size reaches the workers (their SID trie)."""
    store = ArtifactStore(str(tmp_path))
    _fake_inputs(store)
    published, launched = [], []
    formula = stage_run.fingerprint

    def other_formula(obj):
        fp = "z" + formula(obj)
        published.append(fp)
        return fp

    def fake_fit(store, tcfg, ds_cfg, codebook_size, name, progress=None):
        launched.append((name, codebook_size))
        raise _Stop

    monkeypatch.setattr(stage_run, "fingerprint", other_formula)
    monkeypatch.setattr(model_stage, "fit_on_ray", fake_fit)
    monkeypatch.setattr(model_stage, "init_ray", lambda cfg: None)
    with pytest.raises(_Stop):
        model_stage.build(store, _cfg(tmp_path, codebook_size=512))
    (name, codebook_size), = launched
    assert published and set(published) == {name.removeprefix("model-")}
    assert codebook_size == 512


def test_eval_index_takes_the_codebook_size():
    table = pa.table({"item_id": pa.array(["x", "y"], pa.string()),
                      "codes": pa.array([[300, 1], [2, 511]], pa.list_(pa.int64()))})
    index = eval_index(table, 512)
    assert index.codebook_size == 512 and sorted(index.all_item_ids()) == ["x", "y"]
    with pytest.raises(ValueError, match="must lie in"):
        eval_index(table, 256)


@pytest.mark.slow
def test_in_training_check_with_codebook_over_256(tmp_path, local_ray):
    """quantize.codebook_size > 256: the workers' SID trie is built with it (it used to assume 256)."""
    store = _prepare_store(tmp_path, first_code=252, codebook_size=512)  # level-1 codes 252..259
    cfg = _cfg(tmp_path, codebook_size=512, num_workers=1, epochs=1, max_steps=2, eval_users=4,
               max_val_rows=16, log_every=1)
    m = model_stage.build(store, cfg)["metrics"]
    assert m["steps"] == 2 and 0.0 <= m["hr@10"] <= 1.0
    assert _history(store)["history"][0]["eval_users"] == 4


def test_best_checkpoint_is_never_a_step_checkpoint():
    from types import SimpleNamespace

    from sidrec.llm.train.driver import best_checkpoint

    result = SimpleNamespace(checkpoint="latest", best_checkpoints=[
        ("step40", {"val_loss": float("inf"), "partial_epoch": True}), ("epoch1", {"val_loss": 2.0}),
        ("epoch2", {"val_loss": 1.5}), ("step100", {"val_loss": 0.1, "partial_epoch": True})])
    assert best_checkpoint(result) == "epoch2"
    assert best_checkpoint(SimpleNamespace(checkpoint="latest", best_checkpoints=[
        ("step40", {"val_loss": float("inf"), "partial_epoch": True})])) == "latest"
