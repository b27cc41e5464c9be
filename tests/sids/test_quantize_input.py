import subprocess
import sys

import numpy as np
import pyarrow as pa


def test_read_only_arrow_embeddings_give_no_warning():
    # torch warns about non-writable arrays once per process, so check in a fresh one with warnings as errors
    code = """
import numpy as np, pyarrow as pa
from sidrec.config import QuantizerConfig
from sidrec.sids.embed import embeddings_to_numpy
from sidrec.sids.quantize import encode_codes, fit_quantizer
v = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)
emb = embeddings_to_numpy(pa.table({"embedding": pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), 8)}))
assert not emb.flags.writeable  # zero-copy from Arrow, as the quantizer stage reads it
q = fit_quantizer(emb, QuantizerConfig(method="rqkmeans", levels=2, codebook_size=4, kmeans_iters=3))
assert encode_codes(q, emb).shape == (64, 2)
"""
    proc = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", code], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "not writable" not in proc.stderr, proc.stderr[-2000:]


def test_read_embeddings_is_in_item_order_whatever_the_file_order(tmp_path):
    import pyarrow.parquet as pq

    from sidrec.sids.embed import read_embeddings
    from sidrec.store import ArtifactStore

    store = ArtifactStore(str(tmp_path))
    run = store.begin("embeddings")
    folder = tmp_path / "embeddings" / run.version / "embeddings"
    folder.mkdir()
    for name, ids in (("a.parquet", ["c", "d"]), ("b.parquet", ["a", "b"])):  # blocks finished out of order
        vecs = np.array([[ord(i), 0.0] for i in ids], np.float32)
        emb = pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1)), 2)
        pq.write_table(pa.table({"item_id": ids, "embedding": emb}), folder / name)
    store.publish(run, fp="x", config={}, inputs={})
    ids, emb = read_embeddings(store)
    assert ids == ["a", "b", "c", "d"] and emb[:, 0].tolist() == [97.0, 98.0, 99.0, 100.0]
