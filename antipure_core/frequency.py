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


@dataclass(frozen=True)
class FrequencyGuidance:
    """Parameters of Patch-wise Frequency Guidance (DESIGN §1.1).

    Attributes:
        weight: lambda_pfg, the loss weight (minimised term).
        patch_size: p, patch side in pixels (or latent cells when ``space='latent'``).
        threshold: k for the mask ``u + v >= k``; ``None`` means ``p / 2``.
        soft_mask: use the smooth ramp instead of the hard threshold.
        transform: ``'dct'`` (orthonormal DCT-II) or ``'fft'``.
        space: ``'pixel'`` compares the decoded purified estimate with x';
            ``'latent'`` is the cheap variant that skips the decoder and
            compares the purified latent estimate with E(x').
        t_star: upper end of the simulated purification timestep t_p ~ U(0, t*],
            as a fraction of the schedule (0.3 = 300 of 1000).
    """

    weight: float = 1.0
    patch_size: int = 8
    threshold: float | None = None
    soft_mask: bool = False
    transform: str = "dct"
    space: str = "pixel"
    t_star: float = 0.3

    def __post_init__(self):
        if self.patch_size < 1:
            raise ValueError(f"patch_size: must be >= 1, got {self.patch_size}")
        if self.transform not in ("dct", "fft"):
            raise ValueError(f"transform: expected 'dct' or 'fft', got {self.transform!r}")
        if self.space not in ("pixel", "latent"):
            raise ValueError(f"space: expected 'pixel' or 'latent', got {self.space!r}")
        if not 0 < self.t_star <= 1:
            raise ValueError(f"t_star: must be in (0, 1] (fraction of the schedule), got {self.t_star}")


def high_frequency_distance(a: Tensor, b: Tensor, mask: Tensor, transform: str = "dct") -> Tensor:
    """Per-sample mean of ``|M ⊙ (T(a) − T(b))|²`` over patches, channels and frequencies, shape ``(B,)``."""
    p = mask.shape[-1]
    if transform == "dct":
        diff = patch_dct(a - b, p)  # linear transform: T(a) - T(b) = T(a - b)
        sq = diff.square()
    else:
        sq = patch_fft(a - b, p).abs().square()
    return (sq * mask).flatten(1).mean(1)


def pfg_loss(purified: Tensor, reference: Tensor, cfg: FrequencyGuidance) -> Tensor:
    """L_pfg: high-frequency patch-spectrum distance between a purified estimate and x' (or their latents).

    Both inputs ``(B, C, H, W)`` with H, W multiples of ``cfg.patch_size``;
    returns ``(B,)``. Minimising it makes purification keep the perturbation's
    patch-aligned high frequencies.
    """
    mask = high_frequency_mask(cfg.patch_size, cfg.threshold, cfg.soft_mask, cfg.transform, purified.device)
    return high_frequency_distance(purified.float(), reference.float(), mask, cfg.transform)
