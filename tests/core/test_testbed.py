"""Tests of the CPU efficacy testbed v2 (benchmarks/testbed): data split, both models, one tiny job, the report.

Untrained or barely trained weights and a handful of steps: this checks the
plumbing and the bookkeeping the tables rely on, not the numbers (those come
from ``python -m benchmarks.testbed.run``).
"""
import json
import math
from dataclasses import asdict, replace

import pytest
import torch

from antipure_core.adm import ADMUNet
from antipure_core.model import DiffusionModel, check_model
from antipure_core.pixel_diffusion import PixelDiffusion
from benchmarks.testbed import data, experiment, report
from benchmarks.testbed.model import TinyLDM
from benchmarks.testbed.purifier import PurifierConfig, diffusion_loss, train_purifier
from benchmarks.testbed.train import TrainConfig, train_unet, train_vae
from tests.toy import smooth_image

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ldm():
    torch.manual_seed(0)
    m = TinyLDM(num_identities=3, token_dim=8, vae_ch=4, unet_ch=8)
    torch.nn.init.normal_(m.unet.out[-1].weight, std=0.1)  # zero-initialised for training: no gradient to attack
    return m.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def adm():
    model, _ = train_purifier(PurifierConfig(steps=2, batch=2, crops=4), verbose=False)
    return model


def test_split_keeps_subjects_out_of_training():
    assert not set(data.SUBJECTS) & set(data.TRAIN_SOURCES)
    x, labels = data.training_crops(6, 64, generator=torch.Generator().manual_seed(0))
    assert x.shape == (6, 3, 64, 64) and labels.shape == (6,)
    assert int(labels.max()) < len(data.TRAIN_SOURCES)
    assert torch.equal((x * 255).round() / 255, x)  # on the 8-bit grid
    views = data.subject_views("chelsea", n=8)
    assert views.shape == (8, 3, 64, 64) and 0 <= float(views.min()) and float(views.max()) <= 1
    # the photos differ from one another (zoom, shift, flip), like snapshots of one subject
    assert all(float((views[i] - views[i + 1]).abs().mean()) > 0.01 for i in range(7))
    with pytest.raises(ValueError, match="subject"):
        data.subject_views("lena")


def test_ldm_has_sd_like_8px_latent_cells(ldm):
    check_model(ldm)
    assert isinstance(ldm, DiffusionModel) and ldm.downsample == 8
    x = smooth_image(2, 64, 64)
    z = ldm.encode(x)
    assert z.shape == (2, ldm.latent_channels, 8, 8) == (2, 8, 8, 8)
    assert ldm.decode(z).shape == (2, 3, 64, 64)
    cond = ldm.tokens("photo", identity=ldm.rare_token(0))
    assert cond.shape == (1, 2, 8)
    assert ldm.predict_noise(z, torch.tensor([0, 999]), cond).shape == z.shape
    with pytest.raises(ValueError, match="cls"):
        ldm.tokens("person")


def test_ldm_training_steps_run_and_scale_latent():
    torch.manual_seed(0)
    m = TinyLDM(num_identities=2, token_dim=8, vae_ch=4, unet_ch=8)
    x = smooth_image(4, 32, 32)
    cfg = TrainConfig(vae_steps=40, vae_batch=2, vae_crop=16, unet_steps=3, unet_batch=2, token_dim=8)
    info = train_vae(m, x, cfg, verbose=False)
    with torch.no_grad():  # the latent is rescaled to unit s.d., as SD's scale factor does
        assert abs(float(m.encode(x).std()) - 1) < 1e-3
    assert math.isfinite(info["vae_psnr_db"])
    before = [p.clone() for p in m.unet.parameters()]
    assert math.isfinite(train_unet(m, x, torch.tensor([0, 0, 1, 1]), cfg, verbose=False)["unet_loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, m.unet.parameters()))


def test_purifier_is_a_pixel_adm_with_learned_variance(adm):
    assert isinstance(adm, PixelDiffusion) and adm.downsample == 1
    assert adm.unet.config.learn_sigma and adm.unet.config.norm_groups == 4
    x0 = smooth_image(2, 32, 32) * 2 - 1
    t = torch.tensor([0, 150])
    loss, mse = diffusion_loss(adm, x0, t, torch.randn_like(x0), vlb_weight=1e-3)
    assert loss.shape == (2,) and torch.all(loss >= mse)  # the KL term is >= 0, and 0 at t = 0
    assert float(loss[0]) == pytest.approx(float(mse[0]))


def test_purifier_loss_trains_the_variance_through_the_kl_only():
    model = PixelDiffusion(ADMUNet(PurifierConfig().adm()))
    x0 = smooth_image(2, 32, 32) * 2 - 1
    loss, mse = diffusion_loss(model, x0, torch.tensor([50, 120]), torch.randn_like(x0), vlb_weight=1.0)
    (loss - mse).sum().backward()  # the KL alone: it must not move ε̂ (detached mean), only the variance
    out_w = model.unet.out[-1].weight.grad
    assert out_w[:3].abs().sum() == 0 and out_w[3:].abs().sum() > 0


def _tiny_settings(**kw):
    base = dict(pgd_steps=2, lora_steps=2, num_samples=2, sample_steps=2, gridpure_iterations=2, diffpure_t_star=3,
                sdedit_steps=2, surrogate_attack_steps=1, surrogate_train_steps=1, num_photos=2, curve=False,
                methods=("none", "advdm", "aspl", "antipure"))
    base.update(kw)
    return experiment.Settings(**base)


def test_one_tiny_job_rows_and_report(ldm, adm, tmp_path):
    s = _tiny_settings()
    views = data.subject_views("coffee", n=4)
    state = {k: v.clone() for k, v in ldm.state_dict().items()}
    rows, examples = experiment.run_job(ldm, adm, views[:2], views[2:], 2, s, log=lambda *_: None)
    assert len(rows) == len(s.methods) * len(s.purifiers) == len(examples)
    # no LoRA left behind by the surrogate or the customization; weights untouched
    assert ldm.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in ldm.state_dict().items())
    cell = {(r["method"], r["purifier"]): r for r in rows}
    ref = cell[("none", "none")]
    assert ref["sample_dist"] == 0 and ref["sample_gain"] == 0 and ref["survival"] == 0
    assert ref["psnr_protected"] == 99
    # unpurified, the whole perturbation survives: RMSE within the budget; AntiPure changed the photos
    for m in ("advdm", "aspl", "antipure"):
        assert 0 < cell[(m, "none")]["survival"] <= 8 + 1e-3
    # the clean photos purified twice differ only by the purifier's randomness
    assert cell[("none", "gridpure")]["survival"] > 0
    out = report.write_results(tmp_path, "tiny", rows, s, {"models": "toy"}, [8])
    text = out[0].read_text()
    assert "### survival" in text and "antipure_minus_best" in text and "| aspl |" in text
    png = report.example_figure(examples, s.methods, tmp_path / "ex.png")
    assert png.stat().st_size > 0


def test_curve_columns_are_gridpure_snapshots(ldm, adm):
    s = _tiny_settings(gridpure_iterations=12, gridpure_t_star=1, methods=("none",), purifiers=("gridpure",),
                       curve=True)
    x = data.subject_views("astronaut", n=1)
    out = experiment.purify_all(x, ldm, adm, s, seed=0, log=lambda *_: None)
    assert set(out) == {"none", "gridpure@10", "gridpure@12", "gridpure"}
    assert out["gridpure@12"] is out["gridpure"]
    # runs of 10 and 2 iterations are one 12-iteration run exactly (the second continues the first's noise stream)
    from antipure_core.purify_pixel import pixel_gridpure
    once = pixel_gridpure(adm, x, t_star=1, window=32, stride=16, iterations=12, gamma=0.1,
                          generator=torch.Generator().manual_seed(0))
    assert torch.allclose(once, out["gridpure"], atol=1e-6)


def test_subject_similarity_prefers_the_subject():
    photos = data.subject_views("astronaut", n=2)
    other = data.subject_views("coffee", n=2)
    sim_self = experiment.subject_similarity(photos.flip(-1), photos)
    sim_other = experiment.subject_similarity(other, photos)
    assert torch.all(sim_self > sim_other)


def test_comparison_pairs_by_subject():
    rows = [{"subject": s, "eta": 8, "method": m, "purifier": "gridpure", "sample_gain": v}
            for s, vals in enumerate([(0.1, 0.3), (0.2, 0.1)]) for m, v in zip(("antipure", "advdm"), vals)]
    agg = report.aggregate(rows)
    (entry,) = report.comparison(agg, rows, 8, ["gridpure"], "sample_gain")
    assert entry["best_baseline"] == "advdm" and entry["antipure_ahead"] == "1/2"
    assert entry["antipure_minus_best"].startswith("-0.050")


def test_committed_models_match_the_configs_and_work():
    """The models in benchmarks/testbed/models are the ones the default configs load, so a reader skips training."""
    from benchmarks.testbed.purifier import build_purifier, denoise_psnr
    from benchmarks.testbed.train import MODELS_DIR, build_model

    adm, adm_info = build_purifier(PurifierConfig(), MODELS_DIR, verbose=False)
    ldm, ldm_info = build_model(TrainConfig(), MODELS_DIR, verbose=False)
    assert adm_info["cached"] and ldm_info["cached"], "retrain: python -m benchmarks.testbed.run, then commit models/"
    got = denoise_psnr(adm, n=16)
    assert got["denoised_db"] > got["noisy_db"] + 3  # a trained denoiser, not random weights
    # the gridpure-unknown column's purifier: the same config with another training seed, committed too
    from benchmarks.testbed.run import unknown_config
    unknown, info = build_purifier(unknown_config(PurifierConfig(), experiment.Settings()), MODELS_DIR, verbose=False)
    assert info["cached"] and info["config"]["seed"] == 1
    assert any(not torch.equal(a, b) for a, b in zip(unknown.unet.parameters(), adm.unet.parameters()))
    x = data.subject_views("coffee", n=2)
    with torch.no_grad():
        recon = ldm.decode(ldm.encode(x))
    assert float(-10 * torch.log10((recon.clamp(0, 1) - x).square().mean())) > 15


def test_purify_jobs_routes_every_image_back_to_its_job():
    """Two budgets x two subjects in two batches: each job gets its own protected sets, clean photos once per subject."""
    from benchmarks.testbed.run import purify_jobs
    from benchmarks.testbed.train import MODELS_DIR

    class SerialPool:
        def map(self, fn, items, chunksize=1):
            return [fn(i) for i in items]

    s = experiment.Settings(methods=("none", "random"), purifiers=("none",))
    jobs = [(subj, replace(s, eta=eta / 255)) for eta in (8, 16) for subj in (0, 2)]
    # every image tells where it came from: job j, method m, photo p
    protected = [{m: torch.full((2, 3, 8, 8), 100 * j + 10 * k) + torch.arange(2.0).view(2, 1, 1, 1)
                  for k, m in enumerate(s.methods)} for j in range(len(jobs))]
    out, _ = purify_jobs(protected, jobs, SerialPool(), s, (TrainConfig(), PurifierConfig(), str(MODELS_DIR)))
    assert len(out) == len(jobs)
    for j, (subj, _) in enumerate(jobs):
        first = next(i for i, job in enumerate(jobs) if job[0] == subj)  # the budget-free sets come from here
        got = out[j]["none"]
        assert torch.equal(got["random"], protected[j]["random"])
        assert torch.equal(got["none"], protected[first]["none"])
        assert torch.equal(got["clean"], protected[first]["none"])


def test_common_noise_purifies_every_set_with_the_same_noise(ldm, adm):
    """With common random numbers the clean photos purified twice agree exactly, so survival's floor is 0."""
    s = _tiny_settings(gridpure_iterations=1, gridpure_t_star=2, methods=("none",), purifiers=("gridpure", "diffpure"),
                       num_photos=2, common_noise=True)
    x = data.subject_views("astronaut", n=2)
    out = experiment.purify_all(torch.cat([x, x, x]), ldm, adm, s, seed=3, log=lambda *_: None)
    for col in ("gridpure", "diffpure"):
        a, b, c = out[col].split(2)
        assert torch.equal(a, b) and torch.equal(a, c)
        assert not torch.equal(a[0], a[1])  # within a set, each photo still gets its own noise
    independent = experiment.purify_all(torch.cat([x, x]), ldm, adm, replace(s, common_noise=False), seed=3,
                                        log=lambda *_: None)
    a, b = independent["gridpure"].split(2)
    assert not torch.equal(a, b)
    with pytest.raises(ValueError, match="num_photos"):
        experiment.purify_all(torch.cat([x, x[:1]]), ldm, adm, s, seed=3, log=lambda *_: None)


@pytest.mark.parametrize("config", ["CalibratedPurifierConfig", "UnknownPurifierConfig"])
def test_committed_v3_purifiers_are_their_configs_own(config):
    """Testbed v3's calibrated and unknown purifiers are committed under their configs' keys; v2's key is unchanged."""
    from benchmarks.testbed import purifier
    from benchmarks.testbed.train import MODELS_DIR
    from benchmarks.testbed.weights import config_key, weights_path

    assert config_key(PurifierConfig()) == "94be56a636"  # v2's committed weights still load
    cfg = getattr(purifier, config)()
    assert config_key(cfg) != config_key(PurifierConfig())
    # checked before loading: a missing file would make build_purifier train for minutes
    path = weights_path(MODELS_DIR, f"purifier-adm-{cfg.size}px", cfg)
    assert path.exists(), f"retrain: python -m benchmarks.testbed.calibration --purifier v3, then commit {path.name}"
    adm, info = purifier.build_purifier(cfg, MODELS_DIR, verbose=False)
    assert info["cached"]
    assert info["config"] == json.loads(json.dumps(asdict(cfg)))  # tuples come back from JSON as lists
    got = purifier.denoise_psnr(adm, n=16, scale=cfg.data_scale)
    assert got["denoised_db"] > got["noisy_db"] + 2


def test_lowfreq_error_weighs_a_mean_shift_like_one_pixel():
    from benchmarks.testbed.purifier import lowfreq_error

    shift = torch.full((1, 3, 32, 32), 0.1)
    # a constant error has the same mean at every scale: each term is 0.01 x (pixels pooled), averaged
    assert float(lowfreq_error(shift)) == pytest.approx(0.01 * (16 + 64 + 1024) / 3)
    noise = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    # white noise: each pooled mean has variance 1 / k^2, scaled back to ~1
    assert float(lowfreq_error(noise).mean()) == pytest.approx(1.0, rel=0.1)


def test_unseen_columns_jpeg_upscale_gridpure_then_jpeg_and_the_unknown_purifier(ldm, adm):
    from antipure_core.purify_filters import jpeg

    unknown, _ = train_purifier(PurifierConfig(steps=2, batch=2, crops=4, seed=1), verbose=False)
    s = _tiny_settings(gridpure_t_star=2, methods=("none",), purifiers=experiment.ALL_PURIFIERS[:2]
                       + experiment.UNSEEN_PURIFIERS)
    x = data.subject_views("chelsea", n=2)
    out = experiment.purify_all(x, ldm, adm, s, seed=3, log=lambda *_: None, unknown=unknown)
    assert set(s.purifiers) <= set(out)
    for col in s.purifiers:
        assert out[col].shape == x.shape and 0 <= float(out[col].min()) and float(out[col].max()) <= 1
    assert torch.equal(out["gridpure+jpeg"], jpeg(out["gridpure"], 75))  # JPEG after GrIDPure, not a new draw
    assert torch.equal((out["jpeg"] * 255).round() / 255, out["jpeg"])  # a real 8-bit JPEG round trip
    assert not torch.allclose(out["gridpure-unknown"], out["gridpure"])  # another purifier's denoising
    again = experiment.purify_all(x, ldm, adm, s, seed=3, log=lambda *_: None, unknown=unknown)
    assert all(torch.equal(again[c], out[c]) for c in s.purifiers)  # seeded: noisy upscaling's noise too
    with pytest.raises(ValueError, match="unknown"):
        experiment.purify_all(x, ldm, adm, s, seed=3, log=lambda *_: None)


def test_purified_advdm_rows_attack_the_testbeds_gridpure_and_log_their_objective(ldm, adm):
    s = _tiny_settings(gridpure_t_star=3, methods=("none", "purified_advdm-full", "purified_advdm-k_step"),
                       purifiers=("none", "jpeg"), pgd_steps=3)
    ps = experiment.purified_settings("k_step", s)
    assert (ps.route, ps.k, ps.t_star, ps.window, ps.stride, ps.gamma, dict(ps.purifiers)) == \
        ("k_step", s.purified_k, s.gridpure_t_star, s.window, s.stride, s.gridpure_gamma, {"gridpure": 1.0})
    assert set(experiment.V2_METHODS).isdisjoint(m for m in experiment.METHODS if m.startswith("purified"))
    views = data.subject_views("coffee", n=4)
    rows, _ = experiment.run_job(ldm, adm, views[:2], views[2:], 2, s, log=lambda *_: None)
    cell = {(r["method"], r["purifier"]): r for r in rows}
    for m in s.methods[1:]:
        r = cell[(m, "none")]
        assert 0 < r["survival"] <= 8 + 1e-3  # within η = 8/255
        assert math.isfinite(r["objective_start"]) and math.isfinite(r["objective_end"])
    assert "objective_start" not in cell[("none", "none")]
    assert experiment.objective_summary([1.0, 2.0, 3.0], n=2) == {"objective_start": 1.5, "objective_end": 2.5}


def test_paired_t_interval_known_answer_and_resolution():
    from benchmarks.testbed import paired

    iv = paired.t_interval([1.0, 2.0, 3.0])  # mean 2, s.d. 1, half-width t(0.975, 2) / sqrt(3) = 2.484
    assert iv["n"] == 3 and iv["mean"] == pytest.approx(2.0) and iv["sd"] == pytest.approx(1.0)
    assert iv["hi"] - iv["mean"] == pytest.approx(4.303 / math.sqrt(3), abs=1e-6)
    assert paired.resolved(iv) == "unresolved"
    assert paired.resolved(paired.t_interval([1.0, 1.1, 0.9])) == "> 0"
    assert paired.resolved(paired.t_interval([-1.0, -1.1, -0.9])) == "< 0"
    assert math.isnan(paired.t_interval([1.0])["lo"])
    assert paired.t_quantile(12) == 2.228 and paired.t_quantile(100) == 1.96


def test_paired_comparisons_pair_by_subject_and_seed(tmp_path):
    from benchmarks.testbed import paired

    def row(subj, method, pur, gain, drop=0.0):
        return {"subject": subj, "eta": 16, "method": method, "purifier": pur, "seed": 1000 * subj,
                "sample_gain": gain, "subject_drop": drop}
    rows = [row(s, m, p, v) for s, vals in enumerate([(0.02, 0.01, 0.03), (0.03, 0.01, 0.02), (0.04, 0.02, 0.03)])
            for m, p, v in zip(("purified_advdm-full", "advdm", "purified_advdm-full"),
                               ("gridpure", "gridpure", "jpeg"), vals)]
    rows += [row(s, "advdm", "jpeg", 0.0) for s in range(3)]
    rows = [{k: str(v) for k, v in r.items()} for r in rows]  # as read back from a CSV
    a = paired.values(rows, 16, "purified_advdm-full", "gridpure", "sample_gain")
    b = paired.values(rows, 16, "advdm", "gridpure", "sample_gain")
    iv = paired.paired(a, b)
    assert list(iv["diffs"]) == [(0, 0), (1, 1000), (2, 2000)]
    assert [round(v, 6) for v in iv["diffs"].values()] == [0.01, 0.02, 0.02]
    assert paired.resolved(iv) == "> 0"
    held = paired.paired(paired.values(rows, 16, "purified_advdm-full", "jpeg", "sample_gain"), a, 0.5)
    assert [round(v, 6) for v in held["diffs"].values()] == [0.02, 0.005, 0.01]
    assert paired.best_baseline(rows, 16, "gridpure", "sample_gain", ["advdm"]) == "advdm"
    text = paired.question_tables(rows, 16, ["purified_advdm-full"], ["advdm"], unseen=("jpeg",))
    assert "minus advdm (best baseline)" in text and "| purified_advdm-full | jpeg |" in text
    # a column the best baseline was not run under says so instead of an empty interval
    rows += [{k: str(v) for k, v in row(s, "purified_advdm-full", "gridpure-unknown", 0.01).items()} for s in range(3)]
    text = paired.question_tables(rows, 16, ["purified_advdm-full"], ["advdm"], unseen=("gridpure-unknown",))
    assert "– (advdm not run there)" in text and "nan" not in text
    # joining per-subject runs keeps the first run's `none` rows
    import csv
    for name, method in (("a.csv", "none"), ("b.csv", "none")):
        with (tmp_path / name).open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["subject", "eta", "method", "purifier", "sample_gain"])
            w.writeheader()
            w.writerow({"subject": 0, "eta": 16, "method": method, "purifier": "gridpure", "sample_gain": name})
    assert [r["sample_gain"] for r in paired.merge([tmp_path / "a.csv", tmp_path / "b.csv"])] == ["a.csv"]


def test_purified_check_compares_perturbations_pairwise():
    from benchmarks.testbed.purified_check import compare

    d = {"a": torch.tensor([0.0, 1.0, 2.0, 3.0]) / 255, "b": torch.tensor([0.0, 1.0, 2.0, 5.0]) / 255}
    d["c"] = d["a"].clone()
    got = {(r["a"], r["b"]): r for r in compare(d)}
    assert set(got) == {("a", "b"), ("a", "c"), ("b", "c")}
    assert got[("a", "b")]["equal"] == 0.75 and got[("a", "b")]["mean_abs_diff_255"] == pytest.approx(0.5)
    assert got[("a", "c")]["equal"] == 1.0
