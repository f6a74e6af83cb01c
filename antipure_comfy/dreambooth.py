"""DreamBooth on the host: every UNet weight, and optionally the text encoder, fine-tuned on a clone.

The UNet trains as a private copy (:func:`trainable_copy`): the host's
weights as it samples with them (its patches applied by its own
``calculate_weight``) become float32 leaf tensors of a deep copy of the
model, so the input MODEL is never written and training holds what
diffusers' DreamBooth holds (weight, gradient, two AdamW moments) beside the
host's own weights; no per-layer sums. The text encoder (small) trains a
zero-started difference on a clone's weights (the host trainer's
``BiasDiff`` wrapper, :func:`add_differences`). Both come out as ordinary
weight patches (the host's "diff" patch, :func:`with_differences`) on fresh
clones: the host samples them like any LoRA patch, and its own
``CheckpointSave`` code bakes them into a checkpoint (:func:`save_checkpoint`).

Defaults are Anti-DreamBooth's (VinAIResearch/Anti-DreamBooth,
``scripts/train_dreambooth_alone.sh`` and the DreamBooth step of every
``scripts/attack_with_*.sh``: ``--learning_rate=5e-7 --max_train_steps=1000
--train_batch_size=2 --prior_loss_weight=1.0 --num_class_images=200
--train_text_encoder --mixed_precision=bf16``; ``train_dreambooth.py``:
AdamW betas (0.9, 0.999), weight decay 1e-2, ``--max_grad_norm`` 1.0).
Its class images come from the model's own pipeline with its default 50
steps and guidance 7.5 (diffusers' defaults), here from the host's sampler.
On the text encoder, AdamW's weight decay pulls the difference, not the
weight, toward zero (at lr 5e-7 a change of 5e-9 of a weight per step).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import os
import uuid

import torch

from . import bridge
from .comfy_host import (clip_model, comfy_lora, comfy_utils, folder_paths, model_management, model_patcher,
                         nodes_model_merging, sample)
from .comfy_host import nodes_train

#: CLIP weights the host never loads or saves (``comfy/supported_models.py`` pops them from SD1.x / SDXL
#: checkpoints) and no conditioning reads (CLIP-L's pooled output is not projected there): the tensor is the
#: host's uninitialised memory, so it is not trained (a difference on it would only carry that memory along)
UNSET_TEXT_KEYS = frozenset({"clip_l.transformer.text_projection.weight"})
#: diffusers' pipeline guidance scale, with which DreamBooth generates its class images
CLASS_CFG = 7.5
PRECISIONS = ("auto", "fp32", "bf16")
OPTIMIZERS = ("adamw", "adamw8bit")


def add_differences(patcher, prefix: str = "", skip=frozenset()) -> dict:
    """Put a trainable zero difference (float32) on every castable weight and bias under ``prefix`` of
    ``patcher.model`` (the host trainer's ``BiasDiff`` wrapper), except the keys in ``skip``; ``patcher``
    must be a fresh clone.

    Returns:
        ``{state-dict key: difference}``, the keys the host's ``add_patches`` takes.
    """
    diffs = {}
    with torch.inference_mode(False):
        for name, m in patcher.model.named_modules():
            if not name.startswith(prefix) or not hasattr(m, "weight_function"):
                continue
            for attr in ("weight", "bias"):
                w = getattr(m, attr, None)
                if isinstance(w, torch.Tensor) and f"{name}.{attr}" not in skip:
                    diff = torch.nn.Parameter(torch.zeros(w.shape, dtype=torch.float32))
                    patcher.add_weight_wrapper(f"{name}.{attr}", nodes_train.BiasDiff(diff))
                    diffs[f"{name}.{attr}"] = diff
    return diffs


def start_weight(model, key: str, stored) -> torch.Tensor:
    """``key``'s weight as ``model`` samples with it, in float32 on ``model``'s offload device (so a copy of the
    model is never made on the accelerator beside the host's): the stored weight (the host's backup when patches
    are applied now) plus every patch, computed by the host's ``calculate_weight``."""
    (base, convert), *patches = stored
    w = convert(base.to(model.offload_device, torch.float32, copy=True), inplace=True)
    return comfy_lora.calculate_weight(patches, w, key) if patches else w


def trainable_copy(model, prefix: str = "diffusion_model."):
    """A MODEL of its own for full fine-tuning: a deep copy of ``model.model`` whose weights under ``prefix`` are
    float32 leaf tensors holding :func:`start_weight` (other tensors are shared with the host, frozen).

    The copy carries ``model``'s object patches and options but no weight patches (they are in its weights).
    Enter :func:`.bridge.session` on it, then :func:`copy_parameters` gives the tensors to train.
    """
    stored = model.get_key_patches(prefix)
    src = model.model
    with torch.inference_mode(False):
        # deepcopy with every weight pre-mapped: the trained ones to new float32 tensors, the rest to the
        # host's own, so nothing is copied twice; the host's patcher is not part of the model
        memo = {id(src.current_patcher): None} if getattr(src, "current_patcher", None) is not None else {}
        for name, p in src.named_parameters():
            memo[id(p)] = (torch.nn.Parameter(start_weight(model, name, stored[name]), requires_grad=False)
                           if name in stored else p)
        twin = copy.deepcopy(src, memo)
    for m in twin.modules():  # the host's per-load state of the original, which the copy's patcher redoes
        for attr, fresh in (("weight_function", []), ("bias_function", []), ("comfy_patched_weights", False)):
            if hasattr(m, attr):
                setattr(m, attr, copy.copy(fresh))
    for attr in ("model_loaded_weight_memory", "lowvram_patch_counter", "model_lowvram", "current_weight_patches_uuid"):
        if hasattr(twin, attr):
            delattr(twin, attr)
    twin.device = model.offload_device
    out = model_patcher.ModelPatcher(twin, model.load_device, model.offload_device)
    out.object_patches = model.object_patches.copy()
    out.model_options = copy.deepcopy(model.model_options)
    out.patches_uuid = uuid.uuid4()
    if model.model_dtype() != torch.float32:  # half-precision storage: the float32 copy computes in float32
        out.set_model_compute_dtype(torch.float32)
    return out


def copy_parameters(train, prefix: str = "diffusion_model.") -> dict:
    """``{key: tensor}`` of :func:`trainable_copy`'s weights under ``prefix``, made trainable; read them inside the
    session (loading may move them), whose exit freezes them again."""
    params = {k: p for k, p in train.model.named_parameters() if k.startswith(prefix)}
    for p in params.values():
        p.requires_grad_(True)
    return params


def differences(model, params: dict) -> dict:
    """The trained weights as differences from :func:`start_weight`, in place (the copy is spent), on
    ``model``'s offload device: the patches :func:`with_differences` puts on a clone of ``model``."""
    stored = model.get_key_patches("diffusion_model.")
    with torch.inference_mode(False), torch.no_grad():
        return {k: p.detach().sub_(start_weight(model, k, stored[k]).to(p.device)).to(model.offload_device)
                for k, p in params.items()}


def attach_text_encoder(clip):
    """A clone of ``clip`` with a trainable zero difference on every text-encoder weight the host loads
    (all but :data:`UNSET_TEXT_KEYS`); ``(clone, {key: diff})``."""
    trained = clip.clone()
    return trained, add_differences(trained.patcher, skip=UNSET_TEXT_KEYS)


def with_differences(patchable, diffs: dict):
    """A clone of the MODEL or CLIP ``patchable`` carrying ``diffs`` as the host's weight patches."""
    out = patchable.clone()
    with torch.inference_mode(False):
        out.add_patches({k: (d.detach(),) for k, d in diffs.items()}, 1.0, 1.0)
    return out


def _residual_out_of_place(layer):
    # the host's CLIPLayer adds its residuals in place (x += ...), over the input its LayerNorm saved for
    # backward; the same sums out of place, for the length of a training session only
    def forward(x, mask=None, optimized_attention=None):
        x = x + layer.self_attn(layer.layer_norm1(x), mask, optimized_attention)
        return x + layer.mlp(layer.layer_norm2(x))
    return forward


@contextlib.contextmanager
def text_encoder_session(clip):
    """The CLIP loaded fully and differentiable (as :func:`.bridge.session` does for MODEL and VAE)."""
    layers = [m for m in clip.cond_stage_model.modules() if isinstance(m, clip_model.CLIPLayer)]
    with torch.inference_mode(False), torch.enable_grad():
        model_management.load_models_gpu([clip.patcher], force_full_load=True)
        undo = bridge.swap_in_plain_tensors(clip.cond_stage_model)
        try:
            for m in layers:
                m.forward = _residual_out_of_place(m)
            yield
        finally:
            for m in layers:
                del m.forward
            bridge.restore(undo)


def prompt_encoder(clip, text: str):
    """A callable giving ``text``'s CONDITIONING from ``clip`` anew (with gradient) at every call."""
    tokens = clip.tokenize(text)
    return lambda: clip.encode_from_tokens_scheduled(tokens, show_pbar=False)


def empty_conditioning(cond, clip=None):
    """The negative for class-image guidance: the empty prompt through ``clip``, else ``cond`` zeroed."""
    if clip is not None:
        return clip.encode_from_tokens_scheduled(clip.tokenize(""), show_pbar=False)
    return [[torch.zeros_like(c), {k: torch.zeros_like(v) if k == "pooled_output" else v for k, v in d.items()}]
            for c, d in cond]


def generate_class_latents(model, positive, negative, count: int, latent_hw: tuple[int, int], steps: int,
                           sampler_name: str, seed: int, callback=None) -> torch.Tensor:
    """``count`` class images as scaled latents ``(count, 4, h, w)``, sampled by the untouched ``model``
    with the host's sampler (guidance :data:`CLASS_CFG`), 8 at a time as DreamBooth's ``sample_batch_size``."""
    out = []
    for k in range(0, count, 8):
        empty = torch.zeros((min(8, count - k), 4, *latent_hw))
        noise = sample.prepare_noise(empty, seed + k)
        z = sample.sample(model, noise, steps, CLASS_CFG, sampler_name, "normal", positive, negative, empty,
                          callback=callback, disable_pbar=True, seed=seed + k)
        out.append(z.float())
    with torch.inference_mode(False):  # plain tensors: training saves them for backward
        return model.get_model_object("latent_format").process_in(torch.cat(out)).clone()


def precision_clone(mp, precision: str, default):
    """The clone to train with: ``auto`` keeps ``default(mp)`` (fp16 -> fp32), else the host's compute dtype."""
    if precision == "auto":
        return default(mp)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    device = mp.load_device
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"precision: bf16 is not supported on {torch.cuda.get_device_name(device)}; choose fp32 "
                         "(fp16 is not offered: its gradients underflow without loss scaling)")
    train = mp.clone()
    train.set_model_compute_dtype(dtype)
    return train


def optimizer_factory(name: str, device, fused: bool = False):
    """``None`` (the core's AdamW), torch's fused AdamW (``fused``, on CPU and CUDA) or bitsandbytes' 8-bit AdamW,
    which exists for CUDA devices only.

    The fused AdamW is the same update in one kernel per tensor instead of a chain of element-wise passes over
    weight, gradient and moments: it pays where that pass is a large part of a step (every UNet weight), not for
    a LoRA's few tensors (whose runs stay as they were).
    """
    if name == "adamw":
        return functools.partial(torch.optim.AdamW, fused=True) if fused and device.type in ("cpu", "cuda") else None
    if device.type != "cuda":
        raise ValueError(f"optimizer: adamw8bit (bitsandbytes) runs on CUDA devices only, and this model trains "
                         f"on {device}; choose adamw")
    try:
        import bitsandbytes
    except ImportError:
        raise ValueError("optimizer: adamw8bit needs the bitsandbytes package (pip install bitsandbytes); "
                         "install it or choose adamw") from None
    return bitsandbytes.optim.AdamW8bit


def checkpoint_folder() -> str:
    """The host's first ``checkpoints`` folder, where Load Checkpoint lists files."""
    return folder_paths.get_folder_paths("checkpoints")[0]


def save_checkpoint(model, clip, vae, prefix: str) -> str:
    """Save MODEL + CLIP + VAE with the host's ``CheckpointSave`` code into :func:`checkpoint_folder`.

    Returns the file's name as Load Checkpoint lists it (``<prefix>_00001_.safetensors``, numbered past
    existing files). A failed save leaves no file.
    """
    folder = checkpoint_folder()
    full, name, counter, subfolder, _ = folder_paths.get_save_image_path(prefix, folder)
    rel = os.path.join(subfolder, f"{name}_{counter:05}_.safetensors").replace("\\", "/")
    path = os.path.join(folder, rel)
    os.makedirs(full, exist_ok=True)
    try:
        nodes_model_merging.save_checkpoint(model, clip, vae, filename_prefix=prefix, output_dir=folder)
    except BaseException:
        if os.path.exists(path):
            os.remove(path)
        raise
    return rel


def cancel_check(total: int, node_id=None):
    """The host sampler's callback: progress of class-image generation, and the host's cancel."""
    bar = comfy_utils.ProgressBar(max(total, 1), node_id=node_id)
    done = [0]

    def callback(step, x0, x, steps):
        model_management.throw_exception_if_processing_interrupted()
        done[0] += 1
        bar.update_absolute(done[0], total)
    return callback
