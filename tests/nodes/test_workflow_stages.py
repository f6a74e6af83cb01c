"""The shipped workflows' wires: none skips a stage.

A stage is a titled group (``scripts/ui_graph.py`` lays them out left to right) and
a node belongs to the group whose bounding box holds its position. A link from
Inputs straight to Evaluate would be drawn across every stage in between; the
build script carries such a signal through each of those stages with a Reroute
instead, so every link joins nodes of the same or of adjacent stages. Reads the
JSON files only: no server.
"""
from __future__ import annotations

import json

import pytest

from tests.nodes.host import PACK_DIR

WORKFLOWS = sorted((PACK_DIR / "example_workflows").glob("*.json"))


def stage_of(ui: dict) -> dict:
    """``{node id: stage index}``, stages numbered left to right; a node in no group or in
    several is an error (the layout puts each node in exactly one)."""
    groups = sorted(ui["groups"], key=lambda g: g["bounding"][0])
    stages = {}
    for node in ui["nodes"]:
        (x, y), inside = node["pos"], []
        for k, group in enumerate(groups):
            gx, gy, gw, gh = group["bounding"]
            if gx <= x <= gx + gw and gy <= y <= gy + gh:
                inside.append(k)
        assert len(inside) == 1, f"node {node['id']} ({node.get('title')}) lies in {len(inside)} stage groups"
        stages[node["id"]] = inside[0]
    return stages


def skipping_links(ui: dict) -> list[str]:
    """Every link whose ends lie more than one stage apart, as 'source -> target (n stages)'."""
    stages = stage_of(ui)
    titles = {n["id"]: n.get("title") or n["type"] for n in ui["nodes"]}
    return [f"{titles[src]} -> {titles[dst]} ({abs(stages[dst] - stages[src])} stages)"
            for _, src, _, dst, *_ in ui["links"] if abs(stages[dst] - stages[src]) > 1]


def test_a_link_across_a_stage_is_found():
    """The check itself: Inputs -> Evaluate past Protect is reported, the carried version is not."""
    groups = [{"title": t, "bounding": [400 * k, 0, 300, 500]} for k, t in enumerate(["Inputs", "Protect", "Evaluate"])]
    nodes = [{"id": 1, "title": "Images", "pos": [10, 100]}, {"id": 2, "title": "Scores", "pos": [810, 100]},
             {"id": 3, "title": "Images via Protect", "type": "Reroute", "pos": [600, 100]}]
    direct = {"nodes": nodes, "groups": groups, "links": [[1, 1, 0, 2, 0, "IMAGE"]]}
    assert skipping_links(direct) == ["Images -> Scores (2 stages)"]
    carried = {"nodes": nodes, "groups": groups, "links": [[1, 1, 0, 3, 0, "IMAGE"], [2, 3, 0, 2, 0, "IMAGE"]]}
    assert skipping_links(carried) == []


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_no_link_skips_a_stage(workflow):
    ui = json.loads(workflow.read_text(encoding="utf-8"))
    assert len(ui["groups"]) >= 3
    skipping = skipping_links(ui)
    assert not skipping, (f"{workflow.name}: {len(skipping)} link(s) cross a whole stage (carry them with a "
                          "Reroute per stage: scripts/ui_graph.py carry_links):\n" + "\n".join(skipping))


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_every_reroute_carries_a_signal_one_stage(workflow):
    """A Reroute has its input linked and feeds something in its own stage's right neighbour or itself
    (a dangling one would be clutter, a backwards one a loop)."""
    ui = json.loads(workflow.read_text(encoding="utf-8"))
    stages = stage_of(ui)
    for node in ui["nodes"]:
        if node["type"] != "Reroute":
            continue
        assert node["inputs"][0]["link"] is not None, node["title"]
        targets = [dst for _, src, _, dst, *_ in ui["links"] if src == node["id"]]
        assert targets and all(stages[t] - stages[node["id"]] in (0, 1) for t in targets), node["title"]
