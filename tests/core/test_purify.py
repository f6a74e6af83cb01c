"""Purifiers: shapes and range, known answers, noise removal on a trained toy model, callbacks, errors."""
import math

import pytest
import torch

from antipure_core.callbacks import Cancelled
from antipure_core.diffusion import q_sample, randn_like
from antipure_core.frequency import high_frequency_mask, patch_dct
from antipure_core.purify import (PURIFIERS, ddim_timesteps, diffpure, gaussian_blur, gaussian_noise, get_purifier,
                                  gridpure, impress, jpeg, noisy_upscale, resize_down_up, vae_inconsistency,
                                  window_boxes)
from tests.toy import make_toy, smooth_image


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def psnr(a, b):
    return 10 * math.log10(1 / float((a - b).square().mean()))


def hf_energy(x):
    """Mean high-frequency (u + v >= 4) energy of the 8x8 patch DCT over the top-left multiple-of-8 crop."""
    h, w = x.shape[-2] // 8 * 8, x.shape[-1] // 8 * 8
    return float((patch_dct(x[..., :h, :w], 8).square() * high_frequency_mask(8)).mean())


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy():
    return make_toy(0)


@pytest.fixture(scope="module")
def trained_toy():
    """The toy model trained briefly on smooth images: a VAE that reconstructs them and a UNet that denoises
    their latents for t < 300. A random toy decodes everything to a near-constant image, which would "remove"
    high frequencies by destroying the content, so the noise-removal tests need a model that keeps content."""
    model, cond = make_toy(0)
    data = smooth_image(64, 32, 32, seed=123)
    g = gen(0)
    model.requires_grad_(True)
    opt = torch.optim.Adam(model.vae.parameters(), 1e-2)
    for _ in range(120):
        xb = data[torch.randint(0, 64, (8,), generator=g)]
        loss = (model.decode(model.encode(xb)) - xb).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        z = model.encode(data)
    opt = torch.optim.Adam(model.unet.parameters(), 1e-2)
    for _ in range(100):
        i, t = torch.randint(0, 64, (16,), generator=g), torch.randint(0, 300, (16,), generator=g)
        n = randn_like(z[i], g)
        loss = (model.predict_noise(q_sample(model, z[i], t, n), t, cond) - n).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for p in model.parameters():
        p.grad = None
    return model.requires_grad_(False), cond


@pytest.fixture(scope="module")
def noisy():
    """A smooth image plus high-frequency Gaussian noise (sigma 0.1), and the clean image."""
    x = smooth_image(2, 64, 48, seed=7)
    return (x + 0.1 * randn_like(x, gen(1))).clamp(0, 1), x


def all_purifiers(model, cond):
    def small_diffpure(t):
        return diffpure(model, t, cond, t_star=0.1, steps=2, generator=gen())
    return {
        "diffpure": lambda x: diffpure(model, x, cond, t_star=0.2, steps=3, generator=gen()),
        "gridpure": lambda x: gridpure(x, small_diffpure, window=24, stride=16, iterations=1),
        "impress": lambda x: impress(model, x, iterations=2),
        "noisy_upscale": lambda x: noisy_upscale(x, generator=gen()),
        "jpeg": lambda x: jpeg(x),
        "gaussian_blur": lambda x: gaussian_blur(x, 1.0),
        "resize": lambda x: resize_down_up(x, 0.5),
        "gaussian_noise": lambda x: gaussian_noise(x, 0.05, gen()),
    }


# --- shapes and range -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 3, 32, 32), (2, 3, 32, 32), (1, 3, 50, 37)])
@pytest.mark.parametrize("name", list(PURIFIERS))
def test_size_and_range(toy, name, shape):
    x = smooth_image(shape[0], shape[2], shape[3], seed=1)
    y = all_purifiers(*toy)[name](x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.isfinite(y).all() and y.min() >= 0 and y.max() <= 1


def test_registry_covers_every_purifier(toy):
    assert set(all_purifiers(*toy)) == set(PURIFIERS)
    assert get_purifier("diffpure").needs == ("model", "vae")
    assert get_purifier("impress", {"vae"}).fn is impress
    assert get_purifier("jpeg", set()).fn is jpeg


def test_registry_says_what_is_missing():
    with pytest.raises(ValueError, match="needs MODEL and VAE; connect MODEL"):
        get_purifier("diffpure", {"vae"})
    with pytest.raises(ValueError, match="purifier: unknown 'diffpur'"):
        get_purifier("diffpur")


# --- DiffPure ---------------------------------------------------------------------------------------------------

def test_ddim_timesteps():
    ts = ddim_timesteps(100, 20)
    assert ts[0] == 100 and ts[-1] == -1 and len(ts) == 21
    assert all(a > b for a, b in zip(ts, ts[1:]))
    assert ddim_timesteps(3, 20) == [3, 2, 1, 0, -1]  # fewer real steps than asked, no repeated timestep


def test_diffpure_removes_high_frequency_noise_and_keeps_content(trained_toy, noisy):
    model, cond = trained_toy
    xn, x = noisy
    y = diffpure(model, xn, cond, t_star=0.1, steps=5, generator=gen())
    assert hf_energy(y) < 0.1 * hf_energy(xn)
    assert psnr(y, x) > psnr(xn, x) + 1  # closer to the clean image than the noisy input (random toy: -5 dB)


def test_diffpure_deterministic_per_seed(toy):
    model, cond = toy
    x = smooth_image(2, 32, 32)
    a, b = (diffpure(model, x, cond, 0.3, 3, generator=gen(5)) for _ in range(2))
    c = diffpure(model, x, cond, 0.3, 3, generator=gen(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_diffpure_denoise_hook(toy):
    model, cond = toy
    x = smooth_image(1, 36, 28)
    seen = {}

    def denoise_fn(z_t, t, callback):
        seen.update(shape=tuple(z_t.shape), t=t.tolist())
        return model.encode(x)  # the clean latent (36 x 28 needs no padding)

    y = diffpure(model, x, cond, t_star=0.25, denoise_fn=denoise_fn)
    assert seen == {"shape": (1, 4, 9, 7), "t": [250]}
    assert torch.allclose(y, model.decode(model.encode(x)).clamp(0, 1))


def test_diffpure_callback_and_cancel(toy):
    model, cond = toy
    x = smooth_image(1, 32, 32)
    infos = []
    diffpure(model, x, cond, 0.1, 4, callback=infos.append)
    assert [i["i"] for i in infos] == [0, 1, 2, 3] and all(i["total"] == 4 for i in infos)

    calls = []
    orig = model.predict_noise

    def counting(*a):
        calls.append(1)
        return orig(*a)

    def cancel(info):
        if info["i"] == 1:
            raise Cancelled

    model.predict_noise = counting
    try:
        with pytest.raises(Cancelled):
            diffpure(model, x, cond, 0.1, 10, callback=cancel)
    finally:
        del model.predict_noise
    assert len(calls) == 2  # stopped within one step


# --- GrIDPure ---------------------------------------------------------------------------------------------------

def test_window_boxes_match_reference_layout():
    boxes = window_boxes((512, 512), 256, 128)
    assert sorted({b[0] for b in boxes}) == [0, 128, 256] and len(boxes) == 9
    assert window_boxes((20, 30), 256, 128) == [(0, 0, 20, 30)]  # smaller than a window: one window
    assert {b[1] for b in window_boxes((64, 50), 32, 16)} == {0, 16, 18}  # last window flush with the border


def test_gridpure_known_answers():
    x = torch.rand(2, 3, 40, 56, generator=gen())
    assert torch.allclose(gridpure(x, lambda t: t, window=16, stride=8, iterations=3), x, atol=1e-6)
    # every pixel, corners included, is covered: purify-to-zero leaves gamma^iterations * x
    y = gridpure(x, torch.zeros_like, window=16, stride=8, iterations=2, gamma=0.3)
    assert torch.allclose(y, 0.09 * x, atol=1e-6)
    y = gridpure(x, lambda t: torch.full_like(t, 0.5), window=16, stride=12, iterations=1, gamma=0.2)
    assert torch.allclose(y, 0.8 * 0.5 + 0.2 * x, atol=1e-6)


def test_gridpure_packs_the_corners(toy):
    x = torch.rand(1, 3, 64, 64, generator=gen())
    tiles = []
    gridpure(x, lambda t: tiles.append(t) or t, window=32, stride=16, iterations=1)
    assert len(tiles) == 10  # 3 x 3 grid + the packed corners
    packed = tiles[-1]
    assert torch.equal(packed[..., :16, :16], x[..., :16, :16])
    assert torch.equal(packed[..., :16, 16:], x[..., :16, -16:])
    assert torch.equal(packed[..., 16:, :16], x[..., -16:, :16])
    assert torch.equal(packed[..., 16:, 16:], x[..., -16:, -16:])
    tiles.clear()
    gridpure(x, lambda t: tiles.append(t) or t, window=32, stride=16, iterations=2, pack_corners=False)
    assert len(tiles) == 18


def test_gridpure_removes_high_frequency_noise_and_keeps_content(trained_toy, noisy):
    model, cond = trained_toy
    xn, x = noisy
    calls = []

    def purify_window(t):
        calls.append(tuple(t.shape))
        return diffpure(model, t, cond, t_star=0.05, steps=2, generator=gen(len(calls)))

    y = gridpure(xn, purify_window, window=32, stride=16, iterations=2, gamma=0.1)
    assert calls[0] == (2, 3, 32, 32) and len(calls) == 2 * (3 * 2 + 1)
    assert hf_energy(y) < 0.1 * hf_energy(xn)
    assert psnr(y, x) > psnr(xn, x) + 2


def test_gridpure_callback_and_cancel():
    x = torch.rand(1, 3, 32, 32, generator=gen())
    infos = []
    gridpure(x, lambda t: t, window=16, stride=16, iterations=2, callback=infos.append)
    assert [i["i"] for i in infos] == list(range(10)) and infos[-1] == {"i": 9, "total": 10, "iteration": 1,
                                                                       "window": 4}
    tiles = []

    def cancel(info):
        raise Cancelled

    with pytest.raises(Cancelled):
        gridpure(x, lambda t: tiles.append(t) or t, window=16, stride=16, iterations=2, callback=cancel)
    assert len(tiles) == 1


def test_gridpure_rejects_a_tile_of_the_wrong_size():
    with pytest.raises(ValueError, match="purify_window"):
        gridpure(torch.rand(1, 3, 32, 32), lambda t: t[..., :8, :8], window=16, stride=8)


# --- IMPRESS ----------------------------------------------------------------------------------------------------

def test_impress_reduces_inconsistency_and_leaves_the_model_alone(trained_toy, noisy):
    model, _ = trained_toy
    xn, x = (v[..., :36, :30] for v in noisy)  # not a multiple of the down-sampling
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.requires_grad_(True)  # even with trainable parameters, no gradient may reach them
    try:
        y = impress(model, xn, iterations=30, lr=0.01, similarity="mse", weight=0.1)
        y_ssim = impress(model, xn, iterations=30, lr=0.01, similarity="ssim", weight=0.1)
        assert all(p.grad is None for p in model.parameters())
    finally:
        model.requires_grad_(False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with torch.no_grad():
        assert (vae_inconsistency(model, y) < 0.3 * vae_inconsistency(model, xn)).all()
        assert (vae_inconsistency(model, y_ssim) < 0.8 * vae_inconsistency(model, xn)).all()
    assert psnr(y, x) > psnr(xn, x) + 3  # on a VAE that knows smooth images, consistency removes the noise


def test_impress_similarity_keeps_the_image_close(toy):
    model, _ = toy
    x = smooth_image(1, 32, 32)
    far = impress(model, x, iterations=10, lr=0.02, similarity="mse", weight=0.0)
    near = impress(model, x, iterations=10, lr=0.02, similarity="mse", weight=100.0)
    assert (near - x).abs().mean() < 0.5 * (far - x).abs().mean()
    custom = impress(model, x, iterations=2, similarity=lambda a, b: (a - b).abs().mean((1, 2, 3)))
    assert custom.shape == x.shape


def test_impress_callback_and_cancel(toy):
    model, _ = toy
    x = smooth_image(1, 32, 32)
    infos = []
    impress(model, x, iterations=3, callback=infos.append)
    assert [i["i"] for i in infos] == [0, 1, 2] and {"consistency", "similarity", "loss"} <= set(infos[0])

    def cancel(info):
        raise Cancelled

    with pytest.raises(Cancelled):
        impress(model, x, iterations=50, callback=cancel)


# --- filters ----------------------------------------------------------------------------------------------------

def test_jpeg_quality():
    x = smooth_image(2, 64, 48, seed=3)
    assert psnr(jpeg(x, 100), x) > 40
    assert psnr(jpeg(x, 10), x) < 35
    assert torch.equal(jpeg(x, 50), jpeg(x, 50))


def test_jpeg_removes_high_frequency_noise(noisy):
    xn, _ = noisy
    assert hf_energy(jpeg(xn, 30)) < 0.5 * hf_energy(xn)


def test_gaussian_blur_known_answer():
    x = torch.zeros(1, 3, 41, 41)
    x[..., 20, 20] = 1
    y = gaussian_blur(x, 2.0)
    assert torch.allclose(y.sum((-1, -2)), torch.ones(1, 3), atol=1e-5)  # normalised kernel
    r = torch.arange(41.0) - 20
    var = float((y[0, 0] * r[None] ** 2).sum())
    assert abs(var - 4.0) < 0.2  # variance sigma^2 (less a little for the 3-sigma truncation)
    assert torch.equal(gaussian_blur(x, 0), x)
    flat = torch.full((1, 3, 9, 7), 0.3)
    assert torch.allclose(gaussian_blur(flat, 5.0), flat)  # kernel larger than the image


def test_resize_and_noise_known_answers():
    x = smooth_image(1, 50, 37)
    assert torch.equal(resize_down_up(x, 1.0), x)
    flat = torch.full((1, 3, 50, 37), 0.4)
    assert torch.allclose(resize_down_up(flat, 0.3), flat, atol=1e-6)
    grey = torch.full((2, 3, 64, 64), 0.5)
    d = gaussian_noise(grey, 0.05, gen()) - grey
    assert abs(float(d.std()) - 0.05) < 0.003 and abs(float(d.mean())) < 0.003
    assert torch.equal(gaussian_noise(grey, 0.05, gen(2)), gaussian_noise(grey, 0.05, gen(2)))
    assert torch.equal(gaussian_noise(grey, 0.0), grey)


def test_noisy_upscale_calls_the_upscaler():
    x = smooth_image(2, 50, 37)
    assert torch.equal(noisy_upscale(x, sigma=0, scale=1.0), x)
    seen = []

    def x4(img, size):  # a fixed-factor model: its output size is resampled to the input size
        seen.append((tuple(img.shape), tuple(size)))
        return torch.nn.functional.interpolate(img, scale_factor=4, mode="nearest")

    y = noisy_upscale(x, 0.1, 0.5, upscale=x4, generator=gen())
    assert seen == [((2, 3, 25, 18), (50, 37))] and y.shape == x.shape
    assert torch.equal(y, noisy_upscale(x, 0.1, 0.5, upscale=x4, generator=gen()))
    with pytest.raises(ValueError, match="upscale"):
        noisy_upscale(x, upscale=lambda img, size: img[0])


# --- parameter checks -------------------------------------------------------------------------------------------

BAD = [
    ("diffpure", dict(t_star=0.0), "t_star"),
    ("diffpure", dict(t_star=1.5), "t_star"),
    ("diffpure", dict(steps=0), "steps"),
    ("gridpure", dict(window=0), "window"),
    ("gridpure", dict(stride=0), "stride"),
    ("gridpure", dict(window=16, stride=32), "stride"),
    ("gridpure", dict(gamma=1.5), "gamma"),
    ("gridpure", dict(iterations=0), "iterations"),
    ("impress", dict(iterations=0), "iterations"),
    ("impress", dict(lr=0.0), "lr"),
    ("impress", dict(weight=-1.0), "weight"),
    ("impress", dict(similarity="lpips"), "similarity"),
    ("jpeg", dict(quality=0), "quality"),
    ("jpeg", dict(quality=101), "quality"),
    ("jpeg", dict(quality=75.5), "quality"),
    ("gaussian_blur", dict(sigma=-1.0), "sigma"),
    ("gaussian_noise", dict(sigma=float("nan")), "sigma"),
    ("resize", dict(scale=0.0), "scale"),
    ("resize", dict(scale=2.0), "scale"),
    ("noisy_upscale", dict(sigma=-0.1), "sigma"),
    ("noisy_upscale", dict(upscale="x4"), "upscale"),
]


@pytest.mark.parametrize("name,kwargs,arg", BAD)
def test_bad_parameters_name_the_argument(toy, name, kwargs, arg):
    model, cond = toy
    x = smooth_image(1, 32, 32)
    fn = PURIFIERS[name].fn
    args = {"diffpure": (model, x, cond), "impress": (model, x), "gridpure": (x, lambda t: t)}.get(name, (x,))
    with pytest.raises(ValueError, match=f"^{arg}:"):
        fn(*args, **kwargs)


def test_bad_images_are_rejected(toy):
    model, cond = toy
    with pytest.raises(ValueError, match="image"):
        jpeg(torch.rand(1, 1, 16, 16))
    with pytest.raises(ValueError, match="image"):
        diffpure(model, torch.full((1, 3, 16, 16), 2.0), cond)
    with pytest.raises(ValueError, match="image"):
        gridpure(torch.full((1, 3, 16, 16), float("nan")), lambda t: t)
