"""Attacking the customization model through the purifier (purified_advdm, purified_aspl): the differentiable
purifiers and their gradient routes, the expectation over purifiers, the settings' checks, the cost helper."""
from dataclasses import replace

import pytest
import torch

from antipure_core.lora import add_lora, remove_lora
from antipure_core.methods import METHODS
from antipure_core.pgd import attack_context
from antipure_core.protect import evaluate_objective, protect, term_gradients
from antipure_core.purified_attack import (EOT_PURIFIERS, PurifiedSettings, calls_per_step, draw_purifier,
                                           purified_parts)
from antipure_core.purify import _gridpure, diffpure
from antipure_core.purify_filters import blur, jpeg
from antipure_core.purify_grad import jpeg_approx, pixel_chain, route_calls, sdedit_chain
from antipure_core.purify_pixel import pixel_diffpure
from antipure_core.surrogate import SurrogateSettings, protect_surrogate
from antipure_core.windows import grid_windows
from tests.tiny_adm import tiny_pixel_diffusion
from tests.toy import smooth_image

pytestmark = pytest.mark.usefixtures("one_thread")

ROUTES = ("one_step", "k_step", "full")
#: a small GrIDPure: 4 steps, 16-px windows on 32-px images (3 x 3 grid + packed corners)
SMALL = PurifiedSettings(t_star=4, window=16, diffpure_t_star=3, sdedit_steps=3, purified_weight=1.0)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def context(toy, adm, x, settings, seed=0, method="purified_advdm"):
    model, cond = toy
    return attack_context(model, x, cond, gen(seed), METHODS[method],
                          options={"purification": settings, "pixel_model": adm})


def delta_gradient(toy, adm, x, settings, seed=0) -> torch.Tensor:
    """∇ of the purified loss at ``x`` (every part back-propagated), as PGD takes it."""
    ctx = context(toy, adm, x, settings, seed)
    xa = x.clone().requires_grad_(True)
    z = ctx.model.encode(xa)
    for part in METHODS["purified_advdm"].parts(ctx, xa, z):
        part["objective"].sum().backward(retain_graph=True)
    return xa.grad


# --- registry ---------------------------------------------------------------------------------------------------

def test_registered_with_flags_and_listed():
    m = METHODS["purified_advdm"]
    assert m.purifies and m.parts is not None and m.setup is not None and not (m.trains or m.guided or m.encoder)
    aspl = METHODS["purified_aspl"]
    assert aspl.trains and aspl.purifies
    assert set(EOT_PURIFIERS) == {"gridpure", "diffpure", "sdedit", "jpeg", "resize", "blur"}


# --- the differentiable purifiers -------------------------------------------------------------------------------

@pytest.mark.parametrize("route", ["full", "k_step"])
def test_chains_output_exactly_the_purifiers(toy, adm, route):
    x = smooth_image(1, 32, 32)
    assert torch.equal(pixel_chain(adm, x, 4, route, 2, gen(3)), pixel_diffpure(adm, x, t_star=4, generator=gen(3)))
    model, cond = toy
    assert torch.equal(sdedit_chain(model, x, cond, 0.1, 3, route, 1, gen(4)),
                       diffpure(model, x, cond, t_star=0.1, steps=3, generator=gen(4)))


def test_all_windows_are_one_gridpure_iteration(toy, adm):
    x = smooth_image(1, 32, 32)
    s = replace(SMALL, route="full", windows="all")
    ctx = context(toy, adm, x, s, seed=7)
    layout = grid_windows((32, 32), 16, 8)
    ref = _gridpure(x, lambda tile: pixel_diffpure(adm, tile, t_star=4, generator=ctx.generator), layout, 1, 0.1)
    ctx.generator.manual_seed(7)
    assert torch.allclose(EOT_PURIFIERS["gridpure"](ctx, x, s), ref, atol=1e-6)


def test_random_window_purifies_one_window_only(toy, adm):
    x = smooth_image(1, 32, 32)
    y = EOT_PURIFIERS["gridpure"](context(toy, adm, x, SMALL), x, SMALL)
    changed = (y != x).any(1)[0]
    layout = grid_windows((32, 32), 16, 8)
    masks = [torch.zeros(32, 32, dtype=torch.bool) for _ in range(layout.count)]
    for mask, (t, l, h, w) in zip(masks, layout.boxes):
        mask[t:t + h, l:l + w] = True
    for t, l, h, w in layout.corners:
        masks[-1][t:t + h, l:l + w] = True
    assert changed.any() and any(torch.equal(changed | m, m) for m in masks)  # inside one window's pixels


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("purifier", ["gridpure", "diffpure", "sdedit"])
def test_gradient_reaches_delta_through_the_purifier(toy, adm, route, purifier):
    """purified_weight = 1: the plain term is off, so any gradient at δ came through the purifier."""
    s = replace(SMALL, route=route, k=2, purifiers={purifier: 1.0})
    g = delta_gradient(toy, adm, smooth_image(1, 32, 32), s)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


@pytest.mark.parametrize("route", ["one_step", "full"])
def test_chain_gradient_matches_finite_differences(adm, route):
    model = tiny_pixel_diffusion().double()
    x = torch.rand(1, 3, 8, 8, generator=gen(0), dtype=torch.float64) * 0.6 + 0.2
    v, w = (torch.randn(x.shape, generator=gen(s), dtype=torch.float64) for s in (1, 2))

    def f(xx):
        return (pixel_chain(model, xx, 3, route, 3, gen(3)) * w).sum()  # same t and noise every call
    xa = x.clone().requires_grad_(True)
    f(xa).backward()
    h = 1e-4
    fd = (f(x + h * v) - f(x - h * v)) / (2 * h)
    assert torch.allclose((xa.grad * v).sum(), fd, rtol=2e-3)


@pytest.mark.parametrize("route", ["k_step", "full"])
def test_checkpointed_gradients_equal_plain_ones(toy, adm, route):
    x = smooth_image(1, 32, 32)
    s = replace(SMALL, route=route, k=2, purifiers={"gridpure": 1, "sdedit": 1}, windows="all")
    for seed in (0, 1):  # draws sdedit, then gridpure
        a = delta_gradient(toy, adm, x, s, seed)
        b = delta_gradient(toy, adm, x, replace(s, checkpoint=False), seed)
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-8) and a.abs().sum() > 0


def test_jpeg_approximation_is_close_to_real_jpeg():
    """Stated tolerance: RMSE within 2/255 of Pillow's JPEG at quality 75, under half the distance of the
    input itself to it, on a perturbed photo."""
    x = smooth_image(2, 64, 64)
    x = (x + (torch.rand(x.shape, generator=gen(0)) * 2 - 1) * 8 / 255).clamp(0, 1)
    real = jpeg(x, 75)

    def rmse(a, b):
        return float((a - b).square().mean().sqrt()) * 255
    assert rmse(jpeg_approx(x, 75), real) < min(2.0, rmse(x, real) / 2)
    xa = x.clone().requires_grad_(True)
    jpeg_approx(xa, 75).sum().backward()
    assert xa.grad.abs().sum() > 0


def test_lowpass_blurs_the_gradient(toy, adm):
    x = smooth_image(1, 32, 32)
    s = replace(SMALL, route="one_step", purified_weight=0.5)
    g = delta_gradient(toy, adm, x, s, seed=2)
    g_lp = delta_gradient(toy, adm, x, replace(s, lowpass_sigma=1.5), seed=2)
    assert torch.allclose(g_lp, blur(g, 1.5), rtol=1e-4, atol=1e-7)


# --- the expectation, the loss, PGD -----------------------------------------------------------------------------

def test_draw_respects_weights():
    s = PurifiedSettings(purifiers={"gridpure": 0.0, "jpeg": 1.0, "blur": 3.0})
    g = gen(0)
    names = [draw_purifier(s, g) for _ in range(400)]
    assert "gridpure" not in names
    assert 0.65 < names.count("blur") / len(names) < 0.85


def test_zero_weight_pixel_purifier_needs_no_pixel_model(toy):
    model, cond = toy
    s = PurifiedSettings(purifiers={"gridpure": 0.0, "jpeg": 1.0})
    attack_context(model, smooth_image(1, 16, 16), cond, gen(), METHODS["purified_advdm"], options={"purification": s})


def test_weight_zero_is_advdm(toy):
    model, cond = toy
    x = smooth_image(1, 32, 32)
    kw = dict(eta=8 / 255, alpha=1 / 255, steps=3, seed=4)
    s = PurifiedSettings(purified_weight=0.0)
    assert torch.equal(protect(model, x, cond, "purified_advdm", options={"purification": s}, **kw),
                       protect(model, x, cond, "advdm", **kw))


def test_parts_report_both_terms(toy, adm):
    x = smooth_image(1, 32, 32)
    ctx = context(toy, adm, x, replace(SMALL, route="one_step", purified_weight=0.25))
    plain, pure = purified_parts(ctx, x, ctx.model.encode(x), METHODS["advdm"].loss)
    assert set(plain) == {"objective", "ldm", "plain_weighted"}
    assert set(pure) == {"objective", "ldm_purified", "purified_weighted"}
    assert torch.equal(plain["plain_weighted"], plain["objective"])
    assert torch.equal(pure["purified_weighted"], pure["objective"])
    assert torch.allclose(plain["objective"], 0.75 * plain["ldm"]) and torch.allclose(pure["objective"],
                                                                                      0.25 * pure["ldm_purified"])


def test_term_gradients_tell_the_plain_and_the_purified_term_apart(toy, adm):
    model, cond = toy
    x = smooth_image(1, 32, 32)
    x_adv = (x + 4 / 255 * torch.randn(x.shape, generator=gen(5))).clamp(0, 1)
    s = replace(SMALL, route="full", purified_weight=0.5)
    kw = dict(seed=2, samples=2, options={"purification": s, "pixel_model": adm})
    report = term_gradients(model, x_adv, x, cond, "purified_advdm", **kw)
    assert set(report["terms"]) == {"plain", "purified"}
    plain, pure = report["terms"]["plain"], report["terms"]["purified"]
    assert plain["norm"] > 0 and pure["norm"] > 0 and plain["share"] + pure["share"] == pytest.approx(1)
    assert plain["cosine_to_rest"] == pytest.approx(pure["cosine_to_rest"])  # two terms: one cosine
    assert -1 <= plain["cosine_to_rest"] <= 1
    terms = evaluate_objective(model, x_adv, x, cond, "purified_advdm", **kw)
    assert terms["plain_weighted"] + terms["purified_weighted"] == pytest.approx(terms["objective"])


def test_deterministic_for_a_seed(toy, adm):
    model, cond = toy
    x = smooth_image(1, 32, 32)
    s = replace(SMALL, route="k_step", k=2, purifiers={"gridpure": 1, "jpeg": 1, "sdedit": 1}, purified_weight=0.5)
    kw = dict(eta=8 / 255, alpha=2 / 255, steps=4, options={"purification": s, "pixel_model": adm}, quantize=False)
    a = protect(model, x, cond, "purified_advdm", seed=3, **kw)
    assert torch.equal(a, protect(model, x, cond, "purified_advdm", seed=3, **kw))
    assert not torch.equal(a, protect(model, x, cond, "purified_advdm", seed=4, **kw))


def test_pgd_raises_the_objective(toy, adm):
    model, cond = toy
    x = smooth_image(2, 32, 32)
    opts = {"purification": replace(SMALL, route="full", purifiers={"gridpure": 1}), "pixel_model": adm}
    before = evaluate_objective(model, x, x, cond, "purified_advdm", seed=5, samples=8, options=opts)["objective"]
    x_adv = protect(model, x, cond, "purified_advdm", eta=16 / 255, alpha=2 / 255, steps=10, seed=1, options=opts)
    after = evaluate_objective(model, x_adv, x, cond, "purified_advdm", seed=5, samples=8, options=opts)["objective"]
    assert after > before * 1.02, (before, after)


def test_purified_aspl_runs_the_surrogate_loop(toy, adm):
    model, cond = toy
    x = smooth_image(1, 32, 32)
    params = add_lora(model.unet, rank=2, generator=gen(0))
    try:
        out = protect_surrogate(model, x, cond, params, "purified_aspl", eta=8 / 255, alpha=2 / 255, steps=2,
                                settings=SurrogateSettings(train_steps=1, attack_steps=1),
                                options={"purification": replace(SMALL, route="one_step"), "pixel_model": adm})
        with pytest.raises(ValueError, match="pixel_model"):
            protect_surrogate(model, x, cond, params, "purified_aspl", steps=1)
    finally:
        remove_lora(model.unet)
    assert out.shape == x.shape and (out - x).abs().max() > 0


# --- settings ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    ({"route": "two_step"}, r"route: expected one of \('one_step', 'k_step', 'full'\)"),
    ({"k": 0}, r"k: must be an integer >= 1"),
    ({"checkpoint": "yes"}, r"checkpoint: must be True or False"),
    ({"purifiers": {}}, r"purifiers: expected a non-empty"),
    ({"purifiers": {"impress": 1}}, r"purifiers: unknown 'impress', choose among gridpure"),
    ({"purifiers": {"jpeg": -1}}, r"purifiers\['jpeg'\]: must be a number in \[0"),
    ({"purifiers": {"jpeg": 0}}, r"purifiers: every weight is 0"),
    ({"purified_weight": 1.5}, r"purified_weight: must be a number in \[0, 1\]"),
    ({"windows": "some"}, r"windows: expected one of \('all', 'random'\)"),
    ({"window": 4}, r"window: must be an integer >= 8"),
    ({"stride": 300}, r"stride: must be an integer in \[1, 256\]"),
    ({"gamma": 2}, r"gamma: must be a number in \[0, 1\]"),
    ({"sdedit_t_star": 0}, r"sdedit_t_star: must be a number in \(0, 1\]"),
    ({"jpeg_quality": 0}, r"jpeg_quality: must be an integer in \[1, 100\]"),
    ({"lowpass_sigma": -1}, r"lowpass_sigma: must be a number in \[0"),
])
def test_bad_settings_raise_naming_the_setting(overrides, message):
    with pytest.raises(ValueError, match=message):
        replace(PurifiedSettings(), **overrides).check()


def test_bad_options_raise_at_the_context(toy, adm):
    model, cond = toy
    x = smooth_image(1, 16, 16)
    m = METHODS["purified_advdm"]
    with pytest.raises(ValueError, match=r"pixel_model: gridpure runs on a pixel diffusion model; pass "
                                         r"options\['pixel_model'\]"):
        attack_context(model, x, cond, gen(), m)
    with pytest.raises(TypeError, match=r"options\['purification'\]: expected PurifiedSettings"):
        attack_context(model, x, cond, gen(), m, options={"purification": {"route": "full"}})
    with pytest.raises(TypeError, match="pixel_model: ToyLDM has no learned-variance step"):
        attack_context(model, x, cond, gen(), m, options={"pixel_model": model})
    with pytest.raises(ValueError, match=r"t_star: must be an integer in \[1, 1000\]"):
        attack_context(model, x, cond, gen(), m, options={"purification": PurifiedSettings(t_star=1001),
                                                          "pixel_model": adm})


# --- cost -------------------------------------------------------------------------------------------------------

def test_route_calls():
    assert route_calls("one_step", 10, 3) == {"forward": 1, "backward": 1}
    assert route_calls("k_step", 10, 3) == {"forward": 13, "backward": 3}
    assert route_calls("k_step", 10, 3, checkpointed=False) == {"forward": 10, "backward": 3}
    assert route_calls("full", 10, 3) == {"forward": 20, "backward": 10}


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("windows", ["random", "all"])
def test_calls_per_step_counts_the_purifier_calls(toy, adm, route, windows):
    x = smooth_image(1, 32, 32)
    s = replace(SMALL, route=route, k=2, windows=windows, purified_weight=0.5)
    calls = []
    hook = adm.unet.register_forward_hook(lambda *a: calls.append(1))
    try:
        delta_gradient(toy, adm, x, s)
    finally:
        hook.remove()
    expected = calls_per_step(s, "gridpure", windows=grid_windows((32, 32), 16, 8).count)
    assert len(calls) == expected["purifier_forward"]
    assert expected["unet_forward"] == expected["unet_backward"] == 2
    assert calls_per_step(s, "jpeg")["purifier_forward"] == 0
    assert calls_per_step(replace(s, sdedit_steps=20), "sdedit")["purifier_backward"] == {
        "one_step": 1, "k_step": 2, "full": 20}[route]
