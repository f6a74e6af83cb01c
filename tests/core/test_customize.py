"""LoRA adapters, the DreamBooth/LoRA customization loop and DDIM sampling on the toy model (32 px)."""
import copy
import math

import pytest
import torch
from torch import nn

from antipure_core.callbacks import Cancelled
from antipure_core.customize import Prior, customize, denoising_loss, encode_images
from antipure_core.lora import add_lora, load_lora, lora_layers, lora_parameters, lora_state_dict, merge_lora, remove_lora
from antipure_core.sampling import sample
from tests.toy import make_toy, smooth_image


pytestmark = pytest.mark.usefixtures("one_thread")


def _probe(model, cond, seed=123):
    """Noise predictions on fixed inputs: what customization is meant to change."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([50, 700])
    with torch.no_grad():
        return model.predict_noise(z, t, cond)


def _lora_toy(seed=0, rank=4):
    model, cond = make_toy(seed)
    params = add_lora(model.unet, rank=rank, generator=torch.Generator().manual_seed(seed))
    return model, cond, params


def _train(model, cond, params, steps=20, **kw):
    kw.setdefault("lr", 1e-2)
    kw.setdefault("batch_size", 2)
    kw.setdefault("generator", 0)
    return customize(model, smooth_image(4, 32, 32, seed=1), cond, params, steps=steps, **kw)


# ---------------------------------------------------------------- LoRA


def test_lora_shapes_targets_and_frozen_base():
    model, _ = make_toy(0)
    params = add_lora(model.unet, rank=3)
    names = set(lora_layers(model.unet))
    # every Linear/Conv2d of the UNet; the ConvTranspose2d is not a supported type
    assert names == {"time.0", "time.2", "cond", "inp", "down", "mid", "out"}
    assert len(params) == 2 * len(names) and all(p.requires_grad for p in params)
    inp = lora_layers(model.unet)["inp"]
    assert inp.down.shape == (3, 4, 3, 3) and inp.up.shape == (32, 3, 1, 1)
    assert lora_layers(model.unet)["cond"].down.shape == (3, 16)
    lora_ids = {id(p) for p in params}
    assert not any(p.requires_grad for p in model.parameters() if id(p) not in lora_ids)

    model2, _ = make_toy(0)
    add_lora(model2, targets=("unet.time.*", "*.cond"))
    assert set(lora_layers(model2)) == {"unet.time.0", "unet.time.2", "unet.cond"}


def test_lora_at_init_leaves_predictions_unchanged():
    model, cond = make_toy(0)
    before = _probe(model, cond)
    add_lora(model, rank=4)  # VAE and UNet
    assert torch.equal(_probe(model, cond), before)
    x = smooth_image(1, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.encode(x), make_toy(0)[0].encode(x))


def test_lora_linear_known_answer_and_merge():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 3))
    w, b = net[0].weight.detach().clone(), net[0].bias.detach().clone()
    add_lora(net, rank=2, alpha=1.0)
    a = lora_layers(net)["0"]
    with torch.no_grad():
        a.up.normal_()
    x = torch.randn(4, 5)
    expected = x @ (w + 0.5 * a.up @ a.down).T + b  # alpha / rank = 1 / 2
    with torch.no_grad():
        assert torch.allclose(net(x), expected, atol=1e-6)
        merge_lora(net)
        assert not lora_layers(net) and type(net[0]) is nn.Linear
        assert torch.allclose(net(x), expected, atol=1e-6)


def test_lora_conv_merge_matches_adapter_and_remove_restores():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, padding_mode="reflect"), nn.SiLU(), nn.Conv2d(6, 2, 1))
    x = torch.randn(2, 3, 9, 7)
    with torch.no_grad():
        base = net(x)
        add_lora(net, rank=2)
        for p in lora_parameters(net):
            p.normal_()
        adapted = net(x)
        assert not torch.allclose(adapted, base)
        merged = merge_lora(copy.deepcopy(net))(x)
        assert torch.allclose(merged, adapted, atol=1e-5)
        remove_lora(net)
        assert not lora_layers(net) and torch.equal(net(x), base)


@pytest.mark.parametrize("rank", [0, -1, 2.5, True, None])
def test_add_lora_bad_rank(rank):
    with pytest.raises(ValueError, match="rank"):
        add_lora(nn.Sequential(nn.Linear(4, 4)), rank=rank)


def test_add_lora_bad_inputs():
    with pytest.raises(ValueError, match="alpha"):
        add_lora(nn.Sequential(nn.Linear(4, 4)), alpha=0.0)
    with pytest.raises(ValueError, match="targets"):
        add_lora(make_toy(0)[0], targets=("*.attn",))
    with pytest.raises(ValueError, match="has no .unadapted. nn.Linear"):
        add_lora(nn.Sequential(nn.SiLU()))
    with pytest.raises(ValueError, match="module: a bare Linear"):
        add_lora(nn.Linear(4, 4))
    net = nn.Sequential(nn.Linear(4, 4))
    add_lora(net)
    with pytest.raises(ValueError, match="no .unadapted"):
        add_lora(net)  # an adapted layer is not adapted twice


def test_lora_state_dict_round_trip_through_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    model, cond, params = _lora_toy(0)
    _train(model, cond, params, steps=5)
    sd = lora_state_dict(model)
    assert set(sd) >= {"unet.inp.lora_down.weight", "unet.inp.lora_up.weight", "unet.inp.alpha"}
    assert sd["unet.inp.alpha"].item() == 4.0
    save_file(sd, str(tmp_path / "lora.safetensors"))

    fresh, _ = make_toy(0)
    loaded = load_lora(fresh, load_file(str(tmp_path / "lora.safetensors")))
    assert len(loaded) == len(params)
    assert torch.equal(_probe(fresh, cond), _probe(model, cond))
    # loading again overwrites the existing adapters in place
    load_lora(fresh, sd)
    assert torch.equal(_probe(fresh, cond), _probe(model, cond))


def test_load_lora_bad_inputs():
    model, _ = make_toy(0)
    good = {"unet.inp.lora_down.weight": torch.zeros(2, 4, 3, 3), "unet.inp.lora_up.weight": torch.zeros(32, 2, 1, 1)}
    with pytest.raises(ValueError, match="do not fit"):
        load_lora(model, {**good, "unet.inp.lora_down.weight": torch.zeros(2, 5, 3, 3)})
    with pytest.raises(ValueError, match="not a layer"):
        load_lora(model, {"unet.nope.lora_down.weight": torch.zeros(2, 4), "unet.nope.lora_up.weight": torch.zeros(4, 2)})
    with pytest.raises(ValueError, match="unexpected keys"):
        load_lora(model, {**good, "something.else": torch.zeros(1)})
    with pytest.raises(ValueError, match="lora_up"):
        load_lora(model, {"unet.inp.lora_down.weight": torch.zeros(2, 4, 3, 3)})
    with pytest.raises(ValueError, match="no '<layer>.lora_down.weight'"):
        load_lora(model, {})
    load_lora(model, good)
    with pytest.raises(ValueError, match="rank"):
        load_lora(model, {"unet.inp.lora_down.weight": torch.zeros(3, 4, 3, 3),
                          "unet.inp.lora_up.weight": torch.zeros(32, 3, 1, 1)})


# ---------------------------------------------------------------- customize


def test_customize_loss_falls():
    model, cond, params = _lora_toy(0)
    losses = _train(model, cond, params, steps=60)
    assert len(losses) == 60 and all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.6 * first, (first, last)  # measured: 1.65 -> 0.47


def test_customize_v_prediction_loss_falls():
    model, cond, params = _lora_toy(0)
    losses = _train(model, cond, params, steps=80, prediction="v")
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.7 * first, (first, last)  # measured: 32.8 -> 11.2


def test_v_loss_is_eps_loss_over_abar():
    model, cond = make_toy(0)
    z0 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        lv = denoising_loss(model, z0, cond, "v", torch.Generator().manual_seed(5))
        # the same draws by hand: ||eps_hat - eps||^2 / abar
        g = torch.Generator().manual_seed(5)
        t = torch.randint(0, 1000, (3,), generator=g)
        eps = torch.randn(z0.shape, generator=g)
        ab = model.alphas_cumprod[t].view(-1, 1, 1, 1)
        eps_hat = model.predict_noise(ab.sqrt() * z0 + (1 - ab).sqrt() * eps, t, cond)
        expected = (((eps_hat - eps) ** 2) / ab).mean()
    assert torch.allclose(lv, expected, rtol=1e-4)


def test_customize_changes_predictions_not_base_weights():
    model, cond = make_toy(0)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    before = _probe(model, cond)
    params = add_lora(model.unet, rank=4)
    _train(model, cond, params, steps=10)
    assert (_probe(model, cond) - before).abs().max() > 1e-3
    remove_lora(model)
    state = model.state_dict()
    assert state.keys() == base_state.keys()
    assert all(torch.equal(state[k], base_state[k]) for k in state)
    assert torch.equal(_probe(model, cond), before)


def test_customize_deterministic_per_seed():
    runs = []
    for _ in range(2):
        model, cond, params = _lora_toy(0)
        runs.append((_train(model, cond, params, steps=8, generator=7), lora_state_dict(model)))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])
    model, cond, params = _lora_toy(0)
    assert _train(model, cond, params, steps=8, generator=8) != runs[0][0]


def test_customize_prior_preservation_term():
    class_images = smooth_image(3, 32, 32, seed=9)
    class_cond = torch.randn(1, 16, generator=torch.Generator().manual_seed(3))
    infos = {}
    for key, prior in [("none", None),
                       ("images", Prior(cond=class_cond, images=class_images, weight=0.5)),
                       ("latents", None)]:
        model, cond, params = _lora_toy(0)
        if key == "latents":
            prior = Prior(cond=class_cond, latents=encode_images(model, class_images), weight=0.5)
        log = []
        losses = _train(model, cond, params, steps=5, prior=prior, callback=log.append)
        infos[key] = (losses, log)
    (l_none, log_none), (l_img, log_img), (l_lat, _) = infos["none"], infos["images"], infos["latents"]
    # step 0 sees the same instance draws (separate prior stream) and untrained adapters
    assert log_img[0]["loss_instance"] == pytest.approx(log_none[0]["loss_instance"], rel=1e-6)
    assert log_img[0]["loss_prior"] > 0 and log_none[0]["loss_prior"] == 0.0
    assert l_img[0] == pytest.approx(log_img[0]["loss_instance"] + 0.5 * log_img[0]["loss_prior"], rel=1e-6)
    assert l_img != l_none
    assert l_lat == l_img  # class latents are what class images encode to


def test_customize_trains_a_callable_cond_along():
    # a text encoder trained with the model: the cond is made anew each micro-batch, with gradient
    model, cond, params = _lora_toy(0)
    shift = torch.zeros_like(cond, requires_grad=True)
    calls = []

    def encode():
        calls.append(1)
        return cond + shift

    _train(model, encode, params + [shift], steps=3, grad_accum=2,
           prior=Prior(cond=encode, images=smooth_image(2, 32, 32, seed=9)))
    assert len(calls) == 3 * 2 * 2  # steps x micro-batches x (instance, prior)
    assert shift.abs().sum() > 0


def test_customize_uses_the_given_optimizer():
    model, cond, params = _lora_toy(0)
    made = []

    def sgd(ps, lr, weight_decay):
        made.append((lr, weight_decay))
        return torch.optim.SGD(ps, lr=lr)

    a = _train(model, cond, params, steps=3, optimizer=sgd)
    model, cond, params = _lora_toy(0)
    b = _train(model, cond, params, steps=3)
    assert made == [(1e-2, 1e-2)] and a[0] == b[0] and a[1:] != b[1:]


def test_customize_callback_per_step_and_grad_accum():
    model, cond, params = _lora_toy(0)
    log = []
    losses = _train(model, cond, params, steps=4, grad_accum=3, batch_size=1, callback=log.append)
    assert [d["i"] for d in log] == [0, 1, 2, 3] and all(d["total"] == 4 for d in log)
    assert [d["loss"] for d in log] == losses


def test_customize_cancel_returns_nothing_and_restores_params():
    model, cond, params = _lora_toy(0)
    start = [p.detach().clone() for p in params]
    seen = []

    def cb(info):
        seen.append(info["i"])
        if info["i"] == 2:
            raise Cancelled()

    with pytest.raises(Cancelled):
        _train(model, cond, params, steps=10, callback=cb)
    assert seen == [0, 1, 2]
    assert all(torch.equal(p, p0) for p, p0 in zip(params, start))


def test_customize_accepts_list_of_images():
    model, cond, params = _lora_toy(0)
    imgs = [smooth_image(1, 32, 32, seed=s)[0] for s in range(3)] + [smooth_image(2, 32, 32, seed=5)]
    assert len(customize(model, imgs, cond, params, steps=2, lr=1e-3, generator=0)) == 2


def test_customize_odd_size_is_padded():
    model, cond, params = _lora_toy(0)
    assert encode_images(model, smooth_image(1, 30, 27)).shape == (1, 4, 8, 7)
    assert len(customize(model, smooth_image(2, 30, 27), cond, params, steps=2, generator=0)) == 2


@pytest.mark.parametrize("kwargs, match", [
    (dict(images=torch.zeros(0, 3, 32, 32)), "images: the batch is empty"),
    (dict(images=[]), "images: the list of images is empty"),
    (dict(images=[torch.rand(3, 32, 32), torch.rand(3, 32, 32), torch.rand(3, 24, 32)]), r"images\[2\]: size"),
    (dict(images=torch.full((1, 3, 32, 32), float("nan"))), "images: contains NaN"),
    (dict(images=torch.rand(1, 1, 32, 32)), "images: expected 3 channels"),
    (dict(params=[]), "params: no trainable parameters"),
    (dict(params=[torch.zeros(3)]), r"params\[0\]"),
    (dict(steps=0), "steps"),
    (dict(steps=-1), "steps"),
    (dict(steps=2.0), "steps"),
    (dict(lr=0.0), "lr"),
    (dict(lr=-1e-4), "lr"),
    (dict(lr=float("nan")), "lr"),
    (dict(batch_size=0), "batch_size"),
    (dict(grad_accum=0), "grad_accum"),
    (dict(prediction="x0"), "prediction"),
    (dict(weight_decay=-1.0), "weight_decay"),
    (dict(prior=Prior(cond=torch.zeros(1, 16))), "prior: give exactly one"),
    (dict(prior=Prior(cond=None, latents=torch.zeros(1, 4, 8, 8))), "prior.cond"),
    (dict(prior=Prior(cond=torch.zeros(1, 16), latents=torch.zeros(1, 4, 8, 8), weight=-1)), "prior.weight"),
    (dict(prior=Prior(cond=torch.zeros(1, 16), latents=torch.zeros(1, 3, 8, 8))), "prior.latents: 3 channels"),
    (dict(prior=Prior(cond=torch.zeros(1, 16), images=torch.rand(1, 3, 32, 32) + 1)), "prior.images"),
])
def test_customize_bad_input(kwargs, match):
    model, cond, params = _lora_toy(0)
    args = dict(images=smooth_image(2, 32, 32), params=params, steps=2, lr=1e-3)
    args.update(kwargs)
    images = args.pop("images")
    with pytest.raises(ValueError, match=match):
        customize(model, images, cond, **args)


def test_customize_bad_types():
    model, cond, params = _lora_toy(0)
    with pytest.raises(TypeError, match="generator"):
        customize(model, smooth_image(1), cond, params, steps=1, generator="seed")
    with pytest.raises(TypeError, match="prior"):
        customize(model, smooth_image(1), cond, params, steps=1, prior={"weight": 1.0})
    with pytest.raises(TypeError, match="model"):
        customize(object(), smooth_image(1), cond, params, steps=1)


def test_customize_nan_loss_raises_and_restores():
    model, cond, params = _lora_toy(0)
    start = [p.detach().clone() for p in params]
    with pytest.raises(FloatingPointError, match="lr"):
        customize(model, smooth_image(1), torch.full((1, 16), float("inf")), params, steps=2, generator=0)
    assert all(torch.equal(p, p0) for p, p0 in zip(params, start))


# ---------------------------------------------------------------- sampling


def test_sample_shapes_determinism_and_callback():
    model, cond = make_toy(0)
    log = []
    a = sample(model, cond, (2, 4, 8, 8), steps=5, generator=3, callback=log.append)
    assert a.shape == (2, 3, 32, 32) and a.min() >= 0 and a.max() <= 1
    assert [d["i"] for d in log] == list(range(5)) and log[0]["t"] == 999 and log[-1]["t_prev"] == -1
    assert torch.equal(sample(model, cond, (2, 4, 8, 8), steps=5, generator=3), a)
    assert not torch.equal(sample(model, cond, (2, 4, 8, 8), steps=5, generator=4), a)


def test_sample_one_step_is_x0_estimate():
    # one DDIM step from t = T-1 to the clean latent is the one-step x0 estimate, decoded
    model, cond = make_toy(0)
    z = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(2))
    t = torch.tensor([999])
    with torch.no_grad():
        ab = model.alphas_cumprod[999]
        x0 = (z - (1 - ab).sqrt() * model.predict_noise(z, t, cond)) / ab.sqrt()
        expected = model.decode(x0).clamp(0, 1)
    assert torch.allclose(sample(model, cond, (1, 4, 8, 8), steps=1, generator=2), expected, atol=1e-5)


def test_sample_changes_after_customization_and_bad_input():
    model, cond, params = _lora_toy(0)
    before = sample(model, cond, (1, 4, 8, 8), steps=4, generator=0)
    _train(model, cond, params, steps=10)
    assert (sample(model, cond, (1, 4, 8, 8), steps=4, generator=0) - before).abs().max() > 1e-3
    with pytest.raises(ValueError, match="shape"):
        sample(model, cond, (1, 4, 8))
    with pytest.raises(ValueError, match="steps"):
        sample(model, cond, (1, 4, 8, 8), steps=0)


def test_customize_cancel_without_restore_keeps_no_copy():
    """``restore=False`` (a private copy the caller drops): a cancel leaves the params as trained so far."""
    model, cond, params = _lora_toy(0)
    start = [p.detach().clone() for p in params]

    def cb(info):
        if info["i"] == 2:
            raise Cancelled()

    with pytest.raises(Cancelled):
        _train(model, cond, params, steps=10, callback=cb, restore=False)
    assert any(not torch.equal(p, p0) for p, p0 in zip(params, start))
