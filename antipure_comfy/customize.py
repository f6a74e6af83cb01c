"""Customize on the host: DreamBooth (every UNet weight, text encoder optional) or DreamBooth-LoRA fine-tuning
of the user's MODEL on an IMAGE batch (the attacker's step).

``training='dreambooth'`` is :mod:`.dreambooth`. For ``'lora'``, the host's own trainable LoRA adapters (:mod:`.lora_adapters`) sit on a
clone of the MODEL; the core's :func:`~antipure_core.customize.customize`
loop trains them through :func:`.bridge.open_session`, which makes the host's
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

import contextlib
import json
import logging
import math

import torch

from ..antipure_core.customize import CLASS_PROMPT, INSTANCE_PROMPT, Prior, as_image_batch, customize, encode_images
from . import bridge, checkpointing as ckpt
from .comfy_host import model_sampling
from . import dreambooth as db
from .images import to_core
from .lora_adapters import (attach_lora, lora_file_stem, lora_folder, lora_state_dict, save_lora,
                            target_keys, trainable_parameters)
from .progress import host_callback

log = logging.getLogger(__name__)

TRAINING = ("lora", "dreambooth")
#: what 0 in these inputs means: DreamBooth-LoRA's (diffusers) and Anti-DreamBooth's DreamBooth settings
#: (its scripts/train_dreambooth_alone.sh, see :mod:`.dreambooth`). The LoRA column is the node's behaviour
#: before the dreambooth mode existed (no clipping, no generated class images), so old graphs train the same.
DEFAULTS = {"lora": dict(steps=400, learning_rate=1e-4, batch_size=1, max_grad_norm=None, class_image_count=0),
            "dreambooth": dict(steps=1000, learning_rate=5e-7, batch_size=2, max_grad_norm=1.0,
                               class_image_count=200)}


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


def _lists_to_values(inputs: dict) -> dict:
    """Each input's single value (the host passes lists: ``is_input_list``); images stay lists."""
    return {k: (v if k in ("images", "class_images") else _one(v, k)) for k, v in inputs.items()}


def customize_model(node_id=None, **inputs):
    """The Customize node's work on its inputs as the host passes them (lists: ``is_input_list``).

    Checks everything before any model work, trains a LoRA or (``training='dreambooth'``) every UNet
    weight and optionally the text encoder on clones, saves the LoRA / checkpoint when named and returns
    ``(MODEL, CLIP or None, saved LoRA name, saved checkpoint name, {"loss": losses}, summary)``.
    Inputs a graph saved before the dreambooth mode lacks take the LoRA behaviour of that time.
    """
    a = _lists_to_values(inputs)
    training = a.get("training") or "lora"
    if training not in TRAINING:
        raise ValueError(f"training: expected one of {TRAINING}, got {training!r}")
    for key, value in DEFAULTS[training].items():
        if not a.get(key):  # 0 or absent (a graph saved before the input existed) = this mode's default
            a[key] = value
    model, vae, positive, clip = a["model"], a["vae"], a["positive"], a.get("clip")
    bridge.check_inputs(model, vae, positive)
    x = image_batch(a["images"], "images")
    steps, lr, batch_size, grad_accum = a["steps"], a["learning_rate"], a["batch_size"], a["grad_accumulation"]
    _check_int(steps, "steps", "0 = the mode's default; DreamBooth 1000, DreamBooth-LoRA 400-1000")
    _check_int(batch_size, "batch_size", "0 = the mode's default; DreamBooth 2, DreamBooth-LoRA 1")
    _check_int(grad_accum, "grad_accumulation", "1 = none")
    _check_positive(lr, "learning_rate", "0 = the mode's default; DreamBooth 5e-7, DreamBooth-LoRA 1e-4")
    max_norm = a["max_grad_norm"]
    if max_norm is not None and max_norm < 0:
        max_norm = None  # -1: never clip
    elif max_norm is not None:
        _check_positive(max_norm, "max_grad_norm", "DreamBooth: 1.0; 0 = the mode's default, -1 = no clipping")
    precision, opt_name = a.get("precision") or "auto", a.get("optimizer") or "adamw"
    if precision not in db.PRECISIONS:
        raise ValueError(f"precision: expected one of {db.PRECISIONS}, got {precision!r}")
    if opt_name not in db.OPTIMIZERS:
        raise ValueError(f"optimizer: expected one of {db.OPTIMIZERS}, got {opt_name!r}")
    optimizer = db.optimizer_factory(opt_name, model.load_device, fused=training == "dreambooth")
    # without a CLIP the conditioning comes in encoded, so there is no text encoder to train (the summary says)
    train_te = bool(a.get("train_text_encoder")) and training == "dreambooth" and clip is not None
    class_positive, class_images = a.get("class_positive"), a.get("class_images")
    if class_images is not None and class_positive is None:
        raise ValueError("class_positive: prior preservation needs both class_positive and class_images (or "
                         "class_image_count to generate them); connect class_positive or disconnect class_images")
    given = image_batch(class_images, "class_images") if class_images is not None else None
    wanted = a["class_image_count"]
    if class_positive is not None:
        bridge.check_conditioning(class_positive, "class_positive")
        if given is None and wanted < 1:
            raise ValueError("class_images: prior preservation (class_positive connected) needs class images; "
                             "connect class_images, or set class_image_count >= 1 to generate them")
    lora_stem = lora_file_stem(a["lora_name"]) if training == "lora" and (a.get("lora_name") or "").strip() else None
    ckpt_stem = None
    if training == "dreambooth" and (a.get("checkpoint_name") or "").strip():
        ckpt_stem = lora_file_stem(a["checkpoint_name"], "checkpoint_name")
        if clip is None:
            raise ValueError("clip: a saved checkpoint holds MODEL, CLIP and VAE; connect clip or leave "
                             "checkpoint_name empty")
    keys = target_keys(model, a["target"]) if training == "lora" else None
    if training == "lora":
        _check_int(a["rank"], "rank", "the LoRA rank; DreamBooth-LoRA: 4")
        _check_positive(a["alpha"], "alpha", "alpha = rank gives scale 1")

    prior, to_encode = None, None
    if class_positive is not None:
        prior, to_encode = _prior(model, clip, class_positive, given, wanted, x, a, node_id)
    prediction = prediction_type(model)
    common = dict(steps=steps, lr=lr, batch_size=batch_size, grad_accum=grad_accum, prediction=prediction,
                  generator=a["seed"], max_grad_norm=max_norm, optimizer=optimizer)
    callback = host_callback(steps, node_id)
    family = type(model.model.model_config).__name__
    if training == "lora":
        mp, adapters = attach_lora(model, keys, a["rank"], a["alpha"], a["seed"])
        train_mp = db.precision_clone(mp, precision, training_clone)
        with bridge.open_session(train_mp, vae, positive) as dm, \
                ckpt.gradient_checkpointing(train_mp, enabled=a["gradient_checkpointing"]):
            losses = customize(dm, x, dm.cond, trainable_parameters(adapters), prior=_in_session(prior, to_encode, dm),
                               callback=callback, **common)
        for p in trainable_parameters(adapters):
            p.requires_grad_(False)
        out_clip = clip
        what = f"{len(keys)} LoRA layers (rank {a['rank']}, {a['target']})"
    else:
        train_mp = db.precision_clone(db.trainable_copy(model), precision, lambda m: m)
        te, te_diffs = db.attach_text_encoder(clip) if train_te else (None, {})
        with contextlib.ExitStack() as stack:
            if train_te:
                stack.enter_context(db.text_encoder_session(te))
                positive = db.prompt_encoder(te, a.get("instance_prompt") or INSTANCE_PROMPT)
                if prior is not None:
                    prior.cond = db.prompt_encoder(te, a.get("class_prompt") or CLASS_PROMPT)
            dm = stack.enter_context(bridge.open_session(train_mp, vae, None))
            stack.enter_context(ckpt.gradient_checkpointing(train_mp, enabled=a["gradient_checkpointing"]))
            weights = db.copy_parameters(train_mp)
            # a cancel drops the private copy, so the core keeps no copy of it to restore
            losses = customize(dm, x, positive, [*weights.values(), *te_diffs.values()],
                               prior=_in_session(prior, to_encode, dm), callback=callback, restore=False, **common)
        diffs = db.differences(model, weights)
        del train_mp, weights, dm
        mp = db.with_differences(model, diffs)
        out_clip = db.with_differences(clip, te_diffs) if train_te else clip
        what = f"every UNet weight ({len(diffs)} tensors)" + (
            f" and the text encoder ({len(te_diffs)} tensors)" if train_te else "")

    mode = "" if training == "lora" else f" ({training})"  # the LoRA summary reads as before the mode existed
    summary = (f"Customized {family}{mode} on {x.shape[0]} image(s): {steps} steps, {what}, "
               f"{prediction}-loss {losses[0]:.4g} -> {losses[-1]:.4g}.")
    settings = dict(training=training, steps=steps, learning_rate=lr, batch_size=batch_size,
                    grad_accumulation=grad_accum, seed=a["seed"], prediction=prediction, max_grad_norm=max_norm,
                    prior_weight=prior.weight if prior is not None else None, images=int(x.shape[0]), base=family,
                    final_loss=losses[-1])
    saved, saved_ckpt = "", ""
    if lora_stem is not None:
        settings.update(rank=a["rank"], alpha=a["alpha"], target=a["target"])
        metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(a["rank"]),
                    "ss_network_alpha": str(a["alpha"]), "antipure_customize": json.dumps(settings)}
        saved = save_lora(lora_state_dict(mp, adapters), lora_stem, metadata)
        wanted_name = f"{lora_stem}.safetensors"
        summary += (f" Saved the LoRA as '{saved}'" if saved == wanted_name else
                    f" '{wanted_name}' already exists, so the LoRA was saved as '{saved}'") + f" in {lora_folder()}."
    elif ckpt_stem is not None:
        saved_ckpt = db.save_checkpoint(mp, out_clip, vae, ckpt_stem)
        summary += f" Saved the checkpoint as '{saved_ckpt}' in {db.checkpoint_folder()}."
    elif training == "lora":
        summary += " The LoRA was not saved (lora_name is empty)."
    else:
        summary += " The checkpoint was not saved (checkpoint_name is empty)."
    log.info(summary)
    return mp, out_clip, saved, saved_ckpt, {"loss": losses}, summary


def _prior(model, clip, class_positive, given, wanted: int, x: torch.Tensor, a: dict, node_id):
    """DreamBooth's class set: the given class images, topped up to ``wanted`` by the untouched ``model``.

    Returns ``(prior, given images still to encode and join, or None)``.
    """
    weight = 1.0 if a.get("prior_weight") is None else a["prior_weight"]
    missing = wanted - (0 if given is None else given.shape[0])
    if missing < 1:
        return Prior(class_positive, images=given, weight=weight), None
    steps, sampler = a.get("class_sampling_steps") or 50, a.get("class_sampler") or "euler"
    f = int(a["vae"].downscale_ratio)
    hw = (-(-x.shape[-2] // f), -(-x.shape[-1] // f))
    negative = db.empty_conditioning(class_positive, clip)
    latents = db.generate_class_latents(model, class_positive, negative, missing, hw, steps, sampler, a["seed"],
                                        db.cancel_check(-(-missing // 8) * steps, node_id))
    return Prior(class_positive, latents=latents, weight=weight), given


def _in_session(prior, given, dm):
    """The prior with the given class images encoded and joined to the generated latents (needs the session)."""
    if given is None:
        return prior
    return Prior(prior.cond, latents=torch.cat([encode_images(dm, given), prior.latents.to(dm.device)]),
                 weight=prior.weight)
