"""ComfyUI in this process: find the host, boot it, load this pack, register models, a stand-in server.

Used by the in-process batch runner, the demo, the preview renderer and the
host tests, so every tool starts the host the same way. Nothing here imports
ComfyUI at import time.
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import ModuleType

from . import PACK_ROOT
from .errors import EXIT_NO_HOST, RunnerError

__all__ = ["find_comfyui", "boot_host", "load_pack", "add_models_dir", "HeadlessServer", "headless_server",
           "missing_module_error", "ServerProcess", "free_port"]

#: pip names of modules ComfyUI imports whose distribution is named differently
_PIP_NAMES = {"yaml": "pyyaml", "PIL": "pillow", "cv2": "opencv-python", "skimage": "scikit-image"}


def missing_module_error(error: ModuleNotFoundError, comfy_root: Path) -> RunnerError:
    """One line (exit 2) naming the module the host could not import and the command that installs it."""
    name = (error.name or str(error)).split(".")[0]
    pip_name = _PIP_NAMES.get(name, name)
    return RunnerError(EXIT_NO_HOST, f"ComfyUI at {comfy_root} imports the Python module '{name}', which is not "
                                     f"installed here: run {Path(sys.executable).name} -m pip install {pip_name}")



def _is_comfyui_root(path: Path) -> bool:
    return (path / "main.py").is_file() and (path / "nodes.py").is_file() and (path / "comfy").is_dir()


def find_comfyui(explicit: str | os.PathLike | None = None, start: Path = PACK_ROOT) -> Path:
    """Locate the ComfyUI root: ``explicit``, else ``$COMFYUI_PATH``, else the ComfyUI whose
    ``custom_nodes/`` holds ``start`` (the pack).

    Raises:
        RunnerError: (exit 2) nothing found; the message says to set COMFYUI_PATH.
    """
    candidates: list[tuple[str, Path]] = []
    if explicit:
        candidates.append(("--comfyui", Path(explicit)))
    elif os.environ.get("COMFYUI_PATH"):
        candidates.append(("COMFYUI_PATH", Path(os.environ["COMFYUI_PATH"])))
    else:
        for parent in Path(start).resolve().parents:
            if parent.name == "custom_nodes":
                candidates.append(("the pack's location", parent.parent))
                break
    for source, path in candidates:
        if _is_comfyui_root(path.expanduser()):
            return path.expanduser().resolve()
        raise RunnerError(EXIT_NO_HOST, f"ComfyUI not found: {source} points to {path}, which has no "
                                        "main.py/nodes.py/comfy/. Set COMFYUI_PATH to the ComfyUI folder.")
    raise RunnerError(EXIT_NO_HOST, "ComfyUI not found: set COMFYUI_PATH to the ComfyUI folder "
                                    "(or install this pack inside ComfyUI/custom_nodes/).")


_BOOTED: Path | None = None


async def boot_host(comfy_root: Path, cpu: bool | None = None, verbose: bool = False) -> None:
    """Import ComfyUI from ``comfy_root`` and register its built-in nodes (once per process).

    ``cpu=None`` picks the CPU when torch sees no CUDA/MPS device.
    """
    global _BOOTED
    if _BOOTED is not None:
        if _BOOTED != comfy_root:
            raise RunnerError(EXIT_NO_HOST, f"ComfyUI already booted from {_BOOTED}, not {comfy_root}")
        return
    root = str(comfy_root)
    loaded = sys.modules.get("nodes")
    if loaded is not None and hasattr(loaded, "NODE_CLASS_MAPPINGS"):
        if Path(loaded.__file__).resolve().parent != comfy_root:
            raise RunnerError(EXIT_NO_HOST, f"ComfyUI already imported from {Path(loaded.__file__).parent}, "
                                            f"not {comfy_root}")
        if any(name.startswith("nodes_") for name in getattr(loaded, "LOADED_MODULE_DIRS", {})):
            _BOOTED = comfy_root  # booted by the embedding process (e.g. a test session)
            return
    if root in sys.path:
        sys.path.remove(root)
    sys.path.insert(0, root)  # the host's modules import one another by top-level name, as under main.py
    level = logging.getLogger().level
    if not verbose:  # the host warns about optional parts it cannot import (e.g. torchaudio)
        logging.getLogger().setLevel(logging.ERROR)
    try:
        from comfy.cli_args import args  # before comfy.model_management is imported

        if cpu is None:
            import torch

            mps = getattr(torch.backends, "mps", None)
            cpu = not (torch.cuda.is_available() or (mps is not None and mps.is_available()))
        args.cpu = bool(cpu)
        import utils.extra_config  # bind `utils` to the host's package before nodes.py shadows it
        import utils.install_util  # noqa: F401
        import nodes
        import server  # noqa: F401 - nodes report through it; it imports modules the host does not list

        extra = comfy_root / "extra_model_paths.yaml"  # as main.py does
        if extra.is_file():
            utils.extra_config.load_extra_path_config(str(extra))

        await nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False)
    except ModuleNotFoundError as e:
        raise missing_module_error(e, comfy_root) from None
    finally:
        logging.getLogger().setLevel(level)
    _BOOTED = comfy_root


async def load_pack(pack_dir: Path = PACK_ROOT) -> bool:
    """Load a custom node pack exactly as the host does (``nodes.load_custom_node``), once."""
    import nodes

    if str(pack_dir) in getattr(nodes, "LOADED_MODULE_DIRS", {}).values():
        return True
    return bool(await nodes.load_custom_node(str(pack_dir)))


def pack_module_name(pack_dir: Path = PACK_ROOT) -> str:
    """The module name the host gives a pack it loads from a folder (``nodes.load_custom_node``)."""
    return str(pack_dir).replace(".", "_x_")


def pack_import(name: str, pack_dir: Path = PACK_ROOT) -> ModuleType:
    """Import ``name`` (e.g. ``"antipure_comfy.bridge"``) from the pack as the host loaded it (:func:`load_pack`
    first), so that its modules are the very ones the running nodes use."""
    package = pack_module_name(pack_dir)
    if package not in sys.modules:
        raise RunnerError(EXIT_NO_HOST, f"the pack at {pack_dir} is not loaded; call load_pack first")
    return importlib.import_module(f"{package}.{name}")


def add_models_dir(models_dir: str | os.PathLike) -> list[str]:
    """Register a models folder laid out like ``ComfyUI/models`` (``checkpoints/``, ``loras/``,
    ``unet/`` ...), in front of the host's own. Model files directly in it count as checkpoints.

    Returns the registered kinds.
    """
    import folder_paths

    models_dir = Path(models_dir).resolve()
    host_models = Path(folder_paths.models_dir)
    kinds = []
    for kind, (paths, _exts) in list(folder_paths.folder_names_and_paths.items()):
        if kind == "custom_nodes":
            continue
        # the folder names the host itself uses for this kind (e.g. "unet" for diffusion_models)
        names = dict.fromkeys([kind] + [Path(p).name for p in paths if Path(p).parent == host_models])
        for name in names:
            if (models_dir / name).is_dir():
                folder_paths.add_model_folder_path(kind, str(models_dir / name), is_default=True)
                kinds.append(kind)
    if any(p.suffix in folder_paths.supported_pt_extensions for p in models_dir.iterdir() if p.is_file()):
        folder_paths.add_model_folder_path("checkpoints", str(models_dir), is_default=True)
        kinds.append("checkpoints")
    return list(dict.fromkeys(kinds))


# --- the server, as far as the executor needs one ----------------------------------------

class HeadlessServer:
    """The parts of ComfyUI's PromptServer that the executor and nodes use; events go to ``on_event``."""

    def __init__(self):
        from aiohttp import web

        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata: dict = {}
        self.routes = web.RouteTableDef()  # packs that add routes at import time still load
        self.on_event = None

    def send_sync(self, event, data, sid=None):
        if self.on_event is not None:
            self.on_event(event, data)

    def send_progress_text(self, text, node_id, sid=None):
        self.send_sync("progress_text", {"node_id": node_id, "text": text}, sid)

    def queue_updated(self):
        pass


def headless_server() -> HeadlessServer:
    """The process's ``server.PromptServer.instance``, installing a headless stand-in when none runs
    (some built-in nodes report text through it, e.g. GetImageSize)."""
    import server

    instance = getattr(server.PromptServer, "instance", None)
    if not isinstance(instance, HeadlessServer):
        if instance is not None:
            return HeadlessServer()  # a real server runs: leave it alone, use a private stand-in
        server.PromptServer.instance = instance = HeadlessServer()
    return instance



# --- a ComfyUI server in a child process ---------------------------------------------------------

class ServerProcess:
    """``python main.py --listen 127.0.0.1 --port PORT --base-directory BASE`` with this pack linked
    into ``BASE/custom_nodes/``: a real server whose models/, input/ and output/ live under BASE.

    Args:
        comfy_root: the ComfyUI folder.
        base: the base directory (created); ``BASE/server.log`` receives the server's log.
        port: the port, or ``None`` for a free one.
        cpu: pass ``--cpu``.
        pack_dir: the pack to link (``None``: none).
        link_name: the pack's folder name under ``custom_nodes/`` (default: ``pack_dir``'s name).
    """

    def __init__(self, comfy_root: Path, base: Path, port: int | None = None, cpu: bool = True,
                 pack_dir: Path | None = PACK_ROOT, link_name: str | None = None):
        self.base = Path(base)
        (self.base / "custom_nodes").mkdir(parents=True, exist_ok=True)
        if pack_dir is not None:
            link = self.base / "custom_nodes" / (link_name or pack_dir.name)
            if not link.exists():
                os.symlink(pack_dir, link, target_is_directory=True)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "main.py", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base), "--disable-auto-launch", "--disable-api-nodes",
               "--database-url", "sqlite:///:memory:"] + (["--cpu"] if cpu else [])
        self.log = self.base / "server.log"
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(cmd, cwd=comfy_root, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)

    def wait_ready(self, timeout: float = 180.0) -> str:
        """Block until ``GET /system_stats`` answers 200; returns the URL.

        Raises:
            RunnerError: (exit 2) the server exited or did not answer in time (with its log's end).
        """
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RunnerError(EXIT_NO_HOST, f"ComfyUI server on port {self.port} exited with code "
                                                f"{self.process.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/system_stats", timeout=2) as r:
                    if r.status == 200:
                        return self.url
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RunnerError(EXIT_NO_HOST, f"ComfyUI server on port {self.port} did not answer within "
                                                f"{timeout:.0f} s:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.25)

    def stop(self, kill: bool = False) -> None:
        """Terminate (or kill) the server and wait for it to exit."""
        if self.process.poll() is None:
            self.process.kill() if kill else self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
