"""Patch-wise frequency transforms, high-frequency masks and Patch-wise Frequency Guidance (PFG).

Images or latents ``(B, C, H, W)`` are split into non-overlapping ``p x p``
patches (H, W multiples of p) and transformed per patch and channel. The
coefficient layout is ``(B, C, H/p, W/p, p, p)``; index ``[..., u, v]`` is the
vertical/horizontal frequency.

Example:
    >>> x = torch.rand(2, 3, 16, 16)
    >>> c = patch_dct(x, 8)                       # (2, 3, 2, 2, 8, 8)
    >>> torch.allclose(patch_idct(c), x, atol=1e-5)
    True
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from einops import rearrange
from torch import Tensor


def dct_matrix(p: int, device=None, dtype=torch.float32) -> Tensor:
    """Orthonormal DCT-II matrix ``D`` with ``D[u, n] = s_u cos(pi (2n + 1) u / 2p)``."""
    n = torch.arange(p, dtype=torch.float64)
    u = n[:, None]
    d = torch.cos(math.pi * (2 * n[None] + 1) * u / (2 * p)) * math.sqrt(2 / p)
    d[0] /= math.sqrt(2)
    return d.to(device=device, dtype=dtype)


def to_patches(x: Tensor, p: int) -> Tensor:
    """``(B, C, H, W)`` -> ``(B, C, H/p, W/p, p, p)``."""
    if x.ndim != 4:
        raise ValueError(f"x: expected (B, C, H, W), got {tuple(x.shape)}")
    if p < 1 or x.shape[-2] % p or x.shape[-1] % p:
        raise ValueError(f"patch_size: H and W ({x.shape[-2]}, {x.shape[-1]}) must be multiples of {p}")
    return rearrange(x, "b c (h p) (w q) -> b c h w p q", p=p, q=p)


def from_patches(c: Tensor) -> Tensor:
    """Inverse of :func:`to_patches`."""
    return rearrange(c, "b c h w p q -> b c (h p) (w q)")


def patch_dct(x: Tensor, p: int = 8) -> Tensor:
    """Orthonormal 2-D DCT-II of every ``p x p`` patch: ``(B, C, H, W)`` -> ``(B, C, H/p, W/p, p, p)``."""
    d = dct_matrix(p, x.device, x.dtype)
    return d @ to_patches(x, p) @ d.T


def patch_idct(c: Tensor) -> Tensor:
    """Exact inverse of :func:`patch_dct` (the DCT matrix is orthonormal)."""
    d = dct_matrix(c.shape[-1], c.device, c.dtype)
    return from_patches(d.T @ c @ d)


def patch_fft(x: Tensor, p: int = 8) -> Tensor:
    """Orthonormal 2-D FFT magnitude-preserving transform per patch, complex ``(B, C, H/p, W/p, p, p)``."""
    return torch.fft.fft2(to_patches(x, p), norm="ortho")


def frequency_radius(p: int, transform: str = "dct", device=None) -> Tensor:
    """``(p, p)`` frequency index ``u + v`` (DCT) or its wrapped equivalent for the FFT layout."""
    idx = torch.arange(p, device=device)
    if transform == "fft":
        idx = torch.minimum(idx, p - idx)  # FFT bins above p/2 are negative frequencies
    elif transform != "dct":
        raise ValueError(f"transform: expected 'dct' or 'fft', got {transform!r}")
    return (idx[:, None] + idx[None, :]).float()


def high_frequency_mask(p: int = 8, k: float | None = None, soft: bool = False,
                        transform: str = "dct", device=None) -> Tensor:
    """``(p, p)`` weights selecting high frequencies.

    Hard (default): 1 where ``u + v >= k`` (``k`` defaults to ``p / 2``), else 0.
    Soft: a smooth ramp ``sigmoid(u + v - k)`` that weights frequencies near
    the threshold partially instead of cutting them off.
    """
    k = p / 2 if k is None else k
    r = frequency_radius(p, transform, device)
    if soft:
        return torch.sigmoid(r - k)
    return (r >= k).float()


REDUCTIONS = ("signed", "magnitude")


def highest_quarter_mean(x: Tensor, patch_size: int = 8, reduction: str = "signed") -> Tensor:
    """Mean over channels and patches of ``(4/s²)·Σ_{u,v = s/2…s−1} DCT_s(x)[u, v]``, shape ``(B,)``.

    The bottom-right (highest-frequency) quarter of every ``s x s`` patch's
    orthonormal DCT-II coefficients, averaged. ``reduction='signed'`` sums the
    coefficients as written in the published formula; ``'magnitude'`` sums
    their absolute values (so opposite-phase patches do not cancel).

    Args:
        x: ``(B, C, H, W)`` with H, W multiples of ``patch_size``.
        patch_size: s, even and >= 2.
    """
    if patch_size < 2 or patch_size % 2:
        raise ValueError(f"patch_size: must be even and >= 2 (the DCT quarter u, v >= s/2), got {patch_size}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    q = patch_dct(x, patch_size)[..., patch_size // 2:, patch_size // 2:]
    if reduction == "magnitude":
        q = q.abs()
    return q.flatten(1).mean(1)


@dataclass(frozen=True)
class FrequencyGuidance:
    """Patch-wise Frequency Guidance (PFG, DESIGN §1.1): ``L_fre = σ(highest_quarter_mean(x̂₀))``, maximised.

    ``x̂₀`` is the purifier's one-step estimate of the clean image from the
    attack's ``x_t``, in the purifier's image range [−1, 1] (decoded through
    the VAE first when the purifier is a latent model). The total objective
    adds ``weight · e^{ᾱ_t − 1} · L_fre``.

    Attributes:
        weight: λ₁ (0.5 in the paper).
        patch_size: s, the DCT patch side in pixels. The paper does not state
            it; 8 (the JPEG block) is our choice.
        reduction: ``'signed'`` (the formula as published, our default) or
            ``'magnitude'`` (absolute coefficients), see :func:`highest_quarter_mean`.
        share: ``None`` (default): λ₁ is ``weight`` at every step. ``s`` in (0, 1): each PGD step
            rescales PFG's weighted term so that, with ``g_pfg`` its image gradient and ``g_rest``
            that of the other terms together, ``‖g_pfg‖ / (‖g_pfg‖ + ‖g_rest‖) = s`` for each image
            (:func:`~antipure_core.objective_terms.share_scale`); only the sign of ``weight`` then
            matters. Our option, not the paper's: a fixed λ₁ lets PFG's pull be negligible or
            dominant depending on the image and t.
    """

    weight: float = 0.5
    patch_size: int = 8
    reduction: str = "signed"
    share: Optional[float] = None

    def __post_init__(self):
        if self.share is not None and (isinstance(self.share, bool) or not isinstance(self.share, (int, float))
                                       or not 0 < self.share < 1):
            raise ValueError(f"share: PFG's share of the step gradient must be a number in (0, 1) exclusive, or "
                             f"None for the fixed weight λ₁, got {self.share!r}")
        if self.patch_size < 2 or self.patch_size % 2:
            raise ValueError(f"patch_size: must be even and >= 2, got {self.patch_size}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {self.reduction!r}")


def pfg_loss(x0_hat: Tensor, cfg: FrequencyGuidance) -> Tensor:
    """L_fre ``(B,)`` in (0, 1): the sigmoid of the mean highest-quarter DCT coefficient of ``x0_hat``.

    Args:
        x0_hat: the purifier's one-step estimate ``(B, 3, H, W)`` in its image range [−1, 1],
            H and W multiples of ``cfg.patch_size``.
    """
    return torch.sigmoid(highest_quarter_mean(x0_hat.float(), cfg.patch_size, cfg.reduction))
