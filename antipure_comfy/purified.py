"""The purified methods (``purified_advdm``, ``purified_aspl``) on the host: their settings and the models they need.

A method with the ``purifies`` flag attacks the customization model (Protect's
MODEL + VAE + positive, the model the attacker fine-tunes) *through* the
attacker's purifiers (:mod:`antipure_core.purified_attack`): GrIDPure and
DiffPure run on the pixel purifier (Protect's ``purifier`` input, from AntiPure
Load Pixel Diffusion), SDEdit on the MODEL + VAE themselves, JPEG / resize /
blur need no model. :func:`purified_settings` is the settings node's work;
:func:`check_purified_inputs` is Protect's boundary check for these methods;
:func:`purified_options` opens the pixel purifier (only when the settings draw
from it) and yields the core's ``options``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

from ..antipure_core.purified_attack import EOT_PURIFIERS, PIXEL_PURIFIERS, PurifiedSettings
from . import bridge
from .pixel_bridge import check_pixel_purifier, pixel_session

SETTINGS_NODE = "AntiPure Purified-Attack Settings"
#: the settings node's weight input of each purifier in the expectation
WEIGHT_INPUTS = {name: f"{name}_weight" for name in EOT_PURIFIERS}


@dataclass(frozen=True)
class HostPurified:
    """What the settings node passes to Protect: the core's checked settings and SDEdit's conditioning.

    ``sdedit_positive``: the CONDITIONING SDEdit denoises with (the attacker's prompt); ``None``: Protect's
    ``positive``.
    """

    settings: PurifiedSettings = field(default_factory=PurifiedSettings)
    sdedit_positive: Any = None

    def drawn(self) -> list[str]:
        """The purifiers the attack can draw (weight > 0), none when the purified term has weight 0."""
        s = self.settings
        return [n for n, w in s.purifiers.items() if w > 0] if s.purified_weight > 0 else []

    def pixel_purifiers(self) -> list[str]:
        """The drawn purifiers that run on the pixel purifier (GrIDPure, DiffPure)."""
        return [n for n in self.drawn() if n in PIXEL_PURIFIERS]


def purified_settings(route="full", k=1, windows="random", purified_weight=0.5, gridpure_weight=1.0,
                      diffpure_weight=0.0, sdedit_weight=0.0, jpeg_weight=0.0, resize_weight=0.0, blur_weight=0.0,
                      grid_t_star=10, grid_window=256, grid_stride=0, grid_gamma=0.1, diffpure_t_star=100,
                      diffpure_size=0, sdedit_t_star=0.1, sdedit_steps=20, jpeg_quality=75, resize_scale=0.5,
                      blur_sigma=1.0, lowpass_sigma=0.0, checkpoint=True, sdedit_positive=None) -> HostPurified:
    """The settings node's inputs, checked once, as a :class:`HostPurified` (``grid_stride`` 0 = half the window,
    ``diffpure_size`` 0 = the image's own size). Raises ``ValueError`` naming the input."""
    weights = dict(gridpure=gridpure_weight, diffpure=diffpure_weight, sdedit=sdedit_weight, jpeg=jpeg_weight,
                   resize=resize_weight, blur=blur_weight)
    if purified_weight > 0 and not any(w > 0 for w in weights.values()):
        raise ValueError(f"purifiers: every weight is 0 ({', '.join(WEIGHT_INPUTS.values())}); give at least one "
                         "purifier a weight > 0, or set purified_weight to 0 (plain AdvDM)")
    s = PurifiedSettings(
        route=route, k=int(k), checkpoint=bool(checkpoint),
        purifiers={n: float(w) for n, w in weights.items() if w > 0} or {"gridpure": 1.0},
        purified_weight=float(purified_weight), t_star=int(grid_t_star), window=int(grid_window),
        stride=int(grid_stride) or None, gamma=float(grid_gamma), windows=windows,
        diffpure_t_star=int(diffpure_t_star), diffpure_size=int(diffpure_size) or None,
        sdedit_t_star=float(sdedit_t_star), sdedit_steps=int(sdedit_steps), jpeg_quality=int(jpeg_quality),
        resize_scale=float(resize_scale), blur_sigma=float(blur_sigma), lowpass_sigma=float(lowpass_sigma))
    s.check()
    if sdedit_positive is not None:
        bridge.check_conditioning(sdedit_positive, "sdedit_positive")
    return HostPurified(s, sdedit_positive)


def as_host_purified(purified: Optional[HostPurified]) -> HostPurified:
    """``purified`` or the defaults when the settings node is disconnected; ``TypeError`` for anything else."""
    if purified is None:
        return HostPurified()
    if not isinstance(purified, HostPurified):
        raise TypeError(f"purified_settings: expected the {SETTINGS_NODE} output, got {type(purified).__name__}")
    return purified


def check_purified_inputs(method: str, purified: Optional[HostPurified], purifier, model, vae, positive) -> None:
    """Protect's boundary for a ``purifies`` method: the customization model, and the pixel purifier when the
    settings draw GrIDPure or DiffPure. Raises ``ValueError`` naming the missing input and the fix."""
    cfg = as_host_purified(purified)
    if model is None or vae is None or positive is None:
        missing = [n for n, v in (("model", model), ("vae", vae), ("positive", positive)) if v is None]
        sdedit = " (SDEdit in the purifier set runs on them too)" if "sdedit" in cfg.drawn() else ""
        raise ValueError(f"{missing[0]}: {method} attacks the customization model through the purifier; connect "
                         f"MODEL, VAE and the instance positive CONDITIONING (the model the attacker fine-tunes)"
                         f"{sdedit}; missing: {', '.join(missing)}")
    bridge.check_inputs(model, vae, positive)
    if purifier is not None:
        check_pixel_purifier(purifier)
    pixel = cfg.pixel_purifiers()
    if pixel and purifier is None:
        where = f"the {SETTINGS_NODE}" if purified is not None else \
            f"the defaults ({SETTINGS_NODE} disconnected: GrIDPure only)"
        verb = "runs" if len(pixel) == 1 else "run"
        raise ValueError(f"purifier: {' and '.join(pixel)} in {method}'s purifier set ({where}) {verb} on a pixel "
                         "diffusion model; connect AntiPure Load Pixel Diffusion to Protect's purifier input, or "
                         f"set {' and '.join(WEIGHT_INPUTS[n] for n in pixel)} to 0 in the {SETTINGS_NODE}")


@contextlib.contextmanager
def purified_options(purified: Optional[HostPurified], purifier, gradient_checkpointing: bool = False
                     ) -> Iterator[dict]:
    """The core's ``options`` for a purified method, inside the block.

    Opens ``purifier`` (already checked) through :func:`.pixel_bridge.pixel_session` only when the settings can
    draw GrIDPure or DiffPure, so an unused pixel model is never loaded; the caller's objects come back unchanged.
    """
    cfg = as_host_purified(purified)
    options: dict = {"purification": cfg.settings}
    if cfg.sdedit_positive is not None:
        options["sdedit_cond"] = cfg.sdedit_positive
    if purifier is None or not cfg.pixel_purifiers():
        yield options
        return
    with pixel_session(purifier, gradient_checkpointing) as pm:
        yield {**options, "pixel_model": pm}
