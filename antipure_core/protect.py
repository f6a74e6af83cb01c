"""Protection against a fixed model, for every method that trains nothing, and the objective to evaluate it by
(its value, and each weighted term's gradient).

The PGD skeleton itself (checks, context, start, step, finish) lives in :mod:`.pgd`.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from .callbacks import Callback, report
from .frequency import FrequencyGuidance
from .image import check_image, crop_to, pad_to_multiple
from .methods import get_method
from .model import check_model
from .objective_terms import image_gradients
from .pgd import (DEFAULT_T_PURIFY, attack_context, attack_finish, attack_start, check_attack, guidance,
                  pad_multiple, pgd_step, start_point)
from .purify_filters import check_int
from .timestep import TimestepGuidance

# DEFAULT_T_PURIFY lives with the context that resolves it (pgd.py); callers import it from here
__all__ = ["protect", "evaluate_objective", "term_gradients", "DEFAULT_FREQUENCY", "DEFAULT_TIMESTEP",
           "DEFAULT_T_PURIFY"]

DEFAULT_FREQUENCY = FrequencyGuidance()
DEFAULT_TIMESTEP = TimestepGuidance()


def protect(model, x: Tensor, cond: Any, method: str = "antipure", eta: float = 8 / 255, alpha: float = 1 / 255,
            steps: int = 100, seed: int = 0, random_start: bool = False, eot_samples: int = 1,
            frequency: Optional[FrequencyGuidance] = DEFAULT_FREQUENCY,
            timestep: Optional[TimestepGuidance] = DEFAULT_TIMESTEP,
            t_range: Optional[tuple[int, int]] = None, t_purify: Optional[int] = None,
            window: Optional[int] = None, stride: Optional[int] = None, window_mode: str = "all",
            options: Optional[dict] = None, quantize: bool = True, callback: Callback = None) -> Tensor:
    """Protect images with an L∞-bounded perturbation found by signed-gradient PGD.

    Args:
        model: a :class:`~antipure_core.model.DiffusionModel`: the purifier to attack (a pixel
            model, ``downsample = 1``, or a latent model through its VAE); for a method with the
            ``purifies`` flag (purified_advdm), the customization model, the purifiers in ``options``.
        x: clean images ``(B, 3, H, W)`` in [0, 1]; any H, W (padded to the
            model's multiple internally, cropped back).
        cond: conditioning for the noise predictor (e.g. "a photo of sks person").
        method: a name in :data:`~antipure_core.methods.METHODS`.
        eta: L∞ budget in pixel scale, (0, 1] (8/255 by default).
        alpha: PGD step size in pixel scale (1/255).
        steps: PGD iterations; 0 returns a copy of ``x``.
        seed: seeds timesteps, noise and the random start (CPU generator).
        random_start: start from U[-eta, eta] instead of δ = 0.
        eot_samples: noise/timestep samples averaged per step (expectation
            over transformation); one encode per step is shared by them.
        frequency, timestep: PFG and ETG settings of a guided method (``Method.guided``: antipure);
            ``None`` disables the term (an ablation). Other methods ignore them.
        t_range: inclusive timestep range (schedule indices) of the baselines' loss; default the
            whole schedule. Not for guided methods (antipure), which use ``t_purify``.
        t_purify: antipure's t^p, the purifier's t* in steps: t ~ U{1, …, t^p}, i.e. schedule
            indices ``0 … t^p − 1`` (default 10, GrIDPure's preset).
        window, stride, window_mode: antipure on images larger than the purifier's window
            (pixels; stride default ``window // 2``): ``'all'`` of GrIDPure's windows every
            step, or one ``'random'`` window per step (our default: ``'all'``). ``None``:
            the whole image at once.
        options: method-specific settings, e.g. ``{"textural_weight": 1.0,
            "target": "texture"}`` for mist, ``{"target": "gray"}`` for photoguard,
            ``{"purification": PurifiedSettings(...), "pixel_model": adm}`` for purified_advdm and purification_gap
            (:mod:`~antipure_core.purified_attack`).
        quantize: round to 8-bit levels while keeping ``|q - x|_inf <= eta`` exactly.
        callback: called after every step with ``i``, ``total``, ``x_adv`` and the
            mean of every loss term; raising from it cancels with no output.

    Returns:
        Protected images, same shape as ``x``, within ``eta`` of it in every pixel.

    Example:
        >>> x_adv = protect(model, x, cond, method="advdm", steps=10)
    """
    m = check_attack(model, x, method, eta, alpha, steps, eot_samples)
    if m.trains:
        raise ValueError(f"method: {method!r} fine-tunes a surrogate model between attack steps; call "
                         "antipure_core.surrogate.protect_surrogate with the trainable parameters (the Protect "
                         "node does this)")
    if steps == 0:
        return x.clone()

    generator = torch.Generator().manual_seed(int(seed))
    x0 = x.detach().to(model.device, torch.float32)
    if m.loss is None:  # random: one draw of the random start, at the same budget
        out = start_point(x0, eta, generator, random_start=True)
        report(callback, i=steps - 1, total=steps, x_adv=out)
        return attack_finish(out, x0, eta, quantize, like=x)

    frequency, timestep = guidance(m, frequency, timestep)
    xp, x_adv, size = attack_start(x0, pad_multiple(model, frequency, window), eta, generator, random_start)
    ctx = attack_context(model, xp, cond, generator, m, t_range, t_purify, frequency, timestep, options,
                         window, stride, window_mode)
    for i in range(steps):
        x_adv, terms = pgd_step(m, ctx, x_adv, xp, eta, alpha, eot_samples)
        report(callback, i=i, total=steps, x_adv=crop_to(x_adv, size), **terms)
    return attack_finish(x_adv, x0, eta, quantize, like=x)


@torch.no_grad()
def evaluate_objective(model, x_adv: Tensor, x: Tensor, cond: Any, method: str = "antipure", seed: int = 0,
                       samples: int = 8, frequency: Optional[FrequencyGuidance] = DEFAULT_FREQUENCY,
                       timestep: Optional[TimestepGuidance] = DEFAULT_TIMESTEP,
                       t_range: Optional[tuple[int, int]] = None, t_purify: Optional[int] = None,
                       window: Optional[int] = None, stride: Optional[int] = None, window_mode: str = "all",
                       options: Optional[dict] = None) -> dict[str, float]:
    """Mean of each loss term of ``method`` at ``x_adv`` over ``samples`` fixed (seeded) noise draws.

    With the same ``seed`` the draws are identical across calls, so objective
    values at different ``x_adv`` are directly comparable.
    """
    m, ctx, xap, _ = _evaluation(model, x_adv, x, cond, method, seed, samples, frequency, timestep, t_range,
                                 t_purify, window, stride, window_mode, options)
    z = model.encode(xap)
    sums: dict[str, float] = {}
    for _ in range(samples):
        for k, v in m.loss(ctx, xap, z).items():
            sums[k] = sums.get(k, 0.0) + float(v.mean()) / samples
    return sums


def term_gradients(model, x_adv: Tensor, x: Tensor, cond: Any, method: str = "antipure", seed: int = 0,
                   samples: int = 8, frequency: Optional[FrequencyGuidance] = DEFAULT_FREQUENCY,
                   timestep: Optional[TimestepGuidance] = DEFAULT_TIMESTEP,
                   t_range: Optional[tuple[int, int]] = None, t_purify: Optional[int] = None,
                   window: Optional[int] = None, stride: Optional[int] = None, window_mode: str = "all",
                   options: Optional[dict] = None) -> dict:
    """How each weighted term of ``method``'s objective pulls ``x_adv``, at :func:`evaluate_objective`'s draws.

    Arguments as :func:`evaluate_objective`. Each term's gradient w.r.t. the image (mean over ``samples``;
    the padding cropped off) is taken at the same draws; the terms (antipure: ``ldm`` = L_ddpm,
    ``pfg`` = λ₁·e^{ᾱ_t−1}·L_fre, ``etg`` = λ₂·e^{L_err}; a one-term method: ``objective``) add up to the
    objective, so their gradients add up to its gradient, the ``total``. Norms and shares are over the batch;
    the terms are at λ₁ = ``frequency.weight`` (``frequency.share`` plays no part here).

    Returns:
        ``{"terms": {name: {"norm", "share", "sign_agreement"}}, "total_norm": float}``: ``norm`` the
        gradient's L2 norm; ``share`` that norm over the sum of the terms' norms; ``sign_agreement`` the
        fraction of pixel values where the term's gradient has the sign of the total's; ``cosine_to_rest``
        the cosine between the term's gradient and the other terms' sum (0 where either is 0; with two
        terms, how much they pull the same way).
    """
    m, ctx, xap, size = _evaluation(model, x_adv, x, cond, method, seed, samples, frequency, timestep, t_range,
                                    t_purify, window, stride, window_mode, options)
    xap.requires_grad_(True)
    with torch.enable_grad():
        _, grads = image_gradients(m, ctx, xap, samples, group=lambda name: name)
    grads = {k: crop_to(g, size) for k, g in grads.items()}
    total = sum(grads.values())
    norms = {k: float(g.norm()) for k, g in grads.items()}
    denom = sum(norms.values())
    terms = {k: {"norm": norms[k], "share": norms[k] / denom if denom > 0 else 0.0,
                 "sign_agreement": float((g.sign() == total.sign()).float().mean()),
                 "cosine_to_rest": _cosine(g, total - g)} for k, g in grads.items()}
    return {"terms": terms, "total_norm": float(total.norm())}


def _cosine(a: Tensor, b: Tensor) -> float:
    n = float(a.norm() * b.norm())
    return float((a * b).sum()) / n if n > 0 else 0.0


def _evaluation(model, x_adv: Tensor, x: Tensor, cond: Any, method: str, seed: int, samples: int,
                frequency, timestep, t_range, t_purify, window, stride, window_mode, options):
    """The checked method, its seeded context on the padded ``x``, the padded ``x_adv`` and the size to crop to."""
    _check_evaluation(model, x_adv, x, samples)
    m = get_method(method)
    if m.loss is None:
        raise ValueError(f"method: {method!r} has no objective")
    frequency, timestep = guidance(m, frequency, timestep)
    x0 = x.detach().to(model.device, torch.float32)
    xa = x_adv.detach().to(model.device, torch.float32)
    mult = pad_multiple(model, frequency, window)
    xp, _ = pad_to_multiple(x0, mult)
    xap, size = pad_to_multiple(xa, mult)
    ctx = attack_context(model, xp, cond, torch.Generator().manual_seed(int(seed)), m, t_range, t_purify,
                         frequency, timestep, options, window, stride, window_mode)
    return m, ctx, xap, size


def _check_evaluation(model, x_adv: Tensor, x: Tensor, samples: int) -> None:
    """:func:`evaluate_objective`'s boundary: a model, two images of one shape in [0, 1], ``samples >= 1``."""
    check_model(model)
    check_image(x, "x")
    check_image(x_adv, "x_adv")
    if x_adv.shape != x.shape:
        raise ValueError(f"x_adv: expected the shape of x {tuple(x.shape)}, got {tuple(x_adv.shape)}")
    check_int(samples, "samples", 1)
