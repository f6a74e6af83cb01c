"""Workflow tools: UI -> API conversion, the headless runner, preview screenshots.

Built on the host's own nodes (LoadImage, ImageScale, ImageInvert, SaveImage,
KSampler ...) so the tools are tested independently of the pack's nodes.
"""
from __future__ import annotations

import asyncio
import contextlib
import csv
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import execution
import folder_paths
import nodes

from antipure import cli, comfyui, errors, prompts, workflow_format as wf
from tests.nodes.host import PACK_DIR

# --- a small builder for UI-format workflows ------------------------------------------------


class UIGraph:
    """Builds the JSON the frontend saves: ``nodes`` with ``widgets_values`` and a ``links`` table."""

    def __init__(self):
        self.nodes: list[dict] = []
        self.links: list[list] = []

    def node(self, type_, widgets=None, inputs=(), outputs=(), mode=0, title=None, widget_inputs=()):
        n = {"id": len(self.nodes) + 1, "type": type_, "pos": [320 * len(self.nodes), 80], "size": [280, 120],
             "flags": {}, "order": len(self.nodes), "mode": mode, "properties": {},
             "inputs": [{"name": name, "type": t, "link": None} for name, t in inputs]
             + [{"name": name, "type": t, "link": None, "widget": {"name": name}} for name, t in widget_inputs],
             "outputs": [{"name": t, "type": t, "links": []} for t in outputs]}
        if widgets is not None:
            n["widgets_values"] = list(widgets)
        if title:
            n["title"] = title
        self.nodes.append(n)
        return n

    def link(self, src, src_slot, dst, dst_input):
        idx = next(i for i, inp in enumerate(dst["inputs"]) if inp["name"] == dst_input)
        link_id = len(self.links) + 1
        self.links.append([link_id, src["id"], src_slot, dst["id"], idx, src["outputs"][src_slot]["type"]])
        src["outputs"][src_slot]["links"].append(link_id)
        dst["inputs"][idx]["link"] = link_id

    def wire(self, *edges):
        """``link`` for each ``(src, src_slot, dst, dst_input)``."""
        for edge in edges:
            self.link(*edge)

    def json(self):
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": [], "config": {}, "extra": {}, "version": 0.4}


def invert_workflow(prefix="inv"):
    """LoadImage -> ImageScale ("Scale") -> ImageInvert -> SaveImage, plus two text outputs:
    the input width (GetImageSize -> PreviewAny "Width") and a V3 StringConcatenate ("Label")."""
    g = UIGraph()
    load = g.node("LoadImage", ["example.png", "image"], outputs=["IMAGE", "MASK"])
    scale = g.node("ImageScale", ["nearest-exact", 32, 24, "disabled"], inputs=[("image", "IMAGE")],
                   outputs=["IMAGE"], title="Scale")
    inv = g.node("ImageInvert", inputs=[("image", "IMAGE")], outputs=["IMAGE"])
    save = g.node("SaveImage", [prefix], inputs=[("images", "IMAGE")])
    size = g.node("GetImageSize", inputs=[("image", "IMAGE")], outputs=["INT", "INT", "INT"])
    width = g.node("PreviewAny", inputs=[("source", "*")], title="Width")
    label = g.node("StringConcatenate", ["size", "ok", "-"], outputs=["STRING"], title="Label")
    shown = g.node("PreviewAny", inputs=[("source", "*")], title="Shown")
    g.wire(
        (load, 0, scale, "image"),
        (scale, 0, inv, "image"),
        (inv, 0, save, "images"),
        (load, 0, size, "image"),
        (size, 0, width, "source"),
        (label, 0, shown, "source"),
    )
    return g.json()


def write_image(path: Path, width: int, height: int, value: int) -> Path:
    Image.fromarray(np.full((height, width, 3), value, np.uint8)).save(path)
    return path


@pytest.fixture
def input_dir(tmp_path):
    """The host's input folder, pointed at a temporary folder for one test."""
    previous = folder_paths.get_input_directory()
    folder = tmp_path / "input"
    folder.mkdir()
    folder_paths.set_input_directory(str(folder))
    yield folder
    folder_paths.set_input_directory(previous)


def validate(prompt):
    return asyncio.run(execution.validate_prompt("test", prompt, None))


# --- conversion: widget mapping on schemas the tests define ---------------------------------


class FakeNode:
    SCHEMA: dict = {}

    @classmethod
    def INPUT_TYPES(cls):
        return cls.SCHEMA


def fake(schema):
    return type("Fake", (FakeNode,), {"SCHEMA": schema})


SAMPLER = fake({"required": {"model": ("MODEL",), "seed": ("INT", {"default": 0}), "steps": ("INT", {"default": 20}),
                             "sampler": (["euler", "ddim"],), "mode": ("COMBO", {"options": ["a", "b"],
                                                                                 "control_after_generate": True}),
                             "text": ("STRING", {"dynamicPrompts": True}), "hook": ("INT", {"forceInput": True})},
                "optional": {"pick": ("INT", {"default": 3, "control_after_generate": True}),
                             "values": ("FLOAT", {"default": 0.5})}})
LOADER = fake({"required": {"image": (["a.png", "b.png"], {"image_upload": True})}})
PASS = fake({"required": {"model": ("MODEL",), "image": ("IMAGE",)}})
SINK = fake({"required": {"image": ("IMAGE",), "model": ("MODEL",)}})
CLASSES = {"Sampler": SAMPLER, "Loader": LOADER, "Pass": PASS, "Sink": SINK}


def test_widget_slots_follow_frontend_conventions():
    # seed gets a control widget by name, a COMBO with control_after_generate gets control + filter,
    # forceInput makes no widget, an explicit control_after_generate on an optional INT counts too
    assert wf.widget_slots(SAMPLER.SCHEMA) == ["seed", None, "steps", "sampler", "mode", None, None, "text",
                                               "pick", None, "values"]
    # the upload button follows the required inputs
    assert wf.widget_slots(LOADER.SCHEMA) == ["image", None]
    # an explicit False beats the seed-name convention
    assert wf.widget_slots({"required": {"seed": ("INT", {"control_after_generate": False})}}) == ["seed"]


def test_widget_values_map_in_schema_order():
    g = UIGraph()
    s = g.node("Sampler", [7, "randomize", 4, "ddim", "b", "fixed", "", "a {x|x} // comment", 9, "fixed", [1, 2]],
               inputs=[("model", "MODEL")])
    prompt = wf.ui_to_api(g.json(), CLASSES)
    assert prompt == {"1": {"class_type": "Sampler", "_meta": {"title": "Sampler"},
                            "inputs": {"seed": 7, "steps": 4, "sampler": "ddim", "mode": "b", "text": "a x ",
                                       "pick": 9, "values": {"__value__": [1, 2]}}}}
    assert s["widgets_values"][7] == "a {x|x} // comment"  # the workflow itself is not modified


def test_missing_widget_values_take_defaults_and_legacy_force_input_is_skipped():
    g = UIGraph()
    g.node("Sampler", [5, "fixed", 2])  # an old save: later widgets missing
    assert wf.ui_to_api(g.json(), CLASSES)["1"]["inputs"] == {
        "seed": 5, "steps": 2, "sampler": "euler", "mode": "a", "text": "", "pick": 3, "values": 0.5}
    # before frontend 1.16 a forceInput input kept a dummy widget value (here 99 for "hook")
    legacy = fake({"required": {"a": ("INT", {}), "hook": ("INT", {"forceInput": True}), "b": ("FLOAT", {})}})
    g = UIGraph()
    g.node("L", [1, 99, 2.5])
    assert wf.ui_to_api(g.json(), {"L": legacy})["1"]["inputs"] == {"a": 1, "b": 2.5}


def test_bypass_muted_reroute_primitive_and_notes():
    g = UIGraph()
    model = g.node("Pass", inputs=[("model", "MODEL"), ("image", "IMAGE")], outputs=["MODEL", "IMAGE"])
    # bypassed: each output takes the input of the same type, whatever its slot
    by = g.node("Pass", inputs=[("image", "IMAGE"), ("model", "MODEL")], outputs=["MODEL", "IMAGE"], mode=4)
    reroute = g.node("Reroute", inputs=[("", "*")], outputs=["*"])
    sink = g.node("Sink", inputs=[("image", "IMAGE"), ("model", "MODEL")])
    muted = g.node("Pass", inputs=[("model", "MODEL"), ("image", "IMAGE")], outputs=["MODEL", "IMAGE"], mode=2)
    sink2 = g.node("Sink", inputs=[("image", "IMAGE"), ("model", "MODEL")])
    prim = g.node("PrimitiveNode", [11, "fixed"], outputs=["INT"])
    sampler = g.node("Sampler", [1, "fixed", 2, "euler", "a", "fixed", "", "t", 3, "fixed", 0.1],
                     inputs=[("model", "MODEL")], widget_inputs=[("steps", "INT")])
    g.node("Note", ["just text"])
    g.wire(
        (model, 0, by, "model"),
        (model, 1, by, "image"),
        (by, 0, reroute, ""),
        (reroute, 0, sink, "model"),
        (by, 1, sink, "image"),
        (model, 0, muted, "model"),
        (muted, 1, sink2, "image"),
        (model, 0, sink2, "model"),
        (prim, 0, sampler, "steps"),
        (reroute, 0, sampler, "model"),
    )
    prompt = wf.ui_to_api(g.json(), CLASSES)
    assert set(prompt) == {"1", "4", "6", "8"}  # bypassed, muted, reroute, primitive and note are gone
    assert prompt["4"]["inputs"] == {"image": ["1", 1], "model": ["1", 0]}
    assert prompt["6"]["inputs"] == {"model": ["1", 0]}  # the link from the muted node is dropped
    assert prompt["8"]["inputs"]["steps"] == 11 and prompt["8"]["inputs"]["model"] == ["1", 0]


def test_subgraph_is_flattened():
    inner = UIGraph()
    p = inner.node("Pass", inputs=[("model", "MODEL"), ("image", "IMAGE")], outputs=["MODEL", "IMAGE"])
    sub = {"id": "sub-1", "name": "wrap", "nodes": inner.nodes,
           "links": [{"id": 1, "origin_id": -10, "origin_slot": 0, "target_id": 1, "target_slot": 0, "type": "MODEL"},
                     {"id": 2, "origin_id": -10, "origin_slot": 1, "target_id": 1, "target_slot": 1, "type": "IMAGE"},
                     {"id": 3, "origin_id": 1, "origin_slot": 1, "target_id": -20, "target_slot": 0, "type": "IMAGE"}],
           "inputs": [], "outputs": []}
    p["inputs"][0]["link"], p["inputs"][1]["link"] = 1, 2
    g = UIGraph()
    src = g.node("Pass", inputs=[("model", "MODEL"), ("image", "IMAGE")], outputs=["MODEL", "IMAGE"])
    inst = g.node("sub-1", inputs=[("model", "MODEL"), ("image", "IMAGE")], outputs=["IMAGE"])
    sink = g.node("Sink", inputs=[("image", "IMAGE"), ("model", "MODEL")])
    g.wire(
        (src, 0, inst, "model"),
        (src, 1, inst, "image"),
        (inst, 0, sink, "image"),
    )
    data = g.json()
    data["definitions"] = {"subgraphs": [sub]}
    prompt = wf.ui_to_api(data, CLASSES)
    assert set(prompt) == {"1", "2:1", "3"}
    assert prompt["2:1"]["inputs"] == {"model": ["1", 0], "image": ["1", 1]}
    assert prompt["3"]["inputs"] == {"image": ["2:1", 1]}


def test_conversion_errors_and_api_passthrough(tmp_path):
    g = UIGraph()
    g.node("NoSuchNode")
    g.node("AlsoMissing")
    with pytest.raises(wf.WorkflowError, match="NoSuchNode") as e:
        wf.ui_to_api(g.json(), CLASSES)
    assert len(e.value.problems) == 2 and "AlsoMissing" in str(e.value)
    with pytest.raises(wf.WorkflowError, match="UI format"):
        wf.ui_to_api({"1": {"class_type": "Sink", "inputs": {}}}, CLASSES)
    api = {"1": {"class_type": "Sink", "inputs": {}}}
    (tmp_path / "api.json").write_text(json.dumps(api))
    assert wf.load_prompt(tmp_path / "api.json", CLASSES) == api
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(wf.WorkflowError, match="cannot read"):
        wf.load_prompt(tmp_path / "bad.json", CLASSES)


def test_dynamic_prompts_are_seeded():
    text = "a {red|green|blue} {big|small} cat /* hidden */ \\{literal\\}"
    first = wf.process_dynamic_prompt(text, random.Random(1))
    assert first == wf.process_dynamic_prompt(text, random.Random(1))
    assert "hidden" not in first and first.endswith("{literal}")
    picks = {wf.process_dynamic_prompt("{a|b|c}", random.Random(i)) for i in range(40)}
    assert picks == {"a", "b", "c"}


# --- conversion against the host's schemas --------------------------------------------------


def routing_workflow():
    """Built-in nodes with a Reroute, a PrimitiveNode feeding a widget input, a bypassed V3 node, a
    muted output and a note."""
    g = UIGraph()
    load = g.node("LoadImage", ["img.png", "image"], outputs=["IMAGE", "MASK"])
    reroute = g.node("Reroute", inputs=[("", "*")], outputs=["IMAGE"])
    width = g.node("PrimitiveNode", [40, "fixed"], outputs=["INT"])
    scale = g.node("ImageScale", ["nearest-exact", 32, 24, "disabled"], inputs=[("image", "IMAGE")],
                   outputs=["IMAGE"], widget_inputs=[("width", "INT")])
    blur = g.node("ImageBlur", [3, 1.0], inputs=[("image", "IMAGE")], outputs=["IMAGE"], mode=4)  # V3, bypassed
    inv = g.node("ImageInvert", inputs=[("image", "IMAGE")], outputs=["IMAGE"])
    save = g.node("SaveImage", ["t"], inputs=[("images", "IMAGE")])
    preview = g.node("PreviewImage", inputs=[("images", "IMAGE")], mode=2)  # muted
    g.node("MarkdownNote", ["# notes are not sent"])
    g.wire(
        (load, 0, reroute, ""),
        (reroute, 0, scale, "image"),
        (width, 0, scale, "width"),
        (scale, 0, blur, "image"),
        (blur, 0, inv, "image"),
        (inv, 0, save, "images"),
        (inv, 0, preview, "images"),
    )
    return g.json()


def test_builtin_ui_workflow_converts_and_validates(input_dir):
    write_image(input_dir / "img.png", 64, 48, 10)
    prompt = wf.ui_to_api(routing_workflow(), nodes.NODE_CLASS_MAPPINGS)
    assert {k: (v["class_type"], v["inputs"]) for k, v in prompt.items()} == {
        "1": ("LoadImage", {"image": "img.png"}),
        "4": ("ImageScale", {"upscale_method": "nearest-exact", "width": 40, "height": 24, "crop": "disabled",
                             "image": ["1", 0]}),
        "6": ("ImageInvert", {"image": ["4", 0]}),
        "7": ("SaveImage", {"filename_prefix": "t", "images": ["6", 0]}),
    }
    valid, error, outputs, node_errors = validate(prompt)
    assert valid, (error, node_errors)
    assert outputs == ["7"]


def _template(name):
    templates = pytest.importorskip("comfyui_workflow_templates")
    path = Path(templates.get_templates_path()) / f"{name}.json"
    if not path.is_file():
        pytest.skip(f"{path.name} is not in this comfyui-workflow-templates version")
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", ["default", "image2image", "hiresfix_latent_workflow", "lora"])
def test_host_sd15_templates_validate_with_tiny_checkpoint(name, tiny_checkpoint, input_dir):
    prompt = wf.ui_to_api(_template(name), nodes.NODE_CLASS_MAPPINGS)
    ckpt = tiny_checkpoint("sd15")
    loras = [n for n in prompt.values() if n["class_type"] == "LoraLoader"]
    for node in prompt.values():
        if "ckpt_name" in node["inputs"]:
            node["inputs"]["ckpt_name"] = ckpt
        if node["class_type"] == "LoadImage":
            write_image(input_dir / "in.png", 64, 64, 128)
            node["inputs"]["image"] = "in.png"
    valid, error, outputs, node_errors = validate(prompt)
    if loras:  # no LoRA files here: exactly the LoRA names fail, everything else validates
        bad = {(nid, e["extra_info"]["input_name"]) for nid, info in node_errors.items() for e in info["errors"]}
        assert bad and all(prompt[nid]["class_type"] == "LoraLoader" and inp == "lora_name" for nid, inp in bad)
    else:
        assert valid, (error, node_errors)


def test_default_template_runs_with_tiny_checkpoint(tiny_checkpoint, graph, output_dir):
    prompt = wf.ui_to_api(_template("default"), nodes.NODE_CLASS_MAPPINGS)
    sampler = next(n for n in prompt.values() if n["class_type"] == "KSampler")["inputs"]
    assert (sampler["seed"], sampler["steps"], sampler["cfg"], sampler["sampler_name"], sampler["scheduler"],
            sampler["denoise"]) == (156680208700286, 20, 8, "euler", "normal", 1)
    for node in prompt.values():
        inputs = node["inputs"]
        if "ckpt_name" in inputs:
            inputs["ckpt_name"] = tiny_checkpoint("sd15")
        if node["class_type"] == "EmptyLatentImage":
            inputs.update(width=64, height=64)
        if node["class_type"] == "SaveImage":
            inputs["filename_prefix"] = "default_template"
    sampler["steps"] = 2
    result = graph.run(prompt)
    assert result.ok, result.error
    files = list(Path(output_dir).glob("default_template_*.png"))
    assert len(files) == 1 and Image.open(files[0]).size == (64, 64)


# --- runner ---------------------------------------------------------------------------------


def test_apply_sets_and_image_inputs():
    prompt = wf.ui_to_api(invert_workflow(), nodes.NODE_CLASS_MAPPINGS)
    prompts.apply_sets(prompt, ["Scale.width=40", "2.crop=center", "Label.string_a=[1, 2]",
                                "SaveImage.filename_prefix=out/x"], nodes.NODE_CLASS_MAPPINGS)
    assert prompt["2"]["inputs"]["width"] == 40 and prompt["2"]["inputs"]["crop"] == "center"
    assert prompt["7"]["inputs"]["string_a"] == {"__value__": [1, 2]}
    assert prompt["4"]["inputs"]["filename_prefix"] == "out/x"
    for bad, msg in [("Scale.width", "NODE.INPUT=VALUE"), ("Nope.width=1", "no node"),
                     ("Scale.nope=1", "has no input 'nope'"), ("Scale.image=1", "connection"),
                     ("PreviewAny.source=1", "several nodes")]:
        with pytest.raises(wf.WorkflowError, match=msg):
            prompts.apply_sets(prompt, [bad], nodes.NODE_CLASS_MAPPINGS)
    assert prompts.find_image_inputs(prompt, nodes.NODE_CLASS_MAPPINGS) == [("1", "image")]


def test_find_comfyui_from_env_or_the_packs_location(tmp_path, monkeypatch):
    root = tmp_path / "ComfyUI"
    (root / "comfy").mkdir(parents=True)
    (root / "main.py").write_text("")
    (root / "nodes.py").write_text("")
    pack = root / "custom_nodes" / "comfyui-antipure"
    pack.mkdir(parents=True)
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    assert comfyui.find_comfyui(start=pack) == root.resolve()
    with pytest.raises(errors.RunnerError, match="set COMFYUI_PATH") as e:
        comfyui.find_comfyui(start=tmp_path / "elsewhere")
    assert e.value.code == errors.EXIT_NO_HOST
    monkeypatch.setenv("COMFYUI_PATH", str(root))
    assert comfyui.find_comfyui(start=tmp_path / "elsewhere") == root.resolve()
    monkeypatch.setenv("COMFYUI_PATH", str(tmp_path / "nope"))
    with pytest.raises(errors.RunnerError, match="Set COMFYUI_PATH"):
        comfyui.find_comfyui(start=pack)


def test_add_models_dir_uses_the_hosts_folder_names(tmp_path):
    for sub in ("loras", "unet"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / f"{sub}_file.safetensors").write_bytes(b"")
    (tmp_path / "flat.safetensors").write_bytes(b"")
    try:
        kinds = comfyui.add_models_dir(tmp_path)
        assert set(kinds) == {"loras", "diffusion_models", "checkpoints"}
        assert "loras_file.safetensors" in folder_paths.get_filename_list("loras")
        assert "unet_file.safetensors" in folder_paths.get_filename_list("diffusion_models")  # legacy "unet/"
        assert "flat.safetensors" in folder_paths.get_filename_list("checkpoints")
    finally:  # leave the host's model folders as other tests expect them
        for kind, path in [("loras", tmp_path / "loras"), ("diffusion_models", tmp_path / "unet"),
                           ("checkpoints", tmp_path)]:
            folder_paths.folder_names_and_paths[kind][0].remove(str(path))


@pytest.fixture
def three_images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for name, w, v in [("a", 64, 0), ("b", 48, 100), ("c", 32, 250)]:
        write_image(folder / f"{name}.png", w, 40, v)
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_cli_runs_a_folder_of_three_images(tmp_path, three_images):
    (tmp_path / "wf.json").write_text(json.dumps(invert_workflow()))
    out = tmp_path / "out"
    env = {**os.environ, "COMFYUI_PATH": str(Path(nodes.__file__).parent)}
    proc = subprocess.run([sys.executable, "-m", "antipure", "run", str(tmp_path / "wf.json"), "--images",
                           str(three_images), "--out", str(out), "--set", "Scale.width=40", "--cpu"],
                          cwd=PACK_DIR, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = list(csv.DictReader(open(out / "results.csv", encoding="utf-8")))
    assert [r["image"] for r in rows] == ["a.png", "b.png", "c.png"]
    assert all(r["status"] == "ok" and float(r["seconds"]) > 0 for r in rows)
    assert [r["Width.text"] for r in rows] == ["64", "48", "32"]  # UI text of a node, per image
    assert {r["Label.STRING"] for r in rows} == {"size-ok"}  # a STRING output (V3 node)
    for row, value in zip(rows, [0, 100, 250]):
        files = row["outputs"].split(";")
        assert files == [f"{Path(row['image']).stem}/inv_00001_.png"]
        saved = np.asarray(Image.open(out / files[0]))
        assert saved.shape == (24, 40, 3)  # --set Scale.width=40 took effect
        assert np.all(np.abs(saved.astype(int) - (255 - value)) <= 1)  # inverted (8-bit rounding)


def _cli(args, env_path):
    env = {**os.environ, "COMFYUI_PATH": env_path}
    return subprocess.run([sys.executable, "-m", "antipure", "run", *args], cwd=PACK_DIR, env=env,
                          capture_output=True, text=True, timeout=600)


def test_cli_exit_codes_before_boot(tmp_path, three_images):
    (tmp_path / "wf.json").write_text(json.dumps(invert_workflow()))
    host_root = str(Path(nodes.__file__).parent)
    out = str(tmp_path / "out")
    proc = _cli([str(tmp_path / "wf.json"), "--images", str(three_images), "--out", out], str(tmp_path / "nohost"))
    assert proc.returncode == errors.EXIT_NO_HOST and "COMFYUI_PATH" in proc.stderr
    proc = _cli([str(tmp_path / "missing.json"), "--images", str(three_images), "--out", out], host_root)
    assert proc.returncode == errors.EXIT_BAD_WORKFLOW and "missing.json" in proc.stderr
    # a broken workflow is reported before the host is even looked for (its start takes many seconds)
    (tmp_path / "cut.json").write_text(json.dumps(invert_workflow())[:50])
    (tmp_path / "other.json").write_text('{"nodes": "not a list"}')
    for name, reason in (("cut.json", "cannot read"), ("other.json", "neither the UI format")):
        proc = _cli([str(tmp_path / name), "--images", str(three_images), "--out", out], str(tmp_path / "nohost"))
        assert proc.returncode == errors.EXIT_BAD_WORKFLOW and name in proc.stderr and reason in proc.stderr, proc.stderr
    proc = _cli([str(tmp_path / "wf.json"), "--images", str(tmp_path / "nope"), "--out", out], host_root)
    assert proc.returncode == errors.EXIT_NO_IMAGES and "does not exist" in proc.stderr
    (tmp_path / "empty").mkdir()
    proc = _cli([str(tmp_path / "wf.json"), "--images", str(tmp_path / "empty"), "--out", out], host_root)
    assert proc.returncode == errors.EXIT_NO_IMAGES and "no images" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_runner_rejects_invalid_workflow_and_missing_model(tmp_path, three_images, capsys, input_dir):
    run = ["run", "--images", str(three_images), "--out", str(tmp_path / "out"), "--no-progress",
           "--comfyui", str(Path(nodes.__file__).parent)]
    g = UIGraph()
    g.node("NoSuchNode")
    (tmp_path / "unknown.json").write_text(json.dumps(g.json()))
    assert cli.main([*run, str(tmp_path / "unknown.json")]) == errors.EXIT_BAD_WORKFLOW
    assert "unknown node type 'NoSuchNode'" in capsys.readouterr().err

    bad = invert_workflow()
    bad["nodes"][1]["widgets_values"][1] = -5  # width below the schema's minimum
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    assert cli.main([*run, str(tmp_path / "bad.json")]) == errors.EXIT_BAD_WORKFLOW
    err = capsys.readouterr().err
    assert "node 2 (ImageScale)" in err and "width" in err

    g = UIGraph()
    load = g.node("LoadImage", ["x.png", "image"], outputs=["IMAGE", "MASK"])
    save = g.node("SaveImage", ["x"], inputs=[("images", "IMAGE")])
    g.node("CheckpointLoaderSimple", ["no_such_model.safetensors"], outputs=["MODEL", "CLIP", "VAE"])
    g.link(load, 0, save, "images")
    (tmp_path / "model.json").write_text(json.dumps(g.json()))
    assert cli.main([*run, str(tmp_path / "model.json")]) == errors.EXIT_NO_MODEL
    err = capsys.readouterr().err
    assert "ckpt_name 'no_such_model.safetensors' not found" in err and "available:" in err
    assert folder_paths.get_input_directory() == str(input_dir)  # host state restored


def test_runner_image2image_template_with_models_folder(tmp_path, tiny_checkpoint, models_dir, input_dir):
    """A host template saved by the frontend, run with a checkpoint from --models (one image: the full
    SD VAE dominates the time on a CPU)."""
    templates = pytest.importorskip("comfyui_workflow_templates")
    workflow = Path(templates.get_templates_path()) / "image2image.json"
    ckpt = tiny_checkpoint("sd15")
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(folder / "0.png")
    out = tmp_path / "out"
    code = cli.main(["run", str(workflow), "--images", str(folder), "--out", str(out), "--no-progress",
                     "--models", str(models_dir), "--comfyui", str(Path(nodes.__file__).parent),
                     "--set", f"CheckpointLoaderSimple.ckpt_name={ckpt}", "--set", "KSampler.steps=2",
                     "--set", "ImageScaleToTotalPixels.megapixels=0.01"])
    assert code == errors.EXIT_OK
    rows = list(csv.DictReader(open(out / "results.csv", encoding="utf-8")))
    assert [(r["image"], r["status"], r["outputs"]) for r in rows] == [("0.png", "ok", "0/ComfyUI_00001_.png")]
    assert Image.open(out / rows[0]["outputs"]).size == (96, 96)  # 0.01 MP, cropped to a multiple of 8


def test_runner_reports_failed_image_and_continues(tmp_path, capsys, input_dir):
    folder = tmp_path / "images"
    folder.mkdir()
    write_image(folder / "ok.png", 32, 32, 7)
    (folder / "broken.png").write_bytes(b"not a png")
    (tmp_path / "wf.json").write_text(json.dumps(invert_workflow()))
    code = cli.main(["run", str(tmp_path / "wf.json"), "--images", str(folder), "--out", str(tmp_path / "out"),
                     "--no-progress", "--comfyui", str(Path(nodes.__file__).parent)])
    assert code == errors.EXIT_FAILED
    rows = {r["image"]: r for r in csv.DictReader(open(tmp_path / "out" / "results.csv", encoding="utf-8"))}
    assert rows["ok.png"]["status"] == "ok" and rows["ok.png"]["input"] == "PNG RGB 32x32 8-bit"
    assert rows["broken.png"]["status"] == "invalid"  # refused before the host's loader sees it
    assert rows["broken.png"]["error"].startswith("broken.png: not an image Pillow can read")
    assert "broken.png: invalid: broken.png: not an image" in capsys.readouterr().err


# --- the host's real web frontend (headless Chromium): previews, and conversion ground truth --


@pytest.fixture(scope="module")
def frontend():
    """``(render_previews module, page)``: ComfyUI's server with this pack, its frontend in Chromium.

    Module-scoped (one server for the tests below) and used last in this file, so that no
    ``asyncio.run`` happens while Playwright's sync API holds the thread.
    """
    pytest.importorskip("playwright", reason="Playwright for Python is not installed (pip install playwright)")
    sys.path.insert(0, str(PACK_DIR / "scripts"))
    try:
        import render_previews
    finally:
        sys.path.remove(str(PACK_DIR / "scripts"))
    try:
        chromium = render_previews.find_chromium()
    except render_previews.PreviewError as e:
        pytest.skip(str(e))
    with render_previews.frontend_page(Path(nodes.__file__).parent, chromium, 960, 600) as (page, _errors):
        yield render_previews, page


def test_render_previews_draws_a_workflow(frontend, tmp_path):
    render_previews, page = frontend
    (tmp_path / "flows").mkdir()
    (tmp_path / "flows" / "invert.json").write_text(json.dumps(invert_workflow()))
    written = render_previews.render([tmp_path / "flows" / "invert.json"], tmp_path / "previews", page, 960, 600)
    assert written == [tmp_path / "previews" / "invert.jpg"]
    im = np.asarray(Image.open(written[0]).convert("L"), dtype=np.float32)
    assert im.shape == (600, 960)
    assert im.std() > 4.0  # not a blank canvas
    # nodes, text and links are drawn lighter than the canvas background
    assert (im > np.median(im) + 20).mean() > 0.01


def _schema_inputs(prompt):
    """Class, title and the inputs the backend reads: the frontend also sends values of its own
    extra widgets (e.g. a refresh button), which the backend ignores."""
    out = {}
    for node_id, node in prompt.items():
        schema = nodes.NODE_CLASS_MAPPINGS[node["class_type"]].INPUT_TYPES()
        names = set(schema.get("required") or {}) | set(schema.get("optional") or {})
        out[node_id] = (node["class_type"], node["_meta"]["title"],
                        {k: v for k, v in node["inputs"].items() if k in names})
    return out


FRONTEND_TEMPLATES = ["default", "image2image", "lora", "hiresfix_latent_workflow", "inpaint_example",
                      "image_qwen_image_instantx_controlnet", "flux_kontext_dev_basic"]


def test_conversion_matches_the_frontend(frontend):
    """ui_to_api gives what the frontend's own graphToPrompt sends, on built-in graphs, host
    templates (bypassed nodes, groups, subgraphs) and every workflow this pack ships."""
    render_previews, page = frontend
    cases = {"invert": invert_workflow(), "routing": routing_workflow()}
    templates = None
    with contextlib.suppress(ImportError):
        import comfyui_workflow_templates as templates
    for name in FRONTEND_TEMPLATES if templates else []:
        path = Path(templates.get_templates_path()) / f"{name}.json"
        if path.is_file():
            cases[name] = json.loads(path.read_text(encoding="utf-8"))
    for path in sorted((PACK_DIR / "example_workflows").glob("*.json")):
        cases[f"example_workflows/{path.name}"] = json.loads(path.read_text(encoding="utf-8"))
    assert len(cases) >= 4
    for name, data in cases.items():
        expected = _schema_inputs(render_previews.frontend_prompt(page, data))
        mine = wf.ui_to_api(data, nodes.NODE_CLASS_MAPPINGS, display_names=nodes.NODE_DISPLAY_NAME_MAPPINGS)
        assert _schema_inputs(mine) == expected, name
