import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from sidrec.config import ConfigError, QuantizerConfig, section_from_dict
from sidrec.sids.codes import assign_collisions, collision_stats
from sidrec.sids.quantize import (
    CONFIG_FILE,
    RQVAE,
    WEIGHTS_FILE,
    ResidualQuantizer,
    RQKMeans,
    build_quantizer,
    encode_codes,
    fit_quantizer,
    kmeans,
    load_quantizer,
    quantizer_from_bytes,
    quantizer_to_bytes,
    reconstruction_error,
    save_quantizer,
)

N_CLUSTERS, PER_CLUSTER, DIM = 8, 250, 64


def clustered(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """8 well-separated Gaussian clusters in 64-d: random directions, per-dim noise 0.02."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(N_CLUSTERS, DIM))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    labels = np.repeat(np.arange(N_CLUSTERS), PER_CLUSTER)
    x = centers[labels] + 0.02 * rng.normal(size=(len(labels), DIM))
    perm = rng.permutation(len(labels))
    return (x[perm] * 3.0).astype(np.float32), labels[perm]  # scale: normalize_input must undo it


SMALL = dict(levels=3, codebook_size=8, latent_dim=16, hidden_dims=(64, 32), epochs=30, warmup_epochs=1,
             batch_size=256, lr=3e-3, kmeans_iters=20, patience=0, min_steps=0)  # a fixed schedule


def small_cfg(method: str, **kw) -> QuantizerConfig:
    return QuantizerConfig(method=method, **{**SMALL, **kw})


@pytest.fixture(scope="module")
def data():
    return clustered()


@pytest.fixture(scope="module")
def fitted(data):
    x, _ = data
    return {m: fit_quantizer(x, small_cfg(m)) for m in ("rqvae", "rqkmeans")}


# ---------------------------------------------------------------------------------------------- k-means


def test_kmeans_recovers_cluster_means():
    rng = np.random.default_rng(0)
    centers = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    labels = rng.integers(0, 4, 400)
    x = torch.tensor(centers[labels] + rng.normal(size=(400, 2)), dtype=torch.float32)
    c = kmeans(x, 4, iters=20, generator=torch.Generator().manual_seed(0))
    ref = np.stack([x.numpy()[labels == i].mean(0) for i in range(4)])
    # match each reference mean to its nearest centroid: one-to-one and equal to the cluster mean
    match = np.linalg.norm(ref[:, None] - c.numpy()[None], axis=-1).argmin(1)
    assert sorted(match) == [0, 1, 2, 3]
    np.testing.assert_allclose(c.numpy()[match], ref, atol=1e-4)
    c2 = kmeans(x, 4, iters=20, generator=torch.Generator().manual_seed(0))
    assert torch.equal(c, c2)


def test_kmeans_fewer_points_than_k():
    x = torch.tensor([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]])
    c = kmeans(x, 5, iters=5, generator=torch.Generator().manual_seed(0))
    assert c.shape == (5, 2)
    for row in c:  # every centroid is one of the points
        assert (x == row).all(1).any()
    assert len({tuple(r.tolist()) for r in c}) == 3


# ---------------------------------------------------------------------------------------------- RQ module


def test_residual_quantizer_matches_reference():
    torch.manual_seed(0)
    rq = ResidualQuantizer(levels=3, codebook_size=5, dim=4, commitment_weight=0.25)
    rq.codebooks.data.normal_()
    rq.initialized.fill_(True)
    z = torch.randn(32, 4, requires_grad=True)
    z_q, codes, loss = rq(z)
    # reference: brute-force nearest code per level on the running residual
    r = z.detach().numpy().astype(np.float64)
    cb = rq.codebooks.detach().numpy().astype(np.float64)
    ref_codes, ref_loss, ref_sum = [], 0.0, np.zeros_like(r)
    for lvl in range(3):
        d = ((r[:, None, :] - cb[lvl][None]) ** 2).sum(-1)
        idx = d.argmin(1)
        e = cb[lvl][idx]
        ref_loss += (1 + 0.25) * ((r - e) ** 2).sum(-1).mean()
        ref_sum += e
        r = r - e
        ref_codes.append(idx)
    np.testing.assert_array_equal(codes.numpy(), np.stack(ref_codes, 1))
    np.testing.assert_allclose(z_q.detach().numpy(), ref_sum, atol=1e-5)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-5)
    np.testing.assert_allclose(rq.decode(codes).detach().numpy(), ref_sum, atol=1e-5)
    assert torch.equal(rq.encode(z.detach()), codes)
    # straight-through: d(sum z_q)/dz = 1
    (g,) = torch.autograd.grad(z_q.sum(), z)
    assert torch.equal(g, torch.ones_like(g))
    # usage counters saw every code hit once per item and level
    assert rq.usage.sum().item() == 32 * 3


def test_dead_codes_reseeded_from_batch_residuals():
    rq = ResidualQuantizer(levels=1, codebook_size=4, dim=2)
    rq.codebooks.data[0] = torch.tensor([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0], [-100.0, 0.0]])
    rq.initialized.fill_(True)
    rq.train()
    # all items hit code 0; only one residual is off its code, so D^2-weighted reseeding must pick it
    z = torch.zeros(16, 2)
    z[5] = torch.tensor([3.0, 4.0])
    rq(z)
    assert rq.usage[0].tolist() == [16, 0, 0, 0]
    moved = rq.reseed_dead_codes(torch.Generator().manual_seed(0))
    assert moved == 3
    assert torch.equal(rq.codebooks.data[0, 0], torch.zeros(2))  # the used code stays
    assert torch.equal(rq.codebooks.data[0, 1:], torch.tensor([[3.0, 4.0]] * 3))
    assert rq.usage.sum() == 0  # counters restart for the next window
    # a second window in which every code is hit moves nothing
    rq.codebooks.data[0] = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [-10.0, 0.0]])
    rq(torch.tensor([[0.0, 0.0], [9.0, 0.0], [0.0, 9.0], [-9.0, 0.0]]))
    assert rq.reseed_dead_codes() == 0


def test_repair_moves_unused_codes_onto_farthest_residuals():
    rq = ResidualQuantizer(levels=2, codebook_size=4, dim=2)
    rq.codebooks.data[0] = torch.tensor([[0.0, 0.0], [50.0, 0.0], [0.0, 50.0], [-50.0, 0.0]])
    rq.codebooks.data[1] = torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [-0.1, 0.0]])
    rq.initialized.fill_(True)
    z = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0], [2.0, 2.0], [0.5, 0.0]])
    before = rq.encode(z)
    assert sorted(set(before[:, 0].tolist())) == [0]  # level 0: codes 1-3 unused
    moved = rq.repair_dead_codes(z)
    codes = rq.encode(z)
    # the three residuals farthest from code 0 ([0,3], [2,2], [1,0]) became codes 1, 2, 3 in that order
    assert torch.equal(rq.codebooks.data[0, 1:], torch.tensor([[0.0, 3.0], [2.0, 2.0], [1.0, 0.0]]))
    assert sorted(set(codes[:, 0].tolist())) == [0, 1, 2, 3]
    # level 1 after the repair: only [0.5, 0] is off its level-0 code -> one live code + one moved there
    assert moved >= 3 and len(set(codes[:, 1].tolist())) >= 2
    assert rq.repair_dead_codes(z[:0]) == 0  # no items: nothing to move


# ---------------------------------------------------------------------------------------------- fitted models


@pytest.mark.parametrize("method", ["rqvae", "rqkmeans"])
def test_first_code_follows_clusters(fitted, data, method):
    x, labels = data
    codes = encode_codes(fitted[method], x)
    assert codes.shape == (len(x), 3) and codes.dtype == np.int64
    assert codes.min() >= 0 and codes.max() < 8
    majority = []
    for c in range(N_CLUSTERS):
        first = codes[labels == c, 0]
        top = np.bincount(first, minlength=8).argmax()
        assert (first == top).mean() >= 0.99, f"cluster {c} split over first codes"
        majority.append(top)
    assert len(set(majority)) == N_CLUSTERS  # different clusters -> different first codes
    # pairs from different clusters almost never share a first code
    rng = np.random.default_rng(0)
    i, j = rng.integers(0, len(x), (2, 20000))
    cross = labels[i] != labels[j]
    assert (codes[i, 0] == codes[j, 0])[cross].mean() < 0.01


@pytest.mark.parametrize("method", ["rqvae", "rqkmeans"])
def test_dedup_makes_sids_unique(fitted, data, method):
    x, _ = data
    codes = encode_codes(fitted[method], x)
    deduped = assign_collisions(codes, "dedup", max_extra=len(x))
    s = collision_stats(deduped)
    assert s["n_unique_sids"] == len(x) and s["largest_group"] == 1


def test_fitted_models_are_in_eval_mode_with_history(fitted):
    assert isinstance(fitted["rqvae"], RQVAE) and isinstance(fitted["rqkmeans"], RQKMeans)
    assert not fitted["rqvae"].training and not fitted["rqkmeans"].training
    h = fitted["rqvae"].history
    assert [r["epoch"] for r in h] == list(range(SMALL["epochs"]))
    assert h[-1]["loss"] < h[1]["loss"]  # h[0] is the warm-up epoch: no quantizer, a smaller loss
    assert set(h[0]) >= {"loss", "recon", "commit", "reseeded", "warmup"} and "repaired" in h[-1]
    assert [r["warmup"] for r in h[:2]] == [True, False] and h[0]["commit"] == 0.0 and h[0]["reseeded"] == 0
    mse = [r["mse"] for r in fitted["rqkmeans"].history]
    assert len(mse) == 3 and mse == sorted(mse, reverse=True)


@pytest.mark.parametrize("method", ["rqvae", "rqkmeans"])
def test_determinism_same_seed_same_codes(fitted, data, method):
    x, _ = data
    again = fit_quantizer(x, small_cfg(method))
    np.testing.assert_array_equal(encode_codes(again, x), encode_codes(fitted[method], x))
    before = torch.random.get_rng_state()
    threads = torch.get_num_threads()
    fit_quantizer(x[:300], small_cfg(method, epochs=2, seed=1, num_threads=threads + 1))
    assert torch.equal(torch.random.get_rng_state(), before)  # global RNG untouched
    assert torch.get_num_threads() == threads  # and the thread count restored


@pytest.mark.parametrize("method", ["rqvae", "rqkmeans"])
def test_save_load_round_trip(fitted, data, method, tmp_path):
    x, _ = data
    q = fitted[method]
    codes = encode_codes(q, x)
    weights = save_quantizer(q, tmp_path / "q")
    assert weights == tmp_path / "q" / WEIGHTS_FILE and (tmp_path / "q" / CONFIG_FILE).exists()
    for path in (tmp_path / "q", weights, tmp_path / "q" / CONFIG_FILE):
        loaded = load_quantizer(path)
        assert type(loaded) is type(q) and loaded.config == q.config and not loaded.training
        np.testing.assert_array_equal(encode_codes(loaded, x), codes)
    with safe_open(str(weights), framework="pt") as f:  # plain safetensors, readable without sidrec
        assert len(list(f.keys())) > 0
    meta = json.loads((tmp_path / "q" / CONFIG_FILE).read_text())
    assert meta["method"] == method and meta["input_dim"] == DIM
    files = quantizer_to_bytes(q)
    assert set(files) == {WEIGHTS_FILE, CONFIG_FILE}
    from_bytes = quantizer_from_bytes(files)
    np.testing.assert_array_equal(encode_codes(from_bytes, x), codes)
    assert from_bytes.history == q.history
    assert reconstruction_error(from_bytes, x) == pytest.approx(reconstruction_error(q, x), rel=1e-6)
    # a single-file path gets its sibling
    save_quantizer(q, tmp_path / "other" / "model.safetensors")
    assert (tmp_path / "other" / "model.json").exists()
    np.testing.assert_array_equal(encode_codes(load_quantizer(tmp_path / "other" / "model.json"), x), codes)


def test_from_bytes_rejects_foreign_files(fitted):
    files = quantizer_to_bytes(fitted["rqkmeans"])
    with pytest.raises(ValueError, match="missing"):
        quantizer_from_bytes({WEIGHTS_FILE: files[WEIGHTS_FILE]})
    with pytest.raises(ValueError, match="not a sidrec.quantizer"):
        quantizer_from_bytes({**files, CONFIG_FILE: b'{"format": "other"}'})


def test_reconstruction_error_drops_with_training(fitted, data):
    x, _ = data
    untrained = build_quantizer(DIM, small_cfg("rqvae"))
    trained_err, untrained_err = reconstruction_error(fitted["rqvae"], x), reconstruction_error(untrained, x)
    assert trained_err < 0.1 * untrained_err
    # unit vectors in 64-d: predicting zero scores 1/64; a trained model must beat that clearly
    assert trained_err < 0.2 / DIM


def test_reconstruction_error_matches_reference_formula(data):
    x, _ = data
    q = fit_quantizer(x, small_cfg("rqkmeans", levels=1))
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    codes = encode_codes(q, x)
    ref = ((xn - q.codebooks[0].numpy()[codes[:, 0]]) ** 2).mean()
    assert reconstruction_error(q, x) == pytest.approx(ref, rel=1e-5)
    assert reconstruction_error(q, x) == pytest.approx(q.history[-1]["mse"], rel=1e-4)
    # as many codes as points: every point is its own centroid -> exact reconstruction
    few = x[:50]
    exact = fit_quantizer(few, small_cfg("rqkmeans", levels=1, codebook_size=50))
    assert reconstruction_error(exact, few) < 1e-12


def test_progress_callback_and_normalization(data):
    x, _ = data
    seen = []
    q = fit_quantizer(x[:400], small_cfg("rqvae", epochs=3), progress=lambda s, r: seen.append((s, r)))
    assert [s for s, _ in seen] == [0, 1, 2] and [r for _, r in seen] == q.history
    # normalize_input: scaling an item does not change its codes
    np.testing.assert_array_equal(encode_codes(q, x[:400]), encode_codes(q, 7.0 * x[:400]))
    # batched encoding gives the same codes as one batch
    np.testing.assert_array_equal(encode_codes(q, x, batch_size=37), encode_codes(q, x))


# ---------------------------------------------------------------------------------------------- schedule


def test_early_stopping_on_loss_plateau(data):
    x, _ = data
    # min_delta 0.9: no epoch after the first quantised one counts as progress -> stop `patience` epochs later
    q = fit_quantizer(x[:600], small_cfg("rqvae", epochs=30, warmup_epochs=2, patience=2, min_delta=0.9))
    assert [r["epoch"] for r in q.history] == [0, 1, 2, 3, 4]
    assert "repaired" in q.history[-1] and q.history[-1]["reseeded"] == 0  # no reseed after the last epoch
    full = fit_quantizer(x[:600], small_cfg("rqvae", epochs=6, warmup_epochs=2, patience=0, min_delta=0.9))
    assert len(full.history) == 6


def test_min_steps_adds_epochs_for_small_catalogs(data):
    x, _ = data
    # 600 items in batches of 256: 3 steps a pass; 2 epochs make 6 < 10 steps -> 4 epochs (12 steps)
    q = fit_quantizer(x[:600], small_cfg("rqvae", epochs=2, min_steps=10))
    assert len(q.history) == 4
    assert len(fit_quantizer(x[:600], small_cfg("rqvae", epochs=5, min_steps=10)).history) == 5


def test_old_schedule_is_reproducible(data):
    """warmup 0, init on one batch, no repair, no early stopping: the pre-issue-10 loop, step for step."""
    x, _ = data
    cfg = small_cfg("rqvae", epochs=4, warmup_epochs=0, init_samples=SMALL["batch_size"],
                    repair_dead_codes=False, patience=0, min_steps=0)
    ref = build_quantizer(DIM, cfg)
    xt = ref.prepare(torch.from_numpy(x))
    gen = torch.Generator().manual_seed(cfg.seed)
    ref.train()
    first = torch.randperm(len(xt), generator=gen)[: cfg.batch_size]
    with torch.no_grad():
        ref.quantizer.init_codebooks(ref.encoder(xt[first]), cfg.kmeans_iters, gen)
    opt = torch.optim.Adam(ref.parameters(), lr=cfg.lr)
    for epoch in range(cfg.epochs):
        perm = torch.randperm(len(xt), generator=gen)
        for start in range(0, len(xt), cfg.batch_size):
            loss = ref(xt[perm[start:start + cfg.batch_size]])[2]["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if epoch < cfg.epochs - 1:
            ref.quantizer.reseed_dead_codes(gen)
    np.testing.assert_array_equal(encode_codes(fit_quantizer(x, cfg), x), encode_codes(ref, x))


def test_default_fit_uses_its_threads_and_every_code(data):
    x, _ = data
    seen = []
    q = fit_quantizer(x, QuantizerConfig(codebook_size=16), progress=lambda s, r: seen.append(torch.get_num_threads()))
    assert set(seen) == {QuantizerConfig().num_threads}
    codes = encode_codes(q, x)
    assert all(len(np.unique(codes[:, lvl])) == 16 for lvl in range(3))  # repair: no unused code is left


# ---------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "field,value",
    [("method", "pq"), ("levels", 0), ("codebook_size", 1), ("latent_dim", 0), ("hidden_dims", (64, 0)),
     ("epochs", 0), ("batch_size", 0), ("lr", 0.0), ("lr", float("nan")), ("commitment_weight", -1.0),
     ("kmeans_iters", 0), ("dead_code_reseed", "yes"), ("normalize_input", 1), ("seed", -1),
     ("levels", 2.5), ("levels", True), ("warmup_epochs", -1), ("warmup_epochs", 200), ("init_samples", 0),
     ("patience", -1), ("min_delta", -0.1), ("repair_dead_codes", "no"), ("num_threads", -1),
     ("min_steps", -1)],
)
def test_config_validation_names_field(field, value):
    with pytest.raises(ConfigError, match=rf"^quantize\.{field} must be"):
        dataclasses.replace(QuantizerConfig(), **{field: value})


def test_config_defaults_and_from_dict():
    cfg = section_from_dict(QuantizerConfig, {"levels": 4, "hidden_dims": [32, 16]})
    assert cfg.levels == 4 and cfg.hidden_dims == (32, 16)
    with pytest.raises(ConfigError, match=r"unknown option 'quantize\.levls'"):
        section_from_dict(QuantizerConfig, {"levls": 4})
    assert section_from_dict(QuantizerConfig, dataclasses.asdict(cfg)) == cfg


def test_fit_rejects_bad_embeddings():
    with pytest.raises(ValueError, match="2-D"):
        fit_quantizer(np.zeros(8, np.float32), QuantizerConfig())
    bad = np.ones((4, 8), np.float32)
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        fit_quantizer(bad, QuantizerConfig())
    with pytest.raises(ValueError, match="empty"):
        fit_quantizer(np.zeros((0, 8), np.float32), QuantizerConfig())
