"""Load Pixel Diffusion on the host: a guided-diffusion ADM checkpoint from ``models/pixel_diffusion`` as the pack's
pixel-space purifier (``ANTIPURE_PIXEL_DIFFUSION``, the core's :class:`PixelDiffusion`).

ComfyUI has no loader for these models (its UNet has no legacy-order qkv
attention), so the pack brings its own and its own model folder:
``models/pixel_diffusion`` (more folders through ``extra_model_paths.yaml``
under the key ``pixel_diffusion``). Weights are read as ``.safetensors`` or
through ``torch.load(weights_only=True)``, never by unpickling code.
"""
from __future__ import annotations

import os

import torch

from ..antipure_core.pixel_diffusion import load_pixel_diffusion
from ..antipure_core.weights import WEIGHT_SUFFIXES
from .comfy_host import folder_paths, model_management

#: the host's model folder name (``models/pixel_diffusion``)
FOLDER = "pixel_diffusion"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def register_folder() -> list[str]:
    """Register ``models/pixel_diffusion`` with the host (idempotent); returns the folder's paths."""
    folder_paths.add_model_folder_path(FOLDER, os.path.join(folder_paths.models_dir, FOLDER))
    folder_paths.folder_names_and_paths[FOLDER][1].update(WEIGHT_SUFFIXES)
    return folder_paths.get_folder_paths(FOLDER)


def load_pixel_model(ckpt_name: str, weight_dtype: str = "fp32", num_head_channels: int = 64):
    """The ``PixelDiffusion`` in ``models/pixel_diffusion/<ckpt_name>``, on the host's torch device, with plain
    (non-inference) weights so that Protect can back-propagate through it."""
    if weight_dtype not in DTYPES:
        raise ValueError(f"weight_dtype: expected one of {', '.join(DTYPES)}, got {weight_dtype!r}")
    path = folder_paths.get_full_path(FOLDER, ckpt_name)
    if path is None:
        raise FileNotFoundError(f"ckpt_name: {ckpt_name!r} is not in {', '.join(register_folder())}; put "
                                "the checkpoint (e.g. 256x256_diffusion_uncond.pt) there and refresh")
    device = model_management.get_torch_device()
    # outside inference mode, so the weights can take part in a backward pass (AntiPure Protect)
    with torch.inference_mode(False):
        model = load_pixel_diffusion(path, num_head_channels=num_head_channels, dtype=DTYPES[weight_dtype])
        model_management.free_memory(model_management.module_size(model), device)
        model = model.to(device)
    return model
