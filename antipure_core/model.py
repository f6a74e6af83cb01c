"""The small interface through which the core sees a latent diffusion model.

Everything in ``antipure_core`` (protection, purification, customization)
talks to a model only through :class:`DiffusionModel`. The ComfyUI bridge in
``nodes/`` implements it on the host's MODEL/VAE; the tests implement it with
tiny conv modules. Conventions:

* images are ``(B, C, H, W)`` float tensors in ``[0, 1]`` (C = 3);
* latents are *scaled* latents, the space the noise predictor works in;
* timesteps are integer tensors ``(B,)`` in ``[0, num_timesteps)``;
* the forward process is variance preserving:
  ``z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps`` (see :mod:`.diffusion`).
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from .diffusion import linear_alphas_cumprod


@runtime_checkable
class DiffusionModel(Protocol):
    """What the core needs of a model. All methods must be differentiable."""

    #: cumulative product of alphas, ``(num_timesteps,)`` float32 on any device
    alphas_cumprod: Tensor
    #: spatial down-sampling factor of the autoencoder (8 for Stable Diffusion)
    downsample: int

    @property
    def num_timesteps(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    def encode(self, x: Tensor) -> Tensor:
        """``(B, 3, H, W)`` in [0, 1] -> scaled latent ``(B, c, H/f, W/f)``."""

    def decode(self, z: Tensor) -> Tensor:
        """Scaled latent -> image ``(B, 3, H, W)``, roughly in [0, 1], not clamped."""

    def predict_noise(self, z_t: Tensor, t: Tensor, cond: Any) -> Tensor:
        """Noise prediction eps_hat for noisy latent ``z_t`` at integer timesteps ``t``.

        ``cond`` is opaque to the core (a text embedding, a host CONDITIONING,
        ...); the implementation broadcasts it over the batch.
        """


def check_model(model: Any) -> None:
    """Raise ``TypeError`` naming what is missing when ``model`` is not a :class:`DiffusionModel`."""
    need = ("alphas_cumprod", "downsample", "num_timesteps", "device", "encode", "decode", "predict_noise")
    missing = [n for n in need if not hasattr(model, n)]
    if missing:
        raise TypeError(f"model: not a DiffusionModel, missing {', '.join(missing)}")


class ScheduledModule(nn.Module):
    """Base for plain-torch implementations of :class:`DiffusionModel`: holds the schedule as a buffer
    (so it follows ``.to(device)``) and derives ``num_timesteps`` and ``device`` from it."""

    def __init__(self, num_timesteps: int = 1000):
        super().__init__()
        self.register_buffer("alphas_cumprod", linear_alphas_cumprod(num_timesteps))

    @property
    def num_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    @property
    def device(self) -> torch.device:
        return self.alphas_cumprod.device


def check_features(model: Any) -> None:
    """Raise ``TypeError`` unless ``model`` has the optional feature capability.

    A model may implement ``predict_noise_features(z_t, t, cond) -> (eps_hat, features)``:
    the same ``eps_hat`` as :meth:`DiffusionModel.predict_noise` and a non-empty list of
    ``(B, C_k, h_k, w_k)`` tensors, the outputs of the residual branches (the second
    convolution, before the skip is added) of the ResBlocks in the noise predictor's last
    up-block, all differentiable. SimAC's feature-interference term uses them.
    """
    if not callable(getattr(model, "predict_noise_features", None)):
        raise TypeError(f"model: {type(model).__name__} has no predict_noise_features (last up-block ResBlock "
                        "features), which the feature term needs; set its weight to 0")
