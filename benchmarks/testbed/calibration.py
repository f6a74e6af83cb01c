"""Calibration of the testbed's purifier: what GrIDPure does to *clean* photos, and to uniform noise.

A purifier that changes clean photos by more than the protection budget
erases every protection alike and cannot tell them apart. This measures,
on the held-out subjects' photos (never seen in training), with the
testbed's GrIDPure settings (t* = 10, 32-px windows at stride 16 with the
packed corners, γ = 0.1, 2 rounds × 20 iterations):

* ``psnr@k``: PSNR (dB) of the clean photo after k iterations against itself;
* ``drift@k``: colour drift, the mean per-channel shift (purified − clean) in
  1/255, averaged over images as an absolute value per channel (the largest
  channel is reported);
* ``noise_kept``: uniform noise U[−η, η] (η = 8/255) is added to the photos
  and both the noisy and the clean photo are purified with the *same*
  purifier noise (common random numbers); RMSE(purified noisy − purified
  clean) / RMSE(noise) is the share of the noise that survives.

Run ``python -m benchmarks.testbed.calibration --purifier v2`` (or ``v3``).
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Sequence

import torch
from torch import Tensor

from antipure_core.purify_pixel import pixel_gridpure

from .data import SUBJECTS, subject_views
from .experiment import Settings

SNAPSHOTS = (1, 10, 20, 30, 40)


def gridpure_snapshots(adm, x: Tensor, s: Settings, seed: int, snapshots: Sequence[int] = SNAPSHOTS) -> dict[int, Tensor]:
    """GrIDPure on ``x`` ``(B, 3, H, W)`` in [0, 1] with ``s``'s settings; the image after each of ``snapshots``.

    One noise stream (``seed``) runs through all iterations, so the snapshots
    are those of one ``max(snapshots)``-iteration run (GrIDPure's 2 × 20
    continues round 1 in round 2).
    """
    g, y, done, out = torch.Generator().manual_seed(seed), x, 0, {}
    for k in sorted(snapshots):
        y = pixel_gridpure(adm, y, t_star=s.gridpure_t_star, window=s.window, stride=s.stride,
                           iterations=k - done, gamma=s.gridpure_gamma, generator=g)
        out[k], done = y, k
    return out


def _psnr(a: Tensor, b: Tensor) -> Tensor:
    return -10 * torch.log10((a - b).square().flatten(1).mean(1))


def calibrate(adm, photos: Tensor, s: Settings | None = None, eta: float = 8 / 255, seed: int = 0,
              snapshots: Sequence[int] = SNAPSHOTS) -> dict[str, float]:
    """The clean-photo PSNR/drift curve over GrIDPure iterations and the share of uniform noise kept (see module)."""
    s = s or Settings()
    g = torch.Generator().manual_seed(seed + 99)
    noisy = (photos + (torch.rand(photos.shape, generator=g) * 2 - 1) * eta).clamp(0, 1)
    noisy = (noisy * 255).round() / 255  # saved as an 8-bit image, like a protected photo
    clean = gridpure_snapshots(adm, photos, s, seed, snapshots)
    dirty = gridpure_snapshots(adm, noisy, s, seed, snapshots)  # the same purifier noise: common random numbers
    out = {}
    for k in snapshots:
        out[f"psnr@{k}"] = round(float(_psnr(clean[k], photos).mean()), 2)
        shift = (clean[k] - photos).mean((2, 3))  # (B, 3) mean per-channel shift
        out[f"drift@{k}"] = round(float(shift.abs().mean(0).max()) * 255, 2)
    noise_rmse = (noisy - photos).square().flatten(1).mean(1).sqrt()
    kept = (dirty[max(snapshots)] - clean[max(snapshots)]).square().flatten(1).mean(1).sqrt()
    out["noise_rmse"] = round(float(noise_rmse.mean()) * 255, 2)
    out["noise_kept_rmse"] = round(float(kept.mean()) * 255, 2)
    out["noise_kept"] = round(float((kept / noise_rmse).mean()), 3)
    return out


def held_out_photos(n: int = 4, scale: float = 1.0) -> Tensor:
    """The protected photos 1..n of every held-out subject, ``(3 n, 3, 64, 64)``."""
    return torch.cat([subject_views(name, n=n, scale=scale) for name in SUBJECTS])


def main(argv=None) -> dict:
    from .purifier import CalibratedPurifierConfig, PurifierConfig, UnknownPurifierConfig, build_purifier
    from .train import MODELS_DIR

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--purifier", default="v2", help="v2 (testbed v2's purifier), v3 or v3-unknown")
    ap.add_argument("--photos", type=int, default=4, help="photos per held-out subject (default 4)")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = {"v2": PurifierConfig(), "v3": CalibratedPurifierConfig(), "v3-unknown": UnknownPurifierConfig()}[a.purifier]
    adm, info = build_purifier(cfg, MODELS_DIR, verbose=True)  # trains (and caches) v3 if it is not committed
    t0 = time.perf_counter()
    out = calibrate(adm, held_out_photos(a.photos, cfg.data_scale))
    out["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps({"purifier": a.purifier, **out}), flush=True)
    return out


if __name__ == "__main__":
    main()
