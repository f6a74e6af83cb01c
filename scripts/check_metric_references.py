"""Measure how far the pack's SSIM, BRISQUE and FID distance are from their reference implementations.

    python scripts/check_metric_references.py

* SSIM vs scikit-image ``structural_similarity(gaussian_weights=True,
  sigma=1.5, use_sample_covariance=False, data_range=1)`` on scikit-image's
  photos (full size) under five distortions, for ``border='crop'`` (default)
  and ``border='pad'``.
* BRISQUE vs the published outputs of the authors' MATLAB release on the five
  TID2013 images in ``tests/data/tid2013`` (source: see the tests).
* The Fréchet distance vs scipy's ``sqrtm`` formula (pytorch-fid / TTUR) and,
  where torch-fidelity imports fully (torchvision present), vs its own
  ``fid_statistics_to_metric``, on random statistics.
"""
from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from antipure_core.metrics.fid import frechet_distance  # noqa: E402
from antipure_core.metrics.perceptibility import ssim  # noqa: E402
from antipure_core.metrics.quality import brisque  # noqa: E402

PHOTOS = ("astronaut", "camera", "coffee", "chelsea", "brick", "rocket", "coins", "page")
# published by chaofengc/IQA-PyTorch, ResultsCalibra/results_official.csv, row "brisque"
BRISQUE_MATLAB_RELEASE = {"I03": 94.6421, "I04": -0.107618, "I06": 0.992889, "I08": 5.35827, "I19": 72.2617}


def _jpeg(a: np.ndarray, quality: int = 30) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(np.round(a * 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(buf)).astype(np.float64) / 255


def ssim_deviation() -> None:
    from skimage import data
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(0)
    worst = {"crop": 0.0, "pad": 0.0}
    pairs = 0
    for name in PHOTOS:
        a = getattr(data, name)().astype(np.float64) / 255
        if a.ndim == 3:
            a = a[..., :3]
        distorted = {
            "noise 0.05": np.clip(a + 0.05 * rng.standard_normal(a.shape), 0, 1),
            "sign 8/255": np.clip(a + 8 / 255 * np.sign(rng.standard_normal(a.shape)), 0, 1),
            "box blur 3": sum(np.roll(np.roll(a, i, 0), j, 1) for i in (-1, 0, 1) for j in (-1, 0, 1)) / 9,
            "contrast 0.8": a * 0.8 + 0.1,
            "jpeg q30": _jpeg(a),
        }
        for b in distorted.values():
            kw = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1)
            if a.ndim == 3:
                ref = structural_similarity(a, b, channel_axis=2, **kw)
                x, y = (torch.from_numpy(t).permute(2, 0, 1)[None] for t in (a, b))
            else:
                ref = structural_similarity(a, b, **kw)
                x, y = (torch.from_numpy(t)[None, None] for t in (a, b))
            for border in worst:
                worst[border] = max(worst[border], abs(ssim(x, y, border=border).item() - float(ref)))
            pairs += 1
    print(f"SSIM: {pairs} photo/distortion pairs ({', '.join(PHOTOS)}); max |pack - scikit-image|: "
          f"border='crop' (default) {worst['crop']:.2e}, border='pad' {worst['pad']:.2e}")


def brisque_deviation() -> None:
    names = list(BRISQUE_MATLAB_RELEASE)
    x = torch.cat([torch.from_numpy(np.asarray(Image.open(ROOT / "tests/data/tid2013" / f"{n}.bmp").convert("RGB"))
                                    .copy()).permute(2, 0, 1)[None].float() / 255 for n in names])
    for name, score in zip(names, brisque(x).tolist()):
        ref = BRISQUE_MATLAB_RELEASE[name]
        print(f"BRISQUE {name}: pack {score:.4f}, MATLAB release {ref:.4f}, difference {score - ref:+.2e}")


def frechet_deviation() -> None:
    from scipy import linalg

    rng = np.random.default_rng(0)
    worst_scipy, worst_tf, tf = 0.0, 0.0, None
    try:
        from torch_fidelity.metric_fid import fid_statistics_to_metric as tf
    except ImportError as e:
        print(f"(torch-fidelity's fid_statistics_to_metric not importable here: {e})")
    for dim, n in ((16, 100), (64, 500), (256, 1000)):
        a = rng.standard_normal((n, dim)) @ rng.standard_normal((dim, dim))
        b = 0.3 + rng.standard_normal((n, dim)) @ rng.standard_normal((dim, dim))
        mu1, s1, mu2, s2 = a.mean(0), np.cov(a.T), b.mean(0), np.cov(b.T)
        ours = frechet_distance(*(torch.from_numpy(t) for t in (mu1, s1, mu2, s2)))
        covmean = linalg.sqrtm(s1 @ s2).real
        ref = float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))
        worst_scipy = max(worst_scipy, abs(ours - ref) / ref)
        if tf is not None:
            other = tf({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, False)["frechet_inception_distance"]
            worst_tf = max(worst_tf, abs(ours - other) / other)
    print(f"Frechet distance, dims 16/64/256: max relative difference vs scipy sqrtm {worst_scipy:.1e}"
          + (f", vs torch-fidelity {worst_tf:.1e}" if tf is not None else ""))


if __name__ == "__main__":
    torch.set_num_threads(1)
    ssim_deviation()
    brisque_deviation()
    frechet_deviation()
