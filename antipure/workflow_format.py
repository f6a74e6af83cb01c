"""UI-format workflow JSON -> API prompt, the conversion the host's web frontend does.

ComfyUI ships no Python converter: the frontend's ``graphToPrompt`` turns the
saved graph (``nodes`` with ``widgets_values``, a ``links`` table, virtual
nodes, bypass/mute modes, subgraphs) into ``{id: {"class_type", "inputs"}}``.
This module re-implements that mapping from the node schemas the host exposes
(``INPUT_TYPES()``, which V3 ``io.ComfyNode`` classes provide as well), so a
workflow saved from the UI can be validated and executed headless.

The module imports nothing from the host at import time; pass the host's
``nodes.NODE_CLASS_MAPPINGS`` (the default when the host is importable).

Example:
    >>> import json, nodes  # the host's nodes.py
    >>> prompt = ui_to_api(json.load(open("workflow.json")), nodes.NODE_CLASS_MAPPINGS)
    >>> prompt["3"]["class_type"], prompt["3"]["inputs"]["seed"]
    ('KSampler', 156680208700286)
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any, Mapping

__all__ = [
    "MODE_ALWAYS",
    "MODE_NEVER",
    "MODE_BYPASS",
    "VIRTUAL_NODE_TYPES",
    "WorkflowError",
    "is_api_prompt",
    "is_ui_workflow",
    "load_prompt",
    "process_dynamic_prompt",
    "read_workflow",
    "ui_to_api",
    "widget_slots",
]

MODE_ALWAYS, MODE_NEVER, MODE_BYPASS = 0, 2, 4  # LiteGraph node modes ("muted" is NEVER)

# Frontend-only nodes: never sent to the backend.
VIRTUAL_NODE_TYPES = frozenset({"Reroute", "PrimitiveNode", "Note", "MarkdownNote"})

# Input types for which the frontend creates a widget (core widget registry).
WIDGET_TYPES = frozenset({
    "INT", "FLOAT", "BOOLEAN", "STRING", "COMBO", "MARKDOWN", "IMAGEUPLOAD", "FILEUPLOAD",
    "COLOR", "IMAGECOMPARE", "TREESELECT", "MULTISELECT", "CHART", "GALLERIA", "SELECTBUTTON",
    "TEXTAREA",
})

_SUBGRAPH_INPUT_NODE, _SUBGRAPH_OUTPUT_NODE = -10, -20


class WorkflowError(ValueError):
    """A workflow that cannot be converted; ``problems`` lists every issue found."""

    def __init__(self, message: str, problems: list[str] | None = None):
        self.problems = problems or [message]
        super().__init__(message if problems is None else message + "\n  - " + "\n  - ".join(problems))


def is_api_prompt(data: Any) -> bool:
    """True for an API prompt: a dict of node id -> ``{"class_type", "inputs"}``."""
    return (isinstance(data, dict) and len(data) > 0
            and all(isinstance(v, dict) and "class_type" in v for v in data.values()))


def is_ui_workflow(data: Any) -> bool:
    """True for the UI format saved by the frontend (``nodes`` list and ``links`` table)."""
    return isinstance(data, dict) and isinstance(data.get("nodes"), list) and "links" in data


def _spec(spec: Any) -> tuple[Any, dict]:
    if not isinstance(spec, (list, tuple)) or not spec:
        return spec, {}
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return spec[0], opts


def _widget_type(type_: Any, opts: dict) -> str | None:
    if isinstance(type_, (list, tuple)):
        return "COMBO"  # legacy combo: the type is the list of choices
    wt = opts.get("widgetType") or type_
    return wt if isinstance(wt, str) and wt in WIDGET_TYPES else None


def widget_slots(input_types: Mapping[str, Mapping[str, Any]], legacy_force_input: bool = False) -> list[str | None]:
    """Names of the frontend's widgets for a node schema, in ``widgets_values`` order.

    ``None`` marks a slot whose value is not an input: the ``control_after_generate``
    combo after a seed-like INT (explicit option, or an INT named ``seed``/``noise_seed``),
    the control + filter-list pair after a COMBO with ``control_after_generate``, and the
    upload button the frontend appends to ``required`` for ``image_upload`` (and
    video/animated/audio upload) inputs.

    Args:
        input_types: ``INPUT_TYPES()`` of a node class (``required``/``optional`` dicts).
        legacy_force_input: the layout frontends before 1.16 saved, where a ``forceInput``
            widget-type input still kept a (dummy) value.

    Returns:
        One entry per element of the node's ``widgets_values`` list.
    """
    slots: list[str | None] = []
    for section in ("required", "optional"):
        upload = False
        for name, spec in (input_types.get(section) or {}).items():
            type_, opts = _spec(spec)
            wt = _widget_type(type_, opts)
            if wt is None:
                continue
            if opts.get("forceInput") or (section == "optional" and opts.get("defaultInput")):
                if legacy_force_input:
                    slots.append(None)
                continue  # socket only, no widget
            slots.append(name)
            cag = opts.get("control_after_generate")
            if wt == "INT" and (cag if cag is not None else name in ("seed", "noise_seed")):
                slots.append(None)
            elif wt == "COMBO" and cag:
                slots.extend([None, None])
            if wt == "COMBO" and any(opts.get(k) is True for k in
                                     ("image_upload", "video_upload", "animated_image_upload")):
                upload = True
            if opts.get("audio_upload") is True and name == "audio":
                upload = True
        if section == "required" and upload:
            slots.append(None)
    return slots


def _widget_default(type_: Any, opts: dict) -> Any:
    """The value a fresh frontend widget starts with."""
    if "default" in opts:
        return opts["default"]
    wt = _widget_type(type_, opts)
    if wt == "COMBO":
        choices = type_ if isinstance(type_, (list, tuple)) else opts.get("options") or []
        return choices[0] if choices else None
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(wt)


def process_dynamic_prompt(text: str, rng: random.Random) -> str:
    """Resolve ``{a|b|c}`` choices and strip ``//`` and ``/* */`` comments, like the frontend.

    The frontend does this when queueing any STRING widget with ``dynamicPrompts``
    (e.g. CLIPTextEncode's text); choices are drawn from ``rng`` so runs repeat.
    ``\\{``, ``\\}`` and ``\\|`` are literal.
    """
    text = re.sub(r"/\*[\s\S]*?\*/|//.*", "", text)

    def parse(s: str) -> str:
        out, i = [], 0
        while i < len(s):
            c = s[i]
            if c == "\\" and i + 1 < len(s):
                out.append(s[i:i + 2])
                i += 2
            elif c == "{":
                options, cur, depth, i = [], [], 0, i + 1
                while i < len(s):
                    c = s[i]
                    i += 1
                    if c == "\\" and i < len(s):
                        cur.append("\\" + s[i])
                        i += 1
                        continue
                    if c == "{":
                        depth += 1
                    elif c == "}":
                        if depth == 0:
                            break
                        depth -= 1
                    elif c == "|" and depth == 0:
                        options.append("".join(cur))
                        cur = []
                        continue
                    cur.append(c)
                options.append("".join(cur))
                out.append(parse(rng.choice(options)))
            else:
                out.append(c)
                i += 1
        return "".join(out)

    return re.sub(r"\\([{}|])", r"\1", parse(text))


def _types_compatible(a: Any, b: Any) -> bool:
    """LiteGraph's ``isValidConnection``: wildcards, or a shared comma-separated type."""
    if a in (None, "", "*", 0) or b in (None, "", "*", 0):
        return True
    a, b = str(a).lower(), str(b).lower()
    return a == b or bool(set(a.split(",")) & set(b.split(",")))


def _norm_links(links: Any) -> dict[Any, tuple[Any, int, Any, int, Any]]:
    out = {}
    for link in links or []:
        if isinstance(link, dict):  # schema 1.0 objects
            out[link["id"]] = (link["origin_id"], int(link["origin_slot"]), link["target_id"],
                               int(link["target_slot"]), link.get("type"))
        elif isinstance(link, (list, tuple)) and len(link) >= 5:
            out[link[0]] = (link[1], int(link[2]), link[3], int(link[4]), link[5] if len(link) > 5 else None)
    return out


class _Scope:
    """One graph level: the root graph, or a subgraph instance inside its parent."""

    def __init__(self, graph: dict, path: tuple, parent: "_Scope | None" = None, instance: dict | None = None):
        self.nodes = {str(n["id"]): n for n in graph.get("nodes") or []}
        self.links = _norm_links(graph.get("links"))
        self.path, self.parent, self.instance = path, parent, instance

    def exec_id(self, node_id: Any) -> str:
        return ":".join(str(p) for p in (*self.path, node_id))


class _Converter:
    def __init__(self, workflow: dict, node_classes: Mapping[str, Any], rng: random.Random,
                 display_names: Mapping[str, str]):
        self.node_classes, self.rng, self.display_names = node_classes, rng, display_names
        defs = (workflow.get("definitions") or {}).get("subgraphs") or []
        self.subgraphs = {s["id"]: s for s in defs if isinstance(s, dict) and "id" in s}
        self.problems: list[str] = []
        self.schemas: dict[str, dict] = {}
        self.root = _Scope(workflow, ())
        if (workflow.get("extra") or {}).get("groupNodes"):
            self.problems.append("legacy group nodes (extra.groupNodes) are not supported; open the "
                                 "workflow in the ComfyUI frontend and convert them to subgraphs")

    # --- link resolution (mirrors the frontend's ExecutableNodeDTO) ------------------------
    def resolve_input(self, scope: _Scope, node: dict, slot: int, want: Any, seen: set):
        key = (scope.path, str(node["id"]), "I", slot)
        if key in seen:
            raise WorkflowError(f"circular link at input {slot} of node {node['id']}")
        seen.add(key)
        inputs = node.get("inputs") or []
        if slot >= len(inputs) or inputs[slot].get("link") is None:
            return None
        link = scope.links.get(inputs[slot]["link"])
        if link is None:
            self.problems.append(f"node {scope.exec_id(node['id'])} input '{inputs[slot].get('name')}' "
                                 f"refers to missing link {inputs[slot]['link']}")
            return None
        origin_id, origin_slot = link[0], link[1]
        want = want if want is not None else inputs[slot].get("type")
        if scope.instance is not None and origin_id == _SUBGRAPH_INPUT_NODE:
            # the link enters the subgraph: continue at the instance's input in the parent graph
            inst = scope.instance
            inst_inputs = inst.get("inputs") or []
            if origin_slot >= len(inst_inputs):
                return None
            if inst_inputs[origin_slot].get("link") is None:
                return self._promoted_widget_value(inst, origin_slot)
            return self.resolve_input(scope.parent, inst, origin_slot, want, seen)
        origin = scope.nodes.get(str(origin_id))
        if origin is None:
            self.problems.append(f"node {scope.exec_id(node['id'])} input '{inputs[slot].get('name')}' "
                                 f"is linked to missing node {origin_id}")
            return None
        return self.resolve_output(scope, origin, origin_slot, want, seen)

    def resolve_output(self, scope: _Scope, node: dict, slot: int, want: Any, seen: set):
        key = (scope.path, str(node["id"]), "O", slot)
        if key in seen:
            raise WorkflowError(f"circular link at output {slot} of node {node['id']}")
        seen.add(key)
        if node.get("mode", MODE_ALWAYS) == MODE_BYPASS:
            idx = self._bypass_slot(node, slot, want)
            return None if idx < 0 else self.resolve_input(scope, node, idx, want, seen)
        ntype = node.get("type")
        if ntype in self.subgraphs:
            inner = self.enter(scope, node)
            for link in inner.links.values():
                if link[2] == _SUBGRAPH_OUTPUT_NODE and link[3] == slot:
                    if link[0] == _SUBGRAPH_INPUT_NODE:  # wired straight through
                        return self.resolve_input(scope, node, link[1], want, seen)
                    origin = inner.nodes.get(str(link[0]))
                    return None if origin is None else self.resolve_output(inner, origin, link[1], want, seen)
            return None
        if ntype == "PrimitiveNode":
            values = node.get("widgets_values") or []
            return ("value", values[0]) if values else None
        if ntype in VIRTUAL_NODE_TYPES:  # Reroute: same-index input; notes: nothing
            return self.resolve_input(scope, node, slot, want, seen) if slot < len(node.get("inputs") or []) else None
        return ("link", scope.exec_id(node["id"]), slot)

    @staticmethod
    def _bypass_slot(node: dict, slot: int, want: Any) -> int:
        inputs = node.get("inputs") or []
        outputs = node.get("outputs") or []
        out_type = outputs[slot].get("type") if slot < len(outputs) else None
        if want in ("*", "", None):
            return slot if len(inputs) > slot else (0 if inputs else -1)
        if (slot < len(inputs) and _types_compatible(inputs[slot].get("type"), out_type)
                and _types_compatible(inputs[slot].get("type"), want)):
            return slot
        for i, inp in enumerate(inputs):
            if inp.get("type") == want:
                return i
        for i, inp in enumerate(inputs):
            if _types_compatible(inp.get("type"), out_type) and _types_compatible(inp.get("type"), want):
                return i
        return -1

    def _promoted_widget_value(self, inst: dict, slot: int):
        """An unconnected subgraph input backed by a widget on the subgraph node."""
        values = inst.get("widgets_values")
        if not isinstance(values, list):
            return None
        widget_inputs = [i for i, inp in enumerate(inst.get("inputs") or []) if inp.get("widget")]
        if slot in widget_inputs and widget_inputs.index(slot) < len(values):
            return ("value", values[widget_inputs.index(slot)])
        return None

    def enter(self, scope: _Scope, inst: dict) -> _Scope:
        if len(scope.path) > 32:
            raise WorkflowError("subgraphs nested more than 32 levels (recursive definition?)")
        return _Scope(self.subgraphs[inst["type"]], (*scope.path, inst["id"]), scope, inst)

    # --- nodes -----------------------------------------------------------------------------
    def schema(self, class_type: str) -> dict:
        if class_type not in self.schemas:
            self.schemas[class_type] = self.node_classes[class_type].INPUT_TYPES()
        return self.schemas[class_type]

    def widget_values(self, node: dict, class_type: str) -> dict[str, Any]:
        values = node.get("widgets_values")
        schema = self.schema(class_type)
        if isinstance(values, dict):  # some custom nodes save widgets by name
            names = {n for n in widget_slots(schema) if n}
            return {k: v for k, v in values.items() if k in names}
        values = list(values or [])
        slots = widget_slots(schema)
        legacy = widget_slots(schema, legacy_force_input=True)
        if len(values) == len(legacy) != len(slots):
            slots = legacy
        out = {}
        for name, value in zip(slots, values):
            if name is not None:
                out[name] = value
        # widgets missing from an older save keep the value the frontend creates them with
        specs = {**(schema.get("required") or {}), **(schema.get("optional") or {})}
        for name in slots[len(values):]:
            if name is not None and name not in out:
                default = _widget_default(*_spec(specs[name]))
                if default is not None:
                    out[name] = default
        return out

    def convert_node(self, scope: _Scope, node: dict, out: dict) -> None:
        class_type = node.get("type")
        exec_id = scope.exec_id(node["id"])
        if class_type not in self.node_classes:
            self.problems.append(f"node {exec_id}: unknown node type '{class_type}' "
                                 "(is the custom node pack that provides it installed and loaded?)")
            return
        schema = self.schema(class_type)
        all_specs = {**(schema.get("required") or {}), **(schema.get("optional") or {})}
        inputs: dict[str, Any] = {}
        for name, value in self.widget_values(node, class_type).items():
            type_, opts = _spec(all_specs.get(name))
            if isinstance(value, str) and opts.get("dynamicPrompts"):
                value = process_dynamic_prompt(value, self.rng)
            inputs[name] = {"__value__": value} if isinstance(value, list) else value
        for i, inp in enumerate(node.get("inputs") or []):
            name = inp.get("name")
            if name is None:
                continue
            resolved = self.resolve_input(scope, node, i, None, set())
            if resolved is None:
                continue
            if resolved[0] == "value":
                value = resolved[1]
                inputs[name] = {"__value__": value} if isinstance(value, list) else value
            else:
                inputs[name] = [resolved[1], resolved[2]]
        entry = {"class_type": class_type, "inputs": inputs}
        title = node.get("title") or self.display_names.get(class_type) or class_type
        entry["_meta"] = {"title": title}
        out[exec_id] = entry

    def convert_scope(self, scope: _Scope, out: dict) -> None:
        for node in scope.nodes.values():
            ntype, mode = node.get("type"), node.get("mode", MODE_ALWAYS)
            if ntype in VIRTUAL_NODE_TYPES or mode in (MODE_NEVER, MODE_BYPASS):
                continue
            if isinstance(ntype, str) and (ntype.startswith("workflow>") or ntype.startswith("workflow/")):
                self.problems.append(f"node {scope.exec_id(node['id'])}: legacy group node '{ntype}' is not "
                                     "supported; convert it to a subgraph in the ComfyUI frontend")
                continue
            if ntype in self.subgraphs:
                self.convert_scope(self.enter(scope, node), out)
                continue
            self.convert_node(scope, node, out)


def ui_to_api(workflow: dict, node_classes: Mapping[str, Any] | None = None,
              rng: random.Random | None = None, display_names: Mapping[str, str] | None = None) -> dict[str, dict]:
    """Convert a UI-format workflow into an API prompt, as the frontend does when queueing.

    Widget values are mapped to input names in schema order (``required`` then
    ``optional``), skipping the frontend-only slots listed by :func:`widget_slots`;
    a linked input overrides its widget. Reroutes are followed, a PrimitiveNode gives its
    value to the widgets it feeds, a bypassed node (mode 4) passes the input of the
    matching type through, a muted node (mode 2) is dropped together with the links that
    leave it, notes are ignored, and subgraphs are flattened to ``"outer:inner"`` ids.
    Seeds are sent as saved (``control_after_generate`` acts after queueing).

    Args:
        workflow: the parsed UI-format JSON (``nodes``, ``links``; optional ``definitions``).
        node_classes: class_type -> node class with ``INPUT_TYPES()``; default: the host's
            ``nodes.NODE_CLASS_MAPPINGS`` (the host must be importable and booted).
        rng: draws the ``{a|b}`` dynamic-prompt choices; default ``random.Random(0)``.
        display_names: class_type -> display name, the title of a node the user did not rename;
            default: the host's ``nodes.NODE_DISPLAY_NAME_MAPPINGS`` when ``node_classes`` is
            the default too, else the class type.

    Returns:
        ``{node_id: {"class_type": str, "inputs": dict, "_meta": {"title": str}}}``.

    Raises:
        WorkflowError: not a UI workflow, unknown node types, broken links, group nodes.
    """
    if not is_ui_workflow(workflow):
        raise WorkflowError("workflow: expected the UI format (a JSON object with 'nodes' and 'links'); "
                            "save it from the ComfyUI menu with Workflow > Save")
    if node_classes is None:
        import nodes  # the host's nodes.py (the host is booted: antipure.comfyui.boot_host)

        node_classes = nodes.NODE_CLASS_MAPPINGS
        display_names = nodes.NODE_DISPLAY_NAME_MAPPINGS if display_names is None else display_names
    conv = _Converter(workflow, node_classes, rng or random.Random(0), display_names or {})
    out: dict[str, dict] = {}
    conv.convert_scope(conv.root, out)
    if conv.problems:
        raise WorkflowError(f"workflow has {len(conv.problems)} problem(s):", conv.problems)
    # links that end at a dropped (muted) node are removed, as the frontend does
    for entry in out.values():
        for name, value in list(entry["inputs"].items()):
            if isinstance(value, list) and len(value) == 2 and value[0] not in out:
                del entry["inputs"][name]
    return out


def read_workflow(source: str | Path) -> dict:
    """A workflow file's JSON, checked to be the UI format or an API prompt; needs no host, so a
    broken file is reported before the host starts.

    Raises:
        WorkflowError: unreadable JSON or neither format.
    """
    try:
        data = json.loads(Path(source).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WorkflowError(f"workflow: cannot read {source}: {e}") from None
    if not (is_ui_workflow(data) or is_api_prompt(data)):
        raise WorkflowError(f"workflow: {source} is neither the UI format ('nodes' + 'links') nor an API prompt "
                            "({id: {'class_type', 'inputs'}}); save it from the ComfyUI menu (Workflow → Save "
                            "or Export (API))")
    return data


def load_prompt(source: str | Path | dict, node_classes: Mapping[str, Any] | None = None,
                rng: random.Random | None = None, display_names: Mapping[str, str] | None = None) -> dict[str, dict]:
    """Read a workflow file (UI or API format) or dict and return an API prompt.

    Raises:
        WorkflowError: unreadable JSON or neither format.
    """
    data = source if isinstance(source, dict) else read_workflow(source)
    if is_ui_workflow(data):
        return ui_to_api(data, node_classes, rng, display_names)
    if is_api_prompt(data):
        return {str(k): dict(v) for k, v in data.items()}
    raise WorkflowError("workflow: neither the UI format ('nodes' + 'links') nor an API prompt "
                        "({id: {'class_type', 'inputs'}})")
