"""The attacker's purifiers as differentiable functions of the image, for attacks that reach δ through them.

A diffusion purifier (DiffPure/GrIDPure on a pixel model, SDEdit on a latent
model) is a chain of ``n`` denoising steps after one forward noising. Three
gradient routes through it (adaptive attacks on DiffPure: DiffAttack, Lee &
Kim 2023):

* ``'one_step'``: the purifier's one-step x̂₀ at ``t ~ U`` over the chain's
  timesteps (one model call), standing in for the chain's output;
* ``'k_step'``: the whole chain runs (its output is exact), the gradient goes
  through the last ``k`` steps; the earlier ones run without a graph and pass
  the gradient straight through as ``∂x_t/∂x₀ = √ᾱ_t`` (their ε̂ held fixed);
* ``'full'``: the gradient goes through every step.

Each differentiated step is checkpointed (``torch.utils.checkpoint``) unless
told otherwise, so memory stays near one step's graph; a step's noise is
drawn before the chain runs, so the recomputation gives the same values.

Denoiser calls per chain of ``n`` steps (:func:`route_calls`), forward
(checkpointed recomputation included) + backward:

=============  ====================  ==========
route          forward               backward
=============  ====================  ==========
``one_step``   1                     1
``k_step``     n + k (n, no ckpt)    k
``full``       2n (n, no ckpt)       n
=============  ====================  ==========

Example:
    >>> y = pixel_chain(model, x, t_star=10, route="full", k=10, generator=g)   # GrIDPure's chain on one window
    >>> y.sum().backward()                                                        # reaches x
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, Optional

import kornia
import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .diffusion import abar_at, noise_at_random_t, predict_x0, q_sample, randn_like, timestep_from_fraction
from .image import crop_to, pad_to_multiple
from .purify import ddim_timesteps, ddim_update, noise_latent, purification_timestep
from .purify_filters import resample
from .purify_pixel import ddpm_step

ROUTES = ("one_step", "k_step", "full")


def route_calls(route: str, n: int, k: int, checkpointed: bool = True) -> dict[str, int]:
    """Denoiser calls of one chain of ``n`` steps on ``route``: ``{'forward': …, 'backward': …}`` (see the table
    in the module docstring); ``k`` is clipped to ``[1, n]``."""
    if route == "one_step":
        return {"forward": 1, "backward": 1}
    g = n if route == "full" else max(1, min(k, n))
    return {"forward": n + (g if checkpointed else 0), "backward": g}


def run_chain(steps: list[Callable[[Tensor], Tensor]], x_t: Tensor, z0: Tensor, signal_scales: list[Tensor],
              k: int, checkpointed: bool = True) -> Tensor:
    """Run ``steps`` (each ``x -> x``) from ``x_t``, differentiating the last ``k`` of them.

    Args:
        steps: the chain's steps, in order.
        x_t: the noised start, in the graph of ``z0``.
        z0: the clean input the start was noised from.
        signal_scales: ``√ᾱ`` of the state entering each step: the straight-through gradient scale of the
            truncated part (``∂x_t/∂x₀``).
        k: steps differentiated, clipped to ``[1, len(steps)]``.
        checkpointed: recompute each differentiated step in the backward pass instead of keeping its graph.
    """
    n = len(steps)
    k = max(1, min(k, n))
    x = x_t
    if k < n:
        with torch.no_grad():
            for step in steps[:n - k]:
                x = step(x)
        x = x + signal_scales[n - k] * (z0 - z0.detach())
    for step in steps[n - k:]:
        if checkpointed and torch.is_grad_enabled() and x.requires_grad:
            x = checkpoint(step, x, use_reentrant=False)
        else:
            x = step(x)
    return x


def one_step_x0(model, z0: Tensor, t_start: int, cond: Any, generator: Optional[torch.Generator],
                clip: bool = False) -> Tensor:
    """The one-step x̂₀ of ``z0`` noised to ``t ~ U{0..t_start}`` (schedule indices), clipped to [-1, 1] if
    ``clip`` (a pixel model's ``clip_denoised``)."""
    t, _, z_t = noise_at_random_t(model, z0, 0, t_start, generator)
    x0 = predict_x0(model, z_t, t, model.predict_noise(z_t, t, cond).to(z_t.dtype))
    return x0.clamp(-1, 1) if clip else x0


def _scales(model, ts: list[int], like: Tensor) -> list[Tensor]:
    return [abar_at(model, torch.tensor([t]), like).sqrt() for t in ts]


def pixel_chain(model, x: Tensor, t_star: int, route: str, k: int, generator: Optional[torch.Generator],
                checkpointed: bool = True, size: Optional[int] = None) -> Tensor:
    """:func:`~antipure_core.purify_pixel.pixel_diffpure` with gradients on ``route``.

    With ``route = 'full'`` or ``'k_step'`` the output equals ``pixel_diffpure`` on the same generator state
    (the same noise is drawn in the same order).

    Args:
        model: a :class:`~antipure_core.pixel_diffusion.PixelDiffusion`.
        x: ``(B, 3, H, W)`` in [0, 1] (a GrIDPure window, or the whole image), trusted.
        t_star: noise to ᾱ at index ``t_star - 1`` and take ``t_star`` ancestral steps back.
        route, k, checkpointed: see the module docstring and :func:`run_chain`.
        generator: CPU generator for all noise.
        size: purify at ``size x size`` and resample back (GrIDPure's DiffPure baseline); ``None``: as is.

    Returns:
        ``(B, 3, H, W)`` in [0, 1], differentiable in ``x``.
    """
    xin = x.to(device=model.device, dtype=torch.promote_types(x.dtype, torch.float32))  # fp32 at least
    if size is not None:
        xin = resample(xin, (size, size))
    z0 = model.encode(xin)
    start = t_star - 1
    if route == "one_step":
        z = one_step_x0(model, z0, start, None, generator, clip=True)
    else:
        t = torch.full((z0.shape[0],), start, dtype=torch.long, device=z0.device)
        x_t = q_sample(model, z0, t, randn_like(z0, generator))
        ts = list(range(start, -1, -1))
        noises = [randn_like(z0, generator) if s > 0 else None for s in ts]  # ddpm_denoise's draws, in its order
        steps = [partial(ddpm_step, model, t=s, noise=e) for s, e in zip(ts, noises)]
        z = run_chain(steps, x_t, z0, _scales(model, ts, z0), t_star if route == "full" else k, checkpointed)
    out = model.decode(z).clamp(0, 1)
    if size is not None:
        out = resample(out, tuple(x.shape[-2:]))
    return out.to(device=x.device, dtype=x.dtype)


def sdedit_chain(model, x: Tensor, cond: Any, t_star: float, steps: int, route: str, k: int,
                 generator: Optional[torch.Generator], checkpointed: bool = True) -> Tensor:
    """:func:`~antipure_core.purify.diffpure` (SDEdit through the VAE, DDIM back) with gradients on ``route``.

    With ``route = 'full'`` or ``'k_step'`` the output equals ``diffpure`` with the same arguments and generator
    state. The gradient also goes through the VAE encoder and decoder.

    Args:
        model: a :class:`~antipure_core.model.DiffusionModel`.
        x: ``(B, 3, H, W)`` in [0, 1], trusted.
        cond: the purifier's conditioning (the attacker's prompt).
        t_star: noise level as a fraction of the schedule; ``steps``: DDIM steps back.
        route, k, checkpointed, generator: as in :func:`pixel_chain`.
    """
    xp, size = pad_to_multiple(x.to(model.device), model.downsample)
    z0 = model.encode(xp)
    t_start = purification_timestep(model, t_star)
    if route == "one_step":
        z = one_step_x0(model, z0, t_start, cond, generator)
    else:
        z_t, _ = noise_latent(model, z0, t_star, generator)
        ts = ddim_timesteps(t_start, steps)
        fns = [partial(ddim_update, model, t=t, t_prev=tp, cond=cond) for t, tp in zip(ts[:-1], ts[1:])]
        z = run_chain(fns, z_t, z0, _scales(model, ts[:-1], z0), len(fns) if route == "full" else k, checkpointed)
    out = crop_to(model.decode(z), size).clamp(0, 1)
    return out.to(device=x.device, dtype=x.dtype)


def sdedit_length(num_timesteps: int, t_star: float, steps: int) -> int:
    """Denoiser calls of :func:`sdedit_chain`'s chain on a schedule of ``num_timesteps`` (``steps``, fewer when
    ``t_star`` covers fewer timesteps)."""
    return len(ddim_timesteps(timestep_from_fraction(num_timesteps, t_star), steps)) - 1


def jpeg_approx(x: Tensor, quality: int) -> Tensor:
    """Differentiable JPEG: kornia's codec (Reich et al. 2024; 8x8 DCT, the standard tables scaled by
    ``quality``, 4:2:0 chroma, soft rounding), clamped to [0, 1].

    Against the pack's real (Pillow) :func:`~antipure_core.purify_filters.jpeg` at quality 75 it is within
    about 1.5/255 RMSE on perturbed photos (tests/core/test_purified.py).
    """
    q = torch.tensor([float(quality)], device=x.device, dtype=torch.float32)
    return kornia.enhance.jpeg_codec_differentiable(x, q).clamp(0, 1)
