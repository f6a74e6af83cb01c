"""AntiPure against a pixel purifier in real graphs: loader → Protect → Purify (gridpure) → Evaluate.

A tiny random-weight ADM file is written into the host's ``pixel_diffusion``
models folder; Protect attacks it white-box through its windows, GrIDPure
purifies on the same model, Evaluate scores the result.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import folder_paths

from tests.nodes.graph import GraphBuilder
from tests.nodes.test_protect_node import guidance_inputs
from tests.nodes.test_purify_node import PURIFY_DEFAULTS
from tests.tiny_adm import random_adm
from tests.toy import smooth_image

SIZE = 64  # with 32-px windows: a 3 x 3 grid plus the packed corners, as GrIDPure's 256-px windows on 512 px
PROTECT = dict(method="antipure", eta=8.0, steps=2, alpha=2.0, seed=0, random_start=False, eot_samples=1,
               t_purify=10, window=32, window_mode="all")


@pytest.fixture(scope="module")
def pixel_ckpt(host, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pixel_diffusion")
    folder_paths.add_model_folder_path("pixel_diffusion", str(folder), is_default=True)
    save_file(random_adm(seed=1).state_dict(), str(folder / "tiny_adm_protect.safetensors"))
    return "tiny_adm_protect.safetensors"


@pytest.fixture(scope="module")
def nodes_mod(host):
    return host.pack_import("nodes.protect"), host.pack_import("nodes.pixel_diffusion")


def clean_image(b: int = 1) -> torch.Tensor:
    return smooth_image(b, SIZE, SIZE, seed=3).movedim(1, -1)  # BHWC, on the 8-bit grid


def pipeline(pixel_ckpt, guidance: bool = True):
    g = GraphBuilder(prefix="")
    pixel = g.node("AntiPureLoadPixelDiffusion", ckpt_name=pixel_ckpt, weight_dtype="fp32", num_head_channels=64)
    img = g.node("EmptyImage", width=SIZE, height=SIZE, batch_size=1, color=0x8060A0)
    extra = guidance_inputs(g) if guidance else {}
    protect = g.node("AntiPureProtect", image=img.out(0), purifier=pixel.out(0), **PROTECT, **extra)
    purify = g.node("AntiPurePurify", image=protect.out(0), pixel_model=pixel.out(0),
                    **{**PURIFY_DEFAULTS, "method": "gridpure", "grid_window": 32, "grid_stride": 16,
                       "grid_iterations": 1, "grid_rounds": 1, "grid_t_star": 0.002})
    evaluate = g.node("AntiPureEvaluate", clean=img.out(0), protected=protect.out(0), purified=purify.out(0),
                      label="antipure vs pixel", filename_prefix="pixel_purifier/results", faces=False, patch_size=8)
    return g, img, protect, purify, evaluate


def test_loader_protect_gridpure_evaluate(graph, pixel_ckpt, output_dir):
    g, img, protect, purify, evaluate = pipeline(pixel_ckpt)
    result = graph.run(g)
    assert result.ok, result.error
    clean = result.outputs[img.id][0][0]
    protected = result.outputs[protect.id][0][0]
    purified = result.outputs[purify.id][0][0]
    assert protected.shape == purified.shape == clean.shape == (1, SIZE, SIZE, 3)
    d = (protected - clean).abs()
    assert d.max() <= 8 / 255 + 1e-6 and (d > 0.5 / 255).float().mean() > 0.05
    assert not torch.equal(purified, protected) and torch.isfinite(purified).all()
    assert [v for n, v, t in result.progress if n == protect.id] == [1, 2]  # one update per PGD step
    report = result.outputs[evaluate.id][0][0]
    assert "antipure vs pixel" in report
    rows = json.loads((output_dir / "pixel_purifier" / "results.json").read_text())
    assert "antipure vs pixel" in json.dumps(rows)


def test_guidance_changes_the_result_on_the_pixel_purifier(host, nodes_mod, pixel_ckpt):
    protect_mod, pixel_mod = nodes_mod
    frequency = host.pack_import("antipure_core.frequency")
    with torch.inference_mode():
        pixel = pixel_mod.AntiPureLoadPixelDiffusion.execute(pixel_ckpt).result[0]
        plain = protect_mod.AntiPureProtect.execute(clean_image(), purifier=pixel, **PROTECT).result[0]
        guided = protect_mod.AntiPureProtect.execute(clean_image(), purifier=pixel, **PROTECT,
                                                     frequency_guidance=frequency.FrequencyGuidance(weight=50.0)
                                                     ).result[0]
    assert not torch.equal(plain, guided)


def test_checkpointing_same_result_and_purifier_unchanged(nodes_mod, pixel_ckpt):
    protect_mod, pixel_mod = nodes_mod
    with torch.inference_mode():
        pixel = pixel_mod.AntiPureLoadPixelDiffusion.execute(pixel_ckpt).result[0]
    params = {k: (v, v.clone()) for k, v in pixel.state_dict(keep_vars=True).items()}
    runs = []
    for enabled in (False, True):
        with torch.inference_mode():
            runs.append(protect_mod.AntiPureProtect.execute(clean_image(2), purifier=pixel, **PROTECT,
                                                            gradient_checkpointing=enabled).result[0])
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], clean_image(2))
    assert pixel.unet.gradient_checkpointing is False
    after = pixel.state_dict(keep_vars=True)
    assert all(after[k] is v and torch.equal(v, c) and not v.requires_grad for k, (v, c) in params.items())


@pytest.mark.parametrize("case,match", [
    ("latent_model_as_purifier", "purifier: got the host's latent MODEL"),
    ("encoder_attack_on_pixels", "method: photoguard attacks a VAE encoder"),
    ("nothing_to_attack", "model: connect a MODEL"),
    ("not_a_model", "purifier: expected a pixel-space diffusion model"),
])
def test_wrong_purifier_is_a_clear_error(nodes_mod, pixel_ckpt, tiny_model, case, match):
    protect_mod, pixel_mod = nodes_mod
    with torch.inference_mode():
        pixel = pixel_mod.AntiPureLoadPixelDiffusion.execute(pixel_ckpt).result[0]
    model, _, vae = tiny_model("sd15")
    kw = {"latent_model_as_purifier": dict(purifier=model),
          "encoder_attack_on_pixels": dict(purifier=pixel, method="photoguard"),
          "nothing_to_attack": dict(),
          "not_a_model": dict(purifier=vae)}[case]
    with pytest.raises(ValueError, match=match), torch.inference_mode():
        protect_mod.AntiPureProtect.execute(clean_image(), **{**PROTECT, "steps": 1, **kw})


def test_pixel_model_into_model_input_is_refused(graph, pixel_ckpt):
    g = GraphBuilder(prefix="")
    pixel = g.node("AntiPureLoadPixelDiffusion", ckpt_name=pixel_ckpt, weight_dtype="fp32", num_head_channels=64)
    img = g.node("EmptyImage", width=SIZE, height=SIZE, batch_size=1, color=0)
    protect = g.node("AntiPureProtect", image=img.out(0), model=pixel.out(0), **PROTECT)
    g.node("PreviewImage", images=protect.out(0))
    result = graph.run(g)
    assert not result.ok and protect.id not in result.outputs
