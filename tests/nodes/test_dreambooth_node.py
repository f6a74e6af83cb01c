"""AntiPureCustomize with training=dreambooth on tiny SD1.x / SD2.x (v) / SDXL: full UNet, text encoder, prior, saving."""
from __future__ import annotations

import math

import pytest
import torch

import comfy.model_management
import folder_paths
import nodes

from tests.nodes.graph import GraphBuilder
from tests.nodes.test_customize_node import host_image, input_images, widget_defaults  # noqa: F401  (fixture)

SIZE = 32
PROMPT = "a photo of sks person"


@pytest.fixture(scope="module")
def node(host):
    return host.pack_import("nodes.customize").AntiPureCustomize


@pytest.fixture(scope="module")
def pack(host):
    return host.pack_import("antipure_comfy.bridge"), host.pack_import("antipure_core.customize")


@pytest.fixture(scope="module")
def checkpoints_dir(models_dir):
    return models_dir  # the host's first checkpoints folder: where Load Checkpoint lists files


def run(node, model, clip, vae, positive, images=None, **overrides):
    args = dict(model=model, vae=vae, positive=positive, training="dreambooth", lora_name="", steps=4,
                learning_rate=1e-4, rank=4, alpha=4.0, target="attention", batch_size=1, grad_accumulation=1,
                seed=0, gradient_checkpointing=False, train_text_encoder=False, max_grad_norm=1.0,
                checkpoint_name="", clip=clip)
    args.update(overrides)
    listed = {k: [v] for k, v in args.items() if v is not None}
    listed["images"] = images if images is not None else [host_image(1, SIZE, SIZE)]
    with torch.inference_mode():
        return node.execute(**listed).args


def fixed_loss(pack, model, vae, positive, x, prediction):
    """The denoising loss on fixed timesteps and noise (8 draws): the same question before and after training."""
    bridge, core = pack
    with bridge.session(model, vae, positive) as dm, torch.no_grad():
        z = core.encode_images(dm, x)
        return sum(float(core.denoising_loss(dm, z, positive, prediction, torch.Generator().manual_seed(k)))
                   for k in range(8)) / 8


def _bits(t):
    # bit patterns, not values: the host leaves CLIP-L's text_projection uninitialised (dreambooth.UNSET_TEXT_KEYS),
    # and a NaN there is never torch.equal to itself
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def weights(module):
    return {k: _bits(v).clone() for k, v in module.state_dict().items()}


def assert_unchanged(before, module):
    after = module.state_dict()
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], _bits(after[k]))]
    assert not changed, f"input weights changed: {changed[:5]}"


@pytest.mark.parametrize("family,prediction", [("sd15", "eps"), ("sd20v", "v"), ("sdxl", "eps")])
def test_loss_falls_on_a_repeated_image_and_inputs_stay_bit_for_bit(node, pack, tiny_model, encode_text, family,
                                                                    prediction):
    model, clip, vae = tiny_model(family)
    positive = encode_text(clip)
    x = host_image(1, SIZE, SIZE, seed=3)
    unet_before, clip_before = weights(model.model), weights(clip.cond_stage_model)
    mp, lora_name, loss, out_clip, saved = run(node, model, clip, vae, positive, images=[x.repeat(2, 1, 1, 1)],
                                               steps=8, batch_size=2, train_text_encoder=True)
    assert len(loss["loss"]) == 8 and all(math.isfinite(v) for v in loss["loss"]) and saved == lora_name == ""
    core_x = x.permute(0, 3, 1, 2)
    with torch.inference_mode():
        before = fixed_loss(pack, model, vae, positive, core_x, prediction)
        after = fixed_loss(pack, mp, vae, positive, core_x, prediction)
    assert after < 0.97 * before, (before, after)
    # the trained clone loaded last; the inputs' weights are still bit for bit what the loader made
    comfy.model_management.unload_all_models()
    assert_unchanged(unet_before, model.model)
    assert_unchanged(clip_before, clip.cond_stage_model)
    assert model.patches == {} and model.weight_wrapper_patches == {} and clip.patcher.patches == {}
    assert torch.equal(encode_text(clip)[0][0], positive[0][0])  # nothing of the training stays on the shared CLIP
    unet_keys = {k for k in model.model.state_dict() if k.startswith("diffusion_model.")}
    assert set(mp.patches) <= unet_keys and len(mp.patches) > 0.9 * len(unet_keys)


def test_text_encoder_training_changes_only_the_clip_asked_for(host, node, tiny_model, encode_text):
    model, clip, vae = tiny_model("sdxl")
    positive = encode_text(clip)
    same = run(node, model, clip, vae, positive, steps=1, train_text_encoder=False)[3]
    assert same is clip  # not asked: the CLIP passes through untouched
    trained = run(node, model, clip, vae, positive, steps=2, train_text_encoder=True)[3]
    assert trained is not clip and trained.patcher.is_clone(clip.patcher)
    # every text-encoder weight of both SDXL encoders is trained, nothing else of the CLIP
    castable = {f"{n}.{a}" for n, m in clip.cond_stage_model.named_modules() if hasattr(m, "weight_function")
                for a in ("weight", "bias") if isinstance(getattr(m, a, None), torch.Tensor)}
    castable -= host.pack_import("antipure_comfy.dreambooth").UNSET_TEXT_KEYS  # the host's uninitialised memory
    assert set(trained.patcher.patches) == castable
    assert {k.split(".")[0] for k in castable} == {"clip_l", "clip_g"}
    assert not any(k.startswith("diffusion_model.") for k in trained.patcher.patches)
    moved = [k for k, p in trained.patcher.patches.items() if p[0][1][0].abs().max() > 0]
    assert len(moved) > 0.5 * len(castable)
    assert not torch.equal(encode_text(trained)[0][0], encode_text(clip)[0][0])


def test_prior_preservation_changes_the_gradient(node, tiny_model, encode_text):
    model, clip, vae = tiny_model("sd15")
    positive, class_positive = encode_text(clip), encode_text(clip, "a photo of person")
    common = dict(steps=1, learning_rate=1e-3, max_grad_norm=0.0)
    plain = run(node, model, clip, vae, positive, **common)
    prior = dict(class_positive=class_positive, class_images=host_image(2, SIZE, SIZE, seed=5), class_image_count=2)
    with_prior = run(node, model, clip, vae, positive, prior_weight=1.0, **prior, **common)
    zero_weight = run(node, model, clip, vae, positive, prior_weight=0.0, **prior, **common)

    def diff(out, key="diffusion_model.out.2.weight"):
        return out[0].patches[key][0][1][0]
    assert not torch.equal(diff(with_prior), diff(plain))
    torch.testing.assert_close(diff(zero_weight), diff(plain))  # the prior stream leaves the instance draws alone
    assert with_prior[2]["loss"][0] > plain[2]["loss"][0]


def test_class_images_are_generated_by_the_untouched_model(node, tiny_model, encode_text, progress):
    model, clip, vae = tiny_model("sd15")
    before = weights(model.model)
    out = run(node, model, clip, vae, encode_text(clip), steps=2, class_positive=encode_text(clip, "a photo of person"),
              class_image_count=3, class_sampling_steps=2, class_sampler="euler")
    assert len(out[2]["loss"]) == 2 and out[2]["loss"][0] > 0
    assert progress  # sampling and training both report
    comfy.model_management.unload_all_models()
    assert_unchanged(before, model.model)


def test_checkpoint_saved_where_load_checkpoint_finds_it(node, tiny_model, encode_text, checkpoints_dir):
    model, clip, vae = tiny_model("sd15")
    positive = encode_text(clip)
    mp, lora_name, _, out_clip, saved = run(node, model, clip, vae, positive, steps=2, train_text_encoder=True,
                                            checkpoint_name="antipure/db_person")
    assert lora_name == "" and saved == "antipure/db_person_00001_.safetensors" and (checkpoints_dir / saved).is_file()
    assert saved in folder_paths.get_filename_list("checkpoints")
    with torch.inference_mode():
        loaded, loaded_clip, _ = nodes.CheckpointLoaderSimple().load_checkpoint(saved)[:3]
    x = 3.0 * torch.randn((1, 4, SIZE // 8, SIZE // 8), generator=torch.Generator().manual_seed(7))
    cond = encode_text(out_clip)
    torch.testing.assert_close(encode_text(loaded_clip)[0][0], cond[0][0], rtol=1e-4, atol=1e-4)
    outs = []
    for m in (mp, loaded, model):
        with torch.inference_mode():
            comfy.model_management.load_models_gpu([m])
            outs.append(m.model.apply_model(x, torch.tensor([3.0]), c_crossattn=cond[0][0]).float().clone())
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)
    assert (outs[0] - outs[2]).abs().max() > 1e-4  # the saved weights are the trained ones, not the base


def test_cancel_in_a_graph_leaves_no_checkpoint(graph, tiny_checkpoint, input_images, checkpoints_dir):  # noqa: F811
    g = GraphBuilder(prefix="")
    loader = g.node("CheckpointLoaderSimple", ckpt_name=tiny_checkpoint("sd15"))
    text = g.node("CLIPTextEncode", clip=loader.out(1), text=PROMPT)
    g.node("AntiPureCustomize", model=loader.out(0), vae=loader.out(2), clip=loader.out(1),
           images=g.node("LoadImage", image=input_images[0]).out(0), positive=text.out(0),
           **widget_defaults(training="dreambooth", steps=5, checkpoint_name="cancelled_db"))
    graph.interrupt_after(1)
    result = graph.run(g)
    assert not result.ok and result.event("execution_interrupted")
    assert not list(checkpoints_dir.rglob("cancelled_db*"))


@pytest.mark.parametrize("change,match", [
    (dict(class_positive="person"), "class_positive: expected a CONDITIONING"),
    (dict(training="lora", class_positive=True), "class_images: prior preservation"),  # lora generates none
    (dict(optimizer="adamw8bit"), "optimizer: adamw8bit"),
    (dict(precision="fp16"), "precision: expected one of"),
    (dict(training="full"), "training: expected one of"),
    (dict(checkpoint_name="../up"), "checkpoint_name: '../up' is not a usable file name"),
    (dict(checkpoint_name="db", clip=None), "clip: a saved checkpoint holds MODEL, CLIP and VAE"),
    (dict(images=[host_image(1, SIZE, SIZE)[:0]]), "images: the batch is empty"),
])
def test_bad_inputs_raise_naming_the_input(node, tiny_model, encode_text, checkpoints_dir, change, match):
    model, clip, vae = tiny_model("sd15")
    change = dict(change)
    if change.get("class_positive") is True:
        change["class_positive"] = encode_text(clip, "a photo of person")
    with pytest.raises(ValueError, match=match):
        run(node, model, change.pop("clip", clip), vae, encode_text(clip), **change)
    assert not list(checkpoints_dir.rglob("db_0*")) and not list(checkpoints_dir.parent.glob("up*"))


def test_trains_the_weights_the_host_samples_with_and_frees_its_copy(host, node, tiny_model, encode_text,
                                                                    monkeypatch):
    """A MODEL carrying a weight patch (a LoRA loader's, say) trains from the patched weights; its private copy is
    gone once the node returns (the host's model list holds no reference to it)."""
    import gc
    import weakref

    db = host.pack_import("antipure_comfy.dreambooth")
    model, clip, vae = tiny_model("sd15")
    key = next(k for k, v in model.model.state_dict().items() if k.startswith("diffusion_model.") and v.ndim == 2)
    shift = torch.randn(model.model.state_dict()[key].shape, generator=torch.Generator().manual_seed(1))
    patched = model.clone()
    patched.add_patches({key: (shift,)}, 1.0, 1.0)
    copies = []
    real_copy = db.trainable_copy

    def recording_copy(m, *args, **kwargs):
        out = real_copy(m, *args, **kwargs)
        copies.append((weakref.ref(out.model), out.model.state_dict()[key].detach().clone()))
        return out

    monkeypatch.setattr(db, "trainable_copy", recording_copy)
    host_weight = model.model.state_dict()[key].detach().clone()
    run(node, patched, clip, vae, encode_text(clip), steps=1)
    (twin, start), = copies
    assert torch.allclose(start, host_weight + shift, atol=1e-6)  # the patch is in the weights it trains
    assert torch.equal(model.model.state_dict()[key], host_weight)
    gc.collect()
    assert twin() is None, "the trained copy outlived the node"
