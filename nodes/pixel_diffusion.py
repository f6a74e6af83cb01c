"""AntiPureLoadPixelDiffusion: a guided-diffusion ADM checkpoint from ``models/pixel_diffusion`` as the pack's
pixel-space purifier (``ANTIPURE_PIXEL_DIFFUSION``); see :mod:`antipure_comfy.pixel_loader`."""
from __future__ import annotations

from ..antipure_comfy.comfy_host import folder_paths, io
from ..antipure_comfy.io_types import PIXEL_DIFFUSION
from ..antipure_comfy.pixel_loader import DTYPES, FOLDER, load_pixel_model, register_folder


class AntiPureLoadPixelDiffusion(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        register_folder()
        return io.Schema(
            node_id="AntiPureLoadPixelDiffusion",
            display_name="AntiPure Load Pixel Diffusion",
            category="AntiPure",
            description="Load a pixel-space diffusion model (openai/guided-diffusion ADM, e.g. "
                        "256x256_diffusion_uncond.pt, the purifier of GrIDPure and DiffPure) from "
                        "models/pixel_diffusion, for AntiPure Purify (diffpure/gridpure) and AntiPure Protect.",
            inputs=[
                io.Combo.Input("ckpt_name", options=folder_paths.get_filename_list(FOLDER),
                               tooltip="A guided-diffusion UNet state dict in models/pixel_diffusion "
                                       "(.safetensors, or .pt/.pth read with weights_only). The architecture "
                                       "is read from the weights."),
                io.Combo.Input("weight_dtype", options=list(DTYPES), default="fp32",
                               tooltip="Weights in memory: fp32 (exact; CPU), fp16/bf16 (half the memory, "
                                       "faster on GPUs; guided-diffusion itself ran its UNet in fp16)."),
                io.Int.Input("num_head_channels", default=64, min=-1, max=1024,
                             tooltip="Attention head width, which the weights do not record: 64 for every "
                                     "public unconditional guided-diffusion release. Change only for a model "
                                     "trained otherwise (-1: one head per attention block)."),
            ],
            outputs=[PIXEL_DIFFUSION.Output(display_name="pixel_model")],
        )

    @classmethod
    def execute(cls, ckpt_name, weight_dtype="fp32", num_head_channels=64) -> io.NodeOutput:
        return io.NodeOutput(load_pixel_model(ckpt_name, weight_dtype, num_head_channels))
