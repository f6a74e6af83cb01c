"""The testbed's trained weights, cached as safetensors plus a JSON of the training info, keyed by the config.

A changed training config gets a new file name, so stale weights are never
loaded for a new config; deleting the files retrains.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from torch import nn


def config_key(cfg) -> str:
    """Ten hex digits of the SHA-1 of the dataclass ``cfg`` as sorted JSON."""
    return hashlib.sha1(json.dumps(asdict(cfg), sort_keys=True).encode()).hexdigest()[:10]


def weights_path(cache_dir, stem: str, cfg) -> Optional[Path]:
    """``cache_dir/<stem>-<key>.safetensors`` (its info beside it as ``.json``); ``None`` without a cache."""
    return None if cache_dir is None else Path(cache_dir) / f"{stem}-{config_key(cfg)}.safetensors"


def load_cached(module: nn.Module, path: Optional[Path]) -> Optional[dict]:
    """Load ``path`` into ``module`` and return its training info (``cached`` = True), or ``None`` if absent."""
    from safetensors.torch import load_file

    if path is None or not path.exists():
        return None
    module.load_state_dict(load_file(str(path)))
    info_path = path.with_suffix(".json")
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    info["cached"] = True
    return info


def save_cached(module: nn.Module, info: dict, path: Optional[Path]) -> None:
    """Write ``module``'s weights and ``info`` to ``path`` (nothing without a cache)."""
    from safetensors.torch import save_file

    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path))
    path.with_suffix(".json").write_text(json.dumps(info, indent=1))
