"""One Purify node per purifier family: the same results as the deprecated single node, and only their own inputs."""
from __future__ import annotations

import pytest
import torch

from tests.nodes.test_purify_node import (PURIFY_DEFAULTS, base_graph, input_image,  # noqa: F401 - fixtures
                                          upscale_model_name)

W, H = 28, 20
SPLIT = {  # method -> (split node, its inputs beyond image and the models)
    "diffpure": ("AntiPurePurifyDiffPure", ["seed", "t_star", "steps", "sampler_name", "scheduler", "cfg"]),
    "gridpure": ("AntiPurePurifyGrIDPure", ["seed", "grid_window", "grid_stride", "grid_iterations", "grid_gamma",
                                            "grid_t_star", "grid_rounds", "steps", "sampler_name", "scheduler", "cfg"]),
    "impress": ("AntiPurePurifyIMPRESS", ["impress_iterations", "impress_lr", "impress_similarity",
                                          "impress_weight"]),
    "noisy_upscale": ("AntiPurePurifyNoisyUpscale", ["seed", "noise_sigma", "upscale_scale"]),
    "jpeg": ("AntiPurePurifyJPEG", ["jpeg_quality"]),
    "gaussian_blur": ("AntiPurePurifyBlur", ["blur_sigma"]),
    "resize": ("AntiPurePurifyResize", ["resize_scale"]),
    "gaussian_noise": ("AntiPurePurifyNoise", ["seed", "noise_sigma"]),
}
MODELS = ("model", "vae", "positive", "pixel_model")
# settings away from the defaults, so that a parameter lost on the way would change the result
PARAMS = dict(PURIFY_DEFAULTS, seed=7, t_star=0.2, steps=2, sampler_name="euler_ancestral", cfg=1.5, grid_window=16,
              grid_stride=8, grid_iterations=2, grid_gamma=0.2, grid_t_star=0.05, grid_rounds=2, noise_sigma=0.07,
              upscale_scale=0.4, jpeg_quality=40, blur_sigma=1.5, resize_scale=0.3, impress_iterations=2,
              impress_lr=0.02, impress_similarity="mse", impress_weight=0.2, pixel_diffpure_size=0)


def inputs_of(node_class) -> dict:
    schema = node_class.define_schema()
    return {i.id: i for i in schema.inputs}


def test_every_purifier_has_a_node_with_only_its_own_inputs(host):
    import nodes

    PURIFIERS = host.pack_import("antipure_core.purify").PURIFIERS
    legacy = inputs_of(nodes.NODE_CLASS_MAPPINGS["AntiPurePurify"])
    assert set(SPLIT) == set(PURIFIERS)
    for method, (node_id, own) in SPLIT.items():
        split = inputs_of(nodes.NODE_CLASS_MAPPINGS[node_id])
        widgets = [k for k, i in split.items() if k not in ("image", "model", "vae", "positive", "negative",
                                                          "pixel_model", "upscale_model", "pixel_diffpure_size")]
        assert widgets == own, method
        for name, inp in split.items():  # shared inputs keep their names, defaults and ranges
            assert name in legacy, f"{node_id}.{name} is not an input of the single node"
            for attr in ("default", "min", "max", "step", "options"):
                assert getattr(inp, attr, None) == getattr(legacy[name], attr, None), f"{node_id}.{name}.{attr}"


def add_pair(g, method, image, models: dict):
    """The deprecated node and the method's own node on the same image; returns both."""
    node_id, own = SPLIT[method]
    old = g.node("AntiPurePurify", image=image, **models, **{**PARAMS, "method": method})
    takes = {"diffpure": MODELS, "gridpure": MODELS, "impress": ("vae",), "noisy_upscale": ("upscale_model",)}
    split_models = {k: v for k, v in models.items() if k in takes.get(method, ())}
    if method == "diffpure" and "pixel_model" in models:
        own = own + ["pixel_diffpure_size"]
    new = g.node(node_id, image=image, **split_models, **{k: PARAMS[k] for k in own})
    for node in (old, new):  # an output node each, so the executor runs them
        g.node("PreviewImage", images=node.out(0))
    return old, new


def assert_pairs_equal(result, pairs):
    assert result.ok, result.error
    for method, (old, new) in pairs.items():
        a, b = result.outputs[old.id][0][0], result.outputs[new.id][0][0]
        assert a.shape == (1, H, W, 3), method
        assert torch.equal(a, b), f"{method}: the split node differs from the single node"


def test_split_nodes_match_the_single_node_on_the_sd_model(graph, tiny_checkpoint, input_image,  # noqa: F811
                                                            upscale_model_name):  # noqa: F811
    g, loader, text, img = base_graph(tiny_checkpoint("sd15"), [input_image(W, H)])
    up = g.node("UpscaleModelLoader", model_name=upscale_model_name)
    sd = {"model": loader.out(0), "vae": loader.out(2), "positive": text.out(0)}
    pairs = {m: add_pair(g, m, img, {**sd, "upscale_model": up.out(0)} if m == "noisy_upscale" else
                         sd if m in ("diffpure", "gridpure", "impress") else {}) for m in SPLIT}
    assert_pairs_equal(graph.run(g), pairs)


def test_split_nodes_match_the_single_node_on_the_pixel_model(graph, tiny_pixel_checkpoint, input_image):  # noqa: F811
    g, _, _, img = base_graph(None, [input_image(W, H)])
    pixel = g.node("AntiPureLoadPixelDiffusion", ckpt_name=tiny_pixel_checkpoint, weight_dtype="fp32",
                   num_head_channels=64)
    pairs = {m: add_pair(g, m, img, {"pixel_model": pixel.out(0)}) for m in ("diffpure", "gridpure")}
    assert_pairs_equal(graph.run(g), pairs)


@pytest.mark.parametrize("node_id,message", [
    ("AntiPurePurifyDiffPure", "purifier 'diffpure' needs MODEL and VAE; connect MODEL and VAE, or connect "
                               "pixel_model"),
    ("AntiPurePurifyGrIDPure", "purifier 'gridpure' needs MODEL and VAE; connect MODEL and VAE, or connect "
                               "pixel_model"),
])
def test_split_diffusion_nodes_name_the_missing_model(graph, input_image, node_id, message):  # noqa: F811
    g, _, _, img = base_graph(None, [input_image(W, H)])
    own = SPLIT["diffpure" if "Diff" in node_id else "gridpure"][1]
    node = g.node(node_id, image=img, **{k: PARAMS[k] for k in own})
    g.node("PreviewImage", images=node.out(0))
    result = graph.run(g)
    assert not result.ok
    errors = result.event("execution_error")
    assert errors and errors[0]["node_type"] == node_id and message in errors[0]["exception_message"]
