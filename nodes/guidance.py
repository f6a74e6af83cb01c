"""Guidance config nodes: PFG and ETG as their own nodes, so an ablation is a disconnected wire."""
from __future__ import annotations

from ..antipure_core.frequency import FrequencyGuidance
from ..antipure_core.timestep import TimestepGuidance
from .comfy_host import io

PFG = io.Custom("ANTIPURE_PFG")
ETG = io.Custom("ANTIPURE_ETG")


class AntiPureFrequencyGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AntiPureFrequencyGuidance",
            display_name="AntiPure Frequency Guidance (PFG)",
            category="AntiPure",
            description="Patch-wise Frequency Guidance: keep the perturbation's high-frequency patch structure "
                        "through a simulated purification. Wire it into AntiPure Protect; disconnect to ablate.",
            inputs=[
                io.Float.Input("weight", default=1.0, min=0.0, max=100.0, step=0.05,
                               tooltip="λ_pfg: weight of the PFG loss, subtracted from the objective."),
                io.Int.Input("patch_size", default=8, min=1, max=64,
                             tooltip="Patch side p in pixels (latent cells in latent space) for the patch DCT."),
                io.Float.Input("threshold", default=0.0, min=0.0, max=128.0, step=0.5,
                               tooltip="High-frequency mask u+v ≥ k. 0 means k = p/2."),
                io.Boolean.Input("soft_mask", default=False,
                                 tooltip="Weight frequencies with a smooth ramp around k instead of a hard cut."),
                io.Combo.Input("transform", options=["dct", "fft"], default="dct",
                               tooltip="Per-patch transform: orthonormal DCT-II or FFT."),
                io.Combo.Input("space", options=["pixel", "latent"], default="pixel",
                               tooltip="pixel: decode the purified estimate (exact); "
                                       "latent: cheap variant that skips the VAE decoder."),
                io.Float.Input("t_star", default=0.3, min=0.01, max=1.0, step=0.01,
                               tooltip="Simulated purification strength: t_p ~ U(0, t*·T]. 0.3 = 300 of 1000."),
            ],
            outputs=[PFG.Output(display_name="frequency_guidance")],
        )

    @classmethod
    def execute(cls, weight, patch_size, threshold, soft_mask, transform, space, t_star) -> io.NodeOutput:
        return io.NodeOutput(FrequencyGuidance(weight=weight, patch_size=patch_size,
                                               threshold=threshold or None, soft_mask=soft_mask,
                                               transform=transform, space=space, t_star=t_star))


class AntiPureTimestepGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AntiPureTimestepGuidance",
            display_name="AntiPure Timestep Guidance (ETG)",
            category="AntiPure",
            description="Erroneous Timestep Guidance: make the model at timestep t act as if at a wrong timestep. "
                        "Wire it into AntiPure Protect; disconnect to ablate.",
            inputs=[
                io.Float.Input("weight", default=1.0, min=0.0, max=100.0, step=0.05,
                               tooltip="λ_etg: weight of the ETG loss, subtracted from the objective."),
                io.Combo.Input("mapping", options=["reverse", "offset"], default="reverse",
                               tooltip="Wrong timestep: reverse T−1−t, or (t + offset) mod T."),
                io.Int.Input("offset", default=500, min=1, max=999,
                             tooltip="Shift in timesteps used by mapping=offset."),
                io.Combo.Input("mode", options=["match", "error"], default="match",
                               tooltip="match: pull the prediction at t toward the (stop-gradient) prediction "
                                       "at the wrong timestep; error: maximise the noise error at it."),
            ],
            outputs=[ETG.Output(display_name="timestep_guidance")],
        )

    @classmethod
    def execute(cls, weight, mapping, offset, mode) -> io.NodeOutput:
        return io.NodeOutput(TimestepGuidance(weight=weight, mapping=mapping, offset=offset, mode=mode))
