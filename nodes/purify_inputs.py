"""The Purify nodes' inputs, defined once: every purifier node (and the deprecated single node) takes the
same name, default and tooltip for an input they share."""
from __future__ import annotations

from ..antipure_comfy.comfy_host import io, samplers
from ..antipure_comfy.io_types import PIXEL_DIFFUSION


def image():
    return io.Image.Input("image", tooltip="Images to purify (e.g. AntiPure Protect's output). "
                                           "Any size and batch; the output keeps both.")


def seed(what: str):
    return io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                        tooltip=f"Seeds {what}.")


def latent_model(optional_for: str):
    """MODEL, VAE, positive, negative: the loaded SD model as the purifier (``optional_for``: when it is used)."""
    return [
        io.Model.Input("model", optional=True,
                       tooltip=f"Latent diffusion model (SD1.x, SD2.x or SDXL), {optional_for}."),
        io.Vae.Input("vae", optional=True, tooltip="The checkpoint's VAE (with model)."),
        io.Conditioning.Input("positive", optional=True,
                              tooltip="Prompt conditioning for model (an empty prompt for unconditional "
                                      "purification)."),
        io.Conditioning.Input("negative", optional=True,
                              tooltip="Negative conditioning, used when cfg ≠ 1; disconnected = the positive "
                                      "zeroed out (as ConditioningZeroOut)."),
    ]


def t_star(suffix: str = ""):
    return io.Float.Input("t_star", default=0.1, min=0.001, max=1.0, step=0.005,
                          tooltip="diffpure: noise level as a fraction of the timesteps (0.1 = timestep 100 of 1000, "
                                  "DiffPure's t*). The latent is noised to exactly that level; unlike KSampler's "
                                  "denoise it does not depend on the scheduler. With pixel_model: t* = "
                                  "round(t_star·1000), noised to ᾱ at index t*−1, t* DDPM steps back." + suffix)


def sampler(suffix: str = ""):
    """steps, sampler_name, scheduler, cfg: the host sampler that denoises on MODEL."""
    return [
        io.Int.Input("steps", default=20, min=1, max=10000,
                     tooltip="On MODEL: sampler steps from t* down to 0 (per window for gridpure); fewer when the "
                             "scheduler has fewer levels below t* (simple/ddim_uniform use discrete timesteps). "
                             "With pixel_model: ignored, t* ancestral DDPM steps as in GrIDPure/DiffPure." + suffix),
        io.Combo.Input("sampler_name", options=list(samplers.KSampler.SAMPLERS), default="euler",
                       tooltip="On MODEL: the host sampler that denoises (as in KSampler)." + suffix),
        io.Combo.Input("scheduler", options=list(samplers.KSampler.SCHEDULERS), default="normal",
                       tooltip="On MODEL: spacing of the steps below t* (as in KSampler)." + suffix),
        io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01,
                       tooltip="On MODEL: classifier-free guidance scale. 1 = positive only (half the cost)." + suffix),
    ]


def grid(suffix: str = ""):
    """grid_window, grid_stride, grid_iterations, grid_gamma, grid_t_star (GrIDPure's settings)."""
    return [
        io.Int.Input("grid_window", default=256, min=8, max=4096, step=8,
                     tooltip="gridpure: window side in pixels (256 in GrIDPure, for 512 px images)." + suffix),
        io.Int.Input("grid_stride", default=128, min=8, max=4096, step=8,
                     tooltip="gridpure: window stride in pixels, <= window (128 in GrIDPure)." + suffix),
        io.Int.Input("grid_iterations", default=20, min=1, max=1000,
                     tooltip="gridpure: purify-and-blend rounds (20 in GrIDPure)." + suffix),
        io.Float.Input("grid_gamma", default=0.1, min=0.0, max=1.0, step=0.01,
                       tooltip="gridpure: weight of each round's input in the blend (1 − γ)·purified + γ·input "
                               "(0.1 in GrIDPure)." + suffix),
        io.Float.Input("grid_t_star", default=0.01, min=0.001, max=1.0, step=0.005,
                       tooltip="gridpure: the small t* of each window's DiffPure (0.01 = 10 of 1000 timesteps, "
                               "GrIDPure's setting: 10 DDPM steps on pixel_model)." + suffix),
    ]


def grid_rounds(suffix: str = "", optional: bool = False):
    return io.Int.Input("grid_rounds", default=1, min=1, max=100, optional=optional,
                        tooltip="gridpure: GrIDPure runs one after the other, grid_iterations each (AntiPure's "
                                "paper evaluates 2 rounds × 20 iterations)." + suffix)


def noise_sigma(suffix: str = ""):
    return io.Float.Input("noise_sigma", default=0.1, min=0.0, max=1.0, step=0.005,
                          tooltip="Noise std on the [0, 1] pixel scale (0.1 in noisy upscaling; 0.05 is usual for "
                                  "noise alone)." + suffix)


def upscale_scale(suffix: str = ""):
    return io.Float.Input("upscale_scale", default=0.5, min=0.01, max=1.0, step=0.01,
                          tooltip="noisy_upscale: downscale factor after the noise, before upscaling back (0.25 "
                                  "pairs with an x4 model)." + suffix)


def upscale_model():
    return io.UpscaleModel.Input("upscale_model", optional=True,
                                 tooltip="For noisy_upscale: upscale with this model (tiled, as Upscale Image (using "
                                         "Model)) and resample to the input size. Disconnected = plain bicubic "
                                         "resample.")


def jpeg_quality(suffix: str = ""):
    return io.Int.Input("jpeg_quality", default=75, min=1, max=100,
                        tooltip="jpeg: quality 1–100 (75 is the common default)." + suffix)


def blur_sigma(suffix: str = ""):
    return io.Float.Input("blur_sigma", default=1.0, min=0.0, max=50.0, step=0.1,
                          tooltip="gaussian_blur: standard deviation in pixels." + suffix)


def resize_scale(suffix: str = ""):
    return io.Float.Input("resize_scale", default=0.5, min=0.01, max=1.0, step=0.01,
                          tooltip="resize: downscale factor before resampling back to the input size." + suffix)


def impress(suffix: str = ""):
    """impress_iterations, impress_lr, impress_similarity, impress_weight."""
    return [
        io.Int.Input("impress_iterations", default=100, min=1, max=10000,
                     tooltip="impress: Adam steps toward VAE consistency." + suffix),
        io.Float.Input("impress_lr", default=0.01, min=0.0001, max=1.0, step=0.0005,
                       tooltip="impress: Adam learning rate on the [0, 1] pixel scale." + suffix),
        io.Combo.Input("impress_similarity", options=["ssim", "mse"], default="ssim",
                       tooltip="impress: distance to the input that keeps the image close (1 − SSIM or MSE)."
                               + suffix),
        io.Float.Input("impress_weight", default=0.1, min=0.0, max=100.0, step=0.01,
                       tooltip="impress: weight of the similarity term against VAE consistency." + suffix),
    ]


def pixel_model():
    return PIXEL_DIFFUSION.Input("pixel_model", optional=True,
                                 tooltip="A pixel-space diffusion model from AntiPure Load Pixel Diffusion "
                                         "(guided-diffusion ADM, GrIDPure's and DiffPure's purifier). When "
                                         "connected, diffpure/gridpure run on it at the image's own resolution "
                                         "(ancestral DDPM with its learned variance) and MODEL/VAE/positive/sampler "
                                         "settings are ignored.")


def pixel_diffpure_size(suffix: str = ""):
    return io.Int.Input("pixel_diffpure_size", default=0, min=0, max=4096, step=8, optional=True,
                        tooltip="diffpure on pixel_model: purify at this square size, resampled there and back (256 "
                                "= GrIDPure's DiffPure baseline, the model's training size); 0 = the image's own "
                                "resolution." + suffix)


def purified():
    return [io.Image.Output(display_name="purified")]
