"""AntiPureEvaluate in real graphs: results files shared by labels, report, plot, UI outputs and bad inputs."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import folder_paths

from tests.nodes.graph import GraphBuilder
from tests.toy import smooth_image

SIZE = 64


def _save(folder: Path, name: str, x: torch.Tensor) -> str:
    Image.fromarray((x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(folder / name)
    return name


@pytest.fixture(scope="module")
def inputs(host, tmp_path_factory):
    """PNGs in a temporary input folder: clean, protected at 8/255 and 4/255, purified, generated (other size)."""
    folder = tmp_path_factory.mktemp("eval_input")
    temp = tmp_path_factory.mktemp("eval_temp")
    saved = folder_paths.get_input_directory(), folder_paths.get_temp_directory()
    folder_paths.set_input_directory(str(folder))
    folder_paths.set_temp_directory(str(temp))  # the UI preview of the plot lands here
    clean = (smooth_image(1, SIZE, SIZE, seed=3) * 255).round() / 255
    g = torch.Generator().manual_seed(0)
    sign = torch.randint(0, 2, clean.shape, generator=g) * 2 - 1
    names = {
        "clean": _save(folder, "clean.png", clean),
        "protected8": _save(folder, "protected8.png", (clean + sign * 8 / 255).clamp(0, 1)),
        "protected4": _save(folder, "protected4.png", (clean + sign * 4 / 255).clamp(0, 1)),
        "purified": _save(folder, "purified.png", torch.nn.functional.avg_pool2d(
            (clean + sign * 8 / 255).clamp(0, 1), 3, 1, 1, count_include_pad=False)),
        "generated": _save(folder, "generated.png", smooth_image(1, 48, 80, seed=4)),
    }
    yield names
    folder_paths.set_input_directory(saved[0])
    folder_paths.set_temp_directory(saved[1])


@pytest.fixture(scope="module")
def node(host):
    return host.pack_import("nodes.evaluate").AntiPureEvaluate


def evaluate_graph(inputs, runs: list[tuple[str, str]], prefix: str, faces: bool = False, scale_protected=None):
    """One graph: the images loaded once, one Evaluate node per (label, protected image name)."""
    g = GraphBuilder(prefix="")
    load = {k: g.node("LoadImage", image=v) for k, v in inputs.items()}
    evals = []
    for label, protected in runs:
        prot = load[protected].out(0)
        if scale_protected:
            prot = g.node("ImageScale", image=prot, upscale_method="bilinear", width=scale_protected,
                          height=scale_protected, crop="disabled").out(0)
        evals.append(g.node("AntiPureEvaluate", clean=load["clean"].out(0), protected=prot,
                            purified=load["purified"].out(0), generated=load["generated"].out(0),
                            label=label, filename_prefix=prefix, faces=faces, patch_size=8))
    return g, evals


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_two_labels_share_one_results_file(graph, inputs, output_dir):
    prefix = "compare/results"
    g, (adv, anti) = evaluate_graph(inputs, [("advdm", "protected8"), ("antipure", "protected4")], prefix)
    result = graph.run(g)
    assert result.ok, result.error

    tables = json.loads((output_dir / "compare" / "results.json").read_text())
    assert set(tables) == {"advdm", "antipure"} and all(len(rows) == 1 for rows in tables.values())
    assert tables["advdm"][0]["protected/linf_255"] == 8.0
    assert tables["antipure"][0]["protected/linf_255"] == 4.0
    assert tables["antipure"][0]["protected/psnr"] > tables["advdm"][0]["protected/psnr"] + 5  # 6 dB apart
    assert tables["advdm"][0]["purified/psnr"] == tables["antipure"][0]["purified/psnr"]  # same purified input
    rows = read_csv(output_dir / "compare" / "results.csv")
    assert sorted(r["label"] for r in rows) == ["advdm", "antipure"]
    assert float(next(r for r in rows if r["label"] == "advdm")["protected/linf_255"]) == 8.0

    for ev, label in ((adv, "advdm"), (anti, "antipure")):
        report, plot = result.outputs[ev.id][0][0], result.outputs[ev.id][1][0]
        assert f"AntiPure evaluation: {label}" in report
        for metric in ("protected/psnr", "protected/ssim", "protected/linf_255", "purified/grid_score",
                       "generated/hf_ratio", "generated/brisque"):
            assert f"| {metric} |" in report
        assert "compare/results.json" in report
        assert plot.ndim == 4 and plot.shape[0] == 1 and plot.shape[2] == 1024 and plot.shape[3] == 3
        assert plot.shape[1] > 400 and 0 <= plot.min() and plot.max() <= 1
        assert plot.std() > 0.1 and (plot < 0.9).any(-1).float().mean() > 0.1  # drawn, not a blank canvas
    # whichever node ran second saw both labels and compares them
    second = [ev for ev in (adv, anti) if "advdm (1)" in result.outputs[ev.id][0][0]
              and "antipure (1)" in result.outputs[ev.id][0][0]]
    assert len(second) == 1

    # the UI gets the report text and a preview of the plot
    executed = {d["node"]: d["output"] for d in result.event("executed")}
    assert executed[adv.id]["text"][0].startswith("## AntiPure evaluation: advdm")
    assert executed[adv.id]["images"][0]["type"] == "temp"
    # its plot has bars in the first two palette colours, one per label
    u8 = (result.outputs[second[0].id][1][0] * 255).round().to(torch.uint8)
    for color in ((31, 119, 180), (255, 127, 14)):
        assert (u8 == torch.tensor(color, dtype=torch.uint8)).all(-1).sum() > 100


def test_same_label_runs_append_rows(graph, inputs, output_dir):
    g, (ev,) = evaluate_graph(inputs, [("advdm", "protected8")], "append/results")
    assert graph.run(g).ok
    graph.reset_cache()  # an unchanged graph is otherwise served from the cache and writes nothing
    result = graph.run(g)
    assert result.ok, result.error
    tables = json.loads((output_dir / "append" / "results.json").read_text())
    assert list(tables) == ["advdm"] and len(tables["advdm"]) == 2
    assert len(read_csv(output_dir / "append" / "results.csv")) == 2
    report = result.outputs[ev.id][0][0]
    assert "2 runs, 1 label" in report and "advdm (2)" in report


def test_protected_size_mismatch_names_both_inputs(graph, inputs, output_dir):
    g, _ = evaluate_graph(inputs, [("bad", "protected8")], "mismatch/results", scale_protected=48)
    result = graph.run(g)
    assert not result.ok
    assert "protected: 1 image of 48x48 do not match clean's 1 image of 64x64" in result.error
    assert not (output_dir / "mismatch").exists()  # nothing half-written


def _img(b=1, h=SIZE, w=SIZE, c=3, seed=0):
    x = smooth_image(b, h, w, seed=seed).movedim(1, -1)
    if c == 1:
        return x.mean(-1, keepdim=True)
    if c == 4:
        return torch.cat([x, torch.full_like(x[..., :1], 0.5)], -1)
    return x


@pytest.mark.parametrize("kwargs,match", [
    (dict(clean=torch.zeros(0, SIZE, SIZE, 3)), "clean: the IMAGE batch is empty"),
    (dict(generated=torch.zeros(0, SIZE, SIZE, 3)), "generated: the IMAGE batch is empty"),
    (dict(purified=_img(b=2)), "purified: batch of 2 does not match clean's 1"),
    (dict(protected=_img(b=2)), "protected: 2 images of 64x64 do not match clean's 1 image of 64x64"),
    (dict(clean=_img() * 2), r"clean: values must lie in \[0, 1\]"),
    (dict(clean=_img()[..., :2]), "clean: expected 1, 3 or 4 channels, got 2"),
    (dict(label="  "), "label: must name the run group"),
    (dict(filename_prefix="../outside"), "filename_prefix: '../outside' leaves the output folder"),
    (dict(filename_prefix=""), "filename_prefix: needs a file name"),
])
def test_bad_inputs_raise_clearly(node, inputs, output_dir, kwargs, match):
    args = dict(clean=_img(), label="bad", filename_prefix="bad/results", faces=False, patch_size=8)
    with pytest.raises(ValueError, match=match):
        node.execute(**{**args, **kwargs})
    assert not (output_dir / "bad").exists() and not (output_dir.parent / "outside.json").exists()


def test_gray_and_alpha_are_adapted_and_noted(node, inputs, output_dir):
    kw = dict(filename_prefix="adapt/results", faces=False, patch_size=8)
    gray = node.execute(clean=_img(c=1), label="gray", **kw)
    node.execute(clean=_img(c=1).expand(-1, -1, -1, 3).contiguous(), label="rgb", **kw)
    tables = json.loads((output_dir / "adapt" / "results.json").read_text())
    for metric in ("clean/grid_score", "clean/hf_ratio"):
        assert tables["gray"][0][metric] == tables["rgb"][0][metric]
    assert "clean is grayscale (replicated to RGB)" in gray.args[0]
    rgba = node.execute(clean=_img(c=4), generated=_img(c=4, seed=1), label="rgba", **kw)
    assert "clean's alpha channel is ignored" in rgba.args[0] and "generated's alpha channel" in rgba.args[0]
    assert rgba.args[1].shape[-1] == 3


def test_optional_weights_folder_is_registered_and_named(host, node, inputs, output_dir):
    folder = host.pack_import("antipure_comfy.evaluate").weights_folder()
    assert folder in folder_paths.get_folder_paths("antipure")
    assert str(Path(folder_paths.models_dir) / "antipure") in folder_paths.get_folder_paths("antipure")
    out = node.execute(clean=_img(), protected=_img(seed=0), generated=_img(seed=1), label="weights",
                       filename_prefix="weights/results", faces=False, patch_size=8)
    row = json.loads((output_dir / "weights" / "results.json").read_text())["weights"][0]
    lpips = row["protected/lpips"]
    # a number when the user supplied the weights, else a reason naming the folder to put them in
    assert isinstance(lpips, float) or (lpips.startswith("not available") and folder in lpips), lpips
    assert isinstance(row["generated/clip_iqa"], float) or row["generated/clip_iqa"].startswith("not available")
    if not isinstance(lpips, float):
        assert f"optional metric weights are read from `{folder}`" in out.args[0]


@pytest.fixture
def inception_folder(tmp_path):
    """A random-weight FID Inception in a temporary ``antipure`` model folder, first in the host's search order."""
    from tests.inception_toy import save_random_inception

    folder = tmp_path / "antipure"
    save_random_inception(folder)
    folder_paths.add_model_folder_path("antipure", str(folder), is_default=True)
    yield folder
    folder_paths.folder_names_and_paths["antipure"][0].remove(str(folder))


def test_fid_through_the_node_with_user_weights(graph, inputs, output_dir, inception_folder):
    g = GraphBuilder(prefix="")
    load = {k: g.node("LoadImage", image=inputs[k]) for k in ("clean", "protected8", "purified", "generated")}
    clean = g.node("ImageBatch", image1=load["clean"].out(0), image2=load["protected8"].out(0))
    generated = g.node("ImageBatch", image1=load["generated"].out(0), image2=load["purified"].out(0))
    ev = g.node("AntiPureEvaluate", clean=clean.out(0), generated=generated.out(0), label="fid",
                filename_prefix="fid/results", faces=False, patch_size=8)
    result = graph.run(g)
    assert result.ok, result.error
    row = json.loads((output_dir / "fid" / "results.json").read_text())["fid"][0]
    assert isinstance(row["generated/fid"], float) and row["generated/fid"] > 0
    assert float(read_csv(output_dir / "fid" / "results.csv")[0]["generated/fid"]) == row["generated/fid"]
    report = result.outputs[ev.id][0][0]
    assert "| generated/fid | " in report and "| higher |" in report.split("| generated/fid |")[1].splitlines()[0]


def test_fid_missing_weights_say_which_file_where(host, node, inputs, output_dir):
    from tests.inception_toy import INCEPTION_FILES

    folder = host.pack_import("antipure_comfy.evaluate").weights_folder()
    if any((Path(folder) / name).is_file() for name in INCEPTION_FILES):
        pytest.fail(f"{folder} holds real FID weights; this test needs a host without them")
    out = node.execute(clean=_img(b=2), generated=_img(b=2, seed=1), label="nofid", filename_prefix="nofid/results",
                       faces=False, patch_size=8)
    fid = json.loads((output_dir / "nofid" / "results.json").read_text())["nofid"][0]["generated/fid"]
    assert fid.startswith("not available: ") and INCEPTION_FILES[0] in fid and folder in fid
    assert f"generated/fid: not available: FID needs the standard FID Inception weights: put pytorch-fid's " \
           f"{INCEPTION_FILES[0]}" in out.args[0]
