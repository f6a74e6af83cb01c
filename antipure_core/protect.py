"""The PGD protection loop shared by every attack method."""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor

from .callbacks import Callback, report
from .frequency import FrequencyGuidance
from .image import check_budget, check_image, crop_to, pad_to_multiple, project_linf, quantize_within_budget
from .methods import WINDOW_MODES, AttackContext, Method, get_method, loss_parts
from .model import check_model
from .timestep import TimestepGuidance

DEFAULT_FREQUENCY = FrequencyGuidance()
DEFAULT_TIMESTEP = TimestepGuidance()
#: AntiPure's default t^p: GrIDPure's t* (10 of 1000 steps, DESIGN §1.3)
DEFAULT_T_PURIFY = 10


def _pad_multiple(model, frequency: Optional[FrequencyGuidance], window: Optional[int]) -> int:
    """What H and W must be multiples of: the model's down-sampling (and its UNet's own multiple), PFG's patch."""
    m = int(model.downsample) * int(getattr(model, "size_multiple", 1))
    if frequency is not None:
        m = math.lcm(m, frequency.patch_size)
    if window is not None and window % m:
        raise ValueError(f"window: {window} px must be a multiple of {m} (the purifier's size multiple and the "
                         f"PFG patch); pick e.g. {max(m, window // m * m)}")
    return m


def _context(model, x, cond, generator, method, t_range, t_purify, frequency, timestep, options,
             window=None, stride=None, window_mode="all") -> AttackContext:
    T = model.num_timesteps
    if method == "antipure":
        if t_range is not None:
            raise ValueError("t_range: antipure draws t ~ U{1..t^p}; pass t_purify (t^p) instead")
        t_p = DEFAULT_T_PURIFY if t_purify is None else t_purify
        if not isinstance(t_p, int) or not 1 <= t_p <= T - 1:
            raise ValueError(f"t_purify: t^p must be an integer in [1, {T - 1}] (the purifier's t*, "
                             f"10 for GrIDPure), got {t_p!r}")
        t_range = (0, t_p - 1)  # 1-based t in [1, t^p] is schedule index t - 1
    elif t_purify is not None:
        raise ValueError(f"t_purify: only antipure uses t^p; {method} takes t_range")
    t_lo, t_hi = (0, T - 1) if t_range is None else t_range
    if not 0 <= t_lo <= t_hi <= T - 1:
        raise ValueError(f"t_range: need 0 <= t_lo <= t_hi <= {T - 1}, got ({t_lo}, {t_hi})")
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"window: must be an integer >= 1 (pixels) or None, got {window!r}")
    if stride is not None and (window is None or not isinstance(stride, int) or not 1 <= stride <= window):
        raise ValueError(f"stride: must be an integer in [1, window] with a window set, got {stride!r}")
    if window_mode not in WINDOW_MODES:
        raise ValueError(f"window_mode: expected one of {WINDOW_MODES}, got {window_mode!r}")
    return AttackContext(model, x, cond, generator, int(t_lo), int(t_hi), frequency, timestep, dict(options or {}),
                         window=window, stride=stride, window_mode=window_mode)


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
            model, ``downsample = 1``, or a latent model through its VAE).
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
        frequency, timestep: PFG and ETG settings for ``method='antipure'``;
            ``None`` disables the term (an ablation).
        t_range: inclusive timestep range (schedule indices) of the baselines' loss; default the
            whole schedule. Not for antipure, which uses ``t_purify``.
        t_purify: antipure's t^p, the purifier's t* in steps: t ~ U{1, …, t^p}, i.e. schedule
            indices ``0 … t^p − 1`` (default 10, GrIDPure's preset).
        window, stride, window_mode: antipure on images larger than the purifier's window
            (pixels; stride default ``window // 2``): ``'all'`` of GrIDPure's windows every
            step, or one ``'random'`` window per step (our default: ``'all'``). ``None``:
            the whole image at once.
        options: method-specific settings, e.g. ``{"textural_weight": 1.0,
            "target": "texture"}`` for mist, ``{"target": "gray"}`` for photoguard.
        quantize: round to 8-bit levels while keeping ``|q - x|_inf <= eta`` exactly.
        callback: called after every step with ``i``, ``total``, ``x_adv`` and the
            mean of every loss term; raising from it cancels with no output.

    Returns:
        Protected images, same shape as ``x``, within ``eta`` of it in every pixel.

    Example:
        >>> x_adv = protect(model, x, cond, method="advdm", steps=10)
    """
    check_model(model)
    check_image(x, "image")
    check_budget(eta, alpha, steps)
    m = get_method(method)
    if m.trains:
        raise ValueError(f"method: {method!r} fine-tunes a surrogate model between attack steps; call "
                         "antipure_core.surrogate.protect_surrogate with the trainable parameters (the Protect "
                         "node does this)")
    check_eot(eot_samples)
    if steps == 0:
        return x.clone()

    generator = torch.Generator().manual_seed(int(seed))
    x0 = x.detach().to(model.device, torch.float32)
    if m.loss is None:  # random: one draw at the same budget
        noise = (torch.rand(x0.shape, generator=generator) * 2 - 1).to(x0.device) * eta
        out = project_linf(x0 + noise, x0, eta)
        report(callback, i=steps - 1, total=steps, x_adv=out)
        return (quantize_within_budget(out, x0, eta) if quantize else out).to(x.device, x.dtype)

    if method != "antipure":
        frequency = timestep = None
    xp, size = pad_to_multiple(x0, _pad_multiple(model, frequency, window))
    ctx = _context(model, xp, cond, generator, method, t_range, t_purify, frequency, timestep, options,
                   window, stride, window_mode)
    delta = torch.zeros_like(xp)
    if random_start:
        delta = (torch.rand(xp.shape, generator=generator) * 2 - 1).to(xp.device) * eta
    x_adv = project_linf(xp + delta, xp, eta)

    for i in range(steps):
        x_adv, terms = pgd_step(m, ctx, x_adv, xp, eta, alpha, eot_samples)
        report(callback, i=i, total=steps, x_adv=crop_to(x_adv, size), **terms)

    out = crop_to(x_adv.detach(), size)
    if quantize:
        out = quantize_within_budget(out, x0, eta)
    return out.to(x.device, x.dtype)


def check_eot(eot_samples) -> None:
    if isinstance(eot_samples, bool) or not isinstance(eot_samples, int) or eot_samples < 1:
        raise ValueError(f"eot_samples: must be an integer >= 1, got {eot_samples}")


def pgd_step(method: Method, ctx: AttackContext, x_adv: Tensor, x: Tensor, eta: float, alpha: float,
             eot_samples: int = 1) -> tuple[Tensor, dict[str, float]]:
    """One signed-gradient ascent step of ``method``'s objective, projected to ``|x_adv - x|_inf <= eta`` and [0, 1].

    ``x_adv``, ``x``: ``(B, 3, H, W)`` padded images in [0, 1]; ``eta``, ``alpha`` in pixel scale.
    Returns the new (detached) ``x_adv`` and the mean of each loss term.
    """
    x_adv = x_adv.detach().requires_grad_(True)
    with torch.enable_grad():
        terms = _step_gradient(method, ctx, x_adv, eot_samples)
    with torch.no_grad():
        return project_linf(x_adv + alpha * x_adv.grad.sign(), x, eta), terms


def _step_gradient(method: Method, ctx: AttackContext, x_adv: Tensor, eot_samples: int) -> dict[str, float]:
    """Accumulate ∇ objective into ``x_adv.grad``; return the mean of each loss term.

    The encoder runs once; each EOT sample, and each part of a method's loss,
    back-propagates to a detached copy of the latent right away, so only one
    noise-predictor graph is alive at a time, and the encoder backward runs
    once at the end.
    """
    z = ctx.model.encode(x_adv)
    z_leaf = z.detach().requires_grad_(True)
    sums: dict[str, float] = {}
    for _ in range(eot_samples):
        for terms in loss_parts(method, ctx, x_adv, z_leaf):
            obj = terms["objective"]
            if not torch.isfinite(obj).all():
                raise FloatingPointError("protect: the objective became NaN/inf; lower alpha or use fp32 weights")
            (obj.sum() / eot_samples).backward()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach().mean()) / eot_samples
    if z_leaf.grad is not None:
        z.backward(z_leaf.grad)
    if x_adv.grad is None:
        x_adv.grad = torch.zeros_like(x_adv)
    return sums


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
    m = get_method(method)
    if m.loss is None:
        raise ValueError(f"method: {method!r} has no objective")
    if method != "antipure":
        frequency = timestep = None
    x0 = x.detach().to(model.device, torch.float32)
    xa = x_adv.detach().to(model.device, torch.float32)
    mult = _pad_multiple(model, frequency, window)
    xp, _ = pad_to_multiple(x0, mult)
    xap, _ = pad_to_multiple(xa, mult)
    ctx = _context(model, xp, cond, torch.Generator().manual_seed(int(seed)), method, t_range, t_purify, frequency,
                   timestep, options, window, stride, window_mode)
    z = model.encode(xap)
    sums: dict[str, float] = {}
    for _ in range(samples):
        for k, v in m.loss(ctx, xap, z).items():
            sums[k] = sums.get(k, 0.0) + float(v.mean()) / samples
    return sums



# the surrogate-training methods (aspl, fsmg, simac) register themselves; they need pgd_step above
from . import surrogate  # noqa: E402,F401
