"""Stage ``base_model``: `load_base` + `add_sid_tokens` with the SID vocabulary, saved with `save_model`.

The embedding matrix is resized here, long before any DDP wrapper or `deepspeed.initialize` sees it.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict

import pyarrow as pa
import pyarrow.fs as pafs

from sidrec.config import PRESET, SidrecConfig
from sidrec.data.cold_start import cold_items
from sidrec.llm.instructions import template_corpus
from sidrec.llm.model import add_sid_tokens, init_sid_rows_from_titles, load_base, save_model
from sidrec.sids.tokens import used_tokens
from sidrec.stages.run import run_stage
from sidrec.store import ArtifactStore, StageRun

CORPUS_COLUMNS = ("title", "brand", "categories", "description")


def tokenizer_corpus(store: ArtifactStore) -> list[str]:
    """Texts the preset's BPE tokenizer is trained on: catalog text (not the held-out cold items'), profiles and
    the prompt templates."""
    dpath = store.current_path("dataset")
    catalog = store.read_table(f"{dpath}/catalog.parquet")
    if cold := set(cold_items(store)):
        catalog = catalog.filter(pa.array([i not in cold for i in catalog.column("item_id").to_pylist()]))
    texts: list[str] = []
    for col in CORPUS_COLUMNS:
        if col in catalog.column_names:
            texts += [t for t in catalog[col].to_pylist() if t]
    if "profiles.parquet" in store.require("dataset").get("files", []):
        texts += [p for p in store.read_table(f"{dpath}/profiles.parquet")["profile"].to_pylist() if p]
    return texts + template_corpus()


def build(store: ArtifactStore, cfg: SidrecConfig, force: bool = False) -> dict:
    """Stage ``base_model``: base LM + tokenizer with one added token per SID (level, code), resized."""
    dataset, sids = store.require("dataset"), store.require("sids")

    def body(run: StageRun) -> dict:
        corpus = tokenizer_corpus(store) if cfg.model.base == PRESET else []
        init = cfg.model.new_token_init
        model, tokenizer = load_base(cfg.model, corpus)
        before = len(tokenizer)
        vocab = used_tokens(store.sid_table(["sid"])["sid"].to_pylist())
        added = add_sid_tokens(model, tokenizer, vocab, init="random" if init == "random" else "mean")
        titled = 0
        if init == "titles":
            titles = store.titles()
            titled = init_sid_rows_from_titles(model, tokenizer, ((sid, titles.get(item, ""))
                                                                  for item, sid in store.sid_map().items()))
        if isinstance(store.fs, pafs.LocalFileSystem):
            save_model(model, tokenizer, run.path)
        else:
            with tempfile.TemporaryDirectory(prefix="sidrec-base-") as tmp:
                save_model(model, tokenizer, tmp)
                store.upload_dir(tmp, run.path)
        return {"base": cfg.model.base, "tokenizer_size_before": before, "sid_tokens": len(vocab),
                "sid_tokens_added": added, "sid_tokens_from_titles": titled, "tokenizer_size": len(tokenizer),
                "embedding_rows": int(model.get_input_embeddings().weight.shape[0]),
                "parameters": sum(p.numel() for p in model.parameters())}

    # the preset's tokenizer is trained on catalog text, so the dataset is an input either way
    inputs = {"dataset": dataset["fingerprint"], "sids": sids["fingerprint"]}
    return run_stage(store, "base_model", asdict(cfg.model), inputs, force, body)
