"""Evaluation metrics for protect -> purify -> customize -> generate experiments.

One entry point, :func:`evaluate`, returns a flat ``{name: value}`` row whose
names are ``"<group>/<metric>"`` with group ``clean``, ``protected``,
``purified`` or ``generated``. Values are batch means (float); a metric that
cannot run says why as a string: ``"not available: <install / put weights at>"``
for a missing optional package or weight file, ``"n/a: <reason>"`` when the
data give no value (e.g. no face in any image). Nothing is downloaded.

Metric directions (see each function for its range):

=================================  ================  ========================
metric                             module            better protection when
=================================  ================  ========================
psnr, ssim (clean vs protected)    perceptibility    higher (less visible δ)
linf(_255), l2(_255), lpips        perceptibility    lower (less visible δ)
brisque                            quality           generated: higher
grid_score, hf_ratio               artifacts         generated: higher
face_detection_failure_rate        faces             generated: higher
identity_similarity (dlib/ArcFace) faces, optional   generated: lower
identity_distance (dlib)           faces             generated: higher
clip_iqa                           optional          generated: lower
fid (generated vs clean)           fid               generated: higher
=================================  ================  ========================

Adaptations (documented, never silent corruption): gray images are
replicated to RGB and RGBA drops alpha; purified images of another size are
resized to the clean size for psnr/ssim (noted under ``notes``); generated
images need no particular size. A batch-size or size mismatch between clean
and protected raises a ``ValueError`` naming both shapes.
"""
from __future__ import annotations

import math
import os
from typing import Callable

import torch
from torch import Tensor

from .artifacts import grid_artifact_score, high_frequency_ratio
from .common import ModelNotAvailable, check_same_shape, resize_to, to_rgb
from .faces import (face_detection_failure_rate, face_embeddings, identity_scores, reference_embedding,
                    resolve_face_backend)
from .fid import TooFewImages, fid, find_inception
from .optional import arcface_similarity, clip_iqa, liqe, lpips_alex
from .perceptibility import perturbation_norms, psnr, ssim
from .quality import brisque
from .report import append_results, markdown_table, tables_markdown

Value = float | str

__all__ = [
    "ModelNotAvailable", "append_results", "arcface_similarity", "brisque", "clip_iqa", "evaluate",
    "face_detection_failure_rate", "fid", "grid_artifact_score", "high_frequency_ratio", "is_number", "liqe",
    "lpips_alex", "markdown_table", "perturbation_norms", "psnr", "ssim", "tables_markdown",
]


def _mean(v: Tensor | float, empty: str) -> Value:
    """Batch mean ignoring NaN (images without a value); ``"n/a: empty"`` when every entry is NaN."""
    if not isinstance(v, Tensor):
        return float(v)
    v = v.double().flatten()
    ok = ~v.isnan()
    if not ok.any():
        return f"n/a: {empty}"
    return float(v[ok].mean())


def _safe(fn: Callable[[], Tensor | float], empty: str = "no value") -> Value:
    try:
        return _mean(fn(), empty)
    except ModelNotAvailable as e:
        return f"not available: {e}"


def _no_reference(group: str, x: Tensor, patch_size: int, out: dict) -> None:
    out[f"{group}/grid_score"] = _mean(grid_artifact_score(x, patch_size), "")
    out[f"{group}/hf_ratio"] = _mean(high_frequency_ratio(x, patch_size), "")
    out[f"{group}/brisque"] = _safe(lambda: brisque(x), "flat images have no BRISQUE statistics")


def evaluate(clean: Tensor, protected: Tensor | None = None, purified: Tensor | None = None,
             generated: Tensor | None = None, *, patch_size: int = 8,
             weights_dir: str | os.PathLike | None = None, faces: bool = True,
             face_backend: str = "auto") -> dict[str, Value]:
    """Score one experiment; every argument is ``(B, C, H, W)`` in [0, 1].

    Args:
        clean: the original images (references for every comparison).
        protected: ``clean`` + δ, same shape as ``clean``: perceptibility of δ
            (psnr, ssim, linf, linf_255, l2, l2_255, lpips) and its grid score.
        purified: the attacker's purified images, same batch size as
            ``clean`` (resized to its size if needed): psnr/ssim vs clean and
            the no-reference scores (grid_score, hf_ratio, brisque).
        generated: images sampled from the customized model, any batch and
            size: no-reference scores, clip_iqa, liqe, FID against ``clean``
            (both sets need 2+ images) and, with
            ``faces=True``, the face detection failure rate and identity
            similarity to the faces in ``clean``.
        patch_size: grid period for grid_score / hf_ratio (8 = SD's VAE).
        weights_dir: folder with user-supplied weights (LPIPS, ArcFace,
            CLIP-IQA, FID's Inception); see :mod:`antipure_core.metrics.optional`
            and :mod:`antipure_core.metrics.fid`.
        faces: compute face metrics (turn off for art-style experiments).
        face_backend: ``'auto'``, ``'dlib'`` or ``'skimage'``.

    Returns:
        ``{"<group>/<metric>": float | "not available: ..." | "n/a: ..."}``
        plus ``"notes"`` when an input was adapted.
    """
    clean = to_rgb(clean, "clean")
    out: dict[str, Value] = {}
    notes: list[str] = []
    _no_reference("clean", clean, patch_size, out)

    if protected is not None:
        protected = to_rgb(protected, "protected")
        check_same_shape(clean, protected, "clean", "protected")
        out["protected/psnr"] = _mean(psnr(clean, protected), "")
        out["protected/ssim"] = _mean(ssim(clean, protected), "")
        for k, v in perturbation_norms(clean, protected).items():
            out[f"protected/{k}"] = _mean(v, "")
        out["protected/lpips"] = _safe(lambda: lpips_alex(clean, protected, weights_dir))
        out["protected/grid_score"] = _mean(grid_artifact_score(protected, patch_size), "")
        out["protected/hf_ratio"] = _mean(high_frequency_ratio(protected, patch_size), "")

    if purified is not None:
        purified = to_rgb(purified, "purified")
        if purified.shape[0] != clean.shape[0]:
            raise ValueError(f"purified: batch of {purified.shape[0]} does not match clean's {clean.shape[0]}; "
                             "purify the same images that were protected")
        if purified.shape[-2:] != clean.shape[-2:]:
            notes.append(f"purified resized from {tuple(purified.shape[-2:])} to {tuple(clean.shape[-2:])} "
                         "for psnr/ssim")
        same = resize_to(purified, tuple(clean.shape[-2:]))
        out["purified/psnr"] = _mean(psnr(clean, same), "")
        out["purified/ssim"] = _mean(ssim(clean, same), "")
        _no_reference("purified", purified, patch_size, out)

    if generated is not None:
        generated = to_rgb(generated, "generated")
        _no_reference("generated", generated, patch_size, out)
        out["generated/clip_iqa"] = _safe(lambda: clip_iqa(generated, weights_dir))
        out["clean/clip_iqa"] = _safe(lambda: clip_iqa(clean, weights_dir))
        out["generated/liqe"] = _safe(lambda: liqe(generated, weights_dir))
        out["generated/fid"] = _fid(generated, clean, weights_dir)
        if faces:
            out.update(_face_metrics(clean, generated, face_backend, weights_dir))

    if notes:
        out["notes"] = "; ".join(notes)
    return out


def _fid(generated: Tensor, clean: Tensor, weights_dir) -> Value:
    try:
        find_inception(weights_dir)  # a missing weight file is reported even when a set is too small
        return fid(generated, clean, weights_dir, names=("generated", "clean"))
    except ModelNotAvailable as e:
        return f"not available: {e}"
    except TooFewImages as e:
        return f"n/a: {e}"


def _face_metrics(clean: Tensor, generated: Tensor, backend: str, weights_dir) -> dict[str, Value]:
    out: dict[str, Value] = {}
    try:
        backend = resolve_face_backend(backend)
    except ModelNotAvailable as e:
        na = f"not available: {e}"
        return {k: na for k in ("clean/face_detection_failure_rate", "generated/face_detection_failure_rate",
                                "generated/identity_similarity", "generated/identity_distance",
                                "generated/arcface_similarity")}
    out["clean/face_detection_failure_rate"] = face_detection_failure_rate(clean, backend)
    out["generated/face_detection_failure_rate"] = face_detection_failure_rate(generated, backend)
    no_face = "no face detected in any generated image"
    try:
        ref = reference_embedding(face_embeddings(clean, backend), "clean")
        scores = identity_scores(face_embeddings(generated, backend), ref)
        out["generated/identity_similarity"] = _mean(scores["similarity"], no_face)
        out["generated/identity_distance"] = _mean(scores["distance"], no_face)
    except ModelNotAvailable as e:
        out["generated/identity_similarity"] = out["generated/identity_distance"] = f"not available: {e}"
    except ValueError:
        out["generated/identity_similarity"] = out["generated/identity_distance"] = \
            "n/a: no face detected in the clean images"
    try:
        out["generated/arcface_similarity"] = _mean(arcface_similarity(generated, clean, weights_dir, backend),
                                                    no_face)
    except ModelNotAvailable as e:
        out["generated/arcface_similarity"] = f"not available: {e}"
    except ValueError:
        out["generated/arcface_similarity"] = "n/a: no face detected in the clean images"
    return out


def is_number(v: Value) -> bool:
    """True for a numeric result (including inf), False for a ``not available`` / ``n/a`` string."""
    return isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v))
