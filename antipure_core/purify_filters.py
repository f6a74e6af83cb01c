"""Model-free purifiers: JPEG, blur, down/up resampling, Gaussian noise and noisy upscaling.

Every function maps a ``(B, 3, H, W)`` image in [0, 1] to an image of exactly
the same size in [0, 1]. They are the cheap baselines an attacker tries before
(or instead of) diffusion-based purification; :mod:`.purify` holds the
model-based ones and the registry.

Example:
    >>> x = torch.rand(2, 3, 50, 37)
    >>> jpeg(x, quality=75).shape
    torch.Size([2, 3, 50, 37])
"""
from __future__ import annotations

import io
import math
from typing import Callable, Optional

import kornia
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from .diffusion import randn_like
from .image import check_image

#: ``upscale(image (B, 3, h, w), size (H, W)) -> image (B, 3, H', W')``, e.g. the host's UPSCALE_MODEL
Upscaler = Callable[[Tensor, tuple], Tensor]


def check_number(value, name: str, lo: float | None = None, hi: float | None = None,
                 lo_open: bool = False, hint: str = "") -> None:
    """Raise a ``ValueError`` naming ``name`` unless ``value`` is a real number in the given range."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value <= hi
    if not ok:
        left = "(" if lo_open else "["
        rng = f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
        raise ValueError(f"{name}: must be a number in {rng}{' ' + hint if hint else ''}, got {value!r}")


def check_int(value, name: str, lo: int, hi: int | None = None) -> None:
    """Raise a ``ValueError`` naming ``name`` unless ``value`` is an integer in ``[lo, hi]``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name}: must be an integer {rng}, got {value!r}")


def resample(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bicubic resample of ``(B, C, H, W)`` to ``size`` with antialiasing when shrinking, clamped to [0, 1]."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=tuple(size), mode="bicubic", align_corners=False, antialias=shrink).clamp(0, 1)


def jpeg(x: Tensor, quality: int = 75) -> Tensor:
    """Round-trip through a real JPEG encoder (Pillow, 4:2:0 chroma as most tools save).

    Args:
        x: ``(B, 3, H, W)`` in [0, 1]; quantised to 8 bits before encoding.
        quality: JPEG quality 1..100 (75 is the common default; 100 is nearly lossless).

    Returns:
        ``(B, 3, H, W)`` in [0, 1] on the 8-bit grid, same device and dtype.
    """
    check_image(x, "image")
    check_int(quality, "quality", 1, 100)
    arr = (x.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = []
    for img in arr:
        buf = io.BytesIO()
        Image.fromarray(img, "RGB").save(buf, format="JPEG", quality=int(quality))
        buf.seek(0)
        out.append(np.asarray(Image.open(buf).convert("RGB")))
    y = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 255
    return y.to(device=x.device, dtype=x.dtype)


def gaussian_blur(x: Tensor, sigma: float = 1.0) -> Tensor:
    """Gaussian blur with standard deviation ``sigma`` in pixels (kernel ``2 ceil(3 sigma) + 1``).

    ``sigma = 0`` returns the input. Borders are replicated, so any image size works.
    Returns ``(B, 3, H, W)`` in [0, 1].
    """
    check_image(x, "image")
    check_number(sigma, "sigma", lo=0, hint="(pixels)")
    return blur(x, sigma).clamp(0, 1)


def blur(x: Tensor, sigma: float) -> Tensor:
    """:func:`gaussian_blur` on trusted inputs and not clamped (so it also smooths gradients); any ``(B, C, H, W)``,
    differentiable, no device synchronisation."""
    if sigma == 0:
        return x.clone()
    k = 2 * math.ceil(3 * sigma) + 1
    return kornia.filters.gaussian_blur2d(x, (k, k), (float(sigma), float(sigma)), border_type="replicate")


def resize_down_up(x: Tensor, scale: float = 0.5) -> Tensor:
    """Downscale by ``scale`` in (0, 1] (antialiased bicubic), then bicubic back to the input size.

    Returns ``(B, 3, H, W)`` in [0, 1]; ``scale = 1`` returns the input.
    """
    check_image(x, "image")
    check_number(scale, "scale", lo=0, hi=1, lo_open=True, hint="(fraction of the input size)")
    return down_up(x, scale)


def scaled_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """``size = (H, W)`` times ``scale``, at least 1 px a side."""
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def down_up(x: Tensor, scale: float) -> Tensor:
    """:func:`resize_down_up` on trusted inputs (differentiable, no device synchronisation)."""
    size = tuple(x.shape[-2:])
    return resample(resample(x, scaled_size(size, scale)), size)


def gaussian_noise(x: Tensor, sigma: float = 0.05, generator: Optional[torch.Generator] = None) -> Tensor:
    """Add ``N(0, sigma^2)`` noise (``sigma`` on the [0, 1] pixel scale) and clamp to [0, 1].

    The noise is drawn on the CPU from ``generator`` so a seed gives the same
    result on any device. Returns ``(B, 3, H, W)``.
    """
    check_image(x, "image")
    check_number(sigma, "sigma", lo=0, hint="(pixel scale, e.g. 0.05)")
    return (x + sigma * randn_like(x, generator)).clamp(0, 1)


def noisy_upscale(x: Tensor, sigma: float = 0.1, scale: float = 0.5, upscale: Optional[Upscaler] = None,
                  generator: Optional[torch.Generator] = None) -> Tensor:
    """Noisy upscaling (robust-style-mimicry): Gaussian noise, downscale, upscale back.

    The noise drowns the perturbation; the upscaler (an upscaling model in the
    real attack) re-synthesises detail from the low-resolution image.

    Args:
        x: ``(B, 3, H, W)`` in [0, 1].
        sigma: noise standard deviation on the [0, 1] pixel scale (0.1 in the reference attack).
        scale: downscale factor in (0, 1] applied after the noise.
        upscale: ``upscale(img (B, 3, h, w), (H, W)) -> img``; a model that returns
            another size (e.g. a fixed x4) is resampled to ``(H, W)``. ``None``
            uses a plain bicubic resample.
        generator: CPU generator for the noise.

    Returns:
        ``(B, 3, H, W)`` in [0, 1].
    """
    check_image(x, "image")
    check_number(sigma, "sigma", lo=0, hint="(pixel scale, e.g. 0.1)")
    check_number(scale, "scale", lo=0, hi=1, lo_open=True, hint="(fraction of the input size)")
    if upscale is not None and not callable(upscale):
        raise ValueError(f"upscale: expected a callable upscale(image, size) or None, got {type(upscale).__name__}")
    size = tuple(x.shape[-2:])
    low = resample(gaussian_noise(x, sigma, generator), scaled_size(size, scale))
    up = resample(low, size) if upscale is None else upscale(low, size)
    if not isinstance(up, Tensor) or up.ndim != 4 or up.shape[:2] != x.shape[:2]:
        got = tuple(up.shape) if isinstance(up, Tensor) else type(up).__name__
        raise ValueError(f"upscale: must return a (B, 3, h, w) tensor, got {got}")
    return resample(up.to(device=x.device, dtype=x.dtype).clamp(0, 1), size)
