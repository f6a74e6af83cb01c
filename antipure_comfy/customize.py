"""Customize on the host: DreamBooth-style LoRA fine-tuning of the user's MODEL on an IMAGE batch (the attacker's step).

The host's own trainable LoRA adapters (:mod:`.lora_adapters`) sit on a
clone of the MODEL; the core's :func:`~antipure_core.customize.customize`
loop trains them through :func:`.bridge.session`, which makes the host's
weights differentiable under its inference mode (the adapters live in the
layers' ``weight_function`` lists, not in the module tree, so the bridge
leaves them alone and they stay trainable leaf tensors). The node returns the
clone, and saves the LoRA in the host's ``loras`` folder so ``LoraLoader`` /
``LoraLoaderModelOnly`` reproduce the same model later.

Loss: ε-models train on the ε error; v-models (SD2.x 768-v) on the v error,
i.e. ``prediction='v'`` in the core (the bridge's ε is converted back), which
weights timestep t by ``1 / abar_t`` as the model's own training and the
diffusers DreamBooth-LoRA script do; an ε loss would instead shrink the
high-noise steps' share of the gradient by ``abar_t`` against what the model
was trained for.
"""
from __future__ import annotations

import json
import logging
import math

import torch

from ..antipure_core.customize import Prior, as_image_batch, customize
from . import bridge, checkpointing as ckpt
from .comfy_host import model_sampling
from .images import to_core
from .lora_adapters import (attach_lora, lora_file_stem, lora_folder, lora_state_dict, save_lora,
                            target_keys, trainable_parameters)
from .progress import host_callback

log = logging.getLogger(__name__)


def _one(values, name: str):
    """The single value of an input that the host passed as a list (``is_input_list``); ``None`` if absent."""
    if values is None or len(values) == 0:
        return None
    if len(values) > 1:
        raise ValueError(f"{name}: got a list of {len(values)} values, but one customization trains one LoRA; "
                         f"give a single {name} (only images and class_images may come as lists)")
    return values[0]


def _check_int(value, name: str, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: must be an integer >= 1 ({hint}), got {value!r}")


def _check_positive(value, name: str, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: must be finite and > 0 ({hint}), got {value!r}")


def image_batch(images, name: str) -> torch.Tensor:
    """IMAGE input(s) -> one core batch ``(B, 3, H, W)``; list items of different sizes are named in the error."""
    if images is None or len(images) == 0:
        raise ValueError(f"{name}: no images given")
    items = [to_core(im, name if len(images) == 1 else f"{name}[{k}]")[0] for k, im in enumerate(images)]
    return as_image_batch(items[0] if len(items) == 1 else items, name)


def prediction_type(model) -> str:
    """``'v'`` for a v-prediction MODEL (also after a ModelSamplingDiscrete patch), else ``'eps'``."""
    return "v" if isinstance(model.get_model_object("model_sampling"), model_sampling.V_PREDICTION) else "eps"


def training_clone(mp):
    """The clone to train with: fp16 compute becomes fp32 (fp16 gradients underflow without loss scaling).

    Only the training run is affected; the returned MODEL samples as loaded.
    Both clones share the same adapter objects.
    """
    if (mp.get_model_object("manual_cast_dtype") or mp.model_dtype()) != torch.float16:
        return mp
    train = mp.clone()
    train.set_model_compute_dtype(torch.float32)
    return train


def customize_lora(model, vae, images, positive, lora_name, steps, learning_rate, rank, alpha, target, batch_size,
                   grad_accumulation, seed, gradient_checkpointing, class_positive=None, class_images=None,
                   prior_weight=None, node_id=None):
    """The Customize node's work on its inputs as the host passes them (lists: ``is_input_list``).

    Checks everything before any model work, trains a LoRA on a clone of ``model``, saves it (unless
    ``lora_name`` is empty) and returns ``(MODEL with the LoRA, saved file name, {"loss": losses}, summary)``.
    """
    # everything arrives as a list (is_input_list); check all of it before any model work
    model, vae, positive = _one(model, "model"), _one(vae, "vae"), _one(positive, "positive")
    lora_name, steps, lr = _one(lora_name, "lora_name"), _one(steps, "steps"), _one(learning_rate, "learning_rate")
    rank, alpha, target = _one(rank, "rank"), _one(alpha, "alpha"), _one(target, "target")
    batch_size, grad_accum = _one(batch_size, "batch_size"), _one(grad_accumulation, "grad_accumulation")
    seed, checkpointing = _one(seed, "seed"), _one(gradient_checkpointing, "gradient_checkpointing")
    class_positive = _one(class_positive, "class_positive")
    prior_weight = 1.0 if prior_weight is None else _one(prior_weight, "prior_weight")

    bridge.check_inputs(model, vae, positive)
    x = image_batch(images, "images")
    _check_int(steps, "steps", "DreamBooth-LoRA: 400-1000")
    _check_int(rank, "rank", "the LoRA rank; DreamBooth-LoRA: 4")
    _check_int(batch_size, "batch_size", "DreamBooth: 1")
    _check_int(grad_accum, "grad_accumulation", "1 = none")
    _check_positive(alpha, "alpha", "alpha = rank gives scale 1")
    _check_positive(lr, "learning_rate", "DreamBooth-LoRA: 1e-4")
    prior = None
    if (class_positive is None) != (class_images is None):
        missing = "class_images" if class_images is None else "class_positive"
        raise ValueError(f"{missing}: prior preservation needs both class_positive and class_images; "
                         f"connect {missing} or disconnect the other")
    if class_positive is not None:
        bridge.check_conditioning(class_positive, "class_positive")
        prior = Prior(class_positive, images=image_batch(class_images, "class_images"), weight=prior_weight)
    stem = lora_file_stem(lora_name) if (lora_name or "").strip() else None
    keys = target_keys(model, target)

    mp, adapters = attach_lora(model, keys, rank, alpha, seed)
    params = trainable_parameters(adapters)
    prediction = prediction_type(model)
    train_mp = training_clone(mp)
    callback = host_callback(steps, node_id)
    with bridge.open_session(train_mp, vae, positive) as dm, \
            ckpt.gradient_checkpointing(train_mp, enabled=checkpointing):
        losses = customize(dm, x, dm.cond, params, steps=steps, lr=lr, batch_size=batch_size,
                           grad_accum=grad_accum, prediction=prediction, prior=prior, generator=seed,
                           callback=callback)
    for p in params:
        p.requires_grad_(False)

    summary = (f"Customized {type(model.model.model_config).__name__} on {x.shape[0]} image(s): {steps} steps, "
               f"{len(keys)} LoRA layers (rank {rank}, {target}), {prediction}-loss "
               f"{losses[0]:.4g} -> {losses[-1]:.4g}.")
    saved = ""
    if stem is not None:
        settings = dict(steps=steps, learning_rate=lr, rank=rank, alpha=alpha, target=target,
                        batch_size=batch_size, grad_accumulation=grad_accum, seed=seed, prediction=prediction,
                        prior_weight=prior_weight if prior is not None else None, images=int(x.shape[0]),
                        base=type(model.model.model_config).__name__, final_loss=losses[-1])
        metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank),
                    "ss_network_alpha": str(alpha), "antipure_customize": json.dumps(settings)}
        saved = save_lora(lora_state_dict(mp, adapters), stem, metadata)
        wanted = f"{stem}.safetensors"
        summary += (f" Saved the LoRA as '{saved}'" if saved == wanted else
                    f" '{wanted}' already exists, so the LoRA was saved as '{saved}'") + f" in {lora_folder()}."
    else:
        summary += " The LoRA was not saved (lora_name is empty)."
    log.info(summary)
    return mp, saved, {"loss": losses}, summary
