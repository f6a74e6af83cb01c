"""Protect's purified_advdm / purified_aspl with the Purified-Attack Settings node and the tiny pixel purifier,
on tiny SD1.x / SD2.x (v) / SDXL checkpoints: every route, every purifier of the set, bounds, determinism,
the user's models untouched, cancel, and the errors for a missing input."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import folder_paths
import nodes

from tests.nodes.graph import GraphBuilder
from tests.toy import smooth_image

W, H = 48, 32  # 16-px windows: a 3 x 2 grid plus the packed corners
ETA = 8.0
#: the settings node's inputs, small: 3-step chains, 16-px GrIDPure windows, 2 DDIM steps of SDEdit
SMALL = dict(route="full", k=1, windows="random", purified_weight=0.5, gridpure_weight=1.0, diffpure_weight=0.0,
             sdedit_weight=0.0, jpeg_weight=0.0, resize_weight=0.0, blur_weight=0.0, grid_t_star=3, grid_window=16,
             grid_stride=0, grid_gamma=0.1, diffpure_t_star=3, diffpure_size=0, sdedit_t_star=0.05, sdedit_steps=2,
             jpeg_quality=75, resize_scale=0.5, blur_sigma=1.0, lowpass_sigma=0.0, checkpoint=True)
PROTECT = dict(eta=ETA, steps=2, alpha=2.0, seed=0, random_start=False, eot_samples=1)
#: per route, a purifier set that makes every family run GrIDPure (pixel) and SDEdit (MODEL + VAE)
ROUTE_SETS = {"one_step": dict(gridpure_weight=0.0, sdedit_weight=1.0),
              "k_step": dict(k=2, windows="all"),
              "full": dict(sdedit_weight=1.0, jpeg_weight=1.0, lowpass_sigma=2.0)}


@pytest.fixture(scope="module")
def pack(host):
    return (host.pack_import("nodes.protect").AntiPureProtect,
            host.pack_import("nodes.purified").AntiPurePurifiedSettings,
            host.pack_import("nodes.pixel_diffusion").AntiPureLoadPixelDiffusion)


@pytest.fixture(scope="module")
def input_image(tmp_path_factory):
    folder = tmp_path_factory.mktemp("input")
    folder_paths.set_input_directory(str(folder))
    img = smooth_image(1, H, W, seed=5)[0].permute(1, 2, 0).numpy()
    Image.fromarray((img * 255).round().astype(np.uint8)).save(folder / "face.png")
    return "face.png"


@pytest.fixture(scope="module")
def pixel(pack, tiny_pixel_checkpoint):
    with torch.inference_mode():  # as the executor runs the loader
        return pack[2].execute(tiny_pixel_checkpoint, "fp32", 32).result[0]


def clean_image(b: int = 1) -> torch.Tensor:
    return smooth_image(b, H, W, seed=3).movedim(1, -1)  # BHWC on the 8-bit grid


def settings(pack, **changes):
    return pack[1].execute(**{**SMALL, **changes}).result[0]


def run(pack, family_model, method="purified_advdm", image=None, **kw):
    model, cond, vae = family_model
    x = clean_image() if image is None else image
    with torch.inference_mode():
        return pack[0].execute(x, model, vae, cond, method, **{**PROTECT, **kw}).result[0]


@pytest.fixture(scope="module")
def sd15(tiny_model, encode_text):
    model, clip, vae = tiny_model("sd15")
    return model, encode_text(clip), vae


def test_node_registered_and_inputs_keep_saved_graphs_loading(pack):
    protect, settings_node, _ = pack
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS["AntiPurePurifiedSettings"] == "AntiPure Purified-Attack Settings"
    schema = protect.define_schema()
    ids = [i.id for i in schema.inputs]
    assert {"purified_advdm", "purified_aspl"} <= set(schema.inputs[ids.index("method")].options)
    # the new input is optional and last: widget values and links of saved graphs keep their places
    assert ids[-2:] == ["surrogate_settings", "purified_settings"] and schema.inputs[-1].optional
    s = settings_node.define_schema()
    assert all(i.tooltip for i in s.inputs) and [i.id for i in s.inputs if i.optional] == ["sdedit_positive"]


def protect_graph(ckpt, image, pixel_ckpt, routes=tuple(ROUTE_SETS), steps=2, advdm=True):
    """Loader → Protect (purified_advdm, one node per route, pixel purifier + MODEL/VAE/prompt) and Protect
    (advdm), each into a preview."""
    g = GraphBuilder(prefix="")
    loader = g.node("CheckpointLoaderSimple", ckpt_name=ckpt)
    text = g.node("CLIPTextEncode", clip=loader.out(1), text="a photo of sks person")
    attacker = g.node("CLIPTextEncode", clip=loader.out(1), text="a photo")
    img = g.node("LoadImage", image=image)
    pix = g.node("AntiPureLoadPixelDiffusion", ckpt_name=pixel_ckpt, weight_dtype="fp32", num_head_channels=32)
    common = dict(image=img.out(0), model=loader.out(0), vae=loader.out(2), positive=text.out(0),
                  **{**PROTECT, "steps": steps})
    protects = {}
    for route in routes:
        s = g.node("AntiPurePurifiedSettings", **{**SMALL, "route": route, **ROUTE_SETS[route]},
                   sdedit_positive=attacker.out(0))
        protects[route] = g.node("AntiPureProtect", method="purified_advdm", purifier=pix.out(0),
                                 purified_settings=s.out(0), **common)
    if advdm:
        protects["advdm"] = g.node("AntiPureProtect", method="advdm", **common)
    for p in protects.values():
        g.node("PreviewImage", images=p.out(0))
    return g, img, protects


@pytest.mark.parametrize("family", ["sd15", "sd20v", "sdxl"])
def test_every_route_runs_bounded_and_differs_from_advdm(graph, tiny_checkpoint, tiny_pixel_checkpoint, input_image,
                                                         family):
    g, img, protects = protect_graph(tiny_checkpoint(family), input_image, tiny_pixel_checkpoint)
    result = graph.run(g)
    assert result.ok, result.error
    clean = result.outputs[img.id][0][0]
    advdm = result.outputs[protects["advdm"].id][0][0]
    for route in ROUTE_SETS:
        out = result.outputs[protects[route].id][0][0]
        d = (out - clean).abs()
        assert out.shape == clean.shape == (1, H, W, 3) and torch.isfinite(out).all()
        assert d.max() <= ETA / 255 + 1e-6 and (d > 0.5 / 255).float().mean() > 0.05, route
        assert not torch.equal(out, advdm), route
        # one progress update per PGD step
        assert [v for n, v, t in result.progress if n == protects[route].id] == [1, 2], route


@pytest.mark.parametrize("purifier", ["gridpure", "diffpure", "sdedit", "jpeg", "resize", "blur"])
def test_each_purifier_of_the_set_runs_alone(pack, sd15, pixel, purifier):
    """Only the purified term (w = 1) through one purifier; the chains on the one_step / k_step routes."""
    weights = {f"{n}_weight": float(n == purifier)
               for n in ("gridpure", "diffpure", "sdedit", "jpeg", "resize", "blur")}
    s = settings(pack, purified_weight=1.0, route="k_step", k=1, diffpure_size=32, **weights)
    out = run(pack, sd15, purifier=pixel, purified_settings=s, steps=1)
    d = (out - clean_image()).abs()
    assert d.max() <= ETA / 255 + 1e-6 and d.max() > 0.5 / 255


def test_deterministic_per_seed(pack, sd15, pixel):
    s = settings(pack, route="one_step", sdedit_weight=1.0, jpeg_weight=1.0)
    a, b = (run(pack, sd15, purifier=pixel, purified_settings=s) for _ in range(2))
    c = run(pack, sd15, purifier=pixel, purified_settings=s, seed=1)
    assert torch.equal(a, b) and not torch.equal(a, c)


def _snapshot(module: torch.nn.Module) -> dict:
    return {k: (v, v.clone(), v.requires_grad) for k, v in module.state_dict(keep_vars=True).items()}


def _unchanged(module: torch.nn.Module, snap: dict) -> bool:
    now = module.state_dict(keep_vars=True)
    return now.keys() == snap.keys() and all(
        now[k] is v and torch.equal(v, c) and v.requires_grad == g for k, (v, c, g) in snap.items())


@pytest.mark.parametrize("method", ["purified_advdm", "purified_aspl"])
def test_inputs_untouched_bit_for_bit(pack, host, sd15, pixel, method):
    model, cond, vae = sd15
    x = clean_image()
    x_copy, cond_copy = x.clone(), cond[0][0].clone()
    snaps = [(m, _snapshot(m)) for m in (model.model, vae.first_stage_model, pixel)]
    patches = (dict(model.patches), dict(model.weight_wrapper_patches), dict(model.object_patches))
    s = settings(pack, gridpure_weight=1.0, sdedit_weight=1.0, windows="all")
    kw = {}
    if method == "purified_aspl":  # one outer iteration of one training and one attack step
        kw["surrogate_settings"] = host.pack_import("nodes.surrogate").AntiPureSurrogateSettings.execute(
            training="lora", train_steps=1, attack_steps=1, fsmg_train_steps=1, learning_rate=0.0, rank=2,
            target="attention", max_grad_norm=1.0, feature_weight=1.0, search_candidates=2, search_rounds=2,
            search_keep=100, search_cut=20, prior_weight=1.0, generated_class_images=1).args[0]
    out = run(pack, sd15, method, image=x, purifier=pixel, purified_settings=s, gradient_checkpointing=True, **kw)
    assert not torch.equal(out, x) and (out - x).abs().max() <= ETA / 255 + 1e-6
    assert torch.equal(x, x_copy) and torch.equal(cond[0][0], cond_copy)
    assert all(_unchanged(m, snap) for m, snap in snaps)
    assert (dict(model.patches), dict(model.weight_wrapper_patches), dict(model.object_patches)) == patches
    assert pixel.unet.gradient_checkpointing is False


def test_cancel_mid_run_leaves_no_output(graph, tiny_checkpoint, tiny_pixel_checkpoint, input_image):
    g, _, protects = protect_graph(tiny_checkpoint("sd15"), input_image, tiny_pixel_checkpoint, routes=("full",),
                                   steps=10, advdm=False)
    graph.interrupt_after(2)
    result = graph.run(g)
    assert not result.ok and result.event("execution_interrupted")
    protect = protects["full"]
    assert protect.id not in result.outputs
    assert len([v for n, v, t in result.progress if n == protect.id]) <= 3  # stopped within one step


def test_without_pixel_purifiers_no_pixel_model_is_needed(pack, sd15):
    s = settings(pack, gridpure_weight=0.0, jpeg_weight=1.0, blur_weight=1.0)
    out = run(pack, sd15, purified_settings=s)
    assert not torch.equal(out, clean_image())


@pytest.mark.parametrize("case,match", [
    ("default_settings_no_purifier", r"purifier: gridpure in purified_advdm's purifier set \(the defaults"),
    ("diffpure_no_purifier", r"purifier: gridpure and diffpure .* set gridpure_weight and diffpure_weight to 0"),
    ("no_model", r"model: purified_advdm attacks the customization model .*missing: model"),
    ("sdedit_no_vae", r"vae: purified_aspl attacks .*SDEdit in the purifier set runs on them too"),
    ("pixel_model_as_model", "model: expected the host's MODEL"),
    ("latent_model_as_purifier", "purifier: got the host's latent MODEL"),
])
def test_missing_input_is_a_clear_error(pack, sd15, pixel, case, match):
    protect = pack[0]
    model, cond, vae = sd15
    full = dict(image=clean_image(), model=model, vae=vae, positive=cond, purifier=pixel, **PROTECT)
    kw = {"default_settings_no_purifier": dict(full, purifier=None),
          "diffpure_no_purifier": dict(full, purifier=None, purified_settings=settings(pack, diffpure_weight=1.0)),
          "no_model": dict(full, model=None),
          "sdedit_no_vae": dict(full, vae=None, method="purified_aspl",
                                purified_settings=settings(pack, sdedit_weight=1.0)),
          "pixel_model_as_model": dict(full, model=pixel),
          "latent_model_as_purifier": dict(full, purifier=model)}[case]
    with pytest.raises((ValueError, TypeError), match=match), torch.inference_mode():
        protect.execute(**{"method": "purified_advdm", **kw})


@pytest.mark.parametrize("changes,match", [
    (dict(gridpure_weight=0.0), "purifiers: every weight is 0"),
    (dict(route="k_step", k=0), "k: must be an integer"),
    (dict(grid_stride=32), r"stride: must be an integer in \[1, 16\]"),
    (dict(sdedit_positive="a photo"), "sdedit_positive: expected a CONDITIONING"),
])
def test_bad_settings_are_refused_at_the_settings_node(pack, changes, match):
    with pytest.raises(ValueError, match=match):
        settings(pack, **changes)


def test_settings_of_another_node_are_refused(pack, sd15, pixel):
    with pytest.raises(TypeError, match="purified_settings: expected the AntiPure Purified-Attack Settings output"), \
            torch.inference_mode():
        run(pack, sd15, purifier=pixel, purified_settings={"route": "full"})


def test_comparison_workflow_lane_runs(graph, tiny_checkpoint, tiny_pixel_checkpoint, input_image):
    """The shipped comparison's Purified-AdvDM lane (settings node, pixel purifier, GrIDPure, Evaluate), small."""
    from antipure.prompts import apply_sets, find_node
    from antipure.workflow_format import load_prompt
    from tests.nodes.host import PACK_DIR

    shutil.copy(folder_paths.get_annotated_filepath(input_image),
                Path(folder_paths.get_input_directory()) / "example.png")
    prompt = load_prompt(PACK_DIR / "example_workflows" / "antipure_baseline_comparison.json",
                         nodes.NODE_CLASS_MAPPINGS)
    lane = "Purified-AdvDM"
    apply_sets(prompt, [f"Checkpoint.ckpt_name={tiny_checkpoint('sd15')}",
                        f"Purifier.ckpt_name={tiny_pixel_checkpoint}",
                        "Purifier.num_head_channels=32", f"{lane}.steps=1", "Purified settings.grid_window=16",
                        "Purified settings.grid_t_star=3", f"{lane} purified.grid_window=16",
                        f"{lane} purified.grid_stride=8", f"{lane} purified.grid_iterations=1",
                        f"{lane} purified.grid_rounds=1"], nodes.NODE_CLASS_MAPPINGS)
    protect, scores, report = (find_node(prompt, f"{lane}{suffix}") for suffix in ("", " scores", " report"))
    assert prompt[protect]["inputs"]["method"] == "purified_advdm"
    result = graph.run(prompt, outputs=[report])
    assert result.ok, result.error
    assert [v for n, v, t in result.progress if n == protect] == [1]
    assert "purified_advdm" in result.outputs[scores][0][0]  # Evaluate's markdown report
