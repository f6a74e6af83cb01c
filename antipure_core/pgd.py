"""The one PGD skeleton every protection runs: opening checks, attack context, start, step, finish.

:func:`~antipure_core.protect.protect` and
:func:`~antipure_core.surrogate.protect_surrogate` differ only in what happens
between the steps (nothing, or fine-tuning a surrogate), so both are built from
these pieces::

    m = check_attack(model, x, method, eta, alpha, steps, eot_samples)
    x0 = x.detach().to(model.device, torch.float32)
    xp, x_adv, size = attack_start(x0, pad_multiple(model), eta, generator, random_start)
    ctx = attack_context(model, xp, cond, generator, m)
    for i in range(steps):
        x_adv, terms = pgd_step(m, ctx, x_adv, xp, eta, alpha)
    out = attack_finish(x_adv, x0, eta, quantize, like=x)

Images are ``(B, 3, H, W)`` in [0, 1]; ``eta`` and ``alpha`` in pixel scale
(e.g. 8/255 and 1/255). Only :func:`check_attack` validates images; the rest
trust their inputs, so loops pay for no device synchronisation.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor

from .frequency import FrequencyGuidance
from .image import check_budget, check_image, crop_to, pad_to_multiple, project_linf, quantize_within_budget
from .methods import METHODS, WINDOW_MODES, AttackContext, Method, get_method
from .model import check_model
from .objective_terms import image_gradients, share_gradient
from .timestep import TimestepGuidance

#: AntiPure's default t^p: GrIDPure's t* (10 of 1000 steps, DESIGN §1.3)
DEFAULT_T_PURIFY = 10


# --- opening checks ---------------------------------------------------------------------------------------------

def check_eot(eot_samples) -> None:
    if isinstance(eot_samples, bool) or not isinstance(eot_samples, int) or eot_samples < 1:
        raise ValueError(f"eot_samples: must be an integer >= 1, got {eot_samples}")


def check_attack(model, x: Tensor, method: str, eta: float, alpha: float, steps: int, eot_samples: int) -> Method:
    """The checks every protection opens with; returns ``method``'s registered :class:`~.methods.Method`.

    ``x``: ``(B, 3, H, W)`` in [0, 1]. Raises ``TypeError``/``ValueError`` naming the bad argument, and
    ``RuntimeError`` inside ``torch.inference_mode()``, where no gradient reaches the image (the attack would
    return the start point unchanged, silently).
    """
    if torch.is_inference_mode_enabled():
        raise RuntimeError("protect: called inside torch.inference_mode(), where no gradient reaches the image; "
                           "call it outside (in a ComfyUI node: inside antipure_comfy's bridge.session / "
                           "pixel_session, which leave inference mode)")
    check_model(model)
    check_image(x, "image")
    check_budget(eta, alpha, steps)
    m = get_method(method)
    check_eot(eot_samples)
    return m


# --- context ----------------------------------------------------------------------------------------------------

def guidance(method: Method, frequency: Optional[FrequencyGuidance], timestep: Optional[TimestepGuidance]
             ) -> tuple[Optional[FrequencyGuidance], Optional[TimestepGuidance]]:
    """``(frequency, timestep)`` for a guided method, ``(None, None)`` for the others (they have no such terms)."""
    return (frequency, timestep) if method.guided else (None, None)


def pad_multiple(model, frequency: Optional[FrequencyGuidance] = None, window: Optional[int] = None) -> int:
    """What H and W must be multiples of: the model's down-sampling (and its UNet's own multiple), PFG's patch."""
    m = int(model.downsample) * int(getattr(model, "size_multiple", 1))
    if frequency is not None:
        m = math.lcm(m, frequency.patch_size)
    if window is not None and window % m:
        raise ValueError(f"window: {window} px must be a multiple of {m} (the purifier's size multiple and the "
                         f"PFG patch); pick e.g. {max(m, window // m * m)}")
    return m


def _guided_names() -> str:
    return ", ".join(name for name, m in METHODS.items() if m.guided)


def timestep_range(method: Method, num_timesteps: int, t_range: Optional[tuple[int, int]],
                   t_purify: Optional[int]) -> tuple[int, int]:
    """The inclusive schedule-index range of ``method``'s loss: ``t_range`` (default the whole schedule), or for a
    guided method ``(0, t^p - 1)`` from ``t_purify`` (default :data:`DEFAULT_T_PURIFY`)."""
    T = num_timesteps
    if method.guided:
        if t_range is not None:
            raise ValueError(f"t_range: {method.name} draws t ~ U{{1..t^p}}; pass t_purify (t^p) instead")
        t_p = DEFAULT_T_PURIFY if t_purify is None else t_purify
        if not isinstance(t_p, int) or not 1 <= t_p <= T - 1:
            raise ValueError(f"t_purify: t^p must be an integer in [1, {T - 1}] (the purifier's t*, "
                             f"10 for GrIDPure), got {t_p!r}")
        t_range = (0, t_p - 1)  # 1-based t in [1, t^p] is schedule index t - 1
    elif t_purify is not None:
        raise ValueError(f"t_purify: only guided methods ({_guided_names()}) use t^p; {method.name} takes t_range")
    t_lo, t_hi = (0, T - 1) if t_range is None else t_range
    if not 0 <= t_lo <= t_hi <= T - 1:
        raise ValueError(f"t_range: need 0 <= t_lo <= t_hi <= {T - 1}, got ({t_lo}, {t_hi})")
    return int(t_lo), int(t_hi)


def check_windows(window: Optional[int], stride: Optional[int], window_mode: str) -> None:
    """Raise a ``ValueError`` naming the bad purifier-window setting (pixels)."""
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"window: must be an integer >= 1 (pixels) or None, got {window!r}")
    if stride is not None and (window is None or not isinstance(stride, int) or not 1 <= stride <= window):
        raise ValueError(f"stride: must be an integer in [1, window] with a window set, got {stride!r}")
    if window_mode not in WINDOW_MODES:
        raise ValueError(f"window_mode: expected one of {WINDOW_MODES}, got {window_mode!r}")


def attack_context(model, x: Tensor, cond: Any, generator: torch.Generator, method: Method,
                   t_range: Optional[tuple[int, int]] = None, t_purify: Optional[int] = None,
                   frequency: Optional[FrequencyGuidance] = None, timestep: Optional[TimestepGuidance] = None,
                   options: Optional[dict] = None, window: Optional[int] = None, stride: Optional[int] = None,
                   window_mode: str = "all") -> AttackContext:
    """The :class:`~.methods.AttackContext` of ``method`` on the padded clean images ``x`` ``(B, 3, H, W)``.

    Checks the timestep range (:func:`timestep_range`), the window settings and the method's own options
    (its ``setup``); draws nothing from ``generator``.
    """
    t_lo, t_hi = timestep_range(method, model.num_timesteps, t_range, t_purify)
    check_windows(window, stride, window_mode)
    ctx = AttackContext(model, x, cond, generator, t_lo, t_hi, frequency, timestep, dict(options or {}),
                        window=window, stride=stride, window_mode=window_mode)
    if method.setup is not None:
        method.setup(ctx)
    return ctx


# --- start ------------------------------------------------------------------------------------------------------

def start_point(x: Tensor, eta: float, generator: torch.Generator, random_start: bool) -> Tensor:
    """PGD's first iterate ``(B, 3, H, W)``: ``x`` itself, or ``x + U[-eta, eta]``, projected to the budget and [0, 1].

    The noise is drawn on the CPU from ``generator``, so a seed gives the same start on every device.
    """
    delta = torch.zeros_like(x)
    if random_start:
        delta = (torch.rand(x.shape, generator=generator) * 2 - 1).to(x.device) * eta
    return project_linf(x + delta, x, eta)


def attack_start(x: Tensor, multiple: int, eta: float, generator: torch.Generator,
                 random_start: bool) -> tuple[Tensor, Tensor, tuple[int, int]]:
    """Pad the clean images ``x`` ``(B, 3, H, W)`` to ``multiple`` and start PGD there.

    Returns the padded clean images ``(B, 3, H', W')``, the first iterate of the same shape
    (:func:`start_point`) and ``(H, W)``, the size :func:`attack_finish` crops back to.
    """
    xp, size = pad_to_multiple(x, multiple)
    return xp, start_point(xp, eta, generator, random_start), size


# --- step -------------------------------------------------------------------------------------------------------

def pgd_step(method: Method, ctx: AttackContext, x_adv: Tensor, x: Tensor, eta: float, alpha: float,
             eot_samples: int = 1) -> tuple[Tensor, dict[str, float]]:
    """One signed-gradient ascent step of ``method``'s objective, projected to ``|x_adv - x|_inf <= eta`` and [0, 1].

    ``x_adv``, ``x``: ``(B, 3, H, W)`` padded images in [0, 1]; ``eta``, ``alpha`` in pixel scale.
    Returns the new (detached) ``x_adv`` and the mean of each loss term (with PFG at a fixed
    ``share``, also ``pfg_lambda``, the step's effective λ₁; ``objective`` stays the method's own, at λ₁).
    """
    x_adv = x_adv.detach().requires_grad_(True)
    share = None if ctx.frequency is None else ctx.frequency.share
    with torch.enable_grad():
        if share is None:
            terms, grads = image_gradients(method, ctx, x_adv, eot_samples)
            grad = grads.get("objective", torch.zeros_like(x_adv))
        else:
            terms, grad = share_gradient(method, ctx, x_adv, eot_samples, share)
    with torch.no_grad():
        return project_linf(x_adv + alpha * grad.sign(), x, eta), terms


# --- finish -----------------------------------------------------------------------------------------------------

def attack_finish(x_adv: Tensor, x: Tensor, eta: float, quantize: bool, like: Tensor) -> Tensor:
    """The protected images: ``x_adv`` cropped to the clean ``x`` ``(B, 3, H, W)``, optionally on the 8-bit grid
    within ``eta`` of ``x`` (:func:`~.image.quantize_within_budget`), on ``like``'s device and dtype."""
    out = crop_to(x_adv.detach(), x.shape[-2:])
    if quantize:
        out = quantize_within_budget(out, x, eta)
    return out.to(like.device, like.dtype)
