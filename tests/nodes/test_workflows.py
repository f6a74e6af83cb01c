"""The shipped workflows: each converts to the host's API form and validates; the stress test runs end to end."""
from __future__ import annotations

import asyncio
import csv
import json
import re
import shutil
import sys
from pathlib import Path

import pytest

from antipure.batch import run_batch
from antipure.prompts import apply_sets, find_image_inputs, validate
from antipure.workflow_format import load_prompt
from tests.nodes.host import PACK_DIR

WORKFLOWS = sorted((PACK_DIR / "example_workflows").glob("*.json"))
SAMPLE = PACK_DIR / "assets" / "sample_face.png"


@pytest.fixture(scope="module")
def prompt_for(host, tiny_checkpoint, tiny_pixel_checkpoint):
    import nodes

    ckpt = tiny_checkpoint("sd15")

    def convert(path: Path, sets=()) -> dict:
        prompt = load_prompt(path, nodes.NODE_CLASS_MAPPINGS)
        for node in prompt.values():
            if node["class_type"] == "CheckpointLoaderSimple":
                node["inputs"]["ckpt_name"] = ckpt
            if node["class_type"] == "AntiPureLoadPixelDiffusion":
                node["inputs"].update(ckpt_name=tiny_pixel_checkpoint, num_head_channels=32)
        return apply_sets(prompt, sets, nodes.NODE_CLASS_MAPPINGS)
    return convert


def test_every_workflow_has_a_preview():
    assert {p.stem for p in WORKFLOWS} >= {"antipure_protect", "antipure_stress_test", "antipure_baseline_comparison"}
    for wf in WORKFLOWS:
        preview = wf.with_suffix(".jpg")
        assert preview.is_file(), f"{wf.name} has no preview {preview.name}: run scripts/render_previews.py"


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_converts_and_validates(host, prompt_for, workflow, tmp_path):
    import folder_paths

    prompt = prompt_for(workflow)
    assert any(n["class_type"].startswith("AntiPure") for n in prompt.values())
    previous = folder_paths.get_input_directory()
    folder_paths.set_input_directory(str(tmp_path))
    shutil.copy(SAMPLE, tmp_path / "example.png")
    try:
        problems, outputs = asyncio.run(validate(prompt))
    finally:
        folder_paths.set_input_directory(previous)
    assert problems == [] and outputs


def test_workflow_build_script_is_in_sync(host):
    """The committed JSON is what scripts/build_workflows.py writes for the current node schemas."""
    import importlib.util

    import nodes

    spec = importlib.util.spec_from_file_location("build_workflows", PACK_DIR / "scripts" / "build_workflows.py")
    build = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = build  # dataclasses resolve their module while the class is created
    spec.loader.exec_module(build)
    for name, make in build.WORKFLOWS.items():
        fresh = build.to_ui(make(), nodes.NODE_CLASS_MAPPINGS)
        shipped = json.loads((PACK_DIR / "example_workflows" / f"{name}.json").read_text())
        assert fresh == shipped, f"example_workflows/{name}.json is stale: run scripts/build_workflows.py"


def _inside(pos, box) -> bool:
    return box[0] <= pos[0] <= box[0] + box[2] and box[1] <= pos[1] <= box[1] + box[3]


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_reads_at_a_glance(workflow):
    """Stage groups left to right holding every node, links that flow rightwards, a note to read
    first, titles the runner's --set can address."""
    ui = json.loads(workflow.read_text())
    groups = ui["groups"]
    assert groups and [g["bounding"][0] for g in groups] == sorted(g["bounding"][0] for g in groups)
    assert groups[0]["title"] == "Inputs" and "Protect" in [g["title"] for g in groups]
    for node in ui["nodes"]:
        assert sum(_inside(node["pos"], g["bounding"]) for g in groups) == 1, node["title"]
    x = {n["id"]: n["pos"][0] for n in ui["nodes"]}
    backwards = [link for link in ui["links"] if x[link[1]] > x[link[3]]]
    assert not backwards, f"links running right to left: {backwards}"
    assert any(n["type"] == "MarkdownNote" and "Change first" in n["widgets_values"][0] for n in ui["nodes"])
    titles = [n["title"] for n in ui["nodes"]]
    assert len(set(titles)) == len(titles) and not any("." in t for t in titles)


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_uses_no_deprecated_node(workflow):
    """The single AntiPurePurify node still loads for old graphs; shipped ones use the per-purifier nodes."""
    types = {n["type"] for n in json.loads(workflow.read_text())["nodes"]}
    assert "AntiPurePurify" not in types


def test_lanes_line_up():
    """Each purifier's chain sits on one row of the stress test, one method's on one row of the comparison."""
    for name, lane_of in [("antipure_stress_test", lambda t: t.split(" ")[0]),
                          ("antipure_baseline_comparison", lambda t: t.split(" ")[0])]:
        ui = json.loads((PACK_DIR / "example_workflows" / f"{name}.json").read_text())
        rows: dict[str, set] = {}
        for node in ui["nodes"]:
            if node["type"].startswith("AntiPure") and node["type"] not in ("AntiPureFrequencyGuidance",
                                                                             "AntiPureTimestepGuidance"):
                rows.setdefault(lane_of(node["title"]), set()).add(node["pos"][1])
        rows.pop("Protect", None)  # the stress test's single Protect feeds every lane
        assert len(rows) >= 3 and all(len(ys) == 1 for ys in rows.values()), rows


@pytest.mark.parametrize("name", ["antipure_stress_test", "antipure_baseline_comparison"])
def test_every_report_is_shown_on_the_canvas(name):
    """Each Evaluate's report feeds a Preview Any node: the frontend draws text only there."""
    ui = json.loads((PACK_DIR / "example_workflows" / f"{name}.json").read_text())
    kinds = {n["id"]: n["type"] for n in ui["nodes"]}
    evaluates = [i for i, k in kinds.items() if k == "AntiPureEvaluate"]
    shown = {src for _, src, slot, dst, _, _ in ui["links"] if slot == 0 and kinds[dst] == "PreviewAny"}
    assert evaluates and set(evaluates) == shown


def test_stress_test_runs_end_to_end(host, prompt_for, output_dir, tmp_path):
    import nodes

    from antipure.demo import DEMO_SETTINGS

    sets = [s for s in DEMO_SETTINGS if not s.startswith(("Checkpoint.", "Purifier."))]
    sets += ["Protect.steps=2", "Latent.width=32", "Latent.height=32", "Latent.batch_size=1"]
    sets += [f"{p} LoRA.steps=3" for p in ("DiffPure", "GrIDPure", "JPEG")]
    sets += [f"{p} sample.steps=2" for p in ("DiffPure", "GrIDPure", "JPEG", "DreamBooth")]
    sets += ["DreamBooth model.steps=2", "DreamBooth model.class_image_count=1",
             "DreamBooth model.class_sampling_steps=2"]
    prompt = prompt_for(PACK_DIR / "example_workflows" / "antipure_stress_test.json", sets)
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(SAMPLE, images / "face.png")
    image_input = find_image_inputs(prompt, nodes.NODE_CLASS_MAPPINGS)[0]
    results = asyncio.run(run_batch(prompt, image_input, [images / "face.png"], tmp_path / "out",
                                           progress=False))
    assert [r.status for r in results] == ["ok"], results[0].error
    rows = list(csv.DictReader(open(tmp_path / "out" / "results.csv")))
    # one row per lane, one column per score (FID included: it names the missing weights here), no markdown
    assert [(r["image"], r["lane"], r["status"]) for r in rows] == [
        ("face.png", f"antipure+{lane}", "ok") for lane in ("diffpure", "gridpure", "gridpure+dreambooth", "jpeg")]
    # the DreamBooth lane's Customize summary says what it trained
    assert "(dreambooth)" in rows[0]["DreamBooth model.text"] and "text encoder" in rows[0]["DreamBooth model.text"]
    assert all("not available" in r["generated/fid"] and float(r["protected/psnr"]) > 0 for r in rows)
    assert not any("\n" in v or "|---" in v for r in rows for v in r.values())
    out = tmp_path / "out"
    written = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"face/antipure/stress_test.csv", "face/antipure/stress_test.json"} <= written, written
    # the markdown reports are files, and name only files that exist (relative to OUT), not the staging folder
    reports = sorted(n for n in written if n.endswith(".md"))
    assert len(reports) == 4 and set(reports) <= set(rows[0]["outputs"].split(";")), reports
    named = {m for n in reports for m in re.findall(r"`([^`\s]+\.(?:json|csv))`", (out / n).read_text())}
    assert named == {"face/antipure/stress_test.json", "face/antipure/stress_test.csv"}, named
    # every output file gets the same permissions (the host's images: what open() gives)
    modes = {p.relative_to(tmp_path / "out").as_posix(): p.stat().st_mode & 0o777
             for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert len(set(modes.values())) == 1, modes
