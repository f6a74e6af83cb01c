"""A workflow described as stages and lanes, laid out and written in the host's UI format.

``scripts/build_workflows.py`` says *what* each shipped graph holds; this module
says *where* it goes and how the frontend saves it:

* every :class:`Stage` is a titled group, the stages side by side left to right;
* a node with a ``lane`` sits in that lane's row, so parallel chains (one per
  purifier, one per protection method) line up across the stages;
* a node without a lane stacks in its stage column, above the lanes;
* widget order and defaults come from the host's node schemas, so the JSON is
  what the frontend would save for the same graph.

Units are canvas pixels at zoom 1.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# LiteGraph's palette (LGraphCanvas.node_colors): title bar / body, and the group colour
PALETTE = {
    "blue": ("#223", "#335", "#88A"), "green": ("#232", "#353", "#8A8"), "purple": ("#323", "#535", "#a1309b"),
    "cyan": ("#233", "#355", "#8AA"), "red": ("#322", "#533", "#A88"), "brown": ("#332922", "#593930", "#b06634"),
    "pale_blue": ("#2a363b", "#3f5159", "#3f789e"), "yellow": ("#432", "#653", "#b58b2a"),
}
LANE_COLORS = ("blue", "green", "purple", "cyan", "red", "brown", "pale_blue")
NOTE_TYPES = ("Note", "MarkdownNote")  # frontend-only: no backend schema

TITLE_H = 30            # LiteGraph's node title height
ROW_H = 24              # one socket or widget row
WIDTH = 300             # an expanded node
GAP_X, GAP_Y = 50, 30   # between columns / nodes
STAGE_GAP = 70          # between groups
GROUP_PAD = 24
GROUP_FONT = 64         # group titles still read in a 400-px-wide thumbnail of the whole graph
IMAGE_NODES = {"LoadImage": 300, "SaveImage": 240, "PreviewImage": 240}  # extra height for the picture


@dataclass
class N:
    """One node.

    ``key`` is its title: links name it, and ``python -m antipure run --set TITLE.INPUT=VALUE``
    finds the node by it, so keys are unique and contain no dot. ``inputs`` values are widget
    values, or ``(key, output slot)`` links to another node.
    """

    key: str
    cls: str
    stage: str
    inputs: dict[str, Any] = field(default_factory=dict)
    col: int = 0                 # column inside the stage
    lane: int | None = None      # row of a parallel lane; None: stacked in the column
    collapsed: bool = False      # settings that rarely change: a click on the dot shows them
    color: str | None = None     # PALETTE name
    height: int | None = None    # override the estimated height (notes, text previews)


@dataclass
class Stage:
    title: str
    color: str = "pale_blue"


@dataclass
class Graph:
    stages: list[Stage]
    nodes: list[N]


def _schema(node_classes, cls: str) -> tuple[dict, list[str], list[str]]:
    node_class = node_classes[cls]
    return node_class.INPUT_TYPES(), list(node_class.RETURN_TYPES), list(
        getattr(node_class, "RETURN_NAMES", None) or node_class.RETURN_TYPES)


def _node_json(n: N, node_id: int, ids: dict[str, int], links: list, node_classes) -> dict:
    """The node's UI entry, without position; appends its incoming links to ``links``."""
    from antipure.workflow_format import _spec, _widget_default, _widget_type, widget_slots

    base = {"id": node_id, "type": n.cls, "flags": {"collapsed": True} if n.collapsed else {}, "mode": 0,
            "title": n.key}
    if n.color:
        base["color"], base["bgcolor"] = PALETTE[n.color][:2]
    if n.cls in NOTE_TYPES:
        return {**base, "inputs": [], "outputs": [], "properties": {}, "widgets_values": [n.inputs["text"]]}
    if n.cls == "PrimitiveNode":  # a shared setting; its outputs are filled in by to_ui
        return {**base, "inputs": [], "outputs": [], "properties": {"Run widget replace on values": False},
                "widgets_values": [n.inputs["value"], "fixed"]}
    inputs_spec, out_types, out_names = _schema(node_classes, n.cls)
    specs = {**(inputs_spec.get("required") or {}), **(inputs_spec.get("optional") or {})}
    unknown = set(n.inputs) - set(specs)
    if unknown:
        raise SystemExit(f"{n.key}: {n.cls} has no input(s) {sorted(unknown)}")
    widgets = []
    for name in widget_slots(inputs_spec):
        if name is None:  # control_after_generate / upload button: frontend-only slot
            widgets.append("fixed" if widgets and isinstance(widgets[-1], int) else "image")
            continue
        type_, opts = _spec(specs[name])
        value = n.inputs.get(name, _widget_default(type_, opts))
        widgets.append(None if isinstance(value, tuple) else value)
    sockets = []
    for name, spec in specs.items():
        type_, opts = _spec(spec)
        value = n.inputs.get(name)
        is_widget = _widget_type(type_, opts) is not None and not opts.get("forceInput")
        if is_widget and not isinstance(value, tuple):
            continue
        entry = {"name": name, "type": type_ if isinstance(type_, str) else "COMBO", "link": None}
        if is_widget:
            entry["widget"] = {"name": name}
        if isinstance(value, tuple):
            src_key, slot = value
            entry["link"] = len(links) + 1
            links.append([entry["link"], ids[src_key], slot, node_id, len(sockets), entry["type"]])
        sockets.append(entry)
    rows = max(len(sockets), len(out_types)) + sum(1 for w in widget_slots(inputs_spec) if w is not None)
    return {**base, "inputs": sockets,
            "outputs": [{"name": name, "type": t, "links": [], "slot_index": i}
                        for i, (name, t) in enumerate(zip(out_names, out_types))],
            "properties": {"Node name for S&R": n.cls}, "widgets_values": widgets, "_rows": rows}


def _size(n: N, node: dict, expanded: bool = False) -> tuple[float, float]:
    """Canvas footprint: the frontend draws a collapsed node as a title pill."""
    if n.collapsed and not expanded:
        return 7.5 * len(n.key) + 60, TITLE_H
    if n.height is not None:
        return WIDTH, n.height
    rows = node.get("_rows", len(node["widgets_values"]))
    return WIDTH, TITLE_H + 16 + ROW_H * rows + IMAGE_NODES.get(n.cls, 0)


def _lane_rows(graph: Graph, sizes: list[tuple[float, float]], top: float) -> dict[int, float]:
    """The y of each lane: below the nodes stacked above the lanes, each row as tall as its
    tallest node, spread over the height of the tallest stacked column so no stage is half empty."""
    lane_stages = {n.stage for n in graph.nodes if n.lane is not None}
    header: dict[tuple[str, int], float] = {}
    stacked: dict[tuple[str, int], float] = {}
    lane_h: dict[int, float] = {}
    for n, (_, h) in zip(graph.nodes, sizes):
        if n.lane is not None:
            lane_h[n.lane] = max(lane_h.get(n.lane, 0.0), h)
        else:
            column = header if n.stage in lane_stages else stacked
            column[n.stage, n.col] = column.get((n.stage, n.col), 0.0) + h + GAP_Y
    y = top + max(header.values(), default=0.0)
    natural = sum(h + GAP_Y for h in lane_h.values())
    spare = max(0.0, top + max(stacked.values(), default=0.0) - y - natural) / max(1, len(lane_h))
    rows = {}
    for lane in sorted(lane_h):
        rows[lane], y = y, y + lane_h[lane] + GAP_Y + spare
    return rows


def _place(graph: Graph, sizes: list[tuple[float, float]]) -> tuple[list[list[float]], list[dict], float, float]:
    """Node positions, the stage groups, and the graph's width and height."""
    top = GROUP_FONT * 1.4 + GROUP_PAD + TITLE_H  # a node's title bar is drawn above its pos
    lane_y = _lane_rows(graph, sizes, top)
    pos: list[list[float]] = [[0.0, 0.0] for _ in graph.nodes]
    x, spans, bottom = 0.0, [], top
    for stage in graph.stages:
        members = [i for i, n in enumerate(graph.nodes) if n.stage == stage.title]
        if not members:
            raise SystemExit(f"stage '{stage.title}' has no nodes")
        col_x = x + GROUP_PAD
        for col in sorted({graph.nodes[i].col for i in members}):
            in_col = [i for i in members if graph.nodes[i].col == col]
            stack_y = top
            for i in in_col:
                lane = graph.nodes[i].lane
                if lane is not None:
                    pos[i] = [col_x, lane_y[lane]]
                else:
                    pos[i], stack_y = [col_x, stack_y], stack_y + sizes[i][1] + GAP_Y
                bottom = max(bottom, pos[i][1] + sizes[i][1])
            col_x += max(sizes[i][0] for i in in_col) + GAP_X
        right = max(col_x - GAP_X + GROUP_PAD, x + 0.6 * GROUP_FONT * len(stage.title) + GROUP_PAD)
        spans.append((stage, x, right - x))
        x = right + STAGE_GAP
    height = bottom + GROUP_PAD
    groups = [{"id": k + 1, "title": stage.title, "bounding": [gx, 0, gw, height],
               "color": PALETTE[stage.color][2], "font_size": GROUP_FONT, "flags": {}}
              for k, (stage, gx, gw) in enumerate(spans)]
    return pos, groups, x - STAGE_GAP, height


def to_ui(graph: Graph, node_classes) -> dict:
    """Lay ``graph`` out (stages left to right, lanes aligned) in the host's UI format."""
    ids = {n.key: i + 1 for i, n in enumerate(graph.nodes)}
    if len(ids) != len(graph.nodes):
        raise SystemExit("node keys must be unique (they are the titles --set refers to)")
    links: list[list] = []
    ui = [_node_json(n, ids[n.key], ids, links, node_classes) for n in graph.nodes]
    pos, groups, width, height = _place(graph, [_size(n, node) for n, node in zip(graph.nodes, ui)])

    by_id = {node["id"]: node for node in ui}
    for link in links:  # a shared setting's output takes the type and widget name of what it feeds
        src = by_id[link[1]]
        if src["type"] == "PrimitiveNode" and not src["outputs"]:
            widget = by_id[link[3]]["inputs"][link[4]]["widget"]
            src["outputs"] = [{"name": link[5], "type": link[5], "widget": dict(widget), "links": [],
                               "slot_index": 0}]
    nodes = []
    for k, (n, node) in enumerate(zip(graph.nodes, ui)):
        for out in node["outputs"]:
            out["links"] = [link[0] for link in links if link[1] == node["id"] and link[2] == out["slot_index"]]
        size = list(_size(n, node, expanded=True))  # what the node opens to
        rest = {key: v for key, v in node.items() if key not in ("id", "type", "flags", "_rows")}
        nodes.append({"id": node["id"], "type": node["type"], "pos": pos[k], "size": size, "flags": node["flags"],
                      "order": k, **rest})
    return {"last_node_id": len(ui), "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": groups, "config": {}, "extra": {"ds": _opening_view(width, height)}, "version": 0.4}


def _opening_view(width: float, height: float, screen=(1400, 800), margin=(40, 110)) -> dict:
    """The zoom and offset a template opens with: the whole graph on a laptop screen below the
    frontend's menu and tabs, but no smaller than the zoom at which the frontend still draws text
    (its default: 8-px text, i.e. 14-px titles at zoom 0.58)."""
    scale = round(max(0.6, min(1.0, (screen[0] - margin[0]) / width, (screen[1] - margin[1]) / height)), 3)
    return {"scale": scale, "offset": [round(margin[0] / scale, 1), round(margin[1] / scale, 1)]}
