"""AntiPureProtect and the guidance nodes in real graphs on tiny SD1.x / SD2.x (v) / SDXL checkpoints."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import folder_paths
import nodes

from tests.nodes.graph import GraphBuilder
from tests.toy import smooth_image


@pytest.fixture(scope="module")
def input_image(tmp_path_factory):
    """Write test PNGs into the host's input folder; returns a function size -> file name."""
    folder = tmp_path_factory.mktemp("input")
    folder_paths.set_input_directory(str(folder))

    def make(w: int, h: int) -> str:
        name = f"face_{w}x{h}.png"
        if not (folder / name).exists():
            img = smooth_image(1, h, w, seed=w * h)[0].permute(1, 2, 0).numpy()
            Image.fromarray((img * 255).round().astype(np.uint8)).save(folder / name)
        return name
    return make


def guidance_inputs(g) -> dict:
    """Protect's guidance inputs from PFG and ETG nodes at their defaults."""
    return {"frequency_guidance": g.node("AntiPureFrequencyGuidance", weight=0.5, patch_size=8,
                                         reduction="signed").out(0),
            "timestep_guidance": g.node("AntiPureTimestepGuidance", weight=0.5, rule="offset", offset=0,
                                        scale=2.0, stop_gradient=True).out(0)}


def protect_graph(ckpt: str, image: str, method: str = "antipure", steps: int = 2, guidance: bool = True,
                  prefix: str = "protected"):
    g = GraphBuilder(prefix="")
    loader = g.node("CheckpointLoaderSimple", ckpt_name=ckpt)
    text = g.node("CLIPTextEncode", clip=loader.out(1), text="a photo of sks person")
    img = g.node("LoadImage", image=image)
    extra = guidance_inputs(g) if guidance else {}
    protect = g.node("AntiPureProtect", image=img.out(0), model=loader.out(0), vae=loader.out(2),
                     positive=text.out(0), method=method, eta=8.0, steps=steps, alpha=2.0, seed=0,
                     random_start=False, eot_samples=1, **extra)
    g.node("SaveImage", images=protect.out(0), filename_prefix=prefix)
    g.node("PreviewImage", images=protect.out(1))
    return g, protect


def saved_pngs(output_dir, prefix):
    return sorted(output_dir.glob(f"{prefix}_*.png"))


def load_u8(path):
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


@pytest.mark.parametrize("family,size,method", [
    ("sd15", (500, 333), "advdm"),    # odd size on the real VAE: the output keeps it exactly
    ("sd15", (40, 56), "antipure"),
    ("sd20v", (48, 40), "antipure"),
    ("sdxl", (48, 40), "antipure"),
])
def test_protect_graph_saves_bounded_png(graph, tiny_checkpoint, input_image, output_dir, family, size, method):
    name = input_image(*size)
    prefix = f"protect_{family}_{size[0]}x{size[1]}_{method}"
    steps = 1 if size[0] > 256 else 2
    g, protect = protect_graph(tiny_checkpoint(family), name, method=method, steps=steps, prefix=prefix)
    result = graph.run(g)
    assert result.ok, result.error
    files = saved_pngs(output_dir, prefix)
    assert len(files) == 1
    out = load_u8(files[0])
    ref = load_u8(folder_paths.get_annotated_filepath(name))
    assert out.shape == ref.shape == (size[1], size[0], 3)
    diff = np.abs(out - ref)
    assert diff.max() <= 8 and diff.max() >= 1 and (diff > 0).mean() > 0.05
    # one progress update per PGD step from the protect node
    assert [v for n, v, t in result.progress if n == protect.id] == list(range(1, steps + 1))


def test_ablation_without_guidance_differs(graph, tiny_checkpoint, input_image, output_dir):
    name = input_image(40, 56)
    runs = {}
    for guidance in (True, False):
        prefix = f"ablation_{guidance}"
        g, _ = protect_graph(tiny_checkpoint("sd15"), name, steps=2, guidance=guidance, prefix=prefix)
        assert graph.run(g).ok
        runs[guidance] = load_u8(saved_pngs(output_dir, prefix)[0])
    assert not np.array_equal(runs[True], runs[False])


def test_cancel_mid_run_leaves_no_output(graph, tiny_checkpoint, input_image, output_dir):
    name = input_image(40, 56)
    g, protect = protect_graph(tiny_checkpoint("sd15"), name, steps=20, prefix="cancelled")
    graph.interrupt_after(2)
    result = graph.run(g)
    assert not result.ok and result.event("execution_interrupted")
    assert protect.id not in result.outputs
    steps_done = [v for n, v, t in result.progress if n == protect.id]
    assert len(steps_done) <= 3  # stopped within one step of the cancel
    assert saved_pngs(output_dir, "cancelled") == []


@pytest.mark.parametrize("name", ["eta", "alpha"])
def test_the_widget_refuses_what_the_node_would_refuse_at_run_time(host, graph, tiny_checkpoint, input_image, name):
    check_inputs = host.pack_import("antipure_comfy.protect").check_inputs

    g, _ = protect_graph(tiny_checkpoint("sd15"), input_image(40, 56), steps=1)
    prompt = g.finalize()
    node = next(v for v in prompt.values() if v["class_type"] == "AntiPureProtect")
    node["inputs"][name] = 0.0
    result = graph.run(prompt)
    assert not result.ok and result.validation is not None  # refused before anything runs
    assert name in str(result.validation[3]), result.validation
    low = nodes.NODE_CLASS_MAPPINGS["AntiPureProtect"].INPUT_TYPES()["required"][name][1]["min"]
    budget = {"eta": 8.0, "alpha": 1.0, name: low}
    check_inputs("antipure", budget["eta"], budget["alpha"], None, object(), object(), object())  # its min is accepted
    with pytest.raises(ValueError, match=name):
        check_inputs("antipure", **{"eta": 8.0, "alpha": 1.0, name: 0.0}, purifier=None, model=object(),
                     vae=object(), positive=object())


def test_steps_zero_returns_input(graph, tiny_checkpoint, input_image, output_dir):
    name = input_image(40, 56)
    g, _ = protect_graph(tiny_checkpoint("sd15"), name, steps=0, prefix="zero")
    assert graph.run(g).ok
    assert np.array_equal(load_u8(saved_pngs(output_dir, "zero")[0]),
                          load_u8(folder_paths.get_annotated_filepath(name)))


def test_pack_registers_nodes_with_display_names(host):
    for node_id in ("AntiPureProtect", "AntiPureFrequencyGuidance", "AntiPureTimestepGuidance"):
        assert node_id in nodes.NODE_CLASS_MAPPINGS
        assert nodes.NODE_DISPLAY_NAME_MAPPINGS[node_id].startswith("AntiPure")
    # loaded through the host's custom-node path, which records only modules that imported cleanly
    assert host.pack_loaded and host.pack_dir.name in nodes.LOADED_MODULE_DIRS


def test_grayscale_and_alpha_inputs_adapt(host, tiny_model, encode_text):
    protect_mod = host.pack_import("nodes.protect")
    model, clip, vae = tiny_model("sd15")
    cond = encode_text(clip)
    rgba = torch.cat([smooth_image(1, 32, 40).movedim(1, -1), torch.full((1, 32, 40, 1), 0.25)], dim=-1)
    with torch.inference_mode():
        out, delta = protect_mod.AntiPureProtect.execute(rgba, model, vae, cond, "advdm", 8.0, 1, 2.0, 0,
                                                         False, 1).args
    assert out.shape == rgba.shape and torch.equal(out[..., 3], rgba[..., 3])
    assert (out[..., :3] - rgba[..., :3]).abs().max() <= 8 / 255 + 1e-6
    assert delta.shape == (1, 32, 40, 3)


def test_gradient_checkpointing_same_result_and_unpatched(host, tiny_model, encode_text):
    """Checkpointing only recomputes activations: same perturbation, and the shared modules are restored."""
    protect_mod = host.pack_import("nodes.protect")
    model, clip, vae = tiny_model("sd15")
    cond = encode_text(clip)
    x = smooth_image(1, 32, 32).movedim(1, -1)
    runs = []
    for enabled in (False, True):
        with torch.inference_mode():
            runs.append(protect_mod.AntiPureProtect.execute(x, model, vae, cond, "antipure", 8.0, 2, 2.0, 0, False,
                                                            1, gradient_checkpointing=enabled).args[0])
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], x)
    patched = [m for part in (model.model.diffusion_model, vae.first_stage_model)
               for m in part.modules() if hasattr(m, "org_forward")]
    assert patched == []


def test_gradient_checkpointing_patches_unet_and_vae_only_inside(host, tiny_model):
    ckpt = host.pack_import("antipure_comfy.checkpointing")
    model, _, vae = tiny_model("sd15")
    modules = ckpt.checkpointed_modules(model, vae)
    assert any(m in set(vae.first_stage_model.modules()) for m in modules)
    with ckpt.gradient_checkpointing(model, vae):
        assert all(hasattr(m, "org_forward") for m in modules)
    assert not any(hasattr(m, "org_forward") for m in modules)
