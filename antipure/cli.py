"""``python -m antipure run WORKFLOW --images DIR --out DIR [--set NODE.INPUT=VALUE ...]``.

Runs a workflow (UI or API format) once per image in a folder. By default it
boots ComfyUI in this process, loads this pack the way the host does and runs
on the host's own executor (:mod:`antipure.batch`); models come from the host's
folders (and its ``extra_model_paths.yaml``) and from ``--models``. With
``--server URL`` (repeatable) it shards the images over running ComfyUI servers
through their HTTP/websocket API instead (:mod:`antipure.remote`): no local
ComfyUI is needed, models are the servers'.

Each image's outputs land in ``OUT/<image stem>/`` and a row in
``OUT/results.csv`` (image, status, seconds, output files, and every STRING a
node returned or showed, such as a markdown or JSON report) once they are
complete; ``--resume`` skips images already done.

Nothing from the workflow is evaluated: ``--set`` values are parsed as JSON or
kept as plain strings.

Exit codes: 0 all images done, 1 some image failed, 2 host not found, not
usable or unreachable (or bad command line), 3 invalid workflow, 4 model
missing, 5 image folder missing or empty.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path
from typing import Sequence

from . import PACK_ROOT
from .comfyui import add_models_dir, boot_host, find_comfyui, headless_server, load_pack
from .errors import (EXIT_BAD_WORKFLOW, EXIT_FAILED, EXIT_NO_HOST, EXIT_NO_MODEL, EXIT_OK,
                     RunnerError)
from .prompts import list_images, missing_models, prepare_prompt
from .results import ImageResult
from .workflow_format import WorkflowError, read_workflow

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m antipure", description="Run ComfyUI workflows headless.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run a workflow over a folder of images",
                       description="Run a ComfyUI workflow (UI or API JSON) once per image in a folder, "
                                   "with the host's own executor or over running ComfyUI servers "
                                   "(--server); writes OUT/<image stem>/ and OUT/results.csv.")
    r.add_argument("workflow", help="workflow JSON (saved from the ComfyUI menu, or API format)")
    r.add_argument("--images", required=True, help="folder of input images (png/jpg/webp/...)")
    r.add_argument("--out", required=True, help="output folder")
    r.add_argument("--set", dest="sets", action="append", default=[], metavar="NODE.INPUT=VALUE",
                   help="override an input; NODE is an id or title, VALUE JSON or text (repeatable)")
    r.add_argument("--models", help="models folder (checkpoints/, loras/ ... or checkpoint files)")
    r.add_argument("--image-node", help="id or title of the image-loading node, if there are several")
    r.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    r.add_argument("--comfyui", help="ComfyUI folder (default: $COMFYUI_PATH or the pack's location)")
    r.add_argument("--resume", action="store_true",
                   help="skip images OUT/results.csv lists as ok; redo the others")
    r.add_argument("--server", dest="servers", action="append", default=[], metavar="URL",
                   help="a running ComfyUI server (e.g. http://127.0.0.1:8188) to shard the images over "
                        "instead of running in this process (repeatable)")
    r.add_argument("--per-server", type=int, default=1, metavar="N",
                   help="jobs in flight on each --server (default 1)")
    r.add_argument("--retries", type=int, default=2, metavar="N",
                   help="with --server: how often an image is re-queued on another server after a server "
                        "failed or disappeared under it (default 2)")
    r.add_argument("--stall-timeout", type=float, default=300.0, metavar="SECONDS",
                   help="with --server: an image whose server sent no progress, no node start and no queue "
                        "change for this long is stopped there and re-queued on another server; a server that "
                        "stalls twice gets no more images (default 300; make it longer than the slowest silent "
                        "step of the workflow, e.g. a model load; 0 = never)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.add_argument("--verbose", action="store_true", help="show the host's log")
    return p


def _check_inputs(ns: argparse.Namespace) -> tuple[Path, list[Path]]:
    """Workflow file and images, checked before any host starts (a start takes many seconds)."""
    workflow = Path(ns.workflow)
    if not workflow.is_file():
        raise RunnerError(EXIT_BAD_WORKFLOW, f"workflow: {workflow} does not exist")
    try:
        read_workflow(workflow)
    except WorkflowError as e:
        raise RunnerError(EXIT_BAD_WORKFLOW, str(e)) from None
    return workflow, list_images(ns.images)


async def _run_local(ns: argparse.Namespace) -> list[ImageResult]:
    from .batch import run_batch

    workflow, images = _check_inputs(ns)
    comfy_root = find_comfyui(ns.comfyui)
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

    prompt, image_input = prepare_prompt(workflow, nodes.NODE_CLASS_MAPPINGS, nodes.NODE_DISPLAY_NAME_MAPPINGS,
                                         ns.sets, ns.image_node)
    problems = missing_models(prompt, nodes.NODE_CLASS_MAPPINGS)
    if problems:
        raise RunnerError(EXIT_NO_MODEL, "model not found:\n  - " + "\n  - ".join(problems))
    return await run_batch(prompt, image_input, images, Path(ns.out), progress=not ns.no_progress,
                           resume=ns.resume)


async def _run_remote(ns: argparse.Namespace) -> list[ImageResult]:
    for flag, value in (("--models", ns.models), ("--cpu", ns.cpu), ("--comfyui", ns.comfyui)):
        if value:
            raise RunnerError(EXIT_NO_HOST, f"{flag} applies to the in-process run; with --server the "
                                            "servers' own models and devices are used")
    if ns.per_server < 1 or ns.retries < 0 or ns.stall_timeout < 0:
        raise RunnerError(EXIT_NO_HOST, "--per-server must be at least 1, --retries and --stall-timeout at least 0")
    workflow, images = _check_inputs(ns)
    try:
        from .remote import run_remote
    except ModuleNotFoundError as e:
        raise RunnerError(EXIT_NO_HOST, f"--server needs the Python module '{e.name}': "
                                        f"run {Path(sys.executable).name} -m pip install {e.name}") from None
    return await run_remote(workflow, images, Path(ns.out), ns.servers, sets=ns.sets, image_node=ns.image_node,
                            per_server=ns.per_server, attempts=ns.retries + 1, resume=ns.resume,
                            stall_timeout=ns.stall_timeout or None, progress=not ns.no_progress)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m antipure run``; returns the exit code."""
    ns = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if ns.verbose else logging.WARNING, format="%(message)s")
    try:
        results = asyncio.run(_run_remote(ns) if ns.servers else _run_local(ns))
    except RunnerError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    failed = [r for r in results if r.status != "ok"]
    print(f"{len(results) - len(failed)}/{len(results)} images done; results in {Path(ns.out) / 'results.csv'}")
    return EXIT_FAILED if failed else EXIT_OK
