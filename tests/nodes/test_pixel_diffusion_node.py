"""AntiPure Load Pixel Diffusion and Purify on a pixel-space ADM: a tiny random ADM file in the models folder."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import folder_paths

from tests.nodes.graph import GraphBuilder
from tests.nodes.test_purify_node import PURIFY_DEFAULTS
from tests.tiny_adm import random_adm

W, H = 40, 28  # not multiples of the ADM's down-sampling: padded inside the model, the output keeps the size


class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.fixture(scope="module")
def pixel_files(host, tmp_path_factory):
    """``models/pixel_diffusion`` for the test: a tiny ADM (.safetensors and .pt) and files it must refuse."""
    folder = tmp_path_factory.mktemp("pixel_diffusion")
    folder_paths.add_model_folder_path("pixel_diffusion", str(folder), is_default=True)
    sd = random_adm(seed=0).state_dict()
    save_file(sd, str(folder / "tiny_adm.safetensors"))
    torch.save(sd, folder / "tiny_adm.pt")
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 4, 3, 3),
               "first_stage_model.decoder.conv_in.weight": torch.zeros(8, 4, 3, 3)}, str(folder / "sd_like.safetensors"))
    save_file({"linear.weight": torch.zeros(2, 2)}, str(folder / "not_adm.safetensors"))
    torch.save({"x": Evil()}, folder / "evil.pt")
    return folder


def loader(g, name="tiny_adm.safetensors", **kw):
    return g.node("AntiPureLoadPixelDiffusion", ckpt_name=name, **{"weight_dtype": "fp32", "num_head_channels": 64, **kw})


def purify(g, image, pixel, **params):
    node = g.node("AntiPurePurify", image=image, pixel_model=pixel,
                  **{**PURIFY_DEFAULTS, "grid_rounds": 1, "pixel_diffpure_size": 0, **params})
    g.node("SaveImage", images=node.out(0), filename_prefix=f"pixel_{params.get('method', 'diffpure')}")
    return node


def image(g, w=W, h=H, batch=2):
    return g.node("EmptyImage", width=w, height=h, batch_size=batch, color=0x8060A0).out(0)


def test_loader_lists_the_folder_and_gives_the_core_model(host, pixel_files):
    pd = host.pack_import("nodes.pixel_diffusion")
    core = host.pack_import("antipure_core.pixel_diffusion")
    options = pd.AntiPureLoadPixelDiffusion.define_schema().inputs[0].options
    assert {"tiny_adm.safetensors", "tiny_adm.pt", "evil.pt"} <= set(options)
    with torch.inference_mode():  # as the executor runs nodes
        model = pd.AntiPureLoadPixelDiffusion.execute("tiny_adm.pt", "fp32", 32).result[0]
    assert isinstance(model, core.PixelDiffusion) and model.unet.config.num_head_channels == 32
    assert model.device == host.pack_import("antipure_comfy.comfy_host").model_management.get_torch_device()
    # weights are ordinary tensors: a backward pass through the model works (AntiPure Protect attacks it)
    assert not any(p.is_inference() for p in model.parameters())
    x = torch.rand(1, 3, 16, 16, requires_grad=True)
    model.predict_noise(x, torch.tensor([5])).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("method,params,progress_total", [
    ("diffpure", dict(t_star=0.004), 4),                                                  # t* = 4 DDPM steps
    ("diffpure", dict(t_star=0.002, pixel_diffpure_size=16), 2),                        # at 16 x 16 and back
    ("gridpure", dict(grid_window=16, grid_stride=8, grid_iterations=1, grid_rounds=2, grid_t_star=0.002),
     2 * 1 * (3 * 4 + 1) * 2),                                                            # rounds x windows x t*
])
def test_loader_then_purify_keeps_size(graph, pixel_files, method, params, progress_total):
    g = GraphBuilder(prefix="")
    img = image(g)
    node = purify(g, img, loader(g).out(0), method=method, **params)
    result = graph.run(g)
    assert result.ok, result.error
    out = result.outputs[node.id][0][0]
    src = result.outputs[img[0]][0][0]
    assert out.shape == (2, H, W, 3) and torch.isfinite(out).all() and 0 <= out.min() and out.max() <= 1
    assert (out - src).abs().mean() > 1e-3
    steps = [(v, t) for n, v, t in result.progress if n == node.id]
    assert steps == [(i, progress_total) for i in range(1, progress_total + 1)]


def test_pixel_purify_is_deterministic_per_seed(graph, pixel_files):
    outs = []
    for seed in (3, 3, 4):
        g = GraphBuilder(prefix="")
        node = purify(g, image(g, batch=1), loader(g, "tiny_adm.pt").out(0), method="diffpure", t_star=0.003,
                      seed=seed)
        graph.reset_cache()
        result = graph.run(g)
        assert result.ok, result.error
        outs.append(result.outputs[node.id][0][0])
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


def test_cancel_stops_within_one_step(graph, pixel_files):
    g = GraphBuilder(prefix="")
    node = purify(g, image(g, batch=1), loader(g).out(0), method="gridpure", grid_window=16, grid_stride=16,
                  grid_t_star=0.005)
    graph.interrupt_after(2)
    result = graph.run(g)
    assert not result.ok and result.event("execution_interrupted")
    assert node.id not in result.outputs
    assert [v for n, v, t in result.progress if n == node.id] == [1, 2]


@pytest.mark.parametrize("ckpt,message", [
    ("not_adm.safetensors", "not a guided-diffusion ADM state dict"),
    ("sd_like.safetensors", "Stable Diffusion (latent) checkpoint, not a pixel-space ADM; load it with Load Checkpoint"),
    ("evil.pt", "evil.pt is a pickle that safe loading (weights_only) refuses"),
])
def test_loader_refuses_other_files(graph, pixel_files, ckpt, message):
    g = GraphBuilder(prefix="")
    purify(g, image(g, batch=1), loader(g, ckpt).out(0), method="diffpure")
    result = graph.run(g)
    errors = result.event("execution_error")
    assert not result.ok and errors and errors[0]["node_type"] == "AntiPureLoadPixelDiffusion"
    assert message in errors[0]["exception_message"] and "ckpt_name" in errors[0]["exception_message"]


@pytest.mark.parametrize("size,params,message", [
    ((40, 28), dict(method="gridpure"), "grid_window: 256 px is larger than the image (28x40); lower grid_window"),
    ((6, 6), dict(method="diffpure"), "image: 6x6 px is too small for a pixel diffusion purifier"),
    ((6, 30), dict(method="gridpure", grid_window=8, grid_stride=8), "image: 30x6 px is too small"),
])
def test_purify_bad_sizes(graph, pixel_files, size, params, message):
    g = GraphBuilder(prefix="")
    purify(g, image(g, *size, batch=1), loader(g).out(0), **params)
    result = graph.run(g)
    errors = result.event("execution_error")
    assert not result.ok and errors and errors[0]["node_type"] == "AntiPurePurify"
    assert message in errors[0]["exception_message"]


def test_without_any_model_the_error_names_pixel_model(graph):
    g = GraphBuilder(prefix="")
    node = g.node("AntiPurePurify", image=image(g, batch=1), **{**PURIFY_DEFAULTS, "method": "gridpure"})
    g.node("SaveImage", images=node.out(0), filename_prefix="pixel_none")
    result = graph.run(g)
    assert not result.ok
    assert "connect MODEL and VAE, or connect pixel_model (AntiPure Load Pixel Diffusion)" in result.error
