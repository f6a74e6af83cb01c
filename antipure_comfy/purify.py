"""The Purify nodes' work: the host's samplers as the core's ``denoise_fn``, the VAE alone for IMPRESS,
the host's upscaler, DiffPure/GrIDPure on the pack's pixel-space model, and one function per purifier family
(:func:`purify_diffpure`, :func:`purify_gridpure`, :func:`purify_impress`, :func:`purify_noisy_upscale`,
:func:`purify_filter`), each taking and returning the host's IMAGE.

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
from ..antipure_core.purify import (diffpure, diffpure_window, get_purifier, gridpure, impress, noisy_upscale, purification_timestep,
                                    window_boxes)
from ..antipure_core.purify_pixel import check_pixel_image, pixel_diffpure, pixel_gridpure
from ..antipure_core.windows import check_window_fits
from . import bridge
from .comfy_host import ImageUpscaleWithModel, model_management, sample, samplers
from .images import to_core, to_host
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
        undo = bridge.swap_in_plain_tensors(vae.first_stage_model)
        try:
            yield HostAutoencoder(vae)
        finally:
            bridge.restore(undo)
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


def pixel_diffpure_node(pixel_model, x: Tensor, t_star: float, size: int, generator: torch.Generator,
                        node_id=None) -> Tensor:
    """diffpure on a pixel-space model (:func:`~antipure_core.purify_pixel.pixel_diffpure`) at the node's ``t_star``
    fraction; ``size`` is the square working size (0 = the image's own); the bar moves per DDPM step."""
    check_pixel_image(x, "image")
    t = pixel_timestep(pixel_model.num_timesteps, t_star)
    return pixel_diffpure(pixel_model, x, t, size=size or None, generator=generator, callback=host_callback(t, node_id))


def pixel_gridpure_node(pixel_model, x: Tensor, grid_t_star: float, window: int, stride: int, iterations: int,
                        gamma: float, rounds: int, generator: torch.Generator, node_id=None) -> Tensor:
    """gridpure on a pixel-space model (:func:`~antipure_core.purify_pixel.pixel_gridpure`); the bar moves per window."""
    check_pixel_image(x, "image")
    check_window_fits(tuple(x.shape[-2:]), window, "grid_window")
    if stride > window:
        raise ValueError(f"grid_stride: must be <= grid_window ({window}) so the windows cover the image, got {stride}")
    t = pixel_timestep(pixel_model.num_timesteps, grid_t_star)
    return pixel_gridpure(pixel_model, x, t_star=t, window=window, stride=stride, iterations=iterations, gamma=gamma,
                          rounds=rounds, generator=generator, callback=host_callback(1, node_id))


# --- one function per purifier family: IMAGE in, IMAGE out -----------------------------------------------------

def _check_models(method: str, pixel_model, model, vae) -> bool:
    """Whether ``method`` runs on ``pixel_model``; else raise unless MODEL and VAE (the core's ``needs``) are there."""
    if pixel_model is not None:
        return True
    available = {name for name, v in (("model", model), ("vae", vae)) if v is not None}
    try:
        get_purifier(method, available)
    except ValueError as e:
        raise ValueError(f"{e}, or connect pixel_model (AntiPure Load Pixel Diffusion)") from None
    return False


def _host_sampling(method: str, model, vae, positive, negative, sampler_name, scheduler, steps, cfg, seed):
    """The core model and ``denoise_fn`` for DiffPure/GrIDPure on MODEL + VAE through the host's sampler."""
    if positive is None:
        raise ValueError(f"positive: purifier {method!r} samples with the model and needs a prompt "
                         "CONDITIONING; connect CLIP Text Encode (an empty prompt for unconditional "
                         "purification)")
    bridge.check_inputs(model, vae, positive)
    if negative is None:
        negative = zeroed(positive)
    dm = HostSamplingModel(model, vae)
    return dm, host_denoiser(model, positive, negative, sampler_name, scheduler, steps, cfg, seed)


def purify_diffpure(image, seed=0, t_star=0.1, steps=20, sampler_name="euler", scheduler="normal", cfg=1.0,
                    model=None, vae=None, positive=None, negative=None, pixel_model=None, pixel_diffpure_size=0,
                    node_id=None):
    """DiffPure/SDEdit on ``pixel_model`` (ancestral DDPM) or on MODEL + VAE with a host sampler; IMAGE -> IMAGE."""
    on_pixels = _check_models("diffpure", pixel_model, model, vae)
    x, alpha = to_core(image)
    generator = torch.Generator().manual_seed(seed)
    if on_pixels:
        y = pixel_diffpure_node(pixel_model, x, t_star, pixel_diffpure_size, generator, node_id)
    else:
        dm, denoise = _host_sampling("diffpure", model, vae, positive, negative, sampler_name, scheduler, steps,
                                     cfg, seed)
        purification_timestep(dm, t_star)  # range check before any work
        y = diffpure(dm, x, positive, t_star=t_star, steps=steps, generator=generator,
                     callback=host_callback(steps, node_id), denoise_fn=denoise)
    return to_host(y.cpu(), alpha)


def purify_gridpure(image, seed=0, grid_t_star=0.01, grid_window=256, grid_stride=128, grid_iterations=20,
                    grid_gamma=0.1, grid_rounds=1, steps=20, sampler_name="euler", scheduler="normal", cfg=1.0,
                    model=None, vae=None, positive=None, negative=None, pixel_model=None, node_id=None):
    """GrIDPure on ``pixel_model`` or on MODEL + VAE with a host sampler per window; IMAGE -> IMAGE."""
    on_pixels = _check_models("gridpure", pixel_model, model, vae)
    x, alpha = to_core(image)
    generator = torch.Generator().manual_seed(seed)
    if on_pixels:
        y = pixel_gridpure_node(pixel_model, x, grid_t_star, grid_window, grid_stride, grid_iterations, grid_gamma,
                                grid_rounds, generator, node_id)
    else:
        dm, denoise = _host_sampling("gridpure", model, vae, positive, negative, sampler_name, scheduler, steps,
                                     cfg, seed)
        n_windows = len(window_boxes(tuple(x.shape[-2:]), grid_window, grid_stride)) + 1
        iterations = grid_iterations * grid_rounds  # rounds continue one another: the same loop
        # the bar moves per window (gridpure reports its exact total); cancel is checked every sampler step
        window = diffpure_window(dm, positive, t_star=grid_t_star, steps=steps, generator=generator,
                                 callback=_check_cancel, denoise_fn=denoise)
        y = gridpure(x, window, window=grid_window, stride=grid_stride, iterations=iterations, gamma=grid_gamma,
                     callback=host_callback(iterations * n_windows, node_id))
    return to_host(y.cpu(), alpha)


def purify_impress(image, vae, impress_iterations=100, impress_lr=0.01, impress_similarity="ssim",
                   impress_weight=0.1, node_id=None):
    """IMPRESS on the host's VAE (differentiable, weights untouched); IMAGE -> IMAGE."""
    get_purifier("impress", {"vae"} if vae is not None else set())
    x, alpha = to_core(image)
    with vae_session(vae) as ae:
        # x.clone(): a plain copy, the IMAGE was made under inference mode
        y = impress(ae, x.clone(), iterations=impress_iterations, lr=impress_lr, similarity=impress_similarity,
                    weight=impress_weight, callback=host_callback(impress_iterations, node_id))
    return to_host(y.cpu(), alpha)


def purify_noisy_upscale(image, seed=0, noise_sigma=0.1, upscale_scale=0.5, upscale_model=None):
    """Noise, downscale and upscale back with the host's upscale model (or bicubic); IMAGE -> IMAGE."""
    x, alpha = to_core(image)
    up = None if upscale_model is None else host_upscaler(upscale_model)
    y = noisy_upscale(x, sigma=noise_sigma, scale=upscale_scale, upscale=up,
                      generator=torch.Generator().manual_seed(seed))
    return to_host(y.cpu(), alpha)


#: the model-free purifiers' own parameters, by the names the nodes give them
FILTER_PARAMS = {"jpeg": {"jpeg_quality": "quality"}, "gaussian_blur": {"blur_sigma": "sigma"},
                 "resize": {"resize_scale": "scale"}, "gaussian_noise": {"noise_sigma": "sigma"}}
#: the model-free purifiers that draw noise (they get a generator from ``seed``)
SEEDED_FILTERS = ("gaussian_noise",)


def purify_filter(image, method: str, seed: int = 0, **params):
    """A model-free purifier from the core's table (:data:`FILTER_PARAMS`), with the node's parameter names."""
    if method not in FILTER_PARAMS:
        raise ValueError(f"method: {method!r} is not a model-free purifier; choose one of {', '.join(FILTER_PARAMS)}")
    names = FILTER_PARAMS[method]
    unknown = set(params) - set(names)
    if unknown:
        raise TypeError(f"{method}: unexpected parameters {sorted(unknown)}; it takes {sorted(names)}")
    kwargs = {names[k]: v for k, v in params.items()}
    if method in SEEDED_FILTERS:
        kwargs["generator"] = torch.Generator().manual_seed(seed)
    x, alpha = to_core(image)
    return to_host(get_purifier(method).fn(x, **kwargs).cpu(), alpha)


def _check_cancel(info) -> None:
    model_management.throw_exception_if_processing_interrupted()
