"""AntiPure for ComfyUI: protective perturbations that survive diffusion-based purification.

Importing the pack touches no host module; the host resolves
:func:`comfy_entrypoint` and only then are the nodes (and ComfyUI) imported.
"""

WEB_DIRECTORY = None


async def comfy_entrypoint():
    from .nodes.extension import AntiPureExtension

    return AntiPureExtension()
