"""Each weighted term's image gradient (term_gradients) on the tiny pixel ADM and the latent toy: the terms against
an independent backward of the whole objective, and the PGD step against the plain step taken by hand."""
import math

import pytest
import torch

from antipure_core.frequency import FrequencyGuidance
from antipure_core.image import project_linf
from antipure_core.methods import METHODS, antipure_terms, weighted_terms
from antipure_core.objective_terms import image_gradients
from antipure_core.pgd import attack_context, pgd_step
from antipure_core.protect import term_gradients
from antipure_core.timestep import TimestepGuidance
from tests.tiny_adm import tiny_pixel_diffusion
from tests.toy import make_toy, smooth_image

pytestmark = pytest.mark.usefixtures("one_thread")

EPS = 8 / 255


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
    assert math.isclose(sum(r["share"] for r in report["terms"].values()), 1.0, rel_tol=1e-6)


def test_term_gradients_one_term_method_and_determinism(latent):
    model, cond = latent
    x = smooth_image(1, 24, 20)  # padded to 24 x 24 inside, cropped back
    x_adv = _perturbed(x)
    report = term_gradients(model, x_adv, x, cond, "advdm", seed=2, samples=2)
    assert list(report["terms"]) == ["objective"]
    r = report["terms"]["objective"]
    assert r["share"] == 1.0 and r["sign_agreement"] == 1.0 and r["norm"] == report["total_norm"] > 0
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


def test_pgd_step_is_the_plain_step(pixel):
    """The step is the sign of the plain objective gradient (one backward per part), bit for bit."""
    model, cond = pixel
    x = smooth_image(2, 32, 32)
    kw = dict(frequency=FrequencyGuidance(), timestep=TimestepGuidance(), window=16)
    step, _ = pgd_step(METHODS["antipure"], _ctx(model, cond, x, 5, **kw), x, x, EPS, 2 / 255, eot_samples=2)
    by_hand = project_linf(x + 2 / 255 * whole_gradient(model, cond, x, x, 5, 2, **kw).sign(), x, EPS)
    assert torch.equal(step, by_hand)
