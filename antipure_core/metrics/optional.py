"""Metrics whose weights the user supplies: LPIPS, ArcFace identity, CLIP-IQA (LIQE: not implemented).

None of these downloads anything. Each looks for its files in ``weights_dir``
(the node passes the host's ``models/antipure`` folder) and in the places
named below; when something is missing it raises :class:`ModelNotAvailable`
whose message says what to install and where to put which file, so the
evaluation reports ``"not available: ..."`` instead of a number.

Weights are read with ``safetensors`` or ``torch.load(weights_only=True)``
only; ONNX files run in ``onnxruntime``.

Files (``W`` = ``weights_dir``):

* LPIPS (AlexNet, v0.1): the torchvision ImageNet AlexNet weights as
  ``W/alexnet.safetensors`` or ``W/alexnet-owt-7be5be79.pth`` (also found in
  torch's hub cache ``<torch hub dir>/checkpoints/``), plus LPIPS's linear
  layers ``W/lpips_alex_v0.1.pth`` or the ``lpips`` package's own copy
  (``pip install --no-deps lpips``).
* ArcFace: an ONNX recognition model with a ``(N, 3, 112, 112)`` input, e.g.
  insightface's ``w600k_r50.onnx``, as ``W/arcface.onnx``; needs
  ``pip install onnxruntime``.
* CLIP-IQA: a Hugging Face ``transformers`` CLIP folder ``W/clip/``
  (``config.json``, ``model.safetensors``, tokenizer files), e.g.
  openai/clip-vit-base-patch32; needs ``transformers``.
"""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..weights import load_state_dict
from .common import ModelNotAvailable, check_same_shape, import_optional, package_dir, to_rgb
from .faces import detect_faces, identity_scores, reference_embedding

ALEXNET_FILES = ("alexnet.safetensors", "alexnet-owt-7be5be79.pth")
LPIPS_LIN_FILE = "lpips_alex_v0.1.pth"
ARCFACE_FILE = "arcface.onnx"
CLIP_FOLDER = "clip"


def load_weights(path: str | os.PathLike) -> dict[str, Tensor]:
    """Tensors of a ``.safetensors`` file or a ``weights_only`` torch checkpoint, on the CPU."""
    return load_state_dict(path, Path(path).name)


def _where(weights_dir, name: str) -> str:
    return str(Path(weights_dir) / name) if weights_dir else f"<weights_dir>/{name} (pass weights_dir)"


# ---------------------------------------------------------------- LPIPS

def _first_file(candidates) -> Path | None:
    return next((p for p in candidates if p is not None and p.is_file()), None)


def find_lpips_files(weights_dir: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """Paths of (AlexNet backbone, LPIPS linear layers); raises :class:`ModelNotAvailable` naming where to put them."""
    folders = [Path(weights_dir)] if weights_dir else []
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    backbone = _first_file([f / n for f in folders for n in ALEXNET_FILES] + [hub / ALEXNET_FILES[1]])
    if backbone is None:
        raise ModelNotAvailable(f"LPIPS needs the ImageNet AlexNet weights: put torchvision's {ALEXNET_FILES[1]} "
                                f"at {_where(weights_dir, ALEXNET_FILES[1])} or in {hub}")
    pkg = package_dir("lpips")
    lin = _first_file([f / LPIPS_LIN_FILE for f in folders] + [pkg / "weights/v0.1/alex.pth" if pkg else None])
    if lin is None:
        raise ModelNotAvailable("LPIPS needs its linear-layer weights: pip install --no-deps lpips, "
                                f"or put lpips' weights/v0.1/alex.pth at {_where(weights_dir, LPIPS_LIN_FILE)}")
    return backbone, lin


# torchvision AlexNet ``features`` convolutions: (index, stride, padding); LPIPS taps the ReLU after each
_ALEX_CONVS = ((0, 4, 2), (3, 1, 2), (6, 1, 1), (8, 1, 1), (10, 1, 1))
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)


@lru_cache(maxsize=2)
def _lpips_weights(backbone: Path, lin: Path) -> tuple[list[tuple[Tensor, Tensor]], list[Tensor]]:
    sd = load_weights(backbone)
    sd = {k.removeprefix("features."): v for k, v in sd.items()}
    try:
        convs = [(sd[f"{i}.weight"].float(), sd[f"{i}.bias"].float()) for i, _, _ in _ALEX_CONVS]
        lw = load_weights(lin)
        lins = [lw[f"lin{k}.model.1.weight"].float() for k in range(5)]
    except KeyError as e:
        raise ValueError(f"LPIPS weights: missing tensor {e} in {backbone} / {lin}") from None
    return convs, lins


def _alex_features(x: Tensor, convs) -> list[Tensor]:
    feats = []
    for k, ((w, b), (_, stride, pad)) in enumerate(zip(convs, _ALEX_CONVS)):
        if k in (1, 2):  # max-pools precede conv2 and conv3
            x = F.max_pool2d(x, 3, 2)
        x = F.relu(F.conv2d(x, w, b, stride=stride, padding=pad))
        feats.append(x)
    return feats


def lpips_alex(x: Tensor, y: Tensor, weights_dir: str | os.PathLike | None = None) -> Tensor:
    """LPIPS v0.1 (AlexNet) distance of each image pair, ``(B,)`` (Zhang et al. 2018).

    Range [0, ~1]; 0 for identical images; lower = less perceptible
    (8/255 noise is typically ~0.05-0.2). Images of at least 32x32 pixels.

    Raises:
        ModelNotAvailable: a weight file is missing (message: where to put it).
    """
    x, y = to_rgb(x, "x"), to_rgb(y, "y")
    check_same_shape(x, y, "x", "y")
    if min(x.shape[-2:]) < 32:
        raise ValueError(f"x: LPIPS needs images of at least 32x32 pixels, got {tuple(x.shape[-2:])}")
    convs, lins = _lpips_weights(*find_lpips_files(weights_dir))
    shift = torch.tensor(_LPIPS_SHIFT).view(1, 3, 1, 1)
    scale = torch.tensor(_LPIPS_SCALE).view(1, 3, 1, 1)
    with torch.no_grad():
        fx, fy = (_alex_features(((2 * t.float().cpu() - 1) - shift) / scale, convs) for t in (x, y))
        total = torch.zeros(x.shape[0])
        for a, b, w in zip(fx, fy, lins):
            a = a / (a.square().sum(1, keepdim=True).sqrt() + 1e-10)
            b = b / (b.square().sum(1, keepdim=True).sqrt() + 1e-10)
            total += F.conv2d((a - b).square(), w).mean((1, 2, 3))
    return total


# ---------------------------------------------------------------- ArcFace (ONNX)

def find_arcface(weights_dir: str | os.PathLike | None = None) -> Path:
    """Path of the ArcFace ONNX model; raises :class:`ModelNotAvailable` naming what is missing."""
    if package_dir("onnxruntime") is None:
        raise ModelNotAvailable("ArcFace needs onnxruntime: pip install onnxruntime")
    path = Path(weights_dir) / ARCFACE_FILE if weights_dir else None
    if path is None or not path.is_file():
        raise ModelNotAvailable(f"ArcFace weights not found: put an ONNX ArcFace model (112x112 input, e.g. "
                                f"insightface's w600k_r50.onnx) at {_where(weights_dir, ARCFACE_FILE)}")
    return path


@lru_cache(maxsize=2)
def _onnx_session(path: Path):
    onnxruntime = import_optional("onnxruntime", "pip install onnxruntime")
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def face_crops(x: Tensor, size: int = 112, margin: float = 0.1, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Square crops ``(B, 3, size, size)`` around the most confident face, and a ``(B,)`` found-mask.

    The detector's box is grown by ``margin`` on each side and made square
    (no landmark alignment, so identity scores run somewhat lower than with
    insightface's aligned crops). Images without a face get a zero crop.
    """
    x = to_rgb(x, "x").float()
    crops = torch.zeros(x.shape[0], 3, size, size)
    found = torch.zeros(x.shape[0], dtype=torch.bool)
    h, w = x.shape[-2:]
    for i, boxes in enumerate(detect_faces(x, backend)):
        if not boxes:
            continue
        b = boxes[0]
        side = max(b.bottom - b.top, b.right - b.left) * (1 + 2 * margin)
        cy, cx = (b.top + b.bottom) / 2, (b.left + b.right) / 2
        t, l = int(round(cy - side / 2)), int(round(cx - side / 2))
        s = int(round(side))
        pad = max(0, -t, -l, t + s - h, l + s - w)
        img = F.pad(x[i:i + 1], (pad,) * 4, mode="replicate") if pad else x[i:i + 1]
        patch = img[..., t + pad:t + pad + s, l + pad:l + pad + s]
        crops[i] = F.interpolate(patch, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
        found[i] = True
    return crops.clamp(0, 1), found


def arcface_embeddings(x: Tensor, weights_dir: str | os.PathLike | None = None, backend: str = "auto") -> Tensor:
    """ArcFace embeddings of the most confident face per image, ``(B, D)``; NaN rows where no face is found.

    Input to the network: RGB crops scaled as ``(v - 127.5) / 127.5`` (insightface's convention).
    """
    session = _onnx_session(find_arcface(weights_dir))
    crops, found = face_crops(x, 112, backend=backend)
    inp = session.get_inputs()[0]
    out = session.run(None, {inp.name: ((crops * 255 - 127.5) / 127.5).numpy()})[0]
    emb = torch.from_numpy(out).double().flatten(1)
    emb[~found] = float("nan")
    return emb


def arcface_similarity(generated: Tensor, references: Tensor, weights_dir: str | os.PathLike | None = None,
                       backend: str = "auto") -> Tensor:
    """ISM with ArcFace: cosine similarity of each generated face to the references' mean embedding, ``(B,)``.

    Range [-1, 1]; higher = identity kept. NaN where a generated image has no face.
    """
    ref = reference_embedding(arcface_embeddings(references, weights_dir, backend), "references")
    return identity_scores(arcface_embeddings(generated, weights_dir, backend), ref)["similarity"]


# ---------------------------------------------------------------- CLIP-IQA

CLIP_IQA_PROMPTS = ("Good photo.", "Bad photo.")
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def find_clip(weights_dir: str | os.PathLike | None = None) -> Path:
    """The transformers CLIP folder for CLIP-IQA; raises :class:`ModelNotAvailable` naming what is missing."""
    if package_dir("transformers") is None:
        raise ModelNotAvailable("CLIP-IQA needs transformers: pip install transformers")
    folder = Path(weights_dir) / CLIP_FOLDER if weights_dir else None
    if folder is None or not (folder / "config.json").is_file():
        raise ModelNotAvailable("CLIP-IQA weights not found: put a transformers CLIP model folder (config.json, "
                                f"model.safetensors, tokenizer files) at {_where(weights_dir, CLIP_FOLDER)}")
    return folder


@lru_cache(maxsize=1)
def _clip(folder: Path):
    transformers = import_optional("transformers", "pip install transformers")
    CLIPModel, CLIPTokenizer = transformers.CLIPModel, transformers.CLIPTokenizer
    model = CLIPModel.from_pretrained(str(folder), local_files_only=True, use_safetensors=True).eval()
    return model, CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


def _projected(out) -> Tensor:
    # transformers 4 returns the projected features; 5 returns an output whose pooler_output holds them
    return out if isinstance(out, Tensor) else out.pooler_output


def clip_iqa(x: Tensor, weights_dir: str | os.PathLike | None = None,
             prompts: tuple[str, str] = CLIP_IQA_PROMPTS) -> Tensor:
    """CLIP-IQA quality (Wang, Chan, Loy 2023): softmax probability of the positive antonym prompt, ``(B,)``.

    ``p = softmax(100 * [cos(img, "Good photo."), cos(img, "Bad photo.")])[0]``
    with the user's CLIP; images are resized to the model's input size. The
    paper's variant uses a ResNet-50 CLIP without positional embedding; with
    a ViT CLIP the numbers differ from published ones but rank images the same
    way. Range [0, 1]; higher = better quality.
    """
    x = to_rgb(x, "x").float().cpu()  # the model is loaded on the CPU
    model, tok = _clip(find_clip(weights_dir))
    size = model.config.vision_config.image_size
    img = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    img = (img - torch.tensor(_CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(_CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        text = tok(list(prompts), padding=True, return_tensors="pt")
        t = F.normalize(_projected(model.get_text_features(**text)), dim=-1)
        v = F.normalize(_projected(model.get_image_features(pixel_values=img)), dim=-1)
    return (100 * v @ t.T).softmax(-1)[:, 0]


# ---------------------------------------------------------------- LIQE

def liqe(x: Tensor, weights_dir: str | os.PathLike | None = None) -> Tensor:
    """LIQE (Zhang et al. 2023) is not implemented: it needs its own fine-tuned CLIP checkpoint and its
    scene x distortion x quality prompt set. Always raises :class:`ModelNotAvailable`."""
    raise ModelNotAvailable("LIQE is not implemented in this pack; use CLIP-IQA (put a CLIP folder at "
                            f"{_where(weights_dir, CLIP_FOLDER)}) or BRISQUE")
