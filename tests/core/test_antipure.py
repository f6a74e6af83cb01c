"""AntiPure as published (DESIGN §1.1): each term against a direct recomputation of its formula.

L = L_ddpm + λ₁·e^{ᾱ_t−1}·L_fre + λ₂·e^{L_err}, t ~ U{1..t^p}, on a tiny random-weight ADM
(the pixel purifier's code path) and, for "x̂₀ decoded for PFG", on the tiny latent toy.
"""
import math

import pytest
import torch

from antipure_core.frequency import FrequencyGuidance
from antipure_core.methods import AttackContext, antipure_loss, antipure_terms, attack_tiles
from antipure_core.protect import protect
from antipure_core.timestep import TimestepGuidance
from tests.tiny_adm import tiny_pixel_diffusion
from tests.toy import make_toy, smooth_image


@pytest.fixture(scope="module")
def pixel():
    return tiny_pixel_diffusion(seed=0), None


def textbook_highest_quarter(img: torch.Tensor, s: int) -> torch.Tensor:
    """(B,) mean over channels and patches of (4/s²)·Σ_{u,v=s/2..s−1} DCT_s[u, v], DCT-II from cosines."""
    b, c, h, w = img.shape
    n = torch.arange(s, dtype=torch.float64)
    scale = torch.full((s,), math.sqrt(2 / s), dtype=torch.float64)
    scale[0] = math.sqrt(1 / s)
    basis = scale[:, None] * torch.cos(math.pi * (2 * n[None] + 1) * n[:, None] / (2 * s))  # [u, m]
    total = torch.zeros(b, dtype=torch.float64)
    count = 0
    for ch in range(c):
        for y in range(0, h, s):
            for x in range(0, w, s):
                patch = img[:, ch, y:y + s, x:x + s].double()
                coef = torch.einsum("um,bmn,vn->buv", basis, patch, basis)
                total += 4 / s ** 2 * coef[:, s // 2:, s // 2:].sum((1, 2))
                count += 1
    return total / count


def direct_terms(model, z, cond, g, t_p, s, offset, decode):
    """The formula written out: the same draws (t, then ε) as the method from generator ``g``."""
    t = torch.randint(0, t_p, (z.shape[0],), generator=g)  # 1-based t ∈ [1, t^p] is index t − 1
    noise = torch.randn(z.shape, generator=g)
    ab = model.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = ab.sqrt() * z + (1 - ab).sqrt() * noise
    eps = model.predict_noise(x_t, t, cond)
    ldm = (eps - noise).square().mean((1, 2, 3))
    x0 = (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()
    fre = torch.sigmoid(textbook_highest_quarter(decode(x0) * 2 - 1, s)).float()
    err = -(model.predict_noise(x_t, torch.clamp(t + offset, max=999), cond) - eps).square().mean((1, 2, 3))
    pfg_w, etg_w = 0.5 * torch.exp(ab.flatten() - 1) * fre, 0.5 * torch.exp(err)
    return {"ldm": ldm, "pfg": fre, "etg": err, "objective": ldm + pfg_w + etg_w, "t": t,
            "ldm_weighted": ldm, "pfg_weighted": pfg_w, "etg_weighted": etg_w}


@pytest.mark.parametrize("latent", [False, True])
def test_terms_match_the_formula(latent, pixel):
    model, cond = make_toy(1) if latent else pixel
    x = smooth_image(2, 32, 32)
    z = model.encode(x)
    ctx = AttackContext(model, x, cond, torch.Generator().manual_seed(5), 0, 9,
                        FrequencyGuidance(), TimestepGuidance())
    with torch.no_grad():
        got = antipure_terms(ctx, z)
        want = direct_terms(model, z, cond, torch.Generator().manual_seed(5), 10, 8, 10, model.decode)
    assert set(got) == {"ldm", "pfg", "etg", "objective", "ldm_weighted", "pfg_weighted", "etg_weighted"}
    for k in got:
        assert torch.allclose(got[k], want[k], rtol=1e-4, atol=1e-6), (k, got[k], want[k])
    assert (want["etg"] < 0).all() and ((0 < want["pfg"]) & (want["pfg"] < 1)).all()


def test_defaults_are_the_papers():
    assert FrequencyGuidance().weight == 0.5 and TimestepGuidance().weight == 0.5
    assert TimestepGuidance().offset is None  # t_err = t + t^p
    assert TimestepGuidance().stop_gradient and FrequencyGuidance().reduction == "signed"


def test_scale_rule_and_magnitude_reduction(pixel):
    model, cond = pixel
    x = smooth_image(1, 16, 16)
    ctx = AttackContext(model, x, cond, torch.Generator().manual_seed(0), 0, 9,
                        FrequencyGuidance(reduction="magnitude", patch_size=4),
                        TimestepGuidance(rule="scale", scale=3.0))
    calls = []
    spy = _Spy(model, calls)
    ctx.model = spy
    with torch.no_grad():
        out = antipure_terms(ctx, model.encode(x))
    (t, _), (t_err, _) = calls
    assert t_err.item() == 3 * (t.item() + 1) - 1
    assert 0.5 < out["pfg"].item() < 1  # magnitudes: the sigmoid of a mean of |c| is above 1/2


class _Spy:
    """Wraps a model and records ``(t, grad_enabled)`` of every noise prediction."""

    def __init__(self, model, calls):
        self.model, self.calls = model, calls

    def __getattr__(self, name):
        return getattr(self.model, name)

    def predict_noise(self, z_t, t, cond):
        self.calls.append((t.clone(), torch.is_grad_enabled() and z_t.requires_grad))
        return self.model.predict_noise(z_t, t, cond)


def test_sampled_t_within_purification_range(pixel):
    model, cond = pixel
    calls = []
    protect(_Spy(model, calls), smooth_image(2, 16, 16), cond, steps=12, t_purify=4, seed=3)
    base, err = calls[0::2], calls[1::2]
    ts = torch.cat([t for t, _ in base])
    assert ts.min() >= 0 and ts.max() <= 3  # 1-based t ∈ [1, t^p = 4]
    assert set(ts.tolist()) == {0, 1, 2, 3}  # the whole range is drawn
    assert all(torch.equal(e, t + 4) for (t, _), (e, _) in zip(base, err))  # t_err = t + t^p, later than t
    assert all(g for _, g in base) and not any(g for _, g in err)  # the t_err branch carries no graph


def _grad(model, cond, x, **kw):
    delta = torch.zeros_like(x, requires_grad=True)
    ctx = AttackContext(model, x, cond, torch.Generator().manual_seed(0), 0, 9, **kw)
    x_adv = x + delta
    return delta, antipure_loss(ctx, x_adv, model.encode(x_adv))


@pytest.mark.parametrize("latent", [False, True])
def test_gradient_reaches_delta_through_every_term(latent, pixel):
    model, cond = make_toy(1) if latent else pixel
    x = smooth_image(1, 32, 32)
    before = [p.clone() for p in model.parameters()]
    delta, terms = _grad(model, cond, x, frequency=FrequencyGuidance(), timestep=TimestepGuidance())
    for name in ("ldm", "pfg", "etg", "objective"):
        g, = torch.autograd.grad(terms[name].sum(), delta, retain_graph=True)
        assert torch.isfinite(g).all() and g.abs().sum() > 0, name
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_stop_gradient_branch_carries_no_gradient(pixel):
    model, cond = pixel
    x = smooth_image(1, 16, 16)
    grads = {}
    for sg in (True, False):
        delta, terms = _grad(model, cond, x, timestep=TimestepGuidance(stop_gradient=sg))
        grads[sg], = torch.autograd.grad(terms["etg"].sum(), delta)
    # by hand: the gradient of −|sg(ε_err) − ε_t|² reaches δ through ε_t only
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 10, (1,), generator=g)
    noise = torch.randn(x.shape, generator=g)
    delta = torch.zeros_like(x, requires_grad=True)
    ab = model.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = ab.sqrt() * model.encode(x + delta) + (1 - ab).sqrt() * noise
    eps_err = model.predict_noise(x_t.detach(), t + 10, cond)
    by_hand, = torch.autograd.grad(-(eps_err - model.predict_noise(x_t, t, cond)).square().mean(), delta)
    assert torch.allclose(grads[True], by_hand, atol=1e-7)
    assert not torch.allclose(grads[True], grads[False], atol=1e-7)  # the branch does carry gradient when enabled


def test_windows_all_and_random(pixel):
    model, cond = pixel
    x = smooth_image(1, 64, 64)
    for mode, n in (("all", 10), ("random", 1)):  # 3 x 3 grid of 32-px windows, stride 16, + packed corners
        calls = []
        ctx = AttackContext(_Spy(model, calls), x, cond, torch.Generator().manual_seed(0), 0, 9,
                            window=32, window_mode=mode)
        tiles = attack_tiles(ctx, model.encode(x))
        assert len(tiles) == n and all(t.shape[-2:] == (32, 32) for t in tiles)
    seen = []
    calls = []
    protect(_Spy(model, calls), x, cond, steps=1, window=32, callback=seen.append, timestep=None)
    assert len(calls) == 10 and all(t.numel() == 1 for t, _ in calls)
    assert seen[0]["ldm"] > 0  # the terms are the mean over windows, not their sum
    one = []
    protect(model, x, cond, steps=1, window=32, window_mode="random", callback=one.append, timestep=None)
    assert 0.2 < one[0]["ldm"] / seen[0]["ldm"] < 5


def test_window_larger_than_image_is_whole_image(pixel):
    model, cond = pixel
    ctx = AttackContext(model, smooth_image(1, 32, 32), cond, torch.Generator(), 0, 9, window=256)
    z = torch.zeros(1, 3, 32, 32)
    assert attack_tiles(ctx, z)[0] is z


def test_protect_raises_the_objective_on_the_pixel_purifier(pixel):
    from antipure_core.protect import evaluate_objective
    model, cond = pixel
    x = smooth_image(1, 32, 32)
    before = evaluate_objective(model, x, x, cond, "antipure", seed=11, samples=8)["objective"]
    x_adv = protect(model, x, cond, eta=16 / 255, alpha=2 / 255, steps=8, seed=1)
    after = evaluate_objective(model, x_adv, x, cond, "antipure", seed=11, samples=8)["objective"]
    assert after > before + 0.05 * abs(before), (before, after)
    assert (x_adv - x).abs().max() <= 16 / 255 + 1e-7
