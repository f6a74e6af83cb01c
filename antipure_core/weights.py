"""Reading weight files safely: ``.safetensors``, or a torch checkpoint through ``torch.load(weights_only=True)``.

Nothing in a weight file is ever executed: a pickle that holds more than
tensors and plain containers is refused with an error that says how to get a
safe file, never loaded with ``weights_only=False``.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
from torch import Tensor

#: file suffixes :func:`load_state_dict` reads
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth")


def load_state_dict(path: str | os.PathLike, name: str = "checkpoint") -> dict[str, Tensor]:
    """Tensors of a weight file, on the CPU (memory-mapped where the format allows).

    Args:
        path: a ``.safetensors`` file, or a ``.pt``/``.pth`` torch checkpoint holding a flat dict of tensors.
        name: the input named in errors (a node input or argument name).

    Raises:
        FileNotFoundError: no such file.
        ValueError: naming ``name``: an unknown suffix, an unreadable file, a pickle that ``weights_only``
            refuses, or something other than a flat dict of tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{name}: no such file {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except SafetensorError as e:
            raise ValueError(f"{name}: {path.name} is not a readable .safetensors file ({e})") from None
    if suffix not in WEIGHT_SUFFIXES:
        raise ValueError(f"{name}: {path.name} has an unsupported suffix; give a {', '.join(WEIGHT_SUFFIXES)} file")
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            sd = torch.load(path, map_location="cpu", weights_only=True)  # the legacy (non-zip) format
    except pickle.UnpicklingError as e:
        if "unsupported global" in str(e).lower():
            raise ValueError(f"{name}: {path.name} is a pickle that safe loading (weights_only) refuses: it holds "
                             "objects beyond tensors, which could run code. Use the original release file or a "
                             ".safetensors conversion made where the file is trusted") from None
        raise ValueError(f"{name}: {path.name} is not a readable torch checkpoint") from None
    except Exception as e:  # a damaged or foreign file fails in many ways inside torch.load
        raise ValueError(f"{name}: {path.name} is not a readable torch checkpoint "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(sd, dict) or not sd or not all(isinstance(k, str) and isinstance(v, Tensor)
                                                     for k, v in sd.items()):
        raise ValueError(f"{name}: {path.name} does not hold a state dict (a flat dict of tensors); expected the "
                         "model's weights as saved by torch.save(model.state_dict())")
    return sd
