"""AntiPureSurrogateSettings: the training settings of Protect's ``aspl``, ``fsmg`` and ``simac``."""
from __future__ import annotations

from ..antipure_comfy.comfy_host import io
from ..antipure_comfy.io_types import SURROGATE
from ..antipure_comfy.lora_adapters import TARGETS
from ..antipure_comfy.surrogate import TRAINING, surrogate_settings


class AntiPureSurrogateSettings(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AntiPureSurrogateSettings",
            display_name="AntiPure Surrogate Settings (ASPL / FSMG / SimAC)",
            category="AntiPure",
            description="Training settings for Protect's aspl, fsmg and simac (Anti-DreamBooth, SimAC): a surrogate "
                        "copy of the model is fine-tuned between attack steps. Wire it into AntiPure Protect; "
                        "disconnected = these defaults.",
            inputs=[
                io.Combo.Input("training", options=list(TRAINING), default="lora",
                               tooltip="What the surrogate trains: lora = LoRA adapters (fits small GPUs); full = "
                                       "every UNet weight, as Anti-DreamBooth (needs ~4x the UNet's size "
                                       "in memory). The input MODEL is never changed."),
                io.Int.Input("train_steps", default=3, min=1, max=1000,
                             tooltip="Fine-tuning steps per training phase, surrogate and model (Anti-DreamBooth: 3)."),
                io.Int.Input("attack_steps", default=6, min=1, max=1000,
                             tooltip="PGD steps per outer iteration (Anti-DreamBooth: 6). Protect's steps is the "
                                     "total: 300 = Anti-DreamBooth's 50 iterations."),
                io.Int.Input("fsmg_train_steps", default=1000, min=1, max=100000,
                             tooltip="fsmg: the one fine-tuning run before PGD (Anti-DreamBooth: 1000)."),
                io.Float.Input("learning_rate", default=0.0, min=0.0, max=1.0, step=1e-7,
                               tooltip="AdamW learning rate; 0 = 1e-4 for lora, 5e-7 for full (Anti-DreamBooth)."),
                io.Int.Input("rank", default=4, min=1, max=256, tooltip="LoRA rank (training = lora)."),
                io.Combo.Input("target", options=list(TARGETS), default="attention",
                               tooltip="Layers with LoRA adapters (training = lora), as in Customize."),
                io.Float.Input("max_grad_norm", default=1.0, min=0.0, max=1000.0, step=0.1,
                               tooltip="Gradient clipping (Anti-DreamBooth: 1.0); 0 = off."),
                io.Float.Input("feature_weight", default=1.0, min=0.0, max=1000.0, step=0.1,
                               tooltip="simac: weight of the feature-interference term (last up-block ResBlock "
                                       "features, with gradient). 0 = the released SimAC code's gradients."),
                io.Int.Input("search_candidates", default=5, min=1, max=100,
                             tooltip="simac: timesteps scored per search round (SimAC: 5)."),
                io.Int.Input("search_rounds", default=50, min=0, max=1000,
                             tooltip="simac: at most this many search rounds per image (SimAC: 50); 0 = no search."),
                io.Int.Input("search_keep", default=100, min=1, max=1000,
                             tooltip="simac: stop once at most this many timesteps remain (SimAC: 100)."),
                io.Int.Input("search_cut", default=20, min=1, max=500,
                             tooltip="simac: each round removes ±cut timesteps around the lowest score (SimAC: 20)."),
                io.Float.Input("prior_weight", default=1.0, min=0.0, max=100.0, step=0.05,
                               tooltip="Prior-preservation weight λ (Anti-DreamBooth: 1.0); used with class_positive."),
                io.Int.Input("generated_class_images", default=4, min=0, max=1000,
                             tooltip="With class_positive but no class_images, the model generates this many "
                                     "class images (DDIM, 25 steps) as Anti-DreamBooth's script does; 0 = error."),
                io.Image.Input("train_images", optional=True,
                               tooltip="Clean images the surrogate trains on (Anti-DreamBooth's set A, other photos "
                                       "of the same person). Disconnected = the clean images being protected."),
                io.Conditioning.Input("class_positive", optional=True,
                                      tooltip="Prior preservation: class prompt conditioning, e.g. 'a photo of person'."),
                io.Image.Input("class_images", optional=True,
                               tooltip="Prior preservation: class images; needs class_positive."),
            ],
            outputs=[SURROGATE.Output(display_name="surrogate_settings")],
        )

    @classmethod
    def execute(cls, **inputs) -> io.NodeOutput:
        return io.NodeOutput(surrogate_settings(**inputs))
