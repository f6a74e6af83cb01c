"""Plain DDIM generation from pure noise on a :class:`~antipure_core.model.DiffusionModel`.

For the CPU testbed and the tests (generate after customization); inside
ComfyUI the host's own samplers are used.

Example:
    >>> images = sample(model, cond, (2, 4, 16, 16), steps=25, generator=0)   # (2, 3, 64, 64) if downsample 4
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor

from .callbacks import Callback, report
from .diffusion import ddim_step, predict_x0
from .model import check_model


def ddim_timesteps(num_timesteps: int, steps: int, t_start: Optional[int] = None) -> Tensor:
    """``steps`` distinct integer timesteps, evenly spaced from ``t_start`` (default the last) down to 0.

    Returns a descending ``(steps,)`` long tensor; ``steps`` is capped at ``t_start + 1``.
    """
    t_start = num_timesteps - 1 if t_start is None else int(t_start)
    if not 0 <= t_start < num_timesteps:
        raise ValueError(f"t_start: must be in [0, {num_timesteps - 1}], got {t_start}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: must be an integer >= 1 (e.g. 25), got {steps!r}")
    steps = min(steps, t_start + 1)
    return torch.linspace(t_start, 0, steps, dtype=torch.float64).round().long()


@torch.no_grad()
def sample(model, cond: Any, shape: Sequence[int], steps: int = 25, generator: Union[torch.Generator, int, None] = None,
           uncond: Any = None, cfg: float = 1.0, callback: Callback = None) -> Tensor:
    """Generate images with deterministic DDIM from pure Gaussian noise.

    Args:
        model: a :class:`~antipure_core.model.DiffusionModel`.
        cond: conditioning for ``predict_noise``.
        shape: latent shape ``(B, c, h, w)``; images come out ``(B, 3, h * f, w * f)`` with
            ``f = model.downsample``.
        steps: DDIM steps >= 1, from ``t = num_timesteps - 1`` to the clean latent.
        generator: CPU ``torch.Generator`` or int seed for the initial noise (``None``: global RNG).
        uncond: unconditional conditioning for classifier-free guidance; used when ``cfg != 1``.
        cfg: guidance scale; ``eps = eps_u + cfg (eps_c - eps_u)``.
        callback: called per step with ``i``, ``total``, ``t``, ``x`` (latent before the step)
            and ``denoised`` (its one-step clean estimate). Raising from it cancels.

    Returns:
        Decoded images ``(B, 3, H, W)`` clamped to [0, 1].
    """
    check_model(model)
    shape = tuple(int(s) for s in shape)
    if len(shape) != 4 or min(shape) < 1:
        raise ValueError(f"shape: expected a latent shape (B, c, h, w) of positive sizes, got {shape}")
    if cfg != 1.0 and uncond is None:
        raise ValueError(f"uncond: classifier-free guidance (cfg={cfg}) needs the unconditional conditioning")
    if isinstance(generator, int) and not isinstance(generator, bool):
        generator = torch.Generator().manual_seed(generator)
    ts = ddim_timesteps(model.num_timesteps, steps)
    z = torch.randn(shape, generator=generator, dtype=torch.float32).to(model.device)
    for i, t in enumerate(ts.tolist()):
        tb = torch.full((shape[0],), t, dtype=torch.long, device=z.device)
        eps = model.predict_noise(z, tb, cond).float()
        if cfg != 1.0:
            eps_u = model.predict_noise(z, tb, uncond).float()
            eps = eps_u + cfg * (eps - eps_u)
        t_prev = int(ts[i + 1]) if i + 1 < len(ts) else -1
        report(callback, i=i, total=len(ts), t=t, x=z, denoised=predict_x0(model, z, tb, eps))
        z = ddim_step(model, z, tb, torch.full_like(tb, t_prev), eps)
    return model.decode(z).float().clamp(0, 1)
