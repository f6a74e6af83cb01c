"""Protections that fine-tune a surrogate between attack steps: Anti-DreamBooth's ASPL and FSMG, and SimAC.

ASPL (Alternating Surrogate and Perturbation Learning) runs, per outer iteration:

1. copy the model's trainable part to a surrogate;
2. fine-tune the surrogate ``train_steps`` steps on the *clean* images (set A,
   DreamBooth loss, optional prior preservation);
3. take ``attack_steps`` PGD steps on the images to protect against the surrogate,
   maximising the denoising loss under the instance prompt;
4. fine-tune the model copy itself ``train_steps`` steps on the *current protected* images.

The "copy" is a snapshot of the trainable tensors' values: the surrogate trains
the same tensors, and the model's values are put back before step 4. So only
the trainable part is duplicated - LoRA adapters by default (the same LoRA
machinery as Customize), or every UNet weight (Anti-DreamBooth's full
fine-tuning). FSMG fine-tunes once on set A, then runs all PGD steps on the
fixed model. SimAC is ASPL plus a per-image timestep search before the loop and
a feature-interference term (:mod:`.timestep_search`).

Anti-DreamBooth's settings (VinAIResearch/Anti-DreamBooth, ``attacks/aspl.py``
and its scripts): 50 outer iterations x 3 training steps x 6 PGD steps, AdamW
lr 5e-7 on the full UNet and text encoder, gradient clipping 1.0, prior weight
1.0; images in [-1, 1] with eta = 0.05 and alpha = 0.005, which in this pack's
[0, 1] pixel scale are :data:`ASPL_ETA` = 0.025 (6.375/255) and
:data:`ASPL_ALPHA` = 0.0025 (0.6375/255). SimAC keeps the loop and uses
16/255 of [-1, 1], i.e. 8/255 here. Differences, by design: the text encoder is
not trained (the conditioning is fixed, as in the pack's Customize); ``steps``
counts PGD steps in total (Anti-DreamBooth's 50 x 6 = 300), split into outer
iterations of ``attack_steps``; the model update after the last attack is
skipped (it cannot change the output).

Example:
    >>> params = add_lora(model.unet, rank=4)                       # antipure_core.lora
    >>> x_adv = protect_surrogate(model, x, cond, params, "aspl", steps=300)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
from torch import Tensor

from .callbacks import Callback, report
from .customize import (PREDICTIONS, Images, Prior, _check_params, _check_prior, as_image_batch, customize,
                        encode_images)
from .image import crop_to, pad_to_multiple
from .methods import METHODS
from .model import check_features
from .pgd import attack_context, attack_finish, check_attack, pad_multiple, pgd_step, start_point
from .purify import ddim_denoise
from .timestep_search import check_search, search_timesteps

#: Anti-DreamBooth's eta = 0.05 of the [-1, 1] range, in pixel scale [0, 1] (6.375/255)
ASPL_ETA = 0.025
#: Anti-DreamBooth's alpha = 0.005 of the [-1, 1] range, in pixel scale [0, 1] (0.6375/255)
ASPL_ALPHA = 0.0025

@dataclass(frozen=True)
class SurrogateSettings:
    """Settings of the training loops of ``aspl``, ``fsmg`` and ``simac``.

    Attributes:
        train_steps: fine-tuning steps per training phase of ASPL/SimAC (Anti-DreamBooth: 3).
        attack_steps: PGD steps per outer iteration (Anti-DreamBooth: 6).
        fsmg_train_steps: FSMG's one fine-tuning run (Anti-DreamBooth: 1000 DreamBooth steps).
        lr: AdamW learning rate. Anti-DreamBooth: 5e-7 for full fine-tuning; LoRA adapters
            (DreamBooth-LoRA) use 1e-4.
        batch_size: instance latents per training step (Anti-DreamBooth: 1, plus 1 class latent).
        max_grad_norm: gradient clipping (Anti-DreamBooth: 1.0); ``None`` does not clip.
        weight_decay: AdamW weight decay (1e-2).
        prediction: ``'eps'`` or ``'v'``, the model's training target (v for SD2.x 768-v).
        search_candidates, search_rounds, search_keep, search_cut: SimAC's search (5, 50, 100, 20).
        feature_weight: weight of SimAC's feature-interference term (with gradient; 0 reproduces the
            released code's gradients, which add the term as a constant).
    """

    train_steps: int = 3
    attack_steps: int = 6
    fsmg_train_steps: int = 1000
    lr: float = 1e-4
    batch_size: int = 1
    max_grad_norm: Optional[float] = 1.0
    weight_decay: float = 1e-2
    prediction: str = "eps"
    search_candidates: int = 5
    search_rounds: int = 50
    search_keep: int = 100
    search_cut: int = 20
    feature_weight: float = 1.0

    def check(self) -> None:
        """Raise a ``ValueError`` naming the bad setting."""
        for name, hint in (("train_steps", "Anti-DreamBooth: 3"), ("attack_steps", "Anti-DreamBooth: 6"),
                           ("fsmg_train_steps", "Anti-DreamBooth: 1000"), ("batch_size", "Anti-DreamBooth: 1")):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: must be an integer >= 1 ({hint}), got {v!r}")
        for name, v in (("lr", self.lr), ("max_grad_norm", self.max_grad_norm)):
            if name == "max_grad_norm" and v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{name}: must be finite and > 0, got {v!r}")
        if not isinstance(self.weight_decay, (int, float)) or not self.weight_decay >= 0:
            raise ValueError(f"weight_decay: must be >= 0, got {self.weight_decay!r}")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction: expected one of {PREDICTIONS}, got {self.prediction!r}")
        if not isinstance(self.feature_weight, (int, float)) or not self.feature_weight >= 0:
            raise ValueError(f"feature_weight: must be >= 0, got {self.feature_weight!r}")
        check_search(self.search_candidates, self.search_rounds, self.search_keep, self.search_cut)


@torch.no_grad()
def generated_prior(model, cond: Any, count: int, latent_shape: tuple[int, int, int], steps: int = 25,
                    weight: float = 1.0, seed: int = 0) -> Prior:
    """Prior preservation with class images generated by the model itself from the class prompt.

    What DreamBooth / Anti-DreamBooth's scripts do when the class-image folder is short (they generate
    200 at 512 px), here kept as latents: ``count`` DDIM samples of ``steps`` model calls each, of
    latent shape ``(c, h, w)``, from noise seeded by ``seed``.

    Returns:
        A :class:`~antipure_core.customize.Prior` with ``latents`` ``(count, c, h, w)`` and ``cond``.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count: class images to generate must be an integer >= 1, got {count!r}; "
                         "or supply class images")
    z = torch.randn((count, *latent_shape), generator=torch.Generator().manual_seed(int(seed))).to(model.device)
    with torch.no_grad():
        z0 = ddim_denoise(model, z, model.num_timesteps - 1, cond, steps=steps)
    return Prior(cond, latents=z0.float(), weight=weight)


def plan(method: str, steps: int, settings: SurrogateSettings) -> list[tuple[str, int, int]]:
    """The inner phases in order, as ``(phase, outer iteration, steps)``.

    ASPL/SimAC: ``('surrogate', k, train_steps)``, ``('attack', k, n)``, ``('model', k, train_steps)`` per
    outer iteration ``k``, with ``ceil(steps / attack_steps)`` iterations (the last one may attack fewer
    steps and has no model phase). FSMG: ``('fine-tune', 0, fsmg_train_steps)``, ``('attack', 0, steps)``.
    """
    if steps == 0:
        return []
    if method == "fsmg":
        return [("fine-tune", 0, settings.fsmg_train_steps), ("attack", 0, steps)]
    outer = -(-steps // settings.attack_steps)
    phases = []
    for k in range(outer):
        phases.append(("surrogate", k, settings.train_steps))
        phases.append(("attack", k, min(settings.attack_steps, steps - k * settings.attack_steps)))
        if k < outer - 1:
            phases.append(("model", k, settings.train_steps))
    return phases


def inner_steps(method: str, steps: int, batch: int, settings: SurrogateSettings) -> int:
    """Inner steps :func:`protect_surrogate` reports: every training and attack step of :func:`plan`, plus
    SimAC's search rounds for ``batch`` images (an upper bound: an image's search may stop early)."""
    return _search_steps(method, batch, settings) + sum(n for _, _, n in plan(method, steps, settings))


def _search_steps(method: str, batch: int, settings: SurrogateSettings) -> int:
    """SimAC's search rounds for ``batch`` images (the most it runs); other methods do not search."""
    return batch * settings.search_rounds if method == "simac" else 0


def _snapshot(params: list[Tensor]) -> list[Tensor]:
    return [p.detach().clone() for p in params]


@torch.no_grad()
def _load(params: list[Tensor], values: list[Tensor]) -> None:
    for p, v in zip(params, values):
        p.copy_(v)


def _set_trainable(params: list[Tensor], on: bool) -> None:
    # off during attacks: the backward then computes no weight gradients at all
    for p in params:
        p.requires_grad_(on)


def protect_surrogate(model, x: Tensor, cond: Any, params: Iterable[Tensor], method: str = "aspl",
                      eta: float = ASPL_ETA, alpha: float = ASPL_ALPHA, steps: int = 300, seed: int = 0,
                      settings: SurrogateSettings = SurrogateSettings(), train_images: Optional[Images] = None,
                      prior: Optional[Prior] = None, random_start: bool = False, eot_samples: int = 1,
                      t_range: Optional[tuple[int, int]] = None, options: Optional[dict] = None,
                      quantize: bool = True, restore: bool = True, callback: Callback = None) -> Tensor:
    """Protect images with ASPL, FSMG, SimAC or purified ASPL: PGD interleaved with fine-tuning of ``params``.

    Args:
        model: a :class:`~antipure_core.model.DiffusionModel` whose ``predict_noise`` depends on ``params``
            (for SimAC with ``feature_weight > 0`` also ``predict_noise_features``).
        x: images to protect ``(B, 3, H, W)`` in [0, 1] (set B); any H, W.
        cond: the instance conditioning (e.g. "a photo of sks person").
        params: the model's trainable part, float leaf tensors (LoRA adapters, or all UNet weights). They
            are the working copy: trained in place, and put back to their entry values on return when
            ``restore`` (also after an error or a cancel).
        method: a method with the ``trains`` flag: ``'aspl'``, ``'fsmg'``, ``'simac'`` or ``'purified_aspl'``.
        eta, alpha: L∞ budget and PGD step, pixel scale (Anti-DreamBooth: :data:`ASPL_ETA`, :data:`ASPL_ALPHA`).
        steps: PGD steps in total (ASPL/SimAC: ``ceil(steps / attack_steps)`` outer iterations;
            Anti-DreamBooth 300 = 50 x 6; FSMG 100). 0 returns a copy of ``x``.
        seed: seeds the PGD noise and timesteps, the search and every training phase (CPU generators).
        settings: :class:`SurrogateSettings`.
        train_images: the clean images the surrogate (and FSMG) trains on (set A, ``(N, 3, h, w)`` or a
            list). ``None`` uses the clean images to protect themselves - a documented adaptation for a user
            with only the photos to protect (Anti-DreamBooth uses a disjoint set A of the same person).
        prior: DreamBooth prior preservation (class images or latents and the class conditioning).
        random_start, eot_samples, t_range, quantize: as in :func:`antipure_core.protect.protect`.
        options: method-specific settings, as in :func:`antipure_core.protect.protect` (``purified_aspl``:
            ``purification``, ``pixel_model``, ``sdedit_cond``, see :mod:`antipure_core.purified_attack`).
        restore: put ``params`` back afterwards; a caller that discards them may save the copy.
        callback: called after every inner step with ``i``, ``total``, ``phase`` (``'search'``,
            ``'surrogate'``, ``'attack'``, ``'model'``, ``'fine-tune'``), ``iteration``, the step's losses and,
            for attack steps, ``x_adv``. Raising from it cancels with no output.

    Returns:
        Protected images, same shape as ``x``, within ``eta`` of it in every pixel (on the 8-bit grid
        with ``quantize``).
    """
    m = check_attack(model, x, method, eta, alpha, steps, eot_samples)
    if not m.trains:
        raise ValueError(f"method: {method!r} trains no surrogate; use antipure_core.protect.protect "
                         f"(surrogate methods: {', '.join(n for n, x in METHODS.items() if x.trains)})")
    if not isinstance(settings, SurrogateSettings):
        raise TypeError(f"settings: expected SurrogateSettings, got {type(settings).__name__}")
    settings.check()
    params = _check_params(params)
    if method == "simac" and settings.feature_weight > 0:
        check_features(model)
    train = x if train_images is None else as_image_batch(train_images, "train_images")
    if steps == 0:
        return x.clone()

    generator = torch.Generator().manual_seed(int(seed))
    seeds = torch.Generator().manual_seed(int(seed) + 1)  # training phases: their own stream
    x0 = x.detach().to(model.device, torch.float32)
    # padded now, started after SimAC's search: the search draws from the same generator first
    xp, size = pad_to_multiple(x0, pad_multiple(model))
    options = {**(options or {}), "feature_weight": settings.feature_weight}
    ctx = attack_context(model, xp, cond, generator, m, t_range, options=options)
    phases = plan(method, steps, settings)
    search_total = _search_steps(method, xp.shape[0], settings)
    total = inner_steps(method, steps, xp.shape[0], settings)
    done = 0

    def step_callback(phase: str, k: int):
        def cb(info):
            report(callback, **{**info, "i": done + info["i"], "total": total, "phase": phase, "iteration": k})
        return cb

    start = _snapshot(params) if restore else None
    try:
        _set_trainable(params, False)
        with torch.no_grad():
            clean = encode_images(model, train)
            if prior is not None:
                _check_prior(prior, clean.shape[1])
            if prior is not None and prior.latents is None:
                prior = Prior(prior.cond, latents=encode_images(model, as_image_batch(prior.images, "prior.images")),
                              weight=prior.weight)

        def fine_tune(latents: Tensor, n: int, phase: str, k: int) -> None:
            nonlocal done
            _set_trainable(params, True)
            try:
                customize(model, None, cond, params, steps=n, lr=settings.lr, batch_size=settings.batch_size,
                          prediction=settings.prediction, prior=prior, weight_decay=settings.weight_decay,
                          generator=int(torch.randint(2 ** 62, (1,), generator=seeds)), latents=latents,
                          max_grad_norm=settings.max_grad_norm, callback=step_callback(phase, k))
            finally:
                _set_trainable(params, False)
            done += n

        if method == "simac":
            ctx.options["kept_timesteps"] = search_timesteps(
                model, xp, cond, eta, alpha, generator, settings.search_candidates, settings.search_rounds,
                settings.search_keep, settings.search_cut, (ctx.t_lo, ctx.t_hi), settings.prediction,
                callback=lambda info: report(callback, **{**info, "iteration": 0}), total=total)
            done = search_total
        x_adv = start_point(xp, eta, generator, random_start)
        theta = None
        for phase, k, n in phases:
            if phase == "surrogate":
                theta = _snapshot(params)  # the model's state; the surrogate trains from a copy of it
                fine_tune(clean, n, phase, k)
            elif phase == "fine-tune":
                fine_tune(clean, n, phase, k)
            elif phase == "model":
                _load(params, theta)
                fine_tune(encode_images(model, x_adv), n, phase, k)
            else:
                for j in range(n):
                    x_adv, terms = pgd_step(m, ctx, x_adv, xp, eta, alpha, eot_samples)
                    report(callback, i=done, total=total, phase=phase, iteration=k,
                           x_adv=crop_to(x_adv, size), **terms)
                    done += 1
    finally:
        _set_trainable(params, True)
        if restore:
            _load(params, start)

    return attack_finish(x_adv, x0, eta, quantize, like=x)
