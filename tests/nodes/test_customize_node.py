"""AntiPureCustomize on tiny SD1.x / SD2.x (v) checkpoints: training, the saved LoRA, graphs, cancel, errors."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import safetensors
import torch
from PIL import Image

import comfy.lora
import comfy.model_management
import comfy.utils
import folder_paths
import nodes
from comfy_api.latest import io
from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete, ModelSamplingSD3

from tests.nodes.graph import GraphBuilder
from tests.toy import smooth_image

SIZE = 64
STEPS = 2
ATTENTION = (".to_q.weight", ".to_k.weight", ".to_v.weight", ".to_out.0.weight")


@pytest.fixture(scope="module")
def pack(host):
    return host.pack_import("nodes.customize"), host.pack_import("antipure_comfy.lora_adapters")


@pytest.fixture(scope="module")
def node(pack):
    return pack[0].AntiPureCustomize


@pytest.fixture(scope="module")
def loras_dir(host, tmp_path_factory):
    """A fresh folder registered as the host's first ``loras`` folder for this module."""
    folder = tmp_path_factory.mktemp("loras")
    folder_paths.add_model_folder_path("loras", str(folder), is_default=True)
    yield folder
    folder_paths.folder_names_and_paths["loras"][0].remove(str(folder))


@pytest.fixture(scope="module")
def input_images(host, tmp_path_factory):
    """Two PNGs in the host's input folder for LoadImage."""
    folder = tmp_path_factory.mktemp("input")
    folder_paths.set_input_directory(str(folder))
    names = []
    for seed in (0, 1):
        img = smooth_image(1, SIZE, SIZE, seed=seed)[0].permute(1, 2, 0).numpy()
        names.append(f"face{seed}.png")
        Image.fromarray((img * 255).round().astype(np.uint8)).save(folder / names[-1])
    return names


def host_image(b=1, h=SIZE, w=SIZE, seed=0):
    return smooth_image(b, h, w, seed=seed).permute(0, 2, 3, 1).contiguous()


def node_args(model, vae, positive, images=None, **overrides):
    """Inputs as the executor passes them to an ``is_input_list`` node: every value in a list."""
    args = dict(model=model, vae=vae, positive=positive, lora_name="", steps=STEPS, learning_rate=1e-2, rank=4,
                alpha=4.0, target="attention", batch_size=1, grad_accumulation=1, seed=0,
                gradient_checkpointing=False)
    args.update(overrides)
    listed = {k: [v] for k, v in args.items()}
    listed["images"] = images if images is not None else [host_image()]
    return listed


def denoised(model, cond):
    """The host's denoised output of ``model`` on a fixed noisy latent, as a sampler step sees it."""
    x = 3.0 * torch.randn((1, 4, SIZE // 8, SIZE // 8), generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        comfy.model_management.load_models_gpu([model])
        return model.model.apply_model(x, torch.tensor([3.0]), c_crossattn=cond[0][0]).float().clone()


@pytest.fixture(scope="module")
def trained(node, tiny_model, encode_text, loras_dir):
    """One direct run of the node (64 px, 2 steps, gradient checkpointing on), plus what it must not change."""
    model, clip, vae = tiny_model("sd15")
    positive = encode_text(clip)
    base_before = denoised(model, positive)
    seen = []
    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, *a, **k: seen.append((value, total)))
    try:
        with torch.inference_mode():
            out = node.execute(**node_args(model, vae, positive, lora_name="run/sks_person.safetensors",
                                           gradient_checkpointing=True))
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
    return dict(model=model, positive=positive, out=out, base_before=base_before, progress=seen)


# --- training and the saved file -----------------------------------------------------------------------------

def test_trains_records_losses_and_progress(trained):
    mp, saved, loss = trained["out"].args[:3]
    assert set(loss) == {"loss"} and len(loss["loss"]) == STEPS
    assert all(isinstance(v, float) and math.isfinite(v) and v > 0 for v in loss["loss"])
    assert trained["progress"][-1] == (STEPS, STEPS) and len(trained["progress"]) == STEPS
    assert mp is not trained["model"] and mp.is_clone(trained["model"])
    assert saved == "run/sks_person.safetensors"
    assert saved in trained["out"].ui.as_dict()["text"][0]


def test_saved_file_uses_host_lora_keys(trained, loras_dir):
    mp, saved, _ = trained["out"].args[:3]
    path = loras_dir / saved
    sd = comfy.utils.load_torch_file(str(path), safe_load=True)
    key_map = comfy.lora.model_lora_keys_unet(trained["model"].model, {})
    stems = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in sd}
    # every transformer block has self- and cross-attention with four projections
    blocks = sum(1 for n, _ in trained["model"].model.named_modules() if n.endswith("transformer_blocks.0"))
    assert blocks >= 1 and len(stems) == blocks * 2 * 4 and len(sd) == 3 * len(stems)
    weights = dict(trained["model"].model.named_parameters())
    for stem in stems:
        unet_key = key_map[stem]  # the host maps the saved name back to the UNet weight
        assert unet_key.endswith(ATTENTION)
        out_dim, in_dim = weights[unet_key].shape
        assert sd[f"{stem}.lora_up.weight"].shape == (out_dim, 4)
        assert sd[f"{stem}.lora_down.weight"].shape == (4, in_dim)
        assert sd[f"{stem}.alpha"].item() == 4.0
        assert sd[f"{stem}.lora_up.weight"].dtype == torch.float32
    with safetensors.safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "4"
    settings = json.loads(meta["antipure_customize"])
    assert settings["steps"] == STEPS and settings["prediction"] == "eps" and settings["images"] == 1


def test_saved_lora_reloads_to_the_returned_model(trained):
    mp, saved, _ = trained["out"].args[:3]
    positive = trained["positive"]
    with torch.inference_mode():
        reloaded = nodes.LoraLoaderModelOnly().load_lora_model_only(trained["model"], saved, 1.0)[0]
    ours, theirs = denoised(mp, positive), denoised(reloaded, positive)
    base = denoised(trained["model"], positive)
    assert (ours - base).abs().max() > 1e-2, "the LoRA changed nothing; the reload check would be empty"
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


def test_input_model_is_not_changed(trained):
    mp = trained["out"].args[0]
    denoised(mp, trained["positive"])  # load the customized clone first, then the base again
    assert torch.equal(denoised(trained["model"], trained["positive"]), trained["base_before"])
    assert trained["model"].weight_wrapper_patches == {}


def test_adapters_start_at_zero_and_follow_the_seed(pack, tiny_model, encode_text):
    _, lora_adapters = pack
    model, clip, _ = tiny_model("sd15")
    keys = lora_adapters.target_keys(model, "attention")
    mp, a0 = lora_adapters.attach_lora(model, keys, rank=2, alpha=1.0, seed=3)
    _, a1 = lora_adapters.attach_lora(model, keys, rank=2, alpha=1.0, seed=3)
    _, a2 = lora_adapters.attach_lora(model, keys, rank=2, alpha=1.0, seed=4)
    k = keys[0]
    assert torch.equal(a0[k].lora_up.weight, a1[k].lora_up.weight)
    assert not torch.equal(a0[k].lora_up.weight, a2[k].lora_up.weight)
    params = lora_adapters.trainable_parameters(a0)
    assert len(params) == 2 * len(keys)
    assert all(p.is_leaf and p.requires_grad and not p.is_inference() for p in params)
    # down = 0: the fresh adapters leave the prediction exactly as it was
    positive = encode_text(clip)
    assert torch.equal(denoised(mp, positive), denoised(model, positive))


@pytest.mark.parametrize("target,suffixes", [
    ("attention", ATTENTION),
    ("attention+feed-forward", ATTENTION + (".ff.net.0.proj.weight", ".ff.net.2.weight", ".proj_in.weight",
                                            ".proj_out.weight")),
])
def test_targets_pick_the_transformer_layers(pack, tiny_model, target, suffixes):
    model = tiny_model("sd15")[0]
    keys = pack[1].target_keys(model, target)
    assert keys and all(k.endswith(suffixes) for k in keys)
    assert {s for s in suffixes if any(k.endswith(s) for k in keys)} == set(suffixes)
    everything = pack[1].target_keys(model, "all")
    assert set(keys) < set(everything) and any(k.endswith("input_blocks.0.0.weight") for k in everything)


def test_prediction_follows_the_model_sampling(host, tiny_model):
    model = tiny_model("sd15")[0]
    assert host.pack_import("antipure_comfy.customize").prediction_type(model) == "eps"
    with torch.inference_mode():
        as_v = ModelSamplingDiscrete().patch(model, "v_prediction", False)[0]
    assert host.pack_import("antipure_comfy.customize").prediction_type(as_v) == "v"


def test_v_model_trains_on_the_v_loss(node, tiny_model, encode_text, loras_dir):
    model, clip, vae = tiny_model("sd20v")
    with torch.inference_mode():
        out = node.execute(**node_args(model, vae, encode_text(clip), images=[host_image(h=32, w=32)], steps=1,
                                       lora_name="v/sks"))
    _, saved, loss = out.args[:3]
    assert math.isfinite(loss["loss"][0])
    with safetensors.safe_open(str(loras_dir / saved), "pt") as f:
        assert json.loads(f.metadata()["antipure_customize"])["prediction"] == "v"
        key_map = comfy.lora.model_lora_keys_unet(model.model, {})
        assert all(key_map[k.rsplit(".", 2)[0]].endswith(ATTENTION) for k in f.keys() if k.endswith("up.weight"))


def test_existing_file_is_never_overwritten(pack, loras_dir):
    lora_adapters = pack[1]
    sd = {"x.alpha": torch.tensor(1.0)}
    assert lora_adapters.save_lora(sd, "dup") == "dup.safetensors"
    first = (loras_dir / "dup.safetensors").read_bytes()
    assert lora_adapters.save_lora({"y.alpha": torch.tensor(2.0)}, "dup.safetensors") == "dup_00001.safetensors"
    assert lora_adapters.save_lora(sd, "dup") == "dup_00002.safetensors"
    assert (loras_dir / "dup.safetensors").read_bytes() == first
    assert "dup_00001.safetensors" in folder_paths.get_filename_list("loras")


# --- graphs ---------------------------------------------------------------------------------------------------

def widget_defaults(**overrides):
    """Every required widget of the node at its schema default (an API prompt must name them all)."""
    schema = nodes.NODE_CLASS_MAPPINGS["AntiPureCustomize"].define_schema()
    values = {i.id: i.default for i in schema.inputs if not i.optional and getattr(i, "default", None) is not None}
    values.update(overrides)
    return values


def customize_graph(ckpt, images, lora_name, steps, prior=False, **widgets):
    g = GraphBuilder(prefix="")
    loader = g.node("CheckpointLoaderSimple", ckpt_name=ckpt)
    text = g.node("CLIPTextEncode", clip=loader.out(1), text="a photo of sks person")
    extra = {}
    if prior:
        extra = dict(class_positive=g.node("CLIPTextEncode", clip=loader.out(1), text="a photo of person").out(0),
                     class_images=g.node("LoadImage", image=images[1]).out(0),
                     class_image_count=2, class_sampling_steps=2)  # one given, one generated
    widgets = widget_defaults(**dict(dict(lora_name=lora_name, steps=steps, learning_rate=1e-4, batch_size=1,
                                          gradient_checkpointing=False), **widgets))
    cz = g.node("AntiPureCustomize", model=loader.out(0), vae=loader.out(2),
                images=g.node("LoadImage", image=images[0]).out(0), positive=text.out(0), **{**widgets, **extra})
    return g, loader, text, cz


def test_graph_customize_sample_decode_save(graph, tiny_checkpoint, input_images, loras_dir, output_dir):
    (loras_dir / "graph").mkdir(exist_ok=True)
    (loras_dir / "graph" / "sks.safetensors").write_bytes(b"not ours")
    g, loader, text, cz = customize_graph(tiny_checkpoint("sd15"), input_images, "graph/sks", STEPS, prior=True)
    latent = g.node("EmptyLatentImage", width=SIZE, height=SIZE, batch_size=1)
    sampled = g.node("KSampler", model=cz.out(0), seed=0, steps=2, cfg=1.0, sampler_name="euler",
                     scheduler="normal", positive=text.out(0), negative=text.out(0), latent_image=latent.out(0),
                     denoise=1.0)
    decoded = g.node("VAEDecode", samples=sampled.out(0), vae=loader.out(2))
    g.node("SaveImage", images=decoded.out(0), filename_prefix="customized")
    g.node("LossGraphNode", loss=cz.out(2), filename_prefix="customize_loss")
    result = graph.run(g)
    assert result.ok, result.error
    assert len(list(output_dir.glob("customized_*.png"))) == 1
    assert (loras_dir / "graph" / "sks.safetensors").read_bytes() == b"not ours"
    assert (loras_dir / "graph" / "sks_00001.safetensors").is_file()
    assert result.outputs[cz.id][1] == ["graph/sks_00001.safetensors"]
    ui = [d["output"] for d in result.event("executed") if d["node"] == cz.id]
    assert "already exists" in ui[0]["text"][0] and "graph/sks_00001.safetensors" in ui[0]["text"][0]
    mine = [(v, t) for n, v, t in result.progress if n == cz.id]
    assert mine[-1] == (STEPS, STEPS)


def test_cancel_stops_within_one_step_and_saves_nothing(graph, tiny_checkpoint, input_images, loras_dir):
    g, _, _, cz = customize_graph(tiny_checkpoint("sd15"), input_images, "cancelled", steps=5)
    graph.interrupt_after(1)
    result = graph.run(g)
    assert not result.ok and result.event("execution_interrupted")
    mine = [v for n, v, _ in result.progress if n == cz.id]
    assert mine == [1]  # the first step reported, the second step's check stopped it
    assert not list(loras_dir.glob("cancelled*"))


def test_graph_rejects_negative_steps(graph, tiny_checkpoint, input_images):
    g, *_ = customize_graph(tiny_checkpoint("sd15"), input_images, "zero", steps=-1)
    result = graph.run(g)
    assert not result.ok and "steps" in result.error


# --- bad input ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def parts(tiny_model, encode_text):
    model, clip, vae = tiny_model("sd15")
    return model, vae, encode_text(clip)


@pytest.mark.parametrize("change,match", [
    (dict(images=[host_image()[:0]]), "images: the batch is empty"),
    (dict(images=[host_image(), host_image(h=32)]), r"images\[1\]: size \(32, 64\) differs"),
    (dict(images=[torch.rand(1, SIZE, SIZE, 2)]), "images: expected 1, 3 or 4 channels"),
    (dict(steps=-1), "steps: must be an integer >= 1"),
    (dict(rank=0), "rank: must be an integer >= 1"),
    (dict(alpha=-1.0), "alpha: must be finite and > 0"),
    (dict(learning_rate=-1.0), "learning_rate: must be finite and > 0"),
    (dict(grad_accumulation=0), "grad_accumulation: must be an integer >= 1"),
    (dict(batch_size=-1), "batch_size: must be an integer >= 1"),
    (dict(target="everything"), "target: expected one of"),
    (dict(lora_name="../escape"), "lora_name: '../escape' is not a usable file name"),
    (dict(lora_name="/tmp/abs"), "lora_name: '/tmp/abs' is not a usable file name"),
    (dict(class_images=host_image()), "class_positive: prior preservation needs both"),
    (dict(class_positive="person", class_image_count=0), "class_positive: expected a CONDITIONING"),
    (dict(positive="a photo of sks person"), "positive: expected a CONDITIONING"),
])
def test_bad_inputs_raise_naming_the_input(node, parts, loras_dir, change, match):
    model, vae, positive = parts
    change = dict(change)
    images = change.pop("images", None)
    change.setdefault("lora_name", "bad")
    args = node_args(model, vae, change.pop("positive", positive), images=images, **change)
    with torch.inference_mode(), pytest.raises(ValueError, match=match):
        node.execute(**args)
    assert not list(loras_dir.glob("bad*")) and not list(loras_dir.parent.glob("escape*"))


def test_unsupported_model_family_is_named(node, parts):
    model, vae, positive = parts
    with torch.inference_mode():
        flow = ModelSamplingSD3().patch(model, 3.0)[0]
        with pytest.raises(ValueError, match="model: AntiPure supports SD1.x, SD2.x and SDXL"):
            node.execute(**node_args(flow, vae, positive))


def test_several_models_in_a_list_are_refused(node, parts):
    model, vae, positive = parts
    args = node_args(model, vae, positive)
    args["model"] = [model, model]
    with torch.inference_mode(), pytest.raises(ValueError, match="model: got a list of 2 values"):
        node.execute(**args)


def test_schema_has_tooltips_and_is_registered(node):
    schema = node.define_schema()
    assert schema.node_id == "AntiPureCustomize" and schema.category == "AntiPure"
    assert schema.is_input_list and schema.is_output_node
    assert all(i.tooltip for i in schema.inputs) and all(o.tooltip for o in schema.outputs)
    assert io.Hidden.unique_id in schema.hidden
    assert nodes.NODE_CLASS_MAPPINGS.get("AntiPureCustomize") is not None


# --- graphs saved before training=dreambooth ------------------------------------------------------------------

#: the node's widgets and outputs at commit 1840151 (before the dreambooth mode), in saved-graph order
OLD_WIDGETS = ["lora_name", "steps", "learning_rate", "rank", "alpha", "target", "batch_size", "grad_accumulation",
               "seed", None, "gradient_checkpointing", "prior_weight"]
OLD_OUTPUTS = ["model", "lora_name", "loss"]


def test_saved_graphs_keep_their_widget_positions_and_outputs(node):
    from antipure.workflow_format import widget_slots
    input_types = node.INPUT_TYPES()
    assert widget_slots(input_types)[:len(OLD_WIDGETS)] == OLD_WIDGETS  # UI graphs store widget values by position
    old = {"model", "vae", "images", "positive", "class_positive", "class_images", *filter(None, OLD_WIDGETS)}
    new = {n for i in node.define_schema().inputs if (n := i.id) not in old}
    assert new and new <= set(input_types.get("optional", {}))  # API graphs without them still validate
    schema = node.define_schema()
    defaults = {i.id: getattr(i, "default", None) for i in schema.inputs}
    assert (defaults["steps"], defaults["learning_rate"], defaults["batch_size"]) == (400, 1e-4, 1)
    assert [o.display_name for o in schema.outputs][:len(OLD_OUTPUTS)] == OLD_OUTPUTS


@pytest.mark.parametrize("family,prior", [("sd15", False), ("sd15", True)])
def test_old_inputs_train_the_lora_bit_for_bit_as_before(host, node, tiny_model, encode_text, family, prior):
    # The reference is the node's LoRA path at 1840151 written out (attach, training clone, session, the core
    # loop without clipping); a probe ran that commit's node on these inputs and matched it bit for bit.
    bridge, ckpt = host.pack_import("antipure_comfy.bridge"), host.pack_import("antipure_comfy.checkpointing")
    hc, lora_adapters = host.pack_import("antipure_comfy.customize"), host.pack_import("antipure_comfy.lora_adapters")
    core = host.pack_import("antipure_core.customize")
    model, clip, vae = tiny_model(family)
    positive, images = encode_text(clip), [host_image(2, 32, 32, seed=4)]
    old = dict(lora_name="", steps=2, learning_rate=1e-2, rank=4, alpha=4.0, target="attention", batch_size=1,
               grad_accumulation=1, seed=7, gradient_checkpointing=False, prior_weight=0.5)
    class_positive, class_images = encode_text(clip, "a photo of person"), host_image(2, 32, 32, seed=5)
    args = node_args(model, vae, positive, images=images, **old)
    if prior:
        args.update(class_positive=[class_positive], class_images=[class_images])
    with torch.inference_mode():
        mp, lora_name, loss, *_ = node.execute(**args).args

        keys = lora_adapters.target_keys(model, "attention")
        ref_mp, adapters = lora_adapters.attach_lora(model, keys, 4, 4.0, 7)
        params = lora_adapters.trainable_parameters(adapters)
        ref_prior = core.Prior(class_positive, images=hc.image_batch([class_images], "class_images"),
                               weight=0.5) if prior else None
        train_mp = hc.training_clone(ref_mp)
        with bridge.session(train_mp, vae, positive) as dm, ckpt.gradient_checkpointing(train_mp, enabled=False):
            ref_losses = core.customize(dm, hc.image_batch(images, "images"), dm.cond, params, steps=2, lr=1e-2,
                                        batch_size=1, grad_accum=1, prediction=hc.prediction_type(model),
                                        prior=ref_prior, generator=7)
    assert loss["loss"] == ref_losses and lora_name == ""
    got, ref = lora_adapters.lora_state_dict(mp, _adapters(mp)), lora_adapters.lora_state_dict(ref_mp, adapters)
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)


def _adapters(mp):
    """The LoRA adapters on a trained clone, as ``attach_lora`` returned them."""
    return {k: w[0] for k, w in mp.weight_wrapper_patches.items()}
