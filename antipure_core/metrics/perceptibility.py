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
import torch.nn.functional as F
from torch import Tensor

from .common import check_same_shape, gaussian_taps, to_rgb


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


def _valid_blur(x: Tensor, g: Tensor) -> Tensor:
    """Separable Gaussian of ``(B, C, H, W)`` without padding: ``(B, C, H - k + 1, W - k + 1)``."""
    c, k = x.shape[1], g.numel()
    x = F.conv2d(x, g.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)
    return F.conv2d(x, g.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)


def ssim(x: Tensor, y: Tensor, window_size: int = 11, sigma: float = 1.5, border: str = "crop") -> Tensor:
    """Mean structural similarity (Wang et al. 2004) per image, ``(B,)``.

    The default is the reference computation of scikit-image's
    ``structural_similarity(x, y, gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=1, channel_axis=...)``: an
    11-tap Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, the SSIM map
    averaged over the pixels at least ``window_size // 2`` from every border
    (where the window lies inside the image) and over the channels, in float64.
    Gray images replicated to RGB give the gray SSIM.

    Args:
        x, y: ``(B, C, H, W)`` in [0, 1], same shape.
        window_size: odd window width; clipped to the image size so tiny
            images still work (then it differs from the reference, which
            refuses images smaller than the window).
        sigma: Gaussian standard deviation in pixels.
        border: ``"crop"`` (the reference) or ``"pad"``: kornia's map with
            reflected borders averaged over every pixel, which weighs border
            pixels the reference leaves out (up to ~5e-3 higher or lower on
            noisy photos); kept for comparison with earlier results.

    Returns:
        ``(B,)`` float32 in [-1, 1]; 1 for identical images; higher = less perceptible.
    """
    x, y = _pair(x, y)
    w = min(window_size, *x.shape[-2:])
    w -= 1 - w % 2  # odd, centred window
    if border == "pad":
        return kornia.metrics.ssim(x, y, w).flatten(1).mean(1)
    if border != "crop":
        raise ValueError(f"border: expected 'crop' (the reference) or 'pad', got {border!r}")
    x, y = x.double(), y.double()
    g = gaussian_taps(w, sigma).to(x.device)
    ux, uy = _valid_blur(x, g), _valid_blur(y, g)
    vx = _valid_blur(x * x, g) - ux * ux
    vy = _valid_blur(y * y, g) - uy * uy
    vxy = _valid_blur(x * y, g) - ux * uy
    c1, c2 = 0.01**2, 0.03**2  # (K * data_range)^2 with data_range 1
    s = (2 * ux * uy + c1) * (2 * vxy + c2) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1).float()


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
