"""Surrogate training for Protect's ``aspl``, ``fsmg``, ``simac``, ``purified_aspl`` on the host's MODEL; settings.

The trainable part sits on a clone of the user's MODEL as the host's own
weight wrappers, so the MODEL itself is never written: LoRA adapters from
:mod:`.lora_adapters` (as Customize), or, for full fine-tuning, a zero-started
difference tensor on every UNet weight and bias (the host trainer's own
``BiasDiff`` wrapper, which its ``TrainLoraNode`` puts on weights it does not
LoRA-adapt). Full fine-tuning of ``W + D`` trains ``D`` with exactly the
gradient of ``W``; only AdamW's weight decay then pulls ``D`` (not ``W``)
toward zero. The core loop (:func:`antipure_core.surrogate.protect_surrogate`)
trains and snapshots those tensors through :func:`.bridge.session`.

The text encoder is not trained (Anti-DreamBooth trains it too): the
conditioning comes in encoded, as for every Protect method.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Optional

import torch

from ..antipure_core.customize import Prior
from ..antipure_core.surrogate import SurrogateSettings, generated_prior, inner_steps, protect_surrogate
from . import bridge, checkpointing
from .customize import image_batch, prediction_type, training_clone
from .dreambooth import add_differences
from .lora_adapters import attach_lora, target_keys, trainable_parameters
from .progress import host_callback

TRAINING = ("lora", "full")
#: learning rate when the settings say 0: DreamBooth-LoRA's for adapters, Anti-DreamBooth's for the full UNet
AUTO_LR = {"lora": 1e-4, "full": 5e-7}


@dataclass(frozen=True)
class HostSurrogate:
    """What the settings node passes to Protect: the core settings plus how to train on the host.

    ``settings.lr`` is resolved (never 0: :func:`surrogate_settings` fills in :data:`AUTO_LR`);
    ``settings.prediction`` is taken from the MODEL.
    ``train_images`` / ``class_images`` are core batches ``(N, 3, H, W)`` in [0, 1].
    """

    settings: SurrogateSettings = field(default_factory=lambda: SurrogateSettings(lr=AUTO_LR["lora"]))
    training: str = "lora"
    rank: int = 4
    target: str = "attention"
    prior_weight: float = 1.0
    generated_class_images: int = 4
    class_sampling_steps: int = 25
    train_images: Optional[torch.Tensor] = None
    class_positive: Any = None
    class_images: Optional[torch.Tensor] = None


def attach_full(model):
    """A clone of ``model`` with a trainable zero difference (float32) on every UNet weight and bias.

    Returns:
        ``(clone, params)``; the clone initially predicts exactly what ``model`` predicts.
    """
    mp = model.clone()
    return mp, list(add_differences(mp, "diffusion_model.").values())


def _prior(cfg: HostSurrogate, dm, x: torch.Tensor, seed: int) -> Optional[Prior]:
    if cfg.class_positive is None:
        return None
    if cfg.class_images is not None:
        return Prior(cfg.class_positive, images=cfg.class_images, weight=cfg.prior_weight)
    if cfg.generated_class_images < 1:
        raise ValueError("class_images: prior preservation (class_positive connected) needs class images; connect "
                         "class_images or set generated_class_images >= 1 to let the model generate them")
    f = dm.downsample
    shape = (4, -(-x.shape[-2] // f), -(-x.shape[-1] // f))
    return generated_prior(dm, cfg.class_positive, cfg.generated_class_images, shape, cfg.class_sampling_steps,
                           cfg.prior_weight, seed)


def protect_with_surrogate(model, vae, positive, x: torch.Tensor, method: str, eta: float, alpha: float, steps: int,
                           seed: int, random_start: bool, eot_samples: int, surrogate: Optional[HostSurrogate],
                           gradient_checkpointing: bool = False, node_id=None, options: Optional[dict] = None
                           ) -> torch.Tensor:
    """Run ``aspl`` / ``fsmg`` / ``simac`` / ``purified_aspl`` on the host's MODEL; returns protected
    ``(B, 3, H, W)`` images.

    ``eta``, ``alpha`` in pixel scale; ``steps`` PGD steps in total; ``options``: the method's core options
    (``purified_aspl``: :func:`.purified.purified_options`). The MODEL is cloned, never written.
    """
    cfg = surrogate if surrogate is not None else HostSurrogate()
    if not isinstance(cfg, HostSurrogate):
        raise TypeError(f"surrogate_settings: expected the AntiPure Surrogate Settings output, got {type(cfg).__name__}")
    bridge.check_inputs(model, vae, positive)  # class_positive was checked by surrogate_settings
    settings = replace(cfg.settings, prediction=prediction_type(model))  # checked by protect_surrogate
    if cfg.training == "lora":
        mp, adapters = attach_lora(model, target_keys(model, cfg.target), cfg.rank, float(cfg.rank), seed)
        params = trainable_parameters(adapters)
    else:
        mp, params = attach_full(model)
    train_mp = training_clone(mp)
    callback = host_callback(inner_steps(method, steps, x.shape[0], settings), node_id)
    with bridge.open_session(train_mp, vae, positive) as dm, \
            checkpointing.gradient_checkpointing(train_mp, vae, enabled=gradient_checkpointing):
        prior = _prior(cfg, dm, x, seed)
        return protect_surrogate(dm, x, dm.cond, params, method, eta=eta, alpha=alpha, steps=steps, seed=seed,
                                 settings=settings, train_images=cfg.train_images, prior=prior,
                                 random_start=random_start, eot_samples=eot_samples, options=options,
                                 restore=False, callback=callback)


def surrogate_settings(training, train_steps, attack_steps, fsmg_train_steps, learning_rate, rank, target,
                       max_grad_norm, feature_weight, search_candidates, search_rounds, search_keep, search_cut,
                       prior_weight, generated_class_images, train_images=None, class_positive=None,
                       class_images=None) -> HostSurrogate:
    """The Surrogate Settings node's inputs, checked once, as a :class:`HostSurrogate` (``learning_rate`` 0 =
    :data:`AUTO_LR` for ``training``; ``max_grad_norm`` 0 = no clipping)."""
    if training not in TRAINING:
        raise ValueError(f"training: expected one of {TRAINING}, got {training!r}")
    if class_images is not None and class_positive is None:
        raise ValueError("class_positive: class_images are used for prior preservation, which needs the class "
                         "prompt; connect class_positive (e.g. 'a photo of person') or disconnect class_images")
    settings = SurrogateSettings(train_steps=train_steps, attack_steps=attack_steps,
                                 fsmg_train_steps=fsmg_train_steps,
                                 lr=float(learning_rate) or AUTO_LR[training],
                                 max_grad_norm=float(max_grad_norm) if max_grad_norm > 0 else None,
                                 search_candidates=search_candidates, search_rounds=search_rounds,
                                 search_keep=search_keep, search_cut=search_cut,
                                 feature_weight=float(feature_weight))
    settings.check()
    if class_positive is not None:
        bridge.check_conditioning(class_positive, "class_positive")
    return HostSurrogate(
        settings=settings, training=training, rank=rank, target=target, prior_weight=prior_weight,
        generated_class_images=generated_class_images,
        train_images=None if train_images is None else image_batch([train_images], "train_images"),
        class_positive=class_positive,
        class_images=None if class_images is None else image_batch([class_images], "class_images"))
