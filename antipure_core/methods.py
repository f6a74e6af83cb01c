"""Attack methods as losses registered by name.

A method is a function ``loss(ctx, x_adv, z) -> dict`` of per-sample ``(B,)``
tensors with an ``"objective"`` entry that PGD *maximises*; the other entries
are the loss terms reported to the callback. ``x_adv`` is the perturbed image
``(B, 3, H, W)`` and ``z = E(x_adv)`` its image in the model's space (a
latent, or ``2x − 1`` for a pixel model), both carrying gradient to δ; the
PGD loop encodes once per step and calls the loss once per EOT sample. A
loss whose objective adds several weighted terms also returns each of them as
``<name>_weighted`` (:func:`weighted_terms`), so each term's gradient can be
taken on its own (:mod:`.objective_terms`).

A method whose terms use separate model graphs may also register ``parts``:
a generator of such dicts whose ``"objective"`` entries add up to the loss's.
PGD back-propagates each part before the next one is built, so only one
part's graph is alive at a time (for antipure: one UNet graph per purifier
window).

Every method is registered in this module, so importing it alone lists them
all (:data:`METHODS`, in the order the node shows them). Callers read a
method's flags (:class:`Method`: ``trains``, ``encoder``, ``guided``,
``purifies``), not its name. A method may also register a ``setup(ctx)`` that
checks its options once, when the attack context is built.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor

from .diffusion import abar_at, noise_at_random_t, predict_x0, q_sample, randn_like
from .frequency import FrequencyGuidance, pfg_loss
from .model import check_features
from .patterns import target_pattern
from .purification_gap import check_gap, gap_loss
from .purified_attack import check_purified, purified_parts
from .timestep import TimestepGuidance, erroneous_timestep, etg_loss
from .windows import WINDOW_MODES, grid_windows, pick_windows  # noqa: F401 (WINDOW_MODES: re-exported)


@dataclass
class AttackContext:
    """Everything a method loss needs besides ``x_adv`` and ``z``.

    Attributes:
        model: a :class:`~antipure_core.model.DiffusionModel`.
        x: the clean image ``(B, 3, H, W)`` (padded to the model's multiple).
        cond: conditioning, opaque to the core.
        generator: CPU generator for timesteps and noise (determinism).
        t_lo, t_hi: inclusive timestep range (schedule indices) of the base denoising loss;
            for antipure ``(0, t^p − 1)``, i.e. the 1-based t ~ U{1, …, t^p}.
        frequency, timestep: guidance configs; ``None`` disables that term.
        options: method-specific settings (``textural_weight``, ``target``).
        cache: per-attack constants a method computes once (target latents).
        window, stride: antipure on images larger than the purifier's window:
            the purifier's window layout in pixels (:func:`~antipure_core.windows.grid_windows`,
            packed corners included); ``None``: the whole image at once.
        window_mode: ``'all'`` windows every step (one UNet graph each, back-propagated
            one at a time) or one ``'random'`` window per step.
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
    window: Optional[int] = None
    stride: Optional[int] = None
    window_mode: str = "all"


@dataclass(frozen=True)
class Method:
    """A registered attack: its loss (``None`` for ``random``) and what the loops and nodes must know about it.

    Callers read the flags, never the name: a new method sets the flags that fit it.
    """

    name: str
    loss: Optional[Callable[[AttackContext, Tensor, Tensor], dict]]
    description: str
    parts: Optional[Callable[[AttackContext, Tensor, Tensor], Iterator[dict]]] = None
    #: fine-tunes a copy of the model between attack steps: run by :func:`antipure_core.surrogate.protect_surrogate`
    trains: bool = False
    #: the loss attacks a VAE encoder (a target latent): meaningless on a pixel purifier, which has none
    encoder: bool = False
    #: uses PFG/ETG guidance, draws t ~ U{1..t^p} (``t_purify``) instead of ``t_range``, and attacks the
    #: purifier's windows
    guided: bool = False
    #: attacks the customization model through the attacker's purifiers: takes ``options['purification']`` and,
    #: for pixel purifiers, ``options['pixel_model']`` (:mod:`.purified_attack`)
    purifies: bool = False
    #: ``setup(ctx)``: checks ``ctx.options`` (and may fill defaults) once, when the context is built
    setup: Optional[Callable[[AttackContext], None]] = None


METHODS: dict[str, Method] = {}


def register_method(name: str, description: str, parts=None, trains: bool = False, encoder: bool = False,
                    guided: bool = False, purifies: bool = False, setup=None):
    """Decorator registering ``loss`` (and optionally its ``parts``) under ``name``; a new attack is one function.

    ``trains``, ``encoder``, ``guided``, ``purifies``: the :class:`Method` flags; ``setup``: its option check.
    Registration order is the order the node lists the methods in.
    """
    def wrap(fn):
        METHODS[name] = Method(name, fn, description, parts, trains=trains, encoder=encoder, guided=guided,
                               purifies=purifies, setup=setup)
        return fn
    return wrap


def loss_parts(method: Method, ctx: AttackContext, x_adv: Tensor, z: Tensor) -> Iterator[dict]:
    """``method``'s loss as parts to back-propagate one at a time (the whole loss if it has no parts)."""
    if method.parts is None:
        yield method.loss(ctx, x_adv, z)
    else:
        yield from method.parts(ctx, x_adv, z)


#: suffix of a loss dict's entries that are the objective's additive terms, weights applied
WEIGHTED = "_weighted"


def weighted_terms(terms: dict) -> dict:
    """The additive terms of ``terms["objective"]``, weights applied, by name: each ``<name>_weighted`` entry.

    A method whose objective is one term has no such entries: it is then ``{"objective": ...}``.
    """
    found = {k[:-len(WEIGHTED)]: v for k, v in terms.items() if k.endswith(WEIGHTED)}
    return found or {"objective": terms["objective"]}


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
    return noise_at_random_t(ctx.model, z, t_lo, t_hi, ctx.generator)


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


def antipure_terms(ctx: AttackContext, z: Tensor) -> dict:
    """AntiPure's terms (DESIGN §1.1) on ``z``, the purifier-space image (or one window of it).

    ``L = L_ddpm + λ₁·e^{ᾱ_t−1}·L_fre + λ₂·e^{L_err}`` with one ``x_t`` and one
    noise prediction at ``t`` shared by all three terms: ``L_ddpm = mean((ε_θ(x_t, t) − ε)²)``;
    ``L_fre`` on the one-step ``x̂₀`` decoded to the image range [−1, 1]
    (identity for a pixel purifier); ``L_err`` against the prediction at ``t_err > t``.
    Returns per-sample ``(B,)`` terms ``ldm``, ``pfg``, ``etg`` (the enabled ones), each one's weighted
    contribution ``<name>_weighted`` (:func:`weighted_terms`; they add up to it) and ``objective``.
    """
    model = ctx.model
    t, noise, z_t = _noisy(ctx, z, ctx.t_lo, ctx.t_hi)
    eps = model.predict_noise(z_t, t, ctx.cond)
    ldm = _mse(eps, noise)
    out = {"ldm": ldm, "ldm" + WEIGHTED: ldm}
    objective = ldm
    pfg = ctx.frequency
    if pfg is not None:
        x0_img = model.decode(predict_x0(model, z_t, t, eps)) * 2 - 1
        out["pfg"] = pfg_loss(x0_img, pfg)
        out["pfg" + WEIGHTED] = pfg.weight * torch.exp(abar_at(model, t, ldm) - 1) * out["pfg"]
        objective = objective + out["pfg" + WEIGHTED]
    etg = ctx.timestep
    if etg is not None:
        offset = ctx.t_hi + 1 if etg.offset is None else etg.offset  # default: past t^p, the purifier's range
        t_err = erroneous_timestep(t, model.num_timesteps, etg.rule, offset, etg.scale)
        if etg.stop_gradient:
            with torch.no_grad():
                eps_err = model.predict_noise(z_t.detach(), t_err, ctx.cond)
        else:
            eps_err = model.predict_noise(z_t, t_err, ctx.cond)
        out["etg"] = etg_loss(eps, eps_err)
        out["etg" + WEIGHTED] = etg.weight * torch.exp(out["etg"])
        objective = objective + out["etg" + WEIGHTED]
    out["objective"] = objective
    return out


def attack_tiles(ctx: AttackContext, z: Tensor) -> list[Tensor]:
    """The windows of ``z`` the attack sees this step: all of the purifier's layout, one random window, or ``[z]``.

    Window sizes are in pixels and divided by the model's down-sampling
    factor; an image no larger than the window is one tile.
    """
    f = int(ctx.model.downsample)
    h, w = z.shape[-2] * f, z.shape[-1] * f
    if ctx.window is None or (h <= ctx.window and w <= ctx.window):
        return [z]
    stride = ctx.stride or ctx.window // 2
    tiles = grid_windows(tuple(z.shape[-2:]), ctx.window // f, max(1, stride // f)).crops(z)
    return [tiles[j] for j in pick_windows(len(tiles), ctx.window_mode, ctx.generator)]


def antipure_parts(ctx: AttackContext, x_adv: Tensor, z: Tensor) -> Iterator[dict]:
    """AntiPure's loss, one part per window (each the mean's share), so one UNet graph is alive at a time."""
    tiles = attack_tiles(ctx, z)
    for tile in tiles:
        yield {k: v / len(tiles) for k, v in antipure_terms(ctx, tile).items()}


@register_method("antipure", "AntiPure (§1.1): L_ddpm + λ₁ e^{ᾱ_t−1} L_fre + λ₂ e^{L_err} on the purifier, "
                             "t ~ U{1..t^p} (each guidance optional)", parts=antipure_parts, guided=True)
def antipure_loss(ctx: AttackContext, x_adv: Tensor, z: Tensor) -> dict:
    return _sum_parts(antipure_parts(ctx, x_adv, z))


@register_method("mist", "Mist: L_ldm plus a textural loss pulling E(x') toward a target pattern's latent",
                 encoder=True)
def mist_loss(ctx: AttackContext, x_adv: Tensor, z: Tensor) -> dict:
    ldm = advdm_loss(ctx, x_adv, z)["ldm"]
    textural = _mse(z, _target_latent(ctx, ctx.options.get("target", "texture")))
    w = ctx.options.get("textural_weight", 1.0)
    return {"objective": ldm - w * textural, "ldm": ldm, "textural": textural}


@register_method("photoguard", "PhotoGuard encoder attack: pull E(x') toward a target latent", encoder=True)
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


def purified_advdm_parts(ctx: AttackContext, x_adv: Tensor, z: Tensor) -> Iterator[dict]:
    """AdvDM's loss on ``x'`` and on a drawn purifier's output of it (:func:`.purified_attack.purified_parts`)."""
    return purified_parts(ctx, x_adv, z, advdm_loss)


@register_method("purified_advdm", "AdvDM's L_ldm on the attacker's purified image and on x' itself, gradients "
                                   "through the purifier (expectation over purifiers and their noise)",
                 parts=purified_advdm_parts, purifies=True, setup=check_purified)
def purified_advdm_loss(ctx: AttackContext, x_adv: Tensor, z: Tensor) -> dict:
    return _sum_parts(purified_advdm_parts(ctx, x_adv, z))


register_method("purification_gap", "Oracle on the purifier: maximise ‖P(x′) − x′‖² through the pixel purifier's "
                "chain (GrIDPure/DiffPure; route 'full': every step); the customization model is not in the loss",
                purifies=True, setup=check_gap)(gap_loss)

METHODS["random"] = Method("random", None, "Uniform noise U[-η, η] at the same budget (no optimisation)")


# --- methods that fine-tune a surrogate between attack steps (run by surrogate.protect_surrogate) ---------------

register_method("aspl", "Anti-DreamBooth ASPL: PGD on L_ldm against a surrogate re-trained on clean images every "
                "outer iteration, the model trained on the protected ones", trains=True)(advdm_loss)
register_method("fsmg", "Anti-DreamBooth FSMG: fine-tune once on clean images, then PGD on L_ldm against the fixed "
                "model", trains=True)(advdm_loss)


@register_method("simac", "SimAC: ASPL with per-image timestep intervals found by a greedy search, plus a "
                 "feature-interference term", trains=True)
def simac_loss(ctx: AttackContext, x_adv: Tensor, z: Tensor) -> dict:
    """SimAC's PGD objective: the denoising loss at each image's own kept timesteps, plus feature interference.

    ``ctx.options``: ``kept_timesteps`` (list of ``(n_b,)`` integer tensors, one per image, from
    :func:`~antipure_core.timestep_search.search_timesteps`; default the whole ``[t_lo, t_hi]``),
    ``feature_weight`` (w >= 0).

    Feature interference: ``w * mean_k MSE(F_k(z_t'), F_k(z_t))`` over the ResBlock features ``F_k``
    of the noise predictor's last up-block (``model.predict_noise_features``), between the perturbed
    latent and the clean one noised with the same ``t`` and noise. The gradient flows through the
    perturbed branch. Note: the released SimAC code adds this term as a detached constant
    (``loss + target_loss.detach().item()``), so there it changes no gradient; ``w = 0`` reproduces
    that exactly. Its reference is the clean image here; the released code takes the images as they
    were at the start of each outer iteration.
    """
    model = ctx.model
    kept = ctx.options.get("kept_timesteps")
    if kept is None:
        t = torch.randint(ctx.t_lo, ctx.t_hi + 1, (z.shape[0],), generator=ctx.generator)
    else:
        t = torch.stack([k[torch.randint(k.shape[0], (1,), generator=ctx.generator)][0] for k in kept])
    t = t.to(z.device)
    noise = randn_like(z, ctx.generator)
    z_t = q_sample(model, z, t, noise)
    w = float(ctx.options.get("feature_weight", 0.0))
    if w <= 0:
        ldm = _mse(model.predict_noise(z_t, t, ctx.cond), noise)
        return {"objective": ldm, "ldm": ldm}
    check_features(model)
    eps, feats = model.predict_noise_features(z_t, t, ctx.cond)
    with torch.no_grad():
        if "clean_latent" not in ctx.cache:
            ctx.cache["clean_latent"] = model.encode(ctx.x).detach()
        _, ref = model.predict_noise_features(q_sample(model, ctx.cache["clean_latent"], t, noise), t, ctx.cond)
    feature = torch.stack([_mse(f, r) for f, r in zip(feats, ref)]).mean(0)
    ldm = _mse(eps, noise)
    return {"objective": ldm + w * feature, "ldm": ldm, "feature": feature}


register_method("purified_aspl", "ASPL's surrogate loop with purified_advdm's loss: PGD through the attacker's "
                "purifiers against a surrogate re-trained every outer iteration", parts=purified_advdm_parts,
                trains=True, purifies=True, setup=check_purified)(purified_advdm_loss)
