"""Variance-preserving forward process and one-step estimates on a :class:`DiffusionModel`."""
from __future__ import annotations

import torch
from torch import Tensor


def gather(table: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """``table[t]`` for integer timesteps ``t (B,)``, float32, shaped ``(B, 1, ...)`` to broadcast over ``like``."""
    v = table.to(device=like.device, dtype=torch.float32)[t.to(like.device).long()]
    return v.view(-1, *([1] * (like.ndim - 1)))


def abar_at(model, t: Tensor, like: Tensor) -> Tensor:
    """``abar_t`` gathered for integer timesteps ``t`` and shaped to broadcast over ``like``."""
    return gather(model.alphas_cumprod, t, like)


def q_sample(model, z0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """Noise clean latents to timestep ``t``: ``sqrt(abar) z0 + sqrt(1 - abar) noise``."""
    ab = abar_at(model, t, z0)
    return ab.sqrt() * z0 + (1 - ab).sqrt() * noise


def predict_x0(model, z_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    """One-step estimate ``(z_t - sqrt(1 - abar) eps) / sqrt(abar)`` of the clean latent."""
    ab = abar_at(model, t, z_t)
    return (z_t - (1 - ab).sqrt() * eps) / ab.sqrt()


def ddim_step(model, z_t: Tensor, t: Tensor, t_prev: Tensor, eps: Tensor) -> Tensor:
    """Deterministic DDIM update from ``t`` to ``t_prev`` (``t_prev < 0`` means the clean latent)."""
    x0 = predict_x0(model, z_t, t, eps)
    ab_prev = torch.where(t_prev >= 0, model.alphas_cumprod.to(z_t.device)[t_prev.clamp(min=0).long()],
                          torch.ones_like(t_prev, dtype=torch.float32, device=z_t.device))
    ab_prev = ab_prev.view(-1, *([1] * (z_t.ndim - 1))).to(z_t.dtype)
    return ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * eps


def sample_timesteps(n: int, t_lo: int, t_hi: int, generator: torch.Generator | None = None) -> Tensor:
    """``n`` integer timesteps drawn uniformly from ``[t_lo, t_hi]`` (inclusive), on the CPU."""
    if not 0 <= t_lo <= t_hi:
        raise ValueError(f"timestep range: need 0 <= t_lo <= t_hi, got [{t_lo}, {t_hi}]")
    return torch.randint(t_lo, t_hi + 1, (n,), generator=generator)


def noise_at_random_t(model, z0: Tensor, t_lo: int, t_hi: int, generator: torch.Generator | None = None
                      ) -> tuple[Tensor, Tensor, Tensor]:
    """``(t, noise, z_t)``: ``t ~ U{t_lo..t_hi}`` per sample, then ``noise`` and ``z_t = q_sample(z0, t, noise)``,
    both drawn from ``generator`` in that order."""
    t = sample_timesteps(z0.shape[0], t_lo, t_hi, generator).to(z0.device)
    noise = randn_like(z0, generator)
    return t, noise, q_sample(model, z0, t, noise)


def timestep_from_fraction(num_timesteps: int, fraction: float) -> int:
    """Integer timestep for a fraction of the schedule (0.1 -> 100 of 1000), kept in ``[1, T - 1]``."""
    return max(1, min(num_timesteps - 1, round(fraction * num_timesteps)))


def randn_like(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Standard normal noise shaped like ``x``, drawn on the CPU so seeds agree across devices."""
    return torch.randn(x.shape, generator=generator, dtype=torch.float32).to(device=x.device, dtype=x.dtype)


def linear_alphas_cumprod(num_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> Tensor:
    """Stable Diffusion's "scaled linear" schedule, ``(num_timesteps,)`` float32."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()
