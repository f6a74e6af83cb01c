"""A tiny latent diffusion model implementing ``antipure_core.model.DiffusionModel``.

Conv VAE (down-sampling 4, 4 latent channels) and a small conditional conv
noise predictor with one down/up level, timestep embedding and a linear
conditioning projection. Random weights; fast enough for many PGD steps on
the CPU at 32-64 px.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from antipure_core.model import ScheduledModule


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=1)


class ToyVAE(nn.Module):
    def __init__(self, ch: int = 16, z_ch: int = 4):
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(3, ch, 3, 1, 1), nn.SiLU(), nn.Conv2d(ch, ch, 4, 2, 1), nn.SiLU(),
                                 nn.Conv2d(ch, ch, 4, 2, 1), nn.SiLU(), nn.Conv2d(ch, z_ch, 3, 1, 1))
        self.dec = nn.Sequential(nn.Conv2d(z_ch, ch, 3, 1, 1), nn.SiLU(), nn.ConvTranspose2d(ch, ch, 4, 2, 1), nn.SiLU(),
                                 nn.ConvTranspose2d(ch, ch, 4, 2, 1), nn.SiLU(), nn.Conv2d(ch, 3, 3, 1, 1))


class ToyUNet(nn.Module):
    def __init__(self, z_ch: int = 4, ch: int = 32, cond_dim: int = 16):
        super().__init__()
        self.ch = ch
        self.time = nn.Sequential(nn.Linear(ch, ch), nn.SiLU(), nn.Linear(ch, ch))
        self.cond = nn.Linear(cond_dim, ch)
        self.inp = nn.Conv2d(z_ch, ch, 3, 1, 1)
        self.down = nn.Conv2d(ch, ch, 3, 2, 1)
        self.mid = nn.Conv2d(ch, ch, 3, 1, 1)
        self.up = nn.ConvTranspose2d(ch, ch, 4, 2, 1)
        self.out = nn.Conv2d(2 * ch, z_ch, 3, 1, 1)

    def forward(self, z, t, cond, features: list | None = None):
        emb = self.time(timestep_embedding(t, self.ch)) + self.cond(cond).expand(z.shape[0], -1)
        h0 = F.silu(self.inp(z) + emb[:, :, None, None])
        h = F.silu(self.down(h0))
        h = F.silu(self.mid(h) + emb[:, :, None, None])
        h = self.up(h)[..., : h0.shape[-2], : h0.shape[-1]]
        if features is not None:  # the "last up-block" output, for predict_noise_features
            features.append(h)
        return self.out(torch.cat([F.silu(h), h0], 1))


class ToyLDM(ScheduledModule):
    """Tiny model with the core's interface. ``cond`` is a ``(1 or B, cond_dim)`` tensor."""

    downsample = 4

    def __init__(self, cond_dim: int = 16, num_timesteps: int = 1000):
        super().__init__(num_timesteps)
        self.vae = ToyVAE()
        self.unet = ToyUNet(cond_dim=cond_dim)

    def encode(self, x):
        return self.vae.enc(x * 2 - 1)

    def decode(self, z):
        return (self.vae.dec(z) + 1) / 2

    def predict_noise(self, z_t, t, cond):
        return self.unet(z_t, t.to(z_t.device), cond)

    def predict_noise_features(self, z_t, t, cond):
        features = []
        return self.unet(z_t, t.to(z_t.device), cond, features), features


def make_toy(seed: int = 0, cond_dim: int = 16) -> tuple[ToyLDM, torch.Tensor]:
    """A seeded toy model in eval mode with frozen weights, and a conditioning vector."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = ToyLDM(cond_dim=cond_dim)
    # variance-preserving init: with PyTorch's default init, activations shrink
    # layer by layer and the random model would barely depend on its input
    for mod in model.modules():
        if isinstance(mod, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.kaiming_normal_(mod.weight, generator=g)
            nn.init.zeros_(mod.bias)
    model = model.eval().requires_grad_(False)
    cond = torch.randn(1, cond_dim, generator=g)
    return model, cond


def smooth_image(b: int = 1, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    """A smooth colourful test image ``(B, 3, H, W)`` in [0.1, 0.9], on the 8-bit grid."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    phase = torch.rand(b, 3, 1, 1, generator=g) * 6.28
    img = 0.5 + 0.4 * torch.sin(3 * xx + 2 * yy + phase) * torch.cos(2 * xx - yy + phase / 2)
    return torch.round(img * 255) / 255
