"""No-reference patch-grid artifact scores from the patch DCT (ours).

Protective perturbations that survive purification show up as a grid
aligned with the ``p x p`` patch (VAE) grid. A pattern ``g`` that repeats
with period ``p`` adds the *same* DCT coefficients ``G[u, v]`` to every
patch, whereas image content changes from patch to patch. So the component
of the patch spectra that is consistent across patches measures the grid.
(Equivalently, the mean patch is the projection of the image onto
``p``-periodic images, and its spectrum is the full-image spectrum sampled at
the grid frequencies ``k H/p, l W/p``.)

Images whose H or W is not a multiple of ``p`` are cropped at the bottom/right
to the largest multiple (documented adaptation; the grid is anchored at the
top-left corner, as the VAE's is).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..frequency import high_frequency_mask, patch_dct
from .common import to_rgb


def _patch_coefficients(x: Tensor, patch_size: int, name: str) -> Tensor:
    """``(B, C, H, W)`` -> DCT coefficients ``(B, C, N, p, p)`` over the N patches."""
    x = to_rgb(x, name).double()  # float32 rounding of a flat image would look like a faint grid
    if patch_size < 2:
        raise ValueError(f"patch_size: must be >= 2, got {patch_size}")
    h, w = (s - s % patch_size for s in x.shape[-2:])
    if h == 0 or w == 0:
        raise ValueError(f"{name}: image {tuple(x.shape[-2:])} is smaller than one {patch_size}x{patch_size} patch")
    c = patch_dct(x[..., :h, :w], patch_size)
    return c.flatten(2, 3)


def _textured(patch_ac_energy: Tensor, c: Tensor) -> Tensor:
    """True where the mean AC energy per coefficient exceeds float rounding, i.e. the image is not flat."""
    return patch_ac_energy / (c.shape[1] * c.shape[-1] ** 2) > 1e-20


def grid_artifact_score(x: Tensor, patch_size: int = 8) -> Tensor:
    """Share of the AC patch-DCT energy that repeats identically in every patch, ``(B,)``.

    With ``C_n[u, v]`` the coefficients of patch ``n`` (N patches, per channel),
    ``M = mean_n C_n`` and ``S = mean_n (C_n - M)^2``:

        score = max(sum M^2 - sum S / (N - 1), 0) / sum (M^2 + S)

    with sums over channels and all ``(u, v) != (0, 0)``. The denominator is
    the mean AC energy of a patch; ``sum M^2`` is the energy of the periodic
    (mean-patch) component, from which its sampling bias ``S / (N - 1)`` is
    removed so that content without a grid (and i.i.d. noise) scores about 0
    whatever the number of patches.

    Range [0, 1]; higher = stronger grid. A pure ``p``-periodic pattern
    scores 1; natural photos score near 0. Flat images (no AC energy) score 0.
    Global smooth gradients also repeat across patches and raise the score a
    little; the DC term (brightness) is excluded.

    Args:
        x: images ``(B, C, H, W)`` in [0, 1].
        patch_size: grid period ``p`` in pixels (8 for SD's VAE).
    """
    c = _patch_coefficients(x, patch_size, "x")
    n = c.shape[2]
    if n < 2:
        raise ValueError(f"x: image {tuple(x.shape[-2:])} has a single {patch_size}x{patch_size} patch; "
                         "a grid needs at least two")
    mean = c.mean(2)  # (B, C, p, p)
    spread = (c - mean[:, :, None]).square().mean(2)
    ac = torch.ones(patch_size, patch_size, dtype=c.dtype, device=c.device)
    ac[0, 0] = 0
    periodic = (mean.square() * ac).sum((1, 2, 3))
    scatter = (spread * ac).sum((1, 2, 3))
    total = periodic + scatter
    score = (periodic - scatter / (n - 1)).clamp_min(0) / total.clamp_min(1e-30)
    return torch.where(_textured(total, c), score, torch.zeros_like(score)).float()


def high_frequency_ratio(x: Tensor, patch_size: int = 8, k: float | None = None) -> Tensor:
    """Share of the AC patch-DCT energy at high frequencies ``u + v >= k``, ``(B,)``.

    ``k`` defaults to ``p / 2`` (the PFG mask of :mod:`antipure_core.frequency`).
    The DC coefficient (patch brightness) is excluded from the total so the
    ratio does not depend on brightness. Range [0, 1]; higher = more
    high-frequency content (noise, grids, texture); flat images give 0.
    """
    c = _patch_coefficients(x, patch_size, "x")
    energy = c.square().sum((1, 2))  # (B, p, p)
    mask = high_frequency_mask(patch_size, k, device=c.device).to(c.dtype)
    energy[:, 0, 0] = 0
    total = energy.sum((1, 2))
    hf = (energy * mask).sum((1, 2))
    return torch.where(_textured(total / c.shape[2], c), hf / total.clamp_min(1e-30), torch.zeros_like(total)).float()
