"""AntiPurePurify: the attacker's purifiers on an IMAGE batch, diffusion ones through the host's own samplers.

DiffPure/SDEdit and GrIDPure run the core's loops (:func:`~antipure_core.purify.diffpure`,
:func:`~antipure_core.purify.gridpure`) with a ``denoise_fn`` that hands the
noised latent to the host's sampling (``comfy.sample.sample_custom``, the
path of SamplerCustom), so every sampler and scheduler KSampler offers works,
with the model's patches, LoRAs and memory management; the adapters are in
:mod:`.purify_host`, which also says how ``t_star`` maps onto a scheduler.
"""
from __future__ import annotations

import torch

from ..antipure_core.purify import (PURIFIERS, diffpure, gaussian_blur, gaussian_noise, get_purifier, gridpure,
                                    impress, jpeg, noisy_upscale, purification_timestep, resize_down_up,
                                    window_boxes)
from .comfy_host import io, model_management, samplers
from .images import to_core, to_host
from .pixel_diffusion import PIXEL_DIFFUSION
from .progress import host_callback
from .purify_host import HostSamplingModel, host_denoiser, host_upscaler, pixel_purify, vae_session, zeroed

_SAMPLED = ("diffpure", "gridpure")
_IGNORED = "Ignored by the other methods."


# --- the node ---------------------------------------------------------------------------------------------------

class AntiPurePurify(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        methods = "; ".join(f"{k}: {p.description}" for k, p in PURIFIERS.items())
        return io.Schema(
            node_id="AntiPurePurify",
            display_name="AntiPure Purify",
            category="AntiPure",
            description="Try to wash a protective perturbation out of images the way an attacker would: "
                        "DiffPure/SDEdit or GrIDPure with a pixel-space diffusion model (guided-diffusion ADM, as "
                        "GrIDPure and DiffPure do) or the loaded SD model and a host sampler, IMPRESS, noisy "
                        "upscaling, JPEG, blur, resize or noise. The output keeps the input's exact size.",
            inputs=[
                io.Image.Input("image", tooltip="Images to purify (e.g. AntiPure Protect's output). "
                                                "Any size and batch; the output keeps both."),
                io.Combo.Input("method", options=list(PURIFIERS), default="diffpure",
                               tooltip=f"{methods}. diffpure/gridpure need pixel_model, or MODEL, VAE and "
                                       "positive; impress needs VAE; the others need no model. Parameters of "
                                       "other methods are ignored."),
                io.Model.Input("model", optional=True,
                               tooltip="Latent diffusion model for diffpure/gridpure (SD1.x, SD2.x or SDXL), "
                                       "used when pixel_model is not connected. Not needed by the other "
                                       "methods."),
                io.Vae.Input("vae", optional=True,
                             tooltip="The checkpoint's VAE, for diffpure/gridpure/impress."),
                io.Conditioning.Input("positive", optional=True,
                                      tooltip="Prompt conditioning for diffpure/gridpure (an empty prompt for "
                                              "unconditional purification). " + _IGNORED),
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="Negative conditioning, used when cfg ≠ 1; disconnected = the "
                                              "positive zeroed out (as ConditioningZeroOut). " + _IGNORED),
                io.UpscaleModel.Input("upscale_model", optional=True,
                                      tooltip="For noisy_upscale: upscale with this model (tiled, as Upscale "
                                              "Image (using Model)) and resample to the input size. "
                                              "Disconnected = plain bicubic resample."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seeds the forward noise (diffpure/gridpure/noise/noisy_upscale) and "
                                     "the sampler's own noise."),
                io.Float.Input("t_star", default=0.1, min=0.001, max=1.0, step=0.005,
                               tooltip="diffpure: noise level as a fraction of the timesteps (0.1 = timestep "
                                       "100 of 1000, DiffPure's t*). The latent is noised to exactly that "
                                       "level; unlike KSampler's denoise it does not depend on the "
                                       "scheduler. With pixel_model: t* = round(t_star·1000), noised to ᾱ at "
                                       "index t*−1, t* DDPM steps back. " + _IGNORED),
                io.Int.Input("steps", default=20, min=1, max=10000,
                             tooltip="diffpure/gridpure on MODEL: sampler steps from t* down to 0 (per window "
                                     "for gridpure); fewer when the scheduler has fewer levels below t* "
                                     "(simple/ddim_uniform use discrete timesteps). With pixel_model: ignored, "
                                     "t* ancestral DDPM steps as in GrIDPure/DiffPure. " + _IGNORED),
                io.Combo.Input("sampler_name", options=list(samplers.KSampler.SAMPLERS), default="euler",
                               tooltip="diffpure/gridpure: the host sampler that denoises (as in KSampler). "
                                       + _IGNORED),
                io.Combo.Input("scheduler", options=list(samplers.KSampler.SCHEDULERS), default="normal",
                               tooltip="diffpure/gridpure: spacing of the steps below t* (as in KSampler). "
                                       + _IGNORED),
                io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="diffpure/gridpure: classifier-free guidance scale. 1 = positive only "
                                       "(half the cost). " + _IGNORED),
                io.Int.Input("grid_window", default=256, min=8, max=4096, step=8,
                             tooltip="gridpure: window side in pixels (256 in GrIDPure, for 512 px images). "
                                     + _IGNORED),
                io.Int.Input("grid_stride", default=128, min=8, max=4096, step=8,
                             tooltip="gridpure: window stride in pixels, <= window (128 in GrIDPure). " + _IGNORED),
                io.Int.Input("grid_iterations", default=20, min=1, max=1000,
                             tooltip="gridpure: purify-and-blend rounds (20 in GrIDPure). " + _IGNORED),
                io.Float.Input("grid_gamma", default=0.1, min=0.0, max=1.0, step=0.01,
                               tooltip="gridpure: weight of each round's input in the blend "
                                       "(1 − γ)·purified + γ·input (0.1 in GrIDPure). " + _IGNORED),
                io.Float.Input("grid_t_star", default=0.01, min=0.001, max=1.0, step=0.005,
                               tooltip="gridpure: the small t* of each window's DiffPure (0.01 = 10 of 1000 "
                                       "timesteps, GrIDPure's setting: 10 DDPM steps on pixel_model). "
                                       + _IGNORED),
                io.Float.Input("noise_sigma", default=0.1, min=0.0, max=1.0, step=0.005,
                               tooltip="noisy_upscale/gaussian_noise: noise std on the [0, 1] pixel scale (0.1 "
                                       "in noisy upscaling; 0.05 is usual for noise alone). " + _IGNORED),
                io.Float.Input("upscale_scale", default=0.5, min=0.01, max=1.0, step=0.01,
                               tooltip="noisy_upscale: downscale factor after the noise, before upscaling back "
                                       "(0.25 pairs with an x4 model). " + _IGNORED),
                io.Int.Input("jpeg_quality", default=75, min=1, max=100,
                             tooltip="jpeg: quality 1–100 (75 is the common default). " + _IGNORED),
                io.Float.Input("blur_sigma", default=1.0, min=0.0, max=50.0, step=0.1,
                               tooltip="gaussian_blur: standard deviation in pixels. " + _IGNORED),
                io.Float.Input("resize_scale", default=0.5, min=0.01, max=1.0, step=0.01,
                               tooltip="resize: downscale factor before resampling back to the input size. "
                                       + _IGNORED),
                io.Int.Input("impress_iterations", default=100, min=1, max=10000,
                             tooltip="impress: Adam steps toward VAE consistency. " + _IGNORED),
                io.Float.Input("impress_lr", default=0.01, min=0.0001, max=1.0, step=0.0005,
                               tooltip="impress: Adam learning rate on the [0, 1] pixel scale. " + _IGNORED),
                io.Combo.Input("impress_similarity", options=["ssim", "mse"], default="ssim",
                               tooltip="impress: distance to the input that keeps the image close "
                                       "(1 − SSIM or MSE). " + _IGNORED),
                io.Float.Input("impress_weight", default=0.1, min=0.0, max=100.0, step=0.01,
                               tooltip="impress: weight of the similarity term against VAE consistency. "
                                       + _IGNORED),
                io.Int.Input("grid_rounds", default=1, min=1, max=100, optional=True,
                             tooltip="gridpure: GrIDPure runs one after the other, grid_iterations each "
                                     "(AntiPure's paper evaluates 2 rounds × 20 iterations). " + _IGNORED),
                PIXEL_DIFFUSION.Input("pixel_model", optional=True,
                                      tooltip="A pixel-space diffusion model from AntiPure Load Pixel Diffusion "
                                              "(guided-diffusion ADM, GrIDPure's and DiffPure's purifier). When "
                                              "connected, diffpure/gridpure run on it at the image's own "
                                              "resolution (ancestral DDPM with its learned variance) and "
                                              "MODEL/VAE/positive/sampler settings are ignored."),
                io.Int.Input("pixel_diffpure_size", default=0, min=0, max=4096, step=8, optional=True,
                             tooltip="diffpure on pixel_model: purify at this square size, resampled there and "
                                     "back (256 = GrIDPure's DiffPure baseline, the model's training size); "
                                     "0 = the image's own resolution. " + _IGNORED),
            ],
            outputs=[io.Image.Output(display_name="purified")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, image, method, seed, t_star, steps, sampler_name, scheduler, cfg, grid_window, grid_stride,
                grid_iterations, grid_gamma, grid_t_star, noise_sigma, upscale_scale, jpeg_quality, blur_sigma,
                resize_scale, impress_iterations, impress_lr, impress_similarity, impress_weight,
                model=None, vae=None, positive=None, negative=None, upscale_model=None, grid_rounds=1,
                pixel_model=None, pixel_diffpure_size=0) -> io.NodeOutput:
        on_pixels = pixel_model is not None and method in _SAMPLED
        available = {name for name, v in (("model", model), ("vae", vae)) if v is not None}
        try:
            get_purifier(method, None if on_pixels else available)
        except ValueError as e:
            hint = ", or connect pixel_model (AntiPure Load Pixel Diffusion)" if method in _SAMPLED else ""
            raise ValueError(f"{e}{hint}") from None
        x, alpha = to_core(image)
        generator = torch.Generator().manual_seed(seed)
        node_id = cls.hidden.unique_id if cls.hidden is not None else None

        if on_pixels:
            y = pixel_purify(pixel_model, x, method, t_star, pixel_diffpure_size, grid_t_star, grid_window,
                             grid_stride, grid_iterations, grid_gamma, grid_rounds, generator, node_id)
        elif method in _SAMPLED:
            if positive is None:
                raise ValueError(f"positive: purifier {method!r} samples with the model and needs a prompt "
                                 "CONDITIONING; connect CLIP Text Encode (an empty prompt for unconditional "
                                 "purification)")
            if negative is None:
                negative = zeroed(positive)
            dm = HostSamplingModel(model, vae)
            denoise = host_denoiser(model, positive, negative, sampler_name, scheduler, steps, cfg, seed)
            if method == "diffpure":
                purification_timestep(dm, t_star)  # range check before any work
                y = diffpure(dm, x, positive, t_star=t_star, steps=steps, generator=generator,
                             callback=host_callback(steps, node_id), denoise_fn=denoise)
            else:
                purification_timestep(dm, grid_t_star)
                n_windows = len(window_boxes(tuple(x.shape[-2:]), grid_window, grid_stride)) + 1
                iterations = grid_iterations * grid_rounds  # rounds continue one another: the same loop
                # the bar moves per window (gridpure reports its exact total); cancel is checked every sampler step
                y = gridpure(x, lambda tile: diffpure(dm, tile, positive, t_star=grid_t_star, steps=steps,
                                                      generator=generator, denoise_fn=denoise,
                                                      callback=_check_cancel),
                             window=grid_window, stride=grid_stride, iterations=iterations, gamma=grid_gamma,
                             callback=host_callback(iterations * n_windows, node_id))
        elif method == "impress":
            with vae_session(vae) as ae:
                # x.clone(): a plain copy, the IMAGE was made under inference mode
                y = impress(ae, x.clone(), iterations=impress_iterations, lr=impress_lr, similarity=impress_similarity,
                            weight=impress_weight, callback=host_callback(impress_iterations, node_id))
        elif method == "noisy_upscale":
            up = None if upscale_model is None else host_upscaler(upscale_model)
            y = noisy_upscale(x, sigma=noise_sigma, scale=upscale_scale, upscale=up, generator=generator)
        elif method == "jpeg":
            y = jpeg(x, quality=jpeg_quality)
        elif method == "gaussian_blur":
            y = gaussian_blur(x, sigma=blur_sigma)
        elif method == "resize":
            y = resize_down_up(x, scale=resize_scale)
        elif method == "gaussian_noise":
            y = gaussian_noise(x, sigma=noise_sigma, generator=generator)
        else:  # a purifier registered in the core but not wired here yet
            raise ValueError(f"method: {method!r} is registered in the core but this node cannot run it yet")
        return io.NodeOutput(to_host(y.cpu(), alpha))


def _check_cancel(info) -> None:
    model_management.throw_exception_if_processing_interrupted()
