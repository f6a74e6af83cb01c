"""BRISQUE no-reference image quality (Mittal, Moorthy, Bovik, IEEE TIP 2012).

The 36 natural-scene-statistics features are computed here in torch
(float64) following the authors' MATLAB release (``brisque_feature.m``,
``estimateggdparam.m``, ``estimateaggdparam.m``, ``imresize``): MSCN
coefficients of the 8-bit luma with a 7x7 Gaussian window (sigma 7/6, C = 1),
a GGD fit of the MSCN field and AGGD fits of its four pairwise products, at
full and half scale. The trained predictor is the standard LIVE-trained
epsilon-SVR (RBF, gamma 0.05, 770 support vectors) and its feature ranges,
read as data from the files that the PyPI package ``brisque`` ships
(``brisque/models/svm.txt``, ``normalize.pickle``). That package is never
imported (it needs OpenCV and libsvm at import time); its pickle is read with
an unpickler that refuses every global, so only plain lists and floats load.

Nothing is downloaded: without the package, :func:`brisque` raises
:class:`ModelNotAvailable` whose message says what to install.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

from .common import ModelNotAvailable, package_dir, to_rgb

BRISQUE_INSTALL_HINT = "pip install brisque==0.2.0 (ships the LIVE-trained BRISQUE SVR model)"
_GAMMA_GRID = torch.arange(200, 10001, dtype=torch.float64) / 1000  # MATLAB's 0.2:0.001:10
# MATLAB rgb2gray weights (ITU-R BT.601 luma as MATLAB rounds them)
_LUMA = (0.298936021293775, 0.587043074451121, 0.114020904255103)


@dataclass(frozen=True)
class SVRModel:
    """An RBF epsilon-SVR in libsvm's form: ``f(x) = sum_i coef_i exp(-gamma |x - sv_i|^2) - rho``.

    ``feature_min``/``feature_max`` scale raw features to [-1, 1] first, as
    ``svm-scale`` did when the model was trained.
    """

    support_vectors: Tensor  # (N, D) float64
    coef: Tensor  # (N,)
    rho: float
    gamma: float
    feature_min: Tensor  # (D,)
    feature_max: Tensor  # (D,)

    def predict(self, features: Tensor) -> Tensor:
        """``(B, D)`` raw features -> ``(B,)`` predictions."""
        x = -1 + 2 * (features.double().cpu() - self.feature_min) / (self.feature_max - self.feature_min)
        k = torch.exp(-self.gamma * torch.cdist(x, self.support_vectors).square())
        return k @ self.coef - self.rho


class _NoGlobalsUnpickler(pickle.Unpickler):
    def find_class(self, module, name):  # a data file never needs code; refuse it
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a model range file")


def parse_libsvm_model(text: str) -> tuple[dict[str, str], Tensor, Tensor]:
    """Parse a libsvm text model into (header, support vectors ``(N, D)``, coefficients ``(N,)``)."""
    lines = text.splitlines()
    try:
        start = lines.index("SV")
    except ValueError:
        raise ValueError("libsvm model: no 'SV' line found") from None
    header = dict(line.split(" ", 1) for line in lines[:start] if " " in line)
    rows = [line.split() for line in lines[start + 1:] if line.strip()]
    dim = max(int(tok.split(":")[0]) for row in rows for tok in row[1:])
    sv = torch.zeros(len(rows), dim, dtype=torch.float64)
    coef = torch.empty(len(rows), dtype=torch.float64)
    for i, row in enumerate(rows):
        coef[i] = float(row[0])
        for tok in row[1:]:
            j, v = tok.split(":")
            sv[i, int(j) - 1] = float(v)
    return header, sv, coef


def brisque_model_dir() -> Path | None:
    """Folder holding ``svm.txt`` and ``normalize.pickle`` of the installed ``brisque`` package, or None."""
    root = package_dir("brisque")  # its __init__ would import OpenCV and libsvm
    if root is None:
        return None
    folder = root / "models"
    return folder if (folder / "svm.txt").is_file() and (folder / "normalize.pickle").is_file() else None


@lru_cache(maxsize=2)
def load_brisque_model(model_dir: str | None = None) -> SVRModel:
    """Load the LIVE-trained BRISQUE SVR from ``model_dir`` (default: the ``brisque`` package's files).

    Raises:
        ModelNotAvailable: the package (or the files) are missing.
        ValueError: the files are not a 36-feature RBF epsilon-SVR with 36 ranges.
    """
    folder = Path(model_dir) if model_dir else brisque_model_dir()
    if folder is None or not (folder / "svm.txt").is_file():
        raise ModelNotAvailable(f"BRISQUE model not found: {BRISQUE_INSTALL_HINT}")
    header, sv, coef = parse_libsvm_model((folder / "svm.txt").read_text())
    if header.get("svm_type") != "epsilon_svr" or header.get("kernel_type") != "rbf" or sv.shape[1] != 36:
        raise ValueError(f"{folder / 'svm.txt'}: expected a 36-feature RBF epsilon-SVR, got {header} "
                         f"with {sv.shape[1]} features")
    with open(folder / "normalize.pickle", "rb") as f:
        ranges = _NoGlobalsUnpickler(f).load()
    if not isinstance(ranges, dict) or len(ranges.get("min_", ())) != 36 or len(ranges.get("max_", ())) != 36:
        raise ValueError(f"{folder / 'normalize.pickle'}: expected {{'min_': 36 floats, 'max_': 36 floats}}")
    return SVRModel(sv, coef, float(header["rho"]), float(header["gamma"]),
                    torch.tensor([float(v) for v in ranges["min_"]], dtype=torch.float64),
                    torch.tensor([float(v) for v in ranges["max_"]], dtype=torch.float64))


def _gaussian_blur(x: Tensor, size: int = 7, sigma: float = 7 / 6) -> Tensor:
    """MATLAB ``filter2(fspecial('gaussian', 7, 7/6), x, 'same')`` of ``(B, 1, H, W)``: zero padding.

    The normalised 2-D Gaussian is the outer product of normalised 1-D ones,
    so two 1-D passes give the same result (to rounding) at a third of the cost.
    """
    r = torch.arange(size, dtype=x.dtype, device=x.device) - (size - 1) / 2
    g = torch.exp(-r.square() / (2 * sigma**2))
    g = g / g.sum()
    x = torch.nn.functional.conv2d(x, g.view(1, 1, 1, size), padding=(0, size // 2))
    return torch.nn.functional.conv2d(x, g.view(1, 1, size, 1), padding=(size // 2, 0))


def _mscn(img: Tensor) -> Tensor:
    """Mean-subtracted contrast-normalised coefficients of ``(B, H, W)`` luma in [0, 255]."""
    x = img[:, None]
    mu = _gaussian_blur(x)
    var = _gaussian_blur(x * x) - mu * mu
    m = ((x - mu) / (var.abs().sqrt() + 1))[:, 0]
    # flat regions give rounding noise (~1e-13) instead of 0, whose random sign would
    # move the AGGD's strict x<0 / x>0 buckets with the summation order
    return torch.where(m.abs() < 1e-8, torch.zeros_like(m), m)


@lru_cache(maxsize=4)
def _ratio_tables(device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """The shape grid and the GGD / AGGD moment ratios over it (MATLAB's lookup tables)."""
    g = _GAMMA_GRID.to(device)
    r_ggd = torch.exp(torch.lgamma(1 / g) + torch.lgamma(3 / g) - 2 * torch.lgamma(2 / g))
    return g, r_ggd, 1 / r_ggd


def _ggd_fit(v: Tensor) -> tuple[Tensor, Tensor]:
    """Shape and variance of a zero-mean generalised Gaussian, per row of ``(B, N)`` (moment matching)."""
    g, r_gam, _ = _ratio_tables(v.device)
    sigma_sq = v.square().mean(1)
    rho = sigma_sq / v.abs().mean(1).square()
    alpha = g[(rho[:, None] - r_gam).abs().argmin(1)]
    return alpha, sigma_sq


def _aggd_fit(v: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Shape, mean, left and right variance of an asymmetric GGD per row of ``(B, N)``; zeros excluded from both sides."""
    g, _, r_gam = _ratio_tables(v.device)
    neg, pos = (v < 0).double(), (v > 0).double()
    left = ((v.square() * neg).sum(1) / neg.sum(1)).sqrt()
    right = ((v.square() * pos).sum(1) / pos.sum(1)).sqrt()
    gam_hat = left / right
    r_hat = v.abs().mean(1).square() / v.square().mean(1)
    r_norm = r_hat * (gam_hat**3 + 1) * (gam_hat + 1) / (gam_hat**2 + 1).square()
    alpha = g[(r_gam - r_norm[:, None]).square().argmin(1)]
    ratio = torch.exp(torch.lgamma(2 / alpha) - torch.lgamma(1 / alpha))
    const = torch.exp(0.5 * (torch.lgamma(1 / alpha) - torch.lgamma(3 / alpha)))
    return alpha, (right - left) * ratio * const, left.square(), right.square()


def _imresize_half(img: Tensor) -> Tensor:
    """MATLAB ``imresize(img, 0.5)`` (bicubic, antialiased, symmetric borders) of ``(B, H, W)``."""
    d = 3.5 - torch.arange(8, dtype=torch.float64)
    s = (0.5 * d).abs()  # the cubic kernel stretched by 1/scale = 2
    w = torch.where(s <= 1, 1.5 * s**3 - 2.5 * s**2 + 1,
                    torch.where(s <= 2, -0.5 * s**3 + 2.5 * s**2 - 4 * s + 2, torch.zeros_like(s)))
    w = (w / w.sum()).to(img.device)

    def along_last(x: Tensor) -> Tensor:
        n = x.shape[-1]
        idx = 2 * torch.arange((n + 1) // 2)[:, None] - 3 + torch.arange(8)[None]
        idx = idx % (2 * n)
        idx = torch.where(idx < n, idx, 2 * n - 1 - idx).to(x.device)  # half-sample mirror
        return (x[..., idx] * w).sum(-1)

    return along_last(along_last(img).transpose(-1, -2)).transpose(-1, -2)


def brisque_features(x: Tensor) -> Tensor:
    """The 36 BRISQUE features of ``(B, 3, H, W)`` images in [0, 1], ``(B, 36)`` float64.

    The images are quantised to 8 bits and converted to luma with MATLAB's
    ``rgb2gray`` weights and rounding, as in the model's training pipeline.
    """
    x = to_rgb(x, "x")
    if min(x.shape[-2:]) < 16:
        raise ValueError(f"x: BRISQUE needs images of at least 16x16 pixels, got {tuple(x.shape[-2:])}")
    rgb = torch.round(x.double() * 255)
    img = torch.round(sum(c * rgb[:, i] for i, c in enumerate(_LUMA)))
    feats = []
    for scale in range(2):
        m = _mscn(img)
        alpha, var = _ggd_fit(m.flatten(1))
        feats += [alpha, var]
        for shift in ((0, 1), (1, 0), (1, 1), (-1, 1)):  # MATLAB circshift: wraps around
            feats += list(_aggd_fit((m * torch.roll(m, shift, (-2, -1))).flatten(1)))
        if scale == 0:
            img = _imresize_half(img)
    return torch.stack(feats, 1)


def brisque(x: Tensor, model_dir: str | None = None) -> Tensor:
    """BRISQUE score of each image, ``(B,)`` float.

    Range: about 0 (pristine) to 100 (heavily distorted) on LIVE-like images;
    mildly negative for very clean ones, not clamped. Lower = better quality,
    higher = more distortion. Flat images have no statistics and give NaN.

    Args:
        x: images ``(B, C, H, W)`` in [0, 1], at least 16x16 (gray/RGBA adapted).
        model_dir: a folder with ``svm.txt`` and ``normalize.pickle``; default
            the files of the installed ``brisque`` package.

    Raises:
        ModelNotAvailable: the model files are missing (message: how to install).
    """
    model = load_brisque_model(model_dir)
    return model.predict(brisque_features(x)).float()
