"""Face detection failure rate and identity similarity, with models that ship inside packages.

Detectors (``backend``):

* ``'dlib'``: dlib's HOG + linear SVM frontal face detector (built into
  ``dlib``; ``pip install dlib-bin`` is a prebuilt wheel). Upsampled once, it
  finds frontal faces from about 40 px.
* ``'skimage'``: scikit-image's LBP frontal-face cascade
  (``skimage.data.lbp_frontal_face_cascade_filename()``). Faster to install,
  more false positives and no confidence score.
* ``'auto'``: dlib if installed, else scikit-image.

Identity embeddings use dlib's ResNet face-recognition model (128-D, LFW
accuracy 99.38 %) with its 5-point landmark aligner, both from the
``face-recognition-models`` package. That package is located, not imported:
its ``__init__`` needs ``pkg_resources``, which new setuptools no longer has.

Nothing is downloaded; a missing package raises :class:`ModelNotAvailable`
whose message says what to install.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from .common import ModelNotAvailable, import_optional, package_dir, to_rgb, to_uint8_hwc

DLIB_INSTALL_HINT = "pip install dlib-bin face-recognition-models"
SKIMAGE_INSTALL_HINT = "pip install scikit-image"
# dlib's documented same-person threshold on the Euclidean distance of its embeddings
DLIB_SAME_PERSON_DISTANCE = 0.6


@dataclass(frozen=True)
class FaceBox:
    """A detected face in pixel coordinates (``bottom``/``right`` exclusive); ``score`` is the detector's confidence (area for the cascade)."""

    top: int
    left: int
    bottom: int
    right: int
    score: float


def _has(module: str) -> bool:
    return package_dir(module) is not None


def available_face_backends() -> list[str]:
    """The detector backends installed here, best first."""
    return [b for b, m in (("dlib", "dlib"), ("skimage", "skimage")) if _has(m)]


def resolve_face_backend(backend: str = "auto") -> str:
    """``'auto'`` -> the best installed backend; raise :class:`ModelNotAvailable` if the named one is missing."""
    if backend not in ("auto", "dlib", "skimage"):
        raise ValueError(f"backend: expected 'auto', 'dlib' or 'skimage', got {backend!r}")
    found = available_face_backends()
    if backend == "auto":
        if not found:
            raise ModelNotAvailable(f"no face detector installed: {DLIB_INSTALL_HINT} (or {SKIMAGE_INSTALL_HINT})")
        return found[0]
    if backend not in found:
        hint = "pip install dlib-bin" if backend == "dlib" else SKIMAGE_INSTALL_HINT
        raise ModelNotAvailable(f"face detector {backend!r} not installed: {hint}")
    return backend


@lru_cache(maxsize=1)
def _dlib_detector():
    return import_optional("dlib", "pip install dlib-bin").get_frontal_face_detector()


@lru_cache(maxsize=1)
def _skimage_cascade():
    import_optional("skimage", SKIMAGE_INSTALL_HINT)
    from skimage import data, feature

    return feature.Cascade(data.lbp_frontal_face_cascade_filename())


def _detect_one(img: np.ndarray, backend: str, upsample: int) -> list[FaceBox]:
    if backend == "dlib":
        rects, scores, _ = _dlib_detector().run(img, upsample, 0.0)
        boxes = [FaceBox(r.top(), r.left(), r.bottom() + 1, r.right() + 1, float(s)) for r, s in zip(rects, scores)]
    else:
        cascade = _skimage_cascade()
        from skimage.color import rgb2gray

        h, w = img.shape[:2]
        side = max(80 >> upsample, 12)  # smallest face searched: ~40 px at upsample 1, like dlib
        found = cascade.detect_multi_scale(img=rgb2gray(img), scale_factor=1.2, step_ratio=1,
                                                      min_size=(side, side), max_size=(h, w))
        boxes = [FaceBox(d["r"], d["c"], d["r"] + d["height"], d["c"] + d["width"], float(d["height"] * d["width"]))
                 for d in found]
    return sorted(boxes, key=lambda b: -b.score)


def detect_faces(x: Tensor, backend: str = "auto", upsample: int = 1) -> list[list[FaceBox]]:
    """Detect frontal faces in each image of ``(B, C, H, W)`` in [0, 1]; boxes sorted by confidence.

    ``upsample`` doubles the image that many times before detection (dlib) or
    lowers the smallest searched face size (cascade): 1 finds faces from ~40 px.
    """
    b = resolve_face_backend(backend)
    if upsample < 0:
        raise ValueError(f"upsample: must be >= 0, got {upsample}")
    return [_detect_one(img, b, upsample) for img in to_uint8_hwc(to_rgb(x, "x"))]


def face_detection_failure_rate(x: Tensor, backend: str = "auto", upsample: int = 1) -> float:
    """Share of images in which no face is detected (FDFR).

    Range [0, 1]; higher = faces destroyed more often (for generated images of
    a protected identity: a stronger protection). Any detected face counts,
    including a detector's false positive.
    """
    boxes = detect_faces(x, backend, upsample)
    return sum(not b for b in boxes) / len(boxes)


@lru_cache(maxsize=1)
def _dlib_recognition():
    folder = package_dir("face_recognition_models")
    if not _has("dlib") or folder is None:
        raise ModelNotAvailable(f"identity embedding needs dlib and its ResNet model: {DLIB_INSTALL_HINT}")
    dlib = import_optional("dlib", DLIB_INSTALL_HINT)
    models = folder / "models"
    return (dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat")),
            dlib.face_recognition_model_v1(str(models / "dlib_face_recognition_resnet_model_v1.dat")))


def face_embeddings(x: Tensor, backend: str = "auto", upsample: int = 1) -> Tensor:
    """128-D dlib ResNet embeddings of the most confident face per image, ``(B, 128)``.

    Rows of images without a detected face are NaN. The face found by
    ``backend`` is aligned with dlib's 5-point landmarks before embedding.

    Raises:
        ModelNotAvailable: dlib or ``face-recognition-models`` is missing.
    """
    predictor, model = _dlib_recognition()
    dlib = import_optional("dlib", DLIB_INSTALL_HINT)
    x = to_rgb(x, "x")
    out = torch.full((x.shape[0], 128), float("nan"), dtype=torch.float64)
    for i, (img, boxes) in enumerate(zip(to_uint8_hwc(x), detect_faces(x, backend, upsample))):
        if boxes:
            b = boxes[0]
            shape = predictor(img, dlib.rectangle(b.left, b.top, b.right - 1, b.bottom - 1))
            out[i] = torch.tensor(list(model.compute_face_descriptor(img, shape)), dtype=torch.float64)
    return out


def reference_embedding(embeddings: Tensor, name: str = "references") -> Tensor:
    """Mean of the non-NaN rows of ``(N, D)`` embeddings, ``(D,)``; raises if no row has a face."""
    ok = ~embeddings.isnan().any(1)
    if not ok.any():
        raise ValueError(f"{name}: no face detected in any image, so there is no identity to compare with")
    return embeddings[ok].mean(0)


def identity_scores(embeddings: Tensor, reference: Tensor) -> dict[str, Tensor]:
    """Cosine similarity and Euclidean distance of each ``(B, D)`` embedding to a ``(D,)`` reference.

    ``similarity`` in [-1, 1], higher = same identity kept (weaker
    protection); ``distance`` >= 0, lower = same identity (dlib: < 0.6 means
    the same person). NaN rows (no face) stay NaN.
    """
    sim = torch.nn.functional.cosine_similarity(embeddings, reference[None], dim=1)
    return {"similarity": sim, "distance": (embeddings - reference).norm(dim=1)}


def identity_similarity(generated: Tensor, references: Tensor, backend: str = "auto") -> Tensor:
    """Identity score matching (ISM): cosine similarity of each generated face to the references' mean face, ``(B,)``.

    ``generated`` and ``references`` are ``(B, C, H, W)`` / ``(N, C, H, W)``
    in [0, 1] of any sizes. Range [-1, 1] (dlib embeddings of different people
    still reach ~0.8, the same person ~0.95+); higher = identity kept.
    NaN where a generated image has no detected face.

    Raises:
        ValueError: no face in any reference image.
        ModelNotAvailable: dlib or its models are missing.
    """
    ref = reference_embedding(face_embeddings(references, backend), "references")
    return identity_scores(face_embeddings(generated, backend), ref)["similarity"]
