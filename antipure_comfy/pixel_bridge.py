"""The pixel purifier (ANTIPURE_PIXEL_DIFFUSION) made differentiable inside a node, as :mod:`.bridge` does for MODEL/VAE.

AntiPure Load Pixel Diffusion builds the model outside the host's inference
mode, so its weights are plain tensors; the object is still shared with every
other node that holds it. :func:`pixel_session` therefore swaps each weight for
a frozen alias of the same memory (no copy; a copy only when the model must
move to the host's compute device), optionally turns on the UNet's gradient
checkpointing, and puts everything back afterwards, so flags, devices and
tensors of the caller's object are unchanged.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from ..antipure_core.model import check_model
from .bridge import alias, restore
from .comfy_host import model_management, model_patcher

PIXEL_TYPE = "ANTIPURE_PIXEL_DIFFUSION"


def check_pixel_purifier(purifier: Any, name: str = "purifier") -> None:
    """Raise ``ValueError`` naming ``name`` unless ``purifier`` is a pixel-space diffusion model (``downsample = 1``)."""
    if isinstance(purifier, model_patcher.ModelPatcher):
        raise ValueError(f"{name}: got the host's latent MODEL; connect the output of AntiPure Load Pixel "
                         f"Diffusion here, or leave {name} empty to attack the MODEL + VAE")
    try:
        check_model(purifier)
    except TypeError as e:
        raise ValueError(f"{name}: expected a pixel-space diffusion model ({PIXEL_TYPE}, from AntiPure Load "
                         f"Pixel Diffusion), got {type(purifier).__name__}") from e
    if int(purifier.downsample) != 1 or not isinstance(purifier, torch.nn.Module):
        raise ValueError(f"{name}: expected a pixel-space diffusion model (no autoencoder, down-sampling 1), got "
                         f"{type(purifier).__name__} with down-sampling {purifier.downsample}; a latent model "
                         "goes into the model/vae inputs")


def _alias_everything(module: torch.nn.Module) -> list[tuple]:
    """Replace every parameter and buffer by a frozen plain alias of the same memory; returns what to restore.

    Unlike the MODEL bridge this aliases non-inference tensors too, so moving
    the module afterwards moves the aliases and never the caller's tensors.
    """
    undo = []
    for mod in module.modules():
        for table, is_param in ((mod._parameters, True), (mod._buffers, False)):
            for name, t in list(table.items()):
                if t is not None:
                    undo.append((table, name, t, None))
                    table[name] = torch.nn.Parameter(alias(t), requires_grad=False) if is_param else alias(t)
    return undo


@contextlib.contextmanager
def pixel_session(purifier, gradient_checkpointing: bool = False) -> Iterator[Any]:
    """Differentiable use of ``purifier`` (a pixel :class:`~antipure_core.model.DiffusionModel`) inside the block.

    ``purifier`` must have passed :func:`check_pixel_purifier` (the caller's
    boundary check). Yields the same module, on the host's compute device, with plain frozen
    weights; restores its original tensors, device and flags afterwards, also
    when the block raises.
    """
    unet = getattr(purifier, "unet", None)
    had_ckpt = getattr(unet, "gradient_checkpointing", None)
    with torch.inference_mode(False), torch.enable_grad():
        undo = _alias_everything(purifier)
        try:
            device = model_management.get_torch_device()
            if purifier.device != device:
                purifier.to(device)  # moves the aliases only; the originals stay where they are
            if had_ckpt is not None:
                unet.gradient_checkpointing = bool(gradient_checkpointing)
            yield purifier
        finally:
            if had_ckpt is not None:
                unet.gradient_checkpointing = had_ckpt
            restore(undo)
            model_management.soft_empty_cache()
