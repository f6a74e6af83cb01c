"""Fréchet Inception Distance (Heusel et al. 2017) with torch-fidelity's TensorFlow-compatible Inception-v3.

The network is torch-fidelity's ``FeatureExtractorInceptionV3`` (the FID
Inception of the original TensorFlow code, including its TF-1.x bilinear
resize to 299x299 of 8-bit images); its 2048-d pool features of each set give
a mean and covariance, and

    FID = |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2)).

Nothing is downloaded. The weights are the standard FID Inception weights,
supplied by the user in ``weights_dir`` (the node passes ``models/antipure``)
under either published name (see :data:`INCEPTION_FILES`). They are read with
``torch.load(weights_only=True)``; torch-fidelity receives the
checked tensors in memory (its own loader would unpickle with
``weights_only=False``).

torch-fidelity's package ``__init__`` imports torchvision for its other
extractors; the Inception module needs only torch, so without torchvision
it is loaded on its own (``pip install --no-deps torch-fidelity==0.4.0``).
"""
from __future__ import annotations

import importlib
import io
import os
import sys
import types
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .common import ModelNotAvailable, package_dir, to_rgb, to_uint8_hwc
from .optional import load_weights

# pytorch-fid's and torch-fidelity's names of the same converted TF Inception (2015-12-05) weights
INCEPTION_FILES = ("pt_inception-2015-12-05-6726825d.pth", "weights-inception-2015-12-05-6726825d.pth")
FID_INSTALL = "pip install --no-deps torch-fidelity==0.4.0"
MIN_IMAGES = 2  # a covariance needs two samples; FID from few images is strongly biased upwards


class TooFewImages(ValueError):
    """A set is below :data:`MIN_IMAGES`; FID has no covariance to compare."""


def _inception_module() -> types.ModuleType:
    """torch-fidelity's ``feature_extractor_inceptionv3`` module, with or without torchvision installed."""
    name = "torch_fidelity.feature_extractor_inceptionv3"
    before = {k: v for k, v in sys.modules.items() if k.split(".")[0] == "torch_fidelity"}
    try:
        return importlib.import_module(name)
    except ImportError as e:
        root = package_dir("torch_fidelity")
        if root is None or not (root / "feature_extractor_inceptionv3.py").is_file():
            raise ModelNotAvailable(f"FID needs torch-fidelity's Inception-v3: {FID_INSTALL}") from e
    # the package __init__ failed (torchvision): import the module under a bare package, then restore
    # sys.modules so a later ``import torch_fidelity`` behaves as without us
    for k in [k for k in sys.modules if k.split(".")[0] == "torch_fidelity"]:
        del sys.modules[k]
    bare = types.ModuleType("torch_fidelity")
    bare.__path__ = [str(root)]
    sys.modules["torch_fidelity"] = bare
    try:
        return importlib.import_module(name)
    finally:
        for k in [k for k in sys.modules if k.split(".")[0] == "torch_fidelity"]:
            del sys.modules[k]
        sys.modules.update(before)


def find_inception(weights_dir: str | os.PathLike | None) -> Path:
    """Path of the FID Inception weights; raises :class:`ModelNotAvailable` saying which file to put where."""
    folder = Path(weights_dir) if weights_dir else None
    for name in INCEPTION_FILES:
        if folder is not None and (folder / name).is_file():
            return folder / name
    where = str(folder) if folder else "<weights_dir> (pass weights_dir)"
    raise ModelNotAvailable(f"FID needs the standard FID Inception weights: put pytorch-fid's {INCEPTION_FILES[0]} "
                            f"(or torch-fidelity's {INCEPTION_FILES[1]}) in {where}")


@lru_cache(maxsize=1)
def _inception(path: Path, mtime: float) -> torch.nn.Module:
    module = _inception_module()
    state = load_weights(path)
    buf = io.BytesIO()
    torch.save({k: v.float() for k, v in state.items()}, buf)  # plain tensors only: safe for its loader
    buf.seek(0)
    try:
        return module.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=buf)
    except RuntimeError as e:  # load_state_dict: missing / unexpected keys or shapes
        raise ModelNotAvailable(f"{path} is not the FID Inception-v3 weights ({str(e).splitlines()[0]}); "
                                f"replace it with pytorch-fid's {INCEPTION_FILES[0]}") from None


def inception_features(x: Tensor, weights_dir: str | os.PathLike | None = None, batch_size: int = 8) -> Tensor:
    """2048-d pool3 features of ``(B, C, H, W)`` images in [0, 1], ``(B, 2048)`` float64.

    Images are quantised to 8 bits (the network's input type) and resized to
    299x299 inside the network; they run on the CPU in batches of ``batch_size``.
    """
    path = find_inception(weights_dir)
    net = _inception(path, path.stat().st_mtime)  # a replaced file is loaded again
    u8 = torch.from_numpy(np.stack(to_uint8_hwc(to_rgb(x, "x")))).permute(0, 3, 1, 2)
    with torch.no_grad():
        return torch.cat([net(u8[i:i + batch_size])[0].double() for i in range(0, len(u8), batch_size)])


def _above_rounding(eigenvalues: Tensor) -> Tensor:
    """Eigenvalues with those at rounding level set to 0 (numerical rank, as ``matrix_rank`` decides it).

    A set of N images has a covariance of rank N - 1 at most; the square roots
    of its ~2048 - N zero eigenvalues would otherwise add up rounding noise.
    """
    tol = eigenvalues.abs().max() * eigenvalues.numel() * torch.finfo(eigenvalues.dtype).eps
    return torch.where(eigenvalues > tol, eigenvalues, torch.zeros_like(eigenvalues))


def frechet_distance(mu_a: Tensor, cov_a: Tensor, mu_b: Tensor, cov_b: Tensor) -> float:
    """Fréchet distance of two Gaussians ``N(mu, cov)``, ``(D,)`` and ``(D, D)``, in float64.

    ``tr((S_a S_b)^(1/2))`` is the sum of square roots of the eigenvalues of
    the symmetric ``S_a^(1/2) S_b S_a^(1/2)`` (same spectrum), which stays
    real for the singular covariances of small sets.
    """
    mu_a, mu_b, cov_a, cov_b = (t.double() for t in (mu_a, mu_b, cov_a, cov_b))
    w, v = torch.linalg.eigh(cov_a)
    root_a = (v * _above_rounding(w).sqrt()) @ v.T
    m = root_a @ cov_b @ root_a
    tr_sqrt = _above_rounding(torch.linalg.eigvalsh((m + m.T) / 2)).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * tr_sqrt)


def feature_statistics(features: Tensor, name: str = "features") -> tuple[Tensor, Tensor]:
    """Mean ``(D,)`` and unbiased covariance ``(D, D)`` of ``(N, D)`` features (N >= :data:`MIN_IMAGES`)."""
    if features.shape[0] < MIN_IMAGES:
        raise TooFewImages(f"{name}: FID needs at least {MIN_IMAGES} images in each set, got {features.shape[0]}")
    f = features.double()
    return f.mean(0), torch.cov(f.T)


def fid(x: Tensor, y: Tensor, weights_dir: str | os.PathLike | None = None,
        names: tuple[str, str] = ("x", "y")) -> float:
    """FID between the image sets ``x`` and ``y`` (each ``(N, C, H, W)`` in [0, 1], any sizes), a float >= 0.

    0 for identical sets; higher = the sets' Inception statistics differ more.
    Published FIDs use thousands of images; with a handful the value is
    biased upwards and only comparable between runs of the same set sizes.
    ``names`` name the two sets in error messages.

    Raises:
        TooFewImages: a set has fewer than :data:`MIN_IMAGES` images.
        ModelNotAvailable: torch-fidelity or the weights are missing or wrong (message: what to put where).
    """
    for t, name in zip((x, y), names):
        if t.shape[0] < MIN_IMAGES:
            raise TooFewImages(f"{name}: FID needs at least {MIN_IMAGES} images in each set, got {t.shape[0]}")
    stats = [feature_statistics(inception_features(t, weights_dir), n) for t, n in zip((x, y), names)]
    return max(frechet_distance(*stats[0], *stats[1]), 0.0)
