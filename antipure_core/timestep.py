"""Erroneous Timestep Guidance (ETG): make the model at timestep t behave as if it were at a wrong one."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

MAPPINGS = ("reverse", "offset")
MODES = ("match", "error")


def erroneous_timestep(t: Tensor, num_timesteps: int, mapping: str = "reverse", offset: int = 500) -> Tensor:
    """The wrong timestep ``t_e = g(t)`` for integer timesteps ``t`` ``(B,)``.

    ``'reverse'``: ``T - 1 - t`` (early steps are treated as late ones and vice versa).
    ``'offset'``: ``(t + offset) mod T`` (a fixed shift that wraps around, so no
    timestep maps onto itself unless ``offset % T == 0``).
    """
    if mapping == "reverse":
        return num_timesteps - 1 - t
    if mapping == "offset":
        return torch.remainder(t + offset, num_timesteps)
    raise ValueError(f"mapping: expected one of {MAPPINGS}, got {mapping!r}")


@dataclass(frozen=True)
class TimestepGuidance:
    """Parameters of Erroneous Timestep Guidance (DESIGN §1.1).

    Attributes:
        weight: lambda_etg, the loss weight (minimised term).
        mapping: ``'reverse'`` (``t_e = T - 1 - t``) or ``'offset'``.
        offset: shift used by ``mapping='offset'``, in timesteps.
        mode: ``'match'`` pulls the prediction at t toward the stop-gradient
            prediction at t_e; ``'error'`` instead maximises the
            noise-prediction error at t_e.
    """

    weight: float = 1.0
    mapping: str = "reverse"
    offset: int = 500
    mode: str = "match"

    def __post_init__(self):
        if self.mapping not in MAPPINGS:
            raise ValueError(f"mapping: expected one of {MAPPINGS}, got {self.mapping!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {self.mode!r}")


def etg_loss(eps_t: Tensor, eps_te: Tensor, noise: Tensor, mode: str = "match") -> Tensor:
    """L_etg per sample ``(B,)``, to be minimised.

    Args:
        eps_t: prediction at the true timestep, ``(B, c, h, w)``, with gradient.
        eps_te: prediction at the wrong timestep on the same noisy latent.
        noise: the noise that was added.
        mode: ``'match'``: ``|eps_t - sg(eps_te)|²``; ``'error'``: ``-|eps_te - noise|²``
            (minimising it maximises the error at the wrong timestep).
    """
    if mode == "match":
        return (eps_t.float() - eps_te.detach().float()).square().flatten(1).mean(1)
    if mode == "error":
        return -(eps_te.float() - noise.float()).square().flatten(1).mean(1)
    raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
