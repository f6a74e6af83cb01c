"""A random-weight FID Inception-v3 file in the layout of the standard weights, for FID tests.

The architecture is torch-fidelity's own (as the pack loads it); its
batch-norm statistics are set from one batch of random images so the pool
features have unit scale instead of vanishing through 90 random layers.
"""
from __future__ import annotations

from pathlib import Path
from unittest import mock

import torch

from antipure_core.metrics.fid import INCEPTION_FILES, _inception_module


def save_random_inception(folder: Path, seed: int = 0, name: str = INCEPTION_FILES[0]) -> Path:
    """Write ``folder/name`` (pytorch-fid's file name by default) with random weights; returns its path."""
    module = _inception_module()
    cls = module.FeatureExtractorInceptionV3
    # build without weights: torch-fidelity would otherwise download or load its file
    with mock.patch.object(module, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(cls, "load_state_dict", lambda self, state_dict, strict=True: None):
        torch.manual_seed(seed)
        net = cls("inception-v3-compat", ["2048"])
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average: the statistics of exactly the calibration batch
            m.train()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        net(torch.randint(0, 256, (4, 3, 64, 64), generator=g, dtype=torch.uint8))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    torch.save(net.state_dict(), path)
    return path
