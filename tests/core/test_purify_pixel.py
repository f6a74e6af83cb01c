"""DiffPure and GrIDPure on a pixel-space ADM: GrIDPure's settings, DDPM steps, windows, blend, rounds, cancel."""
from dataclasses import astuple

import pytest
import torch

from antipure_core.callbacks import Cancelled
from antipure_core.diffusion import predict_x0
from antipure_core.purify_pixel import (GRIDPURE, PAPER_GRIDPURE, ddpm_denoise, pixel_diffpure, pixel_gridpure)
from antipure_core.windows import grid_windows
from tests.tiny_adm import tiny_pixel_diffusion

pytestmark = pytest.mark.usefixtures("one_thread")


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


class Recording:
    """A PixelDiffusion that records the timestep and input of every model call."""

    def __init__(self, model):
        self.m, self.calls = model, []

    def __getattr__(self, name):
        return getattr(self.m, name)

    def predict_noise_and_log_variance(self, x, t):
        self.calls.append((t.tolist(), x.clone()))
        return self.m.predict_noise_and_log_variance(x, t)


@pytest.fixture(scope="module")
def model():
    return tiny_pixel_diffusion()


@pytest.fixture(scope="module")
def image():
    return torch.rand(2, 3, 32, 40, generator=gen(1))


def test_gridpure_preset_is_gridpure_published_settings():
    assert astuple(GRIDPURE) == (10, 256, 128, 20, 0.1, 1)  # t*, window, stride, iterations, gamma, rounds
    assert PAPER_GRIDPURE.rounds == 2 and PAPER_GRIDPURE.iterations == 20


def test_noise_level_index_and_step_count_of_the_preset(model, image):
    rec = Recording(model)
    pixel_diffpure(rec, image, t_star=GRIDPURE.t_star, generator=gen(5))
    assert [c[0][0] for c in rec.calls] == list(range(9, -1, -1))  # 10 ancestral steps, from index t* - 1 = 9
    z0 = 2 * image - 1
    noise = torch.randn(z0.shape, generator=gen(5))
    ab = model.alphas_cumprod[9]
    assert torch.allclose(rec.calls[0][1], ab.sqrt() * z0 + (1 - ab).sqrt() * noise, atol=1e-6)


def test_ddpm_step_is_the_posterior_plus_learned_noise(model, image):
    z = 2 * image - 1
    with torch.no_grad():
        out0 = ddpm_denoise(model, z, 0)  # t = 0: the mean, no noise
        t0 = torch.zeros(2, dtype=torch.long)
        eps, _ = model.predict_noise_and_log_variance(z, t0)
        assert torch.allclose(out0, model.posterior_mean(predict_x0(model, z, t0, eps).clamp(-1, 1), z, t0), atol=1e-6)
        out1 = ddpm_denoise(model, z, 1, generator=gen(3), clip_denoised=False)
        t1 = torch.ones(2, dtype=torch.long)
        eps, log_var = model.predict_noise_and_log_variance(z, t1)
        z1 = model.posterior_mean(predict_x0(model, z, t1, eps), z, t1) + (0.5 * log_var).exp() * torch.randn(
            z.shape, generator=gen(3))
        assert torch.allclose(out1, ddpm_denoise(model, z1, 0, clip_denoised=False), atol=1e-5)


def test_diffpure_keeps_size_range_and_is_deterministic(model, image):
    y = pixel_diffpure(model, image, t_star=5, generator=gen(0))
    assert y.shape == image.shape and y.min() >= 0 and y.max() <= 1 and not torch.equal(y, image)
    assert torch.equal(y, pixel_diffpure(model, image, t_star=5, generator=gen(0)))
    assert not torch.equal(y, pixel_diffpure(model, image, t_star=5, generator=gen(1)))
    odd = torch.rand(1, 3, 13, 9, generator=gen(2))
    assert pixel_diffpure(model, odd, t_star=2, generator=gen(0)).shape == odd.shape
    rec = Recording(model)
    assert pixel_diffpure(rec, image, t_star=2, size=16, generator=gen(0)).shape == image.shape
    assert rec.calls[0][1].shape[-2:] == (16, 16)  # purified at 16 x 16, resampled back


def test_gridpure_is_windows_purified_averaged_and_blended(model):
    x = torch.rand(1, 3, 32, 40, generator=gen(4))
    w = grid_windows((32, 40), 16, 8)
    g = gen(7)
    tiles = [pixel_diffpure(model, t, 3, generator=g) for t in w.crops(x)]
    expected = (0.75 * w.merge(tiles) + 0.25 * x).clamp(0, 1)
    rec = Recording(model)
    y = pixel_gridpure(rec, x, t_star=3, window=16, stride=8, iterations=1, gamma=0.25, generator=gen(7))
    assert torch.allclose(y, expected, atol=1e-6)
    shapes = [tuple(c[1].shape[-2:]) for c in rec.calls]
    assert len(shapes) == 3 * w.count == 3 * (3 * 4 + 1) and set(shapes) == {(16, 16)}
    packed = rec.calls[-3][1]  # the packed corner window's first (noised) input: corners of the image
    ab = model.alphas_cumprod[2]
    corner = torch.cat([torch.cat([x[..., :8, :8], x[..., :8, -8:]], -1), torch.cat([x[..., -8:, :8], x[..., -8:, -8:]], -1)], -2)
    resid = (packed - ab.sqrt() * (2 * corner - 1)) / (1 - ab).sqrt()  # the added noise: unit variance if aligned
    assert 0.7 < float(resid.std()) < 1.3


def test_rounds_and_progress(model):
    x = torch.rand(1, 3, 24, 24, generator=gen(4))
    infos = []
    y2 = pixel_gridpure(model, x, t_star=2, window=16, stride=8, iterations=1, rounds=2, generator=gen(1),
                        callback=infos.append)
    count = grid_windows((24, 24), 16, 8).count
    assert [i["i"] for i in infos] == list(range(2 * count * 2)) and infos[-1]["total"] == 2 * count * 2
    assert {i["round"] for i in infos} == {0, 1} and [i["t"] for i in infos[:2]] == [1, 0]
    # rounds continue where the last one stopped: 2 rounds x 1 iteration = 1 round x 2 iterations
    assert torch.allclose(y2, pixel_gridpure(model, x, t_star=2, window=16, stride=8, iterations=2,
                                             generator=gen(1)), atol=1e-6)
    assert torch.equal(y2, pixel_gridpure(model, x, t_star=2, window=16, stride=8, iterations=1, rounds=2,
                                          generator=gen(1)))


def test_cancel_stops_within_one_model_call(model):
    rec, seen = Recording(model), []

    def cancel(info):
        seen.append(info)
        if len(seen) == 3:
            raise Cancelled

    with pytest.raises(Cancelled):
        pixel_gridpure(rec, torch.rand(1, 3, 32, 32), t_star=4, window=16, stride=16, callback=cancel)
    assert len(rec.calls) == 3


@pytest.mark.parametrize("kwargs,match", [
    (dict(window=64), "window: 64 px is larger than the image .32x40.; lower window to at most 32"),
    (dict(t_star=0), "t_star"),
    (dict(t_star=1001), "t_star"),
    (dict(rounds=0), "rounds"),
    (dict(window=16, stride=32), "stride"),
    (dict(gamma=1.5), "gamma"),
    (dict(iterations=0), "iterations"),
])
def test_gridpure_bad_arguments(model, image, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pixel_gridpure(model, image, **{"window": 16, "stride": 8, **kwargs})


def test_small_or_bad_images_are_refused(model):
    with pytest.raises(ValueError, match="image: 6x6 px is too small.*at least 8 px"):
        pixel_diffpure(model, torch.rand(1, 3, 6, 6))
    with pytest.raises(ValueError, match="image: 6x40 px is too small"):
        pixel_gridpure(model, torch.rand(1, 3, 6, 40), window=8, stride=8)
    with pytest.raises(ValueError, match="NaN"):
        pixel_diffpure(model, torch.full((1, 3, 16, 16), float("nan")))
    with pytest.raises(ValueError, match="size"):
        pixel_diffpure(model, torch.rand(1, 3, 16, 16), size=4)


@pytest.mark.parametrize("purify", ["gridpure", "diffpure"])
def test_common_noise_gives_every_set_the_noise_it_would_get_alone(model, purify):
    """Common random numbers: sets of n images in one batch each see the noise one set sees alone."""
    x = torch.rand(2, 3, 48, 48, generator=gen(3))
    other = (x + 0.1).clamp(0, 1)

    def run(batch, **kw):
        if purify == "gridpure":
            return pixel_gridpure(model, batch, t_star=3, window=32, stride=16, iterations=2, generator=gen(5), **kw)
        return pixel_diffpure(model, batch, t_star=4, generator=gen(5), **kw)

    alone = run(x)
    both = run(torch.cat([x, other, x]), common_noise=2)
    torch.testing.assert_close(both[:2], alone)
    torch.testing.assert_close(both[4:], alone)  # the same images with the same noise: the same output
    assert not torch.equal(run(torch.cat([x, x]))[:2], run(torch.cat([x, x]))[2:])  # without it, fresh noise
    with pytest.raises(ValueError, match="common_noise: the batch \\(3 images\\)"):
        run(torch.cat([x, x[:1]]), common_noise=2)
