"""The one module of the pack that imports ComfyUI.

Every other module in ``nodes/`` gets host things from here, so a change of
the host's API is fixed in one place. Importing this module needs a running
(or booted) ComfyUI: the pack's ``__init__`` never imports it at import time.
"""
from __future__ import annotations

import comfy.clip_model as clip_model
import comfy.latent_formats as latent_formats
import comfy.lora as comfy_lora
import comfy.ldm.modules.diffusionmodules.model as vae_modules
import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel
import comfy.model_base as model_base
import comfy.model_management as model_management
import comfy.model_patcher as model_patcher
import comfy.model_sampling as model_sampling
import comfy.sample as sample
import comfy.sampler_helpers as sampler_helpers
import comfy.samplers as samplers
import comfy.utils as comfy_utils
import comfy.weight_adapter as weight_adapter
import comfy_extras.nodes_model_merging as nodes_model_merging
import comfy_extras.nodes_train as nodes_train
import folder_paths
from comfy_extras.nodes_upscale_model import ImageUpscaleWithModel
from comfy_api.latest import ComfyExtension, io, ui

__all__ = [
    "ComfyExtension", "io", "ui", "folder_paths", "comfy_utils", "model_management", "model_patcher",
    "model_base", "model_sampling", "latent_formats", "samplers", "sampler_helpers",
]
__all__ += ["weight_adapter", "nodes_train"]
__all__ += ["sample", "ImageUpscaleWithModel", "vae_modules"]
__all__ += ["openaimodel", "nodes_model_merging", "clip_model", "comfy_lora"]
