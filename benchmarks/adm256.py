"""The full-size guided-diffusion ADM-256 (random weights) and its bare attack work, for ``bench_protect --purifier adm``.

The architecture is read from the released checkpoint's key list
(``tests/core/fixtures/adm_256x256_uncond_keys.json``: 566 tensors,
552,814,086 parameters) by the pack's own config inference, built on the meta
device, checked key for key and shape for shape against the list, then
materialised with random weights (timing does not depend on weight values) and
loaded through the same path as a real checkpoint (``adm_from_state_dict``).
"""
from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
KEYS = ROOT / "tests" / "core" / "fixtures" / "adm_256x256_uncond_keys.json"


def build_adm256(pack, dtype: torch.dtype, device: torch.device, seed: int = 0, small: bool = False):
    """A :class:`PixelDiffusion` with the ADM-256's exact architecture and random weights in ``dtype`` on ``device``.

    ``small``: one residual block per level instead of two (every other feature as released), for quick smoke
    runs of a benchmark; not the released architecture, so timings from it are not the ADM-256's.
    """
    adm = importlib.import_module(f"{pack.__name__}.antipure_core.adm")
    pixel = importlib.import_module(f"{pack.__name__}.antipure_core.pixel_diffusion")
    # the pack's random-weight filler (norms 1/0, weights N(0, 1/fan_in) tiled from one pool)
    from antipure.random_checkpoint import _Noise, _random_state
    shapes = json.loads(KEYS.read_text())
    cfg = adm.infer_config({k: torch.empty(s, device="meta") for k, s in shapes.items()}, name=KEYS.name)
    if small:
        cfg = dataclasses.replace(cfg, num_res_blocks=1)
    with torch.device("meta"):
        unet = adm.ADMUNet(cfg)
    built = {k: list(v.shape) for k, v in unet.state_dict().items()}
    if not small and built != shapes:
        diff = sorted(set(built) ^ set(shapes)) or [k for k in built if built[k] != shapes[k]]
        raise RuntimeError(f"the ADM built from {KEYS.name} differs from it: {diff[:5]}")
    sd = {k: v.to(dtype) for k, v in _random_state(unet, _Noise(seed)).items()}
    del unet
    model = pixel.PixelDiffusion(adm.adm_from_state_dict(sd, name="random ADM-256" + " (small)" * small))
    return model.eval().requires_grad_(False).to(device)


class BareADM:
    """The module calls of one AntiPure step on the pixel purifier, with no core logic: per window, the
    UNet forward + backward at t ~ U{1..t^p} and the stop-gradient forward at t_err = t + t^p."""

    def __init__(self, purifier, windows_of, t_purify: int = 10):
        self.unet, self.windows_of, self.t_purify = purifier.unet, windows_of, t_purify

    def __call__(self, method: str, x: torch.Tensor):
        if method != "antipure":
            raise ValueError(f"--methods: the ADM bare work is defined for antipure only, got {method}")
        with torch.enable_grad():
            for tile in self.windows_of(x * 2 - 1):
                t = torch.randint(0, self.t_purify, (len(tile),), device=tile.device)
                out = self.unet(tile.detach().requires_grad_(True), t)[:, :3]
                with torch.no_grad():
                    self.unet(tile, t + self.t_purify)
                out.float().backward(torch.randn(out.shape, device=out.device))
