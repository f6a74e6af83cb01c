"""DreamBooth on the host: every UNet weight, and optionally the text encoder, fine-tuned on a clone.

Training puts a zero-started difference on every weight of a clone (the
host trainer's ``BiasDiff`` wrapper, :func:`add_differences`, as ASPL's
full fine-tuning does), so the input MODEL / CLIP are never written.
The trained differences come out as ordinary weight patches
(``add_patches``, the host's "diff" patch) on fresh clones: the host samples
them like any LoRA patch, and its own ``CheckpointSave`` code bakes them into
a checkpoint (:func:`save_checkpoint`).

Defaults are Anti-DreamBooth's (VinAIResearch/Anti-DreamBooth,
``scripts/train_dreambooth_alone.sh`` and the DreamBooth step of every
``scripts/attack_with_*.sh``: ``--learning_rate=5e-7 --max_train_steps=1000
--train_batch_size=2 --prior_loss_weight=1.0 --num_class_images=200
--train_text_encoder --mixed_precision=bf16``; ``train_dreambooth.py``:
AdamW betas (0.9, 0.999), weight decay 1e-2, ``--max_grad_norm`` 1.0).
Its class images come from the model's own pipeline with its default 50
steps and guidance 7.5 (diffusers' defaults), here from the host's sampler.
One difference by design: AdamW's weight decay pulls the difference, not
the weight, toward zero (at lr 5e-7 a change of 5e-9 of a weight per step).
"""
from __future__ import annotations

import contextlib
import os

import torch

from . import bridge
from .comfy_host import clip_model, comfy_utils, folder_paths, model_management, nodes_model_merging, sample
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


def attach_text_encoder(clip):
    """A clone of ``clip`` with a trainable zero difference on every text-encoder weight the host loads
    (all but :data:`UNSET_TEXT_KEYS`); ``(clone, {key: diff})``."""
    trained = clip.clone()
    return trained, add_differences(trained.patcher, skip=UNSET_TEXT_KEYS)


def with_differences(patchable, diffs: dict):
    """A clone of the MODEL or CLIP ``patchable`` carrying ``diffs`` as the host's weight patches."""
    out = patchable.clone()
    with torch.inference_mode(False):
        out.add_patches({k: (d.detach().clone(),) for k, d in diffs.items()}, 1.0, 1.0)
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


def optimizer_factory(name: str, device):
    """``None`` (the core's AdamW) or bitsandbytes' 8-bit AdamW, which exists for CUDA devices only."""
    if name == "adamw":
        return None
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
