"""Find and boot the ComfyUI host for the node tests, the way the host itself loads this pack.

The host is found and booted by :mod:`antipure.comfyui`, as the headless runner
does: from ``COMFYUI_PATH`` or, when the pack sits in ``ComfyUI/custom_nodes/<pack>``,
from the grandparent folder; the ComfyUI root goes first on ``sys.path``, the CPU is forced
unless ``ANTIPURE_TEST_GPU=1``, the built-in extra nodes are registered and the
pack is loaded with ``nodes.load_custom_node``, so the pack's modules import each
other through relative imports exactly as in a running server.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from antipure import comfyui
from antipure.errors import RunnerError

PACK_DIR = Path(__file__).resolve().parents[2]
MIN_TORCH = (2, 1)


@dataclass
class Host:
    root: Path
    pack_dir: Path
    pack: ModuleType          # the pack package as the host loaded it (module name = its path)
    pack_loaded: bool         # False while the pack's entry point cannot build its nodes yet

    def pack_import(self, name: str) -> ModuleType:
        """Import ``name`` (e.g. ``"antipure_comfy.bridge"``) from the pack as the host loaded it."""
        return comfyui.pack_import(name, self.pack_dir)


def find_comfyui() -> tuple[Path | None, str]:
    """The ComfyUI root, or ``None`` and the reason none was found (the runner's own search)."""
    try:
        return comfyui.find_comfyui(start=PACK_DIR), ""
    except RunnerError as e:
        return None, str(e)


def thread_count() -> int:
    """Threads for host tests: ``OMP_NUM_THREADS`` when set, else 2 (CI's core count)."""
    return max(1, int(os.environ.get("OMP_NUM_THREADS") or 2))


def _pin_attention(root: Path) -> None:
    # The host's CPU default (sub-quadratic attention) sizes its chunks to the free RAM, so two runs
    # of one graph differ in the last bits when the machine is loaded; PyTorch's SDPA does not.
    # Must happen before comfy.model_management is imported.
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from comfy.cli_args import args

    args.use_pytorch_cross_attention = True


def boot(root: Path) -> Host:
    """Import the host from ``root`` (CPU unless ``ANTIPURE_TEST_GPU=1``) and load the pack, as
    ``python -m antipure run`` does.

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
    _pin_attention(root)

    async def _boot() -> bool:
        await comfyui.boot_host(root, cpu=os.environ.get("ANTIPURE_TEST_GPU") != "1")
        return await comfyui.load_pack(PACK_DIR)

    try:
        loaded = asyncio.run(_boot())
    except RunnerError as e:
        raise RuntimeError(str(e)) from e
    except Exception as e:
        raise RuntimeError(f"ComfyUI at {root} cannot be imported: {e!r}") from e
    pack = sys.modules.get(comfyui.pack_module_name(PACK_DIR))
    if pack is None:
        raise RuntimeError(f"the host could not import the pack at {PACK_DIR} (see the log above)")
    return Host(root=root, pack_dir=PACK_DIR, pack=pack, pack_loaded=loaded)


@contextlib.contextmanager
def running_servers(comfy_root: Path, bases: list[Path], timeout: float = 240):
    """ComfyUI servers on loopback, one per base directory, started together and ready; stopped afterwards
    (a server stopped by SIGSTOP is continued first, as it cannot terminate otherwise)."""
    from antipure.comfyui import ServerProcess

    procs = [ServerProcess(comfy_root, base) for base in bases]
    try:
        with ThreadPoolExecutor(len(procs)) as pool:
            list(pool.map(lambda p: p.wait_ready(timeout=timeout), procs))
        yield procs
    finally:
        for p in procs:
            if p.process.poll() is None:
                os.kill(p.process.pid, signal.SIGCONT)
            p.stop()
