import pytest
import torch

from antipure_core.diffusion import ddim_step, predict_x0, q_sample, sample_timesteps
from antipure_core.timestep import TimestepGuidance, erroneous_timestep, etg_loss
from tests.toy import make_toy


def test_offset_and_scale_rules_known_values():
    t = torch.tensor([0, 1, 9, 995])
    assert erroneous_timestep(t, 1000, "offset", 10).tolist() == [10, 11, 19, 999]
    assert erroneous_timestep(t, 1000, "scale", scale=2.0).tolist() == [1, 3, 19, 999]
    assert erroneous_timestep(t, 1000, "scale", scale=1.1).tolist() == [1, 2, 10, 999]  # always later than t


def test_etg_loss_is_minus_mean_square():
    a = torch.randn(2, 3, 4, 4, requires_grad=True)
    b = torch.randn(2, 3, 4, 4)
    loss = etg_loss(a, b)
    assert loss.shape == (2,) and torch.allclose(loss, -(b - a).square().mean((1, 2, 3)))
    assert etg_loss(a, a).abs().max() == 0


@pytest.mark.parametrize("kwargs,arg", [({"rule": "reverse"}, "rule"), ({"offset": 0}, "offset"),
                                        ({"rule": "scale", "scale": 1.0}, "scale")])
def test_bad_timestep_guidance(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        TimestepGuidance(**kwargs)
    with pytest.raises(ValueError, match=arg):
        erroneous_timestep(torch.tensor([1]), 1000, **{"rule": "offset", "offset": 10, **kwargs})


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
