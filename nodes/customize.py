"""AntiPureCustomize: DreamBooth or DreamBooth-LoRA fine-tuning of the user's MODEL on an IMAGE batch (the attacker's step).

The work is :func:`antipure_comfy.customize.customize_model`, which says how
each mode trains on the host and which loss a v-model gets.
"""
from __future__ import annotations

from ..antipure_comfy.comfy_host import io, ui
from ..antipure_comfy.comfy_host import samplers
from ..antipure_comfy.customize import TRAINING, customize_model
from ..antipure_comfy.dreambooth import OPTIMIZERS, PRECISIONS
from ..antipure_comfy.lora_adapters import TARGETS
from ..antipure_comfy.progress import node_id


class AntiPureCustomize(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AntiPureCustomize",
            display_name="AntiPure Customize (DreamBooth / LoRA)",
            category="AntiPure",
            description="Fine-tune the model on the images as an attacker would: DreamBooth (every UNet weight, "
                        "text encoder optional, as the paper's tables) or DreamBooth-LoRA, with optional prior "
                        "preservation. Returns the trained model (and CLIP); saves the LoRA in the loras folder "
                        "or the DreamBooth checkpoint in the checkpoints folder.",
            # Saved UI graphs store widget values by position: the inputs up to prior_weight are the
            # LoRA node's, in their order and with their defaults; every later input is optional and
            # defaults to the LoRA behaviour, so an old graph (UI or API format) trains exactly as before.
            inputs=[
                io.Model.Input("model", tooltip="The base model to customize (SD1.x, SD2.x or SDXL). "
                                                "It is not changed; the output is a trained copy."),
                io.Vae.Input("vae", tooltip="The checkpoint's VAE; encodes the images once."),
                io.Image.Input("images", tooltip="The training images (protected or purified), any size; "
                                                 "a list of batches is joined and must share one size."),
                io.Conditioning.Input("positive", tooltip="Instance prompt conditioning from CLIP Text Encode, "
                                                          "e.g. 'a photo of sks person'."),
                io.String.Input("lora_name", default="antipure/sks_person",
                                tooltip="lora: file name in the loras folder (.safetensors added; subfolders "
                                        "allowed). An existing file is never overwritten: the new one is numbered "
                                        "(name_00001) and the output says so. Empty = do not save. Ignored by "
                                        "dreambooth (see checkpoint_name)."),
                io.Int.Input("steps", default=400, min=0, max=100000,
                             tooltip="Optimizer steps (DreamBooth-LoRA: 400-1000); 0 = the mode's default "
                                     "(DreamBooth 1000, DreamBooth-LoRA 400)."),
                io.Float.Input("learning_rate", default=1e-4, min=0.0, max=1.0, step=1e-7,
                               tooltip="AdamW learning rate (DreamBooth-LoRA: 1e-4); 0 = the mode's default "
                                       "(DreamBooth 5e-7: set 0 for training=dreambooth, 1e-4 ruins a full "
                                       "fine-tune)."),
                io.Int.Input("rank", default=4, min=1, max=256, tooltip="LoRA rank r (DreamBooth-LoRA: 4)."),
                io.Float.Input("alpha", default=4.0, min=0.01, max=1024.0, step=0.01,
                               tooltip="LoRA alpha; the update is scaled by alpha / rank (alpha = rank: scale 1, "
                                       "as diffusers' DreamBooth-LoRA)."),
                io.Combo.Input("target", options=list(TARGETS), default="attention",
                               tooltip="Layers that get adapters: attention = to_q/to_k/to_v/to_out of the "
                                       "transformer blocks (DreamBooth-LoRA); attention+feed-forward adds the "
                                       "feed-forward and proj_in/proj_out layers; all = every UNet weight."),
                io.Int.Input("batch_size", default=1, min=0, max=64,
                             tooltip="Images per micro-batch (DreamBooth-LoRA: 1), plus as many class images "
                                     "with prior preservation; 0 = the mode's default (DreamBooth 2, "
                                     "DreamBooth-LoRA 1)."),
                io.Int.Input("grad_accumulation", default=1, min=1, max=1024,
                             tooltip="Micro-batches averaged per optimizer step (1 = none)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seeds the LoRA init, the image order, timesteps and noise."),
                io.Boolean.Input("gradient_checkpointing", default=True,
                                 tooltip="Recompute activations in the backward pass: much less memory, "
                                         "about 30% slower."),
                io.Conditioning.Input("class_positive", optional=True,
                                      tooltip="Prior preservation: class prompt conditioning, e.g. 'a photo of "
                                              "person'. Class images come from class_images and/or are "
                                              "generated (class_image_count)."),
                io.Image.Input("class_images", optional=True,
                               tooltip="Prior preservation: class images. Needs class_positive; topped up to "
                                       "class_image_count by the base model."),
                io.Float.Input("prior_weight", default=1.0, min=0.0, max=100.0, step=0.05,
                               tooltip="λ of the prior-preservation loss (DreamBooth: 1.0); used only with "
                                       "class_positive."),
                # --- added with training=dreambooth: optional, after every input above ---
                io.Combo.Input("training", options=list(TRAINING), default="lora", optional=True,
                               tooltip="lora: DreamBooth-LoRA adapters (rank, alpha, target). dreambooth: every "
                                       "UNet weight, text encoder optional (the paper's attack; set steps, "
                                       "learning_rate and batch_size to 0 for Anti-DreamBooth's 1000 / 5e-7 / 2)."),
                io.Int.Input("class_image_count", default=0, min=0, max=10000, optional=True,
                             tooltip="Class images prior preservation uses; those missing from class_images are "
                                     "generated by the base model from class_positive before training "
                                     "(guidance 7.5, as DreamBooth). 0 = the mode's default: dreambooth 200 "
                                     "(DreamBooth's), lora only the class_images given (none generated)."),
                io.Int.Input("class_sampling_steps", default=50, min=1, max=1000, optional=True,
                             tooltip="Sampler steps per generated class image (DreamBooth's pipeline: 50)."),
                io.Combo.Input("class_sampler", options=list(samplers.KSampler.SAMPLERS), default="euler",
                               optional=True, tooltip="The host sampler that generates class images."),
                io.Clip.Input("clip", optional=True,
                              tooltip="The checkpoint's CLIP: needed to train the text encoder and to save a "
                                      "checkpoint; encodes the empty negative prompt for class images."),
                io.Boolean.Input("train_text_encoder", default=True, optional=True,
                                 tooltip="dreambooth: also train every text-encoder weight of clip (Anti-DreamBooth "
                                         "does); the prompts below are then encoded by the trained encoder in "
                                         "place of positive / class_positive. Ignored without clip or for lora."),
                io.String.Input("instance_prompt", default="a photo of sks person", optional=True,
                                tooltip="Instance prompt text, used when the text encoder is trained."),
                io.String.Input("class_prompt", default="a photo of person", optional=True,
                                tooltip="Class prompt text, used when the text encoder is trained."),
                io.Combo.Input("precision", options=list(PRECISIONS), default="auto", optional=True,
                               tooltip="Compute precision of training: auto (the model's own; fp16 trains in "
                                       "fp32), fp32, or bf16 (Anti-DreamBooth's mixed precision) where the device "
                                       "has it. Trained weights stay fp32."),
                io.Combo.Input("optimizer", options=list(OPTIMIZERS), default="adamw", optional=True,
                               tooltip="adamw (torch), or adamw8bit (bitsandbytes, CUDA only, needs the package): "
                                       "a quarter of AdamW's state memory."),
                io.Float.Input("max_grad_norm", default=0.0, min=-1.0, max=1000.0, step=0.1, optional=True,
                               tooltip="Clip the gradient's global norm to this value; 0 = the mode's default "
                                       "(dreambooth 1.0 as DreamBooth, lora no clipping); -1 = never clip."),
                io.String.Input("checkpoint_name", default="", optional=True,
                                tooltip="dreambooth: save MODEL + CLIP + VAE as <name>_00001_.safetensors in the "
                                        "checkpoints folder for Load Checkpoint (needs clip; numbered, never "
                                        "overwriting). Empty = do not save."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The trained model (a copy; the input is unchanged)."),
                io.String.Output(display_name="lora_name",
                                 tooltip="The saved LoRA's name in the loras folder (empty if not saved, and for "
                                         "dreambooth)."),
                io.LossMap.Output(display_name="loss", tooltip="Loss per step, for the host's Plot Loss Graph."),
                # --- added with training=dreambooth, after the old outputs ---
                io.Clip.Output(display_name="clip",
                               tooltip="The trained CLIP when the text encoder was trained, else the clip input."),
                io.String.Output(display_name="checkpoint_name",
                                 tooltip="dreambooth: the saved checkpoint's name in the checkpoints folder, as "
                                         "Load Checkpoint lists it (empty if not saved, and for lora)."),
            ],
            hidden=[io.Hidden.unique_id],
            is_input_list=True,  # a list of image batches is one training set, not one LoRA per item
            is_output_node=True,  # saving the LoRA is an effect of its own
        )

    @classmethod
    def execute(cls, **inputs) -> io.NodeOutput:
        model, clip, lora_name, checkpoint_name, loss, summary = customize_model(node_id=node_id(cls), **inputs)
        return io.NodeOutput(model, lora_name, loss, clip, checkpoint_name, ui=ui.PreviewText(summary))
