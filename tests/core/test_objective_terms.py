"""Each weighted term's image gradient (term_gradients) and PFG at a fixed share of the step (FrequencyGuidance.share),
on the tiny pixel ADM and the latent toy: the terms against an independent backward of the whole objective, the
share against term_gradients at the step's own draws, and the default step against the plain PGD step."""
import math

import pytest
import torch

from antipure_core.frequency import FrequencyGuidance
from antipure_core.image import project_linf
from antipure_core.methods import METHODS, antipure_terms, weighted_terms
from antipure_core.objective_terms import image_gradients, share_scale
from antipure_core.pgd import attack_context, pgd_step
from antipure_core.protect import protect, term_gradients
from antipure_core.timestep import TimestepGuidance
from tests.tiny_adm import tiny_pixel_diffusion
from tests.toy import make_toy, smooth_image

pytestmark = pytest.mark.usefixtures("one_thread")

EPS = 8 / 255
PFG = "pfg"


@pytest.fixture(scope="module")
def pixel():
    return tiny_pixel_diffusion(seed=0), None


@pytest.fixture(scope="module")
def latent():
    return make_toy(1)


def _model(request, kind):
    return request.getfixturevalue(kind)


def _ctx(model, cond, x, seed, method="antipure", **kw):
    return attack_context(model, x, cond, torch.Generator().manual_seed(seed), METHODS[method], **kw)


def whole_gradient(model, cond, x_adv, x, seed, samples, method="antipure", **kw):
    """∇ of the mean objective by one plain backward per part, as the PGD step used to take it."""
    ctx = _ctx(model, cond, x, seed, method, **kw)
    xa = x_adv.clone().requires_grad_(True)
    z = model.encode(xa)
    for _ in range(samples):
        for part in METHODS[method].parts(ctx, xa, z) if METHODS[method].parts else [METHODS[method].loss(ctx, xa, z)]:
            (part["objective"].sum() / samples).backward(retain_graph=True)
    return xa.grad


def _perturbed(x, seed=9):
    g = torch.Generator().manual_seed(seed)
    return (x + (torch.rand(x.shape, generator=g) * 2 - 1) * EPS).clamp(0, 1)


# --- weighted terms ---------------------------------------------------------------------------------------------

def test_weighted_terms_add_up_to_the_objective(latent):
    model, cond = latent
    x = smooth_image(2, 32, 32)
    ctx = _ctx(model, cond, x, 3, frequency=FrequencyGuidance(), timestep=TimestepGuidance())
    with torch.no_grad():
        terms = antipure_terms(ctx, model.encode(x))
    parts = weighted_terms(terms)
    assert list(parts) == ["ldm", "pfg", "etg"]
    assert torch.equal(parts["ldm"] + parts["pfg"] + parts["etg"], terms["objective"])  # the same sum, bit for bit
    assert weighted_terms({"objective": terms["ldm"], "ldm": terms["ldm"]}) == {"objective": terms["ldm"]}


@pytest.mark.parametrize("kind,kw", [("pixel", {"window": 16}), ("latent", {})])
def test_term_gradients_add_up_to_the_objective_gradient(request, kind, kw):
    model, cond = _model(request, kind)
    x = smooth_image(1, 32, 32)
    x_adv = _perturbed(x)
    ctx = _ctx(model, cond, x, 4, frequency=FrequencyGuidance(), timestep=TimestepGuidance(), **kw)
    xa = x_adv.clone().requires_grad_(True)
    _, grads = image_gradients(METHODS["antipure"], ctx, xa, samples=2, group=lambda name: name)
    assert list(grads) == ["ldm", "pfg", "etg"] and xa.grad is None
    want = whole_gradient(model, cond, x_adv, x, 4, 2, frequency=FrequencyGuidance(), timestep=TimestepGuidance(),
                          **kw)
    got = grads["ldm"] + grads["pfg"] + grads["etg"]
    assert want.abs().max() > 0
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))

    report = term_gradients(model, x_adv, x, cond, "antipure", seed=4, samples=2, **kw)
    assert set(report["terms"]) == {"ldm", "pfg", "etg"}
    assert math.isclose(report["total_norm"], float(want.norm()), rel_tol=1e-4)
    for name, r in report["terms"].items():
        assert math.isclose(r["norm"], float(grads[name].norm()), rel_tol=1e-5)
        assert math.isclose(r["share"], r["norm"] / sum(t["norm"] for t in report["terms"].values()), rel_tol=1e-6)
        agree = float((grads[name].sign() == want.sign()).float().mean())
        assert abs(r["sign_agreement"] - agree) < 1e-3  # a pixel or two may flip on a near-zero total
        rest = want - grads[name]
        cos = float((grads[name] * rest).sum() / (grads[name].norm() * rest.norm()))
        assert math.isclose(r["cosine_to_rest"], cos, rel_tol=1e-3, abs_tol=1e-4)
    assert math.isclose(sum(r["share"] for r in report["terms"].values()), 1.0, rel_tol=1e-6)


def test_term_gradients_one_term_method_and_determinism(latent):
    model, cond = latent
    x = smooth_image(1, 24, 20)  # padded to 24 x 24 inside, cropped back
    x_adv = _perturbed(x)
    report = term_gradients(model, x_adv, x, cond, "advdm", seed=2, samples=2)
    assert list(report["terms"]) == ["objective"]
    r = report["terms"]["objective"]
    assert r["share"] == 1.0 and r["sign_agreement"] == 1.0 and r["norm"] == report["total_norm"] > 0
    assert r["cosine_to_rest"] == 0.0  # no other term
    assert report == term_gradients(model, x_adv, x, cond, "advdm", seed=2, samples=2)
    assert report != term_gradients(model, x_adv, x, cond, "advdm", seed=3, samples=2)


def test_term_gradients_ablation_and_bad_inputs(latent):
    model, cond = latent
    x = smooth_image(1, 32, 32)
    assert set(term_gradients(model, x, x, cond, samples=1, timestep=None)["terms"]) == {"ldm", "pfg"}
    with pytest.raises(ValueError, match="samples"):
        term_gradients(model, x, x, cond, samples=0)
    with pytest.raises(ValueError, match="method"):
        term_gradients(model, x, x, cond, "random")
    with pytest.raises(ValueError, match="x_adv"):
        term_gradients(model, x[..., :16], x, cond)


# --- PFG at a fixed share ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("share", [0, 1, -0.5, 1.5, float("nan"), True, "0.5"])
def test_bad_share_raises(share):
    with pytest.raises(ValueError, match=r"share: .*\(0, 1\)"):
        FrequencyGuidance(share=share)


def test_share_none_is_the_plain_step(pixel):
    """The default step is the sign of the plain objective gradient, bit for bit, and reports no pfg_lambda."""
    model, cond = pixel
    x = smooth_image(2, 32, 32)
    kw = dict(frequency=FrequencyGuidance(share=None), timestep=TimestepGuidance(), window=16)
    step, terms = pgd_step(METHODS["antipure"], _ctx(model, cond, x, 5, **kw), x, x, EPS, 2 / 255, eot_samples=2)
    by_hand = project_linf(x + 2 / 255 * whole_gradient(model, cond, x, x, 5, 2, **kw).sign(), x, EPS)
    assert torch.equal(step, by_hand) and "pfg_lambda" not in terms
    run = dict(eta=EPS, alpha=2 / 255, steps=2, seed=1, window=16, quantize=False)
    assert torch.equal(protect(model, x, cond, **run), protect(model, x, cond, frequency=FrequencyGuidance(), **run))


def test_share_gives_pfg_its_share_at_the_steps_draws(pixel):
    """One step at share 0.5 with ETG off: term_gradients at the same draws with λ₁ = the step's pfg_lambda
    shows PFG at half of the gradient."""
    model, cond = pixel
    x = smooth_image(1, 32, 32)
    seen = []
    protect(model, x, cond, steps=1, seed=6, frequency=FrequencyGuidance(share=0.5), timestep=None,
            callback=seen.append)
    lam = seen[0]["pfg_lambda"]
    assert lam > 0 and lam != 0.5
    before = term_gradients(model, x, x, cond, seed=6, samples=1, timestep=None)["terms"]
    after = term_gradients(model, x, x, cond, seed=6, samples=1, timestep=None,
                           frequency=FrequencyGuidance(weight=lam))["terms"]
    assert abs(after["pfg"]["share"] - 0.5) < 1e-4, (before, after)
    assert math.isclose(after["pfg"]["norm"], before["pfg"]["norm"] * lam / 0.5, rel_tol=1e-4)


@pytest.mark.parametrize("share", [0.2, 0.7])
def test_share_step_scales_pfg_against_the_rest_per_image(latent, share):
    model, cond = latent
    x = smooth_image(2, 32, 32)
    x_adv = _perturbed(x)
    kw = dict(frequency=FrequencyGuidance(share=share), timestep=TimestepGuidance())
    step, terms = pgd_step(METHODS["antipure"], _ctx(model, cond, x, 7, **kw), x_adv, x, EPS, 1 / 255)
    xa = x_adv.clone().requires_grad_(True)
    _, g = image_gradients(METHODS["antipure"], _ctx(model, cond, x, 7, **kw), xa, 1,
                           group=lambda n: n if n == PFG else "rest")
    c = share_scale(g["pfg"], g["rest"], share)
    n_pfg, n_rest = (c * g["pfg"]).flatten(1).norm(dim=1), g["rest"].flatten(1).norm(dim=1)
    assert torch.allclose(n_pfg / (n_pfg + n_rest), torch.full((2,), share), atol=1e-5)
    assert c.flatten()[0] != c.flatten()[1]  # one scale per image
    assert torch.equal(step, project_linf(x_adv + 1 / 255 * (c * g["pfg"] + g["rest"]).sign(), x, EPS))
    assert math.isclose(terms["pfg_lambda"], 0.5 * float(c.mean()), rel_tol=1e-6)
    assert {"ldm", "pfg", "etg", "objective"} <= set(terms)


def test_share_scale_guards_a_zero_pfg_gradient():
    g_rest = torch.ones(2, 3, 4, 4)
    g_pfg = torch.cat([torch.zeros(1, 3, 4, 4), torch.full((1, 3, 4, 4), 2.0)])
    c = share_scale(g_pfg, g_rest, 0.25)
    assert c.shape == (2, 1, 1, 1) and c[0].item() == 1.0
    assert math.isclose(c[1].item(), 0.25 / 0.75 * 1 / 2, rel_tol=1e-6)


def test_share_is_deterministic_and_changes_the_result(pixel):
    model, cond = pixel
    x = smooth_image(1, 32, 32)
    run = dict(eta=EPS, alpha=2 / 255, steps=2, seed=3, quantize=False)
    a = protect(model, x, cond, frequency=FrequencyGuidance(share=0.5), **run)
    assert torch.equal(a, protect(model, x, cond, frequency=FrequencyGuidance(share=0.5), **run))
    assert not torch.equal(a, protect(model, x, cond, **run))
