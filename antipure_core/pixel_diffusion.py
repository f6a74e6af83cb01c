"""A pixel-space diffusion model (guided-diffusion ADM) behind the core's :class:`~antipure_core.model.DiffusionModel`.

There is no autoencoder: the model's space is the image itself in [-1, 1],
so ``encode(x) = 2x - 1``, ``decode(z) = (z + 1) / 2`` and ``downsample = 1``.
The schedule is guided-diffusion's 1000-step linear one (β from 1e-4 to 0.02),
kept with every quantity an ancestral DDPM step needs, as in its
``GaussianDiffusion`` (computed in float64, stored in float32).

Example:
    >>> model = load_pixel_diffusion("256x256_diffusion_uncond.pt").to("cuda")
    >>> eps = model.predict_noise(z_t, t, None)               # (B, 3, H, W)
    >>> eps, log_var = model.predict_noise_and_log_variance(z_t, t)
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .adm import ADMUNet, adm_from_state_dict
from .diffusion import gather
from .model import ScheduledModule
from .weights import load_state_dict


def adm_linear_betas(num_timesteps: int = 1000) -> Tensor:
    """guided-diffusion's "linear" β schedule, float64 ``(num_timesteps,)``, scaled so any length spans the same range."""
    scale = 1000 / num_timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)


class PixelDiffusion(ScheduledModule):
    """An ADM UNet on images in [-1, 1], with the schedule quantities of ancestral DDPM sampling.

    Attributes:
        unet: the :class:`~antipure_core.adm.ADMUNet`.
        alphas_cumprod, betas, posterior_mean_coef1, posterior_mean_coef2, posterior_log_variance_clipped,
        fixed_log_variance: ``(T,)`` float32 buffers, guided-diffusion's names and formulas.
    """

    downsample = 1

    def __init__(self, unet: ADMUNet, num_timesteps: int = 1000):
        super().__init__(num_timesteps)
        self.unet = unet
        betas = adm_linear_betas(num_timesteps)
        ab = torch.cumprod(1 - betas, 0)
        ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
        post_var = betas * (1 - ab_prev) / (1 - ab)
        tables = {
            "betas": betas,
            "posterior_mean_coef1": betas * ab_prev.sqrt() / (1 - ab),
            "posterior_mean_coef2": (1 - ab_prev) * (1 - betas).sqrt() / (1 - ab),
            # the posterior variance is 0 at t = 0: its log is clipped to the value at t = 1
            "posterior_log_variance_clipped": torch.log(torch.cat([post_var[1:2], post_var[1:]])),
            # without a learned variance: guided-diffusion's "fixed large" β_t, with β̃_1 at t = 0
            "fixed_log_variance": torch.log(torch.cat([post_var[1:2], betas[1:]])),
        }
        self.alphas_cumprod = ab.float()
        for name, v in tables.items():
            self.register_buffer(name, v.float(), persistent=False)

    # --- the DiffusionModel interface ---

    def encode(self, x: Tensor) -> Tensor:
        """Image ``(B, 3, H, W)`` in [0, 1] -> the model's space, the same image in [-1, 1]."""
        return 2 * x - 1

    def decode(self, z: Tensor) -> Tensor:
        """The model's space [-1, 1] -> image in [0, 1] (not clamped)."""
        return (z + 1) / 2

    def predict_noise(self, z_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        """ε̂ ``(B, 3, H, W)`` for ``z_t`` in [-1, 1] space at integer timesteps ``t (B,)``; ``cond`` is ignored
        (unconditional model)."""
        return self.unet_output(z_t, t)[:, :3]

    # --- learned variance for samplers ---

    def unet_output(self, z_t: Tensor, t: Tensor) -> Tensor:
        """The UNet's raw output ``(B, out_channels, H, W)``, any H, W >= 8.

        Sides that are not a multiple of the UNet's down-sampling are
        reflect-padded at the bottom/right and the output cropped back.
        """
        h, w = z_t.shape[-2:]
        m = self.unet.config.size_multiple
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:
            mode = "reflect" if ph < h and pw < w else "replicate"
            z_t = F.pad(z_t, (0, pw, 0, ph), mode=mode)
        t = t.to(z_t.device).expand(z_t.shape[0]) if t.ndim else t.to(z_t.device).repeat(z_t.shape[0])
        return self.unet(z_t, t)[..., :h, :w]

    def log_variance(self, var_values: Tensor | None, t: Tensor, like: Tensor) -> Tensor:
        """Log variance of ``p(x_{t-1} | x_t)``.

        With a learned variance (``var_values`` = the UNet's last 3 channels, in
        [-1, 1]): guided-diffusion's interpolation in log space between the
        posterior variance β̃_t (at -1) and β_t (at +1). Without one
        (``var_values = None``): the fixed "large" variance β_t (β̃_1 at t = 0).
        """
        if var_values is None:
            return gather(self.fixed_log_variance, t, like).expand_as(like)
        max_log = gather(self.betas.log(), t, like)
        min_log = gather(self.posterior_log_variance_clipped, t, like)
        frac = (var_values.float() + 1) / 2
        return frac * max_log + (1 - frac) * min_log

    def predict_noise_and_log_variance(self, z_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """ε̂ and the log variance of ``p(x_{t-1} | x_t)`` (see :meth:`log_variance`), both ``(B, 3, H, W)``."""
        out = self.unet_output(z_t, t)
        c = z_t.shape[1]
        var_values = out[:, c:] if self.unet.config.learn_sigma else None
        return out[:, :c], self.log_variance(var_values, t, z_t)

    def posterior_mean(self, x0: Tensor, z_t: Tensor, t: Tensor) -> Tensor:
        """Mean of ``q(x_{t-1} | x_t, x_0)``."""
        return gather(self.posterior_mean_coef1, t, z_t) * x0 + gather(self.posterior_mean_coef2, t, z_t) * z_t


def load_pixel_diffusion(path: str | os.PathLike, num_head_channels: int = 64,
                         dtype: torch.dtype = torch.float32, name: str = "ckpt_name") -> PixelDiffusion:
    """Load a guided-diffusion ADM checkpoint (``.safetensors`` or ``.pt``/``.pth`` via ``weights_only``).

    Args:
        path: the weight file, a plain unprefixed state dict as guided-diffusion saves it.
        num_head_channels: attention head width (not recorded in the weights; 64 for every public
            unconditional release, e.g. ``256x256_diffusion_uncond.pt``).
        dtype: dtype of the weights in memory.
        name: the input named in errors.

    Returns:
        A :class:`PixelDiffusion` on the CPU, eval mode, gradients off.

    Raises:
        ValueError: naming ``name``, for a file that is not an ADM, an SD checkpoint, or a refused pickle.
    """
    sd = load_state_dict(path, name)
    unet = adm_from_state_dict(sd, num_head_channels=num_head_channels, name=f"{name} ({Path(path).name})")
    return PixelDiffusion(unet.to(dtype)).eval().requires_grad_(False)
