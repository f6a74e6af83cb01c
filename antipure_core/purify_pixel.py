"""DiffPure and GrIDPure on a pixel-space diffusion model (:class:`~antipure_core.pixel_diffusion.PixelDiffusion`),
run as their reference code runs them.

Both noise the image (in [-1, 1]) to ᾱ at timestep index ``t_star - 1`` and
take ``t_star`` ancestral DDPM steps back to 0 with the model's learned
variance and the x̂₀ estimate clipped to [-1, 1] (guided-diffusion's
``p_sample``, no respacing), as NVlabs/DiffPure's and
ZhengyueZhao/GrIDPure's ``image_editing_sample`` do. GrIDPure runs that on
the windows of :mod:`.windows`, averaged and blended over iterations
(:func:`~antipure_core.purify.gridpure`).

Known difference from the GrIDPure code: it converts the image to 8-bit PIL
after every iteration (truncating); here the image stays float between
iterations.

Example:
    >>> y = pixel_gridpure(model, x, generator=torch.Generator().manual_seed(0))            # GrIDPure's defaults
    >>> y = pixel_gridpure(model, x, **asdict(PAPER_GRIDPURE), generator=g)                 # AntiPure's 2 x 20
    >>> y = pixel_diffpure(model, x, t_star=100, size=256, generator=g)                     # GrIDPure's DiffPure
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import Tensor

from .callbacks import Callback, report
from .diffusion import predict_x0, q_sample, randn_like
from .image import check_image
from .model import check_model
from .purify import _gridpure
from .purify_filters import check_int, check_number, resample
from .windows import check_window_fits, grid_windows

#: smallest image side the pixel purifiers take
MIN_SIDE = 8


@dataclass(frozen=True)
class GrIDPureSettings:
    """GrIDPure's parameters; the defaults are its published settings (ZhengyueZhao/GrIDPure).

    Attributes:
        t_star: noise to ᾱ at timestep index ``t_star - 1`` of 1000 and take ``t_star`` DDPM steps back.
        window, stride: window side and stride in pixels.
        iterations: purify-and-blend iterations per round.
        gamma: weight of the iteration's input in ``(1 - gamma) * purified + gamma * input``.
        rounds: GrIDPure runs one after the other (AntiPure's evaluation: 2 rounds of 20 iterations).
    """

    t_star: int = 10
    window: int = 256
    stride: int = 128
    iterations: int = 20
    gamma: float = 0.1
    rounds: int = 1


#: GrIDPure's own defaults
GRIDPURE = GrIDPureSettings()
#: the purification AntiPure's paper evaluates against: GrIDPure, 2 rounds x 20 iterations
PAPER_GRIDPURE = replace(GRIDPURE, rounds=2)


def check_pixel_image(x: Tensor, name: str = "image") -> None:
    """:func:`~antipure_core.image.check_image`, and at least ``MIN_SIDE`` pixels a side."""
    check_image(x, name)
    h, w = x.shape[-2:]
    if min(h, w) < MIN_SIDE:
        raise ValueError(f"{name}: {h}x{w} px is too small for a pixel diffusion purifier; give images of at "
                         f"least {MIN_SIDE} px a side (GrIDPure's settings are meant for 512 px)")


def ddpm_denoise(model, x_t: Tensor, t_start: int, generator: Optional[torch.Generator] = None,
                 clip_denoised: bool = True, callback: Callback = None, common_noise: Optional[int] = None) -> Tensor:
    """Ancestral DDPM with the model's (learned) variance from timestep index ``t_start`` down to 0.

    Each step: x̂₀ from ε̂ (clipped to [-1, 1]), the posterior mean of
    ``q(x_{t-1} | x_t, x̂₀)``, plus ``exp(log_var / 2)`` times fresh noise
    except at ``t = 0``.

    Args:
        model: a :class:`~antipure_core.pixel_diffusion.PixelDiffusion` (or anything with its
            ``predict_noise_and_log_variance`` and ``posterior_mean``).
        x_t: ``(B, 3, H, W)`` in the model's [-1, 1] space, noised to ``t_start``.
        t_start: integer timestep index in ``[0, T)``; ``t_start + 1`` model calls.
        generator: CPU generator for the step noise.
        clip_denoised: clip x̂₀ to [-1, 1] (guided-diffusion's ``clip_denoised``).
        callback: after each step with ``i``, ``total``, ``t``.
        common_noise: see :func:`shared_noise`.

    Returns:
        ``x_0`` ``(B, 3, H, W)`` in [-1, 1] space.
    """
    x = x_t
    for i, t in enumerate(range(int(t_start), -1, -1)):
        x = ddpm_step(model, x, t, shared_noise(x, generator, common_noise) if t > 0 else None, clip_denoised)
        report(callback, i=i, total=t_start + 1, t=t)
    return x


def shared_noise(x: Tensor, generator: Optional[torch.Generator], common_noise: Optional[int]) -> Tensor:
    """Noise like ``x``; with ``common_noise = n``, image ``i`` gets the same noise as image ``i mod n``.

    Common random numbers: purifying several sets of ``n`` images in one batch, image k of every set sees
    the noise it would see alone, so two sets differ after purification only by what differed before.
    """
    if common_noise is None:
        return randn_like(x, generator)
    base = randn_like(x[:common_noise], generator)
    return base.repeat(x.shape[0] // common_noise, *([1] * (x.dim() - 1)))


def check_common_noise(common_noise: Optional[int], x: Tensor) -> None:
    if common_noise is None:
        return
    check_int(common_noise, "common_noise", 1)
    if x.shape[0] % common_noise:
        raise ValueError(f"common_noise: the batch ({x.shape[0]} images) is not made of sets of {common_noise}; "
                         f"give a multiple of {common_noise} images or common_noise=None")


def ddpm_step(model, x: Tensor, t: int, noise: Optional[Tensor], clip_denoised: bool = True) -> Tensor:
    """One ancestral step of :func:`ddpm_denoise` from timestep index ``t``: the posterior mean at the (clipped)
    x̂₀, plus ``exp(log_var / 2) * noise`` (``noise = None`` at ``t = 0``).

    The noise is an argument, not drawn here, so a checkpointed step recomputes exactly the same value.
    """
    tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
    eps, log_var = model.predict_noise_and_log_variance(x, tt)
    x0 = predict_x0(model, x, tt, eps.float())
    if clip_denoised:
        x0 = x0.clamp(-1, 1)
    x = model.posterior_mean(x0, x, tt)
    return x if noise is None else x + (0.5 * log_var).exp() * noise


def pixel_diffpure(model, x: Tensor, t_star: int = 100, size: Optional[int] = None,
                   generator: Optional[torch.Generator] = None, callback: Callback = None,
                   common_noise: Optional[int] = None) -> Tensor:
    """DiffPure on a pixel-space model: noise to ᾱ at index ``t_star - 1``, ``t_star`` DDPM steps back.

    Args:
        model: a :class:`~antipure_core.pixel_diffusion.PixelDiffusion`.
        x: ``(B, 3, H, W)`` in [0, 1], sides >= 8 px.
        t_star: integer noise level of ``model.num_timesteps`` (DiffPure on ImageNet: 150; GrIDPure's DiffPure
            baseline: 100).
        size: purify at ``size x size`` (resampled there and back, as GrIDPure's DiffPure baseline at 256);
            ``None``: at the image's own resolution.
        generator: CPU generator for the forward and step noise (seed determinism across devices).
        callback: per DDPM step, see :func:`ddpm_denoise`.
        common_noise: ``n``: image ``i`` gets image ``i mod n``'s noise (:func:`shared_noise`).

    Returns:
        ``(B, 3, H, W)`` in [0, 1].
    """
    check_model(model)
    check_pixel_image(x)
    check_int(t_star, "t_star", 1, model.num_timesteps)
    if size is not None:
        check_int(size, "size", MIN_SIDE)
    check_common_noise(common_noise, x)
    return _diffpure(model, x, t_star, size, generator, callback, common_noise)


def _diffpure(model, x: Tensor, t_star: int, size: Optional[int], generator: Optional[torch.Generator],
              callback: Callback, common_noise: Optional[int] = None) -> Tensor:
    """:func:`pixel_diffpure` on trusted inputs: GrIDPure calls it per window, where checking each window again
    (``check_image`` synchronises with the device) would only repeat the check of the whole image."""
    with torch.no_grad():
        xin = x.to(device=model.device, dtype=torch.float32)
        if size is not None:
            xin = resample(xin, (size, size))
        z0 = model.encode(xin)
        t = torch.full((z0.shape[0],), t_star - 1, dtype=torch.long, device=z0.device)
        z = ddpm_denoise(model, q_sample(model, z0, t, shared_noise(z0, generator, common_noise)), t_star - 1,
                         generator, callback=callback, common_noise=common_noise)
        out = model.decode(z).clamp(0, 1)
        if size is not None:
            out = resample(out, tuple(x.shape[-2:]))
    return out.to(device=x.device, dtype=x.dtype)


def pixel_gridpure(model, x: Tensor, t_star: int = GRIDPURE.t_star, window: int = GRIDPURE.window,
                   stride: int = GRIDPURE.stride, iterations: int = GRIDPURE.iterations, gamma: float = GRIDPURE.gamma,
                   rounds: int = GRIDPURE.rounds, generator: Optional[torch.Generator] = None,
                   callback: Callback = None, common_noise: Optional[int] = None) -> Tensor:
    """GrIDPure on a pixel-space model, at the image's own resolution through windows (defaults: GrIDPure's own).

    ``rounds`` GrIDPure runs of ``iterations`` each: every iteration purifies
    each window (and the packed corners, :mod:`.windows`) with
    :func:`pixel_diffpure` at ``t_star``, averages overlaps and returns
    ``(1 - gamma) * purified + gamma * input``.

    Args:
        model: a :class:`~antipure_core.pixel_diffusion.PixelDiffusion`.
        x: ``(B, 3, H, W)`` in [0, 1], each side >= ``window``.
        t_star, window, stride, iterations, gamma, rounds: see :class:`GrIDPureSettings`.
        generator: CPU generator for all noise, drawn window by window in order.
        callback: after every DDPM step with ``i``, ``total`` (all steps of all rounds), ``round``, ``t``;
            raising from it stops within one model call and returns nothing.
        common_noise: ``n``: image ``i`` gets image ``i mod n``'s noise in every window (:func:`shared_noise`).

    Returns:
        ``(B, 3, H, W)`` in [0, 1].
    """
    check_model(model)
    check_pixel_image(x)
    check_int(t_star, "t_star", 1, model.num_timesteps)
    check_common_noise(common_noise, x)
    check_int(window, "window", MIN_SIDE)
    check_window_fits(tuple(x.shape[-2:]), window, "window")
    check_int(stride, "stride", 1, window)
    check_int(iterations, "iterations", 1)
    check_number(gamma, "gamma", lo=0, hi=1)
    check_int(rounds, "rounds", 1)
    layout = grid_windows(tuple(x.shape[-2:]), window, stride)
    total = rounds * iterations * layout.count * t_star
    k = 0

    def step(info) -> None:
        nonlocal k
        report(callback, i=k, total=total, round=r, t=info["t"])
        k += 1

    y = x.to(device=model.device, dtype=torch.float32)  # windows are cut where the model runs
    for r in range(rounds):
        # checked once above: each round and window runs unchecked
        y = _gridpure(y, lambda tile: _diffpure(model, tile, t_star, None, generator, step, common_noise), layout,
                      iterations, gamma)
    return y.to(device=x.device, dtype=x.dtype)
