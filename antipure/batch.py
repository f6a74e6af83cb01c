"""Headless batch runner: one workflow over a folder of images, through the host's own executor.

``python -m antipure run WORKFLOW --images DIR --out DIR [--set NODE.INPUT=VALUE ...]
[--models DIR] [--cpu]`` boots ComfyUI in-process, loads this pack the way the
host does, converts the workflow (UI or API format), and for every image sets
the image-loading node, executes the prompt with ``execution.PromptExecutor``
(models stay loaded from one image to the next) and writes what the saving
nodes save to ``OUT/<image stem>/`` plus ``OUT/results.csv`` (image, status,
seconds, output files, and every STRING a node returned or showed, such as a
markdown or JSON report). Models come from the host's own folders (and its
``extra_model_paths.yaml``) and from ``--models``.

Nothing from the workflow is evaluated: ``--set`` values are parsed as JSON or
kept as plain strings.

Exit codes: 0 all images done, 1 some image failed, 2 host not found (or bad
command line), 3 invalid workflow, 4 model missing, 5 image folder missing or
empty.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .workflow_format import WIDGET_TYPES, WorkflowError, load_prompt

__all__ = [
    "EXIT_OK", "EXIT_FAILED", "EXIT_NO_HOST", "EXIT_BAD_WORKFLOW", "EXIT_NO_MODEL", "EXIT_NO_IMAGES",
    "RunnerError", "ImageResult", "find_comfyui", "boot_host", "load_pack", "add_models_dir",
    "headless_server", "apply_sets", "find_image_inputs", "missing_models", "validate", "list_images",
    "BatchRunner", "run_batch", "write_results_csv", "main",
]

EXIT_OK, EXIT_FAILED, EXIT_NO_HOST, EXIT_BAD_WORKFLOW, EXIT_NO_MODEL, EXIT_NO_IMAGES = 0, 1, 2, 3, 4, 5

PACK_ROOT = Path(__file__).resolve().parents[1]
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
_UPLOAD_KEYS = ("image_upload", "animated_image_upload")


class RunnerError(Exception):
    """A condition that stops the run before any image is processed; ``code`` is the exit code."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


# --- host -----------------------------------------------------------------------------------

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
    sys.path.insert(0, root)  # the host's nodes.py must win over this pack's nodes/ package
    if loaded is not None and not hasattr(loaded, "NODE_CLASS_MAPPINGS"):
        raise RunnerError(EXIT_NO_HOST, f"'nodes' is already imported from {getattr(loaded, '__file__', loaded)}, "
                                        "not the host's nodes.py; put the ComfyUI folder first on sys.path")
    from comfy.cli_args import args  # before comfy.model_management is imported

    if cpu is None:
        import torch

        mps = getattr(torch.backends, "mps", None)
        cpu = not (torch.cuda.is_available() or (mps is not None and mps.is_available()))
    args.cpu = bool(cpu)
    level = logging.getLogger().level
    if not verbose:  # the host warns about optional parts it cannot import (e.g. torchaudio)
        logging.getLogger().setLevel(logging.ERROR)
    try:
        import utils.extra_config  # bind `utils` to the host's package before nodes.py shadows it
        import utils.install_util  # noqa: F401
        import nodes

        extra = comfy_root / "extra_model_paths.yaml"  # as main.py does
        if extra.is_file():
            utils.extra_config.load_extra_path_config(str(extra))

        await nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False)
    finally:
        logging.getLogger().setLevel(level)
    _BOOTED = comfy_root


async def load_pack(pack_dir: Path = PACK_ROOT) -> bool:
    """Load a custom node pack exactly as the host does (``nodes.load_custom_node``), once."""
    import nodes

    if str(pack_dir) in getattr(nodes, "LOADED_MODULE_DIRS", {}).values():
        return True
    return bool(await nodes.load_custom_node(str(pack_dir)))


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


# --- prompt editing and checks --------------------------------------------------------------

def _title(prompt: Mapping[str, dict], node_id: str) -> str:
    return (prompt[node_id].get("_meta") or {}).get("title") or prompt[node_id]["class_type"]


def _input_specs(node_classes: Mapping[str, Any], class_type: str) -> dict[str, Any]:
    schema = node_classes[class_type].INPUT_TYPES()
    return {**(schema.get("required") or {}), **(schema.get("optional") or {})}


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _find_node(prompt: Mapping[str, dict], ref: str) -> str:
    if ref in prompt:
        return ref
    for key in ("title", "class_type"):
        found = [nid for nid in prompt
                 if (_title(prompt, nid) if key == "title" else prompt[nid]["class_type"]) == ref]
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise WorkflowError(f"--set: '{ref}' matches several nodes ({', '.join(found)}); use a node id")
    known = ", ".join(f"{nid} ({_title(prompt, nid)})" for nid in prompt)
    raise WorkflowError(f"--set: no node with id or title '{ref}'; nodes: {known}")


def apply_sets(prompt: dict, sets: Iterable[str], node_classes: Mapping[str, Any]) -> dict:
    """Apply ``NODE.INPUT=VALUE`` overrides in place (NODE: id, title or unique class type;
    VALUE: JSON if it parses, else the plain string). Returns ``prompt``.

    Raises:
        WorkflowError: malformed item, unknown node or input.
    """
    for item in sets:
        target, sep, value = item.partition("=")
        node_ref, dot, name = target.rpartition(".")
        if not sep or not dot or not node_ref or not name:
            raise WorkflowError(f"--set {item!r}: expected NODE.INPUT=VALUE, e.g. 3.steps=4 or \"KSampler.cfg=7.5\"")
        node_id = _find_node(prompt, node_ref)
        specs = _input_specs(node_classes, prompt[node_id]["class_type"])
        if name not in specs:
            raise WorkflowError(f"--set {item!r}: node {node_id} ({prompt[node_id]['class_type']}) has no input "
                                f"'{name}'; inputs: {', '.join(specs)}")
        type_ = specs[name][0] if isinstance(specs[name], (list, tuple)) and specs[name] else specs[name]
        if not isinstance(type_, (list, tuple)) and type_ not in WIDGET_TYPES:
            raise WorkflowError(f"--set {item!r}: input '{name}' of node {node_id} is a {type_} connection, "
                                "not a value that can be set")
        val = _parse_value(value)
        prompt[node_id]["inputs"][name] = {"__value__": val} if isinstance(val, list) else val
    return prompt


def find_image_inputs(prompt: Mapping[str, dict], node_classes: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(node id, input name) of every image-file input: a combo with ``image_upload`` (LoadImage ...)."""
    found = []
    for node_id, node in prompt.items():
        for name, spec in _input_specs(node_classes, node["class_type"]).items():
            opts = spec[1] if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict) else {}
            if any(opts.get(k) is True for k in _UPLOAD_KEYS):
                found.append((node_id, name))
    return found


def missing_models(prompt: Mapping[str, dict], node_classes: Mapping[str, Any]) -> list[str]:
    """One message per model-file input whose value is not in its models folder, listing what is there."""
    import folder_paths

    problems = []
    model_kinds = [k for k in folder_paths.folder_names_and_paths if k not in ("custom_nodes", "configs")]
    for node_id, node in prompt.items():
        specs = _input_specs(node_classes, node["class_type"])
        for name, value in node["inputs"].items():
            spec = specs.get(name)
            if not isinstance(value, str) or not isinstance(spec, (list, tuple)) or not spec:
                continue
            choices = spec[0] if isinstance(spec[0], (list, tuple)) else (
                (spec[1].get("options") if len(spec) > 1 and isinstance(spec[1], dict) else None))
            if not isinstance(choices, (list, tuple)) or value in choices:
                continue
            if os.path.splitext(value)[1].lower() not in folder_paths.supported_pt_extensions:
                continue
            kinds = [k for k in model_kinds if set(folder_paths.get_filename_list(k)) == set(choices)]
            if len(kinds) > 1:  # several empty folders look alike: pick by the input's name
                stem = name.removesuffix("_name").replace("ckpt", "checkpoint")
                kinds = [k for k in kinds if k.rstrip("s") in stem or stem in k] or kinds
            where = (f" (looked in {', '.join(folder_paths.get_folder_paths(kinds[0]))})"
                     if len(kinds) == 1 else "")
            have = ", ".join(map(str, choices)) or "nothing"
            problems.append(f"node {node_id} ({_title(prompt, node_id)}): {name} '{value}' not found{where}; "
                            f"available: {have}. Put the file there or pass --models DIR.")
    return problems


async def validate(prompt: dict) -> tuple[list[str], list[str]]:
    """The host's ``execution.validate_prompt``: (readable errors, empty when valid; output node ids).

    Stricter than the server, which runs the valid outputs and drops the others: any node error
    counts, so a batch never silently skips a branch of the workflow.
    """
    import execution

    valid, error, outputs, node_errors = await execution.validate_prompt(str(uuid.uuid4()), prompt, None)
    if valid and not node_errors:
        return [], list(outputs)
    problems = []
    for node_id, info in (node_errors or {}).items():
        for err in info.get("errors", []):
            details = err.get("details") or err.get("message", "")
            problems.append(f"node {node_id} ({info.get('class_type', '?')}): {details}")
    if not problems and error:
        problems.append(f"{error.get('message', '')} {error.get('details', '')}".strip())
    return problems, []


def list_images(path: str | os.PathLike) -> list[Path]:
    """Image files in a folder (sorted), or the file itself.

    Raises:
        RunnerError: (exit 5) missing folder or no images in it.
    """
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise RunnerError(EXIT_NO_IMAGES, f"--images: {path} does not exist; give a folder of images")
    images = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        raise RunnerError(EXIT_NO_IMAGES, f"--images: no images ({', '.join(IMAGE_EXTENSIONS)}) in {path}")
    return images


# --- execution ------------------------------------------------------------------------------

class _HeadlessServer:
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


def headless_server() -> _HeadlessServer:
    """The process's ``server.PromptServer.instance``, installing a headless stand-in when none runs
    (some built-in nodes report text through it, e.g. GetImageSize)."""
    import server

    instance = getattr(server.PromptServer, "instance", None)
    if not isinstance(instance, _HeadlessServer):
        if instance is not None:
            return _HeadlessServer()  # a real server runs: leave it alone, use a private stand-in
        server.PromptServer.instance = instance = _HeadlessServer()
    return instance


@dataclass
class ImageResult:
    """One row of the results table."""

    image: str
    status: str = "ok"
    seconds: float = 0.0
    outputs: list[str] = field(default_factory=list)
    strings: dict[str, str] = field(default_factory=dict)
    error: str = ""


def _snapshot(folder: Path) -> dict[str, float]:
    return {str(p.relative_to(folder)): p.stat().st_mtime for p in folder.rglob("*") if p.is_file()}


def _output_files(ui_outputs: Mapping[str, Any], out_dir: Path, before: Mapping[str, float]) -> list[str]:
    """Files the run wrote under ``out_dir``: those the nodes reported (SaveImage's ``images`` ...)
    plus any other new or rewritten file (e.g. a report a node saved itself); paths relative."""
    files = []
    for ui in ui_outputs.values():
        for items in (ui or {}).values():
            for item in items if isinstance(items, (list, tuple)) else []:
                if isinstance(item, dict) and "filename" in item and item.get("type", "output") == "output":
                    files.append(str(Path(item.get("subfolder", "")) / item["filename"]))
    files = [f for f in files if (out_dir / f).is_file()]
    changed = sorted(f for f, t in _snapshot(out_dir).items() if before.get(f) != t and f != "results.csv")
    return files + [f for f in changed if f not in files]


class BatchRunner:
    """Runs one API prompt repeatedly with different input images (models stay cached).

    Args:
        prompt: API prompt (after :func:`apply_sets`); not modified.
        image_input: (node id, input name) that receives each image's file name.
    """

    def __init__(self, prompt: dict, image_input: tuple[str, str] | None):
        import comfy.utils
        import execution

        self.prompt, self.image_input = prompt, image_input
        self.server = headless_server()
        self.server.on_event = self._on_event
        self.executor = execution.PromptExecutor(self.server, cache_type=False)
        self.errors: list[dict] = []
        self.node_bar = None  # a tqdm bar for the running node's own steps
        comfy.utils.set_progress_bar_global_hook(self._on_progress)

    def _on_event(self, event: str, data: Any) -> None:
        if event in ("execution_error", "execution_interrupted"):
            self.errors.append({"event": event, **(data if isinstance(data, dict) else {})})
        elif event == "executing" and self.node_bar is not None and isinstance(data, dict):
            node = data.get("node")
            if node in self.prompt:
                self.node_bar.set_description_str(f"node {node} {_title(self.prompt, node)}"[:40])
                self.node_bar.reset(total=1)

    def _on_progress(self, value, total, preview=None, prompt_id=None, node_id=None):
        if self.node_bar is not None and total:
            if self.node_bar.total != total:
                self.node_bar.reset(total=total)
            self.node_bar.n = value
            self.node_bar.refresh()

    async def run_image(self, image: Path, out_dir: Path, input_dir: Path) -> ImageResult:
        """Execute the prompt for one image with ``out_dir`` as the host's output folder.

        Nodes with a ``filename_prefix`` save under ``out_dir/<image stem>/``: the per-image
        folder goes into the prefix because the executor keeps node objects (and the output
        folder SaveImage took when it was made) from one image to the next.
        """
        import folder_paths

        prompt = json.loads(json.dumps(self.prompt))
        result = ImageResult(image=image.name)
        if self.image_input is not None:
            shutil.copy2(image, input_dir / image.name)
            node_id, name = self.image_input
            prompt[node_id]["inputs"][name] = image.name
        for node in prompt.values():
            prefix = node["inputs"].get("filename_prefix")
            if isinstance(prefix, str):
                node["inputs"]["filename_prefix"] = f"{image.stem}/{prefix}"
        out_dir.mkdir(parents=True, exist_ok=True)
        folder_paths.set_output_directory(str(out_dir))
        before = _snapshot(out_dir)
        t0 = time.perf_counter()
        problems, outputs = await validate(prompt)
        if problems:
            result.status, result.error = "invalid", "; ".join(problems)
            return result
        self.errors = []
        prompt_id = str(uuid.uuid4())
        self.server.last_prompt_id = prompt_id
        await self.executor.execute_async(prompt, prompt_id, {"client_id": "antipure-runner"}, outputs)
        result.seconds = round(time.perf_counter() - t0, 3)
        if self.errors or not self.executor.success:
            err = self.errors[0] if self.errors else {}
            result.status = "interrupted" if err.get("event") == "execution_interrupted" else "error"
            result.error = (f"node {err.get('node_id')} ({err.get('node_type')}): "
                            f"{err.get('exception_type', '')}: {err.get('exception_message', '')}").strip()
            return result
        result.outputs = _output_files(self.executor.history_result.get("outputs", {}), out_dir, before)
        result.strings = self._strings(prompt)
        return result

    def _strings(self, prompt: Mapping[str, dict]) -> dict[str, str]:
        """STRING outputs of executed nodes, plus text a node showed in the UI, by ``title.output``."""
        strings = {}
        for node_id in prompt:
            cls = _node_class(prompt[node_id]["class_type"])
            types = list(getattr(cls, "RETURN_TYPES", ()) or ())
            names = list(getattr(cls, "RETURN_NAMES", None) or types)
            data = self.executor.caches.outputs.get(node_id)
            data = getattr(data, "outputs", data)  # newer hosts wrap outputs in a cache entry
            label = _title(prompt, node_id)
            if sum(_title(prompt, other) == label for other in prompt) > 1:
                label = f"{label} #{node_id}"
            for i, type_ in enumerate(types):
                if type_ == "STRING" and data is not None and i < len(data):
                    values = [v for v in data[i] if isinstance(v, str)]
                    if values:
                        strings[f"{label}.{names[i]}"] = "\n".join(values)
            ui = self.executor.caches.ui.get(node_id)
            texts = ((ui or {}).get("output") or {}).get("text")
            if isinstance(texts, (list, tuple)) and texts and all(isinstance(t, str) for t in texts):
                strings.setdefault(f"{label}.text", "\n".join(texts))
        return strings


def _node_class(class_type: str):
    import nodes

    return nodes.NODE_CLASS_MAPPINGS[class_type]


def write_results_csv(path: Path, results: Sequence[ImageResult]) -> None:
    """One row per image: image, status, seconds, outputs (';'-joined), error, then STRING outputs."""
    extra = []
    for r in results:
        extra += [k for k in r.strings if k not in extra]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", "status", "seconds", "outputs", "error", *extra])
        for r in results:
            w.writerow([r.image, r.status, r.seconds, ";".join(r.outputs), r.error,
                        *(r.strings.get(k, "") for k in extra)])


# --- command line ---------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m antipure", description="Run ComfyUI workflows headless.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run a workflow over a folder of images",
                       description="Run a ComfyUI workflow (UI or API JSON) once per image in a folder, "
                                   "with the host's own executor; writes OUT/<image stem>/ and OUT/results.csv.")
    r.add_argument("workflow", help="workflow JSON (saved from the ComfyUI menu, or API format)")
    r.add_argument("--images", required=True, help="folder of input images (png/jpg/webp/...)")
    r.add_argument("--out", required=True, help="output folder")
    r.add_argument("--set", dest="sets", action="append", default=[], metavar="NODE.INPUT=VALUE",
                   help="override an input; NODE is an id or title, VALUE JSON or text (repeatable)")
    r.add_argument("--models", help="models folder (checkpoints/, loras/ ... or checkpoint files)")
    r.add_argument("--image-node", help="id or title of the image-loading node, if there are several")
    r.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    r.add_argument("--comfyui", help="ComfyUI folder (default: $COMFYUI_PATH or the pack's location)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.add_argument("--verbose", action="store_true", help="show the host's log")
    return p


async def _run(ns: argparse.Namespace) -> int:
    comfy_root = find_comfyui(ns.comfyui)
    workflow = Path(ns.workflow)
    if not workflow.is_file():
        raise RunnerError(EXIT_BAD_WORKFLOW, f"workflow: {workflow} does not exist")
    images = list_images(ns.images)
    if ns.models and not Path(ns.models).is_dir():
        raise RunnerError(EXIT_NO_MODEL, f"--models: {ns.models} is not a folder")
    await boot_host(comfy_root, cpu=True if ns.cpu else None, verbose=ns.verbose)
    headless_server()
    if not await load_pack(PACK_ROOT):
        print(f"warning: the pack at {PACK_ROOT} did not load (see the log above); "
              "only the host's own nodes are available", file=sys.stderr)
    if ns.models:
        add_models_dir(ns.models)
    import nodes

    try:
        prompt = load_prompt(workflow, nodes.NODE_CLASS_MAPPINGS, display_names=nodes.NODE_DISPLAY_NAME_MAPPINGS)
        apply_sets(prompt, ns.sets, nodes.NODE_CLASS_MAPPINGS)
    except WorkflowError as e:
        raise RunnerError(EXIT_BAD_WORKFLOW, f"invalid workflow {workflow}: {e}") from None
    image_inputs = find_image_inputs(prompt, nodes.NODE_CLASS_MAPPINGS)
    if ns.image_node:
        try:
            chosen = _find_node(prompt, ns.image_node)
        except WorkflowError as e:
            raise RunnerError(EXIT_BAD_WORKFLOW, str(e).replace("--set", "--image-node")) from None
        image_inputs = [x for x in image_inputs if x[0] == chosen]
        if not image_inputs:
            raise RunnerError(EXIT_BAD_WORKFLOW, f"--image-node {ns.image_node}: node {chosen} loads no image file")
    if len(image_inputs) > 1:
        names = ", ".join(f"{nid} ({_title(prompt, nid)})" for nid, _ in image_inputs)
        raise RunnerError(EXIT_BAD_WORKFLOW, f"the workflow has several image inputs ({names}); "
                                             "choose one with --image-node")
    if not image_inputs:
        raise RunnerError(EXIT_BAD_WORKFLOW, "the workflow has no image-loading node (e.g. LoadImage) "
                                             "to feed the --images into")
    problems = missing_models(prompt, nodes.NODE_CLASS_MAPPINGS)
    if problems:
        raise RunnerError(EXIT_NO_MODEL, "model not found:\n  - " + "\n  - ".join(problems))

    results = await run_batch(prompt, image_inputs[0], images, Path(ns.out), progress=not ns.no_progress)
    failed = [r for r in results if r.status != "ok"]
    print(f"{len(results) - len(failed)}/{len(results)} images done; results in {Path(ns.out) / 'results.csv'}")
    return EXIT_FAILED if failed else EXIT_OK


async def run_batch(prompt: dict, image_input: tuple[str, str], images: Sequence[Path], out: Path,
                    progress: bool = True) -> list[ImageResult]:
    """Run ``prompt`` once per image (booted host, validated prompt); writes ``out/results.csv``.

    The host's input/output/temp folders and progress hook are restored afterwards.

    Raises:
        RunnerError: (exit 3) the prompt does not validate with the first image.
    """
    import comfy.utils
    import folder_paths
    from tqdm.auto import tqdm

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    saved = (folder_paths.get_input_directory(), folder_paths.get_output_directory(),
             folder_paths.get_temp_directory(), comfy.utils.PROGRESS_BAR_HOOK)
    results: list[ImageResult] = []
    disable = None if progress else True  # None: tqdm shows bars on a terminal only
    with tempfile.TemporaryDirectory(prefix="antipure-run-") as tmp:
        input_dir, temp_dir = Path(tmp, "input"), Path(tmp, "temp")
        input_dir.mkdir()
        temp_dir.mkdir()
        folder_paths.set_input_directory(str(input_dir))
        folder_paths.set_temp_directory(str(temp_dir))
        try:
            # validate once up front with the first image so a broken workflow fails fast
            first = json.loads(json.dumps(prompt))
            shutil.copy2(images[0], input_dir / images[0].name)
            first[image_input[0]]["inputs"][image_input[1]] = images[0].name
            problems, _ = await validate(first)
            if problems:
                raise RunnerError(EXIT_BAD_WORKFLOW, "invalid workflow:\n  - " + "\n  - ".join(problems))
            runner = BatchRunner(prompt, image_input)
            bar = tqdm(images, desc="images", unit="img", disable=disable, position=0)
            runner.node_bar = tqdm(total=1, desc="node", position=1, leave=False, disable=disable)
            try:
                for image in bar:
                    res = await runner.run_image(image, out, input_dir)
                    results.append(res)
                    write_results_csv(out / "results.csv", results)
                    if res.status != "ok":
                        tqdm.write(f"{image.name}: {res.status}: {res.error}", file=sys.stderr)
                    bar.set_postfix_str(f"{image.name}: {res.status}")
            finally:
                runner.node_bar.close()
                bar.close()
                runner.server.on_event = None
        finally:
            folder_paths.set_input_directory(saved[0])
            folder_paths.set_output_directory(saved[1])
            folder_paths.set_temp_directory(saved[2])
            comfy.utils.set_progress_bar_global_hook(saved[3])
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m antipure``; returns the exit code."""
    ns = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if ns.verbose else logging.WARNING, format="%(message)s")
    try:
        return asyncio.run(_run(ns))
    except RunnerError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
