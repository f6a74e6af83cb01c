"""A workflow described as stages and lanes, laid out and written in the host's UI format.

``scripts/build_workflows.py`` says *what* each shipped graph holds; this module
says *where* it goes and how the frontend saves it:

* every :class:`Stage` is a titled group, the stages side by side left to right;
* a node with a ``lane`` sits in that lane's row, so parallel chains (one per
  purifier, one per protection method) line up across the stages;
* a node without a lane stacks in its stage column, above the lanes;
* a link never skips a stage: a signal needed further right (the checkpoint's
  MODEL in Customize, the clean images in Evaluate) is carried through every
  stage in between by a Reroute at that stage's right edge, on its lane's row
  when one lane alone uses it, else in a band along the top, one row per signal;
* widget order and defaults come from the host's node schemas, so the JSON is
  what the frontend would save for the same graph.

Units are canvas pixels at zoom 1.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

# LiteGraph's palette (LGraphCanvas.node_colors): title bar / body, and the group colour
PALETTE = {
    "blue": ("#223", "#335", "#88A"), "green": ("#232", "#353", "#8A8"), "purple": ("#323", "#535", "#a1309b"),
    "cyan": ("#233", "#355", "#8AA"), "red": ("#322", "#533", "#A88"), "brown": ("#332922", "#593930", "#b06634"),
    "pale_blue": ("#2a363b", "#3f5159", "#3f789e"), "yellow": ("#432", "#653", "#b58b2a"),
}
LANE_COLORS = ("blue", "green", "purple", "cyan", "red", "brown", "pale_blue")
NOTE_TYPES = ("Note", "MarkdownNote")  # frontend-only: no backend schema
REROUTE = "Reroute"  # the frontend's pass-through node: no backend schema, the frontend and the runner follow it

TITLE_H = 30            # LiteGraph's node title height
ROW_H = 24              # one socket or widget row
WIDTH = 300             # an expanded node
GAP_X, GAP_Y = 50, 30   # between columns / nodes
STAGE_GAP = 70          # between groups
GROUP_PAD = 24
GROUP_FONT = 64         # group titles still read in a 400-px-wide thumbnail of the whole graph
IMAGE_NODES = {"LoadImage": 300, "SaveImage": 240, "PreviewImage": 240}  # extra height for the picture
REROUTE_W, REROUTE_H = 75, 26   # the frontend's Reroute node
BUS_ROW = REROUTE_H + 16        # one carried signal in the band along the top
LANE_DY = TITLE_H + 16          # a carried lane signal: just below the lane's collapsed nodes


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
    bus: int | None = None       # a Reroute's row in the band along the top (set by carry_links)


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


def _node_json(n: N, node_id: int, ids: dict[str, int], links: list, node_classes,
               reroute_types: dict[str, str]) -> dict:
    """The node's UI entry, without position; appends its incoming links to ``links``."""
    from antipure.workflow_format import _spec, _widget_default, _widget_type, widget_slots

    base = {"id": node_id, "type": n.cls, "flags": {"collapsed": True} if n.collapsed else {}, "mode": 0,
            "title": n.key}
    if n.color:
        base["color"], base["bgcolor"] = PALETTE[n.color][:2]
    if n.cls in NOTE_TYPES:
        return {**base, "inputs": [], "outputs": [], "properties": {}, "widgets_values": [n.inputs["text"]]}
    if n.cls == REROUTE:  # carries one output: its type is the source's, its input and output unnamed
        (src_key, slot), = n.inputs.values()
        type_ = reroute_types[n.key]
        link = len(links) + 1
        links.append([link, ids[src_key], slot, node_id, 0, type_])
        return {**base, "inputs": [{"name": "", "type": "*", "link": link}],
                "outputs": [{"name": "", "type": type_, "links": [], "slot_index": 0}],
                "properties": {"showOutputText": False, "horizontal": False}}
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
    if n.cls == REROUTE:
        return REROUTE_W, REROUTE_H
    if n.collapsed and not expanded:
        return 7.5 * len(n.key) + 60, TITLE_H
    if n.height is not None:
        return WIDTH, n.height
    rows = node.get("_rows", len(node.get("widgets_values") or []))
    return WIDTH, TITLE_H + 16 + ROW_H * rows + IMAGE_NODES.get(n.cls, 0)


def carry_links(graph: Graph, node_classes) -> Graph:
    """``graph`` with a Reroute in every stage a link would skip, so each link joins nodes in the
    same or adjacent stages: a long wire then runs along a lane's row or the band at the top
    instead of across the nodes of the stages in between.

    A consumer in the next stage keeps its direct link; one in stage j takes the signal from the
    Reroute in stage j - 1. The Reroutes of one signal sit on its lane's row when a single lane
    uses it further right, else on one row of the band (rows in source order). The input graph
    is not changed; the Reroutes come after its nodes, so its nodes keep their ids.
    """
    order = {stage.title: k for k, stage in enumerate(graph.stages)}
    nodes = [replace(n, inputs=dict(n.inputs)) for n in graph.nodes]
    by_key = {n.key: n for n in nodes}
    uses: dict[tuple[str, int], list[tuple[N, str]]] = {}
    for n in nodes:
        for name, value in n.inputs.items():
            if isinstance(value, tuple):
                uses.setdefault(value, []).append((n, name))
    position = {n.key: i for i, n in enumerate(nodes)}
    carriers, bus = [], 0
    for (src, slot) in sorted(uses, key=lambda s: (position[s[0]], s[1])):
        first = order[by_key[src].stage]
        far = [(n, name) for n, name in uses[src, slot] if order[n.stage] > first + 1]
        if not far:
            continue
        if by_key[src].cls not in node_classes:
            raise SystemExit(f"{src}: a {by_key[src].cls} cannot feed a node two stages away")
        lanes = {n.lane for n, _ in far}
        lane = lanes.pop() if len(lanes) == 1 else None
        row = None if lane is not None else bus
        bus += row is not None
        out_name = _schema(node_classes, by_key[src].cls)[2][slot]
        via, previous = {}, (src, slot)
        for k in range(first + 1, max(order[n.stage] for n, _ in far)):
            stage = graph.stages[k].title
            via[k] = N(f"{src} {out_name} via {stage}", REROUTE, stage, {"input": previous}, lane=lane, bus=row)
            previous = (via[k].key, 0)
        carriers += via.values()
        for n, name in far:
            n.inputs[name] = (via[order[n.stage] - 1].key, 0)
    return Graph(graph.stages, nodes + carriers)


def _reroute_types(graph: Graph, node_classes) -> dict[str, str]:
    """Each Reroute's type: the type of the output it carries."""
    by_key = {n.key: n for n in graph.nodes}
    types = {}
    for n in graph.nodes:
        if n.cls == REROUTE:
            src, slot = n.inputs["input"]
            while by_key[src].cls == REROUTE:
                src, slot = by_key[src].inputs["input"]
            types[n.key] = _schema(node_classes, by_key[src].cls)[1][slot]
    return types


def _lane_rows(graph: Graph, sizes: list[tuple[float, float]], starts: dict[str, float]) -> dict[int, float]:
    """The y of each lane: below the nodes stacked above the lanes, each row as tall as its
    tallest node, spread over the height of the tallest stacked column so no stage is half empty.
    ``starts``: the y where each stage's stacked nodes begin (below the band of carried signals)."""
    lane_stages = {n.stage for n in graph.nodes if n.lane is not None and n.cls != REROUTE}
    header: dict[tuple[str, int], float] = {}
    stacked: dict[tuple[str, int], float] = {}
    lane_h: dict[int, float] = {}
    for n, (_, h) in zip(graph.nodes, sizes):
        if n.bus is not None:
            continue
        if n.lane is not None:
            lane_h[n.lane] = max(lane_h.get(n.lane, 0.0), h + (LANE_DY if n.cls == REROUTE else 0.0))
        else:
            column = header if n.stage in lane_stages else stacked
            column[n.stage, n.col] = column.get((n.stage, n.col), starts[n.stage]) + h + GAP_Y
    y = max([starts[s] for s in lane_stages] + list(header.values()), default=min(starts.values()))
    natural = sum(h + GAP_Y for h in lane_h.values())
    spare = max(0.0, max(stacked.values(), default=y) - y - natural) / max(1, len(lane_h))
    rows = {}
    for lane in sorted(lane_h):
        rows[lane], y = y, y + lane_h[lane] + GAP_Y + spare
    return rows


def _place(graph: Graph, sizes: list[tuple[float, float]]) -> tuple[list[list[float]], list[dict], float, float]:
    """Node positions, the stage groups, and the graph's width and height."""
    top = GROUP_FONT * 1.4 + GROUP_PAD + TITLE_H  # a node's title bar is drawn above its pos
    band = max((n.bus + 1 for n in graph.nodes if n.bus is not None), default=0) * BUS_ROW
    bused = {n.stage for n in graph.nodes if n.bus is not None}
    starts = {stage.title: top + (band if stage.title in bused else 0.0) for stage in graph.stages}
    lane_y = _lane_rows(graph, sizes, starts)
    pos: list[list[float]] = [[0.0, 0.0] for _ in graph.nodes]
    x, spans, bottom = 0.0, [], top
    for stage in graph.stages:
        members = [i for i, n in enumerate(graph.nodes) if n.stage == stage.title]
        if not members:
            raise SystemExit(f"stage '{stage.title}' has no nodes")
        nodes = [i for i in members if graph.nodes[i].cls != REROUTE]
        col_x = x + GROUP_PAD
        for col in sorted({graph.nodes[i].col for i in nodes}):
            in_col = [i for i in nodes if graph.nodes[i].col == col]
            stack_y = starts[stage.title]
            for i in in_col:
                lane = graph.nodes[i].lane
                if lane is not None:
                    pos[i] = [col_x, lane_y[lane]]
                else:
                    pos[i], stack_y = [col_x, stack_y], stack_y + sizes[i][1] + GAP_Y
                bottom = max(bottom, pos[i][1] + sizes[i][1])
            col_x += max(sizes[i][0] for i in in_col) + GAP_X
        carriers = [i for i in members if graph.nodes[i].cls == REROUTE]
        for i in carriers:  # the stage's last column: a carried signal passes the stage's nodes
            n = graph.nodes[i]
            pos[i] = [col_x, top + n.bus * BUS_ROW if n.bus is not None else lane_y[n.lane] + LANE_DY]
            bottom = max(bottom, pos[i][1] + sizes[i][1])
        if carriers:
            col_x += REROUTE_W + GAP_X
        right = max(col_x - GAP_X + GROUP_PAD, x + 0.6 * GROUP_FONT * len(stage.title) + GROUP_PAD)
        spans.append((stage, x, right - x))
        x = right + STAGE_GAP
    height = bottom + GROUP_PAD
    groups = [{"id": k + 1, "title": stage.title, "bounding": [gx, 0, gw, height],
               "color": PALETTE[stage.color][2], "font_size": GROUP_FONT, "flags": {}}
              for k, (stage, gx, gw) in enumerate(spans)]
    return pos, groups, x - STAGE_GAP, height


def to_ui(graph: Graph, node_classes) -> dict:
    """Lay ``graph`` out (stages left to right, lanes aligned, long links carried by Reroutes)
    in the host's UI format."""
    graph = carry_links(graph, node_classes)
    ids = {n.key: i + 1 for i, n in enumerate(graph.nodes)}
    if len(ids) != len(graph.nodes):
        raise SystemExit("node keys must be unique (they are the titles --set refers to)")
    links: list[list] = []
    reroute_types = _reroute_types(graph, node_classes)
    ui = [_node_json(n, ids[n.key], ids, links, node_classes, reroute_types) for n in graph.nodes]
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
