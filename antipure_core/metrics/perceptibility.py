"""Full-reference perceptibility of a perturbation: PSNR, SSIM and 8-bit L-inf / L2 norms.

All functions take two ``(B, C, H, W)`` images in [0, 1] of the same shape
(gray and RGBA are adapted by :func:`~antipure_core.metrics.common.to_rgb`)
and return a ``(B,)`` tensor, one value per image pair.

Example:
    >>> x = torch.rand(2, 3, 32, 32)
    >>> psnr(x, x)
    tensor([inf, inf])
"""
from __future__ import annotations

import kornia
import torch
from torch import Tensor

from .common import check_same_shape, to_rgb


def _pair(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    x, y = to_rgb(x, "x"), to_rgb(y, "y")
    check_same_shape(x, y, "x", "y")
    return x.float(), y.float()


def psnr(x: Tensor, y: Tensor) -> Tensor:
    """Peak signal-to-noise ratio ``10 log10(1 / MSE)`` in dB per image, ``(B,)``.

    Range [0, inf]; higher = less perceptible. Identical images give ``inf``
    (no error, no warning); 8/255 uniform sign noise gives about 30 dB.
    """
    x, y = _pair(x, y)
    mse = (x - y).square().flatten(1).mean(1)
    out = torch.full_like(mse, float("inf"))
    nz = mse > 0
    out[nz] = -10 * torch.log10(mse[nz])
    return out


def ssim(x: Tensor, y: Tensor, window_size: int = 11) -> Tensor:
    """Mean structural similarity (Gaussian window, kornia) per image, ``(B,)``.

    Range [-1, 1]; 1 for identical images; higher = less perceptible.
    ``window_size`` (odd) is clipped to the image size so tiny images still work.
    """
    x, y = _pair(x, y)
    w = min(window_size, *x.shape[-2:])
    w -= 1 - w % 2  # kornia needs an odd window
    return kornia.metrics.ssim(x, y, w).flatten(1).mean(1)


def perturbation_norms(x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """L-inf and L2 norms of ``y - x`` after rounding both to 8 bits, each ``(B,)``.

    Quantising first measures the perturbation that a saved PNG actually
    carries. Returned keys:

    * ``linf``: max |δ| in [0, 1] units, range [0, 1];
    * ``linf_255``: the same in 8-bit levels, range [0, 255] (an η = 8/255
      protection reads 8);
    * ``l2``: the Euclidean norm of δ over all C·H·W values, [0, 1] units;
    * ``l2_255``: the same in 8-bit levels.

    Lower = less perceptible for all four.
    """
    x, y = _pair(x, y)
    d = (torch.round(y * 255) - torch.round(x * 255)).flatten(1)
    linf_255 = d.abs().amax(1)
    l2_255 = d.norm(dim=1)
    return {"linf": linf_255 / 255, "linf_255": linf_255, "l2": l2_255 / 255, "l2_255": l2_255}
