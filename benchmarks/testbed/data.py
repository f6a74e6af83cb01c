"""The testbed's images: textured RGB crops from photos that ship inside scikit-image (no download).

Split (by source photo, so no pixel of a subject is ever seen in training):

* **training** (:data:`TRAIN_SOURCES`): Hubble deep field, immunohistochemistry
  slide, retina, rocket launch, the left Middlebury motorcycle, and the
  brick / grass / gravel textures and the cameraman (grayscale, replicated to
  RGB). Each is resized to two scales and cut into random 64-px crops; the
  purifier and the customization model both train on these crops.
* **held-out subjects** (:data:`SUBJECTS`): the astronaut (a person), Chelsea
  (a cat) and the coffee cup (an object). A subject's "photos" are 64-px
  crops of its photo at a small zoom and shift, alternately flipped, the way a
  few snapshots of one subject differ.

Every image is on the 8-bit grid, ``(N, 3, S, S)`` float32 in [0, 1].
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

#: training photos: name -> short sides (px) the photo is resized to before cropping
TRAIN_SOURCES: dict[str, tuple[int, ...]] = {
    "hubble_deep_field": (128, 256), "immunohistochemistry": (128, 256), "retina": (128, 256),
    "rocket": (128, 256), "motorcycle": (128, 256), "brick": (128, 256), "grass": (128, 256),
    "gravel": (128, 256), "camera": (128, 256),
}
#: held-out subjects: name -> (short side the photo is resized to, centre (y, x) of the subject as fractions)
SUBJECTS: dict[str, tuple[int, tuple[float, float]]] = {
    "astronaut": (112, (0.32, 0.45)),
    "chelsea": (72, (0.50, 0.42)),
    "coffee": (96, (0.45, 0.50)),
}


#: testbed v3's data scale: photos rendered at twice v2's short sides have the per-pixel detail of a 512-px
#: photo (RMS Laplacian of the subjects' views 31/255, the astronaut at its native 512 px 30/255; v2's 46/255)
V3_SCALE = 2.0


@lru_cache(maxsize=None)
def _photo(name: str) -> Tensor:
    """``(3, H, W)`` float in [0, 1]: a scikit-image data photo (grayscale replicated to RGB)."""
    import skimage.data as data

    img = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
    img = np.asarray(img)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return torch.from_numpy(img[..., :3].copy()).permute(2, 0, 1).float() / 255


def _resized(name: str, short: int) -> Tensor:
    x = _photo(name)[None]
    h, w = x.shape[-2:]
    short = min(short, h, w)  # never upsampled: a larger scale stops at the photo's own resolution
    size = (short, round(w * short / h)) if h <= w else (round(h * short / w), short)
    x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
    return _quantize(x[0])


def _quantize(x: Tensor) -> Tensor:
    return (x.clamp(0, 1) * 255).round() / 255


@lru_cache(maxsize=None)
def training_pool(scale: float = 1.0) -> tuple[tuple[Tensor, ...], tuple[int, ...]]:
    """The resized training photos and, for each, the index of its source in :data:`TRAIN_SOURCES`.

    ``scale`` multiplies every short side (testbed v3 uses 2: see :data:`V3_SCALE`)."""
    pool, labels = [], []
    for k, (name, sides) in enumerate(TRAIN_SOURCES.items()):
        for short in sides:
            pool.append(_resized(name, round(short * scale)))
            labels.append(k)
    return tuple(pool), tuple(labels)


def training_crops(n: int, size: int = 64, generator: torch.Generator | None = None,
                   scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """``n`` random ``size``-px crops (random flips) of the training photos and their source indices ``(n,)``."""
    pool, labels = training_pool(scale)
    g = generator or torch.Generator().manual_seed(0)
    which = torch.randint(len(pool), (n,), generator=g)
    out = torch.empty(n, 3, size, size)
    for i, j in enumerate(which.tolist()):
        img = pool[j]
        y = int(torch.randint(img.shape[1] - size + 1, (1,), generator=g))
        x = int(torch.randint(img.shape[2] - size + 1, (1,), generator=g))
        crop = img[:, y:y + size, x:x + size]
        out[i] = crop.flip(-1) if bool(torch.rand(1, generator=g) < 0.5) else crop
    return out, torch.tensor([labels[j] for j in which.tolist()])


def subject_views(subject: str, size: int = 64, n: int = 4, scale: float = 1.0,
                  shift: tuple[float, float] = (0.0, 0.0)) -> Tensor:
    """``n`` "photos" ``(n, 3, size, size)`` of held-out ``subject``: zoomed/shifted crops, odd ones flipped.

    ``scale`` multiplies the subject's short side: the views show a smaller part of it, in more detail.
    ``shift`` moves the centre (fractions of the photo's height and width): another part of the subject."""
    if subject not in SUBJECTS:
        raise ValueError(f"subject: unknown {subject!r}; available: {', '.join(SUBJECTS)}")
    short, (cy, cx) = SUBJECTS[subject]
    short, cy, cx = short * scale, cy + shift[0], cx + shift[1]
    img = _photo(subject)[None]
    h, w = img.shape[-2:]
    views = []
    for k in range(n):
        zoom = 1.0 - 0.08 * (k % 3)
        dy, dx = [(0, 0), (-0.04, 0.05), (0.04, -0.04), (0.05, 0.03)][k % 4]
        # crop side in source pixels: `size` px at the subject scale, times the zoom
        side = size * min(h, w) / short * zoom
        y0 = (cy + dy) * h - side / 2
        x0 = (cx + dx) * w - side / 2
        y0, x0 = min(max(y0, 0), h - side), min(max(x0, 0), w - side)
        # affine_grid works in [-1, 1] coordinates of the whole photo
        theta = torch.tensor([[[side / w, 0, (2 * x0 + side) / w - 1], [0, side / h, (2 * y0 + side) / h - 1]]])
        grid = F.affine_grid(theta, (1, 3, size, size), align_corners=False)
        # anti-aliased: shrink the photo to the view's scale first, then sample
        scale = size / side
        small = F.interpolate(img, scale_factor=scale, mode="bicubic", align_corners=False, antialias=True)
        v = F.grid_sample(small, grid, mode="bicubic", padding_mode="border", align_corners=False)[0]
        views.append(v.flip(-1) if k % 2 else v)
    return _quantize(torch.stack(views))
