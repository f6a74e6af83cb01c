"""Attack methods as losses registered by name.

A method is a function ``loss(ctx, x_adv, z) -> dict`` of per-sample ``(B,)``
tensors with an ``"objective"`` entry that PGD *maximises*; the other entries
are the loss terms reported to the callback. ``x_adv`` is the perturbed image
``(B, 3, H, W)`` and ``z = E(x_adv)`` its latent, both carrying gradient to δ;
the PGD loop encodes once per step and calls the loss once per EOT sample.

A method whose terms use separate model graphs may also register ``parts``:
a generator of such dicts whose ``"objective"`` entries add up to the loss's.
PGD back-propagates each part before the next one is built, so only one
part's graph is alive at a time (for antipure: the UNet graph at t is freed
before the purification graph, UNet plus decoder, is built).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor

from .diffusion import predict_x0, q_sample, randn_like, sample_timesteps, timestep_from_fraction
from .frequency import FrequencyGuidance, pfg_loss
from .patterns import target_pattern
from .timestep import TimestepGuidance, erroneous_timestep, etg_loss


@dataclass
class AttackContext:
    """Everything a method loss needs besides ``x_adv`` and ``z``.

    Attributes:
        model: a :class:`~antipure_core.model.DiffusionModel`.
        x: the clean image ``(B, 3, H, W)`` (padded to the model's multiple).
        cond: conditioning, opaque to the core.
        generator: CPU generator for timesteps and noise (determinism).
        t_lo, t_hi: inclusive timestep range of the base denoising loss.
        frequency, timestep: guidance configs; ``None`` disables that term.
        options: method-specific settings (``textural_weight``, ``target``).
        cache: per-attack constants a method computes once (target latents).
    """

    model: Any
    x: Tensor
    cond: Any
    generator: torch.Generator
    t_lo: int = 0
    t_hi: int = 999
    frequency: Optional[FrequencyGuidance] = None
    timestep: Optional[TimestepGuidance] = None
    options: dict = field(default_factory=dict)
    cache: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    name: str
    loss: Optional[Callable[[AttackContext, Tensor, Tensor], dict]]
    description: str
    parts: Optional[Callable[[AttackContext, Tensor, Tensor], Iterator[dict]]] = None
    #: fine-tunes a copy of the model between attack steps: run by :func:`antipure_core.surrogate.protect_surrogate`
    trains: bool = False


METHODS: dict[str, Method] = {}


def register_method(name: str, description: str, parts=None, trains: bool = False):
    """Decorator registering ``loss`` (and optionally its ``parts``) under ``name``; a new attack is one function."""
    def wrap(fn):
        METHODS[name] = Method(name, fn, description, parts, trains)
        return fn
    return wrap


def loss_parts(method: Method, ctx: AttackContext, x_adv: Tensor, z: Tensor) -> Iterator[dict]:
    """``method``'s loss as parts to back-propagate one at a time (the whole loss if it has no parts)."""
    if method.parts is None:
        yield method.loss(ctx, x_adv, z)
    else:
        yield from method.parts(ctx, x_adv, z)


def _sum_parts(parts) -> dict:
    out: dict = {}
    for part in parts:
        for k, v in part.items():
            out[k] = out[k] + v if k in out else v
    return out


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"method: unknown {name!r}; available: {', '.join(METHODS)}")
    return METHODS[name]


def _mse(a: Tensor, b: Tensor) -> Tensor:
    return (a.float() - b.float()).square().flatten(1).mean(1)


def _noisy(ctx: AttackContext, z: Tensor, t_lo: int, t_hi: int):
    t = sample_timesteps(z.shape[0], t_lo, t_hi, ctx.generator).to(z.device)
    noise = randn_like(z, ctx.generator)
    return t, noise, q_sample(ctx.model, z, t, noise)


def simulated_purification(ctx: AttackContext, z: Tensor, t_star: float) -> tuple[Tensor, Tensor, Tensor]:
    """PFG's simulated purification: noise ``z`` to t_p ~ U[1, t*·T], one-step estimate ẑ0.

    Returns ``(ẑ0, t_p, noise)`` so a caller can put other latents through the same purification.
    """
    t_p, noise, z_tp = _noisy(ctx, z, 1, timestep_from_fraction(ctx.model.num_timesteps, t_star))
    return predict_x0(ctx.model, z_tp, t_p, ctx.model.predict_noise(z_tp, t_p, ctx.cond)), t_p, noise


def _target_latent(ctx: AttackContext, kind: str) -> Tensor:
    key = f"target:{kind}"
    if key not in ctx.cache:
        h, w = ctx.x.shape[-2:]
        with torch.no_grad():
            ctx.cache[key] = ctx.model.encode(target_pattern(h, w, kind, ctx.x.device)).detach()
    return ctx.cache[key]


@register_method("advdm", "AdvDM: maximise the denoising loss L_ldm")
def advdm_loss(ctx: AttackContext, x_adv: Tensor, z: Tensor) -> dict:
    t, noise, z_t = _noisy(ctx, z, ctx.t_lo, ctx.t_hi)
    ldm = _mse(ctx.model.predict_noise(z_t, t, ctx.cond), noise)
    return {"objective": ldm, "ldm": ldm}


def antipure_parts(ctx: AttackContext, x_adv: Tensor, z: Tensor) -> Iterator[dict]:
    """AntiPure's loss in two parts: L_ldm - λ_etg L_etg (one UNet graph at t), then -λ_pfg L_pfg."""
    model, T = ctx.model, ctx.model.num_timesteps
    t, noise, z_t = _noisy(ctx, z, ctx.t_lo, ctx.t_hi)
    eps = model.predict_noise(z_t, t, ctx.cond)
    ldm = _mse(eps, noise)
    out = {"ldm": ldm}
    objective = ldm
    etg = ctx.timestep
    if etg is not None:
        t_e = erroneous_timestep(t, T, etg.mapping, etg.offset)
        if etg.mode == "match":  # stop-gradient target: no backward through this forward
            with torch.no_grad():
                eps_e = model.predict_noise(z_t.detach(), t_e, ctx.cond)
        else:
            eps_e = model.predict_noise(z_t, t_e, ctx.cond)
        out["etg"] = etg_loss(eps, eps_e, noise, etg.mode)
        objective = objective - etg.weight * out["etg"]
    out["objective"] = objective
    yield out
    pfg = ctx.frequency
    if pfg is not None:
        z0_hat, _, _ = simulated_purification(ctx, z, pfg.t_star)
        if pfg.space == "pixel":
            loss = pfg_loss(model.decode(z0_hat), x_adv, pfg)
        else:
            loss = pfg_loss(z0_hat, z, pfg)
        yield {"pfg": loss, "objective": -pfg.weight * loss}


@register_method("antipure", "AntiPure: L_ldm - λ_pfg L_pfg - λ_etg L_etg (each guidance optional)",
                 parts=antipure_parts)
def antipure_loss(ctx: AttackContext, x_adv: Tensor, z: Tensor) -> dict:
    return _sum_parts(antipure_parts(ctx, x_adv, z))


@register_method("mist", "Mist: L_ldm plus a textural loss pulling E(x') toward a target pattern's latent")
def mist_loss(ctx: AttackContext, x_adv: Tensor, z: Tensor) -> dict:
    ldm = advdm_loss(ctx, x_adv, z)["ldm"]
    textural = _mse(z, _target_latent(ctx, ctx.options.get("target", "texture")))
    w = ctx.options.get("textural_weight", 1.0)
    return {"objective": ldm - w * textural, "ldm": ldm, "textural": textural}


@register_method("photoguard", "PhotoGuard encoder attack: pull E(x') toward a target latent")
def photoguard_loss(ctx: AttackContext, x_adv: Tensor, z: Tensor) -> dict:
    dist = _mse(z, _target_latent(ctx, ctx.options.get("target", "gray")))
    return {"objective": -dist, "encoder_distance": dist}


@register_method("sds", "SDS-minus: descend the score-distillation gradient, no backward through the noise predictor")
def sds_loss(ctx: AttackContext, x_adv: Tensor, z: Tensor) -> dict:
    t, noise, z_t = _noisy(ctx, z, ctx.t_lo, ctx.t_hi)
    with torch.no_grad():
        residual = ctx.model.predict_noise(z_t, t, ctx.cond).float() - noise.float()
    # d/dz of (sg(r)·z) is the SDS gradient r; maximising its negative descends it
    surrogate = (residual * z.float()).flatten(1).sum(1) / residual[0].numel()
    return {"objective": -surrogate, "sds": surrogate, "ldm": residual.square().flatten(1).mean(1)}


METHODS["random"] = Method("random", None, "Uniform noise U[-η, η] at the same budget (no optimisation)")
