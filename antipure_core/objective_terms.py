"""Image gradients of a method's objective, whole or one weighted term at a time, and PFG at a fixed share.

:func:`image_gradients` is the gradient pass of every PGD step
(:func:`~antipure_core.pgd.pgd_step`); with ``group`` it keeps the weighted
terms (:func:`~antipure_core.methods.weighted_terms`) apart, one backward pass
per group, which :func:`~antipure_core.protect.term_gradients` reports on and
:func:`share_gradient` rescales. Images are ``(B, 3, H, W)``.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .methods import AttackContext, Method, loss_parts, weighted_terms


def _add(acc: dict, key: str, grad: Optional[Tensor]) -> None:
    if grad is not None:
        acc[key] = acc[key] + grad if key in acc else grad


def _grouped(terms: dict, group: Optional[Callable[[str], str]]) -> dict[str, Tensor]:
    if group is None:
        return {"objective": terms["objective"]}
    out: dict[str, Tensor] = {}
    for name, value in weighted_terms(terms).items():
        _add(out, group(name), value)
    return out


def image_gradients(method: Method, ctx: AttackContext, x_adv: Tensor, samples: int = 1,
                    group: Optional[Callable[[str], str]] = None) -> tuple[dict[str, float], dict[str, Tensor]]:
    """``samples`` draws of ``method``'s loss at ``x_adv`` (a leaf with ``requires_grad``): the mean of each
    loss term, and the gradient w.r.t. ``x_adv`` of the mean objective, or of each group of its weighted terms.

    ``group(name)`` names the group a weighted term is summed into (``None``: one group, ``"objective"``);
    a group no term reaches has no entry. The encoder runs once; each part back-propagates to a detached copy
    of the latent right away, so only one noise-predictor graph is alive at a time, and the encoder backward
    runs once per group at the end. Only ``x_adv`` gets gradients (no model parameter's ``.grad`` is written).
    """
    z = ctx.model.encode(x_adv)
    z_leaf = z.detach().requires_grad_(True)
    sums: dict[str, float] = {}
    grad_z: dict[str, Tensor] = {}
    grad_x: dict[str, Tensor] = {}
    for _ in range(samples):
        for terms in loss_parts(method, ctx, x_adv, z_leaf):
            if not torch.isfinite(terms["objective"]).all():
                raise FloatingPointError("protect: the objective became NaN/inf; lower alpha or use fp32 weights")
            losses = [(k, v) for k, v in _grouped(terms, group).items() if v.requires_grad]
            for j, (k, loss) in enumerate(losses):
                # the part's graph is kept for the next group's backward, freed after the last
                gz, gx = torch.autograd.grad(loss.sum() / samples, (z_leaf, x_adv),
                                             retain_graph=j < len(losses) - 1, allow_unused=True)
                _add(grad_z, k, gz)
                _add(grad_x, k, gx)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach().mean()) / samples
    keys = list(grad_z) if z.requires_grad else []
    for j, k in enumerate(keys):
        (g,) = torch.autograd.grad(z, x_adv, grad_z[k], retain_graph=j < len(keys) - 1)
        _add(grad_x, k, g)
    return sums, grad_x


def share_scale(g_pfg: Tensor, g_rest: Tensor, share: float) -> Tensor:
    """``c`` ``(B, 1, 1, 1)`` with ``‖c·g_pfg‖ / (‖c·g_pfg‖ + ‖g_rest‖) = share`` for each image's gradients.

    ``c = share / (1 − share) · ‖g_rest‖ / ‖g_pfg‖``; where ``g_pfg = 0`` no scale helps, and ``c = 1``
    leaves λ₁ as set.
    """
    n_pfg = g_pfg.flatten(1).norm(dim=1)
    n_rest = g_rest.flatten(1).norm(dim=1)
    c = share / (1 - share) * n_rest / n_pfg.clamp_min(torch.finfo(n_pfg.dtype).tiny)
    return torch.where(n_pfg > 0, c, torch.ones_like(c)).view(-1, 1, 1, 1)


def _pfg_or_rest(name: str) -> str:
    return "pfg" if name == "pfg" else "rest"


def share_gradient(method: Method, ctx: AttackContext, x_adv: Tensor, samples: int, share: float
                   ) -> tuple[dict[str, float], Tensor]:
    """One PGD step's mean loss terms and its gradient with PFG's weighted term at ``share`` of it
    (:func:`share_scale`, from this step's own draws), adding ``pfg_lambda``: the mean effective λ₁."""
    sums, grads = image_gradients(method, ctx, x_adv, samples, _pfg_or_rest)
    zero = torch.zeros_like(x_adv)
    g_pfg, g_rest = grads.get("pfg", zero), grads.get("rest", zero)
    c = share_scale(g_pfg, g_rest, share)
    sums["pfg_lambda"] = ctx.frequency.weight * float(c.mean())
    return sums, c * g_pfg + g_rest
