"""AntiPure Protect on the host: the attacked model (pixel purifier or MODEL + VAE), checks in /255 units, the run.

:func:`protect_images` is what the Protect node executes: it checks the
node's inputs once, picks the model to attack and hands the images to the
core's :func:`~antipure_core.protect.protect` (or, for methods that train a
surrogate, :func:`.surrogate.protect_with_surrogate`). A method with the
``purifies`` flag attacks the MODEL + VAE through the purifiers of its settings,
the pixel purifier among them (:mod:`.purified`).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

from ..antipure_core.methods import get_method
from ..antipure_core.protect import DEFAULT_T_PURIFY, protect
from . import bridge, checkpointing
from .images import to_core, to_host
from .pixel_bridge import check_pixel_purifier, pixel_session
from .progress import host_callback
from .purified import check_purified_inputs, purified_options
from .surrogate import protect_with_surrogate

#: the attack's window on a pixel purifier when ``window`` is 0: GrIDPure's (the ADM-256's own size)
PIXEL_WINDOW = 256


def delta_visualisation(x_adv: torch.Tensor, x: torch.Tensor, eta: float) -> torch.Tensor:
    """Map δ ∈ [−η, η] to [0, 1] (mid-gray = no change), so the noise is visible at full contrast."""
    return ((x_adv - x) / (2 * eta) + 0.5).clamp(0, 1)


@contextlib.contextmanager
def method_options(m, purifier, purified, gradient_checkpointing) -> Iterator[Optional[dict]]:
    """The core's ``options`` for method ``m``: its purifiers for a ``purifies`` method, else ``None``."""
    if not m.purifies:
        yield None
        return
    with purified_options(purified, purifier, gradient_checkpointing) as options:
        yield options


@contextlib.contextmanager
def attacked_model(purifier, model, vae, positive, gradient_checkpointing):
    """The core model to attack: the pixel purifier if connected, else the MODEL + VAE through the bridge."""
    if purifier is not None:
        with pixel_session(purifier, gradient_checkpointing) as dm:
            yield dm
        return
    with bridge.session(model, vae, positive) as dm, \
            checkpointing.gradient_checkpointing(model, vae, enabled=gradient_checkpointing):
        yield dm


def check_inputs(method: str, eta: float, alpha: float, purifier, model, vae, positive, purified=None) -> None:
    """The node's boundary: budget in /255 units and the models ``method`` needs; raises ``ValueError``."""
    m = get_method(method)
    if not 0 < eta <= 255:
        raise ValueError(f"eta: must be in (0, 255] (/255 units, 8 means 8/255), got {eta}")
    if not alpha > 0:
        raise ValueError(f"alpha: the PGD step must be > 0 (/255 units, e.g. 1), got {alpha}")
    if m.purifies:
        check_purified_inputs(method, purified, purifier, model, vae, positive)
    elif purifier is not None:
        check_pixel_purifier(purifier)
        if m.trains:
            raise ValueError(f"method: {method} fine-tunes a surrogate of the latent MODEL, not a pixel purifier; "
                             "disconnect the purifier and connect MODEL, VAE and positive")
        if m.encoder:
            raise ValueError(f"method: {method} attacks a VAE encoder, which a pixel purifier does not have; "
                             "pick antipure, advdm or sds, or disconnect the purifier to attack MODEL + VAE")
    elif model is None or vae is None or positive is None:
        raise ValueError("model: connect a MODEL, VAE and positive CONDITIONING (the latent purifier), or a "
                         "pixel purifier from AntiPure Load Pixel Diffusion")


def protect_images(image, model=None, vae=None, positive=None, method="antipure", eta=8.0, steps=100, alpha=1.0,
                   seed=0, random_start=False, eot_samples=1, gradient_checkpointing=False, frequency_guidance=None,
                   timestep_guidance=None, purifier=None, t_purify=DEFAULT_T_PURIFY, window=0, window_mode="all",
                   surrogate_settings=None, purified_settings=None, node_id=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Protect an IMAGE batch; returns ``(protected, delta)`` IMAGEs. ``eta``, ``alpha`` in /255 units.

    The arguments are the Protect node's inputs (see its tooltips). The models
    are used read-only: the pixel purifier and the MODEL/VAE come back unchanged.
    """
    check_inputs(method, eta, alpha, purifier, model, vae, positive, purified_settings)
    x, alpha_ch = to_core(image)
    eta_px, alpha_px = eta / 255.0, alpha / 255.0
    if steps == 0:
        return image.clone(), to_host(torch.full_like(x, 0.5), alpha_ch)
    m = get_method(method)
    with method_options(m, purifier, purified_settings, gradient_checkpointing) as options:
        if m.trains:
            x_adv = protect_with_surrogate(model, vae, positive, x, method, eta_px, alpha_px, steps, seed,
                                           random_start, eot_samples, surrogate_settings, gradient_checkpointing,
                                           node_id, options=options)
        else:
            target = None if m.purifies else purifier  # purifies: attack MODEL + VAE, the purifier is in options
            kw = dict(t_purify=t_purify, window=(window or (PIXEL_WINDOW if target is not None else None)),
                      window_mode=window_mode) if m.guided else {}
            callback = host_callback(steps, node_id)
            with attacked_model(target, model, vae, positive, gradient_checkpointing) as dm:
                x_adv = protect(dm, x, getattr(dm, "cond", None), method=method, eta=eta_px, alpha=alpha_px,
                                steps=steps, seed=seed, random_start=random_start, eot_samples=eot_samples,
                                frequency=frequency_guidance, timestep=timestep_guidance, options=options,
                                callback=callback, **kw)
    x_adv = x_adv.cpu()
    return to_host(x_adv, alpha_ch), to_host(delta_visualisation(x_adv, x, eta_px))

