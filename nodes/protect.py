"""AntiPureProtect: PGD protection of an IMAGE batch against a purifier: a pixel diffusion model or the loaded checkpoint."""
from __future__ import annotations

from ..antipure_comfy.comfy_host import io
from ..antipure_comfy.io_types import ETG, PFG, PIXEL_DIFFUSION, PURIFIED, SURROGATE
from ..antipure_comfy.progress import node_id
from ..antipure_comfy.protect import protect_images
from ..antipure_core.methods import METHODS
from ..antipure_core.protect import DEFAULT_T_PURIFY


class AntiPureProtect(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AntiPureProtect",
            display_name="AntiPure Protect",
            category="AntiPure",
            description="Add an invisible, L∞-bounded protective perturbation that disrupts fine-tuning on the "
                        "images, built to survive diffusion-based purification (AntiPure: it attacks the "
                        "purifier's own denoiser) — or a baseline method. The purifier is the pixel diffusion "
                        "model when one is connected (the paper's setting), else the MODEL + VAE. purified_advdm / "
                        "purified_aspl attack the MODEL + VAE through the attacker's purifiers, the pixel "
                        "purifier among them.",
            inputs=[
                io.Image.Input("image", tooltip="Images to protect. Any size; the output keeps it exactly."),
                io.Model.Input("model", optional=True,
                               tooltip="The latent model to attack (SD1.x, SD2.x or SDXL) when no pixel purifier "
                                       "is connected."),
                io.Vae.Input("vae", optional=True,
                             tooltip="The checkpoint's VAE; gradients flow through its encoder/decoder."),
                io.Conditioning.Input("positive", optional=True,
                                      tooltip="Instance prompt conditioning for the latent model, e.g. "
                                              "'a photo of sks person' from CLIP Text Encode."),
                io.Combo.Input("method", options=list(METHODS), default="antipure",
                               tooltip="antipure (L_ddpm + PFG + ETG, from the guidance inputs), or a baseline: "
                                       "advdm, mist, photoguard (encoder attack), sds (SDS−), random (uniform "
                                       "noise), aspl / fsmg (Anti-DreamBooth), simac (these three fine-tune a "
                                       "surrogate of the MODEL: surrogate_settings); purified_advdm / purified_aspl: "
                                       "AdvDM / ASPL on the MODEL + VAE through the attacker's purifiers "
                                       "(purified_settings; GrIDPure and DiffPure on the pixel purifier); "
                                       "purification_gap: the oracle on the pixel purifier, ‖P(x′) − x′‖² "
                                       "through its chain (a research upper bound, not a protection)."),
                io.Float.Input("eta", default=8.0, min=0.5, max=255.0, step=0.5,  # eta 0 is no budget
                               tooltip="L∞ budget η in /255 units (8 = 8/255). Every pixel stays within η."),
                io.Int.Input("steps", default=100, min=0, max=10000,
                             tooltip="PGD iterations. 0 returns the input unchanged."),
                io.Float.Input("alpha", default=1.0, min=0.01, max=255.0, step=0.01,  # alpha 0 never moves
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
                PIXEL_DIFFUSION.Input("purifier", optional=True,
                            tooltip="A pixel-space diffusion model (AntiPure Load Pixel Diffusion, e.g. the "
                                    "guided-diffusion ADM that GrIDPure uses) to attack, white-box as in the paper. "
                                    "Connected, it is the purifier and model/vae/positive are not used; empty: the "
                                    "MODEL + VAE are the purifier. purified_advdm / purified_aspl: the model their "
                                    "GrIDPure and DiffPure run on, while MODEL + VAE + positive are attacked."),
                io.Int.Input("t_purify", default=DEFAULT_T_PURIFY, min=1, max=999, optional=True,
                             tooltip="t^p for antipure: the purifier's t* in steps of 1000; t ~ U{1..t^p}. "
                                     "10 = GrIDPure's preset; use the t* your purifier runs with."),
                io.Int.Input("window", default=0, min=0, max=4096, step=8, optional=True,
                             tooltip="antipure on images larger than the purifier's window: GrIDPure's window "
                                     "layout in pixels (stride window/2, packed corners). 0 = auto: 256 for a "
                                     "pixel purifier, the whole image for the MODEL + VAE."),
                io.Combo.Input("window_mode", options=["all", "random"], default="all", optional=True,
                               tooltip="all: every window each step (our default; one UNet pass each); random: "
                                       "one random window per step (cheaper, noisier)."),
                SURROGATE.Input("surrogate_settings", optional=True,
                                tooltip="Training settings for aspl, fsmg and simac (AntiPure Surrogate Settings). "
                                        "Disconnected = Anti-DreamBooth's loop with LoRA surrogates. For these "
                                        "methods steps counts all PGD steps (Anti-DreamBooth: 300 = 50 x 6; its "
                                        "eta 6.4, alpha 0.64; SimAC's eta 8)."),
                PURIFIED.Input("purified_settings", optional=True,
                               tooltip="Route, windows and the purifier set for purified_advdm and purified_aspl "
                                       "(AntiPure Purified-Attack Settings). Disconnected = full chain through one "
                                       "random GrIDPure window on the pixel purifier, weight 0.5."),
            ],
            outputs=[io.Image.Output(display_name="protected"),
                     io.Image.Output(display_name="delta", tooltip="δ amplified to full contrast, gray = 0.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, image, model=None, vae=None, positive=None, method="antipure", eta=8.0, steps=100, alpha=1.0,
                seed=0, random_start=False, eot_samples=1, gradient_checkpointing=False, frequency_guidance=None,
                timestep_guidance=None, purifier=None, t_purify=DEFAULT_T_PURIFY, window=0,
                window_mode="all", surrogate_settings=None, purified_settings=None) -> io.NodeOutput:
        return io.NodeOutput(*protect_images(
            image, model, vae, positive, method, eta, steps, alpha, seed, random_start, eot_samples,
            gradient_checkpointing, frequency_guidance, timestep_guidance, purifier, t_purify, window, window_mode,
            surrogate_settings, purified_settings, node_id=node_id(cls)))
