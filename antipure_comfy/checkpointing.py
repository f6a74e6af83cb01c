"""Gradient checkpointing on the host's MODEL (and VAE) for the length of a node's work.

Uses the host trainer's own per-module patch (``comfy_extras.nodes_train.patch``,
``torch.utils.checkpoint`` without re-entrance): activations of a patched
module are recomputed in the backward pass instead of kept. With frozen
weights (Protect) convolutions and linear layers keep no activations for the
input gradient anyway, so the saving is modest and largest on AntiPure's
PFG path through the decoder (BENCHMARKS.md measures it). The patch
is removed afterwards: the modules are shared with every clone of the
MODEL / VAE.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

from .comfy_host import nodes_train, vae_modules


def checkpointed_modules(model, vae=None) -> list:
    """The UNet's highest child modules with a forward, and, with ``vae``, every VAE resnet block
    (the VAE's encoder/decoder containers have no forward of their own to patch)."""
    modules = list(nodes_train.find_all_highest_child_module_with_forward(model.model.diffusion_model))
    if vae is not None:
        modules += [m for m in vae.first_stage_model.modules() if isinstance(m, vae_modules.ResnetBlock)]
    return modules


@contextlib.contextmanager
def gradient_checkpointing(model, vae=None, enabled: bool = True) -> Iterator[None]:
    """Checkpoint ``model``'s UNet (and ``vae``'s resnet blocks) inside the ``with`` block."""
    if not enabled:
        yield
        return
    modules = checkpointed_modules(model, vae)
    try:
        for m in modules:
            nodes_train.patch(m)
        yield
    finally:
        for m in modules:
            nodes_train.unpatch(m)
