"""Plain-torch LoRA adapters for the ``nn.Linear`` and ``nn.Conv2d`` layers of any ``nn.Module``.

A LoRA adapter replaces a weight ``W`` of shape ``(out, in, *k)`` by
``W + (alpha / rank) * up @ down`` with ``down`` ``(rank, in, *k)`` and ``up``
``(out, rank, *1)`` - the layout of the ``lora_down`` / ``lora_up`` tensors in
the usual ``.safetensors`` LoRA files. ``down`` starts Kaiming-uniform (as the
layer's own init) and ``up`` at zero, so a freshly adapted model computes
exactly what the base model computed. Base weights are frozen and never
written to (until :func:`merge_lora`).

Each adapted layer is swapped in its parent for a :class:`LoRALayer` that
holds the original layer as ``base`` (so, while adapted, a base weight's
``state_dict`` key gains a ``.base`` segment) and runs the layer's own
operation with the adapted weight, so merging gives exactly what the adapter
computes. The root module itself cannot be swapped: wrap a bare layer in an
``nn.Sequential`` first.

The core's training loop (:func:`antipure_core.customize.customize`) only
needs the list of trainable parameters, so inside ComfyUI the host's own
weight adapters are used instead of this module.

Example:
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Conv2d(3, 4, 3))
    >>> params = add_lora(model, rank=4)            # 4 tensors: down/up for each layer
    >>> sd = lora_state_dict(model)                 # {'0.lora_down.weight': (4, 8), ...}
    >>> remove_lora(model)                          # back to the base model
"""
from __future__ import annotations

import math
from fnmatch import fnmatchcase
from typing import Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: layer types :func:`add_lora` adapts
LORA_LAYER_TYPES = (nn.Linear, nn.Conv2d)

_DOWN, _UP, _ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"


class LoRALayer(nn.Module):
    """``base`` (Linear or Conv2d) computed with the weight ``W + (alpha / rank) up @ down``.

    ``down`` / ``up`` are kept in ``dtype`` (float32 by default, also for a
    half-precision base) and the update is cast to the weight's dtype.
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float, dtype: torch.dtype = torch.float32,
                 generator: Optional[torch.Generator] = None):
        super().__init__()
        self.base = base
        w = base.weight
        down = torch.empty((rank, *w.shape[1:]), dtype=dtype)
        # same init as nn.Linear / nn.Conv2d weights; drawn on the CPU so seeds agree across devices
        nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=generator)
        self.down = nn.Parameter(down.to(w.device))
        self.up = nn.Parameter(torch.zeros((w.shape[0], rank, *[1] * (w.ndim - 2)), dtype=dtype, device=w.device))
        self.register_buffer("alpha", torch.tensor(float(alpha), device=w.device))

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self) -> Tensor:
        """The weight update ``(alpha / rank) up @ down``, shaped like the base weight, in the adapter dtype."""
        shape = (self.up.shape[0], *self.down.shape[1:])
        return (self.up.flatten(1) @ self.down.flatten(1)).view(shape) * (self.alpha / self.rank)

    def forward(self, x: Tensor) -> Tensor:
        w = self.base.weight + self.delta().to(self.base.weight.dtype)
        if isinstance(self.base, nn.Linear):
            return F.linear(x, w, self.base.bias)
        return self.base._conv_forward(x, w, self.base.bias)  # honours stride, padding mode, groups


def lora_layers(module: nn.Module) -> dict[str, LoRALayer]:
    """``{qualified layer name: adapter}`` for every adapted layer inside ``module``."""
    return {n: m for n, m in module.named_modules() if isinstance(m, LoRALayer)}


def lora_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The trainable ``down``/``up`` parameters of every adapter in ``module``, in layer order."""
    return [p for a in lora_layers(module).values() for p in (a.down, a.up)]


def _check_rank(rank) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"rank: must be a positive integer (DreamBooth-LoRA default 4), got {rank!r}")


def _set_child(module: nn.Module, name: str, child: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(module.get_submodule(parent), leaf, child)


def _attach(module: nn.Module, name: str, rank: int, alpha: float, dtype, generator) -> LoRALayer:
    layer = module.get_submodule(name)
    adapter = LoRALayer(layer, rank, alpha, dtype=dtype, generator=generator)
    _set_child(module, name, adapter)
    return adapter


def _freeze_base(module: nn.Module) -> None:
    lora = {id(p) for p in lora_parameters(module)}
    for p in module.parameters():
        if id(p) not in lora:
            p.requires_grad_(False)


def _check_root(module: nn.Module) -> None:
    if isinstance(module, (LORA_LAYER_TYPES, LoRALayer)):
        raise ValueError(f"module: a bare {type(module).__name__} cannot adapt itself in place; "
                         "wrap it, e.g. nn.Sequential(layer)")


def add_lora(module: nn.Module, rank: int = 4, alpha: Optional[float] = None,
             targets: Optional[Sequence[str]] = None, dtype: torch.dtype = torch.float32,
             generator: Optional[torch.Generator] = None) -> list[nn.Parameter]:
    """Attach LoRA adapters to the ``nn.Linear`` / ``nn.Conv2d`` layers of ``module`` (in place).

    Args:
        module: any module containing the layers; all its non-LoRA parameters are frozen
            (``requires_grad=False``).
        rank: adapter rank r > 0 (DreamBooth-LoRA default 4).
        alpha: scale numerator; the update is ``(alpha / rank) up @ down``. ``None`` means
            ``alpha = rank`` (scale 1).
        targets: glob patterns matched against qualified layer names (``fnmatch``, case
            sensitive), e.g. ``("unet.*",)`` or ``("*.to_q", "*.to_k", "*.to_v", "*.to_out.0")``.
            ``None`` adapts every Linear/Conv2d layer. Matching layers of other types are skipped.
        dtype: dtype of the adapter parameters (float32 keeps training stable for fp16 bases).
        generator: CPU generator for the ``down`` init, for reproducible adapters.

    Returns:
        The new trainable parameters (``down``, ``up`` per layer), ready for an optimizer.

    Raises:
        ValueError: ``rank`` not a positive integer, ``alpha`` not finite and > 0, no layer
            matched (already adapted layers never match again), or ``module`` is a bare layer.
    """
    _check_rank(rank)
    alpha = float(rank if alpha is None else alpha)
    if not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha: must be finite and > 0 (None means alpha = rank), got {alpha}")
    _check_root(module)
    if isinstance(targets, str):
        targets = (targets,)
    adapted = lora_layers(module)
    candidates = [n for n, m in module.named_modules() if isinstance(m, LORA_LAYER_TYPES)
                  and not any(n == a + ".base" for a in adapted)]
    chosen = [n for n in candidates if targets is None or any(fnmatchcase(n, pat) for pat in targets)]
    if not chosen:
        if not candidates:
            why = "the module has no (unadapted) nn.Linear/nn.Conv2d layer"
        else:
            why = f"adaptable layers include {candidates[:5]}"
        raise ValueError(f"targets: {targets!r} matched no nn.Linear/nn.Conv2d layer; {why}")
    adapters = [_attach(module, n, rank, alpha, dtype, generator) for n in chosen]
    _freeze_base(module)
    return [p for a in adapters for p in (a.down, a.up)]


def lora_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """Adapter tensors of ``module``, detached copies on the CPU.

    Keys are ``<layer>.lora_down.weight`` ``(r, in, *k)``, ``<layer>.lora_up.weight``
    ``(out, r, *1)`` and ``<layer>.alpha`` (scalar), with ``<layer>`` the qualified
    layer name - the key layout of common LoRA ``.safetensors`` files (the host's
    loader additionally needs its own layer-name mapping).
    """
    sd = {}
    for name, a in lora_layers(module).items():
        sd[name + _DOWN] = a.down.detach().cpu().clone()
        sd[name + _UP] = a.up.detach().cpu().clone()
        sd[name + _ALPHA] = a.alpha.detach().cpu().clone()
    return sd


def load_lora(module: nn.Module, state_dict: Mapping[str, Tensor], strict: bool = True,
              dtype: torch.dtype = torch.float32) -> list[nn.Parameter]:
    """Load adapters from a :func:`lora_state_dict`-style mapping into ``module`` (in place).

    Layers without an adapter get one of the stored rank; layers that already
    have one must have the same rank and are overwritten. ``alpha`` defaults
    to the rank when its key is absent.

    Returns:
        The loaded trainable parameters.

    Raises:
        ValueError: a key names no Linear/Conv2d layer, shapes do not fit the layer, ``up``
            is missing, or (``strict``) a key is not a LoRA key.
    """
    _check_root(module)
    layers = [k[: -len(_DOWN)] for k in state_dict if k.endswith(_DOWN)]
    if strict:
        known = {n + s for n in layers for s in (_DOWN, _UP, _ALPHA)}
        extra = [k for k in state_dict if k not in known]
        if extra:
            raise ValueError(f"state_dict: unexpected keys {extra[:5]} (expected <layer>.lora_down.weight, "
                             "<layer>.lora_up.weight, <layer>.alpha); pass strict=False to ignore them")
    if not layers:
        raise ValueError("state_dict: no '<layer>.lora_down.weight' key found")
    params = []
    for name in layers:
        try:
            layer = module.get_submodule(name)
        except AttributeError:
            raise ValueError(f"state_dict: {name!r} is not a layer of the module") from None
        base = layer.base if isinstance(layer, LoRALayer) else layer
        if not isinstance(base, LORA_LAYER_TYPES):
            raise ValueError(f"state_dict: {name!r} is a {type(base).__name__}, not nn.Linear/nn.Conv2d")
        if name + _UP not in state_dict:
            raise ValueError(f"state_dict: {name + _DOWN!r} has no matching {name + _UP!r}")
        down, up = state_dict[name + _DOWN], state_dict[name + _UP]
        rank, w_shape = down.shape[0], tuple(base.weight.shape)
        want_up = (w_shape[0], rank, *[1] * (len(w_shape) - 2))
        if rank < 1 or tuple(down.shape[1:]) != w_shape[1:] or tuple(up.shape) != want_up:
            raise ValueError(f"state_dict: {name!r} down {tuple(down.shape)} / up {tuple(up.shape)} do not fit "
                             f"a weight {w_shape} (expected down (r, {', '.join(map(str, w_shape[1:]))}), up {want_up})")
        alpha = state_dict.get(name + _ALPHA)
        alpha = float(rank if alpha is None else alpha)
        if not isinstance(layer, LoRALayer):
            layer = _attach(module, name, rank, alpha, dtype, None)
        elif layer.rank != rank:
            raise ValueError(f"state_dict: {name!r} has rank {rank} but the attached adapter has rank "
                             f"{layer.rank}; call remove_lora first")
        with torch.no_grad():
            layer.down.copy_(down)
            layer.up.copy_(up)
            layer.alpha.fill_(alpha)
        params += [layer.down, layer.up]
    _freeze_base(module)
    return params


def merge_lora(module: nn.Module) -> nn.Module:
    """Bake every adapter into its base weight and put the base layers back (in place); returns ``module``."""
    for name, adapter in lora_layers(module).items():
        with torch.no_grad():
            adapter.base.weight += adapter.delta().to(adapter.base.weight.dtype)
        _set_child(module, name, adapter.base)
    return module


def remove_lora(module: nn.Module) -> nn.Module:
    """Remove every adapter, putting the untouched base layers back (in place); returns ``module``."""
    for name, adapter in lora_layers(module).items():
        _set_child(module, name, adapter.base)
    return module
