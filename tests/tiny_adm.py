"""Tiny random-weight ADM UNets (guided-diffusion layout) for core and host tests."""
from __future__ import annotations

from antipure.random_pixel import TINY, random_adm
from antipure_core.adm import ADMConfig
from antipure_core.pixel_diffusion import PixelDiffusion

__all__ = ["TINY", "random_adm", "tiny_pixel_diffusion"]


def tiny_pixel_diffusion(config: ADMConfig = TINY, seed: int = 0) -> PixelDiffusion:
    return PixelDiffusion(random_adm(config, seed)).eval().requires_grad_(False)
