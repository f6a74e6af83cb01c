"""The pack's ComfyUI extension: the list of nodes the host registers."""
from __future__ import annotations

from ..antipure_comfy.comfy_host import ComfyExtension, io
from .customize import AntiPureCustomize
from .evaluate import AntiPureEvaluate
from .guidance import AntiPureFrequencyGuidance, AntiPureTimestepGuidance
from .pixel_diffusion import AntiPureLoadPixelDiffusion
from .protect import AntiPureProtect
from .purified import AntiPurePurifiedSettings
from .purify import PURIFY_NODES
from .purify_legacy import AntiPurePurify
from .surrogate import AntiPureSurrogateSettings


class AntiPureExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [AntiPureProtect, AntiPureFrequencyGuidance, AntiPureTimestepGuidance, AntiPureSurrogateSettings,
                AntiPurePurifiedSettings, AntiPureLoadPixelDiffusion, *PURIFY_NODES, AntiPureCustomize,
                AntiPureEvaluate, AntiPurePurify]
