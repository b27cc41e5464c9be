"""Semantic-ID quantizers: item text embeddings [N, D] -> code tuples [N, L], each code in [0, K).

Two methods, one API:

- ``RQVAE`` (TIGER, Rajput et al. 2023): MLP encoder -> residual quantizer with L codebooks -> MLP
  decoder, trained to reconstruct the (L2-normalised) embedding. The codes are the nearest codebook
  entries, level by level, of the encoder's latent and its residuals. Training: a few plain-autoencoder
  warm-up epochs, codebooks seeded by k-means of the settled latents, joint training with dead-code
  reseeding until the epoch loss plateaus (or ``epochs``), then unused codes are moved onto residuals.
- ``RQKMeans``: the same residual scheme without a network: k-means on the embeddings, then k-means
  on what is left, L times. No gradient training, strong baseline, very fast to fit.

Everything that leaves this module is plain data: ``encode_codes`` returns an int64 numpy array, and a
fitted quantizer is two files (``quantizer.safetensors`` weights + ``quantizer.json`` config), no pickle,
so it can be written to any pyarrow filesystem or shipped through Ray's object store as bytes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from sidrec.config import QuantizerConfig, section_from_dict

WEIGHTS_FILE = "quantizer.safetensors"
CONFIG_FILE = "quantizer.json"
FORMAT_NAME = "sidrec.quantizer"
FORMAT_VERSION = 1


# ----------------------------------------------------------------------------------------------------
# k-means


def _chunk_rows(k: int) -> int:
    """Rows per chunk so a [rows, k] float32 distance block stays around 64 MB."""
    return max(1, (1 << 24) // max(k, 1))


@torch.no_grad()
def nearest_code(x: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest codebook row for each x row (ties -> lowest index).

    x [N, d], codebook [K, d] -> (codes [N] int64, squared distances [N]).
    """
    cb_sq = codebook.pow(2).sum(-1)
    codes, dists = [], []
    for xc in x.split(_chunk_rows(codebook.shape[0])):
        # ||x-c||^2 = ||x||^2 - 2 x.c + ||c||^2; argmin does not need ||x||^2.
        part = torch.addmm(cb_sq, xc, codebook.t(), alpha=-2.0)
        d, i = part.min(dim=1)
        codes.append(i)
        dists.append((d + xc.pow(2).sum(-1)).clamp_min_(0.0))
    if not codes:
        return x.new_zeros(0, dtype=torch.long), x.new_zeros(0)
    return torch.cat(codes), torch.cat(dists)


@torch.no_grad()
def kmeans(x: torch.Tensor, k: int, iters: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Lloyd's k-means with k-means++ init. x [N, d] -> centroids [k, d] (same device and dtype as x).

    N < k is handled by repeating points, so some centroids coincide (a later reseed can move them).
    Empty clusters are moved onto the points farthest from their centroid, which needs no randomness:
    the result is a function of (x, k, iters, generator state). The generator must be a CPU generator.
    """
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"kmeans needs a non-empty [N, d] tensor, got shape {tuple(x.shape)}")
    n = x.shape[0]
    if n < k:
        x = x[torch.arange(k, device=x.device) % n]
        n = k
    # greedy k-means++ (as scikit-learn): draw a few candidates with probability proportional to their
    # squared distance to the nearest chosen centroid and keep the one that lowers the total the most,
    # so well-separated clusters all get a seed.
    trials = 2 + int(math.log(k))
    first = int(torch.randint(n, (1,), generator=generator))
    centroids = x.new_empty(k, x.shape[1])
    centroids[0] = x[first]
    x_sq = x.pow(2).sum(-1)
    d2 = (x - x[first]).pow(2).sum(-1)
    for j in range(1, k):
        cum = d2.double().cumsum(0)
        total = float(cum[-1])
        u = torch.rand(trials, generator=generator, dtype=torch.float64).to(x.device)
        if total > 0:
            cand = torch.searchsorted(cum, u * total).clamp_max_(n - 1)
        else:
            cand = (u * n).long().clamp_max_(n - 1)
        c = x[cand]
        cand_d2 = torch.addmm(x_sq[None], c, x.t(), alpha=-2.0).add_(x_sq[cand][:, None]).clamp_min_(0)
        new_d2 = torch.minimum(d2[None], cand_d2)
        best = int(new_d2.sum(1).argmin())
        centroids[j] = x[cand[best]]
        d2 = new_d2[best]
    prev = None
    for _ in range(iters):
        assign, dist = nearest_code(x, centroids)
        if prev is not None and torch.equal(assign, prev):
            break
        prev = assign
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        if x.device.type == "cpu":
            sums = x.new_zeros(k, x.shape[1]).index_add_(0, assign, x)
        else:  # one-hot matmul: deterministic on GPU, unlike atomic index_add_
            sums = x.new_zeros(k, x.shape[1])
            for xc, ac in zip(x.split(_chunk_rows(k)), assign.split(_chunk_rows(k)), strict=True):
                sums += F.one_hot(ac, k).to(x.dtype).t() @ xc
        empty = counts == 0
        centroids = torch.where(empty[:, None], centroids, sums / counts.clamp_min(1)[:, None])
        n_empty = int(empty.sum())
        if n_empty:
            far = dist.topk(min(n_empty, n)).indices
            centroids[empty.nonzero().squeeze(1)] = x[far[torch.arange(n_empty, device=x.device) % len(far)]]
    return centroids


# ----------------------------------------------------------------------------------------------------
# RQ-VAE


class ResidualQuantizer(nn.Module):
    """L codebooks [K, d]; level l quantises what levels < l left over.

    Trained with the VQ-VAE losses (no EMA): codebook loss ||sg[r]-e||^2 moves codes to residuals,
    commitment loss beta*||r-sg[e]||^2 keeps the encoder near its codes. Residuals are passed on with
    sg[e] so each codebook gets gradient only from its own level. Codebooks start as k-means of the
    first training batch (residual by residual): random init leaves most codes dead.
    """

    def __init__(self, levels: int, codebook_size: int, dim: int, commitment_weight: float = 0.25,
                 seed: int = 0):
        super().__init__()
        self.levels, self.codebook_size, self.dim = levels, codebook_size, dim
        self.commitment_weight = commitment_weight
        self.seed = seed
        self.codebooks = nn.Parameter(torch.zeros(levels, codebook_size, dim))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        # code hits since the last reseed; training-only bookkeeping, not saved.
        self.register_buffer("usage", torch.zeros(levels, codebook_size, dtype=torch.long), persistent=False)
        self._last_residuals: list[torch.Tensor] = []

    @torch.no_grad()
    def init_codebooks(self, z: torch.Tensor, kmeans_iters: int, generator: torch.Generator | None = None):
        """k-means on z [B, d], then on its residuals, level by level."""
        residual = z.detach()
        for lvl in range(self.levels):
            self.codebooks.data[lvl] = kmeans(residual, self.codebook_size, kmeans_iters, generator)
            codes, _ = nearest_code(residual, self.codebooks.data[lvl])
            residual = residual - self.codebooks.data[lvl][codes]
        self.initialized.fill_(True)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z [B, d] -> (z_q [B, d] straight-through, codes [B, L] int64, commit_loss scalar).

        commit_loss = sum over levels of mean_b(||sg[r]-e||^2 + beta*||r-sg[e]||^2) (squared norms
        summed over d, averaged over the batch); it includes the codebook term.
        """
        if self.training and not bool(self.initialized):
            self.init_codebooks(z, kmeans_iters=50, generator=torch.Generator().manual_seed(self.seed))
        residual = z
        z_q = torch.zeros_like(z)
        loss = z.new_zeros(())
        codes = []
        if self.training:
            self._last_residuals = []
        for lvl in range(self.levels):
            cb = self.codebooks[lvl]
            idx, _ = nearest_code(residual.detach(), cb.detach())
            e = F.embedding(idx, cb)
            loss = loss + (residual.detach() - e).pow(2).sum(-1).mean()
            loss = loss + self.commitment_weight * (residual - e.detach()).pow(2).sum(-1).mean()
            if self.training:
                self._last_residuals.append(residual.detach())
                self.usage[lvl] += torch.bincount(idx, minlength=self.codebook_size)
            z_q = z_q + e
            residual = residual - e.detach()
            codes.append(idx)
        z_q = z + (z_q - z).detach()  # straight-through: decoder gradient flows to the encoder
        return z_q, torch.stack(codes, dim=1), loss

    @torch.no_grad()
    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, d] -> codes [B, L] int64 (no bookkeeping, no loss)."""
        residual = z
        codes = []
        for lvl in range(self.levels):
            idx, _ = nearest_code(residual, self.codebooks[lvl])
            residual = residual - self.codebooks[lvl][idx]
            codes.append(idx)
        return torch.stack(codes, dim=1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, L] -> z_q [B, d] = sum of the chosen codebook rows."""
        return sum(self.codebooks[lvl][codes[:, lvl]] for lvl in range(self.levels))

    @torch.no_grad()
    def reseed_dead_codes(self, generator: torch.Generator | None = None) -> int:
        """Move codes with zero hits since the last call onto residuals of the last training batch, drawn
        with probability proportional to their squared distance to their current code (k-means++ style):
        a dead code then lands where two groups share one code, not just in the densest region.

        Returns how many codes moved; resets the hit counters.
        """
        moved = 0
        for lvl, res in enumerate(self._last_residuals):
            dead = (self.usage[lvl] == 0).nonzero().squeeze(1)
            if len(dead) == 0 or len(res) == 0:
                continue
            _, d2 = nearest_code(res, self.codebooks.data[lvl])
            w = d2.double().cpu()
            w = w if float(w.sum()) > 0 else torch.ones_like(w)
            rows = torch.multinomial(w, len(dead), replacement=len(dead) > int((w > 0).sum()),
                                     generator=generator).to(res.device)
            self.codebooks.data[lvl, dead] = res[rows]
            moved += len(dead)
        self.usage.zero_()
        return moved

    @torch.no_grad()
    def repair_dead_codes(self, z: torch.Tensor, rounds: int = 3) -> int:
        """After training: move codes that no row of z [N, d] (all items' latents) uses onto the level's
        residuals farthest from their code, level by level, so that every code names some item where the
        catalog allows it. No randomness: the farthest residuals are taken in a stable order.

        Returns how many codes moved.
        """
        moved, residual = 0, z.detach()
        for lvl in range(self.levels):
            cb = self.codebooks.data[lvl]
            idx, d2 = nearest_code(residual, cb)
            for _ in range(rounds):  # a moved code can take the last item of another one
                dead = (torch.bincount(idx, minlength=self.codebook_size) == 0).nonzero().squeeze(1)
                far = torch.sort(d2, descending=True, stable=True).indices[: len(dead)]
                far = far[d2[far] > 0]
                if len(far) == 0:
                    break
                cb[dead[: len(far)]] = residual[far]
                moved += len(far)
                idx, d2 = nearest_code(residual, cb)
            residual = residual - cb[idx]
        return moved


def _mlp(dims: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class RQVAE(nn.Module):
    """MLP encoder (D -> hidden_dims -> latent_dim) -> ResidualQuantizer -> mirrored MLP decoder."""

    def __init__(self, input_dim: int, config: QuantizerConfig):
        super().__init__()
        self.input_dim, self.config = input_dim, config
        hidden = list(config.hidden_dims)
        self.encoder = _mlp([input_dim, *hidden, config.latent_dim])
        self.quantizer = ResidualQuantizer(config.levels, config.codebook_size, config.latent_dim,
                                           config.commitment_weight, config.seed)
        self.decoder = _mlp([config.latent_dim, *reversed(hidden), input_dim])
        self.history: list[dict] = []

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1) if self.config.normalize_input else x

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """x [B, D] -> (x_hat [B, D], codes [B, L], {"loss", "recon", "commit"} scalars).

        recon = mean_b ||x_hat - x||^2 on the (normalised) input; loss = recon + commit.
        """
        x = self.prepare(x)
        z_q, codes, commit = self.quantizer(self.encoder(x))
        x_hat = self.decoder(z_q)
        recon = (x_hat - x).pow(2).sum(-1).mean()
        return x_hat, codes, {"loss": recon + commit, "recon": recon, "commit": commit}

    def autoencoder_losses(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Warm-up losses, quantizer bypassed: recon = mean_b ||decoder(encoder(x)) - x||^2, commit = 0."""
        x = self.prepare(x)
        recon = (self.decoder(self.encoder(x)) - x).pow(2).sum(-1).mean()
        return {"loss": recon, "recon": recon, "commit": recon.new_zeros(())}

    @torch.no_grad()
    def latents(self, x: torch.Tensor, batch_size: int = 8192) -> torch.Tensor:
        """x [N, D] -> encoder outputs [N, latent_dim], in batches."""
        return torch.cat([self.encoder(self.prepare(xb)) for xb in x.split(batch_size)])

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, D] -> codes [B, L] int64."""
        return self.quantizer.encode(self.encoder(self.prepare(x)))

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, L] -> reconstruction [B, D] (in normalised space if normalize_input)."""
        return self.decoder(self.quantizer.decode(codes))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, D] -> (prepared x [B, D], reconstruction through the codes [B, D])."""
        x = self.prepare(x)
        return x, self.decoder(self.quantizer.decode(self.quantizer.encode(self.encoder(x))))


# ----------------------------------------------------------------------------------------------------
# RQ-KMeans


class RQKMeans(nn.Module):
    """Residual k-means: level l is k-means on what levels < l left over. Codebooks [L, K, D] in input space.

    An nn.Module only for the buffer plumbing (.to(device), state_dict); it has no parameters.
    """

    def __init__(self, input_dim: int, config: QuantizerConfig):
        super().__init__()
        self.input_dim, self.config = input_dim, config
        self.register_buffer("codebooks", torch.zeros(config.levels, config.codebook_size, input_dim))
        self.history: list[dict] = []

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1) if self.config.normalize_input else x

    @torch.no_grad()
    def fit(self, x: torch.Tensor, progress: Callable[[int, dict], None] | None = None) -> RQKMeans:
        """x [N, D]: fit level by level; history gets the per-element MSE left after each level."""
        gen = torch.Generator().manual_seed(self.config.seed)
        residual = self.prepare(x.to(self.codebooks.device, torch.float32))
        self.history = []
        for lvl in range(self.config.levels):
            self.codebooks[lvl] = kmeans(residual, self.config.codebook_size, self.config.kmeans_iters, gen)
            codes, _ = nearest_code(residual, self.codebooks[lvl])
            residual = residual - self.codebooks[lvl][codes]
            rec = {"level": lvl, "mse": float(residual.pow(2).mean()),
                   "used": int(torch.unique(codes).numel())}
            self.history.append(rec)
            if progress is not None:
                progress(lvl, rec)
        return self

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, D] -> codes [B, L] int64."""
        residual = self.prepare(x)
        codes = []
        for lvl in range(self.config.levels):
            idx, _ = nearest_code(residual, self.codebooks[lvl])
            residual = residual - self.codebooks[lvl][idx]
            codes.append(idx)
        return torch.stack(codes, dim=1)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, L] -> reconstruction [B, D] = sum of the chosen centroids."""
        return sum(self.codebooks[lvl][codes[:, lvl]] for lvl in range(self.config.levels))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, D] -> (prepared x [B, D], reconstruction through the codes [B, D])."""
        x = self.prepare(x)
        return x, self.decode(self.encode(x))


Quantizer = RQVAE | RQKMeans


# ----------------------------------------------------------------------------------------------------
# fitting and encoding


def _as_tensor(embeddings: np.ndarray) -> torch.Tensor:
    arr = np.ascontiguousarray(embeddings, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D [N, D] array, got shape {arr.shape}")
    if not arr.flags.writeable:  # zero-copy views of Arrow buffers are read-only; torch wants its own memory
        arr = arr.copy()
    return torch.from_numpy(arr)


def build_quantizer(input_dim: int, cfg: QuantizerConfig) -> Quantizer:
    """An untrained quantizer of cfg.method (weights seeded by cfg.seed, global RNG untouched)."""
    if cfg.method == "rqkmeans":
        return RQKMeans(input_dim, cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return RQVAE(input_dim, cfg)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with n torch CPU (intra-op) threads, then restore the old count; n <= 0: unchanged."""
    old = torch.get_num_threads()
    if n <= 0 or n == old:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def fit_quantizer(embeddings: np.ndarray, cfg: QuantizerConfig,
                  progress: Callable[[int, dict], None] | None = None,
                  device: str | torch.device | None = None) -> Quantizer:
    """Fit cfg.method on embeddings [N, D]; returns the model in eval mode with ``history`` filled.

    progress(step, record) is called after every RQ-VAE epoch (record: epoch, loss, recon, commit,
    reseeded, warmup; the last one also repaired) or every RQ-KMeans level (record: level, mse, used).
    Runs on cfg.num_threads CPU threads. Deterministic given cfg.seed on a fixed device (and, with
    num_threads=0, a fixed torch thread count).
    """
    x = _as_tensor(embeddings)
    if x.shape[0] == 0:
        raise ValueError("embeddings is empty: nothing to quantize")
    if not torch.isfinite(x).all():
        raise ValueError("embeddings contain NaN or inf")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    with torch_threads(cfg.num_threads):
        model = build_quantizer(x.shape[1], cfg).to(dev)
        if isinstance(model, RQKMeans):
            return model.fit(x, progress).eval()
        _train_rqvae(model, model.prepare(x.to(dev)), cfg, progress)
    return model.eval()


def _train_rqvae(model: RQVAE, x: torch.Tensor, cfg: QuantizerConfig,
                 progress: Callable[[int, dict], None] | None) -> None:
    """Warm-up epochs (autoencoder only), codebook seeding, joint epochs until the loss plateaus; at least
    cfg.epochs of them (fewer on a plateau), more if that many passes make fewer than cfg.min_steps steps."""
    gen = torch.Generator().manual_seed(cfg.seed)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    best, stale = math.inf, 0
    epochs = max(cfg.epochs, math.ceil(cfg.min_steps / math.ceil(len(x) / cfg.batch_size)))
    for epoch in range(epochs):
        warm = epoch < cfg.warmup_epochs
        if epoch == cfg.warmup_epochs:  # codebooks start as residual k-means of a random subset's latents
            with torch.no_grad():
                first = torch.randperm(len(x), generator=gen)[: cfg.init_samples].to(x.device)
                model.quantizer.init_codebooks(model.encoder(x[first]), cfg.kmeans_iters, gen)
        loss, recon, commit = _rqvae_epoch(model, x, opt, cfg.batch_size, gen, warm)
        rec = {"epoch": epoch, "loss": loss, "recon": recon, "commit": commit, "reseeded": 0, "warmup": warm}
        if not warm:  # warm-up losses lack the quantizer: not comparable
            best, stale = (loss, 0) if loss < best * (1 - cfg.min_delta) else (best, stale + 1)
        last = epoch == epochs - 1 or (cfg.patience > 0 and stale >= cfg.patience)
        # a reseed after the last epoch would leave codes the decoder never trained on; the repair only
        # moves codes no item uses onto real residuals (items whose z_q then gets closer to z)
        if cfg.dead_code_reseed and not warm and not last:
            rec["reseeded"] = model.quantizer.reseed_dead_codes(gen)
        if last and cfg.repair_dead_codes:
            rec["repaired"] = model.quantizer.repair_dead_codes(model.latents(x))
        model.history.append(rec)
        if progress is not None:
            progress(epoch, rec)
        if last:
            break
    model.quantizer._last_residuals = []


def _rqvae_epoch(model: RQVAE, x: torch.Tensor, opt: torch.optim.Optimizer, batch_size: int,
                 gen: torch.Generator, warmup: bool) -> tuple[float, float, float]:
    """One shuffled pass; returns the item-weighted mean (loss, recon, commit)."""
    perm = torch.randperm(len(x), generator=gen).to(x.device)
    sums = torch.zeros(3, device=x.device)
    for start in range(0, len(x), batch_size):
        xb = x[perm[start:start + batch_size]]
        parts = model.autoencoder_losses(xb) if warmup else model(xb)[2]
        opt.zero_grad(set_to_none=True)
        parts["loss"].backward()
        opt.step()
        sums += torch.stack([parts["loss"], parts["recon"], parts["commit"]]).detach() * len(xb)
    loss, recon, commit = (sums / len(x)).tolist()
    return loss, recon, commit


def _device_of(q: Quantizer) -> torch.device:
    return q.codebooks.device if isinstance(q, RQKMeans) else q.quantizer.codebooks.device


def encode_codes(quantizer: Quantizer, embeddings: np.ndarray, batch_size: int = 8192) -> np.ndarray:
    """embeddings [N, D] -> codes [N, L] int64 numpy, in batches of batch_size rows."""
    x = _as_tensor(embeddings)
    dev = _device_of(quantizer)
    out = np.empty((x.shape[0], quantizer.config.levels), dtype=np.int64)
    was_training = quantizer.training
    quantizer.eval()
    with torch.inference_mode():
        for start in range(0, x.shape[0], batch_size):
            out[start:start + batch_size] = quantizer.encode(x[start:start + batch_size].to(dev)).cpu().numpy()
    quantizer.train(was_training)
    return out


def reconstruction_error(quantizer: Quantizer, embeddings: np.ndarray, batch_size: int = 8192) -> float:
    """Per-element MSE: mean over items and dims of (x - decode(encode(x)))^2, where x is the input after
    the quantizer's own preprocessing (L2-normalised if normalize_input). For unit vectors in D dims,
    0 is perfect and 1/D is what predicting the zero vector scores."""
    x = _as_tensor(embeddings)
    dev = _device_of(quantizer)
    total, count = 0.0, 0
    was_training = quantizer.training
    quantizer.eval()
    with torch.inference_mode():
        for xb in x.split(batch_size):
            xp, x_hat = quantizer.reconstruct(xb.to(dev))
            total += float((xp - x_hat).double().pow(2).sum())
            count += xp.numel()
    quantizer.train(was_training)
    return total / max(count, 1)


# ----------------------------------------------------------------------------------------------------
# persistence: safetensors weights + JSON config, no pickle


def quantizer_to_bytes(q: Quantizer) -> dict[str, bytes]:
    """{"quantizer.safetensors": ..., "quantizer.json": ...}: write them anywhere (local, S3, object store)."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in q.state_dict().items()}
    meta = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "method": q.config.method,
        "input_dim": q.input_dim,
        "config": asdict(q.config),
        "history": q.history,
    }
    return {
        WEIGHTS_FILE: st_save(state, metadata={"format": "pt"}),
        CONFIG_FILE: json.dumps(meta, indent=2).encode(),
    }


def quantizer_from_bytes(files: dict[str, bytes]) -> Quantizer:
    """Inverse of quantizer_to_bytes; returns the model on CPU in eval mode."""
    missing = [f for f in (WEIGHTS_FILE, CONFIG_FILE) if f not in files]
    if missing:
        raise ValueError(f"quantizer files missing: {missing} (got {sorted(files)})")
    meta = json.loads(files[CONFIG_FILE])
    if meta.get("format") != FORMAT_NAME or meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"{CONFIG_FILE} is not a {FORMAT_NAME} v{FORMAT_VERSION} file: "
                         f"format={meta.get('format')!r} version={meta.get('version')!r}")
    cfg = section_from_dict(QuantizerConfig, meta["config"])
    q = build_quantizer(int(meta["input_dim"]), cfg)
    q.load_state_dict(st_load(files[WEIGHTS_FILE]), strict=True)
    q.history = list(meta.get("history", []))
    return q.eval()


def _paths(path: str | Path) -> tuple[Path, Path]:
    """A directory -> dir/quantizer.{safetensors,json}; a *.safetensors or *.json file -> it and its sibling."""
    p = Path(path)
    if p.suffix in (".safetensors", ".json"):
        return p.with_suffix(".safetensors"), p.with_suffix(".json")
    return p / WEIGHTS_FILE, p / CONFIG_FILE


def save_quantizer(q: Quantizer, path: str | Path) -> Path:
    """Write weights + config to a local directory (or next to a given .safetensors path); returns weights path."""
    weights, config = _paths(path)
    weights.parent.mkdir(parents=True, exist_ok=True)
    files = quantizer_to_bytes(q)
    weights.write_bytes(files[WEIGHTS_FILE])
    config.write_bytes(files[CONFIG_FILE])
    return weights


def load_quantizer(path: str | Path) -> Quantizer:
    """Load what save_quantizer wrote: a directory, or the .safetensors / .json file of the pair."""
    weights, config = _paths(path)
    return quantizer_from_bytes({WEIGHTS_FILE: weights.read_bytes(), CONFIG_FILE: config.read_bytes()})
