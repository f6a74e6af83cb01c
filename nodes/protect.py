"""AntiPureProtect: PGD protection of an IMAGE batch on the user's loaded checkpoint."""
from __future__ import annotations

import torch

from ..antipure_core.image import check_budget
from ..antipure_core.methods import METHODS
from ..antipure_core.protect import protect
from . import bridge, checkpointing
from .comfy_host import io
from .guidance import ETG, PFG
from .images import to_core, to_host
from .progress import host_callback, node_id
from .surrogate import SURROGATE, protect_with_surrogate


def delta_visualisation(x_adv: torch.Tensor, x: torch.Tensor, eta: float) -> torch.Tensor:
    """Map δ ∈ [−η, η] to [0, 1] (mid-gray = no change), so the noise is visible at full contrast."""
    return ((x_adv - x) / (2 * eta) + 0.5).clamp(0, 1)


class AntiPureProtect(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AntiPureProtect",
            display_name="AntiPure Protect",
            category="AntiPure",
            description="Add an invisible, L∞-bounded protective perturbation that disrupts fine-tuning on the "
                        "images, built to survive diffusion-based purification (AntiPure) — or a baseline method.",
            inputs=[
                io.Image.Input("image", tooltip="Images to protect. Any size; the output keeps it exactly."),
                io.Model.Input("model", tooltip="The diffusion model to attack (SD1.x, SD2.x or SDXL)."),
                io.Vae.Input("vae", tooltip="The checkpoint's VAE; gradients flow through its encoder/decoder."),
                io.Conditioning.Input("positive", tooltip="Instance prompt conditioning, e.g. "
                                                          "'a photo of sks person' from CLIP Text Encode."),
                io.Combo.Input("method", options=list(METHODS), default="antipure",
                               tooltip="antipure (PFG+ETG, from the guidance inputs), or a baseline: advdm, mist, "
                                       "photoguard (encoder attack), sds (SDS−), random (uniform noise), aspl / fsmg "
                                       "(Anti-DreamBooth), simac (these three train a surrogate: surrogate_settings)."),
                io.Float.Input("eta", default=8.0, min=0.0, max=255.0, step=0.5,
                               tooltip="L∞ budget η in /255 units (8 = 8/255). Every pixel stays within η."),
                io.Int.Input("steps", default=100, min=0, max=10000,
                             tooltip="PGD iterations. 0 returns the input unchanged."),
                io.Float.Input("alpha", default=1.0, min=0.0, max=255.0, step=0.1,
                               tooltip="PGD step size α in /255 units."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                             control_after_generate=True,
                             tooltip="Seeds timesteps, noise and the random start."),
                io.Boolean.Input("random_start", default=False, tooltip="Start from uniform noise in [−η, η]."),
                io.Int.Input("eot_samples", default=1, min=1, max=64,
                             tooltip="Noise/timestep samples averaged per step (expectation over transformation)."),
                io.Boolean.Input("gradient_checkpointing", default=False, optional=True,
                                 tooltip="Recompute UNet and VAE activations in the backward pass: less memory "
                                         "for about a quarter more compute (SD1.5 at 512²: 17% less above the "
                                         "weights for antipure; see BENCHMARKS.md)."),
                PFG.Input("frequency_guidance", optional=True,
                          tooltip="PFG settings for method=antipure. Disconnected = PFG off (ablation)."),
                ETG.Input("timestep_guidance", optional=True,
                          tooltip="ETG settings for method=antipure. Disconnected = ETG off (ablation)."),
                SURROGATE.Input("surrogate_settings", optional=True,
                                tooltip="Training settings for aspl, fsmg and simac (AntiPure Surrogate Settings). "
                                        "Disconnected = Anti-DreamBooth's loop with LoRA surrogates. For these "
                                        "methods steps counts all PGD steps (Anti-DreamBooth: 300 = 50 x 6; its "
                                        "eta 6.4, alpha 0.64; SimAC's eta 8)."),
            ],
            outputs=[io.Image.Output(display_name="protected"),
                     io.Image.Output(display_name="delta", tooltip="δ amplified to full contrast, gray = 0.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, image, model, vae, positive, method, eta, steps, alpha, seed, random_start, eot_samples,
                gradient_checkpointing=False, frequency_guidance=None, timestep_guidance=None,
                surrogate_settings=None) -> io.NodeOutput:
        x, alpha_ch = to_core(image)
        eta_px, alpha_px = eta / 255.0, alpha / 255.0
        if not 0 < eta <= 255:
            raise ValueError(f"eta: must be in (0, 255] (/255 units, 8 means 8/255), got {eta}")
        if not alpha > 0:
            raise ValueError(f"alpha: the PGD step must be > 0 (/255 units, e.g. 1), got {alpha}")
        check_budget(eta_px, alpha_px, steps)
        if steps == 0:
            return io.NodeOutput(image.clone(), to_host(torch.full_like(x, 0.5), alpha_ch))
        if METHODS[method].trains:
            x_adv = protect_with_surrogate(model, vae, positive, x, method, eta_px, alpha_px, steps, seed, random_start,
                                           eot_samples, surrogate_settings, gradient_checkpointing, node_id(cls)).cpu()
            return io.NodeOutput(to_host(x_adv, alpha_ch), to_host(delta_visualisation(x_adv, x, eta_px)))
        callback = host_callback(steps, node_id(cls))
        with bridge.session(model, vae, positive) as dm, \
                checkpointing.gradient_checkpointing(model, vae, enabled=gradient_checkpointing):
            x_adv = protect(dm, x, dm.cond, method=method, eta=eta_px, alpha=alpha_px, steps=steps, seed=seed,
                            random_start=random_start, eot_samples=eot_samples,
                            frequency=frequency_guidance, timestep=timestep_guidance, callback=callback)
        x_adv = x_adv.cpu()
        return io.NodeOutput(to_host(x_adv, alpha_ch), to_host(delta_visualisation(x_adv, x, eta_px)))
