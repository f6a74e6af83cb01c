"""The pack's own socket types, shared by the node schemas and the adapters that read them."""
from __future__ import annotations

from .comfy_host import io

#: a :class:`~antipure_core.frequency.FrequencyGuidance` (AntiPure Frequency Guidance)
PFG = io.Custom("ANTIPURE_PFG")
#: a :class:`~antipure_core.timestep.TimestepGuidance` (AntiPure Timestep Guidance)
ETG = io.Custom("ANTIPURE_ETG")
#: a :class:`~antipure_comfy.surrogate.HostSurrogate` (AntiPure Surrogate Settings)
SURROGATE = io.Custom("ANTIPURE_SURROGATE")
#: a :class:`~antipure_comfy.purified.HostPurified` (AntiPure Purified-Attack Settings)
PURIFIED = io.Custom("ANTIPURE_PURIFIED")
#: the core's ``PixelDiffusion`` module on the host's torch device (AntiPure Load Pixel Diffusion)
PIXEL_DIFFUSION = io.Custom("ANTIPURE_PIXEL_DIFFUSION")
