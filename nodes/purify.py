"""The Purify nodes: one small node per purifier family, each with only its own inputs.

DiffPure/SDEdit and GrIDPure run on a pixel-space model (guided-diffusion ADM,
as GrIDPure and DiffPure do) or on the loaded SD model through a host
sampler; IMPRESS on the VAE; noisy upscaling, JPEG, blur, resize and noise
need no model. Every node keeps the input's exact size and batch; the work is
in :mod:`antipure_comfy.purify`.
"""
from __future__ import annotations

from ..antipure_comfy.comfy_host import io
from ..antipure_comfy.progress import node_id
from ..antipure_comfy.purify import (purify_diffpure, purify_filter, purify_gridpure, purify_impress,
                                     purify_noisy_upscale)
from . import purify_inputs as inp


def _schema(node_id_: str, name: str, description: str, inputs: list, hidden: bool = False) -> io.Schema:
    return io.Schema(node_id=f"AntiPurePurify{node_id_}", display_name=f"AntiPure Purify: {name}",
                     category="AntiPure", description=description, inputs=inputs, outputs=inp.purified(),
                     hidden=[io.Hidden.unique_id] if hidden else [])


class AntiPurePurifyGrIDPure(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return _schema("GrIDPure", "GrIDPure",
                       "GrIDPure: a small-t* DiffPure on overlapping windows (plus the packed corners), blended "
                       "with the input over iterations. On pixel_model (GrIDPure's own setting) or on MODEL + VAE "
                       "with a host sampler.",
                       [inp.image(), inp.seed("the forward noise and the sampler's own noise"), *inp.grid(),
                        inp.grid_rounds(), inp.pixel_model(), *inp.latent_model("used when pixel_model is not "
                                                                                "connected"), *inp.sampler()],
                       hidden=True)

    @classmethod
    def execute(cls, image, seed, grid_window, grid_stride, grid_iterations, grid_gamma, grid_t_star, grid_rounds,
                steps, sampler_name, scheduler, cfg, pixel_model=None, model=None, vae=None, positive=None,
                negative=None) -> io.NodeOutput:
        return io.NodeOutput(purify_gridpure(image, seed, grid_t_star, grid_window, grid_stride, grid_iterations,
                                             grid_gamma, grid_rounds, steps, sampler_name, scheduler, cfg, model,
                                             vae, positive, negative, pixel_model, node_id(cls)))


class AntiPurePurifyDiffPure(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return _schema("DiffPure", "DiffPure / SDEdit",
                       "DiffPure/SDEdit: noise to t* and denoise back. On pixel_model (ancestral DDPM, optionally at "
                       "a working size) or on MODEL + VAE with a host sampler.",
                       [inp.image(), inp.seed("the forward noise and the sampler's own noise"), inp.t_star(),
                        inp.pixel_model(), inp.pixel_diffpure_size(),
                        *inp.latent_model("used when pixel_model is not connected"), *inp.sampler()],
                       hidden=True)

    @classmethod
    def execute(cls, image, seed, t_star, steps, sampler_name, scheduler, cfg, pixel_model=None,
                pixel_diffpure_size=0, model=None, vae=None, positive=None, negative=None) -> io.NodeOutput:
        return io.NodeOutput(purify_diffpure(image, seed, t_star, steps, sampler_name, scheduler, cfg, model, vae,
                                             positive, negative, pixel_model, pixel_diffpure_size, node_id(cls)))


class AntiPurePurifyNoisyUpscale(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return _schema("NoisyUpscale", "noisy upscaling",
                       "Noisy upscaling (robust style mimicry): Gaussian noise, downscale, then upscale back with "
                       "an upscale model or bicubic.",
                       [inp.image(), inp.seed("the noise"), inp.noise_sigma(), inp.upscale_scale(),
                        inp.upscale_model()])

    @classmethod
    def execute(cls, image, seed, noise_sigma, upscale_scale, upscale_model=None) -> io.NodeOutput:
        return io.NodeOutput(purify_noisy_upscale(image, seed, noise_sigma, upscale_scale, upscale_model))


class AntiPurePurifyIMPRESS(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return _schema("IMPRESS", "IMPRESS",
                       "IMPRESS: optimise the image toward VAE consistency while staying close to the input.",
                       [inp.image(), io.Vae.Input("vae", tooltip="The checkpoint's VAE, whose round trip the "
                                                                 "image is made consistent with."),
                        *inp.impress()], hidden=True)

    @classmethod
    def execute(cls, image, vae, impress_iterations, impress_lr, impress_similarity, impress_weight) -> io.NodeOutput:
        return io.NodeOutput(purify_impress(image, vae, impress_iterations, impress_lr, impress_similarity,
                                            impress_weight, node_id(cls)))


class AntiPurePurifyJPEG(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return _schema("JPEG", "JPEG", "JPEG compression round trip.", [inp.image(), inp.jpeg_quality()])

    @classmethod
    def execute(cls, image, jpeg_quality) -> io.NodeOutput:
        return io.NodeOutput(purify_filter(image, "jpeg", jpeg_quality=jpeg_quality))


class AntiPurePurifyBlur(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return _schema("Blur", "Gaussian blur", "Gaussian blur.", [inp.image(), inp.blur_sigma()])

    @classmethod
    def execute(cls, image, blur_sigma) -> io.NodeOutput:
        return io.NodeOutput(purify_filter(image, "gaussian_blur", blur_sigma=blur_sigma))


class AntiPurePurifyResize(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return _schema("Resize", "resize", "Downscale, then resample back to the input size.",
                       [inp.image(), inp.resize_scale()])

    @classmethod
    def execute(cls, image, resize_scale) -> io.NodeOutput:
        return io.NodeOutput(purify_filter(image, "resize", resize_scale=resize_scale))


class AntiPurePurifyNoise(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return _schema("Noise", "Gaussian noise", "Additive Gaussian noise.",
                       [inp.image(), inp.seed("the noise"), inp.noise_sigma()])

    @classmethod
    def execute(cls, image, seed, noise_sigma) -> io.NodeOutput:
        return io.NodeOutput(purify_filter(image, "gaussian_noise", seed, noise_sigma=noise_sigma))


PURIFY_NODES = [AntiPurePurifyGrIDPure, AntiPurePurifyDiffPure, AntiPurePurifyNoisyUpscale, AntiPurePurifyIMPRESS,
                AntiPurePurifyJPEG, AntiPurePurifyBlur, AntiPurePurifyResize, AntiPurePurifyNoise]
