"""What AntiPurePurify runs on: the host's samplers as the core's ``denoise_fn``, the VAE alone for IMPRESS,
the host's upscaler, and DiffPure/GrIDPure on the pack's pixel-space model.

``t_star`` is a fraction of the *timesteps*, as in DiffPure (0.1 = timestep
100 of 1000): the latent is noised to exactly ``sigma(t*·T)`` of the model's
schedule, whatever the scheduler. The scheduler only spaces the ``steps``
denoising steps below that level: like KSampler's ``denoise``, the schedule
is computed for more steps and its tail kept, but its first level is replaced
by ``sigma(t*·T)``. (KSampler's ``denoise = d`` starts wherever the longer
schedule happens to be: near timestep ``d·T`` for normal/simple, at a much
lower noise level for karras/exponential.)
"""
from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch
from torch import Tensor

from ..antipure_core.callbacks import report
from ..antipure_core.purify_pixel import check_pixel_image, pixel_diffpure, pixel_gridpure
from ..antipure_core.windows import check_window_fits
from . import bridge
from .comfy_host import ImageUpscaleWithModel, model_management, sample, samplers
from .progress import host_callback

#: schedules are searched up to this many steps (KSampler's own maximum)
MAX_SCHEDULE_STEPS = 10000

# --- the host's sampling as the core's denoise_fn ---------------------------------------------------------------

def purification_sigmas(model, sampler_name: str, scheduler: str, steps: int, t: int) -> Tensor:
    """The host's schedule for ``sampler_name``/``scheduler`` from ``sigma(t)`` down to 0 in ``steps`` steps.

    Takes the smallest schedule length ``n`` whose levels below ``sigma(t)``
    number at least ``steps``, keeps the last ``steps`` of them and prepends
    ``sigma(t)``. Schedulers with few levels below ``t`` (``simple`` and
    ``ddim_uniform`` use the model's discrete timesteps) give fewer steps.

    Args:
        model: the host's MODEL.
        sampler_name, scheduler: names from ``comfy.samplers.KSampler.SAMPLERS`` / ``.SCHEDULERS``.
        steps: denoising steps, >= 1.
        t: integer start timestep in [1, T - 1].

    Returns:
        ``(k + 1,)`` float32 CPU sigmas, strictly decreasing from ``sigma(t)`` to 0, ``k <= steps``.
    """
    ms = model.get_model_object("model_sampling")
    start = float(ms.sigma(torch.tensor(float(t))))
    # the sampler's own schedule rules (e.g. uni_pc's discarded penultimate sigma) come with KSampler
    ks = samplers.KSampler(model, steps=1, device="cpu", sampler=sampler_name, scheduler=scheduler)

    def below(n: int) -> Tensor:
        s = ks.calculate_sigmas(n).float().cpu()
        # long discrete schedules repeat levels; a repeated level would be a zero-length step
        return torch.unique_consecutive(s[s < start * (1 - 1e-5)])

    lo, hi = steps - 1, steps  # below(lo) is never needed; hi grows until it has enough levels
    while len(below(hi)) < steps and hi < MAX_SCHEDULE_STEPS:
        lo, hi = hi, min(2 * hi, MAX_SCHEDULE_STEPS)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if len(below(mid)) >= steps else (mid, hi)
    tail = below(hi)[-steps:]
    return torch.cat([torch.tensor([start]), tail])


def host_denoiser(model, positive, negative, sampler_name: str, scheduler: str, steps: int, cfg: float, seed: int):
    """A core ``denoise_fn(z_t, t, callback) -> z0`` that runs the host's sampler from timestep ``t`` to 0.

    The core's VP latent ``z_t = sqrt(abar) z0 + sqrt(1 - abar) eps`` is the
    host's noised latent ``z0 + sigma eps`` times ``sqrt(abar)``; it is given to
    the sampler as the starting latent with zero added noise (the core already
    noised it, from its seeded generator).
    """
    latent_format = model.get_model_object("latent_format")
    sampler = samplers.sampler_object(sampler_name)
    schedule = functools.lru_cache(maxsize=4)(
        lambda t: purification_sigmas(model, sampler_name, scheduler, steps, t))

    def denoise(z_t: Tensor, t: Tensor, callback) -> Tensor:
        if not bool((t == t[0]).all()):
            raise ValueError(f"t: the host sampler needs one timestep for the batch, got {t.tolist()}")
        sigmas = schedule(int(t[0]))
        x = z_t.float() * (1.0 + sigmas[0] ** 2) ** 0.5
        latent = latent_format.process_out(x).cpu()  # a LATENT is unscaled; the sampler scales it in

        def step(i, denoised, x_i, total):
            report(callback, i=i, total=total)
        out = sample.sample_custom(model, torch.zeros_like(latent), cfg, sampler, sigmas, positive, negative, latent,
                                   callback=step, disable_pbar=True, seed=seed)
        return latent_format.process_in(out.float()).to(z_t)
    return denoise


def zeroed(cond):
    """``cond`` with its embeddings (and pooled output) set to zero, as the host's ConditioningZeroOut."""
    out = []
    for emb, opts in cond:
        opts = dict(opts)
        if opts.get("pooled_output") is not None:
            opts["pooled_output"] = torch.zeros_like(opts["pooled_output"])
        out.append([torch.zeros_like(emb), opts])
    return out


class HostSamplingModel(bridge.HostDiffusionModel):
    """The core's model interface for sampling without gradients: the VAE through the host's ``encode``/``decode``.

    ``VAE.encode``/``decode`` load the VAE, split the batch by free memory and
    fall back to tiles on out-of-memory; none of that is differentiable, which
    purification does not need. Inputs to ``encode`` are padded to a multiple of
    8 by the core, so the host's crop never bites.
    """

    def encode(self, x: Tensor) -> Tensor:
        raw = self.vae.encode(x.movedim(1, -1))
        return self.latent_format.process_in(raw.float()).to(self.device)

    def decode(self, z: Tensor) -> Tensor:
        img = self.vae.decode(self.latent_format.process_out(z.float()))
        return img.movedim(-1, 1).float().to(self.device)


# --- IMPRESS: differentiable VAE alone --------------------------------------------------------------------------

class HostAutoencoder:
    """The encode/decode half of the core's model interface on the host's VAE, differentiable (for IMPRESS).

    Latents stay unscaled: IMPRESS only round-trips ``D(E(x))``, where the
    scale cancels. There is no noise predictor and no schedule; the attributes
    exist for the core's interface check.
    """

    def __init__(self, vae):
        self.vae = vae
        self.downsample = int(vae.downscale_ratio)
        self.device = vae.device
        self.alphas_cumprod, self.num_timesteps = torch.ones(0), 0

    def encode(self, x: Tensor) -> Tensor:
        vae = self.vae
        return vae.first_stage_model.encode(vae.process_input(x.to(vae.device, torch.float32)).to(vae.vae_dtype)).float()

    def decode(self, z: Tensor) -> Tensor:
        # (y + 1) / 2 without process_output's clamp, whose gradient is zero outside [0, 1]
        return (self.vae.first_stage_model.decode(z.to(self.vae.vae_dtype)).float() + 1.0) / 2.0

    def predict_noise(self, z_t, t, cond=None):
        raise NotImplementedError("HostAutoencoder has no noise predictor; IMPRESS uses only the VAE")


@contextlib.contextmanager
def vae_session(vae) -> Iterator[HostAutoencoder]:
    """:func:`bridge.session` for a VAE alone: loaded fully, inference weights swapped for plain aliases, restored."""
    bridge.check_vae(vae)
    with torch.inference_mode(False), torch.enable_grad():
        model_management.load_models_gpu([vae.patcher], force_full_load=True)
        undo = bridge._swap_in_plain_tensors(vae.first_stage_model)
        try:
            yield HostAutoencoder(vae)
        finally:
            bridge._restore(undo)
            model_management.soft_empty_cache()


# --- noisy upscaling through the host's upscale path ------------------------------------------------------------

def host_upscaler(upscale_model):
    """``upscale(img (B, 3, h, w), size) -> img``: the host's ImageUpscaleWithModel (tiled, OOM-aware).

    The model's own scale decides the output size; the core resamples it to ``size``.
    """
    def upscale(img: Tensor, size) -> Tensor:
        return ImageUpscaleWithModel.execute(upscale_model, img.movedim(1, -1))[0].movedim(-1, 1)
    return upscale


# --- DiffPure / GrIDPure on a pixel-space model ----------------------------------------------------------------

def pixel_timestep(num_timesteps: int, fraction: float) -> int:
    """The node's ``t_star`` fraction as a pixel model's integer t* in ``[1, T]`` (0.01 -> 10, 0.1 -> 100 of 1000)."""
    return max(1, min(num_timesteps, round(fraction * num_timesteps)))


def pixel_purify(pixel_model, x: Tensor, method: str, t_star: float, size: int, grid_t_star: float, window: int,
                 stride: int, iterations: int, gamma: float, rounds: int, generator: torch.Generator,
                 node_id=None) -> Tensor:
    """diffpure/gridpure on a pixel-space model (:mod:`antipure_core.purify_pixel`); the bar moves per DDPM step.

    ``size``: diffpure's square working size (0 = the image's own resolution).
    """
    check_pixel_image(x, "image")
    if method == "diffpure":
        t = pixel_timestep(pixel_model.num_timesteps, t_star)
        return pixel_diffpure(pixel_model, x, t, size=size or None, generator=generator,
                              callback=host_callback(t, node_id))
    check_window_fits(tuple(x.shape[-2:]), window, "grid_window")
    if stride > window:
        raise ValueError(f"grid_stride: must be <= grid_window ({window}) so the windows cover the image, got {stride}")
    t = pixel_timestep(pixel_model.num_timesteps, grid_t_star)
    return pixel_gridpure(pixel_model, x, t_star=t, window=window, stride=stride, iterations=iterations, gamma=gamma,
                          rounds=rounds, generator=generator, callback=host_callback(1, node_id))
