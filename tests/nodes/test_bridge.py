"""The ComfyUI bridge on tiny SD1.x (ε), SD2.x (v) and SDXL checkpoints loaded by the normal loader."""
from __future__ import annotations

import pytest
import torch

import comfy.model_base
import comfy.model_detection
import comfy.model_management
import comfy.model_patcher
import comfy.sample
import comfy.samplers
import comfy.supported_models as sm
import comfy.utils
import nodes
from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete, ModelSamplingSD3

from tests.nodes import tiny_checkpoints
from tests.nodes.graph import GraphBuilder
from tests.toy import smooth_image

FAMILIES = ["sd15", "sd20v", "sdxl"]
EXPECTED = {  # family -> (config class, model class, prediction, context width, pooled width)
    "sd15": (tiny_checkpoints.TinySD15, comfy.model_base.BaseModel, comfy.model_base.ModelType.EPS, 768, 768),
    "sd20v": (tiny_checkpoints.TinySD20, comfy.model_base.BaseModel, comfy.model_base.ModelType.V_PREDICTION,
              1024, 1024),
    "sdxl": (tiny_checkpoints.TinySDXL, comfy.model_base.SDXL, comfy.model_base.ModelType.EPS, 2048, 1280),
}
SIZE = 16  # px; a multiple of every tiny UNet's SIZE_MULTIPLE


@pytest.fixture(scope="module")
def bridge(host):
    return host.pack_import("antipure_comfy.bridge")


@pytest.fixture(scope="module")
def diffusion(host):
    return host.pack_import("antipure_core.diffusion")


@pytest.fixture(params=FAMILIES)
def loaded(request, tiny_model, encode_text):
    model, clip, vae = tiny_model(request.param)
    return request.param, model, vae, encode_text(clip)


def _weights(model, vae):
    return {**{f"unet.{k}": p for k, p in model.model.named_parameters()},
            **{f"vae.{k}": p for k, p in vae.first_stage_model.named_parameters()}}


def _ksample(model, positive, seed=0):
    """Two Euler steps of the host's KSampler at SIZE px under inference mode, as a node would run them."""
    with torch.inference_mode():
        latent = {"samples": torch.zeros(1, 4, SIZE // 8, SIZE // 8)}
        return nodes.common_ksampler(model, seed, 2, 1.0, "euler", "normal", positive, positive, latent)[0]["samples"]


# --- the tiny checkpoints -------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_checkpoint_detected_by_normal_loader(family, tiny_checkpoint, tiny_model, encode_text, models_dir):
    model, clip, vae = tiny_model(family)
    config_cls, model_cls, prediction, context, pooled = EXPECTED[family]
    assert type(model.model.model_config) is config_cls
    assert type(model.model) is model_cls
    assert model.model.model_type == prediction
    # the detector reads back exactly the UNet the file was built from
    sd = comfy.utils.load_torch_file(str(models_dir / tiny_checkpoint(family)))
    detected = comfy.model_detection.detect_unet_config(sd, "model.diffusion_model.")
    assert {k: detected[k] for k in tiny_checkpoints.FAMILIES[family][1]} == tiny_checkpoints.FAMILIES[family][1]
    cond = encode_text(clip)
    assert cond[0][0].shape == (1, 77, context)
    assert cond[0][1]["pooled_output"].shape == (1, pooled)
    assert torch.isfinite(cond[0][0]).all()
    assert vae.latent_channels == 4 and vae.downscale_ratio == 8


def test_tiny_configs_do_not_capture_real_checkpoints(tiny_checkpoint):
    # a real SD1.5 UNet config still resolves to the host's own SD15
    real = {"context_dim": 768, "model_channels": 320, "use_linear_in_transformer": False, "adm_in_channels": None,
            "use_temporal_attention": False, "in_channels": 4}
    assert type(comfy.model_detection.model_config_from_unet_config(real)) is sm.SD15


# --- gradients ------------------------------------------------------------------------------------------------

def test_gradients_reach_delta_under_inference_mode(loaded, bridge, diffusion):
    family, model, vae, positive = loaded
    weights = _weights(model, vae)
    before = {k: p.detach().clone() for k, p in weights.items()}
    flags = {k: p.requires_grad for k, p in weights.items()}
    with torch.inference_mode():
        x = smooth_image(1, SIZE, SIZE, seed=1)
        with bridge.session(model, vae, positive) as dm:
            assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()
            for k, p in _weights(model, vae).items():  # frozen plain tensors on the same memory, no copy
                assert not p.is_inference() and not p.requires_grad and p.data_ptr() == weights[k].data_ptr(), k
            delta = torch.zeros_like(x, requires_grad=True)
            z0 = dm.encode((x + delta).clamp(0, 1))
            t = torch.tensor([400])
            noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(0))
            z_t = diffusion.q_sample(dm, z0, t, noise)
            eps = dm.predict_noise(z_t, t, dm.cond)
            x_hat = dm.decode(diffusion.predict_x0(dm, z_t, t, eps))
            loss = (eps - noise).pow(2).mean() - (x_hat - x).pow(2).mean()
            loss.backward()
        assert torch.is_inference_mode_enabled()
    assert z0.dtype == eps.dtype == x_hat.dtype == torch.float32
    assert z0.shape == (1, 4, SIZE // 8, SIZE // 8) and eps.shape == z0.shape and x_hat.shape == x.shape
    g = delta.grad
    assert g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() and g.abs().sum() > 0
    after = _weights(model, vae)
    assert after.keys() == weights.keys()
    for k, p in after.items():
        assert p is weights[k], f"{k}: the original weight object was not put back"
        assert p.grad is None, f"{k} received a gradient"
        assert p.requires_grad == flags[k]
        assert torch.equal(p.detach(), before[k]), f"{k} changed"


def test_each_stage_is_differentiable(loaded, bridge):
    family, model, vae, positive = loaded
    with torch.inference_mode(), bridge.session(model, vae, positive) as dm:
        x = smooth_image(1, SIZE, SIZE, seed=2).requires_grad_(True)
        dm.encode(x).pow(2).sum().backward()
        z = torch.randn(1, 4, SIZE // 8, SIZE // 8, requires_grad=True)
        dm.predict_noise(z, torch.tensor([10]), dm.cond).pow(2).sum().backward()
        g_unet = z.grad.clone()
        z.grad = None
        dm.decode(z).sum().backward()
        g_dec = z.grad
    for g in (x.grad, g_unet, g_dec):
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


# --- consistency with the host's sampling -------------------------------------------------------------------

def test_alphas_cumprod_is_the_host_schedule(loaded, bridge, diffusion):
    family, model, vae, positive = loaded
    with torch.inference_mode(), bridge.session(model, vae, positive) as dm:
        ab = dm.alphas_cumprod.cpu()
        sigmas = model.get_model_object("model_sampling").sigmas.cpu()
        assert dm.num_timesteps == 1000 and dm.downsample == 8 and ab.dtype == torch.float32
        torch.testing.assert_close(((1 - ab) / ab).sqrt(), sigmas, rtol=1e-4, atol=0)
        # SD1/SD2/SDXL all use the "scaled linear" schedule
        torch.testing.assert_close(ab, diffusion.linear_alphas_cumprod(), rtol=1e-5, atol=1e-6)


def _assert_matches_host_denoiser(bridge, diffusion, model, vae, positive, t: int):
    """One Euler step from sigma_t to 0 in the host's sampler returns its denoised x0; the bridge must agree."""
    gen = torch.Generator().manual_seed(t)
    z0 = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=gen)
    noise = torch.randn(z0.shape, generator=gen)
    tt = torch.tensor([t])
    with torch.inference_mode():
        with bridge.session(model, vae, positive) as dm:
            z_t = diffusion.q_sample(dm, z0, tt, noise)
            x0_bridge = diffusion.predict_x0(dm, z_t, tt, dm.predict_noise(z_t, tt, positive)).detach()
        sigma = model.get_model_object("model_sampling").sigma(tt.float())
        latent_format = model.get_model_object("latent_format")
        out = comfy.sample.sample_custom(model, noise, 1.0, comfy.samplers.sampler_object("euler"),
                                         torch.cat([sigma, sigma.new_zeros(1)]), positive, positive,
                                         latent_format.process_out(z0), disable_pbar=True, seed=0)
        x0_host = latent_format.process_in(out)
    torch.testing.assert_close(x0_bridge, x0_host, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("t", [30, 700])
def test_predict_noise_matches_host_denoiser(loaded, bridge, diffusion, t):
    family, model, vae, positive = loaded
    _assert_matches_host_denoiser(bridge, diffusion, model, vae, positive, t)


def test_sampling_patched_to_v_prediction_is_followed(bridge, diffusion, tiny_model, encode_text):
    """An SD1.x v-model needs the ModelSamplingDiscrete node; the bridge uses the patched sampling."""
    model, clip, vae = tiny_model("sd15")
    patched = ModelSamplingDiscrete().patch(model, "v_prediction", False)[0]
    bridge.check_supported(patched)
    _assert_matches_host_denoiser(bridge, diffusion, patched, vae, encode_text(clip), 400)


def test_predict_noise_broadcasts_cond_and_timesteps(loaded, bridge):
    family, model, vae, positive = loaded
    z = torch.randn(2, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode(), bridge.session(model, vae, positive) as dm:
        both = dm.predict_noise(z, torch.tensor([100, 600]))       # cond batch 1 -> 2, default dm.cond
        first = dm.predict_noise(z[:1], torch.tensor(100), positive)
        second = dm.predict_noise(z[1:], 600, positive)          # a plain int timestep
        same_t = dm.predict_noise(z, 600)
    assert both.shape == z.shape == same_t.shape
    torch.testing.assert_close(both, torch.cat([first, second]), rtol=1e-4, atol=1e-5)
    assert not torch.equal(both[0], same_t[0])   # each sample gets its own timestep


def test_combined_conditioning_averages_like_the_host(bridge, tiny_model, encode_text):
    """ConditioningCombine: the host averages the entries' denoised x0, so ε̂ is the mean of the ε̂s."""
    model, clip, vae = tiny_model("sd15")
    a, b = encode_text(clip, "a photo of sks person"), encode_text(clip, "an oil painting")
    with torch.inference_mode():
        both = nodes.ConditioningCombine().combine(a, b)[0]
    z = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([250])
    with torch.inference_mode(), bridge.session(model, vae, a) as dm:
        eps_a, eps_b, eps_ab = dm.predict_noise(z, t, a), dm.predict_noise(z, t, b), dm.predict_noise(z, t, both)
    assert not torch.allclose(eps_a, eps_b)
    torch.testing.assert_close(eps_ab, (eps_a + eps_b) / 2, rtol=1e-4, atol=1e-5)


# --- bad input ------------------------------------------------------------------------------------------------

def _meta_model(config_cls, **unet_config):
    config = config_cls({"disable_unet_model_creation": True, **unet_config})
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(config.get_model({}, device="meta"), load_device=cpu, offload_device=cpu)


@pytest.mark.parametrize("make", [
    pytest.param(lambda m: _meta_model(sm.SD3, in_channels=16), id="sd3-flow"),
    pytest.param(lambda m: _meta_model(sm.Flux, in_channels=16, image_model="flux"), id="flux"),
    pytest.param(lambda m: _meta_model(sm.SVD_img2vid, in_channels=8), id="svd-video"),
    pytest.param(lambda m: _meta_model(sm.SD_X4Upscaler, in_channels=7), id="x4-upscaler"),
    pytest.param(lambda m: _meta_model(sm.SD15, in_channels=9), id="sd15-inpainting"),
    pytest.param(lambda m: ModelSamplingSD3().patch(m, 3.0)[0], id="sd15-with-flow-sampling"),
    pytest.param(lambda m: ModelSamplingDiscrete().patch(m, "x0", False)[0], id="sd15-with-x0-sampling"),
])
def test_unsupported_family_raises_naming_supported(make, bridge, tiny_model, encode_text):
    model, clip, vae = tiny_model("sd15")
    other = make(model)
    with pytest.raises(ValueError, match=r"supports SD1\.x, SD2\.x and SDXL"):
        bridge.check_supported(other)
    with pytest.raises(ValueError, match=r"SD1\.x, SD2\.x and SDXL"), torch.inference_mode():
        with bridge.session(other, vae, encode_text(clip)):
            pass


def test_bad_inputs_raise_clear_errors(bridge, tiny_model, encode_text):
    model, clip, vae = tiny_model("sd15")
    positive = encode_text(clip)
    with pytest.raises(TypeError, match="model:"):
        bridge.check_supported(vae)
    with pytest.raises(ValueError, match="vae:"):
        bridge.check_vae(clip)
    with pytest.raises(ValueError, match="positive:"):
        bridge.check_conditioning(positive[0][0])
    with pytest.raises(ValueError, match="positive: conditioning with control"):
        bridge.check_conditioning([[positive[0][0], {"control": object()}]])
    with torch.inference_mode(), bridge.session(model, vae, positive) as dm:
        with pytest.raises(ValueError, match="x:"):
            dm.encode(torch.rand(1, 3, 20, 20))
        with pytest.raises(ValueError, match="z_t:"):
            dm.predict_noise(torch.rand(1, 3, 4, 4), torch.tensor([1]))
        with pytest.raises(ValueError, match="t:"):
            dm.predict_noise(torch.rand(2, 4, 4, 4), torch.tensor([1, 2, 3]))
    # weights are back even when the block raises
    weights = _weights(model, vae)
    with pytest.raises(RuntimeError, match="boom"), torch.inference_mode(), bridge.session(model, vae, positive):
        raise RuntimeError("boom")
    assert all(p is weights[k] for k, p in _weights(model, vae).items())


def test_bf16_unet_keeps_fp32_boundary(bridge, tiny_checkpoint, models_dir, encode_text):
    with torch.inference_mode():
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
            str(models_dir / tiny_checkpoint("sd15")), model_options={"dtype": torch.bfloat16})
    assert model.model_dtype() == torch.bfloat16
    positive = encode_text(clip)
    with torch.inference_mode(), bridge.session(model, vae, positive) as dm:
        z = torch.randn(1, 4, SIZE // 8, SIZE // 8, requires_grad=True)
        eps = dm.predict_noise(z, torch.tensor([300]))
        eps.pow(2).mean().backward()
    assert eps.dtype == torch.float32 and z.grad.dtype == torch.float32 and torch.isfinite(z.grad).all()
    assert z.grad.abs().sum() > 0


# --- other nodes afterwards -------------------------------------------------------------------------------------

def test_host_sampler_unchanged_after_session(loaded, bridge):
    family, model, vae, positive = loaded
    reference = _ksample(model, positive)
    with torch.inference_mode(), bridge.session(model, vae, positive) as dm:
        x = smooth_image(1, SIZE, SIZE, seed=4).requires_grad_(True)
        dm.predict_noise(dm.encode(x), torch.tensor([500])).sum().backward()
    torch.testing.assert_close(_ksample(model, positive), reference, rtol=0, atol=0)
    with torch.inference_mode():
        image = vae.decode(reference)
    assert image.shape == (1, SIZE, SIZE, 3) and torch.isfinite(image).all()


# --- the graph harness itself -------------------------------------------------------------------------------

def _txt2img(ckpt: str, steps: int) -> GraphBuilder:
    g = GraphBuilder(prefix="")
    loader = g.node("CheckpointLoaderSimple", ckpt_name=ckpt)
    text = g.node("CLIPTextEncode", clip=loader.out(1), text="a photo of sks person")
    latent = g.node("EmptyLatentImage", width=SIZE, height=SIZE, batch_size=1)
    sample = g.node("KSampler", model=loader.out(0), seed=0, steps=steps, cfg=1.0, sampler_name="euler",
                    scheduler="normal", positive=text.out(0), negative=text.out(0), latent_image=latent.out(0),
                    denoise=1.0)
    image = g.node("VAEDecode", samples=sample.out(0), vae=loader.out(2))
    g.node("SaveImage", id="save", images=image.out(0), filename_prefix="antipure_test")
    return g


def test_graph_runner_runs_and_records(graph, tiny_checkpoint, output_dir):
    result = graph.run(_txt2img(tiny_checkpoint("sd15"), steps=3))
    assert result.ok, result.error
    assert [e for e, _ in result.events][:1] == ["execution_start"]
    assert result.event("execution_success")
    assert [v for _, v, _ in result.progress if v is not None][-1] == 3
    images = result.outputs["5"][0]  # VAEDecode: slot 0, one value per executed batch
    assert images[0].shape == (1, SIZE, SIZE, 3)
    saved = result.event("executed")[-1]["output"]["images"]
    assert (output_dir / saved[0]["filename"]).is_file()


def test_graph_runner_interrupt_and_errors(graph, tiny_checkpoint):
    graph.interrupt_after(1)
    result = graph.run(_txt2img(tiny_checkpoint("sd15"), steps=4))
    assert not result.ok and result.event("execution_interrupted")
    assert "save" not in result.outputs and len(result.progress) <= 2
    assert not comfy.model_management.processing_interrupted()
    bad = graph.run(_txt2img("missing.safetensors", steps=1))
    assert not bad.ok and bad.validation is not None and "missing.safetensors" in bad.error


def test_progress_fixture_records_host_progress(progress):
    bar = comfy.utils.ProgressBar(3, node_id="7")
    bar.update_absolute(1)
    bar.update(1)
    assert progress == [("7", 1, 3), ("7", 2, 3)]
