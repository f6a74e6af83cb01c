"""Guidance config nodes: PFG and ETG as their own nodes, so an ablation is a disconnected wire."""
from __future__ import annotations

from ..antipure_core.frequency import FrequencyGuidance
from ..antipure_core.timestep import TimestepGuidance
from ..antipure_comfy.comfy_host import io
from ..antipure_comfy.io_types import ETG, PFG


class AntiPureFrequencyGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AntiPureFrequencyGuidance",
            display_name="AntiPure Frequency Guidance (PFG)",
            category="AntiPure",
            description="Patch-wise Frequency Guidance: push the purifier's one-step estimate x̂₀ toward "
                        "high-frequency, patch-aligned energy, λ₁·e^{ᾱ_t−1}·σ(mean of the highest DCT quarter "
                        "of every patch), maximised. Wire it into AntiPure Protect; disconnect to ablate.",
            inputs=[
                io.Float.Input("weight", default=0.5, min=0.0, max=100.0, step=0.05,
                               tooltip="λ₁, the weight of L_fre (0.5 in the paper)."),
                io.Int.Input("patch_size", default=8, min=2, max=64, step=2,
                             tooltip="DCT patch side s in pixels (even). Not stated in the paper; 8 is our choice."),
                io.Combo.Input("reduction", options=["signed", "magnitude"], default="signed",
                               tooltip="signed: sum the highest-quarter coefficients as the published formula "
                                       "reads (our default); magnitude: sum their absolute values."),
            ],
            outputs=[PFG.Output(display_name="frequency_guidance")],
        )

    @classmethod
    def execute(cls, weight, patch_size, reduction) -> io.NodeOutput:
        return io.NodeOutput(FrequencyGuidance(weight=weight, patch_size=patch_size, reduction=reduction))


class AntiPureTimestepGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AntiPureTimestepGuidance",
            display_name="AntiPure Timestep Guidance (ETG)",
            category="AntiPure",
            description="Erroneous Timestep Guidance: pull the purifier's noise prediction at t toward its "
                        "prediction at a later t_err, λ₂·e^{−‖ε(x_t, t_err) − ε(x_t, t)‖²}, maximised. "
                        "Wire it into AntiPure Protect; disconnect to ablate.",
            inputs=[
                io.Float.Input("weight", default=0.5, min=0.0, max=100.0, step=0.05,
                               tooltip="λ₂, the weight of e^{L_err} (0.5 in the paper)."),
                io.Combo.Input("rule", options=["offset", "scale"], default="offset",
                               tooltip="How t_err follows from t (not stated in the paper): offset: t + offset "
                                       "(our default); scale: the 1-based t times scale."),
                io.Int.Input("offset", default=0, min=0, max=999,
                             tooltip="t_err = t + offset for rule=offset; 0 means t^p (Protect's t_purify), "
                                     "so t_err lies just past the purifier's range."),
                io.Float.Input("scale", default=2.0, min=1.01, max=100.0, step=0.1,
                               tooltip="The factor for rule=scale."),
                io.Boolean.Input("stop_gradient", default=True,
                                 tooltip="No gradient through the t_err prediction (our default; the paper does "
                                         "not say): only the prediction at t is pulled."),
            ],
            outputs=[ETG.Output(display_name="timestep_guidance")],
        )

    @classmethod
    def execute(cls, weight, rule, offset, scale, stop_gradient) -> io.NodeOutput:
        return io.NodeOutput(TimestepGuidance(weight=weight, rule=rule, offset=offset or None, scale=scale,
                                              stop_gradient=stop_gradient))
