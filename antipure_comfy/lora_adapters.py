"""LoRA on the host's MODEL with the host's own trainable weight adapters, and saving it for the host's LoRA loaders.

The adapters are ``comfy.weight_adapter`` LoRA train modules attached with
``ModelPatcher.add_weight_wrapper`` to a clone of the MODEL, as the host's
``TrainLoraNode`` does: the base weights are never written, the host's loader
applies ``W + (alpha / rank) up @ down`` on the fly at every forward, and the
clone's patch id changes, so the host reloads the weights when it switches
between the clone and the untouched input MODEL.

Saved files use the kohya key layout ``lora_unet_<unet path with _>.lora_up.weight``
/ ``.lora_down.weight`` / ``.alpha`` (``up`` ``(out, r, *1)``, ``down``
``(r, in, *k)``), one of the names the host's ``comfy.lora.model_lora_keys_unet``
maps back to the UNet weight, so ``LoraLoader`` / ``LoraLoaderModelOnly`` load them.

Example (inside a node; ``model`` is the host's MODEL)::

    keys = target_keys(model, "attention")
    mp, adapters = attach_lora(model, keys, rank=4, alpha=4.0, seed=0)
    ...                                                  # train trainable_parameters(adapters)
    name = save_lora(lora_state_dict(mp, adapters), "my_lora", metadata)
"""
from __future__ import annotations

import os
import re
from typing import Optional

import torch
from torch import Tensor

from .comfy_host import comfy_utils, folder_paths, weight_adapter

_ATTENTION = r"attn[12]\.(to_q|to_k|to_v|to_out\.0)"
#: which UNet weights get an adapter: regex on the module path inside ``model.model``
TARGETS = {
    # DreamBooth-LoRA (diffusers train_dreambooth_lora): the attention projections of the transformer blocks
    "attention": rf"^diffusion_model\..*\.transformer_blocks\.\d+\.{_ATTENTION}$",
    # plus the transformer blocks' feed-forward layers and the spatial transformers' in/out projections
    "attention+feed-forward": rf"^diffusion_model\..*(\.transformer_blocks\.\d+\.({_ATTENTION}|ff\.net\.(0\.proj|2))"
                              r"|\.proj_(in|out))$",
    # every weight matrix and convolution kernel of the UNet
    "all": r"^diffusion_model\.",
}
_PREFIX = "diffusion_model."
_LOADER_PREFIX = "lora_unet_"


def target_keys(model, target: str = "attention") -> list[str]:
    """Weight keys (``diffusion_model.<path>.weight``) of the host MODEL ``model`` that ``target`` adapts.

    Only the host's castable layers (those with a ``weight_function``) whose
    weight has two or more dimensions qualify (Linear / Conv).

    Raises:
        ValueError: ``target`` is not one of :data:`TARGETS`, or matches no layer of this model.
    """
    if target not in TARGETS:
        raise ValueError(f"target: expected one of {list(TARGETS)}, got {target!r}")
    pattern = re.compile(TARGETS[target])
    keys = [f"{n}.weight" for n, m in model.model.named_modules()
            if hasattr(m, "weight_function") and isinstance(getattr(m, "weight", None), Tensor)
            and m.weight.ndim >= 2 and pattern.search(n)]
    if not keys:
        raise ValueError(f"target: {target!r} matches no layer of this {type(model.model).__name__} UNet; "
                         "choose 'all'")
    return keys


def attach_lora(model, keys: list[str], rank: int, alpha: float, seed: int):
    """A clone of ``model`` with a fresh trainable host LoRA adapter on each weight in ``keys``.

    ``up`` is Kaiming-uniform from the CPU generator seeded with ``seed`` (the
    same adapters on every device) and ``down`` is zero, so the clone
    initially predicts exactly what ``model`` predicts.

    Returns:
        ``(clone, {key: adapter})``; the adapters' ``lora_up`` / ``lora_down`` weights are
        float32 leaf tensors with ``requires_grad=True``.
    """
    mp = model.clone()
    adapters = {}
    # outside inference mode, else the adapter weights would be inference tensors autograd refuses to train
    with torch.inference_mode(False), torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        for key in keys:
            weight = comfy_utils.get_attr(mp.model, key)
            # create_train reads only shape and device: a zero-stride CPU stand-in keeps the init on the
            # seeded CPU generator and copies nothing; the host moves adapters to the load device itself
            stand_in = torch.empty((), dtype=torch.float32).expand(weight.shape)
            adapter = weight_adapter.LoRAAdapter.create_train(stand_in, rank=rank, alpha=float(alpha))
            mp.add_weight_wrapper(key, adapter)
            adapters[key] = adapter
    return mp, adapters


def trainable_parameters(adapters: dict) -> list[Tensor]:
    """The adapters' trainable tensors (``lora_up``, ``lora_down`` of each), in key order."""
    return [p for a in adapters.values() for p in a.parameters() if p.requires_grad]


def lora_state_dict(model, adapters: dict) -> dict[str, Tensor]:
    """The adapters as a LoRA state dict the host's LoRA loaders read (float32, CPU, detached copies).

    Keys ``lora_unet_<path>.lora_up.weight`` ``(out, r, *1)``, ``.lora_down.weight``
    ``(r, in, *k)`` and ``.alpha`` (scalar) for each ``diffusion_model.<path>.weight``.
    """
    sd = {}
    for key, adapter in adapters.items():
        if not key.startswith(_PREFIX) or not key.endswith(".weight"):
            raise ValueError(f"adapters: {key!r} is not a UNet weight key (diffusion_model.<path>.weight)")
        shape = tuple(comfy_utils.get_attr(model.model, key).shape)
        name = _LOADER_PREFIX + key[len(_PREFIX):-len(".weight")].replace(".", "_")
        up = adapter.lora_up.weight.detach().float().cpu()
        down = adapter.lora_down.weight.detach().float().cpu()
        rank = down.shape[0]
        sd[f"{name}.lora_up.weight"] = up.reshape(shape[0], rank, *[1] * (len(shape) - 2)).clone()
        sd[f"{name}.lora_down.weight"] = down.reshape(rank, *shape[1:]).clone()
        sd[f"{name}.alpha"] = adapter.alpha.detach().float().cpu().reshape(()).clone()
    return sd


def lora_file_stem(name: str, what: str = "lora_name") -> str:
    """Check a LoRA file name given by the user; returns it without ``.safetensors``.

    Subfolders (``a/b``) are allowed; absolute paths and ``..`` are not, so a
    file never lands outside the LoRA folder.
    """
    stem = (name or "").strip().replace("\\", "/")
    if stem.lower().endswith(".safetensors"):
        stem = stem[: -len(".safetensors")]
    parts = stem.split("/")
    if not stem or os.path.isabs(stem) or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"{what}: {name!r} is not a usable file name; give a plain name such as "
                         "'sks_person' (subfolders like 'antipure/sks_person' are fine, '..' and absolute "
                         "paths are not)")
    return stem


def lora_folder() -> str:
    """The host's first ``loras`` folder, where ``LoraLoader`` lists files."""
    return folder_paths.get_folder_paths("loras")[0]


def save_lora(state_dict: dict[str, Tensor], name: str, metadata: Optional[dict[str, str]] = None) -> str:
    """Save ``state_dict`` as ``<name>.safetensors`` in :func:`lora_folder`, never overwriting a file.

    An existing ``<name>.safetensors`` is kept and the new file numbered
    ``<name>_00001.safetensors``, ``_00002``, ...

    Returns:
        The saved file's name relative to the LoRA folder, with ``/`` separators (as the
        host's ``LoraLoader`` lists it).
    """
    stem = lora_file_stem(name)
    folder = lora_folder()
    os.makedirs(os.path.dirname(os.path.join(folder, stem)) or folder, exist_ok=True)
    for counter in range(100000):
        rel = f"{stem}.safetensors" if counter == 0 else f"{stem}_{counter:05d}.safetensors"
        path = os.path.join(folder, rel)
        try:  # claim the name atomically, so two runs never write the same file
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            continue
        try:
            comfy_utils.save_torch_file(state_dict, path, metadata=metadata)
        except BaseException:
            os.remove(path)
            raise
        return rel
    raise FileExistsError(f"lora_name: {stem}.safetensors and 99999 numbered variants exist in {folder}")
