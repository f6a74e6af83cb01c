import pytest
import torch

from antipure_core.callbacks import Cancelled
from antipure_core.methods import METHODS
from antipure_core.protect import evaluate_objective, protect
from tests.toy import make_toy, smooth_image

EPS8 = 8 / 255


@pytest.fixture(scope="module")
def toy():
    return make_toy(0)


def test_registry_has_every_method():
    assert {"antipure", "advdm", "mist", "photoguard", "sds", "random"} <= set(METHODS)


@pytest.mark.parametrize("method", ["antipure", "advdm", "mist", "photoguard", "sds"])
def test_method_raises_its_objective(toy, method):
    model, cond = toy
    x = smooth_image(2, 32, 32)
    before = evaluate_objective(model, x, x, cond, method, seed=123, samples=16)["objective"]
    x_adv = protect(model, x, cond, method=method, eta=16 / 255, alpha=2 / 255, steps=12, seed=1)
    after = evaluate_objective(model, x_adv, x, cond, method, seed=123, samples=16)["objective"]
    assert after > before + 0.05 * abs(before) + 1e-4, (method, before, after)


def test_ablations_drop_terms(toy):
    model, cond = toy
    seen = []
    protect(model, smooth_image(1, 32, 32), cond, steps=1, frequency=None, timestep=None, callback=seen.append)
    assert set(seen[0]) >= {"i", "total", "x_adv", "objective", "ldm"} and "pfg" not in seen[0] and "etg" not in seen[0]


@pytest.mark.parametrize("method", ["antipure", "advdm", "random"])
def test_budget_exact_after_quantisation(toy, method):
    model, cond = toy
    x = smooth_image(1, 32, 32)
    x[..., :4, :] = 0.0   # saturated pixels must stay in budget too
    x[..., -4:, :] = 1.0
    x_adv = protect(model, x, cond, method=method, eta=EPS8, alpha=3 / 255, steps=4, random_start=True)
    assert (x_adv - x).abs().max() <= EPS8 + 1e-7
    assert torch.equal(torch.round(x_adv * 255) / 255, x_adv)  # on the 8-bit grid
    assert (x_adv - x).abs().max() > 0.5 / 255
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert torch.equal(((x_adv * 255).round().byte().float() - x * 255).abs().max(),
                       torch.tensor(8.0)) or ((x_adv * 255).round() - (x * 255).round()).abs().max() <= 8


def test_quantize_off_grid_input(toy):
    model, cond = toy
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))  # not on the 8-bit grid
    x_adv = protect(model, x, cond, method="advdm", eta=EPS8, steps=3)
    assert (x_adv - x).abs().max() <= EPS8 + 1e-7


def test_deterministic_for_seed(toy):
    model, cond = toy
    x = smooth_image(1, 32, 32)
    a = protect(model, x, cond, steps=3, seed=7, random_start=True)
    b = protect(model, x, cond, steps=3, seed=7, random_start=True)
    c = protect(model, x, cond, steps=3, seed=8, random_start=True)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_steps_zero_is_identity(toy):
    model, cond = toy
    x = smooth_image(2, 20, 28)
    out = protect(model, x, cond, steps=0)
    assert torch.equal(out, x) and out is not x


@pytest.mark.parametrize("size", [(37, 50), (33, 33), (8, 64)])
def test_odd_sizes_keep_exact_shape(toy, size):
    model, cond = toy
    x = smooth_image(2, *size)
    out = protect(model, x, cond, steps=2)
    assert out.shape == x.shape and (out - x).abs().max() <= EPS8 + 1e-7


def test_callback_every_step_and_cancel(toy):
    model, cond = toy
    x = smooth_image(1, 32, 32)
    seen = []
    protect(model, x, cond, method="advdm", steps=3, callback=seen.append)
    assert [s["i"] for s in seen] == [0, 1, 2] and all(s["total"] == 3 for s in seen)

    def stop(info):
        if info["i"] == 1:
            raise Cancelled()
    with pytest.raises(Cancelled):
        protect(model, x, cond, steps=5, callback=stop)


def test_eot_samples_average(toy):
    model, cond = toy
    x = smooth_image(1, 32, 32)
    seen = []
    protect(model, x, cond, method="advdm", steps=1, eot_samples=3, callback=seen.append)
    assert seen[0]["ldm"] > 0


def test_random_method_uniform_noise(toy):
    model, cond = toy
    x = torch.full((1, 3, 64, 64), 0.5)
    out = protect(model, x, cond, method="random", eta=EPS8, steps=1, seed=0)
    d = (out - x) * 255
    assert d.abs().max() <= 8 and d.std() > 3  # spread over the whole budget


@pytest.mark.parametrize("kwargs,arg", [
    ({"eta": 0}, "eta"), ({"eta": -0.1}, "eta"), ({"eta": 1.5}, "eta"), ({"eta": float("nan")}, "eta"),
    ({"alpha": 0}, "alpha"), ({"steps": -1}, "steps"), ({"method": "nope"}, "method"),
    ({"eot_samples": 0}, "eot_samples"), ({"t_range": (10, 2000)}, "t_range"),
    ({"method": "advdm", "t_range": (10, 2000)}, "t_range"), ({"t_purify": 0}, "t_purify"),
    ({"t_purify": 1000}, "t_purify"), ({"method": "advdm", "t_purify": 10}, "t_purify"),
    ({"window": 12}, "window"), ({"window": 16, "stride": 32}, "stride"), ({"window_mode": "some"}, "window_mode"),
])
def test_bad_arguments(toy, kwargs, arg):
    model, cond = toy
    with pytest.raises(ValueError, match=arg):
        protect(model, smooth_image(1, 16, 16), cond, **{"steps": 1, **kwargs})


@pytest.mark.parametrize("x,msg", [
    (torch.rand(3, 16, 16), "shape"), (torch.rand(1, 4, 16, 16), "channels"), (torch.rand(1, 1, 16, 16), "channels"),
    (torch.rand(1, 3, 16, 16) * 2, r"\[0, 1\]"), (torch.full((1, 3, 16, 16), float("nan")), "NaN"),
    (torch.full((1, 3, 16, 16), float("inf")), "NaN or inf"), (torch.zeros(0, 3, 16, 16), "empty"),
])
def test_bad_images(toy, x, msg):
    model, cond = toy
    with pytest.raises(ValueError, match=msg):
        protect(model, x, cond, steps=1)


def test_not_a_model():
    with pytest.raises(TypeError, match="DiffusionModel"):
        protect(object(), smooth_image(1, 16, 16), None, steps=1)
