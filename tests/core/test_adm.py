"""The ADM UNet and PixelDiffusion: guided-diffusion's numbers, checkpoint layout, config inference, loading."""
import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from antipure_core.adm import ADM_256_UNCOND, ADMConfig, ADMUNet, adm_from_state_dict, infer_config
from antipure_core.diffusion import predict_x0
from antipure_core.model import DiffusionModel, check_model
from antipure_core.pixel_diffusion import PixelDiffusion, adm_linear_betas, load_pixel_diffusion
from tests.tiny_adm import TINY, random_adm, tiny_pixel_diffusion

FIXTURE = Path(__file__).parent / "fixtures" / "adm_tiny_reference.safetensors"
KEYS_256 = Path(__file__).parent / "fixtures" / "adm_256x256_uncond_keys.json"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def reference():
    d = load_file(str(FIXTURE))
    sd = {k[len("model."):]: v.float() for k, v in d.items() if k.startswith("model.")}
    return sd, d


def test_reproduces_guided_diffusion_unet(reference):
    sd, d = reference
    unet = adm_from_state_dict(sd, num_head_channels=16)
    with torch.no_grad():
        out = unet(d["x"], d["t"])
    assert out.shape == (2, 6, 16, 16)
    assert torch.allclose(out, d["out"], atol=1e-5, rtol=0)
    # the head split matters: the same weights with one head per block give another function
    with torch.no_grad():
        assert (adm_from_state_dict(sd, num_head_channels=32)(d["x"], d["t"]) - d["out"]).abs().max() > 1e-2


def test_reproduces_guided_diffusion_p_mean_variance(reference):
    sd, d = reference
    model = PixelDiffusion(adm_from_state_dict(sd, num_head_channels=16))
    x, t = d["x"], d["t"]
    with torch.no_grad():
        eps, log_var = model.predict_noise_and_log_variance(x, t)
        x0 = predict_x0(model, x, t, eps).clamp(-1, 1)
        mean = model.posterior_mean(x0, x, t)
    # x̂₀ divides by √ᾱ_t: the UNet's float rounding (~1e-6, CPU-dependent) grows 16× at t = 740
    tol = 1e-5 * model.alphas_cumprod[t].rsqrt().float().view(-1, 1, 1, 1)
    assert ((x0 - d["pred_xstart"]).abs() <= tol).all()
    assert torch.allclose(mean, d["p_mean"], atol=1e-5, rtol=0)
    assert torch.allclose(log_var, d["p_log_variance"], atol=1e-5, rtol=0)


def test_full_256_config_has_every_key_and_shape_of_the_release():
    ref = json.loads(KEYS_256.read_text())
    with torch.device("meta"):
        unet = ADMUNet(ADM_256_UNCOND)
    sd = unet.state_dict()
    assert sum(p.numel() for p in unet.parameters()) == 552_814_086 and len(sd) == 566
    assert list(sd) == list(ref)
    assert {k: list(v.shape) for k, v in sd.items()} == ref
    assert infer_config(sd) == ADM_256_UNCOND


@pytest.mark.parametrize("cfg", [
    TINY,
    ADMConfig(model_channels=32, channel_mult=(1, 1, 2), num_res_blocks=2, attention_ds=(1, 4), num_head_channels=32,
              use_scale_shift_norm=False, resblock_updown=False, out_channels=3),
    ADMConfig(model_channels=64, channel_mult=(0.5, 1, 2), num_res_blocks=1, attention_ds=(), num_head_channels=32),
    ADMConfig(model_channels=32, channel_mult=(1,), num_res_blocks=3, attention_ds=(1,), num_head_channels=-1,
              num_heads=2, resblock_updown=False),  # one level: no resampling to tell
])
def test_config_inferred_from_shapes(cfg):
    with torch.device("meta"):
        sd = ADMUNet(cfg).state_dict()
    assert infer_config(sd, num_head_channels=cfg.num_head_channels, num_heads=cfg.num_heads) == cfg


def test_pixel_diffusion_is_a_diffusion_model():
    m = tiny_pixel_diffusion()
    check_model(m)
    assert isinstance(m, DiffusionModel) and m.downsample == 1 and m.num_timesteps == 1000
    x = torch.rand(2, 3, 8, 8)
    assert torch.allclose(m.encode(x), 2 * x - 1) and torch.allclose(m.decode(m.encode(x)), x)
    betas = adm_linear_betas(1000)
    assert float(betas[0]) == pytest.approx(1e-4) and float(betas[-1]) == pytest.approx(0.02)
    assert torch.allclose(m.alphas_cumprod, torch.cumprod(1 - betas, 0).float())
    assert float(m.alphas_cumprod[9]) == pytest.approx(0.998105, abs=1e-6)  # GrIDPure's t* = 10 noise level


def test_predict_noise_takes_any_size_and_ignores_cond():
    m = tiny_pixel_diffusion()
    x = torch.randn(2, 3, 13, 10)
    t = torch.tensor([5, 500])
    with torch.no_grad():
        eps = m.predict_noise(x, t, cond="ignored")
        eps2, log_var = m.predict_noise_and_log_variance(x, t)
        frac = (m.unet_output(x, t)[:, 3:] + 1) / 2
    assert eps.shape == log_var.shape == (2, 3, 13, 10) and torch.equal(eps, eps2)
    lo, hi = m.posterior_log_variance_clipped[t].view(2, 1, 1, 1), m.betas[t].log().view(2, 1, 1, 1)
    assert torch.allclose(log_var, frac * hi + (1 - frac) * lo, atol=1e-6)  # between β̃_t (-1) and β_t (+1)
    with torch.no_grad():  # an even-sized input goes through without padding
        x16 = torch.randn(1, 3, 16, 16)
        assert torch.allclose(m.predict_noise(x16, t[:1]), m.unet(x16, t[:1])[:, :3])


def test_fixed_variance_without_learned_sigma():
    cfg = ADMConfig(model_channels=32, channel_mult=(1, 1), num_res_blocks=1, attention_ds=(), num_head_channels=32,
                    out_channels=3)
    m = tiny_pixel_diffusion(cfg)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        _, lv = m.predict_noise_and_log_variance(x, torch.tensor([0]))
        _, lv5 = m.predict_noise_and_log_variance(x, torch.tensor([5]))
    assert torch.allclose(lv, m.posterior_log_variance_clipped[0].expand_as(lv))
    assert torch.allclose(lv5, m.betas[5].log().expand_as(lv5))


def test_gradient_checkpointing_gives_the_same_gradient():
    unet = random_adm()
    x = torch.randn(1, 3, 16, 16)
    grads = []
    for ckpt in (False, True):
        unet.gradient_checkpointing = ckpt
        xi = x.clone().requires_grad_(True)
        unet(xi, torch.tensor([7]))[:, :3].square().sum().backward()
        grads.append(xi.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".pth"])
def test_load_from_files(tmp_path, suffix):
    unet = random_adm(seed=3)
    path = tmp_path / f"tiny{suffix}"
    sd = unet.state_dict()
    save_file(sd, str(path)) if suffix == ".safetensors" else torch.save(sd, path)
    m = load_pixel_diffusion(path, num_head_channels=32)
    assert m.unet.config == TINY
    assert all(torch.equal(v, m.unet.state_dict()[k]) for k, v in sd.items())  # key for key, unchanged
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([10])
    with torch.no_grad():  # kernels may differ with the tensors' memory layout: float32 rounding only
        assert torch.allclose(m.predict_noise(x, t), unet(x, t)[:, :3], atol=1e-5)
    for dtype, tol in ((torch.float16, 0.02), (torch.bfloat16, 0.1)):  # half-precision weights, float32 in and out
        mh = load_pixel_diffusion(path, num_head_channels=32, dtype=dtype)
        assert mh.unet.out[2].weight.dtype == dtype and mh.alphas_cumprod.dtype == torch.float32
        with torch.no_grad():
            eps = mh.predict_noise(x, t)
            assert eps.dtype == torch.float32
            assert (eps - unet(x, t)[:, :3]).abs().max() < tol * unet(x, t)[:, :3].abs().max()


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_bad_files_get_clear_errors(tmp_path):
    junk = tmp_path / "junk.pt"
    for content in (b"not a checkpoint", b"hello"):
        junk.write_bytes(content)
        with pytest.raises(ValueError, match="ckpt_name: junk.pt is not a readable torch checkpoint"):
            load_pixel_diffusion(junk)
    evil = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, evil)
    with pytest.raises(ValueError, match="ckpt_name: evil.pt is a pickle that safe loading .weights_only. refuses"):
        load_pixel_diffusion(evil)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="not a readable .safetensors"):
        load_pixel_diffusion(bad)
    not_adm = tmp_path / "linear.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, str(not_adm))
    with pytest.raises(ValueError, match="not a guided-diffusion ADM state dict"):
        load_pixel_diffusion(not_adm)
    nested = tmp_path / "nested.pt"
    torch.save({"state_dict": {"a": torch.zeros(1)}}, nested)
    with pytest.raises(ValueError, match="does not hold a state dict"):
        load_pixel_diffusion(nested)
    with pytest.raises(FileNotFoundError, match="ckpt_name"):
        load_pixel_diffusion(tmp_path / "missing.pt")


def test_latent_and_conditional_models_are_refused():
    sd = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
          "first_stage_model.encoder.conv_in.weight": torch.zeros(128, 3, 3, 3)}
    with pytest.raises(ValueError, match="Stable Diffusion .latent. checkpoint.*Load Checkpoint"):
        infer_config(sd)
    with pytest.raises(ValueError, match="latent diffusion UNet"):
        infer_config({"input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3)})
    with torch.device("meta"):
        sd = ADMUNet(TINY).state_dict()
    sd["label_emb.weight"] = torch.zeros(1000, 128, device="meta")
    with pytest.raises(ValueError, match="class-conditional"):
        infer_config(sd)
    with pytest.raises(ValueError, match="num_head_channels: 48 does not divide"):
        sd.pop("label_emb.weight")
        adm_from_state_dict(sd, num_head_channels=48)


def test_fewer_norm_groups_allow_narrow_models():
    # guided-diffusion's 32 groups need >= 32 channels; a small trained model (the testbed's) uses fewer
    assert ADMConfig().norm_groups == 32
    with pytest.raises(ValueError):
        ADMUNet(ADMConfig(model_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_ds=(2,),
                          num_head_channels=16))
    cfg = ADMConfig(model_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_ds=(2,), num_head_channels=16,
                    norm_groups=4)
    unet = ADMUNet(cfg)
    assert {m.num_groups for m in unet.modules() if isinstance(m, torch.nn.GroupNorm)} == {4}
    assert unet(torch.randn(2, 3, 16, 16), torch.tensor([0, 5])).shape == (2, 6, 16, 16)
