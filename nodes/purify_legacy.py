"""AntiPurePurify, the single Purify node of earlier versions: deprecated, kept so saved graphs still load and run.

Same inputs (names, order, defaults) and the same results as before: each
method is dispatched to the function of its own node in :mod:`.purify`. New
graphs use those nodes (AntiPure Purify: GrIDPure, DiffPure / SDEdit, ...).
"""
from __future__ import annotations

from ..antipure_comfy.comfy_host import io
from ..antipure_comfy.progress import node_id
from ..antipure_comfy.purify import (FILTER_PARAMS, purify_diffpure, purify_filter, purify_gridpure, purify_impress,
                                     purify_noisy_upscale)
from ..antipure_core.purify import PURIFIERS, get_purifier
from . import purify_inputs as inp

_IGNORED = " Ignored by the other methods."


def _filter_args(method: str, params: dict) -> dict:
    return {k: params[k] for k in FILTER_PARAMS[method]}


#: method -> the split node's function, called with the legacy node's inputs
DISPATCH = {
    "diffpure": lambda p: purify_diffpure(p["image"], p["seed"], p["t_star"], p["steps"], p["sampler_name"],
                                          p["scheduler"], p["cfg"], p["model"], p["vae"], p["positive"],
                                          p["negative"], p["pixel_model"], p["pixel_diffpure_size"], p["node_id"]),
    "gridpure": lambda p: purify_gridpure(p["image"], p["seed"], p["grid_t_star"], p["grid_window"],
                                          p["grid_stride"], p["grid_iterations"], p["grid_gamma"], p["grid_rounds"],
                                          p["steps"], p["sampler_name"], p["scheduler"], p["cfg"], p["model"],
                                          p["vae"], p["positive"], p["negative"], p["pixel_model"], p["node_id"]),
    "impress": lambda p: purify_impress(p["image"], p["vae"], p["impress_iterations"], p["impress_lr"],
                                        p["impress_similarity"], p["impress_weight"], p["node_id"]),
    "noisy_upscale": lambda p: purify_noisy_upscale(p["image"], p["seed"], p["noise_sigma"], p["upscale_scale"],
                                                    p["upscale_model"]),
    **{m: (lambda p, m=m: purify_filter(p["image"], m, p["seed"], **_filter_args(m, p))) for m in FILTER_PARAMS},
}


class AntiPurePurify(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        methods = "; ".join(f"{k}: {p.description}" for k, p in PURIFIERS.items())
        return io.Schema(
            node_id="AntiPurePurify",
            display_name="AntiPure Purify (deprecated: use the AntiPure Purify: … nodes)",
            category="AntiPure",
            description="Deprecated: one node for every purifier, kept for saved graphs (same results). New graphs "
                        "use one node per purifier: AntiPure Purify: GrIDPure, DiffPure / SDEdit, noisy upscaling, "
                        "IMPRESS, JPEG, Gaussian blur, resize, Gaussian noise.",
            inputs=[
                inp.image(),
                io.Combo.Input("method", options=list(PURIFIERS), default="diffpure",
                               tooltip=f"{methods}. diffpure/gridpure need pixel_model, or MODEL, VAE and "
                                       "positive; impress needs VAE; the others need no model. Parameters of "
                                       "other methods are ignored."),
                *inp.latent_model("for diffpure/gridpure when pixel_model is not connected"),
                inp.upscale_model(),
                inp.seed("the forward noise (diffpure/gridpure/noise/noisy_upscale) and the sampler's own noise"),
                inp.t_star(_IGNORED), *inp.sampler(_IGNORED), *inp.grid(_IGNORED), inp.noise_sigma(_IGNORED),
                inp.upscale_scale(_IGNORED), inp.jpeg_quality(_IGNORED), inp.blur_sigma(_IGNORED),
                inp.resize_scale(_IGNORED), *inp.impress(_IGNORED), inp.grid_rounds(_IGNORED, optional=True),
                inp.pixel_model(), inp.pixel_diffpure_size(_IGNORED),
            ],
            outputs=inp.purified(),
            hidden=[io.Hidden.unique_id],
            is_deprecated=True,
        )

    @classmethod
    def execute(cls, image, method, seed, t_star, steps, sampler_name, scheduler, cfg, grid_window, grid_stride,
                grid_iterations, grid_gamma, grid_t_star, noise_sigma, upscale_scale, jpeg_quality, blur_sigma,
                resize_scale, impress_iterations, impress_lr, impress_similarity, impress_weight,
                model=None, vae=None, positive=None, negative=None, upscale_model=None, grid_rounds=1,
                pixel_model=None, pixel_diffpure_size=0) -> io.NodeOutput:
        get_purifier(method)  # an unknown name is refused with the list of purifiers
        if method not in DISPATCH:  # a purifier registered in the core but not wired to a node yet
            raise ValueError(f"method: {method!r} is registered in the core but no node runs it yet")
        params = dict(locals(), node_id=node_id(cls))
        return io.NodeOutput(DISPATCH[method](params))
