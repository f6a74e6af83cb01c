"""The oracle on the purifier: maximise the purification gap ``‖P(x′) − x′‖²`` through a pixel purifier's chain.

The AntiPure paper's proxy for "the purifier fails": a perturbation the
purifier changes a lot. Here it is optimised directly, the gradient going
through the purifier itself (:mod:`.purify_grad`), not through a surrogate
loss on it: with ``route = 'full'`` (:class:`~.purified_attack.PurifiedSettings`'
default) every one of GrIDPure's ``t_star`` ancestral steps on the window is
differentiated (checkpointed per step), so this is the upper bound of what an
attack on the purifier alone can do. ``'k_step'`` / ``'one_step'`` are cheaper
approximations of it, not the oracle.

    gap = mean over the purified pixels of (P(x′) − x′)²   (pixel scale [0, 1], per image)

``P`` is drawn per loss evaluation from the settings' purifiers, which must be
the pixel ones (GrIDPure, DiffPure on ``options['pixel_model']``): SDEdit runs
on the customization model, JPEG/resize/blur have no chain. GrIDPure with
``windows = 'random'`` purifies one window and the mean is over that window
(outside it ``P(x′) = x′``); with ``'all'`` and for DiffPure, over the image.
The customization model given to :func:`~antipure_core.protect.protect` is not
in the loss (PGD still encodes with it once a step). Of the settings,
``purified_weight`` and the SDEdit/JPEG/resize/blur ones are unused;
``lowpass_sigma`` blurs the ascent direction as in ``purified_advdm``.

Example:
    >>> s = PurifiedSettings(route="full", t_star=10, window=256)
    >>> x_adv = protect(ldm, x, cond, method="purification_gap", options={"purification": s, "pixel_model": adm})
"""
from __future__ import annotations

import torch
from torch import Tensor

from .purified_attack import (EOT_PURIFIERS, PIXEL_PURIFIERS, PurifiedSettings, check_pixel_model, draw_purifier,
                              gridpure_share, lowpass_input, purification_settings)


def check_gap(ctx) -> None:
    """``purification_gap``'s ``setup``: the settings (default ``PurifiedSettings()``), only pixel purifiers
    with weight, and the pixel model. Raises ``ValueError``/``TypeError`` naming the option and the fix."""
    s = purification_settings(ctx)
    other = [n for n, w in s.purifiers.items() if w > 0 and n not in PIXEL_PURIFIERS]
    if other:
        raise ValueError(f"purifiers: purification_gap differentiates a pixel purifier's chain "
                         f"({', '.join(PIXEL_PURIFIERS)}); {', '.join(other)} "
                         f"{'is' if len(other) == 1 else 'are'} not one (SDEdit runs on the customization "
                         "model, JPEG/resize/blur have no chain): give them weight 0, or use purified_advdm")
    check_pixel_model(ctx, s, [n for n in PIXEL_PURIFIERS if s.purifiers.get(n, 0) > 0])


def purified_share(ctx, x: Tensor, s: PurifiedSettings) -> tuple[Tensor, float]:
    """A drawn pixel purifier's output of ``x`` and the share of the image it purified (1 but for one random
    GrIDPure window)."""
    name = draw_purifier(s, ctx.generator)
    if name == "gridpure":
        return gridpure_share(ctx, x, s)
    return EOT_PURIFIERS[name](ctx, x, s), 1.0


def gap_loss(ctx, x_adv: Tensor, z: Tensor) -> dict:
    """``{'objective', 'gap'}``, per image ``(B,)``: the mean square of ``P(x′) − x′`` over the purified
    pixels. ``z`` (the customization model's latent) is unused."""
    s: PurifiedSettings = ctx.options["purification"]
    x_in = lowpass_input(x_adv, s)
    x_pure, share = purified_share(ctx, x_in, s)
    diff = (x_pure - x_in).to(torch.promote_types(x_in.dtype, torch.float32))  # fp32 at least, fp64 kept
    gap = diff.square().flatten(1).mean(1) / share
    return {"objective": gap, "gap": gap}
