"""Find and boot the ComfyUI host for the node tests, the way the host itself loads this pack.

The host is found from ``COMFYUI_PATH`` or, when the pack sits in
``ComfyUI/custom_nodes/<pack>``, from the grandparent folder. Booting puts the
ComfyUI root first on ``sys.path`` (its ``nodes.py`` must win over this repo's
``nodes/`` package), forces the CPU unless ``ANTIPURE_TEST_GPU=1``, registers the
built-in extra nodes and loads the pack with ``nodes.load_custom_node``, so the
pack's modules import each other through relative imports exactly as in a
running server.
"""
from __future__ import annotations

import asyncio
import importlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

PACK_DIR = Path(__file__).resolve().parents[2]
MIN_TORCH = (2, 1)


@dataclass
class Host:
    root: Path
    pack_dir: Path
    pack: ModuleType          # the pack package as the host loaded it (module name = its path)
    pack_loaded: bool         # False while the pack's entry point cannot build its nodes yet

    def pack_import(self, name: str) -> ModuleType:
        """Import ``name`` (e.g. ``"nodes.bridge"``) from the loaded pack package."""
        return importlib.import_module(f"{self.pack.__name__}.{name}")


def find_comfyui() -> tuple[Path | None, str]:
    """The ComfyUI root, or ``None`` and the reason none was found."""
    env = os.environ.get("COMFYUI_PATH")
    if env:
        root = Path(env).expanduser().resolve()
        if (root / "comfy").is_dir() and (root / "nodes.py").is_file():
            return root, ""
        return None, f"COMFYUI_PATH={env} is not a ComfyUI folder (needs comfy/ and nodes.py)"
    root = PACK_DIR.parent.parent
    if PACK_DIR.parent.name == "custom_nodes" and (root / "comfy").is_dir() and (root / "nodes.py").is_file():
        return root, ""
    return None, ("no ComfyUI found: set COMFYUI_PATH=/path/to/ComfyUI "
                  "or install the pack in ComfyUI/custom_nodes")


def thread_count() -> int:
    """Threads for host tests: ``OMP_NUM_THREADS`` when set, else 2 (CI's core count)."""
    return max(1, int(os.environ.get("OMP_NUM_THREADS") or 2))


def _put_host_first(root: Path) -> None:
    # This repo has a `nodes/` package and a `tests/` package; the host has `nodes.py`
    # and `tests/`. The host's `nodes` must win; ours stays reachable as the pack's
    # submodule. Keep our `tests` package (already imported by pytest) as it is.
    sys.path.insert(0, str(root))
    mod = sys.modules.get("nodes")
    if mod is not None and not str(getattr(mod, "__file__", "")).startswith(str(root)):
        del sys.modules["nodes"]


def boot(root: Path) -> Host:
    """Import the host from ``root`` (CPU unless ``ANTIPURE_TEST_GPU=1``) and load the pack.

    Raises ``RuntimeError`` with the reason when torch or the host cannot be imported.
    """
    try:
        import torch
    except Exception as e:  # pragma: no cover - depends on the environment
        raise RuntimeError(f"torch cannot be imported: {e!r}") from e
    version = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    if version < MIN_TORCH:
        raise RuntimeError(f"torch {torch.__version__} is too old for the host tests (need >= {MIN_TORCH})")

    # a fixed intra-op thread count: reductions split the same way in every run, whatever the load
    torch.set_num_threads(thread_count())
    _put_host_first(root)
    try:
        from comfy.cli_args import args

        # before anything imports comfy.model_management, else it looks for a GPU driver
        args.cpu = os.environ.get("ANTIPURE_TEST_GPU") != "1"
        # The host's CPU default (sub-quadratic attention) sizes its chunks to the free RAM, so two runs
        # of one graph differ in the last bits when the machine is loaded; PyTorch's SDPA does not.
        args.use_pytorch_cross_attention = True
        # before nodes.py puts ComfyUI/comfy first on the path (then `utils` is comfy/utils.py)
        import utils.extra_config  # noqa: F401
        import utils.install_util  # noqa: F401
        import comfy.model_management  # noqa: F401
        import nodes
    except Exception as e:
        sys.path.remove(str(root))
        raise RuntimeError(f"ComfyUI at {root} cannot be imported: {e!r}") from e

    async def _load() -> bool:
        await nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False)
        return await nodes.load_custom_node(str(PACK_DIR))

    loaded = asyncio.run(_load())
    pack_name = str(PACK_DIR).replace(".", "_x_")  # the module name load_custom_node gives
    pack = sys.modules.get(pack_name)
    if pack is None:
        raise RuntimeError(f"the host could not import the pack at {PACK_DIR} (see the log above)")
    return Host(root=root, pack_dir=PACK_DIR, pack=pack, pack_loaded=loaded)
