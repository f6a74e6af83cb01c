"""Plain DDIM generation from pure noise on a :class:`~antipure_core.model.DiffusionModel`.

For the CPU testbed and the tests (generate after customization); inside
ComfyUI the host's own samplers are used. The DDIM loop itself is
:func:`antipure_core.purify.ddim_denoise`, here started at the last timestep.

Example:
    >>> images = sample(model, cond, (2, 4, 16, 16), steps=25, generator=0)   # (2, 3, 64, 64) if downsample 4
"""
from __future__ import annotations

from typing import Any, Sequence, Union

import torch
from torch import Tensor

from .callbacks import Callback
from .model import check_model
from .purify import ddim_denoise


@torch.no_grad()
def sample(model, cond: Any, shape: Sequence[int], steps: int = 25,
           generator: Union[torch.Generator, int, None] = None, callback: Callback = None) -> Tensor:
    """Generate images with deterministic DDIM from pure Gaussian noise at ``t = num_timesteps - 1``.

    Args:
        model: a :class:`~antipure_core.model.DiffusionModel`.
        cond: conditioning for ``predict_noise``.
        shape: latent shape ``(B, c, h, w)``; images come out ``(B, 3, h * f, w * f)`` with
            ``f = model.downsample``.
        steps: DDIM steps (noise predictions) >= 1.
        generator: CPU ``torch.Generator`` or int seed for the initial noise (``None``: global RNG).
        callback: called per step with ``i``, ``total``, ``t``, ``t_prev``, ``z`` (see ``ddim_denoise``).
            Raising from it cancels.

    Returns:
        Decoded images ``(B, 3, H, W)`` clamped to [0, 1].
    """
    check_model(model)
    shape = tuple(int(s) for s in shape)
    if len(shape) != 4 or min(shape) < 1:
        raise ValueError(f"shape: expected a latent shape (B, c, h, w) of positive sizes, got {shape}")
    if isinstance(generator, int) and not isinstance(generator, bool):
        generator = torch.Generator().manual_seed(generator)
    z = torch.randn(shape, generator=generator, dtype=torch.float32).to(model.device)
    z0 = ddim_denoise(model, z, model.num_timesteps - 1, cond, steps=steps, callback=callback)
    return model.decode(z0).float().clamp(0, 1)
