"""Boundary checks, size adaptation and 8-bit quantisation for ``(B, C, H, W)`` images in [0, 1]."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def check_image(x: Tensor, name: str = "image", channels: int | None = 3) -> None:
    """Raise a ``ValueError`` naming ``name`` unless ``x`` is a finite ``(B, C, H, W)`` tensor in [0, 1]."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"{name}: expected shape (B, C, H, W), got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name}: the batch is empty")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{name}: expected {channels} channels, got {x.shape[1]} "
                         "(convert grayscale/alpha images to RGB first)")
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected a float tensor in [0, 1], got {x.dtype}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name}: contains NaN or inf values")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > 1:
        raise ValueError(f"{name}: values must lie in [0, 1], got [{lo:.4g}, {hi:.4g}]")


def pad_to_multiple(x: Tensor, multiple: int) -> tuple[Tensor, tuple[int, int]]:
    """Reflect-pad ``x`` at the bottom/right so H and W are multiples of ``multiple``.

    Returns the padded tensor and the original ``(H, W)`` for :func:`crop_to`.
    Reflection (replicate for tiny images) avoids the hard edge that zero
    padding would give the encoder.
    """
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x, (h, w)
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode), (h, w)


def crop_to(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Undo :func:`pad_to_multiple`."""
    return x[..., : size[0], : size[1]]


def project_linf(x_adv: Tensor, x: Tensor, eta: float) -> Tensor:
    """Project ``x_adv`` onto ``{|x_adv - x|_inf <= eta} ∩ [0, 1]``."""
    return torch.minimum(torch.maximum(x_adv, x - eta), x + eta).clamp(0, 1)


def quantize_within_budget(x_adv: Tensor, x: Tensor, eta: float, levels: int = 255) -> Tensor:
    """Round ``x_adv`` to 8-bit levels while keeping ``|q - x|_inf <= eta`` exactly.

    Plain rounding can push a pixel half a level past the budget, so each
    pixel is rounded and then clamped to the integer levels inside
    ``[max(x - eta, 0), min(x + eta, 1)]``. Where no level lies inside that
    interval (``eta`` below one level and ``x`` off the 8-bit grid) the input
    value is kept, which is within budget by definition.
    """
    tol = 1e-6  # absorbs float error in levels * (x ± eta), e.g. 255 * (8/255)
    lo = torch.ceil(((x - eta).clamp(0, 1) * levels) - tol)
    hi = torch.floor(((x + eta).clamp(0, 1) * levels) + tol)
    q = torch.round(x_adv * levels).clamp(lo, hi) / levels
    q = torch.where(lo <= hi, q, x)
    # the tolerance must never buy a level that is outside the budget in float
    return torch.where((q - x).abs() <= eta + 1e-7, q, x)


def check_budget(eta: float, alpha: float | None = None, steps: int | None = None) -> None:
    """Raise a ``ValueError`` naming the argument for a bad PGD budget."""
    if not isinstance(eta, (int, float)) or math.isnan(eta) or not 0 < eta <= 1:
        raise ValueError(f"eta: must be in (0, 1] (pixel scale, e.g. 8/255 = {8/255:.4f}), got {eta}")
    if alpha is not None and (math.isnan(alpha) or alpha <= 0):
        raise ValueError(f"alpha: step size must be > 0 (pixel scale, e.g. 1/255), got {alpha}")
    if steps is not None and (not isinstance(steps, int) or steps < 0):
        raise ValueError(f"steps: must be an integer >= 0, got {steps}")
