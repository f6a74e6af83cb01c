"""Protect's aspl / fsmg / simac with the Surrogate Settings node on tiny SD1.x / SD2.x (v) / SDXL checkpoints."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import comfy.model_management
import comfy.utils
import folder_paths
import nodes

from tests.nodes.graph import GraphBuilder
from tests.toy import smooth_image

SIZE = (48, 40)  # w, h
# one or two outer iterations of one step each: the loop's every phase runs, and fast
FAST = dict(training="lora", train_steps=1, attack_steps=1, fsmg_train_steps=1, learning_rate=0.0, rank=2,
            target="attention", max_grad_norm=1.0, feature_weight=1.0, search_candidates=2, search_rounds=2,
            search_keep=100, search_cut=20, prior_weight=1.0, generated_class_images=1)


@pytest.fixture(scope="module")
def pack(host):
    return host.pack_import("nodes.protect"), host.pack_import("nodes.surrogate"), host.pack_import("antipure_comfy.bridge")


@pytest.fixture(scope="module")
def input_image(tmp_path_factory):
    folder = tmp_path_factory.mktemp("input")
    folder_paths.set_input_directory(str(folder))
    name = "face.png"
    img = smooth_image(1, SIZE[1], SIZE[0], seed=3)[0].permute(1, 2, 0).numpy()
    Image.fromarray((img * 255).round().astype(np.uint8)).save(folder / name)
    return name


def surrogate_graph(ckpt, image, method, steps=2, prefix="s", class_prompt=False, **settings):
    g = GraphBuilder(prefix="")
    loader = g.node("CheckpointLoaderSimple", ckpt_name=ckpt)
    text = g.node("CLIPTextEncode", clip=loader.out(1), text="a photo of sks person")
    img = g.node("LoadImage", image=image)
    extra = {}
    if class_prompt:
        extra["class_positive"] = g.node("CLIPTextEncode", clip=loader.out(1), text="a photo of person").out(0)
    sur = g.node("AntiPureSurrogateSettings", **{**FAST, **settings}, **extra)
    protect = g.node("AntiPureProtect", image=img.out(0), model=loader.out(0), vae=loader.out(2),
                     positive=text.out(0), method=method, eta=8.0, steps=steps, alpha=2.0, seed=0,
                     random_start=False, eot_samples=1, surrogate_settings=sur.out(0))
    g.node("SaveImage", images=protect.out(0), filename_prefix=prefix)
    return g, protect


def load_u8(path):
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def denoised(model, cond):
    x = 3.0 * torch.randn((1, 4, 5, 6), generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        comfy.model_management.load_models_gpu([model])
        return model.model.apply_model(x, torch.tensor([3.0]), c_crossattn=cond[0][0]).float().clone()


def test_methods_listed_and_node_registered(pack):
    protect_mod, _, _ = pack
    options = protect_mod.AntiPureProtect.define_schema().inputs[4].options
    assert {"aspl", "fsmg", "simac"} <= set(options)
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS["AntiPureSurrogateSettings"].startswith("AntiPure")


@pytest.mark.parametrize("family,method,extra", [
    ("sd15", "aspl", {}),
    ("sd15", "fsmg", {}),
    ("sd20v", "aspl", {"class_prompt": True}),   # prior preservation with model-generated class images
    ("sd20v", "simac", {}),
    ("sdxl", "simac", {}),
    ("sdxl", "fsmg", {}),
])
def test_graph_saves_bounded_png_with_progress_per_inner_step(graph, tiny_checkpoint, input_image, output_dir,
                                                              pack, family, method, extra):
    prefix = f"sur_{family}_{method}"
    g, protect = surrogate_graph(tiny_checkpoint(family), input_image, method, prefix=prefix, **extra)
    result = graph.run(g)
    assert result.ok, result.error
    files = sorted(output_dir.glob(f"{prefix}_*.png"))
    assert len(files) == 1
    out, ref = load_u8(files[0]), load_u8(folder_paths.get_annotated_filepath(input_image))
    diff = np.abs(out - ref)
    assert out.shape == ref.shape and diff.max() <= 8 and diff.max() >= 1
    # every training and attack step (and simac's search rounds) advances the node's bar by one
    values = [v for n, v, t in result.progress if n == protect.id]
    # aspl: surrogate, attack, model, surrogate, attack; fsmg: fine-tune, attack x 2; simac: 2 search rounds + aspl's
    total = {"aspl": 5, "fsmg": 3, "simac": 7}[method]
    assert values == list(range(1, total + 1))


@pytest.mark.parametrize("training", ["lora", "full"])
def test_user_model_unchanged(pack, tiny_model, encode_text, training):
    protect_mod, surrogate_mod, _ = pack
    model, clip, vae = tiny_model("sd15")
    cond = encode_text(clip)
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    base = denoised(model, cond)
    settings = surrogate_mod.AntiPureSurrogateSettings.execute(**{**FAST, "training": training}).args[0]
    x = smooth_image(1, 32, 32).movedim(1, -1)
    with torch.inference_mode():
        out = protect_mod.AntiPureProtect.execute(x, model, vae, cond, "aspl", 8.0, 3, 2.0, 0, False, 1,
                                                  surrogate_settings=settings).args[0]
    assert not torch.equal(out, x) and (out - x).abs().max() <= 8 / 255 + 1e-6
    after = model.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.weight_wrapper_patches == {} and torch.equal(denoised(model, cond), base)


def test_full_training_attaches_a_difference_on_every_unet_weight(host, tiny_model):
    model, _, _ = tiny_model("sd15")
    mp, params = host.pack_import("antipure_comfy.surrogate").attach_full(model)
    weights = [n for n, p in model.model.diffusion_model.named_parameters()]
    assert len(params) == len(mp.weight_wrapper_patches) == len(weights)
    assert all(not p.is_inference() and p.requires_grad and not p.any() for p in params)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_bridge_features_are_last_up_block_resblocks_with_gradient(pack, tiny_model, encode_text, family):
    _, _, bridge = pack
    model, clip, vae = tiny_model(family)
    cond = encode_text(clip)
    unet = model.model.diffusion_model
    with torch.inference_mode():
        with bridge.session(model, vae, cond) as dm:
            z = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
            t = torch.tensor([10, 500])
            eps, feats = dm.predict_noise_features(z, t)
            assert torch.allclose(eps, dm.predict_noise(z, t), atol=1e-5)
            g, = torch.autograd.grad(sum(f.square().mean() for f in feats), z)
    assert len(feats) == unet.num_res_blocks[0] + 1
    assert all(f.shape[0] == 2 and f.shape[-2:] == (6, 6) and f.shape[1] == unet.model_channels for f in feats)
    assert g.abs().sum() > 0


def test_cancel_mid_run_leaves_no_output(graph, tiny_checkpoint, input_image, output_dir):
    g, protect = surrogate_graph(tiny_checkpoint("sd15"), input_image, "aspl", steps=10, prefix="sur_cancel")
    graph.interrupt_after(3)
    result = graph.run(g)
    assert not result.ok and result.event("execution_interrupted")
    assert protect.id not in result.outputs
    assert len([v for n, v, t in result.progress if n == protect.id]) <= 4  # stopped within one inner step
    assert list(output_dir.glob("sur_cancel_*.png")) == []


def test_zero_inner_steps_rejected_by_name(graph, tiny_checkpoint, input_image):
    for name in ("train_steps", "attack_steps", "fsmg_train_steps"):
        g, _ = surrogate_graph(tiny_checkpoint("sd15"), input_image, "aspl", **{name: 0})
        result = graph.run(g)
        assert not result.ok and name in (result.error or ""), result.error


def test_prior_inputs(pack, tiny_model, encode_text):
    protect_mod, surrogate_mod, _ = pack
    model, clip, vae = tiny_model("sd15")
    cond, class_cond = encode_text(clip), encode_text(clip, "a photo of person")
    node = surrogate_mod.AntiPureSurrogateSettings
    x = smooth_image(1, 32, 32).movedim(1, -1)
    with pytest.raises(ValueError, match="class_positive"):
        node.execute(**FAST, class_images=x)
    no_generation = node.execute(**{**FAST, "generated_class_images": 0}, class_positive=class_cond).args[0]
    with pytest.raises(ValueError, match="class_images: prior preservation"), torch.inference_mode():
        protect_mod.AntiPureProtect.execute(x, model, vae, cond, "aspl", 8.0, 1, 2.0, 0, False, 1,
                                            surrogate_settings=no_generation)
    # supplied class images and a separate training set (any size) work
    given = node.execute(**FAST, class_positive=class_cond, class_images=smooth_image(2, 40, 40, seed=4).movedim(1, -1),
                         train_images=smooth_image(2, 24, 24, seed=5).movedim(1, -1)).args[0]
    with torch.inference_mode():
        out = protect_mod.AntiPureProtect.execute(x, model, vae, cond, "aspl", 8.0, 2, 2.0, 0, False, 1,
                                                  surrogate_settings=given).args[0]
    assert out.shape == x.shape and (out - x).abs().max() <= 8 / 255 + 1e-6
