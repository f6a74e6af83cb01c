"""DreamBooth-style customization: fine-tune a few parameters of a model on a handful of images.

The loop is the attacker's step of the threat model (purify -> customize ->
generate): the images are encoded once, then each step noises a random batch
of latents to random timesteps over the whole schedule and takes an AdamW step
on the noise-prediction loss, optionally plus DreamBooth's prior-preservation
term on class images. Only ``params`` are trained - typically LoRA adapters
(:func:`antipure_core.lora.add_lora` here, the host's weight adapters inside
ComfyUI); how they enter the model is the caller's business.

Literature defaults (DreamBooth-LoRA on faces): instance prompt
:data:`INSTANCE_PROMPT` (the caller turns it into ``cond``), LoRA rank 4,
``lr = 1e-4``, 400 steps, batch 1, prior weight 1.0.

Example:
    >>> params = add_lora(model.unet, rank=4)
    >>> losses = customize(model, images, cond, params, steps=400, generator=0)
    >>> samples = sample(model, cond, (4, 4, 64, 64), generator=1)   # antipure_core.sampling
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor

from .callbacks import Callback, report
from .diffusion import predict_x0, q_sample, randn_like, sample_timesteps
from .image import check_image, pad_to_multiple
from .model import check_model

#: DreamBooth's instance prompt (rare token "sks" + class noun)
INSTANCE_PROMPT = "a photo of sks person"
#: the matching class prompt for prior preservation
CLASS_PROMPT = "a photo of person"

PREDICTIONS = ("eps", "v")

Images = Union[Tensor, Sequence[Tensor]]
Seed = Union[torch.Generator, int, None]


@dataclass
class Prior:
    """DreamBooth prior preservation: ``loss = instance + weight * class``.

    Give the class set either as ``images`` (``(N, 3, H, W)`` in [0, 1], or a
    list of same-size images; encoded once) or as pre-encoded scaled
    ``latents`` ``(N, c, h, w)``. ``cond`` is the class prompt's conditioning
    (e.g. for :data:`CLASS_PROMPT`), or a callable returning it, called every micro-batch (a text
    encoder being trained). ``weight`` is lambda (DreamBooth: 1.0).
    """

    cond: Any
    images: Optional[Images] = None
    latents: Optional[Tensor] = None
    weight: float = 1.0


def as_image_batch(images: Images, name: str = "images") -> Tensor:
    """Stack ``images`` into one checked ``(B, 3, H, W)`` batch in [0, 1].

    Accepts a tensor ``(B, 3, H, W)`` or a non-empty list of ``(3, H, W)`` /
    ``(B_k, 3, H, W)`` tensors of one size; a differing item is named in the error.
    """
    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise ValueError(f"{name}: the list of images is empty")
        items = []
        for k, x in enumerate(images):
            if isinstance(x, Tensor) and x.ndim == 3:
                x = x[None]
            check_image(x, f"{name}[{k}]")
            items.append(x)
        for k, x in enumerate(items):
            if x.shape[1:] != items[0].shape[1:]:
                raise ValueError(f"{name}[{k}]: size {tuple(x.shape[-2:])} differs from {name}[0] "
                                 f"{tuple(items[0].shape[-2:])}; resize or crop the images to one size")
        return torch.cat([x.to(items[0].device) for x in items])
    check_image(images, name)
    return images


@torch.no_grad()
def encode_images(model, images: Tensor) -> Tensor:
    """Encode ``(B, 3, H, W)`` images one at a time into float32 scaled latents.

    H and W are reflect-padded up to multiples of ``model.downsample`` first
    (a documented adaptation: the padded strip is a few pixels of mirrored content).
    """
    x, _ = pad_to_multiple(images, model.downsample)
    return torch.cat([model.encode(x[k: k + 1].to(model.device)).float() for k in range(x.shape[0])])


def _abar(model, t: Tensor, like: Tensor) -> Tensor:
    return model.alphas_cumprod.to(like.device, torch.float32)[t.to(like.device).long()].view(-1, 1, 1, 1)


def denoising_loss(model, z0: Tensor, cond: Any, prediction: str = "eps",
                   generator: Optional[torch.Generator] = None) -> Tensor:
    """Training loss of the model on clean scaled latents ``z0`` ``(B, c, h, w)``: a scalar.

    Timesteps are uniform over the whole schedule, noise standard normal (both
    from the CPU ``generator``). ``prediction='eps'``: ``mean (eps_hat - eps)^2``.
    ``prediction='v'``: the same on ``v = sqrt(abar) eps - sqrt(1 - abar) z0``,
    with ``v_hat`` formed from ``eps_hat`` and its one-step ``z0`` estimate;
    this equals ``mean (eps_hat - eps)^2 / abar``, the weighting a v-prediction
    model is trained with.
    """
    cond = cond() if callable(cond) else cond  # a trained text encoder encodes anew, with gradient
    t = sample_timesteps(z0.shape[0], 0, model.num_timesteps - 1, generator).to(z0.device)
    noise = randn_like(z0, generator)
    z_t = q_sample(model, z0, t, noise)
    eps_hat = model.predict_noise(z_t, t, cond).float()
    if prediction == "eps":
        return torch.mean((eps_hat - noise) ** 2)
    ab = _abar(model, t, z0)
    v = ab.sqrt() * noise - (1 - ab).sqrt() * z0
    v_hat = ab.sqrt() * eps_hat - (1 - ab).sqrt() * predict_x0(model, z_t, t, eps_hat)
    return torch.mean((v_hat - v) ** 2)


def _batches(n: int, batch_size: int, generator: Optional[torch.Generator]) -> Iterator[Tensor]:
    """Index batches walking through fresh random permutations (epochs) of ``range(n)``."""
    order: list[int] = []
    while True:
        idx = []
        for _ in range(batch_size):
            if not order:
                order = torch.randperm(n, generator=generator).tolist()
            idx.append(order.pop())
        yield torch.tensor(idx)


def _generators(generator: Seed, with_prior: bool):
    """Instance and prior generators; the prior stream never advances the instance stream."""
    if generator is None:
        return None, None
    if isinstance(generator, bool) or not isinstance(generator, (int, torch.Generator)):
        raise TypeError(f"generator: expected a torch.Generator, an int seed or None, got {type(generator).__name__}")
    if isinstance(generator, int):
        generator = torch.Generator().manual_seed(generator)
    if generator.device.type != "cpu":
        raise ValueError(f"generator: must be a CPU generator (seeds then agree across devices), got {generator.device}")
    if not with_prior:
        return generator, None
    fork = torch.Generator().set_state(generator.get_state())
    return generator, torch.Generator().manual_seed(int(torch.randint(2 ** 62, (1,), generator=fork)))


def _check_params(params: Iterable[Tensor]) -> list[Tensor]:
    params = list(params) if params is not None else []
    if not params:
        raise ValueError("params: no trainable parameters; attach adapters first (e.g. antipure_core.lora.add_lora)")
    for k, p in enumerate(params):
        if not isinstance(p, Tensor) or not p.is_floating_point() or not p.requires_grad or not p.is_leaf:
            raise ValueError(f"params[{k}]: must be a float leaf tensor with requires_grad=True (a frozen or "
                             "derived tensor cannot be trained)")
    return params


def _check_positive_int(value, name: str, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: must be an integer >= 1 ({hint}), got {value!r}")


def _check_prior(prior: Prior, channels: int) -> None:
    if not isinstance(prior, Prior):
        raise TypeError(f"prior: expected antipure_core.customize.Prior or None, got {type(prior).__name__}")
    if (prior.images is None) == (prior.latents is None):
        raise ValueError("prior: give exactly one of prior.images (class images) or prior.latents (encoded)")
    if prior.cond is None:
        raise ValueError("prior.cond: the class prompt's conditioning is required (e.g. 'a photo of person')")
    if not isinstance(prior.weight, (int, float)) or not math.isfinite(prior.weight) or prior.weight < 0:
        raise ValueError(f"prior.weight: must be finite and >= 0 (DreamBooth: 1.0), got {prior.weight!r}")
    if prior.latents is not None:
        z = prior.latents
        if not isinstance(z, Tensor) or z.ndim != 4 or z.shape[0] == 0:
            raise ValueError(f"prior.latents: expected a non-empty (N, c, h, w) tensor, got "
                             f"{tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__}")
        if z.shape[1] != channels:
            raise ValueError(f"prior.latents: {z.shape[1]} channels, but the model's latents have {channels}")
        if not torch.isfinite(z).all():
            raise ValueError("prior.latents: contains NaN or inf values")


def customize(model, images: Images, cond: Any, params: Iterable[Tensor], steps: int = 400, lr: float = 1e-4,
              batch_size: int = 1, grad_accum: int = 1, prediction: str = "eps", prior: Optional[Prior] = None,
              weight_decay: float = 1e-2, generator: Seed = None, callback: Callback = None,
              latents: Optional[Tensor] = None, max_grad_norm: Optional[float] = None,
              optimizer: Optional[Callable[..., torch.optim.Optimizer]] = None,
              restore: bool = True) -> list[float]:
    """Fine-tune ``params`` so that ``model`` denoises ``images`` under ``cond`` (DreamBooth / LoRA).

    Each of the ``steps`` optimiser steps averages ``grad_accum`` micro-batches
    of ``batch_size`` latents (drawn epoch-wise without replacement), noised to
    timesteps uniform on ``[0, num_timesteps - 1]``. AdamW updates ``params``
    only; nothing else in the model is written.

    Args:
        model: a :class:`~antipure_core.model.DiffusionModel` whose ``predict_noise`` depends on ``params``.
        images: ``(B, 3, H, W)`` in [0, 1], or a list of same-size ``(3, H, W)`` / ``(B_k, 3, H, W)``
            tensors. Encoded once without gradients (H, W padded to ``model.downsample``).
        cond: instance conditioning, e.g. of :data:`INSTANCE_PROMPT`; opaque to the core. A callable
            returning it is called for every micro-batch (a text encoder trained along).
        params: trainable leaf tensors (``requires_grad=True``), e.g. from ``add_lora``.
        steps: optimiser steps >= 1 (DreamBooth-LoRA: 400-1000).
        lr: AdamW learning rate > 0 (DreamBooth-LoRA: 1e-4).
        batch_size: latents per micro-batch >= 1; may exceed the number of images.
        grad_accum: micro-batches per optimiser step >= 1.
        prediction: ``'eps'`` (SD1.x, SD2-base) or ``'v'`` (SD2.x 768-v): the loss's target, see
            :func:`denoising_loss`.
        prior: optional :class:`Prior` (class images/latents, class cond, weight lambda).
        weight_decay: AdamW weight decay >= 0.
        generator: CPU ``torch.Generator`` or int seed for batches, timesteps and noise; runs are
            deterministic per seed on the CPU. ``None`` uses the global RNG.
        callback: called after every step with ``i`` (0-based), ``total``, ``loss``,
            ``loss_instance``, ``loss_prior`` (0.0 without prior). Raising from it cancels.
        latents: scaled latents ``(B, c, h, w)`` already encoded by the caller, used instead of
            encoding ``images`` (then pass ``images=None``); for loops that train repeatedly on one set.
        max_grad_norm: clip the gradient's global norm to this value before each step (DreamBooth and
            Anti-DreamBooth: 1.0); ``None`` does not clip.
        optimizer: ``optimizer(params, lr=, weight_decay=)`` makes the optimiser (default
            ``torch.optim.AdamW``; e.g. an 8-bit AdamW on CUDA).
        restore: on an exception, put ``params`` back to their values at entry; ``False`` for params the
            caller discards then (a private copy of a model), which saves keeping a copy of them.

    Returns:
        The loss of every step (instance + weight * prior, averaged over the micro-batches).

    Raises:
        ValueError: bad argument (named in the message). FloatingPointError: the loss became
        NaN/inf (lower ``lr``). On any exception, including a cancel from the callback,
        ``params`` are restored to their values at entry (unless ``restore`` is false) and nothing is returned.
    """
    check_model(model)
    if (images is None) == (latents is None):
        raise ValueError("images: give exactly one of images (to encode) or latents (already encoded)")
    x = as_image_batch(images, "images") if latents is None else None
    params = _check_params(params)
    _check_positive_int(steps, "steps", "DreamBooth-LoRA uses 400-1000")
    if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr: learning rate must be finite and > 0 (DreamBooth-LoRA: 1e-4), got {lr!r}")
    _check_positive_int(batch_size, "batch_size", "DreamBooth default 1")
    _check_positive_int(grad_accum, "grad_accum", "1 means no accumulation")
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction: expected one of {PREDICTIONS}, got {prediction!r}")
    if not isinstance(weight_decay, (int, float)) or not math.isfinite(weight_decay) or weight_decay < 0:
        raise ValueError(f"weight_decay: must be finite and >= 0, got {weight_decay!r}")
    if max_grad_norm is not None and (isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float))
                                      or not math.isfinite(max_grad_norm) or max_grad_norm <= 0):
        raise ValueError(f"max_grad_norm: must be finite and > 0, or None for no clipping, got {max_grad_norm!r}")
    use_prior = prior is not None
    g, g_prior = _generators(generator, use_prior)

    if latents is None:
        latents = encode_images(model, x)
    elif not isinstance(latents, Tensor) or latents.ndim != 4 or latents.shape[0] == 0:
        raise ValueError(f"latents: expected a non-empty (B, c, h, w) tensor, got "
                         f"{tuple(latents.shape) if isinstance(latents, Tensor) else type(latents).__name__}")
    else:
        latents = latents.detach().to(model.device, torch.float32)
    if use_prior:
        _check_prior(prior, latents.shape[1])
        if prior.latents is not None:
            prior_latents = prior.latents.to(latents.device, torch.float32)
        else:
            prior_latents = encode_images(model, as_image_batch(prior.images, "prior.images"))
        prior_batches = _batches(prior_latents.shape[0], batch_size, g_prior)
    batches = _batches(latents.shape[0], batch_size, g)

    # what a cancel restores; a tensor that starts at zero (a LoRA's down, a full fine-tune's difference) is
    # not copied: for full fine-tuning that copy would be one more model's worth of memory
    start = [p.detach().clone() if restore and p.detach().any() else None for p in params]
    opt = (optimizer or torch.optim.AdamW)(params, lr=lr, weight_decay=weight_decay)
    losses: list[float] = []
    try:
        with torch.enable_grad():
            for i in range(steps):
                opt.zero_grad(set_to_none=True)
                sum_inst = sum_prior = 0.0
                for _ in range(grad_accum):
                    loss_inst = denoising_loss(model, latents[next(batches)], cond, prediction, g)
                    loss = loss_inst
                    if use_prior:
                        loss_prior = denoising_loss(model, prior_latents[next(prior_batches)], prior.cond,
                                                    prediction, g_prior)
                        loss = loss + prior.weight * loss_prior
                        sum_prior += float(loss_prior.detach())
                    (loss / grad_accum).backward()
                    sum_inst += float(loss_inst.detach())
                inst, pri = sum_inst / grad_accum, sum_prior / grad_accum
                total = inst + (prior.weight * pri if use_prior else 0.0)
                if not math.isfinite(total):
                    raise FloatingPointError(f"customize: the loss became {total} at step {i}; lower lr "
                                             "or check images and cond")
                if max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                opt.step()
                losses.append(total)
                report(callback, i=i, total=steps, loss=total, loss_instance=inst, loss_prior=pri)
    except BaseException:
        # a cancelled or failed run leaves no half-trained adapter behind
        with torch.no_grad():
            for p, p0 in zip(params, start if restore else ()):
                p.zero_() if p0 is None else p.copy_(p0)
        raise
    return losses
