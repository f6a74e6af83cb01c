"""FID: torch-fidelity's Inception on random weights, the Fréchet distance against scipy, set sizes, missing files."""
import numpy as np
import pytest
import torch

from antipure_core.metrics import evaluate
from antipure_core.metrics.common import ModelNotAvailable
from antipure_core.metrics.fid import (INCEPTION_FILES, MIN_IMAGES, TooFewImages, feature_statistics, fid,
                                       frechet_distance, inception_features)
from tests.inception_toy import save_random_inception


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    folder = tmp_path_factory.mktemp("antipure_models")
    save_random_inception(folder)
    return folder


def images(n: int, seed: int, size: int = 48) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def scipy_frechet(mu1, s1, mu2, s2) -> float:
    """The reference formula as pytorch-fid / the TTUR code compute it (scipy's sqrtm)."""
    linalg = pytest.importorskip("scipy.linalg", reason="scipy is the reference for the matrix square root")
    covmean = linalg.sqrtm(s1 @ s2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


def test_frechet_distance_matches_scipy():
    rng = np.random.default_rng(0)
    for dim, n in ((8, 50), (32, 200)):
        a = rng.standard_normal((n, dim)) @ rng.standard_normal((dim, dim))
        b = 0.5 + rng.standard_normal((n, dim)) @ rng.standard_normal((dim, dim))
        mu1, s1, mu2, s2 = a.mean(0), np.cov(a.T), b.mean(0), np.cov(b.T)
        ours = frechet_distance(*(torch.from_numpy(t) for t in (mu1, s1, mu2, s2)))
        assert ours == pytest.approx(scipy_frechet(mu1, s1, mu2, s2), rel=1e-9)


@pytest.fixture(scope="module")
def sets(weights):
    """Two image sets of different counts and sizes, and their features (each forward pass costs ~0.5 s)."""
    a, b = images(3, 1), images(2, 2, size=80)
    return a, b, inception_features(a, weights), inception_features(b, weights)


def test_frechet_distance_of_singular_covariances_matches_scipy(sets):
    # features of few images: rank-deficient covariances, as FID on a handful of images has
    fa, fb = sets[2][:, :64].numpy(), sets[3][:, :64].numpy()
    mu1, s1, mu2, s2 = fa.mean(0), np.cov(fa.T), fb.mean(0), np.cov(fb.T)
    ours = frechet_distance(*(torch.from_numpy(t) for t in (mu1, s1, mu2, s2)))
    assert ours == pytest.approx(scipy_frechet(mu1, s1, mu2, s2), rel=1e-5)


def test_fid_identical_sets_is_zero_and_different_sets_are_not(weights, sets):
    a, b, fa, fb = sets
    assert fa.shape == (3, 2048) and fa.dtype == torch.float64 and fa.std() > 1e-3
    assert fid(a, a, weights) == pytest.approx(0.0, abs=1e-6)
    different = fid(a, b, weights)
    stats_a, stats_b = feature_statistics(fa), feature_statistics(fb)
    assert different > 1e-3 and different == pytest.approx(frechet_distance(*stats_a, *stats_b), rel=1e-9)
    assert frechet_distance(*stats_b, *stats_a) == pytest.approx(different, rel=1e-6)
    assert frechet_distance(*feature_statistics(fa.flip(0)), *stats_a) == pytest.approx(0.0, abs=1e-6)


def test_fid_needs_two_images_per_set(weights):
    assert MIN_IMAGES == 2
    with pytest.raises(TooFewImages, match="generated: FID needs at least 2 images in each set, got 1"):
        fid(images(1, 0), images(4, 1), weights, names=("generated", "clean"))
    with pytest.raises(ValueError, match="y: FID needs at least 2"):
        fid(images(3, 0), images(1, 1))  # checked before any weights are needed


def test_fid_missing_or_wrong_weights(tmp_path):
    with pytest.raises(ModelNotAvailable, match=f"{INCEPTION_FILES[0]}.*in {tmp_path}"):
        fid(images(2, 0), images(2, 1), tmp_path)
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / INCEPTION_FILES[0])
    with pytest.raises(ModelNotAvailable, match="is not the FID Inception-v3 weights"):
        fid(images(2, 0), images(2, 1), tmp_path)


def test_evaluate_reports_fid_when_the_weights_are_there(weights, tmp_path):
    clean, generated = images(2, 0, 64), images(2, 1, 64)
    row = evaluate(clean, generated=generated, faces=False, weights_dir=weights)
    assert isinstance(row["generated/fid"], float) and row["generated/fid"] > 0
    missing = evaluate(clean, generated=generated, faces=False, weights_dir=tmp_path)["generated/fid"]
    assert missing.startswith("not available: ") and str(tmp_path) in missing and INCEPTION_FILES[0] in missing
    one = evaluate(clean[:1], generated=generated, faces=False, weights_dir=weights)["generated/fid"]
    assert one == "n/a: clean: FID needs at least 2 images in each set, got 1"
