"""From-scratch training of the testbed's customization model, :class:`~benchmarks.testbed.model.TinyLDM`.

Data: :func:`~benchmarks.testbed.data.training_crops`, 64-px RGB crops of
the training photos (the held-out subjects are never seen). Training is two
stages, as for Stable Diffusion: the VAE (MSE + a little L1 + a small KL
term + a round-trip term; the latent is then scaled to unit variance), then
the UNet on frozen latents (ε-prediction, SD scaled-linear schedule, uniform
timesteps, EMA) under "a photo of <source>" tokens, so that LoRA can later
teach it a new rare token. Weights are cached as safetensors keyed by the
training config, so a second run loads them in a second.

Run ``python -m benchmarks.testbed.train`` to (re)train and print timings.
"""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.nn import functional as F

from antipure_core.diffusion import q_sample, randn_like, sample_timesteps

from .data import SUBJECTS, TRAIN_SOURCES, subject_views, training_crops
from .model import CLASS_TOKENS, NUM_CLASS_TOKENS, TinyLDM
from .weights import load_cached, save_cached, weights_path

#: trained weights a reader reproduces the tables with (committed, < 20 MB together)
MODELS_DIR = Path(__file__).resolve().parent / "models"
CACHE_DIR = Path(__file__).resolve().parent / "cache"


@dataclass(frozen=True)
class TrainConfig:
    size: int = 64
    #: crops drawn once for both stages
    crops: int = 4096
    vae_steps: int = 2000
    vae_batch: int = 16
    #: random crop side for VAE training (the VAE has no normalisation layers, so crops are valid inputs)
    vae_crop: int = 32
    vae_lr: float = 1e-3
    kl_weight: float = 1e-4
    #: weight of the round-trip term |D(E(sg(D(E(x))))) - x|², which keeps repeated purification from drifting
    vae_roundtrip: float = 1.0
    unet_steps: int = 3000
    unet_batch: int = 64
    unet_lr: float = 1e-3
    ema: float = 0.999
    p_drop_identity: float = 0.3
    p_drop_all: float = 0.1
    vae_ch: int = 16
    vae_levels: int = 3
    latent_channels: int = 8
    unet_ch: int = 32
    token_dim: int = 32
    seed: int = 0


def load_training_set(cfg: "TrainConfig") -> tuple[torch.Tensor, torch.Tensor]:
    """Training crops ``(N, 3, size, size)`` and their source indices ``(N,)`` (the identity tokens)."""
    return training_crops(cfg.crops, cfg.size, generator=torch.Generator().manual_seed(cfg.seed + 11))


def heldout_vae_psnr(model: TinyLDM, scale: float = 1.0) -> float:
    """PSNR (dB) of the VAE round trip on the held-out subjects' 8 views each (never seen in training)."""
    x = torch.cat([subject_views(name, n=8, scale=scale) for name in SUBJECTS])
    with torch.no_grad():
        recon = model.decode(model.encode(x)).clamp(0, 1)
    return round(float(-10 * torch.log10(F.mse_loss(recon, x))), 2)


def _log(msg: str, verbose: bool) -> None:
    if verbose:
        print(msg, flush=True)


def train_vae(model: TinyLDM, x: torch.Tensor, cfg: TrainConfig, verbose: bool = True) -> dict:
    """Train ``model.vae`` on images ``x`` (with flips); then set ``scale_factor`` to 1 / std of the latent means."""
    g = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.Adam(model.vae.parameters(), lr=cfg.vae_lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.vae_lr, total_steps=cfg.vae_steps, pct_start=0.05)
    model.vae.train()
    for i in range(cfg.vae_steps):
        idx = torch.randint(0, x.shape[0], (cfg.vae_batch,), generator=g)
        c = min(cfg.vae_crop, x.shape[-1])
        oy, ox = torch.randint(0, x.shape[-1] - c + 1, (2,), generator=g).tolist()
        xb = x[idx, :, oy:oy + c, ox:ox + c] * 2 - 1
        flip = torch.rand(cfg.vae_batch, generator=g) < 0.5
        xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
        mean, logvar = model.vae.moments(xb)
        z = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=g)
        out = model.vae.reconstruct(z)
        rec = F.mse_loss(out, xb) + 0.1 * F.l1_loss(out, xb)  # a little L1 for sharper edges
        kl = 0.5 * (mean.square() + logvar.exp() - 1 - logvar).mean()
        loss = rec + cfg.kl_weight * kl
        if cfg.vae_roundtrip:
            again = model.vae.reconstruct(model.vae.moments(out.detach().clamp(-1, 1))[0])
            loss = loss + cfg.vae_roundtrip * F.mse_loss(again, xb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.vae.parameters(), 1.0)  # no norm layers: keep early steps stable
        opt.step()
        sched.step()
        if i % 250 == 0 or i == cfg.vae_steps - 1:
            _log(f"  vae step {i:5d}  mse {rec.item():.5f}  kl {kl.item():.3f}", verbose)
    model.vae.eval()
    with torch.no_grad():
        mean = torch.cat([model.vae.moments(x[k:k + 64] * 2 - 1)[0] for k in range(0, x.shape[0], 64)])
        model.scale_factor.fill_(1.0 / float(mean.std()))
        recon = model.decode(model.encode(x)).clamp(0, 1)
        psnr = float(-10 * torch.log10(F.mse_loss(recon, x)))
    return {"vae_psnr_db": round(psnr, 2), "scale_factor": round(float(model.scale_factor), 4)}


def train_unet(model: TinyLDM, x: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig,
               verbose: bool = True) -> dict:
    """Train ``model.unet`` and the token table on frozen latents of ``x`` (and their flips); EMA weights kept.

    ``labels`` ``(N,)``: each image's source index, its identity token.
    """
    g = torch.Generator().manual_seed(cfg.seed + 1)
    with torch.no_grad():
        z = torch.cat([model.encode(torch.cat([x, x.flip(-1)])[k:k + 64]) for k in range(0, 2 * x.shape[0], 64)])
    cls = torch.full((2 * x.shape[0],), CLASS_TOKENS["photo"])
    ident = torch.cat([labels, labels]) + NUM_CLASS_TOKENS
    params = list(model.unet.parameters()) + list(model.embed.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=0.0)
    warm = 200
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(i, cfg.unet_steps) / cfg.unet_steps)))
    ema = [p.detach().clone() for p in params]
    model.unet.train()
    running = None
    for i in range(cfg.unet_steps):
        idx = torch.randint(0, z.shape[0], (cfg.unet_batch,), generator=g)
        ids = torch.stack([cls[idx], ident[idx]], 1)
        u = torch.rand(cfg.unet_batch, 2, generator=g)
        ids[:, 1] = torch.where(u[:, 0] < cfg.p_drop_identity, CLASS_TOKENS["null"], ids[:, 1])
        ids = torch.where((u[:, 1] < cfg.p_drop_all)[:, None], CLASS_TOKENS["null"], ids)
        tokens = model.embed(ids)
        t = sample_timesteps(cfg.unet_batch, 0, model.num_timesteps - 1, g)
        noise = randn_like(z[idx], g)
        eps = model.unet(q_sample(model, z[idx], t, noise), t, tokens)
        loss = F.mse_loss(eps, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.lerp_(p, 1 - cfg.ema)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if i % 500 == 0 or i == cfg.unet_steps - 1:
            _log(f"  unet step {i:5d}  loss(ema) {running:.4f}", verbose)
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)
    model.unet.eval()
    return {"unet_loss": round(running, 4)}


def build_model(cfg: TrainConfig, cache_dir: Path | str | None = MODELS_DIR, verbose: bool = True,
                force: bool = False) -> tuple[TinyLDM, dict]:
    """The trained testbed model (frozen, eval mode) and its training info; trains and caches on first use."""
    torch.manual_seed(cfg.seed)
    model = TinyLDM(num_identities=len(TRAIN_SOURCES), token_dim=cfg.token_dim, vae_ch=cfg.vae_ch,
                    unet_ch=cfg.unet_ch, vae_levels=cfg.vae_levels, latent_channels=cfg.latent_channels)
    path = weights_path(cache_dir, f"tinyldm-{cfg.size}px", cfg)
    info = None if force else load_cached(model, path)
    if info is not None:
        _log(f"loaded cached model {path.name}", verbose)
        return model.eval().requires_grad_(False), info
    x, labels = load_training_set(cfg)
    _log(f"training TinyLDM from scratch on {x.shape[0]} images at {cfg.size}px "
         f"({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters)", verbose)
    t0 = time.perf_counter()
    info = train_vae(model, x, cfg, verbose)
    info["vae_seconds"] = round(time.perf_counter() - t0, 1)
    info["vae_heldout_db"] = heldout_vae_psnr(model)
    _log(f"  vae: {info}", verbose)
    t1 = time.perf_counter()
    info.update(train_unet(model, x, labels, cfg, verbose))
    info["unet_seconds"] = round(time.perf_counter() - t1, 1)
    info["config"] = asdict(cfg)
    _log(f"trained: {info}", verbose)
    save_cached(model, info, path)
    info["cached"] = False
    return model.eval().requires_grad_(False), info


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=TrainConfig.size)
    ap.add_argument("--vae-steps", type=int, default=TrainConfig.vae_steps)
    ap.add_argument("--unet-steps", type=int, default=TrainConfig.unet_steps)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--force", action="store_true", help="retrain even if cached")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    build_model(TrainConfig(size=a.size, vae_steps=a.vae_steps, unet_steps=a.unet_steps), force=a.force)


if __name__ == "__main__":
    main()
