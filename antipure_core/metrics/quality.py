"""BRISQUE no-reference image quality (Mittal, Moorthy, Bovik, IEEE TIP 2012), as the authors' release scores it.

The 36 natural-scene-statistics features are computed here in torch
(float64) following the authors' MATLAB release (``brisque_feature.m``,
``estimateggdparam.m``, ``estimateaggdparam.m``, ``imresize``): MSCN
coefficients of the 8-bit luma with a 7x7 Gaussian window (sigma 7/6, C = 1),
a GGD fit of the MSCN field and AGGD fits of its four pairwise products, at
full and half scale. The score is the release's own trained predictor: the
libsvm epsilon-SVR ``allmodel`` (RBF, gamma 0.05, 774 support vectors,
trained on the whole LIVE database) after ``svm-scale -r allrange``, both
bundled in ``brisque_live/`` with the release's copyright notice and read as
text (nothing is unpickled or executed). The text round trip of the release
(``fprintf('%f')`` of the features, ``%g`` output of svm-scale) is kept, so the
numbers are those of ``brisquescore.m``: on the published MATLAB outputs for
TID2013 images the difference is below 2e-3 except where large flat areas
make the reference itself depend on floating-point rounding (tests).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

from .common import ModelNotAvailable, gaussian_taps, to_rgb

LIVE_MODEL_DIR = Path(__file__).with_name("brisque_live")
_GAMMA_GRID = torch.arange(200, 10001, dtype=torch.float64) / 1000  # MATLAB's 0.2:0.001:10
# MATLAB rgb2gray weights (ITU-R BT.601 luma as MATLAB rounds them)
_LUMA = (0.298936021293775, 0.587043074451121, 0.114020904255103)


def _round_significant(x: Tensor, digits: int = 6) -> Tensor:
    """C's ``%g``: ``digits`` significant decimal digits, as svm-scale writes its output."""
    return torch.tensor([float(f"{v:.{digits}g}") for v in x.flatten().tolist()], dtype=x.dtype).view(x.shape)


@dataclass(frozen=True)
class SVRModel:
    """An RBF epsilon-SVR in libsvm's form: ``f(x) = sum_i coef_i exp(-gamma |x - sv_i|^2) - rho``.

    ``feature_min``/``feature_max`` scale raw features to [-1, 1] first, as
    ``svm-scale -r`` does. With ``text_round_trip`` the features are rounded
    as the release's files carry them (6 decimals, then 6 significant digits
    after scaling).
    """

    support_vectors: Tensor  # (N, D) float64
    coef: Tensor  # (N,)
    rho: float
    gamma: float
    feature_min: Tensor  # (D,)
    feature_max: Tensor  # (D,)
    text_round_trip: bool = False

    def predict(self, features: Tensor) -> Tensor:
        """``(B, D)`` raw features -> ``(B,)`` predictions, float64."""
        f = features.double().cpu()
        if self.text_round_trip:
            f = torch.round(f * 1e6) / 1e6  # fprintf('%f')
        x = -1 + 2 * (f - self.feature_min) / (self.feature_max - self.feature_min)
        if self.text_round_trip:
            x = _round_significant(x)
        k = torch.exp(-self.gamma * torch.cdist(x, self.support_vectors).square())
        return k @ self.coef - self.rho


def parse_libsvm_model(text: str) -> tuple[dict[str, str], Tensor, Tensor]:
    """Parse a libsvm text model into (header, support vectors ``(N, D)``, coefficients ``(N,)``)."""
    lines = [line.strip() for line in text.splitlines()]
    try:
        start = lines.index("SV")
    except ValueError:
        raise ValueError("libsvm model: no 'SV' line found") from None
    header = dict(line.split(" ", 1) for line in lines[:start] if " " in line)
    rows = [line.split() for line in lines[start + 1:] if line]
    dim = max(int(tok.split(":")[0]) for row in rows for tok in row[1:])
    sv = torch.zeros(len(rows), dim, dtype=torch.float64)
    coef = torch.empty(len(rows), dtype=torch.float64)
    for i, row in enumerate(rows):
        coef[i] = float(row[0])
        for tok in row[1:]:
            j, v = tok.split(":")
            sv[i, int(j) - 1] = float(v)
    return header, sv, coef


def parse_svm_scale_range(text: str) -> tuple[float, float, Tensor, Tensor]:
    """Parse an ``svm-scale -s`` range file: ``x``, ``lower upper``, then ``index min max`` lines.

    Returns ``(lower, upper, feature_min (D,), feature_max (D,))``.
    """
    lines = [line.split() for line in text.splitlines() if line.strip()]
    if not lines or lines[0] != ["x"] or len(lines[1]) != 2:
        raise ValueError("svm-scale range: expected 'x' then 'lower upper' on the first two lines")
    lower, upper = map(float, lines[1])
    body = sorted((int(i), float(lo), float(hi)) for i, lo, hi in lines[2:])
    if [i for i, _, _ in body] != list(range(1, len(body) + 1)):
        raise ValueError("svm-scale range: feature indices must run 1..D")
    return (lower, upper, torch.tensor([lo for _, lo, _ in body], dtype=torch.float64),
            torch.tensor([hi for _, _, hi in body], dtype=torch.float64))


@lru_cache(maxsize=2)
def load_brisque_model(model_dir: str | None = None) -> SVRModel:
    """Load a BRISQUE SVR from ``model_dir`` (``allmodel`` + ``allrange``; default: the bundled LIVE release).

    Raises:
        ModelNotAvailable: the files are missing from ``model_dir``.
        ValueError: the files are not a 36-feature RBF epsilon-SVR with 36 ranges scaled to [-1, 1].
    """
    folder = Path(model_dir) if model_dir else LIVE_MODEL_DIR
    model_file, range_file = folder / "allmodel", folder / "allrange"
    if not model_file.is_file() or not range_file.is_file():
        raise ModelNotAvailable(f"BRISQUE model not found: {folder} needs the release's 'allmodel' and 'allrange'")
    header, sv, coef = parse_libsvm_model(model_file.read_text())
    if header.get("svm_type") != "epsilon_svr" or header.get("kernel_type") != "rbf" or sv.shape[1] != 36:
        raise ValueError(f"{model_file}: expected a 36-feature RBF epsilon-SVR, got {header} "
                         f"with {sv.shape[1]} features")
    lower, upper, lo, hi = parse_svm_scale_range(range_file.read_text())
    if (lower, upper) != (-1.0, 1.0) or lo.numel() != 36:
        raise ValueError(f"{range_file}: expected 36 feature ranges scaled to [-1, 1], got {lo.numel()} "
                         f"to [{lower}, {upper}]")
    return SVRModel(sv, coef, float(header["rho"]), float(header["gamma"]), lo, hi, text_round_trip=True)


def _gaussian_blur(x: Tensor, size: int = 7, sigma: float = 7 / 6) -> Tensor:
    """MATLAB ``filter2(fspecial('gaussian', 7, 7/6), x, 'same')`` of ``(B, H, W)``: zero padding.

    Two 1-D passes of explicit taps: the same result as the 2-D window to
    rounding, and the same rounding whatever the batch or thread count (a
    flat area's MSCN is rounding noise whose sign picks its AGGD side).
    """
    g = gaussian_taps(size, sigma).tolist()
    h, w, p = x.shape[-2], x.shape[-1], size // 2
    xp = torch.nn.functional.pad(x, (p, p))
    x = sum(gk * xp[..., :, k:k + w] for k, gk in enumerate(g))
    xp = torch.nn.functional.pad(x, (0, 0, p, p))
    return sum(gk * xp[..., k:k + h, :] for k, gk in enumerate(g))


def _mscn(img: Tensor) -> Tensor:
    """Mean-subtracted contrast-normalised coefficients of ``(B, H, W)`` luma in [0, 255]."""
    mu = _gaussian_blur(img)
    var = _gaussian_blur(img * img) - mu * mu
    return (img - mu) / (var.abs().sqrt() + 1)


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
    """BRISQUE score of each image, ``(B,)`` float, as the authors' release computes it.

    Range: about 0 (pristine) to 100 (heavily distorted) on LIVE-like images;
    mildly negative for very clean ones, above 100 for some, not clamped.
    Lower = better quality, higher = more distortion. Images of one flat
    gray level have no statistics and give NaN.

    Args:
        x: images ``(B, C, H, W)`` in [0, 1], at least 16x16 (gray/RGBA adapted).
        model_dir: a folder with another ``allmodel`` / ``allrange`` pair;
            default the bundled LIVE release model.
    """
    model = load_brisque_model(model_dir)
    x = to_rgb(x, "x")
    score = model.predict(brisque_features(x)).float()
    levels = torch.round(x.double() * 255).flatten(1)
    flat = (levels == levels[:, :1]).all(1).cpu()
    return torch.where(flat, torch.full_like(score, float("nan")), score)
