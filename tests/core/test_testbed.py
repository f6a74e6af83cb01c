"""Smoke test of the CPU efficacy testbed (benchmarks/testbed): model interface, a training step, one tiny repeat.

Untrained weights and a handful of steps: this checks the plumbing, not the numbers
(those come from ``python -m benchmarks.testbed.run``).
"""
import math

import pytest
import torch

from antipure_core.model import DiffusionModel, check_model
from benchmarks.testbed import run as testbed
from benchmarks.testbed.model import TinyLDM
from benchmarks.testbed.train import TrainConfig, train_unet, train_vae
from tests.toy import smooth_image


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return TinyLDM(num_identities=4, token_dim=8, vae_ch=4, unet_ch=8).eval().requires_grad_(False)


def test_interface_and_shapes(model):
    check_model(model)
    assert isinstance(model, DiffusionModel)
    x = smooth_image(2, 32, 32)
    z = model.encode(x)
    assert z.shape == (2, 4, 8, 8)
    assert model.decode(z).shape == (2, 3, 32, 32)
    cond = model.tokens("person", identity=model.rare_token(0))
    assert cond.shape == (1, 2, 8)
    eps = model.predict_noise(z, torch.tensor([0, 999]), cond)
    assert eps.shape == z.shape and torch.isfinite(eps).all()
    with pytest.raises(ValueError, match="cls"):
        model.tokens("cat")


def test_training_steps_run_and_scale_latent():
    torch.manual_seed(0)
    m = TinyLDM(num_identities=4, token_dim=8, vae_ch=4, unet_ch=8)
    x = smooth_image(4, 16, 16)
    cfg = TrainConfig(vae_steps=3, vae_batch=2, vae_crop=8, unet_steps=3, unet_batch=2, token_dim=8, vae_roundtrip=1.0)
    info = train_vae(m, x, cfg, verbose=False)
    # the latent is rescaled to unit standard deviation, as SD's scale factor does
    with torch.no_grad():
        assert abs(float(m.encode(x).std()) - 1) < 1e-3
    assert math.isfinite(info["vae_psnr_db"])
    before = [p.clone() for p in m.unet.parameters()]
    info = train_unet(m, x, torch.tensor([1, 1, 2, 2]), cfg, verbose=False)
    assert math.isfinite(info["unet_loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, m.unet.parameters()))


def test_one_tiny_repeat_writes_results(model, tmp_path):
    s = testbed.Settings(pgd_steps=2, lora_steps=2, num_samples=2, sample_steps=2, diffpure_steps=1,
                         methods=("none", "antipure"), purifiers=("none", "diffpure"),
                         subjects=(0,))
    photos = smooth_image(2, 32, 32)
    lora_before = {k: v.clone() for k, v in model.state_dict().items()}
    rows, examples = testbed.run_repeat(model, photos, 0, s, log=lambda *_: None)
    assert len(rows) == 4 and len(examples) == 4
    # the reference cell is the clean-customized model itself; LoRA is removed again afterwards
    ref = next(r for r in rows if r["method"] == "none" and r["purifier"] == "none")
    assert ref["sample_dist"] == 0 and ref["psnr_protected"] == 99
    assert model.state_dict().keys() == lora_before.keys()
    assert all(torch.equal(v, lora_before[k]) for k, v in model.state_dict().items())
    assert ref["sample_gain"] == 0 and ref["survival"] == 0
    prot = next(r for r in rows if r["method"] == "antipure" and r["purifier"] == "none")
    assert 20 < prot["psnr_protected"] < 99  # within an 8/255 budget: PSNR >= 30 dB roughly
    assert 0 < prot["survival"] <= 8 + 1e-3  # unpurified: the whole perturbation survives, RMSE <= eta
    agg = testbed.aggregate(rows, s)
    ranks = {"sample_gain": testbed.ranking(agg, rows, s)}
    paths = testbed.write_results(tmp_path, "smoke", rows, agg, ranks, s, {"summary": "smoke"},
                                  heatmap_png=False)
    text = paths[0].read_text()
    assert "sample_dist" in text and "antipure" in text
    assert paths[1].read_text().count("\n") == 5  # header + 4 cells


def test_screening_without_customization(model):
    # photoguard: its gradient flows through the encoder (the untrained UNet outputs zeros)
    s = testbed.Settings(pgd_steps=1, methods=("none", "photoguard"), purifiers=("none", "jpeg75"))
    rows, examples = testbed.run_repeat(model, smooth_image(1, 32, 32), 0, s, log=lambda *_: None,
                                        customize_cells=False)
    assert not examples and [r["method"] for r in rows] == ["none", "none", "photoguard", "photoguard"]
    assert "sample_dist" not in rows[0] and rows[2]["survival"] > 0


def test_unknown_names_raise(model):
    s = testbed.Settings()
    with pytest.raises(ValueError, match="method"):
        testbed.protection_kwargs("antipur", s)
    with pytest.raises(ValueError, match="purifier"):
        testbed.purify("blur", model, smooth_image(1, 32, 32), model.tokens("null"), s, 0)
