"""Conversion between the host's IMAGE (B, H, W, C) and the core's (B, 3, H, W), with documented adaptations."""
from __future__ import annotations

import torch


def to_core(image: torch.Tensor, name: str = "image") -> tuple[torch.Tensor, torch.Tensor | None]:
    """IMAGE ``(B, H, W, C)`` -> core ``(B, 3, H, W)`` float32, plus the alpha channel if any.

    Grayscale (C = 1) is replicated to RGB; RGBA keeps its alpha aside so
    :func:`to_host` can re-attach it unchanged.
    """
    if not isinstance(image, torch.Tensor) or image.ndim != 4:
        raise ValueError(f"{name}: expected an IMAGE batch (B, H, W, C), got "
                         f"{tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__}")
    c = image.shape[-1]
    if c not in (1, 3, 4):
        raise ValueError(f"{name}: expected 1, 3 or 4 channels, got {c}")
    alpha = image[..., 3:4].clone() if c == 4 else None
    rgb = image[..., :3] if c >= 3 else image.expand(*image.shape[:-1], 3)
    return rgb.movedim(-1, 1).float().contiguous(), alpha


def to_host(x: torch.Tensor, alpha: torch.Tensor | None = None) -> torch.Tensor:
    """Core ``(B, 3, H, W)`` -> IMAGE ``(B, H, W, 3 or 4)`` on the CPU."""
    out = x.detach().movedim(1, -1).float().cpu()
    if alpha is not None:
        out = torch.cat([out, alpha.to(out)], dim=-1)
    return out.contiguous()
