"""purification_gap, the oracle on the purifier: PGD on ‖P(x′) − x′‖² through the pixel purifier's chain."""
from dataclasses import replace

import pytest
import torch

from antipure_core.methods import METHODS
from antipure_core.pgd import attack_context
from antipure_core.protect import evaluate_objective, protect
from antipure_core.purification_gap import gap_loss
from antipure_core.purified_attack import PurifiedSettings, draw_purifier, gridpure_share
from tests.core.test_purified import context as purified_context, gen
from tests.tiny_adm import tiny_pixel_diffusion
from tests.toy import smooth_image

pytestmark = pytest.mark.usefixtures("one_thread")

#: a small GrIDPure on the full route: 4 steps, 16-px windows on 32-px images (3 x 3 grid + packed corners)
SMALL = PurifiedSettings(route="full", t_star=4, window=16)


def context(toy, adm, x, settings, seed=0):
    return purified_context(toy, adm, x, settings, seed, method="purification_gap")


def test_registered_as_a_purifying_method_without_parts():
    m = METHODS["purification_gap"]
    assert m.purifies and m.setup is not None and m.parts is None and not (m.trains or m.guided or m.encoder)
    assert "‖P(x′) − x′‖²" in m.description


@pytest.mark.parametrize("windows", ["random", "all"])
def test_gap_is_the_mean_square_over_the_purified_pixels(toy, adm, windows):
    x = smooth_image(1, 32, 32)
    s = replace(SMALL, windows=windows)
    terms = gap_loss(context(toy, adm, x, s, seed=3), x, None)
    assert set(terms) == {"objective", "gap"} and torch.equal(terms["objective"], terms["gap"])
    ctx = context(toy, adm, x, s, seed=3)
    draw_purifier(s, ctx.generator)  # the loss's own draw, then the purifier's
    y, share = gridpure_share(ctx, x, s)
    changed = (y != x).any(1)[0]
    if windows == "random":
        assert share == 16 * 16 / (32 * 32) and changed.sum() <= 16 * 16
        window_mean = (y - x).square().sum() / (3 * 16 * 16)
    else:
        assert share == 1.0 and changed.all()
        window_mean = (y - x).square().mean()
    assert torch.allclose(terms["gap"], window_mean.reshape(1), rtol=1e-6) and terms["gap"] > 0


def test_full_route_gradient_matches_finite_differences(toy):
    """Through every step of both windows' chains (checkpointed), in float64 at fixed draws. The ADM keeps its
    group norms and x̂₀ in float32, which puts a floor near 1e-12 under the loss's rounding: h = 1e-3."""
    adm64 = tiny_pixel_diffusion().double()
    s = replace(SMALL, t_star=3, windows="all")
    x = torch.rand(1, 3, 16, 16, generator=gen(0), dtype=torch.float64) * 0.6 + 0.2

    def f(xx):
        return gap_loss(context(toy, adm64, xx, s, seed=5), xx, None)["objective"].sum()
    xa = x.clone().requires_grad_(True)
    f(xa).backward()
    h = 1e-3
    for c, i, j in [(0, 3, 4), (2, 11, 9)]:  # one pixel only the grid window sees, one both windows see
        e = torch.zeros_like(x)
        e[0, c, i, j] = h
        fd = (f(x + e) - f(x - e)) / (2 * h)
        assert xa.grad[0, c, i, j] != 0 and torch.allclose(xa.grad[0, c, i, j], fd, rtol=1e-3), (c, i, j)


@pytest.mark.parametrize("purifier", ["gridpure", "diffpure"])
def test_gradient_reaches_delta_through_the_pixel_purifier(toy, adm, purifier):
    x = smooth_image(1, 32, 32).requires_grad_(True)
    s = replace(SMALL, purifiers={purifier: 1.0}, diffpure_t_star=3)
    gap_loss(context(toy, adm, x.detach(), s), x, None)["objective"].sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_pgd_raises_the_gap_within_the_budget(toy, adm):
    """At fixed draws (evaluate_objective's seed): above the clean images' gap and uniform noise's at the same
    budget. 16-px images: two windows (the grid's one and the packed corners), so 10 random-window steps reach
    both."""
    model, cond = toy
    x = smooth_image(2, 16, 16)
    opts = {"purification": SMALL, "pixel_model": adm}
    eta = 8 / 255
    seen = []

    def gap(images):
        return evaluate_objective(model, images, x, cond, "purification_gap", seed=5, samples=8, options=opts)
    x_adv = protect(model, x, cond, "purification_gap", eta=eta, alpha=1 / 255, steps=10, seed=1, options=opts,
                    callback=seen.append)
    before, after = gap(x), gap(x_adv)
    noise = gap(protect(model, x, cond, "random", eta=eta, steps=1, seed=1))["gap"]
    assert set(before) == {"objective", "gap"} and {"objective", "gap"} <= set(seen[-1]) and len(seen) == 10
    assert after["gap"] > 1.1 * max(before["gap"], noise), (before, after, noise)
    assert x_adv.shape == x.shape and 0 < (x_adv - x).abs().max() <= eta + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1


def test_deterministic_for_a_seed(toy, adm):
    model, cond = toy
    x = smooth_image(1, 32, 32)
    kw = dict(eta=8 / 255, alpha=2 / 255, steps=3, options={"purification": SMALL, "pixel_model": adm},
              quantize=False)
    a = protect(model, x, cond, "purification_gap", seed=3, **kw)
    assert torch.equal(a, protect(model, x, cond, "purification_gap", seed=3, **kw))
    assert not torch.equal(a, protect(model, x, cond, "purification_gap", seed=4, **kw))


def test_zero_weight_other_purifiers_are_allowed(toy, adm):
    s = replace(SMALL, purifiers={"gridpure": 1.0, "diffpure": 1.0, "jpeg": 0.0, "sdedit": 0.0})
    context(toy, adm, smooth_image(1, 16, 16), s)


@pytest.mark.parametrize("purifiers, message", [
    ({"jpeg": 1.0}, r"purifiers: purification_gap differentiates a pixel purifier's chain \(gridpure, diffpure\); "
                    r"jpeg is not one .* give them weight 0, or use purified_advdm"),
    ({"gridpure": 1.0, "sdedit": 1.0, "blur": 2.0}, r"purifiers: .*; sdedit, blur are not one \(SDEdit runs on"),
])
def test_non_pixel_purifiers_raise_naming_them(toy, adm, purifiers, message):
    with pytest.raises(ValueError, match=message):
        context(toy, adm, smooth_image(1, 16, 16), replace(SMALL, purifiers=purifiers))


def test_bad_options_raise_naming_the_option(toy, adm):
    model, cond = toy
    x = smooth_image(1, 16, 16)
    m = METHODS["purification_gap"]
    with pytest.raises(ValueError, match=r"pixel_model: gridpure runs on a pixel diffusion model; pass "
                                         r"options\['pixel_model'\] \(the node: connect AntiPure Load Pixel "
                                         r"Diffusion\)$"):
        attack_context(model, x, cond, gen(), m)
    with pytest.raises(ValueError, match=r"pixel_model: gridpure and diffpure run on"):  # w = 0 does not excuse it
        attack_context(model, x, cond, gen(), m, options={"purification": replace(
            SMALL, purified_weight=0.0, purifiers={"gridpure": 1, "diffpure": 1})})
    with pytest.raises(TypeError, match=r"options\['purification'\]: expected PurifiedSettings"):
        attack_context(model, x, cond, gen(), m, options={"purification": {"route": "full"}, "pixel_model": adm})
    with pytest.raises(TypeError, match="pixel_model: ToyLDM has no learned-variance step"):
        attack_context(model, x, cond, gen(), m, options={"pixel_model": model})
    with pytest.raises(ValueError, match=r"t_star: must be an integer in \[1, 1000\]"):
        attack_context(model, x, cond, gen(), m, options={"purification": replace(SMALL, t_star=1001),
                                                          "pixel_model": adm})
    with pytest.raises(ValueError, match=r"route: expected one of"):
        attack_context(model, x, cond, gen(), m, options={"purification": replace(SMALL, route="two_step"),
                                                          "pixel_model": adm})
