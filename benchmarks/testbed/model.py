"""A small latent diffusion model for the CPU efficacy testbed (the model the attacker customizes).

:class:`TinyLDM` implements :class:`antipure_core.model.DiffusionModel`: a
KL-regularised conv VAE (down-sampling 8 like SD's, 8 latent channels, latents scaled
to unit variance like SD's 0.18215) and a conditional UNet (two resolutions,
self-attention and cross-attention to conditioning tokens at the coarse one,
time + pooled-token embedding added in every residual block), on the SD
"scaled linear" schedule.

Conditioning is a token tensor ``(1 or B, L, D)`` looked up from a learned
table (:meth:`TinyLDM.tokens`): a class token (``photo``) plus an identity
slot that holds one learned token per training source photo, or the null
token. A customization "rare token" ``sks`` is a fixed random vector of
the identity tokens' scale that the base training never saw, so a LoRA has to
teach the model what it means (as DreamBooth does with a rare word).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from antipure_core.model import ScheduledModule

#: class vocabulary; identity tokens follow at ``NUM_CLASS_TOKENS + index``
CLASS_TOKENS = {"null": 0, "photo": 1}
NUM_CLASS_TOKENS = len(CLASS_TOKENS)


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding ``(B, dim)`` of integer timesteps ``(B,)``."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=1)


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, ch), ch)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb: int = 0, norm: bool = True):
        super().__init__()
        self.n1 = _norm(cin) if norm else nn.Identity()
        self.c1 = nn.Conv2d(cin, cout, 3, 1, 1)
        self.emb = nn.Linear(emb, cout) if emb else None
        self.n2 = _norm(cout) if norm else nn.Identity()
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        h = self.c1(F.silu(self.n1(x)))
        if self.emb is not None:
            h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.c2(F.silu(self.n2(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head attention over the pixels of ``x``; keys/values from ``context`` (cross) or ``x`` (self)."""

    def __init__(self, ch: int, ctx_dim: int | None = None, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.norm = _norm(ch)
        self.to_q = nn.Linear(ch, ch, bias=False)
        self.to_k = nn.Linear(ctx_dim or ch, ch, bias=False)
        self.to_v = nn.Linear(ctx_dim or ch, ch, bias=False)
        self.to_out = nn.Linear(ch, ch)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        b, c, h, w = x.shape
        q_in = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        kv_in = q_in if context is None else context.expand(b, -1, -1)
        split = lambda t: t.view(b, -1, self.heads, c // self.heads).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(split(self.to_q(q_in)), split(self.to_k(kv_in)), split(self.to_v(kv_in)))
        out = self.to_out(out.transpose(1, 2).reshape(b, h * w, c))
        return x + out.transpose(1, 2).view(b, c, h, w)


class VAE(nn.Module):
    """Conv VAE with down-sampling ``2 ** levels``; ``moments`` gives the latent's mean and log-variance.

    No normalisation layers: every output pixel depends only on a local
    neighbourhood, so a crop encodes like the same region of the full image
    (GrIDPure purifies windows) and repeated round trips do not drift with
    image statistics.
    """

    def __init__(self, ch: int = 16, z_ch: int = 4, levels: int = 2):
        super().__init__()
        c2 = 2 * ch
        # residual blocks only below full resolution: full-resolution blocks would dominate the CPU cost
        enc = [nn.Conv2d(3, ch, 3, 1, 1), nn.SiLU(), nn.Conv2d(ch, c2, 4, 2, 1), ResBlock(c2, c2, norm=False)]
        for _ in range(levels - 1):
            enc += [nn.Conv2d(c2, c2, 4, 2, 1), ResBlock(c2, c2, norm=False)]
        self.enc = nn.Sequential(*enc, nn.SiLU(), nn.Conv2d(c2, 2 * z_ch, 3, 1, 1))
        dec = [nn.Conv2d(z_ch, c2, 3, 1, 1), ResBlock(c2, c2, norm=False)]
        for _ in range(levels - 1):
            dec += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c2, c2, 3, 1, 1),
                    ResBlock(c2, c2, norm=False)]
        self.dec = nn.Sequential(*dec, nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c2, ch, 3, 1, 1),
                                 nn.SiLU(), nn.Conv2d(ch, ch, 3, 1, 1), nn.SiLU(), nn.Conv2d(ch, 3, 3, 1, 1))

    def moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mean, logvar = self.enc(x).chunk(2, dim=1)
        return mean, logvar.clamp(-20, 5)

    def reconstruct(self, z: Tensor) -> Tensor:
        return self.dec(z)


class UNet(nn.Module):
    """ε-predictor on ``(B, z_ch, h, w)`` latents (h, w multiples of 2), conditioned on tokens ``(1|B, L, D)``."""

    def __init__(self, z_ch: int = 4, ch: int = 32, token_dim: int = 32):
        super().__init__()
        emb = 4 * ch
        self.ch = ch
        self.time = nn.Sequential(nn.Linear(ch, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.pooled = nn.Linear(token_dim, emb)
        self.inp = nn.Conv2d(z_ch, ch, 3, 1, 1)
        self.d1 = ResBlock(ch, ch, emb)
        self.down = nn.Conv2d(ch, 2 * ch, 3, 2, 1)
        self.d2 = ResBlock(2 * ch, 2 * ch, emb)
        self.self_attn = Attention(2 * ch)
        self.cross_attn = Attention(2 * ch, token_dim)
        self.mid = ResBlock(2 * ch, 2 * ch, emb)
        self.u2 = ResBlock(4 * ch, 2 * ch, emb)
        self.up = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(2 * ch, ch, 3, 1, 1))
        self.u1 = ResBlock(2 * ch, ch, emb)
        self.cross_attn_hi = Attention(ch, token_dim)
        self.out = nn.Sequential(_norm(ch), nn.SiLU(), nn.Conv2d(ch, z_ch, 3, 1, 1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, z: Tensor, t: Tensor, tokens: Tensor) -> Tensor:
        b = z.shape[0]
        tokens = tokens.to(z.dtype)
        emb = self.time(timestep_embedding(t, self.ch)) + self.pooled(tokens.mean(1)).expand(b, -1)
        h1 = self.d1(self.inp(z), emb)
        h = self.d2(self.down(h1), emb)
        h2 = self.cross_attn(self.self_attn(h), tokens)
        h = self.mid(h2, emb)
        h = self.u2(torch.cat([h, h2], 1), emb)
        h = self.u1(torch.cat([self.up(h), h1], 1), emb)
        return self.out(self.cross_attn_hi(h, tokens))


class TinyLDM(ScheduledModule):
    """Latent diffusion model with the core's :class:`~antipure_core.model.DiffusionModel` interface.

    Args:
        num_identities: learned identity tokens (one per training source photo).
        token_dim: conditioning token width D.
        vae_ch, unet_ch: base channel widths.
        vae_levels: the VAE halves the resolution this many times (3: SD's 8-px latent cells).
        latent_channels: the latent's channels (SD: 4; 8 here, so a tiny VAE keeps some texture at 8x).

    ``cond`` for :meth:`predict_noise` is a ``(1 or B, L, D)`` token tensor, e.g.
    ``model.tokens("photo")`` or ``model.tokens("photo", identity=sks_vector)``.
    """

    def __init__(self, num_identities: int = 9, token_dim: int = 32, vae_ch: int = 16, unet_ch: int = 32,
                 num_timesteps: int = 1000, vae_levels: int = 3, latent_channels: int = 8):
        super().__init__(num_timesteps)
        self.downsample = 2 ** vae_levels
        self.latent_channels = latent_channels
        self.vae = VAE(vae_ch, z_ch=latent_channels, levels=vae_levels)
        self.unet = UNet(z_ch=latent_channels, ch=unet_ch, token_dim=token_dim)
        self.embed = nn.Embedding(NUM_CLASS_TOKENS + num_identities, token_dim)
        nn.init.normal_(self.embed.weight, std=1.0)
        # 1 / std of the VAE latent means, set after VAE training (SD's 0.18215 plays this role)
        self.register_buffer("scale_factor", torch.tensor(1.0))

    def encode(self, x: Tensor) -> Tensor:
        """``(B, 3, H, W)`` in [0, 1] -> scaled latent mean ``(B, c, H/f, W/f)``, f = ``downsample`` (deterministic)."""
        return self.vae.moments(x * 2 - 1)[0] * self.scale_factor

    def decode(self, z: Tensor) -> Tensor:
        """Scaled latent -> image ``(B, 3, H, W)``, roughly in [0, 1], not clamped."""
        return (self.vae.reconstruct(z / self.scale_factor) + 1) / 2

    def predict_noise(self, z_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        return self.unet(z_t, t.to(z_t.device), cond.to(z_t.device))

    def token_ids(self, cls: str, identity: int | None = None) -> list[int]:
        if cls not in CLASS_TOKENS:
            raise ValueError(f"cls: expected one of {list(CLASS_TOKENS)}, got {cls!r}")
        return [CLASS_TOKENS[cls], CLASS_TOKENS["null"] if identity is None else NUM_CLASS_TOKENS + identity]

    def tokens(self, cls: str = "photo", identity: int | Tensor | None = None) -> Tensor:
        """Conditioning ``(1, 2, D)``: class token + identity slot (an index, a ``(D,)`` vector, or null)."""
        if isinstance(identity, Tensor):
            ids = torch.tensor([CLASS_TOKENS[cls]], device=self.device)
            return torch.cat([self.embed(ids), identity.to(self.device).view(1, -1)])[None].detach()
        return self.embed(torch.tensor(self.token_ids(cls, identity), device=self.device))[None].detach()

    def rare_token(self, seed: int = 0) -> Tensor:
        """A fixed random identity vector ``(D,)`` at the learned identity tokens' scale (the ``sks`` token)."""
        g = torch.Generator().manual_seed(int(seed))
        ident = self.embed.weight[NUM_CLASS_TOKENS:].detach().cpu()
        v = torch.randn(ident.shape[1], generator=g) * ident.std(0) + ident.mean(0)
        return v.to(self.device)
