"""Shared by the metrics: input adaptation (channels, pairing, resizing) and the missing-model error."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..image import check_image


def to_rgb(x: Tensor, name: str = "image") -> Tensor:
    """Check a ``(B, C, H, W)`` image in [0, 1] and return it with 3 channels.

    Documented adaptations: 1 channel (grayscale) is replicated to 3, so every
    metric sees R = G = B (luma-based metrics such as BRISQUE then get the gray
    values back exactly); 4 channels (RGBA) drop the alpha channel. Any other
    channel count raises a ``ValueError`` naming ``name``.
    """
    check_image(x, name, channels=None)
    c = x.shape[1]
    if c == 3:
        return x
    if c == 1:
        return x.expand(-1, 3, -1, -1)
    if c == 4:
        return x[:, :3]
    raise ValueError(f"{name}: expected 1 (gray), 3 (RGB) or 4 (RGBA) channels, got {c}")


def check_same_shape(x: Tensor, y: Tensor, x_name: str, y_name: str) -> None:
    """Raise a ``ValueError`` naming both arguments and shapes unless ``x`` and ``y`` match."""
    if x.shape != y.shape:
        raise ValueError(f"{y_name}: shape {tuple(y.shape)} does not match {x_name} {tuple(x.shape)}; "
                         "full-reference metrics need the same batch size and image size")


def resize_to(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Antialiased bicubic resize of ``(B, C, H, W)`` to ``size = (H', W')``, clamped to [0, 1]."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)


def gaussian_taps(size: int, sigma: float) -> Tensor:
    """Normalised 1-D Gaussian of ``size`` taps around the middle one, float64 (MATLAB fspecial / scipy)."""
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-r.square() / (2 * sigma**2))
    return g / g.sum()


def to_uint8_hwc(x: Tensor) -> list[np.ndarray]:
    """``(B, 3, H, W)`` in [0, 1] -> list of contiguous ``(H, W, 3)`` uint8 arrays (for dlib / scikit-image)."""
    u8 = torch.round(x.detach().float().clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [np.ascontiguousarray(a) for a in u8]


class ModelNotAvailable(RuntimeError):
    """An optional metric's package or weights are missing; the message says how to get them."""


def package_dir(name: str) -> Path | None:
    """Folder of an installed package, found without importing it (its imports may need other packages)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):  # ValueError: blocked in sys.modules
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def import_optional(name: str, hint: str):
    """Import an optional package, turning a broken or missing install into :class:`ModelNotAvailable`."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ModelNotAvailable(f"{name} cannot be imported ({e}): {hint}") from e
