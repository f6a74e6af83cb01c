"""AntiPurePurifiedSettings: how Protect's ``purified_advdm`` / ``purified_aspl`` reach δ through the purifiers."""
from __future__ import annotations

from ..antipure_comfy.comfy_host import io
from ..antipure_comfy.io_types import PURIFIED
from ..antipure_comfy.purified import SETTINGS_NODE, purified_settings
from ..antipure_core.purified_attack import PurifiedSettings
from ..antipure_core.purify_grad import ROUTES
from ..antipure_core.purify_pixel import GRIDPURE, MIN_SIDE
from ..antipure_core.windows import WINDOW_MODES

_D = PurifiedSettings()


def _weight(name: str, what: str, default: float = 0.0):
    return io.Float.Input(f"{name}_weight", default=default, min=0.0, max=100.0, step=0.1,
                          tooltip=f"Weight of {what} in the purifier set: each loss evaluation draws one purifier "
                                  "with probability ∝ its weight; 0 leaves it out.")


class AntiPurePurifiedSettings(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AntiPurePurifiedSettings",
            display_name=SETTINGS_NODE,
            category="AntiPure",
            description="Settings of Protect's purified_advdm and purified_aspl: AdvDM's loss on the customization "
                        "model (MODEL + VAE) at x' and at the attacker's purified x', with gradients through the "
                        "purifier (route), over a weighted set of purifiers. GrIDPure and DiffPure run on Protect's "
                        "pixel purifier, SDEdit on its MODEL + VAE. Disconnected = these defaults.",
            inputs=[
                io.Combo.Input("route", options=list(ROUTES), default=_D.route,
                               tooltip="Gradient route through a diffusion purifier: one_step = its one-step x̂₀ "
                                       "at a random t (1 call); k_step = the whole chain, gradient through its "
                                       "last k steps; full = through every step (exact, slowest)."),
                io.Int.Input("k", default=_D.k, min=1, max=1000,
                             tooltip="k_step: the chain's last k steps carry the gradient."),
                io.Combo.Input("windows", options=list(WINDOW_MODES), default=_D.windows,
                               tooltip="GrIDPure: random = one window per step is purified (the others pass as "
                                       "they are; cheap); all = every window, overlaps averaged (one GrIDPure "
                                       "iteration)."),
                io.Float.Input("purified_weight", default=_D.purified_weight, min=0.0, max=1.0, step=0.05,
                               tooltip="w: loss = (1 − w)·L(x') + w·L(purified x'). 0 = plain AdvDM, 1 = only "
                                       "the purified image."),
                _weight("gridpure", "GrIDPure on the pixel purifier", 1.0),
                _weight("diffpure", "DiffPure on the pixel purifier"),
                _weight("sdedit", "SDEdit on Protect's MODEL + VAE"),
                _weight("jpeg", "a differentiable JPEG"),
                _weight("resize", "down-up resizing"),
                _weight("blur", "Gaussian blur"),
                io.Int.Input("grid_t_star", default=_D.t_star, min=1, max=999,
                             tooltip="GrIDPure: t* in steps of the pixel model's 1000 (GrIDPure: 10, the Purify "
                                     "node's grid_t_star 0.01): noised to index t*−1, t* ancestral steps back."),
                io.Int.Input("grid_window", default=_D.window, min=MIN_SIDE, max=4096, step=8,
                             tooltip="GrIDPure: window side in pixels (256 in GrIDPure, for 512 px images; a "
                                     "smaller image is one window)."),
                io.Int.Input("grid_stride", default=0, min=0, max=4096, step=8,
                             tooltip="GrIDPure: window stride in pixels; 0 = half the window (GrIDPure's 128)."),
                io.Float.Input("grid_gamma", default=GRIDPURE.gamma, min=0.0, max=1.0, step=0.01,
                               tooltip="GrIDPure: the blend (1 − γ)·purified + γ·input (0.1 in GrIDPure)."),
                io.Int.Input("diffpure_t_star", default=_D.diffpure_t_star, min=1, max=999,
                             tooltip="DiffPure: t* in steps of the pixel model's 1000 (100 = the Purify node's "
                                     "t_star 0.1)."),
                io.Int.Input("diffpure_size", default=0, min=0, max=4096, step=8,
                             tooltip="DiffPure: purify at size × size px and resample back (GrIDPure's DiffPure "
                                     "baseline: 256); 0 = the image's own size."),
                io.Float.Input("sdedit_t_star", default=_D.sdedit_t_star, min=0.001, max=1.0, step=0.005,
                               tooltip="SDEdit: noise level as a fraction of the MODEL's schedule (0.1 = timestep "
                                       "100 of 1000)."),
                io.Int.Input("sdedit_steps", default=_D.sdedit_steps, min=1, max=1000,
                             tooltip="SDEdit: DDIM steps back from t* (fewer when t* covers fewer timesteps)."),
                io.Int.Input("jpeg_quality", default=_D.jpeg_quality, min=1, max=100,
                             tooltip="JPEG: quality of the differentiable approximation (kornia's codec)."),
                io.Float.Input("resize_scale", default=_D.resize_scale, min=0.01, max=1.0, step=0.01,
                               tooltip="Resize: downscale factor before resampling back."),
                io.Float.Input("blur_sigma", default=_D.blur_sigma, min=0.0, max=50.0, step=0.1,
                               tooltip="Blur: Gaussian standard deviation in pixels."),
                io.Float.Input("lowpass_sigma", default=_D.lowpass_sigma, min=0.0, max=64.0, step=0.5,
                               tooltip="Blur δ's ascent direction by this σ in px before PGD's sign, so each update "
                                       "is coherent over about σ px (low frequencies pass a purifier as content); "
                                       "0 = off. Costs one more VAE encoder pass per step."),
                io.Boolean.Input("checkpoint", default=_D.checkpoint,
                                 tooltip="Recompute each differentiated purifier step in the backward pass: memory "
                                         "near one step's graph for one more forward per step."),
                io.Conditioning.Input("sdedit_positive", optional=True,
                                      tooltip="SDEdit's prompt (the attacker's). Disconnected = Protect's positive."),
            ],
            outputs=[PURIFIED.Output(display_name="purified_settings")],
        )

    @classmethod
    def execute(cls, route, k, windows, purified_weight, gridpure_weight, diffpure_weight, sdedit_weight, jpeg_weight,
                resize_weight, blur_weight, grid_t_star, grid_window, grid_stride, grid_gamma, diffpure_t_star,
                diffpure_size, sdedit_t_star, sdedit_steps, jpeg_quality, resize_scale, blur_sigma, lowpass_sigma,
                checkpoint, sdedit_positive=None) -> io.NodeOutput:
        return io.NodeOutput(purified_settings(
            route, k, windows, purified_weight, gridpure_weight, diffpure_weight, sdedit_weight, jpeg_weight,
            resize_weight, blur_weight, grid_t_star, grid_window, grid_stride, grid_gamma, diffpure_t_star,
            diffpure_size, sdedit_t_star, sdedit_steps, jpeg_quality, resize_scale, blur_sigma, lowpass_sigma,
            checkpoint, sdedit_positive))
