"""Attacking the customization model through the purifier (DESIGN §1.5): its settings and its loss.

The loss is the customization model's training loss (AdvDM's L_ldm, or any
method loss) on the purifier's output of ``x' = x + δ`` and on ``x'`` itself:

    L = (1 − w) · L_ldm(x') + w · E_{P, noise} [ L_ldm(P(x')) ]

with ``w`` = :attr:`PurifiedSettings.purified_weight` and ``P`` drawn per loss
evaluation from a weighted set of the attacker's purifiers, each differentiable
(:mod:`.purify_grad`): GrIDPure and DiffPure on a pixel diffusion model (the
``pixel_model`` option), SDEdit on the customization model itself (through its
VAE), a differentiable JPEG, resize and blur. The two terms are separate parts
(:data:`~antipure_core.methods.Method.parts`), back-propagated one after the
other. All randomness (the purifier, its window, t, noise) is drawn from the
attack's generator.

``ctx.options`` keys: ``'purification'`` (:class:`PurifiedSettings`, default
``PurifiedSettings()``), ``'pixel_model'`` (a
:class:`~antipure_core.pixel_diffusion.PixelDiffusion`, needed when GrIDPure or
DiffPure has weight), ``'sdedit_cond'`` (SDEdit's conditioning, default the
instance conditioning ``ctx.cond``). Under ``purified_aspl`` SDEdit runs on the
surrogate being trained (the attack's model), not on a frozen copy.

Example:
    >>> s = PurifiedSettings(route="k_step", k=3, purifiers={"gridpure": 3, "jpeg": 1})
    >>> x_adv = protect(ldm, x, cond, method="purified_advdm", options={"purification": s, "pixel_model": adm})
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional

import torch
from torch import Tensor

from .model import check_model
from .purify_filters import blur, check_int, check_number, down_up
from .purify_grad import ROUTES, jpeg_approx, pixel_chain, route_calls, sdedit_chain, sdedit_length
from .purify_pixel import GRIDPURE, MIN_SIDE
from .windows import WINDOW_MODES, grid_windows, pick_windows


@dataclass(frozen=True)
class PurifiedSettings:
    """Settings of the purified methods (``purified_advdm``, ``purified_aspl``).

    Attributes:
        route: gradient route through a diffusion purifier: ``'one_step'``, ``'k_step'`` or ``'full'``
            (:mod:`.purify_grad`).
        k: ``'k_step'``: the last ``k`` steps of each chain carry the gradient (a shorter chain: all of it).
        checkpoint: recompute each differentiated step in the backward pass (memory near one step's graph).
        purifiers: the expectation's set, ``{name: weight}`` with names in :data:`EOT_PURIFIERS`; one is drawn
            per loss evaluation with probability ∝ weight (a weight of 0 is never drawn).
        purified_weight: ``w`` in [0, 1], the purified term's weight (``1 − w`` on ``x'`` itself).
        t_star, window, stride, gamma, windows: the pixel GrIDPure: ``t_star`` ancestral steps from index
            ``t_star − 1``; windows of ``window`` px at ``stride`` (``None``: ``window // 2``), packed corners;
            ``(1 − gamma) · purified + gamma · x'``; ``windows = 'random'``: one window, drawn per evaluation,
            is purified (the others pass as they are), ``'all'``: every window, overlaps averaged (one
            GrIDPure iteration).
        diffpure_t_star, diffpure_size: the pixel DiffPure: ``t_star`` steps, at ``size x size`` px (``None``:
            the image's own size).
        sdedit_t_star, sdedit_steps: SDEdit on the customization model: noise to this fraction of the
            schedule, that many DDIM steps back.
        jpeg_quality, resize_scale, blur_sigma: the differentiable JPEG (quality 1..100), down-up resize
            (fraction), Gaussian blur (σ px).
        lowpass_sigma: σ px > 0 smooths δ's ascent direction: the gradient reaching δ is Gaussian-blurred
            before PGD's sign, so each update is coherent over about σ px (low-frequency perturbations pass a
            purifier as content); 0: off. A filter on the gradient, not a reparameterisation of δ: the
            PGD skeleton keeps iterating on ``x'``. Costs one more encoder pass for the plain term.
    """

    route: str = "full"
    k: int = 1
    checkpoint: bool = True
    purifiers: Mapping[str, float] = field(default_factory=lambda: {"gridpure": 1.0})
    purified_weight: float = 0.5
    t_star: int = GRIDPURE.t_star
    window: int = GRIDPURE.window
    stride: Optional[int] = None
    gamma: float = GRIDPURE.gamma
    windows: str = "random"
    diffpure_t_star: int = 100
    diffpure_size: Optional[int] = None
    sdedit_t_star: float = 0.1
    sdedit_steps: int = 20
    jpeg_quality: int = 75
    resize_scale: float = 0.5
    blur_sigma: float = 1.0
    lowpass_sigma: float = 0.0

    def check(self) -> None:
        """Raise a ``ValueError`` naming the bad setting and what to set instead."""
        if self.route not in ROUTES:
            raise ValueError(f"route: expected one of {ROUTES}, got {self.route!r}")
        check_int(self.k, "k", 1)
        if not isinstance(self.checkpoint, bool):
            raise ValueError(f"checkpoint: must be True or False, got {self.checkpoint!r}")
        _check_purifiers(self.purifiers)
        check_number(self.purified_weight, "purified_weight", lo=0, hi=1,
                     hint="(0: plain AdvDM on x', 1: only the purified image)")
        check_int(self.t_star, "t_star", 1)
        check_int(self.window, "window", MIN_SIDE)
        if self.stride is not None:
            check_int(self.stride, "stride", 1, self.window)
        check_number(self.gamma, "gamma", lo=0, hi=1)
        if self.windows not in WINDOW_MODES:
            raise ValueError(f"windows: expected one of {WINDOW_MODES}, got {self.windows!r}")
        check_int(self.diffpure_t_star, "diffpure_t_star", 1)
        if self.diffpure_size is not None:
            check_int(self.diffpure_size, "diffpure_size", MIN_SIDE)
        check_number(self.sdedit_t_star, "sdedit_t_star", lo=0, hi=1, lo_open=True,
                     hint="(fraction of the schedule, e.g. 0.1)")
        check_int(self.sdedit_steps, "sdedit_steps", 1)
        check_int(self.jpeg_quality, "jpeg_quality", 1, 100)
        check_number(self.resize_scale, "resize_scale", lo=0, hi=1, lo_open=True, hint="(fraction of the size)")
        check_number(self.blur_sigma, "blur_sigma", lo=0, hint="(pixels)")
        check_number(self.lowpass_sigma, "lowpass_sigma", lo=0, hint="(pixels; 0: off)")


def _check_purifiers(purifiers) -> None:
    if not isinstance(purifiers, Mapping) or not purifiers:
        raise ValueError(f"purifiers: expected a non-empty {{name: weight}} with names in {EOT_PURIFIERS}, "
                         f"got {purifiers!r}")
    for name, w in purifiers.items():
        if name not in EOT_PURIFIERS:
            raise ValueError(f"purifiers: unknown {name!r}, choose among {', '.join(EOT_PURIFIERS)}")
        check_number(w, f"purifiers[{name!r}]", lo=0, hint="(a weight; 0 leaves it out)")
    if not sum(purifiers.values()) > 0:
        raise ValueError("purifiers: every weight is 0; give at least one purifier a weight > 0")


# --- the purifiers, differentiable ------------------------------------------------------------------------------

def gridpure_share(ctx, x: Tensor, s: PurifiedSettings) -> tuple[Tensor, float]:
    """GrIDPure's differentiable output of ``x`` ``(B, 3, H, W)`` and the share of ``x``'s pixels it purified:
    1 with ``windows = 'all'``, one window's area over the image's with ``'random'`` (outside that window the
    output is ``x`` exactly, so a mean over the image divided by the share is the mean over the window)."""
    layout = grid_windows(tuple(x.shape[-2:]), s.window, s.stride or s.window // 2)
    tiles = layout.crops(x)
    picked = pick_windows(layout.count, s.windows, ctx.generator)

    def chain(tile):
        return pixel_chain(ctx.options["pixel_model"], tile, s.t_star, s.route, s.k, ctx.generator, s.checkpoint)
    if len(picked) == layout.count:
        out, share = layout.merge([chain(tile) for tile in tiles]), 1.0
    else:
        tile = tiles[picked[0]]
        out, share = layout.paste(x, picked[0], chain(tile)), tile[0, 0].numel() / x[0, 0].numel()
    return x + (1 - s.gamma) * (out - x), share  # GrIDPure's blend, and exactly x' outside a random window


def _gridpure(ctx, x: Tensor, s: PurifiedSettings) -> Tensor:
    return gridpure_share(ctx, x, s)[0]


def _diffpure(ctx, x: Tensor, s: PurifiedSettings) -> Tensor:
    return pixel_chain(ctx.options["pixel_model"], x, s.diffpure_t_star, s.route, s.k, ctx.generator, s.checkpoint,
                       s.diffpure_size)


def _sdedit(ctx, x: Tensor, s: PurifiedSettings) -> Tensor:
    cond = ctx.options.get("sdedit_cond", ctx.cond)
    return sdedit_chain(ctx.model, x, cond, s.sdedit_t_star, s.sdedit_steps, s.route, s.k, ctx.generator,
                        s.checkpoint)


#: name -> ``purify(ctx, x', settings) -> image``, differentiable in ``x'``; the keys of
#: :attr:`PurifiedSettings.purifiers`
EOT_PURIFIERS: dict[str, Callable[[Any, Tensor, PurifiedSettings], Tensor]] = {
    "gridpure": _gridpure,
    "diffpure": _diffpure,
    "sdedit": _sdedit,
    "jpeg": lambda ctx, x, s: jpeg_approx(x, s.jpeg_quality),
    "resize": lambda ctx, x, s: down_up(x, s.resize_scale),
    "blur": lambda ctx, x, s: blur(x, s.blur_sigma).clamp(0, 1),
}
#: the purifiers that run on ``options['pixel_model']``
PIXEL_PURIFIERS = ("gridpure", "diffpure")


def draw_purifier(settings: PurifiedSettings, generator: torch.Generator) -> str:
    """A name from ``settings.purifiers`` drawn with probability ∝ its weight (one draw from ``generator``)."""
    names = list(settings.purifiers)
    weights = torch.tensor([float(settings.purifiers[n]) for n in names], dtype=torch.float64)
    return names[int(torch.multinomial(weights, 1, generator=generator))]


# --- the loss ---------------------------------------------------------------------------------------------------

def purification_settings(ctx) -> PurifiedSettings:
    """``ctx.options['purification']``, checked; the default put there if none. Raises ``TypeError`` /
    ``ValueError`` naming the option or the setting."""
    s = ctx.options.setdefault("purification", PurifiedSettings())
    if not isinstance(s, PurifiedSettings):
        raise TypeError(f"options['purification']: expected PurifiedSettings, got {type(s).__name__}")
    s.check()
    return s


def check_purified(ctx) -> None:
    """The purified methods' ``setup``: put the default settings in ``ctx.options`` if none, check them and the
    models the weighted purifiers need. Raises ``ValueError``/``TypeError`` naming the option."""
    s = purification_settings(ctx)
    pixel = [n for n in PIXEL_PURIFIERS if s.purifiers.get(n, 0) > 0]
    if pixel and s.purified_weight > 0:
        check_pixel_model(ctx, s, pixel, " or give them weight 0")


def check_pixel_model(ctx, s: PurifiedSettings, pixel: list[str], fix: str = "") -> None:
    """Check ``ctx.options['pixel_model']``, which the purifiers named in ``pixel`` run on, against ``s``;
    ``fix``: the error's alternative to passing one (e.g. ``" or give them weight 0"``)."""
    pm = ctx.options.get("pixel_model")
    if pm is None:
        verb = "runs" if len(pixel) == 1 else "run"
        raise ValueError(f"pixel_model: {' and '.join(pixel)} {verb} on a pixel diffusion model; pass "
                         "options['pixel_model'] (the node: connect AntiPure Load Pixel Diffusion)" + fix)
    check_model(pm)
    if not callable(getattr(pm, "predict_noise_and_log_variance", None)):
        raise TypeError(f"pixel_model: {type(pm).__name__} has no learned-variance step "
                        "(predict_noise_and_log_variance); load it with load_pixel_diffusion")
    for name in ("t_star", "diffpure_t_star"):
        check_int(getattr(s, name), name, 1, pm.num_timesteps)


class _LowpassGradient(torch.autograd.Function):
    """Identity forward; Gaussian-blurred gradient backward."""

    @staticmethod
    def forward(ctx, x: Tensor, sigma: float) -> Tensor:
        ctx.sigma = sigma
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return blur(grad, ctx.sigma), None


def lowpass_input(x_adv: Tensor, s: PurifiedSettings) -> Tensor:
    """``x_adv`` itself, or with its gradient Gaussian-blurred on the way back (``s.lowpass_sigma > 0``)."""
    return x_adv if s.lowpass_sigma == 0 else _LowpassGradient.apply(x_adv, float(s.lowpass_sigma))


def purified_parts(ctx, x_adv: Tensor, z: Tensor, loss: Callable[[Any, Tensor, Tensor], dict]) -> Iterator[dict]:
    """``loss`` on ``x'`` (weight ``1 − w``), then on a drawn purifier's output of ``x'`` (weight ``w``), as parts.

    ``loss(ctx, image, model.encode(image)) -> dict`` is the customization model's loss (AdvDM's). The plain part
    keeps ``loss``'s term names; the purified part's terms are suffixed ``_purified``; each part's weighted
    contribution to the objective is ``plain_weighted`` / ``purified_weighted`` (so
    :func:`~antipure_core.protect.term_gradients` can tell the two apart). The purified part's gradient reaches
    ``x_adv`` through the purifier and the model's encoder directly (not through ``z``).
    """
    s: PurifiedSettings = ctx.options["purification"]
    w = float(s.purified_weight)
    x_in = lowpass_input(x_adv, s)
    if w < 1:
        plain = loss(ctx, x_in, z if x_in is x_adv else ctx.model.encode(x_in))
        weighted = (1 - w) * plain["objective"]
        yield {**plain, "plain_weighted": weighted, "objective": weighted}
    if w > 0:
        x_pure = EOT_PURIFIERS[draw_purifier(s, ctx.generator)](ctx, x_in, s)
        terms = loss(ctx, x_pure, ctx.model.encode(x_pure))
        weighted = w * terms["objective"]
        yield {**{f"{k}_purified": v for k, v in terms.items() if k != "objective"},
               "purified_weighted": weighted, "objective": weighted}


def calls_per_step(settings: PurifiedSettings, purifier: str, windows: int = 1, num_timesteps: int = 1000
                   ) -> dict[str, int]:
    """Model calls of one loss evaluation (one PGD step at ``eot_samples = 1``) when ``purifier`` is drawn.

    Args:
        settings: the :class:`PurifiedSettings`.
        purifier: a name in :data:`EOT_PURIFIERS`.
        windows: GrIDPure's window count for the image (``grid_windows(...).count``), used with
            ``windows = 'all'``.
        num_timesteps: the customization model's schedule length (SDEdit's chain length depends on it).

    Returns:
        ``purifier_forward`` / ``purifier_backward``: denoiser calls of the purifier (ADM for GrIDPure/DiffPure,
        the customization UNet for SDEdit; checkpointed recomputation counted as forward);
        ``unet_forward`` / ``unet_backward``: the customization model's loss, one per term (the encoder runs
        as often, and SDEdit adds one VAE encode and decode with their backward).
    """
    s = settings
    terms = int(s.purified_weight < 1) + int(s.purified_weight > 0)
    out = {"purifier_forward": 0, "purifier_backward": 0, "unet_forward": terms, "unet_backward": terms}
    if s.purified_weight == 0 or purifier not in ("gridpure", "diffpure", "sdedit"):
        return out
    if purifier == "sdedit":
        n, chains = sdedit_length(num_timesteps, s.sdedit_t_star, s.sdedit_steps), 1
    else:
        n = s.t_star if purifier == "gridpure" else s.diffpure_t_star
        chains = windows if purifier == "gridpure" and s.windows == "all" else 1
    calls = route_calls(s.route, n, s.k, s.checkpoint)
    out["purifier_forward"], out["purifier_backward"] = chains * calls["forward"], chains * calls["backward"]
    return out

