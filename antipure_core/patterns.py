"""Procedural target images for target-driven attacks (Mist's textural loss, PhotoGuard's encoder attack)."""
from __future__ import annotations

import math

import torch
from torch import Tensor

PATTERNS = ("texture", "gray")


def target_pattern(h: int, w: int, kind: str = "texture", device=None) -> Tensor:
    """A ``(1, 3, h, w)`` target image in [0, 1].

    ``'texture'``: a high-contrast mix of concentric rings and a 16 px
    checkerboard with colour shifts — structure that an encoder maps far
    from natural images, standing in for Mist's target texture without
    shipping an image asset. ``'gray'``: uniform 0.5 (PhotoGuard's target).
    """
    if kind == "gray":
        return torch.full((1, 3, h, w), 0.5, device=device)
    if kind != "texture":
        raise ValueError(f"target: expected one of {PATTERNS}, got {kind!r}")
    yy, xx = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32),
                            torch.arange(w, device=device, dtype=torch.float32), indexing="ij")
    r = torch.sqrt((yy - h / 2) ** 2 + (xx - w / 2) ** 2)
    rings = 0.5 + 0.5 * torch.sin(r * (2 * math.pi / 12))
    checker = ((torch.div(yy, 16, rounding_mode="floor") + torch.div(xx, 16, rounding_mode="floor")) % 2)
    chans = [rings * checker + (1 - checker) * (1 - rings),
             0.5 + 0.5 * torch.sin(xx * (2 * math.pi / 7)),
             checker * 0.8 + 0.1]
    return torch.stack(chans)[None].clamp(0, 1)
