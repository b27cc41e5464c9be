"""Collaborative item vectors for the quantizer: who-clicked-what, next to the item text.

Text-only SIDs put items that read alike under one prefix. Where the text says little about what is bought
together (MovieLens has a title and genres), a prefix then groups items that no history connects, and the
model must learn every item's transitions one by one. ``quantize.collab_weight`` > 0 gives the quantizer a
second, collaborative part: each item's row of a truncated SVD of the positive PMI of item co-occurrence
within ``quantize.collab_window`` steps of the train sequences (the word2vec-as-matrix-factorisation view,
Levy & Goldberg 2014). The quantizer input is then

    [sqrt(1 - w) * text / |text|,  sqrt(w) * collab / |collab|]          (unit norm, w = collab_weight)

Items with no train co-occurrence (new items, the cold items of ``eval.cold_start``, an admin add) get the
mean collaborative vector of their ``collab_neighbours`` nearest items by text, so a new item lands where
items that read like it are clicked, and every path (the ``sids`` stage, an admin add, the cold-start
evaluation) computes the same input from the same stored vectors.

Only the train split feeds the counts (never valid or test), after the cold-start hold-out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

COLLAB_FILE = "collab.parquet"  # in the quantizer stage: item_id, vector (fixed-size list), observed


def _unit(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(n, 1e-12)).astype(np.float32)


def cooccurrence_pairs(histories: Sequence[Sequence[str]], targets: Sequence[str], window: int,
                       row_of: dict[str, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(target rows, earlier-item rows, 1 / distance) for the last ``window`` history items of every example,
    as int32 / int32 / float32 arrays (rows of ``row_of``; pairs with an item outside it are dropped).

    Each train item is the target of one example whose history precedes it, so every pair of items at most
    ``window`` apart in a user's sequence is counted once, nearer pairs more.
    """
    a, b, w = [], [], []
    for h, t in zip(histories, targets, strict=True):
        rt = row_of.get(t)
        if rt is None:
            continue
        for d, prev in enumerate(reversed(list(h)[-window:]), start=1):
            rp = row_of.get(prev)
            if rp is not None and rp != rt:
                a.append(rt)
                b.append(rp)
                w.append(1.0 / d)
    return np.asarray(a, np.int32), np.asarray(b, np.int32), np.asarray(w, np.float32)


def svd_vectors(n: int, pairs: tuple[np.ndarray, np.ndarray, np.ndarray], dim: int, seed: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """(vectors [n, dim'] float32 unit rows, observed [n] bool): PPMI of the symmetric co-occurrence, SVD.

    ``pairs``: `cooccurrence_pairs`'s arrays. dim' = min(dim, n - 2). A row with no co-occurrence is all zeros
    and not observed.
    """
    import scipy.sparse as sp
    from scipy.sparse.linalg import svds

    rows, cols, vals = pairs
    c = sp.coo_matrix((np.concatenate([vals, vals]).astype(np.float64),
                       (np.concatenate([rows, cols]), np.concatenate([cols, rows]))), shape=(n, n)).tocsr()
    c.sum_duplicates()
    deg = np.asarray(c.sum(axis=1)).ravel()
    observed = deg > 0
    k = min(dim, n - 2)
    if k < 1 or c.nnz == 0:
        return np.zeros((n, max(k, 1)), np.float32), observed
    coo = c.tocoo()
    pmi = np.log(coo.data * deg.sum() / (deg[coo.row] * deg[coo.col]))
    keep = pmi > 0
    ppmi = sp.csr_matrix((pmi[keep], (coo.row[keep], coo.col[keep])), shape=(n, n))
    rng = np.random.default_rng(seed)
    u, s, _ = svds(ppmi, k=k, v0=rng.standard_normal(n))
    order = np.argsort(-s)
    u, s = u[:, order], s[order]
    u *= np.sign(u[np.abs(u).argmax(axis=0), np.arange(k)])   # a fixed sign per component
    vec = u * np.sqrt(s)[None, :]
    vec[~observed] = 0.0
    return _unit(vec) * observed[:, None], observed


def impute(text: np.ndarray, known_text: np.ndarray, known_vectors: np.ndarray, neighbours: int) -> np.ndarray:
    """[M, d] collaborative vectors for items known only by their text [M, D]: the unit mean vector of the
    ``neighbours`` known items (text [K, D], vectors [K, d]) nearest by cosine."""
    if len(known_text) == 0:
        return np.zeros((len(text), known_vectors.shape[1]), np.float32)
    sim = _unit(text) @ _unit(known_text).T                              # [M, K]
    k = min(neighbours, sim.shape[1])
    top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    return _unit(known_vectors[top].mean(axis=1))


@dataclass
class CollabVectors:
    """The stored collaborative part of the quantizer input, with what imputes it for unseen items."""

    item_ids: list[str]
    vectors: np.ndarray          # [N, d] unit rows (imputed where not observed)
    observed: np.ndarray         # [N] bool: had train co-occurrence
    weight: float
    neighbours: int

    def __post_init__(self) -> None:
        self.row_of = {i: r for r, i in enumerate(self.item_ids)}
        self.known_vectors = self.vectors[self.observed]     # what imputation averages, taken once

    @classmethod
    def fit(cls, item_ids: Sequence[str], text: np.ndarray, histories: Sequence[Sequence[str]],
            targets: Sequence[str], *, weight: float, dim: int, window: int, neighbours: int, seed: int
            ) -> CollabVectors:
        """Vectors of every item (text [N, D] in ``item_ids`` order) from the train examples."""
        ids = list(item_ids)
        row_of = {i: r for r, i in enumerate(ids)}
        vec, observed = svd_vectors(len(ids), cooccurrence_pairs(histories, targets, window, row_of), dim, seed)
        if (~observed).any():
            vec[~observed] = impute(text[~observed], text[observed], vec[observed], neighbours)
        return cls(ids, vec, observed, weight, neighbours)

    def lookup(self, item_ids: Sequence[str]) -> np.ndarray:
        """[M, d] stored vectors of catalog items (KeyError on an unknown id)."""
        return self.vectors[[self.row_of[i] for i in item_ids]]

    def for_text(self, text: np.ndarray, known_text: np.ndarray) -> np.ndarray:
        """[M, d] vectors of new items from their text, imputed from the observed items (``known_text``
        [K, D]: the text embeddings of the observed items, in ``item_ids`` order: ``text[observed]``)."""
        return impute(text, known_text, self.known_vectors, self.neighbours)

    def combine(self, text: np.ndarray, vectors: np.ndarray) -> np.ndarray:
        """Quantizer input [M, D + d] from text [M, D] and collaborative vectors [M, d] (see the module doc)."""
        w = self.weight
        return np.concatenate([np.sqrt(1 - w) * _unit(text), np.sqrt(w) * _unit(vectors)], axis=1
                              ).astype(np.float32)

    # ------------------------------------------------------------------------------------------ storage
    def to_table(self):
        import pyarrow as pa

        flat = pa.array(self.vectors.reshape(-1), type=pa.float32())
        return pa.table({"item_id": pa.array(self.item_ids, pa.string()),
                         "vector": pa.FixedSizeListArray.from_arrays(flat, self.vectors.shape[1]),
                         "observed": pa.array(self.observed, pa.bool_())})

    @classmethod
    def from_table(cls, table, weight: float, neighbours: int) -> CollabVectors:
        from sidrec.sids.embed import embeddings_to_numpy

        vec = embeddings_to_numpy(table, "vector")
        return cls(table.column("item_id").to_pylist(), vec.astype(np.float32),
                   np.asarray(table.column("observed").to_pylist(), bool), weight, neighbours)


COLLAB_FIELDS = ("collab_weight", "collab_dim", "collab_window", "collab_neighbours")


def enabled(qcfg) -> bool:
    return qcfg.collab_weight > 0


def stage_config(qcfg) -> dict:
    """The quantizer section as the stage fingerprints it: without the collab options when they are off, so
    a text-only store keeps the fingerprint it had before the options existed."""
    from dataclasses import asdict

    section = asdict(qcfg)
    return section if enabled(qcfg) else {k: v for k, v in section.items() if k not in COLLAB_FIELDS}


def read_collab(store) -> CollabVectors | None:
    """The published quantizer stage's collaborative vectors, with the weight it was fitted with; None when
    it was fitted on text only (its manifest lists no ``collab.parquet``; a stage built with the option off
    does not record the option at all, so its config must not be read back with today's defaults)."""
    manifest = store.require("quantizer")
    if COLLAB_FILE not in manifest.get("files", []):
        return None
    table = store.read_table(f"{store.current_path('quantizer')}/{COLLAB_FILE}")
    cfg = manifest["config"]
    return CollabVectors.from_table(table, float(cfg["collab_weight"]), int(cfg["collab_neighbours"]))
