"""ASPL / FSMG / SimAC on the toy model: loop order by hooks, the copy semantics, the search, budgets, bad input."""
import copy

import pytest
import torch

from antipure_core import surrogate as surrogate_mod
from antipure_core.callbacks import Cancelled
from antipure_core.customize import Prior, encode_images
from antipure_core.lora import add_lora, lora_parameters, remove_lora
from antipure_core.methods import METHODS, AttackContext
from antipure_core.protect import protect
from antipure_core.surrogate import SurrogateSettings, generated_prior, plan, protect_surrogate
from antipure_core.timestep_search import search_timesteps, simac_loss
from tests.toy import make_toy, smooth_image

EPS8 = 8 / 255
FAST = SurrogateSettings(train_steps=2, attack_steps=3, fsmg_train_steps=2, lr=1e-2, search_rounds=30)


@pytest.fixture
def toy(one_thread):
    return make_toy(0)


def _lora(model):
    return add_lora(model.unet, rank=2, generator=torch.Generator().manual_seed(0))


def test_registry_lists_training_methods():
    assert all(METHODS[m].trains for m in ("aspl", "fsmg", "simac"))
    assert not any(METHODS[m].trains for m in ("antipure", "advdm"))


def test_plan_counts_every_inner_step():
    s = SurrogateSettings()
    aspl = plan("aspl", 300, s)
    assert len([p for p in aspl if p[0] == "attack"]) == 50 and sum(n for p, _, n in aspl if p == "attack") == 300
    assert [p for p, _, _ in aspl[:4]] == ["surrogate", "attack", "model", "surrogate"] and aspl[-1][0] == "attack"
    assert plan("aspl", 7, FAST)[-1] == ("attack", 2, 1)
    assert plan("fsmg", 100, s) == [("fine-tune", 0, 1000), ("attack", 0, 100)]


def test_loop_order_surrogate_on_clean_model_on_protected(toy, monkeypatch):
    """A spy on the training function and the step callback record the timeline: each outer iteration trains
    the surrogate on the clean latents from the model's state, attacks the surrogate's state, then trains
    the model (from its own state, not the surrogate's) on the latents of the current protected images."""
    model, cond = toy
    x = smooth_image(2, 32, 32)
    params = _lora(model)
    clean = encode_images(model, x)
    events = []
    real = surrogate_mod.customize

    def spy(*args, latents=None, **kw):
        entry = [p.detach().clone() for p in params]
        out = real(*args, latents=latents, **kw)
        events.append(("train", latents.clone(), entry, [p.detach().clone() for p in params]))
        return out
    monkeypatch.setattr(surrogate_mod, "customize", spy)

    def on_step(info):
        if info["phase"] == "attack":
            events.append(("attack", info["i"], info["x_adv"].clone(), [p.detach().clone() for p in params],
                           any(p.requires_grad for p in params)))
    protect_surrogate(model, x, cond, params, "aspl", eta=EPS8, alpha=2 / 255, steps=7, settings=FAST,
                      callback=on_step)

    kinds = [e[0] for e in events]
    assert kinds == ["train", "attack", "attack", "attack", "train",
                     "train", "attack", "attack", "attack", "train",
                     "train", "attack"]
    at = {"train": [i for i, k in enumerate(kinds) if k == "train"]}
    surrogates, models = at["train"][0::2], at["train"][1::2]
    for k, i in enumerate(surrogates):
        _, latents, entry, _ = events[i]
        assert torch.equal(latents, clean)                                       # surrogate: clean latents
        start = events[i][2] if k == 0 else events[models[k - 1]][3]             # from the model's state
        assert all(torch.equal(a, b) for a, b in zip(entry, start))
    for k, i in enumerate(models):
        _, latents, entry, _ = events[i]
        last_attack = events[i - 1]
        assert last_attack[0] == "attack"
        assert torch.allclose(latents, encode_images(model, last_attack[2]))     # model: current protected images
        assert not torch.equal(latents, clean)
        sur = events[surrogates[k]]
        assert all(torch.equal(a, b) for a, b in zip(entry, sur[2]))            # model starts where surrogate did
        assert not all(torch.equal(a, b) for a, b in zip(entry, sur[3]))
    for i, e in enumerate(events):
        if e[0] == "attack":  # attacks see the last surrogate's weights, with no weight gradients
            sur = events[max(j for j in surrogates if j < i)]
            assert all(torch.equal(a, b) for a, b in zip(e[3], sur[3])) and not e[4]


@pytest.mark.parametrize("method", ["aspl", "fsmg", "simac"])
def test_lora_surrogate_leaves_model_bit_identical(toy, method):
    model, cond = toy
    before = copy.deepcopy(model.state_dict())
    params = _lora(model)
    lora_before = [p.detach().clone() for p in params]
    x = smooth_image(1, 32, 32)
    out = protect_surrogate(model, x, cond, params, method, eta=EPS8, alpha=2 / 255, steps=4, settings=FAST)
    assert all(torch.equal(a, b) for a, b in zip(params, lora_before)) and all(p.requires_grad for p in params)
    remove_lora(model.unet)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(out, x)


def test_full_unet_surrogate_trains_and_restores(toy):
    model, cond = toy
    before = copy.deepcopy(model.state_dict())
    params = list(model.unet.parameters())
    for p in params:
        p.requires_grad_(True)
    x = smooth_image(1, 32, 32)
    protect_surrogate(model, x, cond, params, "aspl", eta=EPS8, alpha=2 / 255, steps=4, settings=FAST)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # without restore the working copy ends trained: the loop really fine-tunes the full UNet
    protect_surrogate(model, x, cond, params, "aspl", eta=EPS8, alpha=2 / 255, steps=4, settings=FAST, restore=False)
    assert any(not torch.equal(before[f"unet.{k}"], v) for k, v in model.unet.state_dict().items())


def test_search_keeps_at_most_limit_inside_range(toy):
    model, cond = toy
    x = smooth_image(2, 32, 32)
    seen = []
    kept = search_timesteps(model, x, cond, EPS8, 1 / 255, torch.Generator().manual_seed(0), candidates=3,
                            rounds=40, keep=100, cut=20, t_range=(100, 899), callback=seen.append)
    assert len(kept) == 2
    for k in kept:
        assert 0 < k.numel() <= 100 and k.min() >= 100 and k.max() <= 899
        assert torch.equal(k, torch.unique(k))
    left = [s["kept"] for s in seen if s["image"] == 0]
    assert left[0] == 800 - 40 and all(0 < a - b <= 40 for a, b in zip(left, left[1:]))
    whole = search_timesteps(model, x[:1], cond, EPS8, 1 / 255, torch.Generator(), rounds=0)
    assert torch.equal(whole[0], torch.arange(1000))


def test_simac_draws_only_kept_timesteps_and_feature_has_gradient(toy):
    model, cond = toy
    x = smooth_image(2, 32, 32)
    kept = [torch.tensor([5, 6]), torch.tensor([900])]
    seen_t = []
    real = model.predict_noise_features

    def spy(z_t, t, c):
        seen_t.append(t.clone())
        return real(z_t, t, c)
    model.predict_noise_features = spy
    ctx = AttackContext(model, x, cond, torch.Generator().manual_seed(0),
                        options={"kept_timesteps": kept, "feature_weight": 1.0})
    x_adv = (x + 0.01).clamp(0, 1).requires_grad_(True)
    for _ in range(4):
        terms = simac_loss(ctx, x_adv, model.encode(x_adv))
    assert all(int(t[0]) in (5, 6) and int(t[1]) == 900 for t in seen_t)
    g, = torch.autograd.grad(terms["feature"].sum(), x_adv)
    assert terms["feature"].shape == (2,) and g.abs().sum() > 0
    del model.predict_noise_features
    ctx.options["feature_weight"] = 0.0
    assert "feature" not in simac_loss(ctx, x_adv, model.encode(x_adv))


def test_feature_weight_changes_simac(toy):
    model, cond = toy
    x = smooth_image(1, 32, 32)
    params = _lora(model)
    runs = [protect_surrogate(model, x, cond, params, "simac", eta=EPS8, alpha=2 / 255, steps=3, seed=1,
                              settings=SurrogateSettings(**{**FAST.__dict__, "feature_weight": w}))
            for w in (0.0, 50.0)]
    assert not torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("method", ["aspl", "fsmg", "simac"])
def test_budget_exact_after_8bit_save(toy, method):
    model, cond = toy
    x = smooth_image(2, 33, 37)  # odd size: padded inside, cropped back
    x[..., :4, :] = 0.0
    x[..., -4:, :] = 1.0
    out = protect_surrogate(model, x, cond, _lora(model), method, eta=EPS8, alpha=3 / 255, steps=4,
                            settings=FAST, random_start=True)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert torch.equal(torch.round(out * 255) / 255, out)
    saved = (out * 255).round().byte().float() / 255   # what an 8-bit PNG stores
    assert (saved - x).abs().max() <= EPS8 + 1e-6 and (saved - x).abs().max() > 0.5 / 255


def test_deterministic_and_prior_and_separate_training_set(toy):
    model, cond = toy
    x = smooth_image(1, 32, 32)
    params = _lora(model)
    prior = Prior(cond * 0.5, images=smooth_image(2, 32, 32, seed=5))
    kw = dict(eta=EPS8, alpha=2 / 255, steps=4, settings=FAST, seed=3, prior=prior,
              train_images=[smooth_image(1, 40, 40, seed=1)[0], smooth_image(1, 40, 40, seed=2)[0]])
    a = protect_surrogate(model, x, cond, params, "aspl", **kw)
    b = protect_surrogate(model, x, cond, params, "aspl", **kw)
    c = protect_surrogate(model, x, cond, params, "aspl", **{**kw, "seed": 4})
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_cancel_restores_params_and_returns_nothing(toy):
    model, cond = toy
    params = _lora(model)
    before = [p.detach().clone() for p in params]

    def stop(info):
        if info["phase"] == "model":
            raise Cancelled()
    with pytest.raises(Cancelled):
        protect_surrogate(model, smooth_image(1, 32, 32), cond, params, "aspl", steps=9, settings=FAST,
                          callback=stop)
    assert all(torch.equal(a, b) for a, b in zip(params, before)) and all(p.requires_grad for p in params)


def test_steps_zero_and_one_image(toy):
    model, cond = toy
    x = smooth_image(1, 24, 24)
    params = _lora(model)
    out = protect_surrogate(model, x, cond, params, steps=0)
    assert torch.equal(out, x) and out is not x
    # one photo and no training set: the surrogate trains on the clean photo itself (documented)
    one = protect_surrogate(model, x, cond, params, "aspl", eta=EPS8, alpha=2 / 255, steps=2, settings=FAST)
    assert (one - x).abs().max() > 0


@pytest.mark.parametrize("change,arg", [
    ({"train_steps": 0}, "train_steps"), ({"attack_steps": 0}, "attack_steps"),
    ({"fsmg_train_steps": 0}, "fsmg_train_steps"), ({"search_candidates": 0}, "search_candidates"),
    ({"search_keep": 0}, "search_keep"), ({"search_cut": 0}, "search_cut"), ({"lr": 0.0}, "lr"),
    ({"search_rounds": -1}, "search_rounds"), ({"feature_weight": -1.0}, "feature_weight"),
    ({"prediction": "x0"}, "prediction"),
])
def test_bad_settings_are_named(toy, change, arg):
    model, cond = toy
    settings = SurrogateSettings(**{**SurrogateSettings().__dict__, **change})
    with pytest.raises(ValueError, match=arg):
        protect_surrogate(model, smooth_image(1, 16, 16), cond, _lora(model), "aspl", steps=1, settings=settings)


def test_bad_inputs(toy):
    model, cond = toy
    x = smooth_image(1, 16, 16)
    params = _lora(model)
    with pytest.raises(ValueError, match="train_images"):
        protect_surrogate(model, x, cond, params, train_images=[])
    with pytest.raises(ValueError, match=r"train_images\[1\]"):
        protect_surrogate(model, x, cond, params, train_images=[smooth_image(1, 16, 16), smooth_image(1, 20, 20)])
    with pytest.raises(ValueError, match="prior"):  # a class prompt without class images
        protect_surrogate(model, x, cond, params, steps=1, settings=FAST, prior=Prior(cond))
    with pytest.raises(ValueError, match="params"):
        protect_surrogate(model, x, cond, [], steps=1)
    with pytest.raises(ValueError, match="method"):
        protect_surrogate(model, x, cond, params, "advdm", steps=1)
    with pytest.raises(ValueError, match="protect_surrogate"):
        protect(model, x, cond, method="aspl", steps=1)
    with pytest.raises(ValueError, match="eta"):
        protect_surrogate(model, x, cond, params, eta=0.0)
    plain = copy.deepcopy(model)
    plain.predict_noise_features = None
    with pytest.raises(TypeError, match="predict_noise_features"):
        protect_surrogate(plain, x, cond, lora_parameters(plain.unet), "simac", steps=1)


def test_generated_prior_trains_with_class_latents(toy):
    model, cond = toy
    prior = generated_prior(model, cond * 0.5, 2, (4, 8, 8), steps=3, seed=1)
    assert prior.latents.shape == (2, 4, 8, 8) and torch.isfinite(prior.latents).all() and prior.images is None
    again = generated_prior(model, cond * 0.5, 2, (4, 8, 8), steps=3, seed=1)
    assert torch.equal(prior.latents, again.latents)
    out = protect_surrogate(model, smooth_image(1, 32, 32), cond, _lora(model), "aspl", eta=EPS8, alpha=2 / 255,
                            steps=2, settings=FAST, prior=prior)
    assert out.shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="count"):
        generated_prior(model, cond, 0, (4, 8, 8))
