"""The attacker's purifiers: DiffPure/SDEdit, GrIDPure, IMPRESS, and the registry of all purifiers.

Every purifier maps a ``(B, 3, H, W)`` image in [0, 1] to an image of exactly
the same size in [0, 1]; sizes that the autoencoder cannot take (not a
multiple of its down-sampling) are padded and cropped back. Iterative ones
take a ``callback`` called once per step (see :mod:`.callbacks`); raising from
it stops the loop and nothing is returned. Model-free purifiers live in
:mod:`.purify_filters` and are re-exported here.

Example:
    >>> y = diffpure(model, x, cond, t_star=0.1, steps=20, generator=torch.Generator().manual_seed(0))
    >>> y = gridpure(x, lambda tile: diffpure(model, tile, cond, t_star=0.05, steps=10), iterations=20)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import kornia
import torch
import torch.nn.functional as F
from torch import Tensor

from .callbacks import Callback, report
from .diffusion import ddim_step, q_sample, randn_like, timestep_from_fraction
from .image import check_image, crop_to, pad_to_multiple
from .model import check_model
from .purify_filters import (check_int, check_number, gaussian_blur, gaussian_noise, jpeg, noisy_upscale,
                             resize_down_up)
from .windows import Windows, grid_windows, window_boxes

__all__ = ["diffpure", "purification_timestep", "noise_latent", "ddim_timesteps", "ddim_denoise", "gridpure",
           "window_boxes", "impress", "jpeg", "gaussian_blur", "resize_down_up", "gaussian_noise",
           "noisy_upscale", "Purifier", "PURIFIERS", "get_purifier", "diffpure_window"]

#: ``denoise_fn(z_t, t (B,), callback) -> z0``: replaces the DDIM loop (a node passes the host's sampler)
DenoiseFn = Callable[[Tensor, Tensor, Callback], Tensor]


# --- DiffPure / SDEdit ------------------------------------------------------------------------------------------

def purification_timestep(model, t_star: float) -> int:
    """Integer timestep for ``t_star``, a fraction of the schedule (0.1 -> 100 of 1000), in [1, T - 1]."""
    check_number(t_star, "t_star", lo=0, hi=1, lo_open=True, hint="(fraction of the schedule, e.g. 0.1-0.3)")
    return timestep_from_fraction(model.num_timesteps, t_star)


def noise_latent(model, z0: Tensor, t_star: float, generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
    """Forward-noise clean latents to ``t_star``: returns ``(z_t, t)`` with ``t`` integer ``(B,)``."""
    t = torch.full((z0.shape[0],), purification_timestep(model, t_star), dtype=torch.long, device=z0.device)
    return q_sample(model, z0, t, randn_like(z0, generator)), t


def ddim_timesteps(t_start: int, steps: int) -> list[int]:
    """Descending timesteps ``[t_start, ..., t_k, -1]`` for ``steps`` DDIM updates (fewer when t_start < steps).

    ``-1`` stands for the clean latent; consecutive duplicates are dropped, so
    every update is a real step.
    """
    ts = torch.linspace(t_start, 0, steps + 1).round().long()[:-1].unique_consecutive().tolist()
    return ts + [-1]


def ddim_denoise(model, z_t: Tensor, t_start: int, cond: Any, steps: int = 20, callback: Callback = None) -> Tensor:
    """Deterministic DDIM from integer timestep ``t_start`` down to the clean latent.

    Args:
        z_t: noisy latent ``(B, c, h, w)`` at ``t_start``.
        steps: number of noise predictions (model calls), >= 1.
        callback: called after each update with ``i``, ``total``, ``t``, ``t_prev``, ``z``.

    Returns:
        The clean latent estimate ``(B, c, h, w)``.
    """
    check_int(steps, "steps", 1)
    ts = ddim_timesteps(int(t_start), steps)
    z = z_t
    for i, (t, t_prev) in enumerate(zip(ts[:-1], ts[1:])):
        z = ddim_update(model, z, t, t_prev, cond)
        report(callback, i=i, total=len(ts) - 1, t=t, t_prev=t_prev, z=z)
    return z


def ddim_update(model, z: Tensor, t: int, t_prev: int, cond: Any) -> Tensor:
    """One step of :func:`ddim_denoise`: one noise prediction at integer ``t``, the DDIM update to ``t_prev``."""
    tt = torch.full((z.shape[0],), t, dtype=torch.long, device=z.device)
    tp = torch.full((z.shape[0],), t_prev, dtype=torch.long, device=z.device)
    return ddim_step(model, z, tt, tp, model.predict_noise(z, tt, cond).to(z.dtype))


def diffpure(model, x: Tensor, cond: Any, t_star: float = 0.1, steps: int = 20,
             generator: Optional[torch.Generator] = None, callback: Callback = None,
             denoise_fn: Optional[DenoiseFn] = None) -> Tensor:
    """DiffPure / SDEdit: encode, noise the latent to ``t_star``, denoise back, decode.

    Small ``t_star`` keeps the content and washes out the high-frequency
    perturbation (literature: 0.1-0.3).

    Args:
        model: a :class:`~antipure_core.model.DiffusionModel`.
        x: ``(B, 3, H, W)`` in [0, 1], any H, W (padded for the autoencoder, cropped back).
        cond: conditioning passed to ``model.predict_noise`` (e.g. an empty prompt's embedding).
        t_star: noising strength as a fraction of the schedule, in (0, 1].
        steps: DDIM steps between ``t_star`` and 0, >= 1.
        generator: CPU generator for the forward noise (seed determinism across devices).
        callback: per denoising step, see :func:`ddim_denoise`.
        denoise_fn: ``denoise_fn(z_t, t, callback) -> z0`` replacing the DDIM loop,
            e.g. a host sampler started at ``t``.

    Returns:
        ``(B, 3, H, W)`` in [0, 1].
    """
    check_image(x, "image")
    return diffpure_window(model, cond, t_star, steps, generator, callback, denoise_fn)(x)


def diffpure_window(model, cond: Any, t_star: float = 0.1, steps: int = 20,
                    generator: Optional[torch.Generator] = None, callback: Callback = None,
                    denoise_fn: Optional[DenoiseFn] = None) -> Callable[[Tensor], Tensor]:
    """:func:`diffpure` as a ``purify_window`` for :func:`gridpure`: the settings are checked once here, and
    the returned function does no checks (and no device synchronisation) per window."""
    check_model(model)
    t_start = purification_timestep(model, t_star)
    check_int(steps, "steps", 1)

    @torch.no_grad()
    def purify(x: Tensor) -> Tensor:
        xp, size = pad_to_multiple(x.to(model.device), model.downsample)
        z_t, t = noise_latent(model, model.encode(xp), t_star, generator)
        if denoise_fn is None:
            z0 = ddim_denoise(model, z_t, t_start, cond, steps, callback)
        else:
            z0 = denoise_fn(z_t, t, callback)
        out = crop_to(model.decode(z0), size).clamp(0, 1)
        return out.to(device=x.device, dtype=x.dtype)
    return purify


# --- GrIDPure ---------------------------------------------------------------------------------------------------

def _purify_tile(purify_window: Callable[[Tensor], Tensor], tile: Tensor) -> Tensor:
    out = purify_window(tile)
    if not isinstance(out, Tensor) or out.shape != tile.shape:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"purify_window: must return a tile of the input's shape {tuple(tile.shape)}, got {got}")
    return out.to(device=tile.device, dtype=tile.dtype)


def gridpure(x: Tensor, purify_window: Callable[[Tensor], Tensor], window: int = 256, stride: int = 128,
             iterations: int = 20, gamma: float = 0.1, pack_corners: bool = True, callback: Callback = None) -> Tensor:
    """GrIDPure: purify overlapping windows with small-t* DiffPure, average, blend, iterate.

    Each iteration purifies every ``window`` x ``window`` crop on a ``stride``
    grid (the whole image along a side shorter than ``window``) and, as in the
    reference implementation, one extra window made of the four corner
    quarter-windows packed together (the corners are otherwise covered only
    once). Overlaps are averaged, then blended with the iteration's input:
    ``x <- (1 - gamma) * purified + gamma * x``.

    Args:
        x: ``(B, 3, H, W)`` in [0, 1].
        purify_window: ``tile (B, 3, h, w) -> tile`` of the same shape, e.g.
            ``lambda t: diffpure(model, t, cond, t_star=0.05, steps=10)``.
        window: window side in pixels (256 in the reference, for 512 px images).
        stride: window stride in pixels (128 in the reference).
        iterations: number of purify-and-blend rounds (20 in the reference).
        gamma: weight of the iteration's input in the blend, in [0, 1] (0.1 in the reference).
        pack_corners: add the packed corner window (reference behaviour).
        callback: called after each window with ``i``, ``total``, ``iteration``, ``window``.

    Returns:
        ``(B, 3, H, W)`` in [0, 1].
    """
    check_image(x, "image")
    if not callable(purify_window):
        raise ValueError(f"purify_window: expected a callable tile -> tile, got {type(purify_window).__name__}")
    check_int(window, "window", 1)
    check_int(stride, "stride", 1)
    if stride > window:
        raise ValueError(f"stride: must be <= window ({window}) so the windows cover the image, got {stride}")
    check_int(iterations, "iterations", 1)
    check_number(gamma, "gamma", lo=0, hi=1)
    layout = grid_windows(tuple(x.shape[-2:]), window, stride, pack_corners)
    return _gridpure(x, purify_window, layout, iterations, gamma, callback)


def _gridpure(x: Tensor, purify_window: Callable[[Tensor], Tensor], layout: Windows, iterations: int,
              gamma: float, callback: Callback = None) -> Tensor:
    """:func:`gridpure`'s loop on trusted inputs: ``x`` ``(B, 3, H, W)`` in [0, 1] cut by ``layout``.

    For callers that checked their arguments once already (e.g.
    :func:`~antipure_core.purify_pixel.pixel_gridpure` running several rounds).
    """
    total = iterations * layout.count
    cur, k = x, 0
    with torch.no_grad():
        for it in range(iterations):
            out = []
            for j, tile in enumerate(layout.crops(cur)):
                out.append(_purify_tile(purify_window, tile))
                report(callback, i=k, total=total, iteration=it, window=j)
                k += 1
            cur = ((1 - gamma) * layout.merge(out) + gamma * cur).clamp(0, 1)
    return cur


# --- IMPRESS ----------------------------------------------------------------------------------------------------

Similarity = Union[str, Callable[[Tensor, Tensor], Tensor]]


def _similarity_loss(similarity: Similarity) -> Callable[[Tensor, Tensor], Tensor]:
    """A per-sample distance ``(x, ref) -> (B,)`` (0 when equal) for ``similarity``."""
    if callable(similarity):
        return lambda a, b: similarity(a, b).reshape(a.shape[0], -1).mean(1)
    if similarity == "mse":
        return lambda a, b: (a - b).square().flatten(1).mean(1)
    if similarity == "ssim":
        def dssim(a, b):
            win = min(11, min(a.shape[-2:]) // 2 * 2 - 1)  # odd and not larger than the image
            return 1 - kornia.metrics.ssim(a, b, max(win, 1)).flatten(1).mean(1)
        return dssim
    raise ValueError(f"similarity: expected 'ssim', 'mse' or a callable (x, reference) -> distance, got {similarity!r}")


def vae_inconsistency(model, x: Tensor) -> Tensor:
    """Per-sample ``mean |x - D(E(x))|^2``, shape ``(B,)``, differentiable in ``x`` (padded for the autoencoder)."""
    xp, size = pad_to_multiple(x, model.downsample)
    return (x - crop_to(model.decode(model.encode(xp)), size).float()).square().flatten(1).mean(1)


def impress(model, x: Tensor, iterations: int = 100, lr: float = 0.01, similarity: Similarity = "ssim",
            weight: float = 0.1, margin: float = 0.0, callback: Callback = None) -> Tensor:
    """IMPRESS: optimise the image toward VAE consistency while staying close to the input.

    Minimises ``|x' - D(E(x'))|^2 + weight * max(d(x', x) - margin, 0)`` over
    ``x'`` with Adam, clamping ``x'`` to [0, 1] after each step. Protective
    perturbations are typically inconsistent under the autoencoder, so this
    pulls them out. Only the image receives gradients; the model's parameters
    are never touched.

    Args:
        model: a :class:`~antipure_core.model.DiffusionModel` (only ``encode``/``decode`` are used).
        x: ``(B, 3, H, W)`` in [0, 1].
        iterations: optimisation steps, >= 1.
        lr: Adam learning rate on the [0, 1] pixel scale, > 0.
        similarity: ``'ssim'`` (1 - SSIM), ``'mse'``, or a callable ``(x', x) -> distance``
            (per sample or scalar), e.g. LPIPS when its weights are available.
        weight: weight of the similarity term, >= 0 (alpha in the paper).
        margin: distance allowed for free before the similarity term applies (Delta in the paper), >= 0.
        callback: called after each step with ``i``, ``total``, ``consistency``, ``similarity``, ``loss``.

    Returns:
        ``(B, 3, H, W)`` in [0, 1].
    """
    check_model(model)
    check_image(x, "image")
    check_int(iterations, "iterations", 1)
    check_number(lr, "lr", lo=0, lo_open=True, hint="(Adam step size, e.g. 0.01)")
    check_number(weight, "weight", lo=0)
    check_number(margin, "margin", lo=0)
    dist = _similarity_loss(similarity)
    ref = x.detach().to(model.device).float()
    xp = ref.clone().requires_grad_(True)
    opt = torch.optim.Adam([xp], lr=lr)
    with torch.enable_grad():
        for i in range(iterations):
            cons = vae_inconsistency(model, xp)
            sim = dist(xp, ref)
            loss = (cons + weight * F.relu(sim - margin)).sum()
            # grad w.r.t. the image only: parameters that require grad keep .grad untouched
            (xp.grad,) = torch.autograd.grad(loss, [xp])
            opt.step()
            with torch.no_grad():
                xp.clamp_(0, 1)
            report(callback, i=i, total=iterations, consistency=cons.detach().mean().item(),
                   similarity=sim.detach().mean().item(), loss=loss.detach().item())
    return xp.detach().to(device=x.device, dtype=x.dtype)


# --- registry ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Purifier:
    """A registered purifier.

    Attributes:
        fn: the function; its first image argument is ``x`` (after ``model`` when it needs one).
        needs: host inputs it cannot run without: ``'model'`` (the noise predictor) and/or ``'vae'``.
        iterative: takes a ``callback`` (progress, cancel).
        description: one line for a node's tooltip.
    """

    fn: Callable[..., Tensor]
    needs: tuple[str, ...]
    iterative: bool
    description: str


PURIFIERS: dict[str, Purifier] = {
    "diffpure": Purifier(diffpure, ("model", "vae"), True, "DiffPure/SDEdit: noise the latent to t*, denoise back"),
    "gridpure": Purifier(gridpure, ("model", "vae"), True,
                         "GrIDPure: small-t* DiffPure on overlapping windows, blended over iterations"),
    "impress": Purifier(impress, ("vae",), True, "IMPRESS: optimise toward VAE consistency, close to the input"),
    "noisy_upscale": Purifier(noisy_upscale, (), False,
                              "Gaussian noise, downscale, upscale (UPSCALE_MODEL or bicubic)"),
    "jpeg": Purifier(jpeg, (), False, "JPEG compression round trip"),
    "gaussian_blur": Purifier(gaussian_blur, (), False, "Gaussian blur"),
    "resize": Purifier(resize_down_up, (), False, "downscale then upscale back"),
    "gaussian_noise": Purifier(gaussian_noise, (), False, "additive Gaussian noise"),
}


def get_purifier(name: str, available: tuple[str, ...] | set[str] | None = None) -> Purifier:
    """Look up ``name``; with ``available`` (e.g. ``{'vae'}``) also check that its required inputs are there.

    Raises ``ValueError`` naming the choices for an unknown name, or what to
    connect (``"purifier 'diffpure' needs MODEL and VAE; missing MODEL"``).
    """
    if name not in PURIFIERS:
        raise ValueError(f"purifier: unknown {name!r}, choose one of {', '.join(PURIFIERS)}")
    p = PURIFIERS[name]
    if available is not None:
        missing = [n for n in p.needs if n not in set(available)]
        if missing:
            raise ValueError(f"purifier {name!r} needs {' and '.join(n.upper() for n in p.needs)}; "
                             f"connect {' and '.join(n.upper() for n in missing)}")
    return p
