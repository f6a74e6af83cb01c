"""Erroneous Timestep Guidance (ETG, DESIGN §1.1): pull the purifier's prediction at t toward the one at a later t_err.

``L_err = −‖ε_θ(x_t, t_err) − ε_θ(x_t, t)‖²`` (mean over elements) on the
same noisy ``x_t``; the objective adds ``λ₂ · e^{L_err}``, which PGD
maximises, so the denoiser at the true step is made to act as at a wrong,
later one. The paper states neither how ``t_err`` follows from ``t`` nor
whether the ``t_err`` branch carries gradient: both are parameters here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

RULES = ("offset", "scale")


def erroneous_timestep(t: Tensor, num_timesteps: int, rule: str = "offset", offset: int = 10,
                       scale: float = 2.0) -> Tensor:
    """The later, wrong timestep ``t_err > t`` for integer timesteps ``t`` ``(B,)``, kept below ``num_timesteps``.

    ``'offset'``: ``t + offset``. ``'scale'``: ``round(scale · (t + 1)) − 1`` (a
    multiple of the 1-based step, so t = 0 maps to ``scale − 1``). Both are
    clamped to ``num_timesteps − 1``; only a ``t`` already at the last step maps onto itself.
    """
    if rule == "offset":
        if offset < 1:
            raise ValueError(f"offset: t_err must be later than t, need offset >= 1, got {offset}")
        t_err = t + int(offset)
    elif rule == "scale":
        if not scale > 1:
            raise ValueError(f"scale: t_err must be later than t, need scale > 1, got {scale}")
        t_err = torch.maximum(torch.round(scale * (t + 1).double()).long() - 1, t + 1)
    else:
        raise ValueError(f"rule: expected one of {RULES}, got {rule!r}")
    return t_err.clamp(max=num_timesteps - 1)


@dataclass(frozen=True)
class TimestepGuidance:
    """Parameters of ETG.

    Attributes:
        weight: λ₂ (0.5 in the paper).
        rule: how t_err follows from t, see :func:`erroneous_timestep`.
            Our default: ``'offset'`` by the purification range t^p, so t_err
            always lies just past the steps the purifier uses.
        offset: the offset in timesteps; ``None`` means t^p (10 for GrIDPure).
        scale: the factor of ``rule='scale'``.
        stop_gradient: no gradient through the t_err branch (our default: a
            forward without graph, and the pull acts on the prediction at t only).
    """

    weight: float = 0.5
    rule: str = "offset"
    offset: Optional[int] = None
    scale: float = 2.0
    stop_gradient: bool = True

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"rule: expected one of {RULES}, got {self.rule!r}")
        if self.offset is not None and self.offset < 1:
            raise ValueError(f"offset: must be >= 1 (t_err later than t) or None (= t^p), got {self.offset}")
        if not self.scale > 1:
            raise ValueError(f"scale: must be > 1 (t_err later than t), got {self.scale}")


def etg_loss(eps_t: Tensor, eps_err: Tensor) -> Tensor:
    """L_err ``(B,)``, ``≤ 0``: ``−mean((ε_θ(x_t, t_err) − ε_θ(x_t, t))²)`` over channels and pixels."""
    return -(eps_err.float() - eps_t.float()).square().flatten(1).mean(1)
