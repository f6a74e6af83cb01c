"""Random-weight ADM UNets (guided-diffusion layout): the demo's pixel purifier and the tests' tiny one.

Random weights show that the plumbing works (files, loader, purifiers, attack), not protection efficacy.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from antipure_core.adm import ADMConfig, ADMUNet

#: two levels, attention (2 heads of 32 channels) at the second, every feature of the 256 px release
TINY = ADMConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_ds=(2,), num_head_channels=32)


def random_adm(config: ADMConfig = TINY, seed: int = 0) -> ADMUNet:
    """An :class:`ADMUNet` with random weights everywhere (norms near 1), eval mode, gradients off."""
    g = torch.Generator().manual_seed(seed)
    unet = ADMUNet(config)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if p.ndim == 1:
                p.copy_(1 + 0.1 * r if name.endswith("weight") else 0.1 * r)
            else:
                p.copy_(r / p[0].numel() ** 0.5)
    return unet.eval().requires_grad_(False)


def save_random_adm(path: str | Path, config: ADMConfig = TINY, seed: int = 0) -> Path:
    """Write a random ADM's state dict, unprefixed as guided-diffusion saves it, to ``path`` (.safetensors)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(random_adm(config, seed).state_dict(), str(path))
    return path
