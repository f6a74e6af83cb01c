"""The API prompt before it runs: ``--set`` overrides, the image input, missing models, validation.

Node schemas come as a mapping class type -> class with ``INPUT_TYPES()``: the
host's ``nodes.NODE_CLASS_MAPPINGS`` in-process, or the classes
:func:`antipure.remote.node_classes` builds from a server's ``/object_info``.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping

from .errors import EXIT_BAD_WORKFLOW, EXIT_NO_IMAGES, RunnerError
from .workflow_format import WIDGET_TYPES, WorkflowError, load_prompt

__all__ = ["IMAGE_EXTENSIONS", "title", "apply_sets", "find_image_inputs", "find_node", "missing_models",
           "validate", "list_images", "prepare_prompt", "set_image"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
_UPLOAD_KEYS = ("image_upload", "animated_image_upload")

def title(prompt: Mapping[str, dict], node_id: str) -> str:
    return (prompt[node_id].get("_meta") or {}).get("title") or prompt[node_id]["class_type"]


def _input_specs(node_classes: Mapping[str, Any], class_type: str) -> dict[str, Any]:
    schema = node_classes[class_type].INPUT_TYPES()
    return {**(schema.get("required") or {}), **(schema.get("optional") or {})}


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def find_node(prompt: Mapping[str, dict], ref: str) -> str:
    if ref in prompt:
        return ref
    for key in ("title", "class_type"):
        found = [nid for nid in prompt
                 if (title(prompt, nid) if key == "title" else prompt[nid]["class_type"]) == ref]
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise WorkflowError(f"--set: '{ref}' matches several nodes ({', '.join(found)}); use a node id")
    known = ", ".join(f"{nid} ({title(prompt, nid)})" for nid in prompt)
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
        node_id = find_node(prompt, node_ref)
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
            problems.append(f"node {node_id} ({title(prompt, node_id)}): {name} '{value}' not found{where}; "
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



def prepare_prompt(workflow: Path, node_classes: Mapping[str, Any], display_names: Mapping[str, str] | None,
                   sets: Iterable[str], image_node: str | None) -> tuple[dict, tuple[str, str]]:
    """Load a workflow (UI or API JSON), apply ``--set`` items and find the one image input.

    Returns:
        (API prompt, (node id, input name) that receives each image's file name).

    Raises:
        RunnerError: (exit 3) unreadable or unconvertible workflow, bad ``--set``, no or several
            image inputs (``image_node``, an id or title, picks one).
    """
    try:
        prompt = load_prompt(workflow, node_classes, display_names=display_names)
        apply_sets(prompt, sets, node_classes)
    except WorkflowError as e:
        raise RunnerError(EXIT_BAD_WORKFLOW, f"invalid workflow {workflow}: {e}") from None
    image_inputs = find_image_inputs(prompt, node_classes)
    if image_node:
        try:
            chosen = find_node(prompt, image_node)
        except WorkflowError as e:
            raise RunnerError(EXIT_BAD_WORKFLOW, str(e).replace("--set", "--image-node")) from None
        image_inputs = [x for x in image_inputs if x[0] == chosen]
        if not image_inputs:
            raise RunnerError(EXIT_BAD_WORKFLOW, f"--image-node {image_node}: node {chosen} loads no image file")
    if len(image_inputs) > 1:
        names = ", ".join(f"{nid} ({title(prompt, nid)})" for nid, _ in image_inputs)
        raise RunnerError(EXIT_BAD_WORKFLOW, f"the workflow has several image inputs ({names}); "
                                             "choose one with --image-node")
    if not image_inputs:
        raise RunnerError(EXIT_BAD_WORKFLOW, "the workflow has no image-loading node (e.g. LoadImage) "
                                             "to feed the --images into")
    return prompt, image_inputs[0]


def set_image(prompt: Mapping[str, dict], image_input: tuple[str, str], image_name: str,
              prefix_folder: str) -> dict:
    """A copy of ``prompt`` for one image: the image input set to ``image_name`` and every
    ``filename_prefix`` moved under ``prefix_folder/`` (the per-image output folder)."""
    prompt = json.loads(json.dumps(prompt))
    node_id, name = image_input
    prompt[node_id]["inputs"][name] = image_name
    for node in prompt.values():
        prefix = node["inputs"].get("filename_prefix")
        if isinstance(prefix, str):
            node["inputs"]["filename_prefix"] = f"{prefix_folder}/{prefix}"
    return prompt
