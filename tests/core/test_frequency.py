import math

import pytest
import torch

from antipure_core.frequency import (FrequencyGuidance, dct_matrix, high_frequency_mask, highest_quarter_mean,
                                     patch_dct, patch_fft, patch_idct, pfg_loss)


def direct_dct2(block):
    """2-D DCT-II straight from the textbook formula, orthonormal scaling."""
    p = block.shape[-1]
    out = torch.zeros(p, p, dtype=torch.float64)
    for u in range(p):
        for v in range(p):
            su = math.sqrt(1 / p) if u == 0 else math.sqrt(2 / p)
            sv = math.sqrt(1 / p) if v == 0 else math.sqrt(2 / p)
            acc = 0.0
            for m in range(p):
                for n in range(p):
                    acc += block[m, n] * math.cos(math.pi * (2 * m + 1) * u / (2 * p)) * math.cos(
                        math.pi * (2 * n + 1) * v / (2 * p))
            out[u, v] = su * sv * acc
    return out


@pytest.mark.parametrize("p", [4, 8])
def test_dct_matrix_orthonormal(p):
    d = dct_matrix(p, dtype=torch.float64)
    assert torch.allclose(d @ d.T, torch.eye(p, dtype=torch.float64), atol=1e-12)


def test_patch_dct_matches_direct_formula():
    x = torch.rand(1, 1, 8, 16, dtype=torch.float64)
    c = patch_dct(x, 8)
    assert c.shape == (1, 1, 1, 2, 8, 8)
    assert torch.allclose(c[0, 0, 0, 1], direct_dct2(x[0, 0, :, 8:]), atol=1e-10)


@pytest.mark.parametrize("shape,p", [((2, 3, 16, 24), 8), ((1, 4, 8, 8), 4), ((3, 1, 6, 12), 2)])
def test_patch_dct_inverse_and_energy(shape, p):
    x = torch.randn(shape, dtype=torch.float64)
    c = patch_dct(x, p)
    assert c.shape == (shape[0], shape[1], shape[2] // p, shape[3] // p, p, p)
    assert torch.allclose(patch_idct(c), x, atol=1e-10)
    assert torch.allclose(c.square().sum(), x.square().sum())  # Parseval


def test_constant_patch_is_pure_dc():
    c = patch_dct(torch.full((1, 1, 8, 8), 0.5), 8)
    assert c[..., 0, 0].item() == pytest.approx(0.5 * 8)
    c[..., 0, 0] = 0
    assert c.abs().max() < 1e-5


def test_fft_is_orthonormal():
    x = torch.randn(1, 2, 16, 16)
    assert torch.allclose(patch_fft(x, 8).abs().square().sum(), x.square().sum(), rtol=1e-4)


def test_hard_mask_threshold():
    m = high_frequency_mask(8)
    assert m.shape == (8, 8) and m[0, 0] == 0 and m[7, 7] == 1
    assert m[1, 2] == 0 and m[2, 2] == 1  # u + v >= 4
    assert int(m.sum()) == sum(1 for u in range(8) for v in range(8) if u + v >= 4)


def test_soft_mask_monotone_and_fft_layout():
    s = high_frequency_mask(8, soft=True)
    assert 0 < s[0, 0] < s[2, 2] < s[7, 7] < 1
    f = high_frequency_mask(8, transform="fft")
    assert f[0, 7] == f[0, 1]  # bin 7 is frequency -1


def test_highest_quarter_matches_direct_formula():
    x = torch.rand(2, 3, 8, 16, dtype=torch.float64) * 2 - 1
    want = torch.stack([torch.stack([direct_dct2(x[b, c, :, k:k + 8])[4:, 4:].sum() * 4 / 64
                                     for c in range(3) for k in (0, 8)]).mean() for b in range(2)])
    assert torch.allclose(highest_quarter_mean(x, 8), want, atol=1e-10)
    assert torch.allclose(pfg_loss(x.float(), FrequencyGuidance()), torch.sigmoid(want).float(), atol=1e-6)


def test_pfg_sees_only_the_highest_quarter():
    smooth = torch.linspace(-1, 1, 16).repeat(1, 3, 16, 1)  # a ramp: low frequencies only
    assert highest_quarter_mean(smooth, 8).abs().max() < 1e-2
    checker = (torch.arange(16)[:, None] + torch.arange(16)[None]).remainder(2).float().expand(1, 3, 16, 16)
    signed = highest_quarter_mean(checker * 2 - 1, 8)
    assert signed.abs().item() > 0.05  # the finest checkerboard lives in the bottom-right quarter
    flipped = highest_quarter_mean(1 - 2 * checker, 8)
    assert torch.allclose(flipped, -signed)  # signed: phase matters
    assert torch.allclose(highest_quarter_mean(1 - 2 * checker, 8, "magnitude"),
                          highest_quarter_mean(checker * 2 - 1, 8, "magnitude"))


def test_pfg_gradcheck():
    a = torch.rand(1, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: torch.sigmoid(highest_quarter_mean(t, 4)), (a,))


@pytest.mark.parametrize("kwargs,arg", [({"patch_size": 0}, "patch_size"), ({"patch_size": 5}, "patch_size"),
                                        ({"reduction": "abs"}, "reduction")])
def test_bad_guidance_config(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        FrequencyGuidance(**kwargs)
    with pytest.raises(ValueError, match=arg):
        highest_quarter_mean(torch.rand(1, 1, 10, 10), **kwargs)


def test_patch_size_must_divide():
    with pytest.raises(ValueError, match="multiples of 8"):
        patch_dct(torch.rand(1, 3, 12, 16), 8)
