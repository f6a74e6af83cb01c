import pytest
import torch

from antipure_core.diffusion import ddim_step, predict_x0, q_sample, sample_timesteps
from antipure_core.timestep import TimestepGuidance, erroneous_timestep, etg_loss
from tests.toy import make_toy


def test_reverse_mapping_known_values():
    t = torch.tensor([0, 1, 500, 999])
    assert erroneous_timestep(t, 1000).tolist() == [999, 998, 499, 0]


def test_offset_mapping_wraps():
    t = torch.tensor([0, 600, 999])
    assert erroneous_timestep(t, 1000, "offset", 500).tolist() == [500, 100, 499]


def test_etg_match_gradient_only_through_true_timestep():
    a = torch.randn(2, 4, 4, 4, requires_grad=True)
    b = torch.randn(2, 4, 4, 4, requires_grad=True)
    loss = etg_loss(a, b, torch.randn(2, 4, 4, 4))
    assert loss.shape == (2,)
    loss.sum().backward()
    assert a.grad.abs().sum() > 0 and b.grad is None
    assert etg_loss(a, a, a).abs().max() == 0


def test_etg_error_mode_is_negative_error():
    noise = torch.randn(1, 4, 2, 2)
    eps_te = noise + 1.0
    assert etg_loss(torch.zeros_like(noise), eps_te, noise, "error").item() == pytest.approx(-1.0)


@pytest.mark.parametrize("kwargs,arg", [({"mapping": "flip"}, "mapping"), ({"mode": "max"}, "mode")])
def test_bad_timestep_guidance(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        TimestepGuidance(**kwargs)
    with pytest.raises(ValueError, match="mapping"):
        erroneous_timestep(torch.tensor([1]), 1000, "flip")


def test_sample_timesteps_range_and_seed():
    t = sample_timesteps(1000, 5, 9, torch.Generator().manual_seed(0))
    assert t.min() == 5 and t.max() == 9
    assert torch.equal(t, sample_timesteps(1000, 5, 9, torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="timestep range"):
        sample_timesteps(1, 9, 5)


def test_forward_process_inverts_with_true_noise():
    model, _ = make_toy(0)
    z0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([3, 700])
    z_t = q_sample(model, z0, t, noise)
    assert torch.allclose(predict_x0(model, z_t, t, noise), z0, atol=1e-4)
    assert torch.allclose(ddim_step(model, z_t, t, torch.tensor([-1, -1]), noise), z0, atol=1e-4)
